//! The sans-IO SFU core: rooms of participants, one `str0m::Rtc` each, and the
//! forwarding table between them.
//!
//! Input: [`Sfu::handle_datagram`], [`Sfu::handle_timeout`] and the commands
//! ([`Sfu::join`], [`Sfu::accept_answer`], [`Sfu::accept_offer`],
//! [`Sfu::leave`]). Output: [`Sfu::poll_transmit`], [`Sfu::poll_event`],
//! [`Sfu::poll_timeout`]. The core never reads a clock and never blocks.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::config::{CryptoProvider, DtlsCert};
use str0m::format::Codec;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{Extension, ExtensionMap, ExtensionValues, RtpWrite};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tracing::{debug, debug_span, info, info_span, trace, warn};

use crate::audio::{AudioCommand, AudioPacket, PolicyChange, ProcessedAudio, SuppressionPolicy};
use crate::demux::{classify, stun_local_ufrag, DatagramKind, Demux};
use crate::error::SfuError;
use crate::histogram::{bounds, Histogram};
use crate::ids::{ParticipantId, RoomId};
use crate::participant::{AudioPath, Change, OutState, Participant, TrackIn, TrackKey, TrackOut};
use crate::slots::Slot;
use crate::speakers::{Activity, Changed, SelectorConfig, SpeakerSelector};

/// Settings of one SFU core.
#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// Addresses announced as ICE host candidates: this core's socket as the
    /// devices reach it (LAN or public IP, and the port).
    pub candidates: Vec<SocketAddr>,
    /// How long a participant may stay silent (no datagram accepted) or ICE
    /// disconnected before it is removed.
    pub disconnect_grace: Duration,
    /// Most participants in one room.
    pub max_room_size: usize,
    /// Most participants in this core.
    pub max_participants: usize,
    /// Which publishers' audio is denoised.
    pub suppression: SuppressionPolicy,
    /// Audio slots per listener. A room with more than `audio_slots + 1`
    /// participants forwards audio by active-speaker selection into this
    /// many audio m-lines per listener instead of one per publisher; 0
    /// forwards everyone to everyone in every room.
    pub audio_slots: usize,
    /// How long a selected speaker who stopped talking keeps its slot while
    /// another waits.
    pub speaker_hold: Duration,
}

impl Default for SfuConfig {
    fn default() -> Self {
        SfuConfig {
            candidates: Vec::new(),
            disconnect_grace: Duration::from_secs(5),
            max_room_size: 100,
            max_participants: 5_000,
            suppression: SuppressionPolicy::default(),
            audio_slots: 3,
            speaker_hold: SelectorConfig::default().hold,
        }
    }
}

/// What a participant may do with media, from its credential's grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rights {
    /// Its tracks are forwarded. Without, every track it offers is refused:
    /// nothing it sends reaches anyone.
    pub publish: bool,
    /// It receives the others' tracks.
    pub subscribe: bool,
}

impl Rights {
    /// Publish and subscribe.
    pub const ALL: Rights = Rights { publish: true, subscribe: true };
}

/// A request to add a participant to a room.
#[derive(Debug)]
pub struct JoinRequest {
    /// Room to join; created when it does not exist.
    pub room: RoomId,
    /// Caller-assigned, never reused.
    pub participant: ParticipantId,
    /// Display name for the others.
    pub name: String,
    /// The participant's SDP offer with the tracks it publishes.
    pub offer: SdpOffer,
    /// What it may do.
    pub rights: Rights,
}

/// A successful join.
#[derive(Debug)]
pub struct Joined {
    /// The SDP answer for the participant.
    pub answer: SdpAnswer,
    /// Everyone else in the room: id and display name.
    pub others: Vec<(ParticipantId, String)>,
}

/// Why a participant left its room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LeaveReason {
    /// It asked to leave.
    Requested,
    /// No datagram, or ICE disconnected, for longer than the grace.
    IceTimeout,
    /// Its signaling connection closed.
    SignalingClosed,
    /// An SDP answer could not be applied.
    NegotiationFailed,
    /// The peer closed DTLS, or its `Rtc` failed.
    Closed,
    /// The server is shutting down.
    Shutdown,
}

impl LeaveReason {
    /// The wire name, as in the browser protocol.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaveReason::Requested => "requested",
            LeaveReason::IceTimeout => "ice_timeout",
            LeaveReason::SignalingClosed => "signaling_closed",
            LeaveReason::NegotiationFailed => "negotiation_failed",
            LeaveReason::Closed => "closed",
            LeaveReason::Shutdown => "shutdown",
        }
    }
}

/// Something a participant's signaling connection needs to hear.
#[derive(Debug)]
#[non_exhaustive]
pub enum SfuEvent {
    /// The SFU renegotiates; the participant must answer.
    Offer {
        /// Who must answer.
        participant: ParticipantId,
        /// The offer.
        offer: SdpOffer,
    },
    /// ICE and DTLS are up for the participant.
    Connected {
        /// Who connected.
        participant: ParticipantId,
    },
    /// Someone joined the room of `to`.
    ParticipantJoined {
        /// Recipient.
        to: ParticipantId,
        /// Who joined.
        participant: ParticipantId,
        /// Their display name.
        name: String,
    },
    /// Someone left the room of `to`.
    ParticipantLeft {
        /// Recipient.
        to: ParticipantId,
        /// Who left.
        participant: ParticipantId,
        /// Why.
        reason: LeaveReason,
    },
    /// The room's active speakers changed (selection or dominant speaker).
    ActiveSpeakers {
        /// Recipient.
        to: ParticipantId,
        /// Publishers whose audio is selected, the dominant (most recent)
        /// speaker first. May include the recipient.
        speakers: Vec<ParticipantId>,
    },
    /// The participant is gone from the SFU, with everything it owned.
    Removed {
        /// Who was removed.
        participant: ParticipantId,
        /// Why.
        reason: LeaveReason,
    },
}

/// A datagram to send.
#[derive(Debug)]
pub struct Transmit {
    /// Local address to send from.
    pub source: SocketAddr,
    /// Remote address.
    pub destination: SocketAddr,
    /// The datagram.
    pub contents: Vec<u8>,
}

/// Datagrams the core dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DropCounts {
    /// From an address no participant uses, not a STUN request for one.
    pub unknown_source: u64,
    /// Not a STUN, DTLS, RTP or RTCP datagram.
    pub malformed: u64,
    /// The participant's `Rtc` refused it.
    pub rejected: u64,
    /// RTP that could not be routed (unknown SSRC, codec the subscriber lacks,
    /// sequence number from before the subscription).
    pub unroutable: u64,
    /// RTP from a participant whose grant does not let it publish.
    pub not_permitted: u64,
}

/// Counts that prove nothing leaks, traffic counters, and the quality the
/// participants report over RTCP.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SfuStats {
    /// Rooms with at least one participant.
    pub rooms: usize,
    /// Participants in all rooms.
    pub participants: usize,
    /// Incoming tracks (published m-lines).
    pub tracks: usize,
    /// Publisher track -> subscriber entries, negotiating or open.
    pub forwarding_entries: usize,
    /// Demux keys (remote addresses and ufrags) still held.
    pub demux_entries: usize,
    /// Audio tracks going through a DSP pipeline.
    pub processed_tracks: usize,
    /// Of those, the ones being denoised now.
    pub suppressed_tracks: usize,
    /// Datagrams received.
    pub datagrams_in: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Datagrams sent.
    pub datagrams_out: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// RTP packets written to a subscriber.
    pub rtp_forwarded: u64,
    /// Dropped datagrams.
    pub dropped: DropCounts,
    /// Participants removed, by [`LeaveReason::as_str`].
    pub removed: BTreeMap<&'static str, u64>,
    /// NACKs participants sent about what we forward to them.
    pub nacks_received: u64,
    /// PLI and FIR participants sent.
    pub keyframe_requests_received: u64,
    /// Keyframe requests we sent to publishers.
    pub keyframe_requests_sent: u64,
    /// Loss fraction participants report (RTCP receiver reports), per report.
    pub reported_loss: Histogram,
    /// Jitter participants report, seconds, per report.
    pub reported_jitter: Histogram,
    /// Round-trip time to participants, seconds, per report.
    pub rtt: Histogram,
    /// From join to the first audio packet forwarded to the participant, seconds.
    pub join_to_first_audio: Histogram,
    /// Rooms forwarding audio by speaker selection (audio slots).
    pub slot_rooms: usize,
    /// Audio slot m-lines, negotiating or open.
    pub audio_slots: usize,
    /// Audio tracks speaking now, all rooms.
    pub speaking: usize,
    /// Changes of a room's selection of speakers.
    pub speaker_changes: u64,
    /// A listener's slot given to another speaker.
    pub slot_switches: u64,
    /// Audio packets in slot rooms from selected speakers (forwarded).
    pub selection_forwarded: u64,
    /// Audio packets in slot rooms from unselected publishers (not forwarded).
    pub selection_suppressed: u64,
    /// Tracks speaking in a room, observed at every change of its speakers.
    pub room_speakers: Histogram,
}

impl Default for SfuStats {
    fn default() -> Self {
        SfuStats {
            rooms: 0,
            participants: 0,
            tracks: 0,
            forwarding_entries: 0,
            demux_entries: 0,
            processed_tracks: 0,
            suppressed_tracks: 0,
            datagrams_in: 0,
            bytes_in: 0,
            datagrams_out: 0,
            bytes_out: 0,
            rtp_forwarded: 0,
            dropped: DropCounts::default(),
            removed: BTreeMap::new(),
            nacks_received: 0,
            keyframe_requests_received: 0,
            keyframe_requests_sent: 0,
            reported_loss: Histogram::new(bounds::LOSS_RATIO),
            reported_jitter: Histogram::new(bounds::JITTER_SECONDS),
            rtt: Histogram::new(bounds::RTT_SECONDS),
            join_to_first_audio: Histogram::new(bounds::LATENCY_SECONDS),
            slot_rooms: 0,
            audio_slots: 0,
            speaking: 0,
            speaker_changes: 0,
            slot_switches: 0,
            selection_forwarded: 0,
            selection_suppressed: 0,
            room_speakers: Histogram::new(bounds::SPEAKERS),
        }
    }
}

impl SfuStats {
    /// Adds another core's stats (counts, counters and histograms).
    pub fn merge(&mut self, other: &SfuStats) {
        self.rooms += other.rooms;
        self.participants += other.participants;
        self.tracks += other.tracks;
        self.forwarding_entries += other.forwarding_entries;
        self.demux_entries += other.demux_entries;
        self.processed_tracks += other.processed_tracks;
        self.suppressed_tracks += other.suppressed_tracks;
        self.datagrams_in += other.datagrams_in;
        self.bytes_in += other.bytes_in;
        self.datagrams_out += other.datagrams_out;
        self.bytes_out += other.bytes_out;
        self.rtp_forwarded += other.rtp_forwarded;
        self.dropped.unknown_source += other.dropped.unknown_source;
        self.dropped.malformed += other.dropped.malformed;
        self.dropped.rejected += other.dropped.rejected;
        self.dropped.unroutable += other.dropped.unroutable;
        self.dropped.not_permitted += other.dropped.not_permitted;
        for (reason, count) in &other.removed {
            *self.removed.entry(reason).or_default() += count;
        }
        self.nacks_received += other.nacks_received;
        self.keyframe_requests_received += other.keyframe_requests_received;
        self.keyframe_requests_sent += other.keyframe_requests_sent;
        self.reported_loss.merge(&other.reported_loss);
        self.reported_jitter.merge(&other.reported_jitter);
        self.rtt.merge(&other.rtt);
        self.join_to_first_audio.merge(&other.join_to_first_audio);
        self.slot_rooms += other.slot_rooms;
        self.audio_slots += other.audio_slots;
        self.speaking += other.speaking;
        self.speaker_changes += other.speaker_changes;
        self.slot_switches += other.slot_switches;
        self.selection_forwarded += other.selection_forwarded;
        self.selection_suppressed += other.selection_suppressed;
        self.room_speakers.merge(&other.room_speakers);
    }
}

/// A subscriber of a publisher track.
#[derive(Debug)]
struct Forward {
    subscriber: ParticipantId,
    /// The subscriber's outgoing m-line.
    mid: Mid,
    open: bool,
    /// Publisher payload type -> subscriber payload type, for the last one seen.
    pt: Option<(Pt, Pt)>,
    /// Subtracted from the publisher's extended sequence number so each
    /// subscriber's stream starts with rollover counter 0 (the receiver has
    /// no other way to learn it).
    seq_offset: Option<u64>,
}

/// A packet to write to a track's subscribers.
#[derive(Debug)]
struct Outgoing {
    /// The publisher's payload type.
    pt: Pt,
    /// The publisher's extended sequence number.
    seq: u64,
    timestamp: u32,
    marker: bool,
    exts: ExtensionValues,
    payload: Arc<[u8]>,
    arrived: Instant,
    /// Audio: what the packet says about its speaker, if anything.
    activity: Option<Activity>,
}

/// Work found while draining one participant that touches others. Queued so
/// only one participant is borrowed at a time.
#[derive(Debug)]
enum Work {
    Forward { source: TrackKey, codec: Codec, packet: Box<Outgoing> },
    KeyframeRequest { source: TrackKey, kind: KeyframeRequestKind },
    Publish { source: TrackKey, kind: MediaKind },
    Remove { participant: ParticipantId, reason: LeaveReason },
}

#[derive(Debug)]
struct Room {
    members: Vec<ParticipantId>,
    /// Audio goes through slots (sticky: see [`Sfu::enter_slot_mode`]).
    slot_mode: bool,
    /// Runs in every room: it also names the active speakers.
    selector: SpeakerSelector,
    /// The speakers last announced.
    announced: Vec<ParticipantId>,
}

/// Everything draining a participant may write to, besides the participants.
#[derive(Debug)]
struct Outputs {
    transmits: VecDeque<Transmit>,
    events: VecDeque<SfuEvent>,
    work: VecDeque<Work>,
    /// (deadline, participant); an entry is live only while it equals the
    /// participant's `wake_at`, so stale ones are skipped, never searched for.
    timers: BinaryHeap<Reverse<(Instant, ParticipantId)>>,
    /// Commands for the DSP threads.
    audio: VecDeque<AudioCommand>,
    stats: SfuStats,
    grace: Duration,
}

/// The RTP header extensions the SFU negotiates: str0m's standard set
/// without transport-wide sequence numbers and absolute send time. Those feed
/// bandwidth estimation, which an audio SFU does not run; negotiated, they
/// cost a TWCC feedback packet every 50 ms from and to every participant, a
/// send register per participant, and LAN bandwidth. Video publishers fall
/// back to loss-based estimation.
fn extensions() -> ExtensionMap {
    let standard = ExtensionMap::standard();
    let mut map = ExtensionMap::empty();
    for (id, ext) in standard.iter() {
        if !matches!(ext, Extension::TransportSequenceNumber | Extension::AbsoluteSendTime) {
            map.set(id, ext.clone());
        }
    }
    map
}

/// How often each participant's `Rtc` reports RTCP-derived quality.
const STATS_INTERVAL: Duration = Duration::from_secs(5);

/// Keyframe requests to one publisher track are at most this frequent.
const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);

/// The SFU core. One per worker thread; every room lives in exactly one.
pub struct Sfu {
    config: SfuConfig,
    crypto: Arc<CryptoProvider>,
    /// Shared by every participant: generating one costs over a millisecond.
    dtls_cert: DtlsCert,
    rooms: HashMap<RoomId, Room>,
    participants: HashMap<ParticipantId, Participant>,
    forwarding: HashMap<TrackKey, Vec<Forward>>,
    /// Slot rooms: a selected audio track -> (listener, slot index).
    slot_routes: HashMap<TrackKey, Vec<(ParticipantId, usize)>>,
    demux: Demux,
    out: Outputs,
}

impl std::fmt::Debug for Sfu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sfu").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl Sfu {
    /// A core with a fresh DTLS certificate.
    pub fn new(config: SfuConfig) -> Self {
        let crypto = Arc::new(str0m::crypto::from_feature_flags());
        // The default provider generates certificates; failing would be a bug.
        let cert = crypto.dtls_provider.generate_certificate().expect("DTLS certificate");
        Self::with_certificate(config, crypto, cert)
    }

    /// A core sharing a certificate with other cores.
    pub fn with_certificate(config: SfuConfig, crypto: Arc<CryptoProvider>, dtls_cert: DtlsCert) -> Self {
        let grace = config.disconnect_grace;
        Sfu {
            config,
            crypto,
            dtls_cert,
            rooms: HashMap::new(),
            participants: HashMap::new(),
            forwarding: HashMap::new(),
            slot_routes: HashMap::new(),
            demux: Demux::default(),
            out: Outputs {
                transmits: VecDeque::new(),
                events: VecDeque::new(),
                work: VecDeque::new(),
                timers: BinaryHeap::new(),
                audio: VecDeque::new(),
                stats: SfuStats::default(),
                grace,
            },
        }
    }

    /// Adds a participant to a room and answers its offer.
    pub fn join(&mut self, now: Instant, request: JoinRequest) -> Result<Joined, SfuError> {
        let JoinRequest { room, participant: id, name, offer, rights } = request;
        let _span = info_span!("participant", %id, %room).entered();
        if self.participants.contains_key(&id) {
            return Err(SfuError::DuplicateParticipant(id));
        }
        if self.participants.len() >= self.config.max_participants {
            return Err(SfuError::AtCapacity);
        }
        let members = self.rooms.get(&room).map_or(0, |r| r.members.len());
        if members >= self.config.max_room_size {
            return Err(SfuError::RoomFull(room));
        }

        let mut rtc = Rtc::builder()
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .set_crypto_provider(self.crypto.clone())
            .set_dtls_cert(self.dtls_cert.clone())
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .set_extension_map(extensions())
            .set_stats_interval(Some(STATS_INTERVAL))
            .build(now);
        for addr in &self.config.candidates {
            // A host candidate from a configured socket address is always valid.
            let candidate = Candidate::host(*addr, "udp").expect("host candidate");
            rtc.add_local_candidate(candidate);
        }
        let answer = rtc.sdp_api().accept_offer(offer).map_err(|e| SfuError::InvalidSdp(e.to_string()))?;
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;

        let selector = SelectorConfig { slots: self.config.audio_slots.max(1), hold: self.config.speaker_hold, ..SelectorConfig::default() };
        let room_entry = self.rooms.entry(room.clone()).or_insert_with(|| {
            info!(%room, "room created");
            Room { members: Vec::new(), slot_mode: false, selector: SpeakerSelector::new(selector), announced: Vec::new() }
        });
        let slots = self.config.audio_slots;
        if slots > 0 && !room_entry.slot_mode && room_entry.members.len() + 1 > slots + 1 {
            self.enter_slot_mode(now, &room);
        }
        // Just created or found above.
        let room_entry = self.rooms.get_mut(&room).expect("room exists");
        let mut others = Vec::with_capacity(room_entry.members.len());
        let mut participant = Participant::new(id, room.clone(), name.clone(), rtc, ufrag.clone(), rights, now);
        if room_entry.slot_mode {
            participant.slot_mode = true;
            if rights.subscribe {
                participant.slots = (0..slots).map(|_| Slot::new()).collect();
                participant.changes.extend((0..slots).map(Change::AddSlot));
            }
        }
        for other_id in &room_entry.members {
            let other = &self.participants[other_id];
            others.push((*other_id, other.name.clone()));
            if !rights.subscribe {
                continue;
            }
            for (mid, track) in &other.tracks_in {
                if room_entry.slot_mode && track.kind == MediaKind::Audio {
                    continue;
                }
                let source = TrackKey { publisher: *other_id, mid: *mid };
                participant.changes.push_back(Change::Add { source, kind: track.kind });
            }
            self.out.events.push_back(SfuEvent::ParticipantJoined { to: *other_id, participant: id, name: name.clone() });
        }
        room_entry.members.push(id);
        if !room_entry.announced.is_empty() {
            self.out.events.push_back(SfuEvent::ActiveSpeakers { to: id, speakers: room_entry.announced.clone() });
        }
        let slot_mode = room_entry.slot_mode;
        self.demux.insert_ufrag(ufrag, id);
        info!(%room, participant = %id, %name, "participant joined");
        self.participants.insert(id, participant);
        if slot_mode {
            self.selection_changed(now, &room, Changed::default(), true);
        }

        self.drain(now, id);
        self.negotiate(now, id);
        self.run_work(now);
        Ok(Joined { answer, others })
    }

    /// Applies the participant's answer to the SFU's latest offer. A bad
    /// answer leaves the session unknown, so the participant is removed.
    pub fn accept_answer(&mut self, now: Instant, id: ParticipantId, answer: SdpAnswer) -> Result<(), SfuError> {
        let _span = debug_span!("participant", %id).entered();
        let p = self.participants.get_mut(&id).ok_or(SfuError::UnknownParticipant(id))?;
        let pending = p.pending_offer.take().ok_or(SfuError::NoPendingOffer(id))?;
        if let Err(e) = p.rtc.sdp_api().accept_answer(pending, answer) {
            warn!(participant = %id, error = %e, "answer rejected");
            self.remove_participant(now, id, LeaveReason::NegotiationFailed);
            self.run_work(now);
            return Err(SfuError::InvalidSdp(e.to_string()));
        }
        let mut opened = Vec::new();
        p.tracks_out.retain(|mid, track| match track.state {
            OutState::Negotiating => {
                track.state = OutState::Open;
                opened.push((*mid, track.source));
                true
            }
            // Only stops already sent in an offer have been answered; queued
            // ones are still in `changes`.
            OutState::Stopping => p.changes.iter().any(|c| matches!(c, Change::Stop(m) if m == mid)),
            OutState::Open => true,
        });
        for slot in p.slots.iter_mut().filter(|s| s.mid.is_some() && s.state == OutState::Negotiating) {
            slot.state = OutState::Open;
        }
        for (mid, source) in opened {
            if let Some(forward) = self.forwarding.get_mut(&source).and_then(|f| f.iter_mut().find(|f| f.subscriber == id && f.mid == mid)) {
                forward.open = true;
            }
            // A new video subscriber needs a keyframe to start decoding.
            let is_video = self.participants.get(&source.publisher).and_then(|p| p.tracks_in.get(&source.mid)).is_some_and(|t| t.kind == MediaKind::Video);
            if is_video {
                self.out.work.push_back(Work::KeyframeRequest { source, kind: KeyframeRequestKind::Pli });
            }
        }
        self.drain(now, id);
        self.negotiate(now, id);
        self.run_work(now);
        Ok(())
    }

    /// Answers a participant's own offer (ICE restart). An offer of ours still
    /// in flight is abandoned and its changes are offered again afterwards.
    pub fn accept_offer(&mut self, now: Instant, id: ParticipantId, offer: SdpOffer) -> Result<SdpAnswer, SfuError> {
        let _span = debug_span!("participant", %id).entered();
        let p = self.participants.get_mut(&id).ok_or(SfuError::UnknownParticipant(id))?;
        if p.pending_offer.take().is_some() {
            // Adds in the abandoned offer never reached the session: queue them
            // again. Stops did (str0m applies them at once): just forget them.
            let mut requeue = Vec::new();
            p.tracks_out.retain(|mid, track| match track.state {
                OutState::Negotiating => {
                    requeue.push((*mid, track.source));
                    false
                }
                OutState::Stopping => p.changes.iter().any(|c| matches!(c, Change::Stop(m) if m == mid)),
                OutState::Open => true,
            });
            for (i, slot) in p.slots.iter_mut().enumerate().rev() {
                if slot.mid.is_some() && slot.state == OutState::Negotiating {
                    slot.mid = None;
                    p.changes.push_front(Change::AddSlot(i));
                }
            }
            for (mid, source) in requeue {
                if let Some(forwards) = self.forwarding.get_mut(&source) {
                    forwards.retain(|f| !(f.subscriber == id && f.mid == mid));
                    let kind = self.participants[&source.publisher].tracks_in[&source.mid].kind;
                    self.participants.get_mut(&id).unwrap().changes.push_front(Change::Add { source, kind });
                }
            }
        }
        let p = self.participants.get_mut(&id).unwrap(); // checked above
        let result = p.rtc.sdp_api().accept_offer(offer).map_err(|e| SfuError::InvalidSdp(e.to_string()));
        if !p.rtc.is_alive() {
            self.remove_participant(now, id, LeaveReason::NegotiationFailed);
        } else {
            self.drain(now, id);
            self.negotiate(now, id);
        }
        self.run_work(now);
        result
    }

    /// Removes a participant and everything it owned.
    pub fn leave(&mut self, now: Instant, id: ParticipantId, reason: LeaveReason) -> Result<(), SfuError> {
        if !self.participants.contains_key(&id) {
            return Err(SfuError::UnknownParticipant(id));
        }
        self.remove_participant(now, id, reason);
        self.run_work(now);
        Ok(())
    }

    /// Removes everyone, e.g. at shutdown.
    pub fn remove_all(&mut self, now: Instant, reason: LeaveReason) {
        let ids: Vec<_> = self.participants.keys().copied().collect();
        for id in ids {
            self.remove_participant(now, id, reason);
        }
        self.run_work(now);
    }

    /// Feeds one received datagram. Anything unusable is dropped and counted.
    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, destination: SocketAddr, datagram: &[u8]) {
        self.out.stats.datagrams_in += 1;
        self.out.stats.bytes_in += datagram.len() as u64;
        let kind = classify(datagram);
        let routed = match kind {
            DatagramKind::Stun => stun_local_ufrag(datagram).and_then(|u| self.demux.by_ufrag(u)).or_else(|| self.demux.by_addr(source)),
            DatagramKind::Dtls | DatagramKind::Rtp => self.demux.by_addr(source),
            DatagramKind::Unknown => {
                self.out.stats.dropped.malformed += 1;
                return;
            }
        };
        let Some(id) = routed else {
            trace!(%source, "datagram from unknown source");
            self.out.stats.dropped.unknown_source += 1;
            return;
        };
        let Some(p) = self.participants.get_mut(&id) else {
            self.out.stats.dropped.unknown_source += 1;
            return;
        };
        let Ok(contents) = datagram.try_into() else {
            self.out.stats.dropped.malformed += 1;
            return;
        };
        let input = Input::Receive(now, Receive { proto: Protocol::Udp, source, destination, contents });
        // Integrity-checks STUN (the ufrag alone is public: it travels in clear)
        // and takes other traffic only from addresses ICE validated, so nothing
        // unauthenticated claims an address or keeps a participant alive.
        if !p.rtc.accepts(&input) {
            trace!(participant = %id, %source, "datagram refused");
            self.out.stats.dropped.rejected += 1;
            return;
        }
        match p.rtc.handle_input(input) {
            Ok(()) => {
                p.last_rx = now;
                if kind == DatagramKind::Stun && self.demux.insert_addr(source, id) {
                    p.addrs.push(source);
                }
            }
            Err(e) => {
                debug!(participant = %id, error = %e, "datagram rejected");
                self.out.stats.dropped.rejected += 1;
            }
        }
        self.drain(now, id);
        self.run_work(now);
    }

    /// Drives every participant whose deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut due = Vec::new();
        while let Some(Reverse((at, id))) = self.out.timers.peek().copied() {
            if at > now {
                break;
            }
            self.out.timers.pop();
            if self.participants.get(&id).is_some_and(|p| p.wake_at == at) {
                due.push(id);
            }
        }
        let grace = self.config.disconnect_grace;
        for id in due {
            let Some(p) = self.participants.get_mut(&id) else { continue };
            let silent = now.saturating_duration_since(p.last_rx) >= grace;
            let ice_lost = p.ice_disconnected_at.is_some_and(|at| now.saturating_duration_since(at) >= grace);
            if silent || ice_lost {
                self.remove_participant(now, id, LeaveReason::IceTimeout);
                continue;
            }
            if let Err(e) = p.rtc.handle_input(Input::Timeout(now)) {
                warn!(participant = %id, error = %e, "rtc failed");
                self.remove_participant(now, id, LeaveReason::Closed);
                continue;
            }
            self.drain(now, id);
        }
        self.run_work(now);
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.transmits.pop_front()
    }

    /// The next event for a signaling connection.
    pub fn poll_event(&mut self) -> Option<SfuEvent> {
        self.out.events.pop_front()
    }

    /// The next command for the DSP threads.
    pub fn poll_audio(&mut self) -> Option<AudioCommand> {
        self.out.audio.pop_front()
    }

    /// Forwards a packet a DSP thread produced for a processed track.
    pub fn handle_processed(&mut self, now: Instant, processed: ProcessedAudio) {
        let Some(track) = self.participants.get(&processed.track.publisher).and_then(|p| p.tracks_in.get(&processed.track.mid)) else {
            return; // the publisher left while its packet was processed
        };
        let Some(pt) = track.last_pt else { return };
        let activity = Activity::Speech { probability: processed.speech_probability, level: track.last_level };
        let packet = Outgoing {
            pt,
            seq: processed.seq,
            timestamp: processed.timestamp,
            marker: processed.marker,
            exts: ExtensionValues::default(),
            payload: processed.payload,
            arrived: processed.arrived,
            activity: Some(activity),
        };
        self.forward_audio(now, processed.track, Codec::Opus, &packet);
        self.run_work(now);
    }

    /// Changes the suppression policy; tracks it concerns switch at once.
    pub fn set_policy(&mut self, change: PolicyChange) {
        self.config.suppression.apply(change);
        let policy = &self.config.suppression;
        for p in self.participants.values_mut() {
            let wanted = policy.applies(&p.room, &p.name);
            for (mid, track) in p.tracks_in.iter_mut().filter(|(_, t)| t.kind == MediaKind::Audio) {
                let next = match track.audio {
                    AudioPath::PassThrough if wanted => AudioPath::Pipeline { suppress: true },
                    AudioPath::Pipeline { .. } => AudioPath::Pipeline { suppress: wanted },
                    other => other,
                };
                if let (AudioPath::Pipeline { suppress: before }, AudioPath::Pipeline { suppress: after }) = (track.audio, next)
                    && before != after {
                        let track = TrackKey { publisher: p.id, mid: *mid };
                        self.out.audio.push_back(AudioCommand::Suppress { track, on: after });
                    }
                track.audio = next;
            }
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &SuppressionPolicy {
        &self.config.suppression
    }

    fn audio_tracks(&self) -> impl Iterator<Item = &TrackIn> {
        self.participants.values().flat_map(|p| p.tracks_in.values()).filter(|t| t.kind == MediaKind::Audio)
    }

    /// When [`Sfu::handle_timeout`] is next due (maybe early, never late).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.out.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Counts of everything the core holds, and traffic counters.
    pub fn stats(&self) -> SfuStats {
        let (addrs, ufrags) = self.demux.len();
        SfuStats {
            rooms: self.rooms.len(),
            participants: self.participants.len(),
            tracks: self.participants.values().map(|p| p.tracks_in.len()).sum(),
            forwarding_entries: self.forwarding.values().map(Vec::len).sum(),
            demux_entries: addrs + ufrags,
            processed_tracks: self.audio_tracks().filter(|t| matches!(t.audio, AudioPath::Pipeline { .. })).count(),
            suppressed_tracks: self.audio_tracks().filter(|t| t.audio == AudioPath::Pipeline { suppress: true }).count(),
            slot_rooms: self.rooms.values().filter(|r| r.slot_mode).count(),
            audio_slots: self.participants.values().map(|p| p.slots.iter().filter(|s| s.mid.is_some()).count()).sum(),
            speaking: self.rooms.values().map(|r| r.selector.speaking()).sum(),
            ..self.out.stats.clone()
        }
    }

    /// Participants per room.
    pub fn room_sizes(&self) -> Vec<(RoomId, usize)> {
        self.rooms.iter().map(|(id, room)| (id.clone(), room.members.len())).collect()
    }

    /// Display names in a room, for tests and the admin API.
    pub fn room_members(&self, room: &RoomId) -> Vec<(ParticipantId, String)> {
        let Some(room) = self.rooms.get(room) else { return Vec::new() };
        room.members.iter().map(|id| (*id, self.participants[id].name.clone())).collect()
    }

    /// Drains one participant's `Rtc` to its next timeout, queueing work that
    /// touches other participants, then files its next deadline.
    fn drain(&mut self, now: Instant, id: ParticipantId) {
        let Some(p) = self.participants.get_mut(&id) else { return };
        drain_participant_with(now, p, &mut self.out, Some(&self.config.suppression));
    }

    /// Offers the participant's queued changes, unless an offer is in flight.
    fn negotiate(&mut self, now: Instant, id: ParticipantId) {
        let Some(p) = self.participants.get_mut(&id) else { return };
        if p.pending_offer.is_some() || p.changes.is_empty() {
            return;
        }
        let mut api = p.rtc.sdp_api();
        while let Some(change) = p.changes.pop_front() {
            match change {
                Change::Add { source, kind } => {
                    // The publisher may have left while this waited.
                    let Some(forwards) = self.forwarding.get_mut(&source) else { continue };
                    let stream_id = source.publisher.to_string();
                    let track_id = format!("{}-{}", source.publisher, source.mid);
                    let mid = api.add_media(kind, Direction::SendOnly, Some(stream_id), Some(track_id), None);
                    p.tracks_out.insert(mid, TrackOut { source, kind, state: OutState::Negotiating });
                    forwards.push(Forward { subscriber: id, mid, open: false, pt: None, seq_offset: None });
                }
                Change::Stop(mid) => api.stop_media(mid),
                Change::AddSlot(index) => {
                    let Some(slot) = p.slots.get_mut(index).filter(|s| s.mid.is_none()) else { continue };
                    // The msid names the slot; who is in it travels as the CSRC.
                    let name = format!("slot-{index}");
                    slot.mid = Some(api.add_media(MediaKind::Audio, Direction::SendOnly, Some(name.clone()), Some(name), None));
                    slot.state = OutState::Negotiating;
                }
            }
        }
        if let Some((offer, pending)) = api.apply() {
            debug!(participant = %id, "renegotiating");
            p.pending_offer = Some(pending);
            self.out.events.push_back(SfuEvent::Offer { participant: id, offer });
        }
        drain_participant(now, p, &mut self.out);
    }

    fn run_work(&mut self, now: Instant) {
        while let Some(work) = self.out.work.pop_front() {
            match work {
                Work::Forward { source, codec, packet } if codec.is_video() => self.forward(now, source, codec, &packet),
                Work::Forward { source, codec, packet } => self.forward_audio(now, source, codec, &packet),
                Work::KeyframeRequest { source, kind } => {
                    let Some(p) = self.participants.get_mut(&source.publisher) else { continue };
                    let Some(track) = p.tracks_in.get_mut(&source.mid) else { continue };
                    if track.last_keyframe_request.is_some_and(|at| now.saturating_duration_since(at) < KEYFRAME_REQUEST_INTERVAL) {
                        continue;
                    }
                    track.last_keyframe_request = Some(now);
                    if let Some(rx) = p.rtc.direct_api().stream_rx_by_mid(source.mid, None) {
                        rx.request_keyframe(kind);
                        self.out.stats.keyframe_requests_sent += 1;
                    }
                    drain_participant(now, p, &mut self.out);
                }
                Work::Publish { source, kind } => {
                    self.forwarding.entry(source).or_default();
                    let Some(room) = self.participants.get(&source.publisher).map(|p| p.room.clone()) else { continue };
                    let Some(r) = self.rooms.get_mut(&room) else { continue };
                    let members = r.members.clone();
                    if kind == MediaKind::Audio {
                        let changed = r.selector.add(source);
                        let slot_mode = r.slot_mode;
                        if changed.any() {
                            self.selection_changed(now, &room, changed, slot_mode);
                        }
                        if slot_mode {
                            continue; // heard through the slots
                        }
                    }
                    for member in members.into_iter().filter(|m| *m != source.publisher) {
                        match self.participants.get_mut(&member) {
                            Some(m) if m.rights.subscribe => m.changes.push_back(Change::Add { source, kind }),
                            _ => continue,
                        }
                        self.negotiate(now, member);
                    }
                }
                Work::Remove { participant, reason } => self.remove_participant(now, participant, reason),
            }
        }
    }

    /// Writes one publisher packet to every open subscriber of its track.
    fn forward(&mut self, now: Instant, source: TrackKey, codec: Codec, packet: &Outgoing) {
        let Some(forwards) = self.forwarding.get_mut(&source) else { return };
        let is_video = codec.is_video();
        for forward in forwards.iter_mut().filter(|f| f.open) {
            let Some(sub) = self.participants.get_mut(&forward.subscriber) else { continue };
            let out_pt = match forward.pt {
                Some((pt_in, pt_out)) if pt_in == packet.pt => pt_out,
                _ => {
                    let Some(pt_out) = sub.pt_for(forward.mid, codec) else {
                        self.out.stats.dropped.unroutable += 1;
                        continue;
                    };
                    forward.pt = Some((packet.pt, pt_out));
                    pt_out
                }
            };
            let offset = *forward.seq_offset.get_or_insert(packet.seq & !0xffff);
            let Some(out_seq) = packet.seq.checked_sub(offset) else {
                self.out.stats.dropped.unroutable += 1;
                continue;
            };
            let mut api = sub.rtc.direct_api();
            let Some(tx) = api.stream_tx_by_mid(forward.mid, None) else {
                self.out.stats.dropped.unroutable += 1;
                continue;
            };
            tx.write_rtp(
                RtpWrite::new(out_pt, out_seq.into(), packet.timestamp, packet.arrived, packet.payload.clone())
                    .marker(packet.marker)
                    .ext_vals(packet.exts.clone())
                    .nackable(is_video),
            );
            self.out.stats.rtp_forwarded += 1;
            if !is_video && sub.first_audio_at.is_none() {
                sub.first_audio_at = Some(now);
                self.out.stats.join_to_first_audio.observe(now.saturating_duration_since(sub.joined_at).as_secs_f64());
            }
            drain_participant(now, sub, &mut self.out);
        }
    }

    /// Observes an audio packet for speaker selection, then forwards it: to
    /// every subscriber, or in a slot room to the listeners whose slots
    /// carry its track.
    fn forward_audio(&mut self, now: Instant, source: TrackKey, codec: Codec, packet: &Outgoing) {
        let Some(p) = self.participants.get(&source.publisher) else { return };
        let slot_mode = p.slot_mode;
        let mut reselect = None;
        if let (Some(activity), Some(room)) = (packet.activity, self.rooms.get_mut(&p.room)) {
            let changed = room.selector.observe(now, source, activity);
            if changed.any() {
                reselect = Some((p.room.clone(), changed));
            }
        }
        if let Some((room, changed)) = reselect {
            self.selection_changed(now, &room, changed, changed.selection && slot_mode);
        }
        if slot_mode {
            self.forward_slots(now, source, codec, packet);
        } else {
            self.forward(now, source, codec, packet);
        }
    }

    /// Writes an audio packet into each slot its track is assigned to.
    fn forward_slots(&mut self, now: Instant, source: TrackKey, codec: Codec, packet: &Outgoing) {
        let routes = match self.slot_routes.get(&source) {
            Some(routes) if !routes.is_empty() => routes,
            _ => {
                self.out.stats.selection_suppressed += 1;
                return;
            }
        };
        self.out.stats.selection_forwarded += 1;
        let csrc = [source.publisher.0 as u32];
        for &(listener, index) in routes {
            let Some(sub) = self.participants.get_mut(&listener) else { continue };
            let Some(slot) = sub.slots.get(index) else { continue };
            let Some(mid) = slot.mid.filter(|_| slot.state == OutState::Open) else { continue };
            let out_pt = match slot.pt {
                Some((pt_in, pt_out)) if pt_in == packet.pt => pt_out,
                _ => {
                    let Some(pt_out) = sub.pt_for(mid, codec) else {
                        self.out.stats.dropped.unroutable += 1;
                        continue;
                    };
                    sub.slots[index].pt = Some((packet.pt, pt_out));
                    pt_out
                }
            };
            let Some(rewritten) = sub.slots[index].map(source, packet.seq, packet.timestamp, packet.arrived) else {
                self.out.stats.dropped.unroutable += 1;
                continue;
            };
            let mut api = sub.rtc.direct_api();
            let Some(tx) = api.stream_tx_by_mid(mid, None) else {
                self.out.stats.dropped.unroutable += 1;
                continue;
            };
            tx.write_rtp(
                RtpWrite::new(out_pt, rewritten.seq.into(), rewritten.timestamp, packet.arrived, packet.payload.clone())
                    .marker(packet.marker || rewritten.switched)
                    .ext_vals(packet.exts.clone())
                    .csrc(&csrc),
            );
            self.out.stats.rtp_forwarded += 1;
            if sub.first_audio_at.is_none() {
                sub.first_audio_at = Some(now);
                self.out.stats.join_to_first_audio.observe(now.saturating_duration_since(sub.joined_at).as_secs_f64());
            }
            drain_participant(now, sub, &mut self.out);
        }
    }

    /// The room grew past `audio_slots + 1`: every member trades its
    /// per-publisher audio m-lines for `audio_slots` slot m-lines, in one
    /// renegotiation. Video is untouched.
    ///
    /// Slot mode is sticky for the room's life: in a room of at most
    /// `audio_slots + 1` the selection pins everyone, so every listener
    /// hears every other participant through its slots anyway, and a room
    /// at the boundary never renegotiates on each join and leave.
    fn enter_slot_mode(&mut self, now: Instant, room_id: &RoomId) {
        let Some(room) = self.rooms.get_mut(room_id) else { return };
        room.slot_mode = true;
        let members = room.members.clone();
        let slots = self.config.audio_slots;
        info!(room = %room_id, members = members.len(), slots, "room switches to audio slots");
        for member in &members {
            let Some(p) = self.participants.get_mut(member) else { continue };
            p.slot_mode = true;
            let mut stopped = Vec::new();
            for (mid, track) in p.tracks_out.iter_mut() {
                if track.kind == MediaKind::Audio && track.state != OutState::Stopping {
                    track.state = OutState::Stopping;
                    stopped.push((*mid, track.source));
                }
            }
            for (mid, source) in stopped {
                p.changes.push_back(Change::Stop(mid));
                if let Some(forwards) = self.forwarding.get_mut(&source) {
                    forwards.retain(|f| !(f.subscriber == *member && f.mid == mid));
                }
            }
            p.changes.retain(|c| !matches!(c, Change::Add { kind: MediaKind::Audio, .. }));
            if p.rights.subscribe {
                p.slots = (0..slots).map(|_| Slot::new()).collect();
                p.changes.extend((0..slots).map(Change::AddSlot));
            }
        }
        for member in members {
            self.negotiate(now, member);
        }
        self.selection_changed(now, room_id, Changed::default(), true);
    }

    /// After the room's selection changed: reassigns listeners' slots (slot
    /// rooms, `reassign`), rebuilds the routes, and announces the speakers.
    /// Never on a packet's path unless the selection changed.
    fn selection_changed(&mut self, _now: Instant, room_id: &RoomId, changed: Changed, reassign: bool) {
        let Some(room) = self.rooms.get_mut(room_id) else { return };
        if changed.selection {
            self.out.stats.speaker_changes += 1;
        }
        if changed.any() {
            self.out.stats.room_speakers.observe(room.selector.speaking() as f64);
        }
        if reassign && room.slot_mode {
            for key in room.selector.tracks() {
                if let Some(routes) = self.slot_routes.get_mut(&key) {
                    routes.clear();
                }
            }
            let mut heard = Vec::with_capacity(self.config.audio_slots);
            for member in &room.members {
                let Some(p) = self.participants.get_mut(member) else { continue };
                heard.clear();
                heard.extend(room.selector.heard_by(*member));
                for slot in p.slots.iter_mut() {
                    if slot.source.is_some_and(|s| !heard.contains(&s)) {
                        slot.source = None;
                    }
                }
                for key in &heard {
                    if p.slots.iter().any(|s| s.source == Some(*key)) {
                        continue;
                    }
                    if let Some(free) = p.slots.iter_mut().find(|s| s.source.is_none()) {
                        free.source = Some(*key);
                        self.out.stats.slot_switches += 1;
                    }
                }
                for (index, slot) in p.slots.iter().enumerate() {
                    if let Some(key) = slot.source {
                        self.slot_routes.entry(key).or_default().push((*member, index));
                    }
                }
            }
            trace!(room = %room_id, selected = ?room.selector.selected(), "slots reassigned");
        }
        let speakers = room.selector.speakers();
        if speakers != room.announced {
            debug!(room = %room_id, ?speakers, "active speakers");
            for member in &room.members {
                self.out.events.push_back(SfuEvent::ActiveSpeakers { to: *member, speakers: speakers.clone() });
            }
            room.announced = speakers;
        }
    }

    /// Removes a participant, its forwarding entries both ways, its demux keys
    /// and, when it was the last, its room. Everyone affected hears of it.
    fn remove_participant(&mut self, now: Instant, id: ParticipantId, reason: LeaveReason) {
        let Some(mut p) = self.participants.remove(&id) else { return };
        let _span = info_span!("participant", %id, room = %p.room).entered();
        info!(reason = reason.as_str(), "participant removed");
        *self.out.stats.removed.entry(reason.as_str()).or_default() += 1;
        p.rtc.disconnect();
        self.demux.remove(id, &p.ufrag, &p.addrs);

        for (mid, track) in &p.tracks_in {
            if matches!(track.audio, AudioPath::Pipeline { .. }) {
                self.out.audio.push_back(AudioCommand::Close { track: TrackKey { publisher: id, mid: *mid } });
            }
        }
        // Its own tracks: every subscriber stops the m-line carrying them.
        for mid in p.tracks_in.keys() {
            let Some(forwards) = self.forwarding.remove(&TrackKey { publisher: id, mid: *mid }) else { continue };
            for forward in forwards {
                let Some(sub) = self.participants.get_mut(&forward.subscriber) else { continue };
                if let Some(track) = sub.tracks_out.get_mut(&forward.mid) {
                    track.state = OutState::Stopping;
                    sub.changes.push_back(Change::Stop(forward.mid));
                }
                self.negotiate(now, forward.subscriber);
            }
        }
        // What it received: drop it from each publisher's subscriber list.
        for track in p.tracks_out.values() {
            if let Some(forwards) = self.forwarding.get_mut(&track.source) {
                forwards.retain(|f| f.subscriber != id);
            }
        }
        // Queued adds elsewhere for its tracks are skipped in `negotiate`
        // because their forwarding key is gone.

        let mut reselect = None;
        if let Some(room) = self.rooms.get_mut(&p.room) {
            room.members.retain(|m| *m != id);
            let mut changed = Changed::default();
            for (mid, track) in &p.tracks_in {
                if track.kind == MediaKind::Audio {
                    let key = TrackKey { publisher: id, mid: *mid };
                    let c = room.selector.remove(key);
                    changed.selection |= c.selection;
                    changed.dominant |= c.dominant;
                    self.slot_routes.remove(&key);
                }
            }
            for member in &room.members {
                self.out.events.push_back(SfuEvent::ParticipantLeft { to: *member, participant: id, reason });
            }
            if room.members.is_empty() {
                self.rooms.remove(&p.room);
                info!(room = %p.room, "room removed");
            } else if changed.any() || room.slot_mode {
                // Slot rooms also drop the leaver from their routes.
                reselect = Some((changed, room.slot_mode));
            }
        }
        if let Some((changed, rebuild)) = reselect {
            self.selection_changed(now, &p.room, changed, rebuild);
        }
        self.out.events.push_back(SfuEvent::Removed { participant: id, reason });
    }
}

/// Timeouts already due that one drain serves itself before filing the rest.
const MAX_TIMEOUTS_AT_ONCE: usize = 2;

/// See [`Sfu::drain`]. A free function so callers can hold other fields.
fn drain_participant(now: Instant, p: &mut Participant, out: &mut Outputs) {
    drain_participant_with(now, p, out, None);
}

/// Drains with the suppression policy at hand, for when new tracks may appear.
fn drain_participant_with(now: Instant, p: &mut Participant, out: &mut Outputs, policy: Option<&SuppressionPolicy>) {
    let mut served_at_once = 0;
    loop {
        let output = match p.rtc.poll_output() {
            // str0m sends written RTP only after a timeout has stamped it, so
            // every write asks for a timeout now: serving it here saves a trip
            // through the timer heap (and a full poll) per forwarded packet.
            // Bounded, so an `Rtc` that keeps asking cannot hold the worker.
            Ok(Output::Timeout(at)) if at <= now && served_at_once < MAX_TIMEOUTS_AT_ONCE => {
                served_at_once += 1;
                p.rtc.handle_input(Input::Timeout(now)).and_then(|()| p.rtc.poll_output())
            }
            other => other,
        };
        let output = match output {
            Ok(output) => output,
            Err(e) => {
                warn!(participant = %p.id, error = %e, "rtc failed");
                out.work.push_back(Work::Remove { participant: p.id, reason: LeaveReason::Closed });
                p.rtc_deadline = now + Duration::from_secs(3600);
                break;
            }
        };
        match output {
            Output::Timeout(at) => {
                p.rtc_deadline = at;
                break;
            }
            Output::Transmit(t) => {
                let contents: Vec<u8> = t.contents.into();
                out.stats.datagrams_out += 1;
                out.stats.bytes_out += contents.len() as u64;
                out.transmits.push_back(Transmit { source: t.source, destination: t.destination, contents });
            }
            Output::Event(event) => handle_event(now, p, event, out, policy),
        }
    }
    if !p.rtc.is_alive() {
        out.work.push_back(Work::Remove { participant: p.id, reason: LeaveReason::Closed });
    }
    let silence_deadline = p.last_rx + out.grace;
    let ice_deadline = p.ice_disconnected_at.map(|at| at + out.grace);
    let wake = [Some(p.rtc_deadline), Some(silence_deadline), ice_deadline].into_iter().flatten().min().unwrap_or(silence_deadline);
    if wake != p.wake_at {
        p.wake_at = wake;
        out.timers.push(Reverse((wake, p.id)));
    }
}

fn handle_event(now: Instant, p: &mut Participant, event: Event, out: &mut Outputs, policy: Option<&SuppressionPolicy>) {
    match event {
        Event::Connected => {
            p.connected = true;
            info!(participant = %p.id, "media connected");
            out.events.push_back(SfuEvent::Connected { participant: p.id });
        }
        Event::IceConnectionStateChange(state) => {
            debug!(participant = %p.id, ?state, "ice state");
            match state {
                IceConnectionState::Disconnected => {
                    p.ice_disconnected_at.get_or_insert(now);
                }
                IceConnectionState::Connected | IceConnectionState::Completed => p.ice_disconnected_at = None,
                _ => {}
            }
        }
        Event::MediaAdded(media)
            if media.direction.is_receiving() && !p.tracks_out.contains_key(&media.mid) && !p.rights.publish => {
                // Refused: no track, so nothing it sends on this m-line is
                // forwarded (counted as not permitted).
                warn!(participant = %p.id, mid = %media.mid, "track refused: the grant does not allow publishing");
            }
        Event::MediaAdded(media)
            // Our direction: receiving means the participant publishes here.
            if media.direction.is_receiving() && !p.tracks_out.contains_key(&media.mid) => {
                let suppress = media.kind == MediaKind::Audio && policy.is_some_and(|policy| policy.applies(&p.room, &p.name));
                let audio = if suppress { AudioPath::Pipeline { suppress: true } } else { AudioPath::PassThrough };
                p.tracks_in.insert(media.mid, TrackIn { kind: media.kind, audio, last_pt: None, last_level: None, last_keyframe_request: None });
                debug!(participant = %p.id, mid = %media.mid, kind = ?media.kind, "track published");
                out.work.push_back(Work::Publish { source: TrackKey { publisher: p.id, mid: media.mid }, kind: media.kind });
            }
        Event::RtpPacket(packet) => {
            let Some(mid) = p.mid_of(packet.header.ssrc) else {
                out.stats.dropped.unroutable += 1;
                return;
            };
            let Some(codec) = p.codec_of(packet.header.payload_type) else {
                out.stats.dropped.unroutable += 1;
                return;
            };
            let Some(track) = p.tracks_in.get_mut(&mid) else {
                if p.rights.publish {
                    out.stats.dropped.unroutable += 1;
                } else {
                    out.stats.dropped.not_permitted += 1;
                }
                return;
            };
            let pt = packet.header.payload_type;
            track.last_pt = Some(pt);
            track.last_level = packet.header.ext_vals.audio_level;
            let source = TrackKey { publisher: p.id, mid };
            if codec == Codec::Opus && matches!(track.audio, AudioPath::Pipeline { .. }) {
                let packet = AudioPacket {
                    seq: *packet.seq_no,
                    timestamp: packet.header.timestamp,
                    marker: packet.header.marker,
                    payload: packet.payload,
                    arrived: packet.timestamp,
                };
                out.audio.push_back(AudioCommand::Process { track: source, packet });
                return;
            }
            let activity = if codec.is_video() { None } else { packet.header.ext_vals.audio_level.map(Activity::Level) };
            // Only what describes the media travels on; mid/rid belong to each hop.
            let exts = ExtensionValues {
                audio_level: packet.header.ext_vals.audio_level,
                voice_activity: packet.header.ext_vals.voice_activity,
                video_orientation: packet.header.ext_vals.video_orientation,
                ..Default::default()
            };
            let packet = Outgoing {
                pt,
                seq: *packet.seq_no,
                timestamp: packet.header.timestamp,
                marker: packet.header.marker,
                exts,
                payload: packet.payload,
                arrived: packet.timestamp,
                activity,
            };
            out.work.push_back(Work::Forward { source, codec, packet: Box::new(packet) });
        }
        Event::KeyframeRequest(request) => {
            if let Some(track) = p.tracks_out.get(&request.mid) {
                out.work.push_back(Work::KeyframeRequest { source: track.source, kind: request.kind });
            }
        }
        Event::Closed => out.work.push_back(Work::Remove { participant: p.id, reason: LeaveReason::Closed }),
        // Loss and RTT per outgoing stream from the participant's receiver
        // reports (str0m's per-peer figures need TWCC, which is not negotiated).
        Event::MediaEgressStats(stats) => {
            if let Some(rtt) = stats.rtt {
                out.stats.rtt.observe(rtt.as_secs_f64());
            }
            let keyframe_requests = stats.plis + stats.firs;
            let seen = p.egress_feedback.entry(stats.mid).or_default();
            out.stats.nacks_received += stats.nacks.saturating_sub(seen.nacks);
            out.stats.keyframe_requests_received += keyframe_requests.saturating_sub(seen.keyframe_requests);
            (seen.nacks, seen.keyframe_requests) = (stats.nacks, keyframe_requests);
            if let Some(remote) = stats.remote {
                let clock = if p.rtc.media(stats.mid).is_some_and(|m| m.kind() == MediaKind::Video) { 90_000.0 } else { 48_000.0 };
                out.stats.reported_jitter.observe(f64::from(remote.jitter) / clock);
                // Loss since the previous report we saw: cumulative counts, so
                // it holds however few reports came in between (audio: one per 5 s).
                let max_seq = *remote.maximum_sequence_number;
                let expected = max_seq.saturating_sub(seen.max_seq);
                if seen.max_seq > 0 && expected > 0 {
                    let lost = remote.packets_lost.saturating_sub(seen.lost).min(expected);
                    out.stats.reported_loss.observe(lost as f64 / expected as f64);
                }
                (seen.max_seq, seen.lost) = (max_seq, remote.packets_lost);
            }
        }
        _ => {}
    }
}
