//! The sans-IO SFU core: rooms of participants, one `str0m::Rtc` each, and
//! each room's forwarding between them.
//!
//! One entry per input: [`Sfu::handle_datagram`], [`Sfu::handle_timeout`],
//! [`Sfu::handle_processed`] (audio back from a DSP pipeline), and the
//! commands ([`Sfu::join`], [`Sfu::accept_answer`], [`Sfu::accept_offer`],
//! [`Sfu::leave`], [`Sfu::remove_all`], [`Sfu::set_policy`]), each a method
//! of its own because each has its own reply. One output: after any input,
//! drain [`Sfu::poll_output`] until it says [`Output::Timeout`]. The core
//! never reads a clock and never blocks.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer};
use str0m::config::{CryptoProvider, DtlsCert};
use str0m::format::Codec;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{Extension, ExtensionMap, ExtensionValues};
use str0m::{Candidate, Event, IceConnectionState, Input, Rtc};
use tracing::{debug, debug_span, info, info_span, trace, warn};

use crate::audio::{AudioCommand, AudioPacket, PolicyChange, ProcessedAudio, SuppressionPolicy};
use crate::demux::{classify, stun_local_ufrag, DatagramKind, Demux};
use crate::error::SfuError;
use crate::ids::{ParticipantId, RoomId, TrackKey};
use crate::outlet::Packet;
use crate::participant::{AudioPath, Change, Participant, Rights, TrackIn};
use crate::room::{Reach, Room};
use crate::speakers::{Activity, Changed, SelectorConfig, SpeakerSelector};
use crate::stats::SfuStats;
use crate::timer::Timer;

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
    /// Most packets of one track handed to its DSP pipeline and not yet
    /// answered ([`Sfu::handle_processed`]). More are dropped and counted
    /// (`dropped.dsp_overflow`): a publisher faster than real time, or a
    /// DSP thread that cannot keep up, costs that track, never a queue
    /// without end in front of every track on the thread.
    pub dsp_queue_per_track: usize,
    /// Most tracks one participant may publish (m-lines it sends on); an
    /// offer with more is refused, so one client cannot make the room
    /// renegotiate and forward without end.
    pub max_tracks_per_participant: usize,
    /// Longest datagram taken on the media port; longer ones are dropped
    /// and counted (`dropped.oversize`) before any parsing.
    pub max_datagram: usize,
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
            // 200 ms of 20 ms frames.
            dsp_queue_per_track: 10,
            // Audio, camera, screen, and one to spare.
            max_tracks_per_participant: 4,
            // An Ethernet MTU: WebRTC stacks keep under the path MTU.
            max_datagram: 1500,
        }
    }
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

impl SfuEvent {
    /// The participant whose signaling connection the event is for.
    pub fn recipient(&self) -> ParticipantId {
        match self {
            SfuEvent::Offer { participant, .. } | SfuEvent::Connected { participant } | SfuEvent::Removed { participant, .. } => *participant,
            SfuEvent::ParticipantJoined { to, .. } | SfuEvent::ParticipantLeft { to, .. } | SfuEvent::ActiveSpeakers { to, .. } => *to,
        }
    }
}

/// One track outlet: a subscriber's m-line carrying a publisher's track.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TrackOutlet {
    /// The room.
    pub room: RoomId,
    /// Whose track.
    pub publisher: ParticipantId,
    /// Who receives it.
    pub subscriber: ParticipantId,
    /// The subscriber answered the offer that added it: packets flow.
    /// False while that offer is out.
    pub open: bool,
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

/// What the core asks of its driver. After every input, call
/// [`Sfu::poll_output`] until it returns `Timeout`.
#[derive(Debug)]
pub enum Output {
    /// Send a datagram.
    Transmit(Transmit),
    /// Tell a participant's signaling connection ([`SfuEvent::recipient`]).
    Event(SfuEvent),
    /// For the DSP pipelines: run a track's packet through its pipeline, or
    /// switch or close it. What a pipeline produces comes back through
    /// [`Sfu::handle_processed`].
    Audio(AudioCommand),
    /// Nothing more to do until this deadline; then call
    /// [`Sfu::handle_timeout`]. `None` while no participant has one (the
    /// core is empty).
    Timeout(Option<Instant>),
}

/// Work found while draining one participant that touches others. Queued so
/// only one participant is borrowed at a time.
#[derive(Debug)]
enum Work {
    /// A publisher's packet for its subscribers; audio says what it tells
    /// about its speaker, if anything.
    Forward { source: TrackKey, codec: Codec, packet: Box<Packet>, activity: Option<Activity> },
    /// Ask a publisher for a keyframe.
    KeyframeRequest { source: TrackKey, kind: KeyframeRequestKind },
    /// A subscriber asked for a keyframe on one of its m-lines.
    SubscriberKeyframeRequest { subscriber: ParticipantId, mid: Mid, kind: KeyframeRequestKind },
    /// The participant offers a new track.
    Publish { source: TrackKey, kind: MediaKind },
    Remove { participant: ParticipantId, reason: LeaveReason },
}

/// Everything draining a participant may write to, besides the participants.
#[derive(Debug)]
struct Queues {
    transmits: VecDeque<Transmit>,
    events: VecDeque<SfuEvent>,
    /// Commands for the DSP threads.
    audio: VecDeque<AudioCommand>,
    work: VecDeque<Work>,
    /// (deadline, participant); an entry is live only while it equals the
    /// participant's `wake_at`, so stale ones are skipped, never searched for.
    wakes: BinaryHeap<Reverse<(Instant, ParticipantId)>>,
    /// Subscribers written to since they were last drained, and the time of
    /// the latest input that wrote: drained once, in `poll_output`, however
    /// many packets the driver's receive batch wrote to each.
    written: Vec<ParticipantId>,
    written_at: Option<Instant>,
    stats: SfuStats,
    grace: Duration,
    /// `SfuConfig::dsp_queue_per_track`.
    dsp_queue: usize,
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
    demux: Demux,
    q: Queues,
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
        let dsp_queue = config.dsp_queue_per_track.max(1);
        Sfu {
            config,
            crypto,
            dtls_cert,
            rooms: HashMap::new(),
            participants: HashMap::new(),
            demux: Demux::default(),
            q: Queues {
                transmits: VecDeque::new(),
                events: VecDeque::new(),
                audio: VecDeque::new(),
                work: VecDeque::new(),
                wakes: BinaryHeap::new(),
                written: Vec::new(),
                written_at: None,
                stats: SfuStats::default(),
                grace,
                dsp_queue,
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
        check_fingerprint(&offer)?;
        self.check_tracks(&offer)?;

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

        let selector = SelectorConfig { slots: self.config.audio_slots.max(1), hold: self.config.speaker_hold, ..SelectorConfig::default() };
        let room_entry = self.rooms.entry(room.clone()).or_insert_with(|| {
            info!(%room, "room created");
            Room::new(room.clone(), SpeakerSelector::new(selector))
        });
        let slots = self.config.audio_slots;
        if slots > 0 && !room_entry.forwarding.is_slot_mode() && room_entry.members.len() + 1 > slots + 1 {
            self.enter_slot_mode(now, &room);
        }
        // Just created or found above.
        let room_entry = self.rooms.get_mut(&room).expect("room exists");
        let mut participant = Participant::new(id, room.clone(), name.clone(), rtc, rights, now, self.q.grace);
        let slot_mode = room_entry.forwarding.is_slot_mode();
        if slot_mode && rights.subscribe {
            room_entry.forwarding.add_slots(id, slots);
            participant.changes.extend((0..slots).map(Change::AddSlot));
        }
        let mut others = Vec::with_capacity(room_entry.members.len());
        for other_id in &room_entry.members {
            let other = &self.participants[other_id];
            others.push((*other_id, other.name.clone()));
            if !rights.subscribe {
                continue;
            }
            for (mid, track) in &other.tracks_in {
                if slot_mode && track.kind == MediaKind::Audio {
                    continue;
                }
                let source = TrackKey { publisher: *other_id, mid: *mid };
                participant.changes.push_back(Change::Add { source, kind: track.kind });
            }
            self.q.events.push_back(SfuEvent::ParticipantJoined { to: *other_id, participant: id, name: name.clone() });
        }
        room_entry.members.push(id);
        if !room_entry.announced.is_empty() {
            self.q.events.push_back(SfuEvent::ActiveSpeakers { to: id, speakers: room_entry.announced.clone() });
        }
        self.demux.insert_ufrag(participant.ufrag.clone(), id);
        info!(%room, participant = %id, %name, "participant joined");
        self.participants.insert(id, participant);
        if slot_mode {
            self.selection_changed(&room, Changed::default(), true);
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
        let opened = self.rooms.get_mut(&p.room).map(|room| room.forwarding.open(id)).unwrap_or_default();
        for (source, kind) in opened {
            // A new video subscriber needs a keyframe to start decoding.
            if kind == MediaKind::Video {
                self.q.work.push_back(Work::KeyframeRequest { source, kind: KeyframeRequestKind::Pli });
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
        if !self.participants.contains_key(&id) {
            return Err(SfuError::UnknownParticipant(id));
        }
        // Refused before it touches the session: the participant keeps the
        // media it has.
        self.check_tracks(&offer)?;
        let p = self.participants.get_mut(&id).ok_or(SfuError::UnknownParticipant(id))?;
        if p.pending_offer.take().is_some()
            && let Some(room) = self.rooms.get_mut(&p.room)
        {
            // Adds in the abandoned offer never reached the session: queue
            // them again. Stops did (str0m applies them at once).
            let (tracks, slots) = room.forwarding.abandon_offer(id);
            for index in slots.into_iter().rev() {
                p.changes.push_front(Change::AddSlot(index));
            }
            for (source, kind) in tracks {
                p.changes.push_front(Change::Add { source, kind });
            }
        }
        let result = p.rtc.sdp_api().accept_offer(offer).map_err(|e| SfuError::InvalidSdp(e.to_string()));
        // An ICE restart renews our credentials too: the STUN checks that
        // follow (from a new address, when the device moved) name the new
        // ufrag, and must find this participant.
        let ufrag = p.rtc.direct_api().local_ice_credentials().ufrag;
        if ufrag != p.ufrag {
            self.demux.replace_ufrag(id, &p.ufrag, ufrag.clone());
            p.ufrag = ufrag;
        }
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
                    && before != after
                {
                    let track = TrackKey { publisher: p.id, mid: *mid };
                    self.q.audio.push_back(AudioCommand::Suppress { track, on: after });
                }
                track.audio = next;
            }
        }
    }

    /// Feeds one received datagram. Anything unusable is dropped and counted.
    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, destination: SocketAddr, datagram: &[u8]) {
        self.q.stats.datagrams_in += 1;
        self.q.stats.bytes_in += datagram.len() as u64;
        if datagram.len() > self.config.max_datagram {
            self.q.stats.dropped.oversize += 1;
            return;
        }
        let kind = classify(datagram);
        let routed = match kind {
            DatagramKind::Stun => stun_local_ufrag(datagram).and_then(|u| self.demux.by_ufrag(u)).or_else(|| self.demux.by_addr(source)),
            DatagramKind::Dtls | DatagramKind::Rtp => self.demux.by_addr(source),
            DatagramKind::Unknown => {
                self.q.stats.dropped.malformed += 1;
                return;
            }
        };
        let Some(id) = routed else {
            trace!(%source, "datagram from unknown source");
            self.q.stats.dropped.unknown_source += 1;
            return;
        };
        // An address belongs to the participant ICE validated it for until
        // that one leaves: STUN naming someone else from it (a participant
        // replaying its own credentials from a spoofed source) would turn
        // the owner's media over to the wrong session.
        if kind == DatagramKind::Stun && self.demux.by_addr(source).is_some_and(|owner| owner != id) {
            self.q.stats.dropped.address_taken += 1;
            return;
        }
        let Some(p) = self.participants.get_mut(&id) else {
            self.q.stats.dropped.unknown_source += 1;
            return;
        };
        let Ok(contents) = datagram.try_into() else {
            self.q.stats.dropped.malformed += 1;
            return;
        };
        let input = Input::Receive(now, Receive { proto: Protocol::Udp, source, destination, contents });
        // Integrity-checks STUN (the ufrag alone is public: it travels in clear)
        // and takes other traffic only from addresses ICE validated, so nothing
        // unauthenticated claims an address or keeps a participant alive.
        if !p.rtc.accepts(&input) {
            trace!(participant = %id, %source, "datagram refused");
            self.q.stats.dropped.rejected += 1;
            return;
        }
        match p.rtc.handle_input(input) {
            Ok(()) => {
                p.timers.set(Timer::Silence, now + self.q.grace);
                if kind == DatagramKind::Stun && self.demux.insert_addr(source, id) {
                    p.addrs.push(source);
                }
            }
            Err(e) => {
                debug!(participant = %id, error = %e, "datagram rejected");
                self.q.stats.dropped.rejected += 1;
            }
        }
        self.drain(now, id);
        self.run_work(now);
    }

    /// Serves every participant timer due at `now` (see [`Timer`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        // Collected first: serving a timer may file the same participant
        // again for `now`, which waits for the next call.
        let mut due = Vec::new();
        while let Some(Reverse((at, id))) = self.q.wakes.peek().copied() {
            if at > now {
                break;
            }
            self.q.wakes.pop();
            if let Some(p) = self.participants.get_mut(&id).filter(|p| p.wake_at == Some(at)) {
                p.wake_at = None;
                due.push(id);
            }
        }
        for id in due {
            let Some(p) = self.participants.get_mut(&id) else { continue };
            let mut removal = None;
            while let Some(timer) = p.timers.expire(now) {
                match timer {
                    Timer::Silence | Timer::IceDisconnected => {
                        removal = Some(LeaveReason::IceTimeout);
                        break;
                    }
                    Timer::Rtc => {
                        if let Err(e) = p.rtc.handle_input(Input::Timeout(now)) {
                            warn!(participant = %id, error = %e, "rtc failed");
                            removal = Some(LeaveReason::Closed);
                            break;
                        }
                    }
                }
            }
            match removal {
                Some(reason) => self.remove_participant(now, id, reason),
                None => self.drain(now, id),
            }
        }
        self.run_work(now);
    }

    /// What a DSP pipeline produced for one [`AudioCommand::Process`] of
    /// `track`: call once per command, with nothing for a packet the
    /// pipeline dropped, so the track's queue bound counts it as answered.
    /// The packets are forwarded.
    pub fn handle_processed(&mut self, now: Instant, track: TrackKey, produced: impl IntoIterator<Item = ProcessedAudio>) {
        let Some(state) = self.participants.get_mut(&track.publisher).and_then(|p| p.tracks_in.get_mut(&track.mid)) else {
            return; // the publisher left while its packet was processed
        };
        state.dsp_pending = state.dsp_pending.saturating_sub(1);
        let Some(pt) = state.last_pt else { return };
        let level = state.last_level;
        for processed in produced {
            let activity = Activity::Speech { probability: processed.speech_probability, level };
            let packet = Packet {
                pt,
                seq: processed.seq,
                timestamp: processed.timestamp,
                marker: processed.marker,
                exts: ExtensionValues::default(),
                payload: processed.payload,
                arrived: processed.arrived,
            };
            self.forward(now, track, Codec::Opus, &packet, Some(activity));
        }
        self.run_work(now);
    }

    /// The next thing to do. Drain after every input until it says `Timeout`.
    pub fn poll_output(&mut self) -> Output {
        if let Some(now) = self.q.written_at.take() {
            self.drain_written(now);
        }
        if let Some(transmit) = self.q.transmits.pop_front() {
            return Output::Transmit(transmit);
        }
        if let Some(event) = self.q.events.pop_front() {
            return Output::Event(event);
        }
        if let Some(command) = self.q.audio.pop_front() {
            return Output::Audio(command);
        }
        // Stale wake-ups (the participant left, or was filed again) go here,
        // so the driver sleeps until a deadline someone still has.
        while let Some(Reverse((at, id))) = self.q.wakes.peek().copied() {
            if self.participants.get(&id).is_some_and(|p| p.wake_at == Some(at)) {
                return Output::Timeout(Some(at));
            }
            self.q.wakes.pop();
        }
        Output::Timeout(None)
    }

    /// The policy in force.
    pub fn policy(&self) -> &SuppressionPolicy {
        &self.config.suppression
    }

    /// Counts of everything the core holds, and traffic counters.
    pub fn stats(&self) -> SfuStats {
        let (addrs, ufrags) = self.demux.len();
        let audio_tracks = || self.participants.values().flat_map(|p| p.tracks_in.values()).filter(|t| t.kind == MediaKind::Audio);
        SfuStats {
            rooms: self.rooms.len(),
            participants: self.participants.len(),
            tracks: self.participants.values().map(|p| p.tracks_in.len()).sum(),
            forwarding_entries: self.rooms.values().map(|r| r.forwarding.track_outlets()).sum(),
            demux_entries: addrs + ufrags,
            processed_tracks: audio_tracks().filter(|t| matches!(t.audio, AudioPath::Pipeline { .. })).count(),
            suppressed_tracks: audio_tracks().filter(|t| t.audio == AudioPath::Pipeline { suppress: true }).count(),
            slot_rooms: self.rooms.values().filter(|r| r.forwarding.is_slot_mode()).count(),
            audio_slots: self.rooms.values().map(|r| r.forwarding.offered_slots()).sum(),
            speaking: self.rooms.values().map(|r| r.selector.speaking()).sum(),
            ..self.q.stats.clone()
        }
    }

    /// Who receives whom: every track outlet (one per published track and
    /// subscriber), sorted. Audio slots of slot rooms are not listed
    /// (`SfuStats::audio_slots` counts them). For audits: the controller's
    /// view of a call must match it.
    pub fn forwarding(&self) -> Vec<TrackOutlet> {
        let mut all: Vec<_> = self
            .rooms
            .values()
            .flat_map(|room| {
                room.forwarding.outlets().map(|(source, subscriber, open)| TrackOutlet {
                    room: room.id.clone(),
                    publisher: source.publisher,
                    subscriber,
                    open,
                })
            })
            .collect();
        all.sort();
        all
    }

    /// Participants per room.
    pub fn room_sizes(&self) -> Vec<(RoomId, usize)> {
        self.rooms.iter().map(|(id, room)| (id.clone(), room.members.len())).collect()
    }

    /// Drains one participant's `Rtc` (see [`drain`]).
    fn drain(&mut self, now: Instant, id: ParticipantId) {
        let Some(p) = self.participants.get_mut(&id) else { return };
        drain(now, p, &mut self.q);
    }

    /// Drains every subscriber written to since the last time: one pass
    /// over each `Rtc` per receive batch instead of one per packet.
    fn drain_written(&mut self, now: Instant) {
        let mut i = 0;
        while let Some(&id) = self.q.written.get(i) {
            i += 1;
            let Some(p) = self.participants.get_mut(&id) else { continue };
            p.written = false;
            drain(now, p, &mut self.q);
        }
        self.q.written.clear();
        self.run_work(now);
    }

    /// Offers the participant's queued changes, unless an offer is in flight.
    fn negotiate(&mut self, now: Instant, id: ParticipantId) {
        let Some(p) = self.participants.get_mut(&id) else { return };
        if p.pending_offer.is_some() || p.changes.is_empty() {
            return;
        }
        let Some(room) = self.rooms.get_mut(&p.room) else { return };
        let mut api = p.rtc.sdp_api();
        while let Some(change) = p.changes.pop_front() {
            match change {
                Change::Add { source, kind } => {
                    // The publisher may have left while this waited.
                    if !room.forwarding.is_published(source) {
                        continue;
                    }
                    let stream_id = source.publisher.to_string();
                    let track_id = format!("{}-{}", source.publisher, source.mid);
                    let mid = api.add_media(kind, Direction::SendOnly, Some(stream_id), Some(track_id), None);
                    room.forwarding.subscribe(source, kind, id, mid);
                }
                Change::Stop(mid) => api.stop_media(mid),
                Change::AddSlot(index) => {
                    let Some(slot) = room.forwarding.unoffered_slot(id, index) else { continue };
                    // The msid names the slot; who is in it travels as the CSRC.
                    let name = format!("slot-{index}");
                    slot.offer(api.add_media(MediaKind::Audio, Direction::SendOnly, Some(name.clone()), Some(name), None));
                }
            }
        }
        if let Some((offer, pending)) = api.apply() {
            debug!(participant = %id, "renegotiating");
            p.pending_offer = Some(pending);
            self.q.events.push_back(SfuEvent::Offer { participant: id, offer });
        }
        drain(now, p, &mut self.q);
    }

    fn run_work(&mut self, now: Instant) {
        while let Some(work) = self.q.work.pop_front() {
            match work {
                Work::Forward { source, codec, packet, activity } => self.forward(now, source, codec, &packet, activity),
                Work::KeyframeRequest { source, kind } => self.request_keyframe(now, source, kind),
                Work::SubscriberKeyframeRequest { subscriber, mid, kind } => {
                    let room = self.participants.get(&subscriber).and_then(|p| self.rooms.get(&p.room));
                    if let Some(source) = room.and_then(|r| r.forwarding.source_of(subscriber, mid)) {
                        self.request_keyframe(now, source, kind);
                    }
                }
                Work::Publish { source, kind } => self.publish(now, source, kind),
                Work::Remove { participant, reason } => self.remove_participant(now, participant, reason),
            }
        }
    }

    /// A participant offers a new track: it is refused without the right to
    /// publish; audio gets a DSP pipeline if the policy says so; the room's
    /// subscribers are offered it.
    fn publish(&mut self, now: Instant, source: TrackKey, kind: MediaKind) {
        let Some(p) = self.participants.get_mut(&source.publisher) else { return };
        let Some(room) = self.rooms.get_mut(&p.room) else { return };
        if room.forwarding.is_outlet(p.id, source.mid) || p.tracks_in.contains_key(&source.mid) {
            return; // one of ours, or known already
        }
        if !p.rights.publish {
            // Refused: no track, so nothing it sends on this m-line is
            // forwarded (counted as not permitted).
            warn!(participant = %p.id, mid = %source.mid, "track refused: the grant does not allow publishing");
            return;
        }
        let suppress = kind == MediaKind::Audio && self.config.suppression.applies(&p.room, &p.name);
        let audio = if suppress { AudioPath::Pipeline { suppress: true } } else { AudioPath::PassThrough };
        p.tracks_in.insert(source.mid, TrackIn { kind, audio, last_pt: None, last_level: None, last_keyframe_request: None, dsp_pending: 0 });
        debug!(participant = %p.id, mid = %source.mid, ?kind, "track published");
        room.forwarding.publish(source);
        let members = room.members.clone();
        if kind == MediaKind::Audio {
            let changed = room.selector.add(source);
            let slot_mode = room.forwarding.is_slot_mode();
            if changed.any() {
                let room_id = room.id.clone();
                self.selection_changed(&room_id, changed, slot_mode);
            }
            if slot_mode {
                return; // heard through the slots
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

    fn request_keyframe(&mut self, now: Instant, source: TrackKey, kind: KeyframeRequestKind) {
        let Some(p) = self.participants.get_mut(&source.publisher) else { return };
        let Some(track) = p.tracks_in.get_mut(&source.mid) else { return };
        if track.last_keyframe_request.is_some_and(|at| now.saturating_duration_since(at) < KEYFRAME_REQUEST_INTERVAL) {
            return;
        }
        track.last_keyframe_request = Some(now);
        if let Some(rx) = p.rtc.direct_api().stream_rx_by_mid(source.mid, None) {
            rx.request_keyframe(kind);
            self.q.stats.keyframe_requests_sent += 1;
        }
        drain(now, p, &mut self.q);
    }

    /// Forwards one publisher packet to its room: audio is first observed
    /// for speaker selection; then the room's forwarding names the outlets
    /// (the track's subscribers, or in a slot room the slots carrying it) and
    /// the packet is written into each subscriber's `Rtc`.
    fn forward(&mut self, now: Instant, source: TrackKey, codec: Codec, packet: &Packet, activity: Option<Activity>) {
        let Sfu { rooms, participants, q, .. } = self;
        let Some(room) = participants.get(&source.publisher).and_then(|p| rooms.get_mut(&p.room)) else { return };
        if let Some(activity) = activity {
            let changed = room.selector.observe(now, source, activity);
            if changed.any() {
                let reassign = changed.selection && room.forwarding.is_slot_mode();
                announce(room, changed, reassign, q);
            }
        }
        let kind = if codec.is_video() { MediaKind::Video } else { MediaKind::Audio };
        let reach = room.forwarding.each_outlet(source, kind, |subscriber, outlet| {
            let Some(sub) = participants.get_mut(&subscriber) else { return };
            if !outlet.write(&mut sub.rtc, source, codec, packet) {
                q.stats.dropped.unroutable += 1;
                return;
            }
            q.stats.rtp_forwarded += 1;
            if kind == MediaKind::Audio && sub.first_audio_at.is_none() {
                sub.first_audio_at = Some(now);
                q.stats.join_to_first_audio.observe(now.saturating_duration_since(sub.joined_at).as_secs_f64());
            }
            if !sub.written {
                sub.written = true;
                q.written.push(subscriber);
            }
            q.written_at = Some(q.written_at.map_or(now, |at| at.max(now)));
        });
        match reach {
            Reach::Tracks => {}
            Reach::Selected => q.stats.selection_forwarded += 1,
            Reach::NotSelected => q.stats.selection_suppressed += 1,
        }
    }

    /// After the room's selection changed (see [`Room::selection_changed`]).
    fn selection_changed(&mut self, room_id: &RoomId, changed: Changed, reassign: bool) {
        if let Some(room) = self.rooms.get_mut(room_id) {
            announce(room, changed, reassign, &mut self.q);
        }
    }

    /// The room grew past `audio_slots + 1`: every member trades its
    /// per-publisher audio m-lines for `audio_slots` slot m-lines, in one
    /// renegotiation. Video is untouched. Slot mode is sticky (see
    /// [`crate::room`]).
    fn enter_slot_mode(&mut self, now: Instant, room_id: &RoomId) {
        let Some(room) = self.rooms.get_mut(room_id) else { return };
        room.forwarding.enter_slot_mode();
        let members = room.members.clone();
        let slots = self.config.audio_slots;
        info!(room = %room_id, members = members.len(), slots, "room switches to audio slots");
        for member in &members {
            let Some(p) = self.participants.get_mut(member) else { continue };
            p.changes.extend(room.forwarding.take_audio_outlets(*member).into_iter().map(Change::Stop));
            p.changes.retain(|c| !matches!(c, Change::Add { kind: MediaKind::Audio, .. }));
            if p.rights.subscribe {
                room.forwarding.add_slots(*member, slots);
                p.changes.extend((0..slots).map(Change::AddSlot));
            }
        }
        for member in members {
            self.negotiate(now, member);
        }
        self.selection_changed(room_id, Changed::default(), true);
    }

    /// Removes a participant: its tracks from every subscriber, what it
    /// received, its demux keys and, when it was the last, its room.
    /// Everyone affected hears of it.
    fn remove_participant(&mut self, now: Instant, id: ParticipantId, reason: LeaveReason) {
        let Some(mut p) = self.participants.remove(&id) else { return };
        let _span = info_span!("participant", %id, room = %p.room).entered();
        info!(reason = reason.as_str(), "participant removed");
        *self.q.stats.removed.entry(reason.as_str()).or_default() += 1;
        p.rtc.disconnect();
        self.demux.remove(id, &p.ufrag, &p.addrs);
        for (mid, track) in &p.tracks_in {
            if matches!(track.audio, AudioPath::Pipeline { .. }) {
                self.q.audio.push_back(AudioCommand::Close { track: TrackKey { publisher: id, mid: *mid } });
            }
        }
        // Its own tracks: every subscriber stops the m-line carrying them.
        // Queued adds elsewhere for them are skipped in `negotiate`, as they
        // are no longer published.
        let mut stopped = Vec::new();
        if let Some(room) = self.rooms.get_mut(&p.room) {
            for mid in p.tracks_in.keys() {
                stopped.extend(room.forwarding.unpublish(TrackKey { publisher: id, mid: *mid }));
            }
            room.forwarding.remove_subscriber(id);
        }
        for (subscriber, mid) in stopped {
            let Some(sub) = self.participants.get_mut(&subscriber) else { continue };
            sub.changes.push_back(Change::Stop(mid));
            self.negotiate(now, subscriber);
        }

        let mut reselect = None;
        if let Some(room) = self.rooms.get_mut(&p.room) {
            room.members.retain(|m| *m != id);
            let mut changed = Changed::default();
            for (mid, track) in &p.tracks_in {
                if track.kind == MediaKind::Audio {
                    let c = room.selector.remove(TrackKey { publisher: id, mid: *mid });
                    changed.selection |= c.selection;
                    changed.dominant |= c.dominant;
                }
            }
            for member in &room.members {
                self.q.events.push_back(SfuEvent::ParticipantLeft { to: *member, participant: id, reason });
            }
            if room.members.is_empty() {
                self.rooms.remove(&p.room);
                info!(room = %p.room, "room removed");
            } else if changed.any() || room.forwarding.is_slot_mode() {
                // Slot rooms also give the leaver's places to others.
                reselect = Some((changed, room.forwarding.is_slot_mode()));
            }
        }
        if let Some((changed, reassign)) = reselect {
            self.selection_changed(&p.room, changed, reassign);
        }
        self.q.events.push_back(SfuEvent::Removed { participant: id, reason });
    }
}

/// Applies a change of a room's selection and tells its members the new
/// speakers, if they changed.
fn announce(room: &mut Room, changed: Changed, reassign: bool, q: &mut Queues) {
    let Some(speakers) = room.selection_changed(changed, reassign, &mut q.stats) else { return };
    debug!(room = %room.id, ?speakers, "active speakers");
    for member in &room.members {
        q.events.push_back(SfuEvent::ActiveSpeakers { to: *member, speakers: speakers.clone() });
    }
}

/// Timeouts already due that one drain serves itself before filing the rest.
const MAX_TIMEOUTS_AT_ONCE: usize = 2;

impl Sfu {
    /// Refuses an offer that publishes more tracks than a participant may.
    fn check_tracks(&self, offer: &SdpOffer) -> Result<(), SfuError> {
        let limit = self.config.max_tracks_per_participant;
        let offered = offer.media_lines.iter().filter(|m| matches!(m.direction(), Direction::SendRecv | Direction::SendOnly)).count();
        if offered > limit {
            return Err(SfuError::TooManyTracks { offered, limit });
        }
        Ok(())
    }
}

/// Refuses, at the join, an offer whose DTLS fingerprint the handshake
/// could never match: str0m checks only sha-256 and sha-1 and would accept
/// the offer, then drop the participant when DTLS completes. The one
/// checked is the one str0m uses (session level, else the first m-line).
/// A missing fingerprint str0m refuses itself.
fn check_fingerprint(offer: &SdpOffer) -> Result<(), SfuError> {
    let Some(fingerprint) = offer.session.fingerprint().or_else(|| offer.media_lines.iter().find_map(|m| m.fingerprint())) else {
        return Ok(());
    };
    let digest_len = match fingerprint.hash_func.to_ascii_lowercase().as_str() {
        "sha-256" => 32,
        "sha-1" => 20,
        other => return Err(SfuError::InvalidSdp(format!("DTLS fingerprint hash {other:?} is not supported (sha-256 or sha-1)"))),
    };
    if fingerprint.bytes.len() != digest_len {
        return Err(SfuError::InvalidSdp(format!(
            "DTLS fingerprint has {} bytes, {} needs {digest_len}",
            fingerprint.bytes.len(),
            fingerprint.hash_func
        )));
    }
    Ok(())
}

/// Drains one participant's `Rtc` to its next timeout, queueing work that
/// touches other participants, then files its next wake-up. A free function
/// so callers can hold other fields of the core.
fn drain(now: Instant, p: &mut Participant, q: &mut Queues) {
    let mut served_at_once = 0;
    loop {
        let output = match p.rtc.poll_output() {
            // str0m sends written RTP only after a timeout has stamped it, so
            // every write asks for a timeout now: serving it here saves a trip
            // through the timer heap (and a full poll) per forwarded packet.
            // Bounded, so an `Rtc` that keeps asking cannot hold the worker.
            Ok(str0m::Output::Timeout(at)) if at <= now && served_at_once < MAX_TIMEOUTS_AT_ONCE => {
                served_at_once += 1;
                p.rtc.handle_input(Input::Timeout(now)).and_then(|()| p.rtc.poll_output())
            }
            other => other,
        };
        let output = match output {
            Ok(output) => output,
            Err(e) => {
                warn!(participant = %p.id, error = %e, "rtc failed");
                q.work.push_back(Work::Remove { participant: p.id, reason: LeaveReason::Closed });
                p.timers.clear(Timer::Rtc);
                break;
            }
        };
        match output {
            str0m::Output::Timeout(at) => {
                p.timers.set(Timer::Rtc, at);
                break;
            }
            str0m::Output::Transmit(t) => {
                let contents: Vec<u8> = t.contents.into();
                q.stats.datagrams_out += 1;
                q.stats.bytes_out += contents.len() as u64;
                q.transmits.push_back(Transmit { source: t.source, destination: t.destination, contents });
            }
            str0m::Output::Event(event) => handle_event(now, p, event, q),
        }
    }
    if !p.rtc.is_alive() {
        q.work.push_back(Work::Remove { participant: p.id, reason: LeaveReason::Closed });
    }
    let wake = p.timers.next();
    if wake != p.wake_at {
        p.wake_at = wake;
        if let Some(at) = wake {
            q.wakes.push(Reverse((at, p.id)));
        }
    }
}

fn handle_event(now: Instant, p: &mut Participant, event: Event, q: &mut Queues) {
    match event {
        Event::Connected => {
            p.connected = true;
            info!(participant = %p.id, "media connected");
            q.events.push_back(SfuEvent::Connected { participant: p.id });
        }
        Event::IceConnectionStateChange(state) => {
            debug!(participant = %p.id, ?state, "ice state");
            match state {
                // Counted from the first report: a repeat does not restart it.
                IceConnectionState::Disconnected if p.timers.get(Timer::IceDisconnected).is_none() => {
                    p.timers.set(Timer::IceDisconnected, now + q.grace);
                }
                IceConnectionState::Connected | IceConnectionState::Completed => p.timers.clear(Timer::IceDisconnected),
                _ => {}
            }
        }
        // Our direction: receiving means the participant publishes here.
        Event::MediaAdded(media) if media.direction.is_receiving() => {
            q.work.push_back(Work::Publish { source: TrackKey { publisher: p.id, mid: media.mid }, kind: media.kind });
        }
        Event::RtpPacket(packet) => {
            let Some(mid) = p.mid_of(packet.header.ssrc) else {
                q.stats.dropped.unroutable += 1;
                return;
            };
            let Some(codec) = p.codec_of(packet.header.payload_type) else {
                q.stats.dropped.unroutable += 1;
                return;
            };
            let Some(track) = p.tracks_in.get_mut(&mid) else {
                if p.rights.publish {
                    q.stats.dropped.unroutable += 1;
                } else {
                    q.stats.dropped.not_permitted += 1;
                }
                return;
            };
            let pt = packet.header.payload_type;
            track.last_pt = Some(pt);
            track.last_level = packet.header.ext_vals.audio_level;
            let source = TrackKey { publisher: p.id, mid };
            if codec == Codec::Opus && matches!(track.audio, AudioPath::Pipeline { .. }) {
                if track.dsp_pending >= q.dsp_queue {
                    q.stats.dropped.dsp_overflow += 1;
                    return;
                }
                track.dsp_pending += 1;
                let packet = AudioPacket {
                    seq: *packet.seq_no,
                    timestamp: packet.header.timestamp,
                    marker: packet.header.marker,
                    payload: packet.payload,
                    arrived: packet.timestamp,
                };
                q.audio.push_back(AudioCommand::Process { track: source, packet });
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
            let packet = Packet {
                pt,
                seq: *packet.seq_no,
                timestamp: packet.header.timestamp,
                marker: packet.header.marker,
                exts,
                payload: packet.payload,
                arrived: packet.timestamp,
            };
            q.work.push_back(Work::Forward { source, codec, packet: Box::new(packet), activity });
        }
        Event::KeyframeRequest(request) => {
            q.work.push_back(Work::SubscriberKeyframeRequest { subscriber: p.id, mid: request.mid, kind: request.kind });
        }
        Event::Closed => q.work.push_back(Work::Remove { participant: p.id, reason: LeaveReason::Closed }),
        // Loss and RTT per outgoing stream from the participant's receiver
        // reports (str0m's per-peer figures need TWCC, which is not negotiated).
        Event::MediaEgressStats(stats) => {
            if let Some(rtt) = stats.rtt {
                q.stats.rtt.observe(rtt.as_secs_f64());
            }
            let keyframe_requests = stats.plis + stats.firs;
            let seen = p.egress_feedback.entry(stats.mid).or_default();
            q.stats.nacks_received += stats.nacks.saturating_sub(seen.nacks);
            q.stats.keyframe_requests_received += keyframe_requests.saturating_sub(seen.keyframe_requests);
            (seen.nacks, seen.keyframe_requests) = (stats.nacks, keyframe_requests);
            if let Some(remote) = stats.remote {
                let clock = if p.rtc.media(stats.mid).is_some_and(|m| m.kind() == MediaKind::Video) { 90_000.0 } else { 48_000.0 };
                q.stats.reported_jitter.observe(f64::from(remote.jitter) / clock);
                // Loss since the previous report we saw: cumulative counts, so
                // it holds however few reports came in between (audio: one per 5 s).
                let max_seq = *remote.maximum_sequence_number;
                let expected = max_seq.saturating_sub(seen.max_seq);
                if seen.max_seq > 0 && expected > 0 {
                    let lost = remote.packets_lost.saturating_sub(seen.lost).min(expected);
                    q.stats.reported_loss.observe(lost as f64 / expected as f64);
                }
                (seen.max_seq, seen.lost) = (max_seq, remote.packets_lost);
            }
        }
        _ => {}
    }
}
