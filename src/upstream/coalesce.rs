//! Write coalescing for a multiplexed connection: the HTTP/2 driver hands its frames to the
//! I/O one at a time (each request's HEADERS, its DATA, WINDOW_UPDATEs) and flushes after the
//! batch it has. [`Coalesce`] gathers the small writes between two flushes, so each flush is
//! one TLS record and one `writev` however many frames it carries. Under load the batch is
//! a whole event-loop turn: the first request of the turn wakes the driver, which tokio queues
//! behind the client tasks that are already ready, so their requests join the same write.
//!
//! ```text
//!  client tasks ─ send_request ─▶ h2 frames ─▶ Coalesce buffer ─(flush)─▶ TLS ─▶ socket
//! ```
//!
//! An earlier version answered the first flush "not yet" (waking its own task) to gather one
//! more turn. Side by side it saved nothing on a saturated core and cost about 10% more CPU
//! per request on a shared one (README, Performance), so a flush now writes at once. Large
//! writes (request bodies) bypass the buffer. Flushed bytes are zeroed: they are plaintext
//! request heads (HPACK-encoded, the credential among them).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes held before a write goes through regardless of the flush.
const CAPACITY: usize = 64 * 1024;

/// Writes at least this large skip the buffer when it is empty: they fill TLS records on
/// their own, and copying them would cost more than the saved system call.
const DIRECT: usize = 16 * 1024;

/// An I/O stream whose small writes are gathered until the next flush (module docs).
#[derive(Debug)]
pub struct Coalesce<T> {
    inner: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed to `inner`.
    written: usize,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Coalesce {
            inner,
            buf: Vec::new(),
            written: 0,
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
        ready!(this.poll_drain(cx))?;
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

    /// Counts the writes (plain or vectored) that reach the inner stream.
    struct Counting {
        inner: tokio::io::DuplexStream,
        writes: usize,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.writes += 1;
            Pin::new(&mut this.inner).poll_write(cx, data)
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            slices: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.writes += 1;
            Pin::new(&mut this.inner).poll_write_vectored(cx, slices)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn small_writes_wait_for_the_flush_and_leave_in_one_write_in_order() {
        let (near, far) = tokio::io::duplex(1 << 20);
        let mut io = Coalesce::new(Counting {
            inner: near,
            writes: 0,
        });
        io.write_all(b"HEADERS one;").await.unwrap();
        io.write_all(b"DATA one;").await.unwrap();
        let n = io
            .write_vectored(&[io::IoSlice::new(b"HEADERS two;")])
            .await
            .unwrap();
        assert_eq!(n, 12, "a small vectored write is taken whole");
        assert_eq!(io.buffered(), 33);
        assert_eq!(
            io.get_ref().writes,
            0,
            "nothing is written before the flush"
        );
        // The flush completes at once: no deferral, no extra poll.
        let flushed = poll_fn(|cx| Poll::Ready(Pin::new(&mut io).poll_flush(cx))).await;
        assert!(matches!(flushed, Poll::Ready(Ok(()))), "{flushed:?}");
        assert_eq!(io.get_ref().writes, 1, "one write for the whole batch");
        assert_eq!(io.buffered(), 0);
        assert!(io.buf.capacity() > 0 && io.buf.is_empty());
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(read_all(far).await, b"HEADERS one;DATA one;HEADERS two;");
    }

    #[tokio::test]
    async fn every_flush_writes_what_came_before_it() {
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
