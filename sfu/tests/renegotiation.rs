//! A participant's own offer (an ICE restart) crossing an SFU offer in flight:
//! the participant's offer wins, and the SFU offers its change again after.

mod common;

use std::time::Duration;

use common::{init_log, Net};
use fleetcall_sfu::SdpOffer;

#[test]
fn client_offer_during_pending_server_offer_is_answered_and_the_change_reoffered() {
    init_log();
    let mut net = Net::new(Duration::from_secs(5));
    let a = net.join("ward");
    net.run(Duration::from_millis(500));
    net.clients[a].auto_answer = false;

    let b = net.join("ward");
    net.run(Duration::from_millis(200));
    assert_eq!(net.clients[a].held_offers.len(), 1, "the SFU offered b's track to a");

    // a ignores that offer and restarts ICE with its own.
    let now = net.now;
    let participant = net.clients[a].participant;
    let offer = net.clients[a].peer.restart_ice(now).unwrap();
    let answer = net.sfu.accept_offer(now, participant, SdpOffer::from_sdp_string(&offer).unwrap()).expect("client offer answered");
    net.clients[a].peer.accept_answer(now, &answer.to_sdp_string()).unwrap();
    net.drain_client(a);
    net.clients[a].held_offers.clear();
    net.clients[a].auto_answer = true;
    net.pump();

    // The abandoned change comes again; once answered, a hears b.
    assert!(net.run_until(Duration::from_secs(5), |n| n.clients[a].heard.get(&(b as u8)).copied().unwrap_or(0) >= 20));
    assert!(net.clients[b].heard.get(&(a as u8)).copied().unwrap_or(0) >= 20);
    assert_eq!(net.stats().forwarding_entries, 2);
}
