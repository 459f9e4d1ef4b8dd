//! Retry policy and budget; pure, time passed in.
//!
//! A request is retried on another connection when it provably never reached the relay
//! (any method), or when it is idempotent (GET, HEAD, OPTIONS, PUT, DELETE, TRACE, or any
//! request with an `Idempotency-Key` header) and its body can be replayed. A POST that may
//! have reached the relay is never retried. Retries are limited by a budget: at most
//! `budget_ratio` of the requests seen over the last window, plus a small floor so a quiet
//! sidecar can still retry.

use std::time::Duration;

use tokio::time::Instant;

/// Attempts per request the relay may refuse in an orderly way (GOAWAY, REFUSED_STREAM)
/// without using up one of `retry.max_attempts` or the retry budget: a relay that rotates
/// its connections (nginx sends GOAWAY after `keepalive_requests`) never saw those requests.
pub const MAX_REFUSED_RETRIES: u32 = 4;
/// Retries always allowed per window, whatever the request rate.
pub const MIN_RETRIES_PER_WINDOW: f64 = 3.0;
/// Length of the budget's sliding window.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
const SLICES: usize = 10;

/// Whether the method (or an `Idempotency-Key`) makes a repeat harmless.
pub fn is_idempotent(method: &http::Method, has_idempotency_key: bool) -> bool {
    has_idempotency_key
        || matches!(
            *method,
            http::Method::GET
                | http::Method::HEAD
                | http::Method::OPTIONS
                | http::Method::PUT
                | http::Method::DELETE
                | http::Method::TRACE
        )
}

/// What the policy decides for a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Retry,
    /// The failure may have reached the relay and the request is not idempotent.
    NotSafe,
    /// The attempt limit is reached.
    NoAttemptsLeft,
    /// The body was streamed and cannot be sent again.
    BodyNotReplayable,
}

/// Decides whether attempt number `attempt` (1-based) that failed may be followed by another.
pub fn verdict(
    attempt: u32,
    max_attempts: u32,
    never_sent: bool,
    idempotent: bool,
    body_replayable: bool,
) -> Verdict {
    if attempt >= max_attempts {
        Verdict::NoAttemptsLeft
    } else if !body_replayable {
        Verdict::BodyNotReplayable
    } else if never_sent || idempotent {
        Verdict::Retry
    } else {
        Verdict::NotSafe
    }
}

/// Sliding-window retry budget: `retries <= MIN + ratio * requests` over the window.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    slice_len: Duration,
    start: Instant,
    slices: [(u64, u64, u64); SLICES], // (epoch, requests, retries)
}

impl RetryBudget {
    pub fn new(ratio: f64, now: Instant) -> Self {
        RetryBudget {
            ratio,
            slice_len: BUDGET_WINDOW / SLICES as u32,
            start: now,
            slices: [(0, 0, 0); SLICES],
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.start).as_millis() / self.slice_len.as_millis()) as u64
    }

    fn slice(&mut self, now: Instant) -> &mut (u64, u64, u64) {
        let e = self.epoch(now);
        let s = &mut self.slices[(e % SLICES as u64) as usize];
        if s.0 != e {
            *s = (e, 0, 0);
        }
        s
    }

    fn totals(&self, now: Instant) -> (u64, u64) {
        let e = self.epoch(now);
        self.slices
            .iter()
            .filter(|s| s.0 + (SLICES as u64) > e && s.0 <= e)
            .fold((0, 0), |(q, r), s| (q + s.1, r + s.2))
    }

    /// Counts one client request (first attempts only).
    pub fn record_request(&mut self, now: Instant) {
        self.slice(now).1 += 1;
    }

    /// Takes one retry from the budget if it allows; false when exhausted.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        let (requests, retries) = self.totals(now);
        let allowed = MIN_RETRIES_PER_WINDOW + self.ratio * requests as f64;
        if (retries as f64) < allowed {
            self.slice(now).2 += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_methods_and_keys() {
        assert!(is_idempotent(&http::Method::GET, false));
        assert!(is_idempotent(&http::Method::PUT, false));
        assert!(is_idempotent(&http::Method::DELETE, false));
        assert!(!is_idempotent(&http::Method::POST, false));
        assert!(!is_idempotent(&http::Method::PATCH, false));
        assert!(is_idempotent(&http::Method::POST, true));
    }

    #[test]
    fn post_that_may_have_reached_the_relay_is_never_retried() {
        assert_eq!(verdict(1, 2, false, false, true), Verdict::NotSafe);
        assert_eq!(verdict(1, 2, true, false, true), Verdict::Retry);
        assert_eq!(verdict(1, 2, false, true, true), Verdict::Retry);
        assert_eq!(verdict(2, 2, true, true, true), Verdict::NoAttemptsLeft);
        assert_eq!(verdict(1, 2, true, true, false), Verdict::BodyNotReplayable);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_a_ratio_of_the_request_rate() {
        let now = Instant::now();
        let mut b = RetryBudget::new(0.2, now);
        for _ in 0..100 {
            b.record_request(now);
        }
        let granted = (0..100).filter(|_| b.try_withdraw(now)).count();
        assert_eq!(granted, 23, "3 + 20% of 100");
    }

    #[tokio::test(start_paused = true)]
    async fn budget_refills_as_the_window_slides() {
        let start = Instant::now();
        let mut b = RetryBudget::new(0.0, start);
        assert_eq!((0..10).filter(|_| b.try_withdraw(start)).count(), 3);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!b.try_withdraw(Instant::now()), "still inside the window");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(b.try_withdraw(Instant::now()), "old retries slid out");
    }
}
