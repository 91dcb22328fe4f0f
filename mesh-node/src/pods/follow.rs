//! Enrollment that follows the controller's configuration.
//!
//! Two facts decide whether a pod is redirected: the node must know the pod's network namespace
//! (registered through the enrollment API by the CNI hook, or the test harness, when the sandbox
//! is created: the same split as istio-cni and ztunnel), and the configuration must say the pod is
//! in the mesh (namespace joined, pod not opted out, pod ready). The pod is enrolled while both
//! hold, and unenrolled as soon as either stops.
use mesh_api::sync::LockExt;
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    config::node::NodeConfig,
    pods::enroll::{EnrollError, EnrollRequest, Enrollment, PodName},
};

/// A registered pod sandbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sandbox {
    pub netns: PathBuf,
    pub service_account: String,
    /// The namespace's cookie when it was registered (0 in state files from before it was kept:
    /// such a sandbox counts as gone once its path no longer opens).
    #[serde(default)]
    pub netns_cookie: u64,
}

pub struct Follow {
    pods: Arc<Enrollment>,
    config: watch::Receiver<Arc<NodeConfig>>,
    sandboxes: Mutex<BTreeMap<PodName, Sandbox>>,
    /// Kept across restarts, so enrollment resumes without the CNI hook calling again.
    state: PathBuf,
}

/// What registering a sandbox did.
#[derive(Debug, Serialize)]
pub struct Registered {
    pub pod: PodName,
    /// Whether the configuration has the pod in the mesh, so it is redirected now.
    pub enrolled: bool,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    pod: PodName,
    #[serde(flatten)]
    sandbox: Sandbox,
}

impl Follow {
    pub fn new(
        pods: Arc<Enrollment>,
        config: watch::Receiver<Arc<NodeConfig>>,
        state_dir: &std::path::Path,
    ) -> Arc<Self> {
        let state = state_dir.join("sandboxes.json");
        let mut sandboxes: BTreeMap<PodName, Sandbox> = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<Entry>>(&b).ok())
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.pod, e.sandbox))
            .collect();
        // Pods enrolled before a restart are sandboxes we know.
        for p in pods.list() {
            sandboxes.entry(p.name.clone()).or_insert(Sandbox {
                netns: p.netns.clone(),
                service_account: p.service_account.clone(),
                netns_cookie: p.netns_cookie,
            });
        }
        Arc::new(Self {
            pods,
            config,
            sandboxes: Mutex::new(sandboxes),
            state,
        })
    }

    /// Records the sandbox of `pod` and enrolls it if the configuration says so.
    pub fn register(&self, pod: PodName, req: EnrollRequest) -> Result<Registered, EnrollError> {
        let cookie =
            crate::sys::netns_cookie_of(&req.netns).map_err(|source| EnrollError::Netns {
                path: req.netns.clone(),
                source,
            })?;
        if let Some(old) = self.sandbox(&pod) {
            let old_cookie = match old.netns_cookie {
                0 => crate::sys::netns_cookie_of(&old.netns).unwrap_or(0),
                c => c,
            };
            self.pods
                .check_move(&pod, (&old.netns, old_cookie), (&req.netns, cookie))?;
        }
        let sandbox = Sandbox {
            netns: req.netns,
            service_account: req.service_account,
            netns_cookie: cookie,
        };
        let wanted = self.wanted(&pod);
        if wanted {
            // Errors (a namespace that does not exist, ...) reach the caller.
            self.pods.enroll(
                pod.clone(),
                EnrollRequest {
                    netns: sandbox.netns.clone(),
                    service_account: sandbox.service_account.clone(),
                },
            )?;
        }
        self.sandboxes.locked().insert(pod.clone(), sandbox);
        self.persist();
        Ok(Registered {
            pod,
            enrolled: wanted,
        })
    }

    /// The registered sandbox of `pod`.
    pub fn sandbox(&self, pod: &PodName) -> Option<Sandbox> {
        self.sandboxes.locked().get(pod).cloned()
    }

    /// Every pod with a registered sandbox.
    pub fn registered(&self) -> Vec<PodName> {
        self.sandboxes.locked().keys().cloned().collect()
    }

    /// Forgets the sandbox of `pod` (deleted) and stops redirecting it.
    pub fn unregister(&self, pod: &PodName) -> Result<(), EnrollError> {
        let known = self.sandboxes.locked().remove(pod).is_some();
        self.persist();
        match self.pods.unenroll(pod) {
            Ok(_) => Ok(()),
            Err(EnrollError::NotFound(_)) if known => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn wanted(&self, pod: &PodName) -> bool {
        self.config.borrow().wants(&pod.namespace, &pod.name)
    }

    fn persist(&self) {
        let entries: Vec<Entry> = self
            .sandboxes
            .locked()
            .iter()
            .map(|(pod, sandbox)| Entry {
                pod: pod.clone(),
                sandbox: sandbox.clone(),
            })
            .collect();
        let write = serde_json::to_vec_pretty(&entries)
            .map_err(std::io::Error::other)
            .and_then(|b| {
                let tmp = self.state.with_extension("tmp");
                std::fs::write(&tmp, b)?;
                std::fs::rename(&tmp, &self.state)
            });
        if let Err(e) = write {
            warn!(path = %self.state.display(), error = %e, "cannot save sandboxes");
        }
    }

    /// Makes enrollment match the configuration. Before the first configuration (version 0)
    /// nothing changes: enrollment restored from the state file stays, so pods keep failing
    /// closed through the proxy instead of leaving the mesh while the controller is away.
    pub fn reconcile(&self) {
        let config = self.config.borrow().clone();
        if config.version == 0 {
            return;
        }
        let sandboxes = self.sandboxes.locked().clone();
        for (pod, sandbox) in &sandboxes {
            let wanted = config.wants(&pod.namespace, &pod.name);
            let enrolled = self.pods.is_enrolled(&pod.namespace, &pod.name);
            let result = if wanted && !enrolled {
                info!(%pod, version = config.version, "joining the mesh");
                self.pods
                    .enroll(
                        pod.clone(),
                        EnrollRequest {
                            netns: sandbox.netns.clone(),
                            service_account: sandbox.service_account.clone(),
                        },
                    )
                    .map(drop)
            } else if !wanted && enrolled {
                info!(%pod, version = config.version, "leaving the mesh");
                self.pods.unenroll(pod).map(drop)
            } else {
                Ok(())
            };
            if let Err(e) = result {
                warn!(%pod, error = %mesh_api::placement::error_chain(&e), "enrollment change failed; retried on the next configuration");
            }
        }
        if let Err(e) = self.pods.refresh_flags() {
            warn!(error = %mesh_api::placement::error_chain(&e), "updating inbound modes failed");
        }
    }

    /// Reconciles on every configuration change.
    pub async fn run(self: Arc<Self>) {
        let mut config = self.config.clone();
        loop {
            let this = self.clone();
            // Enrolling enters network namespaces: off the reactor.
            let _ = tokio::task::spawn_blocking(move || this.reconcile()).await;
            if config.changed().await.is_err() {
                return;
            }
        }
    }
}
