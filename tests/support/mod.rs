//! Shared harness of the end-to-end tests: an rcgen PKI made at run time (`pki`), an
//! in-process TLS relay that records what reached it and injects faults (`relay`), and a
//! builder that runs the real `sprint-sidecar` binary against it (`sidecar`).
//!
//! Each test file includes it with `mod support;` and uses only part of it, hence the
//! `allow` below.
#![allow(dead_code, unused_imports)]

pub mod pki;
pub mod relay;
pub mod sidecar;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

pub use pki::{Identity, Pki};
pub use relay::{Fault, PARTIAL_BODY, Proto, Recorded, Relay};
pub use sidecar::{CommandOutput, Sidecar, SidecarBuilder};

/// How long a polled condition may take before the test fails. Generous: CI machines are slow,
/// and a test that passes only on a fast laptop is a flaky test.
pub const EVENTUALLY: Duration = Duration::from_secs(10);

/// A plain-HTTP client for the sidecar's listeners. `no_proxy` so that an `HTTP_PROXY` in
/// the environment never reroutes loopback traffic.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a reqwest client without TLS always builds")
}

/// An h2c client with prior knowledge (no upgrade dance), as SPEC §5 requires the data
/// listener to accept.
pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a reqwest client without TLS always builds")
}

/// Polls `check` every 20 ms until it yields `Some`, for at most `timeout`; panics naming
/// `what` otherwise. This is how tests wait: on a condition, never on a fixed sleep.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The byte at `offset` of the deterministic test pattern served by `/bytes/N` and used for
/// uploads. Not periodic at any power of two, so a dropped, repeated or reordered chunk is
/// caught by a byte-wise comparison.
pub fn pattern_byte(offset: u64) -> u8 {
    let mut x = offset.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    (x >> 32) as u8
}

/// `len` bytes of the test pattern starting at `offset`.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern_byte(offset + i)).collect()
}

/// Index of the first byte of `chunk` that differs from the pattern at `offset`, if any.
pub fn pattern_mismatch(offset: u64, chunk: &[u8]) -> Option<u64> {
    chunk
        .iter()
        .enumerate()
        .find(|(i, byte)| **byte != pattern_byte(offset + *i as u64))
        .map(|(i, _)| offset + i as u64)
}

/// A streamed request or response body of `len` pattern bytes in `chunk`-sized frames, never
/// held whole in memory. With `exact_length` false it hides its size, so HTTP/1.1 senders
/// use chunked transfer encoding.
#[derive(Debug)]
pub struct PatternBody {
    sent: u64,
    len: u64,
    chunk: usize,
    exact_length: bool,
}

impl PatternBody {
    /// A body whose length is announced (Content-Length).
    pub fn sized(len: u64) -> Self {
        Self {
            sent: 0,
            len,
            chunk: 64 * 1024,
            exact_length: true,
        }
    }

    /// A body of unknown length (chunked on HTTP/1.1).
    pub fn chunked(len: u64, chunk: usize) -> Self {
        Self {
            sent: 0,
            len,
            chunk,
            exact_length: false,
        }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.sent >= self.len {
            return Poll::Ready(None);
        }
        let take = (self.len - self.sent).min(self.chunk as u64) as usize;
        let data = pattern(self.sent, take);
        self.sent += take as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(data)))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.len
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact_length {
            SizeHint::with_exact(self.len - self.sent)
        } else {
            SizeHint::default()
        }
    }
}

/// Asserts that `body` is the JSON error document of SPEC §5, `{"error": "...", "detail":
/// "..."}` with both fields non-empty strings, and returns `(error, detail)`.
pub fn assert_json_error(status: u16, body: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(body);
    let document: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|error| {
        panic!("a {status} answer must be a JSON error document, got {text:?} ({error})")
    });
    let field = |name: &str| -> String {
        match document.get(name).and_then(|value| value.as_str()) {
            Some(value) if !value.is_empty() => value.to_owned(),
            _ => {
                panic!("the {status} JSON error must have a non-empty string {name:?}: {document}")
            }
        }
    };
    (field("error"), field("detail"))
}

/// Sends one HTTP/1.1 request over a fresh connection with hyper's client, so that a test
/// controls the exact request target and headers (reqwest normalises some of them). The
/// response body is collected.
pub async fn http1_request<B>(
    addr: std::net::SocketAddr,
    request: http::Request<B>,
) -> Result<(http::response::Parts, Bytes), Box<dyn std::error::Error + Send + Sync>>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
        .await
        .map_err(|_| "no response within 30 s")??;
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(30), body.collect())
        .await
        .map_err(|_| "response body not finished within 30 s")??
        .to_bytes();
    driver.abort();
    Ok((parts, body))
}

/// A client that sends `GET path` over a socket with a 4 KiB receive buffer and then reads
/// nothing until the test says so ([`read_stalled_answer`]).
pub async fn stalled_get(addr: std::net::SocketAddr, path: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("a small receive buffer");
    let mut stream = socket
        .connect(addr)
        .await
        .expect("the data listener accepts");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: app\r\n\r\n").as_bytes())
        .await
        .expect("the request is sent");
    stream
}

/// Reads the answer of a [`stalled_get`] (head and a `body_len`-byte body) within 30 s.
pub async fn read_stalled_answer(mut stream: tokio::net::TcpStream, body_len: usize) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut raw = Vec::with_capacity(body_len + 1024);
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = vec![0u8; 256 * 1024];
        let mut head = None;
        loop {
            let n = stream.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            head = head.or_else(|| raw.windows(4).position(|w| w == b"\r\n\r\n"));
            if head.is_some_and(|at| raw.len() - at - 4 >= body_len) {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the stalled answer arrives once read");
    raw
}

/// Writes `raw` bytes to `addr` and reads until the peer closes or `timeout` passes,
/// returning what came back (for malformed requests that no HTTP client would send).
pub async fn raw_exchange(addr: std::net::SocketAddr, raw: &[u8], timeout: Duration) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the data listener accepts connections");
    // The peer may answer and close before reading everything; that is not a test failure.
    let _ = stream.write_all(raw).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(timeout, stream.read_to_end(&mut answer)).await;
    answer
}

/// The HTTP/2 frames in `bytes` as (type, payload), up to the first incomplete one.
pub fn h2_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        let Some(payload) = bytes.get(9..9 + len) else {
            break;
        };
        frames.push((bytes[3], payload.to_vec()));
        bytes = &bytes[9 + len..];
    }
    frames
}

/// The status code of a raw HTTP/1.x answer (`HTTP/1.1 431 ...`), if it has one.
pub fn raw_status(answer: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(answer);
    let line = text.lines().next()?;
    let mut parts = line.split_whitespace();
    parts
        .next()
        .filter(|version| version.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

/// The body of a raw HTTP/1.x answer with a Content-Length (everything after the blank line).
pub fn raw_body(answer: &[u8]) -> &[u8] {
    answer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|at| &answer[at + 4..])
        .unwrap_or(&[])
}

/// True when `value` looks like an RFC 3339 UTC timestamp (`2024-05-01T12:00:00Z`, optional
/// fraction, `Z` or `+00:00`).
pub fn is_rfc3339_utc(value: &str) -> bool {
    let bytes = value.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        bytes
            .get(range)
            .is_some_and(|part| part.iter().all(u8::is_ascii_digit))
    };
    let date_time_ok = bytes.len() >= 20
        && digits(0..4)
        && bytes[4] == b'-'
        && digits(5..7)
        && bytes[7] == b'-'
        && digits(8..10)
        && (bytes[10] == b'T' || bytes[10] == b't')
        && digits(11..13)
        && bytes[13] == b':'
        && digits(14..16)
        && bytes[16] == b':'
        && digits(17..19);
    date_time_ok && (value.ends_with('Z') || value.ends_with('z') || value.ends_with("+00:00"))
}
