//! `cargo xtask bench`: the same workloads pod to pod across two nodes, direct and through the
//! mesh, in one run, reported as figures and as ratios to the direct baseline.
//!
//! Scenarios: `direct` (client pod not enrolled) and `redirect` (client pod enrolled: eBPF
//! redirect + node proxy relay, plain TCP). Figures:
//! - `connects_per_s`: connect + one echo round trip + close, 8 in parallel;
//! - `rps`, `p50_us`, `p99_us`: 64-byte request/response on 16 persistent connections, unpaced;
//! - `paced_p50_us`, `paced_p99_us`: the same at 4 x 250 requests/s (latency without queueing);
//! - `bulk_gbps`: one connection streaming 1 GiB into a sink;
//! - `proxy_cpu_us_per_req`: node proxy CPU time (user+sys) per request of the unpaced run;
//! - `proxy_rss_kb`: node proxy resident memory after the runs.
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use mesh_tests::{ClusterBuilder, Pod};
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// Also write `{"scenarios": {NAME: {FIGURE: number}}}` here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seconds per timed workload.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
}

type Figures = BTreeMap<&'static str, f64>;

fn num(v: &Value, k: &str) -> anyhow::Result<f64> {
    v[k].as_f64().with_context(|| format!("no {k} in {v}"))
}

/// CPU ticks (user + system) of a process.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn rss_kb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

async fn run(
    client: &Pod,
    echo: SocketAddr,
    sink: SocketAddr,
    secs: u64,
    proxy_pid: Option<u32>,
) -> anyhow::Result<Figures> {
    let ms = (secs * 1000).to_string();
    let mut f = Figures::new();
    let rate = client
        .testpod(&[
            "rate",
            "--to",
            &echo.to_string(),
            "--duration-ms",
            &ms,
            "--concurrency",
            "8",
        ])
        .await?;
    f.insert("connects_per_s", num(&rate, "connects_per_s")?);

    let ticks_before = proxy_pid.map(cpu_ticks).transpose()?;
    let rr = client
        .testpod(&[
            "rr",
            "--to",
            &echo.to_string(),
            "--duration-ms",
            &ms,
            "--conns",
            "16",
        ])
        .await?;
    f.insert("rps", num(&rr, "rps")?);
    f.insert("p50_us", num(&rr, "p50_us")?);
    f.insert("p99_us", num(&rr, "p99_us")?);
    if let (Some(pid), Some(before)) = (proxy_pid, ticks_before) {
        let ticks = cpu_ticks(pid)? - before;
        // Kernel clock ticks are 100 Hz on every Linux configuration we build for.
        let us = ticks as f64 * 10_000.0;
        f.insert("proxy_cpu_us_per_req", us / num(&rr, "requests")?);
    }

    let paced = client
        .testpod(&[
            "rr",
            "--to",
            &echo.to_string(),
            "--duration-ms",
            &ms,
            "--conns",
            "4",
            "--pace",
            "250",
        ])
        .await?;
    f.insert("paced_p50_us", num(&paced, "p50_us")?);
    f.insert("paced_p99_us", num(&paced, "p99_us")?);

    let bulk = client
        .testpod(&[
            "bulk",
            "--to",
            &sink.to_string(),
            "--bytes",
            &(1u64 << 30).to_string(),
        ])
        .await?;
    f.insert("bulk_gbps", num(&bulk, "gbps")?);
    if let Some(pid) = proxy_pid {
        f.insert("proxy_rss_kb", rss_kb(pid)?);
    }
    Ok(f)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .start()
        .await?;
    let client = cluster.pod(0, 0).clone();
    let server = cluster.pod(1, 0).clone();
    let _echo = server.serve(8080, false).await?;
    let _sink = server.serve(8081, true).await?;
    let (echo, sink) = (server.addr(false, 8080), server.addr(false, 8081));

    eprintln!("==> direct: pod on node 0 -> pod on node 1, not enrolled");
    let direct = run(&client, echo, sink, args.seconds, None).await?;
    cluster.enroll(&client).await?;
    eprintln!("==> redirect: the same pod enrolled (eBPF redirect + node proxy, plain TCP)");
    let redirect = run(&client, echo, sink, args.seconds, cluster.nodes[0].pid()).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;

    println!(
        "\n{:<22} {:>12} {:>12} {:>9}",
        "figure", "direct", "redirect", "ratio"
    );
    for (k, d) in &direct {
        let r = redirect[k];
        println!("{k:<22} {d:>12.1} {r:>12.1} {:>8.2}x", r / d);
    }
    for (k, r) in redirect.iter().filter(|(k, _)| !direct.contains_key(*k)) {
        println!("{k:<22} {:>12} {r:>12.1} {:>9}", "-", "-");
    }
    if let Some(path) = args.json {
        let out = json!({"scenarios": {"direct": direct, "redirect": redirect}});
        std::fs::write(&path, serde_json::to_string_pretty(&out)? + "\n")?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
