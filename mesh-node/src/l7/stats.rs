//! Request figures by bounded labels: each label has a budget of distinct values; values beyond it
//! are reported as `overflow`, so a misbehaving client cannot blow up the time series.
use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::Duration,
};

use serde::Serialize;

/// Upper bounds of the request duration histogram, in seconds.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

pub const OVERFLOW: &str = "overflow";

/// Labels of one request series. Recorded borrowed (`RequestLabels<&str>`, no allocation per
/// request), kept owned.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct RequestLabels<S = String> {
    /// `source` (the caller's node proxy) or `destination` (the callee's).
    pub reporter: &'static str,
    pub source_workload: S,
    pub source_namespace: S,
    pub source_principal: S,
    pub destination_service: S,
    pub destination_workload: S,
    pub destination_namespace: S,
    pub response_code: u16,
    /// The gRPC status in the response headers, or empty.
    pub grpc_status: S,
    /// Envoy-style flag of what the proxy did (`-` when nothing).
    pub response_flags: &'static str,
    /// `mutual_tls` or `plaintext`.
    pub connection_security: &'static str,
}

impl RequestLabels<&str> {
    fn owned(&self) -> RequestLabels {
        RequestLabels {
            reporter: self.reporter,
            source_workload: self.source_workload.into(),
            source_namespace: self.source_namespace.into(),
            source_principal: self.source_principal.into(),
            destination_service: self.destination_service.into(),
            destination_workload: self.destination_workload.into(),
            destination_namespace: self.destination_namespace.into(),
            response_code: self.response_code,
            grpc_status: self.grpc_status.into(),
            response_flags: self.response_flags,
            connection_security: self.connection_security,
        }
    }
}

/// Derived `Hash` hashes `&str` and `String` fields alike, so a borrowed set of labels finds its
/// owned series.
impl hashbrown::Equivalent<RequestLabels> for RequestLabels<&str> {
    fn equivalent(&self, k: &RequestLabels) -> bool {
        self.reporter == k.reporter
            && self.source_workload == k.source_workload
            && self.source_namespace == k.source_namespace
            && self.source_principal == k.source_principal
            && self.destination_service == k.destination_service
            && self.destination_workload == k.destination_workload
            && self.destination_namespace == k.destination_namespace
            && self.response_code == k.response_code
            && self.grpc_status == k.grpc_status
            && self.response_flags == k.response_flags
            && self.connection_security == k.connection_security
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RequestFigures {
    pub count: u64,
    pub duration_sum_seconds: f64,
    /// Cumulative counts per `DURATION_BUCKETS` bound.
    pub duration_buckets: [u64; DURATION_BUCKETS.len()],
    pub request_bytes: u64,
    pub response_bytes: u64,
}

#[derive(Debug)]
pub struct L7Stats {
    budget: usize,
    seen: Mutex<HashMap<&'static str, HashSet<String>>>,
    series: Mutex<hashbrown::HashMap<RequestLabels, RequestFigures>>,
}

impl L7Stats {
    pub fn new(label_budget: usize) -> Self {
        Self {
            budget: label_budget,
            seen: Mutex::default(),
            series: Mutex::default(),
        }
    }

    /// `value`, or `overflow` when the label has used its budget on other values.
    fn bounded(&self, label: &'static str, value: String) -> String {
        let mut seen = self.seen.lock().expect("labels lock");
        let set = seen.entry(label).or_default();
        if set.contains(&value) || set.len() < self.budget {
            set.insert(value.clone());
            value
        } else {
            OVERFLOW.to_string()
        }
    }

    fn bound(&self, mut l: RequestLabels) -> RequestLabels {
        l.source_workload = self.bounded("source_workload", l.source_workload);
        l.source_namespace = self.bounded("source_namespace", l.source_namespace);
        l.source_principal = self.bounded("source_principal", l.source_principal);
        l.destination_service = self.bounded("destination_service", l.destination_service);
        l.destination_workload = self.bounded("destination_workload", l.destination_workload);
        l.destination_namespace = self.bounded("destination_namespace", l.destination_namespace);
        l.grpc_status = self.bounded("grpc_status", l.grpc_status);
        l
    }

    /// A request answered (headers sent) after `took`, with its body sizes.
    pub fn record(
        &self,
        labels: RequestLabels<&str>,
        took: Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let secs = took.as_secs_f64();
        let add = |f: &mut RequestFigures| {
            f.count += 1;
            f.duration_sum_seconds += secs;
            for (i, b) in DURATION_BUCKETS.iter().enumerate() {
                if secs <= *b {
                    f.duration_buckets[i] += 1;
                }
            }
            f.request_bytes += request_bytes;
            f.response_bytes += response_bytes;
        };
        // A series that exists was within budget when it was made: the common case is one
        // lookup, no allocation, no per-label bookkeeping.
        if let Some(f) = self.series.lock().expect("series lock").get_mut(&labels) {
            add(f);
            return;
        }
        let labels = self.bound(labels.owned());
        add(self
            .series
            .lock()
            .expect("series lock")
            .entry(labels)
            .or_default());
    }

    pub fn snapshot(&self) -> Vec<(RequestLabels, RequestFigures)> {
        let mut v: Vec<_> = self
            .series
            .lock()
            .expect("series lock")
            .iter()
            .map(|(l, f)| (l.clone(), f.clone()))
            .collect();
        v.sort_by(|a, b| format!("{:?}", a.0).cmp(&format!("{:?}", b.0)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(src: &str) -> RequestLabels<&str> {
        RequestLabels {
            reporter: "source",
            source_workload: src,
            source_namespace: "ns",
            source_principal: "",
            destination_service: "ns/web",
            destination_workload: "web-0",
            destination_namespace: "ns",
            response_code: 200,
            grpc_status: "",
            response_flags: "-",
            connection_security: "mutual_tls",
        }
    }

    #[test]
    fn labels_beyond_the_budget_overflow() {
        let s = L7Stats::new(2);
        for w in ["a", "b", "c", "d", "a"] {
            s.record(labels(w), Duration::from_millis(3), 10, 0);
        }
        let snap = s.snapshot();
        let by: HashMap<String, u64> = snap
            .iter()
            .map(|(l, f)| (l.source_workload.clone(), f.count))
            .collect();
        assert_eq!(by["a"], 2);
        assert_eq!(by["b"], 1);
        assert_eq!(by[OVERFLOW], 2);
        assert_eq!(by.len(), 3);
        let (_, f) = snap.iter().find(|(l, _)| l.source_workload == "a").unwrap();
        // 3 ms: in every bucket from 5 ms up.
        assert_eq!(f.duration_buckets[2], 0);
        assert_eq!(f.duration_buckets[3], 2);
    }
}
