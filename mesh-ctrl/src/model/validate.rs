//! Validation beyond the schema: what a CRD schema cannot say (regexes that compile, durations,
//! CIDRs, SPIFFE principals, references to Services that exist, two objects claiming the same
//! thing). Each problem names the object, the field (a JSON path) and the reason. Pure: the same
//! function serves the controller and `mesh-ctrl check`.
use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

use super::{
    crd::{AuthorizationAction, AuthorizationPolicy, LoadBalancerPolicy, TrafficPolicy},
    gateway::{BackendRef, HTTPRouteFilter, ParentRef, ValueMatch},
    objects::{ByName, ObjectRef, Objects},
};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Invalid {
    pub object: ObjectRef,
    /// JSON path into the object, e.g. `spec.rules[0].backendRefs[1].name`.
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.field, self.reason)
    }
}

/// Collects the problems of one object.
struct Check<'a> {
    object: ObjectRef,
    out: &'a mut Vec<Invalid>,
}

impl Check<'_> {
    fn fail(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.out.push(Invalid {
            object: self.object.clone(),
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn duration(&mut self, field: &str, v: Option<&String>) -> Option<Duration> {
        let v = v?;
        match parse_duration(v) {
            Ok(d) => Some(d),
            Err(e) => {
                self.fail(field, format!("{v:?} is not a duration ({e})"));
                None
            }
        }
    }

    fn regex(&mut self, field: &str, v: &str) {
        if let Err(e) = regex::Regex::new(v) {
            self.fail(field, format!("regular expression does not compile: {e}"));
        }
    }

    fn percent(&mut self, field: &str, v: f64) {
        if !(0.0..=100.0).contains(&v) {
            self.fail(field, format!("{v} is not a percentage (0 to 100)"));
        }
    }
}

pub use mesh_api::crd::parse_duration;

/// Every problem of every object. Order is stable (by object, then field).
pub fn validate(objects: &Objects) -> Vec<Invalid> {
    let mut out = Vec::new();
    for ((ns, name), p) in &objects.authorization_policies {
        authorization(p, &mut check("AuthorizationPolicy", ns, name, &mut out));
    }
    peer_authentications(objects, &mut out);
    telemetries(objects, &mut out);
    for ((ns, name), r) in &objects.http_routes {
        let mut c = check("HTTPRoute", ns, name, &mut out);
        parents(&r.spec.parent_refs, ns, objects, &mut c);
        for (i, rule) in r.spec.rules.iter().enumerate() {
            let f = format!("spec.rules[{i}]");
            for (j, m) in rule.matches.iter().enumerate() {
                let mf = format!("{f}.matches[{j}]");
                if let Some(p) = &m.path {
                    let v = p.value.as_deref().unwrap_or("/");
                    match p.type_.as_deref().unwrap_or("PathPrefix") {
                        "Exact" | "PathPrefix" if !v.starts_with('/') => {
                            c.fail(format!("{mf}.path.value"), "must start with /")
                        }
                        "Exact" | "PathPrefix" => {}
                        "RegularExpression" => c.regex(&format!("{mf}.path.value"), v),
                        t => c.fail(format!("{mf}.path.type"), format!("unknown type {t:?}")),
                    }
                }
                values(&format!("{mf}.headers"), &m.headers, &mut c);
                values(&format!("{mf}.queryParams"), &m.query_params, &mut c);
                if let Some(method) = &m.method
                    && !is_token(method)
                {
                    c.fail(
                        format!("{mf}.method"),
                        format!("{method:?} is not an HTTP method"),
                    );
                }
            }
            filters(&f, &rule.filters, ns, objects, &mut c);
            backends(&f, &rule.backend_refs, ns, objects, &mut c);
            if let Some(t) = &rule.timeouts {
                let req = c.duration(&format!("{f}.timeouts.request"), t.request.as_ref());
                let backend = c.duration(
                    &format!("{f}.timeouts.backendRequest"),
                    t.backend_request.as_ref(),
                );
                if let (Some(r), Some(b)) = (req, backend)
                    && !r.is_zero()
                    && b > r
                {
                    c.fail(
                        format!("{f}.timeouts.backendRequest"),
                        "longer than the request timeout",
                    );
                }
            }
        }
    }
    for ((ns, name), r) in &objects.grpc_routes {
        let mut c = check("GRPCRoute", ns, name, &mut out);
        parents(&r.spec.parent_refs, ns, objects, &mut c);
        for (i, rule) in r.spec.rules.iter().enumerate() {
            let f = format!("spec.rules[{i}]");
            for (j, m) in rule.matches.iter().enumerate() {
                let mf = format!("{f}.matches[{j}]");
                if let Some(method) = &m.method {
                    match method.type_.as_deref().unwrap_or("Exact") {
                        "Exact" => {}
                        "RegularExpression" => {
                            for (k, v) in [("service", &method.service), ("method", &method.method)]
                            {
                                if let Some(v) = v {
                                    c.regex(&format!("{mf}.method.{k}"), v);
                                }
                            }
                        }
                        t => c.fail(format!("{mf}.method.type"), format!("unknown type {t:?}")),
                    }
                    if method.service.is_none() && method.method.is_none() {
                        c.fail(format!("{mf}.method"), "needs a service, a method or both");
                    }
                }
                values(&format!("{mf}.headers"), &m.headers, &mut c);
            }
            filters(&f, &rule.filters, ns, objects, &mut c);
            backends(&f, &rule.backend_refs, ns, objects, &mut c);
        }
    }
    route_conflicts(objects, &mut out);
    traffic_policies(objects, &mut out);
    out.sort();
    out
}

fn check<'a>(kind: &'static str, ns: &str, name: &str, out: &'a mut Vec<Invalid>) -> Check<'a> {
    Check {
        object: ObjectRef {
            kind,
            namespace: ns.to_string(),
            name: name.to_string(),
        },
        out,
    }
}

fn authorization(p: &AuthorizationPolicy, c: &mut Check) {
    if p.spec.action != AuthorizationAction::Allow && p.spec.rules.is_empty() {
        c.fail(
            "spec.rules",
            "a DENY or AUDIT policy without rules matches nothing (an ALLOW policy without rules is the way to deny all)",
        );
    }
    for (i, rule) in p.spec.rules.iter().enumerate() {
        for (j, from) in rule.from.iter().enumerate() {
            let f = format!("spec.rules[{i}].from[{j}]");
            for (k, pr) in from.principals.iter().enumerate() {
                let ok = match pr.strip_suffix('*') {
                    Some(prefix) => prefix.is_empty() || prefix.starts_with("spiffe://"),
                    None => pr.parse::<mesh_api::identity::SpiffeId>().is_ok(),
                };
                if !ok {
                    c.fail(
                        format!("{f}.principals[{k}]"),
                        format!("{pr:?} is not a SPIFFE ID (spiffe://TRUST-DOMAIN/ns/NS/sa/SA, or a prefix ending in *)"),
                    );
                }
            }
            for (k, b) in from.ip_blocks.iter().enumerate() {
                if b.parse::<ipnet::IpNet>().is_err() && b.parse::<std::net::IpAddr>().is_err() {
                    c.fail(format!("{f}.ipBlocks[{k}]"), format!("{b:?} is not a CIDR"));
                }
            }
            if from.principals.is_empty() && from.namespaces.is_empty() && from.ip_blocks.is_empty()
            {
                c.fail(
                    f,
                    "an empty source matches everything: leave `from` out instead",
                );
            }
        }
        for (j, to) in rule.to.iter().enumerate() {
            let f = format!("spec.rules[{i}].to[{j}]");
            for (k, m) in to.methods.iter().enumerate() {
                if !is_token(m) {
                    c.fail(
                        format!("{f}.methods[{k}]"),
                        format!("{m:?} is not an HTTP method"),
                    );
                }
            }
            for (k, path) in to.paths.iter().enumerate() {
                if !path.starts_with('/') && path != "*" {
                    c.fail(
                        format!("{f}.paths[{k}]"),
                        "must start with / (a trailing * makes it a prefix)",
                    );
                }
            }
            for (k, h) in to.headers.iter().enumerate() {
                let hf = format!("{f}.headers[{k}]");
                if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                    c.fail(
                        format!("{hf}.name"),
                        format!("{:?} is not a header name", h.name),
                    );
                }
                if h.value.is_some() && h.regex.is_some() {
                    c.fail(&hf, "give `value` or `regex`, not both");
                }
                if let Some(r) = &h.regex {
                    c.regex(&format!("{hf}.regex"), r);
                }
            }
            for (k, port) in to.ports.iter().enumerate() {
                if *port == 0 {
                    c.fail(format!("{f}.ports[{k}]"), "port 0");
                }
            }
        }
    }
}

/// Two PeerAuthentications for the same workloads contradict each other: the older one wins and
/// the newer is rejected (the Gateway API's rule for conflicting routes).
fn peer_authentications(objects: &Objects, out: &mut Vec<Invalid>) {
    let mut seen: BTreeMap<(String, String), (String, String)> = BTreeMap::new();
    for (ns, name) in by_age(&objects.peer_authentications) {
        let p = &objects.peer_authentications[&(ns.clone(), name.clone())];
        let selector = p
            .spec
            .selector
            .as_ref()
            .map(|s| format!("{:?}", s.match_labels))
            .unwrap_or_default();
        if let Some(first) = seen.get(&(ns.clone(), selector.clone())) {
            check("PeerAuthentication", &ns, &name, out).fail(
                "spec.selector",
                format!(
                    "PeerAuthentication {}/{} already selects the same workloads",
                    first.0, first.1
                ),
            );
        } else {
            seen.insert((ns.clone(), selector), (ns, name));
        }
    }
}

/// Keys ordered oldest first (creation time, then name), as conflict resolution wants.
fn by_age<T: ResourceExt>(m: &ByName<T>) -> Vec<(String, String)> {
    let mut keys: Vec<_> = m.iter().collect();
    keys.sort_by(|(ka, a), (kb, b)| {
        let ta = a.meta().creation_timestamp.as_ref().map(|t| t.0);
        let tb = b.meta().creation_timestamp.as_ref().map(|t| t.0);
        ta.cmp(&tb).then_with(|| ka.cmp(kb))
    });
    keys.into_iter().map(|(k, _)| k.clone()).collect()
}

fn service<'a>(objects: &'a Objects, ns: &str, name: &str) -> Option<&'a Service> {
    objects.services.get(&(ns.to_string(), name.to_string()))
}

fn service_has_port(s: &Service, port: u16) -> bool {
    s.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .is_some_and(|ports| ports.iter().any(|p| p.port == i32::from(port)))
}

fn parents(refs: &[ParentRef], ns: &str, objects: &Objects, c: &mut Check) {
    if refs.is_empty() {
        c.fail("spec.parentRefs", "a mesh route attaches to a Service");
    }
    for (i, p) in refs.iter().enumerate() {
        let f = format!("spec.parentRefs[{i}]");
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        if kind != "Service" || p.group.as_deref().is_some_and(|g| !g.is_empty()) {
            c.fail(
                format!("{f}.kind"),
                format!("{kind:?}: the mesh only applies routes attached to a Service (group \"\", kind Service)"),
            );
            continue;
        }
        let pns = p.namespace.as_deref().unwrap_or(ns);
        if pns != ns {
            c.fail(
                format!("{f}.namespace"),
                "a route may only attach to Services of its own namespace",
            );
        }
        match service(objects, pns, &p.name) {
            None => c.fail(format!("{f}.name"), format!("no Service {pns}/{}", p.name)),
            Some(s) => {
                if let Some(port) = p.port
                    && !service_has_port(s, port)
                {
                    c.fail(
                        format!("{f}.port"),
                        format!("Service {pns}/{} has no port {port}", p.name),
                    );
                }
            }
        }
    }
}

fn backends(f: &str, refs: &[BackendRef], ns: &str, objects: &Objects, c: &mut Check) {
    for (i, b) in refs.iter().enumerate() {
        backend(&format!("{f}.backendRefs[{i}]"), b, ns, objects, c);
    }
    if !refs.is_empty() && refs.iter().all(|b| b.weight == Some(0)) {
        c.fail(format!("{f}.backendRefs"), "every weight is 0");
    }
}

fn backend(f: &str, b: &BackendRef, ns: &str, objects: &Objects, c: &mut Check) {
    let kind = b.kind.as_deref().unwrap_or("Service");
    if kind != "Service" || b.group.as_deref().is_some_and(|g| !g.is_empty()) {
        c.fail(
            format!("{f}.kind"),
            format!("{kind:?}: only Services are backends"),
        );
        return;
    }
    let bns = b.namespace.as_deref().unwrap_or(ns);
    match service(objects, bns, &b.name) {
        None => c.fail(
            format!("{f}.name"),
            format!("unknown backend: no Service {bns}/{}", b.name),
        ),
        Some(s) => match b.port {
            None => c.fail(format!("{f}.port"), "required for a Service backend"),
            Some(p) if !service_has_port(s, p) => c.fail(
                format!("{f}.port"),
                format!("Service {bns}/{} has no port {p}", b.name),
            ),
            Some(_) => {}
        },
    }
    if b.weight.is_some_and(|w| w > 1_000_000) {
        c.fail(format!("{f}.weight"), "at most 1000000");
    }
}

fn filters(f: &str, filters: &[HTTPRouteFilter], ns: &str, objects: &Objects, c: &mut Check) {
    for (i, flt) in filters.iter().enumerate() {
        let ff = format!("{f}.filters[{i}]");
        let present = match flt.type_.as_str() {
            "RequestHeaderModifier" => flt.request_header_modifier.is_some(),
            "ResponseHeaderModifier" => flt.response_header_modifier.is_some(),
            "URLRewrite" => flt.url_rewrite.is_some(),
            "RequestRedirect" => flt.request_redirect.is_some(),
            "RequestMirror" => {
                if let Some(m) = &flt.request_mirror {
                    backend(
                        &format!("{ff}.requestMirror.backendRef"),
                        &m.backend_ref,
                        ns,
                        objects,
                        c,
                    );
                    if m.percent.is_some_and(|p| p > 100) {
                        c.fail(format!("{ff}.requestMirror.percent"), "at most 100");
                    }
                }
                flt.request_mirror.is_some()
            }
            t => {
                c.fail(
                    format!("{ff}.type"),
                    format!("filter type {t:?} is not supported"),
                );
                continue;
            }
        };
        if !present {
            c.fail(&ff, format!("type {} without its settings", flt.type_));
        }
        if let Some(r) = &flt.request_redirect
            && let Some(code) = r.status_code
            && code != 301
            && code != 302
        {
            c.fail(format!("{ff}.requestRedirect.statusCode"), "301 or 302");
        }
        for (name, m) in [
            ("requestHeaderModifier", &flt.request_header_modifier),
            ("responseHeaderModifier", &flt.response_header_modifier),
        ] {
            let Some(m) = m else { continue };
            let names = m
                .set
                .iter()
                .map(|h| &h.name)
                .chain(m.add.iter().map(|h| &h.name));
            for h in names.chain(m.remove.iter()) {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    c.fail(
                        format!("{ff}.{name}"),
                        format!("{h:?} is not a header name"),
                    );
                }
            }
        }
    }
}

fn values(f: &str, matches: &[ValueMatch], c: &mut Check) {
    for (i, m) in matches.iter().enumerate() {
        match m.type_.as_deref().unwrap_or("Exact") {
            "Exact" => {}
            "RegularExpression" => c.regex(&format!("{f}[{i}].value"), &m.value),
            t => c.fail(format!("{f}[{i}].type"), format!("unknown type {t:?}")),
        }
    }
}

/// Two routes attached to the same Service port with the same kind compete; Gateway API
/// semantics merge their rules, which the mesh does, so only the identical match in two routes is
/// a conflict: the older route keeps it.
fn route_conflicts(objects: &Objects, out: &mut Vec<Invalid>) {
    let mut owner: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (ns, name) in by_age(&objects.http_routes) {
        let r = &objects.http_routes[&(ns.clone(), name.clone())];
        for p in &r.spec.parent_refs {
            for (i, rule) in r.spec.rules.iter().enumerate() {
                for (j, m) in rule.matches.iter().enumerate() {
                    let key = format!("{ns}/{}:{:?}/{m:?}", p.name, p.port);
                    match owner.get(&key) {
                        Some(o) if *o != (ns.clone(), name.clone()) => {
                            check("HTTPRoute", &ns, &name, out).fail(
                                format!("spec.rules[{i}].matches[{j}]"),
                                format!(
                                    "HTTPRoute {}/{} already routes this match for Service {}",
                                    o.0, o.1, p.name
                                ),
                            );
                        }
                        _ => {
                            owner.insert(key, (ns.clone(), name.clone()));
                        }
                    }
                }
            }
        }
    }
}

/// One Telemetry per namespace (the oldest wins); sample shares are percentages.
fn telemetries(objects: &Objects, out: &mut Vec<Invalid>) {
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for (ns, name) in by_age(&objects.telemetries) {
        let t = &objects.telemetries[&(ns.clone(), name.clone())];
        let mut c = check("Telemetry", &ns, &name, out);
        if let Some(first) = owner.get(&ns) {
            c.fail(
                "metadata.namespace",
                format!("Telemetry {ns}/{first} already configures this namespace"),
            );
        } else {
            owner.insert(ns.clone(), name.clone());
        }
        if let Some(pct) = t
            .spec
            .access_logging
            .as_ref()
            .and_then(|a| a.sample_percent)
            && !(0.0..=100.0).contains(&pct)
        {
            c.fail(
                "spec.accessLogging.samplePercent",
                format!("{pct} is not between 0 and 100"),
            );
        }
    }
}

fn traffic_policies(objects: &Objects, out: &mut Vec<Invalid>) {
    let mut owner: BTreeMap<(String, String), String> = BTreeMap::new();
    for (ns, name) in by_age(&objects.traffic_policies) {
        let p: &TrafficPolicy = &objects.traffic_policies[&(ns.clone(), name.clone())];
        let mut c = check("TrafficPolicy", &ns, &name, out);
        let s = &p.spec;
        if s.target_ref.kind != "Service" {
            c.fail("spec.targetRef.kind", "only Service");
        } else if service(objects, &ns, &s.target_ref.name).is_none() {
            c.fail(
                "spec.targetRef.name",
                format!("no Service {ns}/{}", s.target_ref.name),
            );
        } else if let Some(first) = owner.get(&(ns.clone(), s.target_ref.name.clone())) {
            c.fail(
                "spec.targetRef",
                format!(
                    "TrafficPolicy {ns}/{first} already targets Service {}",
                    s.target_ref.name
                ),
            );
        } else {
            owner.insert((ns.clone(), s.target_ref.name.clone()), name.clone());
        }
        if let Some(t) = &s.timeouts {
            c.duration("spec.timeouts.request", t.request.as_ref());
            c.duration("spec.timeouts.idle", t.idle.as_ref());
            c.duration("spec.timeouts.connect", t.connect.as_ref());
        }
        if let Some(r) = &s.retries {
            if r.attempts > 10 {
                c.fail("spec.retries.attempts", "at most 10");
            }
            c.duration("spec.retries.perTryTimeout", r.per_try_timeout.as_ref());
            for (i, on) in r.retry_on.iter().enumerate() {
                if !retry_condition(on) {
                    c.fail(format!("spec.retries.retryOn[{i}]"), format!("unknown condition {on:?} (connect-failure, reset, 5xx, gateway-error, an HTTP status, or a gRPC status name)"));
                }
            }
            if let Some(b) = &r.backoff {
                let base = c.duration("spec.retries.backoff.baseInterval", Some(&b.base_interval));
                let max = c.duration("spec.retries.backoff.maxInterval", Some(&b.max_interval));
                if let (Some(base), Some(max)) = (base, max)
                    && max < base
                {
                    c.fail(
                        "spec.retries.backoff.maxInterval",
                        "shorter than baseInterval",
                    );
                }
            }
            if r.budget_percent.is_some_and(|b| b > 100) {
                c.fail("spec.retries.budgetPercent", "at most 100");
            }
        }
        if let Some(o) = &s.outlier_detection {
            if o.consecutive_failures == 0 {
                c.fail("spec.outlierDetection.consecutiveFailures", "at least 1");
            }
            c.duration(
                "spec.outlierDetection.baseEjectionTime",
                Some(&o.base_ejection_time),
            );
            if o.max_ejection_percent.is_some_and(|p| p > 100) {
                c.fail("spec.outlierDetection.maxEjectionPercent", "at most 100");
            }
        }
        if let Some(r) = &s.rate_limit
            && !(r.requests_per_second > 0.0 && r.requests_per_second.is_finite())
        {
            c.fail("spec.rateLimit.requestsPerSecond", "must be above 0");
        }
        if let Some(f) = &s.faults {
            if let Some(d) = &f.delay {
                c.percent("spec.faults.delay.percent", d.percent);
                c.duration("spec.faults.delay.fixedDelay", Some(&d.fixed_delay));
            }
            if let Some(a) = &f.abort {
                c.percent("spec.faults.abort.percent", a.percent);
                match (a.http_status, a.grpc_status) {
                    (Some(h), None) if !(200..600).contains(&h) => c.fail(
                        "spec.faults.abort.httpStatus",
                        "not an HTTP status (200 to 599)",
                    ),
                    (None, Some(g)) if g == 0 || g > 16 => c.fail(
                        "spec.faults.abort.grpcStatus",
                        "not a gRPC error status (1 to 16)",
                    ),
                    (Some(_), None) | (None, Some(_)) => {}
                    _ => c.fail(
                        "spec.faults.abort",
                        "exactly one of httpStatus and grpcStatus",
                    ),
                }
            }
        }
        if let Some(lb) = &s.load_balancer {
            match (lb.policy, &lb.hash_header) {
                (LoadBalancerPolicy::ConsistentHash, None) => c.fail(
                    "spec.loadBalancer.hashHeader",
                    "required for CONSISTENT_HASH",
                ),
                (LoadBalancerPolicy::ConsistentHash, Some(h))
                    if http::HeaderName::from_bytes(h.as_bytes()).is_err() =>
                {
                    c.fail(
                        "spec.loadBalancer.hashHeader",
                        format!("{h:?} is not a header name"),
                    )
                }
                (LoadBalancerPolicy::ConsistentHash, Some(_)) => {}
                (_, Some(_)) => c.fail("spec.loadBalancer.hashHeader", "only for CONSISTENT_HASH"),
                (_, None) => {}
            }
        }
    }
}

/// gRPC status names as retry conditions, in the kebab case Envoy and Istio use.
pub const GRPC_STATUS_NAMES: [&str; 16] = [
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

fn retry_condition(on: &str) -> bool {
    matches!(on, "connect-failure" | "reset" | "5xx" | "gateway-error")
        || on.parse::<u16>().is_ok_and(|s| (100..600).contains(&s))
        || GRPC_STATUS_NAMES.contains(&on)
}

/// An HTTP token (methods are tokens).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
