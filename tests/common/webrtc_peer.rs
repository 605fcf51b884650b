//! A room participant built on the `webrtc` crate: a WebRTC implementation
//! independent of the str0m engine inside the server, so these tests prove
//! interoperability rather than str0m talking to itself.
//!
//! A [`Peer`] joins through the signaling WebSocket with one `sendonly` Opus
//! track, answers every server offer, sends one Opus frame every 20 ms and
//! counts the RTP it receives per remote participant (the msid stream id of
//! each remote track). Its payload carries the sender's participant id, so a
//! packet delivered on the wrong participant's track is counted as misrouted.
//!
//! Media goes through a small UDP relay the peer owns (the server's candidate
//! is rewritten to the relay's address). The relay lets a test cut the media
//! path while the WebSocket stays open, which is what a network partition or
//! a hung device looks like to the server, and send datagrams from the very
//! address the server knows the participant by.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use serde_json::{json, Value};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    register_default_interceptors, MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCPeerConnectionState, RTCSessionDescription, Registry,
};
use webrtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};

use super::Server;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opus payload type we offer; the server answers with the offerer's numbers.
const OPUS_PT: u8 = 111;
/// First payload byte: Opus TOC for one 20 ms CELT fullband mono frame. The
/// SFU never decodes, so the rest of the frame only has to identify the sender.
const OPUS_TOC: u8 = 0xF8;
/// Payload length: TOC, sender id, padding to a typical low-bitrate frame.
const FRAME_BYTES: usize = 40;

/// One connected participant. Background tasks are aborted on drop.
pub struct Peer {
    pub name: String,
    /// Our participant id, from `joined`.
    pub participant: u64,
    /// Who was in the room when we joined, from `joined`.
    pub others_at_join: Vec<u64>,
    /// The server's media socket: the host candidate in its answer.
    pub media_addr: SocketAddr,
    /// The ICE ufrag the server chose for this participant.
    pub server_ufrag: String,
    pc: Arc<dyn PeerConnection>,
    shared: Arc<Shared>,
    relay: Relay,
    outbox: mpsc::UnboundedSender<Message>,
    signaling: JoinHandle<()>,
    sender: JoinHandle<()>,
}

/// State the background tasks and the test both touch.
struct Shared {
    /// RTP packets received, by remote participant id.
    received: Mutex<HashMap<u64, u64>>,
    /// Packets whose payload names a sender other than their track's participant.
    misrouted: AtomicU64,
    sent: AtomicU64,
    /// Every server message after `joined`, with its arrival time; see
    /// [`Peer::messages`].
    messages: Mutex<Vec<(Instant, Value)>>,
    message_arrived: Notify,
    /// Errors in background tasks (a failed renegotiation, a foreign track).
    failures: Mutex<Vec<String>>,
    state: watch::Sender<RTCPeerConnectionState>,
}

impl Shared {
    fn fail(&self, what: String) {
        eprintln!("webrtc peer: {what}");
        self.failures.lock().unwrap().push(what);
    }

    fn record(&self, message: Value) {
        self.messages.lock().unwrap().push((Instant::now(), message));
        self.message_arrived.notify_waiters();
    }
}

struct Handler {
    shared: Arc<Shared>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.shared.state.send_replace(state);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        // This runs on the connection's driver loop: read the track elsewhere.
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let stream_id = track.stream_id().await;
            let Ok(from) = stream_id.parse::<u64>() else {
                shared.fail(format!("remote track with stream id {stream_id:?}, not a participant id"));
                return;
            };
            while let Some(event) = track.poll().await {
                let TrackRemoteEvent::OnRtpPacket(packet) = event else { continue };
                let payload = &packet.payload;
                let sender = (payload.len() == FRAME_BYTES && payload[0] == OPUS_TOC)
                    .then(|| u64::from_be_bytes(payload[1..9].try_into().expect("8 bytes")));
                if sender == Some(from) {
                    *shared.received.lock().unwrap().entry(from).or_default() += 1;
                } else {
                    shared.misrouted.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}

impl Peer {
    /// Joins `room` as `name` and returns once the server's answer is applied
    /// (media connects in the background; see [`Peer::wait_connected`]).
    pub async fn join(server: &Server, room: &str, name: &str) -> anyhow::Result<Peer> {
        let (state, _) = watch::channel(RTCPeerConnectionState::New);
        let shared = Arc::new(Shared {
            received: Mutex::new(HashMap::new()),
            misrouted: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            messages: Mutex::new(Vec::new()),
            message_arrived: Notify::new(),
            failures: Mutex::new(Vec::new()),
            state,
        });

        let opus = RTCRtpCodec {
            mime_type: "audio/opus".into(),
            clock_rate: 48_000,
            channels: 2,
            sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
            rtcp_feedback: vec![],
        };
        let mut media_engine = MediaEngine::default();
        media_engine.register_codec(
            RTCRtpCodecParameters { rtp_codec: opus.clone(), payload_type: OPUS_PT },
            RtpCodecKind::Audio,
        )?;
        // NACK, RTCP reports and TWCC, as a real client would run them.
        let registry = register_default_interceptors(Registry::new(), &mut media_engine)?;
        let pc: Arc<dyn PeerConnection> = Arc::new(
            PeerConnectionBuilder::new()
                .with_media_engine(media_engine)
                .with_interceptor_registry(registry)
                .with_handler(Arc::new(Handler { shared: shared.clone() }))
                .with_udp_addrs(vec!["127.0.0.1:0"])
                .build()
                .await?,
        );

        let ssrc: u32 = rand::random();
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            format!("{name}-stream"),
            format!("{name}-audio"),
            format!("{name} microphone"),
            RtpCodecKind::Audio,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(ssrc), ..Default::default() },
                active: true,
                codec: opus,
                ..Default::default()
            }],
        )));
        let init = RTCRtpTransceiverInit { direction: RTCRtpTransceiverDirection::Sendonly, ..Default::default() };
        pc.add_transceiver_from_track(track.clone() as Arc<dyn TrackLocal>, Some(init)).await?;
        let offer = pc.create_offer(None).await?;
        pc.set_local_description(offer).await?;
        // No candidates needed: the ICE-lite server learns our address from
        // our STUN checks.
        let offer = pc.local_description().await.context("no local offer")?.sdp;

        let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url()).await.context("connecting the signaling socket")?;
        let join = json!({ "type": "join", "room": room, "name": name, "sdp": offer });
        ws.send(Message::text(join.to_string())).await?;
        let joined = next_json(&mut ws, Duration::from_secs(10)).await?;
        if joined["type"] != "joined" {
            bail!("{name}: join refused: {joined}");
        }
        let participant = joined["participant"].as_u64().context("joined.participant")?;
        let others_at_join = joined["participants"]
            .as_array()
            .context("joined.participants")?
            .iter()
            .filter_map(|p| p["id"].as_u64())
            .collect();
        let answer = joined["sdp"].as_str().context("joined.sdp")?;
        let media_addr = host_candidate(answer).context("no host candidate in the server's answer")?;
        let server_ufrag = sdp_attribute(answer, "ice-ufrag").context("no ice-ufrag in the server's answer")?;

        let relay = Relay::start(media_addr).await?;
        let answer = rewrite_candidates(answer, media_addr, relay.local);
        pc.set_remote_description(RTCSessionDescription::answer(answer)?).await?;

        let (outbox, outbox_rx) = mpsc::unbounded_channel();
        let signaling = tokio::spawn(run_signaling(ws, pc.clone(), shared.clone(), (relay.server, relay.local), outbox_rx));
        let sender = tokio::spawn(send_audio(track, ssrc, participant, shared.clone()));
        Ok(Peer {
            name: name.to_owned(),
            participant,
            others_at_join,
            media_addr,
            server_ufrag,
            pc,
            shared,
            relay,
            outbox,
            signaling,
            sender,
        })
    }

    /// Waits until ICE and DTLS are up.
    pub async fn wait_connected(&self, limit: Duration) -> anyhow::Result<()> {
        let mut state = self.shared.state.subscribe();
        let connected = tokio::time::timeout(limit, state.wait_for(|s| *s == RTCPeerConnectionState::Connected)).await;
        if !matches!(connected, Ok(Ok(_))) {
            bail!("{}: not connected within {limit:?}, state {}", self.name, *self.shared.state.borrow());
        }
        Ok(())
    }

    /// RTP packets received from `participant` so far.
    pub fn received_from(&self, participant: u64) -> u64 {
        self.shared.received.lock().unwrap().get(&participant).copied().unwrap_or(0)
    }

    /// RTP packets received so far, by sender.
    pub fn received(&self) -> HashMap<u64, u64> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Packets whose payload did not come from their track's participant.
    pub fn misrouted(&self) -> u64 {
        self.shared.misrouted.load(Ordering::Relaxed)
    }

    /// RTP packets handed to our track.
    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }

    /// Errors in the background tasks; none is expected.
    pub fn failures(&self) -> Vec<String> {
        self.shared.failures.lock().unwrap().clone()
    }

    /// Waits until at least `packets` more arrive from each of `from`.
    pub async fn wait_receiving(&self, from: &[u64], packets: u64, limit: Duration) -> anyhow::Result<()> {
        let start: Vec<u64> = from.iter().map(|id| self.received_from(*id)).collect();
        let deadline = Instant::now() + limit;
        loop {
            let now: Vec<u64> = from.iter().map(|id| self.received_from(*id)).collect();
            if now.iter().zip(&start).all(|(n, s)| *n >= s + packets) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: expected {packets} more packets from each of {from:?} within {limit:?}, went {start:?} -> {now:?} (all: {:?}, misrouted {}, failures {:?})",
                    self.name,
                    self.received(),
                    self.misrouted(),
                    self.failures()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every server message received after `joined`, then `{"type":"_closed"}`
    /// if the socket ended.
    pub fn messages(&self) -> Vec<Value> {
        self.shared.messages.lock().unwrap().iter().map(|(_, m)| m.clone()).collect()
    }

    /// The messages for a failure report, without the bulky SDP.
    pub fn message_summary(&self) -> String {
        let brief: Vec<Value> = self
            .messages()
            .into_iter()
            .map(|mut m| {
                if let Some(sdp) = m.get_mut("sdp") {
                    *sdp = json!("...");
                }
                m
            })
            .collect();
        Value::from(brief).to_string()
    }

    /// How many server messages arrived after `joined`; a mark for
    /// [`Peer::wait_message_since`].
    pub fn message_count(&self) -> usize {
        self.shared.messages.lock().unwrap().len()
    }

    /// The first server message after `joined` that satisfies `matches`, and
    /// when it arrived; waits up to `limit` for it.
    pub async fn wait_message(&self, limit: Duration, matches: impl Fn(&Value) -> bool) -> anyhow::Result<(Instant, Value)> {
        self.wait_message_since(0, limit, matches).await
    }

    /// Like [`Peer::wait_message`], skipping the first `since` messages.
    pub async fn wait_message_since(
        &self,
        since: usize,
        limit: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<(Instant, Value)> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Registered before the check, so a message arriving in between still wakes us.
            let arrived = self.shared.message_arrived.notified();
            if let Some(found) = self.shared.messages.lock().unwrap().iter().skip(since).find(|(_, m)| matches(m)) {
                return Ok(found.clone());
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                bail!("{}: no matching message within {limit:?}; got {}", self.name, self.message_summary());
            }
        }
    }

    /// Sends one text frame on the signaling socket.
    pub fn send_text(&self, text: impl Into<String>) -> anyhow::Result<()> {
        self.outbox.send(Message::text(text.into())).context("signaling task has stopped")
    }

    /// Our current local SDP (the answer to the last server offer).
    pub async fn local_sdp(&self) -> anyhow::Result<String> {
        Ok(self.pc.local_description().await.context("no local description")?.sdp)
    }

    /// Sends `datagram` to the server from the address it knows us by.
    pub async fn send_from_our_address(&self, datagram: &[u8]) -> anyhow::Result<()> {
        self.relay.upstream.send_to(datagram, self.relay.server).await?;
        Ok(())
    }

    /// Leaves the room politely and waits for `left`.
    pub async fn leave(self) -> anyhow::Result<()> {
        self.send_text(json!({ "type": "leave" }).to_string())?;
        let (_, left) = self.wait_message(Duration::from_secs(10), |m| m["type"] == "left").await?;
        if left["reason"] != "requested" {
            bail!("{}: left with {left}", self.name);
        }
        self.pc.close().await?;
        Ok(())
    }

    /// The process dies: no leave, no WebSocket close frame, no DTLS close,
    /// nothing on the media path from now on.
    pub async fn kill(self) {
        self.relay.cut();
        self.signaling.abort();
        self.sender.abort();
        // Anything closing sends now dies at the cut relay.
        let _ = self.pc.close().await;
    }

    /// The media path goes silent (no RTP, no STUN, no DTLS either way) while
    /// the signaling socket stays open and keeps reading. Returns when.
    pub fn silence_media(&self) -> Instant {
        self.relay.cut();
        self.sender.abort();
        Instant::now()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.signaling.abort();
        self.sender.abort();
        // Dropping the handle would leave the connection's driver running.
        let pc = self.pc.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = pc.close().await;
            });
        }
    }
}

/// Owns the signaling socket after the join: answers offers, records every
/// other message, writes what the test queues.
async fn run_signaling(
    mut ws: Socket,
    pc: Arc<dyn PeerConnection>,
    shared: Arc<Shared>,
    rewrite: (SocketAddr, SocketAddr),
    mut outbox: mpsc::UnboundedReceiver<Message>,
) {
    loop {
        tokio::select! {
            incoming = ws.next() => {
                let text = match incoming {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.as_ref().map(|f| u16::from(f.code));
                        shared.record(json!({ "type": "_closed", "code": code }));
                        return;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        shared.record(json!({ "type": "_closed", "error": e.to_string() }));
                        return;
                    }
                    None => {
                        shared.record(json!({ "type": "_closed" }));
                        return;
                    }
                };
                let message: Value = match serde_json::from_str(&text) {
                    Ok(message) => message,
                    Err(e) => {
                        shared.fail(format!("server sent non-JSON {text:?}: {e}"));
                        continue;
                    }
                };
                if message["type"] == "offer" {
                    let offer = message["sdp"].as_str().unwrap_or_default();
                    match answer(&pc, &rewrite_candidates(offer, rewrite.0, rewrite.1)).await {
                        Ok(sdp) => {
                            let reply = json!({ "type": "answer", "sdp": sdp }).to_string();
                            if ws.send(Message::text(reply)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => shared.fail(format!("answering a server offer: {e:#}")),
                    }
                }
                shared.record(message);
            }
            queued = outbox.recv() => {
                let Some(message) = queued else { return };
                if ws.send(message).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn answer(pc: &Arc<dyn PeerConnection>, offer: &str) -> anyhow::Result<String> {
    pc.set_remote_description(RTCSessionDescription::offer(offer.to_owned())?).await?;
    let answer = pc.create_answer(None).await?;
    pc.set_local_description(answer).await?;
    Ok(pc.local_description().await.context("no local answer")?.sdp)
}

/// One Opus frame every 20 ms, naming the sender in the payload.
async fn send_audio(track: Arc<TrackLocalStaticRTP>, ssrc: u32, participant: u64, shared: Arc<Shared>) {
    let mut payload = vec![0u8; FRAME_BYTES];
    payload[0] = OPUS_TOC;
    payload[1..9].copy_from_slice(&participant.to_be_bytes());
    let payload = Bytes::from(payload);
    let mut sequence_number: u16 = rand::random();
    let mut timestamp: u32 = rand::random();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let packet = rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                payload_type: OPUS_PT,
                sequence_number,
                timestamp,
                ssrc,
                ..Default::default()
            },
            payload: payload.clone(),
        };
        // Refused until the transceiver is negotiated; the next tick tries again.
        if track.write_rtp(packet).await.is_ok() {
            shared.sent.fetch_add(1, Ordering::Relaxed);
        }
        sequence_number = sequence_number.wrapping_add(1);
        timestamp = timestamp.wrapping_add(960);
    }
}

/// A UDP hop between our peer connection and the server; cutting it drops
/// everything both ways.
struct Relay {
    /// What the peer connection sends to, announced as the server's candidate.
    local: SocketAddr,
    /// The server's media socket.
    server: SocketAddr,
    /// The server sees us at this socket's address.
    upstream: Arc<UdpSocket>,
    open: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(server: SocketAddr) -> anyhow::Result<Relay> {
        let downstream = UdpSocket::bind("127.0.0.1:0").await?;
        let upstream = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let local = downstream.local_addr()?;
        let open = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(relay(downstream, upstream.clone(), server, open.clone()));
        Ok(Relay { local, server, upstream, open, task })
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(downstream: UdpSocket, upstream: Arc<UdpSocket>, server: SocketAddr, open: Arc<AtomicBool>) {
    let mut peer = None;
    let (mut down_buf, mut up_buf) = (vec![0u8; 2048], vec![0u8; 2048]);
    loop {
        tokio::select! {
            received = downstream.recv_from(&mut down_buf) => {
                // Errors on an unconnected UDP socket are transient (ICMP); keep going.
                let Ok((n, from)) = received else { continue };
                peer = Some(from);
                if open.load(Ordering::SeqCst) {
                    let _ = upstream.send_to(&down_buf[..n], server).await;
                }
            }
            received = upstream.recv_from(&mut up_buf) => {
                let Ok((n, from)) = received else { continue };
                if let (true, Some(peer)) = (from == server && open.load(Ordering::SeqCst), peer) {
                    let _ = downstream.send_to(&up_buf[..n], peer).await;
                }
            }
        }
    }
}

/// Reads the next text frame as JSON.
pub async fn next_json(ws: &mut Socket, limit: Duration) -> anyhow::Result<Value> {
    loop {
        let message = tokio::time::timeout(limit, ws.next())
            .await
            .with_context(|| format!("no message within {limit:?}"))?
            .context("socket closed")??;
        match message {
            Message::Text(text) => return Ok(serde_json::from_str(&text)?),
            Message::Close(frame) => bail!("socket closed: {frame:?}"),
            _ => continue,
        }
    }
}

/// The address of the first `typ host` candidate in `sdp`.
pub fn host_candidate(sdp: &str) -> Option<SocketAddr> {
    sdp.lines().find_map(|line| {
        let fields: Vec<&str> = line.strip_prefix("a=candidate:")?.split_whitespace().collect();
        if fields.get(6..8)? != ["typ", "host"] {
            return None;
        }
        format!("{}:{}", fields[4], fields[5]).parse().ok()
    })
}

/// The value of the first `a=<name>:` line.
pub fn sdp_attribute(sdp: &str, name: &str) -> Option<String> {
    let prefix = format!("a={name}:");
    sdp.lines().find_map(|line| line.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
}

/// Points every candidate at `from` to `to` instead.
fn rewrite_candidates(sdp: &str, from: SocketAddr, to: SocketAddr) -> String {
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        match line.strip_prefix("a=candidate:") {
            Some(rest) => {
                let mut fields: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
                if fields.len() > 5 && fields[4] == from.ip().to_string() && fields[5] == from.port().to_string() {
                    fields[4] = to.ip().to_string();
                    fields[5] = to.port().to_string();
                }
                out.push_str("a=candidate:");
                out.push_str(&fields.join(" "));
                out.push_str("\r\n");
            }
            None => out.push_str(line),
        }
    }
    out
}
