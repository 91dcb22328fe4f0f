//! The proxy's end of a connection with a local pod: a `TcpStream` whose reads are published to
//! the kernel's acceleration program (see the parent module). Without acceleration it is just
//! the stream.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::BufMut;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use super::slots::ReadCount;

pub struct PodStream {
    tcp: TcpStream,
    reads: Option<ReadCount>,
}

impl PodStream {
    /// Not accelerated: reads are not counted.
    pub fn plain(tcp: TcpStream) -> Self {
        Self { tcp, reads: None }
    }

    pub(super) fn counted(tcp: TcpStream, reads: ReadCount) -> Self {
        Self {
            tcp,
            reads: Some(reads),
        }
    }

    /// The socket, for what reading and writing do not cover (peeking, addresses, options).
    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn is_accelerated(&self) -> bool {
        self.reads.is_some()
    }

    /// The two directions, for tasks that drive them apart. Reads stay counted.
    pub fn into_split(self) -> (PodReadHalf, OwnedWriteHalf) {
        let (rd, wr) = self.tcp.into_split();
        (
            PodReadHalf {
                rd,
                reads: self.reads,
            },
            wr,
        )
    }
}

fn poll_counted<R: AsyncRead + Unpin>(
    io: &mut R,
    reads: Option<&ReadCount>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    let before = buf.filled().len();
    ready!(Pin::new(io).poll_read(cx, buf))?;
    if let Some(r) = reads {
        r.add(buf.filled().len() - before);
    }
    Poll::Ready(Ok(()))
}

impl From<TcpStream> for PodStream {
    fn from(tcp: TcpStream) -> Self {
        Self::plain(tcp)
    }
}

impl AsyncRead for PodStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        poll_counted(&mut this.tcp, this.reads.as_ref(), cx, buf)
    }
}

impl AsyncWrite for PodStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// The reading half of a [`PodStream`].
pub struct PodReadHalf {
    rd: OwnedReadHalf,
    reads: Option<ReadCount>,
}

impl PodReadHalf {
    pub async fn readable(&self) -> io::Result<()> {
        self.rd.readable().await
    }

    /// Reads what is there without waiting (`WouldBlock` when nothing is).
    pub fn try_read_buf<B: BufMut>(&mut self, buf: &mut B) -> io::Result<usize> {
        let n = self.rd.try_read_buf(buf)?;
        if let Some(r) = &self.reads {
            r.add(n);
        }
        Ok(n)
    }
}

impl AsyncRead for PodReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        poll_counted(&mut this.rd, this.reads.as_ref(), cx, buf)
    }
}
