//! Distributed tracing end to end: both node proxies export a span per hop over OTLP/gRPC to a
//! collector (a tonic OTLP server in the controller's namespace); spans join the app's trace
//! (W3C `traceparent` or B3) and nest: app -> source hop -> destination hop -> server.
use std::{collections::HashMap, process::Stdio, time::Duration};

use mesh_tests::{ClusterBuilder, cluster::find_bin, ctrl::CTRL_IPV4};
use serde_json::Value;

const OTLP_PORT: u16 = 4317;

fn spans(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test]
async fn each_proxy_hop_is_a_span_in_the_apps_trace() {
    let endpoint = format!("http://{CTRL_IPV4}:{OTLP_PORT}");
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .config_stream()
        .node_args(&[
            "--otlp-endpoint",
            &endpoint,
            "--trace-sample-percent",
            "100",
        ])
        .start()
        .await
        .unwrap();
    let ctrl = cluster.ctrl.as_ref().unwrap();
    let out = cluster.dir.join("otlp-spans.jsonl");
    let _collector = tokio::process::Command::new("ip")
        .args(["netns", "exec", &ctrl.netns])
        .arg(find_bin("mesh-testpod").unwrap())
        .args(["otlp", "--listen", &format!("0.0.0.0:{OTLP_PORT}")])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = cluster.pod(0, 0).clone();
    let server = cluster.pod(1, 0).clone();
    let _s = server.serve_http(8080).await.unwrap();
    cluster.enroll(&client).await.unwrap();
    cluster.enroll(&server).await.unwrap();
    let to = format!("http://{}/echo", server.addr(false, 8080));

    // W3C: the app's trace id is kept; the server sees the destination hop as its parent.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let app_span = "00f067aa0ba902b7";
    let c = client
        .curl(&["-H", &format!("traceparent: 00-{trace}-{app_span}-01"), &to])
        .await
        .unwrap();
    assert_eq!(c.status, 200, "{c:?}");
    let seen = c.json()["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(seen.starts_with(&format!("00-{trace}-")), "{seen}");
    let server_parent = seen.split('-').nth(2).unwrap().to_string();
    assert_ne!(server_parent, app_span, "the proxies' spans sit in between");

    // B3 only: accepted, and the trace continues under the B3 trace id.
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let c = client
        .curl(&[
            "-H",
            &format!("x-b3-traceid: {b3_trace}"),
            "-H",
            "x-b3-spanid: e457b5a2e4d86bd1",
            "-H",
            "x-b3-sampled: 1",
            &to,
        ])
        .await
        .unwrap();
    let h = &c.json()["headers"];
    assert_eq!(h["x-b3-traceid"], b3_trace, "{h}");
    assert!(h["traceparent"].as_str().unwrap().contains(b3_trace), "{h}");

    // The collector receives both hops of each trace, nested: app -> outbound -> inbound.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let by_trace = loop {
        let mut by: HashMap<String, Vec<Value>> = HashMap::new();
        for s in spans(&out) {
            by.entry(s["trace_id"].as_str().unwrap().to_string())
                .or_default()
                .push(s);
        }
        if by.get(trace).is_some_and(|v| v.len() >= 2)
            && by.get(b3_trace).is_some_and(|v| v.len() >= 2)
        {
            break by;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans not exported: {:?}",
            spans(&out)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for (t, root_parent) in [(trace, app_span), (b3_trace, "e457b5a2e4d86bd1")] {
        let spans = &by_trace[t];
        let find = |name: &str| {
            spans
                .iter()
                .find(|s| s["name"].as_str().unwrap().starts_with(name))
                .unwrap_or_else(|| panic!("no {name} span in {spans:#?}"))
        };
        let (outbound, inbound) = (find("outbound"), find("inbound"));
        assert_eq!(outbound["parent_span_id"], root_parent, "{outbound}");
        assert_eq!(inbound["parent_span_id"], outbound["span_id"], "{inbound}");
        assert_eq!(
            outbound["resource"]["mesh.node"], cluster.nodes[0].name,
            "{outbound}"
        );
        assert_eq!(
            inbound["resource"]["mesh.node"], cluster.nodes[1].name,
            "{inbound}"
        );
        assert_eq!(
            inbound["attributes"]["http.response.status_code"], 200,
            "{inbound}"
        );
        assert_eq!(inbound["attributes"]["url.path"], "/echo", "{inbound}");
        assert!(
            inbound["attributes"]["mesh.source.principal"]
                .as_str()
                .unwrap()
                .ends_with(&format!("/sa/{}", client.name)),
            "{inbound}"
        );
        if t == trace {
            assert_eq!(inbound["span_id"], server_parent.as_str(), "{inbound}");
        }
    }
}
