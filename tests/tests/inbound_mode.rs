//! Inbound STRICT vs PERMISSIVE: plaintext from outside the mesh to an enrolled pod is dropped in
//! the kernel (STRICT) or accepted and counted as plaintext (PERMISSIVE); mesh traffic, which
//! reaches pods only from their node proxy, always passes.
//!
//! The inbound program comes in two forms (the helper where cgroup_skb may call
//! `bpf_get_netns_cookie`, the socket's cookie through BTF elsewhere): the same test runs each
//! that this kernel can load, and `cargo xtask test-kernels` runs it on 6.1 and 6.12, where only
//! the BTF form loads.
use mesh_tests::{ClusterBuilder, connect_in_from, n};
use serde_json::{Value, json};

const PORT: u16 = 8080;

fn inbound_of<'a>(counters: &'a Value, pod: &str) -> &'a Value {
    counters["inbound"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["pod"] == pod)
        .unwrap_or(&Value::Null)
}

#[tokio::test]
async fn strict_drops_plaintext_from_outside_the_mesh_and_permissive_counts_it() {
    strict_and_permissive(&[], None).await;
}

#[tokio::test]
async fn the_btf_inbound_program_judges_the_same_as_the_helper() {
    strict_and_permissive(&["--inbound-program", "btf"], Some("btf")).await;
}

async fn strict_and_permissive(node_args: &[&str], method: Option<&str>) {
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .node_args(node_args)
        .with_controller()
        .start()
        .await
        .unwrap();
    if let Some(method) = method {
        let c = cluster.nodes[1].counters().await.unwrap();
        assert_eq!(c["kernel"]["ingress"], method, "{}", c["kernel"]);
    }
    let (mesh_client, outsider) = (cluster.pod(0, 0).clone(), cluster.pod(0, 1).clone());
    let (strict, permissive) = (cluster.pod(1, 0).clone(), cluster.pod(1, 1).clone());
    let _a = strict.serve(PORT, false).await.unwrap();
    let _b = permissive.serve(PORT, false).await.unwrap();
    for p in [&mesh_client, &strict, &permissive] {
        cluster.enroll(p).await.unwrap();
    }
    let strict_name = strict.name.clone();
    cluster
        .update_placement(|p| {
            p["peer_authentication"] =
                json!([{"namespace": "default", "pod": strict_name, "mode": "STRICT"}]);
        })
        .await
        .unwrap();
    let outside_with = |dst: std::net::SocketAddr, ext: Option<&'static str>| {
        let outsider = outsider.clone();
        async move {
            let dst = dst.to_string();
            let mut args = vec!["--connect-timeout-ms", "1500"];
            if let Some(ext) = ext {
                args.extend(["--ipv6-ext", ext]);
            }
            args.extend(["client", "--to", &dst, "--conns", "2", "--bytes", "64"]);
            outsider.testpod(&args).await.unwrap()
        }
    };
    let outside = |dst| outside_with(dst, None);

    for v6 in [false, true] {
        // Mesh traffic reaches both.
        for server in [&strict, &permissive] {
            let r = mesh_client
                .client(server.addr(v6, PORT), 2, 64)
                .await
                .unwrap();
            assert_eq!(n(&r, &["ok"]), 2, "mesh client -> {}: {r}", server.name);
        }
        // Plaintext from a pod outside the mesh: dropped by STRICT, accepted by PERMISSIVE.
        let r = outside(strict.addr(v6, PORT)).await;
        assert_eq!(n(&r, &["ok"]), 0, "plaintext reached a STRICT pod: {r}");
        let r = outside(permissive.addr(v6, PORT)).await;
        assert_eq!(n(&r, &["ok"]), 2, "PERMISSIVE pod refused plaintext: {r}");
    }
    // A process of the node's own network namespace that binds the proxy's address is not the
    // proxy: only connections the proxy recorded as it opened them count as mesh traffic.
    let node1 = &cluster.nodes[1];
    let mut impostor_ok = 0;
    for v6 in [false, true] {
        let from = if v6 {
            node1.ipv6.into()
        } else {
            node1.ipv4.into()
        };
        let r = connect_in_from(&node1.netns, from, strict.addr(v6, PORT)).await;
        assert!(
            r.is_err(),
            "a host process bound to the proxy's address reached a STRICT pod in plaintext"
        );
        if connect_in_from(&node1.netns, from, permissive.addr(v6, PORT))
            .await
            .is_ok()
        {
            impostor_ok += 1;
        }
    }
    assert_eq!(impostor_ok, 2, "PERMISSIVE takes plaintext from the node");
    // A SYN behind IPv6 extension headers is judged like any other.
    for ext in ["dstopts", "hopopts"] {
        let r = outside_with(strict.addr(true, PORT), Some(ext)).await;
        assert_eq!(
            n(&r, &["ok"]),
            0,
            "plaintext behind {ext} reached a STRICT pod: {r}"
        );
        let r = outside_with(permissive.addr(true, PORT), Some(ext)).await;
        assert_eq!(n(&r, &["ok"]), 2, "{ext}: {r}");
    }
    let c1 = cluster.nodes[1].counters().await.unwrap();
    // Two plaintext connections per family, two per extension header and the two from the node
    // reached the PERMISSIVE pod and are labelled so.
    assert_eq!(
        n(
            inbound_of(&c1, &format!("default/{}", permissive.name)),
            &["plaintext"]
        ),
        10,
        "{c1}"
    );
    assert!(
        n(
            inbound_of(&c1, &format!("default/{}", strict.name)),
            &["denied"]
        ) >= 8,
        "{c1}"
    );
    assert!(n(&c1, &["ebpf", "ingress", "from_proxy"]) >= 8, "{c1}");
    // Counted as what they are: from the proxy's address, not opened by the proxy.
    assert!(n(&c1, &["ebpf", "ingress", "undelivered"]) >= 4, "{c1}");

    // Switching the namespace to STRICT takes effect without re-enrolling anyone.
    cluster
        .update_placement(|p| {
            p["peer_authentication"] = json!([{"namespace": "default", "mode": "STRICT"}])
        })
        .await
        .unwrap();
    let r = outside(permissive.addr(false, PORT)).await;
    assert_eq!(n(&r, &["ok"]), 0, "namespace-wide STRICT not applied: {r}");
    let r = mesh_client
        .client(permissive.addr(false, PORT), 1, 64)
        .await
        .unwrap();
    assert_eq!(n(&r, &["ok"]), 1, "{r}");
}

/// Kubelet probes come from the node's network namespace in plaintext. Under STRICT they pass
/// only on ports declared PERMISSIVE (a PeerAuthentication's `portLevelMtls`), never because of
/// the address they come from; every other port of the pod stays STRICT.
#[tokio::test]
async fn probes_reach_a_strict_pod_only_on_its_permissive_ports() {
    const PROBE: u16 = 8081;
    let cluster = ClusterBuilder::new()
        .nodes(1)
        .pods_per_node(2)
        .with_controller()
        .start()
        .await
        .unwrap();
    let (client, server) = (cluster.pod(0, 0).clone(), cluster.pod(0, 1).clone());
    let _app = server.serve(PORT, false).await.unwrap();
    let _probe = server.serve(PROBE, false).await.unwrap();
    for p in [&client, &server] {
        cluster.enroll(p).await.unwrap();
    }
    let name = server.name.clone();
    cluster
        .update_placement(|p| {
            p["peer_authentication"] = json!([{"namespace": "default", "pod": name,
                "mode": "STRICT", "ports": {PROBE.to_string(): "PERMISSIVE"}}]);
        })
        .await
        .unwrap();
    let node = &cluster.nodes[0];
    let from_node = |port: u16, v6: bool| {
        let (netns, dst) = (node.netns.clone(), server.addr(v6, port));
        let from = if v6 {
            node.ipv6.into()
        } else {
            node.ipv4.into()
        };
        async move { connect_in_from(&netns, from, dst).await.is_ok() }
    };
    for v6 in [false, true] {
        assert!(
            from_node(PROBE, v6).await,
            "the probe port refused the node"
        );
        assert!(
            !from_node(PORT, v6).await,
            "a STRICT port took plaintext from the node"
        );
        for port in [PORT, PROBE] {
            let r = client.client(server.addr(v6, port), 1, 64).await.unwrap();
            assert_eq!(n(&r, &["ok"]), 1, "mesh traffic to {port}: {r}");
        }
    }
    // The exception goes with the setting: without it the probe port is STRICT too.
    let name = server.name.clone();
    cluster
        .update_placement(|p| {
            p["peer_authentication"] =
                json!([{"namespace": "default", "pod": name, "mode": "STRICT"}]);
        })
        .await
        .unwrap();
    assert!(
        !from_node(PROBE, false).await,
        "a port exception outlived its setting"
    );
    let c = node.counters().await.unwrap();
    let me = inbound_of(&c, &format!("default/{}", server.name));
    assert_eq!(n(me, &["plaintext"]), 2, "{c}");
    assert!(n(me, &["denied"]) >= 3, "{c}");
}
