//! The sans-IO media peer: one str0m `Rtc` as a WebRTC client (full ICE,
//! DTLS-SRTP) that offers one `sendonly` Opus track (and optionally one VP8
//! track), answers the server's renegotiation offers, and reports what it
//! receives per remote track.
//!
//! Like str0m itself: after every input (a datagram, a timeout, a command)
//! drain [`Peer::poll_output`] until it says [`Output::Timeout`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaData, MediaKind, MediaTime, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RawPacket, RtpHeader, RtpWrite, Ssrc};
use str0m::{Candidate, Event, IceConnectionState, Input, Rtc};
use tracing::{debug, trace, warn};

use crate::{DtlsIdentity, PeerError};

/// One audio frame: callers send one every 20 ms.
pub const FRAME: Duration = Duration::from_millis(20);
/// RTP ticks of one 20 ms Opus frame at 48 kHz.
pub const FRAME_TICKS: u32 = 960;
/// RTP ticks of 20 ms of video at 90 kHz (one video frame per audio frame).
const VIDEO_FRAME_TICKS: u64 = 1800;

/// How the peer hands media to and from str0m.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// str0m packetizes what is sent and reassembles what is received
    /// ([`PeerEvent::Frame`]): devices, and tests that send video.
    #[default]
    Frames,
    /// Raw RTP both ways: the peer numbers and marks its packets and
    /// reports every received packet with its header ([`PeerEvent::Packet`]),
    /// with no jitter buffer between the wire and the caller's clock: the
    /// load tester.
    Rtp,
}

/// How to build a [`Peer`].
#[derive(Debug, Clone, Default)]
pub struct PeerConfig {
    /// Frames or raw RTP.
    pub mode: Mode,
    /// Also offer a `sendonly` VP8 track ([`Peer::send_video`]; frame mode).
    pub send_video: bool,
    /// Accept the server's VP8 tracks (without, only audio is negotiated).
    pub receive_video: bool,
    /// Frame mode: also report every received RTP packet with its header
    /// ([`PeerEvent::Packet`]).
    pub record_rtp: bool,
    /// The RTP timestamp of the first audio frame.
    pub first_timestamp: u32,
    /// The sequence number of the first audio packet (RTP mode; kept below
    /// 2^15 so the stream starts far from a wrap).
    pub first_seq: u16,
}

/// An RFC 6464 audio level sent with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioLevel {
    /// -127 (silence) ..= 0 dBov, as str0m carries it.
    pub dbov: i8,
    /// The voice-activity flag.
    pub voice: bool,
}

/// One 20 ms audio frame to send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AudioFrame {
    /// The Opus packet; `None` for a DTX frame: nothing is sent, the RTP
    /// clock moves on.
    pub payload: Option<Arc<[u8]>>,
    /// The level to send along, if any.
    pub level: Option<AudioLevel>,
}

/// What became of a frame handed to [`Peer::send_audio`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Written with this RTP timestamp.
    Written {
        /// The frame's RTP timestamp.
        timestamp: u32,
    },
    /// A DTX frame: nothing to send (time still moves on).
    Dtx,
    /// Not connected yet (or failed): dropped.
    NotConnected,
}

/// A frame reassembled from a remote track (frame mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFrame {
    /// The remote track's msid stream id (fleetcall: the publisher's
    /// participant number, or `slot-N`).
    pub stream: Arc<str>,
    /// Audio or video.
    pub kind: MediaKind,
    /// The frame's payload (an Opus packet for audio).
    pub payload: Arc<[u8]>,
    /// The extended sequence number of its first packet.
    pub seq: u64,
    /// RTP timestamp in the track's clock (48 kHz for Opus), as the sender
    /// stamped it.
    pub rtp_time: u64,
    /// When its first datagram arrived.
    pub arrival: Instant,
}

/// An RTP packet received on a remote track (RTP mode, or frame mode with
/// [`PeerConfig::record_rtp`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedPacket {
    /// The remote track's msid stream id.
    pub stream: Arc<str>,
    /// The packet's SSRC.
    pub ssrc: u32,
    /// The first CSRC, if any (fleetcall slots: the speaker).
    pub csrc: Option<u32>,
    /// RTP sequence number (16 bits).
    pub seq: u16,
    /// RTP timestamp.
    pub timestamp: u32,
    /// The marker bit.
    pub marker: bool,
    /// The payload.
    pub payload: Arc<[u8]>,
    /// RFC 6464 level, if the packet carried one.
    pub level: Option<i8>,
}

/// What a peer reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerEvent {
    /// ICE and DTLS are up (again): media can flow.
    Connected,
    /// ICE lost the server (it may come back).
    Disconnected,
    /// A remote track was negotiated.
    StreamAdded {
        /// Its msid stream id.
        stream: Arc<str>,
    },
    /// A frame from a remote track (frame mode).
    Frame(ReceivedFrame),
    /// A packet from a remote track (RTP mode, or recorded).
    Packet(ReceivedPacket),
    /// The server asked our video track for a keyframe.
    KeyframeRequest,
    /// The WebRTC session failed for good; the peer stops.
    Failed(String),
}

/// Counters of one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerStats {
    /// ICE and DTLS are up.
    pub connected: bool,
    /// Audio frames written to the network.
    pub frames_sent: u64,
    /// Audio frames dropped because the peer was not connected yet.
    pub frames_unsent: u64,
    /// Frames (frame mode) or packets (RTP mode) received, all streams.
    pub frames_received: u64,
    /// Of those, per remote stream id.
    pub received_by_stream: BTreeMap<String, u64>,
    /// Keyframe requests for our video track.
    pub keyframe_requests: u64,
    /// Datagrams the WebRTC stack refused.
    pub datagrams_rejected: u64,
    /// Events lost because the application did not keep up (the
    /// [`MediaPeer`](crate::MediaPeer) driver only).
    pub events_dropped: u64,
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Where to.
    pub destination: SocketAddr,
    /// The bytes.
    pub contents: Vec<u8>,
}

/// What the peer asks of its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send this datagram from the peer's socket.
    Transmit(Datagram),
    /// Something happened.
    Event(PeerEvent),
    /// Nothing more to do until this time (call [`Peer::handle_timeout`]
    /// then) or the next input; `None` once the peer has failed.
    Timeout(Option<Instant>),
}

/// The track this peer publishes.
#[derive(Debug, Clone, Copy)]
struct Track {
    mid: Mid,
    /// Learned from the answer on the first write.
    pt: Option<Pt>,
    /// RTP time of the next frame, in the track's clock.
    next_time: u64,
}

/// The sans-IO media peer. See the [module docs](self).
pub struct Peer {
    rtc: Rtc,
    local: SocketAddr,
    config: PeerConfig,
    audio: Option<Track>,
    video: Option<Track>,
    pending: Option<SdpPendingOffer>,
    /// RTP mode: the extended sequence number of the next audio packet.
    next_seq: u64,
    /// RTP mode: the previous frame was sent (not DTX), so no marker on
    /// the next.
    in_spurt: bool,
    /// Remote tracks by mid: msid stream id and kind.
    streams: HashMap<Mid, (Arc<str>, MediaKind)>,
    /// Remote SSRCs seen in RTP packets, by mid.
    ssrc_mid: HashMap<Ssrc, Mid>,
    /// DTLS completed once: a later ICE reconnect means connected again.
    dtls_up: bool,
    failed: bool,
    timeout: Instant,
    outputs: VecDeque<Output>,
    stats: PeerStats,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("local", &self.local)
            .field("mode", &self.config.mode)
            .field("connected", &self.stats.connected)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Peer {
    /// A peer whose datagrams come from and go to `local` (a concrete
    /// address: it becomes the ICE host candidate).
    pub fn new(
        now: Instant,
        local: SocketAddr,
        identity: &DtlsIdentity,
        config: PeerConfig,
    ) -> Result<Self, PeerError> {
        let mut rtc = Rtc::builder()
            .set_rtp_mode(config.mode == Mode::Rtp)
            .enable_raw_packets(config.record_rtp && config.mode == Mode::Frames)
            .set_crypto_provider(identity.crypto.clone())
            .set_dtls_cert(identity.cert.clone())
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(config.send_video || config.receive_video)
            .build(now);
        let candidate = Candidate::host(local, "udp")
            .map_err(|e| PeerError::State(format!("local candidate {local}: {e}")))?;
        rtc.add_local_candidate(candidate);
        Ok(Peer {
            rtc,
            local,
            next_seq: u64::from(config.first_seq & 0x7fff),
            config,
            audio: None,
            video: None,
            pending: None,
            in_spurt: false,
            streams: HashMap::new(),
            ssrc_mid: HashMap::new(),
            dtls_up: false,
            failed: false,
            timeout: now,
            outputs: VecDeque::new(),
            stats: PeerStats::default(),
        })
    }

    /// The join offer: one `sendonly` Opus m-line (and a VP8 one with
    /// [`PeerConfig::send_video`]). Only once per peer.
    pub fn create_offer(&mut self, now: Instant) -> Result<String, PeerError> {
        if self.audio.is_some() {
            return Err(PeerError::State("the join offer was already created".into()));
        }
        let mut api = self.rtc.sdp_api();
        let audio = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        let video = self
            .config
            .send_video
            .then(|| api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None));
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| PeerError::State("nothing to offer".into()))?;
        let first = u64::from(self.config.first_timestamp);
        self.audio = Some(Track { mid: audio, pt: None, next_time: first });
        self.video = video.map(|mid| Track { mid, pt: None, next_time: 0 });
        self.pending = Some(pending);
        self.drain(now);
        Ok(offer.to_sdp_string())
    }

    /// An ICE restart offer (fresh credentials, the same tracks), for when
    /// the path to the server changed; apply the answer with
    /// [`accept_answer`](Self::accept_answer).
    pub fn restart_ice(&mut self, now: Instant) -> Result<String, PeerError> {
        if self.audio.is_none() {
            return Err(PeerError::State("no session to restart: create the join offer first".into()));
        }
        // One offer at a time: a second would replace the first here while
        // the server still answers both, in order.
        if self.pending.is_some() {
            return Err(PeerError::State("an offer of ours is pending: restart once it is answered".into()));
        }
        let mut api = self.rtc.sdp_api();
        api.ice_restart(true);
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| PeerError::State("nothing to offer".into()))?;
        self.pending = Some(pending);
        self.drain(now);
        Ok(offer.to_sdp_string())
    }

    /// The device's address changed: datagrams now come from and go to
    /// `local`, a new host candidate; returns the ICE restart offer that
    /// tells the server (apply its answer with
    /// [`accept_answer`](Self::accept_answer)). The old candidate stays in
    /// the offer; its pairs simply fail.
    pub fn move_to(&mut self, now: Instant, local: SocketAddr) -> Result<String, PeerError> {
        let candidate = Candidate::host(local, "udp")
            .map_err(|e| PeerError::State(format!("local candidate {local}: {e}")))?;
        self.rtc.add_local_candidate(candidate);
        self.local = local;
        self.restart_ice(now)
    }

    /// Applies the server's answer to the join offer or an ICE restart.
    pub fn accept_answer(&mut self, now: Instant, sdp: &str) -> Result<(), PeerError> {
        let answer =
            SdpAnswer::from_sdp_string(sdp).map_err(|e| PeerError::InvalidSdp(e.to_string()))?;
        let pending = self
            .pending
            .take()
            .ok_or_else(|| PeerError::State("no offer of ours is pending".into()))?;
        let result = self.rtc.sdp_api().accept_answer(pending, answer);
        self.drain(now);
        result.map_err(|e| PeerError::InvalidSdp(e.to_string()))
    }

    /// Answers a server offer (a renegotiation, or a subscription).
    ///
    /// Refused while an offer of ours is pending (glare: our ICE restart
    /// crossed the server's offer). Ours wins: the server cancels its offer
    /// when ours arrives and offers again once it answered. Accepting the
    /// server's offer here would roll ours back on this side only, and the
    /// two sides would disagree about the session from then on.
    pub fn accept_offer(&mut self, now: Instant, sdp: &str) -> Result<String, PeerError> {
        if self.pending.is_some() {
            return Err(PeerError::State("an offer of ours is pending: it supersedes the server's offer".into()));
        }
        let offer =
            SdpOffer::from_sdp_string(sdp).map_err(|e| PeerError::InvalidSdp(e.to_string()))?;
        let result = self.rtc.sdp_api().accept_offer(offer);
        self.drain(now);
        Ok(result
            .map_err(|e| PeerError::InvalidSdp(e.to_string()))?
            .to_sdp_string())
    }

    /// Sends one 20 ms Opus frame; the RTP clock moves on by
    /// [`FRAME_TICKS`] whatever becomes of it.
    pub fn send_audio(&mut self, now: Instant, frame: &AudioFrame) -> Sent {
        let Some(track) = &mut self.audio else {
            return Sent::NotConnected;
        };
        let time = track.next_time;
        track.next_time += u64::from(FRAME_TICKS);
        // The wire carries 32 bits; the clock wraps there.
        let timestamp = time as u32;
        let Some(payload) = &frame.payload else {
            self.in_spurt = false;
            return Sent::Dtx;
        };
        let written = self.stats.connected
            && !self.failed
            && match self.config.mode {
                Mode::Frames => self.write_frame(now, time, payload, frame.level),
                Mode::Rtp => self.write_rtp(now, timestamp, payload, frame.level),
            };
        if !written {
            self.stats.frames_unsent += 1;
            return Sent::NotConnected;
        }
        self.stats.frames_sent += 1;
        self.drain(now);
        Sent::Written { timestamp }
    }

    /// [`send_audio`](Self::send_audio) of an Opus packet without a level.
    pub fn send_opus(&mut self, now: Instant, payload: &[u8]) -> Sent {
        let frame = AudioFrame { payload: Some(payload.into()), level: None };
        self.send_audio(now, &frame)
    }

    /// Sends one video frame on the VP8 track (frame mode, with
    /// [`PeerConfig::send_video`]); its RTP time moves on by 20 ms per call.
    /// False: not sent (no video track, not connected, refused).
    pub fn send_video(&mut self, now: Instant, payload: &[u8]) -> bool {
        let Some(track) = &mut self.video else {
            return false;
        };
        let time = track.next_time;
        track.next_time += VIDEO_FRAME_TICKS;
        if !self.stats.connected || self.failed || self.config.mode != Mode::Frames {
            return false;
        }
        let written = self.write_video(now, time, payload);
        self.drain(now);
        written
    }

    fn write_frame(&mut self, now: Instant, time: u64, payload: &Arc<[u8]>, level: Option<AudioLevel>) -> bool {
        let Some(pt) = self.pt(Codec::Opus) else {
            return false;
        };
        let Some(mut writer) = self.audio.and_then(|t| self.rtc.writer(t.mid)) else {
            return false;
        };
        if let Some(level) = level {
            writer = writer.audio_level(level.dbov, level.voice);
        }
        let time = MediaTime::new(time, Frequency::FORTY_EIGHT_KHZ);
        match writer.write(pt, now, time, payload.clone()) {
            Ok(()) => true,
            Err(e) => {
                debug!(error = %e, "frame not written");
                false
            }
        }
    }

    fn write_rtp(&mut self, now: Instant, timestamp: u32, payload: &Arc<[u8]>, level: Option<AudioLevel>) -> bool {
        let Some(pt) = self.pt(Codec::Opus) else {
            return false;
        };
        let Some(mid) = self.audio.map(|t| t.mid) else {
            return false;
        };
        let exts = ExtensionValues {
            audio_level: level.map(|l| l.dbov),
            voice_activity: level.map(|l| l.voice),
            ..Default::default()
        };
        let mut api = self.rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, None) else {
            return false;
        };
        // A talk spurt starts with the marker bit (RFC 3551).
        let write = RtpWrite::new(pt, self.next_seq.into(), timestamp, now, payload.clone())
            .marker(!self.in_spurt)
            .ext_vals(exts);
        tx.write_rtp(write);
        self.next_seq += 1;
        self.in_spurt = true;
        true
    }

    fn write_video(&mut self, now: Instant, time: u64, payload: &[u8]) -> bool {
        let Some(pt) = self.pt(Codec::Vp8) else {
            return false;
        };
        let Some(writer) = self.video.and_then(|t| self.rtc.writer(t.mid)) else {
            return false;
        };
        let time = MediaTime::new(time, Frequency::NINETY_KHZ);
        match writer.write(pt, now, time, payload.to_vec()) {
            Ok(()) => true,
            Err(e) => {
                debug!(error = %e, "video frame not written");
                false
            }
        }
    }

    /// The payload type the server accepted for `codec` on our track of
    /// its kind, remembered once known.
    fn pt(&mut self, codec: Codec) -> Option<Pt> {
        let track = if codec == Codec::Opus { self.audio.as_mut()? } else { self.video.as_mut()? };
        if track.pt.is_none() {
            let media = self.rtc.media(track.mid)?;
            let params = self.rtc.codec_config().params();
            track.pt = media
                .remote_pts()
                .iter()
                .copied()
                .find(|pt| params.iter().any(|p| p.pt() == *pt && p.spec().codec == codec));
        }
        track.pt
    }

    /// A datagram arrived on the peer's socket.
    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, contents: &[u8]) {
        if self.failed {
            return;
        }
        let Ok(contents) = contents.try_into() else {
            self.stats.datagrams_rejected += 1;
            return;
        };
        let input = Input::Receive(
            now,
            Receive { proto: Protocol::Udp, source, destination: self.local, contents },
        );
        if let Err(e) = self.rtc.handle_input(input) {
            trace!(error = %e, "datagram refused");
            self.stats.datagrams_rejected += 1;
        }
        self.drain(now);
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.failed {
            return;
        }
        if let Err(e) = self.rtc.handle_input(Input::Timeout(now)) {
            self.fail(format!("timeout handling failed: {e}"));
            return;
        }
        self.drain(now);
    }

    /// The next thing to do; [`Output::Timeout`] when there is nothing.
    pub fn poll_output(&mut self) -> Output {
        self.outputs
            .pop_front()
            .unwrap_or_else(|| Output::Timeout(self.poll_timeout()))
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due (what
    /// [`Output::Timeout`] says); `None` once the peer has failed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.failed).then_some(self.timeout)
    }

    /// The counters.
    pub fn stats(&self) -> &PeerStats {
        &self.stats
    }

    /// ICE and DTLS are up.
    pub fn is_connected(&self) -> bool {
        self.stats.connected
    }

    /// The local address (the ICE host candidate).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Runs the WebRTC session to its next deadline.
    fn drain(&mut self, now: Instant) {
        while !self.failed {
            let output = match self.rtc.poll_output() {
                Ok(output) => output,
                Err(e) => {
                    self.fail(format!("WebRTC session failed: {e}"));
                    return;
                }
            };
            match output {
                str0m::Output::Timeout(at) => {
                    // str0m may ask for "now" again; never stand still.
                    self.timeout = at.max(now);
                    return;
                }
                str0m::Output::Transmit(t) => self.outputs.push_back(Output::Transmit(Datagram {
                    destination: t.destination,
                    contents: t.contents.into(),
                })),
                str0m::Output::Event(event) => self.on_event(event),
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected => {
                self.dtls_up = true;
                self.stats.connected = true;
                self.emit(PeerEvent::Connected);
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected)
                if self.stats.connected =>
            {
                self.stats.connected = false;
                self.emit(PeerEvent::Disconnected);
            }
            Event::IceConnectionStateChange(
                IceConnectionState::Connected | IceConnectionState::Completed,
            ) if !self.stats.connected && self.dtls_up => {
                // Back after a disconnect.
                self.stats.connected = true;
                self.emit(PeerEvent::Connected);
            }
            Event::MediaAdded(added) if !self.is_ours(added.mid) => {
                let (stream, _) = self.stream_of(added.mid);
                self.emit(PeerEvent::StreamAdded { stream });
            }
            Event::MediaData(data) if !self.is_ours(data.mid) => self.on_frame(data),
            Event::RtpPacket(packet) => self.on_packet(&packet.header, packet.payload),
            Event::RawPacket(raw) => {
                if let RawPacket::RtpRx(header, payload) = *raw {
                    self.on_packet(&header, payload.into());
                }
            }
            Event::KeyframeRequest(_) => {
                self.stats.keyframe_requests += 1;
                self.emit(PeerEvent::KeyframeRequest);
            }
            _ => {}
        }
    }

    fn on_frame(&mut self, data: MediaData) {
        let (stream, kind) = self.stream_of(data.mid);
        self.count_received(&stream);
        self.emit(PeerEvent::Frame(ReceivedFrame {
            stream,
            kind,
            payload: data.data,
            seq: **data.seq_range.start(),
            rtp_time: data.time.numer(),
            arrival: data.network_time,
        }));
    }

    fn on_packet(&mut self, header: &RtpHeader, payload: Arc<[u8]>) {
        let ssrc = header.ssrc;
        let mid = match self.ssrc_mid.get(&ssrc) {
            Some(mid) => *mid,
            None => {
                // A packet of no negotiated track is not reported.
                let Some(mid) = self.rtc.direct_api().stream_rx(&ssrc).map(|rx| rx.mid()) else {
                    return;
                };
                self.ssrc_mid.insert(ssrc, mid);
                mid
            }
        };
        let (stream, _) = self.stream_of(mid);
        if self.config.mode == Mode::Rtp {
            // Recorded packets (frame mode) are counted as frames.
            self.count_received(&stream);
        }
        self.emit(PeerEvent::Packet(ReceivedPacket {
            stream,
            ssrc: *ssrc,
            csrc: (header.csrc_count > 0).then_some(header.csrc[0]),
            seq: header.sequence_number,
            timestamp: header.timestamp,
            marker: header.marker,
            payload,
            level: header.ext_vals.audio_level,
        }));
    }

    fn count_received(&mut self, stream: &str) {
        self.stats.frames_received += 1;
        match self.stats.received_by_stream.get_mut(stream) {
            Some(n) => *n += 1,
            None => {
                self.stats.received_by_stream.insert(stream.to_owned(), 1);
            }
        }
    }

    fn is_ours(&self, mid: Mid) -> bool {
        [self.audio, self.video].iter().flatten().any(|t| t.mid == mid)
    }

    fn stream_of(&mut self, mid: Mid) -> (Arc<str>, MediaKind) {
        if let Some(known) = self.streams.get(&mid) {
            return known.clone();
        }
        let known: (Arc<str>, MediaKind) = match self.rtc.media(mid) {
            Some(media) => (media.stream_id().into(), media.kind()),
            None => (mid.to_string().into(), MediaKind::Audio),
        };
        self.streams.insert(mid, known.clone());
        known
    }

    fn emit(&mut self, event: PeerEvent) {
        self.outputs.push_back(Output::Event(event));
    }

    fn fail(&mut self, reason: String) {
        warn!(%reason, "media peer failed");
        self.failed = true;
        self.stats.connected = false;
        self.emit(PeerEvent::Failed(reason));
    }
}
