//! Identifier newtypes shared by the protocol and the controller.

use std::fmt;

use crate::Error;

/// Longest device id, in bytes.
pub const MAX_DEVICE_ID: usize = 128;

/// A transport connection, numbered by the driver. Never reused by a driver
/// while the controller may still know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// A device's (or browser user's) identity. It always comes from the transport
/// (client certificate, authenticated WebSocket session), never from a message
/// field, except as the *target* of a request (`Invite.callee`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(String);

impl DeviceId {
    /// Checks and wraps an id: 1..=128 bytes, no control characters, not only
    /// whitespace.
    pub fn new(id: impl Into<String>) -> Result<Self, Error> {
        let id = id.into();
        if id.trim().is_empty() || id.len() > MAX_DEVICE_ID || id.chars().any(char::is_control) {
            return Err(Error::InvalidDeviceId(id));
        }
        Ok(DeviceId(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A control session: survives reconnects that resume it within the grace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

/// A call (1:1 or group); one SFU room per call. Never reused by a controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CallId(pub u64);

/// A fencing number drawn from one counter per controller, never reused. Every
/// session attachment and every SFU participant gets a fresh one, so a late
/// timer or notice carrying an old epoch can never touch a newer thing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

/// Names one SFU participant: one device's media in one call, for one
/// participation. A device that leaves and rejoins gets a new key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ParticipantKey {
    /// The control session that owns this participant.
    pub session: SessionId,
    /// Fresh per participation.
    pub epoch: Epoch,
}

macro_rules! display_u64 {
    ($($t:ident => $p:literal),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($p, "{}"), self.0)
            }
        }
    )*};
}
display_u64!(ConnId => "conn-", SessionId => "session-", CallId => "call-", Epoch => "epoch-");

impl fmt::Display for ParticipantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.session, self.epoch.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_checked() {
        assert!(DeviceId::new("ward-3/bed-12").is_ok());
        assert!(DeviceId::new("").is_err());
        assert!(DeviceId::new("   ").is_err());
        assert!(DeviceId::new("a\u{0}b").is_err());
        assert!(DeviceId::new("x".repeat(MAX_DEVICE_ID + 1)).is_err());
        assert!(DeviceId::new("x".repeat(MAX_DEVICE_ID)).is_ok());
    }
}
