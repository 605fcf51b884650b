//! The same hangup delivered twice (a retransmission after a reconnect, or
//! a second tap): one terminal state, one terminal event per device, and
//! the same reply.

mod common;

use common::*;
use fleetcall_signaling::pb::{self, EndReason, client_frame::Kind as C, server_frame::Kind as S};

#[test]
fn same_op_id_twice_is_answered_from_the_cache() {
    let mut sim = Sim::new(seed_from_env(61));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    let op = sim.request("a", C::Hangup(pb::Hangup { call_id: call }));
    sim.request_with_op("a", op, C::Hangup(pb::Hangup { call_id: call }));
    sim.run_for(ms(100));
    let replies: Vec<_> = sim
        .dev("a")
        .inbox
        .iter()
        .filter(|(_, f)| f.reply_to == op)
        .map(|(_, f)| f.clone())
        .collect();
    assert_eq!(replies.len(), 2);
    // Same reply, delivered again under a new session seq.
    assert_eq!(replies[0].kind, replies[1].kind);
    assert!(replies[1].seq > replies[0].seq);
    assert!(matches!(replies[0].kind, Some(S::Ack(_))));
    assert_eq!(sim.ctl.stats().duplicate_requests, 1);
    for dev in ["a", "b"] {
        assert_eq!(sim.ended_for(dev, call).len(), 1, "{dev}");
    }
    sim.check();
}

#[test]
fn a_new_hangup_for_an_ended_call_is_a_harmless_ack() {
    let mut sim = Sim::new(seed_from_env(62));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    sim.request("a", C::Hangup(pb::Hangup { call_id: call }));
    sim.run_for(ms(100));
    let op_b = sim.request("b", C::Hangup(pb::Hangup { call_id: call }));
    let op_a = sim.request("a", C::Hangup(pb::Hangup { call_id: call }));
    sim.run_for(ms(100));
    assert!(matches!(
        sim.reply("a", op_a).unwrap().kind,
        Some(S::Ack(_))
    ));
    assert!(matches!(
        sim.reply("b", op_b).unwrap().kind,
        Some(S::Ack(_))
    ));
    for dev in ["a", "b"] {
        let ended = sim.ended_for(dev, call);
        assert_eq!(ended.len(), 1, "{dev}");
        assert_eq!(ended[0].reason(), EndReason::Hangup);
        assert_eq!(ended[0].by, "a");
    }
    // A stranger gets a clear error, not an ack.
    sim.add("c");
    let op_c = sim.request("c", C::Hangup(pb::Hangup { call_id: call }));
    sim.run_for(ms(100));
    assert_eq!(sim.error_of("c", op_c), pb::ErrorCode::NotInCall);
    sim.check();
}

#[test]
fn the_hangup_retried_after_a_resume_is_not_executed_twice() {
    let mut sim = Sim::new(seed_from_env(63));
    sim.add("a").add("b").add("c");
    let call = sim.active_call("a", "b");
    // a hangs up, but its connection drops before the reply arrives.
    sim.dev_mut("a").latency = ms(10);
    let op = sim.request("a", C::Hangup(pb::Hangup { call_id: call }));
    sim.run_for(ms(15)); // the request reached the server, the reply is in flight
    sim.drop_connection("a");
    assert!(sim.reply("a", op).is_none());
    // Meanwhile b is in a new call with c.
    let next = sim.active_call("b", "c");
    // a resumes and retries the same op: same reply, nothing else happens.
    sim.connect("a", true);
    sim.run_for(ms(50));
    sim.request_with_op("a", op, C::Hangup(pb::Hangup { call_id: call }));
    sim.run_for(ms(100));
    assert!(matches!(sim.reply("a", op).unwrap().kind, Some(S::Ack(_))));
    // The reply and the CallEnded that were lost in flight were replayed by
    // the resume, and only once.
    assert_eq!(sim.ended_for("a", call).len(), 1);
    assert_eq!(
        sim.dev("a")
            .inbox
            .iter()
            .filter(|(_, f)| f.reply_to == op)
            .count(),
        2
    );
    assert_eq!(sim.ended_for("b", call).len(), 1);
    assert_eq!(sim.phase(next), pb::CallPhase::Active);
    assert_eq!(sim.ctl.stats().duplicate_requests, 1);
    sim.check();
}
