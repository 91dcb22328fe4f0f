//! Generates the test workload's gRPC code with protox (no `protoc` needed).
fn main() {
    let protos = ["proto/testpod/v1/greeter.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"]).expect("proto files compile");
    tonic_prost_build::configure()
        .compile_fds(fds)
        .expect("gRPC code generation");
}
