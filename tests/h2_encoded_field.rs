//! Patch 6 of `vendor/h2` (PATCHES.md): a header field HPACK-encoded once
//! (`h2::ext::EncodedField`) and appended to each request's header block by
//! `SendRequest::send_request_with_field`. The sidecar sends the relay credential this way.
//!
//! Held to: the bytes are exactly what h2 writes for the same sensitive field per request;
//! a real h2 server on a loopback socket decodes the field, exactly once, on every request,
//! whether its name is in HPACK's static table or not, while the request's other fields fill
//! and change the dynamic table around it.

use std::time::Duration;

use bytes::Bytes;
use h2::ext::EncodedField;
use http::header::{HeaderName, HeaderValue};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "Bearer 0d9c6e2f4b8a1735e0c9d2f6a4b8e1c3";

fn sensitive(value: &str) -> HeaderValue {
    let mut value = HeaderValue::from_str(value).expect("a valid header value");
    value.set_sensitive(true);
    value
}

fn field(name: &'static str) -> EncodedField {
    EncodedField::encode(&HeaderName::from_static(name), &sensitive(TOKEN), |bytes| {
        Ok::<_, std::convert::Infallible>(Bytes::copy_from_slice(bytes))
    })
    .expect("storing in a Bytes cannot fail")
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// What h2 writes for a request carrying `name: TOKEN` as a sensitive header the usual way,
/// read until `expected` appears in it or for at most 2 s.
async fn wire_of_a_sensitive_header(name: &'static str, expected: &[u8]) -> Vec<u8> {
    let (client_io, mut server_io) = tokio::io::duplex(64 * 1024);
    let (sender, connection) = h2::client::handshake(client_io)
        .await
        .expect("an h2 handshake over a pipe");
    let driver = tokio::spawn(connection);
    let request = http::Request::post("https://relay.test/")
        .header(name, sensitive(TOKEN))
        .body(())
        .expect("a valid request");
    let mut sender = sender.ready().await.expect("ready");
    let _response = sender.send_request(request, true).expect("queued");
    let mut wire = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !find(&wire, expected) && tokio::time::Instant::now() < deadline {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, server_io.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => wire.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    driver.abort();
    wire
}

#[tokio::test]
async fn the_encoded_field_is_what_h2_writes_for_the_same_sensitive_field() {
    for name in ["authorization", "x-relay-token"] {
        let encoded = field(name);
        // Never indexed (RFC 7541 §6.2.3): 0001xxxx.
        assert_eq!(encoded.as_bytes()[0] & 0xf0, 0x10, "{name}");
        let wire = wire_of_a_sensitive_header(name, encoded.as_bytes()).await;
        assert!(
            find(&wire, encoded.as_bytes()),
            "{name}: h2 wrote other bytes for the same field"
        );
        assert!(
            !find(encoded.as_bytes(), TOKEN.as_bytes()),
            "the value is Huffman-coded"
        );
        assert!(!format!("{encoded:?}").contains("Bearer"));
    }
}

#[tokio::test]
async fn a_server_decodes_the_field_once_on_every_request_around_a_changing_dynamic_table() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let requests = 60usize;
    let server = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.expect("accept");
        let mut connection = h2::server::handshake(socket).await.expect("h2 handshake");
        let mut seen = Vec::new();
        while let Some(accepted) = connection.accept().await {
            let (request, mut respond) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => panic!("request {}: {e:?}", seen.len()),
            };
            let headers = request.headers();
            let value_of = |name: &str| -> Vec<String> {
                headers
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect()
            };
            seen.push((
                request.uri().path().to_string(),
                value_of("authorization"),
                value_of("x-relay-token"),
                value_of("x-request"),
                value_of("user-agent"),
            ));
            let response = http::Response::new(());
            respond.send_response(response, true).expect("answer sent");
            if seen.len() == requests {
                break;
            }
        }
        // Drive the connection until the last answer is written and the client has it.
        connection.graceful_shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while connection.accept().await.is_some() {}
        })
        .await;
        seen
    });
    let socket = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = h2::client::handshake(socket).await.expect("h2 handshake");
    let driver = tokio::spawn(connection);
    let (static_name, custom_name) = (field("authorization"), field("x-relay-token"));
    for i in 0..requests {
        // Fields that enter the dynamic table, new values that evict old ones, repeats.
        let request = http::Request::get(format!("https://relay.test/r/{i}"))
            .header("user-agent", "load/1.0")
            .header(
                "x-request",
                format!("{}-{}", i % 7, "v".repeat(i * 37 % 500)),
            )
            .body(())
            .expect("a valid request");
        let field = if i % 2 == 0 {
            static_name.clone()
        } else {
            custom_name.clone()
        };
        sender = sender.ready().await.expect("ready");
        let (response, _) = sender
            .send_request_with_field(request, true, field)
            .expect("queued");
        let response = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("answered in time")
            .expect("a response");
        assert_eq!(response.status(), 200);
    }
    let seen = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server is done")
        .expect("the server did not panic");
    driver.abort();
    assert_eq!(seen.len(), requests);
    for (i, (path, authorization, relay_token, x_request, agent)) in seen.into_iter().enumerate() {
        assert_eq!(path, format!("/r/{i}"));
        let (with, without) = if i % 2 == 0 {
            (authorization, relay_token)
        } else {
            (relay_token, authorization)
        };
        assert_eq!(with, vec![TOKEN.to_string()], "request {i}");
        assert!(without.is_empty(), "request {i}: {without:?}");
        assert_eq!(
            x_request,
            vec![format!("{}-{}", i % 7, "v".repeat(i * 37 % 500))],
            "request {i}: the other fields decode around it"
        );
        assert_eq!(agent, vec!["load/1.0".to_string()]);
    }
}
