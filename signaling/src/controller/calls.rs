//! Call control: 1:1 and group calls, invitations, convergence.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use tracing::{debug, info};

use super::{
    Call, CallKindState, Cause, Controller, Handled, LegPhase, LivePhase, MAX_GROUP_NAME, Member,
    MemberState, Phase, Refusal, Reject, Timer, Transition,
};
use crate::grants::RoomName;
use crate::ids::{CallId, DeviceId, SessionId};
use crate::pb::{self, CallKind, CallPhase, EndReason, ErrorCode, ParticipantStatus, server_frame};

/// What a request's sender is to a call.
enum Role {
    /// The call has ended; the sender was in it.
    EndedMember(CallId),
    /// Live call, sender is a member.
    Member(CallId),
    /// Live call, sender is not a member but was one earlier.
    Former(CallId),
}

impl Controller {
    /// Resolves `call_id` for a request from `sid`, with the usual errors.
    fn role(&self, sid: SessionId, call_id: u64) -> Result<(Role, DeviceId), Reject> {
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
        let member = call
            .members
            .get(&device)
            .filter(|m| m.session == sid)
            .is_some();
        let role = match (call.is_live(), member, call.former.contains(&device)) {
            (false, _, true) => Role::EndedMember(id),
            (false, _, false) => {
                return Err(Reject::new(ErrorCode::NotInCall, "not in this call").call(call_id));
            }
            (true, true, _) => Role::Member(id),
            (true, false, true) => Role::Former(id),
            (true, false, false) => {
                return Err(Reject::new(ErrorCode::NotInCall, "not in this call").call(call_id));
            }
        };
        Ok((role, device))
    }

    /// Refuses calls placed by a credential that may not publish (a
    /// listener cannot ring anyone).
    fn may_place_calls(&self, sid: SessionId) -> Result<(), Reject> {
        match self.sessions.get(&sid) {
            Some(s) if s.credential.grant.publish => Ok(()),
            Some(_) => Err(Reject::new(ErrorCode::Forbidden, "this credential may only listen: it cannot place calls")),
            None => Err(Reject::new(ErrorCode::NotRegistered, "no session")),
        }
    }

    fn ended(call_id: CallId) -> Reject {
        Reject::new(ErrorCode::CallEnded, "the call has ended").call(call_id.0)
    }

    /// Whether `device` can be alerted now: its live session, or why not.
    fn availability(&self, device: &DeviceId) -> Result<SessionId, EndReason> {
        let sid = self
            .devices
            .get(device)
            .and_then(|d| d.session)
            .ok_or(EndReason::Unavailable)?;
        let s = self.sessions.get(&sid).ok_or(EndReason::Unavailable)?;
        if !matches!(s.link, super::Link::Attached(_)) {
            return Err(EndReason::Unavailable);
        }
        if s.call.is_some() {
            return Err(EndReason::Busy);
        }
        Ok(sid)
    }

    fn alloc_call(&mut self) -> CallId {
        let id = CallId(self.next_call);
        self.next_call += 1;
        id
    }

    /// Refuses a new call while the node holds `max_calls` live ones.
    fn room_for_a_call(&mut self) -> Result<(), Reject> {
        let max = self.config.max_calls;
        if self.live_calls < max {
            return Ok(());
        }
        *self.stats.refused.entry(Refusal::Calls).or_default() += 1;
        info!(max, "call cap reached: new call refused");
        Err(Reject::new(ErrorCode::Overloaded, format!("this server holds its most calls ({max}); try again later")))
    }

    /// Files a new live call.
    fn insert_call(&mut self, call_id: CallId, call: Call) {
        self.calls.insert(call_id, call);
        self.live_calls += 1;
    }

    /// Invitations `device` has ringing now, in every call. A walk over
    /// every member: only invitations ask, and they are rate-limited.
    fn invites_ringing_from(&self, device: &DeviceId) -> usize {
        self.calls
            .values()
            .flat_map(|c| c.members.values())
            .filter(|m| matches!(m.state, MemberState::Invited) && m.invited_by.as_ref() == Some(device))
            .count()
    }

    /// Refuses `more` invitations from `device` if they would take it over
    /// `max_pending_invites`; nobody is rung then.
    fn room_for_invites(&mut self, device: &DeviceId, more: usize) -> Result<(), Reject> {
        let max = self.config.max_pending_invites;
        let ringing = self.invites_ringing_from(device);
        if ringing + more <= max {
            return Ok(());
        }
        *self.stats.refused.entry(Refusal::PendingInvites).or_default() += 1;
        info!(%device, ringing, more, max, "pending invitation cap: refused");
        Err(Reject::new(
            ErrorCode::Overloaded,
            format!("at most {max} invitations ringing at once; {ringing} are ringing"),
        ))
    }

    /// A member over the capacity of a call or room.
    fn call_full(&mut self, call_id: u64, what: &str) -> Reject {
        *self.stats.refused.entry(Refusal::CallFull).or_default() += 1;
        Reject::new(ErrorCode::Overloaded, format!("the {what} is full")).call(call_id)
    }

    fn record_transition(&mut self, from: CallPhase, to: CallPhase, reason: Option<EndReason>) {
        *self
            .stats
            .call_transitions
            .entry(Transition { from, to, reason })
            .or_default() += 1;
    }

    fn set_phase(&mut self, call_id: CallId, to: LivePhase) {
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        let Phase::Live(from) = call.phase else {
            return;
        };
        if from == to {
            return;
        }
        call.phase = Phase::Live(to);
        debug!(%call_id, ?from, ?to, "call phase");
        self.record_transition(from.wire(), to.wire(), None);
    }

    /// The `CallState` message for a call.
    /// Files `device` (on session `sid`) as invited to the call and starts
    /// its ring timer; the caller sends the `IncomingCall`.
    fn add_invited(&mut self, now: Instant, call_id: CallId, device: &DeviceId, sid: SessionId, inviter: &DeviceId) {
        if let Some(call) = self.calls.get_mut(&call_id) {
            call.members.insert(
                device.clone(),
                Member {
                    session: sid,
                    state: MemberState::Invited,
                    invited_by: Some(inviter.clone()),
                    reconnecting: false,
                },
            );
            call.former.insert(device.clone());
        }
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.call = Some(call_id);
        }
        self.timers
            .set(Timer::Ring(call_id, sid), now + self.config.ring_timeout);
    }

    pub(super) fn call_state(&self, call_id: CallId) -> Option<pb::CallState> {
        let call = self.calls.get(&call_id)?;
        let (owner, group_name) = match &call.kind {
            CallKindState::Group { owner, name } => (owner.to_string(), name.clone()),
            CallKindState::Direct { caller, .. } => (caller.to_string(), String::new()),
            CallKindState::Room { name, .. } => (String::new(), name.to_string()),
        };
        Some(pb::CallState {
            call_id: call_id.0,
            kind: call.wire_kind() as i32,
            phase: call.phase.wire() as i32,
            participants: call
                .members
                .iter()
                .map(|(d, m)| pb::Participant {
                    device_id: d.to_string(),
                    status: m.status() as i32,
                    media_id: m.leg().map_or(0, |l| l.media_id),
                })
                .collect(),
            owner,
            group_name,
        })
    }

    /// Pushes the call's state to every member.
    fn broadcast_state(&mut self, call_id: CallId) {
        let Some(state) = self.call_state(call_id) else {
            return;
        };
        let targets: Vec<SessionId> = self
            .calls
            .get(&call_id)
            .map(|c| c.members.values().map(|m| m.session).collect())
            .unwrap_or_default();
        for sid in targets {
            self.push(sid, server_frame::Kind::CallState(state.clone()));
        }
    }

    // ---- 1:1 --------------------------------------------------------------

    pub(super) fn on_invite(&mut self, now: Instant, sid: SessionId, m: pb::Invite) -> Handled {
        let (caller, busy) = match self.sessions.get(&sid) {
            Some(s) => (s.device.clone(), s.call),
            None => return Err(Reject::new(ErrorCode::NotRegistered, "no session")),
        };
        if let Some(c) = busy {
            return Err(Reject::new(ErrorCode::AlreadyInCall, "already in a call").call(c.0));
        }
        self.may_place_calls(sid)?;
        let callee = DeviceId::new(m.callee)
            .map_err(|e| Reject::new(ErrorCode::InvalidArgument, e.to_string()))?;
        if callee == caller {
            return Err(Reject::new(
                ErrorCode::InvalidArgument,
                "cannot call yourself",
            ));
        }
        self.room_for_a_call()?;
        self.room_for_invites(&caller, 1)?;
        let call_id = self.alloc_call();
        info!(%call_id, %caller, %callee, "invite");
        let mut call = Call {
            kind: CallKindState::Direct {
                caller: caller.clone(),
                callee: callee.clone(),
            },
            phase: Phase::Live(LivePhase::Inviting),
            created_at: now,
            members: BTreeMap::new(),
            former: BTreeSet::from([caller.clone()]),
        };
        // The caller joins the media room at once, so media is ready when
        // the callee answers.
        let leg = self.new_leg(now, sid, call_id, &caller);
        call.members.insert(
            caller.clone(),
            Member {
                session: sid,
                state: MemberState::Joined(leg),
                invited_by: None,
                reconnecting: false,
            },
        );
        self.insert_call(call_id, call);
        self.stats.direct_calls_created += 1;
        self.record_transition(CallPhase::Unspecified, CallPhase::Inviting, None);
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.call = Some(call_id);
        }

        match self.availability(&callee) {
            Err(reason) => {
                let detail = match reason {
                    EndReason::Busy => "callee is in another call",
                    _ => "callee is not reachable",
                };
                self.end_call(now, call_id, Cause::new(reason).by(&callee).detail(detail));
            }
            Ok(callee_sid) => {
                self.add_invited(now, call_id, &callee, callee_sid, &caller);
                self.push(
                    callee_sid,
                    server_frame::Kind::IncomingCall(pb::IncomingCall {
                        call_id: call_id.0,
                        kind: CallKind::Direct as i32,
                        from: caller.to_string(),
                        group_name: String::new(),
                        ring_timeout_ms: u32::try_from(self.config.ring_timeout.as_millis())
                            .unwrap_or(u32::MAX),
                    }),
                );
                if let Some(state) = self.call_state(call_id) {
                    self.push(sid, server_frame::Kind::CallState(state));
                }
                self.update_reachability(&callee);
            }
        }
        Ok(call_id.0)
    }

    pub(super) fn on_ringing(&mut self, _now: Instant, sid: SessionId, call_id: u64) -> Handled {
        let (role, device) = self.role(sid, call_id)?;
        let id = match role {
            Role::Member(id) => id,
            Role::EndedMember(id) => return Err(Self::ended(id)),
            Role::Former(_) => {
                return Err(Reject::new(ErrorCode::NotInCall, "not in this call").call(call_id));
            }
        };
        let call = &self.calls[&id];
        let invited = matches!(
            call.members.get(&device).map(|m| &m.state),
            Some(MemberState::Invited)
        );
        if !invited {
            return Err(
                Reject::new(ErrorCode::InvalidState, "only an invited device rings").call(call_id),
            );
        }
        if call.phase == Phase::Live(LivePhase::Inviting)
            && matches!(call.kind, CallKindState::Direct { .. })
        {
            self.set_phase(id, LivePhase::Ringing);
            self.broadcast_state(id);
        }
        Ok(call_id)
    }

    pub(super) fn on_accept(&mut self, now: Instant, sid: SessionId, call_id: u64) -> Handled {
        let (role, device) = self.role(sid, call_id)?;
        let id = match role {
            Role::Member(id) => id,
            Role::EndedMember(id) => return Err(Self::ended(id)),
            Role::Former(_) => {
                return Err(Reject::new(ErrorCode::NotInCall, "not in this call").call(call_id));
            }
        };
        let call = &self.calls[&id];
        if call.is_multiparty() {
            return self.on_group_join(now, sid, call_id);
        }
        match call.members.get(&device).map(|m| &m.state) {
            Some(MemberState::Invited) => {}
            Some(MemberState::Joined(_)) if call.initiator() != &device => return Ok(call_id),
            _ => {
                return Err(
                    Reject::new(ErrorCode::InvalidState, "the caller cannot accept").call(call_id),
                );
            }
        }
        info!(call_id = %id, %device, "accepted");
        let created_at = self.calls[&id].created_at;
        self.stats
            .ring_to_answer
            .observe(now.saturating_duration_since(created_at));
        self.timers.cancel(Timer::Ring(id, sid));
        let leg = self.new_leg(now, sid, id, &device);
        if let Some(m) = self
            .calls
            .get_mut(&id)
            .and_then(|c| c.members.get_mut(&device))
        {
            m.state = MemberState::Joined(leg);
        }
        self.set_phase(id, LivePhase::Connecting);
        self.broadcast_state(id);
        self.maybe_active(id);
        Ok(call_id)
    }

    pub(super) fn on_decline(&mut self, now: Instant, sid: SessionId, call_id: u64) -> Handled {
        let (role, device) = self.role(sid, call_id)?;
        let id = match role {
            Role::Member(id) => id,
            Role::EndedMember(_) | Role::Former(_) => return Ok(call_id),
        };
        match self.calls[&id].members.get(&device).map(|m| &m.state) {
            Some(MemberState::Invited) => {
                self.leave(
                    now,
                    id,
                    &device,
                    Cause::new(EndReason::Declined).by(&device),
                );
                Ok(call_id)
            }
            _ => Err(
                Reject::new(ErrorCode::InvalidState, "already answered; hang up instead")
                    .call(call_id),
            ),
        }
    }

    pub(super) fn on_cancel(&mut self, now: Instant, sid: SessionId, call_id: u64) -> Handled {
        let (role, device) = self.role(sid, call_id)?;
        let id = match role {
            Role::Member(id) => id,
            Role::EndedMember(_) | Role::Former(_) => return Ok(call_id),
        };
        let call = &self.calls[&id];
        let is_caller =
            matches!(&call.kind, CallKindState::Direct { caller, .. } if *caller == device);
        if !is_caller {
            return Err(Reject::new(
                ErrorCode::InvalidState,
                "only the caller of a 1:1 call cancels",
            )
            .call(call_id));
        }
        let reason = if call.phase == Phase::Live(LivePhase::Active) {
            EndReason::Hangup
        } else {
            EndReason::Cancelled
        };
        self.end_call(now, id, Cause::new(reason).by(&device));
        Ok(call_id)
    }

    pub(super) fn on_hangup(&mut self, now: Instant, sid: SessionId, call_id: u64) -> Handled {
        let (role, device) = self.role(sid, call_id)?;
        let id = match role {
            Role::Member(id) => id,
            // Already over for this device: nothing to do, and that is success.
            Role::EndedMember(_) | Role::Former(_) => return Ok(call_id),
        };
        let call = &self.calls[&id];
        let invited = matches!(
            call.members.get(&device).map(|m| &m.state),
            Some(MemberState::Invited)
        );
        let reason = match (&call.kind, call.phase) {
            (_, _) if invited => EndReason::Declined,
            (
                CallKindState::Direct { .. },
                Phase::Live(LivePhase::Inviting | LivePhase::Ringing),
            ) => EndReason::Cancelled,
            (CallKindState::Direct { .. }, _) => EndReason::Hangup,
            (CallKindState::Group { .. } | CallKindState::Room { .. }, _) => EndReason::Left,
        };
        self.leave(now, id, &device, Cause::new(reason).by(&device));
        Ok(call_id)
    }

    pub(super) fn on_ring_timer(&mut self, now: Instant, call_id: CallId, sid: SessionId) {
        let Some(call) = self.calls.get(&call_id) else {
            return;
        };
        if !call.is_live() {
            return;
        }
        let invited = call
            .members
            .iter()
            .find(|(_, m)| m.session == sid && matches!(m.state, MemberState::Invited))
            .map(|(d, _)| d.clone());
        if let Some(device) = invited {
            info!(%call_id, %device, "ring timeout");
            let cause = Cause::new(EndReason::RingTimeout)
                .by(&device)
                .detail("nobody answered");
            self.leave(now, call_id, &device, cause);
        }
    }

    // ---- groups -----------------------------------------------------------

    pub(super) fn on_group_create(
        &mut self,
        now: Instant,
        sid: SessionId,
        m: pb::GroupCreate,
    ) -> Handled {
        let (owner, busy) = match self.sessions.get(&sid) {
            Some(s) => (s.device.clone(), s.call),
            None => return Err(Reject::new(ErrorCode::NotRegistered, "no session")),
        };
        if let Some(c) = busy {
            return Err(Reject::new(ErrorCode::AlreadyInCall, "already in a call").call(c.0));
        }
        self.may_place_calls(sid)?;
        if m.name.len() > MAX_GROUP_NAME || m.name.chars().any(char::is_control) {
            return Err(Reject::new(
                ErrorCode::InvalidArgument,
                "group name too long or not printable",
            ));
        }
        let invitees = parse_invitees(&m.invitees, self.config.max_group_members - 1)?;
        self.room_for_a_call()?;
        self.room_for_invites(&owner, invitees.len())?;
        let call_id = self.alloc_call();
        info!(%call_id, %owner, name = %m.name, "group created");
        let leg = self.new_leg(now, sid, call_id, &owner);
        let mut members = BTreeMap::new();
        members.insert(
            owner.clone(),
            Member {
                session: sid,
                state: MemberState::Joined(leg),
                invited_by: None,
                reconnecting: false,
            },
        );
        self.insert_call(
            call_id,
            Call {
                kind: CallKindState::Group {
                    owner: owner.clone(),
                    name: m.name,
                },
                phase: Phase::Live(LivePhase::Active),
                created_at: now,
                members,
                former: BTreeSet::from([owner.clone()]),
            },
        );
        self.stats.group_calls_created += 1;
        self.record_transition(CallPhase::Unspecified, CallPhase::Active, None);
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.call = Some(call_id);
        }
        if let Some(state) = self.call_state(call_id) {
            self.push(sid, server_frame::Kind::CallState(state));
        }
        for device in invitees {
            self.invite_to_group(now, call_id, &owner, device);
        }
        Ok(call_id.0)
    }

    pub(super) fn on_group_invite(
        &mut self,
        now: Instant,
        sid: SessionId,
        m: pb::GroupInvite,
    ) -> Handled {
        let (role, device) = self.role(sid, m.call_id)?;
        let id = match role {
            Role::Member(id) => id,
            Role::EndedMember(id) => return Err(Self::ended(id)),
            Role::Former(_) => {
                return Err(Reject::new(ErrorCode::NotInCall, "not in this call").call(m.call_id));
            }
        };
        self.may_place_calls(sid)?;
        let call = &self.calls[&id];
        if !call.is_multiparty() {
            return Err(Reject::new(ErrorCode::InvalidState, "not a group call").call(m.call_id));
        }
        if !matches!(
            call.members.get(&device).map(|m| &m.state),
            Some(MemberState::Joined(_))
        ) {
            return Err(
                Reject::new(ErrorCode::InvalidState, "join before inviting").call(m.call_id)
            );
        }
        let room = call.capacity(&self.config).saturating_sub(call.members.len());
        let invitees = parse_invitees(&m.invitees, usize::MAX)?;
        if invitees.len() > room {
            let mut rej = self.call_full(m.call_id, "call");
            rej.message = format!("the call is full: room for {room} more");
            return Err(rej);
        }
        self.room_for_invites(&device, invitees.len())?;
        for target in invitees {
            self.invite_to_group(now, id, &device, target);
        }
        Ok(m.call_id)
    }

    fn invite_to_group(
        &mut self,
        now: Instant,
        call_id: CallId,
        inviter: &DeviceId,
        target: DeviceId,
    ) {
        let Some(call) = self.calls.get(&call_id) else {
            return;
        };
        if call.members.contains_key(&target) || target == *inviter {
            return;
        }
        let (kind, name) = match &call.kind {
            CallKindState::Group { name, .. } => (CallKind::Group, name.clone()),
            CallKindState::Room { name, .. } => (CallKind::Room, name.to_string()),
            CallKindState::Direct { .. } => return,
        };
        match self.availability(&target) {
            Err(reason) => {
                debug!(%call_id, %target, ?reason, "group invite failed");
                self.notify_others(call_id, &target, ParticipantStatus::Gone, reason);
            }
            Ok(tsid) => {
                self.add_invited(now, call_id, &target, tsid, inviter);
                self.push(
                    tsid,
                    server_frame::Kind::IncomingCall(pb::IncomingCall {
                        call_id: call_id.0,
                        kind: kind as i32,
                        from: inviter.to_string(),
                        group_name: name,
                        ring_timeout_ms: u32::try_from(self.config.ring_timeout.as_millis())
                            .unwrap_or(u32::MAX),
                    }),
                );
                self.notify_others(
                    call_id,
                    &target,
                    ParticipantStatus::Invited,
                    EndReason::Unspecified,
                );
            }
        }
    }

    pub(super) fn on_group_join(&mut self, now: Instant, sid: SessionId, call_id: u64) -> Handled {
        let (role, device) = self.role(sid, call_id)?;
        let id = match role {
            Role::EndedMember(id) => return Err(Self::ended(id)),
            Role::Member(id) | Role::Former(id) => id,
        };
        let call = &self.calls[&id];
        if !call.is_multiparty() {
            return self.on_accept(now, sid, call_id);
        }
        match call.members.get(&device).map(|m| &m.state) {
            Some(MemberState::Joined(_)) => return Ok(call_id),
            Some(MemberState::Invited) => {}
            None => {
                // A former participant rejoining (e.g. after SessionUnknown);
                // a room asks its grant again.
                if let CallKindState::Room { name, .. } = &call.kind {
                    self.room_grant(sid, name)?;
                }
                if let Some(other) = self.sessions.get(&sid).and_then(|s| s.call) {
                    return Err(
                        Reject::new(ErrorCode::AlreadyInCall, "already in a call").call(other.0)
                    );
                }
                if call.members.len() >= call.capacity(&self.config) {
                    return Err(self.call_full(call_id, "call"));
                }
            }
        }
        self.add_joined(now, id, sid, &device);
        Ok(call_id)
    }

    /// Files `device` (on session `sid`) as a joined member of the live
    /// multiparty call `id` with a fresh participation, and tells everyone.
    fn add_joined(&mut self, now: Instant, id: CallId, sid: SessionId, device: &DeviceId) {
        info!(call_id = %id, %device, "joined group");
        self.timers.cancel(Timer::Ring(id, sid));
        let leg = self.new_leg(now, sid, id, device);
        if let Some(call) = self.calls.get_mut(&id) {
            call.former.insert(device.clone());
            call.members.insert(
                device.clone(),
                Member {
                    session: sid,
                    state: MemberState::Joined(leg),
                    invited_by: None,
                    reconnecting: false,
                },
            );
        }
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.call = Some(id);
        }
        if let Some(state) = self.call_state(id) {
            self.push(sid, server_frame::Kind::CallState(state));
        }
        self.notify_others(
            id,
            device,
            ParticipantStatus::Joining,
            EndReason::Unspecified,
        );
    }

    /// The sender's grant must cover `room`.
    fn room_grant(&self, sid: SessionId, room: &RoomName) -> Result<(), Reject> {
        match self.sessions.get(&sid) {
            Some(s) if s.credential.grant.covers(room) => Ok(()),
            Some(_) => Err(Reject::new(ErrorCode::Forbidden, format!("this credential does not grant room {room}"))),
            None => Err(Reject::new(ErrorCode::NotRegistered, "no session")),
        }
    }

    // ---- named rooms ------------------------------------------------------

    pub(super) fn on_room_join(&mut self, now: Instant, sid: SessionId, m: pb::RoomJoin) -> Handled {
        let room = RoomName::new(m.room).map_err(|e| Reject::new(ErrorCode::InvalidArgument, e.to_string()))?;
        self.room_grant(sid, &room)?;
        let (device, busy) = match self.sessions.get(&sid) {
            Some(s) => (s.device.clone(), s.call),
            None => return Err(Reject::new(ErrorCode::NotRegistered, "no session")),
        };
        let open = self.rooms.get(&room).copied();
        match (open, busy) {
            // Joining twice is success.
            (Some(id), Some(c)) if id == c => return Ok(id.0),
            (_, Some(c)) => {
                return Err(Reject::new(ErrorCode::AlreadyInCall, "already in a call").call(c.0));
            }
            (Some(id), None) => {
                if self.calls[&id].members.len() >= self.config.max_room_members {
                    return Err(self.call_full(id.0, "room"));
                }
                self.add_joined(now, id, sid, &device);
                return Ok(id.0);
            }
            (None, None) => {}
        }
        self.room_for_a_call()?;
        let call_id = self.alloc_call();
        info!(%call_id, %room, %device, "room opened");
        self.insert_call(
            call_id,
            Call {
                kind: CallKindState::Room { name: room.clone(), creator: device.clone() },
                phase: Phase::Live(LivePhase::Active),
                created_at: now,
                members: BTreeMap::new(),
                former: BTreeSet::new(),
            },
        );
        self.rooms.insert(room, call_id);
        self.stats.rooms_opened += 1;
        self.record_transition(CallPhase::Unspecified, CallPhase::Active, None);
        self.add_joined(now, call_id, sid, &device);
        Ok(call_id.0)
    }

    pub(super) fn on_group_leave(&mut self, now: Instant, sid: SessionId, call_id: u64) -> Handled {
        let (role, device) = self.role(sid, call_id)?;
        match role {
            Role::Member(id) => {
                let call = &self.calls[&id];
                if !call.is_multiparty() {
                    return Err(
                        Reject::new(ErrorCode::InvalidState, "not a group call; hang up")
                            .call(call_id),
                    );
                }
                let invited = matches!(
                    call.members.get(&device).map(|m| &m.state),
                    Some(MemberState::Invited)
                );
                let reason = if invited {
                    EndReason::Declined
                } else {
                    EndReason::Left
                };
                self.leave(now, id, &device, Cause::new(reason).by(&device));
                Ok(call_id)
            }
            Role::EndedMember(_) | Role::Former(_) => Ok(call_id),
        }
    }

    pub(super) fn on_group_end(&mut self, now: Instant, sid: SessionId, call_id: u64) -> Handled {
        let (role, device) = self.role(sid, call_id)?;
        let id = match role {
            Role::EndedMember(_) => return Ok(call_id),
            Role::Member(id) | Role::Former(id) => id,
        };
        match &self.calls[&id].kind {
            CallKindState::Group { owner, .. } if *owner == device => {
                self.end_call(now, id, Cause::new(EndReason::EndedByOwner).by(&device));
                Ok(call_id)
            }
            CallKindState::Group { .. } => Err(Reject::new(
                ErrorCode::Forbidden,
                "only the owner ends a group call",
            )
            .call(call_id)),
            CallKindState::Room { .. } => Err(Reject::new(
                ErrorCode::Forbidden,
                "a room has no owner: it ends when its last member leaves",
            )
            .call(call_id)),
            CallKindState::Direct { .. } => {
                Err(Reject::new(ErrorCode::InvalidState, "not a group call; hang up").call(call_id))
            }
        }
    }

    // ---- convergence ------------------------------------------------------

    /// `device` is out of `call`: a 1:1 call ends, a group goes on without it.
    pub(super) fn leave(&mut self, now: Instant, call_id: CallId, device: &DeviceId, cause: Cause) {
        let Some(call) = self.calls.get(&call_id) else {
            return;
        };
        match call.kind {
            CallKindState::Direct { .. } => {
                self.end_call(now, call_id, cause);
            }
            CallKindState::Group { .. } | CallKindState::Room { .. } => {
                self.remove_member(now, call_id, device, cause);
            }
        }
    }

    /// Ends a call for everyone, exactly once: later calls do nothing.
    pub(super) fn end_call(&mut self, now: Instant, call_id: CallId, cause: Cause) -> bool {
        let _span = tracing::info_span!("call", id = %call_id).entered();
        let Some(call) = self.calls.get_mut(&call_id) else {
            return false;
        };
        let Phase::Live(from) = call.phase else {
            return false;
        };
        call.phase = Phase::Ended {
            reason: cause.reason,
            at: now,
        };
        self.live_calls -= 1;
        let members = std::mem::take(&mut call.members);
        if let CallKindState::Room { name, .. } = &call.kind
            && self.rooms.get(name) == Some(&call_id)
        {
            self.rooms.remove(name);
        }
        info!(%call_id, reason = ?cause.reason, by = ?cause.by, detail = %cause.detail, "call ended");
        self.record_transition(from.wire(), CallPhase::Ended, Some(cause.reason));
        if let Some(at) = cause.fault_at {
            self.stats
                .fault_to_convergence
                .observe(now.saturating_duration_since(at));
        }
        for (device, member) in members {
            self.release_member(call_id, &device, member, &cause);
        }
        self.timers.set(
            Timer::ForgetCall(call_id),
            now + self.config.ended_call_retention,
        );
        true
    }

    /// Removes one member of a group call; ends the call when nobody joined
    /// is left.
    fn remove_member(&mut self, now: Instant, call_id: CallId, device: &DeviceId, cause: Cause) {
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        if !call.is_live() {
            return;
        }
        let Some(member) = call.members.remove(device) else {
            return;
        };
        let was_joined = matches!(member.state, MemberState::Joined(_));
        let nobody_left = !call
            .members
            .values()
            .any(|m| matches!(m.state, MemberState::Joined(_)));
        info!(%call_id, %device, reason = ?cause.reason, "participant removed");
        *self
            .stats
            .participants_removed
            .entry(cause.reason)
            .or_default() += 1;
        if let Some(at) = cause.fault_at {
            self.stats
                .fault_to_convergence
                .observe(now.saturating_duration_since(at));
        }
        self.release_member(call_id, device, member, &cause);
        if was_joined
            || matches!(
                cause.reason,
                EndReason::Declined | EndReason::RingTimeout | EndReason::Unavailable
            )
        {
            self.notify_others(call_id, device, ParticipantStatus::Gone, cause.reason);
        }
        if nobody_left {
            self.end_call(
                now,
                call_id,
                Cause::new(EndReason::Empty).detail("last participant left"),
            );
        }
    }

    /// Tears down one member's participation and tells it the call is over.
    fn release_member(
        &mut self,
        call_id: CallId,
        device: &DeviceId,
        member: Member,
        cause: &Cause,
    ) {
        match member.state {
            MemberState::Invited => self.timers.cancel(Timer::Ring(call_id, member.session)),
            MemberState::Joined(leg) => self.teardown_leg(leg, cause.leave_reason(device)),
        }
        if let Some(s) = self.sessions.get_mut(&member.session)
            && s.call == Some(call_id)
        {
            s.call = None;
        }
        self.push(
            member.session,
            server_frame::Kind::CallEnded(pb::CallEnded {
                call_id: call_id.0,
                reason: cause.reason as i32,
                by: cause.by.as_ref().map(|d| d.to_string()).unwrap_or_default(),
                detail: cause.detail.clone(),
            }),
        );
        self.update_reachability(device);
    }

    /// Phase `Connecting` -> `Active` once every member's media is connected.
    pub(super) fn maybe_active(&mut self, call_id: CallId) {
        let Some(call) = self.calls.get(&call_id) else {
            return;
        };
        if call.phase != Phase::Live(LivePhase::Connecting) {
            return;
        }
        let all_connected = call
            .members
            .values()
            .all(|m| m.leg().is_some_and(|l| l.phase == LegPhase::Connected));
        if all_connected {
            info!(%call_id, "call active");
            self.set_phase(call_id, LivePhase::Active);
            self.broadcast_state(call_id);
        }
    }

    /// A member's session detached: setup converges now, connected media
    /// waits for a resume.
    pub(super) fn on_member_detached(
        &mut self,
        now: Instant,
        call_id: CallId,
        device: &DeviceId,
        sid: SessionId,
        last_proof: Instant,
        detail: &str,
    ) {
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        let Some(member) = call.members.get_mut(device).filter(|m| m.session == sid) else {
            return;
        };
        match &member.state {
            MemberState::Invited => {
                let cause = Cause::new(EndReason::Unavailable)
                    .by(device)
                    .detail(format!("lost while ringing: {detail}"))
                    .fault_at(last_proof);
                self.leave(now, call_id, device, cause);
            }
            MemberState::Joined(leg) if leg.phase != LegPhase::Connected => {
                let cause = Cause::new(EndReason::ConnectionLost)
                    .by(device)
                    .detail(format!("lost during setup: {detail}"))
                    .fault_at(last_proof);
                self.leave(now, call_id, device, cause);
            }
            MemberState::Joined(leg) => {
                member.reconnecting = true;
                // The answer deadline restarts when the offer is sent again
                // after the resume.
                let key = leg.key;
                self.timers.cancel(Timer::Leg(key, super::LegTimer::Answer));
                self.notify_others(
                    call_id,
                    device,
                    ParticipantStatus::Reconnecting,
                    EndReason::Unspecified,
                );
            }
        }
    }
}

/// Parses and de-duplicates invitee ids.
fn parse_invitees(ids: &[String], max: usize) -> Result<Vec<DeviceId>, Reject> {
    let mut out: Vec<DeviceId> = Vec::new();
    for id in ids {
        let d = DeviceId::new(id.clone())
            .map_err(|e| Reject::new(ErrorCode::InvalidArgument, e.to_string()))?;
        if !out.contains(&d) {
            out.push(d);
        }
    }
    if out.len() > max {
        return Err(Reject::new(
            ErrorCode::InvalidArgument,
            format!("at most {max} more members"),
        ));
    }
    Ok(out)
}
