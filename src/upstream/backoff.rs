//! Exponential backoff with full jitter for re-dialing a pool slot; pure, no clocks.

use std::time::Duration;

/// The delay before attempt `n` is uniform in `[0, min(max, initial * 2^n)]` ("full jitter"),
/// so slots that dropped together do not re-dial together.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self::with_rng(initial, max, fastrand::Rng::new())
    }

    /// A backoff with a seeded random source, for reproducible tests.
    pub fn with_rng(initial: Duration, max: Duration, rng: fastrand::Rng) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
            rng,
        }
    }

    /// The ceiling of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay to wait before the next attempt; each call doubles the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(self.rng.f64())
    }

    /// Attempts since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Back to the initial delay after a successful dial.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_max() {
        let mut b = Backoff::with_rng(
            Duration::from_millis(100),
            Duration::from_secs(1),
            fastrand::Rng::with_seed(7),
        );
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            ceilings.push(b.ceiling().as_millis());
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(1));
        }
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn delays_are_jittered_within_the_ceiling() {
        let mut b = Backoff::with_rng(
            Duration::from_millis(100),
            Duration::from_secs(10),
            fastrand::Rng::with_seed(1),
        );
        for _ in 0..4 {
            b.next_delay();
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut c = b.clone();
            c.rng = fastrand::Rng::new();
            let d = c.next_delay();
            assert!(d <= Duration::from_millis(1600));
            seen.insert(d.as_micros());
        }
        assert!(seen.len() > 10, "full jitter spreads delays: {seen:?}");
    }

    #[test]
    fn reset_returns_to_initial() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        for _ in 0..10 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(5));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(50));
        assert_eq!(b.attempts(), 0);
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        for _ in 0..200 {
            assert!(b.next_delay() <= Duration::from_secs(10));
        }
    }
}
