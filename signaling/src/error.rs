//! The crate's one error type.

use crate::pb;

/// Everything that can go wrong in this crate's codecs and id parsing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A frame's length prefix (or a WebSocket text frame) exceeds the limit.
    /// Fatal for a byte stream: it cannot be resynchronised.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced (or actual) frame length in bytes.
        len: u64,
        /// The limit in force.
        max: usize,
    },
    /// The varint length prefix is longer than 10 bytes. Fatal.
    #[error("invalid frame length prefix")]
    BadLengthPrefix,
    /// A complete frame whose body is not a valid protobuf message. The stream
    /// stays in sync; the next frame can be decoded.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// A WebSocket text frame that is not a valid JSON message.
    #[error("malformed JSON frame: {0}")]
    MalformedJson(#[from] serde_json::Error),
    /// A message to encode is larger than the frame limit.
    #[error("message of {len} bytes is too large to send (limit {max})")]
    MessageTooLarge {
        /// Encoded length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A device id is empty, too long or contains control characters.
    #[error("invalid device id: {0:?}")]
    InvalidDeviceId(String),
    /// A room name or room pattern is not valid.
    #[error("invalid room {0:?}: use 1-64 characters of A-Z a-z 0-9 _ . - (a grant may end in *)")]
    InvalidRoom(String),
    /// An SDP offer or answer with no text.
    #[error("empty sdp")]
    EmptySdp,
    /// A controller configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(&'static str),
}

impl Error {
    /// True if the connection cannot go on after this error.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Error::FrameTooLarge { .. } | Error::BadLengthPrefix)
    }

    /// The protocol error code reported to the peer for this error.
    pub fn error_code(&self) -> pb::ErrorCode {
        match self {
            Error::FrameTooLarge { .. } | Error::MessageTooLarge { .. } => {
                pb::ErrorCode::FrameTooLarge
            }
            Error::BadLengthPrefix | Error::Malformed(_) | Error::MalformedJson(_) => {
                pb::ErrorCode::MalformedFrame
            }
            Error::InvalidDeviceId(_)
            | Error::InvalidRoom(_)
            | Error::EmptySdp
            | Error::InvalidConfig(_) => pb::ErrorCode::InvalidArgument,
        }
    }

    /// The close reason used when this error ends a connection.
    pub fn close_reason(&self) -> pb::CloseReason {
        match self {
            Error::FrameTooLarge { .. } | Error::MessageTooLarge { .. } => {
                pb::CloseReason::FrameTooLarge
            }
            _ => pb::CloseReason::ProtocolError,
        }
    }
}
