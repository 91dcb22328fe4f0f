//! `status`, `history`, `rollback` and `explain`: ask a running controller's admin endpoint and
//! print the answer for humans (or as JSON).
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(
        "cannot reach the controller's admin endpoint at {addr} (is mesh-ctrl serve running there? see --admin)"
    )]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the controller answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("unreadable answer from the controller: {0}")]
    Protocol(String),
}

/// One HTTP/1.0 exchange with the admin endpoint (loopback, tiny JSON bodies).
pub fn call(addr: SocketAddr, method: &str, path: &str) -> Result<Value, RemoteError> {
    let connect = |source| RemoteError::Connect { addr, source };
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(connect)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(connect)?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
    )
    .map_err(connect)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(connect)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| RemoteError::Protocol("no header end".into()))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RemoteError::Protocol(head.lines().next().unwrap_or("").into()))?;
    let value: Value =
        serde_json::from_str(body).map_err(|e| RemoteError::Protocol(e.to_string()))?;
    if status != 200 {
        return Err(RemoteError::Status {
            status,
            message: value["error"].as_str().unwrap_or(body).to_string(),
        });
    }
    Ok(value)
}

/// Percent-encodes a query value.
pub fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn human_status(v: &Value) -> String {
    let mut out = format!(
        "version {} ({} resources)\n\nNODE\tCONNECTED\tSENT\tACKED\tREJECTED\n",
        v["version"], v["resources"]
    );
    for (name, n) in v["nodes"].as_object().into_iter().flatten() {
        let nacked = match n["nacked"].as_array() {
            Some(a) => format!("v{}: {}", a[0], a[1].as_str().unwrap_or("")),
            None => "-".into(),
        };
        out.push_str(&format!(
            "{name}\t{}\t{}\t{}\t{nacked}\n",
            n["connected"], n["sent_version"], n["acked_version"]
        ));
    }
    let rejected = v["rejected"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!("\nrejected objects: {}\n", rejected.len()));
    for r in rejected {
        out.push_str(&format!(
            "  {}: {}: {}\n",
            r["object"].as_str().unwrap_or(""),
            r["field"].as_str().unwrap_or(""),
            r["reason"].as_str().unwrap_or("")
        ));
    }
    let expiring = v["certificates_expiring"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    out.push_str(&format!(
        "certificates close to expiry: {}\n",
        expiring.len()
    ));
    for c in expiring {
        out.push_str(&format!(
            "  {} on {}: {} s left\n",
            c["identity"].as_str().unwrap_or(""),
            c["node"].as_str().unwrap_or(""),
            c["expires_in_seconds"]
        ));
    }
    out
}

pub fn human_history(v: &Value) -> String {
    let mut out = String::from("VERSION\tAT (unix)\tCHANGES\n");
    for h in v.as_array().into_iter().flatten() {
        let changes: Vec<&str> = h["changes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        out.push_str(&format!(
            "{}\t{}\t{}\n",
            h["version"],
            h["at"],
            changes.join(", ")
        ));
    }
    out
}

pub fn human_explain(v: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let src = &v["source"];
    let mut out = format!(
        "{}\n\nsource: {} on node {} ({})\n  redirected: {} ({})\n",
        s(&v["verdict"]),
        s(&src["pod"]),
        s(&src["node"]),
        s(&src["identity"]),
        src["redirected"],
        s(&src["because"])
    );
    out.push_str(&format!("destination: {}\n", v["destination"]));
    for r in v["routes"].as_array().into_iter().flatten() {
        out.push_str(&format!("route: {}\n", s(r)));
    }
    for b in v["backends"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "backend: {} weight {} endpoints {}\n",
            s(&b["service"]),
            b["weight"],
            b["endpoints"]
        ));
    }
    if let Some(t) = v["traffic_policy"].as_str() {
        out.push_str(&format!("traffic policy: {t}\n"));
    }
    for i in v["inbound"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "inbound at {} ({}): {}\n",
            s(&i["pod"]),
            s(&i["mode"]),
            s(&i["authorization"])
        ));
    }
    out
}
