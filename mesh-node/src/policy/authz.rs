//! Authorization: `AuthorizationPolicy` specs compiled once (when a configuration version is
//! converted) into matchers, and a pure `evaluate` over the facts of one connection or request.
//!
//! Semantics (Istio's, documented in the README):
//! - only policies of the destination's namespace whose selector matches the destination apply;
//! - DENY first: any matching DENY rule denies;
//! - then, if any ALLOW policy applies, a rule of one of them must match (an ALLOW policy without
//!   rules matches nothing: default deny); without ALLOW policies, allowed;
//! - AUDIT rules never change the decision; matching ones are reported.
//! - On a plain TCP connection there is no method, path or header: an ALLOW operation that needs
//!   them does not match (fail closed), a DENY operation that needs them does (fail closed too).
use mesh_api::sync::LockExt;
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use mesh_api::{
    crd::{AuthorizationAction, AuthorizationPolicySpec, AuthorizationRule, Operation, Source},
    identity::SpiffeId,
};
use regex::Regex;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("AuthorizationPolicy {policy}: {field}: {reason}")]
pub struct CompileError {
    pub policy: String,
    pub field: String,
    pub reason: String,
}

/// `namespace/name` of a policy and the index of the rule that decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    pub policy: Arc<str>,
    pub rule: usize,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} rule {}", self.policy, self.rule)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by this ALLOW rule, or `None`: no ALLOW policy applies.
    Allow(Option<RuleRef>),
    /// Denied by this DENY rule.
    Denied(RuleRef),
    /// ALLOW policies apply and none of their rules matched.
    NotAllowed { policies: Vec<Arc<str>> },
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }

    /// A short reason, for a 403 body and logs.
    pub fn reason(&self) -> String {
        match self {
            Decision::Allow(Some(r)) => format!("allowed by {r}"),
            Decision::Allow(None) => "allowed: no ALLOW policy applies".into(),
            Decision::Denied(r) => format!("denied by {r}"),
            Decision::NotAllowed { policies } => {
                format!("no rule of {} allows it", policies.join(", "))
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// AUDIT rules that matched.
    pub audited: Vec<RuleRef>,
}

/// Decisions by policy and action, for `mesh_authz_policy_decisions_total`: bounded by the
/// number of policies in the configuration.
#[derive(Debug, Default)]
pub struct DecisionCounts(std::sync::Mutex<BTreeMap<(&'static str, &'static str), PolicyCounts>>);

/// Counts by policy name for one (action, layer): looked up by `&str`, so counting a request
/// allocates nothing once its policy has been seen.
type PolicyCounts = BTreeMap<Arc<str>, u64>;

impl DecisionCounts {
    /// Counts `v` for `layer` (`tcp` connections or `http` requests): the deciding policy (or
    /// `none` when no ALLOW policy applies, `default` when ALLOW policies apply and none allows),
    /// and each AUDIT rule that matched.
    pub fn record(&self, layer: &'static str, v: &Verdict) {
        let (policy, action) = match &v.decision {
            Decision::Allow(Some(r)) => (&*r.policy, "allow"),
            Decision::Allow(None) => ("none", "allow"),
            Decision::Denied(r) => (&*r.policy, "deny"),
            Decision::NotAllowed { .. } => ("default", "deny"),
        };
        let mut m = self.0.locked();
        let mut bump = |action, policy: &str| {
            let by = m.entry((action, layer)).or_default();
            match by.get_mut(policy) {
                Some(n) => *n += 1,
                None => {
                    by.insert(Arc::from(policy), 1);
                }
            }
        };
        bump(action, policy);
        for a in &v.audited {
            bump("audit", &a.policy);
        }
    }

    pub fn snapshot(&self) -> Vec<serde_json::Value> {
        let m = self.0.locked();
        let mut rows: Vec<_> = m
            .iter()
            .flat_map(|((action, layer), by)| by.iter().map(move |(p, n)| (p, *action, *layer, n)))
            .collect();
        rows.sort();
        rows.into_iter()
            .map(|(policy, action, layer, n)| {
                serde_json::json!({"policy": &**policy, "action": action, "layer": layer, "count": n})
            })
            .collect()
    }
}

/// The HTTP facts of a request (absent for a TCP connection).
pub struct Http<'a> {
    pub method: &'a str,
    /// Without the query string.
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
    /// The request's authority (HTTP/2 `:authority`, or an absolute-form target): what `host`
    /// rules see when there is no `Host` header, so HTTP/1.1 and HTTP/2 are judged alike.
    pub authority: Option<&'a str>,
}

/// What the destination's node proxy knows about one connection or request.
pub struct Facts<'a> {
    /// The caller's identity proven by mTLS; `None` for plaintext.
    pub source: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub port: u16,
    pub http: Option<Http<'a>>,
}

#[derive(Debug)]
enum Principal {
    Exact(String),
    Prefix(String),
}

#[derive(Debug)]
struct From {
    principals: Vec<Principal>,
    namespaces: Vec<String>,
    ip_blocks: Vec<IpNet>,
}

#[derive(Debug)]
enum PathMatch {
    Exact(String),
    Prefix(String),
}

#[derive(Debug)]
struct Header {
    name: http::HeaderName,
    value: Option<String>,
    regex: Option<Regex>,
}

#[derive(Debug)]
struct To {
    ports: Vec<u16>,
    methods: Vec<String>,
    paths: Vec<PathMatch>,
    headers: Vec<Header>,
}

impl To {
    fn needs_http(&self) -> bool {
        !(self.methods.is_empty() && self.paths.is_empty() && self.headers.is_empty())
    }
}

#[derive(Debug)]
struct Rule {
    from: Vec<From>,
    to: Vec<To>,
}

#[derive(Debug)]
struct Policy {
    id: Arc<str>,
    namespace: String,
    selector: Option<BTreeMap<String, String>>,
    action: AuthorizationAction,
    rules: Vec<Rule>,
}

/// Every authorization policy this node enforces.
#[derive(Debug, Default)]
pub struct Policies(Vec<Policy>);

impl Policies {
    /// Compiles `(namespace, name, spec)` triples; the first bad field fails all (the node then
    /// rejects the configuration version).
    pub fn compile<'a>(
        specs: impl IntoIterator<Item = (&'a str, &'a str, &'a AuthorizationPolicySpec)>,
    ) -> Result<Self, CompileError> {
        let mut out = Vec::new();
        for (ns, name, spec) in specs {
            let id: Arc<str> = format!("{ns}/{name}").into();
            let err = |field: String, reason: String| CompileError {
                policy: id.to_string(),
                field,
                reason,
            };
            let mut rules = Vec::new();
            for (i, r) in spec.rules.iter().enumerate() {
                rules.push(rule(i, r).map_err(|(f, why)| err(f, why))?);
            }
            out.push(Policy {
                id: id.clone(),
                namespace: ns.to_string(),
                selector: spec.selector.as_ref().map(|s| s.match_labels.clone()),
                action: spec.action,
                rules,
            });
        }
        Ok(Self(out))
    }

    pub fn evaluate(&self, f: &Facts<'_>) -> Verdict {
        let applicable = self.0.iter().filter(|p| {
            p.namespace == f.namespace
                && p.selector
                    .as_ref()
                    .is_none_or(|s| s.iter().all(|(k, v)| f.labels.get(k) == Some(v)))
        });
        let (mut deny, mut allow_policies, mut allowed_by, mut audited) =
            (None, Vec::new(), None, Vec::new());
        for p in applicable {
            let matched = p
                .rules
                .iter()
                .position(|r| rule_matches(r, f, p.action == AuthorizationAction::Deny));
            let hit = matched.map(|rule| RuleRef {
                policy: p.id.clone(),
                rule,
            });
            match p.action {
                AuthorizationAction::Deny => deny = deny.or(hit),
                AuthorizationAction::Allow => {
                    allow_policies.push(p.id.clone());
                    allowed_by = allowed_by.or(hit);
                }
                AuthorizationAction::Audit => audited.extend(hit),
            }
        }
        let decision = match (deny, allowed_by) {
            (Some(d), _) => Decision::Denied(d),
            (None, Some(a)) => Decision::Allow(Some(a)),
            (None, None) if allow_policies.is_empty() => Decision::Allow(None),
            (None, None) => Decision::NotAllowed {
                policies: allow_policies,
            },
        };
        Verdict { decision, audited }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

type Bad = (String, String);

fn rule(i: usize, r: &AuthorizationRule) -> Result<Rule, Bad> {
    let from = r
        .from
        .iter()
        .enumerate()
        .map(|(j, s)| source(&format!("rules[{i}].from[{j}]"), s))
        .collect::<Result<_, _>>()?;
    let to =
        r.to.iter()
            .enumerate()
            .map(|(j, o)| operation(&format!("rules[{i}].to[{j}]"), o))
            .collect::<Result<_, _>>()?;
    Ok(Rule { from, to })
}

fn source(f: &str, s: &Source) -> Result<From, Bad> {
    let principals = s
        .principals
        .iter()
        .map(|p| match p.strip_suffix('*') {
            Some(prefix) => Principal::Prefix(prefix.to_string()),
            None => Principal::Exact(p.clone()),
        })
        .collect();
    let ip_blocks = s
        .ip_blocks
        .iter()
        .enumerate()
        .map(|(k, b)| {
            b.parse::<IpNet>()
                .or_else(|_| b.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| (format!("{f}.ipBlocks[{k}]"), format!("{b:?} is not a CIDR")))
        })
        .collect::<Result<_, _>>()?;
    Ok(From {
        principals,
        namespaces: s.namespaces.clone(),
        ip_blocks,
    })
}

fn operation(f: &str, o: &Operation) -> Result<To, Bad> {
    let headers = o
        .headers
        .iter()
        .enumerate()
        .map(|(k, h)| {
            let hf = format!("{f}.headers[{k}]");
            let name = http::HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
                (
                    format!("{hf}.name"),
                    format!("{:?} is not a header name", h.name),
                )
            })?;
            let regex = h
                .regex
                .as_deref()
                .map(|r| Regex::new(&format!("^(?:{r})$")))
                .transpose()
                .map_err(|e| (format!("{hf}.regex"), e.to_string()))?;
            Ok(Header {
                name,
                value: h.value.clone(),
                regex,
            })
        })
        .collect::<Result<_, Bad>>()?;
    let paths = o
        .paths
        .iter()
        .map(|p| match p.strip_suffix('*') {
            Some(prefix) => PathMatch::Prefix(prefix.to_string()),
            None => PathMatch::Exact(p.clone()),
        })
        .collect();
    Ok(To {
        ports: o.ports.clone(),
        methods: o.methods.clone(),
        paths,
        headers,
    })
}

fn rule_matches(r: &Rule, f: &Facts<'_>, deny: bool) -> bool {
    (r.from.is_empty() || r.from.iter().any(|s| source_matches(s, f)))
        && (r.to.is_empty() || r.to.iter().any(|o| operation_matches(o, f, deny)))
}

fn source_matches(s: &From, f: &Facts<'_>) -> bool {
    let id = f.source.map(SpiffeId::as_str);
    let principal = s.principals.is_empty()
        || id.is_some_and(|id| {
            s.principals.iter().any(|p| match p {
                Principal::Exact(e) => e == id,
                Principal::Prefix(pre) => id.starts_with(pre.as_str()),
            })
        });
    let namespace = s.namespaces.is_empty()
        || f.source
            .is_some_and(|id| s.namespaces.iter().any(|n| n == id.namespace()));
    let ip = s.ip_blocks.is_empty() || s.ip_blocks.iter().any(|b| b.contains(&f.source_ip));
    principal && namespace && ip
}

fn operation_matches(o: &To, f: &Facts<'_>, deny: bool) -> bool {
    if !o.ports.is_empty() && !o.ports.contains(&f.port) {
        return false;
    }
    let Some(h) = &f.http else {
        // TCP: conditions on HTTP cannot be checked; fail closed either way.
        return !o.needs_http() || deny;
    };
    let method = o.methods.is_empty() || o.methods.iter().any(|m| m == h.method);
    let path = o.paths.is_empty()
        || o.paths.iter().any(|p| match p {
            PathMatch::Exact(e) => e == h.path,
            PathMatch::Prefix(pre) => h.path.starts_with(pre.as_str()),
        });
    let headers = o.headers.iter().all(|m| {
        // Every value counts, also one with bytes that are not visible ASCII (lossily decoded):
        // dropping it would let such a value past a DENY that the app still reads.
        let mut values: Vec<std::borrow::Cow<'_, str>> = h
            .headers
            .get_all(&m.name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect();
        if values.is_empty()
            && m.name == http::header::HOST
            && let Some(a) = h.authority
        {
            values.push(a.into());
        }
        match (&m.value, &m.regex) {
            (Some(v), _) => values.iter().any(|x| x == v),
            (None, Some(r)) => values.iter().any(|x| r.is_match(x)),
            (None, None) => !values.is_empty(),
        }
    });
    method && path && headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_counted_by_policy_action_and_layer() {
        let rule = |p: &str| RuleRef {
            policy: Arc::from(p),
            rule: 0,
        };
        let verdict = |decision, audited| Verdict { decision, audited };
        let counts = DecisionCounts::default();
        for (layer, v) in [
            (
                "http",
                verdict(Decision::Allow(Some(rule("ns/web"))), vec![]),
            ),
            (
                "http",
                verdict(
                    Decision::Allow(Some(rule("ns/web"))),
                    vec![rule("ns/audit")],
                ),
            ),
            (
                "tcp",
                verdict(Decision::Allow(Some(rule("ns/web"))), vec![]),
            ),
            ("http", verdict(Decision::Allow(None), vec![])),
            ("http", verdict(Decision::Denied(rule("ns/deny")), vec![])),
            (
                "http",
                verdict(Decision::NotAllowed { policies: vec![] }, vec![]),
            ),
        ] {
            counts.record(layer, &v);
        }
        let rows: Vec<_> = counts
            .snapshot()
            .iter()
            .map(|r| {
                format!(
                    "{} {} {} {}",
                    r["policy"].as_str().unwrap(),
                    r["action"].as_str().unwrap(),
                    r["layer"].as_str().unwrap(),
                    r["count"]
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                "default deny http 1",
                "none allow http 1",
                "ns/audit audit http 1",
                "ns/deny deny http 1",
                "ns/web allow http 2",
                "ns/web allow tcp 1",
            ]
        );
    }

    fn policies(yaml: &str) -> Policies {
        let docs: Vec<(String, String, AuthorizationPolicySpec)> = serde_yaml_docs(yaml);
        Policies::compile(docs.iter().map(|(n, m, s)| (n.as_str(), m.as_str(), s))).unwrap()
    }

    /// `namespace/name: {spec as JSON}` lines.
    fn serde_yaml_docs(text: &str) -> Vec<(String, String, AuthorizationPolicySpec)> {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let (id, spec) = l.trim().split_once(": ").unwrap();
                let (ns, name) = id.split_once('/').unwrap();
                (ns.into(), name.into(), serde_json::from_str(spec).unwrap())
            })
            .collect()
    }

    const POLICIES: &str = r#"
        shop/deny-batch: {"action": "DENY", "rules": [{"from": [{"principals": ["spiffe://td/ns/shop/sa/batch"]}]}]}
        shop/deny-admin: {"selector": {"matchLabels": {"app": "cart"}}, "action": "DENY", "rules": [{"to": [{"paths": ["/admin*"]}]}]}
        shop/catalog-readers: {"selector": {"matchLabels": {"app": "catalog"}}, "action": "ALLOW", "rules": [{"from": [{"namespaces": ["shop"]}], "to": [{"methods": ["GET"], "ports": [8080]}]}, {"from": [{"ipBlocks": ["10.9.0.0/16"]}]}]}
        shop/lock-db: {"selector": {"matchLabels": {"app": "db"}}, "action": "ALLOW"}
        shop/audit-writes: {"action": "AUDIT", "rules": [{"to": [{"methods": ["POST", "PUT"]}]}]}
        shop/canary-header: {"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW", "rules": [{"to": [{"headers": [{"name": "x-user", "regex": "u-[0-9]+"}]}]}, {"from": [{"principals": ["spiffe://td/ns/ops/*"]}]}]}
        other/deny-all-in-other: {"action": "DENY", "rules": [{}]}
    "#;

    /// Method, path, headers.
    type HttpCase = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
    );

    struct Case {
        name: &'static str,
        source: Option<&'static str>,
        ip: &'static str,
        app: &'static str,
        port: u16,
        http: Option<HttpCase>,
        want: &'static str,
    }

    #[test]
    fn table() {
        let p = policies(POLICIES);
        let cases = [
            Case {
                name: "reader GET",
                source: Some("spiffe://td/ns/shop/sa/web"),
                ip: "10.1.0.1",
                app: "catalog",
                port: 8080,
                http: Some(("GET", "/items", &[])),
                want: "allowed by shop/catalog-readers rule 0",
            },
            Case {
                name: "reader POST",
                source: Some("spiffe://td/ns/shop/sa/web"),
                ip: "10.1.0.1",
                app: "catalog",
                port: 8080,
                http: Some(("POST", "/items", &[])),
                want: "no rule of shop/catalog-readers allows it",
            },
            Case {
                name: "reader other port",
                source: Some("spiffe://td/ns/shop/sa/web"),
                ip: "10.1.0.1",
                app: "catalog",
                port: 9090,
                http: Some(("GET", "/items", &[])),
                want: "no rule of shop/catalog-readers allows it",
            },
            Case {
                name: "other namespace",
                source: Some("spiffe://td/ns/ops/sa/x"),
                ip: "10.1.0.1",
                app: "catalog",
                port: 8080,
                http: Some(("GET", "/items", &[])),
                want: "no rule of shop/catalog-readers allows it",
            },
            Case {
                name: "ip block, plaintext",
                source: None,
                ip: "10.9.3.4",
                app: "catalog",
                port: 8080,
                http: Some(("DELETE", "/x", &[])),
                want: "allowed by shop/catalog-readers rule 1",
            },
            Case {
                name: "plaintext has no namespace",
                source: None,
                ip: "10.1.0.1",
                app: "catalog",
                port: 8080,
                http: Some(("GET", "/items", &[])),
                want: "no rule of shop/catalog-readers allows it",
            },
            Case {
                name: "DENY beats ALLOW",
                source: Some("spiffe://td/ns/shop/sa/batch"),
                ip: "10.1.0.1",
                app: "catalog",
                port: 8080,
                http: Some(("GET", "/items", &[])),
                want: "denied by shop/deny-batch rule 0",
            },
            Case {
                name: "DENY on path prefix",
                source: Some("spiffe://td/ns/shop/sa/web"),
                ip: "10.1.0.1",
                app: "cart",
                port: 80,
                http: Some(("GET", "/admin/users", &[])),
                want: "denied by shop/deny-admin rule 0",
            },
            Case {
                name: "prefix is a prefix",
                source: Some("spiffe://td/ns/shop/sa/web"),
                ip: "10.1.0.1",
                app: "cart",
                port: 80,
                http: Some(("GET", "/adm", &[])),
                want: "allowed: no ALLOW policy applies",
            },
            Case {
                name: "DENY with HTTP conditions fails closed on TCP",
                source: Some("spiffe://td/ns/shop/sa/web"),
                ip: "10.1.0.1",
                app: "cart",
                port: 80,
                http: None,
                want: "denied by shop/deny-admin rule 0",
            },
            Case {
                name: "ALLOW with HTTP conditions does not match TCP",
                source: Some("spiffe://td/ns/shop/sa/web"),
                ip: "10.1.0.1",
                app: "catalog",
                port: 8080,
                http: None,
                want: "no rule of shop/catalog-readers allows it",
            },
            Case {
                name: "ALLOW without rules: default deny",
                source: Some("spiffe://td/ns/shop/sa/web"),
                ip: "10.1.0.1",
                app: "db",
                port: 5432,
                http: None,
                want: "no rule of shop/lock-db allows it",
            },
            Case {
                name: "header regex",
                source: Some("spiffe://td/ns/shop/sa/x"),
                ip: "10.1.0.1",
                app: "web",
                port: 80,
                http: Some(("GET", "/", &[("x-user", "u-42")])),
                want: "allowed by shop/canary-header rule 0",
            },
            Case {
                name: "header regex is anchored",
                source: Some("spiffe://td/ns/shop/sa/x"),
                ip: "10.1.0.1",
                app: "web",
                port: 80,
                http: Some(("GET", "/", &[("x-user", "u-42x")])),
                want: "no rule of shop/canary-header allows it",
            },
            Case {
                name: "principal prefix",
                source: Some("spiffe://td/ns/ops/sa/oncall"),
                ip: "10.1.0.1",
                app: "web",
                port: 80,
                http: None,
                want: "allowed by shop/canary-header rule 1",
            },
            Case {
                name: "empty rule matches all",
                source: Some("spiffe://td/ns/shop/sa/web"),
                ip: "10.1.0.1",
                app: "anything",
                port: 1,
                http: None,
                want: "DENY-OTHER",
            },
        ];
        for c in cases {
            let id = c.source.map(|s| s.parse::<SpiffeId>().unwrap());
            let mut headers = http::HeaderMap::new();
            for (k, v) in c.http.map(|h| h.2).unwrap_or(&[]) {
                headers.append(http::HeaderName::from_static(k), v.parse().unwrap());
            }
            let labels: BTreeMap<String, String> = [("app".to_string(), c.app.to_string())].into();
            let ns = if c.want == "DENY-OTHER" {
                "other"
            } else {
                "shop"
            };
            let facts = Facts {
                source: id.as_ref(),
                source_ip: c.ip.parse().unwrap(),
                namespace: ns,
                labels: &labels,
                port: c.port,
                http: c.http.map(|(method, path, _)| Http {
                    method,
                    path,
                    headers: &headers,
                    authority: None,
                }),
            };
            let v = p.evaluate(&facts);
            let want = if c.want == "DENY-OTHER" {
                "denied by other/deny-all-in-other rule 0"
            } else {
                c.want
            };
            assert_eq!(v.decision.reason(), want, "case {:?}", c.name);
        }
    }

    /// A DENY on a header must see a value with bytes that are not visible ASCII, and a `host`
    /// rule must see an HTTP/2 request's `:authority`; an ALLOW must not be won that way.
    #[test]
    fn header_rules_see_every_value_and_host_rules_see_the_authority() {
        let p = policies(
            r#"shop/deny: {"action": "DENY", "rules": [{"to": [{"headers": [{"name": "x-debug"}]}]}, {"to": [{"headers": [{"name": "x-user", "regex": ".*admin.*"}]}]}, {"to": [{"headers": [{"name": "host", "value": "admin.shop"}]}]}]}"#,
        );
        let labels = BTreeMap::new();
        let decide = |pairs: &[(&str, &[u8])], authority: Option<&str>| {
            let mut headers = http::HeaderMap::new();
            for (k, v) in pairs {
                headers.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    http::HeaderValue::from_bytes(v).unwrap(),
                );
            }
            p.evaluate(&Facts {
                source: None,
                source_ip: "10.1.0.1".parse().unwrap(),
                namespace: "shop",
                labels: &labels,
                port: 80,
                http: Some(Http {
                    method: "GET",
                    path: "/",
                    headers: &headers,
                    authority,
                }),
            })
            .decision
            .allowed()
        };
        /// Header fields, the authority, whether the request is allowed.
        type Case<'a> = (&'a [(&'a str, &'a [u8])], Option<&'a str>, bool);
        let cases: &[Case] = &[
            (&[], None, true),
            (&[("x-debug", b"1")], None, false),
            (&[("x-debug", b"\xff")], None, false),
            (&[("x-user", b"admin\xff")], None, false),
            (&[("x-user", b"\xe9admin")], None, false),
            (&[("x-user", b"bob")], None, true),
            (&[("host", b"admin.shop")], None, false),
            (&[], Some("admin.shop"), false),
            (&[], Some("www.shop"), true),
        ];
        for (pairs, authority, allowed) in cases {
            assert_eq!(
                decide(pairs, *authority),
                *allowed,
                "{pairs:?} {authority:?}"
            );
        }
    }

    #[test]
    fn audit_reports_without_deciding() {
        let p = policies(POLICIES);
        let headers = http::HeaderMap::new();
        let labels: BTreeMap<String, String> = [("app".to_string(), "cart".to_string())].into();
        let id: SpiffeId = "spiffe://td/ns/shop/sa/web".parse().unwrap();
        let v = p.evaluate(&Facts {
            source: Some(&id),
            source_ip: "10.1.0.1".parse().unwrap(),
            namespace: "shop",
            labels: &labels,
            port: 80,
            http: Some(Http {
                method: "POST",
                path: "/cart",
                headers: &headers,
                authority: None,
            }),
        });
        assert!(v.decision.allowed());
        assert_eq!(
            v.audited
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["shop/audit-writes rule 0"]
        );
    }

    #[test]
    fn bad_specs_name_the_field() {
        let bad = serde_yaml_docs(
            r#"shop/x: {"action": "ALLOW", "rules": [{"to": [{"headers": [{"name": "x", "regex": "("}]}]}]}"#,
        );
        let e =
            Policies::compile(bad.iter().map(|(n, m, s)| (n.as_str(), m.as_str(), s))).unwrap_err();
        assert_eq!(e.field, "rules[0].to[0].headers[0].regex");
        let bad = serde_yaml_docs(
            r#"shop/y: {"action": "DENY", "rules": [{"from": [{"ipBlocks": ["10.0.0.0/40"]}]}]}"#,
        );
        let e =
            Policies::compile(bad.iter().map(|(n, m, s)| (n.as_str(), m.as_str(), s))).unwrap_err();
        assert_eq!(
            (e.policy.as_str(), e.field.as_str()),
            ("shop/y", "rules[0].from[0].ipBlocks[0]")
        );
    }
}
