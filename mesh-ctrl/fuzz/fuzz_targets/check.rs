//! `mesh-ctrl check` on arbitrary text: a report or an error, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mesh_ctrl::cli::check::check_text("fuzz", &String::from_utf8_lossy(data));
});
