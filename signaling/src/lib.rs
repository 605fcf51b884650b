//! fleetcall-signaling: the control plane.
//!
//! It knows no media plane: the controller speaks to the SFU in
//! [`controller::SfuCommand`]s and [`controller::SfuNotice`]s, and the
//! `fleetcall` binary's bridge carries them to the SFU. So this crate (and
//! the device SDK in it) builds without str0m, libopus or the SFU.
//!
//! * [`pb`]: the wire protocol `fleetcall.v1`, generated from
//!   `proto/fleetcall.proto` (the contract; see `PROTOCOL.md`).
//! * [`wire`]: framing for the QUIC stream and the JSON form for WebSocket.
//! * [`controller`]: the sans-IO owner of every device, session and call.
//! * [`backoff`]: the client's reconnect backoff (full jitter, capped).
//! * [`client`]: the device client SDK (QUIC, heartbeats, resume).
//! * [`grants`]: credentials and what they allow (rooms, publish, subscribe).
//! * [`pki`]: the installation CA and device enrollment (mTLS identities).
//! * [`tokens`]: signed, expiring access tokens for WebSocket clients.
//! * [`revocations`]: the revocation list in the data dir.
//! * [`quic`]: the device transport (QUIC, mTLS, one stream per device).
//! * [`sdp`]: session descriptions as the controller relays them.
//! * [`service`]: the task that owns the controller, and the controller's
//!   end of the SFU boundary ([`service::SfuLink`]).
//! * [`store`]: shared state for several nodes (memory or Redis), as ops
//!   and results; not wired into the controller yet.
//! * [`ws_device`]: the device protocol over WebSocket (JSON frames, token
//!   identity), for browsers and devices without a certificate.

pub mod backoff;
pub mod client;
pub mod controller;
mod error;
pub mod ids;
pub mod limits;
pub mod pb;
pub mod grants;
pub mod pki;
pub mod quic;
pub mod revocations;
pub mod sdp;
pub mod service;
pub mod store;
pub mod tokens;
pub mod wire;
pub mod ws_device;

pub use error::Error;
