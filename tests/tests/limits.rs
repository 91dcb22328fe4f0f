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
    // The kernel refuses it first (EPERM at connect: the pod holds its share of redirected
    // sockets); the proxy's own limit stands behind it.
    let c = cluster.nodes[0].counters().await.unwrap();
    assert!(
        n(&c, &["ebpf", "connect4", "pod_full"])
            + n(&c, &["limits", "hits", "connections_per_pod"])
            >= 1,
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

/// Keeps `count` connections from `netns` to `addr` open until `stop`, each sending `head` once
/// (nothing when empty), reopening those the server closes every two seconds. Returns how many
/// it had to reopen.
async fn hold_open(
    netns: String,
    addr: SocketAddr,
    count: usize,
    head: &'static [u8],
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> usize {
    use std::io::Write;
    let mut held: Vec<std::net::TcpStream> = Vec::new();
    let mut reopened = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        held.retain(|s| {
            let mut b = [0u8; 1];
            match s.peek(&mut b) {
                Ok(0) => false,
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            }
        });
        let missing = count - held.len();
        if !held.is_empty() {
            reopened += missing;
        }
        let fresh = mesh_tests::connect_many_in(&netns, addr, missing)
            .await
            .unwrap();
        for mut s in fresh {
            if !head.is_empty() {
                let _ = s.write_all(head);
            }
            s.set_nonblocking(true).unwrap();
            held.push(s);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    reopened
}

/// What the node proxy's memory is held under while strangers and a pod flood it (the README's
/// "Limits" says the same).
const RSS_BOUND_KB: f64 = 256.0 * 1024.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_and_a_greedy_pod_flooding_the_proxy_leave_mesh_traffic_whole() {
    mesh_tests::sys::raise_nofile().unwrap();
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .with_controller()
        .node_args(&["--metrics-addr", "0.0.0.0:15020"])
        .start()
        .await
        .unwrap();
    let (client, greedy, server) = (
        cluster.pod(0, 0).clone(),
        cluster.pod(0, 1).clone(),
        cluster.pod(1, 0).clone(),
    );
    let _echo = server.serve(PORT, false).await.unwrap();
    for p in [&client, &greedy, &server] {
        cluster.enroll(p).await.unwrap();
    }
    let node1 = cluster.nodes[1].ipv4;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // 10,000 idle connections to node 1's tunnel port from a process on node 0, and 2,000
    // connections to its metrics port that send half a head, each topped up as they are cut.
    let tunnel_flood = tokio::spawn(hold_open(
        cluster.nodes[0].netns.clone(),
        SocketAddr::new(node1.into(), 15008),
        10_000,
        b"",
        stop.clone(),
    ));
    let metrics_flood = tokio::spawn(hold_open(
        cluster.nodes[1].netns.clone(),
        SocketAddr::new(node1.into(), 15020),
        2_000,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n",
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dst = server.addr(false, PORT).to_string();
    let (ms, pids) = (
        "15000",
        [
            cluster.nodes[0].pid().unwrap(),
            cluster.nodes[1].pid().unwrap(),
        ],
    );
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut max = 0f64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for pid in pids {
                    max = max.max(mesh_tests::procfs::rss_kb(pid).unwrap());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            max
        })
    };
    // Meanwhile: an enrolled pod opens connections as fast as it can, and two other pods talk.
    let flood_args = [
        "rate",
        "--to",
        &dst,
        "--duration-ms",
        ms,
        "--concurrency",
        "16",
    ];
    let steady_args = ["rr", "--to", &dst, "--duration-ms", ms, "--conns", "4"];
    let fresh_args = [
        "rate",
        "--to",
        &dst,
        "--duration-ms",
        ms,
        "--concurrency",
        "2",
    ];
    let (flood, steady, fresh) = tokio::join!(
        greedy.testpod(&flood_args),
        client.testpod(&steady_args),
        client.testpod(&fresh_args),
    );
    let steady = steady.expect("a long-lived mesh connection failed during the flood");
    let (fresh, flood) = (fresh.unwrap(), flood.unwrap());
    let (_, metrics) = cluster.nodes[1]
        .admin("GET", "/metrics", None)
        .await
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reopened, max_rss) = (
        tunnel_flood.await.unwrap() + metrics_flood.await.unwrap(),
        sampler.await.unwrap(),
    );
    assert!(n(&steady, &["requests"]) > 1000, "{steady}");
    assert_eq!(n(&fresh, &["errors"]), 0, "{fresh}");
    assert!(n(&fresh, &["connects"]) > 100, "{fresh}");
    assert!(n(&flood, &["connects"]) > 100, "{flood}");
    // The floods met the limits (and were cut, so they had to reopen).
    let c = cluster.nodes[1].counters().await.unwrap();
    assert!(
        n(&c, &["limits", "hits", "tunnel_handshakes"]) > 1000,
        "{}",
        c["limits"]
    );
    assert!(
        n(&c, &["limits", "hits", "admin_connections"]) > 1000,
        "{}",
        c["limits"]
    );
    assert!(reopened > 1000, "the floods were never cut: {reopened}");
    assert!(
        max_rss < RSS_BOUND_KB,
        "a proxy held {max_rss} KiB (bound {RSS_BOUND_KB})"
    );
    let rss_line = metrics
        .as_str()
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("mesh_process_resident_memory_bytes"))
        .map(str::to_string);
    let rss: f64 = rss_line
        .as_deref()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no RSS in /metrics: {rss_line:?}"));
    assert!(rss / 1024.0 < RSS_BOUND_KB, "/metrics says {rss} bytes");
    eprintln!(
        "max proxy RSS {max_rss} KiB; {reopened} flood connections reopened; mesh: {} requests, {} new connections",
        n(&steady, &["requests"]),
        n(&fresh, &["connects"])
    );
}
