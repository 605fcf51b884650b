//! A timeout and a manual hangup in the same millisecond: exactly one
//! terminal state, exactly one terminal event per device.

mod common;

use common::*;
use fleetcall_signaling::ids::{CallId, DeviceId};
use fleetcall_signaling::pb::{
    self, CallPhase, EndReason, client_frame::Kind as C, server_frame::Kind as S,
};

#[test]
fn ring_timeout_and_cancel_at_the_same_instant() {
    let mut sim = Sim::new(seed_from_env(41));
    sim.add("a").add("b");
    let call = sim.invite("a", "b");
    let deadline = sim.ctl.call(CallId(call)).unwrap().created_at + sim.ctl.config().ring_timeout;
    // Send so that the cancel arrives exactly at the ring deadline.
    let latency = sim.dev("a").latency;
    sim.run_until(deadline - latency);
    assert_eq!(sim.phase(call), CallPhase::Ringing);
    let op = sim.request("a", C::Cancel(pb::Cancel { call_id: call }));
    // b answers in the same instant too.
    let op_b = sim.request("b", C::Accept(pb::Accept { call_id: call }));
    sim.run_for(secs(1));

    // Timers due at an instant fire before input at that instant: the
    // timeout wins, the cancel finds an ended call and succeeds idempotently.
    assert_eq!(sim.end_reason(call), Some(EndReason::RingTimeout));
    assert!(matches!(sim.reply("a", op).unwrap().kind, Some(S::Ack(_))));
    assert_eq!(sim.error_of("b", op_b), pb::ErrorCode::CallEnded);
    for dev in ["a", "b"] {
        let ended = sim.ended_for(dev, call);
        assert_eq!(ended.len(), 1, "{dev}: {ended:?}");
        assert_eq!(ended[0].reason(), EndReason::RingTimeout);
    }
    let ends: u64 = sim
        .ctl
        .stats()
        .call_transitions
        .iter()
        .filter(|(t, _)| t.to == CallPhase::Ended)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(ends, 1);
    sim.check();
}

#[test]
fn connect_timeout_and_hangups_from_both_sides_at_the_same_instant() {
    let mut sim = Sim::new(seed_from_env(42));
    sim.add("a").add("b");
    // b's media never connects, so its connect deadline will fire.
    sim.sfu.no_media.insert(DeviceId::new("b").unwrap());
    let call = sim.invite("a", "b");
    sim.request("b", C::Accept(pb::Accept { call_id: call }));
    sim.run_for(ms(100));
    assert_eq!(sim.phase(call), CallPhase::Connecting);

    // The connect deadline runs from the moment the server relayed the SFU's
    // answer to b, one link latency before b received it.
    let latency = sim.dev("b").latency;
    let answer_arrived = sim
        .dev("b")
        .inbox
        .iter()
        .find(|(_, f)| matches!(&f.kind, Some(S::SdpAnswer(a)) if a.call_id == call))
        .map(|(t, _)| *t)
        .unwrap();
    let deadline = answer_arrived - latency + sim.ctl.config().connect_timeout;
    // Both hang up so that their requests arrive exactly at the deadline.
    sim.run_until(deadline - latency);
    assert_eq!(sim.phase(call), CallPhase::Connecting);
    let op_a = sim.request("a", C::Hangup(pb::Hangup { call_id: call }));
    let op_b = sim.request("b", C::Hangup(pb::Hangup { call_id: call }));
    sim.run_for(secs(1));

    let ended_at = sim.ctl.call(CallId(call)).unwrap().ended_at.unwrap();
    assert_eq!(ended_at, deadline, "the timeout fired at its deadline");
    assert_eq!(sim.end_reason(call), Some(EndReason::SetupTimeout));
    for (dev, op) in [("a", op_a), ("b", op_b)] {
        assert!(
            matches!(sim.reply(dev, op).unwrap().kind, Some(S::Ack(_))),
            "{dev}"
        );
        let ended = sim.ended_for(dev, call);
        assert_eq!(ended.len(), 1, "{dev}: {ended:?}");
        assert_eq!(ended[0].reason(), EndReason::SetupTimeout);
        assert_eq!(ended[0].by, "b");
    }
    assert!(sim.sfu.participants.is_empty());
    sim.check();
}

#[test]
fn two_hangups_at_the_same_instant_end_the_call_once() {
    let mut sim = Sim::new(seed_from_env(43));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    let op_a = sim.request("a", C::Hangup(pb::Hangup { call_id: call }));
    let op_b = sim.request("b", C::Hangup(pb::Hangup { call_id: call }));
    sim.run_for(ms(100));
    // Both frames arrive in the same millisecond; the first processed wins.
    assert_eq!(sim.end_reason(call), Some(EndReason::Hangup));
    for (dev, op) in [("a", op_a), ("b", op_b)] {
        assert!(
            matches!(sim.reply(dev, op).unwrap().kind, Some(S::Ack(_))),
            "{dev}"
        );
        let ended = sim.ended_for(dev, call);
        assert_eq!(ended.len(), 1, "{dev}");
        assert_eq!(ended[0].by, "a");
    }
    sim.check();
}
