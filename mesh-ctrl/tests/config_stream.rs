//! Config distribution over real gRPC/TLS, in-process: node-scoped snapshots, versions, deltas on
//! resume, acks and nacks, bad objects keeping their last good version, and who may subscribe.
#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test
use std::time::Duration;

use mesh_api::config::v1::{
    Ack, ConfigUpdate, Hello, Kind, Nack, NodeMessage,
    config_discovery_client::ConfigDiscoveryClient, node_message::Kind as Msg, resource::Body,
};
use mesh_ctrl::app;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

mod support;

const PLACEMENT: &str = r#"{
    "trust_domain": "cluster.local",
    "nodes": [{"name": "node-a", "addresses": ["10.0.0.1"]}, {"name": "node-b", "addresses": ["10.0.0.2"]}],
    "pods": [
        {"namespace": "shop", "name": "web-1", "node": "node-a", "service_account": "web", "ips": ["10.1.0.1"], "labels": {"app": "web"}},
        {"namespace": "shop", "name": "catalog-1", "node": "node-b", "service_account": "catalog", "ips": ["10.2.0.1"], "labels": {"app": "catalog"}},
        {"namespace": "shop", "name": "batch-1", "node": "node-b", "ips": ["10.2.0.2"], "labels": {"app": "batch", "nodemesh.io/mesh": "disabled"}},
        {"namespace": "other", "name": "tool-1", "node": "node-a", "ips": ["10.1.0.9"]}
    ]
}"#;

struct Ctrl {
    bound: app::Bound,
    dir: tempfile::TempDir,
}

impl Ctrl {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::create_dir(&config).unwrap();
        let examples = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../manifests/examples/shop.yaml"
        );
        std::fs::copy(examples, config.join("shop.yaml")).unwrap();
        let mut args = support::serve_args(dir.path(), PLACEMENT, "1h");
        args.config_dir = Some(config);
        let bound = app::serve(args).await.unwrap();
        Self { bound, dir }
    }

    fn write(&self, file: &str, yaml: &str) {
        let tmp = self.dir.path().join("tmp.yaml");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(tmp, self.dir.path().join("config").join(file)).unwrap();
    }
}

struct Sub {
    updates: Streaming<ConfigUpdate>,
    out: mpsc::Sender<NodeMessage>,
}

async fn subscribe(ctrl: &Ctrl, node: &str, token: &str, last: u64) -> Result<Sub, tonic::Status> {
    let (out, rx) = mpsc::channel(8);
    out.send(NodeMessage {
        kind: Some(Msg::Hello(Hello {
            node: node.into(),
            last_version: last,
        })),
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    support::authorize(&mut req, node, token);
    let mut client = ConfigDiscoveryClient::new(support::channel(&ctrl.bound).await);
    let updates = client.subscribe(req).await?.into_inner();
    Ok(Sub { updates, out })
}

impl Sub {
    async fn next(&mut self) -> ConfigUpdate {
        tokio::time::timeout(Duration::from_secs(5), self.updates.message())
            .await
            .expect("an update within 5 s")
            .expect("stream ok")
            .expect("stream open")
    }

    async fn ack(&self, version: u64) {
        let kind = Msg::Ack(Ack { version });
        self.out
            .send(NodeMessage { kind: Some(kind) })
            .await
            .unwrap();
    }
}

fn names(u: &ConfigUpdate, kind: Kind) -> Vec<String> {
    let mut v: Vec<String> = u
        .upserts
        .iter()
        .filter(|r| r.key.as_ref().unwrap().kind == kind as i32)
        .map(|r| r.key.as_ref().unwrap().name.clone())
        .collect();
    v.sort();
    v
}

fn workload<'a>(u: &'a ConfigUpdate, name: &str) -> &'a mesh_api::config::v1::Workload {
    u.upserts
        .iter()
        .find_map(|r| match &r.body {
            Some(Body::Workload(w)) if format!("{}/{}", w.namespace, w.name) == name => Some(w),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no workload {name}"))
}

#[tokio::test]
async fn nodes_get_node_scoped_versions_and_resume_with_deltas() {
    let ctrl = Ctrl::start().await;
    let mut a = subscribe(&ctrl, "node-a", "token-a-0123456789", 0)
        .await
        .unwrap();
    let full = a.next().await;
    assert_eq!(full.base_version, 0, "first update is whole");
    assert!(full.version > 0);
    assert_eq!(
        names(&full, Kind::Workload),
        [
            "other/tool-1",
            "shop/batch-1",
            "shop/catalog-1",
            "shop/web-1"
        ]
    );
    assert_eq!(
        names(&full, Kind::Service),
        ["shop/catalog", "shop/web", "shop/web-canary"]
    );
    assert_eq!(names(&full, Kind::HttpRoute), ["shop/web"]);
    // Inbound policy is node-scoped: node-a runs a pod of shop, so it gets shop's policies.
    assert_eq!(
        names(&full, Kind::AuthorizationPolicy),
        ["shop/catalog-readers"]
    );
    // Enrollment: namespace joined, pod not opted out; `other` has no Namespace object.
    assert!(workload(&full, "shop/web-1").enrolled);
    assert!(!workload(&full, "shop/batch-1").enrolled);
    assert!(!workload(&full, "other/tool-1").enrolled);
    assert_eq!(
        workload(&full, "shop/web-1").inbound_mode,
        2,
        "STRICT from PeerAuthentication"
    );
    assert_eq!(
        workload(&full, "shop/web-1").port_modes,
        [(8081, 1)].into(),
        "the probe port is PERMISSIVE (portLevelMtls)"
    );
    let svc = full
        .upserts
        .iter()
        .find_map(|r| match &r.body {
            Some(Body::Service(s)) if s.name == "catalog" => Some(s),
            _ => None,
        })
        .unwrap();
    assert_eq!(svc.endpoints, ["shop/catalog-1"]);
    assert_eq!(svc.ports[0].protocol, "grpc");
    a.ack(full.version).await;

    // A change: one delta, with the version it applies to.
    ctrl.write(
        "extra.yaml",
        "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-batch, namespace: shop}\nspec:\n  action: DENY\n  rules: [{from: [{principals: ['spiffe://cluster.local/ns/shop/sa/batch']}]}]\n",
    );
    let delta = a.next().await;
    assert_eq!(delta.base_version, full.version);
    assert_eq!(
        names(&delta, Kind::AuthorizationPolicy),
        ["shop/deny-batch"]
    );
    assert_eq!(delta.upserts.len(), 1, "only what changed: {delta:?}");
    a.ack(delta.version).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = ctrl.bound.nodes.lock().unwrap()["node-a"].clone();
    assert_eq!(status.acked_version, delta.version);
    assert!(status.connected);

    // Reconnect holding that version while the config changes: a delta from it, not everything.
    drop(a);
    ctrl.write("extra.yaml", "");
    while ctrl.bound.store.current().number == delta.version {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut a = subscribe(&ctrl, "node-a", "token-a-0123456789", delta.version)
        .await
        .unwrap();
    let resumed = a.next().await;
    assert_eq!(resumed.base_version, delta.version, "{resumed:?}");
    assert!(resumed.upserts.is_empty());
    let removed: Vec<&str> = resumed.removals.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(removed, ["shop/deny-batch"]);

    // Inbound policy is node-scoped: a policy of namespace `other` reaches node-a (tool-1 runs
    // there) and not node-b, which runs no pod of `other`.
    ctrl.write(
        "other.yaml",
        "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: lock, namespace: other}\nspec: {action: ALLOW}\n",
    );
    let to_a = a.next().await;
    assert_eq!(names(&to_a, Kind::AuthorizationPolicy), ["other/lock"]);
    // A node that holds an unknown version gets everything (of its own scope).
    let mut b = subscribe(&ctrl, "node-b", "token-b-0123456789", 999)
        .await
        .unwrap();
    let to_b = b.next().await;
    assert_eq!(to_b.base_version, 0);
    assert_eq!(to_b.version, to_a.version);
    assert_eq!(
        names(&to_b, Kind::AuthorizationPolicy),
        ["shop/catalog-readers"],
        "node-b got another namespace's inbound policy"
    );
}

#[tokio::test]
async fn bad_objects_keep_their_last_good_version_and_nacks_are_recorded() {
    let ctrl = Ctrl::start().await;
    let mut a = subscribe(&ctrl, "node-a", "token-a-0123456789", 0)
        .await
        .unwrap();
    let full = a.next().await;
    let history = ctrl.bound.store.history().len();

    // The route turns bad (unknown backend): the controller rejects it and keeps the old one.
    let shop = std::fs::read_to_string(ctrl.dir.path().join("config/shop.yaml")).unwrap();
    ctrl.write(
        "shop.yaml",
        &shop.replace(
            "{name: web-canary, port: 80, weight: 10}",
            "{name: ghost, port: 80, weight: 10}",
        ),
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let rejected = ctrl.bound.store.rejected();
    assert!(
        rejected
            .iter()
            .any(|i| i.object.to_string() == "HTTPRoute shop/web"
                && i.field == "spec.rules[1].backendRefs[1].name"
                && i.reason.contains("ghost")),
        "{rejected:?}"
    );
    assert_eq!(
        ctrl.bound.store.history().len(),
        history,
        "nothing new was accepted"
    );
    let route = ctrl.bound.store.current();
    let snap = route.computed.for_node("node-a");
    let spec = snap
        .values()
        .find_map(|r| match &r.body {
            Some(Body::Policy(p)) if p.name == "web" => Some(p.spec_json.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        spec.contains("web-canary") && !spec.contains("ghost"),
        "{spec}"
    );

    // A node that cannot apply a version says so; the controller shows it.
    let kind = Msg::Nack(Nack {
        version: full.version,
        reason: "Service shop/web: bad".into(),
    });
    a.out.send(NodeMessage { kind: Some(kind) }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = ctrl.bound.nodes.lock().unwrap()["node-a"].clone();
    assert_eq!(
        status.nacked,
        Some((full.version, "Service shop/web: bad".into()))
    );
}

#[tokio::test]
async fn a_node_subscribes_only_as_itself() {
    let ctrl = Ctrl::start().await;
    let err = subscribe(&ctrl, "node-a", "wrong-token-000000", 0)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::Unauthenticated);
    // node-b's credentials, node-a's name in Hello.
    let (out, rx) = mpsc::channel(1);
    out.send(NodeMessage {
        kind: Some(Msg::Hello(Hello {
            node: "node-a".into(),
            last_version: 0,
        })),
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    support::authorize(&mut req, "node-b", "token-b-0123456789");
    let mut client = ConfigDiscoveryClient::new(support::channel(&ctrl.bound).await);
    let err = client.subscribe(req).await.err().unwrap();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn status_history_explain_and_rollback_through_the_admin_endpoint() {
    use mesh_ctrl::cli::remote;
    let ctrl = Ctrl::start().await;
    let admin = ctrl.bound.admin;
    let call = move |method: &'static str, path: String| {
        tokio::task::spawn_blocking(move || remote::call(admin, method, &path))
    };
    let mut a = subscribe(&ctrl, "node-a", "token-a-0123456789", 0)
        .await
        .unwrap();
    let first = a.next().await;
    a.ack(first.version).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let status = call("GET", "/v1/status".into()).await.unwrap().unwrap();
    assert_eq!(status["version"], first.version);
    assert_eq!(status["nodes"]["node-a"]["acked_version"], first.version);
    assert_eq!(status["nodes"]["node-a"]["connected"], true);
    let human = remote::human_status(&status);
    assert!(human.contains("node-a\ttrue"), "{human}");

    // The same for Prometheus.
    let metrics = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(metrics.contains("mesh_ctrl_nodes_connected 1"), "{metrics}");
    assert!(
        metrics.contains(&format!(
            "mesh_ctrl_node_acked_version{{node=\"node-a\"}} {}",
            first.version
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("mesh_ctrl_node_push_latency_seconds{node=\"node-a\"}"),
        "{metrics}"
    );

    // Why can't batch reach the catalog?
    let path = format!(
        "/v1/explain?pod={}&dest={}",
        remote::encode("shop/batch-1"),
        remote::encode("catalog.shop:9090")
    );
    let e = call("GET", path).await.unwrap().unwrap();
    assert_eq!(e["source"]["redirected"], false, "{e}");
    assert!(
        e["verdict"]
            .as_str()
            .unwrap()
            .contains("dropped in the kernel"),
        "{e}"
    );
    let err = call(
        "GET",
        "/v1/explain?pod=shop%2Fghost&dest=1.2.3.4%3A80".into(),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(err.to_string().contains("no pod shop/ghost"), "{err}");

    // Change, then roll back to the first version: the node converges to it.
    ctrl.write(
        "extra.yaml",
        "apiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web, namespace: shop}\nspec: {targetRef: {name: web}, timeouts: {request: 1s}}\n",
    );
    let changed = a.next().await;
    assert_eq!(names(&changed, Kind::TrafficPolicy), ["shop/web"]);
    let history = call("GET", "/v1/history".into()).await.unwrap().unwrap();
    assert_eq!(history[0]["version"], changed.version, "{history}");
    assert_eq!(history[0]["changes"][0], "+ TrafficPolicy shop/web");
    let back = call("POST", format!("/v1/rollback/{}", first.version))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back["rolled_back_to"], first.version);
    let reverted = a.next().await;
    let removed: Vec<&str> = reverted.removals.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(removed, ["shop/web"], "{reverted:?}");
    assert!(
        reverted.version > changed.version,
        "a rollback is a new version"
    );
    let err = call("POST", "/v1/rollback/999".into())
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("not in the history"), "{err}");
}
