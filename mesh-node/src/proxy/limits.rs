//! The node proxy's bounds: what one client, one pod or a flood can hold of it. One proxy carries
//! every enrolled pod of its node, so each resource a stranger or a single pod can grow has a
//! limit here, a flag, and a counter of the times it was hit (`mesh_limit_hits_total{limit}`).
//! At a limit the newcomer is refused with a reset (or, for handshakes, the oldest is cut), and
//! the proxy goes on serving everybody else.
use mesh_api::sync::LockExt;
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::kernel::orig_dst::PodId;

/// How long an HTTP client of the admin or metrics listeners has for a request head, and for the
/// next one on a kept-alive connection.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head the admin and metrics listeners read.
pub const MAX_ADMIN_HEAD: usize = 16 * 1024;

/// Which limit was hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    TunnelHandshakes,
    ConnectionsPerPod,
    RequestsPerPod,
    AdminConnections,
}

impl Limit {
    pub const ALL: [Limit; 4] = [
        Limit::TunnelHandshakes,
        Limit::ConnectionsPerPod,
        Limit::RequestsPerPod,
        Limit::AdminConnections,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Limit::TunnelHandshakes => "tunnel_handshakes",
            Limit::ConnectionsPerPod => "connections_per_pod",
            Limit::RequestsPerPod => "requests_per_pod",
            Limit::AdminConnections => "admin_connections",
        }
    }
}

/// Times each limit was hit.
#[derive(Debug, Default)]
pub struct Hits([AtomicU64; Limit::ALL.len()]);

impl Hits {
    pub fn hit(&self, limit: Limit) {
        self.0[limit as usize].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> serde_json::Value {
        Limit::ALL
            .iter()
            .map(|l| {
                (
                    l.name().to_string(),
                    self.0[*l as usize].load(Relaxed).into(),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

/// Something each pod holds at most `max` of at once (connections, requests in flight).
pub struct PerPod {
    max: usize,
    open: Mutex<HashMap<PodId, Arc<Semaphore>>>,
}

impl PerPod {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Mutex::default(),
        }
    }

    /// A slot for one more connection of `pod`, held until the connection ends; `None` at the
    /// limit.
    pub fn admit(&self, pod: PodId) -> Option<PodSlot> {
        let permit = self.budget(pod).try_acquire_owned().ok()?;
        Some(PodSlot(permit))
    }

    /// `pod`'s budget itself, for a holder that takes from it many times (a connection's
    /// requests): kept as long as someone holds it.
    pub fn budget(&self, pod: PodId) -> Arc<Semaphore> {
        self.open
            .locked()
            .entry(pod)
            .or_insert_with(|| Arc::new(Semaphore::new(self.max)))
            .clone()
    }

    /// Forgets pods whose budget nobody holds (no slot taken, no holder of the budget): a pod
    /// that comes back starts from a full one, as it would have.
    pub fn prune(&self) {
        self.open.locked().retain(|_, s| Arc::strong_count(s) > 1);
    }
}

/// One open connection of a pod.
pub struct PodSlot(#[allow(dead_code)] OwnedSemaphorePermit);

/// Handshakes in progress, at most `max`: a new one beyond that cuts the oldest. Keeping the
/// newest is what lets honest peers through a flood of idle connections: theirs finish in
/// milliseconds, so the oldest in progress is the one that idles.
pub struct Handshakes {
    max: usize,
    inner: Mutex<(u64, std::collections::BTreeMap<u64, CancellationToken>)>,
}

impl Handshakes {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            inner: Mutex::default(),
        })
    }

    /// Registers a handshake; the second value says whether the oldest was cut for it.
    pub fn start(self: &Arc<Self>) -> (Handshake, bool) {
        let cut = CancellationToken::new();
        let mut g = self.inner.locked();
        let evicted = if g.1.len() >= self.max {
            g.1.pop_first()
                .inspect(|(_, oldest)| oldest.cancel())
                .is_some()
        } else {
            false
        };
        g.0 += 1;
        let id = g.0;
        g.1.insert(id, cut.clone());
        (
            Handshake {
                id,
                set: self.clone(),
                cut,
            },
            evicted,
        )
    }

    pub fn in_progress(&self) -> usize {
        self.inner.locked().1.len()
    }
}

/// One handshake in progress, until dropped.
pub struct Handshake {
    id: u64,
    set: Arc<Handshakes>,
    cut: CancellationToken,
}

impl Handshake {
    /// Resolves if a newer handshake needed this one's place.
    pub async fn cut(&self) {
        self.cut.cancelled().await
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.set.inner.locked().1.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;

    #[test]
    fn a_pod_at_its_limit_is_refused_and_others_are_not() {
        let p = PerPod::new(2);
        let a1 = p.admit(PodId(1)).unwrap();
        let _a2 = p.admit(PodId(1)).unwrap();
        assert!(p.admit(PodId(1)).is_none(), "third connection of pod 1");
        assert!(p.admit(PodId(2)).is_some(), "pod 2 has its own budget");
        drop(a1);
        assert!(
            p.admit(PodId(1)).is_some(),
            "a slot comes back when a connection ends"
        );
    }

    #[test]
    fn a_held_budget_is_kept_and_shared() {
        let p = PerPod::new(2);
        let held = p.budget(PodId(1));
        p.prune();
        let other = p.budget(PodId(1));
        {
            let _one = held.try_acquire().unwrap();
            let _two = other.try_acquire().unwrap();
            assert!(
                other.try_acquire().is_err(),
                "two holders of one pod's budget share its limit"
            );
        }
        drop((held, other));
        p.prune();
        assert!(p.open.lock().unwrap().is_empty());
    }

    #[test]
    fn idle_pods_are_pruned() {
        let p = PerPod::new(2);
        let kept = p.admit(PodId(1)).unwrap();
        drop(p.admit(PodId(2)).unwrap());
        p.prune();
        assert_eq!(p.open.lock().unwrap().len(), 1);
        drop(kept);
        p.prune();
        assert!(p.open.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_oldest_handshake_makes_room_for_a_new_one() {
        let h = Handshakes::new(2);
        let (first, e1) = h.start();
        let (second, e2) = h.start();
        assert!(!e1 && !e2);
        let (third, e3) = h.start();
        assert!(e3, "at the limit the oldest is cut");
        tokio::time::timeout(Duration::from_millis(10), first.cut())
            .await
            .expect("the first handshake was told");
        assert!(
            tokio::time::timeout(Duration::from_millis(10), second.cut())
                .await
                .is_err(),
            "the second was not"
        );
        drop((first, second));
        assert_eq!(h.in_progress(), 1);
        drop(third);
        assert_eq!(h.in_progress(), 0);
    }

    #[test]
    fn zero_is_not_a_limit() {
        let l = Limits {
            max_tunnel_handshakes: 0,
            max_connections_per_pod: 1,
            max_requests_per_pod: 1,
            max_admin_connections: 1,
            tunnel_idle_timeout: Duration::from_secs(1),
        };
        assert_eq!(l.invalid(), Some("--max-tunnel-handshakes"));
        let l = Limits {
            max_tunnel_handshakes: 1,
            tunnel_idle_timeout: Duration::ZERO,
            ..l
        };
        assert_eq!(l.invalid(), Some("--tunnel-idle-timeout"));
    }
}
