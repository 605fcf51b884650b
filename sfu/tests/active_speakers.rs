//! Audio slots in virtual time: listeners' slots carry exactly the selected
//! talkers, each slot is one continuous RTP stream across speaker switches,
//! a talker who stops is replaced after the hold time, nobody hears
//! themselves, and with suppression on a loud noise never wins a slot from a
//! quiet talker.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::{init_log, Net, RtpRecord, Signal};
use fleetcall_sfu::audio::SuppressionPolicy;
use fleetcall_sfu::{ParticipantId, SfuConfig};

const SILENT: i8 = -127;
const LOUD: i8 = -20;
const HOLD: Duration = Duration::from_millis(500);

fn opus_encoder() -> audiopus::coder::Encoder {
    audiopus::coder::Encoder::new(audiopus::SampleRate::Hz48000, audiopus::Channels::Mono, audiopus::Application::Voip).unwrap()
}

/// Slot packets (those with a CSRC) a client received, per SSRC.
fn slot_streams(net: &Net, client: usize) -> HashMap<u32, Vec<RtpRecord>> {
    let mut streams: HashMap<u32, Vec<RtpRecord>> = HashMap::new();
    for r in net.clients[client].rtp.iter().filter(|r| r.csrc.is_some()) {
        streams.entry(r.ssrc).or_default().push(*r);
    }
    streams
}

/// Participants a client heard through its slots between `from` and `to`.
fn heard(net: &Net, client: usize, from: Instant, to: Instant) -> BTreeSet<u64> {
    net.clients[client].rtp.iter().filter(|r| r.at >= from && r.at < to).filter_map(|r| r.csrc).map(u64::from).collect()
}

/// When a client first heard `speaker` through a slot at or after `from`.
fn first_heard(net: &Net, client: usize, speaker: ParticipantId, from: Instant) -> Option<Instant> {
    net.clients[client].rtp.iter().find(|r| r.at >= from && r.csrc == Some(speaker.0 as u32)).map(|r| r.at)
}

fn id(net: &Net, client: usize) -> u64 {
    net.clients[client].participant.0
}

fn ids(net: &Net, clients: &[usize]) -> BTreeSet<u64> {
    clients.iter().map(|c| id(net, *c)).collect()
}

/// Every slot stream of every client: sequence numbers step by one,
/// timestamps move with elapsed time (within a frame), the marker bit is set
/// where the speaker changes, and nobody hears themselves.
fn assert_slots_continuous(net: &Net) {
    for (c, client) in net.clients.iter().enumerate() {
        let streams = slot_streams(net, c);
        assert!(!streams.is_empty(), "client {c} received slot audio");
        assert!(streams.len() <= 3, "client {c}: at most 3 slot streams, got {}", streams.len());
        for (ssrc, packets) in streams {
            for pair in packets.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                assert_eq!(b.seq, a.seq.wrapping_add(1), "client {c} slot {ssrc}: seq +1 {a:?} -> {b:?}");
                let dts = i64::from(b.timestamp.wrapping_sub(a.timestamp) as i32);
                let elapsed = (b.at - a.at).as_micros() as i64 * 48 / 1000;
                assert!(dts >= 960, "client {c} slot {ssrc}: timestamps advance {a:?} -> {b:?}");
                assert!((dts - elapsed.max(960)).abs() <= 960, "client {c} slot {ssrc}: timestamp step {dts} for {elapsed} samples elapsed");
                if a.csrc != b.csrc {
                    assert!(b.marker, "client {c} slot {ssrc}: marker on a speaker switch {a:?} -> {b:?}");
                }
            }
        }
        let own = client.participant.0 as u32;
        assert!(client.rtp.iter().all(|r| r.csrc != Some(own) && r.first_byte != Some(client.index)), "client {c} heard itself");
    }
}

#[test]
fn eight_participants_slots_follow_the_talkers() {
    init_log();
    let mut net = Net::new(Duration::from_secs(5));
    net.record_rtp = true;
    for _ in 0..8 {
        let i = net.join("ward-8");
        net.clients[i].level = Some(SILENT);
    }
    assert!(net.run_until(Duration::from_secs(5), |n| n.clients.iter().all(|c| c.connected) && n.stats().audio_slots == 24));
    net.run(Duration::from_secs(1));
    let stats = net.stats();
    assert_eq!((stats.slot_rooms, stats.forwarding_entries), (1, 0), "audio through slots only: {stats:?}");

    // 5, 6 and 7 start talking.
    let t1 = net.now;
    for c in [5, 6, 7] {
        net.clients[c].level = Some(LOUD);
    }
    net.run(Duration::from_millis(1500));
    for listener in 0..5 {
        let latency = first_heard(&net, listener, net.clients[5].participant, t1).expect("talker heard") - t1;
        assert!(latency <= Duration::from_millis(200), "listener {listener} heard talker 5 after {latency:?}");
        assert_eq!(heard(&net, listener, t1 + Duration::from_millis(300), net.now), ids(&net, &[5, 6, 7]), "listener {listener}");
    }
    for talker in [5, 6, 7] {
        let others: Vec<usize> = [5, 6, 7].into_iter().filter(|t| *t != talker).collect();
        let got = heard(&net, talker, t1 + Duration::from_millis(300), net.now);
        assert!(got.is_superset(&ids(&net, &others)) && got.len() <= 3, "talker {talker} hears the others: {got:?}");
    }

    // 5 stops and 0 starts: 0 replaces 5 for everyone after the hold.
    let t2 = net.now;
    net.clients[5].level = Some(SILENT);
    net.clients[0].level = Some(LOUD);
    net.run(Duration::from_secs(2));
    for listener in 1..5 {
        let replaced = first_heard(&net, listener, net.clients[0].participant, t2).expect("new talker heard") - t2;
        assert!(replaced >= HOLD && replaced <= HOLD + Duration::from_millis(600), "listener {listener}: 0 replaced 5 after {replaced:?}");
        assert_eq!(heard(&net, listener, t2 + Duration::from_millis(1300), net.now), ids(&net, &[0, 6, 7]), "listener {listener}");
    }
    // 6 and 7 have a spare place: they hear 0 at once.
    let early = first_heard(&net, 6, net.clients[0].participant, t2).expect("heard") - t2;
    assert!(early <= Duration::from_millis(200), "a talker hears a new talker in its spare slot: {early:?}");

    // 7 was talking all along, so it stays the dominant speaker until it
    // stops; then 0, still talking, is.
    assert!(net.clients[1].speakers.contains(&net.clients[0].participant), "{:?}", net.clients[1].speakers);
    for c in [6, 7] {
        net.clients[c].level = Some(SILENT);
    }
    net.run(Duration::from_millis(600));
    assert_eq!(net.clients[1].speakers.first(), Some(&net.clients[0].participant), "the web shows 0 talking");

    assert_slots_continuous(&net);
    let stats = net.stats();
    assert!(stats.slot_switches >= 8 && stats.selection_suppressed > 0 && stats.selection_forwarded > 0, "{stats:?}");
    assert!(stats.speaker_changes >= 4, "{stats:?}");

    // A leaving talker's places go to the others; nothing is left behind.
    for c in 0..8 {
        let p = net.clients[c].participant;
        net.sfu.leave(net.now, p, fleetcall_sfu::LeaveReason::Requested).unwrap();
        net.clients[c].silent = true;
        net.pump();
        if c == 0 {
            net.run(Duration::from_millis(200));
        }
    }
    let stats = net.stats();
    assert_eq!((stats.rooms, stats.participants, stats.audio_slots, stats.forwarding_entries), (0, 0, 0, 0));
}

#[test]
fn a_room_at_the_boundary_renegotiates_once() {
    init_log();
    let mut net = Net::new(Duration::from_secs(5));
    for _ in 0..4 {
        let i = net.join("lobby");
        net.clients[i].level = Some(LOUD);
    }
    assert!(net.run_until(Duration::from_secs(5), |n| n.stats().forwarding_entries == 12 && n.clients.iter().all(|c| c.heard.len() == 3)));
    assert_eq!(net.stats().slot_rooms, 0, "4 = slots + 1: everyone to everyone");
    let offers = |n: &Net| n.clients.iter().map(|c| c.events.iter().filter(|e| *e == "offer").count()).sum::<usize>();

    // A fifth joins and leaves, three times: one switch to slots, no more.
    for round in 0..3 {
        let i = net.join("lobby");
        net.clients[i].level = Some(LOUD);
        net.run(Duration::from_secs(1));
        let before = offers(&net);
        let p = net.clients[i].participant;
        net.sfu.leave(net.now, p, fleetcall_sfu::LeaveReason::Requested).unwrap();
        net.clients[i].silent = true;
        net.run(Duration::from_secs(1));
        assert_eq!(offers(&net), before, "round {round}: a leave in slot mode renegotiates nothing");
    }
    assert_eq!(net.stats().slot_rooms, 1);
    // Back at 4, all pinned: everyone hears everyone through the slots.
    let before: Vec<Vec<u64>> = (0..4).map(|c| (0..4).map(|f| net.clients[c].heard.get(&(f as u8)).copied().unwrap_or(0)).collect()).collect();
    net.run(Duration::from_secs(1));
    for (c, before) in before.iter().enumerate() {
        for f in (0..4).filter(|f| *f != c) {
            let now = net.clients[c].heard.get(&(f as u8)).copied().unwrap_or(0);
            assert!(now >= before[f] + 40, "client {c} hears {f}");
        }
    }
}

#[test]
fn noise_never_takes_a_slot_from_a_quiet_talker_when_suppression_is_on() {
    init_log();
    let run = |suppression: bool| {
        let config = SfuConfig {
            suppression: SuppressionPolicy { default: suppression, ..Default::default() },
            audio_slots: 1,
            ..SfuConfig::default()
        };
        let mut net = Net::with_config(config);
        net.record_rtp = true;
        // Two silent devices first (pinned while the room is small), then a
        // fan next to a loud microphone, then a distant, quiet talker.
        let setups = [(Signal::Silence, SILENT), (Signal::Silence, SILENT), (Signal::Rumble { dbfs: -10.0 }, -12), (Signal::Talker { dbfs: -40.0 }, -45)];
        for (signal, level) in setups {
            let i = net.join("ward-noisy");
            net.clients[i].opus = Some(opus_encoder());
            net.clients[i].signal = signal;
            net.clients[i].level = Some(level);
        }
        net.run(Duration::from_secs(6));
        net
    };

    let net = run(true);
    let (fan, talker) = (net.clients[2].participant, net.clients[3].participant);
    for c in &net.clients {
        assert!(c.speaker_log.iter().all(|(_, s)| !s.contains(&fan)), "client {}: the fan was never a speaker: {:?}", c.index, c.speaker_log);
        assert!(c.rtp.iter().all(|r| r.csrc != Some(fan.0 as u32)), "client {} never hears the fan", c.index);
    }
    for listener in [0, 1] {
        assert_eq!(net.clients[listener].speakers.first(), Some(&talker), "listener {listener} sees the talker");
        let from_talker = net.clients[listener].rtp.iter().filter(|r| r.csrc == Some(talker.0 as u32)).count();
        assert!(from_talker >= 200, "listener {listener} hears the quiet talker: {from_talker} packets");
    }
    assert_eq!(net.stats().suppressed_tracks, 4);

    // The control: by level alone, the fan wins.
    let net = run(false);
    let fan = net.clients[2].participant;
    assert!(net.clients[0].rtp.iter().any(|r| r.csrc == Some(fan.0 as u32)), "without suppression the loud fan is selected");
}
