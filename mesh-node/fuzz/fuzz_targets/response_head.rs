//! See `mesh_node::fuzz::response_head`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_node::fuzz::response_head(data));
