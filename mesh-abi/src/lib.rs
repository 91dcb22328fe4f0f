//! Types shared by the eBPF programs (`mesh-ebpf`) and the node proxy (`mesh-node`).
//!
//! Every type is `#[repr(C)]`, has no implicit padding (checked by the size assertions below) and
//! no `bool`: the verifier rejects reads of uninitialised padding in map keys, and `bool` has
//! invalid bit patterns a map could hand back.
//!
//! Byte-order convention: addresses are kept exactly as the kernel hands them over (network byte
//! order, as bytes in memory), ports are in host byte order.
#![no_std]

#[cfg(feature = "user")]
mod pod;

/// Names of the maps in the object, so both sides agree on them (at most 15 bytes: the kernel
/// truncates object names to that).
pub mod maps {
    /// `Array<Config>` with one entry: where the node proxy listens.
    pub const CONFIG: &str = "MESH_CONFIG";
    /// `HashMap<u64 netns cookie, PodEntry>`: the pods whose sockets are redirected.
    pub const ENROLLED: &str = "MESH_ENROLLED";
    /// `LruHashMap<u64 socket cookie, OrigDst>`: filled at connect, read by getpeername.
    pub const ORIG_BY_COOKIE: &str = "MESH_ORIG_CK";
    /// `LruHashMap<ConnKey, OrigDst>`: filled by sock_ops once the client port is known; the
    /// node proxy looks accepted connections up here.
    pub const ORIG_BY_CONN: &str = "MESH_ORIG_CONN";
    /// `HashMap<u16 port, u8>`: destination ports never redirected.
    pub const EXCLUDED_PORTS: &str = "MESH_EXCL_PORTS";
    /// `LpmTrie<[u8; 4], u8>`: destination IPv4 blocks never redirected.
    pub const EXCLUDED_V4: &str = "MESH_EXCL_V4";
    /// `LpmTrie<[u8; 16], u8>`: destination IPv6 blocks never redirected.
    pub const EXCLUDED_V6: &str = "MESH_EXCL_V6";
    /// `PerCpuArray<u64>` indexed by [`crate::counter_index`].
    pub const COUNTERS: &str = "MESH_COUNTERS";
    /// `LruHashMap<SockKey, u8>`: the node proxy's connections to its pods that are being opened,
    /// keyed as the proxy's socket sees itself. The proxy adds one after binding and before
    /// connecting, and removes it once connected: the only SYNs the ingress program takes as
    /// mesh traffic. (Binding the proxy's address proves nothing: any host process can.)
    pub const DELIVERIES: &str = "MESH_DELIVERIES";
    /// `LruHashMap<u64 socket cookie, u8>`: sockets the node proxy made inside a pod's network
    /// namespace to reach a destination outside the mesh as the pod (its address, its egress
    /// rules). connect leaves them alone; everything else from an enrolled pod is redirected.
    pub const EGRESS_SOCKS: &str = "MESH_EGRESS";
    /// `HashMap<PodPort, u32 POD_F_* flags>`: a pod's inbound mode on one port where it differs
    /// from the pod's own (a PeerAuthentication's `portLevelMtls`), e.g. a PERMISSIVE probe port.
    pub const PORT_MODES: &str = "MESH_PORT_MODES";
    /// `PerCpuHashMap<u32 pod id, PodInbound>`: new inbound connections per pod, by kind.
    pub const POD_INBOUND: &str = "MESH_POD_IN";
    /// `HashMap<u64 socket cookie, u32 pod id>`: every socket that holds a redirect record, from
    /// its first redirected connect until the pod releases it. Each such socket holds at most
    /// one entry in each of the node's shared record maps, so counting them bounds what one pod
    /// can take of those maps.
    pub const REDIRECTED: &str = "MESH_REDIRECTED";
    /// `HashMap<u32 pod id, u64>`: how many sockets of [`REDIRECTED`] each pod holds.
    pub const POD_HELD: &str = "MESH_POD_HELD";
    /// `Array<NodeLimits>` with one entry: the bounds the programs enforce.
    pub const LIMITS: &str = "MESH_LIMITS";
    /// `SockHash<SockKey>` with the sk_msg program: pods' ends of their connections with the node
    /// proxy (added by sock_ops). Each send on one is judged: handed over, or TCP.
    pub const SOCKS_TX: &str = "MESH_SOCKS_TX";
    /// `SockHash<SockKey>` without programs: the proxy's ends of those connections (added by the
    /// proxy), the only sockets bytes are handed to. Their own sends stay plain TCP.
    pub const SOCKS_RX: &str = "MESH_SOCKS_RX";
    /// `LruHashMap<SockKey, u32>`: a proxy end's slot in [`READ_SLOTS`].
    pub const READERS: &str = "MESH_READERS";
    /// `Array<ReadSlot>`, memory-mapped by the proxy: how much it has read from each of its ends.
    pub const READ_SLOTS: &str = "MESH_READ_SLOTS";
    /// `LruHashMap<SockKey, SendState>`: per pod end, what it has sent and how.
    pub const SENDERS: &str = "MESH_SENDERS";
}

/// Slots in [`maps::READ_SLOTS`]: connections between pods and the proxy that can be accelerated
/// at once; more stay on plain TCP.
pub const READ_SLOT_COUNT: u32 = 16_384;

/// Load-time constants (aya `Global`s, set with `override_global`): where the `struct tcp_sock`
/// fields the programs read sit on this kernel, and the value of an enumerator, found in its BTF
/// (what CO-RE does for C programs). A read-only global is a known constant to the verifier, so
/// each read has a fixed offset it can check.
pub mod globals {
    /// Offset of `write_seq`: end of what the socket has queued to TCP.
    pub const WRITE_SEQ: &str = "MESH_OFF_WRITE_SEQ";
    /// Offset of `sk_flags` (an `unsigned long` of `SOCK_*` bits).
    pub const SK_FLAGS: &str = "MESH_OFF_SK_FLAGS";
    /// `SOCK_ZEROCOPY`: the `sk_flags` bit `SO_ZEROCOPY` sets.
    pub const ZEROCOPY_BIT: &str = "MESH_SOCK_ZEROCOPY";
    /// Offset of `__sk_common.skc_net` (a `struct net *`) in `struct tcp_sock`.
    pub const SKC_NET: &str = "MESH_OFF_SKC_NET";
    /// Offset of `net_cookie` in `struct net`.
    pub const NET_COOKIE: &str = "MESH_OFF_NET_COOKIE";
}

/// Names of the programs in the object.
pub mod programs {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const GETPEERNAME4: &str = "mesh_peername4";
    pub const GETPEERNAME6: &str = "mesh_peername6";
    pub const SOCK_OPS: &str = "mesh_sock_ops";
    /// cgroup_sock sock_release: ends a socket's hold on the record maps.
    pub const SOCK_RELEASE: &str = "mesh_sock_release";
    pub const INGRESS: &str = "mesh_ingress";
    /// `INGRESS` for kernels whose cgroup_skb programs cannot call `bpf_get_netns_cookie`.
    pub const INGRESS_BTF: &str = "mesh_ingress_btf";
    pub const SK_MSG: &str = "mesh_sk_msg";
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// `Config::flags`: redirect IPv4 connections (a proxy IPv4 address is set).
pub const CONFIG_F_IPV4: u32 = 1;
/// `Config::flags`: redirect IPv6 connections (a proxy IPv6 address is set).
pub const CONFIG_F_IPV6: u32 = 2;
/// `Config::flags`: socket acceleration is on: sock_ops adds pods' ends of connections with the
/// node proxy to [`maps::SOCKS_TX`], whose sk_msg program hands their sends to the proxy's socket.
pub const CONFIG_F_ACCEL: u32 = 4;

/// Where enrolled pods' connections go. Written once by mesh-node at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// IPv4 address of the node proxy's outbound listener, network byte order.
    pub proxy_ip4: [u8; 4],
    /// IPv6 address of the node proxy's outbound listener, network byte order.
    pub proxy_ip6: [u8; 16],
    /// Port of the outbound listener, host byte order.
    pub proxy_port: u16,
    pub _reserved: u16,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
}

/// `PodEntry::flags`: inbound STRICT: new TCP connections from anything but the node proxy are
/// dropped. Without it (PERMISSIVE) they are accepted and counted as plaintext.
pub const POD_F_STRICT: u32 = 1;

/// Value of the enrollment map: who the pod is, as mesh-node numbered it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodEntry {
    /// mesh-node's handle for the pod; stable across proxy restarts (kept in its state file).
    pub pod_id: u32,
    /// `POD_F_*` bits.
    pub flags: u32,
}

/// Value of [`maps::LIMITS`]. A map of its own rather than fields of [`Config`]: pinned maps
/// keep their value size across generations, so new bounds come as new maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeLimits {
    /// Redirected sockets one pod may hold at once ([`maps::REDIRECTED`]); a connect beyond it
    /// fails with EPERM. 0: no bound (a proxy that predates it).
    pub redirected_per_pod: u32,
    pub _reserved: u32,
}

/// Key of [`maps::PORT_MODES`]: one port of one pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PodPort {
    /// [`PodEntry::pod_id`].
    pub pod_id: u32,
    /// The pod's listening port, host byte order.
    pub port: u16,
    pub _reserved: u16,
}

/// New inbound TCP connections of one pod that did not come through the node proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInbound {
    /// Accepted in PERMISSIVE mode: plaintext from outside the mesh.
    pub plaintext: u64,
    /// Dropped in STRICT mode.
    pub denied: u64,
}

/// A redirected connection's original destination and the pod that opened it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Original destination address; IPv4 uses the first four bytes.
    pub addr: [u8; 16],
    /// Original destination port, host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// [`PodEntry::pod_id`] of the pod that connected.
    pub pod_id: u32,
    /// Network-namespace cookie of the connecting socket: identity bound to the socket, not its IP.
    pub netns_cookie: u64,
}

/// The client side of a redirected connection as the node proxy sees its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Client address; IPv4 uses the first four bytes, the rest are zero.
    pub addr: [u8; 16],
    /// Client port, host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6` (IPv4-mapped IPv6 clients are keyed as `AF_INET`).
    pub family: u16,
}

impl ConnKey {
    pub const fn v4(addr: [u8; 4], port: u16) -> Self {
        let mut a = [0u8; 16];
        a[0] = addr[0];
        a[1] = addr[1];
        a[2] = addr[2];
        a[3] = addr[3];
        Self {
            addr: a,
            port,
            family: AF_INET,
        }
    }

    pub const fn v6(addr: [u8; 16], port: u16) -> Self {
        Self {
            addr,
            port,
            family: AF_INET6,
        }
    }
}

/// One end of a TCP connection as the socket itself sees it: the key of [`maps::SOCKS_TX`],
/// [`maps::SOCKS_RX`], [`maps::READERS`] and [`maps::SENDERS`]. The peer's
/// key is the same with local and remote swapped. IPv4 (also IPv4-mapped IPv6) uses the first
/// four bytes of each address and `AF_INET`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
}

impl SockKey {
    /// The key of the socket at the other end.
    pub const fn peer(&self) -> Self {
        Self {
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
            family: self.family,
        }
    }
}

/// What the proxy has read from one of its ends (a slot of [`maps::READ_SLOTS`]). The proxy
/// writes it through its memory mapping after every read, without a system call; the sk_msg
/// program of the pod sending to that end reads it. 64 bytes: one cache line per slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadSlot {
    /// Bytes the proxy has read from the socket since it accepted or opened it.
    pub read: u64,
    /// Bytes the pod may have sent and the proxy not yet read before sends go through TCP.
    pub limit: u32,
    pub _reserved: u32,
    /// The socket the slot is for; a slot found under another key is stale.
    pub key: SockKey,
    pub _pad: [u32; 2],
}

/// A pod end's sends, in bytes of its stream (a value of [`maps::SENDERS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendState {
    /// Everything sent so far, either way.
    pub total: u64,
    /// Where the last byte that went through TCP ends: until the proxy has read this far, a
    /// byte handed over could overtake a TCP byte.
    pub tcp_end: u64,
    /// `write_seq` as of the last send judged: its growth is what went through TCP since.
    pub last_seq: u32,
    pub _reserved: u32,
}

/// Which program a counter belongs to.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    Connect4 = 0,
    Connect6 = 1,
    SockOps = 2,
    GetPeerName = 3,
    /// cgroup_skb ingress: new inbound connections (SYNs) to enrolled pods.
    Ingress = 4,
    /// sk_msg: each send on a socket of [`maps::SOCKS_TX`].
    SkMsg = 5,
    /// cgroup_sock sock_release: a pod's socket is released (its last file reference closed).
    SockRelease = 6,
}

impl Program {
    pub const ALL: [Program; 7] = [
        Program::Connect4,
        Program::Connect6,
        Program::SockOps,
        Program::GetPeerName,
        Program::Ingress,
        Program::SkMsg,
        Program::SockRelease,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Program::Connect4 => "connect4",
            Program::Connect6 => "connect6",
            Program::SockOps => "sock_ops",
            Program::GetPeerName => "getpeername",
            Program::Ingress => "ingress",
            Program::SkMsg => "sk_msg",
            Program::SockRelease => "sock_release",
        }
    }
}

/// What a program did with one event. Counters are `Program x Outcome`, flattened by [`counter_index`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The program ran.
    Seen = 0,
    /// connect: destination rewritten to the proxy. sock_ops: record moved to the connection map.
    /// getpeername: original peer returned.
    Redirected = 1,
    /// Not a TCP socket.
    SkipNotTcp = 2,
    /// The socket's network namespace is not enrolled (includes the proxy itself).
    SkipNotEnrolled = 3,
    /// Destination is loopback: stays inside the pod.
    SkipLoopback = 4,
    /// Destination port is excluded by config.
    SkipExcludedPort = 5,
    /// Destination address is in an excluded CIDR.
    SkipExcludedCidr = 6,
    /// Destination already is the proxy listener.
    SkipProxyAddr = 7,
    /// connect refused (fail closed): no proxy address of that family, or the record could not
    /// be stored. An enrolled pod never bypasses the mesh.
    Denied = 8,
    /// sock_ops / getpeername: the socket was not redirected (no record).
    NoRecord = 9,
    /// sock_ops: records of a closed redirected socket removed. sock_release: a redirected
    /// socket released by its pod (no longer counted against it).
    Closed = 10,
    /// ingress: a new connection from the node proxy (mesh traffic).
    FromProxy = 11,
    /// ingress: a new plaintext connection from outside the mesh, accepted (PERMISSIVE).
    Plaintext = 12,
    /// sock_ops: a pod's end of a connection with the node proxy added to the socket map.
    /// sk_msg: a send handed straight to the peer socket, past TCP/IP.
    Accelerated = 13,
    /// sock_ops: the socket map refused the socket (full): it stays on plain TCP.
    AccelFailed = 14,
    /// sk_msg: the peer is not a proxy end in the map (not accepted yet, closed, or a pod): TCP.
    NoPeer = 15,
    /// sk_msg: the proxy has not read everything this socket sent through TCP: TCP again, so
    /// bytes never overtake each other.
    Unread = 16,
    /// sk_msg: the proxy has as much unread from this socket as it allows: TCP, whose flow
    /// control makes the pod wait.
    PeerFull = 17,
    /// sock_ops: the socket has `SO_ZEROCOPY` on: it stays out of the socket map (whose kernel
    /// path numbers zerocopy completions per chunk, not per send). sk_msg: it was turned on
    /// later: TCP, which at least sends the completions the app waits for before it reuses its
    /// buffers (handed-over bytes would never get one).
    ZeroCopy = 18,
    /// ingress: IPv6 extension headers that could not be walked to the upper layer, for a STRICT
    /// pod: dropped, since it may open a connection.
    Unparsed = 19,
    /// ingress: a SYN from the node proxy's address that the node proxy did not open (a host
    /// process bound to that address, kubelet, SNATed traffic): judged as plaintext from outside
    /// the mesh, and counted here as well.
    Undelivered = 20,
    /// connect: a socket the node proxy made in the pod's network namespace for traffic leaving
    /// the mesh: it connects where it asked.
    SkipEgress = 21,
    /// connect refused: the pod already holds as many redirected sockets as it may
    /// ([`NodeLimits::redirected_per_pod`]), so one pod cannot crowd the others' records out of
    /// the node's shared maps.
    PodFull = 22,
}

impl Outcome {
    pub const ALL: [Outcome; 23] = [
        Outcome::Seen,
        Outcome::Redirected,
        Outcome::SkipNotTcp,
        Outcome::SkipNotEnrolled,
        Outcome::SkipLoopback,
        Outcome::SkipExcludedPort,
        Outcome::SkipExcludedCidr,
        Outcome::SkipProxyAddr,
        Outcome::Denied,
        Outcome::NoRecord,
        Outcome::Closed,
        Outcome::FromProxy,
        Outcome::Plaintext,
        Outcome::Accelerated,
        Outcome::AccelFailed,
        Outcome::NoPeer,
        Outcome::Unread,
        Outcome::PeerFull,
        Outcome::ZeroCopy,
        Outcome::Unparsed,
        Outcome::Undelivered,
        Outcome::SkipEgress,
        Outcome::PodFull,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Seen => "seen",
            Outcome::Redirected => "redirected",
            Outcome::SkipNotTcp => "skip_not_tcp",
            Outcome::SkipNotEnrolled => "skip_not_enrolled",
            Outcome::SkipLoopback => "skip_loopback",
            Outcome::SkipExcludedPort => "skip_excluded_port",
            Outcome::SkipExcludedCidr => "skip_excluded_cidr",
            Outcome::SkipProxyAddr => "skip_proxy_addr",
            Outcome::Denied => "denied",
            Outcome::NoRecord => "no_record",
            Outcome::Closed => "closed",
            Outcome::FromProxy => "from_proxy",
            Outcome::Plaintext => "plaintext",
            Outcome::Accelerated => "accelerated",
            Outcome::AccelFailed => "accel_failed",
            Outcome::NoPeer => "no_peer",
            Outcome::Unread => "unread",
            Outcome::PeerFull => "peer_full",
            Outcome::ZeroCopy => "zerocopy",
            Outcome::Unparsed => "unparsed",
            Outcome::Undelivered => "undelivered",
            Outcome::SkipEgress => "skip_egress",
            Outcome::PodFull => "pod_full",
        }
    }
}

/// Counter slots per program, and programs, with room to spare: the counter map is pinned and
/// outlives a proxy, so its size must not change when a later build adds an outcome.
pub const OUTCOME_SLOTS: u32 = 32;
pub const PROGRAM_SLOTS: u32 = 16;
/// Entries in the counter array.
pub const COUNTERS: u32 = PROGRAM_SLOTS * OUTCOME_SLOTS;
const _: () = assert!(Outcome::ALL.len() as u32 <= OUTCOME_SLOTS);
const _: () = assert!(Program::ALL.len() as u32 <= PROGRAM_SLOTS);

#[inline(always)]
pub const fn counter_index(program: Program, outcome: Outcome) -> u32 {
    program as u32 * OUTCOME_SLOTS + outcome as u32
}

// No padding anywhere: every size is the sum of its fields.
const _: () = assert!(core::mem::size_of::<Config>() == 4 + 16 + 2 + 2 + 4);
const _: () = assert!(core::mem::size_of::<PodEntry>() == 8);
const _: () = assert!(core::mem::size_of::<NodeLimits>() == 8);
const _: () = assert!(core::mem::size_of::<PodInbound>() == 16);
const _: () = assert!(core::mem::size_of::<PodPort>() == 8);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 16 + 2 + 2 + 4 + 8);
const _: () = assert!(core::mem::size_of::<ConnKey>() == 16 + 2 + 2);
const _: () = assert!(core::mem::size_of::<SockKey>() == 16 + 16 + 2 + 2 + 4);
const _: () = assert!(core::mem::size_of::<ReadSlot>() == 64);
const _: () = assert!(core::mem::size_of::<SendState>() == 8 + 8 + 4 + 4);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_indices_are_unique_and_in_range() {
        let mut seen = [false; COUNTERS as usize];
        for p in Program::ALL {
            for o in Outcome::ALL {
                let i = counter_index(p, o) as usize;
                assert!(!seen[i], "{} {} collides", p.name(), o.name());
                seen[i] = true;
            }
        }
    }

    #[test]
    fn a_peer_key_swaps_the_ends() {
        let k = SockKey {
            local_addr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            remote_addr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            local_port: 40000,
            remote_port: 15001,
            family: AF_INET as u32,
        };
        let p = k.peer();
        assert_eq!((p.local_addr[3], p.local_port), (2, 15001));
        assert_eq!((p.remote_addr[3], p.remote_port), (1, 40000));
        assert_eq!(p.peer(), k);
    }

    #[test]
    fn outcome_all_is_in_discriminant_order() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
        }
        for (i, p) in Program::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i);
        }
    }
}
