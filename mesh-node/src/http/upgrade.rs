//! `Upgrade` pass-through (WebSocket and friends) for HTTP/1.1 apps and pods.
//!
//! HTTP/2 has no `101`, and the hop between node proxies is HTTP/2, so an upgraded connection is
//! carried as one HTTP/2 request whose body is the app's bytes and whose response body is the
//! pod's: the source side marks the request with [`UPGRADE_HEADER`]; the destination side (the
//! only one that talks HTTP/1.1 to the pod) sends the real `Upgrade` request on a connection of
//! its own and, on `101`, answers `200` with [`UPGRADED_HEADER`]; the source side turns that back
//! into the app's `101`. The request is routed, authorized and rate-limited like any other; a
//! half-close on either side travels as the end of its body.
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tracing::debug;

use super::body::{Body, boxed, empty};

/// On a request between proxies: the protocol the app asked to switch to.
pub static UPGRADE_HEADER: http::HeaderName = http::HeaderName::from_static("x-nodemesh-upgrade");
/// On the answer: the pod switched to this protocol; the body is its side of the connection.
pub static UPGRADED_HEADER: http::HeaderName = http::HeaderName::from_static("x-nodemesh-upgraded");

/// Bytes buffered between a socket and a body before the reader waits.
const PIPE_DEPTH: usize = 16;

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` with `Upgrade`).
pub fn requested(version: http::Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != http::Version::HTTP_11 {
        return None;
    }
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    headers.get(header::UPGRADE).filter(|_| asks).cloned()
}

/// A body fed by a channel: one side of an upgraded connection.
struct Pipe(mpsc::Receiver<Bytes>);

impl http_body::Body for Pipe {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn pipe() -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel(PIPE_DEPTH);
    (tx, boxed(Pipe(rx)))
}

/// Copies between an upgraded connection and the bodies that carry it across the proxies, until
/// both directions end.
async fn bridge(io: Upgraded, from_peer: Body, to_peer: mpsc::Sender<Bytes>) {
    let (mut r, mut w) = tokio::io::split(TokioIo::new(io));
    let up = async move {
        loop {
            let mut buf = BytesMut::with_capacity(16 * 1024);
            match r.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if to_peer.send(buf.freeze()).await.is_err() {
                        break;
                    }
                }
            }
        }
        // Dropping the sender ends the body: the peer sees our half-close.
    };
    let down = async move {
        let mut body = from_peer;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data()
                && w.write_all(&data).await.is_err()
            {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(up, down);
    debug!("upgraded connection ended");
}

/// Source side: when the app asks to upgrade, its request body becomes the app's bytes (after the
/// `101`) and the request carries [`UPGRADE_HEADER`]. Returns what [`finish_source`] needs.
pub fn prepare_source(req: &mut Request<Body>) -> Option<(OnUpgrade, mpsc::Sender<Bytes>)> {
    req.headers_mut().remove(&UPGRADE_HEADER);
    let proto = requested(req.version(), req.headers())?;
    let on = hyper::upgrade::on(&mut *req);
    let (tx, body) = pipe();
    *req.body_mut() = body;
    req.headers_mut().insert(&UPGRADE_HEADER, proto);
    Some((on, tx))
}

/// Source side: the destination switched protocols: answer the app `101` and bridge its
/// connection to the response body; any other answer goes back as it is.
pub fn finish_source(
    resp: Response<Body>,
    (on, tx): (OnUpgrade, mpsc::Sender<Bytes>),
) -> Response<Body> {
    let Some(proto) = resp.headers().get(&UPGRADED_HEADER).cloned() else {
        return resp;
    };
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove(&UPGRADED_HEADER);
    parts.status = StatusCode::SWITCHING_PROTOCOLS;
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(header::UPGRADE, proto);
    tokio::spawn(async move {
        match on.await {
            Ok(io) => bridge(io, body, tx).await,
            Err(e) => debug!(error = %e, "the app's connection did not upgrade"),
        }
    });
    Response::from_parts(parts, empty())
}

/// Destination side: turns a marked request back into an HTTP/1.1 `Upgrade` request with an
/// empty body; returns the body that carries the app's bytes.
pub fn prepare_destination(req: &mut Request<Body>) -> Option<Body> {
    let proto = req.headers_mut().remove(&UPGRADE_HEADER)?;
    let body = std::mem::replace(req.body_mut(), empty());
    let h = req.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, proto);
    Some(body)
}

/// Destination side: the pod's `101` becomes `200` + [`UPGRADED_HEADER`] with the pod's bytes as
/// the body; `keep` (the connection's request handle) lives as long as the bridge.
pub fn finish_destination<K: Send + 'static>(
    mut resp: Response<hyper::body::Incoming>,
    from_app: Body,
    keep: K,
) -> Response<Body> {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return resp.map(boxed);
    }
    let on = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    let proto = parts
        .headers
        .get(header::UPGRADE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("unknown"));
    parts.status = StatusCode::OK;
    parts.headers.insert(&UPGRADED_HEADER, proto);
    let (tx, body) = pipe();
    tokio::spawn(async move {
        let _keep = keep;
        match on.await {
            Ok(io) => bridge(io, from_app, tx).await,
            Err(e) => debug!(error = %e, "the pod's connection did not upgrade"),
        }
    });
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_needs_both_headers_on_http1() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            m
        };
        let v11 = http::Version::HTTP_11;
        type Case<'a> = (http::Version, &'a [(&'a str, &'a str)], Option<&'a str>);
        let cases: &[Case] = &[
            (
                v11,
                &[("connection", "Upgrade"), ("upgrade", "websocket")],
                Some("websocket"),
            ),
            (
                v11,
                &[("connection", "keep-alive, upgrade"), ("upgrade", "h2c")],
                Some("h2c"),
            ),
            (v11, &[("upgrade", "websocket")], None),
            (v11, &[("connection", "upgrade")], None),
            (
                http::Version::HTTP_2,
                &[("connection", "upgrade"), ("upgrade", "websocket")],
                None,
            ),
            (
                http::Version::HTTP_10,
                &[("connection", "upgrade"), ("upgrade", "websocket")],
                None,
            ),
        ];
        for (version, headers, want) in cases {
            let got = requested(*version, &h(headers));
            assert_eq!(
                got.as_ref().and_then(|v| v.to_str().ok()),
                *want,
                "{version:?} {headers:?}"
            );
        }
    }
}
