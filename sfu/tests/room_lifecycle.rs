//! Three peers in a room hear each other; leaving and going silent clean up
//! every forwarding entry, and the last leave removes the room.

mod common;

use std::time::Duration;

use common::{init_log, Net};
use fleetcall_sfu::{LeaveReason, RoomId, TrackOutlet};

const GRACE: Duration = Duration::from_secs(5);

/// Everyone hears everyone else at least `min` packets, nobody hears itself.
fn all_hear_each_other(net: &Net, min: u64) -> bool {
    net.clients.iter().filter(|c| !c.silent).all(|c| {
        net.clients
            .iter()
            .filter(|o| o.index != c.index && !o.silent)
            .all(|o| c.heard.get(&o.index).copied().unwrap_or(0) >= min)
            && !c.heard.contains_key(&c.index)
    })
}

#[test]
fn three_peers_forward_then_leave_cleans_up() {
    init_log();
    let mut net = Net::new(GRACE);
    for _ in 0..3 {
        net.join("ward-3");
    }
    assert!(net.run_until(Duration::from_secs(5), |n| all_hear_each_other(n, 20)), "every peer hears both others");

    let stats = net.stats();
    assert_eq!((stats.rooms, stats.participants, stats.tracks), (1, 3, 3));
    assert_eq!(stats.forwarding_entries, 6, "3 tracks x 2 subscribers");
    let ids: Vec<_> = net.clients.iter().map(|c| c.participant).collect();
    let mut everyone_to_everyone: Vec<_> = ids
        .iter()
        .flat_map(|p| ids.iter().filter(move |s| *s != p).map(move |s| TrackOutlet { room: RoomId::from("ward-3"), publisher: *p, subscriber: *s, open: true }))
        .collect();
    everyone_to_everyone.sort();
    assert_eq!(net.sfu.forwarding(), everyone_to_everyone, "who receives whom, every offer answered");

    // Client 0 leaves: only the two entries between 1 and 2 remain.
    let leaving = net.clients[0].participant;
    net.sfu.leave(net.now, leaving, LeaveReason::Requested).unwrap();
    net.clients[0].silent = true;
    net.pump();
    let stats = net.stats();
    assert_eq!((stats.participants, stats.tracks, stats.forwarding_entries), (2, 2, 2));
    assert!(net.sfu.forwarding().iter().all(|o| o.publisher != leaving && o.subscriber != leaving), "{:?}", net.sfu.forwarding());
    for c in &net.clients[1..] {
        assert!(c.events.iter().any(|e| *e == format!("left:{leaving}:requested")), "{:?}", c.events);
    }

    // The remaining two keep hearing each other after renegotiating the stop.
    let before: Vec<u64> = net.clients[1..].iter().map(|c| c.heard.values().sum()).collect();
    net.run(Duration::from_secs(1));
    for (c, before) in net.clients[1..].iter().zip(before) {
        assert!(c.heard.values().sum::<u64>() >= before + 40, "client {} still hears", c.index);
    }

    for i in 1..3 {
        let id = net.clients[i].participant;
        net.sfu.leave(net.now, id, LeaveReason::Requested).unwrap();
        net.clients[i].silent = true;
        net.pump();
    }
    let stats = net.stats();
    assert_eq!(
        (stats.rooms, stats.participants, stats.tracks, stats.forwarding_entries, stats.demux_entries),
        (0, 0, 0, 0, 0)
    );
}

#[test]
fn silent_peer_is_removed_after_the_grace() {
    init_log();
    let mut net = Net::new(GRACE);
    for _ in 0..3 {
        net.join("lobby");
    }
    assert!(net.run_until(Duration::from_secs(5), |n| all_hear_each_other(n, 10)));

    // Client 2 vanishes without a word.
    net.clients[2].silent = true;
    let gone = net.clients[2].participant;
    let vanished_at = net.now;
    assert!(net.run_until(GRACE + Duration::from_secs(2), |n| n.stats().participants == 2));
    let took = net.now - vanished_at;
    assert!(took >= GRACE - Duration::from_millis(100), "not before the grace: {took:?}");
    assert_eq!(net.removed, vec![(gone, LeaveReason::IceTimeout)]);
    let stats = net.stats();
    assert_eq!((stats.tracks, stats.forwarding_entries), (2, 2));

    // The others are fine and still connected after several more graces.
    net.run(GRACE * 3);
    assert_eq!(net.stats().participants, 2);
    assert!(all_hear_each_other(&net, 100));
}
