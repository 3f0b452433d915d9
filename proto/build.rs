//! Generates the Rust code for every `.proto` file under `proto/` with protox (a pure-Rust
//! protobuf compiler, so no system `protoc` is needed) and tonic-prost-build.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from("proto");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&proto_dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "proto") {
            files.push(path);
        }
    }
    files.sort();
    println!("cargo:rerun-if-changed=proto");
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [&proto_dir])?;
    // The signal messages also have a JSON form (the WebSocket carries it): serde on every type,
    // proto3 defaults for missing fields; `signal::v1::json` flattens each oneof into its
    // message so a message reads `{"id": 1, "join": {...}}`.
    const SIGNAL: &str = ".mediamesh.signal.v1";
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // `Signal/Connect` would clash with the generated `connect` constructor; clients build
        // their `Channel` themselves and call `new`.
        .build_transport(false)
        .type_attribute(SIGNAL, "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(SIGNAL, "#[serde(default)]")
        .enum_attribute(SIGNAL, "#[serde(rename_all = \"snake_case\")]")
        // Relayed RTP goes from the marshalled packet to the wire and back without a copy.
        .bytes(".mediamesh.mesh.v1.RelayPacket.rtp")
        .compile_fds(descriptors)?;
    Ok(())
}
