//! The controller decides what happens to a participant the SFU cannot
//! serve, and tells the SFU why each participant leaves: the bridge only
//! carries the messages.

mod common;

use common::*;
use fleetcall_signaling::controller::{LeaveReason, SfuCommand, SfuNotice};
use fleetcall_signaling::ids::ParticipantKey;
use fleetcall_signaling::pb::{self, CallPhase, EndReason, client_frame::Kind as C};

fn leaves(sim: &Sim) -> Vec<(ParticipantKey, LeaveReason)> {
    sim.sfu
        .commands
        .iter()
        .filter_map(|c| match c {
            SfuCommand::Leave { participant, reason } => Some((*participant, *reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn an_sdp_the_sfu_cannot_use_takes_only_that_participant_out() {
    let mut sim = Sim::new(seed_from_env(131));
    sim.add("owner").add("b").add("c");
    let call = sim.group("owner", &["b", "c"]);
    let b = sim.key_of("b", call).unwrap();
    let now = sim.now;
    sim.ctl.handle_sfu(
        now,
        SfuNotice::NegotiationFailed { participant: b, error: "invalid SDP answer: no m-line".into() },
    );
    sim.drain();
    sim.run_for(ms(100));
    // One Leave, for the reason the SFU counts it under.
    assert_eq!(leaves(&sim), vec![(b, LeaveReason::NegotiationFailed)]);
    let ended = sim.ended_for("b", call);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].reason(), EndReason::MediaFailed);
    assert!(ended[0].detail.contains("invalid SDP answer"), "{}", ended[0].detail);
    assert_eq!(sim.phase(call), CallPhase::Active, "the others go on");
    assert_eq!(sim.sfu.participants.len(), 2);
    // A late notice about it changes nothing.
    let now = sim.now;
    sim.ctl.handle_sfu(now, SfuNotice::NegotiationFailed { participant: b, error: "again".into() });
    sim.drain();
    assert_eq!(leaves(&sim).len(), 1);
    sim.check();
}

#[test]
fn only_the_device_whose_session_was_lost_leaves_as_signaling_closed() {
    let mut sim = Sim::new(seed_from_env(132));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    let (a, b) = (sim.key_of("a", call).unwrap(), sim.key_of("b", call).unwrap());
    sim.drop_connection("a");
    // Past the resume grace: a's session is swept, the call ends.
    sim.run_for(secs(30));
    assert_eq!(sim.end_reason(call), Some(EndReason::ConnectionLost));
    let mut got = leaves(&sim);
    got.sort_by_key(|(key, _)| *key);
    let mut want = vec![(a, LeaveReason::SignalingClosed), (b, LeaveReason::Requested)];
    want.sort_by_key(|(key, _)| *key);
    assert_eq!(got, want);
    sim.check();
}

#[test]
fn a_hangup_and_a_shutdown_say_so() {
    let mut sim = Sim::new(seed_from_env(133));
    sim.add("a").add("b").add("c").add("d");
    let first = sim.active_call("a", "b");
    sim.request("a", C::Hangup(pb::Hangup { call_id: first }));
    sim.run_for(ms(100));
    assert!(leaves(&sim).iter().all(|(_, reason)| *reason == LeaveReason::Requested), "{:?}", leaves(&sim));
    assert_eq!(leaves(&sim).len(), 2);

    let second = sim.active_call("c", "d");
    let before = leaves(&sim).len();
    let now = sim.now;
    sim.ctl.handle_shutdown(now);
    sim.drain();
    let after = &leaves(&sim)[before..];
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(after.iter().all(|(_, reason)| *reason == LeaveReason::Shutdown), "{after:?}");
    assert_eq!(sim.end_reason(second), Some(EndReason::ServerShutdown));
}
