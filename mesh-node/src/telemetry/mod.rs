//! What the proxy tells operators: metrics, access logs, traces, its own logs, live connections.
pub(crate) mod access_log;
pub(crate) mod live;
pub mod logging;
pub(crate) mod metrics;
pub(crate) mod trace;
