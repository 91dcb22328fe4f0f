//! What a request must look like before routing or policy judges it, on both nodes.
//!
//! Routing and authorization compare request paths, and the pod decides what a path names. If the
//! two disagree on the string (`/%61dmin`, `//admin`, `/public/../admin` are `/admin` to Go's
//! `net/http`, nginx or Python), a DENY on `/admin` or an ALLOW on `/public/*` can be walked
//! around. So the path is normalized as RFC 3986 section 6 says, once, before either looks at it,
//! and the normalized path is what the pod receives: policy and app judge the same string.
//!
//! - percent-encoded unreserved characters are decoded (`%61` is `a`), other escapes keep their
//!   meaning with upper-case hex;
//! - repeated slashes are merged; `.` and `..` segments are removed (also `..;x`, which some
//!   servlet containers read as `..`), never above the root;
//! - an encoded `/` or `\` (`%2F`, `%5C`) is refused by default: whether it separates segments
//!   is up to the server, so no rule could be sure what it names (`--path-escaped-slashes keep`
//!   forwards it as it is, `decode` turns it into `/`);
//! - a literal `\`, a NUL or a control byte, or a `%` not followed by two hex digits, is refused.
//!
//! A refused request gets `400` with the flag `DPE`. Requests that ask to switch to `h2c`, and
//! `CONNECT`s, are refused too: after them the connection is opaque to per-request policy.
use std::borrow::Cow;

use http::{HeaderValue, Request, Uri, uri::PathAndQuery};

use super::respond::ProxyError;
use crate::config::EscapedSlashes;

/// Why a path cannot be normalized.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with /")]
    NotAbsolute,
    #[error("a % not followed by two hex digits")]
    BadEscape,
    #[error("an encoded / or \\ (%2F, %5C), refused by this mesh")]
    EscapedSlash,
    #[error("a NUL, control or non-ASCII byte")]
    BadByte,
    #[error("a backslash")]
    Backslash,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// A `.` or `..` segment, also with path parameters (`..;x`).
fn dots(segment: &str) -> Option<bool> {
    match segment.split(';').next().unwrap_or("") {
        "." => Some(false),
        ".." => Some(true),
        _ => None,
    }
}

/// Nearly every path is already normal: no escape, no byte to refuse, no empty or dot segment
/// (a trailing slash aside). Checked without allocating, twice per request.
fn already_normal(path: &str) -> bool {
    if !path
        .bytes()
        .all(|b| b > 0x20 && b < 0x7f && b != b'%' && b != b'\\')
    {
        return false;
    }
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if dots(seg).is_some() || (seg.is_empty() && !last) {
            return false;
        }
    }
    true
}

/// The normalized form of `path` (borrowed when it already is).
pub fn normalize(path: &str, slashes: EscapedSlashes) -> Result<Cow<'_, str>, PathError> {
    if path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if already_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    rebuild(path, slashes).map(|p| {
        if p == path {
            Cow::Borrowed(path)
        } else {
            Cow::Owned(p)
        }
    })
}

/// The full normalization of an absolute path.
fn rebuild(path: &str, slashes: EscapedSlashes) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let v = hi << 4 | lo;
                match v {
                    0 => return Err(PathError::BadByte),
                    b'/' | b'\\' => match slashes {
                        EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                        EscapedSlashes::Keep => {
                            decoded.push_str(if v == b'/' { "%2F" } else { "%5C" })
                        }
                        EscapedSlashes::Decode => decoded.push('/'),
                    },
                    v if unreserved(v) => decoded.push(v as char),
                    v => {
                        const HEX: &[u8; 16] = b"0123456789ABCDEF";
                        decoded.push('%');
                        decoded.push(HEX[(v >> 4) as usize] as char);
                        decoded.push(HEX[(v & 15) as usize] as char);
                    }
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            b if b <= 0x20 || b >= 0x7f => return Err(PathError::BadByte),
            b => {
                decoded.push(b as char);
                i += 1;
            }
        }
    }
    // Segments, merging repeated slashes and resolving dot segments.
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for segment in decoded.split('/').skip(1) {
        trailing = false;
        match dots(segment) {
            Some(up) => {
                if up {
                    out.pop();
                }
                trailing = true;
            }
            None if segment.is_empty() => trailing = true,
            None => out.push(segment),
        }
    }
    let mut normalized = String::with_capacity(decoded.len());
    for s in &out {
        normalized.push('/');
        normalized.push_str(s);
    }
    if trailing || out.is_empty() {
        normalized.push('/');
    }
    Ok(normalized)
}

/// Normalizes `req`'s path in place (the query is kept as it is) and refuses what cannot be
/// judged: a path that cannot be normalized, an `h2c` upgrade.
pub fn request<B>(req: &mut Request<B>, slashes: EscapedSlashes) -> Result<(), ProxyError> {
    if asks_h2c(req) {
        return Err(ProxyError::BadRequest(
            "an upgrade to h2c is refused: the connection would be opaque to per-request policy"
                .into(),
        ));
    }
    // After a CONNECT the pod reads the connection as a tunnel while the relay would go on
    // reading requests from it: what policy judged would not be what the pod does (found by
    // fuzzing, against hyper).
    if req.method() == http::Method::CONNECT {
        return Err(ProxyError::BadRequest(
            "CONNECT is refused: the connection would be opaque to per-request policy".into(),
        ));
    }
    let uri = req.uri();
    let path = uri.path();
    let normalized = match normalize(path, slashes) {
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Ok(Cow::Owned(p)) => p,
        Err(e) => return Err(ProxyError::BadRequest(format!("path {path:?}: {e}"))),
    };
    let pq = match uri.query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        PathAndQuery::try_from(pq)
            .map_err(|e| ProxyError::BadRequest(format!("normalized path: {e}")))?,
    );
    *req.uri_mut() =
        Uri::from_parts(parts).map_err(|e| ProxyError::BadRequest(format!("path: {e}")))?;
    Ok(())
}

/// The request asks to switch to `h2c` (on HTTP/1.1, or marked so between the proxies).
fn asks_h2c<B>(req: &Request<B>) -> bool {
    let h2c = |v: &HeaderValue| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"))
    };
    super::upgrade::requested(req.version(), req.headers()).is_some_and(|v| h2c(&v))
        || req
            .headers()
            .get(&super::upgrade::UPGRADE_HEADER)
            .is_some_and(h2c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use EscapedSlashes::*;

    #[test]
    fn the_classic_bypasses_become_the_path_the_server_sees() {
        let cases: &[(&str, Result<&str, PathError>)] = &[
            ("/admin", Ok("/admin")),
            ("/%61dmin", Ok("/admin")),
            ("/%61%64%6D%69%6E", Ok("/admin")),
            ("//admin", Ok("/admin")),
            ("///admin//x", Ok("/admin/x")),
            ("/./admin", Ok("/admin")),
            ("/a/../admin", Ok("/admin")),
            ("/public/../admin", Ok("/admin")),
            ("/%2e%2e/admin", Ok("/admin")),
            ("/%2E/admin", Ok("/admin")),
            ("/public/..;/admin", Ok("/admin")),
            ("/../../admin", Ok("/admin")),
            ("/public/%2e%2e/%2e%2e/admin", Ok("/admin")),
            ("/admin/", Ok("/admin/")),
            ("/admin/.", Ok("/admin/")),
            ("/a/b/..", Ok("/a/")),
            ("/", Ok("/")),
            ("/..", Ok("/")),
            ("*", Ok("*")),
            ("/admin;x", Ok("/admin;x")),
            ("/a%20b", Ok("/a%20b")),
            ("/a%c3%a9", Ok("/a%C3%A9")),
            ("/admin%2F..", Err(PathError::EscapedSlash)),
            ("/admin%2f", Err(PathError::EscapedSlash)),
            ("/admin%5C..", Err(PathError::EscapedSlash)),
            ("/admin%5c", Err(PathError::EscapedSlash)),
            ("/admin%00", Err(PathError::BadByte)),
            ("/admin%", Err(PathError::BadEscape)),
            ("/admin%4", Err(PathError::BadEscape)),
            ("/admin%zz", Err(PathError::BadEscape)),
            ("/admin\\..\\x", Err(PathError::Backslash)),
            ("admin", Err(PathError::NotAbsolute)),
        ];
        for (path, want) in cases {
            let got = normalize(path, Reject);
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, *w, "{path}"),
                (Err(g), Err(w)) => assert_eq!(&g, w, "{path}"),
                (g, w) => panic!("{path}: got {g:?}, want {w:?}"),
            }
        }
    }

    /// The allocation-free check borrows only what the full normalization leaves unchanged.
    #[test]
    fn the_fast_path_agrees_with_the_full_normalization() {
        let paths = [
            "/",
            "/a",
            "/a/b",
            "/a/b/",
            "/a;b",
            "/a.b/c..d/.e",
            "//a",
            "/a//b",
            "/a/",
            "/.",
            "/..",
            "/a/.",
            "/a/..",
            "/a/./b",
            "/%61",
            "/a\\b",
            "/a b",
            "/a/b//",
            "/...",
            "/.a",
        ];
        for p in paths {
            if already_normal(p) {
                assert_eq!(rebuild(p, Reject).as_deref(), Ok(p), "{p}");
            }
        }
        for p in ["/", "/a", "/a/b/", "/a;b", "/...", "/.a", "/a.b/c..d"] {
            assert!(already_normal(p), "{p}");
        }
        for p in ["//a", "/a//b", "/.", "/a/..", "/%61", "/a b", "/a/b//"] {
            assert!(!already_normal(p), "{p}");
        }
    }

    #[test]
    fn encoded_slashes_are_kept_or_decoded_when_the_mesh_says_so() {
        assert_eq!(normalize("/a%2fb", Keep).unwrap(), "/a%2Fb");
        assert_eq!(normalize("/a%5Cb", Keep).unwrap(), "/a%5Cb");
        assert_eq!(normalize("/admin%2F..", Decode).unwrap(), "/");
        assert_eq!(normalize("/x/%2e%2e%2Fadmin", Decode).unwrap(), "/admin");
    }

    #[test]
    fn a_normalized_path_is_borrowed_and_normalizing_twice_changes_nothing() {
        for p in ["/", "/a/b", "/a/b/", "/a%20b", "/a;b"] {
            assert!(matches!(normalize(p, Reject), Ok(Cow::Borrowed(_))), "{p}");
        }
        for p in ["/%61//b/./c/../d", "/x/%2e%2e/y/", "/%7e"] {
            let once = normalize(p, Reject).unwrap().into_owned();
            assert_eq!(normalize(&once, Reject).unwrap(), once, "{p}");
        }
    }

    #[test]
    fn requests_keep_their_query_and_h2c_upgrades_are_refused() {
        let mut req = Request::get("http://web/%61dmin/./x?q=%2F..")
            .body(())
            .unwrap();
        request(&mut req, Reject).unwrap();
        assert_eq!(req.uri().path(), "/admin/x");
        assert_eq!(req.uri().query(), Some("q=%2F.."));
        assert_eq!(req.uri().host(), Some("web"));

        let mut req = Request::get("/x").body(()).unwrap();
        *req.version_mut() = http::Version::HTTP_11;
        req.headers_mut().insert(
            http::header::CONNECTION,
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        req.headers_mut()
            .insert(http::header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(matches!(
            request(&mut req, Reject),
            Err(ProxyError::BadRequest(_))
        ));

        let mut req = Request::get("/x").body(()).unwrap();
        req.headers_mut().insert(
            &crate::http::upgrade::UPGRADE_HEADER,
            HeaderValue::from_static("H2C"),
        );
        assert!(matches!(
            request(&mut req, Reject),
            Err(ProxyError::BadRequest(_))
        ));

        // CONNECT, in origin form too: the pod would read what follows as a tunnel.
        for target in ["/x", "web:443"] {
            let mut req = Request::builder()
                .method(http::Method::CONNECT)
                .uri(target)
                .body(())
                .unwrap();
            assert!(matches!(
                request(&mut req, Reject),
                Err(ProxyError::BadRequest(_))
            ));
        }

        let mut req = Request::get("/x").body(()).unwrap();
        req.headers_mut().insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
        req.headers_mut()
            .insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
        request(&mut req, Reject).unwrap();
    }
}
