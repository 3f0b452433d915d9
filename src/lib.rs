//! mediamesh node: the edge (HTTP, CLI, auth, telemetry) and the composition root that joins
//! the actors (`mediamesh-actors`) with the store (`mediamesh-cluster`).

pub mod admin_cli;
pub mod auth;
pub mod clock;
pub mod config;
pub mod directory;
pub mod http;
pub mod loadtest;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod signal;
pub mod synthetic;
pub mod telemetry;
pub mod turn;
pub mod usage;
