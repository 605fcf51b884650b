//! One participant: its `str0m::Rtc`, what it publishes, where its SDP
//! negotiation stands, and its timers. What it receives is its room's
//! forwarding ([`crate::room`]).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::SdpPendingOffer;
use str0m::format::Codec;
use str0m::media::{MediaKind, Mid, Pt};
use str0m::rtp::Ssrc;
use str0m::Rtc;

use crate::ids::{ParticipantId, RoomId, TrackKey};
use crate::timer::{Timer, Timers};

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

/// What happens to a published audio track's packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AudioPath {
    /// Forwarded as received.
    PassThrough,
    /// Through a DSP pipeline; `suppress` says whether it denoises. Once a
    /// track has a pipeline it keeps it, so a policy change fades instead
    /// of jumping between the two paths' different delays.
    Pipeline { suppress: bool },
}

/// An incoming track this participant publishes.
#[derive(Debug)]
pub(crate) struct TrackIn {
    pub kind: MediaKind,
    /// Audio only.
    pub audio: AudioPath,
    /// The publisher's payload type for this track, from its latest packet.
    pub last_pt: Option<Pt>,
    /// Audio: the RFC 6464 level of its latest packet, if it sends one.
    pub last_level: Option<i8>,
    /// Last keyframe request sent upstream, to throttle PLI storms.
    pub last_keyframe_request: Option<Instant>,
    /// Audio packets handed to the DSP pipeline and not answered yet.
    pub dsp_pending: usize,
}

/// A change to this participant's session that needs an SDP offer.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Change {
    /// Start receiving a track published by someone else.
    Add { source: TrackKey, kind: MediaKind },
    /// Stop an outgoing m-line whose publisher left (or, audio, that the
    /// room's switch to slots replaces).
    Stop(Mid),
    /// Add audio slot number `.0` of its room's forwarding.
    AddSlot(usize),
}

#[derive(Debug)]
pub(crate) struct Participant {
    pub id: ParticipantId,
    pub room: RoomId,
    pub name: String,
    pub rtc: Rtc,
    /// What its grant lets it do with media.
    pub rights: Rights,
    /// Our ICE ufrag for this participant: its demux key.
    pub ufrag: String,
    /// Remote addresses pointing at this participant in the demux.
    pub addrs: Vec<SocketAddr>,
    pub tracks_in: HashMap<Mid, TrackIn>,
    /// Incoming SSRC -> mid, learned from str0m on the first packet.
    pub ssrc_mid: HashMap<Ssrc, Mid>,
    /// Codec of an incoming payload type, cached per participant.
    pub pt_codec: HashMap<Pt, Codec>,
    pub changes: VecDeque<Change>,
    pub pending_offer: Option<SdpPendingOffer>,
    /// ICE + DTLS up at least once.
    pub connected: bool,
    /// When it joined, and when it was first sent audio (join-to-first-audio).
    pub joined_at: Instant,
    pub first_audio_at: Option<Instant>,
    /// What the participant's feedback last said per outgoing m-line, to
    /// count only what is new in each stats event.
    pub egress_feedback: HashMap<Mid, EgressFeedback>,
    pub timers: Timers,
    /// The deadline this participant is filed under in the core's wake-ups.
    pub wake_at: Option<Instant>,
    /// Written to and waiting in the core's list of `Rtc`s to drain.
    pub written: bool,
}

/// Cumulative feedback counts for one outgoing m-line, as last seen.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EgressFeedback {
    pub nacks: u64,
    pub keyframe_requests: u64,
    /// Highest sequence number and packets lost from the last receiver report.
    pub max_seq: u64,
    pub lost: u64,
}

impl Participant {
    /// A participant whose `Rtc` is due at once and who must send a
    /// datagram within `grace`.
    pub(crate) fn new(id: ParticipantId, room: RoomId, name: String, mut rtc: Rtc, rights: Rights, now: Instant, grace: Duration) -> Self {
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        let mut timers = Timers::default();
        timers.set(Timer::Rtc, now);
        timers.set(Timer::Silence, now + grace);
        Participant {
            id,
            room,
            name,
            rtc,
            ufrag,
            rights,
            addrs: Vec::new(),
            tracks_in: HashMap::new(),
            ssrc_mid: HashMap::new(),
            pt_codec: HashMap::new(),
            changes: VecDeque::new(),
            pending_offer: None,
            connected: false,
            joined_at: now,
            first_audio_at: None,
            egress_feedback: HashMap::new(),
            timers,
            wake_at: None,
            written: false,
        }
    }

    /// The incoming mid of an SSRC, asking str0m once per new SSRC.
    pub(crate) fn mid_of(&mut self, ssrc: Ssrc) -> Option<Mid> {
        if let Some(mid) = self.ssrc_mid.get(&ssrc) {
            return Some(*mid);
        }
        let mid = self.rtc.direct_api().stream_rx(&ssrc)?.mid();
        self.ssrc_mid.insert(ssrc, mid);
        Some(mid)
    }

    /// The codec behind an incoming payload type.
    pub(crate) fn codec_of(&mut self, pt: Pt) -> Option<Codec> {
        if let Some(codec) = self.pt_codec.get(&pt) {
            return Some(*codec);
        }
        let codec = self.rtc.codec_config().params().iter().find(|p| p.pt() == pt)?.spec().codec;
        self.pt_codec.insert(pt, codec);
        Some(codec)
    }
}
