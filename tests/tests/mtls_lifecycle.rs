//! Certificates over time: rotation under load, and the controller going away and coming back.
use std::time::Duration;

use mesh_tests::{ClusterBuilder, Pair, Pod, n};
use serde_json::Value;

const PORT: u16 = 8080;

fn spawn_load(client: &Pod, args: Vec<String>) -> tokio::task::JoinHandle<anyhow::Result<Value>> {
    let client = client.clone();
    tokio::spawn(async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        client.testpod(&args).await
    })
}

fn load(kind: &str, dst: std::net::SocketAddr, ms: u64, conns: &str) -> Vec<String> {
    let conns_flag = if kind == "rate" {
        "--concurrency"
    } else {
        "--conns"
    };
    [
        kind,
        "--to",
        &dst.to_string(),
        "--duration-ms",
        &ms.to_string(),
        conns_flag,
        conns,
    ]
    .map(String::from)
    .to_vec()
}

#[tokio::test]
async fn certificates_rotate_under_load_without_failing_a_connection() {
    // 6 s certificates rotate every 3 s: three or more rotations during 10 s of traffic.
    let Pair {
        cluster,
        client,
        server,
        server_process: _s,
    } = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .with_controller()
        .cert_ttl(Duration::from_secs(6))
        .start_pair(PORT)
        .await
        .unwrap();
    let dst = server.addr(false, PORT);
    // A new connection per request, and long-lived connections, at the same time.
    let fresh = spawn_load(&client, load("rate", dst, 10_000, "4"));
    let steady = spawn_load(&client, load("rr", dst, 10_000, "8"));
    let fresh = fresh.await.unwrap().unwrap();
    let steady = steady
        .await
        .unwrap()
        .expect("a long-lived connection failed during rotation");
    assert_eq!(n(&fresh, &["errors"]), 0, "{fresh}");
    assert!(n(&fresh, &["connects"]) > 100, "{fresh}");
    assert!(n(&steady, &["requests"]) > 1000, "{steady}");

    let c0 = cluster.nodes[0].counters().await.unwrap();
    let c1 = cluster.nodes[1].counters().await.unwrap();
    assert!(
        n(&c0, &["identity", "stats", "rotations"]) >= 2,
        "client side did not rotate: {c0}"
    );
    assert!(
        n(&c1, &["identity", "stats", "rotations"]) >= 2,
        "server side did not rotate: {c1}"
    );
    assert_eq!(n(&c0, &["identity", "stats", "failures"]), 0, "{c0}");
    // Each rotation moved new streams to a new TLS connection while old ones drained.
    assert!(n(&c0, &["tunnel", "outbound_connections"]) >= 3, "{c0}");
    assert_eq!(n(&c0, &["proxy", "tunnel_failed"]), 0, "{c0}");
}

#[tokio::test]
async fn traffic_survives_a_controller_outage_until_certificates_expire() {
    let Pair {
        mut cluster,
        client,
        server,
        server_process: _s,
    } = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .with_controller()
        .cert_ttl(Duration::from_secs(8))
        .start_pair(PORT)
        .await
        .unwrap();
    let dst = server.addr(false, PORT);
    assert_eq!(n(&client.client(dst, 2, 64).await.unwrap(), &["ok"]), 2);

    let steady = spawn_load(&client, load("rr", dst, 4_000, "4"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.ctrl.as_mut().unwrap().stop().await.unwrap();
    // Established connections keep flowing, and new ones work on the cached certificates.
    let report = client.client(dst, 3, 1024).await.unwrap();
    assert_eq!(
        n(&report, &["ok"]),
        3,
        "new connection failed with the controller down: {report}"
    );
    let steady = steady
        .await
        .unwrap()
        .expect("an established connection broke when the controller stopped");
    assert!(n(&steady, &["requests"]) > 100, "{steady}");

    // Past expiry, with rotation impossible, new tunnels fail closed.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let report = client.client(dst, 1, 64).await.unwrap();
    assert_eq!(
        n(&report, &["ok"]),
        0,
        "a tunnel was made on an expired certificate: {report}"
    );
    let c0 = cluster.nodes[0].counters().await.unwrap();
    assert!(n(&c0, &["identity", "stats", "failures"]) >= 1, "{c0}");

    // The controller comes back (same persisted root): nodes recover without a restart.
    cluster.ctrl.as_mut().unwrap().start().await.unwrap();
    let report = client.client(dst, 2, 64).await.unwrap();
    assert_eq!(
        n(&report, &["ok"]),
        2,
        "did not recover after the controller returned: {report}"
    );
}
