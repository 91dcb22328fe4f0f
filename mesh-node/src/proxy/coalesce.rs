//! Fewer, larger writes to a tunnel connection's TLS stream.
//!
//! The HTTP/2 connection task of a tunnel wakes for each frame that a relay or a request queues,
//! and flushes what it has. Under load that was one TLS record and one `writev` for every
//! request or so (`perf stat -e syscalls:sys_enter_writev`: 0.7 per request and node on the L4
//! path). Each write costs the sender the whole TCP send path and, over veth, the receiver's too.
//! Because a write to a TLS stream goes to the socket at once, this layer keeps writes until a
//! flush. The first flush of a batch also yields once, so that the tasks already woken (other
//! connections' relays and requests) queue their frames first. With no other work the task is
//! polled again at once, so the delay is one trip through the scheduler's queue.
//!
//! Not tokio's `BufWriter` plus the yield: its capacity is also its pass-through threshold, and
//! a 16 KiB one measured 5-8% less bulk throughput (4.9-5.7 against 5.7-5.8 Gbit/s, four
//! interleaved pairs), while a larger one would copy bulk frames and hold its memory for as long
//! as the connection lives. Here up to 256 KiB of small writes are kept, and the buffer is freed
//! after a burst.
use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes kept at most: more, and what is kept is written out first.
const MAX_KEPT_BYTES: usize = 256 * 1024;
/// Capacity kept after a batch: more is freed.
const KEEP_CAPACITY: usize = 64 * 1024;
/// A write this large is bulk: it goes straight through (after what is kept), with no copy.
const PASS_THROUGH: usize = 16 * 1024;

pub struct Coalesce<T> {
    inner: T,
    kept: Vec<u8>,
    /// This batch's flush has yielded once already.
    yielded: bool,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            kept: Vec::new(),
            yielded: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes out what is kept.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut done = 0;
        let r = loop {
            if done == self.kept.len() {
                break Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.inner).poll_write(cx, &self.kept[done..]) {
                Poll::Ready(Ok(0)) => break Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => done += n,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            }
        };
        self.kept.drain(..done);
        if self.kept.is_empty() && self.kept.capacity() > KEEP_CAPACITY {
            // A burst's buffer is not held by a connection that has gone quiet.
            self.kept = Vec::new();
        }
        r
    }

    /// Writes out what is kept if `len` more bytes would not fit, or will not be kept.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.kept.len() + len > MAX_KEPT_BYTES || len >= PASS_THROUGH {
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
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx, buf.len()))?;
        if buf.len() >= PASS_THROUGH {
            // Bulk: nothing to gain from keeping it, and a copy to lose.
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.kept.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum();
        ready!(this.poll_room(cx, len))?;
        if len >= PASS_THROUGH {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.kept.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.kept.is_empty() && !this.yielded {
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_drain(cx))?;
        this.yielded = false;
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
    use std::task::Waker;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Counts the writes that reach the inner stream.
    #[derive(Default)]
    struct Counting {
        written: Vec<u8>,
        writes: usize,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes += 1;
            self.written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn small_writes_leave_as_one_after_one_yield() {
        /// Counts wake-ups: a yield that does not wake its task would stall the connection.
        #[derive(Default)]
        struct Wakes(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Wakes {
            fn wake(self: std::sync::Arc<Self>) {
                self.wake_by_ref();
            }
            fn wake_by_ref(self: &std::sync::Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let wakes = std::sync::Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let woken = || wakes.0.load(std::sync::atomic::Ordering::Relaxed);
        let mut c = Coalesce::new(Counting::default());
        let mut cx = Context::from_waker(&waker);
        for part in [&b"ab"[..], b"cd", b"ef"] {
            let n = Pin::new(&mut c).poll_write(&mut cx, part);
            assert!(matches!(n, Poll::Ready(Ok(2))));
        }
        assert_eq!(c.inner.writes, 0, "nothing written before a flush");
        // The first flush yields (the task is woken again), the second writes.
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        assert_eq!(
            (c.inner.writes, woken()),
            (0, 1),
            "yielded, and woke the task"
        );
        assert!(matches!(
            Pin::new(&mut c).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!((c.inner.writes, &c.inner.written[..]), (1, &b"abcdef"[..]));
        // Nothing kept: a flush does not yield.
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_ready());
        // The next batch yields again.
        let _ = Pin::new(&mut c).poll_write(&mut cx, b"g");
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
    }

    #[test]
    fn bulk_writes_go_straight_through_and_keep_their_order() {
        let mut c = Coalesce::new(Counting::default());
        let mut cx = Context::from_waker(Waker::noop());
        let _ = Pin::new(&mut c).poll_write(&mut cx, b"head");
        let bulk = vec![7u8; PASS_THROUGH];
        let n = Pin::new(&mut c).poll_write(&mut cx, &bulk);
        assert!(matches!(n, Poll::Ready(Ok(len)) if len == PASS_THROUGH));
        assert_eq!(c.inner.writes, 2, "what was kept, then the bulk write");
        assert_eq!(&c.inner.written[..4], b"head");
        assert_eq!(c.inner.written.len(), 4 + PASS_THROUGH);
        assert!(c.kept.is_empty());
        // Small writes up to the cap are kept; one more goes out with them.
        let small = vec![1u8; PASS_THROUGH - 1];
        for _ in 0..MAX_KEPT_BYTES / (PASS_THROUGH - 1) {
            let _ = Pin::new(&mut c).poll_write(&mut cx, &small);
        }
        assert_eq!(c.inner.writes, 2);
        let _ = Pin::new(&mut c).poll_write(&mut cx, &small);
        assert_eq!(
            c.inner.writes, 3,
            "the cap was reached: what was kept went out"
        );
        // The burst's buffer was freed once written out: only the last write is held.
        assert_eq!(c.kept.len(), small.len());
        assert!(c.kept.capacity() <= KEEP_CAPACITY, "{}", c.kept.capacity());
    }

    #[tokio::test]
    async fn bytes_arrive_in_order_through_a_real_stream() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut c = Coalesce::new(a);
        let mut sent = Vec::new();
        for i in 0..1000u32 {
            let part = i.to_be_bytes().repeat((i % 7 + 1) as usize);
            c.write_all(&part).await.unwrap();
            sent.extend_from_slice(&part);
            if i % 100 == 0 {
                c.flush().await.unwrap();
            }
        }
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, sent);
    }
}
