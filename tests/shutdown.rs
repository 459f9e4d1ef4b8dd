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
