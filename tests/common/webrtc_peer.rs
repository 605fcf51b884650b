//! A room participant built on the `webrtc` crate: a WebRTC implementation
//! independent of the str0m engine inside the server, so these tests prove
//! interoperability rather than str0m talking to itself.
//!
//! A [`Peer`] speaks the device protocol (`fleetcall.v1` as proto3 JSON) on
//! `/ws/device?token=...`: `hello`, heartbeats both ways (so a session lives
//! for as long as the test wants), `roomJoin`, one `sdpOffer` with a
//! `sendonly` Opus track (or a `recvonly` one to listen only), an
//! `sdpAnswer` request for every server `sdpOffer`, `groupLeave`. It sends
//! one Opus frame every 20 ms and counts the RTP it receives per remote
//! participant.
//!
//! Remote tracks are named by their msid stream id, the publisher's SFU media
//! id (`mediaId` in `callState` / `participantUpdate`); in slot mode
//! (`slot-N` streams) the CSRC names the speaker. The payload of every frame
//! names its sender's identity, so a packet whose track belongs to someone
//! else, or to a media id the controller never announced, counts as
//! misrouted.
//!
//! An [`Intruder`] walks the same road but may be refused on the way; it
//! reports the refusal (an HTTP status, a `rejected` frame and the close
//! code, or the error of `roomJoin` / `groupJoin` / `sdpOffer`) and keeps
//! its socket and peer connection open, counting every RTP packet that
//! still reaches it.
//!
//! Media goes through a small UDP relay the peer owns (the server's candidate
//! is rewritten to the relay's address). The relay lets a test cut the media
//! path while the WebSocket stays open, which is what a network partition or
//! a hung device looks like to the server, and send datagrams from the very
//! address the server knows the participant by.

use std::collections::{HashMap, HashSet};
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
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    register_default_interceptors, MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCPeerConnectionState, RTCSessionDescription, Registry,
};
use webrtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};

use super::Server;

pub type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opus payload type we offer; the server answers with the offerer's numbers.
const OPUS_PT: u8 = 111;
/// First payload byte: Opus TOC for one 20 ms CELT fullband mono frame. The
/// SFU never decodes, so the rest of the frame only has to identify the sender.
const OPUS_TOC: u8 = 0xF8;
/// Payload length: TOC, sender tag, padding to a typical low-bitrate frame.
const FRAME_BYTES: usize = 40;
/// Bound for each signaling step on a busy 2-core machine.
const STEP: Duration = Duration::from_secs(10);

/// The `hello` every test client sends.
pub fn hello() -> Value {
    json!({ "hello": { "minVersion": 1, "maxVersion": 1, "softwareVersion": "webrtc-peer 1" } })
}

/// What a client asks for.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The identity the token names (a guest link's server-chosen identity
    /// replaces it once the `welcome` arrives).
    pub name: String,
    /// `None`: no `token` parameter at all.
    pub token: Option<String>,
    /// An `Origin` header, as a browser page sends.
    pub origin: Option<String>,
    pub door: Door,
    /// A `sendonly` Opus track that sends; else one `recvonly` audio m-line.
    pub publish: bool,
}

/// How a client asks into a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Door {
    /// `roomJoin{room}`.
    Room(String),
    /// `groupJoin{callId}`: guessing a call's id.
    Call(String),
    /// No door: registers (`hello`) and stays in no call, a session for
    /// frames written by hand.
    None,
}

impl Plan {
    /// `name` joins `room` with a fresh publish token for exactly that room.
    pub fn room(server: &Server, room: &str, name: &str) -> Plan {
        Plan::with_token(name, Some(server.token(name, &[room])), Door::Room(room.into()))
    }

    /// `name` with `token` (or none) tries `door`, publishing.
    pub fn with_token(name: &str, token: Option<String>, door: Door) -> Plan {
        Plan { name: name.into(), token, origin: None, door, publish: true }
    }

    /// Offers a `recvonly` audio m-line instead of a track.
    pub fn listen_only(mut self) -> Plan {
        self.publish = false;
        self
    }

    pub fn origin(mut self, origin: &str) -> Plan {
        self.origin = Some(origin.into());
        self
    }
}

/// Why a client got no media.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The upgrade was answered with this HTTP status.
    Http(u16),
    /// A `rejected` frame with `code`, then the close (`None`: no close frame).
    Rejected { code: String, close: Option<u16> },
    /// The socket closed (with this code) before a `welcome`.
    Closed(Option<u16>),
    /// `request` (`roomJoin`, `groupJoin`, `sdpOffer`) answered with `error.code`.
    Request { request: String, code: String },
    /// The participation ended (`callEnded.reason`) before the SFU answered.
    Ended(String),
}

/// Whoever tried the way in. Background tasks are aborted on drop.
pub struct Intruder {
    pub name: String,
    /// `None`: it got in, with media negotiated.
    pub refusal: Option<Refusal>,
    /// The `welcome` body, if any.
    pub welcome: Option<Value>,
    /// The call it got into (proto3 JSON: a decimal string), if any.
    pub call_id: Option<String>,
    conn: Conn,
}

/// One participant that got in. Background tasks are aborted on drop.
pub struct Peer {
    /// The identity (`welcome.deviceId`).
    pub name: String,
    /// The room's call.
    pub call_id: String,
    /// Who was in the room when we joined (device ids), from `callState`.
    pub others_at_join: Vec<String>,
    /// The server's media socket: the host candidate in its answer.
    pub media_addr: SocketAddr,
    /// The ICE ufrag the server chose for this participant.
    pub server_ufrag: String,
    conn: Conn,
}

/// The machinery of either: peer connection, signaling task, sender.
struct Conn {
    pc: Arc<dyn PeerConnection>,
    shared: Arc<Shared>,
    outbox: mpsc::UnboundedSender<Message>,
    signaling: JoinHandle<()>,
    sender: Option<JoinHandle<()>>,
}

/// State the background tasks and the test both touch.
struct Shared {
    /// Our identity, for the payload of what we send.
    identity: Mutex<String>,
    /// RTP packets of our shape received, by (media id of the track, sender tag).
    received: Mutex<HashMap<(u64, u64), u64>>,
    /// Packets whose payload is not one of ours (re-encoded, garbage).
    foreign: AtomicU64,
    /// Every RTP packet on any remote track.
    rtp_total: AtomicU64,
    /// Media id -> device id, as `callState` / `participantUpdate` announced.
    members: Mutex<HashMap<u64, String>>,
    sent: AtomicU64,
    /// Every server frame but heartbeats, with its arrival time, then
    /// `{"_closed":{..}}` when the socket ends; see [`Peer::messages`].
    messages: Mutex<Vec<(Instant, Value)>>,
    message_arrived: Notify,
    /// Errors in background tasks (a failed renegotiation, a foreign track).
    failures: Mutex<Vec<String>>,
    state: watch::Sender<RTCPeerConnectionState>,
    next_op: AtomicU64,
    /// Highest `seq` processed, for our heartbeats' `ackSeq`.
    last_seq: AtomicU64,
    /// The server's acks of our heartbeats: frames move both ways.
    heartbeat_acks: AtomicU64,
    /// Op ids of our `sdpAnswer` requests, whose error replies are failures.
    answer_ops: Mutex<HashSet<String>>,
    /// Set up when the first `sdpAnswer` arrives.
    relay: Mutex<Option<Arc<Relay>>>,
}

impl Shared {
    fn fail(&self, what: String) {
        eprintln!("webrtc peer {}: {what}", self.identity.lock().unwrap());
        self.failures.lock().unwrap().push(what);
    }

    fn record(&self, message: Value) {
        self.messages.lock().unwrap().push((Instant::now(), message));
        self.message_arrived.notify_waiters();
    }

    fn op(&self) -> String {
        (self.next_op.fetch_add(1, Ordering::Relaxed)).to_string()
    }

    fn learn_members(&self, message: &Value) {
        let mut members = self.members.lock().unwrap();
        let participants = message["callState"]["participants"].as_array().into_iter().flatten();
        for p in participants.chain(message.get("participantUpdate")) {
            if let (Some(media), Some(device)) = (json_u64(&p["mediaId"]).filter(|m| *m != 0), p["deviceId"].as_str()) {
                members.insert(media, device.to_owned());
            }
        }
    }

    fn received_from(&self, identity: &str) -> u64 {
        let members = self.members.lock().unwrap();
        let want = tag(identity);
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|((media, sender), _)| *sender == want && members.get(media).is_some_and(|d| d == identity))
            .map(|(_, n)| n)
            .sum()
    }

    fn received(&self) -> HashMap<String, u64> {
        let members = self.members.lock().unwrap();
        let mut by = HashMap::new();
        for ((media, sender), n) in self.received.lock().unwrap().iter() {
            if let Some(device) = members.get(media).filter(|d| tag(d) == *sender) {
                *by.entry(device.clone()).or_default() += n;
            }
        }
        by
    }

    fn misrouted(&self) -> u64 {
        let members = self.members.lock().unwrap();
        let wrong: u64 = self
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|((media, sender), _)| members.get(media).is_none_or(|d| tag(d) != *sender))
            .map(|(_, n)| n)
            .sum();
        wrong + self.foreign.load(Ordering::Relaxed)
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
            let slot = stream_id.starts_with("slot-");
            let media = stream_id.parse::<u64>().ok();
            if media.is_none() && !slot {
                shared.fail(format!("remote track with stream id {stream_id:?}, neither a media id nor a slot"));
            }
            while let Some(event) = track.poll().await {
                let TrackRemoteEvent::OnRtpPacket(packet) = event else { continue };
                shared.rtp_total.fetch_add(1, Ordering::Relaxed);
                // In a slot the speaker travels as the CSRC.
                let from = if slot { packet.header.csrc.first().map(|c| u64::from(*c)) } else { media };
                let payload = &packet.payload;
                let sender = (payload.len() == FRAME_BYTES && payload[0] == OPUS_TOC)
                    .then(|| u64::from_be_bytes(payload[1..9].try_into().expect("8 bytes")));
                match (from, sender) {
                    (Some(from), Some(sender)) => *shared.received.lock().unwrap().entry((from, sender)).or_default() += 1,
                    _ => {
                        shared.foreign.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
}

impl Intruder {
    /// Walks `plan`'s way in as far as the server lets it: connect, `hello`,
    /// the door, the media offer, the SFU's answer. A refusal is a result,
    /// not an error; errors are for a server that does not answer at all.
    pub async fn attempt(server: &Server, plan: Plan) -> anyhow::Result<Intruder> {
        let (state, _) = watch::channel(RTCPeerConnectionState::New);
        let shared = Arc::new(Shared {
            identity: Mutex::new(plan.name.clone()),
            received: Mutex::new(HashMap::new()),
            foreign: AtomicU64::new(0),
            rtp_total: AtomicU64::new(0),
            members: Mutex::new(HashMap::new()),
            sent: AtomicU64::new(0),
            messages: Mutex::new(Vec::new()),
            message_arrived: Notify::new(),
            failures: Mutex::new(Vec::new()),
            state,
            next_op: AtomicU64::new(1),
            last_seq: AtomicU64::new(0),
            heartbeat_acks: AtomicU64::new(0),
            answer_ops: Mutex::new(HashSet::new()),
            relay: Mutex::new(None),
        });
        let (pc, track) = peer_connection(&shared, &plan).await?;
        let offer = pc.local_description().await.context("no local offer")?.sdp;

        let url = match &plan.token {
            Some(token) => server.ws_url(token),
            None => format!("{}/ws/device", server.url.replacen("http", "ws", 1)),
        };
        let mut request = url.into_client_request()?;
        if let Some(origin) = &plan.origin {
            request.headers_mut().insert("Origin", origin.parse()?);
        }
        let (outbox, outbox_rx) = mpsc::unbounded_channel();
        let mut intruder = Intruder {
            name: plan.name.clone(),
            refusal: None,
            welcome: None,
            call_id: None,
            conn: Conn { pc: pc.clone(), shared: shared.clone(), outbox, signaling: tokio::spawn(async {}), sender: None },
        };
        let ws = match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => ws,
            Err(tungstenite::Error::Http(response)) => {
                intruder.refusal = Some(Refusal::Http(response.status().as_u16()));
                return Ok(intruder);
            }
            Err(e) => return Err(e).context("connecting the signaling socket"),
        };
        intruder.conn.signaling = tokio::spawn(run_signaling(ws, pc.clone(), shared.clone(), outbox_rx));

        // Hello at once, as a browser does, also into a socket the server
        // is refusing.
        let _ = intruder.send(hello());
        let (_, first) = intruder
            .wait_message(STEP, |m| m.get("welcome").is_some() || m.get("rejected").is_some() || m.get("_closed").is_some())
            .await?;
        if let Some(rejected) = first.get("rejected") {
            let (_, closed) = intruder.wait_message(STEP, |m| m.get("_closed").is_some()).await?;
            let code = rejected["code"].as_str().unwrap_or_default().to_owned();
            intruder.refusal = Some(Refusal::Rejected { code, close: close_code(&closed) });
            return Ok(intruder);
        }
        if first.get("_closed").is_some() {
            intruder.refusal = Some(Refusal::Closed(close_code(&first)));
            return Ok(intruder);
        }
        let welcome = first["welcome"].clone();
        if let Some(identity) = welcome["deviceId"].as_str() {
            intruder.name = identity.to_owned();
            *shared.identity.lock().unwrap() = identity.to_owned();
        }
        intruder.welcome = Some(welcome.clone());

        let (request, body) = match &plan.door {
            Door::Room(room) => ("roomJoin", json!({ "roomJoin": { "room": room } })),
            Door::Call(call) => ("groupJoin", json!({ "groupJoin": { "callId": call } })),
            Door::None => return Ok(intruder),
        };
        let reply = intruder.request(body).await?;
        let Some(call) = reply["ack"]["callId"].as_str().map(str::to_owned) else {
            intruder.refusal = Some(Refusal::Request { request: request.into(), code: error_code(&reply) });
            return Ok(intruder);
        };
        intruder.call_id = Some(call.clone());

        let session = welcome["sessionId"].clone();
        let offer = json!({ "sdpOffer": { "callId": call, "sessionId": session, "revision": "1", "sdp": offer } });
        let reply = intruder.request(offer).await?;
        if reply.get("ack").is_none() {
            intruder.refusal = Some(Refusal::Request { request: "sdpOffer".into(), code: error_code(&reply) });
            return Ok(intruder);
        }
        // The task applies the answer before it records it.
        let (_, answered) = intruder
            .wait_message(STEP, |m| {
                (m["sdpAnswer"]["callId"] == call.as_str() && m["sdpAnswer"]["revision"] == "1") || m["callEnded"]["callId"] == call.as_str()
            })
            .await?;
        if let Some(ended) = answered.get("callEnded") {
            intruder.refusal = Some(Refusal::Ended(ended["reason"].as_str().unwrap_or_default().to_owned()));
            return Ok(intruder);
        }
        if let Some((track, ssrc)) = track {
            let tag = tag(&intruder.name);
            intruder.conn.sender = Some(tokio::spawn(send_audio(track, ssrc, tag, shared.clone())));
        }
        Ok(intruder)
    }

    /// It got in: now a [`Peer`].
    pub fn into_peer(self) -> anyhow::Result<Peer> {
        if let Some(refusal) = &self.refusal {
            bail!("{}: refused: {refusal:?}; got {}", self.name, self.message_summary());
        }
        let call_id = self.call_id.clone().context("in a call")?;
        let relay = self.conn.shared.relay.lock().unwrap().clone().context("the answer set up the relay")?;
        let answer = self
            .messages()
            .into_iter()
            .find_map(|m| m["sdpAnswer"]["sdp"].as_str().map(str::to_owned))
            .context("the server's answer")?;
        let server_ufrag = sdp_attribute(&answer, "ice-ufrag").context("no ice-ufrag in the server's answer")?;
        let others_at_join = self
            .messages()
            .iter()
            .find(|m| m["callState"]["callId"] == call_id.as_str())
            .and_then(|m| m["callState"]["participants"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p["deviceId"].as_str())
            .filter(|d| *d != self.name)
            .map(str::to_owned)
            .collect();
        Ok(Peer { name: self.name, call_id, others_at_join, media_addr: relay.server, server_ufrag, conn: self.conn })
    }

    /// Every RTP packet that reached it, whoever sent it.
    pub fn rtp_packets(&self) -> u64 {
        self.conn.rtp_packets()
    }

    pub fn messages(&self) -> Vec<Value> {
        self.conn.messages()
    }

    pub fn message_summary(&self) -> String {
        self.conn.message_summary()
    }

    /// Whether the socket is still open.
    pub fn open(&self) -> bool {
        !self.messages().iter().any(|m| m.get("_closed").is_some())
    }

    pub async fn wait_connected(&self, limit: Duration) -> anyhow::Result<()> {
        self.conn.wait_connected(&self.name, limit).await
    }

    pub async fn wait_message(&self, limit: Duration, matches: impl Fn(&Value) -> bool) -> anyhow::Result<(Instant, Value)> {
        self.conn.wait_message_since(&self.name, 0, limit, matches).await
    }

    pub fn send(&self, frame: Value) -> anyhow::Result<()> {
        self.conn.send_text(frame.to_string())
    }

    /// Sends any WebSocket message (a bad one, a binary one).
    pub fn send_message(&self, message: Message) -> anyhow::Result<()> {
        self.conn.outbox.send(message).context("signaling task has stopped")
    }

    /// How many server frames arrived so far; a mark for
    /// [`Intruder::wait_message_since`].
    pub fn message_count(&self) -> usize {
        self.conn.shared.messages.lock().unwrap().len()
    }

    /// Like [`Intruder::wait_message`], skipping the first `since` frames.
    pub async fn wait_message_since(&self, since: usize, limit: Duration, matches: impl Fn(&Value) -> bool) -> anyhow::Result<(Instant, Value)> {
        self.conn.wait_message_since(&self.name, since, limit, matches).await
    }

    /// The server's acks of our heartbeats so far.
    pub fn heartbeat_acks(&self) -> u64 {
        self.conn.shared.heartbeat_acks.load(Ordering::Relaxed)
    }

    /// Sends a request with a fresh `opId`; returns its reply frame.
    pub async fn request(&self, body: Value) -> anyhow::Result<Value> {
        self.conn.request(&self.name, body).await
    }
}

impl Peer {
    /// Joins `room` as `name` with a publish token for that room and returns
    /// once the server's answer is applied (media connects in the
    /// background; see [`Peer::wait_connected`]).
    pub async fn join(server: &Server, room: &str, name: &str) -> anyhow::Result<Peer> {
        Peer::join_with(server, Plan::room(server, room, name)).await
    }

    /// Joins as `plan` says; any refusal is an error.
    pub async fn join_with(server: &Server, plan: Plan) -> anyhow::Result<Peer> {
        Intruder::attempt(server, plan).await?.into_peer()
    }

    /// Waits until ICE and DTLS are up.
    pub async fn wait_connected(&self, limit: Duration) -> anyhow::Result<()> {
        self.conn.wait_connected(&self.name, limit).await
    }

    /// RTP packets received from `identity` on its own track (or slot) so far.
    pub fn received_from(&self, identity: &str) -> u64 {
        self.conn.shared.received_from(identity)
    }

    /// RTP packets received so far, by sender identity.
    pub fn received(&self) -> HashMap<String, u64> {
        self.conn.shared.received()
    }

    /// Packets whose payload did not come from their track's participant,
    /// or came on a track the controller never announced, or are not of
    /// our making (re-encoded by the server's noise suppression).
    pub fn misrouted(&self) -> u64 {
        self.conn.shared.misrouted()
    }

    /// Every RTP packet that reached us.
    pub fn rtp_packets(&self) -> u64 {
        self.conn.rtp_packets()
    }

    /// The media id the controller announced for `identity`.
    pub fn media_id_of(&self, identity: &str) -> Option<u64> {
        self.conn.shared.members.lock().unwrap().iter().find(|(_, d)| *d == identity).map(|(m, _)| *m)
    }

    /// RTP packets handed to our track.
    pub fn sent(&self) -> u64 {
        self.conn.shared.sent.load(Ordering::Relaxed)
    }

    /// The server's acks of our heartbeats so far.
    pub fn heartbeat_acks(&self) -> u64 {
        self.conn.shared.heartbeat_acks.load(Ordering::Relaxed)
    }

    /// Errors in the background tasks; none is expected.
    pub fn failures(&self) -> Vec<String> {
        self.conn.shared.failures.lock().unwrap().clone()
    }

    /// Waits until at least `packets` more arrive from each of `from`.
    pub async fn wait_receiving(&self, from: &[&str], packets: u64, limit: Duration) -> anyhow::Result<()> {
        let start: Vec<u64> = from.iter().map(|id| self.received_from(id)).collect();
        let deadline = Instant::now() + limit;
        loop {
            let now: Vec<u64> = from.iter().map(|id| self.received_from(id)).collect();
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

    /// Every server frame so far except heartbeats, then
    /// `{"_closed":{"code":..}}` if the socket ended.
    pub fn messages(&self) -> Vec<Value> {
        self.conn.messages()
    }

    /// The messages for a failure report, without the bulky SDP.
    pub fn message_summary(&self) -> String {
        self.conn.message_summary()
    }

    /// How many server frames arrived so far; a mark for
    /// [`Peer::wait_message_since`].
    pub fn message_count(&self) -> usize {
        self.conn.shared.messages.lock().unwrap().len()
    }

    /// The first server frame that satisfies `matches`, and when it
    /// arrived; waits up to `limit` for it.
    pub async fn wait_message(&self, limit: Duration, matches: impl Fn(&Value) -> bool) -> anyhow::Result<(Instant, Value)> {
        self.wait_message_since(0, limit, matches).await
    }

    /// Like [`Peer::wait_message`], skipping the first `since` frames.
    pub async fn wait_message_since(
        &self,
        since: usize,
        limit: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<(Instant, Value)> {
        self.conn.wait_message_since(&self.name, since, limit, matches).await
    }

    /// Sends one text frame on the signaling socket.
    pub fn send_text(&self, text: impl Into<String>) -> anyhow::Result<()> {
        self.conn.send_text(text)
    }

    /// Sends a request with a fresh `opId`; returns its reply frame.
    pub async fn request(&self, body: Value) -> anyhow::Result<Value> {
        self.conn.request(&self.name, body).await
    }

    /// Our session id, as the `welcome` gave it.
    pub fn session_id(&self) -> Value {
        self.messages().iter().find_map(|m| m.get("welcome").map(|w| w["sessionId"].clone())).unwrap_or(Value::Null)
    }

    /// Our current local SDP (the answer to the last server offer).
    pub async fn local_sdp(&self) -> anyhow::Result<String> {
        Ok(self.conn.pc.local_description().await.context("no local description")?.sdp)
    }

    /// Sends `datagram` to the server from the address it knows us by.
    pub async fn send_from_our_address(&self, datagram: &[u8]) -> anyhow::Result<()> {
        let relay = self.conn.relay().context("no relay")?;
        relay.upstream.send_to(datagram, relay.server).await?;
        Ok(())
    }

    /// Leaves the room politely (`groupLeave`) and waits for its `callEnded`.
    pub async fn leave(self) -> anyhow::Result<()> {
        let reply = self.request(json!({ "groupLeave": { "callId": self.call_id } })).await?;
        if reply.get("ack").is_none() {
            bail!("{}: groupLeave answered {reply}", self.name);
        }
        let call = self.call_id.clone();
        let (_, ended) = self.wait_message(STEP, |m| m["callEnded"]["callId"] == call.as_str()).await?;
        if ended["callEnded"]["reason"] != "END_REASON_LEFT" {
            bail!("{}: left with {ended}", self.name);
        }
        self.conn.pc.close().await?;
        Ok(())
    }

    /// The process dies: no leave, no WebSocket close frame, no DTLS close,
    /// nothing on the media path from now on.
    pub async fn kill(self) {
        if let Some(relay) = self.conn.relay() {
            relay.cut();
        }
        self.conn.signaling.abort();
        if let Some(sender) = &self.conn.sender {
            sender.abort();
        }
        // Anything closing sends now dies at the cut relay.
        let _ = self.conn.pc.close().await;
    }

    /// The media path goes silent (no RTP, no STUN, no DTLS either way) while
    /// the signaling socket stays open and keeps reading. Returns when.
    pub fn silence_media(&self) -> Instant {
        if let Some(relay) = self.conn.relay() {
            relay.cut();
        }
        if let Some(sender) = &self.conn.sender {
            sender.abort();
        }
        Instant::now()
    }
}

impl Conn {
    fn relay(&self) -> Option<Arc<Relay>> {
        self.shared.relay.lock().unwrap().clone()
    }

    fn rtp_packets(&self) -> u64 {
        self.shared.rtp_total.load(Ordering::Relaxed)
    }

    fn messages(&self) -> Vec<Value> {
        self.shared.messages.lock().unwrap().iter().map(|(_, m)| m.clone()).collect()
    }

    fn message_summary(&self) -> String {
        let brief: Vec<Value> = self.messages().into_iter().map(without_sdp).collect();
        Value::from(brief).to_string()
    }

    async fn wait_connected(&self, name: &str, limit: Duration) -> anyhow::Result<()> {
        let mut state = self.shared.state.subscribe();
        let connected = tokio::time::timeout(limit, state.wait_for(|s| *s == RTCPeerConnectionState::Connected)).await;
        if !matches!(connected, Ok(Ok(_))) {
            bail!("{name}: not connected within {limit:?}, state {}", *self.shared.state.borrow());
        }
        Ok(())
    }

    async fn wait_message_since(
        &self,
        name: &str,
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
                bail!("{name}: no matching message within {limit:?}; got {}", self.message_summary());
            }
        }
    }

    fn send_text(&self, text: impl Into<String>) -> anyhow::Result<()> {
        self.outbox.send(Message::text(text.into())).context("signaling task has stopped")
    }

    async fn request(&self, name: &str, mut body: Value) -> anyhow::Result<Value> {
        let op = self.shared.op();
        body["opId"] = json!(op);
        self.send_text(body.to_string())?;
        let (_, reply) = self
            .wait_message_since(name, 0, STEP, |m| m["replyTo"] == op.as_str())
            .await
            .with_context(|| format!("{name}: no reply to {}", without_sdp(body.clone())))?;
        Ok(reply)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.signaling.abort();
        if let Some(sender) = &self.sender {
            sender.abort();
        }
        // The relay's task ends with it; the track readers end with the connection.
        self.shared.relay.lock().unwrap().take();
        // Dropping the handle would leave the connection's driver running.
        let pc = self.pc.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = pc.close().await;
            });
        }
    }
}

/// A peer connection with its local offer set: one `sendonly` Opus track
/// (returned, with its SSRC) or one `recvonly` audio m-line.
async fn peer_connection(
    shared: &Arc<Shared>,
    plan: &Plan,
) -> anyhow::Result<(Arc<dyn PeerConnection>, Option<(Arc<TrackLocalStaticRTP>, u32)>)> {
    let opus = RTCRtpCodec {
        mime_type: "audio/opus".into(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
        rtcp_feedback: vec![],
    };
    let mut media_engine = MediaEngine::default();
    media_engine.register_codec(RTCRtpCodecParameters { rtp_codec: opus.clone(), payload_type: OPUS_PT }, RtpCodecKind::Audio)?;
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
    let track = if plan.publish {
        let ssrc: u32 = rand::random();
        let name = &plan.name;
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
        Some((track, ssrc))
    } else {
        let init = RTCRtpTransceiverInit { direction: RTCRtpTransceiverDirection::Recvonly, ..Default::default() };
        pc.add_transceiver_from_kind(RtpCodecKind::Audio, Some(init)).await?;
        None
    };
    let offer = pc.create_offer(None).await?;
    pc.set_local_description(offer).await?;
    // No candidates needed: the ICE-lite server learns our address from our
    // STUN checks.
    Ok((pc, track))
}

/// Owns the signaling socket: acks server heartbeats at once and sends its
/// own every interval, applies the SFU's answers (setting up the relay on
/// the first), answers every server offer with an `sdpAnswer` request,
/// records every other frame, writes what the test queues.
async fn run_signaling(mut ws: Socket, pc: Arc<dyn PeerConnection>, shared: Arc<Shared>, mut outbox: mpsc::UnboundedReceiver<Message>) {
    let mut heartbeat: Option<tokio::time::Interval> = None;
    let mut heartbeat_seq = 0u64;
    let started = Instant::now();
    loop {
        let tick = async {
            match heartbeat.as_mut() {
                Some(interval) => interval.tick().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            incoming = ws.next() => {
                let text = match incoming {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = frame.map_or((None, String::new()), |f| (Some(u16::from(f.code)), f.reason.to_string()));
                        shared.record(json!({ "_closed": { "code": code, "reason": reason } }));
                        return;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        shared.record(json!({ "_closed": { "error": e.to_string() } }));
                        return;
                    }
                    None => {
                        shared.record(json!({ "_closed": {} }));
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
                if let Some(seq) = json_u64(&message["seq"]) {
                    shared.last_seq.fetch_max(seq, Ordering::Relaxed);
                }
                if let Some(hb) = message.get("heartbeat") {
                    let ack = json!({ "heartbeatAck": { "seq": hb.get("seq").cloned().unwrap_or(json!("0")), "echoSentAtMs": hb.get("sentAtMs").cloned().unwrap_or(json!("0")) } });
                    if ws.send(Message::text(ack.to_string())).await.is_err() {
                        return;
                    }
                    continue;
                }
                if message.get("heartbeatAck").is_some() {
                    shared.heartbeat_acks.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Some(welcome) = message.get("welcome") {
                    let every = Duration::from_millis(json_u64(&welcome["heartbeatIntervalMs"]).unwrap_or(2000).max(100));
                    heartbeat = Some(tokio::time::interval_at(tokio::time::Instant::now() + every, every));
                }
                shared.learn_members(&message);
                if let Some(answer) = message.get("sdpAnswer")
                    && let Err(e) = apply_answer(&pc, &shared, answer["sdp"].as_str().unwrap_or_default()).await
                {
                    shared.fail(format!("applying the server's answer: {e:#}"));
                }
                if let Some(offer) = message.get("sdpOffer") {
                    match answer_offer(&pc, &shared, offer["sdp"].as_str().unwrap_or_default()).await {
                        Ok(sdp) => {
                            let op = shared.op();
                            shared.answer_ops.lock().unwrap().insert(op.clone());
                            let reply = json!({ "opId": op, "sdpAnswer": { "callId": offer["callId"], "sessionId": offer["sessionId"], "revision": offer["revision"], "sdp": sdp } });
                            if ws.send(Message::text(reply.to_string())).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => shared.fail(format!("answering a server offer: {e:#}")),
                    }
                }
                if let Some(op) = message["replyTo"].as_str()
                    && message.get("error").is_some()
                    && shared.answer_ops.lock().unwrap().contains(op)
                {
                    shared.fail(format!("our sdpAnswer was refused: {}", message["error"]));
                }
                shared.record(message);
            }
            _ = tick => {
                heartbeat_seq += 1;
                let beat = json!({ "heartbeat": {
                    "seq": heartbeat_seq.to_string(),
                    "sentAtMs": started.elapsed().as_millis().to_string(),
                    "ackSeq": shared.last_seq.load(Ordering::Relaxed).to_string(),
                } });
                if ws.send(Message::text(beat.to_string())).await.is_err() {
                    return;
                }
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

/// Applies an SFU answer (to our join offer or an ICE restart); the first
/// one sets up the relay in front of the server's media socket.
async fn apply_answer(pc: &Arc<dyn PeerConnection>, shared: &Shared, sdp: &str) -> anyhow::Result<()> {
    let existing = shared.relay.lock().unwrap().clone();
    let relay = match existing {
        Some(relay) => relay,
        None => {
            let server = host_candidate(sdp).context("no host candidate in the server's answer")?;
            let relay = Arc::new(Relay::start(server).await?);
            *shared.relay.lock().unwrap() = Some(relay.clone());
            relay
        }
    };
    let answer = rewrite_candidates(sdp, relay.server, relay.local);
    pc.set_remote_description(RTCSessionDescription::answer(answer)?).await?;
    Ok(())
}

async fn answer_offer(pc: &Arc<dyn PeerConnection>, shared: &Shared, offer: &str) -> anyhow::Result<String> {
    let relay = shared.relay.lock().unwrap().clone().context("a server offer before the server's answer")?;
    let offer = rewrite_candidates(offer, relay.server, relay.local);
    pc.set_remote_description(RTCSessionDescription::offer(offer)?).await?;
    let answer = pc.create_answer(None).await?;
    pc.set_local_description(answer).await?;
    Ok(pc.local_description().await.context("no local answer")?.sdp)
}

/// One Opus frame every 20 ms, naming the sender in the payload.
async fn send_audio(track: Arc<TrackLocalStaticRTP>, ssrc: u32, sender: u64, shared: Arc<Shared>) {
    let mut payload = vec![0u8; FRAME_BYTES];
    payload[0] = OPUS_TOC;
    payload[1..9].copy_from_slice(&sender.to_be_bytes());
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

/// The payload's sender tag: FNV-1a of the identity.
fn tag(identity: &str) -> u64 {
    identity.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// A proto3 JSON 64-bit integer (a decimal string; a number is accepted).
pub fn json_u64(value: &Value) -> Option<u64> {
    value.as_str().and_then(|s| s.parse().ok()).or_else(|| value.as_u64())
}

/// `error.code` of a reply frame, or the whole frame if it is no error.
pub fn error_code(reply: &Value) -> String {
    reply["error"]["code"].as_str().map_or_else(|| reply.to_string(), str::to_owned)
}

/// The close code of a recorded `{"_closed":{..}}`.
pub fn close_code(closed: &Value) -> Option<u16> {
    closed["_closed"]["code"].as_u64().and_then(|c| u16::try_from(c).ok())
}

/// `value` with every `sdp` string shortened, for failure reports.
fn without_sdp(mut value: Value) -> Value {
    match &mut value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "sdp" && v.is_string() {
                    *v = json!("...");
                } else {
                    *v = without_sdp(v.take());
                }
            }
        }
        Value::Array(items) => {
            for v in items.iter_mut() {
                *v = without_sdp(v.take());
            }
        }
        _ => {}
    }
    value
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

/// A bare device-protocol socket for tests that write frames by hand. It
/// acks the server's heartbeats on the way and hides them; nothing else.
pub struct Raw {
    ws: Socket,
    /// Highest `seq` seen.
    pub last_seq: u64,
    next_op: u64,
}

impl Raw {
    /// Connects to `url` (see [`Server::ws_url`]).
    pub async fn connect(url: &str) -> anyhow::Result<Raw> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.with_context(|| format!("connecting {url}"))?;
        Ok(Raw { ws, last_seq: 0, next_op: 1 })
    }

    /// Connects with `token` and says hello; returns the socket and the `welcome` body.
    pub async fn register(server: &Server, token: &str) -> anyhow::Result<(Raw, Value)> {
        let mut raw = Raw::connect(&server.ws_url(token)).await?;
        raw.send(hello()).await?;
        let welcome = raw.next_matching(|f| f.get("welcome").is_some() || f.get("_closed").is_some() || f.get("rejected").is_some()).await?;
        let body = welcome.get("welcome").cloned().with_context(|| format!("expected a welcome, got {welcome}"))?;
        Ok((raw, body))
    }

    pub async fn send(&mut self, frame: Value) -> anyhow::Result<()> {
        self.send_message(Message::text(frame.to_string())).await
    }

    pub async fn send_message(&mut self, message: Message) -> anyhow::Result<()> {
        self.ws.send(message).await?;
        Ok(())
    }

    /// Sends `body` with a fresh `opId`; returns the reply.
    pub async fn request(&mut self, mut body: Value) -> anyhow::Result<Value> {
        let op = self.next_op.to_string();
        self.next_op += 1;
        body["opId"] = json!(op);
        self.send(body).await?;
        self.next_matching(|f| f["replyTo"] == op.as_str() || f.get("_closed").is_some()).await
    }

    /// The next server frame that is not a heartbeat (acked on the way), or
    /// `{"_closed":{"code":..}}` when the socket ends.
    pub async fn next(&mut self) -> anyhow::Result<Value> {
        loop {
            let message = match tokio::time::timeout(STEP, self.ws.next()).await.with_context(|| format!("no frame within {STEP:?}"))? {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Ok(json!({ "_closed": { "error": e.to_string() } })),
                None => return Ok(json!({ "_closed": {} })),
            };
            let text = match message {
                Message::Text(text) => text,
                Message::Close(frame) => {
                    let (code, reason) = frame.map_or((None, String::new()), |f| (Some(u16::from(f.code)), f.reason.to_string()));
                    return Ok(json!({ "_closed": { "code": code, "reason": reason } }));
                }
                _ => continue,
            };
            let frame: Value = serde_json::from_str(&text).with_context(|| format!("server sent non-JSON {text:?}"))?;
            if let Some(seq) = json_u64(&frame["seq"]) {
                self.last_seq = self.last_seq.max(seq);
            }
            if let Some(hb) = frame.get("heartbeat") {
                let ack = json!({ "heartbeatAck": { "seq": hb.get("seq").cloned().unwrap_or(json!("0")), "echoSentAtMs": hb.get("sentAtMs").cloned().unwrap_or(json!("0")) } });
                if let Err(e) = self.send(ack).await {
                    // The socket is going away; the end is what the caller sees.
                    return Ok(json!({ "_closed": { "error": e.to_string() } }));
                }
                continue;
            }
            if frame.get("heartbeatAck").is_some() {
                continue;
            }
            return Ok(frame);
        }
    }

    /// The next frame that satisfies `wanted`, skipping others; the socket's
    /// end always matches.
    pub async fn next_matching(&mut self, wanted: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        loop {
            let frame = self.next().await?;
            if wanted(&frame) || frame.get("_closed").is_some() {
                return Ok(frame);
            }
        }
    }

    /// Reads until the socket ends; the close code (`None`: no close frame).
    pub async fn closed(&mut self) -> anyhow::Result<Option<u16>> {
        let end = self.next_matching(|_| false).await?;
        Ok(close_code(&end))
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
