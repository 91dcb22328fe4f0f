//! One HTTP/1.1 request and its answer on a carried stream (`carried`), from the source's side.
//!
//! hyper's client would run a task per stream, hand it each request and each answer back over
//! channels (two more task wake-ups per request, often on the other core), and copy every write
//! into a frame. Here the request's own task writes the head and the body straight into DATA
//! frames and parses the answer's head once (`httparse`); the answer's body is handed on as its
//! frames arrive, sliced, not copied. `relay` is the other end: it gives each request exactly one
//! answer, and a stream that cannot stay in step (an answer saying `connection: close`, a body not
//! sent or not read to its end) is not used again.
use std::{
    fmt::Write as _,
    mem::MaybeUninit,
    pin::Pin,
    task::{Context, Poll, Waker, ready},
};

use bytes::{Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header,
    request::Parts,
};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;

use super::{
    body::{Body, BoxError, SendError, boxed, send_data, send_head},
    h1frame::{self, BodyKind, Chunked, Decoded, FrameError},
    h1frame::{MAX_FIELDS, MAX_HEAD, says_close, write_fields, write_request_head},
    respond::ProxyError,
};
use crate::proxy::tunnel::Tunnel;

/// Chunk data up to this size is copied in with its size line: one frame instead of three.
const COPY_CHUNK: usize = 1024;

/// Takes a stream back once its exchange ended in step, for the next request.
pub trait Reuse: Send + Sync + Unpin + 'static {
    fn reuse(self, t: Tunnel);
}

/// Why an exchange failed.
pub enum Failed<R> {
    /// The stream had ended before anything was sent: the request can go on another one.
    NotSent(Box<Request<Body>>, R),
    /// The request went (maybe in part) and no answer came.
    Sent(ProxyError),
}

/// Whether an idle stream can take a request: the destination has not ended or reset it, and
/// sent nothing nobody asked for.
pub fn idle_ok(t: &mut Tunnel) -> bool {
    // A waker that does nothing: this only asks, the next real poll registers its own. The
    // receiving half alone answers (a reset fails it too): each poll takes the tunnel
    // connection's lock, which its other streams and its driver take as well.
    let mut cx = Context::from_waker(Waker::noop());
    t.recv.poll_data(&mut cx).is_pending()
}

/// Ends our side of a stream that will not be used again.
pub fn close(mut t: Tunnel) {
    let _ = t.send.send_data(Bytes::new(), true);
}

/// Sends `req` (ready for HTTP/1.1: origin-form, no hop-by-hop fields) on `t` and reads the
/// answer's head. `reuse` gets the stream back when the answer's body has been read to its end
/// and the stream is still in step.
pub async fn exchange<R: Reuse>(
    mut t: Tunnel,
    req: Request<Body>,
    reuse: R,
) -> Result<Response<Body>, Failed<R>> {
    let (mut parts, mut body) = req.into_parts();
    let framing = match framing(&mut parts, &body) {
        Ok(f) => f,
        Err(e) => return Err(Failed::Sent(e)),
    };
    let mut out = BytesMut::with_capacity(512);
    write_request_head(&mut out, &parts.method, &parts.uri, &parts.headers);
    if send_head(&mut t.send, out.freeze()).is_err() {
        return Err(Failed::NotSent(
            Box::new(Request::from_parts(parts, body)),
            reuse,
        ));
    }
    let head_request = parts.method == Method::HEAD;
    let mut body_sent = framing == BodyKind::None;
    let head = {
        let read = read_head(&mut t.recv, head_request);
        if body_sent {
            read.await
        } else {
            // The answer can come before the body is all sent (a refusal, a failed pod): then
            // the rest is not sent, and the stream is not used again.
            let write = write_body(&mut t.send, &mut body, framing);
            tokio::pin!(read, write);
            tokio::select! {
                biased;
                head = &mut read => head,
                w = &mut write => match w {
                    Ok(()) => {
                        body_sent = true;
                        read.await
                    }
                    Err(WriteError::App(e)) => {
                        return Err(Failed::Sent(ProxyError::Reset(format!("request body: {e}"))));
                    }
                    // The destination ended the stream: its answer (or the reason) follows.
                    Err(WriteError::Stream) => read.await,
                },
            }
        }
    };
    let Head {
        resp,
        kind,
        close,
        rest,
    } = match head {
        Ok(h) => h,
        // A stream that ended between requests (its destination drains, or it was idle too
        // long): with no body, nothing of the request is lost, and it goes again elsewhere.
        Err(NoHead::Unread) if matches!(framing, BodyKind::None | BodyKind::Length(0)) => {
            return Err(Failed::NotSent(
                Box::new(Request::from_parts(parts, body)),
                reuse,
            ));
        }
        Err(NoHead::Unread) => {
            return Err(Failed::Sent(reset("ended before the answer")));
        }
        Err(NoHead::Failed(e)) => return Err(Failed::Sent(e)),
    };
    let left = match kind {
        BodyKind::None | BodyKind::Length(0) => Left::Done,
        BodyKind::Length(n) => Left::Length(n),
        BodyKind::Chunked => Left::Chunked(Chunked::decoder()),
        BodyKind::UntilClose => Left::UntilClose,
    };
    let in_step = body_sent && !close && kind != BodyKind::UntilClose;
    let mut answer = Answer {
        tunnel: Some(t),
        buf: rest,
        left,
        reuse: in_step.then_some(reuse),
    };
    if matches!(answer.left, Left::Done) {
        answer.finish();
    }
    Ok(resp.map(|()| boxed(answer)))
}

/// How the request's body is delimited on the stream. `to_http1` took `Transfer-Encoding` off:
/// a declared length stays, else the body's own size decides, else it is chunked.
fn framing(parts: &mut Parts, body: &Body) -> Result<BodyKind, ProxyError> {
    let h = &mut parts.headers;
    if let Some(v) = h.get(header::CONTENT_LENGTH) {
        let n = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| ProxyError::BadRequest(format!("Content-Length {v:?}")))?;
        return Ok(if n == 0 {
            BodyKind::None
        } else {
            BodyKind::Length(n)
        });
    }
    if body.is_end_stream() {
        // What hyper's client sends: a length of 0 for methods that usually have a body.
        if [Method::POST, Method::PUT, Method::PATCH].contains(&parts.method) {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        return Ok(BodyKind::None);
    }
    if let Some(n) = body.size_hint().exact() {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        return Ok(BodyKind::Length(n));
    }
    h.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    Ok(BodyKind::Chunked)
}

enum WriteError {
    /// The app's body failed, or did not match its declared length.
    App(BoxError),
    /// The destination ended or reset the stream.
    Stream,
}

impl From<SendError> for WriteError {
    fn from(_: SendError) -> Self {
        Self::Stream
    }
}

/// Writes the request's body, framed as `kind` says.
async fn write_body(
    send: &mut h2::SendStream<Bytes>,
    body: &mut Body,
    kind: BodyKind,
) -> Result<(), WriteError> {
    let mut left = match kind {
        BodyKind::Length(n) => n,
        _ => 0,
    };
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(WriteError::App)?;
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(f) => {
                trailers = f.into_trailers().ok();
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        if kind != BodyKind::Chunked {
            left = left
                .checked_sub(data.len() as u64)
                .ok_or_else(|| WriteError::App("body longer than its Content-Length".into()))?;
            send_data(send, data, false).await?;
            continue;
        }
        let mut size = BytesMut::with_capacity(20 + data.len().min(COPY_CHUNK));
        let _ = write!(Out(&mut size), "{:x}\r\n", data.len());
        if data.len() <= COPY_CHUNK {
            size.extend_from_slice(&data);
            size.extend_from_slice(b"\r\n");
            send_data(send, size.freeze(), false).await?;
        } else {
            send_data(send, size.freeze(), false).await?;
            send_data(send, data, false).await?;
            send_data(send, Bytes::from_static(b"\r\n"), false).await?;
        }
    }
    match kind {
        BodyKind::Chunked => {
            let mut end = BytesMut::from(&b"0\r\n"[..]);
            if let Some(t) = &trailers {
                write_fields(&mut end, t.iter().map(|(n, v)| (n.as_str(), v.as_bytes())));
            }
            end.extend_from_slice(b"\r\n");
            send_data(send, end.freeze(), false).await?;
        }
        _ if left > 0 => {
            return Err(WriteError::App(
                "body shorter than its Content-Length".into(),
            ));
        }
        _ => {}
    }
    Ok(())
}

/// `fmt::Write` into a `BytesMut`.
struct Out<'a>(&'a mut BytesMut);

impl std::fmt::Write for Out<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// The answer's final head, and what came after it.
struct Head {
    resp: Response<()>,
    kind: BodyKind,
    /// The destination ends the stream after this answer.
    close: bool,
    /// The body's first bytes.
    rest: Bytes,
}

fn reset(what: impl std::fmt::Display) -> ProxyError {
    ProxyError::Reset(format!("carried stream: {what}"))
}

/// Why no answer head came.
enum NoHead {
    /// The stream ended, or was refused, before a byte of an answer: the destination never read
    /// the request (its relay ends a stream only between requests, see `relay::serve`).
    Unread,
    Failed(ProxyError),
}

impl From<ProxyError> for NoHead {
    fn from(e: ProxyError) -> Self {
        Self::Failed(e)
    }
}

/// Reads the answer's final head (1xx heads before it are dropped, as hyper's client does).
async fn read_head(recv: &mut h2::RecvStream, head_request: bool) -> Result<Head, NoHead> {
    let mut got_any = false;
    // Most heads come whole in one frame, parsed where they are; a head split across frames is
    // gathered first.
    let mut buf = Bytes::new();
    loop {
        if !buf.is_empty()
            && let Some((n, head)) = parse_head(&buf, head_request)?
        {
            let rest = buf.split_off(n);
            match head {
                Some((resp, kind, close)) => {
                    return Ok(Head {
                        resp,
                        kind,
                        close,
                        rest,
                    });
                }
                None => {
                    buf = rest;
                    continue;
                }
            }
        }
        if buf.len() > MAX_HEAD {
            return Err(reset(format!("answer head longer than {MAX_HEAD} bytes")).into());
        }
        let data = match recv.data().await {
            Some(Ok(d)) => d,
            Some(Err(e)) if !got_any && crate::proxy::tunnel::refused(&e) => {
                return Err(NoHead::Unread);
            }
            Some(Err(e)) => return Err(reset(e).into()),
            None if !got_any => return Err(NoHead::Unread),
            None => return Err(reset("ended before the answer").into()),
        };
        // The end of a stream can come as an empty frame: that is not an answer.
        got_any |= !data.is_empty();
        let _ = recv.flow_control().release_capacity(data.len());
        buf = if buf.is_empty() {
            data
        } else {
            let mut joined = BytesMut::with_capacity(buf.len() + data.len());
            joined.extend_from_slice(&buf);
            joined.extend_from_slice(&data);
            joined.freeze()
        };
    }
}

type Parsed = (Response<()>, BodyKind, bool);

/// A head at the front of `buf`: its length, and the response (`None` for a 1xx head).
fn parse_head(
    buf: &Bytes,
    head_request: bool,
) -> Result<Option<(usize, Option<Parsed>)>, ProxyError> {
    let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
    let (n, r) = match h1frame::parse_response(buf, &mut fields) {
        Ok(httparse::Status::Complete(parsed)) => parsed,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(reset(format!("answer head: {e}"))),
    };
    let code = r.code.unwrap_or_default();
    if (100..200).contains(&code) {
        if code == 101 {
            return Err(reset("101 without an upgrade"));
        }
        return Ok(Some((n, None)));
    }
    let kind = h1frame::response_body(r.version, code, head_request, r.headers)
        .map_err(|e: FrameError| reset(format!("answer framing: {e}")))?;
    let mut resp = Response::new(());
    *resp.status_mut() = StatusCode::from_u16(code).map_err(reset)?;
    let mut headers = HeaderMap::with_capacity(r.headers.len());
    let mut close = r.version == Some(0);
    for f in r.headers.iter() {
        // About the stream, not the app's connection.
        if f.name.eq_ignore_ascii_case("connection") {
            close |= says_close(f.value);
            continue;
        }
        if f.name.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        let name = HeaderName::from_bytes(f.name.as_bytes()).map_err(reset)?;
        let value = HeaderValue::from_maybe_shared(buf.slice_ref(f.value)).map_err(reset)?;
        headers.append(name, value);
    }
    *resp.headers_mut() = headers;
    Ok(Some((n, Some((resp, kind, close)))))
}

/// An answer as the source reads it off a carried stream, when `input` is all the stream holds
/// (see [`frame_answer`]).
#[cfg(any(test, feature = "fuzzing"))]
#[derive(Debug)]
pub struct FramedAnswer {
    pub status: u16,
    /// The body as handed to the app (chunked framing removed).
    pub body: Vec<u8>,
    /// Whether the stream would be used again: the answer ended in step with nothing after it.
    #[expect(dead_code, reason = "shown (Debug) in a fuzz target's crash report")]
    pub in_step: bool,
}

/// The final answer at the front of `input` (the whole of what a carried stream delivers), read
/// with the same head parser and body rules as [`exchange`]. For the fuzz targets.
#[cfg(any(test, feature = "fuzzing"))]
pub fn frame_answer(input: &[u8], head_request: bool) -> Result<FramedAnswer, String> {
    let mut buf = Bytes::copy_from_slice(input);
    let (resp, kind, close) = loop {
        match parse_head(&buf, head_request).map_err(|e| e.to_string())? {
            Some((n, Some(head))) => {
                buf = buf.split_off(n);
                break head;
            }
            Some((n, None)) => buf = buf.split_off(n),
            None => return Err("ended before the answer".into()),
        }
    };
    let mut body = Vec::new();
    match kind {
        BodyKind::None => {}
        BodyKind::Length(n) => {
            let n = usize::try_from(n).map_err(|e| e.to_string())?;
            if buf.len() < n {
                return Err(AnswerError::Cut.to_string());
            }
            body.extend_from_slice(&buf.split_to(n));
        }
        BodyKind::Chunked => {
            let mut c = Chunked::decoder();
            loop {
                match c.decode(&mut buf).map_err(|e| e.to_string())? {
                    Decoded::Data(d) => body.extend_from_slice(&d),
                    Decoded::End(_) => break,
                    Decoded::More => return Err(AnswerError::Cut.to_string()),
                }
            }
        }
        BodyKind::UntilClose => body.extend_from_slice(&std::mem::take(&mut buf)),
    }
    Ok(FramedAnswer {
        status: resp.status().as_u16(),
        body,
        in_step: !close && kind != BodyKind::UntilClose && buf.is_empty(),
    })
}

/// What is left of the answer's body.
enum Left {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

#[derive(Debug, thiserror::Error)]
enum AnswerError {
    #[error("carried stream")]
    Stream(#[source] h2::Error),
    #[error("the destination ended the stream inside an answer")]
    Cut,
    #[error("answer framing")]
    Framing(#[source] FrameError),
}

/// The answer's body, from the stream's frames; the stream goes back to `reuse` at its end.
struct Answer<R> {
    /// `None` once given back.
    tunnel: Option<Tunnel>,
    /// Received and not yet handed on.
    buf: Bytes,
    left: Left,
    /// `None`: the stream is not used again.
    reuse: Option<R>,
}

impl<R: Reuse> Answer<R> {
    /// The body ended: the stream goes back, or is closed.
    fn finish(&mut self) {
        self.left = Left::Done;
        let Some(t) = self.tunnel.take() else { return };
        match self.reuse.take() {
            // Bytes after the answer are nobody's: the stream is out of step.
            Some(r) if self.buf.is_empty() => r.reuse(t),
            _ => close(t),
        }
    }

    /// Receives the next frame into `buf`; `false` at the end of the stream.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, AnswerError>> {
        let Some(t) = self.tunnel.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        match ready!(t.recv.poll_data(cx)) {
            Some(Ok(d)) => {
                let _ = t.recv.flow_control().release_capacity(d.len());
                self.buf = d;
                Poll::Ready(Ok(true))
            }
            Some(Err(e)) => Poll::Ready(Err(AnswerError::Stream(e))),
            None => Poll::Ready(Ok(false)),
        }
    }
}

impl<R: Reuse> http_body::Body for Answer<R> {
    type Data = Bytes;
    type Error = AnswerError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, AnswerError>>> {
        let this = &mut *self;
        loop {
            match &mut this.left {
                Left::Done => return Poll::Ready(None),
                Left::Chunked(c) => match c.decode(&mut this.buf).map_err(AnswerError::Framing)? {
                    Decoded::Data(d) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                    Decoded::End(trailers) => {
                        this.finish();
                        if trailers.is_empty() {
                            return Poll::Ready(None);
                        }
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Decoded::More => {}
                },
                Left::Length(n) if !this.buf.is_empty() => {
                    let take = (*n).min(this.buf.len() as u64);
                    *n -= take;
                    let d = this.buf.split_to(take as usize);
                    if *n == 0 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Left::UntilClose if !this.buf.is_empty() => {
                    let d = std::mem::take(&mut this.buf);
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Left::Length(_) | Left::UntilClose => {}
            }
            if !ready!(this.fill(cx))? {
                if matches!(this.left, Left::UntilClose) {
                    this.finish();
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(AnswerError::Cut)));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.left, Left::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Left::Length(n) => SizeHint::with_exact(n),
            Left::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        convert::Infallible,
        sync::{
            Arc, Mutex,
            atomic::{AtomicUsize, Ordering::Relaxed},
        },
    };

    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    use super::*;
    use crate::http::{body::full, relay};

    /// A carried stream over an in-memory HTTP/2 connection: the source's end, the destination's,
    /// and the client handle that keeps the connection up.
    async fn pair() -> (Tunnel, Tunnel, h2::client::SendRequest<Bytes>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let dst = tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond.send_response(Response::new(()), false).unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            Tunnel {
                send,
                recv: req.into_body(),
            }
        });
        let (client, conn) = h2::client::handshake(a).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let connect = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (resp, send) = client.send_request(connect, false).unwrap();
        let dst = dst.await.unwrap();
        let recv = resp.await.unwrap().into_body();
        (Tunnel { send, recv }, dst, client)
    }

    /// Where a stream goes back to, in a test.
    #[derive(Clone, Default)]
    struct Keep(Arc<Mutex<Option<Tunnel>>>);

    impl Reuse for Keep {
        fn reuse(self, t: Tunnel) {
            *self.0.lock().unwrap() = Some(t);
        }
    }

    impl Keep {
        fn take(&self) -> Option<Tunnel> {
            self.0.lock().unwrap().take()
        }
    }

    /// A body of these frames, whose size is not known up front (so it goes chunked).
    struct Frames(VecDeque<Frame<Bytes>>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn trailers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(*n, HeaderValue::from_static(v));
        }
        h
    }

    fn request(method: Method, path: &str, body: Body) -> Request<Body> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "pod")
            .body(body)
            .unwrap();
        req.headers_mut()
            .insert("te", HeaderValue::from_static("trailers"));
        req
    }

    /// What an answer came to: status, body, trailers.
    async fn read(resp: Response<Body>) -> (u16, Vec<u8>, HeaderMap) {
        let status = resp.status().as_u16();
        let all = resp.into_body().collect().await.unwrap();
        let t = all.trailers().cloned().unwrap_or_default();
        (status, all.to_bytes().to_vec(), t)
    }

    /// The pod: hyper's HTTP/1.1 server, an implementation of its own to check our framing.
    async fn pod(io: tokio::io::DuplexStream) {
        let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
            let path = req.uri().path().to_string();
            let resp: Response<Body> = match path.as_str() {
                "/len" => Response::new(full("hello")),
                "/empty" => Response::builder().status(204).body(full("")).unwrap(),
                "/chunked" => {
                    let frames = VecDeque::from([
                        Frame::data(Bytes::from_static(b"ab")),
                        Frame::data(Bytes::from_static(b"cd")),
                        Frame::trailers(trailers(&[("x-t", "1")])),
                    ]);
                    let mut resp = Response::new(boxed(Frames(frames)));
                    resp.headers_mut()
                        .insert("trailer", HeaderValue::from_static("x-t"));
                    resp
                }
                _ => {
                    // Echo: the body, the request's framing and its trailers.
                    let framing = if req.headers().contains_key("content-length") {
                        "length"
                    } else if req.headers().contains_key("transfer-encoding") {
                        "chunked"
                    } else {
                        "none"
                    };
                    let all = req.into_body().collect().await.unwrap();
                    let t = all.trailers().and_then(|t| t.get("x-t")).cloned();
                    let mut resp = Response::new(boxed(Full::new(all.to_bytes())));
                    let h = resp.headers_mut();
                    h.insert("x-framing", HeaderValue::from_static(framing));
                    if let Some(t) = t {
                        h.insert("x-trailer", t);
                    }
                    resp
                }
            };
            Ok::<_, Infallible>(resp)
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), svc)
            .await;
    }

    struct Open;

    impl relay::Gate for Open {
        type Ticket = ();
        fn admit(
            &self,
            _: &mut Request<()>,
            _: Option<&HeaderValue>,
        ) -> ((), Result<(), ProxyError>) {
            ((), Ok(()))
        }
        fn finish(&self, _: (), _: u16, _: Option<crate::http::respond::Flag>, _: (u64, u64)) {}
    }

    #[tokio::test]
    async fn requests_round_trip_through_the_relay_on_one_stream() {
        let (src, mut dst, _client) = pair().await;
        let dials = Arc::new(AtomicUsize::new(0));
        let d = dials.clone();
        tokio::spawn(async move {
            let dial = move || {
                d.fetch_add(1, Relaxed);
                async {
                    let (a, b) = tokio::io::duplex(1 << 16);
                    tokio::spawn(pod(b));
                    Ok::<_, ProxyError>(a)
                }
            };
            relay::serve(
                &mut dst,
                &Open,
                dial,
                &crate::proxy::drain::Drain::new().watch(),
            )
            .await
        });
        let chunked = || {
            let frames = VecDeque::from([
                Frame::data(Bytes::from(vec![b'x'; 3000])),
                Frame::data(Bytes::from_static(b"yz")),
                Frame::trailers(trailers(&[("x-t", "7")])),
            ]);
            boxed(Frames(frames))
        };
        type Want = (u16, Vec<u8>, &'static [(&'static str, &'static str)]);
        let cases: Vec<(Request<Body>, Want)> = vec![
            (
                request(Method::GET, "/len", full("")),
                (200, b"hello".to_vec(), &[]),
            ),
            (
                request(Method::POST, "/echo", full("abc")),
                (200, b"abc".to_vec(), &[("x-framing", "length")]),
            ),
            (
                request(Method::POST, "/echo", chunked()),
                (
                    200,
                    [vec![b'x'; 3000], b"yz".to_vec()].concat(),
                    &[("x-framing", "chunked"), ("x-trailer", "7")],
                ),
            ),
            (
                request(Method::GET, "/echo", full("")),
                (200, vec![], &[("x-framing", "none")]),
            ),
            (
                request(Method::GET, "/chunked", full("")),
                (200, b"abcd".to_vec(), &[]),
            ),
            (request(Method::GET, "/empty", full("")), (204, vec![], &[])),
            (request(Method::HEAD, "/len", full("")), (200, vec![], &[])),
        ];
        let keep = Keep::default();
        let mut stream = Some(src);
        for (req, (status, body, headers)) in cases {
            let what = format!("{} {}", req.method(), req.uri());
            let t = stream.take().expect("the stream came back");
            let Ok(resp) = exchange(t, req, keep.clone()).await else {
                panic!("{what}: failed");
            };
            let h = resp.headers().clone();
            let chunked_answer = what.ends_with("/chunked");
            let (got_status, got_body, got_trailers) = read(resp).await;
            assert_eq!((got_status, &got_body), (status, &body), "{what}");
            for (n, v) in headers {
                assert_eq!(
                    h.get(*n).map(|v| v.to_str().unwrap()),
                    Some(*v),
                    "{what} {n}"
                );
            }
            if chunked_answer {
                assert_eq!(got_trailers.get("x-t").unwrap(), "1", "{what}");
            }
            stream = keep.take();
            assert!(stream.is_some(), "{what}: the stream was not given back");
        }
        assert_eq!(dials.load(Relaxed), 1, "one pod connection for all of them");
    }

    /// Runs `answer` (raw bytes, in `pieces`) as the destination's reply to one request on a new
    /// stream; returns the answer as the source sees it, whether the stream came back, and the
    /// destination's end.
    async fn scripted(
        req: Request<Body>,
        pieces: Vec<Bytes>,
        end: bool,
    ) -> (Result<(u16, Vec<u8>, HeaderMap), String>, bool, Tunnel) {
        let (src, mut dst, client) = pair().await;
        let script = tokio::spawn(async move {
            // The request's head first, as the relay would.
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let d = dst.recv.data().await.unwrap().unwrap();
                let _ = dst.recv.flow_control().release_capacity(d.len());
                got.extend_from_slice(&d);
            }
            for p in pieces {
                dst.send.send_data(p, false).unwrap();
            }
            if end {
                dst.send.send_data(Bytes::new(), true).unwrap();
            }
            dst
        });
        let keep = Keep::default();
        let got = match exchange(src, req, keep.clone()).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match resp.into_body().collect().await {
                    Ok(all) => {
                        let t = all.trailers().cloned().unwrap_or_default();
                        Ok((status, all.to_bytes().to_vec(), t))
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(Failed::Sent(e)) => Err(e.to_string()),
            Err(Failed::NotSent(..)) => Err("not sent".into()),
        };
        let dst = script.await.unwrap();
        drop(client);
        (got, keep.take().is_some(), dst)
    }

    fn get() -> Request<Body> {
        request(Method::GET, "/", full(""))
    }

    #[tokio::test]
    async fn answers_split_anywhere_are_read_whole() {
        let answer: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nx-a: 1\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 2\r\n\r\n";
        for cut in 1..answer.len() {
            let pieces = vec![
                Bytes::copy_from_slice(&answer[..cut]),
                Bytes::copy_from_slice(&answer[cut..]),
            ];
            let (got, kept, _) = scripted(get(), pieces, false).await;
            let (status, body, t) = got.unwrap_or_else(|e| panic!("cut {cut}: {e}"));
            assert_eq!(
                (status, body.as_slice()),
                (200, &b"hello world"[..]),
                "cut {cut}"
            );
            assert_eq!(t.get("x-t").unwrap(), "2", "cut {cut}");
            assert!(kept, "cut {cut}: the stream was not given back");
        }
    }

    #[tokio::test]
    async fn streams_out_of_step_are_not_kept() {
        let b = |s: &'static str| vec![Bytes::from_static(s.as_bytes())];
        // (answer, the destination ends the stream, the body the source reads or the error)
        type Case = (
            &'static str,
            bool,
            Result<&'static [u8], &'static str>,
            bool,
        );
        let cases: &[Case] = &[
            // In step: kept.
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                false,
                Ok(b"ok"),
                true,
            ),
            // The destination says it ends the stream after this answer.
            (
                "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 2\r\nconnection: close\r\n\r\nno",
                true,
                Ok(b"no"),
                false,
            ),
            // A body delimited by the end of the stream.
            (
                "HTTP/1.1 200 OK\r\n\r\nuntil the end",
                true,
                Ok(b"until the end"),
                false,
            ),
            // Bytes after the answer that nobody asked for.
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1",
                false,
                Ok(b"ok"),
                false,
            ),
            // Cut inside the body: an error, never a short body that looks whole.
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
                true,
                Err("inside an answer"),
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n",
                true,
                Err("inside an answer"),
                false,
            ),
            // No answer at all: the destination never read it, so it goes again elsewhere.
            ("", true, Err("not sent"), false),
            (
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
                true,
                Err("101"),
                false,
            ),
        ];
        for (answer, end, want, want_kept) in cases {
            let (got, kept, _) = scripted(get(), b(answer), *end).await;
            match (want, &got) {
                (Ok(body), Ok((_, got_body, _))) => assert_eq!(got_body, body, "{answer:?}"),
                (Err(needle), Err(e)) => assert!(e.contains(needle), "{answer:?}: {e}"),
                _ => panic!("{answer:?}: got {got:?}, want {want:?}"),
            }
            assert_eq!(kept, *want_kept, "{answer:?}");
        }
    }

    #[tokio::test]
    async fn an_answer_dropped_early_resets_the_stream() {
        let (src, mut dst, _client) = pair().await;
        let keep = Keep::default();
        let script = tokio::spawn(async move {
            let _ = dst.recv.data().await;
            let head = "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npart";
            dst.send
                .send_data(Bytes::from_static(head.as_bytes()), false)
                .unwrap();
            // The source gave up on the stream: reset, not ended.
            poll_fn_reset(&mut dst).await
        });
        let resp = exchange(src, get(), keep.clone()).await.ok().unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "part");
        drop(body);
        assert_eq!(script.await.unwrap(), Some(h2::Reason::CANCEL));
        assert!(keep.take().is_none());
    }

    async fn poll_fn_reset(t: &mut Tunnel) -> Option<h2::Reason> {
        std::future::poll_fn(|cx| t.send.poll_reset(cx)).await.ok()
    }

    #[tokio::test]
    async fn an_ended_stream_is_not_used() {
        // Ended by the destination while idle: seen before use.
        let (mut src, mut dst, _client) = pair().await;
        assert!(idle_ok(&mut src));
        dst.send.send_data(Bytes::new(), true).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!idle_ok(&mut src));
        // Reset: seen before use, and the request comes back untouched, to go on another stream.
        let (mut src, mut dst, _client) = pair().await;
        dst.send.send_reset(h2::Reason::CANCEL);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!idle_ok(&mut src));
        match exchange(
            src,
            request(Method::POST, "/x", full("body")),
            Keep::default(),
        )
        .await
        {
            Err(Failed::NotSent(req, _)) => {
                assert_eq!((req.method(), req.uri().path()), (&Method::POST, "/x"));
                let body = req.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, "body");
            }
            _ => panic!("a reset stream took the request"),
        }
    }

    #[tokio::test]
    async fn a_stream_that_ends_unanswered_gives_a_bodiless_request_back() {
        // (how the destination ends the stream after the request went out, the request, whether
        // it comes back to go elsewhere)
        for (end, method, body, back) in [
            // A draining relay ends the stream between requests: it never read this one.
            ("end", Method::GET, "", true),
            // A draining peer's final GOAWAY, or its refusal, named streams before this one.
            ("refused", Method::GET, "", true),
            // A body went with it (perhaps in part): it cannot go again.
            ("end", Method::POST, "body", false),
            // Other resets may come after the destination read the request: not sent again.
            ("cancel", Method::GET, "", false),
        ] {
            let (src, mut dst, _client) = pair().await;
            let answer = tokio::spawn(exchange(
                src,
                request(method.clone(), "/x", full(body)),
                Keep::default(),
            ));
            // The request's head reached the destination before it ended the stream.
            assert!(dst.recv.data().await.is_some(), "{end}");
            match end {
                "end" => dst.send.send_data(Bytes::new(), true).unwrap(),
                "refused" => dst.send.send_reset(h2::Reason::REFUSED_STREAM),
                _ => dst.send.send_reset(h2::Reason::CANCEL),
            }
            let at = format!("{end} {method}");
            match (answer.await.unwrap(), back) {
                (Err(Failed::NotSent(req, _)), true) => {
                    assert_eq!(req.method(), method, "{at}");
                }
                (Err(Failed::Sent(_)), false) => {}
                (Err(Failed::NotSent(..)), false) => panic!("{at}: sent again"),
                (Err(Failed::Sent(e)), true) => panic!("{at}: failed: {e}"),
                (Ok(_), _) => panic!("{at}: answered"),
            }
        }
    }
}
