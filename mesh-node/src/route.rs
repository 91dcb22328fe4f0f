//! Where a redirected connection goes: a pure function of what the node knows, tested by table.
use std::net::SocketAddr;

use mesh_api::{identity::SpiffeId, placement::Placement};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Not a mesh destination (or no mesh identity configured): plain TCP to it.
    Direct,
    /// A workload of this node: delivered locally, no TLS (both ends are known from sockets),
    /// after the same checks the tunnel's inbound side makes.
    Local { namespace: String, name: String },
    /// A workload of another node: through that node's proxy, over mTLS.
    Tunnel {
        node: SocketAddr,
        src: SpiffeId,
        dst: SpiffeId,
    },
    /// Fail closed.
    Refuse(&'static str),
}

pub fn route(
    placement: Option<&Placement>,
    this_node: &str,
    src: (&str, &str),
    dst: SocketAddr,
) -> Route {
    let Some(p) = placement else {
        return Route::Direct;
    };
    let Some(w) = p.by_ip(dst.ip()) else {
        return Route::Direct;
    };
    if w.node == this_node {
        return Route::Local {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
        };
    }
    let Some(src_w) = p.pod(src.0, src.1) else {
        return Route::Refuse("source pod has no mesh identity (not in placement)");
    };
    if src_w.node != this_node {
        return Route::Refuse("source pod is placed on another node");
    }
    match p.tunnel_addr(&w.node, dst.ip()) {
        Some(node) => Route::Tunnel {
            node,
            src: src_w.identity.clone(),
            dst: w.identity.clone(),
        },
        None => Route::Refuse("destination node has no tunnel address"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = r#"{
        "trust_domain": "td",
        "nodes": [{"name": "a", "addresses": ["10.0.0.1", "fd00::1"]}, {"name": "b", "addresses": ["10.0.0.2", "fd00::2"]}],
        "pods": [
            {"namespace": "ns", "name": "client", "node": "a", "service_account": "c", "ips": ["10.1.0.1"]},
            {"namespace": "ns", "name": "near", "node": "a", "ips": ["10.1.0.2"]},
            {"namespace": "ns", "name": "far", "node": "b", "service_account": "web", "ips": ["10.2.0.1", "fd00:2::1"]},
            {"namespace": "ns", "name": "elsewhere", "node": "b", "ips": ["10.2.0.2"]}
        ]
    }"#;

    type Case<'a> = (Option<&'a Placement>, (&'a str, &'a str), SocketAddr, Route);

    #[test]
    fn table() {
        let p = Placement::parse(P.as_bytes()).unwrap();
        let id = |ns: &str, sa: &str| SpiffeId::new("td", ns, sa).unwrap();
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let cases: Vec<Case> = vec![
            (None, ("ns", "client"), a("10.2.0.1:80"), Route::Direct),
            (
                Some(&p),
                ("ns", "client"),
                a("192.0.2.1:443"),
                Route::Direct,
            ),
            (
                Some(&p),
                ("ns", "client"),
                a("10.1.0.2:80"),
                Route::Local {
                    namespace: "ns".into(),
                    name: "near".into(),
                },
            ),
            (
                Some(&p),
                ("ns", "client"),
                a("10.2.0.1:80"),
                Route::Tunnel {
                    node: a("10.0.0.2:15008"),
                    src: id("ns", "c"),
                    dst: id("ns", "web"),
                },
            ),
            (
                Some(&p),
                ("ns", "client"),
                a("[fd00:2::1]:80"),
                Route::Tunnel {
                    node: a("[fd00::2]:15008"),
                    src: id("ns", "c"),
                    dst: id("ns", "web"),
                },
            ),
            (
                Some(&p),
                ("ns", "ghost"),
                a("10.2.0.1:80"),
                Route::Refuse("source pod has no mesh identity (not in placement)"),
            ),
            (
                Some(&p),
                ("ns", "elsewhere"),
                a("10.2.0.1:80"),
                Route::Refuse("source pod is placed on another node"),
            ),
        ];
        for (placement, src, dst, expected) in cases {
            assert_eq!(
                route(placement, "a", src, dst),
                expected,
                "{src:?} -> {dst}"
            );
        }
    }
}
