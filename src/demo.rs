//! `sprint-sidecar demo`: an embedded TLS relay simulator on loopback (its CA made at start
//! with rcgen), the real sidecar in front of it with a generated relay token, and a small
//! stream of JSON-RPC traffic — everything on this machine, no network needed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::app::{self, AppError, Bound};
use crate::config::{Config, Overrides};
use crate::shutdown::Shutdown;

/// Name the simulator's certificate is issued for.
pub const DEMO_SERVER_NAME: &str = "relay.demo.sprint-sidecar.test";

/// The running relay simulator.
pub struct DemoRelay {
    pub addr: SocketAddr,
    /// PEM of the CA that issued the relay certificate.
    pub ca_pem: String,
    /// Requests the relay has answered.
    pub requests: Arc<AtomicU64>,
}

/// Starts the simulator on `127.0.0.1:0`: TLS with ALPN h2 + http/1.1, answering JSON-RPC
/// POSTs with a few milliseconds of latency; requests without `expected_token` in
/// `Authorization` get 401.
///
/// # Errors
/// Certificate generation or binding failed.
pub async fn start_relay(expected_token: Option<String>) -> Result<DemoRelay, AppError> {
    let err = |e: &dyn std::fmt::Display| AppError::runtime(format!("demo relay: {e}"));
    let ca_key = rcgen::KeyPair::generate().map_err(|e| err(&e))?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| err(&e))?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sprint-sidecar demo CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(|e| err(&e))?;
    let leaf_key = rcgen::KeyPair::generate().map_err(|e| err(&e))?;
    let leaf_params =
        rcgen::CertificateParams::new(vec![DEMO_SERVER_NAME.to_string()]).map_err(|e| err(&e))?;
    let leaf = leaf_params.signed_by(&leaf_key, &ca).map_err(|e| err(&e))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let mut server = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&e))?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(leaf.der().to_vec())], key)
        .map_err(|e| err(&e))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| err(&e))?;
    let addr = listener.local_addr().map_err(|e| err(&e))?;
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    let expected = expected_token.map(Arc::new);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let counter = counter.clone();
            let expected = expected.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req| {
                    let counter = counter.clone();
                    let expected = expected.clone();
                    async move { Ok::<_, Infallible>(answer(req, counter, expected).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok(DemoRelay {
        addr,
        ca_pem: ca.pem(),
        requests,
    })
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    counter: Arc<AtomicU64>,
    expected: Option<Arc<String>>,
) -> Response<Full<Bytes>> {
    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
    let authorized = match &expected {
        None => true,
        Some(token) => req
            .headers()
            .get(http::header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == token.as_bytes()),
    };
    let reply = |status: StatusCode, body: serde_json::Value| {
        let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    };
    if !authorized {
        return reply(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "unauthorized", "detail": "missing or wrong relay token"}),
        );
    }
    // A little latency, as a real relay has.
    tokio::time::sleep(Duration::from_micros(500 + fastrand::u64(0..2500))).await;
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if method == http::Method::POST {
        let call: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let id = call.get("id").cloned().unwrap_or(serde_json::Value::Null);
        let result = match call.get("method").and_then(|m| m.as_str()) {
            Some("getblockcount") => serde_json::json!(870_000 + n / 10),
            Some("getbestblockhash") => serde_json::json!(format!("{:064x}", 0xfeed_0000u64 + n)),
            Some("getmempoolinfo") => {
                serde_json::json!({"size": 4000 + (n % 97), "bytes": 2_100_000})
            }
            Some(other) => {
                return reply(
                    StatusCode::OK,
                    serde_json::json!({"jsonrpc": "2.0", "id": id,
                        "error": {"code": -32601, "message": format!("method not found: {other}")}}),
                );
            }
            None => serde_json::json!(null),
        };
        return reply(
            StatusCode::OK,
            serde_json::json!({"jsonrpc": "2.0", "id": id, "result": result}),
        );
    }
    reply(
        StatusCode::OK,
        serde_json::json!({"relay": "sprint-sidecar demo relay", "path": path, "requests": n}),
    )
}

/// Sends a JSON-RPC call to the sidecar every `every` until the process stops.
async fn traffic(data: SocketAddr, every: Duration) {
    let methods = ["getblockcount", "getbestblockhash", "getmempoolinfo"];
    let mut sent = 0u64;
    loop {
        tokio::time::sleep(every).await;
        let Ok(tcp) = tokio::net::TcpStream::connect(data).await else {
            continue;
        };
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp)).await
        else {
            continue;
        };
        tokio::spawn(conn);
        for _ in 0..20 {
            let method = methods[(sent % 3) as usize];
            let body =
                format!(r#"{{"jsonrpc":"2.0","id":{sent},"method":"{method}","params":[]}}"#);
            let req = Request::post("/")
                .header(http::header::HOST, data.to_string())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)));
            let Ok(req) = req else { break };
            match sender.send_request(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    let _ = resp.into_body().collect().await;
                    debug!(%status, method, "demo request");
                }
                Err(_) => break,
            }
            sent += 1;
            tokio::time::sleep(every).await;
        }
    }
}

/// Runs the demo until Ctrl-C.
///
/// # Errors
/// The relay or the sidecar could not start.
pub async fn run(config: Option<&std::path::Path>, overrides: Overrides) -> Result<(), AppError> {
    let token = format!("Bearer demo-{:032x}", fastrand::u128(..));
    let relay = start_relay(Some(token.clone())).await?;
    let dir = std::env::temp_dir().join(format!("sprint-sidecar-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| AppError::runtime(format!("demo dir: {e}")))?;
    let ca_path = dir.join("relay-ca.pem");
    let token_path = dir.join("relay-token");
    write_private(&ca_path, relay.ca_pem.as_bytes())?;
    write_private(&token_path, token.as_bytes())?;
    drop(token);
    remove_stale_demo_dirs();
    // The operator's own file and SPRINT_SIDECAR_* settings apply (e.g. an admin token or
    // other ports), then the demo's: its relay, its CA and its token.
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with(crate::config::ENV_PREFIX))
        .collect();
    env.extend([
        (
            "SPRINT_SIDECAR_UPSTREAM_AUTH_TOKEN_FILE".to_string(),
            token_path.display().to_string(),
        ),
        (
            "SPRINT_SIDECAR_UPSTREAM_AUTH_TOKEN_ENV".to_string(),
            String::new(),
        ),
        (
            "SPRINT_SIDECAR_MEMORY_REQUIRE_LOCK".to_string(),
            "false".to_string(),
        ),
    ]);
    let overrides = Overrides {
        upstream: Some(relay.addr.to_string()),
        server_name: Some(DEMO_SERVER_NAME.to_string()),
        ca_file: Some(ca_path.display().to_string()),
        ..overrides
    };
    let cfg =
        Config::load_from(config, &env, &overrides).map_err(|e| AppError::config(e.to_string()))?;
    let state = app::harden(&cfg)?;
    let credential = app::load_credential(&cfg)?;
    let relay_addr = relay.addr;
    let result = app::run(cfg, state, credential, Shutdown::new(), move |bound: Bound| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "sprint-sidecar listening data=http://{} admin=http://{}",
            bound.data, bound.admin
        );
        let _ = writeln!(
            out,
            "\nsprint-sidecar demo is running (Ctrl-C to stop)\n\
             \x20 embedded TLS relay : https://{relay_addr} (server name {DEMO_SERVER_NAME}, CA made at start)\n\
             \x20 data plane         : curl -s -X POST http://{}/ -d '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"getblockcount\"}}'\n\
             \x20 dashboard          : http://{}/dashboard\n\
             \x20 docs               : http://{}/docs\n\
             \x20 pool status        : http://{}/api/v1/secure-channel/status\n\
             \x20 metrics            : http://{}/metrics\n",
            bound.data, bound.admin, bound.admin, bound.admin, bound.admin
        );
        let _ = out.flush();
        info!("demo traffic: one JSON-RPC call every 200 ms");
        tokio::spawn(traffic(bound.data, Duration::from_millis(200)));
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Removes the directories earlier demos left behind when they were killed (their relay CA
/// and token; each token was only good for that demo's own relay): those whose process is
/// gone. Directories of other users stay (their removal fails quietly).
fn remove_stale_demo_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("sprint-sidecar-demo-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<(), AppError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| AppError::runtime(format!("{}: {e}", path.display())))?;
    f.write_all(bytes)
        .map_err(|e| AppError::runtime(format!("{}: {e}", path.display())))
}
