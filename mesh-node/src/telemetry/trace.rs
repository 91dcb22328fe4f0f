//! Distributed tracing of HTTP requests: each proxy hop (the caller's node proxy, `outbound`; the
//! callee's, `inbound`) is a span, exported over OTLP/gRPC when `--otlp-endpoint` is set.
//!
//! A request's context comes from W3C `traceparent` or, failing that, B3 (`x-b3-*` or the single
//! `b3` header). The hop's span is its child, and the request goes on carrying the hop's span as
//! its parent (`traceparent`, and the B3 headers when the app used B3), so the next hop and the app
//! nest under it. A request without a context starts a trace when sampled
//! (`--trace-sample-percent`); contexts that arrive keep their own sampling decision. Without an
//! endpoint nothing is created and trace headers pass through untouched.
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use opentelemetry::{
    Context, KeyValue,
    trace::{
        Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
        TraceState, Tracer as _, TracerProvider as _,
    },
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider},
};

#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter for {endpoint}")]
pub struct TraceError {
    endpoint: String,
    #[source]
    source: opentelemetry_otlp::ExporterBuildError,
}

/// The node's tracer, or nothing when no endpoint is configured.
#[derive(Default)]
pub struct Tracing {
    inner: Option<(SdkTracerProvider, SdkTracer)>,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("exporting", &self.inner.is_some())
            .finish()
    }
}

/// Which side of the request this hop is.
#[derive(Clone, Copy, Debug)]
pub enum Hop {
    /// The caller's node proxy.
    Outbound,
    /// The callee's node proxy.
    Inbound,
}

/// A hop's span, ended with the response.
pub struct HopSpan(opentelemetry_sdk::trace::Span);

impl Tracing {
    /// Exports to `endpoint` (`http://collector:4317`), sampling `sample_percent` of new traces.
    /// Must run inside the tokio runtime (the gRPC channel lives there).
    pub fn new(
        endpoint: Option<&str>,
        sample_percent: f64,
        node: &str,
    ) -> Result<Self, TraceError> {
        let Some(endpoint) = endpoint else {
            return Ok(Self::default());
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|source| TraceError {
                endpoint: endpoint.to_string(),
                source,
            })?;
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(Duration::from_secs(1))
                    .with_max_queue_size(8192)
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batch)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                (sample_percent / 100.0).clamp(0.0, 1.0),
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name("mesh-node")
                    .with_attribute(KeyValue::new("mesh.node", node.to_string()))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("mesh-node");
        Ok(Self {
            inner: Some((provider, tracer)),
        })
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// This hop's span for `req`, when tracing is on (the request then carries it as the
    /// parent).
    pub fn start_request<B>(&self, hop: Hop, req: &mut http::Request<B>) -> Option<HopSpan> {
        if !self.enabled() {
            return None;
        }
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        self.start(hop, method.as_str(), &path, req.headers_mut())
    }

    /// Starts this hop's span under the request's context and makes the request carry it on.
    pub fn start(
        &self,
        hop: Hop,
        method: &str,
        path: &str,
        headers: &mut HeaderMap,
    ) -> Option<HopSpan> {
        let (_, tracer) = self.inner.as_ref()?;
        let parent = extract(headers);
        let cx = match &parent {
            Some(sc) => Context::new().with_remote_span_context(sc.clone()),
            None => Context::new(),
        };
        let (name, kind) = match hop {
            Hop::Outbound => ("outbound", SpanKind::Client),
            Hop::Inbound => ("inbound", SpanKind::Server),
        };
        let span = tracer
            .span_builder(format!("{name} {method}"))
            .with_kind(kind)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", path.to_string()),
            ])
            .start_with_context(tracer, &cx);
        inject(span.span_context(), parent.is_none(), headers);
        Some(HopSpan(span))
    }

    /// Sends what is buffered (on shutdown).
    pub fn flush(&self) {
        if let Some((provider, _)) = &self.inner {
            let _ = provider.force_flush();
        }
    }
}

impl HopSpan {
    pub fn set(&mut self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        self.0.set_attribute(KeyValue::new(key, value));
    }

    /// Ends the span with the response's status (5xx and proxy failures are errors).
    pub fn end(mut self, status: u16, flag: &str) {
        self.0.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if flag != "-" {
            self.0
                .set_attribute(KeyValue::new("mesh.response_flags", flag.to_string()));
        }
        if status >= 500 {
            self.0.set_status(Status::error(format!("HTTP {status}")));
        }
        self.0.end();
    }
}

fn text<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// 64-bit B3 trace ids are widened to 128 bits with leading zeros.
fn trace_id(hex: &str) -> Option<TraceId> {
    let id = match hex.len() {
        32 => TraceId::from_hex(hex).ok()?,
        16 => TraceId::from_hex(&format!("{hex:0>32}")).ok()?,
        _ => return None,
    };
    (id != TraceId::INVALID).then_some(id)
}

fn span_id(hex: &str) -> Option<SpanId> {
    let id = SpanId::from_hex(hex).ok().filter(|_| hex.len() == 16)?;
    (id != SpanId::INVALID).then_some(id)
}

fn context(trace: TraceId, span: SpanId, sampled: bool) -> SpanContext {
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    SpanContext::new(trace, span, flags, true, TraceState::default())
}

/// The request's trace context: W3C first, then B3 multi-header, then B3 single-header.
pub fn extract(h: &HeaderMap) -> Option<SpanContext> {
    if let Some(tp) = text(h, "traceparent") {
        let p: Vec<&str> = tp.trim().split('-').collect();
        if p.len() >= 4
            && p[0].len() == 2
            && p[0] != "ff"
            && let (Some(t), Some(s), Ok(f)) =
                (trace_id(p[1]), span_id(p[2]), u8::from_str_radix(p[3], 16))
        {
            return Some(context(t, s, f & 1 == 1));
        }
    }
    if let (Some(t), Some(s)) = (
        text(h, "x-b3-traceid").and_then(trace_id),
        text(h, "x-b3-spanid").and_then(span_id),
    ) {
        let sampled = matches!(text(h, "x-b3-sampled"), Some("1" | "true"))
            || text(h, "x-b3-flags") == Some("1");
        return Some(context(t, s, sampled));
    }
    let b3 = text(h, "b3")?;
    let p: Vec<&str> = b3.split('-').collect();
    let (t, s) = (trace_id(p.first()?)?, span_id(p.get(1)?)?);
    Some(context(t, s, matches!(p.get(2), Some(&"1" | &"d"))))
}

/// Makes the request carry `sc` as its parent: `traceparent` always, and the B3 form the app used
/// (so B3-only apps keep working).
fn inject(sc: &SpanContext, new_trace: bool, h: &mut HeaderMap) {
    let sampled = sc.is_sampled();
    let tp = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    );
    if let Ok(v) = HeaderValue::from_str(&tp) {
        h.insert("traceparent", v);
    }
    if new_trace {
        return;
    }
    if h.contains_key("x-b3-traceid") {
        if let Some(parent) = h.remove("x-b3-spanid") {
            h.insert("x-b3-parentspanid", parent);
        }
        if let Ok(v) = HeaderValue::from_str(&sc.span_id().to_string()) {
            h.insert("x-b3-spanid", v);
        }
        h.insert(
            "x-b3-sampled",
            HeaderValue::from_static(if sampled { "1" } else { "0" }),
        );
    } else if h.contains_key("b3") {
        let v = format!(
            "{}-{}-{}",
            sc.trace_id(),
            sc.span_id(),
            if sampled { "1" } else { "0" }
        );
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert("b3", v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn contexts_from_w3c_and_b3() {
        let t = "4bf92f3577b34da6a3ce929d0e0e4736";
        let s = "00f067aa0ba902b7";
        type Case = (
            &'static [(&'static str, &'static str)],
            Option<(&'static str, &'static str, bool)>,
        );
        let cases: &[Case] = &[
            (
                &[(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )],
                Some((t, s, true)),
            ),
            (
                &[(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                )],
                Some((t, s, false)),
            ),
            // Invalid: all-zero ids, version ff, short ids.
            (
                &[(
                    "traceparent",
                    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                )],
                None,
            ),
            (
                &[(
                    "traceparent",
                    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )],
                None,
            ),
            (&[("traceparent", "00-4bf92f35-00f067aa0ba902b7-01")], None),
            (
                &[
                    ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
                    ("x-b3-spanid", "00f067aa0ba902b7"),
                    ("x-b3-sampled", "1"),
                ],
                Some((t, s, true)),
            ),
            (
                &[
                    ("x-b3-traceid", "a3ce929d0e0e4736"),
                    ("x-b3-spanid", "00f067aa0ba902b7"),
                ],
                Some(("0000000000000000a3ce929d0e0e4736", s, false)),
            ),
            (
                &[("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1")],
                Some((t, s, true)),
            ),
            (&[("b3", "0")], None),
            (&[], None),
        ];
        for (h, want) in cases {
            let got = extract(&headers(h)).map(|c| {
                (
                    c.trace_id().to_string(),
                    c.span_id().to_string(),
                    c.is_sampled(),
                )
            });
            let want = want.map(|(t, s, x)| (t.to_string(), s.to_string(), x));
            assert_eq!(got, want, "{h:?}");
        }
    }

    #[test]
    fn injection_keeps_the_trace_and_the_apps_b3_form() {
        let sc = context(
            trace_id("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            span_id("1111111111111111").unwrap(),
            true,
        );
        let mut h = headers(&[
            ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
        ]);
        inject(&sc, false, &mut h);
        assert_eq!(
            text(&h, "traceparent"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01")
        );
        assert_eq!(text(&h, "x-b3-spanid"), Some("1111111111111111"));
        assert_eq!(text(&h, "x-b3-parentspanid"), Some("00f067aa0ba902b7"));
        assert_eq!(text(&h, "x-b3-sampled"), Some("1"));
        let back = extract(&h).unwrap();
        assert_eq!(back.span_id(), sc.span_id());
    }
}
