//! Admin endpoint: health, readiness, counters, config, and the enrollment API the CNI plugin, the
//! tests and the local demo drive.
//!
//! Who may change what: the TCP admin listener (loopback of the host network, which every
//! hostNetwork pod and node process reaches) serves reads only. Everything that changes the
//! node (enrollment, which decides whose identity a network namespace speaks with; the log level)
//! is served only on a Unix socket in the state directory (`admin.sock`, mode 0600), and only to
//! callers whose `SO_PEERCRED` uid is 0: the split istio-cni and ztunnel use.
//!
//! | method | path                          | |
//! |--------|-------------------------------|---|
//! | GET    | /                             | live page (HTML): top workloads by requests and errors, denials, redirect counters, open connections |
//! | GET    | /healthz                      | 200 while the process serves |
//! | GET    | /ready                        | 200 once programs are attached and listeners bound |
//! | GET    | /v1/counters                  | kernel counters per program and outcome, proxy figures |
//! | GET    | /metrics                      | the same, in Prometheus text format (names in `metrics.rs`) |
//! | GET    | /v1/config                    | the validated config |
//! | GET    | /config_dump                  | everything the node runs on, in full (flags, workloads, Services, policy specs, pods, certificates) |
//! | GET    | /debug/explain?src=&dst=[&method=&path=] | would this connection be redirected, which route, policy and endpoints apply, and why |
//! | GET    | /debug/connections[?pod=ns/name] | connections carried now: who, where, how, for how long |
//! | GET    | /v1/l7                        | HTTP path: endpoint health per Service (latency, in flight, ejections) |
//! | GET    | /v1/mesh-config               | the configuration from the controller: version, stream state, contents |
//! | GET    | /v1/log-level                 | the log filter in force |
//! | PUT    | /v1/log-level                 | replace it (body: `RUST_LOG` syntax), no restart (Unix socket only) |
//! | GET    | /v1/pods                      | enrolled pods |
//! | PUT    | /v1/pods/{namespace}/{name}   | enroll: `{"netns": PATH, "service_account": NAME}`; with a configuration stream: register the pod's sandbox, enrolled while the configuration has it in the mesh (Unix socket only) |
//! | DELETE | /v1/pods/{namespace}/{name}   | unenroll (and forget the sandbox) (Unix socket only) |
pub(crate) mod explain;
use mesh_api::sync::LockExt;
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
};
use tracing::warn;

use crate::{
    config::Config,
    kernel::ebpf::Redirector,
    pods::enroll::{EnrollError, EnrollRequest, Enrollment, PodName},
    proxy::drain::Watch,
    proxy::limits::{HEAD_TIMEOUT, Limit, MAX_ADMIN_HEAD},
    proxy::outbound::OutboundStats,
    ready::Ready,
};

pub struct Admin {
    pub config: Config,
    pub ready: Ready,
    pub redirector: Arc<Redirector>,
    pub pods: Arc<Enrollment>,
    pub stats: Arc<OutboundStats>,
    pub mode: crate::mode::Mode,
    /// With config distribution, enrollment requests register sandboxes and the configuration
    /// decides (see `follow`).
    pub follow: Option<Arc<crate::pods::follow::Follow>>,
    /// Authorization figures, when policy comes from the controller.
    pub enforcer: Option<Arc<crate::policy::enforce::Enforcer>>,
    /// The HTTP path's state and request figures, when config comes from the controller.
    pub l7: Option<Arc<crate::http::inbound::HttpInbound>>,
    /// Connections being carried now.
    pub live: Arc<crate::telemetry::live::Connections>,
    /// Change requests refused: over TCP, or on the socket from a caller that is not root.
    pub changes_refused: std::sync::atomic::AtomicU64,
    /// Times each of the proxy's limits was hit (see `limits`).
    pub limit_hits: Arc<crate::proxy::limits::Hits>,
    /// Tunnel handshakes in progress (with the mesh).
    pub handshakes: Option<Arc<crate::proxy::limits::Handshakes>>,
    /// This generation and the hand-over it came from.
    pub upgrade: Arc<crate::proxy::handover::UpgradeStats>,
}

type Resp = Response<Full<Bytes>>;

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// `/metrics`, `/healthz` and `/ready` (the metrics port).
    Metrics,
    /// Every read (the TCP admin listener).
    Read,
    /// Reads and changes (the root-only Unix socket).
    Change,
}

/// Requests that change the node: served only with [`Exposure::Change`].
fn changes(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD)
}

/// The node's live page: top workloads, denials, redirect counters, open connections.
const LIVE_PAGE: &str = include_str!("ui/index.html");

const MAX_BODY: usize = 64 * 1024;

fn json_response(status: StatusCode, body: serde_json::Value) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string() + "\n")))
        .expect("static response parts")
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Resp {
    json_response(status, json!({ "error": message.to_string() }))
}

/// A query parameter, percent-decoded.
fn query(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// The one place enrollment errors become HTTP statuses.
fn enroll_error(e: EnrollError) -> Resp {
    let status = match &e {
        EnrollError::Invalid { .. } | EnrollError::ProxyNamespace { .. } => StatusCode::BAD_REQUEST,
        EnrollError::Netns { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        EnrollError::Conflict { .. } | EnrollError::Repoint { .. } => StatusCode::CONFLICT,
        EnrollError::NotFound(_) => StatusCode::NOT_FOUND,
        EnrollError::Kernel(_) | EnrollError::State { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    // Include the cause chain: "cannot read network namespace X: No such file or directory".
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    error(status, msg)
}

impl Admin {
    /// Serves a TCP listener: [`Exposure::Metrics`] or [`Exposure::Read`].
    /// At most `--max-admin-connections` at once; more are closed at accept and counted.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, watch: Watch, exposure: Exposure) {
        let slots = Arc::new(tokio::sync::Semaphore::new(
            self.config.limits.max_admin_connections,
        ));
        loop {
            let (stream, _) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => { warn!(error = %e, "admin accept failed"); continue; }
                },
                _ = watch.stopped() => return,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                self.limit_hits.hit(Limit::AdminConnections);
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                this.connection(stream, exposure).await;
                drop(slot);
            });
        }
    }

    /// Serves the Unix socket: everything, to root callers only (`SO_PEERCRED`). The socket's
    /// mode already keeps others out; the check holds even if someone loosens it.
    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener, watch: Watch) {
        loop {
            let stream = tokio::select! {
                a = listener.accept() => match a {
                    Ok((s, _)) => s,
                    Err(e) => { warn!(error = %e, "admin socket accept failed"); continue; }
                },
                _ = watch.stopped() => return,
            };
            match stream.peer_cred() {
                Ok(c) if c.uid() == 0 => {
                    tokio::spawn(self.clone().connection(stream, Exposure::Change));
                }
                other => {
                    self.changes_refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    warn!(caller = ?other.map(|c| (c.uid(), c.pid())), "admin socket: caller is not root; closed");
                }
            }
        }
    }

    async fn connection<Io>(self: Arc<Self>, io: Io, exposure: Exposure)
    where
        Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let svc = service_fn(move |req| {
            let this = self.clone();
            async move {
                let open = matches!(req.uri().path(), "/metrics" | "/healthz" | "/ready");
                Ok::<_, Infallible>(match exposure {
                    Exposure::Metrics if !open => error(
                        StatusCode::NOT_FOUND,
                        "this listener serves /metrics, /healthz and /ready only",
                    ),
                    Exposure::Metrics | Exposure::Read if changes(req.method()) => {
                        this.changes_refused
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        error(
                            StatusCode::METHOD_NOT_ALLOWED,
                            format!(
                                "changes are served only on the root-only socket {}",
                                this.config
                                    .state_dir
                                    .join(crate::config::ADMIN_SOCKET)
                                    .display()
                            ),
                        )
                    }
                    _ => this.route(req).await,
                })
            }
        });
        // A head must arrive in time and fit: a slow or huge head holds a connection slot for
        // HEAD_TIMEOUT at most, and never more than MAX_ADMIN_HEAD of memory.
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .max_buf_size(MAX_ADMIN_HEAD)
            .serve_connection(TokioIo::new(io), svc)
            .await;
    }

    /// Binds the admin socket for `<state_dir>/admin.sock` (see [`crate::sys::bind_root_socket`]).
    pub fn bind_unix(state_dir: &std::path::Path) -> std::io::Result<crate::sys::PendingSocket> {
        crate::sys::bind_root_socket(state_dir, crate::config::ADMIN_SOCKET)
    }

    /// `/debug/explain?src=POD_OR_IP&dst=IP:PORT[&method=GET&path=/]`.
    fn explain(&self, req: &Request<Incoming>) -> Resp {
        let (Some(src), Some(dst)) = (query(req, "src"), query(req, "dst")) else {
            return error(
                StatusCode::BAD_REQUEST,
                "usage: /debug/explain?src=<namespace/pod or IP>&dst=<ip:port>[&method=GET&path=/]",
            );
        };
        let Ok(dst) = dst.parse::<SocketAddr>() else {
            return error(
                StatusCode::BAD_REQUEST,
                format!("dst {dst:?} is not ip:port"),
            );
        };
        let Some(rx) = self.mode.config() else {
            return error(
                StatusCode::NOT_FOUND,
                "this node runs without configuration from a controller: nothing to explain",
            );
        };
        let cfg = rx.borrow().clone();
        let proxy_addrs: Vec<SocketAddr> = [
            self.config.proxy_ipv4.map(std::net::IpAddr::V4),
            self.config.proxy_ipv6.map(std::net::IpAddr::V6),
        ]
        .into_iter()
        .flatten()
        .map(|ip| SocketAddr::new(ip, self.config.outbound_port))
        .collect();
        let enrolled = |ns: &str, name: &str| self.pods.is_enrolled(ns, name);
        let node = crate::admin::explain::Node {
            name: &self.config.node_name,
            exclude_ports: &self.config.exclude_ports,
            opaque_ports: &self.config.opaque_ports,
            exclude_cidrs: &self.config.exclude_cidrs,
            proxy_addrs: &proxy_addrs,
            enrolled: &enrolled,
        };
        let q = crate::admin::explain::Query {
            src,
            dst,
            method: query(req, "method").unwrap_or_else(|| "GET".into()),
            path: query(req, "path").unwrap_or_else(|| "/".into()),
        };
        json_response(
            StatusCode::OK,
            crate::admin::explain::explain(&q, &cfg, &node),
        )
    }

    /// Everything the node counts, as `/v1/counters` shows it and `/metrics` renders it.
    fn counters(&self) -> Result<serde_json::Value, crate::kernel::ebpf::EbpfError> {
        let c = self.redirector.counters()?;
        let pods = self.pods.list();
        let names: std::collections::HashMap<_, _> =
            pods.iter().map(|p| (p.id, p.name.to_string())).collect();
        let inbound: Vec<_> = self
            .redirector
            .pod_inbound()
            .into_iter()
            .map(|(id, c)| {
                let pod = names.get(&id).cloned().unwrap_or_else(|| id.to_string());
                json!({"pod": pod, "plaintext": c.plaintext, "denied": c.denied})
            })
            .collect();
        let mut body = json!({
            "ebpf": c.to_json(),
            "accel": self.redirector.accel().stats(),
            "enrolled_pods": pods.len(),
            "proxy": &*self.stats,
            "inbound": inbound,
            "process": crate::telemetry::metrics::process(),
            "kernel": self.redirector.kernel(),
            "admin": {
                "changes_refused": self.changes_refused.load(std::sync::atomic::Ordering::Relaxed),
                "repoints_refused": self.pods.repoints_refused(),
            },
            "upgrade": &*self.upgrade,
            "limits": {
                "hits": self.limit_hits.snapshot(),
                "tunnel_handshakes_in_progress": self.handshakes.as_ref().map_or(0, |h| h.in_progress()),
            },
        });
        if let Some(m) = self.mode.mesh() {
            body["identity"] = json!({
                "certificates": m.identities.status(),
                "stats": &m.identities.stats,
            });
            body["tunnel"] = json!(&*m.tunnel_stats);
            if let Some(f) = self.mode.feed() {
                body["config"] = json!(&*f.status.locked());
            }
        }
        if let Some(e) = &self.enforcer {
            body["authz"] = json!(&e.stats);
            body["authz_policies"] = json!(e.decisions.snapshot());
        }
        if let Some(l7) = &self.l7 {
            body["l7"] = json!(&l7.counters);
            body["l7"]["pod_connections"] = l7
                .pods
                .opened
                .load(std::sync::atomic::Ordering::Relaxed)
                .into();
            body["requests"] = json!(
                l7.stats
                    .snapshot()
                    .into_iter()
                    .map(|(labels, figures)| json!({"labels": labels, "figures": figures}))
                    .collect::<Vec<_>>()
            );
        }
        Ok(body)
    }

    /// Everything this node runs on, in full: its flags, the configuration from the controller
    /// (workloads with identities and addresses, Services with ports and endpoints, policies as
    /// the specs it applies), enrolled pods and certificates. For support, not for machines: the
    /// shape follows the domain types.
    fn config_dump(&self) -> serde_json::Value {
        let mut out = json!({
            "node": self.config,
            "enrolled_pods": self.pods.list(),
        });
        let Some(m) = self.mode.mesh() else {
            return out;
        };
        out["certificates"] = json!(m.identities.status());
        let placement = m.placement.current();
        out["workloads"] = placement
            .workloads()
            .map(|w| {
                json!({
                    "namespace": w.namespace, "name": w.name, "node": w.node,
                    "identity": w.identity.to_string(), "ips": w.ips, "labels": w.labels,
                })
            })
            .collect();
        if let Some(f) = self.mode.feed() {
            let cfg = f.config.borrow().clone();
            out["stream"] = json!(&*f.status.locked());
            out["version"] = json!(cfg.version);
            out["services"] = cfg
                .services
                .iter()
                .map(|s| {
                    json!({
                        "namespace": s.namespace, "name": s.name, "cluster_ips": s.cluster_ips,
                        "endpoints": s.endpoints, "addresses": s.addresses,
                        "ports": s.ports.iter().map(|p| json!({
                            "name": p.name, "port": p.port, "target_port": p.target_port,
                            "protocol": p.protocol,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            out["policies"] = cfg
                .policies
                .iter()
                .map(|p| {
                    json!({
                        "kind": p.kind, "api_version": p.api_version, "namespace": p.namespace,
                        "name": p.name, "spec": p.spec,
                    })
                })
                .collect();
        }
        out
    }

    async fn route(&self, req: Request<Incoming>) -> Resp {
        let path = req.uri().path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (req.method(), segments.as_slice()) {
            (&Method::GET, [""]) => Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "text/html; charset=utf-8")
                .body(Full::new(Bytes::from_static(LIVE_PAGE.as_bytes())))
                .expect("static response parts"),
            (&Method::GET, ["healthz"]) => json_response(StatusCode::OK, json!({"status": "ok"})),
            (&Method::GET, ["ready"]) => {
                let pending = self.ready.pending();
                if pending.is_empty() {
                    json_response(StatusCode::OK, json!({"ready": true}))
                } else {
                    json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"ready": false, "waiting_for": pending}),
                    )
                }
            }
            (&Method::GET, ["v1", "counters"]) => match self.counters() {
                Ok(body) => json_response(StatusCode::OK, body),
                Err(e) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    mesh_api::placement::error_chain(&e),
                ),
            },
            (&Method::GET, ["metrics"]) => match self.counters() {
                Ok(body) => Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "text/plain; version=0.0.4")
                    .body(Full::new(Bytes::from(crate::telemetry::metrics::render(
                        &body,
                    ))))
                    .expect("static response parts"),
                Err(e) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    mesh_api::placement::error_chain(&e),
                ),
            },
            (&Method::GET, ["v1", "config"]) => json_response(StatusCode::OK, json!(self.config)),
            (&Method::GET, ["debug", "explain"]) => self.explain(&req),
            (&Method::GET, ["debug", "connections"]) => {
                let pod = query(&req, "pod");
                let list = self.live.list(pod.as_deref());
                json_response(
                    StatusCode::OK,
                    json!({"count": list.len(), "connections": list}),
                )
            }
            (&Method::GET, ["v1", "l7"]) => match &self.l7 {
                Some(l7) => {
                    let services: serde_json::Map<String, serde_json::Value> = l7
                        .runtime
                        .views()
                        .into_iter()
                        .map(|(name, eps)| (name, json!(eps)))
                        .collect();
                    json_response(StatusCode::OK, json!({"services": services}))
                }
                None => error(
                    StatusCode::NOT_FOUND,
                    "the HTTP path runs with config from the controller",
                ),
            },
            (&Method::GET, ["v1", "log-level"]) => match crate::telemetry::logging::filter() {
                Some(f) => json_response(StatusCode::OK, json!({"filter": f})),
                None => error(
                    StatusCode::NOT_FOUND,
                    "logging is not controlled by this process",
                ),
            },
            (&Method::PUT, ["v1", "log-level"]) => {
                let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading body: {e}")),
                };
                let directives = String::from_utf8_lossy(&body).trim().to_string();
                match crate::telemetry::logging::set_filter(&directives) {
                    Ok(()) => json_response(StatusCode::OK, json!({"filter": directives})),
                    Err(e) => error(
                        StatusCode::BAD_REQUEST,
                        mesh_api::placement::error_chain(&e),
                    ),
                }
            }
            (&Method::GET, ["v1", "mesh-config"]) => match self.mode.feed() {
                Some(f) => {
                    let cfg = f.config.borrow().clone();
                    let status = f.status.locked().clone();
                    json_response(
                        StatusCode::OK,
                        json!({
                            "stream": status,
                            "version": cfg.version,
                            "workloads": cfg.placement.workloads().map(|w| format!("{}/{}", w.namespace, w.name)).collect::<Vec<_>>(),
                            "enrolled": cfg.enrolled.iter().map(|(ns, n)| format!("{ns}/{n}")).collect::<Vec<_>>(),
                            "services": cfg.services.iter().map(|s| format!("{}/{}", s.namespace, s.name)).collect::<Vec<_>>(),
                            "policies": cfg.policies.iter().map(|p| format!("{} {}/{}", p.kind, p.namespace, p.name)).collect::<Vec<_>>(),
                        }),
                    )
                }
                None => error(
                    StatusCode::NOT_FOUND,
                    "this node reads a placement file: no configuration stream",
                ),
            },
            (&Method::GET, ["config_dump"]) => json_response(StatusCode::OK, self.config_dump()),
            (&Method::GET, ["v1", "pods"]) => {
                json_response(StatusCode::OK, json!(self.pods.list()))
            }
            (&Method::PUT, ["v1", "pods", ns, name]) => {
                let pod = PodName {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                };
                let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading body: {e}")),
                };
                let request: EnrollRequest = match serde_json::from_slice(&body) {
                    Ok(r) => r,
                    Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid body: {e}")),
                };
                let (pods, follow) = (self.pods.clone(), self.follow.clone());
                // Entering a namespace blocks a thread briefly; keep it off the reactor.
                let done = tokio::task::spawn_blocking(move || match follow {
                    Some(f) => f.register(pod, request).map(|r| json!(r)),
                    None => pods.enroll(pod, request).map(|p| json!(p)),
                });
                match done.await {
                    Ok(Ok(v)) => json_response(StatusCode::OK, v),
                    Ok(Err(e)) => enroll_error(e),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
                }
            }
            (&Method::DELETE, ["v1", "pods", ns, name]) => {
                let pod = PodName {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                };
                let result = match &self.follow {
                    Some(f) => f.unregister(&pod).map(|()| json!({"pod": pod})),
                    None => self.pods.unenroll(&pod).map(|p| json!(p)),
                };
                match result {
                    Ok(v) => json_response(StatusCode::OK, v),
                    Err(e) => enroll_error(e),
                }
            }
            _ => error(
                StatusCode::NOT_FOUND,
                format!("no route for {} {}", req.method(), path),
            ),
        }
    }
}

/// Binds the admin listener.
/// `SO_REUSEPORT`, like the proxy listeners: during a surge upgrade the new proxy binds its admin
/// and metrics ports beside the draining one.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    crate::proxy::outbound::bind(addr)
}
