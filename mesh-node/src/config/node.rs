//! The configuration this node holds, as domain types. Built from the controller's resources
//! once, at the edge: anything that does not convert rejects the whole version (the node nacks it
//! and keeps its last good one).
use mesh_api::crd::TelemetrySpec;
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
};

use mesh_api::{
    config::v1 as pb,
    crd::AuthorizationPolicySpec,
    placement::{
        InboundMode, NodeEntry, PeerAuthEntry, Placement, PlacementError, PlacementFile, PodEntry,
    },
};

/// Resources as received, by (kind, name): what deltas apply to.
pub type Resources = BTreeMap<(i32, String), pb::Resource>;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{kind} {name}: {reason}")]
    Resource {
        kind: &'static str,
        name: String,
        reason: String,
    },
    #[error("placement")]
    Placement(#[from] PlacementError),
    #[error(transparent)]
    Authz(#[from] crate::policy::authz::CompileError),
    #[error(transparent)]
    L7(#[from] crate::http::services::CatalogError),
}

/// A policy or route as the controller validated it. Its spec is parsed by the layer that
/// applies it (L7); here it only has to be a JSON object.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub kind: &'static str,
    pub api_version: String,
    pub namespace: String,
    pub name: String,
    pub spec: serde_json::Value,
}

#[derive(Clone, Debug, Default)]
pub struct NodeConfig {
    pub version: u64,
    /// Nodes, workloads and inbound modes: what routing and the tunnel need.
    pub placement: Placement,
    /// Pods of this node the mesh should redirect.
    pub enrolled: BTreeSet<(String, String)>,
    /// Namespaces in the mesh: a registered pod of one that the configuration does not list yet
    /// is redirected (fail closed) until it does.
    pub mesh_namespaces: BTreeSet<String>,
    pub services: Vec<pb::Service>,
    pub policies: Vec<Policy>,
    /// Authorization for this node's pods, compiled.
    pub authz: std::sync::Arc<crate::policy::authz::Policies>,
    /// Service ports by cluster IP and port: where a connection to a Service goes.
    pub vips: HashMap<SocketAddr, std::sync::Arc<VipTarget>>,
    /// Services, routes and traffic policies, compiled for the HTTP path.
    pub l7: std::sync::Arc<crate::http::services::Catalog>,
    /// Access logging per namespace.
    pub telemetry: std::sync::Arc<Telemetry>,
}

/// A Service port as reached through its cluster IP.
#[derive(Debug, Default)]
pub struct VipTarget {
    /// `namespace/name`.
    pub service: String,
    pub target_port: u16,
    /// Ready pods behind it, `(namespace, name)`.
    pub endpoints: Vec<(String, String)>,
    next: AtomicUsize,
}

impl VipTarget {
    /// The next endpoint, round robin (per-request balancing comes with L7).
    pub fn pick(&self) -> Option<&(String, String)> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }
}

fn kind_name(kind: i32) -> &'static str {
    pb::Kind::try_from(kind).map_or("UNKNOWN", |k| k.as_str_name())
}

impl NodeConfig {
    /// Whether pod `namespace/name` of this node is redirected: the configuration enrolls it, or
    /// it does not know the pod yet and its namespace is in the mesh (a pod just created, before
    /// the controller has seen it: redirected, so it fails closed, never bypasses).
    pub fn wants(&self, namespace: &str, name: &str) -> bool {
        self.enrolled
            .contains(&(namespace.to_string(), name.to_string()))
            || (self.placement.pod(namespace, name).is_none()
                && self.mesh_namespaces.contains(namespace))
    }

    pub fn convert(
        node: &str,
        trust_domain: &str,
        version: u64,
        resources: &Resources,
    ) -> Result<Self, ConvertError> {
        let mut file = PlacementFile {
            trust_domain: trust_domain.to_string(),
            ..Default::default()
        };
        let mut enrolled = BTreeSet::new();
        let mut services = Vec::new();
        let mut policies = Vec::new();
        let mut authz_specs: Vec<(String, String, AuthorizationPolicySpec)> = Vec::new();
        let mut mesh_namespaces: BTreeSet<String> = BTreeSet::new();
        let mut telemetry_specs: Vec<(String, mesh_api::crd::TelemetrySpec)> = Vec::new();
        let mut l7_specs = crate::http::services::Specs::default();
        for ((kind, name), r) in resources {
            let bad = |reason: String| ConvertError::Resource {
                kind: kind_name(*kind),
                name: name.clone(),
                reason,
            };
            let ips = |v: &[String]| {
                v.iter()
                    .map(|a| {
                        a.parse()
                            .map_err(|_| bad(format!("{a:?} is not an IP address")))
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            match &r.body {
                Some(pb::resource::Body::Node(n)) => file.nodes.push(NodeEntry {
                    name: n.name.clone(),
                    addresses: ips(&n.addresses)?,
                }),
                Some(pb::resource::Body::Workload(w)) => {
                    if w.node == node && w.enrolled {
                        enrolled.insert((w.namespace.clone(), w.name.clone()));
                    }
                    if w.node == node {
                        let mode = |m: i32| match pb::InboundMode::try_from(m) {
                            Ok(pb::InboundMode::Strict) => InboundMode::Strict,
                            _ => InboundMode::Permissive,
                        };
                        let ports = w
                            .port_modes
                            .iter()
                            .map(|(port, m)| {
                                u16::try_from(*port)
                                    .ok()
                                    .filter(|p| *p != 0)
                                    .map(|p| (p, mode(*m)))
                                    .ok_or_else(|| bad(format!("{port} is not a TCP port")))
                            })
                            .collect::<Result<_, _>>()?;
                        file.peer_authentication.push(PeerAuthEntry {
                            namespace: w.namespace.clone(),
                            pod: Some(w.name.clone()),
                            mode: mode(w.inbound_mode),
                            ports,
                        });
                    }
                    file.pods.push(PodEntry {
                        namespace: w.namespace.clone(),
                        name: w.name.clone(),
                        node: w.node.clone(),
                        service_account: w.service_account.clone(),
                        ips: ips(&w.ips)?,
                        labels: w.labels.clone().into_iter().collect(),
                        ready: true,
                        uid: w.uid.clone(),
                    });
                }
                Some(pb::resource::Body::Service(s)) => services.push(s.clone()),
                Some(pb::resource::Body::Namespace(n)) => {
                    mesh_namespaces.insert(n.name.clone());
                }
                Some(pb::resource::Body::Policy(p)) => {
                    let spec: serde_json::Value = serde_json::from_str(&p.spec_json)
                        .map_err(|e| bad(format!("spec is not JSON: {e}")))?;
                    let (ns, n) = (p.namespace.clone(), p.name.clone());
                    match typed(*kind, &p.spec_json).map_err(|e| bad(format!("spec: {e}")))? {
                        Typed::Authz(a) => authz_specs.push((ns, n, a)),
                        Typed::Http(h) => l7_specs.http.push((ns, n, h)),
                        Typed::Grpc(g) => l7_specs.grpc.push((ns, n, g)),
                        Typed::Traffic(t) => l7_specs.traffic.push((ns, n, *t)),
                        Typed::Telemetry(t) => telemetry_specs.push((ns, t)),
                        Typed::Other => {}
                    }
                    policies.push(Policy {
                        kind: kind_name(*kind),
                        api_version: p.api_version.clone(),
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        spec,
                    });
                }
                None => return Err(bad("no body".into())),
            }
        }
        let authz = crate::policy::authz::Policies::compile(
            authz_specs
                .iter()
                .map(|(ns, name, spec)| (ns.as_str(), name.as_str(), spec)),
        )?;
        let mut vips = HashMap::new();
        for s in &services {
            let service = format!("{}/{}", s.namespace, s.name);
            let endpoints: Vec<(String, String)> = s
                .endpoints
                .iter()
                .filter_map(|e| e.split_once('/'))
                .map(|(ns, n)| (ns.to_string(), n.to_string()))
                .collect();
            for ip in &s.cluster_ips {
                let ip: IpAddr = ip.parse().map_err(|_| ConvertError::Resource {
                    kind: "KIND_SERVICE",
                    name: service.clone(),
                    reason: format!("cluster IP {ip:?} is not an IP address"),
                })?;
                for p in &s.ports {
                    let port = |v: u32| u16::try_from(v).ok().filter(|p| *p != 0);
                    let (Some(port), Some(target_port)) = (port(p.port), port(p.target_port))
                    else {
                        return Err(ConvertError::Resource {
                            kind: "KIND_SERVICE",
                            name: service.clone(),
                            reason: format!(
                                "port {} -> {} is not a TCP port",
                                p.port, p.target_port
                            ),
                        });
                    };
                    vips.insert(
                        SocketAddr::new(ip, port),
                        std::sync::Arc::new(VipTarget {
                            service: service.clone(),
                            target_port,
                            endpoints: endpoints.clone(),
                            next: AtomicUsize::new(0),
                        }),
                    );
                }
            }
        }
        let l7 = crate::http::services::Catalog::compile(&services, &l7_specs)?;
        let telemetry = Telemetry::compile(telemetry_specs.iter().map(|(ns, t)| (ns.as_str(), t)));
        Ok(Self {
            version,
            telemetry: std::sync::Arc::new(telemetry),
            vips,
            l7: std::sync::Arc::new(l7),
            authz: std::sync::Arc::new(authz),
            placement: Placement::try_from(file)?,
            enrolled,
            mesh_namespaces,
            services,
            policies,
        })
    }
}

/// A policy's spec parsed with the types the controller validated it with.
enum Typed {
    Authz(AuthorizationPolicySpec),
    Http(mesh_api::gateway::HTTPRouteSpec),
    Grpc(mesh_api::gateway::GRPCRouteSpec),
    /// Boxed: by far the largest spec.
    Traffic(Box<mesh_api::crd::TrafficPolicySpec>),
    Telemetry(mesh_api::crd::TelemetrySpec),
    /// Checked, applied elsewhere (PeerAuthentication reaches the node as workload modes).
    Other,
}

/// Parses a policy's spec once, with the types the controller validated it with (a spec this
/// node cannot read, from a newer controller say, rejects the version instead of being half
/// applied).
fn typed(kind: i32, json: &str) -> Result<Typed, serde_json::Error> {
    use mesh_api::crd;
    Ok(match pb::Kind::try_from(kind) {
        Ok(pb::Kind::AuthorizationPolicy) => Typed::Authz(serde_json::from_str(json)?),
        Ok(pb::Kind::TrafficPolicy) => Typed::Traffic(serde_json::from_str(json)?),
        Ok(pb::Kind::Telemetry) => Typed::Telemetry(serde_json::from_str(json)?),
        Ok(pb::Kind::HttpRoute) => Typed::Http(serde_json::from_str(json)?),
        Ok(pb::Kind::GrpcRoute) => Typed::Grpc(serde_json::from_str(json)?),
        Ok(pb::Kind::PeerAuthentication) => {
            serde_json::from_str::<crd::PeerAuthenticationSpec>(json)?;
            Typed::Other
        }
        _ => {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json)?;
            Typed::Other
        }
    })
}

/// Access logging per namespace, from the Telemetry resources of one config version.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Telemetry {
    /// Namespace -> sample percent (0: off).
    namespaces: HashMap<String, f64>,
}

impl Telemetry {
    pub fn compile<'a>(specs: impl IntoIterator<Item = (&'a str, &'a TelemetrySpec)>) -> Self {
        let namespaces = specs
            .into_iter()
            .filter_map(|(ns, s)| {
                let a = s.access_logging.as_ref()?;
                let pct = if a.enabled {
                    a.sample_percent.unwrap_or(100.0).clamp(0.0, 100.0)
                } else {
                    0.0
                };
                Some((ns.to_string(), pct))
            })
            .collect();
        Self { namespaces }
    }

    /// The sample percent for `namespace`, or `default` when it has no Telemetry.
    pub fn percent(&self, namespace: &str, default: f64) -> f64 {
        self.namespaces.get(namespace).copied().unwrap_or(default)
    }
}

#[cfg(test)]
mod tests {
    use mesh_api::crd::AccessLogging;

    use super::*;

    #[test]
    fn telemetry_per_namespace_overrides_the_default() {
        let on = TelemetrySpec {
            access_logging: Some(AccessLogging {
                enabled: true,
                sample_percent: Some(10.0),
            }),
        };
        let off = TelemetrySpec {
            access_logging: Some(AccessLogging {
                enabled: false,
                sample_percent: Some(50.0),
            }),
        };
        let t = Telemetry::compile([
            ("shop", &on),
            ("quiet", &off),
            ("plain", &TelemetrySpec::default()),
        ]);
        let cases = [
            ("shop", 0.0, 10.0),
            ("shop", 100.0, 10.0),
            ("quiet", 100.0, 0.0),
            ("plain", 100.0, 100.0),
            ("other", 0.0, 0.0),
            ("other", 25.0, 25.0),
        ];
        for (ns, default, want) in cases {
            assert_eq!(t.percent(ns, default), want, "{ns} default {default}");
        }
    }
}
