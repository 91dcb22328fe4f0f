//! Prometheus metrics of the controller (`GET /metrics` on its admin endpoint). Every name, label
//! and help text is in this file; values are read from the store, the subscriptions and the
//! certificate service at scrape time.
use metrics::{Unit, counter, describe_counter, describe_gauge, gauge, with_local_recorder};
use metrics_exporter_prometheus::PrometheusBuilder;
use serde_json::Value;

fn describe() {
    describe_gauge!("mesh_ctrl_config_version", "Newest configuration version");
    describe_gauge!(
        "mesh_ctrl_config_resources",
        "Resources in the newest version"
    );
    describe_gauge!(
        "mesh_ctrl_rejected_objects",
        "Objects rejected by the last validation"
    );
    describe_gauge!("mesh_ctrl_nodes_connected", "Node proxies subscribed now");
    describe_gauge!(
        "mesh_ctrl_node_acked_version",
        "Configuration version each node last acknowledged"
    );
    describe_gauge!(
        "mesh_ctrl_node_push_latency_seconds",
        Unit::Seconds,
        "From publishing a version to the node's ack, for the last acknowledged version"
    );
    describe_counter!(
        "mesh_ctrl_certificates_total",
        "Workload certificate requests, by result (signed, refused)"
    );
    describe_counter!(
        "mesh_ctrl_admin_connections_refused_total",
        "Admin or metrics connections closed at accept: the listener was serving its maximum"
    );
    describe_gauge!(
        "mesh_ctrl_certificates_expiring",
        "Issued certificates with less than a quarter of their lifetime left (renewal failing)"
    );
}

/// Renders the controller's status (as `/v1/status` shows it) and certificate counters.
pub fn render(status: &Value, signed: u64, refused: u64) -> String {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    with_local_recorder(&recorder, || {
        describe();
        let n = |v: &Value| v.as_f64().unwrap_or(0.0);
        gauge!("mesh_ctrl_config_version").set(n(&status["version"]));
        gauge!("mesh_ctrl_config_resources").set(n(&status["resources"]));
        let count = |v: &Value| v.as_array().map_or(0.0, |a| a.len() as f64);
        gauge!("mesh_ctrl_rejected_objects").set(count(&status["rejected"]));
        gauge!("mesh_ctrl_certificates_expiring").set(count(&status["certificates_expiring"]));
        let mut connected = 0.0;
        for (node, s) in status["nodes"].as_object().into_iter().flatten() {
            if s["connected"] == true {
                connected += 1.0;
            }
            gauge!("mesh_ctrl_node_acked_version", "node" => node.clone())
                .set(n(&s["acked_version"]));
            if let Some(l) = s["push_latency_seconds"].as_f64() {
                gauge!("mesh_ctrl_node_push_latency_seconds", "node" => node.clone()).set(l);
            }
        }
        gauge!("mesh_ctrl_nodes_connected").set(connected);
        counter!("mesh_ctrl_certificates_total", "result" => "signed").absolute(signed);
        counter!("mesh_ctrl_certificates_total", "result" => "refused").absolute(refused);
        counter!("mesh_ctrl_admin_connections_refused_total")
            .absolute(status["admin_connections_refused"].as_u64().unwrap_or(0));
    });
    handle.render()
}
