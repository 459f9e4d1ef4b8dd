//! Bad input loses nothing: hundreds of mangled HTTP/1.1 requests (bytes flipped, inserted,
//! deleted, lines repeated, heads cut short) and mangled h2c frames sent to the real binary,
//! in front of a real TLS relay. Each gets a well-formed answer (the relay's, a JSON error,
//! an HTTP/2 GOAWAY or reset) or a closed connection; none costs a relay connection, and the
//! sidecar serves as before afterwards. The mutations come from a fixed seed, so a failure
//! names a case that can be replayed.

mod support;

use std::time::Duration;

use support::{Proto, Relay, Sidecar, assert_json_error};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

/// Well-formed requests the mutations start from.
const SEEDS: [&[u8]; 4] = [
    b"POST /rpc?x=1 HTTP/1.1\r\nHost: app\r\nContent-Type: application/json\r\n\
      Content-Length: 24\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1}",
    b"POST /rpc HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n\
      5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    b"GET /blocks/840000 HTTP/1.1\r\nHost: 127.0.0.1:9090\r\nAccept: */*\r\n\
      Connection: keep-alive, x-hop\r\nX-Hop: 1\r\nTE: trailers\r\n\r\n",
    b"GET /health HTTP/1.0\r\nUser-Agent: probe\r\n\r\n",
];

const CASES: usize = 400;

/// Statuses a mangled request may get: the relay's answer to what still parses, or the
/// sidecar's own refusals.
const ALLOWED: [u16; 9] = [200, 400, 405, 408, 413, 414, 431, 501, 505];

/// One mutation of `seed`, chosen by `rng`.
fn mangle(rng: &mut fastrand::Rng, seed: &[u8]) -> (String, Vec<u8>) {
    let mut bytes = seed.to_vec();
    let at = rng.usize(..bytes.len());
    let what = match rng.u8(..6) {
        0 => {
            let byte = rng.u8(..);
            bytes[at] = byte;
            format!("byte {at} set to {byte:#04x}")
        }
        1 => {
            let len = rng.usize(1..8);
            let insert: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            bytes.splice(at..at, insert.iter().copied());
            format!("{insert:?} inserted at {at}")
        }
        2 => {
            let end = (at + rng.usize(1..16)).min(bytes.len());
            bytes.drain(at..end);
            format!("bytes {at}..{end} deleted")
        }
        3 => {
            // A header line (the second to the last of the head) sent twice.
            let head_end = bytes
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .unwrap_or(bytes.len());
            let starts: Vec<usize> = bytes[..head_end]
                .windows(2)
                .enumerate()
                .filter(|(_, w)| *w == b"\r\n")
                .map(|(i, _)| i + 2)
                .collect();
            let Some(&start) = starts.get(rng.usize(..starts.len().max(1))) else {
                return (String::from("unchanged"), bytes);
            };
            let end = bytes[start..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .map_or(bytes.len(), |p| start + p + 2);
            let line = bytes[start..end].to_vec();
            bytes.splice(start..start, line.iter().copied());
            format!("line {:?} repeated", String::from_utf8_lossy(&line))
        }
        4 => {
            bytes.truncate(at);
            format!("cut after {at} bytes")
        }
        _ => {
            // Line ends as a bare LF or a bare CR.
            let replacement: &[u8] = if rng.bool() { b"\n" } else { b"\r" };
            let Some(p) = bytes.windows(2).skip(at).position(|w| w == b"\r\n") else {
                return (String::from("unchanged"), bytes);
            };
            bytes.splice(at + p..at + p + 2, replacement.iter().copied());
            format!("line end at {} became {replacement:?}", at + p)
        }
    };
    (what, bytes)
}

/// The body of the first answer in `answer` (a mangled request can be two, pipelined).
fn first_body(answer: &[u8]) -> &[u8] {
    let body = support::raw_body(answer);
    let head = String::from_utf8_lossy(&answer[..answer.len() - body.len()]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse::<usize>().ok())
        .unwrap_or(body.len());
    &body[..length.min(body.len())]
}

/// Sends `raw`, half-closes, and reads until the sidecar closes (or 5 s pass).
async fn exchange(addr: std::net::SocketAddr, raw: Vec<u8>) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the data listener accepts connections");
    // The sidecar may answer and close before it has read everything.
    let _ = stream.write_all(&raw).await;
    let _ = stream.shutdown().await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    answer
}

#[tokio::test(flavor = "multi_thread")]
async fn mangled_requests_get_clean_answers_and_cost_an_h2_relay_nothing() {
    mangled_requests_get_clean_answers_and_cost_the_relay_nothing(Proto::H2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mangled_requests_get_clean_answers_and_cost_an_http1_relay_nothing() {
    mangled_requests_get_clean_answers_and_cost_the_relay_nothing(Proto::Http1).await;
}

async fn mangled_requests_get_clean_answers_and_cost_the_relay_nothing(protocol: Proto) {
    let relay = Relay::builder().protocol(protocol).start().await;
    let sidecar = Sidecar::builder()
        .relay(&relay)
        .pool_size(2)
        .set("listener", "header_read_timeout", "\"1s\"")
        .start()
        .await;
    sidecar.wait_ready().await;
    let dialed = relay.tls_accepted();

    let mut rng = fastrand::Rng::with_seed(0x5eed_2026);
    let cases: Vec<(usize, String, Vec<u8>)> = (0..CASES)
        .map(|case| {
            let seed = SEEDS[case % SEEDS.len()];
            let (what, raw) = mangle(&mut rng, seed);
            (case, what, raw)
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut closed_without_answer = 0;
    // Clients that left in the middle of a body whose start may already have gone to the relay.
    let mut ended_mid_body = 0;
    for batch in cases.chunks(16) {
        let mut set = JoinSet::new();
        for (case, what, raw) in batch.iter().cloned() {
            let addr = sidecar.data_addr();
            set.spawn(async move {
                let answer = exchange(addr, raw.clone()).await;
                (case, what, raw, answer)
            });
        }
        while let Some(done) = set.join_next().await {
            let (case, what, raw, answer) = done.expect("the exchange task ends");
            if answer.is_empty() {
                // Only a head that never ended may go unanswered (the client left mid-head;
                // nginx closes such a connection the same way).
                let head_ends =
                    raw.windows(2).any(|w| w == b"\n\n") || raw.windows(3).any(|w| w == b"\n\r\n");
                assert!(
                    !head_ends,
                    "case {case} ({what}): a complete head got no answer: {:?}",
                    String::from_utf8_lossy(&raw)
                );
                closed_without_answer += 1;
                continue;
            }
            let text = String::from_utf8_lossy(&answer);
            let status = support::raw_status(&answer)
                .unwrap_or_else(|| panic!("case {case} ({what}): not an HTTP answer: {text:?}"));
            assert!(
                ALLOWED.contains(&status),
                "case {case} ({what}): status {status}: {text}"
            );
            if status != 200 {
                // The sidecar's own refusal: JSON naming the problem.
                let (_, detail) = assert_json_error(status, first_body(&answer));
                if detail.contains("end of file") || detail.contains("unexpected EOF") {
                    ended_mid_body += 1;
                }
            }
            *statuses.entry(status).or_default() += 1;
        }
    }
    eprintln!(
        "{protocol:?}: statuses {statuses:?}, closed without an answer: {closed_without_answer}, \
         ended mid-body: {ended_mid_body}"
    );
    assert!(
        statuses.get(&400).copied().unwrap_or(0) >= CASES / 10,
        "the mutations must produce plenty of bad requests: {statuses:?}"
    );
    assert!(
        statuses.get(&200).copied().unwrap_or(0) >= CASES / 10,
        "and some that still parse: {statuses:?}"
    );

    // Nothing was lost: the same relay connections, and the sidecar serves as before. Over
    // HTTP/1.1, a body whose client left after it began to stream ends its relay connection
    // (the relay holds half a request); nothing else may.
    let redialed = relay.tls_accepted() - dialed;
    match protocol {
        Proto::H2 => assert_eq!(
            redialed, 0,
            "no mangled request may cost a relay connection"
        ),
        Proto::Http1 | Proto::Both => assert!(
            redialed <= ended_mid_body,
            "only a client that left mid-body may cost a relay connection: {redialed} \
             re-dialed, {ended_mid_body} left mid-body"
        ),
    }
    let answer = exchange(
        sidecar.data_addr(),
        b"POST /after HTTP/1.1\r\nHost: app\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
    )
    .await;
    assert_eq!(
        support::raw_status(&answer),
        Some(200),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(sidecar.admin_status("/ready").await, Some(200));
    assert!(
        !sidecar.logs_contain("panicked"),
        "no panic in the sidecar's log"
    );
}

/// The client side of an h2c exchange after the preface: an empty SETTINGS frame, then one
/// request (`POST /h2c` with a 2-byte body) as a HEADERS and a DATA frame.
fn h2c_request() -> Vec<u8> {
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let len = u32::try_from(payload.len()).expect("a small frame");
        let mut bytes = len.to_be_bytes()[1..].to_vec();
        bytes.extend_from_slice(&[kind, flags]);
        bytes.extend_from_slice(&stream.to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    };
    // HPACK: :method POST (static 3), :scheme http (6), :path from a literal (name 4),
    // :authority "app" (literal, name 1), content-length "2" (literal, name 28).
    let block = [
        &[0x83, 0x86][..],
        &[0x44, 0x04],
        b"/h2c",
        &[0x41, 0x03],
        b"app",
        &[0x5c, 0x01],
        b"2",
    ]
    .concat();
    [
        frame(0x4, 0, 0, &[]),
        frame(0x1, 0x4, 1, &block),
        frame(0x0, 0x1, 1, b"{}"),
    ]
    .concat()
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the server's frames in `bytes` end the exchange: GOAWAY, RST_STREAM, or a frame of
/// stream 1 with END_STREAM.
fn h2_exchange_over(mut bytes: &[u8]) -> bool {
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        let (kind, flags) = (bytes[3], bytes[4]);
        let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
        if kind == 0x7 || kind == 0x3 || (stream == 1 && kind <= 0x1 && flags & 0x1 != 0) {
            return true;
        }
        let Some(rest) = bytes.get(9 + len..) else {
            return false;
        };
        bytes = rest;
    }
    false
}

/// Sends `raw` on a new connection and reads the server's frames until the exchange is over
/// (see [`h2_exchange_over`]), the server closes, or 1 s passes. The write side stays open:
/// an HTTP/2 server takes a client's end of file for the end of the whole connection.
async fn h2_exchange(addr: std::net::SocketAddr, raw: Vec<u8>) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the data listener accepts connections");
    let _ = stream.write_all(&raw).await;
    let mut answer = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 16 * 1024];
    while !h2_exchange_over(&answer) {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    answer
}

/// HTTP/2 with prior knowledge: after a valid preface, mangled frames (bytes flipped,
/// inserted, deleted, cut) get a GOAWAY or a close, never a crash, and never cost the relay
/// a connection; the unmangled request is answered.
#[tokio::test(flavor = "multi_thread")]
async fn mangled_h2c_frames_get_goaway_or_close_and_cost_the_relay_nothing() {
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    let sidecar = Sidecar::builder().relay(&relay).pool_size(2).start().await;
    sidecar.wait_ready().await;
    let dialed = relay.tls_accepted();

    let request = h2c_request();
    let control = h2_exchange(sidecar.data_addr(), [H2_PREFACE, &request].concat()).await;
    let frames = support::h2_frames(&control);
    assert!(
        frames.iter().any(|(kind, _)| *kind == 0x1),
        "the unmangled request is answered with HEADERS: {frames:?}"
    );
    assert_eq!(relay.count_path("/h2c"), 1);

    let mut rng = fastrand::Rng::with_seed(0x2c_2026);
    // All at once: a case whose frames stay incomplete waits out its 1 s.
    let mut set = JoinSet::new();
    for case in 0..CASES / 2 {
        let (what, mangled) = mangle(&mut rng, &request);
        let addr = sidecar.data_addr();
        set.spawn(async move {
            let answer = h2_exchange(addr, [H2_PREFACE, &mangled].concat()).await;
            (case, what, answer)
        });
    }
    let mut outcomes = std::collections::BTreeMap::<&str, usize>::new();
    while let Some(done) = set.join_next().await {
        let (case, what, answer) = done.expect("the exchange task ends");
        assert!(
            !answer.starts_with(b"HTTP/1"),
            "case {case} ({what}): an HTTP/1.1 answer on an h2c connection"
        );
        let kinds: Vec<u8> = support::h2_frames(&answer).iter().map(|f| f.0).collect();
        let outcome = if kinds.contains(&0x7) {
            "goaway"
        } else if kinds.contains(&0x3) {
            "stream reset"
        } else if kinds.contains(&0x1) {
            "answered"
        } else {
            "no answer within 1 s"
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    eprintln!("mangled h2c connections: {outcomes:?}");
    let went_away = outcomes.get("goaway").copied().unwrap_or(0);
    assert!(
        went_away >= CASES / 10,
        "malformed frames are protocol errors, told with GOAWAY ({went_away})"
    );
    assert_eq!(
        relay.tls_accepted(),
        dialed,
        "no mangled h2c connection may cost a relay connection"
    );
    assert_eq!(sidecar.admin_status("/ready").await, Some(200));
    let after = h2_exchange(sidecar.data_addr(), [H2_PREFACE, &request].concat()).await;
    assert!(
        support::h2_frames(&after)
            .iter()
            .any(|(kind, _)| *kind == 0x1),
        "the sidecar answers h2c as before"
    );
    assert!(
        !sidecar.logs_contain("panicked"),
        "no panic in the sidecar's log"
    );
}
