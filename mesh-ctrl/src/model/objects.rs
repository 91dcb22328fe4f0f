//! The Kubernetes objects the mesh reads, as one bundle, and their YAML form (the local directory
//! source and `mesh-ctrl check` read the same documents `kubectl apply` would).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::{
    crd::{AuthorizationPolicy, PeerAuthentication, Telemetry, TrafficPolicy},
    gateway::{GRPCRoute, HTTPRoute},
};

/// `kind namespace/name` of an object, for messages and status.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Keyed by (namespace, name): iteration order is stable, so computed snapshots are too.
pub type ByName<T> = BTreeMap<(String, String), T>;

/// Everything the config model is computed from (pods come separately: from the Kubernetes pod
/// watch, or the local placement file).
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub namespaces: ByName<Namespace>,
    pub services: ByName<Service>,
    /// Which pods back each Service (cluster mode; without any, the selector decides).
    pub endpoint_slices: ByName<EndpointSlice>,
    pub http_routes: ByName<HTTPRoute>,
    pub grpc_routes: ByName<GRPCRoute>,
    pub authorization_policies: ByName<AuthorizationPolicy>,
    pub peer_authentications: ByName<PeerAuthentication>,
    pub traffic_policies: ByName<TrafficPolicy>,
    pub telemetries: ByName<Telemetry>,
}

/// A document that could not be read as an object we know.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: not YAML")]
    Yaml {
        origin: String,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("{origin}: {kind} {name}: field `{field}`: {reason}")]
    Field {
        origin: String,
        kind: String,
        name: String,
        field: String,
        reason: String,
    },
    #[error("{origin}: unsupported kind {api_version}/{kind} (the mesh reads {known})")]
    UnknownKind {
        origin: String,
        api_version: String,
        kind: String,
        known: &'static str,
    },
    #[error("{origin}: {kind} {name}: {reason}")]
    Metadata {
        origin: String,
        kind: String,
        name: String,
        reason: String,
    },
}

const KNOWN: &str = "v1 Namespace and Service, discovery.k8s.io/v1 EndpointSlice, gateway.networking.k8s.io/v1 HTTPRoute and GRPCRoute, nodemesh.io/v1alpha1 AuthorizationPolicy, PeerAuthentication, TrafficPolicy and Telemetry";

impl Objects {
    /// Reads every `*.yaml`/`*.yml` file of `dir` (sorted, not recursive), or one file.
    pub fn load(path: &Path) -> Result<Self, ParseError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| ParseError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let mut objects = Self::default();
        if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|source| ParseError::Read {
                    path: path.to_path_buf(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
                })
                .collect();
            files.sort();
            for f in files {
                objects.add_yaml(&f.display().to_string(), &read(&f)?)?;
            }
        } else {
            objects.add_yaml(&path.display().to_string(), &read(path)?)?;
        }
        Ok(objects)
    }

    /// Adds every document of a (multi-document) YAML text. `origin` names it in errors.
    pub fn add_yaml(&mut self, origin: &str, text: &str) -> Result<(), ParseError> {
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let origin = format!("{origin} (document {})", i + 1);
            let value =
                serde::Deserialize::deserialize(doc).map_err(|source| ParseError::Yaml {
                    origin: origin.clone(),
                    source,
                })?;
            self.add_value(&origin, value)?;
        }
        Ok(())
    }

    fn add_value(&mut self, origin: &str, value: serde_yaml_ng::Value) -> Result<(), ParseError> {
        if value.is_null() {
            return Ok(()); // an empty document (`---` at the end)
        }
        let field = |k: &str| {
            value
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        if kind == "List" {
            let items = value.get("items").and_then(|i| i.as_sequence()).cloned();
            for item in items.unwrap_or_default() {
                self.add_value(origin, item)?;
            }
            return Ok(());
        }
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => insert(origin, "Namespace", value, &mut self.namespaces),
            ("v1", "Service") => insert(origin, "Service", value, &mut self.services),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                insert(origin, "EndpointSlice", value, &mut self.endpoint_slices)
            }
            ("gateway.networking.k8s.io/v1", "HTTPRoute") => {
                insert(origin, "HTTPRoute", value, &mut self.http_routes)
            }
            ("gateway.networking.k8s.io/v1", "GRPCRoute") => {
                insert(origin, "GRPCRoute", value, &mut self.grpc_routes)
            }
            ("nodemesh.io/v1alpha1", "AuthorizationPolicy") => insert(
                origin,
                "AuthorizationPolicy",
                value,
                &mut self.authorization_policies,
            ),
            ("nodemesh.io/v1alpha1", "PeerAuthentication") => insert(
                origin,
                "PeerAuthentication",
                value,
                &mut self.peer_authentications,
            ),
            ("nodemesh.io/v1alpha1", "TrafficPolicy") => {
                insert(origin, "TrafficPolicy", value, &mut self.traffic_policies)
            }
            ("nodemesh.io/v1alpha1", "Telemetry") => {
                insert(origin, "Telemetry", value, &mut self.telemetries)
            }
            _ => Err(ParseError::UnknownKind {
                origin: origin.to_string(),
                api_version,
                kind,
                known: KNOWN,
            }),
        }
    }

    /// Every object as multi-document YAML, in the form `add_yaml` reads.
    pub fn to_yaml(&self) -> String {
        fn each<T: serde::Serialize>(m: &ByName<T>, out: &mut String) {
            for o in m.values() {
                out.push_str("---\n");
                out.push_str(&serde_yaml_ng::to_string(o).expect("objects serialize"));
            }
        }
        let mut out = String::new();
        each(&self.namespaces, &mut out);
        each(&self.services, &mut out);
        each(&self.endpoint_slices, &mut out);
        each(&self.http_routes, &mut out);
        each(&self.grpc_routes, &mut out);
        each(&self.authorization_policies, &mut out);
        each(&self.peer_authentications, &mut out);
        each(&self.traffic_policies, &mut out);
        each(&self.telemetries, &mut out);
        out
    }

    /// Every object's reference, for listings.
    pub fn refs(&self) -> Vec<ObjectRef> {
        fn each<T>(kind: &'static str, m: &ByName<T>, out: &mut Vec<ObjectRef>) {
            for (ns, name) in m.keys() {
                out.push(ObjectRef {
                    kind,
                    namespace: ns.clone(),
                    name: name.clone(),
                });
            }
        }
        let mut out = Vec::new();
        each("Namespace", &self.namespaces, &mut out);
        each("Service", &self.services, &mut out);
        each("EndpointSlice", &self.endpoint_slices, &mut out);
        each("HTTPRoute", &self.http_routes, &mut out);
        each("GRPCRoute", &self.grpc_routes, &mut out);
        each(
            "AuthorizationPolicy",
            &self.authorization_policies,
            &mut out,
        );
        each("PeerAuthentication", &self.peer_authentications, &mut out);
        each("TrafficPolicy", &self.traffic_policies, &mut out);
        each("Telemetry", &self.telemetries, &mut out);
        out
    }
}

/// The key an object is stored under.
pub fn key_of<T: ResourceExt>(o: &T) -> (String, String) {
    (o.namespace().unwrap_or_default(), o.name_any())
}

fn insert<T>(
    origin: &str,
    kind: &'static str,
    value: serde_yaml_ng::Value,
    into: &mut ByName<T>,
) -> Result<(), ParseError>
where
    T: DeserializeOwned + Resource + ResourceExt,
{
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("(unnamed)")
        .to_string();
    let obj: T = serde_path_to_error::deserialize(value).map_err(|e| ParseError::Field {
        origin: origin.to_string(),
        kind: kind.to_string(),
        name: name.clone(),
        field: e.path().to_string(),
        reason: e.into_inner().to_string(),
    })?;
    let meta_err = |reason: &str| ParseError::Metadata {
        origin: origin.to_string(),
        kind: kind.to_string(),
        name: name.clone(),
        reason: reason.to_string(),
    };
    if obj.meta().name.as_deref().unwrap_or("").is_empty() {
        return Err(meta_err("metadata.name is required"));
    }
    let mut obj = obj;
    // Namespace is the only cluster-scoped kind we read.
    if kind != "Namespace" && obj.meta().namespace.is_none() {
        // As `kubectl apply` would without `-n`.
        obj.meta_mut().namespace = Some("default".into());
    }
    let key = key_of(&obj);
    if into.insert(key, obj).is_some() {
        return Err(meta_err("defined twice"));
    }
    Ok(())
}
