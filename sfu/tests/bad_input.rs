//! Bad commands get clear errors and garbage datagrams are dropped and
//! counted; neither disturbs the participants already forwarding.

mod common;

use std::time::Duration;

use common::{init_log, Net, SFU_ADDR};
use fleetcall_sfu::{JoinRequest, LeaveReason, ParticipantId, Rights, RoomId, SdpOffer, SfuError};
use str0m::media::{Direction, MediaKind};
use str0m::Rtc;

fn two_talking() -> Net {
    let mut net = Net::new(Duration::from_secs(5));
    net.join("icu");
    net.join("icu");
    assert!(net.run_until(Duration::from_secs(5), |n| n.clients.iter().all(|c| c.heard.values().sum::<u64>() >= 10)));
    net
}

fn heard_total(net: &Net) -> u64 {
    net.clients.iter().map(|c| c.heard.values().sum::<u64>()).sum()
}

fn offer(now: std::time::Instant) -> SdpOffer {
    let mut rtc = Rtc::new(now);
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    api.apply().unwrap().0
}

#[test]
fn garbage_datagrams_are_dropped_and_counted() {
    init_log();
    let mut net = two_talking();
    let sfu: std::net::SocketAddr = SFU_ADDR.parse().unwrap();
    let stranger: std::net::SocketAddr = "10.9.9.9:9999".parse().unwrap();
    let known = net.clients[0].addr;
    let before = net.stats();
    let heard = heard_total(&net);

    let mut garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 3],
        vec![0x00, 0x01, 0x00],               // truncated STUN
        vec![0x80, 0x6f, 0, 1, 0, 0, 0, 1],   // truncated RTP
        vec![22, 254, 253, 0, 0],             // truncated DTLS
        vec![0x80; 1500],
    ];
    // A STUN binding request header with an absurd attribute length.
    garbage.push([&[0x00, 0x01, 0xff, 0xff, 0x21, 0x12, 0xa4, 0x42][..], &[7u8; 12]].concat());
    for bytes in &garbage {
        for from in [stranger, known] {
            net.sfu.handle_datagram(net.now, from, sfu, bytes);
        }
    }
    let after = net.stats();
    let dropped = |s: &fleetcall_sfu::SfuStats| s.dropped.unknown_source + s.dropped.malformed + s.dropped.rejected + s.dropped.unroutable;
    assert!(dropped(&after) >= dropped(&before) + garbage.len() as u64, "{after:?}");
    assert_eq!(after.participants, 2);

    net.run(Duration::from_secs(1));
    assert!(heard_total(&net) >= heard + 80, "forwarding went on");
}

#[test]
fn bad_commands_get_clear_errors_and_leak_nothing() {
    init_log();
    let mut net = two_talking();
    let now = net.now;
    let first = net.clients[0].participant;

    let err = net.sfu.leave(now, ParticipantId(999), LeaveReason::Requested).unwrap_err();
    assert!(matches!(err, SfuError::UnknownParticipant(ParticipantId(999))), "{err}");

    let duplicate = JoinRequest { room: RoomId::from("icu"), participant: first, name: "again".into(), offer: offer(now), rights: Rights::ALL };
    assert!(matches!(net.sfu.join(now, duplicate).unwrap_err(), SfuError::DuplicateParticipant(_)));

    // Parses as SDP but cannot be negotiated: no fingerprint.
    let text = offer(now).to_sdp_string().lines().filter(|l| !l.starts_with("a=fingerprint")).collect::<Vec<_>>().join("\r\n") + "\r\n";
    let unusable = JoinRequest { room: RoomId::from("new-room"), participant: ParticipantId(500), name: "x".into(), offer: SdpOffer::from_sdp_string(&text).unwrap(), rights: Rights::ALL };
    assert!(matches!(net.sfu.join(now, unusable).unwrap_err(), SfuError::InvalidSdp(_)));

    assert!(matches!(net.sfu.accept_answer(now, first, answer_for_nothing(now)).unwrap_err(), SfuError::NoPendingOffer(_)));

    let stats = net.stats();
    assert_eq!((stats.rooms, stats.participants, stats.tracks, stats.forwarding_entries), (1, 2, 2, 2));
    let heard = heard_total(&net);
    net.run(Duration::from_secs(1));
    assert!(heard_total(&net) >= heard + 80, "forwarding went on");
}

#[test]
fn a_full_room_refuses_the_next_joiner() {
    init_log();
    let mut net = Net::new(Duration::from_secs(5));
    let config = fleetcall_sfu::SfuConfig { max_room_size: 2, candidates: vec![SFU_ADDR.parse().unwrap()], ..Default::default() };
    net.sfu = fleetcall_sfu::Sfu::new(config);
    net.join("small");
    net.join("small");
    let now = net.now;
    let third = JoinRequest { room: RoomId::from("small"), participant: ParticipantId(77), name: "third".into(), offer: offer(now), rights: Rights::ALL };
    assert!(matches!(net.sfu.join(now, third).unwrap_err(), SfuError::RoomFull(_)));
    assert_eq!(net.stats().participants, 2);
}

/// A syntactically valid answer, for a participant with no offer pending.
fn answer_for_nothing(now: std::time::Instant) -> fleetcall_sfu::SdpAnswer {
    let mut rtc = Rtc::builder().set_ice_lite(true).build(now);
    rtc.sdp_api().accept_offer(offer(now)).unwrap()
}
