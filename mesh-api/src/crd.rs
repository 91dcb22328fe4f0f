//! The mesh's own resources (API group [`GROUP`]), modelled on what Istio, Linkerd and Kuma users
//! already write. The CRD schemas under `manifests/crds/` are generated from these types
//! (`cargo xtask crds`); a test fails when they drift.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The one API group of every CRD, label and annotation of the mesh.
pub const GROUP: &str = "nodemesh.io";
/// Namespace label that joins a namespace to the mesh (value `enabled`), and pod label that takes a
/// pod of a joined namespace out of it (value `disabled`).
pub const MESH_LABEL: &str = "nodemesh.io/mesh";

/// Which pods of the namespace a policy applies to; absent: all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// Who may call what on the selected workloads, evaluated by the destination's node proxy with the
/// caller's identity proven by mTLS.
///
/// Semantics (Istio's): DENY policies are checked first; then, if any ALLOW policy selects the
/// workload, a request must match one of their rules (so an ALLOW policy without rules denies
/// everything: default deny). AUDIT rules only mark matching requests in logs and metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource, schemars::JsonSchema),
    kube(
        group = "nodemesh.io",
        version = "v1alpha1",
        kind = "AuthorizationPolicy",
        namespaced,
        shortname = "authz",
        status = "PolicyStatus",
        printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
        printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    pub action: AuthorizationAction,
    /// A request matches the policy when it matches any rule.
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthorizationAction {
    Allow,
    Deny,
    Audit,
}

/// Matches when every present part matches: any of `from`, and any of `to`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationRule {
    #[serde(default)]
    pub from: Vec<Source>,
    #[serde(default)]
    pub to: Vec<Operation>,
}

/// Where a request comes from. Every present field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// SPIFFE IDs (`spiffe://td/ns/N/sa/S`); a trailing `*` matches a prefix.
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// CIDRs of the original source address.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
}

/// What a request does. Every present field must match; `methods`, `paths` and `headers` need
/// HTTP (a plain TCP connection never matches them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub methods: Vec<String>,
    /// Exact paths, or prefixes ending in `*`.
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    /// Exact value; absent with no `regex`: the header only has to be present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// Whether the selected workloads accept plaintext from outside the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource, schemars::JsonSchema),
    kube(
        group = "nodemesh.io",
        version = "v1alpha1",
        kind = "PeerAuthentication",
        namespaced,
        shortname = "peerauth",
        status = "PolicyStatus",
        printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    pub mode: PeerAuthenticationMode,
    /// Ports of the selected workloads with a mode of their own, as Istio's `portLevelMtls`: the
    /// documented way for kubelet's probes (plaintext from the node) to reach a STRICT pod is a
    /// PERMISSIVE probe port, which then takes plaintext from anything on the node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<u16, PortMtls>,
}

/// The mode of one port in a PeerAuthentication's `portLevelMtls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortMtls {
    pub mode: PeerAuthenticationMode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum PeerAuthenticationMode {
    Strict,
    Permissive,
}

/// Resilience for calls to one Service: applied by the caller's node proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource, schemars::JsonSchema),
    kube(
        group = "nodemesh.io",
        version = "v1alpha1",
        kind = "TrafficPolicy",
        namespaced,
        status = "PolicyStatus",
        printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.targetRef.name"}"#
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    pub target_ref: ServiceRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<Faults>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
}

/// What the node proxies record for the workloads of one namespace (one Telemetry per namespace;
/// without one, the node's defaults apply).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource, schemars::JsonSchema),
    kube(
        group = "nodemesh.io",
        version = "v1alpha1",
        kind = "Telemetry",
        namespaced,
        status = "PolicyStatus",
        printcolumn = r#"{"name":"AccessLogs","type":"boolean","jsonPath":".spec.accessLogging.enabled"}"#
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelemetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_logging: Option<AccessLogging>,
}

/// One JSON line per HTTP request or TCP connection, on the node proxy's stdout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogging {
    pub enabled: bool,
    /// Share of requests and connections logged, 0-100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_percent: Option<f64>,
}

/// A Service in the policy's namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRef {
    /// Only `Service` is supported.
    #[serde(default = "service_kind")]
    pub kind: String,
    pub name: String,
}

fn service_kind() -> String {
    "Service".into()
}

/// Durations are strings like `250ms`, `1.5s`, `2m`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// `connect-failure`, `reset`, `5xx`, `gateway-error`, an HTTP status (`503`), or a gRPC
    /// status name (`unavailable`, `resource-exhausted`, ...).
    #[serde(default)]
    pub retry_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Retries may add at most this share of the requests (default 20): retries cannot multiply
    /// load during an outage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    pub base_interval: String,
    pub max_interval: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreaker {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    pub consecutive_failures: u32,
    pub base_ejection_time: String,
    /// At most this share of endpoints is ejected at once (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

/// Token bucket (GCRA) per destination, and optionally per source identity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    #[serde(default)]
    pub per_source: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Faults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    pub percent: f64,
    pub fixed_delay: String,
}

/// Exactly one of `httpStatus` and `grpcStatus`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    pub percent: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    pub policy: LoadBalancerPolicy,
    /// For `CONSISTENT_HASH`: the request header to hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadBalancerPolicy {
    /// Power of two choices over peak-EWMA latency (the default).
    P2cEwma,
    RoundRobin,
    ConsistentHash,
}

/// What the controller made of the object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A status condition (the shape of `metav1.Condition`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`.
    pub status: String,
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub last_transition_time: String,
}

/// Durations as Kubernetes and the Gateway API write them: `250ms`, `1.5s`, `1m30s`. One parser
/// for the controller (validation) and the node (applying).
pub fn parse_duration(v: &str) -> Result<std::time::Duration, String> {
    if let Some(secs) = v.strip_suffix('s').filter(|s| s.contains('.'))
        && let Ok(f) = secs.parse::<f64>()
    {
        return (f.is_finite() && f >= 0.0)
            .then(|| std::time::Duration::from_secs_f64(f))
            .ok_or_else(|| "negative".to_string());
    }
    humantime::parse_duration(v).map_err(|e| e.to_string())
}
