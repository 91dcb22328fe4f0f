//! Follows the controller's configuration stream (`mesh.config.v1.ConfigDiscovery`).
//!
//! Each update is applied to a copy of the resources held, converted to domain types, and only
//! then published and acknowledged; an update that fails is nacked with the reason and the last
//! good configuration keeps serving. A controller outage changes nothing here but the
//! `connected` flag: the node reconnects with backoff and resumes from the version it holds.
use mesh_api::sync::LockExt;
use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use prost::Message;

use mesh_api::{
    config::v1::{
        self as pb, ConfigUpdate, NodeMessage, config_discovery_client::ConfigDiscoveryClient,
        node_message::Kind as Msg,
    },
    placement::PlacementWatch,
};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::{
    config::node::{NodeConfig, Resources},
    identity::Identities,
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
    /// Versions refused.
    pub rejected: u64,
    pub reconnects: u64,
    /// When the serving version was applied (Unix seconds).
    pub last_update_unix: Option<f64>,
}

pub struct Subscriber {
    pub identities: Arc<Identities>,
    pub trust_domain: String,
    pub tx: watch::Sender<Arc<NodeConfig>>,
    pub status: Arc<Mutex<Status>>,
    /// The last good configuration is kept here, so a proxy restarted while the controller is
    /// unreachable serves it instead of nothing.
    pub saved: PathBuf,
    /// The placement routing and the tunnel read, kept in step with the configuration.
    pub placement: PlacementWatch,
}

/// Why a stream ended.
enum End {
    /// The controller went away or refused: reconnect after a pause (reset when the stream had
    /// been up).
    Lost(String, bool),
    /// A delta did not fit what we hold: reconnect at once for a full update.
    Resync,
}

impl Subscriber {
    /// Runs until the process ends. `first` is released once a configuration is serving.
    pub async fn run(self, first: Blocker) {
        let mut first = Some(first);
        let mut held = Resources::new();
        self.restore(&mut held, &mut first);
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.stream(&mut held, &mut first).await {
                End::Resync => continue,
                End::Lost(why, was_up) => {
                    self.set(|s| s.connected = false);
                    if was_up {
                        backoff = BACKOFF_MIN;
                    }
                    warn!(reason = %why, retry_in = ?backoff, "config stream lost; serving the last good configuration");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            self.set(|s| s.reconnects += 1);
        }
    }

    /// Makes `cfg` the configuration serving. The placement goes first: whoever wakes on the new
    /// version (enrollment, inbound flags) must already see its pods.
    fn publish(&self, cfg: NodeConfig) {
        self.placement.set(cfg.placement.clone());
        self.tx.send_replace(Arc::new(cfg));
    }

    /// Serves the configuration saved by an earlier run, if any, until the controller answers.
    fn restore(&self, held: &mut Resources, first: &mut Option<Blocker>) {
        let Ok(bytes) = std::fs::read(&self.saved) else {
            return;
        };
        let restored = ConfigUpdate::decode(bytes.as_slice())
            .map_err(|e| e.to_string())
            .and_then(|u| apply(held, 0, self.identities.node(), &self.trust_domain, u));
        match restored {
            Ok(Some(cfg)) => {
                info!(version = cfg.version, path = %self.saved.display(), "serving the saved configuration until the controller answers");
                let version = cfg.version;
                self.publish(cfg);
                self.set(|s| s.version = version);
                first.take();
            }
            Ok(None) => {}
            Err(e) => {
                warn!(path = %self.saved.display(), error = %e, "ignoring an unusable saved configuration")
            }
        }
    }

    /// Keeps `held` (version `version`) for the next start. Best effort: a failure is logged.
    fn save(&self, held: &Resources, version: u64) {
        let update = ConfigUpdate {
            version,
            base_version: 0,
            upserts: held.values().cloned().collect(),
            removals: Vec::new(),
        };
        let tmp = self.saved.with_extension("tmp");
        // The first version can arrive before anything else made the state directory.
        let dir = self.saved.parent().map(std::fs::create_dir_all).transpose();
        let written = dir
            .and_then(|_| std::fs::write(&tmp, update.encode_to_vec()))
            .and_then(|()| std::fs::rename(&tmp, &self.saved));
        if let Err(e) = written {
            warn!(path = %self.saved.display(), error = %e, "cannot save the configuration");
        }
    }

    fn set(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.locked());
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
            return End::Lost(e.to_string(), false);
        }
        let mut client = ConfigDiscoveryClient::new(self.identities.stream_channel());
        let mut updates = match client.subscribe(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => return End::Lost(format!("{:?}: {}", s.code(), s.message()), false),
        };
        self.set(|s| s.connected = true);
        info!(last_version = version, "config stream open");
        loop {
            let update = match updates.message().await {
                Ok(Some(u)) => u,
                Ok(None) => return End::Lost("the controller closed the stream".into(), true),
                Err(s) => return End::Lost(format!("{:?}: {}", s.code(), s.message()), true),
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
                    self.save(held, number);
                    self.publish(cfg);
                    self.set(|s| {
                        s.version = number;
                        s.updates += 1;
                        s.last_update_unix = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_secs_f64());
                    });
                    first.take();
                    Msg::Ack(pb::Ack { version: number })
                }
                Err(reason) => {
                    warn!(version = number, %reason, "configuration rejected; keeping version {}", self.tx.borrow().version);
                    self.set(|s| {
                        s.nacked = Some((number, reason.clone()));
                        s.rejected += 1;
                    });
                    Msg::Nack(pb::Nack {
                        version: number,
                        reason,
                    })
                }
            };
            if out.send(NodeMessage { kind: Some(reply) }).await.is_err() {
                return End::Lost("stream closed".into(), true);
            }
        }
    }

    fn apply(&self, held: &mut Resources, u: ConfigUpdate) -> Result<Option<NodeConfig>, String> {
        let current = self.tx.borrow().version;
        apply(held, current, self.identities.node(), &self.trust_domain, u)
    }
}

/// Applies `u` to a copy of `held` (the resources of version `current`): `Ok(None)` when it is a
/// delta from a version we do not hold, `Err` with the reason when the result does not convert.
/// `held` changes only on success.
pub fn apply(
    held: &mut Resources,
    current: u64,
    node: &str,
    trust_domain: &str,
    u: ConfigUpdate,
) -> Result<Option<NodeConfig>, String> {
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
    let cfg = NodeConfig::convert(node, trust_domain, u.version, &next)
        .map_err(|e| mesh_api::placement::error_chain(&e))?;
    *held = next;
    Ok(Some(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::{Kind, Resource, ResourceKey, resource::Body};

    fn node(name: &str, ip: &str) -> Resource {
        Resource {
            key: Some(ResourceKey {
                kind: Kind::Node as i32,
                name: name.into(),
            }),
            body: Some(Body::Node(pb::Node {
                name: name.into(),
                addresses: vec![ip.into()],
            })),
        }
    }

    fn pod(name: &str, on: &str, ip: &str, enrolled: bool) -> Resource {
        Resource {
            key: Some(ResourceKey {
                kind: Kind::Workload as i32,
                name: format!("shop/{name}"),
            }),
            body: Some(Body::Workload(pb::Workload {
                namespace: "shop".into(),
                name: name.into(),
                node: on.into(),
                service_account: "web".into(),
                ips: vec![ip.into()],
                enrolled,
                inbound_mode: pb::InboundMode::Strict as i32,
                ..Default::default()
            })),
        }
    }

    fn update(version: u64, base: u64, upserts: Vec<Resource>, removals: &[&str]) -> ConfigUpdate {
        ConfigUpdate {
            version,
            base_version: base,
            upserts,
            removals: removals
                .iter()
                .map(|n| ResourceKey {
                    kind: Kind::Workload as i32,
                    name: (*n).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn full_then_delta_then_bad_then_foreign_base() {
        let mut held = Resources::new();
        let full = update(
            3,
            0,
            vec![
                node("a", "10.0.0.1"),
                pod("web-1", "a", "10.1.0.1", true),
                pod("db-1", "a", "10.1.0.2", false),
            ],
            &[],
        );
        let cfg = apply(&mut held, 0, "a", "cluster.local", full)
            .unwrap()
            .unwrap();
        assert_eq!(cfg.version, 3);
        assert_eq!(
            cfg.enrolled.iter().collect::<Vec<_>>(),
            [&("shop".to_string(), "web-1".to_string())]
        );
        assert_eq!(
            cfg.placement.inbound_mode("shop", "web-1"),
            mesh_api::placement::InboundMode::Strict
        );

        let delta = update(
            4,
            3,
            vec![pod("web-2", "a", "10.1.0.3", true)],
            &["shop/web-1"],
        );
        let cfg = apply(&mut held, 3, "a", "cluster.local", delta)
            .unwrap()
            .unwrap();
        assert_eq!(
            cfg.enrolled
                .iter()
                .map(|(_, n)| n.as_str())
                .collect::<Vec<_>>(),
            ["web-2"]
        );
        assert_eq!(held.len(), 3);

        // Two pods with one IP: rejected with the reason; what is held does not change.
        let bad = update(5, 4, vec![pod("web-3", "a", "10.1.0.3", true)], &[]);
        let err = apply(&mut held, 4, "a", "cluster.local", bad).unwrap_err();
        assert!(err.contains("10.1.0.3"), "{err}");
        assert_eq!(held.len(), 3);
        let bad = update(5, 4, vec![pod("web-3", "nowhere", "10.1.0.9", true)], &[]);
        assert!(
            apply(&mut held, 4, "a", "cluster.local", bad)
                .unwrap_err()
                .contains("nowhere")
        );
        let bad = update(5, 4, vec![pod("web-3", "a", "not-an-ip", true)], &[]);
        assert!(
            apply(&mut held, 4, "a", "cluster.local", bad)
                .unwrap_err()
                .contains("not-an-ip")
        );

        // Policies are parsed and compiled: one this node cannot use rejects the version.
        let policy = |spec: &str| Resource {
            key: Some(ResourceKey {
                kind: Kind::AuthorizationPolicy as i32,
                name: "shop/p".into(),
            }),
            body: Some(Body::Policy(pb::Policy {
                api_version: "nodemesh.io/v1alpha1".into(),
                namespace: "shop".into(),
                name: "p".into(),
                spec_json: spec.into(),
            })),
        };
        let bad = update(
            5,
            4,
            vec![policy(
                r#"{"action": "ALLOW", "rules": [{"to": [{"headers": [{"name": "x", "regex": "("}]}]}]}"#,
            )],
            &[],
        );
        let err = apply(&mut held, 4, "a", "cluster.local", bad).unwrap_err();
        assert!(err.contains("rules[0].to[0].headers[0].regex"), "{err}");
        let bad = update(5, 4, vec![policy(r#"{"action": "MAYBE"}"#)], &[]);
        assert!(
            apply(&mut held, 4, "a", "cluster.local", bad)
                .unwrap_err()
                .contains("MAYBE")
        );
        let good = update(5, 4, vec![policy(r#"{"action": "ALLOW"}"#)], &[]);
        let cfg = apply(&mut held, 4, "a", "cluster.local", good)
            .unwrap()
            .unwrap();
        assert_eq!(cfg.authz.len(), 1);
        held.remove(&(Kind::AuthorizationPolicy as i32, "shop/p".to_string()));

        // A delta from a version we do not hold: resync, nothing applied.
        let foreign = update(6, 5, vec![pod("web-4", "a", "10.1.0.4", true)], &[]);
        assert!(
            apply(&mut held, 4, "a", "cluster.local", foreign)
                .unwrap()
                .is_none()
        );
        assert_eq!(held.len(), 3);
    }
}
