//! Wires the controller together; `serve` returns the bound address and a shutdown handle so tests
//! can run it in-process on port 0.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::Args;
use mesh_api::{
    ca::v1::certificate_service_server::CertificateServiceServer,
    config::v1::config_discovery_server::ConfigDiscoveryServer,
    identity::SpiffeId,
    placement::{Placement, PlacementError, PlacementWatch, error_chain},
};
use tokio::sync::oneshot;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tracing::info;

use crate::{
    auth::{NodeAuth, NodeTokens, TokenReviewAuth, TokensError},
    ca::{Ca, CaError},
    certs::{CertService, Stats},
    distribute::{ConfigService, NodeState},
    model::store::Store,
};

/// `mesh-ctrl serve` flags; each also reads an environment variable.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address of the certificate service (gRPC over TLS).
    #[arg(long, env = "MESH_CTRL_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Where the generated root CA and the published trust bundle live.
    #[arg(
        long,
        env = "MESH_CTRL_STATE_DIR",
        default_value = "/var/lib/mesh-ctrl"
    )]
    pub state_dir: PathBuf,
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Local mode: where pods run (JSON, see mesh_api::placement); reloaded when it changes.
    #[arg(long, env = "MESH_CTRL_PLACEMENT")]
    pub placement: Option<PathBuf>,
    /// Cluster mode: read Namespaces, Pods, Services, routes and policies from the Kubernetes
    /// API (in-cluster config, or the kubeconfig).
    #[arg(long, env = "MESH_CTRL_KUBERNETES")]
    pub kubernetes: bool,
    /// Cluster mode: the namespace of the node proxies' pods.
    #[arg(long, env = "MESH_NODE_PROXY_NAMESPACE", default_value = "mesh-system")]
    pub node_proxy_namespace: String,
    /// Cluster mode: the label selector of the node proxies' pods (their IPs are tunnel
    /// addresses).
    #[arg(
        long,
        env = "MESH_NODE_PROXY_SELECTOR",
        default_value = "app.kubernetes.io/name=mesh-node"
    )]
    pub node_proxy_selector: String,
    /// The admin endpoint `mesh-ctrl status/history/rollback/explain` talk to.
    #[arg(long, env = "MESH_CTRL_ADMIN", default_value = "127.0.0.1:15014")]
    pub admin: SocketAddr,
    /// A second, read-only listener serving only `/metrics` and `/healthz` (for Prometheus and
    /// probes, without exposing rollback).
    #[arg(long, env = "MESH_CTRL_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Local mode: a directory of mesh config YAML (Namespaces, Services, routes, policies),
    /// followed as it changes.
    #[arg(long, env = "MESH_CTRL_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// Local mode: node bootstrap tokens, JSON `{"node": "token"}`.
    #[arg(long, env = "MESH_CTRL_NODE_TOKENS")]
    pub node_tokens: Option<PathBuf>,
    /// How nodes authenticate: bootstrap tokens (local mode) or service-account tokens checked
    /// with TokenReview (cluster mode).
    #[arg(long, env = "MESH_NODE_AUTH", value_enum, default_value_t = NodeAuthMode::Tokens)]
    pub node_auth: NodeAuthMode,
    /// With token-review: the node proxy's service account, NAMESPACE/NAME.
    #[arg(
        long,
        env = "MESH_NODE_SERVICE_ACCOUNT",
        default_value = "mesh-system/mesh-node"
    )]
    pub node_service_account: String,
    /// With token-review: the audience node proxies request their tokens for.
    #[arg(long, env = "MESH_TOKEN_AUDIENCE", default_value = "mesh-ctrl")]
    pub token_audience: String,
    /// Cluster mode: keep the generated root in this Secret (NAMESPACE/NAME) instead of the
    /// state directory.
    #[arg(long, env = "MESH_CA_SECRET")]
    pub ca_secret: Option<String>,
    /// Cluster mode: publish the trust bundle in this ConfigMap (NAMESPACE/NAME) for node proxies
    /// to mount.
    #[arg(long, env = "MESH_TRUST_BUNDLE_CONFIGMAP")]
    pub trust_bundle_configmap: Option<String>,
    /// Longest lifetime of a workload certificate (nodes may ask for less).
    #[arg(long, env = "MESH_CERT_TTL", value_parser = humantime::parse_duration, default_value = "24h")]
    pub cert_ttl: Duration,
    /// Operator-supplied CA certificate (root, or intermediate with --ca-chain) instead of a
    /// generated root.
    #[arg(long, env = "MESH_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    #[arg(long, env = "MESH_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// With an intermediate --ca-cert: the certificates above it, ending with the root.
    #[arg(long, env = "MESH_CA_CHAIN", requires = "ca_cert")]
    pub ca_chain: Option<PathBuf>,
    /// More roots to trust, e.g. the next root during a rotation (PEM bundle).
    #[arg(long, env = "MESH_EXTRA_ROOTS")]
    pub extra_roots: Option<PathBuf>,
    /// DNS names in the controller's own serving certificate (what nodes dial).
    #[arg(
        long,
        env = "MESH_CTRL_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "mesh-ctrl"
    )]
    pub server_names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("CA Secret")]
    Secret(#[from] crate::ca_secret::SecretError),
    #[error("Kubernetes client")]
    Kube(#[source] kube::Error),
    #[error("invalid {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("certificate authority")]
    Ca(#[from] CaError),
    #[error("placement")]
    Placement(#[from] PlacementError),
    #[error("node tokens")]
    Tokens(#[from] TokensError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub struct Bound {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    /// The configuration and its versions.
    pub store: Arc<Store>,
    /// Subscribed nodes and what they acknowledged.
    pub nodes: Arc<std::sync::Mutex<std::collections::BTreeMap<String, NodeState>>>,
    source: tokio::task::JoinHandle<()>,
    close_streams: Box<dyn FnOnce() + Send>,
    /// Where the admin endpoint listens.
    pub admin: SocketAddr,
    admin_task: tokio::task::JoinHandle<()>,
    /// The trust bundle file nodes bootstrap from in local mode.
    pub trust_bundle: PathBuf,
    shutdown: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Bound {
    pub async fn shutdown(self) {
        self.source.abort();
        (self.close_streams)();
        self.admin_task.abort();
        let _ = self.shutdown.send(());
        let _ = self.task.await;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NodeAuthMode {
    Tokens,
    TokenReview,
}

/// `NAMESPACE/NAME`.
fn namespaced<'a>(v: &'a str, field: &'static str) -> Result<(&'a str, &'a str), AppError> {
    v.split_once('/')
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| config_err(field, format!("{v:?} is not NAMESPACE/NAME")))
}

/// The in-cluster (or kubeconfig) client, made once and only when cluster mode needs it.
async fn kube_client(cached: &mut Option<kube::Client>) -> Result<kube::Client, AppError> {
    if let Some(c) = cached {
        return Ok(c.clone());
    }
    let c = kube::Client::try_default().await.map_err(AppError::Kube)?;
    *cached = Some(c.clone());
    Ok(c)
}

fn config_err(field: &'static str, reason: impl Into<String>) -> AppError {
    AppError::Config {
        field,
        reason: reason.into(),
    }
}

/// Largest gRPC request the controller decodes (a CSR, a subscription, an acknowledgement).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

pub async fn serve(args: ServeArgs) -> Result<Bound, AppError> {
    // The trust domain becomes part of every identity: reject what SpiffeId would.
    SpiffeId::new(&args.trust_domain, "x", "x")
        .map_err(|e| config_err("--trust-domain", e.to_string()))?;
    // Short lifetimes are for rotation tests; production keeps the 24 h default.
    if args.cert_ttl < Duration::from_secs(4) {
        return Err(config_err("--cert-ttl", "shorter than 4 seconds"));
    }
    let extra_roots = match &args.extra_roots {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| config_err("--extra-roots", format!("{}: {e}", p.display())))?;
            text.split_inclusive("-----END CERTIFICATE-----\n")
                .filter(|c| c.contains("BEGIN"))
                .map(String::from)
                .collect()
        }
        None => Vec::new(),
    };
    let mut kube = None;
    let ca = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => Ca::from_files(
            cert,
            key,
            args.ca_chain.as_deref(),
            &args.trust_domain,
            &extra_roots,
        )?,
        _ => match &args.ca_secret {
            Some(s) => {
                let (ns, name) = namespaced(s, "--ca-secret")?;
                let api = kube::Api::namespaced(kube_client(&mut kube).await?, ns);
                crate::ca_secret::load_or_create(&api, name, &args.trust_domain, &extra_roots)
                    .await?
            }
            None => {
                Ca::load_or_create(&args.state_dir.join("ca"), &args.trust_domain, &extra_roots)?
            }
        },
    };
    let ca = Arc::new(ca);
    let trust_bundle = args.state_dir.join("trust-bundle.pem");
    std::fs::create_dir_all(&args.state_dir).map_err(|source| AppError::Write {
        path: args.state_dir.clone(),
        source,
    })?;
    std::fs::write(&trust_bundle, ca.roots_pem().concat()).map_err(|source| AppError::Write {
        path: trust_bundle.clone(),
        source,
    })?;

    if let Some(cm) = &args.trust_bundle_configmap {
        let (ns, name) = namespaced(cm, "--trust-bundle-configmap")?;
        let api = kube::Api::namespaced(kube_client(&mut kube).await?, ns);
        crate::ca_secret::publish_bundle(&api, name, &ca.roots_pem().concat()).await?;
    }

    let store = Arc::new(Store::new());
    let (placement, source) = if args.kubernetes {
        if args.placement.is_some() || args.config_dir.is_some() {
            return Err(config_err(
                "--kubernetes",
                "reads the cluster: --placement and --config-dir are for local mode",
            ));
        }
        let mut empty = Placement::default();
        empty.trust_domain = args.trust_domain.clone();
        let feed = PlacementWatch::fixed(empty);
        let proxies = crate::sources::kube::NodeProxies {
            namespace: args.node_proxy_namespace.clone(),
            selector: args.node_proxy_selector.clone(),
        };
        let task = tokio::spawn(crate::sources::kube::run(
            kube_client(&mut kube).await?,
            proxies,
            args.trust_domain.clone(),
            store.clone(),
            feed.clone(),
        ));
        (feed, task)
    } else {
        let path = args.placement.clone().ok_or_else(|| {
            config_err(
                "--placement",
                "required in local mode (or use --kubernetes)",
            )
        })?;
        let placement = PlacementWatch::spawn(path, Duration::from_millis(500))?;
        let task =
            crate::sources::local::spawn(args.config_dir.clone(), placement.clone(), store.clone())
                .map_err(|e| config_err("--config-dir", error_chain(&e)))?;
        (placement, task)
    };
    let auth: Arc<NodeAuth> = match args.node_auth {
        NodeAuthMode::Tokens => {
            let path = args
                .node_tokens
                .as_ref()
                .ok_or_else(|| config_err("--node-tokens", "required with --node-auth tokens"))?;
            Arc::new(NodeAuth::Tokens(NodeTokens::load(path)?))
        }
        NodeAuthMode::TokenReview => {
            let (ns, name) = namespaced(&args.node_service_account, "--node-service-account")?;
            Arc::new(NodeAuth::TokenReview(TokenReviewAuth::new(
                kube_client(&mut kube).await?,
                ns,
                name,
                &args.token_audience,
            )))
        }
    };
    let stats = Arc::new(Stats::default());
    let config = ConfigService::new(store.clone(), auth.clone());
    let nodes = config.nodes();
    let close_streams = Box::new(config.closer());
    let service = CertService {
        ca: ca.clone(),
        placement,
        auth,
        max_ttl: args.cert_ttl,
        stats: stats.clone(),
    };

    // The controller's own certificate, from its CA, so nodes verify it with the trust bundle.
    let (cert, key) = ca.serving_cert(&args.server_names, Duration::from_secs(365 * 24 * 3600))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| AppError::Bind {
            addr: args.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| AppError::Bind {
        addr: args.listen,
        source,
    })?;
    let (tx, rx) = oneshot::channel();
    let router = Server::builder()
        // Connections that never finish a handshake or go quiet are not held forever.
        .timeout(std::time::Duration::from_secs(30))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .concurrency_limit_per_connection(64)
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
        .map_err(|e| config_err("TLS", e.to_string()))?
        // Refused by size before anything is parsed: a CSR and a subscription are small.
        .add_service(
            CertificateServiceServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            ConfigDiscoveryServer::new(config).max_decoding_message_size(MAX_REQUEST_BYTES),
        );
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await
        {
            tracing::error!(error = %e, "certificate service stopped");
        }
    });
    let admin_listener = tokio::net::TcpListener::bind(args.admin)
        .await
        .map_err(|source| AppError::Bind {
            addr: args.admin,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| AppError::Bind {
            addr: args.admin,
            source,
        })?;
    let admin = Arc::new(crate::admin::Admin {
        store: store.clone(),
        nodes: nodes.clone(),
        certs: stats.clone(),
        cert_ttl: args.cert_ttl,
        config_dir: args.config_dir.clone(),
        kube: if args.kubernetes { kube.clone() } else { None },
        connections_refused: Default::default(),
    });
    if let Some(m) = args.metrics_addr {
        let l = tokio::net::TcpListener::bind(m)
            .await
            .map_err(|source| AppError::Bind { addr: m, source })?;
        tokio::spawn(admin.clone().serve(l, true));
    }
    let admin_task = tokio::spawn(admin.serve(admin_listener, false));
    info!(%addr, %admin_addr, trust_domain = %args.trust_domain, trust_bundle = %trust_bundle.display(), "certificate service serving");
    Ok(Bound {
        addr,
        stats,
        store,
        nodes,
        source,
        close_streams,
        admin: admin_addr,
        admin_task,
        trust_bundle,
        shutdown: tx,
        task,
    })
}
