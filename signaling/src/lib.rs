//! fleetcall-signaling: the control plane.

pub mod pb;
pub mod protocol;
