//! `mesh-ctrl explain POD DESTINATION`: what the mesh does with a connection from a pod to a
//! destination, and why. Pure: computed from the accepted objects and placement, the same inputs
//! nodes get, so the answer is what the node proxies apply.
use std::net::{IpAddr, SocketAddr};

use kube::ResourceExt;
use mesh_api::placement::{Placement, Workload};
use serde::Serialize;

use super::{
    crd::{AuthorizationAction, AuthorizationPolicy, MESH_LABEL},
    objects::Objects,
    snapshot::{inbound_mode, selects, service_endpoints},
};

#[derive(Debug, Serialize, PartialEq)]
pub struct Explanation {
    pub source: SourceFacts,
    pub destination: Destination,
    /// HTTP/gRPC routes attached to the destination Service, in order of application.
    pub routes: Vec<String>,
    /// Services traffic is sent to, with their share.
    pub backends: Vec<Backend>,
    pub traffic_policy: Option<String>,
    /// Per destination workload: inbound mode and authorization.
    pub inbound: Vec<Inbound>,
    /// One line a human can act on.
    pub verdict: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct SourceFacts {
    pub pod: String,
    pub node: String,
    pub identity: String,
    pub redirected: bool,
    /// Why (not) redirected.
    pub because: String,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Destination {
    Service {
        name: String,
        port: u16,
    },
    Pod {
        name: String,
        node: String,
    },
    /// Not a mesh pod or Service: the node proxy connects directly.
    External {
        addr: String,
    },
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Backend {
    pub service: String,
    pub weight: u32,
    pub endpoints: Vec<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Inbound {
    pub pod: String,
    pub mode: &'static str,
    /// `allowed`, `denied` or `depends on the request` (L7 conditions), with the rule.
    pub authorization: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ExplainError {
    #[error("no pod {0} (give NAMESPACE/NAME)")]
    UnknownPod(String),
    #[error("destination {0:?} is neither IP:PORT nor SERVICE.NAMESPACE:PORT")]
    BadDestination(String),
    #[error("no Service {0}")]
    UnknownService(String),
}

pub fn explain(
    objects: &Objects,
    placement: &Placement,
    pod: &str,
    destination: &str,
) -> Result<Explanation, ExplainError> {
    let (ns, name) = pod
        .split_once('/')
        .ok_or_else(|| ExplainError::UnknownPod(pod.into()))?;
    let src = placement
        .pod(ns, name)
        .ok_or_else(|| ExplainError::UnknownPod(pod.into()))?;
    let (redirected, because) = enrollment(objects, src);
    let source = SourceFacts {
        pod: pod.into(),
        node: src.node.clone(),
        identity: src.identity.to_string(),
        redirected,
        because,
    };
    let (dest, service) = resolve(objects, placement, destination)?;
    let mut routes = Vec::new();
    let mut backends = Vec::new();
    let mut traffic_policy = None;
    let mut targets: Vec<&Workload> = Vec::new();
    if let Some((sns, sname, port)) = &service {
        for ((rns, rname), r) in &objects.http_routes {
            if attaches(&r.spec.parent_refs, rns, sns, sname, *port) {
                routes.push(format!("HTTPRoute {rns}/{rname}"));
                for rule in &r.spec.rules {
                    for b in &rule.backend_refs {
                        let bns = b.namespace.clone().unwrap_or(rns.clone());
                        add_backend(&mut backends, placement, objects, &bns, &b.name, b.weight);
                    }
                }
            }
        }
        for ((rns, rname), r) in &objects.grpc_routes {
            if attaches(&r.spec.parent_refs, rns, sns, sname, *port) {
                routes.push(format!("GRPCRoute {rns}/{rname}"));
                for rule in &r.spec.rules {
                    for b in &rule.backend_refs {
                        let bns = b.namespace.clone().unwrap_or(rns.clone());
                        add_backend(&mut backends, placement, objects, &bns, &b.name, b.weight);
                    }
                }
            }
        }
        if backends.is_empty() {
            add_backend(&mut backends, placement, objects, sns, sname, None);
        }
        traffic_policy = objects
            .traffic_policies
            .iter()
            .find(|((pns, _), p)| pns == sns && p.spec.target_ref.name == *sname)
            .map(|((pns, pname), _)| format!("TrafficPolicy {pns}/{pname}"));
        for b in &backends {
            for e in &b.endpoints {
                if let Some((ens, en)) = e.split_once('/')
                    && let Some(w) = placement.pod(ens, en)
                {
                    targets.push(w);
                }
            }
        }
    } else if let Destination::Pod { name, .. } = &dest
        && let Some((dns, dn)) = name.split_once('/')
        && let Some(w) = placement.pod(dns, dn)
    {
        targets.push(w);
    }
    let inbound: Vec<Inbound> = targets
        .iter()
        .map(|w| inbound_facts(objects, src, redirected, w))
        .collect();
    let verdict = verdict(&source, &dest, &backends, &inbound);
    Ok(Explanation {
        source,
        destination: dest,
        routes,
        backends,
        traffic_policy,
        inbound,
        verdict,
    })
}

fn enrollment(objects: &Objects, w: &Workload) -> (bool, String) {
    let ns = objects
        .namespaces
        .get(&(String::new(), w.namespace.clone()));
    let label = ns.and_then(|n| n.labels().get(MESH_LABEL).cloned());
    if ns.is_none() {
        return (
            false,
            format!("namespace {} is not known to the mesh", w.namespace),
        );
    }
    if label.as_deref() != Some("enabled") {
        return (
            false,
            format!(
                "namespace {} is not labelled {MESH_LABEL}=enabled",
                w.namespace
            ),
        );
    }
    if w.labels.get(MESH_LABEL).map(String::as_str) == Some("disabled") {
        return (false, format!("the pod is labelled {MESH_LABEL}=disabled"));
    }
    if !w.ready {
        return (false, "the pod is not ready".into());
    }
    (true, format!("namespace {} is in the mesh", w.namespace))
}

type ServiceKey = (String, String, u16);

fn resolve(
    objects: &Objects,
    placement: &Placement,
    destination: &str,
) -> Result<(Destination, Option<ServiceKey>), ExplainError> {
    if let Ok(addr) = destination.parse::<SocketAddr>() {
        return Ok(by_ip(objects, placement, addr.ip(), addr.port()));
    }
    let (host, port) = destination
        .rsplit_once(':')
        .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h, p)))
        .ok_or_else(|| ExplainError::BadDestination(destination.into()))?;
    let mut parts = host.split('.');
    let (Some(svc), Some(ns)) = (parts.next(), parts.next()) else {
        return Err(ExplainError::BadDestination(destination.into()));
    };
    if !objects
        .services
        .contains_key(&(ns.to_string(), svc.to_string()))
    {
        return Err(ExplainError::UnknownService(format!("{ns}/{svc}")));
    }
    Ok((
        Destination::Service {
            name: format!("{ns}/{svc}"),
            port,
        },
        Some((ns.into(), svc.into(), port)),
    ))
}

fn by_ip(
    objects: &Objects,
    placement: &Placement,
    ip: IpAddr,
    port: u16,
) -> (Destination, Option<ServiceKey>) {
    let ip_s = ip.to_string();
    for ((ns, name), s) in &objects.services {
        let spec = s.spec.as_ref();
        let ips = spec
            .and_then(|s| {
                s.cluster_ips
                    .clone()
                    .or(s.cluster_ip.clone().map(|i| vec![i]))
            })
            .unwrap_or_default();
        if ips.contains(&ip_s) {
            return (
                Destination::Service {
                    name: format!("{ns}/{name}"),
                    port,
                },
                Some((ns.clone(), name.clone(), port)),
            );
        }
    }
    match placement.by_ip(ip) {
        Some(w) => (
            Destination::Pod {
                name: format!("{}/{}", w.namespace, w.name),
                node: w.node.clone(),
            },
            None,
        ),
        None => (
            Destination::External {
                addr: format!("{ip_s}:{port}"),
            },
            None,
        ),
    }
}

fn attaches(
    parents: &[super::gateway::ParentRef],
    route_ns: &str,
    ns: &str,
    name: &str,
    port: u16,
) -> bool {
    parents.iter().any(|p| {
        p.kind.as_deref() == Some("Service")
            && p.name == name
            && p.namespace.as_deref().unwrap_or(route_ns) == ns
            && p.port.is_none_or(|p| p == port)
    })
}

fn add_backend(
    out: &mut Vec<Backend>,
    placement: &Placement,
    objects: &Objects,
    ns: &str,
    name: &str,
    weight: Option<u32>,
) {
    out.push(Backend {
        service: format!("{ns}/{name}"),
        weight: weight.unwrap_or(1),
        endpoints: service_endpoints(objects, placement, ns, name),
    });
}

/// Whether `from` sources match the caller: `Some(true/false)` when decidable from identity and
/// namespace alone, `None` when an IP block decides.
fn source_matches(rule: &super::crd::AuthorizationRule, src: &Workload) -> Option<bool> {
    if rule.from.is_empty() {
        return Some(true);
    }
    let id = src.identity.to_string();
    let mut undecided = false;
    for f in &rule.from {
        let principal = f.principals.is_empty()
            || f.principals.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => id.starts_with(prefix),
                None => *p == id,
            });
        let namespace = f.namespaces.is_empty() || f.namespaces.contains(&src.namespace);
        if principal && namespace {
            if f.ip_blocks.is_empty() {
                return Some(true);
            }
            undecided = true;
        }
    }
    if undecided { None } else { Some(false) }
}

fn inbound_facts(objects: &Objects, src: &Workload, redirected: bool, dst: &Workload) -> Inbound {
    let mode = inbound_mode(objects, dst);
    let strict = mode == mesh_api::config::v1::InboundMode::Strict;
    let pod = format!("{}/{}", dst.namespace, dst.name);
    let mode_name = if strict { "STRICT" } else { "PERMISSIVE" };
    if !redirected {
        let authorization = if strict {
            "denied: plaintext from outside the mesh to a STRICT pod is dropped in the kernel"
                .into()
        } else {
            "allowed: plaintext, counted as such (the source is not in the mesh)".into()
        };
        return Inbound {
            pod,
            mode: mode_name,
            authorization,
        };
    }
    let policies: Vec<(&(String, String), &AuthorizationPolicy)> = objects
        .authorization_policies
        .iter()
        .filter(|((ns, _), p)| *ns == dst.namespace && selects(&p.spec.selector, dst))
        .collect();
    let mut depends = Vec::new();
    for ((ns, name), p) in &policies {
        if p.spec.action != AuthorizationAction::Deny {
            continue;
        }
        for (i, rule) in p.spec.rules.iter().enumerate() {
            match (source_matches(rule, src), rule.to.is_empty()) {
                (Some(true), true) => {
                    return Inbound {
                        pod,
                        mode: mode_name,
                        authorization: format!(
                            "denied by AuthorizationPolicy {ns}/{name} rule {i} (DENY)"
                        ),
                    };
                }
                (Some(false), _) => {}
                _ => depends.push(format!("{ns}/{name} rule {i} (DENY)")),
            }
        }
    }
    let allows: Vec<_> = policies
        .iter()
        .filter(|(_, p)| p.spec.action == AuthorizationAction::Allow)
        .collect();
    let authorization = if allows.is_empty() {
        if depends.is_empty() {
            "allowed: no ALLOW policy selects the pod".to_string()
        } else {
            format!("depends on the request: {}", depends.join(", "))
        }
    } else {
        let mut verdict = None;
        for ((ns, name), p) in &allows {
            for (i, rule) in p.spec.rules.iter().enumerate() {
                match (source_matches(rule, src), rule.to.is_empty()) {
                    (Some(true), true) if depends.is_empty() => {
                        verdict = Some(format!(
                            "allowed by AuthorizationPolicy {ns}/{name} rule {i}"
                        ));
                    }
                    (Some(false), _) => {}
                    _ => depends.push(format!("{ns}/{name} rule {i} (ALLOW)")),
                }
            }
        }
        verdict.unwrap_or_else(|| {
            if depends.is_empty() {
                let names: Vec<String> = allows
                    .iter()
                    .map(|((ns, n), _)| format!("{ns}/{n}"))
                    .collect();
                format!(
                    "denied: ALLOW policies select the pod ({}) and no rule matches the source",
                    names.join(", ")
                )
            } else {
                format!("depends on the request: {}", depends.join(", "))
            }
        })
    };
    Inbound {
        pod,
        mode: mode_name,
        authorization,
    }
}

fn verdict(
    src: &SourceFacts,
    dest: &Destination,
    backends: &[Backend],
    inbound: &[Inbound],
) -> String {
    if let Some(i) = inbound
        .iter()
        .find(|i| i.authorization.starts_with("denied"))
    {
        return format!("denied at {}: {}", i.pod, i.authorization);
    }
    if !src.redirected {
        return format!("not redirected: {}", src.because);
    }
    match dest {
        Destination::External { addr } => {
            format!(
                "redirected; {addr} is outside the mesh: the node proxy connects to it directly"
            )
        }
        _ if backends.iter().all(|b| b.endpoints.is_empty()) && !backends.is_empty() => {
            "redirected; no ready endpoints: the connection fails (503 for HTTP)".into()
        }
        _ => {
            let mut v = String::from("redirected and carried over mTLS to the destination's node");
            if let Some(i) = inbound
                .iter()
                .find(|i| i.authorization.starts_with("depends"))
            {
                v.push_str(&format!(
                    "; at {}, authorization {}",
                    i.pod, i.authorization
                ));
            }
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLACEMENT: &str = r#"{
        "trust_domain": "cluster.local",
        "nodes": [{"name": "a", "addresses": ["10.0.0.1"]}, {"name": "b", "addresses": ["10.0.0.2"]}],
        "pods": [
            {"namespace": "shop", "name": "web-1", "node": "a", "service_account": "web", "ips": ["10.1.0.1"], "labels": {"app": "web"}},
            {"namespace": "shop", "name": "canary-1", "node": "b", "service_account": "web", "ips": ["10.1.0.3"], "labels": {"app": "web", "track": "canary"}},
            {"namespace": "shop", "name": "catalog-1", "node": "b", "service_account": "catalog", "ips": ["10.2.0.1"], "labels": {"app": "catalog"}},
            {"namespace": "shop", "name": "batch-1", "node": "b", "service_account": "batch", "ips": ["10.2.0.2"], "labels": {"app": "batch"}},
            {"namespace": "shop", "name": "legacy-1", "node": "a", "ips": ["10.1.0.2"], "labels": {"nodemesh.io/mesh": "disabled"}},
            {"namespace": "outside", "name": "tool-1", "node": "a", "ips": ["10.1.0.9"]}
        ]
    }"#;

    fn world() -> (Objects, Placement) {
        let objects = Objects::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../manifests/examples"
        )))
        .unwrap();
        let mut objects = objects;
        objects
            .add_yaml(
                "test",
                "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web-from-shop, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: ALLOW\n  rules: [{from: [{namespaces: [shop]}]}]\n",
            )
            .unwrap();
        (objects, Placement::parse(PLACEMENT.as_bytes()).unwrap())
    }

    /// (source pod, destination, expected verdict prefix, expected detail somewhere in the JSON)
    #[test]
    fn table() {
        let (objects, placement) = world();
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "shop/web-1",
                "catalog.shop:9090",
                "redirected and carried",
                "depends on the request: shop/catalog-readers rule 0 (ALLOW)",
            ),
            (
                "shop/web-1",
                "catalog.shop:9090",
                "redirected",
                "TrafficPolicy shop/catalog",
            ),
            (
                "shop/web-1",
                "web.shop:80",
                "redirected",
                "HTTPRoute shop/web",
            ),
            ("shop/web-1", "web.shop:80", "redirected", "shop/canary-1"),
            (
                "shop/catalog-1",
                "10.1.0.1:8080",
                "redirected and carried",
                "allowed by AuthorizationPolicy shop/web-from-shop rule 0",
            ),
            (
                "shop/batch-1",
                "catalog.shop:9090",
                "denied at shop/catalog-1",
                "no rule matches the source",
            ),
            (
                "shop/legacy-1",
                "10.2.0.1:9090",
                "denied at shop/catalog-1",
                "dropped in the kernel",
            ),
            (
                "outside/tool-1",
                "10.9.9.9:443",
                "not redirected: namespace outside is not known",
                "external",
            ),
            (
                "shop/web-1",
                "10.9.9.9:443",
                "redirected; 10.9.9.9:443 is outside",
                "external",
            ),
        ];
        for (pod, dest, verdict, detail) in cases {
            let e = explain(&objects, &placement, pod, dest).unwrap();
            let json = serde_json::to_string(&e).unwrap();
            assert!(
                e.verdict.starts_with(verdict),
                "{pod} -> {dest}: {}",
                e.verdict
            );
            assert!(
                json.contains(detail),
                "{pod} -> {dest}: no {detail:?} in {json}"
            );
        }
        assert_eq!(
            explain(&objects, &placement, "shop/nope", "web.shop:80"),
            Err(ExplainError::UnknownPod("shop/nope".into()))
        );
        assert_eq!(
            explain(&objects, &placement, "shop/web-1", "ghost.shop:80"),
            Err(ExplainError::UnknownService("shop/ghost".into()))
        );
    }
}
