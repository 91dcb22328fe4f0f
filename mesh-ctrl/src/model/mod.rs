//! The config model: what operators write (our CRDs and the Gateway API routes), how it is read
//! (`objects`), and what makes it valid (`validate`). The types themselves live in `mesh_api` (node
//! proxies parse the same specs); the Kubernetes derives are behind its `kube` feature.
pub use mesh_api::{crd, gateway};

pub mod explain;
pub mod objects;
pub mod snapshot;
pub mod store;
pub mod validate;

use kube::CustomResourceExt;

/// The CRDs of the mesh's own kinds as one multi-document YAML, as committed under
/// `manifests/crds/` (`cargo xtask crds` rewrites it; a test fails when it drifts).
pub fn crds_yaml() -> String {
    let crds = [
        crd::AuthorizationPolicy::crd(),
        crd::PeerAuthentication::crd(),
        crd::TrafficPolicy::crd(),
        crd::Telemetry::crd(),
    ];
    let mut out =
        String::from("# Generated from mesh-api/src/crd.rs by `cargo xtask crds`. Do not edit.\n");
    for c in crds {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&c).expect("CRDs serialize"));
    }
    out
}
