//! Context-field access: the only `unsafe` in this crate besides map reads.
//!
//! SAFETY (whole module): the context pointers come from the kernel and are valid for the whole
//! program run; the verifier checks every access below against the program type. `tcp_sock`
//! pointers come from `bpf_skc_to_tcp_sock`; the verifier checks each read through one against
//! the kernel's BTF for that type and turns it into a fault-tolerant load. Map value pointers are
//! valid for the program run (the verifier checks their bounds). Each field is read
//! or written with one volatile 4-byte access because LLVM may otherwise merge neighbouring accesses
//! into an 8-byte one, which the verifier rejects as `invalid bpf_context access`.
use core::{
    ffi::c_void,
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use aya_ebpf::{
    Global,
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_skc_to_tcp_sock},
    maps::{Array, LruHashMap, SockHash},
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext},
};
use mesh_abi::{AF_INET, AF_INET6, ReadSlot, SendState, SockKey};

#[inline(always)]
pub fn sock_type(sa: &SockAddrContext) -> u32 {
    unsafe { read_volatile(addr_of!((*sa.sock_addr).type_)) }
}

#[inline(always)]
pub fn protocol(sa: &SockAddrContext) -> u32 {
    unsafe { read_volatile(addr_of!((*sa.sock_addr).protocol)) }
}

/// Destination address, as bytes in network order.
#[inline(always)]
pub fn user_ip4(sa: &SockAddrContext) -> [u8; 4] {
    unsafe { read_volatile(addr_of!((*sa.sock_addr).user_ip4)) }.to_ne_bytes()
}

#[inline(always)]
pub fn user_ip6(sa: &SockAddrContext) -> [u8; 16] {
    ip6(|i| unsafe { read_volatile(addr_of!((*sa.sock_addr).user_ip6[i])) })
}

/// An IPv6 address from its four 32-bit context words (each in network order in memory). Each
/// word is its own 4-byte read: the verifier checks context accesses one by one.
#[inline(always)]
fn ip6(word: impl Fn(usize) -> u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = word(i).to_ne_bytes();
        out[i * 4] = w[0];
        out[i * 4 + 1] = w[1];
        out[i * 4 + 2] = w[2];
        out[i * 4 + 3] = w[3];
        i += 1;
    }
    out
}

/// Destination port in host order (`user_port` holds it big-endian in its low 16 bits).
#[inline(always)]
pub fn user_port(sa: &SockAddrContext) -> u16 {
    u16::from_be(unsafe { read_volatile(addr_of!((*sa.sock_addr).user_port)) } as u16)
}

#[inline(always)]
pub fn set_user_ip4(sa: &SockAddrContext, ip: [u8; 4]) {
    unsafe {
        write_volatile(
            addr_of_mut!((*sa.sock_addr).user_ip4),
            u32::from_ne_bytes(ip),
        )
    }
}

#[inline(always)]
pub fn set_user_ip6(sa: &SockAddrContext, ip: [u8; 16]) {
    let mut i = 0;
    while i < 4 {
        let w = u32::from_ne_bytes([ip[i * 4], ip[i * 4 + 1], ip[i * 4 + 2], ip[i * 4 + 3]]);
        unsafe { write_volatile(addr_of_mut!((*sa.sock_addr).user_ip6[i]), w) };
        i += 1;
    }
}

#[inline(always)]
pub fn set_user_port(sa: &SockAddrContext, port: u16) {
    unsafe { write_volatile(addr_of_mut!((*sa.sock_addr).user_port), port.to_be() as u32) }
}

#[inline(always)]
pub fn netns_cookie(sa: &SockAddrContext) -> u64 {
    unsafe { bpf_get_netns_cookie(sa.sock_addr as *mut c_void) }
}

#[inline(always)]
pub fn socket_cookie(sa: &SockAddrContext) -> u64 {
    unsafe { bpf_get_socket_cookie(sa.sock_addr as *mut c_void) }
}

#[inline(always)]
pub fn sk_socket_cookie(sk: &SockContext) -> u64 {
    unsafe { bpf_get_socket_cookie(sk.sock as *mut c_void) }
}

/// The socket's TCP state (`BPF_TCP_*`).
#[inline(always)]
pub fn sk_state(sk: &SockContext) -> u32 {
    unsafe { read_volatile(addr_of!((*sk.sock).state)) }
}

/// A counter in a map value, read once.
#[inline(always)]
pub fn load(counter: *mut u64) -> u64 {
    unsafe { read_volatile(counter) }
}

/// Atomic add to a counter in a map value shared by all CPUs: BPF's plain atomic add, which every
/// kernel has (Rust offers no read-modify-write atomics on a target without compare-and-swap).
#[inline(always)]
pub fn add(counter: *mut u64, n: u64) {
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({p} + 0) += {n}",
            p = in(reg) counter,
            n = in(reg) n,
            options(nostack),
        )
    }
}

#[inline(always)]
pub fn sub(counter: *mut u64, n: u64) {
    add(counter, n.wrapping_neg());
}

#[inline(always)]
pub fn ops_socket_cookie(ops: &SockOpsContext) -> u64 {
    unsafe { bpf_get_socket_cookie(ops.ops as *mut c_void) }
}

#[inline(always)]
pub fn ops_local_ip4(ops: &SockOpsContext) -> [u8; 4] {
    unsafe { read_volatile(addr_of!((*ops.ops).local_ip4)) }.to_ne_bytes()
}

#[inline(always)]
pub fn ops_local_ip6(ops: &SockOpsContext) -> [u8; 16] {
    ip6(|i| unsafe { read_volatile(addr_of!((*ops.ops).local_ip6[i])) })
}

#[inline(always)]
pub fn ops_family(ops: &SockOpsContext) -> u32 {
    unsafe { read_volatile(addr_of!((*ops.ops).family)) }
}

#[inline(always)]
pub fn ops_remote_ip4(ops: &SockOpsContext) -> [u8; 4] {
    unsafe { read_volatile(addr_of!((*ops.ops).remote_ip4)) }.to_ne_bytes()
}

#[inline(always)]
pub fn ops_remote_ip6(ops: &SockOpsContext) -> [u8; 16] {
    ip6(|i| unsafe { read_volatile(addr_of!((*ops.ops).remote_ip6[i])) })
}

#[inline(always)]
pub fn ops_local_port(ops: &SockOpsContext) -> u16 {
    unsafe { read_volatile(addr_of!((*ops.ops).local_port)) as u16 }
}

#[inline(always)]
pub fn ops_remote_port(ops: &SockOpsContext) -> u16 {
    remote_port(unsafe { read_volatile(addr_of!((*ops.ops).remote_port)) })
}

/// `remote_port` of sock_ops and sk_msg holds the big-endian port, shifted into the upper half on
/// little-endian kernels (and unshifted on some older ones): a value above 0xffff is shifted.
#[inline(always)]
fn remote_port(v: u32) -> u16 {
    let be = if v > 0xffff {
        (v >> 16) as u16
    } else {
        v as u16
    };
    u16::from_be(be)
}

/// The socket's own key in the socket map, from sock_ops.
#[inline(always)]
pub fn ops_sock_key(ops: &SockOpsContext) -> SockKey {
    let (family, local, remote) = if ops_family(ops) == AF_INET as u32 {
        (
            AF_INET,
            widen(ops_local_ip4(ops)),
            widen(ops_remote_ip4(ops)),
        )
    } else {
        normalize(ops_local_ip6(ops), ops_remote_ip6(ops))
    };
    SockKey {
        local_addr: local,
        remote_addr: remote,
        local_port: ops_local_port(ops),
        remote_port: ops_remote_port(ops),
        family: family as u32,
    }
}

/// The key of this sk_msg's socket.
#[inline(always)]
pub fn msg_sock_key(msg: &SkMsgContext) -> SockKey {
    let m = msg.msg;
    let (family, local, remote) =
        if unsafe { read_volatile(addr_of!((*m).family)) } == AF_INET as u32 {
            (
                AF_INET,
                widen(unsafe { read_volatile(addr_of!((*m).local_ip4)) }.to_ne_bytes()),
                widen(unsafe { read_volatile(addr_of!((*m).remote_ip4)) }.to_ne_bytes()),
            )
        } else {
            normalize(
                ip6(|i| unsafe { read_volatile(addr_of!((*m).local_ip6[i])) }),
                ip6(|i| unsafe { read_volatile(addr_of!((*m).remote_ip6[i])) }),
            )
        };
    SockKey {
        local_addr: local,
        remote_addr: remote,
        local_port: unsafe { read_volatile(addr_of!((*m).local_port)) } as u16,
        remote_port: remote_port(unsafe { read_volatile(addr_of!((*m).remote_port)) }),
        family: family as u32,
    }
}

/// IPv6 addresses of a socket; an IPv4 connection on a dual-stack socket is keyed as IPv4, as its
/// peer (an IPv4 socket) keys it.
#[inline(always)]
fn normalize(local: [u8; 16], remote: [u8; 16]) -> (u16, [u8; 16], [u8; 16]) {
    match (v4_mapped(&local), v4_mapped(&remote)) {
        (Some(l), Some(r)) => (AF_INET, widen(l), widen(r)),
        _ => (AF_INET6, local, remote),
    }
}

#[inline(always)]
pub fn widen(a: [u8; 4]) -> [u8; 16] {
    let mut w = [0u8; 16];
    w[0] = a[0];
    w[1] = a[1];
    w[2] = a[2];
    w[3] = a[3];
    w
}

#[inline(always)]
pub fn v4_mapped(a: &[u8; 16]) -> Option<[u8; 4]> {
    let prefix = a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9];
    if prefix == 0 && a[10] == 0xff && a[11] == 0xff {
        Some([a[12], a[13], a[14], a[15]])
    } else {
        None
    }
}

/// This kernel's layout, set by the loader from its BTF (names in `mesh_abi::globals`): where
/// `struct tcp_sock`'s `write_seq` and `sk_flags` are, and `SOCK_ZEROCOPY`. Read-only globals are
/// constants to the verifier, so each read below has a fixed offset it checks against the BTF
/// type.
#[unsafe(no_mangle)]
static MESH_OFF_WRITE_SEQ: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static MESH_OFF_SK_FLAGS: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static MESH_SOCK_ZEROCOPY: Global<u32> = Global::new(0);

/// What an sk_msg program needs of its own socket.
pub struct Sender {
    /// End of what it has queued to TCP.
    pub write_seq: u32,
    /// `SO_ZEROCOPY` is on.
    pub zerocopy: bool,
}

/// The socket an sk_msg program runs for.
#[inline(always)]
pub fn msg_sender(msg: &SkMsgContext) -> Option<Sender> {
    let sk = unsafe { read_volatile(addr_of!((*msg.msg).__bindgen_anon_3.sk)) };
    sender(sk as *mut c_void)
}

/// The socket of a sock_ops callback (a full socket at establishment).
#[inline(always)]
pub fn ops_sender(ops: &SockOpsContext) -> Option<Sender> {
    let sk = unsafe { read_volatile(addr_of!((*ops.ops).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return None;
    }
    sender(sk as *mut c_void)
}

#[inline(always)]
fn sender(sk: *mut c_void) -> Option<Sender> {
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) } as *const u8;
    if tp.is_null() {
        return None;
    }
    let write_seq =
        unsafe { read_volatile(tp.add(MESH_OFF_WRITE_SEQ.load() as usize) as *const u32) };
    let flags = unsafe { read_volatile(tp.add(MESH_OFF_SK_FLAGS.load() as usize) as *const u64) };
    Some(Sender {
        write_seq,
        zerocopy: flags >> (MESH_SOCK_ZEROCOPY.load() & 63) & 1 != 0,
    })
}

#[inline(always)]
pub fn ops_snd_una(ops: &SockOpsContext) -> u32 {
    unsafe { read_volatile(addr_of!((*ops.ops).snd_una)) }
}

/// Sequence space the peer has acknowledged (at establishment: the SYN, plus data that went with
/// it).
#[inline(always)]
pub fn ops_bytes_acked(ops: &SockOpsContext) -> u64 {
    unsafe { read_volatile(addr_of!((*ops.ops).bytes_acked)) }
}

/// A slot of the proxy's read counters, as the proxy last wrote it.
#[inline(always)]
pub fn read_slot(slots: &Array<ReadSlot>, index: u32) -> Option<(u64, u32, SockKey)> {
    let s = slots.get_ptr(index)?;
    Some(unsafe {
        (
            read_volatile(addr_of!((*s).read)),
            read_volatile(addr_of!((*s).limit)),
            read_volatile(addr_of!((*s).key)),
        )
    })
}

/// A pod end's send state, for update in place. Its one writer is the sk_msg program of that
/// socket, whose sends the socket lock serializes.
#[inline(always)]
pub fn send_state(
    senders: &LruHashMap<SockKey, SendState>,
    key: &SockKey,
) -> Option<&'static mut SendState> {
    senders.get_ptr_mut(key).map(|p| unsafe { &mut *p })
}

/// Hands the message to the peer's receive queue (`BPF_F_INGRESS`: as if it had arrived).
/// `false` when the peer is not in `socks` (any more): the message then goes through TCP.
#[inline(always)]
pub fn hand_over(msg: &SkMsgContext, socks: &SockHash<SockKey>, mut key: SockKey) -> bool {
    socks.redirect_msg(msg, &mut key, BPF_F_INGRESS as u64) == SK_PASS as i64
}

/// Bytes in this send (the sk_msg's size).
#[inline(always)]
pub fn msg_size(msg: &SkMsgContext) -> u32 {
    unsafe { read_volatile(addr_of!((*msg.msg).size)) }
}

#[inline(always)]
pub fn skb_netns_cookie(skb: &SkBuffContext) -> u64 {
    unsafe { bpf_get_netns_cookie(skb.skb.skb as *mut c_void) }
}

/// Where `struct tcp_sock` keeps its `struct net *` (`__sk_common.skc_net`) and where `struct
/// net` keeps `net_cookie`, set by the loader from the kernel's BTF for `mesh_ingress_btf`.
#[unsafe(no_mangle)]
static MESH_OFF_SKC_NET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static MESH_OFF_NET_COOKIE: Global<u32> = Global::new(0);

/// The network-namespace cookie of the socket receiving `skb`, read through BTF (what
/// `bpf_get_netns_cookie` returns where cgroup_skb may call it). `None` when the socket is not a
/// full TCP socket.
#[inline(always)]
pub fn skb_sock_netns_cookie(skb: &SkBuffContext) -> Option<u64> {
    let sk = unsafe { read_volatile(addr_of!((*skb.skb.skb).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return None;
    }
    let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) } as *const u8;
    if tp.is_null() {
        return None;
    }
    let net =
        unsafe { read_volatile(tp.add(MESH_OFF_SKC_NET.load() as usize) as *const *const u8) };
    if net.is_null() {
        return None;
    }
    Some(unsafe { read_volatile(net.add(MESH_OFF_NET_COOKIE.load() as usize) as *const u64) })
}

#[inline(always)]
pub fn skb_ifindex(skb: &SkBuffContext) -> u32 {
    unsafe { read_volatile(addr_of!((*skb.skb.skb).ifindex)) }
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// What an inbound packet is, as far as the ingress program cares.
pub enum Inbound {
    /// A TCP SYN (a new connection): the key of the connecting socket, as that socket sees itself
    /// (local = the SYN's source, remote = the pod).
    Syn(SockKey),
    /// Anything else its headers show: not TCP, or not a SYN.
    Other,
    /// IPv6 extension headers that cannot be walked to the upper layer within the bound (or one
    /// that hides it, like ESP): whether it opens a connection is unknown.
    Unparsed,
}

/// IPv6 extension headers walked before giving up.
const MAX_EXT_HEADERS: usize = 8;
const NH_HOP_BY_HOP: u8 = 0;
const NH_ROUTING: u8 = 43;
const NH_FRAGMENT: u8 = 44;
const NH_AUTH: u8 = 51;
const NH_DEST_OPTS: u8 = 60;
/// Upper layers other than TCP that carry no connection of ours: UDP, ICMPv6, No Next Header.
const NH_UDP: u8 = 17;
const NH_ICMPV6: u8 = 58;
const NH_NONE: u8 = 59;

/// Classifies an inbound packet; cgroup_skb data starts at the network header. IPv6 extension
/// headers (Hop-by-Hop, Routing, Fragment, Authentication, Destination Options) are walked, so a
/// SYN behind them is judged like any other.
#[inline(always)]
pub fn inbound(skb: &SkBuffContext) -> Inbound {
    let proto = u16::from_be(skb.skb.protocol() as u16);
    let (mut key, l4) = if proto == ETH_P_IP {
        let (Ok(vihl), Ok(p), Ok(src), Ok(dst)) = (
            skb.load::<u8>(0),
            skb.load::<u8>(9),
            skb.load::<[u8; 4]>(12),
            skb.load::<[u8; 4]>(16),
        ) else {
            return Inbound::Other;
        };
        if p != IPPROTO_TCP {
            return Inbound::Other;
        }
        let key = SockKey {
            local_addr: widen(src),
            remote_addr: widen(dst),
            local_port: 0,
            remote_port: 0,
            family: AF_INET as u32,
        };
        (key, ((vihl & 0x0f) as usize) * 4)
    } else if proto == ETH_P_IPV6 {
        let (Ok(mut nh), Ok(src), Ok(dst)) = (
            skb.load::<u8>(6),
            skb.load::<[u8; 16]>(8),
            skb.load::<[u8; 16]>(24),
        ) else {
            return Inbound::Unparsed;
        };
        let mut off = 40usize;
        let mut i = 0;
        while i < MAX_EXT_HEADERS && nh != IPPROTO_TCP {
            let (Ok(next), Ok(len)) = (skb.load::<u8>(off), skb.load::<u8>(off + 1)) else {
                return Inbound::Unparsed;
            };
            off += match nh {
                NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS => (len as usize + 1) * 8,
                NH_FRAGMENT => 8,
                NH_AUTH => (len as usize + 2) * 4,
                NH_UDP | NH_ICMPV6 | NH_NONE => return Inbound::Other,
                _ => return Inbound::Unparsed,
            };
            nh = next;
            i += 1;
        }
        if nh != IPPROTO_TCP {
            return match nh {
                NH_UDP | NH_ICMPV6 | NH_NONE => Inbound::Other,
                _ => Inbound::Unparsed,
            };
        }
        let key = SockKey {
            local_addr: src,
            remote_addr: dst,
            local_port: 0,
            remote_port: 0,
            family: AF_INET6 as u32,
        };
        (key, off)
    } else {
        return Inbound::Other;
    };
    match (skb.load::<u8>(l4 + 13), skb.load::<[u8; 4]>(l4)) {
        (Ok(flags), Ok(ports)) if flags & TCP_FLAG_SYN != 0 && flags & TCP_FLAG_ACK == 0 => {
            key.local_port = u16::from_be_bytes([ports[0], ports[1]]);
            key.remote_port = u16::from_be_bytes([ports[2], ports[3]]);
            Inbound::Syn(key)
        }
        (Ok(_), _) => Inbound::Other,
        _ => Inbound::Unparsed,
    }
}
