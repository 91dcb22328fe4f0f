//! See `mesh_node::fuzz::config_update`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_node::fuzz::config_update(data));
