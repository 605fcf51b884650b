//! The SFU's active-speaker changes reach every device of the call as
//! device ids; keys of ended participations are left out.

mod common;

use common::*;
use fleetcall_signaling::controller::SfuNotice;
use fleetcall_signaling::pb::{self, server_frame::Kind as S};

#[test]
fn active_speakers_are_relayed_as_device_ids() {
    let mut sim = Sim::new(seed_from_env(241));
    sim.add("owner").add("b").add("c");
    let call = sim.group("owner", &["b", "c"]);
    sim.drain();
    sim.run_for(secs(1));
    let (owner, b, c) = (sim.key_of("owner", call).unwrap(), sim.key_of("b", call).unwrap(), sim.key_of("c", call).unwrap());

    let now = sim.now;
    for to in [owner, b, c] {
        sim.ctl.handle_sfu(now, SfuNotice::ActiveSpeakers { participant: to, speakers: vec![c, owner] });
    }
    sim.drain();
    sim.run_for(secs(1));
    for name in ["owner", "b", "c"] {
        let got: Vec<pb::ActiveSpeakers> = sim.received(name, |k| match k {
            S::ActiveSpeakers(a) => Some(a.clone()),
            _ => None,
        });
        assert_eq!(got, vec![pb::ActiveSpeakers { call_id: call, device_ids: vec!["c".into(), "owner".into()] }], "{name}");
    }

    // c leaves: a late list naming it names only the others.
    sim.request("c", pb::client_frame::Kind::GroupLeave(pb::GroupLeave { call_id: call }));
    sim.run_for(ms(100));
    let now = sim.now;
    sim.ctl.handle_sfu(now, SfuNotice::ActiveSpeakers { participant: b, speakers: vec![c, owner] });
    sim.drain();
    sim.run_for(secs(1));
    let last = sim
        .received("b", |k| match k {
            S::ActiveSpeakers(a) => Some(a.device_ids.clone()),
            _ => None,
        })
        .pop();
    assert_eq!(last, Some(vec!["owner".to_owned()]));
    // And one addressed to the gone participation is dropped.
    let stale = sim.ctl.stats().stale_sfu_notices;
    sim.ctl.handle_sfu(now, SfuNotice::ActiveSpeakers { participant: c, speakers: vec![owner] });
    sim.drain();
    sim.run_for(secs(1));
    assert_eq!(sim.ctl.stats().stale_sfu_notices, stale + 1);
    sim.check();
}
