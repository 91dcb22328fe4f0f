//! Graceful shutdown: stop accepting, let open connections finish until a deadline, then cut them.
use std::time::Duration;

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Owned by the app; hands out [`Watch`]es to listeners and connections.
#[derive(Clone, Default)]
pub struct Drain {
    stop_accepting: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
}

/// What a listener or connection task holds to learn about shutdown.
#[derive(Clone)]
pub struct Watch {
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
        self.stop_accepting.is_cancelled()
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
