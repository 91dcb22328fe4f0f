//! Which pods of this node are in the mesh.
//!
//! The kernel's enrollment map (netns cookie -> pod id) decides redirection; this module keeps the
//! names behind the ids and a state file, so a restarted proxy can still say which pod opened a
//! connection without anyone re-enrolling.
use mesh_api::sync::RwLockExt;
use std::{
    collections::{BTreeMap, HashMap},
    fs, io,
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use serde::{Deserialize, Serialize};

use crate::{
    kernel::ebpf::{EbpfError, PodFlags, Redirector},
    kernel::orig_dst::PodId,
    sys,
};

/// A pod as the enrollment API names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
}

impl mesh_api::pair::Pair for PodName {
    fn pair(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl<'a> std::borrow::Borrow<dyn mesh_api::pair::Pair + 'a> for PodName {
    fn borrow(&self) -> &(dyn mesh_api::pair::Pair + 'a) {
        self
    }
}

impl std::fmt::Display for PodName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An enrolled pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub id: PodId,
    #[serde(flatten)]
    pub name: PodName,
    pub service_account: String,
    /// The namespace file it was enrolled with (`/proc/PID/ns/net`, `/run/netns/NAME`).
    pub netns: PathBuf,
    pub netns_cookie: u64,
}

/// Body of an enrollment request.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub netns: PathBuf,
    #[serde(default = "default_sa")]
    pub service_account: String,
}

fn default_sa() -> String {
    "default".into()
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("cannot read network namespace {path}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is the node proxy's own network namespace: enrolling it would capture the node"
    )]
    ProxyNamespace { path: PathBuf },
    #[error("network namespace {path} is already enrolled as {other}")]
    Conflict { path: PathBuf, other: PodName },
    #[error(
        "pod {pod} is enrolled with network namespace {current}, which still exists: a pod's registration cannot move to another namespace while its sandbox lives"
    )]
    Repoint { pod: PodName, current: PathBuf },
    #[error("pod {0} is not enrolled")]
    NotFound(PodName),
    #[error("updating the kernel enrollment map failed")]
    Kernel(#[source] EbpfError),
    #[error("cannot write enrollment state {path}")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Default, Serialize, Deserialize)]
struct State {
    next_id: u32,
    pods: BTreeMap<PodId, Pod>,
    /// Pods by name: the per-connection delivery checks look pods up this way.
    #[serde(skip)]
    by_name: HashMap<PodName, PodId>,
}

impl State {
    fn by_name(&self, name: &PodName) -> Option<&Pod> {
        self.by_name.get(name).and_then(|id| self.pods.get(id))
    }

    fn insert(&mut self, pod: Pod) {
        self.by_name.insert(pod.name.clone(), pod.id);
        self.pods.insert(pod.id, pod);
    }

    fn remove(&mut self, pod: &Pod) {
        self.by_name.remove(&pod.name);
        self.pods.remove(&pod.id);
    }
}

/// Told about every enrollment change (e.g. to fetch the pod's certificate ahead of use).
pub trait EnrollHooks: Send + Sync {
    fn enrolled(&self, pod: &Pod);
    fn unenrolled(&self, pod: &Pod);
    /// Kernel flags the pod should carry, e.g. inbound STRICT.
    fn flags(&self, _pod: &PodName) -> PodFlags {
        PodFlags::default()
    }
    /// The configuration changed while `pod` stays enrolled (e.g. its identity became known).
    fn refreshed(&self, _pod: &Pod) {}
}

pub struct Enrollment {
    hooks: Option<Arc<dyn EnrollHooks>>,
    /// Registrations refused because they would move a live pod to another namespace.
    repoints_refused: AtomicU64,
    state: RwLock<State>,
    file: PathBuf,
    redirector: Arc<Redirector>,
    own_netns_cookie: u64,
}

/// Kubernetes object names: DNS-1123 labels, which also keeps them path- and log-safe.
fn check_name(field: &'static str, v: &str) -> Result<(), EnrollError> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(EnrollError::Invalid {
            field,
            reason: format!(
                "{v:?} is not a DNS-1123 label (lowercase letters, digits, '-', at most 63)"
            ),
        })
    }
}

impl Enrollment {
    /// Opens the state in `state_dir` and reconciles it with the kernel map (which survives
    /// restarts and is the truth about redirection).
    pub fn open(
        state_dir: &Path,
        redirector: Arc<Redirector>,
        hooks: Option<Arc<dyn EnrollHooks>>,
    ) -> Result<Self, EnrollError> {
        let file = state_dir.join("pods.json");
        let state_err = |source| EnrollError::State {
            path: file.clone(),
            source,
        };
        fs::create_dir_all(state_dir).map_err(state_err)?;
        let mut state: State = match fs::read(&file) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| state_err(io::Error::other(e)))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(state_err(e)),
        };
        let in_kernel: BTreeMap<u64, PodId> = redirector.enrolled().into_iter().collect();
        state.pods.retain(|id, pod| {
            let keep = in_kernel.get(&pod.netns_cookie) == Some(id);
            if !keep {
                tracing::warn!(pod = %pod.name, "state file names a pod the kernel no longer redirects; dropping it");
            }
            keep
        });
        for (cookie, id) in &in_kernel {
            if !state.pods.contains_key(id) {
                tracing::warn!(netns_cookie = cookie, pod = %id,
                    "kernel redirects a namespace with no recorded name; its connections will be refused until it is enrolled again");
            }
        }
        state.by_name = state
            .pods
            .values()
            .map(|p| (p.name.clone(), p.id))
            .collect();
        let max_id = in_kernel.values().map(|p| p.0).max().unwrap_or(0);
        state.next_id = state.next_id.max(max_id + 1).max(1);
        let own_netns_cookie = sys::own_netns_cookie().map_err(|source| EnrollError::Netns {
            path: "/proc/self/ns/net".into(),
            source,
        })?;
        if let Some(h) = &hooks {
            for pod in state.pods.values() {
                h.enrolled(pod);
            }
        }
        let this = Self {
            repoints_refused: AtomicU64::new(0),
            hooks,
            state: RwLock::new(state),
            file,
            redirector,
            own_netns_cookie,
        };
        this.persist(&this.state.read_locked())?;
        Ok(this)
    }

    /// Enrolls (or re-enrolls, e.g. after a pod restart) `name` with the namespace in `req`.
    pub fn enroll(&self, name: PodName, req: EnrollRequest) -> Result<Pod, EnrollError> {
        check_name("namespace", &name.namespace)?;
        check_name("name", &name.name)?;
        check_name("service_account", &req.service_account)?;
        let cookie = sys::netns_cookie_of(&req.netns).map_err(|source| EnrollError::Netns {
            path: req.netns.clone(),
            source,
        })?;
        if cookie == self.own_netns_cookie {
            return Err(EnrollError::ProxyNamespace { path: req.netns });
        }
        let mut state = self.state.write_locked();
        if let Some(other) = state
            .pods
            .values()
            .find(|p| p.netns_cookie == cookie && p.name != name)
        {
            return Err(EnrollError::Conflict {
                path: req.netns,
                other: other.name.clone(),
            });
        }
        let previous = state.by_name(&name).cloned();
        if let Some(p) = &previous {
            self.check_move(&name, (&p.netns, p.netns_cookie), (&req.netns, cookie))?;
        }
        let id = match &previous {
            Some(p) => p.id,
            None => {
                let id = PodId(state.next_id);
                state.next_id += 1;
                id
            }
        };
        let flags = self
            .hooks
            .as_ref()
            .map(|h| h.flags(&name))
            .unwrap_or_default();
        self.redirector
            .enroll(cookie, id, &flags)
            .map_err(EnrollError::Kernel)?;
        if let Some(p) = previous.filter(|p| p.netns_cookie != cookie) {
            self.redirector
                .unenroll(p.netns_cookie)
                .map_err(EnrollError::Kernel)?;
        }
        let pod = Pod {
            id,
            name,
            service_account: req.service_account,
            netns: req.netns,
            netns_cookie: cookie,
        };
        state.insert(pod.clone());
        self.persist(&state)?;
        if let Some(h) = &self.hooks {
            h.enrolled(&pod);
        }
        tracing::info!(pod = %pod.name, id = %pod.id, netns_cookie = cookie, "pod enrolled");
        Ok(pod)
    }

    /// Moving a pod's registration moves its identity: only a new sandbox may take it over, that
    /// is when the namespace it was registered with is gone (or its path now names another
    /// namespace). Anything else is refused and counted: whoever asks cannot borrow a live pod's
    /// identity for their own namespace.
    pub fn check_move(
        &self,
        pod: &PodName,
        (current, current_cookie): (&Path, u64),
        (asked, asked_cookie): (&Path, u64),
    ) -> Result<(), EnrollError> {
        if current_cookie == asked_cookie
            || sys::netns_cookie_of(current).ok() != Some(current_cookie)
        {
            return Ok(());
        }
        self.repoints_refused.fetch_add(1, Relaxed);
        tracing::warn!(%pod, current = %current.display(), asked = %asked.display(), "refused to move a live pod's registration to another network namespace");
        Err(EnrollError::Repoint {
            pod: pod.clone(),
            current: current.to_path_buf(),
        })
    }

    /// Registrations refused because they would have moved a live pod's identity.
    pub fn repoints_refused(&self) -> u64 {
        self.repoints_refused.load(Relaxed)
    }

    /// Stops redirecting `name`'s new connections.
    pub fn unenroll(&self, name: &PodName) -> Result<Pod, EnrollError> {
        let mut state = self.state.write_locked();
        let pod = state
            .by_name(name)
            .cloned()
            .ok_or_else(|| EnrollError::NotFound(name.clone()))?;
        self.redirector
            .unenroll(pod.netns_cookie)
            .map_err(EnrollError::Kernel)?;
        self.redirector
            .set_port_flags(pod.id, &[])
            .map_err(EnrollError::Kernel)?;
        state.remove(&pod);
        self.persist(&state)?;
        if let Some(h) = &self.hooks {
            h.unenrolled(&pod);
        }
        tracing::info!(pod = %pod.name, id = %pod.id, "pod unenrolled");
        Ok(pod)
    }

    /// Re-applies every enrolled pod's flags (after the policy behind them changed).
    pub fn refresh_flags(&self) -> Result<(), EnrollError> {
        let Some(hooks) = &self.hooks else {
            return Ok(());
        };
        let state = self.state.read_locked();
        for pod in state.pods.values() {
            self.redirector
                .enroll(pod.netns_cookie, pod.id, &hooks.flags(&pod.name))
                .map_err(EnrollError::Kernel)?;
            hooks.refreshed(pod);
        }
        Ok(())
    }

    pub fn is_enrolled(&self, namespace: &str, name: &str) -> bool {
        let key = mesh_api::pair::key(namespace, name);
        self.state
            .read_locked()
            .by_name
            .contains_key(&key as &dyn mesh_api::pair::Pair)
    }

    pub fn list(&self) -> Vec<Pod> {
        self.state.read_locked().pods.values().cloned().collect()
    }

    /// The pod behind a kernel pod id, if it is (still) enrolled with that namespace.
    pub fn resolve(&self, id: PodId, netns_cookie: u64) -> Option<Pod> {
        let state = self.state.read_locked();
        state
            .pods
            .get(&id)
            .filter(|p| p.netns_cookie == netns_cookie)
            .cloned()
    }

    /// Written to a temporary file and renamed, so a crash never leaves half a state file.
    fn persist(&self, state: &State) -> Result<(), EnrollError> {
        let tmp = self.file.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(state).expect("state serialises");
        fs::write(&tmp, bytes)
            .and_then(|()| fs::rename(&tmp, &self.file))
            .map_err(|source| EnrollError::State {
                path: self.file.clone(),
                source,
            })
    }
}

/// Removes a node's enrollment state (with `ebpf::detach`, the uninstall path).
pub fn remove_state(state_dir: &Path) -> io::Result<()> {
    match fs::remove_file(state_dir.join("pods.json")) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // Only if nothing else lives there.
    let _ = fs::remove_dir(state_dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_dns_labels() {
        for good in ["a", "web-1", "x".repeat(63).as_str()] {
            check_name("name", good).unwrap();
        }
        for bad in ["", "A", "-a", "a-", "a_b", "a/b", "a.b", &"x".repeat(64)] {
            let e = check_name("name", bad).unwrap_err();
            assert!(
                matches!(e, EnrollError::Invalid { field: "name", .. }),
                "{bad:?}"
            );
        }
    }
}
