//! Generates the tonic/prost code for `proto/moetrain/v1/*.proto` into OUT_DIR.
//!
//! Choice (see README.md): we run Debian's `protoc` (package `protobuf-compiler`) at build time
//! instead of checking generated code in. etcd-client's own build script needs `protoc` anyway, so
//! every machine that builds the workspace has it; generating here means the code can never be stale.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/moetrain/v1/types.proto",
        "proto/moetrain/v1/coordinator.proto",
        "proto/moetrain/v1/worker.proto",
        "proto/moetrain/v1/store.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&files, &["proto"])?;
    Ok(())
}
