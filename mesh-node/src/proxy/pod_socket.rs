//! The proxy's own sockets towards pods: deliveries to pods of this node (from the proxy's
//! address, recorded for the pods' ingress program, joined to socket acceleration) and
//! connections made inside a pod's network namespace for traffic leaving the mesh as the pod.
use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use tokio::net::TcpStream;

use crate::{
    kernel::accel::{Accel, PodStream},
    kernel::ebpf::{Deliveries, EgressSockets},
    pods::enroll::Pod,
    sys,
};

/// The proxy's side of its connections with local pods. Deliveries come from the proxy's own
/// addresses, which is how the kernel's ingress program tells mesh traffic from plaintext that
/// bypassed the mesh; and the proxy's end of each joins socket acceleration.
#[derive(Clone, Debug, Default)]
pub struct ProxySource {
    pub v4: Option<std::net::Ipv4Addr>,
    pub v6: Option<std::net::Ipv6Addr>,
    pub accel: Accel,
    /// Where each connection to a pod is recorded while it opens: the pod's ingress program
    /// admits only those as mesh traffic.
    pub deliveries: Deliveries,
    /// Where the sockets made in pods' namespaces for traffic leaving the mesh are marked.
    pub egress: EgressSockets,
}

impl ProxySource {
    pub fn for_dst(&self, dst: SocketAddr) -> Option<IpAddr> {
        match dst {
            SocketAddr::V4(_) => self.v4.map(IpAddr::V4),
            SocketAddr::V6(_) => self.v6.map(IpAddr::V6),
        }
    }

    /// Connects to a pod of this node, from the proxy's address of `dst`'s family (no Nagle: the
    /// proxy writes what it has).
    ///
    /// The connection is recorded in the kernel between bind (which fixes its source port) and
    /// connect, and forgotten once the handshake is over: the pod's ingress program admits its
    /// SYN (and retransmissions of it) as mesh traffic and nothing else from this address.
    pub async fn connect_local(&self, dst: SocketAddr) -> io::Result<PodStream> {
        let sock = if dst.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        let from = self.for_dst(dst).unwrap_or(match dst {
            SocketAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            SocketAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        });
        sock.bind(SocketAddr::new(from, 0))?;
        let key = crate::kernel::ebpf::sock_key(sock.local_addr()?, dst);
        let marked = self.deliveries.mark(key).map_err(io::Error::other)?;
        let connected = sock.connect(dst).await;
        drop(marked);
        let s = connected?;
        let _ = s.set_nodelay(true);
        Ok(self.accel.register(s))
    }

    /// Connects to `dst` outside the mesh as `pod` would without the mesh: from a socket of the
    /// pod's network namespace, so the connection has the pod's address and meets the pod's
    /// routes, egress policy and firewalls, not the node's. The socket is checked to really be in
    /// the namespace the pod was enrolled with (the path could name another by now).
    pub async fn connect_as(&self, pod: &Pod, dst: SocketAddr) -> io::Result<TcpStream> {
        let netns = std::fs::File::open(&pod.netns)?;
        let sock = sys::socket_in(&netns, socket2::Domain::for_address(dst))?;
        if sys::socket_netns_cookie(&sock)? != pod.netns_cookie {
            return Err(io::Error::other(
                "the pod's network namespace is not the one it was enrolled with",
            ));
        }
        if dst.is_ipv6() {
            sock.set_only_v6(true)?;
        }
        sock.set_nonblocking(true)?;
        let cookie = sys::socket_cookie(&sock)?;
        let marked = self.egress.mark(cookie).map_err(io::Error::other)?;
        let sock = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
        let connected = sock.connect(dst).await;
        drop(marked);
        let s = connected?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}
