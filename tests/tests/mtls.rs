//! Identity and the mTLS tunnel between node proxies, end to end on the real kernel with a real
//! mesh-ctrl: certificates, HBONE, inbound checks, refusals, rotation, controller outages.
use std::net::SocketAddr;

use mesh_tests::{ClusterBuilder, Pair, Pod};
use serde_json::Value;

const PORT: u16 = 8080;

fn n(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(v, |v, k| &v[k])
        .as_u64()
        .unwrap_or_else(|| panic!("no number at {path:?} in {v}"))
}

fn spiffe(pod: &Pod) -> String {
    format!(
        "spiffe://cluster.local/ns/{}/sa/{}",
        pod.namespace, pod.service_account
    )
}

fn assert_all_ok(report: &Value, conns: u64) {
    assert_eq!(n(report, &["ok"]), conns, "{report}");
    assert_eq!(n(report, &["failed"]), 0, "{report}");
}

/// The server saw this peer (the destination node's proxy on the pod link).
fn server_saw(report: &Value) -> String {
    report["hellos"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn cross_node_traffic_carries_both_workload_identities_over_mtls() {
    let Pair {
        cluster,
        client,
        server,
        server_process: _s,
    } = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .with_controller()
        .start_pair(PORT)
        .await
        .unwrap();
    cluster.enroll(&server).await.unwrap();

    for v6 in [false, true] {
        let dst = server.addr(v6, PORT);
        let report = client.client(dst, 4, 8192).await.unwrap();
        assert_all_ok(&report, 4);
        assert_eq!(report["peer_addrs"][0], dst.to_string(), "{report}");
        // Delivered by node 1's proxy over the pod link, to the original destination.
        let via = if v6 { "fd00:101:1::1" } else { "10.101.1.1" };
        assert_eq!(server_saw(&report), format!("HELLO peer={via} local={dst}"));
    }

    // Node 1 proved who the client is and knows the original source.
    let delivered: Vec<Value> = cluster.nodes[1]
        .log_records()
        .into_iter()
        .filter(|r| r["fields"]["message"] == "delivering")
        .collect();
    assert_eq!(delivered.len(), 8, "{}", cluster.nodes[1].log_tail(20));
    for r in &delivered {
        assert_eq!(r["span"]["src.identity"], spiffe(&client).as_str(), "{r}");
        let fwd = r["span"]["forwarded"].as_str().unwrap();
        let src: SocketAddr = fwd
            .trim_start_matches("for=\"")
            .trim_end_matches('"')
            .parse()
            .unwrap();
        assert!(
            src.ip() == client.ipv4 || src.ip() == client.ipv6,
            "forwarded {fwd}"
        );
    }
    let c0 = cluster.nodes[0].counters().await.unwrap();
    assert_eq!(n(&c0, &["proxy", "tunneled"]), 8, "{c0}");
    // Pooled: one TLS connection per (source, node address, destination), not one per stream.
    assert_eq!(n(&c0, &["tunnel", "outbound_connections"]), 2, "{c0}");
    assert_eq!(n(&c0, &["tunnel", "outbound_streams"]), 8, "{c0}");
    let c1 = cluster.nodes[1].counters().await.unwrap();
    assert_eq!(n(&c1, &["tunnel", "inbound_streams"]), 8, "{c1}");
    let certs = c0["identity"]["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 1, "{c0}");
    assert_eq!(certs[0]["identity"], spiffe(&client).as_str());
    assert!(certs[0]["expires_in_seconds"].as_i64().unwrap() > 23 * 3600);
}

#[tokio::test]
async fn delivery_requires_an_enrolled_destination_on_the_same_or_the_other_node() {
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .with_controller()
        .start()
        .await
        .unwrap();
    let client = cluster.pod(0, 0).clone();
    let near = cluster.pod(0, 1).clone();
    let far = cluster.pod(1, 0).clone();
    let _a = near.serve(PORT, false).await.unwrap();
    let _b = far.serve(PORT, false).await.unwrap();
    cluster.enroll(&client).await.unwrap();

    // Mesh workloads that are not enrolled on their node are refused, not reached in clear.
    for dst in [near.addr(false, PORT), far.addr(false, PORT)] {
        let report = client.client(dst, 2, 64).await.unwrap();
        assert_eq!(n(&report, &["ok"]), 0, "{dst}: {report}");
    }
    let c0 = cluster.nodes[0].counters().await.unwrap();
    assert_eq!(n(&c0, &["proxy", "refused_local_not_enrolled"]), 2, "{c0}");
    // Node 1 does not even present an identity it serves no enrolled pod for.
    let c1 = cluster.nodes[1].counters().await.unwrap();
    assert_eq!(
        n(&c1, &["tunnel", "inbound_tls_refused", "unknown_identity"]),
        2,
        "{c1}"
    );

    cluster.enroll(&near).await.unwrap();
    cluster.enroll(&far).await.unwrap();
    let report = client.client(near.addr(false, PORT), 2, 64).await.unwrap();
    assert_all_ok(&report, 2);
    // Same node: delivered locally by node 0's proxy, no tunnel.
    assert_eq!(
        server_saw(&report),
        format!("HELLO peer=10.100.2.1 local={}", near.addr(false, PORT))
    );
    assert_all_ok(
        &client.client(far.addr(false, PORT), 2, 64).await.unwrap(),
        2,
    );
    let c0 = cluster.nodes[0].counters().await.unwrap();
    assert_eq!(n(&c0, &["proxy", "delivered_local"]), 2, "{c0}");
    assert_eq!(n(&c0, &["proxy", "tunneled"]), 2, "{c0}");
}
