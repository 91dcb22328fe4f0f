//! `cargo xtask test-kernels`: mesh-node's start-up probe and the kernel-facing end-to-end tests
//! on the LTS kernels production nodes run (Debian's 6.1 and 6.12), each booted in QEMU.
//!
//! The guest runs the host's own files: the host's `/` is shared read-only over virtio-9p under a
//! tmpfs overlay, so the release binaries built here, the test tools and their libraries are all
//! there. A small busybox initramfs loads the modules the tests need, mounts that root, runs a
//! script from a second (writable) 9p share and powers off. Results come back through that share.
//! Software emulation only: this machine's /dev/kvm cannot run stock kernels (see
//! `../shared/kernel-matrix.md`).
use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::toolchain;

/// A kernel of the matrix: the newest Debian package whose name matches.
struct Kernel {
    label: &'static str,
    /// `apt-cache search --names-only` pattern.
    package: &'static str,
    /// What the start-up probe must say on this kernel (feature -> available). The README's
    /// kernel table states the same; a kernel that changes its answers fails the matrix.
    expect: &'static [(&'static str, bool)],
}

/// 6.1 and 6.12 answer alike: no `bpf_get_netns_cookie` in cgroup_skb, so the BTF form runs;
/// socket acceleration works with BTF read from the file.
const LTS_EXPECT: &[(&str, bool)] = &[
    ("helper_get_netns_cookie_cgroup_skb", false),
    ("helper_skc_to_tcp_sock_cgroup_skb", true),
    ("btf_sock_netns", true),
    ("inbound_pod_lookup", true),
    ("socket_acceleration", true),
];

const KERNELS: &[Kernel] = &[
    Kernel {
        label: "6.1",
        package: r"^linux-image-6\.1\.0-[0-9]+-amd64$",
        expect: LTS_EXPECT,
    },
    Kernel {
        label: "6.12",
        package: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
        expect: LTS_EXPECT,
    },
];

/// The end-to-end test targets that exercise the kernel: redirection and fail-closed
/// (`redirect`), STRICT/PERMISSIVE (`inbound_mode`), mTLS between nodes (`mtls`), socket
/// acceleration (`accel`), start-up failures (`cli`), passthrough from the pod's namespace
/// (`egress`) and listener hand-over (`upgrade`).
pub const TESTS: &[&str] = &[
    "redirect",
    "inbound_mode",
    "mtls",
    "accel",
    "cli",
    "egress",
    "upgrade",
];

/// Tests of `TESTS` that do not run in the guests: what they prove is the proxy's own (user
/// space), the same on every kernel, and their load means little under software emulation.
/// The drain at protocol boundaries, the state kept in the state directory and the readiness
/// gate of a hand-over: the hand-over and the pinned maps' layouts, which do depend on the
/// kernel, are tested in the guests by the rest of `upgrade`.
const HOST_ONLY: &[&str] = &[
    "upgrading_either_node_fails_no_request",
    "a_long_opaque_stream_lasts_until_the_drain_deadline_and_counts_as_cut",
    "an_upgrade_with_the_controller_away_serves_with_the_certificates_held",
    "a_new_generation_that_is_not_ready_leaves_the_node_to_the_running_one",
];

/// Modules the guest loads (with their dependencies); built-in ones are skipped.
const MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "veth",
    "bridge",
    // The egress test's node firewall rule. nf_tables needs libcrc32c, which needs a crc32c
    // implementation loaded first (a soft dependency: modules.dep does not list it).
    "crc32c_generic",
    "nf_tables",
];

/// What the matrix needs from Debian besides the toolchain.
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "xz-utils",
    "zstd",
];

/// Longest a kernel's whole run may take before it is stopped and counted as failed.
const GUEST_TIMEOUT: Duration = Duration::from_secs(25 * 60);

fn cache_dir() -> PathBuf {
    toolchain::cache_root().join("kernels")
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Orders names with their numbers compared as numbers (6.1.0-57 after 6.1.0-9).
fn natural_key(s: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut digits = String::new();
    let mut text = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !text.is_empty() {
                out.push((0, std::mem::take(&mut text)));
            }
            digits.push(c);
        } else {
            if !digits.is_empty() {
                out.push((digits.parse().unwrap_or(u64::MAX), String::new()));
                digits.clear();
            }
            text.push(c);
        }
    }
    if !digits.is_empty() {
        out.push((digits.parse().unwrap_or(u64::MAX), String::new()));
    }
    if !text.is_empty() {
        out.push((0, text));
    }
    out
}

/// The newest package matching `pattern`, updating apt's lists once if none is known.
fn newest_package(pattern: &str) -> anyhow::Result<String> {
    let search = || {
        run(Command::new("apt-cache").args(["search", "--names-only", pattern])).map(|out| {
            out.lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string)
                .max_by_key(|n| natural_key(n))
        })
    };
    if let Some(p) = search()? {
        return Ok(p);
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    search()?.with_context(|| format!("no Debian package matches {pattern}"))
}

/// A kernel unpacked in the cache: its image and modules.
struct Unpacked {
    vmlinuz: PathBuf,
    modules: PathBuf,
}

fn unpack(package: &str) -> anyhow::Result<Unpacked> {
    let dir = cache_dir().join(package);
    let done = dir.join(".unpacked");
    if !done.is_file() {
        eprintln!("==> fetching {package}");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        run(Command::new("apt-get")
            .args(["download", package])
            .current_dir(&dir))?;
        let deb = std::fs::read_dir(&dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
        std::fs::remove_file(&deb)?;
        let version = only_entry(&dir.join("lib/modules"))?;
        run(Command::new("depmod").arg("-b").arg(&dir).arg(&version))?;
        std::fs::write(&done, "")?;
    }
    let version = only_entry(&dir.join("lib/modules"))?;
    Ok(Unpacked {
        vmlinuz: dir.join("boot").join(format!("vmlinuz-{version}")),
        modules: dir.join("lib/modules").join(version),
    })
}

fn only_entry(dir: &Path) -> anyhow::Result<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.len() != 1 {
        bail!("expected one entry in {}, found {names:?}", dir.display());
    }
    Ok(names.remove(0))
}

/// The modules to load, dependencies first, as paths relative to the modules directory.
fn module_order(modules: &Path) -> anyhow::Result<Vec<String>> {
    let dep = std::fs::read_to_string(modules.join("modules.dep"))?;
    let builtin = std::fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    let name_of = |path: &str| {
        let file = path.rsplit('/').next().unwrap_or(path);
        file.split(".ko").next().unwrap_or(file).replace('-', "_")
    };
    let builtin: HashSet<String> = builtin.lines().map(name_of).collect();
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let needs = rest.split_whitespace().map(name_of).collect();
        deps.insert(name_of(path), (path.to_string(), needs));
    }
    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        builtin: &HashSet<String>,
        seen: &mut HashSet<String>,
        out: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        if builtin.contains(name) || !seen.insert(name.to_string()) {
            return Ok(());
        }
        let (path, needs) = deps
            .get(name)
            .with_context(|| format!("module {name} is neither built in nor in modules.dep"))?;
        for n in needs {
            visit(n, deps, builtin, seen, out)?;
        }
        out.push(path.clone());
        Ok(())
    }
    let (mut seen, mut out) = (HashSet::new(), Vec::new());
    for m in MODULES {
        visit(m, &deps, &builtin, &mut seen, &mut out)?;
    }
    Ok(out)
}

/// A `newc` cpio archive, written by hand: the initramfs is a few files and one device node.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        self.ino += 1;
        let mut h = String::from("070701");
        for v in [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            body.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ] {
            write!(h, "{v:08x}").expect("string");
        }
        self.data.extend_from_slice(h.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.entry(name, 0o100000 | mode, (0, 0), body);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}

/// The guest's first process: modules, the shared root under an overlay, then the test script.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "/lib/mod/$m" || echo "init: insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=loose,ro hostroot /mnt/lower || echo "init: no host root"
mount -t tmpfs -o size=75% tmpfs /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /newroot
mkdir -p /newroot/mnt/results
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 results /newroot/mnt/results
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
chroot /newroot /bin/bash /mnt/results/run.sh
sync
poweroff -f
"#;

fn initramfs(modules: &Path, out: &Path) -> anyhow::Result<()> {
    let order = module_order(modules)?;
    let mut cpio = Cpio::default();
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "mnt",
        "mnt/lower",
        "mnt/rw",
        "newroot",
        "lib",
        "lib/mod",
    ] {
        cpio.dir(d);
    }
    // The kernel opens /dev/console for init's output before devtmpfs is mounted.
    cpio.entry("dev/console", 0o020600, (5, 1), &[]);
    let busybox = std::fs::read("/bin/busybox").context("reading /bin/busybox (busybox-static)")?;
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("init", 0o755, INIT.as_bytes());
    let mut names = Vec::new();
    for path in &order {
        let src = modules.join(path);
        let body = if path.ends_with(".xz") {
            decompress("xz", &src)?
        } else if path.ends_with(".zst") {
            decompress("zstd", &src)?
        } else {
            std::fs::read(&src)?
        };
        let name = format!("m{}.ko", names.len());
        cpio.file(&format!("lib/mod/{name}"), 0o644, &body);
        names.push(name);
    }
    cpio.file("modules.order", 0o644, names.join("\n").as_bytes());
    std::fs::write(out, cpio.finish())?;
    Ok(())
}

fn decompress(tool: &str, src: &Path) -> anyhow::Result<Vec<u8>> {
    let out = Command::new(tool)
        .arg("-dc")
        .arg(src)
        .output()
        .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed", src.display());
    }
    Ok(out.stdout)
}

/// The script the guest runs inside the shared root.
fn guest_script(root: &Path, tests: &[(String, PathBuf)]) -> String {
    let mut s = String::from(
        r#"set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
# Software emulation runs several times slower: tests that wait for buffers to fill wait longer.
export MESH_TEST_TIME_SCALE=4
R=/mnt/results
uname -r > $R/uname
# What a node has: the unified cgroup hierarchy where the tests expect it, and bpffs.
mount -t tmpfs cgroup /sys/fs/cgroup
mkdir -p /sys/fs/cgroup/unified
mount -t cgroup2 none /sys/fs/cgroup/unified
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
# No ulimit here: the guest keeps the kernel's default of 1,024 open files, and mesh-node must
# raise its own limit.
"#,
    );
    writeln!(s, "cd {}", root.display()).expect("string");
    writeln!(
        s,
        "target/release/mesh-node probe > $R/probe.txt 2>&1; echo $? > $R/probe.rc"
    )
    .expect("string");
    writeln!(
        s,
        "target/release/mesh-node probe --json > $R/probe.json 2>/dev/null"
    )
    .expect("string");
    let skip: String = HOST_ONLY.iter().map(|t| format!(" --skip {t}")).collect();
    for (name, bin) in tests {
        writeln!(
            s,
            "start=$(date +%s); {bin} --test-threads=2{skip} > $R/{name}.log 2>&1; echo $? > $R/{name}.rc; echo $(( $(date +%s) - start )) > $R/{name}.secs",
            bin = bin.display()
        )
        .expect("string");
    }
    s.push_str("echo done > $R/done\n");
    s
}

/// Builds the release test binaries of `TESTS` and returns them by target name.
fn test_binaries(root: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut args = vec![
        "test",
        "--release",
        "-p",
        "mesh-tests",
        "--no-run",
        "--message-format=json",
    ];
    for t in TESTS {
        args.extend(["--test", t]);
    }
    let mut cmd = Command::new(cargo);
    cmd.args(&args).current_dir(root);
    if let Some(object) = crate::ebpf_object() {
        cmd.env("MESH_EBPF_OBJECT", object);
    }
    let out = run(&mut cmd)?;
    let mut found = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        if msg["profile"]["test"] == true && TESTS.contains(&name) {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    if found.len() != TESTS.len() {
        bail!("expected test binaries for {TESTS:?}, cargo built {found:?}");
    }
    Ok(found)
}

/// One kernel's outcome.
struct Outcome {
    label: &'static str,
    release: String,
    secs: u64,
    failures: Vec<String>,
    lines: Vec<String>,
}

fn boot(kernel: &Kernel, root: &Path, tests: &[(String, PathBuf)]) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let package = newest_package(kernel.package)?;
    let unpacked = unpack(&package)?;
    let work = root.join("target/kernels").join(kernel.label);
    let _ = std::fs::remove_dir_all(&work);
    let results = work.join("results");
    std::fs::create_dir_all(&results)?;
    let initrd = work.join("initramfs.cpio");
    initramfs(&unpacked.modules, &initrd)?;
    std::fs::write(results.join("run.sh"), guest_script(root, tests))?;
    let console = work.join("console.log");
    eprintln!(
        "==> booting {package} in QEMU (software emulation; console: {})",
        console.display()
    );
    let mut child = Command::new("nice")
        .args(["-n", "5", "qemu-system-x86_64"])
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "3072",
        ])
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&unpacked.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=results,security_model=none",
            results.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let mut timed_out = false;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > GUEST_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let read = |name: &str| {
        std::fs::read_to_string(results.join(name))
            .map(|s| s.trim().to_string())
            .ok()
    };
    let mut out = Outcome {
        label: kernel.label,
        release: read("uname").unwrap_or_else(|| package.clone()),
        secs: started.elapsed().as_secs(),
        failures: Vec::new(),
        lines: Vec::new(),
    };
    if timed_out {
        out.failures
            .push(format!("timed out after {GUEST_TIMEOUT:?}"));
    }
    if read("done").is_none() {
        out.failures.push(format!(
            "the guest did not finish its script (see {})",
            console.display()
        ));
    }
    match read("probe.rc").as_deref() {
        Some("0") => out
            .lines
            .push("mesh-node probe: every required feature present".into()),
        other => out.failures.push(format!(
            "mesh-node probe exited {other:?}: {}",
            read("probe.txt").unwrap_or_default()
        )),
    }
    if let Some(json) = read("probe.json") {
        let probe: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
        let available = |name: &str| {
            probe["features"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|f| f["name"] == name)
                .map(|f| f["available"] == true)
        };
        for (feature, want) in kernel.expect {
            let got = available(feature);
            if got != Some(*want) {
                out.failures.push(format!(
                    "probe: {feature} expected {want}, found {got:?} (update the README's kernel table and this expectation together)"
                ));
            }
        }
        out.lines.push(format!(
            "inbound program: {}",
            probe["ingress"].as_str().unwrap_or("none")
        ));
    }
    for (name, _) in tests {
        let rc = read(&format!("{name}.rc"));
        let log = read(&format!("{name}.log")).unwrap_or_default();
        let summary = log
            .lines()
            .rev()
            .find(|l| l.starts_with("test result:"))
            .unwrap_or("no summary")
            .to_string();
        let secs = read(&format!("{name}.secs")).unwrap_or_default();
        out.lines.push(format!("{name}: {summary} ({secs} s)"));
        if rc.as_deref() != Some("0") {
            let failed: Vec<&str> = log
                .lines()
                .filter(|l| l.starts_with("test ") && l.ends_with("FAILED"))
                .collect();
            out.failures.push(format!(
                "{name} exited {rc:?}: {failed:?} (log: {})\n{}",
                results.join(format!("{name}.log")).display(),
                panics(&log)
            ));
        }
    }
    Ok(out)
}

/// The panic messages in a libtest log, indented, so a CI report says why a test failed without
/// the guest's files (they stay on the machine that ran it).
fn panics(log: &str) -> String {
    let mut out = String::new();
    let mut keep = 0;
    for line in log.lines() {
        if line.contains("panicked at") {
            keep = 6;
        }
        if keep > 0 {
            if line.starts_with("note: run with") || line.starts_with("---- ") {
                keep = 0;
                continue;
            }
            keep -= 1;
            out.push_str("    | ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Which kernels and test targets to run; empty means all.
#[derive(Default)]
pub struct Selection {
    pub kernels: Vec<String>,
    pub tests: Vec<String>,
}

impl Selection {
    /// `[LABEL]... [--test NAME]...`
    pub fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut sel = Self::default();
        let mut args = args.iter();
        while let Some(a) = args.next() {
            if a == "--test" {
                let name = args.next().context("--test needs a test target name")?;
                if !TESTS.contains(&name.as_str()) {
                    bail!("unknown test target {name:?}; the matrix runs {TESTS:?}");
                }
                sel.tests.push(name.clone());
            } else if KERNELS.iter().any(|k| k.label == a) {
                sel.kernels.push(a.clone());
            } else {
                bail!(
                    "unknown kernel {a:?}; labels are {:?}",
                    KERNELS.iter().map(|k| k.label).collect::<Vec<_>>()
                );
            }
        }
        Ok(sel)
    }
}

/// Boots each selected kernel and runs the selected tests there.
pub fn test_kernels(sel: &Selection) -> anyhow::Result<()> {
    toolchain::install(PACKAGES)?;
    let root = crate::root();
    crate::build(true)?;
    let mut tests = test_binaries(&root)?;
    tests.retain(|(name, _)| sel.tests.is_empty() || sel.tests.contains(name));
    let only = &sel.kernels;
    let mut failed = false;
    let mut report = String::new();
    for kernel in KERNELS
        .iter()
        .filter(|k| only.is_empty() || only.iter().any(|o| o == k.label))
    {
        let o = boot(kernel, &root, &tests)?;
        writeln!(report, "kernel {} ({}): {} s", o.label, o.release, o.secs)?;
        for l in &o.lines {
            writeln!(report, "  {l}")?;
        }
        for f in &o.failures {
            writeln!(report, "  FAILED: {f}")?;
        }
        failed |= !o.failures.is_empty();
    }
    eprint!("{report}");
    if failed {
        bail!("the kernel matrix failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_report_carries_the_panic_message() {
        let log = "running 2 tests\ntest a ... ok\ntest b ... FAILED\n\nfailures:\n\n---- b stdout ----\nto local: 3 sends\n\nthread 'b' panicked at tests/accel.rs:101:9:\nno send took the shortcut to remote: {}\nnote: run with `RUST_BACKTRACE=1`\n\nfailures:\n    b\n";
        let p = panics(log);
        assert!(p.contains("panicked at tests/accel.rs:101:9"), "{p}");
        assert!(p.contains("no send took the shortcut to remote"), "{p}");
        assert!(!p.contains("RUST_BACKTRACE"), "{p}");
        assert_eq!(panics("test a ... ok\n"), "");
    }

    #[test]
    fn newest_package_compares_numbers_as_numbers() {
        let names = [
            "linux-image-6.1.0-9-amd64",
            "linux-image-6.1.0-57-amd64",
            "linux-image-6.1.0-56-amd64",
        ];
        let newest = names.iter().max_by_key(|n| natural_key(n)).unwrap();
        assert_eq!(*newest, "linux-image-6.1.0-57-amd64");
        let names = [
            "linux-image-6.12.9+deb12-amd64",
            "linux-image-6.12.118+deb12-amd64",
        ];
        let newest = names.iter().max_by_key(|n| natural_key(n)).unwrap();
        assert_eq!(*newest, "linux-image-6.12.118+deb12-amd64");
    }

    #[test]
    fn cpio_entries_are_aligned_and_end_with_the_trailer() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"abc");
        let data = c.finish();
        assert!(data.starts_with(b"070701"));
        assert!(data.len().is_multiple_of(4));
        let text = String::from_utf8_lossy(&data);
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!\0"));
    }
}
