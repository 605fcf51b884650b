//! Random sequences of device events, losses (stalls, drops, deaf streams,
//! lost media) and clock jumps, with the invariants checked after every step:
//!
//! 1. one terminal state per call: once ended, a call stays ended with the
//!    same reason, and every device gets at most one terminal event per
//!    participation;
//! 2. no SFU participant without a live call session;
//! 3. no ringing call older than its timeout;
//! 4. no session of an unreachable device older than the grace;
//!
//! plus the controller's own audit (no waiting state without a deadline,
//! indexes consistent, no revoked credential holding anything) and, after
//! the network heals, convergence: no call stuck in setup, every live call
//! fully connected.
//!
//! Devices d0..d2 are QUIC devices (protobuf framing; d0's certificate grants
//! room `room-a`), d3 and d4 browsers (JSON framing, tokens for every room):
//! all of them call, join groups and named rooms, get revoked and come back
//! with new credentials, and meet impostors presenting another credential
//! for their identity.
//!
//! Each case prints its sim seed; proptest stores failing inputs in
//! `invariants_proptest.proptest-regressions` and replays them first.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use fleetcall_signaling::grants::{Grant, RoomPattern};
use fleetcall_signaling::ids::CallId;
use fleetcall_signaling::pb::{
    self, CallPhase, EndReason, ParticipantStatus, client_frame::Kind as C,
};
use fleetcall_signaling::wire::FrameDecoder;
use proptest::prelude::*;

const DEVICES: usize = 5;
/// Named rooms the devices use; only browsers and d0 are granted any.
const ROOMS: [&str; 2] = ["room-a", "room-b"];

fn name(i: usize) -> String {
    format!("d{}", i % DEVICES)
}

#[derive(Debug, Clone)]
enum Action {
    Invite(usize, usize),
    Accept(usize),
    Decline(usize),
    Cancel(usize),
    Hangup(usize),
    GroupCreate(usize, u8),
    GroupInvite(usize, usize),
    GroupJoin(usize),
    GroupLeave(usize),
    GroupEnd(usize),
    RoomJoin(usize, usize),
    Revoke(usize),
    Impostor(usize),
    IceRestart(usize),
    ReplayLastOp(usize),
    Garbage(usize),
    Freeze(usize),
    Unfreeze(usize),
    Deaf(usize),
    Drop(usize),
    Reconnect(usize, bool),
    SfuLoses(usize),
    SfuRefuses(usize),
    Run(u64),
    Jump(u64),
}

fn action() -> impl Strategy<Value = Action> {
    let d = 0..DEVICES;
    prop_oneof![
        4 => (d.clone(), d.clone()).prop_map(|(a, b)| Action::Invite(a, b)),
        3 => d.clone().prop_map(Action::Accept),
        1 => d.clone().prop_map(Action::Decline),
        1 => d.clone().prop_map(Action::Cancel),
        2 => d.clone().prop_map(Action::Hangup),
        2 => (d.clone(), any::<u8>()).prop_map(|(a, m)| Action::GroupCreate(a, m)),
        1 => (d.clone(), d.clone()).prop_map(|(a, b)| Action::GroupInvite(a, b)),
        2 => d.clone().prop_map(Action::GroupJoin),
        1 => d.clone().prop_map(Action::GroupLeave),
        1 => d.clone().prop_map(Action::GroupEnd),
        3 => (d.clone(), 0..ROOMS.len()).prop_map(|(a, r)| Action::RoomJoin(a, r)),
        1 => d.clone().prop_map(Action::Revoke),
        1 => d.clone().prop_map(Action::Impostor),
        1 => d.clone().prop_map(Action::IceRestart),
        1 => d.clone().prop_map(Action::ReplayLastOp),
        1 => d.clone().prop_map(Action::Garbage),
        1 => d.clone().prop_map(Action::Freeze),
        2 => d.clone().prop_map(Action::Unfreeze),
        1 => d.clone().prop_map(Action::Deaf),
        1 => d.clone().prop_map(Action::Drop),
        2 => (d.clone(), any::<bool>()).prop_map(|(a, r)| Action::Reconnect(a, r)),
        1 => d.clone().prop_map(Action::SfuLoses),
        1 => d.clone().prop_map(Action::SfuRefuses),
        8 => (1u64..4000).prop_map(Action::Run),
        1 => (1u64..70).prop_map(Action::Jump),
    ]
}

/// The call a device would act on: the newest it believes it is in, else
/// the newest it ever heard of.
fn call_of(sim: &Sim, dev: &str) -> u64 {
    let d = sim.dev(dev);
    if let Some(c) = d.in_call.iter().next_back() {
        return *c;
    }
    d.inbox
        .iter()
        .filter_map(|(_, f)| match &f.kind {
            Some(pb::server_frame::Kind::IncomingCall(i)) => Some(i.call_id),
            Some(pb::server_frame::Kind::Ack(a)) => Some(a.call_id),
            _ => None,
        })
        .max()
        .unwrap_or(1)
}

fn apply(sim: &mut Sim, action: &Action, last_op: &mut BTreeMap<String, (u64, C)>) {
    let mut req = |sim: &mut Sim, dev: String, kind: C| {
        // Like a client app: reconnect (resuming) before acting if needed;
        // the request queues behind the Hello on the new stream.
        if sim.dev(&dev).conn.is_none() {
            sim.connect(&dev, true);
        }
        let op = sim.request(&dev, kind.clone());
        last_op.insert(dev, (op, kind));
    };
    match action {
        Action::Invite(a, b) => req(sim, name(*a), C::Invite(pb::Invite { callee: name(*b) })),
        Action::Accept(a) => {
            let call_id = call_of(sim, &name(*a));
            req(sim, name(*a), C::Accept(pb::Accept { call_id }));
        }
        Action::Decline(a) => {
            let call_id = call_of(sim, &name(*a));
            req(sim, name(*a), C::Decline(pb::Decline { call_id }));
        }
        Action::Cancel(a) => {
            let call_id = call_of(sim, &name(*a));
            req(sim, name(*a), C::Cancel(pb::Cancel { call_id }));
        }
        Action::Hangup(a) => {
            let call_id = call_of(sim, &name(*a));
            req(sim, name(*a), C::Hangup(pb::Hangup { call_id }));
        }
        Action::GroupCreate(a, mask) => {
            let invitees = (0..DEVICES)
                .filter(|i| mask & (1 << i) != 0)
                .map(name)
                .collect();
            req(
                sim,
                name(*a),
                C::GroupCreate(pb::GroupCreate {
                    name: "g".into(),
                    invitees,
                }),
            );
        }
        Action::GroupInvite(a, b) => {
            let call_id = call_of(sim, &name(*a));
            req(
                sim,
                name(*a),
                C::GroupInvite(pb::GroupInvite {
                    call_id,
                    invitees: vec![name(*b)],
                }),
            );
        }
        Action::GroupJoin(a) => {
            let call_id = call_of(sim, &name(*a));
            req(sim, name(*a), C::GroupJoin(pb::GroupJoin { call_id }));
        }
        Action::GroupLeave(a) => {
            let call_id = call_of(sim, &name(*a));
            req(sim, name(*a), C::GroupLeave(pb::GroupLeave { call_id }));
        }
        Action::GroupEnd(a) => {
            let call_id = call_of(sim, &name(*a));
            req(sim, name(*a), C::GroupEnd(pb::GroupEnd { call_id }));
        }
        Action::RoomJoin(a, r) => {
            req(sim, name(*a), C::RoomJoin(pb::RoomJoin { room: ROOMS[*r].into() }));
        }
        Action::Revoke(a) => {
            // Revoked now; the device is re-enrolled with a new key issued a
            // second later, and reconnects with it on its next action.
            let dev = name(*a);
            // As the revocation list does: a revocation covers every
            // credential issued so far, also one issued "a second after" an
            // earlier revocation in this same second.
            let unix = sim.unix_now().max(sim.dev(&dev).credential.issued_at);
            let now = sim.now;
            sim.ctl.handle_revoke(now, &dev, unix);
            sim.drain();
            if let Some(conn) = sim.dev(&dev).conn {
                let closed = sim.dev(&dev).closes.last().copied();
                panic!("seed {}: {dev} still connected ({conn}) after its revocation, last close {closed:?}", sim.seed);
            }
            let serial = sim.dev(&dev).credential.issued_at;
            let fresh = sim.dev_mut(&dev);
            fresh.credential.issued_at = unix + 1;
            fresh.credential.key = fleetcall_signaling::grants::CredentialKey::digest(format!("{dev} after {serial}").as_bytes());
            fresh.session = None;
        }
        Action::Impostor(a) => {
            // Another credential for a live identity: refused, and the
            // incumbent keeps its session.
            let dev = name(*a);
            let id = fleetcall_signaling::ids::DeviceId::new(dev.clone()).unwrap();
            let Some(incumbent) = sim.ctl.device(&id).and_then(|d| d.sessions.first().copied()) else {
                return;
            };
            let impostor = format!("impostor-{dev}");
            sim.devs.remove(&impostor);
            let grant = sim.dev(&dev).credential.grant.clone();
            // Issued with the device's own, so no revocation covers it.
            let mut forged = credential(&dev, &impostor, grant);
            forged.issued_at = sim.dev(&dev).credential.issued_at;
            sim.add_unwelcomed(&impostor, Transport::WebSocket, Auto::default(), forged);
            sim.run_for(Duration::from_millis(200));
            // (The device itself may start a new session meanwhile; the impostor
            // never gets one.)
            assert_eq!(sim.dev(&impostor).closes.first(), Some(&pb::CloseReason::IdentityInUse), "seed {} t={}: {dev} (session {incumbent:?}); the impostor got {:?}", sim.seed, sim.t(), sim.dev(&impostor).inbox);
            assert!(sim.dev(&impostor).session.is_none(), "seed {}: the impostor got a session", sim.seed);
            sim.devs.remove(&impostor);
        }
        Action::IceRestart(a) => {
            let call_id = call_of(sim, &name(*a));
            let kind = C::IceRestart(pb::IceRestart {
                call_id,
                revision: 1,
                sdp: "v=0 r".into(),
                ..Default::default()
            });
            req(sim, name(*a), kind);
        }
        Action::ReplayLastOp(a) => {
            let dev = name(*a);
            if let Some((op, kind)) = last_op.get(&dev).cloned()
                && sim.dev(&dev).conn.is_some()
            {
                sim.request_with_op(&dev, op, kind);
            }
        }
        Action::Garbage(a) => {
            let dev = name(*a);
            if let Some(conn) = sim.dev(&dev).conn {
                let mut buf = BytesMut::from(&[2u8, 0xff, 0xff][..]);
                let err = FrameDecoder::new()
                    .decode::<pb::ClientFrame>(&mut buf)
                    .unwrap_err();
                let now = sim.now;
                sim.ctl.handle_wire_error(now, conn, &err);
                sim.drain();
            }
        }
        Action::Freeze(a) => sim.freeze(&name(*a)),
        Action::Unfreeze(a) => {
            let dev = sim.dev_mut(&name(*a));
            dev.frozen = false;
            dev.deaf = false;
        }
        Action::Deaf(a) => sim.dev_mut(&name(*a)).deaf = true,
        Action::Drop(a) => sim.drop_connection(&name(*a)),
        Action::Reconnect(a, resume) => sim.reconnect(&name(*a), *resume),
        Action::SfuLoses(a) => {
            let dev = name(*a);
            let key = sim
                .sfu
                .participants
                .iter()
                .find(|(_, p)| p.device.as_str() == dev)
                .map(|(k, _)| *k);
            if let Some(key) = key {
                sim.sfu_remove(key, RemovalReason::IceTimeout);
            }
        }
        Action::SfuRefuses(a) => {
            sim.sfu
                .refuse_once
                .insert(fleetcall_signaling::ids::DeviceId::new(name(*a)).unwrap());
        }
        Action::Run(ms_) => sim.run_for(Duration::from_millis(*ms_)),
        Action::Jump(s) => sim.jump(Duration::from_secs(*s)),
    }
}

/// Invariant 1 across steps: terminal states are absorbing and keep their
/// reason.
fn check_absorbing(sim: &Sim, seen: &mut BTreeMap<u64, EndReason>, step: usize) {
    for c in sim.ctl.calls() {
        match (c.end_reason, seen.get(&c.id.0)) {
            (Some(r), None) => {
                seen.insert(c.id.0, r);
            }
            (Some(r), Some(prev)) => assert_eq!(
                r, *prev,
                "seed {}: step {step}: call {} changed its end reason",
                sim.seed, c.id
            ),
            (None, Some(prev)) => panic!(
                "seed {}: step {step}: call {} came back to life after {prev:?}",
                sim.seed, c.id
            ),
            (None, None) => {}
        }
    }
}

fn run_case(seed: u64, jitter_ms: u64, actions: &[Action]) -> Sim {
    let mut sim = Sim::new(seed);
    sim.jitter = Duration::from_millis(jitter_ms);
    for i in 0..DEVICES {
        // Some devices answer on their own, the others only by action.
        let auto = Auto {
            accept: i >= 3,
            ..Auto::default()
        };
        let dev = name(i);
        let (transport, grant) = match i {
            0 => (Transport::Quic, Grant::device(vec![RoomPattern::parse("room-a").unwrap()])),
            1 | 2 => (Transport::Quic, Grant::device(Vec::new())),
            _ => (Transport::WebSocket, all_rooms()),
        };
        sim.add_credentialed(&dev, transport, auto, credential(&dev, &dev, grant));
    }
    let mut seen = BTreeMap::new();
    let mut last_op = BTreeMap::new();
    for (step, action) in actions.iter().enumerate() {
        apply(&mut sim, action, &mut last_op);
        sim.run_for(Duration::from_millis(1));
        sim.check();
        check_absorbing(&sim, &mut seen, step);
    }

    // The network heals: every device is reachable again and behaves.
    sim.sfu.refuse_once.clear();
    for i in 0..DEVICES {
        let dev = name(i);
        sim.dev_mut(&dev).frozen = false;
        sim.dev_mut(&dev).deaf = false;
    }
    // Longer than every deadline: ring 30 s, grace 10 s, setup 10+5+15 s.
    // A device closed meanwhile (its stuck stream was detected just before
    // the heal) reconnects, as a client does.
    for _ in 0..12 {
        for i in 0..DEVICES {
            if sim.dev(&name(i)).conn.is_none() {
                sim.connect(&name(i), true);
            }
        }
        sim.run_for(Duration::from_secs(10));
        sim.check();
        check_absorbing(&sim, &mut seen, actions.len());
    }
    for c in sim.ctl.calls() {
        if c.phase == CallPhase::Ended {
            continue;
        }
        assert!(
            c.phase == CallPhase::Active,
            "seed {seed}: call {} still in {:?} after everything healed: {c:?}",
            c.id,
            c.phase
        );
        for (d, st, _) in &c.members {
            assert_eq!(
                *st,
                ParticipantStatus::Connected,
                "seed {seed}: {d} not connected in {c:?}"
            );
        }
    }
    // Every device that was told about a call and is still in it agrees with
    // the server, and no device believes it is in a call that ended.
    for i in 0..DEVICES {
        let dev = name(i);
        for call in sim.dev(&dev).in_call.clone() {
            let live = sim
                .ctl
                .call(CallId(call))
                .is_some_and(|c| c.phase != CallPhase::Ended);
            assert!(
                live,
                "seed {seed}: {dev} still believes it is in ended call {call}"
            );
        }
    }
    sim
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES=2000 for a deeper search.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(48),
        max_shrink_iters: 2000,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct("tests/invariants_proptest.proptest-regressions"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn invariants_hold_under_random_events_losses_and_clock_jumps(
        seed in any::<u64>(),
        jitter_ms in 0u64..30,
        actions in prop::collection::vec(action(), 1..60),
    ) {
        run_case(seed, jitter_ms, &actions);
    }
}

/// A fixed long run, so the suite always covers a deep sequence even when
/// proptest's random cases are short. `FLEETCALL_SEED` picks another.
#[test]
fn long_fixed_sequence() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let seed = seed_from_env(0xf1ee7);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    let actions = prop::collection::vec(action(), 400)
        .new_tree(&mut runner)
        .unwrap()
        .current();
    let sim = run_case(seed, 20, &actions);
    // The run must have exercised the paths it claims to cover.
    let st = sim.ctl.stats();
    println!("{st:#?}");
    let ended: u64 = st
        .call_transitions
        .iter()
        .filter(|(t, _)| t.to == CallPhase::Ended)
        .map(|(_, n)| n)
        .sum();
    assert!(
        st.direct_calls_created >= 10 && st.group_calls_created >= 5 && st.rooms_opened >= 3,
        "{st:?}"
    );
    assert!(st.errors_sent.get(&pb::ErrorCode::IdentityInUse).is_some_and(|n| *n >= 1), "{st:?}");
    assert!(st.connections_closed.get(&pb::CloseReason::Revoked).is_some_and(|n| *n >= 1), "{st:?}");
    assert!(ended >= 10, "{st:?}");
    let reached_active = st
        .call_transitions
        .keys()
        .filter(|t| t.from == CallPhase::Connecting && t.to == CallPhase::Active)
        .count();
    assert!(reached_active >= 1, "{st:?}");
    assert!(st.sessions_resumed >= 1 && st.sessions_unknown + st.sessions_replaced >= 1);
    assert!(st.heartbeats_missed >= 3 && st.stale_sessions_swept >= 1);
}
