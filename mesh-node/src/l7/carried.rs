//! HTTP/1.1 requests between node proxies, carried inside CONNECT streams that stay open.
//!
//! A request to an HTTP/2 pod (or an upgrade) crosses as an HTTP/2 stream of its own
//! (`upstream::via_tunnel`). For a small request, opening, HPACK-coding and closing that stream,
//! and a task per request on the destination, cost more than the request. So requests to an
//! HTTP/1.1 pod ride a CONNECT stream marked with [`super::CARRIED_HEADER`] instead, kept and reused
//! like a pooled HTTP/1.1 connection, one request at a time. The destination relays them to the
//! pod (`relay`) with the same per-request authorization, limits and records as any L7 request.
//! The caller's identity is the one the tunnel's mTLS proved; its address is in each request's
//! `Forwarded`.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

// foldhash, not SipHash: looked up on every request, keyed by our own config.
use hashbrown::HashMap;

use http::{HeaderValue, Request, Response, header};
use mesh_api::identity::SpiffeId;

use super::{
    body::Body,
    exchange::{Failed, Reuse, close, exchange, idle_ok},
    inbound::{Caller, L7Inbound, Ticket},
    relay::Gate,
    respond::ProxyError,
    upstream::{TunnelTarget, to_http1},
};
use crate::{
    enforce::forwarded_for,
    hbone::{ConnState, Tunnel, Tunnels},
};

/// Idle streams kept per destination pod (and source identity).
const MAX_KEPT: usize = 64;
/// A kept stream unused this long is closed: it holds a stream slot on the tunnel connection and
/// a pod connection on the destination.
const KEPT_IDLE: Duration = Duration::from_secs(30);

/// Where a kept stream goes: one destination pod, through one tunnel connection's key.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Key {
    src: SpiffeId,
    node: SocketAddr,
    dst: SpiffeId,
    target: SocketAddr,
}

/// An idle stream, in step: its last answer was read to the end.
struct Kept {
    tunnel: Tunnel,
    /// The tunnel connection it is on: a retired connection takes no new requests.
    conn: Arc<ConnState>,
    since: Instant,
}

/// The idle streams for one key. A request in flight holds its slot too, so its stream goes back
/// without a lookup of the key (a hash of two identities, under the lock every request takes).
#[derive(Default)]
struct Slot {
    kept: Mutex<Vec<Kept>>,
}

/// The source side: kept streams, and the requests sent on them.
pub struct Carried {
    tunnels: Arc<Tunnels>,
    idle: Mutex<HashMap<Key, Arc<Slot>>>,
}

impl Carried {
    pub fn new(tunnels: Arc<Tunnels>) -> Arc<Self> {
        let this = Arc::new(Self {
            tunnels,
            idle: Mutex::default(),
        });
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(KEPT_IDLE / 3).await;
                let Some(c) = weak.upgrade() else { return };
                let mut gone = Vec::new();
                c.idle.lock().expect("pool lock").retain(|_, slot| {
                    let mut kept = slot.kept.lock().expect("slot lock");
                    for mut k in std::mem::take(&mut *kept) {
                        if k.since.elapsed() < KEPT_IDLE && idle_ok(&mut k.tunnel) {
                            kept.push(k);
                        } else {
                            k.conn.unkeep();
                            gone.push(k.tunnel);
                        }
                    }
                    // Slots are handed out only from here, under this lock: one nobody else
                    // holds cannot get a stream back later.
                    !kept.is_empty() || Arc::strong_count(slot) > 1
                });
                gone.into_iter().for_each(close);
            }
        });
        this
    }

    /// Sends `req` to the pod `t` names on a kept stream (a new one when none is free).
    pub async fn send(
        self: &Arc<Self>,
        t: TunnelTarget<'_>,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        to_http1(&mut req, t.target)?;
        // Streams are shared by the app's connections: the client's address goes per request.
        req.headers_mut()
            .insert(header::FORWARDED, t.forwarded.clone());
        let key = Key {
            src: t.src.clone(),
            node: t.node,
            dst: t.dst.clone(),
            target: t.target,
        };
        let slot = self.slot(key);
        loop {
            let (kept, fresh) = match self.take(&slot, t.src) {
                Some(k) => (k, false),
                None => (Box::pin(self.open(&t)).await?, true),
            };
            let back = Back {
                slot: slot.clone(),
                conn: kept.conn,
            };
            match exchange(kept.tunnel, req, back).await {
                Ok(resp) => return Ok(resp),
                // A kept stream that ended before it took the request: the next one takes it.
                Err(Failed::NotSent(r, _)) if !fresh => req = *r,
                Err(Failed::NotSent(..)) => {
                    return Err(ProxyError::Connect("carried stream closed at once".into()));
                }
                Err(Failed::Sent(e)) => return Err(e),
            }
        }
    }

    /// The slot of `key`'s kept streams.
    fn slot(&self, key: Key) -> Arc<Slot> {
        self.idle
            .lock()
            .expect("pool lock")
            .entry(key)
            .or_default()
            .clone()
    }

    /// A kept stream of `slot` that can take a request now.
    fn take(&self, slot: &Slot, src: &SpiffeId) -> Option<Kept> {
        loop {
            let mut kept = slot.kept.lock().expect("slot lock").pop()?;
            kept.conn.unkeep();
            if idle_ok(&mut kept.tunnel) && self.tunnels.still_current(src, &kept.conn) {
                return Some(kept);
            }
            close(kept.tunnel);
        }
    }

    async fn open(&self, t: &TunnelTarget<'_>) -> Result<Kept, ProxyError> {
        let (tunnel, conn) = self
            .tunnels
            .open_carried(t.src, t.node, t.dst, t.target)
            .await
            .map_err(|e| ProxyError::Connect(mesh_api::placement::error_chain(&e)))?;
        Ok(Kept {
            tunnel,
            conn,
            since: Instant::now(),
        })
    }
}

/// Where a stream goes back to once its answer was read.
struct Back {
    slot: Arc<Slot>,
    conn: Arc<ConnState>,
}

impl Reuse for Back {
    fn reuse(self, tunnel: Tunnel) {
        let mut kept = self.slot.kept.lock().expect("slot lock");
        // Bounded per pod, and per tunnel connection: idle streams must not hold the slots new
        // streams need.
        if kept.len() < MAX_KEPT && self.conn.try_keep() {
            kept.push(Kept {
                tunnel,
                conn: self.conn,
                since: Instant::now(),
            });
        } else {
            drop(kept);
            close(tunnel);
        }
    }
}

/// A carried stream as the destination knows it: its requests go to one pod of this node.
pub struct Stream {
    /// The caller's identity, proven by the tunnel's mTLS.
    pub identity: SpiffeId,
    /// The source node's proxy.
    pub peer: SocketAddr,
    /// The pod of this node the stream is for, and its address.
    pub namespace: String,
    pub name: String,
    pub target: SocketAddr,
}

/// The destination's L7 side for the requests of one carried stream.
pub struct ToPod<'s> {
    pub l7: &'s L7Inbound,
    pub stream: &'s Stream,
    /// The stream's requests come from one caller to one pod: nearly all share one series.
    pub recent: super::stats::Recent<super::inbound::SeriesKey>,
}

impl<'s> Gate for ToPod<'s> {
    type Ticket = Ticket<'s>;

    fn admit(
        &self,
        req: &mut Request<()>,
        forwarded: Option<&HeaderValue>,
    ) -> (Ticket<'s>, Result<(), ProxyError>) {
        let s = self.stream;
        let caller = Caller {
            identity: Some(s.identity.clone()),
            ip: forwarded
                .and_then(|v| forwarded_for(v.to_str().ok()?))
                .unwrap_or(s.peer.ip()),
        };
        let dst = (s.namespace.as_str(), s.name.as_str());
        self.l7.admit_request(req, caller, dst, s.target)
    }

    fn finish(&self, mut t: Ticket<'s>, code: u16, flag: &'static str, bytes: (u64, u64)) {
        self.l7
            .finish_request(&mut t, (code, "", flag), bytes, true, Some(&self.recent));
    }
}
