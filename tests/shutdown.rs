//! End to end, real binary: SIGTERM/SIGINT (SPEC §5). Readiness turns false, the listener
//! stops accepting, in-flight requests finish, relay connections close, exit status 0.

mod support;

use std::time::{Duration, Instant};

use support::{Proto, Relay, Sidecar};

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    let mut sidecar = Sidecar::builder().relay(&relay).pool_size(2).start().await;
    sidecar.wait_ready().await;

    // A request that is still waiting on the relay when the signal arrives.
    let client = sidecar.client().clone();
    let url = sidecar.data_url("/delay/800");
    let in_flight = tokio::spawn(async move { client.get(url).send().await });
    support::eventually(
        Duration::from_secs(5),
        "the slow request reaches the relay",
        || async { (relay.count_path("/delay/800") == 1).then_some(()) },
    )
    .await;

    let signalled = Instant::now();
    sidecar.terminate().await;
    // Readiness goes false while the request drains.
    support::eventually(
        Duration::from_secs(2),
        "/ready turns 503 during the drain",
        || async { (sidecar.admin_status("/ready").await == Some(503)).then_some(()) },
    )
    .await;

    let response = in_flight
        .await
        .expect("request task")
        .expect("the in-flight request is answered, not cut");
    assert_eq!(response.status(), 200);
    let status = sidecar.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        signalled.elapsed() >= Duration::from_millis(500),
        "it waited for the request"
    );
    // Relay connections were closed by the sidecar.
    support::eventually(
        Duration::from_secs(5),
        "relay connections closed",
        || async { (relay.open_connections() == 0).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_with_nothing_in_flight_exits_promptly_and_stops_accepting() {
    let relay = Relay::builder().protocol(Proto::Http1).start().await;
    let mut sidecar = Sidecar::builder().relay(&relay).start().await;
    sidecar.wait_ready().await;
    let data = sidecar.data_addr();
    sidecar.signal("INT").await;
    let status = sidecar.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        tokio::net::TcpStream::connect(data).await.is_err(),
        "the data listener no longer accepts"
    );
}

/// Kept-alive client connections with nothing in flight, HTTP/1.1 and h2c, are closed as soon
/// as the drain starts (the h2c one after a GOAWAY): the process exits at once instead of
/// waiting out `listener.drain_timeout` for clients that will never send again.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_idle_kept_alive_connections_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let relay = Relay::builder().protocol(Proto::H2).start().await;
    let mut sidecar = Sidecar::builder()
        .relay(&relay)
        .set("listener", "drain_timeout", "\"20s\"")
        .start()
        .await;
    sidecar.wait_ready().await;

    let mut http1 = tokio::net::TcpStream::connect(sidecar.data_addr())
        .await
        .expect("the data listener accepts connections");
    http1
        .write_all(b"GET /kept HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .expect("sent");
    let mut first = [0u8; 512];
    let n = http1.read(&mut first).await.expect("answered");
    assert_eq!(support::raw_status(&first[..n]), Some(200));

    let tcp = tokio::net::TcpStream::connect(sidecar.data_addr())
        .await
        .expect("the data listener accepts connections");
    let (client, h2_connection) = h2::client::handshake(tcp).await.expect("h2c handshake");
    let h2_connection = tokio::spawn(h2_connection);
    let mut client = client.ready().await.expect("ready for a stream");
    let request = http::Request::get(sidecar.data_url("/kept-h2c"))
        .body(())
        .expect("request");
    let (answer, _) = client.send_request(request, true).expect("sent");
    assert_eq!(answer.await.expect("answered").status(), 200);

    let signalled = Instant::now();
    sidecar.terminate().await;
    let status = sidecar.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "idle connections did not hold the drain: exited after {:?}",
        signalled.elapsed()
    );
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), http1.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "the HTTP/1.1 connection was closed: {read:?}"
    );
    let ended = tokio::time::timeout(Duration::from_secs(2), h2_connection)
        .await
        .expect("the h2c connection ended")
        .expect("its task");
    assert!(ended.is_ok(), "the h2c connection ended cleanly: {ended:?}");
}
