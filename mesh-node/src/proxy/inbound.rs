//! Delivery of tunnel streams to this node's pods: the layer above the tunnel. Each stream the
//! tunnel accepted (`tunnel::Accepted`: what it is, who proved it, where to) is checked the same
//! way whatever it carries — the target must be an enrolled pod of this node with the identity
//! the tunnel presented, the claimed source must be the peer's — then relayed as TCP, served
//! request by request (carried HTTP/1.1), or answered (an HTTP/2 request) by the L7 layer.
use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::RecvStream;
use http::{Request, StatusCode};
use mesh_api::{
    identity::SpiffeId,
    placement::{Placement, PlacementWatch, Workload},
};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    pods::enroll::Enrollment,
    policy::enforce::{Conn, Enforcer, claimed_source, forwarded_for, until_revoked},
    proxy::pod_socket::ProxySource,
    proxy::tunnel::{Accepted, Deliver, StreamKind, Tunnel, TunnelStats, answer_connect, join_tcp},
    telemetry::access_log::{Entry, Peer, Reporter},
};

/// Delivers accepted tunnel streams to enrolled pods of this node.
pub struct Delivery {
    pub node: String,
    pub placement: PlacementWatch,
    pub pods: Arc<Enrollment>,
    pub stats: Arc<TunnelStats>,
    pub connect_timeout: Duration,
    /// Deliveries come from the proxy address (see `pod_socket::ProxySource`).
    pub source: ProxySource,
    /// Authorization, when policy comes from the controller.
    pub enforcer: Option<Arc<Enforcer>>,
    /// Per-request handling of L7 requests, when config comes from the controller.
    pub l7: Option<Arc<crate::http::inbound::HttpInbound>>,
    pub access_log: Arc<crate::telemetry::access_log::AccessLog>,
    pub live: Arc<crate::telemetry::live::Connections>,
}

impl Deliver for Delivery {
    fn deliver(self: Arc<Self>, s: Accepted) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let Accepted {
            kind,
            req,
            mut respond,
            peer,
            client,
            served,
            leaving,
        } = s;
        match (kind, self.l7.clone()) {
            (StreamKind::Request, Some(l7)) => Box::pin(async move {
                self.request(&l7, req, respond, peer, &client, &served)
                    .await
            }),
            // Without L7 config, requests are not served.
            (StreamKind::Request, None) => {
                let _ = answer_connect(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
                Box::pin(async {})
            }
            (StreamKind::CarriedHttp1, Some(l7)) => Box::pin(async move {
                let who = (peer, &*client, &*served);
                self.carried(l7, req, respond, who, &leaving).await
            }),
            // Without L7 config, carried requests are bytes like any others.
            (StreamKind::Connect | StreamKind::CarriedHttp1, _) => {
                Box::pin(async move { self.connect(req, respond, peer, &client, &served).await })
            }
        }
    }
}

/// Why a stream's target is not delivered to.
enum Undeliverable {
    /// Not an `ip:port` (`400` for a CONNECT).
    BadTarget,
    /// Not an enrolled pod of this node with the identity the tunnel presented (`403`).
    NotLocal,
}

/// A CONNECT's target: its `:authority`, as an address.
fn connect_target(req: &Request<RecvStream>) -> Option<SocketAddr> {
    req.uri().authority()?.as_str().parse().ok()
}

impl Undeliverable {
    /// The answer to a CONNECT.
    fn status(&self) -> StatusCode {
        match self {
            Undeliverable::BadTarget => StatusCode::BAD_REQUEST,
            Undeliverable::NotLocal => StatusCode::FORBIDDEN,
        }
    }
}

impl Delivery {
    /// Where a stream may go, checked the same way whatever it carries: an enrolled pod of this
    /// node at `target` with identity `served`, the only pods a stream that proved `served` may
    /// reach. A refusal is counted and logged here.
    fn deliverable<'p>(
        &self,
        kind: StreamKind,
        placement: &'p Placement,
        target: Option<SocketAddr>,
        (peer, client, served): (SocketAddr, &SpiffeId, &SpiffeId),
    ) -> Result<(SocketAddr, &'p Workload), Undeliverable> {
        let target = target.ok_or(Undeliverable::BadTarget)?;
        let local = placement.by_ip(target.ip()).filter(|w| {
            w.node == self.node
                && &w.identity == served
                && self.pods.is_enrolled(&w.namespace, &w.name)
        });
        match local {
            Some(w) => Ok((target, w)),
            None => {
                self.stats.inbound_refused_not_local.fetch_add(1, Relaxed);
                warn!(%peer, %target, ?kind, %client, %served, "refused: not an enrolled pod of this node with that identity");
                Err(Undeliverable::NotLocal)
            }
        }
    }

    /// One CONNECT stream: opaque TCP to a pod of this node.
    async fn connect(
        &self,
        req: Request<RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        peer: SocketAddr,
        client_id: &SpiffeId,
        served: &SpiffeId,
    ) {
        let mut answer = |s: StatusCode| answer_connect(&mut respond, s);
        let forwarded = req
            .headers()
            .get(http::header::FORWARDED)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let placement = self.placement.current();
        let who = (peer, client_id, served);
        let (target, local) =
            match self.deliverable(StreamKind::Connect, &placement, connect_target(&req), who) {
                Ok(t) => t,
                Err(e) => {
                    let _ = answer(e.status());
                    return;
                }
            };
        let source_ip = match claimed_source(&placement, Some(&forwarded), client_id, peer.ip()) {
            Ok(ip) => ip,
            Err(e) => {
                self.stats
                    .inbound_refused_spoofed_source
                    .fetch_add(1, Relaxed);
                warn!(%peer, %target, error = %e, "refused tunnel: spoofed source address");
                let _ = answer(StatusCode::FORBIDDEN);
                return;
            }
        };
        let admitted = match &self.enforcer {
            None => None,
            Some(e) => {
                let conn = Conn {
                    source: Some(client_id.clone()),
                    source_ip,
                    namespace: local.namespace.clone(),
                    pod: local.name.clone(),
                    port: target.port(),
                };
                match e.admit(conn) {
                    Ok(a) => Some(a),
                    Err(reason) => {
                        warn!(%peer, %target, client = %client_id, %reason, "refused tunnel: authorization");
                        let _ = answer(StatusCode::FORBIDDEN);
                        if self.access_log.wants(&local.namespace) {
                            self.log_tcp(
                                client_id,
                                &forwarded,
                                (&local.namespace, &local.name),
                                target,
                                &reason.to_string(),
                                (0, 0),
                                Instant::now(),
                            );
                        }
                        return;
                    }
                }
            }
        };
        let upstream =
            match tokio::time::timeout(self.connect_timeout, self.source.connect_local(target))
                .await
            {
                Ok(Ok(s)) => s,
                _ => {
                    self.stats.inbound_upstream_failed.fetch_add(1, Relaxed);
                    let _ = answer(StatusCode::SERVICE_UNAVAILABLE);
                    return;
                }
            };
        let Ok(send) = answer(StatusCode::OK) else {
            return;
        };
        self.stats.inbound_streams.fetch_add(1, Relaxed);
        let span =
            info_span!("inbound", src.identity = %client_id, dst = %target, forwarded = %forwarded);
        let started = Instant::now();
        let _tracked = self.live.track({
            let mut l = crate::telemetry::live::Live::new("inbound", peer, target);
            l.source_identity = client_id.to_string();
            l.destination_workload = format!("{}/{}", local.namespace, local.name);
            l.via = "tunnel".into();
            l
        });
        let (decision, bytes) = async move {
            info!("delivering");
            let joined = join_tcp(
                upstream,
                Tunnel {
                    send,
                    recv: req.into_body(),
                },
            );
            match until_revoked(joined, admitted).await {
                Some((sent, received)) => ("allowed", (received, sent)),
                None => ("closed: the policy now denies this connection", (0, 0)),
            }
        }
        .instrument(span)
        .await;
        if self.access_log.wants(&local.namespace) {
            self.log_tcp(
                client_id,
                &forwarded,
                (&local.namespace, &local.name),
                target,
                decision,
                bytes,
                started,
            );
        }
    }

    /// The access log line for a tunneled TCP connection (destination side).
    #[allow(clippy::too_many_arguments)]
    fn log_tcp(
        &self,
        client: &SpiffeId,
        forwarded: &str,
        (namespace, name): (&str, &str),
        target: SocketAddr,
        decision: &str,
        (received, sent): (u64, u64),
        started: Instant,
    ) {
        let placement = self.placement.current();
        let src = placement.by_ip(forwarded_for(forwarded).unwrap_or(target.ip()));
        let src = src.filter(|w| &w.identity == client);
        let source = Peer {
            workload: src.map_or("", |w| w.name.as_str()),
            namespace: src.map_or("", |w| w.namespace.as_str()),
            principal: client.as_str(),
            address: forwarded_for(forwarded)
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
        };
        let destination = Peer {
            workload: name,
            namespace,
            principal: "",
            address: target.to_string(),
        };
        self.access_log.write(
            &Entry::new(Reporter::Destination, source, destination, started)
                .decision(decision)
                .bytes(received, sent),
        );
    }

    /// A CONNECT stream that carries HTTP/1.1 requests (`crate::http::carried`): the same delivery checks
    /// as any CONNECT, then the requests are served one by one.
    async fn carried(
        &self,
        l7: Arc<crate::http::inbound::HttpInbound>,
        req: Request<RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        (peer, client_id, served): (SocketAddr, &SpiffeId, &SpiffeId),
        leaving: &crate::proxy::drain::Watch,
    ) {
        // The same answers as any CONNECT's.
        let placement = self.placement.current();
        let who = (peer, client_id, served);
        let kind = StreamKind::CarriedHttp1;
        let (target, w) = match self.deliverable(kind, &placement, connect_target(&req), who) {
            Ok(t) => t,
            Err(e) => {
                let _ = answer_connect(&mut respond, e.status());
                return;
            }
        };
        let stream = crate::http::carried::Stream {
            identity: client_id.clone(),
            peer,
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            target,
        };
        drop(placement);
        let Ok(send) = answer_connect(&mut respond, StatusCode::OK) else {
            return;
        };
        self.stats.inbound_streams.fetch_add(1, Relaxed);
        self.stats.inbound_carried_streams.fetch_add(1, Relaxed);
        let mut tunnel = Tunnel {
            send,
            recv: req.into_body(),
        };
        let gate = crate::http::carried::ToPod {
            l7: &l7,
            stream: &stream,
            recent: Default::default(),
            spoofed: &self.stats.inbound_refused_spoofed_source,
        };
        let dial = || l7.pods.dial(target);
        if let Err(e) = crate::http::relay::serve(&mut tunnel, &gate, dial, leaving).await {
            debug!(%peer, %target, error = %mesh_api::placement::error_chain(&e), "carried stream ended");
        }
    }

    /// An HTTP request from another node's proxy, for a pod of this node (L7): the same delivery
    /// checks as CONNECT, then authorization and rate limits per request.
    async fn request(
        &self,
        l7: &crate::http::inbound::HttpInbound,
        req: Request<RecvStream>,
        respond: h2::server::SendResponse<Bytes>,
        peer: SocketAddr,
        client_id: &SpiffeId,
        served: &SpiffeId,
    ) {
        use crate::http::{body, respond::ProxyError};
        let (mut parts, recv) = req.into_parts();
        let h = &mut parts.headers;
        let target = h
            .remove(&crate::proxy::tunnel::TARGET_HEADER)
            .and_then(|t| t.to_str().ok()?.parse::<SocketAddr>().ok());
        let proto = h
            .remove(&crate::http::UPSTREAM_PROTOCOL_HEADER)
            .and_then(|p| crate::http::UpstreamProtocol::parse(p.to_str().ok()?))
            .unwrap_or(crate::http::UpstreamProtocol::H1);
        let forwarded = h.remove(http::header::FORWARDED);
        let forwarded = forwarded
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let grpc = crate::http::is_grpc(&parts.headers);
        let req = Request::from_parts(parts, body::boxed(body::RecvBody::new(recv)));
        let placement = self.placement.current();
        let who = (peer, client_id, served);
        let resp = match self.deliverable(StreamKind::Request, &placement, target, who) {
            Ok((target, w)) => {
                self.stats.inbound_streams.fetch_add(1, Relaxed);
                match claimed_source(&placement, Some(forwarded), client_id, peer.ip()) {
                    Ok(ip) => {
                        let caller = crate::http::inbound::Caller {
                            identity: Some(client_id.clone()),
                            ip,
                        };
                        l7.handle(req, &caller, (&w.namespace, &w.name), target, proto)
                            .await
                    }
                    Err(e) => {
                        self.stats
                            .inbound_refused_spoofed_source
                            .fetch_add(1, Relaxed);
                        warn!(%peer, %target, error = %e, "refused request: spoofed source address");
                        crate::http::respond::error_response(
                            &ProxyError::Denied(e.to_string()),
                            grpc,
                        )
                    }
                }
            }
            // A request names its target in a header: any target it cannot be delivered to is
            // "not local", a missing one too.
            Err(e) => {
                if let Undeliverable::BadTarget = e {
                    self.stats.inbound_refused_not_local.fetch_add(1, Relaxed);
                    warn!(%peer, client = %client_id, "refused request: no target");
                }
                crate::http::respond::error_response(&ProxyError::NotLocal, grpc)
            }
        };
        if let Err(e) = crate::http::upstream::respond_h2(respond, resp).await {
            debug!(%peer, error = %e, "response to the tunnel ended");
        }
    }
}
