//! Registration, heartbeats, detach, resume and sweep.

use std::time::{Duration, Instant};

use rand::Rng;
use tracing::{debug, info};

use super::{
    Cause, ConnState, Controller, Heartbeats, Link, MAX_SOFTWARE_VERSION, MemberState,
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, Refusal, Session, Timer, truncate,
};
use crate::ids::{ConnId, Epoch, SessionId};
use crate::pb::{self, CloseReason, EndReason, ErrorCode, ParticipantStatus, server_frame};
use crate::wire::MAX_FRAME_BYTES;

/// Picks the highest version both sides speak.
pub(super) fn negotiate(min: u32, max: u32) -> Option<u32> {
    if min == 0 || max < min {
        return None;
    }
    let chosen = max.min(PROTOCOL_VERSION_MAX);
    (chosen >= min.max(PROTOCOL_VERSION_MIN)).then_some(chosen)
}

impl Controller {
    pub(super) fn on_hello(&mut self, now: Instant, conn: ConnId, hello: pb::Hello) {
        let device = self.conns.get(&conn).map(|c| c.device.to_string()).unwrap_or_default();
        let _span = tracing::info_span!("device", id = %device, %conn).entered();
        let Some(version) = negotiate(hello.min_version, hello.max_version) else {
            let reason = format!(
                "device speaks {}..={}, server speaks {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION_MAX}",
                hello.min_version, hello.max_version
            );
            info!(%conn, %reason, "hello rejected");
            self.note_device_error(conn, &reason);
            self.reject(conn, ErrorCode::UnsupportedVersion, &reason, CloseReason::UnsupportedVersion);
            return;
        };
        self.timers.cancel(Timer::Hello(conn));
        let Some((device, credential)) = self.conns.get(&conn).map(|c| (c.device.clone(), c.credential.clone())) else {
            return;
        };
        // An identity with a session belongs to the credential that made it:
        // another credential neither resumes nor replaces it.
        if let Some(old) = self.devices.get(&device).and_then(|d| d.session)
            && self.sessions.get(&old).is_some_and(|s| s.credential.key != credential.key)
        {
            info!(%conn, %device, "identity held by another credential: refused");
            self.note_device_error(conn, "refused a connection with a different credential for this identity");
            self.reject(
                conn,
                ErrorCode::IdentityInUse,
                "this identity is in use by a different credential",
                CloseReason::IdentityInUse,
            );
            return;
        }
        // The node's device cap: a device with a session (a resume, a
        // reboot that replaces it) always gets back in; a new one is told
        // to come back later.
        let has_session = self.devices.get(&device).and_then(|d| d.session).is_some();
        let max = self.config.max_devices;
        if !has_session && self.sessions.len() >= max {
            *self.stats.refused.entry(Refusal::Devices).or_default() += 1;
            info!(%conn, %device, max, "device cap reached: refused");
            self.note_device_error(conn, "refused: the server holds its most devices");
            let reason = format!("this server holds its most devices ({max}); try again later");
            self.reject(conn, ErrorCode::Overloaded, &reason, CloseReason::Overloaded);
            return;
        }
        if let Some(d) = self.devices.get_mut(&device) {
            d.version = truncate(&hello.software_version, MAX_SOFTWARE_VERSION);
        }

        // Resume if the named session is this device's, the token matches and
        // nothing it should have received was dropped.
        if let Some(resume) = hello.resume {
            let sid = SessionId(resume.session_id);
            let resumable = self.sessions.get(&sid).is_some_and(|s| {
                s.device == device && s.token[..] == resume.resume_token[..] && !s.replay_overflow
            });
            if resumable {
                self.resume(now, conn, sid, version, resume.last_seq);
                return;
            }
            self.stats.sessions_unknown += 1;
            info!(%conn, %device, %sid, "resume refused: session unknown");
            self.send(
                conn,
                0,
                server_frame::Kind::SessionUnknown(pb::SessionUnknown {
                    session_id: resume.session_id,
                    reason: "session unknown or expired; all its calls have ended".into(),
                }),
            );
        }

        // A fresh session replaces whatever the device had.
        if let Some(old) = self.devices.get(&device).and_then(|d| d.session) {
            self.stats.sessions_replaced += 1;
            if let Some(Link::Attached(old_conn)) = self.sessions.get(&old).map(|s| s.link)
                && old_conn != conn
            {
                self.close(old_conn, CloseReason::Replaced);
            }
            let cause = Cause::new(EndReason::ConnectionLost)
                .by(&device)
                .detail("device started a new session");
            self.terminate_session(now, old, cause);
        }
        let sid = SessionId(self.next_session);
        self.next_session += 1;
        let mut token = [0u8; 16];
        self.rng.fill_bytes(&mut token);
        self.sessions.insert(
            sid,
            Session {
                device: device.clone(),
                credential,
                epoch: Epoch(0),
                token,
                link: Link::Detached { since: now },
                hb: Heartbeats::default(),
                last_proof: now,
                call: None,
                ops: Default::default(),
                replay: Default::default(),
                replay_bytes: 0,
                replay_overflow: false,
                next_seq: 1,
            },
        );
        if let Some(d) = self.devices.get_mut(&device) {
            d.session = Some(sid);
        }
        self.stats.sessions_created += 1;
        info!(%conn, %device, %sid, version, "session created");
        self.attach(now, conn, sid, version, false);
    }

    fn resume(&mut self, now: Instant, conn: ConnId, sid: SessionId, version: u32, last_seq: u64) {
        let Some(s) = self.sessions.get(&sid) else {
            return;
        };
        let (old_link, old_epoch, device) = (s.link, s.epoch, s.device.clone());
        if let Link::Attached(old_conn) = old_link
            && old_conn != conn
        {
            self.close(old_conn, CloseReason::Replaced);
        }
        self.timers.cancel(Timer::ResumeGrace(sid, old_epoch));
        self.timers.cancel(Timer::Heartbeat(sid, old_epoch));
        self.stats.sessions_resumed += 1;
        info!(%conn, %device, %sid, "session resumed");
        self.attach(now, conn, sid, version, true);

        // Send again everything the device has not processed, then the
        // current state of its call.
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        s.ack_replay(last_seq);
        let call = s.call;
        let again: Vec<_> = s.replay.iter().cloned().collect();
        for frame in again {
            self.out.push_back(super::Output::Send { conn, frame });
        }
        let Some(call_id) = call else { return };
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        let Some(member) = call.members.get_mut(&device) else {
            return;
        };
        let was_reconnecting = std::mem::replace(&mut member.reconnecting, false);
        let status = member.status();
        // A renegotiation offer still unanswered was replayed above; its
        // answer deadline starts now.
        let pending = match &member.state {
            MemberState::Joined(leg) if leg.server_offer.is_some() => Some(leg.key),
            _ => None,
        };
        if let Some(state) = self.call_state(call_id) {
            self.push(sid, server_frame::Kind::CallState(state));
        }
        if was_reconnecting {
            self.notify_others(call_id, &device, status, EndReason::Unspecified);
        }
        if let Some(key) = pending {
            self.timers.set(
                Timer::Leg(key, super::LegTimer::Answer),
                now + self.config.answer_timeout,
            );
        }
    }

    /// Attaches `sid` to `conn` with a fresh epoch, sends `Welcome` and starts
    /// heartbeats.
    fn attach(&mut self, now: Instant, conn: ConnId, sid: SessionId, version: u32, resumed: bool) {
        let epoch = self.alloc_epoch();
        let interval = self.config.heartbeat_interval;
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        s.epoch = epoch;
        s.link = Link::Attached(conn);
        s.hb = Heartbeats {
            next_seq: 1,
            last_acked: 0,
            missed: 0,
        };
        s.last_proof = now;
        let welcome = pb::Welcome {
            version,
            session_id: sid.0,
            epoch: epoch.0,
            resume_token: s.token.to_vec(),
            heartbeat_interval_ms: millis(interval),
            resume_grace_ms: millis(self.config.resume_grace),
            resumed,
            max_frame_bytes: MAX_FRAME_BYTES as u32,
            device_id: s.device.to_string(),
            call_id: s.call.map_or(0, |c| c.0),
            grant: Some(pb::Grant {
                rooms: s.credential.grant.rooms.iter().map(ToString::to_string).collect(),
                publish: s.credential.grant.publish,
                subscribe: s.credential.grant.subscribe,
            }),
        };
        let device = s.device.clone();
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = ConnState::Attached(sid);
        }
        self.send(conn, 0, server_frame::Kind::Welcome(welcome));
        self.update_reachability(&device);
        self.send_heartbeat(now, sid);
        self.timers
            .set(Timer::Heartbeat(sid, epoch), now + interval);
    }

    fn send_heartbeat(&mut self, now: Instant, sid: SessionId) {
        let sent_at_ms = self.millis_since_origin(now);
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let Link::Attached(conn) = s.link else { return };
        let seq = s.hb.next_seq;
        s.hb.next_seq += 1;
        self.stats.heartbeats_sent += 1;
        self.send(
            conn,
            0,
            server_frame::Kind::Heartbeat(pb::Heartbeat {
                seq,
                sent_at_ms,
                ack_seq: 0,
            }),
        );
    }

    /// Every interval: count the previous heartbeat if it was not acked, act
    /// on the count, send the next one.
    pub(super) fn on_heartbeat_timer(&mut self, now: Instant, sid: SessionId, epoch: Epoch) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        if s.epoch != epoch || !matches!(s.link, Link::Attached(_)) {
            return;
        }
        let latest_sent = s.hb.next_seq - 1;
        if s.hb.last_acked < latest_sent {
            s.hb.missed += 1;
            self.stats.heartbeats_missed += 1;
        }
        let (missed, device, link) = (s.hb.missed, s.device.clone(), s.link);
        self.update_reachability(&device);
        if missed >= self.config.unreachable_after_missed {
            let detail = format!("{missed} heartbeats missed: control stream not moving");
            info!(%device, %sid, "unreachable: {detail}");
            if let Link::Attached(conn) = link {
                self.close_and_detach(now, conn, CloseReason::HeartbeatTimeout, &detail);
            }
            return;
        }
        self.send_heartbeat(now, sid);
        self.timers.set(
            Timer::Heartbeat(sid, epoch),
            now + self.config.heartbeat_interval,
        );
    }

    pub(super) fn on_heartbeat_ack(&mut self, now: Instant, sid: SessionId, ack: pb::HeartbeatAck) {
        let origin = self.origin;
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        if ack.seq == 0 || ack.seq >= s.hb.next_seq {
            // Acks a heartbeat never sent: ignore.
            return;
        }
        self.stats.heartbeat_acks_received += 1;
        s.hb.last_acked = s.hb.last_acked.max(ack.seq);
        let latest = ack.seq + 1 == s.hb.next_seq;
        if latest {
            s.hb.missed = 0;
            s.last_proof = now;
        }
        let device = s.device.clone();
        if let Some(d) = self.devices.get_mut(&device) {
            d.last_heartbeat = Some(now);
            // The echoed timestamp is network input: use it only if plausible.
            let sent = origin.checked_add(Duration::from_millis(ack.echo_sent_at_ms));
            if let Some(sent) = sent.filter(|t| *t <= now) {
                d.rtt = Some(now - sent);
                self.stats.heartbeat_rtt.observe(now - sent);
            }
        }
        if latest {
            self.update_reachability(&device);
        }
    }

    pub(super) fn on_device_heartbeat(
        &mut self,
        now: Instant,
        conn: ConnId,
        sid: SessionId,
        hb: pb::Heartbeat,
    ) {
        self.stats.heartbeats_received += 1;
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.ack_replay(hb.ack_seq);
            if let Some(d) = self.devices.get_mut(&s.device) {
                d.last_heartbeat = Some(now);
            }
        }
        self.send(
            conn,
            0,
            server_frame::Kind::HeartbeatAck(pb::HeartbeatAck {
                seq: hb.seq,
                echo_sent_at_ms: hb.sent_at_ms,
            }),
        );
    }

    /// The session lost its connection: it waits for a resume until the grace
    /// ends. Calls still being set up converge now; connected media goes on.
    pub(super) fn detach(&mut self, now: Instant, sid: SessionId, detail: String) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        if matches!(s.link, Link::Detached { .. }) {
            return;
        }
        s.link = Link::Detached { since: now };
        let (epoch, device, call, last_proof) = (s.epoch, s.device.clone(), s.call, s.last_proof);
        debug!(%sid, %device, %detail, "session detached");
        self.timers.cancel(Timer::Heartbeat(sid, epoch));
        self.timers.set(
            Timer::ResumeGrace(sid, epoch),
            now + self.config.resume_grace,
        );
        if let Some(d) = self.devices.get_mut(&device) {
            d.last_error = Some(detail.clone());
        }
        self.update_reachability(&device);
        if let Some(call) = call {
            self.on_member_detached(now, call, &device, sid, last_proof, &detail);
        }
    }

    /// The connection's credential expired: the connection closes and its
    /// session ends (a new credential starts a new one).
    pub(super) fn on_credential_expired(&mut self, now: Instant, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let (state, device) = (c.state, c.device.clone());
        info!(%conn, %device, "credential expired: closing");
        if let ConnState::Attached(sid) = state
            && self.sessions.get(&sid).is_some_and(|s| s.link == Link::Attached(conn))
        {
            let cause = Cause::new(EndReason::CredentialExpired).by(&device).detail("the device's credential expired");
            self.terminate_session(now, sid, cause);
        }
        self.note_device_error(conn, "credential expired");
        self.close(conn, CloseReason::CredentialExpired);
    }

    pub(super) fn on_grace_timer(&mut self, now: Instant, sid: SessionId, epoch: Epoch) {
        let Some(s) = self.sessions.get(&sid) else {
            return;
        };
        if s.epoch != epoch || !matches!(s.link, Link::Detached { .. }) {
            return;
        }
        let (device, last_proof) = (s.device.clone(), s.last_proof);
        info!(%sid, %device, "resume grace over: session swept");
        self.stats.stale_sessions_swept += 1;
        let cause = Cause::new(EndReason::ConnectionLost)
            .by(&device)
            .detail("device did not come back within the resume grace")
            .fault_at(last_proof);
        self.terminate_session(now, sid, cause);
    }

    /// Removes a session; its call membership ends with `cause`. Does not
    /// close its connection (callers do when there is one).
    pub(super) fn terminate_session(&mut self, now: Instant, sid: SessionId, cause: Cause) {
        let Some(s) = self.sessions.get(&sid) else {
            return;
        };
        let (device, epoch, call) = (s.device.clone(), s.epoch, s.call);
        if let Some(call) = call {
            self.leave(now, call, &device, cause);
        }
        self.sessions.remove(&sid);
        self.timers.cancel(Timer::Heartbeat(sid, epoch));
        self.timers.cancel(Timer::ResumeGrace(sid, epoch));
        if let Some(d) = self.devices.get_mut(&device)
            && d.session == Some(sid)
        {
            d.session = None;
        }
        self.update_reachability(&device);
    }

    fn millis_since_origin(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    /// Tells the other joined members of `call` that `device`'s status changed.
    pub(super) fn notify_others(
        &mut self,
        call: crate::ids::CallId,
        device: &crate::ids::DeviceId,
        status: ParticipantStatus,
        reason: EndReason,
    ) {
        let Some(c) = self.calls.get(&call) else {
            return;
        };
        let media_id = c.members.get(device).and_then(|m| m.leg()).map_or(0, |l| l.media_id);
        let targets: Vec<SessionId> = c
            .members
            .iter()
            .filter(|(d, m)| *d != device && matches!(m.state, MemberState::Joined(_)))
            .map(|(_, m)| m.session)
            .collect();
        for sid in targets {
            self.push(
                sid,
                server_frame::Kind::ParticipantUpdate(pb::ParticipantUpdate {
                    call_id: call.0,
                    device_id: device.to_string(),
                    status: status as i32,
                    reason: reason as i32,
                    media_id,
                }),
            );
        }
    }
}

impl Session {
    /// Drops frames the device has processed from the replay buffer.
    fn ack_replay(&mut self, acked: u64) {
        while self.replay.front().is_some_and(|f| f.seq <= acked) {
            if let Some(f) = self.replay.pop_front() {
                self.replay_bytes -= prost::Message::encoded_len(&f);
            }
        }
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_negotiation_picks_the_highest_common() {
        assert_eq!(negotiate(1, 1), Some(1));
        assert_eq!(negotiate(1, 7), Some(PROTOCOL_VERSION_MAX));
        assert_eq!(negotiate(2, 3), None);
        assert_eq!(negotiate(0, 0), None);
        assert_eq!(negotiate(3, 1), None);
    }
}
