//! End to end, real binary, fault-injecting TLS relay: per-connection circuit breakers and
//! pool health (issue 3, SPEC §4 `[breaker]`, §5–§6). A breaker trips on consecutive
//! failures or on the failure rate, admits exactly one half-open probe, closes on its
//! success; when no connection can take a request the client gets 503 + Retry-After at
//! once; `/ready` follows; a slow connection is ejected while the others keep serving.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::{Fault, Proto, Relay, Sidecar, SidecarBuilder, assert_json_error};
use tokio::task::JoinSet;

/// An answer as the client saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: Option<String>,
    /// True when the relay produced the answer (it stamps `x-relay-connection-id`).
    from_relay: bool,
    body: Bytes,
    elapsed: Duration,
}

impl Answer {
    /// The sidecar's own fail-fast answer: 503, Retry-After, JSON error, relay not involved.
    fn is_fail_fast(&self) -> bool {
        self.status == 503 && !self.from_relay && self.retry_after.is_some()
    }

    fn assert_fail_fast(&self, bound: Duration) {
        assert!(
            self.is_fail_fast(),
            "expected the sidecar's 503 + Retry-After, got {} (from relay: {}, retry-after: {:?}): {}",
            self.status,
            self.from_relay,
            self.retry_after,
            String::from_utf8_lossy(&self.body)
        );
        let seconds: u64 = self
            .retry_after
            .as_deref()
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("Retry-After must be whole seconds: {:?}", self.retry_after));
        assert!(seconds <= 120, "Retry-After {seconds} s");
        assert_json_error(self.status, &self.body);
        assert!(
            self.elapsed < bound,
            "fail fast took {:?} (bound {bound:?})",
            self.elapsed
        );
    }
}

async fn send(sidecar: &Sidecar, method: &str, path: &str) -> Answer {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("valid method");
    let started = Instant::now();
    let mut request = sidecar
        .client()
        .request(method.clone(), sidecar.data_url(path));
    if method == reqwest::Method::POST {
        request = request.json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "x"}));
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|error| panic!("{method} {path}: no answer from the sidecar: {error}"));
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let from_relay = response.headers().contains_key("x-relay-connection-id");
    let body = response.bytes().await.unwrap_or_default();
    Answer {
        status,
        retry_after,
        from_relay,
        body,
        elapsed: started.elapsed(),
    }
}

/// A relay and a ready sidecar with retries off (one attempt) so that every request is
/// exactly one relay hit, and the failure-rate rule out of the way unless a test sets it.
async fn start(configure: impl FnOnce(SidecarBuilder) -> SidecarBuilder) -> (Relay, Sidecar) {
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    let builder = Sidecar::builder()
        .relay(&relay)
        .set("retry", "max_attempts", "1")
        .set("breaker", "min_requests", "1000")
        .set_str("pool", "request_timeout", "5s");
    let sidecar = configure(builder).start().await;
    sidecar.wait_ready().await;
    (relay, sidecar)
}

/// Sends sequential GETs until the sidecar fails fast (bounded); returns that answer.
async fn drive_until_fail_fast(sidecar: &Sidecar, path: &str, max_requests: usize) -> Answer {
    for _ in 0..max_requests {
        let answer = send(sidecar, "GET", path).await;
        if !answer.from_relay {
            return answer;
        }
    }
    panic!(
        "no fail-fast answer after {max_requests} requests; logs:\n{}",
        sidecar.logs().join("\n")
    );
}

async fn connections(sidecar: &Sidecar) -> Vec<serde_json::Value> {
    let (status, document) = sidecar.get_json("/api/v1/secure-channel/connections").await;
    assert_eq!(status, 200, "{document}");
    document["connections"]
        .as_array()
        .unwrap_or_else(|| panic!("{{\"connections\": [...]}} expected: {document}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn breakers_open_after_consecutive_failures_and_the_pool_fails_fast() {
    let (relay, sidecar) = start(|sidecar| {
        sidecar
            .pool_size(2)
            .set("breaker", "consecutive_failures", "3")
            .set_str("breaker", "open_duration", "20s")
            .set_str("breaker", "max_open_duration", "30s")
    })
    .await;
    relay
        .wait_for_open_connections(2, support::EVENTUALLY)
        .await;
    relay.set_fault(Fault::Status(503));

    let first = drive_until_fail_fast(&sidecar, "/storm", 30).await;
    first.assert_fail_fast(Duration::from_secs(1));
    assert_eq!(
        relay.request_count(),
        6,
        "each of the 2 connections takes exactly 3 failures before its breaker opens"
    );

    // Open pool: every method fails fast, nothing reaches the relay, well under request_timeout.
    let before = relay.request_count();
    for method in ["GET", "POST", "PUT"] {
        send(&sidecar, method, "/while-open")
            .await
            .assert_fail_fast(Duration::from_secs(1));
    }
    assert_eq!(
        relay.request_count(),
        before,
        "an open pool sends nothing upstream"
    );

    assert_eq!(sidecar.admin_status("/ready").await, Some(503));
    assert_eq!(
        sidecar.admin_status("/health").await,
        Some(200),
        "liveness is not readiness"
    );
    let (status, health) = sidecar.get_json("/api/v1/secure-channel/health").await;
    assert_eq!(status, 503, "{health}");
    assert!(
        health["reason"]
            .as_str()
            .is_some_and(|reason| !reason.is_empty()),
        "the health document gives a reason: {health}"
    );
    for connection in connections(&sidecar).await {
        assert_eq!(connection["circuit_breaker"], "open", "{connection}");
        assert_eq!(connection["is_healthy"], false, "{connection}");
        assert_eq!(
            connection["breaker"]["trip_reason"], "consecutive_failures",
            "{connection}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn half_open_breaker_admits_exactly_one_probe_then_closes() {
    let (relay, sidecar) = start(|sidecar| {
        sidecar
            .pool_size(1)
            .set("breaker", "consecutive_failures", "2")
            .set_str("breaker", "open_duration", "1s")
            .set_str("breaker", "max_open_duration", "2s")
    })
    .await;
    relay.set_fault(Fault::Status(503));
    drive_until_fail_fast(&sidecar, "/trip", 10)
        .await
        .assert_fail_fast(Duration::from_secs(1));
    assert_eq!(relay.request_count(), 2);

    // The relay recovers but answers slowly, so the probe is still in flight while the rest
    // of its batch arrives: they must fail fast, not pile onto the half-open connection.
    relay.set_fault(Fault::Delay(Duration::from_millis(500)));
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut round = 0;
    let probe_batch = loop {
        assert!(
            Instant::now() < deadline,
            "no probe was admitted within 6 s of open_duration = 1s"
        );
        round += 1;
        let before = relay.request_count();
        let mut batch = JoinSet::new();
        for k in 0..8 {
            let client = sidecar.client().clone();
            let url = sidecar.data_url(&format!("/probe/{round}/{k}"));
            batch.spawn(async move {
                let response = client.get(url).send().await.expect("the sidecar answers");
                (
                    response.status().as_u16(),
                    response.headers().contains_key("x-relay-connection-id"),
                )
            });
        }
        let mut answers = Vec::new();
        while let Some(answer) = batch.join_next().await {
            answers.push(answer.expect("request task"));
        }
        let reached = relay.request_count() - before;
        if reached == 0 {
            assert!(
                answers
                    .iter()
                    .all(|(status, from_relay)| *status == 503 && !from_relay),
                "{answers:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert_eq!(
            reached, 1,
            "half-open admits exactly one probe: {answers:?}"
        );
        break answers;
    };
    let successes = probe_batch
        .iter()
        .filter(|(status, from_relay)| *status == 200 && *from_relay)
        .count();
    let fail_fast = probe_batch
        .iter()
        .filter(|(status, from_relay)| *status == 503 && !from_relay)
        .count();
    assert_eq!((successes, fail_fast), (1, 7), "{probe_batch:?}");

    // The successful probe closed the breaker: traffic flows again.
    relay.heal();
    for _ in 0..5 {
        let answer = send(&sidecar, "GET", "/closed-again").await;
        assert_eq!(
            (answer.status, answer.from_relay),
            (200, true),
            "{answer:?}"
        );
    }
    let connection = &connections(&sidecar).await[0];
    assert_eq!(connection["circuit_breaker"], "closed", "{connection}");
    assert!(
        connection["breaker"]["transitions"].as_u64().unwrap_or(0) >= 3,
        "{connection}"
    );
    sidecar.wait_ready().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_probe_reopens_the_breaker() {
    let (relay, sidecar) = start(|sidecar| {
        sidecar
            .pool_size(1)
            .set("breaker", "consecutive_failures", "2")
            .set_str("breaker", "open_duration", "500ms")
            .set_str("breaker", "max_open_duration", "10s")
    })
    .await;
    relay.set_fault(Fault::Status(503));
    drive_until_fail_fast(&sidecar, "/trip", 10).await;
    assert_eq!(relay.request_count(), 2);

    // Still failing: the probe (the one request that reaches the relay) fails...
    support::eventually(Duration::from_secs(5), "the half-open probe", || async {
        let answer = send(&sidecar, "GET", "/probe").await;
        answer.from_relay.then_some(())
    })
    .await;
    assert_eq!(relay.request_count(), 3, "one probe");
    // ...and the breaker is open again at once, for longer.
    send(&sidecar, "GET", "/after-probe")
        .await
        .assert_fail_fast(Duration::from_secs(1));
    assert_eq!(relay.request_count(), 3);
    let connection = &connections(&sidecar).await[0];
    assert_eq!(connection["circuit_breaker"], "open", "{connection}");
    assert_eq!(
        connection["breaker"]["trip_reason"], "probe_failed",
        "{connection}"
    );
    // A failed probe also replaces the connection (the fault may be its own state): the
    // relay sees a second TLS connection, and the breaker stays open meanwhile.
    support::eventually(Duration::from_secs(5), "a fresh connection", || async {
        (relay.tls_accepted() >= 2).then_some(())
    })
    .await;
    let connection = &connections(&sidecar).await[0];
    assert_eq!(connection["circuit_breaker"], "open", "{connection}");
}

#[tokio::test(flavor = "multi_thread")]
async fn failure_rate_over_the_window_trips_the_breaker() {
    let (relay, sidecar) = start(|sidecar| {
        sidecar
            .pool_size(1)
            .set("breaker", "consecutive_failures", "1000")
            .set("breaker", "failure_rate", "0.5")
            .set("breaker", "min_requests", "10")
            .set_str("breaker", "window", "10s")
            .set_str("breaker", "open_duration", "20s")
    })
    .await;
    // Two failures, one success, repeated: never 3 failures in a row, but 2/3 fail.
    let paths = ["/status/503", "/status/502", "/ok"];
    let mut sent = 0;
    let tripped = loop {
        assert!(
            sent < 30,
            "no trip after {sent} requests at a 67% failure rate"
        );
        let answer = send(&sidecar, "GET", paths[sent % 3]).await;
        sent += 1;
        if !answer.from_relay {
            break answer;
        }
    };
    tripped.assert_fail_fast(Duration::from_secs(1));
    let reached = relay.request_count();
    assert!(
        (10..=12).contains(&reached),
        "the rate rule needs min_requests = 10 and then trips: {reached} reached the relay"
    );
    let connection = &connections(&sidecar).await[0];
    assert_eq!(
        connection["breaker"]["trip_reason"], "failure_rate",
        "{connection}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_connected_connection_fails_fast_and_recovers_without_restart() {
    let (relay, sidecar) = start(|sidecar| {
        sidecar
            .pool_size(2)
            .set_str("pool", "request_timeout", "10s")
            .set_str("pool", "connect_timeout", "1s")
    })
    .await;
    relay.go_down().await;
    sidecar.wait_admin_status("/ready", 503).await;

    for method in ["GET", "POST"] {
        send(&sidecar, method, "/down")
            .await
            .assert_fail_fast(Duration::from_secs(1));
    }
    let (status, health) = sidecar.get_json("/api/v1/secure-channel/health").await;
    assert_eq!(status, 503, "{health}");

    relay.come_back().await;
    sidecar.wait_admin_status("/ready", 200).await;
    let answer = support::eventually(support::EVENTUALLY, "traffic to flow again", || async {
        let answer = send(&sidecar, "GET", "/back").await;
        (answer.status == 200).then_some(answer)
    })
    .await;
    assert!(answer.from_relay);
    sidecar
        .wait_admin_status("/api/v1/secure-channel/health", 200)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_connection_is_ejected_while_the_others_keep_serving() {
    let (relay, sidecar) =
        start(|sidecar| sidecar.pool_size(3).set("breaker", "min_requests", "5")).await;
    let ids = relay
        .wait_for_open_connections(3, support::EVENTUALLY)
        .await;
    let (slow, fast) = (ids[0], &ids[1..]);
    // Far slower than the rest even when a loaded CI machine slows every request down.
    relay.set_connection_fault(slow, Fault::Delay(Duration::from_millis(600)));

    // Six clients send continuously (not in lock-step batches), so the fast connections keep
    // serving while the slow one holds its requests.
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = JoinSet::new();
    for _ in 0..6 {
        let client = sidecar.client().clone();
        let url = sidecar.data_url("/work");
        let stop = stop.clone();
        workers.spawn(async move {
            let (mut sent, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                sent += 1;
                let status = client
                    .get(&url)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                if status != 200 {
                    failures.push(status);
                }
            }
            (sent, failures)
        });
    }
    let deadline = Instant::now() + Duration::from_secs(12);
    while relay.open_connection_ids().contains(&slow) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (mut sent, mut failures) = (0, Vec::new());
    while let Some(outcome) = workers.join_next().await {
        let (worker_sent, worker_failures) = outcome.expect("worker task");
        sent += worker_sent;
        failures.extend(worker_failures);
    }
    assert!(
        !relay.open_connection_ids().contains(&slow),
        "connection {slow} (600 ms slower than the rest) still open after 12 s; \
         requests per connection: {:?}",
        relay.requests_per_connection()
    );
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed: {failures:?}",
        failures.len()
    );
    let open = relay.open_connection_ids();
    for id in fast {
        assert!(
            open.contains(id),
            "healthy connection {id} must keep serving: open {open:?}"
        );
    }
    // The ejected slot is re-dialed.
    relay
        .wait_for_open_connections(3, support::EVENTUALLY)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_documents_are_listed_and_looked_up() {
    let (relay, sidecar) = start(|sidecar| sidecar.pool_size(2)).await;
    relay
        .wait_for_open_connections(2, support::EVENTUALLY)
        .await;
    for _ in 0..10 {
        assert_eq!(send(&sidecar, "GET", "/docs-traffic").await.status, 200);
    }

    let listed = connections(&sidecar).await;
    assert_eq!(listed.len(), 2);
    for connection in &listed {
        for field in [
            "connection_id",
            "last_activity",
            "reconnects",
            "errors",
            "p50_latency_ms",
            "p95_latency_ms",
            "p99_latency_ms",
            "is_healthy",
            "protocol",
            "in_flight",
            "requests_total",
            "circuit_breaker",
            "connected_since",
        ] {
            assert!(
                connection.get(field).is_some(),
                "{field} missing: {connection}"
            );
        }
        let id = connection["connection_id"].as_u64().expect("numeric id");
        let (status, one) = sidecar
            .get_json(&format!("/api/v1/secure-channel/connections/{id}"))
            .await;
        assert_eq!(status, 200, "{one}");
        assert_eq!(one["connection_id"], id);
        assert_eq!(one["protocol"], "h2");
    }
    let total: u64 = listed
        .iter()
        .map(|c| c["requests_total"].as_u64().unwrap_or(0))
        .sum();
    assert!(total >= 10, "requests_total adds up: {total}");

    let (status, missing) = sidecar
        .get_json("/api/v1/secure-channel/connections/999999")
        .await;
    assert_eq!(status, 404, "{missing}");
    assert_json_error(status, missing.to_string().as_bytes());
    for malformed in ["abc", "-1", "1.5", "1x"] {
        let (status, error) = sidecar
            .get_json(&format!("/api/v1/secure-channel/connections/{malformed}"))
            .await;
        assert_eq!(status, 400, "id {malformed:?}: {error}");
        assert_json_error(status, error.to_string().as_bytes());
    }

    let (status, stats) = sidecar.get_json("/api/v1/secure-channel/stats").await;
    assert_eq!(status, 200, "{stats}");
    for field in ["requests", "errors", "error_rate", "retries"] {
        assert!(
            stats[field].is_number(),
            "{field} must be a number: {stats}"
        );
    }
    assert!(stats["requests"].as_u64().unwrap_or(0) >= 10, "{stats}");
    let keys: Vec<&String> = stats.as_object().expect("an object").keys().collect();
    for part in ["latency", "bytes", "transitions"] {
        assert!(
            keys.iter().any(|key| key.contains(part)),
            "no {part} figure in /stats: {stats}"
        );
    }

    let (status, health) = sidecar.get_json("/api/v1/secure-channel/health").await;
    assert_eq!(status, 200, "{health}");
    assert!(health["reason"].is_string(), "{health}");
}

/// A connection that dies takes every request in flight on it down at once: one event for
/// its breaker, not one failure per stream. Eight POSTs in flight when the relay resets the
/// connection fail (502), yet the breaker stays closed and the re-dialed connection serves at
/// once; before, the eight opened it (`consecutive_failures = 5`) and the next requests got
/// 503 for `open_duration`.
#[tokio::test(flavor = "multi_thread")]
async fn requests_lost_with_one_dying_connection_count_once_for_its_breaker() {
    let (relay, sidecar) = start(|builder| {
        builder
            .pool_size(1)
            .set_str("pool", "reconnect_backoff_initial", "10ms")
    })
    .await;
    relay.set_fault(Fault::Delay(Duration::from_millis(300)));
    let sidecar = Arc::new(sidecar);
    let mut tasks = JoinSet::new();
    for _ in 0..8 {
        let sidecar = sidecar.clone();
        tasks.spawn(async move { send(&sidecar, "POST", "/in-flight").await.status });
    }
    // Let all eight reach the relay, then kill the connection under them.
    tokio::time::sleep(Duration::from_millis(150)).await;
    relay.set_fault(Fault::None);
    relay.close_connections();
    let mut statuses = Vec::new();
    while let Some(status) = tasks.join_next().await {
        statuses.push(status.expect("request task"));
    }
    assert!(
        statuses.iter().filter(|s| **s == 502).count() >= 5,
        "the requests on the dead connection failed: {statuses:?}"
    );
    sidecar.wait_ready().await;
    let connection = &connections(&sidecar).await[0];
    assert_eq!(connection["circuit_breaker"], "closed", "{connection}");
    assert_eq!(connection["breaker"]["transitions"], 0, "{connection}");
    let answer = send(&sidecar, "POST", "/after").await;
    assert_eq!(
        answer.status, 200,
        "served at once by the re-dialed connection"
    );
}

/// A relay that resets every stream with REFUSED_STREAM on connections it keeps open (an
/// overloaded or stuck relay) is sick: each refusal is retried without using up an attempt,
/// and also counts for its connection's breaker, so the breakers open, the pool fails fast
/// and is not ready, and it recovers once the relay takes streams again. (Before, every
/// request was retried and answered 502 in turn while `/ready` said 200.)
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_refusing_every_stream_trips_the_breakers_and_the_pool_recovers() {
    let (relay, sidecar) = start(|sidecar| {
        sidecar
            .pool_size(2)
            .set("breaker", "consecutive_failures", "3")
            .set_str("breaker", "open_duration", "3s")
            .set_str("breaker", "max_open_duration", "3s")
    })
    .await;
    relay
        .wait_for_open_connections(2, support::EVENTUALLY)
        .await;
    relay.set_fault(Fault::RefuseStreams);

    let mut statuses = Vec::new();
    let fail_fast = loop {
        let answer = send(&sidecar, "GET", "/refused").await;
        assert!(!answer.from_relay, "a refused stream has no answer");
        statuses.push(answer.status);
        if answer.is_fail_fast() {
            break answer;
        }
        assert!(
            statuses.len() < 10,
            "no fail-fast answer: {statuses:?}; logs:\n{}",
            sidecar.logs().join("\n")
        );
    };
    fail_fast.assert_fail_fast(Duration::from_secs(1));
    assert!(
        statuses
            .iter()
            .all(|&status| status == 502 || status == 503),
        "{statuses:?}"
    );
    assert_eq!(
        relay.refused_streams(),
        6,
        "each of the 2 connections takes 3 refusals before its breaker opens"
    );
    assert_eq!(relay.request_count(), 0, "nothing was processed");
    assert_eq!(sidecar.admin_status("/ready").await, Some(503));
    for connection in connections(&sidecar).await {
        assert_eq!(connection["circuit_breaker"], "open", "{connection}");
        assert_eq!(
            connection["breaker"]["trip_reason"], "consecutive_failures",
            "{connection}"
        );
    }

    // The relay takes streams again: a half-open probe succeeds and traffic resumes.
    relay.set_fault(Fault::None);
    support::eventually(Duration::from_secs(15), "traffic resumes", || async {
        let answer = send(&sidecar, "GET", "/again").await;
        (answer.status == 200 && answer.from_relay).then_some(())
    })
    .await;
    support::eventually(Duration::from_secs(15), "ready again", || async {
        (sidecar.admin_status("/ready").await == Some(200)).then_some(())
    })
    .await;
}
