//! The tunnel between node proxies, following Istio's HBONE conventions:
//!
//! - TLS 1.3, mutual, ALPN `h2`, to the destination node's proxy on port 15008. The client shows
//!   the source workload's certificate; the server shows the destination workload's, chosen by SNI
//!   (`<sa>.<namespace>.id.mesh`; ztunnel instead dials the pod IP and needs no SNI).
//! - One HTTP/2 `CONNECT` stream per TCP connection; `:authority` is the original destination
//!   `ip:port`; `Forwarded: for="<original source ip:port>"`; any `traceparent`/`baggage` headers a
//!   future L7 layer adds are carried as ordinary request headers.
//! - HTTP/2 connections are pooled per (source identity, destination node, destination identity)
//!   and multiplexed; a rotated source certificate starts a new connection while the old one drains.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{
    Method, Request, Response, StatusCode, client::conn::http2::SendRequest, upgrade::Upgraded,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_api::{identity::SpiffeId, placement::PlacementWatch};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    drain::Watch,
    enroll::Enrollment,
    identity::Identities,
    outbound::{ProxySource, connect_from},
    tls,
};

/// Flow-control windows sized for bulk transfers over a fast link: a 64 KiB default window would
/// cap one stream at window/RTT.
const STREAM_WINDOW: u32 = 4 << 20;
const CONN_WINDOW: u32 = 16 << 20;
/// Pooled connections unused this long are closed.
const IDLE: Duration = Duration::from_secs(60);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Relay buffer per direction, as for plain TCP.
const RELAY_BUF: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("source identity")]
    Identity(#[from] crate::identity::IdentityError),
    #[error("TLS setup")]
    Tls(#[from] tls::TlsError),
    #[error("cannot reach node proxy {0}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("TLS handshake with {0} failed ({1})")]
    Handshake(SocketAddr, &'static str, #[source] std::io::Error),
    #[error("HTTP/2 with {0}")]
    Http(SocketAddr, #[source] hyper::Error),
    #[error("the destination node answered {0}")]
    Status(StatusCode),
    #[error("timed out")]
    Timeout,
}

#[derive(Default, Debug, Serialize)]
pub struct Stats {
    /// New HTTP/2 connections (TLS handshakes) to other node proxies.
    pub outbound_connections: AtomicU64,
    /// CONNECT streams opened on them.
    pub outbound_streams: AtomicU64,
    pub outbound_failures: AtomicU64,
    /// Outbound handshakes refused because of the peer's certificate (unknown CA, expired, wrong ID).
    pub outbound_tls_refused: AtomicU64,
    pub inbound_connections: AtomicU64,
    pub inbound_streams: AtomicU64,
    /// Inbound handshakes refused, by reason.
    pub inbound_tls_refused: Mutex<HashMap<&'static str, u64>>,
    /// CONNECTs to something that is not an enrolled pod of this node with the identity served.
    pub inbound_refused_not_local: AtomicU64,
    pub inbound_upstream_failed: AtomicU64,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct PoolKey {
    src: SpiffeId,
    node: SocketAddr,
    dst: SpiffeId,
}

struct Pooled {
    send: SendRequest<Empty<Bytes>>,
    /// The source certificate this connection was made with: a newer one replaces the connection.
    cert_not_after: SystemTime,
    last_used: Instant,
}

/// Outbound tunnels, pooled.
pub struct Tunnels {
    identities: Arc<Identities>,
    pool: Mutex<HashMap<PoolKey, Pooled>>,
    dialing: tokio::sync::Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    pub stats: Arc<Stats>,
}

impl Tunnels {
    pub fn new(identities: Arc<Identities>, stats: Arc<Stats>) -> Arc<Self> {
        let this = Arc::new(Self {
            identities,
            pool: Mutex::default(),
            dialing: Default::default(),
            stats,
        });
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(IDLE / 4).await;
                let Some(t) = weak.upgrade() else { return };
                t.pool
                    .lock()
                    .expect("pool lock")
                    .retain(|_, p| p.last_used.elapsed() < IDLE && !p.send.is_closed());
            }
        });
        this
    }

    /// Opens a tunnel to `target` (a pod on the node whose proxy is at `node`, with identity `dst`)
    /// on behalf of `src`.
    pub async fn open(
        &self,
        src: &SpiffeId,
        node: SocketAddr,
        dst: &SpiffeId,
        target: SocketAddr,
        original_src: SocketAddr,
    ) -> Result<Upgraded, TunnelError> {
        let key = PoolKey {
            src: src.clone(),
            node,
            dst: dst.clone(),
        };
        let mut send = self.connection(&key).await?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header("forwarded", format!("for=\"{original_src}\""))
            .body(Empty::new())
            .expect("static request parts");
        let mut resp = tokio::time::timeout(HANDSHAKE_TIMEOUT, send.send_request(req))
            .await
            .map_err(|_| TunnelError::Timeout)?
            .map_err(|e| TunnelError::Http(node, e))?;
        if resp.status() != StatusCode::OK {
            return Err(TunnelError::Status(resp.status()));
        }
        self.stats.outbound_streams.fetch_add(1, Relaxed);
        hyper::upgrade::on(&mut resp)
            .await
            .map_err(|e| TunnelError::Http(node, e))
    }

    async fn connection(&self, key: &PoolKey) -> Result<SendRequest<Empty<Bytes>>, TunnelError> {
        let cert = self.identities.get(&key.src).await?;
        if let Some(send) = self.pooled(key, cert.not_after) {
            return Ok(send);
        }
        let lock = self
            .dialing
            .lock()
            .await
            .entry(key.clone())
            .or_default()
            .clone();
        let _one_dial = lock.lock().await;
        if let Some(send) = self.pooled(key, cert.not_after) {
            return Ok(send);
        }
        let cfg = tls::client_config(
            cert.chain.clone(),
            cert.key(),
            key.dst.clone(),
            self.identities.roots(),
        )?;
        let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(key.node))
            .await
            .map_err(|_| TunnelError::Timeout)?
            .map_err(|e| TunnelError::Connect(key.node, e))?;
        let _ = tcp.set_nodelay(true);
        let sni = rustls::pki_types::ServerName::try_from(key.dst.server_name())
            .expect("identity names are DNS names");
        let tls = match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(Arc::new(cfg)).connect(sni, tcp),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let reason = tls::failure_reason(&e);
                if reason != "io" {
                    self.stats.outbound_tls_refused.fetch_add(1, Relaxed);
                }
                return Err(TunnelError::Handshake(key.node, reason, e));
            }
            Err(_) => return Err(TunnelError::Timeout),
        };
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| TunnelError::Http(key.node, e))?;
        let node = key.node;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%node, error = %e, "tunnel connection ended");
            }
        });
        self.stats.outbound_connections.fetch_add(1, Relaxed);
        info!(src = %key.src, dst = %key.dst, %node, "tunnel connection established");
        self.pool.lock().expect("pool lock").insert(
            key.clone(),
            Pooled {
                send: send.clone(),
                cert_not_after: cert.not_after,
                last_used: Instant::now(),
            },
        );
        Ok(send)
    }

    fn pooled(
        &self,
        key: &PoolKey,
        cert_not_after: SystemTime,
    ) -> Option<SendRequest<Empty<Bytes>>> {
        let mut pool = self.pool.lock().expect("pool lock");
        let p = pool.get_mut(key)?;
        if p.send.is_closed() || p.cert_not_after != cert_not_after {
            // Closed, or made with a certificate since rotated: streams on it finish, new ones
            // go to a new connection.
            pool.remove(key);
            return None;
        }
        p.last_used = Instant::now();
        Some(p.send.clone())
    }
}

/// Inbound side: accepts tunnels from other node proxies and delivers to local enrolled pods.
pub struct Inbound {
    pub node: String,
    pub identities: Arc<Identities>,
    pub placement: PlacementWatch,
    pub pods: Arc<Enrollment>,
    pub stats: Arc<Stats>,
    pub connect_timeout: Duration,
    /// Deliveries come from the proxy address (see `outbound::ProxySource`).
    pub source: ProxySource,
}

/// Server TLS config, rebuilt when the trust bundle changes.
struct ServerTls {
    roots: Arc<rustls::RootCertStore>,
    config: Arc<rustls::ServerConfig>,
}

impl Inbound {
    pub async fn serve(self: Arc<Self>, listener: TcpListener, watch: Watch) {
        let mut current: Option<ServerTls> = None;
        loop {
            let (tcp, peer) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "tunnel accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = watch.stopped() => return,
            };
            let roots = self.identities.roots();
            if current
                .as_ref()
                .is_none_or(|c| !Arc::ptr_eq(&c.roots, &roots))
            {
                match tls::server_config(
                    self.identities.trust_domain(),
                    self.identities.clone(),
                    roots.clone(),
                ) {
                    Ok(cfg) => {
                        current = Some(ServerTls {
                            roots,
                            config: Arc::new(cfg),
                        })
                    }
                    Err(e) => {
                        warn!(error = %mesh_api::placement::error_chain(&e), "cannot build the tunnel TLS config");
                        continue;
                    }
                }
            }
            let config = current.as_ref().expect("set above").config.clone();
            let this = self.clone();
            watch.spawn_conn(async move { this.connection(tcp, peer, config).await });
        }
    }

    fn refuse_tls(&self, peer: SocketAddr, reason: &'static str, detail: &dyn std::fmt::Display) {
        *self
            .stats
            .inbound_tls_refused
            .lock()
            .expect("stats lock")
            .entry(reason)
            .or_default() += 1;
        warn!(%peer, reason, error = %detail, "tunnel handshake refused");
    }

    /// Whether `id` belongs to an enrolled pod of this node: only those certificates are served.
    fn serves(&self, id: &SpiffeId) -> bool {
        let placement = self.placement.current();
        placement.workloads().any(|w| {
            w.node == self.node && &w.identity == id && self.pods.is_enrolled(&w.namespace, &w.name)
        })
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        config: Arc<rustls::ServerConfig>,
    ) {
        let _ = tcp.set_nodelay(true);
        let handshake = async {
            // Read the ClientHello first: the certificate to present depends on the SNI, and may
            // have to be fetched (first use) before the handshake can go on.
            let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
                .await
                .map_err(|e| ("protocol", e.to_string()))?;
            let sni = start.client_hello().server_name().map(str::to_string);
            let Some(id) = sni
                .as_deref()
                .and_then(|s| SpiffeId::from_server_name(self.identities.trust_domain(), s))
            else {
                return Err(("unknown_identity", format!("SNI {sni:?} names no identity")));
            };
            if !self.serves(&id) {
                return Err((
                    "unknown_identity",
                    format!("{id} is not an enrolled workload of this node"),
                ));
            }
            self.identities
                .get(&id)
                .await
                .map_err(|e| ("no_certificate", mesh_api::placement::error_chain(&e)))?;
            start
                .into_stream(config)
                .await
                .map_err(|e| (tls::failure_reason(&e), e.to_string()))
        };
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(s)) => s,
            Ok(Err((reason, detail))) => return self.refuse_tls(peer, reason, &detail),
            Err(_) => return self.refuse_tls(peer, "timeout", &"handshake timed out"),
        };
        let (_, conn) = tls.get_ref();
        let client_id = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(tls::spiffe_id_of);
        let served = conn
            .server_name()
            .and_then(|s| SpiffeId::from_server_name(self.identities.trust_domain(), s));
        let (Some(Ok(client_id)), Some(served)) = (client_id, served) else {
            return self.refuse_tls(
                peer,
                "no_identity",
                &"peer certificate without a usable SPIFFE ID",
            );
        };
        if client_id.trust_domain() != self.identities.trust_domain() {
            return self.refuse_tls(peer, "foreign_trust_domain", &client_id);
        }
        self.stats.inbound_connections.fetch_add(1, Relaxed);
        let (client_id, served) = (Arc::new(client_id), Arc::new(served));
        let this = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let (this, client_id, served) = (this.clone(), client_id.clone(), served.clone());
            async move {
                Ok::<_, std::convert::Infallible>(this.stream(req, peer, &client_id, &served).await)
            }
        });
        let result = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_concurrent_streams(1000)
            .serve_connection(TokioIo::new(tls), svc)
            .await;
        if let Err(e) = result {
            debug!(%peer, error = %e, "tunnel connection ended");
        }
    }

    /// One CONNECT stream.
    async fn stream(
        &self,
        mut req: Request<hyper::body::Incoming>,
        peer: SocketAddr,
        client_id: &SpiffeId,
        served: &SpiffeId,
    ) -> Response<Empty<Bytes>> {
        let status = |s: StatusCode| {
            Response::builder()
                .status(s)
                .body(Empty::new())
                .expect("static response")
        };
        if req.method() != Method::CONNECT {
            return status(StatusCode::METHOD_NOT_ALLOWED);
        }
        let Some(target) = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        else {
            return status(StatusCode::BAD_REQUEST);
        };
        let forwarded = req
            .headers()
            .get("forwarded")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        // Deliver only to an enrolled pod of this node that carries the identity we just proved.
        let placement = self.placement.current();
        let local = placement.by_ip(target.ip()).filter(|w| {
            w.node == self.node
                && &w.identity == served
                && self.pods.is_enrolled(&w.namespace, &w.name)
        });
        if local.is_none() {
            self.stats.inbound_refused_not_local.fetch_add(1, Relaxed);
            warn!(%peer, %target, client = %client_id, served = %served, "refused tunnel: not an enrolled pod of this node with that identity");
            return status(StatusCode::FORBIDDEN);
        }
        let upstream = match tokio::time::timeout(
            self.connect_timeout,
            connect_from(self.source.for_dst(target), target),
        )
        .await
        {
            Ok(Ok(s)) => s,
            _ => {
                self.stats.inbound_upstream_failed.fetch_add(1, Relaxed);
                return status(StatusCode::SERVICE_UNAVAILABLE);
            }
        };
        let _ = upstream.set_nodelay(true);
        self.stats.inbound_streams.fetch_add(1, Relaxed);
        let on_upgrade = hyper::upgrade::on(&mut req);
        let span =
            info_span!("inbound", src.identity = %client_id, dst = %target, forwarded = %forwarded);
        tokio::spawn(
            async move {
                info!("delivering");
                match on_upgrade.await {
                    Ok(up) => relay(TokioIo::new(up), upstream).await,
                    Err(e) => debug!(error = %e, "tunnel stream did not upgrade"),
                }
            }
            .instrument(span),
        );
        status(StatusCode::OK)
    }
}

/// Copies both ways until both sides are done.
pub async fn relay<A, B>(mut a: A, mut b: B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, RELAY_BUF, RELAY_BUF).await {
        Ok((ab, ba)) => debug!(bytes_a_to_b = ab, bytes_b_to_a = ba, "relay closed"),
        Err(e) => debug!(error = %e, "relay closed with error"),
    }
}
