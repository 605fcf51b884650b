//! Replays of the packet and SDP classes that have crashed other media
//! servers: a 19-byte STUN packet, STUN attributes that run past the end,
//! RTCP whose counts promise more than the packet holds, SRTP shorter than
//! its authentication tag, a zero-length DTLS handshake fragment, oversize
//! datagrams, and offers with an empty or malformed DTLS fingerprint.
//!
//! Each is sent from a live participant's own (ICE-validated) address, where
//! it reaches that participant's `Rtc`, and from a stranger's. The core must
//! not panic, must count what it drops, and the call must go on: both
//! participants stay, and the listener's audio has no gap over 200 ms.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{init_log, Net, SFU_ADDR};
use fleetcall_sfu::{JoinRequest, ParticipantId, Rights, RoomId, SdpOffer, SfuError, SfuStats};

/// Two participants talking, every RTP packet recorded at the listener and
/// the talkers' last SRTP datagrams kept.
fn call() -> Net {
    let mut net = Net::new(Duration::from_secs(5));
    net.record_rtp = true;
    net.keep_sent_rtp = true;
    net.join("ward");
    net.join("ward");
    assert!(net.run_until(Duration::from_secs(5), |n| n.clients.iter().all(|c| c.heard.values().sum::<u64>() >= 10)), "the call is up");
    net
}

fn dropped(s: &SfuStats) -> u64 {
    s.dropped.unknown_source + s.dropped.malformed + s.dropped.rejected + s.dropped.unroutable + s.dropped.oversize + s.dropped.address_taken
}

/// Sends each datagram from the first participant's address and from a
/// stranger's, then asserts the call went on for another second with no gap
/// over 200 ms at the listener, and that every datagram was dropped or
/// refused (none forwarded).
fn replay(net: &mut Net, datagrams: &[Vec<u8>]) {
    let sfu: SocketAddr = SFU_ADDR.parse().unwrap();
    let stranger: SocketAddr = "10.9.9.9:9999".parse().unwrap();
    let talker = net.clients[0].addr;
    let before = net.stats();
    let attack = net.now;
    for bytes in datagrams {
        for from in [talker, stranger] {
            net.sfu.handle_datagram(net.now, from, sfu, bytes);
        }
    }
    net.pump();
    let after_attack = net.stats();
    assert_eq!(after_attack.participants, 2, "nobody was dropped: {after_attack:?}");
    assert_eq!(after_attack.rtp_forwarded, before.rtp_forwarded, "nothing bad was forwarded");
    // A stranger's datagrams are all dropped; the talker's are dropped or
    // refused by its `Rtc` (which str0m may also just ignore: then they are
    // not counted, but they still cost nothing).
    assert!(dropped(&after_attack) >= dropped(&before) + datagrams.len() as u64, "{after_attack:?}");

    net.run(Duration::from_secs(1));
    let after = net.stats();
    assert_eq!((after.rooms, after.participants, after.forwarding_entries), (1, 2, 2), "{after:?}");
    let arrivals: Vec<Instant> = net.clients[1].rtp.iter().map(|r| r.at).filter(|at| *at >= attack - Duration::from_millis(200)).collect();
    assert!(arrivals.len() >= 40, "the listener kept hearing the talker: {} packets", arrivals.len());
    let gap = arrivals.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(gap <= Duration::from_millis(200), "audio gap of {gap:?} at the listener");
}

/// A STUN header: type, length, the magic cookie, a transaction id.
fn stun_header(kind: u16, length: u16) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&length.to_be_bytes());
    b.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    b.extend_from_slice(&[0x5a; 12]);
    b
}

#[test]
fn short_and_overrunning_stun_is_dropped() {
    init_log();
    let mut net = call();
    let mut datagrams = Vec::new();
    // 19 bytes: one short of a STUN header.
    datagrams.push(stun_header(0x0001, 0)[..19].to_vec());
    // The header promises 8 bytes of attributes; none follow.
    datagrams.push(stun_header(0x0001, 8));
    // A USERNAME attribute whose length runs past the packet.
    let mut overrun = stun_header(0x0001, 8);
    overrun.extend_from_slice(&[0x00, 0x06, 0x00, 0xff, b'a', b'b', b'c', b'd']);
    datagrams.push(overrun);
    // A MESSAGE-INTEGRITY attribute of zero length, and a length not a multiple of 4.
    let mut empty_integrity = stun_header(0x0001, 4);
    empty_integrity.extend_from_slice(&[0x00, 0x08, 0x00, 0x00]);
    datagrams.push(empty_integrity);
    let mut unaligned = stun_header(0x0001, 3);
    unaligned.extend_from_slice(&[0x00, 0x24, 0x00]);
    datagrams.push(unaligned);
    // A binding success response nobody asked for.
    datagrams.push(stun_header(0x0101, 0));
    replay(&mut net, &datagrams);
}

#[test]
fn rtcp_with_counts_beyond_the_packet_is_dropped() {
    init_log();
    let mut net = call();
    let mut datagrams = Vec::new();
    // Version 2, the count field at its maximum (31), for each RTCP packet
    // type, with a header length promising more words than follow.
    for pt in [200u8, 201, 202, 203, 204, 205, 206, 207] {
        for words in [0u16, 1, 6, 0xffff] {
            let mut p = vec![0x80 | 31, pt];
            p.extend_from_slice(&words.to_be_bytes());
            p.extend_from_slice(&[0x11, 0x22, 0x33, 0x44]);
            datagrams.push(p);
        }
    }
    // A compound packet whose second header's length overruns.
    let mut compound = vec![0x80, 201, 0x00, 0x01, 1, 2, 3, 4];
    compound.extend_from_slice(&[0x81, 202, 0x00, 0x40, 5, 6, 7, 8]);
    datagrams.push(compound);
    replay(&mut net, &datagrams);
}

#[test]
fn srtp_shorter_than_its_tag_and_every_truncation_of_a_real_packet_is_dropped() {
    init_log();
    let mut net = call();
    let talker = net.clients[0].addr;
    let genuine = net.sent_rtp.get(&talker).cloned().expect("the talker sent SRTP");
    assert!(genuine.len() > 22, "an SRTP packet: header, payload, tag");
    // Every truncation: the real header (its SSRC, the next sequence numbers
    // the receiver expects) with less than the payload and tag.
    let mut datagrams: Vec<Vec<u8>> = (0..genuine.len()).map(|n| genuine[..n].to_vec()).collect();
    // The whole packet with its tag flipped, and with the CSRC count and the
    // extension bit claiming more header than there is.
    let mut bad_tag = genuine.clone();
    *bad_tag.last_mut().unwrap() ^= 0xff;
    datagrams.push(bad_tag);
    let mut csrc = genuine.clone();
    csrc[0] |= 0x0f;
    datagrams.push(csrc);
    let mut extension = genuine[..16].to_vec();
    extension[0] |= 0x10;
    datagrams.push(extension);
    replay(&mut net, &datagrams);
}

#[test]
fn a_zero_length_dtls_fragment_is_dropped() {
    init_log();
    let mut net = call();
    // A DTLS 1.2 handshake record holding a ClientHello header whose
    // fragment is empty (fragment_length 0, claimed length 100).
    let handshake = [1u8, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut record = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 9];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    // The same record with a length of zero, an alert with none, and
    // application data of zero length in the current epoch.
    let empty_record = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 10, 0, 0];
    let empty_alert = vec![21, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 11, 0, 0];
    let empty_data = vec![23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 12, 0, 0];
    replay(&mut net, &[record, empty_record, empty_alert, empty_data]);
}

#[test]
fn oversize_datagrams_are_dropped() {
    init_log();
    let mut net = call();
    let talker = net.clients[0].addr;
    let genuine = net.sent_rtp.get(&talker).cloned().expect("the talker sent SRTP");
    // The largest UDP payload, as RTP with the talker's header, and as
    // STUN, DTLS and garbage.
    let max = 65_507;
    let mut rtp = genuine[..12].to_vec();
    rtp.resize(max, 0xab);
    let mut stun = stun_header(0x0001, (max - 20) as u16);
    stun.resize(max, 0);
    let mut dtls = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 13, 0xff, 0xff];
    dtls.resize(max, 0);
    replay(&mut net, &[rtp, stun, dtls, vec![0xff; max]]);
}

#[test]
fn offers_with_empty_or_malformed_fingerprints_are_refused_with_a_clear_error() {
    init_log();
    let mut net = call();
    let now = net.now;
    let before = net.stats();
    let good = common_offer(now).to_sdp_string();
    let fingerprint = good.lines().find(|l| l.starts_with("a=fingerprint:")).expect("offers carry a fingerprint").to_owned();
    let variants = [
        String::new(),
        "a=fingerprint:".to_owned(),
        "a=fingerprint:sha-256".to_owned(),
        "a=fingerprint:sha-256 ".to_owned(),
        "a=fingerprint:sha-256 zz:zz".to_owned(),
        "a=fingerprint:sha-256 AB:C".to_owned(),
        "a=fingerprint:md5 00:11:22:33".to_owned(),
    ];
    let mut refused_by_core = Vec::new();
    for (i, replacement) in variants.iter().enumerate() {
        let text = good.replace(&fingerprint, replacement);
        // Refused either when parsed (the bridge answers JoinFailed with the
        // parse error) or by the core, never accepted.
        let Ok(offer) = SdpOffer::from_sdp_string(&text) else { continue };
        refused_by_core.push(replacement.as_str());
        let request = JoinRequest { room: RoomId::from("ward"), participant: ParticipantId(900 + i as u64), name: format!("bad-{i}"), offer, rights: Rights::ALL };
        match net.sfu.join(now, request) {
            Err(SfuError::InvalidSdp(reason)) => assert!(!reason.is_empty()),
            other => panic!("fingerprint {replacement:?}: expected InvalidSdp, got {other:?}"),
        }
    }
    // str0m parses a fingerprint of an unknown hash: the core must refuse it.
    assert!(refused_by_core.contains(&"a=fingerprint:md5 00:11:22:33"), "{refused_by_core:?}");
    eprintln!("refused by the core (the rest at parsing): {refused_by_core:?}");
    let after = net.stats();
    assert_eq!((after.rooms, after.participants, after.tracks, after.forwarding_entries), (before.rooms, before.participants, before.tracks, before.forwarding_entries));
    replay(&mut net, &[]);
}

/// A well-formed audio offer from a str0m client.
fn common_offer(now: Instant) -> SdpOffer {
    let mut rtc = str0m::Rtc::new(now);
    let mut api = rtc.sdp_api();
    api.add_media(str0m::media::MediaKind::Audio, str0m::media::Direction::SendOnly, None, None, None);
    api.apply().unwrap().0
}
