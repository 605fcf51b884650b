//! Removals are keyed by session id + epoch: a late notice or timer for an
//! old participation never touches a newer one.

mod common;

use common::*;
use fleetcall_signaling::controller::SfuNotice;
use fleetcall_signaling::pb::{self, CallPhase, ParticipantStatus, client_frame::Kind as C};

#[test]
fn a_late_removal_for_an_old_participation_is_ignored() {
    let mut sim = Sim::new(seed_from_env(111));
    sim.add("owner").add("b");
    let call = sim.group("owner", &["b"]);
    let old = sim.key_of("b", call).unwrap();
    // b leaves and rejoins in the same session: a new participation.
    sim.request("b", C::GroupLeave(pb::GroupLeave { call_id: call }));
    sim.run_for(ms(100));
    sim.request("b", C::GroupJoin(pb::GroupJoin { call_id: call }));
    sim.run_for(secs(1));
    let new = sim.key_of("b", call).unwrap();
    assert_eq!(old.session, new.session);
    assert_ne!(old.epoch, new.epoch);

    // The SFU's notices about the old one arrive late.
    let now = sim.now;
    for notice in [
        SfuNotice::Removed {
            participant: old,
            reason: RemovalReason::IceTimeout,
        },
        SfuNotice::Connected { participant: old },
        SfuNotice::Offer {
            participant: old,
            sdp: sdp("v=0"),
        },
        SfuNotice::Joined {
            participant: old,
            answer_sdp: sdp("v=0"),
            media_id: 99,
        },
    ] {
        sim.ctl.handle_sfu(now, notice);
        sim.drain();
    }
    assert_eq!(sim.ctl.stats().stale_sfu_notices, 4);
    let snap = sim
        .ctl
        .call(fleetcall_signaling::ids::CallId(call))
        .unwrap();
    let b = snap
        .members
        .iter()
        .find(|(d, _, _)| d.as_str() == "b")
        .unwrap();
    assert_eq!((b.1, b.2), (ParticipantStatus::Connected, Some(new)));
    assert!(sim.sfu.participants.contains_key(&new));
    assert_eq!(sim.phase(call), CallPhase::Active);
    sim.check();
}

#[test]
fn a_fresh_session_replaces_the_old_one_and_its_call() {
    let mut sim = Sim::new(seed_from_env(112));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    // b restarts its app: a fresh Hello without resume.
    sim.reconnect("b", false);
    sim.run_for(ms(100));
    assert_eq!(sim.end_reason(call), Some(pb::EndReason::ConnectionLost));
    assert!(sim.sfu.participants.is_empty());
    assert_eq!(sim.ctl.stats().sessions_replaced, 1);
    sim.check();
}
