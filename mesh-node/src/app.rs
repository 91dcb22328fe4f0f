//! Wires the node proxy together. `build` returns the bound addresses and a handle to shut down,
//! so tests can run the whole proxy in-process with port 0.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::Duration,
};

use mesh_api::placement::{HBONE_PORT, InboundMode, Placement, PlacementError, PlacementWatch};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    admin::{Admin, Exposure},
    config::node::NodeConfig,
    config::subscribe,
    config::{Config, MeshConfig, OnExit},
    http::{inbound::HttpInbound, outbound::HttpOutbound, stats::L7Stats, upstream::PodClient},
    identity::{CaConfig, Identities, IdentityError},
    kernel::ebpf::{self, EbpfError, PodFlags, RedirectSpec, Redirector},
    kernel::probe::{self, ProbeError},
    mode::{ConfigFeed, Mesh, Mode},
    pods::enroll::{self, EnrollError, EnrollHooks, Enrollment, Pod, PodName},
    pods::follow::Follow,
    policy::authz::DecisionCounts,
    policy::enforce::Enforcer,
    proxy::drain::{Drain, DrainOutcome},
    proxy::handover::{self, Role, Taken},
    proxy::inbound::Delivery,
    proxy::limits::{Handshakes, Hits, PerPod},
    proxy::outbound::{self, MeshPath, Outbound, OutboundStats, View},
    proxy::pod_socket::ProxySource,
    proxy::tunnel::{TunnelServer, Tunnels},
    ready::Ready,
    sys::PendingSocket,
    telemetry::{access_log::AccessLog, live::Connections, trace::Tracing},
};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("kernel check failed")]
    Probe(#[from] ProbeError),
    #[error("eBPF")]
    Ebpf(#[from] EbpfError),
    #[error("cannot bind {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind the admin socket {path}")]
    Socket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("enrollment state")]
    Enroll(#[from] EnrollError),
    #[error("workload identities")]
    Identity(#[from] IdentityError),
    #[error("placement")]
    Placement(#[from] PlacementError),
    #[error("tracing")]
    Trace(#[from] crate::telemetry::trace::TraceError),
}

/// A running node proxy.
pub struct Bound {
    /// Where the outbound listener(s) accept redirected connections.
    pub outbound: Vec<SocketAddr>,
    /// Where other node proxies reach this one (present with a controller).
    pub inbound: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub redirector: Arc<Redirector>,
    pub pods: Arc<Enrollment>,
    config: Config,
    drain: Drain,
    handed_over: HandedOver,
}

/// Cancelled once the next generation took the listeners over and serves; the line to it then.
struct HandedOver {
    token: CancellationToken,
    line: Arc<std::sync::OnceLock<std::os::unix::net::UnixStream>>,
}

/// Fetches a pod's certificate as soon as it is enrolled, and lets it go when the pod leaves.
struct IdentityHooks {
    identities: Arc<Identities>,
    placement: PlacementWatch,
}

impl EnrollHooks for IdentityHooks {
    fn enrolled(&self, pod: &Pod) {
        match self
            .placement
            .current()
            .pod(&pod.name.namespace, &pod.name.name)
        {
            Some(w) => self
                .identities
                .add_owner(w.identity.clone(), &w.namespace, &w.name),
            None => {
                tracing::warn!(pod = %pod.name, "enrolled pod is not in the placement: it has no mesh identity")
            }
        }
    }

    fn unenrolled(&self, pod: &Pod) {
        if let Some(w) = self
            .placement
            .current()
            .pod(&pod.name.namespace, &pod.name.name)
        {
            self.identities
                .remove_owner(&w.identity, &w.namespace, &w.name);
        }
    }

    /// A pod enrolled before the controller knew it gets its identity once it does.
    fn refreshed(&self, pod: &Pod) {
        if let Some(w) = self
            .placement
            .current()
            .pod(&pod.name.namespace, &pod.name.name)
            && !self.identities.owns(&w.identity, &w.namespace, &w.name)
        {
            self.identities
                .add_owner(w.identity.clone(), &w.namespace, &w.name);
        }
    }

    fn flags(&self, pod: &PodName) -> PodFlags {
        let flag = |m: InboundMode| match m {
            InboundMode::Strict => mesh_abi::POD_F_STRICT,
            InboundMode::Permissive => 0,
        };
        let modes = self
            .placement
            .current()
            .inbound_modes(&pod.namespace, &pod.name);
        PodFlags {
            flags: flag(modes.mode),
            ports: modes.ports.iter().map(|(p, m)| (*p, flag(*m))).collect(),
        }
    }
}

/// Keeps enrolled pods' kernel flags (inbound STRICT/PERMISSIVE) in step with the placement.
async fn follow_inbound_modes(placement: PlacementWatch, pods: Arc<Enrollment>) {
    let mut seen = placement.current();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = placement.current();
        if Arc::ptr_eq(&now, &seen) {
            continue;
        }
        seen = now;
        if let Err(e) = pods.refresh_flags() {
            tracing::error!(error = %mesh_api::placement::error_chain(&e), "updating inbound modes failed");
        }
    }
}

fn start_mesh(config: &Config, m: &MeshConfig, ready: &Ready) -> Result<Mode, AppError> {
    let identities = Identities::new(
        CaConfig {
            endpoint: m.ctrl_addr.clone(),
            server_name: m.ctrl_server_name.clone(),
            trust_bundle: m.trust_bundle.clone(),
            token_file: m.bootstrap_token_file.clone(),
            node: config.node_name.clone(),
            trust_domain: m.trust_domain.clone(),
            ttl: m.cert_ttl,
        },
        config.state_dir.join(crate::identity::saved::FILE),
    )?;
    tokio::spawn(identities.clone().rotate_forever());
    tokio::spawn(identities.clone().keep_saved());
    let Some(path) = &m.placement else {
        return Ok(subscribe_config(m, identities, ready, &config.state_dir));
    };
    Ok(Mode::Placement(Mesh {
        identities,
        placement: PlacementWatch::spawn(path.clone(), Duration::from_millis(500))?,
        tunnel_stats: Arc::default(),
    }))
}

/// Placement and policy from the controller's stream; not ready until the first version is in.
fn subscribe_config(
    m: &MeshConfig,
    identities: Arc<Identities>,
    ready: &Ready,
    state_dir: &std::path::Path,
) -> Mode {
    let mut empty = Placement::default();
    empty.trust_domain = m.trust_domain.clone();
    let placement = PlacementWatch::fixed(empty);
    let (tx, rx) = watch::channel(Arc::new(NodeConfig::default()));
    let status = Arc::new(Mutex::new(subscribe::Status::default()));
    let subscriber = subscribe::Subscriber {
        identities: identities.clone(),
        trust_domain: m.trust_domain.clone(),
        tx,
        status: status.clone(),
        saved: state_dir.join("config.pb"),
        placement: placement.clone(),
    };
    tokio::spawn(subscriber.run(ready.register("config")));
    Mode::Controller(
        Mesh {
            identities,
            placement,
            tunnel_stats: Arc::default(),
        },
        ConfigFeed { config: rx, status },
    )
}

/// Everything this generation serves on, bound (or taken over from the generation running)
/// before any program is attached: a redirected connection must always find the proxy.
struct Listeners {
    outbound: Vec<TcpListener>,
    /// Empty without a controller (no identities, no tunnel).
    tunnel: Vec<TcpListener>,
    admin: TcpListener,
    metrics: Option<TcpListener>,
    admin_socket: PendingSocket,
    handover_socket: PendingSocket,
    /// What the running generation handed over; told when this one serves.
    taken: Option<Taken>,
}

impl Listeners {
    fn bind(config: &Config) -> Result<Self, AppError> {
        // A generation already running hands its listeners over: no connect is refused meanwhile.
        let mut taken =
            handover::take_over(&config.state_dir).map_err(socket_err(config, handover::SOCKET))?;
        let outbound = bind_all(
            config,
            &mut taken,
            config.outbound_port,
            Role::Outbound,
            "outbound listener",
        )?;
        let tunnel = match config.mesh {
            Some(_) => bind_all(
                config,
                &mut taken,
                HBONE_PORT,
                Role::Tunnel,
                "tunnel listener",
            )?,
            None => Vec::new(),
        };
        let admin = listen(&mut taken, Role::Admin, config.admin_addr, "admin endpoint")?;
        let admin_socket = Admin::bind_unix(&config.state_dir)
            .map_err(socket_err(config, crate::config::ADMIN_SOCKET))?;
        let handover_socket =
            handover::bind(&config.state_dir).map_err(socket_err(config, handover::SOCKET))?;
        let metrics = config
            .metrics_addr
            .map(|addr| listen(&mut taken, Role::Metrics, addr, "metrics endpoint"))
            .transpose()?;
        Ok(Self {
            outbound,
            tunnel,
            admin,
            metrics,
            admin_socket,
            handover_socket,
            taken,
        })
    }

    fn admin_addr(&self, config: &Config) -> Result<SocketAddr, AppError> {
        self.admin.local_addr().map_err(|source| AppError::Bind {
            what: "admin endpoint",
            addr: config.admin_addr,
            source,
        })
    }

    /// This generation's own descriptors of its listeners, for the next one to take over.
    fn offered(&self) -> std::io::Result<Vec<(Role, SocketAddr, std::os::fd::OwnedFd)>> {
        self.outbound
            .iter()
            .map(|l| handover::entry(Role::Outbound, l))
            .chain(self.tunnel.iter().map(|l| handover::entry(Role::Tunnel, l)))
            .chain(std::iter::once(handover::entry(Role::Admin, &self.admin)))
            .chain(
                self.metrics
                    .iter()
                    .map(|l| handover::entry(Role::Metrics, l)),
            )
            .collect()
    }
}

fn socket_err(config: &Config, name: &str) -> impl FnOnce(std::io::Error) -> AppError + use<> {
    let path = config.state_dir.join(name);
    move |source| AppError::Socket { path, source }
}

/// Binds one listener per proxy address on `port` (0: the first bind picks it, the others follow).
fn bind_all(
    config: &Config,
    taken: &mut Option<Taken>,
    mut port: u16,
    role: Role,
    what: &'static str,
) -> Result<Vec<TcpListener>, AppError> {
    let ips = config
        .proxy_ipv4
        .map(Into::into)
        .into_iter()
        .chain(config.proxy_ipv6.map(Into::into));
    let mut listeners = Vec::new();
    for ip in ips {
        let addr = SocketAddr::new(ip, port);
        let l = listen(taken, role, addr, what)?;
        port = l
            .local_addr()
            .map_err(|source| AppError::Bind { what, addr, source })?
            .port();
        listeners.push(l);
    }
    Ok(listeners)
}

/// The running generation's listener for `role` at `addr` if it handed one over, else a new one.
fn listen(
    taken: &mut Option<Taken>,
    role: Role,
    addr: SocketAddr,
    what: &'static str,
) -> Result<TcpListener, AppError> {
    let bind_err = |source| AppError::Bind { what, addr, source };
    match taken.as_mut().and_then(|t| t.take(role, addr)) {
        Some(l) => {
            l.set_nonblocking(true).map_err(bind_err)?;
            TcpListener::from_std(l).map_err(bind_err)
        }
        None => outbound::bind(addr).map_err(bind_err),
    }
}

fn addrs(listeners: &[TcpListener]) -> Vec<SocketAddr> {
    listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect()
}

/// Checks the kernel before anything is touched: a missing required feature stops the start
/// with one line naming it.
fn check_kernel(config: &Config) -> Result<probe::Kernel, AppError> {
    probe::check(&config.cgroup, &config.bpffs)?;
    match crate::sys::raise_nofile_limit() {
        Ok((before, after)) => info!(
            before,
            after, "open files limit (soft) raised to the hard limit"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
    let kernel = probe::kernel(config.socket_acceleration, config.inbound_program);
    kernel.log();
    kernel.require()?;
    Ok(kernel)
}

/// Loads and attaches the redirect programs, pointed at the outbound listener.
fn attach(
    config: &Config,
    object: &[u8],
    outbound: &[SocketAddr],
    kernel: &probe::Kernel,
) -> Result<Arc<Redirector>, AppError> {
    let spec = RedirectSpec {
        cgroup: config.cgroup.clone(),
        pin_dir: config.pin_dir.clone(),
        log_level: config.ebpf_log_level.as_aya(),
        proxy_ipv4: config.proxy_ipv4,
        proxy_ipv6: config.proxy_ipv6,
        proxy_port: outbound
            .first()
            .map_or(config.outbound_port, SocketAddr::port),
        exclude_ports: config.exclude_ports.clone(),
        exclude_cidrs: config.exclude_cidrs.clone(),
        accelerate: config.socket_acceleration,
        redirected_per_pod: u32::try_from(config.limits.max_connections_per_pod)
            .unwrap_or(u32::MAX),
    };
    let redirector = Arc::new(Redirector::load(object, &spec, kernel)?);
    info!(cgroup = %config.cgroup.display(), pin_dir = %config.pin_dir.display(), "redirect programs attached");
    Ok(redirector)
}

/// The node's pods: enrollment, with identities fetched as they join and the kernel flags,
/// enrollment and discovery kept in step with the configuration.
fn enroll_pods(
    config: &Config,
    mode: &Mode,
    redirector: &Arc<Redirector>,
) -> Result<(Arc<Enrollment>, Option<Arc<Follow>>), AppError> {
    let hooks = mode.mesh().map(|m| {
        Arc::new(IdentityHooks {
            identities: m.identities.clone(),
            placement: m.placement.clone(),
        }) as Arc<dyn EnrollHooks>
    });
    let pods = Arc::new(Enrollment::open(
        &config.state_dir,
        redirector.clone(),
        hooks,
    )?);
    // With a config stream, `Follow` re-applies flags on every version; with a placement file,
    // this follows the file.
    if let Mode::Placement(m) = mode {
        tokio::spawn(follow_inbound_modes(m.placement.clone(), pods.clone()));
    }
    let follow = mode
        .config()
        .map(|rx| Follow::new(pods.clone(), rx, &config.state_dir));
    if let Some(f) = &follow {
        tokio::spawn(f.clone().run());
        if let (Some(root), Some(rx)) = (&config.kubepods_cgroup_root, mode.config()) {
            let d = Arc::new(crate::pods::kubepods::Discovery {
                root: root.clone(),
                proc: PathBuf::from("/proc"),
                node: config.node_name.clone(),
                follow: f.clone(),
                config: rx,
            });
            tokio::spawn(d.run());
        }
    }
    Ok((pods, follow))
}

/// The bounds one pod or one stranger is held to, and what counts their hits.
struct Guards {
    hits: Arc<Hits>,
    connections_per_pod: Arc<PerPod>,
    requests_per_pod: Arc<PerPod>,
    /// Tunnel handshakes in progress (with a controller).
    handshakes: Option<Arc<Handshakes>>,
}

impl Guards {
    fn start(config: &Config, mode: &Mode) -> Self {
        let connections_per_pod = Arc::new(PerPod::new(config.limits.max_connections_per_pod));
        let requests_per_pod = Arc::new(PerPod::new(config.limits.max_requests_per_pod));
        tokio::spawn({
            let (c, r) = (connections_per_pod.clone(), requests_per_pod.clone());
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    c.prune();
                    r.prune();
                }
            }
        });
        Self {
            hits: Arc::default(),
            connections_per_pod,
            requests_per_pod,
            handshakes: mode
                .mesh()
                .map(|_| Handshakes::new(config.limits.max_tunnel_handshakes)),
        }
    }
}

/// What records the traffic: request series, live connections, traces, access logs.
struct Recorders {
    l7_stats: Arc<L7Stats>,
    live: Arc<Connections>,
    tracing: Arc<Tracing>,
    access_log: Arc<AccessLog>,
}

impl Recorders {
    fn new(config: &Config, mode: &Mode) -> Result<Self, AppError> {
        Ok(Self {
            l7_stats: Arc::new(L7Stats::new(config.metrics_label_budget)),
            live: Arc::default(),
            tracing: Arc::new(Tracing::new(
                config.otlp_endpoint.as_deref(),
                config.trace_sample_percent,
                &config.node_name,
            )?),
            access_log: Arc::new(AccessLog::new(config.access_log, mode.config())),
        })
    }
}

/// The HTTP path, which needs routes and policies: it runs with config from the controller.
/// Its inbound side (requests for this node's pods) and its outbound side (with the tunnels).
fn http_path(
    config: &Config,
    mode: &Mode,
    (pods, source, tunnels): (&Arc<Enrollment>, &ProxySource, Option<&Arc<Tunnels>>),
    (rec, drain): (&Recorders, &Drain),
    decisions: &Arc<DecisionCounts>,
    hits: &Arc<Hits>,
) -> (Option<Arc<HttpInbound>>, Option<outbound::L7Path>) {
    let inbound = mode.config().map(|rx| {
        Arc::new(HttpInbound {
            config: rx,
            runtime: Arc::default(),
            pods: PodClient::new(source.clone(), config.connect_timeout),
            enrollment: pods.clone(),
            stats: rec.l7_stats.clone(),
            counters: Default::default(),
            access_log: rec.access_log.clone(),
            tracing: rec.tracing.clone(),
            decisions: decisions.clone(),
            escaped_slashes: config.path_escaped_slashes,
        })
    });
    let outbound = inbound
        .as_ref()
        .zip(tunnels)
        .map(|(inbound, tunnels)| outbound::L7Path {
            proxy: Arc::new(HttpOutbound {
                node: config.node_name.clone(),
                config: inbound.config.clone(),
                tunnels: tunnels.clone(),
                carried: crate::http::carried::Carried::new(tunnels.clone()),
                inbound: inbound.clone(),
                stats: rec.l7_stats.clone(),
                access_log: rec.access_log.clone(),
                tracing: rec.tracing.clone(),
                limit_hits: hits.clone(),
                leaving: drain.watch(),
            }),
            detect_timeout: config.protocol_detect_timeout,
            opaque_ports: config.opaque_ports.clone(),
            seen: Default::default(),
            declared_wait: Duration::from_secs(10),
        });
    (inbound, outbound)
}

/// The tunnel server: other nodes' proxies reach this node's pods through it.
fn serve_tunnel(
    config: &Config,
    m: &Mesh,
    (pods, deliver): (&Arc<Enrollment>, Delivery),
    guards: &Guards,
    listeners: Vec<TcpListener>,
    (drain, gate): (&Drain, &Option<Ready>),
) {
    let server = Arc::new(TunnelServer {
        node: config.node_name.clone(),
        identities: m.identities.clone(),
        placement: m.placement.clone(),
        pods: pods.clone(),
        stats: m.tunnel_stats.clone(),
        handshakes: guards.handshakes.clone().expect("made with the mesh"),
        limit_hits: guards.hits.clone(),
        idle_timeout: config.limits.tunnel_idle_timeout,
        deliver: Arc::new(deliver),
    });
    for l in listeners {
        spawn_gated(gate.clone(), server.clone().serve(l, drain.watch()));
    }
}

/// Runs `serve` once `gate`, if any, is ready.
fn spawn_gated(gate: Option<Ready>, serve: impl Future<Output = ()> + Send + 'static) {
    tokio::spawn(async move {
        if let Some(ready) = gate {
            ready.wait().await;
        }
        serve.await
    });
}

/// Everything is up: takes the root-only sockets' names over (so the CNI plugin finds this
/// generation) and offers this generation's listeners to the next one. The token is cancelled
/// once the next generation took them.
fn publish(
    config: &Config,
    admin: Arc<Admin>,
    (admin_socket, handover_socket): (PendingSocket, PendingSocket),
    offered: Vec<(Role, SocketAddr, std::os::fd::OwnedFd)>,
    drain: &Drain,
) -> Result<HandedOver, AppError> {
    let admin_socket = admin_socket
        .publish()
        .map_err(socket_err(config, crate::config::ADMIN_SOCKET))?;
    tokio::spawn(admin.serve_unix(admin_socket, drain.watch()));
    let handover_socket = handover_socket
        .publish()
        .map_err(socket_err(config, handover::SOCKET))?;
    let handed_over = HandedOver {
        token: CancellationToken::new(),
        line: Arc::default(),
    };
    tokio::spawn({
        let (token, line) = (handed_over.token.clone(), handed_over.line.clone());
        async move {
            let _ = line.set(handover::offer(handover_socket, offered).await);
            token.cancel();
        }
    });
    Ok(handed_over)
}

/// Builds and starts the node proxy: kernel check, listeners, programs, pods, then the data
/// path, the tunnel server and the admin endpoints. Returns once everything serves.
pub async fn build(config: Config) -> Result<Bound, AppError> {
    let ready = Ready::default();
    let not_attached = ready.register("ebpf");
    let not_listening = ready.register("listeners");

    let kernel = check_kernel(&config)?;
    let object = ebpf::object_bytes(config.ebpf_object.as_deref())?;
    let listeners = Listeners::bind(&config)?;
    let outbound_addrs = addrs(&listeners.outbound);
    let inbound_addrs = addrs(&listeners.tunnel);
    let admin_addr = listeners.admin_addr(&config)?;
    let mode = match &config.mesh {
        Some(m) => start_mesh(&config, m, &ready)?,
        None => Mode::Plain,
    };
    // Every listener is bound: from here on, only the kernel can refuse the start.
    let redirector = attach(&config, &object, &outbound_addrs, &kernel)?;
    drop(not_attached);
    let (pods, follow) = enroll_pods(&config, &mode, &redirector)?;

    let decisions = Arc::new(DecisionCounts::default());
    let enforcer = mode.config().map(|rx| Enforcer::new(rx, decisions.clone()));
    if let Some(e) = &enforcer {
        tokio::spawn(e.clone().run());
    }
    let guards = Guards::start(&config, &mode);
    let rec = Recorders::new(&config, &mode)?;
    let source = ProxySource {
        v4: config.proxy_ipv4,
        v6: config.proxy_ipv6,
        accel: redirector.accel(),
        deliveries: redirector.deliveries(),
        egress: redirector.egress(),
    };
    let tunnels = mode
        .mesh()
        .map(|m| Tunnels::new(m.identities.clone(), m.tunnel_stats.clone()));
    // Made before what serves: connections learn from it when this generation drains.
    let drain = Drain::new();
    let (l7_inbound, l7_path) = http_path(
        &config,
        &mode,
        (&pods, &source, tunnels.as_ref()),
        (&rec, &drain),
        &decisions,
        &guards.hits,
    );
    let stats = Arc::new(OutboundStats::default());
    let proxy = Arc::new(Outbound {
        orig: redirector.clone(),
        pods: pods.clone(),
        stats: stats.clone(),
        connect_timeout: config.connect_timeout,
        own_addrs: outbound_addrs
            .iter()
            .chain(&inbound_addrs)
            .copied()
            .collect(),
        mesh: mode.mesh().map(|m| MeshPath {
            node: config.node_name.clone(),
            view: match mode.config() {
                Some(rx) => View::Controller(rx),
                None => View::Placement(m.placement.clone()),
            },
            tunnels: tunnels.clone().expect("made with the mesh"),
        }),
        source: source.clone(),
        enforcer: enforcer.clone(),
        l7: l7_path,
        access_log: rec.access_log.clone(),
        live: rec.live.clone(),
        per_pod: guards.connections_per_pod.clone(),
        requests_per_pod: guards.requests_per_pod.clone(),
        limit_hits: guards.hits.clone(),
    });
    let offered = listeners
        .offered()
        .map_err(socket_err(&config, handover::SOCKET))?;
    let upgrade = Arc::new(handover::UpgradeStats::default());
    upgrade
        .generation
        .store(handover::next_generation(&config.state_dir), Relaxed);
    upgrade.listeners_taken.store(
        listeners.taken.as_ref().map_or(0, |t| t.handed() as u64),
        Relaxed,
    );
    let Listeners {
        outbound,
        tunnel,
        admin: admin_listener,
        metrics,
        admin_socket,
        handover_socket,
        taken,
    } = listeners;
    // A generation that took the listeners over accepts on them only once it is ready (its
    // configuration is in): until then the running one accepts, and keeps the node.
    let gate = taken.as_ref().map(|_| ready.clone());
    for l in outbound {
        spawn_gated(gate.clone(), proxy.clone().serve(l, drain.watch()));
    }
    match mode.mesh() {
        Some(m) => {
            let deliver = Delivery {
                node: config.node_name.clone(),
                placement: m.placement.clone(),
                pods: pods.clone(),
                stats: m.tunnel_stats.clone(),
                connect_timeout: config.connect_timeout,
                source,
                enforcer: enforcer.clone(),
                l7: l7_inbound.clone(),
                access_log: rec.access_log.clone(),
                live: rec.live.clone(),
            };
            serve_tunnel(
                &config,
                m,
                (&pods, deliver),
                &guards,
                tunnel,
                (&drain, &gate),
            );
        }
        None => tracing::warn!(
            "no controller configured: connections are relayed as plain TCP, without identities"
        ),
    }

    let admin = Arc::new(Admin {
        config: config.clone(),
        ready: ready.clone(),
        redirector: redirector.clone(),
        pods: pods.clone(),
        stats,
        mode,
        follow,
        enforcer,
        l7: l7_inbound,
        live: rec.live,
        changes_refused: Default::default(),
        limit_hits: guards.hits,
        handshakes: guards.handshakes,
        upgrade: upgrade.clone(),
    });
    if let Some(l) = metrics {
        tokio::spawn(admin.clone().serve(l, drain.watch(), Exposure::Metrics));
    }
    tokio::spawn(
        admin
            .clone()
            .serve(admin_listener, drain.watch(), Exposure::Read),
    );
    let handed_over = publish(
        &config,
        admin,
        (admin_socket, handover_socket),
        offered,
        &drain,
    )?;
    // Ready only now: callers of the admin socket (the CNI plugin) find it in place.
    drop(not_listening);
    // The running generation drains once this one is ready, not before: a new generation that
    // cannot get its configuration (the controller away, none saved) leaves the node to it.
    if let Some(t) = taken {
        let upgrade = upgrade.clone();
        tokio::spawn(async move {
            ready.wait().await;
            t.serving(upgrade);
        });
    }
    info!(outbound = ?outbound_addrs, inbound = ?inbound_addrs, admin = %admin_addr, "node proxy serving");

    Ok(Bound {
        outbound: outbound_addrs,
        inbound: inbound_addrs,
        admin: admin_addr,
        redirector,
        pods,
        config,
        drain,
        handed_over,
    })
}

impl Bound {
    /// Resolves once the next generation took this one's listeners over and serves: time to
    /// [`Self::shutdown`].
    pub async fn handed_over(&self) {
        self.handed_over.token.cancelled().await
    }

    /// Stops accepting, drains open connections until the deadline, then applies `--on-exit`
    /// (unless the next generation took over: the programs and pods are its now).
    pub async fn shutdown(self) -> DrainOutcome {
        let Bound {
            config,
            drain,
            redirector,
            pods,
            handed_over,
            ..
        } = self;
        let open = drain.active();
        info!(active = open, deadline = ?config.drain_timeout, "draining");
        let outcome = drain.drain(config.drain_timeout).await;
        info!(?outcome, "drained");
        if let Some(line) = handed_over.line.get() {
            let cut = match outcome {
                DrainOutcome::Graceful => 0,
                DrainOutcome::Forced(n) => n,
            };
            let r = handover::DrainReport {
                open: open as u64,
                cut: cut as u64,
            };
            handover::report(line, &r);
        }
        drop(pods);
        drop(redirector);
        if handed_over.token.is_cancelled() {
            info!("the next generation serves: programs and enrollments stay with it");
        } else if config.on_exit == OnExit::Detach {
            detach(&config);
        } else {
            info!(
                "redirect programs stay attached: enrolled pods fail closed until a node proxy is back"
            );
        }
        outcome
    }
}

/// Uninstall: detach programs and forget enrollments.
pub fn detach(config: &Config) {
    match ebpf::detach(&config.pin_dir) {
        Ok(()) => info!(pin_dir = %config.pin_dir.display(), "redirect programs detached"),
        Err(e) => tracing::error!(error = %e, pin_dir = %config.pin_dir.display(), "detach failed"),
    }
    if let Err(e) = forget_state(&config.state_dir) {
        tracing::error!(error = %e, "removing enrollment state failed");
    }
}

/// What an uninstall removes from the state directory: enrollments, and the certificates kept
/// for the next generation (their private keys).
pub fn forget_state(state_dir: &std::path::Path) -> std::io::Result<()> {
    crate::identity::saved::remove(state_dir)?;
    enroll::remove_state(state_dir)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_uninstall_leaves_no_private_key_behind() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("n1");
        std::fs::create_dir_all(&state).unwrap();
        for f in ["pods.json", crate::identity::saved::FILE] {
            std::fs::write(state.join(f), "{}").unwrap();
        }
        super::forget_state(&state).unwrap();
        assert!(
            !state.exists(),
            "left: {:?}",
            std::fs::read_dir(&state).ok()
        );
        // Twice is fine: nothing left to remove.
        super::forget_state(&state).unwrap();
    }
}
