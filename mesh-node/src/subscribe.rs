//! Follows the controller's configuration stream (`mesh.config.v1.ConfigDiscovery`).
//!
//! Each update is applied to a copy of the resources held, converted to domain types, and only
//! then published and acknowledged; an update that fails is nacked with the reason and the last
//! good configuration keeps serving. A controller outage changes nothing here but the
//! `connected` flag: the node reconnects with backoff and resumes from the version it holds.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_api::config::v1::{
    self as pb, ConfigUpdate, NodeMessage, config_discovery_client::ConfigDiscoveryClient,
    node_message::Kind as Msg,
};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::{
    identity::Identities,
    node_config::{NodeConfig, Resources},
    ready::Blocker,
};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What `/v1/mesh-config` reports about the stream.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub connected: bool,
    /// The version serving (0: none yet).
    pub version: u64,
    pub updates: u64,
    /// The last version refused, and why.
    pub nacked: Option<(u64, String)>,
    pub reconnects: u64,
}

pub struct Subscriber {
    pub identities: Arc<Identities>,
    pub trust_domain: String,
    pub tx: watch::Sender<Arc<NodeConfig>>,
    pub status: Arc<Mutex<Status>>,
}

/// Why a stream ended.
enum End {
    /// The controller went away or refused: reconnect after a pause.
    Lost(String),
    /// A delta did not fit what we hold: reconnect at once for a full update.
    Resync,
}

impl Subscriber {
    /// Runs until the process ends. `first` is released once a configuration is serving.
    pub async fn run(self, first: Blocker) {
        let mut first = Some(first);
        let mut held = Resources::new();
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.stream(&mut held, &mut first).await {
                End::Resync => continue,
                End::Lost(why) => {
                    self.set(|s| s.connected = false);
                    warn!(reason = %why, retry_in = ?backoff, "config stream lost; serving the last good configuration");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            self.set(|s| s.reconnects += 1);
        }
    }

    fn set(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().expect("status lock"));
    }

    async fn stream(&self, held: &mut Resources, first: &mut Option<Blocker>) -> End {
        let version = self.tx.borrow().version;
        let (out, rx) = mpsc::channel(16);
        let hello = Msg::Hello(pb::Hello {
            node: self.identities.node().to_string(),
            last_version: version,
        });
        let _ = out.send(NodeMessage { kind: Some(hello) }).await;
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if let Err(e) = self.identities.authorize(&mut req) {
            return End::Lost(e.to_string());
        }
        let mut client = ConfigDiscoveryClient::new(self.identities.stream_channel());
        let mut updates = match client.subscribe(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => return End::Lost(format!("{:?}: {}", s.code(), s.message())),
        };
        self.set(|s| s.connected = true);
        info!(last_version = version, "config stream open");
        loop {
            let update = match updates.message().await {
                Ok(Some(u)) => u,
                Ok(None) => return End::Lost("the controller closed the stream".into()),
                Err(s) => return End::Lost(format!("{:?}: {}", s.code(), s.message())),
            };
            let number = update.version;
            let reply = match self.apply(held, update) {
                Ok(None) => return End::Resync,
                Ok(Some(cfg)) => {
                    info!(
                        version = number,
                        workloads = cfg.placement.workloads().count(),
                        enrolled = cfg.enrolled.len(),
                        services = cfg.services.len(),
                        policies = cfg.policies.len(),
                        "configuration applied"
                    );
                    self.tx.send_replace(Arc::new(cfg));
                    self.set(|s| {
                        s.version = number;
                        s.updates += 1;
                    });
                    first.take();
                    Msg::Ack(pb::Ack { version: number })
                }
                Err(reason) => {
                    warn!(version = number, %reason, "configuration rejected; keeping version {}", self.tx.borrow().version);
                    self.set(|s| s.nacked = Some((number, reason.clone())));
                    Msg::Nack(pb::Nack {
                        version: number,
                        reason,
                    })
                }
            };
            if out.send(NodeMessage { kind: Some(reply) }).await.is_err() {
                return End::Lost("stream closed".into());
            }
        }
    }

    /// Applies `update` to a copy of `held`: `Ok(None)` when it is a delta from a version we do
    /// not hold, `Err` when the result does not convert.
    fn apply(&self, held: &mut Resources, u: ConfigUpdate) -> Result<Option<NodeConfig>, String> {
        let current = self.tx.borrow().version;
        let mut next = if u.base_version == 0 {
            Resources::new()
        } else if u.base_version == current {
            held.clone()
        } else {
            info!(
                base = u.base_version,
                holding = current,
                "delta from another version; resyncing"
            );
            return Ok(None);
        };
        for k in &u.removals {
            next.remove(&(k.kind, k.name.clone()));
        }
        for r in u.upserts {
            let Some(k) = r.key.clone() else {
                return Err("a resource without a key".into());
            };
            next.insert((k.kind, k.name), r);
        }
        let cfg = NodeConfig::convert(self.identities.node(), &self.trust_domain, u.version, &next)
            .map_err(|e| mesh_api::placement::error_chain(&e))?;
        *held = next;
        Ok(Some(cfg))
    }
}
