//! Where requests leave the proxy: to a pod of this node (HTTP/1.1 connections pooled per pod, or
//! one multiplexed HTTP/2 connection), or to another node's proxy as an HTTP/2 stream on the
//! pooled mTLS tunnel connection.
use mesh_api::sync::LockExt;
use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, Uri, header,
    uri::{Authority, PathAndQuery, Scheme},
};
use http_body::{Body as _, Frame};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_api::identity::SpiffeId;
use tracing::debug;

use super::{
    UPSTREAM_PROTOCOL_HEADER, UpstreamProtocol,
    body::{Body, BoxError, Recording, RecvBody, boxed, send_body},
    respond::ProxyError,
    upgrade,
};
use crate::{
    kernel::accel::PodStream,
    proxy::pod_socket::ProxySource,
    proxy::tunnel::{TARGET_HEADER, Tunnels},
};

/// HTTP/1.1 connections kept idle per pod.
const MAX_IDLE_H1: usize = 64;

/// Removes hop-by-hop headers (RFC 9110 7.6.1): they describe one connection, not the message,
/// and HTTP/2 forbids them.
pub fn strip_hop_headers(h: &mut HeaderMap) {
    // Runs on every request and response: names are constants (no parsing), and the list of
    // names `Connection` declares is only built when there is one.
    static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    // Most messages have none: one pass over their few names (comparisons, no hashing) instead
    // of six lookups.
    let hop = |n: &HeaderName| {
        [
            &header::CONNECTION,
            &KEEP_ALIVE,
            &PROXY_CONNECTION,
            &header::TRANSFER_ENCODING,
            &header::UPGRADE,
            &header::TE,
        ]
        .contains(&n)
    };
    if !h.keys().any(hop) {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            h.remove(name);
        }
        h.remove(header::CONNECTION);
    }
    for name in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        h.remove(name);
    }
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

/// The authority a request names: its URI's, else its Host header.
pub fn authority(req: &Request<Body>) -> Option<String> {
    req.uri().authority().map(|a| a.to_string()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
    })
}

/// The request's authority (its URI's, else its Host header's, else `fallback`), without copying
/// when the URI has one.
fn authority_of(req: &Request<Body>, fallback: SocketAddr) -> Result<Authority, ProxyError> {
    if let Some(a) = req.uri().authority() {
        return Ok(a.clone());
    }
    match req.headers().get(header::HOST) {
        Some(h) => Authority::try_from(h.as_bytes())
            .map_err(|e| ProxyError::BadRequest(format!("Host header: {e}"))),
        None => Authority::try_from(fallback.to_string().as_str())
            .map_err(|e| ProxyError::BadRequest(format!("authority: {e}"))),
    }
}

/// `http://authority/path?query`, for HTTP/2 (which needs scheme and authority).
fn absolute(uri: Uri, authority: Authority) -> Result<Uri, ProxyError> {
    let mut parts = uri.into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).map_err(|e| ProxyError::BadRequest(format!("request target: {e}")))
}

/// `/path?query`, for HTTP/1.1.
fn origin_form(uri: &Uri) -> Result<Uri, ProxyError> {
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).map_err(|e| ProxyError::BadRequest(format!("request target: {e}")))
}

/// Makes `req` an HTTP/1.1 request for `auth`: origin-form target, `Host` (kept if the app sent
/// one).
fn set_http1(req: &mut Request<Body>, auth: &Authority) -> Result<(), ProxyError> {
    *req.uri_mut() = origin_form(req.uri())?;
    if !req.headers().contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(auth.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    *req.version_mut() = http::Version::HTTP_11;
    Ok(())
}

/// Readies `req` to be sent as HTTP/1.1 to the pod at `target`: hop-by-hop headers off, then
/// [`set_http1`].
pub fn to_http1(req: &mut Request<Body>, target: SocketAddr) -> Result<(), ProxyError> {
    let auth = authority_of(req, target)?;
    strip_hop_headers(req.headers_mut());
    set_http1(req, &auth)
}

/// An address as a header value, formatted without a heap string.
fn addr_value(addr: SocketAddr) -> HeaderValue {
    use std::io::Write;
    let mut buf = [0u8; 64];
    let mut w = &mut buf[..];
    let _ = write!(w, "{addr}");
    let n = 64 - w.len();
    HeaderValue::from_bytes(&buf[..n]).expect("an address is a header value")
}

/// Requests to pods of this node.
pub struct PodClient {
    pub source: ProxySource,
    pub connect_timeout: Duration,
    /// Connections opened to pods (HTTP/1.1 and HTTP/2): with pooling, far fewer than requests.
    pub opened: std::sync::atomic::AtomicU64,
    h1: Mutex<HashMap<SocketAddr, Vec<http1::SendRequest<Body>>>>,
    h2: Mutex<HashMap<SocketAddr, http2::SendRequest<Body>>>,
}

impl PodClient {
    pub fn new(source: ProxySource, connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            source,
            connect_timeout,
            opened: Default::default(),
            h1: Mutex::default(),
            h2: Mutex::default(),
        })
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TokioIo<PodStream>, ProxyError> {
        Ok(TokioIo::new(self.dial(addr).await?))
    }

    /// Sends `req` to the pod at `addr`. Our own response flag is taken off the pod's answer: only
    /// the proxies may say what they did (retries and outlier detection trust it).
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        proto: UpstreamProtocol,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        if proto == UpstreamProtocol::H1
            && let Some(from_app) = upgrade::prepare_destination(&mut req)
        {
            // Boxed, like every cold path here: an async fn's future holds its largest await, and
            // each request's future is built and moved through every level of the call.
            return Box::pin(self.upgrade(addr, req, from_app)).await;
        }
        req.headers_mut().remove(&upgrade::UPGRADE_HEADER);
        let mut resp = self.forward(addr, proto, req).await?;
        resp.headers_mut().remove(&super::respond::FLAG_HEADER);
        resp.headers_mut().remove(&upgrade::UPGRADED_HEADER);
        Ok(resp)
    }

    /// An `Upgrade` request, on a connection of its own (it will not come back to the pool).
    async fn upgrade(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<Body>,
        from_app: Body,
    ) -> Result<Response<Body>, ProxyError> {
        let auth = authority(&req).unwrap_or_else(|| addr.to_string());
        let (proto, connection) = (
            req.headers_mut().remove(header::UPGRADE),
            req.headers_mut().remove(header::CONNECTION),
        );
        strip_hop_headers(req.headers_mut());
        let h = req.headers_mut();
        if let (Some(p), Some(c)) = (proto, connection) {
            h.insert(header::UPGRADE, p);
            h.insert(header::CONNECTION, c);
        }
        if let Ok(v) = HeaderValue::from_str(&auth) {
            h.insert(header::HOST, v);
        }
        *req.uri_mut() = origin_form(req.uri())?;
        *req.version_mut() = http::Version::HTTP_11;
        let mut send = self.h1_connect(addr).await?;
        let mut resp = send.send_request(req).await.map_err(upstream_error)?;
        resp.headers_mut().remove(&super::respond::FLAG_HEADER);
        resp.headers_mut().remove(&upgrade::UPGRADED_HEADER);
        Ok(upgrade::finish_destination(resp, from_app, send))
    }

    async fn forward(
        self: &Arc<Self>,
        addr: SocketAddr,
        proto: UpstreamProtocol,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        let auth = authority_of(&req, addr)?;
        strip_hop_headers(req.headers_mut());
        match proto {
            UpstreamProtocol::H2 => {
                let uri = std::mem::take(req.uri_mut());
                *req.uri_mut() = absolute(uri, auth)?;
                req.headers_mut().remove(header::HOST);
                *req.version_mut() = http::Version::HTTP_2;
                let mut send = Box::pin(self.h2_sender(addr)).await?;
                let resp = send.send_request(req).await.map_err(upstream_error)?;
                Ok(resp.map(boxed))
            }
            UpstreamProtocol::H1 => {
                set_http1(&mut req, &auth)?;
                let mut send = self.h1_sender(addr).await?;
                let resp = send.send_request(req).await.map_err(upstream_error)?;
                let pool = Arc::downgrade(self);
                Ok(resp.map(|b| {
                    boxed(ReturnToPool {
                        inner: b,
                        sender: Some(send),
                        pool,
                        addr,
                    })
                }))
            }
        }
    }

    async fn h1_sender(&self, addr: SocketAddr) -> Result<http1::SendRequest<Body>, ProxyError> {
        loop {
            let idle = self.h1.locked().get_mut(&addr).and_then(Vec::pop);
            let Some(mut s) = idle else { break };
            if s.is_closed() {
                continue;
            }
            if s.ready().await.is_ok() {
                return Ok(s);
            }
        }
        Box::pin(self.h1_connect(addr)).await
    }

    async fn h1_connect(&self, addr: SocketAddr) -> Result<http1::SendRequest<Body>, ProxyError> {
        let io = self.connect(addr).await?;
        let (send, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| ProxyError::Connect(format!("{addr}: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(%addr, error = %e, "pod connection ended");
            }
        });
        Ok(send)
    }

    async fn h2_sender(&self, addr: SocketAddr) -> Result<http2::SendRequest<Body>, ProxyError> {
        let pooled = self.h2.locked().get(&addr).cloned();
        if let Some(mut s) = pooled
            && !s.is_closed()
            && s.ready().await.is_ok()
        {
            return Ok(s);
        }
        let io = self.connect(addr).await?;
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .handshake(io)
            .await
            .map_err(|e| ProxyError::Connect(format!("{addr}: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%addr, error = %e, "pod connection ended");
            }
        });
        self.h2.locked().insert(addr, send.clone());
        Ok(send)
    }

    /// A new connection to the pod at `addr` (within the connect timeout), counted.
    pub async fn dial(&self, addr: SocketAddr) -> Result<PodStream, ProxyError> {
        let tcp = tokio::time::timeout(self.connect_timeout, self.source.connect_local(addr))
            .await
            .map_err(|_| ProxyError::Connect(format!("{addr}: timed out")))?
            .map_err(|e| ProxyError::Connect(format!("{addr}: {e}")))?;
        self.opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(tcp)
    }
}

impl PodClient {
    /// Takes back a connection whose last response was read to its end.
    fn give_back(&self, addr: SocketAddr, s: http1::SendRequest<Body>) {
        let mut pool = self.h1.locked();
        let idle = pool.entry(addr).or_default();
        if idle.len() < MAX_IDLE_H1 {
            idle.push(s);
        }
    }
}

pub fn upstream_error(e: hyper::Error) -> ProxyError {
    ProxyError::Reset(e.to_string())
}

/// An HTTP/1.1 response body that puts its connection back in the pool once read to the end.
struct ReturnToPool {
    inner: hyper::body::Incoming,
    sender: Option<http1::SendRequest<Body>>,
    pool: Weak<PodClient>,
    addr: SocketAddr,
}

impl http_body::Body for ReturnToPool {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if (frame.is_none() || self.inner.is_end_stream())
            && let (Some(s), Some(pool)) = (self.sender.take(), self.pool.upgrade())
        {
            pool.give_back(self.addr, s);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Where a request crosses to another node.
pub struct TunnelTarget<'a> {
    pub src: &'a SpiffeId,
    pub node: SocketAddr,
    pub dst: &'a SpiffeId,
    /// The destination pod.
    pub target: SocketAddr,
    /// `for="<client address>"`, rendered once per app connection.
    pub forwarded: &'a HeaderValue,
}

/// The `Forwarded` value naming the app's address.
pub fn forwarded(client: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&format!("for=\"{client}\"")).expect("an address is a header value")
}

/// Sends `req` as its own stream on the pooled tunnel connection. The request body streams
/// concurrently with the response (gRPC bidirectional streaming works).
pub async fn via_tunnel(
    tunnels: &Tunnels,
    t: TunnelTarget<'_>,
    proto: UpstreamProtocol,
    mut req: Request<Body>,
) -> Result<Response<Body>, ProxyError> {
    let auth = authority_of(&req, t.target)?;
    strip_hop_headers(req.headers_mut());
    let (mut parts, body) = req.into_parts();
    parts.uri = absolute(std::mem::take(&mut parts.uri), auth)?;
    parts.version = http::Version::HTTP_2;
    parts.headers.remove(header::HOST);
    let h = &mut parts.headers;
    h.insert(&TARGET_HEADER, addr_value(t.target));
    h.insert(
        &UPSTREAM_PROTOCOL_HEADER,
        HeaderValue::from_static(proto.as_str()),
    );
    h.insert(header::FORWARDED, t.forwarded.clone());
    let end = body.is_end_stream();
    // Kept so that a stream the peer refuses can go again (see below): the head, and a body
    // within `REPLAY_LIMIT` as it streams.
    let head = {
        let mut r = Request::new(());
        *r.method_mut() = parts.method.clone();
        *r.uri_mut() = parts.uri.clone();
        *r.headers_mut() = parts.headers.clone();
        r
    };
    let (body, replay) = if end {
        (body, None)
    } else {
        let (rec, replay) = Recording::new(body);
        (boxed(rec), Some(replay))
    };
    let connect_err = |e: crate::proxy::tunnel::TunnelError| {
        ProxyError::Connect(mesh_api::placement::error_chain(&e))
    };
    let resp = send_via(tunnels, &t, Request::from_parts(parts, ()), body, end)
        .await
        .map_err(connect_err)?;
    let resp = match resp.await {
        Ok(r) => r,
        // The draining peer's final GOAWAY named an earlier last stream: it never saw this one
        // (RFC 9113 section 8.7). Once more, on a new connection to the generation that took
        // over, if the body was seen whole (a unary gRPC call's is, by now).
        Err(e) if crate::proxy::tunnel::refused(&e) => {
            let again = match &replay {
                None => Some(super::body::empty()),
                Some(r) => r.body(),
            };
            let Some(body) = again else {
                return Err(h2_error(e));
            };
            let end = body.is_end_stream();
            debug!("stream refused by a draining peer: sending the request again");
            send_via(tunnels, &t, head, body, end)
                .await
                .map_err(connect_err)?
                .await
                .map_err(h2_error)?
        }
        Err(e) => return Err(h2_error(e)),
    };
    Ok(resp.map(|r| boxed(RecvBody::new(r))))
}

/// Opens the request's stream and sends its body beside it; the answer to come.
async fn send_via(
    tunnels: &Tunnels,
    t: &TunnelTarget<'_>,
    head: Request<()>,
    body: Body,
    end: bool,
) -> Result<h2::client::ResponseFuture, crate::proxy::tunnel::TunnelError> {
    let (resp, mut stream) = tunnels
        .send_request(t.src, t.node, t.dst, head, end)
        .await?;
    if !end {
        tokio::spawn(async move {
            if let Err(e) = send_body(body, &mut stream).await {
                debug!(error = %e, "request body to the tunnel ended");
            }
        });
    }
    Ok(resp)
}

fn h2_error(e: h2::Error) -> ProxyError {
    ProxyError::Reset(e.to_string())
}

/// Answers an HTTP/2 stream (the tunnel's inbound side) with `resp`.
pub async fn respond_h2(
    mut respond: h2::server::SendResponse<Bytes>,
    resp: Response<Body>,
) -> Result<(), BoxError> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_headers(&mut parts.headers);
    parts.version = http::Version::HTTP_2;
    let end = body.is_end_stream();
    let mut send = respond.send_response(Response::from_parts(parts, ()), end)?;
    if !end {
        send_body(body, &mut send).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_and_the_rest_kept() {
        // (headers in, names left)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case] = &[
            (&[("x-a", "1"), ("host", "h")], &["host", "x-a"]),
            (
                &[
                    ("connection", "keep-alive, X-Custom"),
                    ("keep-alive", "timeout=5"),
                    ("x-custom", "1"),
                    ("x-kept", "1"),
                ],
                &["x-kept"],
            ),
            (
                &[
                    ("connection", "close"),
                    ("connection", "x-second"),
                    ("x-second", "1"),
                ],
                &[],
            ),
            (
                &[
                    ("transfer-encoding", "chunked"),
                    ("upgrade", "websocket"),
                    ("proxy-connection", "keep-alive"),
                ],
                &[],
            ),
            (&[("te", "trailers")], &["te"]),
            (&[("te", "gzip")], &[]),
            // A name `Connection` lists that is not a valid header name is ignored.
            (&[("connection", "bad name"), ("x-a", "1")], &["x-a"]),
        ];
        for (input, left) in cases {
            let mut h = headers(input);
            strip_hop_headers(&mut h);
            let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
            names.sort_unstable();
            assert_eq!(&names, left, "{input:?}");
        }
    }
}
