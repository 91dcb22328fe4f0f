//! Gateway API filters as pure functions over request and response heads: header modifiers, URL
//! rewrites and redirects. (Mirroring needs the body and lives in `outbound`.)
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, uri::PathAndQuery};
use mesh_api::gateway::{HeaderModifier, PathModifier, RequestRedirect, UrlRewrite};

/// `set` replaces, `add` appends, `remove` deletes. Names and values the controller validated;
/// anything that still does not parse is skipped rather than failing the request.
pub fn modify_headers(h: &mut HeaderMap, m: &HeaderModifier) {
    let parse = |n: &str, v: &str| {
        Some((
            HeaderName::from_bytes(n.as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        ))
    };
    for s in &m.set {
        if let Some((n, v)) = parse(&s.name, &s.value) {
            h.insert(n, v);
        }
    }
    for a in &m.add {
        if let Some((n, v)) = parse(&a.name, &a.value) {
            h.append(n, v);
        }
    }
    for r in &m.remove {
        if let Ok(n) = HeaderName::from_bytes(r.as_bytes()) {
            h.remove(n);
        }
    }
}

/// The new path for a path modifier; `prefix` is the `PathPrefix` the rule matched (if any).
fn new_path(path: &str, m: &PathModifier, prefix: Option<&str>) -> String {
    match m.type_.as_str() {
        "ReplaceFullPath" => m.replace_full_path.clone().unwrap_or_else(|| "/".into()),
        "ReplacePrefixMatch" => {
            let with = m.replace_prefix_match.as_deref().unwrap_or("/");
            let rest = prefix.and_then(|p| path.strip_prefix(p)).unwrap_or(path);
            let joined = match (with.ends_with('/'), rest.starts_with('/')) {
                (true, true) => format!("{}{}", with, &rest[1..]),
                (false, false) if !rest.is_empty() => format!("{with}/{rest}"),
                _ => format!("{with}{rest}"),
            };
            if joined.is_empty() {
                "/".into()
            } else {
                joined
            }
        }
        _ => path.to_string(),
    }
}

fn with_path(uri: &Uri, path: &str) -> Uri {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = PathAndQuery::try_from(pq).ok().or(parts.path_and_query);
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// Applies a URL rewrite: the new URI, and the new host if it changes.
pub fn rewrite(uri: &Uri, rw: &UrlRewrite, prefix: Option<&str>) -> (Uri, Option<String>) {
    let uri = match &rw.path {
        Some(m) => with_path(uri, &new_path(uri.path(), m, prefix)),
        None => uri.clone(),
    };
    (uri, rw.hostname.clone())
}

/// The `Location` and status of a redirect. `host` is the request's host (without port).
pub fn redirect(
    uri: &Uri,
    host: &str,
    r: &RequestRedirect,
    prefix: Option<&str>,
) -> (StatusCode, String) {
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let host = r.hostname.as_deref().unwrap_or(host);
    let path = r.path.as_ref().map_or_else(
        || uri.path().to_string(),
        |m| new_path(uri.path(), m, prefix),
    );
    let port = match (r.port, scheme) {
        (Some(80), "http") | (Some(443), "https") | (None, _) => String::new(),
        (Some(p), _) => format!(":{p}"),
    };
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let status = r
        .status_code
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::FOUND);
    (status, format!("{scheme}://{host}{port}{path}{query}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::gateway::HeaderValue as Hv;

    fn pm(t: &str, v: &str) -> PathModifier {
        PathModifier {
            type_: t.into(),
            replace_full_path: (t == "ReplaceFullPath").then(|| v.into()),
            replace_prefix_match: (t == "ReplacePrefixMatch").then(|| v.into()),
        }
    }

    #[test]
    fn headers() {
        let mut h = HeaderMap::new();
        h.insert("x-a", "1".parse().unwrap());
        h.insert("x-drop", "1".parse().unwrap());
        modify_headers(
            &mut h,
            &HeaderModifier {
                set: vec![Hv {
                    name: "x-a".into(),
                    value: "2".into(),
                }],
                add: vec![
                    Hv {
                        name: "x-b".into(),
                        value: "1".into(),
                    },
                    Hv {
                        name: "x-b".into(),
                        value: "2".into(),
                    },
                ],
                remove: vec!["x-drop".into()],
            },
        );
        assert_eq!(h["x-a"], "2");
        assert_eq!(h.get_all("x-b").iter().count(), 2);
        assert!(!h.contains_key("x-drop"));
    }

    #[test]
    fn rewrites() {
        let cases = [
            (
                "/api/users?x=1",
                pm("ReplacePrefixMatch", "/v2"),
                Some("/api"),
                "/v2/users?x=1",
            ),
            ("/api", pm("ReplacePrefixMatch", "/v2"), Some("/api"), "/v2"),
            (
                "/api/users",
                pm("ReplacePrefixMatch", "/"),
                Some("/api"),
                "/users",
            ),
            (
                "/api/users",
                pm("ReplacePrefixMatch", "/v2/"),
                Some("/api"),
                "/v2/users",
            ),
            ("/a/b", pm("ReplaceFullPath", "/fixed"), None, "/fixed"),
            ("/api", pm("ReplacePrefixMatch", "/"), Some("/api"), "/"),
        ];
        for (from, m, prefix, want) in cases {
            let uri: Uri = from.parse().unwrap();
            let (got, host) = rewrite(
                &uri,
                &UrlRewrite {
                    hostname: None,
                    path: Some(m),
                },
                prefix,
            );
            assert_eq!(got.to_string(), want, "{from}");
            assert_eq!(host, None);
        }
    }

    #[test]
    fn redirects() {
        let uri: Uri = "/old/page?q=1".parse().unwrap();
        let (status, loc) = redirect(
            &uri,
            "web.shop",
            &RequestRedirect {
                scheme: Some("https".into()),
                hostname: None,
                path: Some(pm("ReplacePrefixMatch", "/new")),
                port: Some(8443),
                status_code: Some(301),
            },
            Some("/old"),
        );
        assert_eq!(status, StatusCode::MOVED_PERMANENTLY);
        assert_eq!(loc, "https://web.shop:8443/new/page?q=1");
        let (status, loc) = redirect(&uri, "web", &RequestRedirect::default(), None);
        assert_eq!(
            (status, loc.as_str()),
            (StatusCode::FOUND, "http://web/old/page?q=1")
        );
    }
}
