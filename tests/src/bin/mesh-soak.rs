//! `cargo xtask soak --minutes N`: the cluster in a box under mixed traffic for N minutes, while
//! certificates rotate every few seconds and the route configuration changes every few seconds.
//!
//! Traffic, each workload in a loop of its own from an enrolled client pod on node 0 to servers
//! on both nodes: HTTP/1.1 and HTTP/2 requests to a Service (HTTPRoute, two versions), gRPC
//! unary calls and a bidirectional stream, long-lived TCP echo connections, and new TCP
//! connections as fast as 4 workers can open them.
//!
//! It fails on any failed request or connection, on memory or open descriptors of a proxy or the
//! controller growing after warm-up (a leak), or on sockets piling up in CLOSE_WAIT on a node.
//! The figures go to stdout (and `--json`); the exit code says whether it passed.
use std::{future::Future, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::Parser;
use mesh_tests::{Cluster, ClusterBuilder, Pod, procfs};
use serde_json::{Value, json};
use tokio::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Also write the samples and the verdict here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Certificate lifetime; the nodes renew at half of it.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
}

const HTTP: u16 = 8080;
const GRPC: u16 = 9090;
const ECHO: u16 = 7070;
const WEB: &str = "10.96.0.20:80";
const GREETER: &str = "10.96.0.30:9090";
/// How often the resources are sampled, and how long the warm-up lasts at least.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const MIN_WARMUP: Duration = Duration::from_secs(90);
/// Failure details kept per workload (all are counted).
const KEPT_FAILURES: usize = 20;

/// What one workload did.
#[derive(Default)]
struct Outcome {
    rounds: u64,
    units: u64,
    failures: u64,
    details: Vec<String>,
}

/// Runs `round` again and again until `deadline`; each round returns the units it did (requests,
/// connections) or what failed.
async fn repeat<F, Fut>(name: &'static str, deadline: Instant, mut round: F) -> Outcome
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<u64>>,
{
    let mut o = Outcome::default();
    while Instant::now() < deadline {
        o.rounds += 1;
        match round().await {
            Ok(n) => o.units += n,
            Err(e) => {
                o.failures += 1;
                eprintln!("soak: {name} round {} failed: {e:#}", o.rounds);
                if o.details.len() < KEPT_FAILURES {
                    o.details.push(format!("round {}: {e:#}", o.rounds));
                }
            }
        }
    }
    o
}

fn num(v: &Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[k]).as_u64().unwrap_or(0)
}

/// `count` HTTP requests to the web Service; every one must be a 200.
async fn http(client: &Pod, count: u64, conns: u64, h2: bool) -> anyhow::Result<u64> {
    let (c, k) = (count.to_string(), conns.to_string());
    let mut args = vec![
        "get", "--to", WEB, "--path", "/", "--count", &c, "--conns", &k,
    ];
    if h2 {
        args.push("--h2");
    }
    let r = client.testpod(&args).await?;
    if num(&r, &["statuses", "200"]) != count {
        bail!("{r}");
    }
    Ok(count)
}

async fn grpc(client: &Pod) -> anyhow::Result<u64> {
    let r = client
        .testpod(&[
            "grpc-call",
            "--to",
            GREETER,
            "--count",
            "50",
            "--chat",
            "10",
        ])
        .await?;
    if num(&r, &["codes", "0"]) != 50 || num(&r, &["chat_echoed"]) != 10 {
        bail!("{r}");
    }
    Ok(60)
}

/// Long-lived connections echoing for 5 s.
async fn tcp(client: &Pod, echo: &str) -> anyhow::Result<u64> {
    let r = client
        .testpod(&["rr", "--to", echo, "--duration-ms", "5000", "--conns", "4"])
        .await?;
    Ok(num(&r, &["requests"]))
}

/// New connections for 3 s, each one echo; none may fail.
async fn churn(client: &Pod, echo: &str) -> anyhow::Result<u64> {
    let r = client
        .testpod(&[
            "rate",
            "--to",
            echo,
            "--duration-ms",
            "3000",
            "--concurrency",
            "4",
        ])
        .await?;
    if num(&r, &["errors"]) != 0 {
        bail!("{r}");
    }
    Ok(num(&r, &["connects"]))
}

fn route(ns: &str, v1: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web, namespace: {ns}}}\nspec:\n  parentRefs: [{{kind: Service, name: web}}]\n  rules:\n  - backendRefs: [{{name: web-v1, port: 80, weight: {v1}}}, {{name: web-v2, port: 80, weight: {}}}]\n",
        100 - v1
    )
}

fn services(ns: &str) -> String {
    let svc = |name: &str, ip: &str, selector: &str, port: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  clusterIP: {ip}\n  selector: {selector}\n  ports: [{port}]\n---\n"
        )
    };
    let http = format!("{{name: http, port: 80, targetPort: {HTTP}}}");
    svc("web", "10.96.0.20", "{app: web}", &http)
        + &svc("web-v1", "10.96.0.21", "{version: v1}", &http)
        + &svc("web-v2", "10.96.0.22", "{version: v2}", &http)
        + &svc(
            "greeter",
            "10.96.0.30",
            "{app: web}",
            &format!("{{name: grpc, port: {GRPC}, targetPort: {GRPC}}}"),
        )
}

/// One sample of the resources that must not grow.
fn sample(cluster: &Cluster, started: Instant) -> anyhow::Result<Value> {
    let mut procs = Vec::new();
    for n in &cluster.nodes {
        procs.push((n.name.clone(), n.pid().context("node proxy exited")?));
    }
    let ctrl = cluster.ctrl.as_ref().context("controller")?;
    procs.push(("ctrl".into(), ctrl.pid().context("controller exited")?));
    let mut s = json!({"t": started.elapsed().as_secs()});
    for (name, pid) in procs {
        s[&name] = json!({
            "rss_kb": procfs::rss_kb(pid)? as u64,
            "fds": procfs::open_fds(pid)?,
            "close_wait": procfs::close_wait(pid)?,
        });
    }
    Ok(s)
}

/// A leak, if `figure` of `who` grew after warm-up: the median of the last quarter of the
/// samples against the median of the first quarter after warm-up, beyond both a share and an
/// amount (allocators and pools settle in steps).
fn growth(
    samples: &[Value],
    who: &str,
    figure: &str,
    (share, amount): (f64, f64),
) -> Option<String> {
    let vs: Vec<f64> = samples
        .iter()
        .filter_map(|s| s[who][figure].as_f64())
        .collect();
    let q = vs.len() / 4;
    if q == 0 {
        return None;
    }
    let median = |xs: &[f64]| {
        let mut xs = xs.to_vec();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let (first, last) = (median(&vs[..q]), median(&vs[vs.len() - q..]));
    (last > first * (1.0 + share) && last - first > amount)
        .then(|| format!("{who} {figure} grew from {first} to {last} after warm-up"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .config_stream()
        .cert_ttl(args.cert_ttl)
        .start()
        .await?;
    let client = cluster.pod(0, 0).clone();
    let ns = client.namespace.clone();
    let servers = [
        (cluster.pod(1, 0).clone(), "v1"),
        (cluster.pod(0, 1).clone(), "v1"),
        (cluster.pod(1, 1).clone(), "v2"),
    ];
    let mut procs = Vec::new();
    for (p, version) in &servers {
        procs.push(
            p.serve_http_as(HTTP, &format!("{version}-{}", p.name), &[])
                .await?,
        );
        procs.push(
            p.server(&["grpc", "--name", &format!("g-{}", p.name)], GRPC)
                .await?,
        );
        procs.push(p.serve(ECHO, false).await?);
        cluster.enroll(p).await?;
    }
    cluster.enroll(&client).await?;
    cluster.label_versions(&servers).await?;
    cluster
        .change_config("services.yaml", Some(&services(&ns)))
        .await?;
    cluster
        .change_config("route.yaml", Some(&route(&ns, 50)))
        .await?;
    let remote_echo = servers[0].0.addr(false, ECHO).to_string();
    let local_echo = servers[1].0.addr(false, ECHO).to_string();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.minutes * 60);
    eprintln!(
        "soak: {} minutes of mixed traffic, certificates every {:?}, route changes every 5 s",
        args.minutes, args.cert_ttl
    );
    let sampler = async {
        let mut samples = Vec::new();
        while Instant::now() < deadline {
            match sample(&cluster, started) {
                Ok(s) => samples.push(s),
                Err(e) => return Err(e),
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
        Ok(samples)
    };
    let mut weight = 50;
    let (samples, h1, h2, grpc, tcp_remote, tcp_local, churn, config) = tokio::join!(
        sampler,
        repeat("http1", deadline, || http(&client, 200, 4, false)),
        repeat("http2", deadline, || http(&client, 200, 2, true)),
        repeat("grpc", deadline, || grpc(&client)),
        repeat("tcp_remote", deadline, || tcp(&client, &remote_echo)),
        repeat("tcp_local", deadline, || tcp(&client, &local_echo)),
        repeat("new_connections", deadline, || churn(&client, &remote_echo)),
        repeat("config_changes", deadline, || {
            weight = if weight == 90 { 10 } else { 90 };
            let (cluster, yaml) = (&cluster, route(&ns, weight));
            async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                cluster.change_config("route.yaml", Some(&yaml)).await?;
                Ok(1)
            }
        }),
    );
    let samples = samples?;
    let outcomes = [
        ("http1", h1),
        ("http2", h2),
        ("grpc", grpc),
        ("tcp_remote", tcp_remote),
        ("tcp_local", tcp_local),
        ("new_connections", churn),
        ("config_changes", config),
    ];

    let mut problems = Vec::new();
    for (name, o) in &outcomes {
        if o.failures > 0 {
            problems.push(format!(
                "{name}: {} of {} rounds failed",
                o.failures, o.rounds
            ));
        }
    }
    let warm = MIN_WARMUP.max(Duration::from_secs(args.minutes * 60 / 5));
    let after_warmup: Vec<Value> = samples
        .iter()
        .filter(|s| s["t"].as_u64().unwrap_or(0) >= warm.as_secs())
        .cloned()
        .collect();
    let mut who: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    who.push("ctrl".into());
    for w in &who {
        problems.extend(growth(&after_warmup, w, "rss_kb", (0.25, 8192.0)));
        problems.extend(growth(&after_warmup, w, "fds", (0.25, 32.0)));
        let piled = samples
            .last()
            .and_then(|s| s[w]["close_wait"].as_u64())
            .unwrap_or(0);
        if piled > 16 {
            problems.push(format!("{w}: {piled} sockets in CLOSE_WAIT at the end"));
        }
    }
    for n in 0..cluster.nodes.len() {
        let c = cluster.nodes[n].counters().await?;
        let failures = num(&c, &["identity", "stats", "failures"]);
        if failures > 0 {
            problems.push(format!("node {n}: {failures} certificate failures"));
        }
    }
    let rotations: Vec<u64> = {
        let mut r = Vec::new();
        for n in &cluster.nodes {
            r.push(num(
                &n.counters().await?,
                &["identity", "stats", "rotations"],
            ));
        }
        r
    };

    println!("soak: {} minutes, {} samples", args.minutes, samples.len());
    println!(
        "{:<16} {:>8} {:>12} {:>9}",
        "workload", "rounds", "units", "failed"
    );
    for (name, o) in &outcomes {
        println!(
            "{name:<16} {:>8} {:>12} {:>9}",
            o.rounds, o.units, o.failures
        );
    }
    println!("certificate rotations per node: {rotations:?}");
    println!(
        "{:<10} {:>14} {:>14} {:>10} {:>10} {:>12}",
        "process", "rss KiB first", "rss KiB last", "fds first", "fds last", "CLOSE_WAIT"
    );
    let (first, last) = (after_warmup.first(), samples.last());
    for w in &who {
        let f = |s: Option<&Value>, k: &str| s.map_or(0, |s| num(s, &[w, k]));
        println!(
            "{w:<10} {:>14} {:>14} {:>10} {:>10} {:>12}",
            f(first, "rss_kb"),
            f(last, "rss_kb"),
            f(first, "fds"),
            f(last, "fds"),
            f(last, "close_wait")
        );
    }
    let verdict = if problems.is_empty() {
        "passed".to_string()
    } else {
        format!("FAILED: {}", problems.join("; "))
    };
    println!("soak {verdict}");
    if let Some(path) = &args.json {
        let out = json!({
            "minutes": args.minutes,
            "workloads": outcomes.iter().map(|(name, o)| (name.to_string(), json!({
                "rounds": o.rounds, "units": o.units, "failures": o.failures, "details": o.details,
            }))).collect::<serde_json::Map<_, _>>(),
            "rotations": rotations,
            "samples": samples,
            "problems": problems,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)? + "\n")?;
    }
    drop(procs);
    drop(cluster);
    if !problems.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(rss: &[u64]) -> Vec<Value> {
        rss.iter()
            .map(|r| json!({"n0": {"rss_kb": r, "fds": 80}}))
            .collect()
    }

    #[test]
    fn growth_after_warm_up_is_a_leak_and_noise_is_not() {
        let limits = (0.25, 8192.0);
        let flat = samples(&[
            50_000, 52_000, 49_000, 51_000, 50_500, 52_500, 50_000, 51_000,
        ]);
        assert_eq!(growth(&flat, "n0", "rss_kb", limits), None);
        assert_eq!(growth(&flat, "n0", "fds", (0.25, 32.0)), None);
        let leak = samples(&[
            50_000, 51_000, 60_000, 70_000, 80_000, 90_000, 100_000, 110_000,
        ]);
        assert!(growth(&leak, "n0", "rss_kb", limits).is_some());
        // A large share of a small amount is not a leak (a pool's first step).
        let step = samples(&[
            10_000, 10_000, 14_000, 14_000, 14_000, 14_000, 14_000, 14_000,
        ]);
        assert_eq!(growth(&step, "n0", "rss_kb", limits), None);
    }
}
