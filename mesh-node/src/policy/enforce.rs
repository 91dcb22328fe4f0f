//! Authorization where connections are delivered to this node's pods (from the tunnel, or from a
//! pod of the same node), with the caller's identity proven by mTLS or by the socket.
//!
//! Every admitted connection stays registered while it lives; when a new configuration arrives,
//! each is judged again and the ones the new policy denies are closed.
use mesh_api::sync::LockExt;
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use mesh_api::identity::SpiffeId;
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::{
    config::node::NodeConfig,
    policy::authz::{Decision, Facts, Verdict},
};

/// The L4 facts of a connection to one of this node's pods.
#[derive(Clone, Debug)]
pub struct Conn {
    /// `None` for plaintext.
    pub source: Option<SpiffeId>,
    pub source_ip: IpAddr,
    pub namespace: String,
    /// The destination pod.
    pub pod: String,
    pub port: u16,
}

#[derive(Default, Debug, Serialize)]
pub struct EnforceStats {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    /// Live connections closed because a new policy denies them.
    pub closed_by_policy: AtomicU64,
}

/// A live connection and how to close it (taken once used).
type Live = (Conn, Option<oneshot::Sender<()>>);

pub struct Enforcer {
    config: watch::Receiver<Arc<NodeConfig>>,
    live: Mutex<HashMap<u64, Live>>,
    next: AtomicU64,
    pub stats: EnforceStats,
    /// By policy and action, shared with the HTTP path.
    pub decisions: Arc<crate::policy::authz::DecisionCounts>,
}

/// An admitted connection: deregistered when dropped; `revoked` resolves when a new policy denies
/// it.
pub struct Admitted {
    id: u64,
    enforcer: Arc<Enforcer>,
    pub revoked: oneshot::Receiver<()>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.enforcer.live.locked().remove(&self.id);
    }
}

impl Enforcer {
    pub fn new(
        config: watch::Receiver<Arc<NodeConfig>>,
        decisions: Arc<crate::policy::authz::DecisionCounts>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            live: Mutex::default(),
            next: AtomicU64::new(0),
            stats: EnforceStats::default(),
            decisions,
        })
    }

    fn judge(cfg: &NodeConfig, c: &Conn) -> Verdict {
        let empty = Default::default();
        let labels = cfg
            .placement
            .pod(&c.namespace, &c.pod)
            .map_or(&empty, |w| &w.labels);
        cfg.authz.evaluate(&Facts {
            source: c.source.as_ref(),
            source_ip: c.source_ip,
            namespace: &c.namespace,
            labels,
            port: c.port,
            http: None,
        })
    }

    /// Admits `c` if the current policy allows it; the error says which rule denied it.
    pub fn admit(self: &Arc<Self>, c: Conn) -> Result<Admitted, Denied> {
        let verdict = Self::judge(&self.config.borrow(), &c);
        self.decisions.record("tcp", &verdict);
        for a in &verdict.audited {
            info!(audit = %a, src = ?c.source.as_ref().map(ToString::to_string), dst = %format!("{}/{}", c.namespace, c.pod), "audited connection");
        }
        if !verdict.decision.allowed() {
            self.stats.denied.fetch_add(1, Relaxed);
            return Err(Denied(verdict.decision));
        }
        self.stats.allowed.fetch_add(1, Relaxed);
        let (tx, rx) = oneshot::channel();
        let id = self.next.fetch_add(1, Relaxed);
        self.live.locked().insert(id, (c, Some(tx)));
        Ok(Admitted {
            id,
            enforcer: self.clone(),
            revoked: rx,
        })
    }

    /// Judges live connections again on every new configuration.
    pub async fn run(self: Arc<Self>) {
        let mut config = self.config.clone();
        while config.changed().await.is_ok() {
            let cfg = config.borrow_and_update().clone();
            let mut live = self.live.locked();
            for (c, cancel) in live.values_mut() {
                let verdict = Self::judge(&cfg, c);
                if !verdict.decision.allowed()
                    && let Some(cancel) = cancel.take()
                {
                    warn!(src = ?c.source.as_ref().map(ToString::to_string), dst = %format!("{}/{}", c.namespace, c.pod), reason = %verdict.decision.reason(), version = cfg.version, "closing a connection the new policy denies");
                    self.stats.closed_by_policy.fetch_add(1, Relaxed);
                    let _ = cancel.send(());
                }
            }
        }
    }
}

/// A tunnel stream claimed (`Forwarded: for=`) a source address that is not a workload carrying
/// the identity its peer proved.
#[derive(Debug, thiserror::Error)]
#[error("claimed source {claimed:?} is not a workload of {proven}")]
pub struct SpoofedSource {
    pub claimed: String,
    pub proven: String,
}

/// Where a tunnel stream comes from, for `ipBlocks`, metrics and logs: the address its
/// `Forwarded: for=` names, accepted only when that address is a workload carrying the identity
/// the peer just proved (an authenticated peer must not pick its source address); without the
/// header, the peer's own address.
pub fn claimed_source(
    placement: &mesh_api::placement::Placement,
    forwarded: Option<&str>,
    proven: &SpiffeId,
    peer: IpAddr,
) -> Result<IpAddr, SpoofedSource> {
    let Some(header) = forwarded.filter(|h| !h.is_empty()) else {
        return Ok(peer);
    };
    match forwarded_for(header) {
        Some(ip) if placement.by_ip(ip).is_some_and(|w| &w.identity == proven) => Ok(ip),
        _ => Err(SpoofedSource {
            claimed: header.to_string(),
            proven: proven.to_string(),
        }),
    }
}

/// The client address in a `Forwarded: for="ip:port"` header (HBONE), if any.
pub fn forwarded_for(header: &str) -> Option<IpAddr> {
    let v = header
        .split(';')
        .find_map(|p| p.trim().strip_prefix("for="))?
        .trim_matches('"');
    v.parse::<std::net::SocketAddr>()
        .map(|a| a.ip())
        .ok()
        .or_else(|| v.trim_matches(['[', ']']).parse().ok())
}

/// A connection the policy refuses: the decision, printed as why (`denied by <rule>`, ...).
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.reason())]
pub struct Denied(Decision);

/// Runs `pump` until it ends, or until a new policy revokes the connection (dropping the pump
/// resets both sides).
pub async fn until_revoked<T>(
    pump: impl std::future::Future<Output = T>,
    admitted: Option<Admitted>,
) -> Option<T> {
    let Some(mut admitted) = admitted else {
        return Some(pump.await);
    };
    tokio::select! {
        r = pump => Some(r),
        Ok(()) = &mut admitted.revoked => {
            info!("closed: the policy now denies this connection");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::forwarded_for;

    #[test]
    fn forwarded() {
        for (h, want) in [
            (r#"for="10.1.2.3:4567""#, Some("10.1.2.3")),
            (r#"for="[fd00::1]:80""#, Some("fd00::1")),
            (r#"proto=http;for="10.0.0.9:1""#, Some("10.0.0.9")),
            ("for=10.0.0.7", Some("10.0.0.7")),
            ("by=x", None),
            ("", None),
        ] {
            assert_eq!(forwarded_for(h), want.map(|w| w.parse().unwrap()), "{h:?}");
        }
    }
}
