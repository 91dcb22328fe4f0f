//! Request figures by bounded labels: each label has a budget of distinct values; values beyond it
//! are reported as `overflow`, so a misbehaving client cannot blow up the time series.
use mesh_api::sync::LockExt;
use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use super::body::Body;

use serde::Serialize;

use crate::telemetry::metrics::DURATION_BUCKETS;

pub const OVERFLOW: &str = "overflow";

/// Labels of one request series. Recorded borrowed (`RequestLabels<&str>`, no allocation per
/// request), kept owned.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct RequestLabels<S = String> {
    /// `source` (the caller's node proxy) or `destination` (the callee's).
    pub reporter: &'static str,
    pub source_workload: S,
    pub source_namespace: S,
    pub source_principal: S,
    pub destination_service: S,
    pub destination_workload: S,
    pub destination_namespace: S,
    pub response_code: u16,
    /// The gRPC status in the response headers, or empty.
    pub grpc_status: S,
    /// Envoy-style flag of what the proxy did (`-` when nothing).
    pub response_flags: &'static str,
    /// `mutual_tls` or `plaintext`.
    pub connection_security: &'static str,
}

impl RequestLabels<&str> {
    fn owned(&self) -> RequestLabels {
        RequestLabels {
            reporter: self.reporter,
            source_workload: self.source_workload.into(),
            source_namespace: self.source_namespace.into(),
            source_principal: self.source_principal.into(),
            destination_service: self.destination_service.into(),
            destination_workload: self.destination_workload.into(),
            destination_namespace: self.destination_namespace.into(),
            response_code: self.response_code,
            grpc_status: self.grpc_status.into(),
            response_flags: self.response_flags,
            connection_security: self.connection_security,
        }
    }
}

/// Derived `Hash` hashes `&str` and `String` fields alike, so a borrowed set of labels finds its
/// owned series.
impl hashbrown::Equivalent<RequestLabels> for RequestLabels<&str> {
    fn equivalent(&self, k: &RequestLabels) -> bool {
        // The numbers first: a connection's recent series mostly differ by status.
        self.response_code == k.response_code
            && self.reporter == k.reporter
            && self.source_workload == k.source_workload
            && self.source_namespace == k.source_namespace
            && self.source_principal == k.source_principal
            && self.destination_service == k.destination_service
            && self.destination_workload == k.destination_workload
            && self.destination_namespace == k.destination_namespace
            && self.grpc_status == k.grpc_status
            && self.response_flags == k.response_flags
            && self.connection_security == k.connection_security
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RequestFigures {
    pub count: u64,
    pub duration_sum_seconds: f64,
    /// Cumulative counts per `DURATION_BUCKETS` bound.
    pub duration_buckets: [u64; DURATION_BUCKETS.len()],
    pub request_bytes: u64,
    pub response_bytes: u64,
}

#[derive(Debug)]
pub struct L7Stats {
    budget: usize,
    seen: Mutex<HashMap<&'static str, HashSet<String>>>,
    series: Mutex<hashbrown::HashMap<RequestLabels, Arc<Series>>>,
}

impl L7Stats {
    pub fn new(label_budget: usize) -> Self {
        Self {
            budget: label_budget,
            seen: Mutex::default(),
            series: Mutex::default(),
        }
    }

    /// `value`, or `overflow` when the label has used its budget on other values.
    fn bounded(&self, label: &'static str, value: String) -> String {
        let mut seen = self.seen.locked();
        let set = seen.entry(label).or_default();
        if set.contains(&value) || set.len() < self.budget {
            set.insert(value.clone());
            value
        } else {
            OVERFLOW.to_string()
        }
    }

    fn bound(&self, mut l: RequestLabels) -> RequestLabels {
        l.source_workload = self.bounded("source_workload", l.source_workload);
        l.source_namespace = self.bounded("source_namespace", l.source_namespace);
        l.source_principal = self.bounded("source_principal", l.source_principal);
        l.destination_service = self.bounded("destination_service", l.destination_service);
        l.destination_workload = self.bounded("destination_workload", l.destination_workload);
        l.destination_namespace = self.bounded("destination_namespace", l.destination_namespace);
        l.grpc_status = self.bounded("grpc_status", l.grpc_status);
        l
    }

    /// A request answered (headers sent) after `took`, with the body sizes known then (declared
    /// lengths). Bodies that stream on count into the returned series as they go ([`Counted`]).
    pub fn record(
        &self,
        labels: RequestLabels<&str>,
        took: Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) -> Arc<Series> {
        let series = self.series_of(&labels);
        series.add(took, request_bytes, response_bytes);
        series
    }

    /// [`record`](Self::record) through a connection's `recent` series: the one whose key `is`
    /// this request's, else the map's, kept under the key `new` makes. A request with a known key
    /// (nearly every one) compares no label and skips the shared map, whose lock both cores
    /// write. Comparing labels was most of a request's metrics cost at the destination (`perf`:
    /// about 0.3 us of 9 us, in `memcmp`). The series is handed back only when `keep` (a body
    /// still to count into it): its count is shared by every connection's requests.
    pub fn record_recent<'l, K>(
        &self,
        recent: &Recent<K>,
        is: impl Fn(&K) -> bool,
        new: impl FnOnce() -> (K, RequestLabels<&'l str>),
        took: Duration,
        (request_bytes, response_bytes): (u64, u64),
        keep: bool,
    ) -> Option<Arc<Series>> {
        let mut r = recent.0.locked();
        let at = match r.iter().position(|(k, _)| is(k)) {
            Some(at) => at,
            None => {
                let (key, labels) = new();
                let s = self.series_of(&labels);
                if r.len() == RECENT {
                    r.remove(0);
                }
                r.push((key, s));
                r.len() - 1
            }
        };
        let series = &r[at].1;
        series.add(took, request_bytes, response_bytes);
        keep.then(|| series.clone())
    }

    fn series_of(&self, labels: &RequestLabels<&str>) -> Arc<Series> {
        // A series that exists was within budget when it was made: the common case is one
        // lookup, no allocation, no per-label bookkeeping.
        let known = self.series.locked().get(labels).cloned();
        match known {
            Some(s) => s,
            None => {
                let labels = self.bound(labels.owned());
                self.series.locked().entry(labels).or_default().clone()
            }
        }
    }

    pub fn snapshot(&self) -> Vec<(RequestLabels, RequestFigures)> {
        let mut v: Vec<_> = self
            .series
            .locked()
            .iter()
            .map(|(l, f)| (l.clone(), f.0.locked().clone()))
            .collect();
        v.sort_by(|a, b| format!("{:?}", a.0).cmp(&format!("{:?}", b.0)));
        v
    }
}

/// How many series a connection remembers: a few statuses per route.
const RECENT: usize = 4;

/// The series one connection recorded into last, by a key of its own: a key that `is` a request
/// must mean the request's labels are the key's (before the label budget, which then gives the
/// same series again). Series are never removed from [`L7Stats`], so a remembered one stays the
/// one the map would give.
#[derive(Debug)]
pub struct Recent<K>(Mutex<Vec<(K, Arc<Series>)>>);

impl<K> Default for Recent<K> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

/// One series' figures.
#[derive(Debug, Default)]
pub struct Series(Mutex<RequestFigures>);

impl Series {
    fn add(&self, took: Duration, request_bytes: u64, response_bytes: u64) {
        let secs = took.as_secs_f64();
        let mut f = self.0.locked();
        f.count += 1;
        f.duration_sum_seconds += secs;
        for (i, b) in DURATION_BUCKETS.iter().enumerate() {
            if secs <= *b {
                f.duration_buckets[i] += 1;
            }
        }
        f.request_bytes += request_bytes;
        f.response_bytes += response_bytes;
    }

    fn add_bytes(&self, dir: Direction, n: u64) {
        let mut f = self.0.locked();
        match dir {
            Direction::Request => f.request_bytes += n,
            Direction::Response => f.response_bytes += n,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Direction {
    Request,
    Response,
}

/// Bytes of a body counted before its series is known (a request body streams before the
/// response that decides its labels), moved into the series once it is.
#[derive(Debug, Default)]
pub struct Pending {
    bytes: AtomicU64,
    series: OnceLock<Arc<Series>>,
}

impl Pending {
    fn add(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::AcqRel);
        self.flush();
    }

    /// Moves what was counted so far into the series; each byte moves once (`swap`).
    fn flush(&self) {
        if let Some(s) = self.series.get() {
            let n = self.bytes.swap(0, Ordering::AcqRel);
            if n > 0 {
                s.add_bytes(Direction::Request, n);
            }
        }
    }

    pub fn attach(&self, series: &Arc<Series>) {
        let _ = self.series.set(series.clone());
        self.flush();
    }
}

enum Sink {
    Series(Arc<Series>, Direction),
    Pending(Arc<Pending>),
}

/// A body whose data bytes are counted into request metrics as it streams: used only for bodies
/// without a `Content-Length` (gRPC, chunked), whose size is not known up front.
pub struct Counted {
    inner: Body,
    sink: Sink,
}

impl Counted {
    pub fn response(inner: Body, series: Arc<Series>) -> Self {
        Self {
            inner,
            sink: Sink::Series(series, Direction::Response),
        }
    }

    pub fn request(inner: Body, pending: Arc<Pending>) -> Self {
        Self {
            inner,
            sink: Sink::Pending(pending),
        }
    }
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = super::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let frame = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(d) = f.data_ref()
        {
            let n = d.len() as u64;
            match &self.sink {
                Sink::Series(s, dir) => s.add_bytes(*dir, n),
                Sink::Pending(p) => p.add(n),
            }
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Counts `req`'s body as it streams when its size is unknown; attach the result to the series
/// once recorded.
pub fn count_request(req: &mut http::Request<Body>) -> Option<Arc<Pending>> {
    if !streams(req.headers(), req.body()) {
        return None;
    }
    let p = Arc::new(Pending::default());
    let body = std::mem::replace(req.body_mut(), super::body::empty());
    *req.body_mut() = super::body::boxed(Counted::request(body, p.clone()));
    Some(p)
}

/// Attaches a counted request body to `series`, and counts `resp`'s body into it as it streams
/// when its size is unknown.
pub fn count_response(
    resp: http::Response<Body>,
    series: Arc<Series>,
    pending: Option<Arc<Pending>>,
) -> http::Response<Body> {
    if let Some(p) = pending {
        p.attach(&series);
    }
    if streams(resp.headers(), resp.body()) {
        resp.map(|b| super::body::boxed(Counted::response(b, series)))
    } else {
        resp
    }
}

/// Whether a gRPC response's status is still to come, in trailers (not in its headers, and the
/// body not over).
pub fn status_in_trailers(grpc: bool, resp: &http::Response<Body>) -> bool {
    use http_body::Body as _;
    grpc && !resp.headers().contains_key(&super::GRPC_STATUS_HEADER) && !resp.body().is_end_stream()
}

/// A gRPC response whose status arrives in its trailers: the request is recorded when they do
/// (or when the body ends or is dropped without them), with that status and the bytes streamed.
pub fn record_at_trailers(
    stats: &Arc<L7Stats>,
    labels: RequestLabels<&str>,
    started: std::time::Instant,
    request_bytes: u64,
    resp: http::Response<Body>,
    pending: Option<Arc<Pending>>,
) -> http::Response<Body> {
    let declared = super::content_length(resp.headers());
    let deferred = Deferred {
        stats: stats.clone(),
        labels: labels.owned(),
        started,
        request_bytes,
        response_bytes: declared,
        count_body: declared == 0,
        pending,
    };
    resp.map(|inner| {
        super::body::boxed(Trailed {
            inner,
            deferred: Some(deferred),
        })
    })
}

struct Deferred {
    stats: Arc<L7Stats>,
    labels: RequestLabels,
    started: std::time::Instant,
    request_bytes: u64,
    response_bytes: u64,
    count_body: bool,
    pending: Option<Arc<Pending>>,
}

impl Deferred {
    fn finish(self, grpc_status: &str) {
        let l = &self.labels;
        let series = self.stats.record(
            RequestLabels {
                reporter: l.reporter,
                source_workload: &l.source_workload,
                source_namespace: &l.source_namespace,
                source_principal: &l.source_principal,
                destination_service: &l.destination_service,
                destination_workload: &l.destination_workload,
                destination_namespace: &l.destination_namespace,
                response_code: l.response_code,
                grpc_status,
                response_flags: l.response_flags,
                connection_security: l.connection_security,
            },
            self.started.elapsed(),
            self.request_bytes,
            self.response_bytes,
        );
        if let Some(p) = self.pending {
            p.attach(&series);
        }
    }
}

struct Trailed {
    inner: Body,
    deferred: Option<Deferred>,
}

impl http_body::Body for Trailed {
    type Data = bytes::Bytes;
    type Error = super::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let frame = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref()
                    && let Some(def) = self.deferred.as_mut()
                    && def.count_body
                {
                    def.response_bytes += d.len() as u64;
                } else if let Some(t) = f.trailers_ref()
                    && let Some(def) = self.deferred.take()
                {
                    let status = t
                        .get(&super::GRPC_STATUS_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    def.finish(&status);
                }
            }
            None | Some(Err(_)) => {
                if let Some(def) = self.deferred.take() {
                    def.finish("");
                }
            }
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Trailed {
    fn drop(&mut self) {
        // The client went away before the trailers: recorded without a status.
        if let Some(def) = self.deferred.take() {
            def.finish("");
        }
    }
}

/// Whether a message's body size is unknown up front (no `Content-Length`, not empty), so it is
/// counted as it streams.
pub fn streams(headers: &http::HeaderMap, body: &Body) -> bool {
    use http_body::Body as _;
    !headers.contains_key(http::header::CONTENT_LENGTH) && !body.is_end_stream()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(src: &str) -> RequestLabels<&str> {
        RequestLabels {
            reporter: "source",
            source_workload: src,
            source_namespace: "ns",
            source_principal: "",
            destination_service: "ns/web",
            destination_workload: "web-0",
            destination_namespace: "ns",
            response_code: 200,
            grpc_status: "",
            response_flags: "-",
            connection_security: "mutual_tls",
        }
    }

    #[tokio::test]
    async fn streamed_bodies_count_into_their_series() {
        use http_body_util::{BodyExt, StreamBody};
        let chunks = |n: usize| {
            let frames: Vec<Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>> = (0
                ..n)
                .map(|_| Ok(http_body::Frame::data(bytes::Bytes::from_static(b"12345"))))
                .collect();
            super::super::body::boxed(StreamBody::new(tokio_stream::iter(frames)))
        };
        let s = L7Stats::new(10);
        let mut req = http::Request::new(chunks(3));
        let pending = count_request(&mut req).expect("no Content-Length: counted");
        // Two chunks stream before the response decides the labels, one after.
        let mut body = req.into_body();
        body.frame().await.unwrap().unwrap();
        body.frame().await.unwrap().unwrap();
        let series = s.record(labels("a"), Duration::from_millis(1), 0, 0);
        let resp = count_response(http::Response::new(chunks(4)), series, Some(pending));
        body.frame().await.unwrap().unwrap();
        resp.into_body().collect().await.unwrap();
        let f = &s.snapshot()[0].1;
        assert_eq!((f.request_bytes, f.response_bytes), (15, 20));
        // A declared length is taken as recorded; the body is not wrapped.
        let mut req = http::Request::new(super::super::body::full("abc"));
        req.headers_mut().insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from_static("3"),
        );
        assert!(count_request(&mut req).is_none());
    }

    #[test]
    fn labels_beyond_the_budget_overflow() {
        let s = L7Stats::new(2);
        for w in ["a", "b", "c", "d", "a"] {
            s.record(labels(w), Duration::from_millis(3), 10, 0);
        }
        let snap = s.snapshot();
        let by: HashMap<String, u64> = snap
            .iter()
            .map(|(l, f)| (l.source_workload.clone(), f.count))
            .collect();
        assert_eq!(by["a"], 2);
        assert_eq!(by["b"], 1);
        assert_eq!(by[OVERFLOW], 2);
        assert_eq!(by.len(), 3);
        let (_, f) = snap.iter().find(|(l, _)| l.source_workload == "a").unwrap();
        // 3 ms: in every bucket from 5 ms up.
        assert_eq!(f.duration_buckets[2], 0);
        assert_eq!(f.duration_buckets[3], 2);
    }

    /// A connection's recent series give the same figures as the map: by status, within the
    /// label budget, with more distinct series than it remembers.
    #[test]
    fn recent_series_count_as_the_map_does() {
        let (direct, via) = (L7Stats::new(2), L7Stats::new(2));
        let recent = Recent::default();
        let requests = [
            ("a", 200),
            ("a", 200),
            ("a", 503),
            ("b", 200),
            ("c", 200),
            ("d", 200),
            ("c", 404),
            ("a", 200),
            ("c", 200),
            ("a", 503),
        ];
        for (w, code) in requests {
            let l = || RequestLabels {
                response_code: code,
                ..labels(w)
            };
            direct.record(l(), Duration::from_millis(3), 10, 1);
            let took = Duration::from_millis(3);
            let is = |k: &(&str, u16)| *k == (w, code);
            via.record_recent(&recent, is, || ((w, code), l()), took, (10, 1), false);
        }
        let figures = |s: &L7Stats| -> Vec<(String, u16, u64, u64)> {
            s.snapshot()
                .into_iter()
                .map(|(l, f)| (l.source_workload, l.response_code, f.count, f.request_bytes))
                .collect()
        };
        assert_eq!(figures(&via), figures(&direct));
        assert!(figures(&via).contains(&(OVERFLOW.to_string(), 200, 3, 30)));
        assert_eq!(recent.0.lock().unwrap().len(), RECENT);
    }
}
