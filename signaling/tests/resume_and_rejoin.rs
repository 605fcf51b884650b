//! A device that reconnects during a call resumes its session while media
//! keeps flowing; one the server has forgotten is told so and rejoins.

mod common;

use common::*;
use fleetcall_signaling::controller::SfuCommand;
use fleetcall_signaling::ids::DeviceId;
use fleetcall_signaling::pb::{
    self, CallPhase, EndReason, ParticipantStatus, client_frame::Kind as C, server_frame::Kind as S,
};

fn welcomes(sim: &Sim, name: &str) -> Vec<pb::Welcome> {
    sim.received(name, |k| match k {
        S::Welcome(w) => Some(w.clone()),
        _ => None,
    })
}

fn leave_count(sim: &Sim) -> usize {
    sim.sfu
        .commands
        .iter()
        .filter(|c| matches!(c, SfuCommand::Leave { .. }))
        .count()
}

#[test]
fn reconnect_within_the_grace_resumes_and_media_is_untouched() {
    let mut sim = Sim::new(seed_from_env(71));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    let b_key = sim.key_of("b", call).unwrap();
    let first = welcomes(&sim, "b")[0].clone();

    sim.drop_connection("b");
    sim.run_for(secs(3));
    assert_eq!(sim.phase(call), CallPhase::Active);
    let reconnecting = sim.received("a", |k| match k {
        S::ParticipantUpdate(u) if u.device_id == "b" => Some(u.status()),
        _ => None,
    });
    // (Connected: b's media came up when the call started.)
    assert_eq!(
        reconnecting,
        vec![
            ParticipantStatus::Connected,
            ParticipantStatus::Reconnecting
        ]
    );

    sim.connect("b", true);
    sim.run_for(ms(100));
    let w = welcomes(&sim, "b").last().cloned().unwrap();
    assert!(w.resumed);
    assert_eq!(w.session_id, first.session_id);
    assert_ne!(w.epoch, first.epoch, "a new attachment gets a new epoch");
    assert_eq!(w.call_id, call);
    // The SFU participant was never touched: media kept flowing.
    assert_eq!(leave_count(&sim), 0);
    assert_eq!(sim.key_of("b", call), Some(b_key));
    // b got the call's current state, a heard that b is back.
    let state = sim.received("b", |k| match k {
        S::CallState(s) => Some(s.phase()),
        _ => None,
    });
    assert_eq!(state.last(), Some(&CallPhase::Active));
    let updates = sim.received("a", |k| match k {
        S::ParticipantUpdate(u) if u.device_id == "b" => Some(u.status()),
        _ => None,
    });
    assert_eq!(
        updates,
        vec![
            ParticipantStatus::Connected,
            ParticipantStatus::Reconnecting,
            ParticipantStatus::Connected
        ]
    );
    assert_eq!(sim.ctl.stats().sessions_resumed, 1);
    sim.check();

    // The resumed session works as before.
    sim.request("b", C::Hangup(pb::Hangup { call_id: call }));
    sim.run_for(ms(100));
    assert_eq!(sim.ended_for("a", call)[0].by, "b");
    sim.check();
}

#[test]
fn events_while_detached_are_delivered_on_resume() {
    let mut sim = Sim::new(seed_from_env(72));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    sim.drop_connection("b");
    sim.request("a", C::Hangup(pb::Hangup { call_id: call }));
    sim.run_for(secs(2));
    assert!(
        sim.sfu.participants.is_empty(),
        "both participants removed at the hangup"
    );
    assert!(sim.ended_for("b", call).is_empty());
    sim.connect("b", true);
    sim.run_for(ms(100));
    let ended = sim.ended_for("b", call);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].reason(), EndReason::Hangup);
    assert_eq!(welcomes(&sim, "b").last().unwrap().call_id, 0);
    sim.check();
}

#[test]
fn after_the_grace_the_device_is_told_session_unknown_and_rejoins_the_group() {
    let mut sim = Sim::new(seed_from_env(73));
    sim.add("owner").add("b").add("c");
    let call = sim.group("owner", &["b", "c"]);
    let old_key = sim.key_of("b", call).unwrap();
    let old_session = welcomes(&sim, "b")[0].session_id;

    sim.drop_connection("b");
    let grace = sim.ctl.config().resume_grace;
    sim.run_for(grace + secs(1));
    // The server forgot b: its participant is gone, the group goes on.
    assert!(!sim.sfu.participants.contains_key(&old_key));
    assert_eq!(sim.phase(call), CallPhase::Active);
    let gone = sim.received("owner", |k| match k {
        S::ParticipantUpdate(u) if u.device_id == "b" && u.status() == ParticipantStatus::Gone => {
            Some(u.reason())
        }
        _ => None,
    });
    assert_eq!(gone, vec![EndReason::ConnectionLost]);
    assert_eq!(sim.ctl.stats().stale_sessions_swept, 1);
    sim.check();

    // b comes back asking to resume: explicit SessionUnknown, then a fresh
    // session on the same connection.
    sim.connect("b", true);
    sim.run_for(ms(100));
    let unknown = sim.received("b", |k| match k {
        S::SessionUnknown(u) => Some(u.session_id),
        _ => None,
    });
    assert_eq!(unknown, vec![old_session]);
    let w = welcomes(&sim, "b").last().cloned().unwrap();
    assert!(!w.resumed);
    assert_ne!(w.session_id, old_session);
    assert_eq!(sim.ctl.stats().sessions_unknown, 1);

    // It rejoins the group it was in: a new participant with a new key.
    let op = sim.request("b", C::GroupJoin(pb::GroupJoin { call_id: call }));
    sim.run_for(secs(1));
    sim.acked_call("b", op);
    let new_key = sim.key_of("b", call).unwrap();
    assert_ne!(new_key, old_key);
    assert_eq!(new_key.session.0, w.session_id);
    assert!(sim.sfu.participants.contains_key(&new_key));
    let snap = sim
        .ctl
        .call(fleetcall_signaling::ids::CallId(call))
        .unwrap();
    assert!(
        snap.members
            .iter()
            .all(|(_, st, _)| *st == ParticipantStatus::Connected),
        "{snap:?}"
    );
    sim.check();
}

#[test]
fn after_the_grace_a_direct_call_has_ended_and_the_device_starts_over() {
    let mut sim = Sim::new(seed_from_env(74));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    sim.drop_connection("b");
    sim.run_for(sim.ctl.config().resume_grace + secs(1));
    assert_eq!(sim.end_reason(call), Some(EndReason::ConnectionLost));
    assert!(sim.sfu.participants.is_empty());
    sim.connect("b", true);
    sim.run_for(ms(100));
    assert_eq!(
        sim.received("b", |k| matches!(k, S::SessionUnknown(_)).then_some(()))
            .len(),
        1
    );
    // A former participant cannot rejoin an ended call.
    let op = sim.request("b", C::GroupJoin(pb::GroupJoin { call_id: call }));
    sim.run_for(ms(100));
    assert_eq!(sim.error_of("b", op), pb::ErrorCode::CallEnded);
    // And it is free for a new call.
    let next = sim.active_call("b", "a");
    assert_eq!(sim.phase(next), CallPhase::Active);
    sim.check();
}

#[test]
fn a_wrong_resume_token_is_treated_as_unknown() {
    let mut sim = Sim::new(seed_from_env(75));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    sim.drop_connection("b");
    if let Some((_, token)) = sim.dev_mut("b").session.as_mut() {
        token[0] ^= 0xff;
    }
    sim.connect("b", true);
    sim.run_for(ms(100));
    assert_eq!(
        sim.received("b", |k| matches!(k, S::SessionUnknown(_)).then_some(()))
            .len(),
        1
    );
    // The old session is replaced right away: the call converges now.
    assert_eq!(sim.end_reason(call), Some(EndReason::ConnectionLost));
    assert_eq!(sim.ctl.stats().sessions_replaced, 1);
    sim.check();
}

#[test]
fn a_second_connection_takes_over_the_session_and_closes_the_first() {
    let mut sim = Sim::new(seed_from_env(76));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    // The old connection is half-dead; the device opens a new one and resumes.
    let old = sim.dev("b").conn.unwrap();
    sim.connect("b", true);
    sim.run_for(ms(100));
    assert!(welcomes(&sim, "b").last().unwrap().resumed);
    assert_ne!(sim.dev("b").conn, Some(old));
    assert_eq!(sim.phase(call), CallPhase::Active);
    let row = sim.ctl.device(&DeviceId::new("b").unwrap()).unwrap();
    assert_eq!(row.sessions.len(), 1);
    sim.check();
}
