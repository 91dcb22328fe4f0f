//! HTTP and gRPC routing: `HTTPRoute`/`GRPCRoute` specs attached to a Service, compiled once per
//! configuration version, and pure functions that pick the rule for a request and the backend for
//! a draw. Gateway API semantics:
//! - `PathPrefix` matches whole path segments (`/api` matches `/api` and `/api/x`, not `/apix`);
//! - when several rules match, the most specific wins: an exact path, then the longest prefix,
//!   then a method match, then the most header matches, then the most query matches, then the
//!   earlier route and rule;
//! - a rule without matches matches everything (`PathPrefix /`);
//! - backends are chosen in proportion to their weights (default 1; weight 0 never).
use std::{collections::BTreeMap, time::Duration};

use mesh_api::gateway::{
    BackendRef, GRPCRouteSpec, HTTPRouteFilter, HTTPRouteSpec, HTTPRouteTimeouts, ValueMatch,
};
use regex::Regex;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{route}: {field}: {reason}")]
pub struct RouteError {
    pub route: String,
    pub field: String,
    pub reason: String,
}

#[derive(Debug)]
enum Path {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum Value {
    Exact(String),
    Regex(Regex),
}

impl Value {
    fn matches(&self, v: &str) -> bool {
        match self {
            Value::Exact(e) => e == v,
            Value::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug)]
struct Match {
    path: Path,
    method: Option<String>,
    headers: Vec<(http::HeaderName, Value)>,
    query: Vec<(String, Value)>,
}

/// A backend Service and its weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// `namespace/name`.
    pub service: String,
    pub port: u16,
    pub weight: u32,
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// `namespace/name` of the route and the rule's index, for logs and metrics.
    pub route: std::sync::Arc<str>,
    pub index: usize,
    matches: Vec<Match>,
    pub backends: Vec<Backend>,
    pub filters: Vec<HTTPRouteFilter>,
    pub timeouts: Timeouts,
}

/// A rule's timeouts, parsed once when the route is compiled (the controller validated them;
/// one that does not parse is no timeout, as before).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole request, retries included.
    pub request: Option<Duration>,
    /// Each try.
    pub backend_request: Option<Duration>,
}

impl Timeouts {
    fn compile(t: Option<&HTTPRouteTimeouts>) -> Self {
        let d = |v: &Option<String>| {
            v.as_deref()
                .and_then(|s| mesh_api::crd::parse_duration(s).ok())
        };
        t.map_or_else(Self::default, |t| Self {
            request: d(&t.request),
            backend_request: d(&t.backend_request),
        })
    }
}

/// The rules of every route attached to one Service port, in precedence order of routes.
#[derive(Debug, Default)]
pub struct Table {
    rules: Vec<Rule>,
}

/// What routing looks at in a request.
pub struct Request<'a> {
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}

fn value(f: &str, m: &ValueMatch) -> Result<Value, (String, String)> {
    match m.type_.as_deref().unwrap_or("Exact") {
        "Exact" => Ok(Value::Exact(m.value.clone())),
        "RegularExpression" => anchored(&m.value)
            .map(Value::Regex)
            .map_err(|e| (format!("{f}.value"), e)),
        t => Err((format!("{f}.type"), format!("unknown type {t:?}"))),
    }
}

/// Header matches of one match entry at field path `f`.
fn headers(f: &str, hs: &[ValueMatch]) -> Result<Vec<(http::HeaderName, Value)>, (String, String)> {
    hs.iter()
        .enumerate()
        .map(|(k, h)| {
            let name = http::HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
                (
                    format!("{f}.headers[{k}].name"),
                    "not a header name".to_string(),
                )
            })?;
            Ok((name, value(&format!("{f}.headers[{k}]"), h)?))
        })
        .collect()
}

/// Gateway API regular expressions match the whole value.
fn anchored(r: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{r})$")).map_err(|e| e.to_string())
}

fn backends(refs: &[BackendRef], ns: &str) -> Vec<Backend> {
    refs.iter()
        .map(|b| Backend {
            service: format!("{}/{}", b.namespace.as_deref().unwrap_or(ns), b.name),
            port: b.port.unwrap_or(0),
            weight: b.weight.unwrap_or(1),
        })
        .collect()
}

impl Table {
    /// Adds an HTTPRoute's rules (call in route precedence order: oldest first).
    pub fn add_http(
        &mut self,
        ns: &str,
        name: &str,
        spec: &HTTPRouteSpec,
    ) -> Result<(), RouteError> {
        let route = format!("{ns}/{name}");
        let err = |(field, reason)| RouteError {
            route: route.clone(),
            field,
            reason,
        };
        for (i, r) in spec.rules.iter().enumerate() {
            let mut matches = Vec::new();
            for (j, m) in r.matches.iter().enumerate() {
                let f = format!("rules[{i}].matches[{j}]");
                let p = m.path.clone().unwrap_or_default();
                let v = p.value.unwrap_or_else(|| "/".into());
                let path = match p.type_.as_deref().unwrap_or("PathPrefix") {
                    "Exact" => Path::Exact(v),
                    "PathPrefix" => Path::Prefix(v.trim_end_matches('/').to_string()),
                    "RegularExpression" => {
                        Path::Regex(anchored(&v).map_err(|e| err((format!("{f}.path.value"), e)))?)
                    }
                    t => {
                        return Err(err((
                            format!("{f}.path.type"),
                            format!("unknown type {t:?}"),
                        )));
                    }
                };
                matches.push(Match {
                    path,
                    method: m.method.clone(),
                    headers: headers(&f, &m.headers).map_err(err)?,
                    query: m
                        .query_params
                        .iter()
                        .enumerate()
                        .map(|(k, q)| {
                            Ok((q.name.clone(), value(&format!("{f}.queryParams[{k}]"), q)?))
                        })
                        .collect::<Result<_, _>>()
                        .map_err(err)?,
                });
            }
            self.rules.push(Rule {
                route: route.as_str().into(),
                index: i,
                matches: default_match(matches),
                backends: backends(&r.backend_refs, ns),
                filters: r.filters.clone(),
                timeouts: Timeouts::compile(r.timeouts.as_ref()),
            });
        }
        Ok(())
    }

    /// Adds a GRPCRoute's rules: a method match is a path match on `/service/method`.
    pub fn add_grpc(
        &mut self,
        ns: &str,
        name: &str,
        spec: &GRPCRouteSpec,
    ) -> Result<(), RouteError> {
        let route = format!("{ns}/{name}");
        let err = |(field, reason)| RouteError {
            route: route.clone(),
            field,
            reason,
        };
        for (i, r) in spec.rules.iter().enumerate() {
            let mut matches = Vec::new();
            for (j, m) in r.matches.iter().enumerate() {
                let f = format!("rules[{i}].matches[{j}]");
                let mm = m.method.clone().unwrap_or_default();
                let regex = mm.type_.as_deref() == Some("RegularExpression");
                let part = |v: Option<String>| match v {
                    Some(v) if regex => v,
                    Some(v) => regex::escape(&v),
                    None => "[^/]+".into(),
                };
                let path = match (&mm.service, &mm.method) {
                    (None, None) => Path::Prefix(String::new()),
                    // Both exact: the most specific kind of match there is.
                    (Some(s), Some(m)) if !regex => Path::Exact(format!("/{s}/{m}")),
                    _ => Path::Regex(
                        anchored(&format!(
                            "/{}/{}",
                            part(mm.service.clone()),
                            part(mm.method.clone())
                        ))
                        .map_err(|e| err((format!("{f}.method"), e)))?,
                    ),
                };
                matches.push(Match {
                    path,
                    method: Some("POST".into()),
                    headers: headers(&f, &m.headers).map_err(err)?,
                    query: Vec::new(),
                });
            }
            self.rules.push(Rule {
                route: route.as_str().into(),
                index: i,
                matches: default_match(matches),
                backends: backends(&r.backend_refs, ns),
                filters: r.filters.clone(),
                timeouts: Timeouts::default(),
            });
        }
        Ok(())
    }

    /// The rule for `req`, by Gateway API precedence, and the path prefix it matched (what
    /// `ReplacePrefixMatch` replaces); `None` when no rule matches (404).
    pub fn select(&self, req: &Request<'_>) -> Option<(&Rule, Option<&str>)> {
        let query = parse_query(req.query);
        let mut best: Option<(Specificity, usize, &Match)> = None;
        for (ri, rule) in self.rules.iter().enumerate() {
            for m in &rule.matches {
                if !matches(m, req, &query) {
                    continue;
                }
                let s = specificity(m);
                // Earlier rules win ties: only a strictly more specific match replaces.
                if best.as_ref().is_none_or(|(b, _, _)| s > *b) {
                    best = Some((s, ri, m));
                }
            }
        }
        best.map(|(_, ri, m)| {
            let prefix = match &m.path {
                Path::Prefix(p) => Some(p.as_str()),
                _ => None,
            };
            (&self.rules[ri], prefix)
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

fn default_match(matches: Vec<Match>) -> Vec<Match> {
    if matches.is_empty() {
        vec![Match {
            path: Path::Prefix(String::new()),
            method: None,
            headers: Vec::new(),
            query: Vec::new(),
        }]
    } else {
        matches
    }
}

/// (exact path, prefix length, method, header count, query count): compared in that order.
type Specificity = (bool, usize, bool, usize, usize);

fn specificity(m: &Match) -> Specificity {
    let (exact, prefix) = match &m.path {
        Path::Exact(p) => (true, p.len()),
        Path::Prefix(p) => (false, p.len()),
        // A regex ranks like a prefix of its pattern's length: specific, but below exact.
        Path::Regex(r) => (false, r.as_str().len()),
    };
    (
        exact,
        prefix,
        m.method.is_some(),
        m.headers.len(),
        m.query.len(),
    )
}

fn parse_query(q: Option<&str>) -> BTreeMap<&str, Vec<&str>> {
    let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for kv in q.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        out.entry(k).or_default().push(v);
    }
    out
}

fn matches(m: &Match, req: &Request<'_>, query: &BTreeMap<&str, Vec<&str>>) -> bool {
    let path = match &m.path {
        Path::Exact(p) => req.path == p,
        Path::Prefix(p) => {
            req.path.starts_with(p.as_str())
                && (req.path.len() == p.len() || req.path.as_bytes()[p.len()] == b'/')
        }
        Path::Regex(r) => r.is_match(req.path),
    };
    path && m.method.as_deref().is_none_or(|x| x == req.method)
        && m.headers.iter().all(|(name, v)| {
            req.headers
                .get_all(name)
                .iter()
                .filter_map(|h| h.to_str().ok())
                .any(|h| v.matches(h))
        })
        && m.query.iter().all(|(name, v)| {
            // The first value counts, as in the Gateway API.
            query
                .get(name.as_str())
                .and_then(|vs| vs.first())
                .is_some_and(|x| v.matches(x))
        })
}

/// The backend for a uniform draw `x` in `[0, total weight)`; `None` without a weighted backend.
pub fn pick(backends: &[Backend], draw: u64) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut x = draw % total;
    backends.iter().find(|b| {
        let w = u64::from(b.weight);
        if x < w {
            true
        } else {
            x -= w;
            false
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_parsed_once_at_compile() {
        let t = |request: Option<&str>, backend: Option<&str>| HTTPRouteTimeouts {
            request: request.map(str::to_string),
            backend_request: backend.map(str::to_string),
        };
        let s = Duration::from_secs;
        let cases = [
            (None, Timeouts::default()),
            (
                Some(t(Some("2s"), Some("500ms"))),
                Timeouts {
                    request: Some(s(2)),
                    backend_request: Some(Duration::from_millis(500)),
                },
            ),
            (
                Some(t(Some("soon"), Some("1m"))),
                Timeouts {
                    request: None,
                    backend_request: Some(s(60)),
                },
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(Timeouts::compile(spec.as_ref()), want, "{spec:?}");
        }
    }

    fn table() -> Table {
        let mut t = Table::default();
        let web: HTTPRouteSpec = serde_json::from_str(
            r#"{"parentRefs": [{"kind": "Service", "name": "web"}], "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": [{"name": "web", "port": 80, "weight": 90}, {"name": "web-canary", "port": 80, "weight": 10}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}], "backendRefs": [{"name": "api", "port": 80}]},
                {"matches": [{"path": {"type": "Exact", "value": "/api/health"}}], "backendRefs": [{"name": "health", "port": 80}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"name": "x-canary", "value": "always"}]}], "backendRefs": [{"name": "api-canary", "port": 80}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "method": "DELETE"}], "backendRefs": [{"name": "api-admin", "port": 80}]},
                {"matches": [{"path": {"type": "RegularExpression", "value": "/v[0-9]+/items"}, "queryParams": [{"name": "debug", "value": "1"}]}], "backendRefs": [{"name": "debug", "port": 80}]}
            ]}"#,
        )
        .unwrap();
        t.add_http("shop", "web", &web).unwrap();
        let grpc: GRPCRouteSpec = serde_json::from_str(
            r#"{"rules": [
                {"matches": [{"method": {"service": "shop.Catalog", "method": "List"}}], "backendRefs": [{"name": "catalog-list", "port": 9090}]},
                {"matches": [{"method": {"type": "RegularExpression", "service": "shop\\.Cat.*"}}], "backendRefs": [{"name": "catalog", "port": 9090}]}
            ]}"#,
        )
        .unwrap();
        t.add_grpc("shop", "catalog", &grpc).unwrap();
        t
    }

    /// (method, path?query, headers, the first backend of the chosen rule)
    type Case = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        Option<&'static str>,
    );

    #[test]
    fn selection_table() {
        let t = table();
        let cases: &[Case] = &[
            ("GET", "/", &[], Some("shop/web")),
            ("GET", "/index.html", &[], Some("shop/web")),
            ("GET", "/api", &[], Some("shop/api")),
            ("GET", "/api/users", &[], Some("shop/api")),
            ("GET", "/apix", &[], Some("shop/web")),
            ("GET", "/api/health", &[], Some("shop/health")),
            (
                "GET",
                "/api/users",
                &[("x-canary", "always")],
                Some("shop/api-canary"),
            ),
            (
                "GET",
                "/api/users",
                &[("x-canary", "never")],
                Some("shop/api"),
            ),
            ("DELETE", "/api/users", &[], Some("shop/api-admin")),
            ("GET", "/v2/items?debug=1", &[], Some("shop/debug")),
            ("GET", "/v2/items?debug=0", &[], Some("shop/web")),
            ("GET", "/v2/items/x?debug=1", &[], Some("shop/web")),
            ("POST", "/shop.Catalog/List", &[], Some("shop/catalog-list")),
            ("POST", "/shop.Catalog/Get", &[], Some("shop/catalog")),
        ];
        for (method, target, headers, want) in cases {
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (*target, None),
            };
            let mut h = http::HeaderMap::new();
            for (k, v) in *headers {
                h.insert(http::HeaderName::from_static(k), v.parse().unwrap());
            }
            let got = t.select(&Request {
                method,
                path,
                query,
                headers: &h,
            });
            assert_eq!(
                got.map(|(r, _)| r.backends[0].service.as_str()),
                *want,
                "{method} {target} {headers:?}"
            );
        }
    }

    #[test]
    fn weighted_split_over_10000_draws_is_within_2_percent() {
        let t = table();
        let h = http::HeaderMap::new();
        let rule = t
            .select(&Request {
                method: "GET",
                path: "/",
                query: None,
                headers: &h,
            })
            .unwrap()
            .0;
        // A fixed xorshift sequence: deterministic, uniform enough.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut canary = 0;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if pick(&rule.backends, x).unwrap().service == "shop/web-canary" {
                canary += 1;
            }
        }
        assert!(
            (800..=1200).contains(&canary),
            "canary got {canary} of 10000 (want 10% +-2%)"
        );
        assert_eq!(pick(&[], 7), None);
        let zero = [Backend {
            service: "a".into(),
            port: 1,
            weight: 0,
        }];
        assert_eq!(pick(&zero, 7), None);
    }

    #[test]
    fn bad_routes_name_the_field() {
        let spec: HTTPRouteSpec = serde_json::from_str(
            r#"{"rules": [{"matches": [{"headers": [{"type": "RegularExpression", "name": "x", "value": "("}]}]}]}"#,
        )
        .unwrap();
        let e = Table::default().add_http("shop", "bad", &spec).unwrap_err();
        assert_eq!(
            (e.route.as_str(), e.field.as_str()),
            ("shop/bad", "rules[0].matches[0].headers[0].value")
        );
    }
}
