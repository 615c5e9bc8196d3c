//! Compiles the `.proto` files with `protox` (pure Rust), so a fresh machine needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/prometheus/remote.proto",
        "proto/prometheus/types.proto",
        "proto/google/rpc/status.proto",
        "proto/opamp/opamp.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
