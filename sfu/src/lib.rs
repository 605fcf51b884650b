//! fleetcall-sfu: the media plane.
//!
//! A selective forwarding unit on [`str0m`]: rooms of participants, one
//! `str0m::Rtc` per participant (ICE-lite, DTLS-SRTP, RTP mode), and a
//! forwarding table from each published track to each subscriber.
//!
//! - [`Sfu`] is the sans-IO core: datagrams, timeouts and commands in;
//!   datagrams, events and the next deadline out. It never reads a clock.
//!   Demultiplexing is O(1): remote address -> participant, and for the first
//!   STUN request from an address, our ICE ufrag -> participant.
//! - [`driver`] runs cores on worker threads with batched UDP I/O.
//! - [`client`] is the device side: a media peer publishing one Opus track.
//!
//! Rooms live on exactly one worker, so forwarding never takes a lock.
//!
//! Audio in rooms larger than `audio_slots + 1` is forwarded by active-speaker
//! selection ([`speakers`]) into a fixed number of audio slots per listener
//! ([`slots`]), so the cost of a packet does not grow with the room.

pub mod audio;
pub mod client;
mod demux;
pub mod driver;
mod error;
pub mod histogram;
pub mod metrics;
mod ids;
mod participant;
mod sfu;
pub mod slots;
pub mod speakers;

pub use driver::{DriverConfig, Session, SfuDriver, SfuHandle};
pub use error::SfuError;
pub use ids::{ParticipantId, RoomId};
pub use participant::TrackKey;
pub use sfu::{DropCounts, JoinRequest, Joined, LeaveReason, Rights, Sfu, SfuConfig, SfuEvent, SfuStats, Transmit};
pub use str0m::change::{SdpAnswer, SdpOffer};
