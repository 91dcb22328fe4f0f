//! The node proxy's limits hold against a flood, and the flood's neighbours keep being served:
//! slow or surplus admin clients are cut, idle handshakes on the tunnel port cannot keep peers
//! out, and one pod cannot take every connection of the proxy.
use std::{net::SocketAddr, time::Duration};

use mesh_tests::{ClusterBuilder, connect_in, n};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u16 = 8080;

/// Whether the server closed (or reset) `s` within `within`.
async fn closed(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn slow_and_surplus_admin_clients_are_cut_and_counted() {
    let cluster = ClusterBuilder::new()
        .nodes(1)
        .pods_per_node(1)
        .node_args(&["--max-admin-connections", "8"])
        .start()
        .await
        .unwrap();
    let node = &cluster.nodes[0];
    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    // Eight clients that send half a head and stop: every slot taken.
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut s = connect_in(&node.netns, admin).await.unwrap();
        s.write_all(b"GET /v1/counters HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A ninth is closed at accept.
    let mut extra = connect_in(&node.netns, admin).await.unwrap();
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert!(
        closed(&mut extra, Duration::from_secs(2)).await,
        "a connection beyond --max-admin-connections was served"
    );
    // The slow heads are cut at the head timeout (10 s), not held for ever.
    for s in &mut slow {
        assert!(
            closed(s, Duration::from_secs(15)).await,
            "a head that never ends held its connection past the head timeout"
        );
    }
    let (status, c) = node.admin("GET", "/v1/counters", None).await.unwrap();
    assert_eq!(status, 200, "{c}");
    assert!(n(&c, &["limits", "hits", "admin_connections"]) >= 1, "{c}");
    let (status, text) = node.admin("GET", "/metrics", None).await.unwrap();
    assert_eq!(status, 200);
    assert!(
        text.to_string()
            .contains("mesh_limit_hits_total{limit=\\\"admin_connections\\\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn idle_handshakes_cannot_keep_mesh_traffic_out() {
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .node_args(&["--max-tunnel-handshakes", "16"])
        .with_controller()
        .start()
        .await
        .unwrap();
    let (client, server) = (cluster.pod(0, 0).clone(), cluster.pod(1, 0).clone());
    let _srv = server.serve(PORT, false).await.unwrap();
    for p in [&client, &server] {
        cluster.enroll(p).await.unwrap();
    }
    // A process on node 0 opens 200 connections to node 1's tunnel port and sends nothing.
    let tunnel = SocketAddr::new(cluster.nodes[1].ipv4.into(), 15008);
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(connect_in(&cluster.nodes[0].netns, tunnel).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = client
        .client(server.addr(false, PORT), 20, 64)
        .await
        .unwrap();
    assert_eq!(n(&r, &["ok"]), 20, "{r}");
    let c = cluster.nodes[1].counters().await.unwrap();
    assert!(
        n(&c, &["limits", "hits", "tunnel_handshakes"]) >= 184,
        "{}",
        c["limits"]
    );
    assert!(
        n(&c, &["limits", "tunnel_handshakes_in_progress"]) <= 16,
        "{}",
        c["limits"]
    );
}

#[tokio::test]
async fn one_pod_cannot_take_every_connection_of_the_proxy() {
    let cluster = ClusterBuilder::new()
        .nodes(1)
        .pods_per_node(3)
        .node_args(&["--max-connections-per-pod", "5"])
        .start()
        .await
        .unwrap();
    let (greedy, other, server) = (
        cluster.pod(0, 0).clone(),
        cluster.pod(0, 1).clone(),
        cluster.pod(0, 2).clone(),
    );
    let _srv = server.serve(PORT, false).await.unwrap();
    for p in [&greedy, &other] {
        cluster.enroll(p).await.unwrap();
    }
    let dst = server.addr(false, PORT);
    // The greedy pod holds five connections open for a while...
    let hold = {
        let greedy = greedy.clone();
        tokio::spawn(async move {
            greedy
                .testpod(&[
                    "rr",
                    "--to",
                    &dst.to_string(),
                    "--conns",
                    "5",
                    "--duration-ms",
                    "4000",
                ])
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // ...so a sixth is refused, while another pod is served as usual.
    let r = greedy.client(dst, 1, 64).await.unwrap();
    assert_eq!(n(&r, &["ok"]), 0, "a sixth connection of the pod: {r}");
    let r = other.client(dst, 3, 64).await.unwrap();
    assert_eq!(n(&r, &["ok"]), 3, "{r}");
    let held = hold.await.unwrap();
    assert!(
        n(&held, &["requests"]) > 0,
        "the held connections worked: {held}"
    );
    // Its connections ended: the pod may connect again.
    let r = greedy.client(dst, 2, 64).await.unwrap();
    assert_eq!(n(&r, &["ok"]), 2, "{r}");
    let c = cluster.nodes[0].counters().await.unwrap();
    assert!(
        n(&c, &["limits", "hits", "connections_per_pod"]) >= 1,
        "{c}"
    );
}

#[tokio::test]
async fn one_pod_cannot_take_every_request_slot_of_the_proxy() {
    let cluster = ClusterBuilder::new()
        .nodes(1)
        .pods_per_node(3)
        .config_stream()
        .node_args(&["--max-requests-per-pod", "4"])
        .start()
        .await
        .unwrap();
    let (greedy, other, server) = (
        cluster.pod(0, 0).clone(),
        cluster.pod(0, 1).clone(),
        cluster.pod(0, 2).clone(),
    );
    let _srv = server.serve_http_as(PORT, "server", &[]).await.unwrap();
    for p in [&greedy, &other, &server] {
        cluster.enroll(p).await.unwrap();
    }
    let dst = server.addr(false, PORT).to_string();
    let get = |pod: &mesh_tests::Pod, path: &'static str, conns: usize| {
        let (pod, dst) = (pod.clone(), dst.clone());
        async move {
            let c = conns.to_string();
            pod.testpod(&[
                "get", "--to", &dst, "--path", path, "--count", &c, "--conns", &c,
            ])
            .await
            .unwrap()
        }
    };
    // Sixteen slow requests at once from one pod: four are in flight, the rest are refused at
    // once, and meanwhile another pod's requests are served as usual.
    let greedy_run = tokio::spawn(get(&greedy, "/delay/3000", 16));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let r = get(&other, "/", 3).await;
    assert_eq!(n(&r, &["statuses", "200"]), 3, "the other pod: {r}");
    let r = greedy_run.await.unwrap();
    assert_eq!(n(&r, &["statuses", "200"]), 4, "{r}");
    assert_eq!(n(&r, &["statuses", "503"]), 12, "{r}");
    // Its requests ended: the pod has its budget back.
    let r = get(&greedy, "/", 4).await;
    assert_eq!(n(&r, &["statuses", "200"]), 4, "{r}");
    let c = cluster.nodes[0].counters().await.unwrap();
    assert_eq!(n(&c, &["limits", "hits", "requests_per_pod"]), 12, "{c}");
}
