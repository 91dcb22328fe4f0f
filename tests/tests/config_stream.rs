//! Config distribution end to end: a real mesh-ctrl following a config directory, real node
//! proxies subscribed to it, enrollment in the kernel following the namespace label.
use std::time::Duration;

use mesh_tests::{ClusterBuilder, Pair, ctrl::namespace_yaml};
use serde_json::Value;

const PORT: u16 = 8080;

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Who the server saw as its peer for a one-connection client run.
async fn peer_seen(pair: &Pair) -> String {
    let report = pair
        .client
        .client(pair.server.addr(false, PORT), 1, 1024)
        .await
        .unwrap();
    assert_eq!(report["ok"], 1, "{report}");
    let hello = report["hellos"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    hello
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_start_matches("peer=")
        .to_string()
}

#[tokio::test]
async fn enrollment_follows_the_config_and_nodes_keep_it_through_outages() {
    let mut pair = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .config_stream()
        .start_pair(PORT)
        .await
        .unwrap();
    let node0 = &pair.cluster.nodes[0];
    let client = format!("{}/{}", pair.client.namespace, pair.client.name);
    let cfg = node0.mesh_config().await.unwrap();
    assert!(cfg["version"].as_u64().unwrap() > 0, "{cfg}");
    assert!(strings(&cfg["enrolled"]).contains(&client), "{cfg}");
    assert_eq!(strings(&cfg["workloads"]).len(), 2, "{cfg}");
    // In the mesh: the server sees node 1's proxy, not the client.
    let via_mesh = pair.cluster.nodes[1].ipv4.to_string();
    assert_eq!(peer_seen(&pair).await, via_mesh);

    // The CLI sees both nodes subscribed and current.
    let status = pair
        .cluster
        .ctrl
        .as_ref()
        .unwrap()
        .cli(&["status"])
        .await
        .unwrap();
    for n in &pair.cluster.nodes {
        assert_eq!(status["nodes"][&n.name]["connected"], true, "{status}");
        assert_eq!(
            status["nodes"][&n.name]["acked_version"], status["version"],
            "{status}"
        );
    }

    // The namespace leaves the mesh: both pods stop being redirected.
    let ns = pair.client.namespace.clone();
    pair.cluster
        .apply_config("namespaces.yaml", &namespace_yaml(&ns, false))
        .unwrap();
    let left = node0
        .wait_config(Duration::from_secs(10), "client leaves", |c| {
            !strings(&c["enrolled"]).contains(&client)
        })
        .await
        .unwrap();
    let pods = || async {
        let (_, v) = pair.cluster.nodes[0]
            .admin("GET", "/v1/pods", None)
            .await
            .unwrap();
        v.as_array().unwrap().len()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pods().await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still enrolled in the kernel"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("config change to node: {left:?}");
    assert_eq!(
        peer_seen(&pair).await,
        pair.client.ipv4.to_string(),
        "direct now"
    );

    // And joins again.
    pair.cluster
        .apply_config("namespaces.yaml", &namespace_yaml(&ns, true))
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pods().await != 1 {
        assert!(tokio::time::Instant::now() < deadline, "not enrolled again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(peer_seen(&pair).await, via_mesh);

    // A bad object is rejected by the controller, naming the field; nodes keep their version.
    let version = pair.cluster.nodes[0].mesh_config().await.unwrap()["version"].clone();
    pair.cluster
        .apply_config(
            "bad.yaml",
            &format!("apiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: t, namespace: {ns}}}\nspec: {{targetRef: {{name: ghost}}}}\n"),
        )
        .unwrap();
    let ctrl = pair.cluster.ctrl.as_ref().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let rejected = ctrl.log_records().into_iter().any(|r| {
            r["fields"]["field"] == "spec.targetRef.name"
                && r["fields"]["object"] == format!("TrafficPolicy {ns}/t").as_str()
        });
        if rejected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no rejection logged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cfg = pair.cluster.nodes[0].mesh_config().await.unwrap();
    assert_eq!(cfg["version"], version, "{cfg}");

    // Controller down: nodes keep serving their last configuration, and traffic flows.
    pair.cluster.ctrl.as_mut().unwrap().stop().await.unwrap();
    let node0 = &pair.cluster.nodes[0];
    node0
        .wait_config(Duration::from_secs(10), "stream lost", |c| {
            c["stream"]["connected"] == false
        })
        .await
        .unwrap();
    assert_eq!(node0.mesh_config().await.unwrap()["version"], version);
    assert_eq!(peer_seen(&pair).await, via_mesh);

    // Back: the node reconnects by itself.
    pair.cluster.ctrl.as_mut().unwrap().start().await.unwrap();
    pair.cluster.nodes[0]
        .wait_config(Duration::from_secs(15), "stream back", |c| {
            c["stream"]["connected"] == true && c["stream"]["reconnects"].as_u64() > Some(0)
        })
        .await
        .unwrap();
    assert_eq!(peer_seen(&pair).await, via_mesh);
}

/// One plaintext connection attempt from a pod outside the mesh; returns how many succeeded.
async fn plaintext_ok(from: &mesh_tests::Pod, to: std::net::SocketAddr) -> u64 {
    let args = [
        "--connect-timeout-ms",
        "1500",
        "client",
        "--to",
        &to.to_string(),
        "--conns",
        "1",
        "--bytes",
        "64",
    ];
    from.testpod(&args).await.unwrap()["ok"].as_u64().unwrap()
}

#[tokio::test]
async fn peer_authentication_from_the_config_reaches_the_kernel() {
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .config_stream()
        .start()
        .await
        .unwrap();
    let (client, outsider, server) = (
        cluster.pod(0, 0).clone(),
        cluster.pod(0, 1).clone(),
        cluster.pod(1, 0).clone(),
    );
    let _s = server.serve(PORT, false).await.unwrap();
    cluster.enroll(&client).await.unwrap();
    cluster.enroll(&server).await.unwrap();
    // The outsider opts out with its label: registering its sandbox does not enroll it.
    cluster
        .label_pods(
            &[&outsider],
            serde_json::json!({"nodemesh.io/mesh": "disabled"}),
        )
        .await
        .unwrap();
    let registered = cluster.enroll(&outsider).await.unwrap();
    assert_eq!(registered["enrolled"], false, "{registered}");
    let dst = server.addr(false, PORT);
    assert_eq!(
        plaintext_ok(&outsider, dst).await,
        1,
        "PERMISSIVE by default"
    );

    let strict = format!(
        "apiVersion: nodemesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: {}}}\nspec: {{mode: STRICT}}\n",
        server.namespace
    );
    cluster
        .change_config("peer-auth.yaml", Some(&strict))
        .await
        .unwrap();
    assert_eq!(
        plaintext_ok(&outsider, dst).await,
        0,
        "plaintext reached a STRICT pod"
    );
    let r = client.client(dst, 2, 64).await.unwrap();
    assert_eq!(r["ok"], 2, "mesh traffic still passes: {r}");

    cluster.change_config("peer-auth.yaml", None).await.unwrap();
    assert_eq!(plaintext_ok(&outsider, dst).await, 1, "PERMISSIVE again");
}

#[tokio::test]
async fn authorization_from_the_config_refuses_new_and_closes_live_connections() {
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .config_stream()
        .start()
        .await
        .unwrap();
    let server = cluster.pod(1, 0).clone();
    let (remote, other, neighbour) = (
        cluster.pod(0, 0).clone(),
        cluster.pod(0, 1).clone(),
        cluster.pod(1, 1).clone(),
    );
    let _s = server.serve(PORT, false).await.unwrap();
    for p in [&server, &remote, &other, &neighbour] {
        cluster.enroll(p).await.unwrap();
    }
    let dst = server.addr(false, PORT);
    // A live connection from `remote`, echoing 20 times a second for 6 s.
    let live = {
        let remote = remote.clone();
        tokio::spawn(async move {
            remote
                .testpod(&[
                    "rr",
                    "--to",
                    &dst.to_string(),
                    "--duration-ms",
                    "6000",
                    "--conns",
                    "1",
                    "--pace",
                    "20",
                ])
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;

    let deny = format!(
        "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-some, namespace: {ns}}}\nspec:\n  action: DENY\n  rules:\n  - from: [{{principals: ['spiffe://cluster.local/ns/{ns}/sa/{a}', 'spiffe://cluster.local/ns/{ns}/sa/{b}']}}]\n",
        ns = server.namespace,
        a = remote.service_account,
        b = neighbour.service_account,
    );
    cluster
        .change_config("authz.yaml", Some(&deny))
        .await
        .unwrap();

    // The live connection is closed by the new policy.
    let result = tokio::time::timeout(Duration::from_secs(10), live)
        .await
        .unwrap()
        .unwrap();
    assert!(
        result.is_err(),
        "the denied connection kept working: {result:?}"
    );
    // New connections: denied across nodes and on the same node; others still pass.
    for (who, want) in [(&remote, 0), (&neighbour, 0), (&other, 2)] {
        let r = who.client(dst, 2, 64).await.unwrap();
        assert_eq!(r["ok"], want, "{} -> server: {r}", who.name);
    }
    let c = cluster.nodes[1].counters().await.unwrap();
    assert!(
        c["authz"]["closed_by_policy"].as_u64() >= Some(1),
        "{}",
        c["authz"]
    );
    assert!(c["authz"]["denied"].as_u64() >= Some(4), "{}", c["authz"]);
    // The same figures for Prometheus.
    let (status, metrics) = cluster.nodes[1]
        .admin("GET", "/metrics", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let metrics = metrics.as_str().unwrap().to_string();
    let sample = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse::<f64>().ok())
    };
    assert_eq!(
        sample(r#"mesh_authz_decisions_total{decision="deny"}"#),
        c["authz"]["denied"].as_f64(),
        "{metrics}"
    );
    assert_eq!(sample("mesh_config_connected"), Some(1.0), "{metrics}");
    assert!(sample(r#"mesh_tunnel_streams_total{direction="inbound"}"#) >= Some(1.0));
    // And the refusal says why, in the node's log.
    let logged = cluster.nodes[1].log_records().into_iter().any(|r| {
        r["fields"]["reason"]
            .as_str()
            .is_some_and(|s| s.contains("deny-some rule 0"))
    });
    assert!(logged, "{}", cluster.nodes[1].log_tail(20));
}

#[tokio::test]
async fn a_service_cluster_ip_reaches_its_endpoints_through_the_mesh() {
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .config_stream()
        .start()
        .await
        .unwrap();
    let client = cluster.pod(0, 0).clone();
    // Three endpoints: two on the other node, one beside the client.
    let backends = [
        cluster.pod(1, 0).clone(),
        cluster.pod(1, 1).clone(),
        cluster.pod(0, 1).clone(),
    ];
    let mut servers = Vec::new();
    for b in &backends {
        servers.push(b.serve(PORT, false).await.unwrap());
    }
    for p in backends.iter().chain([&client]) {
        cluster.enroll(p).await.unwrap();
    }
    let labelled: Vec<&mesh_tests::Pod> = backends.iter().collect();
    cluster
        .label_pods(&labelled, serde_json::json!({"app": "web"}))
        .await
        .unwrap();
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {}}}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {{app: web}}\n  ports: [{{name: tcp-echo, port: 80, targetPort: {PORT}}}]\n",
        client.namespace
    );
    cluster
        .change_config("web.yaml", Some(&service))
        .await
        .unwrap();

    let vip: std::net::SocketAddr = "10.96.0.10:80".parse().unwrap();
    let r = client.client(vip, 12, 1024).await.unwrap();
    assert_eq!(r["ok"], 12, "{r}");
    // The app still sees the Service address as its peer.
    assert_eq!(r["peer_addrs"][0], "10.96.0.10:80", "{r}");
    // Spread over every endpoint; each server saw a proxy, never the client itself.
    let seen: std::collections::BTreeSet<String> = r["hellos"]
        .as_object()
        .unwrap()
        .keys()
        .map(|h| h.split("local=").nth(1).unwrap().to_string())
        .collect();
    let want: std::collections::BTreeSet<String> = backends
        .iter()
        .map(|b| b.addr(false, PORT).to_string())
        .collect();
    assert_eq!(seen, want, "{r}");
    assert!(
        r["hellos"]
            .as_object()
            .unwrap()
            .keys()
            .all(|h| !h.contains(&format!("peer={} ", client.ipv4))),
        "{r}"
    );
    let c = cluster.nodes[0].counters().await.unwrap();
    assert_eq!(c["proxy"]["to_service"], 12, "{}", c["proxy"]);

    // No ready endpoints: refused, not sent anywhere.
    cluster
        .label_pods(&labelled, serde_json::json!({}))
        .await
        .unwrap();
    let r = client.client(vip, 2, 64).await.unwrap();
    assert_eq!(r["ok"], 0, "{r}");
    let c = cluster.nodes[0].counters().await.unwrap();
    assert_eq!(c["proxy"]["refused_no_endpoints"], 2, "{}", c["proxy"]);
}

#[tokio::test]
async fn a_node_restarted_during_a_controller_outage_serves_its_saved_config_and_fails_closed() {
    let mut pair = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .config_stream()
        .start_pair(PORT)
        .await
        .unwrap();
    let via_mesh = pair.cluster.nodes[1].ipv4.to_string();
    assert_eq!(peer_seen(&pair).await, via_mesh);
    let version = pair.cluster.nodes[0].mesh_config().await.unwrap()["version"].clone();

    pair.cluster.ctrl.as_mut().unwrap().stop().await.unwrap();
    pair.cluster.stop_node(0).await.unwrap();
    // Ready again without the controller: the saved configuration is serving.
    pair.cluster.start_node(0).await.unwrap();
    let cfg = pair.cluster.nodes[0].mesh_config().await.unwrap();
    assert_eq!(cfg["version"], version, "{cfg}");
    assert_eq!(cfg["stream"]["connected"], false, "{cfg}");
    let (_, pods) = pair.cluster.nodes[0]
        .admin("GET", "/v1/pods", None)
        .await
        .unwrap();
    assert_eq!(
        pods.as_array().unwrap().len(),
        1,
        "the client stays enrolled: {pods}"
    );
    // The certificate the node held before the restart serves again.
    let r = pair
        .client
        .client(pair.server.addr(false, PORT), 1, 64)
        .await
        .unwrap();
    assert_eq!(r["ok"], 1, "{r}");
    assert_eq!(r["hellos"].as_object().unwrap().len(), 1, "{r}");
    assert!(
        r["hellos"]
            .as_object()
            .unwrap()
            .keys()
            .all(|h| h.contains(&format!("peer={via_mesh} "))),
        "{r}"
    );

    // Without it (a node that kept none, as after a reboot), no certificate can be had while the
    // controller is away: the connection fails, it never leaves the mesh as plaintext.
    pair.cluster.stop_node(0).await.unwrap();
    let kept = pair.cluster.nodes[0]
        .admin_socket()
        .with_file_name("certificates.json");
    std::fs::remove_file(&kept).unwrap();
    pair.cluster.start_node(0).await.unwrap();
    let r = pair
        .client
        .client(pair.server.addr(false, PORT), 1, 64)
        .await
        .unwrap();
    assert_eq!(r["ok"], 0, "{r}");

    pair.cluster.ctrl.as_mut().unwrap().start().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = pair
            .client
            .client(pair.server.addr(false, PORT), 1, 64)
            .await
            .unwrap();
        if r["ok"] == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "mesh traffic did not come back: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(peer_seen(&pair).await, via_mesh);
}

/// A pod the controller has not seen yet (just created, not ready, not in its config) but whose
/// sandbox is registered in a mesh namespace is redirected at once: its connections fail closed
/// until its identity arrives, then go through the mesh. They never bypass it.
#[tokio::test]
async fn a_pod_of_a_mesh_namespace_is_redirected_before_the_controller_knows_it() {
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .config_stream()
        .start()
        .await
        .unwrap();
    let newcomer = cluster.pod(0, 1).clone();
    let server = cluster.pod(1, 0).clone();
    let _s = server.serve(PORT, false).await.unwrap();
    cluster.enroll(&server).await.unwrap();
    // The controller does not know the newcomer yet.
    let name = newcomer.name.clone();
    cluster
        .update_placement(|pl| {
            pl["pods"]
                .as_array_mut()
                .unwrap()
                .retain(|p| p["name"] != name.as_str());
        })
        .await
        .unwrap();
    // Its sandbox is registered (the CNI hook's call) before the controller catches up.
    cluster.enroll(&newcomer).await.unwrap();
    let node0 = &cluster.nodes[0];
    let (_, pods) = node0.admin("GET", "/v1/pods", None).await.unwrap();
    assert!(
        pods.to_string().contains(&newcomer.name),
        "redirected already: {pods}"
    );
    let r = newcomer
        .testpod(&[
            "--connect-timeout-ms",
            "1000",
            "client",
            "--to",
            &server.addr(false, PORT).to_string(),
            "--conns",
            "3",
        ])
        .await
        .unwrap();
    assert_eq!(r["ok"], 0, "fails closed, does not bypass: {r}");
    let c = node0.counters().await.unwrap();
    assert!(
        mesh_tests::n(&c, &["proxy", "refused_route"]) >= 3,
        "refused by the proxy for want of an identity: {c}"
    );

    // The controller sees the pod: same sandbox, now with an identity, through the mesh.
    let placement = mesh_tests::ctrl::placement(&cluster);
    cluster
        .update_placement(|pl| *pl = placement)
        .await
        .unwrap();
    let r = newcomer
        .client(server.addr(false, PORT), 3, 1024)
        .await
        .unwrap();
    assert_eq!(r["ok"], 3, "{r}\n{}", node0.log_tail(20));
    assert!(
        r["hellos"]
            .to_string()
            .contains(&cluster.nodes[1].ipv4.to_string()),
        "through node 1's proxy: {r}"
    );
}
