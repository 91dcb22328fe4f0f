//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! A missing object is not a build error, so `cargo clippy`/`cargo test` work on a fresh checkout;
//! such a binary refuses to start unless given `--ebpf-object`, and says how to fix it.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let object = env::var_os("MESH_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/mesh-ebpf"));
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("mesh-ebpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).expect("writing OUT_DIR/mesh-ebpf.o"),
        Err(_) => {
            println!(
                "cargo:warning=no eBPF object at {}: run `cargo xtask build-ebpf`; this mesh-node needs --ebpf-object",
                object.display()
            );
            fs::write(&out, []).expect("writing OUT_DIR/mesh-ebpf.o");
        }
    }
}
