//! The destination's side of a carried stream (`carried`): HTTP/1.1 requests from another node's
//! proxy, relayed to a connection to the pod that is paired with the stream.
//!
//! hyper would decode each message into header maps, encode it again for the pod and back, and
//! run a task per pod connection. For the small requests most services serve, that was about
//! 7-8 us of the HTTP path's 45-55 us per request (`cargo xtask bench`, README "Open work").
//! Here each head is parsed once (`httparse`), authorized and recorded like any L7 request
//! ([`Gate`], `HttpInbound` in production), and the bytes go on as they came: `h1frame` finds
//! where each body ends without decoding it.
//!
//! The stream stays in step with the source's HTTP/1.1 client: each request gets exactly one
//! answer. Where that cannot be promised (a pod that failed inside a message, a request whose
//! body was not read to its end) the answer says `connection: close` or the stream is reset;
//! nothing is guessed.
use std::{
    future::{Future, poll_fn},
    io,
    mem::MaybeUninit,
    pin::Pin,
    task::{Context, Waker},
};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::{
    body::{SendError, send_data, send_head},
    h1frame::{
        self, BodyKind, Chunked, FrameError, MAX_FIELDS, MAX_HEAD, says_close, write_fields,
        write_request_head,
    },
    respond::{FLAG_HEADER, Flag, ProxyError, error_h1},
    upgrade::UPGRADED_HEADER,
};
use crate::proxy::{drain::Watch, tunnel::Tunnel};

/// How much is read from the pod at a time.
const READ_SIZE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("carried stream")]
    Stream(#[source] h2::Error),
    #[error("the source ended the stream inside a request")]
    Cut,
    #[error("the source reset the stream")]
    Cancelled,
    #[error("request head: {0}")]
    RequestHead(String),
    #[error("request framing")]
    RequestFraming(#[source] FrameError),
    #[error("pod connection")]
    Pod(#[source] io::Error),
    #[error("pod response head: {0}")]
    ResponseHead(String),
    #[error("pod response framing")]
    ResponseFraming(#[source] FrameError),
    #[error("the pod closed its connection inside a response")]
    PodCut,
}

/// The stream from the source's proxy: its bytes in, the answers out.
pub trait Carrier: Send {
    /// The source's next bytes; `None` once it ended the stream.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Bytes>, RelayError>> + Send;
    fn send(&mut self, data: Bytes) -> impl Future<Output = Result<(), RelayError>> + Send;
    /// Sends an answer's first bytes (its head, bounded by what one read of the pod gives)
    /// without waiting for the source's window.
    fn send_head(&mut self, data: Bytes) -> Result<(), RelayError>;
    /// No more answers: ends the stream.
    fn finish(&mut self);
    /// Ends the stream as failed: an answer may have been cut.
    fn abort(&mut self);
    /// Resolves when the source gave up on the stream (it reset it, or the connection ended).
    fn cancelled(&mut self) -> impl Future<Output = ()> + Send;
}

/// What the relay asks for each request: may it reach the pod, and what it came to.
pub trait Gate: Sync {
    type Ticket: Send;
    /// A request's head arrived (internal and hop-by-hop fields are off; `forwarded` is the
    /// source's `Forwarded`). It may change the head (trace context).
    fn admit(
        &self,
        req: &mut Request<()>,
        forwarded: Option<&HeaderValue>,
    ) -> (Self::Ticket, Result<(), ProxyError>);
    /// The request was answered: `code`, `flag` (ours; none for the pod's), body bytes each way.
    fn finish(&self, t: Self::Ticket, code: u16, flag: Option<Flag>, bytes: (u64, u64));
}

/// Opens a connection to the pod: any `FnMut() -> impl Future<Output = Result<Io, _>>`.
pub trait Dial: Send {
    type Io: AsyncRead + AsyncWrite + Unpin + Send;
    fn dial(&mut self) -> impl Future<Output = Result<Self::Io, ProxyError>> + Send;
}

impl<D, F, P> Dial for D
where
    D: FnMut() -> F + Send,
    F: Future<Output = Result<P, ProxyError>> + Send,
    P: AsyncRead + AsyncWrite + Unpin + Send,
{
    type Io = P;
    fn dial(&mut self) -> impl Future<Output = Result<P, ProxyError>> + Send {
        self()
    }
}

/// Serves the requests on `carrier` until the source ends the stream. `dial` opens a
/// connection to the pod, when the stream has none that is open. Once `leaving` says this
/// generation drains, the stream ends between requests (after its first): the source sends its
/// next request on a new stream, to the generation that took over (`exchange` sends a request
/// again on a stream that ended without reading it).
pub async fn serve<C: Carrier, G: Gate, D: Dial>(
    carrier: &mut C,
    gate: &G,
    mut dial: D,
    leaving: &Watch,
) -> Result<(), RelayError> {
    let mut from_src = BytesMut::new();
    let mut pod: Option<Pod<D::Io>> = None;
    let mut served = false;
    let r = loop {
        let next = if served {
            tokio::select! {
                biased;
                r = read_request(carrier, &mut from_src) => Some(r),
                () = leaving.stopped() => None,
            }
        } else {
            Some(read_request(carrier, &mut from_src).await)
        };
        let next = match next {
            Some(r) => r,
            None if from_src.is_empty() => break Ok(()),
            // A request is arriving: it is served, then the stream ends.
            None => read_request(carrier, &mut from_src).await,
        };
        let head = match next {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(()),
            Err(e) => break Err(e),
        };
        served = true;
        match one(carrier, gate, &mut dial, &mut pod, &mut from_src, head).await {
            Ok(Next::Continue) => {}
            Ok(Next::End) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    match &r {
        Ok(()) => carrier.finish(),
        Err(_) => carrier.abort(),
    }
    r
}

enum Next {
    Continue,
    /// The stream ends after this answer.
    End,
}

/// A pod connection and what was read from it beyond the last response.
struct Pod<P> {
    io: P,
    buf: BytesMut,
}

struct RequestHead {
    req: Request<()>,
    forwarded: Option<HeaderValue>,
    body: BodyKind,
    /// The source asked to end the stream after this request.
    close: bool,
}

/// One request, from its head to the end of its answer.
async fn one<C: Carrier, G: Gate, D: Dial>(
    carrier: &mut C,
    gate: &G,
    dial: &mut D,
    pod: &mut Option<Pod<D::Io>>,
    from_src: &mut BytesMut,
    head: RequestHead,
) -> Result<Next, RelayError> {
    let RequestHead {
        mut req,
        forwarded,
        body,
        close,
    } = head;
    let head_request = req.method() == Method::HEAD;
    let (ticket, admitted) = gate.admit(&mut req, forwarded.as_ref());
    if let Err(e) = admitted {
        let kind = (body, close, head_request);
        return refuse(carrier, gate, from_src, kind, e, ticket).await;
    }
    // An idle connection the pod closed (its keep-alive timeout) is not tried.
    let reused = pod
        .take()
        .and_then(|mut p| (p.buf.is_empty() && still_open(&mut p.io)).then_some(p));
    let fresh = reused.is_none();
    let mut p = match reused {
        Some(p) => p,
        None => match dial.dial().await {
            Ok(io) => Pod {
                io,
                buf: BytesMut::with_capacity(READ_SIZE),
            },
            Err(e) => {
                let kind = (body, close, head_request);
                return refuse(carrier, gate, from_src, kind, e, ticket).await;
            }
        },
    };
    // The head and what the stream already holds of the body go in one write.
    let mut out = BytesMut::with_capacity(512 + from_src.len());
    write_request_head(&mut out, req.method(), req.uri(), req.headers());
    let mut rest = Rest::of(body);
    let mut request_bytes = rest.take(from_src, &mut out)?;
    let whole = rest.done();
    let out = out.freeze();
    let mut sent = send_request(&mut p, &out, carrier, from_src, &mut rest).await;
    if sent.is_err() && !fresh && whole {
        // The pod closed the pooled connection as the request went out (nothing came back):
        // the whole request is still here, so it goes once more on a new connection.
        match dial.dial().await {
            Ok(io) => {
                p = Pod {
                    io,
                    buf: BytesMut::with_capacity(READ_SIZE),
                };
                sent = send_request(&mut p, &out, carrier, from_src, &mut rest).await;
            }
            // The body was read with the head: there is nothing left of it to skip.
            Err(e) => {
                let kind = (BodyKind::None, close, head_request);
                return refuse(carrier, gate, from_src, kind, e, ticket).await;
            }
        }
    }
    match &sent {
        Ok(n) => request_bytes += n,
        Err(RelayError::Cancelled | RelayError::Cut | RelayError::Stream(_)) => {
            return Err(sent.expect_err("matched"));
        }
        Err(_) => {}
    }
    let response = match sent {
        Ok(_) => response_head(&mut p, carrier, head_request).await,
        Err(e) => Err(e),
    };
    let (code, kind, head, pod_close) = match response {
        Ok(r) => r,
        Err(e @ (RelayError::Cancelled | RelayError::Stream(_))) => return Err(e),
        Err(e) => {
            // Nothing of the answer went out: ours says what failed. The connection is dropped;
            // a request whose body was not read to its end takes the stream with it.
            let failed = ProxyError::Reset(e.to_string());
            let answer = error_h1(&failed, close || !rest.done(), head_request);
            let n = answer.len() as u64;
            carrier.send(answer).await?;
            let code = failed.status().as_u16();
            gate.finish(ticket, code, Some(failed.flag()), (request_bytes, n));
            if !rest.done() {
                return Ok(Next::End);
            }
            return Ok(if close { Next::End } else { Next::Continue });
        }
    };
    let (response_bytes, until_close) = send_response(&mut p, carrier, head, kind).await?;
    gate.finish(ticket, code, None, (request_bytes, response_bytes));
    if until_close {
        return Ok(Next::End);
    }
    if !pod_close {
        *pod = Some(p);
    }
    Ok(if close { Next::End } else { Next::Continue })
}

/// Refused, or no pod to send it to: our answer, once the body has been read past.
async fn refuse<C: Carrier, G: Gate>(
    carrier: &mut C,
    gate: &G,
    from_src: &mut BytesMut,
    (body, close, head_request): (BodyKind, bool, bool),
    e: ProxyError,
    ticket: G::Ticket,
) -> Result<Next, RelayError> {
    let request_bytes = skip_body(carrier, from_src, body).await?;
    let answer = error_h1(&e, close, head_request);
    let n = answer.len() as u64;
    carrier.send(answer).await?;
    gate.finish(
        ticket,
        e.status().as_u16(),
        Some(e.flag()),
        (request_bytes, n),
    );
    Ok(if close { Next::End } else { Next::Continue })
}

/// Whether an idle pod connection is still open: a read that would wait. End of file, an error
/// or bytes nobody asked for all mean it cannot take a request.
fn still_open<P: AsyncRead + Unpin>(io: &mut P) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    // A waker that does nothing: this only asks, the next real read registers its own.
    let mut cx = Context::from_waker(Waker::noop());
    Pin::new(io).poll_read(&mut cx, &mut buf).is_pending()
}

/// Writes the request (head and all of its body) to the pod; the body bytes sent.
async fn send_request<P, C>(
    p: &mut Pod<P>,
    out: &Bytes,
    carrier: &mut C,
    from_src: &mut BytesMut,
    rest: &mut Rest,
) -> Result<u64, RelayError>
where
    P: AsyncWrite + Unpin,
    C: Carrier,
{
    p.io.write_all(out).await.map_err(RelayError::Pod)?;
    let mut n = 0;
    while !rest.done() {
        let Some(d) = carrier.recv().await? else {
            return Err(RelayError::Cut);
        };
        from_src.extend_from_slice(&d);
        let mut chunk = BytesMut::new();
        n += rest.take(from_src, &mut chunk)?;
        p.io.write_all(&chunk).await.map_err(RelayError::Pod)?;
    }
    Ok(n)
}

/// What is left of a request's body.
enum Rest {
    Length(u64),
    Chunked(Chunked),
    Done,
}

impl Rest {
    fn of(kind: BodyKind) -> Self {
        match kind {
            BodyKind::Length(n) if n > 0 => Self::Length(n),
            BodyKind::Chunked => Self::Chunked(Chunked::default()),
            // A request has no body delimited by closing (`h1frame::request_body`).
            _ => Self::Done,
        }
    }

    fn done(&self) -> bool {
        matches!(self, Self::Done)
    }

    /// Moves the body's bytes at the front of `buf` to `out`; how many.
    fn take(&mut self, buf: &mut BytesMut, out: &mut BytesMut) -> Result<u64, RelayError> {
        let k = match self {
            Self::Done => 0,
            Self::Length(left) => {
                let k = (*left).min(buf.len() as u64) as usize;
                *left -= k as u64;
                if *left == 0 {
                    *self = Self::Done;
                }
                k
            }
            Self::Chunked(scan) => {
                let (k, end) = scan.scan(buf).map_err(RelayError::RequestFraming)?;
                if end {
                    *self = Self::Done;
                }
                k
            }
        };
        out.extend_from_slice(&buf[..k]);
        buf.advance(k);
        Ok(k as u64)
    }
}

/// Reads a refused request's body to its end; its length.
async fn skip_body<C: Carrier>(
    carrier: &mut C,
    from_src: &mut BytesMut,
    kind: BodyKind,
) -> Result<u64, RelayError> {
    let mut rest = Rest::of(kind);
    let mut sink = BytesMut::new();
    let mut n = rest.take(from_src, &mut sink)?;
    while !rest.done() {
        let Some(d) = carrier.recv().await? else {
            return Err(RelayError::Cut);
        };
        from_src.extend_from_slice(&d);
        sink.clear();
        n += rest.take(from_src, &mut sink)?;
    }
    Ok(n)
}

/// The next request's head from the stream; `None` when the source ended it between requests.
async fn read_request<C: Carrier>(
    carrier: &mut C,
    buf: &mut BytesMut,
) -> Result<Option<RequestHead>, RelayError> {
    loop {
        if !buf.is_empty() {
            if let Some((n, head)) = parse_request(buf)? {
                buf.advance(n);
                return Ok(Some(head));
            }
            if buf.len() > MAX_HEAD {
                return Err(RelayError::RequestHead(format!(
                    "longer than {MAX_HEAD} bytes"
                )));
            }
        }
        match carrier.recv().await? {
            Some(d) => buf.extend_from_slice(&d),
            None if buf.is_empty() => return Ok(None),
            None => return Err(RelayError::Cut),
        }
    }
}

/// Fields that are about one hop (RFC 9110 section 7.6.1) or ours: not passed on. `Trailer` is
/// not one: it names the trailer fields to come, and hyper sends only the ones it names.
fn hop_field(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
        || name.len() > 11 && name[..11].eq_ignore_ascii_case("x-nodemesh-")
}

fn parse_request(buf: &[u8]) -> Result<Option<(usize, RequestHead)>, RelayError> {
    // Left uninitialized: 200 fields are 6 KB to fill before every parse.
    let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
    let mut r = httparse::Request::new(&mut []);
    let bad = |e: &dyn std::fmt::Display| RelayError::RequestHead(e.to_string());
    let n = match r
        .parse_with_uninit_headers(buf, &mut fields)
        .map_err(|e| bad(&e))?
    {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let body = h1frame::request_body(r.version, r.headers).map_err(RelayError::RequestFraming)?;
    let (method, path) = (r.method.unwrap_or_default(), r.path.unwrap_or_default());
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .body(())
        .map_err(|e| bad(&e))?;
    let mut headers = HeaderMap::with_capacity(r.headers.len());
    let (mut forwarded, mut close) = (None, r.version == Some(0));
    for f in r.headers.iter() {
        if f.name.eq_ignore_ascii_case("connection") {
            close |= says_close(f.value);
        }
        // `TE: trailers` says the caller takes trailers: the pod may send them (as
        // `strip_hop_headers` keeps it on the other paths).
        let te_trailers =
            f.name.eq_ignore_ascii_case("te") && f.value.eq_ignore_ascii_case(b"trailers");
        if hop_field(f.name) && !te_trailers {
            continue;
        }
        let value = HeaderValue::from_bytes(f.value).map_err(|e| bad(&e))?;
        if f.name.eq_ignore_ascii_case("forwarded") {
            forwarded = Some(value);
            continue;
        }
        headers.append(
            HeaderName::from_bytes(f.name.as_bytes()).map_err(|e| bad(&e))?,
            value,
        );
    }
    *req.headers_mut() = headers;
    Ok(Some((
        n,
        RequestHead {
            req,
            forwarded,
            body,
            close,
        },
    )))
}

/// One request as the relay frames it from a stream (see [`frame_requests`]).
#[cfg(any(test, feature = "fuzzing"))]
#[derive(Debug)]
pub struct Framed {
    pub method: String,
    /// The request target as parsed.
    pub uri: String,
    pub body: BodyKind,
    /// The body's bytes as they came (a chunked body with its framing).
    pub raw_body: Bytes,
    /// Refused before the pod (what `sanitize::request` refuses, with the default settings):
    /// answered by the relay and its body skipped.
    pub refused: bool,
    /// What the pod receives for it: the head as the relay writes it and the body as it came
    /// (empty when refused).
    pub forwarded: Bytes,
}

/// The complete requests at the front of `input`, framed as the relay frames one stream (the
/// same parse, body and refusal rules, and the same end after `Connection: close`), and the
/// error that stopped it, if one did. An incomplete last request ends the list without an
/// error. For the fuzz targets.
#[cfg(any(test, feature = "fuzzing"))]
pub fn frame_requests(input: &[u8]) -> (Vec<Framed>, Option<RelayError>) {
    let (mut buf, mut framed) = (BytesMut::from(input), Vec::new());
    while !buf.is_empty() {
        let RequestHead {
            mut req,
            body,
            close,
            ..
        } = match parse_request(&buf) {
            Ok(Some((n, head))) => {
                buf.advance(n);
                head
            }
            Ok(None) => break,
            Err(e) => return (framed, Some(e)),
        };
        let uri = req.uri().to_string();
        let refused =
            super::sanitize::request(&mut req, crate::config::EscapedSlashes::Reject).is_err();
        let mut rest = Rest::of(body);
        let mut raw_body = BytesMut::new();
        if let Err(e) = rest.take(&mut buf, &mut raw_body) {
            return (framed, Some(e));
        }
        if !rest.done() {
            break;
        }
        let mut forwarded = BytesMut::new();
        if !refused {
            write_request_head(&mut forwarded, req.method(), req.uri(), req.headers());
            forwarded.extend_from_slice(&raw_body);
        }
        framed.push(Framed {
            method: req.method().to_string(),
            uri,
            body,
            raw_body: raw_body.freeze(),
            refused,
            forwarded: forwarded.freeze(),
        });
        if close {
            break;
        }
    }
    (framed, None)
}

/// Reads from the pod into its buffer, unless the source gives up first.
async fn read_pod<P, C>(p: &mut Pod<P>, carrier: &mut C) -> Result<usize, RelayError>
where
    P: AsyncRead + Unpin,
    C: Carrier,
{
    p.buf.reserve(READ_SIZE);
    tokio::select! {
        r = p.io.read_buf(&mut p.buf) => r.map_err(RelayError::Pod),
        () = carrier.cancelled() => Err(RelayError::Cancelled),
    }
}

/// The pod's final response head (1xx heads before it are passed on), rewritten: status,
/// body kind, the head's bytes, and whether the pod will close the connection after it.
async fn response_head<P, C>(
    p: &mut Pod<P>,
    carrier: &mut C,
    head_request: bool,
) -> Result<(u16, BodyKind, BytesMut, bool), RelayError>
where
    P: AsyncRead + Unpin,
    C: Carrier,
{
    loop {
        if !p.buf.is_empty()
            && let Some((n, code, kind, head, close)) = parse_response(&p.buf, head_request)?
        {
            p.buf.advance(n);
            if code < 200 {
                carrier.send(head.freeze()).await?;
                continue;
            }
            return Ok((code, kind, head, close));
        }
        if p.buf.len() > MAX_HEAD {
            return Err(RelayError::ResponseHead(format!(
                "longer than {MAX_HEAD} bytes"
            )));
        }
        if read_pod(p, carrier).await? == 0 {
            return Err(RelayError::ResponseHead(
                "the pod closed the connection before answering".into(),
            ));
        }
    }
}

type ParsedResponse = (usize, u16, BodyKind, BytesMut, bool);

fn parse_response(buf: &[u8], head_request: bool) -> Result<Option<ParsedResponse>, RelayError> {
    let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
    let (n, r) = match h1frame::parse_response(buf, &mut fields) {
        Ok(httparse::Status::Complete(parsed)) => parsed,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(RelayError::ResponseHead(e.to_string())),
    };
    let code = r.code.unwrap_or_default();
    if code == 101 {
        // Upgrades travel on streams of their own (`upgrade`): none was asked for here.
        return Err(RelayError::ResponseHead("101 without an upgrade".into()));
    }
    let kind = h1frame::response_body(r.version, code, head_request, r.headers)
        .map_err(RelayError::ResponseFraming)?;
    let mut close = r.version == Some(0);
    let mut head = BytesMut::with_capacity(n + 16);
    head.extend_from_slice(b"HTTP/1.1 ");
    // httparse takes three digits only: written without a heap string.
    head.extend_from_slice(&[
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
        b' ',
    ]);
    head.extend_from_slice(r.reason.unwrap_or_default().as_bytes());
    head.extend_from_slice(b"\r\n");
    let ours = |name: &str| {
        name.eq_ignore_ascii_case(FLAG_HEADER.as_str())
            || name.eq_ignore_ascii_case(UPGRADED_HEADER.as_str())
    };
    for f in r.headers.iter() {
        if f.name.eq_ignore_ascii_case("connection") {
            close |= says_close(f.value);
        }
        // Only the proxies say what they did (retries and outlier detection trust the flag).
        if !hop_field(f.name) && !ours(f.name) {
            write_fields(&mut head, std::iter::once((f.name, f.value)));
        }
    }
    head.extend_from_slice(b"\r\n");
    Ok(Some((n, code, kind, head, close)))
}

/// Sends the response: its head with what the pod sent of the body so far, then the rest of
/// the body as it comes. The body's bytes, and whether it ended with the pod's connection.
async fn send_response<P, C>(
    p: &mut Pod<P>,
    carrier: &mut C,
    mut head: BytesMut,
    kind: BodyKind,
) -> Result<(u64, bool), RelayError>
where
    P: AsyncRead + Unpin,
    C: Carrier,
{
    let mut left = match kind {
        BodyKind::Length(n) => n,
        _ => 0,
    };
    let mut scan = Chunked::default();
    let mut total = 0u64;
    let mut done = matches!(kind, BodyKind::None | BodyKind::Length(0));
    let mut first = true;
    loop {
        if !done && !p.buf.is_empty() {
            let k = match kind {
                BodyKind::Length(_) => {
                    let k = left.min(p.buf.len() as u64) as usize;
                    left -= k as u64;
                    done = left == 0;
                    k
                }
                BodyKind::Chunked => {
                    let (k, end) = scan.scan(&p.buf).map_err(RelayError::ResponseFraming)?;
                    done = end;
                    k
                }
                _ => p.buf.len(),
            };
            total += k as u64;
            let body = p.buf.split_to(k);
            if head.is_empty() {
                head = body;
            } else {
                head.unsplit(body);
            }
        }
        if !head.is_empty() {
            let data = std::mem::take(&mut head).freeze();
            if first {
                first = false;
                carrier.send_head(data)?;
            } else {
                carrier.send(data).await?;
            }
        }
        if done {
            return Ok((total, false));
        }
        if read_pod(p, carrier).await? == 0 {
            if kind == BodyKind::UntilClose {
                return Ok((total, true));
            }
            return Err(RelayError::PodCut);
        }
    }
}

fn relay_send_error(e: SendError) -> RelayError {
    match e {
        SendError::Stream(e) => RelayError::Stream(e),
        SendError::Closed => RelayError::Cancelled,
    }
}

/// A carried stream is an HTTP/2 stream of the tunnel.
impl Carrier for Tunnel {
    async fn recv(&mut self) -> Result<Option<Bytes>, RelayError> {
        match self.recv.data().await {
            None => Ok(None),
            Some(Err(e)) => Err(RelayError::Stream(e)),
            Some(Ok(d)) => {
                // The bytes are ours now: the source may send more while they are relayed.
                let _ = self.recv.flow_control().release_capacity(d.len());
                Ok(Some(d))
            }
        }
    }

    async fn send(&mut self, data: Bytes) -> Result<(), RelayError> {
        send_data(&mut self.send, data, false)
            .await
            .map_err(relay_send_error)
    }

    fn send_head(&mut self, data: Bytes) -> Result<(), RelayError> {
        send_head(&mut self.send, data).map_err(relay_send_error)
    }

    fn finish(&mut self) {
        let _ = self.send.send_data(Bytes::new(), true);
    }

    fn abort(&mut self) {
        self.send.send_reset(h2::Reason::INTERNAL_ERROR);
    }

    async fn cancelled(&mut self) {
        let _ = poll_fn(|cx| self.send.poll_reset(cx)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::{
        io::DuplexStream,
        sync::mpsc::{UnboundedSender, unbounded_channel},
    };

    use super::*;
    use crate::proxy::drain::Drain;

    /// The source's side of a carried stream, in memory.
    struct Chan {
        rx: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
        out: Vec<u8>,
        ended: Option<&'static str>,
    }

    impl Carrier for Chan {
        async fn recv(&mut self) -> Result<Option<Bytes>, RelayError> {
            Ok(self.rx.recv().await)
        }
        async fn send(&mut self, data: Bytes) -> Result<(), RelayError> {
            self.out.extend_from_slice(&data);
            Ok(())
        }
        fn send_head(&mut self, data: Bytes) -> Result<(), RelayError> {
            self.out.extend_from_slice(&data);
            Ok(())
        }
        fn finish(&mut self) {
            self.ended = Some("finished");
        }
        fn abort(&mut self) {
            self.ended = Some("aborted");
        }
        async fn cancelled(&mut self) {
            std::future::pending().await
        }
    }

    /// A request's end as the gate heard it: path, status, flag, body bytes each way.
    type End = (String, u16, Option<Flag>, (u64, u64));

    /// Denies one path; records each request's end.
    #[derive(Default)]
    struct Book {
        ends: Mutex<Vec<End>>,
        forwarded: Mutex<Vec<Option<HeaderValue>>>,
    }

    impl Gate for Book {
        type Ticket = String;
        fn admit(
            &self,
            req: &mut Request<()>,
            forwarded: Option<&HeaderValue>,
        ) -> (String, Result<(), ProxyError>) {
            self.forwarded.lock().unwrap().push(forwarded.cloned());
            let path = req.uri().path().to_string();
            let verdict = if path == "/deny" {
                Err(ProxyError::Denied("test rule".into()))
            } else {
                Ok(())
            };
            (path, verdict)
        }
        fn finish(&self, t: String, code: u16, flag: Option<Flag>, bytes: (u64, u64)) {
            self.ends.lock().unwrap().push((t, code, flag, bytes));
        }
    }

    /// A pod: for each request it reads (head, then a `content-length` body), it writes the next
    /// answer (a byte at a time when `trickle`); after the last one it closes. What it read is
    /// kept.
    fn pod(answers: Vec<&'static [u8]>) -> (DuplexStream, Arc<Mutex<Vec<u8>>>) {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let seen = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(script(theirs, answers, false, seen.clone()));
        (ours, seen)
    }

    async fn script<S: AsyncRead + AsyncWrite + Unpin>(
        mut theirs: S,
        answers: Vec<&'static [u8]>,
        trickle: bool,
        log: Arc<Mutex<Vec<u8>>>,
    ) {
        let mut buf = BytesMut::new();
        for answer in answers {
            loop {
                let mut hs = [httparse::EMPTY_HEADER; 32];
                let mut r = httparse::Request::new(&mut hs);
                if let Ok(httparse::Status::Complete(n)) = r.parse(&buf) {
                    let len = r
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .map_or(0, |h| {
                            std::str::from_utf8(h.value).unwrap().parse().unwrap()
                        });
                    if buf.len() >= n + len {
                        log.lock()
                            .unwrap()
                            .extend_from_slice(&buf.split_to(n + len));
                        break;
                    }
                }
                if theirs.read_buf(&mut buf).await.unwrap() == 0 {
                    return;
                }
            }
            if trickle {
                for b in answer {
                    theirs.write_all(&[*b]).await.unwrap();
                    theirs.flush().await.unwrap();
                    tokio::task::yield_now().await;
                }
            } else {
                theirs.write_all(answer).await.unwrap();
            }
        }
    }

    /// Runs the relay over `frames` (the source's bytes, each a DATA frame) with `pods` to dial
    /// in turn: what the source got back, how the stream ended, the result, the dials made.
    async fn run(
        frames: &[&[u8]],
        pods: Vec<DuplexStream>,
        gate: &Book,
    ) -> (String, Option<&'static str>, Result<(), RelayError>, usize) {
        let (tx, rx): (UnboundedSender<Bytes>, _) = unbounded_channel();
        for f in frames {
            tx.send(Bytes::copy_from_slice(f)).unwrap();
        }
        drop(tx);
        let mut chan = Chan {
            rx,
            out: Vec::new(),
            ended: None,
        };
        let mut pods = pods.into_iter();
        let mut dials = 0;
        let dial = || {
            dials += 1;
            let p = pods.next();
            async move { p.ok_or_else(|| ProxyError::Connect("pod refused".into())) }
        };
        let r = serve(&mut chan, gate, dial, &Drain::new().watch()).await;
        let out = String::from_utf8(chan.out).unwrap();
        (out, chan.ended, r, dials)
    }

    #[tokio::test]
    async fn a_draining_generation_ends_the_stream_between_requests_only() {
        // (requests in hand when the drain starts, answers the source gets)
        for (requests, answers) in [
            // A stream's first request is served even if it comes after the drain started: a
            // source that opened the stream just before would otherwise have nowhere to go.
            (0, 1),
            // A request that is already arriving is served, then the stream ends.
            (1, 1),
            (2, 2),
        ] {
            let drain = Drain::new();
            let leaving = drain.watch();
            let (tx, rx): (UnboundedSender<Bytes>, _) = unbounded_channel();
            let first = b"GET /a HTTP/1.1\r\nhost: shop\r\n\r\n";
            for _ in 0..requests {
                tx.send(Bytes::from_static(first)).unwrap();
            }
            drain.drain(std::time::Duration::from_secs(1)).await;
            if requests == 0 {
                tx.send(Bytes::from_static(first)).unwrap();
            }
            let mut chan = Chan {
                rx,
                out: Vec::new(),
                ended: None,
            };
            let (p, _) = pod(TWO_ANSWERS.to_vec());
            let mut pods = vec![p].into_iter();
            let dial = || {
                let p = pods.next();
                async move { p.ok_or_else(|| ProxyError::Connect("pod refused".into())) }
            };
            let book = Book::default();
            // The source keeps the stream open (`tx` lives): only the drain can end it.
            let r = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                serve(&mut chan, &book, dial, &leaving),
            )
            .await
            .expect("a draining relay ends an idle stream");
            r.unwrap();
            let out = String::from_utf8(chan.out).unwrap();
            assert_eq!(
                out.matches("HTTP/1.1 ").count(),
                answers,
                "{requests}: {out}"
            );
            // A clean end with nothing half said: the source sends its next request again on a
            // new stream (`exchange`).
            assert_eq!(chan.ended, Some("finished"), "{requests}");
            drop(tx);
        }
    }

    const TWO_ANSWERS: [&[u8]; 2] = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-nodemesh-flag: UF\r\nkeep-alive: 5\r\n\r\nhi",
        b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ];

    /// Two requests from the source, with its `Forwarded`, one of our fields and a hop-by-hop
    /// one on the first, and a body on the second.
    const TWO_REQUESTS: &[u8] =
        b"GET /a HTTP/1.1\r\nhost: shop\r\nforwarded: for=\"10.1.0.5:4000\"\r\n\
        x-nodemesh-target: 1.2.3.4:80\r\nconnection: keep-alive\r\n\r\n\
        POST /b HTTP/1.1\r\nhost: shop\r\ncontent-length: 5\r\n\r\nhello";

    /// What the source, the pod and the gate see of [`TWO_REQUESTS`] answered by
    /// [`TWO_ANSWERS`].
    fn check_two(out: &str, seen: &Mutex<Vec<u8>>, book: &Book, at: &str) {
        // The pod's own flag and hop-by-hop fields do not pass; the bodies arrive whole.
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi\
             HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "{at}"
        );
        // Our fields and hop-by-hop ones stay on this side of the pod.
        assert_eq!(
            String::from_utf8(seen.lock().unwrap().clone()).unwrap(),
            "GET /a HTTP/1.1\r\nhost: shop\r\n\r\n\
             POST /b HTTP/1.1\r\nhost: shop\r\ncontent-length: 5\r\n\r\nhello",
            "{at}"
        );
        assert_eq!(
            *book.ends.lock().unwrap(),
            [
                ("/a".into(), 200, None, (0, 2)),
                ("/b".into(), 201, None, (5, 13))
            ],
            "{at}"
        );
        let fwd = book.forwarded.lock().unwrap();
        assert_eq!(fwd[0].as_ref().unwrap(), "for=\"10.1.0.5:4000\"", "{at}");
        assert_eq!(fwd[1], None, "{at}");
    }

    #[tokio::test]
    async fn requests_are_relayed_in_order_with_the_stream_split_anywhere() {
        for i in 1..TWO_REQUESTS.len() {
            let (p, seen) = pod(TWO_ANSWERS.to_vec());
            let book = Book::default();
            let (a, b) = TWO_REQUESTS.split_at(i);
            let (out, ended, r, dials) = run(&[a, b], vec![p], &book).await;
            let at = format!("source bytes split at {i}");
            r.unwrap();
            assert_eq!(
                ended, None,
                "{at}: the source ended the stream, nothing to add"
            );
            assert_eq!(dials, 1, "{at}: both requests share the pod connection");
            check_two(&out, &seen, &book, &at);
        }
    }

    #[tokio::test]
    async fn answers_that_arrive_a_byte_at_a_time_are_relayed_whole() {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let seen = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(script(theirs, TWO_ANSWERS.to_vec(), true, seen.clone()));
        let book = Book::default();
        let (out, _, r, _) = run(&[TWO_REQUESTS], vec![ours], &book).await;
        r.unwrap();
        check_two(&out, &seen, &book, "pod trickling");
    }

    #[tokio::test]
    async fn a_denied_request_is_answered_and_its_body_skipped() {
        let (p, seen) = pod(vec![b"HTTP/1.1 204 No Content\r\n\r\n"]);
        let book = Book::default();
        let (out, _, r, _) = run(
            &[
                b"POST /deny HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n4\r\nsecr",
                b"\r\n0\r\n\r\nGET /ok HTTP/1.1\r\n\r\n",
            ],
            vec![p],
            &book,
        )
        .await;
        r.unwrap();
        let denied = error_h1(&ProxyError::Denied("test rule".into()), false, false);
        let denied = std::str::from_utf8(&denied).unwrap();
        assert_eq!(out, format!("{denied}HTTP/1.1 204 No Content\r\n\r\n"));
        // The pod saw only the allowed request: the stream stayed in step.
        assert_eq!(
            String::from_utf8(seen.lock().unwrap().clone()).unwrap(),
            "GET /ok HTTP/1.1\r\n\r\n"
        );
        let ends = book.ends.lock().unwrap();
        assert_eq!((ends[0].1, ends[0].2), (403, Some(Flag::Rbac)));
        assert_eq!((ends[1].1, ends[1].2), (204, None));
    }

    #[tokio::test]
    async fn a_pod_connection_closed_while_idle_is_replaced() {
        // Real TCP: a write to a connection the peer closed still succeeds there, so only the
        // check before reuse keeps the request from a dead connection. The first connection
        // closes after one answer (its keep-alive timeout).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let answers: [&'static [u8]; 2] = [
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n2",
            ];
            for answer in answers {
                let (tcp, _) = listener.accept().await.unwrap();
                script(tcp, vec![answer], false, Arc::default()).await;
            }
        });
        let book = Book::default();
        let (tx, rx) = unbounded_channel();
        let mut chan = Chan {
            rx,
            out: Vec::new(),
            ended: None,
        };
        let mut dials = 0;
        let dial = || {
            dials += 1;
            async move {
                tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| ProxyError::Connect(e.to_string()))
            }
        };
        let source = async {
            tx.send(Bytes::from_static(b"GET /1 HTTP/1.1\r\n\r\n"))
                .unwrap();
            // Time for the pod to close its end.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            tx.send(Bytes::from_static(b"GET /2 HTTP/1.1\r\n\r\n"))
                .unwrap();
            drop(tx);
        };
        let staying = Drain::new().watch();
        let (r, ()) = tokio::join!(serve(&mut chan, &book, dial, &staying), source);
        r.unwrap();
        let codes: Vec<_> = book.ends.lock().unwrap().iter().map(|e| e.1).collect();
        assert_eq!(codes, [200, 200]);
        assert_eq!(dials, 2);
        assert!(String::from_utf8(chan.out).unwrap().ends_with("\r\n\r\n2"));
    }

    #[tokio::test]
    async fn failures_are_answered_when_they_can_be_and_reset_when_not() {
        let book = Book::default();
        // No pod to dial: 503 with the reason, and the stream goes on.
        let (out, ended, r, _) = run(&[b"GET /x HTTP/1.1\r\n\r\n"], vec![], &book).await;
        r.unwrap();
        assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
        assert!(out.contains("x-nodemesh-flag: UF\r\n"), "{out}");
        assert_eq!(ended, None);

        // The pod closes before answering: 502, reset flag.
        let (p, _) = pod(vec![]);
        let (out, _, r, _) = run(&[b"GET /x HTTP/1.1\r\n\r\n"], vec![p], &book).await;
        r.unwrap();
        assert!(out.starts_with("HTTP/1.1 502 "), "{out}");
        assert!(out.contains("x-nodemesh-flag: UR\r\n"), "{out}");

        // The pod dies inside its answer: what went out cannot be taken back, so the stream is
        // reset rather than ended as if the body were whole.
        let (p, _) = pod(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"]);
        let (_, ended, r, _) = run(&[b"GET /x HTTP/1.1\r\n\r\n"], vec![p], &book).await;
        assert!(matches!(r, Err(RelayError::PodCut)), "{r:?}");
        assert_eq!(ended, Some("aborted"));

        // Ambiguous framing from the source is refused, not guessed.
        let (_, ended, r, dials) = run(
            &[b"POST /x HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"],
            vec![],
            &book,
        )
        .await;
        assert!(matches!(r, Err(RelayError::RequestFraming(_))), "{r:?}");
        assert_eq!((ended, dials), (Some("aborted"), 0));

        // A body delimited by the pod closing ends the stream with it.
        let (p, _) = pod(vec![b"HTTP/1.1 200 OK\r\n\r\nall of it"]);
        let (out, ended, r, _) = run(&[b"GET /x HTTP/1.1\r\n\r\n"], vec![p], &book).await;
        r.unwrap();
        assert!(out.ends_with("\r\n\r\nall of it"), "{out}");
        assert_eq!(ended, Some("finished"));
    }
}
