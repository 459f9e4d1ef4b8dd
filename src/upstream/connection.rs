//! One TLS connection to the relay, HTTP/2 (h2 streams) or HTTP/1.1 (one request at a
//! time): dialing, sending one request, streaming both bodies, and the per-connection
//! stats the pool and the admin API read.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::UpstreamError;
use super::coalesce::Coalesce;
use super::read_ahead;
use super::request_limit::{self, RequestLimit};
use super::wait_queue::WaitQueue;
use crate::config::{Config, Endpoint};
use crate::latency::LatencyWindow;
use crate::tls::{TlsSetup, describe_handshake_error};

/// Boxed error of body streams.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Wire protocol negotiated by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    H2,
    Http1,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::H2 => "h2",
            Protocol::Http1 => "http/1.1",
        }
    }
}

/// A request body as one attempt sends it: buffered (replayable on retry) or streamed.
pub enum AttemptBody {
    Full(Option<Bytes>),
    Stream(UnsyncBoxBody<Bytes, BoxError>),
}

impl AttemptBody {
    pub fn empty() -> Self {
        AttemptBody::Full(None)
    }
}

impl Body for AttemptBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            AttemptBody::Full(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            AttemptBody::Stream(s) => Pin::new(s).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AttemptBody::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            AttemptBody::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AttemptBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            AttemptBody::Stream(s) => s.size_hint(),
        }
    }
}

/// Body bytes the pool's connections sent to and received from the relay over the pool's
/// lifetime. Every connection counts into the pool's one set as the bytes pass, so the totals
/// only grow: a connection that drains or dies takes nothing away from them.
#[derive(Debug, Default)]
pub struct ByteTotals {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// What every connection of one pool shares.
#[derive(Debug, Clone)]
pub struct PoolShared {
    pub totals: Arc<ByteTotals>,
    /// The read-ahead budget of HTTP/1.1 answers (see [`read_ahead`]).
    pub read_ahead: Arc<read_ahead::Budget>,
    /// The relay's requests-per-connection limit, as far as it is known (see
    /// [`request_limit`]): new h2 connections are held to it, and connections the relay
    /// rotated report what they carried.
    pub request_limit: Arc<Mutex<RequestLimit>>,
}

impl PoolShared {
    /// The relay's requests-per-connection limit, if known and not yet due for a check.
    pub fn relay_request_limit(&self) -> Option<u64> {
        self.request_limit
            .lock()
            .ok()
            .and_then(|l| l.limit(Instant::now()))
    }
}

/// A request body on its way over an HTTP/1.1 connection: counts each piece as hyper takes
/// it to write (HTTP/2 counts where it hands pieces to the stream).
struct SentBody {
    body: AttemptBody,
    conn: Arc<Connection>,
}

impl Body for SentBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.conn.count_sent(data.len());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Counters of one connection, read by the pool, the ejector and the admin API.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    pub in_flight: AtomicU64,
    pub requests: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Last PING round trip in microseconds; `u64::MAX` before the first.
    pub ping_rtt_us: AtomicU64,
}

enum Sender {
    H2(h2::client::SendRequest<Bytes>),
    Http1(std::sync::Mutex<Option<hyper::client::conn::http1::SendRequest<SentBody>>>),
}

/// One live TLS connection. Dropped (and so closed gracefully) once the pool has replaced
/// it and its last request has finished.
pub struct Connection {
    pub protocol: Protocol,
    pub connected_at: SystemTime,
    pub connected_instant: Instant,
    /// Distinguishes successive connections of one slot.
    pub generation: u64,
    pub stats: ConnectionStats,
    /// The pool's lifetime totals, counted into alongside `stats`.
    totals: Arc<ByteTotals>,
    pub latency: LatencyWindow,
    sender: Sender,
    permits: Arc<Semaphore>,
    /// The stream slots it started with (see [`Connection::capacity`]).
    max_streams: std::sync::atomic::AtomicUsize,
    /// A failure after the connection closed was judged by the breaker (see
    /// [`Connection::failure_already_judged`]).
    death_judged: AtomicBool,
    closed: AtomicBool,
    draining: AtomicBool,
    /// The sidecar gave up on a request half sent (see [`Connection::abandon_request`]).
    abandoned: AtomicBool,
    closed_notify: Notify,
    /// The pool's line of waiting requests: a freed request slot wakes the first in line.
    freed: Arc<WaitQueue>,
    /// Longest pause of a response body between two pieces (`pool.request_timeout`).
    body_idle_timeout: Duration,
    /// The pool's read-ahead budget for HTTP/1.1 answers.
    read_ahead: Arc<read_ahead::Budget>,
    /// Requests it may still take under the relay's learned request limit ([`NO_BUDGET`]:
    /// none is known); at 0 it drains.
    request_budget: AtomicU64,
    /// The budget left at which [`Connection::rotation_due`] fires, so the pool dials the
    /// replacement while this connection still serves.
    rotate_when_left: u64,
    rotation_due: Notify,
    /// The lowest stream id the relay refused with a graceful GOAWAY (`u32::MAX`: none): the
    /// relay processed every stream below it.
    first_refused_id: AtomicU32,
    /// Where that count is reported when the connection is gone (see [`PoolShared`]).
    request_limit: Arc<Mutex<RequestLimit>>,
}

/// [`Connection::request_budget`] when no request limit is known.
const NO_BUDGET: u64 = u64::MAX;

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("protocol", &self.protocol)
            .field("generation", &self.generation)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// Why a dial failed.
#[derive(Debug, Clone)]
pub struct DialError {
    pub detail: String,
    /// The relay's certificate did not verify (a configuration or identity problem).
    pub certificate: bool,
    pub timeout: bool,
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

impl Connection {
    /// Counts request body bytes sent to the relay, here and in the pool's totals.
    fn count_sent(&self, n: usize) {
        self.stats.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
        self.totals.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts response body bytes received from the relay, here and in the pool's totals.
    fn count_received(&self, n: usize) {
        self.stats
            .bytes_received
            .fetch_add(n as u64, Ordering::Relaxed);
        self.totals.received.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Whether the connection has ended (its driver finished or a PING went unanswered).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Stops new requests; in-flight ones finish, then the connection closes.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// The sidecar gave up on a request it had started to send (its client stopped sending
    /// the body). An HTTP/1.1 connection in the middle of a request body can serve nothing
    /// else, so it closes; its end is the sidecar's doing, not a sign that the relay is sick.
    /// On h2 only that stream is affected, and the connection goes on.
    pub fn abandon_request(&self) {
        if self.protocol == Protocol::Http1 {
            self.abandoned.store(true, Ordering::Release);
            self.mark_closed();
        }
    }

    /// Whether [`Connection::abandon_request`] closed this connection.
    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }

    fn mark_closed(&self) {
        self.closed.store(true, Ordering::Release);
        self.closed_notify.notify_waiters();
    }

    /// For a failed request on this connection: whether it is one more casualty of the
    /// connection's end, after the first was already judged. When a connection dies (a TCP
    /// reset, a GOAWAY with an error) every request in flight on it fails at once; that is
    /// one event for its breaker, not one per stream.
    pub fn failure_already_judged(&self) -> bool {
        self.is_closed() && self.death_judged.swap(true, Ordering::AcqRel)
    }

    /// Resolves when the connection has ended.
    pub async fn closed(&self) {
        loop {
            let notified = self.closed_notify.notified();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// Free request slots now (h2 streams, or 1/0 for HTTP/1.1).
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// Lowers this h2 connection's stream slots to the relay's SETTINGS_MAX_CONCURRENT_STREAMS
    /// when that is below `pool.max_streams_per_connection`, so that requests wait in the
    /// pool (or go to another connection) rather than inside h2 for a stream the relay would
    /// not open. Call once, before the connection is handed out. Returns the relay's limit.
    fn adopt_relay_stream_limit(&self) -> Option<usize> {
        let Sender::H2(sender) = &self.sender else {
            return None;
        };
        let limit = sender.current_max_send_streams();
        let slots = self.permits.available_permits();
        if limit < slots {
            self.permits.forget_permits(slots - limit);
        }
        self.max_streams.store(limit.min(slots), Ordering::Relaxed);
        Some(limit)
    }

    /// How many requests this connection carries at once: `pool.max_streams_per_connection`
    /// or the relay's lower limit for h2, 1 for HTTP/1.1.
    pub fn capacity(&self) -> usize {
        self.max_streams.load(Ordering::Relaxed)
    }

    /// Takes a request slot without waiting, and one request of the budget under the
    /// relay's request limit, if one is known.
    pub fn try_reserve(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        self.spend_request_budget().then_some(permit)
    }

    /// Counts one more request against the relay's request limit; `false` when the
    /// connection has carried all it may. Fires [`Connection::rotation_due`] a tenth of the
    /// limit ahead, and drains the connection with its last request.
    fn spend_request_budget(&self) -> bool {
        let spent =
            self.request_budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    if left == NO_BUDGET {
                        None
                    } else {
                        left.checked_sub(1)
                    }
                });
        match spent {
            Err(NO_BUDGET) => true,
            // Spent: it began draining with its last request.
            Err(_) => false,
            Ok(before) => {
                let left = before - 1;
                if left == self.rotate_when_left {
                    self.rotation_due.notify_one();
                }
                if left == 0 {
                    self.start_draining();
                }
                true
            }
        }
    }

    /// Whether the connection has carried all the requests the relay's limit allows: its
    /// replacement is on the way (see [`Connection::rotation_due`]).
    pub fn is_spent(&self) -> bool {
        self.request_budget.load(Ordering::Relaxed) == 0
    }

    /// Resolves when the connection nears the relay's request limit: time to dial its
    /// replacement. Never resolves while no limit is known.
    pub async fn rotation_due(&self) {
        self.rotation_due.notified().await;
    }

    /// Last PING round trip.
    pub fn ping_rtt(&self) -> Option<Duration> {
        match self.stats.ping_rtt_us.load(Ordering::Relaxed) {
            u64::MAX => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Sends one request. The caller has reserved a slot (`permit`), which the returned
    /// body holds until it ends so an HTTP/1.1 connection takes one request at a time.
    /// `h2_field`: a header field encoded in advance (the relay credential), sent after the
    /// request's own fields; only an HTTP/2 connection is given one.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<AttemptBody>,
        h2_field: Option<h2::ext::EncodedField>,
        permit: OwnedSemaphorePermit,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let guard = InFlight::new(self.clone(), permit);
        self.prepare(&mut req);
        match &self.sender {
            Sender::H2(sender) => self.send_h2(sender.clone(), req, h2_field, guard).await,
            Sender::Http1(slot) => {
                let taken = slot.lock().ok().and_then(|mut s| s.take());
                let Some(mut sender) = taken else {
                    // An earlier request was abandoned mid-exchange (timed out or cancelled):
                    // this HTTP/1.1 connection cannot carry another one.
                    self.mark_closed();
                    return Err(UpstreamError::reset(
                        "HTTP/1.1 connection was abandoned",
                        true,
                    ));
                };
                let conn = Arc::clone(self);
                let req = req.map(|body| SentBody { body, conn });
                let result = self.send_h1(&mut sender, req, guard).await;
                if let Ok(mut s) = slot.lock() {
                    *s = Some(sender);
                }
                result
            }
        }
    }

    /// Fits the request to the wire protocol: HTTP/2 carries the authority in the URI
    /// (`:authority`) and no `Host`; HTTP/1.1 sends origin-form with a `Host` header.
    fn prepare(&self, req: &mut Request<AttemptBody>) {
        match self.protocol {
            Protocol::H2 => {
                *req.version_mut() = http::Version::HTTP_2;
                req.headers_mut().remove(http::header::HOST);
            }
            Protocol::Http1 => {
                *req.version_mut() = http::Version::HTTP_11;
                if let Some(authority) = req.uri().authority().cloned()
                    && let Ok(v) = http::HeaderValue::from_str(authority.as_str())
                {
                    req.headers_mut().insert(http::header::HOST, v);
                }
                let origin = req
                    .uri()
                    .path_and_query()
                    .cloned()
                    .map(http::Uri::from)
                    .unwrap_or_else(|| http::Uri::from_static("/"));
                *req.uri_mut() = origin;
            }
        }
    }

    async fn send_h1(
        &self,
        sender: &mut hyper::client::conn::http1::SendRequest<SentBody>,
        req: Request<SentBody>,
        guard: InFlight,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        if sender.ready().await.is_err() {
            // The relay closed the kept-alive connection (nginx does after
            // `keepalive_requests`) before this request was written.
            self.mark_closed();
            return Err(UpstreamError::refused("relay closed the connection"));
        }
        match sender.try_send_request(req).await {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                let body = if self.read_ahead.applies(&body.size_hint()) {
                    let reader = read_ahead::start(
                        body,
                        self.read_ahead.clone(),
                        self.body_idle_timeout,
                        guard,
                    );
                    ResponseBody::detached(Inner::ReadAhead(reader))
                } else {
                    ResponseBody::new(Inner::Http1(body), guard)
                };
                Ok(Response::from_parts(parts, body))
            }
            Err(mut e) => {
                let never_sent = e.take_message().is_some();
                let err = e.into_error();
                let closed = err.is_closed() || err.is_incomplete_message() || err.is_canceled();
                if closed {
                    self.mark_closed();
                }
                if never_sent && closed {
                    // The relay closed the kept-alive connection as the request was handed
                    // over, before any of it was written.
                    return Err(UpstreamError::refused(format!(
                        "relay closed the connection: {err}"
                    )));
                }
                Err(UpstreamError::reset(
                    format!("relay connection failed: {err}"),
                    never_sent,
                ))
            }
        }
    }

    async fn send_h2(
        &self,
        sender: h2::client::SendRequest<Bytes>,
        req: Request<AttemptBody>,
        h2_field: Option<h2::ext::EncodedField>,
        guard: InFlight,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let mut sender = match sender.ready().await {
            Ok(s) => s,
            Err(e) => {
                self.mark_closed();
                return Err(h2_error(&e, true));
            }
        };
        let (parts, body) = req.into_parts();
        let end = body.is_end_stream();
        let request = Request::from_parts(parts, ());
        let sent = match h2_field {
            Some(field) => sender.send_request_with_field(request, end, field),
            None => sender.send_request(request, end),
        };
        let (response, mut stream) = sent.map_err(|e| {
            if e.is_go_away() {
                self.mark_closed();
            }
            h2_error(&e, true)
        })?;
        let stream_id = u32::from(response.stream_id());
        let mut pump = None;
        if !end {
            match body {
                // A buffered body (at most 64 KiB) goes in one frame sequence right away: h2
                // queues what exceeds the window and flushes it as capacity arrives.
                AttemptBody::Full(Some(bytes)) => {
                    self.count_sent(bytes.len());
                    let _ = stream.send_data(bytes, true);
                }
                streamed => {
                    let counter = guard.conn.clone();
                    pump = Some(Pump(tokio::spawn(pump_body(streamed, stream, counter))));
                }
            }
        }
        let resp = response.await.map_err(|e| {
            if e.is_go_away() && e.is_remote() {
                // The relay is closing this connection: no new streams; the pool re-dials.
                self.mark_closed();
                if is_orderly_refusal(&e) {
                    // It processed every stream below this one (see `request_limit`).
                    self.first_refused_id
                        .fetch_min(stream_id, Ordering::Relaxed);
                }
            }
            h2_error(&e, false)
        })?;
        let (parts, recv) = resp.into_parts();
        let mut body = ResponseBody::new(
            Inner::H2 {
                recv,
                data_done: false,
            },
            guard,
        );
        body.pump = pump;
        Ok(Response::from_parts(parts, body))
    }
}

/// The task streaming a request body into an h2 stream, stopped when dropped: when the
/// attempt is given up (its client stopped sending, or no answer came in time) or the
/// answer's body is gone, so a stalled client cannot hold a relay stream open.
struct Pump(tokio::task::JoinHandle<()>);

impl Drop for Pump {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Classifies an h2 error; `before_send` when no frame of the request was written.
fn h2_error(e: &h2::Error, before_send: bool) -> UpstreamError {
    if is_orderly_refusal(e) {
        let detail = format!("relay refused the stream: {e}");
        return if e.is_go_away() {
            UpstreamError::refused(detail)
        } else {
            UpstreamError::refused_stream(detail)
        };
    }
    if e.is_reset() && !e.is_remote() && e.reason() == Some(h2::Reason::PROTOCOL_ERROR) {
        return UpstreamError::reset(
            format!(
                "the relay's answer broke HTTP/2's rules (a malformed head, or one larger than \
                 listener.max_header_bytes): {e}"
            ),
            before_send,
        );
    }
    // A remote GOAWAY fails only the streams above its last-stream-id: never processed.
    let above_goaway = e.is_go_away() && e.is_remote();
    UpstreamError::reset(
        format!("relay stream failed: {e}"),
        before_send || above_goaway,
    )
}

/// The relay declined a stream without processing it and without blaming anyone: a
/// GOAWAY with NO_ERROR (connection rotation, e.g. nginx's `keepalive_requests`; it fails
/// the streams above its last-stream-id and every new one) or REFUSED_STREAM.
fn is_orderly_refusal(e: &h2::Error) -> bool {
    let graceful_goaway =
        e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR);
    graceful_goaway || (e.is_remote() && e.reason() == Some(h2::Reason::REFUSED_STREAM))
}

/// Streams a request body into an h2 stream, respecting flow control.
async fn pump_body(
    mut body: AttemptBody,
    mut stream: h2::SendStream<Bytes>,
    conn: Arc<Connection>,
) {
    loop {
        let frame = match body.frame().await {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Ok(f)) => f,
            Some(Err(_)) => {
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
        };
        let frame = match frame.into_data() {
            Ok(mut data) => {
                while !data.is_empty() {
                    stream.reserve_capacity(data.len());
                    let granted = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await;
                    match granted {
                        Some(Ok(n)) if n > 0 => {
                            let chunk = data.split_to(n.min(data.len()));
                            conn.count_sent(chunk.len());
                            if stream.send_data(chunk, false).is_err() {
                                return;
                            }
                        }
                        Some(Ok(_)) => continue,
                        _ => return,
                    }
                }
                continue;
            }
            Err(f) => f,
        };
        if frame.is_trailers() {
            // Request trailers end here: the body ends without them. A relay that has already
            // answered and reset the stream takes a trailer HEADERS frame as a protocol error
            // of the whole connection (nginx: GOAWAY PROTOCOL_ERROR), failing every request
            // in flight on it. nginx as a proxy does not forward request trailers either.
            let _ = stream.send_data(Bytes::new(), true);
            return;
        }
    }
}

/// Holds a request slot and the in-flight count until the response body ends.
struct InFlight {
    conn: Arc<Connection>,
    permit: Option<OwnedSemaphorePermit>,
}

impl InFlight {
    fn new(conn: Arc<Connection>, permit: OwnedSemaphorePermit) -> Self {
        conn.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        conn.stats.requests.fetch_add(1, Ordering::Relaxed);
        InFlight {
            conn,
            permit: Some(permit),
        }
    }
}

impl read_ahead::Link for InFlight {
    fn received(&self, n: usize) {
        self.conn.count_received(n);
    }

    fn broken(&self) {
        // hyper drops an HTTP/1.1 connection whose response was not read to the end.
        self.conn.mark_closed();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        // Release the request slot first, then wake the first request in line: one slot
        // serves one waiter. Waking every waiter for each freed slot made an overloaded pool
        // (more requests than `pool.size` x streams) do work quadratic in its queue: with
        // 6 400 concurrent streams throughput fell to a third. Changes that may serve many
        // (a new connection, a breaker closing) still wake them all.
        drop(self.permit.take());
        self.conn.freed.slot_freed();
    }
}

enum Inner {
    Http1(hyper::body::Incoming),
    /// An HTTP/1.1 answer read ahead by its own task, which holds the request slot.
    ReadAhead(read_ahead::Reader),
    H2 {
        recv: h2::RecvStream,
        data_done: bool,
    },
    Done,
}

/// The relay's response body, streamed to the client. Releases the connection's request
/// slot as soon as it ends (or is dropped).
///
/// A relay that stops sending in the middle of a body (no piece for the connection's
/// `body_idle_timeout`, i.e. `pool.request_timeout`) fails the body, like a relay that resets
/// or truncates it: the client's connection is then cut (hyper cannot announce an error
/// after the head), the stream is reset (h2) or the connection dropped (HTTP/1.1), and the
/// failure is counted on the pool slot.
pub struct ResponseBody {
    inner: Inner,
    guard: Option<InFlight>,
    stall: StallClock,
    /// Where failures of this body are counted (the pool slot's error counter), and the
    /// slot's connection id for the log.
    failures: Option<(Arc<AtomicU64>, u64)>,
    /// The request body's pump (h2, streamed request bodies), stopped with this body.
    pump: Option<Pump>,
}

/// The stall clock of a body read from the relay: made at the first wait (a body that is
/// always ready never makes one), pushed back only after progress, so a fast stream costs no
/// timer work per piece.
#[derive(Default)]
pub(super) struct StallClock {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A piece arrived since the clock was last set.
    progressed: bool,
}

impl StallClock {
    /// A piece of the body arrived.
    pub(super) fn progressed(&mut self) {
        self.progressed = true;
    }

    /// With the body not ready: whether nothing has arrived for `limit`. Sets the clock, or
    /// pushes it back after progress, first.
    pub(super) fn poll_expired(&mut self, cx: &mut Context<'_>, limit: Duration) -> bool {
        let progressed = std::mem::take(&mut self.progressed);
        let sleep = match &mut self.sleep {
            Some(sleep) => {
                if progressed {
                    sleep.as_mut().reset(Instant::now() + limit);
                }
                sleep
            }
            None => self.sleep.insert(Box::pin(tokio::time::sleep(limit))),
        };
        sleep.as_mut().poll(cx).is_ready()
    }

    /// The body ended: no timer is kept.
    fn stop(&mut self) {
        self.sleep = None;
    }
}

/// A relay that went quiet in the middle of a response body.
#[derive(Debug)]
pub struct BodyStalled(pub(super) Duration);

impl std::fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the relay sent no more of the response body for {:?} (pool.request_timeout)",
            self.0
        )
    }
}

impl std::error::Error for BodyStalled {}

impl ResponseBody {
    fn new(inner: Inner, guard: InFlight) -> Self {
        ResponseBody {
            inner,
            guard: Some(guard),
            stall: StallClock::default(),
            failures: None,
            pump: None,
        }
    }

    /// An empty body that holds nothing (for synthesized answers).
    pub fn empty() -> Self {
        Self::detached(Inner::Done)
    }

    /// A body that holds no request slot itself.
    fn detached(inner: Inner) -> Self {
        ResponseBody {
            inner,
            guard: None,
            stall: StallClock::default(),
            failures: None,
            pump: None,
        }
    }

    /// Counts a failure of this body (reset, truncated, stalled) in `counter`, and logs it
    /// (at most once a second) with `connection_id`.
    pub fn count_failures_in(&mut self, counter: Arc<AtomicU64>, connection_id: u64) {
        self.failures = Some((counter, connection_id));
    }

    fn count(&self, n: usize) {
        if let Some(g) = &self.guard {
            g.conn.count_received(n);
        }
    }

    fn finish(&mut self) {
        self.inner = Inner::Done;
        self.guard = None;
        self.stall.stop();
    }

    fn fail(&mut self, e: &BoxError) {
        static LIMIT: crate::log_limit::OncePerSecond = crate::log_limit::OncePerSecond::new();
        if let Some((counter, connection_id)) = self.failures.take() {
            counter.fetch_add(1, Ordering::Relaxed);
            if let Some(not_logged_since) = LIMIT.admit() {
                // The head is already with the client: its connection is cut, the only way
                // HTTP/1.1 has to say the body is not whole.
                tracing::warn!(
                    connection_id,
                    detail = %e,
                    not_logged_since,
                    "a relay answer failed after its head was forwarded; the client's \
                     connection was cut"
                );
            }
        }
        if let (Inner::Http1(_), Some(g)) = (&self.inner, &self.guard) {
            // hyper drops an HTTP/1.1 connection whose response was not read to the end.
            g.conn.mark_closed();
        }
        self.finish();
    }

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(match &mut self.inner {
            Inner::Done => None,
            Inner::Http1(body) => {
                ready!(Pin::new(body).poll_frame(cx)).map(|r| r.map_err(BoxError::from))
            }
            Inner::ReadAhead(body) => ready!(Pin::new(body).poll_frame(cx)),
            Inner::H2 { recv, data_done } => {
                if !*data_done {
                    match ready!(recv.poll_data(cx)) {
                        Some(Ok(data)) => {
                            let _ = recv.flow_control().release_capacity(data.len());
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Some(Err(e)) => return Poll::Ready(Some(Err(BoxError::from(e)))),
                        None => *data_done = true,
                    }
                }
                match ready!(recv.poll_trailers(cx)) {
                    Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
                    Ok(None) => None,
                    Err(e) => Some(Err(BoxError::from(e))),
                }
            }
        })
    }

    /// Whether the stall clock has run out; sets or pushes it back first.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Option<Duration> {
        let limit = self.guard.as_ref()?.conn.body_idle_timeout;
        self.stall.poll_expired(cx, limit).then_some(limit)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match this.poll_inner(cx) {
            Poll::Ready(polled) => polled,
            Poll::Pending => match this.stalled(cx) {
                None => return Poll::Pending,
                Some(limit) => Some(Err(BoxError::from(BodyStalled(limit)))),
            },
        };
        match &polled {
            Some(Ok(frame)) => {
                this.stall.progressed();
                if let Some(d) = frame.data_ref() {
                    this.count(d.len());
                }
            }
            Some(Err(e)) => this.fail(e),
            None => this.finish(),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Done => true,
            Inner::Http1(b) => b.is_end_stream(),
            Inner::ReadAhead(b) => b.is_end_stream(),
            Inner::H2 { recv, .. } => recv.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Http1(b) => b.size_hint(),
            Inner::ReadAhead(b) => b.size_hint(),
            Inner::Done => SizeHint::with_exact(0),
            Inner::H2 { .. } => SizeHint::default(),
        }
    }
}

/// HTTP/2 receive window of each stream: how much of a response the relay may send ahead of
/// the client reading it.
const STREAM_WINDOW: u32 = 256 * 1024;

/// HTTP/2 receive window of a connection: room for every stream's window at once. The h2
/// crate gives connection window back only as a stream's data is read, so a connection window
/// smaller than that let a few clients that stop reading large answers (six of 8 MiB, against
/// 4 MiB) hold it whole: every other answer on the connection then stalled until their bodies
/// were cut off after `pool.request_timeout`. What stalled clients can make the sidecar buffer
/// stays bounded by this window (25 MiB at the default 100 streams).
fn connection_window(max_streams: usize) -> u32 {
    let streams = u32::try_from(max_streams).unwrap_or(u32::MAX);
    STREAM_WINDOW.saturating_mul(streams).min(i32::MAX as u32)
}

/// Opens one connection: TCP (connect timeout) → TLS (handshake timeout, verification on,
/// ALPN) → HTTP/2 or HTTP/1.1 handshake. Spawns the connection driver and, for h2, the
/// PING task.
pub async fn dial(
    cfg: &Config,
    tls: &TlsSetup,
    generation: u64,
    freed: Arc<WaitQueue>,
    shared: &PoolShared,
) -> Result<Arc<Connection>, DialError> {
    let pool = &cfg.pool;
    let tcp = tokio::time::timeout(pool.connect_timeout, connect_tcp(&cfg.upstream.endpoint))
        .await
        .map_err(|_| DialError {
            detail: format!(
                "connect to {} timed out after {:?} (pool.connect_timeout)",
                cfg.upstream.endpoint, pool.connect_timeout
            ),
            certificate: false,
            timeout: true,
        })??;
    let _ = tcp.set_nodelay(true);
    let stream = tokio::time::timeout(
        pool.tls_handshake_timeout,
        tls.connector_for_dial()
            .connect(tls.server_name.clone(), tcp),
    )
    .await
    .map_err(|_| DialError {
        detail: format!(
            "TLS handshake with {} timed out after {:?} (pool.tls_handshake_timeout)",
            cfg.upstream.endpoint, pool.tls_handshake_timeout
        ),
        certificate: false,
        timeout: true,
    })?
    .map_err(|e| {
        let (certificate, detail) = describe_handshake_error(&e);
        DialError {
            detail,
            certificate,
            timeout: false,
        }
    })?;
    let protocol = match stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => Protocol::H2,
        _ => Protocol::Http1,
    };
    let handshake_failed = |e: &dyn std::fmt::Display| DialError {
        detail: format!("{} handshake with the relay failed: {e}", protocol.as_str()),
        certificate: false,
        timeout: false,
    };
    let max_streams = pool.max_streams_per_connection.get();
    match protocol {
        Protocol::H2 => {
            let (sender, mut connection) = h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(connection_window(max_streams))
                .max_frame_size(64 * 1024)
                // Answer heads as large as a client's may be (h2's default is 16 MiB); a
                // larger one fails its stream, and the client gets a 502.
                .max_header_list_size(
                    u32::try_from(cfg.listener.max_header_bytes).unwrap_or(u32::MAX),
                )
                // The sidecar has no use for pushed answers: a PUSH_PROMISE is an error.
                .enable_push(false)
                .handshake::<_, Bytes>(Coalesce::new(stream))
                .await
                .map_err(|e| handshake_failed(&e))?;
            let ping = connection.ping_pong();
            let conn = Arc::new(Connection::new(
                protocol,
                generation,
                Sender::H2(sender),
                max_streams,
                freed,
                pool.request_timeout,
                shared,
            ));
            let weak = Arc::downgrade(&conn);
            tokio::spawn(async move {
                let _ = connection.await;
                if let Some(c) = weak.upgrade() {
                    c.mark_closed();
                }
            });
            if let Some(mut ping) = ping {
                // A first PING proves the relay accepted the connection: under TLS 1.3 a
                // rejected client certificate only shows after the handshake "succeeded".
                let start = Instant::now();
                match tokio::time::timeout(
                    pool.tls_handshake_timeout,
                    ping.ping(h2::Ping::opaque()),
                )
                .await
                {
                    Ok(Ok(_)) => {
                        let rtt = start.elapsed().as_micros().min(u64::MAX as u128 - 1) as u64;
                        conn.stats.ping_rtt_us.store(rtt, Ordering::Relaxed);
                        // The relay's SETTINGS came before its PING answer.
                        if conn.adopt_relay_stream_limit() == Some(0) {
                            return Err(DialError {
                                detail: "relay allows no streams on this connection \
                                         (SETTINGS_MAX_CONCURRENT_STREAMS 0)"
                                    .to_owned(),
                                certificate: false,
                                timeout: false,
                            });
                        }
                    }
                    Ok(Err(e)) => {
                        return Err(DialError {
                            detail: format!(
                                "relay closed the connection right after the TLS handshake ({e}){}",
                                if cfg.upstream.client_cert_file.is_some() {
                                    "; it may have rejected the client certificate"
                                } else {
                                    "; it may require a client certificate \
                                     (upstream.client_cert_file)"
                                }
                            ),
                            certificate: false,
                            timeout: false,
                        });
                    }
                    Err(_) => {
                        return Err(DialError {
                            detail: format!(
                                "relay did not answer the first HTTP/2 PING within {:?} (pool.tls_handshake_timeout)",
                                pool.tls_handshake_timeout
                            ),
                            certificate: false,
                            timeout: true,
                        });
                    }
                }
                tokio::spawn(ping_loop(Arc::downgrade(&conn), ping, pool.ping_interval));
            }
            Ok(conn)
        }
        Protocol::Http1 => {
            let (sender, connection) = hyper::client::conn::http1::Builder::new()
                .handshake::<_, SentBody>(TokioIo::new(stream))
                .await
                .map_err(|e| handshake_failed(&e))?;
            let conn = Arc::new(Connection::new(
                protocol,
                generation,
                Sender::Http1(std::sync::Mutex::new(Some(sender))),
                1,
                freed,
                pool.request_timeout,
                shared,
            ));
            let weak = Arc::downgrade(&conn);
            tokio::spawn(async move {
                let _ = connection.await;
                if let Some(c) = weak.upgrade() {
                    c.mark_closed();
                }
            });
            Ok(conn)
        }
    }
}

impl Connection {
    fn new(
        protocol: Protocol,
        generation: u64,
        sender: Sender,
        permits: usize,
        freed: Arc<WaitQueue>,
        body_idle_timeout: Duration,
        shared: &PoolShared,
    ) -> Self {
        let stats = ConnectionStats::default();
        stats.ping_rtt_us.store(u64::MAX, Ordering::Relaxed);
        // Only HTTP/2 is held to a limit: an HTTP/1.1 relay announces the end of a kept-alive
        // connection on its last answer (`Connection: close`), so no request is refused.
        let limit = match protocol {
            Protocol::H2 => shared.relay_request_limit(),
            Protocol::Http1 => None,
        };
        Connection {
            protocol,
            connected_at: SystemTime::now(),
            connected_instant: Instant::now(),
            generation,
            stats,
            totals: shared.totals.clone(),
            latency: LatencyWindow::new(),
            sender,
            permits: Arc::new(Semaphore::new(permits)),
            max_streams: std::sync::atomic::AtomicUsize::new(permits),
            death_judged: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            closed_notify: Notify::new(),
            freed,
            body_idle_timeout,
            read_ahead: shared.read_ahead.clone(),
            request_budget: AtomicU64::new(limit.unwrap_or(NO_BUDGET)),
            rotate_when_left: limit.map_or(0, |l| l - request_limit::rotate_at(l)),
            rotation_due: Notify::new(),
            first_refused_id: AtomicU32::new(u32::MAX),
            request_limit: shared.request_limit.clone(),
        }
    }
}

impl Drop for Connection {
    /// A connection the relay rotated with a graceful GOAWAY reports how many requests it
    /// processed: streams are numbered 1, 3, 5, … and every one below the first refused
    /// was processed. Counted here, when every stream has ended, so no refusal is missed.
    fn drop(&mut self) {
        let first_refused = *self.first_refused_id.get_mut();
        if first_refused == u32::MAX {
            return;
        }
        let processed = u64::from(first_refused.saturating_sub(1) / 2);
        let learned = self
            .request_limit
            .lock()
            .ok()
            .and_then(|mut l| l.observe(processed, Instant::now()));
        if let Some(limit) = learned {
            tracing::info!(
                limit,
                rotate_at = request_limit::rotate_at(limit),
                "the relay rotates each connection after {limit} requests; the pool now \
                 dials each replacement ahead of that and sends no connection more"
            );
        }
    }
}

async fn connect_tcp(endpoint: &Endpoint) -> Result<TcpStream, DialError> {
    let addrs = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| DialError {
            detail: format!("cannot resolve {}: {e}", endpoint.host),
            certificate: false,
            timeout: false,
        })?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(format!("connect to {addr} failed: {e}")),
        }
    }
    Err(DialError {
        detail: last.unwrap_or_else(|| format!("{} resolved to no address", endpoint.host)),
        certificate: false,
        timeout: false,
    })
}

/// PINGs an HTTP/2 connection while it is idle and keeps the round trip; an unanswered
/// PING marks the connection closed so the pool re-dials it.
async fn ping_loop(conn: std::sync::Weak<Connection>, mut ping: h2::PingPong, every: Duration) {
    let mut first = true;
    loop {
        let wait = if first {
            Duration::from_millis(200).min(every)
        } else {
            every
        };
        first = false;
        tokio::time::sleep(wait).await;
        let Some(c) = conn.upgrade() else { return };
        if c.is_closed() {
            return;
        }
        let busy = c.stats.in_flight.load(Ordering::Relaxed) > 0;
        drop(c);
        if busy {
            continue;
        }
        let start = Instant::now();
        let answered = tokio::time::timeout(
            every.max(Duration::from_secs(1)),
            ping.ping(h2::Ping::opaque()),
        )
        .await;
        let Some(c) = conn.upgrade() else { return };
        match answered {
            Ok(Ok(_)) => {
                let rtt = start.elapsed().as_micros().min(u64::MAX as u128 - 1) as u64;
                c.stats.ping_rtt_us.store(rtt, Ordering::Relaxed);
            }
            Ok(Err(_)) | Err(_) => {
                c.mark_closed();
                return;
            }
        }
    }
}
