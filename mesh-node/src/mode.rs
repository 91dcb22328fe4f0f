//! How this node proxy runs, decided once at start from its flags. The rest of the proxy asks
//! the mode what it has, rather than testing options nested in options.
use std::sync::{Arc, Mutex};

use mesh_api::placement::PlacementWatch;
use tokio::sync::watch;

use crate::{config::node::NodeConfig, config::subscribe, identity::Identities, proxy::tunnel};

/// The three ways a node proxy runs.
pub enum Mode {
    /// No controller: connections are relayed as plain TCP, without identities.
    Plain,
    /// Identities from the controller's certificate service, placement from a file; no routes
    /// or policy.
    Placement(Mesh),
    /// Identities, placement, routes and policy all from the controller.
    Controller(Mesh, ConfigFeed),
}

/// The identity side of a node: certificates, placement, tunnel figures.
pub struct Mesh {
    pub identities: Arc<Identities>,
    pub placement: PlacementWatch,
    pub tunnel_stats: Arc<tunnel::TunnelStats>,
}

/// The configuration serving, and the state of the stream it comes from.
pub struct ConfigFeed {
    pub config: watch::Receiver<Arc<NodeConfig>>,
    pub status: Arc<Mutex<subscribe::Status>>,
}

impl Mode {
    /// Identities and placement, unless the mode is plain.
    pub fn mesh(&self) -> Option<&Mesh> {
        match self {
            Mode::Plain => None,
            Mode::Placement(m) | Mode::Controller(m, _) => Some(m),
        }
    }

    /// The controller's configuration, when it streams one.
    pub fn feed(&self) -> Option<&ConfigFeed> {
        match self {
            Mode::Controller(_, f) => Some(f),
            _ => None,
        }
    }

    /// A receiver of the controller's configuration, when it streams one.
    pub fn config(&self) -> Option<watch::Receiver<Arc<NodeConfig>>> {
        self.feed().map(|f| f.config.clone())
    }
}
