//! Generates the gRPC code from `proto/` with a vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    // The descriptors also go to gRPC server reflection (`qx_proto::FILE_DESCRIPTOR_SET`).
    let descriptors = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("quantix_descriptor.bin");
    tonic_prost_build::configure().file_descriptor_set_path(descriptors).compile_protos(
        &[
            "proto/quantix/node/v1/node.proto",
            "proto/quantix/node/v1/host.proto",
            "proto/quantix/node/v1/migration.proto",
            "proto/quantix/node/v1/guest.proto",
            "proto/quantix/node/v1/snapshot.proto",
            "proto/quantix/node/v1/security_group.proto",
            "proto/quantix/controlplane/v1/controlplane.proto",
        ],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
