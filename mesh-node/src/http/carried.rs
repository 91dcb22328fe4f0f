//! HTTP/1.1 requests between node proxies, carried inside CONNECT streams that stay open.
//!
//! A request to an HTTP/2 pod (or an upgrade) crosses as an HTTP/2 stream of its own
//! (`upstream::via_tunnel`). For a small request, opening, HPACK-coding and closing that stream,
//! and a task per request on the destination, cost more than the request. So requests to an
//! HTTP/1.1 pod ride a CONNECT stream marked with [`crate::proxy::tunnel::CARRIED_HEADER`] instead, kept and reused
//! like a pooled HTTP/1.1 connection, one request at a time. The destination relays them to the
//! pod (`relay`) with the same per-request authorization, limits and records as any L7 request.
//! The caller's identity is the one the tunnel's mTLS proved; its address is in each request's
//! `Forwarded`.
//!
//! An app connection holds the stream it used last ([`Held`]) for its next request, as the L4 path
//! holds one stream per connection: taking a stream from the shared pool and giving it back wrote
//! the pool's locks, counts and clock from both cores on every request. Held streams count as
//! kept (bounded per tunnel connection) and go back to the pool when the app connection ends.
use mesh_api::sync::LockExt;
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
    inbound::{Caller, HttpInbound, Ticket},
    relay::Gate,
    respond::{Flag, ProxyError},
    upstream::{TunnelTarget, to_http1},
};
use crate::{
    policy::enforce::claimed_source,
    proxy::tunnel::{ConnState, Tunnel, Tunnels},
};

/// Idle streams kept per destination pod (and source identity).
const MAX_KEPT_PER_POD: usize = 64;
/// A kept stream unused this long is closed: it holds a stream slot on the tunnel connection and
/// a pod connection on the destination.
const KEPT_IDLE: Duration = Duration::from_secs(30);
/// How often a held stream's tunnel connection is checked for a rotated certificate (and marked
/// used): certificates are replaced well before they expire, so this delay is harmless, and the
/// check reads a shared map and writes the connection's last use.
const HELD_RECHECK: Duration = Duration::from_secs(1);

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

impl Key {
    /// Whether `t` goes where this key does. Identities compare by pointer first: an app
    /// connection's requests name the same ones.
    fn is(&self, t: &TunnelTarget<'_>) -> bool {
        self.node == t.node && self.target == t.target && self.dst == *t.dst && self.src == *t.src
    }
}

/// The idle streams for one key. A request in flight holds its slot too, so its stream goes back
/// without a lookup of the key (a hash of two identities, under the lock every request takes).
#[derive(Default)]
struct Slot {
    kept: Mutex<Vec<Kept>>,
}

impl Slot {
    /// Takes back a stream already counted as kept on its connection; closes it when the slot is
    /// full.
    fn give_back(&self, k: Kept) {
        let mut kept = self.kept.locked();
        if kept.len() < MAX_KEPT_PER_POD {
            kept.push(k);
        } else {
            drop(kept);
            k.conn.unkeep();
            close(k.tunnel);
        }
    }
}

/// The stream an app connection used last, for its next request (see the module's comment).
#[derive(Default)]
pub struct Held(Mutex<Option<HeldStream>>);

struct HeldStream {
    key: Key,
    /// Counted as kept on its connection; `since` is when the connection was last checked.
    kept: Kept,
    slot: Arc<Slot>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(h) = self.0.get_mut().expect("held lock").take() {
            h.slot.give_back(Kept {
                since: Instant::now(),
                ..h.kept
            });
        }
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Held")
    }
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
                c.idle.locked().retain(|_, slot| {
                    let mut kept = slot.kept.locked();
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

    /// Sends `req` to the pod `t` names on the app connection's held stream, else on a kept one
    /// (a new one when none is free). `held` is the app connection's, when it has one.
    pub async fn send(
        self: &Arc<Self>,
        t: TunnelTarget<'_>,
        mut req: Request<Body>,
        held: Option<&Arc<Held>>,
    ) -> Result<Response<Body>, ProxyError> {
        to_http1(&mut req, t.target)?;
        // Streams are shared by the app's connections: the client's address goes per request.
        req.headers_mut()
            .insert(header::FORWARDED, t.forwarded.clone());
        if let Some(h) = held
            && let Some(s) = self.take_held(h, &t)
        {
            let back = Back {
                slot: s.slot,
                conn: s.kept.conn,
                counted: true,
                held: Some((h.clone(), s.key, s.kept.since)),
            };
            match exchange(s.kept.tunnel, req, back).await {
                Ok(resp) => return Ok(resp),
                // It ended while held: the pool's streams (or a new one) take the request.
                Err(Failed::NotSent(r, back)) => {
                    back.conn.unkeep();
                    req = *r;
                }
                Err(Failed::Sent(e)) => return Err(e),
            }
        }
        let key = Key {
            src: t.src.clone(),
            node: t.node,
            dst: t.dst.clone(),
            target: t.target,
        };
        let slot = self.slot(key.clone());
        loop {
            let (kept, fresh) = match self.take(&slot, t.src) {
                Some(k) => (k, false),
                None => (Box::pin(self.open(&t)).await?, true),
            };
            let back = Back {
                slot: slot.clone(),
                conn: kept.conn,
                counted: false,
                held: held.map(|h| (h.clone(), key.clone(), Instant::now())),
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
        self.idle.locked().entry(key).or_default().clone()
    }

    /// A kept stream of `slot` that can take a request now.
    fn take(&self, slot: &Slot, src: &SpiffeId) -> Option<Kept> {
        loop {
            let mut kept = slot.kept.locked().pop()?;
            kept.conn.unkeep();
            if idle_ok(&mut kept.tunnel) && self.tunnels.still_current(src, &kept.conn) {
                return Some(kept);
            }
            close(kept.tunnel);
        }
    }

    /// The held stream, when it goes where `t` does and can take a request now.
    fn take_held(&self, h: &Held, t: &TunnelTarget<'_>) -> Option<HeldStream> {
        let mut held = {
            let mut g = h.0.locked();
            if !g.as_ref()?.key.is(t) {
                // Left held: the answer to this request decides which stream the connection keeps.
                return None;
            }
            g.take()?
        };
        let now = Instant::now();
        let recheck = now.duration_since(held.kept.since) >= HELD_RECHECK;
        let current = !held.kept.conn.is_retired()
            && (!recheck || self.tunnels.still_current(t.src, &held.kept.conn));
        if current && idle_ok(&mut held.kept.tunnel) {
            if recheck {
                held.kept.since = now;
            }
            return Some(held);
        }
        held.kept.conn.unkeep();
        close(held.kept.tunnel);
        None
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
    /// Already counted as kept on `conn` (it was held; only with `held`).
    counted: bool,
    /// The app connection's holder, the stream's key, and when its connection was last checked.
    held: Option<(Arc<Held>, Key, Instant)>,
}

impl Reuse for Back {
    fn reuse(self, tunnel: Tunnel) {
        if let Some((held, key, since)) = self.held {
            // Bounded per tunnel connection like the pool's: held streams are idle between
            // requests.
            if self.counted || self.conn.try_keep() {
                let k = Kept {
                    tunnel,
                    conn: self.conn,
                    since,
                };
                let before = held.0.locked().replace(HeldStream {
                    key,
                    kept: k,
                    slot: self.slot,
                });
                // The connection went elsewhere since (or two of its requests were in flight):
                // the stream it held before goes to the pool.
                if let Some(b) = before {
                    b.slot.give_back(Kept {
                        since: Instant::now(),
                        ..b.kept
                    });
                }
                return;
            }
            close(tunnel);
            return;
        }
        let mut kept = self.slot.kept.locked();
        // Bounded per pod, and per tunnel connection: idle streams must not hold the slots new
        // streams need.
        if kept.len() < MAX_KEPT_PER_POD && self.conn.try_keep() {
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
    pub l7: &'s HttpInbound,
    pub stream: &'s Stream,
    /// The stream's requests come from one caller to one pod: nearly all share one series.
    pub recent: super::stats::Recent<super::inbound::InboundSeriesKey>,
    /// Where requests with a spoofed `Forwarded` are counted.
    pub spoofed: &'s std::sync::atomic::AtomicU64,
}

impl<'s> Gate for ToPod<'s> {
    type Ticket = Ticket<'s>;

    fn admit(
        &self,
        req: &mut Request<()>,
        forwarded: Option<&HeaderValue>,
    ) -> (Ticket<'s>, Result<(), ProxyError>) {
        let s = self.stream;
        let claimed = claimed_source(
            &self.l7.config.borrow().placement,
            forwarded.map(|v| v.to_str().unwrap_or("?")),
            &s.identity,
            s.peer.ip(),
        );
        let caller = Caller {
            identity: Some(s.identity.clone()),
            ip: *claimed.as_ref().unwrap_or(&s.peer.ip()),
        };
        let dst = (s.namespace.as_str(), s.name.as_str());
        let (ticket, admitted) = self.l7.admit_request(req, caller, dst, s.target);
        match claimed {
            Ok(_) => (ticket, admitted),
            Err(e) => {
                self.spoofed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(peer = %s.peer, error = %e, "refused request: spoofed source address");
                (ticket, Err(ProxyError::Denied(e.to_string())))
            }
        }
    }

    fn finish(&self, mut t: Ticket<'s>, code: u16, flag: Option<Flag>, bytes: (u64, u64)) {
        self.l7
            .finish_request(&mut t, (code, "", flag), bytes, true, Some(&self.recent));
    }
}
