//! Test support for the mesh: a "cluster in a box" made of network namespaces and cgroups on the
//! real kernel, with real mesh-node processes. Used by the end-to-end tests, `cargo xtask bench`
//! and `cargo xtask demo`. Needs root.
pub mod cluster;
pub mod ctrl;
pub mod ctrl_bench;
pub mod http;
mod sys;

pub use cluster::{
    Cluster, ClusterBuilder, Node, Pair, Pod, PodProcess, cleanup_stale, connect_in, find_bin,
    listen_in, teardown,
};
