//! The data plane: plain HTTP/1.1 (and h2c with prior knowledge) from local apps on
//! `listener.address`, each request rewritten (path and query unchanged, Host/:authority set
//! to the relay, hop-by-hop headers and any client copy of the credential header dropped)
//! and forwarded through the upstream pool, bodies streamed both ways.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub(crate) mod client_io;

use crate::config::Config;
use crate::event_loops::EventLoops;
use crate::metrics::Metrics;
use crate::response::json_error;
use crate::upstream::connection::{BoxError, ResponseBody};
use crate::upstream::{ClientBody, OutgoingBody, OutgoingHead, Upstream, UpstreamError};

/// Bodies up to this size (with a known length) are read whole so a failed attempt can be
/// retried; larger or chunked bodies are streamed and sent once.
pub const REPLAYABLE_BODY_LIMIT: u64 = 64 * 1024;

/// What the request handler needs, shared by all client connections.
pub struct DataPlane {
    upstream: Arc<Upstream>,
    cfg: Arc<Config>,
    metrics: Metrics,
    /// The relay's authority, parsed once (`None` if the configured name cannot be one; every
    /// request then gets a 502 naming it).
    authority: Option<http::uri::Authority>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl DataPlane {
    pub fn new(upstream: Arc<Upstream>, cfg: Arc<Config>, metrics: Metrics) -> Self {
        let authority = http::uri::Authority::try_from(cfg.upstream.authority()).ok();
        DataPlane {
            upstream,
            cfg,
            metrics,
            authority,
        }
    }
}

/// Accepts local clients until shutdown, then stops accepting and lets in-flight requests
/// finish for up to `listener.drain_timeout`.
/// Runs on event loop 0 and hands each client to the loop with the fewest (`event_loops`).
pub async fn serve(
    listener: TcpListener,
    plane: Arc<DataPlane>,
    shutdown: watch::Receiver<bool>,
    loops: Arc<EventLoops>,
) {
    let cfg = plane.cfg.clone();
    let limit = Arc::new(Semaphore::new(cfg.listener.max_connections.get()));
    // What hyper and h2 hold of a request head before refusing it themselves.
    let head_room = cfg
        .listener
        .max_header_bytes
        .saturating_mul(4)
        .clamp(8192, 1 << 20);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // No hyper header timer: the client socket wrapper keeps the header and idle clocks
        // (hyper's also ran between requests, closing kept-alive connections early). hyper
        // arms a 30 s one by default once it has a timer, so it is switched off by name; that
        // also saves a boxed timer armed and dropped for every request.
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        // Room above the limit so the handler, not hyper, sees most oversized heads and can
        // answer 431 with a JSON body; heads beyond even this get hyper's bare 431.
        .max_buf_size(head_room)
        .keep_alive(true)
        // No read while a request is in flight. Without this, hyper reads mid-message to
        // detect a client's EOF, and before that read it reserves a fresh 8 KiB buffer,
        // because the request's header values and body still share the old one. That old
        // buffer is then freed (and, with memory.wipe_freed_memory, zeroed) once the request
        // is done: an 8 KiB allocate, wipe and free for every request. A client that closes
        // early is still noticed when its answer is written. Clients that half-close after
        // sending get their answer.
        .half_close(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        // The same room over h2c: h2 itself answers a bare 431 only beyond it.
        .max_header_list_size(head_room.min(u32::MAX as usize) as u32)
        .max_concurrent_streams(1024);
    let mut stop = shutdown.clone();
    loop {
        // Bound live connections: wait for a free place before accepting more.
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = crate::shutdown::triggered(&mut stop) => break,
        };
        let (stream, _peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = crate::shutdown::triggered(&mut stop) => break,
        };
        let client = Client {
            plane: plane.clone(),
            builder: builder.clone(),
            shutdown: shutdown.clone(),
            event_loop: loops.assign_client(),
            loops: loops.clone(),
            _permit: permit,
        };
        if client.event_loop == crate::event_loops::current() {
            tokio::spawn(client.serve(stream));
            continue;
        }
        // Another loop: the socket leaves this loop's reactor and joins that one's.
        match stream.into_std() {
            Ok(stream) => {
                loops.spawn_on(client.event_loop, async move {
                    match TcpStream::from_std(stream) {
                        Ok(stream) => client.serve(stream).await,
                        Err(e) => warn!(error = %e, "cannot hand a client to its event loop"),
                    }
                });
            }
            Err(e) => warn!(error = %e, "cannot hand a client to its event loop"),
        }
    }
    drop(listener);
    info!("data listener closed; draining in-flight requests");
    // Every connection holds a permit until it is gone: all of them back means drained.
    let all = u32::try_from(cfg.listener.max_connections.get()).unwrap_or(u32::MAX);
    if tokio::time::timeout(cfg.listener.drain_timeout, limit.acquire_many(all))
        .await
        .is_err()
    {
        warn!("drain deadline passed with client requests still open");
    }
}

/// The body answered to clients: the relay's streamed body, or a small local one.
pub enum ProxyBody {
    Relay {
        body: ResponseBody,
        metrics: Metrics,
    },
    Local(Full<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Relay { body, metrics } => {
                let polled = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(Some(Ok(f))) = &polled
                    && let Some(d) = f.data_ref()
                {
                    metrics.bytes(0, d.len() as u64);
                }
                polled
            }
            ProxyBody::Local(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Relay { body, .. } => body.is_end_stream(),
            ProxyBody::Local(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Relay { body, .. } => body.size_hint(),
            ProxyBody::Local(b) => b.size_hint(),
        }
    }
}

fn local(resp: Response<Full<Bytes>>) -> Response<ProxyBody> {
    resp.map(ProxyBody::Local)
}

/// One accepted client connection, with what serving it needs on its event loop.
struct Client {
    plane: Arc<DataPlane>,
    builder: auto::Builder<TokioExecutor>,
    shutdown: watch::Receiver<bool>,
    loops: Arc<EventLoops>,
    event_loop: usize,
    /// The client's place under `listener.max_connections`, held until it is gone.
    _permit: OwnedSemaphorePermit,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.loops.client_closed(self.event_loop);
    }
}

impl Client {
    /// Serves the connection's requests until it closes or shutdown drains it.
    async fn serve(self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let plane = &self.plane;
        let cfg = &plane.cfg;
        plane.metrics.client_connection_opened();
        let p = plane.clone();
        let exchange = Arc::new(client_io::Exchange::default());
        let seen = exchange.clone();
        let service = service_fn(move |req| handle(p.clone(), req, seen.request_started()));
        let io = client_io::ClientIo::new(
            stream,
            exchange.clone(),
            Some(cfg.listener.max_header_bytes),
            client_io::Timeouts {
                header: cfg.listener.header_read_timeout,
                idle: cfg.listener.idle_timeout,
            },
        );
        let conn = self.builder.serve_connection(TokioIo::new(io), service);
        let conn = client_io::Served::new(
            conn,
            |conn| conn.graceful_shutdown(),
            exchange.clone(),
            self.shutdown.clone(),
        );
        if let Err(e) = conn.await {
            debug!(error = %e, "client connection ended with an error");
        }
        client_io::finish(&exchange, cfg.listener.header_read_timeout).await;
        plane.metrics.client_connection_closed();
    }
}

/// Serves one client request (`started`: its place in the connection's exchange, held until
/// hyper is done with the answer): [`forward_request`], counted in flight (in the metrics,
/// and for busy polling until its answer or error is ready). The service's future itself,
/// one `async fn` around `forward_request` rather than several nested: each level moves the
/// request, and the future below it, once more (about 550 instructions per request).
async fn handle(
    plane: Arc<DataPlane>,
    req: Request<Incoming>,
    started: client_io::Started,
) -> Result<Response<client_io::Answered<ProxyBody>>, Infallible> {
    let start = Instant::now();
    let method = req.method().clone();
    let counted = plane.metrics.request_started();
    let resp = {
        let _in_flight = crate::busy_poll::InFlight::start();
        forward_request(&plane, req, start).await
    };
    let elapsed = start.elapsed();
    counted.answered(&method, resp.status().as_u16(), elapsed);
    crate::busy_poll::answered(elapsed);
    Ok(resp.map(|body| client_io::Answered::new(body, started)))
}

async fn forward_request(
    plane: &DataPlane,
    req: Request<Incoming>,
    start: Instant,
) -> Response<ProxyBody> {
    let cfg = &plane.cfg;
    if req.method() == http::Method::CONNECT {
        return local(json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "CONNECT is not supported: send plain HTTP requests to the sidecar",
        ));
    }
    if let Some((status, error, detail)) = refuse_framing(&req) {
        return local(json_error(status, error, detail));
    }
    let sizes = HeadSizes::of(&req);
    if sizes.head > cfg.listener.max_header_bytes {
        return local(json_error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            &format!(
                "request head of {} bytes exceeds listener.max_header_bytes ({})",
                sizes.head, cfg.listener.max_header_bytes
            ),
        ));
    }
    if let Some((status, error, detail)) = sizes.over_relay_limits(&req, &cfg.upstream) {
        return local(json_error(status, error, &detail));
    }
    let limit = cfg.listener.max_body_bytes;
    // hyper has parsed an HTTP/1.1 Content-Length already (and refused a bad or conflicting
    // one); h2 checks the body against the first value only, so over h2c all are looked at.
    let declared = if req.version() == http::Version::HTTP_2 {
        content_length(req.headers())
    } else {
        Ok(req.body().size_hint().exact())
    };
    let declared = match declared {
        Ok(n) => n,
        Err(()) => {
            return local(json_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "invalid Content-Length header",
            ));
        }
    };
    if declared.is_some_and(|n| n > limit) {
        return body_too_large(limit);
    }
    let (parts, incoming) = req.into_parts();
    let client_version = parts.version;
    let Some(authority) = plane.authority.clone() else {
        return local(json_error(
            StatusCode::BAD_GATEWAY,
            "upstream_failed",
            &format!(
                "upstream.server_name {:?} is not a valid URI authority",
                cfg.upstream.server_name
            ),
        ));
    };
    // Path and query move over as parsed by hyper: no re-parsing, no copy.
    let mut target = parts.uri.into_parts();
    target.scheme = Some(http::uri::Scheme::HTTPS);
    target.authority = Some(authority);
    match target
        .path_and_query
        .as_ref()
        .map(http::uri::PathAndQuery::as_str)
    {
        None | Some("") => {
            target.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        // An absolute-form target with a query and no path (`http://host?x=1`): the path is
        // "/" (RFC 9112 §3.2.2), and HTTP/2 refuses a `:path` that does not start with it.
        Some(q) if q.starts_with('?') => match format!("/{q}").parse() {
            Ok(pq) => target.path_and_query = Some(pq),
            Err(_) => {
                return local(json_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "invalid request target",
                ));
            }
        },
        // The asterisk-form is for OPTIONS only (RFC 9112 §3.2.4).
        Some("*") if parts.method != http::Method::OPTIONS => {
            return local(json_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!(
                    "the request target * is only valid with OPTIONS, not {}",
                    parts.method
                ),
            ));
        }
        Some(_) => {}
    }
    let uri = match http::Uri::from_parts(target) {
        Ok(u) => u,
        Err(e) => {
            return local(json_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("invalid request target: {e}"),
            ));
        }
    };
    let idempotency_key = parts.headers.contains_key("idempotency-key");
    let mut headers = parts.headers;
    if client_version == http::Version::HTTP_2 {
        collapse_repeated_content_length(&mut headers);
    }
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    headers.remove(&cfg.upstream.auth_header);
    let head = OutgoingHead {
        method: parts.method,
        uri,
        headers,
        idempotency_key,
    };
    let deadline = start + cfg.listener.request_deadline;
    let body = match client_body(plane, incoming, declared, deadline).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    match plane.upstream.send(head, body, deadline).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            if parts.status.as_u16() > 599 {
                // HTTP has no status above 599 (RFC 9110 §15); clients cannot classify one.
                return local(json_error(
                    StatusCode::BAD_GATEWAY,
                    "upstream_failed",
                    &format!(
                        "the relay answered with status {}, which HTTP does not define",
                        parts.status.as_u16()
                    ),
                ));
            }
            if parts.status == StatusCode::SWITCHING_PROTOCOLS {
                // The sidecar never asks for an upgrade (Upgrade is hop-by-hop and dropped),
                // so a 101 is an answer the client cannot use.
                return local(json_error(
                    StatusCode::BAD_GATEWAY,
                    "upstream_failed",
                    "the relay answered 101 Switching Protocols to a request that asked for \
                     no upgrade",
                ));
            }
            if parts.version != http::Version::HTTP_2
                && parts.headers.contains_key(header::TRANSFER_ENCODING)
            {
                // An HTTP/1.1 relay that sent both: the length is the chunks', and a proxy
                // must not forward the Content-Length (RFC 9112 §6.3). (HTTP/2 has neither.)
                parts.headers.remove(header::CONTENT_LENGTH);
            }
            strip_hop_by_hop(&mut parts.headers);
            if client_version == http::Version::HTTP_10
                && !parts.headers.contains_key(header::CONTENT_LENGTH)
                && !http_body::Body::is_end_stream(&body)
            {
                // An HTTP/1.0 client reads a body of unknown length until the connection
                // closes (it has no chunked coding): say so rather than keep-alive. As
                // HTTP/1.0, hyper then closes without appending its `keep-alive`.
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                parts.version = http::Version::HTTP_10;
            } else if client_version != http::Version::HTTP_2 {
                // The answer goes out in the client's protocol, not the relay's (an h2 relay's
                // answer says HTTP/2). As HTTP/1.1, hyper announces `Connection: keep-alive`
                // to an HTTP/1.0 client that asked to keep the connection, and writes the
                // status line in the client's version.
                parts.version = http::Version::HTTP_11;
            }
            Response::from_parts(
                parts,
                ProxyBody::Relay {
                    body,
                    metrics: plane.metrics.clone(),
                },
            )
        }
        Err(e) => {
            log_upstream_failure(&e);
            error_response(&e)
        }
    }
}

/// Logs an upstream failure a client was answered with, at most once a second (saying how
/// many were not logged since), so that an outage shows in the log without flooding it.
fn log_upstream_failure(e: &UpstreamError) {
    static LIMIT: crate::log_limit::OncePerSecond = crate::log_limit::OncePerSecond::new();
    if e.kind() == crate::upstream::ErrorKind::ClientStalled {
        return; // the client's fault, answered 408
    }
    let Some(not_logged_since) = LIMIT.admit() else {
        return;
    };
    tracing::warn!(
        status = e.status().as_u16(),
        error = e.code(),
        detail = e.detail(),
        not_logged_since,
        "a client was answered with an upstream error"
    );
}

/// The request body as the upstream sends it, or the answer to a client whose body is bad.
///
/// - Nothing to read: an empty, replayable body.
/// - A declared length up to [`REPLAYABLE_BODY_LIMIT`]: read whole (it usually came with the
///   head, and a first poll without a timer takes it), so a failed attempt can be retried.
/// - An unknown length (chunked, or h2c without `Content-Length`): what has already arrived
///   is taken first. A small body that is all there is goes out whole, like a declared one;
///   one that is malformed or too large is answered here and never reaches the relay (over
///   HTTP/1.1, a body that fails after its head was sent costs the relay connection).
/// - Otherwise streamed, sent once, checked against `listener.max_body_bytes` as it grows.
async fn client_body(
    plane: &DataPlane,
    mut incoming: Incoming,
    declared: Option<u64>,
    deadline: Instant,
) -> Result<OutgoingBody, Response<ProxyBody>> {
    if incoming.is_end_stream() {
        return Ok(OutgoingBody::Replayable(Bytes::new()));
    }
    let limit = plane.cfg.listener.max_body_bytes;
    let (ahead, seen) = match declared {
        Some(n) if n <= REPLAYABLE_BODY_LIMIT => {
            let bytes = read_small_body(&mut incoming, n, deadline).await?;
            plane.metrics.bytes(bytes.len() as u64, 0);
            return Ok(OutgoingBody::Replayable(bytes));
        }
        Some(_) => (Vec::new(), 0),
        None => match take_what_arrived(&mut incoming, limit, &plane.metrics).await? {
            Arrived::Whole(bytes) => return Ok(OutgoingBody::Replayable(bytes)),
            Arrived::Start(frames, seen) => (frames, seen),
        },
    };
    let client = Arc::new(ClientBody::default());
    let limited = LimitedBody {
        ahead: ahead.into(),
        inner: incoming,
        seen,
        limit,
        client: client.clone(),
        metrics: plane.metrics.clone(),
    };
    Ok(OutgoingBody::Streaming(limited.boxed_unsync(), client))
}

/// Reads a body of declared length `len` (at most [`REPLAYABLE_BODY_LIMIT`]) whole. It
/// usually came with the head as one piece: a first poll without a timer takes it, without a
/// copy. Later pieces are waited for until `deadline` (408).
async fn read_small_body(
    incoming: &mut Incoming,
    len: u64,
    deadline: Instant,
) -> Result<Bytes, Response<ProxyBody>> {
    let mut body = Joined::default();
    while !incoming.is_end_stream() {
        let frame = match poll_frame_now(incoming).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => match tokio::time::timeout_at(deadline, incoming.frame()).await {
                Ok(frame) => frame,
                Err(_) => {
                    let mut resp = json_error(
                        StatusCode::REQUEST_TIMEOUT,
                        "request_timeout",
                        "the request body did not arrive before listener.request_deadline",
                    );
                    // The rest of the body may still come: the connection cannot carry
                    // another request.
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    return Err(local(resp));
                }
            },
        };
        match frame {
            None => break,
            Some(Err(e)) => return Err(body_failed(&e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    body.push(data, len);
                }
            }
        }
    }
    Ok(body.into_bytes())
}

/// Pieces of a body joined into one `Bytes`; a body of one piece is kept without a copy.
#[derive(Default)]
struct Joined {
    first: Option<Bytes>,
    all: Option<bytes::BytesMut>,
}

impl Joined {
    /// Adds the next piece; `total` (the body's size, if known) sizes the buffer once.
    fn push(&mut self, piece: Bytes, total: u64) {
        match (&mut self.all, self.first.take()) {
            (Some(all), _) => all.extend_from_slice(&piece),
            (None, None) => self.first = Some(piece),
            (None, Some(first)) => {
                let mut all = bytes::BytesMut::with_capacity(total as usize);
                all.extend_from_slice(&first);
                all.extend_from_slice(&piece);
                self.all = Some(all);
            }
        }
    }

    fn into_bytes(self) -> Bytes {
        match self.all {
            Some(all) => all.freeze(),
            None => self.first.unwrap_or_default(),
        }
    }
}

/// Polls `incoming` once, without a timer: `Pending` when the client's connection has no
/// more of the body at hand.
async fn poll_frame_now(
    incoming: &mut Incoming,
) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *incoming).poll_frame(cx))).await
}

/// The client's body could not be read (broken framing, the client left): 400 naming why.
fn body_failed(e: &hyper::Error) -> Response<ProxyBody> {
    local(json_error(
        StatusCode::BAD_REQUEST,
        "bad_request",
        &format!(
            "reading the request body failed: {}",
            describe_body_error(e)
        ),
    ))
}

/// The client's body is larger than `listener.max_body_bytes`: 413.
fn body_too_large(limit: u64) -> Response<ProxyBody> {
    local(json_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        &format!("request body exceeds listener.max_body_bytes ({limit} bytes)"),
    ))
}

/// What had arrived of a body of unknown length when the client's connection had no more of
/// it buffered.
enum Arrived {
    /// All of it, no larger than [`REPLAYABLE_BODY_LIMIT`].
    Whole(Bytes),
    /// Its first frames (and how many body bytes they hold); the rest follows from the client.
    Start(Vec<Frame<Bytes>>, u64),
}

/// Reads the frames of `incoming` that are already there, without waiting for the client:
/// when a poll finds nothing, the task yields once (hyper then moves what its connection has
/// read into the body) and stops at the next poll that finds nothing. Stops as well past
/// [`REPLAYABLE_BODY_LIMIT`] and at trailers (which only a streamed body carries on).
/// A body error or one over `limit` (`listener.max_body_bytes`) is the client's: 400 or 413.
async fn take_what_arrived(
    incoming: &mut Incoming,
    limit: u64,
    metrics: &Metrics,
) -> Result<Arrived, Response<ProxyBody>> {
    let mut frames: Vec<Frame<Bytes>> = Vec::new();
    let mut seen = 0u64;
    let mut yielded = false;
    loop {
        let frame = match poll_frame_now(incoming).await {
            Poll::Pending if yielded => return Ok(Arrived::Start(frames, seen)),
            Poll::Pending => {
                yielded = true;
                tokio::task::yield_now().await;
                continue;
            }
            Poll::Ready(None) => break,
            Poll::Ready(Some(Err(e))) => return Err(body_failed(&e)),
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        yielded = false;
        if let Some(data) = frame.data_ref() {
            seen += data.len() as u64;
            metrics.bytes(data.len() as u64, 0);
            if seen > limit {
                return Err(body_too_large(limit));
            }
        }
        let trailers = frame.is_trailers();
        frames.push(frame);
        if trailers || seen > REPLAYABLE_BODY_LIMIT {
            return Ok(Arrived::Start(frames, seen));
        }
    }
    let mut whole = Joined::default();
    for data in frames
        .into_iter()
        .filter_map(|frame| frame.into_data().ok())
    {
        whole.push(data, seen);
    }
    Ok(Arrived::Whole(whole.into_bytes()))
}

/// The JSON answer of an upstream failure, with `Retry-After` on 503.
pub fn error_response(e: &UpstreamError) -> Response<ProxyBody> {
    let mut resp = json_error(e.status(), e.code(), e.detail());
    if e.kind() == crate::upstream::ErrorKind::ClientStalled {
        // The rest of the body may still come: the connection cannot carry another request.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(secs) = e.retry_after() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    local(resp)
}

/// Bytes of the request line and headers as sent on the wire (HTTP/1.1 framing).
/// Sizes of a request head, measured in one pass over its header fields.
struct HeadSizes {
    /// The head as HTTP/1.1 bytes (request line, fields, line ends), for `max_header_bytes`.
    head: usize,
    /// The largest field (name + value) and its index in the header map's iteration, `None`
    /// for the request target (HTTP/2 sends it as the `:path` field, which relays limit too).
    largest_field: (usize, Option<usize>),
    /// All fields (name + value) plus method and target: what the relay's header list holds.
    list: usize,
}

impl HeadSizes {
    fn of<B>(req: &Request<B>) -> Self {
        let uri = req.uri();
        let target = uri.path_and_query().map_or(1, |p| p.as_str().len())
            + uri.authority().map_or(0, |a| a.as_str().len())
            + uri.scheme_str().map_or(0, |s| s.len() + 3);
        let method = req.method().as_str().len();
        let mut fields = 0;
        let mut count = 0;
        let mut largest_field = (":path".len() + target, None);
        for (i, (name, value)) in req.headers().iter().enumerate() {
            let field = name.as_str().len() + value.len();
            fields += field;
            count += 1;
            if field > largest_field.0 {
                largest_field = (field, Some(i));
            }
        }
        HeadSizes {
            head: method + target + 12 + fields + 4 * count,
            largest_field,
            list: method + target + fields,
        }
    }

    /// Why the relay would refuse this head (`upstream.max_header_field_bytes`,
    /// `max_header_list_bytes`), if it would. A relay that refuses a head may close the whole
    /// connection with it (nginx: GOAWAY `ENHANCE_YOUR_CALM`), failing every request in flight
    /// there, so such a head is answered here and never sent. Names the field, never its value.
    fn over_relay_limits<B>(
        &self,
        req: &Request<B>,
        upstream: &crate::config::UpstreamConfig,
    ) -> Option<(StatusCode, &'static str, String)> {
        let (field, index) = self.largest_field;
        if field > upstream.max_header_field_bytes {
            let limit = upstream.max_header_field_bytes;
            return Some(match index {
                Some(i) => (
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "headers_too_large",
                    format!(
                        "request header field {:?} of {field} bytes exceeds \
                         upstream.max_header_field_bytes ({limit}); relays refuse such fields",
                        req.headers()
                            .iter()
                            .nth(i)
                            .map_or("?", |(name, _)| name.as_str())
                    ),
                ),
                None => (
                    StatusCode::URI_TOO_LONG,
                    "uri_too_long",
                    format!(
                        "the request target (the HTTP/2 :path field) of {field} bytes exceeds \
                         upstream.max_header_field_bytes ({limit}); relays refuse such fields"
                    ),
                ),
            });
        }
        (self.list > upstream.max_header_list_bytes).then(|| {
            (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!(
                    "request header fields of {} bytes in all exceed \
                     upstream.max_header_list_bytes ({}); relays refuse such heads",
                    self.list, upstream.max_header_list_bytes
                ),
            )
        })
    }
}

/// What RFC 9112 requires a server to refuse and hyper leaves to its user:
/// - an HTTP/1.1 request without `Host`, any request with more than one, or a `Host` that is
///   not `host[:port]` (§3.2: 400);
/// - a transfer coding other than `chunked` (§6.1: 501). hyper decodes the chunked framing of
///   `gzip, chunked` and hands over the still-gzipped bytes; forwarded without the
///   hop-by-hop `Transfer-Encoding`, the relay would take them for the plain body.
///
/// nginx answers all of these the same way.
fn refuse_framing<B: Body>(req: &Request<B>) -> Option<(StatusCode, &'static str, &'static str)> {
    let bad = |detail| Some((StatusCode::BAD_REQUEST, "bad_request", detail));
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return bad("more than one Host header"),
        (None, None) if req.version() == http::Version::HTTP_11 => {
            return bad("an HTTP/1.1 request needs a Host header");
        }
        (Some(host), None) if !valid_host(host.as_bytes()) => {
            return bad("the Host header is not a host with an optional port");
        }
        _ => {}
    }
    // A body of known length has no transfer coding (hyper frames a coded one as chunked,
    // whose length is unknown): most requests skip the look-up.
    if req.body().size_hint().exact().is_some() {
        return None;
    }
    let other_coding = req
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"chunked"));
    other_coding.then_some((
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        "the request uses a transfer coding other than chunked, which the sidecar cannot decode",
    ))
}

/// The bytes of a registered name or IPv4 address (RFC 3986 §3.2.2: unreserved,
/// percent-encoded, sub-delims), as a table: the check runs on every request.
const REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(c, b'-' | b'.' | b'_' | b'~' | b'%')
            || matches!(
                c,
                b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
            );
        b += 1;
    }
    table
};

/// `Host = uri-host [ ":" port ]` (RFC 9110 §7.2, RFC 3986 §3.2.2): a registered name or an
/// IPv4 address, or an IPv6 address in brackets, then optionally `:` and digits. Empty is
/// allowed (a target without an authority). Public for `benches/hot_paths.rs`.
pub fn valid_host(value: &[u8]) -> bool {
    let (host_ok, port) = if let Some(rest) = value.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|b| *b == b']') else {
            return false;
        };
        let address = &rest[..end];
        let ok = !address.is_empty()
            && address
                .iter()
                .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.');
        (ok, &rest[end + 1..])
    } else {
        let colon = value.iter().rposition(|b| *b == b':');
        let (host, port) = value.split_at(colon.unwrap_or(value.len()));
        (host.iter().all(|b| REG_NAME[usize::from(*b)]), port)
    };
    host_ok
        && match port.split_first() {
            None => true,
            Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
            Some(_) => false,
        }
}

/// Replaces repeated identical `Content-Length` values (already checked equal by
/// [`content_length`]) with one, as HTTP/1.1 parsing does: an h2 relay refuses the repeat.
fn collapse_repeated_content_length(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let first = first.clone();
    headers.insert(header::CONTENT_LENGTH, first);
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ()> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let n = first
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or(())?;
    if values.any(|v| v != first) {
        return Err(());
    }
    Ok(Some(n))
}

/// Removes hop-by-hop headers, including every header the `Connection` header names, and
/// `TE` except its `trailers` item. One scan over the few names present first: most
/// requests and responses carry none, and then nothing else is done.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let mut named: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(str::trim) {
            // `keep-alive` is hop-by-hop itself and removed below: no HeaderName needed.
            if token.eq_ignore_ascii_case("keep-alive") {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(name);
            }
        }
    }
    for name in named {
        headers.remove(name);
    }
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name) && *name != header::TE)
        .cloned()
        .collect();
    for name in present {
        headers.remove(name);
    }
    // `TE: trailers, deflate` still says the client accepts trailers: that part goes on (the
    // only TE value HTTP/2 allows), the codings of this hop do not.
    let te_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|item| item.trim_ascii().eq_ignore_ascii_case(b"trailers"))
    });
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    } else {
        headers.remove(header::TE);
    }
}

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1), plus this hop's
/// proxy credentials.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// A streamed client body that errors once it grows past `listener.max_body_bytes`
/// (chunked bodies have no length to check up front).
struct LimitedBody {
    /// Frames already read from `inner` (see [`take_what_arrived`]), sent first.
    ahead: std::collections::VecDeque<Frame<Bytes>>,
    inner: Incoming,
    seen: u64,
    limit: u64,
    /// Told when the body waits for the client, grows too large or fails.
    client: Arc<ClientBody>,
    metrics: Metrics,
}

/// hyper's body error with its cause ("error reading a body from connection: invalid chunk
/// size line: ..."), which its `Display` alone leaves out.
fn describe_body_error(e: &hyper::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[derive(Debug)]
struct BodyTooLarge(u64);

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request body exceeds {} bytes", self.0)
    }
}

impl std::error::Error for BodyTooLarge {}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(frame) = this.ahead.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        this.client
            .waiting
            .store(polled.is_pending(), Ordering::Release);
        match std::task::ready!(polled) {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    this.seen += d.len() as u64;
                    this.metrics.bytes(d.len() as u64, 0);
                    if this.seen > this.limit {
                        this.client.too_large(this.limit);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge(this.limit)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.client.failed(describe_body_error(&e));
                Poll::Ready(Some(Err(Box::new(e))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.ahead.is_empty() {
            self.inner.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn te_trailers_survives() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert!(h.contains_key(header::TE));
    }

    #[test]
    fn te_with_trailers_among_codings_is_reduced_to_trailers() {
        let mut h = HeaderMap::new();
        h.append(header::TE, HeaderValue::from_static("deflate;q=0.5"));
        h.append(header::TE, HeaderValue::from_static(" Trailers , gzip"));
        strip_hop_by_hop(&mut h);
        let te: Vec<_> = h.get_all(header::TE).iter().collect();
        assert_eq!(te, [HeaderValue::from_static("trailers")]);

        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailersx, gzip"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key(header::TE), "{h:?}");
    }

    /// A body as hyper gives a chunked one: no known length.
    struct UnknownLength;

    impl Body for UnknownLength {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(None)
        }
    }

    fn refusal(raw_head: &[(&str, &str)], version: http::Version) -> Option<u16> {
        let mut req = Request::builder().uri("/x").version(version);
        for (name, value) in raw_head {
            req = req.header(*name, *value);
        }
        let req = req.body(UnknownLength).expect("a request");
        refuse_framing(&req).map(|(status, _, _)| status.as_u16())
    }

    #[test]
    fn host_must_be_one_host_with_an_optional_port() {
        use http::Version;
        for ok in [
            "app",
            "127.0.0.1:9090",
            "[::1]:9090",
            "[::1]",
            "relay.test:443",
            "app:",
            "",
        ] {
            assert_eq!(refusal(&[("host", ok)], Version::HTTP_11), None, "{ok:?}");
        }
        for bad in [
            "user@app", "a/b", "app:port", "[::1", "[::1]x", "[]", "a:1:2", "a b",
        ] {
            assert_eq!(
                refusal(&[("host", bad)], Version::HTTP_11),
                Some(400),
                "{bad:?}"
            );
        }
        assert_eq!(
            refusal(&[], Version::HTTP_11),
            Some(400),
            "HTTP/1.1 needs one"
        );
        assert_eq!(refusal(&[], Version::HTTP_10), None, "HTTP/1.0 does not");
        assert_eq!(refusal(&[], Version::HTTP_2), None, "h2 has :authority");
        let two = [("host", "a"), ("host", "a")];
        assert_eq!(refusal(&two, Version::HTTP_11), Some(400));
        assert_eq!(refusal(&two, Version::HTTP_10), Some(400));
    }

    #[test]
    fn only_the_chunked_transfer_coding_is_accepted() {
        let v = http::Version::HTTP_11;
        for ok in ["chunked", "Chunked", " chunked ", "chunked,"] {
            let head = [("host", "app"), ("transfer-encoding", ok)];
            assert_eq!(refusal(&head, v), None, "{ok:?}");
        }
        for other in ["gzip, chunked", "identity", "x-custom,chunked"] {
            let head = [("host", "app"), ("transfer-encoding", other)];
            assert_eq!(refusal(&head, v), Some(501), "{other:?}");
        }
    }

    #[test]
    fn a_body_of_one_piece_is_kept_without_a_copy_and_pieces_are_joined() {
        let one = Bytes::from_static(b"{\"id\":1}");
        let mut body = Joined::default();
        body.push(one.clone(), 8);
        let kept = body.into_bytes();
        assert_eq!(kept.as_ptr(), one.as_ptr(), "the same bytes, not a copy");

        let mut body = Joined::default();
        for piece in ["hel", "lo ", "world"] {
            body.push(Bytes::from_static(piece.as_bytes()), 11);
        }
        assert_eq!(&body.into_bytes()[..], b"hello world");
        assert!(Joined::default().into_bytes().is_empty());
    }

    #[test]
    fn conflicting_content_lengths_are_rejected() {
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert!(content_length(&h).is_err());
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        assert_eq!(content_length(&h), Ok(Some(12)));
    }
}
