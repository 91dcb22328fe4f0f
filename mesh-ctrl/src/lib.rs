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

/// Times in status output: seconds since the Unix epoch.
pub(crate) fn unix_seconds<S: serde::Serializer>(
    t: &std::time::SystemTime,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_u64(
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}
