//! SDP between each device and the SFU over the control stream: join
//! offer/answer, server-initiated renegotiation, device ICE restart, glare,
//! and the answer deadline.

mod common;

use common::*;
use fleetcall_signaling::controller::{SfuCommand, SfuNotice};
use fleetcall_signaling::pb::{
    self, CallPhase, EndReason, ErrorCode, client_frame::Kind as C, server_frame::Kind as S,
};

fn offers(sim: &Sim, name: &str) -> Vec<pb::SdpOffer> {
    sim.received(name, |k| match k {
        S::SdpOffer(o) => Some(o.clone()),
        _ => None,
    })
}

#[test]
fn server_offers_are_relayed_with_revisions_and_answers_go_back_to_the_sfu() {
    let mut sim = Sim::new(seed_from_env(91));
    sim.add("a").add("b");
    sim.dev_mut("a").auto.answer_offers = false;
    let call = sim.active_call("a", "b");
    let a_key = sim.key_of("a", call).unwrap();
    // b connected after a, so the SFU renegotiated a.
    let o = offers(&sim, "a");
    assert_eq!(o.len(), 1);
    assert_eq!(
        (o[0].call_id, o[0].revision, o[0].session_id),
        (call, 1, a_key.session.0)
    );

    // The room changes again before a answered: the newer offer supersedes.
    let now = sim.now;
    sim.ctl.handle_sfu(
        now,
        SfuNotice::Offer {
            participant: a_key,
            sdp: sdp("v=0 second"),
        },
    );
    sim.drain();
    sim.run_for(ms(50));
    let o = offers(&sim, "a");
    assert_eq!(o.last().unwrap().revision, 2);
    // An answer to the superseded offer is refused as stale.
    let stale = sim.request(
        "a",
        C::SdpAnswer(pb::SdpAnswer {
            call_id: call,
            revision: 1,
            sdp: "v=0 a1".into(),
            ..Default::default()
        }),
    );
    let good = sim.request(
        "a",
        C::SdpAnswer(pb::SdpAnswer {
            call_id: call,
            revision: 2,
            sdp: "v=0 a2".into(),
            ..Default::default()
        }),
    );
    sim.run_for(ms(50));
    assert_eq!(sim.error_of("a", stale), ErrorCode::StaleRevision);
    sim.acked_call("a", good);
    assert!(sim.sfu.commands.contains(&SfuCommand::Answer {
        participant: a_key,
        sdp: sdp("v=0 a2")
    }));
    sim.check();
}

#[test]
fn ice_restart_from_the_device_is_answered_by_the_sfu() {
    let mut sim = Sim::new(seed_from_env(92));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    let b_key = sim.key_of("b", call).unwrap();
    let op = sim.request(
        "b",
        C::IceRestart(pb::IceRestart {
            call_id: call,
            revision: 7,
            sdp: "v=0 restart".into(),
            ..Default::default()
        }),
    );
    sim.run_for(ms(100));
    sim.acked_call("b", op);
    assert!(sim.sfu.commands.contains(&SfuCommand::Offer {
        participant: b_key,
        sdp: sdp("v=0 restart")
    }));
    let answers = sim.received("b", |k| match k {
        S::SdpAnswer(a) => Some((a.revision, a.sdp.clone())),
        _ => None,
    });
    assert_eq!(
        answers.last().unwrap(),
        &(7, "v=0 sfu restart answer".to_string())
    );
    assert_eq!(sim.phase(call), CallPhase::Active);
    sim.check();
}

#[test]
fn a_device_offer_cancels_a_server_offer_in_flight() {
    let mut sim = Sim::new(seed_from_env(93));
    sim.add("a").add("b");
    sim.dev_mut("a").auto.answer_offers = false;
    let call = sim.active_call("a", "b");
    assert_eq!(offers(&sim, "a").len(), 1, "server offer pending at a");
    // Glare: a restarts ICE instead of answering.
    sim.request(
        "a",
        C::IceRestart(pb::IceRestart {
            call_id: call,
            revision: 1,
            sdp: "v=0 r".into(),
            ..Default::default()
        }),
    );
    sim.run_for(ms(100));
    // The late answer to the cancelled offer finds nothing outstanding.
    let late = sim.request(
        "a",
        C::SdpAnswer(pb::SdpAnswer {
            call_id: call,
            revision: 1,
            sdp: "v=0".into(),
            ..Default::default()
        }),
    );
    sim.run_for(ms(50));
    assert_eq!(sim.error_of("a", late), ErrorCode::NoPendingOffer);
    // And no answer deadline is left to kill the call.
    sim.run_for(secs(20));
    assert_eq!(sim.phase(call), CallPhase::Active);
    sim.check();
}

#[test]
fn an_unanswered_server_offer_times_out() {
    let mut sim = Sim::new(seed_from_env(94));
    sim.add("owner").add("b").add("c");
    let call = sim.group("owner", &["b"]);
    sim.dev_mut("owner").auto.answer_offers = false;
    // c joins; the SFU renegotiates owner and b; owner never answers.
    sim.dev_mut("c").auto.accept = true;
    sim.request(
        "owner",
        C::GroupInvite(pb::GroupInvite {
            call_id: call,
            invitees: vec!["c".into()],
        }),
    );
    sim.run_for(secs(12));
    let ended = sim.ended_for("owner", call);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].reason(), EndReason::SetupTimeout);
    assert!(ended[0].detail.contains("renegotiation"));
    // Only the owner's media went; b and c go on.
    assert_eq!(sim.phase(call), CallPhase::Active);
    assert_eq!(sim.sfu.participants.len(), 2);
    sim.check();
}

#[test]
fn an_offer_made_while_detached_is_delivered_and_timed_after_the_resume() {
    let mut sim = Sim::new(seed_from_env(95));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");
    let a_key = sim.key_of("a", call).unwrap();
    let before = offers(&sim, "a").len();
    sim.drop_connection("a");
    let now = sim.now;
    sim.ctl.handle_sfu(
        now,
        SfuNotice::Offer {
            participant: a_key,
            sdp: sdp("v=0 while away"),
        },
    );
    sim.drain();
    // Longer than the answer timeout, shorter than the grace.
    sim.run_for(secs(9));
    assert_eq!(sim.phase(call), CallPhase::Active);
    sim.connect("a", true);
    sim.run_for(ms(200));
    let o = offers(&sim, "a");
    assert_eq!(o.len(), before + 1, "delivered exactly once");
    assert_eq!(o.last().unwrap().sdp, "v=0 while away");
    assert!(
        sim.sfu
            .commands
            .iter()
            .any(|c| matches!(c, SfuCommand::Answer { participant, .. } if *participant == a_key))
    );
    sim.run_for(secs(15));
    assert_eq!(sim.phase(call), CallPhase::Active);
    sim.check();
}
