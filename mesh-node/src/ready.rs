//! Readiness as a set of named blockers: ready once every registered blocker is released.
use mesh_api::sync::LockExt;
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

#[derive(Clone, Default)]
pub struct Ready(Arc<Mutex<BTreeSet<&'static str>>>);

/// Holds readiness back until dropped.
#[must_use = "readiness is released when the blocker is dropped"]
pub struct Blocker {
    ready: Ready,
    name: &'static str,
}

impl Ready {
    pub fn register(&self, name: &'static str) -> Blocker {
        self.0.locked().insert(name);
        Blocker {
            ready: self.clone(),
            name,
        }
    }

    /// Names still blocking; empty when ready.
    pub fn pending(&self) -> Vec<&'static str> {
        self.0.locked().iter().copied().collect()
    }
}

impl Drop for Blocker {
    fn drop(&mut self) {
        self.ready.0.locked().remove(self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_after_all_blockers_drop() {
        let r = Ready::default();
        let a = r.register("ebpf");
        let b = r.register("listeners");
        assert_eq!(r.pending(), vec!["ebpf", "listeners"]);
        drop(a);
        assert_eq!(r.pending(), vec!["listeners"]);
        drop(b);
        assert!(r.pending().is_empty());
    }
}
