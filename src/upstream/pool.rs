//! The warm set of relay connections: one supervisor per slot dials at start, re-dials with
//! jittered backoff when the connection drops, rotates it after a jittered
//! `max_connection_age`, and replaces it when the ejector finds it slow. Requests pick the
//! usable connection with the fewest requests in flight (ties: lower EWMA latency), among
//! the connections of their own event loop first (`event_loops`; one loop by default).
//! Requests that find every connection busy wait in one line, first come first served
//! ([`WaitQueue`]).

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, OwnedSemaphorePermit, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use super::UpstreamError;
use super::backoff::Backoff;
use super::breaker::{Admission, Breaker, BreakerState, Transition, TripReason};
use super::connection::{Connection, DialError, PoolShared, dial};
use super::read_ahead;
use super::wait_queue::WaitQueue;
use crate::config::Config;
use crate::event_loops::EventLoops;
use crate::latency::{Histogram, LatencyWindow};
use crate::metrics::Metrics;
use crate::tls::TlsSetup;

/// What a slot is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SlotState {
    Connecting = 0,
    Connected = 1,
    Backoff = 2,
    Draining = 3,
}

impl SlotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Connecting => "connecting",
            SlotState::Connected => "connected",
            SlotState::Backoff => "backoff",
            SlotState::Draining => "draining",
        }
    }

    fn from_u8(v: u8) -> SlotState {
        match v {
            1 => SlotState::Connected,
            2 => SlotState::Backoff,
            3 => SlotState::Draining,
            _ => SlotState::Connecting,
        }
    }

    pub const ALL: [SlotState; 4] = [
        SlotState::Connecting,
        SlotState::Connected,
        SlotState::Backoff,
        SlotState::Draining,
    ];
}

/// One position of the pool; its connection is replaced over time, its id stays.
#[derive(Debug)]
pub struct Slot {
    pub index: usize,
    /// The event loop that drives this slot's connections (`event_loops`); requests on that
    /// loop prefer them.
    event_loop: usize,
    current: Mutex<Option<Arc<Connection>>>,
    state: AtomicU8,
    breaker: Mutex<Breaker>,
    /// `breaker.is_closed()` as of the breaker's last change, written under its lock: the
    /// request path reads it instead of taking the lock of every slot it looks at. A stale
    /// `true` costs nothing: [`Breaker::admit`] decides under the lock.
    breaker_closed: AtomicBool,
    requests: AtomicU64,
    /// Failed requests: failed attempts, and response bodies that failed after their head.
    errors: Arc<AtomicU64>,
    reconnects: AtomicU64,
    /// Unix time in ms of the last request start or end; 0 = never.
    last_activity_ms: AtomicU64,
    next_dial: Mutex<Option<Instant>>,
    last_error: Mutex<Option<DialError>>,
    eject: Notify,
    /// Re-dialing at once because the relay closed a connection that had served (a routine
    /// rotation, e.g. nginx's GOAWAY after `keepalive_requests`): requests wait for the
    /// replacement, so readiness holds (see [`Slot::being_replaced`]).
    replacing: AtomicBool,
}

impl Slot {
    fn new(index: usize, event_loop: usize, breaker: Breaker) -> Self {
        Slot {
            index,
            event_loop,
            current: Mutex::new(None),
            state: AtomicU8::new(SlotState::Connecting as u8),
            breaker_closed: AtomicBool::new(breaker.is_closed()),
            breaker: Mutex::new(breaker),
            requests: AtomicU64::new(0),
            errors: Arc::new(AtomicU64::new(0)),
            reconnects: AtomicU64::new(0),
            last_activity_ms: AtomicU64::new(0),
            next_dial: Mutex::new(None),
            last_error: Mutex::new(None),
            eject: Notify::new(),
            replacing: AtomicBool::new(false),
        }
    }

    /// The slot's error counter, for failures noticed after the request left the pool (a
    /// response body that fails).
    pub fn error_counter(&self) -> Arc<AtomicU64> {
        self.errors.clone()
    }

    /// The slot's 1-based, stable connection id.
    pub fn id(&self) -> u64 {
        self.index as u64 + 1
    }

    pub fn state(&self) -> SlotState {
        SlotState::from_u8(self.state.load(Ordering::Relaxed))
    }

    fn set_state(&self, s: SlotState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    /// The live connection, if any.
    pub fn connection(&self) -> Option<Arc<Connection>> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    /// Records activity at `unix_ms` (see [`Pool::unix_ms`]).
    fn touch(&self, unix_ms: u64) {
        self.last_activity_ms.store(unix_ms, Ordering::Relaxed);
    }

    fn with_breaker<R>(&self, f: impl FnOnce(&mut Breaker) -> R) -> R {
        let mut guard = match self.breaker.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let out = f(&mut guard);
        self.breaker_closed
            .store(guard.is_closed(), Ordering::Relaxed);
        out
    }

    /// Whether the breaker would admit a request at `now`, without its lock while it is closed.
    fn breaker_would_admit(&self, now: Instant) -> bool {
        self.breaker_closed.load(Ordering::Relaxed) || self.with_breaker(|b| b.would_admit(now))
    }

    /// Request slots free now on this slot's connection, if it is usable and its breaker
    /// admits a request (0 otherwise).
    fn free_request_slots(&self, now: Instant) -> usize {
        self.usable_connection()
            .filter(|_| self.breaker_would_admit(now))
            .map_or(0, |c| c.available())
    }

    fn usable_connection(&self) -> Option<Arc<Connection>> {
        self.connection()
            .filter(|c| !c.is_closed() && !c.is_draining())
    }

    /// The relay closed this slot's connection after it served, and the slot re-dials at
    /// once (or is about to: the supervisor decides as [`replaced_at_once`] does), or the
    /// connection carried all the relay's request limit allows and its replacement is on the
    /// way (the supervisor may not have run yet); requests wait for the replacement
    /// meanwhile.
    fn being_replaced(&self) -> bool {
        self.replacing.load(Ordering::Relaxed)
            || (self.state() != SlotState::Backoff
                && self
                    .connection()
                    .is_some_and(|c| (c.is_closed() && replaced_at_once(&c)) || c.is_spent()))
    }
}

/// A granted request slot on one connection. Report the outcome with [`Pool::finish`];
/// dropping it unreported gives a half-open probe back.
pub struct Checkout {
    pub slot: Arc<Slot>,
    pub conn: Arc<Connection>,
    pub permit: Option<OwnedSemaphorePermit>,
    admission: Option<Admission>,
    /// Whether the checkout had to wait for a connection (the caller's clock reading from
    /// before the checkout is then stale).
    pub waited: bool,
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(a) = self.admission.take() {
            self.slot.with_breaker(|b| b.release(a));
        }
    }
}

/// How one attempt ended, for the breaker and the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// The relay declined the request in an orderly way (its connection is going away):
    /// neither a success nor a failure for the breaker.
    Refused,
    /// The attempt says nothing about the connection (the client stopped sending its body):
    /// neither a success nor a failure for the breaker.
    NotJudged,
}

/// How good a connection is for the next request: its own event loop's first, then the
/// fewest requests in flight, then the lower latency (EWMA).
struct Rank {
    other_loop: bool,
    in_flight: u64,
    ewma_ms: f64,
}

impl Rank {
    fn beats(&self, other: &Rank) -> bool {
        let (mine, theirs) = (
            (self.other_loop, self.in_flight),
            (other.other_loop, other.in_flight),
        );
        mine < theirs || (mine == theirs && self.ewma_ms < other.ewma_ms)
    }
}

/// Why no connection could be had right now.
struct Unavailable {
    /// Some connection may free up soon (busy HTTP/1.1, or a dial in progress).
    can_wait: bool,
    /// The connection to avoid has a free slot (another waiting request may take it).
    excluded_free: bool,
}

/// Point-in-time view of one slot for the admin API.
#[derive(Debug, Clone)]
pub struct SlotSnapshot {
    pub id: u64,
    pub index: usize,
    pub state: SlotState,
    pub protocol: Option<&'static str>,
    pub connected_since: Option<SystemTime>,
    pub last_activity: Option<SystemTime>,
    pub in_flight: u64,
    pub requests: u64,
    pub errors: u64,
    pub reconnects: u64,
    pub histogram: Histogram,
    pub ewma_ms: f64,
    pub ping_rtt: Option<Duration>,
    pub is_healthy: bool,
    /// Its connection is being replaced after a routine close by the relay; requests wait.
    pub replacing: bool,
    pub breaker: BreakerState,
    pub trip_reason: Option<TripReason>,
    pub time_in_state: Duration,
    pub transitions: u64,
    pub last_transition: Option<SystemTime>,
    pub retry_after: Option<Duration>,
    pub capacity: usize,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub last_error: Option<String>,
}

/// The warm connection pool.
pub struct Pool {
    cfg: Arc<Config>,
    tls: TlsSetup,
    slots: Vec<Arc<Slot>>,
    /// Requests waiting for a connection, first come first served; also woken when
    /// something changes that may serve them.
    line: Arc<WaitQueue>,
    metrics: Metrics,
    origin: Instant,
    /// Unix time in ms at `origin`: wall times of the request path come from the monotonic
    /// clock the path reads anyway, instead of one more clock read per request.
    origin_unix_ms: u64,
    generation: AtomicU64,
    /// Byte totals and the read-ahead budget, shared with every connection.
    shared: PoolShared,
    /// Every attempt's latency, whichever connection carried it: the pool's percentiles over
    /// the whole window, also when the relay rotates connections far more often than that.
    latency: LatencyWindow,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl Pool {
    pub fn new(cfg: Arc<Config>, tls: TlsSetup, metrics: Metrics) -> Arc<Pool> {
        let now = Instant::now();
        let shared = PoolShared {
            totals: Arc::default(),
            read_ahead: Arc::new(read_ahead::Budget::new(
                cfg.upstream.http1_read_ahead_bytes,
                cfg.upstream.http1_read_ahead_total_bytes,
            )),
            request_limit: Arc::default(),
        };
        let loops = cfg.runtime.event_loops(cfg.pool.size.get());
        let slots = (0..cfg.pool.size.get())
            .map(|i| {
                Arc::new(Slot::new(
                    i,
                    i % loops,
                    Breaker::new(cfg.breaker.clone(), now),
                ))
            })
            .collect();
        Arc::new(Pool {
            cfg,
            tls,
            slots,
            line: Arc::new(WaitQueue::new()),
            metrics,
            origin: now,
            origin_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            generation: AtomicU64::new(0),
            shared,
            latency: LatencyWindow::new(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn slots(&self) -> &[Arc<Slot>] {
        &self.slots
    }

    /// Milliseconds since the pool started: the latency windows' clock.
    pub fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// `now` as milliseconds since the pool started.
    fn ms_at(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_millis() as u64
    }

    /// `now` as Unix time in milliseconds (for `last_activity`).
    fn unix_ms(&self, now: Instant) -> u64 {
        self.origin_unix_ms + self.ms_at(now)
    }

    /// Starts one supervisor per slot and the slow-connection ejector; they end on shutdown.
    /// Each slot's supervisor runs on the slot's event loop, and with it the connections it
    /// dials.
    pub fn start(self: &Arc<Self>, shutdown: watch::Receiver<bool>, loops: &EventLoops) {
        for slot in &self.slots {
            let pool = Arc::downgrade(self);
            let slot = slot.clone();
            let shutdown = shutdown.clone();
            let span = info_span!("pool_slot", connection_id = slot.id());
            loops.spawn_on(
                slot.event_loop,
                supervise(pool, slot, shutdown).instrument(span),
            );
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(eject_slow(pool, shutdown).instrument(info_span!("pool_ejector")));
    }

    /// Whether any connection can take a request now, or is being replaced after the relay
    /// closed it in routine (requests wait for it): readiness, as the admin API reports it.
    pub fn is_ready(&self) -> bool {
        let now = Instant::now();
        self.slots.iter().any(|s| {
            (s.usable_connection().is_some() || s.being_replaced())
                && s.with_breaker(|b| b.state(now) != BreakerState::Open)
        })
    }

    /// Connections that are connected and whose breaker lets traffic through.
    pub fn active_connections(&self) -> usize {
        let now = Instant::now();
        self.slots
            .iter()
            .filter(|s| {
                s.usable_connection().is_some()
                    && s.with_breaker(|b| b.state(now) != BreakerState::Open)
            })
            .count()
    }

    fn try_checkout(&self, exclude: Option<usize>, now: Instant) -> Result<Checkout, Unavailable> {
        let mut can_wait = false;
        let mut excluded_free = false;
        let here = crate::event_loops::current();
        for _pass in 0..3 {
            // Ranked by (another loop's, in flight), then latency: this loop's first.
            let mut best: Option<(Rank, &Arc<Slot>, Arc<Connection>)> = None;
            for slot in &self.slots {
                if Some(slot.index) == exclude {
                    excluded_free |= slot.free_request_slots(now) > 0;
                    continue;
                }
                let Some(conn) = slot.usable_connection() else {
                    // Dialing, or its connection just ended and the slot task is about to
                    // re-dial (the state still says connected): worth waiting for. Only a
                    // slot in backoff makes the request fail fast.
                    if slot.state() != SlotState::Backoff && slot.breaker_would_admit(now) {
                        can_wait = true;
                    }
                    continue;
                };
                if !slot.breaker_would_admit(now) {
                    continue;
                }
                if conn.available() == 0 {
                    can_wait = true;
                    continue;
                }
                let rank = Rank {
                    other_loop: slot.event_loop != here,
                    in_flight: conn.stats.in_flight.load(Ordering::Relaxed),
                    ewma_ms: conn.latency.ewma_ms(),
                };
                if best.as_ref().is_none_or(|(r, _, _)| rank.beats(r)) {
                    best = Some((rank, slot, conn));
                }
            }
            let Some((_, slot, conn)) = best else {
                return Err(Unavailable {
                    can_wait,
                    excluded_free,
                });
            };
            let Some((admission, transition)) = slot.with_breaker(|b| b.admit(now)) else {
                continue;
            };
            if let Some(t) = transition {
                self.on_transition(slot, t);
            }
            match conn.try_reserve() {
                Some(permit) => {
                    slot.requests.fetch_add(1, Ordering::Relaxed);
                    slot.touch(self.unix_ms(now));
                    return Ok(Checkout {
                        slot: slot.clone(),
                        conn,
                        permit: Some(permit),
                        admission: Some(admission),
                        waited: false,
                    });
                }
                None => slot.with_breaker(|b| b.release(admission)),
            }
        }
        Err(Unavailable {
            can_wait: true,
            excluded_free,
        })
    }

    /// A request slot on the best usable connection other than `exclude`; waits (until
    /// `deadline`) only when one may free up soon, otherwise fails fast. Waiting requests are
    /// served in the order they came ([`WaitQueue`]).
    /// `now`: the caller's clock reading, taken just before.
    pub async fn checkout(
        &self,
        exclude: Option<usize>,
        deadline: Instant,
        now: Instant,
    ) -> Result<Checkout, UpstreamError> {
        // With one connection there is nothing else to go to.
        let exclude = exclude.filter(|_| self.slots.len() > 1);
        // Fast path: a free connection, when nobody is waiting for one (a newcomer does not
        // take the slot a waiting request was just woken for).
        if self.line.is_empty() {
            match self.try_checkout(exclude, now) {
                Ok(c) => return Ok(c),
                Err(u) if u.can_wait => {}
                Err(_) => return Err(self.unavailable()),
            }
        }
        self.wait_in_line(exclude, deadline).await
    }

    async fn wait_in_line(
        &self,
        exclude: Option<usize>,
        deadline: Instant,
    ) -> Result<Checkout, UpstreamError> {
        let _waiting = self.metrics.waiting_in_line();
        let mut place = self.line.join(exclude);
        let now = Instant::now();
        // Joined behind others without looking: if no connection will serve soon (every slot
        // backing off or its breaker open), fail fast as a newcomer to an empty line would.
        // Checked after joining, so a change after the check wakes this request.
        if !self.worth_waiting(exclude, now) {
            drop(place);
            return Err(self.unavailable());
        }
        // A slot freed before this request joined woke nobody: the first in line (maybe this
        // request) looks for it.
        self.wake_for_unclaimed_slots(now);
        loop {
            if !place.wait(deadline).await {
                return Err(UpstreamError::pool_timeout(
                    "no relay connection became free within pool.request_timeout",
                ));
            }
            let now = Instant::now();
            match self.try_checkout(exclude, now) {
                Ok(mut c) => {
                    c.waited = true;
                    drop(place);
                    // A slot no wake-up is for (a connection freed several at once): the next
                    // in line looks too.
                    if !self.line.is_empty() {
                        self.wake_for_unclaimed_slots(now);
                    }
                    return Ok(c);
                }
                Err(u) if u.can_wait => {
                    place.requeue();
                    if u.excluded_free {
                        place.pass_on();
                    }
                }
                Err(_) => return Err(self.unavailable()),
            }
        }
    }

    /// Whether a request may get a connection by waiting: some connection it may use is up
    /// and admitted by its breaker (busy or not), or is being dialed and not backing off.
    /// [`Pool::try_checkout`]'s `can_wait`, without taking anything.
    fn worth_waiting(&self, exclude: Option<usize>, now: Instant) -> bool {
        self.slots.iter().any(|slot| {
            Some(slot.index) != exclude
                && slot.breaker_would_admit(now)
                && (slot.usable_connection().is_some() || slot.state() != SlotState::Backoff)
        })
    }

    /// Wakes the first in line when more request slots are free than requests already woken
    /// for them. Waking one for a slot another woken request will take makes it look, find
    /// nothing and go back: under overload that was every other newcomer.
    fn wake_for_unclaimed_slots(&self, now: Instant) {
        let claimed = self.line.woken();
        let mut free = 0;
        for slot in &self.slots {
            free += slot.free_request_slots(now);
            if free > claimed {
                self.line.wake(1);
                return;
            }
        }
    }

    /// The fail-fast error: 502 naming a certificate problem, else 503 with Retry-After.
    fn unavailable(&self) -> UpstreamError {
        let now = Instant::now();
        let mut retry_after: Option<Duration> = None;
        let mut certificate = None;
        let mut last = None;
        for slot in &self.slots {
            let wait = slot.with_breaker(|b| b.retry_after(now)).or_else(|| {
                slot.next_dial
                    .lock()
                    .ok()
                    .and_then(|n| *n)
                    .map(|t| t.saturating_duration_since(now))
            });
            if let Some(w) = wait {
                retry_after = Some(retry_after.map_or(w, |r: Duration| r.min(w)));
            }
            if let Some(e) = slot.last_error.lock().ok().and_then(|e| e.clone()) {
                if e.certificate {
                    certificate = Some(e.detail.clone());
                }
                last = Some(e.detail);
            }
        }
        if let Some(detail) = certificate {
            return UpstreamError::bad_gateway(detail);
        }
        let secs = retry_after.map_or(1, |d| d.as_secs_f64().ceil().max(1.0) as u64);
        let detail = match last {
            Some(e) => format!(
                "no usable relay connection (all circuit breakers open or disconnected); last error: {e}"
            ),
            None => "no usable relay connection (all circuit breakers open or disconnected)".into(),
        };
        UpstreamError::unavailable(detail, secs)
    }

    /// Reports how an attempt ended, at `now`: latency (time to response headers), breaker,
    /// counters.
    pub fn finish(
        &self,
        mut checkout: Checkout,
        outcome: Outcome,
        latency: Option<Duration>,
        now: Instant,
    ) {
        let slot = checkout.slot.clone();
        if let Some(l) = latency {
            let now_ms = self.ms_at(now);
            checkout.conn.latency.record(now_ms, l);
            self.latency.record(now_ms, l);
        }
        if outcome == Outcome::Failure {
            slot.errors.fetch_add(1, Ordering::Relaxed);
        }
        slot.touch(self.unix_ms(now));
        // The requests a dying connection takes down with it count once for its breaker.
        let outcome = if outcome == Outcome::Failure && checkout.conn.failure_already_judged() {
            Outcome::NotJudged
        } else {
            outcome
        };
        if let Some(admission) = checkout.admission.take() {
            let t = slot.with_breaker(|b| match outcome {
                Outcome::Success => b.on_success(admission, now),
                Outcome::Failure => b.on_failure(admission, now),
                Outcome::Refused | Outcome::NotJudged => {
                    b.release(admission);
                    None
                }
            });
            if let Some(t) = t {
                self.on_transition(&slot, t);
            }
        }
    }

    fn on_transition(&self, slot: &Slot, t: Transition) {
        let reason = t.reason.map(TripReason::as_str);
        match t.to {
            BreakerState::Open => warn!(
                connection_id = slot.id(),
                from = t.from.as_str(),
                reason = reason.unwrap_or("-"),
                "circuit breaker opened"
            ),
            _ => info!(
                connection_id = slot.id(),
                from = t.from.as_str(),
                to = t.to.as_str(),
                "circuit breaker transition"
            ),
        }
        self.metrics.breaker_transition(t.to, t.reason);
        if t.to == BreakerState::Open && t.reason == Some(TripReason::ProbeFailed) {
            // The connection failed again after a rest: the fault may be its own state (a
            // send window the relay never reopens, a stuck stream), which only a fresh
            // connection clears. Replaced gracefully; the breaker keeps its state.
            slot.eject.notify_one();
        }
        self.line.wake_all();
    }

    /// Point-in-time view of every slot.
    pub fn snapshot(&self) -> Vec<SlotSnapshot> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let now_ms = self.now_ms();
        let to_wall = |i: Instant| wall.checked_sub(now.saturating_duration_since(i));
        self.slots
            .iter()
            .map(|slot| {
                let conn = slot.connection();
                let usable = slot.usable_connection().is_some();
                let (state, reason, in_state, transitions, last, retry_after) =
                    slot.with_breaker(|b| {
                        (
                            b.state(now),
                            b.trip_reason(),
                            b.time_in_state(now),
                            b.transitions(),
                            b.last_transition(),
                            b.retry_after(now),
                        )
                    });
                let activity = slot.last_activity_ms.load(Ordering::Relaxed);
                SlotSnapshot {
                    id: slot.id(),
                    index: slot.index,
                    state: slot.state(),
                    protocol: conn
                        .as_ref()
                        .filter(|c| !c.is_closed())
                        .map(|c| c.protocol.as_str()),
                    connected_since: conn
                        .as_ref()
                        .filter(|c| !c.is_closed())
                        .map(|c| c.connected_at),
                    last_activity: (activity > 0)
                        .then(|| UNIX_EPOCH + Duration::from_millis(activity)),
                    in_flight: conn
                        .as_ref()
                        .map_or(0, |c| c.stats.in_flight.load(Ordering::Relaxed)),
                    requests: slot.requests.load(Ordering::Relaxed),
                    errors: slot.errors.load(Ordering::Relaxed),
                    reconnects: slot.reconnects.load(Ordering::Relaxed),
                    histogram: conn
                        .as_ref()
                        .map(|c| c.latency.histogram(now_ms))
                        .unwrap_or_default(),
                    ewma_ms: conn.as_ref().map_or(0.0, |c| c.latency.ewma_ms()),
                    ping_rtt: conn.as_ref().and_then(|c| c.ping_rtt()),
                    is_healthy: usable && state != BreakerState::Open,
                    replacing: slot.being_replaced() && state != BreakerState::Open,
                    breaker: state,
                    trip_reason: reason,
                    time_in_state: in_state,
                    transitions,
                    last_transition: last.and_then(to_wall),
                    retry_after,
                    capacity: match conn.as_ref() {
                        Some(c) if !c.is_closed() => c.capacity(),
                        _ => 0,
                    },
                    bytes_sent: conn
                        .as_ref()
                        .map_or(0, |c| c.stats.bytes_sent.load(Ordering::Relaxed)),
                    bytes_received: conn
                        .as_ref()
                        .map_or(0, |c| c.stats.bytes_received.load(Ordering::Relaxed)),
                    last_error: slot
                        .last_error
                        .lock()
                        .ok()
                        .and_then(|e| e.as_ref().map(|e| e.detail.clone())),
                }
            })
            .collect()
    }

    /// The pool's latency histogram over the window (every connection, live or replaced).
    pub fn histogram(&self) -> Histogram {
        self.latency.histogram(self.now_ms())
    }

    /// Body bytes (sent to, received from the relay) over the pool's lifetime, through every
    /// connection it ever had.
    pub fn byte_totals(&self) -> (u64, u64) {
        (
            self.shared.totals.sent.load(Ordering::Relaxed),
            self.shared.totals.received.load(Ordering::Relaxed),
        )
    }

    /// Bytes of HTTP/1.1 answers read ahead that their clients have not taken yet.
    pub fn read_ahead_bytes(&self) -> usize {
        self.shared.read_ahead.held()
    }

    /// Requests waiting in line for a free connection now.
    pub fn waiting_requests(&self) -> usize {
        self.line.waiting()
    }

    /// The relay's requests-per-connection limit, once two rotations in a row showed it
    /// (see [`super::request_limit`]).
    pub fn relay_request_limit(&self) -> Option<u64> {
        self.shared.relay_request_limit()
    }

    /// Graceful close at shutdown: no new requests, in-flight ones finish (until
    /// `deadline`), then every connection is dropped, which sends HTTP/2 GOAWAY.
    pub async fn close(&self, deadline: Instant) {
        for slot in &self.slots {
            slot.set_state(SlotState::Draining);
            if let Some(c) = slot.connection() {
                c.start_draining();
            }
        }
        loop {
            let busy: u64 = self
                .slots
                .iter()
                .filter_map(|s| s.connection())
                .map(|c| c.stats.in_flight.load(Ordering::Relaxed))
                .sum();
            if busy == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for slot in &self.slots {
            if let Ok(mut c) = slot.current.lock() {
                c.take();
            }
        }
    }

    /// Replaces every connection gracefully (new ones dialed first, old ones drain), e.g.
    /// after the relay token changed so no buffer of an old connection keeps the old token.
    pub fn rotate_all(&self) {
        for slot in &self.slots {
            slot.eject.notify_one();
        }
    }

    fn install(&self, slot: &Slot, conn: Arc<Connection>) {
        let capacity = conn.available();
        let old = slot.current.lock().ok().and_then(|mut c| c.replace(conn));
        if let Some(old) = old {
            old.start_draining();
        }
        slot.set_state(SlotState::Connected);
        // Wake as many waiting requests as the new connection can take; each request that
        // finishes wakes one more. Waking every waiter here made each rotation (nginx: one per
        // 1000 requests per connection) cost work in proportion to the whole queue.
        self.line.wake(capacity);
    }
}

/// Keeps one slot connected for the life of the pool.
async fn supervise(
    pool: std::sync::Weak<Pool>,
    slot: Arc<Slot>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(p) = pool.upgrade() else { return };
    let mut backoff = Backoff::new(
        p.cfg.pool.reconnect_backoff_initial,
        p.cfg.pool.reconnect_backoff_max,
    );
    drop(p);
    let mut ever_connected = false;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let Some(p) = pool.upgrade() else { return };
        if slot.usable_connection().is_none() {
            slot.set_state(SlotState::Connecting);
        }
        let generation = p.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let dialed = tokio::select! {
            d = dial(&p.cfg, &p.tls, generation, p.line.clone(), &p.shared) => d,
            _ = shutdown.changed() => return,
        };
        let delay = match dialed {
            Ok(conn) => {
                p.metrics.tls_handshake(None);
                if ever_connected {
                    slot.reconnects.fetch_add(1, Ordering::Relaxed);
                    p.metrics.reconnect();
                }
                ever_connected = true;
                if let Ok(mut e) = slot.last_error.lock() {
                    *e = None;
                }
                if let Ok(mut n) = slot.next_dial.lock() {
                    *n = None;
                }
                let reset = slot.with_breaker(|b| {
                    if b.trip_reason() == Some(TripReason::ConnectFailure) {
                        b.reset(Instant::now())
                    } else {
                        None
                    }
                });
                if let Some(t) = reset {
                    p.on_transition(&slot, t);
                }
                debug!(
                    protocol = conn.protocol.as_str(),
                    generation, "connected to relay"
                );
                p.install(&slot, conn.clone());
                slot.replacing.store(false, Ordering::Relaxed);
                let age = p
                    .cfg
                    .pool
                    .max_connection_age
                    .mul_f64(0.8 + 0.2 * fastrand::f64());
                drop(p);
                tokio::select! {
                    _ = conn.closed() => {
                        let Some(p) = pool.upgrade() else { return };
                        p.line.wake_all();
                        if replaced_at_once(&conn) {
                            backoff.reset();
                            // One that served requests and then ended (the relay rotated it
                            // with GOAWAY, or closed it) is replaced at once, so requests
                            // wait for the new one instead of failing fast; only failures
                            // from here on back off. Routine (nginx rotates every
                            // `keepalive_requests`), so it logs at debug; the reconnect
                            // counter still counts it. One that served nothing waits the
                            // first backoff step, so a relay that sends GOAWAY right after
                            // every handshake is not dialed in a tight loop.
                            // (An abandoned HTTP/1.1 connection was closed by the sidecar for
                            // its client's sake: nothing to wait for either.)
                            debug!("relay connection closed after serving; re-dialing");
                            slot.replacing.store(true, Ordering::Relaxed);
                            None
                        } else if is_proven(&conn) {
                            backoff.reset();
                            info!("relay connection closed; re-dialing");
                            Some(backoff.next_delay())
                        } else {
                            // Closed before it ever served: as good as a failed dial, so the
                            // backoff keeps growing and the breaker counts it.
                            warn!("relay closed a new connection before it served anything");
                            slot.errors.fetch_add(1, Ordering::Relaxed);
                            let t = slot.with_breaker(|b| b.on_connect_failure(Instant::now()));
                            if let Some(t) = t {
                                p.on_transition(&slot, t);
                            }
                            let detail = if conn.stats.requests.load(Ordering::Relaxed) > 0 {
                                // It carried a request, and ended without a valid answer.
                                "relay connection failed on its first request"
                            } else {
                                "relay closed the connection before it served a request"
                            };
                            if let Ok(mut last) = slot.last_error.lock() {
                                *last = Some(DialError {
                                    detail: detail.into(),
                                    certificate: false,
                                    timeout: false,
                                });
                            }
                            Some(backoff.next_delay())
                        }
                    }
                    _ = tokio::time::sleep(age) => {
                        info!(age_secs = age.as_secs(), "rotating relay connection");
                        backoff.reset();
                        None
                    }
                    _ = conn.rotation_due() => {
                        // Near the relay's request limit (`request_limit`): the replacement
                        // is dialed while this one serves its last requests, so the relay
                        // refuses none and no request waits for a handshake. Requests wait
                        // for the replacement should this one run out first.
                        debug!("rotating relay connection ahead of the relay's request limit");
                        slot.replacing.store(true, Ordering::Relaxed);
                        backoff.reset();
                        None
                    }
                    _ = slot.eject.notified() => {
                        info!(
                            "replacing relay connection (slow, a failed breaker probe, or the \
                             credential changed)"
                        );
                        backoff.reset();
                        None
                    }
                    _ = shutdown.changed() => return,
                }
            }
            Err(e) => {
                slot.replacing.store(false, Ordering::Relaxed);
                warn!(error = %e, "dial to relay failed");
                p.metrics.tls_handshake(Some(if e.certificate {
                    "certificate"
                } else if e.timeout {
                    "timeout"
                } else {
                    "connect"
                }));
                slot.errors.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                let t = slot.with_breaker(|b| b.on_connect_failure(now));
                if let Some(t) = t {
                    p.on_transition(&slot, t);
                }
                if let Ok(mut last) = slot.last_error.lock() {
                    *last = Some(e);
                }
                // The dead connection (if any) can serve nothing: clear it.
                if slot.connection().is_some_and(|c| c.is_closed())
                    && let Ok(mut c) = slot.current.lock()
                {
                    c.take();
                }
                p.line.wake_all();
                Some(backoff.next_delay())
            }
        };
        if let Some(delay) = delay {
            if slot.usable_connection().is_none() {
                slot.set_state(SlotState::Backoff);
                if let Ok(mut c) = slot.current.lock()
                    && c.as_ref().is_some_and(|c| c.is_closed())
                {
                    c.take();
                }
                // Requests waiting for this slot may now fail fast: they look again (on
                // another event loop one may have looked before the state said so).
                if let Some(p) = pool.upgrade() {
                    p.line.wake_all();
                }
            }
            if let Ok(mut n) = slot.next_dial.lock() {
                *n = Some(Instant::now() + delay);
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// A connection has proven itself once it answered a PING (HTTP/2) or a request, or stayed up for
/// [`PROVING_PERIOD`]; one that closes before is treated as a failed dial.
pub const PROVING_PERIOD: Duration = Duration::from_secs(2);

/// A connection whose end is routine: it was proven and served (or the sidecar closed it
/// for a client's sake), so its slot re-dials at once instead of backing off.
fn replaced_at_once(conn: &Connection) -> bool {
    is_proven(conn) && (conn.stats.requests.load(Ordering::Relaxed) > 0 || conn.is_abandoned())
}

fn is_proven(conn: &Connection) -> bool {
    // HTTP/2 connections are only installed after the relay answered a first PING.
    conn.protocol == super::connection::Protocol::H2
        || conn.is_abandoned()
        || conn.latency.samples() > 0
        || conn.connected_instant.elapsed() >= PROVING_PERIOD
}

/// Every second: a connection whose p95 over the window exceeds `slow_ejection_ratio` times
/// the median p95 of the other connections (each with at least `breaker.min_requests`
/// samples, and at least 5 ms above that median) is replaced.
async fn eject_slow(pool: std::sync::Weak<Pool>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
        let Some(p) = pool.upgrade() else { return };
        let now_ms = p.now_ms();
        let min = p.cfg.breaker.min_requests as u64;
        let measured: Vec<(usize, f64)> = p
            .slots
            .iter()
            .filter_map(|s| {
                let c = s.usable_connection()?;
                let h = c.latency.histogram(now_ms);
                (h.count() >= min).then(|| (s.index, h.quantile_ms(0.95)))
            })
            .collect();
        if let Some(index) = slow_outlier(&measured, p.cfg.pool.slow_ejection_ratio) {
            let slot = &p.slots[index];
            warn!(
                connection_id = slot.id(),
                "relay connection is a latency outlier; ejecting"
            );
            p.metrics.slow_ejection();
            slot.eject.notify_one();
        }
    }
}

/// The index of the worst connection if its p95 is `ratio` times the median of the others.
pub fn slow_outlier(measured: &[(usize, f64)], ratio: f64) -> Option<usize> {
    if measured.len() < 2 {
        return None;
    }
    let (worst_pos, &(index, worst)) = measured
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.1.total_cmp(&b.1.1))?;
    let mut others: Vec<f64> = measured
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != worst_pos)
        .map(|(_, m)| m.1)
        .collect();
    others.sort_by(f64::total_cmp);
    let median = if others.len() % 2 == 1 {
        others[others.len() / 2]
    } else {
        (others[others.len() / 2 - 1] + others[others.len() / 2]) / 2.0
    };
    (worst > ratio * median && worst - median >= 5.0).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::slow_outlier;

    #[test]
    fn a_connection_three_times_the_median_is_an_outlier() {
        let m = [(0, 10.0), (1, 12.0), (2, 11.0), (3, 80.0)];
        assert_eq!(slow_outlier(&m, 3.0), Some(3));
    }

    #[test]
    fn uniform_latency_has_no_outlier() {
        let m = [(0, 10.0), (1, 12.0), (2, 14.0), (3, 25.0)];
        assert_eq!(slow_outlier(&m, 3.0), None);
        assert_eq!(slow_outlier(&[(0, 500.0)], 3.0), None);
    }

    #[test]
    fn sub_millisecond_noise_is_not_ejected() {
        let m = [(0, 0.2), (1, 0.25), (2, 1.5)];
        assert_eq!(slow_outlier(&m, 3.0), None);
    }
}
