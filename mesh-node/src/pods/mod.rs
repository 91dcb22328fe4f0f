//! The node's pods: enrollment, discovery from the kubelet's cgroups, the CNI plugin.
pub mod cni;
pub mod enroll;
pub(crate) mod follow;
pub(crate) mod kubepods;
