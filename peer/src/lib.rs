//! fleetcall-peer: the WebRTC media peer on the device side of the media
//! plane, shared by the device agent, the load tester and the tests.
//!
//! - [`Peer`] is sans-IO, like the SFU core: datagrams, timeouts and
//!   commands in; [`Output`]s (datagrams, [`PeerEvent`]s, the next deadline)
//!   out. One str0m `Rtc` as a WebRTC client with full ICE: it offers one
//!   `sendonly` Opus track (optionally a VP8 one), answers every
//!   renegotiation offer the server sends, and reports each remote track by
//!   its msid stream id, which the SFU sets to the publisher's participant
//!   number. The server learns the peer's address from its STUN checks, so
//!   there is no trickle ICE. In [`Mode::Frames`] str0m packetizes and
//!   reassembles; in [`Mode::Rtp`] the peer writes and reports raw RTP.
//! - [`MediaPeer`] runs one peer on its own UDP socket in one tokio task.
//! - [`DtlsIdentity`] is the one certificate factory of every peer.
//! - [`wav`] reads and writes the 48 kHz mono WAV files peers play and record.

mod driver;
mod error;
mod identity;
mod peer;
pub mod wav;

pub use driver::{MediaConfig, MediaPeer, route_to};
pub use error::PeerError;
pub use identity::DtlsIdentity;
pub use peer::{
    AudioFrame, AudioLevel, Datagram, FRAME, FRAME_TICKS, Mode, Output, Peer, PeerConfig, PeerEvent,
    PeerStats, ReceivedFrame, ReceivedPacket, Sent,
};
pub use str0m::media::MediaKind;
