//! Transparent redirection, end to end on the real kernel: real cgroup eBPF programs, real
//! mesh-node processes, pods and nodes as network namespaces. Needs root.
use std::net::SocketAddr;

use mesh_tests::{Cluster, ClusterBuilder, Pair, Pod, n};
use serde_json::Value;

const PORT: u16 = 8080;

fn require_root() {
    assert_eq!(
        unsafe_free_euid(),
        0,
        "end-to-end tests create namespaces, cgroups and eBPF programs: run them as root (cargo xtask test)"
    );
}

fn unsafe_free_euid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

fn strs(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Asserts a client report: every connection delivered, the client saw `dst` as its peer, and the
/// server saw `dst` as its local address and `server_saw_peer` as the connecting address.
fn assert_delivered(report: &Value, conns: u64, dst: SocketAddr, server_saw_peer: &str) {
    assert_eq!(n(report, &["ok"]), conns, "{report}");
    assert_eq!(n(report, &["failed"]), 0, "{report}");
    assert_eq!(
        strs(report, "peer_addrs"),
        vec![dst.to_string()],
        "client getpeername: {report}"
    );
    let hellos: Vec<&String> = report["hellos"].as_object().unwrap().keys().collect();
    let expected = format!("HELLO peer={server_saw_peer} local={dst}");
    assert_eq!(hellos, vec![&expected], "{report}");
}

/// The mesh-node log records of relayed connections from `pod` to `dst`.
fn relays(cluster: &Cluster, node: usize, pod: &Pod, dst: SocketAddr) -> usize {
    let src = format!("{}/{}", pod.namespace, pod.name);
    cluster.nodes[node]
        .log_records()
        .iter()
        .filter(|r| r["fields"]["message"] == "relaying")
        .filter(|r| {
            r["span"]["src.pod"] == src.as_str() && r["span"]["dst"] == dst.to_string().as_str()
        })
        .count()
}

#[tokio::test]
async fn enrolled_pod_reaches_same_node_and_other_node_over_ipv4_and_ipv6() {
    require_root();
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .start()
        .await
        .unwrap();
    let client = cluster.pod(0, 0).clone();
    let local = cluster.pod(0, 1).clone();
    let remote = cluster.pod(1, 0).clone();
    let _s1 = local.serve(PORT, false).await.unwrap();
    let _s2 = remote.serve(PORT, false).await.unwrap();
    cluster.enroll(&client).await.unwrap();

    // Without a mesh identity nothing is a mesh destination: the proxy relays each connection
    // from a socket in the client pod's network namespace, so servers see the client pod's own
    // address, as they would without the mesh. The proxy's log shows it relayed them.
    let (v4, v6) = (client.ipv4.to_string(), client.ipv6.to_string());
    let cases = [
        (local.addr(false, PORT), v4.as_str()),
        (local.addr(true, PORT), v6.as_str()),
        (remote.addr(false, PORT), v4.as_str()),
        (remote.addr(true, PORT), v6.as_str()),
    ];
    for (dst, via) in cases {
        let report = client.client(dst, 5, 4096).await.unwrap();
        assert_delivered(&report, 5, dst, via);
        assert_eq!(
            relays(&cluster, 0, &client, dst),
            5,
            "node log names source pod and original destination for {dst}"
        );
    }

    let c = cluster.nodes[0].counters().await.unwrap();
    assert_eq!(n(&c, &["ebpf", "connect4", "redirected"]), 10, "{c}");
    assert_eq!(n(&c, &["ebpf", "connect6", "redirected"]), 10, "{c}");
    assert_eq!(n(&c, &["ebpf", "sock_ops", "redirected"]), 20, "{c}");
    assert_eq!(n(&c, &["ebpf", "connect4", "denied"]), 0, "{c}");
    assert_eq!(n(&c, &["proxy", "relayed"]), 20, "{c}");
    assert_eq!(n(&c, &["proxy", "refused_not_redirected"]), 0, "{c}");
    // The proxy's own upstream connections are not redirected (else nothing would arrive), and
    // node 1's programs, attached to node 1's pods only, never saw node 0's connects.
    let c1 = cluster.nodes[1].counters().await.unwrap();
    assert_eq!(n(&c1, &["ebpf", "connect4", "seen"]), 0, "{c1}");
    assert_eq!(n(&c1, &["ebpf", "connect6", "seen"]), 0, "{c1}");
}

#[tokio::test]
async fn pods_not_enrolled_connect_directly_and_unenrolling_stops_redirection() {
    require_root();
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .start()
        .await
        .unwrap();
    let client = cluster.pod(0, 0).clone();
    let server = cluster.pod(1, 0).clone();
    let _s = server.serve(PORT, false).await.unwrap();
    let dst = server.addr(false, PORT);
    let direct = client.ipv4.to_string();

    let report = client.client(dst, 3, 1024).await.unwrap();
    assert_delivered(&report, 3, dst, &direct);

    cluster.enroll(&client).await.unwrap();
    let report = client.client(dst, 3, 1024).await.unwrap();
    // Relayed, from the pod's own address (no mesh identity: the server is not in the mesh).
    assert_delivered(&report, 3, dst, &direct);
    assert_eq!(relays(&cluster, 0, &client, dst), 3);

    cluster.unenroll(&client).await.unwrap();
    let report = client.client(dst, 3, 1024).await.unwrap();
    assert_delivered(&report, 3, dst, &direct);

    let c = cluster.nodes[0].counters().await.unwrap();
    assert_eq!(n(&c, &["ebpf", "connect4", "seen"]), 9, "{c}");
    assert_eq!(n(&c, &["ebpf", "connect4", "redirected"]), 3, "{c}");
    assert_eq!(n(&c, &["ebpf", "connect4", "skip_not_enrolled"]), 6, "{c}");
}

#[tokio::test]
async fn five_hundred_concurrent_connections_from_several_pods_are_delivered_intact() {
    require_root();
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(4)
        .start()
        .await
        .unwrap();
    let servers: Vec<Pod> = cluster.nodes[1].pods.iter().take(2).cloned().collect();
    let mut handles = Vec::new();
    for s in &servers {
        handles.push(s.serve(PORT, false).await.unwrap());
    }
    let clients: Vec<Pod> = cluster.nodes[0].pods.clone();
    for c in &clients {
        cluster.enroll(c).await.unwrap();
    }
    // 4 pods x 125 connections, all held open together, 16 KiB of per-connection data each.
    let runs = clients.iter().enumerate().map(|(i, c)| {
        let dst = servers[i % 2].addr(i % 2 == 1, PORT);
        let c = c.clone();
        async move {
            let args = [
                "client",
                "--to",
                &dst.to_string(),
                "--conns",
                "125",
                "--concurrency",
                "125",
                "--bytes",
                "16384",
                "--hold",
            ];
            (dst, c.testpod(&args).await.unwrap())
        }
    });
    for (dst, report) in futures_join_all(runs).await {
        assert_eq!(n(&report, &["ok"]), 125, "{report}");
        assert_eq!(n(&report, &["failed"]), 0, "{report}");
        assert_eq!(
            strs(&report, "peer_addrs"),
            vec![dst.to_string()],
            "{report}"
        );
    }
    let c = cluster.nodes[0].counters().await.unwrap();
    let redirected =
        n(&c, &["ebpf", "connect4", "redirected"]) + n(&c, &["ebpf", "connect6", "redirected"]);
    assert_eq!(redirected, 500, "{c}");
    assert_eq!(n(&c, &["proxy", "relayed"]), 500, "{c}");
    assert_eq!(n(&c, &["proxy", "bytes_from_client"]), 500 * 16384, "{c}");
}

async fn futures_join_all<F>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn enrolled_pods_fail_closed_while_the_proxy_is_down_and_recover_on_restart() {
    require_root();
    let Pair {
        mut cluster,
        client,
        server,
        server_process: _server,
    } = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .start_pair(PORT)
        .await
        .unwrap();
    let dst = server.addr(false, PORT);
    assert_delivered(
        &client.client(dst, 2, 512).await.unwrap(),
        2,
        dst,
        &client.ipv4.to_string(),
    );

    for crash in [false, true] {
        if crash {
            cluster.kill_node(0).await.unwrap();
        } else {
            let status = cluster.stop_node(0).await.unwrap();
            assert!(status.success(), "graceful stop exits 0: {status}");
        }
        // Still redirected, to a proxy that is not there: refused at once, never sent directly.
        for dst in [dst, server.addr(true, PORT)] {
            let report = client.client(dst, 3, 512).await.unwrap();
            assert_eq!(
                n(&report, &["ok"]),
                0,
                "bypassed the mesh while the proxy was down: {report}"
            );
            assert_eq!(n(&report, &["failed"]), 3, "{report}");
            for e in strs(&report, "errors") {
                assert!(
                    e.contains("Connection refused"),
                    "expected a fast refusal, got {e}"
                );
            }
        }
        // Back without re-enrolling: the pinned programs and enrollment map carried over, and
        // the restarted proxy still knows the pod's name.
        cluster.start_node(0).await.unwrap();
        let before = relays(&cluster, 0, &client, dst);
        assert_delivered(
            &client.client(dst, 2, 512).await.unwrap(),
            2,
            dst,
            &client.ipv4.to_string(),
        );
        assert_eq!(relays(&cluster, 0, &client, dst), before + 2);
    }
}

#[tokio::test]
async fn loopback_excluded_ports_and_excluded_cidrs_are_left_alone() {
    require_root();
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .node_args(&[
            "--exclude-ports",
            "9090",
            "--exclude-cidrs",
            "10.101.2.0/24,fd00:101:2::/64",
        ])
        .start()
        .await
        .unwrap();
    let client = cluster.pod(0, 0).clone();
    let plain = cluster.pod(1, 0).clone();
    let excluded_net = cluster.pod(1, 1).clone();
    let _a = plain.serve(PORT, false).await.unwrap();
    let _b = plain.serve(9090, false).await.unwrap();
    let _c = excluded_net.serve(PORT, false).await.unwrap();
    let _d = client.serve(7000, false).await.unwrap();
    cluster.enroll(&client).await.unwrap();
    let me = client.ipv4.to_string();

    let direct = [
        (plain.addr(false, 9090), me.clone()),
        (excluded_net.addr(false, PORT), me.clone()),
        (excluded_net.addr(true, PORT), client.ipv6.to_string()),
        ("127.0.0.1:7000".parse().unwrap(), "127.0.0.1".to_string()),
        ("[::1]:7000".parse().unwrap(), "::1".to_string()),
    ];
    for (dst, peer) in &direct {
        assert_delivered(&client.client(*dst, 2, 256).await.unwrap(), 2, *dst, peer);
    }
    let dst = plain.addr(false, PORT);
    assert_delivered(
        &client.client(dst, 2, 256).await.unwrap(),
        2,
        dst,
        &client.ipv4.to_string(),
    );

    let c = cluster.nodes[0].counters().await.unwrap();
    assert_eq!(n(&c, &["ebpf", "connect4", "skip_excluded_port"]), 2, "{c}");
    assert_eq!(n(&c, &["ebpf", "connect4", "skip_excluded_cidr"]), 2, "{c}");
    assert_eq!(n(&c, &["ebpf", "connect6", "skip_excluded_cidr"]), 2, "{c}");
    assert_eq!(n(&c, &["ebpf", "connect4", "skip_loopback"]), 2, "{c}");
    assert_eq!(n(&c, &["ebpf", "connect6", "skip_loopback"]), 2, "{c}");
    assert_eq!(n(&c, &["ebpf", "connect4", "redirected"]), 2, "{c}");
}

#[tokio::test]
async fn the_node_namespace_cannot_be_enrolled_and_bad_requests_name_the_field() {
    require_root();
    let cluster = ClusterBuilder::new()
        .nodes(1)
        .pods_per_node(1)
        .start()
        .await
        .unwrap();
    let node = &cluster.nodes[0];
    let own = format!("{{\"netns\":\"/run/netns/{}\"}}", node.netns);
    let (status, body) = node
        .admin("PUT", "/v1/pods/default/proxy", Some(&own))
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("node proxy's own network namespace"),
        "{body}"
    );

    let (status, body) = node
        .admin(
            "PUT",
            "/v1/pods/Bad_NS/x",
            Some(r#"{"netns":"/proc/self/ns/net"}"#),
        )
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("invalid namespace"),
        "{body}"
    );

    let (status, body) = node
        .admin(
            "PUT",
            "/v1/pods/default/x",
            Some(r#"{"netns":"/nonexistent"}"#),
        )
        .await
        .unwrap();
    assert_eq!(status, 422);
    assert!(
        body["error"].as_str().unwrap().contains("No such file"),
        "{body}"
    );

    let (status, _) = node
        .admin("DELETE", "/v1/pods/default/never-enrolled", None)
        .await
        .unwrap();
    assert_eq!(status, 404);
}

#[tokio::test]
async fn on_exit_detach_removes_redirection() {
    require_root();
    let Pair {
        mut cluster,
        client,
        server,
        server_process: _server,
    } = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .node_args(&["--on-exit", "detach"])
        .start_pair(PORT)
        .await
        .unwrap();
    let dst = server.addr(false, PORT);
    assert_delivered(
        &client.client(dst, 1, 64).await.unwrap(),
        1,
        dst,
        &client.ipv4.to_string(),
    );
    assert_eq!(relays(&cluster, 0, &client, dst), 1, "not relayed");
    let pin_dir = std::path::Path::new("/sys/fs/bpf/mesh").join(&cluster.nodes[0].name);
    assert!(pin_dir.join("links").exists());

    assert!(cluster.stop_node(0).await.unwrap().success());
    assert!(!pin_dir.exists(), "pins left behind after --on-exit detach");
    assert_delivered(
        &client.client(dst, 1, 64).await.unwrap(),
        1,
        dst,
        &client.ipv4.to_string(),
    );
}

#[tokio::test]
async fn sigterm_drains_open_connections_then_cuts_them_at_the_deadline() {
    require_root();
    // The harness starts mesh-node with --drain-timeout 2s.
    let Pair {
        mut cluster,
        client,
        server,
        server_process: _server,
    } = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .start_pair(PORT)
        .await
        .unwrap();
    let dst = server.addr(false, PORT).to_string();

    // Three connections busy for 8 s: longer than the drain deadline.
    let busy = {
        let client = client.clone();
        let dst = dst.clone();
        tokio::spawn(async move {
            client
                .testpod(&["rr", "--to", &dst, "--duration-ms", "8000", "--conns", "3"])
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let started = std::time::Instant::now();
    let status = cluster.stop_node(0).await.unwrap();
    let took = started.elapsed();
    assert!(status.success(), "{status}");
    let result = busy.await.unwrap();
    assert!(
        result.is_err(),
        "connections outlived the drain deadline: {result:?}"
    );
    // Waited for the deadline rather than cutting at once (loose bounds: not a timing test).
    assert!(
        took >= std::time::Duration::from_millis(1500),
        "exited after {took:?}, before the deadline"
    );
    let drained: Vec<Value> = cluster.nodes[0]
        .log_records()
        .into_iter()
        .filter(|r| r["fields"]["message"] == "drained")
        .collect();
    assert_eq!(drained.len(), 1);
    assert_eq!(drained[0]["fields"]["outcome"], "Forced(3)", "{drained:?}");

    // A connection that ends within the deadline drains gracefully.
    cluster.start_node(0).await.unwrap();
    let short = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .testpod(&["rr", "--to", &dst, "--duration-ms", "1000", "--conns", "2"])
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(cluster.stop_node(0).await.unwrap().success());
    let report = short.await.unwrap().unwrap();
    assert!(n(&report, &["requests"]) > 0, "{report}");
    let last = cluster.nodes[0]
        .log_records()
        .into_iter()
        .rfind(|r| r["fields"]["message"] == "drained")
        .unwrap();
    assert_eq!(last["fields"]["outcome"], "Graceful", "{last}");
}

/// Program ids attached to `cgroup` (bpftool), sorted: what redirects that cgroup's pods now.
fn attached(cgroup: &std::path::Path) -> Vec<u64> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    assert!(out.status.success(), "bpftool: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    let mut ids: Vec<u64> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    ids.sort();
    ids
}

/// A start that fails changes nothing in the kernel: nothing attached after a failed first
/// start, the running generation's programs untouched after a failed restart (enrolled pods stay
/// failed closed, as with no proxy at all); with `--on-exit detach`, a failed start detaches, as
/// any exit of such a proxy does.
#[tokio::test]
async fn a_start_that_fails_leaves_the_kernel_as_it_found_it() {
    require_root();
    let mut cluster = ClusterBuilder::new()
        .nodes(1)
        .pods_per_node(2)
        .without_node_proxies()
        .start()
        .await
        .unwrap();
    let cgroup = cluster.nodes[0].pods_cgroup.clone();
    let pin_dir = std::path::Path::new("/sys/fs/bpf/mesh").join(&cluster.nodes[0].name);
    // Something else holds the admin address (without SO_REUSEPORT): mesh-node cannot bind it.
    let squat = |cluster: &Cluster| {
        let mut cmd = cluster.nodes[0]
            .command(mesh_tests::find_bin("mesh-testpod").unwrap())
            .unwrap();
        cmd.args(["serve", "--listen", "127.0.0.1:15000"]);
        cmd.spawn().unwrap()
    };
    let squatter = squat(&cluster);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let e = cluster.start_node(0).await.unwrap_err();
    assert!(format!("{e:#}").contains("admin endpoint"), "{e:#}");
    assert_eq!(
        attached(&cgroup),
        Vec::<u64>::new(),
        "a failed first start attached programs"
    );
    assert!(
        !pin_dir.join("links").exists()
            || std::fs::read_dir(pin_dir.join("links"))
                .unwrap()
                .next()
                .is_none(),
        "a failed first start pinned links"
    );
    drop(squatter);

    // A working generation, with a pod enrolled; it exits keeping its programs (fail closed).
    cluster.start_node(0).await.unwrap();
    let (client, server) = (cluster.pod(0, 0).clone(), cluster.pod(0, 1).clone());
    let _srv = server.serve(PORT, false).await.unwrap();
    cluster.enroll(&client).await.unwrap();
    cluster.enroll(&server).await.unwrap();
    let dst = server.addr(false, PORT);
    assert_eq!(n(&client.client(dst, 1, 64).await.unwrap(), &["ok"]), 1);
    let running = attached(&cgroup);
    assert_eq!(
        running.len(),
        7,
        "connect4/6, getpeername4/6, sock_ops, sock_release, ingress: {running:?}"
    );
    assert!(cluster.stop_node(0).await.unwrap().success());
    assert_eq!(attached(&cgroup), running);

    // A restart that fails leaves exactly those programs: the pod stays failed closed.
    let squatter = squat(&cluster);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    cluster.start_node(0).await.unwrap_err();
    assert_eq!(
        attached(&cgroup),
        running,
        "a failed restart changed the attached programs"
    );
    assert_eq!(
        n(&client.client(dst, 1, 64).await.unwrap(), &["ok"]),
        0,
        "an enrolled pod bypassed the mesh after a failed restart"
    );

    // With --on-exit detach, a failed start detaches: pods talk directly.
    cluster.nodes[0].set_args(&["--on-exit", "detach"]);
    cluster.start_node(0).await.unwrap_err();
    drop(squatter);
    assert_eq!(
        attached(&cgroup),
        Vec::<u64>::new(),
        "--on-exit detach left programs"
    );
    assert!(!pin_dir.exists(), "--on-exit detach left pins");
    assert_delivered(
        &client.client(dst, 1, 64).await.unwrap(),
        1,
        dst,
        &client.ipv4.to_string(),
    );
}

/// Entries of a pinned map of node 0 (bpftool).
fn map_entries(cluster: &Cluster, map: &str) -> usize {
    let pin = std::path::Path::new("/sys/fs/bpf/mesh")
        .join(&cluster.nodes[0].name)
        .join("maps")
        .join(map);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&pin)
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "bpftool map dump {}: {out:?}",
        pin.display()
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    v.as_array().map_or(0, Vec::len)
}

/// The record map is shared by every pod of the node. Connections that never complete (refused
/// while the proxy is away, or abandoned mid-handshake) must leave no record behind, or one pod
/// could fill the map and push out other pods' records.
#[tokio::test]
async fn connects_that_never_complete_leave_no_records_behind() {
    require_root();
    let mut cluster = ClusterBuilder::new()
        .nodes(1)
        .pods_per_node(2)
        .start()
        .await
        .unwrap();
    let (client, server) = (cluster.pod(0, 0).clone(), cluster.pod(0, 1).clone());
    let _s = server.serve(PORT, false).await.unwrap();
    cluster.enroll(&client).await.unwrap();
    assert_eq!(
        n(
            &client
                .client(server.addr(false, PORT), 1, 64)
                .await
                .unwrap(),
            &["ok"]
        ),
        1
    );
    assert!(cluster.stop_node(0).await.unwrap().success());
    let before = map_entries(&cluster, "MESH_ORIG_CK");
    let r = client
        .testpod(&[
            "--connect-timeout-ms",
            "500",
            "client",
            "--to",
            &server.addr(false, PORT).to_string(),
            "--conns",
            "300",
            "--bytes",
            "1",
        ])
        .await
        .unwrap();
    assert_eq!(n(&r, &["ok"]), 0, "bypassed the mesh: {r}");
    let after = map_entries(&cluster, "MESH_ORIG_CK");
    assert!(
        after <= before + 5,
        "300 refused connects left {} records behind",
        after - before
    );
}

/// What a hostile pod would do to the record maps every pod of the node shares: hold sockets whose
/// connects never send a SYN (no local port left: the redirect program ran, TCP never started).
/// Their records must go with the sockets, a pod may hold only its share of them, and once it
/// lets go its count is back to nothing (it connects again), while its neighbour is never refused.
#[tokio::test]
async fn a_pod_holds_only_its_share_of_the_record_maps() {
    require_root();
    const SHARE: u64 = 64;
    let cluster = ClusterBuilder::new()
        .nodes(1)
        .pods_per_node(3)
        .node_args(&["--max-connections-per-pod", &SHARE.to_string()])
        .start()
        .await
        .unwrap();
    let (hostile, client, server) = (
        cluster.pod(0, 0).clone(),
        cluster.pod(0, 1).clone(),
        cluster.pod(0, 2).clone(),
    );
    let _s = server.serve(PORT, false).await.unwrap();
    for p in [&hostile, &client] {
        cluster.enroll(p).await.unwrap();
    }
    let dst = server.addr(false, PORT);
    let dst_arg = dst.to_string();
    let before = map_entries(&cluster, "MESH_ORIG_CK");

    // Connect and close at once: not one record may stay behind.
    let r = hostile
        .testpod(&["hog", "--to", &dst_arg, "--connects", "500"])
        .await
        .unwrap();
    assert_eq!(n(&r, &["outcomes", "EADDRNOTAVAIL"]), 500, "{r}");
    let left = map_entries(&cluster, "MESH_ORIG_CK");
    assert!(
        left <= before + 5,
        "500 connects that never sent a SYN left {} records behind",
        left - before
    );

    // Hold them: the pod gets its share, the rest is refused at connect.
    let mut hog = hostile
        .command(mesh_tests::find_bin("mesh-testpod").unwrap())
        .unwrap();
    hog.args(["hog", "--to", &dst_arg, "--connects", "500", "--hold"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut hog = hog.spawn().unwrap();
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(
        &mut tokio::io::BufReader::new(hog.stdout.take().unwrap()),
        &mut line,
    )
    .await
    .unwrap();
    let r: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let taken = n(&r, &["outcomes", "EADDRNOTAVAIL"]);
    assert!(
        (SHARE..=SHARE + 2).contains(&taken),
        "a pod allowed {SHARE} held {taken} redirected sockets: {r}"
    );
    assert_eq!(taken + n(&r, &["outcomes", "EPERM"]), 500, "{r}");
    let held = map_entries(&cluster, "MESH_ORIG_CK");
    assert!(
        held <= before + SHARE as usize + 5,
        "one pod holds {} records",
        held - before
    );
    assert_eq!(n(&client.client(dst, 5, 64).await.unwrap(), &["ok"]), 5);

    // Let go: its records go, and nothing of the count is left to refuse it.
    drop(hog.stdin.take());
    assert!(hog.wait().await.unwrap().success());
    let after = map_entries(&cluster, "MESH_ORIG_CK");
    assert!(
        after <= before + 5,
        "{} records outlived their sockets",
        after - before
    );
    let r = hostile
        .testpod(&[
            "client",
            "--to",
            &dst_arg,
            "--conns",
            &SHARE.to_string(),
            "--concurrency",
            &SHARE.to_string(),
            "--hold",
            "--bytes",
            "16",
        ])
        .await
        .unwrap();
    assert_eq!(
        n(&r, &["ok"]),
        SHARE,
        "the pod is refused after letting go: {r}"
    );
    // Pod ids are never reused: a departed pod's count goes, or the counts would fill up.
    assert_eq!(map_entries(&cluster, "MESH_POD_HELD"), 2);
    cluster.unenroll(&hostile).await.unwrap();
    assert_eq!(map_entries(&cluster, "MESH_POD_HELD"), 1);
}

/// A delivery the proxy gives up on (its connect times out) leaves no mark behind: a mark would
/// admit, as mesh traffic, whoever binds the same address and port next.
#[tokio::test]
async fn an_abandoned_delivery_leaves_no_mark_behind() {
    require_root();
    let cluster = ClusterBuilder::new()
        .nodes(1)
        .pods_per_node(2)
        .node_args(&["--connect-timeout", "1s"])
        .with_controller()
        .start()
        .await
        .unwrap();
    let (client, server) = (cluster.pod(0, 0).clone(), cluster.pod(0, 1).clone());
    let _s = server.serve(PORT, false).await.unwrap();
    for p in [&client, &server] {
        cluster.enroll(p).await.unwrap();
    }
    let dst = server.addr(false, PORT);
    assert_eq!(n(&client.client(dst, 1, 64).await.unwrap(), &["ok"]), 1);
    // The server's answers to the node proxy go nowhere: the proxy's connect times out.
    let node_ip = format!("{}/32", cluster.nodes[0].ipv4);
    let s = std::process::Command::new("ip")
        .args(["-n", &server.netns, "route", "add", "blackhole", &node_ip])
        .status()
        .unwrap();
    assert!(s.success());
    let r = client
        .testpod(&[
            "client",
            "--to",
            &dst.to_string(),
            "--conns",
            "3",
            "--bytes",
            "1",
        ])
        .await
        .unwrap();
    assert_eq!(n(&r, &["ok"]), 0, "{r}");
    assert_eq!(
        map_entries(&cluster, "MESH_DELIVERIES"),
        0,
        "abandoned deliveries stayed marked"
    );
}
