//! Just enough HTTP/1.1 to drive a node's admin API from inside its namespace.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use serde_json::Value;

use crate::sys;

/// One request with `Connection: close`; the response body is parsed as JSON (or kept as a string).
pub async fn request(
    netns: &Path,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    let (netns, method, path, body) = (
        PathBuf::from(netns),
        method.to_string(),
        path.to_string(),
        body.map(String::from),
    );
    tokio::task::spawn_blocking(move || {
        let s = sys::in_netns(&netns, || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })
        .with_context(|| format!("connecting to {addr} in {}", netns.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        exchange(s, &method, &path, body.as_deref())
    })
    .await?
}

/// The same on a Unix socket (the node's root-only admin socket).
pub async fn request_unix(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    let (socket, method, path, body) = (
        PathBuf::from(socket),
        method.to_string(),
        path.to_string(),
        body.map(String::from),
    );
    tokio::task::spawn_blocking(move || {
        let s = std::os::unix::net::UnixStream::connect(&socket)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        exchange(s, &method, &path, body.as_deref())
    })
    .await?
}

fn exchange(
    mut s: impl Read + Write,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    let body = body.unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: mesh-node\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let value = serde_json::from_str(rest).unwrap_or_else(|_| Value::String(rest.to_string()));
    Ok((status, value))
}
