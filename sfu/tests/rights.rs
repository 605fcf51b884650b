//! A grant's media rights, enforced in the core: a participant that may not
//! publish is heard by nobody even when it offers and sends a track, and one
//! that may not subscribe receives nothing.

mod common;

use std::time::Duration;

use common::{init_log, Net};
use fleetcall_sfu::Rights;

#[test]
fn a_listener_is_not_heard_and_a_mute_subscriber_hears_nothing() {
    init_log();
    let mut net = Net::new(Duration::from_secs(5));
    let talker = net.join("lecture");
    let listener = net.join_as("lecture", false, Rights { publish: false, subscribe: true });
    let announcer = net.join_as("lecture", false, Rights { publish: true, subscribe: false });
    net.run(Duration::from_secs(3));

    let heard = |i: usize, from: usize| net.clients[i].heard.get(&(from as u8)).copied().unwrap_or(0);
    // The listener sends all along (its client ignores the grant); its
    // packets stop at the server.
    assert!(net.clients[listener].frames_sent > 100);
    assert_eq!(heard(talker, listener), 0);
    assert_eq!(heard(announcer, listener), 0);
    assert!(net.stats().dropped.not_permitted > 100, "{:?}", net.stats().dropped);
    // It hears the others.
    assert!(heard(listener, talker) > 100 && heard(listener, announcer) > 100);
    // The announcer is heard and hears no one.
    assert!(heard(talker, announcer) > 100);
    assert!(net.clients[announcer].heard.values().all(|n| *n == 0), "{:?}", net.clients[announcer].heard);

    let stats = net.stats();
    assert_eq!(stats.tracks, 2, "the listener's offered track is refused");
    // talker -> listener; announcer -> talker, listener.
    assert_eq!(stats.forwarding_entries, 3);
}

#[test]
fn rights_hold_in_a_room_of_audio_slots() {
    init_log();
    // Six in the room: more than the 3 slots + 1, so audio goes by speaker
    // selection into slots; the rights must hold on that path too.
    let mut net = Net::new(Duration::from_secs(5));
    let talkers: Vec<usize> = (0..4).map(|_| net.join("big")).collect();
    let listener = net.join_as("big", false, Rights { publish: false, subscribe: true });
    let deaf = net.join_as("big", false, Rights { publish: true, subscribe: false });
    net.run(Duration::from_secs(4));
    let heard_from = |i: usize| -> u64 { net.clients.iter().map(|c| c.heard.get(&(i as u8)).copied().unwrap_or(0)).sum() };
    assert_eq!(heard_from(listener), 0, "nobody hears the listener");
    assert!(net.clients[listener].heard.values().sum::<u64>() > 100, "the listener hears the room");
    assert_eq!(net.clients[deaf].heard.values().sum::<u64>(), 0, "the deaf announcer hears nothing");
    assert!(talkers.iter().all(|t| net.clients[*t].heard.values().sum::<u64>() > 100), "the talkers hear each other");
}
