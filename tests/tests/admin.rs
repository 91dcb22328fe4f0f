//! The node proxy's admin port as an operator uses it on a live node.
use mesh_tests::ClusterBuilder;

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
