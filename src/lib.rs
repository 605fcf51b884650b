//! The `fleetcall` server, as a library so that tests run the same server the
//! binary does: [`server::run`] starts every part, wires them together and
//! stops them. The binary (`main.rs`) parses the command line and calls it.
//!
//! Wiring only: the logic lives in the crates. `bridge` carries the
//! controller's messages to the media plane, `http` is the routes, `metrics`
//! assembles `/metrics`, `secrets` the data dir's keys, [`config`] the
//! configuration.

pub mod bridge;
pub mod config;
mod http;
mod metrics;
mod secrets;
pub mod server;
