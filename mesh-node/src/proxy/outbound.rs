//! The outbound listener: accepts connections the kernel redirected, learns where each was going
//! and which pod opened it, and relays the bytes there.
//!
//! A connection the kernel did not redirect (no record for its peer), or from a pod we cannot
//! name, is reset: nothing reaches the network through the proxy without an identity.
use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info, info_span, warn};

use mesh_api::{
    identity::SpiffeId,
    placement::{Placement, PlacementWatch, Workload},
};

use crate::{
    config::node::NodeConfig,
    kernel::accel::{PodReadHalf, PodStream},
    kernel::orig_dst::{OrigDstSource, Redirected},
    pods::enroll::{Enrollment, Pod},
    policy::enforce::{Conn, Enforcer, until_revoked},
    proxy::drain::Watch,
    proxy::pod_socket::ProxySource,
    proxy::route::{Route, route},
    proxy::tunnel::{self, Tunnels},
    telemetry::access_log::{
        AccessLog, Entry as AccessEntry, Peer as AccessPeer, Reporter, Security,
    },
    telemetry::live::{Connections, Live, Tracked},
};

/// Proxy-side connection figures (the kernel's own counters live in the eBPF maps).
#[derive(Default, Debug, Serialize)]
pub struct OutboundStats {
    pub accepted: AtomicU64,
    pub relayed: AtomicU64,
    pub active: AtomicU64,
    pub refused_not_redirected: AtomicU64,
    pub refused_unknown_pod: AtomicU64,
    pub refused_loop: AtomicU64,
    pub upstream_connect_failed: AtomicU64,
    pub bytes_from_client: AtomicU64,
    pub bytes_to_client: AtomicU64,
    /// Sent to another node's proxy over mTLS.
    pub tunneled: AtomicU64,
    /// Delivered to a mesh workload of this node.
    pub delivered_local: AtomicU64,
    /// Refused by routing (fail closed), e.g. a source pod without a mesh identity.
    pub refused_route: AtomicU64,
    /// Refused: a local mesh destination that is not enrolled here.
    pub refused_local_not_enrolled: AtomicU64,
    /// Connections to a Service's cluster IP, sent to one of its endpoints.
    pub to_service: AtomicU64,
    /// Refused: a Service without ready endpoints.
    pub refused_no_endpoints: AtomicU64,
    /// Refused: no configuration from the controller yet (nothing to route by; fail closed).
    pub refused_no_config: AtomicU64,
    /// Connections served as HTTP (declared or detected).
    pub http_connections: AtomicU64,
    /// Connections to mesh destinations detected as not HTTP: relayed as opaque TCP.
    pub opaque: AtomicU64,
    pub tunnel_failed: AtomicU64,
}

/// What the outbound path needs to reach other nodes' workloads over mTLS.
pub struct MeshPath {
    pub node: String,
    pub view: View,
    pub tunnels: Arc<Tunnels>,
}

/// Where the outbound path learns where workloads are.
pub enum View {
    /// A placement file: workloads, nodes and identities; no Services, routes or policy.
    Placement(PlacementWatch),
    /// The controller's configuration, whose placement is part of each version.
    Controller(tokio::sync::watch::Receiver<Arc<NodeConfig>>),
}

/// What one connection is judged by, taken once on accept: one placement and, with a
/// controller, the configuration version it belongs to. Nothing below reads a newer one.
enum Snapshot {
    Plain,
    Placement(Arc<Placement>),
    Controller(Arc<NodeConfig>),
}

impl Snapshot {
    fn of(mesh: Option<&MeshPath>) -> Self {
        match mesh.map(|m| &m.view) {
            None => Snapshot::Plain,
            Some(View::Placement(p)) => Snapshot::Placement(p.current()),
            Some(View::Controller(c)) => Snapshot::Controller(c.borrow().clone()),
        }
    }

    fn placement(&self) -> Option<&Placement> {
        match self {
            Snapshot::Plain => None,
            Snapshot::Placement(p) => Some(p),
            Snapshot::Controller(c) => Some(&c.placement),
        }
    }

    fn config(&self) -> Option<&NodeConfig> {
        match self {
            Snapshot::Controller(c) => Some(c),
            _ => None,
        }
    }
}

/// Where a connection to a Service's cluster IP goes.
enum Vip {
    /// Not a cluster IP.
    No,
    /// One of the Service's endpoints.
    Endpoint(SocketAddr, String),
    /// A Service without ready endpoints (its name).
    Empty(String),
}

/// How a relayed connection reaches its destination.
#[derive(Clone, Copy)]
enum Dial<'a> {
    /// A pod of this node, from the proxy's address (mesh delivery).
    Local,
    /// Outside the mesh, as the pod: from a socket of its network namespace.
    AsPod(&'a Pod),
}

/// Binds a listener on `addr`. Not `SO_REUSEPORT`: nothing else may bind beside the proxy (a
/// new generation takes its listeners over by descriptor, see `handover`).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    TcpListener::from_std(sock.into())
}

/// Copies `rd` into `wr` until the end of `rd`'s stream, then shuts `wr` down (half closes pass
/// on). A buffer exists only while bytes are in hand, sized like `tunnel::join_tcp`'s reads (they
/// grow while reads fill them: bulk data moves in few system calls), so an idle connection holds
/// none and a pod cannot pin memory by opening connections and sending nothing.
async fn pump(mut rd: PodReadHalf, mut wr: tokio::net::tcp::OwnedWriteHalf) -> io::Result<u64> {
    use tokio::io::AsyncWriteExt;
    let mut total = 0u64;
    let mut size = tunnel::READ_MIN;
    loop {
        rd.readable().await?;
        let mut buf = bytes::BytesMut::with_capacity(size);
        let n = match rd.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            wr.shutdown().await?;
            return Ok(total);
        }
        size = tunnel::next_read_size(size, n);
        wr.write_all(&buf).await?;
        total += n as u64;
    }
}

pub struct Outbound {
    pub orig: Arc<dyn OrigDstSource>,
    pub pods: Arc<Enrollment>,
    pub stats: Arc<OutboundStats>,
    pub connect_timeout: Duration,
    /// The proxy's own listener addresses: a destination equal to one would loop.
    pub own_addrs: Vec<SocketAddr>,
    /// `None`: no identity source configured; everything is relayed as plain TCP.
    pub mesh: Option<MeshPath>,
    /// Address local mesh deliveries come from.
    pub source: ProxySource,
    /// Authorization of same-node deliveries, when policy comes from the controller.
    pub enforcer: Option<Arc<Enforcer>>,
    /// The HTTP path, when config comes from the controller.
    pub l7: Option<L7Path>,
    pub access_log: Arc<AccessLog>,
    pub live: Arc<Connections>,
    /// Connections each pod has open (`--max-connections-per-pod`).
    pub per_pod: Arc<crate::proxy::limits::PerPod>,
    /// Requests in flight per pod, for its HTTP connections.
    pub requests_per_pod: Arc<crate::proxy::limits::PerPod>,
    pub limit_hits: Arc<crate::proxy::limits::Hits>,
}

/// Who opened a connection, resolved once on accept; nothing below derives it again.
struct Source<'a> {
    /// The pod the connecting socket belongs to.
    pod: &'a Pod,
    /// That pod's workload in the connection's placement: its identity and node (`None`: no
    /// mesh identity).
    workload: Option<&'a Workload>,
}

impl Source<'_> {
    fn identity(&self) -> Option<&SpiffeId> {
        self.workload.map(|w| &w.identity)
    }
}

/// The HTTP path and how long to look at a connection's first bytes.
pub struct L7Path {
    pub proxy: Arc<crate::http::outbound::HttpOutbound>,
    pub detect_timeout: Duration,
    /// Undeclared ports relayed as TCP without detection (server-first protocols).
    pub opaque_ports: Vec<u16>,
    /// Undeclared ports where HTTP was seen: their clients get `declared_wait`.
    pub seen: crate::http::detect::Seen,
    /// For ports declared HTTP: how long a client may stay silent before it is treated as TCP.
    pub declared_wait: Duration,
}

impl Outbound {
    pub async fn serve(self: Arc<Self>, listener: TcpListener, watch: Watch) {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = watch.stopped() => return,
            };
            match accepted {
                Ok((client, peer)) => {
                    self.stats.accepted.fetch_add(1, Relaxed);
                    let this = self.clone();
                    watch.spawn_conn(async move { this.handle(client, peer).await });
                }
                // Out of fds or similar: back off instead of spinning.
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let Some(Redirected {
            orig_dst,
            pod,
            netns_cookie,
        }) = self.orig.lookup(peer)
        else {
            self.stats.refused_not_redirected.fetch_add(1, Relaxed);
            warn!(%peer, "refused: connection was not redirected by the mesh (no original destination)");
            return reset(client);
        };
        let Some(pod) = self.pods.resolve(pod, netns_cookie) else {
            self.stats.refused_unknown_pod.fetch_add(1, Relaxed);
            warn!(%peer, %orig_dst, %pod, "refused: the connecting pod is not enrolled any more");
            return reset(client);
        };
        // Held until this connection ends: one pod cannot take every connection of the proxy.
        let Some(_slot) = self.per_pod.admit(pod.id) else {
            self.limit_hits
                .hit(crate::proxy::limits::Limit::ConnectionsPerPod);
            debug!(%peer, pod = %pod.name, "refused: the pod has --max-connections-per-pod open");
            return reset(client);
        };
        if self.own_addrs.contains(&orig_dst) {
            self.stats.refused_loop.fetch_add(1, Relaxed);
            warn!(%peer, %orig_dst, "refused: destination is the proxy itself");
            return reset(client);
        }
        let snapshot = Snapshot::of(self.mesh.as_ref());
        let (placement, cfg) = (snapshot.placement(), snapshot.config());
        if cfg.is_some_and(|c| c.version == 0) {
            self.stats.refused_no_config.fetch_add(1, Relaxed);
            warn!(%peer, %orig_dst, "refused: no configuration from the controller yet");
            return reset(client);
        }
        // A connection this proxy serves, from a pod of this node: its bytes may skip TCP/IP
        // from here on (before the first read, which detection below may be).
        let client = self.source.accel.register(client);
        // Who opened it, resolved once: the pod its socket belongs to, and that pod's workload
        // (identity, node) in the placement above.
        let source = Source {
            workload: placement.and_then(|p| p.pod(&pod.name.namespace, &pod.name.name)),
            pod: &pod,
        };
        let requested = orig_dst;
        let tracked = self.live.track({
            let mut l = Live::new("outbound", peer, orig_dst);
            l.source = pod.name.to_string();
            l.source_identity = source
                .identity()
                .map(SpiffeId::to_string)
                .unwrap_or_default();
            l
        });
        let conn = self.l7_conn(&source, peer, orig_dst, placement, cfg);
        let client = match conn {
            None => client,
            Some((conn, declared)) => match self.http(client, conn, declared, &tracked).await {
                None => return,
                Some(c) => c,
            },
        };
        let orig_dst = match vip(orig_dst, placement, cfg) {
            Vip::No => orig_dst,
            Vip::Endpoint(addr, service) => {
                self.stats.to_service.fetch_add(1, Relaxed);
                debug!(%peer, %requested, %service, endpoint = %addr, "service endpoint");
                addr
            }
            Vip::Empty(service) => {
                self.stats.refused_no_endpoints.fetch_add(1, Relaxed);
                warn!(%peer, %requested, %service, "refused: the Service has no ready endpoints");
                return reset(client);
            }
        };
        let this_node = self.mesh.as_ref().map_or("", |m| m.node.as_str());
        let decision = route(placement, this_node, source.workload, orig_dst);
        let span = info_span!("outbound", src.pod = %pod.name, src.addr = %peer, dst = %requested, dst.endpoint = %orig_dst);
        let started = Instant::now();
        let log = self.access_log.wants(&pod.name.namespace);
        let logged = |dst_pod: Option<(&str, &str)>, principal: &str, decision: &str, bytes| {
            if log {
                self.log_tcp(
                    &source, peer, orig_dst, dst_pod, principal, decision, bytes, started,
                );
            }
        };
        tracked.update(|l| {
            l.via = match &decision {
                Route::Direct => "direct".into(),
                Route::Local { namespace, name } => {
                    l.destination_workload = format!("{namespace}/{name}");
                    "local".into()
                }
                Route::Tunnel { node, .. } => format!("tunnel via {node}"),
                Route::Refuse(_) => "refused".into(),
            };
        });
        match decision {
            Route::Direct => {
                let r = self
                    .pump_to(client, orig_dst, Dial::AsPod(&pod))
                    .instrument(span)
                    .await;
                let (decision, bytes) = match r {
                    Ok(b) => ("allowed", b),
                    Err(why) => (why.as_str(), (0, 0)),
                };
                logged(None, "", decision, bytes);
            }
            Route::Local { namespace, name } => {
                let dst_pod = Some((namespace.as_str(), name.as_str()));
                if !self.pods.is_enrolled(&namespace, &name) {
                    self.stats.refused_local_not_enrolled.fetch_add(1, Relaxed);
                    warn!(parent: &span, dst.pod = %format!("{namespace}/{name}"), "refused: local mesh destination is not enrolled on this node");
                    logged(dst_pod, "", "refused: destination not enrolled", (0, 0));
                    return reset(client);
                }
                // Same node: the caller's identity is the one its socket belongs to.
                let admitted = match &self.enforcer {
                    None => None,
                    Some(e) => {
                        let conn = Conn {
                            source: source.identity().cloned(),
                            source_ip: peer.ip(),
                            namespace: namespace.clone(),
                            pod: name.clone(),
                            port: orig_dst.port(),
                        };
                        match e.admit(conn) {
                            Ok(a) => Some(a),
                            Err(reason) => {
                                warn!(parent: &span, %reason, "refused: authorization");
                                logged(dst_pod, "", &reason.to_string(), (0, 0));
                                return reset(client);
                            }
                        }
                    }
                };
                self.stats.delivered_local.fetch_add(1, Relaxed);
                let pumped = self.pump_to(client, orig_dst, Dial::Local).instrument(span);
                let (decision, bytes) = match until_revoked(pumped, admitted).await {
                    Some(Ok(b)) => ("allowed", b),
                    Some(Err(why)) => (why.as_str(), (0, 0)),
                    None => ("closed: the policy now denies this connection", (0, 0)),
                };
                let principal = placement
                    .and_then(|p| p.pod(&namespace, &name))
                    .map(|w| w.identity.clone());
                logged(
                    dst_pod,
                    principal.as_ref().map_or("", SpiffeId::as_str),
                    decision,
                    bytes,
                );
            }
            Route::Tunnel { node, src, dst } => {
                let mesh = self.mesh.as_ref().expect("tunnel routes need a mesh path");
                let opened = mesh
                    .tunnels
                    .open(&src, node, &dst, orig_dst, peer)
                    .instrument(span.clone())
                    .await;
                match opened {
                    Ok(up) => {
                        self.stats.tunneled.fetch_add(1, Relaxed);
                        info!(parent: &span, via = %node, src.identity = %src, dst.identity = %dst, "tunneling");
                        let _ = client.get_ref().set_nodelay(true);
                        let (up, down) = tunnel::join_tcp(client, up).instrument(span).await;
                        self.stats.bytes_from_client.fetch_add(up, Relaxed);
                        self.stats.bytes_to_client.fetch_add(down, Relaxed);
                        logged(None, dst.as_str(), "allowed", (up, down));
                    }
                    Err(e) => {
                        self.stats.tunnel_failed.fetch_add(1, Relaxed);
                        let error = mesh_api::placement::error_chain(&e);
                        warn!(parent: &span, via = %node, %error, "tunnel failed");
                        logged(
                            None,
                            dst.as_str(),
                            &format!("tunnel failed: {error}"),
                            (0, 0),
                        );
                        reset(client);
                    }
                }
            }
            Route::Refuse(why) => {
                self.stats.refused_route.fetch_add(1, Relaxed);
                warn!(parent: &span, reason = %why, "refused");
                logged(None, "", &format!("refused: {why}"), (0, 0));
                reset(client);
            }
        }
    }

    /// The HTTP view of a connection to a mesh destination (a Service or a mesh pod), when the
    /// node has L7 on; `None`: plain TCP as before.
    fn l7_conn(
        &self,
        source: &Source<'_>,
        peer: SocketAddr,
        dst: SocketAddr,
        placement: Option<&Placement>,
        cfg: Option<&NodeConfig>,
    ) -> Option<(crate::http::outbound::Conn, Option<crate::http::Protocol>)> {
        let l7 = self.l7.as_ref()?;
        let cfg = cfg?;
        let pod = &source.pod.name;
        let (target, declared) = match cfg.l7.vip(dst) {
            Some((svc, port)) => (
                crate::http::outbound::Target::Service(svc.clone(), *port),
                svc.port(*port).and_then(|p| p.protocol),
            ),
            None => {
                let w = placement?.by_ip(dst.ip())?;
                let key = format!("{}/{}", w.namespace, w.name);
                let declared = cfg.l7.pod_protocol(&key, dst.port());
                (
                    crate::http::outbound::Target::Pod(key, dst.port()),
                    declared,
                )
            }
        };
        if crate::http::detect::relayed_as_tcp(declared, dst.port(), &l7.opaque_ports) {
            return None;
        }
        let identity = source
            .workload
            .filter(|w| w.node == l7.proxy.node)
            .map(|w| w.identity.clone());
        Some((
            crate::http::outbound::Conn {
                pod: (pod.namespace.clone(), pod.name.clone()),
                identity,
                peer,
                dst,
                target,
                detected: crate::http::UpstreamProtocol::H1,
                declared,
                forwarded: crate::http::upstream::forwarded(peer),
                held: Default::default(),
                requests: self.requests_per_pod.budget(source.pod.id),
            },
            declared,
        ))
    }

    /// Serves the connection as HTTP if it is; gives it back when it is not (opaque TCP).
    async fn http(
        &self,
        client: PodStream,
        mut conn: crate::http::outbound::Conn,
        declared: Option<crate::http::Protocol>,
        tracked: &Tracked,
    ) -> Option<PodStream> {
        let l7 = self.l7.as_ref().expect("checked by l7_conn");
        // A declared HTTP port waits for the client's first bytes; an undeclared one only briefly,
        // so server-first protocols are not held up long, unless HTTP was seen on it before.
        let dest = declared.is_none().then(|| match &conn.target {
            crate::http::outbound::Target::Service(s, port) => (format!("svc/{}", s.name), *port),
            crate::http::outbound::Target::Pod(pod, port) => (format!("pod/{pod}"), *port),
        });
        let wait = match &dest {
            None => l7.declared_wait,
            Some(d) => l7.seen.wait(d, l7.detect_timeout, l7.declared_wait),
        };
        let detected = crate::http::detect::detect(client.get_ref(), wait).await;
        if let Some(d) = dest {
            l7.seen.record(d, detected);
        }
        conn.detected = match detected {
            crate::http::detect::Detected::Opaque | crate::http::detect::Detected::Closed => {
                self.stats.opaque.fetch_add(1, Relaxed);
                return Some(client);
            }
            crate::http::detect::Detected::Http1 => crate::http::UpstreamProtocol::H1,
            crate::http::detect::Detected::Http2 => crate::http::UpstreamProtocol::H2,
        };
        self.stats.http_connections.fetch_add(1, Relaxed);
        tracked.update(|l| {
            l.protocol = match conn.detected {
                crate::http::UpstreamProtocol::H1 => "http1",
                crate::http::UpstreamProtocol::H2 => "http2",
            };
            l.via = "http".into();
        });
        let span = info_span!("http", src.pod = %format!("{}/{}", conn.pod.0, conn.pod.1), dst = %conn.dst);
        l7.proxy
            .clone()
            .serve(client, Arc::new(conn))
            .instrument(span)
            .await;
        None
    }

    /// Connects to `dst` (a pod of this node when `local`) and pumps the bytes both ways; the
    /// bytes each way, or why not.
    async fn pump_to(
        &self,
        client: PodStream,
        dst: SocketAddr,
        dial: Dial<'_>,
    ) -> Result<(u64, u64), PumpFailure> {
        let started = Instant::now();
        let connect = async {
            match dial {
                Dial::Local => self.source.connect_local(dst).await,
                Dial::AsPod(pod) => Ok(PodStream::plain(self.source.connect_as(pod, dst).await?)),
            }
        };
        let upstream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.stats.upstream_connect_failed.fetch_add(1, Relaxed);
                info!(error = %e, "upstream connect failed");
                reset(client);
                return Err(PumpFailure::ConnectFailed);
            }
            Err(_) => {
                self.stats.upstream_connect_failed.fetch_add(1, Relaxed);
                info!(timeout = ?self.connect_timeout, "upstream connect timed out");
                reset(client);
                return Err(PumpFailure::ConnectTimedOut);
            }
        };
        let _ = client.get_ref().set_nodelay(true);
        self.stats.relayed.fetch_add(1, Relaxed);
        self.stats.active.fetch_add(1, Relaxed);
        info!("relaying");
        let (from_client, to_client) = client.into_split();
        let (from_upstream, to_upstream) = upstream.into_split();
        let result = tokio::try_join!(
            pump(from_client, to_upstream),
            pump(from_upstream, to_client)
        );
        self.stats.active.fetch_sub(1, Relaxed);
        match result {
            Ok((up, down)) => {
                self.stats.bytes_from_client.fetch_add(up, Relaxed);
                self.stats.bytes_to_client.fetch_add(down, Relaxed);
                debug!(bytes_up = up, bytes_down = down, duration = ?started.elapsed(), "closed");
                Ok((up, down))
            }
            Err(e) => {
                debug!(error = %e, duration = ?started.elapsed(), "closed with error");
                Err(PumpFailure::Broken)
            }
        }
    }

    /// The access log line for a TCP connection from `pod` (source side).
    #[allow(clippy::too_many_arguments)]
    fn log_tcp(
        &self,
        source: &Source<'_>,
        peer: SocketAddr,
        dst: SocketAddr,
        dst_pod: Option<(&str, &str)>,
        dst_principal: &str,
        decision: &str,
        (up, down): (u64, u64),
        started: Instant,
    ) {
        let pod = &source.pod.name;
        let from = AccessPeer {
            workload: &pod.name,
            namespace: &pod.namespace,
            principal: source.identity().map_or("", SpiffeId::as_str),
            address: peer.to_string(),
        };
        let to = AccessPeer {
            workload: dst_pod.map_or("", |p| p.1),
            namespace: dst_pod.map_or("", |p| p.0),
            principal: dst_principal,
            address: dst.to_string(),
        };
        let security = if dst_principal.is_empty() {
            Security::Plaintext
        } else {
            Security::MutualTls
        };
        self.access_log.write(
            &AccessEntry::new(Reporter::Source, from, to, started)
                .decision(decision)
                .security(security)
                .bytes(up, down),
        );
    }
}

/// Why a pumped connection carried nothing, or ended early (the access log's decision).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PumpFailure {
    ConnectFailed,
    ConnectTimedOut,
    Broken,
}

impl PumpFailure {
    const fn as_str(self) -> &'static str {
        match self {
            PumpFailure::ConnectFailed => "upstream connect failed",
            PumpFailure::ConnectTimedOut => "upstream connect timed out",
            PumpFailure::Broken => "connection error",
        }
    }
}

/// A Service cluster IP becomes one of its endpoints (an address of the same family).
fn vip(dst: SocketAddr, placement: Option<&Placement>, cfg: Option<&NodeConfig>) -> Vip {
    let Some(target) = cfg.and_then(|c| c.vips.get(&dst)) else {
        return Vip::No;
    };
    for _ in 0..target.endpoints.len() {
        let Some((ns, name)) = target.pick() else {
            break;
        };
        let ip = placement
            .and_then(|p| p.pod(ns, name))
            .and_then(|w| w.ips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4()));
        if let Some(ip) = ip {
            return Vip::Endpoint(
                SocketAddr::new(*ip, target.target_port),
                target.service.clone(),
            );
        }
    }
    Vip::Empty(target.service.clone())
}

/// Closes with RST so the client fails at once rather than seeing a clean, empty stream.
fn reset(stream: impl Into<PodStream>) {
    let stream = stream.into();
    let _ = SockRef::from(stream.get_ref()).set_linger(Some(Duration::ZERO));
    drop(stream);
}
