//! Compiles `waxos.proto` with protox (pure Rust), so a fresh machine needs no `protoc`, and
//! keeps its file descriptor set (`FILE_DESCRIPTOR_SET`) for the host's gRPC reflection.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=waxos.proto");
    let fds = protox::compile(["waxos.proto"], ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("waxos_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
