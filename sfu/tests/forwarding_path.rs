//! What a forwarded packet costs in protocol work: no congestion-control
//! feedback is negotiated, and a packet leaves in the call that received it.

mod common;

use std::time::{Duration, Instant};

use common::{init_log, Net, SFU_ADDR};
use fleetcall_sfu::{JoinRequest, ParticipantId, Rights, RoomId, Sfu, SfuConfig};
use str0m::media::{Direction, MediaKind};
use str0m::{Candidate, Rtc};

#[test]
fn the_answer_negotiates_audio_levels_but_no_congestion_control() {
    init_log();
    let now = Instant::now();
    let mut sfu = Sfu::new(SfuConfig { candidates: vec![SFU_ADDR.parse().unwrap()], ..SfuConfig::default() });
    // A client offering str0m's standard extensions, TWCC and abs-send-time included.
    let mut rtc = Rtc::builder().build(now);
    rtc.add_local_candidate(Candidate::host("10.0.0.1:4000".parse().unwrap(), "udp").unwrap());
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let (offer, _pending) = api.apply().unwrap();
    let offered = offer.to_sdp_string();
    assert!(offered.contains("transport-wide-cc") && offered.contains("abs-send-time"), "{offered}");

    let request = JoinRequest { room: RoomId::from("ward"), participant: ParticipantId(1), name: "bed-1".into(), offer, rights: Rights::ALL };
    let answer = sfu.join(now, request).unwrap().answer.to_sdp_string();
    assert!(answer.contains("ssrc-audio-level"), "speaker selection needs RFC 6464 levels: {answer}");
    assert!(!answer.contains("transport-wide-cc"), "{answer}");
    assert!(!answer.contains("abs-send-time"), "{answer}");
}

#[test]
fn a_forwarded_packet_leaves_without_waiting_for_a_timer() {
    init_log();
    let mut net = Net::new(Duration::from_secs(5));
    net.join("ward");
    net.join("ward");
    let heard = |n: &Net, min: u64| n.clients[1].heard.get(&0).copied().unwrap_or(0) >= min;
    assert!(net.run_until(Duration::from_secs(10), |n| heard(n, 10)), "media flows");

    // The SFU forwards each frame in the `handle_datagram` that brings it
    // and the `poll_output`s right after (which drain the listeners' `Rtc`s
    // once per batch); nothing written to a listener may wait for a timeout.
    let (forwarded, overdue) = (net.stats().rtp_forwarded, net.overdue_after_pump);
    net.run(Duration::from_secs(2));
    assert!(net.stats().rtp_forwarded >= forwarded + 150, "both talkers forwarded");
    assert_eq!(net.overdue_after_pump, overdue, "pumps left a timeout due");
}

#[test]
fn loss_and_rtt_come_from_receiver_reports_without_twcc() {
    init_log();
    let mut net = Net::new(Duration::from_secs(5));
    net.join("ward");
    net.join("ward");
    // Stats events come every 5 s per participant; loss needs two reports.
    net.run(Duration::from_secs(25));
    let stats = net.stats();
    assert!(stats.rtp_forwarded > 500, "media flowed");

    assert!(stats.reported_loss.count > 0, "no loss observation: {:?}", stats.reported_loss);
    assert!(stats.rtt.count > 0, "no RTT observation: {:?}", stats.rtt);
    // Virtual-time network: nothing lost.
    assert_eq!(stats.reported_loss.sum, 0.0);
}

#[test]
fn loss_before_the_sfu_shows_in_the_listeners_reports() {
    init_log();
    let mut net = Net::new(Duration::from_secs(5));
    net.join("ward");
    net.join("ward");
    net.drop_rtp = Some(|index| index % 10 == 5);
    net.run(Duration::from_secs(25));
    let loss = net.stats().reported_loss;
    assert!(loss.count > 0, "no loss observation");
    let mean = loss.sum / loss.count as f64;
    assert!((0.05..0.2).contains(&mean), "every 10th packet dropped, mean reported loss {mean}");
}
