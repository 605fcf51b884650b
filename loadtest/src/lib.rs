//! fleetcall-loadtest: drives realistic fleet load through the real
//! protocols — devices on the signaling client SDK (the device protocol over
//! QUIC, or over WebSocket for rooms larger than a QUIC group call), and
//! str0m WebRTC peers sending Opus from a WAV file — and tells, in one
//! report, what held and what did not.
//!
//! Layout: sans-IO pieces ([`ledger`], [`histogram`], [`timers`],
//! [`audio`], [`scenario`], [`report`], the room core in [`room`]) and async
//! drivers ([`room`], [`calls`], [`idle`], [`janus`], on the media
//! [`sockets`]) under one orchestrator ([`run`]). The WebRTC peer is
//! `fleetcall_peer`'s, in RTP mode.

pub mod audio;
pub mod calls;
pub mod cli;
pub mod context;
pub mod control;
pub mod histogram;
pub mod http;
pub mod idle;
pub mod janus;
pub mod ledger;
pub mod outcome;
pub mod progress;
pub mod report;
pub mod room;
pub mod run;
pub mod scenario;
pub mod server;
pub mod sockets;
pub mod timers;
