//! Protocol detection on ports whose protocol is not declared: the HTTP/2 connection preface or an
//! HTTP/1.x request line means HTTP; anything else, or silence until the detection timeout (a
//! server-first protocol), means opaque TCP. Bytes are peeked, never consumed.
use std::time::Duration;

use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Opaque,
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
                Ok(0) | Err(_) => return Detected::Opaque,
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

#[cfg(test)]
mod tests {
    use super::*;

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
