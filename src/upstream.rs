//! The facade the data plane calls: pick a connection → breaker admit → send → record
//! latency → report the outcome → retry when it is safe and the budget allows.

pub mod backoff;
pub mod breaker;
pub mod coalesce;
pub mod connection;
pub mod pool;
pub mod read_ahead;
pub mod request_limit;
pub mod retry;
pub mod wait_queue;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use tokio::time::Instant;
use tracing::debug;

use crate::config::Config;
use crate::metrics::{AttemptOutcome, Metrics};
use connection::{AttemptBody, BoxError, ResponseBody};
use pool::{Outcome, Pool};
use retry::{RetryBudget, Verdict};

/// Supplies the relay credential for each upstream request (a sensitive header value).
pub trait CredentialSource: Send + Sync {
    /// A fresh header value marked sensitive, or `None` when no credential is configured.
    fn header_value(&self) -> Option<HeaderValue>;

    /// The credential for one request: the header value, and the same field HPACK-encoded
    /// in advance when the source keeps one (HTTP/2 relay connections send that instead of
    /// encoding the value per request).
    fn credential(&self) -> Option<Credential> {
        self.header_value().map(|value| Credential {
            value,
            h2_field: None,
        })
    }
}

/// The relay credential as one request carries it. `Debug` shows neither form.
#[derive(Clone)]
pub struct Credential {
    /// The header value (sensitive): what an HTTP/1.1 relay connection sends.
    pub value: HeaderValue,
    /// The whole field (`upstream.auth_header` and the value) as a never-indexed HPACK
    /// literal, encoded once per burst of traffic into locked memory: what an HTTP/2 relay
    /// connection sends, when present.
    pub h2_field: Option<h2::ext::EncodedField>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential([redacted])")
    }
}

/// What kind of failure an [`UpstreamError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No connection can take a request (breakers open, relay unreachable): 503.
    Unavailable,
    /// The relay failed (reset, protocol error, bad certificate): 502.
    BadGateway,
    /// No response headers within `pool.request_timeout`: 504.
    Timeout,
    /// No connection became free within `pool.request_timeout` (every one busy; the request
    /// waited in line and was never sent): 504, and not retried, since a retry would only
    /// wait in the same line again.
    PoolTimeout,
    /// The client's overall deadline (`listener.request_deadline`) passed: 504.
    Deadline,
    /// The attempt ran out of time while the request body waited for the client, not for
    /// the relay: the client's fault, 408.
    ClientStalled,
    /// The client's streamed body grew past `listener.max_body_bytes`: 413.
    ClientBodyTooLarge,
    /// The client's streamed body broke (bad chunked framing, the client went away mid-body):
    /// 400. The relay saw a cancelled stream, which says nothing about its health.
    ClientBodyFailed,
}

/// A failed forward, classified for the breaker, retries, metrics and the JSON answer.
#[derive(Debug, Clone)]
pub struct UpstreamError {
    kind: ErrorKind,
    detail: String,
    never_sent: bool,
    /// The relay declined the request in an orderly way before processing it (a graceful
    /// GOAWAY above its stream, REFUSED_STREAM, a kept-alive connection it had closed), so
    /// a retry does not use up an attempt.
    refused: bool,
    /// The refusal still counts against the connection's breaker: a REFUSED_STREAM on a
    /// connection that stays open (see [`UpstreamError::refused_stream`]).
    blames_connection: bool,
    retry_after: Option<u64>,
}

/// `detail` without the documentation links some libraries append to their messages
/// (rustls: `"… close_notify: https://docs.rs/…"`): the detail is for the client and the log.
fn readable(mut detail: String) -> String {
    if let Some(at) = detail.find(": https://") {
        let end = detail[at + 2..]
            .find(char::is_whitespace)
            .map_or(detail.len(), |i| at + 2 + i);
        detail.replace_range(at..end, "");
    }
    detail
}

impl UpstreamError {
    pub fn unavailable(detail: impl Into<String>, retry_after_secs: u64) -> Self {
        UpstreamError {
            kind: ErrorKind::Unavailable,
            detail: readable(detail.into()),
            never_sent: true,
            refused: false,
            blames_connection: false,
            retry_after: Some(retry_after_secs),
        }
    }

    pub fn bad_gateway(detail: impl Into<String>) -> Self {
        UpstreamError {
            kind: ErrorKind::BadGateway,
            detail: readable(detail.into()),
            never_sent: true,
            refused: false,
            blames_connection: false,
            retry_after: None,
        }
    }

    /// A connection-level failure; `never_sent` when the relay provably did not see it.
    pub fn reset(detail: impl Into<String>, never_sent: bool) -> Self {
        UpstreamError {
            kind: ErrorKind::BadGateway,
            detail: readable(detail.into()),
            never_sent,
            refused: false,
            blames_connection: false,
            retry_after: None,
        }
    }

    /// The relay declined the request before processing it, in an orderly way (see
    /// [`UpstreamError::is_refused`]).
    pub fn refused(detail: impl Into<String>) -> Self {
        UpstreamError {
            kind: ErrorKind::BadGateway,
            detail: readable(detail.into()),
            never_sent: true,
            refused: true,
            blames_connection: false,
            retry_after: None,
        }
    }

    /// The relay reset the stream with REFUSED_STREAM on a connection it keeps open: the
    /// request was not processed, so it is retried like any refusal (no attempt used up). But
    /// the stream limit the relay announced is kept (see `Connection::adopt_relay_stream_limit`),
    /// so a compliant relay refuses only when it will not work (overload, shutdown, a fault),
    /// and the refusal counts as a failure for the connection's breaker: a relay that refuses
    /// every stream trips the breakers and the pool fails fast, where it looked healthy while
    /// every request failed.
    pub fn refused_stream(detail: impl Into<String>) -> Self {
        UpstreamError {
            blames_connection: true,
            ..UpstreamError::refused(detail)
        }
    }

    /// See [`ErrorKind::PoolTimeout`].
    pub fn pool_timeout(detail: impl Into<String>) -> Self {
        UpstreamError {
            kind: ErrorKind::PoolTimeout,
            never_sent: true,
            ..UpstreamError::timeout(detail)
        }
    }

    pub fn timeout(detail: impl Into<String>) -> Self {
        UpstreamError {
            kind: ErrorKind::Timeout,
            detail: readable(detail.into()),
            never_sent: false,
            refused: false,
            blames_connection: false,
            retry_after: None,
        }
    }

    /// A streamed request body stopped arriving from the client (see
    /// [`ErrorKind::ClientStalled`]).
    pub fn client_stalled(detail: impl Into<String>) -> Self {
        UpstreamError {
            kind: ErrorKind::ClientStalled,
            detail: readable(detail.into()),
            never_sent: false,
            refused: false,
            blames_connection: false,
            retry_after: None,
        }
    }

    /// The client's streamed body failed (see [`ClientBody`]).
    fn client_body(kind: ErrorKind, detail: String) -> Self {
        UpstreamError {
            kind,
            detail,
            never_sent: false,
            refused: false,
            blames_connection: false,
            retry_after: None,
        }
    }

    pub fn deadline(detail: impl Into<String>) -> Self {
        UpstreamError {
            kind: ErrorKind::Deadline,
            detail: readable(detail.into()),
            never_sent: false,
            refused: false,
            blames_connection: false,
            retry_after: None,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn is_timeout(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Timeout | ErrorKind::PoolTimeout | ErrorKind::Deadline
        )
    }

    pub fn is_unavailable(&self) -> bool {
        self.kind == ErrorKind::Unavailable
    }

    /// The relay provably never received the request: any method may be retried.
    pub fn is_never_sent(&self) -> bool {
        self.never_sent
    }

    /// The relay declined the request in an orderly way before processing it (GOAWAY with
    /// NO_ERROR above its stream id, REFUSED_STREAM, or a connection it had already closed
    /// or sent GOAWAY on): a retry does not use up an attempt. Only REFUSED_STREAM also
    /// counts for the breaker ([`UpstreamError::blames_connection`]).
    pub fn is_refused(&self) -> bool {
        self.refused
    }

    /// The failure counts against the connection's breaker even though it is a refusal (see
    /// [`UpstreamError::refused_stream`]).
    pub fn blames_connection(&self) -> bool {
        self.blames_connection
    }

    /// Seconds for `Retry-After`, for 503 answers.
    pub fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }

    pub fn detail(&self) -> &str {
        &self.detail
    }

    pub fn status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::BadGateway => StatusCode::BAD_GATEWAY,
            ErrorKind::Timeout | ErrorKind::PoolTimeout | ErrorKind::Deadline => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ErrorKind::ClientStalled => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::ClientBodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::ClientBodyFailed => StatusCode::BAD_REQUEST,
        }
    }

    /// The `error` field of the JSON answer.
    pub fn code(&self) -> &'static str {
        match self.kind {
            ErrorKind::Unavailable => "upstream_unavailable",
            ErrorKind::BadGateway => "upstream_failed",
            ErrorKind::Timeout | ErrorKind::PoolTimeout => "upstream_timeout",
            ErrorKind::Deadline => "request_deadline_exceeded",
            ErrorKind::ClientStalled => "request_timeout",
            ErrorKind::ClientBodyTooLarge => "body_too_large",
            ErrorKind::ClientBodyFailed => "bad_request",
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code(), self.detail)
    }
}

impl std::error::Error for UpstreamError {}

/// A request body as the facade receives it.
pub enum OutgoingBody {
    /// Small, fully read: can be sent again on retry.
    Replayable(Bytes),
    /// Streamed from the client: sent once. The data plane's body wrapper reports into the
    /// [`ClientBody`], so that the client's faults are not taken for the relay's.
    Streaming(UnsyncBoxBody<Bytes, BoxError>, Arc<ClientBody>),
}

/// What the data plane's body wrapper knows about a streamed client body. An attempt that
/// fails while the fault is the client's is answered as the client's error and is not held
/// against the relay connection (breaker, error counts): a local client sending malformed
/// or oversized bodies must not be able to open the breakers for everyone.
#[derive(Debug, Default)]
pub struct ClientBody {
    /// True while the body's last poll found nothing to read from the client, so that a
    /// stalled client is not taken for a stalled relay.
    pub waiting: AtomicBool,
    fault: std::sync::OnceLock<(ErrorKind, String)>,
}

impl ClientBody {
    /// The body grew past `limit` bytes (`listener.max_body_bytes`).
    pub fn too_large(&self, limit: u64) {
        let _ = self.fault.set((
            ErrorKind::ClientBodyTooLarge,
            format!("request body exceeds listener.max_body_bytes ({limit} bytes)"),
        ));
    }

    /// Reading the body from the client failed; `why` says how.
    pub fn failed(&self, why: String) {
        let _ = self.fault.set((
            ErrorKind::ClientBodyFailed,
            format!("reading the request body failed: {why}"),
        ));
    }

    /// The client's fault, if its body failed.
    pub fn fault(&self) -> Option<UpstreamError> {
        self.fault
            .get()
            .map(|(kind, detail)| UpstreamError::client_body(*kind, detail.clone()))
    }

    fn is_waiting(&self) -> bool {
        self.waiting.load(Ordering::Acquire)
    }
}

/// The request head to forward, already rewritten by the data plane.
pub struct OutgoingHead {
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: http::HeaderMap,
    /// The request carries an `Idempotency-Key`.
    pub idempotency_key: bool,
}

/// Sends requests to the relay through the pool.
pub struct Upstream {
    pool: Arc<Pool>,
    cfg: Arc<Config>,
    budget: Mutex<RetryBudget>,
    metrics: Metrics,
    credential: Option<Arc<dyn CredentialSource>>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn new(
        pool: Arc<Pool>,
        metrics: Metrics,
        credential: Option<Arc<dyn CredentialSource>>,
    ) -> Self {
        let cfg = Arc::new(pool.config().clone());
        Upstream {
            budget: Mutex::new(RetryBudget::new(cfg.retry.budget_ratio, Instant::now())),
            pool,
            cfg,
            metrics,
            credential,
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Forwards one request, retrying on another connection when that is safe.
    ///
    /// # Errors
    /// An [`UpstreamError`] saying why no response could be had.
    pub async fn send(
        &self,
        head: OutgoingHead,
        body: OutgoingBody,
        deadline: Instant,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let max_attempts = self.cfg.retry.max_attempts;
        let idempotent = retry::is_idempotent(&head.method, head.idempotency_key);
        // Taken once per request; each attempt's connection adds it in its own form.
        let credential = self.credential.as_ref().and_then(|c| c.credential());
        let (replayable, mut stream, client) = match body {
            OutgoingBody::Replayable(b) => (Some(b), None, None),
            OutgoingBody::Streaming(s, client) => (None, Some(s), Some(client)),
        };
        let mut exclude = None;
        let mut attempt = 0u32;
        // Attempts the relay refused in an orderly way; they do not count against
        // `retry.max_attempts` (up to MAX_REFUSED_RETRIES).
        let mut refusals = 0u32;
        // The last attempt's failure, when it reached the relay: what the client is told if
        // the retry then finds no usable connection (that 503 would hide what happened).
        let mut previous: Option<UpstreamError> = None;
        loop {
            attempt += 1;
            let now = Instant::now();
            if attempt == 1
                && let Ok(mut b) = self.budget.lock()
            {
                b.record_request(now);
            }
            if now >= deadline {
                return Err(UpstreamError::deadline(format!(
                    "no response within listener.request_deadline ({:?})",
                    self.cfg.listener.request_deadline
                )));
            }
            let attempt_deadline = (now + self.cfg.pool.request_timeout).min(deadline);
            let body = match (&replayable, stream.take()) {
                (Some(b), _) => AttemptBody::Full(Some(b.clone())),
                (None, Some(s)) => AttemptBody::Stream(s),
                (None, None) => AttemptBody::empty(),
            };
            let result = self
                .attempt(
                    (&head, credential.as_ref()),
                    body,
                    exclude,
                    (attempt_deadline, deadline),
                    client.as_deref(),
                    now,
                )
                .await;
            let (err, slot) = match result {
                Ok(resp) => return Ok(resp),
                Err(e) => e,
            };
            let refused = err.is_refused() && refusals < retry::MAX_REFUSED_RETRIES;
            if refused {
                refusals += 1;
            }
            let verdict = retry::verdict(
                attempt - refusals,
                max_attempts,
                err.is_never_sent(),
                idempotent,
                replayable.is_some(),
            );
            // No connection now, or none within request_timeout: another attempt would
            // only wait for one again.
            let pool_exhausted = err.is_unavailable() || err.kind() == ErrorKind::PoolTimeout;
            if pool_exhausted && let Some(previous) = previous {
                return Err(previous);
            }
            if verdict != Verdict::Retry || pool_exhausted {
                return Err(err);
            }
            // An orderly refusal is the relay rotating a connection, not a sign of trouble: it
            // costs no budget (MAX_REFUSED_RETRIES bounds it per request).
            let granted = refused
                || self
                    .budget
                    .lock()
                    .is_ok_and(|mut b| b.try_withdraw(Instant::now()));
            if !granted {
                self.metrics.retry_budget_exhausted();
                return Err(err);
            }
            self.metrics.retry(if err.is_refused() {
                "refused"
            } else if err.is_never_sent() {
                "never_sent"
            } else {
                "idempotent"
            });
            debug!(attempt, error = %err, "retrying on another connection");
            exclude = slot;
            // After an orderly refusal, finding no connection is the honest answer.
            previous = (!err.is_refused()).then_some(err);
            if refused {
                // Nothing is wrong with the relay: go again at once (the pool hands out a
                // connection that is not going away, or waits for the replacement dial).
                continue;
            }
            // Full jitter, small: the next attempt goes to a different connection anyway.
            let pause = Duration::from_millis(20).mul_f64(fastrand::f64());
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }

    /// One attempt on one connection with the request's head and credential, by
    /// `(attempt deadline, request deadline)`; on failure
    /// also says which slot it used. `client`: see [`OutgoingBody::Streaming`].
    /// `now`: the clock read just before (one reading serves the deadline check, the
    /// checkout and the latency's start).
    async fn attempt(
        &self,
        (head, credential): (&OutgoingHead, Option<&Credential>),
        body: AttemptBody,
        exclude: Option<usize>,
        (attempt_deadline, deadline): (Instant, Instant),
        client: Option<&ClientBody>,
        now: Instant,
    ) -> Result<Response<ResponseBody>, (UpstreamError, Option<usize>)> {
        let mut checkout = self
            .pool
            .checkout(exclude, attempt_deadline, now)
            .await
            .map_err(|e| (e, None))?;
        let slot = checkout.slot.index;
        let mut req = Request::new(body);
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = head.uri.clone();
        *req.headers_mut() = head.headers.clone();
        // An HTTP/2 connection sends the credential's field as encoded in advance; otherwise
        // the value goes into this attempt's headers.
        let mut h2_field = None;
        if let Some(c) = credential {
            match (&c.h2_field, checkout.conn.protocol) {
                (Some(field), connection::Protocol::H2) => h2_field = Some(field.clone()),
                _ => {
                    req.headers_mut()
                        .insert(self.cfg.upstream.auth_header.clone(), c.value.clone());
                }
            }
        }
        let permit = checkout.permit.take();
        let conn = checkout.conn.clone();
        // Latency counts from here, not from a wait for a free connection.
        let started = if checkout.waited { Instant::now() } else { now };
        let sent = match permit {
            Some(p) => tokio::time::timeout_at(attempt_deadline, conn.send(req, h2_field, p)).await,
            None => Ok(Err(UpstreamError::reset("no request slot", true))),
        };
        let ended = Instant::now();
        let elapsed = ended.saturating_duration_since(started);
        match sent {
            Ok(Ok(mut resp)) => {
                resp.body_mut()
                    .count_failures_in(checkout.slot.error_counter(), checkout.slot.id());
                let failed = matches!(resp.status().as_u16(), 502..=504);
                let outcome = if failed {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                self.metrics.attempt(
                    if failed {
                        AttemptOutcome::Failure
                    } else {
                        AttemptOutcome::Success
                    },
                    elapsed,
                );
                self.pool.finish(checkout, outcome, Some(elapsed), ended);
                Ok(resp)
            }
            Ok(Err(_)) | Err(_) if let Some(fault) = client.and_then(ClientBody::fault) => {
                // The client's body failed and the stream was cancelled for it: the relay did
                // nothing wrong. An HTTP/1.1 connection stopped mid-body closes as the
                // sidecar's doing, and is replaced at once.
                checkout.conn.abandon_request();
                self.pool.finish(checkout, Outcome::NotJudged, None, ended);
                Err((fault, Some(slot)))
            }
            Ok(Err(e)) => {
                let (outcome, label) = match (e.is_refused(), e.blames_connection()) {
                    (true, false) => (Outcome::Refused, AttemptOutcome::Refused),
                    (true, true) => (Outcome::Failure, AttemptOutcome::Refused),
                    (false, _) => (Outcome::Failure, AttemptOutcome::Failure),
                };
                self.metrics.attempt(label, elapsed);
                self.pool.finish(checkout, outcome, None, ended);
                Err((e, Some(slot)))
            }
            Err(_) if client.is_some_and(ClientBody::is_waiting) => {
                // The relay was waiting for the rest of the body too: nothing to hold
                // against the connection.
                checkout.conn.abandon_request();
                self.pool.finish(checkout, Outcome::NotJudged, None, ended);
                Err((
                    UpstreamError::client_stalled(format!(
                        "the request body stopped arriving from the client, and the relay \
                         cannot answer without it (waited {:?}, pool.request_timeout)",
                        attempt_deadline.saturating_duration_since(started)
                    )),
                    Some(slot),
                ))
            }
            Err(_) => {
                self.metrics.attempt(AttemptOutcome::Failure, elapsed);
                self.pool
                    .finish(checkout, Outcome::Failure, Some(elapsed), ended);
                let e = if attempt_deadline >= deadline {
                    UpstreamError::deadline(format!(
                        "no response within listener.request_deadline ({:?})",
                        self.cfg.listener.request_deadline
                    ))
                } else {
                    UpstreamError::timeout(format!(
                        "no response headers from the relay within pool.request_timeout ({:?})",
                        self.cfg.pool.request_timeout
                    ))
                };
                Err((e, Some(slot)))
            }
        }
    }
}

#[cfg(test)]
mod readable_tests {
    use super::readable;

    #[test]
    fn documentation_links_are_cut_from_error_details() {
        assert_eq!(
            readable(
                "relay stream failed: peer closed connection without sending TLS close_notify: \
                 https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof"
                    .into()
            ),
            "relay stream failed: peer closed connection without sending TLS close_notify"
        );
        assert_eq!(
            readable("a: https://x.example/y (and more)".into()),
            "a (and more)"
        );
        assert_eq!(readable("no link here".into()), "no link here");
    }
}
