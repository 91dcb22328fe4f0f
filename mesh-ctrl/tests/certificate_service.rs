//! The certificate service over real gRPC/TLS, in-process on port 0: who may obtain which identity.
#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test
use mesh_api::{
    auth::{AUTHORIZATION, NODE_HEADER},
    ca::v1::{
        GetTrustBundleRequest, SignWorkloadRequest,
        certificate_service_client::CertificateServiceClient,
    },
};
use mesh_ctrl::app;

mod support;
use tonic::{Code, transport::Channel};

const PLACEMENT: &str = r#"{
    "trust_domain": "cluster.local",
    "nodes": [{"name": "node-a", "addresses": ["10.0.0.1"]}, {"name": "node-b", "addresses": ["10.0.0.2"]}],
    "pods": [
        {"namespace": "shop", "name": "web-1", "node": "node-a", "service_account": "web", "ips": ["10.1.0.1"]},
        {"namespace": "shop", "name": "db-1", "node": "node-b", "service_account": "db", "ips": ["10.2.0.1"]}
    ]
}"#;

struct Ctrl {
    bound: app::Bound,
    client: CertificateServiceClient<Channel>,
    _dir: tempfile::TempDir,
}

async fn start(ttl: &str) -> Ctrl {
    let dir = tempfile::tempdir().unwrap();
    let bound = app::serve(support::serve_args(dir.path(), PLACEMENT, ttl))
        .await
        .unwrap();
    let channel = support::channel(&bound).await;
    Ctrl {
        bound,
        client: CertificateServiceClient::new(channel),
        _dir: dir,
    }
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

fn request(
    node: &str,
    token: &str,
    ns: &str,
    pod: &str,
    csr_pem: String,
    ttl: u32,
) -> tonic::Request<SignWorkloadRequest> {
    let mut r = tonic::Request::new(SignWorkloadRequest {
        namespace: ns.into(),
        pod: pod.into(),
        csr_pem,
        ttl_seconds: ttl,
    });
    r.metadata_mut().insert(NODE_HEADER, node.parse().unwrap());
    r.metadata_mut()
        .insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    r
}

fn uri_san(pem: &str) -> String {
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = der.parse_x509().unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    match &san.value.general_names[0] {
        x509_parser::extensions::GeneralName::URI(u) => u.to_string(),
        other => panic!("unexpected SAN {other:?}"),
    }
}

#[tokio::test]
async fn a_node_gets_identities_of_its_own_pods_only() {
    let mut c = start("24h").await;
    let ok = c
        .client
        .sign_workload(request(
            "node-a",
            "token-a-0123456789",
            "shop",
            "web-1",
            csr(),
            3600,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(uri_san(&ok.cert_chain_pem[0]), ok.spiffe_id);
    assert_eq!(
        ok.not_after_unix - ok.not_before_unix,
        3600 + 60,
        "requested TTL plus the skew backdate"
    );
    assert_eq!(ok.trust_bundle.unwrap().roots_pem.len(), 1);

    let cases = [
        // Node A asking for a pod of node B: the isolation this service exists for.
        (
            request("node-a", "token-a-0123456789", "shop", "db-1", csr(), 0),
            Code::PermissionDenied,
            "runs on node \"node-b\"",
        ),
        // Node A's name with node B's token, and an unknown node.
        (
            request("node-a", "token-b-0123456789", "shop", "web-1", csr(), 0),
            Code::Unauthenticated,
            "wrong token",
        ),
        (
            request("node-z", "token-a-0123456789", "shop", "web-1", csr(), 0),
            Code::Unauthenticated,
            "unknown node",
        ),
        (
            request("node-a", "token-a-0123456789", "shop", "ghost", csr(), 0),
            Code::NotFound,
            "not known",
        ),
        (
            request(
                "node-a",
                "token-a-0123456789",
                "shop",
                "web-1",
                "not a csr".into(),
                0,
            ),
            Code::InvalidArgument,
            "signing request",
        ),
    ];
    for (req, code, msg) in cases {
        let e = c.client.sign_workload(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(msg), "{e:?}");
    }
    let mut unauthenticated = tonic::Request::new(GetTrustBundleRequest {});
    unauthenticated
        .metadata_mut()
        .insert(NODE_HEADER, "node-a".parse().unwrap());
    assert_eq!(
        c.client
            .get_trust_bundle(unauthenticated)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        c.bound
            .stats
            .signed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        c.bound
            .stats
            .refused
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
    c.bound.shutdown().await;
}

#[tokio::test]
async fn requested_lifetimes_are_capped_by_the_controller() {
    let mut c = start("1h").await;
    let r = c
        .client
        .sign_workload(request(
            "node-b",
            "token-b-0123456789",
            "shop",
            "db-1",
            csr(),
            90_000,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.not_after_unix - r.not_before_unix, 3600 + 60);
    c.bound.shutdown().await;
}

#[tokio::test]
async fn status_lists_certificates_close_to_expiry() {
    let mut c = start("4s").await;
    c.client
        .sign_workload(request(
            "node-a",
            "token-a-0123456789",
            "shop",
            "web-1",
            csr(),
            0,
        ))
        .await
        .unwrap();
    let admin = c.bound.admin;
    let status = move || {
        tokio::task::spawn_blocking(move || {
            mesh_ctrl::cli::remote::call(admin, "GET", "/v1/status").unwrap()
        })
    };
    // Fresh: more than a quarter of its life left.
    let s = status().await.unwrap();
    assert_eq!(s["certificates_expiring"], serde_json::json!([]), "{s}");
    // A node renews at half-life; one still unrenewed with under a quarter left is listed.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(8);
    loop {
        let s = status().await.unwrap();
        if let Some(e) = s["certificates_expiring"]
            .as_array()
            .and_then(|a| a.first())
        {
            assert_eq!(e["node"], "node-a");
            assert_eq!(e["identity"], "spiffe://cluster.local/ns/shop/sa/web");
            assert!(
                mesh_ctrl::cli::remote::human_status(&s)
                    .contains("certificates close to expiry: 1")
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never listed: {s}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
