//! Proxy generations hand their listening sockets over by descriptor, so nothing else on the node
//! can bind beside the proxy (no `SO_REUSEPORT`), and an upgrade refuses no connect.
use std::net::{IpAddr, SocketAddr};

use mesh_tests::{Cluster, ClusterBuilder, Pod, PodProcess, n};

const PORT: u16 = 8080;
const HTTP: u16 = 8081;
const GRPC: u16 = 9090;

/// Two nodes with one enrolled pod each: the client on node 0, the server on node 1 running
/// `mesh-testpod <server> --listen ..:PORT`. Nodes take placement from a file the controller
/// does not serve.
async fn across_two_nodes(server_mode: &[&str]) -> (Cluster, Pod, Pod, PodProcess) {
    across_two_nodes_of(ClusterBuilder::new().with_controller(), server_mode).await
}

/// [`across_two_nodes`] with a cluster of `builder`'s kind.
async fn across_two_nodes_of(
    builder: ClusterBuilder,
    server_mode: &[&str],
) -> (Cluster, Pod, Pod, PodProcess) {
    let cluster = builder.nodes(2).pods_per_node(1).start().await.unwrap();
    let (client, server) = (cluster.pod(0, 0).clone(), cluster.pod(1, 0).clone());
    let process = server.server(server_mode, PORT).await.unwrap();
    for p in [&client, &server] {
        cluster.enroll(p).await.unwrap();
    }
    (cluster, client, server, process)
}

/// What a root process of the node's network namespace gets when it tries to bind `addr` the
/// way one joins a listener group: `SO_REUSEADDR` and `SO_REUSEPORT`.
fn bind_beside(netns: &str, addr: SocketAddr) -> std::io::Result<()> {
    let path = std::path::PathBuf::from("/run/netns").join(netns);
    mesh_tests::sys::in_netns(&path, || {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.bind(&addr.into())?;
        s.listen(16)?;
        Ok(())
    })
}

#[tokio::test]
async fn nothing_else_on_the_node_can_bind_beside_the_proxy() {
    let cluster = ClusterBuilder::new()
        .nodes(1)
        .pods_per_node(1)
        .with_controller()
        .start()
        .await
        .unwrap();
    let node = &cluster.nodes[0];
    let v4: IpAddr = node.ipv4.into();
    let v6: IpAddr = node.ipv6.into();
    let loopback: IpAddr = std::net::Ipv4Addr::LOCALHOST.into();
    for addr in [
        SocketAddr::new(v4, 15001),
        SocketAddr::new(v6, 15001),
        SocketAddr::new(v4, 15008),
        SocketAddr::new(v6, 15008),
        SocketAddr::new(loopback, 15000),
        SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 15001),
    ] {
        let r = bind_beside(&node.netns, addr);
        assert_eq!(
            r.as_ref().map_err(|e| e.raw_os_error()),
            Err(Some(libc::EADDRINUSE)),
            "a node process joined the proxy's listener at {addr}"
        );
    }
    // What a new generation takes the listeners from is root's alone.
    use std::os::unix::fs::PermissionsExt;
    let handover = node.admin_socket().with_file_name("handover.sock");
    let mode = std::fs::metadata(&handover).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", handover.display());
}

#[tokio::test]
async fn an_upgrade_takes_the_listeners_over_and_refuses_no_connect() {
    let (mut cluster, client, server, _srv) = across_two_nodes(&["serve"]).await;
    let dst = server.addr(false, PORT);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Short connections, one batch after another, through the client node's proxy for its whole
    // upgrade. (The server node's side needs its tunnel connections to send GOAWAY as it drains,
    // so peers move to the new generation: the upgrade issue.)
    let load = tcp_load(&client, dst, stop.clone());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for _ in 0..2 {
        let status = cluster.upgrade_node(0).await.unwrap();
        assert!(status.success(), "the old generation: {status}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, errors) = load.await.unwrap();
    assert!(
        errors.is_empty(),
        "connections failed during the upgrade: {errors:?}"
    );
    assert!(ok >= 50, "too little load to mean anything: {ok}");
    let handed = cluster.nodes[0]
        .log_records()
        .iter()
        .filter(|r| {
            r["fields"]["message"] == "took the listening sockets over from the running generation"
        })
        .count();
    assert_eq!(handed, 2, "hand-overs logged");
    // The new generations serve.
    let r = client.client(dst, 5, 64).await.unwrap();
    assert_eq!(n(&r, &["ok"]), 5, "{r}");
}

/// Requests in a loop from `client` until `stop`: `get` (keep-alive HTTP/1.1, or HTTP/2 with
/// `--h2`) batches of 100 over 2 connections; what failed, by error, and how many were answered.
fn http_load(
    client: &mesh_tests::Pod,
    to: SocketAddr,
    extra: &'static [&'static str],
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<serde_json::Value>)> {
    let client = client.clone();
    tokio::spawn(async move {
        let (mut ok, mut failures) = (0, Vec::new());
        let to = to.to_string();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut args = vec!["get", "--to", &to, "--count", "100", "--conns", "2"];
            args.extend_from_slice(extra);
            let r = client.testpod(&args).await.unwrap();
            ok += n(&r, &["statuses", "200"]);
            let errors = r["errors"].as_object().map_or(0, |e| e.len());
            let other = r["statuses"]
                .as_object()
                .is_some_and(|s| s.keys().any(|k| k != "200"));
            if errors > 0 || other {
                failures.push(r);
            }
        }
        (ok, failures)
    })
}

/// Batches of 10 short TCP connections from `client` to `dst` until `stop`: how many were
/// answered, and the errors of each batch that had any.
fn tcp_load(
    client: &Pod,
    dst: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<serde_json::Value>)> {
    let client = client.clone();
    tokio::spawn(async move {
        let (mut ok, mut errors) = (0, Vec::new());
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let r = client.client(dst, 10, 64).await.unwrap();
            ok += n(&r, &["ok"]);
            if n(&r, &["failed"]) > 0 {
                errors.push(r["errors"].clone());
            }
        }
        (ok, errors)
    })
}

/// Every generation boundary the issue names, under load, both sides: the server's node proxy
/// (its tunnel connections must send GOAWAY so the client's node opens new ones to the next
/// generation, and its carried HTTP/1.1 streams must end between requests) and the client's
/// (its app connections must end at a request boundary), three times each.
#[tokio::test]
async fn upgrading_either_node_fails_no_request() {
    let mut cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .config_stream()
        .start()
        .await
        .unwrap();
    let (client, server) = (cluster.pod(0, 0).clone(), cluster.pod(1, 0).clone());
    let _echo = server.serve(PORT, false).await.unwrap();
    let _web = server.serve_http(HTTP).await.unwrap();
    let _grpc = server.server(&["grpc", "--name", "g"], GRPC).await.unwrap();
    for p in [&client, &server] {
        cluster.enroll(p).await.unwrap();
    }
    let ns = &client.namespace;
    cluster
        .change_config(
            "services.yaml",
            Some(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {ns}}}\nspec:\n  clusterIP: 10.96.0.30\n  selector: {{app: web}}\n  ports: [{{name: http, port: 80, targetPort: {HTTP}}}, {{name: grpc, port: {GRPC}, targetPort: {GRPC}}}]\n"
            )),
        )
        .await
        .unwrap();
    cluster
        .label_pods(&[&server], serde_json::json!({"app": "web"}))
        .await
        .unwrap();
    let web: SocketAddr = "10.96.0.30:80".parse().unwrap();
    let first = client
        .testpod(&["get", "--to", &web.to_string(), "--count", "1"])
        .await
        .unwrap();
    assert_eq!(n(&first, &["statuses", "200"]), 1, "{first}");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h1 = http_load(&client, web, &[], stop.clone());
    let h2 = http_load(&client, web, &["--h2"], stop.clone());
    // gRPC: unary calls, and a stream of 15 messages 100 ms apart (shorter than the harness's
    // 2 s drain, so it finishes on the generation it started on).
    let grpc = |args: &'static [&'static str]| {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failures) = (0, Vec::new());
            let to = format!("10.96.0.30:{GRPC}");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut a = vec!["grpc-call", "--to", &to];
                a.extend_from_slice(args);
                match client.testpod(&a).await {
                    Ok(r)
                        if r["codes"]
                            .as_object()
                            .is_some_and(|c| c.keys().all(|k| k == "0")) =>
                    {
                        ok += r["codes"]["0"].as_u64().unwrap_or(0) + n(&r, &["chat_echoed"]);
                    }
                    other => failures.push(format!("{other:?}")),
                }
            }
            (ok, failures)
        })
    };
    let unary = grpc(&["--count", "50"]);
    let stream = grpc(&["--count", "0", "--chat", "15", "--chat-gap-ms", "100"]);
    let dst = server.addr(false, PORT);
    let tcp = tcp_load(&client, dst, stop.clone());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for _ in 0..3 {
        for node in [1, 0] {
            let status = cluster.upgrade_node(node).await.unwrap();
            assert!(status.success(), "node {node}'s old generation: {status}");
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (tcp_ok, tcp_errors) = tcp.await.unwrap();
    let (h1_ok, h1_failures) = h1.await.unwrap();
    let (h2_ok, h2_failures) = h2.await.unwrap();
    let (unary_ok, unary_failures) = unary.await.unwrap();
    let (stream_ok, stream_failures) = stream.await.unwrap();
    assert!(
        unary_failures.is_empty(),
        "gRPC calls failed: {unary_failures:?}"
    );
    assert!(
        stream_failures.is_empty(),
        "gRPC streams failed: {stream_failures:?}"
    );
    assert!(
        unary_ok >= 100 && stream_ok >= 30,
        "too little gRPC: {unary_ok} {stream_ok}"
    );
    assert!(
        tcp_errors.is_empty(),
        "TCP connections failed: {tcp_errors:?}"
    );
    assert!(
        h1_failures.is_empty(),
        "HTTP/1.1 requests failed: {h1_failures:?}"
    );
    assert!(
        h2_failures.is_empty(),
        "HTTP/2 requests failed: {h2_failures:?}"
    );
    for (what, ok) in [("TCP", tcp_ok), ("HTTP/1.1", h1_ok), ("HTTP/2", h2_ok)] {
        assert!(ok >= 200, "too little {what} load to mean anything: {ok}");
    }
    // What an operator watches: the fourth generation on each node, every listener taken over,
    // and the previous generation's report: it drained everything, cut nothing.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for node in &cluster.nodes {
        let c = node.counters().await.unwrap();
        let u = &c["upgrade"];
        assert_eq!(u["generation"], 4, "{u}");
        assert!(n(u, &["listeners_taken"]) >= 3, "{u}");
        assert_eq!(u["previous_reported"], 1, "{u}");
        assert_eq!(u["previous_cut"], 0, "{u}");
        let (_, text) = node.admin("GET", "/metrics", None).await.unwrap();
        let text = text.as_str().unwrap_or_default();
        for line in [
            "mesh_upgrade_generation 4",
            "mesh_upgrade_previous_connections{outcome=\"cut\"} 0",
        ] {
            assert!(text.contains(line), "no {line:?} in /metrics");
        }
    }
}

/// A map pinned by a build with another layout would be read wrongly by this one (aya opens
/// whatever is pinned at the path). The new generation refuses to start, says which map and why,
/// and the running one keeps the node.
#[tokio::test]
async fn a_generation_that_finds_maps_of_another_layout_refuses_and_the_old_one_serves_on() {
    let cluster = ClusterBuilder::new()
        .nodes(1)
        .pods_per_node(2)
        .with_controller()
        .start()
        .await
        .unwrap();
    let (client, server) = (cluster.pod(0, 0).clone(), cluster.pod(0, 1).clone());
    let _srv = server.serve(PORT, false).await.unwrap();
    for p in [&client, &server] {
        cluster.enroll(p).await.unwrap();
    }
    let dst = server.addr(false, PORT);
    let r = client.client(dst, 3, 64).await.unwrap();
    assert_eq!(n(&r, &["ok"]), 3, "{r}");
    // What an older build with another counters layout would have left pinned. The running
    // generation holds its own descriptor of the real map.
    let pinned = std::path::PathBuf::from("/sys/fs/bpf/mesh")
        .join(&cluster.nodes[0].name)
        .join("maps")
        .join("MESH_COUNTERS");
    std::fs::remove_file(&pinned).unwrap();
    let made = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pinned)
        .args([
            "type", "hash", "key", "4", "value", "4", "entries", "8", "name", "older",
        ])
        .status()
        .expect("bpftool (installed with the test tools)");
    assert!(made.success());

    let status = cluster.refused_upgrade(0).await.unwrap();
    assert!(!status.success(), "the new generation started: {status}");
    let log = std::fs::read_to_string(&cluster.nodes[0].log).unwrap();
    assert!(
        log.contains("pinned map MESH_COUNTERS was made by a build with another layout"),
        "{}",
        cluster.nodes[0].log_tail(20)
    );
    // The running generation still serves.
    let r = client.client(dst, 3, 64).await.unwrap();
    assert_eq!(n(&r, &["ok"]), 3, "{r}");
}

/// An opaque TCP stream has no boundary the proxy could end it at, and its bytes are in the old
/// process: it lasts until the old generation's drain deadline (`--drain-timeout`, 2 s in the
/// harness), not a moment less, and the report counts it as cut.
#[tokio::test]
async fn a_long_opaque_stream_lasts_until_the_drain_deadline_and_counts_as_cut() {
    let (mut cluster, client, server, _sink) = across_two_nodes(&["pattern-sink"]).await;
    let dst = server.addr(false, PORT).to_string();
    // 8 s of bursts, 100 ms apart: longer than the upgrade and its drain.
    let stream = {
        let client = client.clone();
        tokio::spawn(async move {
            let r = client
                .testpod(&[
                    "pattern-send",
                    "--to",
                    &dst,
                    "--bytes",
                    "8000000",
                    "--bursts",
                    "80",
                    "--gap-ms",
                    "100",
                ])
                .await;
            (r, std::time::Instant::now())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let upgraded = std::time::Instant::now();
    let status = cluster.upgrade_node(0).await.unwrap();
    assert!(status.success(), "{status}");
    let (r, ended) = stream.await.unwrap();
    assert!(r.is_err(), "the stream outlived its generation: {r:?}");
    let lasted = ended - upgraded;
    assert!(
        lasted >= std::time::Duration::from_millis(1900),
        "cut {lasted:?} into a 2 s drain"
    );
    let c = cluster.nodes[0].counters().await.unwrap();
    assert!(n(&c, &["upgrade", "previous_cut"]) >= 1, "{}", c["upgrade"]);
}

/// The old generation killed with SIGKILL in the middle of its drain: the new one already holds
/// the listeners and the programs, so connections made after the kill neither fail nor bypass
/// the mesh. (Those the old generation was carrying die with it: their bytes were in it.)
#[tokio::test]
async fn an_old_generation_killed_mid_drain_fails_no_new_connection() {
    let (mut cluster, client, server, _srv) = across_two_nodes(&["serve"]).await;
    let dst = server.addr(false, PORT);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Batches of 10 connections, each with when it started and what it got.
    type Batches = std::sync::Arc<std::sync::Mutex<Vec<(std::time::Instant, serde_json::Value)>>>;
    let batches: Batches = Default::default();
    let load = {
        let (client, stop, batches) = (client.clone(), stop.clone(), batches.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = std::time::Instant::now();
                let r = client.client(dst, 10, 64).await.unwrap();
                batches.lock().unwrap().push((started, r));
            }
        })
    };
    let started_after = |t: std::time::Instant| {
        batches
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _)| *s > t)
            .count()
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut kills = Vec::new();
    for node in [0, 1] {
        cluster
            .upgrade_node_killing_old(node, std::time::Duration::from_millis(100))
            .await
            .unwrap();
        let killed = std::time::Instant::now();
        kills.push(killed);
        // Three whole batches after the kill, however slow the machine (QEMU).
        let deadline = killed + std::time::Duration::from_secs(60);
        while started_after(killed) < 4 {
            assert!(std::time::Instant::now() < deadline, "no load after kill");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    let batches = std::mem::take(&mut *batches.lock().unwrap());
    let client_ip = client.addr(false, 0).ip().to_string();
    for (i, killed) in kills.iter().enumerate() {
        let after: Vec<_> = batches
            .iter()
            .filter(|(started, _)| started > killed)
            .map(|(_, r)| r)
            .collect();
        assert!(after.len() >= 3, "too few batches after kill {i}");
        for r in after {
            assert_eq!(
                n(r, &["failed"]),
                0,
                "a connection after kill {i} failed: {r}"
            );
            // Every one reached the server through the mesh (from the server node's proxy),
            // none from the client pod's own address.
            for (hello, _) in r["hellos"].as_object().into_iter().flatten() {
                assert!(
                    !hello.contains(&format!("peer={client_ip} ")),
                    "bypassed the mesh: {hello}"
                );
            }
        }
    }
}

/// The controller away during upgrades of both nodes: each new generation serves at once with
/// the certificates its node already held (kept in the state directory, root's alone) and the
/// configuration it last had, so connections under way and new ones fail not once. Before the
/// certificates were kept, the new generation asked the absent controller and failed every
/// connection across nodes.
#[tokio::test]
async fn an_upgrade_with_the_controller_away_serves_with_the_certificates_held() {
    let (mut cluster, client, server, _echo) =
        across_two_nodes_of(ClusterBuilder::new().config_stream(), &["serve"]).await;
    let dst = server.addr(false, PORT);
    let r = client.client(dst, 3, 64).await.unwrap();
    assert_eq!(n(&r, &["ok"]), 3, "{r}");
    use std::os::unix::fs::PermissionsExt;
    for node in &cluster.nodes {
        let saved = node.admin_socket().with_file_name("certificates.json");
        let mode = std::fs::metadata(&saved).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", saved.display());
    }
    cluster.ctrl.as_mut().unwrap().stop().await.unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tcp_load(&client, dst, stop.clone());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for node in [1, 0] {
        let status = cluster.upgrade_node(node).await.unwrap();
        assert!(status.success(), "node {node}'s old generation: {status}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, errors) = load.await.unwrap();
    assert!(
        errors.is_empty(),
        "connections failed with the controller away: {errors:?}"
    );
    assert!(ok >= 50, "too little load to mean anything: {ok}");
    // Each new generation served what the node held; none came from the controller.
    for node in &cluster.nodes {
        let c = node.counters().await.unwrap();
        let stats = &c["identity"]["stats"];
        assert!(n(stats, &["restored"]) >= 1, "{stats}");
        assert_eq!(n(stats, &["fetched"]), 0, "{stats}");
    }
}

/// A new generation that cannot get its configuration (the controller away, none saved) is not
/// ready: it accepts on none of the listeners it took over, and the running generation keeps
/// the node, past its drain timeout, until the new one is ready. Before, the new one said it
/// served at once: the old one drained and left, and every connection then failed.
#[tokio::test]
async fn a_new_generation_that_is_not_ready_leaves_the_node_to_the_running_one() {
    let (mut cluster, client, server, _echo) =
        across_two_nodes_of(ClusterBuilder::new().config_stream(), &["serve"]).await;
    let dst = server.addr(false, PORT);
    let r = client.client(dst, 3, 64).await.unwrap();
    assert_eq!(n(&r, &["ok"]), 3, "{r}");
    cluster.ctrl.as_mut().unwrap().stop().await.unwrap();
    let saved = cluster.nodes[0].admin_socket().with_file_name("config.pb");
    std::fs::remove_file(&saved).unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tcp_load(&client, dst, stop.clone());
    let mut old = cluster.start_next_generation(0).unwrap();
    // Twice the harness's 2 s drain timeout.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert!(
        old.try_wait().unwrap().is_none(),
        "the running generation left the node to one that is not ready"
    );
    // The controller back: the new generation gets its configuration, is ready, and takes over.
    cluster.ctrl.as_mut().unwrap().start().await.unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(60), old.wait())
        .await
        .expect("the old generation never left")
        .unwrap();
    assert!(status.success(), "{status}");
    cluster
        .wait_node_ready(0, std::time::Duration::from_secs(20))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, errors) = load.await.unwrap();
    assert!(errors.is_empty(), "connections failed: {errors:?}");
    assert!(ok >= 50, "too little load to mean anything: {ok}");
}
