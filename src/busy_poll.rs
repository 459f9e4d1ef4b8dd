//! Busy polling (`runtime.busy_poll`): under load, an event loop that runs out of work keeps
//! polling its sockets for a short while before it sleeps, because the next request or relay
//! answer is then microseconds away.
//!
//! Sleeping is not free. A loop that sleeps in `epoll_wait` leaves its core idle, and whoever
//! sends it the next byte (an application, the relay) pays for waking it: the scheduler's
//! wake-up and, when the core had halted, an interrupt to another core (a virtual machine
//! exit on a hypervisor). The loop then pays the switch back in. Under load that happens
//! thousands of times a second, and while the loop sleeps, the scheduler fills its core with
//! other threads that it must then wait behind. Polling instead of sleeping for the gap
//! between two events costs less than that when the gap is short, and nothing at all when
//! it is spent on other tasks.
//!
//! So the loop spins only when it pays:
//!
//! * Only while at least [`MIN_IN_FLIGHT`] of its requests wait for the relay's answer
//!   ([`InFlight`]): then answers are due any moment. A sidecar serving a few clients, or
//!   one client request after request, never spins (its loop would burn a core to save
//!   microseconds).
//! * A spin ends after `busy_poll` with no request starting or answered; the loop then sleeps.
//! * Spins that end that way are lost time; once they add up to [`MAX_MISSED_SHARE`] of a
//!   second, the loop stops spinning until the second is over. A relay that stalls with many
//!   requests in flight thus costs at most a few percent of a core in spinning.
//!
//! Busy polling never takes the last core: of `loops` event loops on `cores` cores, only the
//! first `cores - 1` spin ([`spinning_loops`]). On one core a spinning loop would hold the
//! core its application and everything else in the pod need; with a loop on every core,
//! the spinning loops would crowd out everyone else.
//!
//! Busy polling also stands down while the sidecar runs at a raised scheduling priority
//! (`runtime.nice` below 0 in effect). Both answer the same problem, a loop that loses its
//! core to the clients it wakes, and a loop that spins at a higher priority than those
//! clients takes its spins from them: measured with the priority raised, spinning brought
//! no throughput and 22–23% more p99 latency (README, Performance).
//!
//! One spinning task per event loop ([`run`]): it yields to the loop's scheduler, which then
//! polls the sockets without blocking (`epoll_wait` with a zero timeout) and runs whatever
//! became ready before it comes back to the spinner. It never delays other tasks.
//!
//! ```text
//!  8th request in flight ─▶ spin: yield, poll sockets, yield ... ─┬─ busy_poll without a
//!        ▲                                                        │  request or answer
//!        │                                                        ├─ fewer than 8 in flight
//!        └──────────────────────── sleep ◀────────────────────────┘
//! ```
//!
//! Measured (README, Performance): with 64 clients on a 2-core VM shared with the load and
//! the relay, 9–12% more requests per second at 6–14% less CPU per request while the machine
//! was slow (wake-ups expensive); 1–3% fewer at 2–3% more CPU while it was fast. With a
//! core to itself (pinned), no difference.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::Metrics;

/// The window over which lost spinning is counted.
const WINDOW: Duration = Duration::from_secs(1);

/// The most of each second ([`Policy`]'s window) that spins ending without new activity may
/// take: 2%.
pub const MAX_MISSED_SHARE: Duration = Duration::from_millis(20);

/// Requests of a loop waiting for their answers from which the loop spins: with fewer, the
/// next event is rarely close enough to be worth a core's time.
pub const MIN_IN_FLIGHT: u32 = 8;

/// How many of `loops` event loops may busy-poll on `cores` cores with the process at nice
/// value `nice`: at most one core fewer than there are, and none at a raised priority
/// (module documentation).
pub fn spinning_loops(loops: usize, cores: usize, nice: i32) -> usize {
    if stands_down_at(nice) {
        return 0;
    }
    loops.min(cores.saturating_sub(1))
}

/// Whether busy polling stands down with the process at nice value `nice`: at a raised
/// priority (module documentation).
pub fn stands_down_at(nice: i32) -> bool {
    nice < 0
}

/// When to spin: the pure part of the decision (module documentation).
#[derive(Debug, Clone)]
pub struct Policy {
    budget: Duration,
    window_start: Instant,
    missed: Duration,
}

impl Policy {
    /// Spins last up to `budget` of no activity; a zero budget never spins.
    pub fn new(budget: Duration, now: Instant) -> Self {
        Policy {
            budget,
            window_start: now,
            missed: Duration::ZERO,
        }
    }

    /// Whether to spin now, with `in_flight` requests of the loop waiting for answers.
    pub fn should_spin(&mut self, now: Instant, in_flight: u32) -> bool {
        self.roll(now);
        !self.budget.is_zero() && in_flight >= MIN_IN_FLIGHT && self.missed < MAX_MISSED_SHARE
    }

    /// A spin ended at `now` with `lost` of it spent waiting for activity that never came.
    pub fn missed(&mut self, now: Instant, lost: Duration) {
        self.roll(now);
        self.missed += lost;
    }

    /// How long until the current window ends.
    pub fn until_next_window(&self, now: Instant) -> Duration {
        (self.window_start + WINDOW).saturating_duration_since(now)
    }

    fn roll(&mut self, now: Instant) {
        if now.saturating_duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.missed = Duration::ZERO;
        }
    }
}

/// The activity of this thread's event loop.
struct Activity {
    /// Requests started and answered so far.
    events: Cell<u64>,
    /// Requests waiting for their answers.
    in_flight: Cell<u32>,
    /// The spinner, while it sleeps.
    sleeper: Cell<Option<Waker>>,
}

thread_local! {
    static ACTIVITY: Activity = const {
        Activity {
            events: Cell::new(0),
            in_flight: Cell::new(0),
            sleeper: Cell::new(None),
        }
    };
}

/// A request of this thread's loop waiting for its answer, from [`InFlight::start`] until
/// dropped (answered, failed or given up). A few thread-local accesses each way.
#[derive(Debug)]
#[must_use = "the request counts as answered when the guard drops"]
pub struct InFlight(());

impl InFlight {
    /// Counts a request as started; wakes the loop's spinner once enough are in flight.
    pub fn start() -> InFlight {
        ACTIVITY.with(|a| {
            a.events.set(a.events.get().wrapping_add(1));
            let n = a.in_flight.get().saturating_add(1);
            a.in_flight.set(n);
            if n >= MIN_IN_FLIGHT
                && let Some(waker) = a.sleeper.take()
            {
                waker.wake();
            }
        });
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        ACTIVITY.with(|a| {
            a.events.set(a.events.get().wrapping_add(1));
            a.in_flight.set(a.in_flight.get().saturating_sub(1));
        });
    }
}

fn events() -> u64 {
    ACTIVITY.with(|a| a.events.get())
}

fn in_flight() -> u32 {
    ACTIVITY.with(|a| a.in_flight.get())
}

/// Resolves once enough requests are in flight to spin for.
struct Busy;

impl Future for Busy {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        ACTIVITY.with(|a| {
            if a.in_flight.get() >= MIN_IN_FLIGHT {
                Poll::Ready(())
            } else {
                a.sleeper.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
    }
}

/// The spinner of the current event loop (spawn one per loop, on that loop). Ends when
/// `stop` turns true. A zero `budget` returns at once.
pub async fn run(budget: Duration, metrics: Metrics, mut stop: watch::Receiver<bool>) {
    if budget.is_zero() {
        return;
    }
    let mut policy = Policy::new(budget, Instant::now());
    loop {
        tokio::select! {
            biased;
            () = crate::shutdown::triggered(&mut stop) => return,
            () = Busy => {}
        }
        if policy.should_spin(Instant::now(), in_flight()) {
            let lost = spin(budget, &stop).await;
            policy.missed(Instant::now(), lost);
            metrics.busy_poll_spin(lost);
        } else {
            // Over the cap: sleep until the window rolls (or shutdown), then look again.
            tokio::select! {
                biased;
                () = crate::shutdown::triggered(&mut stop) => return,
                () = tokio::time::sleep(policy.until_next_window(Instant::now())) => {}
            }
        }
    }
}

/// Yields to the loop until `budget` passes with no request starting or answered, fewer than
/// [`MIN_IN_FLIGHT`] requests remain in flight, or shutdown; returns the time lost: spun
/// since the last activity when the budget ran out, else zero.
async fn spin(budget: Duration, stop: &watch::Receiver<bool>) -> Duration {
    let mut seen = events();
    let mut last = Instant::now();
    loop {
        tokio::task::yield_now().await;
        if in_flight() < MIN_IN_FLIGHT || *stop.borrow() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let current = events();
        if current != seen {
            seen = current;
            last = now;
        } else if now.saturating_duration_since(last) >= budget {
            return now.saturating_duration_since(last);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Duration = Duration::from_micros(200);

    #[test]
    fn spins_only_with_enough_requests_in_flight() {
        let t0 = Instant::now();
        let mut p = Policy::new(BUDGET, t0);
        assert!(!p.should_spin(t0, 0));
        assert!(
            !p.should_spin(t0, MIN_IN_FLIGHT - 1),
            "a few clients: no spin"
        );
        assert!(p.should_spin(t0, MIN_IN_FLIGHT));
        assert!(p.should_spin(t0, 64));
    }

    #[test]
    fn busy_polling_leaves_a_core_free() {
        assert_eq!(spinning_loops(1, 1, 0), 0, "one core: no spinning");
        assert_eq!(spinning_loops(1, 2, 0), 1);
        assert_eq!(
            spinning_loops(2, 2, 0),
            1,
            "a loop per core: all but one spin"
        );
        assert_eq!(spinning_loops(4, 16, 0), 4);
        assert_eq!(spinning_loops(1, 2, 5), 1, "a lowered priority still spins");
    }

    #[test]
    fn busy_polling_stands_down_at_a_raised_priority() {
        assert_eq!(spinning_loops(1, 2, -1), 0);
        assert_eq!(spinning_loops(4, 16, -5), 0);
    }

    #[test]
    fn a_zero_budget_never_spins() {
        let t0 = Instant::now();
        let mut p = Policy::new(Duration::ZERO, t0);
        assert!(!p.should_spin(t0, 64));
    }

    #[test]
    fn lost_spinning_is_capped_per_window_and_the_cap_resets() {
        let t0 = Instant::now();
        let mut p = Policy::new(BUDGET, t0);
        let misses = (MAX_MISSED_SHARE.as_micros() / BUDGET.as_micros()) as u32;
        for i in 0..misses {
            assert!(p.should_spin(t0, 64), "miss {i} is within the cap");
            p.missed(t0, BUDGET);
        }
        assert!(!p.should_spin(t0, 64), "the cap is reached");
        let half = t0 + WINDOW / 2;
        assert!(!p.should_spin(half, 64));
        assert_eq!(p.until_next_window(half), WINDOW / 2);
        assert!(p.should_spin(t0 + WINDOW, 64), "a new window");
    }

    fn spinner_asleep() -> bool {
        ACTIVITY.with(|a| {
            let w = a.sleeper.take();
            let asleep = w.is_some();
            a.sleeper.set(w);
            asleep
        })
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_spinner_wakes_for_enough_requests_in_flight_and_stops_on_shutdown() {
        let (tx, rx) = watch::channel(false);
        let spinner = tokio::spawn(run(Duration::from_millis(1), Metrics::new(1), rx));
        tokio::task::yield_now().await;
        assert!(
            spinner_asleep(),
            "with nothing in flight the spinner sleeps"
        );
        let mut requests: Vec<InFlight> = (1..MIN_IN_FLIGHT).map(|_| InFlight::start()).collect();
        assert!(spinner_asleep(), "too few in flight to wake it");
        assert_eq!(in_flight(), MIN_IN_FLIGHT - 1);
        requests.push(InFlight::start());
        assert!(!spinner_asleep(), "enough in flight wakes it");
        drop(requests);
        assert_eq!(in_flight(), 0, "answered requests leave the count");
        tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), spinner)
            .await
            .expect("the spinner ends on shutdown")
            .expect("no panic");
    }
}
