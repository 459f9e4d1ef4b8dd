//! `sprint-sidecar status`: asks a running sidecar's admin API for the pool and prints it as an
//! aligned table (or, with `--json`, the raw document), answering whether the pool is healthy.
//!
//! ```text
//!  status_cli::run ──GET /api/v1/secure-channel/status──▶ admin listener   (pool + connections)
//!                  ──GET /api/v1/status──────────────────▶ admin listener   (rates, version; optional)
//! ```
//!
//! It reads the documents through its own tolerant structs (unknown fields ignored, missing ones
//! defaulted), so it keeps working against a sidecar one version ahead or behind. Plain HTTP only:
//! the admin listener does not speak TLS.

use std::fmt;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

/// The admin address used when `--admin` is not given (SPEC §4 `admin.address`).
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:9091";

/// Time allowed for the TCP connection to the admin listener.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed for one request, from sending it to the last byte of the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest document accepted; a pool status is a few KiB even with hundreds of connections.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

const POOL_STATUS_PATH: &str = "/api/v1/secure-channel/status";
const SERVICE_STATUS_PATH: &str = "/api/v1/status";

/// Fetches the pool status from the admin API at `admin_url` and prints it to stdout: a table
/// with a summary line, or with `json` the document exactly as the sidecar sent it. `token` is
/// sent as `Authorization: Bearer` (needed when the sidecar has `admin.token_file`).
///
/// Returns whether the pool is healthy (at least one usable connection); the caller exits 1
/// when it is not.
///
/// # Errors
/// When the URL is invalid, the sidecar cannot be reached or times out, answers with an error
/// status (401 included) or with a document that is not a pool status, or stdout is closed.
pub async fn run(
    admin_url: &str,
    json: bool,
    token: Option<String>,
) -> Result<bool, StatusCliError> {
    let target = Target::parse(admin_url)?;
    let token = token.as_deref().map(str::trim).filter(|t| !t.is_empty());

    let raw_pool = fetch(&target, POOL_STATUS_PATH, token).await?;
    let pool: PoolView = serde_json::from_slice(&raw_pool).map_err(|e| {
        StatusCliError::new(
            Kind::Decode,
            format!(
                "{}{POOL_STATUS_PATH}: not a pool status document: {e}",
                target.base
            ),
        )
    })?;
    let healthy = pool.is_healthy();

    let output = if json {
        let mut text = String::from_utf8_lossy(&raw_pool).into_owned();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text
    } else {
        // The service summary adds request and error rates; the table stands without it.
        let service = match fetch(&target, SERVICE_STATUS_PATH, token).await {
            Ok(raw) => serde_json::from_slice::<ServiceView>(&raw).ok(),
            Err(_) => None,
        };
        render(&pool, service.as_ref())
    };

    let mut stdout = io::stdout().lock();
    stdout
        .write_all(output.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| StatusCliError::new(Kind::Output, format!("writing to stdout: {e}")))?;
    Ok(healthy)
}

/// Reads the admin bearer token for `--token-file`: the file's content without surrounding
/// whitespace.
///
/// # Errors
/// When the file cannot be read or is empty; the message names the file, never its content.
pub fn read_token_file(path: &Path) -> Result<String, StatusCliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        StatusCliError::new(Kind::Token, format!("--token-file {}: {e}", path.display()))
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(StatusCliError::new(
            Kind::Token,
            format!("--token-file {}: the file is empty", path.display()),
        ));
    }
    Ok(token.to_owned())
}

// ---------------------------------------------------------------------------------------
// Errors

/// Why `status` could not produce an answer. The caller prints it and exits 2.
#[derive(Debug)]
pub struct StatusCliError {
    kind: Kind,
    message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    InvalidUrl,
    Connect,
    Timeout,
    Http,
    Unauthorized,
    Status,
    Decode,
    Token,
    Output,
}

impl StatusCliError {
    fn new(kind: Kind, message: String) -> Self {
        Self { kind, message }
    }

    /// `--admin` is not a usable `http://host:port` URL.
    pub fn is_invalid_url(&self) -> bool {
        self.kind == Kind::InvalidUrl
    }

    /// The admin listener could not be reached (refused, unreachable, name not resolved).
    pub fn is_connect(&self) -> bool {
        self.kind == Kind::Connect
    }

    /// Connecting or the request took longer than allowed.
    pub fn is_timeout(&self) -> bool {
        self.kind == Kind::Timeout
    }

    /// The sidecar requires a bearer token and none or a wrong one was sent (401).
    pub fn is_unauthorized(&self) -> bool {
        self.kind == Kind::Unauthorized
    }
}

impl fmt::Display for StatusCliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StatusCliError {}

// ---------------------------------------------------------------------------------------
// HTTP

/// Where the admin API is: the address to dial, the `Host` header, and a path prefix for a
/// sidecar published behind a reverse proxy under a sub-path.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
    authority: String,
    prefix: String,
    /// The URL as given, normalised, for messages.
    base: String,
}

impl Target {
    /// Accepts `http://host[:port][/prefix]`, or `host:port` without a scheme.
    fn parse(admin_url: &str) -> Result<Self, StatusCliError> {
        let invalid = |why: &str| {
            StatusCliError::new(Kind::InvalidUrl, format!("--admin {admin_url:?}: {why}"))
        };
        let trimmed = admin_url.trim();
        let with_scheme = if trimmed.contains("://") {
            trimmed.to_owned()
        } else {
            format!("http://{trimmed}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|e| invalid(&format!("not a URL ({e})")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(invalid("the admin listener speaks plain HTTP; use http://"));
            }
            _ => return Err(invalid("expected an http:// URL")),
        }
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid(
                "credentials in the URL are not supported; use --token-file",
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let port = authority.port_u16().unwrap_or(80);
        if uri.query().is_some() {
            return Err(invalid("a query string is not expected"));
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(Self {
            base: format!("http://{}{}", authority.as_str(), prefix),
            host,
            port,
            authority: authority.as_str().to_owned(),
            prefix,
        })
    }
}

/// GETs `path` and returns the body of a 2xx answer; error answers become errors that carry the
/// sidecar's `{"error", "detail"}` text.
async fn fetch(target: &Target, path: &str, token: Option<&str>) -> Result<Bytes, StatusCliError> {
    let url = format!("{}{path}", target.base);
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange(target, path, token, &url)).await {
        Ok(result) => result,
        Err(_) => Err(StatusCliError::new(
            Kind::Timeout,
            format!(
                "{url}: no complete answer within {}",
                humantime::format_duration(REQUEST_TIMEOUT)
            ),
        )),
    }
}

async fn exchange(
    target: &Target,
    path: &str,
    token: Option<&str>,
    url: &str,
) -> Result<Bytes, StatusCliError> {
    let stream = connect(target, url).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| {
                StatusCliError::new(Kind::Http, format!("{url}: HTTP handshake failed: {e}"))
            })?;
    // Drives the connection until the answer is read; aborted on return, whatever happened.
    let driver = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));

    let mut request = Request::get(format!("{}{path}", target.prefix))
        .header(header::HOST, &target.authority)
        .header(header::ACCEPT, "application/json")
        .header(
            header::USER_AGENT,
            concat!("sprint-sidecar-status/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(Empty::<Bytes>::new()).map_err(|e| {
        StatusCliError::new(
            Kind::InvalidUrl,
            format!("{url}: cannot build the request: {e}"),
        )
    })?;

    let response = sender
        .send_request(request)
        .await
        .map_err(|e| StatusCliError::new(Kind::Http, format!("{url}: request failed: {e}")))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            StatusCliError::new(Kind::Http, format!("{url}: reading the answer failed: {e}"))
        })?
        .to_bytes();
    drop(driver);

    // A sidecar may answer a status document with 503 while the pool is down: it is still the
    // document asked for, not an error, as long as it is not an `{"error", "detail"}` body.
    if status.is_success()
        || (status == StatusCode::SERVICE_UNAVAILABLE && !is_error_document(&body))
    {
        return Ok(body);
    }
    let detail = error_detail(&body);
    if status == StatusCode::UNAUTHORIZED {
        let hint = if token.is_some() {
            "the token was refused"
        } else {
            "the sidecar requires a token; pass --token-file"
        };
        return Err(StatusCliError::new(
            Kind::Unauthorized,
            format!("{url}: 401 Unauthorized: {hint}{detail}"),
        ));
    }
    Err(StatusCliError::new(
        Kind::Status,
        format!("{url}: answered {status}{detail}"),
    ))
}

async fn connect(target: &Target, url: &str) -> Result<TcpStream, StatusCliError> {
    let dial = async {
        // Literal addresses skip the resolver; names go through tokio's lookup.
        match target.host.parse::<std::net::IpAddr>() {
            Ok(ip) => TcpStream::connect(SocketAddr::new(ip, target.port)).await,
            Err(_) => TcpStream::connect((target.host.as_str(), target.port)).await,
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(StatusCliError::new(
            Kind::Connect,
            format!("{url}: cannot connect to the admin API: {e}"),
        )),
        Err(_) => Err(StatusCliError::new(
            Kind::Timeout,
            format!(
                "{url}: no connection within {}",
                humantime::format_duration(CONNECT_TIMEOUT)
            ),
        )),
    }
}

/// True when `body` is the admin API's error shape, a JSON object with an `error` string.
fn is_error_document(body: &[u8]) -> bool {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => value.get("error").is_some_and(serde_json::Value::is_string),
        Err(_) => true,
    }
}

/// `": error: detail"` from an `{"error", "detail"}` body, or nothing if the body is not one.
fn error_detail(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorView {
        #[serde(default)]
        error: String,
        #[serde(default)]
        detail: String,
    }
    match serde_json::from_slice::<ErrorView>(body) {
        Ok(e) if !e.detail.is_empty() => format!(": {}: {}", e.error, e.detail),
        Ok(e) if !e.error.is_empty() => format!(": {}", e.error),
        _ => String::new(),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------------------------------
// Documents, as this command reads them

/// `GET /api/v1/secure-channel/status`, the fields the table shows.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PoolView {
    endpoint: String,
    server_name: String,
    status: Option<String>,
    pool_healthy: Option<bool>,
    pool_size: Option<u64>,
    active_connections: u64,
    total_reconnects: u64,
    total_errors: u64,
    total_requests: u64,
    pool_p50_latency_ms: f64,
    pool_p95_latency_ms: f64,
    pool_p99_latency_ms: f64,
    connections: Vec<ConnectionView>,
    last_updated: Option<String>,
}

impl PoolView {
    /// Healthy = at least one connection can take a request, as `/ready` decides.
    fn is_healthy(&self) -> bool {
        self.pool_healthy.unwrap_or(self.active_connections > 0)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ConnectionView {
    connection_id: u64,
    protocol: Option<String>,
    state: String,
    connected_since: Option<String>,
    in_flight: u64,
    requests_total: u64,
    errors: u64,
    reconnects: u64,
    p50_latency_ms: f64,
    p95_latency_ms: f64,
    p99_latency_ms: f64,
    circuit_breaker: Option<String>,
    breaker: BreakerView,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct BreakerView {
    state: Option<String>,
    retry_after_seconds: Option<u64>,
}

/// `GET /api/v1/status`, the figures the summary line adds.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ServiceView {
    version: Option<String>,
    uptime: Option<String>,
    performance: Option<PerformanceView>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PerformanceView {
    requests_per_second: Option<f64>,
    error_rate_percent: Option<f64>,
}

// ---------------------------------------------------------------------------------------
// Rendering

#[derive(Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

const COLUMNS: [(&str, Align); 11] = [
    ("ID", Align::Right),
    ("PROTOCOL", Align::Left),
    ("STATE", Align::Left),
    ("BREAKER", Align::Left),
    ("IN-FLIGHT", Align::Right),
    ("REQUESTS", Align::Right),
    ("ERRORS", Align::Right),
    ("P50 MS", Align::Right),
    ("P95 MS", Align::Right),
    ("P99 MS", Align::Right),
    ("CONNECTED SINCE", Align::Left),
];

/// The whole human-readable answer: a heading, the connection table, a summary line.
fn render(pool: &PoolView, service: Option<&ServiceView>) -> String {
    let mut out = String::new();

    let status = pool.status.clone().unwrap_or_else(|| {
        if pool.is_healthy() {
            "healthy".into()
        } else {
            "unavailable".into()
        }
    });
    let size = pool.pool_size.unwrap_or(pool.connections.len() as u64);
    let mut heading = format!(
        "relay {}",
        if pool.endpoint.is_empty() {
            "(unknown)"
        } else {
            &pool.endpoint
        }
    );
    if !pool.server_name.is_empty() && !pool.endpoint.starts_with(&format!("{}:", pool.server_name))
    {
        heading.push_str(&format!(" (server name {})", pool.server_name));
    }
    heading.push_str(&format!(
        " · pool {status}: {}/{size} connections usable",
        pool.active_connections
    ));
    out.push_str(&heading);
    out.push_str("\n\n");

    let now = pool.last_updated.as_deref().and_then(parse_time);
    let rows: Vec<[String; 11]> = pool
        .connections
        .iter()
        .map(|c| connection_row(c, now))
        .collect();
    out.push_str(&table(&rows));

    out.push('\n');
    out.push_str(&summary(pool, service));
    out.push('\n');
    out
}

fn connection_row(c: &ConnectionView, now: Option<SystemTime>) -> [String; 11] {
    let breaker = c
        .circuit_breaker
        .as_deref()
        .or(c.breaker.state.as_deref())
        .unwrap_or("-")
        .replace('_', "-");
    let breaker = match (breaker.as_str(), c.breaker.retry_after_seconds) {
        ("open", Some(seconds)) => format!("open (probe in {seconds}s)"),
        _ => breaker,
    };
    let connected = c.protocol.is_some() || c.connected_since.is_some();
    let latency = |v: f64| {
        if connected || v > 0.0 {
            ms(v)
        } else {
            "-".to_owned()
        }
    };
    [
        c.connection_id.to_string(),
        c.protocol.clone().unwrap_or_else(|| "-".to_owned()),
        if c.state.is_empty() {
            "-".to_owned()
        } else {
            c.state.clone()
        },
        breaker,
        c.in_flight.to_string(),
        c.requests_total.to_string(),
        c.errors.to_string(),
        latency(c.p50_latency_ms),
        latency(c.p95_latency_ms),
        latency(c.p99_latency_ms),
        since(c.connected_since.as_deref(), now),
    ]
}

/// Columns padded to their widest cell, two spaces apart, no trailing blanks.
fn table(rows: &[[String; 11]]) -> String {
    let mut widths = COLUMNS.map(|(title, _)| title.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 11]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            if i > 0 {
                text.push_str("  ");
            }
            match COLUMNS[i].1 {
                Align::Right => {
                    text.extend(std::iter::repeat_n(' ', pad));
                    text.push_str(cell);
                }
                Align::Left => {
                    text.push_str(cell);
                    text.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        let mut text = text.trim_end().to_owned();
        text.push('\n');
        text
    };
    let mut out = line(COLUMNS.map(|(title, _)| title));
    if rows.is_empty() {
        out.push_str("(the pool reports no connections)\n");
    }
    for row in rows {
        out.push_str(&line(std::array::from_fn(|i| row[i].as_str())));
    }
    out
}

fn summary(pool: &PoolView, service: Option<&ServiceView>) -> String {
    let mut parts = vec![
        format!("{} requests", pool.total_requests),
        format!("{} errors", pool.total_errors),
        format!("{} reconnects", pool.total_reconnects),
        format!(
            "pool p50/p95/p99 {}/{}/{} ms",
            ms(pool.pool_p50_latency_ms),
            ms(pool.pool_p95_latency_ms),
            ms(pool.pool_p99_latency_ms)
        ),
    ];
    if let Some(perf) = service.and_then(|s| s.performance.as_ref()) {
        if let Some(rate) = perf.requests_per_second {
            parts.push(format!("{rate:.1} req/s"));
        }
        if let Some(errors) = perf.error_rate_percent {
            parts.push(format!("{errors:.2}% errors (recent)"));
        }
    }
    if let Some(service) = service {
        if let Some(version) = &service.version {
            parts.push(format!("v{version}"));
        }
        if let Some(uptime) = &service.uptime {
            parts.push(format!("up {uptime}"));
        }
    }
    if let Some(updated) = &pool.last_updated {
        parts.push(format!("at {}", normalise_time(updated)));
    }
    let verdict = if pool.is_healthy() {
        "healthy"
    } else {
        "UNHEALTHY"
    };
    format!("{verdict}: {}", parts.join(" · "))
}

/// Milliseconds with one decimal (two below 10 ms).
fn ms(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.1}")
    }
}

fn parse_time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(text)
        .or_else(|_| humantime::parse_rfc3339_weak(text))
        .ok()
}

/// An RFC 3339 time cut to whole seconds (`2025-08-25T09:12:41Z`); unparseable text as given.
fn normalise_time(text: &str) -> String {
    parse_time(text).map_or_else(
        || text.to_owned(),
        |t| humantime::format_rfc3339_seconds(t).to_string(),
    )
}

/// `2025-08-25T09:12:41Z (1h47m)`: the handshake time and, when the snapshot time is known, the
/// connection's age at that time; `-` while not connected.
fn since(connected_since: Option<&str>, now: Option<SystemTime>) -> String {
    let Some(text) = connected_since else {
        return "-".to_owned();
    };
    let mut out = normalise_time(text);
    if let (Some(start), Some(now)) = (parse_time(text), now)
        && let Ok(age) = now.duration_since(start)
    {
        out.push_str(&format!(" ({})", compact_duration(age)));
    }
    out
}

/// The two leading units: `2d4h`, `1h47m`, `18m57s`, `3s`.
fn compact_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, minutes, seconds) = (s / 86_400, s % 86_400 / 3_600, s % 3_600 / 60, s % 60);
    if days > 0 {
        format!("{days}d{hours}h")
    } else if hours > 0 {
        format!("{hours}h{minutes}m")
    } else if minutes > 0 {
        format!("{minutes}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool as the sidecar reports it: two h2 connections, one HTTP/1.1 in half-open, one
    /// re-dialling with its breaker open; plus a field this version does not know.
    const POOL: &str = r#"{
      "endpoint": "relay.bitcoin-sprint.inc:443",
      "server_name": "relay.bitcoin-sprint.inc",
      "status": "degraded",
      "pool_healthy": true,
      "pool_size": 4,
      "active_connections": 3,
      "total_reconnects": 10,
      "total_errors": 311,
      "total_requests": 498453,
      "pool_p50_latency_ms": 23.1,
      "pool_p95_latency_ms": 52.7,
      "pool_p99_latency_ms": 118.4,
      "a_field_from_the_future": {"x": 1},
      "connections": [
        {"connection_id": 1, "protocol": "h2", "state": "connected",
         "connected_since": "2025-08-25T09:12:41Z", "last_activity": "2025-08-25T11:00:00.412Z",
         "in_flight": 7, "requests_total": 184223, "errors": 12, "reconnects": 0,
         "p50_latency_ms": 21.4, "p95_latency_ms": 44.8, "p99_latency_ms": 71.2, "ewma_latency_ms": 23.5,
         "last_ping_rtt_ms": 18.9, "is_healthy": true, "circuit_breaker": "closed",
         "breaker": {"state": "closed", "trip_reason": null, "time_in_state_ms": 1.0, "transitions": 0,
                     "last_transition": null, "retry_after_seconds": null}},
        {"connection_id": 2, "protocol": "h2", "state": "connected",
         "connected_since": "2025-08-25T10:41:03.250Z", "in_flight": 5, "requests_total": 183907,
         "errors": 9, "reconnects": 1, "p50_latency_ms": 22.9, "p95_latency_ms": 47.1,
         "p99_latency_ms": 80.6, "is_healthy": true, "circuit_breaker": "closed",
         "breaker": {"state": "closed"}},
        {"connection_id": 3, "protocol": "http/1.1", "state": "connected",
         "connected_since": "2025-08-25T10:59:57Z", "in_flight": 1, "requests_total": 90211,
         "errors": 57, "reconnects": 2, "p50_latency_ms": 5.25, "p95_latency_ms": 118.0,
         "p99_latency_ms": 240.3, "is_healthy": true, "circuit_breaker": "half_open",
         "breaker": {"state": "half_open", "trip_reason": "failure_rate"}},
        {"connection_id": 4, "protocol": null, "state": "backoff", "connected_since": null,
         "in_flight": 0, "requests_total": 40112, "errors": 233, "reconnects": 7,
         "p50_latency_ms": 0.0, "p95_latency_ms": 0.0, "p99_latency_ms": 0.0, "last_ping_rtt_ms": null,
         "is_healthy": false, "circuit_breaker": "open",
         "breaker": {"state": "open", "trip_reason": "consecutive_failures", "retry_after_seconds": 4}}
      ],
      "last_updated": "2025-08-25T11:00:00.500Z"
    }"#;

    const SERVICE: &str = r#"{
      "service": "sprint-sidecar", "status": "degraded", "version": "0.1.0", "uptime": "1h47m19s",
      "memory_protection": {"enabled": true},
      "performance": {"requests_per_second": 1284.63, "error_rate_percent": 0.4234}
    }"#;

    fn pool() -> PoolView {
        serde_json::from_str(POOL).expect("the sample pool document parses")
    }

    #[test]
    fn renders_one_aligned_row_per_connection() {
        let service: ServiceView =
            serde_json::from_str(SERVICE).expect("the sample service document parses");
        let text = render(&pool(), Some(&service));
        let expected = "\
relay relay.bitcoin-sprint.inc:443 · pool degraded: 3/4 connections usable

ID  PROTOCOL  STATE      BREAKER             IN-FLIGHT  REQUESTS  ERRORS  P50 MS  P95 MS  P99 MS  CONNECTED SINCE
 1  h2        connected  closed                      7    184223      12    21.4    44.8    71.2  2025-08-25T09:12:41Z (1h47m)
 2  h2        connected  closed                      5    183907       9    22.9    47.1    80.6  2025-08-25T10:41:03Z (18m57s)
 3  http/1.1  connected  half-open                   1     90211      57    5.25   118.0   240.3  2025-08-25T10:59:57Z (3s)
 4  -         backoff    open (probe in 4s)          0     40112     233       -       -       -  -

healthy: 498453 requests · 311 errors · 10 reconnects · pool p50/p95/p99 23.1/52.7/118.4 ms · 1284.6 req/s · 0.42% errors (recent) · v0.1.0 · up 1h47m19s · at 2025-08-25T11:00:00Z
";
        assert_eq!(text, expected, "rendered:\n{text}");
    }

    #[test]
    fn every_table_line_has_the_header_column_offsets() {
        let text = render(&pool(), None);
        let lines: Vec<&str> = text.lines().skip(2).take(5).collect();
        let header = lines[0];
        let protocol_at = header.find("PROTOCOL").expect("header names PROTOCOL");
        let since_at = header
            .find("CONNECTED SINCE")
            .expect("header names CONNECTED SINCE");
        for line in &lines[1..] {
            assert_eq!(line.chars().nth(protocol_at - 1), Some(' '), "{line}");
            assert_ne!(
                line.chars().nth(protocol_at),
                Some(' '),
                "protocol column starts aligned: {line}"
            );
            assert_ne!(
                line.chars().nth(since_at),
                Some(' '),
                "since column starts aligned: {line}"
            );
        }
    }

    #[test]
    fn summary_without_the_service_document_still_reports_the_pool() {
        let text = render(&pool(), None);
        let last = text.lines().last().expect("a summary line");
        assert_eq!(
            last,
            "healthy: 498453 requests · 311 errors · 10 reconnects · pool p50/p95/p99 23.1/52.7/118.4 ms · at 2025-08-25T11:00:00Z"
        );
    }

    #[test]
    fn a_pool_with_no_usable_connection_is_unhealthy() {
        let doc = r#"{"endpoint": "relay.test:443", "status": "unavailable", "pool_healthy": false,
                      "pool_size": 1, "active_connections": 0,
                      "connections": [{"connection_id": 1, "state": "connecting", "circuit_breaker": "closed"}]}"#;
        let pool: PoolView = serde_json::from_str(doc).expect("a sparse document parses");
        assert!(!pool.is_healthy());
        let text = render(&pool, None);
        assert!(
            text.starts_with("relay relay.test:443 · pool unavailable: 0/1 connections usable\n"),
            "{text}"
        );
        assert!(
            text.lines()
                .last()
                .expect("summary")
                .starts_with("UNHEALTHY: "),
            "{text}"
        );
    }

    #[test]
    fn health_falls_back_to_active_connections_when_pool_healthy_is_absent() {
        let pool: PoolView = serde_json::from_str(r#"{"active_connections": 2}"#).expect("parses");
        assert!(pool.is_healthy());
        let pool: PoolView = serde_json::from_str("{}").expect("an empty object parses");
        assert!(!pool.is_healthy());
        assert!(render(&pool, None).contains("(the pool reports no connections)"));
    }

    #[test]
    fn admin_urls_parse_with_and_without_scheme() {
        let t = Target::parse("http://127.0.0.1:9091").expect("plain URL");
        assert_eq!(
            (t.host.as_str(), t.port, t.prefix.as_str()),
            ("127.0.0.1", 9091, "")
        );
        let t = Target::parse("localhost:9091/").expect("no scheme");
        assert_eq!(
            (t.host.as_str(), t.port, t.authority.as_str()),
            ("localhost", 9091, "localhost:9091")
        );
        let t = Target::parse("http://[::1]:9091/sidecar/").expect("IPv6 with a prefix");
        assert_eq!(
            (t.host.as_str(), t.prefix.as_str(), t.base.as_str()),
            ("::1", "/sidecar", "http://[::1]:9091/sidecar")
        );
        assert_eq!(
            Target::parse("http://admin.internal")
                .expect("default port")
                .port,
            80
        );
    }

    #[test]
    fn unusable_admin_urls_are_refused_with_the_flag_named() {
        for bad in [
            "https://127.0.0.1:9091",
            "ftp://x:1",
            "http://user:pw@127.0.0.1:9091",
            "http://",
            "http://h:1/?q=1",
        ] {
            let err = Target::parse(bad).expect_err(bad);
            assert!(err.is_invalid_url(), "{bad}: {err}");
            assert!(err.to_string().starts_with("--admin "), "{bad}: {err}");
        }
    }

    #[test]
    fn error_bodies_are_quoted_in_messages() {
        assert_eq!(
            error_detail(br#"{"error":"unauthorized","detail":"missing bearer token"}"#),
            ": unauthorized: missing bearer token"
        );
        assert_eq!(error_detail(b"<html>oops</html>"), "");
        assert!(is_error_document(
            br#"{"error":"unavailable","detail":"shutting down"}"#
        ));
        assert!(
            is_error_document(b"<html>503</html>"),
            "a body that is not JSON is not a document"
        );
        assert!(!is_error_document(
            br#"{"pool_healthy":false,"connections":[]}"#
        ));
    }

    #[test]
    fn durations_keep_two_units() {
        assert_eq!(compact_duration(Duration::from_secs(3)), "3s");
        assert_eq!(compact_duration(Duration::from_secs(1137)), "18m57s");
        assert_eq!(compact_duration(Duration::from_secs(6439)), "1h47m");
        assert_eq!(
            compact_duration(Duration::from_secs(2 * 86_400 + 4 * 3_600 + 5)),
            "2d4h"
        );
    }

    #[tokio::test]
    async fn an_unreachable_admin_api_is_a_connect_error() {
        // Bind then drop a listener: the port is free and nothing answers on it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let address = listener
            .local_addr()
            .expect("a bound listener has an address");
        drop(listener);
        let err = run(&format!("http://{address}"), false, None)
            .await
            .expect_err("nothing listens");
        assert!(err.is_connect(), "{err}");
        assert!(err.to_string().contains(&address.to_string()), "{err}");
    }
}
