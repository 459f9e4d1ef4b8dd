//! Self-test of the test harness: a plain rustls + hyper client against the support relay,
//! so that end-to-end failures can be blamed on the sidecar, not on the relay.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use support::{Fault, PatternBody, Pki, Proto, Relay, pattern_mismatch};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One client connection to the relay, h2 or HTTP/1.1 by ALPN.
enum Client {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Client {
    async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<(http::response::Parts, Bytes), BoxError> {
        let response = match self {
            Client::H1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await?
            }
            Client::H2(sender) => sender.send_request(request).await?,
        };
        let (parts, body) = response.into_parts();
        Ok((parts, body.collect().await?.to_bytes()))
    }

    fn is_h2(&self) -> bool {
        matches!(self, Client::H2(_))
    }
}

async fn connect_with(relay: &Relay, config: rustls::ClientConfig) -> Result<Client, BoxError> {
    let stream = TcpStream::connect(relay.addr()).await?;
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("relay.test")?;
    let tls = connector.connect(name, stream).await?;
    let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    if is_h2 {
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(connection);
        Ok(Client::H2(sender))
    } else {
        let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(connection);
        Ok(Client::H1(sender))
    }
}

async fn connect(relay: &Relay, alpn: &[&[u8]]) -> Result<Client, BoxError> {
    connect_with(relay, relay.pki().client_config(alpn)).await
}

fn request(method: &str, target: &str, body: impl Into<Bytes>, h2: bool) -> Request<Full<Bytes>> {
    // h2 needs an absolute URI (it becomes :scheme/:authority); HTTP/1.1 an origin form + Host.
    let builder = if h2 {
        Request::builder().uri(format!("https://relay.test{target}"))
    } else {
        Request::builder().uri(target).header("host", "relay.test")
    };
    builder
        .method(method)
        .header("x-test", "harness")
        .body(Full::new(body.into()))
        .expect("a valid test request")
}

async fn exercise_routes(relay: &Relay, alpn: &[&[u8]], expect_h2: bool) {
    let mut client = connect(relay, alpn)
        .await
        .expect("the relay accepts a TLS client");
    assert_eq!(client.is_h2(), expect_h2, "negotiated protocol");
    let h2 = client.is_h2();

    let call = r#"{"jsonrpc":"2.0","id":7,"method":"getblockcount","params":[]}"#;
    let (parts, body) = client
        .send(request("POST", "/", call, h2))
        .await
        .expect("POST /");
    assert_eq!(parts.status, StatusCode::OK);
    let answer: serde_json::Value = serde_json::from_slice(&body).expect("JSON-RPC answer");
    assert_eq!(answer["id"], 7);
    assert_eq!(answer["result"]["method"], "getblockcount");
    assert_eq!(parts.headers["x-relay-connection-id"], "1");

    let (parts, body) = client
        .send(request("POST", "/echo", "echo me", h2))
        .await
        .expect("POST /echo");
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(&body[..], b"echo me");

    let (parts, body) = client
        .send(request("GET", "/bytes/200000", Bytes::new(), h2))
        .await
        .expect("GET /bytes");
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body.len(), 200_000);
    assert_eq!(pattern_mismatch(0, &body), None);

    let (parts, _) = client
        .send(request("GET", "/status/418", Bytes::new(), h2))
        .await
        .expect("GET /status");
    assert_eq!(parts.status.as_u16(), 418);

    let started = Instant::now();
    let (parts, _) = client
        .send(request("GET", "/delay/150", Bytes::new(), h2))
        .await
        .expect("GET /delay");
    assert_eq!(parts.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(150));

    let (parts, body) = client
        .send(request("PUT", "/some/where?b=2&a=1", "xyz", h2))
        .await
        .expect("PUT other");
    assert_eq!(parts.status, StatusCode::OK);
    let seen: serde_json::Value = serde_json::from_slice(&body).expect("JSON of what was seen");
    assert_eq!(seen["target"], "/some/where?b=2&a=1");
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["headers"]["x-test"][0], "harness");

    let records = relay.requests();
    assert_eq!(records.len(), 6);
    let last = records.last().expect("six records");
    assert_eq!(last.target, "/some/where?b=2&a=1");
    assert_eq!(last.query.as_deref(), Some("b=2&a=1"));
    assert_eq!(last.authority.as_deref(), Some("relay.test"));
    assert_eq!(&last.body[..], b"xyz");
    assert!(last.body_complete);
    assert_eq!(relay.count("POST", "/echo"), 1);
    assert_eq!(relay.count_path("/"), 1);
    assert!(records.iter().all(|record| record.connection_id == 1));
    assert_eq!(relay.tls_accepted(), 1);
    assert_eq!(relay.open_connection_ids(), vec![1]);
    let info = &relay.connections()[0];
    assert_eq!(info.sni.as_deref(), Some("relay.test"));
    assert_eq!(
        info.alpn.as_deref(),
        Some(if expect_h2 { "h2" } else { "http/1.1" })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_relay_serves_every_route_and_records_it() {
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    exercise_routes(&relay, &[b"h2", b"http/1.1"], true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http1_relay_serves_every_route_on_one_keep_alive_connection() {
    let relay = Relay::builder().protocol(Proto::Http1).start().await;
    exercise_routes(&relay, &[b"h2", b"http/1.1"], false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dual_relay_follows_the_client_alpn() {
    let relay = Relay::builder().protocol(Proto::Both).start().await;
    exercise_routes(&relay, &[b"http/1.1"], false).await;
    let mut client = connect(&relay, &[b"h2"]).await.expect("h2 client");
    assert!(client.is_h2());
    let (parts, _) = client
        .send(request("GET", "/x", Bytes::new(), true))
        .await
        .expect("GET");
    assert_eq!(parts.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_only_relay_refuses_an_http1_only_client() {
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    assert!(connect(&relay, &[b"http/1.1"]).await.is_err());
    support::eventually(
        support::EVENTUALLY,
        "the failed handshake to be counted",
        || async { (relay.handshake_failures() == 1).then_some(()) },
    )
    .await;
    assert_eq!(relay.tls_accepted(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_certificate_fails_verification() {
    let pki = Pki::new();
    let relay = Relay::builder()
        .pki(pki.clone())
        .identity(pki.untrusted_server_identity())
        .start()
        .await;
    let error = connect(&relay, &[b"h2"])
        .await
        .err()
        .expect("verification fails");
    let text = format!("{error:?}");
    assert!(text.contains("UnknownIssuer"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_relay_requires_a_client_certificate() {
    let pki = Pki::new();
    let relay = Relay::builder()
        .pki(pki.clone())
        .require_client_certificate(true)
        .start()
        .await;
    // Without a certificate: TLS 1.3 reports the rejection on first use, not at handshake.
    let anonymous = match connect(&relay, &[b"h2"]).await {
        Err(_) => true,
        Ok(mut client) => client
            .send(request("GET", "/", Bytes::new(), true))
            .await
            .is_err(),
    };
    assert!(anonymous, "a client without a certificate must be rejected");

    let identity = pki.client_identity("app");
    let config = pki.client_config_with_identity(&[b"h2"], &identity);
    let mut client = connect_with(&relay, config)
        .await
        .expect("mTLS client connects");
    let (parts, _) = client
        .send(request("GET", "/x", Bytes::new(), true))
        .await
        .expect("GET");
    assert_eq!(parts.status, StatusCode::OK);
    assert!(
        relay
            .connections()
            .iter()
            .any(|info| info.client_certificate)
    );

    let (cert, key) = pki.write_client_identity("sidecar");
    assert!(cert.exists() && key.exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "client key must not be group/world readable"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn go_down_refuses_then_come_back_serves_on_the_same_port() {
    let relay = Relay::builder().start().await;
    let addr = relay.addr();
    let mut old = connect(&relay, &[b"h2"]).await.expect("connects");
    relay
        .wait_for_open_connections(1, support::EVENTUALLY)
        .await;

    relay.go_down().await;
    assert!(!relay.is_listening());
    let refused = TcpStream::connect(addr)
        .await
        .expect_err("connect must be refused");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(
        old.send(request("GET", "/x", Bytes::new(), true))
            .await
            .is_err()
    );
    assert_eq!(relay.open_connections(), 0);

    relay.come_back().await;
    assert_eq!(relay.addr(), addr);
    let mut client = connect(&relay, &[b"h2"]).await.expect("connects again");
    let (parts, _) = client
        .send(request("GET", "/x", Bytes::new(), true))
        .await
        .expect("GET");
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(relay.tls_accepted(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_closes_connections_and_listens_again() {
    let relay = Relay::builder().protocol(Proto::Http1).start().await;
    let mut old = connect(&relay, &[b"http/1.1"]).await.expect("connects");
    let (parts, _) = old
        .send(request("GET", "/a", Bytes::new(), false))
        .await
        .expect("GET");
    assert_eq!(parts.status, StatusCode::OK);
    relay.restart().await;
    assert!(
        old.send(request("GET", "/b", Bytes::new(), false))
            .await
            .is_err()
    );
    let mut client = connect(&relay, &[b"http/1.1"])
        .await
        .expect("connects after restart");
    let (parts, _) = client
        .send(request("GET", "/c", Bytes::new(), false))
        .await
        .expect("GET");
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers["x-relay-connection-id"], "2");
}

#[tokio::test(flavor = "multi_thread")]
async fn accept_then_close_fails_new_handshakes_only() {
    let relay = Relay::builder().start().await;
    let mut established = connect(&relay, &[b"h2"]).await.expect("connects");
    relay.set_fault(Fault::AcceptThenClose);
    assert!(connect(&relay, &[b"h2"]).await.is_err());
    let (parts, _) = established
        .send(request("GET", "/x", Bytes::new(), true))
        .await
        .expect("the established connection still works");
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(relay.tcp_accepted(), 2);
    assert_eq!(relay.tls_accepted(), 1);
    relay.heal();
    assert!(connect(&relay, &[b"h2"]).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_after_request_reads_the_request_then_resets() {
    for protocol in [Proto::H2, Proto::Http1] {
        let relay = Relay::builder().protocol(protocol).start().await;
        let mut client = connect(&relay, &[b"h2", b"http/1.1"])
            .await
            .expect("connects");
        let h2 = client.is_h2();
        relay.set_fault(Fault::ResetAfterRequest);
        let result = client.send(request("POST", "/submit", "payload", h2)).await;
        let error = result.expect_err("the request must fail");
        let text = format!("{error:?}").to_lowercase();
        // An RST surfaces as ECONNRESET, or as EPIPE when the client was still writing.
        assert!(
            text.contains("connectionreset") || text.contains("brokenpipe"),
            "{protocol:?} must see an RST: {text}"
        );
        assert_eq!(relay.count("POST", "/submit"), 1);
        let record = &relay.requests()[0];
        assert_eq!(&record.body[..], b"payload");
        assert!(record.body_complete);
        support::eventually(
            support::EVENTUALLY,
            "the reset connection to close",
            || async { (relay.open_connections() == 0).then_some(()) },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stall_never_answers() {
    let relay = Relay::builder().start().await;
    let mut client = connect(&relay, &[b"h2"]).await.expect("connects");
    relay.set_fault(Fault::Stall);
    let answer = tokio::time::timeout(
        Duration::from_millis(300),
        client.send(request("GET", "/x", Bytes::new(), true)),
    )
    .await;
    assert!(answer.is_err(), "a stalled relay must not answer");
    assert_eq!(relay.count("GET", "/x"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_slow_connection_leaves_the_others_fast() {
    let relay = Relay::builder().start().await;
    let mut first = connect(&relay, &[b"h2"]).await.expect("connects");
    let mut second = connect(&relay, &[b"h2"]).await.expect("connects");
    relay.set_connection_fault(1, Fault::Delay(Duration::from_millis(400)));

    let started = Instant::now();
    let (parts, _) = second
        .send(request("GET", "/fast", Bytes::new(), true))
        .await
        .expect("GET");
    assert_eq!(parts.headers["x-relay-connection-id"], "2");
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let (parts, _) = first
        .send(request("GET", "/slow", Bytes::new(), true))
        .await
        .expect("GET");
    assert_eq!(parts.headers["x-relay-connection-id"], "1");
    assert!(started.elapsed() >= Duration::from_millis(400));
}

#[tokio::test(flavor = "multi_thread")]
async fn status_storm_answers_503_with_retry_after() {
    let relay = Relay::builder().start().await;
    let mut client = connect(&relay, &[b"h2"]).await.expect("connects");
    relay.set_fault(Fault::Status(503));
    for _ in 0..3 {
        let (parts, _) = client
            .send(request("GET", "/x", Bytes::new(), true))
            .await
            .expect("GET");
        assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(parts.headers.contains_key("retry-after"));
    }
    relay.heal();
    let (parts, _) = client
        .send(request("GET", "/x", Bytes::new(), true))
        .await
        .expect("GET");
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(relay.count("GET", "/x"), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_streams_a_large_chunked_body() {
    let relay = Relay::builder().protocol(Proto::Http1).start().await;
    let stream = TcpStream::connect(relay.addr()).await.expect("connects");
    let connector = TlsConnector::from(Arc::new(relay.pki().client_config(&[b"http/1.1"])));
    let tls = connector
        .connect(
            ServerName::try_from("relay.test").expect("valid name"),
            stream,
        )
        .await
        .expect("handshake");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, PatternBody>(TokioIo::new(tls))
            .await
            .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    let len = 3 * 1024 * 1024 + 17;
    let request = Request::post("/echo")
        .header("host", "relay.test")
        .body(PatternBody::chunked(len, 10_000))
        .expect("valid request");
    let response = sender.send_request(request).await.expect("echo answers");
    let mut body = response.into_body();
    let mut offset = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        if let Some(data) = frame.data_ref() {
            assert_eq!(pattern_mismatch(offset, data), None);
            offset += data.len() as u64;
        }
    }
    assert_eq!(offset, len);
    let record = &relay.requests()[0];
    assert_eq!(record.body_len, len);
    assert_eq!(record.header("transfer-encoding"), Some("chunked"));
}
