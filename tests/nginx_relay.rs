//! End to end against a real nginx relay (Debian package `nginx`, started here on loopback
//! with an rcgen certificate). nginx rotates its client connections: after
//! `keepalive_requests` requests (1000 by default) it sends HTTP/2 GOAWAY, or closes an
//! HTTP/1.1 connection with `Connection: close`. The streams the sidecar opened above the
//! GOAWAY's last-stream-id were never processed. The sidecar must send those again on
//! another connection, dial a replacement at once, and count none of it as a relay
//! failure: no client sees an error and no circuit breaker opens.
//!
//! nginx is required: a missing binary fails the test with the fix (the checks never skip).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Pki, Sidecar, SidecarBuilder};
use tokio::task::JoinSet;

const ANSWER: &str = r#"{"jsonrpc":"2.0","id":1,"result":"000000000000000000023ab1"}"#;

/// `nginx` from /usr/sbin or PATH; panics with the fix when missing.
fn nginx_binary() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/nginx");
    if sbin.is_file() {
        return sbin;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nginx"))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "nginx is not installed: apt-get install nginx (the nginx relay tests never skip)"
            )
        })
}

/// An nginx TLS relay answering every request with [`ANSWER`], stopped on drop.
/// (`/large` answers [`LARGE`] pattern bytes; `/echo?n=V` answers `V`, with
/// `Cache-Control: max-age=V`.)
/// The size of the relay's `/large` answer (pattern bytes, see [`support::pattern`]).
const LARGE: usize = 8 << 20;

struct NginxRelay {
    child: Child,
    port: u16,
    dir: PathBuf,
    _pki: std::sync::Arc<Pki>,
}

impl NginxRelay {
    /// `http2`: offer h2 (ALPN) or HTTP/1.1 only; `keepalive_requests`: requests per client
    /// connection before nginx rotates it.
    fn start(pki: std::sync::Arc<Pki>, http2: bool, keepalive_requests: u32) -> Self {
        let dir = pki
            .dir()
            .join(format!("nginx-{}", if http2 { "h2" } else { "h1" }));
        std::fs::create_dir_all(&dir).expect("the nginx directory can be made");
        let cert = dir.join("relay.crt");
        let key = dir.join("relay.key");
        let identity = pki.server_identity();
        std::fs::write(&cert, &identity.cert_pem).expect("the certificate is written");
        write_private(&key, identity.key_pem.as_bytes());
        let port = free_port();
        // /proc/self belongs to the effective user: nginx as root needs `user root;`.
        let root = std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            .unwrap_or(false);
        let d = dir.display();
        let conf = format!(
            "{user}worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             keepalive_requests {keepalive_requests};\n  server {{\n    \
             listen 127.0.0.1:{port} ssl{h2};\n    ssl_certificate {cert};\n    \
             ssl_certificate_key {key};\n    location / {{ default_type application/json; \
             return 200 '{ANSWER}'; }}\n    location = /large {{ alias {d}/large.bin; }}\n    \
             location = /echo {{ default_type text/plain; \
             add_header cache-control \"max-age=$arg_n\"; return 200 $arg_n; }}\n  \
             }}\n}}\n",
            user = if root { "user root;\n" } else { "" },
            h2 = if http2 { " http2" } else { "" },
            cert = cert.display(),
            key = key.display(),
        );
        std::fs::write(dir.join("large.bin"), support::pattern(0, LARGE))
            .expect("the large answer is written");
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("nginx.conf is written");
        let child = Command::new(nginx_binary())
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nginx starts");
        let relay = NginxRelay {
            child,
            port,
            dir,
            _pki: pki,
        };
        relay.wait_listening();
        relay
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn wait_listening(&self) {
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < support::EVENTUALLY,
                "nginx did not listen on {} within {:?}; error.log:\n{}",
                self.port,
                support::EVENTUALLY,
                std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NginxRelay {
    fn drop(&mut self) {
        // SIGTERM: nginx's fast shutdown, which also stops its worker (SIGQUIT would wait for
        // connections; SIGKILL to the master alone would leave the worker running).
        // (Through the `kill` command: the tests hold no `unsafe`.)
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_private(path: &Path, contents: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("the key file can be created");
    file.write_all(contents).expect("the key is written");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port is free")
}

/// A sidecar in front of `relay` with the shipped breaker and retry settings.
async fn sidecar_for(relay: &NginxRelay, pki: &Pki, pool_size: usize) -> Sidecar {
    sidecar_configured(relay, pki, pool_size, |builder| builder).await
}

/// [`sidecar_for`] with more settings.
async fn sidecar_configured(
    relay: &NginxRelay,
    pki: &Pki,
    pool_size: usize,
    configure: impl FnOnce(SidecarBuilder) -> SidecarBuilder,
) -> Sidecar {
    let builder = Sidecar::builder()
        .endpoint(&relay.endpoint())
        .server_name(support::pki::RELAY_SERVER_NAME)
        .ca_file(pki.ca_file())
        .pool_size(pool_size);
    let sidecar = configure(builder).start().await;
    sidecar.wait_ready().await;
    sidecar
}

/// Sends `total` JSON-RPC POSTs, `concurrency` at a time; returns how many got each status
/// (0: a transport error) and how many 200s carried exactly nginx's answer.
async fn load(
    sidecar: &Sidecar,
    total: usize,
    concurrency: usize,
) -> (BTreeMap<u16, usize>, usize) {
    let mut statuses = BTreeMap::new();
    let mut exact = 0;
    let mut tasks = JoinSet::new();
    let mut sent = 0;
    while sent < total || !tasks.is_empty() {
        while sent < total && tasks.len() < concurrency {
            let client = sidecar.client().clone();
            let url = sidecar.data_url("/");
            tasks.spawn(async move {
                let response = client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(r#"{"jsonrpc":"2.0","id":1,"method":"getbestblockhash","params":[]}"#)
                    .send()
                    .await;
                match response {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body = r.text().await.unwrap_or_default();
                        (status, body)
                    }
                    Err(_) => (0, String::new()),
                }
            });
            sent += 1;
        }
        if let Some(joined) = tasks.join_next().await {
            let (status, body) = joined.expect("a request task does not panic");
            *statuses.entry(status).or_insert(0) += 1;
            if status == 200 && body == ANSWER {
                exact += 1;
            } else if status != 200 {
                eprintln!("{status}: {body}");
            }
        }
    }
    (statuses, exact)
}

/// Every one of `total` requests was answered 200 with exactly nginx's answer (`what` says
/// why that is expected; the sidecar's log is shown on failure).
fn assert_all_answered(
    sidecar: &Sidecar,
    (statuses, exact): &(BTreeMap<u16, usize>, usize),
    total: usize,
    what: &str,
) {
    assert_eq!(
        statuses.get(&200).copied().unwrap_or(0),
        total,
        "{what}: {statuses:?}\n{}",
        sidecar.logs().join("\n")
    );
    assert_eq!(
        *exact, total,
        "{what}: every answer is nginx's, byte for byte"
    );
}

/// The value of one sample line of the Prometheus text exposition (0 when absent).
async fn metric(sidecar: &Sidecar, sample: &str) -> f64 {
    let text = sidecar.metrics_text().await;
    text.lines()
        .filter_map(|line| line.strip_prefix(sample))
        .filter_map(|rest| rest.trim().parse::<f64>().ok())
        .sum()
}

async fn breaker_openings(sidecar: &Sidecar) -> f64 {
    let mut total = 0.0;
    for reason in [
        "consecutive_failures",
        "failure_rate",
        "probe_failed",
        "connect_failure",
    ] {
        total += metric(
            sidecar,
            &format!(
                "sprint_sidecar_upstream_breaker_transitions_total{{to=\"open\",reason=\"{reason}\"}}"
            ),
        )
        .await;
    }
    total
}

/// Attempts that failed, and attempts the relay refused as it rotated a connection (retried):
/// a rotation must show only in the second.
async fn failed_and_refused_attempts(sidecar: &Sidecar) -> (f64, f64) {
    let count = |outcome: &str| {
        format!("sprint_sidecar_upstream_attempt_duration_seconds_count{{outcome=\"{outcome}\"}}")
    };
    (
        metric(sidecar, &count("failure")).await,
        metric(sidecar, &count("refused")).await,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_rotating_h2_connections_with_goaway_costs_no_request() {
    let pki = Pki::new();
    let relay = NginxRelay::start(pki.clone(), true, 50);
    let sidecar = sidecar_for(&relay, &pki, 2).await;
    let total = 1500;
    let answered = load(&sidecar, total, 32).await;
    assert_all_answered(
        &sidecar,
        &answered,
        total,
        "every request through a relay that sends GOAWAY every 50 requests is answered 200",
    );
    let reconnects = metric(&sidecar, "sprint_sidecar_upstream_reconnects_total").await;
    assert!(
        reconnects >= (total / 50 / 2) as f64,
        "nginx rotated the connections (reconnects {reconnects})"
    );
    assert_eq!(
        breaker_openings(&sidecar).await,
        0.0,
        "a GOAWAY is not a relay failure:\n{}",
        sidecar.logs().join("\n")
    );
    let (failed, refused) = failed_and_refused_attempts(&sidecar).await;
    let retried = metric(
        &sidecar,
        "sprint_sidecar_upstream_retries_total{reason=\"refused\"}",
    )
    .await;
    assert_eq!(
        failed, 0.0,
        "no attempt counts as failed (refused: {refused})"
    );
    assert_eq!(refused, retried, "each refused attempt was retried");
    let ready = sidecar
        .client()
        .get(sidecar.admin_url("/ready"))
        .send()
        .await
        .expect("/ready answers");
    assert_eq!(ready.status(), 200);
}

/// Once two connections in a row were rotated after the same number of requests, the pool
/// knows the relay's limit: it dials each replacement ahead of it and sends no connection
/// more, so the relay refuses no stream and no request is sent twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_learned_request_limit_rotates_connections_before_the_relay_refuses_any() {
    let pki = Pki::new();
    let relay = NginxRelay::start(pki.clone(), true, 50);
    let sidecar = sidecar_for(&relay, &pki, 2).await;
    let limit = "sprint_sidecar_upstream_relay_request_limit";
    let refused = "sprint_sidecar_upstream_retries_total{reason=\"refused\"}";
    let reconnects = "sprint_sidecar_upstream_reconnects_total";
    assert_eq!(
        metric(&sidecar, limit).await,
        0.0,
        "nothing is known at start"
    );
    let total = 600;
    let answered = load(&sidecar, total, 32).await;
    assert_all_answered(&sidecar, &answered, total, "while the limit is learned");
    assert_eq!(
        metric(&sidecar, limit).await,
        50.0,
        "nginx's keepalive_requests, learned from its GOAWAYs:\n{}",
        sidecar.logs().join("\n")
    );
    let refused_while_learning = metric(&sidecar, refused).await;
    assert!(
        refused_while_learning > 0.0,
        "the rotations it learned from refused streams"
    );
    // Connections dialed before the limit was known may still run into it once.
    let answered = load(&sidecar, 200, 32).await;
    assert_all_answered(&sidecar, &answered, 200, "settling");
    let (refused_before, reconnects_before) = (
        metric(&sidecar, refused).await,
        metric(&sidecar, reconnects).await,
    );
    let total = 1500;
    let answered = load(&sidecar, total, 32).await;
    assert_all_answered(&sidecar, &answered, total, "with the limit known");
    assert_eq!(
        metric(&sidecar, refused).await,
        refused_before,
        "no stream was refused once the limit was known:\n{}",
        sidecar.logs().join("\n")
    );
    let rotations = metric(&sidecar, reconnects).await - reconnects_before;
    // The two connections open at the start may still have carried up to 50 requests each
    // of these, so at most 100 of them went without a rotation (the bound was total / 50,
    // and a CI run saw 29 rotations).
    let least = (total - 2 * 50) / 50;
    assert!(
        rotations >= least as f64,
        "each connection carried at most 50 requests ({rotations} rotations for {total}, \
         at least {least} expected)"
    );
    assert!(
        sidecar
            .logs()
            .iter()
            .any(|l| l.contains("rotates each connection after 50 requests")),
        "the log says what was learned"
    );
    assert_eq!(breaker_openings(&sidecar).await, 0.0);
}

/// With one connection, rotating ahead of the relay's limit leaves the pool without a
/// usable connection for a moment whenever the old one runs out before its replacement is
/// up: requests wait for the replacement, and readiness holds throughout.
#[tokio::test(flavor = "multi_thread")]
async fn a_single_connection_stays_ready_while_rotated_ahead_of_the_limit() {
    let pki = Pki::new();
    let relay = NginxRelay::start(pki.clone(), true, 40);
    let sidecar = sidecar_for(&relay, &pki, 1).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let (client, url, stop) = (
            sidecar.client().clone(),
            sidecar.admin_url("/ready"),
            stop.clone(),
        );
        tokio::spawn(async move {
            let (mut probes, mut not_ready) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let status = client.get(&url).send().await.map(|r| r.status().as_u16());
                probes += 1;
                if status.as_ref().ok() != Some(&200) {
                    not_ready.push(format!("{status:?}"));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (probes, not_ready)
        })
    };
    let total = 1600;
    let answered = load(&sidecar, total, 16).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (probes, not_ready) = probe.await.expect("the probe task does not panic");
    assert_all_answered(&sidecar, &answered, total, "one connection, rotated");
    assert_eq!(
        metric(&sidecar, "sprint_sidecar_upstream_relay_request_limit").await,
        40.0,
        "the limit was learned"
    );
    assert!(probes > 10, "readiness was probed ({probes} times)");
    assert!(
        not_ready.is_empty(),
        "/ready stayed 200 across {} rotations: {not_ready:?}",
        metric(&sidecar, "sprint_sidecar_upstream_reconnects_total").await
    );
}

/// nginx sends its answers' header fields as literals, each time anew (`server`, `date`,
/// `content-type`, `content-length`), and the sidecar's HTTP/2 decoder keeps the last value
/// of each such field to skip decoding it again (vendor/h2, PATCHES.md). Values that repeat,
/// change, and change back must each reach the client as nginx sent them, across the
/// `Date` of more than one second.
#[tokio::test(flavor = "multi_thread")]
async fn header_values_nginx_repeats_or_changes_reach_clients_exactly() {
    let pki = Pki::new();
    let relay = NginxRelay::start(pki.clone(), true, 10_000);
    // One connection: every answer goes through the same decoder.
    let sidecar = sidecar_for(&relay, &pki, 1).await;
    let values = ["7", "7", "123456", "7", "x", "123456", "123456", "42"];
    let started = Instant::now();
    let mut dates = std::collections::BTreeSet::new();
    let mut servers = std::collections::BTreeSet::new();
    let mut round = 0;
    while round < 3 || started.elapsed() < Duration::from_millis(2100) {
        for value in values {
            let response = sidecar
                .client()
                .get(sidecar.data_url(&format!("/echo?n={value}")))
                .send()
                .await
                .expect("the sidecar answers");
            assert_eq!(response.status(), 200);
            let headers = response.headers().clone();
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_else(|| panic!("{name} is forwarded: {headers:?}"))
                    .to_owned()
            };
            assert_eq!(header("content-length"), value.len().to_string());
            assert_eq!(header("cache-control"), format!("max-age={value}"));
            assert_eq!(header("content-type"), "text/plain");
            servers.insert(header("server"));
            let date = header("date");
            assert!(
                httpdate::parse_http_date(&date).is_ok(),
                "Date {date:?} is an HTTP date"
            );
            dates.insert(date);
            assert_eq!(response.text().await.expect("the body arrives"), value);
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(servers.len(), 1, "one nginx: {servers:?}");
    assert!(
        servers.iter().all(|s| s.starts_with("nginx")),
        "nginx's Server header: {servers:?}"
    );
    assert!(
        dates.len() >= 2,
        "the answers span more than one second of Date: {dates:?}"
    );
}

/// One client's oversized header field costs nobody else anything: nginx answers such a field
/// over HTTP/2 by closing the whole connection (GOAWAY ENHANCE_YOUR_CALM), which used to fail
/// the requests in flight on it and, repeated, open every breaker. The sidecar answers 431.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_header_field_costs_other_clients_nothing() {
    let pki = Pki::new();
    let relay = NginxRelay::start(pki.clone(), true, 1000);
    let sidecar = sidecar_for(&relay, &pki, 2).await;
    let total = 1500;
    let traffic = load(&sidecar, total, 32);
    let oversized = async {
        let mut statuses = Vec::new();
        for _ in 0..10 {
            let answer = sidecar
                .client()
                .post(sidecar.data_url("/"))
                .header("x-big", "v".repeat(20_000))
                .body("{}")
                .send()
                .await
                .expect("the sidecar answers");
            statuses.push(answer.status().as_u16());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        statuses
    };
    let (answered, oversized) = tokio::join!(traffic, oversized);
    assert_eq!(oversized, vec![431; 10]);
    assert_all_answered(&sidecar, &answered, total, "the other clients");
    assert_eq!(breaker_openings(&sidecar).await, 0.0);
    let (failed, _) = failed_and_refused_attempts(&sidecar).await;
    assert_eq!(failed, 0.0);
}

/// A chunked request body with trailers costs no relay connection: nginx, having answered
/// and reset the stream early, would take a trailer HEADERS frame as a protocol error of the
/// whole connection (GOAWAY PROTOCOL_ERROR). The sidecar ends such bodies without them.
#[tokio::test(flavor = "multi_thread")]
async fn request_trailers_cost_no_relay_connection() {
    let pki = Pki::new();
    let relay = NginxRelay::start(pki.clone(), true, 100_000);
    let sidecar = sidecar_for(&relay, &pki, 1).await;
    for _ in 0..3 {
        let answer = support::raw_exchange(
            sidecar.data_addr(),
            b"POST /rpc HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\
              Trailer: x-checksum\r\nConnection: close\r\n\r\n\
              2\r\n{}\r\n0\r\nx-checksum: 99\r\n\r\n",
            std::time::Duration::from_secs(5),
        )
        .await;
        assert_eq!(
            support::raw_status(&answer),
            Some(200),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    let answered = load(&sidecar, 50, 8).await;
    assert_all_answered(&sidecar, &answered, 50, "after the trailers");
    assert_eq!(
        metric(&sidecar, "sprint_sidecar_upstream_reconnects_total").await,
        0.0,
        "the one relay connection stayed up:\n{}",
        sidecar.logs().join("\n")
    );
}

/// More requests than the pool has streams, through a relay that rotates connections every 50
/// requests: most requests wait for a stream, and every one is served. Each finished request
/// wakes one waiter and each new connection as many as it has streams, so no wake-up is lost.
#[tokio::test(flavor = "multi_thread")]
async fn waiting_requests_are_all_served_across_rotations() {
    let pki = Pki::new();
    let relay = NginxRelay::start(pki.clone(), true, 50);
    let sidecar = sidecar_configured(&relay, &pki, 2, |builder| {
        builder.set("pool", "max_streams_per_connection", "4")
    })
    .await;
    let total = 1200;
    let answered = load(&sidecar, total, 64).await;
    assert_all_answered(&sidecar, &answered, total, "waiting requests");
    let reconnects = metric(&sidecar, "sprint_sidecar_upstream_reconnects_total").await;
    assert!(
        reconnects >= 10.0,
        "the relay rotated connections ({reconnects})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_closing_kept_alive_http1_connections_costs_no_request() {
    let pki = Pki::new();
    let relay = NginxRelay::start(pki.clone(), false, 10);
    let sidecar = sidecar_for(&relay, &pki, 4).await;
    let total = 600;
    let answered = load(&sidecar, total, 16).await;
    assert_all_answered(
        &sidecar,
        &answered,
        total,
        "every request through an HTTP/1.1 relay that closes each connection after 10 \
         requests is answered 200",
    );
    assert_eq!(breaker_openings(&sidecar).await, 0.0);
    let (failed, refused) = failed_and_refused_attempts(&sidecar).await;
    assert_eq!(
        failed, 0.0,
        "no attempt counts as failed (refused: {refused})"
    );
}

/// Over HTTP/1.1 a relay connection carries one answer at a time. Three clients that stop
/// reading 8 MiB answers from nginx held a pool of two for their 75 s write clock (a small
/// request waited 23 s); read ahead, their answers free the connections at once, and the
/// clients still get every byte.
#[tokio::test(flavor = "multi_thread")]
async fn http1_clients_that_stop_reading_do_not_hold_nginx_connections() {
    let pki = Pki::new();
    let relay = NginxRelay::start(pki.clone(), false, 1000);
    let sidecar = sidecar_for(&relay, &pki, 2).await;
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(support::stalled_get(sidecar.data_addr(), "/large").await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = 200;
    let answered = tokio::time::timeout(Duration::from_secs(10), load(&sidecar, total, 8))
        .await
        .expect("requests are answered while three clients stall (not after 75 s)");
    assert_all_answered(
        &sidecar,
        &answered,
        total,
        "every request is answered while three clients stall on large answers",
    );
    for stream in stalled {
        let raw = support::read_stalled_answer(stream, LARGE).await;
        assert_eq!(support::raw_status(&raw), Some(200));
        let body = support::raw_body(&raw);
        assert_eq!(body.len(), LARGE);
        assert_eq!(support::pattern_mismatch(0, body), None);
    }
    assert_eq!(
        metric(&sidecar, "sprint_sidecar_upstream_reconnects_total").await,
        0.0,
        "no relay connection was lost"
    );
}
