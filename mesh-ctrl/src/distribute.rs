//! Streams node-scoped configuration to node proxies (`mesh.config.v1.ConfigDiscovery`).
//!
//! One task per subscribed node follows the store's versions, sends the node what changed for it,
//! and records the node's acks and nacks for `mesh-ctrl status`. The last version sent to each
//! node is remembered, so a node that reconnects holding it gets a delta instead of everything.
use mesh_api::sync::LockExt;
use std::{
    collections::{BTreeMap, HashMap},
    pin::Pin,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use mesh_api::config::v1::{
    self as pb, ConfigUpdate, NodeMessage, config_discovery_server::ConfigDiscovery,
    node_message::Kind as Msg,
};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::{
    auth::NodeAuth,
    model::{
        snapshot::{Snapshot, delta},
        store::{Store, Version},
    },
};

/// What the controller knows of one node's subscription.
#[derive(Clone, Debug, Serialize)]
pub struct NodeState {
    pub connected: bool,
    /// Last version sent to the node.
    pub sent_version: u64,
    /// Last version the node applied.
    pub acked_version: u64,
    /// The last version the node refused, and why.
    pub nacked: Option<(u64, String)>,
    /// From publishing the last acknowledged version to the node's ack, seconds.
    pub push_latency_seconds: Option<f64>,
    #[serde(serialize_with = "crate::unix_seconds")]
    pub since: SystemTime,
}

pub struct ConfigService {
    pub store: Arc<Store>,
    pub auth: Arc<NodeAuth>,
    nodes: Arc<Mutex<BTreeMap<String, NodeState>>>,
    /// The version last sent to each node: the base of a delta when it reconnects.
    sent: Arc<Mutex<HashMap<String, Arc<Version>>>>,
    deltas: Arc<SharedDeltas>,
    /// Set on shutdown: streams end, so the server can stop (nodes reconnect elsewhere).
    closing: tokio::sync::watch::Sender<bool>,
}

impl ConfigService {
    pub fn new(store: Arc<Store>, auth: Arc<NodeAuth>) -> Self {
        Self {
            store,
            auth,
            nodes: Arc::default(),
            sent: Arc::default(),
            deltas: Arc::default(),
            closing: tokio::sync::watch::channel(false).0,
        }
    }

    /// Ends every subscription stream, now and for streams opened from here on.
    pub fn closer(&self) -> impl FnOnce() + Send + 'static {
        let closing = self.closing.clone();
        move || {
            closing.send_replace(true);
        }
    }

    /// Subscription state of every node that ever subscribed.
    pub fn nodes(&self) -> Arc<Mutex<BTreeMap<String, NodeState>>> {
        self.nodes.clone()
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigDiscovery for ConfigService {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        req: Request<Streaming<NodeMessage>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let node = self
            .auth
            .authenticate(req.metadata())
            .await
            .map_err(|e| Status::unauthenticated(mesh_api::placement::error_chain(&e)))?;
        let mut inbound = req.into_inner();
        let hello = match inbound.next().await {
            Some(Ok(NodeMessage {
                kind: Some(Msg::Hello(h)),
            })) => h,
            Some(Err(e)) => return Err(e),
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        if hello.node != node {
            return Err(Status::permission_denied(format!(
                "authenticated as node {node:?}, subscribing as {:?}",
                hello.node
            )));
        }
        info!(%node, last_version = hello.last_version, "node subscribed");
        // Resume from what the node holds, if we still know what that was.
        let base = self
            .sent
            .locked()
            .get(&node)
            .filter(|v| v.number == hello.last_version && hello.last_version != 0)
            .cloned();
        self.nodes.locked().insert(
            node.clone(),
            NodeState {
                connected: true,
                sent_version: 0,
                acked_version: hello.last_version,
                nacked: None,
                push_latency_seconds: None,
                since: SystemTime::now(),
            },
        );
        let (tx, rx) = mpsc::channel(4);
        let sender = Sender {
            node: node.clone(),
            deltas: self.deltas.clone(),
            nodes: self.nodes.clone(),
            sent: self.sent.clone(),
        };
        let versions = self.store.subscribe();
        let mut closing = self.closing.subscribe();
        let run = sender.clone().run(versions, base, tx);
        let send_task = tokio::spawn(async move {
            tokio::select! {
                () = run => {}
                _ = closing.wait_for(|c| *c) => {}
            }
        });
        // Acks and nacks; the stream ending means the node went away.
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                match msg {
                    Ok(NodeMessage { kind: Some(k) }) => sender.record(k),
                    Ok(_) => {}
                    Err(e) => {
                        debug!(node = %sender.node, error = %e, "subscription stream error");
                        break;
                    }
                }
            }
            send_task.abort();
            sender.update(|s| s.connected = false);
            info!(node = %sender.node, "node unsubscribed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Deltas of the shared part between two versions: every node moving between the same two
/// versions gets the same one, so it is computed once.
#[derive(Default)]
struct SharedDeltas(Mutex<HashMap<(u64, u64), Arc<Delta>>>);

type Delta = (Vec<pb::Resource>, Vec<pb::ResourceKey>);

impl SharedDeltas {
    fn shared(&self, from: &Version, to: &Version) -> Arc<Delta> {
        let key = (from.number, to.number);
        if let Some(d) = self.0.locked().get(&key) {
            return d.clone();
        }
        // Computed outside the lock; two nodes racing compute it twice, which is harmless.
        let d = Arc::new(delta(&from.computed.shared, &to.computed.shared));
        let mut cache = self.0.locked();
        if cache.len() > 64 {
            cache.clear();
        }
        cache.insert(key, d.clone());
        d
    }
}

#[derive(Clone)]
struct Sender {
    node: String,
    deltas: Arc<SharedDeltas>,
    nodes: Arc<Mutex<BTreeMap<String, NodeState>>>,
    sent: Arc<Mutex<HashMap<String, Arc<Version>>>>,
}

impl Sender {
    fn update(&self, f: impl FnOnce(&mut NodeState)) {
        if let Some(s) = self.nodes.locked().get_mut(&self.node) {
            f(s);
        }
    }

    fn record(&self, msg: Msg) {
        match msg {
            Msg::Ack(a) => {
                debug!(node = %self.node, version = a.version, "ack");
                let latency = self
                    .sent
                    .locked()
                    .get(&self.node)
                    .filter(|v| v.number == a.version)
                    .map(|v| v.published.elapsed().as_secs_f64());
                self.update(|s| {
                    s.acked_version = s.acked_version.max(a.version);
                    s.push_latency_seconds = latency.or(s.push_latency_seconds);
                });
            }
            Msg::Nack(n) => {
                warn!(node = %self.node, version = n.version, reason = %n.reason, "node rejected a configuration version");
                self.update(|s| s.nacked = Some((n.version, n.reason)));
            }
            Msg::Hello(_) => {}
        }
    }

    async fn run(
        self,
        mut versions: tokio::sync::watch::Receiver<Arc<Version>>,
        base: Option<Arc<Version>>,
        tx: mpsc::Sender<Result<ConfigUpdate, Status>>,
    ) {
        // What the node holds: a version (shared with every node) and its node-scoped part.
        let mut held: Option<(Arc<Version>, Snapshot)> = base.map(|v| {
            let part = v.computed.node_part(&self.node);
            (v, part)
        });
        let mut first = true;
        loop {
            let current = versions.borrow_and_update().clone();
            if current.number > 0 {
                let part = current.computed.node_part(&self.node);
                let update = match &held {
                    Some((old, old_part)) => {
                        let (mut upserts, mut removals) =
                            (*self.deltas.shared(old, &current)).clone();
                        let (u, r) = delta(old_part, &part);
                        upserts.extend(u);
                        removals.extend(r);
                        // Nothing changed for this node (a reconnect is always answered).
                        (first || !upserts.is_empty() || !removals.is_empty()).then(|| {
                            ConfigUpdate {
                                version: current.number,
                                base_version: old.number,
                                upserts,
                                removals,
                            }
                        })
                    }
                    None => Some(ConfigUpdate {
                        version: current.number,
                        base_version: 0,
                        upserts: current
                            .computed
                            .shared
                            .values()
                            .chain(part.values())
                            .cloned()
                            .collect(),
                        removals: Vec::new(),
                    }),
                };
                if let Some(update) = update {
                    debug!(node = %self.node, version = update.version, base = update.base_version, upserts = update.upserts.len(), removals = update.removals.len(), "sending");
                    if tx.send(Ok(update)).await.is_err() {
                        return;
                    }
                    self.update(|s| s.sent_version = current.number);
                    self.sent
                        .locked()
                        .insert(self.node.clone(), current.clone());
                    held = Some((current, part));
                    first = false;
                }
            }
            if versions.changed().await.is_err() {
                return;
            }
        }
    }
}
