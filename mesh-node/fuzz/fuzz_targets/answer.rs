//! See `mesh_node::fuzz::answer`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_node::fuzz::answer(data));
