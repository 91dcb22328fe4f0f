//! Protocol detection on ports whose protocol is not declared: the HTTP/2 connection preface or an
//! HTTP/1.x request line means HTTP; anything else, or silence until the detection timeout (a
//! server-first protocol), means opaque TCP. Bytes are peeked, never consumed.
//!
//! The timeout is short so server-first protocols are not held up, which would take a client
//! that is slow to send its first request (a pool's connection opened ahead of use, a loaded
//! machine) for TCP: no routing, no per-request policy, and a DENY rule on paths refusing the
//! whole connection. So a port where HTTP was seen is remembered ([`Seen`]): its later clients
//! may take as long as on a declared port.
use mesh_api::sync::LockExt;
use std::{collections::HashSet, sync::Mutex, time::Duration};

use tokio::net::TcpStream;

use super::Protocol;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    /// Other bytes, or none before the timeout.
    Opaque,
    /// The client closed (or failed) before sending anything: nothing was learned.
    Closed,
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// What the first bytes say; `None` while they could still be either.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if buf.starts_with(PREFACE) {
        return Some(Detected::Http2);
    }
    if METHODS.iter().any(|m| buf.starts_with(m)) {
        return Some(Detected::Http1);
    }
    let undecided = PREFACE.starts_with(buf) || METHODS.iter().any(|m| m.starts_with(buf));
    (!undecided).then_some(Detected::Opaque)
}

/// Peeks at the client's first bytes for at most `timeout`.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Detected {
    let mut buf = [0u8; PREFACE.len()];
    let peek = async {
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return Detected::Closed,
                Ok(n) => {
                    if let Some(d) = classify(&buf[..n]) {
                        return d;
                    }
                }
            }
            // A partial first segment: the rest is on its way.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(timeout, peek)
        .await
        .unwrap_or(Detected::Opaque)
}

/// Whether a connection to `port` is relayed as opaque TCP at once, with no detection: its
/// protocol is declared `tcp`, or undeclared and the port is one of `opaque_ports`.
pub fn relayed_as_tcp(declared: Option<Protocol>, port: u16, opaque_ports: &[u16]) -> bool {
    match declared {
        Some(p) => p == Protocol::Tcp,
        None => opaque_ports.contains(&port),
    }
}

/// Remembered destination ports at most; when full, all are forgotten (each then costs one more
/// short detection).
const MAX_SEEN: usize = 4096;

/// Undeclared destination ports (a Service's, or a pod's: `key` and port) where HTTP was seen.
#[derive(Debug, Default)]
pub struct Seen {
    http: Mutex<HashSet<(String, u16)>>,
}

impl Seen {
    /// How long a new connection to `dest` may stay silent before it is taken for TCP.
    pub fn wait(&self, dest: &(String, u16), short: Duration, long: Duration) -> Duration {
        if self.http.locked().contains(dest) {
            long
        } else {
            short
        }
    }

    /// Records what detection found on `dest`: HTTP is remembered; other bytes or a silent
    /// client (the port now serves another protocol) forget it.
    pub fn record(&self, dest: (String, u16), d: Detected) {
        let mut http = self.http.locked();
        match d {
            Detected::Closed => return,
            Detected::Opaque => {
                http.remove(&dest);
                return;
            }
            Detected::Http1 | Detected::Http2 => {}
        }
        if http.len() >= MAX_SEEN && !http.contains(&dest) {
            http.clear();
        }
        http.insert(dest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_protocols_win_over_the_opaque_ports() {
        let ports = [6379];
        for (declared, port, want) in [
            (Some(Protocol::Tcp), 80, true),
            (Some(Protocol::Http1), 6379, false),
            (None, 6379, true),
            (None, 80, false),
        ] {
            assert_eq!(
                relayed_as_tcp(declared, port, &ports),
                want,
                "{declared:?} {port}"
            );
        }
    }

    #[test]
    fn a_port_seen_speaking_http_waits_longer_until_it_does_not() {
        let seen = Seen::default();
        let (short, long) = (Duration::from_millis(100), Duration::from_secs(10));
        let web = ("pod/ns/web".to_string(), 8080);
        let db = ("pod/ns/db".to_string(), 8080);
        assert_eq!(seen.wait(&web, short, long), short, "not seen yet");
        seen.record(web.clone(), Detected::Http1);
        assert_eq!(seen.wait(&web, short, long), long);
        assert_eq!(seen.wait(&db, short, long), short, "per destination");
        seen.record(web.clone(), Detected::Http2);
        assert_eq!(seen.wait(&web, short, long), long);
        seen.record(web.clone(), Detected::Closed);
        assert_eq!(
            seen.wait(&web, short, long),
            long,
            "a client that left says nothing"
        );
        seen.record(web.clone(), Detected::Opaque);
        assert_eq!(seen.wait(&web, short, long), short, "forgotten");
        for port in 1..=MAX_SEEN as u16 {
            seen.record(("svc/x".into(), port), Detected::Http1);
        }
        seen.record(db.clone(), Detected::Http1);
        assert_eq!(seen.http.lock().unwrap().len(), 1, "bounded");
        assert_eq!(seen.wait(&db, short, long), long);
    }

    #[test]
    fn table() {
        let cases: &[(&[u8], Option<Detected>)] = &[
            (b"", None),
            (b"G", None),
            (b"GET / HTTP/1.1\r\n", Some(Detected::Http1)),
            (b"POST /x HTTP/1.1\r\n", Some(Detected::Http1)),
            (b"P", None),
            (b"PRI * HTTP/2.0\r\n", None),
            (PREFACE, Some(Detected::Http2)),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00",
                Some(Detected::Http2),
            ),
            (b"\x16\x03\x01\x02\x00", Some(Detected::Opaque)),
            (b"SSH-2.0-OpenSSH", Some(Detected::Opaque)),
            (b"GETX", Some(Detected::Opaque)),
            (b"get / HTTP/1.1", Some(Detected::Opaque)),
        ];
        for (buf, want) in cases {
            assert_eq!(classify(buf), *want, "{:?}", String::from_utf8_lossy(buf));
        }
    }
}
