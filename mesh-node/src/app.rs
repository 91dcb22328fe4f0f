//! Wires the node proxy together. `build` returns the bound addresses and a handle to shut down,
//! so tests can run the whole proxy in-process with port 0.
use std::{net::SocketAddr, sync::Arc};

use tracing::info;

use crate::{
    admin::{self, Admin},
    config::{Config, OnExit},
    drain::{Drain, DrainOutcome},
    ebpf::{self, EbpfError, RedirectSpec, Redirector},
    enroll::{self, EnrollError, Enrollment},
    outbound::{self, Outbound, Stats},
    probe::{self, ProbeError},
    ready::Ready,
};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("kernel check failed")]
    Probe(#[from] ProbeError),
    #[error("eBPF")]
    Ebpf(#[from] EbpfError),
    #[error("cannot bind {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("enrollment state")]
    Enroll(#[from] EnrollError),
}

/// A running node proxy.
pub struct Bound {
    /// Where the outbound listener(s) accept redirected connections.
    pub outbound: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub redirector: Arc<Redirector>,
    pub pods: Arc<Enrollment>,
    config: Config,
    drain: Drain,
}

pub async fn build(config: Config) -> Result<Bound, AppError> {
    let ready = Ready::default();
    let not_attached = ready.register("ebpf");
    let not_listening = ready.register("listeners");

    probe::check(&config.cgroup, &config.bpffs)?;
    let object = ebpf::object_bytes(config.ebpf_object.as_deref())?;

    // Listen before attaching: a redirected connection must always find the proxy.
    let mut listeners = Vec::new();
    let mut port = config.outbound_port;
    let ips = config
        .proxy_ipv4
        .map(Into::into)
        .into_iter()
        .chain(config.proxy_ipv6.map(Into::into));
    for ip in ips {
        let addr = SocketAddr::new(ip, port);
        let l = outbound::bind(addr).map_err(|source| AppError::Bind {
            what: "outbound listener",
            addr,
            source,
        })?;
        // With port 0 the first bind picks it; the other family must use the same one.
        port = l
            .local_addr()
            .map_err(|source| AppError::Bind {
                what: "outbound listener",
                addr,
                source,
            })?
            .port();
        listeners.push(l);
    }
    let outbound_addrs: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();

    let spec = RedirectSpec {
        cgroup: config.cgroup.clone(),
        pin_dir: config.pin_dir.clone(),
        log_level: config.ebpf_log_level.as_aya(),
        proxy_ipv4: config.proxy_ipv4,
        proxy_ipv6: config.proxy_ipv6,
        proxy_port: port,
        exclude_ports: config.exclude_ports.clone(),
        exclude_cidrs: config.exclude_cidrs.clone(),
    };
    let redirector = Arc::new(Redirector::load(&object, &spec)?);
    drop(not_attached);
    info!(cgroup = %config.cgroup.display(), pin_dir = %config.pin_dir.display(), "redirect programs attached");

    let pods = Arc::new(Enrollment::open(&config.state_dir, redirector.clone())?);
    let stats = Arc::new(Stats::default());
    let drain = Drain::new();

    let proxy = Arc::new(Outbound {
        orig: redirector.clone(),
        pods: pods.clone(),
        stats: stats.clone(),
        connect_timeout: config.connect_timeout,
        own_addrs: outbound_addrs.clone(),
    });
    for l in listeners {
        tokio::spawn(proxy.clone().serve(l, drain.watch()));
    }
    drop(not_listening);

    let admin_listener = admin::bind(config.admin_addr)
        .await
        .map_err(|source| AppError::Bind {
            what: "admin endpoint",
            addr: config.admin_addr,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| AppError::Bind {
            what: "admin endpoint",
            addr: config.admin_addr,
            source,
        })?;
    let admin = Arc::new(Admin {
        config: config.clone(),
        ready,
        redirector: redirector.clone(),
        pods: pods.clone(),
        stats,
    });
    tokio::spawn(admin.serve(admin_listener, drain.watch()));
    info!(outbound = ?outbound_addrs, admin = %admin_addr, "node proxy serving");

    Ok(Bound {
        outbound: outbound_addrs,
        admin: admin_addr,
        redirector,
        pods,
        config,
        drain,
    })
}

impl Bound {
    /// Stops accepting, drains open connections until the deadline, then applies `--on-exit`.
    pub async fn shutdown(self) -> DrainOutcome {
        let Bound {
            config,
            drain,
            redirector,
            pods,
            ..
        } = self;
        info!(active = drain.active(), deadline = ?config.drain_timeout, "draining");
        let outcome = drain.drain(config.drain_timeout).await;
        info!(?outcome, "drained");
        drop(pods);
        drop(redirector);
        if config.on_exit == OnExit::Detach {
            detach(&config);
        } else {
            info!(
                "redirect programs stay attached: enrolled pods fail closed until a node proxy is back"
            );
        }
        outcome
    }
}

/// Uninstall: detach programs and forget enrollments.
pub fn detach(config: &Config) {
    match ebpf::detach(&config.pin_dir) {
        Ok(()) => info!(pin_dir = %config.pin_dir.display(), "redirect programs detached"),
        Err(e) => tracing::error!(error = %e, pin_dir = %config.pin_dir.display(), "detach failed"),
    }
    if let Err(e) = enroll::remove_state(&config.state_dir) {
        tracing::error!(error = %e, "removing enrollment state failed");
    }
}
