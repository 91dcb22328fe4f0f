//! Process-wide logging through `tracing`, with a filter that can be changed while the proxy
//! runs (`PUT /v1/log-level` on the admin port): debugging a live node must not need a restart,
//! which would drain its connections.
use mesh_api::sync::LockExt;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

struct Control {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// Installs the subscriber: `RUST_LOG` or `info`, text or JSON lines.
pub fn init(json: bool) {
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    // Operational logs on stderr: stdout carries the access log (`access_log`).
    if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init();
    }
    let _ = CONTROL.set(Control {
        handle,
        current: Mutex::new(initial),
    });
}

/// The filter in force (`None` when this process did not install the subscriber, e.g. tests
/// running the proxy in-process).
pub fn filter() -> Option<String> {
    CONTROL.get().map(|c| c.current.locked().clone())
}

/// Why a new log filter was not applied.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("logging is not controlled by this process")]
    NotControlled,
    #[error("invalid filter")]
    Invalid(#[source] tracing_subscriber::filter::ParseError),
    #[error("cannot apply the filter")]
    Reload(#[source] tracing_subscriber::reload::Error),
}

/// Replaces the filter (`RUST_LOG` syntax, e.g. `info,mesh_node::proxy::tunnel=debug`).
pub fn set_filter(directives: &str) -> Result<(), FilterError> {
    let control = CONTROL.get().ok_or(FilterError::NotControlled)?;
    let filter = EnvFilter::try_new(directives).map_err(FilterError::Invalid)?;
    control.handle.reload(filter).map_err(FilterError::Reload)?;
    *control.current.locked() = directives.to_string();
    tracing::info!(filter = directives, "log filter changed");
    Ok(())
}
