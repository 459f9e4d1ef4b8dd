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
//! * After a request starts or gets its answer ([`note_activity`]), the loop polls for up to
//!   `busy_poll` of no new activity, then sleeps.
//! * It spins only when its last two sleeps were each shorter than `busy_poll` (events come
//!   that fast). A lightly loaded sidecar, whose sleeps last milliseconds, never spins: the
//!   short wait between a lone request and its answer is one short sleep, not two.
//! * Spins that end without new activity are lost time; once they add up to
//!   [`MAX_MISSED_SHARE`] of a second, the loop stops spinning until the second is over. That
//!   bounds the CPU busy polling can waste to a few percent of a core at any load.
//!
//! One spinning task per event loop ([`run`]): it yields to the loop's scheduler, which then
//! polls the sockets without blocking (`epoll_wait` with a zero timeout) and runs whatever
//! became ready before it comes back to the spinner. It never delays other tasks.
//!
//! ```text
//!   activity ─▶ spin (yield, poll sockets, yield ...) ─ no activity for busy_poll ─▶ sleep
//!      ▲                                                                               │
//!      └──────────────────── next request wakes the spinner ───────────────────────────┘
//! ```

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// The window over which lost spinning is counted.
const WINDOW: Duration = Duration::from_secs(1);

/// The most of each [`WINDOW`] that spins ending without new activity may take: 2%.
pub const MAX_MISSED_SHARE: Duration = Duration::from_millis(20);

/// When to spin: the pure part of the decision (module documentation).
#[derive(Debug, Clone)]
pub struct Policy {
    budget: Duration,
    /// Sleeps in a row shorter than `budget`.
    short_sleeps: u32,
    window_start: Instant,
    missed: Duration,
}

impl Policy {
    /// Spins last up to `budget` of no activity; a zero budget never spins.
    pub fn new(budget: Duration, now: Instant) -> Self {
        Policy {
            budget,
            short_sleeps: 0,
            window_start: now,
            missed: Duration::ZERO,
        }
    }

    /// How long a spin lasts without activity.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// Whether to spin now that the loop has work again after sleeping for `slept`.
    pub fn should_spin(&mut self, now: Instant, slept: Duration) -> bool {
        self.roll(now);
        self.short_sleeps = if slept < self.budget {
            self.short_sleeps.saturating_add(1)
        } else {
            0
        };
        !self.budget.is_zero() && self.short_sleeps >= 2 && self.missed < MAX_MISSED_SHARE
    }

    /// A spin ended at `now` with `lost` of it spent waiting for activity that never came.
    pub fn missed(&mut self, now: Instant, lost: Duration) {
        self.roll(now);
        self.missed += lost;
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
    /// Events so far (requests started and answered).
    events: Cell<u64>,
    /// The spinner, while it sleeps.
    sleeper: Cell<Option<Waker>>,
}

thread_local! {
    static ACTIVITY: Activity = const {
        Activity {
            events: Cell::new(0),
            sleeper: Cell::new(None),
        }
    };
}

/// Records that this thread's loop has work: a request started or got its answer. Wakes the
/// loop's spinner if it sleeps. Two thread-local accesses; called twice per request.
pub fn note_activity() {
    ACTIVITY.with(|a| {
        a.events.set(a.events.get().wrapping_add(1));
        if let Some(waker) = a.sleeper.take() {
            waker.wake();
        }
    });
}

fn events() -> u64 {
    ACTIVITY.with(|a| a.events.get())
}

/// Resolves once activity is noted after `seen`.
struct NextActivity {
    seen: u64,
}

impl Future for NextActivity {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        ACTIVITY.with(|a| {
            if a.events.get() != self.seen {
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
pub async fn run(budget: Duration, mut stop: watch::Receiver<bool>) {
    if budget.is_zero() {
        return;
    }
    let mut policy = Policy::new(budget, Instant::now());
    let mut asleep_since = Instant::now();
    loop {
        let next = NextActivity { seen: events() };
        tokio::select! {
            biased;
            () = crate::shutdown::triggered(&mut stop) => return,
            () = next => {}
        }
        let now = Instant::now();
        if policy.should_spin(now, now.saturating_duration_since(asleep_since)) {
            let lost = spin(policy.budget(), &stop).await;
            policy.missed(Instant::now(), lost);
        }
        asleep_since = Instant::now();
    }
}

/// Yields to the loop until `budget` passes with no new activity (or shutdown); returns the
/// time spun since the last activity.
async fn spin(budget: Duration, stop: &watch::Receiver<bool>) -> Duration {
    let mut seen = events();
    let mut last = Instant::now();
    loop {
        tokio::task::yield_now().await;
        let now = Instant::now();
        let current = events();
        if current != seen {
            seen = current;
            last = now;
        } else if now.saturating_duration_since(last) >= budget || *stop.borrow() {
            return now.saturating_duration_since(last);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Duration = Duration::from_micros(200);

    const SHORT: Duration = Duration::from_micros(50);

    #[test]
    fn spins_only_after_two_short_sleeps_in_a_row() {
        let t0 = Instant::now();
        let mut p = Policy::new(BUDGET, t0);
        assert!(!p.should_spin(t0, SHORT), "one short sleep is not load yet");
        assert!(p.should_spin(t0, SHORT));
        assert!(p.should_spin(t0, SHORT));
        assert!(
            !p.should_spin(t0, BUDGET),
            "a sleep as long as a spin is not short"
        );
        // A lone request and its answer: a long sleep, then a short one, over and over.
        for _ in 0..10 {
            assert!(
                !p.should_spin(t0, Duration::from_millis(5)),
                "light load: no spin"
            );
            assert!(
                !p.should_spin(t0, SHORT),
                "its answer came soon, still no spin"
            );
        }
    }

    #[test]
    fn a_zero_budget_never_spins() {
        let t0 = Instant::now();
        let mut p = Policy::new(Duration::ZERO, t0);
        assert!(!p.should_spin(t0, Duration::ZERO));
    }

    #[test]
    fn lost_spinning_is_capped_per_window_and_the_cap_resets() {
        let t0 = Instant::now();
        let mut p = Policy::new(BUDGET, t0);
        let misses = (MAX_MISSED_SHARE.as_micros() / BUDGET.as_micros()) as u32;
        p.should_spin(t0, Duration::ZERO);
        for i in 0..misses {
            assert!(
                p.should_spin(t0, Duration::ZERO),
                "miss {i} is within the cap"
            );
            p.missed(t0, BUDGET);
        }
        assert!(!p.should_spin(t0, Duration::ZERO), "the cap is reached");
        assert!(!p.should_spin(t0 + WINDOW / 2, Duration::ZERO));
        assert!(p.should_spin(t0 + WINDOW, Duration::ZERO), "a new window");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_spinner_sleeps_until_activity_and_stops_on_shutdown() {
        let (tx, rx) = watch::channel(false);
        let spinner = tokio::spawn(run(Duration::from_millis(1), rx));
        tokio::task::yield_now().await;
        assert!(
            ACTIVITY.with(|a| {
                let w = a.sleeper.take();
                let asleep = w.is_some();
                a.sleeper.set(w);
                asleep
            }),
            "with no activity the spinner sleeps"
        );
        note_activity();
        assert!(
            ACTIVITY.with(|a| {
                let w = a.sleeper.take();
                let asleep = w.is_some();
                a.sleeper.set(w);
                !asleep
            }),
            "activity wakes it"
        );
        tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), spinner)
            .await
            .expect("the spinner ends on shutdown")
            .expect("no panic");
    }
}
