//! Authorization (`authz`: pure decisions; `enforce`: applying them to connections) and the
//! compiled routes of the controller's configuration.
pub(crate) mod authz;
pub(crate) mod enforce;
pub(crate) mod routes;
