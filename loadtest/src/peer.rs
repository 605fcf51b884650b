//! The WebRTC side of a simulated device: one str0m `Rtc` in RTP mode
//! (full ICE, DTLS-SRTP) that publishes one Opus track with RFC 6464 audio
//! levels and hands on every RTP packet it receives with its header.
//!
//! Sans-IO like the server's cores: datagrams, timeouts and commands in;
//! datagrams, [`PeerEvent`]s and the next deadline out. RTP mode (not frame
//! mode) because the load tester needs the raw header (sequence number,
//! timestamp, CSRC) and no jitter buffer between the wire and its clock.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::config::{CryptoProvider, DtlsCert};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpWrite, Ssrc};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};

use crate::audio::ClipFrame;

/// RTP ticks of one 20 ms Opus frame at 48 kHz.
pub const FRAME_TICKS: u32 = 960;

/// One DTLS certificate and crypto provider for every peer of the tool:
/// generating a certificate costs over a millisecond per peer.
#[derive(Clone)]
pub struct PeerFactory {
    crypto: Arc<CryptoProvider>,
    cert: DtlsCert,
}

impl std::fmt::Debug for PeerFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerFactory")
    }
}

impl PeerFactory {
    /// Generates the shared certificate.
    pub fn new() -> anyhow::Result<Self> {
        let crypto = Arc::new(str0m::crypto::from_feature_flags());
        let cert = crypto
            .dtls_provider
            .generate_certificate()
            .context("DTLS certificate")?;
        Ok(PeerFactory { crypto, cert })
    }

    /// A peer whose datagrams come from `local` (its ICE host candidate).
    /// `ts_base` is the RTP timestamp of its first frame.
    pub fn peer(
        &self,
        now: Instant,
        local: SocketAddr,
        ts_base: u32,
        seq_base: u16,
    ) -> anyhow::Result<Peer> {
        let mut rtc = Rtc::builder()
            .set_rtp_mode(true)
            .set_crypto_provider(self.crypto.clone())
            .set_dtls_cert(self.cert.clone())
            .clear_codecs()
            .enable_opus(true, false)
            .set_stats_interval(None)
            .build(now);
        let candidate =
            Candidate::host(local, "udp").map_err(|e| anyhow!("local candidate {local}: {e}"))?;
        rtc.add_local_candidate(candidate);
        Ok(Peer {
            rtc,
            local,
            audio_mid: None,
            pt: None,
            pending: None,
            next_ts: ts_base,
            next_seq: u64::from(seq_base & 0x7fff),
            in_spurt: false,
            ssrc_mid: HashMap::new(),
            streams: HashMap::new(),
            connected: false,
            dtls_up: false,
            failed: false,
            timeout: now,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            rejected: 0,
        })
    }
}

/// An RTP packet received from a remote track.
#[derive(Debug, Clone)]
pub struct Received {
    /// The remote track's msid stream id (fleetcall: the publisher's
    /// participant number, or `slot-N`).
    pub stream: Arc<str>,
    /// The first CSRC, if any (fleetcall slots: the speaker).
    pub csrc: Option<u32>,
    /// RTP sequence number (16 bits).
    pub seq: u16,
    /// RTP timestamp.
    pub timestamp: u32,
    /// The marker bit.
    pub marker: bool,
    /// The Opus packet.
    pub payload: Arc<[u8]>,
    /// RFC 6464 level, if the packet carried one.
    pub level: Option<i8>,
}

/// What a peer reports.
#[derive(Debug, Clone)]
pub enum PeerEvent {
    /// ICE and DTLS are up (again).
    Connected,
    /// ICE lost the server.
    Disconnected,
    /// A remote packet.
    Packet(Received),
    /// The session failed for good.
    Failed(String),
}

/// What became of a frame handed to [`Peer::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Written with this RTP timestamp and sequence number.
    Rtp { timestamp: u32, seq: u64 },
    /// A DTX frame: nothing to send (time still moves on).
    Dtx,
    /// Not connected yet (or failed): dropped.
    NotConnected,
}

/// A datagram to send.
#[derive(Debug)]
pub struct Datagram {
    /// Where to.
    pub destination: SocketAddr,
    /// The bytes.
    pub contents: Vec<u8>,
}

/// One simulated device's WebRTC session.
pub struct Peer {
    rtc: Rtc,
    local: SocketAddr,
    audio_mid: Option<Mid>,
    pt: Option<Pt>,
    pending: Option<SdpPendingOffer>,
    next_ts: u32,
    next_seq: u64,
    /// The previous frame was sent (not DTX): no marker on the next.
    in_spurt: bool,
    ssrc_mid: HashMap<Ssrc, Mid>,
    streams: HashMap<Mid, Arc<str>>,
    connected: bool,
    dtls_up: bool,
    failed: bool,
    timeout: Instant,
    transmits: VecDeque<Datagram>,
    events: VecDeque<PeerEvent>,
    rejected: u64,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("local", &self.local)
            .field("connected", &self.connected)
            .finish_non_exhaustive()
    }
}

impl Peer {
    /// The join offer: one `sendonly` Opus m-line. Once per peer.
    pub fn create_offer(&mut self, now: Instant) -> anyhow::Result<String> {
        if self.audio_mid.is_some() {
            bail!("the offer was already created");
        }
        let mut api = self.rtc.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        let (offer, pending) = api.apply().context("nothing to offer")?;
        self.audio_mid = Some(mid);
        self.pending = Some(pending);
        self.drain(now);
        Ok(offer.to_sdp_string())
    }

    /// Applies the server's answer to our offer.
    pub fn accept_answer(&mut self, now: Instant, sdp: &str) -> anyhow::Result<()> {
        let answer = SdpAnswer::from_sdp_string(sdp).context("parsing the SDP answer")?;
        let pending = self.pending.take().context("no offer of ours is pending")?;
        let result = self.rtc.sdp_api().accept_answer(pending, answer);
        self.drain(now);
        result.context("applying the SDP answer")
    }

    /// Answers a server offer (renegotiation, or a Janus subscription).
    pub fn accept_offer(&mut self, now: Instant, sdp: &str) -> anyhow::Result<String> {
        let offer = SdpOffer::from_sdp_string(sdp).context("parsing the SDP offer")?;
        let result = self.rtc.sdp_api().accept_offer(offer);
        self.drain(now);
        Ok(result.context("applying the SDP offer")?.to_sdp_string())
    }

    /// Sends one 20 ms frame; the RTP clock moves on by a frame whatever
    /// becomes of it.
    pub fn send(&mut self, now: Instant, frame: &ClipFrame) -> Sent {
        let timestamp = self.next_ts;
        self.next_ts = self.next_ts.wrapping_add(FRAME_TICKS);
        let Some(payload) = &frame.payload else {
            self.in_spurt = false;
            return Sent::Dtx;
        };
        if !self.connected || self.failed {
            return Sent::NotConnected;
        }
        let (Some(mid), Some(pt)) = (self.audio_mid, self.opus_pt()) else {
            return Sent::NotConnected;
        };
        let seq = self.next_seq;
        let marker = !self.in_spurt;
        let exts = ExtensionValues {
            audio_level: Some(frame.level),
            voice_activity: Some(frame.voice),
            ..Default::default()
        };
        let mut api = self.rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, None) else {
            return Sent::NotConnected;
        };
        tx.write_rtp(
            RtpWrite::new(pt, seq.into(), timestamp, now, payload.clone())
                .marker(marker)
                .ext_vals(exts),
        );
        self.next_seq += 1;
        self.in_spurt = true;
        self.drain(now);
        Sent::Rtp { timestamp, seq }
    }

    fn opus_pt(&mut self) -> Option<Pt> {
        if self.pt.is_none() {
            let media = self.rtc.media(self.audio_mid?)?;
            let params = self.rtc.codec_config().params();
            self.pt = media.remote_pts().iter().copied().find(|pt| {
                params
                    .iter()
                    .any(|p| p.pt() == *pt && p.spec().codec == Codec::Opus)
            });
        }
        self.pt
    }

    /// A datagram arrived on the peer's socket.
    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, contents: &[u8]) {
        if self.failed {
            return;
        }
        let Ok(contents) = contents.try_into() else {
            self.rejected += 1;
            return;
        };
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.local,
                contents,
            },
        );
        if self.rtc.handle_input(input).is_err() {
            self.rejected += 1;
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

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Datagram> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<PeerEvent> {
        self.events.pop_front()
    }

    /// When [`Peer::handle_timeout`] is due; `None` once failed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.failed).then_some(self.timeout)
    }

    /// ICE and DTLS are up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The local address (ICE host candidate).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Datagrams the WebRTC stack refused.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

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
                Output::Timeout(at) => {
                    // str0m may ask for "now" again; never stand still.
                    self.timeout = at.max(now);
                    return;
                }
                Output::Transmit(t) => self.transmits.push_back(Datagram {
                    destination: t.destination,
                    contents: t.contents.into(),
                }),
                Output::Event(event) => self.on_event(event),
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected => {
                self.dtls_up = true;
                self.connected = true;
                self.events.push_back(PeerEvent::Connected);
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) if self.connected => {
                self.connected = false;
                self.events.push_back(PeerEvent::Disconnected);
            }
            Event::IceConnectionStateChange(
                IceConnectionState::Connected | IceConnectionState::Completed,
            ) if !self.connected && self.dtls_up => {
                self.connected = true;
                self.events.push_back(PeerEvent::Connected);
            }
            Event::RtpPacket(packet) => {
                let ssrc = packet.header.ssrc;
                let mid = match self.ssrc_mid.get(&ssrc) {
                    Some(mid) => *mid,
                    None => {
                        let Some(mid) = self.rtc.direct_api().stream_rx(&ssrc).map(|rx| rx.mid())
                        else {
                            return;
                        };
                        self.ssrc_mid.insert(ssrc, mid);
                        mid
                    }
                };
                let stream = match self.streams.get(&mid) {
                    Some(stream) => stream.clone(),
                    None => {
                        let stream: Arc<str> = self
                            .rtc
                            .media(mid)
                            .map_or_else(|| mid.to_string(), |m| m.stream_id().to_owned())
                            .into();
                        self.streams.insert(mid, stream.clone());
                        stream
                    }
                };
                let header = &packet.header;
                self.events.push_back(PeerEvent::Packet(Received {
                    stream,
                    csrc: (header.csrc_count > 0).then_some(header.csrc[0]),
                    seq: header.sequence_number,
                    timestamp: header.timestamp,
                    marker: header.marker,
                    level: header.ext_vals.audio_level,
                    payload: packet.payload,
                }));
            }
            _ => {}
        }
    }

    fn fail(&mut self, reason: String) {
        self.failed = true;
        self.connected = false;
        self.events.push_back(PeerEvent::Failed(reason));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Two peers in virtual time: one offers (ours), the other answers.
    /// The answerer is a plain str0m `Rtc` in RTP mode, like the SFU.
    #[test]
    fn sends_levels_and_timestamps_and_receives_with_header() {
        let start = Instant::now();
        let factory = PeerFactory::new().unwrap();
        let a_addr: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let b_addr: SocketAddr = "10.0.0.2:2000".parse().unwrap();
        let mut a = factory.peer(start, a_addr, 960 * 1000 + 3, 100).unwrap();
        let mut b = factory.peer(start, b_addr, 7, 200).unwrap();
        let offer = a.create_offer(start).unwrap();
        // b answers a's offer (as the SFU would), then offers a track back.
        let answer = b.accept_offer(start, &offer).unwrap();
        a.accept_answer(start, &answer).unwrap();
        let offer_b = b.create_offer(start).unwrap();
        let answer_a = a.accept_offer(start, &offer_b).unwrap();
        b.accept_answer(start, &answer_a).unwrap();

        let mut now = start;
        let mut got_a = Vec::new();
        let mut got_b = Vec::new();
        let frame = ClipFrame {
            payload: Some(Arc::from(&[0xf8u8, 1, 2, 3, 4][..])),
            level: -20,
            voice: true,
        };
        let dtx = ClipFrame {
            payload: None,
            level: -127,
            voice: false,
        };
        let mut sent = Vec::new();
        for step in 0..400 {
            now += Duration::from_millis(5);
            if step % 4 == 0 && a.is_connected() && b.is_connected() && sent.len() < 10 {
                let f = if sent.len() == 3 { &dtx } else { &frame };
                sent.push(a.send(now, f));
                b.send(now, &frame);
            }
            exchange(now, &mut a, a_addr, &mut b, b_addr);
            while let Some(e) = a.poll_event() {
                if let PeerEvent::Packet(p) = e {
                    got_a.push(p);
                }
            }
            while let Some(e) = b.poll_event() {
                if let PeerEvent::Packet(p) = e {
                    got_b.push(p);
                }
            }
        }
        assert_eq!(sent.len(), 10, "both connected");
        assert_eq!(sent[3], Sent::Dtx);
        let Sent::Rtp { timestamp, .. } = sent[0] else {
            panic!("{sent:?}")
        };
        assert_eq!(timestamp, 960 * 1000 + 3);
        assert_eq!(got_b.len(), 9, "every non-DTX frame arrives");
        assert_eq!(got_b[0].timestamp, 960 * 1000 + 3);
        assert_eq!(
            got_b[3].timestamp,
            960 * 1000 + 3 + 4 * 960,
            "the DTX frame's time is skipped"
        );
        assert!(
            got_b[0].marker && !got_b[1].marker && got_b[3].marker,
            "marker at each talk spurt"
        );
        assert_eq!(got_b[3].seq, got_b[2].seq + 1, "DTX leaves no sequence gap");
        assert_eq!(got_b[0].level, Some(-20));
        assert_eq!(&got_b[0].payload[..], &[0xf8, 1, 2, 3, 4]);
        assert!(!got_a.is_empty(), "the renegotiated track flows back");
    }

    fn exchange(now: Instant, a: &mut Peer, a_addr: SocketAddr, b: &mut Peer, b_addr: SocketAddr) {
        for _ in 0..20 {
            let mut moved = false;
            while let Some(d) = a.poll_transmit() {
                moved = true;
                b.handle_datagram(now, a_addr, &d.contents);
            }
            while let Some(d) = b.poll_transmit() {
                moved = true;
                a.handle_datagram(now, b_addr, &d.contents);
            }
            if !moved {
                break;
            }
        }
        if a.poll_timeout().is_some_and(|t| t <= now) {
            a.handle_timeout(now);
        }
        if b.poll_timeout().is_some_and(|t| t <= now) {
            b.handle_timeout(now);
        }
    }
}
