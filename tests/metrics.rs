//! End to end, real binary, real TLS: the metrics of SPEC §6 and issue 5. After traffic that
//! makes every kind of event happen (successes, client errors, a 503 storm that trips the
//! breakers, resets that cause retries until the budget is spent, a refused TLS handshake),
//! `/metrics` in OpenMetrics parses with the strict Python parser, the Prometheus text format
//! passes `promtool check metrics` without a finding, every family of the issue exists with its
//! labels, `/api/v1/secure-channel/metrics` holds the pool's families only, and label sets stay
//! bounded whatever paths and methods clients send.
//!
//! Tools: `prometheus_client` from `.tools/testenv` (`scripts/install-python-test-tools.sh`)
//! and `promtool` from the Debian package `prometheus`. A missing tool fails the test.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reqwest::Method;
use serde::Deserialize;
use support::{Fault, Proto, Relay, Sidecar};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

// ---------------------------------------------------------------------------------------
// Tools

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The test venv's Python; panics with the fix when it is missing.
fn venv_python() -> PathBuf {
    let path = repo_root().join(".tools/testenv/bin/python3");
    assert!(
        path.exists(),
        "{} is missing: run scripts/install-python-test-tools.sh (the metrics checks never skip)",
        path.display()
    );
    path
}

/// `promtool` from PATH (Debian package `prometheus`); panics with the fix when missing.
fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("promtool"))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "promtool is not on PATH: install the Debian package `prometheus` \
             (apt-get install prometheus); the metrics checks never skip"
        )
    })
}

/// Runs `program args` with `input` on stdin (bounded by 60 s); returns (exit code, stdout,
/// stderr).
async fn run_with_stdin(
    program: &Path,
    args: &[&str],
    input: &[u8],
) -> (Option<i32>, String, String) {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|error| panic!("{} cannot be started: {error}", program.display()));
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin.write_all(input).await.expect("the tool reads stdin");
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{} did not finish within 60 s", program.display()))
        .expect("the tool can be waited for");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Parses an exposition with prometheus_client and prints it as JSON. `openmetrics` uses the
/// strict OpenMetrics parser (it rejects a missing `# EOF`, bad units, unknown types...);
/// `text` the Prometheus text format 0.0.4 parser. Values are strings (`+Inf`, `NaN`).
const PARSE_EXPOSITION: &str = r#"
import json, sys

mode = sys.argv[1]
text = sys.stdin.read()
if mode == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
families = []
for family in text_string_to_metric_families(text):
    families.append({
        "name": family.name,
        "type": family.type,
        "unit": family.unit,
        "help": family.documentation,
        "samples": [
            {"name": s.name, "labels": dict(s.labels), "value": repr(float(s.value))}
            for s in family.samples
        ],
    })
json.dump(families, sys.stdout)
"#;

#[derive(Debug, Clone, Deserialize)]
struct Family {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    unit: String,
    help: String,
    samples: Vec<Sample>,
}

#[derive(Debug, Clone, Deserialize)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: String,
}

impl Sample {
    fn value(&self) -> f64 {
        self.value
            .parse()
            .unwrap_or_else(|_| panic!("unparseable sample value {:?}", self.value))
    }
}

/// Parses `text` with prometheus_client (`mode` "openmetrics" or "text"); panics with the
/// parser's complaint when it rejects the exposition.
async fn parse(mode: &str, text: &str) -> Vec<Family> {
    let (code, stdout, stderr) = run_with_stdin(
        &venv_python(),
        &["-c", PARSE_EXPOSITION, mode],
        text.as_bytes(),
    )
    .await;
    assert_eq!(
        code,
        Some(0),
        "the {mode} parser rejects the exposition:\n{stderr}\n--- exposition ---\n{text}"
    );
    serde_json::from_str(&stdout).expect("the parser helper prints JSON")
}

/// Family name → family.
fn by_name(families: &[Family]) -> BTreeMap<String, Family> {
    families
        .iter()
        .map(|family| (family.name.clone(), family.clone()))
        .collect()
}

/// Every series of an exposition: sample name and labels.
fn series(families: &[Family]) -> BTreeSet<String> {
    families
        .iter()
        .flat_map(|family| &family.samples)
        .map(|sample| format!("{}{:?}", sample.name, sample.labels))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Sidecar and traffic

async fn scrape(sidecar: &Sidecar, path: &str, accept: &str) -> (String, String) {
    let response = sidecar
        .client()
        .get(sidecar.admin_url(path))
        .header("accept", accept)
        .send()
        .await
        .unwrap_or_else(|error| panic!("scraping {path} failed: {error}"));
    assert_eq!(response.status(), 200, "GET {path}");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = response.text().await.expect("the exposition is text");
    (content_type, body)
}

/// Scrapes `path` as OpenMetrics and parses it strictly.
async fn scrape_openmetrics(sidecar: &Sidecar, path: &str) -> (String, Vec<Family>) {
    let (content_type, text) = scrape(sidecar, path, "application/openmetrics-text").await;
    assert!(
        content_type.starts_with(OPENMETRICS),
        "{path} with Accept: application/openmetrics-text answers {content_type:?}"
    );
    assert!(
        text.ends_with("# EOF\n"),
        "an OpenMetrics exposition ends with # EOF:\n{text}"
    );
    let families = parse("openmetrics", &text).await;
    (text, families)
}

/// Sends `count` requests, 8 at a time; returns the statuses (0 for a transport error).
async fn traffic(sidecar: &Sidecar, method: Method, path: &str, count: usize) -> Vec<u16> {
    let mut tasks = JoinSet::new();
    let mut statuses = Vec::new();
    for _ in 0..count {
        if tasks.len() >= 8
            && let Some(status) = tasks.join_next().await
        {
            statuses.push(status.expect("request task"));
        }
        let mut request = sidecar
            .client()
            .request(method.clone(), sidecar.data_url(path));
        if method == Method::POST {
            request = request.body(r#"{"jsonrpc":"2.0","id":7,"method":"getblockcount"}"#);
        }
        tasks.spawn(async move {
            match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let _ = response.bytes().await;
                    status
                }
                Err(_) => 0,
            }
        });
    }
    while let Some(status) = tasks.join_next().await {
        statuses.push(status.expect("request task"));
    }
    statuses
}

const POOL_SIZE: usize = 3;

async fn start(
    configure: impl FnOnce(support::SidecarBuilder) -> support::SidecarBuilder,
) -> (Relay, Sidecar) {
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    let sidecar = configure(Sidecar::builder().relay(&relay).pool_size(POOL_SIZE))
        .start()
        .await;
    sidecar.wait_ready().await;
    (relay, sidecar)
}

/// Waits until counter `family` (its `_total` samples summed) is above zero.
async fn wait_counted(sidecar: &Sidecar, family: &str) {
    let sample = format!("{family}_total");
    support::eventually(support::EVENTUALLY, &format!("{sample} > 0"), || async {
        let (_, families) = scrape_openmetrics(sidecar, "/metrics").await;
        let counted = by_name(&families)
            .get(family)
            .is_some_and(|family| total(family, &sample) > 0.0);
        counted.then_some(())
    })
    .await;
}

/// Sends `count` requests and asserts that each was answered `status`.
async fn expect_all(sidecar: &Sidecar, method: Method, path: &str, count: usize, status: u16) {
    let statuses = traffic(sidecar, method.clone(), path, count).await;
    assert!(
        statuses.iter().all(|answered| *answered == status),
        "{method} {path}: expected {count} × {status}, got {statuses:?}"
    );
}

/// A sidecar after traffic that makes every kind of event happen at least once.
async fn busy() -> (Relay, Sidecar) {
    let (relay, sidecar) = start(|builder| {
        builder
            // Spend the retry budget fast: only the fixed minimum of retries per window.
            .set("retry", "budget_ratio", "0.0")
            // Tripped breakers come back quickly for the next phase.
            .set_str("breaker", "open_duration", "200ms")
            .set_str("breaker", "max_open_duration", "1s")
    })
    .await;

    // Successes and client errors, by two methods.
    expect_all(&sidecar, Method::GET, "/ok", 20, 200).await;
    expect_all(&sidecar, Method::POST, "/", 20, 200).await;
    expect_all(&sidecar, Method::GET, "/status/404", 10, 404).await;

    // Resets after the request: idempotent GETs are retried until the budget is spent.
    relay.set_fault(Fault::ResetAfterRequest);
    traffic(&sidecar, Method::GET, "/reset", 12).await;
    relay.heal();
    wait_counted(&sidecar, "sprint_sidecar_upstream_retry_budget_exhausted").await;
    sidecar.wait_ready().await;

    // A dial that fails: the relay closes new connections before the TLS handshake.
    relay.set_fault(Fault::AcceptThenClose);
    relay.close_connections();
    wait_counted(&sidecar, "sprint_sidecar_upstream_tls_handshake_failures").await;
    relay.heal();
    sidecar.wait_ready().await;

    // A 503 storm trips breakers.
    relay.set_fault(Fault::Status(503));
    traffic(&sidecar, Method::GET, "/storm", 30).await;
    relay.heal();
    support::eventually(support::EVENTUALLY, "a breaker to open", || async {
        let (_, families) = scrape_openmetrics(&sidecar, "/metrics").await;
        let opened = by_name(&families)
            .get("sprint_sidecar_upstream_breaker_transitions")
            .is_some_and(|family| {
                family.samples.iter().any(|s| {
                    s.labels.get("to").map(String::as_str) == Some("open") && s.value() > 0.0
                })
            });
        opened.then_some(())
    })
    .await;

    // Back to normal once the breakers have let probes through.
    support::eventually(support::EVENTUALLY, "requests to succeed again", || async {
        let statuses = traffic(&sidecar, Method::GET, "/again", 8).await;
        statuses.iter().all(|s| *s == 200).then_some(())
    })
    .await;
    (relay, sidecar)
}

// ---------------------------------------------------------------------------------------
// Formats

#[tokio::test(flavor = "multi_thread")]
async fn openmetrics_exposition_parses_with_the_strict_parser() {
    let (_relay, sidecar) = busy().await;
    let (text, families) = scrape_openmetrics(&sidecar, "/metrics").await;
    assert!(families.len() >= 20, "{} families:\n{text}", families.len());
    for family in &families {
        assert!(
            family.name.starts_with("sprint_sidecar_"),
            "family {} lacks the sprint_sidecar_ prefix",
            family.name
        );
        assert!(
            !family.help.is_empty(),
            "family {} has help text",
            family.name
        );
        if !family.unit.is_empty() {
            assert!(
                family.name.ends_with(&format!("_{}", family.unit)),
                "family {} carries its unit {} in its name",
                family.name,
                family.unit
            );
        }
    }
    // No Accept header: OpenMetrics too (what Prometheus itself negotiates to).
    let bare = sidecar
        .client()
        .get(sidecar.admin_url("/metrics"))
        .send()
        .await
        .expect("scrape");
    let content_type = bare.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .to_owned();
    assert!(content_type.starts_with(OPENMETRICS), "{content_type}");
}

/// Runs `promtool check metrics` on `text`: its exit code and every non-empty output line,
/// trimmed. promtool prints lint findings (naming, help, counters without _total...) on
/// stdout and parse errors on stderr; both count.
async fn promtool_check(promtool: &Path, text: &str) -> (Option<i32>, String) {
    let (code, stdout, stderr) =
        run_with_stdin(promtool, &["check", "metrics"], text.as_bytes()).await;
    let lines: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    (code, lines.join("\n"))
}

/// promtool findings that are accepted, each with the reason. Empty: today every line
/// promtool prints is a failure.
const ACCEPTED_PROMTOOL_FINDINGS: &[(&str, &str)] = &[];

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_text_exposition_passes_promtool_without_findings() {
    let promtool = promtool();
    let (_relay, sidecar) = busy().await;
    // The pool's endpoint is Prometheus text also for curl's `Accept: */*` (SPEC §6).
    for (path, accept) in [
        ("/metrics", "text/plain"),
        ("/api/v1/secure-channel/metrics", "text/plain"),
        ("/api/v1/secure-channel/metrics", "*/*"),
    ] {
        let (content_type, text) = scrape(&sidecar, path, accept).await;
        assert!(
            content_type.starts_with(PROMETHEUS_TEXT),
            "{path} with Accept: {accept} answers {content_type:?}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{path}: OpenMetrics-only lines in the text format"
        );
        let (code, output) = promtool_check(&promtool, &text).await;
        let findings: Vec<&str> = output
            .lines()
            .filter(|line| {
                !ACCEPTED_PROMTOOL_FINDINGS
                    .iter()
                    .any(|(finding, _reason)| line.contains(finding))
            })
            .collect();
        assert!(
            code == Some(0) && findings.is_empty(),
            "promtool check metrics on {path} (exit {code:?}):\n{}\n--- exposition ---\n{text}",
            findings.join("\n")
        );

        // Both formats describe the same series.
        let text_families = parse("text", &text).await;
        let (_, open_families) = scrape_openmetrics(&sidecar, path).await;
        let text_series = series(&text_families);
        let open_series = series(&open_families);
        let only_text: Vec<_> = text_series.difference(&open_series).collect();
        let only_open: Vec<_> = open_series.difference(&text_series).collect();
        assert!(
            only_text.is_empty() && only_open.is_empty(),
            "{path}: the formats disagree; only in text: {only_text:?}; only in OpenMetrics: {only_open:?}"
        );
    }
}

/// promtool 2.x reads only the Prometheus text format. Fed the OpenMetrics exposition that
/// `/metrics` serves by default, it must still parse every line (no `info` or other
/// OpenMetrics-only type). The one kind of finding it may print is inherent to OpenMetrics:
/// a counter family `x` exposes its sample as `x_total`, which the text parser reads as a
/// separate family without help.
#[tokio::test(flavor = "multi_thread")]
async fn promtool_parses_the_default_openmetrics_exposition() {
    let promtool = promtool();
    let (_relay, sidecar) = busy().await;
    let (content_type, text) = scrape(&sidecar, "/metrics", "*/*").await;
    assert!(content_type.starts_with(OPENMETRICS), "{content_type}");
    let counters: BTreeSet<String> = parse("openmetrics", &text)
        .await
        .into_iter()
        .filter(|family| family.kind == "counter")
        .map(|family| family.name)
        .collect();
    assert!(!counters.is_empty(), "counters in the exposition:\n{text}");
    let (code, output) = promtool_check(&promtool, &text).await;
    let unexpected: Vec<&str> = output
        .lines()
        .filter(|line| {
            let counter_help = line
                .strip_suffix(" no help text")
                .and_then(|name| name.strip_suffix("_total"))
                .is_some_and(|family| counters.contains(family));
            !counter_help
        })
        .collect();
    assert!(
        matches!(code, Some(0) | Some(3)) && unexpected.is_empty(),
        "promtool check metrics on the OpenMetrics /metrics (exit {code:?}):\n{}\n--- exposition ---\n{text}",
        unexpected.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// Families

/// Asserts that `name` exists with `kind` and returns it.
fn family<'a>(families: &'a BTreeMap<String, Family>, name: &str, kind: &str) -> &'a Family {
    let family = families.get(name).unwrap_or_else(|| {
        panic!(
            "no family {name}; families: {:?}",
            families.keys().collect::<Vec<_>>()
        )
    });
    assert_eq!(family.kind, kind, "{name} is a {kind}");
    family
}

/// The values label `label` takes in the samples of `family` named `sample`.
fn label_values(family: &Family, sample: &str, label: &str) -> BTreeSet<String> {
    family
        .samples
        .iter()
        .filter(|s| s.name == sample)
        .map(|s| {
            s.labels
                .get(label)
                .unwrap_or_else(|| panic!("{} has no label {label}: {:?}", s.name, s.labels))
                .clone()
        })
        .collect()
}

/// The sum of the samples of `family` named `sample`.
fn total(family: &Family, sample: &str) -> f64 {
    family
        .samples
        .iter()
        .filter(|s| s.name == sample)
        .map(Sample::value)
        .sum()
}

fn set(values: &[&str]) -> BTreeSet<String> {
    values.iter().map(|value| (*value).to_owned()).collect()
}

const METHOD_CLASSES: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "OTHER",
];
const STATUS_CLASSES: &[&str] = &["1xx", "2xx", "3xx", "4xx", "5xx"];

#[tokio::test(flavor = "multi_thread")]
async fn every_family_exists_after_traffic_with_bounded_labels() {
    let (_relay, sidecar) = busy().await;
    let (text, families) = scrape_openmetrics(&sidecar, "/metrics").await;
    let families = by_name(&families);
    let context = format!("\n--- exposition ---\n{text}");

    // Requests by method class and status class.
    let requests = family(&families, "sprint_sidecar_requests", "counter");
    let methods = label_values(requests, "sprint_sidecar_requests_total", "method");
    let classes = label_values(requests, "sprint_sidecar_requests_total", "status_class");
    assert!(methods.is_superset(&set(&["GET", "POST"])), "{methods:?}");
    assert!(methods.is_subset(&set(METHOD_CLASSES)), "{methods:?}");
    assert!(
        classes.is_superset(&set(&["2xx", "4xx", "5xx"])),
        "{classes:?}"
    );
    assert!(classes.is_subset(&set(STATUS_CLASSES)), "{classes:?}");
    assert!(
        total(requests, "sprint_sidecar_requests_total") >= 100.0,
        "{context}"
    );

    // Durations: histograms in seconds.
    for (name, labels) in [
        ("sprint_sidecar_request_duration_seconds", None),
        (
            "sprint_sidecar_upstream_attempt_duration_seconds",
            Some("outcome"),
        ),
    ] {
        let histogram = family(&families, name, "histogram");
        assert_eq!(histogram.unit, "seconds", "{name}");
        assert!(
            total(histogram, &format!("{name}_count")) > 0.0,
            "{name}{context}"
        );
        let les = label_values(histogram, &format!("{name}_bucket"), "le");
        assert!(
            les.contains("+Inf") && les.len() > 5,
            "{name} buckets: {les:?}"
        );
        if let Some(label) = labels {
            let outcomes = label_values(histogram, &format!("{name}_count"), label);
            assert_eq!(outcomes, set(&["success", "failure", "refused"]), "{name}");
        }
    }

    // Waits in the pool's line: a histogram in seconds (only requests that waited count).
    let name = "sprint_sidecar_upstream_wait_duration_seconds";
    let waits = family(&families, name, "histogram");
    assert_eq!(waits.unit, "seconds", "{name}");
    assert!(total(waits, &format!("{name}_count")) >= 0.0);
    let les = label_values(waits, &format!("{name}_bucket"), "le");
    assert!(
        les.contains("+Inf") && les.len() > 5,
        "{name} buckets: {les:?}"
    );

    // Retries and the budget.
    let retries = family(&families, "sprint_sidecar_upstream_retries", "counter");
    assert!(
        total(retries, "sprint_sidecar_upstream_retries_total") > 0.0,
        "{context}"
    );
    let reasons = label_values(retries, "sprint_sidecar_upstream_retries_total", "reason");
    assert!(
        reasons.is_subset(&set(&["refused", "never_sent", "idempotent"])),
        "{reasons:?}"
    );
    let exhausted = family(
        &families,
        "sprint_sidecar_upstream_retry_budget_exhausted",
        "counter",
    );
    assert!(
        total(
            exhausted,
            "sprint_sidecar_upstream_retry_budget_exhausted_total"
        ) > 0.0
    );

    // In flight and client connections.
    let in_flight = family(&families, "sprint_sidecar_in_flight_requests", "gauge");
    assert_eq!(
        total(in_flight, "sprint_sidecar_in_flight_requests"),
        0.0,
        "nothing in flight now"
    );
    let abandoned = family(&families, "sprint_sidecar_requests_abandoned", "counter");
    assert!(total(abandoned, "sprint_sidecar_requests_abandoned_total") >= 0.0);
    let waiting = family(
        &families,
        "sprint_sidecar_upstream_waiting_requests",
        "gauge",
    );
    assert_eq!(
        total(waiting, "sprint_sidecar_upstream_waiting_requests"),
        0.0,
        "nothing waits for a connection now"
    );
    let clients = family(&families, "sprint_sidecar_client_connections", "gauge");
    assert!(total(clients, "sprint_sidecar_client_connections") >= 0.0);

    // Upstream connections by state: every state, adding up to the pool size.
    let upstream = family(&families, "sprint_sidecar_upstream_connections", "gauge");
    assert_eq!(
        label_values(upstream, "sprint_sidecar_upstream_connections", "state"),
        set(&["connecting", "connected", "backoff", "draining"])
    );
    assert_eq!(
        total(upstream, "sprint_sidecar_upstream_connections"),
        POOL_SIZE as f64,
        "{context}"
    );

    // Breaker state per slot: exactly the slots 1..=pool.size, the status API's connection ids.
    let breakers = family(&families, "sprint_sidecar_upstream_breaker_state", "gauge");
    let slots: BTreeSet<String> = (1..=POOL_SIZE).map(|slot| slot.to_string()).collect();
    assert_eq!(
        label_values(breakers, "sprint_sidecar_upstream_breaker_state", "slot"),
        slots
    );
    for sample in &breakers.samples {
        assert!(
            [0.0, 1.0, 2.0].contains(&sample.value()),
            "breaker state value: {sample:?}"
        );
    }
    let p95 = family(
        &families,
        "sprint_sidecar_upstream_latency_p95_seconds",
        "gauge",
    );
    assert_eq!(
        label_values(p95, "sprint_sidecar_upstream_latency_p95_seconds", "slot"),
        slots
    );

    // Breaker transitions by new state and reason.
    let transitions = family(
        &families,
        "sprint_sidecar_upstream_breaker_transitions",
        "counter",
    );
    let to = label_values(
        transitions,
        "sprint_sidecar_upstream_breaker_transitions_total",
        "to",
    );
    assert!(
        to.contains("open") && to.is_subset(&set(&["open", "half_open", "closed"])),
        "{to:?}"
    );
    let reasons = label_values(
        transitions,
        "sprint_sidecar_upstream_breaker_transitions_total",
        "reason",
    );
    assert!(
        !reasons.is_empty()
            && reasons.is_subset(&set(&[
                "consecutive_failures",
                "failure_rate",
                "probe_failed",
                "connect_failure",
                "recovered",
            ])),
        "{reasons:?}"
    );

    // Reconnects, TLS handshakes and failures.
    let reconnects = family(&families, "sprint_sidecar_upstream_reconnects", "counter");
    assert!(
        total(reconnects, "sprint_sidecar_upstream_reconnects_total") > 0.0,
        "{context}"
    );
    let handshakes = family(
        &families,
        "sprint_sidecar_upstream_tls_handshakes",
        "counter",
    );
    assert!(total(handshakes, "sprint_sidecar_upstream_tls_handshakes_total") >= POOL_SIZE as f64);
    let failures = family(
        &families,
        "sprint_sidecar_upstream_tls_handshake_failures",
        "counter",
    );
    assert!(
        total(
            failures,
            "sprint_sidecar_upstream_tls_handshake_failures_total"
        ) > 0.0
    );
    let reasons = label_values(
        failures,
        "sprint_sidecar_upstream_tls_handshake_failures_total",
        "reason",
    );
    assert!(
        reasons.is_subset(&set(&["connect", "timeout", "certificate"])),
        "{reasons:?}"
    );

    // Bytes in and out.
    for name in [
        "sprint_sidecar_client_received_bytes",
        "sprint_sidecar_client_sent_bytes",
    ] {
        let bytes = family(&families, name, "counter");
        assert_eq!(bytes.unit, "bytes", "{name}");
        assert!(
            total(bytes, &format!("{name}_total")) > 0.0,
            "{name}{context}"
        );
    }

    // Secure buffers and locked bytes.
    let buffers = family(&families, "sprint_sidecar_secure_buffers", "gauge");
    assert!(total(buffers, "sprint_sidecar_secure_buffers") >= 0.0);
    let locked = family(
        &families,
        "sprint_sidecar_secure_buffer_locked_bytes",
        "gauge",
    );
    assert_eq!(locked.unit, "bytes");

    // The memory self-check, run at scrape time, as the admin API reports it.
    let check = family(
        &families,
        "sprint_sidecar_memory_self_check_passed",
        "gauge",
    );
    let (_, report) = sidecar
        .get_json("/api/v1/memory-protection/self-check")
        .await;
    let passed = report["passed"]
        .as_bool()
        .expect("the self-check says passed");
    assert_eq!(
        total(check, "sprint_sidecar_memory_self_check_passed"),
        if passed { 1.0 } else { 0.0 },
        "the gauge follows the self-check: {report}"
    );

    // Build info.
    let build = family(&families, "sprint_sidecar_build_info", "gauge");
    assert_eq!(
        label_values(build, "sprint_sidecar_build_info", "version"),
        set(&[env!("CARGO_PKG_VERSION")])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_metrics_endpoint_holds_only_the_pool_families() {
    let (_relay, sidecar) = busy().await;
    let (_, all) = scrape_openmetrics(&sidecar, "/metrics").await;
    let (text, pool) = scrape_openmetrics(&sidecar, "/api/v1/secure-channel/metrics").await;
    let pool_names: BTreeSet<String> = pool.iter().map(|family| family.name.clone()).collect();
    let expected: BTreeSet<String> = all
        .iter()
        .map(|family| family.name.clone())
        .filter(|name| name.starts_with("sprint_sidecar_upstream_"))
        .collect();
    assert_eq!(
        pool_names, expected,
        "the pool endpoint serves exactly the upstream families of /metrics:\n{text}"
    );
    for name in [
        "sprint_sidecar_upstream_breaker_state",
        "sprint_sidecar_upstream_connections",
        "sprint_sidecar_upstream_reconnects",
        "sprint_sidecar_upstream_attempt_duration_seconds",
    ] {
        assert!(
            pool_names.contains(name),
            "{name} in the pool families:\n{text}"
        );
    }
    for name in [
        "sprint_sidecar_requests",
        "sprint_sidecar_build_info",
        "sprint_sidecar_secure_buffers",
        "sprint_sidecar_client_connections",
    ] {
        assert!(
            !pool_names.contains(name),
            "{name} is not a pool family:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Bounded label sets

/// A small xorshift generator seeded from the process's random hasher keys.
struct Random(u64);

impl Random {
    fn new() -> Self {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        Random(hasher.finish() | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn token(&mut self, len: usize, alphabet: &[u8]) -> String {
        (0..len)
            .map(|_| alphabet[(self.next() % alphabet.len() as u64) as usize] as char)
            .collect()
    }
}

const STATUSES: [u16; 5] = [200, 204, 302, 404, 500];
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "custom",
];

/// 200 requests covering every (method, status) pair the same number of times, each with a
/// random path or query and, for the custom method, a random method token. Returns the
/// random strings used.
async fn random_round(sidecar: &Sidecar, random: &mut Random) -> Vec<String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a plain reqwest client builds");
    let mut used = Vec::new();
    let mut tasks = JoinSet::new();
    for i in 0..200 {
        let method = match METHODS[i % METHODS.len()] {
            "custom" => {
                let token = format!("X{}", random.token(7, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"));
                used.push(token.clone());
                token
            }
            known => known.to_owned(),
        };
        let status = STATUSES[(i / METHODS.len()) % STATUSES.len()];
        let nonce = random.token(12, b"abcdefghijklmnopqrstuvwxyz0123456789");
        used.push(nonce.clone());
        let path = if status == 200 {
            format!("/{nonce}/{}", random.token(6, b"abcdefghij"))
        } else {
            format!("/status/{status}?nonce={nonce}")
        };
        let request = client
            .request(
                Method::from_bytes(method.as_bytes()).expect("a method token"),
                sidecar.data_url(&path),
            )
            .header("x-random", nonce.as_str());
        if tasks.len() >= 8 {
            let _ = tasks.join_next().await;
        }
        tasks.spawn(async move {
            if let Ok(response) = request.send().await {
                let _ = response.bytes().await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    used
}

#[tokio::test(flavor = "multi_thread")]
async fn label_sets_stay_bounded_under_random_paths_and_methods() {
    let (_relay, sidecar) = start(|builder| builder).await;
    let mut random = Random::new();

    let mut used = random_round(&sidecar, &mut random).await;
    let (_, first) = scrape_openmetrics(&sidecar, "/metrics").await;
    used.extend(random_round(&sidecar, &mut random).await);
    let (text, second) = scrape_openmetrics(&sidecar, "/metrics").await;

    let before = series(&first);
    let after = series(&second);
    let added: Vec<&String> = after.difference(&before).collect();
    assert!(
        added.is_empty(),
        "200 more requests with random paths and methods added series: {added:?}"
    );
    assert_eq!(before.len(), after.len());

    let requests = by_name(&second)
        .remove("sprint_sidecar_requests")
        .expect("the requests family");
    let methods = label_values(&requests, "sprint_sidecar_requests_total", "method");
    assert!(methods.is_subset(&set(METHOD_CLASSES)), "{methods:?}");
    assert!(
        methods.contains("OTHER"),
        "custom methods are counted as OTHER: {methods:?}"
    );
    assert!(requests.samples.len() <= METHOD_CLASSES.len() * STATUS_CLASSES.len());
    assert!(
        total(&requests, "sprint_sidecar_requests_total") >= 400.0,
        "every request was counted"
    );
    let leaked: Vec<&String> = used
        .iter()
        .filter(|token| text.contains(token.as_str()))
        .collect();
    assert!(
        leaked.is_empty(),
        "client-chosen strings became label values: {leaked:?}"
    );
}
