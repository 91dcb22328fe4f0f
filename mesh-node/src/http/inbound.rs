//! The destination side of an L7 request, for a pod of this node: authorization per request with
//! the caller's proven identity (403 with the deciding rule), local rate limits per destination
//! and per source (429), then the pod. Reached from the tunnel (requests from other nodes) and
//! directly from the outbound side (same node, identity from the socket).
use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Instant,
};

use http::{Request, Response};
use mesh_api::identity::SpiffeId;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    UpstreamProtocol,
    body::Body,
    is_grpc,
    respond::{Flag, ProxyError, error_response},
    services::Runtime,
    stats::{L7Stats, Recent, RequestLabels},
    upstream::PodClient,
};
use crate::{
    config::node::NodeConfig,
    pods::enroll::Enrollment,
    policy::authz::{Facts, Http},
    telemetry::access_log::{self, AccessLog, Reporter, Security},
    telemetry::trace::HopSpan,
};

/// The HTTP path's own figures (`/v1/counters` -> `l7`), both sides.
#[derive(Default, Debug, Serialize)]
pub struct L7Counters {
    pub requests: AtomicU64,
    pub denied: AtomicU64,
    pub rate_limited: AtomicU64,
    /// App connections to a Service refused by its circuit breaker's `maxConnections`.
    pub connections_over_limit: AtomicU64,
    /// Tries after the first (the retry policy allowed them, the budget had room).
    pub retries: AtomicU64,
}

/// Who is calling, as this node knows it.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Proven by mTLS (or by the socket, same node).
    pub identity: Option<SpiffeId>,
    pub ip: IpAddr,
}

/// A request at the destination between its head and its end: what its metrics, span and access
/// log line need ([`HttpInbound::admit_request`], then [`HttpInbound::finish_request`]).
pub struct Ticket<'a> {
    pub started: Instant,
    span: Option<HopSpan>,
    seen: Option<access_log::Seen>,
    /// Why it was refused, for the access log.
    decision: Option<String>,
    caller: Caller,
    /// The config the request was admitted under: it names the caller's workload.
    cfg: Arc<NodeConfig>,
    dst: (&'a str, &'a str),
    target: SocketAddr,
}

impl Ticket<'_> {
    /// The caller's workload (namespace, name), when its identity is proven.
    fn source_names(&self) -> (&str, &str) {
        self.caller
            .identity
            .as_ref()
            .and_then(|_| self.cfg.placement.by_ip(self.caller.ip))
            .map_or(("", ""), |w| (w.namespace.as_str(), w.name.as_str()))
    }

    fn security(&self) -> Security {
        if self.caller.identity.is_some() {
            Security::MutualTls
        } else {
            Security::Plaintext
        }
    }

    fn labels<'s>(
        &'s self,
        code: u16,
        grpc_status: &'s str,
        resp_flag: &'static str,
    ) -> RequestLabels<&'s str> {
        let (source_namespace, source_workload) = self.source_names();
        RequestLabels {
            reporter: "destination",
            source_workload,
            source_namespace,
            source_principal: self.caller.identity.as_ref().map_or("", SpiffeId::as_str),
            destination_service: "",
            destination_workload: self.dst.1,
            destination_namespace: self.dst.0,
            response_code: code,
            grpc_status,
            response_flags: resp_flag,
            connection_security: self.security().as_str(),
        }
    }
}

/// A carried stream's key for its recent series ([`Recent`]): what a request's labels depend on
/// besides the stream's caller identity and destination pod, and its gRPC status (none).
#[derive(Debug)]
pub struct InboundSeriesKey {
    /// The config that named the caller's workload. Weak: a stream must not keep an old config
    /// alive; and while this is held the allocation stays, so its address cannot come back as
    /// another config's.
    cfg: std::sync::Weak<NodeConfig>,
    ip: IpAddr,
    code: u16,
    flag: Option<Flag>,
}

impl InboundSeriesKey {
    fn of(t: &Ticket<'_>, code: u16, flag: Option<Flag>) -> Self {
        Self {
            cfg: Arc::downgrade(&t.cfg),
            ip: t.caller.ip,
            code,
            flag,
        }
    }

    /// No label text compared and no write to the shared config's counts: the config is
    /// compared by address.
    fn is(&self, t: &Ticket<'_>, code: u16, flag: Option<Flag>) -> bool {
        self.code == code
            && self.flag == flag
            && self.ip == t.caller.ip
            && std::ptr::eq(self.cfg.as_ptr(), Arc::as_ptr(&t.cfg))
    }
}

pub struct HttpInbound {
    pub config: watch::Receiver<Arc<NodeConfig>>,
    pub runtime: Arc<Runtime>,
    pub pods: Arc<PodClient>,
    pub enrollment: Arc<Enrollment>,
    pub stats: Arc<L7Stats>,
    pub counters: L7Counters,
    pub access_log: Arc<AccessLog>,
    pub tracing: Arc<crate::telemetry::trace::Tracing>,
    pub decisions: Arc<crate::policy::authz::DecisionCounts>,
    /// What an encoded `/` in a request path becomes (the mesh's setting).
    pub escaped_slashes: crate::config::EscapedSlashes,
}

impl HttpInbound {
    /// Handles one request to `dst` (a pod of this node) at `target`; never fails: errors are
    /// answered.
    pub async fn handle(
        &self,
        mut req: Request<Body>,
        caller: &Caller,
        dst: (&str, &str),
        target: SocketAddr,
        proto: UpstreamProtocol,
    ) -> Response<Body> {
        let grpc = is_grpc(req.headers());
        let request_bytes = super::content_length(req.headers());
        let (mut ticket, admitted) = self.admit_request(&mut req, caller.clone(), dst, target);
        let counting = super::stats::count_request(&mut req);
        let resp = match admitted {
            Ok(()) => match self.pods.send(target, proto, req).await {
                Ok(r) => r,
                Err(e) => error_response(&e, grpc),
            },
            Err(e) => error_response(&e, grpc),
        };
        let (code, resp_flag) = (resp.status().as_u16(), super::respond::flag(&resp));
        let status_now = super::respond::grpc_status(&resp).to_string();
        let response_bytes = super::content_length(resp.headers());
        let in_trailers = super::stats::status_in_trailers(grpc, &resp);
        let series = self.finish_request(
            &mut ticket,
            (code, &status_now, resp_flag),
            (request_bytes, response_bytes),
            !in_trailers,
            None,
        );
        match series {
            Some(series) => super::stats::count_response(resp, series, counting),
            // A gRPC status in trailers: recorded when they arrive.
            None => super::stats::record_at_trailers(
                &self.stats,
                ticket.labels(code, "", Flag::label(resp_flag)),
                ticket.started,
                request_bytes,
                resp,
                counting,
            ),
        }
    }

    /// A request's head arrived: starts its span (the head then carries the trace context on),
    /// counts it and decides whether it may reach the pod. The ticket records its end.
    pub fn admit_request<'a, B>(
        &self,
        req: &mut Request<B>,
        caller: Caller,
        dst: (&'a str, &'a str),
        target: SocketAddr,
    ) -> (Ticket<'a>, Result<(), ProxyError>) {
        let started = Instant::now();
        let span = self
            .tracing
            .start_request(crate::telemetry::trace::Hop::Inbound, req);
        self.counters.requests.fetch_add(1, Relaxed);
        let cfg = self.config.borrow().clone();
        let seen = self
            .access_log
            .wants(dst.0)
            .then(|| access_log::Seen::of(req));
        // The source normalized the path already; a peer that did not is judged on the path the
        // pod will see all the same.
        let admitted = super::sanitize::request(req, self.escaped_slashes)
            .and_then(|()| self.admit(&cfg, req, &caller, dst, target));
        let decision = match (&admitted, &seen) {
            (Err(e), Some(_)) => Some(e.to_string()),
            _ => None,
        };
        let ticket = Ticket {
            started,
            span,
            seen,
            decision,
            caller,
            cfg,
            dst,
            target,
        };
        (ticket, admitted)
    }

    /// Records a request's end: its series (unless `series` is false: a status still to come in
    /// trailers is recorded when they arrive), its span and its access log line. The answer:
    /// status, gRPC status, flag; the bytes: the request's and the response's; `recent`: the
    /// connection's recent series, if it keeps them. Returns the series recorded into when it is
    /// not one of `recent`'s (whose callers count every byte before they finish).
    pub fn finish_request(
        &self,
        t: &mut Ticket<'_>,
        (code, grpc_status, resp_flag): (u16, &str, Option<Flag>),
        (request_bytes, response_bytes): (u64, u64),
        series: bool,
        recent: Option<&Recent<InboundSeriesKey>>,
    ) -> Option<Arc<super::stats::Series>> {
        let flag_label = Flag::label(resp_flag);
        let recorded = series.then(|| {
            let took = t.started.elapsed();
            let bytes = (request_bytes, response_bytes);
            match recent {
                Some(r) if grpc_status.is_empty() => self.stats.record_recent(
                    r,
                    |k| k.is(t, code, resp_flag),
                    || {
                        (
                            InboundSeriesKey::of(t, code, resp_flag),
                            t.labels(code, "", flag_label),
                        )
                    },
                    took,
                    bytes,
                    false,
                ),
                _ => Some(self.stats.record(
                    t.labels(code, grpc_status, flag_label),
                    took,
                    request_bytes,
                    response_bytes,
                )),
            }
        });
        let (caller, (ns, name)) = (&t.caller, t.dst);
        let principal = caller.identity.as_ref().map_or("", SpiffeId::as_str);
        if let Some(mut span) = t.span.take() {
            if let Some(id) = &caller.identity {
                span.set("mesh.source.principal", id.to_string());
            }
            span.set("mesh.destination.workload", format!("{ns}/{name}"));
            span.end(code, flag_label);
        }
        if let Some(seen) = &t.seen {
            let (src_ns, src_name) = t.source_names();
            let source = access_log::Peer {
                workload: src_name,
                namespace: src_ns,
                principal,
                address: caller.ip.to_string(),
            };
            let destination = access_log::Peer {
                workload: name,
                namespace: ns,
                principal: "",
                address: t.target.to_string(),
            };
            let decision = t
                .decision
                .as_deref()
                .unwrap_or_else(|| Flag::decision(resp_flag));
            self.access_log.write(
                &access_log::Entry::new(Reporter::Destination, source, destination, t.started)
                    .http(seen.http(code, grpc_status, ""))
                    .decision(decision)
                    .flags(flag_label)
                    .security(t.security())
                    .bytes(request_bytes, response_bytes),
            );
        }
        recorded.flatten()
    }

    fn admit<B>(
        &self,
        cfg: &NodeConfig,
        req: &Request<B>,
        caller: &Caller,
        (ns, name): (&str, &str),
        target: SocketAddr,
    ) -> Result<(), ProxyError> {
        if !self.enrollment.is_enrolled(ns, name) {
            return Err(ProxyError::NotLocal);
        }
        let empty = Default::default();
        let labels = cfg.placement.pod(ns, name).map_or(&empty, |w| &w.labels);
        let verdict = cfg.authz.evaluate(&Facts {
            source: caller.identity.as_ref(),
            source_ip: caller.ip,
            namespace: ns,
            labels,
            port: target.port(),
            http: Some(Http {
                method: req.method().as_str(),
                path: req.uri().path(),
                headers: req.headers(),
                authority: req.uri().authority().map(|a| a.as_str()),
            }),
        });
        self.decisions.record("http", &verdict);
        let src = caller.identity.as_ref().map(SpiffeId::as_str);
        for a in &verdict.audited {
            info!(audit = %a, ?src, dst = %format!("{ns}/{name}"), method = %req.method(), path = %req.uri().path(), "audited request");
        }
        if !verdict.decision.allowed() {
            self.counters.denied.fetch_add(1, Relaxed);
            let reason = verdict.decision.reason();
            warn!(?src, dst = %format!("{ns}/{name}"), method = %req.method(), path = %req.uri().path(), %reason, "request denied");
            return Err(ProxyError::Denied(reason));
        }
        let mut now = None;
        for svc in cfg.l7.rate_limited(ns, name, target.port()) {
            let Some(limit) = &svc.policy.rate_limit else {
                continue;
            };
            // Read only for rate-limited pods: a clock read is not free on a VM.
            let now = *now.get_or_insert_with(Instant::now);
            let pod = format!("{ns}/{name}");
            let key = if limit.per_source {
                let who = caller
                    .identity
                    .as_ref()
                    .map_or_else(|| caller.ip.to_string(), ToString::to_string);
                format!("{pod}|{who}")
            } else {
                pod.clone()
            };
            let state = self.runtime.service(&svc.name);
            if !state.rate_limit(limit, &key, self.runtime.epoch, now) {
                self.counters.rate_limited.fetch_add(1, Relaxed);
                return Err(ProxyError::RateLimited);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(cfg: &Arc<NodeConfig>, ip: &str) -> Ticket<'static> {
        Ticket {
            started: Instant::now(),
            span: None,
            seen: None,
            decision: None,
            caller: Caller {
                identity: None,
                ip: ip.parse().unwrap(),
            },
            cfg: cfg.clone(),
            dst: ("ns", "web"),
            target: "10.0.1.5:8080".parse().unwrap(),
        }
    }

    /// A carried stream's key matches only what gives the same labels: the same config (by
    /// identity, not content: the next one may name the caller otherwise), caller address,
    /// status and flag.
    #[test]
    fn a_series_key_matches_only_the_same_config_caller_and_answer() {
        let (cfg, next) = (
            Arc::new(NodeConfig::default()),
            Arc::new(NodeConfig::default()),
        );
        let t = ticket(&cfg, "10.0.0.7");
        let key = InboundSeriesKey::of(&t, 200, None);
        for (case, other, code, flag, want) in [
            ("same", ticket(&cfg, "10.0.0.7"), 200, None, true),
            ("status", ticket(&cfg, "10.0.0.7"), 503, None, false),
            (
                "flag",
                ticket(&cfg, "10.0.0.7"),
                200,
                Some(Flag::RateLimited),
                false,
            ),
            ("caller", ticket(&cfg, "10.0.0.8"), 200, None, false),
            ("config", ticket(&next, "10.0.0.7"), 200, None, false),
        ] {
            assert_eq!(key.is(&other, code, flag), want, "{case}");
        }
        // The key does not keep the config alive.
        drop(t);
        assert_eq!(Arc::strong_count(&cfg), 1);
    }
}
