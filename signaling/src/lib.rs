//! fleetcall-signaling: the control plane.
//!
//! * [`pb`]: the wire protocol `fleetcall.v1`, generated from
//!   `proto/fleetcall.proto` (the contract; see `PROTOCOL.md`).
//! * [`wire`]: framing for the QUIC stream and the JSON form for WebSocket.
//! * [`controller`]: the sans-IO owner of every device, session and call.
//! * [`backoff`]: the client's reconnect backoff (full jitter, capped).
//! * [`protocol`]: the earlier browser room protocol, kept until the
//!   WebSocket moves to `fleetcall.v1` (see `PROTOCOL.md`).

pub mod backoff;
pub mod controller;
mod error;
pub mod ids;
pub mod pb;
pub mod protocol;
pub mod wire;

pub use error::Error;
