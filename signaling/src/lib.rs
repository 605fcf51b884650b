//! fleetcall-signaling: the control plane.
//!
//! * [`pb`]: the wire protocol `fleetcall.v1`, generated from
//!   `proto/fleetcall.proto` (the contract; see `PROTOCOL.md`).
//! * [`wire`]: framing for the QUIC stream and the JSON form for WebSocket.
//! * [`controller`]: the sans-IO owner of every device, session and call.
//! * [`backoff`]: the client's reconnect backoff (full jitter, capped).
//! * [`client`]: the device client SDK (QUIC, heartbeats, resume).
//! * [`metrics`]: the control plane's Prometheus series.
//! * [`grants`]: credentials and what they allow (rooms, publish, subscribe).
//! * [`pki`]: the installation CA and device enrollment (mTLS identities).
//! * [`tokens`]: signed, expiring access tokens for WebSocket clients.
//! * [`revocations`]: the revocation list in the data dir.
//! * [`quic`]: the device transport (QUIC, mTLS, one stream per device).
//! * [`service`]: the task that owns the controller, and the SFU adapter.
//! * [`ws_device`]: the device protocol over WebSocket (JSON frames, token
//!   identity), for browsers and devices without a certificate.

pub mod backoff;
pub mod client;
pub mod controller;
mod error;
pub mod ids;
pub mod metrics;
pub mod pb;
pub mod grants;
pub mod pki;
pub mod quic;
pub mod revocations;
pub mod service;
pub mod tokens;
pub mod wire;
pub mod ws_device;

pub use error::Error;
