//! `cargo xtask bench`: the same workloads pod to pod across two nodes, through each path, in one
//! run; reported as figures and as ratios to the direct baseline measured alongside.
//!
//! Scenarios:
//! - `direct`: the client pod is not enrolled; no proxy.
//! - `redirect`: the client pod is enrolled, no identities: eBPF redirect + node proxy, plain TCP.
//! - `mesh_l4`: client and server enrolled with identities: two node proxies, HBONE over mTLS.
//! - `mesh_l4_accel`: `mesh_l4` with `--socket-acceleration on` (what pods send to their proxy
//!   skips TCP/IP).
//! - `mesh_l7`: the HTTP path: a Service by cluster IP, an HTTPRoute and an AuthorizationPolicy
//!   evaluated per request; HTTP figures only (`rps`, `p50_us`, `p99_us`, CPU and memory), and
//!   `rps_vs_l4_same_cluster`: its requests/s over the L4 path's between the same pods (a Service
//!   declared `tcp`), from alternating wrk runs.
//! - `haproxy_mtls`: what an operator might run instead: haproxy on each node, mTLS between them.
//! - `noisy_neighbour`: one pod floods (wrk at full speed over 100 connections, and new
//!   connections as fast as it can) while another pod of the same node sends paced requests
//!   (`paced_*`) to the same server: their latency idle and during the flood, first with no pod
//!   enrolled (`direct_*`: what the two cores alone cost), then all enrolled (`mesh_*`), sharing
//!   one node proxy. `mesh_noisy_vs_idle_p99` is the figure the mesh answers for.
//! - `upgrade`: both pods enrolled; wrk (50 keep-alive connections) alone, then while the server's
//!   node proxy and then the client's are upgraded (a new process takes the listeners over, the
//!   old one drains): `upgrade_rps_ratio`, `upgrade_p99_ratio` (during / alone) and
//!   `upgrade_failed` (non-2xx answers and socket errors of both runs; must be 0).
//! - `ctrl`: the controller at scale (`snapshot_ms`, `fanout_ms`, `rss_kb`; see
//!   `mesh_tests::ctrl_bench`).
//!
//! Figures (see the README): `rps`, `p50_us`, `p99_us` (wrk, 50 connections, small responses),
//! `paced_p50_us`, `paced_p99_us` (1,000 requests/s over 4 connections), `bulk_gbps` (one
//! stream, 1 GiB), `bulk8_gbps` (8 streams at once, 1 GiB in all), `connects_per_s` (new connection per request), `proxy_cpu_us_per_req`
//! (proxies' CPU time during the wrk run, per request), `proxy_cpu_pct_of_app` (that CPU time
//! against the pods' own: wrk and the server), `proxy_rss_kb` (proxies' memory after),
//! `rss_idle1000_kb` (with 1,000 idle connections open), `rss_bulk50_kb` (peak during 50 bulk
//! connections at once).
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use mesh_tests::{Cluster, ClusterBuilder, Pod, PodProcess, connect_in, procfs};
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// Also write `{"scenarios": {NAME: {FIGURE: number}}}` here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seconds per timed workload.
    #[arg(long, default_value_t = 4)]
    seconds: u64,
    /// Run only these scenarios (repeatable; default all). Ratios need `direct`.
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Run every chosen scenario this many times, interleaved, and report each figure's median:
    /// on a shared 2-core VM one run can be off by 20%, and drift then hits every scenario alike.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Run only these workloads of each scenario (repeatable: `http`, `paced`, `paced_http`,
    /// `half_load` (needs `http`), `rate`, `bulk`, `memory`; default all): a quicker A/B of one figure.
    #[arg(long = "workload")]
    workloads: Vec<String>,
}

/// The workloads chosen with `--workload` (empty: all).
static WORKLOADS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

fn wants_workload(w: &str) -> bool {
    WORKLOADS
        .get()
        .is_none_or(|ws| ws.is_empty() || ws.iter().any(|x| x == w))
}

type Figures = BTreeMap<&'static str, f64>;

const ECHO: u16 = 8080;
const HTTP: u16 = 8081;
const SINK: u16 = 8082;
/// A second HTTP server in the `mesh_l7` server pod, behind a Service declared `tcp`: the L4 path
/// between the same pods and proxies.
const HTTP_TCP: u16 = 8083;
/// `mesh_l7`'s alternating wrk runs: L7, L4, L7, L4, ...
const PAIRS: usize = 3;

/// Where a scenario's client sends each workload.
#[derive(Clone, Copy)]
struct Targets {
    echo: SocketAddr,
    http: SocketAddr,
    /// Where paced HTTP goes: `http`, except through haproxy, whose HTTP-mode listener is the
    /// comparison for the mesh's L7 path.
    http_paced: SocketAddr,
    sink: SocketAddr,
}

impl Targets {
    fn pod(p: &Pod) -> Self {
        Self {
            echo: p.addr(false, ECHO),
            http: p.addr(false, HTTP),
            http_paced: p.addr(false, HTTP),
            sink: p.addr(false, SINK),
        }
    }
}

fn num(v: &Value, k: &str) -> anyhow::Result<f64> {
    v[k].as_f64().with_context(|| format!("no {k} in {v}"))
}

fn ticks(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|p| procfs::cpu_ticks(*p)).sum()
}

/// CPU time (µs) of every process ever in these cgroups (cgroup v2 `cpu.stat`).
fn cgroup_usec(cgroups: &[PathBuf]) -> anyhow::Result<u64> {
    cgroups
        .iter()
        .map(|cg| {
            let stat = std::fs::read_to_string(cg.join("cpu.stat"))
                .with_context(|| format!("{}/cpu.stat", cg.display()))?;
            stat.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .context("no usage_usec")?
                .trim()
                .parse::<u64>()
                .map_err(anyhow::Error::from)
        })
        .sum()
}

/// The pods' cgroups: wrk and the servers run there; proxies (ours, haproxy) do not.
fn app_cgroups(cluster: &Cluster) -> Vec<PathBuf> {
    cluster
        .nodes
        .iter()
        .map(|n| n.pods_cgroup.clone())
        .collect()
}

/// wrk's "Requests/sec" and total requests; latency percentiles from `--latency`. Fails on any
/// 4xx or 5xx answer (wrk's "Non-2xx or 3xx responses"): a path that answers 403 or 503 quickly
/// must not look fast.
fn parse_wrk(out: &str) -> anyhow::Result<(f64, f64, f64, f64)> {
    if let Some(n) = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
    {
        anyhow::bail!("wrk got {} 4xx or 5xx answers:\n{out}", n.trim());
    }
    let rps = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .context("no Requests/sec")?
        .trim()
        .parse()?;
    let total = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .context("no total")?
        .0
        .trim()
        .parse()?;
    let pct = |p: &str| -> anyhow::Result<f64> {
        let v = out
            .lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .with_context(|| format!("no {p} latency"))?
            .trim();
        let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).context("unit")?);
        let n: f64 = n.parse()?;
        Ok(match unit {
            "us" => n,
            "ms" => n * 1e3,
            "s" => n * 1e6,
            _ => anyhow::bail!("unit {unit}"),
        })
    };
    Ok((rps, total, pct("50%")?, pct("99%")?))
}

/// wrk's report of `secs` of GETs to `http` over 50 keep-alive connections from `client`.
async fn wrk(client: &Pod, http: SocketAddr, secs: u64) -> anyhow::Result<String> {
    let out = client
        .command("wrk")?
        .args([
            "-t2",
            "-c50",
            &format!("-d{secs}s"),
            "--latency",
            &format!("http://{http}/"),
        ])
        .output()
        .await
        .context("wrk (installed by cargo xtask bench)")?;
    anyhow::ensure!(
        out.status.success(),
        "wrk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// wrk at 50 connections: `rps`, `p50_us`, `p99_us`, and the proxies' CPU per request and
/// against the pods' (`apps`) CPU over the same run.
async fn measure_http(
    client: &Pod,
    http: SocketAddr,
    secs: u64,
    (procs, apps): (&[u32], &[PathBuf]),
    f: &mut Figures,
) -> anyhow::Result<()> {
    let before = ticks(procs)?;
    let apps_before = cgroup_usec(apps)?;
    let (rps, total, p50, p99) = parse_wrk(&wrk(client, http, secs).await?)?;
    f.insert("rps", rps);
    f.insert("p50_us", p50);
    f.insert("p99_us", p99);
    if !procs.is_empty() {
        // USER_HZ is 100 on every Linux we build for: one tick is 10 ms.
        let proxies_us = (ticks(procs)? - before) as f64 * 10_000.0;
        f.insert("proxy_cpu_us_per_req", proxies_us / total);
        // Against the work the proxies carry, not the clock: steady when the VM's speed is not.
        let apps_us = (cgroup_usec(apps)? - apps_before) as f64;
        if apps_us > 0.0 {
            f.insert("proxy_cpu_pct_of_app", 100.0 * proxies_us / apps_us);
        }
    }
    Ok(())
}

fn rss(procs: &[u32], f: &mut Figures) -> anyhow::Result<()> {
    if !procs.is_empty() {
        f.insert(
            "proxy_rss_kb",
            procs
                .iter()
                .map(|p| procfs::rss_kb(*p))
                .sum::<anyhow::Result<f64>>()?,
        );
    }
    Ok(())
}

/// Paced HTTP requests to `http`: 1,000/s over 4 keep-alive connections (`paced_http_*`), and,
/// when the `http` workload measured this path's saturation rate, half that rate over 50
/// connections (`half_load_p99_us`: the tail a busy but not saturated path adds).
async fn paced_http(
    client: &Pod,
    http: SocketAddr,
    secs: u64,
    f: &mut Figures,
) -> anyhow::Result<()> {
    if wants_workload("paced_http") {
        let r = rr(client, (http, true), secs, (4, 250)).await?;
        f.insert("paced_http_p50_us", num(&r, "p50_us")?);
        f.insert("paced_http_p99_us", num(&r, "p99_us")?);
    }
    if wants_workload("half_load")
        && let Some(rps) = f.get("rps").copied()
    {
        const CONNS: u64 = 50;
        let pace = ((rps / 2.0) / CONNS as f64).round().max(1.0) as u64;
        let r = rr(client, (http, true), secs, (CONNS, pace)).await?;
        f.insert("half_load_rps", num(&r, "rps")?);
        f.insert("half_load_p99_us", num(&r, "p99_us")?);
    }
    Ok(())
}

/// Paced requests (1,000/s over 4 connections) for `secs`: the report with `p50_us`, `p99_us`.
async fn paced(client: &Pod, echo: SocketAddr, secs: u64) -> anyhow::Result<Value> {
    rr(client, (echo, false), secs, (4, 250)).await
}

/// `mesh-testpod rr` from `client` to `to` (HTTP GETs when `http`, else echo) for `secs`, over
/// `conns` connections each sending `pace` requests per second: its latency report.
async fn rr(
    client: &Pod,
    (to, http): (SocketAddr, bool),
    secs: u64,
    (conns, pace): (u64, u64),
) -> anyhow::Result<Value> {
    let (to, ms, conns, pace) = (
        to.to_string(),
        (secs * 1000).to_string(),
        conns.to_string(),
        pace.to_string(),
    );
    let mut args = vec![
        "rr",
        "--to",
        &to,
        "--duration-ms",
        &ms,
        "--conns",
        &conns,
        "--pace",
        &pace,
    ];
    if http {
        args.push("--http");
    }
    client.testpod(&args).await
}

/// `flooder` at full speed against `t` for `secs`: wrk over 100 connections and new connections
/// from 8 workers at once. Its requests per second.
async fn flood(flooder: &Pod, t: Targets, secs: u64) -> anyhow::Result<f64> {
    let wrk = flooder
        .command("wrk")?
        .args([
            "-t1",
            "-c100",
            &format!("-d{secs}s"),
            "--latency",
            &format!("http://{}/", t.http),
        ])
        .output();
    let ms = (secs * 1000).to_string();
    let echo = t.echo.to_string();
    let args = [
        "rate",
        "--to",
        &echo,
        "--duration-ms",
        &ms,
        "--concurrency",
        "8",
    ];
    let churn = flooder.testpod(&args);
    let (wrk, churn) = tokio::join!(wrk, churn);
    let wrk = wrk.context("wrk")?;
    churn?;
    Ok(parse_wrk(&String::from_utf8_lossy(&wrk.stdout))?.0)
}

/// See `noisy_neighbour` in the module docs.
async fn noisy_neighbour(secs: u64) -> anyhow::Result<Figures> {
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .with_controller()
        .start()
        .await?;
    let (flooder, quiet, server) = (
        cluster.pod(0, 0).clone(),
        cluster.pod(0, 1).clone(),
        cluster.pod(1, 0).clone(),
    );
    let _servers = servers(&server).await?;
    let t = Targets::pod(&server);
    let mut f = Figures::new();
    for mesh in [false, true] {
        if mesh {
            for p in [&flooder, &quiet, &server] {
                cluster.enroll(p).await?;
            }
        }
        let idle = paced(&quiet, t.echo, secs).await?;
        // The paced run starts once the flood is under way and ends before it does.
        let (rps, noisy) = tokio::join!(flood(&flooder, t, secs + 2), async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            paced(&quiet, t.echo, secs).await
        });
        let (rps, noisy) = (rps?, noisy?);
        let names: [&'static str; 6] = if mesh {
            [
                "mesh_idle_p50_us",
                "mesh_idle_p99_us",
                "mesh_noisy_p50_us",
                "mesh_noisy_p99_us",
                "mesh_flood_rps",
                "mesh_noisy_vs_idle_p99",
            ]
        } else {
            [
                "direct_idle_p50_us",
                "direct_idle_p99_us",
                "direct_noisy_p50_us",
                "direct_noisy_p99_us",
                "direct_flood_rps",
                "direct_noisy_vs_idle_p99",
            ]
        };
        f.insert(names[0], num(&idle, "p50_us")?);
        f.insert(names[1], num(&idle, "p99_us")?);
        f.insert(names[2], num(&noisy, "p50_us")?);
        f.insert(names[3], num(&noisy, "p99_us")?);
        f.insert(names[4], rps);
        f.insert(names[5], num(&noisy, "p99_us")? / num(&idle, "p99_us")?);
    }
    Ok(f)
}

async fn measure(
    client: &Pod,
    t: Targets,
    secs: u64,
    (procs, apps): (&[u32], &[PathBuf]),
) -> anyhow::Result<Figures> {
    let mut f = Figures::new();
    let ms = (secs * 1000).to_string();
    if wants_workload("http") {
        measure_http(client, t.http, secs, (procs, apps), &mut f).await?;
    }
    if wants_workload("paced") {
        let paced = paced(client, t.echo, secs).await?;
        f.insert("paced_p50_us", num(&paced, "p50_us")?);
        f.insert("paced_p99_us", num(&paced, "p99_us")?);
    }
    paced_http(client, t.http_paced, secs, &mut f).await?;
    if wants_workload("rate") {
        let rate = client
            .testpod(&[
                "rate",
                "--to",
                &t.echo.to_string(),
                "--duration-ms",
                &ms,
                "--concurrency",
                "8",
            ])
            .await?;
        anyhow::ensure!(num(&rate, "errors")? == 0.0, "connection errors: {rate}");
        f.insert("connects_per_s", num(&rate, "connects_per_s")?);
    }
    if wants_workload("bulk") {
        let one = bulk(client, t.sink, 1).await?;
        f.insert("bulk_gbps", num(&one, "gbps")?);
        let eight = bulk(client, t.sink, 8).await?;
        f.insert("bulk8_gbps", num(&eight, "gbps")?);
    }
    if wants_workload("memory") {
        memory(client, t, procs, &mut f).await?;
    }
    rss(procs, &mut f)?;
    Ok(f)
}

/// See `upgrade` in the module docs: the same wrk run alone, then while each node's proxy is
/// upgraded once (the server's node, then the client's).
async fn upgrade(secs: u64) -> anyhow::Result<Figures> {
    let (mut cluster, client, server, _servers) = enrolled_pair(
        ClusterBuilder::new()
            .nodes(2)
            .pods_per_node(1)
            .config_stream(),
    )
    .await?;
    // Through the HTTP path (a Service port declared http): it has request boundaries to drain
    // at. Over a port relayed as opaque TCP, each keep-alive connection is cut at the drain
    // deadline with the request it carries (measured: 100 read errors, 50 connections x 2).
    cluster
        .label_pods(&[&server], json!({"app": "web"}))
        .await?;
    let ns = &client.namespace;
    cluster
        .change_config(
            "web.yaml",
            Some(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {ns}}}\nspec:\n  clusterIP: 10.96.0.82\n  selector: {{app: web}}\n  ports: [{{name: http, port: 80, targetPort: {HTTP}}}]\n"
            )),
        )
        .await?;
    let http: SocketAddr = "10.96.0.82:80".parse()?;
    let quiet = wrk_counting(&client, http, secs).await?;
    let upgrades = async {
        tokio::time::sleep(Duration::from_millis(secs * 1000 / 4)).await;
        for node in [1, 0] {
            let status = cluster.upgrade_node(node).await?;
            anyhow::ensure!(status.success(), "node {node}'s old generation: {status}");
        }
        anyhow::Ok(())
    };
    let (during, upgraded) = tokio::join!(wrk_counting(&client, http, secs), upgrades);
    upgraded?;
    let during = during?;
    let mut f = Figures::new();
    f.insert("quiet_rps", quiet.rps);
    f.insert("quiet_p99_us", quiet.p99);
    f.insert("upgrade_rps", during.rps);
    f.insert("upgrade_p99_us", during.p99);
    f.insert("upgrade_rps_ratio", during.rps / quiet.rps);
    f.insert("upgrade_p99_ratio", during.p99 / quiet.p99);
    f.insert("upgrade_failed", (quiet.failed + during.failed) as f64);
    Ok(f)
}

/// A wrk run's throughput, tail and failures (non-2xx answers and socket errors), where
/// `measure_http` refuses a run with any failure.
struct Counted {
    rps: f64,
    p99: f64,
    failed: u64,
}

async fn wrk_counting(client: &Pod, http: SocketAddr, secs: u64) -> anyhow::Result<Counted> {
    let text = wrk(client, http, secs).await?;
    let failed = wrk_failures(&text);
    if failed > 0 {
        eprintln!("  wrk counted {failed} failures:\n{text}");
    }
    // parse_wrk refuses non-2xx answers; they are counted above.
    let kept: String = text
        .lines()
        .filter(|l| !l.trim().starts_with("Non-2xx or 3xx responses:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let (rps, _, _, p99) = parse_wrk(&kept)?;
    Ok(Counted { rps, p99, failed })
}

/// wrk's non-2xx answers plus its socket errors (connect, read, write, timeout).
fn wrk_failures(out: &str) -> u64 {
    let mut n = 0;
    for l in out.lines().map(str::trim) {
        if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            n += v.trim().parse::<u64>().unwrap_or(0);
        }
        if let Some(v) = l.strip_prefix("Socket errors:") {
            n += v
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    n
}

/// 1 GiB to the sink over `streams` connections at once.
async fn bulk(client: &Pod, sink: SocketAddr, streams: u32) -> anyhow::Result<Value> {
    client
        .testpod(&[
            "bulk",
            "--to",
            &sink.to_string(),
            "--bytes",
            &(1u64 << 30).to_string(),
            "--streams",
            &streams.to_string(),
        ])
        .await
}

/// The proxies' RSS while 1,000 echo connections sit idle (each after one round trip), and its
/// peak while 50 connections send 32 MiB each at once.
async fn memory(client: &Pod, t: Targets, procs: &[u32], f: &mut Figures) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let sum = || -> anyhow::Result<f64> { procs.iter().map(|p| procfs::rss_kb(*p)).sum() };
    if procs.is_empty() {
        return Ok(());
    }
    let mut idle = client.command(mesh_tests::find_bin("mesh-testpod")?)?;
    idle.args(["idle", "--to", &t.echo.to_string(), "--conns", "1000"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = idle.spawn().context("mesh-testpod idle")?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let opened = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .context("1,000 idle connections did not open in 60 s")??
        .context("mesh-testpod idle exited before opening its connections")?;
    anyhow::ensure!(opened.contains("1000"), "idle: {opened}");
    // Let per-connection buffers from the round trips be returned before reading.
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.insert("rss_idle1000_kb", sum()?);
    drop(child.stdin.take());
    child.wait().await?;

    let (sink, bytes) = (t.sink.to_string(), (50u64 << 25).to_string());
    let args = ["bulk", "--to", &sink, "--bytes", &bytes, "--streams", "50"];
    let transfer = client.testpod(&args);
    tokio::pin!(transfer);
    let mut peak = 0f64;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            r = &mut transfer => { r?; break; }
            _ = tick.tick() => peak = peak.max(sum()?),
        }
    }
    f.insert("rss_bulk50_kb", peak);
    Ok(())
}

/// The L7 path: the client calls a Service by cluster IP; an HTTPRoute picks the backend and an
/// AuthorizationPolicy is evaluated per request on the server's node.
async fn mesh_l7(secs: u64) -> anyhow::Result<Figures> {
    let (cluster, client, server, _servers) = enrolled_pair(
        ClusterBuilder::new()
            .nodes(2)
            .pods_per_node(1)
            .config_stream(),
    )
    .await?;
    cluster
        .label_pods(&[&server], json!({"app": "web"}))
        .await?;
    let ns = &client.namespace;
    let principal = format!("spiffe://cluster.local/ns/{ns}/sa/{}", client.name);
    cluster
        .change_config(
            "web.yaml",
            Some(&format!(
                r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec:
  clusterIP: 10.96.0.80
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: {HTTP}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-tcp, namespace: {ns}}}
spec:
  clusterIP: 10.96.0.81
  selector: {{app: web}}
  ports: [{{name: web, port: 80, targetPort: {HTTP_TCP}, appProtocol: tcp}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: {ns}}}
spec:
  parentRefs: [{{kind: Service, name: web}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /}}}}]
    backendRefs: [{{name: web, port: 80}}]
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: web, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: ALLOW
  rules:
  - {{from: [{{principals: ["{principal}"]}}], to: [{{ports: [{HTTP}], methods: [GET]}}]}}
  - {{from: [{{principals: ["{principal}"]}}], to: [{{ports: [{HTTP_TCP}]}}]}}
"#
            )),
        )
        .await?;
    let _l4_server = server.serve_http(HTTP_TCP).await?;
    let (pids, apps) = (proxy_pids(&cluster)?, app_cgroups(&cluster));
    let mut f = Figures::new();
    let (l7, l4): (SocketAddr, SocketAddr) = ("10.96.0.80:80".parse()?, "10.96.0.81:80".parse()?);
    let http = wants_workload("http");
    if http {
        measure_http(&client, l7, secs, (&pids, &apps), &mut f).await?;
    }
    paced_http(&client, l7, secs, &mut f).await?;
    rss(&pids, &mut f)?;
    let l7_requests = || async {
        let c = cluster.nodes[1].counters().await?;
        anyhow::Ok(c["l7"]["requests"].as_u64().unwrap_or(0))
    };
    let carried = l7_requests().await?;
    anyhow::ensure!(carried > 0, "the L7 path did not carry the requests");
    // The same cluster, pods and proxies, both paths in turn, each run seconds from the other's:
    // this VM's speed drifts by more than the difference between the paths within a minute, so
    // this ratio is steadier than one of two scenarios each in their own cluster.
    if !http {
        return Ok(f);
    }
    let (mut on_l7, mut on_l4) = (0.0, 0.0);
    for _ in 0..PAIRS {
        let mut run = Figures::new();
        measure_http(&client, l7, secs, (&pids, &apps), &mut run).await?;
        on_l7 += run["rps"];
        eprintln!("  same cluster, L7: {}", brief(&run));
        // Requests still in flight when the L7 run's client stopped are counted as they arrive:
        // wait until the count stands still, or one of them looks like L4 traffic on L7.
        let mut before = l7_requests().await?;
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let now = l7_requests().await?;
            if now == before {
                break;
            }
            before = now;
        }
        measure_http(&client, l4, secs, (&pids, &apps), &mut run).await?;
        on_l4 += run["rps"];
        eprintln!("  same cluster, L4: {}", brief(&run));
        anyhow::ensure!(
            l7_requests().await? == before,
            "the Service declared tcp went through the L7 path"
        );
    }
    f.insert("rps_vs_l4_same_cluster", on_l7 / on_l4);
    Ok(f)
}

/// One wrk run's throughput and what the proxies spent on it, for the log: a round whose ratio
/// is off shows whether the path or the VM changed.
fn brief(f: &Figures) -> String {
    format!(
        "{:.0} requests/s, proxies {:.1} us/request, {:.0}% of the pods' CPU",
        f["rps"],
        f.get("proxy_cpu_us_per_req").copied().unwrap_or(f64::NAN),
        f.get("proxy_cpu_pct_of_app").copied().unwrap_or(f64::NAN),
    )
}

/// A cluster from `builder` with the client on node 0 and the servers on node 1, both enrolled.
async fn enrolled_pair(
    builder: ClusterBuilder,
) -> anyhow::Result<(Cluster, Pod, Pod, Vec<PodProcess>)> {
    let cluster = builder.start().await?;
    let (client, server) = (cluster.pod(0, 0).clone(), cluster.pod(1, 0).clone());
    let processes = servers(&server).await?;
    cluster.enroll(&client).await?;
    cluster.enroll(&server).await?;
    Ok((cluster, client, server, processes))
}

/// The two node proxies' process ids (their CPU and memory are the scenario's).
fn proxy_pids(cluster: &Cluster) -> anyhow::Result<[u32; 2]> {
    Ok([
        cluster.nodes[0].pid().context("node 0")?,
        cluster.nodes[1].pid().context("node 1")?,
    ])
}

async fn servers(p: &Pod) -> anyhow::Result<Vec<PodProcess>> {
    Ok(vec![
        p.serve(ECHO, false).await?,
        p.serve(SINK, true).await?,
        p.serve_http(HTTP).await?,
    ])
}

/// Two haproxy instances, one per node: plain TCP in on node 0, mTLS (TLS 1.3, mutual, verified)
/// to node 1, plain TCP to the server pod. Returns the client's targets and the processes.
async fn haproxy_pair(
    cluster: &Cluster,
    server: &Pod,
) -> anyhow::Result<(Targets, Vec<tokio::process::Child>)> {
    let dir = cluster.dir.join("haproxy");
    std::fs::create_dir_all(&dir)?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Distinct names: a leaf whose subject equals its issuer's looks self-signed to OpenSSL.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bench haproxy CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    for name in ["haproxy-a", "haproxy-b"] {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &ca)?;
        std::fs::write(
            dir.join(format!("{name}.pem")),
            cert.pem() + &key.serialize_pem(),
        )?;
    }
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let d = dir.display();
    let head = "global\n    maxconn 4000\n    log stderr format short local0 warning\ndefaults\n    log global\n    option tcplog\n    mode tcp\n    timeout connect 5s\n    timeout client 1m\n    timeout server 1m\n";
    let mut cfg_a = head.to_string();
    let mut cfg_b = head.to_string();
    // `http7` is the HTTP server again with haproxy in HTTP mode on both sides (parsing each
    // request and answer, keep-alive on both legs): what the mesh's L7 path is compared with.
    for (i, (name, port, mode)) in [
        ("echo", ECHO, "tcp"),
        ("http", HTTP, "tcp"),
        ("sink", SINK, "tcp"),
        ("http7", HTTP, "http"),
    ]
    .into_iter()
    .enumerate()
    {
        let (front, tls) = (9080 + i as u16, 9443 + i as u16);
        cfg_a += &format!(
            "listen {name}\n    mode {mode}\n    bind {}:{front}\n    server b {}:{tls} ssl crt {d}/haproxy-a.pem ca-file {d}/ca.pem verify required verifyhost haproxy-b sni str(haproxy-b) ssl-min-ver TLSv1.3\n",
            a.ipv4, b.ipv4
        );
        cfg_b += &format!(
            "listen {name}\n    mode {mode}\n    bind {}:{tls} ssl crt {d}/haproxy-b.pem ca-file {d}/ca.pem verify required ssl-min-ver TLSv1.3\n    server s {}:{port}\n",
            b.ipv4, server.ipv4
        );
    }
    std::fs::write(dir.join("a.cfg"), cfg_a)?;
    std::fs::write(dir.join("b.cfg"), cfg_b)?;
    let mut procs = Vec::new();
    for (node, cfg) in [(b, "b.cfg"), (a, "a.cfg")] {
        let mut cmd = node.command("haproxy")?;
        cmd.arg("-db")
            .arg("-f")
            .arg(dir.join(cfg))
            .stdout(std::process::Stdio::null());
        procs.push(
            cmd.spawn()
                .context("haproxy (installed by cargo xtask bench)")?,
        );
    }
    let targets = Targets {
        echo: SocketAddr::new(a.ipv4.into(), 9080),
        http: SocketAddr::new(a.ipv4.into(), 9081),
        sink: SocketAddr::new(a.ipv4.into(), 9082),
        http_paced: SocketAddr::new(a.ipv4.into(), 9083),
    };
    for _ in 0..100 {
        if connect_in(&a.netns, targets.echo).await.is_ok() {
            return Ok((targets, procs));
        }
        for p in &mut procs {
            if let Some(status) = p.try_wait()? {
                anyhow::bail!("haproxy exited with {status} (its errors are above)");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("haproxy did not start listening")
}

/// `a`'s figure over `b`'s; "-" where a `--workload` choice left either out.
fn ratio(a: &Figures, b: &Figures, fig: &str) -> String {
    match (a.get(fig), b.get(fig)) {
        (Some(x), Some(y)) => format!("{:.2}x", x / y),
        _ => "-".into(),
    }
}

fn report(results: &BTreeMap<&'static str, Figures>) {
    let names: Vec<&str> = [
        "direct",
        "redirect",
        "mesh_l4",
        "mesh_l4_accel",
        "mesh_l7",
        "haproxy_mtls",
        "noisy_neighbour",
    ]
    .into_iter()
    .filter(|n| results.contains_key(n))
    .collect();
    println!(
        "\n{:<22} {}",
        "figure",
        names.iter().map(|n| format!("{n:>14}")).collect::<String>()
    );
    let figures: std::collections::BTreeSet<&str> = names
        .iter()
        .flat_map(|n| results[n].keys().copied())
        .collect();
    for fig in &figures {
        let row: String = names
            .iter()
            .map(|n| {
                match results[n].get(fig) {
                    None => format!("{:>14}", "-"),
                    // Ratios need their second decimal: 0.77 is not 0.8.
                    Some(v) if fig.contains("_vs_") => format!("{v:>14.2}"),
                    Some(v) => format!("{v:>14.1}"),
                }
            })
            .collect();
        println!("{fig:<22} {row}");
    }
    if let Some(d) = results.get("direct") {
        println!("\nratios to direct (same run):");
        for fig in [
            "rps",
            "paced_p50_us",
            "paced_p99_us",
            "bulk_gbps",
            "bulk8_gbps",
            "connects_per_s",
        ] {
            let row: String = names
                .iter()
                .map(|n| match (results[n].get(fig), d.get(fig)) {
                    (Some(v), Some(base)) => format!("{:>14}", format!("{:.2}x", v / base)),
                    _ => format!("{:>14}", "-"),
                })
                .collect();
            println!("{fig:<22} {row}");
        }
    }
    if let (Some(m), Some(h)) = (results.get("mesh_l4"), results.get("haproxy_mtls")) {
        let over = |fig: &str| ratio(m, h, fig);
        println!(
            "\nmesh_l4 vs haproxy_mtls: rps {}, bulk {}, bulk x8 {}, connects/s {}, CPU/req {}, RSS {}, RSS 1,000 idle {}, RSS 50 bulk {}",
            over("rps"),
            over("bulk_gbps"),
            over("bulk8_gbps"),
            over("connects_per_s"),
            over("proxy_cpu_us_per_req"),
            over("proxy_rss_kb"),
            over("rss_idle1000_kb"),
            over("rss_bulk50_kb")
        );
        let added = |f: &Figures, d: &Figures, fig: &str| match (f.get(fig), d.get(fig)) {
            (Some(a), Some(b)) => format!("{:.0} us", a - b),
            _ => "-".into(),
        };
        if let Some(d) = results.get("direct") {
            for fig in ["paced_p50_us", "paced_p99_us"] {
                println!(
                    "added {fig} over direct: mesh_l4 {}, haproxy_mtls {}",
                    added(m, d, fig),
                    added(h, d, fig)
                );
            }
            // HTTP: haproxy's figures are its HTTP mode's, the comparison for the L7 path.
            let none = Figures::new();
            let l7 = results.get("mesh_l7").unwrap_or(&none);
            for fig in ["paced_http_p50_us", "paced_http_p99_us", "half_load_p99_us"] {
                println!(
                    "added {fig} over direct: mesh_l4 {}, mesh_l7 {}, haproxy_mtls {}",
                    added(m, d, fig),
                    added(l7, d, fig),
                    added(h, d, fig)
                );
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = WORKLOADS.set(args.workloads.clone());
    let want = |s: &str| args.scenarios.is_empty() || args.scenarios.iter().any(|w| w == s);
    let mut rounds = Vec::new();
    for r in 0..args.rounds.max(1) {
        if args.rounds > 1 {
            eprintln!("=== round {} of {}", r + 1, args.rounds);
        }
        rounds.push(round(args.seconds, &want).await?);
    }
    let mut results = medians(&rounds);
    if want("ctrl") {
        eprintln!(
            "==> ctrl: {} pods, {} Services, {} nodes subscribed to an in-process controller",
            mesh_tests::ctrl_bench::PODS,
            mesh_tests::ctrl_bench::SERVICES,
            mesh_tests::ctrl_bench::NODES
        );
        let dir = std::env::temp_dir().join(format!("mesh-bench-ctrl-{}", std::process::id()));
        let figures = mesh_tests::ctrl_bench::run(&dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        results.insert("ctrl", figures?.into_iter().collect());
    }
    if args.rounds > 1 {
        println!("medians of {} rounds", args.rounds);
    }
    report(&results);
    if let (Some(a), Some(l4)) = (results.get("mesh_l4_accel"), results.get("mesh_l4")) {
        println!(
            "\nmesh_l4_accel vs mesh_l4: rps {}, CPU/req {}, paced p99 {}",
            ratio(a, l4, "rps"),
            ratio(a, l4, "proxy_cpu_us_per_req"),
            ratio(a, l4, "paced_p99_us")
        );
    }
    let l7_by_round = by_round(&rounds, ("mesh_l7", "mesh_l4"), "rps");
    if let (Some(l7), Some(l4)) = (results.get("mesh_l7"), results.get("mesh_l4")) {
        println!(
            "\nmesh_l7 vs mesh_l4: rps {} (target >= 0.80), CPU/req {}, proxies' CPU per app CPU {}",
            ratio(l7, l4, "rps"),
            ratio(l7, l4, "proxy_cpu_us_per_req"),
            ratio(l7, l4, "proxy_cpu_pct_of_app")
        );
        if l7_by_round.len() > 1 {
            let shown: Vec<String> = l7_by_round.iter().map(|r| format!("{r:.2}")).collect();
            println!("  rps ratio in each round: {}", shown.join(", "));
        }
    }
    if let Some(same) = results
        .get("mesh_l7")
        .and_then(|l7| l7.get("rps_vs_l4_same_cluster"))
    {
        let each: Vec<String> = rounds
            .iter()
            .filter_map(|r| r.get("mesh_l7")?.get("rps_vs_l4_same_cluster"))
            .map(|v| format!("{v:.2}"))
            .collect();
        println!(
            "mesh_l7 vs the L4 path in the same cluster ({PAIRS} alternating pairs of wrk runs): rps {:.2}x (target >= 0.80); each round: {}",
            same,
            each.join(", ")
        );
    }
    if let Some(u) = results.get("upgrade") {
        println!(
            "\nupgrade: requests/s {:.2}x and p99 {:.2}x of the same run without one; failed requests {} (must be 0)",
            u["upgrade_rps_ratio"], u["upgrade_p99_ratio"], u["upgrade_failed"]
        );
    }
    if let Some(ctrl) = results.get("ctrl") {
        println!(
            "\nctrl: snapshot computation {:.0} ms (target < 1000), one pod change to all {} nodes {:.0} ms (target < 100), controller memory {:.0} MiB, {} resources",
            ctrl["snapshot_ms"],
            ctrl["nodes"],
            ctrl["fanout_ms"],
            ctrl["rss_kb"] / 1024.0,
            ctrl["resources"]
        );
    }
    if let Some(path) = args.json {
        let out = json!({
            "rounds": args.rounds.max(1),
            "scenarios": results,
            "mesh_l7_vs_mesh_l4_rps_by_round": l7_by_round,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&out)? + "\n")?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// `figure` of scenario `a` over scenario `b` in each round that measured both: rounds run the
/// scenarios back to back, so a round's ratio is free of the drift between rounds.
fn by_round(
    rounds: &[BTreeMap<&'static str, Figures>],
    (a, b): (&str, &str),
    figure: &str,
) -> Vec<f64> {
    rounds
        .iter()
        .filter_map(|r| Some(r.get(a)?.get(figure)? / r.get(b)?.get(figure)?))
        .collect()
}

/// Each figure's median over the rounds that measured it (the upper middle of an even count).
fn medians(rounds: &[BTreeMap<&'static str, Figures>]) -> BTreeMap<&'static str, Figures> {
    let mut all: BTreeMap<&'static str, BTreeMap<&'static str, Vec<f64>>> = BTreeMap::new();
    for r in rounds {
        for (scenario, figures) in r {
            for (figure, v) in figures {
                all.entry(scenario)
                    .or_default()
                    .entry(figure)
                    .or_default()
                    .push(*v);
            }
        }
    }
    all.into_iter()
        .map(|(scenario, figures)| {
            let figures = figures
                .into_iter()
                .map(|(figure, mut vs)| {
                    vs.sort_by(f64::total_cmp);
                    (figure, vs[vs.len() / 2])
                })
                .collect();
            (scenario, figures)
        })
        .collect()
}

/// One run of every chosen scenario (except `ctrl`).
async fn round(
    secs: u64,
    want: &dyn Fn(&str) -> bool,
) -> anyhow::Result<BTreeMap<&'static str, Figures>> {
    let mut results: BTreeMap<&'static str, Figures> = BTreeMap::new();

    if want("direct") || want("redirect") {
        let cluster = ClusterBuilder::new()
            .nodes(2)
            .pods_per_node(1)
            .start()
            .await?;
        let (client, server) = (cluster.pod(0, 0).clone(), cluster.pod(1, 0).clone());
        let _servers = servers(&server).await?;
        if want("direct") {
            eprintln!("==> direct: pod on node 0 -> pod on node 1, no proxy");
            results.insert(
                "direct",
                measure(&client, Targets::pod(&server), secs, (&[], &[])).await?,
            );
        }
        if want("redirect") {
            cluster.enroll(&client).await?;
            eprintln!("==> redirect: the client enrolled; eBPF redirect + node proxy, plain TCP");
            let pid = cluster.nodes[0].pid().context("node 0 proxy")?;
            results.insert(
                "redirect",
                measure(
                    &client,
                    Targets::pod(&server),
                    secs,
                    (&[pid], &app_cgroups(&cluster)),
                )
                .await?,
            );
        }
    }
    if want("upgrade") {
        eprintln!("==> upgrade: wrk alone, then while each node's proxy is upgraded");
        results.insert("upgrade", upgrade(secs).await?);
    }
    // Right before mesh_l4: their wrk runs are seconds apart, so the VM's drift between them is
    // small, and their ratio is the target.
    if want("mesh_l7") {
        eprintln!(
            "==> mesh_l7: a Service by cluster IP, HTTPRoute and per-request authorization on"
        );
        results.insert("mesh_l7", mesh_l7(secs).await?);
    }
    if want("mesh_l4") || want("haproxy_mtls") {
        let cluster = ClusterBuilder::new()
            .nodes(2)
            .pods_per_node(2)
            .with_controller()
            .start()
            .await?;
        let (client, outsider, server) = (
            cluster.pod(0, 0).clone(),
            cluster.pod(0, 1).clone(),
            cluster.pod(1, 0).clone(),
        );
        let _servers = servers(&server).await?;
        cluster.enroll(&client).await?;
        cluster.enroll(&server).await?;
        if want("mesh_l4") {
            eprintln!("==> mesh_l4: both pods enrolled; two node proxies, HBONE over mTLS");
            let (pids, apps) = (proxy_pids(&cluster)?, app_cgroups(&cluster));
            results.insert(
                "mesh_l4",
                measure(&client, Targets::pod(&server), secs, (&pids, &apps)).await?,
            );
        }
        if want("haproxy_mtls") {
            eprintln!("==> haproxy_mtls: a pod outside the mesh through two haproxies doing mTLS");
            let (targets, procs) = haproxy_pair(&cluster, &server).await?;
            let pids: Vec<u32> = procs.iter().filter_map(|p| p.id()).collect();
            results.insert(
                "haproxy_mtls",
                measure(&outsider, targets, secs, (&pids, &app_cgroups(&cluster))).await?,
            );
        }
    }
    if want("noisy_neighbour") {
        eprintln!("==> noisy_neighbour: one pod floods, another sends paced requests");
        results.insert("noisy_neighbour", noisy_neighbour(secs).await?);
    }
    if want("mesh_l4_accel") {
        let builder = ClusterBuilder::new()
            .nodes(2)
            .pods_per_node(1)
            .with_controller()
            .node_args(&["--socket-acceleration", "on"]);
        let (cluster, client, server, _servers) = enrolled_pair(builder).await?;
        eprintln!("==> mesh_l4_accel: mesh_l4 with socket acceleration on");
        let (pids, apps) = (proxy_pids(&cluster)?, app_cgroups(&cluster));
        results.insert(
            "mesh_l4_accel",
            measure(&client, Targets::pod(&server), secs, (&pids, &apps)).await?,
        );
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::parse_wrk;

    const OK: &str = "Running 4s test @ http://10.96.0.80:80/
  2 threads and 50 connections
  Latency Distribution
     50%    1.96ms
     75%    2.50ms
     90%    3.10ms
     99%    3.91ms
  96755 requests in 4.00s, 10.15MB read
Requests/sec:  24188.90
Transfer/sec:      2.54MB
";

    #[test]
    fn wrk_figures_and_failed_answers() {
        let (rps, total, p50, p99) = parse_wrk(OK).unwrap();
        assert_eq!((rps, total, p50, p99), (24188.9, 96755.0, 1960.0, 3910.0));
        let denied = OK.replace(
            "Requests/sec:",
            "  Non-2xx or 3xx responses: 96755\nRequests/sec:",
        );
        let e = parse_wrk(&denied).unwrap_err().to_string();
        assert!(e.contains("96755 4xx or 5xx answers"), "{e}");
    }
}
