//! See `mesh_node::fuzz::headers`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_node::fuzz::headers(data));
