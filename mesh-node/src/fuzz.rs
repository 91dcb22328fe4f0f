//! Entry points for the fuzz targets (`mesh-node/fuzz`, `cargo xtask fuzz`): each takes arbitrary
//! bytes and panics only on a bug, never on bad input. Bad input must be refused with an error;
//! what a panic here means is written at each assertion.
//!
//! The committed corpora are replayed through these functions by `cargo test` (see the tests
//! below), so every input a fuzzer ever found stays a regression test without libFuzzer.
use mesh_api::sync::LockExt;
use std::{
    cell::RefCell,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::BodyExt;
use prost::Message;

use crate::{
    config::EscapedSlashes,
    http::{
        h1frame::{self, BodyKind, Chunked, Decoded},
        relay, sanitize,
    },
};

/// A fuzz target's entry: arbitrary bytes in, a panic only on a bug.
pub type Target = fn(&[u8]);

/// The targets, by name: `mesh-node/fuzz/fuzz_targets/<name>.rs` calls the function of the same
/// name, and `mesh-node/fuzz/corpus/<name>/` holds its corpus.
pub const TARGETS: &[(&str, Target)] = &[
    ("request_framing", request_framing),
    ("relay", relay),
    ("answer", answer),
    ("chunked", chunked),
    ("response_head", response_head),
    ("path", path),
    ("headers", headers),
    ("placement", placement),
    ("config_update", config_update),
];

/// Differential, twice, for the destination relay that frames a pipelined HTTP/1.1 stream from
/// another node:
/// - against hyper's server (what many pods run) on the same bytes: where both accept a request
///   they must agree on its method, target and body, and the relay must not forward a request
///   hyper refuses (the relay is to be the stricter one);
/// - against hyper on what the relay writes to the pod: the pod must read exactly the requests
///   the relay judged, no more, no fewer, with the same bodies. Anything else is smuggling.
pub fn request_framing(data: &[u8]) {
    let (ours, error) = relay::frame_requests(data);
    // Up to the first request the relay refuses itself: after it, the pod's view of the stream
    // is only what the relay forwards (checked below), not these bytes.
    let judged = ours.iter().position(|r| r.refused).unwrap_or(ours.len());
    let theirs = hyper_requests(data);
    for (i, (o, t)) in ours[..judged].iter().zip(&theirs).enumerate() {
        assert_eq!(
            (o.method.as_str(), o.uri.as_str(), &decoded(o)[..]),
            (t.0.as_str(), t.1.as_str(), &t.2[..]),
            "request {i}: the relay and hyper frame these bytes differently"
        );
    }
    if judged > theirs.len() {
        let o = &ours[theirs.len()];
        assert!(
            relay_may_accept_what_hyper_refuses(o),
            "the relay forwards a request hyper refuses: {o:?} (then {error:?})"
        );
    }
    let forwarded: Vec<u8> = ours.iter().flat_map(|r| r.forwarded.to_vec()).collect();
    let seen = hyper_requests(&forwarded);
    let sent: Vec<_> = ours.iter().filter(|r| !r.refused).collect();
    assert_eq!(
        seen.len(),
        sent.len(),
        "the pod reads {} requests where the relay judged {}: {forwarded:?}",
        seen.len(),
        sent.len()
    );
    for (o, t) in sent.iter().zip(&seen) {
        assert_eq!(o.method, t.0, "{forwarded:?}");
        assert_eq!(&decoded(o)[..], &t.2[..], "{forwarded:?}");
    }
}

/// Requests the relay forwards though hyper refuses them, and why that is safe.
fn relay_may_accept_what_hyper_refuses(r: &relay::Framed) -> bool {
    // Nothing known yet: each case the fuzzer finds is decided here, with its reason.
    let _ = r;
    false
}

/// The body the relay forwards, decoded (chunked framing removed) for comparison.
fn decoded(r: &relay::Framed) -> Vec<u8> {
    if r.body != BodyKind::Chunked {
        return r.raw_body.to_vec();
    }
    let mut buf = r.raw_body.clone();
    let mut d = Chunked::decoder();
    let mut out = Vec::new();
    loop {
        match d.decode(&mut buf) {
            Ok(Decoded::Data(b)) => out.extend_from_slice(&b),
            Ok(Decoded::End(_)) => return out,
            // The scanner accepted this body whole: the decoder must too.
            other => panic!("the scanner accepted a chunked body the decoder does not: {other:?}"),
        }
    }
}

thread_local! {
    static RUNTIME: RefCell<tokio::runtime::Runtime> = RefCell::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime"),
    );
}

/// The requests hyper's HTTP/1.1 server reads whole from `input` (method, target, body).
fn hyper_requests(input: &[u8]) -> Vec<(String, String, Vec<u8>)> {
    type Seen = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let record = record.clone();
        async move {
            let (parts, body) = req.into_parts();
            if let Ok(body) = body.collect().await {
                record.locked().push((
                    parts.method.to_string(),
                    parts.uri.to_string(),
                    body.to_bytes().to_vec(),
                ));
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(
                http_body_util::Empty::<Bytes>::new(),
            ))
        }
    });
    let io = hyper_util::rt::TokioIo::new(Peer::sending(input));
    RUNTIME.with(|rt| {
        rt.borrow().block_on(async {
            let conn = hyper::server::conn::http1::Builder::new()
                .max_headers(h1frame::MAX_FIELDS)
                // Reads every pipelined request after the input ends, as a pod would read them
                // off a connection the relay keeps open.
                .half_close(true)
                .serve_connection(io, svc);
            let _ = conn.await;
        })
    });
    std::mem::take(&mut *seen.locked())
}

/// The destination relay, whole, between a source stream and a pod that both send arbitrary
/// bytes. Layout: `[step][source length: u16 BE][source bytes][pod bytes]`; the source's bytes
/// arrive in reads of `step % 64 + 1` bytes, and every connection to the pod answers with the pod
/// bytes and closes. The relay must end (both sides end), and what the source receives must be
/// exactly one well-framed answer per request the relay finished: an extra or cut answer
/// desynchronizes the source's connection (response smuggling).
pub fn relay(data: &[u8]) {
    let [step, hi, lo, rest @ ..] = data else {
        return;
    };
    let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
    let (source, answers) = rest.split_at(len);
    let mut carrier = Source {
        frames: source
            .chunks(usize::from(*step % 64) + 1)
            .map(Bytes::copy_from_slice)
            .collect(),
        out: Vec::new(),
        ended: None,
    };
    let gate = Judge::default();
    let answers = Bytes::copy_from_slice(answers);
    let dial = || {
        let answers = answers.clone();
        async move {
            let (ours, theirs) = tokio::io::duplex(64 << 10);
            tokio::spawn(fake_pod(theirs, answers));
            Ok::<_, crate::http::respond::ProxyError>(ours)
        }
    };
    let staying = crate::proxy::drain::Drain::new();
    let served = RUNTIME.with(|rt| {
        rt.borrow().block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(2),
                relay::serve(&mut carrier, &gate, dial, &staying.watch()),
            )
            .await
        })
    });
    let Ok(served) = served else {
        panic!("the relay hung though both ends were done");
    };
    if served.is_err() || carrier.ended == Some(false) {
        // Aborted: the source sees a reset stream and drops what came on it.
        return;
    }
    let finished = std::mem::take(&mut *gate.finished.locked());
    let answered = answers_in(&carrier.out, &finished).unwrap_or_else(|e| {
        panic!(
            "the source got answers it cannot frame ({e}) for {finished:?}: {:?}",
            String::from_utf8_lossy(&carrier.out)
        )
    });
    assert_eq!(
        answered,
        finished.len(),
        "the source got {answered} answers for {} requests: {:?}",
        finished.len(),
        String::from_utf8_lossy(&carrier.out)
    );
}

/// How many final answers `out` holds, framed as the source frames them (`methods`: the
/// requests answered, in order, for `HEAD`); an error if they do not end exactly at its end.
fn answers_in(out: &[u8], methods: &[String]) -> Result<usize, String> {
    let (mut at, mut answered) = (0, 0);
    while at < out.len() {
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; h1frame::MAX_FIELDS];
        let (n, code, kind) = match h1frame::parse_response(&out[at..], &mut fields) {
            Ok(httparse::Status::Complete((n, r))) => {
                let code = r.code.unwrap_or(0);
                let head = methods.get(answered).is_some_and(|m| m == "HEAD");
                let kind = h1frame::response_body(r.version, code, head, r.headers)
                    .map_err(|e| format!("answer {answered}: {e}"))?;
                (n, code, kind)
            }
            Ok(httparse::Status::Partial) => return Err(format!("a cut head at {at}")),
            Err(e) => return Err(format!("answer {answered} at {at}: {e}")),
        };
        at += n;
        match kind {
            BodyKind::None => {}
            BodyKind::Length(len) => {
                let len = usize::try_from(len).map_err(|e| e.to_string())?;
                if out.len() - at < len {
                    return Err(format!("answer {answered}: a cut body"));
                }
                at += len;
            }
            BodyKind::Chunked => {
                let (used, end) = Chunked::default()
                    .scan(&out[at..])
                    .map_err(|e| format!("answer {answered}: {e}"))?;
                if !end {
                    return Err(format!("answer {answered}: a cut chunked body"));
                }
                at += used;
            }
            BodyKind::UntilClose => at = out.len(),
        }
        // Interim answers (1xx) precede the final one.
        if code >= 200 {
            answered += 1;
        }
    }
    Ok(answered)
}

/// The source's side of a carried stream, in memory.
struct Source {
    frames: std::collections::VecDeque<Bytes>,
    out: Vec<u8>,
    /// `Some(true)` finished, `Some(false)` aborted.
    ended: Option<bool>,
}

impl relay::Carrier for Source {
    async fn recv(&mut self) -> Result<Option<Bytes>, relay::RelayError> {
        Ok(self.frames.pop_front())
    }
    async fn send(&mut self, data: Bytes) -> Result<(), relay::RelayError> {
        self.out.extend_from_slice(&data);
        Ok(())
    }
    fn send_head(&mut self, data: Bytes) -> Result<(), relay::RelayError> {
        self.out.extend_from_slice(&data);
        Ok(())
    }
    fn finish(&mut self) {
        self.ended = Some(true);
    }
    fn abort(&mut self) {
        self.ended = Some(false);
    }
    async fn cancelled(&mut self) {
        std::future::pending().await
    }
}

/// Denies `/deny`; keeps the method of each request answered, in order.
#[derive(Default)]
struct Judge {
    finished: Mutex<Vec<String>>,
}

impl relay::Gate for Judge {
    type Ticket = String;
    fn admit(
        &self,
        req: &mut http::Request<()>,
        _: Option<&http::HeaderValue>,
    ) -> (String, Result<(), crate::http::respond::ProxyError>) {
        let verdict = if req.uri().path() == "/deny" {
            Err(crate::http::respond::ProxyError::Denied("fuzz rule".into()))
        } else {
            Ok(())
        };
        (req.method().to_string(), verdict)
    }
    fn finish(&self, method: String, _: u16, _: Option<crate::http::respond::Flag>, _: (u64, u64)) {
        self.finished.locked().push(method);
    }
}

/// A pod that answers `answers` whatever it is asked, closes its side, and reads until the relay
/// closes the connection.
async fn fake_pod(mut io: tokio::io::DuplexStream, answers: Bytes) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = io.write_all(&answers).await;
    let _ = io.shutdown().await;
    let mut sink = [0u8; 4096];
    while let Ok(n) = io.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

/// Differential: the source's reading of an answer off a carried stream against hyper's client
/// on the same bytes (first byte: whether the request was `HEAD`). Where both accept the answer
/// they must agree on its status and body; the source must not accept an answer hyper refuses.
pub fn answer(data: &[u8]) {
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    let head_request = flags & 1 == 1;
    let ours = crate::http::exchange::frame_answer(input, head_request);
    let theirs = hyper_answer(input, head_request);
    match (&ours, &theirs) {
        (Ok(o), Some((status, body))) => assert_eq!(
            (o.status, &o.body[..]),
            (*status, &body[..]),
            "the source and hyper read this answer differently"
        ),
        (Ok(o), None) => panic!("the source accepts an answer hyper refuses: {o:?}"),
        (Err(_), _) => {}
    }
}

/// The answer hyper's HTTP/1.1 client reads from `input` for one request: status and body.
fn hyper_answer(input: &[u8], head_request: bool) -> Option<(u16, Vec<u8>)> {
    let io = hyper_util::rt::TokioIo::new(Peer::answering(input));
    RUNTIME.with(|rt| {
        rt.borrow().block_on(async {
            // As many fields as the source takes: the target compares framing, not limits.
            let (mut send, conn) = hyper::client::conn::http1::Builder::new()
                .max_headers(h1frame::MAX_FIELDS)
                .handshake(io)
                .await
                .ok()?;
            let method = if head_request {
                http::Method::HEAD
            } else {
                http::Method::GET
            };
            let req = http::Request::builder()
                .method(method)
                .uri("/")
                .header("host", "a")
                .body(http_body_util::Empty::<Bytes>::new())
                .ok()?;
            // The connection is driven on its own, as hyper's client wants: it may end (the
            // input is all read) before the body is collected.
            tokio::spawn(conn);
            let resp = send.send_request(req).await.ok()?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            Some((status, body.to_vec()))
        })
    })
}

/// The other end of an in-memory connection: it sends `input`, then closes its side; what is
/// written to it is dropped.
struct Peer {
    input: Bytes,
    /// Whether it may send yet: a server answers only once asked (hyper's client refuses an
    /// answer that comes before its request).
    asked: bool,
    reader: Option<std::task::Waker>,
}

impl Peer {
    /// A client that sent `input` at once.
    fn sending(input: &[u8]) -> Self {
        Self {
            input: Bytes::copy_from_slice(input),
            asked: true,
            reader: None,
        }
    }

    /// A server that answers `input` to the first bytes written to it.
    fn answering(input: &[u8]) -> Self {
        Self {
            asked: false,
            ..Self::sending(input)
        }
    }
}

impl tokio::io::AsyncRead for Peer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.asked {
            self.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = self.input.len().min(buf.remaining());
        buf.put_slice(&self.input.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Peer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.asked = true;
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The chunked framer: the destination's scanner and the source's decoder must agree on where a
/// body ends (or both refuse it), however the bytes are split into reads.
pub fn chunked(data: &[u8]) {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let whole = Chunked::default().scan(body);
    // The same bytes in reads of `step` bytes.
    let step = usize::from(split % 16) + 1;
    let mut scanner = Chunked::default();
    let (mut used, mut pieces) = (0, Ok((0, false)));
    for piece in body.chunks(step) {
        pieces = scanner.scan(piece).map(|(n, end)| {
            used += n;
            (used, end)
        });
        if !matches!(pieces, Ok((_, false))) {
            break;
        }
    }
    match (&whole, &pieces) {
        (Ok(w), Ok(p)) => assert_eq!(w, p, "the split into reads moved the body's end"),
        (Err(_), Err(_)) => {}
        _ => panic!("one read refuses what reads of {step} bytes accept: {whole:?} vs {pieces:?}"),
    }
    // The decoder, fed the same bytes at once.
    let mut buf = Bytes::copy_from_slice(body);
    let mut d = Chunked::decoder();
    let mut data_len = 0;
    let decoded = loop {
        match d.decode(&mut buf) {
            Ok(Decoded::Data(b)) => data_len += b.len(),
            Ok(Decoded::More) => break Ok((body.len() - buf.len(), false)),
            Ok(Decoded::End(_)) => break Ok((body.len() - buf.len(), true)),
            Err(e) => break Err(e),
        }
    };
    match (&whole, &decoded) {
        (Ok(w), Ok(d)) => assert_eq!(w, d, "the scanner and the decoder end the body apart"),
        // The decoder also turns trailers into header fields: it may refuse what the scanner
        // passes on, never the other way round.
        (Ok((_, true)), Err(h1frame::FrameError::BadTrailers(_))) => {}
        (Err(_), Err(_)) => {}
        _ => panic!("the scanner and the decoder disagree: {whole:?} vs {decoded:?}"),
    }
    assert!(data_len <= body.len(), "more data than input");
}

/// A response head as the source parses an answer (first byte: whether the request was `HEAD`),
/// then its body framing and, when chunked, its body.
pub fn response_head(data: &[u8]) {
    let Some((&flags, buf)) = data.split_first() else {
        return;
    };
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; 64];
    let Ok(httparse::Status::Complete((n, r))) = h1frame::parse_response(buf, &mut fields) else {
        return;
    };
    let status = r.code.unwrap_or(0);
    let head = flags & 1 == 1;
    if let Ok(BodyKind::Chunked) = h1frame::response_body(r.version, status, head, r.headers) {
        chunked(&[[flags].as_slice(), &buf[n..]].concat());
    }
}

/// Path normalization: what it returns is normal (normalizing it again changes nothing) and has
/// no segment a server could read as another path.
pub fn path(data: &[u8]) {
    // What the proxies normalize: the path of a request target as `http` parses it (no query).
    let Ok(target) = http::uri::PathAndQuery::try_from(data) else {
        return;
    };
    let p = target.path();
    for slashes in [
        EscapedSlashes::Reject,
        EscapedSlashes::Keep,
        EscapedSlashes::Decode,
    ] {
        let Ok(n) = sanitize::normalize(p, slashes) else {
            continue;
        };
        if n == "*" {
            continue;
        }
        let again = sanitize::normalize(&n, slashes)
            .unwrap_or_else(|e| panic!("{p:?} normalized to {n:?}, which is refused: {e}"));
        assert_eq!(again, n, "{p:?}: normalizing {n:?} again changed it");
        assert!(n.starts_with('/'), "{p:?} -> {n:?}");
        let path = &n[..];
        for seg in path.split('/').skip(1) {
            let name = seg.split(';').next().unwrap_or("");
            assert!(
                name != "." && name != "..",
                "{p:?} -> {n:?} keeps a dot segment"
            );
        }
        assert!(
            !path.contains("//"),
            "{p:?} -> {n:?} keeps an empty segment"
        );
        assert!(
            !path.contains('\\') && !path.contains('\0'),
            "{p:?} -> {n:?}"
        );
    }
}

/// Headers peers and apps send and the proxy reads: `Forwarded` (on the tunnel), trace context
/// (`traceparent`, B3), CONNECT targets. Lines of `name: value`.
pub fn headers(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut map = http::HeaderMap::new();
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.trim().as_bytes()),
            http::HeaderValue::from_str(value.trim()),
        ) {
            map.append(n, v);
        }
        let _ = crate::policy::enforce::forwarded_for(value);
        let _ = value.trim().parse::<http::uri::Authority>();
    }
    let _ = crate::telemetry::trace::extract(&map);
}

/// The placement file (`--placement`), as the node reads it at start and on every change.
pub fn placement(data: &[u8]) {
    let _ = mesh_api::placement::Placement::parse(data);
}

/// A configuration update from the controller (also the form the node saves its last
/// configuration in, and reads back at start): decoded, then converted to the node's config.
pub fn config_update(data: &[u8]) {
    let Ok(u) = mesh_api::config::v1::ConfigUpdate::decode(data) else {
        return;
    };
    let mut held = crate::config::node::Resources::new();
    let first = crate::config::subscribe::apply(&mut held, 0, "n0", "cluster.local", u.clone());
    // A delta on top of what was accepted must apply or be refused, never panic.
    if let Ok(Some(cfg)) = first {
        let mut delta = u;
        delta.base_version = cfg.version;
        let _ =
            crate::config::subscribe::apply(&mut held, cfg.version, "n0", "cluster.local", delta);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::TARGETS;

    /// Every committed input of every target: the fuzzers' findings stay regression tests.
    #[test]
    fn the_committed_corpora_replay_clean() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let mut replayed = 0;
        for (name, target) in TARGETS {
            let dir = root.join(name);
            let entries = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("no corpus for {name} at {}: {e}", dir.display()));
            for e in entries {
                let path = e.unwrap().path();
                let input = std::fs::read(&path).unwrap();
                let run = std::panic::catch_unwind(|| target(&input));
                assert!(run.is_ok(), "{name}: {} fails", path.display());
                replayed += 1;
            }
        }
        assert!(replayed >= TARGETS.len(), "{replayed} inputs");
    }
}
