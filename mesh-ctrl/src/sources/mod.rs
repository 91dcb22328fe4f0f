//! Where the controller's objects and pod placement come from.
pub mod kube;
pub mod local;
