//! fleetcall-signaling: the control plane.
//!
//! - [`protocol`]: the browser room protocol (JSON over WebSocket).
//! - [`ws`]: the WebSocket transport driving the SFU for browsers.

pub mod protocol;
pub mod ws;
