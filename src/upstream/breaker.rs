//! Circuit breaker of one pool connection: a pure state machine, `now` passed in.
//!
//! * **Closed** — requests flow. Trips to Open after `consecutive_failures` failures in a row,
//!   or when more than `failure_rate` of the requests in the last `window` failed (with at
//!   least `min_requests` of them).
//! * **Open** — no requests. After the open duration it lets exactly one probe through
//!   (Half-open). The open duration doubles, with jitter, after each failed probe, up to
//!   `max_open_duration`.
//! * **Half-open** — one probe in flight; success closes the breaker, failure re-opens it.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::BreakerConfig;

const WINDOW_SLICES: usize = 10;

/// What the breaker does to traffic now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// No requests until the probe time.
    Open,
    /// Exactly one probe request is admitted.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Why the breaker last opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TripReason {
    ConsecutiveFailures,
    FailureRate,
    ProbeFailed,
    ConnectFailure,
}

impl TripReason {
    pub fn as_str(self) -> &'static str {
        match self {
            TripReason::ConsecutiveFailures => "consecutive_failures",
            TripReason::FailureRate => "failure_rate",
            TripReason::ProbeFailed => "probe_failed",
            TripReason::ConnectFailure => "connect_failure",
        }
    }

    pub const ALL: [TripReason; 4] = [
        TripReason::ConsecutiveFailures,
        TripReason::FailureRate,
        TripReason::ProbeFailed,
        TripReason::ConnectFailure,
    ];
}

/// A granted admission; hand it back with the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Normal,
    Probe,
}

/// A state change, returned so the caller can count and log it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
    pub reason: Option<TripReason>,
}

#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: BreakerState,
    open_until: Instant,
    open_for: Duration,
    probe_in_flight: bool,
    consecutive: u32,
    slice_len: Duration,
    origin: Instant,
    slices: [(u64, u32, u32); WINDOW_SLICES], // (epoch, requests, failures)
    since: Instant,
    transitions: u64,
    last_transition: Option<Instant>,
    trip_reason: Option<TripReason>,
    rng: fastrand::Rng,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig, now: Instant) -> Self {
        Self::with_rng(cfg, now, fastrand::Rng::new())
    }

    pub fn with_rng(cfg: BreakerConfig, now: Instant, rng: fastrand::Rng) -> Self {
        let slice_len = (cfg.window / WINDOW_SLICES as u32).max(Duration::from_millis(1));
        Breaker {
            open_for: cfg.open_duration,
            cfg,
            state: BreakerState::Closed,
            open_until: now,
            probe_in_flight: false,
            consecutive: 0,
            slice_len,
            origin: now,
            slices: [(0, 0, 0); WINDOW_SLICES],
            since: now,
            transitions: 0,
            last_transition: None,
            trip_reason: None,
            rng,
        }
    }

    /// Whether the breaker is closed: it admits every request until a failure is recorded,
    /// whatever the time (only Open changes with time alone).
    pub fn is_closed(&self) -> bool {
        self.state == BreakerState::Closed
    }

    /// The state as traffic sees it at `now` (an Open breaker whose time is up reads as
    /// Half-open: the next request is the probe).
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.state {
            BreakerState::Open if now >= self.open_until => BreakerState::HalfOpen,
            s => s,
        }
    }

    /// Whether [`Breaker::admit`] would grant a request now (no change made).
    pub fn would_admit(&self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::HalfOpen => !self.probe_in_flight,
            BreakerState::Open => false,
        }
    }

    /// Admits a request: every request while closed, exactly one probe while half-open.
    pub fn admit(&mut self, now: Instant) -> Option<(Admission, Option<Transition>)> {
        let t = self.poll(now);
        match self.state {
            BreakerState::Closed => Some((Admission::Normal, t)),
            BreakerState::HalfOpen if !self.probe_in_flight => {
                self.probe_in_flight = true;
                Some((Admission::Probe, t))
            }
            _ => None,
        }
    }

    /// Moves Open to Half-open when its time is up.
    pub fn poll(&mut self, now: Instant) -> Option<Transition> {
        if self.state == BreakerState::Open && now >= self.open_until {
            self.probe_in_flight = false;
            return Some(self.set(BreakerState::HalfOpen, now, None));
        }
        None
    }

    /// Gives back a probe admission whose request never ran (e.g. no free stream).
    pub fn release(&mut self, admission: Admission) {
        if admission == Admission::Probe {
            self.probe_in_flight = false;
        }
    }

    /// Reports a successful request.
    pub fn on_success(&mut self, admission: Admission, now: Instant) -> Option<Transition> {
        self.count(now, false);
        self.consecutive = 0;
        match (self.state, admission) {
            (BreakerState::HalfOpen, Admission::Probe) => {
                self.probe_in_flight = false;
                self.open_for = self.cfg.open_duration;
                Some(self.set(BreakerState::Closed, now, None))
            }
            _ => None,
        }
    }

    /// Reports a failed request (connect/TLS error, reset, timeout, 502/503/504).
    pub fn on_failure(&mut self, admission: Admission, now: Instant) -> Option<Transition> {
        self.count(now, true);
        self.consecutive = self.consecutive.saturating_add(1);
        match (self.state, admission) {
            (BreakerState::HalfOpen, Admission::Probe) => {
                self.probe_in_flight = false;
                let doubled = self.open_for.saturating_mul(2);
                let jitter = 0.9 + 0.2 * self.rng.f64();
                self.open_for = doubled.mul_f64(jitter).min(self.cfg.max_open_duration);
                Some(self.open(now, TripReason::ProbeFailed))
            }
            (BreakerState::Closed, _) => {
                if self.consecutive >= self.cfg.consecutive_failures {
                    Some(self.open(now, TripReason::ConsecutiveFailures))
                } else {
                    let (requests, failures) = self.window_totals(now);
                    if requests >= self.cfg.min_requests as u64
                        && failures as f64 > self.cfg.failure_rate * requests as f64
                    {
                        Some(self.open(now, TripReason::FailureRate))
                    } else {
                        None
                    }
                }
            }
            _ => None,
        }
    }

    /// Reports a failed dial (connect or TLS error): a failure like any other, whose trip
    /// reason is `connect_failure`. A due probe that cannot even connect re-opens at once.
    pub fn on_connect_failure(&mut self, now: Instant) -> Option<Transition> {
        self.count(now, true);
        self.consecutive = self.consecutive.saturating_add(1);
        match self.state(now) {
            BreakerState::Closed if self.consecutive >= self.cfg.consecutive_failures => {
                Some(self.open(now, TripReason::ConnectFailure))
            }
            BreakerState::HalfOpen if !self.probe_in_flight => {
                let doubled = self.open_for.saturating_mul(2);
                let jitter = 0.9 + 0.2 * self.rng.f64();
                self.open_for = doubled.mul_f64(jitter).min(self.cfg.max_open_duration);
                Some(self.open(now, TripReason::ConnectFailure))
            }
            _ => None,
        }
    }

    /// Opens the breaker for an outside reason (e.g. a failed dial) unless open.
    pub fn trip(&mut self, now: Instant, reason: TripReason) -> Option<Transition> {
        if self.state == BreakerState::Open {
            return None;
        }
        self.probe_in_flight = false;
        Some(self.open(now, reason))
    }

    /// Closes the breaker because its cause is gone (a dial succeeded after connect failures).
    pub fn reset(&mut self, now: Instant) -> Option<Transition> {
        if self.state == BreakerState::Closed {
            return None;
        }
        self.probe_in_flight = false;
        self.consecutive = 0;
        self.open_for = self.cfg.open_duration;
        self.slices = [(0, 0, 0); WINDOW_SLICES];
        Some(self.set(BreakerState::Closed, now, None))
    }

    /// Time until a probe is allowed while open.
    pub fn retry_after(&self, now: Instant) -> Option<Duration> {
        (self.state == BreakerState::Open).then(|| self.open_until.saturating_duration_since(now))
    }

    pub fn trip_reason(&self) -> Option<TripReason> {
        self.trip_reason
    }

    pub fn transitions(&self) -> u64 {
        self.transitions
    }

    pub fn last_transition(&self) -> Option<Instant> {
        self.last_transition
    }

    pub fn time_in_state(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.since)
    }

    /// Requests and failures in the current window.
    pub fn window_totals(&self, now: Instant) -> (u64, u64) {
        let e = self.epoch(now);
        self.slices
            .iter()
            .filter(|s| s.0 <= e && s.0 + WINDOW_SLICES as u64 > e)
            .fold((0, 0), |(r, f), s| (r + s.1 as u64, f + s.2 as u64))
    }

    fn epoch(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_nanos() / self.slice_len.as_nanos().max(1))
            as u64
    }

    fn count(&mut self, now: Instant, failed: bool) {
        let e = self.epoch(now);
        let s = &mut self.slices[(e % WINDOW_SLICES as u64) as usize];
        if s.0 != e {
            *s = (e, 0, 0);
        }
        s.1 = s.1.saturating_add(1);
        if failed {
            s.2 = s.2.saturating_add(1);
        }
    }

    fn open(&mut self, now: Instant, reason: TripReason) -> Transition {
        self.open_until = now + self.open_for;
        self.trip_reason = Some(reason);
        self.consecutive = 0;
        self.set(BreakerState::Open, now, Some(reason))
    }

    fn set(&mut self, to: BreakerState, now: Instant, reason: Option<TripReason>) -> Transition {
        let from = self.state;
        self.state = to;
        self.since = now;
        self.transitions += 1;
        self.last_transition = Some(now);
        Transition { from, to, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_requests: 10,
            window: Duration::from_secs(10),
            open_duration: Duration::from_secs(5),
            max_open_duration: Duration::from_secs(60),
        }
    }

    fn fail(b: &mut Breaker, now: Instant) -> Option<Transition> {
        let (a, _) = b.admit(now).expect("admitted");
        b.on_failure(a, now)
    }

    fn succeed(b: &mut Breaker, now: Instant) -> Option<Transition> {
        let (a, _) = b.admit(now).expect("admitted");
        b.on_success(a, now)
    }

    #[tokio::test(start_paused = true)]
    async fn trips_after_consecutive_failures() {
        let now = Instant::now();
        let mut b = Breaker::new(cfg(), now);
        assert!(fail(&mut b, now).is_none());
        assert!(fail(&mut b, now).is_none());
        let t = fail(&mut b, now).expect("third failure trips");
        assert_eq!(t.to, BreakerState::Open);
        assert_eq!(b.trip_reason(), Some(TripReason::ConsecutiveFailures));
        assert!(b.admit(now).is_none(), "open admits nothing");
        assert_eq!(b.retry_after(now), Some(Duration::from_secs(5)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_consecutive_count() {
        let now = Instant::now();
        let mut b = Breaker::new(cfg(), now);
        fail(&mut b, now);
        fail(&mut b, now);
        succeed(&mut b, now);
        fail(&mut b, now);
        fail(&mut b, now);
        assert_eq!(b.state(now), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn trips_on_failure_rate_over_the_window() {
        let now = Instant::now();
        let mut b = Breaker::new(cfg(), now);
        // Alternate so the consecutive rule never fires: 6 failures in 11 requests > 50%.
        let mut tripped = None;
        for i in 0..12 {
            let t = if i % 2 == 0 {
                fail(&mut b, now)
            } else {
                succeed(&mut b, now)
            };
            if t.is_some() {
                tripped = Some(i);
                break;
            }
        }
        assert_eq!(tripped, Some(10), "trips once min_requests is reached");
        assert_eq!(b.trip_reason(), Some(TripReason::FailureRate));
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_slide_out_of_the_window() {
        let start = Instant::now();
        let mut b = Breaker::new(cfg(), start);
        for i in 0..9 {
            if i % 2 == 0 {
                fail(&mut b, start)
            } else {
                succeed(&mut b, start)
            };
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        let now = Instant::now();
        assert_eq!(b.window_totals(now), (0, 0));
        fail(&mut b, now);
        assert_eq!(b.state(now), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_exactly_one_probe() {
        let start = Instant::now();
        let mut b = Breaker::new(cfg(), start);
        for _ in 0..3 {
            fail(&mut b, start);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        let now = Instant::now();
        assert_eq!(b.state(now), BreakerState::HalfOpen);
        let (first, t) = b.admit(now).expect("probe admitted");
        assert_eq!(first, Admission::Probe);
        assert_eq!(t.map(|t| t.to), Some(BreakerState::HalfOpen));
        assert!(b.admit(now).is_none(), "second request waits for the probe");
        assert!(!b.would_admit(now));
        let t = b.on_success(first, now).expect("probe success closes");
        assert_eq!(t.to, BreakerState::Closed);
        assert!(b.admit(now).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_with_a_doubled_jittered_duration() {
        let start = Instant::now();
        let mut b = Breaker::new(cfg(), start);
        for _ in 0..3 {
            fail(&mut b, start);
        }
        let mut expected = 5.0;
        for _ in 0..6 {
            let wait = b.retry_after(Instant::now()).expect("open");
            tokio::time::advance(wait).await;
            let now = Instant::now();
            let t = fail(&mut b, now).expect("probe failure reopens");
            assert_eq!(t.reason, Some(TripReason::ProbeFailed));
            expected = (expected * 2.0f64).min(60.0);
            let got = b.retry_after(now).expect("open again").as_secs_f64();
            assert!(
                got >= expected * 0.89 - 1e-9 && got <= (expected * 1.11).min(60.0),
                "{got} vs {expected}"
            );
            expected = got;
        }
        assert!(b.retry_after(Instant::now()).unwrap() <= Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_of_requests_admitted_before_the_trip_are_ignored_while_open() {
        let now = Instant::now();
        let mut b = Breaker::new(cfg(), now);
        let early = b.admit(now).unwrap().0;
        for _ in 0..3 {
            fail(&mut b, now);
        }
        assert!(b.on_success(early, now).is_none());
        assert_eq!(b.state(now), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn released_probe_frees_the_slot() {
        let start = Instant::now();
        let mut b = Breaker::new(cfg(), start);
        b.trip(start, TripReason::ConnectFailure);
        tokio::time::advance(Duration::from_secs(5)).await;
        let now = Instant::now();
        let (p, _) = b.admit(now).unwrap();
        b.release(p);
        assert!(b.admit(now).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn reports_transitions_and_time_in_state() {
        let start = Instant::now();
        let mut b = Breaker::new(cfg(), start);
        b.trip(start, TripReason::ConnectFailure);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(b.time_in_state(Instant::now()), Duration::from_secs(2));
        b.reset(Instant::now());
        assert_eq!(b.transitions(), 2);
        assert_eq!(b.state(Instant::now()), BreakerState::Closed);
    }
}
