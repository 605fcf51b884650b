//! Every media setup step has its own deadline: device offer, SFU join,
//! ICE connect. A failure or a timeout ends the call with the reason.

mod common;

use common::*;
use fleetcall_signaling::ids::DeviceId;
use fleetcall_signaling::pb::{self, CallPhase, EndReason, client_frame::Kind as C};

#[test]
fn device_that_never_offers_media() {
    let mut sim = Sim::new(seed_from_env(101));
    sim.add("a").add("b");
    sim.dev_mut("b").auto.media = false;
    let call = sim.invite("a", "b");
    sim.request("b", C::Accept(pb::Accept { call_id: call }));
    sim.run_for(secs(9));
    assert_eq!(sim.phase(call), CallPhase::Connecting);
    sim.run_for(secs(2));
    let e = &sim.ended_for("a", call)[0];
    assert_eq!((e.reason(), e.by.as_str()), (EndReason::SetupTimeout, "b"));
    assert!(e.detail.contains("offer"));
    assert!(sim.sfu.participants.is_empty());
    sim.check();
}

#[test]
fn sfu_that_never_answers_the_join() {
    let mut sim = Sim::new(seed_from_env(102));
    sim.add("a").add("b");
    sim.sfu.silent = true;
    let call = sim.invite("a", "b");
    sim.run_for(secs(6));
    let e = &sim.ended_for("a", call)[0];
    assert_eq!(e.reason(), EndReason::SetupTimeout);
    assert!(e.detail.contains("media server"));
    // The ringing callee hears it too, and the SFU got a Leave.
    assert_eq!(sim.ended_for("b", call).len(), 1);
    assert!(sim.sfu.participants.is_empty());
    sim.check();
}

#[test]
fn media_that_never_connects() {
    let mut sim = Sim::new(seed_from_env(103));
    sim.add("a").add("b");
    sim.sfu.no_media.insert(DeviceId::new("b").unwrap());
    let call = sim.invite("a", "b");
    sim.request("b", C::Accept(pb::Accept { call_id: call }));
    sim.run_for(secs(14));
    assert_eq!(sim.phase(call), CallPhase::Connecting);
    sim.run_for(secs(2));
    let e = &sim.ended_for("a", call)[0];
    assert_eq!((e.reason(), e.by.as_str()), (EndReason::SetupTimeout, "b"));
    assert!(sim.sfu.participants.is_empty());
    let h = &sim.ctl.stats().fault_to_convergence;
    assert_eq!(h.count, 1);
    assert_eq!(h.max, secs(15));
    sim.check();
}

#[test]
fn sfu_refusing_the_join() {
    let mut sim = Sim::new(seed_from_env(104));
    sim.add("a").add("b");
    sim.sfu.refuse.insert(DeviceId::new("b").unwrap());
    let call = sim.invite("a", "b");
    sim.request("b", C::Accept(pb::Accept { call_id: call }));
    sim.run_for(secs(1));
    let e = &sim.ended_for("b", call)[0];
    assert_eq!(e.reason(), EndReason::MediaFailed);
    assert!(sim.sfu.participants.is_empty());
    sim.check();
}

#[test]
fn sfu_losing_a_participant_mid_call() {
    let mut sim = Sim::new(seed_from_env(105));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    let key = sim.key_of("a", call).unwrap();
    sim.sfu_remove(key, RemovalReason::IceTimeout);
    sim.run_for(ms(100));
    for d in ["a", "b"] {
        let e = &sim.ended_for(d, call)[0];
        assert_eq!((e.reason(), e.by.as_str()), (EndReason::MediaFailed, "a"));
    }
    assert!(sim.sfu.participants.is_empty());
    sim.check();
}
