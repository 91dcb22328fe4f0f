//! mesh-node: the per-node proxy of the mesh.
//!
//! Data flows one way: the kernel redirects a pod's connection (`kernel`) -> the proxy accepts it
//! and resolves its source and destination once (`proxy::outbound`) -> route and policy
//! (`proxy::route`, `policy`, `http`) -> the tunnel to the destination's node (`proxy::tunnel`)
//! -> that node's delivery checks and inbound policy (`proxy::inbound`) -> the pod. Configuration
//! flows one way too: the controller's stream (`config::subscribe`) -> one snapshot
//! (`config::node`) -> its watchers.
//!
//! Layers, lowest first; a module imports only from its own layer or lower ones:
//! - `sys` (the crate's unsafe system calls), `config` (flags and the controller's config),
//!   `identity` (certificates, TLS), `kernel` (programs, maps, BTF, socket acceleration);
//! - `pods` (enrollment of the node's pods), `telemetry` (metrics, access log, traces);
//! - `policy` (authorization, routes), `proxy` (tunnel, outbound, inbound), `http` (the L7
//!   path);
//! - `admin`, `mode`, `app` (wiring).
pub mod admin;
pub mod app;
pub mod config;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub(crate) mod http;
pub(crate) mod identity;
pub mod kernel;
pub(crate) mod mode;
pub mod pods;
pub(crate) mod policy;
pub(crate) mod proxy;
mod sys;
pub mod telemetry;
