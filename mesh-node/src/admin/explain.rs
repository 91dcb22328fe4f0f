//! `/debug/explain?src=...&dst=...`: what this node proxy would do with a connection from `src`
//! (a pod `namespace/name` or its IP) to `dst` (`ip:port`), from the state it runs on now: would
//! the kernel redirect it and if not why, what the destination is, which route and traffic policy
//! apply (for an HTTP request: `method`, `path`), where each endpoint is reached, and whether its
//! authorization allows it and by which rule.
//!
//! The redirect step mirrors the kernel program's checks in order (`mesh-ebpf/src/programs.rs`);
//! the rest runs the same functions the proxy runs on live traffic.
use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;
use mesh_api::placement::{Placement, Workload};
use serde_json::{Value, json};

use crate::{
    config::node::NodeConfig,
    http::{Protocol, services::Service},
    policy::authz::{Facts, Http},
    policy::routes,
    proxy::route::{Route, route},
};

/// What the question names.
#[derive(Debug)]
pub struct Query {
    pub src: String,
    pub dst: SocketAddr,
    pub method: String,
    pub path: String,
}

/// The node's own facts the answer depends on.
pub struct Node<'a> {
    pub name: &'a str,
    pub exclude_ports: &'a [u16],
    /// Undeclared ports relayed as TCP without detection.
    pub opaque_ports: &'a [u16],
    pub exclude_cidrs: &'a [IpNet],
    pub proxy_addrs: &'a [SocketAddr],
    /// Whether a pod is enrolled in this node's kernel maps.
    pub enrolled: &'a dyn Fn(&str, &str) -> bool,
}

/// Why the kernel would not redirect a connection to `dst`, or `None`: it would.
pub fn kernel_skip(dst: SocketAddr, node: &Node<'_>) -> Option<&'static str> {
    if node.exclude_ports.contains(&dst.port()) {
        return Some("skip_excluded_port: the destination port is excluded (--exclude-ports)");
    }
    if dst.ip().is_loopback() || dst.ip().is_unspecified() {
        return Some("skip_loopback: loopback stays inside the pod");
    }
    if node.proxy_addrs.contains(&dst) {
        return Some("skip_proxy_addr: the destination is the node proxy itself");
    }
    if node.exclude_cidrs.iter().any(|c| c.contains(&dst.ip())) {
        return Some(
            "skip_excluded_cidr: the destination is in an excluded CIDR (--exclude-cidrs)",
        );
    }
    None
}

fn pod_of<'a>(placement: &'a Placement, src: &str) -> Option<&'a Workload> {
    match src.parse::<IpAddr>() {
        Ok(ip) => placement.by_ip(ip),
        Err(_) => {
            let (ns, name) = src.split_once('/')?;
            placement.pod(ns, name)
        }
    }
}

pub fn explain(q: &Query, cfg: &NodeConfig, node: &Node<'_>) -> Value {
    let placement = &cfg.placement;
    let mut out = json!({"query": {"src": q.src, "dst": q.dst.to_string()}});
    let Some(src) = pod_of(placement, &q.src) else {
        out["verdict"] = json!(format!(
            "{} is not a pod the mesh knows (config version {}): its connections are not redirected",
            q.src, cfg.version
        ));
        return out;
    };
    let src_key = (src.namespace.as_str(), src.name.as_str());
    let in_config = cfg
        .enrolled
        .contains(&(src.namespace.clone(), src.name.clone()));
    let enrolled = (node.enrolled)(src_key.0, src_key.1);
    out["source"] = json!({
        "pod": format!("{}/{}", src.namespace, src.name),
        "node": src.node,
        "identity": src.identity.to_string(),
        "in_mesh": in_config,
        "enrolled_here": enrolled,
    });
    let redirect = if src.node != node.name {
        Err(format!(
            "the pod runs on node {}: that node's proxy decides (ask its /debug/explain)",
            src.node
        ))
    } else if !in_config {
        Err("skip_not_enrolled: the configuration does not put this pod in the mesh (its namespace is not enrolled, or the pod opts out)".to_string())
    } else if !enrolled {
        Err("skip_not_enrolled: the configuration puts the pod in the mesh but its sandbox is not registered with this node yet".to_string())
    } else if let Some(why) = kernel_skip(q.dst, node) {
        Err(why.to_string())
    } else {
        Ok(())
    };
    out["redirect"] = match &redirect {
        Ok(()) => json!({"redirected": true}),
        Err(why) => json!({"redirected": false, "why": why}),
    };
    if let Err(why) = redirect {
        out["verdict"] = json!(format!("not redirected: {why}"));
        return out;
    }

    // The destination: a Service port, a mesh pod, or outside the mesh.
    let (services, port): (Vec<&Service>, u16) = match cfg.l7.vip(q.dst) {
        Some((svc, port)) => {
            let declared = svc.port(*port).and_then(|p| p.protocol);
            let tcp = crate::http::detect::relayed_as_tcp(declared, *port, node.opaque_ports);
            out["destination"] = json!({
                "service": svc.name,
                "port": port,
                "protocol": match declared {
                    Some(p) => protocol_name(p),
                    None if tcp => "tcp (--opaque-ports)",
                    None => "detect",
                },
            });
            (route_backends(q, svc, *port, tcp, &mut out, cfg), *port)
        }
        None => match placement.by_ip(q.dst.ip()) {
            Some(w) => {
                out["destination"] = json!({
                    "pod": format!("{}/{}", w.namespace, w.name),
                    "node": w.node,
                    "identity": w.identity.to_string(),
                });
                let verdict = endpoint(q, cfg, node, src, w, q.dst.port(), None);
                out["endpoints"] = json!([verdict.0]);
                out["verdict"] = json!(verdict.1);
                return out;
            }
            None => {
                out["destination"] = json!({"outside_mesh": true});
                out["verdict"] =
                    json!("redirected, then relayed directly as plain TCP: not a mesh destination");
                return out;
            }
        },
    };
    let mut endpoints = Vec::new();
    let mut allowed = 0;
    let mut total = 0;
    for svc in &services {
        let target_port = svc
            .port(port)
            .or_else(|| svc.ports.first())
            .map_or(port, |p| p.target_port);
        for e in &svc.endpoints {
            let Some(w) = e.split_once('/').and_then(|(ns, n)| placement.pod(ns, n)) else {
                continue;
            };
            let (v, verdict) = endpoint(q, cfg, node, src, w, target_port, Some(svc));
            total += 1;
            if verdict.starts_with("allowed") {
                allowed += 1;
            }
            endpoints.push(v);
        }
    }
    out["endpoints"] = json!(endpoints);
    out["verdict"] = json!(match (total, allowed) {
        (0, _) => "refused: no ready endpoint".to_string(),
        (t, a) if a == t => format!("allowed to all {t} endpoints"),
        (t, 0) => format!("denied or refused at all {t} endpoints (see endpoints)"),
        (t, a) => format!("allowed to {a} of {t} endpoints (see endpoints)"),
    });
    out
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Http1 => "http",
        Protocol::Http2 => "http2",
        Protocol::Grpc => "grpc",
        Protocol::Tcp => "tcp",
    }
}

/// The route an HTTP request to the Service port takes (none when the port is relayed as `tcp`),
/// and the Services it leads to.
fn route_backends<'a>(
    q: &Query,
    svc: &'a Service,
    port: u16,
    tcp: bool,
    out: &mut Value,
    cfg: &'a NodeConfig,
) -> Vec<&'a Service> {
    let Some(table) = svc.table(port).filter(|_| !tcp) else {
        out["route"] =
            json!({"why": "no HTTPRoute or GRPCRoute for this port: the Service's own endpoints"});
        return vec![svc];
    };
    let (path, query) = q.path.split_once('?').unwrap_or((&q.path, ""));
    let headers = HeaderMap::new();
    let Some((rule, _)) = table.select(&routes::Request {
        method: &q.method,
        path,
        query: (!query.is_empty()).then_some(query),
        headers: &headers,
    }) else {
        out["route"] =
            json!({"why": format!("no rule matches {} {}: answered 404 (NR)", q.method, q.path)});
        return Vec::new();
    };
    out["route"] = json!({
        "name": &*rule.route,
        "rule": rule.index,
        "request": format!("{} {}", q.method, q.path),
        "backends": rule.backends.iter().map(|b| json!({"service": b.service, "weight": b.weight})).collect::<Vec<_>>(),
        "filters": rule.filters.iter().map(|f| f.type_.clone()).collect::<Vec<_>>(),
    });
    rule.backends
        .iter()
        .filter(|b| b.weight > 0)
        .filter_map(|b| cfg.l7.service(&b.service).map(|s| &**s))
        .collect()
}

/// One endpoint: how it is reached and whether its authorization allows the source.
fn endpoint(
    q: &Query,
    cfg: &NodeConfig,
    node: &Node<'_>,
    src: &Workload,
    dst: &Workload,
    port: u16,
    svc: Option<&Service>,
) -> (Value, String) {
    let ip = dst
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == q.dst.is_ipv4())
        .or(dst.ips.first())
        .copied();
    let pod = format!("{}/{}", dst.namespace, dst.name);
    let mut v = json!({"pod": pod, "node": dst.node});
    if let Some(s) = svc {
        v["service"] = json!(s.name);
        if let Some(p) = &s.policy.source {
            v["traffic_policy"] = json!(p);
        }
    }
    let Some(ip) = ip else {
        return (v, "refused: the pod has no address".into());
    };
    let target = SocketAddr::new(ip, port);
    v["address"] = json!(target.to_string());
    let how = route(Some(&cfg.placement), node.name, Some(src), target);
    v["via"] = json!(match &how {
        Route::Direct => "direct".to_string(),
        Route::Local { .. } => "this node (no TLS: both ends known from their sockets)".into(),
        Route::Tunnel { node, dst, .. } => format!("mTLS tunnel to {node}, expecting {dst}"),
        Route::Refuse(why) => format!("refused: {why}"),
    });
    if let Route::Refuse(why) = how {
        return (v, format!("refused: {why}"));
    }
    // This node holds the authorization policies of the namespaces it has pods in.
    let known = cfg
        .placement
        .workloads()
        .any(|w| w.node == node.name && w.namespace == dst.namespace);
    if !known {
        let why = format!(
            "decided by node {}'s proxy, which holds the authorization policies of namespace {} (ask its /debug/explain)",
            dst.node, dst.namespace
        );
        v["authorization"] = json!(why);
        return (v, format!("allowed here; {why}"));
    }
    let headers = HeaderMap::new();
    let l7 = svc.is_some_and(|s| {
        s.port_by_target(port)
            .is_none_or(|p| p.protocol != Some(Protocol::Tcp))
    });
    let verdict = cfg.authz.evaluate(&Facts {
        source: Some(&src.identity),
        source_ip: src.ips.first().copied().unwrap_or(ip),
        namespace: &dst.namespace,
        labels: &dst.labels,
        port,
        http: l7.then_some(Http {
            method: &q.method,
            path: q.path.split('?').next().unwrap_or("/"),
            headers: &headers,
            authority: None,
        }),
    });
    let reason = verdict.decision.reason();
    v["authorization"] = json!(reason);
    (v, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_skips_mirror_the_program() {
        let enrolled = |_: &str, _: &str| true;
        let cidrs: Vec<IpNet> = vec!["10.1.0.0/16".parse().unwrap()];
        let proxy: Vec<SocketAddr> = vec!["10.0.0.1:15001".parse().unwrap()];
        let node = Node {
            name: "n0",
            exclude_ports: &[22],
            opaque_ports: &[],
            exclude_cidrs: &cidrs,
            proxy_addrs: &proxy,
            enrolled: &enrolled,
        };
        let cases = [
            ("10.2.0.5:80", None),
            ("10.2.0.5:22", Some("skip_excluded_port")),
            ("127.0.0.1:80", Some("skip_loopback")),
            ("[::1]:80", Some("skip_loopback")),
            ("0.0.0.0:80", Some("skip_loopback")),
            ("10.0.0.1:15001", Some("skip_proxy_addr")),
            ("10.0.0.1:80", None),
            ("10.1.3.4:80", Some("skip_excluded_cidr")),
        ];
        for (dst, want) in cases {
            let got = kernel_skip(dst.parse().unwrap(), &node);
            assert_eq!(
                got.map(|g| g.split(':').next().unwrap()),
                want,
                "{dst}: {got:?}"
            );
        }
    }
}
