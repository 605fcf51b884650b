//! fleetcall-sfu: the media plane.
