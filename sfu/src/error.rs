//! The sfu crate's one error type.

use crate::ids::{ParticipantId, RoomId};

/// Why a command to the SFU failed. Network input never produces one of these:
/// bad datagrams are dropped and counted instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SfuError {
    /// The SDP text did not parse or could not be negotiated.
    #[error("invalid SDP: {0}")]
    InvalidSdp(String),
    /// No such participant (it left or was removed).
    #[error("unknown participant {0}")]
    UnknownParticipant(ParticipantId),
    /// The caller reused a participant id.
    #[error("participant {0} already exists")]
    DuplicateParticipant(ParticipantId),
    /// An answer arrived while no server offer was outstanding.
    #[error("no offer is pending for participant {0}")]
    NoPendingOffer(ParticipantId),
    /// The room holds its configured maximum.
    #[error("room {0} is full")]
    RoomFull(RoomId),
    /// The offer publishes more tracks than `SfuConfig::max_tracks_per_participant`.
    #[error("the offer publishes {offered} tracks; at most {limit} are allowed")]
    TooManyTracks {
        /// Tracks the offer sends on.
        offered: usize,
        /// The configured maximum.
        limit: usize,
    },
    /// This SFU holds its configured maximum of participants.
    #[error("the SFU is at capacity")]
    AtCapacity,
    /// The worker that owns the room has as many commands waiting as it
    /// may queue: a driver refuses more at once instead of letting them
    /// (and everyone's joins behind them) wait. The core never does.
    #[error("the media worker is overloaded; try again later")]
    Overloaded,
    /// The core is out of reach: a driver reports this when the worker that
    /// owns the core has stopped (shutting down). The core never does.
    #[error("the SFU is shutting down")]
    ShuttingDown,
}
