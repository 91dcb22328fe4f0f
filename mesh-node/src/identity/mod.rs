//! Workload certificates held by this node: fetched from the controller on first use or when a pod
//! is enrolled, rotated at half-life while connections made with the old one keep working, retried
//! with backoff while the controller is unreachable. Private keys are generated here and never
//! leave the node; the controller only sees CSRs.
pub(crate) mod saved;
pub(crate) mod tls;
use mesh_api::sync::RwLockExt;
use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mesh_api::{
    auth::{AUTHORIZATION, NODE_HEADER},
    ca::v1::{SignWorkloadRequest, certificate_service_client::CertificateServiceClient},
    identity::SpiffeId,
};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject},
    sign::CertifiedKey,
};
use serde::Serialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{info, warn};

/// How long a connection waits for its first certificate while the controller is unreachable.
const FIRST_FETCH_PATIENCE: Duration = Duration::from_secs(4);
/// How long restored certificates wait for a pod of the node to claim them before they are
/// dropped: a node holds only its pods' identities. Enrollment comes back within seconds of a
/// start.
const CLAIM_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("controller endpoint {0:?} is invalid")]
    Endpoint(String, #[source] tonic::transport::Error),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key generation")]
    Key(#[source] rcgen::Error),
    #[error("the controller refused: {0}")]
    Refused(String),
    #[error("the controller is unreachable: {0}")]
    Unreachable(String),
    #[error("the controller answered with an unusable certificate")]
    BadAnswer(#[source] tls::TlsError),
    #[error("the controller issued {got} instead of {wanted}")]
    WrongIdentity { wanted: SpiffeId, got: String },
    #[error("no enrolled pod on this node carries {0}")]
    NoOwner(SpiffeId),
}

/// One workload's current certificate.
#[derive(Debug)]
pub struct WorkloadCert {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    pub certified: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When this node received it. Certificates are backdated for clock skew, so half-life is
    /// measured from here, not from `not_before`.
    received: SystemTime,
}

impl WorkloadCert {
    fn new(
        id: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: PrivatePkcs8KeyDer<'static>,
        not_before: SystemTime,
        not_after: SystemTime,
        received: SystemTime,
    ) -> Result<Self, rustls::Error> {
        let signing =
            rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(key.clone_key()))?;
        Ok(Self {
            id,
            certified: Arc::new(CertifiedKey::new(chain.clone(), signing)),
            chain,
            key,
            not_before,
            not_after,
            received,
        })
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// Past half its lifetime: time to rotate.
    fn due(&self, now: SystemTime) -> bool {
        let life = self
            .not_after
            .duration_since(self.received)
            .unwrap_or_default();
        now >= self.received + life / 2
    }
}

/// How mesh-node reaches the controller's certificate service.
#[derive(Debug, Clone)]
pub struct CaConfig {
    pub endpoint: String,
    pub server_name: String,
    /// Roots to trust before the controller has sent a bundle (local mode: its trust-bundle.pem).
    pub trust_bundle: PathBuf,
    pub token_file: PathBuf,
    pub node: String,
    pub trust_domain: String,
    /// Lifetime to ask for (the controller may grant less).
    pub ttl: Duration,
}

#[derive(Default, Debug, Serialize)]
pub struct IdentityStats {
    pub fetched: AtomicU64,
    /// Served from what an earlier generation saved (see [`saved`]), without asking.
    pub restored: AtomicU64,
    pub rotations: AtomicU64,
    pub failures: AtomicU64,
}

pub struct Identities {
    cfg: CaConfig,
    client: CertificateServiceClient<Channel>,
    /// For long-lived streams (config): no per-request deadline.
    streams: Channel,

    /// foldhash, not SipHash: looked up on every request to another node.
    certs: RwLock<hashbrown::HashMap<SpiffeId, Arc<WorkloadCert>>>,
    /// Pods of this node carrying each identity: who to name when asking for a certificate.
    owners: RwLock<HashMap<SpiffeId, BTreeSet<(String, String)>>>,
    roots: RwLock<Arc<RootCertStore>>,
    fetching: tokio::sync::Mutex<HashMap<SpiffeId, Arc<tokio::sync::Mutex<()>>>>,
    /// Where the certificates held are kept across generations ([`saved`]).
    saved: PathBuf,
    /// Bumped on every change to `certs`; [`Identities::keep_saved`] writes the file after it.
    changes: tokio::sync::watch::Sender<u64>,
    pub stats: IdentityStats,
}

/// One certificate, as `/v1/counters` shows it.
#[derive(Serialize)]
pub struct CertStatus {
    pub identity: String,
    pub expires_in_seconds: i64,
}

impl Identities {
    /// `saved`: the file certificates are kept in for the next start, and restored from now.
    pub fn new(cfg: CaConfig, saved: PathBuf) -> Result<Arc<Self>, IdentityError> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(|source| IdentityError::Read {
                path: p.clone(),
                source,
            })
        };
        let bundle = read(&cfg.trust_bundle)?;
        // Fail at start on a missing token; it is re-read for every request (below).
        read(&cfg.token_file)?;
        let roots =
            tls::root_store(std::slice::from_ref(&bundle)).map_err(IdentityError::BadAnswer)?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&bundle))
            .domain_name(&cfg.server_name);
        let endpoint = Endpoint::from_shared(cfg.endpoint.clone())
            .and_then(|e| e.tls_config(tls))
            .map_err(|e| IdentityError::Endpoint(cfg.endpoint.clone(), e))?
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        // Connect on first use: the controller may be down when the node starts.
        let channel = endpoint
            .clone()
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        let this = Self {
            cfg,
            client: CertificateServiceClient::new(channel),
            streams: endpoint.connect_lazy(),

            certs: RwLock::default(),
            owners: RwLock::default(),
            roots: RwLock::new(Arc::new(roots)),
            fetching: Default::default(),
            saved,
            changes: tokio::sync::watch::Sender::new(0),
            stats: IdentityStats::default(),
        };
        this.restore();
        Ok(Arc::new(this))
    }

    /// Adds this node's credentials to a call to the controller.
    pub fn authorize<T>(&self, req: &mut tonic::Request<T>) -> Result<(), IdentityError> {
        let md = req.metadata_mut();
        md.insert(
            NODE_HEADER,
            self.cfg
                .node
                .parse()
                .map_err(|_| IdentityError::Refused("node name is not ASCII".into()))?,
        );
        md.insert(
            AUTHORIZATION,
            format!("Bearer {}", self.token()?)
                .parse()
                .map_err(|_| IdentityError::Refused("token is not ASCII".into()))?,
        );
        Ok(())
    }

    /// A channel to the controller for long-lived streams, with the same TLS trust.
    pub fn stream_channel(&self) -> Channel {
        self.streams.clone()
    }

    pub fn node(&self) -> &str {
        &self.cfg.node
    }

    /// The bootstrap token, read afresh: in cluster mode it is a projected service-account token
    /// the kubelet rotates in place.
    fn token(&self) -> Result<String, IdentityError> {
        std::fs::read_to_string(&self.cfg.token_file)
            .map(|t| t.trim().to_string())
            .map_err(|source| IdentityError::Read {
                path: self.cfg.token_file.clone(),
                source,
            })
    }

    pub fn trust_domain(&self) -> &str {
        &self.cfg.trust_domain
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.read_locked().clone()
    }

    pub fn cached(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        let c = self.certs.read_locked().get(id).cloned()?;
        (c.not_after > SystemTime::now()).then_some(c)
    }

    /// A pod of this node now carries `id`: fetch its certificate ahead of the first connection.
    pub fn add_owner(self: &Arc<Self>, id: SpiffeId, namespace: &str, pod: &str) {
        self.owners
            .write_locked()
            .entry(id.clone())
            .or_default()
            .insert((namespace.into(), pod.into()));
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.get(&id).await {
                warn!(identity = %id, error = %mesh_api::placement::error_chain(&e), "prefetching certificate failed; will retry on use");
            }
        });
    }

    /// Whether pod `namespace/pod` is known to carry `id`.
    pub fn owns(&self, id: &SpiffeId, namespace: &str, pod: &str) -> bool {
        self.owners
            .read_locked()
            .get(id)
            .is_some_and(|s| s.contains(&(namespace.to_string(), pod.to_string())))
    }

    /// The pod left: once no pod of this node carries `id`, its certificate is dropped.
    pub fn remove_owner(&self, id: &SpiffeId, namespace: &str, pod: &str) {
        let mut owners = self.owners.write_locked();
        if let Some(set) = owners.get_mut(id) {
            set.remove(&(namespace.to_string(), pod.to_string()));
            if set.is_empty() {
                owners.remove(id);
                // Under the owners' lock: a pod arriving meanwhile with `id` finds it fetched anew.
                self.certs.write_locked().remove(id);
                self.save();
            }
        }
    }

    /// The current certificate of `id`, fetching it if this node has none yet.
    pub async fn get(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, IdentityError> {
        if let Some(c) = self.cached(id) {
            return Ok(c);
        }
        // Boxed: the fetch's future is large, and callers on every request's path hold this one.
        Box::pin(self.first_fetch(id)).await
    }

    async fn first_fetch(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, IdentityError> {
        // One fetch per identity at a time: a burst of first connections makes one CSR.
        let lock = self
            .fetching
            .lock()
            .await
            .entry(id.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if let Some(c) = self.cached(id) {
            return Ok(c);
        }
        // The controller may be restarting: retry briefly with backoff before failing the
        // connection that is waiting (rotation keeps retrying for longer in the background).
        let deadline = tokio::time::Instant::now() + FIRST_FETCH_PATIENCE;
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.fetch(id).await {
                Ok(cert) => {
                    self.stats.fetched.fetch_add(1, Relaxed);
                    return Ok(cert);
                }
                Err(IdentityError::Unreachable(_))
                    if tokio::time::Instant::now() + backoff < deadline =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn fetch(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, IdentityError> {
        let owner = self
            .owners
            .read_locked()
            .get(id)
            .and_then(|s| s.iter().next().cloned())
            .ok_or_else(|| IdentityError::NoOwner(id.clone()))?;
        let key = rcgen::KeyPair::generate().map_err(IdentityError::Key)?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(IdentityError::Key)?;
        let mut req = tonic::Request::new(SignWorkloadRequest {
            namespace: owner.0.clone(),
            pod: owner.1.clone(),
            csr_pem: csr,
            ttl_seconds: self.cfg.ttl.as_secs().min(u32::MAX as u64) as u32,
        });
        self.authorize(&mut req)?;
        let resp = self
            .client
            .clone()
            .sign_workload(req)
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
                    IdentityError::Unreachable(s.message().to_string())
                }
                _ => IdentityError::Refused(format!("{:?}: {}", s.code(), s.message())),
            });
        let resp = match resp {
            Ok(r) => r.into_inner(),
            Err(e) => {
                self.stats.failures.fetch_add(1, Relaxed);
                return Err(e);
            }
        };
        if resp.spiffe_id != id.to_string() {
            self.stats.failures.fetch_add(1, Relaxed);
            return Err(IdentityError::WrongIdentity {
                wanted: id.clone(),
                got: resp.spiffe_id,
            });
        }
        let chain = resp
            .cert_chain_pem
            .iter()
            .flat_map(|p| CertificateDer::pem_slice_iter(p.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| IdentityError::BadAnswer(tls::TlsError::Parse))?;
        if let Some(bundle) = resp.trust_bundle.filter(|b| !b.roots_pem.is_empty()) {
            let store = tls::root_store(&bundle.roots_pem).map_err(IdentityError::BadAnswer)?;
            *self.roots.write_locked() = Arc::new(store);
        }
        let at = |s: i64| UNIX_EPOCH + Duration::from_secs(s.max(0) as u64);
        let cert = WorkloadCert::new(
            id.clone(),
            chain,
            PrivatePkcs8KeyDer::from(key.serialize_der()),
            at(resp.not_before_unix),
            at(resp.not_after_unix),
            SystemTime::now(),
        )
        .map_err(|e| IdentityError::BadAnswer(tls::TlsError::Config(e)))?;
        let cert = Arc::new(cert);
        info!(identity = %id, valid_for = ?cert.not_after.duration_since(SystemTime::now()).unwrap_or_default(), "workload certificate issued");
        self.certs.write_locked().insert(id.clone(), cert.clone());
        self.save();
        Ok(cert)
    }

    /// The certificates held changed: [`Identities::keep_saved`] writes them.
    fn save(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Writes the certificates held to the state directory after each change, for the next
    /// generation (see [`saved`]). Off the runtime's threads, and one write for a burst of
    /// changes: with 100 identities a write takes about 0.7 ms, and certificates issued together
    /// rotate together. Best effort: a proxy that cannot write its state directory still serves,
    /// and says so.
    pub async fn keep_saved(self: Arc<Self>) {
        let mut changed = self.changes.subscribe();
        // Changes made before this task ran count too. The first write also takes out what the
        // restore skipped.
        changed.mark_changed();
        while changed.changed().await.is_ok() {
            let this = self.clone();
            let written = tokio::task::spawn_blocking(move || {
                let certs: Vec<Arc<WorkloadCert>> =
                    this.certs.read_locked().values().cloned().collect();
                saved::save(&this.saved, certs.iter().map(|c| &**c))
            })
            .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(path = %self.saved.display(), error = %e, "cannot keep certificates for the next start")
                }
                Err(e) => warn!(error = %e, "keeping certificates failed"),
            }
        }
    }

    /// Drops the certificates no pod of this node carries (restored ones nobody claimed).
    fn drop_unclaimed(&self) {
        let dropped: Vec<SpiffeId> = {
            let owners = self.owners.read_locked();
            let mut certs = self.certs.write_locked();
            let dropped = certs
                .keys()
                .filter(|id| !owners.contains_key(*id))
                .cloned()
                .collect::<Vec<_>>();
            for id in &dropped {
                certs.remove(id);
            }
            dropped
        };
        if !dropped.is_empty() {
            info!(identities = ?dropped.iter().map(|i| i.as_str()).collect::<Vec<_>>(), "dropped certificates no pod of this node carries");
            self.save();
        }
    }

    /// Serves what an earlier generation of this node saved, until each is due for rotation.
    fn restore(&self) {
        let loaded = saved::load(
            &self.saved,
            &self.roots(),
            &self.cfg.trust_domain,
            SystemTime::now(),
        );
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %mesh_api::placement::error_chain(&e), "not serving saved certificates");
                return;
            }
        };
        for (identity, why) in &loaded.skipped {
            warn!(%identity, reason = %mesh_api::placement::error_chain(why), "a saved certificate is not served");
        }
        let mut certs = self.certs.write_locked();
        for c in loaded.certs {
            info!(identity = %c.id, valid_for = ?c.not_after.duration_since(SystemTime::now()).unwrap_or_default(), "serving a saved certificate");
            certs.insert(c.id.clone(), Arc::new(c));
            self.stats.restored.fetch_add(1, Relaxed);
        }
    }

    /// Rotates certificates past half-life; a failed rotation is retried with backoff while the
    /// old certificate keeps serving until it expires.
    pub async fn rotate_forever(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(200);
        let mut claims_due = Some(tokio::time::Instant::now() + CLAIM_GRACE);
        loop {
            if claims_due.is_some_and(|at| tokio::time::Instant::now() >= at) {
                claims_due = None;
                self.drop_unclaimed();
            }
            let due: Vec<SpiffeId> = {
                let now = SystemTime::now();
                let owners = self.owners.read_locked();
                self.certs
                    .read_locked()
                    .values()
                    .filter(|c| c.due(now) && owners.contains_key(&c.id))
                    .map(|c| c.id.clone())
                    .collect()
            };
            let mut failed = false;
            for id in due {
                match self.fetch(&id).await {
                    Ok(_) => {
                        self.stats.rotations.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        failed = true;
                        warn!(identity = %id, error = %mesh_api::placement::error_chain(&e), retry_in = ?backoff, "certificate rotation failed");
                    }
                }
            }
            if failed {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            } else {
                backoff = Duration::from_millis(200);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }

    pub fn status(&self) -> Vec<CertStatus> {
        let now = SystemTime::now();
        self.certs
            .read_locked()
            .values()
            .map(|c| CertStatus {
                identity: c.id.to_string(),
                expires_in_seconds: match c.not_after.duration_since(now) {
                    Ok(d) => d.as_secs() as i64,
                    Err(e) => -(e.duration().as_secs() as i64),
                },
            })
            .collect()
    }
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("node", &self.cfg.node)
            .finish_non_exhaustive()
    }
}

impl tls::CertLookup for Identities {
    fn certified_key(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        self.cached(id).map(|c| c.certified.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_life_counts_from_receipt_not_from_the_backdated_start() {
        let now = SystemTime::now();
        let cert = |received: SystemTime, ttl: u64| WorkloadCert {
            id: "spiffe://td/ns/a/sa/b".parse().unwrap(),
            chain: Vec::new(),
            key: PrivatePkcs8KeyDer::from(Vec::new()),
            certified: Arc::new(CertifiedKey::new(
                Vec::new(),
                rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
                    PrivatePkcs8KeyDer::from(rcgen::KeyPair::generate().unwrap().serialize_der()),
                ))
                .unwrap(),
            )),
            not_before: received - Duration::from_secs(60),
            not_after: received + Duration::from_secs(ttl),
            received,
        };
        assert!(!cert(now, 6).due(now), "a fresh 6 s certificate is not due");
        assert!(!cert(now, 6).due(now + Duration::from_millis(2900)));
        assert!(cert(now, 6).due(now + Duration::from_millis(3000)));
        assert!(cert(now - Duration::from_secs(13), 24).due(now));
    }
}
