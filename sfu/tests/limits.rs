//! The core's limits on what one participant can make it spend or take:
//! the addresses it may claim, the datagrams it may send, the tracks it may
//! publish. Each test crosses a limit and asserts the refusal is counted or
//! returned, the offender alone is affected, and the others' audio goes on
//! with no gap over 200 ms.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{init_log, Net, SFU_ADDR};
use fleetcall_sfu::{JoinRequest, ParticipantId, Rights, RoomId, SdpOffer, SfuConfig, SfuError};
use str0m::media::{Direction, MediaKind};
use str0m::Rtc;

/// Three participants talking, every RTP packet recorded and every
/// client's last datagrams kept.
fn room_of_three() -> Net {
    let mut net = Net::new(Duration::from_secs(5));
    net.record_rtp = true;
    net.keep_sent_rtp = true;
    for _ in 0..3 {
        net.join("ward");
    }
    assert!(
        net.run_until(Duration::from_secs(5), |n| n.clients.iter().all(|c| c.heard.len() == 2 && c.heard.values().all(|h| *h >= 10))),
        "the call is up"
    );
    net
}

/// The longest silence, from `since` on, between packets that `listener`
/// received from client `talker`.
fn longest_gap(net: &Net, listener: usize, talker: u8, since: Instant) -> Duration {
    let arrivals: Vec<Instant> =
        net.clients[listener].rtp.iter().filter(|r| r.first_byte == Some(talker) && r.at >= since).map(|r| r.at).collect();
    assert!(arrivals.len() >= 40, "client {listener} kept hearing client {talker}: {} packets", arrivals.len());
    let mut gap = arrivals[0] - since;
    for pair in arrivals.windows(2) {
        gap = gap.max(pair[1] - pair[0]);
    }
    gap.max(net.now - arrivals[arrivals.len() - 1])
}

/// An offer publishing `tracks` audio tracks.
fn offer_publishing(now: Instant, tracks: usize) -> SdpOffer {
    let mut rtc = Rtc::new(now);
    let mut api = rtc.sdp_api();
    for _ in 0..tracks {
        api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    }
    api.apply().expect("an offer").0
}

#[test]
fn a_participant_replaying_its_own_stun_from_another_participants_address_takes_nothing() {
    init_log();
    let mut net = room_of_three();
    let sfu: SocketAddr = SFU_ADDR.parse().unwrap();
    let (attacker, victim) = (net.clients[0].addr, net.clients[1].addr);
    // Genuine: the attacker's own credentials, integrity and all.
    let stun = net.sent_stun.get(&attacker).expect("the attacker's STUN binding request").clone();
    let before = net.stats();
    let attack = net.now;
    for _ in 0..50 {
        net.sfu.handle_datagram(net.now, victim, sfu, &stun);
        net.run(Duration::from_millis(20));
    }
    let after = net.stats();
    assert_eq!(after.dropped.address_taken - before.dropped.address_taken, 50, "{after:?}");
    assert_eq!((after.rooms, after.participants), (1, 3), "nobody was dropped: {after:?}");
    // The victim's media still reaches its session: the others hear it, and
    // it hears them.
    for listener in [0, 2] {
        let gap = longest_gap(&net, listener, 1, attack);
        assert!(gap <= Duration::from_millis(200), "client {listener} lost the victim for {gap:?}");
    }
    let gap = longest_gap(&net, 1, 2, attack);
    assert!(gap <= Duration::from_millis(200), "the victim lost client 2 for {gap:?}");
    // The attacker's own address is still its own.
    let gap = longest_gap(&net, 2, 0, attack);
    assert!(gap <= Duration::from_millis(200), "the attacker's own media stopped for {gap:?}");
}

#[test]
fn datagrams_longer_than_the_limit_are_dropped_before_parsing() {
    init_log();
    let mut net = room_of_three();
    let sfu: SocketAddr = SFU_ADDR.parse().unwrap();
    let talker = net.clients[0].addr;
    let limit = SfuConfig::default().max_datagram;
    let rtp = net.sent_rtp.get(&talker).expect("a genuine SRTP packet").clone();
    let mut long = rtp.clone();
    long.resize(limit + 1, 0);
    let mut at_limit = rtp;
    at_limit.resize(limit, 0);
    let before = net.stats();
    let attack = net.now;
    for _ in 0..50 {
        net.sfu.handle_datagram(net.now, talker, sfu, &long);
        net.sfu.handle_datagram(net.now, talker, sfu, &at_limit);
        net.run(Duration::from_millis(20));
    }
    let after = net.stats();
    // Only the one over the limit counts as oversize; the one at it goes to
    // the session (which cannot decrypt it) like any other.
    assert_eq!(after.dropped.oversize - before.dropped.oversize, 50, "{after:?}");
    assert_eq!(after.participants, 3, "{after:?}");
    for listener in [1, 2] {
        let gap = longest_gap(&net, listener, 0, attack);
        assert!(gap <= Duration::from_millis(200), "client {listener} lost the talker for {gap:?}");
    }
}

#[test]
fn an_offer_publishing_more_tracks_than_allowed_is_refused_and_costs_the_room_nothing() {
    init_log();
    let mut net = room_of_three();
    let limit = SfuConfig::default().max_tracks_per_participant;
    let before = net.stats();

    // At the join: refused, nothing created.
    let request =
        |id, offer| JoinRequest { room: RoomId::from("ward"), participant: ParticipantId(id), name: "greedy".into(), offer, rights: Rights::ALL };
    let refused = net.sfu.join(net.now, request(900, offer_publishing(net.now, limit + 1)));
    assert!(matches!(refused, Err(SfuError::TooManyTracks { offered, limit: l }) if offered == limit + 1 && l == limit), "{refused:?}");
    net.pump();
    let after = net.stats();
    assert_eq!((after.participants, after.tracks, after.forwarding_entries), (before.participants, before.tracks, before.forwarding_entries));

    // In a renegotiation: refused before it touches the session.
    let attack = net.now;
    let greedy = net.clients[0].participant;
    let refused = net.sfu.accept_offer(net.now, greedy, offer_publishing(net.now, limit + 1));
    assert!(matches!(refused, Err(SfuError::TooManyTracks { .. })), "{refused:?}");
    net.run(Duration::from_secs(1));
    let after = net.stats();
    assert_eq!((after.participants, after.tracks), (3, 3), "{after:?}");
    // The offender keeps its media too: the refusal changed nothing.
    for (listener, talker) in [(1, 0), (2, 1), (0, 2)] {
        let gap = longest_gap(&net, listener, talker, attack);
        assert!(gap <= Duration::from_millis(200), "client {listener} lost client {talker} for {gap:?}");
    }

    // At the limit, the join is taken.
    let joined = net.sfu.join(net.now, request(901, offer_publishing(net.now, limit)));
    assert!(joined.is_ok(), "{joined:?}");
}
