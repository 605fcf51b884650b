//! The boundary between the controller and the SFU, as plain messages.
//!
//! Each call is one SFU room (a 1:1 call is a two-person room, a named room
//! a group call); the SFU's room ids are the controller's call ids, never a
//! name a client chose. Each device's participation in a call is one SFU
//! participant named by a [`ParticipantKey`] (session id + a fresh epoch),
//! so a notice about an old
//! participation can never touch a newer one: the controller ignores notices
//! whose key it no longer knows.
//!
//! Ordering contract for the adapter: commands are applied in the order the
//! controller emits them; notices for one participant are delivered in the
//! order the SFU produced them. `Leave` for an unknown key is a no-op in the
//! SFU (the controller may send it for a `Join` the SFU has not processed).

use crate::ids::{CallId, DeviceId, ParticipantKey};
use crate::pb::EndReason;

/// Controller -> SFU.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SfuCommand {
    /// Create the participant in `room` (creating the room on first join)
    /// from the device's offer. Answered by `Joined` or `JoinFailed`.
    Join {
        /// The call, one room per call.
        room: CallId,
        /// The new participant.
        participant: ParticipantKey,
        /// The device id, for logs and the dashboard.
        display_name: DeviceId,
        /// The device's SDP offer.
        offer_sdp: String,
        /// Whether its grant lets it send media: without, the SFU forwards
        /// nothing it sends.
        publish: bool,
        /// Whether its grant lets it receive the others' media.
        subscribe: bool,
    },
    /// The device's answer to a server-initiated offer (`SfuNotice::Offer`).
    Answer {
        /// Who answered.
        participant: ParticipantKey,
        /// SDP answer.
        sdp: String,
    },
    /// A device-initiated offer on an established participant (ICE restart).
    /// Answered by `SfuNotice::Answer`. Cancels a server offer in flight; the
    /// SFU offers again afterwards if it still needs to.
    Offer {
        /// Who offered.
        participant: ParticipantKey,
        /// SDP offer.
        sdp: String,
    },
    /// A device's own noise suppression setting (`None`: use the defaults).
    /// Applies to its current and future participants.
    SetSuppression {
        /// The device.
        device: DeviceId,
        /// On, off, or back to the room/server default.
        on: Option<bool>,
    },
    /// Remove the participant and every forwarding entry to and from it.
    Leave {
        /// Who leaves.
        participant: ParticipantKey,
        /// Why, for the SFU's logs and metrics.
        reason: EndReason,
    },
}

/// SFU -> controller.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SfuNotice {
    /// The participant exists; `answer_sdp` answers its join offer.
    Joined {
        /// The participant.
        participant: ParticipantKey,
        /// SDP answer for the device.
        answer_sdp: String,
        /// The participant's id inside the SFU: the msid stream id of its
        /// tracks and the CSRC of its audio in slots.
        media_id: u64,
    },
    /// The join was refused (bad SDP, room full, ...); nothing was created.
    JoinFailed {
        /// The participant.
        participant: ParticipantKey,
        /// Human-readable cause.
        error: String,
    },
    /// Server-initiated renegotiation (the room changed): relay to the device.
    Offer {
        /// The participant.
        participant: ParticipantKey,
        /// SDP offer.
        sdp: String,
    },
    /// Answer to a device-initiated offer (`SfuCommand::Offer`).
    Answer {
        /// The participant.
        participant: ParticipantKey,
        /// SDP answer.
        sdp: String,
    },
    /// ICE and DTLS completed: media flows.
    Connected {
        /// The participant.
        participant: ParticipantKey,
    },
    /// The call's active speakers changed: relay to the device as device ids.
    ActiveSpeakers {
        /// Recipient.
        participant: ParticipantKey,
        /// Selected speakers, the dominant one first.
        speakers: Vec<ParticipantKey>,
    },
    /// The SFU removed the participant on its own (ICE timeout, DTLS failure).
    Removed {
        /// The participant.
        participant: ParticipantKey,
        /// Human-readable cause.
        reason: String,
    },
}

impl SfuNotice {
    /// The participant the notice is about.
    pub fn participant(&self) -> ParticipantKey {
        match self {
            SfuNotice::Joined { participant, .. }
            | SfuNotice::JoinFailed { participant, .. }
            | SfuNotice::Offer { participant, .. }
            | SfuNotice::Answer { participant, .. }
            | SfuNotice::Connected { participant }
            | SfuNotice::ActiveSpeakers { participant, .. }
            | SfuNotice::Removed { participant, .. } => *participant,
        }
    }
}

impl SfuCommand {
    /// The participant the command is about, if it is about one.
    pub fn participant(&self) -> Option<ParticipantKey> {
        match self {
            SfuCommand::Join { participant, .. }
            | SfuCommand::Answer { participant, .. }
            | SfuCommand::Offer { participant, .. }
            | SfuCommand::Leave { participant, .. } => Some(*participant),
            SfuCommand::SetSuppression { .. } => None,
        }
    }
}
