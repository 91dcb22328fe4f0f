//! The connections this proxy is carrying right now, for `/debug/connections`: each accepted
//! connection registers itself and is removed when its handle drops, however it ends.
use mesh_api::sync::LockExt;
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Instant, SystemTime},
};

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Live {
    pub id: u64,
    /// `outbound` (from a pod of this node) or `inbound` (from another node's proxy).
    pub direction: &'static str,
    /// `tcp`, `http1`, `http2`.
    pub protocol: &'static str,
    /// `namespace/name` of the pod that opened it, when known.
    pub source: String,
    pub source_address: SocketAddr,
    pub source_identity: String,
    /// Where the app connected (a Service or a pod address).
    pub destination: SocketAddr,
    /// `namespace/name` of the destination pod, when known.
    pub destination_workload: String,
    /// How it is carried: `direct`, `local`, `tunnel via <node>`, `http` (per request).
    pub via: String,
    pub started: String,
    #[serde(skip)]
    since: Option<Instant>,
    pub age_seconds: f64,
}

impl Live {
    pub fn new(
        direction: &'static str,
        source_address: SocketAddr,
        destination: SocketAddr,
    ) -> Self {
        Self {
            id: 0,
            direction,
            protocol: "tcp",
            source: String::new(),
            source_address,
            source_identity: String::new(),
            destination,
            destination_workload: String::new(),
            via: String::new(),
            started: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            since: Some(Instant::now()),
            age_seconds: 0.0,
        }
    }
}

#[derive(Debug, Default)]
pub struct Connections {
    next: AtomicU64,
    live: Mutex<BTreeMap<u64, Live>>,
}

/// A registered connection; dropping it removes the entry.
#[derive(Debug)]
pub struct Tracked {
    conns: Arc<Connections>,
    id: u64,
}

impl Connections {
    pub fn track(self: &Arc<Self>, mut live: Live) -> Tracked {
        let id = self.next.fetch_add(1, Relaxed) + 1;
        live.id = id;
        self.live.locked().insert(id, live);
        Tracked {
            conns: self.clone(),
            id,
        }
    }

    /// Every live connection, oldest first, with its age; `pod` (`namespace/name`) keeps those it
    /// is the source or the destination of.
    pub fn list(&self, pod: Option<&str>) -> Vec<Live> {
        let now = Instant::now();
        self.live
            .locked()
            .values()
            .filter(|l| pod.is_none_or(|p| l.source == p || l.destination_workload == p))
            .map(|l| {
                let mut l = l.clone();
                l.age_seconds = l
                    .since
                    .map_or(0.0, |s| (now - s).as_secs_f64() * 1000.0)
                    .round()
                    / 1000.0;
                l
            })
            .collect()
    }
}

impl Tracked {
    pub fn update(&self, f: impl FnOnce(&mut Live)) {
        if let Some(l) = self.conns.live.locked().get_mut(&self.id) {
            f(l);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.conns.live.locked().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_live_as_long_as_their_handle() {
        let c = Arc::new(Connections::default());
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let a = c.track(Live::new("outbound", addr, addr));
        let b = c.track(Live::new("inbound", addr, addr));
        a.update(|l| {
            l.source = "shop/web".into();
            l.via = "local".into();
        });
        assert_eq!(c.list(None).len(), 2);
        let only = c.list(Some("shop/web"));
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].via, "local");
        drop(a);
        assert_eq!(c.list(None).len(), 1);
        drop(b);
        assert!(c.list(None).is_empty());
    }
}
