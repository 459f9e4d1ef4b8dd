//! The patch in `vendor/hyper` (see its PATCHES.md), held to what it is for: an HTTP/1.1
//! request whose whole body arrives with its head is served in one poll of the connection's
//! task. Unpatched hyper woke the task once more per such request (the body channel woke
//! its closed sender), and every extra poll runs the whole connection state machine again.
//!
//! Real sockets, the real (vendored) hyper server; the connection future is wrapped in a
//! counter of its polls.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Counts the polls of the future it wraps.
struct Counted<F> {
    inner: Pin<Box<F>>,
    polls: Arc<AtomicUsize>,
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.inner.as_mut().poll(cx)
    }
}

/// Reads one whole response (head and a `Content-Length` body) from `stream`.
async fn read_response(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("response within 5 s")
            .expect("read");
        assert!(n > 0, "server closed before answering");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length in the answer");
            if got.len() >= end + 4 + length {
                return got;
            }
        }
    }
}

/// The connection task's polls while it serves `requests` POSTs of a small body, each sent
/// in one write (head and body together) and answered before the next is sent.
async fn polls_for_posts(requests: usize) -> usize {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let polls = Arc::new(AtomicUsize::new(0));
    let counter = polls.clone();
    let server = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.expect("accept");
        let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
            let body = req.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(format!(
                "{} bytes",
                body.len()
            )))))
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(socket), service);
        let _ = Counted {
            inner: Box::pin(conn),
            polls: counter,
        }
        .await;
    });
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.set_nodelay(true).expect("nodelay");
    // Let the server task reach its first wait for the request before counting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = polls.load(Ordering::SeqCst);
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"getblockcount","params":[]}"#;
    for _ in 0..requests {
        let request = format!(
            "POST / HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        client.write_all(request.as_bytes()).await.expect("write");
        let answer = read_response(&mut client).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with(&format!("{} bytes", body.len())), "{text}");
    }
    // Any wake-up left over from the last request shows as a poll here.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let during = polls.load(Ordering::SeqCst) - before;
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    during
}

#[tokio::test(flavor = "current_thread")]
async fn a_request_whose_body_came_with_its_head_takes_one_poll_of_the_connection() {
    let requests = 20;
    let polls = polls_for_posts(requests).await;
    // One poll per request: woken by the socket, it reads head and body, runs the service to
    // completion and writes the answer. Unpatched hyper polls twice per request (40 here).
    assert_eq!(
        polls, requests,
        "{polls} polls of the connection task for {requests} requests"
    );
}
