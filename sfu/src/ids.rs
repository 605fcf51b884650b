//! Identifiers of the things the SFU owns.

use std::fmt;

use str0m::media::Mid;

/// A room, named by its users (`ward-3`, `lobby`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(pub String);

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for RoomId {
    fn from(s: &str) -> Self {
        RoomId(s.to_owned())
    }
}

/// One participant's presence in one room. Assigned by the caller, unique per
/// process, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParticipantId(pub u64);

impl fmt::Display for ParticipantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A published track: one incoming m-line of one participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TrackKey {
    /// Who publishes it.
    pub publisher: ParticipantId,
    /// Its m-line in the publisher's session.
    pub mid: Mid,
}
