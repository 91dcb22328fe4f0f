//! The controller's admin endpoint (HTTP/JSON, loopback by default): what `mesh-ctrl status`,
//! `history`, `rollback` and `explain` ask.
//!
//! | method | path                          | |
//! |--------|-------------------------------|---|
//! | GET    | /healthz                      | 200 while serving |
//! | GET    | /metrics                      | Prometheus text (names in `metrics.rs`) |
//! | GET    | /v1/status                    | version, nodes and their acked versions, rejected objects, certificates close to expiry |
//! | GET    | /v1/history                   | accepted versions, newest first |
//! | POST   | /v1/rollback/{version}        | restore the object set of `version` (local mode: rewrites the config directory) |
//! | GET    | /v1/explain?pod=NS/NAME&dest=D | what happens to a connection from the pod to D |
use mesh_api::sync::LockExt;
use std::{
    collections::BTreeMap,
    convert::Infallible,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use mesh_api::placement::error_chain;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::warn;

use crate::{
    certs::Stats,
    distribute::NodeState,
    model::{explain::explain, store::Store},
};

pub struct Admin {
    pub store: Arc<Store>,
    pub nodes: Arc<Mutex<BTreeMap<String, NodeState>>>,
    pub certs: Arc<Stats>,
    pub cert_ttl: Duration,
    /// Local mode's config directory (rollback rewrites it).
    pub config_dir: Option<PathBuf>,
    /// Cluster mode's client (rollback re-applies objects).
    pub kube: Option<kube::Client>,
    /// Connections closed at accept: the listener already served [`MAX_CONNECTIONS`].
    pub connections_refused: std::sync::atomic::AtomicU64,
}

type Resp = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Value) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string() + "\n")))
        .expect("static response parts")
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Resp {
    reply(status, json!({ "error": message.to_string() }))
}

fn query(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| decode(v))
    })
}

/// Percent-decoding (what `cli::remote::encode` produces).
fn decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%' && i + 2 < b.len())
            .then(|| std::str::from_utf8(&b[i + 1..(i + 3).min(b.len())]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Connections each admin listener serves at once.
pub const MAX_CONNECTIONS: usize = 128;
/// How long a client has for a request head (and for the next one on a kept-alive connection).
pub const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Largest request head read.
pub const MAX_HEAD: usize = 16 * 1024;

impl Admin {
    /// Serves every endpoint, or with `read_only` only `/metrics` and `/healthz`.
    /// At most [`MAX_CONNECTIONS`] at once (more are closed at accept); a request head must
    /// arrive within [`HEAD_TIMEOUT`] and fit in [`MAX_HEAD`].
    pub async fn serve(self: Arc<Self>, listener: TcpListener, read_only: bool) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                self.connections_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let svc = service_fn(move |req| {
                    let this = this.clone();
                    async move {
                        if read_only && !matches!(req.uri().path(), "/metrics" | "/healthz") {
                            return Ok::<_, Infallible>(reply(
                                StatusCode::NOT_FOUND,
                                json!({"error": "this listener serves /metrics and /healthz only"}),
                            ));
                        }
                        Ok::<_, Infallible>(this.route(req).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT)
                    .max_buf_size(MAX_HEAD)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Resp {
        let path = req.uri().path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (req.method(), segments.as_slice()) {
            (&Method::GET, ["healthz"]) => reply(StatusCode::OK, json!({"status": "ok"})),
            (&Method::GET, ["v1", "status"]) => reply(StatusCode::OK, self.status()),
            (&Method::GET, ["metrics"]) => {
                use std::sync::atomic::Ordering::Relaxed;
                let text = crate::metrics::render(
                    &self.status(),
                    self.certs.signed.load(Relaxed),
                    self.certs.refused.load(Relaxed),
                );
                Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "text/plain; version=0.0.4")
                    .body(Full::new(Bytes::from(text)))
                    .expect("static response parts")
            }
            (&Method::GET, ["v1", "history"]) => reply(StatusCode::OK, json!(self.store.history())),
            (&Method::POST, ["v1", "rollback", v]) => self.rollback(v).await,
            (&Method::GET, ["v1", "explain"]) => {
                let (Some(pod), Some(dest)) = (query(&req, "pod"), query(&req, "dest")) else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "needs ?pod=NS/NAME&dest=DESTINATION",
                    );
                };
                let (objects, placement) = self.store.inputs();
                match explain(&objects, &placement, &pod, &dest) {
                    Ok(e) => reply(StatusCode::OK, json!(e)),
                    Err(e) => error(StatusCode::NOT_FOUND, e),
                }
            }
            _ => error(
                StatusCode::NOT_FOUND,
                format!("no route for {} {path}", req.method()),
            ),
        }
    }

    fn status(&self) -> Value {
        let current = self.store.current();
        let now = SystemTime::now();
        // Nodes renew at half-life: under a quarter left means renewal is failing.
        let soon = self.cert_ttl / 4;
        let expiring: Vec<Value> = self
            .certs
            .issued
            .locked()
            .iter()
            .filter_map(|((node, id), not_after)| {
                let left = not_after.duration_since(now).unwrap_or_default();
                (left < soon).then(
                    || json!({"node": node, "identity": id, "expires_in_seconds": left.as_secs()}),
                )
            })
            .collect();
        json!({
            "version": current.number,
            "resources": current.computed.len(),
            "nodes": &*self.nodes.locked(),
            "rejected": self.store.rejected().iter().map(|i| json!({
                "object": i.object.to_string(), "field": i.field, "reason": i.reason,
            })).collect::<Vec<_>>(),
            "certificates_expiring": expiring,
            "admin_connections_refused": self.connections_refused.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    async fn rollback(&self, version: &str) -> Resp {
        let Ok(version) = version.parse::<u64>() else {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{version:?} is not a version"),
            );
        };
        let Some(objects) = self.store.objects_at(version) else {
            return error(
                StatusCode::NOT_FOUND,
                format!("version {version} is not in the history (see mesh-ctrl history)"),
            );
        };
        if let Some(dir) = &self.config_dir {
            return match crate::sources::local::rollback(dir, version, &objects) {
                Ok(file) => reply(
                    StatusCode::OK,
                    json!({"rolled_back_to": version, "written": file.display().to_string()}),
                ),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            };
        }
        if let Some(client) = &self.kube {
            let (now, _) = self.store.inputs();
            return match crate::sources::kube::rollback(client, &now, &objects).await {
                Ok(done) => reply(
                    StatusCode::OK,
                    json!({"rolled_back_to": version, "written": "the cluster", "changes": done}),
                ),
                Err(e) => error(StatusCode::BAD_GATEWAY, error_chain(&e)),
            };
        }
        error(
            StatusCode::CONFLICT,
            "rollback rewrites the config source, and this controller reads none (no --config-dir)",
        )
    }
}
