//! The client socket as hyper's server sees it. hyper answers a few kinds of bad input on
//! its own, before any handler runs: a request it cannot parse gets a bare `400`, a head
//! larger than its buffer a bare `431`, an over-long target a bare `414`, and a head that
//! does not arrive within `listener.header_read_timeout` gets no answer at all. SPEC §5 wants
//! JSON errors for bad client input, so this wrapper
//!
//! * recognises hyper's own error head in the write stream and writes a JSON answer with the
//!   same status in its place ([`hyper_error_status`]), and
//! * keeps the connection's two clocks itself, instead of hyper's header timer (which also
//!   ran while a kept-alive connection waited for its next request, so idle connections
//!   were closed after `header_read_timeout`): a request head must arrive whole within
//!   `listener.header_read_timeout` of its first byte (and a new connection's first byte
//!   within that time of the accept), else the client gets `408` JSON
//!   ([`Exchange::take_stalled`], [`finish`]); a kept-alive connection with no request in
//!   progress is closed silently after `listener.idle_timeout`, and
//! * cuts off a client that takes no byte of its answer for `listener.idle_timeout` (a
//!   socket that stays full), so a client that stops reading cannot hold a relay stream.
//!
//! How a write is told apart from the handler's answers: hyper writes its own error head
//! only after reading bytes that did not make a request. So a write is a candidate only
//!
//! * when client bytes arrived since the last write, no request reached the handler since
//!   those bytes ([`Exchange::request_started`] counts them), and every request the handler
//!   took already has its answer started; or
//! * when every answer's body was done with ([`Answered`] counts the drops) before the last
//!   write began, and that write took all it was offered: then no answer byte is left to
//!   write, and the write can only be the error head for a bad request pipelined behind the
//!   answered ones (read in the same read).
//!
//! A candidate must then match hyper's exact error head (`connection: close`,
//! `content-length: 0`, `date`, nothing else). On an h2c connection the wrapper steps aside.
//!
//! Cost on the hot path: one relaxed atomic load and a few flag updates per read and write.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use http::StatusCode;
use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

/// What the connection's handler and its socket wrapper share.
#[derive(Debug, Default)]
pub struct Exchange {
    /// Requests handed to the handler so far.
    calls: AtomicU64,
    /// Answers whose body hyper is done with (dropped): written whole, or given up.
    done: AtomicU64,
    /// The socket, kept when the connection ended with a request head half read.
    stalled: Mutex<Option<TcpStream>>,
    /// The connection ended because a request head missed `header_read_timeout`.
    head_timed_out: std::sync::atomic::AtomicBool,
    /// An idle h2c connection wants to be shut down gracefully (GOAWAY); [`Served`] acts on it.
    goaway: std::sync::atomic::AtomicBool,
}

impl Exchange {
    /// Called by the handler for every request hyper hands it. The request counts as done
    /// when the returned guard drops: with its answer's body ([`Answered`]), or with the
    /// handler if hyper gives the request up first (an h2 client resetting its stream).
    #[must_use = "the request counts as done when the guard drops"]
    pub fn request_started(self: &std::sync::Arc<Self>) -> Started {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Started(self.clone())
    }

    /// The socket of a connection that ended while a request head was half read.
    pub fn take_stalled(&self) -> Option<TcpStream> {
        self.stalled.lock().ok().and_then(|mut slot| slot.take())
    }

    fn goaway_requested(&self) -> bool {
        self.goaway.load(Ordering::Relaxed)
    }
}

/// A served client connection: shut down gracefully when the listener drains (`stop`), or
/// when its socket wrapper finds it idle on HTTP/2 ([`Exchange`]): hyper then sends GOAWAY
/// and the connection ends once the client has seen it, as RFC 9113 §6.8 asks, rather than
/// with a bare TCP close that a client sending a request at that moment could not tell
/// from a failure. An HTTP/1.1 connection shut down while idle closes at once, one
/// mid-request after its answer.
pub struct Served<C> {
    conn: Pin<Box<C>>,
    /// Starts hyper's graceful shutdown of `conn`.
    shut_down: fn(Pin<&mut C>),
    exchange: std::sync::Arc<Exchange>,
    /// Resolves when the listener drains; polled once to register the task's waker, then
    /// only when `stop_sent` shows a new value (a version check, where polling the future
    /// takes the notifier's lock on every poll of the connection).
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
    stop_sent: watch::Receiver<bool>,
    stop_registered: bool,
    shutting_down: bool,
}

impl<C> Served<C> {
    /// `stop`: the process's shutdown value; the connection shuts down once it is `true`.
    pub fn new(
        conn: C,
        shut_down: fn(Pin<&mut C>),
        exchange: std::sync::Arc<Exchange>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let mut waiting = stop.clone();
        Served {
            conn: Box::pin(conn),
            shut_down,
            exchange,
            stop: Box::pin(async move { crate::shutdown::triggered(&mut waiting).await }),
            stop_sent: stop,
            stop_registered: false,
            shutting_down: false,
        }
    }

    /// Whether the listener drains, looking at the shutdown value only when it changed.
    fn stop_requested(&mut self, cx: &mut Context<'_>) -> bool {
        if self.stop_registered && !self.stop_sent.has_changed().unwrap_or(true) {
            return false;
        }
        self.stop_registered = true;
        self.stop.as_mut().poll(cx).is_ready()
    }
}

impl<C: Future> Future for Served<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        loop {
            if let Poll::Ready(out) = this.conn.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            if this.shutting_down || !(this.exchange.goaway_requested() || this.stop_requested(cx))
            {
                return Poll::Pending;
            }
            // Shut down, then poll again so the GOAWAY (or the close) goes out now.
            this.shutting_down = true;
            (this.shut_down)(this.conn.as_mut());
        }
    }
}

/// One request of a connection, from [`Exchange::request_started`] until hyper is done with
/// its answer.
#[derive(Debug)]
pub struct Started(std::sync::Arc<Exchange>);

impl Drop for Started {
    fn drop(&mut self) {
        self.0.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// How long an idle HTTP/2 client has, after GOAWAY, to close its side before it is cut off.
const GOAWAY_GRACE: Duration = Duration::from_secs(5);

/// The connection's clocks: `listener.header_read_timeout` and `listener.idle_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header: Duration,
    pub idle: Duration,
}

/// Where the connection stands, for its clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request in progress: waiting for the first byte of the next one.
    Idle,
    /// Bytes of a request head arrived, the head is not complete yet.
    Head,
    /// A request is with the handler, its answer not started: the handler's deadlines rule.
    Busy,
}

/// The accepted client socket, wrapped (see the module documentation).
#[derive(Debug)]
pub struct ClientIo {
    /// `None` only after `Drop` moved it to [`Exchange::stalled`].
    inner: Option<TcpStream>,
    exchange: std::sync::Arc<Exchange>,
    /// `listener.max_header_bytes`, named in the 431 answer (the data listener's).
    max_header_bytes: Option<usize>,
    /// Client bytes arrived since the last write.
    read_since_write: bool,
    /// `Exchange::calls` when client bytes last arrived.
    calls_at_read: u64,
    /// `Exchange::calls` when a write last happened: requests whose answer has started.
    answered: u64,
    /// `Exchange::done` when a write last began: answers that were whole before it.
    done_at_write: u64,
    /// The last write took only part of what it was offered: hyper is mid-buffer.
    partial_write: bool,
    /// The client speaks h2 (prior knowledge): hyper's HTTP/1.1 error heads cannot occur.
    h2: bool,
    /// Nothing read yet (the h2 preface check looks at the first bytes).
    first_read: bool,
    /// The client closed its side or the socket failed: no answer of ours is wanted.
    ended: bool,
    /// A JSON answer still to write in place of hyper's own error head.
    replacement: Vec<u8>,
    replaced: usize,
    timeouts: Timeouts,
    /// When the current head must be complete; `None` from its first byte until the first
    /// read that finds it unfinished, which reads the clock (in the same scheduler turn as
    /// the first byte's read; most heads arrive whole and never need it).
    head_deadline: Option<Instant>,
    /// When the current idle wait ends; `None` until the wait begins.
    idle_deadline: Option<Instant>,
    /// The timer, made on first use. It is reset only for a deadline earlier than the one it
    /// is armed for; one armed earlier is re-armed when it fires, so a busy connection resets
    /// it once per timeout period rather than once per request.
    timer: Option<Pin<Box<Sleep>>>,
    armed: Option<Instant>,
    /// The write clock: set when a write finds the socket full, cleared by any progress. A
    /// client that takes no byte of its answer for `idle_timeout` is cut off, so it cannot
    /// hold a relay stream for ever.
    write_timer: Option<Pin<Box<Sleep>>>,
    write_stuck: bool,
}

impl ClientIo {
    pub fn new(
        stream: TcpStream,
        exchange: std::sync::Arc<Exchange>,
        max_header_bytes: Option<usize>,
        timeouts: Timeouts,
    ) -> Self {
        let now = Instant::now();
        ClientIo {
            timeouts,
            head_deadline: Some(now + timeouts.header),
            // A new connection's first request must begin within the header timeout.
            idle_deadline: Some(now + timeouts.header),
            timer: None,
            armed: None,
            inner: Some(stream),
            exchange,
            max_header_bytes,
            read_since_write: false,
            calls_at_read: 0,
            answered: 0,
            done_at_write: 0,
            partial_write: false,
            h2: false,
            first_read: true,
            ended: false,
            replacement: Vec::new(),
            replaced: 0,
            write_timer: None,
            write_stuck: false,
        }
    }

    fn stream(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        match self.inner.as_mut() {
            Some(s) => Ok(Pin::new(s)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Whether the next write may be hyper's own error head:
    ///
    /// * client bytes that made no request arrived since the last write, with every
    ///   request's answer started (a bad request on a new or idle connection), or
    /// * every request's answer was already whole before the last write began, and that
    ///   write took all it was offered: the bytes of a bad request pipelined behind good
    ///   ones, already read together with them. No answer can be in the write stream then
    ///   (a new answer needs a new request).
    fn error_head_possible(&self) -> bool {
        let calls = self.exchange.calls.load(Ordering::Relaxed);
        let pipelined = !self.h2
            && calls > 0
            && calls == self.answered
            && calls == self.done_at_write
            && !self.partial_write;
        pipelined || self.bytes_without_request()
    }

    /// Whether client bytes that made no request arrived since the last write, with every
    /// request's answer started.
    fn bytes_without_request(&self) -> bool {
        let calls = self.exchange.calls.load(Ordering::Relaxed);
        !self.h2 && self.read_since_write && calls == self.calls_at_read && calls == self.answered
    }

    /// Records a write that took `written` of `offered` bytes: the answers of all requests so
    /// far have started.
    fn wrote(&mut self, done_before: u64, written: usize, offered: usize) {
        self.answered = self.exchange.calls.load(Ordering::Relaxed);
        self.done_at_write = done_before;
        self.partial_write = written < offered;
        self.read_since_write = false;
        self.idle_deadline = self.h2_idle_deadline();
    }

    /// HTTP/2: the idle deadline from now, set eagerly on every read and write (hyper's h2
    /// server does not poll the socket again after a write, so a deadline left to the next
    /// read would start late). After GOAWAY the grace deadline stands. HTTP/1.1: `None`,
    /// read at the next wait (see `poll_clock`).
    fn h2_idle_deadline(&self) -> Option<Instant> {
        if self.h2 && self.exchange.goaway_requested() {
            return self.idle_deadline;
        }
        self.h2.then(|| Instant::now() + self.timeouts.idle)
    }

    fn done(&self) -> u64 {
        self.exchange.done.load(Ordering::Relaxed)
    }

    fn phase(&self) -> Phase {
        let calls = self.exchange.calls.load(Ordering::Relaxed);
        if calls != self.answered {
            Phase::Busy
        } else if self.read_since_write && calls == self.calls_at_read {
            Phase::Head
        } else {
            Phase::Idle
        }
    }

    /// With the socket not readable: whether the clock of the current phase ran out.
    fn poll_clock(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.h2 {
            return self.poll_h2_idle_clock(cx);
        }
        let phase = self.phase();
        let deadline = match phase {
            Phase::Busy => return Poll::Pending,
            Phase::Head => *self
                .head_deadline
                .get_or_insert_with(|| Instant::now() + self.timeouts.header),
            Phase::Idle => *self
                .idle_deadline
                .get_or_insert_with(|| Instant::now() + self.timeouts.idle),
        };
        ready!(self.poll_timer(cx, deadline));
        if phase == Phase::Head {
            self.exchange.head_timed_out.store(true, Ordering::Relaxed);
        }
        Poll::Ready(io::ErrorKind::TimedOut.into())
    }

    /// HTTP/2: a connection with no stream in flight that reads and writes nothing for
    /// `idle_timeout` is shut down: a client that keeps an unused connection, or one whose
    /// preface never completes, cannot hold a place among `max_connections` for ever.
    /// Streams in flight keep it open (their own deadlines rule them).
    ///
    /// The first time, the connection is asked to shut down gracefully ([`Served`] sends
    /// GOAWAY and a PING; it ends when the client answers). A client that still holds it,
    /// silent, for another `idle_timeout` (at most [`GOAWAY_GRACE`]) is cut off.
    fn poll_h2_idle_clock(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            let deadline = *self
                .idle_deadline
                .get_or_insert_with(|| Instant::now() + self.timeouts.idle);
            ready!(self.poll_timer(cx, deadline));
            let now = Instant::now();
            if self.exchange.calls.load(Ordering::Relaxed) != self.done() {
                self.idle_deadline = Some(now + self.timeouts.idle);
            } else if self.exchange.goaway_requested() {
                return Poll::Ready(io::ErrorKind::TimedOut.into());
            } else {
                self.exchange.goaway.store(true, Ordering::Relaxed);
                self.idle_deadline = Some(now + self.timeouts.idle.min(GOAWAY_GRACE));
            }
        }
    }

    /// Whether `deadline` has passed, by the connection's one timer. The timer is reset only
    /// for a deadline earlier than the one it is armed for; one armed earlier is re-armed
    /// when it fires.
    fn poll_timer(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let timer = match &mut self.timer {
            Some(timer) => {
                if self.armed.is_none_or(|armed| armed > deadline) {
                    timer.as_mut().reset(deadline);
                    self.armed = Some(deadline);
                }
                timer
            }
            None => {
                self.armed = Some(deadline);
                self.timer
                    .insert(Box::pin(tokio::time::sleep_until(deadline)))
            }
        };
        loop {
            ready!(timer.as_mut().poll(cx));
            if self.armed.is_some_and(|armed| armed >= deadline) {
                return Poll::Ready(());
            }
            // It fired for an earlier deadline that has since moved on.
            timer.as_mut().reset(deadline);
            self.armed = Some(deadline);
        }
    }

    /// After a write that made progress (`Ready`) or none (`Pending`): whether the client
    /// has taken nothing for `idle_timeout`.
    fn poll_write_clock<T>(&mut self, cx: &mut Context<'_>, polled: &Poll<T>) -> Option<io::Error> {
        if polled.is_ready() {
            self.write_stuck = false;
            return None;
        }
        if !std::mem::replace(&mut self.write_stuck, true) {
            // The first write that found the socket full: the clock starts now.
            let deadline = Instant::now() + self.timeouts.idle;
            match &mut self.write_timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.write_timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let timer = self.write_timer.as_mut()?;
        timer
            .as_mut()
            .poll(cx)
            .is_ready()
            .then(|| io::ErrorKind::TimedOut.into())
    }

    /// Replaces hyper's error head `head` with a JSON answer when it is one.
    fn replace(&mut self, head: &[u8]) -> bool {
        let Some((status, date)) = hyper_error_status(head) else {
            return false;
        };
        let (error, detail) = match status {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
                "headers_too_large",
                match self.max_header_bytes {
                    Some(limit) => format!(
                        "the request head exceeds listener.max_header_bytes ({limit} bytes)"
                    ),
                    None => "the request head is too large".to_string(),
                },
            ),
            StatusCode::URI_TOO_LONG => (
                "uri_too_long",
                "the request target is too long".to_string(),
            ),
            _ => (
                "bad_request",
                "malformed HTTP/1.1 request: the request line or a header field could not be parsed"
                    .to_string(),
            ),
        };
        self.replacement = raw_json_error(status, error, &detail, Some(date));
        self.replaced = 0;
        true
    }

    /// When `head` is hyper's own error head, written where hyper writes one: puts the JSON
    /// answer in its place and starts writing it (the rest goes on the flush that follows).
    /// hyper then counts `head` as written.
    fn take_over(&mut self, cx: &mut Context<'_>, head: &[u8]) -> io::Result<bool> {
        if !(self.error_head_possible() && self.replace(head)) {
            return Ok(false);
        }
        self.wrote(self.done(), head.len(), head.len());
        if let Poll::Ready(Err(e)) = self.poll_replacement(cx) {
            return Err(e);
        }
        Ok(true)
    }

    /// Writes what is left of a replacement answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.replaced < self.replacement.len() {
            let Some(stream) = self.inner.as_mut() else {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            };
            let n = ready!(Pin::new(stream).poll_write(cx, &self.replacement[self.replaced..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.replaced += n;
        }
        Poll::Ready(Ok(()))
    }

    fn note_read(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            self.ended = true;
            return;
        }
        if self.first_read {
            self.first_read = false;
            self.h2 = is_h2_preface(bytes);
        }
        if self.h2 {
            // Any frame from the client restarts the idle clock.
            self.idle_deadline = self.h2_idle_deadline();
        } else if self.phase() == Phase::Idle {
            // The first bytes of a new request head: its clock starts (read lazily).
            self.head_deadline = None;
        }
        self.read_since_write = true;
        self.calls_at_read = self.exchange.calls.load(Ordering::Relaxed);
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let polled = this.stream()?.poll_read(cx, buf);
        match &polled {
            // Nothing read into a buffer with room: the client closed its side.
            Poll::Ready(Ok(())) if room || buf.filled().len() > before => {
                this.note_read(&buf.filled()[before..]);
            }
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => this.ended = true,
            Poll::Pending => {
                if let Poll::Ready(timed_out) = this.poll_clock(cx) {
                    return Poll::Ready(Err(timed_out));
                }
            }
        }
        polled
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        if this.take_over(cx, buf)? {
            return Poll::Ready(Ok(buf.len()));
        }
        let done = this.done();
        let polled = this.stream()?.poll_write(cx, buf);
        if let Poll::Ready(result) = &polled {
            this.wrote(done, *result.as_ref().unwrap_or(&0), buf.len());
        }
        if let Some(stuck) = this.poll_write_clock(cx, &polled) {
            return Poll::Ready(Err(stuck));
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        // hyper's error head comes as one buffer (looked for only where one can come).
        if this.error_head_possible() {
            let mut filled = bufs.iter().filter(|b| !b.is_empty());
            if let (Some(only), None) = (filled.next(), filled.next())
                && this.take_over(cx, only)?
            {
                return Poll::Ready(Ok(only.len()));
            }
        }
        let done = this.done();
        let polled = this.stream()?.poll_write_vectored(cx, bufs);
        if let Poll::Ready(result) = &polled {
            let offered = bufs.iter().map(|b| b.len()).sum();
            this.wrote(done, *result.as_ref().unwrap_or(&0), offered);
        }
        if let Some(stuck) = this.poll_write_clock(cx, &polled) {
            return Poll::Ready(Err(stuck));
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        this.stream()?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        this.stream()?.poll_shutdown(cx)
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        // Half a request head read, nothing answered since, the client still there: keep the
        // socket so a header timeout can be answered with 408.
        if !self.ended
            && self.bytes_without_request()
            && let Ok(mut slot) = self.exchange.stalled.lock()
        {
            *slot = self.inner.take();
        }
    }
}

/// Whether a connection's first bytes are the HTTP/2 client preface (prior knowledge): they
/// must match it as far as they go, at least through `PRI * HTTP/2`. Bytes that only start
/// like it are an HTTP/1.1 request to hyper, which answers them with its own 400.
fn is_h2_preface(first: &[u8]) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let n = first.len().min(PREFACE.len());
    n >= b"PRI * HTTP/2".len() && first[..n] == PREFACE[..n]
}

/// Finishes a connection: when it ended because a request head missed the header clock,
/// the client gets `408` JSON before the socket closes.
pub async fn finish(exchange: &Exchange, header_read_timeout: Duration) {
    let stalled = exchange.take_stalled();
    if let Some(stream) = stalled
        && exchange.head_timed_out.load(Ordering::Relaxed)
    {
        answer_header_timeout(stream, header_read_timeout).await;
    }
}

/// Answers a client whose request head did not arrive in time: `408` JSON, then close.
async fn answer_header_timeout(mut stream: TcpStream, timeout: Duration) {
    let answer = raw_json_error(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        &format!(
            "the request head did not arrive within listener.header_read_timeout ({})",
            humantime::format_duration(timeout)
        ),
        None,
    );
    let write = async {
        stream.write_all(&answer).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// The status and date of hyper's own error head: exactly `HTTP/1.1 <400|414|431> <reason>`,
/// `connection: close`, `content-length: 0`, `date: ...`, an empty line, nothing else.
pub fn hyper_error_status(head: &[u8]) -> Option<(StatusCode, &[u8])> {
    let rest = head.strip_prefix(b"HTTP/1.1 ")?;
    let status = match rest.get(..4)? {
        b"400 " => StatusCode::BAD_REQUEST,
        b"414 " => StatusCode::URI_TOO_LONG,
        b"431 " => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        _ => return None,
    };
    let reason = status.canonical_reason()?.as_bytes();
    let rest = rest[4..].strip_prefix(reason)?;
    let rest = rest.strip_prefix(b"\r\nconnection: close\r\ncontent-length: 0\r\ndate: ")?;
    let date = rest.strip_suffix(b"\r\n\r\n")?;
    // An IMF-fixdate is 29 visible characters.
    (date.len() == 29 && date.iter().all(|b| b.is_ascii_graphic() || *b == b' '))
        .then_some((status, date))
}

/// An answer's body that tells the connection's [`Exchange`] when hyper is done with it
/// (drops it), so the socket wrapper knows when no answer can be in the write stream.
#[derive(Debug)]
pub struct Answered<B> {
    body: B,
    /// Counts the request done when the body is dropped.
    _started: Started,
}

impl<B> Answered<B> {
    pub fn new(body: B, started: Started) -> Self {
        Answered {
            body,
            _started: started,
        }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Answered<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A whole HTTP/1.1 JSON error answer that closes the connection.
fn raw_json_error(status: StatusCode, error: &str, detail: &str, date: Option<&[u8]>) -> Vec<u8> {
    let body = crate::response::json_error_body(error, detail);
    let date = match date {
        Some(d) => String::from_utf8_lossy(d).into_owned(),
        None => httpdate::fmt_http_date(std::time::SystemTime::now()),
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncache-control: no-store\r\n\
         connection: close\r\ncontent-length: {}\r\ndate: {date}\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER_400: &[u8] =
        b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\
                               date: Thu, 03 Dec 2026 18:52:39 GMT\r\n\r\n";

    #[test]
    fn hypers_error_heads_are_recognised() {
        let (status, date) = hyper_error_status(HYPER_400).expect("hyper's 400");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(date, b"Thu, 03 Dec 2026 18:52:39 GMT");
        let big = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
                    content-length: 0\r\ndate: Thu, 03 Dec 2026 18:52:39 GMT\r\n\r\n";
        assert_eq!(
            hyper_error_status(big).map(|(s, _)| s),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
    }

    #[test]
    fn other_heads_are_not_hypers_errors() {
        for head in [
            // a relay's 400 with a body, an extra header, a different status, trailing data
            &b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 2\r\n\
               date: Thu, 03 Dec 2026 18:52:39 GMT\r\n\r\n{}"[..],
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\
              date: Thu, 03 Dec 2026 18:52:39 GMT\r\nserver: relay\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\
              date: Thu, 03 Dec 2026 18:52:39 GMT\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\
              date: Thu, 03 Dec 2026 18:52:39 GMT\r\n\r\nHTTP/1.1",
            b"{\"jsonrpc\":\"2.0\"}",
            b"",
        ] {
            assert!(
                hyper_error_status(head).is_none(),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn only_the_real_preface_marks_an_h2_connection() {
        assert!(is_h2_preface(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12\x04"
        ));
        assert!(
            is_h2_preface(b"PRI * HTTP/2.0\r\n"),
            "a preface split over reads"
        );
        assert!(!is_h2_preface(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"));
        assert!(!is_h2_preface(b"PRI * HTTP/1.1\r\n\r\n"));
        assert!(!is_h2_preface(b"POST / HTTP/1.1\r\n"));
        assert!(
            !is_h2_preface(b"PRI"),
            "too short to tell: HTTP/1.1 rules apply"
        );
    }

    #[test]
    fn the_replacement_is_a_whole_json_answer() {
        let raw = raw_json_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "malformed",
            Some(b"Thu, 03 Dec 2026 18:52:39 GMT"),
        );
        let text = String::from_utf8(raw).expect("ASCII");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("\r\ncontent-type: application/json\r\n"));
        assert!(head.contains("\r\nconnection: close\r\n"));
        assert!(head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())));
        assert!(head.ends_with("date: Thu, 03 Dec 2026 18:52:39 GMT"));
        let doc: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(doc["error"], "bad_request");
        assert_eq!(doc["detail"], "malformed");
    }
}
