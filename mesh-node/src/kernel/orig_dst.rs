//! Where a redirected connection was going, and who opened it.
//!
//! Behind a trait so the outbound listener does not care how the answer is found: today the kernel
//! programs index it by the client's address and port (see `mesh-ebpf`).
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// mesh-node's handle for an enrolled pod; what the kernel stores instead of a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PodId(pub u32);

impl std::fmt::Display for PodId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pod#{}", self.0)
    }
}

/// The answer for one accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirected {
    /// The address the application connected to.
    pub orig_dst: SocketAddr,
    /// The enrolled pod whose socket connected.
    pub pod: PodId,
    /// Network namespace of that socket, as the kernel saw it at connect time.
    pub netns_cookie: u64,
}

pub trait OrigDstSource: Send + Sync + 'static {
    /// Looks up the connection whose client end is `peer` (the accepted socket's peer address).
    /// `None`: this connection was not redirected by us; it must be refused.
    fn lookup(&self, peer: SocketAddr) -> Option<Redirected>;
}
