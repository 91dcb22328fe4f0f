//! The dashboards against a real Prometheus: Debian's `prometheus` scrapes the node proxies'
//! metrics listeners and the controller in the cluster in a box while traffic flows, and every
//! panel's PromQL expression in every dashboard under `manifests/dashboards/` must return data.
use std::{path::PathBuf, process::Stdio, time::Duration};

use mesh_tests::ClusterBuilder;
use serde_json::Value;

const PORT: u16 = 8080;
const HTTP_PORT: u16 = 8081;
const METRICS_PORT: u16 = 15020;
const PROMETHEUS: &str = "127.0.0.1:9090";

/// Every panel expression of every dashboard: (dashboard, panel title, expr).
fn panels() -> Vec<(String, String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/dashboards");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let d: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                // Template variables at their "All" value.
                let expr = t["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$namespace", ".*")
                    .replace("$workload", ".*");
                out.push((
                    d["title"].as_str().unwrap().to_string(),
                    p["title"].as_str().unwrap().to_string(),
                    expr,
                ));
            }
        }
    }
    assert!(out.len() >= 10, "dashboards have panels: {out:?}");
    out
}

#[tokio::test]
async fn every_dashboard_panel_returns_data_from_a_real_prometheus() {
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .config_stream()
        .node_args(&["--metrics-addr", &format!("0.0.0.0:{METRICS_PORT}")])
        .start()
        .await
        .unwrap();
    let (client, outsider, server) = (
        cluster.pod(0, 0).clone(),
        cluster.pod(0, 1).clone(),
        cluster.pod(1, 0).clone(),
    );
    let _s = server.serve(PORT, false).await.unwrap();
    let _h = server.serve_http(HTTP_PORT).await.unwrap();
    cluster.enroll(&client).await.unwrap();
    cluster.enroll(&server).await.unwrap();
    // The HTTP port is declared (a Service selecting the server): a test client slowed down by a
    // loaded machine must not be taken for TCP by detection, whose DENY rule on a path would then
    // refuse its whole connection.
    cluster
        .label_pods(&[&server], serde_json::json!({"app": "server"}))
        .await
        .unwrap();
    // Something to count on every panel: allowed and denied connections, plaintext from outside.
    let deny = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: {ns}}}\nspec:\n  clusterIP: 10.96.0.90\n  selector: {{app: server}}\n  ports: [{{name: http, port: 80, targetPort: {HTTP_PORT}}}]\n---\napiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-outsider, namespace: {ns}}}\nspec:\n  action: DENY\n  rules:\n  - {{from: [{{principals: ['spiffe://cluster.local/ns/{ns}/sa/nobody']}}]}}\n  - {{to: [{{ports: [{HTTP_PORT}], paths: [/forbidden]}}]}}\n",
        ns = server.namespace
    );
    cluster
        .change_config("authz.yaml", Some(&deny))
        .await
        .unwrap();

    let ctrl = cluster.ctrl.as_ref().unwrap();
    let dir = cluster.dir.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let targets: Vec<String> = (0..cluster.nodes.len())
        .map(|i| format!("'10.250.0.{}:{METRICS_PORT}'", i + 1))
        .collect();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n- job_name: mesh-node\n  static_configs: [{{targets: [{}]}}]\n- job_name: mesh-ctrl\n  static_configs: [{{targets: ['127.0.0.1:15014']}}]\n",
        targets.join(", ")
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let _prometheus = tokio::process::Command::new("ip")
        .args(["netns", "exec", &ctrl.netns, "prometheus"])
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (installed by cargo xtask test)");

    // Traffic while Prometheus scrapes.
    let traffic = async {
        for _ in 0..6 {
            let r = client
                .client(server.addr(false, PORT), 4, 1024)
                .await
                .unwrap();
            assert_eq!(r["ok"], 4, "{r}");
            let _ = outsider
                .client(server.addr(false, PORT), 1, 64)
                .await
                .unwrap();
            // HTTP: answered, failing (5xx) and denied requests.
            let to = server.addr(false, HTTP_PORT).to_string();
            for (path, count) in [("/", "20"), ("/status/503", "3"), ("/forbidden", "3")] {
                let r = client
                    .testpod(&["get", "--to", &to, "--path", path, "--count", count])
                    .await
                    .unwrap();
                assert!(r["errors"].as_object().unwrap().is_empty(), "{r}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    traffic.await;

    let query = |expr: String| async move {
        let path = format!(
            "/api/v1/query?query={}",
            mesh_ctrl::cli::remote::encode(&expr)
        );
        ctrl.get(PROMETHEUS.parse().unwrap(), &path).await
    };
    // Every target up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let up = query("sum(up)".into()).await.ok().and_then(|(_, v)| {
            v["data"]["result"][0]["value"][1]
                .as_str()
                .map(String::from)
        });
        if up.as_deref() == Some("3") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "targets not up ({up:?}): {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (dashboard, title, expr) in panels() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, v) = query(expr.clone()).await.unwrap();
            assert_eq!(status, 200, "{dashboard} / {title}: {expr}: {v}");
            assert_eq!(v["status"], "success", "{dashboard} / {title}: {expr}: {v}");
            if v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{dashboard} / {title}: no data for {expr}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
