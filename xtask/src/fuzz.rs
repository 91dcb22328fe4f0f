//! `cargo xtask fuzz [--seconds N] [TARGET]...`: builds the fuzz targets with libFuzzer's
//! coverage instrumentation (what cargo-fuzz does, without needing cargo-fuzz or a nightly
//! toolchain) and runs each for N seconds, from its committed corpus plus what earlier runs
//! found. A crash fails the task and leaves its input under `target/fuzz/artifacts/`; commit it
//! to the target's corpus once fixed, and `cargo test` replays it from then on.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, bail};

use crate::root;

/// The fuzz crates and their targets (one binary each, named like the corpus directory).
const CRATES: &[(&str, &[&str])] = &[
    (
        "mesh-node/fuzz",
        &[
            "request_framing",
            "relay",
            "answer",
            "chunked",
            "response_head",
            "path",
            "headers",
            "placement",
            "config_update",
        ],
    ),
    ("mesh-ctrl/fuzz", &["check"]),
];

/// libFuzzer's instrumentation, as cargo-fuzz passes it (`-s none`: safe Rust needs no ASan),
/// with debug assertions and overflow checks on so arithmetic bugs panic.
const RUSTFLAGS: &str = "-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

/// Given with `--target` so that build scripts and proc macros are not instrumented.
const TARGET: &str = "x86_64-unknown-linux-gnu";

pub struct Options {
    seconds: u64,
    targets: Vec<String>,
}

impl Options {
    pub fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut o = Options {
            seconds: 60,
            targets: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--seconds" => {
                    let v = it.next().context("--seconds needs a number")?;
                    o.seconds = v
                        .parse()
                        .ok()
                        .filter(|s| *s > 0)
                        .with_context(|| format!("--seconds {v:?}: a positive number"))?;
                }
                t if all_targets().any(|(_, name)| name == t) => o.targets.push(t.to_string()),
                other => bail!(
                    "unknown fuzz target or flag {other:?}; targets: {}",
                    all_targets().map(|(_, t)| t).collect::<Vec<_>>().join(", ")
                ),
            }
        }
        Ok(o)
    }
}

fn all_targets() -> impl Iterator<Item = (&'static str, &'static str)> {
    CRATES
        .iter()
        .flat_map(|(dir, ts)| ts.iter().map(move |t| (*dir, *t)))
}

/// What one target's run did.
struct Run {
    target: &'static str,
    executions: u64,
    seconds: f64,
    corpus: usize,
    crash: Option<PathBuf>,
}

pub fn fuzz(o: &Options) -> anyhow::Result<()> {
    crate::toolchain::install(crate::toolchain::FUZZ_PACKAGES)?;
    let out = root().join("target/fuzz");
    for (dir, _) in CRATES {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--bins", "--target", TARGET])
            .arg("--target-dir")
            .arg(&out)
            .current_dir(root().join(dir))
            .env("RUSTFLAGS", RUSTFLAGS)
            .status()
            .with_context(|| format!("building {dir}"))?;
        if !status.success() {
            bail!("building the fuzz targets of {dir} failed");
        }
    }
    let mut runs = Vec::new();
    for (dir, target) in all_targets() {
        if !o.targets.is_empty() && !o.targets.iter().any(|t| t == target) {
            continue;
        }
        runs.push(run(&out, dir, target, o.seconds)?);
    }
    let mut history = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("history.tsv"))?;
    eprintln!("target            executions   seconds   corpus   result");
    for r in &runs {
        let result = r
            .crash
            .as_ref()
            .map_or("ok".to_string(), |c| format!("CRASH {}", c.display()));
        eprintln!(
            "{:<16} {:>11} {:>9.0} {:>8}   {result}",
            r.target, r.executions, r.seconds, r.corpus
        );
        writeln!(
            history,
            "{}\t{}\t{}\t{:.0}\t{}\t{result}",
            unix_now(),
            r.target,
            r.executions,
            r.seconds,
            r.corpus
        )?;
    }
    let crashed: Vec<_> = runs.iter().filter(|r| r.crash.is_some()).collect();
    if !crashed.is_empty() {
        bail!(
            "{} fuzz target(s) crashed; reproduce with target/fuzz/{TARGET}/release/<target> <input>",
            crashed.len()
        );
    }
    Ok(())
}

/// Runs one target for `seconds`: new inputs go to a working corpus under `target/fuzz`; the
/// committed one is read, never written.
fn run(out: &Path, dir: &str, target: &'static str, seconds: u64) -> anyhow::Result<Run> {
    let committed = root().join(dir).join("corpus").join(target);
    let work = out.join("corpus").join(target);
    let artifacts = out.join("artifacts").join(target);
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&artifacts)?;
    let bin = out.join(TARGET).join("release").join(target);
    eprintln!("==> fuzzing {target} for {seconds} s");
    let started = Instant::now();
    let output = Command::new(&bin)
        .arg(&work)
        .arg(&committed)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // Inputs that take a second or a gigabyte are bugs too (a flood's worth of work).
        .args(["-timeout=5", "-rss_limit_mb=2048", "-print_final_stats=1"])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let log = String::from_utf8_lossy(&output.stderr);
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let crash = log
        .lines()
        .find_map(|l| l.split("Test unit written to ").nth(1))
        .map(|p| PathBuf::from(p.trim()));
    if crash.is_some() || !output.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    let crash = match crash {
        Some(c) => Some(c),
        None if !output.status.success() => Some(artifacts.clone()),
        None => None,
    };
    Ok(Run {
        target,
        executions: stat("number_of_executed_units").unwrap_or(0),
        seconds: started.elapsed().as_secs_f64(),
        corpus: std::fs::read_dir(&work).map(|d| d.count()).unwrap_or(0),
        crash,
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_name_known_targets_only() {
        let o = Options::parse(&args(&["--seconds", "5", "path", "check"])).unwrap();
        assert_eq!((o.seconds, o.targets.len()), (5, 2));
        assert!(Options::parse(&args(&["nope"])).is_err());
        assert!(Options::parse(&args(&["--seconds", "0"])).is_err());
    }

    #[test]
    fn every_target_has_a_committed_corpus_and_a_source() {
        for (dir, t) in all_targets() {
            let d = root().join(dir);
            assert!(d.join("corpus").join(t).is_dir(), "{dir}: corpus/{t}");
            assert!(
                d.join("fuzz_targets").join(format!("{t}.rs")).is_file(),
                "{dir}: fuzz_targets/{t}.rs"
            );
        }
    }
}
