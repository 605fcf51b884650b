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
//! The controller decides; whatever carries these messages to the SFU (the
//! `fleetcall` binary's bridge) only translates them: it never leaves a
//! participant, retries or gives up on its own, and it reports what the SFU
//! did with the reasons below, never with free text the controller would
//! have to read.
//!
//! Ordering contract for the bridge: commands are applied in the order the
//! controller emits them; notices for one participant are delivered in the
//! order the SFU produced them. `Leave` for an unknown key is a no-op in the
//! SFU (the controller may send it for a `Join` the SFU has not processed).
//!
//! The enums here are exhaustive on purpose: a new command, notice or reason
//! must not compile until the bridge translates it.

use std::fmt;

use crate::ids::{CallId, DeviceId, ParticipantKey};
use crate::sdp::Sdp;

/// Controller -> SFU.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        offer_sdp: Sdp,
        /// Whether its grant lets it send media: without, the SFU forwards
        /// nothing it sends.
        publish: bool,
        /// Whether its grant lets it receive the others' media.
        subscribe: bool,
    },
    /// The device's answer to a server-initiated offer (`SfuNotice::Offer`).
    /// An answer the SFU cannot use is reported as `NegotiationFailed` or,
    /// if the SFU dropped the participant for it, `Removed`.
    Answer {
        /// Who answered.
        participant: ParticipantKey,
        /// SDP answer.
        sdp: Sdp,
    },
    /// A device-initiated offer on an established participant (ICE restart).
    /// Answered by `SfuNotice::Answer` or `NegotiationFailed`. Cancels a
    /// server offer in flight; the SFU offers again afterwards if it still
    /// needs to.
    Offer {
        /// Who offered.
        participant: ParticipantKey,
        /// SDP offer.
        sdp: Sdp,
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
        reason: LeaveReason,
    },
}

/// SFU -> controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SfuNotice {
    /// The participant exists; `answer_sdp` answers its join offer.
    Joined {
        /// The participant.
        participant: ParticipantKey,
        /// SDP answer for the device.
        answer_sdp: Sdp,
        /// The participant's id inside the SFU: the msid stream id of its
        /// tracks and the CSRC of its audio in slots.
        media_id: u64,
    },
    /// The join was refused (bad SDP, room full, ...); nothing was created.
    JoinFailed {
        /// The participant.
        participant: ParticipantKey,
        /// Human-readable cause, for the call's end detail.
        error: String,
    },
    /// Server-initiated renegotiation (the room changed): relay to the device.
    Offer {
        /// The participant.
        participant: ParticipantKey,
        /// SDP offer.
        sdp: Sdp,
    },
    /// Answer to a device-initiated offer (`SfuCommand::Offer`).
    Answer {
        /// The participant.
        participant: ParticipantKey,
        /// SDP answer.
        sdp: Sdp,
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
    /// The SFU could not use the participant's answer or offer
    /// (`SfuCommand::Answer`, `SfuCommand::Offer`): its media session cannot
    /// go on. The participant is still in the SFU until a `Leave`.
    NegotiationFailed {
        /// The participant.
        participant: ParticipantKey,
        /// Human-readable cause, for the call's end detail.
        error: String,
    },
    /// The SFU removed the participant on its own (ICE timeout, DTLS failure).
    Removed {
        /// The participant.
        participant: ParticipantKey,
        /// Why.
        reason: RemovalReason,
    },
}

/// Why the controller takes a participant out of the SFU (the SFU counts
/// removals by reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaveReason {
    /// Its call ended or it left the call: hangup, leave, a timeout, an
    /// operator, a revocation, or another member's failure.
    Requested,
    /// Its own control session was lost.
    SignalingClosed,
    /// The SFU could not use its SDP (after `SfuNotice::NegotiationFailed`).
    NegotiationFailed,
    /// The server is shutting down.
    Shutdown,
}

/// Why the SFU removed a participant on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemovalReason {
    /// No media accepted, or ICE disconnected, for longer than the grace.
    IceTimeout,
    /// The peer closed DTLS, or its connection failed.
    Closed,
    /// An SDP the SFU had parsed could not be applied.
    NegotiationFailed,
    /// The media plane is shutting down.
    Shutdown,
}

impl fmt::Display for RemovalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RemovalReason::IceTimeout => "ice timeout",
            RemovalReason::Closed => "closed",
            RemovalReason::NegotiationFailed => "negotiation failed",
            RemovalReason::Shutdown => "shutdown",
        })
    }
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
            | SfuNotice::NegotiationFailed { participant, .. }
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
