//! A Service's `TrafficPolicy` compiled for the data path, and the pure arithmetic of resilience:
//! GCRA rate limiting, the retry budget, backoff with jitter, and what counts as retryable. Time
//! is passed in, so all of it is tested by tables without sleeping.
use std::time::{Duration, Instant};

use mesh_api::crd::{LoadBalancerPolicy, TrafficPolicySpec, parse_duration};

/// Retries may add this share of requests unless the policy says otherwise.
const DEFAULT_BUDGET_PERCENT: u32 = 20;
/// Retries always allowed per second, so a quiet Service can still retry.
const BUDGET_MIN_PER_SECOND: f64 = 10.0;
/// Ejected endpoints stay out at most this many times their base ejection time.
const MAX_EJECTION_MULTIPLIER: u32 = 8;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    pub field: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServicePolicy {
    /// `namespace/name` of the TrafficPolicy (for logs), if one applies.
    pub source: Option<String>,
    pub request_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub connect_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub breaker: Breaker,
    pub outlier: Option<Outlier>,
    pub rate_limit: Option<RateLimit>,
    pub delay: Option<(f64, Duration)>,
    pub abort: Option<(f64, Abort)>,
    pub lb: Lb,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Breaker {
    pub max_connections: Option<u32>,
    pub max_pending: Option<u32>,
    pub max_requests: Option<u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Outlier {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
    pub per_source: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Abort {
    Http(u16),
    Grpc(u32),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub enum Lb {
    #[default]
    P2cEwma,
    RoundRobin,
    Hash(http::HeaderName),
}

#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    pub base: Duration,
    pub max: Duration,
    pub budget_percent: u32,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RetryOn {
    pub connect_failure: bool,
    pub reset: bool,
    pub any_5xx: bool,
    /// 502, 503, 504.
    pub gateway_error: bool,
    pub statuses: Vec<u16>,
    pub grpc: Vec<u32>,
}

/// How one try ended, as retries and outlier detection see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response; with its gRPC status when the request was gRPC and the status came in the
    /// headers (a trailers-only response).
    Response(u16, Option<u32>),
    ConnectFailure,
    Reset,
    Timeout,
}

impl Outcome {
    /// Whether outlier detection counts this against the endpoint.
    pub fn is_failure(self) -> bool {
        match self {
            Outcome::Response(s, _) => s >= 500,
            _ => true,
        }
    }
}

const GRPC_NAMES: &[(&str, u32)] = &[
    ("cancelled", 1),
    ("unknown", 2),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("aborted", 10),
    ("internal", 13),
    ("unavailable", 14),
];

impl RetryOn {
    fn parse(items: &[String]) -> Result<Self, PolicyError> {
        let mut on = RetryOn::default();
        for (i, s) in items.iter().enumerate() {
            match s.as_str() {
                "connect-failure" => on.connect_failure = true,
                "reset" => on.reset = true,
                "5xx" => on.any_5xx = true,
                "gateway-error" => on.gateway_error = true,
                other => {
                    if let Ok(code) = other.parse::<u16>() {
                        on.statuses.push(code);
                    } else if let Some((_, c)) = GRPC_NAMES.iter().find(|(n, _)| *n == other) {
                        on.grpc.push(*c);
                    } else {
                        return Err(PolicyError {
                            field: format!("retries.retryOn[{i}]"),
                            reason: format!("{other:?} is not a retry condition"),
                        });
                    }
                }
            }
        }
        if items.is_empty() {
            // Safe defaults: the request never reached the app, or the endpoint is overloaded.
            on.connect_failure = true;
            on.reset = true;
            on.statuses.push(503);
            on.grpc.push(14);
        }
        Ok(on)
    }

    pub fn retryable(&self, o: Outcome) -> bool {
        match o {
            Outcome::ConnectFailure => self.connect_failure,
            Outcome::Reset => self.reset,
            // The per-try deadline expired: a new try may land on a healthier endpoint.
            Outcome::Timeout => self.reset || self.gateway_error || self.any_5xx,
            Outcome::Response(status, grpc) => {
                (self.any_5xx && status >= 500)
                    || (self.gateway_error && matches!(status, 502..=504))
                    || self.statuses.contains(&status)
                    || grpc.is_some_and(|g| self.grpc.contains(&g))
            }
        }
    }
}

impl ServicePolicy {
    /// Compiles a policy the controller already validated; errors name the field anyway.
    pub fn compile(name: &str, spec: &TrafficPolicySpec) -> Result<Self, PolicyError> {
        let dur = |field: &str, v: &Option<String>| -> Result<Option<Duration>, PolicyError> {
            v.as_deref()
                .map(|v| {
                    parse_duration(v).map_err(|reason| PolicyError {
                        field: field.into(),
                        reason,
                    })
                })
                .transpose()
        };
        let req = |field: &str, v: &str| dur(field, &Some(v.to_string())).map(Option::unwrap);
        let mut p = ServicePolicy {
            source: Some(name.to_string()),
            ..Default::default()
        };
        if let Some(t) = &spec.timeouts {
            p.request_timeout = dur("timeouts.request", &t.request)?;
            p.idle_timeout = dur("timeouts.idle", &t.idle)?;
            p.connect_timeout = dur("timeouts.connect", &t.connect)?;
        }
        if let Some(r) = &spec.retries {
            let (base, max) = match &r.backoff {
                Some(b) => (
                    req("retries.backoff.baseInterval", &b.base_interval)?,
                    req("retries.backoff.maxInterval", &b.max_interval)?,
                ),
                None => (Duration::from_millis(25), Duration::from_millis(250)),
            };
            p.retry = Some(RetryPolicy {
                attempts: r.attempts,
                per_try_timeout: dur("retries.perTryTimeout", &r.per_try_timeout)?,
                on: RetryOn::parse(&r.retry_on)?,
                base,
                max: max.max(base),
                budget_percent: r.budget_percent.unwrap_or(DEFAULT_BUDGET_PERCENT),
            });
        }
        if let Some(c) = &spec.circuit_breaker {
            p.breaker = Breaker {
                max_connections: c.max_connections,
                max_pending: c.max_pending_requests,
                max_requests: c.max_requests,
            };
        }
        if let Some(o) = &spec.outlier_detection {
            p.outlier = Some(Outlier {
                consecutive_failures: o.consecutive_failures.max(1),
                base_ejection: req("outlierDetection.baseEjectionTime", &o.base_ejection_time)?,
                max_ejection_percent: o.max_ejection_percent.unwrap_or(50).min(100),
            });
        }
        if let Some(r) = &spec.rate_limit {
            if !(r.requests_per_second > 0.0 && r.requests_per_second.is_finite()) {
                return Err(PolicyError {
                    field: "rateLimit.requestsPerSecond".into(),
                    reason: "must be a positive number".into(),
                });
            }
            p.rate_limit = Some(RateLimit {
                per_second: r.requests_per_second,
                burst: r.burst.unwrap_or(1).max(1),
                per_source: r.per_source,
            });
        }
        if let Some(f) = &spec.faults {
            if let Some(d) = &f.delay {
                p.delay = Some((d.percent, req("faults.delay.fixedDelay", &d.fixed_delay)?));
            }
            if let Some(a) = &f.abort {
                let abort = match (a.http_status, a.grpc_status) {
                    (Some(s), None) => Abort::Http(s),
                    (None, Some(g)) => Abort::Grpc(g),
                    _ => {
                        return Err(PolicyError {
                            field: "faults.abort".into(),
                            reason: "needs exactly one of httpStatus and grpcStatus".into(),
                        });
                    }
                };
                p.abort = Some((a.percent, abort));
            }
        }
        if let Some(lb) = &spec.load_balancer {
            p.lb = match lb.policy {
                LoadBalancerPolicy::P2cEwma => Lb::P2cEwma,
                LoadBalancerPolicy::RoundRobin => Lb::RoundRobin,
                LoadBalancerPolicy::ConsistentHash => {
                    let h = lb.hash_header.as_deref().unwrap_or_default();
                    Lb::Hash(http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                        PolicyError {
                            field: "loadBalancer.hashHeader".into(),
                            reason: format!("{h:?} is not a header name"),
                        }
                    })?)
                }
            };
        }
        Ok(p)
    }
}

/// GCRA (the generic cell rate algorithm): one timestamp per limited key. A request is allowed
/// when its theoretical arrival time is no further ahead than the burst allows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gcra {
    /// Theoretical arrival time of the next request, as an offset from `epoch`.
    tat: Duration,
}

impl Gcra {
    /// `Ok` to let the request through, or how long until one would be.
    pub fn check(
        &mut self,
        limit: &RateLimit,
        epoch: Instant,
        now: Instant,
    ) -> Result<(), Duration> {
        let t = Duration::from_secs_f64(1.0 / limit.per_second);
        let tolerance = t * limit.burst.saturating_sub(1);
        let now = now.saturating_duration_since(epoch);
        let tat = self.tat.max(now);
        if tat > now + tolerance {
            return Err(tat - now - tolerance);
        }
        self.tat = tat + t;
        Ok(())
    }
}

/// Retries allowed as a share of requests (deposits per request, one token per retry), plus a
/// small steady allowance, so retries cannot multiply load in an outage.
#[derive(Debug)]
pub struct RetryBudget {
    tokens: f64,
    last: Instant,
}

impl RetryBudget {
    pub fn new(now: Instant) -> Self {
        Self {
            tokens: BUDGET_MIN_PER_SECOND,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        // The steady allowance tops up to one second's worth; deposits may go above it.
        if self.tokens < BUDGET_MIN_PER_SECOND {
            self.tokens = (self.tokens + secs * BUDGET_MIN_PER_SECOND).min(BUDGET_MIN_PER_SECOND);
        }
    }

    pub fn deposit(&mut self, percent: u32, now: Instant) {
        self.refill(now);
        // Capped so a long quiet period cannot save up a retry storm.
        self.tokens = (self.tokens + f64::from(percent) / 100.0).min(1000.0);
    }

    pub fn withdraw(&mut self, now: Instant) -> bool {
        self.refill(now);
        // The tolerance absorbs rounding in the sum of fractional deposits.
        if self.tokens >= 1.0 - 1e-9 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Exponential backoff with equal jitter: half the step fixed, half random (`jitter` in [0, 1)).
pub fn backoff(base: Duration, max: Duration, retry: u32, jitter: f64) -> Duration {
    let step = base.saturating_mul(1u32 << retry.min(16)).min(max);
    step / 2 + step.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

/// How long an endpoint stays ejected the `n`th time in a row (n >= 1).
pub fn ejection_time(o: &Outlier, n: u32) -> Duration {
    o.base_ejection * n.clamp(1, MAX_EJECTION_MULTIPLIER)
}

/// The gRPC status a client expects for an HTTP status (gRPC's HTTP-to-gRPC mapping).
pub fn grpc_from_http(status: u16) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> TrafficPolicySpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn compiles_every_section() {
        let p = ServicePolicy::compile(
            "shop/web",
            &spec(
                r#"{"targetRef": {"name": "web"},
                "timeouts": {"request": "2s", "idle": "1m"},
                "retries": {"attempts": 2, "perTryTimeout": "250ms", "retryOn": ["reset", "503", "unavailable"], "backoff": {"baseInterval": "10ms", "maxInterval": "100ms"}},
                "circuitBreaker": {"maxRequests": 10, "maxPendingRequests": 2},
                "outlierDetection": {"consecutiveFailures": 3, "baseEjectionTime": "5s"},
                "rateLimit": {"requestsPerSecond": 100, "burst": 20, "perSource": true},
                "faults": {"delay": {"percent": 10, "fixedDelay": "100ms"}, "abort": {"percent": 5, "grpcStatus": 14}},
                "loadBalancer": {"policy": "CONSISTENT_HASH", "hashHeader": "x-user"}}"#,
            ),
        )
        .unwrap();
        assert_eq!(p.request_timeout, Some(Duration::from_secs(2)));
        let r = p.retry.unwrap();
        assert_eq!((r.attempts, r.budget_percent), (2, 20));
        assert_eq!(r.on.statuses, vec![503]);
        assert_eq!(r.on.grpc, vec![14]);
        assert!(r.on.reset && !r.on.connect_failure);
        assert_eq!(p.breaker.max_requests, Some(10));
        assert_eq!(p.outlier.unwrap().max_ejection_percent, 50);
        assert_eq!(p.abort, Some((5.0, Abort::Grpc(14))));
        assert_eq!(p.lb, Lb::Hash(http::HeaderName::from_static("x-user")));
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (
                r#"{"targetRef": {"name": "w"}, "retries": {"attempts": 1, "retryOn": ["sometimes"]}}"#,
                "retries.retryOn[0]",
            ),
            (
                r#"{"targetRef": {"name": "w"}, "timeouts": {"request": "soon"}}"#,
                "timeouts.request",
            ),
            (
                r#"{"targetRef": {"name": "w"}, "faults": {"abort": {"percent": 1}}}"#,
                "faults.abort",
            ),
            (
                r#"{"targetRef": {"name": "w"}, "rateLimit": {"requestsPerSecond": 0}}"#,
                "rateLimit.requestsPerSecond",
            ),
        ];
        for (json, field) in cases {
            let e = ServicePolicy::compile("x", &spec(json)).unwrap_err();
            assert_eq!(e.field, field, "{json}");
        }
    }

    #[test]
    fn retry_conditions() {
        let on = RetryOn::parse(&["5xx".into(), "resource-exhausted".into()]).unwrap();
        let defaults = RetryOn::parse(&[]).unwrap();
        let gw = RetryOn::parse(&["gateway-error".into(), "connect-failure".into()]).unwrap();
        let cases = [
            (&on, Outcome::Response(500, None), true),
            (&on, Outcome::Response(404, None), false),
            (&on, Outcome::Response(200, Some(8)), true),
            (&on, Outcome::Response(200, Some(14)), false),
            (&on, Outcome::ConnectFailure, false),
            (&defaults, Outcome::ConnectFailure, true),
            (&defaults, Outcome::Reset, true),
            (&defaults, Outcome::Response(503, None), true),
            (&defaults, Outcome::Response(500, None), false),
            (&defaults, Outcome::Response(200, Some(14)), true),
            (&gw, Outcome::Response(502, None), true),
            (&gw, Outcome::Response(500, None), false),
            (&gw, Outcome::Timeout, true),
            (&gw, Outcome::Reset, false),
        ];
        for (i, (on, o, want)) in cases.iter().enumerate() {
            assert_eq!(on.retryable(*o), *want, "case {i}: {o:?}");
        }
    }

    #[test]
    fn gcra_allows_the_rate_and_the_burst() {
        let limit = RateLimit {
            per_second: 10.0,
            burst: 3,
            per_source: false,
        };
        let epoch = Instant::now();
        let mut g = Gcra::default();
        let at = |ms: u64| epoch + Duration::from_millis(ms);
        // A burst of 3 at once, then the 4th waits 100 ms.
        for _ in 0..3 {
            assert_eq!(g.check(&limit, epoch, at(1000)), Ok(()));
        }
        let wait = g.check(&limit, epoch, at(1000)).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert_eq!(g.check(&limit, epoch, at(1100)), Ok(()));
        assert!(g.check(&limit, epoch, at(1150)).is_err());
        // Over 10 s at the limit: 10 per second get through.
        let mut g = Gcra::default();
        let allowed = (0..1000)
            .filter(|i| g.check(&limit, epoch, at(10_000 + i * 10)).is_ok())
            .count();
        assert!((100..=103).contains(&allowed), "{allowed}");
    }

    #[test]
    fn retry_budget_caps_retries_at_a_share_of_requests() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(t0);
        // The steady allowance first.
        let free = (0..100).filter(|_| b.withdraw(t0)).count();
        assert_eq!(free, 10);
        // Then 20% of 1000 requests: 200 retries, no more.
        for _ in 0..1000 {
            b.deposit(20, t0);
        }
        let more = (0..1000).filter(|_| b.withdraw(t0)).count();
        assert_eq!(more, 200);
        // Time refills the steady allowance only.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| b.withdraw(later)).count(), 10);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let (b, m) = (Duration::from_millis(10), Duration::from_millis(100));
        assert_eq!(backoff(b, m, 0, 0.0), Duration::from_millis(5));
        assert_eq!(backoff(b, m, 0, 1.0), Duration::from_millis(10));
        assert_eq!(backoff(b, m, 2, 0.0), Duration::from_millis(20));
        assert_eq!(backoff(b, m, 10, 0.5), Duration::from_millis(75));
        let o = Outlier {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(1),
            max_ejection_percent: 50,
        };
        assert_eq!(ejection_time(&o, 3), Duration::from_secs(3));
        assert_eq!(ejection_time(&o, 100), Duration::from_secs(8));
    }
}
