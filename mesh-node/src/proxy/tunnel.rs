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
use mesh_api::sync::LockExt;
use std::{
    collections::HashMap,
    future::{Future, poll_fn},
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use http::{HeaderName, Method, Request, Response, StatusCode};
use mesh_api::{identity::SpiffeId, placement::PlacementWatch};
use serde::Serialize;
use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};
use tracing::{debug, info, warn};

use crate::{
    identity::Identities, identity::tls, kernel::accel::PodStream, pods::enroll::Enrollment,
    proxy::coalesce::Coalesce, proxy::drain::Watch,
};

/// Between node proxies, an L7 request is an ordinary HTTP/2 request on the tunnel connection
/// (not a CONNECT stream), with the destination pod in this header.
pub static TARGET_HEADER: HeaderName = HeaderName::from_static("x-nodemesh-target");
/// On a CONNECT stream between node proxies: it carries HTTP/1.1 requests for the destination's
/// L7 side, one after another (see `http::carried`).
pub static CARRIED_HEADER: HeaderName = HeaderName::from_static("x-nodemesh-carried");

/// Flow-control windows sized for bulk transfers over a fast link: a 64 KiB default window would
/// cap one stream at window/RTT.
const STREAM_WINDOW: u32 = 4 << 20;
const CONN_WINDOW: u32 = 16 << 20;
/// Largest DATA frame we accept: fewer frames per bulk megabyte.
const MAX_FRAME: u32 = 256 << 10;
/// Pooled connections unused this long are closed.
const IDLE: Duration = Duration::from_secs(60);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest header block a peer may send on a tunnel stream (CONNECT and carried HTTP/2 heads).
const MAX_HEADER_LIST: u32 = 64 << 10;
/// Bytes read from a TCP socket per step of `join_tcp`: small for request/response traffic (a
/// buffer is allocated per read and lives until h2 has sent it), doubling while reads fill it
/// (bulk: fewer syscalls, frames and wakeups per byte), halving again when they stop.
pub(crate) const READ_MIN: usize = 16 * 1024;
const READ_MAX: usize = 256 * 1024;
/// rustls reads at most 4 KiB per call: without a buffer under it, a 16 KiB record costs four
/// `recvfrom`s. One read fills this buffer and rustls takes its slices from memory.
const TLS_READ_BUF: usize = 64 * 1024;

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
    Http(SocketAddr, #[source] h2::Error),
    #[error("the destination node answered {0}")]
    Status(StatusCode),
    #[error("timed out")]
    Timeout,
}

#[derive(Default, Debug, Serialize)]
pub struct TunnelStats {
    /// New HTTP/2 connections (TLS handshakes) to other node proxies.
    pub outbound_connections: AtomicU64,
    /// CONNECT streams opened on them.
    pub outbound_streams: AtomicU64,
    /// Of those, streams that carry HTTP/1.1 requests (kept and reused: far fewer than requests).
    pub outbound_carried_streams: AtomicU64,
    /// Outbound handshakes refused because of the peer's certificate (unknown CA, expired, wrong ID).
    pub outbound_tls_refused: AtomicU64,
    pub inbound_connections: AtomicU64,
    pub inbound_streams: AtomicU64,
    /// Of those, streams that carry HTTP/1.1 requests.
    pub inbound_carried_streams: AtomicU64,
    /// Inbound handshakes refused, by reason.
    pub inbound_tls_refused: Mutex<HashMap<&'static str, u64>>,
    /// CONNECTs to something that is not an enrolled pod of this node with the identity served.
    pub inbound_refused_not_local: AtomicU64,
    /// Streams and requests whose `Forwarded: for=` names an address that is not a workload of
    /// the identity the peer proved.
    pub inbound_refused_spoofed_source: AtomicU64,
    pub inbound_upstream_failed: AtomicU64,
    /// Authenticated connections told to go after carrying no stream for
    /// `--tunnel-idle-timeout`.
    pub inbound_idle_closed: AtomicU64,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct PoolKey {
    src: SpiffeId,
    node: SocketAddr,
    dst: SpiffeId,
}

struct Pooled {
    send: h2::client::SendRequest<Bytes>,
    state: Arc<ConnState>,
}

/// What a pooled tunnel connection and the streams kept open on it (`http::carried`) share.
#[derive(Debug)]
pub struct ConnState {
    /// Set when the connection's driver ends or a newer certificate replaces it: no new work
    /// starts on it.
    retired: AtomicBool,
    /// The source certificate this connection was made with: a newer one replaces the connection.
    cert_not_after: SystemTime,
    /// Milliseconds since [`epoch`], at the last use: kept streams count as use.
    last_used: AtomicU64,
    /// Streams kept idle on it (`http::carried`), bounded so that idle streams never hold the
    /// slots new streams need (the peer allows [`MAX_STREAMS`] at a time).
    kept: AtomicUsize,
}

/// Concurrent streams a tunnel connection allows.
const MAX_STREAMS: u32 = 1000;
/// Idle streams kept on one tunnel connection.
const MAX_KEPT_STREAMS: usize = MAX_STREAMS as usize / 4;

/// The start of the process's clock for [`ConnState::last_used`].
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl ConnState {
    fn new(cert_not_after: SystemTime) -> Self {
        let s = Self {
            retired: AtomicBool::new(false),
            cert_not_after,
            last_used: AtomicU64::new(0),
            kept: AtomicUsize::new(0),
        };
        s.touch();
        s
    }

    /// Counts one more idle stream kept on the connection, if there is room.
    pub fn try_keep(&self) -> bool {
        self.kept
            .fetch_update(Relaxed, Relaxed, |n| {
                (n < MAX_KEPT_STREAMS).then_some(n + 1)
            })
            .is_ok()
    }

    /// An idle stream left the connection's keep (taken for a request, or closed).
    pub fn unkeep(&self) {
        self.kept.fetch_sub(1, Relaxed);
    }

    /// Whether the connection's driver ended or a newer certificate replaced it (one load: cheap
    /// enough for every request on a held stream, see `http::carried::Held`).
    pub fn is_retired(&self) -> bool {
        self.retired.load(Relaxed)
    }

    fn touch(&self) {
        self.last_used
            .store(epoch().elapsed().as_millis() as u64, Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_used.load(Relaxed));
        epoch().elapsed().saturating_sub(last)
    }

    fn retire(&self) {
        self.retired.store(true, Relaxed);
    }
}

/// One CONNECT stream: the two halves of an HTTP/2 stream carrying one TCP connection.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
}

/// Outbound tunnels, pooled.
pub struct Tunnels {
    identities: Arc<Identities>,
    pool: Mutex<HashMap<PoolKey, Pooled>>,
    dialing: tokio::sync::Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    pub stats: Arc<TunnelStats>,
}

impl Tunnels {
    pub fn new(identities: Arc<Identities>, stats: Arc<TunnelStats>) -> Arc<Self> {
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
                t.pool.locked().retain(|_, p| {
                    let keep = p.state.idle_for() < IDLE && !p.state.retired.load(Relaxed);
                    if !keep {
                        p.state.retire();
                    }
                    keep
                });
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
    ) -> Result<Tunnel, TunnelError> {
        let forwarded = format!("for=\"{original_src}\"");
        let req = || {
            Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .header("forwarded", &forwarded)
                .body(())
                .expect("static request parts")
        };
        Ok(self.connect_stream(src, node, dst, req).await?.0)
    }

    /// Opens a stream to `target` that carries HTTP/1.1 requests for the destination's L7 side
    /// (see `http::carried`), and the state of the connection it is on: kept streams check it
    /// with [`Self::still_current`] before each use.
    pub async fn open_carried(
        &self,
        src: &SpiffeId,
        node: SocketAddr,
        dst: &SpiffeId,
        target: SocketAddr,
    ) -> Result<(Tunnel, Arc<ConnState>), TunnelError> {
        let req = || {
            Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .header(&CARRIED_HEADER, "http/1.1")
                .body(())
                .expect("static request parts")
        };
        let opened = self.connect_stream(src, node, dst, req).await?;
        self.stats.outbound_carried_streams.fetch_add(1, Relaxed);
        Ok(opened)
    }

    /// Opens a CONNECT stream made by `req`. A stream the peer refused (a draining peer's final
    /// GOAWAY names a last stream before it) was never seen there: it goes again, once, on a new
    /// connection. Nothing of it was sent but its head.
    async fn connect_stream(
        &self,
        src: &SpiffeId,
        node: SocketAddr,
        dst: &SpiffeId,
        req: impl Fn() -> Request<()>,
    ) -> Result<(Tunnel, Arc<ConnState>), TunnelError> {
        let key = PoolKey {
            src: src.clone(),
            node,
            dst: dst.clone(),
        };
        let (mut send, mut state) = self.ready(&key).await?;
        let (mut resp, mut stream) = send
            .send_request(req(), false)
            .map_err(|e| TunnelError::Http(node, e))?;
        let mut retried = false;
        let resp = loop {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, resp).await {
                Err(_) => return Err(TunnelError::Timeout),
                Ok(Ok(r)) => break r,
                Ok(Err(e)) if refused(&e) && !retried => {
                    debug!(%node, "stream refused by a draining peer; opening it on a new connection");
                    retried = true;
                    self.forget(&key, &state);
                    let mut send;
                    (send, state) = self.ready(&key).await?;
                    (resp, stream) = send
                        .send_request(req(), false)
                        .map_err(|e| TunnelError::Http(node, e))?;
                }
                Ok(Err(e)) => return Err(TunnelError::Http(node, e)),
            }
        };
        if resp.status() != StatusCode::OK {
            return Err(TunnelError::Status(resp.status()));
        }
        self.stats.outbound_streams.fetch_add(1, Relaxed);
        let tunnel = Tunnel {
            send: stream,
            recv: resp.into_body(),
        };
        Ok((tunnel, state))
    }

    /// The pooled connection for `key`, ready for a new stream. One the peer is draining says so
    /// here, before a stream is sent (h2 keeps the GOAWAY): a new connection reaches the
    /// generation that took the peer's listener over.
    async fn ready(
        &self,
        key: &PoolKey,
    ) -> Result<(h2::client::SendRequest<Bytes>, Arc<ConnState>), TunnelError> {
        let (send, state) = self.connection(key).await?;
        match send.ready().await {
            Ok(send) => Ok((send, state)),
            Err(e) if refused(&e) => {
                debug!(node = %key.node, "tunnel connection going away; opening a new one");
                self.forget(key, &state);
                let (send, state) = self.connection(key).await?;
                let send = send
                    .ready()
                    .await
                    .map_err(|e| TunnelError::Http(key.node, e))?;
                Ok((send, state))
            }
            Err(e) => Err(TunnelError::Http(key.node, e)),
        }
    }

    /// Takes the connection with `state` out of the pool: nothing new starts on it.
    fn forget(&self, key: &PoolKey, state: &Arc<ConnState>) {
        state.retire();
        let mut pool = self.pool.locked();
        if pool.get(key).is_some_and(|p| Arc::ptr_eq(&p.state, state)) {
            pool.remove(key);
        }
    }

    /// Whether a stream kept open on the connection with `state` may take new work: the
    /// connection is not retired and `src`'s certificate is the one it was made with. Counts as
    /// a use of the connection (it is not idle).
    pub fn still_current(&self, src: &SpiffeId, state: &ConnState) -> bool {
        let current = !state.retired.load(Relaxed)
            && self
                .identities
                .cached(src)
                .is_some_and(|c| c.not_after == state.cert_not_after);
        if current {
            state.touch();
        }
        current
    }

    /// Sends `req` as a stream of its own on the pooled HTTP/2 connection for (source identity,
    /// node, destination identity): L7 requests to HTTP/2 pods. A connection the peer is draining
    /// says so before the stream is sent (see [`Self::ready`]): then it goes on a new one.
    pub async fn send_request(
        &self,
        src: &SpiffeId,
        node: SocketAddr,
        dst: &SpiffeId,
        req: Request<()>,
        end: bool,
    ) -> Result<(h2::client::ResponseFuture, SendStream<Bytes>), TunnelError> {
        let key = PoolKey {
            src: src.clone(),
            node,
            dst: dst.clone(),
        };
        let (mut send, _) = self.ready(&key).await?;
        let sent = send
            .send_request(req, end)
            .map_err(|e| TunnelError::Http(node, e))?;
        self.stats.outbound_streams.fetch_add(1, Relaxed);
        Ok(sent)
    }

    async fn connection(
        &self,
        key: &PoolKey,
    ) -> Result<(h2::client::SendRequest<Bytes>, Arc<ConnState>), TunnelError> {
        let cert = self.identities.get(&key.src).await?;
        if let Some(send) = self.pooled(key, cert.not_after) {
            return Ok(send);
        }
        // Boxed: the dial's future is large and every request's future would carry it.
        Box::pin(self.dial(key, cert)).await
    }

    /// A new connection for `key` (one dial at a time per key), pooled.
    async fn dial(
        &self,
        key: &PoolKey,
        cert: Arc<crate::identity::WorkloadCert>,
    ) -> Result<(h2::client::SendRequest<Bytes>, Arc<ConnState>), TunnelError> {
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
        let tcp = BufReader::with_capacity(TLS_READ_BUF, tcp);
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
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake::<_, Bytes>(Coalesce::new(tls))
            .await
            .map_err(|e| TunnelError::Http(key.node, e))?;
        let state = Arc::new(ConnState::new(cert.not_after));
        let (node, done) = (key.node, state.clone());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%node, error = %e, "tunnel connection ended");
            }
            done.retire();
        });
        self.stats.outbound_connections.fetch_add(1, Relaxed);
        info!(src = %key.src, dst = %key.dst, %node, "tunnel connection established");
        self.pool.locked().insert(
            key.clone(),
            Pooled {
                send: send.clone(),
                state: state.clone(),
            },
        );
        Ok((send, state))
    }

    fn pooled(
        &self,
        key: &PoolKey,
        cert_not_after: SystemTime,
    ) -> Option<(h2::client::SendRequest<Bytes>, Arc<ConnState>)> {
        let mut pool = self.pool.locked();
        let p = pool.get_mut(key)?;
        if p.state.retired.load(Relaxed) || p.state.cert_not_after != cert_not_after {
            // Closed, or made with a certificate since rotated: streams on it finish, new ones
            // go to a new connection.
            p.state.retire();
            pool.remove(key);
            return None;
        }
        p.state.touch();
        Some((p.send.clone(), p.state.clone()))
    }
}

/// Whether `e` says the peer did not take the stream (its GOAWAY came first, or it refused the
/// stream): nothing of it was processed, so it may go again on another connection.
pub(crate) fn refused(e: &h2::Error) -> bool {
    (e.is_go_away() && e.is_remote()) || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// What a stream a peer opened on an authenticated tunnel connection is, from its method and
/// the tunnel protocol's markers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// `CONNECT` to `:authority`: opaque TCP.
    Connect,
    /// `CONNECT` marked with [`CARRIED_HEADER`]: HTTP/1.1 requests one after another.
    CarriedHttp1,
    /// An HTTP request (not a `CONNECT`) for the pod in [`TARGET_HEADER`].
    Request,
}

/// One stream accepted on an authenticated tunnel connection, handed to the layer above.
pub struct Accepted {
    pub kind: StreamKind,
    pub req: Request<RecvStream>,
    pub respond: h2::server::SendResponse<Bytes>,
    /// The peer node proxy's address.
    pub peer: SocketAddr,
    /// The identity the peer proved (its client certificate).
    pub client: Arc<SpiffeId>,
    /// The identity this node presented (chosen by SNI): the only one the stream may reach.
    pub served: Arc<SpiffeId>,
    /// Its connection's watch: says when this generation drains (carried streams then end
    /// between requests).
    pub leaving: Watch,
}

/// The layer above the tunnel: takes each accepted stream.
pub trait Deliver: Send + Sync + 'static {
    /// The stream's handling, run as a task of its own (boxed: a task copies its future in at
    /// spawn, so each is only as large as its own path).
    fn deliver(self: Arc<Self>, stream: Accepted) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The tunnel's server side: accepts tunnel connections from other node proxies (mutual TLS,
/// HTTP/2) and hands each stream to [`Deliver`].
pub struct TunnelServer {
    pub node: String,
    pub identities: Arc<Identities>,
    pub placement: PlacementWatch,
    pub pods: Arc<Enrollment>,
    pub stats: Arc<TunnelStats>,
    /// Handshakes in progress (`--max-tunnel-handshakes`).
    pub handshakes: Arc<crate::proxy::limits::Handshakes>,
    pub limit_hits: Arc<crate::proxy::limits::Hits>,
    /// How long a connection may carry no stream (`--tunnel-idle-timeout`).
    pub idle_timeout: Duration,
    pub deliver: Arc<dyn Deliver>,
}

/// The streams in flight on one accepted tunnel connection, and since when it has had none.
#[derive(Default)]
struct Streams {
    open: AtomicUsize,
    last_ended: tokio::sync::Notify,
    /// When the last stream ended (or the connection started idling), in ms since `epoch()`.
    idle_since: AtomicU64,
}

impl Streams {
    fn touch(&self) {
        self.idle_since
            .store(epoch().elapsed().as_millis() as u64, Relaxed);
    }

    fn open(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Relaxed);
        OpenStream(self.clone())
    }

    /// When the connection will have been idle for `timeout`, if it carries no stream now.
    fn idle_deadline(&self, timeout: Duration) -> Option<tokio::time::Instant> {
        if self.open.load(Relaxed) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since.load(Relaxed));
        let idle = epoch().elapsed().saturating_sub(since);
        Some(tokio::time::Instant::now() + timeout.saturating_sub(idle))
    }
}

/// One stream in flight; when the last one ends the connection starts idling.
struct OpenStream(Arc<Streams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.touch();
        if self.0.open.fetch_sub(1, Relaxed) == 1 {
            self.0.last_ended.notify_one();
        }
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86400 * 365)
}

/// Server TLS config, rebuilt when the trust bundle changes.
struct ServerTls {
    roots: Arc<rustls::RootCertStore>,
    config: Arc<rustls::ServerConfig>,
}

impl TunnelServer {
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
            let (handshake, evicted) = self.handshakes.start();
            if evicted {
                self.limit_hits
                    .hit(crate::proxy::limits::Limit::TunnelHandshakes);
            }
            let (this, leaving) = (self.clone(), watch.for_connection());
            watch.spawn_conn(async move {
                this.connection(tcp, peer, config, handshake, leaving).await
            });
        }
    }

    fn refuse_tls(&self, peer: SocketAddr, reason: &'static str, detail: &dyn std::fmt::Display) {
        *self
            .stats
            .inbound_tls_refused
            .locked()
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
        slot: crate::proxy::limits::Handshake,
        leaving: Watch,
    ) {
        let _ = tcp.set_nodelay(true);
        let handshake = async {
            // Nothing is allocated for a connection until it sends something.
            tcp.readable().await.map_err(|e| ("io", e.to_string()))?;
            // Read the ClientHello first: the certificate to present depends on the SNI, and may
            // have to be fetched (first use) before the handshake can go on.
            let tcp = BufReader::with_capacity(TLS_READ_BUF, tcp);
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
        let timed = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake);
        let tls = tokio::select! {
            r = timed => match r {
                Ok(Ok(s)) => s,
                Ok(Err((reason, detail))) => return self.refuse_tls(peer, reason, &detail),
                Err(_) => return self.refuse_tls(peer, "timeout", &"handshake timed out"),
            },
            _ = slot.cut() => {
                return self.refuse_tls(peer, "cut", &"newer handshakes needed its place (--max-tunnel-handshakes)")
            }
        };
        drop(slot);
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
        let h2 = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(MAX_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(Coalesce::new(tls));
        let mut h2 = match tokio::time::timeout(HANDSHAKE_TIMEOUT, h2).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return debug!(%peer, error = %e, "HTTP/2 handshake failed"),
            Err(_) => return debug!(%peer, "HTTP/2 handshake timed out"),
        };
        let (client_id, served) = (Arc::new(client_id), Arc::new(served));
        let streams = Arc::new(Streams::default());
        streams.touch();
        let mut closing = false;
        // Accepting also drives the connection: streams make progress while this loop runs.
        loop {
            let idle_deadline = streams.idle_deadline(self.idle_timeout);
            let next = tokio::select! {
                next = h2.accept() => next,
                // This generation drains: GOAWAY tells the peer to open its next streams on a new
                // connection (to the generation that took the listener over). Streams it opened
                // before seeing it are still served; the connection ends when they have.
                _ = leaving.stopped(), if !closing => {
                    h2.graceful_shutdown();
                    closing = true;
                    continue;
                }
                // The last stream ended: the idle clock starts.
                _ = streams.last_ended.notified(), if idle_deadline.is_none() => continue,
                _ = tokio::time::sleep_until(idle_deadline.unwrap_or_else(far_future)),
                    if idle_deadline.is_some() =>
                {
                    if closing {
                        // GOAWAY went out a timeout ago and the peer still holds the connection
                        // without streams: nothing is lost by dropping it.
                        return debug!(%peer, "idle tunnel connection closed");
                    }
                    // An authenticated peer holds memory (TLS and HTTP/2 state) for as long as
                    // it keeps the connection: an idle one is told to go, streams in flight
                    // (none, or ones that race the GOAWAY) still finish.
                    self.stats.inbound_idle_closed.fetch_add(1, Relaxed);
                    h2.graceful_shutdown();
                    closing = true;
                    streams.touch();
                    continue;
                }
            };
            let Some(next) = next else { return };
            let (req, respond) = match next {
                Ok(s) => s,
                Err(e) => return debug!(%peer, error = %e, "tunnel connection ended"),
            };
            let connect = req.method() == Method::CONNECT;
            let has = |marker: &HeaderName| req.headers().contains_key(marker);
            let kind = match (connect, has(&TARGET_HEADER), has(&CARRIED_HEADER)) {
                (true, _, true) => StreamKind::CarriedHttp1,
                (true, _, false) => StreamKind::Connect,
                (false, true, _) => StreamKind::Request,
                (false, false, _) => {
                    // Not a stream of the tunnel protocol.
                    let mut respond = respond;
                    let _ = answer_connect(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
                    continue;
                }
            };
            let stream = streams.open();
            let accepted = Accepted {
                kind,
                req,
                respond,
                peer,
                client: client_id.clone(),
                served: served.clone(),
                leaving: leaving.clone(),
            };
            let delivery = self.deliver.clone().deliver(accepted);
            tokio::spawn(async move {
                delivery.await;
                drop(stream);
            });
        }
    }
}

/// Answers a CONNECT with `s` alone: `200` keeps the stream open for the bytes that follow, any
/// other status ends it.
pub(crate) fn answer_connect(
    respond: &mut h2::server::SendResponse<Bytes>,
    s: StatusCode,
) -> Result<h2::SendStream<Bytes>, h2::Error> {
    let resp = Response::builder()
        .status(s)
        .body(())
        .expect("static response");
    respond.send_response(resp, s != StatusCode::OK)
}

/// Copies between a TCP connection and a tunnel stream, both ways, until both are done (half
/// closes are passed on). Bytes go straight between the socket and h2's buffers, within h2's flow
/// control: no intermediate task or copy.
pub async fn join_tcp(tcp: PodStream, tunnel: Tunnel) -> (u64, u64) {
    let Tunnel { mut send, mut recv } = tunnel;
    let (mut rd, mut wr) = tcp.into_split();
    let up = async move {
        let mut total = 0u64;
        let mut size = READ_MIN;
        loop {
            // Wait for data before allocating: an idle connection holds no buffer.
            rd.readable().await?;
            let mut buf = BytesMut::with_capacity(size);
            let n = match rd.try_read_buf(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            size = next_read_size(size, n);
            if n == 0 {
                send.send_data(Bytes::new(), true)
                    .map_err(std::io::Error::other)?;
                return Ok::<_, std::io::Error>(total);
            }
            total += n as u64;
            let mut chunk = buf.freeze();
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let mut cap = send.capacity();
                while cap == 0 {
                    cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
                        Some(Ok(c)) => c,
                        Some(Err(e)) => return Err(std::io::Error::other(e)),
                        None => return Err(std::io::ErrorKind::BrokenPipe.into()),
                    };
                }
                let part = chunk.split_to(cap.min(chunk.len()));
                send.send_data(part, false).map_err(std::io::Error::other)?;
            }
        }
    };
    let down = async move {
        let mut total = 0u64;
        while let Some(data) = recv.data().await {
            let data = data.map_err(std::io::Error::other)?;
            wr.write_all(&data).await?;
            total += data.len() as u64;
            let _ = recv.flow_control().release_capacity(data.len());
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(total)
    };
    tokio::pin!(up, down);
    let (mut sent, mut received) = (None, None);
    // Either side failing ends both: dropping the stream halves resets the HTTP/2 stream.
    while sent.is_none() || received.is_none() {
        tokio::select! {
            r = &mut up, if sent.is_none() => match r {
                Ok(n) => sent = Some(n),
                Err(e) => { debug!(error = %e, "TCP to tunnel ended"); break; }
            },
            r = &mut down, if received.is_none() => match r {
                Ok(n) => received = Some(n),
                Err(e) => { debug!(error = %e, "tunnel to TCP ended"); break; }
            },
        }
    }
    (sent.unwrap_or(0), received.unwrap_or(0))
}

/// The next read's size after a read of `n` bytes into `size`.
pub(crate) fn next_read_size(size: usize, n: usize) -> usize {
    if n == size {
        (size * 2).min(READ_MAX)
    } else if n < size / 4 {
        (size / 2).max(READ_MIN)
    } else {
        size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_size_grows_with_full_reads_and_shrinks_with_small_ones() {
        // (size, bytes read, next size)
        let cases = [
            (READ_MIN, 100, READ_MIN),
            (READ_MIN, READ_MIN, 2 * READ_MIN),
            (READ_MAX / 2, READ_MAX / 2, READ_MAX),
            (READ_MAX, READ_MAX, READ_MAX),
            (READ_MAX, READ_MAX / 2, READ_MAX),
            (READ_MAX, 100, READ_MAX / 2),
            (2 * READ_MIN, 10, READ_MIN),
            (READ_MIN, 0, READ_MIN),
        ];
        for (size, n, next) in cases {
            assert_eq!(next_read_size(size, n), next, "size {size}, read {n}");
        }
    }
}
