//! See `mesh_node::fuzz::relay`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_node::fuzz::relay(data));
