//! Wiring only: build the components from the configuration, spawn the servers, run the
//! shutdown sequence (readiness false → stop accepting → drain → close the pool → exit).

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

use crate::admin::{self, AdminState, MemoryReport, TokenCheck};
use crate::config::Config;
use crate::credential::TokenCredential;
use crate::event_loops::EventLoops;
use crate::hardening::{self, HardeningState};
use crate::metrics::{Metrics, WatchedFile};
use crate::proxy::{self, DataPlane};
use crate::secret::Reload;
use crate::shutdown::Shutdown;
use crate::tls;
use crate::upstream::pool::Pool;
use crate::upstream::{CredentialSource, Upstream};

/// Why the sidecar could not start or run; `exit_code` maps it for `main`.
#[derive(Debug)]
pub struct AppError {
    message: String,
    code: i32,
}

impl AppError {
    /// A configuration or secret problem the operator must fix: exit status 2.
    pub fn config(message: impl Into<String>) -> Self {
        AppError {
            message: message.into(),
            code: 2,
        }
    }

    /// A run-time failure (e.g. a port in use): exit status 1.
    pub fn runtime(message: impl Into<String>) -> Self {
        AppError {
            message: message.into(),
            code: 1,
        }
    }

    pub fn exit_code(&self) -> i32 {
        self.code
    }
}

impl fmt::Display for AppError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AppError {}

/// The addresses a started sidecar listens on.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub data: SocketAddr,
    pub admin: SocketAddr,
}

/// Process-wide protection from `[memory]`: the wiping allocator switch, then dumpable,
/// core limit and `mlockall`. Call before spawning threads and before loading secrets.
///
/// # Errors
/// Locking is required but not permitted (exit 2, with how to grant it).
pub fn harden(cfg: &Config) -> Result<HardeningState, AppError> {
    crate::secret::set_wipe_on_free(cfg.memory.wipe_freed_memory);
    hardening::apply(hardening::HardeningOptions {
        require_lock: cfg.memory.require_lock,
        lock_all: cfg.memory.lock_all,
        disable_core_dumps: cfg.memory.disable_core_dumps,
    })
    .map_err(|e| AppError::config(e.to_string()))
}

/// File descriptors the sidecar needs besides its client connections: the pool (a rotating
/// connection overlaps its replacement), the listeners, admin clients, files and the runtime.
const SPARE_FILES: u64 = 256;

/// The `RLIMIT_NOFILE` soft limit to raise to, if any: as high as the hard limit allows
/// (capped at the kernel's usual `nr_open`), when the current one cannot hold
/// `listener.max_connections` clients plus the pool and `SPARE_FILES`.
pub fn open_files_target(
    limit: crate::secret::sys::ResourceLimit,
    max_connections: usize,
    pool_size: usize,
) -> Option<u64> {
    const NR_OPEN: u64 = 1 << 20;
    let needed = max_connections as u64 + 2 * pool_size as u64 + SPARE_FILES;
    let soft = limit.soft?;
    let target = limit.hard.unwrap_or(NR_OPEN).min(NR_OPEN);
    (soft < needed && target > soft).then_some(target)
}

/// What became of `runtime.nice` at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// The process already ran at the nice value asked for.
    Unchanged(i32),
    /// The nice value was changed as asked.
    Set { from: i32, to: i32 },
    /// The kernel refused the change (raising the priority needs root, `CAP_SYS_NICE` or
    /// `RLIMIT_NICE`); the process runs at `current`.
    Refused { asked: i32, current: i32 },
}

impl Priority {
    /// The nice value the process runs at.
    pub fn nice(self) -> i32 {
        match self {
            Priority::Unchanged(nice) | Priority::Set { to: nice, .. } => nice,
            Priority::Refused { current, .. } => current,
        }
    }
}

/// Sets the calling thread's nice value to `runtime.nice`, and logs the outcome. Call on the
/// main thread before the event loops start: the threads started afterwards inherit it
/// (on Linux a nice value belongs to a thread). Never fails the start: where the priority
/// cannot be raised, the sidecar runs at the one it was started with.
pub fn apply_priority(cfg: &Config) -> Priority {
    use crate::secret::sys;
    let asked = cfg.runtime.nice;
    let current = sys::nice().unwrap_or(0);
    if current == asked {
        return Priority::Unchanged(asked);
    }
    match sys::set_nice(asked) {
        Ok(()) => {
            info!(
                from = current,
                to = asked,
                "scheduling priority set (runtime.nice)"
            );
            Priority::Set {
                from: current,
                to: asked,
            }
        }
        Err(e) => {
            info!(
                asked,
                running_at = current,
                error = %e,
                "runtime.nice not applied: raising the priority needs root, CAP_SYS_NICE or \
                 RLIMIT_NICE"
            );
            Priority::Refused { asked, current }
        }
    }
}

/// Raises the open-files soft limit when `listener.max_connections` would not fit (a shell's
/// default is often 1024), and says so when even the hard limit is too low.
pub fn raise_open_files_limit(cfg: &Config) {
    use crate::secret::sys;
    let Ok(limit) = sys::open_files_limit() else {
        return;
    };
    let max_connections = cfg.listener.max_connections.get();
    let pool_size = cfg.pool.size.get();
    let needed = max_connections as u64 + 2 * pool_size as u64 + SPARE_FILES;
    let mut soft = limit.soft;
    if let Some(target) = open_files_target(limit, max_connections, pool_size) {
        let raised = sys::ResourceLimit {
            soft: Some(target),
            hard: limit.hard,
        };
        match sys::set_open_files_limit(raised) {
            Ok(()) => {
                info!(
                    from = limit.soft,
                    to = target,
                    "raised the open-files limit"
                );
                soft = Some(target);
            }
            Err(e) => warn!(error = %e, "cannot raise the open-files limit"),
        }
    }
    if let Some(soft) = soft
        && soft < needed
    {
        warn!(
            open_files_limit = soft,
            max_connections,
            "the open-files limit is below listener.max_connections plus the pool: clients \
             beyond it wait in the backlog (raise `ulimit -n` or lower listener.max_connections)"
        );
    }
}

/// Loads the secrets the configuration names, in locked memory.
///
/// # Errors
/// A missing, empty or too-open secret file, or an unusable value (exit 2).
pub fn load_credential(cfg: &Config) -> Result<Option<Arc<TokenCredential>>, AppError> {
    let u = &cfg.upstream;
    if let Some(path) = &u.auth_token_file {
        let c = TokenCredential::from_file(path.clone(), u.allow_insecure_permissions)
            .map_err(|e| AppError::config(format!("upstream.auth_token_file: {e}")))?
            .with_header_name(u.auth_header.clone());
        return Ok(Some(Arc::new(c)));
    }
    if let Some(var) = &u.auth_token_env {
        let c = TokenCredential::from_env(var)
            .map_err(|e| AppError::config(format!("upstream.auth_token_env: {e}")))?
            .with_header_name(u.auth_header.clone());
        return Ok(Some(Arc::new(c)));
    }
    Ok(None)
}

/// Reads the admin token file as `run` would, for `check-config`: `Ok(true)` when one is
/// configured and usable, `Ok(false)` when none is configured.
///
/// # Errors
/// A missing, empty or too-open token file (exit 2), named by its key.
pub fn check_admin_token(cfg: &Config) -> Result<bool, AppError> {
    let Some(path) = &cfg.admin.token_file else {
        return Ok(false);
    };
    crate::secret::SecureBuffer::from_file(path, cfg.admin.allow_insecure_permissions)
        .map_err(|e| AppError::config(format!("admin.token_file: {e}")))?;
    Ok(true)
}

fn load_admin_token(cfg: &Config, metrics: &Metrics) -> Result<Option<TokenCheck>, AppError> {
    let Some(path) = &cfg.admin.token_file else {
        return Ok(None);
    };
    let token = admin::token::AdminToken::load(
        path.clone(),
        cfg.admin.allow_insecure_permissions,
        metrics.clone(),
    )
    .map_err(|e| AppError::config(format!("admin.token_file: {e}")))?;
    let check: TokenCheck = Box::new(move |given: &[u8]| token.matches(given));
    Ok(Some(check))
}

struct HardeningReport {
    state: HardeningState,
}

impl MemoryReport for HardeningReport {
    fn status(&self) -> serde_json::Value {
        serde_json::to_value(hardening::status(&self.state)).unwrap_or_default()
    }

    fn self_check(&self) -> (bool, serde_json::Value) {
        let report = hardening::self_check(&self.state);
        (
            report.passed,
            serde_json::to_value(&report).unwrap_or_default(),
        )
    }

    fn buffers(&self) -> (i64, i64) {
        let r = crate::secret::registry();
        (r.buffers as i64, r.locked_bytes as i64)
    }
}

/// Runs the sidecar until SIGTERM/SIGINT (or `stop`), then shuts down gracefully.
/// `announce` is called once both listeners are bound.
///
/// # Errors
/// See [`AppError`].
pub async fn run(
    cfg: Config,
    hardening: HardeningState,
    credential: Option<Arc<TokenCredential>>,
    stop: Shutdown,
    announce: impl FnOnce(Bound),
) -> Result<(), AppError> {
    tls::install_default_provider();
    raise_open_files_limit(&cfg);
    let cfg = Arc::new(cfg);
    let tls = tls::setup(&cfg.upstream, cfg.pool.size.get())
        .map_err(|e| AppError::config(e.to_string()))?;
    let metrics = Metrics::new(cfg.pool.size.get());
    let admin_token = load_admin_token(&cfg, &metrics)?;
    let data_listener = TcpListener::bind(cfg.listener.address).await.map_err(|e| {
        AppError::runtime(format!(
            "listener.address: cannot listen on {}: {e}",
            cfg.listener.address
        ))
    })?;
    let admin_listener = TcpListener::bind(cfg.admin.address).await.map_err(|e| {
        AppError::runtime(format!(
            "admin.address: cannot listen on {}: {e}",
            cfg.admin.address
        ))
    })?;
    let bound = Bound {
        data: data_listener
            .local_addr()
            .map_err(|e| AppError::runtime(e.to_string()))?,
        admin: admin_listener
            .local_addr()
            .map_err(|e| AppError::runtime(e.to_string()))?,
    };

    let data_stop = Shutdown::new();
    let background = Shutdown::new();
    let tls_setup = tls.clone();
    // Once the start can no longer fail on bad input, and before the event loops start, so
    // that their threads inherit it.
    let nice = apply_priority(&cfg).nice();
    metrics.set_nice(nice);
    let event_loops = cfg.runtime.event_loops(cfg.pool.size.get());
    crate::loop_yield::configure(cfg.runtime.yield_policy(event_loops));
    let loops = EventLoops::start(event_loops)
        .map_err(|e| AppError::runtime(format!("cannot start the event loops: {e}")))?;
    let quota = crate::busy_poll::cpu_quota();
    if let Some(cores) = quota
        && !cfg.runtime.busy_poll.is_zero()
    {
        info!(
            cpu_quota_cores = cores,
            "busy polling stands down: a CPU quota applies (spins would count against it)"
        );
    }
    // Under a CPU quota busy polling stands down (logged above).
    let spinning_loops = if quota.is_none() { loops.len() } else { 0 };
    for index in 0..spinning_loops {
        loops.spawn_on(
            index,
            crate::busy_poll::run(
                cfg.runtime.busy_poll,
                metrics.clone(),
                data_stop.subscribe(),
            ),
        );
    }
    let pool = Pool::new(cfg.clone(), tls, metrics.clone());
    pool.start(background.subscribe(), &loops);
    let loops = Arc::new(loops);
    let source = credential.clone().map(|c| c as Arc<dyn CredentialSource>);
    let upstream = Arc::new(Upstream::new(pool.clone(), metrics.clone(), source));
    // A file that changed is counted; a new relay token or client identity also makes the
    // pool replace its connections (new ones first), so none keeps presenting the old one.
    let on_change = {
        let pool = Arc::downgrade(&pool);
        let metrics = metrics.clone();
        move |file: WatchedFile, outcome: Reload| {
            metrics.secret_reload(file, outcome);
            if outcome == Reload::Reloaded
                && matches!(file, WatchedFile::RelayToken | WatchedFile::ClientIdentity)
                && let Some(p) = pool.upgrade()
            {
                p.rotate_all();
            }
        }
    };
    if let Some(c) = credential {
        let on_change = on_change.clone();
        tokio::spawn(
            c.watch(background.subscribe(), move |outcome| {
                on_change(WatchedFile::RelayToken, outcome);
            })
            .instrument(info_span!("token_reload")),
        );
    }
    tokio::spawn(
        tls_setup
            .watch_files(
                crate::credential::RELOAD_INTERVAL,
                background.subscribe(),
                on_change,
            )
            .instrument(info_span!("tls_files")),
    );
    let sampler = admin::sampler::Sampler::new(metrics.clone());
    tokio::spawn(
        sampler
            .clone()
            .run(background.subscribe())
            .instrument(info_span!("sampler")),
    );

    let serving = Arc::new(AtomicBool::new(true));
    let admin_state = Arc::new(AdminState {
        pool: pool.clone(),
        cfg: cfg.clone(),
        metrics: metrics.clone(),
        sampler,
        memory: Arc::new(HardeningReport { state: hardening }),
        token: admin_token,
        serving: serving.clone(),
        started: SystemTime::now(),
    });
    let plane = Arc::new(DataPlane::new(upstream, cfg.clone(), metrics));
    let data_task = tokio::spawn(
        proxy::serve(data_listener, plane, data_stop.subscribe(), loops.clone())
            .instrument(info_span!("data_listener")),
    );
    let admin_task = tokio::spawn(
        admin::serve(admin_listener, admin_state, background.subscribe())
            .instrument(info_span!("admin_listener")),
    );
    info!(data = %bound.data, admin = %bound.admin, endpoint = %cfg.upstream.endpoint, "sprint-sidecar serving");
    announce(bound);

    let stopped = stop.subscribe();
    tokio::select! {
        _ = crate::shutdown::signal() => info!("shutdown signal received"),
        _ = Shutdown::wait(stopped) => info!("shutdown requested"),
    }
    // 1. Readiness false first, so no new traffic is routed here.
    serving.store(false, Ordering::Release);
    // 2. Stop accepting; in-flight client requests finish (bounded by drain_timeout).
    data_stop.trigger();
    let deadline = Instant::now() + cfg.listener.drain_timeout;
    if tokio::time::timeout_at(deadline + std::time::Duration::from_secs(1), data_task)
        .await
        .is_err()
    {
        warn!("data listener did not finish draining in time");
    }
    // 3. Close relay connections cleanly (HTTP/2 GOAWAY), then stop the rest.
    pool.close(Instant::now() + std::time::Duration::from_secs(2))
        .await;
    background.trigger();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), admin_task).await;
    // 4. The other event loops, once nothing of the data plane runs on them.
    if let Ok(mut loops) = Arc::try_unwrap(loops) {
        loops.stop();
    }
    info!("sprint-sidecar stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::sys::ResourceLimit;

    fn limit(soft: Option<u64>, hard: Option<u64>) -> ResourceLimit {
        ResourceLimit { soft, hard }
    }

    #[test]
    fn the_open_files_limit_is_raised_only_when_the_clients_would_not_fit() {
        // A shell's 1024 against the default 4096 clients: up to the hard limit.
        assert_eq!(
            open_files_target(limit(Some(1024), Some(524_288)), 4096, 4),
            Some(524_288)
        );
        // Enough already: left alone.
        assert_eq!(
            open_files_target(limit(Some(20_000), Some(20_000)), 4096, 4),
            None
        );
        // Unlimited soft limit: nothing to raise.
        assert_eq!(open_files_target(limit(None, None), 4096, 4), None);
        // An unlimited hard limit: up to the kernel's usual nr_open.
        assert_eq!(
            open_files_target(limit(Some(1024), None), 4096, 4),
            Some(1 << 20)
        );
        // The hard limit is the soft one: no higher to go (run() warns instead).
        assert_eq!(
            open_files_target(limit(Some(1024), Some(1024)), 4096, 4),
            None
        );
        // A small max_connections fits in 1024.
        assert_eq!(
            open_files_target(limit(Some(1024), Some(4096)), 100, 4),
            None
        );
    }
}
