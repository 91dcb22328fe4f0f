//! Identity and the mTLS tunnel between node proxies, end to end on the real kernel with a real
//! mesh-ctrl: certificates, HBONE, inbound checks, refusals, rotation, controller outages.
use std::net::SocketAddr;

use mesh_tests::{ClusterBuilder, Pair, Pod, n};
use serde_json::Value;

const PORT: u16 = 8080;

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

    for v6 in [false, true] {
        let dst = server.addr(v6, PORT);
        let report = client.client(dst, 4, 8192).await.unwrap();
        assert_all_ok(&report, 4);
        assert_eq!(report["peer_addrs"][0], dst.to_string(), "{report}");
        // Delivered by node 1's proxy, from its proxy address, to the original destination.
        let via = if v6 {
            cluster.nodes[1].ipv6.to_string()
        } else {
            cluster.nodes[1].ipv4.to_string()
        };
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
    let mut cluster = ClusterBuilder::new()
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
    // Same node: delivered locally by node 0's proxy (from its address), no tunnel.
    assert_eq!(
        server_saw(&report),
        format!(
            "HELLO peer={} local={}",
            cluster.nodes[0].ipv4,
            near.addr(false, PORT)
        )
    );
    assert_all_ok(
        &client.client(far.addr(false, PORT), 2, 64).await.unwrap(),
        2,
    );
    let c0 = cluster.nodes[0].counters().await.unwrap();
    assert_eq!(n(&c0, &["proxy", "delivered_local"]), 2, "{c0}");
    assert_eq!(n(&c0, &["proxy", "tunneled"]), 2, "{c0}");

    // A restarted node proxy knows its enrolled pods again (from its state) and keeps delivering.
    cluster.stop_node(0).await.unwrap();
    cluster.start_node(0).await.unwrap();
    assert_all_ok(
        &client.client(near.addr(false, PORT), 2, 64).await.unwrap(),
        2,
    );
    let c0 = cluster.nodes[0].counters().await.unwrap();
    assert_eq!(n(&c0, &["proxy", "delivered_local"]), 2, "{c0}");
    assert_eq!(n(&c0, &["proxy", "refused_local_not_enrolled"]), 0, "{c0}");
}

/// Captures everything on node 0's link to the fabric while `client` talks to `dst`.
async fn capture_node0_link(
    cluster: &mesh_tests::Cluster,
    client: &Pod,
    dst: SocketAddr,
    text: &str,
) -> (Vec<u8>, String) {
    let pcap = cluster.dir.join("fab0.pcap");
    let mut tcpdump = cluster.nodes[0]
        .command("tcpdump")
        .unwrap()
        .args(["-i", "fab0", "-U", "-n", "-s", "0", "-w"])
        .arg(&pcap)
        .arg("tcp")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tcpdump (installed by cargo xtask setup)");
    // tcpdump says "listening on" once the capture is live.
    let mut err = tokio::io::BufReader::new(tcpdump.stderr.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut err, &mut line)
        .await
        .unwrap();
    assert!(line.contains("listening on"), "tcpdump: {line}");
    let report = client
        .testpod(&[
            "client",
            "--to",
            &dst.to_string(),
            "--conns",
            "3",
            "--bytes",
            "65536",
            "--text",
            text,
        ])
        .await
        .unwrap();
    assert_all_ok(&report, 3);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    mesh_tests_kill(&tcpdump);
    let _ = tcpdump.wait().await;
    let bytes = std::fs::read(&pcap).unwrap();
    let out = std::process::Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(&pcap)
        .output()
        .unwrap();
    (bytes, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mesh_tests_kill(child: &tokio::process::Child) {
    let pid = child.id().expect("running");
    std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn the_node_to_node_link_carries_only_tls() {
    const SECRET: &str = "the-payload-must-never-cross-the-wire-in-clear;";
    // Control: without identities the proxy relays plain TCP, and the capture sees the payload.
    // This proves the capture below would catch a leak.
    let plain = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .start_pair(PORT)
        .await
        .unwrap();
    let (bytes, _) = capture_node0_link(
        &plain.cluster,
        &plain.client,
        plain.server.addr(false, PORT),
        SECRET,
    )
    .await;
    assert!(
        contains(&bytes, SECRET.as_bytes()),
        "control capture missed the plaintext payload"
    );
    drop(plain);

    let Pair {
        cluster,
        client,
        server,
        server_process: _s,
    } = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .with_controller()
        .start_pair(PORT)
        .await
        .unwrap();
    for v6 in [false, true] {
        let dst = server.addr(v6, PORT);
        let (bytes, summary) = capture_node0_link(&cluster, &client, dst, SECRET).await;
        assert!(
            !contains(&bytes, SECRET.as_bytes()),
            "payload seen in clear on the node link ({dst})"
        );
        // TLS 1.3 application-data records, and only tunnel connections between the nodes.
        assert!(
            contains(&bytes, &[0x17, 0x03, 0x03]),
            "no TLS records captured ({dst})"
        );
        let lines: Vec<&str> = summary.lines().collect();
        assert!(!lines.is_empty());
        let port = if v6 {
            "fd00:200:1::1.15008"
        } else {
            "10.200.1.1.15008"
        };
        for l in &lines {
            // The only other traffic is the node's own TLS channel to the controller.
            assert!(
                l.contains(port) || l.contains("10.250.0.254.15012"),
                "non-tunnel packet on the node link: {l}"
            );
        }
        assert!(
            lines.iter().any(|l| l.contains(port)),
            "no tunnel traffic captured ({dst})"
        );
    }
}
