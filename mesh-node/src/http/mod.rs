//! HTTP-aware proxying, in the node proxy itself (no waypoint hop).
//!
//! Flow of one request: the app's connection is accepted by the outbound listener, its protocol
//! is declared by the Service port or detected (`detect`), hyper serves it (`outbound`); each
//! request is routed (`crate::policy::routes`), filtered (`filters`), shaped by the backend Service's
//! traffic policy (`policy`), balanced across endpoints (`balance`), then sent either to another
//! node's proxy (on a kept CONNECT stream for an HTTP/1.1 pod, `carried`, relayed there by
//! `relay`; else as its own HTTP/2 stream on the pooled mTLS connection), or, for a pod of this
//! node, straight to the inbound side (`inbound`), which authorizes it with the caller's proven
//! identity, rate-limits it and forwards it to the pod (`upstream`). Every failure becomes a
//! response in one place (`respond`).
pub(crate) mod balance;
pub(crate) mod body;
pub(crate) mod carried;
pub(crate) mod detect;
pub(crate) mod exchange;
pub(crate) mod filters;
pub(crate) mod h1frame;
pub(crate) mod idle;
pub(crate) mod inbound;
pub(crate) mod outbound;
pub(crate) mod policy;
pub(crate) mod relay;
pub(crate) mod respond;
pub(crate) mod sanitize;
pub(crate) mod services;
pub(crate) mod stats;
pub(crate) mod upgrade;
pub(crate) mod upstream;

use http::HeaderName;
use serde::Serialize;

// Header names are `HeaderName` statics: a lookup by `&str` parses and validates the name each
// time, and these are looked up on every request.

/// How the destination pod speaks: `h1` or `h2`.
pub static UPSTREAM_PROTOCOL_HEADER: HeaderName =
    HeaderName::from_static("x-nodemesh-upstream-protocol");
/// gRPC's status, in trailers or (for an answer without a body) in the head.
pub static GRPC_STATUS_HEADER: HeaderName = HeaderName::from_static("grpc-status");

/// What a port carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http1,
    Http2,
    Grpc,
    Tcp,
}

impl Protocol {
    /// A Service port's declared protocol (`appProtocol` or the port name's prefix, as the
    /// controller resolved it); `None`: detect.
    pub fn declared(s: &str) -> Option<Self> {
        match s {
            "http" => Some(Self::Http1),
            "http2" | "h2c" => Some(Self::Http2),
            "grpc" => Some(Self::Grpc),
            "tcp" => Some(Self::Tcp),
            _ => None,
        }
    }

    /// How a pod speaking this protocol is reached.
    pub fn upstream(self) -> UpstreamProtocol {
        match self {
            Self::Http2 | Self::Grpc => UpstreamProtocol::H2,
            Self::Http1 | Self::Tcp => UpstreamProtocol::H1,
        }
    }
}

/// The HTTP version the destination pod is spoken to in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum UpstreamProtocol {
    H1,
    H2,
}

impl UpstreamProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::H1 => "h1",
            Self::H2 => "h2",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "h1" => Some(Self::H1),
            "h2" => Some(Self::H2),
            _ => None,
        }
    }
}

/// Whether a request is gRPC (errors are then answered as gRPC statuses).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// A message's declared body length (`Content-Length`), 0 when it has none: what request metrics
/// count as bytes.
pub fn content_length(headers: &http::HeaderMap) -> u64 {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
