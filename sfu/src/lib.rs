//! fleetcall-sfu: the media plane's sans-IO core.
//!
//! A selective forwarding unit on [`str0m`]: rooms of participants, one
//! `str0m::Rtc` per participant (ICE-lite, DTLS-SRTP, RTP mode), and per
//! room the forwarding from each published track to each subscriber.
//!
//! [`Sfu`] takes one entry per input — a datagram
//! ([`Sfu::handle_datagram`]), a timeout ([`Sfu::handle_timeout`]), a
//! command ([`Sfu::join`], [`Sfu::accept_answer`], ...) and audio back from
//! a DSP pipeline ([`Sfu::handle_processed`]) — and has one output: after
//! every input, drain [`Sfu::poll_output`] until it says
//! [`Output::Timeout`]. It never reads a clock: time is an argument. Its
//! participants wake for named reasons (their `Rtc`'s deadline, silence,
//! ICE lost), never on an anonymous tick.
//!
//! - Demultiplexing is O(1): remote address -> participant, and for the
//!   first STUN request from an address, our ICE ufrag -> participant.
//! - Each room owns its forwarding: audio in rooms larger than
//!   `audio_slots + 1` goes by active-speaker selection ([`speakers`]) into a
//!   fixed number of audio slots per listener, so the cost of a packet does
//!   not grow with the room; smaller rooms, and video, go to every
//!   subscriber. Both are written by one path that keeps each outgoing
//!   stream continuous.
//! - Noise suppression is decided here ([`audio::SuppressionPolicy`]) and run
//!   elsewhere: the core hands out [`audio::AudioCommand`]s and takes back
//!   [`audio::ProcessedAudio`]; [`audio::TrackProcessor`] is the sans-IO
//!   processor a DSP thread runs per track.
//!
//! This crate depends on str0m, fleetcall-dsp, thiserror and tracing only:
//! no async runtime, sockets, metrics or serialization. The driver — worker
//! threads, batched UDP, the DSP thread pool, Prometheus series — is
//! fleetcall-media. A room lives on exactly one core, so forwarding never
//! takes a lock.

pub mod audio;
mod demux;
mod error;
pub mod histogram;
mod ids;
mod outlet;
mod participant;
mod room;
mod sfu;
pub mod speakers;
mod stats;
mod timer;

pub use error::SfuError;
pub use ids::{ParticipantId, RoomId, TrackKey};
pub use participant::Rights;
pub use sfu::{JoinRequest, Joined, LeaveReason, Output, Sfu, SfuConfig, SfuEvent, TrackOutlet, Transmit};
pub use stats::{DropCounts, SfuStats};
pub use str0m::change::{SdpAnswer, SdpOffer};
