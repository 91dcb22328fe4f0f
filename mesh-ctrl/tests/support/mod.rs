//! What the in-process controller tests share: flags for a local-mode controller on port 0, and a
//! TLS channel that trusts it.
#![allow(dead_code)] // each test binary uses a part

use std::path::Path;

use mesh_ctrl::app::{self, ServeArgs};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

pub const TOKENS: &str = r#"{"node-a": "token-a-0123456789", "node-b": "token-b-0123456789"}"#;

/// Local-mode flags: files written under `dir`.
pub fn serve_args(dir: &Path, placement: &str, ttl: &str) -> ServeArgs {
    let p = |name: &str, body: &str| {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        path
    };
    ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: dir.join("state"),
        trust_domain: "cluster.local".into(),
        placement: Some(p("placement.json", placement)),
        kubernetes: false,
        node_proxy_namespace: "mesh-system".into(),
        node_proxy_selector: "app.kubernetes.io/name=mesh-node".into(),
        config_dir: None,
        admin: "127.0.0.1:0".parse().unwrap(),
        node_tokens: Some(p("tokens.json", TOKENS)),
        node_auth: app::NodeAuthMode::Tokens,
        node_service_account: "mesh-system/mesh-node".into(),
        token_audience: "mesh-ctrl".into(),
        ca_secret: None,
        trust_bundle_configmap: None,
        metrics_addr: None,
        cert_ttl: humantime::parse_duration(ttl).unwrap(),
        ca_cert: None,
        ca_key: None,
        ca_chain: None,
        extra_roots: None,
        server_names: vec!["mesh-ctrl".into()],
    }
}

/// A channel to the controller, trusting its published bundle.
pub async fn channel(bound: &app::Bound) -> Channel {
    let bundle = std::fs::read_to_string(&bound.trust_bundle).unwrap();
    Channel::from_shared(format!("https://{}", bound.addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(bundle))
                .domain_name("mesh-ctrl"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Node credentials on a request.
pub fn authorize<T>(r: &mut tonic::Request<T>, node: &str, token: &str) {
    let md = r.metadata_mut();
    md.insert(mesh_api::auth::NODE_HEADER, node.parse().unwrap());
    md.insert(
        mesh_api::auth::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
}
