//! Two peers against each other in virtual time, no SFU: one offers, the
//! other answers and offers a track back. RTP mode (the load tester's):
//! levels, timestamps, markers and sequence numbers as sent. Frame mode
//! with video and recording (the SFU tests'): VP8 frames, raw packets with
//! their headers, audio levels.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetcall_peer::{
    AudioFrame, AudioLevel, DtlsIdentity, MediaKind, Mode, Output, Peer, PeerConfig, PeerEvent,
    ReceivedFrame, ReceivedPacket, Sent,
};

const A: &str = "10.0.0.1:1000";
const B: &str = "10.0.0.2:2000";

fn pair(start: Instant, a: PeerConfig, b: PeerConfig) -> (Peer, Peer) {
    let identity = DtlsIdentity::generate().unwrap();
    let mut a = Peer::new(start, A.parse().unwrap(), &identity, a).unwrap();
    let mut b = Peer::new(start, B.parse().unwrap(), &identity, b).unwrap();
    let offer = a.create_offer(start).unwrap();
    // b answers a's offer (as the SFU would), then offers a track back.
    let answer = b.accept_offer(start, &offer).unwrap();
    a.accept_answer(start, &answer).unwrap();
    let offer_b = b.create_offer(start).unwrap();
    let answer_a = a.accept_offer(start, &offer_b).unwrap();
    b.accept_answer(start, &answer_a).unwrap();
    (a, b)
}

#[derive(Default)]
struct Heard {
    packets: Vec<ReceivedPacket>,
    frames: Vec<ReceivedFrame>,
    keyframe_requests: u64,
}

/// Moves every datagram between the two until none is left; `heard_a`
/// collects a's events, `heard_b` b's.
fn exchange(now: Instant, a: &mut Peer, b: &mut Peer, heard_a: &mut Heard, heard_b: &mut Heard) {
    let (a_addr, b_addr): (SocketAddr, SocketAddr) = (A.parse().unwrap(), B.parse().unwrap());
    if a.poll_timeout().is_some_and(|t| t <= now) {
        a.handle_timeout(now);
    }
    if b.poll_timeout().is_some_and(|t| t <= now) {
        b.handle_timeout(now);
    }
    for _ in 0..20 {
        let moved = pump(now, a, a_addr, b, heard_a) | pump(now, b, b_addr, a, heard_b);
        if !moved {
            break;
        }
    }
}

/// Delivers what `from` sends to `to`; records `from`'s events in `heard`.
fn pump(now: Instant, from: &mut Peer, from_addr: SocketAddr, to: &mut Peer, heard: &mut Heard) -> bool {
    let mut moved = false;
    loop {
        match from.poll_output() {
            Output::Transmit(d) => {
                moved = true;
                to.handle_datagram(now, from_addr, &d.contents);
            }
            Output::Event(PeerEvent::Packet(p)) => heard.packets.push(p),
            Output::Event(PeerEvent::Frame(f)) => heard.frames.push(f),
            Output::Event(PeerEvent::KeyframeRequest) => heard.keyframe_requests += 1,
            Output::Event(_) => {}
            Output::Timeout(_) => return moved,
        }
    }
}

#[test]
fn rtp_mode_sends_levels_and_timestamps_and_receives_with_header() {
    let start = Instant::now();
    let rtp = |first_timestamp, first_seq| PeerConfig { mode: Mode::Rtp, first_timestamp, first_seq, ..PeerConfig::default() };
    let (mut a, mut b) = pair(start, rtp(960 * 1000 + 3, 100), rtp(7, 200));
    let mut now = start;
    let (mut got_a, mut got_b) = (Heard::default(), Heard::default());
    let frame = AudioFrame { payload: Some(Arc::from(&[0xf8u8, 1, 2, 3, 4][..])), level: Some(AudioLevel { dbov: -20, voice: true }) };
    let dtx = AudioFrame { payload: None, level: Some(AudioLevel { dbov: -127, voice: false }) };
    let mut sent = Vec::new();
    for step in 0..400 {
        now += Duration::from_millis(5);
        if step % 4 == 0 && a.is_connected() && b.is_connected() && sent.len() < 10 {
            let f = if sent.len() == 3 { &dtx } else { &frame };
            sent.push(a.send_audio(now, f));
            b.send_audio(now, &frame);
        }
        exchange(now, &mut a, &mut b, &mut got_a, &mut got_b);
    }
    let (got_a, got_b) = (got_a.packets, got_b.packets);
    assert_eq!(sent.len(), 10, "both connected");
    assert_eq!(sent[3], Sent::Dtx);
    let Sent::Written { timestamp } = sent[0] else { panic!("{sent:?}") };
    assert_eq!(timestamp, 960 * 1000 + 3);
    assert_eq!(got_b.len(), 9, "every non-DTX frame arrives");
    assert_eq!(got_b[0].timestamp, 960 * 1000 + 3);
    assert_eq!(got_b[3].timestamp, 960 * 1000 + 3 + 4 * 960, "the DTX frame's time is skipped");
    assert!(got_b[0].marker && !got_b[1].marker && got_b[3].marker, "marker at each talk spurt");
    assert_eq!(got_b[3].seq, got_b[2].seq + 1, "DTX leaves no sequence gap");
    assert_eq!(got_b[0].seq, 100, "the first sequence number as configured");
    assert_eq!(got_b[0].level, Some(-20));
    assert_eq!(&got_b[0].payload[..], &[0xf8, 1, 2, 3, 4]);
    assert!(!got_a.is_empty(), "the renegotiated track flows back");
    assert_eq!(a.stats().frames_sent, 9);
    assert_eq!(b.stats().frames_received, 9);
}

#[test]
fn frame_mode_carries_video_and_records_rtp_with_levels() {
    let start = Instant::now();
    let a = PeerConfig { send_video: true, ..PeerConfig::default() };
    let b = PeerConfig { receive_video: true, record_rtp: true, ..PeerConfig::default() };
    let (mut a, mut b) = pair(start, a, b);
    let mut now = start;
    let (mut got_a, mut got_b) = (Heard::default(), Heard::default());
    let frame = AudioFrame { payload: Some(Arc::from(&[0xf8u8, 9, 9][..])), level: Some(AudioLevel { dbov: -30, voice: true }) };
    let mut video_sent = 0;
    for step in 0..400 {
        now += Duration::from_millis(5);
        if step % 4 == 0 && a.is_connected() && b.is_connected() && video_sent < 10 {
            assert!(matches!(a.send_audio(now, &frame), Sent::Written { .. }));
            assert!(a.send_video(now, &[0x10; 1200]), "a VP8 payload header byte, then an opaque frame");
            video_sent += 1;
        }
        exchange(now, &mut a, &mut b, &mut got_a, &mut got_b);
    }
    assert_eq!(video_sent, 10, "both connected");
    let audio: Vec<_> = got_b.frames.iter().filter(|f| f.kind == MediaKind::Audio).collect();
    let video: Vec<_> = got_b.frames.iter().filter(|f| f.kind == MediaKind::Video).collect();
    assert_eq!(audio.len(), 10, "{:?}", got_b.frames.len());
    assert!(video.len() >= 9, "video frames: {}", video.len());
    assert!(video.windows(2).all(|w| w[1].rtp_time - w[0].rtp_time == 1800), "20 ms at 90 kHz");
    assert!(audio.windows(2).all(|w| w[1].rtp_time - w[0].rtp_time == 960));
    assert!(audio.iter().all(|f| f.payload[..] == [0xf8, 9, 9]));
    // Recorded: every packet with its header, the level as sent.
    let audio_ssrc = got_b.packets.iter().find(|p| p.level.is_some()).map(|p| p.ssrc).expect("a recorded packet with a level");
    let recorded: Vec<_> = got_b.packets.iter().filter(|p| p.ssrc == audio_ssrc).collect();
    assert_eq!(recorded.len(), 10);
    assert!(recorded.iter().all(|p| p.level == Some(-30)));
    assert!(recorded.windows(2).all(|w| w[1].seq == w[0].seq.wrapping_add(1)));
    assert!(got_a.packets.is_empty(), "a records nothing");
    assert!(!b.send_video(now, &[1]), "b has no video track");
}
