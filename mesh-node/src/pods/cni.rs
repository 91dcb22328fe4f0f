//! `mesh-cni`, a chained CNI plugin: the admission half of fail-closed enrollment.
//!
//! On `ADD` it registers the new pod's sandbox with this node's proxy (`PUT /v1/pods/NS/NAME` on
//! the proxy's root-only admin socket, `<stateDir>/admin.sock`: the kubelet runs plugins as root),
//! which redirects it at once if its namespace is in the mesh. If the proxy cannot be reached, the
//! plugin decides from the configuration the proxy last saved: a pod of a namespace outside the
//! mesh starts anyway; any other pod is refused with CNI error 11 ("try again later"), so the
//! kubelet retries the sandbox instead of starting a pod that would bypass the mesh. `DEL` tells
//! the proxy the pod is gone (best effort); `CHECK` and `VERSION` answer as the spec asks.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_api::config::v1 as pb;
use prost::Message;
use serde::Deserialize;
use serde_json::{Value, json};

pub const SUPPORTED: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// Why the node proxy did not take a registration.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("cannot reach {}", .socket.display())]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no HTTP answer from {}", .0.display())]
    NoAnswer(PathBuf),
    #[error("{} answered {status}: {body}", .socket.display())]
    Refused {
        socket: PathBuf,
        status: u16,
        body: String,
    },
}

/// Why the plugin could not be installed on the node.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{what} {}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {}", .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no .conflist in {}: the cluster's network plugin is not installed yet", .0.display())]
    NoList(PathBuf),
    #[error("{} has no plugins list", .0.display())]
    NoPlugins(PathBuf),
}
/// CNI's "try again later".
pub const TRY_AGAIN: u32 = 11;

/// The plugin's entry in the network configuration list.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginConf {
    #[serde(default = "version")]
    pub cni_version: String,
    /// Where the node proxy keeps its state: the saved configuration and its admin socket.
    #[serde(default = "state_dir")]
    pub state_dir: PathBuf,
    /// The node proxy's admin socket, if not `<stateDir>/admin.sock`.
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    /// Namespaces never held back (the cluster's own, the mesh's).
    #[serde(default = "excluded")]
    pub exclude_namespaces: Vec<String>,
    #[serde(default)]
    pub prev_result: Option<Value>,
}

fn version() -> String {
    "1.0.0".into()
}
fn state_dir() -> PathBuf {
    PathBuf::from("/var/lib/mesh-node")
}
fn excluded() -> Vec<String> {
    vec!["kube-system".into(), "mesh-system".into()]
}

/// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS` (`K=V;K=V`).
pub fn pod_of(cni_args: &str) -> Option<(String, String)> {
    let kv: BTreeMap<&str, &str> = cni_args
        .split(';')
        .filter_map(|p| p.split_once('='))
        .collect();
    Some((
        kv.get("K8S_POD_NAMESPACE")?.to_string(),
        kv.get("K8S_POD_NAME")?.to_string(),
    ))
}

/// Whether `namespace` is in the mesh according to the configuration the node proxy saved;
/// `None` when there is none to read.
pub fn saved_in_mesh(state_dir: &Path, namespace: &str) -> Option<bool> {
    let bytes = std::fs::read(state_dir.join("config.pb")).ok()?;
    let update = pb::ConfigUpdate::decode(bytes.as_slice()).ok()?;
    Some(
        update.upserts.iter().any(
            |r| matches!(&r.body, Some(pb::resource::Body::Namespace(n)) if n.name == namespace),
        ),
    )
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// The node proxy has the sandbox: start the pod.
    Registered,
    /// Not the mesh's business: start the pod.
    Pass(&'static str),
    /// Fail closed: the pod must not start yet.
    Refuse(String),
}

/// What to do with a new pod, given whether the node proxy took its registration, whether its
/// namespace is excluded, and what the saved configuration says about its namespace.
pub fn decide(
    registered: Result<(), RegisterError>,
    excluded: bool,
    saved: Option<bool>,
) -> Decision {
    if excluded {
        return Decision::Pass("excluded namespace");
    }
    match (registered, saved) {
        (Ok(()), _) => Decision::Registered,
        (Err(_), Some(false)) => Decision::Pass("namespace not in the mesh"),
        (Err(e), Some(true)) => Decision::Refuse(format!(
            "the node proxy is not reachable ({}) and the pod's namespace is in the mesh: not starting it until the proxy can redirect it",
            mesh_api::placement::error_chain(&e)
        )),
        (Err(e), None) => Decision::Refuse(format!(
            "the node proxy is not reachable ({}) and has never saved a configuration: not starting pods until it is up",
            mesh_api::placement::error_chain(&e)
        )),
    }
}

impl PluginConf {
    fn socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join(crate::config::ADMIN_SOCKET))
    }
}

/// One HTTP/1.1 request on the node proxy's admin socket; the status code.
fn admin_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<u16, RegisterError> {
    let timeout = Duration::from_secs(3);
    let unreachable = |source| RegisterError::Unreachable {
        socket: socket.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(unreachable)?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: mesh-node\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(unreachable)?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| RegisterError::NoAnswer(socket.to_path_buf()))?;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(RegisterError::Refused {
            socket: socket.to_path_buf(),
            status,
            body: out
                .split("\r\n\r\n")
                .nth(1)
                .unwrap_or("")
                .trim()
                .to_string(),
        })
    }
}

/// The environment the runtime gives a plugin.
pub struct Env {
    pub command: String,
    pub netns: String,
    pub args: String,
}

/// Runs one CNI command; `Ok` is printed on stdout, `Err((code, msg))` too (as the error JSON)
/// with a non-zero exit.
pub fn run(env: &Env, stdin: &str) -> Result<Value, (u32, String)> {
    let conf: PluginConf =
        serde_json::from_str(stdin).map_err(|e| (7, format!("network configuration: {e}")))?;
    let passthrough = || {
        let mut r = conf.prev_result.clone().unwrap_or_else(|| json!({}));
        r["cniVersion"] = json!(conf.cni_version);
        r
    };
    match env.command.as_str() {
        "VERSION" => Ok(json!({"cniVersion": conf.cni_version, "supportedVersions": SUPPORTED})),
        "CHECK" => Ok(passthrough()),
        "DEL" => {
            if let Some((ns, name)) = pod_of(&env.args) {
                let _ = admin_request(
                    &conf.socket(),
                    "DELETE",
                    &format!("/v1/pods/{ns}/{name}"),
                    "",
                );
            }
            Ok(passthrough())
        }
        "ADD" => {
            let Some((ns, name)) = pod_of(&env.args) else {
                return Ok(passthrough());
            };
            let excluded = conf.exclude_namespaces.contains(&ns);
            let registered = if excluded {
                Ok(())
            } else {
                let body = json!({"netns": env.netns}).to_string();
                admin_request(
                    &conf.socket(),
                    "PUT",
                    &format!("/v1/pods/{ns}/{name}"),
                    &body,
                )
                .map(drop)
            };
            let saved = saved_in_mesh(&conf.state_dir, &ns);
            match decide(registered, excluded, saved) {
                Decision::Registered | Decision::Pass(_) => Ok(passthrough()),
                Decision::Refuse(msg) => Err((TRY_AGAIN, format!("{ns}/{name}: {msg}"))),
            }
        }
        other => Err((4, format!("unknown CNI_COMMAND {other:?}"))),
    }
}

/// Installs the plugin on a node: copies `exe` into `bin_dir` and chains an entry for it at the
/// end of the first network configuration list in `conf_dir` (the one the runtime uses), unless
/// one is there. Both writes are atomic (temporary file, then rename). Returns the list changed.
pub fn install(
    conf_dir: &Path,
    bin_dir: &Path,
    exe: &Path,
    entry: Value,
) -> Result<PathBuf, InstallError> {
    let err = |what: &'static str, p: &Path, source: std::io::Error| InstallError::Io {
        what,
        path: p.to_path_buf(),
        source,
    };
    let target = bin_dir.join("mesh-cni");
    let tmp = bin_dir.join(".mesh-cni.tmp");
    std::fs::copy(exe, &tmp).map_err(|e| err("copying the plugin to", &tmp, e))?;
    std::fs::rename(&tmp, &target).map_err(|e| err("installing", &target, e))?;
    let mut lists: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(|e| err("reading", conf_dir, e))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    lists.sort();
    let list = lists
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoList(conf_dir.to_path_buf()))?;
    let text = std::fs::read_to_string(&list).map_err(|e| err("reading", &list, e))?;
    let mut conf: Value = serde_json::from_str(&text).map_err(|source| InstallError::Parse {
        path: list.clone(),
        source,
    })?;
    let plugins = conf["plugins"]
        .as_array_mut()
        .ok_or_else(|| InstallError::NoPlugins(list.clone()))?;
    if plugins.iter().any(|p| p["type"] == "mesh-cni") {
        return Ok(list);
    }
    plugins.push(entry);
    let tmp = list.with_extension("conflist.tmp");
    let pretty = serde_json::to_string_pretty(&conf).expect("JSON");
    std::fs::write(&tmp, pretty).map_err(|e| err("writing", &tmp, e))?;
    std::fs::rename(&tmp, &list).map_err(|e| err("writing", &list, e))?;
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_fail_closed_unless_the_pod_is_not_the_meshs() {
        let down = || {
            Err(RegisterError::NoAnswer(
                "/var/lib/mesh-node/admin.sock".into(),
            ))
        };
        let cases = [
            (Ok(()), false, None, "registered"),
            (Ok(()), false, Some(true), "registered"),
            (down(), true, Some(true), "pass"),
            (down(), false, Some(false), "pass"),
            (down(), false, Some(true), "refuse"),
            (down(), false, None, "refuse"),
        ];
        for (reg, excluded, saved, want) in cases {
            let case = format!("{reg:?} excluded={excluded} saved={saved:?}");
            let got = match decide(reg, excluded, saved) {
                Decision::Registered => "registered",
                Decision::Pass(_) => "pass",
                Decision::Refuse(_) => "refuse",
            };
            assert_eq!(got, want, "{case}");
        }
    }

    #[test]
    fn install_chains_the_plugin_once() {
        let conf = tempfile::tempdir().unwrap();
        let bin = tempfile::tempdir().unwrap();
        let exe = bin.path().join("source-binary");
        std::fs::write(&exe, b"#!plugin").unwrap();
        std::fs::write(
            conf.path().join("10-calico.conflist"),
            r#"{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [{"type": "calico"}, {"type": "portmap"}]}"#,
        )
        .unwrap();
        std::fs::write(conf.path().join("99-other.conflist"), r#"{"plugins": []}"#).unwrap();
        let entry = json!({"type": "mesh-cni", "stateDir": "/var/lib/mesh-node"});
        for _ in 0..2 {
            let list = install(conf.path(), bin.path(), &exe, entry.clone()).unwrap();
            assert!(list.ends_with("10-calico.conflist"));
        }
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(conf.path().join("10-calico.conflist")).unwrap(),
        )
        .unwrap();
        let types: Vec<&str> = v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            ["calico", "portmap", "mesh-cni"],
            "chained last, once"
        );
        assert_eq!(
            std::fs::read(bin.path().join("mesh-cni")).unwrap(),
            b"#!plugin"
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(install(empty.path(), bin.path(), &exe, entry).is_err());
    }

    #[test]
    fn pod_names_come_from_cni_args() {
        assert_eq!(
            pod_of("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u"),
            Some(("shop".into(), "web-0".into()))
        );
        assert_eq!(pod_of("IgnoreUnknown=1"), None);
    }

    #[test]
    fn the_saved_configuration_says_which_namespaces_are_in_the_mesh() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(saved_in_mesh(dir.path(), "shop"), None);
        let update = pb::ConfigUpdate {
            version: 3,
            upserts: vec![pb::Resource {
                key: Some(pb::ResourceKey {
                    kind: pb::Kind::Namespace as i32,
                    name: "shop".into(),
                }),
                body: Some(pb::resource::Body::Namespace(pb::Namespace {
                    name: "shop".into(),
                })),
            }],
            ..Default::default()
        };
        std::fs::write(dir.path().join("config.pb"), update.encode_to_vec()).unwrap();
        assert_eq!(saved_in_mesh(dir.path(), "shop"), Some(true));
        assert_eq!(saved_in_mesh(dir.path(), "other"), Some(false));
    }
}
