//! Compiles `tokenbroker/v1/*.proto` with protox (pure Rust, no system `protoc`) and writes the
//! encoded file descriptor set next to the generated code, for server reflection.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["tokenbroker/v1/broker.proto"];
    let fds = protox::compile(protos, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("tokenbroker_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::strict::StrictCodec")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=tokenbroker");
    Ok(())
}
