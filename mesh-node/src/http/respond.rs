//! The one place proxy failures become responses: an HTTP status with a short reason, or, for a
//! gRPC request, a trailers-only gRPC status. Each carries a response flag (Envoy's vocabulary)
//! for access logs and metrics.
use http::{HeaderValue, Response, StatusCode};

use super::{
    body::{Body, full},
    policy::grpc_from_http,
};

/// The header naming what the proxy did, on responses it made itself.
pub static FLAG_HEADER: http::HeaderName = http::HeaderName::from_static("x-nodemesh-flag");

/// What the proxy did to a request it answered itself (Envoy's response flags). Set on the
/// response's extensions where it is made, and sent as [`FLAG_HEADER`] for the source's proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    NoRoute,
    NoHealthyUpstream,
    /// Denied by authorization, or not a pod this node delivers to.
    Rbac,
    RateLimited,
    /// A circuit breaker or a per-pod budget was full.
    Overflow,
    FaultInjected,
    Timeout,
    ConnectFailure,
    Reset,
    /// The request's path or framing was refused.
    PathError,
}

impl Flag {
    const ALL: [Flag; 10] = [
        Flag::NoRoute,
        Flag::NoHealthyUpstream,
        Flag::Rbac,
        Flag::RateLimited,
        Flag::Overflow,
        Flag::FaultInjected,
        Flag::Timeout,
        Flag::ConnectFailure,
        Flag::Reset,
        Flag::PathError,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Flag::NoRoute => "NR",
            Flag::NoHealthyUpstream => "UH",
            Flag::Rbac => "RBAC",
            Flag::RateLimited => "RL",
            Flag::Overflow => "UO",
            Flag::FaultInjected => "FI",
            Flag::Timeout => "UT",
            Flag::ConnectFailure => "UF",
            Flag::Reset => "UR",
            Flag::PathError => "DPE",
        }
    }

    fn parse(s: &str) -> Option<Flag> {
        Flag::ALL.into_iter().find(|f| f.as_str() == s)
    }

    /// A request's flag as a metrics and access-log label (`-`: none).
    pub fn label(flag: Option<Flag>) -> &'static str {
        flag.map_or("-", Flag::as_str)
    }

    /// What the proxies decided about a request, as its access-log line says it.
    pub fn decision(flag: Option<Flag>) -> &'static str {
        match flag {
            Some(Flag::Rbac) => "denied",
            Some(Flag::RateLimited) => "rate limited",
            Some(Flag::Overflow) => "circuit breaker open",
            Some(Flag::NoRoute) => "no route",
            Some(Flag::FaultInjected) => "fault injected",
            // The request was let through; what went wrong after is in the flag.
            Some(
                Flag::NoHealthyUpstream
                | Flag::Timeout
                | Flag::ConnectFailure
                | Flag::Reset
                | Flag::PathError,
            )
            | None => "allowed",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches the request")]
    NoRoute,
    #[error("no healthy endpoint for {0}")]
    NoEndpoints(String),
    #[error("denied: {0}")]
    Denied(String),
    #[error("rate limited")]
    RateLimited,
    #[error("circuit breaker open ({0})")]
    Overflow(&'static str),
    #[error("fault injected")]
    FaultAbort { status: u16, grpc: Option<u32> },
    #[error("request timed out")]
    Timeout,
    #[error("upstream connect failed: {0}")]
    Connect(String),
    #[error("upstream reset: {0}")]
    Reset(String),
    #[error("destination is not an enrolled pod of this node")]
    NotLocal,
    #[error("bad request: {0}")]
    BadRequest(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::Denied(_) | Self::NotLocal => StatusCode::FORBIDDEN,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::NoEndpoints(_) | Self::Overflow(_) | Self::Connect(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::FaultAbort { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Reset(_) => StatusCode::BAD_GATEWAY,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    pub fn grpc_status(&self) -> u32 {
        match self {
            Self::NoRoute => 12,
            Self::Denied(_) | Self::NotLocal => 7,
            Self::RateLimited => 8,
            Self::Timeout => 4,
            Self::FaultAbort {
                grpc: Some(code), ..
            } => *code,
            Self::BadRequest(_) => 13,
            Self::NoEndpoints(_) | Self::Overflow(_) | Self::Connect(_) | Self::Reset(_) => 14,
            Self::FaultAbort { status, .. } => grpc_from_http(*status),
        }
    }

    pub fn flag(&self) -> Flag {
        match self {
            Self::NoRoute => Flag::NoRoute,
            Self::NoEndpoints(_) => Flag::NoHealthyUpstream,
            Self::Denied(_) | Self::NotLocal => Flag::Rbac,
            Self::RateLimited => Flag::RateLimited,
            Self::Overflow(_) => Flag::Overflow,
            Self::FaultAbort { .. } => Flag::FaultInjected,
            Self::Timeout => Flag::Timeout,
            Self::Connect(_) => Flag::ConnectFailure,
            Self::Reset(_) => Flag::Reset,
            Self::BadRequest(_) => Flag::PathError,
        }
    }
}

/// [`error_response`]'s answer to a plain HTTP request, written as HTTP/1.1 for a carried
/// stream (`relay`). `close`: the stream ends after it. An answer to `HEAD` has no body (its
/// length says what a `GET` would get): bytes after its head would be read as the next answer.
pub fn error_h1(e: &ProxyError, close: bool, head_request: bool) -> bytes::Bytes {
    use std::fmt::Write;
    let body = format!("{e}\n");
    let status = e.status();
    let mut out = String::with_capacity(160 + body.len());
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain\r\n{}: {}\r\ncontent-length: {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        FLAG_HEADER.as_str(),
        e.flag().as_str(),
        body.len()
    );
    if close {
        out.push_str("connection: close\r\n");
    }
    out.push_str("\r\n");
    if !head_request {
        out.push_str(&body);
    }
    out.into()
}

pub fn error_response(e: &ProxyError, grpc: bool) -> Response<Body> {
    let reason = e.to_string();
    let mut resp = if grpc {
        // Trailers-only: the status travels in the headers of an HTTP 200.
        let mut r = Response::new(full(""));
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            &super::GRPC_STATUS_HEADER,
            HeaderValue::from(e.grpc_status()),
        );
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&reason)) {
            h.insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(full(format!("{reason}\n")));
        *r.status_mut() = e.status();
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        r
    };
    resp.headers_mut()
        .insert(&FLAG_HEADER, HeaderValue::from_static(e.flag().as_str()));
    resp.extensions_mut().insert(e.flag());
    resp
}

/// grpc-message is percent-encoded (only what HTTP/2 header values cannot carry).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// gRPC's status on a response (in its head), or "".
pub fn grpc_status(resp: &Response<Body>) -> &str {
    resp.headers()
        .get(&super::GRPC_STATUS_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// A response's flag: set by this proxy (its extensions), or by the destination's proxy (its
/// header, parsed here once; pods cannot set it, it is taken off their answers).
pub fn flag(resp: &Response<Body>) -> Option<Flag> {
    resp.extensions().get::<Flag>().copied().or_else(|| {
        resp.headers()
            .get(&FLAG_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(Flag::parse)
    })
}

/// [`flag`] as a metrics and access-log label (`-`: none).
pub fn flag_label(resp: &Response<Body>) -> &'static str {
    Flag::label(flag(resp))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flag this proxy set is read from the response itself; one from the destination's proxy
    /// from its header; anything else is no flag.
    #[test]
    fn flags_come_from_extensions_then_the_header() {
        let own = error_response(&ProxyError::RateLimited, false);
        assert_eq!(flag(&own), Some(Flag::RateLimited));
        let mut remote = Response::new(full(""));
        remote
            .headers_mut()
            .insert(&FLAG_HEADER, HeaderValue::from_static("UF"));
        assert_eq!(flag(&remote), Some(Flag::ConnectFailure));
        remote
            .headers_mut()
            .insert(&FLAG_HEADER, HeaderValue::from_static("made-up"));
        assert_eq!((flag(&remote), flag_label(&remote)), (None, "-"));
        for f in Flag::ALL {
            assert_eq!(Flag::parse(f.as_str()), Some(f));
        }
    }

    /// The access log's decision: what the proxies refused, else allowed (an upstream that then
    /// failed was still allowed).
    #[test]
    fn decisions_by_flag() {
        for (flag, want) in [
            (None, "allowed"),
            (Some(Flag::Rbac), "denied"),
            (Some(Flag::RateLimited), "rate limited"),
            (Some(Flag::Overflow), "circuit breaker open"),
            (Some(Flag::NoRoute), "no route"),
            (Some(Flag::FaultInjected), "fault injected"),
            (Some(Flag::ConnectFailure), "allowed"),
            (Some(Flag::Timeout), "allowed"),
        ] {
            assert_eq!(Flag::decision(flag), want, "{flag:?}");
        }
    }

    #[test]
    fn statuses_and_flags() {
        let cases = [
            (ProxyError::NoRoute, 404, 12, "NR"),
            (ProxyError::Denied("x".into()), 403, 7, "RBAC"),
            (ProxyError::RateLimited, 429, 8, "RL"),
            (ProxyError::Overflow("max requests"), 503, 14, "UO"),
            (ProxyError::Timeout, 504, 4, "UT"),
            (ProxyError::Reset("x".into()), 502, 14, "UR"),
            (
                ProxyError::FaultAbort {
                    status: 503,
                    grpc: None,
                },
                503,
                14,
                "FI",
            ),
            (
                ProxyError::FaultAbort {
                    status: 500,
                    grpc: Some(10),
                },
                500,
                10,
                "FI",
            ),
        ];
        for (e, status, grpc, flag) in cases {
            assert_eq!(e.status().as_u16(), status, "{e}");
            assert_eq!(e.grpc_status(), grpc, "{e}");
            assert_eq!(e.flag().as_str(), flag, "{e}");
        }
        let r = error_response(&ProxyError::RateLimited, true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "8");
        assert_eq!(r.headers()["grpc-message"], "rate limited");
        let r = error_response(&ProxyError::RateLimited, false);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[&FLAG_HEADER], "RL");
    }

    /// An answer to `HEAD` ends with its head: a body would be read as the next answer.
    #[test]
    fn http1_answers_to_head_have_no_body() {
        let e = ProxyError::Reset("pod response head: invalid HTTP version".into());
        let (get, head) = (error_h1(&e, false, false), error_h1(&e, false, true));
        assert!(head.ends_with(b"\r\n\r\n"), "{head:?}");
        assert!(get.starts_with(&head), "same head: {get:?}");
        assert!(get.len() > head.len());
    }

    /// The HTTP/1.1 form says what `error_response` says: status, flag, reason, exact length.
    #[test]
    fn http1_answers_match_the_response() {
        for (e, close) in [
            (ProxyError::Denied("rule deny-all".into()), false),
            (ProxyError::Connect("10.0.0.1:80: refused".into()), true),
        ] {
            let bytes = error_h1(&e, close, false);
            let mut hs = [httparse::EMPTY_HEADER; 8];
            let mut r = httparse::Response::new(&mut hs);
            let httparse::Status::Complete(n) = r.parse(&bytes).unwrap() else {
                panic!("partial head");
            };
            assert_eq!(r.code, Some(e.status().as_u16()));
            let field = |name: &str| {
                r.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| std::str::from_utf8(h.value).unwrap())
            };
            assert_eq!(field(FLAG_HEADER.as_str()), Some(e.flag().as_str()));
            assert_eq!(field("connection"), close.then_some("close"));
            let body = &bytes[n..];
            assert_eq!(
                field("content-length"),
                Some(body.len().to_string().as_str())
            );
            assert_eq!(body, format!("{e}\n").as_bytes());
        }
    }
}
