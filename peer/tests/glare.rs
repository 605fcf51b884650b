//! Glare against the SFU core: the device's ICE restart crosses the SFU's
//! renegotiation offer. The device's offer wins (PROTOCOL.md): the peer
//! refuses the SFU's offer while its own is pending, the SFU answers the
//! restart, and offers its change again. Found by the deterministic
//! simulation (`sim/`, seed 417): a peer that accepted the crossing offer
//! rolled its restart back on its side only, the SFU applied the restart,
//! and the two sessions no longer matched (no audio until a timeout).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fleetcall_peer::{DtlsIdentity, Output as PeerOutput, Peer, PeerConfig};
use fleetcall_sfu::{JoinRequest, Output, ParticipantId, Rights, RoomId, SdpAnswer, SdpOffer, Sfu, SfuConfig, SfuEvent};

const SFU: &str = "10.0.0.100:5000";

fn join(sfu: &mut Sfu, now: Instant, id: u64, addr: &str, identity: &DtlsIdentity) -> Peer {
    let mut peer = Peer::new(now, addr.parse().unwrap(), identity, PeerConfig::default()).unwrap();
    let offer = SdpOffer::from_sdp_string(&peer.create_offer(now).unwrap()).unwrap();
    let request = JoinRequest { room: RoomId::from("call-1"), participant: ParticipantId(id), name: format!("bed-{id}"), offer, rights: Rights::ALL };
    let joined = sfu.join(now, request).unwrap();
    peer.accept_answer(now, &joined.answer.to_sdp_string()).unwrap();
    peer
}

/// Runs the SFU and the peers on an instant network for up to 5 s of
/// virtual time, until the SFU has offers for `to`; returns them.
fn offers_for(sfu: &mut Sfu, now: &mut Instant, peers: &mut [(&mut Peer, SocketAddr)], to: ParticipantId) -> Vec<SdpOffer> {
    let sfu_addr: SocketAddr = SFU.parse().unwrap();
    let end = *now + Duration::from_secs(5);
    let mut offers = Vec::new();
    while *now < end {
        sfu.handle_timeout(*now);
        let mut to_peers = Vec::new();
        loop {
            match sfu.poll_output() {
                Output::Event(SfuEvent::Offer { participant, offer }) if participant == to => offers.push(offer),
                Output::Transmit(t) => to_peers.push((t.destination, t.contents)),
                Output::Timeout(_) => break,
                _ => {}
            }
        }
        if !offers.is_empty() {
            return offers;
        }
        for (peer, addr) in peers.iter_mut() {
            for (_, contents) in to_peers.iter().filter(|(d, _)| d == addr) {
                peer.handle_datagram(*now, sfu_addr, contents);
            }
            peer.handle_timeout(*now);
            loop {
                match peer.poll_output() {
                    PeerOutput::Transmit(d) => sfu.handle_datagram(*now, *addr, sfu_addr, &d.contents),
                    PeerOutput::Event(_) => {}
                    PeerOutput::Timeout(_) => break,
                }
            }
        }
        *now += Duration::from_millis(5);
    }
    offers
}

#[test]
fn the_devices_ice_restart_wins_over_a_crossing_server_offer() {
    let mut now = Instant::now();
    let identity = DtlsIdentity::generate().unwrap();
    let sfu_addr: SocketAddr = SFU.parse().unwrap();
    let (a_addr, b_addr): (SocketAddr, SocketAddr) = ("10.0.0.1:1000".parse().unwrap(), "10.0.0.2:2000".parse().unwrap());
    let mut sfu = Sfu::new(SfuConfig { candidates: vec![sfu_addr], ..SfuConfig::default() });
    let a_id = ParticipantId(1);
    let mut a = join(&mut sfu, now, 1, "10.0.0.1:1000", &identity);
    // b joins; once its media is up the SFU offers a its track.
    let mut b = join(&mut sfu, now, 2, "10.0.0.2:2000", &identity);
    let crossing = offers_for(&mut sfu, &mut now, &mut [(&mut a, a_addr), (&mut b, b_addr)], a_id);
    assert_eq!(crossing.len(), 1, "the SFU offers a the new track");

    // Meanwhile a restarts ICE; the SFU's offer reaches it first.
    let restart = a.restart_ice(now).unwrap();
    // One offer at a time: a second restart would replace the first on this
    // side only (found by the simulation, seed 2220).
    assert!(a.restart_ice(now).is_err(), "a second restart waits for the first one's answer");
    let refused = a.accept_offer(now, &crossing[0].to_sdp_string());
    assert!(refused.is_err(), "a crossing offer is superseded by ours: {refused:?}");

    // The SFU answers the restart (abandoning its own offer) and a applies it.
    let answer = sfu.accept_offer(now, a_id, SdpOffer::from_sdp_string(&restart).unwrap()).unwrap();
    a.accept_answer(now, &answer.to_sdp_string()).expect("the restart's answer applies");

    // The SFU offers its change again; both sides agree on it.
    let again = offers_for(&mut sfu, &mut now, &mut [(&mut a, a_addr), (&mut b, b_addr)], a_id);
    assert_eq!(again.len(), 1, "the abandoned change is offered again");
    let answer = a.accept_offer(now, &again[0].to_sdp_string()).unwrap();
    sfu.accept_answer(now, a_id, SdpAnswer::from_sdp_string(&answer).unwrap()).expect("the SFU takes the answer");
}
