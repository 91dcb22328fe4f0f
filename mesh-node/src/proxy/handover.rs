//! Listening sockets pass from one proxy generation to the next, by descriptor.
//!
//! Listeners do not use `SO_REUSEPORT`: with it, any process of the same user on the node (a
//! root hostNetwork pod) could bind the proxy's address and port beside it and take a share of
//! enrolled pods' plaintext. Instead a starting generation asks the running one, over
//! `<state-dir>/handover.sock` (mode 0600, callers checked to be root with `SO_PEERCRED`), for
//! its listening sockets, and receives them with `SCM_RIGHTS`: the same sockets, with the same
//! accept queue, so no connect is ever refused and none lands on a stranger. Once the new
//! generation serves, it says so on the same connection; the old one then stops accepting and
//! drains. If the new one dies first (its end closes without a word), the old one serves on.
use std::{
    io::{self, BufRead, BufReader, Write},
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, UnixListener};
use tracing::{info, warn};

use crate::sys::{self, PendingSocket};

pub const SOCKET: &str = "handover.sock";

/// What a listener is for: the two generations match listeners by role and address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Outbound,
    Tunnel,
    Admin,
    Metrics,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    role: Role,
    addr: SocketAddr,
}

/// What this generation says once it serves.
const SERVING: &[u8] = b"serving\n";
/// How long a running generation waits for the new one to serve after handing over.
const SERVE_DEADLINE: Duration = Duration::from_secs(120);

/// Listeners taken from the generation that ran before, and the line back to it.
pub struct Taken {
    listeners: Vec<(Role, SocketAddr, std::net::TcpListener)>,
    line: UnixStream,
}

impl Taken {
    /// The running generation's listener for `role` at `addr` (port 0 matches any port), if it
    /// has one.
    pub fn take(&mut self, role: Role, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let i = self.listeners.iter().position(|(r, a, _)| {
            *r == role && a.ip() == addr.ip() && (addr.port() == 0 || a.port() == addr.port())
        })?;
        Some(self.listeners.swap_remove(i).2)
    }

    /// Tells the old generation this one serves: it stops accepting and drains.
    pub fn serving(mut self) {
        if let Err(e) = self.line.write_all(SERVING) {
            warn!(error = %e, "cannot tell the previous generation to drain");
        }
    }
}

/// Asks a running generation for its listeners. `None` when none is running (no socket, or
/// nobody listening on it).
pub fn take_over(state_dir: &Path) -> io::Result<Option<Taken>> {
    let path = state_dir.join(SOCKET);
    let line = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    line.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = vec![0u8; 64 * 1024];
    let (n, fds) = sys::recv_with_fds(&line, &mut buf)?;
    if n == 0 {
        // The running generation refused (not root) or is going away.
        return Ok(None);
    }
    let entries: Vec<Entry> = serde_json::from_slice(&buf[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if entries.len() != fds.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} listeners announced, {} received",
                entries.len(),
                fds.len()
            ),
        ));
    }
    let listeners = entries
        .into_iter()
        .zip(fds)
        .map(|(e, fd)| (e.role, e.addr, std::net::TcpListener::from(fd)))
        .collect::<Vec<_>>();
    info!(
        listeners = listeners.len(),
        "took the listening sockets over from the running generation"
    );
    Ok(Some(Taken { listeners, line }))
}

/// Binds the hand-over socket (root only), to replace a previous generation's once published.
pub fn bind(state_dir: &Path) -> io::Result<PendingSocket> {
    sys::bind_root_socket(state_dir, SOCKET)
}

/// Hands this generation's listeners to the next one. Resolves once a new generation took them
/// and serves: the caller then stops accepting and drains. The descriptors are this
/// generation's own copies, so they stay valid whatever its accept loops do meanwhile.
pub async fn offer(listener: UnixListener, listeners: Vec<(Role, SocketAddr, OwnedFd)>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        match stream.peer_cred() {
            Ok(c) if c.uid() == 0 => {}
            other => {
                warn!(peer = ?other.map(|c| c.uid()), "hand-over refused: caller is not root");
                continue;
            }
        }
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let entries: Vec<Entry> = listeners
            .iter()
            .map(|(role, addr, _)| Entry {
                role: *role,
                addr: *addr,
            })
            .collect();
        let fds: Vec<RawFd> = listeners.iter().map(|(_, _, fd)| fd.as_raw_fd()).collect();
        let handed = tokio::task::spawn_blocking(move || -> io::Result<bool> {
            stream.set_nonblocking(false)?;
            let body = serde_json::to_vec(&entries).map_err(io::Error::other)?;
            sys::send_with_fds(&stream, &body, &fds)?;
            stream.set_read_timeout(Some(SERVE_DEADLINE))?;
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line)?;
            Ok(line.as_bytes() == SERVING)
        })
        .await;
        match handed {
            Ok(Ok(true)) => {
                info!("the next generation serves: draining");
                return;
            }
            Ok(Ok(false)) => warn!("the next generation went away before serving: serving on"),
            Ok(Err(e)) => warn!(error = %e, "hand-over failed: serving on"),
            Err(e) => warn!(error = %e, "hand-over task failed: serving on"),
        }
    }
}

/// A listener's address and a descriptor of it of its own, for [`offer`].
pub fn entry(role: Role, l: &TcpListener) -> io::Result<(Role, SocketAddr, OwnedFd)> {
    Ok((role, l.local_addr()?, l.as_fd().try_clone_to_owned()?))
}
