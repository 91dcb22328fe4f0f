//! See `mesh_node::fuzz::request_framing`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_node::fuzz::request_framing(data));
