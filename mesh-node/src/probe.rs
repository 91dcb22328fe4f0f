//! Start-up checks: refuse to run, naming the missing kernel feature, rather than fail obscurely
//! half-way through loading.
use std::path::Path;

use crate::sys;

/// A kernel or privilege requirement that is not met.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("kernel {found} is too old: {feature} needs Linux {needed} or newer")]
    KernelTooOld {
        found: String,
        needed: &'static str,
        feature: &'static str,
    },
    #[error(
        "{path} is not a cgroup v2 directory ({reason}): mesh-node attaches to the unified hierarchy"
    )]
    NoCgroup2 { path: String, reason: String },
    #[error("missing capability {cap}: {why}")]
    MissingCapability {
        cap: &'static str,
        why: &'static str,
    },
    #[error("no usable BPF filesystem at {path}: {reason}")]
    NoBpffs { path: String, reason: String },
    #[error("cannot read kernel facts: {0}")]
    Io(#[source] std::io::Error),
}

/// cgroup sock_addr links need 5.7; `SO_NETNS_COOKIE`, with which pods are enrolled, needs 5.14.
const MIN_KERNEL: (u32, u32) = (5, 14);

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Checks everything mesh-node needs before it touches the kernel. Mounts bpffs if missing.
pub fn check(cgroup: &Path, bpffs: &Path) -> Result<(), ProbeError> {
    let (major, minor) = sys::kernel_version().map_err(ProbeError::Io)?;
    if (major, minor) < MIN_KERNEL {
        return Err(ProbeError::KernelTooOld {
            found: format!("{major}.{minor}"),
            needed: "5.14",
            feature: "cgroup connect links with network-namespace cookies (SO_NETNS_COOKIE)",
        });
    }
    check_caps(sys::effective_caps().map_err(ProbeError::Io)?)?;
    match sys::fs_magic(cgroup) {
        Ok(sys::CGROUP2_SUPER_MAGIC) => {}
        Ok(other) => {
            return Err(ProbeError::NoCgroup2 {
                path: cgroup.display().to_string(),
                reason: format!("filesystem magic {other:#x}"),
            });
        }
        Err(e) => {
            return Err(ProbeError::NoCgroup2 {
                path: cgroup.display().to_string(),
                reason: e.to_string(),
            });
        }
    }
    ensure_bpffs(bpffs)
}

fn check_caps(caps: u64) -> Result<(), ProbeError> {
    let has = |cap: u32| caps & (1 << cap) != 0;
    // CAP_SYS_ADMIN implies the BPF rights on every kernel that has CAP_BPF.
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        return Err(ProbeError::MissingCapability {
            cap: "CAP_BPF",
            why: "needed to load the redirect programs",
        });
    }
    if !has(CAP_NET_ADMIN) {
        return Err(ProbeError::MissingCapability {
            cap: "CAP_NET_ADMIN",
            why: "needed to attach programs to cgroups",
        });
    }
    if !has(CAP_SYS_ADMIN) {
        return Err(ProbeError::MissingCapability {
            cap: "CAP_SYS_ADMIN",
            why: "needed to enter pod network namespaces (setns) and mount bpffs",
        });
    }
    Ok(())
}

fn ensure_bpffs(bpffs: &Path) -> Result<(), ProbeError> {
    let no = |reason: String| ProbeError::NoBpffs {
        path: bpffs.display().to_string(),
        reason,
    };
    if sys::fs_magic(bpffs).ok() == Some(sys::BPF_FS_MAGIC) {
        return Ok(());
    }
    std::fs::create_dir_all(bpffs).map_err(|e| no(format!("cannot create it: {e}")))?;
    sys::mount_bpffs(bpffs).map_err(|e| no(format!("mount -t bpf failed: {e}")))?;
    tracing::info!(path = %bpffs.display(), "mounted bpffs");
    match sys::fs_magic(bpffs) {
        Ok(sys::BPF_FS_MAGIC) => Ok(()),
        other => Err(no(format!("still not bpffs after mounting ({other:?})"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_table() {
        let all = (1 << CAP_BPF) | (1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN);
        let cases: &[(u64, Option<&str>)] = &[
            (all, None),
            ((1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN), None),
            (0, Some("CAP_BPF")),
            ((1 << CAP_BPF) | (1 << CAP_SYS_ADMIN), Some("CAP_NET_ADMIN")),
            ((1 << CAP_BPF) | (1 << CAP_NET_ADMIN), Some("CAP_SYS_ADMIN")),
        ];
        for (caps, missing) in cases {
            match (check_caps(*caps), missing) {
                (Ok(()), None) => {}
                (Err(ProbeError::MissingCapability { cap, .. }), Some(m)) => assert_eq!(cap, *m),
                (r, m) => panic!("caps {caps:#x}: got {r:?}, expected {m:?}"),
            }
        }
    }

    #[test]
    fn a_plain_directory_is_not_cgroup2() {
        let dir = tempfile::tempdir().unwrap();
        let e = check(dir.path(), Path::new("/sys/fs/bpf")).unwrap_err();
        assert!(matches!(e, ProbeError::NoCgroup2 { .. }), "{e}");
        assert!(e.to_string().contains("not a cgroup v2 directory"));
    }
}
