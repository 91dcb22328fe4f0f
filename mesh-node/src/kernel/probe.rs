//! Start-up checks: refuse to run, naming the missing kernel feature, rather than fail obscurely
//! half-way through loading.
//!
//! Kernel features are probed, not inferred from version numbers: each program type, map type and
//! helper the programs use is tried by loading a tiny program (as `bpftool feature probe` does),
//! and the kernel's BTF is read for the layouts the programs need. A missing required feature
//! stops the start with one line naming it; a missing optional one turns its feature off, with a
//! log line and `mesh_kernel_feature{...} 0`.
use std::path::Path;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use serde::Serialize;

use crate::{
    config::InboundProgram,
    kernel::btf::{Btf, BtfError},
    sys,
};

/// A kernel or privilege requirement that is not met.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "kernel {release} lacks {missing}, which {needed_for} needs (`mesh-node probe` lists every feature)"
    )]
    MissingFeature {
        release: String,
        missing: String,
        needed_for: &'static str,
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
    #[error("cannot read kernel facts")]
    Io(#[source] std::io::Error),
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Checks everything mesh-node needs before it touches the kernel. Mounts bpffs if missing.
pub fn check(cgroup: &Path, bpffs: &Path) -> Result<(), ProbeError> {
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

/// Whether mesh-node can run without a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Need {
    /// mesh-node refuses to start without it.
    Required,
    /// Without it, what it serves is turned off (logged, and `mesh_kernel_feature` says 0).
    Optional,
}

/// One probed kernel feature.
#[derive(Clone, Debug, Serialize)]
pub struct Feature {
    /// Stable name: the `feature` label of `mesh_kernel_feature`.
    pub name: &'static str,
    /// What needs it.
    pub used_for: &'static str,
    pub need: Need,
    pub available: bool,
    /// Why it is missing, or how it is provided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// How the inbound program (STRICT/PERMISSIVE) learns which pod a SYN is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IngressMethod {
    /// cgroup_skb may call `bpf_get_netns_cookie` (`mesh_ingress`).
    Helper,
    /// The cookie is read from the receiving socket through BTF (`mesh_ingress_btf`).
    Btf,
}

/// What this kernel offers the programs, probed once at start.
#[derive(Clone, Debug, Serialize)]
pub struct Kernel {
    pub release: String,
    pub features: Vec<Feature>,
    pub ingress: Option<IngressMethod>,
    /// Load-time constants (BTF offsets) for the chosen inbound program.
    #[serde(skip)]
    pub ingress_constants: Vec<(&'static str, u32)>,
    /// Load-time constants for socket acceleration; `None` when this kernel cannot do it.
    #[serde(skip)]
    pub accel_constants: Option<Vec<(&'static str, u32)>>,
}

/// The kernel's type information: where the programs' struct offsets come from.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

struct Probed(bool, Option<String>);

fn program(t: ProgramType) -> Probed {
    match is_program_supported(t) {
        Ok(ok) => Probed(ok, None),
        Err(e) => Probed(false, Some(e.to_string())),
    }
}

fn helper(t: ProgramType, h: BpfHelper) -> Probed {
    match is_helper_supported(t, h) {
        Ok(ok) => Probed(ok, None),
        Err(e) => Probed(false, Some(e.to_string())),
    }
}

fn map(t: MapType) -> Probed {
    match is_map_supported(t) {
        Ok(ok) => Probed(ok, None),
        Err(e) => Probed(false, Some(e.to_string())),
    }
}

fn btf_offsets(
    btf: &Result<Btf, BtfError>,
    f: impl FnOnce(&Btf) -> Result<Vec<(&'static str, u32)>, BtfError>,
) -> (Probed, Option<Vec<(&'static str, u32)>>) {
    match btf
        .as_ref()
        .map_err(|e| e.to_string())
        .and_then(|b| f(b).map_err(|e| e.to_string()))
    {
        Ok(c) => (Probed(true, None), Some(c)),
        Err(e) => (Probed(false, Some(e)), None),
    }
}

/// Where `__sk_common.skc_net` sits in `struct tcp_sock` and `net_cookie` in `struct net`: what
/// `mesh_ingress_btf` reads instead of calling `bpf_get_netns_cookie`.
pub fn ingress_constants(btf: &Btf) -> Result<Vec<(&'static str, u32)>, BtfError> {
    let net = btf.field(
        "tcp_sock",
        &[
            "inet_conn",
            "icsk_inet",
            "sk",
            "__sk_common",
            "skc_net",
            "net",
        ],
    )?;
    let cookie = btf.field("net", &["net_cookie"])?;
    for (what, field) in [("skc_net.net", net), ("net_cookie", cookie)] {
        if field.size != 8 {
            return Err(BtfError::NoMember {
                ty: "tcp_sock/net".into(),
                member: format!("{what} of 8 bytes (it has {})", field.size),
            });
        }
    }
    Ok(vec![
        (mesh_abi::globals::SKC_NET, net.offset),
        (mesh_abi::globals::NET_COOKIE, cookie.offset),
    ])
}

/// Probes everything the programs use. `accelerate`: socket acceleration is wanted, so its
/// features are probed too. `inbound`: the inbound program asked for.
pub fn kernel(accelerate: bool, inbound: InboundProgram) -> Kernel {
    use ProgramType::*;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_default();
    let btf = Btf::from_file(Path::new(VMLINUX_BTF));
    let mut features = Vec::new();
    let mut add = |name, used_for, need, p: Probed| {
        features.push(Feature {
            name,
            used_for,
            need,
            available: p.0,
            detail: p.1,
        });
    };
    const REDIRECT: &str = "redirecting enrolled pods' connections";
    let required = [
        ("prog_cgroup_sock_addr", REDIRECT, program(CgroupSockAddr)),
        ("prog_sock_ops", REDIRECT, program(SockOps)),
        (
            "prog_cgroup_skb",
            "inbound STRICT/PERMISSIVE",
            program(CgroupSkb),
        ),
        (
            "helper_get_netns_cookie_sock_addr",
            "knowing which pod connects",
            helper(CgroupSockAddr, BpfHelper::BPF_FUNC_get_netns_cookie),
        ),
        (
            "helper_get_socket_cookie_sock_addr",
            REDIRECT,
            helper(CgroupSockAddr, BpfHelper::BPF_FUNC_get_socket_cookie),
        ),
        (
            "helper_get_socket_cookie_sock_ops",
            REDIRECT,
            helper(SockOps, BpfHelper::BPF_FUNC_get_socket_cookie),
        ),
        ("map_lru_hash", "connection records", map(MapType::LruHash)),
        ("map_lpm_trie", "excluded CIDRs", map(MapType::LpmTrie)),
        (
            "map_percpu_array",
            "program counters",
            map(MapType::PerCpuArray),
        ),
        (
            "map_percpu_hash",
            "per-pod inbound counters",
            map(MapType::PerCpuHash),
        ),
        ("map_ringbuf", "the programs' log", map(MapType::RingBuf)),
        (
            "so_netns_cookie",
            "enrolling pods by network namespace",
            match sys::own_netns_cookie() {
                Ok(_) => Probed(true, None),
                Err(e) => Probed(false, Some(e.to_string())),
            },
        ),
    ];
    for (name, used_for, p) in required {
        add(name, used_for, Need::Required, p);
    }

    // Inbound: the helper where cgroup_skb may call it, else the socket's cookie through BTF.
    let by_helper = helper(CgroupSkb, BpfHelper::BPF_FUNC_get_netns_cookie);
    let skc = helper(CgroupSkb, BpfHelper::BPF_FUNC_skc_to_tcp_sock);
    let (btf_sock, constants) = btf_offsets(&btf, ingress_constants);
    let (helper_ok, btf_ok) = (by_helper.0, skc.0 && btf_sock.0);
    let ingress = match inbound {
        InboundProgram::Auto if helper_ok => Some(IngressMethod::Helper),
        InboundProgram::Auto if btf_ok => Some(IngressMethod::Btf),
        InboundProgram::Helper if helper_ok => Some(IngressMethod::Helper),
        InboundProgram::Btf if btf_ok => Some(IngressMethod::Btf),
        _ => None,
    };
    const INBOUND: &str = "inbound STRICT/PERMISSIVE";
    add(
        "helper_get_netns_cookie_cgroup_skb",
        "inbound: the pod from the helper (else through BTF)",
        Need::Optional,
        by_helper,
    );
    add(
        "helper_skc_to_tcp_sock_cgroup_skb",
        "inbound: the pod through BTF",
        Need::Optional,
        skc,
    );
    add(
        "btf_sock_netns",
        "inbound: the pod through BTF",
        Need::Optional,
        btf_sock,
    );
    add(
        "inbound_pod_lookup",
        INBOUND,
        Need::Required,
        Probed(
            ingress.is_some(),
            Some(match ingress {
                Some(IngressMethod::Helper) => "bpf_get_netns_cookie in cgroup_skb".into(),
                Some(IngressMethod::Btf) => "the receiving socket's namespace, through BTF".into(),
                None if inbound != InboundProgram::Auto => {
                    format!("the inbound program asked for ({inbound:?}) cannot run here")
                }
                None => {
                    "neither bpf_get_netns_cookie nor bpf_skc_to_tcp_sock with BTF in cgroup_skb"
                        .into()
                }
            }),
        ),
    );

    let accel_constants = if accelerate {
        const ACCEL: &str = "socket acceleration";
        let parts = [
            ("prog_sk_msg", program(SkMsg)),
            ("map_sockhash", map(MapType::SockHash)),
            (
                "helper_msg_redirect_hash_sk_msg",
                helper(SkMsg, BpfHelper::BPF_FUNC_msg_redirect_hash),
            ),
            (
                "helper_skc_to_tcp_sock_sk_msg",
                helper(SkMsg, BpfHelper::BPF_FUNC_skc_to_tcp_sock),
            ),
            (
                "helper_skc_to_tcp_sock_sock_ops",
                helper(SockOps, BpfHelper::BPF_FUNC_skc_to_tcp_sock),
            ),
        ];
        let mut all = true;
        for (name, p) in parts {
            all &= p.0;
            add(name, ACCEL, Need::Optional, p);
        }
        let (p, constants) = btf_offsets(&btf, crate::kernel::accel::kernel_constants);
        all &= p.0;
        add("btf_tcp_sock", ACCEL, Need::Optional, p);
        let on = all.then_some(constants).flatten();
        add(
            "socket_acceleration",
            ACCEL,
            Need::Optional,
            Probed(on.is_some(), None),
        );
        on
    } else {
        None
    };
    Kernel {
        release,
        features,
        ingress,
        ingress_constants: match ingress {
            Some(IngressMethod::Btf) => constants.unwrap_or_default(),
            _ => Vec::new(),
        },
        accel_constants,
    }
}

impl Kernel {
    /// The first required feature that is missing, as the error that stops the start.
    pub fn require(&self) -> Result<(), ProbeError> {
        match self
            .features
            .iter()
            .find(|f| f.need == Need::Required && !f.available)
        {
            None => Ok(()),
            Some(f) => Err(ProbeError::MissingFeature {
                release: self.release.clone(),
                missing: match &f.detail {
                    Some(d) => format!("{} ({d})", f.name),
                    None => f.name.to_string(),
                },
                needed_for: f.used_for,
            }),
        }
    }

    /// Logs what is off and why.
    pub fn log(&self) {
        for f in self.features.iter().filter(|f| !f.available) {
            tracing::warn!(
                feature = f.name,
                used_for = f.used_for,
                detail = f.detail.as_deref().unwrap_or(""),
                "kernel feature missing"
            );
        }
        tracing::info!(release = %self.release, inbound = ?self.ingress, socket_acceleration = self.accel_constants.is_some(), "kernel features probed");
    }

    /// A table for `mesh-node probe`.
    pub fn table(&self) -> String {
        let mut out = format!("kernel {}\n", self.release);
        for f in &self.features {
            out.push_str(&format!(
                "{:<36} {:<4} {:<9} {}{}\n",
                f.name,
                if f.available { "yes" } else { "no" },
                match f.need {
                    Need::Required => "required",
                    Need::Optional => "optional",
                },
                f.used_for,
                f.detail
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default(),
            ));
        }
        out
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

    /// A feature's name, need and availability.
    type Row = (&'static str, Need, bool);

    fn kernel_with(features: &[Row]) -> Kernel {
        Kernel {
            release: "6.1.0-test".into(),
            features: features
                .iter()
                .map(|(name, need, available)| Feature {
                    name,
                    used_for: "testing",
                    need: *need,
                    available: *available,
                    detail: None,
                })
                .collect(),
            ingress: None,
            ingress_constants: Vec::new(),
            accel_constants: None,
        }
    }

    #[test]
    fn only_a_missing_required_feature_stops_the_start_and_it_is_named() {
        let cases: &[(&[Row], Option<&str>)] = &[
            (
                &[("a", Need::Required, true), ("b", Need::Optional, false)],
                None,
            ),
            (
                &[("a", Need::Required, true), ("b", Need::Required, false)],
                Some("b"),
            ),
            (
                &[("a", Need::Required, false), ("b", Need::Required, false)],
                Some("a"),
            ),
            (&[], None),
        ];
        for (features, missing) in cases {
            match (kernel_with(features).require(), missing) {
                (Ok(()), None) => {}
                (Err(e @ ProbeError::MissingFeature { .. }), Some(m)) => {
                    let text = e.to_string();
                    assert!(text.contains(&format!("lacks {m}")), "{text}");
                    assert!(text.contains("6.1.0-test"), "{text}");
                }
                (r, m) => panic!("{features:?}: got {r:?}, expected {m:?}"),
            }
        }
    }

    #[test]
    fn this_kernel_offers_the_inbound_program_a_way_to_the_pod() {
        let k = kernel(false, InboundProgram::Auto);
        k.require().unwrap();
        assert!(k.ingress.is_some(), "{}", k.table());
        // The BTF form's offsets resolve on every kernel with BTF: they are what 6.1 and 6.12 use.
        let btf = Btf::from_file(Path::new(VMLINUX_BTF)).unwrap();
        let c = ingress_constants(&btf).unwrap();
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|(_, off)| *off > 0), "{c:?}");
    }

    #[test]
    fn a_plain_directory_is_not_cgroup2() {
        let dir = tempfile::tempdir().unwrap();
        let e = check(dir.path(), Path::new("/sys/fs/bpf")).unwrap_err();
        assert!(matches!(e, ProbeError::NoCgroup2 { .. }), "{e}");
        assert!(e.to_string().contains("not a cgroup v2 directory"));
    }
}
