//! The mesh's lock-poisoning policy, in one place.
//!
//! A std lock is poisoned when a thread panics while holding it, and by default every later
//! `lock()` then fails. In a proxy that serves a whole node, that would turn one bug in one
//! request into a failure of every later request that touches the same pool, store or table.
//! The policy instead: a panic fails the task it happened in (tokio catches it), and the lock is
//! taken again as it is. What the lock guards is kept valid at every step where code can panic:
//! critical sections are short, never await, and update a collection by whole entries, so the
//! worst left behind is a missing or stale entry, which every user of these maps already
//! handles (a pool reconnects, a cache refills, a counter is off by one).
//!
//! Use `locked()`, `read_locked()` and `write_locked()` instead of `lock().expect(..)`.
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub trait LockExt<T> {
    /// The guard, even if an earlier holder panicked.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> LockExt<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub trait RwLockExt<T> {
    /// A read guard, even if an earlier writer panicked.
    fn read_locked(&self) -> RwLockReadGuard<'_, T>;
    /// A write guard, even if an earlier writer panicked.
    fn write_locked(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T> RwLockExt<T> for RwLock<T> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_locked(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_panic_while_holding_a_lock_does_not_fail_later_users() {
        let m = Arc::new(Mutex::new(vec![1]));
        let r = Arc::new(RwLock::new(1));
        let (m2, r2) = (m.clone(), r.clone());
        let _ = std::thread::spawn(move || {
            let _g = m2.locked();
            let _w = r2.write_locked();
            panic!("a bug in one request");
        })
        .join();
        assert!(m.is_poisoned() && r.is_poisoned());
        m.locked().push(2);
        *r.write_locked() += 1;
        assert_eq!((m.locked().len(), *r.read_locked()), (2, 2));
    }
}
