//! O(1) demultiplexing of datagrams on a shared port to participants.
//!
//! A known remote address maps straight to its participant. The first packet
//! from a new address is a STUN binding request (ICE always starts with one);
//! its USERNAME is `<our ufrag>:<their ufrag>`, and our ufrag is unique per
//! participant, so it names the participant without trying every `Rtc`.

use std::collections::HashMap;
use std::net::SocketAddr;

use str0m::ice::StunMessage;

use crate::ids::ParticipantId;

/// What kind of datagram this is, by its first byte (RFC 7983).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DatagramKind {
    Stun,
    Dtls,
    Rtp,
    Unknown,
}

pub(crate) fn classify(datagram: &[u8]) -> DatagramKind {
    match datagram.first() {
        Some(0..=3) => DatagramKind::Stun,
        Some(20..=63) => DatagramKind::Dtls,
        Some(128..=191) => DatagramKind::Rtp,
        _ => DatagramKind::Unknown,
    }
}

/// The local (server) ufrag a STUN binding request is addressed to.
pub(crate) fn stun_local_ufrag(datagram: &[u8]) -> Option<&str> {
    let message = StunMessage::parse(datagram).ok()?;
    let (local, _remote) = message.username()?.split_once(':')?;
    Some(local)
}

/// Remote address and ufrag indexes. Each entry points at one participant; a
/// participant remembers its own keys so removal touches only those.
#[derive(Debug, Default)]
pub(crate) struct Demux {
    by_addr: HashMap<SocketAddr, ParticipantId>,
    by_ufrag: HashMap<String, ParticipantId>,
}

impl Demux {
    pub(crate) fn insert_ufrag(&mut self, ufrag: String, participant: ParticipantId) {
        self.by_ufrag.insert(ufrag, participant);
    }

    pub(crate) fn by_ufrag(&self, ufrag: &str) -> Option<ParticipantId> {
        self.by_ufrag.get(ufrag).copied()
    }

    pub(crate) fn by_addr(&self, addr: SocketAddr) -> Option<ParticipantId> {
        self.by_addr.get(&addr).copied()
    }

    /// Points `addr` at `participant`. Returns true when the mapping is new,
    /// so the participant can remember the address for its removal.
    pub(crate) fn insert_addr(&mut self, addr: SocketAddr, participant: ParticipantId) -> bool {
        self.by_addr.insert(addr, participant) != Some(participant)
    }

    /// Removes a participant's keys, but only those still pointing at it: an
    /// address reused by a newer participant stays with the newer one.
    pub(crate) fn remove(&mut self, participant: ParticipantId, ufrag: &str, addrs: &[SocketAddr]) {
        if self.by_ufrag.get(ufrag) == Some(&participant) {
            self.by_ufrag.remove(ufrag);
        }
        for addr in addrs {
            if self.by_addr.get(addr) == Some(&participant) {
                self.by_addr.remove(addr);
            }
        }
    }

    /// Moves a participant from `old` to `new` (an ICE restart changed its
    /// credentials); `old` goes only if it still points at it.
    pub(crate) fn replace_ufrag(&mut self, participant: ParticipantId, old: &str, new: String) {
        if self.by_ufrag.get(old) == Some(&participant) {
            self.by_ufrag.remove(old);
        }
        self.by_ufrag.insert(new, participant);
    }

    pub(crate) fn len(&self) -> (usize, usize) {
        (self.by_addr.len(), self.by_ufrag.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ice_restart_moves_the_participant_to_its_new_ufrag() {
        let mut demux = Demux::default();
        demux.insert_ufrag("old".into(), ParticipantId(1));
        demux.replace_ufrag(ParticipantId(1), "old", "new".into());
        assert_eq!((demux.by_ufrag("old"), demux.by_ufrag("new"), demux.len()), (None, Some(ParticipantId(1)), (0, 1)));
        // Another participant's key is never taken away.
        demux.insert_ufrag("theirs".into(), ParticipantId(2));
        demux.replace_ufrag(ParticipantId(1), "theirs", "newer".into());
        assert_eq!(demux.by_ufrag("theirs"), Some(ParticipantId(2)));
    }

    #[test]
    fn classify_follows_rfc7983() {
        assert_eq!(classify(&[0, 1]), DatagramKind::Stun);
        assert_eq!(classify(&[22, 254]), DatagramKind::Dtls);
        assert_eq!(classify(&[0x80, 111]), DatagramKind::Rtp);
        assert_eq!(classify(&[]), DatagramKind::Unknown);
        assert_eq!(classify(&[255]), DatagramKind::Unknown);
    }

    #[test]
    fn garbage_is_not_a_stun_username() {
        assert_eq!(stun_local_ufrag(&[0, 1, 0, 0]), None);
        assert_eq!(stun_local_ufrag(&[0; 64]), None);
    }

    #[test]
    fn removal_spares_keys_taken_over_by_a_newer_participant() {
        let mut demux = Demux::default();
        let addr: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let (old, new) = (ParticipantId(1), ParticipantId(2));
        assert!(demux.insert_addr(addr, old));
        assert!(!demux.insert_addr(addr, old));
        assert!(demux.insert_addr(addr, new));
        demux.remove(old, "x", &[addr]);
        assert_eq!(demux.by_addr(addr), Some(new));
    }
}
