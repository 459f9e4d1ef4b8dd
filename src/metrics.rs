//! Every Prometheus family of the sidecar, declared and registered once. Names are
//! `sprint_sidecar_*` with units in the name; label values are bounded sets (method class,
//! status class, pool slot 0..size-1, breaker state, reason). Components hold a cheap
//! clonable [`Metrics`] handle. Two registries: the pool's families (served alone at
//! `/api/v1/secure-channel/metrics`) and the service's; `/metrics` serves both.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::secret::Reload;
use crate::upstream::breaker::{BreakerState, TripReason};

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// The `reason` label values of `sprint_sidecar_upstream_retries_total`: the relay refused
/// the attempt in an orderly way (GOAWAY, REFUSED_STREAM), it provably never got it, or the
/// request is idempotent.
pub const RETRY_REASONS: [&str; 3] = ["refused", "never_sent", "idempotent"];

/// How one attempt at the relay ended, as `upstream_attempt_duration_seconds` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Success,
    /// An error, a reset, a timeout, or a 502/503/504 answer from the relay.
    Failure,
    /// Declined before the relay processed it (GOAWAY, REFUSED_STREAM, a kept-alive
    /// connection closed first): says nothing about the relay's health, and is retried.
    Refused,
}

struct Inner {
    service: Registry,
    pool: Registry,
    requests: Family<Labels2, Counter>,
    request_duration: Histogram,
    wait_duration: Histogram,
    retries: Family<Labels1, Counter>,
    retry_budget_exhausted: Counter,
    in_flight: Gauge,
    abandoned: Counter,
    client_connections: Gauge,
    client_connections_total: Counter,
    upstream_connections: Family<Labels1, Gauge>,
    breaker_state: Family<Labels1, Gauge>,
    breaker_transitions: Family<Labels2, Counter>,
    reconnects: Counter,
    slow_ejections: Counter,
    tls_handshakes: Counter,
    tls_handshake_failures: Family<Labels1, Counter>,
    received_bytes: Counter,
    sent_bytes: Counter,
    upstream_latency_p95: Family<Labels1, Gauge<f64, AtomicU64>>,
    read_ahead: Gauge,
    relay_request_limit: Gauge,
    waiting: Gauge,
    secret_reloads: Family<Labels2, Counter>,
    busy_poll_spins: Counter,
    busy_poll_in_force: Gauge,
    busy_poll_probes: Counter,
    busy_poll_missed: Counter<f64, AtomicU64>,
    nice: Gauge,
    secure_buffers: Gauge,
    locked_bytes: Gauge,
    self_check_passed: Gauge,
    slot_names: Vec<&'static str>,
    /// Hot-path handles: the `requests` series per (method class, status class), resolved
    /// on first use, and the two attempt histograms; each shares its value with the family,
    /// so a request costs no label hashing or family lock.
    request_series: [OnceLock<Counter>; METHOD_CLASSES.len() * STATUS_CLASSES.len()],
    attempt_success: Histogram,
    attempt_failure: Histogram,
    attempt_refused: Histogram,
    answered: AtomicU64,
    answered_5xx: AtomicU64,
}

/// Cheap handle to the process's metrics.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Bounded method label.
pub fn method_class(m: &http::Method) -> &'static str {
    METHOD_CLASSES[method_index(m)]
}

const METHOD_CLASSES: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "OTHER",
];

fn method_index(m: &http::Method) -> usize {
    match *m {
        http::Method::GET => 0,
        http::Method::POST => 1,
        http::Method::PUT => 2,
        http::Method::DELETE => 3,
        http::Method::HEAD => 4,
        http::Method::OPTIONS => 5,
        http::Method::PATCH => 6,
        _ => 7,
    }
}

/// Bounded status label: `2xx`, `4xx`, ...
pub fn status_class(status: u16) -> &'static str {
    STATUS_CLASSES[status_index(status)]
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn status_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// Point-in-time values set just before each scrape.
#[derive(Debug, Clone, Default)]
pub struct ScrapeValues {
    /// (slot index, breaker state) for every slot.
    pub breakers: Vec<(usize, BreakerState)>,
    /// (slot index, p95 seconds) for every slot.
    pub p95_seconds: Vec<(usize, f64)>,
    /// Slots per state name.
    pub upstream_states: Vec<(&'static str, i64)>,
    pub secure_buffers: i64,
    pub locked_bytes: i64,
    pub self_check_passed: Option<bool>,
    /// Bytes of HTTP/1.1 answers read ahead and not yet taken by their clients.
    pub read_ahead_bytes: i64,
    /// The relay's requests-per-connection limit as the pool learned it; 0: not known.
    pub relay_request_limit: i64,
    /// Requests waiting in line for a free relay connection.
    pub waiting_requests: i64,
}

impl Metrics {
    pub fn new(pool_size: usize) -> Metrics {
        let mut service = Registry::with_prefix("sprint_sidecar");
        let mut pool = Registry::with_prefix("sprint_sidecar");
        let requests = Family::<Labels2, Counter>::default();
        service.register(
            "requests",
            "Client requests answered, by method and status class",
            requests.clone(),
        );
        let request_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        service.register_with_unit(
            "request_duration",
            "Time from a client request to its response headers",
            Unit::Seconds,
            request_duration.clone(),
        );
        let in_flight = Gauge::default();
        service.register(
            "in_flight_requests",
            "Client requests being served now",
            in_flight.clone(),
        );
        let abandoned = Counter::default();
        service.register(
            "requests_abandoned",
            "Client requests whose client went away before their answer's head was ready (an \
             HTTP/2 stream reset, a closed connection); not in sprint_sidecar_requests",
            abandoned.clone(),
        );
        let client_connections = Gauge::default();
        service.register(
            "client_connections",
            "Open client connections on the data listener",
            client_connections.clone(),
        );
        let client_connections_total = Counter::default();
        service.register(
            "client_connections_accepted",
            "Client connections accepted on the data listener",
            client_connections_total.clone(),
        );
        let received_bytes = Counter::default();
        service.register_with_unit(
            "client_received",
            "Request body bytes received from clients",
            Unit::Bytes,
            received_bytes.clone(),
        );
        let sent_bytes = Counter::default();
        service.register_with_unit(
            "client_sent",
            "Response body bytes sent to clients",
            Unit::Bytes,
            sent_bytes.clone(),
        );
        let secure_buffers = Gauge::default();
        service.register(
            "secure_buffers",
            "Secrets held in locked, guarded memory",
            secure_buffers.clone(),
        );
        let locked_bytes = Gauge::default();
        service.register_with_unit(
            "secure_buffer_locked",
            "Bytes of secret memory locked with mlock",
            Unit::Bytes,
            locked_bytes.clone(),
        );
        let self_check_passed = Gauge::default();
        service.register(
            "memory_self_check_passed",
            "1 when the last memory-protection self-check passed, else 0",
            self_check_passed.clone(),
        );
        // A gauge fixed at 1 (the Prometheus convention for `*_build_info`) rather than an
        // OpenMetrics `info` family, so that scrapers and linters that read the Prometheus
        // text format (promtool) can also parse the OpenMetrics exposition.
        let build_info = Family::<Labels1, Gauge>::default();
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        service.register("build_info", "Build information", build_info);

        let attempt_duration = Family::<Labels1, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        pool.register_with_unit(
            "upstream_attempt_duration",
            "Time from sending one attempt to the relay to its response headers, by outcome: \
             success; failure (an error, reset or timeout, or a 502/503/504 from the relay); \
             refused (declined before the relay processed it, e.g. HTTP/2 GOAWAY or \
             REFUSED_STREAM while the relay rotates a connection; retried)",
            Unit::Seconds,
            attempt_duration.clone(),
        );
        let wait_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        pool.register_with_unit(
            "upstream_wait_duration",
            "Time requests waited in line for a free relay connection (every connection busy), \
             until served, timed out (pool.request_timeout), refused or abandoned; requests \
             that found a free connection at once are not counted",
            Unit::Seconds,
            wait_duration.clone(),
        );
        let retries = Family::<Labels1, Counter>::default();
        pool.register(
            "upstream_retries",
            "Requests retried on another connection, by reason",
            retries.clone(),
        );
        let retry_budget_exhausted = Counter::default();
        pool.register(
            "upstream_retry_budget_exhausted",
            "Retries refused because the retry budget was spent",
            retry_budget_exhausted.clone(),
        );
        let upstream_connections = Family::<Labels1, Gauge>::default();
        pool.register(
            "upstream_connections",
            "Pool slots by state (connecting, connected, backoff, draining)",
            upstream_connections.clone(),
        );
        let breaker_state = Family::<Labels1, Gauge>::default();
        pool.register(
            "upstream_breaker_state",
            "Circuit breaker of each pool slot (slot = connection_id of the status API): 0 closed, 1 half-open, 2 open",
            breaker_state.clone(),
        );
        let breaker_transitions = Family::<Labels2, Counter>::default();
        pool.register(
            "upstream_breaker_transitions",
            "Circuit breaker transitions, by new state and reason",
            breaker_transitions.clone(),
        );
        let reconnects = Counter::default();
        pool.register(
            "upstream_reconnects",
            "Relay connections re-dialed",
            reconnects.clone(),
        );
        let slow_ejections = Counter::default();
        pool.register(
            "upstream_slow_ejections",
            "Relay connections replaced for being latency outliers",
            slow_ejections.clone(),
        );
        let tls_handshakes = Counter::default();
        pool.register(
            "upstream_tls_handshakes",
            "Successful TLS handshakes with the relay",
            tls_handshakes.clone(),
        );
        let tls_handshake_failures = Family::<Labels1, Counter>::default();
        pool.register(
            "upstream_tls_handshake_failures",
            "Failed dials to the relay, by reason (connect, timeout, certificate)",
            tls_handshake_failures.clone(),
        );
        let upstream_latency_p95 = Family::<Labels1, Gauge<f64, AtomicU64>>::default();
        pool.register_with_unit(
            "upstream_latency_p95",
            "p95 time to response headers of each pool slot (slot = connection_id) over the last 60 s",
            Unit::Seconds,
            upstream_latency_p95.clone(),
        );
        let secret_reloads = Family::<Labels2, Counter>::default();
        service.register(
            "secret_reloads",
            "Watched secret and certificate files that changed, by file and outcome: reloaded \
             (the new content is in use) or rejected (it cannot be used; the previous stays)",
            secret_reloads.clone(),
        );
        for file in WatchedFile::ALL {
            for outcome in ["reloaded", "rejected"] {
                let _ =
                    secret_reloads.get_or_create(&[("file", file.as_str()), ("outcome", outcome)]);
            }
        }
        service.register(
            "loop_yields",
            "Times an event loop that had run out of tasks handed its core to other waiting \
             threads before it looked for events (runtime.yield_every)",
            crate::loop_yield::counter(),
        );
        let busy_poll_spins = Counter::default();
        service.register(
            "busy_poll_spins",
            "Sleeps of an event loop under load that busy polling spun through, or tried to \
             (runtime.busy_poll)",
            busy_poll_spins.clone(),
        );
        let busy_poll_missed = Counter::<f64, AtomicU64>::default();
        service.register_with_unit(
            "busy_poll_missed",
            "Time busy polling spun while its loop slept on past the spin's window: CPU spent \
             without saving a wake-up (capped at 10% of a core per loop)",
            Unit::Seconds,
            busy_poll_missed.clone(),
        );
        let busy_poll_in_force = Gauge::default();
        service.register(
            "busy_poll_in_force",
            "Event loops whose busy polling is in force: its trial found that spinning makes \
             answers faster (periods of 100 ms, one in ten a probe of the other mode)",
            busy_poll_in_force.clone(),
        );
        let busy_poll_probes = Counter::default();
        service.register(
            "busy_poll_probes",
            "Periods of 100 ms in which an event loop's busy polling ran the mode not in force, \
             to find out whether spinning makes answers faster",
            busy_poll_probes.clone(),
        );
        let nice = Gauge::default();
        service.register(
            "scheduling_nice",
            "The nice value the sidecar's threads run at: runtime.nice where the process may \
             raise its priority, else the one it was started with",
            nice.clone(),
        );
        let read_ahead = Gauge::default();
        pool.register_with_unit(
            "upstream_read_ahead",
            "Bytes of HTTP/1.1 relay answers read ahead of slow clients and not yet taken by them \
             (bounded by upstream.http1_read_ahead_total_bytes plus one piece per answer)",
            Unit::Bytes,
            read_ahead.clone(),
        );
        let relay_request_limit = Gauge::default();
        pool.register(
            "upstream_relay_request_limit",
            "Requests after which the relay rotates each connection (nginx keepalive_requests), \
             learned from two rotations in a row; the pool dials each replacement a tenth \
             ahead and sends no connection more (0: not known)",
            relay_request_limit.clone(),
        );
        let waiting = Gauge::default();
        pool.register(
            "upstream_waiting_requests",
            "Requests waiting in line for a free relay connection (every connection busy: \
             pool.size x streams in flight); served first come, first served, each for at most \
             pool.request_timeout",
            waiting.clone(),
        );
        // Every known label value starts at zero, so rates have a baseline from the first scrape.
        for reason in RETRY_REASONS {
            let _ = retries.get_or_create(&[("reason", reason)]);
        }
        let attempt_success = attempt_duration
            .get_or_create(&[("outcome", "success")])
            .clone();
        let attempt_failure = attempt_duration
            .get_or_create(&[("outcome", "failure")])
            .clone();
        let attempt_refused = attempt_duration
            .get_or_create(&[("outcome", "refused")])
            .clone();
        for reason in ["connect", "timeout", "certificate"] {
            let _ = tls_handshake_failures.get_or_create(&[("reason", reason)]);
        }
        for reason in TripReason::ALL {
            let _ =
                breaker_transitions.get_or_create(&[("to", "open"), ("reason", reason.as_str())]);
        }
        for to in ["half_open", "closed"] {
            let _ = breaker_transitions.get_or_create(&[("to", to), ("reason", "recovered")]);
        }
        // Slot `i` is named by its connection id, `i + 1`, as in the status API.
        let slot_names = (1..=pool_size)
            .map(|id| &*Box::leak(id.to_string().into_boxed_str()))
            .collect();
        Metrics {
            inner: Arc::new(Inner {
                service,
                pool,
                requests,
                request_duration,
                wait_duration,
                retries,
                retry_budget_exhausted,
                in_flight,
                abandoned,
                client_connections,
                client_connections_total,
                upstream_connections,
                breaker_state,
                breaker_transitions,
                reconnects,
                slow_ejections,
                tls_handshakes,
                tls_handshake_failures,
                received_bytes,
                sent_bytes,
                upstream_latency_p95,
                read_ahead,
                relay_request_limit,
                waiting,
                secret_reloads,
                busy_poll_spins,
                busy_poll_missed,
                busy_poll_in_force,
                busy_poll_probes,
                nice,
                secure_buffers,
                locked_bytes,
                self_check_passed,
                slot_names,
                request_series: std::array::from_fn(|_| OnceLock::new()),
                attempt_success,
                attempt_failure,
                attempt_refused,
                answered: AtomicU64::new(0),
                answered_5xx: AtomicU64::new(0),
            }),
        }
    }

    pub fn request_finished(&self, method: &http::Method, status: u16, elapsed: Duration) {
        let i = &self.inner;
        let (m, s) = (method_index(method), status_index(status));
        i.request_series[m * STATUS_CLASSES.len() + s]
            .get_or_init(|| {
                i.requests
                    .get_or_create(&[
                        ("method", METHOD_CLASSES[m]),
                        ("status_class", STATUS_CLASSES[s]),
                    ])
                    .clone()
            })
            .inc();
        i.request_duration.observe(elapsed.as_secs_f64());
        i.answered.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            i.answered_5xx.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (client requests answered, of which 5xx) since start.
    pub fn answered(&self) -> (u64, u64) {
        (
            self.inner.answered.load(Ordering::Relaxed),
            self.inner.answered_5xx.load(Ordering::Relaxed),
        )
    }

    /// (retries, retries refused by the budget) since start.
    pub fn retries_total(&self) -> (u64, u64) {
        let r = &self.inner.retries;
        let retries = RETRY_REASONS
            .iter()
            .map(|reason| r.get_or_create(&[("reason", reason)]).get())
            .sum();
        (retries, self.inner.retry_budget_exhausted.get())
    }

    pub fn attempt(&self, outcome: AttemptOutcome, elapsed: Duration) {
        let histogram = match outcome {
            AttemptOutcome::Success => &self.inner.attempt_success,
            AttemptOutcome::Failure => &self.inner.attempt_failure,
            AttemptOutcome::Refused => &self.inner.attempt_refused,
        };
        histogram.observe(elapsed.as_secs_f64());
    }

    pub fn retry(&self, reason: &'static str) {
        self.inner
            .retries
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn retry_budget_exhausted(&self) {
        self.inner.retry_budget_exhausted.inc();
    }

    /// Counts a client request in flight until the returned guard is dropped. A guard
    /// dropped before [`InFlightRequest::answered`] (hyper dropped the request's future: an
    /// h2c client reset its stream, the client connection was cut off, so no code after the
    /// `.await` ran) counts the request as abandoned instead.
    pub fn request_started(&self) -> InFlightRequest<'_> {
        self.inner.in_flight.inc();
        InFlightRequest {
            metrics: self,
            answered: false,
        }
    }

    /// A request joins the pool's line for a free connection; its wait is observed in
    /// `upstream_wait_duration_seconds` when the returned guard is dropped.
    pub fn waiting_in_line(&self) -> LineWait<'_> {
        LineWait {
            metrics: self,
            started: std::time::Instant::now(),
        }
    }

    pub fn client_connection_opened(&self) {
        self.inner.client_connections.inc();
        self.inner.client_connections_total.inc();
    }

    pub fn client_connection_closed(&self) {
        self.inner.client_connections.dec();
    }

    pub fn breaker_transition(&self, to: BreakerState, reason: Option<TripReason>) {
        let reason = reason.map_or("recovered", TripReason::as_str);
        self.inner
            .breaker_transitions
            .get_or_create(&[("to", to.as_str()), ("reason", reason)])
            .inc();
    }

    /// A watched file was checked; counts changes (an unchanged file counts nothing).
    pub fn secret_reload(&self, file: WatchedFile, outcome: Reload) {
        let outcome = match outcome {
            Reload::Unchanged => return,
            Reload::Reloaded => "reloaded",
            Reload::Rejected => "rejected",
        };
        self.inner
            .secret_reloads
            .get_or_create(&[("file", file.as_str()), ("outcome", outcome)])
            .inc();
    }

    /// The nice value in effect (see `app::apply_priority`).
    pub fn set_nice(&self, nice: i32) {
        self.inner.nice.set(i64::from(nice));
    }

    /// An event loop's busy polling came into force (`true`) or went out of it.
    pub fn busy_poll_in_force(&self, on: bool) {
        if on {
            self.inner.busy_poll_in_force.inc();
        } else {
            self.inner.busy_poll_in_force.dec();
        }
    }

    /// An event loop's busy polling began a probe of the mode not in force.
    pub fn busy_poll_probe(&self) {
        self.inner.busy_poll_probes.inc();
    }

    /// An event loop busy-polled; `missed` of it waited for work that never came.
    pub fn busy_poll_spin(&self, missed: std::time::Duration) {
        self.inner.busy_poll_spins.inc();
        if !missed.is_zero() {
            self.inner.busy_poll_missed.inc_by(missed.as_secs_f64());
        }
    }

    pub fn reconnect(&self) {
        self.inner.reconnects.inc();
    }

    pub fn slow_ejection(&self) {
        self.inner.slow_ejections.inc();
    }

    /// A dial finished: `None` on success, else the failure reason.
    pub fn tls_handshake(&self, failure: Option<&'static str>) {
        match failure {
            None => {
                self.inner.tls_handshakes.inc();
            }
            Some(reason) => {
                self.inner
                    .tls_handshake_failures
                    .get_or_create(&[("reason", reason)])
                    .inc();
            }
        }
    }

    pub fn bytes(&self, received: u64, sent: u64) {
        if received > 0 {
            self.inner.received_bytes.inc_by(received);
        }
        if sent > 0 {
            self.inner.sent_bytes.inc_by(sent);
        }
    }

    fn refresh(&self, v: &ScrapeValues) {
        let i = &self.inner;
        for (slot, state) in &v.breakers {
            if let Some(name) = i.slot_names.get(*slot) {
                let value = match state {
                    BreakerState::Closed => 0,
                    BreakerState::HalfOpen => 1,
                    BreakerState::Open => 2,
                };
                i.breaker_state.get_or_create(&[("slot", name)]).set(value);
            }
        }
        for (slot, p95) in &v.p95_seconds {
            if let Some(name) = i.slot_names.get(*slot) {
                i.upstream_latency_p95
                    .get_or_create(&[("slot", name)])
                    .set(*p95);
            }
        }
        for (state, n) in &v.upstream_states {
            i.upstream_connections
                .get_or_create(&[("state", state)])
                .set(*n);
        }
        i.read_ahead.set(v.read_ahead_bytes);
        i.relay_request_limit.set(v.relay_request_limit);
        i.waiting.set(v.waiting_requests);
        i.secure_buffers.set(v.secure_buffers);
        i.locked_bytes.set(v.locked_bytes);
        if let Some(ok) = v.self_check_passed {
            i.self_check_passed.set(i64::from(ok));
        }
    }

    /// OpenMetrics text of every family (`pool_only`: the pool's families).
    pub fn encode(&self, values: &ScrapeValues, pool_only: bool) -> String {
        self.refresh(values);
        let mut out = String::with_capacity(8192);
        if !pool_only {
            let _ = encode_registry(&mut out, &self.inner.service);
        }
        let _ = encode_registry(&mut out, &self.inner.pool);
        let _ = encode_eof(&mut out);
        out
    }
}

/// The files the sidecar watches and re-reads (the `file` label of
/// `sprint_sidecar_secret_reloads_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchedFile {
    RelayToken,
    ClientIdentity,
    CaFile,
    AdminToken,
}

impl WatchedFile {
    pub const ALL: [WatchedFile; 4] = [
        WatchedFile::RelayToken,
        WatchedFile::ClientIdentity,
        WatchedFile::CaFile,
        WatchedFile::AdminToken,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WatchedFile::RelayToken => "relay_token",
            WatchedFile::ClientIdentity => "client_identity",
            WatchedFile::CaFile => "ca_file",
            WatchedFile::AdminToken => "admin_token",
        }
    }
}

/// The text format a scrape gets, from its `Accept` header.
///
/// `/metrics` is OpenMetrics unless the scraper asks for `text/plain` only (a header that
/// names neither format, or none, gets OpenMetrics). `/api/v1/secure-channel/metrics` is the
/// Prometheus text format unless the scraper names OpenMetrics, so `curl … | promtool check
/// metrics` works on it as is (SPEC §6). Prometheus itself names both and gets OpenMetrics.
pub fn wants_openmetrics(accept: &str, openmetrics_by_default: bool) -> bool {
    if accept.contains("application/openmetrics-text") {
        return true;
    }
    openmetrics_by_default && !accept.contains("text/plain")
}

/// Converts OpenMetrics text to the Prometheus text format 0.0.4 for scrapers that ask
/// for `text/plain` only: counters are typed under their `_total` sample name, `# UNIT`
/// and `# EOF` lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some("counter")) = (parts.next(), parts.next()) {
                counters.insert(name.to_string());
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let rewritten = if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().unwrap_or_default();
            let kind = parts.next().unwrap_or_default();
            if counters.contains(name) {
                format!("# TYPE {name}_total counter")
            } else {
                format!("# TYPE {name} {kind}")
            }
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                format!("# HELP {name}_total {help}")
            } else {
                line.to_string()
            }
        } else {
            line.to_string()
        };
        out.push_str(&rewritten);
        out.push('\n');
    }
    out
}

/// One client request counted in flight ([`Metrics::request_started`]).
#[must_use = "the request is counted out when this is dropped"]
pub struct InFlightRequest<'a> {
    metrics: &'a Metrics,
    answered: bool,
}

impl InFlightRequest<'_> {
    /// The request is answered: counted in `requests` by method and status class.
    pub fn answered(mut self, method: &http::Method, status: u16, elapsed: Duration) {
        self.answered = true;
        self.metrics.request_finished(method, status, elapsed);
    }
}

impl Drop for InFlightRequest<'_> {
    fn drop(&mut self) {
        self.metrics.inner.in_flight.dec();
        if !self.answered {
            self.metrics.inner.abandoned.inc();
        }
    }
}

/// One request's wait in the pool's line ([`Metrics::waiting_in_line`]), however it ends.
#[must_use = "the wait is observed when this is dropped"]
pub struct LineWait<'a> {
    metrics: &'a Metrics,
    started: std::time::Instant,
}

impl Drop for LineWait<'_> {
    fn drop(&mut self) {
        self.metrics
            .inner
            .wait_duration
            .observe(self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_counted_answered_or_abandoned_and_never_left_in_flight() {
        let m = Metrics::new(1);
        let answered = m.request_started();
        let abandoned = m.request_started();
        let text = m.encode(&ScrapeValues::default(), false);
        assert!(
            text.contains("sprint_sidecar_in_flight_requests 2"),
            "{text}"
        );
        answered.answered(&http::Method::POST, 200, Duration::from_millis(1));
        drop(abandoned);
        let text = m.encode(&ScrapeValues::default(), false);
        assert!(
            text.contains("sprint_sidecar_in_flight_requests 0"),
            "{text}"
        );
        assert!(
            text.contains("sprint_sidecar_requests_abandoned_total 1"),
            "{text}"
        );
        assert!(
            text.contains("sprint_sidecar_requests_total{method=\"POST\",status_class=\"2xx\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn families_are_named_with_prefix_and_units() {
        let m = Metrics::new(2);
        m.request_finished(&http::Method::POST, 200, Duration::from_millis(3));
        m.attempt(AttemptOutcome::Success, Duration::from_millis(2));
        m.attempt(AttemptOutcome::Refused, Duration::from_millis(1));
        let values = ScrapeValues {
            breakers: vec![(0, BreakerState::Closed), (1, BreakerState::Open)],
            ..ScrapeValues::default()
        };
        let text = m.encode(&values, false);
        assert!(
            text.contains("sprint_sidecar_requests_total{method=\"POST\",status_class=\"2xx\"} 1"),
            "{text}"
        );
        assert!(text.contains("# UNIT sprint_sidecar_request_duration_seconds seconds"));
        for (outcome, count) in [("success", 1), ("failure", 0), ("refused", 1)] {
            let line = format!(
                "sprint_sidecar_upstream_attempt_duration_seconds_count{{outcome=\"{outcome}\"}} {count}"
            );
            assert!(text.contains(&line), "{line}\n{text}");
        }
        // Index 1 is connection 2: labels carry the status API's connection ids.
        assert!(text.contains("sprint_sidecar_upstream_breaker_state{slot=\"1\"} 0"));
        assert!(text.contains("sprint_sidecar_upstream_breaker_state{slot=\"2\"} 2"));
        assert!(!text.contains("slot=\"0\""), "{text}");
        assert!(text.contains("sprint_sidecar_build_info{version="));
        assert!(text.ends_with("# EOF\n"));
        let pool = m.encode(&values, true);
        assert!(pool.contains("sprint_sidecar_upstream_breaker_state"));
        assert!(!pool.contains("sprint_sidecar_requests_total"));
    }

    #[test]
    fn prometheus_text_has_no_openmetrics_only_lines() {
        let m = Metrics::new(1);
        m.reconnect();
        let text = to_prometheus_text(&m.encode(&ScrapeValues::default(), false));
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("# UNIT"));
        assert!(text.contains("# TYPE sprint_sidecar_upstream_reconnects_total counter"));
        assert!(text.contains("# TYPE sprint_sidecar_build_info gauge"));
    }

    #[test]
    fn the_accept_header_picks_the_format() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for default in [true, false] {
            assert!(wants_openmetrics(prometheus, default));
            assert!(wants_openmetrics("application/openmetrics-text", default));
            assert!(!wants_openmetrics("text/plain", default));
            assert!(!wants_openmetrics("text/plain;version=0.0.4", default));
            assert_eq!(wants_openmetrics("", default), default);
            assert_eq!(wants_openmetrics("*/*", default), default);
        }
    }

    #[test]
    fn label_values_are_bounded() {
        assert_eq!(
            method_class(&http::Method::from_bytes(b"BREW").unwrap()),
            "OTHER"
        );
        assert_eq!(status_class(599), "5xx");
        assert_eq!(status_class(204), "2xx");
    }
}
