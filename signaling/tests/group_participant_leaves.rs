//! Group calls: create, invite, join, leave, end. One participant leaving
//! removes only its media; ending removes all.

mod common;

use common::*;
use fleetcall_signaling::controller::SfuCommand;
use fleetcall_signaling::ids::ParticipantKey;
use fleetcall_signaling::pb::{
    self, CallKind, CallPhase, EndReason, ParticipantStatus, client_frame::Kind as C,
    server_frame::Kind as S,
};

fn leaves(sim: &Sim) -> Vec<ParticipantKey> {
    sim.sfu
        .commands
        .iter()
        .filter_map(|c| match c {
            SfuCommand::Leave { participant, .. } => Some(*participant),
            _ => None,
        })
        .collect()
}

#[test]
fn group_forms_with_renegotiation_for_existing_members() {
    let mut sim = Sim::new(seed_from_env(51));
    sim.add("owner").add("b").add("c");
    let call = sim.group("owner", &["b", "c"]);
    let snap = sim
        .ctl
        .call(fleetcall_signaling::ids::CallId(call))
        .unwrap();
    assert_eq!(snap.kind, CallKind::Group);
    assert_eq!(snap.phase, CallPhase::Active);
    assert_eq!(snap.members.len(), 3);
    assert!(
        snap.members
            .iter()
            .all(|(_, st, key)| *st == ParticipantStatus::Connected && key.is_some())
    );
    assert_eq!(sim.sfu.participants.len(), 3);
    // Invitees learned who invited them and the group's name.
    let inc = sim.received("b", |k| match k {
        S::IncomingCall(i) => Some(i.clone()),
        _ => None,
    });
    assert_eq!(
        (
            inc[0].from.as_str(),
            inc[0].group_name.as_str(),
            inc[0].kind()
        ),
        ("owner", "ward", CallKind::Group)
    );
    // The SFU renegotiated members already connected when others arrived:
    // offers went down the control stream and the answers came back.
    let offers = sim.received("owner", |k| matches!(k, S::SdpOffer(_)).then_some(()));
    assert!(!offers.is_empty());
    sim.run_for(ms(500)); // let the last answers arrive
    let answers = sim
        .sfu
        .commands
        .iter()
        .filter(|c| matches!(c, SfuCommand::Answer { .. }))
        .count();
    let total_offers: usize = ["owner", "b", "c"]
        .iter()
        .map(|d| {
            sim.received(d, |k| matches!(k, S::SdpOffer(_)).then_some(()))
                .len()
        })
        .sum();
    // Two offers back to back supersede each other: the answer to the older
    // one is refused as stale, the newest is relayed.
    let stale: usize = ["owner", "b", "c"]
        .iter()
        .map(|d| {
            sim.received(d, |k| {
                matches!(k, S::Error(e) if e.code() == pb::ErrorCode::StaleRevision).then_some(())
            })
            .len()
        })
        .sum();
    assert_eq!(answers + stale, total_offers);
    assert!(answers >= 2);
    sim.check();
}

#[test]
fn one_participant_leaving_removes_only_its_media() {
    let mut sim = Sim::new(seed_from_env(52));
    sim.add("owner").add("b").add("c");
    let call = sim.group("owner", &["b", "c"]);
    let keys: Vec<_> = ["owner", "b", "c"]
        .iter()
        .map(|d| sim.key_of(d, call).unwrap())
        .collect();

    let op = sim.request("c", C::GroupLeave(pb::GroupLeave { call_id: call }));
    sim.run_for(ms(100));
    sim.acked_call("c", op);
    // Exactly c's participant left the SFU.
    assert_eq!(leaves(&sim), vec![keys[2]]);
    assert!(
        sim.sfu.participants.contains_key(&keys[0]) && sim.sfu.participants.contains_key(&keys[1])
    );
    assert_eq!(sim.phase(call), CallPhase::Active);
    // c's view: its call is over. Others: c is gone, because it left.
    let ended = sim.ended_for("c", call);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].reason(), EndReason::Left);
    for dev in ["owner", "b"] {
        assert!(sim.ended_for(dev, call).is_empty());
        let gone = sim.received(dev, |k| match k {
            S::ParticipantUpdate(u)
                if u.device_id == "c" && u.status() == ParticipantStatus::Gone =>
            {
                Some(u.reason())
            }
            _ => None,
        });
        assert_eq!(gone, vec![EndReason::Left], "{dev}");
    }
    sim.check();

    // The last two leave: the call ends as empty, all media gone.
    sim.request("b", C::GroupLeave(pb::GroupLeave { call_id: call }));
    sim.run_for(ms(100));
    assert_eq!(sim.phase(call), CallPhase::Active);
    sim.request("owner", C::Hangup(pb::Hangup { call_id: call }));
    sim.run_for(ms(100));
    assert_eq!(sim.end_reason(call), Some(EndReason::Empty));
    assert_eq!(sim.ended_for("owner", call)[0].reason(), EndReason::Left);
    assert!(sim.sfu.participants.is_empty());
    sim.check();
}

#[test]
fn the_owner_ends_the_group_for_everyone() {
    let mut sim = Sim::new(seed_from_env(53));
    sim.add("owner").add("b").add("c").add("d");
    let call = sim.group("owner", &["b", "c"]);
    // d is invited but has not answered yet.
    sim.request(
        "b",
        C::GroupInvite(pb::GroupInvite {
            call_id: call,
            invitees: vec!["d".into()],
        }),
    );
    sim.run_for(ms(100));
    assert!(
        !sim.received("d", |k| matches!(k, S::IncomingCall(_)).then_some(()))
            .is_empty()
    );

    // Only the owner may end it.
    let op = sim.request("b", C::GroupEnd(pb::GroupEnd { call_id: call }));
    sim.run_for(ms(50));
    assert_eq!(sim.error_of("b", op), pb::ErrorCode::Forbidden);

    sim.request("owner", C::GroupEnd(pb::GroupEnd { call_id: call }));
    sim.run_for(ms(100));
    for dev in ["owner", "b", "c", "d"] {
        let ended = sim.ended_for(dev, call);
        assert_eq!(ended.len(), 1, "{dev}");
        assert_eq!(ended[0].reason(), EndReason::EndedByOwner);
    }
    assert_eq!(leaves(&sim).len(), 3);
    assert!(sim.sfu.participants.is_empty());
    sim.check();
}

#[test]
fn invitations_can_be_declined_or_time_out_without_disturbing_the_group() {
    let mut sim = Sim::new(seed_from_env(54));
    sim.add("owner").add("b").add("c").add("busy1").add("busy2");
    let _other = sim.active_call("busy1", "busy2");
    let op = sim.request(
        "owner",
        C::GroupCreate(pb::GroupCreate {
            name: "rounds".into(),
            invitees: vec!["b".into(), "c".into(), "busy1".into(), "ghost".into()],
        }),
    );
    sim.run_for(ms(500));
    let call = sim.acked_call("owner", op);
    let gone = |sim: &Sim| {
        sim.received("owner", |k| match k {
            S::ParticipantUpdate(u) if u.status() == ParticipantStatus::Gone => {
                Some((u.device_id.clone(), u.reason()))
            }
            _ => None,
        })
    };
    assert_eq!(
        gone(&sim),
        vec![
            ("busy1".into(), EndReason::Busy),
            ("ghost".into(), EndReason::Unavailable)
        ]
    );
    sim.request("b", C::Decline(pb::Decline { call_id: call }));
    sim.run_for(secs(31));
    let g = gone(&sim);
    assert!(g.contains(&("b".into(), EndReason::Declined)), "{g:?}");
    assert!(g.contains(&("c".into(), EndReason::RingTimeout)), "{g:?}");
    assert_eq!(sim.ended_for("c", call)[0].reason(), EndReason::RingTimeout);
    assert_eq!(sim.phase(call), CallPhase::Active);
    assert_eq!(sim.sfu.participants.len(), 3); // owner + the unrelated 1:1 call
    sim.check();
}

#[test]
fn participant_whose_media_fails_is_removed_alone() {
    let mut sim = Sim::new(seed_from_env(55));
    sim.add("owner").add("b").add("c");
    let call = sim.group("owner", &["b", "c"]);
    let b_key = sim.key_of("b", call).unwrap();
    sim.sfu_remove(b_key, RemovalReason::IceTimeout);
    sim.run_for(ms(100));
    let ended = sim.ended_for("b", call);
    assert_eq!(ended[0].reason(), EndReason::MediaFailed);
    assert!(ended[0].detail.contains("ice timeout"));
    assert_eq!(sim.phase(call), CallPhase::Active);
    assert_eq!(sim.sfu.participants.len(), 2);
    // The SFU already dropped it: no Leave is sent for it.
    assert!(!leaves(&sim).contains(&b_key));
    sim.check();
}
