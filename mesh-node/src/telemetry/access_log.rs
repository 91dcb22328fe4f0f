//! Access logs: one JSON line per HTTP request or TCP connection, on stdout (operational logs go
//! to stderr, so the two streams stay apart).
//!
//! Whether a line is written is decided per namespace of the workload this node serves on that
//! side (the client's on the source side, the destination's on the destination side): a Telemetry
//! in that namespace says on or off and the sample share; without one, the node's default
//! (`--access-log`, off unless set) applies.
use mesh_api::sync::LockExt;
use std::{
    io::Write,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tokio::sync::watch;

use crate::config::node::NodeConfig;

/// `--access-log`: the percent of requests and connections logged in namespaces without a
/// Telemetry.
pub struct AccessLog {
    default_percent: f64,
    config: Option<watch::Receiver<Arc<NodeConfig>>>,
    out: Mutex<Box<dyn Write + Send>>,
    /// Lines written (for `/v1/counters`).
    pub written: AtomicU64,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("default_percent", &self.default_percent)
            .finish_non_exhaustive()
    }
}

/// One side of a connection or request.
#[derive(Debug, Default, Serialize)]
pub struct Peer<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    pub workload: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub namespace: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub principal: &'a str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub address: String,
}

/// The HTTP part of an entry.
#[derive(Debug, Default, Serialize)]
pub struct Http<'a> {
    pub method: &'a str,
    pub path: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub authority: &'a str,
    pub status: u16,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub grpc_status: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub route: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub trace_id: &'a str,
}

/// One line, made with [`Entry::new`] and the setters after it.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    reporter: Reporter,
    kind: Kind,
    source: Peer<'a>,
    destination: Peer<'a>,
    #[serde(skip_serializing_if = "str::is_empty")]
    service: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<Http<'a>>,
    /// `allowed`, or why not (`denied by ...`, `rate limited`, ...).
    decision: &'a str,
    /// What the proxy did (Envoy's response flags; `-`: nothing).
    flags: &'a str,
    security: Security,
    bytes_received: u64,
    bytes_sent: u64,
    duration_ms: f64,
}

/// Which node proxy wrote a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reporter {
    Source,
    Destination,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Tcp,
    Http,
}

/// How the connection between the two proxies (or the caller and the destination's) was
/// secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    MutualTls,
    Plaintext,
}

impl Security {
    pub const fn as_str(self) -> &'static str {
        match self {
            Security::MutualTls => "mutual_tls",
            Security::Plaintext => "plaintext",
        }
    }
}

impl<'a> Entry<'a> {
    /// A TCP connection's line, timed from `started`: allowed, no flag, over mutual TLS, no
    /// bytes, unless the setters below say otherwise.
    pub fn new(
        reporter: Reporter,
        source: Peer<'a>,
        destination: Peer<'a>,
        started: Instant,
    ) -> Self {
        Entry {
            reporter,
            kind: Kind::Tcp,
            source,
            destination,
            service: "",
            http: None,
            decision: "allowed",
            flags: "-",
            security: Security::MutualTls,
            bytes_received: 0,
            bytes_sent: 0,
            duration_ms: millis(started.elapsed()),
        }
    }

    /// An HTTP request's line instead.
    pub fn http(mut self, http: Http<'a>) -> Self {
        self.kind = Kind::Http;
        self.http = Some(http);
        self
    }

    pub fn service(mut self, service: &'a str) -> Self {
        self.service = service;
        self
    }

    pub fn decision(mut self, decision: &'a str) -> Self {
        self.decision = decision;
        self
    }

    pub fn flags(mut self, flags: &'a str) -> Self {
        self.flags = flags;
        self
    }

    pub fn security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    pub fn bytes(mut self, received: u64, sent: u64) -> Self {
        self.bytes_received = received;
        self.bytes_sent = sent;
        self
    }
}

impl AccessLog {
    pub fn new(default_percent: f64, config: Option<watch::Receiver<Arc<NodeConfig>>>) -> Self {
        Self::to(default_percent, config, Box::new(std::io::stdout()))
    }

    /// Writing to `out` (tests).
    pub fn to(
        default_percent: f64,
        config: Option<watch::Receiver<Arc<NodeConfig>>>,
        out: Box<dyn Write + Send>,
    ) -> Self {
        Self {
            default_percent,
            config,
            out: Mutex::new(out),
            written: AtomicU64::new(0),
        }
    }

    /// Whether to log this request or connection of a workload in `namespace` (sampled).
    pub fn wants(&self, namespace: &str) -> bool {
        let pct = match &self.config {
            Some(c) => c
                .borrow()
                .telemetry
                .percent(namespace, self.default_percent),
            None => self.default_percent,
        };
        pct >= 100.0 || (pct > 0.0 && rand::random::<f64>() * 100.0 < pct)
    }

    pub fn write(&self, entry: &Entry<'_>) {
        #[derive(Serialize)]
        struct Line<'a> {
            time: String,
            #[serde(flatten)]
            entry: &'a Entry<'a>,
        }
        let line = Line {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            entry,
        };
        let Ok(mut text) = serde_json::to_vec(&line) else {
            return;
        };
        text.push(b'\n');
        // One write per line: lines from concurrent connections never interleave.
        let mut out = self.out.locked();
        if out.write_all(&text).and_then(|()| out.flush()).is_ok() {
            self.written.fetch_add(1, Relaxed);
        }
    }
}

/// What an HTTP entry needs from the request, taken before the request is sent on.
#[derive(Debug)]
pub struct Seen {
    pub method: http::Method,
    pub path: String,
    pub authority: String,
    pub trace_id: String,
}

impl Seen {
    pub fn of<B>(req: &http::Request<B>) -> Self {
        let h = req.headers();
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| h.get(http::header::HOST).and_then(|v| v.to_str().ok()))
            .unwrap_or_default();
        Self {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            authority: authority.to_string(),
            trace_id: trace_id(h).unwrap_or_default().to_string(),
        }
    }

    pub fn http<'a>(&'a self, status: u16, grpc_status: &'a str, route: &'a str) -> Http<'a> {
        Http {
            method: self.method.as_str(),
            path: &self.path,
            authority: &self.authority,
            status,
            grpc_status,
            route,
            trace_id: &self.trace_id,
        }
    }
}

/// The trace a request belongs to: W3C `traceparent` (`00-<trace id>-<span id>-<flags>`), else
/// B3 (`x-b3-traceid`, or the single `b3` header).
pub fn trace_id(h: &http::HeaderMap) -> Option<&str> {
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    if let Some(tp) = text("traceparent") {
        let mut parts = tp.split('-');
        if let (Some(_), Some(id)) = (parts.next(), parts.next())
            && id.len() == 32
        {
            return Some(id);
        }
    }
    text("x-b3-traceid").or_else(|| text("b3").and_then(|b| b.split('-').next()))
}

pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn trace_ids_from_w3c_and_b3() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = http::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, http::HeaderValue::from_static(v));
            }
            m
        };
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let cases: [(http::HeaderMap, Option<&str>); 5] = [
            (
                h(&[(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )]),
                Some(id),
            ),
            (
                h(&[("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7")]),
                Some("80f198ee56343ba864fe8b2a57d3eff7"),
            ),
            (
                h(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]),
                Some("80f198ee56343ba864fe8b2a57d3eff7"),
            ),
            (h(&[("traceparent", "garbage")]), None),
            (h(&[]), None),
        ];
        for (headers, want) in &cases {
            assert_eq!(trace_id(headers), *want, "{headers:?}");
        }
    }

    #[test]
    fn lines_are_json_one_per_entry() {
        let buf = Buf::default();
        let log = AccessLog::to(100.0, None, Box::new(buf.clone()));
        assert!(log.wants("any"));
        for status in [200, 403] {
            let client = Peer {
                workload: "client",
                namespace: "shop",
                ..Default::default()
            };
            let mut e = Entry::new(Reporter::Source, client, Peer::default(), Instant::now())
                .http(Http {
                    method: "GET",
                    path: "/",
                    status,
                    ..Default::default()
                })
                .service("shop/web")
                .bytes(0, 2);
            e.duration_ms = millis(Duration::from_micros(1500));
            log.write(&e);
        }
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["http"]["status"], 403);
        assert_eq!(lines[0]["duration_ms"], 1.5);
        assert_eq!(lines[0]["source"]["workload"], "client");
        assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(log.written.load(Relaxed), 2);
        let none = AccessLog::to(0.0, None, Box::new(buf));
        assert!(!none.wants("any"));
    }
}
