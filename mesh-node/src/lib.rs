//! mesh-node: the per-node proxy of the mesh.
//!
//! Data flows one way: the kernel redirects a pod's connection (`kernel`) -> the proxy accepts it
//! and resolves its source and destination once (`proxy::outbound`) -> route and policy
//! (`proxy::route`, `policy`, `http`) -> the tunnel to the destination's node (`proxy::tunnel`)
//! -> that node's delivery checks and inbound policy (`proxy::inbound`) -> the pod. Configuration
//! flows one way too: the controller's stream (`config::subscribe`) -> one snapshot
//! (`config::node`) -> its watchers.
//!
//! Layers, lowest first; a module imports only from its own layer or lower ones (`cargo xtask
//! test` checks it against the table in `xtask/src/modgraph.rs`):
//! - base: `sys` (the crate's unsafe system calls), `ready`, `config` (flags), `identity`
//!   (certificates, TLS), `kernel` (programs, maps, BTF, socket acceleration);
//! - the compiled parts a configuration version holds, pure: `policy::{authz, routes}`,
//!   `http::{services, balance, policy}` and the HTTP vocabulary in `http`;
//! - one configuration version and its stream: `config::{node, subscribe}`;
//! - `pods` (enrollment of the node's pods), `telemetry` (metrics, access log, traces);
//! - the data path: `proxy` (tunnel, outbound, inbound), `policy::enforce`, the rest of `http`;
//! - wiring: `admin`, `mode`, `app`.
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
pub(crate) mod ready;
mod sys;
pub mod telemetry;
