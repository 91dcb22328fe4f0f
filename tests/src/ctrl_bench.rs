//! The controller at scale (`cargo xtask bench --scenario ctrl`): snapshot computation for
//! 10,000 pods and 2,000 Services across 100 nodes, and the time from one pod change to every
//! subscribed node holding it. The controller runs in-process (its real gRPC/TLS server) and 100
//! subscriber tasks stand in for node proxies: they decode and acknowledge every update, as
//! mesh-node does, and keep nothing.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use mesh_api::{
    config::v1::{
        Ack, Hello, NodeMessage, config_discovery_client::ConfigDiscoveryClient,
        node_message::Kind as Msg,
    },
    placement::Placement,
};
use mesh_ctrl::{
    app::{self, ServeArgs},
    model::{objects::Objects, snapshot::Computed},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

pub const NODES: usize = 100;
pub const PODS: usize = 10_000;
pub const SERVICES: usize = 2_000;
const NAMESPACES: usize = 100;

fn placement() -> Value {
    let nodes: Vec<Value> = (0..NODES)
        .map(|n| json!({"name": format!("node-{n}"), "addresses": [format!("10.200.{}.{}", n / 250, n % 250 + 1)]}))
        .collect();
    let per_svc = PODS / SERVICES;
    let pods: Vec<Value> = (0..PODS)
        .map(|p| {
            let svc = p / per_svc;
            json!({
                "namespace": format!("ns-{}", svc % NAMESPACES),
                "name": format!("pod-{p}"),
                "node": format!("node-{}", p % NODES),
                "service_account": format!("sa-{svc}"),
                "ips": [format!("10.{}.{}.{}", 100 + p / 65536, (p / 256) % 256, p % 256)],
                "labels": {"app": format!("svc-{svc}")},
            })
        })
        .collect();
    json!({"trust_domain": "cluster.local", "nodes": nodes, "pods": pods})
}

fn objects_yaml() -> String {
    let mut y = String::new();
    for ns in 0..NAMESPACES {
        y.push_str(&format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{ns}, labels: {{nodemesh.io/mesh: enabled}}}}\n"));
        y.push_str(&format!("---\napiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-ns, namespace: ns-{ns}}}\nspec: {{action: ALLOW, rules: [{{from: [{{namespaces: [ns-{ns}]}}]}}]}}\n"));
    }
    for s in 0..SERVICES {
        let ns = s % NAMESPACES;
        y.push_str(&format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: ns-{ns}}}\nspec: {{clusterIP: 10.96.{}.{}, selector: {{app: svc-{s}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n", s / 256, s % 256));
        if s % 10 == 0 {
            y.push_str(&format!("---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: svc-{s}, namespace: ns-{ns}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: svc-{s}, port: 80}}]\n  rules: [{{backendRefs: [{{name: svc-{s}, port: 80, weight: 90}}, {{name: svc-{}, port: 80, weight: 10}}]}}]\n", s + NAMESPACES));
        }
    }
    y
}

fn rss_kb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0)
}

/// Runs the scenario; returns `snapshot_ms`, `fanout_ms`, `rss_kb` and sizes.
pub async fn run(dir: &Path) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let rss_before = rss_kb();
    let placement_json = placement();
    let placement = Placement::parse(&serde_json::to_vec(&placement_json)?)?;
    let mut objects = Objects::default();
    objects.add_yaml("bench", &objects_yaml())?;

    // Full computation: the shared view and every node's scoped part.
    let started = Instant::now();
    let computed = Computed::compute(&objects, &placement);
    let parts: usize = (0..NODES)
        .map(|n| computed.node_part(&format!("node-{n}")).len())
        .sum();
    let snapshot_ms = started.elapsed().as_secs_f64() * 1e3;
    let resources = computed.len();
    drop(computed);
    anyhow::ensure!(parts > 0, "no node-scoped policy computed");

    std::fs::create_dir_all(dir.join("config"))?;
    std::fs::write(
        dir.join("placement.json"),
        serde_json::to_vec(&placement_json)?,
    )?;
    std::fs::write(dir.join("config/objects.yaml"), objects_yaml())?;
    let tokens: serde_json::Map<String, Value> = (0..NODES)
        .map(|n| {
            (
                format!("node-{n}"),
                json!(format!("bench-token-{n:04}-xxxxxxxx")),
            )
        })
        .collect();
    std::fs::write(dir.join("tokens.json"), Value::Object(tokens).to_string())?;
    let bound = app::serve(ServeArgs {
        listen: "127.0.0.1:0".parse()?,
        admin: "127.0.0.1:0".parse()?,
        state_dir: dir.join("state"),
        trust_domain: "cluster.local".into(),
        placement: Some(dir.join("placement.json")),
        kubernetes: false,
        node_proxy_namespace: "mesh-system".into(),
        node_proxy_selector: "app.kubernetes.io/name=mesh-node".into(),
        config_dir: Some(dir.join("config")),
        node_tokens: Some(dir.join("tokens.json")),
        node_auth: app::NodeAuthMode::Tokens,
        node_service_account: "mesh-system/mesh-node".into(),
        token_audience: "mesh-ctrl".into(),
        ca_secret: None,
        trust_bundle_configmap: None,
        metrics_addr: None,
        cert_ttl: Duration::from_secs(24 * 3600),
        ca_cert: None,
        ca_key: None,
        ca_chain: None,
        extra_roots: None,
        server_names: vec!["mesh-ctrl".into()],
    })
    .await
    .context("starting the controller")?;
    let bundle = std::fs::read_to_string(&bound.trust_bundle)?;
    let channel = Channel::from_shared(format!("https://{}", bound.addr))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(bundle))
                .domain_name("mesh-ctrl"),
        )?
        .connect()
        .await?;

    // 100 subscribers; each reports (update number, arrival time).
    let (arrivals, mut arrived) = mpsc::unbounded_channel::<(usize, u64, Instant)>();
    for n in 0..NODES {
        let (out, rx) = mpsc::channel(8);
        let node = format!("node-{n}");
        out.send(NodeMessage {
            kind: Some(Msg::Hello(Hello {
                node: node.clone(),
                last_version: 0,
            })),
        })
        .await?;
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut()
            .insert(mesh_api::auth::NODE_HEADER, node.parse()?);
        req.metadata_mut().insert(
            mesh_api::auth::AUTHORIZATION,
            format!("Bearer bench-token-{n:04}-xxxxxxxx").parse()?,
        );
        let mut updates = ConfigDiscoveryClient::new(channel.clone())
            .max_decoding_message_size(256 << 20)
            .subscribe(req)
            .await?
            .into_inner();
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Ok(Some(u)) = updates.message().await {
                let _ = arrivals.send((n, u.version, Instant::now()));
                let ack = Msg::Ack(Ack { version: u.version });
                if out.send(NodeMessage { kind: Some(ack) }).await.is_err() {
                    return;
                }
            }
        });
    }
    let current = bound.store.current().number;
    let mut synced = 0;
    while synced < NODES {
        let (_, v, _) = tokio::time::timeout(Duration::from_secs(60), arrived.recv())
            .await
            .context("initial snapshots")?
            .context("subscribers ended")?;
        if v >= current {
            synced += 1;
        }
    }

    // One pod changes (a new label moves it out of its Service): time until all 100 have it.
    let mut changed = placement_json.clone();
    changed["pods"][0]["labels"]["app"] = json!("moved");
    let changed = Placement::parse(&serde_json::to_vec(&changed)?)?;
    let t0 = Instant::now();
    bound.store.set_placement(changed);
    let target = bound.store.current().number;
    anyhow::ensure!(target > current, "the change made no new version");
    let mut got = 0;
    let mut last = t0;
    while got < NODES {
        let (_, v, at) = tokio::time::timeout(Duration::from_secs(30), arrived.recv())
            .await
            .context("fan-out")?
            .context("subscribers ended")?;
        if v == target {
            got += 1;
            last = last.max(at);
        }
    }
    let fanout_ms = (last - t0).as_secs_f64() * 1e3;
    let rss = rss_kb() - rss_before;
    bound.shutdown().await;
    Ok(vec![
        ("snapshot_ms", snapshot_ms),
        ("fanout_ms", fanout_ms),
        ("rss_kb", rss),
        ("resources", resources as f64),
        ("nodes", NODES as f64),
    ])
}
