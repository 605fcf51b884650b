//! Credentials that end: revocation closes live connections and refuses new
//! ones, expiry closes the connection, and an identity belongs to the
//! credential that holds it.

mod common;

use common::*;
use fleetcall_signaling::grants::Grant;
use fleetcall_signaling::pb::{self, CloseReason, EndReason, ErrorCode, ParticipantStatus, server_frame::Kind as S};

fn rejected(sim: &Sim, name: &str) -> Vec<ErrorCode> {
    sim.received(name, |k| match k {
        S::Rejected(r) => Some(r.code()),
        _ => None,
    })
}

#[test]
fn revoking_a_device_in_a_call_closes_it_and_the_call_converges() {
    let mut sim = Sim::new(seed_from_env(301));
    sim.add("bed-12").add("nurse");
    let call = sim.active_call("nurse", "bed-12");
    let (now, unix) = (sim.now, sim.unix_now());
    assert_eq!(sim.ctl.handle_revoke(now, "bed-12", unix), 1);
    sim.drain();
    sim.run_for(ms(100));
    // Closed at once (no grace, no resume), and the other side is told why.
    assert_eq!(sim.dev("bed-12").closes, [CloseReason::Revoked]);
    assert!(sim.dev("bed-12").conn.is_none());
    assert_eq!(sim.end_reason(call), Some(EndReason::Revoked));
    let ended = sim.ended_for("nurse", call);
    assert_eq!((ended[0].reason(), ended[0].by.as_str()), (EndReason::Revoked, "bed-12"));
    assert!(sim.sfu.participants.is_empty());
    let row = sim.ctl.device(&fleetcall_signaling::ids::DeviceId::new("bed-12").unwrap()).unwrap();
    assert!(row.sessions.is_empty());
    assert_eq!(row.last_error.as_deref(), Some("credential revoked"));

    // The same certificate is refused from now on, resume or not.
    sim.connect("bed-12", true);
    sim.run_for(ms(100));
    assert_eq!(rejected(&sim, "bed-12"), [ErrorCode::CredentialRevoked]);
    assert_eq!(sim.dev("bed-12").closes, [CloseReason::Revoked, CloseReason::Revoked]);
    // A certificate issued after the revocation (the device re-enrolled) works.
    let dev = sim.dev_mut("bed-12");
    dev.credential.issued_at = unix + 1;
    dev.credential.key = fleetcall_signaling::grants::CredentialKey::digest(b"bed-12 new key");
    sim.connect("bed-12", false);
    sim.run_for(ms(100));
    assert!(sim.dev("bed-12").conn.is_some() && sim.dev("bed-12").session.is_some());
    sim.check();
}

#[test]
fn revoking_a_room_member_removes_only_it() {
    let mut sim = Sim::new(seed_from_env(302));
    for name in ["a", "b", "c"] {
        sim.add_with(name, Transport::WebSocket, Auto::default());
    }
    let mut call = 0;
    for name in ["a", "b", "c"] {
        let op = sim.request(name, pb::client_frame::Kind::RoomJoin(pb::RoomJoin { room: "ward".into() }));
        sim.run_for(ms(600));
        call = sim.acked_call(name, op);
    }
    // Revoked while its socket is down (within the grace): the session ends
    // all the same.
    sim.drop_connection("b");
    let (now, unix) = (sim.now, sim.unix_now());
    assert_eq!(sim.ctl.handle_revoke(now, "b", unix), 1);
    sim.drain();
    sim.run_for(ms(100));
    let gone = sim.received("a", |k| match k {
        S::ParticipantUpdate(u) if u.status() == ParticipantStatus::Gone => Some((u.device_id.clone(), u.reason())),
        _ => None,
    });
    assert_eq!(gone, [("b".to_string(), EndReason::Revoked)]);
    let snap = sim.ctl.call(fleetcall_signaling::ids::CallId(call)).unwrap();
    assert_eq!(snap.members.len(), 2);
    assert_eq!(sim.phase(call), pb::CallPhase::Active);
    // Revoking someone unknown, or again, costs nothing.
    let now = sim.now;
    assert_eq!(sim.ctl.handle_revoke(now, "nobody", unix), 0);
    assert_eq!(sim.ctl.handle_revoke(now, "b", unix), 0);
    sim.check();
}

#[test]
fn another_credential_for_a_live_identity_is_refused_and_the_incumbent_keeps_its_call() {
    let mut sim = Sim::new(seed_from_env(303));
    sim.add("bed-12").add("nurse");
    let call = sim.active_call("nurse", "bed-12");
    let incumbent = sim.dev("bed-12").session.clone();

    // A token minted for the same id, on the WebSocket.
    sim.add_unwelcomed("impostor", Transport::WebSocket, Auto::default(), credential("bed-12", "a token", Grant::device(Vec::new())));
    sim.run_for(ms(200));
    assert_eq!(rejected(&sim, "impostor"), [ErrorCode::IdentityInUse]);
    assert_eq!(sim.dev("impostor").closes, [CloseReason::IdentityInUse]);
    assert!(sim.dev("impostor").session.is_none());
    assert_eq!(sim.phase(call), pb::CallPhase::Active);
    assert_eq!(sim.dev("bed-12").session, incumbent);
    assert!(sim.dev("bed-12").closes.is_empty());
    sim.run_for(secs(10));
    assert_eq!(sim.phase(call), pb::CallPhase::Active, "the incumbent's heartbeats still move");

    // The same credential again (the device rebooted) replaces the session.
    sim.reconnect("bed-12", false);
    sim.run_for(ms(200));
    assert_ne!(sim.dev("bed-12").session, incumbent);
    assert_eq!(sim.end_reason(call), Some(EndReason::ConnectionLost));
    sim.check();
}

#[test]
fn a_resume_needs_the_credential_that_made_the_session() {
    let mut sim = Sim::new(seed_from_env(304));
    sim.add("bed-12").add("nurse");
    let call = sim.active_call("nurse", "bed-12");
    sim.drop_connection("bed-12");
    // Someone who learned the resume token but holds another credential.
    let stolen = sim.dev("bed-12").session.clone();
    sim.add_unwelcomed("thief", Transport::WebSocket, Auto::default(), credential("bed-12", "thief", Grant::device(Vec::new())));
    sim.run_for(ms(50));
    sim.dev_mut("thief").session = stolen;
    sim.dev_mut("thief").closes.clear();
    sim.connect("thief", true);
    sim.run_for(ms(200));
    assert_eq!(sim.dev("thief").closes, [CloseReason::IdentityInUse]);
    // The device itself resumes; the call never noticed.
    sim.connect("bed-12", true);
    sim.run_for(ms(300));
    assert_eq!(sim.phase(call), pb::CallPhase::Active);
    let welcome = sim.received("bed-12", |k| match k {
        S::Welcome(w) => Some(w.resumed),
        _ => None,
    });
    assert_eq!(welcome.last(), Some(&true));
    sim.check();
}

#[test]
fn an_expiring_credential_closes_its_connection_and_the_call_converges() {
    let mut sim = Sim::new(seed_from_env(305));
    let mut short = credential("kiosk", "kiosk", Grant::device(Vec::new()));
    short.expires_at = UNIX_START + 60;
    sim.add_credentialed("kiosk", Transport::WebSocket, Auto::default(), short);
    sim.add("bed-1");
    let call = sim.active_call("kiosk", "bed-1");
    sim.run_for(secs(50));
    assert_eq!(sim.phase(call), pb::CallPhase::Active);
    sim.run_for(secs(11));
    assert_eq!(sim.dev("kiosk").closes, [CloseReason::CredentialExpired]);
    let ended = sim.ended_for("bed-1", call);
    assert_eq!((ended[0].reason(), ended[0].by.as_str()), (EndReason::CredentialExpired, "kiosk"));
    // An expired credential is not let in again (the WebSocket transport
    // refuses it first; the controller too, if one slips through).
    sim.connect("kiosk", false);
    sim.run_for(ms(50));
    assert_eq!(sim.dev("kiosk").closes, [CloseReason::CredentialExpired, CloseReason::CredentialExpired]);
    assert_eq!(rejected(&sim, "kiosk"), [ErrorCode::CredentialExpired]);
    sim.check();
}
