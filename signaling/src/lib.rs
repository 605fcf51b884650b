//! fleetcall-signaling: the control plane.
//!
//! * [`pb`]: the wire protocol `fleetcall.v1`, generated from
//!   `proto/fleetcall.proto` (the contract; see `PROTOCOL.md`).
//! * [`wire`]: framing for the QUIC stream and the JSON form for WebSocket.
//! * [`controller`]: the sans-IO owner of every device, session and call.
//! * [`backoff`]: the client's reconnect backoff (full jitter, capped).
//! * [`client`]: the device client SDK (QUIC, heartbeats, resume).
//! * [`metrics`]: the control plane's Prometheus series.
//! * [`pki`]: the installation CA and device enrollment (mTLS identities).
//! * [`protocol`]: the earlier browser room protocol, kept until the
//!   WebSocket moves to `fleetcall.v1` (see `PROTOCOL.md`).
//! * [`quic`]: the device transport (QUIC, mTLS, one stream per device).
//! * [`service`]: the task that owns the controller, and the SFU adapter.
//! * [`ws`]: the browser room WebSocket (earlier protocol) driving the SFU.
//! * [`ws_device`]: the device protocol over WebSocket (JSON frames, token identity).

pub mod backoff;
pub mod client;
pub mod controller;
mod error;
pub mod ids;
pub mod metrics;
pub mod pb;
pub mod pki;
pub mod protocol;
pub mod quic;
pub mod service;
pub mod wire;
pub mod ws;
pub mod ws_device;

pub use error::Error;
