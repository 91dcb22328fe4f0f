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
//! Once drained, the old one reports on the same line how many connections it had open and how
//! many it cut at its deadline; the new one shows that in `mesh_upgrade_*` ([`UpgradeStats`]).
//! Generations that predate a message simply do not send or read it: the line stays compatible
//! both ways, so a rollback is an upgrade like any other.
use std::{
    io::{self, BufRead, BufReader, Write},
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
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
/// The file in the state directory that counts the node's proxy generations.
const GENERATION_FILE: &str = "generation";
/// How long a new generation listens for the previous one's drain report.
const REPORT_DEADLINE: Duration = Duration::from_secs(3600);

/// Upgrades as this generation saw them: `/v1/counters` `upgrade`, `mesh_upgrade_*`.
#[derive(Debug, Default, Serialize)]
pub struct UpgradeStats {
    /// This process's generation on the node: the state directory's count of starts.
    pub generation: AtomicU64,
    /// Listening sockets taken over from the previous generation (0: it started alone).
    pub listeners_taken: AtomicU64,
    /// The previous generation's report, once it drained: connections it had open when it
    /// began draining, and those it cut at its deadline.
    pub previous_reported: AtomicU64,
    pub previous_open: AtomicU64,
    pub previous_cut: AtomicU64,
}

/// What a generation that drained tells the one that took over.
#[derive(Debug, Serialize, Deserialize)]
pub struct DrainReport {
    pub open: u64,
    pub cut: u64,
}

/// Counts this start in `<state-dir>/generation` and returns its number. A state directory that
/// cannot be written does not stop the proxy: the generation is then shown as 0.
pub fn next_generation(state_dir: &Path) -> u64 {
    let path = state_dir.join(GENERATION_FILE);
    let previous = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let next = previous + 1;
    let tmp = state_dir.join(format!("{GENERATION_FILE}.tmp"));
    match std::fs::write(&tmp, format!("{next}\n")).and_then(|()| std::fs::rename(&tmp, &path)) {
        Ok(()) => next,
        Err(e) => {
            warn!(error = %e, path = %path.display(), "cannot count proxy generations");
            0
        }
    }
}

/// How long a running generation waits for the new one to serve after handing over.
const SERVE_DEADLINE: Duration = Duration::from_secs(120);

/// Listeners taken from the generation that ran before, and the line back to it.
pub struct Taken {
    listeners: Vec<(Role, SocketAddr, std::net::TcpListener)>,
    /// How many came (`listeners` empties as they are taken).
    handed: usize,
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

    /// How many listeners the previous generation handed over.
    pub fn handed(&self) -> usize {
        self.handed
    }

    /// Tells the old generation this one serves: it stops accepting and drains. Its drain report
    /// goes into `stats` when it comes.
    pub fn serving(mut self, stats: Arc<UpgradeStats>) {
        if let Err(e) = self.line.write_all(SERVING) {
            // It stopped waiting (`SERVE_DEADLINE`): both serve until it is stopped (SIGTERM
            // drains it; in Kubernetes, once this pod is Ready the rollout stops the old one).
            warn!(error = %e, "cannot tell the previous generation to drain: it serves on beside this one until stopped");
            return;
        }
        // A thread, not a task: a blocking read that lasts as long as the old one drains.
        let line = self.line;
        let spawned = std::thread::Builder::new()
            .name("handover-report".into())
            .spawn(move || {
                let _ = line.set_read_timeout(Some(REPORT_DEADLINE));
                let mut text = String::new();
                if BufReader::new(&line).read_line(&mut text).is_err() {
                    return;
                }
                // An older generation ends the line without a report.
                if let Ok(r) = serde_json::from_str::<DrainReport>(text.trim()) {
                    info!(
                        open = r.open,
                        cut = r.cut,
                        "the previous generation drained"
                    );
                    stats.previous_open.store(r.open, Relaxed);
                    stats.previous_cut.store(r.cut, Relaxed);
                    stats.previous_reported.store(1, Relaxed);
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot wait for the previous generation's drain report");
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
    Ok(Some(Taken {
        handed: listeners.len(),
        listeners,
        line,
    }))
}

/// Binds the hand-over socket (root only), to replace a previous generation's once published.
pub fn bind(state_dir: &Path) -> io::Result<PendingSocket> {
    sys::bind_root_socket(state_dir, SOCKET)
}

/// Hands this generation's listeners to the next one. Resolves once a new generation took them
/// and serves, with the line to it (for [`report`]): the caller then stops accepting and drains.
/// The descriptors are this generation's own copies, so they stay valid whatever its accept
/// loops do meanwhile.
pub async fn offer(
    listener: UnixListener,
    listeners: Vec<(Role, SocketAddr, OwnedFd)>,
) -> UnixStream {
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
        let handed = tokio::task::spawn_blocking(move || -> io::Result<Option<UnixStream>> {
            stream.set_nonblocking(false)?;
            let body = serde_json::to_vec(&entries).map_err(io::Error::other)?;
            sys::send_with_fds(&stream, &body, &fds)?;
            stream.set_read_timeout(Some(SERVE_DEADLINE))?;
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line)?;
            Ok((line.as_bytes() == SERVING).then_some(stream))
        })
        .await;
        match handed {
            Ok(Ok(Some(line))) => {
                info!("the next generation serves: draining");
                return line;
            }
            Ok(Ok(None)) => warn!("the next generation went away before serving: serving on"),
            Ok(Err(e)) => warn!(error = %e, "hand-over failed: serving on"),
            Err(e) => warn!(error = %e, "hand-over task failed: serving on"),
        }
    }
}

/// Tells the generation that took over how this one's drain went (it may have gone: then
/// nobody hears it).
pub fn report(mut line: &UnixStream, r: &DrainReport) {
    let mut text = serde_json::to_vec(r).expect("plain numbers");
    text.push(b'\n');
    if let Err(e) = line.write_all(&text) {
        info!(error = %e, "the next generation did not take the drain report");
    }
}

/// A listener's address and a descriptor of it of its own, for [`offer`].
pub fn entry(role: Role, l: &TcpListener) -> io::Result<(Role, SocketAddr, OwnedFd)> {
    Ok((role, l.local_addr()?, l.as_fd().try_clone_to_owned()?))
}
