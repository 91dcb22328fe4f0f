//! A tunnel stream as a byte stream (`AsyncRead` + `AsyncWrite`), for a protocol run inside one
//! CONNECT stream: HTTP/1.1 between node proxies (see `l7::carried`).
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::hbone::Tunnel;

pub struct TunnelIo {
    tunnel: Tunnel,
    /// What is left of the last DATA frame after a read smaller than it.
    unread: Bytes,
    write_closed: bool,
}

impl TunnelIo {
    pub fn new(tunnel: Tunnel) -> Self {
        Self {
            tunnel,
            unread: Bytes::new(),
            write_closed: false,
        }
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::ErrorKind::Other.into());
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.unread.is_empty() {
            match ready!(self.tunnel.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The frame is ours now: the peer may send the next one while we copy it.
                    let _ = self.tunnel.recv.flow_control().release_capacity(data.len());
                    self.unread = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                // The peer ended the stream: end of file.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(self.unread.len());
        buf.put_slice(&self.unread.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let send = &mut self.tunnel.send;
        send.reserve_capacity(buf.len());
        let mut cap = send.capacity();
        while cap == 0 {
            cap = match ready!(send.poll_capacity(cx)) {
                Some(Ok(c)) => c,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            };
        }
        let n = cap.min(buf.len());
        send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Sent frames are h2's to write: there is nothing buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.tunnel
                .send
                .send_data(Bytes::new(), true)
                .map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}
