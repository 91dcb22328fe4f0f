//! Node proxy configuration: flags and environment in, a validated [`Config`] out.
//!
//! Parsing (clap) and validation are separate so that every rule lives in [`RunArgs::validate`]
//! and reports the flag it concerns.
pub(crate) mod node;
pub(crate) mod subscribe;
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, ValueEnum};
use ipnet::IpNet;
use serde::Serialize;

/// A rejected setting: which flag, and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {field}: {reason}")]
pub struct ConfigError {
    /// The flag (or environment variable) at fault, e.g. `--proxy-ipv4`.
    pub field: &'static str,
    pub reason: String,
}

fn err(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        reason: reason.into(),
    }
}

/// What the node proxy leaves behind when it exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExit {
    /// Keep the redirect programs attached and the pods enrolled: enrolled pods fail closed until
    /// a node proxy is back, and a restarted proxy takes over without re-enrolling.
    Keep,
    /// Detach the programs and drop all pinned state: pods talk directly again (uninstall).
    Detach,
}

/// Which inbound (STRICT/PERMISSIVE) program to run. `auto` takes the helper where this kernel's
/// cgroup_skb programs may call `bpf_get_netns_cookie`, else the BTF one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundProgram {
    Auto,
    Helper,
    Btf,
}

/// A feature switch as a flag value (`--socket-acceleration off`, `MESH_SOCKET_ACCELERATION=off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EbpfLogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
}

impl EbpfLogLevel {
    /// The value of aya-log-ebpf's `AYA_LOG_LEVEL` global (aya_log_common::Level, 0 = off).
    pub fn as_aya(self) -> u8 {
        match self {
            EbpfLogLevel::Off => 0,
            EbpfLogLevel::Error => 1,
            EbpfLogLevel::Warn => 2,
            EbpfLogLevel::Info => 3,
            EbpfLogLevel::Debug => 4,
        }
    }
}

/// `mesh-node run` flags. Each also reads an environment variable, for the DaemonSet.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Name of this node; names its pinned state, so one kernel can host several nodes (tests).
    #[arg(long, env = "MESH_NODE_NAME")]
    pub node_name: String,
    /// cgroup v2 directory holding this node's pods (e.g. /sys/fs/cgroup/kubepods.slice).
    #[arg(long, env = "MESH_CGROUP")]
    pub cgroup: PathBuf,
    /// IPv4 address of this node that pods can route to; redirected IPv4 connections land here.
    #[arg(long, env = "MESH_PROXY_IPV4")]
    pub proxy_ipv4: Option<IpAddr>,
    /// IPv6 address of this node that pods can route to; redirected IPv6 connections land here.
    #[arg(long, env = "MESH_PROXY_IPV6")]
    pub proxy_ipv6: Option<IpAddr>,
    /// Port of the outbound listener (0 picks a free port, for tests).
    #[arg(long, env = "MESH_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Admin endpoint: health, readiness, enrollment API, counters.
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// A read-only listener for Prometheus and probes (`/metrics`, `/healthz`, `/ready`), e.g.
    /// `0.0.0.0:15020`: scrapable from the network without exposing the enrollment API.
    #[arg(long, env = "MESH_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Destination ports never redirected (comma-separated or repeated).
    #[arg(long, env = "MESH_EXCLUDE_PORTS", value_delimiter = ',')]
    pub exclude_ports: Vec<u16>,
    /// Destination CIDRs never redirected (comma-separated or repeated).
    #[arg(long, env = "MESH_EXCLUDE_CIDRS", value_delimiter = ',')]
    pub exclude_cidrs: Vec<String>,
    /// bpffs mount point; mounted if missing.
    #[arg(long, env = "MESH_BPFFS", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Where this node's pinned programs and maps live (default: <bpffs>/mesh/<node-name>).
    #[arg(long, env = "MESH_PIN_DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Where this node keeps its enrollment state (default: /run/mesh-node/<node-name>).
    #[arg(long, env = "MESH_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// eBPF object to load instead of the one embedded at build time.
    #[arg(long, env = "MESH_EBPF_OBJECT")]
    pub ebpf_object: Option<PathBuf>,
    /// Level of the kernel programs' own logs (forwarded to this process's log).
    #[arg(long, env = "MESH_EBPF_LOG_LEVEL", value_enum, default_value_t = EbpfLogLevel::Warn)]
    pub ebpf_log_level: EbpfLogLevel,
    /// Bytes pods send to this proxy skip TCP/IP (a socket map and an sk_msg program), in order
    /// and held back by TCP's flow control when the proxy falls behind. Off by default: on this
    /// kernel generation only that direction can be made safe, which saves a few percent of CPU
    /// (see the README); left off, with a warning, on kernels that cannot do it.
    #[arg(long, env = "MESH_SOCKET_ACCELERATION", value_enum, default_value_t = Switch::Off)]
    pub socket_acceleration: Switch,
    /// How long open connections may finish after SIGTERM before they are cut.
    #[arg(long, env = "MESH_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,
    #[command(flatten)]
    pub limits: Limits,
    /// Upstream connect timeout.
    #[arg(long, env = "MESH_CONNECT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub connect_timeout: Duration,
    /// How long to look at a new connection's first bytes for HTTP on ports whose Service does
    /// not declare a protocol, until HTTP has been seen on that port (then a client may take as
    /// long as on a declared port). Server-first protocols wait this long before being relayed
    /// as TCP: declare them `tcp` (appProtocol or port name) or list them in `--opaque-ports`.
    #[arg(long, env = "MESH_PROTOCOL_DETECT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "100ms")]
    pub protocol_detect_timeout: Duration,
    /// Ports relayed as opaque TCP at once, without detection, unless a Service declares their
    /// protocol (comma-separated; `""` for none). The default lists well-known server-first
    /// protocols: SMTP, MySQL, Galera, PostgreSQL, Redis, Elasticsearch, memcached.
    #[arg(
        long,
        env = "MESH_OPAQUE_PORTS",
        value_delimiter = ',',
        default_value = "25,587,3306,4444,5432,6379,9300,11211"
    )]
    pub opaque_ports: Vec<String>,
    /// Distinct values each request-metric label may take before further values are reported as
    /// `overflow`.
    #[arg(long, env = "MESH_METRICS_LABEL_BUDGET", default_value_t = 200)]
    pub metrics_label_budget: usize,
    /// Percent of HTTP requests and TCP connections written to the access log (JSON lines on
    /// stdout) for namespaces without a Telemetry resource; 0 turns it off there.
    #[arg(long, env = "MESH_ACCESS_LOG", default_value_t = 0.0)]
    pub access_log: f64,
    /// Cluster mode: find each local pod's network namespace under the kubelet's `kubepods`
    /// cgroups below this cgroup2 mount (both cgroup drivers), instead of waiting for a CNI hook
    /// to register it.
    #[arg(long, env = "MESH_KUBEPODS_CGROUP_ROOT")]
    pub kubepods_cgroup_root: Option<PathBuf>,
    /// OTLP/gRPC collector for request spans (e.g. `http://otel-collector:4317`); none: no spans,
    /// trace headers pass through untouched.
    #[arg(long, env = "MESH_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Percent of requests without a trace context that start a trace (requests that carry one
    /// keep its sampling decision).
    #[arg(long, env = "MESH_TRACE_SAMPLE_PERCENT", default_value_t = 1.0)]
    pub trace_sample_percent: f64,
    /// What to leave behind on exit. A start that fails leaves the kernel as it found it, except
    /// that `detach` then also detaches.
    #[arg(long, env = "MESH_ON_EXIT", value_enum, default_value_t = OnExit::Keep)]
    pub on_exit: OnExit,
    /// What an encoded `/` or `\` (`%2F`, `%5C`) in a request path becomes: `reject` (400),
    /// `keep` (forwarded as it is; rules see `%2F`), `decode` (to `/`). Set it alike on every node.
    #[arg(long, env = "MESH_PATH_ESCAPED_SLASHES", value_enum, default_value_t = EscapedSlashes::Reject)]
    pub path_escaped_slashes: EscapedSlashes,
    /// Which inbound program finds the receiving pod (`auto`: probed; the others insist, and
    /// the start fails if this kernel cannot run the one named).
    #[arg(long, env = "MESH_INBOUND_PROGRAM", value_enum, default_value_t = InboundProgram::Auto)]
    pub inbound_program: InboundProgram,
    /// Proxy worker threads (0: a quarter of the CPUs this process may use, at least one).
    #[arg(long, env = "MESH_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// The controller's certificate service (https://HOST:PORT). With it, connections to mesh
    /// workloads on other nodes go over mTLS with per-workload identities; without it, mesh-node
    /// only redirects and relays plain TCP.
    #[arg(long, env = "MESH_CTRL_ADDR")]
    pub ctrl_addr: Option<String>,
    /// Name in the controller's serving certificate.
    #[arg(long, env = "MESH_CTRL_SERVER_NAME", default_value = "mesh-ctrl")]
    pub ctrl_server_name: String,
    /// Roots trusted before the controller sends its bundle (PEM).
    #[arg(long, env = "MESH_TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,
    /// This node's bootstrap token for the controller.
    #[arg(long, env = "MESH_BOOTSTRAP_TOKEN_FILE")]
    pub bootstrap_token_file: Option<PathBuf>,
    /// Local mode without config distribution: where workloads run (JSON, see
    /// mesh_api::placement), reloaded on change. Without it, the node subscribes to the
    /// controller's configuration stream, and enrollment follows it.
    #[arg(long, env = "MESH_PLACEMENT")]
    pub placement: Option<PathBuf>,
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Lifetime to ask for workload certificates (the controller may grant less).
    #[arg(long, env = "MESH_CERT_TTL", value_parser = humantime::parse_duration, default_value = "24h")]
    pub cert_ttl: Duration,
}

/// Identity and tunnel settings, present when a controller is configured.
#[derive(Debug, Clone, Serialize)]
pub struct MeshConfig {
    pub ctrl_addr: String,
    pub ctrl_server_name: String,
    pub trust_bundle: PathBuf,
    pub bootstrap_token_file: PathBuf,
    /// `None`: placement and policy come from the controller's configuration stream.
    pub placement: Option<PathBuf>,
    pub trust_domain: String,
    #[serde(with = "humantime_serde_shim")]
    pub cert_ttl: Duration,
}

/// Validated configuration. Built only by [`RunArgs::validate`].
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub node_name: String,
    pub cgroup: PathBuf,
    pub proxy_ipv4: Option<Ipv4Addr>,
    pub proxy_ipv6: Option<Ipv6Addr>,
    pub outbound_port: u16,
    pub admin_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<IpNet>,
    pub bpffs: PathBuf,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub ebpf_object: Option<PathBuf>,
    pub ebpf_log_level: EbpfLogLevel,
    pub socket_acceleration: bool,
    #[serde(with = "humantime_serde_shim")]
    pub drain_timeout: Duration,
    #[serde(with = "humantime_serde_shim")]
    pub connect_timeout: Duration,
    pub limits: Limits,
    #[serde(with = "humantime_serde_shim")]
    pub protocol_detect_timeout: Duration,
    pub opaque_ports: Vec<u16>,
    pub metrics_label_budget: usize,
    /// Access log sample percent without a Telemetry.
    pub access_log: f64,
    pub otlp_endpoint: Option<String>,
    pub trace_sample_percent: f64,
    pub kubepods_cgroup_root: Option<PathBuf>,
    pub on_exit: OnExit,
    pub inbound_program: InboundProgram,
    pub path_escaped_slashes: EscapedSlashes,
    pub worker_threads: usize,
    pub mesh: Option<MeshConfig>,
}

/// Worker threads when `--worker-threads` is not given: a quarter of the CPUs this process may
/// use (its cgroup's quota counts), at least one. The proxy shares its node with the pods it
/// serves, and a request handed from one worker thread to another waits for that thread to be
/// scheduled: on a 2-core node one worker served 15-20% more requests per second at a quarter
/// less CPU per request than one per CPU, on the L4 and the HTTP path alike
/// (`docs/performance.md`). Larger nodes get more workers for more connections in parallel.
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 4).max(1))
}

/// The file name of the root-only admin socket in the state directory.
pub const ADMIN_SOCKET: &str = "admin.sock";

pub(crate) mod humantime_serde_shim {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// Node names become directory names under bpffs and the state dir.
fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
}

impl RunArgs {
    pub fn validate(self) -> Result<Config, ConfigError> {
        if !valid_node_name(&self.node_name) {
            return Err(err(
                "--node-name",
                format!(
                    "{:?} must be 1-63 lowercase letters, digits, '-' or '.', not starting with '-' or '.'",
                    self.node_name
                ),
            ));
        }
        if !self.cgroup.is_absolute() {
            return Err(err(
                "--cgroup",
                format!("{} is not an absolute path", self.cgroup.display()),
            ));
        }
        let proxy_ipv4 = match self.proxy_ipv4 {
            None => None,
            Some(IpAddr::V4(ip))
                if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() =>
            {
                return Err(err(
                    "--proxy-ipv4",
                    format!(
                        "{ip} is not reachable from pods: give an address of this node on the pod network"
                    ),
                ));
            }
            Some(IpAddr::V4(ip)) => Some(ip),
            Some(IpAddr::V6(ip)) => {
                return Err(err("--proxy-ipv4", format!("{ip} is an IPv6 address")));
            }
        };
        let proxy_ipv6 = match self.proxy_ipv6 {
            None => None,
            Some(IpAddr::V6(ip))
                if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() =>
            {
                return Err(err(
                    "--proxy-ipv6",
                    format!(
                        "{ip} is not reachable from pods: give an address of this node on the pod network"
                    ),
                ));
            }
            Some(IpAddr::V6(ip)) => Some(ip),
            Some(IpAddr::V4(ip)) => {
                return Err(err("--proxy-ipv6", format!("{ip} is an IPv4 address")));
            }
        };
        if proxy_ipv4.is_none() && proxy_ipv6.is_none() {
            return Err(err(
                "--proxy-ipv4",
                "neither --proxy-ipv4 nor --proxy-ipv6 is set: redirected connections need somewhere to land",
            ));
        }
        if let Some(p) = self.exclude_ports.iter().find(|p| **p == 0) {
            return Err(err(
                "--exclude-ports",
                format!("port {p} is not a valid destination port"),
            ));
        }
        let exclude_cidrs = self
            .exclude_cidrs
            .iter()
            .map(|c| {
                c.trim()
                    .parse::<IpNet>()
                    .map(|n| n.trunc())
                    .map_err(|e| err("--exclude-cidrs", format!("{c:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.drain_timeout > Duration::from_secs(3600) {
            return Err(err("--drain-timeout", "longer than one hour"));
        }
        if self.protocol_detect_timeout > Duration::from_secs(10) {
            return Err(err(
                "--protocol-detect-timeout",
                "longer than 10s would hold up server-first protocols",
            ));
        }
        let opaque_ports = self
            .opaque_ports
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .map(|p| match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(err(
                    "--opaque-ports",
                    format!("{p:?} is not a valid destination port"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !(0.0..=100.0).contains(&self.access_log) {
            return Err(err("--access-log", "a percentage, 0 to 100"));
        }
        if let Some(r) = &self.kubepods_cgroup_root
            && !r.is_absolute()
        {
            return Err(err("--kubepods-cgroup-root", "must be an absolute path"));
        }
        if !(0.0..=100.0).contains(&self.trace_sample_percent) {
            return Err(err("--trace-sample-percent", "a percentage, 0 to 100"));
        }
        if let Some(e) = &self.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(err(
                "--otlp-endpoint",
                format!("{e:?} is not an http:// or https:// URL"),
            ));
        }
        if self.metrics_label_budget == 0 {
            return Err(err("--metrics-label-budget", "must be at least 1"));
        }
        if self.connect_timeout.is_zero() {
            return Err(err("--connect-timeout", "must be greater than zero"));
        }
        if let Some(flag) = self.limits.invalid() {
            return Err(err(flag, "must be at least 1"));
        }
        let pin_dir = self
            .pin_dir
            .unwrap_or_else(|| self.bpffs.join("mesh").join(&self.node_name));
        if !pin_dir.starts_with(&self.bpffs) {
            return Err(err(
                "--pin-dir",
                format!(
                    "{} is not under --bpffs {}",
                    pin_dir.display(),
                    self.bpffs.display()
                ),
            ));
        }
        let mesh = match (
            &self.ctrl_addr,
            &self.trust_bundle,
            &self.bootstrap_token_file,
            &self.placement,
        ) {
            (None, None, None, None) => None,
            (None, ..) => {
                return Err(err(
                    "--ctrl-addr",
                    "--trust-bundle, --bootstrap-token-file and --placement need a controller",
                ));
            }
            (Some(addr), bundle, token, placement) => {
                if !(addr.starts_with("https://")) {
                    return Err(err(
                        "--ctrl-addr",
                        format!("{addr:?} must be an https:// URL"),
                    ));
                }
                let need = |v: &Option<PathBuf>, field: &'static str| {
                    v.clone()
                        .ok_or_else(|| err(field, "required with --ctrl-addr"))
                };
                mesh_api::identity::SpiffeId::new(&self.trust_domain, "x", "x")
                    .map_err(|e| err("--trust-domain", e.to_string()))?;
                if self.cert_ttl < Duration::from_secs(4) {
                    return Err(err("--cert-ttl", "shorter than 4 seconds"));
                }
                Some(MeshConfig {
                    ctrl_addr: addr.clone(),
                    ctrl_server_name: self.ctrl_server_name.clone(),
                    trust_bundle: need(bundle, "--trust-bundle")?,
                    bootstrap_token_file: need(token, "--bootstrap-token-file")?,
                    placement: placement.clone(),
                    trust_domain: self.trust_domain.clone(),
                    cert_ttl: self.cert_ttl,
                })
            }
        };
        let state_dir = self
            .state_dir
            .unwrap_or_else(|| PathBuf::from("/run/mesh-node").join(&self.node_name));
        Ok(Config {
            node_name: self.node_name,
            cgroup: self.cgroup,
            proxy_ipv4,
            proxy_ipv6,
            outbound_port: self.outbound_port,
            admin_addr: self.admin_addr,
            metrics_addr: self.metrics_addr,
            exclude_ports: self.exclude_ports,
            exclude_cidrs,
            bpffs: self.bpffs,
            pin_dir,
            state_dir,
            ebpf_object: self.ebpf_object,
            ebpf_log_level: self.ebpf_log_level,
            socket_acceleration: self.socket_acceleration == Switch::On,
            drain_timeout: self.drain_timeout,
            connect_timeout: self.connect_timeout,
            limits: self.limits,
            protocol_detect_timeout: self.protocol_detect_timeout,
            opaque_ports,
            metrics_label_budget: self.metrics_label_budget,
            access_log: self.access_log,
            otlp_endpoint: self.otlp_endpoint,
            kubepods_cgroup_root: self.kubepods_cgroup_root,
            trace_sample_percent: self.trace_sample_percent,
            on_exit: self.on_exit,
            inbound_program: self.inbound_program,
            path_escaped_slashes: self.path_escaped_slashes,
            worker_threads: match self.worker_threads {
                0 => default_worker_threads(),
                n => n,
            },
            mesh,
        })
    }
}

/// What an encoded `/` or `\` in a path becomes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EscapedSlashes {
    /// `400`: the request is refused.
    #[default]
    Reject,
    /// Forwarded as it is (`%2F`); rules see `%2F`, not `/`.
    Keep,
    /// Decoded to `/` before routing, policy and the pod.
    Decode,
}

/// The configured limits (flags of `mesh-node run`).
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, clap::Args)]
pub struct Limits {
    /// TLS handshakes in progress on the tunnel listener at once. At the limit the oldest one is
    /// cut: an honest handshake takes milliseconds, so what is cut is what idles.
    #[arg(long, env = "MESH_MAX_TUNNEL_HANDSHAKES", default_value_t = 1024)]
    pub max_tunnel_handshakes: usize,
    /// Connections one pod may have open through this proxy at once (outbound); more are reset.
    #[arg(long, env = "MESH_MAX_CONNECTIONS_PER_POD", default_value_t = 4096)]
    pub max_connections_per_pod: usize,
    /// HTTP requests one pod may have in flight through this proxy at once (outbound, over all
    /// its connections); more are answered 503 with flag `UO` at once, never queued.
    #[arg(long, env = "MESH_MAX_REQUESTS_PER_POD", default_value_t = 2048)]
    pub max_requests_per_pod: usize,
    /// Connections each admin or metrics listener serves at once; more are closed at accept.
    #[arg(long, env = "MESH_MAX_ADMIN_CONNECTIONS", default_value_t = 128)]
    pub max_admin_connections: usize,
    /// How long an authenticated tunnel connection may carry no stream before it is closed
    /// (GOAWAY, then close). Proxies drop their own pooled connections after 60 s idle; keep this
    /// above 75 s so that the peer closes first and never races a new stream against the GOAWAY.
    #[arg(long, env = "MESH_TUNNEL_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "120s")]
    #[serde(serialize_with = "humantime_serde_shim::serialize")]
    pub tunnel_idle_timeout: Duration,
}

impl Limits {
    /// The flag whose value cannot work, if one cannot.
    pub fn invalid(&self) -> Option<&'static str> {
        [
            (self.max_tunnel_handshakes, "--max-tunnel-handshakes"),
            (self.max_connections_per_pod, "--max-connections-per-pod"),
            (self.max_requests_per_pod, "--max-requests-per-pod"),
            (self.max_admin_connections, "--max-admin-connections"),
        ]
        .into_iter()
        .find(|(v, _)| *v == 0 || *v > tokio::sync::Semaphore::MAX_PERMITS)
        .map(|(_, flag)| flag)
        .or((self.tunnel_idle_timeout.is_zero()).then_some("--tunnel-idle-timeout"))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec![
            "mesh-node",
            "--node-name",
            "n1",
            "--cgroup",
            "/sys/fs/cgroup/pods",
        ];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv)
            .expect("flags parse")
            .run
            .validate()
    }

    #[test]
    fn valid_config_gets_defaults() {
        let c = parse(&["--proxy-ipv4", "10.1.0.1"]).unwrap();
        assert_eq!(c.proxy_ipv4, Some(Ipv4Addr::new(10, 1, 0, 1)));
        assert_eq!(c.outbound_port, 15001);
        assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/mesh/n1"));
        assert_eq!(c.state_dir, PathBuf::from("/run/mesh-node/n1"));
        assert_eq!(c.on_exit, OnExit::Keep);
        assert!(c.opaque_ports.contains(&3306), "{:?}", c.opaque_ports);
        let none = parse(&["--proxy-ipv4", "10.1.0.1", "--opaque-ports", ""]).unwrap();
        assert!(none.opaque_ports.is_empty(), "{:?}", none.opaque_ports);
    }

    #[test]
    fn rejections_name_the_field() {
        let cases: &[(&[&str], &str, &str)] = &[
            (&[], "--proxy-ipv4", "neither"),
            (
                &["--proxy-ipv4", "127.0.0.1"],
                "--proxy-ipv4",
                "not reachable",
            ),
            (&["--proxy-ipv4", "fd00::1"], "--proxy-ipv4", "IPv6"),
            (&["--proxy-ipv6", "10.0.0.1"], "--proxy-ipv6", "IPv4"),
            (&["--proxy-ipv6", "::"], "--proxy-ipv6", "not reachable"),
            (
                &["--proxy-ipv4", "10.0.0.1", "--exclude-cidrs", "10.0.0.0/33"],
                "--exclude-cidrs",
                "10.0.0.0/33",
            ),
            (
                &["--proxy-ipv4", "10.0.0.1", "--exclude-ports", "22,0"],
                "--exclude-ports",
                "port 0",
            ),
            (
                &["--proxy-ipv4", "10.0.0.1", "--opaque-ports", "6379,x"],
                "--opaque-ports",
                "\"x\"",
            ),
            (
                &[
                    "--proxy-ipv4",
                    "10.0.0.1",
                    "--protocol-detect-timeout",
                    "11s",
                ],
                "--protocol-detect-timeout",
                "longer than 10s",
            ),
            (
                &["--proxy-ipv4", "10.0.0.1", "--connect-timeout", "0s"],
                "--connect-timeout",
                "greater",
            ),
            (
                &["--proxy-ipv4", "10.0.0.1", "--placement", "/p"],
                "--ctrl-addr",
                "need a controller",
            ),
            (
                &["--proxy-ipv4", "10.0.0.1", "--ctrl-addr", "http://c:1"],
                "--ctrl-addr",
                "https://",
            ),
            (
                &["--proxy-ipv4", "10.0.0.1", "--ctrl-addr", "https://c:1"],
                "--trust-bundle",
                "required",
            ),
            (
                &[
                    "--proxy-ipv4",
                    "10.0.0.1",
                    "--ctrl-addr",
                    "https://c:1",
                    "--trust-bundle",
                    "/b",
                    "--placement",
                    "/p",
                ],
                "--bootstrap-token-file",
                "required",
            ),
            (
                &["--proxy-ipv4", "10.0.0.1", "--pin-dir", "/tmp/x"],
                "--pin-dir",
                "not under --bpffs",
            ),
        ];
        for (flags, field, reason) in cases {
            let e = parse(flags).expect_err(&format!("{flags:?} should fail"));
            assert_eq!(e.field, *field, "{flags:?}");
            assert!(e.reason.contains(reason), "{flags:?}: {e}");
        }
    }

    #[test]
    fn node_names_are_path_safe() {
        for bad in ["", "A", "a/b", "-a", ".a", "a b", &"x".repeat(64)] {
            assert!(!valid_node_name(bad), "{bad:?}");
        }
        for good in ["n1", "node-a.example", "0"] {
            assert!(valid_node_name(good), "{good:?}");
        }
    }

    #[test]
    fn cidrs_are_truncated_to_their_network() {
        let c = parse(&[
            "--proxy-ipv4",
            "10.0.0.1",
            "--exclude-cidrs",
            "10.1.2.3/16, fd00::5/64",
        ])
        .unwrap();
        assert_eq!(c.exclude_cidrs[0].to_string(), "10.1.0.0/16");
        assert_eq!(c.exclude_cidrs[1].to_string(), "fd00::/64");
    }
}
