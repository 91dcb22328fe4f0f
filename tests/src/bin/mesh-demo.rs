//! `cargo xtask demo`: the mesh on this machine, end to end, with a short report.
//!
//! Two nodes, two pods each, as network namespaces and cgroups; a real mesh-node per node, and a
//! real mesh-ctrl following a directory of mesh config YAML and streaming it to the nodes.
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_tests::{Cluster, ClusterBuilder, teardown};
use serde_json::Value;

const ID: &str = "demo";

#[derive(Parser)]
struct Args {
    /// Leave the demo running for exploration (`cargo xtask demo down` removes it).
    #[arg(long)]
    keep: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Remove everything a kept demo left behind.
    Down,
}

struct Progress {
    step: usize,
    total: usize,
    started: Instant,
}

impl Progress {
    fn next(&mut self, what: &str) {
        self.step += 1;
        eprintln!(
            "[{}/{}] {what} ({:.1}s)",
            self.step,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
    }
}

fn first_key(v: &Value, key: &str) -> String {
    v[key]
        .as_object()
        .and_then(|o| o.keys().next().cloned())
        .unwrap_or_default()
}

fn first(v: &Value, key: &str) -> String {
    v[key][0].as_str().unwrap_or_default().to_string()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Cmd::Down) = args.cmd {
        teardown(ID);
        let _ =
            std::fs::remove_dir_all(std::path::Path::new(mesh_tests::cluster::RUN_ROOT).join(ID));
        println!("demo removed");
        return Ok(());
    }
    // A previous --keep run is replaced.
    teardown(ID);
    let mut p = Progress {
        step: 0,
        total: 7,
        started: Instant::now(),
    };
    p.next(
        "creating 2 nodes x 2 pods, the controller (mesh CA + config) and a mesh-node on each node",
    );
    let mut cluster = ClusterBuilder::new()
        .name(ID)
        .nodes(2)
        .pods_per_node(2)
        .config_stream()
        .node_args(&["--metrics-addr", "0.0.0.0:15020"])
        .start()
        .await?;
    let report = run(&mut cluster, &mut p).await;
    match (&report, args.keep) {
        (Ok(()), true) => {
            cluster.keep();
            explore(&cluster);
        }
        (Err(e), _) => {
            eprintln!("demo failed: {e:#}");
            for n in &cluster.nodes {
                eprintln!("--- {} log tail ---\n{}", n.name, n.log_tail(15));
            }
        }
        _ => {}
    }
    report
}

fn delivered(cluster: &Cluster) -> Option<Value> {
    cluster.nodes[1]
        .log_records()
        .into_iter()
        .find(|r| r["fields"]["message"] == "delivering")
}

async fn run(cluster: &mut Cluster, p: &mut Progress) -> anyhow::Result<()> {
    let client = cluster.pod(0, 0).clone();
    let outside = cluster.pod(0, 1).clone();
    let web = cluster.pod(1, 0).clone();
    p.next("starting a TCP echo service in pod n1-p0; their namespace is in the mesh, pod n0-p1 opts out");
    let _web = web.serve(8080, false).await?;
    cluster
        .label_pods(
            &[&outside],
            serde_json::json!({"nodemesh.io/mesh": "disabled"}),
        )
        .await?;
    // The CNI hook's part: every pod's sandbox is registered; the config decides who is in.
    for pod in [&client, &web, &outside] {
        cluster.enroll(pod).await?;
    }

    p.next("client -> web on the other node, IPv4 and IPv6, 20 connections each, through mTLS");
    let mut lines = Vec::new();
    for v6 in [false, true] {
        let dst = web.addr(v6, 8080);
        let r = client.client(dst, 20, 64 * 1024).await?;
        anyhow::ensure!(r["failed"] == 0, "connections failed: {r}");
        lines.push(format!(
            "  {dst:<22} {}/{} ok | app's getpeername: {} | server saw: {}",
            r["ok"],
            r["attempted"],
            first(&r, "peer_addrs"),
            first_key(&r, "hellos").trim_start_matches("HELLO ")
        ));
    }
    let delivered = delivered(cluster).context("node 1 delivered nothing")?;
    // Proxy figures live in the process: read them before node 0 restarts below.
    let tunnel = cluster.nodes[0].counters().await?;

    p.next("a pod outside the mesh -> web: PERMISSIVE accepts plaintext; a PeerAuthentication makes it STRICT");
    let plain = outside.client(web.addr(false, 8080), 3, 1024).await?;
    let strict_yaml = format!(
        "apiVersion: nodemesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: {}}}\nspec: {{mode: STRICT}}\n",
        web.namespace
    );
    cluster
        .change_config("peer-auth.yaml", Some(&strict_yaml))
        .await?;
    let strict = outside
        .testpod(&[
            "--connect-timeout-ms",
            "1000",
            "client",
            "--to",
            &web.addr(false, 8080).to_string(),
        ])
        .await?;
    let still = client.client(web.addr(false, 8080), 3, 1024).await?;

    p.next("asking the controller why the outsider was refused, and how the nodes stand");
    let ctrl = cluster.ctrl.as_ref().context("no controller")?;
    let outsider_name = format!("{}/{}", outside.namespace, outside.name);
    let why = ctrl
        .cli(&[
            "explain",
            &outsider_name,
            &web.addr(false, 8080).to_string(),
        ])
        .await?;
    let status = ctrl.cli(&["status"]).await?;

    p.next("stopping node 0's proxy: the enrolled client must fail closed, not bypass the mesh");
    cluster.stop_node(0).await?;
    let down = client.client(web.addr(false, 8080), 3, 64).await?;
    anyhow::ensure!(
        down["ok"] == 0,
        "an enrolled pod bypassed the mesh while its proxy was down: {down}"
    );
    cluster.start_node(0).await?;
    let back = client.client(web.addr(false, 8080), 3, 64).await?;
    anyhow::ensure!(
        back["failed"] == 0,
        "not redirected again after restart: {back}"
    );

    p.next("reading counters");
    let c0 = cluster.nodes[0].counters().await?;
    let c1 = cluster.nodes[1].counters().await?;
    println!("\n== mesh demo report ==");
    println!(
        "enrolled pod n0-p0 ({}) -> web n1-p0 ({}) on the other node:",
        client.ipv4, web.ipv4
    );
    for l in &lines {
        println!("{l}");
    }
    println!(
        "  node 1 proved the caller over mTLS: {} (original source {})",
        delivered["span"]["src.identity"], delivered["span"]["forwarded"]
    );
    println!(
        "  node 0: {} tunnel streams over {} TLS connection(s); workload certificate {} expires in {} s",
        tunnel["tunnel"]["outbound_streams"],
        tunnel["tunnel"]["outbound_connections"],
        tunnel["identity"]["certificates"][0]["identity"],
        tunnel["identity"]["certificates"][0]["expires_in_seconds"]
    );
    println!("pod n0-p1 outside the mesh ({}) -> web:", outside.ipv4);
    println!(
        "  PERMISSIVE: {}/3 accepted as plaintext (counted: {})",
        plain["ok"], c1["inbound"]
    );
    println!(
        "  STRICT:     {}/1 connected (dropped in the kernel); mesh client still {}/3 ok",
        strict["ok"], still["ok"]
    );
    println!(
        "  mesh-ctrl explain {outsider_name} {}: {}",
        web.addr(false, 8080),
        why["verdict"].as_str().unwrap_or("")
    );
    let nodes = status["nodes"].as_object().cloned().unwrap_or_default();
    println!(
        "config: version {} streamed to {} nodes, acked: {}",
        status["version"],
        nodes.len(),
        nodes
            .iter()
            .map(|(n, s)| format!("{n} v{}", s["acked_version"]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "fail closed: with node 0's proxy stopped, {}/3 connections refused (\"{}\"); after restart {}/3 ok without re-enrolling",
        down["failed"],
        first(&down, "errors").rsplit(": ").next().unwrap_or(""),
        back["ok"]
    );
    let k = |prog: &str, what: &str| c0["ebpf"][prog][what].as_u64().unwrap_or(0);
    println!(
        "kernel counters on node 0: connect4 seen {} redirected {} skipped(not enrolled) {} | connect6 redirected {} | getpeername rewritten {}",
        k("connect4", "seen"),
        k("connect4", "redirected"),
        k("connect4", "skip_not_enrolled"),
        k("connect6", "redirected"),
        k("getpeername", "redirected"),
    );
    Ok(())
}

fn explore(cluster: &Cluster) {
    let n0 = &cluster.nodes[0];
    println!("\nThe demo keeps running. Try:");
    println!(
        "  nsenter --net=/run/netns/{} curl -s 127.0.0.1:15000/v1/counters",
        n0.netns
    );
    println!(
        "  nsenter --net=/run/netns/{} curl -s 127.0.0.1:15000/v1/pods",
        n0.netns
    );
    println!("  bpftool link list            # the programs, attached once per node");
    println!(
        "  nsenter --net=/run/netns/{} curl -s 127.0.0.1:15020/metrics   # Prometheus text; dashboards in manifests/dashboards/",
        n0.netns
    );
    if let Some(ctrl) = &cluster.ctrl {
        println!(
            "  ip netns exec {} mesh-ctrl status        # also: history, explain POD DEST, rollback V",
            ctrl.netns
        );
        if let Some(dir) = ctrl.config_dir() {
            println!(
                "  config directory (edit it; nodes follow): {}",
                dir.display()
            );
        }
    }
    println!("  node logs: {}", cluster.dir.display());
    println!("Remove it with: cargo xtask demo down");
}
