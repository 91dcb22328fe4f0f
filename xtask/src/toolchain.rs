//! The eBPF toolchain on a Debian machine without rustup's `rust-src` (see
//! `../shared/ebpf-toolchain.md`): Debian's rustc-web ships a prebuilt `core` for
//! `bpfel-unknown-none`; bpf-linker is built once against Debian's LLVM 22 and cached.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// Debian packages: the BPF-capable rustc and its LLVM, bpf-linker's LLVM, and the tools the
/// node proxy and the tests use (bpftool to inspect, iproute2 for the cluster in a box, tcpdump).
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "rust-web-llvm",
    "llvm-22-dev",
    "bpftool",
    "iproute2",
    // The end-to-end tests capture node-to-node traffic to prove it is encrypted.
    "tcpdump",
    // The node proxy's allocator (jemalloc) is built from C source.
    "make",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";

pub struct Tools {
    pub bpf_linker_dir: PathBuf,
}

/// The project's cache on this machine: outside the work tree, so fresh clones reuse it.
pub fn cache_root() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("mesh")
}

/// Where bpf-linker is cached.
fn cache_dir() -> PathBuf {
    cache_root().join(format!("bpf-linker-{BPF_LINKER_VERSION}-llvm22"))
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// The tests need a real Prometheus (the dashboards are checked against it).
/// `chromium` renders the node's live page in the tests (headless, with a screenshot).
/// `nginx` is the real path-decoding server behind the path-policy tests.
pub const TEST_PACKAGES: &[&str] = &["prometheus", "curl", "nghttp2-client", "chromium", "nginx"];

/// What the demo runs in its pods besides the project's own binaries.
pub const DEMO_PACKAGES: &[&str] = &["curl"];

/// `kubectl kustomize` renders the manifests in the tests. Any kubectl on the PATH will do;
/// without one, Debian's.
pub fn install_kubectl() -> anyhow::Result<()> {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Ok(());
    }
    install(&["kubernetes-client"])
}

/// Only the benchmark needs these: the load generator and the comparison proxy.
pub const BENCH_PACKAGES: &[&str] = &["wrk", "haproxy"];

/// libFuzzer (in `libfuzzer-sys`) is built from C++ source.
pub const FUZZ_PACKAGES: &[&str] = &["g++"];

/// Installs the Debian packages of `packages` that are missing.
pub fn install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        eprintln!("==> installing Debian packages: {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args([
                "-o",
                "DPkg::Lock::Timeout=600",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
            ])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

/// Installs whatever is missing; prints nothing when all is in place.
pub fn setup() -> anyhow::Result<Tools> {
    install(PACKAGES)?;
    if !Path::new(BPF_CORE).is_dir() {
        bail!("{BPF_CORE} is missing although libstd-rust-web-dev-bpf is installed");
    }
    let root = cache_dir();
    let bin_dir = root.join("bin");
    let linker = bin_dir.join("bpf-linker");
    if !linker.is_file() {
        eprintln!(
            "==> building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once per machine)"
        );
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        run(Command::new(cargo)
            .args([
                "install",
                "--locked",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            ])
            .args(["--no-default-features", "--features", "llvm-22", "--root"])
            .arg(&root)
            .env("LLVM_PREFIX", LLVM_PREFIX)
            // Keep the workspace's settings out of an unrelated build.
            .current_dir(std::env::temp_dir()))?;
    }
    Ok(Tools {
        bpf_linker_dir: bin_dir,
    })
}

/// Builds `mesh-ebpf` with Debian's rustc and returns the object's path.
pub fn build_ebpf(tools: &Tools) -> anyhow::Result<PathBuf> {
    let root = crate::root();
    let path = format!(
        "{}:/usr/bin:{}",
        tools.bpf_linker_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(DEBIAN_CARGO);
    cmd.args([
        "build",
        "-p",
        "mesh-ebpf",
        "--bins",
        "--release",
        "--target",
        "bpfel-unknown-none",
    ])
    .args(["--target-dir", "target/ebpf"])
    .current_dir(&root)
    .env("PATH", path)
    .env("RUSTC", DEBIAN_RUSTC)
    // aya-ebpf and our atomic add use `asm_experimental_arch`; allow nightly features for these
    // two crates alone.
    .env("RUSTC_BOOTSTRAP", "aya_ebpf,mesh_ebpf")
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        [
            "--cfg=bpf_target_arch=\"x86_64\"",
            "-Cdebuginfo=2",
            "-Clink-arg=--btf",
        ]
        .join("\x1f"),
    )
    // The outer (rustup) cargo's settings must not leak into Debian's.
    .env_remove("RUSTFLAGS")
    .env_remove("RUSTC_WRAPPER")
    .env_remove("RUSTC_WORKSPACE_WRAPPER")
    .env_remove("CARGO_TARGET_DIR")
    .env_remove("CARGO_BUILD_TARGET");
    eprintln!("==> building the eBPF object");
    run(&mut cmd)?;
    let object = root.join("target/ebpf/bpfel-unknown-none/release/mesh-ebpf");
    if !object.is_file() {
        bail!("build succeeded but {} is missing", object.display());
    }
    Ok(object)
}
