//! The Kubernetes manifests, offline: `kubectl kustomize manifests/` renders; every object parses
//! into its typed k8s-openapi struct and back without losing a field (a misspelt field fails);
//! the CRDs are the generated ones; and every image, flag, port and probe the manifests use
//! exists in the binaries: the container arguments parse and validate with the binaries' own
//! argument parsers, probes and ports point at listeners those arguments open, and each image is
//! built by a Dockerfile in the repository.
use std::{collections::BTreeMap, path::PathBuf};

use clap::Parser;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rendered() -> Vec<Value> {
    let out = std::process::Command::new("kubectl")
        .args(["kustomize"])
        .arg(repo().join("manifests"))
        .output()
        .expect("kubectl (installed by cargo xtask test)");
    assert!(
        out.status.success(),
        "kubectl kustomize manifests/: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| {
            serde_yaml_ng::from_value::<Value>(serde_yaml_ng::Value::deserialize(d).unwrap())
                .unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

/// Drops nulls the typed structs do not keep, and writes whole floats as integers.
fn normalize(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, normalize(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(normalize).collect()),
        // Schema bounds are f64 in the typed struct: 65535.0 is 65535.
        Value::Number(n) => match n.as_f64() {
            Some(f) if !n.is_i64() && !n.is_u64() && f.fract() == 0.0 => Value::from(f as i64),
            _ => Value::Number(n),
        },
        v => v,
    }
}

/// Parses `doc` as `T` and checks nothing was dropped on the way.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> T {
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{} {}: {e}", doc["kind"], doc["metadata"]["name"]));
    let back = normalize(serde_json::to_value(&t).unwrap());
    assert_eq!(
        back,
        normalize(doc.clone()),
        "{} {}: a field did not survive typed parsing (misspelt or misplaced?)",
        doc["kind"],
        doc["metadata"]["name"]
    );
    t
}

#[derive(Parser)]
struct NodeCli {
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: NodeCmd,
}

#[derive(clap::Subcommand)]
enum NodeCmd {
    Run(Box<mesh_node::config::RunArgs>),
}

#[derive(Parser)]
struct CtrlCli {
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: CtrlCmd,
}

#[derive(clap::Subcommand)]
enum CtrlCmd {
    Serve(Box<mesh_ctrl::app::ServeArgs>),
}

/// The container's arguments as the kubelet expands them (`$(VAR)` from the env).
fn args(c: &Container) -> Vec<String> {
    let env: BTreeMap<&str, &str> = [("NODE_NAME", "node-a"), ("NODE_IP", "10.0.0.5")].into();
    let declared: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    c.args
        .iter()
        .flatten()
        .map(|a| {
            let mut a = a.clone();
            for (k, v) in &env {
                if a.contains(&format!("$({k})")) {
                    assert!(
                        declared.contains(k),
                        "{a} uses {k}, which the container does not set"
                    );
                    a = a.replace(&format!("$({k})"), v);
                }
            }
            a
        })
        .collect()
}

/// `--flag=value` of an argument list.
fn flag<'a>(args: &'a [String], name: &str) -> &'a str {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {args:?}"))
}

fn port_of(addr: &str) -> i32 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// The named container port, and the probes' ports and paths.
fn probes(c: &Container) -> Vec<(String, String)> {
    [&c.readiness_probe, &c.liveness_probe]
        .into_iter()
        .flatten()
        .map(|p| {
            let g = p.http_get.as_ref().expect("HTTP probes");
            let port = match &g.port {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => i.to_string(),
            };
            (port, g.path.clone().unwrap_or_default())
        })
        .collect()
}

fn container_port(c: &Container, name: &str) -> i32 {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("container {} has no port named {name}", c.name))
        .container_port
}

/// The image is `ghcr.io/nodemesh/<binary>:<workspace version>`, built by `<binary>/Dockerfile`,
/// whose last stage runs that binary.
fn check_image(c: &Container, binary: &str) {
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        c.image.as_deref(),
        Some(format!("ghcr.io/nodemesh/{binary}:{version}").as_str()),
        "container {}",
        c.name
    );
    let dockerfile = std::fs::read_to_string(repo().join(binary).join("Dockerfile"))
        .unwrap_or_else(|e| panic!("{binary}/Dockerfile: {e}"));
    let last_stage = dockerfile.rsplit("\nFROM ").next().unwrap();
    assert!(
        last_stage.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]")),
        "{binary}/Dockerfile's last stage runs {binary}"
    );
    assert!(
        last_stage.contains(&format!(
            "COPY --from=build /out/{binary} /usr/local/bin/{binary}"
        )),
        "{binary}/Dockerfile copies the built {binary}"
    );
}

fn pod_spec(t: &k8s_openapi::api::core::v1::PodTemplateSpec) -> &PodSpec {
    t.spec.as_ref().unwrap()
}

#[test]
fn the_manifests_render_parse_and_match_the_binaries() {
    let docs = rendered();
    let mut kinds = BTreeMap::new();
    let mut crds = Vec::new();
    let (mut node, mut ctrl, mut ctrl_svc) = (None, None, None);
    for d in &docs {
        let kind = d["kind"].as_str().unwrap().to_string();
        *kinds.entry(kind.clone()).or_insert(0) += 1;
        match kind.as_str() {
            "Namespace" => drop(typed::<Namespace>(d)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(d)),
            "ClusterRole" => drop(typed::<ClusterRole>(d)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(d)),
            "Role" => drop(typed::<Role>(d)),
            "RoleBinding" => drop(typed::<RoleBinding>(d)),
            "ConfigMap" => drop(typed::<ConfigMap>(d)),
            "Service" => ctrl_svc = Some(typed::<Service>(d)),
            "Deployment" => ctrl = Some(typed::<Deployment>(d)),
            "DaemonSet" => node = Some(typed::<DaemonSet>(d)),
            "CustomResourceDefinition" => crds.push(typed::<CustomResourceDefinition>(d)),
            other => panic!("unexpected kind {other} in the manifests"),
        }
    }
    // Everything namespaced lives in mesh-system.
    for d in &docs {
        if let Some(ns) = d["metadata"]["namespace"].as_str() {
            assert_eq!(ns, "mesh-system", "{} {}", d["kind"], d["metadata"]["name"]);
        }
    }

    // The CRDs are the generated ones.
    let generated: Vec<Value> =
        serde_yaml_ng::Deserializer::from_str(&mesh_ctrl::model::crds_yaml())
            .map(|d| {
                serde_yaml_ng::from_value::<Value>(serde_yaml_ng::Value::deserialize(d).unwrap())
                    .unwrap()
            })
            .filter(|v| !v.is_null())
            .collect();
    let names = |v: &[Value]| {
        let mut n: Vec<String> = v
            .iter()
            .filter(|d| d["kind"] == "CustomResourceDefinition")
            .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&docs), names(&generated));
    for g in &generated {
        let r = docs
            .iter()
            .find(|d| d["metadata"]["name"] == g["metadata"]["name"])
            .unwrap();
        assert_eq!(
            normalize(r.clone()),
            normalize(g.clone()),
            "CRD {}",
            g["metadata"]["name"]
        );
    }

    // The node proxy: its arguments are the binary's, its ports and probes its listeners.
    let ds = node.expect("a DaemonSet");
    let spec = pod_spec(&ds.spec.as_ref().unwrap().template);
    assert_eq!(spec.host_network, Some(true));
    let c = &spec.containers[0];
    check_image(c, "mesh-node");
    let a = args(c);
    let cli = NodeCli::try_parse_from(std::iter::once("mesh-node".to_string()).chain(a.clone()))
        .unwrap_or_else(|e| panic!("mesh-node {a:?}: {e}"));
    let NodeCmd::Run(run) = cli.cmd;
    let cfg = run
        .validate()
        .unwrap_or_else(|e| panic!("mesh-node {a:?}: {e}"));
    let metrics = cfg
        .metrics_addr
        .expect("a metrics listener for probes and scraping");
    // Upgrades surge a second pod onto the node beside the old one. With hostNetwork, every
    // declared containerPort is a host port, and the scheduler's NodePorts filter keeps a pod
    // off a node where another pod holds the same host port: the surge pod would stay Pending.
    let rolling = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.rolling_update.as_ref())
        .expect("a rolling update");
    assert_eq!(
        rolling.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0)),
        "the old proxy serves until the new one took over"
    );
    assert!(
        rolling.max_surge.is_some(),
        "the new proxy starts beside the old"
    );
    for ctr in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        assert!(
            ctr.ports.as_ref().is_none_or(|p| p.is_empty()),
            "{}: a hostNetwork DaemonSet that surges declares no ports (each would be a host port)",
            ctr.name
        );
    }
    // The drain fits in the grace period, with room for the cut and the exit.
    let grace = spec
        .termination_grace_period_seconds
        .expect("a grace period");
    assert!(
        cfg.drain_timeout + std::time::Duration::from_secs(5)
            <= std::time::Duration::from_secs(grace as u64),
        "--drain-timeout {:?} does not fit in terminationGracePeriodSeconds {grace}",
        cfg.drain_timeout
    );
    for (port, path) in probes(c) {
        assert_eq!(
            port,
            metrics.port().to_string(),
            "probes use the read-only listener"
        );
        assert!(
            ["/healthz", "/ready"].contains(&path.as_str()),
            "{path} is served by the metrics listener"
        );
    }
    // The API server's own rule: Bidirectional mount propagation only in privileged containers.
    for ctr in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let privileged = ctr
            .security_context
            .as_ref()
            .and_then(|s| s.privileged)
            .unwrap_or(false);
        for m in ctr.volume_mounts.iter().flatten() {
            assert!(
                privileged || m.mount_propagation.as_deref() != Some("Bidirectional"),
                "{}: Bidirectional propagation of {} needs a privileged container",
                ctr.name,
                m.mount_path
            );
        }
    }
    // The CNI installer: the node image's mesh-cni, with the CNI directories mounted.
    let init = &spec.init_containers.as_ref().expect("the CNI installer")[0];
    assert_eq!(init.image, c.image);
    let cmd = init.command.as_ref().unwrap();
    assert_eq!(cmd[..2], ["/usr/local/bin/mesh-cni", "install"]);
    let dockerfile = std::fs::read_to_string(repo().join("mesh-node/Dockerfile")).unwrap();
    assert!(dockerfile.contains("COPY --from=build /out/mesh-cni /usr/local/bin/mesh-cni"));
    let init_mounts: Vec<&str> = init
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(init_mounts, [cmd[2].as_str(), cmd[3].as_str()]);
    assert_eq!(
        cmd[4],
        flag(&a, "--state-dir"),
        "the plugin asks the proxy's admin socket in its state directory, and reads its saved config"
    );
    assert_eq!(cmd.len(), 5, "{cmd:?}");
    let tmpl = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap();
    let ann = tmpl.annotations.as_ref().unwrap();
    assert_eq!(ann["prometheus.io/port"], metrics.port().to_string());
    // Mounted paths are where the arguments point.
    let mounts: Vec<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    for f in [
        "--bpffs",
        "--state-dir",
        "--cgroup",
        "--kubepods-cgroup-root",
    ] {
        assert!(
            mounts.contains(&flag(&a, f)),
            "{f} {} is mounted",
            flag(&a, f)
        );
    }
    for f in ["--trust-bundle", "--bootstrap-token-file"] {
        let path = flag(&a, f);
        assert!(
            mounts.iter().any(|m| path.starts_with(m)),
            "{f} {path} is under a mount"
        );
    }

    // The controller.
    let dep = ctrl.expect("a Deployment");
    let spec = pod_spec(&dep.spec.as_ref().unwrap().template);
    let c = &spec.containers[0];
    check_image(c, "mesh-ctrl");
    let a = args(c);
    let cli = CtrlCli::try_parse_from(std::iter::once("mesh-ctrl".to_string()).chain(a.clone()))
        .unwrap_or_else(|e| panic!("mesh-ctrl {a:?}: {e}"));
    let CtrlCmd::Serve(serve) = cli.cmd;
    assert!(serve.kubernetes);
    assert_eq!(
        container_port(c, "grpc"),
        port_of(&serve.listen.to_string())
    );
    let m = serve.metrics_addr.expect("a metrics listener");
    assert_eq!(container_port(c, "metrics"), i32::from(m.port()));
    for (port, path) in probes(c) {
        assert_eq!((port.as_str(), path.as_str()), ("metrics", "/healthz"));
    }
    // Nodes dial the controller by a name its certificate carries, at its Service's port.
    let node_args = args(&pod_spec(&ds.spec.as_ref().unwrap().template).containers[0]);
    let server_name = flag(&node_args, "--ctrl-server-name");
    assert!(
        serve.server_names.iter().any(|n| n == server_name),
        "{server_name} in {:?}",
        serve.server_names
    );
    let svc = ctrl_svc.expect("a Service");
    let svc_port = &svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert!(flag(&node_args, "--ctrl-addr").ends_with(&format!(":{}", svc_port.port)));
    assert!(flag(&node_args, "--ctrl-addr").contains(&format!(
        "{}.mesh-system.svc",
        svc.metadata.name.as_deref().unwrap()
    )));

    // Grafana dashboards ship as a labelled ConfigMap, one key per dashboard file.
    let dashboards = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "mesh-dashboards")
        .unwrap();
    assert_eq!(dashboards["metadata"]["labels"]["grafana_dashboard"], "1");
    for f in std::fs::read_dir(repo().join("manifests/dashboards")).unwrap() {
        let name = f.unwrap().file_name().into_string().unwrap();
        assert!(
            dashboards["data"][&name].is_string(),
            "{name} in the dashboards ConfigMap"
        );
    }
    assert_eq!(kinds["CustomResourceDefinition"], crds.len());
}
