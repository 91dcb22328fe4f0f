//! Where workloads run, in local mode: which pods are on which node, with which service account and
//! addresses, and where each node's proxy receives tunnels. The cluster-in-a-box harness and the
//! demo write this file; mesh-ctrl uses it to decide which node may obtain which identity, and
//! mesh-node to find a destination's node and expected identity. (In cluster mode the same facts
//! come from Kubernetes and reach nodes in config snapshots.)
use crate::sync::RwLockExt;
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::Path,
};

use serde::{Deserialize, Serialize};

use crate::identity::{IdentityError, SpiffeId, is_dns_label};

/// Port on which every node proxy accepts tunnels (HBONE).
pub const HBONE_PORT: u16 = 15008;

/// The file as written.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementFile {
    pub trust_domain: String,
    pub nodes: Vec<NodeEntry>,
    pub pods: Vec<PodEntry>,
    /// Inbound modes per namespace or pod (local mode's stand-in for a PeerAuthentication).
    #[serde(default)]
    pub peer_authentication: Vec<PeerAuthEntry>,
}

/// Whether an enrolled pod accepts plaintext connections from outside the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum InboundMode {
    /// Only connections through the mesh; plaintext from outside is dropped.
    Strict,
    /// Plaintext from outside the mesh is accepted and counted as such.
    #[default]
    Permissive,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAuthEntry {
    pub namespace: String,
    /// One pod of the namespace; absent: the whole namespace.
    #[serde(default)]
    pub pod: Option<String>,
    pub mode: InboundMode,
    /// Ports whose mode differs (a PeerAuthentication's `portLevelMtls`), e.g. a PERMISSIVE port
    /// for kubelet's probes on a STRICT pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u16, InboundMode>,
}

/// A pod's inbound modes: its own, and per port where one differs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InboundModes {
    pub mode: InboundMode,
    pub ports: BTreeMap<u16, InboundMode>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    pub name: String,
    /// Addresses where the node proxy accepts tunnels (on [`HBONE_PORT`]).
    pub addresses: Vec<IpAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodEntry {
    pub namespace: String,
    pub name: String,
    pub node: String,
    #[serde(default = "default_sa")]
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Not ready pods are not enrolled and not service endpoints.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub ready: bool,
    /// The pod's UID (cluster mode): how its node proxy finds the pod's cgroup.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn default_sa() -> String {
    "default".into()
}

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid placement JSON")]
    Json(#[source] serde_json::Error),
    #[error("pods[{index}] ({pod}): {reason}")]
    Pod {
        index: usize,
        pod: String,
        reason: String,
    },
    #[error("nodes[{index}]: {reason}")]
    Node { index: usize, reason: String },
    #[error("peer_authentication[{index}]: {reason}")]
    PeerAuth { index: usize, reason: String },
    #[error("pods[{index}] ({pod}): identity")]
    Identity {
        index: usize,
        pod: String,
        #[source]
        source: IdentityError,
    },
}

/// A pod as the mesh sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub identity: SpiffeId,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    /// Empty in local mode.
    pub uid: String,
}

/// Validated placement, indexed for the lookups the mesh makes.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    pub trust_domain: String,
    nodes: BTreeMap<String, Vec<IpAddr>>,
    pods: BTreeMap<(String, String), Workload>,
    by_ip: HashMap<IpAddr, (String, String)>,
    modes: HashMap<(String, Option<String>), InboundModes>,
}

impl Placement {
    pub fn load(path: &Path) -> Result<Self, PlacementError> {
        let bytes = std::fs::read(path).map_err(|source| PlacementError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&bytes)
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, PlacementError> {
        let file: PlacementFile = serde_json::from_slice(bytes).map_err(PlacementError::Json)?;
        Self::try_from(file)
    }

    /// Every node and its tunnel addresses.
    pub fn nodes(&self) -> impl Iterator<Item = (&str, &[IpAddr])> {
        self.nodes.iter().map(|(n, a)| (n.as_str(), a.as_slice()))
    }

    /// The workload that owns `ip`.
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).and_then(|k| self.pods.get(k))
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.pods
            .get(&crate::pair::key(namespace, name) as &dyn crate::pair::Pair)
    }

    /// Where `node`'s proxy accepts tunnels, preferring the family of `like`.
    pub fn tunnel_addr(&self, node: &str, like: IpAddr) -> Option<SocketAddr> {
        let addrs = self.nodes.get(node)?;
        addrs
            .iter()
            .find(|a| a.is_ipv4() == like.is_ipv4())
            .or_else(|| addrs.first())
            .map(|ip| SocketAddr::new(*ip, HBONE_PORT))
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.pods.values()
    }

    /// The pod's inbound mode: its own setting, else its namespace's, else PERMISSIVE.
    pub fn inbound_mode(&self, namespace: &str, pod: &str) -> InboundMode {
        self.modes_of(namespace, pod)
            .map(|m| m.mode)
            .unwrap_or_default()
    }

    /// The pod's inbound modes, port exceptions included, from the same setting as
    /// [`Self::inbound_mode`].
    pub fn inbound_modes(&self, namespace: &str, pod: &str) -> InboundModes {
        self.modes_of(namespace, pod).cloned().unwrap_or_default()
    }

    fn modes_of(&self, namespace: &str, pod: &str) -> Option<&InboundModes> {
        let ns = namespace.to_string();
        self.modes
            .get(&(ns.clone(), Some(pod.to_string())))
            .or_else(|| self.modes.get(&(ns, None)))
    }
}

impl TryFrom<PlacementFile> for Placement {
    type Error = PlacementError;

    fn try_from(file: PlacementFile) -> Result<Self, PlacementError> {
        let mut nodes = BTreeMap::new();
        for (index, n) in file.nodes.into_iter().enumerate() {
            if n.addresses.is_empty() {
                return Err(PlacementError::Node {
                    index,
                    reason: format!("node {} has no address", n.name),
                });
            }
            if nodes.insert(n.name.clone(), n.addresses).is_some() {
                return Err(PlacementError::Node {
                    index,
                    reason: format!("node {} listed twice", n.name),
                });
            }
        }
        let mut pods = BTreeMap::new();
        let mut by_ip = HashMap::new();
        for (index, p) in file.pods.into_iter().enumerate() {
            let pod = format!("{}/{}", p.namespace, p.name);
            let bad = |reason: String| PlacementError::Pod {
                index,
                pod: pod.clone(),
                reason,
            };
            if !is_dns_label(&p.name) {
                return Err(bad("name is not a DNS-1123 label".into()));
            }
            if !nodes.contains_key(&p.node) {
                return Err(bad(format!("node {:?} is not in nodes", p.node)));
            }
            let identity = SpiffeId::new(&file.trust_domain, &p.namespace, &p.service_account)
                .map_err(|source| PlacementError::Identity {
                    index,
                    pod: pod.clone(),
                    source,
                })?;
            let key = (p.namespace.clone(), p.name.clone());
            for ip in &p.ips {
                if let Some(other) = by_ip.insert(*ip, key.clone()) {
                    return Err(bad(format!("ip {ip} is also {}/{}", other.0, other.1)));
                }
            }
            let w = Workload {
                namespace: p.namespace,
                name: p.name,
                node: p.node,
                identity,
                ips: p.ips,
                labels: p.labels,
                ready: p.ready,
                uid: p.uid,
            };
            if pods.insert(key, w).is_some() {
                return Err(bad("listed twice".into()));
            }
        }
        let mut modes = HashMap::new();
        for (index, e) in file.peer_authentication.into_iter().enumerate() {
            if e.ports.contains_key(&0) {
                return Err(PlacementError::PeerAuth {
                    index,
                    reason: "port 0 cannot have a mode".into(),
                });
            }
            let key = (e.namespace.clone(), e.pod.clone());
            let m = InboundModes {
                mode: e.mode,
                ports: e.ports,
            };
            if modes.insert(key, m).is_some() {
                let what = format!(
                    "{}{}",
                    e.namespace,
                    e.pod.map(|p| format!("/{p}")).unwrap_or_default()
                );
                return Err(PlacementError::PeerAuth {
                    index,
                    reason: format!("{what} is set twice"),
                });
            }
        }
        Ok(Self {
            trust_domain: file.trust_domain,
            nodes,
            pods,
            by_ip,
            modes,
        })
    }
}

/// The placement file, reloaded when it changes. A file that fails validation is logged and
/// ignored: the last good placement keeps serving.
#[derive(Clone)]
pub struct PlacementWatch {
    current: std::sync::Arc<std::sync::RwLock<std::sync::Arc<Placement>>>,
}

impl PlacementWatch {
    /// Loads `path` (which must be valid now) and re-reads it whenever its mtime changes.
    pub fn spawn(
        path: std::path::PathBuf,
        every: std::time::Duration,
    ) -> Result<Self, PlacementError> {
        let initial = Placement::load(&path)?;
        let this = Self {
            current: std::sync::Arc::new(std::sync::RwLock::new(std::sync::Arc::new(initial))),
        };
        let watch = this.clone();
        tokio::spawn(async move {
            let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let mut seen = mtime(&path);
            loop {
                tokio::time::sleep(every).await;
                let now = mtime(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                match Placement::load(&path) {
                    Ok(p) => {
                        tracing::info!(path = %path.display(), pods = p.pods.len(), "placement reloaded");
                        *watch.current.write_locked() = std::sync::Arc::new(p);
                    }
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %error_chain(&e), "placement rejected; keeping the last good one")
                    }
                }
            }
        });
        Ok(this)
    }

    /// A fixed placement (tests, and callers that manage updates themselves).
    pub fn fixed(p: Placement) -> Self {
        Self {
            current: std::sync::Arc::new(std::sync::RwLock::new(std::sync::Arc::new(p))),
        }
    }

    /// Replaces the placement (config snapshots from the controller).
    pub fn set(&self, p: Placement) {
        *self.current.write_locked() = std::sync::Arc::new(p);
    }

    pub fn current(&self) -> std::sync::Arc<Placement> {
        self.current.read_locked().clone()
    }
}

/// `error: cause: cause` on one line, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
        "trust_domain": "cluster.local",
        "nodes": [{"name": "n0", "addresses": ["10.0.0.1", "fd00::1"]}, {"name": "n1", "addresses": ["10.0.0.2"]}],
        "pods": [
            {"namespace": "default", "name": "web", "node": "n1", "service_account": "web", "ips": ["10.1.0.2"]},
            {"namespace": "default", "name": "client", "node": "n0", "ips": ["10.2.0.2", "fd00:2::2"]}
        ]
    }"#;

    #[test]
    fn lookups() {
        let p = Placement::parse(GOOD.as_bytes()).unwrap();
        let web = p.by_ip("10.1.0.2".parse().unwrap()).unwrap();
        assert_eq!(
            web.identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert_eq!(
            p.pod("default", "client")
                .unwrap()
                .identity
                .service_account(),
            "default"
        );
        assert_eq!(
            p.tunnel_addr("n0", "fd00::9".parse().unwrap()),
            Some("[fd00::1]:15008".parse().unwrap())
        );
        assert_eq!(
            p.tunnel_addr("n1", "fd00::9".parse().unwrap()),
            Some("10.0.0.2:15008".parse().unwrap())
        );
        assert!(p.by_ip("10.9.9.9".parse().unwrap()).is_none());
    }

    #[test]
    fn inbound_mode_table() {
        let with = GOOD.replace(
            "\"pods\": [",
            r#""peer_authentication": [
                {"namespace": "default", "mode": "STRICT"},
                {"namespace": "default", "pod": "client", "mode": "PERMISSIVE"},
                {"namespace": "other", "pod": "x", "mode": "STRICT"}
            ], "pods": ["#,
        );
        let p = Placement::parse(with.as_bytes()).unwrap();
        let cases = [
            ("default", "web", InboundMode::Strict), // namespace setting
            ("default", "client", InboundMode::Permissive), // the pod overrides its namespace
            ("other", "x", InboundMode::Strict),     // a pod alone
            ("other", "y", InboundMode::Permissive), // nothing set: PERMISSIVE
            ("elsewhere", "z", InboundMode::Permissive),
        ];
        for (ns, pod, mode) in cases {
            assert_eq!(p.inbound_mode(ns, pod), mode, "{ns}/{pod}");
        }
        let twice = GOOD.replace(
            "\"pods\": [",
            r#""peer_authentication": [{"namespace": "a", "mode": "STRICT"}, {"namespace": "a", "mode": "PERMISSIVE"}], "pods": ["#,
        );
        let e = Placement::parse(twice.as_bytes()).unwrap_err();
        assert_eq!(e.to_string(), "peer_authentication[1]: a is set twice");
    }

    #[test]
    fn errors_name_the_entry() {
        let cases = [
            (
                GOOD.replace("\"node\": \"n1\"", "\"node\": \"n9\""),
                "pods[0] (default/web): node \"n9\" is not in nodes",
            ),
            (
                GOOD.replace("10.2.0.2", "10.1.0.2"),
                "pods[1] (default/client): ip 10.1.0.2 is also default/web",
            ),
            (
                GOOD.replace(
                    "\"service_account\": \"web\"",
                    "\"service_account\": \"Web\"",
                ),
                "pods[0] (default/web): identity",
            ),
            (
                GOOD.replace("\"addresses\": [\"10.0.0.2\"]", "\"addresses\": []"),
                "nodes[1]: node n1 has no address",
            ),
            (GOOD.replace("\"ips\"", "\"ipz\""), "invalid placement JSON"),
        ];
        for (input, expected) in cases {
            let e = Placement::parse(input.as_bytes()).unwrap_err();
            assert!(
                e.to_string().contains(expected),
                "got {e}, expected {expected}"
            );
        }
    }
}
