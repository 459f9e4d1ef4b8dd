//! End to end, real binary, fault-injecting TLS relay: safe retries and timeouts (issue 3
//! items 5–6, SPEC §4 `[retry]`). The relay counts what reached it: a POST that may have
//! reached the relay is sent once; an idempotent request (or one with `Idempotency-Key`)
//! dropped on one connection is sent again, on a different connection.

mod support;

use std::time::{Duration, Instant};

use support::{Fault, Proto, Recorded, Relay, Sidecar, SidecarBuilder, assert_json_error};
use tokio::task::JoinSet;

/// A relay and a ready sidecar with two attempts per request and a retry budget that never
/// gets in the way of these few requests.
async fn start(
    pool_size: usize,
    configure: impl FnOnce(SidecarBuilder) -> SidecarBuilder,
) -> (Relay, Sidecar, Vec<u64>) {
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    let builder = Sidecar::builder()
        .relay(&relay)
        .pool_size(pool_size)
        .set("retry", "max_attempts", "2")
        .set("retry", "budget_ratio", "1.0")
        .set("breaker", "consecutive_failures", "1000")
        .set("breaker", "min_requests", "1000");
    let sidecar = configure(builder).start().await;
    sidecar.wait_ready().await;
    let ids = relay
        .wait_for_open_connections(pool_size, support::EVENTUALLY)
        .await;
    (relay, sidecar, ids)
}

async fn send(
    sidecar: &Sidecar,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, bytes::Bytes) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("valid method");
    let mut request = sidecar
        .client()
        .request(method.clone(), sidecar.data_url(path));
    if matches!(method.as_str(), "POST" | "PUT" | "PATCH") {
        request = request
            .body(r#"{"jsonrpc":"2.0","id":1,"method":"sendrawtransaction"}"#)
            .header("content-type", "application/json");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|error| panic!("{method} {path}: no answer from the sidecar: {error}"));
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap_or_default())
}

fn records_for(relay: &Relay, path: &str) -> Vec<Recorded> {
    relay
        .requests()
        .into_iter()
        .filter(|record| record.path == path)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_post_is_sent_once() {
    let (relay, sidecar, _) = start(2, |sidecar| sidecar).await;
    relay.set_fault(Fault::ResetAfterRequest);
    let (status, body) = send(&sidecar, "POST", "/submit", &[]).await;
    // The client has its answer, so any retry would already have happened.
    assert_eq!(
        relay.count("POST", "/submit"),
        1,
        "a POST that reached the relay is never retried"
    );
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    assert_json_error(status, &body);
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_get_is_sent_twice_on_different_connections() {
    let (relay, sidecar, _) = start(2, |sidecar| sidecar).await;
    relay.set_fault(Fault::ResetAfterRequest);
    let (status, body) = send(&sidecar, "GET", "/resource", &[]).await;
    let records = records_for(&relay, "/resource");
    assert_eq!(
        records.len(),
        2,
        "an idempotent request is retried once (max_attempts = 2)"
    );
    assert_ne!(
        records[0].connection_id, records[1].connection_id,
        "the retry goes to a different connection"
    );
    assert_eq!(
        status,
        502,
        "both attempts dropped: {}",
        String::from_utf8_lossy(&body)
    );
    assert_json_error(status, &body);
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_methods_are_retried_and_others_are_not() {
    let (relay, sidecar, _) = start(2, |sidecar| sidecar).await;
    relay.set_fault(Fault::ResetAfterRequest);
    for (method, attempts) in [
        ("GET", 2),
        ("HEAD", 2),
        ("OPTIONS", 2),
        ("PUT", 2),
        ("DELETE", 2),
        ("POST", 1),
        ("PATCH", 1),
    ] {
        let path = format!("/method/{method}");
        let (status, _) = send(&sidecar, method, &path, &[]).await;
        assert_eq!(
            relay.count(method, &path),
            attempts,
            "{method} reached the relay"
        );
        assert_eq!(status, 502, "{method}");
        // Re-dials after each reset: wait for a full pool before the next method.
        relay
            .wait_for_open_connections(2, support::EVENTUALLY)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn post_with_idempotency_key_is_retried() {
    let (relay, sidecar, _) = start(2, |sidecar| sidecar).await;
    relay.set_fault(Fault::ResetAfterRequest);
    let (status, _) = send(
        &sidecar,
        "POST",
        "/keyed",
        &[("idempotency-key", "4f1d-22")],
    )
    .await;
    let records = records_for(&relay, "/keyed");
    assert_eq!(records.len(), 2, "Idempotency-Key makes a POST retryable");
    assert_ne!(records[0].connection_id, records[1].connection_id);
    assert_eq!(records[1].header("idempotency-key"), Some("4f1d-22"));
    assert_eq!(status, 502);
}

/// Fires pairs of concurrent requests until one lands on a dropping connection (every
/// connection but `healthy` resets after reading the request); returns that request's
/// path and the client's status.
async fn until_one_is_dropped(
    relay: &Relay,
    sidecar: &Sidecar,
    method: &'static str,
    healthy: u64,
) -> (String, u16) {
    for round in 0..40 {
        let mut pair = JoinSet::new();
        for k in 0..2 {
            let client = sidecar.client().clone();
            let path = format!("/pair/{round}/{k}");
            let url = sidecar.data_url(&path);
            pair.spawn(async move {
                let method = reqwest::Method::from_bytes(method.as_bytes()).expect("valid method");
                let status = client
                    .request(method, url)
                    .body("{}")
                    .send()
                    .await
                    .map(|response| response.status().as_u16())
                    .unwrap_or(0);
                (path, status)
            });
        }
        let mut dropped = None;
        while let Some(outcome) = pair.join_next().await {
            let (path, status) = outcome.expect("request task");
            let records = records_for(relay, &path);
            if records.iter().any(|record| record.connection_id != healthy) {
                dropped = Some((path, status));
            } else {
                assert_eq!(
                    status, 200,
                    "{method} {path} served by the healthy connection"
                );
            }
        }
        if let Some(found) = dropped {
            return found;
        }
    }
    panic!(
        "no {method} landed on a dropping connection in 40 rounds: {:?}",
        relay.requests_per_connection()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn get_dropped_on_one_connection_succeeds_on_another() {
    let (relay, sidecar, ids) = start(2, |sidecar| sidecar).await;
    let healthy = ids[1];
    relay.set_fault(Fault::ResetAfterRequest);
    // The healthy connection is slower, so concurrent requests spread over both.
    relay.set_connection_fault(healthy, Fault::Delay(Duration::from_millis(150)));

    let (path, status) = until_one_is_dropped(&relay, &sidecar, "GET", healthy).await;
    let records = records_for(&relay, &path);
    assert_eq!(records.len(), 2, "dropped once, retried once: {records:?}");
    assert_ne!(records[0].connection_id, records[1].connection_id);
    assert_eq!(
        records[1].connection_id, healthy,
        "the retry lands on the healthy connection"
    );
    assert_eq!(status, 200, "the client never sees the dropped attempt");

    let (_, stats) = sidecar.get_json("/api/v1/secure-channel/stats").await;
    assert!(
        stats["retries"].as_u64().unwrap_or(0) >= 1,
        "retries are counted: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn post_dropped_on_one_connection_is_not_retried_on_another() {
    let (relay, sidecar, ids) = start(2, |sidecar| sidecar).await;
    let healthy = ids[1];
    relay.set_fault(Fault::ResetAfterRequest);
    relay.set_connection_fault(healthy, Fault::Delay(Duration::from_millis(150)));

    let (path, status) = until_one_is_dropped(&relay, &sidecar, "POST", healthy).await;
    assert_eq!(
        records_for(&relay, &path).len(),
        1,
        "a POST that reached the relay is sent once, even with a healthy connection at hand"
    );
    assert_eq!(status, 502);
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_relay_gets_504_naming_the_timeout() {
    let (relay, sidecar, _) = start(2, |sidecar| {
        sidecar
            .set("retry", "max_attempts", "1")
            .set_str("pool", "request_timeout", "300ms")
    })
    .await;
    relay.set_fault(Fault::Stall);
    let started = Instant::now();
    let (status, body) = send(&sidecar, "GET", "/stalled", &[]).await;
    let elapsed = started.elapsed();
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
    let (error, detail) = assert_json_error(status, &body);
    let text = format!("{error} {detail}").to_lowercase();
    assert!(
        text.contains("timeout") || text.contains("timed out"),
        "the error names the timeout: {text}"
    );
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(3),
        "answered after {elapsed:?} for request_timeout = 300ms"
    );
    assert_eq!(relay.count("GET", "/stalled"), 1);
}

/// A chunked body (no declared length) that arrives whole with its head is sent whole, so an
/// idempotent request carrying it is retried like one with `Content-Length`; one larger than
/// the replayable limit is streamed and sent once.
#[tokio::test(flavor = "multi_thread")]
async fn a_small_chunked_body_is_retried_whole_and_a_large_one_is_sent_once() {
    let (relay, sidecar, _) = start(2, |sidecar| sidecar).await;
    relay.set_fault(Fault::ResetAfterRequest);
    let chunked = |path: &str, chunks: usize, chunk_len: usize| {
        let mut raw = format!(
            "PUT {path} HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\n"
        )
        .into_bytes();
        for _ in 0..chunks {
            raw.extend_from_slice(format!("{chunk_len:x}\r\n").as_bytes());
            raw.extend(std::iter::repeat_n(b'x', chunk_len));
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        raw
    };
    for (path, chunks, attempts) in [("/chunked/small", 3, 2), ("/chunked/large", 20, 1)] {
        let answer = support::raw_exchange(
            sidecar.data_addr(),
            &chunked(path, chunks, 5000),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(
            support::raw_status(&answer),
            Some(502),
            "{path}: {}",
            String::from_utf8_lossy(&answer)
        );
        let records = records_for(&relay, path);
        assert_eq!(records.len(), attempts, "{path} reached the relay");
        for record in &records {
            assert_eq!(
                record.body_len,
                chunks as u64 * 5000,
                "{path}: the whole body"
            );
        }
        relay
            .wait_for_open_connections(2, support::EVENTUALLY)
            .await;
    }
}
