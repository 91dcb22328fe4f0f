//! What L7 knows about Services: compiled once per configuration version (`Catalog`: ports and
//! their protocols, endpoints, route tables per port, the traffic policy), and the state that
//! outlives versions (`Runtime`: endpoint health and latency, breaker counters, retry budgets,
//! rate limiters).
use mesh_api::sync::LockExt;
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU32, Ordering::Relaxed},
    },
    time::Instant,
};

// foldhash, not SipHash: looked up on every request, keyed by our own config.
use hashbrown::HashMap;

use mesh_api::{
    config::v1 as pb,
    crd::TrafficPolicySpec,
    gateway::{GRPCRouteSpec, HTTPRouteSpec, ParentRef},
};

use super::{
    Protocol,
    balance::{Balancer, Endpoint},
    policy::{Gcra, PolicyError, RateLimit, RetryBudget, ServicePolicy},
};
use crate::policy::routes::{RouteError, Table};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("route")]
    Route(#[from] RouteError),
    #[error("TrafficPolicy {name}")]
    Policy {
        name: String,
        #[source]
        source: PolicyError,
    },
}

#[derive(Clone, Debug)]
pub struct Port {
    pub port: u16,
    pub target_port: u16,
    /// `None`: detect.
    pub protocol: Option<Protocol>,
}

#[derive(Debug)]
pub struct Service {
    /// `namespace/name`.
    pub name: String,
    pub ports: Vec<Port>,
    /// Ready pods, `namespace/name`.
    pub endpoints: Vec<String>,
    /// Route table per Service port (routes without a port apply to every port).
    tables: HashMap<u16, Table>,
    pub policy: Arc<ServicePolicy>,
    /// Its runtime state and endpoint list, found once per config ([`Runtime::live`]).
    live: OnceLock<Live>,
}

/// What a config's Service's requests share at runtime: borrowed per request, so a request
/// takes no lock and writes no count shared by every connection to find them.
#[derive(Debug)]
pub struct Live {
    pub state: Arc<ServiceState>,
    /// The endpoints' states, in the Service's order.
    pub endpoints: Endpoints,
}

impl Service {
    pub fn port(&self, port: u16) -> Option<&Port> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// The Service port that reaches pods on `target_port`.
    pub fn port_by_target(&self, target_port: u16) -> Option<&Port> {
        self.ports.iter().find(|p| p.target_port == target_port)
    }

    /// The routes for a Service port; `None` when none attach (the Service itself is the backend).
    pub fn table(&self, port: u16) -> Option<&Table> {
        self.tables.get(&port).filter(|t| !t.is_empty())
    }
}

/// A route spec waiting to be put into the tables of the Service ports it attaches to.
enum RouteSpec<'a> {
    Http(&'a HTTPRouteSpec),
    Grpc(&'a GRPCRouteSpec),
}

/// Routes and traffic policies as the node config parsed them: `(namespace, name, spec)`.
#[derive(Debug, Default)]
pub struct Specs {
    pub http: Vec<(String, String, HTTPRouteSpec)>,
    pub grpc: Vec<(String, String, GRPCRouteSpec)>,
    pub traffic: Vec<(String, String, TrafficPolicySpec)>,
}

/// A route attached to a Service: (port or all, route namespace, route name, spec).
type Attached<'a> = (Option<u16>, &'a str, &'a str, RouteSpec<'a>);

/// A Service by the target port it reaches a pod on.
type PortService = (u16, Arc<Service>);

/// The L7 view of one configuration version.
#[derive(Debug, Default)]
pub struct Catalog {
    services: HashMap<String, Arc<Service>>,
    /// A Service port by cluster IP and port.
    vips: HashMap<SocketAddr, (Arc<Service>, u16)>,
    /// Service ports targeting a pod port: `(pod key, target port)` -> protocol.
    pod_ports: HashMap<(String, u16), Option<Protocol>>,
    /// Rate-limited Services by endpoint pod `(namespace, name)`, with the target ports.
    limits: HashMap<(String, String), Vec<PortService>>,
}

impl Catalog {
    pub fn compile(services: &[pb::Service], specs: &Specs) -> Result<Self, CatalogError> {
        let mut routes: HashMap<String, Vec<Attached>> = HashMap::new();
        let mut traffic: HashMap<String, ServicePolicy> = HashMap::new();
        for (ns, name, s) in &specs.traffic {
            let full = format!("{ns}/{name}");
            let p = ServicePolicy::compile(&full, s).map_err(|source| CatalogError::Policy {
                name: full.clone(),
                source,
            })?;
            traffic.insert(format!("{ns}/{}", s.target_ref.name), p);
        }
        let attach = |parents: &[ParentRef], ns: &str| -> Vec<(String, Option<u16>)> {
            parents
                .iter()
                .filter(|p| p.kind.as_deref().unwrap_or("Service") == "Service")
                .map(|p| {
                    (
                        format!("{}/{}", p.namespace.as_deref().unwrap_or(ns), p.name),
                        p.port,
                    )
                })
                .collect()
        };
        for (ns, name, s) in &specs.http {
            for (svc, port) in attach(&s.parent_refs, ns) {
                routes
                    .entry(svc)
                    .or_default()
                    .push((port, ns, name, RouteSpec::Http(s)));
            }
        }
        for (ns, name, s) in &specs.grpc {
            for (svc, port) in attach(&s.parent_refs, ns) {
                routes
                    .entry(svc)
                    .or_default()
                    .push((port, ns, name, RouteSpec::Grpc(s)));
            }
        }

        let mut catalog = Catalog::default();
        for s in services {
            let name = format!("{}/{}", s.namespace, s.name);
            let ports: Vec<Port> = s
                .ports
                .iter()
                .filter_map(|p| {
                    Some(Port {
                        port: u16::try_from(p.port).ok()?,
                        target_port: u16::try_from(p.target_port).ok()?,
                        protocol: Protocol::declared(&p.protocol),
                    })
                })
                .collect();
            let mut tables = HashMap::new();
            for p in &ports {
                let mut t = Table::default();
                for (port, ns, rname, spec) in routes.get(&name).into_iter().flatten() {
                    if port.is_some_and(|x| x != p.port) {
                        continue;
                    }
                    match spec {
                        RouteSpec::Http(h) => t.add_http(ns, rname, h)?,
                        RouteSpec::Grpc(g) => t.add_grpc(ns, rname, g)?,
                    }
                }
                tables.insert(p.port, t);
            }
            let svc = Arc::new(Service {
                endpoints: s.endpoints.clone(),
                policy: Arc::new(traffic.remove(&name).unwrap_or_default()),
                ports: ports.clone(),
                tables,
                name: name.clone(),
                live: OnceLock::new(),
            });
            for ip in &s.cluster_ips {
                if let Ok(ip) = ip.parse() {
                    for p in &ports {
                        catalog
                            .vips
                            .insert(SocketAddr::new(ip, p.port), (svc.clone(), p.port));
                    }
                }
            }
            for e in &s.endpoints {
                for p in &ports {
                    let slot = catalog
                        .pod_ports
                        .entry((e.clone(), p.target_port))
                        .or_insert(p.protocol);
                    // Services that disagree about a pod port: detect.
                    if *slot != p.protocol {
                        *slot = None;
                    }
                }
            }
            if svc.policy.rate_limit.is_some() {
                for e in &s.endpoints {
                    let Some((ns, pod)) = e.split_once('/') else {
                        continue;
                    };
                    let entry = catalog.limits.entry((ns.into(), pod.into())).or_default();
                    entry.extend(ports.iter().map(|p| (p.target_port, svc.clone())));
                }
            }
            catalog.services.insert(name, svc);
        }
        Ok(catalog)
    }

    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    pub fn vip(&self, addr: SocketAddr) -> Option<&(Arc<Service>, u16)> {
        self.vips.get(&addr)
    }

    /// The declared protocol of a pod's port, from the Services that target it.
    pub fn pod_protocol(&self, pod: &str, port: u16) -> Option<Protocol> {
        self.pod_ports
            .get(&(pod.to_string(), port))
            .copied()
            .flatten()
    }

    /// Rate-limited Services that have pod `namespace/name` as an endpoint on `target_port`.
    pub fn rate_limited(
        &self,
        namespace: &str,
        name: &str,
        target_port: u16,
    ) -> impl Iterator<Item = &Arc<Service>> {
        let key = mesh_api::pair::key(namespace, name);
        self.limits
            .get(&key as &dyn mesh_api::pair::Pair)
            .into_iter()
            .flatten()
            .filter(move |(p, _)| *p == target_port)
            .map(|(_, s)| s)
    }
}

/// Per-Service state kept across configuration versions.
#[derive(Debug)]
pub struct ServiceState {
    pub balancer: Balancer,
    pub budget: Mutex<RetryBudget>,
    pub requests: AtomicU32,
    pub pending: AtomicU32,
    pub connections: AtomicU32,
    released: tokio::sync::Notify,
    /// GCRA state per source identity (`""`: the whole destination).
    limiters: Mutex<HashMap<String, Gcra>>,
}

/// A Service's endpoint states, in its order.
pub type Endpoints = Arc<[Arc<Endpoint>]>;

/// Sources tracked per rate-limited destination before the oldest state is dropped.
const MAX_LIMITER_KEYS: usize = 10_000;

impl ServiceState {
    fn new(now: Instant) -> Self {
        Self {
            balancer: Balancer::default(),
            budget: Mutex::new(RetryBudget::new(now)),
            requests: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            connections: AtomicU32::new(0),
            released: tokio::sync::Notify::new(),
            limiters: Mutex::default(),
        }
    }

    /// GCRA for `key`: `Ok` to proceed.
    pub fn rate_limit(&self, limit: &RateLimit, key: &str, epoch: Instant, now: Instant) -> bool {
        let mut m = self.limiters.locked();
        if m.len() >= MAX_LIMITER_KEYS && !m.contains_key(key) {
            // Bounded memory under many sources: forgetting state only ever lets a request
            // through that a full table would also have judged on its own rate.
            m.clear();
        }
        m.entry(key.to_string())
            .or_default()
            .check(limit, epoch, now)
            .is_ok()
    }
}

/// A request counted against its Service's `maxRequests` while it is in flight; releasing it
/// wakes one queued request.
pub struct RequestSlot<'s>(&'s ServiceState);

impl Drop for RequestSlot<'_> {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Relaxed);
        self.0.released.notify_one();
    }
}

impl ServiceState {
    pub fn request_slot(&self, max: Option<u32>) -> Option<RequestSlot<'_>> {
        let n = self.requests.fetch_add(1, Relaxed);
        if max.is_some_and(|m| n >= m) {
            self.requests.fetch_sub(1, Relaxed);
            return None;
        }
        Some(RequestSlot(self))
    }

    /// Waits until a request slot frees up (no polling: woken by the slot's release).
    pub async fn wait_request_slot(&self, max: Option<u32>) -> RequestSlot<'_> {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before trying, so a release between the try and the wait is not lost.
            released.as_mut().enable();
            if let Some(s) = self.request_slot(max) {
                return s;
            }
            released.await;
        }
    }
}

/// An app connection counted against its Service's `maxConnections` while it lives.
pub struct ConnectionSlot(Arc<ServiceState>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Relaxed);
    }
}

impl ServiceState {
    /// A connection slot, if fewer than `max` are open.
    pub fn connection(self: &Arc<Self>, max: Option<u32>) -> Option<ConnectionSlot> {
        let n = self.connections.fetch_add(1, Relaxed);
        if max.is_some_and(|m| n >= m) {
            self.connections.fetch_sub(1, Relaxed);
            return None;
        }
        Some(ConnectionSlot(self.clone()))
    }
}

/// A counter slot held while a request or connection is in flight.
pub struct Slot<'a>(&'a AtomicU32);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Takes a slot of `counter` if fewer than `max` are taken.
pub fn acquire(counter: &AtomicU32, max: Option<u32>) -> Option<Slot<'_>> {
    let n = counter.fetch_add(1, Relaxed);
    if max.is_some_and(|m| n >= m) {
        counter.fetch_sub(1, Relaxed);
        return None;
    }
    Some(Slot(counter))
}

#[derive(Debug)]
pub struct Runtime {
    services: Mutex<HashMap<String, Arc<ServiceState>>>,
    pub epoch: Instant,
}

impl Default for Runtime {
    fn default() -> Self {
        Self {
            services: Mutex::default(),
            epoch: Instant::now(),
        }
    }
}

impl Runtime {
    pub fn service(&self, name: &str) -> Arc<ServiceState> {
        let mut services = self.services.locked();
        if let Some(s) = services.get(name) {
            return s.clone();
        }
        services
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(ServiceState::new(Instant::now())))
            .clone()
    }

    /// `svc`'s state and endpoint states, looked up and listed on its config's first request
    /// to it. A new config's Service is listed again: endpoints that stayed keep their states
    /// (the balancer's), gone ones are dropped with the last list holding them.
    pub fn live<'s>(&self, svc: &'s Service) -> &'s Live {
        svc.live.get_or_init(|| {
            let state = self.service(&svc.name);
            let endpoints = state
                .balancer
                .endpoints(&svc.endpoints, Instant::now())
                .into();
            Live { state, endpoints }
        })
    }

    /// Endpoint health by Service, for `/debug`.
    pub fn views(&self) -> Vec<(String, Vec<super::balance::EndpointView>)> {
        let now = Instant::now();
        let mut v: Vec<_> = self
            .services
            .locked()
            .iter()
            .map(|(k, s)| (k.clone(), s.balancer.views(now)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(endpoints: &[&str]) -> Arc<Service> {
        Arc::new(Service {
            name: "shop/web".into(),
            ports: Vec::new(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            tables: HashMap::new(),
            policy: Arc::default(),
            live: OnceLock::new(),
        })
    }

    #[test]
    fn endpoints_are_listed_again_only_for_another_config_s_service() {
        let runtime = Runtime::default();
        let v1 = service(&["shop/a", "shop/b"]);
        let first = runtime.live(&v1).endpoints.clone();
        assert!(Arc::ptr_eq(&first, &runtime.live(&v1).endpoints));
        // The next config's Service, with one endpoint gone: a new list, the same Service state,
        // the kept endpoint's state carried over, the gone one's dropped.
        let v2 = service(&["shop/b"]);
        let second = runtime.live(&v2).endpoints.clone();
        assert!(Arc::ptr_eq(
            &runtime.live(&v1).state,
            &runtime.live(&v2).state
        ));
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.len(), 1);
        assert!(Arc::ptr_eq(&first[1], &second[0]));
        drop(v1);
        assert_eq!(
            Arc::strong_count(&first[0]),
            1,
            "only the old list's copy here holds shop/a"
        );
        // Same content, another config's Service: listed again, same states.
        let v3 = service(&["shop/b"]);
        let third = runtime.live(&v3).endpoints.clone();
        assert!(!Arc::ptr_eq(&second, &third));
        assert!(Arc::ptr_eq(&second[0], &third[0]));
    }
}
