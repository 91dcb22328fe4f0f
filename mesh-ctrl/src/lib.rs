//! mesh-ctrl: the mesh's controller. Today: the certificate authority and the certificate service
//! node proxies use to obtain workload identities.
pub mod admin;
pub mod app;
pub mod auth;
pub mod ca;
pub mod ca_secret;
pub mod certs;
pub mod cli;
pub mod distribute;
pub mod model;
pub mod sources;
pub mod token_review;
