//! A participant's own offer (an ICE restart) crossing an SFU offer in flight:
//! the participant's offer wins, and the SFU offers its change again after.

mod common;

use std::time::Duration;

use common::{init_log, Net};

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
    let mut api = net.clients[a].rtc.sdp_api();
    api.ice_restart(true);
    let (offer, pending) = api.apply().unwrap();
    let answer = net.sfu.accept_offer(now, participant, offer).expect("client offer answered");
    net.clients[a].rtc.sdp_api().accept_answer(pending, answer).unwrap();
    net.clients[a].held_offers.clear();
    net.clients[a].auto_answer = true;
    net.pump();

    // The abandoned change comes again; once answered, a hears b.
    assert!(net.run_until(Duration::from_secs(5), |n| n.clients[a].heard.get(&(b as u8)).copied().unwrap_or(0) >= 20));
    assert!(net.clients[b].heard.get(&(a as u8)).copied().unwrap_or(0) >= 20);
    assert_eq!(net.stats().forwarding_entries, 2);
}
