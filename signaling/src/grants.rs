//! Who may join what: the credential every connection presents, and the
//! grant it carries.
//!
//! A connection's [`Credential`] comes from its transport: the client
//! certificate on QUIC (its common name, its key, the room grants in its
//! `urn:fleetcall:room:` SAN URIs), a signed access token on WebSocket
//! ([`crate::tokens`]). The controller takes the identity from it, refuses a
//! second credential for a live identity, refuses revoked credentials, and
//! checks the [`Grant`] on every join and every offer.

use std::fmt;

use crate::Error;
use crate::ids::DeviceId;

/// Longest room name, in bytes.
pub const MAX_ROOM_NAME: usize = 64;

/// SAN URI prefix of a room grant in a device certificate.
pub const ROOM_URI_PREFIX: &str = "urn:fleetcall:room:";

/// A named room: 1..=64 bytes of `[A-Za-z0-9_.-]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RoomName(String);

impl RoomName {
    /// Checks and wraps a room name.
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        if name.is_empty() || name.len() > MAX_ROOM_NAME || !name.bytes().all(room_byte) {
            return Err(Error::InvalidRoom(name));
        }
        Ok(RoomName(name))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn room_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// Rooms a grant opens: one name (`ward-3`), or every name with a prefix
/// (`ward-*`; `*` alone is every room).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RoomPattern {
    /// Exactly this room.
    Exact(RoomName),
    /// Every room whose name starts with this (possibly empty) prefix.
    Prefix(String),
}

impl RoomPattern {
    /// Parses `name` or `prefix*`.
    pub fn parse(text: &str) -> Result<Self, Error> {
        match text.strip_suffix('*') {
            Some(prefix) if prefix.len() < MAX_ROOM_NAME && prefix.bytes().all(room_byte) => {
                Ok(RoomPattern::Prefix(prefix.to_owned()))
            }
            Some(_) => Err(Error::InvalidRoom(text.to_owned())),
            None => RoomName::new(text).map(RoomPattern::Exact),
        }
    }

    /// Whether this pattern opens `room`.
    pub fn covers(&self, room: &RoomName) -> bool {
        match self {
            RoomPattern::Exact(name) => name == room,
            RoomPattern::Prefix(prefix) => room.as_str().starts_with(prefix.as_str()),
        }
    }
}

impl fmt::Display for RoomPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoomPattern::Exact(name) => f.write_str(name.as_str()),
            RoomPattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// What a credential allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Named rooms it may join. Calls it is invited to need no room grant.
    pub rooms: Vec<RoomPattern>,
    /// May send media and place calls.
    pub publish: bool,
    /// May receive the others' media.
    pub subscribe: bool,
}

impl Grant {
    /// A device's grant: every call it is invited to, publish and subscribe,
    /// and the given rooms.
    pub fn device(rooms: Vec<RoomPattern>) -> Self {
        Grant { rooms, publish: true, subscribe: true }
    }

    /// Whether the grant opens `room`.
    pub fn covers(&self, room: &RoomName) -> bool {
        self.rooms.iter().any(|p| p.covers(room))
    }
}

/// Proves "the same credential" across connections: a digest of the
/// certificate's public key, or of the token's id. Never printed whole.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CredentialKey(pub [u8; 32]);

impl CredentialKey {
    /// The SHA-256 digest of `bytes` (a public key, a token id).
    pub fn digest(bytes: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        CredentialKey(key)
    }
}

impl fmt::Debug for CredentialKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CredentialKey({:02x}{:02x}{:02x}{:02x}..)", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

/// What a transport proved about a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    /// The identity the connection acts as (its device id).
    pub identity: DeviceId,
    /// What revocation names: the certificate's common name or the token's
    /// subject. The identity, except for guest links, whose connections are
    /// numbered (`guest #3`).
    pub subject: String,
    /// The same credential presented again has the same key.
    pub key: CredentialKey,
    /// Unix seconds when it was issued: a revocation of its subject at or
    /// after this moment revokes it.
    pub issued_at: u64,
    /// Unix seconds when it expires: a connection with it closes then.
    pub expires_at: u64,
    /// What it allows.
    pub grant: Grant,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomName {
        RoomName::new(name).unwrap()
    }

    #[test]
    fn room_names_are_checked() {
        assert!(RoomName::new("ward-3.north_1").is_ok());
        for bad in ["", "a b", "ward/3", "x\u{0}", &"x".repeat(MAX_ROOM_NAME + 1)] {
            assert!(RoomName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn patterns_open_exactly_their_rooms() {
        let exact = RoomPattern::parse("ward-3").unwrap();
        assert!(exact.covers(&room("ward-3")));
        assert!(!exact.covers(&room("ward-30")));
        assert!(!exact.covers(&room("call-1")));
        let prefix = RoomPattern::parse("ward-*").unwrap();
        assert!(prefix.covers(&room("ward-3")) && prefix.covers(&room("ward-30")));
        assert!(!prefix.covers(&room("war")));
        assert!(RoomPattern::parse("*").unwrap().covers(&room("anything")));
        assert_eq!(prefix.to_string(), "ward-*");
        for bad in ["", "a b*", "**", "ward/*"] {
            assert!(RoomPattern::parse(bad).is_err(), "{bad:?}");
        }
        let grant = Grant { rooms: vec![exact], publish: false, subscribe: true };
        assert!(grant.covers(&room("ward-3")) && !grant.covers(&room("ward-4")));
        assert!(!Grant::device(Vec::new()).covers(&room("ward-3")));
    }

    #[test]
    fn credential_keys_are_digests() {
        assert_eq!(CredentialKey::digest(b"a"), CredentialKey::digest(b"a"));
        assert_ne!(CredentialKey::digest(b"a"), CredentialKey::digest(b"b"));
        assert!(format!("{:?}", CredentialKey::digest(b"a")).ends_with("..)"));
    }
}
