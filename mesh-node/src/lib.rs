//! mesh-node: the per-node proxy of the mesh.
//!
//! Data flows one way: kernel redirect (`ebpf`) -> accept (`outbound`) -> original destination and
//! source pod (`orig_dst`, `enroll`) -> upstream.
pub mod accel;
pub mod access_log;
pub mod admin;
pub mod app;
pub mod authz;
pub mod btf;
pub mod cni;
pub mod coalesce;
pub mod config;
pub mod drain;
pub mod ebpf;
pub mod enforce;
pub mod enroll;
pub mod explain;
pub mod follow;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub(crate) mod handover;
pub mod hbone;
pub mod identity;
pub mod inbound;
pub mod kubepods;
pub mod l7;
pub mod limits;
pub mod live;
pub mod logging;
pub mod metrics;
pub mod mode;
pub mod node_config;
pub mod orig_dst;
pub mod outbound;
pub mod pod_socket;
pub mod probe;
pub mod ready;
pub mod route;
pub mod routes;
pub mod subscribe;
mod sys;
pub mod tls;
pub mod trace;
