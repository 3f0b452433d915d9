//! Generated protobuf and gRPC types of mediamesh. No logic lives here (DESIGN.md §2): the
//! `.proto` files under `proto/` are the source, `build.rs` compiles them with protox and
//! tonic-prost-build.

/// Internal node-to-node service (`--cluster` port): raft transport, proposal forwarding, join.
pub mod cluster {
    /// Version 1 of the cluster service.
    pub mod v1 {
        tonic::include_proto!("mediamesh.cluster.v1");
    }
}
