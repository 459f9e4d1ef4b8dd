//! Handing the core over (`runtime.yield_every`): an event loop under load that has run out
//! of tasks gives its core to other threads waiting for it, at most once per interval,
//! before it looks for new events.
//!
//! Under load a loop rarely sleeps: when it has run every task it asks the kernel for new
//! events, finds some and goes on, so it never leaves its core. The threads its answers woke
//! (the applications it serves, on the same cores in a pod) then wait for that core until the
//! loop's time slice runs out, up to a scheduler tick (4 ms at `HZ=250`), which is where the
//! slowest percent of their requests went. Measured with wrk on two cores shared by wrk, the
//! relay and the sidecar (`perf sched`): a woken wrk thread waited 0.137 ms on average for a
//! core, against 0.024 ms with nginx as the proxy, and wrk's p99 was 1.4–1.5 times nginx's.
//!
//! So when the loop has run out of tasks (everything it had is written, to clients and to the
//! relay, so nothing waits on it) and it last handed over its core at least one interval ago,
//! it calls `sched_yield` first. With nothing else runnable on its core that returns at once;
//! otherwise the waiting threads run and the loop continues after them. Measured the same
//! way, 6 rounds of 8 s against the build without it: wrk's p99 1.1–1.6 ms against 1.8–3.1 ms
//! (nginx `1`: 1.7–2.9 ms) at 3–4% less throughput, for intervals from every sleep to 1 ms
//! alike. Yielding after each answer instead, mid-turn, left the relay waiting for requests
//! not yet flushed and cost 5–10% of throughput.
//!
//! `"auto"` (the default) yields only with one event loop, and only while the process may
//! run on more than one core: with a loop per core it cost a quarter of the throughput, and a
//! loop confined to a core of its own (the pinned load harness) has nobody worth yielding to
//! there (p99 no better, p99.9 worse).

use std::cell::Cell;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

/// The interval in nanoseconds; 0: never yield (also before [`configure`] runs).
static EVERY_NS: AtomicU64 = AtomicU64::new(0);

/// Yield only while the process may run on more than one core ([`Policy::only_when_sharing`]).
static ONLY_WHEN_SHARING: AtomicBool = AtomicBool::new(false);

/// How the loops of the process hand their core over (`RuntimeConfig::yield_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// At most this often; zero: never.
    pub every: Duration,
    /// Not while the process may run on one core only (its affinity mask, looked at when a
    /// hand-over is due): a loop on a core of its own has nobody worth yielding to.
    pub only_when_sharing: bool,
}

/// Every hand-over of every loop (`sprint_sidecar_loop_yields_total`).
static YIELDS: LazyLock<Counter> = LazyLock::new(Counter::default);

thread_local! {
    /// When this thread's loop last handed over its core.
    static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Sets the policy for every loop of the process (`runtime.yield_every`).
pub fn configure(policy: Policy) {
    let ns = u64::try_from(policy.every.as_nanos()).unwrap_or(u64::MAX);
    ONLY_WHEN_SHARING.store(policy.only_when_sharing, Ordering::Relaxed);
    EVERY_NS.store(ns, Ordering::Relaxed);
}

/// The counter of hand-overs, for the metrics registry (clones share the count).
pub fn counter() -> Counter {
    YIELDS.clone()
}

/// Whether a loop that last handed over its core at `last` should do so at `now`.
fn due(last: Option<Instant>, now: Instant, every: Duration) -> bool {
    match last {
        None => true,
        Some(last) => now.saturating_duration_since(last) >= every,
    }
}

/// The runtime hook run as an event loop has run every task and is about to look for events
/// (`on_thread_park`, before it may sleep).
pub fn before_park() {
    let every = EVERY_NS.load(Ordering::Relaxed);
    if every == 0 {
        return;
    }
    let only_when_sharing = ONLY_WHEN_SHARING.load(Ordering::Relaxed);
    let worth_it = || !only_when_sharing || crate::secret::sys::allowed_cpus() > 1;
    if yield_if_due(Duration::from_nanos(every), worth_it) {
        YIELDS.inc();
    }
}

/// Yields the core when this thread last did so (or was due to) at least `every` ago and
/// `worth_it` says so; true when it yielded.
fn yield_if_due(every: Duration, worth_it: impl FnOnce() -> bool) -> bool {
    let now = Instant::now();
    if !due(LAST.get(), now, every) {
        return false;
    }
    LAST.set(Some(now));
    if !worth_it() {
        return false;
    }
    std::thread::yield_now();
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_hands_over_its_core_at_most_once_per_interval() {
        let every = Duration::from_micros(400);
        let t0 = Instant::now();
        assert!(due(None, t0, every), "the first time");
        assert!(!due(Some(t0), t0, every));
        assert!(!due(Some(t0), t0 + Duration::from_micros(399), every));
        assert!(due(Some(t0), t0 + every, every));
        assert!(due(Some(t0), t0 + Duration::from_millis(5), every));
        // A clock that reads earlier than the last hand-over waits, never yields in a burst.
        assert!(!due(Some(t0 + every), t0, every));
    }

    #[test]
    fn each_loop_thread_yields_once_per_interval() {
        let hour = Duration::from_secs(3600);
        let calls = move |n| (0..n).filter(|_| yield_if_due(hour, || true)).count();
        // Each thread keeps its own last hand-over.
        let other = std::thread::spawn(move || calls(3))
            .join()
            .expect("a thread");
        assert_eq!((calls(3), other), (1, 1));
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            yield_if_due(Duration::from_millis(1), || true),
            "due again after the interval"
        );
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            !yield_if_due(Duration::from_millis(1), || false),
            "due, but not worth it"
        );
        assert!(
            !yield_if_due(Duration::from_millis(1), || true),
            "a skipped hand-over counts as one: the next is an interval later"
        );
    }

    #[test]
    fn the_counter_clones_share_one_count() {
        let (a, b) = (counter(), counter());
        a.inc();
        assert!(b.get() >= 1, "a clone sees the other's increment");
    }
}
