//! See `mesh_node::fuzz::path`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_node::fuzz::path(data));
