//! fleetcall-signaling: the control plane.
//!
//! - [`protocol`]: the browser room protocol (JSON over WebSocket).
//! - [`pki`]: the installation CA and device enrollment (mTLS identities).
//! - [`ws`]: the WebSocket transport driving the SFU for browsers.

pub mod pki;
pub mod protocol;
pub mod ws;
