//! The relay's requests-per-connection limit, learned from the connections it rotates; pure,
//! time passed in.
//!
//! Relays end each client connection after a fixed number of requests: nginx after
//! `keepalive_requests` (1000 by default), Envoy after `max_requests_per_connection`. Over
//! HTTP/2 that is a GOAWAY naming the last stream the relay will process; every stream the
//! sidecar opened after it is refused and must be sent again on another connection, and the
//! replacement connection is dialed only then. At 64 busy clients on four connections that
//! was one request in 150 sent twice, each waiting for a second round trip.
//!
//! When two connections in a row were rotated after the same number of requests, the pool
//! takes that number as the relay's limit: it dials each connection's replacement a tenth of
//! the limit ahead ([`rotate_at`]) and sends no connection more requests than the limit,
//! so the relay never has to refuse one. The limit is forgotten after [`FORGET_AFTER`]; the
//! next connections then run until the relay rotates them, which confirms it again or
//! learns a new one (a relay whose limit was raised is otherwise rotated early forever).

use std::time::Duration;

use tokio::time::Instant;

/// Counts below this are not taken as a limit: too few requests per connection to be worth
/// rotating ahead of, and too easily a coincidence (a relay that restarts, or closes idle
/// connections, also sends GOAWAY after a few requests).
pub const MIN_LIMIT: u64 = 16;

/// How long a learned limit holds before it is checked against the relay again.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

/// What the pool knows of the relay's requests-per-connection limit.
#[derive(Debug, Default)]
pub struct RequestLimit {
    /// The last count observed, waiting for a second equal one.
    candidate: Option<u64>,
    /// The limit, and when it was last confirmed.
    learned: Option<(u64, Instant)>,
}

impl RequestLimit {
    /// A connection the relay rotated (a graceful GOAWAY that refused streams) after
    /// processing `processed` requests. Returns the limit when this observation makes it
    /// known, or changes it; `None` when nothing changed or it is only a candidate.
    pub fn observe(&mut self, processed: u64, now: Instant) -> Option<u64> {
        if processed < MIN_LIMIT {
            self.candidate = None;
            return None;
        }
        let known = self.limit(now);
        // An expired limit still counts as the first of two observations.
        let confirmed = self.candidate == Some(processed)
            || self.learned.is_some_and(|(limit, _)| limit == processed);
        self.candidate = Some(processed);
        if !confirmed {
            return None;
        }
        self.learned = Some((processed, now));
        (known != Some(processed)).then_some(processed)
    }

    /// The limit new connections are held to, if known and not yet due for a check.
    pub fn limit(&self, now: Instant) -> Option<u64> {
        self.learned
            .filter(|&(_, at)| now.saturating_duration_since(at) < FORGET_AFTER)
            .map(|(limit, _)| limit)
    }
}

/// The request count at which a connection held to `limit` requests has its replacement
/// dialed: a tenth of the limit ahead (at least one request), so the new connection is
/// ready before the old one may take no more.
pub fn rotate_at(limit: u64) -> u64 {
    limit - (limit / 10).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Instant {
        // A fixed origin: only differences matter.
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *ORIGIN.get_or_init(Instant::now) + Duration::from_secs(secs)
    }

    #[test]
    fn two_equal_counts_in_a_row_make_the_limit() {
        let mut l = RequestLimit::default();
        assert_eq!(
            l.observe(1000, at(0)),
            None,
            "one rotation is a candidate only"
        );
        assert_eq!(l.limit(at(0)), None);
        assert_eq!(l.observe(1000, at(1)), Some(1000));
        assert_eq!(l.limit(at(1)), Some(1000));
        assert_eq!(
            l.observe(1000, at(2)),
            None,
            "a confirmation changes nothing"
        );
        assert_eq!(l.limit(at(2)), Some(1000));
    }

    #[test]
    fn differing_counts_teach_nothing() {
        let mut l = RequestLimit::default();
        for (i, n) in [1000, 731, 1000, 52, 1000].into_iter().enumerate() {
            assert_eq!(l.observe(n, at(i as u64)), None);
        }
        assert_eq!(l.limit(at(5)), None);
    }

    #[test]
    fn small_counts_are_never_a_limit_and_break_a_pair() {
        let mut l = RequestLimit::default();
        assert_eq!(l.observe(MIN_LIMIT - 1, at(0)), None);
        assert_eq!(l.observe(MIN_LIMIT - 1, at(1)), None);
        assert_eq!(l.limit(at(1)), None);
        l.observe(100, at(2));
        l.observe(3, at(3));
        assert_eq!(l.observe(100, at(4)), None, "the pair was broken");
        assert_eq!(l.observe(MIN_LIMIT, at(5)), None);
        assert_eq!(l.observe(MIN_LIMIT, at(6)), Some(MIN_LIMIT));
    }

    #[test]
    fn a_new_pair_replaces_the_limit() {
        let mut l = RequestLimit::default();
        l.observe(1000, at(0));
        l.observe(1000, at(1));
        // The relay was reconfigured to rotate sooner: its connections end before ours do.
        assert_eq!(l.observe(500, at(2)), None);
        assert_eq!(
            l.limit(at(2)),
            Some(1000),
            "one rotation does not overturn it"
        );
        assert_eq!(l.observe(500, at(3)), Some(500));
        assert_eq!(l.limit(at(3)), Some(500));
    }

    #[test]
    fn the_limit_is_forgotten_and_one_matching_rotation_restores_it() {
        let mut l = RequestLimit::default();
        l.observe(1000, at(0));
        l.observe(1000, at(1));
        let later = FORGET_AFTER.as_secs() + 1;
        assert_eq!(l.limit(at(later)), None, "checked against the relay again");
        assert_eq!(l.observe(1000, at(later + 5)), Some(1000));
        assert_eq!(l.limit(at(later + 5)), Some(1000));
        // After it expires again, a relay with a raised limit teaches the new one.
        let much_later = later + 5 + FORGET_AFTER.as_secs() + 1;
        assert_eq!(l.observe(5000, at(much_later)), None);
        assert_eq!(l.observe(5000, at(much_later + 1)), Some(5000));
    }

    #[test]
    fn replacements_are_dialed_a_tenth_ahead() {
        assert_eq!(rotate_at(1000), 900);
        assert_eq!(rotate_at(100), 90);
        assert_eq!(rotate_at(16), 15);
        assert_eq!(rotate_at(19), 18);
        assert_eq!(rotate_at(20), 18);
    }
}
