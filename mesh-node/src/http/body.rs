//! Bodies: one boxed type through the proxy; an HTTP/2 receive stream seen as a body; a body sent
//! on an HTTP/2 stream within flow control; and a body recorded as it streams so a retry or a
//! mirror can replay it.
use mesh_api::sync::LockExt;
use std::{
    future::poll_fn,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Bodies larger than this are not kept for replay: such a request is tried once.
pub const REPLAY_LIMIT: usize = 64 * 1024;

pub fn boxed<B>(b: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed()
}

pub fn empty() -> Body {
    boxed(Empty::new())
}

pub fn full(b: impl Into<Bytes>) -> Body {
    boxed(Full::new(b.into()))
}

/// An HTTP/2 stream's data and trailers. Flow-control capacity is released as each frame is handed
/// on, so the peer's window follows what the consumer takes.
pub struct RecvBody {
    recv: h2::RecvStream,
    data_done: bool,
}

impl RecvBody {
    pub fn new(recv: h2::RecvStream) -> Self {
        Self {
            recv,
            data_done: false,
        }
    }
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(b)) => {
                    let _ = self.recv.flow_control().release_capacity(b.len());
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// Sends `body` on `send`: data as the peer's window allows, then trailers or end of stream. An
/// error from the body resets the stream.
pub async fn send_body(mut body: Body, send: &mut h2::SendStream<Bytes>) -> Result<(), BoxError> {
    loop {
        let frame = match body.frame().await {
            None => {
                send.send_data(Bytes::new(), true)?;
                return Ok(());
            }
            Some(Err(e)) => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(e);
            }
            Some(Ok(f)) => f,
        };
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    send.send_trailers(t)?;
                    return Ok(());
                }
                continue;
            }
        };
        // A body that knows it is complete (a declared length read to the end) ends the stream
        // with its last data frame: no empty frame after it for both proxies to handle.
        let last = body.is_end_stream();
        if last && data.is_empty() {
            send.send_data(data, true)?;
            return Ok(());
        }
        send_data(send, data, last).await?;
        if last {
            return Ok(());
        }
    }
}

/// Why data could not be sent on an HTTP/2 stream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Stream(#[from] h2::Error),
    #[error("stream closed by the peer")]
    Closed,
}

/// Sends a message's head (with what of its body came with it) without waiting for the peer's
/// window: h2 queues it and asks for the capacity itself. One lock of the tunnel connection
/// instead of three. Only for the first write of each message: a head is bounded, and the next
/// message's waits for this one's answer, so what queues is bounded too; bodies go through
/// [`send_data`], which waits for the window.
pub fn send_head(send: &mut h2::SendStream<Bytes>, data: Bytes) -> Result<(), SendError> {
    Ok(send.send_data(data, false)?)
}

/// Sends `data` on `send` as the peer's window allows, ending the stream with its last part if
/// `end`.
pub async fn send_data(
    send: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), SendError> {
    if data.is_empty() {
        if end {
            send.send_data(data, true)?;
        }
        return Ok(());
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let mut cap = send.capacity();
        while cap == 0 {
            cap = poll_fn(|cx| send.poll_capacity(cx))
                .await
                .ok_or(SendError::Closed)??;
        }
        let part = data.split_to(cap.min(data.len()));
        send.send_data(part, end && data.is_empty())?;
    }
    Ok(())
}

/// What a recording body has seen so far.
#[derive(Debug, Default)]
struct Recorded {
    data: BytesMut,
    trailers: Option<HeaderMap>,
    complete: bool,
    /// Past the limit: not replayable.
    overflow: bool,
}

/// A handle to replay a request body recorded by [`Recording`].
#[derive(Clone, Debug, Default)]
pub struct Replay(Arc<Mutex<Recorded>>);

impl Replay {
    /// The body again, if it was seen whole and within the limit.
    pub fn body(&self) -> Option<Body> {
        let r = self.0.locked();
        if !r.complete || r.overflow {
            return None;
        }
        let data = r.data.clone().freeze();
        let trailers = r.trailers.clone();
        let body = Full::new(data).map_err(|never| match never {});
        Some(match trailers {
            Some(t) => boxed(body.with_trailers(async move { Some(Ok(t)) })),
            None => boxed(body),
        })
    }
}

/// Passes a body through, keeping a copy (up to [`REPLAY_LIMIT`]) for [`Replay`].
pub struct Recording {
    inner: Body,
    rec: Replay,
}

impl Recording {
    pub fn new(inner: Body) -> (Self, Replay) {
        let rec = Replay::default();
        if inner.is_end_stream() {
            rec.0.locked().complete = true;
        }
        (
            Self {
                inner,
                rec: rec.clone(),
            },
            rec,
        )
    }
}

impl http_body::Body for Recording {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        // A reader may stop at the last frame without asking for the end (`send_body` does).
        let ended = self.inner.is_end_stream();
        let mut r = self.rec.0.locked();
        match &frame {
            None => r.complete = true,
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    if r.data.len() + d.len() > REPLAY_LIMIT {
                        r.overflow = true;
                        r.data = BytesMut::new();
                    } else if !r.overflow {
                        r.data.extend_from_slice(d);
                    }
                    r.complete |= ended;
                } else if let Some(t) = f.trailers_ref() {
                    r.trailers = Some(t.clone());
                    r.complete = true;
                }
            }
            Some(Err(_)) => r.overflow = true,
        }
        drop(r);
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn recording_replays_small_bodies_only() {
        let (rec, replay) = Recording::new(full("hello"));
        assert!(replay.body().is_none(), "not seen whole yet");
        let got = rec.collect().await.unwrap().to_bytes();
        assert_eq!(got, "hello");
        let again = replay.body().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(again, "hello");

        let (rec, replay) = Recording::new(full(vec![7u8; REPLAY_LIMIT + 1]));
        assert_eq!(
            rec.collect().await.unwrap().to_bytes().len(),
            REPLAY_LIMIT + 1
        );
        assert!(replay.body().is_none());

        let (_, replay) = Recording::new(empty());
        assert!(
            replay.body().is_some(),
            "an empty body is whole from the start"
        );
    }

    /// What a stream carried, as (frame type, flags) per frame on stream 1, read from the bytes
    /// one side wrote (HTTP/2 frame headers: 24-bit length, type, flags, stream id).
    fn frames_on_stream_1(mut wire: &[u8]) -> Vec<(u8, u8)> {
        let mut frames = Vec::new();
        while wire.len() >= 9 {
            let len = u32::from_be_bytes([0, wire[0], wire[1], wire[2]]) as usize;
            let stream = u32::from_be_bytes([wire[5], wire[6], wire[7], wire[8]]) & 0x7fff_ffff;
            if stream == 1 {
                frames.push((wire[3], wire[4]));
            }
            wire = &wire[(9 + len).min(wire.len())..];
        }
        frames
    }

    /// The server's half of an in-memory connection, with everything it writes kept.
    struct Tee {
        io: tokio::io::DuplexStream,
        seen: Arc<Mutex<Vec<u8>>>,
    }

    impl tokio::io::AsyncRead for Tee {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for Tee {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
            self.seen.lock().unwrap().extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// Sends `body` as a response with [`send_body`]; returns the body the client read and the
    /// server's frames on the stream.
    async fn respond_with(body: Body) -> (Bytes, Vec<(u8, u8)>) {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tee = Tee {
            io: server_io,
            seen: seen.clone(),
        };
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(tee).await.unwrap();
            let (_req, mut respond) = conn.accept().await.unwrap().unwrap();
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            let sent = send_body(body, &mut send);
            // The connection makes progress only while it is polled.
            tokio::select! {
                r = sent => r.unwrap(),
                _ = conn.accept() => panic!("the connection ended first"),
            }
            while conn.accept().await.is_some() {}
        });
        let (mut client, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::get("http://pod/").body(()).unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        let got = RecvBody::new(resp.await.unwrap().into_body())
            .collect()
            .await
            .unwrap()
            .to_bytes();
        drop(client);
        server.await.unwrap();
        let wire = seen.lock().unwrap().clone();
        (got, frames_on_stream_1(&wire))
    }

    #[tokio::test]
    async fn a_body_that_knows_its_end_ends_the_stream_with_its_last_data_frame() {
        const DATA: u8 = 0;
        const HEADERS: u8 = 1;
        const END_STREAM: u8 = 1;
        let data_frames = |frames: &[(u8, u8)]| -> Vec<u8> {
            frames
                .iter()
                .filter(|(t, _)| *t == DATA)
                .map(|(_, f)| f & END_STREAM)
                .collect()
        };
        // (body, data frames' END_STREAM flags): one frame that ends the stream when the body
        // knows it is done after its data; an empty closing frame only when it cannot know.
        let (got, frames) = respond_with(full("hello")).await;
        assert_eq!(got, "hello");
        assert_eq!(frames.first().map(|f| f.0), Some(HEADERS));
        assert_eq!(data_frames(&frames), [END_STREAM], "{frames:?}");

        let (got, frames) = respond_with(empty()).await;
        assert_eq!(got, "");
        assert_eq!(data_frames(&frames), [END_STREAM], "{frames:?}");

        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        tx.send(Ok(Frame::data(Bytes::from_static(b"chunk"))))
            .await
            .unwrap();
        drop(tx);
        let streaming = boxed(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ));
        let (got, frames) = respond_with(streaming).await;
        assert_eq!(got, "chunk");
        assert_eq!(data_frames(&frames), [0, END_STREAM], "{frames:?}");
    }
}
