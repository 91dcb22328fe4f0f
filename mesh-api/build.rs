//! Generates the gRPC code with protox (a Rust protobuf compiler), so no `protoc` is needed.
fn main() {
    let protos = [
        "proto/mesh/ca/v1/ca.proto",
        "proto/mesh/config/v1/config.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"]).expect("proto files compile");
    tonic_prost_build::configure()
        .compile_fds(fds)
        .expect("gRPC code generation");
}
