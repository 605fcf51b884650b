//! Bad input at the codec and the controller: oversize frames, garbage,
//! messages out of order. Clear error, connection closed where
//! appropriate, nothing else affected.

mod common;

use bytes::{BufMut, BytesMut};
use common::*;
use fleetcall_signaling::grants::Grant;
use fleetcall_signaling::Error;
use fleetcall_signaling::controller::{Output, Reachability};
use fleetcall_signaling::ids::{ConnId, DeviceId};
use fleetcall_signaling::pb::{
    self, CallPhase, ClientFrame, CloseReason, ErrorCode, client_frame::Kind as C,
    server_frame::Kind as S,
};
use fleetcall_signaling::wire::{self, FrameDecoder, MAX_FRAME_BYTES};
use rand::{Rng, RngExt, SeedableRng, rngs::StdRng};

fn errors(sim: &Sim, name: &str) -> Vec<ErrorCode> {
    sim.received(name, |k| match k {
        S::Error(e) => Some(e.code()),
        _ => None,
    })
}

/// Feeds raw bytes through a decoder into the controller, as the driver does.
fn feed(sim: &mut Sim, name: &str, dec: &mut FrameDecoder, bytes: &[u8]) {
    let conn = sim.dev(name).conn.unwrap();
    let mut buf = BytesMut::from(bytes);
    loop {
        let now = sim.now;
        match dec.decode::<ClientFrame>(&mut buf) {
            Ok(Some(frame)) => sim.ctl.handle_frame(now, conn, frame),
            Ok(None) => break,
            Err(e) => {
                let fatal = e.is_fatal();
                sim.ctl.handle_wire_error(now, conn, &e);
                if fatal {
                    break;
                }
            }
        }
        sim.drain();
    }
    sim.drain();
}

#[test]
fn oversize_frame_closes_only_that_connection() {
    let mut sim = Sim::new(seed_from_env(81));
    sim.add("a").add("b").add("mallory");
    let call = sim.active_call("a", "b");
    let mut raw = BytesMut::new();
    wire::put_varint(&mut raw, (MAX_FRAME_BYTES + 1) as u64);
    raw.put_bytes(0, 100);
    let mut dec = FrameDecoder::new();
    feed(&mut sim, "mallory", &mut dec, &raw);
    sim.run_for(ms(100));
    assert_eq!(errors(&sim, "mallory"), vec![ErrorCode::FrameTooLarge]);
    assert_eq!(sim.dev("mallory").closes, vec![CloseReason::FrameTooLarge]);
    let row = sim.ctl.device(&DeviceId::new("mallory").unwrap()).unwrap();
    assert!(row.last_error.unwrap().contains("exceeds the limit"));
    // Everyone else is untouched.
    sim.run_for(secs(5));
    assert_eq!(sim.phase(call), CallPhase::Active);
    for d in ["a", "b"] {
        assert!(errors(&sim, d).is_empty());
        assert_eq!(
            sim.ctl
                .device(&DeviceId::new(d).unwrap())
                .unwrap()
                .reachability,
            Reachability::Online
        );
    }
    sim.check();
}

#[test]
fn a_garbage_frame_gets_an_error_and_the_connection_stays_usable() {
    let mut sim = Sim::new(seed_from_env(82));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    let mut raw = BytesMut::new();
    wire::put_varint(&mut raw, 4);
    raw.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    let mut dec = FrameDecoder::new();
    feed(&mut sim, "a", &mut dec, &raw);
    sim.run_for(ms(100));
    assert_eq!(errors(&sim, "a"), vec![ErrorCode::MalformedFrame]);
    assert!(sim.dev("a").closes.is_empty());
    // Still works: a hangs up normally.
    sim.request("a", C::Hangup(pb::Hangup { call_id: call }));
    sim.run_for(ms(100));
    assert_eq!(sim.ended_for("b", call).len(), 1);
    sim.check();
}

#[test]
fn random_bytes_never_panic_and_never_touch_other_devices() {
    let seed = seed_from_env(83);
    let mut sim = Sim::new(seed);
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..200 {
        let name = format!("noise{i}");
        sim.add(&name);
        let mut bytes = vec![0u8; rng.random_range(1..300)];
        rng.fill_bytes(&mut bytes);
        let mut dec = FrameDecoder::new();
        feed(&mut sim, &name, &mut dec, &bytes);
        sim.run_for(ms(20));
        sim.drop_connection(&name);
    }
    sim.run_for(secs(1));
    assert_eq!(sim.phase(call), CallPhase::Active);
    assert!(errors(&sim, "a").is_empty() && errors(&sim, "b").is_empty());
    sim.check();
}

#[test]
fn too_many_bad_frames_close_the_connection() {
    let mut sim = Sim::new(seed_from_env(84));
    sim.add("a");
    let mut raw = BytesMut::new();
    for _ in 0..20 {
        wire::put_varint(&mut raw, 1);
        raw.put_u8(0xff);
    }
    feed(&mut sim, "a", &mut FrameDecoder::new(), &raw);
    sim.run_for(ms(100));
    let errs = errors(&sim, "a");
    assert_eq!(
        errs.iter()
            .filter(|c| **c == ErrorCode::MalformedFrame)
            .count(),
        17
    );
    assert_eq!(errs.last(), Some(&ErrorCode::TooManyErrors));
    assert_eq!(sim.dev("a").closes, vec![CloseReason::TooManyErrors]);
    sim.check();
}

#[test]
fn frames_before_hello_close_with_not_registered() {
    let mut sim = Sim::new(seed_from_env(85));
    let now = sim.now;
    let conn = ConnId(500);
    sim.ctl
        .handle_connection_up(now, common::UNIX_START, conn, common::credential("early", "early", Grant::device(Vec::new())));
    sim.ctl.handle_frame(
        now,
        conn,
        ClientFrame {
            op_id: 1,
            kind: Some(C::Invite(pb::Invite { callee: "x".into() })),
        },
    );
    let outs: Vec<_> = std::iter::from_fn(|| sim.ctl.poll_output()).collect();
    assert!(
        matches!(&outs[0], Output::Send { frame, .. } if matches!(&frame.kind, Some(S::Error(e)) if e.code() == ErrorCode::NotRegistered))
    );
    assert_eq!(
        outs[1],
        Output::Close {
            conn,
            reason: CloseReason::ProtocolError
        }
    );
    // A later frame on the closed connection is ignored.
    sim.ctl.handle_frame(now, conn, ClientFrame::default());
    assert_eq!(sim.ctl.poll_output(), None);
}

#[test]
fn out_of_order_messages_get_clear_errors_and_change_nothing() {
    let mut sim = Sim::new(seed_from_env(86));
    sim.add("a").add("b").add("c");
    let call = sim.active_call("a", "b");
    let before = sim.ctl.calls();

    let cases: Vec<(&str, C, ErrorCode)> = vec![
        (
            "c",
            C::Accept(pb::Accept { call_id: 999 }),
            ErrorCode::UnknownCall,
        ),
        (
            "c",
            C::Accept(pb::Accept { call_id: call }),
            ErrorCode::NotInCall,
        ),
        (
            "a",
            C::Accept(pb::Accept { call_id: call }),
            ErrorCode::InvalidState,
        ),
        (
            "c",
            C::Ringing(pb::Ringing { call_id: 999 }),
            ErrorCode::UnknownCall,
        ),
        (
            "a",
            C::SdpAnswer(pb::SdpAnswer {
                call_id: call,
                revision: 1,
                sdp: "v=0".into(),
                ..Default::default()
            }),
            ErrorCode::NoPendingOffer,
        ),
        (
            "c",
            C::SdpOffer(pb::SdpOffer {
                call_id: call,
                sdp: "v=0".into(),
                ..Default::default()
            }),
            ErrorCode::NotInCall,
        ),
        (
            "a",
            C::SdpOffer(pb::SdpOffer {
                call_id: call,
                sdp: "v=0".into(),
                ..Default::default()
            }),
            ErrorCode::InvalidState,
        ),
        (
            "a",
            C::SdpOffer(pb::SdpOffer {
                call_id: call,
                session_id: 12345,
                sdp: "v=0".into(),
                ..Default::default()
            }),
            ErrorCode::StaleSession,
        ),
        (
            "a",
            C::IceRestart(pb::IceRestart {
                call_id: call,
                sdp: String::new(),
                ..Default::default()
            }),
            ErrorCode::InvalidArgument,
        ),
        (
            "a",
            C::GroupEnd(pb::GroupEnd { call_id: call }),
            ErrorCode::InvalidState,
        ),
        (
            "a",
            C::Invite(pb::Invite { callee: "a".into() }),
            ErrorCode::AlreadyInCall,
        ),
        (
            "c",
            C::Invite(pb::Invite { callee: "c".into() }),
            ErrorCode::InvalidArgument,
        ),
        (
            "c",
            C::Invite(pb::Invite {
                callee: String::new(),
            }),
            ErrorCode::InvalidArgument,
        ),
        (
            "c",
            C::GroupInvite(pb::GroupInvite {
                call_id: call,
                invitees: vec![],
            }),
            ErrorCode::NotInCall,
        ),
        (
            "c",
            C::GroupCreate(pb::GroupCreate {
                name: "x".repeat(65),
                invitees: vec![],
            }),
            ErrorCode::InvalidArgument,
        ),
    ];
    let mut ops = Vec::new();
    for (dev, kind, _) in &cases {
        ops.push(sim.request(dev, kind.clone()));
    }
    sim.run_for(ms(200));
    for ((dev, kind, want), op) in cases.iter().zip(ops) {
        assert_eq!(sim.error_of(dev, op), *want, "{dev} {kind:?}");
    }
    assert_eq!(sim.ctl.calls(), before, "nothing changed");
    assert!(sim.dev("a").closes.is_empty() && sim.dev("c").closes.is_empty());
    sim.check();
}

#[test]
fn a_second_hello_an_unknown_kind_and_a_missing_op_id_are_errors_not_disconnects() {
    let mut sim = Sim::new(seed_from_env(87));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    let hello = C::Hello(pb::Hello {
        min_version: 1,
        max_version: 1,
        ..Default::default()
    });
    sim.send_frame(
        "a",
        ClientFrame {
            op_id: 0,
            kind: Some(hello),
        },
    );
    sim.send_frame(
        "a",
        ClientFrame {
            op_id: 77,
            kind: None,
        },
    );
    sim.send_frame(
        "a",
        ClientFrame {
            op_id: 0,
            kind: Some(C::Hangup(pb::Hangup { call_id: call })),
        },
    );
    sim.run_for(ms(100));
    assert_eq!(
        errors(&sim, "a"),
        vec![
            ErrorCode::UnexpectedHello,
            ErrorCode::UnknownMessage,
            ErrorCode::MissingOpId
        ]
    );
    let unknown = sim.dev("a").inbox.iter().find(|(_, f)| f.reply_to == 77);
    assert!(
        unknown.is_some(),
        "the unknown kind's error names its op id"
    );
    assert!(sim.dev("a").closes.is_empty());
    assert_eq!(
        sim.phase(call),
        CallPhase::Active,
        "the hangup without op id was not executed"
    );
    assert_eq!(
        sim.received("a", |k| matches!(k, S::Welcome(_)).then_some(()))
            .len(),
        1
    );
    sim.check();
}

#[test]
fn browser_json_garbage_is_an_error_and_oversize_is_fatal() {
    let mut sim = Sim::new(seed_from_env(88));
    sim.add_with("web", Transport::WebSocket, Auto::default());
    let conn = sim.dev("web").conn.unwrap();
    let now = sim.now;
    for text in ["{nope", "[]", r#"{"invite":{"callee":7}}"#] {
        let err = wire::decode_json::<ClientFrame>(text).unwrap_err();
        assert!(!err.is_fatal());
        sim.ctl.handle_wire_error(now, conn, &err);
    }
    sim.drain();
    // A future kind is not an error for the codec: the controller answers it.
    let f: ClientFrame = wire::decode_json(r#"{"opId":"9","fly":{}}"#).unwrap();
    sim.ctl.handle_frame(now, conn, f);
    sim.drain();
    let big = format!(
        r#"{{"invite":{{"callee":"{}"}}}}"#,
        "x".repeat(MAX_FRAME_BYTES)
    );
    let err = wire::decode_json::<ClientFrame>(&big).unwrap_err();
    assert!(matches!(err, Error::FrameTooLarge { .. }));
    sim.ctl.handle_wire_error(now, conn, &err);
    sim.drain();
    sim.run_for(ms(100));
    assert_eq!(
        errors(&sim, "web"),
        vec![
            ErrorCode::MalformedFrame,
            ErrorCode::MalformedFrame,
            ErrorCode::MalformedFrame,
            ErrorCode::UnknownMessage,
            ErrorCode::FrameTooLarge
        ]
    );
    assert_eq!(sim.dev("web").closes, vec![CloseReason::FrameTooLarge]);
    sim.check();
}
