//! Wires the controller together; `serve` returns the bound address and a shutdown handle so tests
//! can run it in-process on port 0.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::Args;
use mesh_api::{
    ca::v1::certificate_service_server::CertificateServiceServer,
    identity::SpiffeId,
    placement::{PlacementError, PlacementWatch},
};
use tokio::sync::oneshot;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tracing::info;

use crate::{
    auth::{NodeTokens, TokensError},
    ca::{Ca, CaError},
    certs::{CertService, Stats},
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
    pub placement: PathBuf,
    /// Local mode: node bootstrap tokens, JSON `{"node": "token"}`.
    #[arg(long, env = "MESH_CTRL_NODE_TOKENS")]
    pub node_tokens: PathBuf,
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
    /// The trust bundle file nodes bootstrap from in local mode.
    pub trust_bundle: PathBuf,
    shutdown: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Bound {
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(());
        let _ = self.task.await;
    }
}

fn config_err(field: &'static str, reason: impl Into<String>) -> AppError {
    AppError::Config {
        field,
        reason: reason.into(),
    }
}

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
    let ca = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => Ca::from_files(
            cert,
            key,
            args.ca_chain.as_deref(),
            &args.trust_domain,
            &extra_roots,
        )?,
        _ => Ca::load_or_create(&args.state_dir.join("ca"), &args.trust_domain, &extra_roots)?,
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

    let placement = PlacementWatch::spawn(args.placement.clone(), Duration::from_millis(500))?;
    let tokens = Arc::new(NodeTokens::load(&args.node_tokens)?);
    let stats = Arc::new(Stats::default());
    let service = CertService {
        ca: ca.clone(),
        placement,
        tokens,
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
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
        .map_err(|e| config_err("TLS", e.to_string()))?
        .add_service(CertificateServiceServer::new(service));
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
    info!(%addr, trust_domain = %args.trust_domain, trust_bundle = %trust_bundle.display(), "certificate service serving");
    Ok(Bound {
        addr,
        stats,
        trust_bundle,
        shutdown: tx,
        task,
    })
}
