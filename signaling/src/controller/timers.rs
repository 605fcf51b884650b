//! The controller's named timers.
//!
//! Every deadline is a [`Timer`] value naming what it is for and which
//! session/call/participant (with its epoch) it belongs to. The table keeps at
//! most one deadline per name; re-arming replaces it. When a timer fires, the
//! handler still checks that its target exists with the same epoch, so a timer
//! that outlived its target does nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use crate::ids::{CallId, ConnId, Epoch, ParticipantKey, SessionId};

/// What a deadline is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// A new connection must send `Hello` in time.
    Hello(ConnId),
    /// The connection's credential expires: the connection closes.
    CredentialExpiry(ConnId),
    /// Send the next heartbeat and count the previous one if unacked.
    Heartbeat(SessionId, Epoch),
    /// A detached session is swept when its resume grace ends.
    ResumeGrace(SessionId, Epoch),
    /// An invitation (1:1 callee or group invitee, by its session) expires.
    Ring(CallId, SessionId),
    /// A media negotiation step of one participant.
    Leg(ParticipantKey, LegTimer),
    /// An ended call's tombstone is forgotten.
    ForgetCall(CallId),
}

/// The per-phase media deadlines of one participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LegTimer {
    /// The device must send its joining `SdpOffer`.
    Offer,
    /// The SFU must accept the join (`Joined` / `JoinFailed`).
    SfuJoin,
    /// ICE + DTLS must complete after the answer (`Connected`).
    Connect,
    /// The device must answer a server (renegotiation) offer.
    Answer,
    /// The SFU must answer a device offer (ICE restart).
    SfuAnswer,
}

impl LegTimer {
    /// All leg timers, for cancelling a participant's deadlines.
    pub const ALL: [LegTimer; 5] = [
        LegTimer::Offer,
        LegTimer::SfuJoin,
        LegTimer::Connect,
        LegTimer::Answer,
        LegTimer::SfuAnswer,
    ];

    /// Human-readable phase name used in `CallEnded.detail`.
    pub fn describe(self) -> &'static str {
        match self {
            LegTimer::Offer => "device did not send its offer in time",
            LegTimer::SfuJoin => "media server did not accept the join in time",
            LegTimer::Connect => "media did not connect in time",
            LegTimer::Answer => "device did not answer the renegotiation offer in time",
            LegTimer::SfuAnswer => "media server did not answer the ICE restart in time",
        }
    }
}

/// Deadlines by name, ordered by time.
#[derive(Debug, Default)]
pub struct TimerTable {
    by_name: BTreeMap<Timer, Instant>,
    by_time: BTreeSet<(Instant, Timer)>,
}

impl TimerTable {
    /// Arms (or re-arms) `timer` at `at`.
    pub fn set(&mut self, timer: Timer, at: Instant) {
        if let Some(old) = self.by_name.insert(timer, at) {
            self.by_time.remove(&(old, timer));
        }
        self.by_time.insert((at, timer));
    }

    /// Disarms `timer` if armed.
    pub fn cancel(&mut self, timer: Timer) {
        if let Some(old) = self.by_name.remove(&timer) {
            self.by_time.remove(&(old, timer));
        }
    }

    /// The deadline of `timer`, if armed.
    pub fn get(&self, timer: Timer) -> Option<Instant> {
        self.by_name.get(&timer).copied()
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.by_time.first().map(|(at, _)| *at)
    }

    /// Removes and returns the earliest timer due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        let &(at, timer) = self.by_time.first()?;
        if at > now {
            return None;
        }
        self.by_time.remove(&(at, timer));
        self.by_name.remove(&timer);
        Some(timer)
    }

    /// Number of armed timers.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rearming_replaces_and_pop_is_in_time_order() {
        let t0 = Instant::now();
        let mut t = TimerTable::default();
        t.set(Timer::ForgetCall(CallId(1)), t0 + Duration::from_secs(5));
        t.set(Timer::Hello(ConnId(1)), t0 + Duration::from_secs(1));
        t.set(Timer::ForgetCall(CallId(1)), t0 + Duration::from_secs(2));
        assert_eq!(t.len(), 2);
        assert_eq!(t.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(t.pop_due(t0), None);
        assert_eq!(
            t.pop_due(t0 + Duration::from_secs(10)),
            Some(Timer::Hello(ConnId(1)))
        );
        assert_eq!(
            t.pop_due(t0 + Duration::from_secs(10)),
            Some(Timer::ForgetCall(CallId(1)))
        );
        assert_eq!(t.pop_due(t0 + Duration::from_secs(10)), None);
        t.set(Timer::Hello(ConnId(2)), t0);
        t.cancel(Timer::Hello(ConnId(2)));
        assert_eq!(t.next(), None);
    }
}
