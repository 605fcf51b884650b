//! Media negotiation between each device and the SFU, relayed over the
//! control stream, with a deadline for every step.

use std::time::Instant;

use tracing::{debug, info};

use super::{
    Cause, Controller, Handled, LeaveReason, Leg, LegPhase, LegTimer, Link, Output, Reject,
    SfuCommand, SfuNotice, Timer,
};
use crate::ids::{CallId, DeviceId, ParticipantKey, SessionId};
use crate::pb::{self, EndReason, ErrorCode, ParticipantStatus, server_frame};
use crate::sdp::Sdp;

impl Controller {
    /// A fresh participation for `device` in `call`, waiting for its offer.
    pub(super) fn new_leg(
        &mut self,
        now: Instant,
        sid: SessionId,
        call: CallId,
        device: &DeviceId,
    ) -> Leg {
        let key = ParticipantKey {
            session: sid,
            epoch: self.alloc_epoch(),
        };
        self.legs.insert(key, (call, device.clone()));
        self.timers.set(
            Timer::Leg(key, LegTimer::Offer),
            now + self.config.offer_timeout,
        );
        Leg {
            key,
            phase: LegPhase::AwaitingOffer,
            in_sfu: false,
            join_revision: 0,
            media_id: 0,
            server_offer: None,
            device_offer: None,
            next_revision: 1,
        }
    }

    /// Ends a participation: its deadlines go, and the SFU drops it and all
    /// its forwarding entries.
    pub(super) fn teardown_leg(&mut self, leg: Leg, reason: LeaveReason) {
        for which in LegTimer::ALL {
            self.timers.cancel(Timer::Leg(leg.key, which));
        }
        self.legs.remove(&leg.key);
        if leg.in_sfu {
            self.out.push_back(Output::Sfu(SfuCommand::Leave {
                participant: leg.key,
                reason,
            }));
        }
    }

    /// The sender's participation in `call_id`, for SDP requests.
    fn sender_leg(
        &self,
        sid: SessionId,
        call_id: u64,
        session_id: u64,
    ) -> Result<(CallId, DeviceId, ParticipantKey), Reject> {
        if session_id != 0 && session_id != sid.0 {
            return Err(
                Reject::new(ErrorCode::StaleSession, "message names another session").call(call_id),
            );
        }
        let device = self
            .sessions
            .get(&sid)
            .map(|s| s.device.clone())
            .ok_or_else(|| Reject::new(ErrorCode::NotRegistered, "no session"))?;
        let id = CallId(call_id);
        let call = self
            .calls
            .get(&id)
            .ok_or_else(|| Reject::new(ErrorCode::UnknownCall, "no such call").call(call_id))?;
        if !call.is_live() {
            return Err(Reject::new(ErrorCode::CallEnded, "the call has ended").call(call_id));
        }
        let member = call
            .members
            .get(&device)
            .filter(|m| m.session == sid)
            .ok_or_else(|| Reject::new(ErrorCode::NotInCall, "not in this call").call(call_id))?;
        let leg = member.leg().ok_or_else(|| {
            Reject::new(ErrorCode::InvalidState, "answer or join the call first").call(call_id)
        })?;
        Ok((id, device, leg.key))
    }

    /// The SDP of a device's request, read once here; only an empty one is
    /// refused (the SFU judges the rest).
    fn read_sdp(call_id: u64, sdp: String) -> Result<Sdp, Reject> {
        Sdp::new(sdp).map_err(|_| Reject::new(ErrorCode::InvalidArgument, "empty sdp").call(call_id))
    }

    /// A credential that may not publish never sends: an SDP that would is
    /// refused (the SFU also forwards nothing such a participant sends).
    fn check_publish(&self, sid: SessionId, call_id: u64, sdp: &Sdp) -> Result<(), Reject> {
        let publish = self.sessions.get(&sid).is_some_and(|s| s.credential.grant.publish);
        if !publish && sdp.sends_media() {
            return Err(Reject::new(
                ErrorCode::Forbidden,
                "this credential may only listen: make every audio and video m-line recvonly",
            )
            .call(call_id));
        }
        Ok(())
    }

    fn leg_mut(&mut self, key: ParticipantKey) -> Option<&mut Leg> {
        let (call, device) = self.legs.get(&key)?;
        let leg = self
            .calls
            .get_mut(call)?
            .members
            .get_mut(device)?
            .leg_mut()?;
        (leg.key == key).then_some(leg)
    }

    pub(super) fn on_sdp_offer(
        &mut self,
        now: Instant,
        sid: SessionId,
        m: pb::SdpOffer,
    ) -> Handled {
        let (call, device, key) = self.sender_leg(sid, m.call_id, m.session_id)?;
        let sdp = Self::read_sdp(m.call_id, m.sdp)?;
        self.check_publish(sid, m.call_id, &sdp)?;
        let grant = self.sessions.get(&sid).map(|s| s.credential.grant.clone());
        let (publish, subscribe) = grant.map_or((false, false), |g| (g.publish, g.subscribe));
        let sfu_timeout = self.config.sfu_timeout;
        let leg = self
            .leg_mut(key)
            .ok_or_else(|| Reject::new(ErrorCode::InvalidState, "no participation"))?;
        if leg.phase != LegPhase::AwaitingOffer {
            return Err(Reject::new(
                ErrorCode::InvalidState,
                "media already offered; use ice_restart",
            )
            .call(m.call_id));
        }
        leg.phase = LegPhase::Joining;
        leg.in_sfu = true;
        leg.join_revision = m.revision;
        self.timers.cancel(Timer::Leg(key, LegTimer::Offer));
        self.timers
            .set(Timer::Leg(key, LegTimer::SfuJoin), now + sfu_timeout);
        debug!(%call, %device, %key, "join offer to sfu");
        self.out.push_back(Output::Sfu(SfuCommand::Join {
            room: call,
            participant: key,
            display_name: device,
            offer_sdp: sdp,
            publish,
            subscribe,
        }));
        Ok(m.call_id)
    }

    pub(super) fn on_sdp_answer(
        &mut self,
        _now: Instant,
        sid: SessionId,
        m: pb::SdpAnswer,
    ) -> Handled {
        let (_, _, key) = self.sender_leg(sid, m.call_id, m.session_id)?;
        let leg = self
            .leg_mut(key)
            .ok_or_else(|| Reject::new(ErrorCode::InvalidState, "no participation"))?;
        match &leg.server_offer {
            None => {
                return Err(
                    Reject::new(ErrorCode::NoPendingOffer, "no server offer outstanding")
                        .call(m.call_id),
                );
            }
            Some(rev) if *rev != m.revision => {
                return Err(Reject::new(
                    ErrorCode::StaleRevision,
                    format!(
                        "answer to revision {}, outstanding offer is {rev}",
                        m.revision
                    ),
                )
                .call(m.call_id));
            }
            Some(_) => {}
        }
        let sdp = Self::read_sdp(m.call_id, m.sdp)?;
        self.check_publish(sid, m.call_id, &sdp)?;
        let Some(leg) = self.leg_mut(key) else {
            return Err(Reject::new(ErrorCode::InvalidState, "no participation"));
        };
        leg.server_offer = None;
        self.timers.cancel(Timer::Leg(key, LegTimer::Answer));
        self.out.push_back(Output::Sfu(SfuCommand::Answer {
            participant: key,
            sdp,
        }));
        Ok(m.call_id)
    }

    pub(super) fn on_ice_restart(
        &mut self,
        now: Instant,
        sid: SessionId,
        m: pb::IceRestart,
    ) -> Handled {
        let (_, _, key) = self.sender_leg(sid, m.call_id, m.session_id)?;
        let sdp = Self::read_sdp(m.call_id, m.sdp)?;
        self.check_publish(sid, m.call_id, &sdp)?;
        let sfu_timeout = self.config.sfu_timeout;
        let leg = self
            .leg_mut(key)
            .ok_or_else(|| Reject::new(ErrorCode::InvalidState, "no participation"))?;
        if !matches!(leg.phase, LegPhase::Connecting | LegPhase::Connected) {
            return Err(
                Reject::new(ErrorCode::InvalidState, "media not negotiated yet").call(m.call_id),
            );
        }
        leg.device_offer = Some(m.revision);
        // The device's offer wins over a server offer in flight; the SFU
        // offers again once this exchange is done.
        let cancelled = leg.server_offer.take().is_some();
        if cancelled {
            self.timers.cancel(Timer::Leg(key, LegTimer::Answer));
        }
        self.timers
            .set(Timer::Leg(key, LegTimer::SfuAnswer), now + sfu_timeout);
        self.out.push_back(Output::Sfu(SfuCommand::Offer {
            participant: key,
            sdp,
        }));
        Ok(m.call_id)
    }

    pub(super) fn on_sfu_notice(&mut self, now: Instant, notice: SfuNotice) {
        let key = notice.participant();
        let Some((call, device)) = self.legs.get(&key).cloned() else {
            debug!(%key, ?notice, "sfu notice for an unknown participant ignored");
            self.stats.stale_sfu_notices += 1;
            return;
        };
        let attached = matches!(
            self.sessions.get(&key.session).map(|s| s.link),
            Some(Link::Attached(_))
        );
        let config = self.config.clone();
        let Some(leg) = self.leg_mut(key) else {
            self.stats.stale_sfu_notices += 1;
            return;
        };
        match notice {
            SfuNotice::Joined { answer_sdp, media_id, .. } => {
                if leg.phase != LegPhase::Joining {
                    self.stats.stale_sfu_notices += 1;
                    return;
                }
                leg.phase = LegPhase::Connecting;
                leg.media_id = media_id;
                let revision = leg.join_revision;
                self.timers.cancel(Timer::Leg(key, LegTimer::SfuJoin));
                self.timers.set(
                    Timer::Leg(key, LegTimer::Connect),
                    now + config.connect_timeout,
                );
                self.push(
                    key.session,
                    server_frame::Kind::SdpAnswer(pb::SdpAnswer {
                        call_id: call.0,
                        session_id: key.session.0,
                        revision,
                        sdp: answer_sdp.into_string(),
                    }),
                );
            }
            SfuNotice::JoinFailed { error, .. } => {
                leg.in_sfu = false;
                info!(%call, %device, %error, "sfu refused join");
                let cause = Cause::new(EndReason::MediaFailed)
                    .by(&device)
                    .detail(format!("media server refused: {error}"));
                self.leave(now, call, &device, cause);
            }
            SfuNotice::Removed { reason, .. } => {
                leg.in_sfu = false;
                info!(%call, %device, %reason, "sfu removed participant");
                let cause = Cause::new(EndReason::MediaFailed)
                    .by(&device)
                    .detail(format!("media lost: {reason}"))
                    .fault_at(now);
                self.leave(now, call, &device, cause);
            }
            SfuNotice::NegotiationFailed { error, .. } => {
                // Its media session cannot go on: out of the SFU now, for
                // this reason, then out of the call like a lost participant.
                leg.in_sfu = false;
                info!(%call, %device, %error, "sfu could not negotiate");
                self.out.push_back(Output::Sfu(SfuCommand::Leave {
                    participant: key,
                    reason: LeaveReason::NegotiationFailed,
                }));
                let cause = Cause::new(EndReason::MediaFailed)
                    .by(&device)
                    .detail(format!("media lost: {error}"))
                    .fault_at(now);
                self.leave(now, call, &device, cause);
            }
            SfuNotice::Offer { sdp, .. } => {
                if matches!(leg.phase, LegPhase::AwaitingOffer | LegPhase::Joining) {
                    // The SFU renegotiates only established participants.
                    self.stats.stale_sfu_notices += 1;
                    return;
                }
                let revision = leg.next_revision;
                leg.next_revision += 1;
                leg.server_offer = Some(revision);
                // While detached, the offer waits in the replay buffer and its
                // deadline starts at the resume.
                if attached {
                    self.timers.set(
                        Timer::Leg(key, LegTimer::Answer),
                        now + config.answer_timeout,
                    );
                }
                self.push(
                    key.session,
                    server_frame::Kind::SdpOffer(pb::SdpOffer {
                        call_id: call.0,
                        session_id: key.session.0,
                        revision,
                        sdp: sdp.into_string(),
                    }),
                );
            }
            SfuNotice::Answer { sdp, .. } => {
                let Some(revision) = leg.device_offer.take() else {
                    self.stats.stale_sfu_notices += 1;
                    return;
                };
                self.timers.cancel(Timer::Leg(key, LegTimer::SfuAnswer));
                self.push(
                    key.session,
                    server_frame::Kind::SdpAnswer(pb::SdpAnswer {
                        call_id: call.0,
                        session_id: key.session.0,
                        revision,
                        sdp: sdp.into_string(),
                    }),
                );
            }
            SfuNotice::ActiveSpeakers { speakers, .. } => {
                // Keys of legs that ended since are skipped: their devices left.
                let device_ids = speakers
                    .iter()
                    .filter_map(|k| self.legs.get(k))
                    .filter(|(c, _)| *c == call)
                    .map(|(_, d)| d.to_string())
                    .collect();
                self.push(
                    key.session,
                    server_frame::Kind::ActiveSpeakers(pb::ActiveSpeakers {
                        call_id: call.0,
                        device_ids,
                    }),
                );
            }
            SfuNotice::Connected { .. } => {
                if leg.phase != LegPhase::Connecting {
                    return;
                }
                leg.phase = LegPhase::Connected;
                self.timers.cancel(Timer::Leg(key, LegTimer::Connect));
                debug!(%call, %device, %key, "media connected");
                self.notify_others(
                    call,
                    &device,
                    ParticipantStatus::Connected,
                    EndReason::Unspecified,
                );
                self.maybe_active(call);
            }
        }
    }

    pub(super) fn on_leg_timer(&mut self, now: Instant, key: ParticipantKey, which: LegTimer) {
        let Some((call, device)) = self.legs.get(&key).cloned() else {
            return;
        };
        let Some(leg) = self.leg_mut(key) else { return };
        let due = match which {
            LegTimer::Offer => leg.phase == LegPhase::AwaitingOffer,
            LegTimer::SfuJoin => leg.phase == LegPhase::Joining,
            LegTimer::Connect => leg.phase == LegPhase::Connecting,
            LegTimer::Answer => leg.server_offer.is_some(),
            LegTimer::SfuAnswer => leg.device_offer.is_some(),
        };
        if !due {
            return;
        }
        let timeout = match which {
            LegTimer::Offer => self.config.offer_timeout,
            LegTimer::SfuJoin | LegTimer::SfuAnswer => self.config.sfu_timeout,
            LegTimer::Connect => self.config.connect_timeout,
            LegTimer::Answer => self.config.answer_timeout,
        };
        info!(%call, %device, %key, ?which, "media step timed out");
        let cause = Cause::new(EndReason::SetupTimeout)
            .by(&device)
            .detail(which.describe())
            .fault_at(now.checked_sub(timeout).unwrap_or(now));
        self.leave(now, call, &device, cause);
    }
}
