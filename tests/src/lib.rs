//! Test support for the mesh: a "cluster in a box" made of network namespaces and cgroups on the
//! real kernel, with real mesh-node processes. Used by the end-to-end tests, `cargo xtask bench`
//! and `cargo xtask demo`. Needs root.
pub mod cluster;
pub mod ctrl;
pub mod ctrl_bench;
pub mod http;
pub mod procfs;
pub mod sys;

pub use cluster::{
    Cluster, ClusterBuilder, Node, Pair, Pod, PodProcess, cleanup_stale, connect_in,
    connect_in_from, connect_many_in, find_bin, listen_in, teardown,
};

/// How much slower than this machine the tests run: `MESH_TEST_TIME_SCALE` (the kernel matrix sets
/// it, because QEMU's software emulation is several times slower). Waits that a test relies on
/// to fill buffers are multiplied by it; timeouts are not shortened.
pub fn time_scale() -> u64 {
    std::env::var("MESH_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|s| *s >= 1)
        .unwrap_or(1)
}

/// The number at `path` in a JSON report or counters snapshot; panics, showing the JSON, when
/// there is none (a test must not read a missing figure as zero).
pub fn n(v: &serde_json::Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(v, |v, k| &v[k])
        .as_u64()
        .unwrap_or_else(|| panic!("no number at {path:?} in {v}"))
}
