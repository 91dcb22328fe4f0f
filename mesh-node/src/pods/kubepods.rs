//! Cluster mode: finding each local pod's network namespace from the node's cgroup hierarchy, so
//! no CNI hook has to tell us.
//!
//! The kubelet puts every pod in a cgroup named after its UID, under `kubepods`, by QoS class:
//!
//! | driver   | Guaranteed                              | Burstable / BestEffort                                                   |
//! |----------|-----------------------------------------|--------------------------------------------------------------------------|
//! | systemd  | `kubepods.slice/kubepods-pod<U>.slice`  | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<U>.slice` |
//! | cgroupfs | `kubepods/pod<uid>`                     | `kubepods/burstable/pod<uid>`                                            |
//!
//! (`<U>` is the UID with `-` written `_`.) Containers are cgroups below the pod's; any process
//! in any of them (the sandbox's pause process first, as the runtime starts it first) is in the
//! pod's network namespace, which `/proc/<pid>/ns/net` opens.
//!
//! [`Discovery`] registers each pod the configuration places on this node with `Follow`, which
//! enrolls it while the configuration has it in the mesh: the same path the enrollment API takes.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    config::node::NodeConfig,
    pods::enroll::{EnrollRequest, PodName},
    pods::follow::Follow,
};

const QOS: [&str; 2] = ["burstable", "besteffort"];

/// The pod's cgroup under `root` (the cgroup2 mount), for either cgroup driver.
pub fn pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    if uid.is_empty() || uid.contains(['/', '.']) {
        return None;
    }
    let u = uid.replace('-', "_");
    let mut candidates = vec![
        root.join(format!("kubepods.slice/kubepods-pod{u}.slice")),
        root.join(format!("kubepods/pod{uid}")),
    ];
    for q in QOS {
        candidates.push(root.join(format!(
            "kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{u}.slice"
        )));
        candidates.push(root.join(format!("kubepods/{q}/pod{uid}")));
    }
    candidates.into_iter().find(|p| p.is_dir())
}

/// A process of the pod: the first pid in `cgroup.procs` of the pod's cgroup or, depth first in
/// name order, of a container cgroup below it.
pub fn pod_pid(cgroup: &Path) -> Option<u32> {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    if let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok()) {
        return Some(pid);
    }
    let mut children: Vec<PathBuf> = std::fs::read_dir(cgroup)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    children.sort();
    children.iter().find_map(|c| pod_pid(c))
}

/// Registers this node's pods with `Follow` from the cgroup hierarchy, and forgets pods the
/// configuration no longer places here.
pub struct Discovery {
    pub root: PathBuf,
    /// Where `/proc` is (the host's: the DaemonSet runs with `hostPID`).
    pub proc: PathBuf,
    pub node: String,
    pub follow: Arc<Follow>,
    pub config: watch::Receiver<Arc<NodeConfig>>,
}

impl Discovery {
    /// One pass: every pod of this node with a UID is registered once its cgroup has a process.
    pub fn reconcile(&self) {
        let cfg = self.config.borrow().clone();
        if cfg.version == 0 {
            return;
        }
        let mut here = BTreeSet::new();
        for w in cfg.placement.workloads() {
            if w.node != self.node || w.uid.is_empty() {
                continue;
            }
            let pod = PodName {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
            };
            here.insert(pod.clone());
            if self.follow.sandbox(&pod).is_some_and(|s| s.netns.exists()) {
                continue;
            }
            let Some(cg) = pod_cgroup(&self.root, &w.uid) else {
                debug!(%pod, uid = %w.uid, "no cgroup yet");
                continue;
            };
            let Some(pid) = pod_pid(&cg) else {
                debug!(%pod, cgroup = %cg.display(), "no process yet");
                continue;
            };
            let netns = self.proc.join(pid.to_string()).join("ns/net");
            let req = EnrollRequest {
                netns: netns.clone(),
                service_account: w.identity.service_account().to_string(),
            };
            match self.follow.register(pod.clone(), req) {
                Ok(r) => {
                    info!(%pod, cgroup = %cg.display(), netns = %netns.display(), enrolled = r.enrolled, "found the pod's sandbox")
                }
                Err(e) => {
                    warn!(%pod, error = %mesh_api::placement::error_chain(&e), "cannot register the pod's sandbox; retrying")
                }
            }
        }
        for pod in self.follow.registered() {
            if !here.contains(&pod) {
                info!(%pod, "pod gone from this node");
                if let Err(e) = self.follow.unregister(&pod) {
                    warn!(%pod, error = %mesh_api::placement::error_chain(&e), "cannot forget the pod");
                }
            }
        }
    }

    /// Reconciles on every configuration change and every few seconds (containers start after
    /// the pod is scheduled).
    pub async fn run(self: Arc<Self>) {
        let mut config = self.config.clone();
        loop {
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.reconcile()).await;
            tokio::select! {
                c = config.changed() => if c.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f0b5c9e-1a2b-4c3d-8e9f-0a1b2c3d4e5f";

    fn tree(paths: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (dir, procs) in paths {
            let p = d.path().join(dir);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("cgroup.procs"), procs).unwrap();
        }
        d
    }

    #[test]
    fn pods_are_found_under_both_drivers_and_every_qos_class() {
        let u = UID.replace('-', "_");
        let cases: Vec<(String, &str)> = vec![
            (
                format!("kubepods.slice/kubepods-pod{u}.slice"),
                "systemd guaranteed",
            ),
            (
                format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
                "systemd burstable",
            ),
            (
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"
                ),
                "systemd besteffort",
            ),
            (format!("kubepods/pod{UID}"), "cgroupfs guaranteed"),
            (format!("kubepods/burstable/pod{UID}"), "cgroupfs burstable"),
            (
                format!("kubepods/besteffort/pod{UID}"),
                "cgroupfs besteffort",
            ),
        ];
        for (dir, what) in &cases {
            // The pod's cgroup holds no process; its containers do (pause first by name here).
            let ctr_a = format!("{dir}/cri-containerd-aaa.scope");
            let ctr_b = format!("{dir}/cri-containerd-bbb.scope");
            let root = tree(&[
                (dir.as_str(), ""),
                (ctr_a.as_str(), "4242\n"),
                (ctr_b.as_str(), "4343\n4344\n"),
                // Another pod, to be ignored.
                ("kubepods/burstable/podother", "1\n"),
            ]);
            let cg = pod_cgroup(root.path(), UID).unwrap_or_else(|| panic!("{what}"));
            assert_eq!(cg, root.path().join(dir), "{what}");
            assert_eq!(pod_pid(&cg), Some(4242), "{what}");
        }
    }

    #[test]
    fn unknown_or_odd_uids_and_empty_pods_find_nothing() {
        let root = tree(&[(&format!("kubepods/burstable/pod{UID}"), "")]);
        assert_eq!(pod_cgroup(root.path(), "other-uid"), None);
        assert_eq!(pod_cgroup(root.path(), ""), None);
        assert_eq!(pod_cgroup(root.path(), "../../etc"), None);
        let cg = pod_cgroup(root.path(), UID).unwrap();
        assert_eq!(pod_pid(&cg), None, "no container has started yet");
    }
}
