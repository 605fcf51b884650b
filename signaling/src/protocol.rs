//! The browser room protocol: JSON text frames on the WebSocket at `/ws`.
//!
//! Every frame is one JSON object with a `type` field. Unknown fields are
//! ignored; an unknown `type` gets an `error` reply and the connection stays
//! open. A frame larger than [`MAX_FRAME_BYTES`] is refused and the socket is
//! closed with code 1009.
//!
//! ```text
//! client                                   server
//!   | join {room, name, sdp: offer}          |
//!   |--------------------------------------->|  participant created in the SFU
//!   |  joined {participant, sdp: answer,     |
//!   |          participants: [...]}          |
//!   |<---------------------------------------|
//!   |          participant_joined {id, name} |  (to everyone else in the room)
//!   |  offer {sdp}   (server renegotiates    |
//!   |<--------------  when tracks appear) ---|
//!   | answer {sdp}                           |
//!   |--------------------------------------->|
//!   | leave                                  |
//!   |--------------------------------------->|
//!   |  left {reason: "requested"}            |
//!   |<---------------------------------------|
//! ```
//!
//! Media direction: the client's own tracks travel on the m-lines of its
//! join offer (`sendonly`; `sendrecv` is accepted but nothing is sent back on
//! it). Every other participant's track arrives on a server-offered `sendonly`
//! m-line whose msid stream id is that participant's id in decimal, so a
//! client maps a remote track to a participant with `event.streams[0].id`.
//! In rooms larger than the server's audio slots + 1, audio arrives instead
//! on a fixed number of `slot-N` streams whose speaker changes without
//! renegotiation (the RTP CSRC is the speaker's participant id), and
//! `active_speakers {speakers: [ids]}` names who is selected, the dominant
//! speaker first, in every room.
//! Only the server starts renegotiation after the join; a client offer (for an
//! ICE restart) is answered with `answer` and cancels a server offer in flight,
//! which the server sends again afterwards.

use serde::{Deserialize, Serialize};

/// Largest accepted text frame. SDP with audio and video is a few kilobytes.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

/// Longest room name, in bytes.
pub const MAX_ROOM_NAME: usize = 64;

/// Longest display name, in bytes.
pub const MAX_DISPLAY_NAME: usize = 64;

/// Messages a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ClientMessage {
    /// Join `room` (created on first join) with an SDP offer.
    Join {
        /// Room name: 1..=64 bytes of `[A-Za-z0-9_.-]`.
        room: String,
        /// Display name shown to others: 1..=64 bytes, no control characters.
        name: String,
        /// The client's SDP offer.
        sdp: String,
    },
    /// Answer to the server's latest `offer`.
    Answer {
        /// SDP answer.
        sdp: String,
    },
    /// Client-initiated renegotiation (ICE restart); answered with `answer`.
    Offer {
        /// SDP offer.
        sdp: String,
    },
    /// Leave the room. The server replies `left` and keeps the socket open.
    Leave,
}

/// Messages the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ServerMessage {
    /// The join succeeded.
    Joined {
        /// This client's participant id.
        participant: u64,
        /// The room joined.
        room: String,
        /// SDP answer to the join offer.
        sdp: String,
        /// Everyone else already in the room.
        participants: Vec<ParticipantInfo>,
    },
    /// Server-initiated renegotiation; reply with `answer`.
    Offer {
        /// SDP offer.
        sdp: String,
    },
    /// Answer to a client `offer`.
    Answer {
        /// SDP answer.
        sdp: String,
    },
    /// Someone joined the room.
    ParticipantJoined {
        /// Their participant id.
        id: u64,
        /// Their display name.
        name: String,
    },
    /// Someone left the room.
    ParticipantLeft {
        /// Their participant id.
        id: u64,
        /// Why, e.g. `left`, `ice_timeout`, `signaling_closed`.
        reason: String,
    },
    /// The room's active speakers changed: whose audio is forwarded, the
    /// dominant (most recent) speaker first. May include this client.
    ActiveSpeakers {
        /// Participant ids, the dominant speaker first.
        speakers: Vec<u64>,
    },
    /// This client is no longer in the room.
    Left {
        /// Why: `requested`, `ice_timeout`, `shutdown`, ...
        reason: String,
    },
    /// A request failed; the connection stays usable unless it is closed next.
    Error {
        /// Machine-readable code, see [`ErrorCode`].
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

/// A participant as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantInfo {
    /// Participant id (also the msid stream id of its tracks, in decimal).
    pub id: u64,
    /// Display name.
    pub name: String,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// Not JSON, not an object, or an unknown `type`.
    BadMessage,
    /// Frame larger than [`MAX_FRAME_BYTES`]; the socket is closed.
    MessageTooLarge,
    /// Room name empty, too long or with characters outside `[A-Za-z0-9_.-]`.
    InvalidRoom,
    /// Display name empty, too long or with control characters.
    InvalidName,
    /// The SDP could not be parsed or negotiated.
    InvalidSdp,
    /// The request needs a joined room.
    NotJoined,
    /// `join` sent while already in a room.
    AlreadyJoined,
    /// `answer` sent while no server offer is outstanding.
    NoPendingOffer,
    /// The server cannot take more participants.
    Overloaded,
    /// The server is shutting down.
    ShuttingDown,
}

/// Checks a room name against the rules in [`ClientMessage::Join`].
pub fn valid_room_name(room: &str) -> bool {
    !room.is_empty()
        && room.len() <= MAX_ROOM_NAME
        && room.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Checks a display name against the rules in [`ClientMessage::Join`].
pub fn valid_display_name(name: &str) -> bool {
    !name.trim().is_empty() && name.len() <= MAX_DISPLAY_NAME && !name.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_round_trips_as_tagged_json() {
        let json = r#"{"type":"join","room":"ward-3","name":"Nurse A","sdp":"v=0","extra":1}"#;
        let msg: ClientMessage = serde_json::from_str(json).unwrap();
        assert_eq!(
            msg,
            ClientMessage::Join { room: "ward-3".into(), name: "Nurse A".into(), sdp: "v=0".into() }
        );
        let leave: ClientMessage = serde_json::from_str(r#"{"type":"leave"}"#).unwrap();
        assert_eq!(leave, ClientMessage::Leave);
    }

    #[test]
    fn unknown_type_is_an_error() {
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"fly"}"#).is_err());
    }

    #[test]
    fn error_serializes_with_snake_case_code() {
        let msg = ServerMessage::Error { code: ErrorCode::InvalidSdp, message: "x".into() };
        let json = serde_json::to_string(&msg).unwrap();
        assert_eq!(json, r#"{"type":"error","code":"invalid_sdp","message":"x"}"#);
    }

    #[test]
    fn room_and_display_names_are_checked() {
        assert!(valid_room_name("ward-3.b_2"));
        assert!(!valid_room_name(""));
        assert!(!valid_room_name("a b"));
        assert!(!valid_room_name(&"x".repeat(MAX_ROOM_NAME + 1)));
        assert!(valid_display_name("Dr. Müller"));
        assert!(!valid_display_name("  "));
        assert!(!valid_display_name("a\nb"));
    }
}
