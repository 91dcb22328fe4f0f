//! The controller's configuration: what sources said, what was accepted, its versions.
//!
//! Sources (the Kubernetes watches, or the local directory) hand in whole object sets and pod
//! placement; the store validates, keeps the last good version of every object that turned bad,
//! and publishes a new version whenever what nodes would receive changes. A bounded history of
//! accepted object sets backs `mesh-ctrl history` and `rollback`.
use mesh_api::sync::LockExt;
use std::{
    collections::{BTreeSet, VecDeque},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use kube::{Resource, ResourceExt};
use mesh_api::placement::Placement;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    objects::{ByName, ObjectRef, Objects},
    snapshot::Computed,
    validate::{Invalid, validate},
};

/// Versions kept for `history` and `rollback`.
pub const HISTORY: usize = 50;

/// One published configuration.
#[derive(Debug)]
pub struct Version {
    pub number: u64,
    pub computed: Computed,
    /// When it was published: push latency is measured from here to each node's ack.
    pub published: std::time::Instant,
}

/// One accepted change, as `mesh-ctrl history` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct HistoryEntry {
    pub version: u64,
    #[serde(serialize_with = "crate::unix_seconds")]
    pub at: SystemTime,
    /// `+ kind ns/name`, `- ...`, `~ ...`, or `placement` when only pods moved.
    pub changes: Vec<String>,
    #[serde(skip)]
    pub objects: Arc<Objects>,
}

struct Inner {
    accepted: Arc<Objects>,
    placement: Arc<Placement>,
    rejected: Vec<Invalid>,
    history: VecDeque<HistoryEntry>,
}

pub struct Store {
    inner: Mutex<Inner>,
    tx: watch::Sender<Arc<Version>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(Version {
            number: 0,
            computed: Computed::default(),
            published: std::time::Instant::now(),
        }));
        Self {
            inner: Mutex::new(Inner {
                accepted: Arc::default(),
                placement: Arc::default(),
                rejected: Vec::new(),
                history: VecDeque::new(),
            }),
            tx,
        }
    }

    /// Every published version, newest first as it arrives.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Version>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<Version> {
        self.tx.borrow().clone()
    }

    /// The objects a source now sees. Returns the problems found (also kept for status).
    pub fn set_objects(&self, raw: &Objects) -> Vec<Invalid> {
        let mut inner = self.inner.locked();
        let invalid = validate(raw);
        let bad: BTreeSet<ObjectRef> = invalid.iter().map(|i| i.object.clone()).collect();
        for i in &invalid {
            warn!(object = %i.object, field = %i.field, reason = %i.reason, "rejected; its last good version (if any) keeps serving");
        }
        let prev = inner.accepted.clone();
        let accepted = Objects {
            namespaces: keep_good("Namespace", &raw.namespaces, &prev.namespaces, &bad),
            services: keep_good("Service", &raw.services, &prev.services, &bad),
            endpoint_slices: raw.endpoint_slices.clone(),
            http_routes: keep_good("HTTPRoute", &raw.http_routes, &prev.http_routes, &bad),
            grpc_routes: keep_good("GRPCRoute", &raw.grpc_routes, &prev.grpc_routes, &bad),
            authorization_policies: keep_good(
                "AuthorizationPolicy",
                &raw.authorization_policies,
                &prev.authorization_policies,
                &bad,
            ),
            peer_authentications: keep_good(
                "PeerAuthentication",
                &raw.peer_authentications,
                &prev.peer_authentications,
                &bad,
            ),
            traffic_policies: keep_good(
                "TrafficPolicy",
                &raw.traffic_policies,
                &prev.traffic_policies,
                &bad,
            ),
            telemetries: keep_good("Telemetry", &raw.telemetries, &prev.telemetries, &bad),
        };
        let mut changes = changes(&prev, &accepted);
        if changes.is_empty() {
            // Only EndpointSlices moved (they are not listed object by object).
            changes.push("endpoints".into());
        }
        inner.accepted = Arc::new(accepted);
        inner.rejected = invalid.clone();
        self.publish(&mut inner, changes);
        invalid
    }

    /// Pods and nodes as the placement source now sees them.
    pub fn set_placement(&self, placement: Placement) {
        let mut inner = self.inner.locked();
        inner.placement = Arc::new(placement);
        self.publish(&mut inner, vec!["placement".into()]);
    }

    /// What the current version was computed from (for `explain`).
    pub fn inputs(&self) -> (Arc<Objects>, Arc<Placement>) {
        let inner = self.inner.locked();
        (inner.accepted.clone(), inner.placement.clone())
    }

    /// Objects rejected by the last validation.
    pub fn rejected(&self) -> Vec<Invalid> {
        self.inner.locked().rejected.clone()
    }

    pub fn history(&self) -> Vec<HistoryEntry> {
        let inner = self.inner.locked();
        inner.history.iter().rev().cloned().collect()
    }

    /// The object set accepted at `version`, if still in the history.
    pub fn objects_at(&self, version: u64) -> Option<Arc<Objects>> {
        let inner = self.inner.locked();
        inner
            .history
            .iter()
            .find(|h| h.version == version)
            .map(|h| h.objects.clone())
    }

    /// Recomputes and publishes a new version if what nodes would get changed.
    fn publish(&self, inner: &mut Inner, changes: Vec<String>) {
        let computed = Computed::compute(&inner.accepted, &inner.placement);
        let current = self.tx.borrow().clone();
        if computed == current.computed && current.number != 0 {
            return;
        }
        let number = current.number + 1;
        info!(version = number, changes = ?changes, resources = computed.len(), "configuration version");
        inner.history.push_back(HistoryEntry {
            version: number,
            at: SystemTime::now(),
            changes,
            objects: inner.accepted.clone(),
        });
        while inner.history.len() > HISTORY {
            inner.history.pop_front();
        }
        self.tx.send_replace(Arc::new(Version {
            number,
            computed,
            published: std::time::Instant::now(),
        }));
    }
}

/// The new objects, except that an invalid one is replaced by its previous good version (or left
/// out if it never had one).
fn keep_good<T: Clone + Resource + ResourceExt>(
    kind: &'static str,
    raw: &ByName<T>,
    prev: &ByName<T>,
    bad: &BTreeSet<ObjectRef>,
) -> ByName<T> {
    raw.iter()
        .filter_map(|(k, o)| {
            let r = ObjectRef {
                kind,
                namespace: k.0.clone(),
                name: k.1.clone(),
            };
            if bad.contains(&r) {
                prev.get(k).map(|p| (k.clone(), p.clone()))
            } else {
                Some((k.clone(), o.clone()))
            }
        })
        .collect()
}

/// What changed between two accepted sets, for the history.
fn changes(before: &Objects, after: &Objects) -> Vec<String> {
    fn each<T: serde::Serialize>(kind: &str, a: &ByName<T>, b: &ByName<T>, out: &mut Vec<String>) {
        let json = |o: &T| serde_json::to_value(o).ok();
        for (k, o) in b {
            match a.get(k) {
                None => out.push(format!("+ {kind} {}/{}", k.0, k.1)),
                Some(old) if json(old) != json(o) => out.push(format!("~ {kind} {}/{}", k.0, k.1)),
                Some(_) => {}
            }
        }
        for k in a.keys().filter(|k| !b.contains_key(*k)) {
            out.push(format!("- {kind} {}/{}", k.0, k.1));
        }
    }
    let mut out = Vec::new();
    each("Namespace", &before.namespaces, &after.namespaces, &mut out);
    each("Service", &before.services, &after.services, &mut out);
    each(
        "HTTPRoute",
        &before.http_routes,
        &after.http_routes,
        &mut out,
    );
    each(
        "GRPCRoute",
        &before.grpc_routes,
        &after.grpc_routes,
        &mut out,
    );
    each(
        "AuthorizationPolicy",
        &before.authorization_policies,
        &after.authorization_policies,
        &mut out,
    );
    each(
        "PeerAuthentication",
        &before.peer_authentications,
        &after.peer_authentications,
        &mut out,
    );
    each(
        "TrafficPolicy",
        &before.traffic_policies,
        &after.traffic_policies,
        &mut out,
    );
    each(
        "Telemetry",
        &before.telemetries,
        &after.telemetries,
        &mut out,
    );
    out
}
