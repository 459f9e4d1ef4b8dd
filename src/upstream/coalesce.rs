//! Write coalescing for a multiplexed connection: the HTTP/2 driver flushes after every
//! frame batch it has, which under load is one request's HEADERS+DATA — one TLS record and
//! one `writev` per request. [`Coalesce`] holds small writes and answers the first flush with
//! "not yet" after waking its own task, which tokio then runs after the tasks already ready:
//! the client connections whose requests arrived in the same event-loop turn add theirs, and
//! the second flush writes them all in one record and one system call.
//!
//! ```text
//!  client tasks ─ send_request ─▶ h2 frames ─▶ Coalesce buffer ─(flush #2)─▶ TLS ─▶ socket
//!                                                  │ flush #1: wake self, Pending
//!                                                  └─ at most one scheduler turn of delay
//! ```
//!
//! Idle connections pay one extra poll per flush and no delay (nothing else is queued).
//! Large writes (request bodies) bypass the buffer. Flushed bytes are zeroed: they are
//! plaintext request heads (HPACK-encoded, the credential among them).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes held before a write goes through regardless of the flush.
const CAPACITY: usize = 64 * 1024;

/// Writes at least this large skip the buffer when it is empty: they fill TLS records on
/// their own, and copying them would cost more than the saved system call.
const DIRECT: usize = 16 * 1024;

/// An I/O stream whose small writes are gathered until a deferred flush (module docs).
#[derive(Debug)]
pub struct Coalesce<T> {
    inner: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed to `inner`.
    written: usize,
    /// A flush was answered with "not yet" and the task woken; the next one writes.
    deferred: bool,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Coalesce {
            inner,
            buf: Vec::new(),
            written: 0,
            deferred: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Bytes waiting for a flush.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.written
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Hands every buffered byte to `inner`, then zeroes and empties the buffer.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        zeroize::Zeroize::zeroize(&mut self.buf[..]);
        self.buf.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes, draining when they would not fit.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.buf.len() + len > CAPACITY {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx, data.len()))?;
        if this.buf.is_empty() && data.len() >= DIRECT {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        let n = data.len().min(CAPACITY - this.buf.len());
        this.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = slices.iter().map(|s| s.len()).sum();
        ready!(this.poll_room(cx, total))?;
        if this.buf.is_empty() && total >= DIRECT {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, slices);
        }
        let mut n = 0;
        for slice in slices {
            let take = slice.len().min(CAPACITY - this.buf.len());
            this.buf.extend_from_slice(&slice[..take]);
            n += take;
            if take < slice.len() {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffered() > 0 && !this.deferred {
            // A self-wake during a poll puts the task behind the ones already queued (tokio
            // treats it as a yield), so their requests join this write.
            this.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_drain(cx))?;
        this.deferred = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the writes that reach the other side of a duplex pipe.
    async fn read_all(mut peer: tokio::io::DuplexStream) -> Vec<u8> {
        let mut out = Vec::new();
        peer.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn small_writes_wait_for_the_second_flush_and_arrive_in_order() {
        let (near, far) = tokio::io::duplex(1 << 20);
        let mut io = Coalesce::new(near);
        io.write_all(b"HEADERS one;").await.unwrap();
        io.write_all(b"HEADERS two;").await.unwrap();
        assert_eq!(io.buffered(), 24);
        // First flush: deferred (Pending after a self-wake), nothing written yet.
        let first = poll_fn(|cx| Poll::Ready(Pin::new(&mut io).poll_flush(cx))).await;
        assert!(first.is_pending());
        assert_eq!(io.buffered(), 24);
        io.write_all(b"HEADERS three;").await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(io.buffered(), 0);
        assert!(io.buf.capacity() > 0 && io.buf.is_empty());
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(
            read_all(far).await,
            b"HEADERS one;HEADERS two;HEADERS three;"
        );
    }

    #[tokio::test]
    async fn flush_completes_through_the_deferral() {
        let (near, far) = tokio::io::duplex(1 << 20);
        let mut io = Coalesce::new(near);
        for i in 0..100u32 {
            io.write_all(format!("frame {i};").as_bytes())
                .await
                .unwrap();
            io.flush().await.unwrap();
        }
        io.shutdown().await.unwrap();
        drop(io);
        let expected: String = (0..100u32).map(|i| format!("frame {i};")).collect();
        assert_eq!(read_all(far).await, expected.as_bytes());
    }

    #[tokio::test]
    async fn large_and_overflowing_writes_pass_through_in_order() {
        let (near, far) = tokio::io::duplex(1 << 20);
        let reader = tokio::spawn(read_all(far));
        let mut io = Coalesce::new(near);
        let mut expected = Vec::new();
        io.write_all(b"small;").await.unwrap();
        expected.extend_from_slice(b"small;");
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        io.write_all(&big).await.unwrap();
        expected.extend_from_slice(&big);
        let slices = [io::IoSlice::new(b"head;"), io::IoSlice::new(&big[..40_000])];
        let n = io.write_vectored(&slices).await.unwrap();
        expected.extend_from_slice(&b"head;"[..n.min(5)]);
        if n > 5 {
            expected.extend_from_slice(&big[..n - 5]);
        }
        io.flush().await.unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(reader.await.unwrap(), expected);
    }

    #[tokio::test]
    async fn a_closed_peer_is_an_error_not_a_hang() {
        let (near, far) = tokio::io::duplex(64);
        drop(far);
        let mut io = Coalesce::new(near);
        io.write_all(b"lost").await.unwrap();
        assert!(io.flush().await.is_err());
    }
}
