//! Registration, version negotiation and heartbeats in both directions.

mod common;

use common::*;
use fleetcall_signaling::grants::Grant;
use fleetcall_signaling::controller::Reachability;
use fleetcall_signaling::ids::{ConnId, DeviceId};
use fleetcall_signaling::pb::{
    self, CloseReason, client_frame::Kind as C, server_frame::Kind as S,
};

#[test]
fn hello_gets_a_welcome_and_a_row_in_the_device_table() {
    let mut sim = Sim::new(seed_from_env(1));
    sim.add("ward3-bed12");
    let welcome = sim.received("ward3-bed12", |k| match k {
        S::Welcome(w) => Some(w.clone()),
        _ => None,
    });
    assert_eq!(welcome.len(), 1);
    let w = &welcome[0];
    assert_eq!(w.version, 1);
    assert!(!w.resumed);
    assert_eq!(w.heartbeat_interval_ms, 2000);
    assert_eq!(w.max_frame_bytes, 65536);
    assert_eq!(w.device_id, "ward3-bed12");
    assert_eq!(w.resume_token.len(), 16);

    let row = sim
        .ctl
        .device(&DeviceId::new("ward3-bed12").unwrap())
        .unwrap();
    assert_eq!(row.reachability, Reachability::Online);
    assert_eq!(row.version, "sim 1.0");
    assert_eq!(row.sessions.len(), 1);
    assert_eq!(row.sessions[0].0, w.session_id);
    assert_eq!(row.call, None);
    sim.check();
}

#[test]
fn heartbeats_flow_both_ways_and_measure_rtt_on_the_message_path() {
    let mut sim = Sim::new(seed_from_env(2));
    sim.add("a");
    sim.run_for(secs(20));
    let stats = sim.ctl.stats().clone();
    // One at the welcome, then one per 2 s interval.
    assert!((10..=12).contains(&stats.heartbeats_sent), "{stats:?}");
    assert!(stats.heartbeat_acks_received >= stats.heartbeats_sent - 1);
    assert_eq!(stats.heartbeats_missed, 0);
    // The device's own heartbeats are acked by the server.
    assert!(stats.heartbeats_received >= 9, "{stats:?}");
    let acks = sim.received("a", |k| matches!(k, S::HeartbeatAck(_)).then_some(()));
    assert_eq!(acks.len() as u64, stats.heartbeats_received);

    let row = sim.ctl.device(&DeviceId::new("a").unwrap()).unwrap();
    // 10 ms each way on the simulated link.
    assert_eq!(row.heartbeat_rtt, Some(ms(20)));
    assert!(row.last_heartbeat.is_some_and(|t| sim.now - t < secs(3)));
    assert_eq!(row.reachability, Reachability::Online);
    sim.check();
}

#[test]
fn browser_registers_over_json_too() {
    let mut sim = Sim::new(seed_from_env(3));
    sim.add_with("nurse-station", Transport::WebSocket, Auto::default());
    sim.run_for(secs(5));
    assert_eq!(sim.ctl.stats().heartbeats_missed, 0);
    sim.check();
}

#[test]
fn unsupported_version_is_rejected_and_closed() {
    let mut sim = Sim::new(seed_from_env(4));
    sim.add("a");
    let conn = ConnId(99);
    let now = sim.now;
    sim.ctl
        .handle_connection_up(now, common::UNIX_START, conn, common::credential("future", "future", Grant::device(Vec::new())));
    let hello = pb::ClientFrame {
        op_id: 0,
        kind: Some(C::Hello(pb::Hello {
            min_version: 2,
            max_version: 5,
            ..Default::default()
        })),
    };
    sim.ctl.handle_frame(now, conn, hello);
    let outs: Vec<_> = std::iter::from_fn(|| sim.ctl.poll_output()).collect();
    assert_eq!(outs.len(), 2, "{outs:?}");
    match &outs[0] {
        fleetcall_signaling::controller::Output::Send { conn: c, frame } => {
            assert_eq!(*c, conn);
            let Some(S::Rejected(r)) = &frame.kind else {
                panic!("{frame:?}")
            };
            assert_eq!(r.code(), pb::ErrorCode::UnsupportedVersion);
            assert_eq!((r.server_min_version, r.server_max_version), (1, 1));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        outs[1],
        fleetcall_signaling::controller::Output::Close {
            conn,
            reason: CloseReason::UnsupportedVersion
        }
    );
    // Nothing else was touched.
    sim.run_for(secs(5));
    assert_eq!(
        sim.ctl
            .device(&DeviceId::new("a").unwrap())
            .unwrap()
            .reachability,
        Reachability::Online
    );
    sim.check();
}

#[test]
fn a_connection_that_never_says_hello_is_closed() {
    let mut sim = Sim::new(seed_from_env(5));
    let now = sim.now;
    sim.ctl
        .handle_connection_up(now, common::UNIX_START, ConnId(7), common::credential("mute", "mute", Grant::device(Vec::new())));
    assert_eq!(sim.ctl.poll_timeout(), Some(now + secs(10)));
    sim.ctl.handle_timeout(now + secs(10));
    assert_eq!(
        sim.ctl.poll_output(),
        Some(fleetcall_signaling::controller::Output::Close {
            conn: ConnId(7),
            reason: CloseReason::HelloTimeout
        })
    );
    let row = sim.ctl.device(&DeviceId::new("mute").unwrap()).unwrap();
    assert_eq!(row.last_error.as_deref(), Some("no hello in time"));
}

#[test]
fn due_timers_fire_before_input_even_if_the_driver_is_late() {
    // The driver never called handle_timeout; a Hello arriving exactly at the
    // hello deadline still loses to the deadline.
    let mut sim = Sim::new(seed_from_env(6));
    let now = sim.now;
    let conn = ConnId(8);
    sim.ctl
        .handle_connection_up(now, common::UNIX_START, conn, common::credential("late", "late", Grant::device(Vec::new())));
    let hello = pb::ClientFrame {
        op_id: 0,
        kind: Some(C::Hello(pb::Hello {
            min_version: 1,
            max_version: 1,
            ..Default::default()
        })),
    };
    sim.ctl.handle_frame(now + secs(10), conn, hello.clone());
    let outs: Vec<_> = std::iter::from_fn(|| sim.ctl.poll_output()).collect();
    assert_eq!(
        outs,
        vec![fleetcall_signaling::controller::Output::Close {
            conn,
            reason: CloseReason::HelloTimeout
        }]
    );
    // Time never runs backwards: an older `now` is clamped to the latest
    // seen (+10 s), so this connection's own deadline is +20 s and its Hello
    // is welcomed; the heartbeat timestamp shows the clamped time.
    sim.ctl
        .handle_connection_up(now, common::UNIX_START, ConnId(9), common::credential("early", "early", Grant::device(Vec::new())));
    sim.ctl
        .handle_frame(now + secs(10) - ms(1), ConnId(9), hello);
    let outs: Vec<_> = std::iter::from_fn(|| sim.ctl.poll_output()).collect();
    let kinds: Vec<_> = outs
        .iter()
        .map(|o| match o {
            fleetcall_signaling::controller::Output::Send { frame, .. } => frame.kind.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(matches!(kinds[0], Some(S::Welcome(_))));
    assert!(matches!(kinds[1], Some(S::Heartbeat(ref h)) if h.sent_at_ms == 10_000));
}
