//! The bridge's translation, sans-IO: what each controller command asks of
//! the SFU and what each SFU answer or event tells the controller, with the
//! one id map between them. No I/O and no time: [`super::run`] carries the
//! commands to the media workers asynchronously, and the deterministic
//! simulation (`sim/`) applies them to an SFU core in the same call. Both
//! translate here, so what the simulation proves holds for the bridge.

use std::collections::HashMap;

use fleetcall_sfu::{Joined, LeaveReason as SfuLeaveReason, ParticipantId, RoomId, SdpAnswer, SdpOffer, SfuError, SfuEvent};
use fleetcall_signaling::controller::{LeaveReason, RemovalReason, SfuNotice};
use fleetcall_signaling::ids::{CallId, ParticipantKey};
use fleetcall_signaling::sdp::Sdp;
use tracing::{debug, info};

/// Where the SFU placed a participant: at least its id in the SFU (the
/// media driver adds the worker).
pub trait Placement: Copy + Eq {
    /// The participant's id in the SFU.
    fn participant(&self) -> ParticipantId;
}

impl Placement for ParticipantId {
    fn participant(&self) -> ParticipantId {
        *self
    }
}

/// The SFU's room for a call: its namespace is the controller's call ids,
/// never a name a client chose.
pub fn room_of(call: CallId) -> RoomId {
    RoomId(format!("call-{}", call.0))
}

/// A join's offer, parsed; a bad one is refused before the SFU sees it.
pub fn join_offer(participant: ParticipantKey, sdp: &Sdp) -> Result<SdpOffer, SfuNotice> {
    SdpOffer::from_sdp_string(sdp.as_str())
        .map_err(|e| SfuNotice::JoinFailed { participant, error: format!("invalid SDP offer: {e}") })
}

/// A device's own offer (ICE restart), parsed.
pub fn device_offer(participant: ParticipantKey, sdp: &Sdp) -> Result<SdpOffer, SfuNotice> {
    SdpOffer::from_sdp_string(sdp.as_str())
        .map_err(|e| SfuNotice::NegotiationFailed { participant, error: format!("invalid SDP offer: {e}") })
}

/// A device's answer to an SFU offer, parsed.
pub fn device_answer(participant: ParticipantKey, sdp: &Sdp) -> Result<SdpAnswer, SfuNotice> {
    SdpAnswer::from_sdp_string(sdp.as_str())
        .map_err(|e| SfuNotice::NegotiationFailed { participant, error: format!("invalid SDP answer: {e}") })
}

/// What the SFU's answer to a device offer tells the controller.
pub fn offer_outcome(participant: ParticipantKey, result: Result<SdpAnswer, SfuError>) -> SfuNotice {
    match result {
        Ok(answer) => SfuNotice::Answer { participant, sdp: from_sfu(answer.to_sdp_string()) },
        Err(e) => SfuNotice::NegotiationFailed { participant, error: e.to_string() },
    }
}

/// What the SFU's answer to a device answer tells the controller: nothing.
/// An answer the SFU parsed but cannot apply makes it remove the
/// participant, which it reports itself (`Removed`); the other refusals
/// (gone already, no offer pending) change nothing.
pub fn answer_outcome(participant: ParticipantKey, result: Result<(), SfuError>) -> Option<SfuNotice> {
    if let Err(e) = result {
        debug!(%participant, error = %e, "answer refused");
    }
    None
}

/// The controller's leave reason as the SFU counts it.
pub fn to_sfu(reason: LeaveReason) -> SfuLeaveReason {
    match reason {
        LeaveReason::Requested => SfuLeaveReason::Requested,
        LeaveReason::SignalingClosed => SfuLeaveReason::SignalingClosed,
        LeaveReason::NegotiationFailed => SfuLeaveReason::NegotiationFailed,
        LeaveReason::Shutdown => SfuLeaveReason::Shutdown,
    }
}

/// Why the SFU removed a participant, as the controller hears it.
pub fn from_sfu_reason(reason: SfuLeaveReason) -> RemovalReason {
    match reason {
        SfuLeaveReason::IceTimeout => RemovalReason::IceTimeout,
        SfuLeaveReason::NegotiationFailed => RemovalReason::NegotiationFailed,
        SfuLeaveReason::Shutdown => RemovalReason::Shutdown,
        SfuLeaveReason::Closed => RemovalReason::Closed,
        // Only a Leave removes for these, and a participant is forgotten
        // before its Leave is applied, so they never reach here. A reason the
        // SFU gains later still means the participant is gone: reported as
        // its connection closing.
        _ => RemovalReason::Closed,
    }
}

/// An SDP the SFU wrote.
fn from_sfu(text: String) -> Sdp {
    // str0m writes at least the `v=` line.
    Sdp::new(text).expect("the SFU's SDP is never empty")
}

/// The one id map: each participation the controller names by its
/// `ParticipantKey`, and its placement in the SFU. Indexed both ways
/// (commands name keys, SFU events name SFU ids); both indexes change only
/// together, here.
#[derive(Debug)]
pub struct Participations<S> {
    sessions: HashMap<ParticipantKey, S>,
    keys: HashMap<ParticipantId, ParticipantKey>,
}

impl<S> Default for Participations<S> {
    fn default() -> Self {
        Participations { sessions: HashMap::new(), keys: HashMap::new() }
    }
}

impl<S: Placement> Participations<S> {
    /// A join was handed to the SFU: known before the SFU answers, so the
    /// commands that follow find it.
    pub fn insert(&mut self, key: ParticipantKey, session: S) {
        self.keys.insert(session.participant(), key);
        self.sessions.insert(key, session);
    }

    /// Where `key` is in the SFU.
    pub fn session(&self, key: ParticipantKey) -> Option<S> {
        self.sessions.get(&key).copied()
    }

    /// Whose participant `id` is.
    pub fn key(&self, id: ParticipantId) -> Option<ParticipantKey> {
        self.keys.get(&id).copied()
    }

    /// Forgets a participation (its `Leave` is being applied).
    pub fn forget(&mut self, key: ParticipantKey) -> Option<S> {
        let session = self.sessions.remove(&key)?;
        self.keys.remove(&session.participant());
        Some(session)
    }

    /// Participations mapped.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Every mapped participation.
    pub fn iter(&self) -> impl Iterator<Item = (ParticipantKey, S)> + '_ {
        self.sessions.iter().map(|(key, session)| (*key, *session))
    }

    /// The notice the SFU's answer to a join becomes.
    pub fn joined(&mut self, participant: ParticipantKey, session: S, result: Result<Joined, SfuError>) -> SfuNotice {
        match result {
            Ok(joined) => {
                debug!(%participant, sfu_participant = %session.participant(), "joined the SFU");
                let answer_sdp = from_sfu(joined.answer.to_sdp_string());
                SfuNotice::Joined { participant, answer_sdp, media_id: session.participant().0 }
            }
            Err(e) => {
                // Nothing was created; unless a Leave already forgot it.
                if self.session(participant) == Some(session) {
                    self.forget(participant);
                }
                SfuNotice::JoinFailed { participant, error: e.to_string() }
            }
        }
    }

    /// The notice an SFU event becomes, if the controller needs to hear it.
    pub fn translate(&mut self, event: SfuEvent) -> Option<SfuNotice> {
        match event {
            SfuEvent::Offer { participant, offer } => {
                let participant = self.key(participant)?;
                Some(SfuNotice::Offer { participant, sdp: from_sfu(offer.to_sdp_string()) })
            }
            SfuEvent::Connected { participant } => Some(SfuNotice::Connected { participant: self.key(participant)? }),
            SfuEvent::ActiveSpeakers { to, speakers } => {
                let participant = self.key(to)?;
                // Speakers no longer mapped are leaving: not worth naming.
                let speakers = speakers.iter().filter_map(|s| self.key(*s)).collect();
                Some(SfuNotice::ActiveSpeakers { participant, speakers })
            }
            SfuEvent::Removed { participant, reason } => {
                // A participant whose Leave was applied is forgotten already:
                // the SFU's report of it is the echo, not news.
                let key = self.keys.remove(&participant)?;
                self.sessions.remove(&key);
                info!(%key, reason = reason.as_str(), "SFU removed a participant");
                Some(SfuNotice::Removed { participant: key, reason: from_sfu_reason(reason) })
            }
            // Membership is the controller's business; it tells devices itself.
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use fleetcall_signaling::ids::{Epoch, SessionId};

    use super::*;

    fn key(epoch: u64) -> ParticipantKey {
        ParticipantKey { session: SessionId(1), epoch: Epoch(epoch) }
    }

    #[test]
    fn a_failed_join_forgets_only_its_own_participation() {
        let mut map = Participations::default();
        map.insert(key(1), ParticipantId(10));
        let notice = map.joined(key(1), ParticipantId(10), Err(SfuError::AtCapacity));
        assert!(matches!(notice, SfuNotice::JoinFailed { participant, .. } if participant == key(1)));
        assert!(map.is_empty());
        // A Leave forgot it and a new join of the same key took its place:
        // the old join's failure must not unmap the new one.
        map.insert(key(1), ParticipantId(11));
        let _ = map.joined(key(1), ParticipantId(10), Err(SfuError::AtCapacity));
        assert_eq!(map.session(key(1)), Some(ParticipantId(11)));
        assert_eq!(map.key(ParticipantId(11)), Some(key(1)));
    }

    #[test]
    fn events_of_forgotten_participants_are_not_news() {
        let mut map = Participations::default();
        map.insert(key(2), ParticipantId(20));
        assert_eq!(map.translate(SfuEvent::Connected { participant: ParticipantId(20) }), Some(SfuNotice::Connected { participant: key(2) }));
        assert_eq!(map.forget(key(2)), Some(ParticipantId(20)));
        assert_eq!(map.translate(SfuEvent::Removed { participant: ParticipantId(20), reason: SfuLeaveReason::Requested }), None);
        // The SFU's own removal is news once, and unmaps both ways.
        map.insert(key(3), ParticipantId(30));
        let removed = map.translate(SfuEvent::Removed { participant: ParticipantId(30), reason: SfuLeaveReason::IceTimeout });
        assert_eq!(removed, Some(SfuNotice::Removed { participant: key(3), reason: RemovalReason::IceTimeout }));
        assert!(map.is_empty() && map.session(key(3)).is_none());
        assert_eq!(map.translate(SfuEvent::Connected { participant: ParticipantId(30) }), None);
    }

    #[test]
    fn bad_sdp_is_refused_with_the_command_it_came_in() {
        let bad = Sdp::new("not sdp").unwrap();
        assert!(matches!(join_offer(key(1), &bad), Err(SfuNotice::JoinFailed { error, .. }) if error.starts_with("invalid SDP offer")));
        assert!(matches!(device_offer(key(1), &bad), Err(SfuNotice::NegotiationFailed { error, .. }) if error.starts_with("invalid SDP offer")));
        assert!(matches!(device_answer(key(1), &bad), Err(SfuNotice::NegotiationFailed { error, .. }) if error.starts_with("invalid SDP answer")));
        assert_eq!(room_of(CallId(42)), RoomId("call-42".into()));
    }

    #[test]
    fn reasons_keep_their_names_across() {
        for (ours, theirs) in [
            (LeaveReason::Requested, "requested"),
            (LeaveReason::SignalingClosed, "signaling_closed"),
            (LeaveReason::NegotiationFailed, "negotiation_failed"),
            (LeaveReason::Shutdown, "shutdown"),
        ] {
            assert_eq!(to_sfu(ours).as_str(), theirs);
        }
        for (theirs, ours) in [
            (SfuLeaveReason::IceTimeout, RemovalReason::IceTimeout),
            (SfuLeaveReason::Closed, RemovalReason::Closed),
            (SfuLeaveReason::NegotiationFailed, RemovalReason::NegotiationFailed),
            (SfuLeaveReason::Shutdown, RemovalReason::Shutdown),
        ] {
            assert_eq!(from_sfu_reason(theirs), ours);
        }
    }
}
