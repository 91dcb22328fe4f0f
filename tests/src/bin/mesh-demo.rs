//! `cargo xtask demo`: the mesh on this machine, end to end, with a short report.
//!
//! Two nodes, two pods each, as network namespaces and cgroups; a real mesh-node per node, and a
//! real mesh-ctrl following a directory of mesh config YAML and streaming it to the nodes.
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_tests::{Cluster, ClusterBuilder, Pod, PodProcess, teardown};
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
        total: 8,
        started: Instant::now(),
    };
    p.next(
        "creating 2 nodes x 3 pods, the controller (mesh CA + config) and a mesh-node on each node",
    );
    let mut cluster = ClusterBuilder::new()
        .name(ID)
        .nodes(2)
        .pods_per_node(3)
        .config_stream()
        .node_args(&["--metrics-addr", "0.0.0.0:15020"])
        .start()
        .await?;
    match run(&mut cluster, &mut p).await {
        Ok(workloads) => {
            if args.keep {
                // Everything the "Try:" lines talk to stays up until `demo down`.
                cluster.keep();
                workloads.into_iter().for_each(PodProcess::keep);
                explore(&cluster)?;
            }
            Ok(())
        }
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            for n in &cluster.nodes {
                eprintln!("--- {} log tail ---\n{}", n.name, n.log_tail(15));
            }
            Err(e)
        }
    }
}

fn delivered(cluster: &Cluster) -> Option<Value> {
    cluster.nodes[1]
        .log_records()
        .into_iter()
        .find(|r| r["fields"]["message"] == "delivering")
}

/// The demo's mesh config: Services, the canary route, a DENY rule, a rate limit, access logs.
const DEMO_CONFIG: &str = include_str!("../../../manifests/examples/demo.yaml");
const WEB: &str = "10.96.0.10:80";
const SEARCH: &str = "10.96.0.13:80";
const GREETER: &str = "10.96.0.20:9090";
const PAYLOAD: &str = "DEMO-SECRET-PAYLOAD";

/// Pods of the demo, by role.
struct Pods {
    client: Pod,
    outside: Pod,
    web_v1: Pod,
    web_v2: Pod,
    greeter: Pod,
    echo: Pod,
}

/// Captures node 0's link while the client sends `PAYLOAD` to the echo pod: (payload seen in
/// clear, TCP segments to the tunnel port).
async fn wire_proof(cluster: &Cluster, pods: &Pods) -> anyhow::Result<(bool, usize)> {
    let pcap = cluster.dir.join("demo-fab0.pcap");
    let mut tcpdump = cluster.nodes[0]
        .command("tcpdump")?
        .args(["-i", "fab0", "-U", "-n", "-s", "0", "-w"])
        .arg(&pcap)
        .arg("tcp")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("tcpdump")?;
    let mut err = tokio::io::BufReader::new(tcpdump.stderr.take().context("stderr")?);
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut err, &mut line).await?;
    let to = pods.echo.addr(false, 7000).to_string();
    let r = pods
        .client
        .testpod(&[
            "client", "--to", &to, "--conns", "3", "--bytes", "65536", "--text", PAYLOAD,
        ])
        .await?;
    anyhow::ensure!(r["failed"] == 0, "capture traffic failed: {r}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    if let Some(pid) = tcpdump.id() {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
    }
    let _ = tcpdump.wait().await;
    let bytes = std::fs::read(&pcap)?;
    let clear = bytes
        .windows(PAYLOAD.len())
        .any(|w| w == PAYLOAD.as_bytes());
    let text = std::process::Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(&pcap)
        .output()?;
    let tunnel = String::from_utf8_lossy(&text.stdout)
        .lines()
        .filter(|l| l.contains(".15008"))
        .count();
    Ok((clear, tunnel))
}

/// Runs the demo; returns its workloads, still serving.
async fn run(cluster: &mut Cluster, p: &mut Progress) -> anyhow::Result<Vec<PodProcess>> {
    let pods = Pods {
        client: cluster.pod(0, 0).clone(),
        outside: cluster.pod(0, 1).clone(),
        web_v2: cluster.pod(0, 2).clone(),
        web_v1: cluster.pod(1, 0).clone(),
        greeter: cluster.pod(1, 1).clone(),
        echo: cluster.pod(1, 2).clone(),
    };
    p.next("starting workloads: web v1 and v2 (HTTP), greeter (gRPC), echo (TCP); n0-p1 opts out of the mesh");
    let workloads = vec![
        pods.web_v1
            .serve_http_as(8080, &format!("v1-{}", pods.web_v1.name), &[])
            .await?,
        pods.web_v2
            .serve_http_as(8080, &format!("v2-{}", pods.web_v2.name), &[])
            .await?,
        pods.greeter
            .server(
                &["grpc", "--name", &format!("greeter-{}", pods.greeter.name)],
                9090,
            )
            .await?,
        pods.echo.serve(7000, false).await?,
        pods.echo
            .serve_http_as(8081, &format!("search-{}", pods.echo.name), &[])
            .await?,
    ];
    for (pod, labels) in [
        (
            &pods.web_v1,
            serde_json::json!({"app": "web", "version": "v1"}),
        ),
        (
            &pods.web_v2,
            serde_json::json!({"app": "web", "version": "v2"}),
        ),
        (&pods.greeter, serde_json::json!({"app": "greeter"})),
        (&pods.echo, serde_json::json!({"app": "echo"})),
        (
            &pods.outside,
            serde_json::json!({"nodemesh.io/mesh": "disabled"}),
        ),
    ] {
        cluster.label_pods(&[pod], labels).await?;
    }
    // The CNI hook's part: every pod's sandbox is registered; the config decides who is in.
    for pod in [
        &pods.client,
        &pods.outside,
        &pods.web_v1,
        &pods.web_v2,
        &pods.greeter,
        &pods.echo,
    ] {
        cluster.enroll(pod).await?;
    }
    cluster
        .change_config("demo.yaml", Some(DEMO_CONFIG))
        .await?;

    p.next("TCP client -> echo on the other node, IPv4 and IPv6, through mTLS; capturing node 0's link");
    let mut lines = Vec::new();
    for v6 in [false, true] {
        let dst = pods.echo.addr(v6, 7000);
        let r = pods.client.client(dst, 20, 64 * 1024).await?;
        anyhow::ensure!(r["failed"] == 0, "connections failed: {r}");
        lines.push(format!(
            "  {dst:<26} {}/{} ok | app's getpeername: {} | server saw: {}",
            r["ok"],
            r["attempted"],
            first(&r, "peer_addrs"),
            first_key(&r, "hellos").trim_start_matches("HELLO ")
        ));
    }
    let (clear, tunnel_segments) = wire_proof(cluster, &pods).await?;
    anyhow::ensure!(!clear, "the payload crossed the wire in clear");
    let delivered = delivered(cluster).context("node 1 delivered nothing")?;
    // Proxy figures live in the process: read them before node 0 restarts below.
    let tunnel = cluster.nodes[0].counters().await?;

    p.next("HTTP: 1,000 requests to the web Service (canary 90/10), A/B by header, a denied and rate-limited call, gRPC");
    let get = |to: &str, count: usize, conns: usize, extra: &[&str]| {
        let mut args: Vec<String> = [
            "get",
            "--to",
            to,
            "--count",
            &count.to_string(),
            "--conns",
            &conns.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let client = pods.client.clone();
        async move {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            client.testpod(&a).await
        }
    };
    let canary = get(WEB, 1000, 4, &[]).await?;
    let by_version = |v: &Value| -> (u64, u64) {
        let mut out = (0, 0);
        for (pod, n) in v["pods"].as_object().into_iter().flatten() {
            let n = n.as_u64().unwrap_or(0);
            if pod.starts_with("v1") {
                out.0 += n;
            } else if pod.starts_with("v2") {
                out.1 += n;
            }
        }
        out
    };
    let (v1, v2) = by_version(&canary);
    let ab = get(WEB, 20, 4, &["--header", "x-canary: always"]).await?;
    let denied = pods
        .client
        .curl(&[&format!("http://{WEB}/admin/users")])
        .await?;
    let limited = get(SEARCH, 30, 1, &[]).await?;
    let grpc = pods
        .client
        .testpod(&["grpc-call", "--to", GREETER, "--count", "10"])
        .await?;

    p.next("a pod outside the mesh -> echo: PERMISSIVE accepts plaintext; a PeerAuthentication makes it STRICT");
    let echo_addr = pods.echo.addr(false, 7000);
    let plain = pods.outside.client(echo_addr, 3, 1024).await?;
    let strict_yaml = format!(
        "apiVersion: nodemesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: {}}}\nspec: {{mode: STRICT}}\n",
        pods.echo.namespace
    );
    cluster
        .change_config("peer-auth.yaml", Some(&strict_yaml))
        .await?;
    let strict = pods
        .outside
        .testpod(&[
            "--connect-timeout-ms",
            "1000",
            "client",
            "--to",
            &echo_addr.to_string(),
        ])
        .await?;
    let still = pods.client.client(echo_addr, 3, 1024).await?;

    p.next(
        "asking why: the controller about the outsider, node 0's proxy about a request to /admin",
    );
    let ctrl = cluster.ctrl.as_ref().context("no controller")?;
    let outsider_name = format!("{}/{}", pods.outside.namespace, pods.outside.name);
    let why = ctrl
        .cli(&["explain", &outsider_name, &echo_addr.to_string()])
        .await?;
    let client_name = format!("{}/{}", pods.client.namespace, pods.client.name);
    let (_, node_why) = cluster.nodes[0]
        .admin(
            "GET",
            &format!("/debug/explain?src={client_name}&dst={WEB}&method=GET&path=/admin/users"),
            None,
        )
        .await?;
    let status = ctrl.cli(&["status"]).await?;
    let access_lines = std::fs::read_to_string(&cluster.nodes[0].log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("{\"time\""))
        .count();

    p.next("stopping node 0's proxy: the enrolled client must fail closed, not bypass the mesh");
    cluster.stop_node(0).await?;
    let down = pods.client.client(echo_addr, 3, 64).await?;
    anyhow::ensure!(
        down["ok"] == 0,
        "an enrolled pod bypassed the mesh while its proxy was down: {down}"
    );
    cluster.start_node(0).await?;
    let back = pods.client.client(echo_addr, 3, 64).await?;
    anyhow::ensure!(
        back["failed"] == 0,
        "not redirected again after restart: {back}"
    );

    p.next("reading counters");
    let c0 = cluster.nodes[0].counters().await?;
    let c1 = cluster.nodes[1].counters().await?;
    println!("\n== mesh demo report ==");
    println!("mTLS between nodes, proven on the wire:");
    println!(
        "  node 0's link carried {tunnel_segments} TCP segments of the tunnel (port 15008) while the client sent {PAYLOAD:?}: found in clear: {}",
        if clear { "YES" } else { "no" }
    );
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
    println!(
        "TCP: client {} -> echo {} on the other node:",
        pods.client.name, pods.echo.name
    );
    for l in &lines {
        println!("{l}");
    }
    println!("HTTP through the node proxies (no sidecar, no waypoint):");
    println!(
        "  canary web 90/10: v1 {v1}, v2 {v2} of 1000 ({:.1}% to v2)",
        v2 as f64 / 10.0
    );
    let ab_v2 = by_version(&ab).1;
    println!("  header x-canary: always -> v2 for {ab_v2}/20");
    println!(
        "  GET /admin/users: {} {} ({})",
        denied.status,
        denied.body.trim(),
        denied.header("x-nodemesh-flag")
    );
    println!(
        "  30 quick requests to search (5/s per pod): {} answered, {} rate limited (429)",
        count(&limited, "statuses", "200"),
        count(&limited, "statuses", "429")
    );
    println!("  gRPC greeter: {} (codes)", grpc["codes"]);
    println!("pod {} outside the mesh -> echo:", pods.outside.name);
    println!(
        "  PERMISSIVE: {}/3 accepted as plaintext (counted: {})",
        plain["ok"], c1["inbound"]
    );
    println!(
        "  STRICT:     {}/1 connected (dropped in the kernel); mesh client still {}/3 ok",
        strict["ok"], still["ok"]
    );
    println!(
        "why: mesh-ctrl explain {outsider_name} {echo_addr}: {}",
        why["verdict"].as_str().unwrap_or("")
    );
    println!(
        "     node 0 /debug/explain {client_name} -> GET {WEB}/admin/users: {}",
        node_why["verdict"].as_str().unwrap_or("")
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
    println!(
        "access logs: {access_lines} JSON lines on node 0's stdout (Telemetry in manifests/examples/demo.yaml turns them on)"
    );
    println!("where to look (cargo xtask demo --keep leaves it running):");
    println!(
        "  node live page:   ip netns exec {} curl -s 127.0.0.1:15000/   (or open it in a browser there)",
        cluster.nodes[0].netns
    );
    println!(
        "  Prometheus text:  ip netns exec {} curl -s 127.0.0.1:15020/metrics",
        cluster.nodes[0].netns
    );
    println!(
        "  dashboards:       manifests/dashboards/*.json (node overview, workload, control plane) for Grafana"
    );
    Ok(workloads)
}

fn count(v: &Value, group: &str, key: &str) -> u64 {
    v[group][key].as_u64().unwrap_or(0)
}

/// What a user can try while the demo is kept. Every line under "Try:" is a command that works
/// as printed (`tests/demo.rs` runs them all).
fn explore(cluster: &Cluster) -> anyhow::Result<()> {
    let n0 = &cluster.nodes[0];
    let client = cluster.pod(0, 0);
    let node = |path: &str| {
        format!(
            "nsenter --net=/run/netns/{} curl -s 127.0.0.1:{path}",
            n0.netns
        )
    };
    println!("\nThe demo keeps running. Try:");
    println!(
        "  {}   # from pod {} to the web Service: x-pod names v1 or v2 (canary 90/10)",
        client.shell_line(&format!("curl -s -i http://{WEB}/")),
        client.name
    );
    println!(
        "  {}   # 403: the DENY rule of manifests/examples/demo.yaml",
        client.shell_line(&format!("curl -s -i http://{WEB}/admin/users"))
    );
    println!(
        "  {}   # the config version node 0 runs; \"connected\": its controller stream",
        node("15000/v1/mesh-config")
    );
    println!("  {}", node("15000/v1/counters"));
    println!("  {}", node("15000/v1/pods"));
    println!(
        "  {}   # Prometheus text; dashboards in manifests/dashboards/",
        node("15020/metrics")
    );
    println!("  bpftool link list   # the programs, attached once per node");
    let ctrl = cluster
        .ctrl
        .as_ref()
        .context("the demo runs a controller")?;
    let ctrl_bin = mesh_tests::find_bin("mesh-ctrl")?;
    println!(
        "  ip netns exec {} {} status   # also: history, explain POD DEST, rollback V",
        ctrl.netns,
        ctrl_bin.display()
    );
    println!("Where:");
    if let Some(dir) = ctrl.config_dir() {
        println!(
            "  config directory: {}   (edit a file there; the nodes follow within a second)",
            dir.display()
        );
    }
    println!("  node logs: {}", cluster.dir.display());
    println!("Remove it with: cargo xtask demo down");
    Ok(())
}
