//! Socket acceleration: bytes a pod sends to this node's proxy skip TCP/IP.
//!
//! The pods' ends of their connections with the proxy join a socket map with an sk_msg program
//! (`MESH_SOCKS_TX`, added by sock_ops as the handshake completes). The proxy's ends join a
//! second map without a program (`MESH_SOCKS_RX`, added here right after the proxy accepts a
//! redirected connection or connects to a local pod). A pod's send then goes straight into the
//! proxy's receive queue, past the TCP/IP stack and the veth between the pod's network namespace
//! and the node's: most of the kernel work of that hop, for the pod and for the proxy.
//!
//! The stream stays exact and bounded. For each of its ends the proxy keeps a slot in a
//! memory-mapped array (`MESH_READ_SLOTS`) with how many bytes it has read, updated after every
//! read without a system call ([`PodStream`]). The pod's sk_msg program weighs that against what
//! the pod has sent: a send goes through TCP instead whenever the proxy has not yet read all the
//! pod sent through TCP (so nothing overtakes), and when the proxy has [`HANDOVER_LIMIT`] unread
//! from the pod (so TCP's flow control makes a fast pod wait, instead of queueing without
//! bound). See `mesh-ebpf`'s `mesh_sk_msg` for the rule and its reasons.
//!
//! Only the direction into the proxy is accelerated: on this kernel generation a reader using
//! `splice()` (Go's `io.Copy` between two TCP connections, haproxy, nginx) never sees bytes
//! handed over to it, and a pod may read any way it likes; the proxy reads with `recvmsg`.
//!
//! Everything here is best effort: a socket that cannot join (the connection already closing, a
//! map full, no slot free) simply stays on plain TCP.
mod slots;
mod stream;

use mesh_api::sync::LockExt;
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use aya::maps::{HashMap, MapData, SockHash};
use mesh_abi::{AF_INET, AF_INET6, SockKey, globals};
use serde::Serialize;
use tokio::net::TcpStream;
use tracing::debug;

pub use stream::{PodReadHalf, PodStream};

use slots::{ReadCount, SlotPool};

use crate::kernel::btf::{Btf, BtfError};

/// At most this much may a pod have sent that the proxy has not read yet before its sends go
/// through TCP again, whose own buffers and flow control then hold it back. About what TCP
/// itself keeps in flight on a fast local link.
pub const HANDOVER_LIMIT: u32 = 1 << 20;

/// What the sk_msg program needs to know about this kernel, from its BTF: where `struct
/// tcp_sock`'s `write_seq` and `sk_flags` (`__sk_common.skc_flags`) are, and which `sk_flags` bit says `SO_ZEROCOPY`.
/// Each value goes to the load-time global named beside it.
pub fn kernel_constants(btf: &Btf) -> Result<Vec<(&'static str, u32)>, BtfError> {
    let sized = |path: &[&str], size: u32| {
        let field = btf.field("tcp_sock", path)?;
        if field.size != size {
            return Err(BtfError::NoMember {
                ty: "tcp_sock".into(),
                member: format!("{} of {size} bytes (it has {})", path.join("."), field.size),
            });
        }
        Ok(field.offset)
    };
    let zerocopy = btf.enum_value("SOCK_ZEROCOPY")?;
    let bit = u32::try_from(zerocopy)
        .ok()
        .filter(|b| *b < 64)
        .ok_or_else(|| {
            BtfError::NoEnumValue(format!("SOCK_ZEROCOPY below 64 (it is {zerocopy})"))
        })?;
    Ok(vec![
        (globals::WRITE_SEQ, sized(&["write_seq"], 4)?),
        (
            globals::SK_FLAGS,
            sized(
                &["inet_conn", "icsk_inet", "sk", "__sk_common", "skc_flags"],
                8,
            )?,
        ),
        (globals::ZEROCOPY_BIT, bit),
    ])
}

/// Counted on the proxy's side; the kernel counts the pods' ends (`sock_ops`) and every send
/// (`sk_msg`).
#[derive(Debug, Default, Serialize)]
pub struct AccelStats {
    /// The proxy's ends added to the socket map.
    pub registered: AtomicU64,
    /// Could not be added (the connection already closing, a map full, no slot free).
    pub register_failed: AtomicU64,
}

/// The maps the proxy's side uses, taken from the loaded object.
pub struct Maps {
    pub socks_rx: SockHash<MapData, SockKey>,
    pub readers: HashMap<MapData, SockKey, u32>,
    pub read_slots: MapData,
}

/// The proxy's handle on socket acceleration. Cheap to clone; `off()` when it is off.
#[derive(Clone, Default)]
pub struct Accel(Option<Arc<Inner>>);

struct Inner {
    /// aya's inserts take `&mut`; a registration is two syscalls, once per connection.
    maps: Mutex<Joins>,
    slots: Arc<SlotPool>,
    stats: AccelStats,
}

/// Where the proxy's ends join: the socket map bytes are handed to, and each socket's slot.
struct Joins {
    socks_rx: SockHash<MapData, SockKey>,
    readers: HashMap<MapData, SockKey, u32>,
}

impl std::fmt::Debug for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Accel(on)"
        } else {
            "Accel(off)"
        })
    }
}

impl Accel {
    pub fn off() -> Self {
        Self(None)
    }

    pub fn new(maps: Maps) -> std::io::Result<Self> {
        Ok(Self(Some(Arc::new(Inner {
            maps: Mutex::new(Joins {
                socks_rx: maps.socks_rx,
                readers: maps.readers,
            }),
            slots: Arc::new(SlotPool::new(maps.read_slots)?),
            stats: AccelStats::default(),
        }))))
    }

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// The proxy's end of a connection with a local pod, joined to acceleration when it can be.
    /// Call it before the first read: the slot counts reads from here on, and bytes the pod sent
    /// through TCP before are read first whatever happens.
    pub fn register(&self, socket: TcpStream) -> PodStream {
        let Some(inner) = &self.0 else {
            return PodStream::plain(socket);
        };
        match Self::try_register(inner, &socket) {
            Ok(reads) => {
                inner.stats.registered.fetch_add(1, Relaxed);
                PodStream::counted(socket, reads)
            }
            Err(e) => {
                debug!(error = %e, "socket stays on plain TCP");
                inner.stats.register_failed.fetch_add(1, Relaxed);
                PodStream::plain(socket)
            }
        }
    }

    fn try_register(inner: &Arc<Inner>, socket: &TcpStream) -> std::io::Result<ReadCount> {
        let key = sock_key(socket.local_addr()?, socket.peer_addr()?);
        // From here on, dropping `reads` gives the slot back.
        let reads = SlotPool::take(&inner.slots, &key, HANDOVER_LIMIT)
            .ok_or_else(|| std::io::Error::other("no read slot free"))?;
        let slot = reads.index();
        let mut maps = inner.maps.locked();
        // The slot first: a pod that finds no slot uses TCP.
        maps.readers
            .insert(key, slot, 0)
            .map_err(std::io::Error::other)?;
        maps.socks_rx
            .insert(key, socket.as_raw_fd(), 0)
            .map_err(std::io::Error::other)?;
        Ok(reads)
    }

    pub fn stats(&self) -> serde_json::Value {
        match &self.0 {
            None => serde_json::json!({"enabled": false}),
            Some(i) => serde_json::json!({
                "enabled": true,
                "registered": i.stats.registered.load(Relaxed),
                "register_failed": i.stats.register_failed.load(Relaxed),
                "slots_free": i.slots.free(),
            }),
        }
    }
}

/// A socket's key as the kernel programs build it: IPv4 (also IPv4-mapped) in the first four
/// bytes with `AF_INET`, ports in host order.
pub fn sock_key(local: SocketAddr, remote: SocketAddr) -> SockKey {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    let widen = |a: std::net::Ipv4Addr| {
        let mut w = [0u8; 16];
        w[..4].copy_from_slice(&a.octets());
        w
    };
    let v6 = |ip: IpAddr| match ip {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    };
    let (family, local_addr, remote_addr) = match (v4(local.ip()), v4(remote.ip())) {
        (Some(l), Some(r)) => (AF_INET, widen(l), widen(r)),
        _ => (AF_INET6, v6(local.ip()), v6(remote.ip())),
    };
    SockKey {
        local_addr,
        remote_addr,
        local_port: local.port(),
        remote_port: remote.port(),
        family: family as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This kernel's own BTF, when it has one: the fields the sk_msg program reads exist and lie
    /// inside `struct tcp_sock`.
    #[test]
    fn the_running_kernel_has_the_fields_acceleration_reads() {
        let path = std::path::Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            eprintln!("skipped: no {}", path.display());
            return;
        }
        let btf = Btf::from_file(path).unwrap();
        let size = btf
            .find_struct("tcp_sock")
            .map(|id| btf.size_of(id))
            .unwrap();
        for (global, value) in &kernel_constants(&btf).unwrap() {
            if *global == mesh_abi::globals::ZEROCOPY_BIT {
                assert!(*value < 64, "{global} = {value}");
            } else {
                assert!(
                    value + 8 <= size,
                    "{global} = {value} in a {size}-byte struct"
                );
            }
        }
    }

    #[test]
    fn keys_match_what_the_kernel_builds() {
        let cases = [
            // (local, remote, family, first local byte, first remote byte)
            ("10.0.0.5:15001", "10.1.0.2:40000", AF_INET, 10, 10),
            // An IPv4 connection on a dual-stack socket is keyed as IPv4.
            (
                "[::ffff:10.0.0.5]:15001",
                "[::ffff:10.1.0.2]:40000",
                AF_INET,
                10,
                10,
            ),
            ("[fd00::5]:15001", "[fd00:1::2]:40000", AF_INET6, 0xfd, 0xfd),
        ];
        for (l, r, family, lb, rb) in cases {
            let k = sock_key(l.parse().unwrap(), r.parse().unwrap());
            assert_eq!(k.family, family as u32, "{l} {r}");
            assert_eq!((k.local_addr[0], k.remote_addr[0]), (lb, rb), "{l} {r}");
            assert_eq!((k.local_port, k.remote_port), (15001, 40000));
            if family == AF_INET {
                assert!(k.local_addr[4..].iter().all(|b| *b == 0));
            }
        }
        // The proxy's end and the pod's end are each other's peer.
        let proxy = sock_key(
            "10.0.0.5:15001".parse().unwrap(),
            "10.1.0.2:40000".parse().unwrap(),
        );
        let pod = sock_key(
            "10.1.0.2:40000".parse().unwrap(),
            "10.0.0.5:15001".parse().unwrap(),
        );
        assert_eq!(proxy.peer(), pod);
    }
}
