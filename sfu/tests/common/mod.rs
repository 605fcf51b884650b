//! A virtual-time network of media peers ([`fleetcall_peer::Peer`], the
//! one the device agent and the load tester run) around one SFU core.
//!
//! Every datagram is delivered at once; time advances to the earliest deadline
//! of the SFU, any client, or the next 20 ms audio frame. Clients publish fake
//! Opus frames whose first byte is their client index, so a receiver can tell
//! who it heard without decoding.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fleetcall_peer::{AudioFrame, AudioLevel, DtlsIdentity, MediaKind, Output, Peer, PeerConfig, PeerEvent};
use fleetcall_sfu::{
    JoinRequest, LeaveReason, Output as SfuOutput, ParticipantId, Rights, RoomId, SdpAnswer, SdpOffer, Sfu, SfuConfig,
    SfuEvent, SfuStats,
};

pub const SFU_ADDR: &str = "10.0.0.100:5000";
pub const FRAME: Duration = Duration::from_millis(20);

/// What a client with a real Opus encoder says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Signal {
    /// A 440 Hz tone in white-ish noise.
    ToneInNoise,
    /// A talker: voiced harmonics with syllables, peak about `dbfs`.
    Talker { dbfs: f32 },
    /// White noise at `dbfs` RMS, no speech at all.
    Noise { dbfs: f32 },
    /// Low-passed (fan- or traffic-like) noise at about `dbfs` RMS.
    Rumble { dbfs: f32 },
    /// Digital silence.
    Silence,
}

/// One RTP packet a client received (with `Net::record_rtp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpRecord {
    pub ssrc: u32,
    pub seq: u16,
    pub timestamp: u32,
    pub marker: bool,
    /// First CSRC, if any (audio slots carry the speaker's participant id).
    pub csrc: Option<u32>,
    /// First payload byte (the sender's client index for fake payloads).
    pub first_byte: Option<u8>,
    pub at: Instant,
}

pub struct Client {
    pub index: u8,
    pub addr: SocketAddr,
    pub peer: Peer,
    pub participant: ParticipantId,
    /// Publishing a VP8 track beside the audio.
    pub video: bool,
    /// Keyframe requests the SFU sent this client.
    pub keyframe_requests: u64,
    /// Video frames received.
    pub video_frames: u64,
    /// Publishing fake audio every 20 ms.
    pub talking: bool,
    /// Stopped: sends and receives nothing (an abrupt network loss).
    pub silent: bool,
    /// Real Opus frames instead of tagged fake payloads.
    pub opus: Option<audiopus::coder::Encoder>,
    /// Every media frame received: (publisher stream id, first seq, RTP time, payload).
    pub frames: Vec<(String, u64, u64, Vec<u8>)>,
    pub connected: bool,
    /// Answer SFU offers at once; when false they wait in `held_offers`.
    pub auto_answer: bool,
    pub held_offers: Vec<SdpOffer>,
    /// The peer's deadline; `None` once it failed.
    pub deadline: Option<Instant>,
    pub frames_sent: u64,
    /// Packets received per sending client index.
    pub heard: HashMap<u8, u64>,
    /// Events the SFU addressed to this client's participant.
    pub events: Vec<String>,
    /// RFC 6464 level (-127..=0 dBov) sent with every audio frame, if any.
    pub level: Option<i8>,
    /// What a real Opus encoder encodes.
    pub signal: Signal,
    /// Every RTP packet received, with `Net::record_rtp`.
    pub rtp: Vec<RtpRecord>,
    /// The latest active speakers the SFU announced, dominant first.
    pub speakers: Vec<ParticipantId>,
    /// Every announcement, with its time.
    pub speaker_log: Vec<(Instant, Vec<ParticipantId>)>,
}

pub struct Net {
    pub sfu: Sfu,
    /// The DTLS certificate of every client (generating one each is slow).
    identity: DtlsIdentity,
    /// The SFU's deadline as its last drain said.
    sfu_deadline: Option<Instant>,
    pub now: Instant,
    pub start: Instant,
    pub clients: Vec<Client>,
    next_frame: Instant,
    next_participant: u64,
    /// Datagrams in flight: (from, to, bytes).
    wire: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
    pub removed: Vec<(ParticipantId, LeaveReason)>,
    /// Number of clients' RTP datagrams fed to the SFU.
    pub rtp_in: u64,
    /// Pumps that left the SFU with a timeout already due: work it could
    /// have done in the calls that caused it.
    pub overdue_after_pump: u64,
    /// Time spent in every call into the SFU (timeouts, RTP, RTCP, STUN, and
    /// polling its output), for benches.
    pub sfu_time: Duration,
    /// DSP pipelines run inline for processed tracks (the driver uses threads).
    pub dsp: HashMap<fleetcall_sfu::TrackKey, fleetcall_sfu::audio::TrackProcessor>,
    /// What the inline pipelines did.
    pub audio_totals: fleetcall_sfu::audio::AudioTotals,
    /// Drop every client->SFU RTP datagram whose index matches (loss injection).
    pub drop_rtp: Option<fn(u64) -> bool>,
    /// Clients joining from now on record every RTP packet they receive.
    pub record_rtp: bool,
    /// The last SRTP datagram each client sent to the SFU (by client
    /// address), kept while `keep_sent_rtp` is set: genuine packets to
    /// mangle in bad-input tests.
    pub sent_rtp: HashMap<SocketAddr, Vec<u8>>,
    pub keep_sent_rtp: bool,
    /// The last STUN binding request each client sent (with `keep_sent_rtp`).
    pub sent_stun: HashMap<SocketAddr, Vec<u8>>,
    /// A DSP that cannot keep up: packets for the pipelines wait in
    /// `held_dsp` until [`Net::release_dsp`].
    pub hold_dsp: bool,
    pub held_dsp: Vec<fleetcall_sfu::audio::AudioCommand>,
}

impl Net {
    pub fn new(grace: Duration) -> Self {
        Self::with_config(SfuConfig { disconnect_grace: grace, ..SfuConfig::default() })
    }

    /// A network around a core with this configuration (candidates are set here).
    pub fn with_config(config: SfuConfig) -> Self {
        let now = Instant::now();
        let config = SfuConfig { candidates: vec![SFU_ADDR.parse().unwrap()], ..config };
        Net {
            sfu: Sfu::new(config),
            identity: DtlsIdentity::generate().unwrap(),
            sfu_deadline: None,
            now,
            start: now,
            clients: Vec::new(),
            next_frame: now,
            next_participant: 1,
            wire: VecDeque::new(),
            removed: Vec::new(),
            rtp_in: 0,
            sfu_time: Duration::ZERO,
            overdue_after_pump: 0,
            dsp: HashMap::new(),
            audio_totals: Default::default(),
            drop_rtp: None,
            record_rtp: false,
            sent_rtp: HashMap::new(),
            sent_stun: HashMap::new(),
            keep_sent_rtp: false,
            hold_dsp: false,
            held_dsp: Vec::new(),
        }
    }

    /// A new client joins `room` publishing one audio track; returns its index.
    pub fn join(&mut self, room: &str) -> usize {
        self.join_with(room, false)
    }

    /// Like [`Net::join`], optionally also publishing a VP8 video track.
    pub fn join_with(&mut self, room: &str, video: bool) -> usize {
        self.join_as(room, video, Rights::ALL)
    }

    /// Like [`Net::join_with`], with the grant's `rights` (the client offers
    /// and sends its audio whatever they are).
    pub fn join_as(&mut self, room: &str, video: bool, rights: Rights) -> usize {
        let index = self.clients.len() as u8;
        let addr: SocketAddr = format!("10.0.0.{}:{}", index + 1, 4000 + index as u16).parse().unwrap();
        let config = PeerConfig { send_video: video, receive_video: true, record_rtp: self.record_rtp, ..PeerConfig::default() };
        let mut peer = Peer::new(self.now, addr, &self.identity, config).unwrap();
        let offer = SdpOffer::from_sdp_string(&peer.create_offer(self.now).unwrap()).unwrap();
        let participant = ParticipantId(self.next_participant);
        self.next_participant += 1;
        let joined = self
            .sfu
            .join(self.now, JoinRequest { room: RoomId::from(room), participant, name: format!("client-{index}"), offer, rights })
            .expect("join accepted");
        peer.accept_answer(self.now, &joined.answer.to_sdp_string()).unwrap();
        self.clients.push(Client {
            index,
            addr,
            peer,
            participant,
            video,
            keyframe_requests: 0,
            video_frames: 0,
            talking: true,
            silent: false,
            opus: None,
            frames: Vec::new(),
            connected: false,
            auto_answer: true,
            held_offers: Vec::new(),
            deadline: Some(self.now),
            frames_sent: 0,
            heard: HashMap::new(),
            events: Vec::new(),
            level: None,
            signal: Signal::ToneInNoise,
            rtp: Vec::new(),
            speakers: Vec::new(),
            speaker_log: Vec::new(),
        });
        let i = self.clients.len() - 1;
        self.drain_client(i);
        self.pump();
        i
    }

    pub fn client_by_participant(&mut self, id: ParticipantId) -> Option<&mut Client> {
        self.clients.iter_mut().find(|c| c.participant == id)
    }

    /// Runs the network for `duration` of virtual time.
    pub fn run(&mut self, duration: Duration) {
        let end = self.now + duration;
        while self.now < end {
            let mut next = end.min(self.next_frame);
            if let Some(t) = self.sfu_deadline {
                next = next.min(t);
            }
            for c in &self.clients {
                if let Some(deadline) = c.deadline.filter(|_| !c.silent) {
                    next = next.min(deadline);
                }
            }
            // Never stand still: str0m may ask for "now" again.
            self.now = next.max(self.now + Duration::from_micros(100));
            let started = Instant::now();
            self.sfu.handle_timeout(self.now);
            self.sfu_time += started.elapsed();
            for i in 0..self.clients.len() {
                let c = &mut self.clients[i];
                if !c.silent && c.deadline.is_some_and(|at| at <= self.now) {
                    c.peer.handle_timeout(self.now);
                    self.drain_client(i);
                }
            }
            if self.now >= self.next_frame {
                self.send_frames();
                self.next_frame += FRAME;
            }
            self.pump();
        }
    }

    /// Runs until `done` holds or `limit` passes; returns whether it held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Net) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            if done(self) {
                return true;
            }
            self.run(Duration::from_millis(10));
        }
        done(self)
    }

    pub fn stats(&self) -> SfuStats {
        self.sfu.stats()
    }

    fn send_frames(&mut self) {
        let now = self.now;
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
            if c.silent || !c.talking || !c.connected {
                continue;
            }
            let payload = match &c.opus {
                Some(encoder) => {
                    let pcm = pcm_frame(c.signal, c.frames_sent, c.index);
                    let mut out = vec![0u8; 1500];
                    let len = encoder.encode(&pcm, &mut out).unwrap();
                    out.truncate(len);
                    out
                }
                None => vec![c.index, 0xde, 0xad, 0xbe, 0xef, (c.frames_sent & 0xff) as u8],
            };
            let level = c.level.map(|dbov| AudioLevel { dbov, voice: dbov > -60 });
            let sent = c.peer.send_audio(now, &AudioFrame { payload: Some(payload.into()), level });
            if !matches!(sent, fleetcall_peer::Sent::Written { .. }) {
                // Not negotiated yet.
                continue;
            }
            if c.video {
                // A VP8 payload header byte, then an opaque "frame".
                c.peer.send_video(now, &vec![c.index; 1200]);
            }
            c.frames_sent += 1;
            self.drain_client(i);
        }
    }

    /// Moves datagrams and events until nothing is left to move.
    pub fn pump(&mut self) {
        loop {
            let mut moved = false;
            // Everything the SFU has to do, drained to its timeout (timed:
            // the core drains the `Rtc`s written to here), then carried out.
            let started = Instant::now();
            let mut outputs = Vec::new();
            loop {
                match self.sfu.poll_output() {
                    SfuOutput::Timeout(at) => {
                        self.sfu_deadline = at;
                        break;
                    }
                    output => outputs.push(output),
                }
            }
            self.sfu_time += started.elapsed();
            for output in outputs {
                moved = true;
                match output {
                    SfuOutput::Transmit(t) => self.wire.push_back((t.source, t.destination, t.contents)),
                    SfuOutput::Event(event) => self.handle_sfu_event(event),
                    SfuOutput::Audio(command) => self.run_dsp(command),
                    SfuOutput::Timeout(_) => unreachable!("kept out of the list above"),
                }
            }
            while let Some((from, to, bytes)) = self.wire.pop_front() {
                moved = true;
                if to == SFU_ADDR.parse().unwrap() {
                    if self.keep_sent_rtp && is_rtp(&bytes) {
                        self.sent_rtp.insert(from, bytes.clone());
                    }
                    // STUN type 0x0001: a binding request.
                    if self.keep_sent_rtp && bytes.starts_with(&[0x00, 0x01]) {
                        self.sent_stun.insert(from, bytes.clone());
                    }
                    if is_rtp(&bytes) && self.drop_rtp.is_some_and(|drop| drop(self.rtp_in)) {
                        self.rtp_in += 1;
                        continue;
                    }
                    let started = Instant::now();
                    self.sfu.handle_datagram(self.now, from, to, &bytes);
                    self.sfu_time += started.elapsed();
                    if is_rtp(&bytes) {
                        self.rtp_in += 1;
                    }
                    continue;
                }
                let Some(i) = self.clients.iter().position(|c| c.addr == to) else { continue };
                if self.clients[i].silent {
                    continue;
                }
                self.clients[i].peer.handle_datagram(self.now, from, &bytes);
                self.drain_client(i);
            }
            if !moved {
                break;
            }
        }
        if self.sfu_deadline.is_some_and(|at| at <= self.now) {
            self.overdue_after_pump += 1;
        }
    }

    /// Runs what the held DSP had waiting, and stops holding.
    pub fn release_dsp(&mut self) {
        self.hold_dsp = false;
        for command in std::mem::take(&mut self.held_dsp) {
            self.run_dsp(command);
        }
        self.pump();
    }

    fn run_dsp(&mut self, command: fleetcall_sfu::audio::AudioCommand) {
        use fleetcall_sfu::audio::{AudioCommand, TrackProcessor};
        match command {
            AudioCommand::Process { .. } if self.hold_dsp => self.held_dsp.push(command),
            AudioCommand::Process { track, packet } => {
                let processor = self
                    .dsp
                    .entry(track)
                    .or_insert_with(|| TrackProcessor::new(fleetcall_dsp::PipelineConfig::default()).unwrap());
                let mut results = Vec::new();
                processor.process(Instant::now, track, &packet, &mut results, &mut self.audio_totals);
                self.sfu.handle_processed(self.now, track, results);
            }
            AudioCommand::Suppress { track, on } => {
                if let Some(p) = self.dsp.get_mut(&track) {
                    p.set_suppression(on);
                }
            }
            AudioCommand::Close { track } => {
                self.dsp.remove(&track);
            }
        }
    }

    fn handle_sfu_event(&mut self, event: SfuEvent) {
        let now = self.now;
        match event {
            SfuEvent::Offer { participant, offer } => {
                let Some(c) = self.client_by_participant(participant) else { return };
                if c.silent {
                    return;
                }
                c.events.push("offer".into());
                if !c.auto_answer {
                    c.held_offers.push(offer);
                    return;
                }
                let answer = c.peer.accept_offer(now, &offer.to_sdp_string()).unwrap();
                let i = self.clients.iter().position(|c| c.participant == participant).unwrap();
                self.drain_client(i);
                self.sfu.accept_answer(now, participant, SdpAnswer::from_sdp_string(&answer).unwrap()).unwrap();
            }
            SfuEvent::Connected { participant } => {
                if let Some(c) = self.client_by_participant(participant) {
                    c.events.push("connected".into());
                }
            }
            SfuEvent::ParticipantJoined { to, participant, .. } => {
                if let Some(c) = self.client_by_participant(to) {
                    c.events.push(format!("joined:{participant}"));
                }
            }
            SfuEvent::ParticipantLeft { to, participant, reason } => {
                if let Some(c) = self.client_by_participant(to) {
                    c.events.push(format!("left:{participant}:{}", reason.as_str()));
                }
            }
            SfuEvent::ActiveSpeakers { to, speakers } => {
                if let Some(c) = self.client_by_participant(to) {
                    c.speaker_log.push((now, speakers.clone()));
                    c.speakers = speakers;
                }
            }
            SfuEvent::Removed { participant, reason } => self.removed.push((participant, reason)),
            _ => {}
        }
    }

    /// Moves what client `i`'s peer has to do: datagrams onto the wire,
    /// events into the client's record.
    pub fn drain_client(&mut self, i: usize) {
        let c = &mut self.clients[i];
        loop {
            match c.peer.poll_output() {
                Output::Timeout(at) => {
                    c.deadline = at;
                    break;
                }
                Output::Transmit(t) => {
                    if !c.silent {
                        self.wire.push_back((c.addr, t.destination, t.contents));
                    }
                }
                Output::Event(PeerEvent::Connected) => c.connected = true,
                Output::Event(PeerEvent::Frame(frame)) => {
                    if c.opus.is_some() {
                        c.frames.push((frame.stream.to_string(), frame.seq, frame.rtp_time, frame.payload.to_vec()));
                    }
                    if frame.kind == MediaKind::Video {
                        c.video_frames += 1;
                    } else if let Some(sender) = frame.payload.first() {
                        *c.heard.entry(*sender).or_default() += 1;
                    }
                }
                Output::Event(PeerEvent::KeyframeRequest) => c.keyframe_requests += 1,
                Output::Event(PeerEvent::Packet(packet)) => c.rtp.push(RtpRecord {
                    ssrc: packet.ssrc,
                    seq: packet.seq,
                    timestamp: packet.timestamp,
                    marker: packet.marker,
                    csrc: packet.csrc,
                    first_byte: packet.payload.first().copied(),
                    at: self.now,
                }),
                Output::Event(PeerEvent::Failed(reason)) => panic!("client {} failed: {reason}", c.index),
                Output::Event(_) => {}
            }
        }
    }
}

/// One 20 ms frame of `signal`, 48 kHz mono.
pub fn pcm_frame(signal: Signal, frame: u64, seed: u8) -> Vec<i16> {
    let start = frame * 960;
    let mut noise_state = (start.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(seed).wrapping_mul(0xbf58_476d_1ce4_e5b9)) | 1;
    let mut white = move || {
        noise_state ^= noise_state << 13;
        noise_state ^= noise_state >> 7;
        noise_state ^= noise_state << 17;
        (noise_state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    (0..960u64)
        .map(|n| {
            let t = (start + n) as f32 / 48_000.0;
            let x = match signal {
                Signal::ToneInNoise => {
                    let noise = ((n * 7919 + frame * 104_729) % 2000) as f32 - 1000.0;
                    return ((t * 440.0 * std::f32::consts::TAU).sin() * 4000.0 + noise) as i16;
                }
                Signal::Silence => 0.0,
                Signal::Noise { dbfs } => 10f32.powf(dbfs / 20.0) * 1.73 * white(),
                Signal::Rumble { dbfs } => {
                    // A sum of slowly drifting low sines: deterministic per
                    // sample, no state across frames.
                    let r: f32 = (1..12).map(|k| ((t * (37.0 * k as f32 + 3.0 * (0.3 * t).sin())) * std::f32::consts::TAU + k as f32).sin() / k as f32).sum();
                    10f32.powf(dbfs / 20.0) * 0.6 * r + 10f32.powf((dbfs - 20.0) / 20.0) * white()
                }
                Signal::Talker { dbfs } => {
                    // Syllables of ~200 ms on a gliding pitch, with vowel-like
                    // formant weighting of the harmonics.
                    let syllable = (t * 2.5 * std::f32::consts::TAU).sin().abs().powf(0.7);
                    let vibrato = 1.7 * std::f32::consts::TAU;
                    let pitch = 140.0 + 25.0 * (vibrato * t).sin();
                    // Phase (in cycles) of that pitch, integrated.
                    let phase = 140.0 * t + 25.0 * (1.0 - (vibrato * t).cos()) / vibrato;
                    let formant = |f: f32, center: f32| (-((f - center) / 250.0).powi(2)).exp();
                    let vowel = if (t * 2.5).fract() < 0.5 { (700.0, 1200.0) } else { (350.0, 2000.0) };
                    let voiced: f32 = (1..30)
                        .map(|h| {
                            let f = pitch * h as f32;
                            let gain = 0.3 / h as f32 + formant(f, vowel.0) + 0.6 * formant(f, vowel.1);
                            gain * (std::f32::consts::TAU * (phase * h as f32).fract()).sin()
                        })
                        .sum();
                    10f32.powf(dbfs / 20.0) * 0.35 * syllable * voiced
                }
            };
            (x.clamp(-1.0, 1.0) * 32767.0) as i16
        })
        .collect()
}

/// RTP, not RTCP: RTCP packet types 192..=223 land in 64..=95 once the
/// marker bit is masked off (RFC 5761).
fn is_rtp(datagram: &[u8]) -> bool {
    matches!(datagram, [128..=191, second, ..] if !(64..=95).contains(&(second & 0x7f)))
}

pub fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
