//! Warnings that an outage could raise once per request are logged at most once a second,
//! with the number left out since, so that a failure shows in the log without flooding it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// One kind of warning, rate-limited to one a second (process-wide, usually a `static`).
#[derive(Debug, Default)]
pub struct OncePerSecond {
    last_second: AtomicU64,
    left_out: AtomicU64,
}

impl OncePerSecond {
    pub const fn new() -> Self {
        OncePerSecond {
            last_second: AtomicU64::new(0),
            left_out: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this occurrence may be logged (`n` were left out since the last one
    /// logged); `None` when one was already logged this second.
    pub fn admit(&self) -> Option<u64> {
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.admit_at(second)
    }

    fn admit_at(&self, second: u64) -> Option<u64> {
        if self.last_second.swap(second, Relaxed) == second {
            self.left_out.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.left_out.swap(0, Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_a_second_with_the_count_left_out() {
        let limit = OncePerSecond::new();
        assert_eq!(limit.admit_at(10), Some(0));
        assert_eq!(limit.admit_at(10), None);
        assert_eq!(limit.admit_at(10), None);
        assert_eq!(limit.admit_at(11), Some(2));
        assert_eq!(limit.admit_at(11), None);
        assert_eq!(limit.admit_at(15), Some(1));
    }
}
