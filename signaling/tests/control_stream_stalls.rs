//! The control stream stops moving while the QUIC connection stays up.
//! Heartbeats on the message path catch it: degraded after 2 missed,
//! unreachable after 3, then the call converges.

mod common;

use common::*;
use fleetcall_signaling::controller::{Reachability, SfuCommand};
use fleetcall_signaling::ids::DeviceId;
use fleetcall_signaling::pb::{
    CallPhase, CloseReason, EndReason, ParticipantStatus, server_frame::Kind as S,
};

fn reach(sim: &Sim, name: &str) -> Reachability {
    sim.ctl
        .device(&DeviceId::new(name).unwrap())
        .unwrap()
        .reachability
}

#[test]
fn stalled_stream_goes_degraded_then_unreachable_and_the_call_converges() {
    let mut sim = Sim::new(seed_from_env(21));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    let b_key = sim.key_of("b", call).unwrap();
    let a_key = sim.key_of("a", call).unwrap();

    // Align to just after a heartbeat round trip so the timing is exact.
    sim.freeze("b");
    let frozen_at = sim.now;
    let degraded = sim
        .run_until_cond(secs(10), |s| reach(s, "b") == Reachability::Degraded)
        .unwrap();
    assert!(
        degraded > secs(2) && degraded <= secs(6),
        "degraded after {degraded:?}"
    );
    // The QUIC connection is still up: only the heartbeats tell.
    assert!(sim.dev("b").conn.is_some());
    sim.check();

    let unreachable = sim
        .run_until_cond(secs(10), |s| reach(s, "b") == Reachability::Unreachable)
        .unwrap();
    let since_freeze = sim.now - frozen_at;
    assert!(
        since_freeze <= sim.ctl.config().detection_bound(),
        "{since_freeze:?}"
    );
    assert!(unreachable <= secs(2) + ms(1));
    assert_eq!(sim.dev("b").closes, vec![CloseReason::HeartbeatTimeout]);
    assert_eq!(sim.ctl.stats().heartbeats_missed, 3);

    // Media still flows, so the call waits for a resume and tells the peer.
    assert_eq!(sim.phase(call), CallPhase::Active);
    sim.run_for(ms(50));
    let updates = sim.received("a", |k| match k {
        S::ParticipantUpdate(u) => Some((u.device_id.clone(), u.status())),
        _ => None,
    });
    assert!(
        updates.contains(&("b".into(), ParticipantStatus::Reconnecting)),
        "{updates:?}"
    );
    sim.check();

    // No resume within the grace: the call ends for everyone, media is removed.
    let grace = sim.ctl.config().resume_grace;
    let ended = sim
        .run_until_cond(grace + secs(1), |s| !s.ended_for("a", call).is_empty())
        .unwrap();
    assert!(ended <= grace);
    let e = &sim.ended_for("a", call)[0];
    assert_eq!(e.reason(), EndReason::ConnectionLost);
    assert_eq!(e.by, "b");
    let leaves: Vec<_> = sim
        .sfu
        .commands
        .iter()
        .filter_map(|c| match c {
            SfuCommand::Leave { participant, .. } => Some(*participant),
            _ => None,
        })
        .collect();
    assert!(
        leaves.contains(&a_key) && leaves.contains(&b_key),
        "{leaves:?}"
    );
    assert!(sim.sfu.participants.is_empty());
    assert_eq!(sim.ctl.stats().stale_sessions_swept, 1);
    assert_eq!(
        sim.ctl
            .device(&DeviceId::new("b").unwrap())
            .unwrap()
            .sessions,
        vec![]
    );
    sim.check();
}

#[test]
fn a_short_stall_degrades_and_recovers_without_touching_the_call() {
    let mut sim = Sim::new(seed_from_env(22));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    sim.freeze("b");
    sim.run_until_cond(secs(10), |s| reach(s, "b") == Reachability::Degraded)
        .unwrap();
    sim.unfreeze("b");
    sim.run_for(secs(3));
    assert_eq!(reach(&sim, "b"), Reachability::Online);
    assert_eq!(sim.phase(call), CallPhase::Active);
    assert!(sim.dev("b").closes.is_empty());
    let changes = &sim.ctl.stats().reachability_changes;
    assert_eq!(
        changes.get(&(Reachability::Online, Reachability::Degraded)),
        Some(&1)
    );
    assert_eq!(
        changes.get(&(Reachability::Degraded, Reachability::Online)),
        Some(&1)
    );
    sim.check();
}

#[test]
fn a_stream_stuck_in_one_direction_only_is_caught_too() {
    // The device keeps sending (its heartbeats reach the server) but nothing
    // reaches it: server heartbeats go unacked.
    let mut sim = Sim::new(seed_from_env(23));
    sim.add("a");
    sim.dev_mut("a").deaf = true;
    let received_before = sim.ctl.stats().heartbeats_received;
    let took = sim
        .run_until_cond(secs(20), |s| reach(s, "a") == Reachability::Unreachable)
        .unwrap();
    assert!(took <= sim.ctl.config().detection_bound());
    // Its own heartbeats kept arriving all along: they prove one direction only.
    assert!(sim.ctl.stats().heartbeats_received >= received_before + 2);
    // The close travels at the transport level, outside the stuck stream.
    assert_eq!(sim.dev("a").closes, vec![CloseReason::HeartbeatTimeout]);
    sim.check();
}
