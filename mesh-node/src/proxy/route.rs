//! Where a redirected connection goes: a pure function of what the node knows, tested by table.
use std::net::SocketAddr;

use mesh_api::{
    identity::SpiffeId,
    placement::{Placement, Workload},
};

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
    Refuse(Refusal),
}

/// Why a connection to a mesh destination is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("source pod has no mesh identity (not in placement)")]
    SourceWithoutIdentity,
    #[error("source pod is placed on another node")]
    SourceOnAnotherNode,
    #[error("destination node has no tunnel address")]
    NoTunnelAddress,
}

/// `src` is the connecting pod's workload in `placement` (resolved once by the caller; `None`:
/// the pod has no mesh identity).
pub fn route(
    placement: Option<&Placement>,
    this_node: &str,
    src: Option<&Workload>,
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
    let Some(src_w) = src else {
        return Route::Refuse(Refusal::SourceWithoutIdentity);
    };
    if src_w.node != this_node {
        return Route::Refuse(Refusal::SourceOnAnotherNode);
    }
    match p.tunnel_addr(&w.node, dst.ip()) {
        Some(node) => Route::Tunnel {
            node,
            src: src_w.identity.clone(),
            dst: w.identity.clone(),
        },
        None => Route::Refuse(Refusal::NoTunnelAddress),
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
                Route::Refuse(Refusal::SourceWithoutIdentity),
            ),
            (
                Some(&p),
                ("ns", "elsewhere"),
                a("10.2.0.1:80"),
                Route::Refuse(Refusal::SourceOnAnotherNode),
            ),
        ];
        for (placement, src, dst, expected) in cases {
            let src_w = placement.and_then(|p| p.pod(src.0, src.1));
            assert_eq!(
                route(placement, "a", src_w, dst),
                expected,
                "{src:?} -> {dst}"
            );
        }
    }
}
