//! `cargo xtask upgrade-test --from REV`: the upgrade proof (`tests/upgrade.rs`) from an older
//! revision's node proxy to this tree's. Each node starts on REV's binary. The first upgrade of
//! each node brings this tree's binary; the later ones go from this tree to this tree. Not in
//! CI: it builds a second tree.
use std::process::Command;

use anyhow::{Context, bail, ensure};

use crate::root;

/// The tests that upgrade under load: they run with REV as the first generation.
const PROOF: &[&str] = &[
    "upgrading_either_node_fails_no_request",
    "a_long_opaque_stream_lasts_until_the_drain_deadline_and_counts_as_cut",
    "an_old_generation_killed_mid_drain_fails_no_new_connection",
];

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let rev = match args {
        [flag, rev] if flag == "--from" => rev.clone(),
        _ => bail!("usage: cargo xtask upgrade-test --from GIT_REV"),
    };
    let full = git(&["rev-parse", "--verify", &format!("{rev}^{{commit}}")])
        .with_context(|| format!("{rev} is not a commit of this repository"))?;
    let dir = root().join("target/upgrade-from").join(&full[..12]);
    if !dir.join("Cargo.toml").is_file() {
        let path = dir.to_str().context("a UTF-8 path")?;
        git(&["worktree", "add", "--force", "--detach", path, &full])?;
    }
    println!("==> {rev} ({}) in {}", &full[..12], dir.display());
    // REV's own xtask builds REV's eBPF object, and REV's mesh-node embeds it.
    for args in [
        &["xtask", "build-ebpf"][..],
        &["build", "--release", "-p", "mesh-node"][..],
    ] {
        let status = Command::new("cargo")
            .args(args)
            .current_dir(&dir)
            .status()
            .context("cargo")?;
        ensure!(
            status.success(),
            "cargo {args:?} in {} failed",
            dir.display()
        );
    }
    let from = dir.join("target/release/mesh-node");
    println!("==> this tree");
    crate::build(false)?;
    println!("==> upgrades from {rev} to this tree, under load");
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "-p", "mesh-tests", "--test", "upgrade", "--"])
        .args(PROOF)
        .arg("--exact")
        .env("MESH_NODE_FROM_BIN", &from)
        .current_dir(root());
    let status = cmd.status().context("cargo test")?;
    ensure!(
        status.success(),
        "the upgrade from {rev} failed a request (above)"
    );
    println!("upgrade from {rev}: no request failed");
    Ok(())
}

fn git(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(root())
        .output()
        .context("git")?;
    ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}
