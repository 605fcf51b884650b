//! The device side of the media plane: one WebRTC peer (str0m, full ICE,
//! frame mode) that publishes one Opus track to the SFU and receives every
//! other participant's.
//!
//! * [`PeerCore`] is sans-IO, like the SFU core: datagrams, timeouts and
//!   commands in; datagrams, [`MediaEvent`]s and the next deadline out.
//! * [`MediaPeer`] runs a core on its own UDP socket in one small task.
//!
//! Negotiation follows the control protocol: the device offers one
//! `sendonly` Opus m-line ([`MediaPeer::create_offer`]), applies the SFU's
//! answer, and answers every renegotiation offer the SFU sends when the room
//! changes ([`MediaPeer::accept_offer`]). A remote track is named by its msid
//! stream id, which the SFU sets to the publishing participant's number.
//! The server learns the peer's address from its STUN checks, so there is
//! no trickle ICE.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, info_span, trace, warn};

use crate::error::SfuError;

/// One Opus frame: callers send one every 20 ms.
pub const FRAME: Duration = Duration::from_millis(20);

/// RTP ticks of one 20 ms Opus frame at 48 kHz.
pub const FRAME_TICKS: u64 = 960;

/// One Opus frame heard from a remote participant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFrame {
    /// The remote track's msid stream id (the publisher's SFU participant number).
    pub stream: Arc<str>,
    /// The Opus packet.
    pub payload: Arc<[u8]>,
    /// RTP timestamp in 48 kHz ticks, as the sender stamped it.
    pub rtp_time: u64,
    /// When its first datagram arrived.
    pub arrival: Instant,
}

/// What a media peer reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MediaEvent {
    /// ICE and DTLS are up: frames can flow.
    Connected,
    /// ICE lost the server (it may come back).
    Disconnected,
    /// A remote track was negotiated.
    StreamAdded {
        /// Its msid stream id.
        stream: Arc<str>,
    },
    /// A frame from a remote track.
    Frame(ReceivedFrame),
    /// The WebRTC session failed for good; the peer stops.
    Failed(String),
}

/// Counters of one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MediaStats {
    /// ICE and DTLS are up.
    pub connected: bool,
    /// Frames written to the network.
    pub frames_sent: u64,
    /// Frames dropped because the peer was not connected yet.
    pub frames_unsent: u64,
    /// Frames received, all streams.
    pub frames_received: u64,
    /// Frames received per remote stream id.
    pub received_by_stream: BTreeMap<String, u64>,
    /// Datagrams the WebRTC stack refused.
    pub datagrams_rejected: u64,
    /// Events lost because the application did not keep up (driver only).
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

/// The sans-IO media peer. Drain [`poll_transmit`](Self::poll_transmit) and
/// [`poll_event`](Self::poll_event) after every input, then wait for
/// [`poll_timeout`](Self::poll_timeout).
#[derive(Debug)]
pub struct PeerCore {
    rtc: Rtc,
    local: SocketAddr,
    audio_mid: Option<Mid>,
    opus_pt: Option<Pt>,
    pending: Option<SdpPendingOffer>,
    /// Remote tracks by mid: their msid stream id.
    streams: HashMap<Mid, Arc<str>>,
    next_rtp_time: u64,
    /// DTLS completed once: a later ICE reconnect means connected again.
    dtls_up: bool,
    failed: bool,
    timeout: Instant,
    transmit: VecDeque<Datagram>,
    events: VecDeque<MediaEvent>,
    stats: MediaStats,
}

impl PeerCore {
    /// A peer whose datagrams come from and go to `local` (a concrete
    /// address: it becomes the ICE host candidate).
    pub fn new(now: Instant, local: SocketAddr) -> Result<Self, SfuError> {
        let mut rtc = Rtc::builder().clear_codecs().enable_opus(true, false).build(now);
        let candidate = Candidate::host(local, "udp").map_err(|e| SfuError::Peer(format!("local candidate {local}: {e}")))?;
        rtc.add_local_candidate(candidate);
        Ok(PeerCore {
            rtc,
            local,
            audio_mid: None,
            opus_pt: None,
            pending: None,
            streams: HashMap::new(),
            next_rtp_time: 0,
            dtls_up: false,
            failed: false,
            timeout: now,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            stats: MediaStats::default(),
        })
    }

    /// The join offer: one `sendonly` Opus m-line. Only once per peer.
    pub fn create_offer(&mut self, now: Instant) -> Result<String, SfuError> {
        if self.audio_mid.is_some() {
            return Err(SfuError::Peer("the join offer was already created".into()));
        }
        let mut api = self.rtc.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        let (offer, pending) = api.apply().ok_or_else(|| SfuError::Peer("nothing to offer".into()))?;
        self.audio_mid = Some(mid);
        self.pending = Some(pending);
        self.drain(now);
        Ok(offer.to_sdp_string())
    }

    /// Applies the SFU's answer to the join offer.
    pub fn accept_answer(&mut self, now: Instant, sdp: &str) -> Result<(), SfuError> {
        let answer = SdpAnswer::from_sdp_string(sdp).map_err(|e| SfuError::InvalidSdp(e.to_string()))?;
        let pending = self.pending.take().ok_or_else(|| SfuError::Peer("no offer of ours is pending".into()))?;
        let result = self.rtc.sdp_api().accept_answer(pending, answer);
        self.drain(now);
        result.map_err(|e| SfuError::InvalidSdp(e.to_string()))
    }

    /// Answers an SFU renegotiation offer.
    pub fn accept_offer(&mut self, now: Instant, sdp: &str) -> Result<String, SfuError> {
        let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| SfuError::InvalidSdp(e.to_string()))?;
        let result = self.rtc.sdp_api().accept_offer(offer);
        self.drain(now);
        Ok(result.map_err(|e| SfuError::InvalidSdp(e.to_string()))?.to_sdp_string())
    }

    /// Sends one 20 ms Opus frame; RTP time advances by [`FRAME_TICKS`]
    /// whether or not it could be sent. False: dropped (not connected yet).
    pub fn send_opus(&mut self, now: Instant, payload: &[u8]) -> bool {
        let rtp_time = MediaTime::new(self.next_rtp_time, Frequency::FORTY_EIGHT_KHZ);
        self.next_rtp_time += FRAME_TICKS;
        let sent = self.write(now, rtp_time, payload);
        if sent {
            self.stats.frames_sent += 1;
        } else {
            self.stats.frames_unsent += 1;
        }
        self.drain(now);
        sent
    }

    fn write(&mut self, now: Instant, rtp_time: MediaTime, payload: &[u8]) -> bool {
        if !self.stats.connected || self.failed {
            return false;
        }
        let Some(mid) = self.audio_mid else { return false };
        let Some(writer) = self.rtc.writer(mid) else { return false };
        let pt = match self.opus_pt {
            Some(pt) => pt,
            None => {
                let Some(pt) = writer.payload_params().find(|p| p.spec().codec == Codec::Opus).map(|p| p.pt()) else {
                    return false;
                };
                self.opus_pt = Some(pt);
                pt
            }
        };
        match writer.write(pt, now, rtp_time, payload) {
            Ok(()) => true,
            Err(e) => {
                debug!(error = %e, "frame not written");
                false
            }
        }
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
        let input = Input::Receive(now, Receive { proto: Protocol::Udp, source, destination: self.local, contents });
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

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Datagram> {
        self.transmit.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<MediaEvent> {
        self.events.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next; `None`
    /// once the peer has failed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.failed).then_some(self.timeout)
    }

    /// The counters.
    pub fn stats(&self) -> &MediaStats {
        &self.stats
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
                Output::Timeout(at) => {
                    // str0m may ask for "now" again; never stand still.
                    self.timeout = at.max(now);
                    return;
                }
                Output::Transmit(t) => {
                    self.transmit.push_back(Datagram { destination: t.destination, contents: t.contents.into() })
                }
                Output::Event(event) => self.on_event(event),
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected => {
                self.dtls_up = true;
                self.stats.connected = true;
                self.events.push_back(MediaEvent::Connected);
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                self.stats.connected = false;
                self.events.push_back(MediaEvent::Disconnected);
            }
            Event::IceConnectionStateChange(IceConnectionState::Connected | IceConnectionState::Completed)
                if !self.stats.connected && self.dtls_up =>
            {
                // Back after a disconnect.
                self.stats.connected = true;
                self.events.push_back(MediaEvent::Connected);
            }
            Event::MediaAdded(added) if Some(added.mid) != self.audio_mid => {
                let stream = self.stream_of(added.mid);
                self.events.push_back(MediaEvent::StreamAdded { stream });
            }
            Event::MediaData(data) => {
                if Some(data.mid) == self.audio_mid {
                    return;
                }
                let stream = self.stream_of(data.mid);
                self.stats.frames_received += 1;
                *self.stats.received_by_stream.entry(stream.to_string()).or_default() += 1;
                let rtp_time = data.time.rebase(Frequency::FORTY_EIGHT_KHZ).numer();
                self.events.push_back(MediaEvent::Frame(ReceivedFrame {
                    stream,
                    payload: data.data,
                    rtp_time,
                    arrival: data.network_time,
                }));
            }
            _ => {}
        }
    }

    fn stream_of(&mut self, mid: Mid) -> Arc<str> {
        if let Some(stream) = self.streams.get(&mid) {
            return stream.clone();
        }
        let stream: Arc<str> = self.rtc.media(mid).map_or_else(|| mid.to_string(), |m| m.stream_id().to_owned()).into();
        self.streams.insert(mid, stream.clone());
        stream
    }

    fn fail(&mut self, reason: String) {
        warn!(%reason, "media peer failed");
        self.failed = true;
        self.stats.connected = false;
        self.events.push_back(MediaEvent::Failed(reason));
    }
}

/// Settings of a [`MediaPeer`].
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// The UDP socket's address: a concrete IP the SFU can reach (port 0
    /// picks one).
    pub bind: SocketAddr,
    /// Events buffered for the application; more are dropped and counted.
    pub event_capacity: usize,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig { bind: SocketAddr::from(([127, 0, 0, 1], 0)), event_capacity: 1024 }
    }
}

enum PeerCommand {
    CreateOffer(oneshot::Sender<Result<String, SfuError>>),
    AcceptAnswer(String, oneshot::Sender<Result<(), SfuError>>),
    AcceptOffer(String, oneshot::Sender<Result<String, SfuError>>),
    SendOpus(Vec<u8>),
}

impl std::fmt::Debug for PeerCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerCommand")
    }
}

/// A [`PeerCore`] on its own UDP socket. Dropping every handle stops it.
#[derive(Debug, Clone)]
pub struct MediaPeer {
    commands: mpsc::UnboundedSender<PeerCommand>,
    local: SocketAddr,
    stats: Arc<Mutex<MediaStats>>,
}

impl MediaPeer {
    /// Binds the socket and starts the peer's task.
    pub async fn start(config: MediaConfig) -> Result<(MediaPeer, mpsc::Receiver<MediaEvent>), SfuError> {
        let socket = UdpSocket::bind(config.bind).await?;
        let local = socket.local_addr()?;
        if local.ip().is_unspecified() {
            return Err(SfuError::Peer(format!("bind a concrete IP, not {local}: it is the ICE candidate")));
        }
        let core = PeerCore::new(now(), local)?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (events, event_rx) = mpsc::channel(config.event_capacity.max(1));
        let stats = Arc::new(Mutex::new(MediaStats::default()));
        let driver = Driver { core, socket, commands: command_rx, events, stats: stats.clone(), dropped: 0 };
        tokio::spawn(driver.run().instrument(info_span!("media_peer", %local)));
        Ok((MediaPeer { commands, local, stats }, event_rx))
    }

    /// The join offer (one `sendonly` Opus m-line).
    pub async fn create_offer(&self) -> Result<String, SfuError> {
        self.ask(PeerCommand::CreateOffer).await
    }

    /// Applies the SFU's answer to the join offer.
    pub async fn accept_answer(&self, sdp: String) -> Result<(), SfuError> {
        self.ask(|reply| PeerCommand::AcceptAnswer(sdp, reply)).await
    }

    /// Answers an SFU renegotiation offer.
    pub async fn accept_offer(&self, sdp: String) -> Result<String, SfuError> {
        self.ask(|reply| PeerCommand::AcceptOffer(sdp, reply)).await
    }

    /// Queues one 20 ms Opus frame (the caller paces). Frames before the
    /// peer connects are dropped and counted.
    pub fn send_opus(&self, payload: Vec<u8>) -> Result<(), SfuError> {
        self.commands.send(PeerCommand::SendOpus(payload)).map_err(|_| SfuError::PeerStopped)
    }

    /// The counters (updated after every step of the peer's task).
    pub fn stats(&self) -> MediaStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The UDP socket's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<Result<T, SfuError>>) -> PeerCommand) -> Result<T, SfuError> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(command(reply)).map_err(|_| SfuError::PeerStopped)?;
        rx.await.map_err(|_| SfuError::PeerStopped)?
    }
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

struct Driver {
    core: PeerCore,
    socket: UdpSocket,
    commands: mpsc::UnboundedReceiver<PeerCommand>,
    events: mpsc::Sender<MediaEvent>,
    stats: Arc<Mutex<MediaStats>>,
    dropped: u64,
}

impl Driver {
    async fn run(mut self) {
        // Big enough for any datagram the SFU sends.
        let mut buffer = vec![0u8; 2048];
        loop {
            while let Some(datagram) = self.core.poll_transmit() {
                // A lost datagram is what UDP promises; ICE and RTCP cope.
                if let Err(e) = self.socket.send_to(&datagram.contents, datagram.destination).await {
                    trace!(error = %e, "send failed");
                }
            }
            while let Some(event) = self.core.poll_event() {
                if self.events.try_send(event).is_err() {
                    self.dropped += 1;
                }
            }
            if let Ok(mut stats) = self.stats.lock() {
                *stats = self.core.stats().clone();
                stats.events_dropped = self.dropped;
            }
            let deadline = self.core.poll_timeout();
            tokio::select! {
                // Commands first: sending our frame on time matters more than
                // reading the next datagram a little earlier.
                biased;
                command = self.commands.recv() => {
                    // Every handle is gone: stop.
                    let Some(command) = command else { return };
                    let now = now();
                    match command {
                        PeerCommand::CreateOffer(reply) => { let _ = reply.send(self.core.create_offer(now)); }
                        PeerCommand::AcceptAnswer(sdp, reply) => { let _ = reply.send(self.core.accept_answer(now, &sdp)); }
                        PeerCommand::AcceptOffer(sdp, reply) => { let _ = reply.send(self.core.accept_offer(now, &sdp)); }
                        PeerCommand::SendOpus(payload) => { self.core.send_opus(now, &payload); }
                    }
                }
                received = self.socket.recv_from(&mut buffer) => match received {
                    Ok((n, source)) => self.core.handle_datagram(now(), source, &buffer[..n]),
                    // ICMP errors surface here on some systems; the next read goes on.
                    Err(e) => trace!(error = %e, "receive failed"),
                },
                () = sleep_until(deadline) => self.core.handle_timeout(now()),
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
