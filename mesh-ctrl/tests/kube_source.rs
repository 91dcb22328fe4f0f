//! Cluster mode's source against kube-rs's in-process mock API server (tower-test), driven by a
//! small fake that answers lists and watches from an in-memory cluster: the first list, watch
//! events, a watch that expires (relist), and a failing list (backoff, then recovery).
#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    pin::pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response};
use kube::{Client, client::Body};
use mesh_api::placement::{Placement, PlacementWatch};
use mesh_ctrl::{
    model::store::Store,
    sources::kube::{NodeProxies, run},
};
use serde_json::{Value, json};
use tower_test::mock;

const NAMESPACES: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/pods";
const SERVICES: &str = "/api/v1/services";
const HTTP_ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";
const AUTHZ: &str = "/apis/nodemesh.io/v1alpha1/authorizationpolicies";
const PROXIES: &str = "/api/v1/namespaces/mesh-system/pods";

type Responder = tower_test::mock::SendResponse<Response<Body>>;

#[derive(Default)]
struct State {
    rv: u64,
    objects: HashMap<String, BTreeMap<String, Value>>,
    events: HashMap<String, Vec<Value>>,
    waiting: HashMap<String, Vec<Responder>>,
    expire_next_watch: HashSet<String>,
    fail_next_list: HashSet<String>,
    requests: Vec<String>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<State>>);

fn respond(status: u16, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::from(body))
        .unwrap()
}

fn watch_body(events: &[Value]) -> Vec<u8> {
    events
        .iter()
        .flat_map(|e| format!("{e}\n").into_bytes())
        .collect()
}

impl Fake {
    /// Creates or updates an object (and tells watchers).
    fn apply(&self, path: &str, mut obj: Value) {
        let mut s = self.0.lock().unwrap();
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let key = format!(
            "{}/{}",
            obj["metadata"]["namespace"].as_str().unwrap_or(""),
            obj["metadata"]["name"].as_str().unwrap()
        );
        let kind = if s
            .objects
            .entry(path.into())
            .or_default()
            .insert(key, obj.clone())
            .is_some()
        {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.events
            .entry(path.into())
            .or_default()
            .push(json!({"type": kind, "object": obj}));
        Self::flush(&mut s, path);
    }

    /// Removes an object without telling watchers (as if the event was lost: only a relist sees it).
    fn remove_silently(&self, path: &str, key: &str) {
        self.0
            .lock()
            .unwrap()
            .objects
            .entry(path.into())
            .or_default()
            .remove(key);
    }

    fn expire_watch(&self, path: &str) {
        let mut s = self.0.lock().unwrap();
        s.expire_next_watch.insert(path.into());
        let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}});
        s.events.entry(path.into()).or_default().push(status);
        Self::flush(&mut s, path);
    }

    fn flush(s: &mut State, path: &str) {
        let events = s.events.remove(path).unwrap_or_default();
        if events.is_empty() {
            return;
        }
        match s.waiting.get_mut(path).and_then(|w| w.pop()) {
            Some(responder) => responder.send_response(respond(200, watch_body(&events))),
            None => {
                s.events.insert(path.into(), events);
            }
        }
    }

    /// `PATCH .../namespaces/NS/KIND/NAME/status` with a merge patch of `status`.
    async fn patch_status(&self, path: &str, req: Request<Body>, send: Responder) {
        use http_body_util::BodyExt;
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        // apis / group / version / namespaces / NS / KIND / NAME / status
        let [_, group, version, _, ns, kind, name, "status"] = parts[..] else {
            panic!("unexpected patch {path}");
        };
        let collection = format!("/apis/{group}/{version}/{kind}");
        let body: Value =
            serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes()).unwrap();
        let mut obj = self.0.lock().unwrap().objects[&collection][&format!("{ns}/{name}")].clone();
        obj["status"] = body["status"].clone();
        self.0
            .lock()
            .unwrap()
            .requests
            .push(format!("PATCH {path} {body}"));
        self.apply(&collection, obj.clone());
        send.send_response(respond(200, serde_json::to_vec(&obj).unwrap()));
    }

    /// Server-side apply (PATCH) or DELETE of `.../namespaces/NS/KIND/NAME`.
    async fn write(&self, path: &str, req: Request<Body>, send: Responder) {
        use http_body_util::BodyExt;
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let [_, group, version, _, ns, kind, name] = parts[..] else {
            panic!("unexpected write {path}");
        };
        let collection = format!("/apis/{group}/{version}/{kind}");
        let method = req.method().clone();
        self.0
            .lock()
            .unwrap()
            .requests
            .push(format!("{method} {path}"));
        if method == http::Method::DELETE {
            let key = format!("{ns}/{name}");
            let mut s = self.0.lock().unwrap();
            let obj = s
                .objects
                .entry(collection.clone())
                .or_default()
                .remove(&key)
                .unwrap();
            s.rv += 1;
            s.events
                .entry(collection.clone())
                .or_default()
                .push(json!({"type": "DELETED", "object": obj}));
            Self::flush(&mut s, &collection);
            send.send_response(respond(
                200,
                br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Success"}"#.to_vec(),
            ));
            return;
        }
        let body: Value =
            serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes()).unwrap();
        self.apply(&collection, body.clone());
        send.send_response(respond(200, serde_json::to_vec(&body).unwrap()));
    }

    fn patches(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.starts_with("PATCH"))
            .cloned()
            .collect()
    }

    fn count(&self, prefix: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.starts_with(prefix))
            .count()
    }

    /// Answers requests until the client goes away.
    async fn serve(self, handle: mock::Handle<Request<Body>, Response<Body>>) {
        let mut handle = pin!(handle);
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or("").to_string();
            if req.method() == http::Method::PATCH && path.ends_with("/status") {
                self.patch_status(&path, req, send).await;
                continue;
            }
            if req.method() == http::Method::PATCH || req.method() == http::Method::DELETE {
                self.write(&path, req, send).await;
                continue;
            }
            let watch = query.contains("watch=true");
            let mut s = self.0.lock().unwrap();
            s.requests.push(format!(
                "{} {path}?{query}",
                if watch { "WATCH" } else { "LIST" }
            ));
            if watch {
                s.waiting.entry(path.clone()).or_default().push(send);
                Self::flush(&mut s, &path);
                continue;
            }
            if s.fail_next_list.remove(&path) {
                send.send_response(respond(500, br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"etcd is sad","code":500}"#.to_vec()));
                continue;
            }
            // A list starts afresh: events before it are in it.
            s.events.remove(&path);
            let items: Vec<Value> = s
                .objects
                .get(&path)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            let list = json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": s.rv.to_string()}, "items": items});
            send.send_response(respond(200, serde_json::to_vec(&list).unwrap()));
        }
    }
}

fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": node, "serviceAccountName": name.split('-').next().unwrap(), "containers": []},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

fn cluster() -> Fake {
    let fake = Fake::default();
    fake.apply(NAMESPACES, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"nodemesh.io/mesh": "enabled"}}}));
    for (node, ip) in [("node-a", "10.0.0.1"), ("node-b", "10.0.0.2")] {
        fake.apply(
            PROXIES,
            pod(
                "mesh-system",
                &format!("mesh-node-{node}"),
                node,
                ip,
                json!({"app.kubernetes.io/name": "mesh-node"}),
            ),
        );
    }
    fake.apply(
        PODS,
        pod("shop", "web-1", "node-a", "10.1.0.1", json!({"app": "web"})),
    );
    fake.apply(SERVICES, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"}, "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}));
    fake.apply(HTTP_ROUTES, json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "web", "namespace": "shop"}, "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}], "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}));
    fake
}

/// The cluster-mode source following `fake`: its client (for writes of the test's own), the
/// store it fills, and the certificate service's view of placement.
fn follow(fake: &Fake) -> (Client, Arc<Store>, PlacementWatch) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(fake.clone().serve(handle));
    let client = Client::new(service, "default");
    let store = Arc::new(Store::new());
    let feed = PlacementWatch::fixed(Placement::default());
    let proxies = NodeProxies {
        namespace: "mesh-system".into(),
        selector: "app.kubernetes.io/name=mesh-node".into(),
    };
    tokio::spawn(run(
        client.clone(),
        proxies,
        "cluster.local".into(),
        store.clone(),
        feed.clone(),
    ));
    (client, store, feed)
}

async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn pods(store: &Store) -> Vec<String> {
    let (_, placement) = store.inputs();
    placement
        .workloads()
        .map(|w| format!("{}/{}@{}", w.namespace, w.name, w.node))
        .collect()
}

#[tokio::test]
async fn follows_lists_watch_events_relists_and_failures() {
    let fake = cluster();
    // The first services list fails: the reflector backs off and lists again.
    fake.0
        .lock()
        .unwrap()
        .fail_next_list
        .insert(SERVICES.into());
    let (_, store, feed) = follow(&fake);

    // Nothing is published until every kind is listed; then everything at once.
    until("first version", || store.current().number > 0).await;
    assert_eq!(pods(&store), ["shop/web-1@node-a"]);
    let (objects, _) = store.inputs();
    assert!(
        objects
            .http_routes
            .contains_key(&("shop".into(), "web".into()))
    );
    assert!(
        objects
            .services
            .contains_key(&("shop".into(), "web".into()))
    );
    assert!(
        fake.count(&format!("LIST {SERVICES}")) >= 2,
        "the failed list was retried"
    );
    assert_eq!(
        feed.current().workloads().count(),
        1,
        "the certificate service sees the pods too"
    );
    let computed = store.current();
    let snap = computed.computed.for_node("node-a");
    assert!(
        snap.keys().any(|(_, n)| n == "shop/web"),
        "route and service distributed"
    );

    // A Service without a selector, backed by hand-made EndpointSlices: a mesh pod and an address.
    fake.apply(SERVICES, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "legacy", "namespace": "shop"}, "spec": {"ports": [{"port": 80}]}}));
    fake.apply("/apis/discovery.k8s.io/v1/endpointslices", json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "legacy-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "legacy"}},
        "endpoints": [
            {"addresses": ["10.1.0.1"], "conditions": {"ready": true}},
            {"addresses": ["192.168.9.9"]},
            {"addresses": ["192.168.9.10"], "conditions": {"ready": false}},
        ],
    }));
    until("slice endpoints", || {
        store.current().computed.shared.values().any(|r| matches!(&r.body,
            Some(mesh_api::config::v1::resource::Body::Service(s))
                if s.name == "legacy" && s.endpoints == ["shop/web-1"] && s.addresses == ["192.168.9.9"]))
    })
    .await;

    // A watch event: a new pod, and a new policy.
    fake.apply(
        PODS,
        pod("shop", "web-2", "node-b", "10.1.0.2", json!({"app": "web"})),
    );
    fake.apply(AUTHZ, json!({"apiVersion": "nodemesh.io/v1alpha1", "kind": "AuthorizationPolicy", "metadata": {"name": "deny-all", "namespace": "shop"}, "spec": {"action": "ALLOW"}}));
    until("watch events", || {
        pods(&store).contains(&"shop/web-2@node-b".to_string())
            && store.inputs().0.authorization_policies.len() == 1
    })
    .await;

    // A pod vanishes while the watch is down and the watch expires: the relist catches it.
    let lists = fake.count(&format!("LIST {PODS}"));
    fake.remove_silently(PODS, "shop/web-2");
    fake.expire_watch(PODS);
    until("relist", || fake.count(&format!("LIST {PODS}")) > lists).await;
    until("web-2 gone", || {
        !pods(&store).contains(&"shop/web-2@node-b".to_string())
    })
    .await;

    // A bad object from the cluster is rejected, and the last good version keeps serving.
    let mut route = fake.0.lock().unwrap().objects[HTTP_ROUTES]["shop/web"].clone();
    route["spec"]["rules"][0]["backendRefs"][0]["name"] = json!("ghost");
    fake.apply(HTTP_ROUTES, route);
    until("rejection", || !store.rejected().is_empty()).await;
    let rejected = store.rejected();
    assert_eq!(
        rejected[0].field, "spec.rules[0].backendRefs[0].name",
        "{rejected:?}"
    );
    let (objects, _) = store.inputs();
    let kept = &objects.http_routes[&("shop".into(), "web".into())];
    assert_eq!(kept.spec.rules[0].backend_refs[0].name, "web");
    // The route says so in its status, in the mesh's own entry.
    let parent =
        || fake.0.lock().unwrap().objects[HTTP_ROUTES]["shop/web"]["status"]["parents"][0].clone();
    until("route status", || {
        parent()["conditions"][0]["status"] == "False"
    })
    .await;
    let p = parent();
    assert_eq!(p["controllerName"], "nodemesh.io/mesh-ctrl");
    assert_eq!(p["parentRef"]["name"], "web");
    let message = p["conditions"][0]["message"].as_str().unwrap().to_string();
    assert!(
        message.starts_with("spec.rules[0].backendRefs[0].name: unknown backend"),
        "{message}"
    );
}

#[tokio::test]
async fn rejected_objects_get_a_status_condition_naming_the_field() {
    const TRAFFIC: &str = "/apis/nodemesh.io/v1alpha1/trafficpolicies";
    let fake = cluster();
    let (_, store, _) = follow(&fake);
    until("first version", || store.current().number > 0).await;

    let mut policy = json!({"apiVersion": "nodemesh.io/v1alpha1", "kind": "TrafficPolicy", "metadata": {"name": "t", "namespace": "shop", "generation": 1}, "spec": {"targetRef": {"kind": "Service", "name": "ghost"}}});
    fake.apply(TRAFFIC, policy.clone());
    let status =
        || fake.0.lock().unwrap().objects[TRAFFIC]["shop/t"]["status"]["conditions"][0].clone();
    until("a status patch", || status()["type"] == "Accepted").await;
    let c = status();
    assert_eq!(c["type"], "Accepted");
    assert_eq!(c["status"], "False");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.targetRef.name: no Service shop/ghost"),
        "{c}"
    );
    assert_eq!(c["observedGeneration"], 1);

    // Fixed: accepted. And the condition settles: no patch loop.
    policy["spec"]["targetRef"]["name"] = json!("web");
    policy["metadata"]["generation"] = json!(2);
    fake.apply(TRAFFIC, policy);
    until("accepted", || status()["status"] == "True").await;
    let n = fake.patches().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.patches().len(), n, "{:#?}", fake.patches());
}

#[tokio::test]
async fn rollback_reapplies_the_earlier_policy_set_in_the_cluster() {
    const TRAFFIC: &str = "/apis/nodemesh.io/v1alpha1/trafficpolicies";
    let fake = cluster();
    let allow_web = json!({"apiVersion": "nodemesh.io/v1alpha1", "kind": "AuthorizationPolicy", "metadata": {"name": "web", "namespace": "shop"}, "spec": {"action": "ALLOW", "rules": [{"from": [{"namespaces": ["shop"]}]}]}});
    fake.apply(AUTHZ, allow_web.clone());
    let (client, store, _) = follow(&fake);
    until("first version", || {
        store.inputs().0.authorization_policies.len() == 1
    })
    .await;
    let good = store.current().number;

    // Someone widens the policy and adds a traffic policy.
    let mut wide = allow_web.clone();
    wide["spec"]["rules"][0]["from"][0]["namespaces"] = json!(["shop", "other"]);
    fake.apply(AUTHZ, wide);
    fake.apply(TRAFFIC, json!({"apiVersion": "nodemesh.io/v1alpha1", "kind": "TrafficPolicy", "metadata": {"name": "t", "namespace": "shop"}, "spec": {"targetRef": {"kind": "Service", "name": "web"}}}));
    until("the change", || {
        store.inputs().0.traffic_policies.len() == 1
    })
    .await;

    let target = store.objects_at(good).expect("in the history");
    let (now, _) = store.inputs();
    let done = mesh_ctrl::sources::kube::rollback(&client, &now, &target)
        .await
        .unwrap();
    assert!(
        done.contains(&"applied AuthorizationPolicy shop/web".to_string()),
        "{done:?}"
    );
    assert!(
        done.contains(&"deleted TrafficPolicy shop/t".to_string()),
        "{done:?}"
    );
    until(
        "the cluster and the controller back at the earlier set",
        || {
            let (o, _) = store.inputs();
            o.traffic_policies.is_empty()
                && o.authorization_policies[&("shop".into(), "web".into())]
                    .spec
                    .rules[0]
                    .from[0]
                    .namespaces
                    == ["shop"]
        },
    )
    .await;
}
