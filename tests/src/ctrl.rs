//! The controller in the cluster in a box: mesh-ctrl in its own network namespace on the fabric
//! (10.250.0.254, fd00:250::fe), like a controller pod the nodes reach over the network; plus the
//! local-mode inputs it needs, written by the harness: the placement of every pod and one
//! bootstrap token per node.
use std::{
    ffi::OsStr,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::{
    cluster::{Cluster, find_bin, ip, join_fabric, netns_path, spawn_in},
    sys,
};

pub const CTRL_IPV4: &str = "10.250.0.254";
pub const CTRL_PORT: u16 = 15012;
pub const TRUST_DOMAIN: &str = "cluster.local";

pub struct Controller {
    pub netns: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    cgroup: PathBuf,
    cert_ttl: Duration,
    args: Vec<String>,
    /// With config distribution: the directory of mesh config YAML the controller follows.
    config_dir: Option<PathBuf>,
    process: Option<Child>,
}

impl Controller {
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(|p| p.id())
    }

    /// Lets the controller outlive this process (a kept demo); `teardown` ends it with the
    /// cluster's cgroup.
    pub(crate) fn keep(&mut self) {
        if let Some(child) = self.process.take() {
            std::mem::forget(child);
        }
    }

    /// Where the controller publishes its trust bundle (nodes bootstrap from it).
    pub fn trust_bundle(&self) -> PathBuf {
        self.dir.join("state/trust-bundle.pem")
    }

    /// The root CA's certificate and key (local mode keeps them in the state dir): tests use
    /// them to forge certificates the mesh must still refuse, e.g. expired ones.
    pub fn root_ca(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.join("state/ca/root-cert.pem"),
            self.dir.join("state/ca/root-key.pem"),
        )
    }

    pub fn placement(&self) -> PathBuf {
        self.dir.join("placement.json")
    }

    /// Runs `mesh-ctrl ARGS --output json` next to the controller (its admin endpoint is on
    /// loopback there) and returns what it printed.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<Value> {
        let bin = find_bin("mesh-ctrl")?;
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(bin)
            .args(args)
            .args(["--output", "json"])
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "mesh-ctrl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// A GET to `addr` from inside the controller's namespace (tools run beside it, e.g.
    /// Prometheus).
    pub async fn get(&self, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Value)> {
        crate::http::request(&netns_path(&self.netns), addr, "GET", path, None).await
    }

    /// The config directory (with `ClusterBuilder::config_stream`).
    pub fn config_dir(&self) -> Option<&Path> {
        self.config_dir.as_deref()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(CTRL_IPV4.parse().unwrap(), CTRL_PORT)
    }

    pub fn log_records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub async fn start(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(find_bin("mesh-ctrl")?);
        cmd.arg("--log-json")
            .arg("serve")
            .args(["--listen", &format!("0.0.0.0:{CTRL_PORT}")])
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--placement")
            .arg(self.placement())
            .arg("--node-tokens")
            .arg(self.dir.join("node-tokens.json"))
            .args(["--trust-domain", TRUST_DOMAIN])
            .args(["--cert-ttl", &format!("{}s", self.cert_ttl.as_secs())])
            .args(
                self.config_dir
                    .iter()
                    .flat_map(|d| [OsStr::new("--config-dir"), d.as_os_str()]),
            )
            .args(&self.args)
            .env("RUST_LOG", "info");
        self.process = Some(spawn_in(cmd, &self.log, &self.netns, &self.cgroup)?);
        // Ready when it accepts connections (the trust bundle is written before it listens).
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = self.addr();
        loop {
            let ns = netns_path(&self.netns);
            let up = tokio::task::spawn_blocking(move || {
                sys::in_netns(&ns, || {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                })
                .is_ok()
            })
            .await?;
            if up {
                return Ok(());
            }
            if let Some(p) = self.process.as_mut()
                && let Some(status) = p.try_wait()?
            {
                bail!(
                    "mesh-ctrl exited with {status}:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("mesh-ctrl not listening after 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM and wait.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let mut child = self.process.take().context("controller not running")?;
        if let Some(pid) = child.id() {
            sys::kill(pid, libc::SIGTERM)?;
        }
        tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .context("mesh-ctrl did not exit")??;
        Ok(())
    }
}

fn token() -> String {
    let mut bytes = [0u8; 24];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The placement every component starts from: all pods of the cluster, each with a service
/// account named after it (so every pod has its own identity).
pub fn placement(cluster: &Cluster) -> Value {
    let nodes: Vec<Value> = cluster
        .nodes
        .iter()
        .map(|n| json!({"name": n.name, "addresses": [n.ipv4.to_string(), n.ipv6.to_string()]}))
        .collect();
    let pods: Vec<Value> = cluster
        .nodes
        .iter()
        .flat_map(|n| n.pods.iter().map(move |p| (n, p)))
        .map(|(n, p)| {
            json!({
                "namespace": p.namespace,
                "name": p.name,
                "node": n.name,
                "service_account": p.service_account,
                "ips": [p.ipv4.to_string(), p.ipv6.to_string()],
            })
        })
        .collect();
    json!({"trust_domain": TRUST_DOMAIN, "nodes": nodes, "pods": pods})
}

/// Writes JSON atomically (watchers must never read half a file).
pub fn write_json(path: &Path, v: &Value) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Creates the controller's namespace, its inputs, and the node flags that point at it.
/// Returns the controller and, per node, the extra mesh-node flags.
pub fn prepare(
    cluster: &Cluster,
    fabric: &str,
    cgroup_root: &Path,
    cert_ttl: Duration,
    args: Vec<String>,
    stream: bool,
) -> anyhow::Result<(Controller, Vec<Vec<String>>)> {
    let netns = format!("mesh-{}-ctrl", cluster.id);
    ip(&["netns", "add", &netns])?;
    ip(&["-n", &netns, "link", "set", "lo", "up"])?;
    join_fabric(
        fabric,
        &netns,
        "ctrl",
        &format!("{CTRL_IPV4}/24"),
        "fd00:250::fe/64",
    )?;
    let cgroup = cgroup_root.join("ctrl");
    std::fs::create_dir_all(&cgroup)?;
    let dir = cluster.dir.join("ctrl");
    std::fs::create_dir_all(&dir)?;

    let mut tokens = serde_json::Map::new();
    let mut node_args = Vec::new();
    let placement = placement(cluster);
    for node in &cluster.nodes {
        let t = token();
        let token_file = dir.join(format!("{}.token", node.name));
        std::fs::write(&token_file, &t)?;
        tokens.insert(node.name.clone(), t.into());
        // Each node reads its own copy, so a test can give one node a different view.
        let node_placement = cluster.dir.join(format!("placement-{}.json", node.name));
        write_json(&node_placement, &placement)?;
        let mut args = vec![
            "--ctrl-addr".into(),
            format!("https://{CTRL_IPV4}:{CTRL_PORT}"),
            "--trust-bundle".into(),
            dir.join("state/trust-bundle.pem").display().to_string(),
            "--bootstrap-token-file".into(),
            token_file.display().to_string(),
            "--trust-domain".into(),
            TRUST_DOMAIN.into(),
            "--cert-ttl".into(),
            format!("{}s", cert_ttl.as_secs()),
        ];
        if !stream {
            args.extend(["--placement".into(), node_placement.display().to_string()]);
        }
        node_args.push(args);
    }
    write_json(&dir.join("node-tokens.json"), &Value::Object(tokens))?;
    let config_dir = if stream {
        let d = dir.join("config");
        std::fs::create_dir_all(&d)?;
        // Every pod namespace joins the mesh; tests rewrite this file to change that.
        let mut namespaces: Vec<&str> = cluster
            .nodes
            .iter()
            .flat_map(|n| n.pods.iter().map(|p| p.namespace.as_str()))
            .collect();
        namespaces.sort();
        namespaces.dedup();
        let yaml: String = namespaces
            .iter()
            .map(|ns| format!("---\n{}", namespace_yaml(ns, true)))
            .collect();
        std::fs::write(d.join("namespaces.yaml"), yaml)?;
        Some(d)
    } else {
        None
    };
    let ctrl = Controller {
        netns,
        log: dir.join("ctrl.log"),
        dir: dir.clone(),
        cgroup,
        cert_ttl,
        args,
        config_dir,
        process: None,
    };
    write_json(&ctrl.placement(), &placement)?;
    Ok((ctrl, node_args))
}

/// A Namespace object, joined to the mesh or not.
pub fn namespace_yaml(name: &str, in_mesh: bool) -> String {
    let label = if in_mesh { "enabled" } else { "disabled" };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    nodemesh.io/mesh: {label}\n"
    )
}
