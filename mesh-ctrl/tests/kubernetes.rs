//! Cluster-mode pieces against kube-rs's in-process mock API server (tower-test): node
//! authentication with TokenReview, and the CA root kept in a Secret.
#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test
use std::pin::pin;

use http::{Method, Request, Response};
use kube::{Api, Client, client::Body};
use mesh_api::auth::{AUTHORIZATION, NODE_HEADER};
use mesh_ctrl::{
    auth::{AuthError, TokenReviewAuth},
    ca_secret,
};
use serde_json::{Value, json};
use tonic::metadata::MetadataMap;
use tower_test::mock::{self, Handle};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

fn md(node: &str, token: &str) -> MetadataMap {
    let mut m = MetadataMap::new();
    m.insert(NODE_HEADER, node.parse().unwrap());
    m.insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    m
}

async fn body_json(req: Request<Body>) -> Value {
    use http_body_util::BodyExt;
    let bytes = req.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

fn respond(status: u16, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

/// Answers one TokenReview with `status`, checking what the controller asked.
async fn review_once(handle: &mut ApiHandle, status: Value) {
    let mut handle = pin!(handle);
    let (req, send) = handle.next_request().await.expect("no TokenReview sent");
    assert_eq!(req.method(), Method::POST);
    assert_eq!(
        req.uri().path(),
        "/apis/authentication.k8s.io/v1/tokenreviews"
    );
    let body = body_json(req).await;
    assert_eq!(body["spec"]["token"], "the-token");
    assert_eq!(body["spec"]["audiences"], json!(["mesh-ctrl"]));
    send.send_response(respond(
        201,
        json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": body["spec"], "status": status,
        }),
    ));
}

/// The controller's node authentication, as deployed, against the mock API server `service`.
fn node_auth(service: mock::Mock<Request<Body>, Response<Body>>) -> TokenReviewAuth {
    TokenReviewAuth::new(
        Client::new(service, "default"),
        "mesh-system",
        "mesh-node",
        "mesh-ctrl",
    )
}

fn user(name: &str, node: Option<&str>) -> Value {
    let mut u = json!({"username": name, "uid": "u1"});
    if let Some(n) = node {
        u["extra"] = json!({"authentication.kubernetes.io/node-name": [n]});
    }
    u
}

#[tokio::test]
async fn token_review_decides_which_node_is_calling() {
    const SA: &str = "system:serviceaccount:mesh-system:mesh-node";
    let cases: Vec<(Value, Result<&str, &str>)> = vec![
        (
            json!({"authenticated": true, "audiences": ["mesh-ctrl"], "user": user(SA, Some("node-a"))}),
            Ok("node-a"),
        ),
        // A valid token of node B's proxy, replayed by someone claiming to be node A.
        (
            json!({"authenticated": true, "audiences": ["mesh-ctrl"], "user": user(SA, Some("node-b"))}),
            Err("bound to a pod on node \"node-b\""),
        ),
        (
            json!({"authenticated": true, "audiences": ["mesh-ctrl"], "user": user("system:serviceaccount:default:app", Some("node-a"))}),
            Err("not the node proxy's service account"),
        ),
        (
            json!({"authenticated": true, "audiences": ["other"], "user": user(SA, Some("node-a"))}),
            Err("not issued for audience"),
        ),
        (
            json!({"authenticated": true, "audiences": ["mesh-ctrl"], "user": user(SA, None)}),
            Err("not bound to a pod"),
        ),
        (
            json!({"authenticated": false, "error": "token expired"}),
            Err("token expired"),
        ),
    ];
    for (status, expected) in cases {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let auth = node_auth(service);
        let server = tokio::spawn(async move { review_once(&mut handle, status).await });
        let got = auth.authenticate(&md("node-a", "the-token")).await;
        server.await.unwrap();
        match (got, expected) {
            (Ok(node), Ok(want)) => assert_eq!(node, want),
            (Err(AuthError::Refused { reason, .. }), Err(want)) => {
                assert!(reason.contains(want), "{reason}")
            }
            (got, want) => panic!("got {got:?}, expected {want:?}"),
        }
    }
}

/// A caller repeating a bad token costs one TokenReview, not one per attempt; the same token
/// claimed for another node is a different question and is asked.
#[tokio::test]
async fn a_refused_token_is_not_reviewed_again() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let auth = node_auth(service);
    let expired = json!({"authenticated": false, "error": "token expired"});
    let server = tokio::spawn(async move {
        review_once(&mut handle, expired.clone()).await;
        review_once(&mut handle, expired).await;
        // Nothing else may reach the API server.
        let mut handle = pin!(&mut handle);
        tokio::time::timeout(std::time::Duration::from_millis(300), handle.next_request())
            .await
            .is_err()
    });
    for _ in 0..50 {
        let got = auth.authenticate(&md("node-a", "the-token")).await;
        assert!(
            matches!(&got, Err(AuthError::Refused { reason, .. }) if reason.contains("token expired")),
            "{got:?}"
        );
    }
    let got = auth.authenticate(&md("node-b", "the-token")).await;
    assert!(matches!(got, Err(AuthError::Refused { .. })), "{got:?}");
    assert!(
        server.await.unwrap(),
        "a remembered refusal was reviewed again"
    );
}

#[tokio::test]
async fn an_unreachable_api_server_is_unavailable_not_a_refusal() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let auth = node_auth(service);
    let server = tokio::spawn(async move {
        let mut handle = pin!(&mut handle);
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(respond(503, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcd down", "reason": "ServiceUnavailable", "code": 503})));
    });
    let got = auth.authenticate(&md("node-a", "the-token")).await;
    server.await.unwrap();
    assert!(matches!(got, Err(AuthError::Unavailable(_))), "{got:?}");
}

fn not_found() -> Response<Body> {
    respond(
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

#[tokio::test]
async fn the_root_is_created_once_in_a_secret_and_reused() {
    const PATH: &str = "/api/v1/namespaces/mesh-system/secrets";
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let api: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(Client::new(service, "default"), "mesh-system");
    let server = tokio::spawn(async move {
        let mut handle = pin!(&mut handle);
        // First start: no Secret, so the controller creates one.
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(
            (req.method(), req.uri().path()),
            (&Method::GET, format!("{PATH}/mesh-ca").as_str())
        );
        send.send_response(not_found());
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!((req.method(), req.uri().path()), (&Method::POST, PATH));
        let created = body_json(req).await;
        assert_eq!(created["metadata"]["name"], "mesh-ca");
        assert!(
            created["data"]["root-key.pem"].is_string()
                && created["data"]["root-cert.pem"].is_string()
        );
        send.send_response(respond(201, created.clone()));
        // Second start: the same Secret is read back.
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.method(), Method::GET);
        send.send_response(respond(200, created));
    });
    let first = ca_secret::load_or_create(&api, "mesh-ca", "cluster.local", &[])
        .await
        .unwrap();
    let second = ca_secret::load_or_create(&api, "mesh-ca", "cluster.local", &[])
        .await
        .unwrap();
    server.await.unwrap();
    assert_eq!(
        first.roots_pem(),
        second.roots_pem(),
        "a restart must keep the root"
    );
}

#[tokio::test]
async fn when_two_replicas_race_the_loser_uses_the_winners_root() {
    let (winner_cert, winner_key) = mesh_ctrl::ca::Ca::generate_root("cluster.local").unwrap();
    let b64 = |s: &str| {
        let secret = k8s_openapi::ByteString(s.as_bytes().to_vec());
        serde_json::to_value(secret).unwrap()
    };
    let winner = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mesh-ca"},
        "data": {"root-cert.pem": b64(&winner_cert), "root-key.pem": b64(&winner_key)}});
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let api: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(Client::new(service, "default"), "mesh-system");
    let server = tokio::spawn(async move {
        let mut handle = pin!(&mut handle);
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(not_found());
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.method(), Method::POST);
        send.send_response(respond(409, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "exists"})));
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.method(), Method::GET);
        send.send_response(respond(200, winner));
    });
    let ca = ca_secret::load_or_create(&api, "mesh-ca", "cluster.local", &[])
        .await
        .unwrap();
    server.await.unwrap();
    assert_eq!(ca.roots_pem(), &[winner_cert]);
}

#[tokio::test]
async fn the_trust_bundle_is_published_for_node_proxies_by_server_side_apply() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(Client::new(service, "default"), "mesh-system");
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let server = tokio::spawn(async move {
        let mut handle = pin!(&mut handle);
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.method(), Method::PATCH);
        assert_eq!(
            req.uri().path(),
            "/api/v1/namespaces/mesh-system/configmaps/mesh-trust-bundle"
        );
        let query = req.uri().query().unwrap_or_default().to_string();
        assert!(
            query.contains("fieldManager=mesh-ctrl") && query.contains("force=true"),
            "{query}"
        );
        let sent = body_json(req).await;
        assert_eq!(sent["data"]["trust-bundle.pem"], pem);
        send.send_response(respond(200, sent));
    });
    ca_secret::publish_bundle(&api, "mesh-trust-bundle", pem)
        .await
        .unwrap();
    server.await.unwrap();
}
