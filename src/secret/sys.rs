//! Safe wrappers over the process-wide syscalls the crate needs: `prctl` (dumpable), resource
//! limits (core size, locked memory, open files), `mlockall`, the page size, the
//! scheduling priority (nice) and, for `busy_poll`'s spinner, the idle scheduling class, the
//! current core, core affinity, the cores online and the thread's CPU time. `hardening`, `app` and `busy_poll` call these; nothing
//! else in the crate touches libc for them.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once `mlockall` succeeded: freed secure buffers must then be re-locked (see buffer.rs).
static LOCK_ALL_APPLIED: AtomicBool = AtomicBool::new(false);

/// A resource limit as the kernel reports it; `None` means unlimited (`RLIM_INFINITY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimit {
    /// The limit enforced now.
    pub soft: Option<u64>,
    /// The ceiling an unprivileged process may raise `soft` to.
    pub hard: Option<u64>,
}

impl ResourceLimit {
    /// Both limits at `bytes`.
    pub const fn fixed(bytes: u64) -> Self {
        Self {
            soft: Some(bytes),
            hard: Some(bytes),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Resource {
    Core,
    Memlock,
    OpenFiles,
}

/// `PR_GET_DUMPABLE`: whether the kernel would write a core dump of this process and lets
/// same-user processes ptrace it or read its `/proc/PID/mem`.
pub fn is_dumpable() -> io::Result<bool> {
    // SAFETY: PR_GET_DUMPABLE takes no pointer arguments and only returns the flag.
    let value = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
    if value < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value != 0)
}

/// `PR_SET_DUMPABLE`: with `false`, no core dump is written and same-user processes can no
/// longer attach to or read this process's memory (root still can).
pub fn set_dumpable(dumpable: bool) -> io::Result<()> {
    let flag = libc::c_ulong::from(dumpable);
    // SAFETY: PR_SET_DUMPABLE takes an integer flag (0 or 1); no memory is passed.
    let result = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, flag, 0, 0, 0) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `RLIMIT_CORE`: the largest core file the kernel writes for this process.
pub fn core_limit() -> io::Result<ResourceLimit> {
    limit(Resource::Core)
}

/// Sets `RLIMIT_CORE`; `ResourceLimit::fixed(0)` disables core files for good (an unprivileged
/// process cannot raise a hard limit again).
pub fn set_core_limit(limit: ResourceLimit) -> io::Result<()> {
    set_limit(Resource::Core, limit)
}

/// `RLIMIT_MEMLOCK`: how many bytes an unprivileged process may lock (mlock, mlockall).
/// A process with `CAP_IPC_LOCK` in its effective set is not bound by it.
pub fn memlock_limit() -> io::Result<ResourceLimit> {
    limit(Resource::Memlock)
}

/// Sets `RLIMIT_MEMLOCK` (tests use it to provoke lock failures in a child process).
pub fn set_memlock_limit(limit: ResourceLimit) -> io::Result<()> {
    set_limit(Resource::Memlock, limit)
}

/// `RLIMIT_NOFILE`: how many file descriptors (client and relay sockets) the process may hold.
pub fn open_files_limit() -> io::Result<ResourceLimit> {
    limit(Resource::OpenFiles)
}

/// Sets `RLIMIT_NOFILE`.
pub fn set_open_files_limit(limit: ResourceLimit) -> io::Result<()> {
    set_limit(Resource::OpenFiles, limit)
}

/// `mlockall(MCL_CURRENT | MCL_FUTURE)`: lock every present and future mapping of the process.
pub fn lock_all_memory() -> io::Result<()> {
    // SAFETY: mlockall takes only flags; it changes page residency, never memory contents.
    let result = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    LOCK_ALL_APPLIED.store(true, Ordering::Relaxed);
    Ok(())
}

/// Whether [`lock_all_memory`] succeeded in this process.
pub fn is_lock_all_applied() -> bool {
    LOCK_ALL_APPLIED.load(Ordering::Relaxed)
}

/// The calling thread's nice value (`getpriority(PRIO_PROCESS, 0)`: on Linux a thread's own;
/// threads it starts later inherit it).
pub fn nice() -> io::Result<i32> {
    // getpriority returns -1 both for nice -1 and for an error: errno tells them apart.
    // SAFETY: __errno_location returns the calling thread's errno slot, valid for the
    // thread's lifetime; writing 0 to it is what POSIX asks before such a call.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: getpriority takes two integers and returns one; no memory is passed.
    let value = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if value == -1 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(0) {
            return Err(error);
        }
    }
    Ok(value)
}

/// Sets the calling thread's nice value (`setpriority(PRIO_PROCESS, 0, value)`), which the
/// threads it starts afterwards inherit. Raising the priority (a lower value than the
/// current one) needs root, `CAP_SYS_NICE` or a high enough `RLIMIT_NICE`; without them the
/// kernel refuses it (`EACCES` or `EPERM`) and nothing changes.
pub fn set_nice(value: i32) -> io::Result<()> {
    // SAFETY: setpriority takes three integers; no memory is passed.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, value) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts the calling thread in the idle scheduling class (`SCHED_IDLE`): it then runs only
/// when nothing else wants its core, and any other thread that wakes there takes the core
/// at once. Lowering a thread's class needs no privilege.
pub fn set_idle_scheduling() -> io::Result<()> {
    // SAFETY: an all-zero sched_param is valid (priority 0, the only one SCHED_IDLE takes;
    // musl's has more fields than glibc's, all zero too).
    let param: libc::sched_param = unsafe { std::mem::zeroed() };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0 is the calling
    // thread.
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The core the calling thread runs on (`sched_getcpu`), or `None` when the kernel cannot
/// tell.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes nothing and returns an integer.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).ok()
}

/// CPU time the calling thread has used (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`); zero
/// when the kernel cannot tell.
pub fn thread_cpu_time() -> std::time::Duration {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid, writable timespec that outlives the call.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) };
    if result != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(
        u64::try_from(time.tv_sec).unwrap_or(0),
        u32::try_from(time.tv_nsec).unwrap_or(0),
    )
}

/// The cores online in the machine (`sysconf(_SC_NPROCESSORS_ONLN)`), at least 1.
pub fn online_cpus() -> usize {
    // SAFETY: sysconf takes an integer name and returns a value; no memory is passed.
    let count = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(count).unwrap_or(1).max(1)
}

/// The cores the calling thread may run on (`sched_getaffinity`; its CPU affinity mask,
/// whatever a cgroup quota allows of them), at least 1.
pub fn allowed_cpus() -> usize {
    // SAFETY: an all-zero cpu_set_t is a valid, empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed, alive for the call; pid 0 is
    // the calling thread.
    let result = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if result != 0 {
        return 1;
    }
    // SAFETY: `set` was filled by the kernel above.
    let count = unsafe { libc::CPU_COUNT(&set) };
    usize::try_from(count).unwrap_or(1).max(1)
}

/// Restricts the calling thread to core `cpu` (`sched_setaffinity`).
pub fn pin_thread_to(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: an all-zero cpu_set_t is a valid, empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above), so the bit lies inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed, alive for the call; pid 0 is
    // the calling thread.
    let result = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's page size, the granularity of mlock, mprotect and guard pages.
pub fn page_size() -> usize {
    // SAFETY: sysconf takes an integer name and returns a value; no memory is passed.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).expect("sysconf(_SC_PAGESIZE) is positive on Linux")
}

fn limit(resource: Resource) -> io::Result<ResourceLimit> {
    let mut raw = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `raw` is a valid, writable rlimit that outlives the call.
    let result = unsafe {
        match resource {
            Resource::Core => libc::getrlimit(libc::RLIMIT_CORE, &mut raw),
            Resource::Memlock => libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut raw),
            Resource::OpenFiles => libc::getrlimit(libc::RLIMIT_NOFILE, &mut raw),
        }
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ResourceLimit {
        soft: from_rlim(raw.rlim_cur),
        hard: from_rlim(raw.rlim_max),
    })
}

fn set_limit(resource: Resource, limit: ResourceLimit) -> io::Result<()> {
    let raw = libc::rlimit {
        rlim_cur: to_rlim(limit.soft),
        rlim_max: to_rlim(limit.hard),
    };
    // SAFETY: `raw` is a valid rlimit that outlives the call; the kernel only reads it.
    let result = unsafe {
        match resource {
            Resource::Core => libc::setrlimit(libc::RLIMIT_CORE, &raw),
            Resource::Memlock => libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw),
            Resource::OpenFiles => libc::setrlimit(libc::RLIMIT_NOFILE, &raw),
        }
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn from_rlim(value: libc::rlim_t) -> Option<u64> {
    (value != libc::RLIM_INFINITY).then_some(value)
}

fn to_rlim(value: Option<u64>) -> libc::rlim_t {
    value.unwrap_or(libc::RLIM_INFINITY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_is_a_power_of_two() {
        assert!(page_size().is_power_of_two());
        assert!(page_size() >= 4096);
    }

    #[test]
    fn limits_read_back() {
        let core = core_limit().unwrap();
        let memlock = memlock_limit().unwrap();
        if let (Some(soft), Some(hard)) = (core.soft, core.hard) {
            assert!(soft <= hard);
        }
        if let (Some(soft), Some(hard)) = (memlock.soft, memlock.hard) {
            assert!(soft <= hard);
        }
    }
}
