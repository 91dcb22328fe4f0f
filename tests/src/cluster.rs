//! Cluster in a box: N nodes, each a network namespace running its own mesh-node, M pods per node,
//! each a network namespace plus a cgroup, wired like a real cluster:
//!
//! ```text
//!   pod netns (eth0 10.1NN.J.2) --veth-- node netns (pJ 10.1NN.J.1, lo 10.200.N.1)
//!   node netns (fab0 10.250.0.N+1) --veth-- fabric netns (bridge br0) --veth-- other nodes
//! ```
//! (and the same in IPv6 under fd00::/16). The node address on `lo` is where the node's mesh-node
//! listens; every pod can route to it. Names are unique per cluster, so tests run in parallel, and
//! everything is torn down on drop, also when a test panics.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::{ctrl, ctrl::Controller, http, sys};

/// Where the harness keeps per-cluster cgroups.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified/mesh-tests";
/// Where the harness keeps logs and ownership markers.
pub const RUN_ROOT: &str = "/tmp/mesh-tests";
/// mesh-node's admin port inside each node namespace.
pub const ADMIN_PORT: u16 = 15000;
/// mesh-node's outbound port.
pub const OUTBOUND_PORT: u16 = 15001;

pub struct ClusterBuilder {
    nodes: usize,
    pods_per_node: usize,
    name: Option<String>,
    node_args: Vec<String>,
    log_filter: Option<String>,
    start_nodes: bool,
    controller: bool,
    cert_ttl: Duration,
    ctrl_args: Vec<String>,
    config_stream: bool,
    proxy_under_pods: bool,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            nodes: 2,
            pods_per_node: 2,
            name: None,
            node_args: Vec::new(),
            log_filter: None,
            start_nodes: true,
            controller: false,
            cert_ttl: Duration::from_secs(24 * 3600),
            ctrl_args: Vec::new(),
            config_stream: false,
            proxy_under_pods: false,
        }
    }
}

pub struct Cluster {
    pub id: String,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    /// mesh-ctrl, when built `with_controller()`.
    pub ctrl: Option<Controller>,
    fabric: String,
    keep: bool,
}

pub struct Node {
    pub index: usize,
    /// mesh-node's `--node-name`; also names its pinned state.
    pub name: String,
    pub netns: String,
    /// The node address pods route to; mesh-node's outbound listener.
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub pods_cgroup: PathBuf,
    proxy_cgroup: PathBuf,
    pub pods: Vec<Pod>,
    pub log: PathBuf,
    args: Vec<String>,
    log_filter: String,
    process: Option<Child>,
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub node: usize,
    /// Unique in the cluster: `n<node>-p<index>`.
    pub name: String,
    pub namespace: String,
    /// Its own, named after the pod: every pod has a distinct identity.
    pub service_account: String,
    pub netns: String,
    pub cgroup: PathBuf,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// Connects namespace `netns` to the fabric bridge: its `fab0` with the given addresses, the
/// bridge's port named `port`.
/// Spawns `cmd` inside network namespace `netns` and `cgroup`, appending its output to `log`;
/// it is killed when the handle is dropped.
pub(crate) fn spawn_in(
    mut cmd: Command,
    log: &Path,
    netns: &str,
    cgroup: &Path,
) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true);
    sys::enter_before_exec(&mut cmd, &netns_path(netns), cgroup)?;
    let program = cmd.as_std().get_program().to_owned();
    cmd.spawn()
        .with_context(|| format!("starting {}", program.display()))
}

pub(crate) fn join_fabric(
    fabric: &str,
    netns: &str,
    port: &str,
    v4: &str,
    v6: &str,
) -> anyhow::Result<()> {
    ip(&[
        "-n", netns, "link", "add", "fab0", "type", "veth", "peer", "name", port, "netns", fabric,
    ])?;
    ip(&["-n", netns, "addr", "add", v4, "dev", "fab0"])?;
    ip(&["-n", netns, "addr", "add", v6, "dev", "fab0", "nodad"])?;
    ip(&["-n", netns, "link", "set", "fab0", "up"])?;
    ip(&["-n", fabric, "link", "set", port, "master", "br0", "up"])
}

pub(crate) fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Runs `ip ARGS`, failing with its stderr.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn sysctl(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    sys::in_netns(&netns_path(netns), || std::fs::write(&path, value))
        .with_context(|| format!("sysctl {key}={value} in {netns}"))
}

/// Finds one of our binaries: `$MESH_<NAME>_BIN`, else next to (or one level above) the running
/// executable, which is where cargo puts test binaries relative to the workspace's bins.
pub fn find_bin(name: &str) -> anyhow::Result<PathBuf> {
    let var = format!(
        "MESH_{}_BIN",
        name.trim_start_matches("mesh-")
            .to_uppercase()
            .replace('-', "_")
    );
    if let Some(p) = std::env::var_os(&var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} not found next to {} and ${var} unset: build the workspace first (cargo xtask test does)",
        exe.display()
    )
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique_id() -> String {
    // Unique by construction: no two live processes share a pid, and the counter separates the
    // clusters of one process. Short, because ids end up in namespace and cgroup names.
    format!(
        "c{:x}x{:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl ClusterBuilder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }
    pub fn pods_per_node(mut self, m: usize) -> Self {
        self.pods_per_node = m;
        self
    }
    /// A fixed cluster id instead of a unique one (the demo uses "demo").
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.into());
        self
    }
    /// Extra flags for every mesh-node.
    pub fn node_args(mut self, args: &[&str]) -> Self {
        self.node_args.extend(args.iter().map(|s| s.to_string()));
        self
    }
    /// mesh-node's `RUST_LOG` (default: `$MESH_TEST_LOG`, else `info`).
    pub fn log_filter(mut self, filter: &str) -> Self {
        self.log_filter = Some(filter.into());
        self
    }
    /// Run mesh-ctrl too, and give nodes identities: traffic between nodes goes over mTLS.
    pub fn with_controller(mut self) -> Self {
        self.controller = true;
        self
    }
    /// Run the controller with a config directory and let nodes take placement and policy from
    /// its configuration stream (no placement file): enrollment then follows the config.
    pub fn config_stream(mut self) -> Self {
        self.controller = true;
        self.config_stream = true;
        self
    }
    /// Extra flags for mesh-ctrl (with a controller).
    pub fn ctrl_args(mut self, args: &[&str]) -> Self {
        self.ctrl_args.extend(args.iter().map(|s| s.to_string()));
        self
    }
    /// Lifetime of workload certificates (with a controller).
    pub fn cert_ttl(mut self, ttl: Duration) -> Self {
        self.cert_ttl = ttl;
        self
    }
    /// Run each node's mesh-node inside the cgroup its programs attach to, as the DaemonSet does
    /// (it attaches at the cgroup root): its own sockets then meet the programs too.
    pub fn proxy_under_pods(mut self) -> Self {
        self.proxy_under_pods = true;
        self
    }
    /// Build the network but leave mesh-node stopped (for fail-closed tests).
    pub fn without_node_proxies(mut self) -> Self {
        self.start_nodes = false;
        self
    }

    pub async fn start(self) -> anyhow::Result<Cluster> {
        anyhow::ensure!(
            self.nodes <= 50 && self.pods_per_node <= 200,
            "cluster too large for the address plan"
        );
        cleanup_stale();
        let id = self.name.clone().unwrap_or_else(unique_id);
        let dir = PathBuf::from(RUN_ROOT).join(&id);
        // The directory appears with its owner already recorded (made under a hidden name, then
        // renamed), so a concurrent stale sweep can never mistake it for an abandoned cluster.
        let staging = PathBuf::from(RUN_ROOT).join(format!(".{id}-{}", std::process::id()));
        std::fs::create_dir_all(&staging)?;
        std::fs::write(staging.join("owner"), std::process::id().to_string())?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::rename(&staging, &dir)?;
        let mut cluster = Cluster {
            id: id.clone(),
            dir,
            nodes: Vec::new(),
            fabric: format!("mesh-{id}-fab"),
            ctrl: None,
            keep: false,
        };
        // From here on, a failure tears down what was made (Drop).
        cluster.build_network(
            self.nodes,
            self.pods_per_node,
            &self.node_args,
            self.proxy_under_pods,
        )?;
        let filter = self
            .log_filter
            .or_else(|| std::env::var("MESH_TEST_LOG").ok())
            .unwrap_or_else(|| "info".into());
        for node in &mut cluster.nodes {
            node.log_filter = filter.clone();
        }
        if self.controller {
            let cg_root = PathBuf::from(CGROUP_ROOT).join(&cluster.id);
            let (mut ctrl, node_args) = ctrl::prepare(
                &cluster,
                &cluster.fabric,
                &cg_root,
                self.cert_ttl,
                self.ctrl_args,
                self.config_stream,
            )?;
            ctrl.start().await?;
            cluster.ctrl = Some(ctrl);
            for (node, args) in cluster.nodes.iter_mut().zip(node_args) {
                node.args.extend(args);
            }
        }
        if self.start_nodes {
            for i in 0..cluster.nodes.len() {
                cluster.start_node(i).await?;
            }
        }
        Ok(cluster)
    }
}

/// The most common test shape: an echo server in pod n1/p0 and pod n0/p0 enrolled as its client.
pub struct Pair {
    pub cluster: Cluster,
    pub client: Pod,
    pub server: Pod,
    /// The server process; it stops when this is dropped.
    pub server_process: PodProcess,
}

impl ClusterBuilder {
    /// Starts the cluster (at least two nodes, one pod each) as a [`Pair`], serving on `port`.
    /// With a controller the server is enrolled too: it is a mesh workload.
    pub async fn start_pair(self, port: u16) -> anyhow::Result<Pair> {
        let cluster = self.start().await?;
        anyhow::ensure!(
            cluster.nodes.len() >= 2 && !cluster.nodes[1].pods.is_empty(),
            "a pair needs two nodes with pods"
        );
        let client = cluster.pod(0, 0).clone();
        let server = cluster.pod(1, 0).clone();
        let server_process = server.serve(port, false).await?;
        cluster.enroll(&client).await?;
        if cluster.ctrl.is_some() {
            cluster.enroll(&server).await?;
        }
        Ok(Pair {
            cluster,
            client,
            server,
            server_process,
        })
    }
}

impl Cluster {
    fn build_network(
        &mut self,
        nodes: usize,
        pods: usize,
        node_args: &[String],
        proxy_under_pods: bool,
    ) -> anyhow::Result<()> {
        let fab = self.fabric.clone();
        ip(&["netns", "add", &fab])?;
        ip(&["-n", &fab, "link", "set", "lo", "up"])?;
        ip(&["-n", &fab, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &fab, "link", "set", "br0", "up"])?;
        let cg_root = PathBuf::from(CGROUP_ROOT).join(&self.id);
        for i in 0..nodes {
            let netns = format!("mesh-{}-n{i}", self.id);
            let name = format!("{}-n{i}", self.id);
            let node_v4 = Ipv4Addr::new(10, 200, i as u8, 1);
            let node_v6: Ipv6Addr = format!("fd00:200:{i}::1").parse()?;
            ip(&["netns", "add", &netns])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{node_v4}/32"),
                "dev",
                "lo",
            ])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{node_v6}/128"),
                "dev",
                "lo",
            ])?;
            join_fabric(
                &fab,
                &netns,
                &format!("n{i}"),
                &format!("10.250.0.{}/24", i + 1),
                &format!("fd00:250::{}/64", i + 1),
            )?;
            sysctl(&netns, "net.ipv4.ip_forward", "1")?;
            sysctl(&netns, "net.ipv6.conf.all.forwarding", "1")?;
            let node_cg = cg_root.join(format!("n{i}"));
            let pods_cgroup = node_cg.join("pods");
            let proxy_cgroup = if proxy_under_pods {
                pods_cgroup.join("proxy")
            } else {
                node_cg.join("proxy")
            };
            std::fs::create_dir_all(&pods_cgroup)
                .with_context(|| format!("creating {}", pods_cgroup.display()))?;
            std::fs::create_dir_all(&proxy_cgroup)?;
            let mut node = Node {
                index: i,
                name,
                netns: netns.clone(),
                ipv4: node_v4,
                ipv6: node_v6,
                pods_cgroup: pods_cgroup.clone(),
                proxy_cgroup,
                pods: Vec::new(),
                log: self.dir.join(format!("n{i}.log")),
                args: node_args.to_vec(),
                log_filter: "info".into(),
                process: None,
            };
            for j in 0..pods {
                let pod_ns = format!("mesh-{}-n{i}-p{j}", self.id);
                let (a, b) = (100 + i as u8, j as u8 + 1);
                let gw4 = format!("10.{a}.{b}.1");
                let gw6 = format!("fd00:{a}:{b}::1");
                let pod_v4 = Ipv4Addr::new(10, a, b, 2);
                let pod_v6: Ipv6Addr = format!("fd00:{a}:{b}::2").parse()?;
                ip(&["netns", "add", &pod_ns])?;
                ip(&["-n", &pod_ns, "link", "set", "lo", "up"])?;
                ip(&[
                    "-n",
                    &netns,
                    "link",
                    "add",
                    &format!("p{j}"),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    &pod_ns,
                ])?;
                ip(&[
                    "-n",
                    &netns,
                    "addr",
                    "add",
                    &format!("{gw4}/24"),
                    "dev",
                    &format!("p{j}"),
                ])?;
                ip(&[
                    "-n",
                    &netns,
                    "addr",
                    "add",
                    &format!("{gw6}/64"),
                    "dev",
                    &format!("p{j}"),
                    "nodad",
                ])?;
                ip(&["-n", &netns, "link", "set", &format!("p{j}"), "up"])?;
                ip(&[
                    "-n",
                    &pod_ns,
                    "addr",
                    "add",
                    &format!("{pod_v4}/24"),
                    "dev",
                    "eth0",
                ])?;
                ip(&[
                    "-n",
                    &pod_ns,
                    "addr",
                    "add",
                    &format!("{pod_v6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ])?;
                ip(&["-n", &pod_ns, "link", "set", "eth0", "up"])?;
                ip(&["-n", &pod_ns, "route", "add", "default", "via", &gw4])?;
                ip(&["-n", &pod_ns, "-6", "route", "add", "default", "via", &gw6])?;
                let cgroup = pods_cgroup.join(format!("p{j}"));
                std::fs::create_dir_all(&cgroup)?;
                node.pods.push(Pod {
                    node: i,
                    name: format!("n{i}-p{j}"),
                    namespace: "default".into(),
                    service_account: format!("n{i}-p{j}"),
                    netns: pod_ns,
                    cgroup,
                    ipv4: pod_v4,
                    ipv6: pod_v6,
                });
            }
            self.nodes.push(node);
        }
        for a in 0..nodes {
            for b in (0..nodes).filter(|b| *b != a) {
                let ns = &self.nodes[a].netns;
                let via4 = format!("10.250.0.{}", b + 1);
                let via6 = format!("fd00:250::{}", b + 1);
                ip(&[
                    "-n",
                    ns,
                    "route",
                    "add",
                    &format!("10.{}.0.0/16", 100 + b),
                    "via",
                    &via4,
                ])?;
                ip(&[
                    "-n",
                    ns,
                    "route",
                    "add",
                    &format!("10.200.{b}.1/32"),
                    "via",
                    &via4,
                ])?;
                ip(&[
                    "-n",
                    ns,
                    "-6",
                    "route",
                    "add",
                    &format!("fd00:{}::/32", 100 + b),
                    "via",
                    &via6,
                ])?;
                ip(&[
                    "-n",
                    ns,
                    "-6",
                    "route",
                    "add",
                    &format!("fd00:200:{b}::1/128"),
                    "via",
                    &via6,
                ])?;
            }
        }
        Ok(())
    }

    pub fn pod(&self, node: usize, pod: usize) -> &Pod {
        &self.nodes[node].pods[pod]
    }

    /// Starts (or restarts) node `i`'s mesh-node and waits until it is ready. With
    /// `MESH_NODE_FROM_BIN` set (`cargo xtask upgrade-test --from REV`), that binary: the
    /// generation the upgrades start from; they bring `MESH_NODE_BIN`'s.
    pub async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let bin = match std::env::var_os("MESH_NODE_FROM_BIN") {
            Some(p) => PathBuf::from(p),
            None => find_bin("mesh-node")?,
        };
        let child = self.spawn_node_of(i, &bin)?;
        let node = &mut self.nodes[i];
        node.process = Some(child);
        node.wait_ready(Duration::from_secs(20)).await
    }

    /// Starts a new generation of node `i`'s mesh-node beside the running one, as an upgrade
    /// does: it takes the listeners over, and the old one drains and exits by itself. Returns
    /// the old generation's exit status once the new one is ready.
    pub async fn upgrade_node(&mut self, i: usize) -> anyhow::Result<std::process::ExitStatus> {
        let mut old = self.nodes[i]
            .process
            .take()
            .context("node proxy not running")?;
        let child = self.spawn_node(i)?;
        self.nodes[i].process = Some(child);
        let status = tokio::time::timeout(Duration::from_secs(20), old.wait())
            .await
            .context("the old generation did not exit after the hand-over")??;
        self.nodes[i].wait_ready(Duration::from_secs(20)).await?;
        Ok(status)
    }

    /// Starts a new generation of node `i`'s proxy beside the running one and returns the old
    /// one's process, without waiting for either: for tests that watch the hand-over itself.
    pub fn start_next_generation(&mut self, i: usize) -> anyhow::Result<Child> {
        let old = self.nodes[i]
            .process
            .take()
            .context("node proxy not running")?;
        self.nodes[i].process = Some(self.spawn_node(i)?);
        Ok(old)
    }

    /// Waits (up to `timeout`) for node `i`'s proxy to answer ready.
    pub async fn wait_node_ready(&mut self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        self.nodes[i].wait_ready(timeout).await
    }

    /// Upgrades node `i`'s proxy, then kills the old generation with SIGKILL `after` the new one
    /// is ready (in the middle of its drain).
    pub async fn upgrade_node_killing_old(
        &mut self,
        i: usize,
        after: Duration,
    ) -> anyhow::Result<()> {
        let mut old = self.nodes[i]
            .process
            .take()
            .context("node proxy not running")?;
        // Both generations log to the same file: the old one's line says it drains.
        const DRAINING: &str = "the next generation serves: draining";
        let drains = || {
            std::fs::read_to_string(&self.nodes[i].log)
                .map(|l| l.matches(DRAINING).count())
                .unwrap_or(0)
        };
        let before = drains();
        let child = self.spawn_node(i)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while drains() == before {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the old generation never drained"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.nodes[i].process = Some(child);
        tokio::time::sleep(after).await;
        old.kill().await?;
        Ok(())
    }

    /// Starts a new generation of node `i`'s proxy beside the running one and waits for it to
    /// exit on its own: an upgrade that must be refused (the running generation serves on).
    pub async fn refused_upgrade(&self, i: usize) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.spawn_node(i)?;
        Ok(tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .context("the new generation did not exit")??)
    }

    fn spawn_node(&self, i: usize) -> anyhow::Result<Child> {
        self.spawn_node_of(i, &find_bin("mesh-node")?)
    }

    fn spawn_node_of(&self, i: usize, bin: &Path) -> anyhow::Result<Child> {
        let node = &self.nodes[i];
        let mut cmd = Command::new(bin);
        cmd.arg("--log-json")
            .arg("run")
            .args(["--node-name", &node.name])
            .arg("--cgroup")
            .arg(&node.pods_cgroup)
            .args(["--proxy-ipv4", &node.ipv4.to_string()])
            .args(["--proxy-ipv6", &node.ipv6.to_string()])
            .args(["--outbound-port", &OUTBOUND_PORT.to_string()])
            .args(["--admin-addr", &format!("127.0.0.1:{ADMIN_PORT}")])
            .args(["--drain-timeout", "2s"])
            .args(&node.args)
            .env("RUST_LOG", &node.log_filter);
        spawn_in(cmd, &node.log, &node.netns, &node.proxy_cgroup)
    }

    /// SIGTERM node `i`'s mesh-node and wait for it to exit (drain included).
    pub async fn stop_node(&mut self, i: usize) -> anyhow::Result<std::process::ExitStatus> {
        let node = &mut self.nodes[i];
        let mut child = node.process.take().context("node proxy not running")?;
        if let Some(pid) = child.id() {
            sys::kill(pid, libc::SIGTERM)?;
        }
        Ok(tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .context("mesh-node did not exit")??)
    }

    /// SIGKILL node `i`'s mesh-node: a crash.
    pub async fn kill_node(&mut self, i: usize) -> anyhow::Result<()> {
        let mut child = self.nodes[i]
            .process
            .take()
            .context("node proxy not running")?;
        child.kill().await?;
        Ok(())
    }

    /// Enrolls a pod through its node's admin API.
    pub async fn enroll(&self, pod: &Pod) -> anyhow::Result<Value> {
        let body = serde_json::json!({"netns": netns_path(&pod.netns), "service_account": pod.service_account}).to_string();
        let (status, resp) = self.nodes[pod.node]
            .admin(
                "PUT",
                &format!("/v1/pods/{}/{}", pod.namespace, pod.name),
                Some(&body),
            )
            .await?;
        anyhow::ensure!(status == 200, "enroll {}: {status} {resp}", pod.name);
        Ok(resp)
    }

    pub async fn unenroll(&self, pod: &Pod) -> anyhow::Result<()> {
        let (status, resp) = self.nodes[pod.node]
            .admin(
                "DELETE",
                &format!("/v1/pods/{}/{}", pod.namespace, pod.name),
                None,
            )
            .await?;
        anyhow::ensure!(status == 200, "unenroll {}: {status} {resp}", pod.name);
        Ok(())
    }

    /// Rewrites the placement the controller and every node read, then waits until every node
    /// has reloaded it.
    pub async fn update_placement(&self, f: impl FnOnce(&mut Value)) -> anyhow::Result<()> {
        let ctrl = self.ctrl.as_ref().context("no controller: no placement")?;
        let mut placement: Value = serde_json::from_slice(&std::fs::read(ctrl.placement())?)?;
        f(&mut placement);
        if ctrl.config_dir().is_some() {
            // Nodes take placement from the controller's stream: wait for the new version there.
            return self
                .after_new_version(|| ctrl::write_json(&ctrl.placement(), &placement))
                .await;
        }
        let reloads = |n: &Node| {
            n.log_records()
                .iter()
                .filter(|r| r["fields"]["message"] == "placement reloaded")
                .count()
        };
        let before: Vec<usize> = self.nodes.iter().map(reloads).collect();
        ctrl::write_json(&ctrl.placement(), &placement)?;
        for node in &self.nodes {
            ctrl::write_json(
                &self.dir.join(format!("placement-{}.json", node.name)),
                &placement,
            )?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .nodes
            .iter()
            .zip(&before)
            .any(|(n, b)| reloads(n) <= *b)
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "nodes did not reload the placement"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Kernel flags follow the placement within a quarter second.
        tokio::time::sleep(Duration::from_millis(400)).await;
        Ok(())
    }

    /// Writes `file` into the controller's config directory (with `config_stream`).
    pub fn apply_config(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        let dir = self
            .ctrl
            .as_ref()
            .and_then(|c| c.config_dir())
            .context("no config directory: build with config_stream()")?;
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, dir.join(file))?;
        Ok(())
    }

    /// Writes (or with `None` removes) `file` in the config directory, then waits until every node
    /// holds a newer configuration version and its kernel flags had time to follow.
    pub async fn change_config(&self, file: &str, yaml: Option<&str>) -> anyhow::Result<()> {
        self.after_new_version(|| match yaml {
            Some(y) => self.apply_config(file, y),
            None => self.delete_config(file),
        })
        .await
    }

    /// Runs `change`, then waits until every node holds a newer configuration version.
    async fn after_new_version(
        &self,
        change: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let version = |c: &Value| c["version"].as_u64().unwrap_or(0);
        let mut before = Vec::new();
        for n in &self.nodes {
            before.push(version(&n.mesh_config().await?));
        }
        change()?;
        for (n, b) in self.nodes.iter().zip(before) {
            n.wait_config(Duration::from_secs(10), "a newer version", |c| {
                version(c) > b
            })
            .await?;
        }
        // Enrollment and inbound flags follow each applied version at once; allow a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(())
    }

    /// Removes `file` from the controller's config directory.
    pub fn delete_config(&self, file: &str) -> anyhow::Result<()> {
        let dir = self
            .ctrl
            .as_ref()
            .and_then(|c| c.config_dir())
            .context("no config directory: build with config_stream()")?;
        std::fs::remove_file(dir.join(file))?;
        Ok(())
    }

    /// Sets the labels of `pods` in the placement (replacing theirs) and waits until the nodes
    /// hold it.
    /// Labels each pod `app: web, version: <its version>`: the two-version setups behind the
    /// `web` Services of the L7 tests and the soak.
    pub async fn label_versions(&self, pods: &[(Pod, &str)]) -> anyhow::Result<()> {
        let mut versions: Vec<&str> = pods.iter().map(|(_, v)| *v).collect();
        versions.sort_unstable();
        versions.dedup();
        for version in versions {
            let these: Vec<&Pod> = pods
                .iter()
                .filter(|(_, v)| *v == version)
                .map(|(p, _)| p)
                .collect();
            self.label_pods(
                &these,
                serde_json::json!({"app": "web", "version": version}),
            )
            .await?;
        }
        Ok(())
    }

    pub async fn label_pods(&self, pods: &[&Pod], labels: Value) -> anyhow::Result<()> {
        let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
        self.update_placement(|pl| {
            for pod in pl["pods"].as_array_mut().into_iter().flatten() {
                if names.iter().any(|n| pod["name"] == *n) {
                    pod["labels"] = labels.clone();
                }
            }
        })
        .await
    }

    /// Keep everything after drop (the demo's `--keep`).
    pub fn keep(&mut self) {
        self.keep = true;
        // Let the node proxies outlive this process (kill_on_drop would end them).
        for node in &mut self.nodes {
            if let Some(child) = node.process.take() {
                std::mem::forget(child);
            }
        }
        if let Some(ctrl) = &mut self.ctrl {
            ctrl.keep();
        }
        // Stale-cluster cleanup leaves kept clusters alone.
        let _ = std::fs::write(self.dir.join("owner"), "keep");
    }
}

impl Node {
    /// What the node holds from the controller's configuration stream (`/v1/mesh-config`).
    pub async fn mesh_config(&self) -> anyhow::Result<Value> {
        let (status, body) = self.admin("GET", "/v1/mesh-config", None).await?;
        anyhow::ensure!(status == 200, "mesh-config: {status} {body}");
        Ok(body)
    }

    /// Polls `/v1/mesh-config` until `pred` holds; returns how long that took.
    pub async fn wait_config(
        &self,
        within: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let cfg = self.mesh_config().await?;
            if pred(&cfg) {
                return Ok(start.elapsed());
            }
            anyhow::ensure!(
                start.elapsed() < within,
                "node {}: {what} not within {within:?}; holding {cfg}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Calls the node's admin API from inside the node's namespace.
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        if matches!(method, "GET" | "HEAD") {
            let addr = SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT));
            http::request(&netns_path(&self.netns), addr, method, path, body).await
        } else {
            // Changes go to the root-only Unix socket, as the CNI plugin's do.
            http::request_unix(&self.admin_socket(), method, path, body).await
        }
    }

    /// The same request on the TCP admin listener whatever the method: what any process in the
    /// node's network namespace can send.
    pub async fn admin_tcp(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let addr = SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT));
        http::request(&netns_path(&self.netns), addr, method, path, body).await
    }

    /// mesh-node's root-only admin socket (in its default state directory).
    pub fn admin_socket(&self) -> PathBuf {
        PathBuf::from("/run/mesh-node")
            .join(&self.name)
            .join("admin.sock")
    }

    pub async fn counters(&self) -> anyhow::Result<Value> {
        let (status, v) = self.admin("GET", "/v1/counters", None).await?;
        anyhow::ensure!(status == 200, "counters: {status} {v}");
        Ok(v)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.process.as_mut()
                && let Some(status) = p.try_wait()?
            {
                bail!(
                    "mesh-node on {} exited with {status}:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            if let Ok((200, _)) = self.admin("GET", "/ready", None).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "mesh-node on {} not ready after {timeout:?}:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last `n` lines of this node's mesh-node log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// mesh-node's JSON log records so far.
    pub fn log_records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The extra mesh-node arguments of this node's next start (replacing the builder's).
    pub fn set_args(&mut self, args: &[&str]) {
        self.args = args.iter().map(|a| a.to_string()).collect();
    }

    /// A command run in this node's network namespace (e.g. tcpdump), outside the pods' cgroup.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        let mut cmd = Command::new(program);
        cmd.kill_on_drop(true).stdin(Stdio::null());
        sys::enter_before_exec(&mut cmd, &netns_path(&self.netns), &self.proxy_cgroup)?;
        Ok(cmd)
    }

    /// mesh-node's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(|p| p.id())
    }
}

/// A process running in a pod, killed when dropped.
pub struct PodProcess {
    pub child: Child,
}

impl PodProcess {
    /// Lets the process outlive this one (a kept demo's workloads); `teardown` ends it with its
    /// cluster's cgroup.
    pub fn keep(self) {
        std::mem::forget(self.child);
    }
}

/// One curl answer.
#[derive(Debug)]
pub struct Curl {
    pub status: u16,
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: String,
}

impl Curl {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

impl Pod {
    /// `cmd` as one line a user can paste into a root shell to run it inside this pod: the shell
    /// moves itself into the pod's cgroup (so the mesh's programs see the pod), then enters the
    /// pod's network namespace.
    pub fn shell_line(&self, cmd: &str) -> String {
        format!(
            "sh -c 'echo $$ > {}/cgroup.procs && exec nsenter --net={} {cmd}'",
            self.cgroup.display(),
            netns_path(&self.netns).display()
        )
    }

    /// A command that runs inside this pod (its network namespace and cgroup).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        let mut cmd = Command::new(program);
        cmd.kill_on_drop(true).stdin(Stdio::null());
        sys::enter_before_exec(&mut cmd, &netns_path(&self.netns), &self.cgroup)?;
        Ok(cmd)
    }

    pub fn addr(&self, v6: bool, port: u16) -> SocketAddr {
        let ip: IpAddr = if v6 {
            self.ipv6.into()
        } else {
            self.ipv4.into()
        };
        SocketAddr::new(ip, port)
    }

    /// Starts the test server on `port` (IPv4 and IPv6) and waits until it listens.
    pub async fn serve(&self, port: u16, sink: bool) -> anyhow::Result<PodProcess> {
        self.server(
            if sink {
                &["serve", "--sink"]
            } else {
                &["serve"]
            },
            port,
        )
        .await
    }

    /// Starts the small-response HTTP/1.1 server on `port` and waits until it listens.
    pub async fn serve_http(&self, port: u16) -> anyhow::Result<PodProcess> {
        self.server(&["http"], port).await
    }

    /// Starts the HTTP server as `name`, with extra `mesh-testpod http` arguments.
    pub async fn serve_http_as(
        &self,
        port: u16,
        name: &str,
        extra: &[&str],
    ) -> anyhow::Result<PodProcess> {
        let mut args = vec!["http", "--name", name];
        args.extend_from_slice(extra);
        self.server(&args, port).await
    }

    /// Runs curl in this pod (`-i`: the answer's head and body).
    pub async fn curl(&self, args: &[&str]) -> anyhow::Result<Curl> {
        let mut cmd = self.command("curl")?;
        cmd.args(["-s", "-i", "--max-time", "20"]).args(args);
        let out = cmd.output().await.context("run curl")?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            bail!(
                "curl {args:?} in {} got no response (exit {:?}): {text}{}",
                self.name,
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .context("curl: no status line")?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok(Curl {
            status,
            headers,
            body: body.to_string(),
        })
    }

    /// Starts `mesh-testpod MODE...` listening on `port` (IPv4 and IPv6) and waits until it listens.
    pub async fn server(&self, mode: &[&str], port: u16) -> anyhow::Result<PodProcess> {
        let mut cmd = self.command(find_bin("mesh-testpod")?)?;
        cmd.args(mode);
        cmd.args([
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--listen",
            &format!("[::]:{port}"),
        ]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let mut lines = BufReader::new(child.stdout.take().context("server stdout")?).lines();
        match tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await {
            Ok(Ok(Some(l))) if l == "ready" => Ok(PodProcess { child }),
            other => {
                let _ = child.kill().await;
                let out = child.wait_with_output().await?;
                bail!(
                    "test server in {} did not start ({other:?}): {}",
                    self.name,
                    String::from_utf8_lossy(&out.stderr)
                )
            }
        }
    }

    /// Runs `mesh-testpod ARGS` to completion in this pod and parses its JSON report.
    pub async fn testpod(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut cmd = self.command(find_bin("mesh-testpod")?)?;
        cmd.args(args);
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .context("mesh-testpod hung")??;
        anyhow::ensure!(
            out.status.success(),
            "mesh-testpod {args:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "mesh-testpod output: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Opens `conns` echo connections to `to` and checks every byte.
    pub async fn client(
        &self,
        to: SocketAddr,
        conns: usize,
        bytes: usize,
    ) -> anyhow::Result<Value> {
        self.testpod(&[
            "client",
            "--to",
            &to.to_string(),
            "--conns",
            &conns.to_string(),
            "--concurrency",
            &conns.to_string(),
            "--bytes",
            &bytes.to_string(),
        ])
        .await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let failed = std::thread::panicking();
        teardown(&self.id);
        if failed {
            eprintln!(
                "cluster {} torn down; node logs kept in {}",
                self.id,
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes everything a cluster made, found by its id alone, so it also cleans up after a harness
/// that was killed (and `cargo xtask demo down`).
pub fn teardown(id: &str) {
    let cg = PathBuf::from(CGROUP_ROOT).join(id);
    // cgroup.kill (5.14+) ends every process of the cluster: mesh-nodes and pod workloads.
    let _ = std::fs::write(cg.join("cgroup.kill"), "1");
    let node_bin = find_bin("mesh-node").ok();
    let prefix = format!("mesh-{id}-");
    let netns: Vec<String> = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    // Node pinned state: detach through mesh-node itself, falling back to removing the pins.
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf/mesh") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.starts_with(&format!("{id}-n")) {
                continue;
            }
            let detached = node_bin.as_ref().is_some_and(|b| {
                std::process::Command::new(b)
                    .args(["detach", "--node-name", &name])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
            if !detached {
                let _ = remove_tree(&e.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/run/mesh-node") {
        for e in entries.flatten().filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{id}-n"))
        }) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    for ns in netns.iter().filter(|n| n.starts_with(&prefix)) {
        let _ = ip(&["netns", "del", ns]);
    }
    // Killed processes leave their cgroups asynchronously: retry for a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while cg.exists() && Instant::now() < deadline {
        if remove_cgroup_tree(&cg).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn remove_tree(p: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(p)? {
        let path = e?.path();
        if path.is_dir() {
            remove_tree(&path)?
        } else {
            std::fs::remove_file(&path)?
        }
    }
    std::fs::remove_dir(p)
}

/// cgroup directories are removed with rmdir, children first (their files cannot be unlinked).
fn remove_cgroup_tree(p: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(p)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            remove_cgroup_tree(&e.path())?;
        }
    }
    std::fs::remove_dir(p)
}

/// Tears down clusters whose owning process is gone (a test binary that was killed).
pub fn cleanup_stale() {
    let Ok(entries) = std::fs::read_dir(RUN_ROOT) else {
        return;
    };
    for e in entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
    {
        let owner_text = std::fs::read_to_string(e.path().join("owner")).unwrap_or_default();
        if owner_text.trim() == "keep" {
            continue;
        }
        let owner = owner_text.trim().parse::<u32>().ok();
        let alive = owner.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let id = e.file_name().to_string_lossy().to_string();
            teardown(&id);
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A TCP connection made from inside the network namespace `netns` (a harness namespace name).
/// The socket stays in that namespace; the caller uses it from here.
pub async fn connect_in(netns: &str, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let path = netns_path(netns);
    let std = tokio::task::spawn_blocking(move || {
        sys::in_netns(&path, || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })
    })
    .await??;
    std.set_nonblocking(true)?;
    Ok(tokio::net::TcpStream::from_std(std)?)
}

/// `count` connections to `addr` from the network namespace `netns`, opened on one thread that
/// entered it (a flood's worth, quickly); those that fail to connect are left out.
pub async fn connect_many_in(
    netns: &str,
    addr: SocketAddr,
    count: usize,
) -> anyhow::Result<Vec<std::net::TcpStream>> {
    let path = netns_path(netns);
    Ok(tokio::task::spawn_blocking(move || {
        sys::in_netns(&path, || {
            Ok((0..count)
                .filter_map(|_| {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()
                })
                .collect())
        })
    })
    .await??)
}

/// [`connect_in`] from a chosen local address (port 0: any), as a process of that namespace that
/// binds an address before connecting would.
pub async fn connect_in_from(
    netns: &str,
    from: std::net::IpAddr,
    addr: SocketAddr,
) -> anyhow::Result<tokio::net::TcpStream> {
    let path = netns_path(netns);
    let std = tokio::task::spawn_blocking(move || {
        sys::in_netns(&path, || {
            let sock = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )?;
            sock.bind(&SocketAddr::new(from, 0).into())?;
            sock.connect_timeout(&addr.into(), Duration::from_millis(1500))?;
            Ok::<_, std::io::Error>(std::net::TcpStream::from(sock))
        })
    })
    .await??;
    std.set_nonblocking(true)?;
    Ok(tokio::net::TcpStream::from_std(std)?)
}

/// A listener bound inside the network namespace `netns`.
pub fn listen_in(netns: &str, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let std = sys::in_netns(&netns_path(netns), || std::net::TcpListener::bind(addr))?;
    std.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(std)?)
}
