//! Readiness as a set of named blockers: ready once every registered blocker is released.
use mesh_api::sync::LockExt;
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

#[derive(Clone, Default)]
pub struct Ready(Arc<Inner>);

#[derive(Default)]
struct Inner {
    blockers: Mutex<BTreeSet<&'static str>>,
    released: tokio::sync::Notify,
}

/// Holds readiness back until dropped.
#[must_use = "readiness is released when the blocker is dropped"]
pub struct Blocker {
    ready: Ready,
    name: &'static str,
}

impl Ready {
    pub fn register(&self, name: &'static str) -> Blocker {
        self.0.blockers.locked().insert(name);
        Blocker {
            ready: self.clone(),
            name,
        }
    }

    /// Names still blocking; empty when ready.
    pub fn pending(&self) -> Vec<&'static str> {
        self.0.blockers.locked().iter().copied().collect()
    }

    /// Resolves once every blocker is released.
    pub async fn wait(&self) {
        loop {
            let released = self.0.released.notified();
            if self.0.blockers.locked().is_empty() {
                return;
            }
            released.await;
        }
    }
}

impl Drop for Blocker {
    fn drop(&mut self) {
        self.ready.0.blockers.locked().remove(self.name);
        self.ready.0.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_after_all_blockers_drop() {
        let r = Ready::default();
        let a = r.register("ebpf");
        let b = r.register("listeners");
        let waiting = tokio::spawn({
            let r = r.clone();
            async move { r.wait().await }
        });
        assert_eq!(r.pending(), vec!["ebpf", "listeners"]);
        drop(a);
        assert_eq!(r.pending(), vec!["listeners"]);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "ready with a blocker left");
        drop(b);
        assert!(r.pending().is_empty());
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("not told once ready")
            .unwrap();
        // Ready already: at once.
        r.wait().await;
    }
}
