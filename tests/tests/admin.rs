//! The node proxy's admin port as an operator uses it on a live node.
use mesh_tests::{Cluster, ClusterBuilder, Pod};
use serde_json::{Value, json};

#[tokio::test]
async fn the_log_level_changes_at_run_time_without_a_restart() {
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .start()
        .await
        .unwrap();
    let (client, server) = (cluster.pod(0, 0).clone(), cluster.pod(1, 0).clone());
    let _s = server.serve(8080, false).await.unwrap();
    cluster.enroll(&client).await.unwrap();
    let node = &cluster.nodes[0];
    let debug_records = || {
        node.log_records()
            .iter()
            .filter(|r| r["level"] == "DEBUG")
            .count()
    };
    let pid = node.pid();

    let (status, v) = node.admin("GET", "/v1/log-level", None).await.unwrap();
    assert_eq!((status, v["filter"].as_str()), (200, Some("info")), "{v}");
    let r = client
        .client(server.addr(false, 8080), 1, 64)
        .await
        .unwrap();
    assert_eq!(r["ok"], 1, "{r}");
    assert_eq!(debug_records(), 0);

    let (status, v) = node
        .admin("PUT", "/v1/log-level", Some("info,mesh_node=debug"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let r = client
        .client(server.addr(false, 8080), 1, 64)
        .await
        .unwrap();
    assert_eq!(r["ok"], 1, "{r}");
    // The relay logs "closed" after the client has its answer: give the proxy a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while debug_records() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(debug_records() > 0, "{}", node.log_tail(10));
    assert_eq!(node.pid(), pid, "same process");

    let (status, v) = node
        .admin("PUT", "/v1/log-level", Some("mesh_node=loud"))
        .await
        .unwrap();
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("invalid filter"),
        "{v}"
    );
    let (_, v) = node.admin("GET", "/v1/log-level", None).await.unwrap();
    assert_eq!(
        v["filter"], "info,mesh_node=debug",
        "a bad filter changes nothing"
    );
}

/// The admin port's live page in a real browser: headless Chromium loads it from the node's
/// admin address, runs its script against the live counters, and takes a screenshot.
#[tokio::test]
async fn the_live_page_renders_in_headless_chromium() {
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .config_stream()
        .start()
        .await
        .unwrap();
    let client = cluster.pod(0, 0).clone();
    let (local, remote) = (cluster.pod(0, 1).clone(), cluster.pod(1, 0).clone());
    let _servers = [
        local.serve_http(8080).await.unwrap(),
        remote.serve_http(8080).await.unwrap(),
    ];
    for p in [&client, &local, &remote] {
        cluster.enroll(p).await.unwrap();
    }
    for to in [&local, &remote] {
        let r = client
            .testpod(&[
                "get",
                "--to",
                &to.addr(false, 8080).to_string(),
                "--count",
                "25",
            ])
            .await
            .unwrap();
        assert_eq!(r["statuses"]["200"], 25, "{r}");
    }
    let node = &cluster.nodes[0];
    let dir = cluster.dir.join("chromium");
    std::fs::create_dir_all(&dir).unwrap();
    let shot = dir.join("live-page.png");
    let url = format!("http://127.0.0.1:{}/", mesh_tests::cluster::ADMIN_PORT);
    let chromium = |extra: Vec<String>| {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &node.netns,
            "chromium",
            "--headless",
            "--no-sandbox",
        ])
        .args(["--disable-gpu", "--no-first-run", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .args(["--virtual-time-budget=5000", "--window-size=1280,1000"])
        .args(extra)
        .arg(&url)
        .env("HOME", &dir);
        async move {
            cmd.output()
                .await
                .expect("chromium (installed by cargo xtask test)")
        }
    };
    let dom = chromium(vec!["--dump-dom".into()]).await;
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        html.contains(r#"data-loaded="true""#),
        "the page's script ran against the live counters: {html}\n{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    // The top-workloads table names both servers (served) and the client (sent), with counts.
    for p in [&client, &local] {
        let name = format!("{}/{}", p.namespace, p.name);
        assert!(html.contains(&name), "{name} missing from the page: {html}");
    }
    assert!(html.contains("redirected"), "kernel counters shown: {html}");
    assert!(
        html.contains(&format!("nodemesh node {}", node.name)),
        "{html}"
    );
    let out = chromium(vec![format!("--screenshot={}", shot.display())]).await;
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    assert!(
        png.len() > 20_000,
        "a rendered page, not a blank one: {} bytes",
        png.len()
    );
    // Kept where a person can look at it after the run.
    let keep = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/live-page.png");
    let _ = std::fs::copy(&shot, &keep);
    eprintln!("live page screenshot: {}", keep.display());
}

/// One node with two pods: `victim` enrolled, `attacker` not.
async fn victim_and_attacker() -> (Cluster, Pod, Pod) {
    let cluster = ClusterBuilder::new()
        .nodes(1)
        .pods_per_node(2)
        .start()
        .await
        .unwrap();
    let (victim, attacker) = (cluster.pod(0, 0).clone(), cluster.pod(0, 1).clone());
    cluster.enroll(&victim).await.unwrap();
    (cluster, victim, attacker)
}

/// Any process that reaches the node's loopback (a hostNetwork pod, a node daemon) could re-enroll
/// a pod under its own network namespace and speak with that pod's identity, or silence the log.
/// Changes are refused over TCP and counted; reads still work there.
#[tokio::test]
async fn changes_over_the_tcp_admin_listener_are_refused_and_counted() {
    let (cluster, victim, attacker) = victim_and_attacker().await;
    let node = &cluster.nodes[0];
    let steal = json!({"netns": format!("/run/netns/{}", attacker.netns)}).to_string();
    let victim_path = format!("/v1/pods/{}/{}", victim.namespace, victim.name);
    for (method, path, body) in [
        ("PUT", victim_path.as_str(), Some(steal.as_str())),
        ("DELETE", victim_path.as_str(), None),
        ("PUT", "/v1/log-level", Some("off")),
        ("POST", "/v1/log-level", Some("off")),
    ] {
        let (status, v) = node.admin_tcp(method, path, body).await.unwrap();
        assert_eq!(status, 405, "{method} {path} over TCP: {v}");
        assert!(v["error"].as_str().unwrap().contains("admin.sock"), "{v}");
    }
    let (status, pods) = node.admin_tcp("GET", "/v1/pods", None).await.unwrap();
    assert_eq!(status, 200);
    let enrolled: Vec<&Value> = pods.as_array().unwrap().iter().collect();
    assert_eq!(enrolled.len(), 1, "{pods}");
    assert_eq!(
        enrolled[0]["netns"],
        format!("/run/netns/{}", victim.netns),
        "{pods}"
    );
    let (_, v) = node.admin("GET", "/v1/log-level", None).await.unwrap();
    assert_eq!(v["filter"], "info", "{v}");
    let c = node.counters().await.unwrap();
    assert_eq!(c["admin"]["changes_refused"], 4, "{}", c["admin"]);
}

/// The socket is root-only by its mode; even if an operator loosens the mode, a caller that is not
/// root (`SO_PEERCRED`) is closed on and counted.
#[tokio::test]
async fn the_admin_socket_serves_root_only() {
    use std::os::unix::{fs::PermissionsExt, process::CommandExt};
    let cluster = ClusterBuilder::new()
        .nodes(1)
        .pods_per_node(1)
        .start()
        .await
        .unwrap();
    let node = &cluster.nodes[0];
    let socket = node.admin_socket();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", socket.display());
    let as_nobody = || {
        std::process::Command::new("curl")
            .args(["-sSv", "--max-time", "5", "--unix-socket"])
            .arg(&socket)
            .args([
                "-X",
                "PUT",
                "--data",
                "off",
                "http://mesh-node/v1/log-level",
            ])
            .uid(65534)
            .gid(65534)
            .output()
            .expect("curl (cargo xtask test installs it)")
    };
    // What mesh-node itself refused (a connection the kernel let in from a caller not root).
    let refused_by_mesh_node = || async {
        let c = node.counters().await.unwrap();
        c["admin"]["changes_refused"].as_u64().unwrap()
    };
    let out = as_nobody();
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(refused_by_mesh_node().await, 0, "the kernel let nobody in");
    // Loosened (the socket, and its directories searchable by all, whatever umask made them):
    // the kernel lets the connection in, and mesh-node closes it unanswered (how curl words that
    // depends on whether the close beats its connect check, so count on mesh-node's side).
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    for dir in socket.ancestors().skip(1).take(2) {
        let mode = std::fs::metadata(dir).unwrap().permissions().mode();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o011)).unwrap();
    }
    let out = as_nobody();
    assert!(!out.status.success(), "nobody was answered: {out:?}");
    assert_eq!(refused_by_mesh_node().await, 1, "{out:?}");
    let (_, v) = node.admin("GET", "/v1/log-level", None).await.unwrap();
    assert_eq!(v["filter"], "info", "{v}");
    // Root still changes it.
    let (status, v) = node
        .admin("PUT", "/v1/log-level", Some("warn"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
}

/// A pod's registration moves its identity: a second registration of a live pod with another
/// network namespace is refused and counted; a new sandbox (the old namespace gone) takes over.
#[tokio::test]
async fn a_live_pods_registration_cannot_be_moved_to_another_namespace() {
    let (cluster, victim, attacker) = victim_and_attacker().await;
    let node = &cluster.nodes[0];
    let path = format!("/v1/pods/{}/{}", victim.namespace, victim.name);
    let steal = json!({"netns": format!("/run/netns/{}", attacker.netns), "service_account": victim.service_account}).to_string();
    let (status, v) = node.admin("PUT", &path, Some(&steal)).await.unwrap();
    assert_eq!(status, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("still exists"), "{v}");
    let (_, pods) = node.admin("GET", "/v1/pods", None).await.unwrap();
    assert_eq!(
        pods[0]["netns"],
        format!("/run/netns/{}", victim.netns),
        "{pods}"
    );
    let c = node.counters().await.unwrap();
    assert_eq!(c["admin"]["repoints_refused"], 1, "{}", c["admin"]);

    // A restarted pod: its old sandbox's namespace is gone, the new one registers.
    let old = format!("{}-old", cluster.nodes[0].name);
    let ip = |args: &[&str]| {
        let s = std::process::Command::new("ip")
            .args(args)
            .status()
            .unwrap();
        assert!(s.success(), "ip {args:?}");
    };
    ip(&["netns", "add", &old]);
    let moved = "/v1/pods/default/restarted";
    let first = json!({"netns": format!("/run/netns/{old}")}).to_string();
    let (status, v) = node.admin("PUT", moved, Some(&first)).await.unwrap();
    assert_eq!(status, 200, "{v}");
    ip(&["netns", "del", &old]);
    let (status, v) = node.admin("PUT", moved, Some(&steal)).await.unwrap();
    assert_eq!(status, 200, "a new sandbox could not take over: {v}");
}
