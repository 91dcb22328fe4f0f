//! From accepted objects and pod placement to what each node proxy holds.
//!
//! Most of a node's view is the same for every node (every workload and service its pods may reach,
//! every route and traffic policy, applied on the caller's side); only inbound policy is node-scoped
//! (authorization and peer authentication for namespaces with pods on that node). So one
//! computation builds the shared part and a per-namespace index, and a node's snapshot is their
//! union: computing 100 nodes costs little more than computing one.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::ResourceExt;
use mesh_api::{
    config::v1 as pb,
    placement::{Placement, Workload},
};
use serde::Serialize;

use super::{
    crd::{MESH_LABEL, PeerAuthentication, PeerAuthenticationMode, WorkloadSelector},
    objects::Objects,
};

/// A resource's identity in a snapshot: its kind and `namespace/name`.
pub type Key = (i32, String);
/// What one node holds.
pub type Snapshot = BTreeMap<Key, pb::Resource>;

/// The shared part and the node-scoped index, for one version of the configuration.
#[derive(Debug, Default, PartialEq)]
pub struct Computed {
    pub shared: Snapshot,
    /// Inbound policies by namespace.
    by_namespace: BTreeMap<String, Vec<pb::Resource>>,
    /// Namespaces with pods on each node.
    namespaces_on: BTreeMap<String, BTreeSet<String>>,
}

impl Computed {
    pub fn compute(objects: &Objects, placement: &Placement) -> Self {
        let mut shared = Snapshot::new();
        let mut namespaces_on: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (name, addresses) in placement.nodes() {
            add(
                &mut shared,
                pb::Kind::Node,
                name.to_string(),
                pb::resource::Body::Node(pb::Node {
                    name: name.to_string(),
                    addresses: addresses.iter().map(ToString::to_string).collect(),
                }),
            );
            namespaces_on.entry(name.to_string()).or_default();
        }
        for (_, name) in objects.namespaces.keys() {
            if in_mesh(objects, name) {
                add(
                    &mut shared,
                    pb::Kind::Namespace,
                    name.clone(),
                    pb::resource::Body::Namespace(pb::Namespace { name: name.clone() }),
                );
            }
        }
        for w in placement.workloads() {
            namespaces_on
                .entry(w.node.clone())
                .or_default()
                .insert(w.namespace.clone());
            let enrolled = w.ready
                && in_mesh(objects, &w.namespace)
                && w.labels.get(MESH_LABEL).map(String::as_str) != Some("disabled");
            add(
                &mut shared,
                pb::Kind::Workload,
                format!("{}/{}", w.namespace, w.name),
                pb::resource::Body::Workload(pb::Workload {
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    node: w.node.clone(),
                    service_account: w.identity.service_account().to_string(),
                    ips: w.ips.iter().map(ToString::to_string).collect(),
                    labels: w.labels.clone().into_iter().collect(),
                    enrolled,
                    inbound_mode: inbound_mode(objects, w) as i32,
                    port_modes: port_modes(objects, w),
                    uid: w.uid.clone(),
                }),
            );
        }
        // Endpoint selection looks only at the Service's namespace.
        let mut by_ns: BTreeMap<&str, Vec<&Workload>> = BTreeMap::new();
        for w in placement.workloads() {
            by_ns.entry(w.namespace.as_str()).or_default().push(w);
        }
        let slices = slices_by_service(objects);
        for ((ns, name), s) in &objects.services {
            let pods = by_ns.get(ns.as_str()).map_or(&[][..], Vec::as_slice);
            let slices = slices.get(&(ns.as_str(), name.as_str()));
            add(
                &mut shared,
                pb::Kind::Service,
                format!("{ns}/{name}"),
                pb::resource::Body::Service(service(s, pods, slices, placement)),
            );
        }
        let policy = |api_version: &str, ns: &str, name: &str, spec: serde_json::Value| {
            pb::resource::Body::Policy(pb::Policy {
                api_version: api_version.to_string(),
                namespace: ns.to_string(),
                name: name.to_string(),
                spec_json: spec.to_string(),
            })
        };
        let gw = "gateway.networking.k8s.io/v1";
        let ours = "nodemesh.io/v1alpha1";
        for ((ns, name), r) in &objects.http_routes {
            let body = policy(gw, ns, name, json(&r.spec));
            add(
                &mut shared,
                pb::Kind::HttpRoute,
                format!("{ns}/{name}"),
                body,
            );
        }
        for ((ns, name), r) in &objects.grpc_routes {
            let body = policy(gw, ns, name, json(&r.spec));
            add(
                &mut shared,
                pb::Kind::GrpcRoute,
                format!("{ns}/{name}"),
                body,
            );
        }
        for ((ns, name), p) in &objects.traffic_policies {
            let body = policy(ours, ns, name, json(&p.spec));
            add(
                &mut shared,
                pb::Kind::TrafficPolicy,
                format!("{ns}/{name}"),
                body,
            );
        }
        for ((ns, name), t) in &objects.telemetries {
            let body = policy(ours, ns, name, json(&t.spec));
            add(
                &mut shared,
                pb::Kind::Telemetry,
                format!("{ns}/{name}"),
                body,
            );
        }
        let mut by_namespace: BTreeMap<String, Vec<pb::Resource>> = BTreeMap::new();
        for ((ns, name), p) in &objects.authorization_policies {
            by_namespace.entry(ns.clone()).or_default().push(resource(
                pb::Kind::AuthorizationPolicy,
                format!("{ns}/{name}"),
                policy(ours, ns, name, json(&p.spec)),
            ));
        }
        for ((ns, name), p) in &objects.peer_authentications {
            by_namespace.entry(ns.clone()).or_default().push(resource(
                pb::Kind::PeerAuthentication,
                format!("{ns}/{name}"),
                policy(ours, ns, name, json(&p.spec)),
            ));
        }
        Self {
            shared,
            by_namespace,
            namespaces_on,
        }
    }

    /// What `node` should hold.
    pub fn for_node(&self, node: &str) -> Snapshot {
        let mut s = self.shared.clone();
        s.extend(self.node_part(node));
        s
    }

    /// The node-scoped part of what `node` should hold (small: inbound policy of the namespaces
    /// with pods on it).
    pub fn node_part(&self, node: &str) -> Snapshot {
        let mut s = Snapshot::new();
        for ns in self.namespaces_on.get(node).into_iter().flatten() {
            for r in self.by_namespace.get(ns).into_iter().flatten() {
                let k = r.key.as_ref().expect("built with a key");
                s.insert((k.kind, k.name.clone()), r.clone());
            }
        }
        s
    }

    /// Resources in the shared part, for status output.
    pub fn len(&self) -> usize {
        self.shared.len() + self.by_namespace.values().map(Vec::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The update that takes a node from `from` to `to`.
pub fn delta(from: &Snapshot, to: &Snapshot) -> (Vec<pb::Resource>, Vec<pb::ResourceKey>) {
    let upserts = to
        .iter()
        .filter(|(k, r)| from.get(*k) != Some(*r))
        .map(|(_, r)| r.clone())
        .collect();
    let removals = from
        .keys()
        .filter(|k| !to.contains_key(*k))
        .map(|(kind, name)| pb::ResourceKey {
            kind: *kind,
            name: name.clone(),
        })
        .collect();
    (upserts, removals)
}

fn json<T: Serialize>(spec: &T) -> serde_json::Value {
    serde_json::to_value(spec).expect("specs serialize")
}

fn resource(kind: pb::Kind, name: String, body: pb::resource::Body) -> pb::Resource {
    pb::Resource {
        key: Some(pb::ResourceKey {
            kind: kind as i32,
            name,
        }),
        body: Some(body),
    }
}

fn add(s: &mut Snapshot, kind: pb::Kind, name: String, body: pb::resource::Body) {
    s.insert((kind as i32, name.clone()), resource(kind, name, body));
}

fn in_mesh(objects: &Objects, namespace: &str) -> bool {
    objects
        .namespaces
        .get(&(String::new(), namespace.to_string()))
        .is_some_and(|n| n.labels().get(MESH_LABEL).map(String::as_str) == Some("enabled"))
}

/// Whether a policy's selector (absent: the whole namespace) picks `w`.
pub fn selects(selector: &Option<WorkloadSelector>, w: &Workload) -> bool {
    selector.as_ref().is_none_or(|s| {
        s.match_labels
            .iter()
            .all(|(k, v)| w.labels.get(k) == Some(v))
    })
}

/// A PeerAuthentication with a selector beats the namespace-wide one; PERMISSIVE by default.
pub fn inbound_mode(objects: &Objects, w: &Workload) -> pb::InboundMode {
    pb_mode(peer_authentication(objects, w).map(|p| p.spec.mode))
}

/// The ports of `w` whose mode differs, from the same PeerAuthentication as [`inbound_mode`].
pub fn port_modes(objects: &Objects, w: &Workload) -> HashMap<u32, i32> {
    peer_authentication(objects, w)
        .map(|p| {
            p.spec
                .port_level_mtls
                .iter()
                .map(|(port, m)| (u32::from(*port), pb_mode(Some(m.mode)) as i32))
                .collect()
        })
        .unwrap_or_default()
}

fn peer_authentication<'a>(objects: &'a Objects, w: &Workload) -> Option<&'a PeerAuthentication> {
    objects
        .peer_authentications
        .range((w.namespace.clone(), String::new())..)
        .take_while(|((ns, _), _)| *ns == w.namespace)
        .map(|(_, p)| p)
        .filter(|p: &&PeerAuthentication| selects(&p.spec.selector, w))
        .max_by_key(|p| p.spec.selector.is_some())
}

fn pb_mode(mode: Option<PeerAuthenticationMode>) -> pb::InboundMode {
    match mode {
        Some(PeerAuthenticationMode::Strict) => pb::InboundMode::Strict,
        _ => pb::InboundMode::Permissive,
    }
}

type Slices<'a> = Vec<&'a EndpointSlice>;

/// EndpointSlices by the Service they belong to (`kubernetes.io/service-name`).
fn slices_by_service(objects: &Objects) -> BTreeMap<(&str, &str), Slices<'_>> {
    let mut m: BTreeMap<(&str, &str), Slices<'_>> = BTreeMap::new();
    for ((ns, _), slice) in &objects.endpoint_slices {
        if let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME))
        {
            m.entry((ns.as_str(), svc.as_str()))
                .or_default()
                .push(slice);
        }
    }
    m
}

const SERVICE_NAME: &str = "kubernetes.io/service-name";

/// Ready endpoints of the slices: pods by name (via `targetRef`, or by address when a mesh pod
/// has it), anything else as a bare address.
fn slice_endpoints(slices: &[&EndpointSlice], placement: &Placement) -> (Vec<String>, Vec<String>) {
    let (mut pods, mut addresses) = (BTreeSet::new(), BTreeSet::new());
    for e in slices.iter().flat_map(|s| s.endpoints.iter()) {
        if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
            continue;
        }
        let by_ref = e
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| Some(format!("{}/{}", r.namespace.clone()?, r.name.clone()?)));
        let by_ip = || {
            e.addresses.iter().find_map(|a| {
                let w = placement.by_ip(a.parse().ok()?)?;
                Some(format!("{}/{}", w.namespace, w.name))
            })
        };
        match by_ref.or_else(by_ip) {
            Some(p) => {
                pods.insert(p);
            }
            None => addresses.extend(e.addresses.iter().cloned()),
        }
    }
    (pods.into_iter().collect(), addresses.into_iter().collect())
}

/// The ready pods (`namespace/name`) behind Service `ns/name`, exactly as nodes get them.
pub fn service_endpoints(
    objects: &Objects,
    placement: &Placement,
    ns: &str,
    name: &str,
) -> Vec<String> {
    let Some(s) = objects.services.get(&(ns.to_string(), name.to_string())) else {
        return Vec::new();
    };
    let pods: Vec<&Workload> = placement
        .workloads()
        .filter(|w| w.namespace == ns)
        .collect();
    let slices = slices_by_service(objects);
    service(s, &pods, slices.get(&(ns, name)), placement).endpoints
}

/// A Service with its endpoints: from its EndpointSlices when it has any, else its selector over
/// `pods` (the pods of its namespace).
fn service(
    s: &Service,
    pods: &[&Workload],
    slices: Option<&Slices<'_>>,
    placement: &Placement,
) -> pb::Service {
    let ns = s.namespace().unwrap_or_default();
    let spec = s.spec.clone().unwrap_or_default();
    let ports = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let name = p.name.unwrap_or_default();
            let protocol = protocol(p.app_protocol.as_deref(), &name);
            let target_port = match p.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(t)) => t as u32,
                // A named target port resolves per pod; the node uses the service port then.
                _ => p.port as u32,
            };
            pb::ServicePort {
                name,
                port: p.port as u32,
                target_port,
                protocol: protocol.to_string(),
            }
        })
        .collect();
    let selector = spec.selector.unwrap_or_default();
    let mut addresses = Vec::new();
    let endpoints = if let Some(slices) = slices {
        let (pods, bare) = slice_endpoints(slices, placement);
        addresses = bare;
        pods
    } else if selector.is_empty() {
        Vec::new()
    } else {
        pods.iter()
            .filter(|w| {
                w.namespace == ns
                    && w.ready
                    && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
            })
            .map(|w| format!("{}/{}", w.namespace, w.name))
            .collect()
    };
    pb::Service {
        namespace: ns,
        name: s.name_any(),
        cluster_ips: spec
            .cluster_ips
            .or(spec.cluster_ip.map(|ip| vec![ip]))
            .unwrap_or_default()
            .into_iter()
            .filter(|ip| ip != "None")
            .collect(),
        ports,
        endpoints,
        addresses,
    }
}

/// The protocol of a Service port: `appProtocol` first, then the port name's prefix (Istio's
/// convention), else empty: the node proxy detects it.
pub fn protocol(app_protocol: Option<&str>, port_name: &str) -> &'static str {
    let by_name = |n: &str| match n.split('-').next().unwrap_or("") {
        "http" => "http",
        "http2" | "h2c" => "http2",
        "grpc" => "grpc",
        "tcp" => "tcp",
        _ => "",
    };
    match app_protocol {
        Some("http") => "http",
        Some("http2" | "kubernetes.io/h2c") => "http2",
        Some("grpc") => "grpc",
        Some("tcp") => "tcp",
        Some(other) => by_name(other),
        None => by_name(port_name),
    }
}
