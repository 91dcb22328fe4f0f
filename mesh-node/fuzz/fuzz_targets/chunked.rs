//! See `mesh_node::fuzz::chunked`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_node::fuzz::chunked(data));
