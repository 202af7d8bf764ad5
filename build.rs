//! Compiles the gRPC API in `proto/` into Rust message types with prost. `protox` parses the
//! .proto files in pure Rust, so building needs no system `protoc`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "gitplane/v1/repository.proto",
    "grpc/health/v1/health.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    for p in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    let files = protox::compile(PROTOS, [&root])?;
    prost_build::Config::new()
        // `bytes` fields as `bytes::Bytes`: blob chunks and patches are handed on without a copy.
        .bytes(["."])
        .compile_fds(files)?;
    Ok(())
}
