//! Idle timeout for an app's HTTP/2 connection: closed gracefully (GOAWAY) once no request has
//! been in flight for the Service's `timeouts.idle`. (HTTP/1.1 uses hyper's header read timer.)
//! The connection's task asks [`Activity::next_check`] when to look again.
use std::{
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
        *self.0.last.lock().expect("activity lock") = Instant::now();
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
        let since = now.saturating_duration_since(*self.last.lock().expect("activity lock"));
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

#[cfg(test)]
mod tests {
    use super::*;

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
