//! Context-field access: the only `unsafe` in this crate besides map reads.
//!
//! SAFETY (whole module): the context pointers come from the kernel and are valid for the whole
//! program run; the verifier checks every access below against the program type. Each field is read
//! or written with one volatile 4-byte access because LLVM may otherwise merge neighbouring accesses
//! into an 8-byte one, which the verifier rejects as `invalid bpf_context access`.
use core::{
    ffi::c_void,
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext},
};

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
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = unsafe { read_volatile(addr_of!((*sa.sock_addr).user_ip6[i])) }.to_ne_bytes();
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
pub fn ops_socket_cookie(ops: &SockOpsContext) -> u64 {
    unsafe { bpf_get_socket_cookie(ops.ops as *mut c_void) }
}

#[inline(always)]
pub fn ops_local_ip4(ops: &SockOpsContext) -> [u8; 4] {
    unsafe { read_volatile(addr_of!((*ops.ops).local_ip4)) }.to_ne_bytes()
}

#[inline(always)]
pub fn ops_local_ip6(ops: &SockOpsContext) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = unsafe { read_volatile(addr_of!((*ops.ops).local_ip6[i])) }.to_ne_bytes();
        out[i * 4] = w[0];
        out[i * 4 + 1] = w[1];
        out[i * 4 + 2] = w[2];
        out[i * 4 + 3] = w[3];
        i += 1;
    }
    out
}

#[inline(always)]
pub fn skb_netns_cookie(skb: &SkBuffContext) -> u64 {
    unsafe { bpf_get_netns_cookie(skb.skb.skb as *mut c_void) }
}

#[inline(always)]
pub fn skb_ifindex(skb: &SkBuffContext) -> u32 {
    unsafe { read_volatile(addr_of!((*skb.skb.skb).ifindex)) }
}

/// Source address of an inbound packet.
pub enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// For a TCP SYN (a new connection), its source address. cgroup_skb data starts at the network
/// header. IPv6 extension headers are not walked: such SYNs are judged as non-TCP and pass,
/// which is what the stack itself would see for a host-local policy.
#[inline(always)]
pub fn tcp_syn_source(skb: &SkBuffContext) -> Option<Source> {
    let proto = u16::from_be(skb.skb.protocol() as u16);
    let (src, l4) = if proto == ETH_P_IP {
        let vihl: u8 = skb.load(0).ok()?;
        if skb.load::<u8>(9).ok()? != IPPROTO_TCP {
            return None;
        }
        let src: [u8; 4] = skb.load(12).ok()?;
        (Source::V4(src), ((vihl & 0x0f) as usize) * 4)
    } else if proto == ETH_P_IPV6 {
        if skb.load::<u8>(6).ok()? != IPPROTO_TCP {
            return None;
        }
        let src: [u8; 16] = skb.load(8).ok()?;
        (Source::V6(src), 40)
    } else {
        return None;
    };
    let flags: u8 = skb.load(l4 + 13).ok()?;
    (flags & TCP_FLAG_SYN != 0 && flags & TCP_FLAG_ACK == 0).then_some(src)
}
