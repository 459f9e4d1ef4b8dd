//! An in-process TLS relay on `127.0.0.1:0`, built on hyper + tokio-rustls, speaking h2,
//! HTTP/1.1 or both (chosen by ALPN). It records every request it sees (method, target,
//! headers, body, which TLS connection carried it), counts TCP and TLS connections, and
//! injects faults switchable at run time, globally or on one connection only.
//!
//! Routes: `/echo` streams the request body back; `/bytes/N` streams N pattern bytes (see
//! [`super::pattern`]); `/status/CODE` answers CODE; `/delay/MS` answers after MS
//! milliseconds; `POST /` answers like a JSON-RPC server; anything else answers a JSON
//! document of what the relay saw. Every answer carries `x-relay-connection-id`.
//!
//! Connection ids are assigned at TCP accept, from 1, in accept order, and never reused.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sprint_sidecar::upstream::coalesce::Coalesce;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tokio_rustls::TlsAcceptor;

use super::pki::{Identity, Pki, RELAY_SERVER_NAME};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every relay answer.
pub type RelayBody = BoxBody<Bytes, BoxError>;

/// Request bodies are recorded up to this many bytes (the length is always recorded).
pub const RECORDED_BODY_LIMIT: usize = 1024 * 1024;

/// Which application protocols the relay offers by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// ALPN `h2` only; serves HTTP/2.
    H2,
    /// ALPN `http/1.1` only; serves HTTP/1.1 keep-alive.
    Http1,
    /// ALPN `h2` and `http/1.1`; serves what was negotiated.
    Both,
}

impl Proto {
    fn alpn(self) -> Vec<Vec<u8>> {
        match self {
            Proto::H2 => vec![b"h2".to_vec()],
            Proto::Http1 => vec![b"http/1.1".to_vec()],
            Proto::Both => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        }
    }

    /// The protocol name the sidecar reports for connections to this relay, when only one
    /// is offered.
    pub fn name(self) -> &'static str {
        match self {
            Proto::H2 | Proto::Both => "h2",
            Proto::Http1 => "http/1.1",
        }
    }
}

/// A misbehaviour of the relay, switchable at run time with [`Relay::set_fault`] (every
/// connection) or [`Relay::set_connection_fault`] (one connection, which wins).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer normally.
    None,
    /// Close each new TCP connection right after accept, before the TLS handshake.
    /// Established connections keep working (see [`Relay::close_connections`]).
    AcceptThenClose,
    /// Read the whole request, then reset the TCP connection (RST, `SO_LINGER` 0) without
    /// answering. On h2 this kills every stream of the connection.
    ResetAfterRequest,
    /// Read the whole request and never answer.
    Stall,
    /// Answer normally, after this delay.
    Delay(Duration),
    /// Answer every request with this status and a JSON body (e.g. a 503 storm).
    Status(u16),
    /// Answer 200 with `Content-Length: 1000`, send the first [`PARTIAL_BODY`] bytes of the
    /// body, then send nothing more (the connection stays open).
    StallBody,
    /// Answer 200 with `Content-Length: 1000`, send the first [`PARTIAL_BODY`] bytes, then
    /// fail the body: hyper closes an HTTP/1.1 connection and resets an h2 stream.
    TruncateBody,
    /// Answer 200 with one extra header (`x-huge`) of this many bytes.
    HugeHeader(usize),
    /// h2 only: reset every stream with REFUSED_STREAM before looking at it (an overloaded
    /// or shutting-down relay that keeps its connections open). Refused requests are not
    /// recorded; [`Relay::refused_streams`] counts them.
    RefuseStreams,
    /// Wait this long after accepting a TCP connection before the TLS handshake (a slow or
    /// busy relay); established connections are not affected.
    SlowHandshake(Duration),
}

/// The bytes a [`Fault::StallBody`] or [`Fault::TruncateBody`] answer sends of its 1000.
pub const PARTIAL_BODY: &[u8] = b"{\"partial\":";

/// One request as it reached the relay.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Arrival order, from 0.
    pub seq: u64,
    /// The TLS connection that carried it.
    pub connection_id: u64,
    pub method: Method,
    /// Path and query exactly as received.
    pub target: String,
    pub path: String,
    pub query: Option<String>,
    /// `:authority` (h2) or the `Host` header (HTTP/1.1).
    pub authority: Option<String>,
    pub version: Version,
    pub headers: HeaderMap,
    /// The first [`RECORDED_BODY_LIMIT`] bytes of the body.
    pub body: Bytes,
    /// Body bytes received so far.
    pub body_len: u64,
    /// True once the whole body arrived.
    pub body_complete: bool,
    pub received_at: Instant,
}

impl Recorded {
    /// The value of header `name`, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

/// What the relay knows about one accepted TCP connection.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub id: u64,
    /// The negotiated ALPN protocol (`h2`, `http/1.1`), or `None` before/without a handshake.
    pub alpn: Option<String>,
    /// The SNI the client sent.
    pub sni: Option<String>,
    /// True when the client presented a certificate.
    pub client_certificate: bool,
    /// The client's leaf certificate (DER), when it presented one (also on resumption: the
    /// session remembers it).
    pub client_certificate_der: Option<Vec<u8>>,
    pub accepted_at: Instant,
    /// True once the TLS handshake succeeded.
    pub tls_established: bool,
    /// True while the connection is open.
    pub open: bool,
    /// When the relay saw the connection end.
    pub closed_at: Option<Instant>,
    /// Raw TCP bytes read from / written to the client (TLS records included).
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// When the last non-empty read from the client happened.
    pub last_read_at: Option<Instant>,
}

/// Builder for [`Relay`].
pub struct RelayBuilder {
    protocol: Proto,
    pki: Option<Arc<Pki>>,
    identity: Option<Identity>,
    require_client_certificate: bool,
    max_concurrent_streams: Option<u32>,
}

impl RelayBuilder {
    /// Which protocols to offer (default [`Proto::H2`]).
    pub fn protocol(mut self, protocol: Proto) -> Self {
        self.protocol = protocol;
        self
    }

    /// Share a PKI (default: a fresh one).
    pub fn pki(mut self, pki: Arc<Pki>) -> Self {
        self.pki = Some(pki);
        self
    }

    /// Present this certificate instead of the PKI's relay certificate (bad-cert tests).
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Require a client certificate issued by the PKI's CA (mTLS).
    pub fn require_client_certificate(mut self, required: bool) -> Self {
        self.require_client_certificate = required;
        self
    }

    /// The SETTINGS_MAX_CONCURRENT_STREAMS an h2 relay announces (default: hyper's).
    pub fn max_concurrent_streams(mut self, streams: u32) -> Self {
        self.max_concurrent_streams = Some(streams);
        self
    }

    /// Binds `127.0.0.1:0` and starts accepting.
    pub async fn start(self) -> Relay {
        let pki = self.pki.unwrap_or_else(Pki::new);
        let (chain, key) = match &self.identity {
            Some(identity) => (identity.chain(), identity.key()),
            None => (pki.server_identity().chain(), pki.server_identity().key()),
        };
        let builder = rustls::ServerConfig::builder();
        let builder = if self.require_client_certificate {
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(pki.roots()))
                .build()
                .expect("a client verifier over a non-empty root store builds");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .expect("an rcgen identity is a valid rustls server identity");
        config.alpn_protocols = self.protocol.alpn();

        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await;
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let inner = Arc::new(Inner {
            protocol: self.protocol,
            max_concurrent_streams: self.max_concurrent_streams,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            addr,
            fault: Mutex::new(Fault::None),
            connection_faults: Mutex::new(HashMap::new()),
            records: Mutex::new(Vec::new()),
            recording: AtomicBool::new(true),
            next_connection_id: AtomicU64::new(1),
            tcp_accepted: AtomicU64::new(0),
            tls_accepted: AtomicU64::new(0),
            refused_streams: AtomicU64::new(0),
            handshake_failures: AtomicU64::new(0),
            connections: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            io: Mutex::new(HashMap::new()),
            accept_task: Mutex::new(None),
        });
        let task = tokio::spawn(accept_loop(inner.clone(), listener));
        *lock(&inner.accept_task) = Some(task);
        Relay { inner, pki }
    }
}

/// A running relay; stops (listener and every connection) when dropped.
pub struct Relay {
    inner: Arc<Inner>,
    pki: Arc<Pki>,
}

impl Relay {
    pub fn builder() -> RelayBuilder {
        RelayBuilder {
            protocol: Proto::H2,
            pki: None,
            identity: None,
            require_client_certificate: false,
            max_concurrent_streams: None,
        }
    }

    /// The listening address (stable across [`Relay::restart`]).
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `127.0.0.1:<port>`, the sidecar's `upstream.endpoint`.
    pub fn endpoint(&self) -> String {
        self.inner.addr.to_string()
    }

    /// The certificate name, the sidecar's `upstream.server_name`.
    pub fn server_name(&self) -> &'static str {
        RELAY_SERVER_NAME
    }

    pub fn protocol(&self) -> Proto {
        self.inner.protocol
    }

    pub fn pki(&self) -> &Arc<Pki> {
        &self.pki
    }

    // ---- fault injection ----

    /// Sets the fault of every connection (a per-connection fault still wins).
    pub fn set_fault(&self, fault: Fault) {
        *lock(&self.inner.fault) = fault;
    }

    /// Sets the fault of one connection only (e.g. the slow one).
    pub fn set_connection_fault(&self, connection_id: u64, fault: Fault) {
        lock(&self.inner.connection_faults).insert(connection_id, fault);
    }

    /// Back to normal: no global fault, no per-connection faults. Does not re-open a closed
    /// listener (see [`Relay::come_back`]).
    pub fn heal(&self) {
        self.set_fault(Fault::None);
        lock(&self.inner.connection_faults).clear();
    }

    /// Closes the listener, so new connects get ECONNREFUSED. Established connections stay.
    pub async fn stop_listening(&self) {
        let task = lock(&self.inner.accept_task).take();
        if let Some(task) = task {
            task.abort();
            // Wait until the task (and with it the listener) is gone.
            let _ = task.await;
        }
    }

    /// Re-opens the listener on the same port (no-op when listening).
    pub async fn start_listening(&self) {
        if lock(&self.inner.accept_task).is_some() {
            return;
        }
        let listener = bind(self.inner.addr).await;
        let task = tokio::spawn(accept_loop(self.inner.clone(), listener));
        *lock(&self.inner.accept_task) = Some(task);
    }

    /// True while the listener is open.
    pub fn is_listening(&self) -> bool {
        lock(&self.inner.accept_task).is_some()
    }

    /// Closes every open connection abruptly (FIN without TLS close_notify or GOAWAY).
    pub fn close_connections(&self) {
        let live: Vec<(u64, LiveConnection)> = lock(&self.inner.live).drain().collect();
        for (id, connection) in live {
            connection.task.abort();
            let _ = connection.socket.shutdown(std::net::Shutdown::Both);
            self.inner.mark_closed(id);
        }
    }

    /// Resets one connection (RST). Returns false if it is not open.
    pub fn reset_connection(&self, connection_id: u64) -> bool {
        self.inner.reset_connection(connection_id)
    }

    /// The relay goes down: the listener closes (connects are refused) and every connection
    /// closes.
    pub async fn go_down(&self) {
        self.stop_listening().await;
        self.close_connections();
    }

    /// The relay comes back after [`Relay::go_down`] or a fault: healed and listening.
    pub async fn come_back(&self) {
        self.heal();
        self.start_listening().await;
    }

    /// Closes every connection and the listener, then listens again on the same port.
    pub async fn restart(&self) {
        self.go_down().await;
        self.start_listening().await;
    }

    // ---- observation ----

    /// Every request seen so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.inner.records).clone()
    }

    /// Requests seen with this method and path (query ignored).
    pub fn count(&self, method: &str, path: &str) -> usize {
        lock(&self.inner.records)
            .iter()
            .filter(|record| record.method.as_str() == method && record.path == path)
            .count()
    }

    /// Requests seen with this path, any method.
    pub fn count_path(&self, path: &str) -> usize {
        lock(&self.inner.records)
            .iter()
            .filter(|record| record.path == path)
            .count()
    }

    /// Total requests seen.
    pub fn request_count(&self) -> usize {
        lock(&self.inner.records).len()
    }

    /// Requests per connection id.
    pub fn requests_per_connection(&self) -> HashMap<u64, usize> {
        let mut counts = HashMap::new();
        for record in lock(&self.inner.records).iter() {
            *counts.entry(record.connection_id).or_insert(0) += 1;
        }
        counts
    }

    /// Forgets the recorded requests (counters of connections stay).
    pub fn clear_requests(&self) {
        lock(&self.inner.records).clear();
    }

    /// Turns the recording of requests off (or on again): a load run sends millions, and
    /// keeping, then forgetting them would cost the relay's thread time and stall it.
    pub fn set_recording(&self, on: bool) {
        self.inner.recording.store(on, Ordering::SeqCst);
    }

    /// TCP connections accepted (including those closed by [`Fault::AcceptThenClose`]).
    pub fn tcp_accepted(&self) -> u64 {
        self.inner.tcp_accepted.load(Ordering::SeqCst)
    }

    /// TLS handshakes completed: the number of TLS connections the sidecar opened.
    pub fn refused_streams(&self) -> u64 {
        self.inner.refused_streams.load(Ordering::SeqCst)
    }

    pub fn tls_accepted(&self) -> u64 {
        self.inner.tls_accepted.load(Ordering::SeqCst)
    }

    /// TLS handshakes that failed (e.g. the client rejected the certificate).
    pub fn handshake_failures(&self) -> u64 {
        self.inner.handshake_failures.load(Ordering::SeqCst)
    }

    /// TLS connections open right now.
    pub fn open_connections(&self) -> usize {
        lock(&self.inner.connections)
            .values()
            .filter(|info| info.open && info.tls_established)
            .count()
    }

    /// Ids of the TLS connections open right now, ascending.
    pub fn open_connection_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = lock(&self.inner.connections)
            .values()
            .filter(|info| info.open && info.tls_established)
            .map(|info| info.id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Every connection ever accepted (TLS or not), ascending by id.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let mut all: Vec<ConnectionInfo> =
            lock(&self.inner.connections).values().cloned().collect();
        let io = lock(&self.inner.io);
        for info in &mut all {
            if let Some(stats) = io.get(&info.id) {
                info.bytes_received = stats.received.load(Ordering::SeqCst);
                info.bytes_sent = stats.sent.load(Ordering::SeqCst);
                info.last_read_at = *lock(&stats.last_read_at);
            }
        }
        all.sort_by_key(|info| info.id);
        all
    }

    /// Waits (bounded) until at least `count` TLS connections are open; returns their ids.
    pub async fn wait_for_open_connections(&self, count: usize, timeout: Duration) -> Vec<u64> {
        super::eventually(
            timeout,
            &format!("{count} open TLS connections at the relay"),
            || async {
                let ids = self.open_connection_ids();
                (ids.len() >= count).then_some(ids)
            },
        )
        .await
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.inner.accept_task).take() {
            task.abort();
        }
        for (_, connection) in lock(&self.inner.live).drain() {
            connection.task.abort();
            let _ = connection.socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

// ---- internals ----

/// The index [`Inner::record`] returns for a request it did not record: it matches no record,
/// so the body of such a request is not kept either.
const NOT_RECORDED: usize = usize::MAX;

struct Inner {
    protocol: Proto,
    max_concurrent_streams: Option<u32>,
    acceptor: TlsAcceptor,
    addr: SocketAddr,
    fault: Mutex<Fault>,
    connection_faults: Mutex<HashMap<u64, Fault>>,
    records: Mutex<Vec<Recorded>>,
    /// Whether requests are recorded ([`Relay::set_recording`]).
    recording: AtomicBool,
    next_connection_id: AtomicU64,
    tcp_accepted: AtomicU64,
    tls_accepted: AtomicU64,
    refused_streams: AtomicU64,
    handshake_failures: AtomicU64,
    /// Every connection ever accepted.
    connections: Mutex<HashMap<u64, ConnectionInfo>>,
    /// Open connections: their task and a duplicate of their socket (to reset or shut it).
    live: Mutex<HashMap<u64, LiveConnection>>,
    /// Byte counters of every connection ever accepted.
    io: Mutex<HashMap<u64, Arc<IoStats>>>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

struct LiveConnection {
    task: AbortHandle,
    /// A second descriptor of the same socket: socket options and shutdown apply to the
    /// connection while hyper owns the first.
    socket: std::net::TcpStream,
}

/// Locks a test mutex; a poisoned lock means another thread already panicked, so propagate.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Inner {
    fn fault_for(&self, connection_id: u64) -> Fault {
        if let Some(fault) = lock(&self.connection_faults).get(&connection_id) {
            return fault.clone();
        }
        lock(&self.fault).clone()
    }

    fn mark_closed(&self, connection_id: u64) {
        if let Some(info) = lock(&self.connections).get_mut(&connection_id)
            && info.open
        {
            info.open = false;
            info.closed_at = Some(Instant::now());
        }
    }

    /// RST: `SO_LINGER` 0 on the socket, then drop every descriptor of it.
    fn reset_connection(&self, connection_id: u64) -> bool {
        let Some(connection) = lock(&self.live).remove(&connection_id) else {
            return false;
        };
        // The duplicate shares the socket (and its non-blocking flag) with hyper's copy.
        if let Ok(socket) = TcpStream::from_std(connection.socket) {
            let _ = socket.set_zero_linger();
        }
        // Dropping the task drops the last descriptor: the kernel sends RST.
        connection.task.abort();
        self.mark_closed(connection_id);
        true
    }

    /// Records the request, returning its index ([`NOT_RECORDED`] while recording is off).
    fn record(&self, connection_id: u64, request: &Request<Incoming>) -> usize {
        if !self.recording.load(Ordering::Relaxed) {
            return NOT_RECORDED;
        }
        let uri = request.uri();
        let target = uri
            .path_and_query()
            .map(|target| target.as_str().to_owned())
            .unwrap_or_else(|| uri.path().to_owned());
        let authority = uri
            .authority()
            .map(|authority| authority.to_string())
            .or_else(|| {
                request
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|host| host.to_str().ok())
                    .map(str::to_owned)
            });
        let mut records = lock(&self.records);
        let index = records.len();
        records.push(Recorded {
            seq: index as u64,
            connection_id,
            method: request.method().clone(),
            target,
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            authority,
            version: request.version(),
            headers: request.headers().clone(),
            body: Bytes::new(),
            body_len: 0,
            body_complete: false,
            received_at: Instant::now(),
        });
        index
    }

    fn record_body_chunk(&self, index: usize, chunk: &[u8]) {
        if index == NOT_RECORDED {
            return;
        }
        let mut records = lock(&self.records);
        // `clear_requests` may have emptied the list meanwhile.
        if let Some(record) = records.get_mut(index) {
            record.body_len += chunk.len() as u64;
            let room = RECORDED_BODY_LIMIT.saturating_sub(record.body.len());
            if room > 0 {
                let mut body = BytesMut::from(&record.body[..]);
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                record.body = body.freeze();
            }
        }
    }

    fn record_body_complete(&self, index: usize) {
        if index == NOT_RECORDED {
            return;
        }
        if let Some(record) = lock(&self.records).get_mut(index) {
            record.body_complete = true;
        }
    }
}

async fn bind(addr: SocketAddr) -> TcpListener {
    // Re-binding the same port right after closing it (restart, come back) needs
    // SO_REUSEADDR; retry briefly in case the kernel still holds it.
    let mut last_error = None;
    for _ in 0..100 {
        let socket = TcpSocket::new_v4().expect("an IPv4 TCP socket can be created");
        socket
            .set_reuseaddr(true)
            .expect("SO_REUSEADDR can be set on a fresh socket");
        match socket.bind(addr).and_then(|()| socket.listen(1024)) {
            Ok(listener) => return listener,
            Err(error) => last_error = Some(error),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("relay cannot bind {addr}: {last_error:?}");
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        inner.tcp_accepted.fetch_add(1, Ordering::SeqCst);
        if *lock(&inner.fault) == Fault::AcceptThenClose {
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let id = inner.next_connection_id.fetch_add(1, Ordering::SeqCst);
        let duplicate = stream
            .as_fd()
            .try_clone_to_owned()
            .map(std::net::TcpStream::from)
            .expect("a socket descriptor can be duplicated");
        lock(&inner.connections).insert(
            id,
            ConnectionInfo {
                id,
                alpn: None,
                sni: None,
                client_certificate: false,
                client_certificate_der: None,
                accepted_at: Instant::now(),
                tls_established: false,
                open: true,
                closed_at: None,
                bytes_received: 0,
                bytes_sent: 0,
                last_read_at: None,
            },
        );
        let stats = Arc::new(IoStats::default());
        lock(&inner.io).insert(id, stats.clone());
        let stream = CountingIo {
            inner: stream,
            stats,
        };
        // Hold the lock while spawning so the task cannot finish (and unregister) before
        // it is registered.
        let mut live = lock(&inner.live);
        let task = tokio::spawn(serve_connection(inner.clone(), id, stream));
        live.insert(
            id,
            LiveConnection {
                task: task.abort_handle(),
                socket: duplicate,
            },
        );
    }
}

/// Marks the connection closed however its task ends (including abort).
struct OpenGuard {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        lock(&self.inner.live).remove(&self.id);
        self.inner.mark_closed(self.id);
    }
}

async fn serve_connection(inner: Arc<Inner>, id: u64, stream: CountingIo) {
    let _guard = OpenGuard {
        inner: inner.clone(),
        id,
    };
    let slow = match &*lock(&inner.fault) {
        Fault::SlowHandshake(delay) => Some(*delay),
        _ => None,
    };
    if let Some(delay) = slow {
        tokio::time::sleep(delay).await;
    }
    let handshake =
        tokio::time::timeout(Duration::from_secs(10), inner.acceptor.accept(stream)).await;
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        _ => {
            inner.handshake_failures.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    let (alpn, sni, client_certificate_der) = {
        let (_, session) = tls.get_ref();
        (
            session
                .alpn_protocol()
                .map(|protocol| String::from_utf8_lossy(protocol).into_owned()),
            session.server_name().map(str::to_owned),
            session
                .peer_certificates()
                .and_then(|certificates| certificates.first())
                .map(|leaf| leaf.as_ref().to_vec()),
        )
    };
    if let Some(info) = lock(&inner.connections).get_mut(&id) {
        info.alpn = alpn.clone();
        info.sni = sni;
        info.client_certificate = client_certificate_der.is_some();
        info.client_certificate_der = client_certificate_der;
        info.tls_established = true;
    }
    inner.tls_accepted.fetch_add(1, Ordering::SeqCst);

    let speaks_h2 = match alpn.as_deref() {
        Some("h2") => true,
        Some(_) => false,
        None => inner.protocol == Proto::H2,
    };
    let service_inner = inner.clone();
    let service = hyper::service::service_fn(move |request| {
        let inner = service_inner.clone();
        async move {
            if speaks_h2 && inner.fault_for(id) == Fault::RefuseStreams {
                inner.refused_streams.fetch_add(1, Ordering::SeqCst);
                // hyper resets an h2 stream with the reason of the service's h2 error.
                return Err(h2::Error::from(h2::Reason::REFUSED_STREAM));
            }
            Ok(handle(inner, id, request).await)
        }
    });
    if speaks_h2 {
        // Like a production h2 server (nginx, envoy), the relay writes the answers that are
        // ready in one event-loop turn together instead of one TLS record per stream.
        let io = TokioIo::new(Coalesce::new(tls));
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        if let Some(streams) = inner.max_concurrent_streams {
            builder.max_concurrent_streams(streams);
        }
        let _ = builder.serve_connection(io, service).await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(tls), service)
            .await;
    }
}

async fn handle(
    inner: Arc<Inner>,
    connection_id: u64,
    request: Request<Incoming>,
) -> Response<RelayBody> {
    let index = inner.record(connection_id, &request);
    let fault_now = inner.fault_for(connection_id);
    let mut response = match fault_now.clone() {
        Fault::Stall => {
            let _ = read_body(&inner, index, request.into_body()).await;
            std::future::pending::<()>().await;
            unreachable!("a stalled request is never answered")
        }
        Fault::ResetAfterRequest => {
            let _ = read_body(&inner, index, request.into_body()).await;
            inner.reset_connection(connection_id);
            // The connection is gone; on h2 this handler runs in its own task, so end it.
            tokio::time::sleep(Duration::from_secs(5)).await;
            json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &serde_json::json!({"error": "reset failed"}),
            )
        }
        Fault::HugeHeader(size) => {
            let _ = read_body(&inner, index, request.into_body()).await;
            let mut response =
                json_response(StatusCode::OK, &serde_json::json!({"huge_header": size}));
            let value = HeaderValue::from_str(&"h".repeat(size)).expect("a valid header value");
            response.headers_mut().insert("x-huge", value);
            response
        }
        Fault::Status(code) => {
            let _ = read_body(&inner, index, request.into_body()).await;
            let status = StatusCode::from_u16(code).expect("injected status codes are valid");
            let mut response = json_response(
                status,
                &serde_json::json!({"error": "injected", "status": code}),
            );
            if code == 503 {
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            response
        }
        Fault::StallBody | Fault::TruncateBody => {
            let _ = read_body(&inner, index, request.into_body()).await;
            let mut response = Response::new(
                PartialBody {
                    sent: false,
                    fail: fault_now == Fault::TruncateBody,
                    cut: None,
                }
                .boxed(),
            );
            response.headers_mut().insert(
                http::header::CONTENT_LENGTH,
                HeaderValue::from_static("1000"),
            );
            response
        }
        Fault::Delay(delay) => {
            tokio::time::sleep(delay).await;
            route(&inner, connection_id, index, request).await
        }
        // RefuseStreams: HTTP/1.1 has no stream to refuse, so the request is answered.
        Fault::None | Fault::AcceptThenClose | Fault::RefuseStreams | Fault::SlowHandshake(_) => {
            route(&inner, connection_id, index, request).await
        }
    };
    response
        .headers_mut()
        .insert("x-relay-connection-id", HeaderValue::from(connection_id));
    response
}

async fn route(
    inner: &Arc<Inner>,
    connection_id: u64,
    index: usize,
    request: Request<Incoming>,
) -> Response<RelayBody> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();

    if path == "/echo" {
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
        let body = echo_body(inner.clone(), index, request.into_body());
        let mut response = Response::new(body.boxed());
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, content_type);
        return response;
    }

    let seen = describe(inner, connection_id, index, &request);
    let body = match read_body(inner, index, request.into_body()).await {
        Ok(body) => body,
        Err(error) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": "body read failed", "detail": error.to_string()}),
            );
        }
    };

    if let Some(count) = path.strip_prefix("/bytes/") {
        return match count.parse::<u64>() {
            Ok(len) => {
                let mut response = Response::new(
                    super::PatternBody::sized(len)
                        .map_err(|never| -> BoxError { match never {} })
                        .boxed(),
                );
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                response
            }
            Err(_) => json_response(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": "bad length"}),
            ),
        };
    }
    if let Some(code) = path.strip_prefix("/status/") {
        return match code
            .parse::<u16>()
            .ok()
            .and_then(|code| StatusCode::from_u16(code).ok())
        {
            Some(status) => json_response(status, &serde_json::json!({"status": status.as_u16()})),
            None => json_response(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": "bad status"}),
            ),
        };
    }
    if let Some(millis) = path.strip_prefix("/delay/") {
        let Ok(millis) = millis.parse::<u64>() else {
            return json_response(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": "bad delay"}),
            );
        };
        tokio::time::sleep(Duration::from_millis(millis)).await;
        return json_response(StatusCode::OK, &seen);
    }
    if path == "/" && method == Method::POST {
        return json_rpc(connection_id, &body);
    }
    json_response(StatusCode::OK, &seen)
}

/// A JSON-RPC-ish answer: `{"jsonrpc":"2.0","id":<id>,"result":{...}}`.
fn json_rpc(connection_id: u64, body: &[u8]) -> Response<RelayBody> {
    let Ok(call) = serde_json::from_slice::<serde_json::Value>(body) else {
        return json_response(
            StatusCode::OK,
            &serde_json::json!({
                "jsonrpc": "2.0", "id": null,
                "error": {"code": -32700, "message": "parse error"}
            }),
        );
    };
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "jsonrpc": "2.0",
            "id": call.get("id").cloned().unwrap_or(serde_json::Value::Null),
            "result": {
                "method": call.get("method").cloned().unwrap_or(serde_json::Value::Null),
                "params": call.get("params").cloned().unwrap_or(serde_json::Value::Null),
                "connection_id": connection_id,
            }
        }),
    )
}

/// The JSON document of what the relay saw (the default route).
fn describe(
    inner: &Inner,
    connection_id: u64,
    index: usize,
    request: &Request<Incoming>,
) -> serde_json::Value {
    let mut headers = serde_json::Map::new();
    for name in request.headers().keys() {
        let values: Vec<serde_json::Value> = request
            .headers()
            .get_all(name)
            .iter()
            .map(|value| {
                serde_json::Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned())
            })
            .collect();
        headers.insert(name.as_str().to_owned(), serde_json::Value::Array(values));
    }
    let record = lock(&inner.records).get(index).cloned();
    serde_json::json!({
        "method": request.method().as_str(),
        "target": record.as_ref().map(|record| record.target.clone()),
        "path": request.uri().path(),
        "query": request.uri().query(),
        "authority": record.as_ref().and_then(|record| record.authority.clone()),
        "version": format!("{:?}", request.version()),
        "headers": headers,
        "connection_id": connection_id,
    })
}

/// The body of [`Fault::StallBody`] and [`Fault::TruncateBody`]: [`PARTIAL_BODY`], then
/// nothing (pending for ever, never woken) or, 100 ms later (so that the head and the first
/// bytes are on the wire first), an error.
struct PartialBody {
    sent: bool,
    fail: bool,
    cut: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for PartialBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.sent {
            self.sent = true;
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(PARTIAL_BODY)))));
        }
        if !self.fail {
            return Poll::Pending;
        }
        let cut = self
            .cut
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(100))));
        match cut.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err("injected: body cut short".into()))),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn json_response(status: StatusCode, document: &serde_json::Value) -> Response<RelayBody> {
    let body = Full::new(Bytes::from(document.to_string()))
        .map_err(|never| -> BoxError { match never {} })
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Reads the whole request body, recording it.
async fn read_body(inner: &Inner, index: usize, mut body: Incoming) -> Result<Bytes, hyper::Error> {
    let mut collected = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Some(data) = frame.data_ref() {
            inner.record_body_chunk(index, data);
            collected.extend_from_slice(data);
        }
    }
    inner.record_body_complete(index);
    Ok(collected.freeze())
}

/// Streams the request body back as it arrives (bounded channel: back-pressure, no buffering
/// of the whole body), recording it on the way.
fn echo_body(inner: Arc<Inner>, index: usize, mut body: Incoming) -> ChannelBody {
    let (sender, receiver) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        inner.record_body_chunk(index, data);
                    }
                    if sender.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    let _ = sender.send(Err(Box::new(error))).await;
                    return;
                }
            }
        }
        inner.record_body_complete(index);
    });
    ChannelBody { receiver }
}

/// A response body fed by a channel.
pub struct ChannelBody {
    receiver: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.receiver.poll_recv(cx)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Byte counters of one TCP connection.
#[derive(Default)]
struct IoStats {
    received: AtomicU64,
    sent: AtomicU64,
    last_read_at: Mutex<Option<Instant>>,
}

/// The relay's TCP stream with byte counting (below TLS), so a test can tell "the sidecar
/// never sent it" from "the relay never parsed it".
struct CountingIo {
    inner: TcpStream,
    stats: Arc<IoStats>,
}

impl tokio::io::AsyncRead for CountingIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.stats.received.fetch_add(read as u64, Ordering::SeqCst);
            *lock(&self.stats.last_read_at) = Some(Instant::now());
        }
        result
    }
}

impl tokio::io::AsyncWrite for CountingIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(written)) = &result {
            self.stats.sent.fetch_add(*written as u64, Ordering::SeqCst);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
