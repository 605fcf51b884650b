//! The controller's limits, crossed one by one in virtual time: the message
//! rate per connection, devices per node, live calls per node, invitations
//! ringing per device, members per call and room, and the outbound queue of
//! a connection that stops reading. Each test asserts the clear error or
//! close, the counted refusal, that just under the limit works, and that a
//! bystanders' call on the same controller goes on untouched: its frames
//! keep being answered, its state does not change, and nothing (session,
//! timer, SFU participant) is left behind by the offender.

mod common;

use std::time::Instant;

use common::*;
use fleetcall_signaling::controller::{Config, Controller, Gauges, Reachability, Refusal};
use fleetcall_signaling::grants::Grant;
use fleetcall_signaling::ids::{CallId, DeviceId};
use fleetcall_signaling::pb::{
    self, CallPhase, ClientFrame, CloseReason, EndReason, ErrorCode, client_frame::Kind as C,
    server_frame::Kind as S,
};
use fleetcall_signaling::service::ControlPlane;

fn errors(sim: &Sim, name: &str) -> Vec<ErrorCode> {
    sim.received(name, |k| match k {
        S::Error(e) => Some(e.code()),
        _ => None,
    })
}

fn count(codes: &[ErrorCode], code: ErrorCode) -> usize {
    codes.iter().filter(|c| **c == code).count()
}

fn refused(sim: &Sim, limit: Refusal) -> u64 {
    sim.ctl.stats().refused.get(&limit).copied().unwrap_or(0)
}

fn closed(sim: &Sim, reason: CloseReason) -> u64 {
    sim.ctl.stats().connections_closed.get(&reason).copied().unwrap_or(0)
}

fn heartbeat_acks(sim: &Sim, name: &str) -> usize {
    sim.received(name, |k| matches!(k, S::HeartbeatAck(_)).then_some(())).len()
}

fn incoming(sim: &Sim, name: &str) -> Vec<u64> {
    sim.received(name, |k| match k {
        S::IncomingCall(i) => Some(i.call_id),
        _ => None,
    })
}

fn live_calls(g: &Gauges) -> u64 {
    g.calls_by_phase.iter().filter(|(p, _)| **p != CallPhase::Ended).map(|(_, n)| n).sum()
}

/// A room grant for WebSocket devices is the harness's default; QUIC ones
/// get a certificate without rooms.
fn browser(sim: &mut Sim, name: &str) {
    sim.add_with(name, Transport::WebSocket, Auto::default());
}

/// The bystanders' 1:1 call `call` between `a` and `b`, five seconds on:
/// still active with the same members, both online, no error, and their
/// heartbeats still answered since `acks` (their counts when the offender
/// started).
fn bystanders_untouched(sim: &mut Sim, call: u64, before: &[(DeviceId, pb::ParticipantStatus, Option<fleetcall_signaling::ids::ParticipantKey>)], acks: (usize, usize)) {
    sim.run_for(secs(5));
    let sim = &*sim;
    assert_eq!(sim.phase(call), CallPhase::Active, "the bystanders' call goes on");
    assert_eq!(sim.ctl.call(CallId(call)).unwrap().members, before, "and is unchanged");
    for (name, before) in [("a", acks.0), ("b", acks.1)] {
        assert!(errors(sim, name).is_empty(), "{name} got errors: {:?}", errors(sim, name));
        assert!(sim.dev(name).closes.is_empty(), "{name} was closed");
        assert!(heartbeat_acks(sim, name) >= before + 2, "{name}'s heartbeats are still answered");
        let row = sim.ctl.device(&DeviceId::new(name).unwrap()).unwrap();
        assert_eq!(row.reachability, Reachability::Online, "{name}");
    }
}

/// A bystanders' active call between `a` and `b`, settled.
fn bystanders(sim: &mut Sim) -> u64 {
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    sim.run_for(secs(3));
    call
}

/// What the offender must not leave behind: compared with the gauges
/// before it came.
fn nothing_left_behind(before: &Gauges, after: &Gauges) {
    assert_eq!(after.sessions, before.sessions, "sessions");
    assert_eq!(after.connections, before.connections, "connections");
    assert_eq!(after.sfu_participants, before.sfu_participants, "SFU participants");
    assert_eq!(after.timers, before.timers, "timers");
    assert_eq!(live_calls(after), live_calls(before), "live calls");
}

// ---- messages per second per connection -----------------------------------

#[test]
fn a_flooding_connection_is_refused_then_closed_and_nobody_else_notices() {
    let mut sim = Sim::new(seed_from_env(1501));
    let call = bystanders(&mut sim);
    let baseline = sim.ctl.gauges();
    let members = sim.ctl.call(CallId(call)).unwrap().members;
    let acks = (heartbeat_acks(&sim, "a"), heartbeat_acks(&sim, "b"));
    let config = sim.ctl.config().clone();
    let (burst, budget) = (config.message_burst as usize, config.max_rate_limited_frames as usize);

    sim.add("mallory");
    // 300 requests at once: far over any burst.
    let ops: Vec<u64> = (0..300).map(|_| sim.request("mallory", C::Hangup(pb::Hangup { call_id: 9_999 }))).collect();
    sim.run_for(ms(200));

    let errs = errors(&sim, "mallory");
    let processed = count(&errs, ErrorCode::UnknownCall);
    let limited = count(&errs, ErrorCode::RateLimited);
    // The bucket, less the Hello and heartbeat ack it already paid for.
    assert!((burst - 3..burst).contains(&processed), "{processed} of a burst of {burst} processed");
    // Every refused frame is answered, until the budget is spent: then the close.
    assert_eq!(limited, budget + 1, "refusals before the close");
    assert_eq!(sim.dev("mallory").closes, vec![CloseReason::RateLimited]);
    match sim.reply("mallory", ops[processed]).and_then(|f| f.kind.as_ref()) {
        Some(S::Error(e)) => {
            assert_eq!(e.code(), ErrorCode::RateLimited);
            assert!(e.message.contains("messages a second"), "{}", e.message);
        }
        other => panic!("the first refused request is answered RATE_LIMITED, got {other:?}"),
    }
    assert!(sim.reply("mallory", *ops.last().unwrap()).is_none(), "nothing after the close is processed");
    assert_eq!(refused(&sim, Refusal::RateLimited), limited as u64);
    assert_eq!(closed(&sim, CloseReason::RateLimited), 1);
    let row = sim.ctl.device(&DeviceId::new("mallory").unwrap()).unwrap();
    assert!(row.last_error.unwrap().contains("message rate"));

    // The bystanders' call goes on; mallory's session is swept after the
    // grace and nothing of it is left.
    sim.run_for(config.resume_grace + secs(2));
    bystanders_untouched(&mut sim, call, &members, acks);
    nothing_left_behind(&baseline, &sim.ctl.gauges());
    sim.check();
}

#[test]
fn a_full_burst_then_just_under_the_rate_is_never_refused() {
    let mut sim = Sim::new(seed_from_env(1502));
    let config = sim.ctl.config().clone();
    sim.add("a");
    // Quiet long enough for the bucket to be full.
    sim.run_for(secs(10));
    // Two frames short of the bucket: the device's own heartbeat and its
    // ack of the server's may share the instant.
    let burst = config.message_burst as usize - 2;
    for _ in 0..burst {
        sim.request("a", C::Hangup(pb::Hangup { call_id: 9_999 }));
    }
    sim.run_for(ms(100));
    assert_eq!(count(&errors(&sim, "a"), ErrorCode::UnknownCall), burst, "the whole burst is processed");
    // Then, with the bucket empty, just under the rate for a minute: one
    // request every 56 ms (17.9/s) on top of heartbeats both ways (1/s).
    for _ in 0..(60_000 / 56) {
        sim.request("a", C::Hangup(pb::Hangup { call_id: 9_999 }));
        sim.run_for(ms(56));
    }
    sim.run_for(ms(100));
    assert_eq!(count(&errors(&sim, "a"), ErrorCode::RateLimited), 0);
    assert_eq!(refused(&sim, Refusal::RateLimited), 0);
    assert!(sim.dev("a").closes.is_empty());
    sim.check();
}

#[test]
fn a_class_joining_one_room_together_is_never_rate_limited() {
    // Sixty browsers join one room within three seconds; every member
    // answers a renegotiation offer for each newcomer (the fake SFU does not
    // even coalesce them).
    let mut sim = Sim::new(seed_from_env(1503));
    let names: Vec<String> = (0..60).map(|i| format!("pupil-{i}")).collect();
    for name in &names {
        browser(&mut sim, name);
        sim.request(name, C::RoomJoin(pb::RoomJoin { room: "class-4b".into() }));
        sim.run_for(ms(50));
    }
    sim.run_for(secs(5));
    let call = sim.ctl.calls().into_iter().find(|c| c.name == "class-4b").expect("the room is open");
    assert_eq!(call.members.len(), names.len());
    assert!(call.members.iter().all(|(_, s, _)| *s == pb::ParticipantStatus::Connected), "{:?}", call.members);
    let offers = sim.received("pupil-0", |k| matches!(k, S::SdpOffer(_)).then_some(())).len();
    assert!(offers >= names.len() - 5, "the first pupil answered an offer per newcomer ({offers})");
    let limited = sim.ctl.stats().errors_sent.get(&ErrorCode::RateLimited).copied().unwrap_or(0);
    assert_eq!(limited, 0, "nobody was rate limited");
    for name in &names {
        assert!(sim.dev(name).closes.is_empty(), "{name} closed");
    }
    sim.check();
}

// ---- devices per node -------------------------------------------------------

#[test]
fn a_device_over_the_node_cap_is_refused_but_known_devices_get_back_in() {
    let mut config = Config::default();
    config.max_devices = 3;
    let mut sim = Sim::with_config(seed_from_env(1504), config.clone());
    let call = bystanders(&mut sim);
    let members = sim.ctl.call(CallId(call)).unwrap().members;
    let acks = (heartbeat_acks(&sim, "a"), heartbeat_acks(&sim, "b"));
    sim.add("c");
    let at_cap = sim.ctl.gauges();
    assert_eq!(at_cap.sessions, 3);

    sim.add_unwelcomed("d", Transport::Quic, Auto::default(), credential("d", "d", Grant::device(Vec::new())));
    sim.run_for(ms(200));
    let rejected: Vec<_> = sim.received("d", |k| match k {
        S::Rejected(r) => Some((r.code(), r.reason.clone())),
        _ => None,
    });
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].0, ErrorCode::Overloaded);
    assert!(rejected[0].1.contains("most devices"), "{}", rejected[0].1);
    assert_eq!(sim.dev("d").closes, vec![CloseReason::Overloaded]);
    assert!(sim.dev("d").session.is_none());
    assert_eq!(refused(&sim, Refusal::Devices), 1);
    assert_eq!(closed(&sim, CloseReason::Overloaded), 1);
    nothing_left_behind(&at_cap, &sim.ctl.gauges());

    // At the cap a known device still gets back in: c resumes its session,
    // then reboots (a fresh Hello replaces its own session).
    sim.reconnect("c", true);
    sim.run_for(ms(200));
    let welcomes: Vec<bool> = sim.received("c", |k| match k {
        S::Welcome(w) => Some(w.resumed),
        _ => None,
    });
    assert_eq!(welcomes, vec![false, true], "c resumed at the cap");
    sim.reconnect("c", false);
    sim.run_for(ms(200));
    let welcomes = sim.received("c", |k| matches!(k, S::Welcome(_)).then_some(())).len();
    assert_eq!(welcomes, 3, "c replaced its own session at the cap");
    assert_eq!(refused(&sim, Refusal::Devices), 1, "neither was refused");
    assert_eq!(sim.ctl.gauges().sessions, 3);

    // Just under the cap: once c is gone, d gets in.
    sim.drop_connection("c");
    sim.run_for(config.resume_grace + secs(1));
    sim.connect("d", false);
    sim.run_for(ms(200));
    assert!(sim.dev("d").session.is_some(), "d is welcomed under the cap");
    bystanders_untouched(&mut sim, call, &members, acks);
    sim.check();
}

// ---- live calls per node ----------------------------------------------------

#[test]
fn a_new_call_over_the_node_cap_is_refused_while_live_ones_take_members() {
    let mut config = Config::default();
    config.max_calls = 2;
    let mut sim = Sim::with_config(seed_from_env(1505), config);
    let call = bystanders(&mut sim);
    let members = sim.ctl.call(CallId(call)).unwrap().members;
    for name in ["c", "e", "g"] {
        browser(&mut sim, name);
    }
    sim.add("f");
    let op = sim.request("c", C::RoomJoin(pb::RoomJoin { room: "r1".into() }));
    sim.run_for(secs(1));
    let room = sim.acked_call("c", op);
    let acks = (heartbeat_acks(&sim, "a"), heartbeat_acks(&sim, "b"));
    let before = sim.ctl.gauges();
    let calls_before = sim.ctl.calls().len();
    assert_eq!(live_calls(&before), 2);

    let invite = sim.request("e", C::Invite(pb::Invite { callee: "f".into() }));
    let open = sim.request("e", C::RoomJoin(pb::RoomJoin { room: "r2".into() }));
    let group = sim.request("e", C::GroupCreate(pb::GroupCreate { name: "x".into(), invitees: vec!["f".into()] }));
    sim.run_for(ms(200));
    for op in [invite, open, group] {
        assert_eq!(sim.error_of("e", op), ErrorCode::Overloaded);
    }
    match sim.reply("e", invite).and_then(|f| f.kind.as_ref()) {
        Some(S::Error(e)) => assert!(e.message.contains("most calls"), "{}", e.message),
        other => panic!("{other:?}"),
    }
    assert!(incoming(&sim, "f").is_empty(), "f was not rung");
    assert_eq!(refused(&sim, Refusal::Calls), 3);
    assert_eq!(sim.ctl.calls().len(), calls_before, "no call was made, not even an ended one");
    nothing_left_behind(&before, &sim.ctl.gauges());

    // Joining a live room still works at the cap.
    let op = sim.request("g", C::RoomJoin(pb::RoomJoin { room: "r1".into() }));
    sim.run_for(secs(1));
    assert_eq!(sim.acked_call("g", op), room);
    bystanders_untouched(&mut sim, call, &members, acks);

    // Just under the cap: the bystanders hang up, and e's call goes through.
    sim.request("a", C::Hangup(pb::Hangup { call_id: call }));
    sim.run_for(ms(200));
    let op = sim.request("e", C::Invite(pb::Invite { callee: "f".into() }));
    sim.run_for(ms(200));
    let new = sim.acked_call("e", op);
    assert_eq!(incoming(&sim, "f"), vec![new]);
    sim.check();
}

// ---- invitations ringing per device -----------------------------------------

#[test]
fn invitations_over_the_per_device_cap_ring_nobody() {
    let mut config = Config::default();
    config.max_pending_invites = 2;
    let mut sim = Sim::with_config(seed_from_env(1506), config);
    let call = bystanders(&mut sim);
    let members = sim.ctl.call(CallId(call)).unwrap().members;
    for name in ["o", "p", "q", "r", "t"] {
        sim.add(name);
    }
    let acks = (heartbeat_acks(&sim, "a"), heartbeat_acks(&sim, "b"));
    let before = sim.ctl.gauges();
    let calls_before = sim.ctl.calls().len();

    // Three at once from o: one over its cap, so none is rung.
    let op = sim.request("o", C::GroupCreate(pb::GroupCreate { name: "team".into(), invitees: vec!["p".into(), "q".into(), "r".into()] }));
    sim.run_for(ms(200));
    assert_eq!(sim.error_of("o", op), ErrorCode::Overloaded);
    for name in ["p", "q", "r"] {
        assert!(incoming(&sim, name).is_empty(), "{name} was rung");
    }
    assert_eq!(refused(&sim, Refusal::PendingInvites), 1);
    assert_eq!(sim.ctl.calls().len(), calls_before, "no call was made");
    nothing_left_behind(&before, &sim.ctl.gauges());

    // Exactly at the cap works.
    let op = sim.request("o", C::GroupCreate(pb::GroupCreate { name: "team".into(), invitees: vec!["p".into(), "q".into()] }));
    sim.run_for(ms(200));
    let group = sim.acked_call("o", op);
    assert_eq!(incoming(&sim, "p"), vec![group]);
    assert_eq!(incoming(&sim, "q"), vec![group]);
    let ringing = sim.ctl.gauges().timers;
    // One more while two ring: refused, r not rung, no ring timer.
    let op = sim.request("o", C::GroupInvite(pb::GroupInvite { call_id: group, invitees: vec!["r".into()] }));
    sim.run_for(ms(200));
    assert_eq!(sim.error_of("o", op), ErrorCode::Overloaded);
    assert!(incoming(&sim, "r").is_empty());
    assert_eq!(refused(&sim, Refusal::PendingInvites), 2);
    assert_eq!(sim.ctl.gauges().timers, ringing, "no timer for the refused invitation");
    // p answers: one rings, so r can be rung.
    sim.request("p", C::GroupJoin(pb::GroupJoin { call_id: group }));
    sim.run_for(ms(500));
    let op = sim.request("o", C::GroupInvite(pb::GroupInvite { call_id: group, invitees: vec!["r".into()] }));
    sim.run_for(ms(200));
    sim.acked_call("o", op);
    assert_eq!(incoming(&sim, "r"), vec![group]);

    // A callee rings for one call at a time: t calling r while r rings gets
    // BUSY at once; r is not rung again and t's call leaves no ring timer.
    let timers = sim.ctl.gauges().timers;
    let op = sim.request("t", C::Invite(pb::Invite { callee: "r".into() }));
    sim.run_for(ms(200));
    let busy = sim.acked_call("t", op);
    assert_eq!(sim.end_reason(busy), Some(EndReason::Busy));
    assert_eq!(incoming(&sim, "r"), vec![group], "r rang once");
    assert!(sim.ctl.call(CallId(busy)).unwrap().members.is_empty());
    // Only the ended call's tombstone timer is new.
    assert_eq!(sim.ctl.gauges().timers, timers + 1);
    bystanders_untouched(&mut sim, call, &members, acks);
    sim.check();
}

// ---- members per call and per room ------------------------------------------

#[test]
fn a_full_room_or_group_refuses_one_more_member_only() {
    let mut config = Config::default();
    config.max_room_members = 2;
    config.max_group_members = 3;
    let mut sim = Sim::with_config(seed_from_env(1507), config);
    let call = bystanders(&mut sim);
    let members = sim.ctl.call(CallId(call)).unwrap().members;
    for name in ["u", "v", "w"] {
        browser(&mut sim, name);
    }
    for name in ["o", "p", "q", "r"] {
        sim.add(name);
    }
    let acks = (heartbeat_acks(&sim, "a"), heartbeat_acks(&sim, "b"));
    let join = |sim: &mut Sim, name: &str| sim.request(name, C::RoomJoin(pb::RoomJoin { room: "tiny".into() }));
    let (u, v) = (join(&mut sim, "u"), join(&mut sim, "v"));
    sim.run_for(secs(1));
    let room = sim.acked_call("u", u);
    assert_eq!(sim.acked_call("v", v), room, "just at the size");
    let before = sim.ctl.gauges();
    let w = join(&mut sim, "w");
    sim.run_for(ms(200));
    assert_eq!(sim.error_of("w", w), ErrorCode::Overloaded);
    assert_eq!(refused(&sim, Refusal::CallFull), 1);
    nothing_left_behind(&before, &sim.ctl.gauges());
    assert_eq!(sim.ctl.call(CallId(room)).unwrap().members.len(), 2);

    // A group of three (owner + two) cannot ring a fourth.
    let group = sim.group("o", &["p", "q"]);
    let op = sim.request("o", C::GroupInvite(pb::GroupInvite { call_id: group, invitees: vec!["r".into()] }));
    sim.run_for(ms(200));
    assert_eq!(sim.error_of("o", op), ErrorCode::Overloaded);
    assert!(incoming(&sim, "r").is_empty());
    assert_eq!(refused(&sim, Refusal::CallFull), 2);
    assert_eq!(sim.ctl.call(CallId(group)).unwrap().members.len(), 3);
    bystanders_untouched(&mut sim, call, &members, acks);
    sim.check();
}

// ---- outbound queue per connection ------------------------------------------

#[test]
fn a_device_that_stops_reading_is_closed_and_counted_alone() {
    let mut sim = Sim::new(seed_from_env(1508));
    let call = bystanders(&mut sim);
    let members = sim.ctl.call(CallId(call)).unwrap().members;
    let baseline = sim.ctl.gauges();
    let acks = (heartbeat_acks(&sim, "a"), heartbeat_acks(&sim, "b"));
    sim.add("slow");
    // What the driver reports when the queue is full (see the service test
    // below for the real queue).
    let conn = sim.dev("slow").conn.unwrap();
    let now = sim.now;
    sim.ctl.handle_not_reading(now, conn);
    sim.drain();
    assert_eq!(sim.dev("slow").closes, vec![CloseReason::NotReading]);
    assert_eq!(refused(&sim, Refusal::OutboundQueue), 1);
    assert_eq!(closed(&sim, CloseReason::NotReading), 1);
    // A late report for the same connection changes nothing.
    sim.ctl.handle_not_reading(now, conn);
    assert_eq!(refused(&sim, Refusal::OutboundQueue), 1);
    sim.run_for(sim.ctl.config().resume_grace + secs(2));
    bystanders_untouched(&mut sim, call, &members, acks);
    nothing_left_behind(&baseline, &sim.ctl.gauges());
    sim.check();
}

#[test]
fn the_outbound_queue_default_is_the_drivers() {
    assert_eq!(Config::default().outbound_queue, fleetcall_signaling::service::OUTBOUND_QUEUE);
}

fn hello() -> ClientFrame {
    ClientFrame {
        op_id: 0,
        kind: Some(C::Hello(pb::Hello { min_version: 1, max_version: 1, software_version: "limits".into(), resume: None })),
    }
}

fn heartbeat(seq: u64) -> ClientFrame {
    ClientFrame { op_id: 0, kind: Some(C::Heartbeat(pb::Heartbeat { seq, sent_at_ms: 0, ack_seq: 0 })) }
}

/// The real driver (`ControlPlane`) with a small outbound queue: the
/// connection that never reads is closed `NOT_READING` once its queue is
/// full, and another connection's heartbeats are still answered.
#[tokio::test]
async fn the_outbound_queue_setting_bounds_a_connection_that_never_reads() -> anyhow::Result<()> {
    use std::time::Duration;

    use fleetcall_signaling::pb::server_frame;

    let mut config = Config::default();
    config.outbound_queue = 8;
    let ctl = Controller::new(config, Instant::now(), [7; 32])?;
    let (plane, _sfu, task) = ControlPlane::new(ctl);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(task.run(async move {
        let _ = stopped.await;
    }));
    let (slow, mut slow_link) = plane.connection_up(credential("slow", "slow", Grant::device(Vec::new()))).await?;
    let (good, mut good_link) = plane.connection_up(credential("good", "good", Grant::device(Vec::new()))).await?;
    plane.frame(good, hello()).await?;
    plane.frame(slow, hello()).await?;
    // Welcome and the first heartbeat, then one ack per heartbeat: 22
    // frames for a queue of 8.
    for seq in 1..=20 {
        plane.frame(slow, heartbeat(seq)).await?;
    }
    let reason = tokio::time::timeout(Duration::from_secs(10), slow_link.close.wait_for(Option::is_some)).await??.unwrap();
    assert_eq!(reason, CloseReason::NotReading);

    // The other connection reads and is answered, before and after.
    plane.frame(good, heartbeat(1)).await?;
    let mut acked = false;
    while !acked {
        let frame = tokio::time::timeout(Duration::from_secs(10), good_link.frames.recv()).await?.expect("good's link is open");
        acked = matches!(frame.kind, Some(server_frame::Kind::HeartbeatAck(pb::HeartbeatAck { seq: 1, .. })));
    }
    assert_eq!(*good_link.close.borrow(), None);
    let (stats, gauges) = plane.observe().await?;
    assert_eq!(stats.refused.get(&Refusal::OutboundQueue), Some(&1));
    assert_eq!(stats.connections_closed.get(&CloseReason::NotReading), Some(&1));
    assert_eq!(gauges.connections, 1, "only the reading connection is left");
    let _ = stop.send(());
    runner.await?;
    Ok(())
}
