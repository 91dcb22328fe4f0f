//! Cluster mode: the objects and pod placement come from the Kubernetes API, through one
//! reflector per kind (list, then watch; relist when the watch expires; exponential backoff on
//! errors). Any change schedules a rebuild; changes within [`DEBOUNCE`] make one rebuild, so a
//! rollout of many pods makes few versions.
//!
//! Placement: a pod is placed on its node when the node runs a mesh-node pod (selected by
//! `--node-proxy-selector`); that pod's IPs are where other nodes tunnel to.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use futures::{Stream, StreamExt, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use mesh_api::{
    identity::{SpiffeId, is_dns_label},
    placement::{NodeEntry, Placement, PlacementFile, PlacementWatch, PodEntry},
};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::model::{
    crd::{AuthorizationPolicy, PeerAuthentication, Telemetry, TrafficPolicy},
    gateway::{GRPCRoute, HTTPRoute},
    objects::{ByName, Objects},
    store::Store as ConfigStore,
};

/// A namespaced kind the status writers and rollback handle alike.
pub trait Namespaced:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + ResourceExt
    + Clone
    + DeserializeOwned
    + serde::Serialize
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Namespaced for K where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + ResourceExt
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// Changes closer together than this make one rebuild.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// Which pods are node proxies.
#[derive(Clone, Debug)]
pub struct NodeProxies {
    pub namespace: String,
    /// A label selector, e.g. `app.kubernetes.io/name=mesh-node`.
    pub selector: String,
}

/// The reflector stores of every kind the controller reads.
#[derive(Clone)]
pub struct Stores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    http_routes: Store<HTTPRoute>,
    grpc_routes: Store<GRPCRoute>,
    authorization_policies: Store<AuthorizationPolicy>,
    peer_authentications: Store<PeerAuthentication>,
    traffic_policies: Store<TrafficPolicy>,
    telemetries: Store<Telemetry>,
    node_proxies: Store<Pod>,
}

/// A reflector for `K` on `api`: its store, and a stream that yields once per change.
fn reflect<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, BoxStream<'static, ()>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&()).to_string();
    let stream = watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .filter_map(move |event| {
            let kind = kind.clone();
            async move {
                match event {
                    Ok(_) => Some(()),
                    Err(e) => {
                        warn!(%kind, error = %e, "watch failed; retrying with backoff");
                        None
                    }
                }
            }
        })
        .boxed();
    (reader, stream)
}

/// Starts every reflector; the returned stream yields once per change of anything.
pub fn watch_all(client: Client, proxies: &NodeProxies) -> (Stores, impl Stream<Item = ()>) {
    let all = watcher::Config::default();
    let (namespaces, a) = reflect(Api::all(client.clone()), all.clone());
    let (pods, b) = reflect(Api::all(client.clone()), all.clone());
    let (services, c) = reflect(Api::all(client.clone()), all.clone());
    let (http_routes, d) = reflect(Api::all(client.clone()), all.clone());
    let (grpc_routes, e) = reflect(Api::all(client.clone()), all.clone());
    let (authorization_policies, f) = reflect(Api::all(client.clone()), all.clone());
    let (peer_authentications, g) = reflect(Api::all(client.clone()), all.clone());
    let (traffic_policies, h) = reflect(Api::all(client.clone()), all.clone());
    let (telemetries, k) = reflect(Api::all(client.clone()), all.clone());
    let (endpoint_slices, j) = reflect(Api::all(client.clone()), all);
    let (node_proxies, i) = reflect(
        Api::namespaced(client, &proxies.namespace),
        watcher::Config::default().labels(&proxies.selector),
    );
    let stores = Stores {
        namespaces,
        pods,
        services,
        endpoint_slices,
        http_routes,
        grpc_routes,
        authorization_policies,
        peer_authentications,
        traffic_policies,
        telemetries,
        node_proxies,
    };
    (
        stores,
        futures::stream::select_all([a, b, c, d, e, f, g, h, i, j, k]),
    )
}

fn by_name<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> ByName<K> {
    store
        .state()
        .into_iter()
        .map(|o| {
            (
                (o.namespace().unwrap_or_default(), o.name_any()),
                (*o).clone(),
            )
        })
        .collect()
}

impl Stores {
    /// Whether every reflector has finished its first list.
    pub async fn ready(&self) {
        let _ = futures::join!(
            self.namespaces.wait_until_ready(),
            self.pods.wait_until_ready(),
            self.services.wait_until_ready(),
            self.endpoint_slices.wait_until_ready(),
            self.http_routes.wait_until_ready(),
            self.grpc_routes.wait_until_ready(),
            self.authorization_policies.wait_until_ready(),
            self.peer_authentications.wait_until_ready(),
            self.traffic_policies.wait_until_ready(),
            self.telemetries.wait_until_ready(),
            self.node_proxies.wait_until_ready(),
        );
    }

    pub fn objects(&self) -> Objects {
        Objects {
            namespaces: by_name(&self.namespaces),
            services: by_name(&self.services),
            endpoint_slices: by_name(&self.endpoint_slices),
            http_routes: by_name(&self.http_routes),
            grpc_routes: by_name(&self.grpc_routes),
            authorization_policies: by_name(&self.authorization_policies),
            peer_authentications: by_name(&self.peer_authentications),
            traffic_policies: by_name(&self.traffic_policies),
            telemetries: by_name(&self.telemetries),
        }
    }

    pub fn placement(&self, trust_domain: &str) -> Placement {
        let pods: Vec<Arc<Pod>> = self.pods.state();
        let proxies: Vec<Arc<Pod>> = self.node_proxies.state();
        placement(trust_domain, &pods, &proxies)
    }
}

fn ips(p: &Pod) -> Vec<IpAddr> {
    let status = p.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|i| i.parse().ok())
    {
        ips.push(ip);
    }
    ips
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn running(p: &Pod) -> bool {
    p.meta().deletion_timestamp.is_none()
        && !matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// Pods and node proxies as a placement. Pods the mesh cannot place (host network, no IP yet, no
/// node proxy on their node, names that cannot be an identity) are left out, not fatal: one odd
/// pod must not stop the cluster's config.
pub fn placement(trust_domain: &str, pods: &[Arc<Pod>], proxies: &[Arc<Pod>]) -> Placement {
    let mut nodes: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for p in proxies.iter().filter(|p| running(p) && ready(p)) {
        if let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
            let a = ips(p);
            if !a.is_empty() {
                nodes.insert(node, a);
            }
        }
    }
    let mut file = PlacementFile {
        trust_domain: trust_domain.to_string(),
        nodes: nodes
            .iter()
            .map(|(name, addresses)| NodeEntry {
                name: name.clone(),
                addresses: addresses.clone(),
            })
            .collect(),
        ..Default::default()
    };
    // Newest pod wins an IP (a terminating pod and its replacement can briefly share one).
    let mut sorted: Vec<&Arc<Pod>> = pods.iter().filter(|p| running(p)).collect();
    sorted.sort_by_key(|p| std::cmp::Reverse(p.meta().creation_timestamp.clone().map(|t| t.0)));
    let mut taken: HashMap<IpAddr, ()> = HashMap::new();
    for p in sorted {
        let spec = p.spec.as_ref();
        if spec.and_then(|s| s.host_network).unwrap_or(false) {
            continue;
        }
        let (Some(node), Some(ns)) = (spec.and_then(|s| s.node_name.clone()), p.namespace()) else {
            continue;
        };
        let name = p.name_any();
        let sa = spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let pod_ips: Vec<IpAddr> = ips(p)
            .into_iter()
            .filter(|ip| !taken.contains_key(ip))
            .collect();
        if pod_ips.is_empty()
            || !nodes.contains_key(&node)
            || !is_dns_label(&name)
            || SpiffeId::new(trust_domain, &ns, &sa).is_err()
        {
            debug!(pod = %format!("{ns}/{name}"), "not placed");
            continue;
        }
        for ip in &pod_ips {
            taken.insert(*ip, ());
        }
        file.pods.push(PodEntry {
            namespace: ns,
            name,
            node,
            service_account: sa,
            ips: pod_ips,
            labels: p.labels().clone(),
            ready: ready(p),
            uid: p.uid().unwrap_or_default(),
        });
    }
    Placement::try_from(file).unwrap_or_else(|e| {
        // Every rule try_from checks was checked above; keep serving rather than crash.
        warn!(error = %mesh_api::placement::error_chain(&e), "placement from the cluster is inconsistent; using none");
        Placement::default()
    })
}

/// Follows the cluster into `store` (and `feed`, the certificate service's view of placement)
/// until the process ends.
pub async fn run(
    client: Client,
    proxies: NodeProxies,
    trust_domain: String,
    store: Arc<ConfigStore>,
    feed: PlacementWatch,
) {
    let (stores, changes) = watch_all(client.clone(), &proxies);
    let mut changes = Box::pin(changes);
    let waiting = stores.clone();
    let mut ready = Box::pin(async move { waiting.ready().await });
    // Nothing is published before every kind has been listed once: a half-listed cluster would
    // look like deleted policy.
    loop {
        tokio::select! {
            () = &mut ready => break,
            c = changes.next() => if c.is_none() { return },
        }
    }
    info!("cluster listed; following it");
    loop {
        let placement = stores.placement(&trust_domain);
        feed.set(placement.clone());
        store.set_placement(placement);
        let invalid = store.set_objects(&stores.objects());
        debug!(invalid = invalid.len(), "rebuilt from the cluster");
        conditions::write(&client, &stores, &invalid);
        if changes.next().await.is_none() {
            return;
        }
        // Coalesce a burst of changes.
        let deadline = tokio::time::sleep(DEBOUNCE);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => break,
                c = changes.next() => if c.is_none() { return },
            }
        }
    }
}

/// `Accepted` conditions on our own objects: `False` with the field and the reason when the
/// controller rejected the object, `True` otherwise. Written only when they change, so the status
/// update (itself a watch event) settles at once.
mod conditions {
    use super::*;
    use crate::model::{crd::Condition, objects::ObjectRef, validate::Invalid};
    use kube::api::{Patch, PatchParams};

    fn desired(r: &ObjectRef, invalid: &[Invalid]) -> (&'static str, &'static str, String) {
        let problems: Vec<String> = invalid
            .iter()
            .filter(|i| &i.object == r)
            .map(|i| format!("{}: {}", i.field, i.reason))
            .collect();
        if problems.is_empty() {
            ("True", "Accepted", "accepted".into())
        } else {
            (
                "False",
                "Invalid",
                format!(
                    "{} (the last accepted version, if any, keeps serving)",
                    problems.join("; ")
                ),
            )
        }
    }

    fn each<K: Namespaced + HasConditions>(
        client: &Client,
        kind: &'static str,
        store: &Store<K>,
        invalid: &[Invalid],
    ) {
        for o in store.state() {
            let (ns, name) = (o.namespace().unwrap_or_default(), o.name_any());
            let r = ObjectRef {
                kind,
                namespace: ns.clone(),
                name: name.clone(),
            };
            let (status, reason, message) = desired(&r, invalid);
            let current = o.conditions().into_iter().find(|c| c.type_ == "Accepted");
            let generation = o.meta().generation;
            if current.is_some_and(|c| {
                c.status == status && c.message == message && c.observed_generation == generation
            }) {
                continue;
            }
            let condition = Condition {
                type_: "Accepted".into(),
                status: status.into(),
                reason: reason.into(),
                message,
                observed_generation: generation,
                last_transition_time: k8s_openapi::jiff::Timestamp::now().to_string(),
            };
            let api: Api<K> = Api::namespaced(client.clone(), &ns);
            tokio::spawn(async move {
                let patch = serde_json::json!({"status": {"conditions": [condition]}});
                if let Err(e) = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    warn!(object = %r, error = %e, "cannot write status");
                }
            });
        }
    }

    pub trait HasConditions {
        fn conditions(&self) -> Vec<Condition>;
    }

    macro_rules! has_conditions {
        ($($t:ty),*) => {$(
            impl HasConditions for $t {
                fn conditions(&self) -> Vec<Condition> {
                    self.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default()
                }
            }
        )*};
    }
    has_conditions!(
        AuthorizationPolicy,
        PeerAuthentication,
        TrafficPolicy,
        Telemetry
    );

    pub fn write(client: &Client, stores: &Stores, invalid: &[Invalid]) {
        each(
            client,
            "AuthorizationPolicy",
            &stores.authorization_policies,
            invalid,
        );
        each(
            client,
            "PeerAuthentication",
            &stores.peer_authentications,
            invalid,
        );
        each(client, "TrafficPolicy", &stores.traffic_policies, invalid);
        each(client, "Telemetry", &stores.telemetries, invalid);
        routes(client, "HTTPRoute", &stores.http_routes, invalid);
        routes(client, "GRPCRoute", &stores.grpc_routes, invalid);
    }

    /// The Gateway API's controller name for the mesh's entries in route status.
    pub const CONTROLLER: &str = "nodemesh.io/mesh-ctrl";

    pub trait Route {
        fn parent_refs(&self) -> &[crate::model::gateway::ParentRef];
        fn parents(&self) -> Vec<crate::model::gateway::RouteParentStatus>;
    }

    macro_rules! route {
        ($($t:ty),*) => {$(
            impl Route for $t {
                fn parent_refs(&self) -> &[crate::model::gateway::ParentRef] {
                    &self.spec.parent_refs
                }
                fn parents(&self) -> Vec<crate::model::gateway::RouteParentStatus> {
                    self.status.as_ref().map(|s| s.parents.clone()).unwrap_or_default()
                }
            }
        )*};
    }
    route!(HTTPRoute, GRPCRoute);

    /// Route status is shared with other controllers (one entry per parent and controller): ours
    /// are replaced, theirs kept, and the write carries the resourceVersion it was computed from,
    /// so a concurrent writer makes it fail (and the next rebuild retries) instead of being lost.
    fn routes<K: Namespaced + Route>(
        client: &Client,
        kind: &'static str,
        store: &Store<K>,
        invalid: &[Invalid],
    ) {
        use crate::model::gateway::RouteParentStatus;
        for o in store.state() {
            let (ns, name) = (o.namespace().unwrap_or_default(), o.name_any());
            let r = ObjectRef {
                kind,
                namespace: ns.clone(),
                name: name.clone(),
            };
            let (status, reason, message) = desired(&r, invalid);
            let generation = o.meta().generation;
            let current = o.parents();
            let ours: Vec<&RouteParentStatus> = current
                .iter()
                .filter(|p| p.controller_name == CONTROLLER)
                .collect();
            let settled = ours.len() == o.parent_refs().len()
                && ours.iter().zip(o.parent_refs()).all(|(p, want)| {
                    p.parent_ref == *want
                        && p.conditions.iter().any(|c| {
                            c.type_ == "Accepted"
                                && c.status == status
                                && c.message == message
                                && c.observed_generation == generation
                        })
                });
            if settled {
                continue;
            }
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let mut parents: Vec<RouteParentStatus> = current
                .iter()
                .filter(|p| p.controller_name != CONTROLLER)
                .cloned()
                .collect();
            parents.extend(o.parent_refs().iter().map(|p| RouteParentStatus {
                parent_ref: p.clone(),
                controller_name: CONTROLLER.into(),
                conditions: vec![Condition {
                    type_: "Accepted".into(),
                    status: status.into(),
                    reason: reason.into(),
                    message: message.clone(),
                    observed_generation: generation,
                    last_transition_time: now.clone(),
                }],
            }));
            let rv = o.meta().resource_version.clone();
            let api: Api<K> = Api::namespaced(client.clone(), &ns);
            tokio::spawn(async move {
                let patch = serde_json::json!({
                    "metadata": {"resourceVersion": rv},
                    "status": {"parents": parents},
                });
                if let Err(e) = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    warn!(object = %r, error = %e, "cannot write route status (retried on the next change)");
                }
            });
        }
    }
}

/// Rollback in cluster mode: the cluster is the source of truth, so the policy set of an earlier
/// version (routes and our own kinds) is re-applied there (server-side apply), and policy objects
/// that did not exist then are deleted. The reflectors then bring the controller, and the nodes,
/// to it. Returns what was done, one line per object.
pub async fn rollback(
    client: &Client,
    now: &Objects,
    target: &Objects,
) -> Result<Vec<String>, kube::Error> {
    let mut done = Vec::new();
    restore(
        client,
        "HTTPRoute",
        &now.http_routes,
        &target.http_routes,
        &mut done,
    )
    .await?;
    restore(
        client,
        "GRPCRoute",
        &now.grpc_routes,
        &target.grpc_routes,
        &mut done,
    )
    .await?;
    restore(
        client,
        "AuthorizationPolicy",
        &now.authorization_policies,
        &target.authorization_policies,
        &mut done,
    )
    .await?;
    restore(
        client,
        "PeerAuthentication",
        &now.peer_authentications,
        &target.peer_authentications,
        &mut done,
    )
    .await?;
    restore(
        client,
        "TrafficPolicy",
        &now.traffic_policies,
        &target.traffic_policies,
        &mut done,
    )
    .await?;
    restore(
        client,
        "Telemetry",
        &now.telemetries,
        &target.telemetries,
        &mut done,
    )
    .await?;
    Ok(done)
}

async fn restore<K>(
    client: &Client,
    kind: &str,
    now: &ByName<K>,
    target: &ByName<K>,
    done: &mut Vec<String>,
) -> Result<(), kube::Error>
where
    K: Namespaced,
{
    use kube::api::{DeleteParams, Patch, PatchParams};
    let params = PatchParams::apply("mesh-ctrl-rollback").force();
    for ((ns, name), o) in target {
        let api: Api<K> = Api::namespaced(client.clone(), ns);
        // Only what the operator wrote: no status, no server-managed metadata.
        let mut body = serde_json::to_value(o).map_err(kube::Error::SerdeError)?;
        if let Some(m) = body.as_object_mut() {
            m.remove("status");
        }
        let meta = serde_json::json!({
            "name": name, "namespace": ns,
            "labels": o.meta().labels, "annotations": o.meta().annotations,
        });
        body["metadata"] = meta;
        api.patch(name, &params, &Patch::Apply(&body)).await?;
        done.push(format!("applied {kind} {ns}/{name}"));
    }
    for (ns, name) in now.keys().filter(|k| !target.contains_key(*k)) {
        let api: Api<K> = Api::namespaced(client.clone(), ns);
        api.delete(name, &DeleteParams::default()).await?;
        done.push(format!("deleted {kind} {ns}/{name}"));
    }
    Ok(())
}
