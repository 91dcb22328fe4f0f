//! Proxy generations hand their listening sockets over by descriptor, so nothing else on the node
//! can bind beside the proxy (no `SO_REUSEPORT`), and an upgrade refuses no connect.
use std::net::{IpAddr, SocketAddr};

use mesh_tests::{ClusterBuilder, n};

const PORT: u16 = 8080;

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
    let mut cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .with_controller()
        .start()
        .await
        .unwrap();
    let (client, server) = (cluster.pod(0, 0).clone(), cluster.pod(1, 0).clone());
    let _srv = server.serve(PORT, false).await.unwrap();
    for p in [&client, &server] {
        cluster.enroll(p).await.unwrap();
    }
    let dst = server.addr(false, PORT);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Short connections, one batch after another, through the client node's proxy for its whole
    // upgrade. (The server node's side needs its tunnel connections to send GOAWAY as it drains,
    // so peers move to the new generation: the upgrade issue.)
    let load = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed, mut errors) = (0, 0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client.client(dst, 10, 64).await.unwrap();
                ok += n(&r, &["ok"]);
                failed += n(&r, &["failed"]);
                if n(&r, &["failed"]) > 0 {
                    errors.push(r["errors"].clone());
                }
            }
            (ok, failed, errors)
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for _ in 0..2 {
        let status = cluster.upgrade_node(0).await.unwrap();
        assert!(status.success(), "the old generation: {status}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed, errors) = load.await.unwrap();
    assert_eq!(
        failed, 0,
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
