//! Process-wide protection of secrets (SPEC §7) and the self-check that proves it from the
//! kernel's own accounting — `/proc/self/smaps`, `/proc/self/status`, `prctl`, `getrlimit` —
//! never from flags this program set.
//!
//! At start: [`apply`] makes the process non-dumpable with a zero core limit, probes that a
//! secret buffer can be locked, and optionally locks everything with `mlockall`. When locking
//! is not permitted it either refuses (`memory.require_lock`, exit 2 with a fix-it message) or
//! runs degraded with one warning. At run time: [`status`] and [`self_check`] for the admin API.

use std::fmt;
use std::io;
use std::sync::Once;
use std::time::SystemTime;

use serde::Serialize;

use crate::secret::procfs::{self, Mapping, ProcessStatus};
use crate::secret::sys::{self, ResourceLimit};
use crate::secret::{self, BufferRegion, RegistryStats, SecureBuffer};

/// The `[memory]` settings that drive hardening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HardeningOptions {
    /// Refuse to start when secrets (or, with `lock_all`, the process) cannot be locked.
    pub require_lock: bool,
    /// `mlockall(MCL_CURRENT | MCL_FUTURE)`: keep every page of the process out of swap.
    pub lock_all: bool,
    /// `RLIMIT_CORE = 0` and `PR_SET_DUMPABLE = 0`.
    pub disable_core_dumps: bool,
}

impl Default for HardeningOptions {
    /// SPEC §4 defaults: require_lock = true, lock_all = false, disable_core_dumps = true.
    fn default() -> Self {
        HardeningOptions {
            require_lock: true,
            lock_all: false,
            disable_core_dumps: true,
        }
    }
}

/// What [`apply`] achieved; kept by the app and passed to [`status`] / [`self_check`].
#[derive(Debug, Clone)]
pub struct HardeningState {
    options: HardeningOptions,
    lock_all_applied: bool,
    degraded: Vec<String>,
}

impl HardeningState {
    /// The options `apply` was called with.
    pub fn options(&self) -> HardeningOptions {
        self.options
    }

    /// Locking failed at start and `require_lock = false` let the process run anyway.
    pub fn is_degraded(&self) -> bool {
        !self.degraded.is_empty()
    }

    /// Why the process runs degraded (empty when it does not).
    pub fn degraded_reasons(&self) -> &[String] {
        &self.degraded
    }

    /// Whether `mlockall` succeeded at start.
    pub fn is_lock_all_applied(&self) -> bool {
        self.lock_all_applied
    }
}

/// Hardening could not be applied; the binary exits with status 2 and prints this.
#[derive(Debug)]
pub struct HardeningError {
    kind: HardeningErrorKind,
}

#[derive(Debug)]
enum HardeningErrorKind {
    CoreDumps {
        step: &'static str,
        error: io::Error,
    },
    Lock(LockDiagnosis),
}

impl HardeningError {
    /// Memory could not be locked and `require_lock` is set.
    pub fn is_lock_failure(&self) -> bool {
        matches!(self.kind, HardeningErrorKind::Lock(_))
    }
}

impl fmt::Display for HardeningError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            HardeningErrorKind::CoreDumps { step, error } => write!(
                f,
                "cannot disable core dumps ({step}: {error}); set memory.disable_core_dumps = false to skip"
            ),
            HardeningErrorKind::Lock(diagnosis) => write!(
                f,
                "{diagnosis}; or set memory.require_lock = false to run without locked memory (degraded)"
            ),
        }
    }
}

impl std::error::Error for HardeningError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            HardeningErrorKind::CoreDumps { error, .. } => Some(error),
            HardeningErrorKind::Lock(diagnosis) => Some(&diagnosis.error),
        }
    }
}

/// Why locking failed, with the numbers an operator needs and how to change them.
#[derive(Debug)]
struct LockDiagnosis {
    /// "mlockall(MCL_CURRENT|MCL_FUTURE)" or "mlock of a secret buffer".
    operation: &'static str,
    lock_all: bool,
    error: io::Error,
    memlock: Option<ResourceLimit>,
    process: Option<ProcessStatus>,
}

impl LockDiagnosis {
    fn now(operation: &'static str, lock_all: bool, error: io::Error) -> Self {
        LockDiagnosis {
            operation,
            lock_all,
            error,
            memlock: sys::memlock_limit().ok(),
            process: procfs::status().ok(),
        }
    }
}

impl fmt::Display for LockDiagnosis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot lock memory: {} failed ({})",
            self.operation, self.error
        )?;
        if let Some(limit) = self.memlock {
            write!(
                f,
                "; RLIMIT_MEMLOCK is {} (hard limit {})",
                describe(limit.soft),
                describe(limit.hard)
            )?;
        }
        if let Some(process) = self.process {
            if self.lock_all {
                write!(
                    f,
                    " but mlockall must lock the whole process: VmSize {} bytes",
                    process.vm_size_kb * 1024
                )?;
            }
            write!(
                f,
                "; CAP_IPC_LOCK is {} the effective capabilities (CapEff {:016x})",
                if process.has_ipc_lock() {
                    "in"
                } else {
                    "missing from"
                },
                process.effective_capabilities
            )?;
        }
        let binary = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "/path/to/sprint-sidecar".to_owned());
        let raise = if self.lock_all { "unlimited" } else { "65536" };
        write!(
            f,
            ". To fix: run as root, or grant the capability with `setcap cap_ipc_lock=+ep {binary}` \
             (in Kubernetes also add IPC_LOCK to securityContext.capabilities.add and set \
             allowPrivilegeEscalation: true), or raise the limit (`ulimit -l {raise}` in the \
             starting shell, `prlimit --memlock={bytes}:{bytes} --pid <pid>`, systemd \
             LimitMEMLOCK=, `docker run --ulimit memlock=-1`)",
            bytes = if self.lock_all {
                "unlimited"
            } else {
                "67108864"
            },
        )?;
        if self.lock_all {
            write!(
                f,
                "; or set memory.lock_all = false to lock only the secrets"
            )?;
        }
        Ok(())
    }
}

fn describe(limit: Option<u64>) -> String {
    match limit {
        Some(bytes) => format!("{bytes} bytes"),
        None => "unlimited".to_owned(),
    }
}

static DEGRADED_WARNING: Once = Once::new();

/// Applies process-wide protection. Call it first thing in `main`, after logging is set up and
/// before reading secrets or starting the runtime, so that no secret exists in a dumpable or
/// unlocked process.
///
/// # Errors
/// Core dumps cannot be disabled, or memory cannot be locked while `require_lock` is set; the
/// message says which limit or capability is missing and how to grant it.
pub fn apply(options: HardeningOptions) -> Result<HardeningState, HardeningError> {
    if options.disable_core_dumps {
        let core_dumps = |step, error| HardeningError {
            kind: HardeningErrorKind::CoreDumps { step, error },
        };
        sys::set_core_limit(ResourceLimit::fixed(0))
            .map_err(|e| core_dumps("setrlimit(RLIMIT_CORE, 0)", e))?;
        sys::set_dumpable(false).map_err(|e| core_dumps("prctl(PR_SET_DUMPABLE, 0)", e))?;
    }
    let mut state = HardeningState {
        options,
        lock_all_applied: false,
        degraded: Vec::new(),
    };
    let mut failures = Vec::new();
    if options.lock_all {
        match sys::lock_all_memory() {
            Ok(()) => state.lock_all_applied = true,
            Err(error) => failures.push(LockDiagnosis::now(
                "mlockall(MCL_CURRENT|MCL_FUTURE)",
                true,
                error,
            )),
        }
    }
    // Probe that a secret buffer can be locked now, so a refusal happens at start rather
    // than when the first secret is read.
    match SecureBuffer::from_slice(&[0]) {
        Ok(probe) => {
            if let Some(error) = probe.lock_error() {
                let error = io::Error::new(error.kind(), error.to_string());
                failures.push(LockDiagnosis::now("mlock of a secret buffer", false, error));
            }
        }
        Err(error) => failures.push(LockDiagnosis::now(
            "allocation of a secret buffer",
            false,
            io::Error::other(error.to_string()),
        )),
    }
    if options.require_lock {
        if let Some(first) = failures.into_iter().next() {
            return Err(HardeningError {
                kind: HardeningErrorKind::Lock(first),
            });
        }
    } else {
        state.degraded = failures.iter().map(LockDiagnosis::summary).collect();
    }
    if state.is_degraded() {
        DEGRADED_WARNING.call_once(|| {
            tracing::warn!(
                reasons = %state.degraded.join("; "),
                "memory protection degraded: secrets may be swapped out (memory.require_lock = false)"
            );
        });
    } else if state.lock_all_applied {
        warn_if_lock_all_is_bounded();
    }
    Ok(state)
}

impl LockDiagnosis {
    /// One line for the degraded warning and status: what failed and the limit in force.
    fn summary(&self) -> String {
        let limit = self
            .memlock
            .map_or("unknown".to_owned(), |l| describe(l.soft));
        let capability = self.process.map_or("unknown", |p| {
            if p.has_ipc_lock() {
                "present"
            } else {
                "absent"
            }
        });
        format!(
            "{} failed: {} (RLIMIT_MEMLOCK {limit}, CAP_IPC_LOCK {capability})",
            self.operation, self.error
        )
    }
}

/// With `MCL_FUTURE` but without `CAP_IPC_LOCK`, every later mapping counts against
/// RLIMIT_MEMLOCK; once it is reached, allocations fail. Say so once at start.
fn warn_if_lock_all_is_bounded() {
    let capable = procfs::status().is_ok_and(|s| s.has_ipc_lock());
    if let (
        false,
        Ok(ResourceLimit {
            soft: Some(limit), ..
        }),
    ) = (capable, sys::memlock_limit())
    {
        tracing::warn!(
            limit_bytes = limit,
            "lock_all is in force without CAP_IPC_LOCK: memory growth beyond RLIMIT_MEMLOCK will fail"
        );
    }
}

/// `GET /api/v1/memory-protection/status` (SPEC §6), read from the kernel now.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryProtectionStatus {
    /// Every secure buffer is locked in RAM and excluded from dumps (kernel's smaps).
    pub enabled: bool,
    /// Live secure buffers holding secrets (the self-check's scratch buffer excluded).
    pub secure_buffers: usize,
    /// Locked bytes of those buffers (smaps `Locked:`).
    pub locked_bytes: u64,
    /// Every mapping of the process is locked (`mlockall` in force).
    pub lock_all: bool,
    /// RLIMIT_CORE is 0 and the process is not dumpable.
    pub core_dumps_disabled: bool,
    /// `PR_GET_DUMPABLE` != 0.
    pub dumpable: bool,
    /// RLIMIT_MEMLOCK soft limit; null when unlimited.
    pub mlock_limit_bytes: Option<u64>,
    /// Locking failed at start (require_lock = false) or a secret is not locked now.
    pub degraded: bool,
    /// Freed heap memory is zeroed (the wiping allocator's switch).
    pub wipe_freed_memory: bool,
    /// Result of running the self-check now.
    pub self_check: bool,
}

/// One check of the self-check: `{name, ok, detail}`.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// `GET /api/v1/memory-protection/self-check`: 200 when `passed`, else 503.
#[derive(Debug, Clone, Serialize)]
pub struct SelfCheckReport {
    pub passed: bool,
    pub checks: Vec<Check>,
    /// RFC 3339 UTC.
    pub checked_at: String,
}

/// The memory-protection status, computed now (this runs the self-check).
pub fn status(state: &HardeningState) -> MemoryProtectionStatus {
    let inspection = Inspection::now(state);
    let report = inspection.report();
    let secrets: Vec<&BufferRegion> = inspection
        .registry
        .regions
        .iter()
        .filter(|r| Some(r.id) != inspection.scratch_id)
        .collect();
    let maps = inspection.maps.as_deref().unwrap_or(&[]);
    let enabled = report
        .checks
        .iter()
        .filter(|c| {
            matches!(
                c.name,
                "secure_buffers_locked" | "secure_buffers_excluded_from_dumps"
            )
        })
        .all(|c| c.ok);
    let locked_bytes = secrets
        .iter()
        .flat_map(|r| procfs::overlapping(maps, &r.data))
        .map(|m| m.locked_kb * 1024)
        .sum();
    let dumpable = inspection.dumpable.as_ref().copied().unwrap_or(true);
    let core_zero = matches!(inspection.core, Ok(ResourceLimit { soft: Some(0), .. }));
    MemoryProtectionStatus {
        enabled,
        secure_buffers: secrets.len(),
        locked_bytes,
        lock_all: inspection.lock_all_in_force(),
        core_dumps_disabled: core_zero && !dumpable,
        dumpable,
        mlock_limit_bytes: inspection.memlock.as_ref().ok().and_then(|l| l.soft),
        degraded: state.is_degraded() || !enabled,
        wipe_freed_memory: secret::wipe_on_free(),
        self_check: report.passed,
    }
}

/// Runs every check now against the kernel's accounting; see the module docs.
pub fn self_check(state: &HardeningState) -> SelfCheckReport {
    Inspection::now(state).report()
}

/// Everything the checks look at, gathered once while a scratch buffer is alive.
struct Inspection {
    options: HardeningOptions,
    registry: RegistryStats,
    /// Buffers a reader opened at some point while the kernel's view was being read.
    in_use: Vec<u64>,
    scratch_id: Option<u64>,
    round_trip: Result<String, String>,
    canaries: Vec<secret::CanaryStatus>,
    maps: Result<Vec<Mapping>, String>,
    process: Result<ProcessStatus, String>,
    dumpable: io::Result<bool>,
    core: io::Result<ResourceLimit>,
    memlock: io::Result<ResourceLimit>,
}

impl Inspection {
    fn now(state: &HardeningState) -> Inspection {
        let pattern: Vec<u8> = (0..64).map(|_| fastrand::u8(1..=u8::MAX)).collect();
        let mut scratch = SecureBuffer::build::<secret::SecretError>(
            "self-check scratch buffer",
            pattern.len(),
            |bytes| {
                bytes.copy_from_slice(&pattern);
                Ok(pattern.len())
            },
        );
        // Every kernel fact is read while the scratch buffer is alive and registered, and
        // every buffer pinned so none is released between the snapshot and smaps.
        let pinned = secret::pin_registry();
        let maps = procfs::smaps().map_err(|e| format!("cannot read /proc/self/smaps: {e}"));
        let process = procfs::status().map_err(|e| format!("cannot read /proc/self/status: {e}"));
        // Requests expose the token all the time: a buffer opened before, during or after the
        // smaps read may legitimately show r--p there.
        let after = pinned.regions_now();
        let in_use = pinned
            .stats()
            .regions
            .iter()
            .zip(&after)
            .filter(|(before, now)| {
                before.is_open || now.is_open || before.windows_opened != now.windows_opened
            })
            .map(|(before, _)| before.id)
            .collect();
        // Canary checks open each buffer, so they come after the open-state comparison.
        let canaries = pinned.check_canaries();
        let round_trip = match scratch {
            Ok(ref mut buffer) => wipe_round_trip(buffer, &pattern),
            Err(ref error) => Err(format!("cannot create a scratch buffer: {error}")),
        };
        Inspection {
            options: state.options,
            registry: pinned.stats().clone(),
            in_use,
            scratch_id: scratch.as_ref().ok().map(SecureBuffer::id),
            round_trip,
            canaries,
            maps,
            process,
            dumpable: sys::is_dumpable(),
            core: sys::core_limit(),
            memlock: sys::memlock_limit(),
        }
    }

    fn report(&self) -> SelfCheckReport {
        let checks = vec![
            self.buffers_locked(),
            self.buffers_excluded_from_dumps(),
            self.guard_pages(),
            self.buffers_sealed(),
            self.canaries(),
            self.round_trip(),
            self.vm_locked(),
            self.not_dumpable(),
            self.core_limit(),
            self.mlock_headroom(),
            self.ipc_lock(),
            self.lock_all(),
        ];
        SelfCheckReport {
            passed: checks.iter().all(|c| c.ok),
            checks,
            checked_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        }
    }

    /// For each buffer, the smaps mappings over `range(region)`, or a failure detail.
    fn per_region(
        &self,
        name: &'static str,
        range: impl Fn(&BufferRegion) -> std::ops::Range<usize>,
        verdict: impl Fn(&BufferRegion, &[&Mapping]) -> Result<(), String>,
        summary: impl FnOnce(&[BufferRegion], &[Mapping]) -> String,
    ) -> Check {
        let maps = match &self.maps {
            Ok(maps) => maps,
            Err(detail) => return failed(name, detail.clone()),
        };
        let problems: Vec<String> = self
            .registry
            .regions
            .iter()
            .filter_map(|region| {
                let range = range(region);
                let found = procfs::overlapping(maps, &range);
                let result = if procfs::covers(&found, &range) {
                    verdict(region, &found)
                } else {
                    Err("not found in /proc/self/smaps".to_owned())
                };
                result
                    .err()
                    .map(|why| format!("{}: {why}", describe_region(region)))
            })
            .collect();
        if problems.is_empty() {
            Check {
                name,
                ok: true,
                detail: summary(&self.registry.regions, maps),
            }
        } else {
            failed(name, problems.join("; "))
        }
    }

    fn buffers_locked(&self) -> Check {
        self.per_region(
            "secure_buffers_locked",
            |r| r.data.clone(),
            |_, found| {
                let all_lo = found.iter().all(|m| m.has_flag("lo"));
                let locked_kb: u64 = found.iter().map(|m| m.locked_kb).sum();
                match (all_lo, locked_kb) {
                    (true, 1..) => Ok(()),
                    (false, _) => Err("VmFlags lack `lo` (not mlocked)".to_owned()),
                    (true, 0) => Err("smaps shows Locked: 0 kB".to_owned()),
                }
            },
            |regions, maps| {
                let locked_kb: u64 = regions
                    .iter()
                    .flat_map(|r| procfs::overlapping(maps, &r.data))
                    .map(|m| m.locked_kb)
                    .sum();
                format!(
                    "{} buffers; every data region has VmFlags `lo`, smaps Locked: {locked_kb} kB in total",
                    regions.len()
                )
            },
        )
    }

    fn buffers_excluded_from_dumps(&self) -> Check {
        self.per_region(
            "secure_buffers_excluded_from_dumps",
            |r| r.data.clone(),
            |_, found| {
                if found.iter().all(|m| m.has_flag("dd")) {
                    Ok(())
                } else {
                    Err("VmFlags lack `dd` (MADV_DONTDUMP)".to_owned())
                }
            },
            |regions, _| {
                format!(
                    "{} buffers; every data region has VmFlags `dd`",
                    regions.len()
                )
            },
        )
    }

    fn guard_pages(&self) -> Check {
        let leading = self.per_region(
            "guard_pages_no_access",
            |r| r.leading_guard.clone(),
            guard_verdict,
            |_, _| String::new(),
        );
        let trailing = self.per_region(
            "guard_pages_no_access",
            |r| r.trailing_guard.clone(),
            guard_verdict,
            |_, _| String::new(),
        );
        match (leading.ok, trailing.ok) {
            (true, true) => Check {
                name: "guard_pages_no_access",
                ok: true,
                detail: format!(
                    "{} buffers; the page before and after each data region is ---p",
                    self.registry.regions.len()
                ),
            },
            (true, false) => trailing,
            (false, true) => leading,
            (false, false) => failed(
                "guard_pages_no_access",
                format!("{}; {}", leading.detail, trailing.detail),
            ),
        }
    }

    fn buffers_sealed(&self) -> Check {
        let mut check = self.per_region(
            "secure_buffers_sealed",
            |r| r.data.clone(),
            |region, found| {
                if self.in_use.contains(&region.id) || found.iter().all(|m| m.is_no_access()) {
                    Ok(())
                } else {
                    Err(format!(
                        "{} although no reader was inside expose",
                        found[0].perms
                    ))
                }
            },
            |regions, _| {
                let open = self.in_use.len();
                format!(
                    "{} buffers ---p (PROT_NONE) while not in use; {open} opened by a reader during the check",
                    regions.len() - open
                )
            },
        );
        if self.registry.seal_failures > 0 {
            check.ok = false;
            check.detail = format!(
                "{}; resealing failed {} times since start",
                check.detail, self.registry.seal_failures
            );
        }
        check
    }

    fn canaries(&self) -> Check {
        let broken: Vec<String> = self
            .canaries
            .iter()
            .filter(|c| !c.intact)
            .map(|c| format!("buffer {} ({})", c.id, c.label))
            .collect();
        if broken.is_empty() {
            passed(
                "canaries_intact",
                format!("{} canaries match", self.canaries.len()),
            )
        } else {
            failed(
                "canaries_intact",
                format!(
                    "canary overwritten (memory corruption): {}",
                    broken.join(", ")
                ),
            )
        }
    }

    fn round_trip(&self) -> Check {
        match &self.round_trip {
            Ok(detail) => passed("wipe_round_trip", detail.clone()),
            Err(detail) => failed("wipe_round_trip", detail.clone()),
        }
    }

    fn vm_locked(&self) -> Check {
        let process = match &self.process {
            Ok(process) => process,
            Err(detail) => return failed("vm_locked", detail.clone()),
        };
        let expected: usize = self.registry.regions.iter().map(|r| r.data.len()).sum();
        let locked = process.vm_locked_kb * 1024;
        let detail = format!(
            "VmLck {} kB; secure buffers need {} kB",
            process.vm_locked_kb,
            expected / 1024
        );
        if locked >= expected as u64 && (expected == 0 || locked > 0) {
            passed("vm_locked", detail)
        } else {
            failed("vm_locked", detail)
        }
    }

    fn not_dumpable(&self) -> Check {
        let name = "not_dumpable";
        match &self.dumpable {
            Err(error) => failed(name, format!("prctl(PR_GET_DUMPABLE) failed: {error}")),
            Ok(false) => passed(name, "PR_GET_DUMPABLE = 0".to_owned()),
            Ok(true) if !self.options.disable_core_dumps => passed(
                name,
                "PR_GET_DUMPABLE = 1; not required (memory.disable_core_dumps = false)".to_owned(),
            ),
            Ok(true) => failed(
                name,
                "PR_GET_DUMPABLE = 1: core dumps and same-user ptrace are possible".to_owned(),
            ),
        }
    }

    fn core_limit(&self) -> Check {
        let name = "core_limit_zero";
        match &self.core {
            Err(error) => failed(name, format!("getrlimit(RLIMIT_CORE) failed: {error}")),
            Ok(limit) => {
                let detail = format!(
                    "RLIMIT_CORE soft {}, hard {}",
                    describe(limit.soft),
                    describe(limit.hard)
                );
                if limit.soft == Some(0) {
                    passed(name, detail)
                } else if !self.options.disable_core_dumps {
                    passed(
                        name,
                        format!("{detail}; not required (memory.disable_core_dumps = false)"),
                    )
                } else {
                    failed(name, detail)
                }
            }
        }
    }

    fn mlock_headroom(&self) -> Check {
        let name = "mlock_headroom";
        let (limit, process) = match (&self.memlock, &self.process) {
            (Ok(limit), Ok(process)) => (limit, process),
            (Err(error), _) => {
                return failed(name, format!("getrlimit(RLIMIT_MEMLOCK) failed: {error}"));
            }
            (_, Err(detail)) => return failed(name, detail.clone()),
        };
        if process.has_ipc_lock() {
            return passed(
                name,
                format!(
                    "CAP_IPC_LOCK is effective: RLIMIT_MEMLOCK ({}) does not apply",
                    describe(limit.soft)
                ),
            );
        }
        let Some(soft) = limit.soft else {
            return passed(name, "RLIMIT_MEMLOCK unlimited".to_owned());
        };
        let locked = process.vm_locked_kb * 1024;
        let headroom = soft.saturating_sub(locked);
        // Enough to re-read every secret (rotation builds the new buffer before dropping the
        // old one) plus one more small buffer.
        let secrets: usize = self.registry.regions.iter().map(|r| r.data.len()).sum();
        let needed = (secrets + 4 * sys::page_size()) as u64;
        let detail = format!(
            "RLIMIT_MEMLOCK {soft} bytes, VmLck {locked} bytes, headroom {headroom} bytes (rotating every secret needs {needed})"
        );
        if headroom >= needed {
            passed(name, detail)
        } else {
            failed(name, detail)
        }
    }

    fn ipc_lock(&self) -> Check {
        let name = "cap_ipc_lock";
        let process = match &self.process {
            Ok(process) => process,
            Err(detail) => return failed(name, detail.clone()),
        };
        let caps = format!("CapEff {:016x}", process.effective_capabilities);
        if process.has_ipc_lock() {
            passed(name, format!("CAP_IPC_LOCK present ({caps})"))
        } else if !self.options.lock_all {
            passed(
                name,
                format!(
                    "CAP_IPC_LOCK absent ({caps}); informational: lock_all is off, so secrets only need RLIMIT_MEMLOCK (see mlock_headroom)"
                ),
            )
        } else if self.lock_all_in_force() {
            passed(
                name,
                format!("CAP_IPC_LOCK absent ({caps}); lock_all works within RLIMIT_MEMLOCK"),
            )
        } else {
            failed(
                name,
                format!(
                    "CAP_IPC_LOCK absent ({caps}) and memory.lock_all needs it (or an unlimited RLIMIT_MEMLOCK)"
                ),
            )
        }
    }

    /// Whether every lockable mapping of the process has `lo` (what `mlockall` does).
    fn lock_all_in_force(&self) -> bool {
        self.maps.as_ref().is_ok_and(|maps| {
            maps.iter()
                .filter(|m| !m.is_special())
                .all(|m| m.has_flag("lo"))
        })
    }

    fn lock_all(&self) -> Check {
        let name = "lock_all";
        let maps = match &self.maps {
            Ok(maps) => maps,
            Err(detail) => return failed(name, detail.clone()),
        };
        let lockable: Vec<&Mapping> = maps.iter().filter(|m| !m.is_special()).collect();
        let unlocked: Vec<&&Mapping> = lockable.iter().filter(|m| !m.has_flag("lo")).collect();
        let example = unlocked.first().map_or(String::new(), |m| {
            format!(
                "; e.g. {} {} (VmFlags {})",
                m.perms,
                if m.name.is_empty() { "[anon]" } else { &m.name },
                m.flags.join(" ")
            )
        });
        let unlocked = unlocked.len();
        let (vm_locked, vm_rss) = self
            .process
            .as_ref()
            .map_or((0, 0), |p| (p.vm_locked_kb, p.vm_rss_kb));
        let detail = format!(
            "{} of {} mappings locked; VmLck {vm_locked} kB, VmRSS {vm_rss} kB",
            lockable.len() - unlocked,
            lockable.len()
        );
        match (self.options.lock_all, unlocked) {
            (true, 0) => passed(name, format!("in force: {detail}")),
            (true, _) => failed(
                name,
                format!("memory.lock_all = true but not in force: {detail}{example}"),
            ),
            (false, 0) => passed(name, format!("in force although not configured: {detail}")),
            (false, _) => passed(
                name,
                format!("not configured (memory.lock_all = false); informational: {detail}"),
            ),
        }
    }
}

fn guard_verdict(_: &BufferRegion, found: &[&Mapping]) -> Result<(), String> {
    match found.iter().find(|m| !m.is_no_access()) {
        None => Ok(()),
        Some(m) => Err(format!("guard page is {} instead of ---p", m.perms)),
    }
}

/// Writes `pattern` into the scratch buffer (done by the caller), reads it back, wipes it and
/// verifies every byte is zero — before the buffer is released.
fn wipe_round_trip(buffer: &mut SecureBuffer, pattern: &[u8]) -> Result<String, String> {
    if !buffer.expose(|bytes| bytes == pattern) {
        return Err("the pattern written to the scratch buffer did not read back".to_owned());
    }
    if !buffer.wipe() {
        return Err("the scratch buffer has a shared view and cannot be wiped".to_owned());
    }
    let nonzero = buffer.expose(|bytes| bytes.iter().filter(|&&b| b != 0).count());
    if nonzero == 0 {
        Ok(format!(
            "{} random bytes written, read back, wiped; all zero before release",
            pattern.len()
        ))
    } else {
        Err(format!("{nonzero} bytes still non-zero after wipe"))
    }
}

fn describe_region(region: &BufferRegion) -> String {
    format!("buffer {} ({})", region.id, region.label)
}

fn passed(name: &'static str, detail: String) -> Check {
    Check {
        name,
        ok: true,
        detail,
    }
}

fn failed(name: &'static str, detail: String) -> Check {
    Check {
        name,
        ok: false,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Output};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Selects the scenario `child_entry` runs in a re-executed copy of this test binary.
    const CHILD: &str = "SPRINT_SIDECAR_HARDENING_CHILD";

    fn is_root() -> bool {
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    }

    /// Runs one scenario in a fresh process (hardening changes process-wide state, and other
    /// tests corrupt canaries on purpose). With `unprivileged`, as user `nobody`.
    fn run_child(scenario: &str, unprivileged: bool) -> Output {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args(["hardening_child_entry", "--test-threads=1", "--nocapture"])
            .env(CHILD, scenario);
        if unprivileged {
            command.uid(65534).gid(65534);
        }
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "scenario {scenario} failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn check<'a>(report: &'a SelfCheckReport, name: &str) -> &'a Check {
        report.checks.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn hardening_child_entry() {
        let Ok(scenario) = std::env::var(CHILD) else {
            return; // an ordinary test run: nothing to do
        };
        match scenario.as_str() {
            "harden_as_root" => {
                let state = apply(HardeningOptions::default()).unwrap();
                let token = Arc::new(SecureBuffer::from_slice(b"Bearer relay-token").unwrap());
                let _key = SecureBuffer::from_slice(&[0x30; 1200]).unwrap();
                // Requests expose the token while the check runs: it must still pass.
                let stop = Arc::new(AtomicBool::new(false));
                let traffic = {
                    let (token, stop) = (Arc::clone(&token), Arc::clone(&stop));
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            token.expose(|bytes| assert_eq!(bytes.len(), 18));
                        }
                    })
                };
                for _ in 0..50 {
                    let report = self_check(&state);
                    assert!(report.passed, "under traffic: {report:#?}");
                }
                stop.store(true, Ordering::Relaxed);
                traffic.join().unwrap();
                let report = self_check(&state);
                println!("{}", serde_json::to_string_pretty(&report).unwrap());
                assert!(report.passed, "{report:#?}");
                assert_eq!(report.checks.len(), 12);
                let status = status(&state);
                println!("{}", serde_json::to_string_pretty(&status).unwrap());
                assert!(status.enabled && status.self_check && status.core_dumps_disabled);
                assert!(!status.dumpable && !status.degraded && !status.lock_all);
                assert_eq!(status.secure_buffers, 2);
                assert_eq!(status.locked_bytes, 2 * sys::page_size() as u64);
            }
            "lock_all_as_root" => {
                let options = HardeningOptions {
                    lock_all: true,
                    ..HardeningOptions::default()
                };
                let state = apply(options).unwrap();
                assert!(state.is_lock_all_applied());
                let _token = SecureBuffer::from_slice(b"Bearer relay-token").unwrap();
                let report = self_check(&state);
                println!("{}", serde_json::to_string_pretty(&report).unwrap());
                assert!(report.passed, "{report:#?}");
                assert!(check(&report, "lock_all").detail.starts_with("in force"));
                assert!(status(&state).lock_all);
            }
            "required_lock_refused" => {
                sys::set_memlock_limit(ResourceLimit::fixed(0)).unwrap();
                let error = apply(HardeningOptions::default()).unwrap_err();
                let message = error.to_string();
                println!("{message}");
                assert!(error.is_lock_failure());
                for needle in [
                    "RLIMIT_MEMLOCK is 0 bytes",
                    "CAP_IPC_LOCK is missing",
                    "setcap cap_ipc_lock=+ep",
                    "IPC_LOCK",
                    "ulimit -l",
                    "require_lock = false",
                ] {
                    assert!(message.contains(needle), "missing {needle:?} in {message}");
                }
                let error = apply(HardeningOptions {
                    lock_all: true,
                    ..HardeningOptions::default()
                })
                .unwrap_err();
                println!("{error}");
                assert!(error.to_string().contains("mlockall"));
            }
            "degraded_allowed" => {
                sys::set_memlock_limit(ResourceLimit::fixed(0)).unwrap();
                let options = HardeningOptions {
                    require_lock: false,
                    ..HardeningOptions::default()
                };
                let state = apply(options).unwrap();
                assert!(state.is_degraded(), "{state:?}");
                println!("{:?}", state.degraded_reasons());
                let token = SecureBuffer::from_slice(b"Bearer relay-token").unwrap();
                assert!(!token.is_locked());
                let error = SecureBuffer::from_slice(b"x")
                    .unwrap()
                    .require_locked()
                    .unwrap_err();
                assert!(error.is_lock_failed());
                let message = error.to_string();
                assert!(message.contains("RLIMIT_MEMLOCK is 0 bytes"), "{message}");
                assert!(message.contains("CAP_IPC_LOCK"), "{message}");
                let report = self_check(&state);
                println!("{}", serde_json::to_string_pretty(&report).unwrap());
                assert!(!report.passed);
                for failing in ["secure_buffers_locked", "vm_locked", "mlock_headroom"] {
                    assert!(!check(&report, failing).ok, "{failing} should fail");
                }
                for passing in [
                    "not_dumpable",
                    "core_limit_zero",
                    "canaries_intact",
                    "wipe_round_trip",
                    "guard_pages_no_access",
                ] {
                    assert!(check(&report, passing).ok, "{passing} should pass");
                }
                let status = status(&state);
                assert!(status.degraded && !status.enabled && !status.self_check);
                assert_eq!(status.mlock_limit_bytes, Some(0));
            }
            other => panic!("unknown scenario {other}"),
        }
    }

    /// Whether this process may lock memory beyond a few pages (CAP_IPC_LOCK, as root
    /// normally has) or, with `whole_process`, lock all of it.
    fn may_lock(whole_process: bool) -> bool {
        let capable = procfs::status().is_ok_and(|s| s.has_ipc_lock());
        let limit = sys::memlock_limit().map(|l| l.soft).unwrap_or(Some(0));
        capable
            || match limit {
                None => true,
                Some(bytes) => !whole_process && bytes >= 1 << 20,
            }
    }

    #[test]
    fn self_check_passes_when_hardened_as_root() {
        if !may_lock(false) {
            eprintln!("skipped: needs CAP_IPC_LOCK (root) or RLIMIT_MEMLOCK >= 1 MiB");
            return;
        }
        run_child("harden_as_root", false);
    }

    #[test]
    fn lock_all_is_verified_from_smaps() {
        if !may_lock(true) {
            eprintln!("skipped: mlockall needs CAP_IPC_LOCK (root) or an unlimited RLIMIT_MEMLOCK");
            return;
        }
        run_child("lock_all_as_root", false);
    }

    #[test]
    fn required_lock_failure_says_how_to_fix_it() {
        run_child("required_lock_refused", is_root());
    }

    #[test]
    fn degraded_run_reports_failing_checks() {
        run_child("degraded_allowed", is_root());
    }

    #[test]
    fn report_serializes_with_the_spec_field_names() {
        let report = SelfCheckReport {
            passed: true,
            checks: vec![passed("not_dumpable", "PR_GET_DUMPABLE = 0".to_owned())],
            checked_at: humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH).to_string(),
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["checks"][0]["name"], "not_dumpable");
        assert_eq!(json["checked_at"], "1970-01-01T00:00:00Z");
        let status = MemoryProtectionStatus {
            enabled: true,
            secure_buffers: 2,
            locked_bytes: 8192,
            lock_all: false,
            core_dumps_disabled: true,
            dumpable: false,
            mlock_limit_bytes: None,
            degraded: false,
            wipe_freed_memory: true,
            self_check: true,
        };
        let json = serde_json::to_value(&status).unwrap();
        for key in [
            "enabled",
            "secure_buffers",
            "locked_bytes",
            "lock_all",
            "core_dumps_disabled",
            "dumpable",
            "mlock_limit_bytes",
            "degraded",
            "wipe_freed_memory",
            "self_check",
        ] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
    }
}
