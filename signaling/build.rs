//! Compiles `proto/fleetcall.proto` into Rust without a system `protoc`:
//! `protox` parses the schema into a descriptor set, `prost-build` generates
//! the message types from it and `pbjson-build` their serde impls in the
//! canonical proto3 JSON mapping (used on the WebSocket).

use std::{env, path::PathBuf};

fn main() {
    let proto = "proto/fleetcall.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed=build.rs");

    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let fds = protox::compile([proto], ["proto"]).unwrap_or_else(|e| panic!("{proto}: {e}"));
    let descriptor_bytes = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("fleetcall_descriptor.bin"), &descriptor_bytes)
        .expect("write descriptor set");

    let mut config = prost_build::Config::new();
    config.out_dir(&out);
    config
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("prost-build: {e}"));

    pbjson_build::Builder::new()
        .out_dir(&out)
        .register_descriptors(&descriptor_bytes)
        .expect("register descriptors")
        .ignore_unknown_fields()
        .build(&[".fleetcall.v1"])
        .expect("pbjson-build");
}
