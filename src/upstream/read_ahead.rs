//! Reading an HTTP/1.1 answer ahead of its client, so that the relay connection is free for
//! the next request as soon as the whole answer is in, however slowly the client reads.
//!
//! An HTTP/1.1 relay connection carries one request at a time, and it stays taken until
//! its answer has been read to the end. Streamed at the client's pace, a client that stops
//! reading a large answer would hold it until the client's write clock cut it off (75 s),
//! and `pool.size` such clients would hold the whole pool. So a task reads the answer into a
//! queue instead, bounded twice: per answer (`upstream.http1_read_ahead_bytes`) and for all
//! answers together (`upstream.http1_read_ahead_total_bytes`). Past either bound the task
//! reads one piece at a time as the client takes them, which is streaming as before: memory
//! stays bounded by the budget plus one piece per answer, never by what clients fail to read.
//!
//! HTTP/2 needs none of this: a stalled stream holds only its own window.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::connection::{BodyStalled, BoxError, StallClock};

/// Answers of a known length up to this size go straight through: the sockets between the
/// sidecar and its client take them whole, so the relay connection is free at once anyway.
pub const STRAIGHT_THROUGH_BYTES: u64 = 64 * 1024;

/// The read-ahead limits and what all answers hold now.
#[derive(Debug)]
pub struct Budget {
    per_answer: usize,
    total: usize,
    held: AtomicUsize,
}

impl Budget {
    /// `per_answer` and `total` in bytes; either 0 turns reading ahead off.
    pub fn new(per_answer: usize, total: usize) -> Self {
        Budget {
            per_answer,
            total,
            held: AtomicUsize::new(0),
        }
    }

    /// Bytes read from the relay that clients have not taken yet.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Whether an answer of this size is read ahead.
    pub fn applies(&self, size: &SizeHint) -> bool {
        self.per_answer > 0
            && self.total > 0
            && size.exact().is_none_or(|n| n > STRAIGHT_THROUGH_BYTES)
    }

    fn has_room(&self, answer_holds: usize) -> bool {
        answer_holds < self.per_answer && self.held() < self.total
    }
}

/// What the reading task owns on behalf of the relay connection: told about every piece
/// read and about a body that broke, and dropped once the answer is read (or abandoned),
/// which frees the connection's request slot.
pub trait Link: Send + 'static {
    /// `n` body bytes came from the relay.
    fn received(&self, n: usize);
    /// The body failed or stalled: the connection cannot carry another request.
    fn broken(&self);
}

#[derive(Default)]
struct State {
    queue: VecDeque<Frame<Bytes>>,
    /// Body bytes in `queue` (counted in the budget's `held`).
    bytes: usize,
    /// How the body ended: `Some(None)` whole, `Some(Some(e))` failed.
    end: Option<Option<BoxError>>,
    /// The client's side waits for a piece.
    reader: Option<Waker>,
    /// The reading task waits for room (or watches for the client leaving).
    writer: Option<Waker>,
    /// The client's side was dropped.
    gone: bool,
}

struct Shared {
    state: Mutex<State>,
    budget: Arc<Budget>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind, still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finish(&self, end: Option<BoxError>) {
        let mut s = self.lock();
        s.end = Some(end);
        if let Some(w) = s.reader.take() {
            w.wake();
        }
    }
}

/// Starts reading `body` ahead on its own task and returns the client's side of it.
/// `stall` is the longest pause allowed between two pieces from the relay
/// (`pool.request_timeout`); a longer one fails the body, as it does when streamed.
pub fn start<B, L>(body: B, budget: Arc<Budget>, stall: Duration, link: L) -> Reader
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    L: Link,
{
    let size = body.size_hint();
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        budget,
    });
    let mut pump = Pump {
        body,
        shared: shared.clone(),
        link,
        stall,
        clock: StallClock::default(),
    };
    tokio::spawn(async move {
        match std::future::poll_fn(|cx| pump.poll(cx)).await {
            Ended::Whole => pump.shared.finish(None),
            Ended::Failed(e) => {
                pump.link.broken();
                pump.shared.finish(Some(e));
            }
            // Dropping the body unread makes hyper close the connection, as when streamed.
            Ended::Gone => {}
        }
        // The answer is in (or abandoned): dropping the link frees the connection's slot.
        drop(pump);
    });
    Reader { shared, size }
}

enum Ended {
    Whole,
    Failed(BoxError),
    Gone,
}

/// The reading task's state.
struct Pump<B, L> {
    body: B,
    shared: Arc<Shared>,
    link: L,
    stall: Duration,
    clock: StallClock,
}

impl<B, L> Drop for Pump<B, L> {
    fn drop(&mut self) {
        // A task stopped before the body ended (the runtime shutting down) must not leave its
        // client waiting for pieces that will never come.
        let mut s = self.shared.lock();
        if s.end.is_none() && !s.gone {
            s.end = Some(Some("the relay answer's reading task stopped".into()));
            if let Some(w) = s.reader.take() {
                w.wake();
            }
        }
    }
}

impl<B, L> Pump<B, L>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    L: Link,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Ended> {
        loop {
            {
                let mut s = self.shared.lock();
                if s.gone {
                    return Poll::Ready(Ended::Gone);
                }
                // Registered even when there is room, so that the client leaving wakes the
                // task while it waits for the relay.
                if s.writer.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
                    s.writer = Some(cx.waker().clone());
                }
                if !(s.queue.is_empty() || self.shared.budget.has_room(s.bytes)) {
                    return Poll::Pending;
                }
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return self.stalled(cx),
                Poll::Ready(None) => return Poll::Ready(Ended::Whole),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Ended::Failed(e.into())),
                Poll::Ready(Some(Ok(frame))) => {
                    self.clock.progressed();
                    let n = frame.data_ref().map_or(0, Bytes::len);
                    self.link.received(n);
                    let mut s = self.shared.lock();
                    self.shared.budget.held.fetch_add(n, Ordering::Relaxed);
                    s.bytes += n;
                    s.queue.push_back(frame);
                    if let Some(w) = s.reader.take() {
                        w.wake();
                    }
                }
            }
        }
    }

    /// Pending, unless the relay has been quiet for longer than `stall`.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<Ended> {
        if self.clock.poll_expired(cx, self.stall) {
            Poll::Ready(Ended::Failed(Box::new(BodyStalled(self.stall))))
        } else {
            Poll::Pending
        }
    }
}

/// The client's side of an answer read ahead: the pieces in order, then the end.
pub struct Reader {
    shared: Arc<Shared>,
    size: SizeHint,
}

impl Body for Reader {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut s = this.shared.lock();
        if let Some(frame) = s.queue.pop_front() {
            let n = frame.data_ref().map_or(0, Bytes::len);
            s.bytes -= n;
            this.shared.budget.held.fetch_sub(n, Ordering::Relaxed);
            if let Some(w) = s.writer.take() {
                w.wake();
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        match &mut s.end {
            Some(end) => Poll::Ready(end.take().map(Err)),
            None => {
                if s.reader.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
                    s.reader = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.shared.lock();
        s.queue.is_empty() && matches!(s.end, Some(None))
    }

    fn size_hint(&self) -> SizeHint {
        self.size
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.gone = true;
        self.shared
            .budget
            .held
            .fetch_sub(s.bytes, Ordering::Relaxed);
        s.bytes = 0;
        s.queue.clear();
        if let Some(w) = s.writer.take() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    const PIECE: usize = 64 * 1024;

    /// A relay body of `pieces` pieces of [`PIECE`] bytes (piece `i` filled with byte `i`),
    /// each ready when asked for, then an end or an error; counts the pieces taken.
    struct Pieces {
        next: usize,
        pieces: usize,
        fail_at_end: bool,
        taken: Arc<AtomicUsize>,
    }

    impl Body for Pieces {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.next == self.pieces {
                return Poll::Ready(
                    std::mem::take(&mut self.fail_at_end).then(|| Err("relay reset".into())),
                );
            }
            let byte = self.next as u8;
            self.next += 1;
            self.taken.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![byte; PIECE])))))
        }
    }

    /// A body that sends nothing, ever.
    struct Silent;

    impl Body for Silent {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Pending
        }
    }

    #[derive(Default)]
    struct Seen {
        received: AtomicUsize,
        broken: AtomicBool,
        freed: AtomicBool,
    }

    struct TestLink(Arc<Seen>);

    impl Link for TestLink {
        fn received(&self, n: usize) {
            self.0.received.fetch_add(n, Ordering::Relaxed);
        }
        fn broken(&self) {
            self.0.broken.store(true, Ordering::Relaxed);
        }
    }

    impl Drop for TestLink {
        fn drop(&mut self) {
            self.0.freed.store(true, Ordering::Relaxed);
        }
    }

    fn pieces(n: usize, fail_at_end: bool) -> (Pieces, Arc<AtomicUsize>) {
        let taken = Arc::new(AtomicUsize::new(0));
        let body = Pieces {
            next: 0,
            pieces: n,
            fail_at_end,
            taken: taken.clone(),
        };
        (body, taken)
    }

    fn begin<B>(body: B, budget: &Arc<Budget>) -> (Reader, Arc<Seen>)
    where
        B: Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static,
    {
        let seen = Arc::new(Seen::default());
        let reader = start(
            body,
            budget.clone(),
            Duration::from_secs(15),
            TestLink(seen.clone()),
        );
        (reader, seen)
    }

    /// Lets the reading tasks run until they wait.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    /// Reads the rest of `reader`: every piece must carry its index; returns how many.
    async fn read_all(reader: &mut Reader, first: usize) -> Result<usize, BoxError> {
        let mut next = first;
        while let Some(frame) =
            std::future::poll_fn(|cx| Pin::new(&mut *reader).poll_frame(cx)).await
        {
            let data = frame?.into_data().expect("only data pieces");
            assert_eq!(data.len(), PIECE);
            assert!(
                data.iter().all(|&b| b == next as u8),
                "piece {next} out of order"
            );
            next += 1;
        }
        Ok(next - first)
    }

    #[tokio::test]
    async fn a_whole_answer_is_read_before_the_client_reads_and_frees_its_slot() {
        let budget = Arc::new(Budget::new(1 << 20, 4 << 20));
        let (body, taken) = pieces(10, false);
        let (mut reader, seen) = begin(body, &budget);
        settle().await;
        assert_eq!(taken.load(Ordering::Relaxed), 10);
        assert!(
            seen.freed.load(Ordering::Relaxed),
            "the slot is free before the client reads"
        );
        assert_eq!(seen.received.load(Ordering::Relaxed), 10 * PIECE);
        assert_eq!(budget.held(), 10 * PIECE);
        assert_eq!(read_all(&mut reader, 0).await.expect("whole"), 10);
        assert!(reader.is_end_stream());
        assert_eq!(budget.held(), 0);
        assert!(!seen.broken.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn past_the_per_answer_bound_it_reads_at_the_clients_pace() {
        let budget = Arc::new(Budget::new(2 * PIECE, 4 << 20));
        let (body, taken) = pieces(10, false);
        let (mut reader, seen) = begin(body, &budget);
        settle().await;
        assert_eq!(
            taken.load(Ordering::Relaxed),
            2,
            "reads up to the bound, then waits"
        );
        assert!(!seen.freed.load(Ordering::Relaxed), "the slot stays taken");
        assert_eq!(budget.held(), 2 * PIECE);
        // One piece taken by the client makes room for one more.
        let first = std::future::poll_fn(|cx| Pin::new(&mut reader).poll_frame(cx))
            .await
            .expect("a piece")
            .expect("not an error");
        assert_eq!(first.data_ref().map(Bytes::len), Some(PIECE));
        settle().await;
        assert_eq!(taken.load(Ordering::Relaxed), 3);
        assert_eq!(read_all(&mut reader, 1).await.expect("whole"), 9);
        settle().await;
        assert!(seen.freed.load(Ordering::Relaxed));
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn the_total_bound_is_shared_by_every_answer() {
        let budget = Arc::new(Budget::new(1 << 20, 3 * PIECE));
        let (one, taken_one) = pieces(10, false);
        let (two, taken_two) = pieces(10, false);
        let (mut reader_one, seen_one) = begin(one, &budget);
        settle().await;
        let (mut reader_two, seen_two) = begin(two, &budget);
        settle().await;
        // The first answer fills the budget; the second still gets one piece at a time.
        assert_eq!(taken_one.load(Ordering::Relaxed), 3);
        assert_eq!(taken_two.load(Ordering::Relaxed), 1);
        assert_eq!(budget.held(), 4 * PIECE);
        assert!(!seen_one.freed.load(Ordering::Relaxed));
        assert_eq!(read_all(&mut reader_two, 0).await.expect("whole"), 10);
        assert_eq!(read_all(&mut reader_one, 0).await.expect("whole"), 10);
        settle().await;
        assert!(seen_one.freed.load(Ordering::Relaxed) && seen_two.freed.load(Ordering::Relaxed));
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_relay_error_reaches_the_client_after_the_pieces_before_it() {
        let budget = Arc::new(Budget::new(1 << 20, 4 << 20));
        let (body, _) = pieces(3, true);
        let (mut reader, seen) = begin(body, &budget);
        settle().await;
        assert!(
            seen.broken.load(Ordering::Relaxed),
            "the connection is marked broken"
        );
        assert!(seen.freed.load(Ordering::Relaxed));
        let mut next = 0;
        let err = loop {
            match std::future::poll_fn(|cx| Pin::new(&mut reader).poll_frame(cx)).await {
                Some(Ok(frame)) => {
                    assert_eq!(frame.data_ref().map(|d| d[0]), Some(next));
                    next += 1;
                }
                Some(Err(e)) => break e,
                None => panic!("a failed body must not end cleanly"),
            }
        };
        assert_eq!(next, 3);
        assert_eq!(err.to_string(), "relay reset");
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_client_that_leaves_stops_the_reading_and_gives_its_bytes_back() {
        let budget = Arc::new(Budget::new(2 * PIECE, 4 << 20));
        let (body, taken) = pieces(100, false);
        let (reader, seen) = begin(body, &budget);
        settle().await;
        assert_eq!(budget.held(), 2 * PIECE);
        drop(reader);
        settle().await;
        assert_eq!(budget.held(), 0);
        assert!(seen.freed.load(Ordering::Relaxed), "the task ended");
        assert_eq!(taken.load(Ordering::Relaxed), 2, "nothing more was read");
        // A client that leaves while the relay is quiet stops the task as well.
        let (reader, seen) = begin(Silent, &budget);
        settle().await;
        assert!(!seen.freed.load(Ordering::Relaxed));
        drop(reader);
        settle().await;
        assert!(seen.freed.load(Ordering::Relaxed));
        assert!(!seen.broken.load(Ordering::Relaxed));
    }

    #[test]
    fn a_reading_task_that_stops_early_ends_its_clients_body_with_an_error() {
        let budget = Arc::new(Budget::new(1 << 20, 4 << 20));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (mut reader, seen) = runtime.block_on(async {
            let started = begin(Silent, &budget);
            settle().await;
            started
        });
        // The runtime goes away with the task waiting for the relay.
        drop(runtime);
        assert!(seen.freed.load(Ordering::Relaxed));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        match Pin::new(&mut reader).poll_frame(&mut cx) {
            Poll::Ready(Some(Err(e))) => assert!(e.to_string().contains("stopped"), "{e}"),
            other => panic!("expected an error, got {:?}", other.map(|f| f.map(|_| ()))),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_relay_that_goes_quiet_fails_the_body_after_the_stall_limit() {
        let budget = Arc::new(Budget::new(1 << 20, 4 << 20));
        let (mut reader, seen) = begin(Silent, &budget);
        let polled = tokio::time::timeout(
            Duration::from_secs(16),
            std::future::poll_fn(|cx| Pin::new(&mut reader).poll_frame(cx)),
        )
        .await
        .expect("the stall limit (15 s) ends the wait");
        let err = polled.expect("an error, not an end").expect_err("an error");
        assert!(err.is::<BodyStalled>(), "{err}");
        assert!(seen.broken.load(Ordering::Relaxed));
        assert!(seen.freed.load(Ordering::Relaxed));
    }

    #[test]
    fn small_answers_of_known_length_go_straight_through() {
        let on = Budget::new(1 << 20, 4 << 20);
        assert!(!on.applies(&SizeHint::with_exact(0)));
        assert!(!on.applies(&SizeHint::with_exact(STRAIGHT_THROUGH_BYTES)));
        assert!(on.applies(&SizeHint::with_exact(STRAIGHT_THROUGH_BYTES + 1)));
        assert!(on.applies(&SizeHint::default()), "unknown length (chunked)");
        assert!(!Budget::new(0, 4 << 20).applies(&SizeHint::default()));
        assert!(!Budget::new(1 << 20, 0).applies(&SizeHint::default()));
    }
}
