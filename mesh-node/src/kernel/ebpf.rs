//! Loads the redirect programs, attaches them once to the node's pod cgroup, and owns their maps.
//!
//! Everything that must outlive this process is pinned under the node's pin directory:
//! `maps/` (enrollment, original destinations, counters) and `links/` (the attachments). A proxy
//! that exits therefore leaves enrolled pods failing closed (their connections are still sent to
//! the proxy port, where nothing listens), and the next proxy reuses maps and replaces links
//! without re-enrolling anyone.
use mesh_api::sync::LockExt;
use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, SockHash, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, SkMsg,
        SockOps, links::FdLink,
    },
};
use ipnet::IpNet;
use mesh_abi::{
    AF_INET, AF_INET6, CONFIG_F_ACCEL, CONFIG_F_IPV4, CONFIG_F_IPV6, Config, ConnKey, NodeLimits,
    OrigDst, Outcome, PodEntry, PodInbound, PodPort, Program, SockKey, counter_index, maps,
    programs,
};
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    kernel::accel::Accel,
    kernel::orig_dst::{OrigDstSource, PodId, Redirected},
    kernel::probe::{IngressMethod, Kernel},
};

/// Failures while loading, attaching or talking to the kernel programs.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this mesh-node was built without an eBPF object: run `cargo xtask build-ebpf` and rebuild, or pass --ebpf-object"
    )]
    NoObject,
    #[error("cannot read eBPF object {path}")]
    ReadObject {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot prepare pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object failed")]
    Load(#[source] aya::EbpfError),
    #[error("cannot parse the eBPF object")]
    Parse(#[source] aya_obj::ParseError),
    #[error("cannot read pinned map {path}")]
    Pinned {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "pinned map {name} was made by a build with another layout (pinned: {pinned}; this build: {expected}). \
         Its records cannot be read by this build, so it does not start: roll back to the build that \
         made it, or drain the node and run `mesh-node detach` (pods fail closed until a proxy is back)"
    )]
    LayoutMismatch {
        name: String,
        pinned: MapLayout,
        expected: MapLayout,
    },
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot open cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot pin link {path}")]
    PinLink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("program {name}: cannot take its link")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("this kernel offers the inbound program no way to find the pod (`mesh-node probe`)")]
    NoInbound,
    #[error("cannot start the eBPF log reader")]
    Log(#[source] aya_log::Error),
    #[error("cannot watch the eBPF log ring buffer")]
    LogFd(#[source] io::Error),
    #[error("cannot duplicate or map a map's file descriptor")]
    MapFd(#[source] io::Error),
}

/// A pod's kernel flags (`mesh_abi::POD_F_*`): its own, and per port where they differ.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFlags {
    pub flags: u32,
    pub ports: Vec<(u16, u32)>,
}

/// What the programs need to know about this node.
#[derive(Debug, Clone)]
pub struct RedirectSpec {
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub log_level: u8,
    pub proxy_ipv4: Option<Ipv4Addr>,
    pub proxy_ipv6: Option<Ipv6Addr>,
    pub proxy_port: u16,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<IpNet>,
    /// Socket acceleration (see `accel`): wanted. It is left off, with a warning, when this
    /// kernel cannot do it.
    pub accelerate: bool,
    /// Redirected sockets one pod may hold at once (the kernel's share of
    /// `--max-connections-per-pod`): bounds what one pod takes of the node's record maps.
    pub redirected_per_pod: u32,
}

/// The attached programs and the maps mesh-node reads and writes.
pub struct Redirector {
    enrolled: Mutex<HashMap<MapData, u64, PodEntry>>,
    orig_by_conn: HashMap<MapData, ConnKey, OrigDst>,
    counters: PerCpuArray<MapData, u64>,
    pod_inbound: PerCpuHashMap<MapData, u32, PodInbound>,
    port_modes: Mutex<HashMap<MapData, PodPort, u32>>,
    pod_held: Mutex<HashMap<MapData, u32, u64>>,
    deliveries: Deliveries,
    egress: EgressSockets,
    accel: Accel,
    kernel: Kernel,
    /// Holds the program fds; the links themselves are pinned.
    _ebpf: Ebpf,
}

/// The object embedded at build time (empty if it was not built).
pub static EMBEDDED_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mesh-ebpf.o"));

/// Reads the object to load: `--ebpf-object` if given, else the embedded one.
pub fn object_bytes(path: Option<&Path>) -> Result<Vec<u8>, EbpfError> {
    match path {
        Some(p) => fs::read(p).map_err(|source| EbpfError::ReadObject {
            path: p.into(),
            source,
        }),
        None if EMBEDDED_OBJECT.is_empty() => Err(EbpfError::NoObject),
        None => Ok(EMBEDDED_OBJECT.to_vec()),
    }
}

/// With bpf_link (which aya uses on 5.7+) cgroup attachments always coexist with other programs;
/// the kernel rejects the legacy `BPF_F_ALLOW_MULTI` flag there, so ask for no flags.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, EbpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(EbpfError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(prog_err(name))
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> EbpfError {
    move |source| EbpfError::Program { name, source }
}

impl Redirector {
    /// Loads `object`, writes the node config, attaches every program to `spec.cgroup`.
    /// Must run inside a tokio runtime (the kernel log reader is a task).
    ///
    /// Every program is loaded (verified) before any is attached, and every attachment is made
    /// before any is pinned: a kernel that refuses one program, or an attachment that fails,
    /// leaves the node's redirection exactly as it was (nothing attached on a first start, the
    /// running generation's links on an upgrade). The shared config maps are written only once
    /// every program is verified; pinned maps may have been created, which the next start reuses.
    pub fn load(object: &[u8], spec: &RedirectSpec, kernel: &Kernel) -> Result<Self, EbpfError> {
        let maps_dir = spec.pin_dir.join("maps");
        let links_dir = spec.pin_dir.join("links");
        for d in [&maps_dir, &links_dir] {
            fs::create_dir_all(d).map_err(|source| EbpfError::PinDir {
                path: d.clone(),
                source,
            })?;
        }
        let ingress = match kernel.ingress {
            Some(IngressMethod::Helper) => programs::INGRESS,
            Some(IngressMethod::Btf) => programs::INGRESS_BTF,
            None => return Err(EbpfError::NoInbound),
        };
        let accel_constants = kernel.accel_constants.as_ref().filter(|_| spec.accelerate);
        if spec.accelerate && accel_constants.is_none() {
            warn!("socket acceleration off: this kernel cannot do it (`mesh-node probe` says why)");
        }
        check_pinned_layouts(object, &maps_dir)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&maps_dir).override_global(
            "AYA_LOG_LEVEL",
            &spec.log_level,
            false,
        );
        for (name, value) in accel_constants
            .into_iter()
            .flatten()
            .chain(&kernel.ingress_constants)
        {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader.load(object).map_err(EbpfError::Load)?;
        spawn_log_reader(&mut ebpf)?;

        let accelerate = match accel_constants {
            Some(_) => match attach_accel(&mut ebpf) {
                Ok(()) => {
                    info!("socket acceleration on: pod <-> proxy bytes skip TCP/IP");
                    true
                }
                Err(e) => {
                    warn!(error = %mesh_api::placement::error_chain(&e), "socket acceleration off: the kernel refused the sk_msg program");
                    false
                }
            },
            None => false,
        };
        let cgroup = fs::File::open(&spec.cgroup).map_err(|source| EbpfError::Cgroup {
            path: spec.cgroup.clone(),
            source,
        })?;
        const SOCK_ADDR: [&str; 4] = [
            programs::CONNECT4,
            programs::CONNECT6,
            programs::GETPEERNAME4,
            programs::GETPEERNAME6,
        ];
        for name in SOCK_ADDR {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
        }
        let prog: &mut SockOps = program(&mut ebpf, programs::SOCK_OPS)?;
        prog.load().map_err(prog_err(programs::SOCK_OPS))?;
        let prog: &mut CgroupSock = program(&mut ebpf, programs::SOCK_RELEASE)?;
        prog.load().map_err(prog_err(programs::SOCK_RELEASE))?;
        let prog: &mut CgroupSkb = program(&mut ebpf, ingress)?;
        prog.load().map_err(prog_err(ingress))?;
        // The config and exclusion maps are pinned and shared with a running generation: they
        // change only once this kernel has taken every program.
        write_config(&mut ebpf, spec, accelerate)?;
        write_exclusions(&mut ebpf, spec)?;

        // Attached but not yet pinned: dropping these (on an error below) detaches them.
        let mut links: Vec<(&'static str, FdLink)> = Vec::new();
        let link_err = |name| move |source| EbpfError::Link { name, source };
        for name in SOCK_ADDR {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            let id = prog.attach(&cgroup, LINK_MODE).map_err(prog_err(name))?;
            let link = prog.take_link(id).map_err(prog_err(name))?;
            links.push((name, FdLink::try_from(link).map_err(link_err(name))?));
        }
        let name = programs::SOCK_OPS;
        let prog: &mut SockOps = program(&mut ebpf, name)?;
        let id = prog.attach(&cgroup, LINK_MODE).map_err(prog_err(name))?;
        let link = prog.take_link(id).map_err(prog_err(name))?;
        links.push((name, FdLink::try_from(link).map_err(link_err(name))?));
        let name = programs::SOCK_RELEASE;
        let prog: &mut CgroupSock = program(&mut ebpf, name)?;
        let id = prog.attach(&cgroup, LINK_MODE).map_err(prog_err(name))?;
        let link = prog.take_link(id).map_err(prog_err(name))?;
        links.push((name, FdLink::try_from(link).map_err(link_err(name))?));
        let prog: &mut CgroupSkb = program(&mut ebpf, ingress)?;
        let id = prog
            .attach(&cgroup, CgroupSkbAttachType::Ingress, LINK_MODE)
            .map_err(prog_err(ingress))?;
        let link = prog.take_link(id).map_err(prog_err(ingress))?;
        // Pinned under the one inbound name, whichever program this kernel runs, so a later
        // generation replaces it whatever its kernel chose.
        links.push((
            programs::INGRESS,
            FdLink::try_from(link).map_err(link_err(ingress))?,
        ));
        for (name, link) in links {
            pin_replacing(link, &links_dir, name)?;
        }

        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .ok_or(EbpfError::Missing { kind: "map", name })
        };
        let enrolled =
            HashMap::try_from(take(&mut ebpf, maps::ENROLLED)?).map_err(map_err(maps::ENROLLED))?;
        let orig_by_conn = HashMap::try_from(take(&mut ebpf, maps::ORIG_BY_CONN)?)
            .map_err(map_err(maps::ORIG_BY_CONN))?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, maps::COUNTERS)?)
            .map_err(map_err(maps::COUNTERS))?;
        let pod_inbound = PerCpuHashMap::try_from(take(&mut ebpf, maps::POD_INBOUND)?)
            .map_err(map_err(maps::POD_INBOUND))?;
        let port_modes = HashMap::try_from(take(&mut ebpf, maps::PORT_MODES)?)
            .map_err(map_err(maps::PORT_MODES))?;
        let pod_held =
            HashMap::try_from(take(&mut ebpf, maps::POD_HELD)?).map_err(map_err(maps::POD_HELD))?;
        let deliveries = HashMap::try_from(take(&mut ebpf, maps::DELIVERIES)?)
            .map_err(map_err(maps::DELIVERIES))?;
        let egress = HashMap::try_from(take(&mut ebpf, maps::EGRESS_SOCKS)?)
            .map_err(map_err(maps::EGRESS_SOCKS))?;
        let accel = if accelerate {
            accel_maps(&mut ebpf)?
        } else {
            Accel::off()
        };
        Ok(Self {
            enrolled: Mutex::new(enrolled),
            orig_by_conn,
            counters,
            pod_inbound,
            port_modes: Mutex::new(port_modes),
            pod_held: Mutex::new(pod_held),
            deliveries: Marks::new(deliveries, maps::DELIVERIES),
            egress: Marks::new(egress, maps::EGRESS_SOCKS),
            accel,
            kernel: kernel.clone(),
            _ebpf: ebpf,
        })
    }

    /// What the start-up probe found in this kernel.
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// The proxy's handle for adding its ends of pod connections to the socket map.
    pub fn accel(&self) -> Accel {
        self.accel.clone()
    }

    /// The proxy's handle for recording the connections it opens to its pods.
    pub fn deliveries(&self) -> Deliveries {
        self.deliveries.clone()
    }

    /// The proxy's handle for marking the sockets it makes in pods' namespaces.
    pub fn egress(&self) -> EgressSockets {
        self.egress.clone()
    }

    /// Sets a pod's flags per port, replacing what was set (none: forgets them).
    pub fn set_port_flags(&self, pod: PodId, modes: &[(u16, u32)]) -> Result<(), EbpfError> {
        let mut map = self.port_modes.locked();
        let stale: Vec<PodPort> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.pod_id == pod.0 && !modes.iter().any(|(p, _)| *p == k.port))
            .collect();
        for (port, flags) in modes {
            let key = PodPort {
                pod_id: pod.0,
                port: *port,
                _reserved: 0,
            };
            map.insert(key, flags, 0)
                .map_err(map_err(maps::PORT_MODES))?;
        }
        for k in stale {
            match map.remove(&k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::PORT_MODES)(e)),
            }
        }
        Ok(())
    }

    /// Redirect the sockets of the network namespace with this cookie.
    /// Also updates the flags of a pod already enrolled. A port's flags are set before the pod's
    /// own, so a pod turning STRICT never drops its PERMISSIVE ports' connections meanwhile.
    pub fn enroll(&self, netns_cookie: u64, pod: PodId, flags: &PodFlags) -> Result<(), EbpfError> {
        self.set_port_flags(pod, &flags.ports)?;
        let entry = PodEntry {
            pod_id: pod.0,
            flags: flags.flags,
        };
        self.enrolled
            .locked()
            .insert(netns_cookie, entry, 0)
            .map_err(map_err(maps::ENROLLED))
    }

    /// Stop redirecting new connections from this namespace. Open connections keep their relay.
    pub fn unenroll(&self, netns_cookie: u64) -> Result<(), EbpfError> {
        match self.enrolled.locked().remove(&netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(maps::ENROLLED)(e)),
        }
        self.sweep_held()
    }

    /// Drops the socket counts of pods no longer enrolled once they hold no socket (pod ids are
    /// never reused, so the map would otherwise fill with departed pods and refuse new ones).
    /// A count still above zero stays until its sockets are released: deleting it then would let
    /// those releases count down a later entry.
    fn sweep_held(&self) -> Result<(), EbpfError> {
        let enrolled: Vec<u32> = self.enrolled().into_iter().map(|(_, p)| p.0).collect();
        let mut held = self.pod_held.locked();
        let gone: Vec<u32> = held
            .iter()
            .filter_map(Result::ok)
            .filter(|(pod, n)| *n == 0 && !enrolled.contains(pod))
            .map(|(pod, _)| pod)
            .collect();
        for pod in gone {
            match held.remove(&pod) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::POD_HELD)(e)),
            }
        }
        Ok(())
    }

    /// Redirected sockets each pod holds now, by pod id.
    pub fn held(&self) -> Vec<(PodId, u64)> {
        let map = self.pod_held.locked();
        map.iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (PodId(k), v))
            .collect()
    }

    /// Netns cookies enrolled in the kernel, with their pod ids.
    pub fn enrolled(&self) -> Vec<(u64, PodId)> {
        let map = self.enrolled.locked();
        map.iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, PodId(v.pod_id)))
            .collect()
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<Counters, EbpfError> {
        let mut out = Counters::default();
        for program in Program::ALL {
            let mut per = Vec::new();
            for outcome in Outcome::ALL {
                let values = self
                    .counters
                    .get(&counter_index(program, outcome), 0)
                    .map_err(map_err(maps::COUNTERS))?;
                per.push((outcome.name(), values.iter().sum()));
            }
            out.0.push((program.name(), per));
        }
        Ok(out)
    }

    /// Per pod: new inbound plaintext connections accepted (PERMISSIVE) and dropped (STRICT).
    pub fn pod_inbound(&self) -> Vec<(PodId, PodInbound)> {
        self.pod_inbound
            .iter()
            .filter_map(Result::ok)
            .map(|(id, per_cpu)| {
                let sum = per_cpu
                    .iter()
                    .fold(PodInbound::default(), |acc, c| PodInbound {
                        plaintext: acc.plaintext + c.plaintext,
                        denied: acc.denied + c.denied,
                    });
                (PodId(id), sum)
            })
            .collect()
    }
}

impl OrigDstSource for Redirector {
    fn lookup(&self, peer: SocketAddr) -> Option<Redirected> {
        let key = match peer {
            SocketAddr::V4(a) => ConnKey::v4(a.ip().octets(), a.port()),
            SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
                Some(v4) => ConnKey::v4(v4.octets(), a.port()),
                None => ConnKey::v6(a.ip().octets(), a.port()),
            },
        };
        let r = self.orig_by_conn.get(&key, 0).ok()?;
        let ip = match r.family {
            AF_INET => IpAddr::V4(Ipv4Addr::new(r.addr[0], r.addr[1], r.addr[2], r.addr[3])),
            AF_INET6 => IpAddr::V6(Ipv6Addr::from(r.addr)),
            _ => return None,
        };
        Some(Redirected {
            orig_dst: SocketAddr::new(ip, r.port),
            pod: PodId(r.pod_id),
            netns_cookie: r.netns_cookie,
        })
    }
}

/// Keys the proxy marks in a map only while one of its own connects runs, so a program can tell
/// that connect apart: `Marks<SockKey>` for `MESH_DELIVERIES` (the proxy's connections to its
/// pods, the only SYNs the ingress program admits as mesh traffic) and `Marks<u64>` for
/// `MESH_EGRESS` (socket cookies of the sockets it makes in pods' namespaces, which connect lets
/// go where they asked). Without eBPF (tests of the proxy alone) nothing is marked.
pub struct Marks<K> {
    map: Option<Arc<Mutex<HashMap<MapData, K, u8>>>>,
    name: &'static str,
}

impl<K> Clone for Marks<K> {
    fn clone(&self) -> Self {
        Self {
            map: self.map.clone(),
            name: self.name,
        }
    }
}

impl<K> Default for Marks<K> {
    fn default() -> Self {
        Self {
            map: None,
            name: "off",
        }
    }
}

impl<K> std::fmt::Debug for Marks<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Marks({})", self.name)
    }
}

impl<K: aya::Pod> Marks<K> {
    fn new(map: HashMap<MapData, K, u8>, name: &'static str) -> Self {
        Self {
            map: Some(Arc::new(Mutex::new(map))),
            name,
        }
    }

    /// Marks `key` for as long as the returned guard lives: hold it across the connect. The
    /// mark goes when the guard is dropped, also when the connect is abandoned (a timeout drops
    /// the future): a mark left behind would admit whoever binds the same address next.
    pub fn mark(&self, key: K) -> Result<Marked<'_, K>, EbpfError> {
        if let Some(map) = &self.map {
            map.locked().insert(key, 1, 0).map_err(map_err(self.name))?;
        }
        Ok(Marked { marks: self, key })
    }
}

/// A key marked by [`Marks::mark`], until dropped.
pub struct Marked<'a, K: aya::Pod> {
    marks: &'a Marks<K>,
    key: K,
}

impl<K: aya::Pod> Drop for Marked<'_, K> {
    fn drop(&mut self) {
        if let Some(map) = &self.marks.map {
            let _ = map.locked().remove(&self.key);
        }
    }
}

/// See [`Marks`].
pub type Deliveries = Marks<SockKey>;
/// See [`Marks`].
pub type EgressSockets = Marks<u64>;

/// The key of a socket from `local` to `remote` as the ingress program reads it off a SYN.
pub fn sock_key(local: SocketAddr, remote: SocketAddr) -> SockKey {
    let (la, lf) = addr16(local.ip());
    let (ra, _) = addr16(remote.ip());
    SockKey {
        local_addr: la,
        remote_addr: ra,
        local_port: local.port(),
        remote_port: remote.port(),
        family: lf,
    }
}

fn addr16(ip: IpAddr) -> ([u8; 16], u32) {
    match ip {
        IpAddr::V4(a) => {
            let mut out = [0u8; 16];
            out[..4].copy_from_slice(&a.octets());
            (out, AF_INET as u32)
        }
        IpAddr::V6(a) => (a.octets(), AF_INET6 as u32),
    }
}

/// Counters per program and outcome, summed over CPUs, in ABI order.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counters(pub Vec<(&'static str, Vec<(&'static str, u64)>)>);

impl Counters {
    pub fn get(&self, program: &str, outcome: &str) -> u64 {
        self.0
            .iter()
            .find(|(p, _)| *p == program)
            .and_then(|(_, o)| o.iter().find(|(n, _)| *n == outcome))
            .map_or(0, |(_, v)| *v)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut root = serde_json::Map::new();
        for (program, outcomes) in &self.0 {
            let o = outcomes
                .iter()
                .map(|(n, v)| (n.to_string(), (*v).into()))
                .collect();
            root.insert(program.to_string(), serde_json::Value::Object(o));
        }
        serde_json::Value::Object(root)
    }
}

/// What a map's records look like to the kernel: enough to tell that two builds disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl std::fmt::Display for MapLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} bytes, value {} bytes, {} entries",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

/// Compares every map this build pins with the one a previous generation left at its path.
///
/// aya opens a pinned map as it finds it: one made by a build with another layout would be read
/// wrongly, or make the verifier refuse a program with a message that names neither the map nor
/// the cause. So a mismatch stops the start here, before anything is loaded or attached: the
/// running generation keeps the node. A map whose meaning changes at the same sizes must get a
/// new name (`mesh_abi::maps`), so that it is a new map rather than a misread one.
fn check_pinned_layouts(object: &[u8], maps_dir: &Path) -> Result<(), EbpfError> {
    let obj = aya_obj::Object::parse(object).map_err(EbpfError::Parse)?;
    for (name, def) in &obj.maps {
        if def.pinning() != aya_obj::maps::PinningType::ByName {
            continue;
        }
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let pinned_err = |source| EbpfError::Pinned {
            path: path.clone(),
            source,
        };
        let info = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map_err(pinned_err)?;
        let pinned = MapLayout {
            map_type: info.map_type().map_err(pinned_err)? as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        };
        let expected = layout_of(def);
        if pinned != expected {
            return Err(EbpfError::LayoutMismatch {
                name: name.clone(),
                pinned,
                expected,
            });
        }
    }
    Ok(())
}

fn layout_of(def: &aya_obj::Map) -> MapLayout {
    MapLayout {
        map_type: def.map_type(),
        key_size: def.key_size(),
        value_size: def.value_size(),
        max_entries: def.max_entries(),
    }
}

/// Pins `link` as `links/<name>`, replacing a link pinned by an earlier proxy. The new program is
/// attached before the old one goes, so there is no moment without redirection; while both run
/// the second sees the proxy address already in place and leaves it.
fn pin_replacing(link: FdLink, links_dir: &Path, name: &'static str) -> Result<(), EbpfError> {
    let path = links_dir.join(name);
    // bpffs rejects dots in names (EPERM), hence "-new".
    let tmp = links_dir.join(format!("{name}-new"));
    let pin_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source: io::Error| EbpfError::PinLink { path: p, source }
    };
    let _ = fs::remove_file(&tmp);
    link.pin(&tmp)
        .map_err(|e| pin_err(&tmp)(io::Error::other(e)))?;
    fs::rename(&tmp, &path).map_err(pin_err(&path))?;
    Ok(())
}

/// Loads the sk_msg program and attaches it to the pods' socket map. The attachment belongs to
/// the map, which lives as long as the sock_ops program adding sockets to it (pinned), so pod
/// connections keep their programs while a proxy restarts; they then find no reader and use TCP.
fn attach_accel(ebpf: &mut Ebpf) -> Result<(), EbpfError> {
    let name = programs::SK_MSG;
    // The map stays in the object until every program is loaded: they refer to it by fd.
    let fd = {
        let map = ebpf.map(maps::SOCKS_TX).ok_or(EbpfError::Missing {
            kind: "map",
            name: maps::SOCKS_TX,
        })?;
        let socks: SockHash<&MapData, SockKey> =
            SockHash::try_from(map).map_err(map_err(maps::SOCKS_TX))?;
        socks.fd().try_clone().map_err(EbpfError::MapFd)?
    };
    let prog: &mut SkMsg = program(ebpf, name)?;
    prog.load().map_err(prog_err(name))?;
    let id = prog.attach(&fd).map_err(prog_err(name))?;
    // Dropping the link would detach it; it lives as long as the map instead.
    std::mem::forget(prog.take_link(id).map_err(prog_err(name))?);
    Ok(())
}

/// The proxy's side of acceleration, from the maps of the loaded object.
fn accel_maps(ebpf: &mut Ebpf) -> Result<Accel, EbpfError> {
    let take = |ebpf: &mut Ebpf, name: &'static str| {
        ebpf.take_map(name)
            .ok_or(EbpfError::Missing { kind: "map", name })
    };
    let socks_rx =
        SockHash::try_from(take(ebpf, maps::SOCKS_RX)?).map_err(map_err(maps::SOCKS_RX))?;
    let readers = HashMap::try_from(take(ebpf, maps::READERS)?).map_err(map_err(maps::READERS))?;
    let aya::maps::Map::Array(read_slots) = take(ebpf, maps::READ_SLOTS)? else {
        return Err(EbpfError::Missing {
            kind: "array map",
            name: maps::READ_SLOTS,
        });
    };
    Accel::new(crate::kernel::accel::Maps {
        socks_rx,
        readers,
        read_slots,
    })
    .map_err(EbpfError::MapFd)
}

fn write_config(ebpf: &mut Ebpf, spec: &RedirectSpec, accel: bool) -> Result<(), EbpfError> {
    let name = maps::CONFIG;
    let mut flags = 0;
    if accel {
        flags |= CONFIG_F_ACCEL;
    }
    if spec.proxy_ipv4.is_some() {
        flags |= CONFIG_F_IPV4;
    }
    if spec.proxy_ipv6.is_some() {
        flags |= CONFIG_F_IPV6;
    }
    let cfg = Config {
        proxy_ip4: spec.proxy_ipv4.map_or([0; 4], |a| a.octets()),
        proxy_ip6: spec.proxy_ipv6.map_or([0; 16], |a| a.octets()),
        proxy_port: spec.proxy_port,
        _reserved: 0,
        flags,
    };
    let map = ebpf
        .map_mut(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    let mut array: Array<&mut MapData, Config> = Array::try_from(map).map_err(map_err(name))?;
    array.set(0, cfg, 0).map_err(map_err(name))?;
    let name = maps::LIMITS;
    let map = ebpf
        .map_mut(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    let mut array: Array<&mut MapData, NodeLimits> = Array::try_from(map).map_err(map_err(name))?;
    let limits = NodeLimits {
        redirected_per_pod: spec.redirected_per_pod,
        _reserved: 0,
    };
    array.set(0, limits, 0).map_err(map_err(name))
}

/// Makes the exclusion maps hold exactly what the config says (they are pinned, so they may hold
/// an earlier run's entries).
fn write_exclusions(ebpf: &mut Ebpf, spec: &RedirectSpec) -> Result<(), EbpfError> {
    {
        let name = maps::EXCLUDED_PORTS;
        let map = ebpf
            .map_mut(name)
            .ok_or(EbpfError::Missing { kind: "map", name })?;
        let mut ports: HashMap<&mut MapData, u16, u8> =
            HashMap::try_from(map).map_err(map_err(name))?;
        let stale: Vec<u16> = ports.keys().filter_map(Result::ok).collect();
        for p in stale {
            ports.remove(&p).map_err(map_err(name))?;
        }
        for p in &spec.exclude_ports {
            ports.insert(*p, 1, 0).map_err(map_err(name))?;
        }
    }
    replace_trie::<4>(
        ebpf,
        maps::EXCLUDED_V4,
        spec.exclude_cidrs.iter().filter_map(|n| match n {
            IpNet::V4(n) => Some((n.prefix_len(), n.network().octets())),
            IpNet::V6(_) => None,
        }),
    )?;
    replace_trie::<16>(
        ebpf,
        maps::EXCLUDED_V6,
        spec.exclude_cidrs.iter().filter_map(|n| match n {
            IpNet::V6(n) => Some((n.prefix_len(), n.network().octets())),
            IpNet::V4(_) => None,
        }),
    )
}

fn replace_trie<const N: usize>(
    ebpf: &mut Ebpf,
    name: &'static str,
    nets: impl Iterator<Item = (u8, [u8; N])>,
) -> Result<(), EbpfError> {
    let map = ebpf
        .map_mut(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    let mut trie: LpmTrie<&mut MapData, [u8; N], u8> =
        LpmTrie::try_from(map).map_err(map_err(name))?;
    let stale: Vec<Key<[u8; N]>> = trie.keys().filter_map(Result::ok).collect();
    for k in stale {
        trie.remove(&k).map_err(map_err(name))?;
    }
    for (len, addr) in nets {
        trie.insert(&Key::new(u32::from(len), addr), 1, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}

/// Forwards the programs' aya-log records to this process's log.
fn spawn_log_reader(ebpf: &mut Ebpf) -> Result<(), EbpfError> {
    let logger = aya_log::EbpfLogger::init(ebpf).map_err(EbpfError::Log)?;
    let mut fd = crate::sys::async_logger(logger).map_err(EbpfError::LogFd)?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

/// Removes every pinned link and map of a node: the programs detach, pods talk directly again.
/// Used by `mesh-node detach` and `--on-exit detach`. Missing pieces are not an error.
pub fn detach(pin_dir: &Path) -> io::Result<()> {
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        match fs::read_dir(&dir) {
            Ok(entries) => {
                for e in entries {
                    fs::remove_file(e?.path())?;
                }
                fs::remove_dir(&dir)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    match fs::remove_dir(pin_dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
