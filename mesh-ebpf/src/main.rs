//! Transparent redirection of enrolled pods' TCP connections to the node proxy.
//!
//! Attached once per node to the cgroup that holds the node's pods:
//! - `connect4`/`connect6` rewrite an enrolled socket's destination to the proxy's outbound listener
//!   and remember the original destination and the pod under the socket's cookie;
//! - `sock_ops` moves that record, once the client port is known, to a map keyed by the client's
//!   address and port: exactly the peer address the proxy sees on `accept`;
//! - `getpeername4`/`getpeername6` show the client its original peer;
//! - `sock_release` ends a socket's count against its pod's share of the record maps (each pod
//!   may hold a bounded number of redirected sockets, so none can crowd out the others' records);
//! - `ingress` (cgroup_skb) judges new inbound connections to pods (STRICT / PERMISSIVE);
//! - with socket acceleration on, `sock_ops` also adds pods' ends of their connections with the
//!   proxy to a socket map, whose `sk_msg` program hands their sends straight to the proxy's
//!   socket when that keeps the stream in order and bounded.
//!
//! Enrollment is a map keyed by the network-namespace cookie, so one attachment serves every pod of
//! the node, and a pod's identity comes from the socket that connected, not from its IP.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Inline assembly for BPF's atomic add (`ctx::add`); the build allows this one nightly feature.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

// Built for the host (`cargo build --workspace`) the crate is an empty binary: the programs only
// exist for the BPF target.
#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("mesh-ebpf is an eBPF object: build it with `cargo xtask build-ebpf`");
}

#[cfg(target_arch = "bpf")]
mod ctx;
#[cfg(target_arch = "bpf")]
mod programs;
