//! Graceful shutdown: stop accepting, let open connections finish until a deadline, then cut them.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Owned by the app; hands out [`Watch`]es to listeners and connections.
#[derive(Clone, Default)]
pub struct Drain {
    /// Set with `stop_accepting`: read on every HTTP/1.1 answer, where the token's check would
    /// lock the mutex every connection shares.
    stopping: Arc<AtomicBool>,
    stop_accepting: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
}

/// What a listener or connection task holds to learn about shutdown.
#[derive(Clone)]
pub struct Watch {
    stopping: Arc<AtomicBool>,
    stop_accepting: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every connection finished within the deadline.
    Graceful,
    /// The deadline passed; this many connections were cut.
    Forced(usize),
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn watch(&self) -> Watch {
        Watch {
            stopping: self.stopping.clone(),
            stop_accepting: self.stop_accepting.clone(),
            force: self.force.clone(),
            tracker: self.tracker.clone(),
        }
    }

    /// Connections still open.
    pub fn active(&self) -> usize {
        self.tracker.len()
    }

    pub async fn drain(self, deadline: Duration) -> DrainOutcome {
        self.stopping.store(true, Relaxed);
        self.stop_accepting.cancel();
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
        {
            return DrainOutcome::Graceful;
        }
        let cut = self.tracker.len();
        self.force.cancel();
        // Cut tasks end at their next poll; give them a moment to close their sockets.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tracker.wait()).await;
        DrainOutcome::Forced(cut)
    }
}

impl Watch {
    /// Resolves when listeners must stop accepting. Connections use it too, to end at their next
    /// boundary (an HTTP/1.1 answer, an idle carried stream, a GOAWAY to a peer proxy) so that
    /// what comes next goes to the generation that took over.
    pub async fn stopped(&self) {
        self.stop_accepting.cancelled().await
    }

    /// Whether this generation drains (see [`Self::stopped`]).
    pub fn is_stopped(&self) -> bool {
        self.stopping.load(Relaxed)
    }

    /// A watch of one connection's own. Waits on it (a carried stream's, between each of its
    /// requests) take the lock of the connection's node of the cancellation tree, not the one
    /// every connection of the proxy shares.
    pub fn for_connection(&self) -> Watch {
        Watch {
            stopping: self.stopping.clone(),
            stop_accepting: self.stop_accepting.child_token(),
            force: self.force.clone(),
            tracker: self.tracker.clone(),
        }
    }

    /// Runs a connection task, cut short when the drain deadline passes.
    pub fn spawn_conn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let force = self.force.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = fut => {}
                _ = force.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finished_connections_drain_gracefully() {
        let d = Drain::new();
        let w = d.watch();
        w.spawn_conn(async { tokio::time::sleep(Duration::from_millis(20)).await });
        assert_eq!(
            d.drain(Duration::from_secs(5)).await,
            DrainOutcome::Graceful
        );
    }

    #[tokio::test]
    async fn a_connection_watch_learns_of_the_drain_like_the_listeners() {
        let d = Drain::new();
        let (w, conn) = (d.watch(), d.watch().for_connection());
        assert!(!w.is_stopped() && !conn.is_stopped());
        let stopped = tokio::spawn(async move { conn.stopped().await });
        d.drain(Duration::from_secs(1)).await;
        assert!(w.is_stopped());
        tokio::time::timeout(Duration::from_secs(1), stopped)
            .await
            .expect("the connection's watch saw the drain")
            .unwrap();
    }

    #[tokio::test]
    async fn stuck_connections_are_cut_at_the_deadline() {
        let d = Drain::new();
        let w = d.watch();
        w.spawn_conn(std::future::pending());
        w.spawn_conn(std::future::pending());
        let stopped = w.clone();
        let t = tokio::spawn(async move { stopped.stopped().await });
        assert_eq!(
            d.drain(Duration::from_millis(50)).await,
            DrainOutcome::Forced(2)
        );
        t.await.unwrap();
    }
}
