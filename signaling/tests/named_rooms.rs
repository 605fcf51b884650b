//! Named rooms: a group call found by its name, joined by whoever's grant
//! covers the name, gone when its last member leaves. Browsers (JSON
//! framing) and devices (protobuf) meet in them through the one controller.

mod common;

use common::*;
use fleetcall_signaling::controller::{Config, SfuCommand};
use fleetcall_signaling::grants::{Grant, RoomPattern};
use fleetcall_signaling::ids::CallId;
use fleetcall_signaling::pb::{
    self, CallKind, CallPhase, EndReason, ErrorCode, ParticipantStatus, client_frame::Kind as C,
    server_frame::Kind as S,
};

fn browser(sim: &mut Sim, name: &str) {
    sim.add_with(name, Transport::WebSocket, Auto::default());
}

fn join(sim: &mut Sim, name: &str, room: &str) -> u64 {
    let op = sim.request(name, C::RoomJoin(pb::RoomJoin { room: room.into() }));
    sim.run_for(ms(600));
    sim.acked_call(name, op)
}

fn members(sim: &Sim, call: u64) -> Vec<(String, ParticipantStatus)> {
    sim.ctl
        .call(CallId(call))
        .map(|c| c.members.iter().map(|(d, st, _)| (d.to_string(), *st)).collect())
        .unwrap_or_default()
}

#[test]
fn browsers_and_a_device_meet_in_a_room_by_its_name() {
    let mut sim = Sim::new(seed_from_env(101));
    browser(&mut sim, "nurse-a");
    browser(&mut sim, "nurse-b");
    let grant = Grant::device(vec![RoomPattern::parse("ward-*").unwrap()]);
    sim.add_credentialed("bed-12", Transport::Quic, Auto::default(), credential("bed-12", "bed-12", grant));

    let call = join(&mut sim, "nurse-a", "ward-3");
    assert_eq!(join(&mut sim, "nurse-b", "ward-3"), call, "one name, one call");
    assert_eq!(join(&mut sim, "bed-12", "ward-3"), call);
    let snap = sim.ctl.call(CallId(call)).unwrap();
    assert_eq!((snap.kind, snap.phase), (CallKind::Room, CallPhase::Active));
    assert_eq!(
        members(&sim, call),
        [("bed-12".into(), ParticipantStatus::Connected), ("nurse-a".into(), ParticipantStatus::Connected), ("nurse-b".into(), ParticipantStatus::Connected)]
    );
    // The SFU room is the call, whatever the room's name.
    let rooms: Vec<CallId> = sim.sfu.commands.iter().filter_map(|c| match c {
        SfuCommand::Join { room, .. } => Some(*room),
        _ => None,
    }).collect();
    assert_eq!(rooms, [CallId(call); 3]);
    // Everyone learns the others' media ids, which name their tracks.
    let state = sim.received("bed-12", |k| match k {
        S::CallState(s) => Some(s.clone()),
        _ => None,
    });
    let last = state.last().unwrap();
    assert_eq!((last.kind(), last.group_name.as_str(), last.owner.as_str()), (CallKind::Room, "ward-3", ""));
    let first = &state[0];
    let known: Vec<(&str, u64)> = first.participants.iter().filter(|p| p.device_id != "bed-12").map(|p| (p.device_id.as_str(), p.media_id)).collect();
    assert!(known.len() == 2 && known.iter().all(|(_, id)| *id != 0), "the joiner learns who is there: {known:?}");
    let connected: Vec<(String, u64)> = sim.received("nurse-a", |k| match k {
        S::ParticipantUpdate(u) if u.status() == ParticipantStatus::Connected => Some((u.device_id.clone(), u.media_id)),
        _ => None,
    });
    assert!(connected.len() == 2 && connected.iter().all(|(_, id)| *id != 0), "the others learn of the joiner: {connected:?}");
    let mut ids: Vec<u64> = connected.iter().map(|(_, id)| *id).chain(known.iter().map(|(_, id)| *id)).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "one media id per participant");

    // Another name is another call.
    browser(&mut sim, "visitor");
    let other = join(&mut sim, "visitor", "ward-4");
    assert_ne!(other, call);
    assert_eq!(members(&sim, call).len(), 3);
    sim.check();
}

#[test]
fn a_room_goes_on_without_who_leaves_and_ends_with_the_last() {
    let mut sim = Sim::new(seed_from_env(102));
    for name in ["a", "b", "c"] {
        browser(&mut sim, name);
    }
    let call = join(&mut sim, "a", "lobby");
    join(&mut sim, "b", "lobby");
    join(&mut sim, "c", "lobby");
    let key_a = sim.key_of("a", call).unwrap();
    let leaves_before = sim.sfu.commands.len();

    let op = sim.request("a", C::GroupLeave(pb::GroupLeave { call_id: call }));
    sim.run_for(ms(200));
    sim.acked_call("a", op);
    // Only a's media goes; the others hear it left.
    let left: Vec<_> = sim.sfu.commands[leaves_before..].iter().filter_map(|c| match c {
        SfuCommand::Leave { participant, .. } => Some(*participant),
        _ => None,
    }).collect();
    assert_eq!(left, [key_a]);
    assert_eq!(sim.ended_for("a", call)[0].reason(), EndReason::Left);
    let gone = sim.received("b", |k| match k {
        S::ParticipantUpdate(u) if u.status() == ParticipantStatus::Gone => Some((u.device_id.clone(), u.reason())),
        _ => None,
    });
    assert_eq!(gone, [("a".to_string(), EndReason::Left)]);
    assert_eq!(sim.phase(call), CallPhase::Active);

    // Hanging up is leaving too; the last one out ends the room.
    sim.request("b", C::Hangup(pb::Hangup { call_id: call }));
    sim.request("c", C::GroupLeave(pb::GroupLeave { call_id: call }));
    sim.run_for(ms(200));
    assert_eq!(sim.end_reason(call), Some(EndReason::Empty));
    assert!(sim.sfu.participants.is_empty());
    // The name opens a new call; the old one is only a tombstone.
    let again = join(&mut sim, "a", "lobby");
    assert_ne!(again, call);
    assert_eq!(sim.phase(again), CallPhase::Active);
    sim.check();
}

#[test]
fn a_browser_that_vanishes_reconnects_within_the_grace_or_is_removed() {
    let mut sim = Sim::new(seed_from_env(103));
    browser(&mut sim, "a");
    browser(&mut sim, "b");
    let call = join(&mut sim, "a", "ward-7");
    join(&mut sim, "b", "ward-7");

    // The socket drops (a tab reload, a Wi-Fi hiccup): media goes on, b sees
    // a reconnecting, and a resume brings it back in the same call.
    sim.drop_connection("a");
    sim.run_for(ms(100));
    assert_eq!(members(&sim, call)[0], ("a".into(), ParticipantStatus::Reconnecting));
    sim.connect("a", true);
    sim.run_for(ms(300));
    assert_eq!(members(&sim, call)[0], ("a".into(), ParticipantStatus::Connected));

    // Gone for good: removed after the grace, the room goes on.
    sim.drop_connection("a");
    sim.run_for(secs(11));
    assert_eq!(members(&sim, call), [("b".into(), ParticipantStatus::Connected)]);
    let gone = sim.received("b", |k| match k {
        S::ParticipantUpdate(u) if u.status() == ParticipantStatus::Gone => Some(u.reason()),
        _ => None,
    });
    assert_eq!(gone, [EndReason::ConnectionLost]);
    sim.check();
}

#[test]
fn bad_room_requests_get_clear_errors_and_cost_nothing_else() {
    let mut config = Config::default();
    config.max_room_members = 2;
    let mut sim = Sim::with_config(seed_from_env(104), config);
    for name in ["a", "b", "c"] {
        browser(&mut sim, name);
    }
    let call = join(&mut sim, "a", "small");
    join(&mut sim, "b", "small");

    let cases: [(&str, C, ErrorCode); 5] = [
        ("c", C::RoomJoin(pb::RoomJoin { room: "small".into() }), ErrorCode::Overloaded),
        ("c", C::RoomJoin(pb::RoomJoin { room: "".into() }), ErrorCode::InvalidArgument),
        ("c", C::RoomJoin(pb::RoomJoin { room: "a b/../c".into() }), ErrorCode::InvalidArgument),
        ("c", C::RoomJoin(pb::RoomJoin { room: "x".repeat(65) }), ErrorCode::InvalidArgument),
        // A room has no owner: nobody ends it for the others.
        ("a", C::GroupEnd(pb::GroupEnd { call_id: call }), ErrorCode::Forbidden),
    ];
    for (who, kind, code) in cases {
        let op = sim.request(who, kind.clone());
        sim.run_for(ms(100));
        assert_eq!(sim.error_of(who, op), code, "{kind:?}");
    }
    // In another room already; joining the same room twice is success.
    let op = sim.request("a", C::RoomJoin(pb::RoomJoin { room: "other".into() }));
    sim.run_for(ms(100));
    assert_eq!(sim.error_of("a", op), ErrorCode::AlreadyInCall);
    assert_eq!(join(&mut sim, "a", "small"), call);
    assert_eq!(members(&sim, call).len(), 2);
    assert_eq!(sim.phase(call), CallPhase::Active);
    sim.check();
}

#[test]
fn an_operator_ends_a_room_and_its_name_opens_a_new_call() {
    let mut sim = Sim::new(seed_from_env(105));
    browser(&mut sim, "a");
    let call = join(&mut sim, "a", "ward-9");
    let now = sim.now;
    assert!(sim.ctl.handle_operator_end(now, CallId(call)));
    sim.drain();
    sim.run_for(ms(100));
    assert_eq!(sim.ended_for("a", call)[0].reason(), EndReason::EndedByOperator);
    let again = join(&mut sim, "a", "ward-9");
    assert_ne!(again, call);
    sim.check();
}
