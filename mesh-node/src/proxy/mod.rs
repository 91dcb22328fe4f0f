//! The proxy's connections: redirected ones from pods (`outbound`), the tunnel between node
//! proxies (`tunnel`), deliveries to this node's pods (`inbound`, `pod_socket`), where each goes
//! (`route`), and what keeps them bounded, drained and handed over across upgrades.
pub(crate) mod coalesce;
pub(crate) mod drain;
pub(crate) mod handover;
pub(crate) mod inbound;
pub(crate) mod limits;
pub(crate) mod outbound;
pub(crate) mod pod_socket;
pub(crate) mod route;
pub(crate) mod tunnel;
