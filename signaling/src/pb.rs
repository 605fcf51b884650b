//! Types generated from `proto/fleetcall.proto` (package `fleetcall.v1`):
//! prost for the binary encoding, pbjson for the canonical proto3 JSON mapping.
#![allow(missing_docs, clippy::all, missing_debug_implementations)]

include!(concat!(env!("OUT_DIR"), "/fleetcall.v1.rs"));
include!(concat!(env!("OUT_DIR"), "/fleetcall.v1.serde.rs"));
