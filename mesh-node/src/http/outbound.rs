//! The source side: serves the app's HTTP connection with hyper and sends each request where its
//! route says, under the backend Service's traffic policy.
use mesh_api::sync::LockExt;
use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{HeaderValue, Request, Response, header};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_api::{gateway::HTTPRouteFilter, identity::SpiffeId};
use tokio::sync::watch;
use tracing::{debug, info};

use super::{
    Protocol, UpstreamProtocol,
    body::{Body, Recording, Replay, boxed},
    filters,
    h1frame::MAX_HEADER_BYTES,
    idle::Activity,
    inbound::{Caller, HttpInbound},
    is_grpc,
    policy::{Abort, Outcome, ServicePolicy, backoff},
    respond::{Flag, ProxyError, error_response},
    services::{Endpoints, Service, ServiceState, acquire},
    stats::{self, L7Stats, Recent, RequestLabels},
    upgrade,
    upstream::{self, TunnelTarget},
};
use crate::{
    config::node::NodeConfig,
    kernel::accel::PodStream,
    policy::routes,
    proxy::tunnel::Tunnels,
    telemetry::access_log::{self, AccessLog, Reporter},
    telemetry::trace::{Hop, Tracing},
};

/// How long an app's HTTP/1.1 connection may wait for its next request when its Service's
/// policy says nothing (Envoy's default idle timeout).
const HTTP1_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where the app's connection was going.
#[derive(Clone, Debug)]
pub enum Target {
    /// A Service port, by cluster IP.
    Service(Arc<Service>, u16),
    /// A pod, by IP (`namespace/name`), on `port`.
    Pod(String, u16),
}

/// Who opened the connection and where it was going.
#[derive(Clone, Debug)]
pub struct Conn {
    /// `namespace/name` of the client pod.
    pub pod: (String, String),
    pub identity: Option<SpiffeId>,
    pub peer: SocketAddr,
    /// The address the app connected to.
    pub dst: SocketAddr,
    pub target: Target,
    /// The client's HTTP version, and the declared protocol if any.
    pub detected: UpstreamProtocol,
    pub declared: Option<Protocol>,
    /// `Forwarded: for="<peer>"` for requests crossing to other nodes.
    pub forwarded: HeaderValue,
    /// The carried stream this connection used last, for its next request.
    pub held: Arc<super::carried::Held>,
    /// The pod's requests in flight, over all its connections (`--max-requests-per-pod`).
    pub requests: Arc<tokio::sync::Semaphore>,
}

#[derive(Clone)]
pub struct HttpOutbound {
    pub node: String,
    pub config: watch::Receiver<Arc<NodeConfig>>,
    pub tunnels: Arc<Tunnels>,
    /// HTTP/1.1 requests to other nodes, on kept streams.
    pub carried: Arc<super::carried::Carried>,
    pub inbound: Arc<HttpInbound>,
    pub stats: Arc<L7Stats>,
    pub access_log: Arc<AccessLog>,
    pub tracing: Arc<Tracing>,
    pub limit_hits: Arc<crate::proxy::limits::Hits>,
    /// Says when this generation drains: app connections end at their next boundary.
    pub leaving: crate::proxy::drain::Watch,
}

/// An app connection's key for its recent series ([`Recent`]): the labels that vary by request
/// (the source's are the connection's). Their bytes are kept in the key itself: a request's
/// lookup then reads only the connection's list, where strings of their own were each a cache
/// line of their own, cold by the time the connection's next request came.
#[derive(Debug)]
pub struct OutboundSeriesKey {
    code: u16,
    flag: &'static str,
    /// Lengths of the backend Service, the pod and the gRPC status, back to back in `labels`.
    lens: [usize; 3],
    labels: Labels,
}

/// Label bytes in place when they fit (nearly always: names of 253 bytes at most).
#[derive(Debug)]
enum Labels {
    Inline([u8; INLINE_LABELS]),
    Heap(Box<[u8]>),
}

const INLINE_LABELS: usize = 96;

type KeyOf<'a> = (&'a str, &'a str, u16, &'a str, &'static str);

impl OutboundSeriesKey {
    fn of((service, pod, code, grpc_status, flag): KeyOf<'_>) -> Self {
        let parts = [service, pod, grpc_status];
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let labels = if total <= INLINE_LABELS {
            let mut buf = [0u8; INLINE_LABELS];
            let mut at = 0;
            for p in parts {
                buf[at..at + p.len()].copy_from_slice(p.as_bytes());
                at += p.len();
            }
            Labels::Inline(buf)
        } else {
            Labels::Heap(parts.concat().into_bytes().into_boxed_slice())
        };
        Self {
            code,
            flag,
            lens: parts.map(str::len),
            labels,
        }
    }

    fn is(&self, (service, pod, code, grpc_status, flag): KeyOf<'_>) -> bool {
        let parts = [service, pod, grpc_status];
        if self.code != code || self.flag != flag || self.lens != parts.map(str::len) {
            return false;
        }
        let bytes = match &self.labels {
            Labels::Inline(b) => &b[..],
            Labels::Heap(b) => &b[..],
        };
        let mut at = 0;
        parts.iter().all(|p| {
            let same = &bytes[at..at + p.len()] == p.as_bytes();
            at += p.len();
            same
        })
    }
}

/// What an app connection's requests share.
struct Session {
    l7: Arc<HttpOutbound>,
    conn: Arc<Conn>,
    recent: Recent<OutboundSeriesKey>,
}

/// A chosen backend: its Service (with policy and state) and the pod port requests go to.
struct Backend<'c> {
    /// The config's (borrowed: its count is written by every connection's requests).
    service: &'c Arc<Service>,
    /// Its state and endpoint list, borrowed from it likewise.
    state: &'c Arc<ServiceState>,
    endpoints: &'c Endpoints,
    target_port: u16,
    proto: UpstreamProtocol,
}

/// What the route decided besides the backend.
#[derive(Default)]
struct Decided {
    mirror: Option<(String, u16, u32)>,
    response_headers: Vec<mesh_api::gateway::HeaderModifier>,
    request_timeout: Option<Duration>,
    per_try_timeout: Option<Duration>,
}

pin_project_lite::pin_project! {
    /// `fut`, or `Timeout` once its limit has passed. The future is held once: a `match` with a
    /// `timeout(t, fut).await` arm and a `fut.await` arm (or an `async fn` around `select!`)
    /// holds it two or three times, and these futures are kilobytes, copied at every level a
    /// request's future is built (route's future was 27 KB).
    struct Within<F> {
        #[pin]
        fut: F,
        #[pin]
        expiry: Option<tokio::time::Sleep>,
    }
}

fn within<F>(limit: Option<Duration>, fut: F) -> Within<F> {
    Within {
        fut,
        expiry: limit.map(tokio::time::sleep),
    }
}

impl<T, F: Future<Output = Result<T, ProxyError>>> Future for Within<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if let Poll::Ready(r) = this.fut.poll(cx) {
            return Poll::Ready(r);
        }
        match this.expiry.as_pin_mut() {
            Some(s) => s.poll(cx).map(|()| Err(ProxyError::Timeout)),
            None => Poll::Pending,
        }
    }
}

fn chance(percent: f64) -> bool {
    percent > 0.0 && rand::random::<f64>() * 100.0 < percent
}

impl HttpOutbound {
    /// Serves the app's connection until it closes.
    pub async fn serve(self: Arc<Self>, client: PodStream, conn: Arc<Conn>) {
        // Circuit breaking on connections: the Service's `maxConnections` counts app connections
        // to it through this node.
        let _slot = match &conn.target {
            Target::Service(svc, _) => {
                let state = self.runtime().service(&svc.name);
                match state.connection(svc.policy.breaker.max_connections) {
                    Some(slot) => Some(slot),
                    None => {
                        self.inbound
                            .counters
                            .connections_over_limit
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        info!(service = %svc.name, "connection refused: circuit breaker maxConnections");
                        let _ = socket2::SockRef::from(client.get_ref())
                            .set_linger(Some(Duration::ZERO));
                        return;
                    }
                }
            }
            Target::Pod(..) => None,
        };
        let _ = client.get_ref().set_nodelay(true);
        let io = TokioIo::new(client);
        let idle = match &conn.target {
            Target::Service(svc, _) => svc.policy.idle_timeout,
            Target::Pod(..) => None,
        };
        // One handle per connection, cloned per request: the proxy's own `Arc` is shared by every
        // connection, and its count written from both cores on each request.
        let session = Arc::new(Session {
            l7: self.clone(),
            conn: conn.clone(),
            recent: Recent::default(),
        });
        let result = match conn.detected {
            UpstreamProtocol::H1 => {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let s = session.clone();
                    async move {
                        let mut resp = s.l7.request(req.map(boxed), &s).await;
                        let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
                        if s.l7.leaving.is_stopped() && !switching {
                            // Draining: this answer closes the connection (hyper sees the
                            // field), so the app's next request opens one to the generation
                            // that took over. Idle connections are not closed under a client
                            // that may be sending on them; they end at the drain deadline.
                            resp.headers_mut()
                                .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                // hyper's header read timer runs from the end of one response to the end of the
                // next request's head: on a keep-alive connection it is the idle timeout.
                // The buffer's limit alone let a 70 KB head through (it is checked only while a
                // head is incomplete); the head's own limit is what answers 431.
                http1::Builder::new()
                    .max_header_size(MAX_HEADER_BYTES)
                    .max_buf_size(MAX_HEADER_BYTES)
                    // One buffer per write: a small answer's head and body are copied together
                    // instead of queued as separate slices (proxies' CPU per app CPU on mesh_l7
                    // 222.2% -> 216.9% over 6 pairs); a large body costs a copy into it.
                    .writev(false)
                    .timer(super::idle::HeadTimer::default())
                    .header_read_timeout(idle.unwrap_or(HTTP1_IDLE_TIMEOUT))
                    .serve_connection(io, svc)
                    .with_upgrades()
                    .await
            }
            UpstreamProtocol::H2 => {
                let activity = idle.map(|_| Arc::new(Activity::default()));
                let a = activity.clone();
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (s, a) = (session.clone(), a.clone());
                    async move {
                        let busy = a.as_ref().map(|a| a.start());
                        let resp = s.l7.request(req.map(boxed), &s).await;
                        Ok::<_, Infallible>(match busy {
                            Some(b) => resp.map(|body| boxed(b.until_end_of(body))),
                            None => resp,
                        })
                    }
                });
                let served = http2::Builder::new(TokioExecutor::new())
                    .max_header_list_size(MAX_HEADER_BYTES as u32)
                    .initial_stream_window_size(4 << 20)
                    .initial_connection_window_size(16 << 20)
                    .serve_connection(io, svc);
                tokio::pin!(served);
                loop {
                    // The idle timeout, when the Service's policy sets one.
                    let wait = match (idle, &activity) {
                        (Some(idle), Some(a)) => match a.next_check(idle) {
                            Some(wait) => Some(wait),
                            None => {
                                served.as_mut().graceful_shutdown();
                                break served.await;
                            }
                        },
                        _ => None,
                    };
                    tokio::select! {
                        r = served.as_mut() => break r,
                        _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
                        // Draining: GOAWAY; streams in flight finish.
                        () = self.leaving.stopped() => {
                            served.as_mut().graceful_shutdown();
                            break served.await;
                        }
                    }
                }
            }
        };
        if let Err(e) = result {
            debug!(error = %e, "HTTP connection from the app ended");
        }
    }

    async fn request(&self, mut req: Request<Body>, session: &Session) -> Response<Body> {
        let (conn, recent) = (&*session.conn, &session.recent);
        let started = Instant::now();
        let upgrade = upgrade::prepare_source(&mut req);
        let grpc = is_grpc(req.headers());
        let cfg = self.config.borrow().clone();
        let mut span = self.tracing.start_request(Hop::Outbound, &mut req);
        // Copied only when an access log line or a debug line will be written.
        let log = self.access_log.wants(&conn.pod.0);
        let seen =
            (log || tracing::enabled!(tracing::Level::DEBUG)).then(|| access_log::Seen::of(&req));
        let request_bytes = super::content_length(req.headers());
        let counting = stats::count_request(&mut req);
        let mut route = None;
        // Held until the answer's head: one pod's flood of requests cannot take the proxy's time
        // from every other pod's (a refusal costs next to nothing; a queue would hold memory).
        let routed = match conn.requests.try_acquire() {
            Ok(_in_flight) => self.route(&cfg, req, conn, &mut route).await,
            Err(_) => {
                self.limit_hits
                    .hit(crate::proxy::limits::Limit::RequestsPerPod);
                Err((
                    ProxyError::Overflow("the pod has --max-requests-per-pod in flight"),
                    "",
                ))
            }
        };
        let (resp, service, dst_pod) = match routed {
            Ok(r) => r,
            Err((e, service)) => {
                debug!(error = %e, "request failed");
                (error_response(&e, grpc), service, String::new())
            }
        };
        let resp = match upgrade {
            Some(u) => upgrade::finish_source(resp, u),
            None => resp,
        };
        let (dst_ns, dst_name) = dst_pod.split_once('/').unwrap_or_default();
        let response_bytes = super::content_length(resp.headers());
        let (code, flag) = (resp.status().as_u16(), super::respond::flag_label(&resp));
        let labels = |grpc_status| RequestLabels::<&str> {
            reporter: "source",
            source_workload: conn.pod.1.as_str(),
            source_namespace: conn.pod.0.as_str(),
            source_principal: conn.identity.as_ref().map_or("", SpiffeId::as_str),
            destination_service: service,
            destination_workload: dst_name,
            destination_namespace: dst_ns,
            response_code: code,
            grpc_status,
            response_flags: flag,
            connection_security: "mutual_tls",
        };
        // A gRPC status in trailers: recorded when they arrive.
        // (Empty for every non-gRPC answer: no allocation.)
        let status_now = super::respond::grpc_status(&resp).to_string();
        let keep = counting.is_some() || stats::streams(resp.headers(), resp.body());
        let series = (!stats::status_in_trailers(grpc, &resp)).then(|| {
            let key = (service, dst_pod.as_str(), code, status_now.as_str(), flag);
            self.stats.record_recent(
                recent,
                |k| k.is(key),
                || (OutboundSeriesKey::of(key), labels(&status_now)),
                started.elapsed(),
                (request_bytes, response_bytes),
                keep,
            )
        });
        if let Some(mut span) = span.take() {
            span.set(
                "mesh.source.workload",
                format!("{}/{}", conn.pod.0, conn.pod.1),
            );
            span.set("mesh.destination.service", service.to_string());
            span.set("mesh.destination.workload", dst_pod.clone());
            if let Some(r) = &route {
                span.set("mesh.route", r.to_string());
            }
            span.end(resp.status().as_u16(), super::respond::flag_label(&resp));
        }
        if let Some(seen) = &seen {
            debug!(method = %seen.method, path = %seen.path, status = resp.status().as_u16(), took = ?started.elapsed(), "request");
            if log {
                let flag = super::respond::flag(&resp);
                let source = access_log::Peer {
                    workload: &conn.pod.1,
                    namespace: &conn.pod.0,
                    principal: conn.identity.as_ref().map_or("", SpiffeId::as_str),
                    address: conn.peer.to_string(),
                };
                let destination = access_log::Peer {
                    workload: dst_name,
                    namespace: dst_ns,
                    principal: "",
                    address: conn.dst.to_string(),
                };
                let http = seen.http(
                    resp.status().as_u16(),
                    super::respond::grpc_status(&resp),
                    route.unwrap_or(""),
                );
                self.access_log.write(
                    &access_log::Entry::new(Reporter::Source, source, destination, started)
                        .http(http)
                        .service(service)
                        .decision(Flag::decision(flag))
                        .flags(Flag::label(flag))
                        .bytes(request_bytes, response_bytes),
                );
            }
        }
        match series {
            Some(Some(series)) => stats::count_response(resp, series, counting),
            Some(None) => resp,
            None => stats::record_at_trailers(
                &self.stats,
                labels(""),
                started,
                request_bytes,
                resp,
                counting,
            ),
        }
    }

    /// Routes and sends; the answer carries the backend Service's name and the pod's, the error
    /// the Service's (for metrics). Names are borrowed from the config: no copy per request.
    async fn route<'c>(
        &self,
        cfg: &'c NodeConfig,
        mut req: Request<Body>,
        conn: &'c Conn,
        route: &mut Option<&'c str>,
    ) -> Result<(Response<Body>, &'c str, String), (ProxyError, &'c str)> {
        // Routing, policy and the pod judge one path: the normalized one.
        super::sanitize::request(&mut req, self.inbound.escaped_slashes).map_err(|e| (e, ""))?;
        let (service, port) = match &conn.target {
            Target::Service(s, p) => (s, *p),
            Target::Pod(pod, port) => {
                // Straight to the pod: no route, no policy; still per-request authorization and
                // metrics at its node.
                let (resp, _) = self
                    .send_to(cfg, pod, *port, conn.detected, req, conn)
                    .await
                    .map_err(|e| (e, ""))?;
                return Ok((resp, "", pod.clone()));
            }
        };
        let name = service.name.as_str();
        let fail = |e| (e, name);
        let mut decided = Decided::default();
        let (backend_name, backend_port) = match service.table(port) {
            None => (name, port),
            Some(table) => {
                let Some((rule, prefix)) = table.select(&routes::Request {
                    method: req.method().as_str(),
                    path: req.uri().path(),
                    query: req.uri().query(),
                    headers: req.headers(),
                }) else {
                    return Err(fail(ProxyError::NoRoute));
                };
                *route = Some(&rule.route);
                let route_ns = rule.route.split_once('/').map_or("", |(ns, _)| ns);
                if let Some(resp) =
                    apply_filters(&mut req, &rule.filters, prefix, route_ns, &mut decided)
                {
                    return Ok((resp, name, String::new()));
                }
                decided.request_timeout = rule.timeouts.request;
                decided.per_try_timeout = rule.timeouts.backend_request;
                let Some(b) = routes::pick(&rule.backends, rand::random()) else {
                    return Err(fail(ProxyError::NoEndpoints(format!(
                        "{}: no backend with weight",
                        rule.route
                    ))));
                };
                (b.service.as_str(), if b.port == 0 { port } else { b.port })
            }
        };
        let backend = self
            .backend(cfg, backend_name, backend_port, conn)
            .map_err(fail)?;
        let (resp, pod) = self
            .send(cfg, req, &backend, &mut decided, conn)
            .await
            .map_err(|e| (e, backend_name))?;
        let mut resp = resp;
        for m in &decided.response_headers {
            filters::modify_headers(resp.headers_mut(), m);
        }
        Ok((resp, backend_name, pod))
    }

    fn backend<'c>(
        &self,
        cfg: &'c NodeConfig,
        name: &str,
        port: u16,
        conn: &Conn,
    ) -> Result<Backend<'c>, ProxyError> {
        let service = cfg
            .l7
            .service(name)
            .ok_or_else(|| ProxyError::NoEndpoints(format!("{name}: unknown Service")))?;
        let p = service
            .port(port)
            .or_else(|| service.ports.first())
            .ok_or_else(|| ProxyError::NoEndpoints(format!("{name}: no port {port}")))?;
        let proto = match p.protocol.or(conn.declared) {
            Some(p) => p.upstream(),
            None => conn.detected,
        };
        let live = self.runtime().live(service);
        Ok(Backend {
            state: &live.state,
            endpoints: &live.endpoints,
            service,
            target_port: p.target_port,
            proto,
        })
    }

    fn runtime(&self) -> &super::services::Runtime {
        &self.inbound.runtime
    }

    /// Faults, circuit breaking, then tries with retries under the timeouts.
    async fn send(
        &self,
        cfg: &NodeConfig,
        req: Request<Body>,
        b: &Backend<'_>,
        decided: &mut Decided,
        conn: &Conn,
    ) -> Result<(Response<Body>, String), ProxyError> {
        let policy: &ServicePolicy = &b.service.policy;
        if let Some((pct, d)) = policy.delay
            && chance(pct)
        {
            tokio::time::sleep(d).await;
        }
        if let Some((pct, a)) = policy.abort
            && chance(pct)
        {
            return Err(match a {
                Abort::Http(status) => ProxyError::FaultAbort { status, grpc: None },
                Abort::Grpc(code) => ProxyError::FaultAbort {
                    status: 200,
                    grpc: Some(code),
                },
            });
        }
        let request_timeout = decided.request_timeout.or(policy.request_timeout);
        // Circuit breaking: a request slot, else a bounded place in the queue for one. Waiting in
        // the queue counts against the request timeout.
        within(request_timeout, async {
            let _slot = match b.state.request_slot(policy.breaker.max_requests) {
                Some(s) => s,
                None => {
                    let Some(_queued) = acquire(
                        &b.state.pending,
                        Some(policy.breaker.max_pending.unwrap_or(0)),
                    ) else {
                        return Err(ProxyError::Overflow(
                            "max requests and max pending requests",
                        ));
                    };
                    b.state.wait_request_slot(policy.breaker.max_requests).await
                }
            };
            self.tries(cfg, req, b, decided, conn).await
        })
        .await
    }

    async fn tries(
        &self,
        cfg: &NodeConfig,
        req: Request<Body>,
        b: &Backend<'_>,
        decided: &Decided,
        conn: &Conn,
    ) -> Result<(Response<Body>, String), ProxyError> {
        let policy = &b.service.policy;
        let now = Instant::now();
        let eps = b.endpoints;
        if eps.is_empty() {
            return Err(ProxyError::NoEndpoints(b.service.name.clone()));
        }
        let retry = policy.retry.as_ref();
        if let Some(r) = retry {
            b.state.budget.locked().deposit(r.budget_percent, now);
        }
        let per_try = decided
            .per_try_timeout
            .or(retry.and_then(|r| r.per_try_timeout));
        let hash_key = match &policy.lb {
            super::policy::Lb::Hash(h) => req.headers().get(h).map(|v| v.as_bytes().to_vec()),
            _ => None,
        };
        let (mut parts, body) = req.into_parts();
        // An upgraded connection's bytes are neither replayed nor mirrored.
        let keep = (retry.is_some() || decided.mirror.is_some())
            && !parts.headers.contains_key(&upgrade::UPGRADE_HEADER);
        let (mut body, replay) = if keep {
            let (rec, replay) = Recording::new(body);
            (Some(boxed(rec)), Some(replay))
        } else {
            (Some(body), None)
        };
        let mut tried: Vec<String> = Vec::new();
        let mut attempt = 0u32;
        // When this try starts: the first one starts now (a clock read is not free on a VM).
        let mut start = now;
        loop {
            let Some(ep) = b.state.balancer.pick(
                eps,
                &policy.lb,
                hash_key.as_deref(),
                &tried,
                start,
                rand::random,
            ) else {
                return Err(ProxyError::NoEndpoints(b.service.name.clone()));
            };
            let this_body = match body.take() {
                Some(bd) => bd,
                None => match replay.as_ref().and_then(Replay::body) {
                    Some(bd) => bd,
                    None => unreachable!("retries only happen with a replayable body"),
                },
            };
            // The head is copied only when a retry or a mirror may need it again.
            let req = if keep {
                let mut req = Request::new(this_body);
                *req.method_mut() = parts.method.clone();
                *req.uri_mut() = parts.uri.clone();
                *req.headers_mut() = parts.headers.clone();
                req
            } else {
                Request::from_parts(
                    std::mem::replace(&mut parts, Request::new(()).into_parts().0),
                    this_body,
                )
            };
            let in_flight = ep.start();
            // Built where it is awaited: a future bound to a local first is held twice.
            let result = within(
                per_try,
                self.send_to(cfg, &ep.key, b.target_port, b.proto, req, conn),
            )
            .await;
            drop(in_flight);
            let outcome = match &result {
                // The destination's proxy answers its own upstream failures; its flag says which
                // (pods cannot set it: it is taken off their answers).
                Ok((r, _)) => match super::respond::flag(r) {
                    Some(Flag::Reset) => Outcome::Reset,
                    Some(Flag::ConnectFailure) => Outcome::ConnectFailure,
                    Some(Flag::Timeout) => Outcome::Timeout,
                    _ => Outcome::Response(
                        r.status().as_u16(),
                        super::respond::grpc_status(r).parse().ok(),
                    ),
                },
                Err(ProxyError::Connect(_)) => Outcome::ConnectFailure,
                Err(ProxyError::Timeout) => Outcome::Timeout,
                Err(_) => Outcome::Reset,
            };
            let now = Instant::now();
            if matches!(outcome, Outcome::Response(..)) {
                ep.observe(now - start, now);
            }
            // Answers the proxies made themselves (denied, rate limited) say nothing about the
            // endpoint's health.
            let proxy_answer = result.as_ref().is_ok_and(|(r, _)| {
                matches!(
                    super::respond::flag(r),
                    Some(Flag::Rbac | Flag::RateLimited)
                )
            });
            if !proxy_answer
                && b.state.balancer.record(
                    eps,
                    ep,
                    outcome.is_failure(),
                    policy.outlier.as_ref(),
                    now,
                )
            {
                info!(service = %b.service.name, endpoint = %ep.key, "endpoint ejected after consecutive failures");
            }
            let again = retry.is_some_and(|r| {
                attempt < r.attempts
                    && !proxy_answer
                    && r.on.retryable(outcome)
                    && replay.as_ref().and_then(Replay::body).is_some()
                    && b.state.budget.locked().withdraw(now)
            });
            if !again {
                if let (Some((svc, port, pct)), Some(replay)) = (&decided.mirror, &replay) {
                    self.mirror(cfg, svc, *port, *pct, &parts, replay, conn);
                }
                return result;
            }
            let r = retry.expect("checked above");
            attempt += 1;
            self.inbound
                .counters
                .retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tried.push(ep.key.clone());
            debug!(service = %b.service.name, endpoint = %ep.key, ?outcome, attempt, "retrying");
            tokio::time::sleep(backoff(r.base, r.max, attempt - 1, rand::random())).await;
            start = Instant::now();
        }
    }

    /// Sends a copy of the request to the mirror backend; its answer is dropped.
    #[allow(clippy::too_many_arguments)]
    fn mirror(
        &self,
        cfg: &NodeConfig,
        service: &str,
        port: u16,
        percent: u32,
        parts: &http::request::Parts,
        replay: &Replay,
        conn: &Conn,
    ) {
        if !chance(f64::from(percent)) {
            return;
        }
        let (Some(body), Ok(b)) = (replay.body(), self.backend(cfg, service, port, conn)) else {
            return;
        };
        let now = Instant::now();
        // Owned: the mirror's task outlives this request.
        let Some(ep) = b
            .state
            .balancer
            .pick(
                b.endpoints,
                &b.service.policy.lb,
                None,
                &[],
                now,
                rand::random,
            )
            .cloned()
        else {
            return;
        };
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.headers_mut() = parts.headers.clone();
        let cfg = self.config.borrow().clone();
        // Its own held stream: the mirror's backend is another Service's.
        let conn = Conn {
            held: Default::default(),
            ..conn.clone()
        };
        let this = self.clone();
        let (port, proto, name) = (b.target_port, b.proto, b.service.name.clone());
        tokio::spawn(async move {
            let r = this.send_to(&cfg, &ep.key, port, proto, req, &conn).await;
            debug!(service = %name, ok = r.is_ok(), "mirrored");
        });
    }

    /// One try to one endpoint (`namespace/name`): this node's inbound side, or another node's
    /// over the tunnel. Returns the response and the endpoint.
    async fn send_to(
        &self,
        cfg: &NodeConfig,
        pod: &str,
        port: u16,
        proto: UpstreamProtocol,
        req: Request<Body>,
        conn: &Conn,
    ) -> Result<(Response<Body>, String), ProxyError> {
        let (ns, name) = pod
            .split_once('/')
            .ok_or_else(|| ProxyError::Connect(format!("bad endpoint {pod:?}")))?;
        let w = cfg
            .placement
            .pod(ns, name)
            .ok_or_else(|| ProxyError::Connect(format!("{pod} is not in the placement")))?;
        let ip = w
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == conn.dst.is_ipv4())
            .or(w.ips.first())
            .copied()
            .ok_or_else(|| ProxyError::Connect(format!("{pod} has no address")))?;
        let target = SocketAddr::new(ip, port);
        if w.node == self.node {
            let caller = Caller {
                identity: conn.identity.clone(),
                ip: conn.peer.ip(),
            };
            // Boxed: the destination side's future would otherwise make every request's future
            // (to other nodes too) larger at each level it is moved through.
            let resp = Box::pin(self.inbound.handle(req, &caller, (ns, name), target, proto)).await;
            return Ok((resp, pod.to_string()));
        }
        let src = conn
            .identity
            .as_ref()
            .ok_or_else(|| ProxyError::Denied("the client pod has no mesh identity".into()))?;
        let node = cfg
            .placement
            .tunnel_addr(&w.node, ip)
            .ok_or_else(|| ProxyError::Connect(format!("node {} has no tunnel address", w.node)))?;
        let t = TunnelTarget {
            src,
            node,
            dst: &w.identity,
            target,
            forwarded: &conn.forwarded,
        };
        // An upgrade needs a stream of its own; HTTP/2 pods get their requests as HTTP/2 streams
        // (trailers, multiplexing end to end).
        let resp = if proto == UpstreamProtocol::H1
            && !req.headers().contains_key(&upgrade::UPGRADE_HEADER)
        {
            self.carried.send(t, req, Some(&conn.held)).await?
        } else {
            upstream::via_tunnel(&self.tunnels, t, proto, req).await?
        };
        Ok((resp, pod.to_string()))
    }
}

/// Applies a rule's filters to the request; a redirect answers at once.
fn apply_filters(
    req: &mut Request<Body>,
    fs: &[HTTPRouteFilter],
    prefix: Option<&str>,
    route_ns: &str,
    decided: &mut Decided,
) -> Option<Response<Body>> {
    for f in fs {
        match f.type_.as_str() {
            "RequestRedirect" => {
                let r = f.request_redirect.clone().unwrap_or_default();
                let host = upstream::authority(req).unwrap_or_default();
                let host = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
                let (status, location) = filters::redirect(req.uri(), host, &r, prefix);
                let mut resp = Response::new(super::body::empty());
                *resp.status_mut() = status;
                if let Ok(v) = HeaderValue::from_str(&location) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                return Some(resp);
            }
            "RequestHeaderModifier" => {
                if let Some(m) = &f.request_header_modifier {
                    filters::modify_headers(req.headers_mut(), m);
                }
            }
            "ResponseHeaderModifier" => {
                if let Some(m) = &f.response_header_modifier {
                    decided.response_headers.push(m.clone());
                }
            }
            "URLRewrite" => {
                if let Some(rw) = &f.url_rewrite {
                    let (uri, host) = filters::rewrite(req.uri(), rw, prefix);
                    *req.uri_mut() = uri;
                    if let Some(h) = host {
                        set_host(req, &h);
                    }
                }
            }
            "RequestMirror" => {
                if let Some(m) = &f.request_mirror {
                    let ns = m.backend_ref.namespace.as_deref().unwrap_or(route_ns);
                    decided.mirror = Some((
                        format!("{ns}/{}", m.backend_ref.name),
                        m.backend_ref.port.unwrap_or(0),
                        m.percent.unwrap_or(100),
                    ));
                }
            }
            _ => {}
        }
    }
    None
}

/// Replaces the request's host, wherever the request carries it (HTTP/2: the URI's authority).
fn set_host(req: &mut Request<Body>, host: &str) {
    if req.uri().authority().is_some() {
        let mut parts = req.uri().clone().into_parts();
        if let Ok(a) = host.parse() {
            parts.authority = Some(a);
        }
        if let Ok(u) = http::Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }
    if let Ok(v) = HeaderValue::from_str(host) {
        req.headers_mut().insert(header::HOST, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_key_matches_only_the_same_labels() {
        let long = "x".repeat(INLINE_LABELS);
        let keys: &[KeyOf<'_>] = &[
            ("shop/web", "shop/web-1", 200, "", "-"),
            ("shop/web", "shop/web-1", 503, "", "-"),
            ("shop/web", "shop/web-1", 200, "", "UF"),
            ("shop/web", "shop/web-2", 200, "", "-"),
            ("shop/api", "shop/web-1", 200, "", "-"),
            ("shop/web", "shop/web-1", 200, "14", "-"),
            // The same bytes split differently between the labels.
            ("shop/web", "shop/web-12", 200, "", "-"),
            ("shop/web", "shop/web-1", 200, "2", "-"),
            // Too long to keep in place.
            ("shop/web", &long, 200, "", "-"),
            ("shop/web", &long[1..], 200, "", "-"),
        ];
        for (i, a) in keys.iter().enumerate() {
            let key = OutboundSeriesKey::of(*a);
            assert!(
                matches!(key.labels, Labels::Inline(_))
                    == (a.0.len() + a.1.len() + a.3.len() <= INLINE_LABELS),
                "{a:?}"
            );
            for (j, b) in keys.iter().enumerate() {
                assert_eq!(key.is(*b), i == j, "{a:?} against {b:?}");
            }
        }
    }
}
