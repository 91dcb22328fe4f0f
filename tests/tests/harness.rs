//! The cluster in a box itself: isolation between clusters and cleanup after a panic.
use std::path::Path;

use mesh_tests::ClusterBuilder;

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[test]
fn a_panicking_test_still_tears_its_cluster_down() {
    // The cluster lives and panics on its own runtime thread; unwinding must run the teardown.
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let cluster = ClusterBuilder::new()
                .nodes(1)
                .pods_per_node(1)
                .start()
                .await
                .unwrap();
            tx.send((
                cluster.nodes[0].netns.clone(),
                cluster.pod(0, 0).cgroup.clone(),
                cluster.nodes[0].name.clone(),
            ))
            .unwrap();
            panic!("deliberate failure inside a test");
        })
    })
    .join();
    assert!(result.is_err(), "the thread was meant to panic");
    let (netns, cgroup, node) = rx.recv().unwrap();
    assert!(!netns_exists(&netns), "{netns} left behind");
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    assert!(
        !Path::new("/sys/fs/bpf/mesh").join(&node).exists(),
        "pinned state of {node} left behind"
    );
}

#[tokio::test]
async fn kernel_program_logs_reach_the_node_log() {
    let pair = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .node_args(&["--ebpf-log-level", "debug"])
        .log_filter("info,mesh_ebpf=debug")
        .start_pair(8080)
        .await
        .unwrap();
    let (cluster, server) = (&pair.cluster, &pair.server);
    pair.client
        .client(server.addr(false, 8080), 1, 16)
        .await
        .unwrap();
    let expected = format!("connect4 redirected {}:8080", server.ipv4);
    // The ring buffer is read asynchronously: give the reader a moment.
    for _ in 0..50 {
        if cluster.nodes[0]
            .log_records()
            .iter()
            .any(|r| r["fields"]["message"] == expected.as_str())
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "no aya-log record {expected:?} in:\n{}",
        cluster.nodes[0].log_tail(20)
    );
}
