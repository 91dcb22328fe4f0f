//! Idle timeouts for an app's connection.
//! - HTTP/2: closed gracefully (GOAWAY) once no request has been in flight for the Service's
//!   `timeouts.idle`. The connection's task asks [`Activity::next_check`] when to look again.
//! - HTTP/1.1: hyper's header read timer, which runs from the end of one response to the end of
//!   the next request's head, driven by a [`HeadTimer`].
use mesh_api::sync::LockExt;
use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::body::{Body, BoxError};

/// Requests in flight on one connection, and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        }
    }
}

/// One request in flight, until its response body has been sent (or dropped).
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last.locked() = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Busy {
    /// Keeps the request in flight while `body` streams.
    pub fn until_end_of(self, body: Body) -> WhileBusy {
        WhileBusy { body, _busy: self }
    }
}

pub struct WhileBusy {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for WhileBusy {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Activity {
    pub fn start(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// How much longer the connection may stay idle; `None` while a request is in flight.
    fn idle_left(&self, idle: Duration, now: Instant) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let since = now.saturating_duration_since(*self.last.locked());
        Some(idle.saturating_sub(since))
    }

    /// How long to wait before looking again, or `None`: idle long enough, shut down now.
    pub fn next_check(&self, idle: Duration) -> Option<Duration> {
        match self.idle_left(idle, Instant::now()) {
            Some(left) if left.is_zero() => None,
            Some(left) => Some(left),
            None => Some(idle),
        }
    }
}

/// hyper's timer for one HTTP/1.1 connection, with one runtime timer entry for the
/// connection's life. hyper asks for a new sleep for every request head; with tokio's timer
/// each is an allocation, a runtime lookup and a timer-wheel insert and removal under the
/// driver's lock (3% of the source proxy's samples on `mesh_l7`). Here a sleep only carries its
/// deadline. The entry is moved only when it fires before the deadline of the sleep polling
/// it (once per timeout period), or when a sleep needs it earlier.
#[derive(Clone, Default)]
pub struct HeadTimer(Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>);

struct HeadSleep {
    entry: HeadTimer,
    deadline: tokio::time::Instant,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    // The runtime's clock, as the sleeps use (the same as `Instant::now` unless a test pauses it).
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            entry: self.clone(),
            deadline: deadline.into(),
        })
    }
}

impl hyper::rt::Sleep for HeadSleep {}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline;
        let mut entry = self.entry.0.locked();
        let sleep = entry.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        // Pending means not due yet (and the waker is registered): no clock read.
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if tokio::time::Instant::now() >= deadline {
            return Poll::Ready(());
        }
        // Fired for an earlier head's deadline: moved to ours, and polled to register.
        sleep.as_mut().reset(deadline);
        sleep.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    #[tokio::test(start_paused = true)]
    async fn a_head_sleep_ends_at_its_own_deadline_whatever_the_entry_was_set_to() {
        let timer = HeadTimer::default();
        let t0 = tokio::time::Instant::now();
        // The first head's sleep sets the entry; the head arrives in time.
        let first = timer.sleep(Duration::from_secs(10));
        assert!(
            tokio::time::timeout(Duration::from_secs(4), first)
                .await
                .is_err()
        );
        // The next head's deadline is later than the entry: the entry fires at 10 s, early,
        // and is moved; the sleep ends at its own deadline (4 s + 10 s).
        let ends = |d| tokio::time::timeout(Duration::from_secs(100), timer.sleep(d));
        ends(Duration::from_secs(10))
            .await
            .expect("woken at its deadline");
        assert_eq!(t0.elapsed(), Duration::from_secs(14));
        // A shorter deadline than the entry's moves the entry earlier.
        let long = timer.sleep(Duration::from_secs(60));
        assert!(
            tokio::time::timeout(Duration::from_secs(1), long)
                .await
                .is_err()
        );
        ends(Duration::from_secs(2))
            .await
            .expect("woken at its deadline");
        assert_eq!(t0.elapsed(), Duration::from_secs(17));
    }

    #[test]
    fn idle_only_without_requests_in_flight() {
        let a = Arc::new(Activity::default());
        let idle = Duration::from_secs(10);
        let t0 = *a.last.lock().unwrap();
        assert_eq!(
            a.idle_left(idle, t0 + Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
        let busy = a.start();
        assert_eq!(a.idle_left(idle, t0 + Duration::from_secs(60)), None);
        drop(busy);
        let left = a.idle_left(idle, Instant::now()).unwrap();
        assert!(
            left > Duration::from_secs(9),
            "the clock restarts when a request ends"
        );
        assert_eq!(
            a.idle_left(idle, Instant::now() + Duration::from_secs(11)),
            Some(Duration::ZERO)
        );
    }
}
