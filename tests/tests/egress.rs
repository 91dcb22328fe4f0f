//! Traffic leaving the mesh leaves as the pod. A connection from an enrolled pod to something
//! that is not a mesh workload (the node itself, a metadata server, the internet) is opened by
//! the node proxy from a socket inside the pod's network namespace: it carries the pod's address
//! and meets the firewalls, egress rules and hop limits that apply to the pod, as it would
//! without the mesh. The proxy runs inside the cgroup its programs attach to, as the DaemonSet
//! does, so the test also shows its in-pod sockets are not redirected back to itself.
use std::net::{IpAddr, SocketAddr};

use mesh_tests::{ClusterBuilder, listen_in, n};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u16 = 7070;

/// Greets like `mesh-testpod serve` (`HELLO peer=.. local=..`), then echoes.
fn greet_and_echo(listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = listener.accept().await {
            tokio::spawn(async move {
                let local = s.local_addr().unwrap();
                let _ = s
                    .write_all(format!("HELLO peer={peer} local={local}\n").as_bytes())
                    .await;
                let mut buf = vec![0u8; 4096];
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 || s.write_all(&buf[..k]).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

fn nft(node: &mesh_tests::Node, script: &str) {
    let ns = format!("/run/netns/{}", node.netns);
    let out = std::process::Command::new("nsenter")
        .args([format!("--net={ns}").as_str(), "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(script.as_bytes())?;
            c.wait_with_output()
        })
        .expect("run nft");
    assert!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn passthrough_leaves_as_the_pod_and_meets_the_nodes_firewall() {
    let cluster = ClusterBuilder::new()
        .nodes(1)
        .pods_per_node(1)
        .proxy_under_pods()
        .with_controller()
        .start()
        .await
        .unwrap();
    let pod = cluster.pod(0, 0).clone();
    let node = &cluster.nodes[0];
    // Something outside the mesh: a service on the node's own address.
    let outside = |v6: bool| -> SocketAddr {
        let ip: IpAddr = if v6 {
            node.ipv6.into()
        } else {
            node.ipv4.into()
        };
        SocketAddr::new(ip, PORT)
    };
    let _servers: Vec<_> = [false, true]
        .into_iter()
        .map(|v6| greet_and_echo(listen_in(&node.netns, outside(v6)).unwrap()))
        .collect();
    cluster.enroll(&pod).await.unwrap();

    // The peer sees the pod's address, as it would without the mesh.
    for v6 in [false, true] {
        let r = pod.client(outside(v6), 2, 256).await.unwrap();
        assert_eq!(n(&r, &["ok"]), 2, "{r}");
        let seen = pod.addr(v6, 0).ip();
        let hello = format!("HELLO peer={seen} local={}", outside(v6));
        assert_eq!(r["hellos"][&hello], 2, "{r}");
    }
    let c = node.counters().await.unwrap();
    assert!(n(&c, &["ebpf", "connect4", "redirected"]) >= 2, "{c}");
    assert!(n(&c, &["ebpf", "connect4", "skip_egress"]) >= 2, "{c}");
    assert!(n(&c, &["ebpf", "connect6", "skip_egress"]) >= 2, "{c}");
    assert_eq!(n(&c, &["proxy", "refused_loop"]), 0, "{c}");

    // A node firewall rule against the pod's address applies to its passthrough connections.
    nft(
        node,
        &format!(
            "table inet meshtest {{\n chain input {{\n type filter hook input priority 0;\n \
             ip saddr {} tcp dport {PORT} drop\n ip6 saddr {} tcp dport {PORT} drop\n }}\n}}\n",
            pod.ipv4, pod.ipv6
        ),
    );
    for v6 in [false, true] {
        let r = pod
            .testpod(&[
                "--connect-timeout-ms",
                "1500",
                "client",
                "--to",
                &outside(v6).to_string(),
                "--conns",
                "1",
                "--bytes",
                "64",
            ])
            .await
            .unwrap();
        assert_eq!(
            n(&r, &["ok"]),
            0,
            "a firewall rule against the pod let its passthrough connection out: {r}"
        );
    }
}
