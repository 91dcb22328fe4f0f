//! Per-request load balancing across a Service's endpoints, and their health.
//!
//! - Power of two choices over peak-EWMA latency (default): two random endpoints, the cheaper wins;
//!   cost is the decayed latency estimate (jumping up at once on a slow response, decaying back
//!   slowly) times the requests in flight plus one.
//! - Round robin; consistent hashing of a header (rendezvous hashing, so adding an endpoint moves
//!   only its share of keys).
//! - Outlier detection: consecutive failures eject an endpoint for a cool-down that grows with
//!   repeated ejections; at most a share of endpoints is out at once; when every endpoint is out,
//!   all are tried (better a likely failure than a certain one).
//!
//! Endpoint state lives as long as the endpoint stays in its Service, across config versions.
use mesh_api::sync::LockExt;
use std::{
    hash::{DefaultHasher, Hash, Hasher},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

// foldhash, not SipHash: looked up on every request, keyed by our own config.
use hashbrown::HashMap;

use serde::Serialize;

use super::policy::{Lb, Outlier, ejection_time};

/// How fast the latency estimate forgets a slow response.
const DECAY: Duration = Duration::from_secs(10);
/// The estimate for an endpoint nothing is known about yet.
const DEFAULT_RTT_NS: f64 = 1_000_000.0;

#[derive(Debug)]
struct Health {
    ewma_ns: f64,
    stamp: Instant,
    failures: u32,
    /// Ejections in a row (reset by a success after coming back).
    ejections: u32,
}

#[derive(Debug)]
pub struct Endpoint {
    /// `namespace/name` of the pod.
    pub key: String,
    health: Mutex<Health>,
    inflight: AtomicU32,
    /// When its ejection ends, in nanoseconds after `born`; 0: not ejected. Outside `health`:
    /// every pick asks it of each candidate, and a load leaves the line shared between cores
    /// where taking the lock wrote it.
    ejected_until: AtomicU64,
    born: Instant,
}

/// What `/debug` and metrics show of an endpoint.
#[derive(Debug, Serialize)]
pub struct EndpointView {
    pub key: String,
    pub ewma_ms: f64,
    pub inflight: u32,
    pub consecutive_failures: u32,
    pub ejected: bool,
}

/// Counts a request in flight on an endpoint while it lives (borrowed: the endpoint's own count
/// is shared by every connection).
pub struct InFlight<'e>(&'e Endpoint);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Relaxed);
    }
}

impl Endpoint {
    fn new(key: String, now: Instant) -> Self {
        Self {
            key,
            health: Mutex::new(Health {
                ewma_ns: DEFAULT_RTT_NS,
                stamp: now,
                failures: 0,
                ejections: 0,
            }),
            inflight: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            born: now,
        }
    }

    /// `t` as nanoseconds after `born`, at least 1 (0 means not ejected).
    fn since_born(&self, t: Instant) -> u64 {
        (t.saturating_duration_since(self.born).as_nanos() as u64).max(1)
    }

    pub fn start(&self) -> InFlight<'_> {
        self.inflight.fetch_add(1, Relaxed);
        InFlight(self)
    }

    fn cost(&self, now: Instant) -> f64 {
        let h = self.health.locked();
        let ewma = decayed(h.ewma_ns, h.stamp, now);
        ewma * f64::from(self.inflight.load(Relaxed) + 1)
    }

    /// A response time: peak-sensitive, decaying towards faster ones.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let mut h = self.health.locked();
        let rtt = rtt.as_nanos() as f64;
        let current = decayed(h.ewma_ns, h.stamp, now);
        h.ewma_ns = if rtt > current {
            rtt
        } else {
            let w =
                (-now.saturating_duration_since(h.stamp).as_secs_f64() / DECAY.as_secs_f64()).exp();
            current * w + rtt * (1.0 - w)
        };
        h.stamp = now;
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Relaxed);
        until != 0 && until > self.since_born(now)
    }

    pub fn view(&self, now: Instant) -> EndpointView {
        let h = self.health.locked();
        EndpointView {
            key: self.key.clone(),
            ewma_ms: decayed(h.ewma_ns, h.stamp, now) / 1e6,
            inflight: self.inflight.load(Relaxed),
            consecutive_failures: h.failures,
            ejected: self.is_ejected(now),
        }
    }
}

/// The estimate decays towards the default as it ages (old news about a slow endpoint fades).
fn decayed(ewma: f64, stamp: Instant, now: Instant) -> f64 {
    let age = now.saturating_duration_since(stamp).as_secs_f64();
    let w = (-age / DECAY.as_secs_f64()).exp();
    ewma * w + DEFAULT_RTT_NS * (1.0 - w)
}

/// The endpoints of one Service and how to choose among them.
#[derive(Debug, Default)]
pub struct Balancer {
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    rr: AtomicUsize,
    pub ejections: AtomicU32,
}

impl Balancer {
    /// The state of `keys` (created on first sight; endpoints no longer listed are forgotten).
    pub fn endpoints(&self, keys: &[String], now: Instant) -> Vec<Arc<Endpoint>> {
        let mut map = self.endpoints.locked();
        if map.len() > keys.len() {
            map.retain(|k, _| keys.contains(k));
        }
        // Runs on every request: a known endpoint is looked up by `&str`; only a new one copies
        // its key.
        keys.iter()
            .map(|k| match map.get(k.as_str()) {
                Some(e) => e.clone(),
                None => {
                    let e = Arc::new(Endpoint::new(k.clone(), now));
                    map.insert(k.clone(), e.clone());
                    e
                }
            })
            .collect()
    }

    pub fn views(&self, now: Instant) -> Vec<EndpointView> {
        let mut v: Vec<_> = self
            .endpoints
            .locked()
            .values()
            .map(|e| e.view(now))
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Chooses among `eps` (not empty), avoiding `tried` and ejected endpoints where possible.
    /// `draw` gives random numbers.
    pub fn pick<'e>(
        &self,
        eps: &'e [Arc<Endpoint>],
        lb: &Lb,
        hash_key: Option<&[u8]>,
        tried: &[String],
        now: Instant,
        draw: impl FnMut() -> u64,
    ) -> Option<&'e Arc<Endpoint>> {
        if tried.is_empty() && !eps.iter().any(|e| e.is_ejected(now)) {
            // Nothing to avoid (nearly every request): no lists to build.
            return self.choose(eps.len(), |i| &eps[i], lb, hash_key, now, draw);
        }
        let usable: Vec<&Arc<Endpoint>> = {
            let fresh: Vec<_> = eps.iter().filter(|e| !tried.contains(&e.key)).collect();
            let pool = if fresh.is_empty() {
                eps.iter().collect()
            } else {
                fresh
            };
            let healthy: Vec<_> = pool
                .iter()
                .copied()
                .filter(|e| !e.is_ejected(now))
                .collect();
            if healthy.is_empty() { pool } else { healthy }
        };
        self.choose(usable.len(), |i| usable[i], lb, hash_key, now, draw)
    }

    /// One of `n` candidates (`at` gives each) by the policy.
    fn choose<'e>(
        &self,
        n: usize,
        at: impl Fn(usize) -> &'e Arc<Endpoint>,
        lb: &Lb,
        hash_key: Option<&[u8]>,
        now: Instant,
        mut draw: impl FnMut() -> u64,
    ) -> Option<&'e Arc<Endpoint>> {
        if n == 0 {
            return None;
        }
        let i = match (lb, hash_key) {
            (Lb::Hash(_), Some(key)) => {
                let keys: Vec<&str> = (0..n).map(|i| at(i).key.as_str()).collect();
                rendezvous(key, &keys)
            }
            (Lb::RoundRobin, _) => self.rr.fetch_add(1, Relaxed) % n,
            // P2C, and hashing without the header.
            _ => p2c(n, draw(), draw(), |i| at(i).cost(now)),
        };
        Some(at(i))
    }

    /// Records how a try on `ep` ended; ejects it after too many failures in a row.
    pub fn record(
        &self,
        eps: &[Arc<Endpoint>],
        ep: &Endpoint,
        failed: bool,
        outlier: Option<&Outlier>,
        now: Instant,
    ) -> bool {
        let mut h = ep.health.locked();
        if !failed {
            h.failures = 0;
            if !ep.is_ejected(now) {
                if ep.ejected_until.load(Relaxed) != 0 {
                    ep.ejected_until.store(0, Relaxed);
                }
                h.ejections = 0;
            }
            return false;
        }
        h.failures += 1;
        let Some(o) = outlier else { return false };
        if h.failures < o.consecutive_failures || ep.is_ejected(now) {
            return false;
        }
        drop(h);
        let ejected = eps
            .iter()
            .filter(|e| e.key != ep.key && e.is_ejected(now))
            .count();
        if !may_eject(eps.len(), ejected, o.max_ejection_percent) {
            return false;
        }
        let mut h = ep.health.locked();
        h.ejections += 1;
        h.failures = 0;
        ep.ejected_until
            .store(ep.since_born(now + ejection_time(o, h.ejections)), Relaxed);
        self.ejections.fetch_add(1, Relaxed);
        true
    }
}

/// Whether one more of `n` endpoints may be ejected while `ejected` already are.
pub fn may_eject(n: usize, ejected: usize, max_percent: u32) -> bool {
    let allowed = (n * max_percent as usize / 100).max(usize::from(max_percent > 0));
    ejected < allowed
}

/// The cheaper of two random choices (distinct when there are two or more) among `n`. Only the
/// two drawn costs are computed: each takes a lock, and a request must not take as many locks as
/// the Service has endpoints.
pub fn p2c(n: usize, a: u64, b: u64, cost: impl Fn(usize) -> f64) -> usize {
    if n == 1 {
        return 0;
    }
    let i = (a % n as u64) as usize;
    let mut j = (b % (n as u64 - 1)) as usize;
    if j >= i {
        j += 1;
    }
    if cost(j) < cost(i) { j } else { i }
}

/// Rendezvous hashing: the endpoint with the highest hash of (key, endpoint).
pub fn rendezvous(key: &[u8], endpoints: &[&str]) -> usize {
    let score = |e: &str| {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        e.hash(&mut h);
        h.finish()
    };
    (0..endpoints.len())
        .max_by_key(|&i| score(endpoints[i]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_state_lasts_while_the_endpoint_is_listed() {
        let b = Balancer::default();
        let t0 = Instant::now();
        let keys = |ks: &[&str]| ks.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        let first = b.endpoints(&keys(&["ns/a", "ns/b"]), t0);
        let again = b.endpoints(&keys(&["ns/b", "ns/a"]), t0);
        assert!(Arc::ptr_eq(&first[0], &again[1]) && Arc::ptr_eq(&first[1], &again[0]));
        assert_eq!(again[0].key, "ns/b");
        // Dropped from the list: a later return starts afresh.
        b.endpoints(&keys(&["ns/b"]), t0);
        let back = b.endpoints(&keys(&["ns/a", "ns/b"]), t0);
        assert!(!Arc::ptr_eq(&first[0], &back[0]));
        assert!(Arc::ptr_eq(&first[1], &back[1]));
    }

    #[test]
    fn p2c_takes_the_cheaper_of_two_distinct() {
        let cases: &[(&[f64], u64, u64, usize)] = &[
            (&[5.0], 3, 9, 0),
            (&[5.0, 1.0], 0, 0, 1),
            (&[1.0, 5.0], 0, 0, 0),
            (&[1.0, 5.0], 1, 0, 0),
            (&[3.0, 2.0, 1.0], 0, 0, 1),
            (&[3.0, 2.0, 1.0], 0, 1, 2),
            (&[3.0, 2.0, 1.0], 2, 0, 2),
        ];
        for (costs, a, b, want) in cases {
            assert_eq!(
                p2c(costs.len(), *a, *b, |i| costs[i]),
                *want,
                "{costs:?} {a} {b}"
            );
        }
    }

    #[test]
    fn rendezvous_is_stable_and_moves_little() {
        let eps = ["a/1", "a/2", "a/3", "a/4"];
        let before: Vec<usize> = (0..1000u32)
            .map(|k| rendezvous(&k.to_be_bytes(), &eps))
            .collect();
        let again: Vec<usize> = (0..1000u32)
            .map(|k| rendezvous(&k.to_be_bytes(), &eps))
            .collect();
        assert_eq!(before, again);
        let more = ["a/1", "a/2", "a/3", "a/4", "a/5"];
        let moved = (0..1000u32)
            .filter(|k| {
                let j = rendezvous(&k.to_be_bytes(), &more);
                j != before[*k as usize]
            })
            .count();
        // About a fifth move (to the new endpoint); nothing else does.
        assert!((120..=280).contains(&moved), "{moved}");
    }

    #[test]
    fn ejection_share() {
        for (n, ejected, pct, want) in [
            (1, 0, 50, true),
            (2, 0, 50, true),
            (2, 1, 50, false),
            (10, 4, 50, true),
            (10, 5, 50, false),
            (10, 0, 0, false),
        ] {
            assert_eq!(may_eject(n, ejected, pct), want, "{n} {ejected} {pct}");
        }
    }

    #[test]
    fn outliers_are_ejected_and_come_back() {
        let t0 = Instant::now();
        let b = Balancer::default();
        let eps = b.endpoints(&["ns/a".into(), "ns/b".into()], t0);
        let o = Outlier {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: 50,
        };
        assert!(!b.record(&eps, &eps[0], true, Some(&o), t0));
        assert!(!b.record(&eps, &eps[0], true, Some(&o), t0));
        assert!(b.record(&eps, &eps[0], true, Some(&o), t0));
        // While a is out, every pick is b; b cannot be ejected too (50%).
        for _ in 0..20 {
            let p = b.pick(&eps, &Lb::RoundRobin, None, &[], t0, || 0).unwrap();
            assert_eq!(p.key, "ns/b");
        }
        for _ in 0..3 {
            assert!(!b.record(&eps, &eps[1], true, Some(&o), t0));
        }
        // After the cool-down, a is back.
        let later = t0 + Duration::from_secs(11);
        let picked: Vec<String> = (0..4)
            .map(|_| {
                b.pick(&eps, &Lb::RoundRobin, None, &[], later, || 0)
                    .unwrap()
                    .key
                    .clone()
            })
            .collect();
        assert!(picked.contains(&"ns/a".to_string()), "{picked:?}");
        // A retry avoids the endpoint already tried.
        let p = b
            .pick(&eps, &Lb::P2cEwma, None, &["ns/a".into()], later, || 1)
            .unwrap();
        assert_eq!(p.key, "ns/b");
    }

    #[test]
    fn slow_endpoints_lose_the_p2c_draw() {
        let t0 = Instant::now();
        let b = Balancer::default();
        let eps = b.endpoints(&["ns/fast".into(), "ns/slow".into()], t0);
        eps[0].observe(Duration::from_millis(1), t0);
        eps[1].observe(Duration::from_millis(200), t0);
        let mut x = 1u64;
        let slow = (0..1000)
            .filter(|_| {
                let p = b
                    .pick(&eps, &Lb::P2cEwma, None, &[], t0, || {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                        x >> 33
                    })
                    .unwrap();
                p.key == "ns/slow"
            })
            .count();
        assert_eq!(slow, 0);
    }
}
