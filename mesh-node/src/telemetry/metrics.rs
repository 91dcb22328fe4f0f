//! Prometheus metrics of the node proxy (`GET /metrics` on the admin port). Every name, label and
//! help text is in this file.
//!
//! The data path keeps plain atomic counters; a scrape renders the same snapshot `/v1/counters`
//! shows into a fresh `metrics` recorder (absolute values), so the two can never disagree and the
//! data path pays nothing for metrics. Label values are bounded by what the node hosts (its pods,
//! their identities) and by fixed enumerations (programs, outcomes, reasons).
use metrics::{Unit, counter, describe_counter, describe_gauge, gauge, with_local_recorder};
use metrics_exporter_prometheus::PrometheusBuilder;
use serde_json::Value;

fn describe() {
    describe_counter!(
        "mesh_redirect_events_total",
        "Kernel program events, by program (connect4, connect6, sock_ops, getpeername, ingress, sk_msg) and outcome"
    );
    describe_gauge!(
        "mesh_kernel_feature",
        "1 when the start-up probe found the kernel feature (program type, map type, helper, BTF layout), by feature and need (required, optional); `mesh-node probe` says what each is for"
    );
    describe_gauge!(
        "mesh_kernel_inbound_method",
        "1 for how the inbound program finds the receiving pod on this kernel: helper (bpf_get_netns_cookie in cgroup_skb) or btf (read from the socket)"
    );
    describe_gauge!(
        "mesh_socket_acceleration_enabled",
        "1 when pods' bytes to this proxy may skip TCP/IP (socket acceleration is on and the kernel took it)"
    );
    describe_counter!(
        "mesh_socket_acceleration_sockets_total",
        "The proxy's ends of pod connections, by result: added to acceleration, or left on TCP"
    );
    describe_gauge!(
        "mesh_enrolled_pods",
        "Pods of this node the kernel redirects"
    );
    describe_counter!(
        "mesh_inbound_plaintext_connections_total",
        "Plaintext connections from outside the mesh accepted by a PERMISSIVE pod"
    );
    describe_counter!(
        "mesh_inbound_dropped_connections_total",
        "Plaintext connections from outside the mesh dropped in the kernel for a STRICT pod"
    );
    describe_counter!(
        "mesh_tcp_connections_accepted_total",
        "Redirected connections accepted by the outbound listener"
    );
    describe_counter!(
        "mesh_tcp_connections_total",
        "Outbound connections carried, by path (direct, local, tunnel)"
    );
    describe_counter!(
        "mesh_tcp_connections_refused_total",
        "Outbound connections refused or failed, by reason"
    );
    describe_gauge!(
        "mesh_tcp_active_connections",
        "Relayed connections open now"
    );
    describe_counter!(
        "mesh_tcp_bytes_total",
        Unit::Bytes,
        "Bytes relayed, by direction (from_client, to_client)"
    );
    describe_counter!(
        "mesh_service_connections_total",
        "Connections to a Service cluster IP sent to one of its endpoints"
    );
    describe_counter!(
        "mesh_tunnel_connections_total",
        "HTTP/2-over-mTLS connections between node proxies, by direction"
    );
    describe_counter!(
        "mesh_tunnel_streams_total",
        "CONNECT streams (one per carried connection), by direction"
    );
    describe_counter!(
        "mesh_tunnel_handshakes_refused_total",
        "TLS handshakes refused because of the peer's certificate, by direction and reason"
    );
    describe_counter!(
        "mesh_tunnel_inbound_refused_total",
        "Inbound tunnel streams refused, by reason"
    );
    describe_counter!(
        "mesh_authz_decisions_total",
        "Authorization decisions on delivered connections, by decision"
    );
    describe_counter!(
        "mesh_authz_policy_decisions_total",
        "Authorization decisions by deciding policy (none: no ALLOW policy applies; default: ALLOW policies apply and none allows), action (allow, deny, audit) and layer (tcp, http)"
    );
    describe_counter!(
        "mesh_authz_connections_closed_total",
        "Live connections closed because a new policy denies them"
    );
    describe_gauge!(
        "mesh_workload_certificate_expiry_seconds",
        Unit::Seconds,
        "Seconds until each workload certificate this node holds expires"
    );
    describe_counter!(
        "mesh_certificate_requests_total",
        "Workload certificate requests to the controller, by result (fetched, rotated, failed)"
    );
    describe_counter!(
        "mesh_certificates_restored_total",
        "Workload certificates this generation served from what an earlier one saved, without asking the controller"
    );
    describe_counter!(
        "mesh_requests_total",
        "HTTP/gRPC requests, by reporter (source or destination proxy), workloads, service, response code, gRPC status, response flag and connection security"
    );
    describe_counter!(
        "mesh_request_duration_seconds_bucket",
        "Request duration until the response head (gRPC with a status in trailers: until the trailers), cumulative histogram buckets (le)"
    );
    describe_counter!(
        "mesh_request_duration_seconds_count",
        "Requests in the duration histogram"
    );
    describe_gauge!(
        "mesh_request_duration_seconds_sum",
        Unit::Seconds,
        "Sum of request durations"
    );
    describe_counter!(
        "mesh_request_bytes_total",
        Unit::Bytes,
        "Request body bytes (Content-Length, or counted as the body streams)"
    );
    describe_counter!(
        "mesh_response_bytes_total",
        Unit::Bytes,
        "Response body bytes (Content-Length, or counted as the body streams)"
    );
    describe_counter!(
        "mesh_http_requests_denied_total",
        "HTTP requests denied by authorization on this node"
    );
    describe_counter!(
        "mesh_http_requests_rate_limited_total",
        "HTTP requests refused by a local rate limit on this node"
    );
    describe_counter!(
        "mesh_http_retries_total",
        "Request retries sent by this node (within the retry budget)"
    );
    describe_counter!(
        "mesh_http_pod_connections_total",
        "Connections this node's proxy opened to its pods for HTTP requests (pooled: far fewer than requests)"
    );
    describe_counter!(
        "mesh_http_connections_over_limit_total",
        "App connections to a Service refused by its circuit breaker's maxConnections"
    );
    describe_counter!(
        "mesh_limit_hits_total",
        "Times one of the proxy's limits was hit, by limit (tunnel_handshakes: the oldest handshake in progress cut; connections_per_pod, admin_connections: a connection refused; requests_per_pod: a request answered 503)"
    );
    describe_gauge!(
        "mesh_tunnel_handshakes_in_progress",
        "TLS handshakes in progress on the tunnel listener"
    );
    describe_gauge!("mesh_config_version", "Configuration version serving");
    describe_gauge!(
        "mesh_config_last_update_timestamp_seconds",
        Unit::Seconds,
        "When the serving configuration version was applied (Unix time; age = time() - this)"
    );
    describe_gauge!(
        "mesh_process_resident_memory_bytes",
        Unit::Bytes,
        "Resident memory of the node proxy"
    );
    describe_counter!(
        "mesh_process_cpu_seconds_total",
        Unit::Seconds,
        "CPU time of the node proxy, user and system (whole seconds)"
    );
    describe_gauge!(
        "mesh_process_open_fds",
        "Open file descriptors of the node proxy"
    );
    describe_gauge!("mesh_runtime_workers", "tokio worker threads");
    describe_gauge!(
        "mesh_runtime_alive_tasks",
        "tokio tasks alive (connections, streams, timers)"
    );
    describe_gauge!(
        "mesh_runtime_global_queue_depth",
        "tokio tasks waiting in the global queue (a sign of overload when it stays above 0)"
    );
    describe_gauge!(
        "mesh_config_connected",
        "1 while the configuration stream to the controller is up"
    );
    describe_counter!("mesh_config_updates_total", "Configuration updates applied");
    describe_counter!(
        "mesh_config_rejected_total",
        "Configuration updates rejected"
    );
    describe_counter!(
        "mesh_config_reconnects_total",
        "Reconnections of the configuration stream"
    );
    describe_gauge!(
        "mesh_upgrade_generation",
        "This proxy process's generation on the node: one more at each start, upgrade or restart"
    );
    describe_gauge!(
        "mesh_upgrade_listeners_taken_over",
        "Listening sockets this generation took over from the one before (0: it started alone, every connect in between was refused)"
    );
    describe_gauge!(
        "mesh_upgrade_previous_connections",
        "The previous generation's drain as it reported it, by outcome: open (when it began draining), cut (at its deadline)"
    );
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Upper bounds of the request duration histogram, in seconds.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Renders the `/v1/counters` snapshot (plus `config`, the stream's status) as Prometheus text.
pub fn render(snapshot: &Value) -> String {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    with_local_recorder(&recorder, || {
        describe();
        record(snapshot);
    });
    handle.render()
}

fn record(s: &Value) {
    for (program, outcomes) in s["ebpf"].as_object().into_iter().flatten() {
        for (outcome, v) in outcomes.as_object().into_iter().flatten() {
            counter!("mesh_redirect_events_total", "program" => program.clone(), "outcome" => outcome.clone())
                .absolute(n(v));
        }
    }
    gauge!("mesh_enrolled_pods").set(n(&s["enrolled_pods"]) as f64);
    let u = &s["upgrade"];
    gauge!("mesh_upgrade_generation").set(n(&u["generation"]) as f64);
    gauge!("mesh_upgrade_listeners_taken_over").set(n(&u["listeners_taken"]) as f64);
    if n(&u["previous_reported"]) == 1 {
        for outcome in ["open", "cut"] {
            gauge!("mesh_upgrade_previous_connections", "outcome" => outcome)
                .set(n(&u[format!("previous_{outcome}")]) as f64);
        }
    }
    let k = &s["kernel"];
    for f in k["features"].as_array().into_iter().flatten() {
        let name = f["name"].as_str().unwrap_or("").to_string();
        let need = f["need"].as_str().unwrap_or("").to_string();
        gauge!("mesh_kernel_feature", "feature" => name, "need" => need)
            .set(if f["available"] == true { 1.0 } else { 0.0 });
    }
    if let Some(method) = k["ingress"].as_str() {
        gauge!("mesh_kernel_inbound_method", "method" => method.to_string()).set(1.0);
    }
    let a = &s["accel"];
    gauge!("mesh_socket_acceleration_enabled").set(if a["enabled"] == true { 1.0 } else { 0.0 });
    counter!("mesh_socket_acceleration_sockets_total", "result" => "registered")
        .absolute(n(&a["registered"]));
    counter!("mesh_socket_acceleration_sockets_total", "result" => "failed")
        .absolute(n(&a["register_failed"]));
    for e in s["inbound"].as_array().into_iter().flatten() {
        let pod = e["pod"].as_str().unwrap_or("").to_string();
        counter!("mesh_inbound_plaintext_connections_total", "pod" => pod.clone())
            .absolute(n(&e["plaintext"]));
        counter!("mesh_inbound_dropped_connections_total", "pod" => pod).absolute(n(&e["denied"]));
    }
    for (limit, v) in s["limits"]["hits"].as_object().into_iter().flatten() {
        counter!("mesh_limit_hits_total", "limit" => limit.clone()).absolute(n(v));
    }
    gauge!("mesh_tunnel_handshakes_in_progress")
        .set(n(&s["limits"]["tunnel_handshakes_in_progress"]) as f64);
    let p = &s["proxy"];
    counter!("mesh_tcp_connections_accepted_total").absolute(n(&p["accepted"]));
    let local = n(&p["delivered_local"]);
    for (path, v) in [
        ("direct", n(&p["relayed"]).saturating_sub(local)),
        ("local", local),
        ("tunnel", n(&p["tunneled"])),
    ] {
        counter!("mesh_tcp_connections_total", "path" => path).absolute(v);
    }
    for (reason, field) in [
        ("not_redirected", "refused_not_redirected"),
        ("unknown_pod", "refused_unknown_pod"),
        ("loop", "refused_loop"),
        ("route", "refused_route"),
        ("local_not_enrolled", "refused_local_not_enrolled"),
        ("no_endpoints", "refused_no_endpoints"),
        ("upstream_connect", "upstream_connect_failed"),
        ("tunnel", "tunnel_failed"),
        ("no_config", "refused_no_config"),
    ] {
        counter!("mesh_tcp_connections_refused_total", "reason" => reason).absolute(n(&p[field]));
    }
    gauge!("mesh_tcp_active_connections").set(n(&p["active"]) as f64);
    counter!("mesh_tcp_bytes_total", "direction" => "from_client")
        .absolute(n(&p["bytes_from_client"]));
    counter!("mesh_tcp_bytes_total", "direction" => "to_client").absolute(n(&p["bytes_to_client"]));
    counter!("mesh_service_connections_total").absolute(n(&p["to_service"]));

    let t = &s["tunnel"];
    if t.is_object() {
        for dir in ["outbound", "inbound"] {
            counter!("mesh_tunnel_connections_total", "direction" => dir)
                .absolute(n(&t[format!("{dir}_connections")]));
            counter!("mesh_tunnel_streams_total", "direction" => dir)
                .absolute(n(&t[format!("{dir}_streams")]));
        }
        counter!("mesh_tunnel_handshakes_refused_total", "direction" => "outbound", "reason" => "peer_certificate")
            .absolute(n(&t["outbound_tls_refused"]));
        for (reason, v) in t["inbound_tls_refused"].as_object().into_iter().flatten() {
            counter!("mesh_tunnel_handshakes_refused_total", "direction" => "inbound", "reason" => reason.clone())
                .absolute(n(v));
        }
        counter!("mesh_tunnel_inbound_refused_total", "reason" => "not_local")
            .absolute(n(&t["inbound_refused_not_local"]));
        counter!("mesh_tunnel_inbound_refused_total", "reason" => "spoofed_source")
            .absolute(n(&t["inbound_refused_spoofed_source"]));
        counter!("mesh_tunnel_inbound_refused_total", "reason" => "upstream")
            .absolute(n(&t["inbound_upstream_failed"]));
        counter!("mesh_tunnel_idle_closed_total").absolute(n(&t["inbound_idle_closed"]));
    }
    let a = &s["authz"];
    if a.is_object() {
        counter!("mesh_authz_decisions_total", "decision" => "allow").absolute(n(&a["allowed"]));
        counter!("mesh_authz_decisions_total", "decision" => "deny").absolute(n(&a["denied"]));
        counter!("mesh_authz_connections_closed_total").absolute(n(&a["closed_by_policy"]));
    }
    for d in s["authz_policies"].as_array().into_iter().flatten() {
        let text = |k: &str| d[k].as_str().unwrap_or("").to_string();
        counter!("mesh_authz_policy_decisions_total", "policy" => text("policy"), "action" => text("action"), "layer" => text("layer"))
            .absolute(n(&d["count"]));
    }
    let id = &s["identity"];
    for c in id["certificates"].as_array().into_iter().flatten() {
        let identity = c["identity"].as_str().unwrap_or("").to_string();
        gauge!("mesh_workload_certificate_expiry_seconds", "identity" => identity)
            .set(c["expires_in_seconds"].as_f64().unwrap_or(0.0));
    }
    if id.is_object() {
        for (result, field) in [
            ("fetched", "fetched"),
            ("rotated", "rotations"),
            ("failed", "failures"),
        ] {
            counter!("mesh_certificate_requests_total", "result" => result)
                .absolute(n(&id["stats"][field]));
        }
        counter!("mesh_certificates_restored_total").absolute(n(&id["stats"]["restored"]));
    }
    requests(s);
    let c = &s["config"];
    if c.is_object() {
        gauge!("mesh_config_version").set(n(&c["version"]) as f64);
        gauge!("mesh_config_connected").set(if c["connected"] == true { 1.0 } else { 0.0 });
        counter!("mesh_config_updates_total").absolute(n(&c["updates"]));
        counter!("mesh_config_rejected_total").absolute(n(&c["rejected"]));
        counter!("mesh_config_reconnects_total").absolute(n(&c["reconnects"]));
        if let Some(t) = c["last_update_unix"].as_f64() {
            gauge!("mesh_config_last_update_timestamp_seconds").set(t);
        }
    }
    let p = &s["process"];
    if p.is_object() {
        gauge!("mesh_process_resident_memory_bytes").set(n(&p["resident_memory_bytes"]) as f64);
        counter!("mesh_process_cpu_seconds_total")
            .absolute(p["cpu_seconds"].as_f64().unwrap_or(0.0) as u64);
        gauge!("mesh_process_open_fds").set(n(&p["open_fds"]) as f64);
        gauge!("mesh_runtime_workers").set(n(&p["runtime_workers"]) as f64);
        gauge!("mesh_runtime_alive_tasks").set(n(&p["runtime_alive_tasks"]) as f64);
        gauge!("mesh_runtime_global_queue_depth").set(n(&p["runtime_global_queue_depth"]) as f64);
    }
}

/// The proxy process itself: memory, CPU, file descriptors (from /proc), and the tokio runtime.
pub fn process() -> Value {
    let page = 4096u64;
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page);
    // Fields 14 and 15 of /proc/self/stat (after the parenthesised command): user and system
    // time in clock ticks; USER_HZ is 100 on Linux.
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?) as f64 / 100.0)
        })
        .unwrap_or(0.0);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let mut v = serde_json::json!({
        "resident_memory_bytes": rss,
        "cpu_seconds": cpu,
        "open_fds": fds,
    });
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        let m = h.metrics();
        v["runtime_workers"] = m.num_workers().into();
        v["runtime_alive_tasks"] = m.num_alive_tasks().into();
        v["runtime_global_queue_depth"] = m.global_queue_depth().into();
    }
    v
}

/// Request series of the HTTP path (labels bounded where they are counted, `http::stats`). The
/// duration histogram is rendered from its cumulative buckets as `_bucket{le}`, `_sum`, `_count`.
fn requests(s: &Value) {
    let l7 = &s["l7"];
    if l7.is_object() {
        counter!("mesh_http_requests_denied_total").absolute(n(&l7["denied"]));
        counter!("mesh_http_requests_rate_limited_total").absolute(n(&l7["rate_limited"]));
        counter!("mesh_http_retries_total").absolute(n(&l7["retries"]));
        counter!("mesh_http_pod_connections_total").absolute(n(&l7["pod_connections"]));
        counter!("mesh_http_connections_over_limit_total")
            .absolute(n(&l7["connections_over_limit"]));
    }
    const LABELS: [&str; 11] = [
        "reporter",
        "source_workload",
        "source_namespace",
        "source_principal",
        "destination_service",
        "destination_workload",
        "destination_namespace",
        "response_code",
        "grpc_status",
        "response_flags",
        "connection_security",
    ];
    for r in s["requests"].as_array().into_iter().flatten() {
        let labels: Vec<metrics::Label> = LABELS
            .iter()
            .map(|k| {
                let v = match &r["labels"][k] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                metrics::Label::new(*k, v)
            })
            .collect();
        let f = &r["figures"];
        counter!("mesh_requests_total", labels.clone()).absolute(n(&f["count"]));
        counter!("mesh_request_duration_seconds_count", labels.clone()).absolute(n(&f["count"]));
        gauge!("mesh_request_duration_seconds_sum", labels.clone())
            .set(f["duration_sum_seconds"].as_f64().unwrap_or(0.0));
        let buckets = f["duration_buckets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (bound, v) in DURATION_BUCKETS.iter().zip(&buckets) {
            let mut l = labels.clone();
            l.push(metrics::Label::new("le", bound.to_string()));
            counter!("mesh_request_duration_seconds_bucket", l).absolute(n(v));
        }
        let mut l = labels.clone();
        l.push(metrics::Label::new("le", "+Inf"));
        counter!("mesh_request_duration_seconds_bucket", l).absolute(n(&f["count"]));
        counter!("mesh_request_bytes_total", labels.clone()).absolute(n(&f["request_bytes"]));
        counter!("mesh_response_bytes_total", labels).absolute(n(&f["response_bytes"]));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// Every sample line: `name{labels} value`.
    fn samples(text: &str) -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_string(), v.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn renders_the_counters_snapshot() {
        let snapshot = json!({
            "ebpf": {"connect4": {"seen": 7, "redirected": 5}, "sk_msg": {"accelerated": 40, "unread": 2}},
            "accel": {"enabled": true, "registered": 6, "register_failed": 1},
            "enrolled_pods": 2,
            "inbound": [{"pod": "shop/web-1", "plaintext": 3, "denied": 1}],
            "proxy": {"accepted": 5, "relayed": 4, "delivered_local": 1, "tunneled": 1, "refused_no_endpoints": 2, "bytes_from_client": 100, "active": 1},
            "tunnel": {"outbound_connections": 1, "outbound_streams": 3, "inbound_tls_refused": {"unknown_ca": 2}},
            "authz": {"allowed": 4, "denied": 2, "closed_by_policy": 1},
            "identity": {"certificates": [{"identity": "spiffe://td/ns/shop/sa/web", "expires_in_seconds": 3600}], "stats": {"fetched": 1}},
            "config": {"version": 9, "connected": true, "updates": 3},
            "l7": {"requests": 3, "denied": 1, "rate_limited": 0},
            "requests": [{"labels": {"reporter": "source", "source_workload": "client", "source_namespace": "shop", "source_principal": "", "destination_service": "shop/web", "destination_workload": "web-1", "destination_namespace": "shop", "response_code": 200, "grpc_status": "", "response_flags": "-", "connection_security": "mutual_tls"},
                          "figures": {"count": 3, "duration_sum_seconds": 0.006, "duration_buckets": [0, 1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3], "request_bytes": 0, "response_bytes": 9}}],
        });
        let text = super::render(&snapshot);
        let s = samples(&text);
        let get = |k: &str| s.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        assert_eq!(
            get(r#"mesh_redirect_events_total{program="connect4",outcome="redirected"}"#),
            Some(5.0),
            "{text}"
        );
        assert_eq!(get("mesh_enrolled_pods"), Some(2.0));
        assert_eq!(
            get(r#"mesh_redirect_events_total{program="sk_msg",outcome="accelerated"}"#),
            Some(40.0)
        );
        assert_eq!(get("mesh_socket_acceleration_enabled"), Some(1.0));
        assert_eq!(
            get(r#"mesh_socket_acceleration_sockets_total{result="failed"}"#),
            Some(1.0)
        );
        let series = r#"reporter="source",source_workload="client",source_namespace="shop",source_principal="",destination_service="shop/web",destination_workload="web-1",destination_namespace="shop",response_code="200",grpc_status="",response_flags="-",connection_security="mutual_tls""#;
        assert_eq!(
            get(&format!("mesh_requests_total{{{series}}}")),
            Some(3.0),
            "{text}"
        );
        assert_eq!(
            get(&format!(
                "mesh_request_duration_seconds_bucket{{{series},le=\"0.001\"}}"
            )),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            get(&format!(
                "mesh_request_duration_seconds_bucket{{{series},le=\"+Inf\"}}"
            )),
            Some(3.0),
            "{text}"
        );
        assert_eq!(get("mesh_http_requests_denied_total"), Some(1.0));
        assert_eq!(
            get(r#"mesh_inbound_dropped_connections_total{pod="shop/web-1"}"#),
            Some(1.0)
        );
        assert_eq!(
            get(r#"mesh_tcp_connections_total{path="direct"}"#),
            Some(3.0)
        );
        assert_eq!(
            get(r#"mesh_tcp_connections_total{path="local"}"#),
            Some(1.0)
        );
        assert_eq!(
            get(r#"mesh_tcp_connections_refused_total{reason="no_endpoints"}"#),
            Some(2.0)
        );
        assert_eq!(
            get(r#"mesh_tcp_bytes_total{direction="from_client"}"#),
            Some(100.0)
        );
        assert_eq!(
            get(r#"mesh_tunnel_streams_total{direction="outbound"}"#),
            Some(3.0)
        );
        assert_eq!(
            get(r#"mesh_tunnel_handshakes_refused_total{direction="inbound",reason="unknown_ca"}"#),
            Some(2.0)
        );
        assert_eq!(
            get(r#"mesh_authz_decisions_total{decision="deny"}"#),
            Some(2.0)
        );
        assert_eq!(
            get(
                r#"mesh_workload_certificate_expiry_seconds{identity="spiffe://td/ns/shop/sa/web"}"#
            ),
            Some(3600.0)
        );
        assert_eq!(get("mesh_config_version"), Some(9.0));
        assert_eq!(get("mesh_config_connected"), Some(1.0));
        // Conventions: counters end in _total, help and type lines are present.
        assert!(
            text.contains("# TYPE mesh_tcp_bytes_total counter"),
            "{text}"
        );
        assert!(text.contains("# HELP mesh_enrolled_pods"), "{text}");
        for (name, _) in &s {
            let base = name.split('{').next().unwrap();
            assert!(base.starts_with("mesh_"), "{base}");
        }
    }
}
