//! Project tasks: `cargo xtask <setup|build-ebpf|build|test|test-kernels|fuzz|soak|bench|crds|demo>`.
//!
//! Every task that needs the eBPF toolchain runs `setup` first; setup is idempotent and fast when
//! everything is already there.
mod fuzz;
mod kernels;
mod modgraph;
mod toolchain;
mod upgrade_test;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{Context, bail};

const USAGE: &str = "usage: cargo xtask <command>

  setup                 install what this machine lacks (Debian packages, bpf-linker) - idempotent
  build-ebpf            build the eBPF object (target/ebpf/bpfel-unknown-none/release/mesh-ebpf)
  build [--release]     build-ebpf, then the whole workspace (mesh-node embeds the object)
  test                  fmt, no module import cycle, clippy -D warnings, unit tests (which replay the fuzz corpora), end-to-end
                        tests on the real kernel (root), fuzz --seconds 15, then test-kernels
  test-kernels [LABEL]... [--test NAME]...
                        boot Debian's 6.1 and 6.12 LTS kernels in QEMU and run mesh-node's probe
                        and the kernel-facing end-to-end tests there (release builds)
  fuzz [--seconds N] [TARGET]...
                        build the fuzz targets with libFuzzer and run each for N seconds (60)
  bench [--json FILE] [--rounds N] [--scenario S]...
                        every path pod to pod, figures with ratios to direct
  soak [--minutes N] [--json FILE]
                        the cluster in a box under mixed traffic, certificate rotation and config
                        changes for N minutes (10); fails on a failed request or a leak
  modules [CRATE]       print the module import graph of a crate (mesh-node); test fails on a cycle
  crds                  regenerate manifests/crds/ from the Rust types (a test fails on drift)
  upgrade-test --from REV
                        the upgrade proof from REV's node proxy to this tree's (builds REV in a
                        worktree under target/; not in CI)
  demo [--keep]         run the local demo mesh end to end
  demo down             remove everything a kept demo left running";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        println!("{USAGE}");
        return Ok(());
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "setup" => toolchain::setup().map(|_| ()),
        "build-ebpf" => build_ebpf().map(|p| println!("eBPF object: {}", p.display())),
        "build" => build(rest.iter().any(|a| a == "--release")),
        "test" => test(),
        "test-kernels" => {
            require_root("cargo xtask test-kernels")?;
            kernels::test_kernels(&kernels::Selection::parse(rest)?)
        }
        "fuzz" => fuzz::fuzz(&fuzz::Options::parse(rest)?),
        "modules" => modgraph::print(
            &root()
                .join(rest.first().map_or("mesh-node", String::as_str))
                .join("src"),
        ),
        "bench" => {
            build(true)?;
            toolchain::install(toolchain::BENCH_PACKAGES)?;
            run_bin("mesh-bench", rest)
        }
        "upgrade-test" => {
            require_root("cargo xtask upgrade-test")?;
            upgrade_test::run(rest)
        }
        "soak" => {
            require_root("cargo xtask soak")?;
            build(true)?;
            run_bin("mesh-soak", rest)
        }
        "crds" => crds(),
        "demo" => {
            if rest.first().map(String::as_str) == Some("down") {
                // Down needs only the harness binary, built if missing.
                cargo(&[
                    "build",
                    "--release",
                    "-p",
                    "mesh-tests",
                    "--bin",
                    "mesh-demo",
                ])?;
                return run_bin("mesh-demo", rest);
            }
            build(true)?;
            // The demo's clients: curl for the denied request.
            toolchain::install(toolchain::DEMO_PACKAGES)?;
            run_bin("mesh-demo", rest)
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

/// The eBPF object built in this run; mesh-node's build script embeds exactly this file.
static EBPF_OBJECT: OnceLock<PathBuf> = OnceLock::new();

/// Runs the normal (userspace) cargo in the workspace root.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(args).current_dir(root());
    if let Some(object) = EBPF_OBJECT.get() {
        cmd.env("MESH_EBPF_OBJECT", object);
    }
    let status = cmd.status().with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The eBPF object built in this run, if one was.
fn ebpf_object() -> Option<&'static PathBuf> {
    EBPF_OBJECT.get()
}

fn build_ebpf() -> anyhow::Result<PathBuf> {
    let tools = toolchain::setup()?;
    let object = toolchain::build_ebpf(&tools)?;
    Ok(EBPF_OBJECT.get_or_init(|| object).clone())
}

fn build(release: bool) -> anyhow::Result<()> {
    build_ebpf()?;
    let mut args = vec!["build", "--workspace", "--bins"];
    if release {
        args.push("--release");
    }
    cargo(&args)
}

fn require_root(what: &str) -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .unwrap_or("");
    if uid != "0" {
        bail!(
            "{what} needs root: it creates network namespaces, cgroups and eBPF programs on this kernel"
        );
    }
    Ok(())
}

fn test() -> anyhow::Result<()> {
    require_root("cargo xtask test")?;
    warn_if_disk_is_short();
    build_ebpf()?;
    toolchain::install(toolchain::TEST_PACKAGES)?;
    toolchain::install_kubectl()?;
    step("cargo fmt --check", || {
        cargo(&["fmt", "--all", "--", "--check"])
    })?;
    step(
        "no import cycle between modules, none against mesh-node's layers",
        || {
            LAYERED_CRATES
                .iter()
                .try_for_each(|c| modgraph::check(&root().join(c).join("src")))?;
            modgraph::check_layers(&root().join("mesh-node/src"), modgraph::MESH_NODE_LAYERS)
        },
    )?;
    step("cargo clippy -D warnings", || {
        cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
    })?;
    step("build", || cargo(&["build", "--workspace", "--bins"]))?;
    step("cargo test (unit and end-to-end)", || {
        cargo(&["test", "--workspace"])
    })?;
    // Short: new inputs are CI's bonus; the committed corpora were replayed by the unit tests.
    step("fuzz targets, 15 s each", || {
        fuzz::fuzz(&fuzz::Options::parse(&["--seconds".into(), "15".into()])?)
    })?;
    step("kernel matrix (6.1 and 6.12 LTS in QEMU)", || {
        kernels::test_kernels(&kernels::Selection::default())
    })
}

/// Free space a full run needs on `target/`'s filesystem: debug, release, fuzz and VM builds.
const DISK_NEEDED: u64 = 20 << 30;

/// A full disk shows up as the linker dying of SIGBUS ("ld terminated with signal 7 [Bus
/// error]"), which names neither the disk nor the cure; say both before the build starts. A
/// warning, not a refusal: a warm `target/` needs far less.
fn warn_if_disk_is_short() {
    let target = root().join("target");
    let _ = std::fs::create_dir_all(&target);
    let avail = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(&target)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().nth(1).and_then(|l| l.trim().parse::<u64>().ok()));
    if let Some(avail) = avail.filter(|a| *a < DISK_NEEDED) {
        eprintln!(
            "warning: {} GiB free under {}; a full build and test can need {} GiB, and a full \
             disk kills the linker with SIGBUS. `cargo clean` (or deleting \
             target/debug/incremental) frees the stale artifacts.",
            avail >> 30,
            target.display(),
            DISK_NEEDED >> 30
        );
    }
}

/// The crates whose module graph must stay acyclic (data flows one way through them).
const LAYERED_CRATES: &[&str] = &["mesh-node", "mesh-ctrl", "mesh-api"];

fn step(name: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    eprintln!("==> {name}");
    f().with_context(|| format!("step failed: {name}"))
}

fn run_bin(name: &str, args: &[String]) -> anyhow::Result<()> {
    let bin = root().join("target/release").join(name);
    let status = Command::new(&bin)
        .args(args)
        .env("MESH_NODE_BIN", root().join("target/release/mesh-node"))
        .env(
            "MESH_TESTPOD_BIN",
            root().join("target/release/mesh-testpod"),
        )
        .env("MESH_CTRL_BIN", root().join("target/release/mesh-ctrl"))
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

/// The CRDs are generated by `mesh-ctrl crds`, so the schema has one source: the Rust types.
fn crds() -> anyhow::Result<()> {
    let out = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "-p", "mesh-ctrl", "--", "crds"])
        .current_dir(root())
        .output()
        .context("running mesh-ctrl crds")?;
    if !out.status.success() {
        bail!(
            "mesh-ctrl crds failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = root().join("manifests/crds/nodemesh.io.yaml");
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    std::fs::write(&path, &out.stdout).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
