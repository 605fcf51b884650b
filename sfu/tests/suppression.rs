//! Denoised tracks reach subscribers as continuous RTP: one packet per
//! sequence number (lost ones concealed), timestamps advancing by the packet
//! duration, the publisher's marker bits; and the policy can change mid-call.

mod common;

use std::time::Duration;

use common::{init_log, Net};
use fleetcall_sfu::audio::{PolicyChange, SuppressionPolicy};
use fleetcall_sfu::{RoomId, SfuConfig};

fn opus_encoder() -> audiopus::coder::Encoder {
    audiopus::coder::Encoder::new(audiopus::SampleRate::Hz48000, audiopus::Channels::Mono, audiopus::Application::Voip).unwrap()
}

/// (seq, rtp time) of the frames a client received from `publisher`.
fn received_from(net: &Net, client: usize, publisher: u64) -> Vec<(u64, u64)> {
    net.clients[client].frames.iter().filter(|f| f.0 == publisher.to_string()).map(|f| (f.1, f.2)).collect()
}

fn assert_continuous(frames: &[(u64, u64)]) {
    assert!(frames.len() >= 2, "frames: {}", frames.len());
    for pair in frames.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "sequence numbers step by one: {pair:?}");
        assert_eq!(pair[1].1 - pair[0].1, 960, "timestamps step by 20 ms: {pair:?}");
    }
}

#[test]
fn denoised_audio_is_continuous_through_publisher_loss() {
    init_log();
    let config = SfuConfig { suppression: SuppressionPolicy { default: true, ..Default::default() }, ..SfuConfig::default() };
    let mut net = Net::with_config(config);
    let talker = net.join("ward");
    let listener = net.join("ward");
    net.clients[talker].opus = Some(opus_encoder());
    net.clients[listener].opus = Some(opus_encoder());
    net.clients[listener].talking = false;
    // Lose every 17th RTP packet on the way to the SFU (none of the first 50).
    net.drop_rtp = Some(|i| i > 50 && i % 17 == 0);

    net.run(Duration::from_secs(3));
    let stats = net.stats();
    assert_eq!((stats.processed_tracks, stats.suppressed_tracks), (2, 2), "{stats:?}");
    let publisher = net.clients[talker].participant.0;
    let frames = received_from(&net, listener, publisher);
    assert!(frames.len() >= 100, "listener received {} frames", frames.len());
    assert_continuous(&frames);

    let meters = net.dsp.values().map(|p| *p.meters()).find(|m| m.packets.received > 0).unwrap();
    assert!(meters.packets.lost >= 5, "losses were concealed: {:?}", meters.packets);
    assert!(meters.suppression.enabled);
}

#[test]
fn policy_changes_mid_call_keep_the_stream_continuous() {
    init_log();
    let mut net = Net::new(Duration::from_secs(5));
    let talker = net.join("icu");
    let listener = net.join("icu");
    net.clients[talker].opus = Some(opus_encoder());
    net.clients[listener].opus = Some(opus_encoder());
    net.clients[listener].talking = false;
    net.run(Duration::from_secs(1));
    assert_eq!(net.stats().processed_tracks, 0, "policy off: pass-through");

    net.sfu.set_policy(PolicyChange::Room { room: RoomId::from("icu"), on: Some(true) });
    net.run(Duration::from_secs(1));
    assert_eq!(net.stats().suppressed_tracks, 2);
    net.sfu.set_policy(PolicyChange::Device { device: "client-0".into(), on: Some(false) });
    net.run(Duration::from_secs(1));
    let stats = net.stats();
    assert_eq!((stats.processed_tracks, stats.suppressed_tracks), (2, 1), "{stats:?}");

    let publisher = net.clients[talker].participant.0;
    assert_continuous(&received_from(&net, listener, publisher));
    assert_eq!(net.stats().participants, 2, "nobody was dropped by the switches");

    // Leaving closes the pipelines.
    for i in 0..2 {
        let id = net.clients[i].participant;
        net.sfu.leave(net.now, id, fleetcall_sfu::LeaveReason::Requested).unwrap();
        net.clients[i].silent = true;
        net.pump();
    }
    assert!(net.dsp.is_empty());
}

#[test]
fn a_dsp_that_cannot_keep_up_holds_a_bounded_queue_and_costs_only_its_track() {
    init_log();
    let bound = 10;
    let policy = SuppressionPolicy { rooms: [(RoomId::from("noisy"), true)].into(), ..Default::default() };
    let config = SfuConfig { suppression: policy, dsp_queue_per_track: bound, ..SfuConfig::default() };
    let mut net = Net::with_config(config);
    net.record_rtp = true;
    let talker = net.join("noisy");
    let listener = net.join("noisy");
    let (a, b) = (net.join("quiet"), net.join("quiet"));
    net.clients[talker].opus = Some(opus_encoder());
    net.clients[listener].opus = Some(opus_encoder());
    net.clients[listener].talking = false;
    net.run(Duration::from_secs(2));
    assert_eq!(net.stats().processed_tracks, 2, "only the noisy room is processed");
    let publisher = net.clients[talker].participant.0;
    assert!(received_from(&net, listener, publisher).len() >= 50, "denoised audio flows");

    // The DSP stops answering for 2 s: the talker goes on at 50 packets/s.
    net.hold_dsp = true;
    let stalled = net.now;
    let before = net.stats().dropped.dsp_overflow;
    net.run(Duration::from_secs(2));
    assert_eq!(net.held_dsp.len(), bound, "never more than the bound waits for the DSP");
    let overflow = net.stats().dropped.dsp_overflow - before;
    assert!(overflow >= 80, "the rest was dropped and counted: {overflow}");

    // The other call kept its media all along, without a gap over 200 ms.
    let arrivals: Vec<_> = net.clients[b].rtp.iter().filter(|r| r.first_byte == Some(a as u8) && r.at >= stalled).map(|r| r.at).collect();
    assert!(arrivals.len() >= 90, "the quiet room kept talking: {}", arrivals.len());
    let gap = arrivals.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(gap <= Duration::from_millis(200), "gap of {gap:?} in the other call");

    // Once the DSP answers again the track recovers: nothing is stuck.
    let heard = received_from(&net, listener, publisher).len();
    net.release_dsp();
    net.run(Duration::from_secs(2));
    assert!(received_from(&net, listener, publisher).len() >= heard + 50, "denoised audio flows again");
    let stats = net.stats();
    assert_eq!((stats.rooms, stats.participants), (2, 4), "{stats:?}");
}
