//! End to end, real binary, real TLS: the admin listener of SPEC §6 and issue 5. Every endpoint
//! answers with its status code, content type and the fields of `src/admin/documents.rs`, from
//! live figures; errors are JSON; `admin.token_file` guards `/api/v1/*` and never leaks; CORS is
//! closed unless configured; `/openapi.json` is a valid OpenAPI 3.1 document that matches what
//! the server serves, both ways, and describes its answers; `sprint-sidecar status` prints the
//! pool and says with its exit code whether the pool is healthy.
//!
//! The OpenAPI checks run Python tools from `.tools/testenv`, installed by
//! `scripts/install-python-test-tools.sh`. A missing tool fails the test: it never skips.

mod support;

use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::Value;
use support::{Fault, Proto, Relay, Sidecar, SidecarBuilder, assert_json_error, is_rfc3339_utc};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

// ---------------------------------------------------------------------------------------
// Harness

async fn start(
    pool_size: usize,
    configure: impl FnOnce(SidecarBuilder) -> SidecarBuilder,
) -> (Relay, Sidecar) {
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    let sidecar = configure(Sidecar::builder().relay(&relay).pool_size(pool_size))
        .start()
        .await;
    sidecar.wait_ready().await;
    (relay, sidecar)
}

/// Waits until every slot of the pool is connected and usable (read from `/ready`, which
/// stays open when `admin.token_file` is set).
async fn wait_all_active(sidecar: &Sidecar, pool_size: usize) {
    support::eventually(
        support::EVENTUALLY,
        &format!("{pool_size} active connections"),
        || async {
            let (status, document) = sidecar.get_json("/ready").await;
            (status == 200 && document["active_connections"] == pool_size).then_some(())
        },
    )
    .await;
}

/// Sends `count` requests of `method` to the data listener, 8 at a time; returns the statuses.
async fn traffic(sidecar: &Sidecar, method: Method, path: &str, count: usize) -> Vec<u16> {
    let mut tasks = JoinSet::new();
    let mut statuses = Vec::new();
    for _ in 0..count {
        if tasks.len() >= 8
            && let Some(status) = tasks.join_next().await
        {
            statuses.push(status.expect("request task"));
        }
        let request = sidecar
            .client()
            .request(method.clone(), sidecar.data_url(path))
            .body(if method == Method::POST {
                "{\"jsonrpc\":\"2.0\",\"id\":1}"
            } else {
                ""
            });
        tasks.spawn(async move {
            match request.send().await {
                Ok(response) => response.status().as_u16(),
                Err(_) => 0,
            }
        });
    }
    while let Some(status) = tasks.join_next().await {
        statuses.push(status.expect("request task"));
    }
    statuses
}

/// One admin answer, whatever its status and type.
struct Answer {
    what: String,
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    fn content_type(&self) -> &str {
        self.header("content-type").unwrap_or("")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON, after checking that it is declared as JSON.
    fn json(&self) -> Value {
        assert_eq!(
            self.content_type(),
            "application/json",
            "{} must answer Content-Type: application/json (status {}, body {:?})",
            self.what,
            self.status,
            self.text()
        );
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "{} answered a non-JSON body {:?}: {error}",
                self.what,
                self.text()
            )
        })
    }

    /// Asserts the JSON error document `{"error", "detail"}` with this status.
    fn assert_json_error(&self, status: u16) -> (String, String) {
        assert_eq!(self.status, status, "{}: {}", self.what, self.text());
        let _ = self.json();
        assert_json_error(self.status, &self.body)
    }
}

async fn admin_request(
    sidecar: &Sidecar,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let method = Method::from_bytes(method.as_bytes()).expect("a valid method token");
    let mut request = sidecar
        .client()
        .request(method.clone(), sidecar.admin_url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|error| panic!("{method} {path} on the admin listener failed: {error}"));
    Answer {
        what: format!("{method} {path}"),
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.bytes().await.expect("the admin body can be read"),
    }
}

async fn admin_get(sidecar: &Sidecar, path: &str) -> Answer {
    admin_request(sidecar, "GET", path, &[]).await
}

/// A token no test writes anywhere else: random, so that finding it in output proves a leak.
fn random_token() -> String {
    let mut token = String::from("adm1n-");
    for _ in 0..4 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(std::process::id().into());
        token.push_str(&format!("{:016x}", hasher.finish()));
    }
    token
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every path the admin router serves exactly, read from the `EXACT_PATHS` const of
/// `src/admin.rs`, plus the connection template (the router matches it by prefix).
fn served_paths() -> BTreeSet<String> {
    let source_path = repo_root().join("src/admin.rs");
    let source = std::fs::read_to_string(&source_path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", source_path.display()));
    let start = source
        .find("const EXACT_PATHS")
        .unwrap_or_else(|| panic!("no `const EXACT_PATHS` in {}", source_path.display()));
    let list = &source[start..];
    let list = &list[list.find('=').expect("EXACT_PATHS has an initialiser")..];
    let list = &list[..list.find("];").expect("EXACT_PATHS ends with `];`")];
    let mut paths: BTreeSet<String> = list
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert!(
        paths.len() >= 14 && paths.iter().all(|path| path.starts_with('/')),
        "EXACT_PATHS parsed badly from {}: {paths:?}",
        source_path.display()
    );
    paths.insert(CONNECTION_TEMPLATE.to_owned());
    paths
}

const CONNECTION_TEMPLATE: &str = "/api/v1/secure-channel/connections/{id}";

// ---------------------------------------------------------------------------------------
// Field checks: names and types of src/admin/documents.rs

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// A non-negative integer.
    Count,
    /// Any JSON number (latencies, rates: ms as floats).
    Number,
    Bool,
    Text,
    /// RFC 3339 UTC ending in `Z`.
    Timestamp,
    OptText,
    OptNumber,
    OptCount,
    OptTimestamp,
    Object,
    Array,
}

fn is_timestamp(value: &Value) -> bool {
    value
        .as_str()
        .is_some_and(|text| is_rfc3339_utc(text) && text.ends_with('Z'))
}

fn has_kind(value: &Value, kind: Kind) -> bool {
    match kind {
        Kind::Count => value.is_u64(),
        Kind::Number => value.is_number(),
        Kind::Bool => value.is_boolean(),
        Kind::Text => value.is_string(),
        Kind::Timestamp => is_timestamp(value),
        Kind::OptText => value.is_null() || value.is_string(),
        Kind::OptNumber => value.is_null() || value.is_number(),
        Kind::OptCount => value.is_null() || value.is_u64(),
        Kind::OptTimestamp => value.is_null() || is_timestamp(value),
        Kind::Object => value.is_object(),
        Kind::Array => value.is_array(),
    }
}

/// Asserts that `document` has every field of `fields`, each of its kind.
fn assert_fields(what: &str, document: &Value, fields: &[(&str, Kind)]) {
    assert!(
        document.is_object(),
        "{what} must be a JSON object: {document}"
    );
    for (name, kind) in fields {
        let value = document
            .get(*name)
            .unwrap_or_else(|| panic!("{what} lacks the field {name:?}: {document}"));
        assert!(
            has_kind(value, *kind),
            "{what}.{name} must be {kind:?}, got {value}"
        );
    }
}

fn assert_one_of(what: &str, value: &Value, allowed: &[&str]) {
    assert!(
        value.as_str().is_some_and(|text| allowed.contains(&text)),
        "{what} must be one of {allowed:?}, got {value}"
    );
}

const HEALTH_FIELDS: &[(&str, Kind)] = &[
    ("status", Kind::Text),
    ("reason", Kind::Text),
    ("active_connections", Kind::Count),
    ("pool_size", Kind::Count),
];

const CONNECTION_FIELDS: &[(&str, Kind)] = &[
    ("connection_id", Kind::Count),
    ("protocol", Kind::OptText),
    ("state", Kind::Text),
    ("connected_since", Kind::OptTimestamp),
    ("last_activity", Kind::OptTimestamp),
    ("in_flight", Kind::Count),
    ("requests_total", Kind::Count),
    ("errors", Kind::Count),
    ("reconnects", Kind::Count),
    ("p50_latency_ms", Kind::Number),
    ("p95_latency_ms", Kind::Number),
    ("p99_latency_ms", Kind::Number),
    ("ewma_latency_ms", Kind::Number),
    ("last_ping_rtt_ms", Kind::OptNumber),
    ("is_healthy", Kind::Bool),
    ("circuit_breaker", Kind::Text),
    ("breaker", Kind::Object),
];

const BREAKER_FIELDS: &[(&str, Kind)] = &[
    ("state", Kind::Text),
    ("trip_reason", Kind::OptText),
    ("time_in_state_ms", Kind::Number),
    ("transitions", Kind::Count),
    ("last_transition", Kind::OptTimestamp),
    ("retry_after_seconds", Kind::OptCount),
];

const POOL_STATUS_FIELDS: &[(&str, Kind)] = &[
    ("endpoint", Kind::Text),
    ("server_name", Kind::Text),
    ("status", Kind::Text),
    ("pool_healthy", Kind::Bool),
    ("pool_size", Kind::Count),
    ("active_connections", Kind::Count),
    ("total_reconnects", Kind::Count),
    ("total_errors", Kind::Count),
    ("total_requests", Kind::Count),
    ("pool_p50_latency_ms", Kind::Number),
    ("pool_p95_latency_ms", Kind::Number),
    ("pool_p99_latency_ms", Kind::Number),
    ("connections", Kind::Array),
    ("last_updated", Kind::Timestamp),
];

const STATS_FIELDS: &[(&str, Kind)] = &[
    ("requests", Kind::Count),
    ("errors", Kind::Count),
    ("error_rate", Kind::Number),
    ("retries", Kind::Count),
    ("retry_budget_exhausted", Kind::Count),
    ("latency_ms", Kind::Object),
    ("bytes_sent", Kind::Count),
    ("bytes_received", Kind::Count),
    ("breaker_transitions", Kind::Count),
    ("reconnects", Kind::Count),
    ("uptime_seconds", Kind::Number),
];

const LATENCY_FIELDS: &[(&str, Kind)] = &[
    ("p50", Kind::Number),
    ("p95", Kind::Number),
    ("p99", Kind::Number),
    ("avg", Kind::Number),
];

const SERVICE_FIELDS: &[(&str, Kind)] = &[
    ("service", Kind::Text),
    ("status", Kind::Text),
    ("version", Kind::Text),
    ("timestamp", Kind::Timestamp),
    ("uptime", Kind::Text),
    ("uptime_seconds", Kind::Number),
    ("memory_protection", Kind::Object),
    ("secure_channel", Kind::Object),
    ("performance", Kind::Object),
];

const SECURE_CHANNEL_FIELDS: &[(&str, Kind)] = &[
    ("status", Kind::Text),
    ("pool_healthy", Kind::Bool),
    ("active_connections", Kind::Count),
    ("error_rate", Kind::Number),
    ("avg_latency_ms", Kind::Number),
    ("reconnects_total", Kind::Count),
    ("circuit_breaker_status", Kind::Text),
];

const PERFORMANCE_FIELDS: &[(&str, Kind)] = &[
    ("connection_pool_utilization", Kind::Number),
    ("avg_response_time_ms", Kind::Number),
    ("error_rate_percent", Kind::Number),
    ("requests_per_second", Kind::Number),
    ("memory_usage_mb", Kind::Number),
    ("cpu_usage_percent", Kind::Number),
];

const MEMORY_FIELDS: &[(&str, Kind)] = &[
    ("enabled", Kind::Bool),
    ("secure_buffers", Kind::Count),
    ("locked_bytes", Kind::Count),
    ("lock_all", Kind::Bool),
    ("core_dumps_disabled", Kind::Bool),
    ("dumpable", Kind::Bool),
    ("mlock_limit_bytes", Kind::OptCount),
];

const SELF_CHECK_FIELDS: &[(&str, Kind)] = &[
    ("passed", Kind::Bool),
    ("checks", Kind::Array),
    ("checked_at", Kind::Timestamp),
];

const POOL_STATES: &[&str] = &["healthy", "degraded", "unavailable"];
const BREAKER_STATES: &[&str] = &["closed", "open", "half_open"];

fn assert_connection(what: &str, connection: &Value) {
    assert_fields(what, connection, CONNECTION_FIELDS);
    assert_fields(
        &format!("{what}.breaker"),
        &connection["breaker"],
        BREAKER_FIELDS,
    );
    assert_one_of(
        &format!("{what}.state"),
        &connection["state"],
        &["connecting", "connected", "backoff", "draining"],
    );
    assert_one_of(
        &format!("{what}.circuit_breaker"),
        &connection["circuit_breaker"],
        BREAKER_STATES,
    );
    assert_eq!(
        connection["circuit_breaker"], connection["breaker"]["state"],
        "{what}: circuit_breaker and breaker.state agree: {connection}"
    );
}

// ---------------------------------------------------------------------------------------
// Endpoints, fields, status codes

#[tokio::test(flavor = "multi_thread")]
async fn a_request_hyper_cannot_parse_gets_a_json_400_on_the_admin_port() {
    let (_relay, sidecar) = start(1, |builder| builder).await;
    let answer = support::raw_exchange(
        sidecar.admin_addr(),
        b"GET /health HTTP/1.1\r\nHo st: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        support::raw_status(&answer),
        Some(400),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let (error, _) = support::assert_json_error(400, support::raw_body(&answer));
    assert_eq!(error, "bad_request");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_answers_with_its_status_type_and_fields() {
    let (_relay, sidecar) = start(3, |builder| builder).await;
    wait_all_active(&sidecar, 3).await;
    let statuses = traffic(&sidecar, Method::GET, "/fields", 30).await;
    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");

    let health = admin_get(&sidecar, "/health").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), serde_json::json!({"status": "ok"}));

    let ready = admin_get(&sidecar, "/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    let document = ready.json();
    assert_fields("/ready", &document, HEALTH_FIELDS);
    assert_eq!(document["status"], "ok", "{document}");
    assert_eq!(document["pool_size"], 3, "{document}");

    let service = admin_get(&sidecar, "/api/v1/status").await;
    assert_eq!(service.status, 200, "{}", service.text());
    let document = service.json();
    assert_fields("/api/v1/status", &document, SERVICE_FIELDS);
    assert_fields(
        "secure_channel",
        &document["secure_channel"],
        SECURE_CHANNEL_FIELDS,
    );
    assert_fields("performance", &document["performance"], PERFORMANCE_FIELDS);
    assert_fields(
        "memory_protection",
        &document["memory_protection"],
        MEMORY_FIELDS,
    );
    assert_eq!(document["service"], "sprint-sidecar");
    assert_eq!(document["version"], env!("CARGO_PKG_VERSION"));
    assert_one_of(
        "status",
        &document["status"],
        &["ok", "degraded", "unavailable"],
    );
    assert_eq!(
        document["secure_channel"]["status"], "healthy",
        "{document}"
    );
    assert_eq!(
        document["secure_channel"]["pool_healthy"], true,
        "{document}"
    );
    assert_eq!(
        document["secure_channel"]["active_connections"], 3,
        "{document}"
    );
    assert_eq!(
        document["secure_channel"]["circuit_breaker_status"], "closed",
        "{document}"
    );

    let pool = admin_get(&sidecar, "/api/v1/secure-channel/status").await;
    assert_eq!(pool.status, 200, "{}", pool.text());
    let document = pool.json();
    assert_fields(
        "/api/v1/secure-channel/status",
        &document,
        POOL_STATUS_FIELDS,
    );
    assert_one_of("status", &document["status"], POOL_STATES);
    assert_eq!(document["pool_size"], 3);
    assert!(
        document["total_requests"].as_u64().unwrap_or(0) >= 30,
        "{document}"
    );
    let connections = document["connections"].as_array().expect("connections[]");
    assert_eq!(connections.len(), 3, "{document}");
    for connection in connections {
        assert_connection("pool connections[]", connection);
        assert_eq!(connection["protocol"], "h2", "{connection}");
        assert!(is_timestamp(&connection["connected_since"]), "{connection}");
    }

    let pool_health = admin_get(&sidecar, "/api/v1/secure-channel/health").await;
    assert_eq!(pool_health.status, 200, "{}", pool_health.text());
    let document = pool_health.json();
    assert_fields("/api/v1/secure-channel/health", &document, HEALTH_FIELDS);
    assert_eq!(document["status"], "ok");
    assert!(
        !document["reason"].as_str().unwrap_or("").is_empty(),
        "{document}"
    );

    let list = admin_get(&sidecar, "/api/v1/secure-channel/connections").await;
    assert_eq!(list.status, 200, "{}", list.text());
    let document = list.json();
    let connections = document["connections"]
        .as_array()
        .unwrap_or_else(|| panic!("{{\"connections\": [...]}} expected: {document}"));
    let ids: BTreeSet<u64> = connections
        .iter()
        .map(|connection| {
            assert_connection("connections[]", connection);
            connection["connection_id"].as_u64().expect("a count")
        })
        .collect();
    assert_eq!(ids, BTreeSet::from([1, 2, 3]), "ids are the 1-based slots");
    let served: u64 = connections
        .iter()
        .map(|connection| connection["requests_total"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        served >= 30,
        "requests_total adds up to the traffic: {document}"
    );
    let latency_seen = connections
        .iter()
        .any(|connection| connection["p50_latency_ms"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(latency_seen, "latencies are measured, in ms: {document}");

    let stats = admin_get(&sidecar, "/api/v1/secure-channel/stats").await;
    assert_eq!(stats.status, 200, "{}", stats.text());
    let document = stats.json();
    assert_fields("/api/v1/secure-channel/stats", &document, STATS_FIELDS);
    assert_fields("stats.latency_ms", &document["latency_ms"], LATENCY_FIELDS);
    assert!(
        document["requests"].as_u64().unwrap_or(0) >= 30,
        "{document}"
    );
    assert!(
        document["bytes_received"].as_u64().unwrap_or(0) > 0,
        "{document}"
    );
    assert!(
        document["latency_ms"]["p50"].as_f64().unwrap_or(0.0) > 0.0,
        "{document}"
    );

    let memory = admin_get(&sidecar, "/api/v1/memory-protection/status").await;
    assert_eq!(memory.status, 200, "{}", memory.text());
    assert_fields(
        "/api/v1/memory-protection/status",
        &memory.json(),
        MEMORY_FIELDS,
    );

    let check = admin_get(&sidecar, "/api/v1/memory-protection/self-check").await;
    let document = check.json();
    assert_fields(
        "/api/v1/memory-protection/self-check",
        &document,
        SELF_CHECK_FIELDS,
    );
    let passed = document["passed"].as_bool().expect("passed is a bool");
    assert_eq!(
        check.status,
        if passed { 200 } else { 503 },
        "200 exactly when every check passed: {document}"
    );
    let checks = document["checks"].as_array().expect("checks[]");
    assert!(!checks.is_empty(), "{document}");
    for item in checks {
        assert_fields(
            "self-check checks[]",
            item,
            &[
                ("name", Kind::Text),
                ("ok", Kind::Bool),
                ("detail", Kind::Text),
            ],
        );
    }
    assert_eq!(
        passed,
        checks.iter().all(|item| item["ok"] == true),
        "passed is the conjunction of the checks: {document}"
    );

    // Without an Accept header: /metrics is OpenMetrics, the pool's endpoint Prometheus text.
    let metrics = admin_get(&sidecar, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .content_type()
            .starts_with("application/openmetrics-text"),
        "/metrics serves OpenMetrics by default: {:?}",
        metrics.content_type()
    );
    assert!(metrics.text().ends_with("# EOF\n"));
    let pool = admin_get(&sidecar, "/api/v1/secure-channel/metrics").await;
    assert_eq!(pool.status, 200);
    assert!(
        pool.content_type().starts_with("text/plain; version=0.0.4"),
        "/api/v1/secure-channel/metrics serves Prometheus text by default: {:?}",
        pool.content_type()
    );
    assert!(
        !pool.text().contains("# EOF") && pool.text().contains("# TYPE sprint_sidecar_"),
        "{}",
        pool.text()
    );

    let openapi = admin_get(&sidecar, "/openapi.json").await;
    assert_eq!(openapi.status, 200);
    assert!(
        openapi.json()["openapi"]
            .as_str()
            .unwrap_or("")
            .starts_with("3.1")
    );

    for path in ["/docs", "/dashboard"] {
        let page = admin_get(&sidecar, path).await;
        assert_eq!(page.status, 200, "{path}");
        assert!(
            page.content_type().starts_with("text/html"),
            "{path}: {:?}",
            page.content_type()
        );
        assert!(
            page.text().contains("</html>"),
            "{path} is a whole HTML page"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_figures_are_live_and_follow_a_503_storm() {
    let (relay, sidecar) = start(2, |builder| {
        // Keep the breakers out of the way of the figures: the storm is answered by the relay.
        builder
            .set("breaker", "consecutive_failures", "1000")
            .set("breaker", "failure_rate", "1.0")
    })
    .await;
    let statuses = traffic(&sidecar, Method::GET, "/live", 60).await;
    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");

    let (status, document) = sidecar.get_json("/api/v1/status").await;
    assert_eq!(status, 200, "{document}");
    let performance = &document["performance"];
    let number = |value: &Value| value.as_f64().unwrap_or(f64::NAN);
    assert!(
        number(&performance["requests_per_second"]) > 0.0,
        "after 60 requests: {document}"
    );
    assert!(
        number(&performance["memory_usage_mb"]) > 1.0,
        "RSS from the OS: {document}"
    );
    assert!(
        number(&performance["cpu_usage_percent"]) >= 0.0,
        "{document}"
    );
    assert!(
        number(&performance["avg_response_time_ms"]) > 0.0,
        "{document}"
    );
    assert_eq!(
        number(&performance["error_rate_percent"]),
        0.0,
        "no error yet: {document}"
    );
    assert!(
        number(&document["secure_channel"]["avg_latency_ms"]) > 0.0,
        "{document}"
    );
    assert_eq!(
        number(&document["secure_channel"]["error_rate"]),
        0.0,
        "{document}"
    );
    assert!(number(&document["uptime_seconds"]) > 0.0, "{document}");

    // A 503 storm from the relay: the recent error rate must show it.
    relay.set_fault(Fault::Status(503));
    let statuses = traffic(&sidecar, Method::GET, "/storm", 40).await;
    assert!(statuses.iter().all(|status| *status == 503), "{statuses:?}");
    let (_, document) = sidecar.get_json("/api/v1/status").await;
    let percent = number(&document["performance"]["error_rate_percent"]);
    // 40 failures after 60 successes: 40 % of the recent window.
    assert!(
        (35.0..=45.0).contains(&percent),
        "error_rate_percent after 40 × 503 of 100: {document}"
    );
    assert_eq!(
        number(&document["secure_channel"]["error_rate"]),
        percent,
        "secure_channel.error_rate is the same recent percentage: {document}"
    );
    let (_, stats) = sidecar.get_json("/api/v1/secure-channel/stats").await;
    assert!(stats["errors"].as_u64().unwrap_or(0) >= 40, "{stats}");
    let error_rate = number(&stats["error_rate"]);
    assert!(
        error_rate > 0.3 && error_rate <= 1.0,
        "stats.error_rate is 0..=1: {stats}"
    );
    relay.heal();
}

/// Posts `count` requests with a `size`-byte body, one after another; returns the answer body
/// bytes the client received.
async fn post_bodies(sidecar: &Sidecar, count: usize, size: usize) -> u64 {
    let client = support::client();
    let mut received = 0;
    for i in 0..count {
        let answer = client
            .post(sidecar.data_url(&format!("/rpc/{i}")))
            .body(vec![b'x'; size])
            .send()
            .await
            .expect("the sidecar answers");
        assert_eq!(answer.status(), 200);
        received += answer.bytes().await.expect("the whole answer").len() as u64;
    }
    received
}

async fn byte_totals(sidecar: &Sidecar) -> (u64, u64) {
    let (status, stats) = sidecar.get_json("/api/v1/secure-channel/stats").await;
    assert_eq!(status, 200, "{stats}");
    let count = |field: &str| {
        stats[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} is a count: {stats}"))
    };
    (count("bytes_sent"), count("bytes_received"))
}

/// `bytes_sent` and `bytes_received` of `/stats` are the body bytes that went to and came from
/// the relay, over both protocols, and lifetime totals: a relay outage that takes every
/// connection away takes nothing from them.
#[tokio::test(flavor = "multi_thread")]
async fn stats_byte_totals_are_exact_over_both_protocols_and_survive_an_outage() {
    for protocol in [Proto::H2, Proto::Http1] {
        let relay = Relay::builder().protocol(protocol).start().await;
        let sidecar = Sidecar::builder().relay(&relay).pool_size(2).start().await;
        sidecar.wait_ready().await;
        let name = protocol.name();

        let received = post_bodies(&sidecar, 6, 1000).await;
        assert!(received > 0, "{name}: the relay answers with a body");
        assert_eq!(byte_totals(&sidecar).await, (6000, received), "{name}");

        relay.go_down().await;
        sidecar.wait_admin_status("/ready", 503).await;
        assert_eq!(
            byte_totals(&sidecar).await,
            (6000, received),
            "{name}: connections gone, totals kept"
        );

        relay.come_back().await;
        sidecar.wait_ready().await;
        let more = post_bodies(&sidecar, 4, 500).await;
        assert_eq!(
            byte_totals(&sidecar).await,
            (8000, received + more),
            "{name}: counting goes on over the new connections"
        );
    }
}

/// The pool's percentiles cover the whole window, not only the connections open now: a relay
/// that drops every connection (or rotates them after a few hundred requests, as nginx does)
/// does not empty them.
#[tokio::test(flavor = "multi_thread")]
async fn pool_latency_keeps_its_window_when_every_connection_is_replaced() {
    let (relay, sidecar) = start(2, |builder| builder).await;
    post_bodies(&sidecar, 20, 10).await;
    relay.go_down().await;
    sidecar.wait_admin_status("/ready", 503).await;
    let (_, status) = sidecar.get_json("/api/v1/secure-channel/status").await;
    assert!(
        status["pool_p95_latency_ms"].as_f64().unwrap_or(0.0) > 0.0,
        "{status}"
    );
    let (_, stats) = sidecar.get_json("/api/v1/secure-channel/stats").await;
    for quantile in ["p50", "p95", "p99", "avg"] {
        assert!(
            stats["latency_ms"][quantile].as_f64().unwrap_or(0.0) > 0.0,
            "{quantile}: {stats}"
        );
    }
    assert!(stats["requests"].as_u64().unwrap_or(0) >= 20, "{stats}");
    // The connections themselves start afresh: none is open, so none reports a percentile.
    let (_, listing) = sidecar.get_json("/api/v1/secure-channel/connections").await;
    for connection in listing["connections"].as_array().expect("connections[]") {
        assert_eq!(
            connection["p95_latency_ms"].as_f64(),
            Some(0.0),
            "{connection}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_paths_and_wrong_methods_answer_json_errors() {
    let (_relay, sidecar) = start(1, |builder| builder).await;
    for path in [
        "/nope",
        "/api/v1",
        "/api/v1/nope",
        "/api/v1/secure-channel/connections/1/extra",
        "/health/x",
        "/metrics.json",
    ] {
        admin_get(&sidecar, path).await.assert_json_error(404);
    }
    for (method, path) in [
        ("POST", "/health"),
        ("POST", "/api/v1/status"),
        ("PUT", "/api/v1/secure-channel/status"),
        ("DELETE", "/api/v1/secure-channel/connections/1"),
        ("PATCH", "/metrics"),
        ("POST", "/openapi.json"),
    ] {
        let answer = admin_request(&sidecar, method, path, &[]).await;
        answer.assert_json_error(405);
        let allow = answer
            .header("allow")
            .unwrap_or_else(|| panic!("{method} {path}: a 405 names the allowed methods in Allow"));
        assert!(allow.contains("GET"), "{method} {path}: Allow: {allow}");
        assert!(!allow.contains(method), "{method} {path}: Allow: {allow}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_by_id_answers_200_404_and_400() {
    let size = 3;
    let (_relay, sidecar) = start(size, |builder| builder).await;
    for id in 1..=size {
        let answer = admin_get(
            &sidecar,
            &format!("/api/v1/secure-channel/connections/{id}"),
        )
        .await;
        assert_eq!(answer.status, 200, "connection {id}: {}", answer.text());
        let document = answer.json();
        assert_connection(&format!("connection {id}"), &document);
        assert_eq!(document["connection_id"], id, "{document}");
    }
    admin_get(
        &sidecar,
        &format!("/api/v1/secure-channel/connections/{}", size + 1),
    )
    .await
    .assert_json_error(404);
    // Well-formed ids no connection has, 64-bit or longer, are unknown, not malformed.
    for unknown in ["99999999999", "99999999999999999999999"] {
        admin_get(
            &sidecar,
            &format!("/api/v1/secure-channel/connections/{unknown}"),
        )
        .await
        .assert_json_error(404);
    }
    for malformed in ["abc", "0", "-1", "+1", "1.5", "%20", "0x1"] {
        admin_get(
            &sidecar,
            &format!("/api/v1/secure-channel/connections/{malformed}"),
        )
        .await
        .assert_json_error(400);
    }
}

// ---------------------------------------------------------------------------------------
// Auth and CORS

#[tokio::test(flavor = "multi_thread")]
async fn admin_token_guards_the_api_and_never_leaks() {
    let token = random_token();
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    let builder = Sidecar::builder()
        .relay(&relay)
        .pool_size(2)
        .set_str("log", "level", "debug");
    let token_file = builder.write_file("admin.token", format!("{token}\n").as_bytes(), 0o600);
    let sidecar = builder
        .set_str("admin", "token_file", &token_file.display().to_string())
        .start()
        .await;
    sidecar.wait_ready().await;
    wait_all_active(&sidecar, 2).await;

    let mut seen = Vec::new();
    let right = format!("Bearer {token}");
    let wrong_tokens = [
        "Bearer wrong".to_owned(),
        format!("Bearer {token}x"),
        format!("Bearer {}", &token[..token.len() - 1]),
        format!("Basic {token}"),
        token.clone(),
        "Bearer ".to_owned(),
    ];
    for path in served_paths() {
        let path = path.replace("{id}", "1");
        if path.starts_with("/api/v1/") {
            let bare = admin_get(&sidecar, &path).await;
            bare.assert_json_error(401);
            assert_eq!(bare.header("www-authenticate"), Some("Bearer"), "{path}");
            seen.push(bare);
            for wrong in &wrong_tokens {
                let answer =
                    admin_request(&sidecar, "GET", &path, &[("authorization", wrong)]).await;
                answer.assert_json_error(401);
                seen.push(answer);
            }
            let answer = admin_request(&sidecar, "GET", &path, &[("authorization", &right)]).await;
            // The self-check answers 503 when a check fails on this machine: still not a 401.
            let expected: &[u16] = if path.ends_with("/self-check") {
                &[200, 503]
            } else {
                &[200]
            };
            assert!(
                expected.contains(&answer.status),
                "{path} with the right token: {} {}",
                answer.status,
                answer.text()
            );
            seen.push(answer);
        } else {
            let answer = admin_get(&sidecar, &path).await;
            assert_eq!(
                answer.status,
                200,
                "{path} stays open without a token: {}",
                answer.text()
            );
            seen.push(answer);
        }
    }

    // An unknown path under /api/v1/ is refused the same way without the token, so a caller
    // without it learns nothing about which paths exist; with it, the path is a 404.
    let unknown = admin_get(&sidecar, "/api/v1/secure-channel/nope").await;
    unknown.assert_json_error(401);
    seen.push(unknown);
    let unknown = admin_request(
        &sidecar,
        "GET",
        "/api/v1/secure-channel/nope",
        &[("authorization", &right)],
    )
    .await;
    unknown.assert_json_error(404);
    seen.push(unknown);
    // RFC 9110 allows more than one space after the scheme.
    let spaced = admin_request(
        &sidecar,
        "GET",
        "/api/v1/status",
        &[("authorization", &format!("bearer   {token}"))],
    )
    .await;
    assert_eq!(spaced.status, 200, "{}", spaced.text());
    seen.push(spaced);

    // The status command needs the token too, and never prints it.
    let cli = SidecarBuilder::new();
    let admin = sidecar.admin_url("");
    let without = cli
        .run_args(&["status".into(), "--admin".into(), admin.clone()])
        .await;
    assert_eq!(without.code, Some(2), "status without a token: {without:?}");
    assert!(without.stderr.contains("401"), "{without:?}");
    let with = cli
        .run_args(&[
            "status".into(),
            "--admin".into(),
            admin,
            "--token-file".into(),
            token_file.display().to_string(),
        ])
        .await;
    assert_eq!(with.code, Some(0), "status with the token: {with:?}");

    for answer in &seen {
        assert!(
            !answer.text().contains(&token),
            "{} answered the admin token in its body",
            answer.what
        );
        for (name, value) in &answer.headers {
            assert!(
                !String::from_utf8_lossy(value.as_bytes()).contains(&token),
                "{} answered the admin token in header {name}",
                answer.what
            );
        }
    }
    for output in [&without, &with] {
        assert!(
            !output.stdout.contains(&token) && !output.stderr.contains(&token),
            "status printed the token"
        );
    }
    let logs = sidecar.logs();
    assert!(logs.len() > 1, "the debug logs were captured: {logs:?}");
    let leaked: Vec<&String> = logs.iter().filter(|line| line.contains(&token)).collect();
    assert!(
        leaked.is_empty(),
        "the admin token appears in the logs: {leaked:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cross_origin_access_needs_a_listed_origin() {
    let listed = "https://ops.example";
    let (_relay, closed) = start(1, |builder| builder).await;
    let (_relay2, open) = start(1, |builder| {
        builder.set("admin", "cors_allowed_origins", &format!("[\"{listed}\"]"))
    })
    .await;
    let paths = [
        "/api/v1/status",
        "/api/v1/secure-channel/status",
        "/health",
        "/metrics",
    ];

    for path in paths {
        for (sidecar, origin) in [
            (&closed, listed),
            (&closed, "https://evil.example"),
            (&open, "https://evil.example"),
        ] {
            for method in ["GET", "OPTIONS"] {
                let answer = admin_request(
                    sidecar,
                    method,
                    path,
                    &[("origin", origin), ("access-control-request-method", "GET")],
                )
                .await;
                assert_eq!(
                    answer.header("access-control-allow-origin"),
                    None,
                    "{method} {path} from {origin} must not be readable cross-origin"
                );
            }
        }
        let plain = admin_get(&open, path).await;
        assert_eq!(
            plain.header("access-control-allow-origin"),
            None,
            "no Origin, no CORS header"
        );
        let answer = admin_request(&open, "GET", path, &[("origin", listed)]).await;
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(
            answer.header("access-control-allow-origin"),
            Some(listed),
            "GET {path} from the listed origin"
        );
        let preflight = admin_request(
            &open,
            "OPTIONS",
            path,
            &[("origin", listed), ("access-control-request-method", "GET")],
        )
        .await;
        assert!(
            preflight.status < 300,
            "preflight of {path}: {}",
            preflight.status
        );
        assert_eq!(
            preflight.header("access-control-allow-origin"),
            Some(listed)
        );
    }
}

// ---------------------------------------------------------------------------------------
// OpenAPI

/// The venv of `scripts/install-python-test-tools.sh`; panics with the fix when it is missing.
fn test_tool(name: &str) -> PathBuf {
    let path = repo_root().join(".tools/testenv/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/install-python-test-tools.sh (the OpenAPI checks never skip)",
        path.display()
    );
    path
}

/// Runs the venv's Python on `script` with `input` on stdin; returns (success, stdout + stderr).
async fn python(script: &str, input: &[u8]) -> (bool, String) {
    let mut child = tokio::process::Command::new(test_tool("python3"))
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the test venv's python3 runs");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin
        .write_all(input)
        .await
        .expect("python reads its input");
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the python helper finishes within 60 s")
        .expect("the python helper can be waited for");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

async fn openapi_document(sidecar: &Sidecar) -> Value {
    let answer = admin_get(sidecar, "/openapi.json").await;
    assert_eq!(answer.status, 200);
    answer.json()
}

/// `(path, method, operation)` of every operation of the document.
fn operations(document: &Value) -> Vec<(String, String, Value)> {
    let paths = document["paths"]
        .as_object()
        .expect("the document has paths");
    let mut all = Vec::new();
    for (path, item) in paths {
        for (method, operation) in item.as_object().expect("a path item is an object") {
            if [
                "get", "put", "post", "delete", "options", "head", "patch", "trace",
            ]
            .contains(&method.as_str())
            {
                all.push((path.clone(), method.clone(), operation.clone()));
            }
        }
    }
    all
}

/// The documented response of `operation` for `status` (a `$ref` into
/// `components/responses` resolved), if that status is listed explicitly.
fn documented_response(document: &Value, operation: &Value, status: u16) -> Option<Value> {
    let response = operation["responses"].get(status.to_string())?;
    Some(match response["$ref"].as_str() {
        Some(reference) => {
            let name = reference
                .strip_prefix("#/components/responses/")
                .unwrap_or_else(|| panic!("unexpected response $ref {reference}"));
            document["components"]["responses"][name].clone()
        }
        None => response.clone(),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn openapi_document_is_valid_openapi_3_1() {
    let validator = test_tool("openapi-spec-validator");
    let (_relay, sidecar) = start(1, |builder| builder).await;
    let document = openapi_document(&sidecar).await;
    assert!(
        document["openapi"]
            .as_str()
            .is_some_and(|version| version.starts_with("3.1.")),
        "an OpenAPI 3.1 document: {}",
        document["openapi"]
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&document).expect("JSON")).expect("written");
    let output = tokio::process::Command::new(&validator)
        .args(["--schema", "3.1", "--validation-errors", "all"])
        .arg(&file)
        .output()
        .await
        .expect("openapi-spec-validator runs");
    assert!(
        output.status.success(),
        "openapi-spec-validator rejects /openapi.json:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn openapi_documents_every_served_path_and_every_documented_path_answers() {
    let (_relay, sidecar) = start(1, |builder| builder).await;
    let document = openapi_document(&sidecar).await;
    let documented: BTreeSet<String> = document["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .cloned()
        .collect();
    let served = served_paths();
    let undocumented: Vec<&String> = served.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in /openapi.json: {undocumented:?}"
    );
    let unserved: Vec<&String> = documented.difference(&served).collect();
    assert!(
        unserved.is_empty(),
        "in /openapi.json but not served: {unserved:?}"
    );

    for (path, method, operation) in operations(&document) {
        let concrete = path.replace("{id}", "1");
        let answer = admin_request(&sidecar, &method.to_uppercase(), &concrete, &[]).await;
        let response =
            documented_response(&document, &operation, answer.status).unwrap_or_else(|| {
                panic!(
                    "{} {concrete} answered {}, which /openapi.json does not list for {path}: {}",
                    method.to_uppercase(),
                    answer.status,
                    answer.text()
                )
            });
        if let Some(content) = response["content"].as_object() {
            assert!(
                content.contains_key(answer.content_type()),
                "{} {concrete}: Content-Type {:?} is not among the documented {:?}",
                method.to_uppercase(),
                answer.content_type(),
                content.keys().collect::<Vec<_>>()
            );
        }
    }
}

/// Validates each case's body against the schema the document gives for its operation and
/// status (or the named component schema); prints one line per failure and exits 1.
const VALIDATE_RESPONSES: &str = r##"
import json, sys
from openapi_schema_validator import OAS31Validator, oas31_format_checker

data = json.load(sys.stdin)
spec = data["spec"]
failures = []
for case in data["cases"]:
    label = f'{case["what"]} -> {case["status"]}'
    if case.get("component"):
        schema = {"$ref": "#/components/schemas/" + case["component"]}
    else:
        operation = spec["paths"][case["path"]][case["method"]]
        response = operation["responses"].get(str(case["status"]))
        if response is None:
            failures.append(f"{label}: status not documented")
            continue
        if "$ref" in response:
            response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
        media = response.get("content", {}).get("application/json")
        if media is None or "schema" not in media:
            failures.append(f"{label}: no application/json schema documented")
            continue
        schema = media["schema"]
    rooted = dict(schema)
    rooted["components"] = spec["components"]
    validator = OAS31Validator(rooted, format_checker=oas31_format_checker)
    for error in validator.iter_errors(case["body"]):
        where = "/".join(str(part) for part in error.absolute_path)
        failures.append(f"{label}: at /{where}: {error.message}")
for line in failures:
    print(line)
print(f"{len(data['cases'])} answers checked, {len(failures)} schema violations")
sys.exit(1 if failures else 0)
"##;

#[tokio::test(flavor = "multi_thread")]
async fn json_answers_match_their_documented_schemas() {
    test_tool("python3");
    let token = random_token();
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    let builder = Sidecar::builder().relay(&relay).pool_size(2);
    let token_file = builder.write_file("admin.token", token.as_bytes(), 0o600);
    let sidecar = builder
        .set_str("admin", "token_file", &token_file.display().to_string())
        .start()
        .await;
    sidecar.wait_ready().await;
    wait_all_active(&sidecar, 2).await;
    let statuses = traffic(&sidecar, Method::POST, "/", 20).await;
    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");

    let document = openapi_document(&sidecar).await;
    let auth = format!("Bearer {token}");
    let mut cases = Vec::new();
    let mut record =
        |what: String, path: &str, method: &str, answer: &Answer, component: Option<&str>| {
            cases.push(serde_json::json!({
                "what": what,
                "path": path,
                "method": method,
                "status": answer.status,
                "component": component,
                "body": answer.json(),
            }));
        };
    for (path, method, operation) in operations(&document) {
        let concrete = path.replace("{id}", "1");
        let answer = admin_request(
            &sidecar,
            &method.to_uppercase(),
            &concrete,
            &[("authorization", &auth)],
        )
        .await;
        let json = documented_response(&document, &operation, answer.status)
            .is_some_and(|response| response["content"].get("application/json").is_some());
        if json {
            record(format!("GET {concrete}"), &path, &method, &answer, None);
        }
        if path.starts_with("/api/v1/") {
            let denied = admin_request(&sidecar, &method.to_uppercase(), &concrete, &[]).await;
            record(
                format!("GET {concrete} without a token"),
                &path,
                &method,
                &denied,
                None,
            );
        }
        let wrong_method =
            admin_request(&sidecar, "POST", &concrete, &[("authorization", &auth)]).await;
        record(
            format!("POST {concrete}"),
            &path,
            &method,
            &wrong_method,
            None,
        );
    }
    for id in ["3", "abc", "0"] {
        let concrete = format!("/api/v1/secure-channel/connections/{id}");
        let answer = admin_request(&sidecar, "GET", &concrete, &[("authorization", &auth)]).await;
        record(
            format!("GET {concrete}"),
            CONNECTION_TEMPLATE,
            "get",
            &answer,
            None,
        );
    }
    let unknown = admin_get(&sidecar, "/no/such/path").await;
    record(
        "GET /no/such/path".into(),
        "",
        "get",
        &unknown,
        Some("Error"),
    );
    assert!(cases.len() > 20, "{} cases", cases.len());

    let input = serde_json::json!({"spec": document, "cases": cases});
    let (ok, report) = python(VALIDATE_RESPONSES, input.to_string().as_bytes()).await;
    assert!(ok, "admin answers do not match /openapi.json:\n{report}");
}

// ---------------------------------------------------------------------------------------
// `sprint-sidecar status`

fn status_args(admin_url: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "status".to_owned(),
        "--admin".to_owned(),
        admin_url.to_owned(),
    ];
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    args
}

/// The data rows of the status table: the lines after the `ID ...` header line up to the
/// first blank line, as whitespace-split cells.
fn table_rows(stdout: &str) -> Vec<Vec<String>> {
    let mut lines = stdout
        .lines()
        .skip_while(|line| !line.trim_start().starts_with("ID "));
    let header = lines
        .next()
        .unwrap_or_else(|| panic!("no table header line starting with ID:\n{stdout}"));
    for column in ["PROTOCOL", "STATE", "BREAKER", "P95"] {
        assert!(
            header.contains(column),
            "the header names {column}: {header:?}"
        );
    }
    lines
        .take_while(|line| !line.trim().is_empty())
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_command_finds_the_admin_port_and_token_in_the_sidecars_configuration() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let token = random_token();
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    let builder = Sidecar::builder().relay(&relay).pool_size(2);
    let token_file = builder.write_file("admin.token", token.as_bytes(), 0o600);
    let sidecar = builder
        .set_str("admin", "address", &format!("127.0.0.1:{port}"))
        .set_str("admin", "token_file", &token_file.display().to_string())
        .start()
        .await;
    sidecar.wait_ready().await;
    wait_all_active(&sidecar, 2).await;
    let config = sidecar.config_path().display().to_string();
    let cli = SidecarBuilder::new();

    // No --admin, no --token-file: both from the file, as `run --config` used them.
    let output = cli
        .run_args(&["status".into(), "--config".into(), config.clone()])
        .await;
    assert_eq!(output.code, Some(0), "{output:?}");
    assert_eq!(table_rows(&output.stdout).len(), 2, "{}", output.stdout);
    assert!(!output.stdout.contains(&token) && !output.stderr.contains(&token));

    // The same through the environment, the address given as the wildcard the chart binds.
    let output = SidecarBuilder::new()
        .env("SPRINT_SIDECAR_ADMIN_ADDRESS", &format!("0.0.0.0:{port}"))
        .env(
            "SPRINT_SIDECAR_ADMIN_TOKEN_FILE",
            &token_file.display().to_string(),
        )
        .run_args(&["status".into(), "--json".into()])
        .await;
    assert_eq!(output.code, Some(0), "{output:?}");
    assert!(
        output.stdout.contains("\"connections\""),
        "{}",
        output.stdout
    );

    // --admin still wins over the file; without the token the answer is a 401.
    let output = cli
        .run_args(&status_args(&sidecar.admin_url(""), &[]))
        .await;
    assert_eq!(output.code, Some(2), "{output:?}");
    assert!(output.stderr.contains("401"), "{output:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_command_prints_one_row_per_connection_and_exits_0_when_healthy() {
    let (_relay, sidecar) = start(3, |builder| builder).await;
    wait_all_active(&sidecar, 3).await;
    assert!(
        traffic(&sidecar, Method::GET, "/cli", 12)
            .await
            .iter()
            .all(|s| *s == 200)
    );
    let cli = SidecarBuilder::new();
    let admin = sidecar.admin_url("");

    let table = cli.run_args(&status_args(&admin, &[])).await;
    assert_eq!(table.code, Some(0), "healthy pool: {table:?}");
    let rows = table_rows(&table.stdout);
    assert_eq!(rows.len(), 3, "one row per connection:\n{}", table.stdout);
    let ids: BTreeSet<&str> = rows.iter().map(|row| row[0].as_str()).collect();
    assert_eq!(ids, BTreeSet::from(["1", "2", "3"]), "{}", table.stdout);
    for row in &rows {
        assert!(row.contains(&"h2".to_owned()), "protocol shown: {row:?}");
        assert!(
            row.contains(&"connected".to_owned()),
            "state shown: {row:?}"
        );
        assert!(row.contains(&"closed".to_owned()), "breaker shown: {row:?}");
    }
    assert!(table.stdout.contains("healthy"), "{}", table.stdout);

    let json = cli.run_args(&status_args(&admin, &["--json"])).await;
    assert_eq!(json.code, Some(0), "{json:?}");
    let document: Value = serde_json::from_str(&json.stdout)
        .unwrap_or_else(|error| panic!("--json prints the raw document: {error}\n{}", json.stdout));
    assert_fields("status --json", &document, POOL_STATUS_FIELDS);
    assert_eq!(
        document["connections"].as_array().map(Vec::len),
        Some(3),
        "{document}"
    );
    assert_eq!(document["pool_healthy"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_command_exits_1_when_the_pool_is_unhealthy() {
    let (relay, sidecar) = start(2, |builder| builder).await;
    relay.go_down().await;
    sidecar.wait_admin_status("/ready", 503).await;
    let answer = admin_get(&sidecar, "/api/v1/secure-channel/health").await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    let document = answer.json();
    assert_fields("/api/v1/secure-channel/health", &document, HEALTH_FIELDS);
    assert_eq!(document["status"], "unavailable");
    assert!(
        !document["reason"].as_str().unwrap_or("").is_empty(),
        "with a reason: {document}"
    );

    let cli = SidecarBuilder::new();
    let admin = sidecar.admin_url("");
    let table = cli.run_args(&status_args(&admin, &[])).await;
    assert_eq!(table.code, Some(1), "unhealthy pool: {table:?}");
    assert_eq!(
        table_rows(&table.stdout).len(),
        2,
        "the table still shows both slots:\n{}",
        table.stdout
    );
    assert!(table.stdout.contains("UNHEALTHY"), "{}", table.stdout);
    let json = cli.run_args(&status_args(&admin, &["--json"])).await;
    assert_eq!(json.code, Some(1), "{json:?}");
    let document: Value = serde_json::from_str(&json.stdout).expect("--json prints JSON");
    assert_eq!(document["pool_healthy"], false, "{document}");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_command_exits_2_when_the_admin_url_is_unreachable() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("an ephemeral port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let cli = SidecarBuilder::new();
    for extra in [&[][..], &["--json"][..]] {
        let output = cli.run_args(&status_args(&url, extra)).await;
        assert_eq!(output.code, Some(2), "unreachable admin URL: {output:?}");
        assert!(output.stdout.is_empty(), "nothing on stdout: {output:?}");
        assert!(
            output.stderr.contains(&format!("127.0.0.1:{port}")),
            "the error names the URL: {output:?}"
        );
    }
    let invalid = cli.run_args(&status_args("ftp://example", &[])).await;
    assert_eq!(invalid.code, Some(2), "{invalid:?}");
}

/// SPEC §7: a rotated `admin.token_file` takes effect without a restart, and the old token
/// is refused from then on.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_admin_token_replaces_the_old_one() {
    let (first, second) = (random_token(), random_token());
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    let builder = Sidecar::builder().relay(&relay).pool_size(1);
    let token_file = builder.write_file("admin.token", format!("{first}\n").as_bytes(), 0o600);
    let sidecar = builder
        .set_str("admin", "token_file", &token_file.display().to_string())
        .start()
        .await;
    sidecar.wait_ready().await;
    async fn status_with(sidecar: &Sidecar, token: &str) -> u16 {
        let bearer = format!("Bearer {token}");
        admin_request(
            sidecar,
            "GET",
            "/api/v1/status",
            &[("authorization", &bearer)],
        )
        .await
        .status
    }
    assert_eq!(status_with(&sidecar, &first).await, 200);
    assert_eq!(status_with(&sidecar, &second).await, 401);
    // Replaced the way Kubernetes and `mv` do: a new file renamed over the old one.
    let staging = token_file.with_extension("staging");
    support::pki::write_with_mode(&staging, format!("{second}\n").as_bytes(), 0o600);
    std::fs::rename(&staging, &token_file).expect("rename");
    // A token that does not match makes the file be checked at once: the new token works
    // from its first use.
    assert_eq!(status_with(&sidecar, &second).await, 200);
    assert_eq!(
        status_with(&sidecar, &first).await,
        401,
        "the old token is refused"
    );
    assert!(
        sidecar.logs_contain("admin token reloaded"),
        "the reload is logged"
    );
    assert!(
        !sidecar
            .logs()
            .iter()
            .any(|l| l.contains(&first) || l.contains(&second)),
        "no token in the logs"
    );
}
