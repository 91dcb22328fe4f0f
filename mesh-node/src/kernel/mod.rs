//! The kernel side: the redirect programs and their maps, the start-up probe of what this kernel
//! can do, BTF, the original destination of a redirected connection, socket acceleration.
pub(crate) mod accel;
pub(crate) mod btf;
pub mod ebpf;
pub(crate) mod orig_dst;
pub mod probe;
