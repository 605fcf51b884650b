//! A device sets its own noise suppression over the control plane: the
//! request is acked and becomes one SFU policy command for that device, in a
//! call or not; `use_default` clears it; the call is not disturbed.

mod common;

use common::*;
use fleetcall_signaling::controller::SfuCommand;
use fleetcall_signaling::pb::{self, client_frame::Kind as C, server_frame::Kind as S};

fn suppression_commands(sim: &Sim) -> Vec<(String, Option<bool>)> {
    sim.sfu
        .commands
        .iter()
        .filter_map(|c| match c {
            SfuCommand::SetSuppression { device, on } => Some((device.to_string(), *on)),
            _ => None,
        })
        .collect()
}

#[test]
fn settings_become_sfu_policy_commands_and_leave_the_call_alone() {
    let mut sim = Sim::new(seed_from_env(81));
    sim.add("a").add("b");
    let call = sim.active_call("a", "b");

    let on = sim.request("a", C::SetNoiseSuppression(pb::SetNoiseSuppression { enabled: true, use_default: false }));
    let reset = sim.request("b", C::SetNoiseSuppression(pb::SetNoiseSuppression { enabled: false, use_default: true }));
    sim.run_for(ms(100));
    assert!(matches!(sim.reply("a", on).unwrap().kind, Some(S::Ack(_))));
    assert!(matches!(sim.reply("b", reset).unwrap().kind, Some(S::Ack(_))));
    assert_eq!(suppression_commands(&sim), vec![("a".to_owned(), Some(true)), ("b".to_owned(), None)]);
    assert_eq!(sim.phase(call), pb::CallPhase::Active, "the call goes on");

    // The same request again (a retransmission) is answered, not re-applied.
    sim.request_with_op("a", on, C::SetNoiseSuppression(pb::SetNoiseSuppression { enabled: true, use_default: false }));
    sim.run_for(ms(100));
    assert_eq!(suppression_commands(&sim).len(), 2);
    sim.check();
}
