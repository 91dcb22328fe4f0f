//! The admission half of fail-closed enrollment, with the real `mesh-cni` plugin run as a
//! container runtime would (CNI_COMMAND, CNI_NETNS, CNI_ARGS, the network config on stdin): a pod
//! of a mesh namespace cannot start while its node proxy is down; it starts, redirected, once the
//! proxy is back. Pods of excluded namespaces start regardless.
use std::process::Stdio;

use mesh_tests::{ClusterBuilder, Node, Pod, cluster::find_bin};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

const PORT: u16 = 8080;

/// `CNI_COMMAND=ADD` for `pod` (in `namespace`) on `node`; the exit status and the JSON printed.
async fn cni_add(node: &Node, pod: &Pod, namespace: &str) -> (bool, Value) {
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "mesh-cni",
        "stateDir": format!("/run/mesh-node/{}", node.name),
        "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}]},
    });
    let mut child = node
        .command(find_bin("mesh-cni").unwrap())
        .unwrap()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", format!("/run/netns/{}", pod.netns))
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={}",
                pod.name
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(conf.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), v)
}

#[tokio::test]
async fn pods_of_mesh_namespaces_wait_for_their_node_proxy() {
    let mut cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .config_stream()
        .start()
        .await
        .unwrap();
    let (old, new) = (cluster.pod(0, 0).clone(), cluster.pod(0, 1).clone());
    let server = cluster.pod(1, 0).clone();
    let _s = server.serve(PORT, false).await.unwrap();
    cluster.enroll(&server).await.unwrap();
    let ns = old.namespace.clone();

    // With the proxy up, ADD registers the sandbox and the pod is redirected.
    let (ok, out) = cni_add(&cluster.nodes[0], &old, &ns).await;
    assert!(ok, "{out}");
    assert_eq!(
        out["interfaces"][0]["name"], "eth0",
        "prevResult passed on: {out}"
    );
    let r = old.client(server.addr(false, PORT), 2, 512).await.unwrap();
    assert_eq!(r["ok"], 2, "{r}");
    assert!(
        r["hellos"]
            .to_string()
            .contains(&cluster.nodes[1].ipv4.to_string()),
        "through the mesh: {r}"
    );

    // The proxy is down: a new pod of the mesh namespace is refused ("try again later").
    cluster.stop_node(0).await.unwrap();
    let (ok, out) = cni_add(&cluster.nodes[0], &new, &ns).await;
    assert!(!ok, "must not start: {out}");
    assert_eq!(out["code"], 11, "{out}");
    assert!(
        out["msg"]
            .as_str()
            .unwrap()
            .contains("namespace is in the mesh"),
        "{out}"
    );
    // ... while a pod of an excluded namespace starts.
    let (ok, out) = cni_add(&cluster.nodes[0], &new, "kube-system").await;
    assert!(ok, "{out}");

    // The proxy is back: the kubelet's retry succeeds and the new pod is in the mesh.
    cluster.start_node(0).await.unwrap();
    let (ok, out) = cni_add(&cluster.nodes[0], &new, &ns).await;
    assert!(ok, "{out}");
    let r = new.client(server.addr(false, PORT), 2, 512).await.unwrap();
    assert_eq!(r["ok"], 2, "{r}");
    assert!(
        r["hellos"]
            .to_string()
            .contains(&cluster.nodes[1].ipv4.to_string()),
        "through the mesh: {r}"
    );
}
