//! The certificate service: node proxies obtain workload certificates here.
use mesh_api::sync::LockExt;
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, UNIX_EPOCH},
};

use mesh_api::{
    ca::v1::{
        GetTrustBundleRequest, SignWorkloadRequest, SignWorkloadResponse, TrustBundle,
        certificate_service_server::CertificateService,
    },
    placement::PlacementWatch,
};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::{
    auth::{AuthError, NodeAuth},
    ca::{Ca, CaError},
};

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("pod {namespace}/{pod} is not known to the controller")]
    UnknownPod { namespace: String, pod: String },
    #[error("pod {namespace}/{pod} runs on node {actual:?}, not on the calling node {caller:?}")]
    WrongNode {
        namespace: String,
        pod: String,
        actual: String,
        caller: String,
    },
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// The one place certificate-service errors become gRPC statuses.
impl From<SignError> for Status {
    fn from(e: SignError) -> Self {
        let msg = mesh_api::placement::error_chain(&e);
        match e {
            SignError::Auth(AuthError::Unavailable(_)) => Status::unavailable(msg),
            SignError::Auth(_) => Status::unauthenticated(msg),
            SignError::UnknownPod { .. } => Status::not_found(msg),
            SignError::WrongNode { .. } => Status::permission_denied(msg),
            SignError::Ca(CaError::Csr(_)) => Status::invalid_argument(msg),
            SignError::Ca(_) => Status::internal(msg),
        }
    }
}

#[derive(Default, Debug, serde::Serialize)]
pub struct Stats {
    pub signed: AtomicU64,
    pub refused: AtomicU64,
    /// The newest certificate issued per (node, identity): its expiry, for `mesh-ctrl status`.
    #[serde(skip)]
    pub issued:
        std::sync::Mutex<std::collections::BTreeMap<(String, String), std::time::SystemTime>>,
}

pub struct CertService {
    pub ca: Arc<Ca>,
    pub placement: PlacementWatch,
    pub auth: Arc<NodeAuth>,
    pub max_ttl: Duration,
    pub stats: Arc<Stats>,
}

fn unix(t: std::time::SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl CertService {
    fn bundle(&self) -> TrustBundle {
        TrustBundle {
            trust_domain: self.ca.trust_domain().into(),
            roots_pem: self.ca.roots_pem().to_vec(),
        }
    }

    async fn sign(
        &self,
        req: &Request<SignWorkloadRequest>,
    ) -> Result<SignWorkloadResponse, SignError> {
        let node = self.auth.authenticate(req.metadata()).await?;
        let r = req.get_ref();
        let placement = self.placement.current();
        let w = placement
            .pod(&r.namespace, &r.pod)
            .ok_or_else(|| SignError::UnknownPod {
                namespace: r.namespace.clone(),
                pod: r.pod.clone(),
            })?;
        // The heart of node isolation: a node only ever gets identities of its own workloads.
        if w.node != node {
            return Err(SignError::WrongNode {
                namespace: r.namespace.clone(),
                pod: r.pod.clone(),
                actual: w.node.clone(),
                caller: node,
            });
        }
        let ttl = match r.ttl_seconds {
            0 => self.max_ttl,
            s => Duration::from_secs(s.into()).min(self.max_ttl),
        };
        let signed = self.ca.sign_workload(&r.csr_pem, &w.identity, ttl)?;
        info!(%node, identity = %w.identity, ttl = ?ttl, "signed workload certificate");
        self.stats
            .issued
            .locked()
            .insert((node.clone(), w.identity.to_string()), signed.not_after);
        Ok(SignWorkloadResponse {
            spiffe_id: w.identity.to_string(),
            cert_chain_pem: signed.chain_pem,
            trust_bundle: Some(self.bundle()),
            not_before_unix: unix(signed.not_before),
            not_after_unix: unix(signed.not_after),
        })
    }
}

#[tonic::async_trait]
impl CertificateService for CertService {
    async fn sign_workload(
        &self,
        request: Request<SignWorkloadRequest>,
    ) -> Result<Response<SignWorkloadResponse>, Status> {
        match self.sign(&request).await {
            Ok(r) => {
                self.stats.signed.fetch_add(1, Relaxed);
                Ok(Response::new(r))
            }
            Err(e) => {
                self.stats.refused.fetch_add(1, Relaxed);
                warn!(error = %mesh_api::placement::error_chain(&e), "refused to sign");
                Err(e.into())
            }
        }
    }

    async fn get_trust_bundle(
        &self,
        request: Request<GetTrustBundleRequest>,
    ) -> Result<Response<TrustBundle>, Status> {
        self.auth
            .authenticate(request.metadata())
            .await
            .map_err(|e| Status::from(SignError::from(e)))?;
        Ok(Response::new(self.bundle()))
    }
}
