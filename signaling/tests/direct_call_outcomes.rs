//! Every outcome of a 1:1 call: answered, declined, busy, unavailable,
//! ring timeout, cancelled, hung up.

mod common;

use common::*;
use fleetcall_signaling::controller::SfuCommand;
use fleetcall_signaling::controller::Transition;
use fleetcall_signaling::pb::{
    self, CallPhase, EndReason, client_frame::Kind as C, server_frame::Kind as S,
};

fn phases_seen(sim: &Sim, name: &str, call: u64) -> Vec<CallPhase> {
    let mut v: Vec<CallPhase> = sim.received(name, |k| match k {
        S::CallState(s) if s.call_id == call => Some(s.phase()),
        _ => None,
    });
    v.dedup();
    v
}

#[test]
fn answered_call_connects_media_for_both_and_hangs_up_cleanly() {
    let mut sim = Sim::new(seed_from_env(31));
    sim.add("a").add("b");
    let call = sim.invite("a", "b");
    let incoming = sim.received("b", |k| match k {
        S::IncomingCall(i) => Some(i.clone()),
        _ => None,
    });
    assert_eq!(incoming.len(), 1);
    assert_eq!(incoming[0].from, "a");
    assert_eq!(incoming[0].ring_timeout_ms, 30_000);
    assert_eq!(sim.phase(call), CallPhase::Ringing);

    let op = sim.request("b", C::Accept(pb::Accept { call_id: call }));
    sim.run_for(ms(600));
    assert_eq!(sim.acked_call("b", op), call);
    assert_eq!(sim.phase(call), CallPhase::Active);
    assert_eq!(
        phases_seen(&sim, "a", call),
        vec![
            CallPhase::Inviting,
            CallPhase::Ringing,
            CallPhase::Connecting,
            CallPhase::Active
        ]
    );
    assert_eq!(
        phases_seen(&sim, "b", call),
        vec![CallPhase::Ringing, CallPhase::Connecting, CallPhase::Active]
    );
    // Both got an SDP answer from the SFU through the control stream.
    for dev in ["a", "b"] {
        let answers = sim.received(dev, |k| {
            matches!(k, S::SdpAnswer(a) if a.call_id == call).then_some(())
        });
        assert_eq!(answers.len(), 1, "{dev}");
    }
    assert_eq!(sim.sfu.participants.len(), 2);
    sim.check();

    sim.request("b", C::Hangup(pb::Hangup { call_id: call }));
    sim.run_for(ms(100));
    for dev in ["a", "b"] {
        let ended = sim.ended_for(dev, call);
        assert_eq!(ended.len(), 1, "{dev}");
        assert_eq!(ended[0].reason(), EndReason::Hangup);
        assert_eq!(ended[0].by, "b");
    }
    assert!(sim.sfu.participants.is_empty());
    let leaves = sim
        .sfu
        .commands
        .iter()
        .filter(|c| matches!(c, SfuCommand::Leave { .. }))
        .count();
    assert_eq!(leaves, 2);
    let t = &sim.ctl.stats().call_transitions;
    let to_end = Transition {
        from: CallPhase::Active,
        to: CallPhase::Ended,
        reason: Some(EndReason::Hangup),
    };
    assert_eq!(t.get(&to_end), Some(&1));
    sim.check();
}

#[test]
fn declined() {
    let mut sim = Sim::new(seed_from_env(32));
    sim.add("a").add("b");
    let call = sim.invite("a", "b");
    let op = sim.request("b", C::Decline(pb::Decline { call_id: call }));
    sim.run_for(ms(100));
    sim.acked_call("b", op);
    for dev in ["a", "b"] {
        let ended = sim.ended_for(dev, call);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].reason(), EndReason::Declined);
    }
    assert!(sim.sfu.participants.is_empty());
    sim.check();
}

#[test]
fn busy() {
    let mut sim = Sim::new(seed_from_env(33));
    sim.add("a").add("b").add("c");
    let first = sim.active_call("a", "b");
    let call = sim.invite("c", "b");
    let ended = sim.ended_for("c", call);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].reason(), EndReason::Busy);
    // b never heard of it, and its call goes on.
    assert!(
        sim.received("b", |k| {
            matches!(k, S::IncomingCall(i) if i.call_id == call).then_some(())
        })
        .is_empty()
    );
    assert_eq!(sim.phase(first), CallPhase::Active);
    // c's media participant was never created in the SFU.
    assert_eq!(sim.sfu.participants.len(), 2);
    // A caller already in a call is refused outright.
    let op = sim.request("a", C::Invite(pb::Invite { callee: "c".into() }));
    sim.run_for(ms(50));
    assert_eq!(sim.error_of("a", op), pb::ErrorCode::AlreadyInCall);
    sim.check();
}

#[test]
fn unavailable_when_unknown_or_offline() {
    let mut sim = Sim::new(seed_from_env(34));
    sim.add("a").add("b");
    let call = sim.invite("a", "nobody");
    assert_eq!(sim.ended_for("a", call)[0].reason(), EndReason::Unavailable);
    sim.drop_connection("b");
    let call = sim.invite("a", "b");
    assert_eq!(sim.ended_for("a", call)[0].reason(), EndReason::Unavailable);
    sim.check();
}

#[test]
fn ring_timeout() {
    let mut sim = Sim::new(seed_from_env(35));
    sim.add("a").add("b");
    let call = sim.invite("a", "b");
    let created = sim
        .ctl
        .call(fleetcall_signaling::ids::CallId(call))
        .unwrap()
        .created_at;
    sim.run_for(secs(29));
    assert_eq!(sim.phase(call), CallPhase::Ringing);
    let took = sim
        .run_until_cond(secs(2), |s| !s.ended_for("a", call).is_empty())
        .unwrap();
    assert!(took < secs(2));
    for dev in ["a", "b"] {
        let ended = sim.ended_for(dev, call);
        assert_eq!(ended.len(), 1, "{dev}");
        assert_eq!(ended[0].reason(), EndReason::RingTimeout);
    }
    let ended_at = sim
        .ctl
        .call(fleetcall_signaling::ids::CallId(call))
        .unwrap()
        .ended_at
        .unwrap();
    assert_eq!(ended_at - created, secs(30));
    assert!(sim.sfu.participants.is_empty());
    sim.check();
}

#[test]
fn cancelled_by_the_caller() {
    let mut sim = Sim::new(seed_from_env(36));
    sim.add("a").add("b");
    let call = sim.invite("a", "b");
    sim.request("a", C::Cancel(pb::Cancel { call_id: call }));
    sim.run_for(ms(100));
    for dev in ["a", "b"] {
        assert_eq!(sim.ended_for(dev, call)[0].reason(), EndReason::Cancelled);
    }
    // The callee cannot cancel.
    let call = sim.invite("a", "b");
    let op = sim.request("b", C::Cancel(pb::Cancel { call_id: call }));
    sim.run_for(ms(50));
    assert_eq!(sim.error_of("b", op), pb::ErrorCode::InvalidState);
    assert_eq!(sim.phase(call), CallPhase::Ringing);
    sim.check();
}

#[test]
fn accepting_an_ended_call_is_a_clear_error() {
    let mut sim = Sim::new(seed_from_env(37));
    sim.add("a").add("b");
    let call = sim.invite("a", "b");
    sim.request("a", C::Cancel(pb::Cancel { call_id: call }));
    sim.run_for(ms(100));
    let op = sim.request("b", C::Accept(pb::Accept { call_id: call }));
    sim.run_for(ms(50));
    assert_eq!(sim.error_of("b", op), pb::ErrorCode::CallEnded);
    sim.check();
}
