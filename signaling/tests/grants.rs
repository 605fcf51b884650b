//! Grants: a credential opens exactly the rooms it names, and one that may
//! only listen never sends a track.

mod common;

use common::*;
use fleetcall_signaling::controller::SfuCommand;
use fleetcall_signaling::grants::{Grant, RoomPattern};
use fleetcall_signaling::pb::{self, ErrorCode, client_frame::Kind as C};

fn token(name: &str, rooms: &[&str], publish: bool) -> fleetcall_signaling::grants::Credential {
    let grant = Grant { rooms: rooms.iter().map(|r| RoomPattern::parse(r).unwrap()).collect(), publish, subscribe: true };
    credential(name, name, grant)
}

fn room_join(sim: &mut Sim, who: &str, room: &str) -> Result<u64, ErrorCode> {
    let op = sim.request(who, C::RoomJoin(pb::RoomJoin { room: room.into() }));
    sim.run_for(ms(300));
    match sim.reply(who, op).and_then(|f| f.kind.as_ref()) {
        Some(pb::server_frame::Kind::Ack(a)) => Ok(a.call_id),
        Some(pb::server_frame::Kind::Error(e)) => Err(e.code()),
        other => panic!("{who}: no reply to room_join: {other:?}"),
    }
}

/// An SDP whose only m-line has `direction`.
fn sdp(direction: &str) -> String {
    format!("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na={direction}\r\n")
}

#[test]
fn a_grant_opens_its_rooms_and_no_other() {
    let mut sim = Sim::new(seed_from_env(201));
    let manual = Auto { media: false, ..Auto::default() };
    sim.add_credentialed("ward3", Transport::WebSocket, manual.clone(), token("ward3", &["ward-3"], true));
    sim.add_credentialed("wards", Transport::WebSocket, manual.clone(), token("wards", &["ward-*"], true));
    sim.add_credentialed("nobody", Transport::WebSocket, manual.clone(), token("nobody", &[], true));
    sim.add_with("bed-1", Transport::Quic, manual);

    let call = room_join(&mut sim, "ward3", "ward-3").unwrap();
    assert_eq!(room_join(&mut sim, "wards", "ward-3"), Ok(call), "a prefix covers it");
    for (who, room) in [("ward3", "ward-30"), ("ward3", "call-1"), ("nobody", "ward-3"), ("bed-1", "ward-3"), ("wards", "icu")] {
        // (ward3 is in a call already; the grant is checked first.)
        assert_eq!(room_join(&mut sim, who, room), Err(ErrorCode::Forbidden), "{who} -> {room}");
    }
    // A former member without the grant cannot rejoin by call id either.
    let op = sim.request("nobody", C::GroupJoin(pb::GroupJoin { call_id: call }));
    sim.run_for(ms(100));
    assert_eq!(sim.error_of("nobody", op), ErrorCode::NotInCall);
    let snap = sim.ctl.call(fleetcall_signaling::ids::CallId(call)).unwrap();
    assert_eq!(snap.members.len(), 2);
    sim.check();
}

#[test]
fn a_listener_never_publishes_and_never_rings_anyone() {
    let mut sim = Sim::new(seed_from_env(202));
    let manual = Auto { media: false, ..Auto::default() };
    sim.add_credentialed("speaker", Transport::WebSocket, Auto::default(), token("speaker", &["lecture"], true));
    sim.add_credentialed("listener", Transport::WebSocket, manual, token("listener", &["lecture"], false));
    sim.add("bed-1");
    let call = room_join(&mut sim, "speaker", "lecture").unwrap();
    assert_eq!(room_join(&mut sim, "listener", "lecture"), Ok(call), "a listener joins");
    let session = sim.dev("listener").session.as_ref().unwrap().0;

    // Offers that send are refused, whatever the request.
    for direction in ["sendonly", "sendrecv"] {
        let op = sim.request("listener", C::SdpOffer(pb::SdpOffer { call_id: call, session_id: session, revision: 1, sdp: sdp(direction) }));
        sim.run_for(ms(100));
        assert_eq!(sim.error_of("listener", op), ErrorCode::Forbidden, "{direction}");
    }
    assert!(!sim.sfu.commands.iter().any(|c| matches!(c, SfuCommand::Join { display_name, .. } if display_name.as_str() == "listener")));
    // Receiving only is what it may do; the SFU is told so.
    let op = sim.request("listener", C::SdpOffer(pb::SdpOffer { call_id: call, session_id: session, revision: 1, sdp: sdp("recvonly") }));
    sim.run_for(ms(400));
    sim.acked_call("listener", op);
    let rights: Vec<(bool, bool)> = sim.sfu.commands.iter().filter_map(|c| match c {
        SfuCommand::Join { display_name, publish, subscribe, .. } if display_name.as_str() == "listener" => Some((*publish, *subscribe)),
        _ => None,
    }).collect();
    assert_eq!(rights, [(false, true)]);
    let speaker_rights = sim.sfu.commands.iter().any(|c| matches!(c, SfuCommand::Join { display_name, publish: true, .. } if display_name.as_str() == "speaker"));
    assert!(speaker_rights);
    // Nor may it add a track later with an ICE restart.
    let op = sim.request("listener", C::IceRestart(pb::IceRestart { call_id: call, session_id: session, revision: 2, sdp: sdp("sendrecv") }));
    sim.run_for(ms(100));
    assert_eq!(sim.error_of("listener", op), ErrorCode::Forbidden);

    // A listener cannot ring devices.
    sim.request("listener", C::GroupLeave(pb::GroupLeave { call_id: call }));
    sim.run_for(ms(100));
    for kind in [
        C::Invite(pb::Invite { callee: "bed-1".into() }),
        C::GroupCreate(pb::GroupCreate { name: "x".into(), invitees: vec!["bed-1".into()] }),
    ] {
        let op = sim.request("listener", kind);
        sim.run_for(ms(100));
        assert_eq!(sim.error_of("listener", op), ErrorCode::Forbidden);
    }
    assert!(sim.received("bed-1", |k| matches!(k, pb::server_frame::Kind::IncomingCall(_)).then_some(())).is_empty());
    sim.check();
}

#[test]
fn a_device_joins_the_calls_it_is_invited_to_without_a_room_grant() {
    let mut sim = Sim::new(seed_from_env(203));
    sim.add("bed-1").add("bed-2");
    let call = sim.active_call("bed-1", "bed-2");
    assert_eq!(sim.phase(call), pb::CallPhase::Active);
    // ... and no room.
    sim.request("bed-1", C::Hangup(pb::Hangup { call_id: call }));
    sim.run_for(ms(100));
    assert_eq!(room_join(&mut sim, "bed-1", "ward-3"), Err(ErrorCode::Forbidden));
    sim.check();
}
