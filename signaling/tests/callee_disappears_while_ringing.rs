//! The callee vanishes while its device rings: the caller learns
//! `unavailable` within the detection bound, and nothing is left behind.

mod common;

use common::*;
use fleetcall_signaling::controller::Reachability;
use fleetcall_signaling::ids::DeviceId;
use fleetcall_signaling::pb::{CallPhase, CloseReason, EndReason};

#[test]
fn silent_callee_is_detected_and_the_caller_sees_unavailable_within_the_bound() {
    let mut sim = Sim::new(seed_from_env(11));
    sim.add("caller").add("callee");
    let call = sim.invite("caller", "callee");
    assert_eq!(sim.phase(call), CallPhase::Ringing);
    // The caller's media is already set up while it rings.
    assert!(sim.key_of("caller", call).is_some());
    assert_eq!(sim.sfu.participants.len(), 1);

    // The callee loses power: no FIN, its stream just stops.
    sim.freeze("callee");
    let bound = sim.ctl.config().detection_bound();
    let took = sim
        .run_until_cond(secs(30), |s| !s.ended_for("caller", call).is_empty())
        .expect("caller never learned the call ended");
    // Detection needs at least `unreachable_after` missed intervals, and the
    // fault struck mid-interval here, so the bound (+ link latency) holds.
    assert!(took <= bound + ms(20), "took {took:?}, bound {bound:?}");
    assert!(
        took >= secs(4),
        "declared unreachable too eagerly: {took:?}"
    );

    let ended = sim.ended_for("caller", call);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].reason(), EndReason::Unavailable);
    assert_eq!(ended[0].by, "callee");
    assert_eq!(sim.end_reason(call), Some(EndReason::Unavailable));

    // The stuck connection was closed by the server, the device is marked.
    assert_eq!(
        sim.dev("callee").closes,
        vec![CloseReason::HeartbeatTimeout]
    );
    let row = sim.ctl.device(&DeviceId::new("callee").unwrap()).unwrap();
    assert_eq!(row.reachability, Reachability::Unreachable);
    assert!(row.last_error.unwrap().contains("heartbeats missed"));
    // Media mappings are gone, the caller is free again.
    assert!(
        sim.sfu.participants.is_empty(),
        "{:?}",
        sim.sfu.participants
    );
    let caller = sim.ctl.device(&DeviceId::new("caller").unwrap()).unwrap();
    assert_eq!(caller.call, None);
    assert!(caller.participants.is_empty());
    let h = &sim.ctl.stats().fault_to_convergence;
    assert_eq!(h.count, 1);
    assert!(h.max <= bound, "{h:?}");
    sim.check();

    // The caller can place the next call at once.
    sim.add("other");
    let next = sim.invite("caller", "other");
    assert_eq!(sim.phase(next), CallPhase::Ringing);
    sim.check();
}

#[test]
fn callee_connection_closing_ends_the_ringing_call_at_once() {
    let mut sim = Sim::new(seed_from_env(12));
    sim.add("caller").add("callee");
    let call = sim.invite("caller", "callee");
    sim.drop_connection("callee");
    sim.run_for(ms(50));
    let ended = sim.ended_for("caller", call);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].reason(), EndReason::Unavailable);
    assert!(sim.sfu.participants.is_empty());
    sim.check();
    // When it comes back (resuming), it hears the call is over, once.
    sim.connect("callee", true);
    sim.run_for(ms(100));
    let ended = sim.ended_for("callee", call);
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0].reason(), EndReason::Unavailable);
    sim.check();
}

#[test]
fn inviting_a_device_that_is_already_unreachable_fails_fast() {
    let mut sim = Sim::new(seed_from_env(13));
    sim.add("caller").add("callee");
    sim.freeze("callee");
    sim.run_for(secs(9));
    let call = sim.invite("caller", "callee");
    let ended = sim.ended_for("caller", call);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].reason(), EndReason::Unavailable);
    sim.check();
}
