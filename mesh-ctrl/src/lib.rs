//! mesh-ctrl: the mesh's controller. The certificate authority and certificate service (workload
//! identities), the config model (`model`) read from Kubernetes or a local directory (`sources`),
//! versioned and streamed to node proxies (`distribute`), and the admin endpoint and CLI.
pub mod admin;
pub mod app;
pub mod auth;
pub mod ca;
pub mod ca_secret;
pub mod certs;
pub mod cli;
pub mod distribute;
pub mod metrics;
pub mod model;
pub mod sources;
pub mod token_review;
