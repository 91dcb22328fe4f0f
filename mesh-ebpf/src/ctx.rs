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
    programs::{SockAddrContext, SockOpsContext},
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
