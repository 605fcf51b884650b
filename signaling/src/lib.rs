//! fleetcall-signaling: the control plane.

pub mod protocol;
