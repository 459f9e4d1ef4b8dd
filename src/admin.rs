//! The admin listener (`admin.address`): JSON status API, Prometheus metrics, probes, the
//! OpenAPI document, the docs portal and the live dashboard.
//!
//! | path | answer |
//! |---|---|
//! | `GET /health` | 200 `{"status":"ok"}` while the process serves (liveness) |
//! | `GET /ready` | 200 when a relay connection is usable, else 503 (follows the pool) |
//! | `GET /api/v1/status` | service summary |
//! | `GET /api/v1/secure-channel/status` | pool status with every connection |
//! | `GET /api/v1/secure-channel/health` | 200 / 503 with the reason |
//! | `GET /api/v1/secure-channel/connections[/{id}]` | connections; 404 unknown id, 400 malformed |
//! | `GET /api/v1/secure-channel/stats` | aggregates since start |
//! | `GET /api/v1/secure-channel/metrics` | the pool's families (Prometheus text, or OpenMetrics on request) |
//! | `GET /api/v1/memory-protection/status` | secret-memory protection |
//! | `GET /api/v1/memory-protection/self-check` | kernel-verified checks; 200 / 503 |
//! | `GET /metrics` | every family (OpenMetrics, or Prometheus text on request) |
//! | `GET /openapi.json`, `/docs`, `/dashboard` | API description, portal, live view |

pub mod documents;
pub mod sampler;
pub mod token;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::config::Config;
use crate::metrics::{Metrics, ScrapeValues, to_prometheus_text};
use crate::proxy::client_io;
use crate::response::{json, json_error, rfc3339};
use crate::upstream::breaker::BreakerState;
use crate::upstream::pool::{Pool, SlotSnapshot, SlotState};
use documents::*;
use sampler::Sampler;

const OPENAPI: &str = include_str!("admin/openapi.json");
const DOCS_HTML: &str = include_str!("admin/docs.html");
const DASHBOARD_HTML: &str = include_str!("admin/dashboard.html");
/// The pages are self-contained: inline script and style only, API calls to this origin only.
const PAGE_CSP: &str = concat!(
    "default-src 'none'; ",
    "script-src 'unsafe-inline'; style-src 'unsafe-inline'; ", // inline only, nothing remote
    "connect-src 'self'; img-src 'self' data:",
);

/// What the memory-protection endpoints report; implemented over `hardening` by `app`.
pub trait MemoryReport: Send + Sync {
    /// The `/api/v1/memory-protection/status` document.
    fn status(&self) -> serde_json::Value;
    /// Runs the self-check now: (all passed, the report document).
    fn self_check(&self) -> (bool, serde_json::Value);
    /// (secure buffers, locked bytes) for metrics.
    fn buffers(&self) -> (i64, i64);
}

/// Checks an admin bearer token in constant time.
pub type TokenCheck = Box<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// Everything the admin handlers read.
pub struct AdminState {
    pub pool: Arc<Pool>,
    pub cfg: Arc<Config>,
    pub metrics: Metrics,
    pub sampler: Arc<Sampler>,
    pub memory: Arc<dyn MemoryReport>,
    pub token: Option<TokenCheck>,
    /// False once shutdown has begun: readiness turns false first.
    pub serving: Arc<AtomicBool>,
    pub started: SystemTime,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// How long an admin client may take to send a request head (then 408), and how long a
/// kept-alive admin connection may wait for its next request.
const ADMIN_TIMEOUTS: client_io::Timeouts = client_io::Timeouts {
    header: Duration::from_secs(10),
    idle: Duration::from_secs(75),
};

/// Serves the admin API until shutdown.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: watch::Receiver<bool>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = shutdown;
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = crate::shutdown::triggered(&mut stop) => break,
        };
        let s = state.clone();
        // The same socket wrapper as the data listener: hyper's own errors answer JSON.
        let exchange = Arc::new(client_io::Exchange::default());
        let seen = exchange.clone();
        let service = service_fn(move |req: Request<hyper::body::Incoming>| {
            // Done when the answer is made (admin answers are small and whole).
            let started = seen.request_started();
            let s = s.clone();
            async move {
                let answer = route(&s, req.method(), req.uri(), req.headers());
                drop(started);
                Ok::<_, Infallible>(answer)
            }
        });
        let io = client_io::ClientIo::new(stream, exchange.clone(), None, ADMIN_TIMEOUTS);
        let conn = graceful.watch(
            builder
                .serve_connection(TokioIo::new(io), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "admin connection error");
            }
            client_io::finish(&exchange, ADMIN_TIMEOUTS.header).await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(2), graceful.shutdown()).await;
}

/// Routes one admin request; a plain function of the state, testable without a socket.
pub fn route(
    state: &AdminState,
    method: &Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> Response<Full<Bytes>> {
    let path = uri.path();
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    // Under /api/v1/ a missing or wrong token is answered first, so an unknown path does not
    // tell a caller without the token which paths exist; a CORS preflight (OPTIONS, sent
    // without credentials) of a known path is the one exception.
    let guarded = path == "/api/v1" || path.starts_with("/api/v1/");
    let preflight = method == Method::OPTIONS && is_known(path);
    let mut resp = if guarded && !preflight && !authorized(state, headers) {
        let mut r = json_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this endpoint needs Authorization: Bearer <admin token>",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    } else if !is_known(path) {
        json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no admin endpoint at {path}"),
        )
    } else if method == Method::OPTIONS {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NO_CONTENT;
        r.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, OPTIONS"),
        );
        r
    } else if method != Method::GET && method != Method::HEAD {
        let mut r = json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("{method} is not allowed on {path}; use GET"),
        );
        r.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, OPTIONS"),
        );
        r
    } else {
        get(state, path, headers)
    };
    cors(state, headers, &mut resp);
    resp
}

const EXACT_PATHS: [&str; 14] = [
    "/health",
    "/ready",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/dashboard",
    "/api/v1/status",
    "/api/v1/secure-channel/status",
    "/api/v1/secure-channel/health",
    "/api/v1/secure-channel/connections",
    "/api/v1/secure-channel/stats",
    "/api/v1/secure-channel/metrics",
    "/api/v1/memory-protection/status",
    "/api/v1/memory-protection/self-check",
];

fn is_known(path: &str) -> bool {
    EXACT_PATHS.contains(&path)
        || path
            .strip_prefix("/api/v1/secure-channel/connections/")
            .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

fn authorized(state: &AdminState, headers: &http::HeaderMap) -> bool {
    let Some(check) = &state.token else {
        return true;
    };
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    bearer_credentials(value.as_bytes()).is_some_and(check)
}

/// The credentials of a `Bearer` authorization value: the scheme in any case, then one or
/// more spaces (RFC 9110 §11.4), then the token; `None` for another scheme or no token.
fn bearer_credentials(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    let start = rest.iter().position(|&b| b != b' ')?;
    Some(&rest[start..])
}

fn cors(state: &AdminState, headers: &http::HeaderMap, resp: &mut Response<Full<Bytes>>) {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return;
    };
    let allowed = state
        .cfg
        .admin
        .cors_allowed_origins
        .iter()
        .any(|o| o == "*" || o.as_bytes() == origin.as_bytes());
    if allowed {
        resp.headers_mut()
            .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        resp.headers_mut().insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization"),
        );
        resp.headers_mut()
            .insert(header::VARY, HeaderValue::from_static("Origin"));
    }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn html(body: &'static str) -> Response<Full<Bytes>> {
    let mut r = text(
        StatusCode::OK,
        "text/html; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    );
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_CSP),
    );
    r.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn get(state: &AdminState, path: &str, headers: &http::HeaderMap) -> Response<Full<Bytes>> {
    match path {
        "/health" => json(StatusCode::OK, &serde_json::json!({ "status": "ok" })),
        "/ready" => {
            let doc = readiness(state);
            let status = if doc.status == "ok" {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, &doc)
        }
        "/metrics" => metrics_response(state, headers, false),
        "/api/v1/secure-channel/metrics" => metrics_response(state, headers, true),
        "/openapi.json" => text(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(OPENAPI.as_bytes()),
        ),
        "/docs" => html(DOCS_HTML),
        "/dashboard" => html(DASHBOARD_HTML),
        "/api/v1/status" => json(StatusCode::OK, &service_status(state)),
        "/api/v1/secure-channel/status" => json(StatusCode::OK, &pool_status(state)),
        "/api/v1/secure-channel/health" => {
            let doc = pool_health(state);
            let status = if doc.status == "ok" {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, &doc)
        }
        "/api/v1/secure-channel/connections" => {
            let connections = connection_statuses(state);
            json(StatusCode::OK, &ConnectionList { connections })
        }
        "/api/v1/secure-channel/stats" => json(StatusCode::OK, &pool_stats(state)),
        "/api/v1/memory-protection/status" => json(StatusCode::OK, &state.memory.status()),
        "/api/v1/memory-protection/self-check" => {
            let (ok, doc) = state.memory.self_check();
            json(
                if ok {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                },
                &doc,
            )
        }
        _ => match path.strip_prefix("/api/v1/secure-channel/connections/") {
            Some(id) => connection_by_id(state, id),
            None => json_error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no admin endpoint at {path}"),
            ),
        },
    }
}

/// How a connection id in a path reads: decimal digits only (no sign, no spaces).
#[derive(Debug, PartialEq, Eq)]
enum ConnectionId {
    /// A positive id that fits in 64 bits.
    Id(u64),
    /// Digits naming a positive number no connection can have (more than 64 bits).
    OutOfRange,
    /// Anything else, zero included (ids start at 1).
    Malformed,
}

fn parse_connection_id(id: &str) -> ConnectionId {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return ConnectionId::Malformed;
    }
    match id.parse::<u64>() {
        Ok(0) => ConnectionId::Malformed,
        Ok(n) => ConnectionId::Id(n),
        Err(_) if id.bytes().any(|b| b != b'0') => ConnectionId::OutOfRange,
        Err(_) => ConnectionId::Malformed,
    }
}

fn connection_by_id(state: &AdminState, id: &str) -> Response<Full<Bytes>> {
    let found = match parse_connection_id(id) {
        ConnectionId::Malformed => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("connection id must be a positive decimal integer, got {id:?}"),
            );
        }
        ConnectionId::OutOfRange => None,
        ConnectionId::Id(n) => connection_statuses(state)
            .into_iter()
            .find(|c| c.connection_id == n),
    };
    match found {
        Some(c) => json(StatusCode::OK, &c),
        None => json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!(
                "no connection with id {id} (ids are 1..={})",
                state.cfg.pool.size
            ),
        ),
    }
}

fn metrics_response(
    state: &AdminState,
    headers: &http::HeaderMap,
    pool_only: bool,
) -> Response<Full<Bytes>> {
    let snapshot = state.pool.snapshot();
    // The self-check runs now, before the buffers are counted: its scratch buffer is gone.
    let self_check_passed = (!pool_only).then(|| state.memory.self_check().0);
    let (buffers, locked) = state.memory.buffers();
    let mut states: Vec<(&'static str, i64)> =
        SlotState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    for s in &snapshot {
        if let Some(e) = states.iter_mut().find(|(n, _)| *n == s.state.as_str()) {
            e.1 += 1;
        }
    }
    let values = ScrapeValues {
        breakers: snapshot.iter().map(|s| (s.index, s.breaker)).collect(),
        p95_seconds: snapshot
            .iter()
            .map(|s| (s.index, s.histogram.quantile_ms(0.95) / 1000.0))
            .collect(),
        upstream_states: states,
        secure_buffers: buffers,
        locked_bytes: locked,
        self_check_passed,
        read_ahead_bytes: i64::try_from(state.pool.read_ahead_bytes()).unwrap_or(i64::MAX),
        relay_request_limit: state
            .pool
            .relay_request_limit()
            .map_or(0, |l| i64::try_from(l).unwrap_or(i64::MAX)),
        waiting_requests: i64::try_from(state.pool.waiting_requests()).unwrap_or(i64::MAX),
    };
    let openmetrics = state.metrics.encode(&values, pool_only);
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if crate::metrics::wants_openmetrics(accept, !pool_only) {
        text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            openmetrics,
        )
    } else {
        text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            to_prometheus_text(&openmetrics),
        )
    }
}

fn readiness(state: &AdminState) -> HealthDocument {
    let pool_size = state.cfg.pool.size.get();
    let active = state.pool.active_connections();
    if !state.serving.load(Ordering::Acquire) {
        return HealthDocument {
            status: "unavailable",
            reason: "shutting down".into(),
            active_connections: active,
            pool_size,
        };
    }
    if !state.cfg.admin.ready_requires_upstream {
        return HealthDocument {
            status: "ok",
            reason: "serving (admin.ready_requires_upstream = false)".into(),
            active_connections: active,
            pool_size,
        };
    }
    pool_health(state)
}

fn pool_health(state: &AdminState) -> HealthDocument {
    let pool_size = state.cfg.pool.size.get();
    let snapshot = state.pool.snapshot();
    let active = snapshot.iter().filter(|s| s.is_healthy).count();
    if active > 0 {
        return HealthDocument {
            status: "ok",
            reason: format!("{active} of {pool_size} relay connections usable"),
            active_connections: active,
            pool_size,
        };
    }
    // The relay closed a connection that had served (a routine rotation) and its
    // replacement is being dialed: requests wait for it, so the pool is not down.
    if snapshot.iter().any(|s| s.replacing) {
        return HealthDocument {
            status: "ok",
            reason: "a relay connection the relay closed after serving is being replaced; \
                     requests wait for it"
                .into(),
            active_connections: 0,
            pool_size,
        };
    }
    let open = snapshot
        .iter()
        .filter(|s| s.breaker == BreakerState::Open)
        .count();
    let last_error = snapshot.iter().find_map(|s| s.last_error.clone());
    let reason = if open == pool_size {
        "every connection's circuit breaker is open".to_string()
    } else {
        match last_error {
            Some(e) => format!("no relay connection is usable: {e}"),
            None => "no relay connection is established yet".to_string(),
        }
    };
    HealthDocument {
        status: "unavailable",
        reason,
        active_connections: 0,
        pool_size,
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn connection_status(s: &SlotSnapshot) -> ConnectionStatus {
    ConnectionStatus {
        connection_id: s.id,
        protocol: s.protocol,
        state: s.state.as_str(),
        connected_since: s.connected_since.map(rfc3339),
        last_activity: s.last_activity.map(rfc3339),
        in_flight: s.in_flight,
        requests_total: s.requests,
        errors: s.errors,
        reconnects: s.reconnects,
        p50_latency_ms: round3(s.histogram.quantile_ms(0.50)),
        p95_latency_ms: round3(s.histogram.quantile_ms(0.95)),
        p99_latency_ms: round3(s.histogram.quantile_ms(0.99)),
        ewma_latency_ms: round3(s.ewma_ms),
        last_ping_rtt_ms: s.ping_rtt.map(ms),
        is_healthy: s.is_healthy,
        circuit_breaker: s.breaker.as_str(),
        breaker: BreakerStatus {
            state: s.breaker.as_str(),
            trip_reason: s.trip_reason.map(|r| r.as_str()),
            time_in_state_ms: ms(s.time_in_state),
            transitions: s.transitions,
            last_transition: s.last_transition.map(rfc3339),
            retry_after_seconds: s.retry_after.map(|d| d.as_secs_f64().ceil() as u64),
        },
    }
}

fn connection_statuses(state: &AdminState) -> Vec<ConnectionStatus> {
    state
        .pool
        .snapshot()
        .iter()
        .map(connection_status)
        .collect()
}

fn pool_state(snapshot: &[SlotSnapshot]) -> &'static str {
    let healthy = snapshot.iter().filter(|s| s.is_healthy).count();
    if healthy == 0 {
        "unavailable"
    } else if healthy == snapshot.len() {
        "healthy"
    } else {
        "degraded"
    }
}

fn pool_status(state: &AdminState) -> PoolStatus {
    let snapshot = state.pool.snapshot();
    let h = state.pool.histogram();
    let healthy = snapshot.iter().filter(|s| s.is_healthy).count();
    PoolStatus {
        endpoint: state.cfg.upstream.endpoint.to_string(),
        server_name: state.cfg.upstream.server_name.clone(),
        status: pool_state(&snapshot),
        pool_healthy: healthy > 0,
        pool_size: snapshot.len(),
        active_connections: healthy,
        total_reconnects: snapshot.iter().map(|s| s.reconnects).sum(),
        total_errors: snapshot.iter().map(|s| s.errors).sum(),
        total_requests: snapshot.iter().map(|s| s.requests).sum(),
        pool_p50_latency_ms: round3(h.quantile_ms(0.50)),
        pool_p95_latency_ms: round3(h.quantile_ms(0.95)),
        pool_p99_latency_ms: round3(h.quantile_ms(0.99)),
        connections: snapshot.iter().map(connection_status).collect(),
        last_updated: rfc3339(SystemTime::now()),
    }
}

fn pool_stats(state: &AdminState) -> PoolStats {
    let snapshot = state.pool.snapshot();
    let h = state.pool.histogram();
    let requests: u64 = snapshot.iter().map(|s| s.requests).sum();
    let errors: u64 = snapshot.iter().map(|s| s.errors).sum();
    let (bytes_sent, bytes_received) = state.pool.byte_totals();
    let recent = state.sampler.recent();
    PoolStats {
        requests,
        errors,
        error_rate: if requests == 0 {
            0.0
        } else {
            round3(errors as f64 / requests as f64)
        },
        retries: recent.retries,
        retry_budget_exhausted: recent.retry_budget_exhausted,
        latency_ms: LatencySummary {
            p50: round3(h.quantile_ms(0.50)),
            p95: round3(h.quantile_ms(0.95)),
            p99: round3(h.quantile_ms(0.99)),
            avg: round3(h.mean_ms()),
        },
        bytes_sent,
        bytes_received,
        breaker_transitions: snapshot.iter().map(|s| s.transitions).sum(),
        reconnects: snapshot.iter().map(|s| s.reconnects).sum(),
        uptime_seconds: round3(
            SystemTime::now()
                .duration_since(state.started)
                .unwrap_or_default()
                .as_secs_f64(),
        ),
    }
}

/// `2h30m15s` style.
fn human_uptime(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

fn service_status(state: &AdminState) -> ServiceStatus {
    let snapshot = state.pool.snapshot();
    let h = state.pool.histogram();
    let healthy = snapshot.iter().filter(|s| s.is_healthy).count();
    let open = snapshot
        .iter()
        .filter(|s| s.breaker != BreakerState::Closed)
        .count();
    let recent = state.sampler.recent();
    let memory = state.memory.status();
    let memory_ok = memory
        .get("enabled")
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
        && !memory
            .get("degraded")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
    let uptime = SystemTime::now()
        .duration_since(state.started)
        .unwrap_or_default();
    let capacity: usize = snapshot.iter().map(|s| s.capacity).sum();
    let in_flight: u64 = snapshot.iter().map(|s| s.in_flight).sum();
    let pool_state = pool_state(&snapshot);
    ServiceStatus {
        service: "sprint-sidecar",
        status: if healthy == 0 {
            "unavailable"
        } else if pool_state == "healthy" && memory_ok {
            "ok"
        } else {
            "degraded"
        },
        version: env!("CARGO_PKG_VERSION"),
        timestamp: rfc3339(SystemTime::now()),
        uptime: human_uptime(uptime),
        uptime_seconds: round3(uptime.as_secs_f64()),
        memory_protection: memory,
        secure_channel: SecureChannelSummary {
            status: pool_state,
            pool_healthy: healthy > 0,
            active_connections: healthy,
            error_rate: round3(recent.error_rate * 100.0),
            avg_latency_ms: round3(h.mean_ms()),
            reconnects_total: snapshot.iter().map(|s| s.reconnects).sum(),
            circuit_breaker_status: if open == 0 {
                "closed"
            } else if open == snapshot.len() {
                "open"
            } else {
                "partially_open"
            },
        },
        performance: Performance {
            connection_pool_utilization: if capacity == 0 {
                0.0
            } else {
                round3(in_flight as f64 * 100.0 / capacity as f64)
            },
            avg_response_time_ms: round3(h.mean_ms()),
            error_rate_percent: round3(recent.error_rate * 100.0),
            requests_per_second: round3(recent.requests_per_second),
            memory_usage_mb: round3(sampler::rss_bytes() as f64 / (1024.0 * 1024.0)),
            cpu_usage_percent: round3(recent.cpu_percent),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_credentials_take_the_scheme_in_any_case_and_one_or_more_spaces() {
        assert_eq!(bearer_credentials(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_credentials(b"bEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_credentials(b"Bearer   abc"), Some(&b"abc"[..]));
        for refused in [
            &b"Bearer"[..],
            b"Bearer ",
            b"Bearer    ",
            b"Bearerabc",
            b"Basic abc",
            b"abc",
            b"",
        ] {
            assert_eq!(bearer_credentials(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn connection_ids_are_positive_decimal_digits() {
        assert_eq!(parse_connection_id("1"), ConnectionId::Id(1));
        assert_eq!(parse_connection_id("007"), ConnectionId::Id(7));
        assert_eq!(
            parse_connection_id("18446744073709551615"),
            ConnectionId::Id(u64::MAX)
        );
        assert_eq!(
            parse_connection_id("99999999999999999999999"),
            ConnectionId::OutOfRange
        );
        for malformed in [
            "", "0", "000", "+1", "-1", "1.5", " 1", "1 ", "abc", "0x1", "١",
        ] {
            assert_eq!(
                parse_connection_id(malformed),
                ConnectionId::Malformed,
                "{malformed:?}"
            );
        }
    }
}
