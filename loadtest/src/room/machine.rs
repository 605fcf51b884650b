//! The room core, sans-IO: what each device of a room does and what the
//! room measured. Inputs carry `now` (the driver reads the clock once per
//! wake); outputs are datagrams to send, sockets to open or close, and
//! control actions for the devices' SDK clients. Deadlines are named
//! [`Timer`]s, so a wake handles what is due, not a scan of every device.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetcall_peer::{Datagram, Mode, Peer, PeerConfig, PeerEvent, Sent, FRAME_TICKS};
use fleetcall_signaling::client::{ClientError, ClientEvent};
use fleetcall_signaling::ids::CallId;
use fleetcall_signaling::pb::{self, CallPhase, EndReason, ErrorCode, ParticipantStatus, client_frame};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::audio::Mic;
use crate::context::Ctx;
use crate::ledger::{Ledger, Match, Member};
use crate::outcome::{FaultOutcome, GroupResult, Live, secs};
use crate::scenario::{ControlPath, FaultKind};
use crate::timers::Timers;

use super::{RoomCommand, RoomPlan};

/// After the stop, receive this long before leaving (packets in flight).
const DRAIN: Duration = Duration::from_millis(600);
/// A device's loss counts from this long after it first hears a talker
/// (the other publishers' streams open through renegotiation meanwhile).
const RX_SETTLE: Duration = Duration::from_secs(1);
/// Longest wait for the goodbyes at the end.
pub(super) const GOODBYE: Duration = Duration::from_secs(4);
/// Another talker sent this recently: it is up.
const TALKER_RECENT: Duration = Duration::from_millis(100);

/// Requests whose replies matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Req {
    /// QUIC: `GroupCreate`.
    Create,
    /// QUIC: `GroupInvite`.
    Invite,
    /// QUIC: `GroupJoin`.
    Join,
    /// WebSocket: `RoomJoin`.
    RoomJoin,
    /// The join offer.
    Offer,
    /// An answer to the server's offer.
    Answer,
    /// `GroupLeave` or `Decline`.
    Leave,
}

/// Why a request failed.
#[derive(Debug)]
pub struct ReqError {
    /// The server's error code, when it refused.
    code: Option<ErrorCode>,
    message: String,
    /// The session was lost or the request timed out (a fault, a
    /// restart): tried again, not a failure.
    transient: bool,
}

impl From<ClientError> for ReqError {
    fn from(e: ClientError) -> Self {
        let transient =
            matches!(e, ClientError::SessionLost | ClientError::TimedOut | ClientError::Stopped);
        match e {
            ClientError::Refused { code, message, .. } => {
                ReqError { code: Some(code), message, transient: false }
            }
            other => ReqError { code: None, message: other.to_string(), transient },
        }
    }
}

/// What a device's SDK client is to do (the driver owns the clients).
#[derive(Debug)]
pub enum Action {
    /// Register as `id` (QUIC: enroll and connect; WebSocket: a token for
    /// `room`, then connect); answered by [`RoomCore::handle_registered`].
    Register {
        /// The device id.
        id: String,
        /// The named room (WebSocket), or none (QUIC).
        room: Option<String>,
    },
    /// Send a request; answered by [`RoomCore::handle_reply`].
    Request(Req, client_frame::Kind),
    /// Offer media to the call ([`Req::Offer`]).
    SdpOffer {
        /// The call.
        call: CallId,
        /// The offer.
        sdp: String,
    },
    /// Answer the server's offer ([`Req::Answer`]).
    SdpAnswer {
        /// The call.
        call: CallId,
        /// The offer's revision.
        revision: u64,
        /// The answer.
        sdp: String,
    },
    /// Stop (or resume) reading and writing the control stream.
    Stall(bool),
    /// Vanish: cut the link silently and forget the client, so it does not
    /// reconnect.
    Kill,
    /// Forget the client (the server refused it for good).
    Forget,
    /// Leave `call` (bounded by [`GOODBYE`]), then close, in the background.
    Goodbye {
        /// The call to leave, if any.
        call: Option<CallId>,
    },
}

/// What the room asks of its driver.
#[derive(Debug)]
pub enum Output {
    /// Send a datagram from `member`'s media socket.
    Transmit {
        /// Whose socket.
        member: Member,
        /// What.
        datagram: Datagram,
    },
    /// Bind a media socket for `member`; answered by
    /// [`RoomCore::handle_media_socket`].
    OpenMedia(Member),
    /// Close `member`'s media socket.
    CloseMedia(Member),
    /// Something for `member`'s SDK client to do.
    Control {
        /// Whose client.
        member: Member,
        /// What.
        action: Action,
    },
    /// Nothing more until this time (call [`RoomCore::handle_timeout`]) or
    /// the next input.
    Timeout(Option<Instant>),
}

/// The room's deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Timer {
    /// A device's ramp slot: it registers.
    Start(Member),
    /// A device that left (churn) or failed to join tries again.
    Rejoin(Member),
    /// A stall fault ends.
    StallEnd(Member),
    /// A media-drop fault ends.
    MediaDropEnd(Member),
    /// A device's WebRTC peer asked for time.
    Peer(Member),
    /// The stop's drain ends: say goodbye.
    Drain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before its ramp slot.
    Pending,
    /// Registering (QUIC or WebSocket).
    Connecting,
    /// Registered, not in the call.
    Ready,
    /// Join sent; media being set up.
    Joining,
    /// In the call (media may still be connecting).
    InCall,
    /// Left on purpose; rejoins when [`Timer::Rejoin`] fires.
    Away,
    /// Killed, or stopped at the end.
    Dead,
}

/// A device's control session (its SDK client lives in the driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Session {
    None,
    /// Registered; `connected`: its connection is up now (from its events).
    Up { connected: bool },
}

/// A device's current participation in the room's call.
#[derive(Debug, Default)]
struct Participation {
    /// The join request, and whether a talker was already up then
    /// (join-to-first-audio counts only then).
    join_at: Option<(Instant, bool)>,
    /// QUIC: part of the current call before (may `GroupJoin` directly).
    member_before: bool,
    /// The room call (its serial) the device takes part in.
    serial: Option<u64>,
}

/// A device's media: its peer, once its socket is bound.
#[derive(Debug)]
enum Media {
    /// The socket is being bound for the call's join offer.
    Binding(CallId),
    /// The peer; `up`: media connected now.
    Peer { peer: Box<Peer>, up: bool },
}

#[derive(Debug)]
struct Dev {
    id: String,
    talker: bool,
    mic: Mic,
    phase: Phase,
    session: Session,
    /// Fresh sessions seen (`Connected { resumed: false }`): the first is
    /// the registration, later ones re-registrations.
    fresh_sessions: u32,
    join: Participation,
    media: Option<Media>,
    /// The last packet it sent.
    last_sent: Option<Instant>,
}

impl Dev {
    fn media_up(&self) -> bool {
        matches!(self.media, Some(Media::Peer { up: true, .. }))
    }
}

/// The call the room's devices are in.
#[derive(Debug, Default)]
struct RoomCall {
    id: Option<CallId>,
    /// A `GroupCreate` is outstanding.
    creating: bool,
    /// Who created the current call (the preferred inviter).
    creator: Option<Member>,
    /// Counts the room's calls: a server restarts its call ids, so an id
    /// alone does not tell the call before a restart from the one after.
    serial: u64,
}

/// A fault injected, watched until the room converges.
#[derive(Debug)]
struct Watch {
    kind: FaultKind,
    subject: Option<Member>,
    device: String,
    start: Instant,
    at_s: f64,
    /// When the fault ended (or the restarted server served).
    end: Instant,
    /// Kill / restart: members still to be told / to hear audio again.
    pending: HashSet<Member>,
    detected: Option<Instant>,
    converged: Option<Instant>,
}

/// Where the room is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    Running,
    /// Told to stop: no more sending, packets in flight still count.
    Draining,
    /// Goodbyes said; the room ends once every device is gone or then.
    Ending { until: Instant },
}

/// One room of simulated devices. See the [module docs](self).
pub struct RoomCore {
    ctx: Arc<Ctx>,
    plan: RoomPlan,
    name: String,
    devs: Vec<Dev>,
    call: RoomCall,
    lifecycle: Lifecycle,
    timers: Timers<Timer>,
    ledger: Ledger,
    watches: Vec<Watch>,
    /// Distinct slot streams seen per receiver.
    slot_streams: HashMap<Member, HashSet<Arc<str>>>,
    result: GroupResult,
    rng: StdRng,
    outputs: VecDeque<Output>,
}

impl std::fmt::Debug for RoomCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomCore").field("name", &self.name).field("lifecycle", &self.lifecycle).finish_non_exhaustive()
    }
}

impl RoomCore {
    /// A room whose devices start at their ramp slots.
    pub fn new(ctx: Arc<Ctx>, plan: RoomPlan) -> Self {
        let name = format!("{}-r{}", ctx.prefix, plan.index);
        let devs = (0..plan.per_room)
            .map(|m| {
                let talker = m < plan.talkers;
                let speech = ctx.speech_variant(m.min(plan.talkers.saturating_sub(1)));
                Dev {
                    id: format!("{name}-{m}"),
                    talker,
                    mic: Mic::new(speech, ctx.silence.clone(), talker, ctx.talk, m * 37),
                    phase: Phase::Pending,
                    session: Session::None,
                    fresh_sessions: 0,
                    join: Participation::default(),
                    media: None,
                    last_sent: None,
                }
            })
            .collect();
        let mut timers = Timers::default();
        for (m, start) in plan.starts.iter().enumerate() {
            timers.set(Timer::Start(m), *start);
        }
        RoomCore {
            ledger: Ledger::new(plan.per_room, ctx.window),
            rng: StdRng::seed_from_u64(plan.seed),
            ctx,
            name,
            devs,
            call: RoomCall::default(),
            lifecycle: Lifecycle::Running,
            timers,
            watches: Vec::new(),
            slot_streams: HashMap::new(),
            result: GroupResult::default(),
            outputs: VecDeque::new(),
            plan,
        }
    }

    /// Whether the room is over: goodbyes said, and every device gone or
    /// their time up.
    pub fn is_done(&self, now: Instant) -> bool {
        match self.lifecycle {
            Lifecycle::Ending { until } => now >= until || self.devs.iter().all(|d| d.phase == Phase::Dead),
            _ => false,
        }
    }

    /// The next thing to do; [`Output::Timeout`] when there is nothing.
    pub fn poll_output(&mut self) -> Output {
        match self.outputs.pop_front() {
            Some(output) => output,
            None => Output::Timeout(self.timers.earliest()),
        }
    }

    /// What the room measured; `send_errors`: datagrams its sockets refused.
    pub fn finish(mut self, send_errors: u64) -> GroupResult {
        let slots = self.slot_streams.values().map(HashSet::len).max().unwrap_or(0);
        let slot_mode = slots > 0;
        let counted = !slot_mode || self.plan.talkers <= slots;
        if slot_mode {
            self.result.slot_rooms += 1;
        }
        if !counted {
            self.result.uncounted_rooms += 1;
        }
        let totals = self.ledger.totals(|_, _| counted);
        tracing::debug!(
            room = %self.name,
            streams = totals.streams,
            expected = totals.expected,
            delivered = totals.delivered,
            sent = ?(0..self.devs.len()).map(|m| self.ledger.sent_by(m)).collect::<Vec<_>>(),
            "room totals"
        );
        self.result.add_media(totals);
        let ramp_end = self.ctx.ramp_end;
        for w in &self.watches {
            let from = if matches!(w.kind, FaultKind::Kill) { w.start } else { w.end };
            self.result.faults.push(FaultOutcome {
                kind: w.kind,
                device: w.device.clone(),
                at_s: if w.kind == FaultKind::ServerRestart { w.at_s } else { secs(ramp_end, w.start) },
                detected_s: w.detected.map(|t| secs(w.start, t)),
                converged_s: w.converged.map(|t| secs(from, t)),
            });
        }
        self.result.send_errors += send_errors;
        self.result
    }

    fn stopping(&self) -> bool {
        self.lifecycle != Lifecycle::Running
    }

    fn act(&mut self, member: Member, action: Action) {
        self.outputs.push_back(Output::Control { member, action });
    }

    // ---- time ---------------------------------------------------------------------------------

    /// Time passed: handles every timer that is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                Timer::Drain => self.say_goodbye(now),
                Timer::Start(m) => {
                    if !self.stopping() && self.devs[m].phase == Phase::Pending {
                        self.devs[m].phase = Phase::Connecting;
                        let id = self.devs[m].id.clone();
                        let room = (self.plan.control == ControlPath::Ws).then(|| self.name.clone());
                        self.act(m, Action::Register { id, room });
                    }
                }
                Timer::Rejoin(m) => {
                    if !self.stopping() && matches!(self.devs[m].phase, Phase::Away | Phase::Ready) {
                        self.devs[m].phase = Phase::Ready;
                        self.want_join(m, now);
                    }
                }
                Timer::StallEnd(m) => {
                    if self.devs[m].session != Session::None {
                        self.act(m, Action::Stall(false));
                    }
                }
                // The fault's end is all there is to it: `dropping` reads the timer.
                Timer::MediaDropEnd(_) => {}
                Timer::Peer(m) => {
                    if let Some(peer) = self.peer_mut(m) {
                        peer.handle_timeout(now);
                        self.drain_peer(m, now);
                    }
                }
            }
        }
    }

    /// The 20 ms send tick the driver scheduled for `scheduled` fired:
    /// every device with media sends its microphone's next frame.
    pub fn handle_tick(&mut self, now: Instant, scheduled: Instant) {
        self.result.tick_late.record(now.saturating_duration_since(scheduled));
        if self.stopping() {
            return;
        }
        for m in 0..self.devs.len() {
            if !self.devs[m].media_up() || self.dropping(m, now) {
                continue;
            }
            let d = &mut self.devs[m];
            let frame = d.mic.next_frame().clone();
            let Some(Media::Peer { peer, .. }) = &mut d.media else { continue };
            match peer.send_audio(now, &frame.audio()) {
                Sent::Written { timestamp } => {
                    // A payload exists: the frame was written.
                    let payload = frame.payload.as_deref().unwrap_or_default();
                    let talker = d.talker && frame.voice;
                    self.ledger.on_sent(now, m, timestamp, payload, talker, d.talker);
                    d.last_sent = Some(now);
                    Live::add(&self.ctx.live.sent, 1);
                }
                Sent::Dtx => {}
                Sent::NotConnected => self.result.unsent += 1,
            }
            self.drain_peer(m, now);
        }
    }

    // ---- media ----------------------------------------------------------------------------------

    /// A datagram arrived on `m`'s media socket.
    pub fn handle_datagram(&mut self, now: Instant, m: Member, source: SocketAddr, contents: &[u8]) {
        if self.dropping(m, now) {
            return;
        }
        if let Some(peer) = self.peer_mut(m) {
            peer.handle_datagram(now, source, contents);
            self.drain_peer(m, now);
        }
    }

    /// The socket [`Output::OpenMedia`] asked for is bound at `local` (or
    /// could not be): the peer is created and offered to the call.
    pub fn handle_media_socket(&mut self, now: Instant, m: Member, local: std::io::Result<SocketAddr>) {
        let Some(Media::Binding(call)) = self.devs[m].media else { return };
        let local = match local {
            Ok(local) => local,
            Err(e) => {
                self.devs[m].media = None;
                self.fail(m, format!("media: binding a media socket on {}: {e}", self.ctx.bind_ip));
                return;
            }
        };
        // A timestamp residue per member keeps the room's timestamps apart.
        let first_timestamp = (self.rng.random::<u32>() / FRAME_TICKS) * FRAME_TICKS + m as u32;
        let first_seq: u16 = self.rng.random();
        let config = PeerConfig { mode: Mode::Rtp, first_timestamp, first_seq, ..PeerConfig::default() };
        let offer = Peer::new(now, local, &self.ctx.identity, config).and_then(|mut peer| {
            let offer = peer.create_offer(now)?;
            Ok((peer, offer))
        });
        match offer {
            Ok((peer, sdp)) => {
                self.devs[m].media = Some(Media::Peer { peer: Box::new(peer), up: false });
                self.drain_peer(m, now);
                if self.devs[m].session != Session::None {
                    self.act(m, Action::SdpOffer { call, sdp });
                }
            }
            Err(e) => {
                self.stop_media(m, now);
                self.fail(m, format!("media: {e}"));
            }
        }
    }

    /// Whether a media-drop fault holds for `m` at `now`.
    fn dropping(&self, m: Member, now: Instant) -> bool {
        self.timers.get(Timer::MediaDropEnd(m)).is_some_and(|until| now < until)
    }

    fn peer_mut(&mut self, m: Member) -> Option<&mut Peer> {
        match &mut self.devs[m].media {
            Some(Media::Peer { peer, .. }) => Some(peer),
            _ => None,
        }
    }

    /// Starts the device's media for `call`: a socket first.
    fn start_media(&mut self, m: Member, call: CallId, now: Instant) {
        self.stop_media(m, now);
        self.devs[m].media = Some(Media::Binding(call));
        self.outputs.push_back(Output::OpenMedia(m));
    }

    fn stop_media(&mut self, m: Member, now: Instant) {
        if let Some(media) = self.devs[m].media.take() {
            if matches!(media, Media::Peer { up: true, .. }) {
                Live::sub(&self.ctx.live.media_up, 1);
            }
            self.timers.clear(Timer::Peer(m));
            // A media-drop fault strikes the media it found, not the next.
            self.timers.clear(Timer::MediaDropEnd(m));
            self.outputs.push_back(Output::CloseMedia(m));
        }
        // Media torn down: the device stops counting loss until it hears
        // again after its next join.
        self.ledger.stop_counting(m, now);
    }

    /// Carries out what member `m`'s peer asked for: datagrams out (unless
    /// a media-drop fault holds), its events, its next deadline.
    fn drain_peer(&mut self, m: Member, now: Instant) {
        loop {
            let Some(peer) = self.peer_mut(m) else { return };
            match peer.poll_output() {
                fleetcall_peer::Output::Transmit(datagram) => {
                    if !self.dropping(m, now) {
                        self.outputs.push_back(Output::Transmit { member: m, datagram });
                    }
                }
                fleetcall_peer::Output::Event(event) => self.on_peer_event(m, event, now),
                fleetcall_peer::Output::Timeout(Some(at)) => return self.timers.set(Timer::Peer(m), at),
                fleetcall_peer::Output::Timeout(None) => return self.timers.clear(Timer::Peer(m)),
            }
        }
    }

    fn on_peer_event(&mut self, m: Member, event: PeerEvent, now: Instant) {
        match event {
            PeerEvent::Connected => {
                tracing::debug!(device = %self.devs[m].id, since_join = ?self.devs[m].join.join_at.map(|(t, _)| now - t), "media connected");
                if let Some(Media::Peer { up: up @ false, .. }) = &mut self.devs[m].media {
                    *up = true;
                    Live::add(&self.ctx.live.media_up, 1);
                }
            }
            PeerEvent::Disconnected => {
                if let Some(Media::Peer { up: up @ true, .. }) = &mut self.devs[m].media {
                    *up = false;
                    Live::sub(&self.ctx.live.media_up, 1);
                }
            }
            PeerEvent::Failed(reason) => {
                self.fail(m, format!("media failed: {reason}"));
                self.stop_media(m, now);
            }
            PeerEvent::Packet(packet) => {
                Live::add(&self.ctx.live.received, 1);
                if packet.stream.starts_with("slot-") {
                    self.slot_streams.entry(m).or_default().insert(packet.stream.clone());
                }
                let sent = match self.ledger.on_received(now, m, packet.timestamp, &packet.payload) {
                    Match::Exact(s) | Match::Payload(s) | Match::Reencoded(s) => s,
                    Match::Own | Match::Unknown => return,
                };
                if !sent.speaker {
                    return;
                }
                if let Some((at, eligible)) = self.devs[m].join.join_at.take() {
                    tracing::debug!(device = %self.devs[m].id, since_join = ?(now - at), "first audio");
                    if eligible {
                        self.result.join_to_audio.record(now.saturating_duration_since(at));
                    }
                    // It hears: its loss counts once the other streams had
                    // time to open too.
                    if !self.faulted(m) {
                        self.ledger.start_counting(m, now + RX_SETTLE);
                    }
                }
                self.heard(m, sent.sender, now);
            }
            _ => {}
        }
    }

    /// A talker packet of `sender` reached `receiver`: faults converge.
    fn heard(&mut self, receiver: Member, sender: Member, now: Instant) {
        for w in &mut self.watches {
            if w.converged.is_some() || now < w.end {
                continue;
            }
            match w.kind {
                FaultKind::Stall | FaultKind::MediaDrop => {
                    if w.subject == Some(receiver) || w.subject == Some(sender) {
                        w.converged = Some(now);
                    }
                }
                FaultKind::ServerRestart => {
                    w.pending.remove(&receiver);
                    w.pending.remove(&sender);
                    if w.pending.is_empty() {
                        w.converged = Some(now);
                    }
                }
                FaultKind::Kill => {}
            }
        }
    }

    // ---- devices: join, leave -------------------------------------------------------------------

    /// A device that should be in the call asks to be.
    fn want_join(&mut self, m: Member, now: Instant) {
        if self.stopping() || self.devs[m].phase != Phase::Ready {
            return;
        }
        if self.plan.control == ControlPath::Ws {
            return self.room_join(m, now);
        }
        let Some(call) = self.call.id else {
            if !self.call.creating {
                self.create_call(m, now);
            }
            return;
        };
        if self.devs[m].join.member_before {
            self.quic_group_join(m, call, now);
        } else if let Some(inviter) = self.inviter() {
            // The invitation comes back as `IncomingCall`, answered with `GroupJoin`.
            let invitees = vec![self.devs[m].id.clone()];
            self.request(inviter, Req::Invite, client_frame::Kind::GroupInvite(pb::GroupInvite { call_id: call.0, invitees }));
            self.devs[m].phase = Phase::Joining;
        }
    }

    /// A member that can invite: in the call, connected, not stalled; the
    /// call's creator first.
    fn inviter(&self) -> Option<Member> {
        let healthy = |m: Member| {
            let d = &self.devs[m];
            d.phase == Phase::InCall
                && !self.timers.is_set(Timer::StallEnd(m))
                && d.session == Session::Up { connected: true }
        };
        self.call.creator.filter(|&c| healthy(c)).or_else(|| (0..self.devs.len()).find(|&m| healthy(m)))
    }

    /// Whether another talker is sending right now (a join then measures
    /// setup, not a talker's pause).
    fn talker_up(&self, except: Member, now: Instant) -> bool {
        self.devs.iter().enumerate().any(|(i, d)| {
            i != except
                && d.talker
                && d.media_up()
                && d.last_sent.is_some_and(|t| now.saturating_duration_since(t) < TALKER_RECENT)
        })
    }

    fn joining(&mut self, m: Member, now: Instant) {
        self.devs[m].phase = Phase::Joining;
        self.devs[m].join.join_at = Some((now, self.talker_up(m, now)));
    }

    fn create_call(&mut self, m: Member, now: Instant) {
        self.call.creating = true;
        self.joining(m, now);
        let name = self.name.clone();
        self.request(m, Req::Create, client_frame::Kind::GroupCreate(pb::GroupCreate { name, invitees: Vec::new() }));
    }

    fn room_join(&mut self, m: Member, now: Instant) {
        self.joining(m, now);
        let room = self.name.clone();
        self.request(m, Req::RoomJoin, client_frame::Kind::RoomJoin(pb::RoomJoin { room }));
    }

    fn quic_group_join(&mut self, m: Member, call: CallId, now: Instant) {
        self.joining(m, now);
        self.request(m, Req::Join, client_frame::Kind::GroupJoin(pb::GroupJoin { call_id: call.0 }));
    }

    /// The room's call is `call` (from the join's reply or the `CallState`,
    /// whichever comes first); device `m` takes part in it.
    fn adopt_room_call(&mut self, m: Member, call: CallId) {
        if self.call.id != Some(call) {
            self.call.id = Some(call);
            self.call.serial += 1;
        }
        self.devs[m].join.serial = Some(self.call.serial);
    }

    /// Sends a request of member `m` (if it has a session); the reply comes
    /// back to [`handle_reply`](Self::handle_reply).
    fn request(&mut self, m: Member, what: Req, kind: client_frame::Kind) {
        if self.devs[m].session != Session::None {
            self.act(m, Action::Request(what, kind));
        }
    }

    /// A request failed: a failure, or (session lost, timed out) a retry.
    fn fail_or_retry(&mut self, m: Member, what: &str, e: &ReqError) {
        if e.transient {
            self.result.retries += 1;
            tracing::debug!(device = %self.devs[m].id, what, error = %e.message, "retrying");
        } else {
            self.fail(m, format!("{what}: {}", e.message));
        }
    }

    fn fail(&mut self, m: Member, reason: String) {
        let reason = format!("{}: {reason}", self.devs[m].id);
        self.result.failures.push(&self.ctx.live, reason);
    }

    /// Leaves on purpose (churn).
    fn leave(&mut self, m: Member, now: Instant) {
        self.stop_media(m, now);
        // Gone on its own: it need not hear of a fault's victim anymore.
        for w in &mut self.watches {
            if w.kind == FaultKind::Kill && w.converged.is_none() && w.pending.remove(&m) && w.pending.is_empty() {
                w.converged = Some(now);
            }
        }
        if let Some(call) = self.call.id {
            self.request(m, Req::Leave, client_frame::Kind::GroupLeave(pb::GroupLeave { call_id: call.0 }));
        }
    }

    /// Device `m`'s participation in the call ended; `whole`: the call too.
    fn call_over(&mut self, m: Member, now: Instant, whole: bool) {
        self.stop_media(m, now);
        self.devs[m].join.serial = None;
        if whole {
            self.call.id = None;
            for d in &mut self.devs {
                d.join.member_before = false;
            }
        }
        let stopping = self.stopping();
        let d = &mut self.devs[m];
        if matches!(d.phase, Phase::InCall | Phase::Joining) && !stopping {
            // Not asked for: come back (a fault, a restart).
            d.phase = Phase::Ready;
            self.timers.set(Timer::Rejoin(m), now + Duration::from_millis(200));
        }
    }

    // ---- control plane --------------------------------------------------------------------------

    /// Device `m`'s registration finished after `elapsed`. Returns whether
    /// the device takes the session (false: the driver drops the client).
    pub fn handle_registered(&mut self, now: Instant, m: Member, result: Result<(), String>, elapsed: Duration) -> bool {
        if let Err(e) = result {
            self.devs[m].phase = Phase::Dead;
            self.fail(m, format!("registration: {e}"));
            return false;
        }
        match self.plan.control {
            ControlPath::Ws => self.result.ws_connect.record(elapsed),
            _ => self.result.register.record(elapsed),
        }
        Live::add(&self.ctx.live.registered, 1);
        if self.devs[m].phase == Phase::Dead || self.stopping() {
            return false;
        }
        self.devs[m].session = Session::Up { connected: true };
        self.devs[m].phase = Phase::Ready;
        self.want_join(m, now);
        true
    }

    /// The reply to a request of device `m`.
    pub fn handle_reply(&mut self, now: Instant, m: Member, what: Req, result: Result<u64, ReqError>) {
        let gone = self.devs[m].phase == Phase::Dead || self.stopping();
        match (what, result) {
            (Req::Create, Ok(call)) => {
                self.call.creating = false;
                if self.call.id != Some(CallId(call)) || self.devs[m].join.serial.is_none() {
                    self.call.serial += 1;
                }
                self.call.id = Some(CallId(call));
                self.call.creator = Some(m);
                self.devs[m].join.serial = Some(self.call.serial);
                self.devs[m].join.member_before = true;
                self.devs[m].phase = Phase::InCall;
                // Everyone registered and waiting joins now.
                for other in 0..self.devs.len() {
                    if other != m && self.devs[other].phase == Phase::Ready && !self.timers.is_set(Timer::Rejoin(other)) {
                        self.want_join(other, now);
                    }
                }
            }
            (Req::Create, Err(e)) => {
                self.call.creating = false;
                self.devs[m].phase = Phase::Ready;
                self.fail_or_retry(m, "group create", &e);
                self.timers.set(Timer::Rejoin(m), now + Duration::from_secs(1));
            }
            (Req::RoomJoin, _) if gone => {}
            (Req::RoomJoin, Ok(call)) => {
                self.adopt_room_call(m, CallId(call));
                if self.devs[m].phase == Phase::Joining {
                    self.devs[m].phase = Phase::InCall;
                }
            }
            (Req::RoomJoin, Err(e)) => {
                self.devs[m].phase = Phase::Ready;
                self.fail_or_retry(m, "room join", &e);
                self.timers.set(Timer::Rejoin(m), now + Duration::from_secs(1));
            }
            (Req::Join, Ok(_)) => {
                self.devs[m].join.serial = Some(self.call.serial);
                self.devs[m].join.member_before = true;
                self.devs[m].phase = Phase::InCall;
            }
            (Req::Join, Err(_)) if gone => {}
            (Req::Join, Err(e)) => {
                self.devs[m].phase = Phase::Ready;
                match e.code {
                    Some(ErrorCode::CallEnded | ErrorCode::UnknownCall) => {
                        // The group is gone (e.g. the server restarted): build it again.
                        self.call.id = None;
                        self.want_join(m, now);
                    }
                    Some(ErrorCode::Forbidden) => {
                        self.devs[m].join.member_before = false;
                        self.want_join(m, now);
                    }
                    _ => {
                        self.fail_or_retry(m, "group join", &e);
                        self.timers.set(Timer::Rejoin(m), now + Duration::from_secs(1));
                    }
                }
            }
            (Req::Invite, Err(e)) => {
                if !self.stopping() {
                    self.fail_or_retry(m, "group invite", &e);
                }
                // The invitees wait in `Joining`; put them back to try again.
                for i in 0..self.devs.len() {
                    let d = &mut self.devs[i];
                    if d.phase == Phase::Joining && !d.join.member_before && d.join.join_at.is_none() {
                        d.phase = Phase::Ready;
                        self.timers.set(Timer::Rejoin(i), now + Duration::from_secs(1));
                    }
                }
            }
            (Req::Offer | Req::Answer, Err(e)) if !gone => {
                let what = if what == Req::Offer { "SDP offer" } else { "SDP answer" };
                self.fail_or_retry(m, what, &e);
            }
            _ => {}
        }
    }

    /// An event of device `m`'s SDK client.
    pub fn handle_event(&mut self, now: Instant, m: Member, event: ClientEvent) {
        tracing::trace!(device = %self.devs[m].id, phase = ?self.devs[m].phase, ?event, "control event");
        if self.devs[m].phase == Phase::Dead {
            return;
        }
        match event {
            ClientEvent::Connected { resumed, .. } => {
                if let Session::Up { connected } = &mut self.devs[m].session {
                    *connected = true;
                }
                if !resumed {
                    self.devs[m].fresh_sessions += 1;
                    if self.devs[m].fresh_sessions > 1 {
                        // A fresh session after a lost one: every call of the old one is over.
                        self.record_reregistration(now);
                    }
                }
            }
            ClientEvent::Disconnected { .. } => {
                if let Session::Up { connected } = &mut self.devs[m].session {
                    *connected = false;
                }
            }
            ClientEvent::Ended { close, reason } => {
                // Refused for good (a credential problem): the SDK has stopped.
                self.stop_media(m, now);
                self.devs[m].phase = Phase::Dead;
                self.devs[m].session = Session::None;
                self.act(m, Action::Forget);
                self.fail(m, format!("refused by the server ({}): {reason}", close.as_str_name()));
            }
            ClientEvent::SessionUnknown { .. } => {
                self.stop_media(m, now);
                self.devs[m].join.serial = None;
                if matches!(self.devs[m].phase, Phase::InCall | Phase::Joining) {
                    self.devs[m].phase = Phase::Ready;
                    self.timers.set(Timer::Rejoin(m), now + Duration::from_millis(100));
                }
            }
            ClientEvent::IncomingCall(incoming) => {
                if Some(CallId(incoming.call_id)) == self.call.id && self.devs[m].phase == Phase::Joining {
                    self.devs[m].join.join_at = Some((now, self.talker_up(m, now)));
                    self.request(m, Req::Join, client_frame::Kind::GroupJoin(pb::GroupJoin { call_id: incoming.call_id }));
                } else if !self.stopping() {
                    // Not ours (a stale invitation): refuse.
                    self.request(m, Req::Leave, client_frame::Kind::Decline(pb::Decline { call_id: incoming.call_id }));
                }
            }
            ClientEvent::CallState(state) => self.on_call_state(m, state, now),
            ClientEvent::CallEnded(ended) => {
                if Some(CallId(ended.call_id)) != self.call.id && self.devs[m].join.serial.is_none() {
                    return;
                }
                if self.devs[m].join.serial != Some(self.call.serial) {
                    // The end of a call this device was in before (a stalled
                    // device reading the old server's last frames after a
                    // restart): only its own part is over.
                    return self.call_over(m, now, false);
                }
                let whole = matches!(
                    EndReason::try_from(ended.reason),
                    Ok(EndReason::ServerShutdown | EndReason::Empty | EndReason::EndedByOwner | EndReason::EndedByOperator)
                );
                self.call_over(m, now, whole);
            }
            ClientEvent::ParticipantUpdate(update) => {
                let Some(subject) = self.devs.iter().position(|d| d.id == update.device_id) else {
                    return;
                };
                let status = ParticipantStatus::try_from(update.status).unwrap_or(ParticipantStatus::Unspecified);
                self.told(m, subject, status, now);
            }
            ClientEvent::SdpAnswer(answer) => {
                if Some(CallId(answer.call_id)) != self.call.id {
                    return;
                }
                tracing::debug!(device = %self.devs[m].id, since_join = ?self.devs[m].join.join_at.map(|(t, _)| now - t), "sdp answer");
                let Some(peer) = self.peer_mut(m) else { return };
                let result = peer.accept_answer(now, &answer.sdp);
                self.drain_peer(m, now);
                if let Err(e) = result {
                    self.fail(m, format!("SDP answer: {e}"));
                }
            }
            ClientEvent::SdpOffer(offer) => {
                if Some(CallId(offer.call_id)) != self.call.id {
                    return;
                }
                tracing::debug!(device = %self.devs[m].id, since_join = ?self.devs[m].join.join_at.map(|(t, _)| now - t), "sdp offer");
                let Some(peer) = self.peer_mut(m) else { return };
                let result = peer.accept_offer(now, &offer.sdp);
                self.drain_peer(m, now);
                match result {
                    Ok(sdp) if self.devs[m].session != Session::None => {
                        self.act(m, Action::SdpAnswer { call: CallId(offer.call_id), revision: offer.revision, sdp })
                    }
                    Ok(_) => {}
                    Err(e) => self.fail(m, format!("SDP offer: {e}")),
                }
            }
            _ => {}
        }
    }

    fn on_call_state(&mut self, m: Member, state: pb::CallState, now: Instant) {
        let ours = state.group_name == self.name;
        if self.call.id.is_none() && self.call.creating && self.devs[m].phase == Phase::Joining && ours {
            // The creator hears of its call before the reply to the create
            // (events and replies travel different paths here).
            self.call.id = Some(CallId(state.call_id));
            self.call.serial += 1;
            self.devs[m].join.serial = Some(self.call.serial);
        }
        if self.plan.control == ControlPath::Ws
            && self.devs[m].phase == Phase::Joining
            && ours
            && state.phase != CallPhase::Ended as i32
        {
            // Likewise a room's joiner: its `CallState` may come before the
            // reply to `RoomJoin`.
            self.adopt_room_call(m, CallId(state.call_id));
        }
        if Some(CallId(state.call_id)) != self.call.id {
            return;
        }
        let me = &self.devs[m].id;
        let joining = state
            .participants
            .iter()
            .any(|p| p.device_id == *me && p.status == ParticipantStatus::Joining as i32);
        if joining && self.devs[m].media.is_none() && matches!(self.devs[m].phase, Phase::Joining | Phase::InCall) {
            self.devs[m].phase = Phase::InCall;
            self.start_media(m, CallId(state.call_id), now);
        }
        if state.phase == CallPhase::Ended as i32 {
            let whole = self.devs[m].join.serial == Some(self.call.serial);
            self.call_over(m, now, whole);
        }
    }

    /// Member `m` was told that `subject` changed status.
    fn told(&mut self, m: Member, subject: Member, status: ParticipantStatus, now: Instant) {
        for w in &mut self.watches {
            if w.subject != Some(subject) || w.converged.is_some() {
                continue;
            }
            match (w.kind, status) {
                (FaultKind::Kill, ParticipantStatus::Gone) => {
                    w.detected.get_or_insert(now);
                    w.pending.remove(&m);
                    if w.pending.is_empty() {
                        w.converged = Some(now);
                    }
                }
                (FaultKind::Stall, ParticipantStatus::Reconnecting | ParticipantStatus::Gone)
                | (FaultKind::MediaDrop, ParticipantStatus::Gone) => {
                    w.detected.get_or_insert(now);
                }
                _ => {}
            }
        }
    }

    fn record_reregistration(&mut self, now: Instant) {
        let restarted = *self.ctx.live.restarted_at.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ready) = restarted
            && let Ok(mut h) = self.ctx.live.reregister.lock()
        {
            h.record(now.saturating_duration_since(ready));
        }
    }

    // ---- orchestrator commands ------------------------------------------------------------------

    /// A command of the orchestrator.
    pub fn handle_command(&mut self, now: Instant, command: RoomCommand) {
        match command {
            RoomCommand::Churn { rejoin_after } => {
                let listeners: Vec<Member> = (0..self.devs.len())
                    .filter(|&m| {
                        let d = &self.devs[m];
                        !d.talker && d.phase == Phase::InCall && d.media_up() && !self.faulted(m)
                    })
                    .collect();
                if listeners.is_empty() {
                    return;
                }
                let m = listeners[self.rng.random_range(0..listeners.len())];
                self.leave(m, now);
                self.devs[m].phase = Phase::Away;
                self.timers.set(Timer::Rejoin(m), now + rejoin_after);
            }
            RoomCommand::Fault { kind, duration, at_s } => self.fault(kind, duration, at_s, now),
            RoomCommand::ServerRestarted { at_s, ready } => {
                let pending: HashSet<Member> = (0..self.devs.len()).filter(|&m| self.devs[m].phase != Phase::Dead).collect();
                for m in 0..self.devs.len() {
                    self.ledger.stop_counting(m, now);
                }
                self.watches.push(Watch {
                    kind: FaultKind::ServerRestart,
                    subject: None,
                    device: String::new(),
                    start: ready,
                    at_s,
                    end: ready,
                    pending,
                    detected: None,
                    converged: None,
                });
            }
            RoomCommand::Stop => {
                if self.lifecycle == Lifecycle::Running {
                    self.lifecycle = Lifecycle::Draining;
                    self.timers.set(Timer::Drain, now + DRAIN);
                }
            }
        }
    }

    fn faulted(&self, m: Member) -> bool {
        self.watches.iter().any(|w| w.subject == Some(m) && w.converged.is_none())
    }

    fn fault(&mut self, kind: FaultKind, duration: Duration, at_s: f64, now: Instant) {
        let candidates: Vec<Member> = (0..self.devs.len())
            .filter(|&m| self.devs[m].phase == Phase::InCall && self.devs[m].media_up() && !self.faulted(m))
            .collect();
        if candidates.is_empty() {
            let reason = format!("{}: no device to strike with {}", self.name, kind.as_str());
            self.result.failures.push(&self.ctx.live, reason);
            return;
        }
        let m = candidates[self.rng.random_range(0..candidates.len())];
        self.ledger.disturb(m, now);
        let mut pending = HashSet::new();
        match kind {
            FaultKind::Kill => {
                pending = (0..self.devs.len()).filter(|&o| o != m && self.devs[o].phase == Phase::InCall).collect();
                if std::mem::replace(&mut self.devs[m].session, Session::None) != Session::None {
                    self.act(m, Action::Kill);
                }
                self.devs[m].phase = Phase::Dead;
                self.stop_media(m, now);
            }
            FaultKind::Stall => {
                if self.devs[m].session != Session::None {
                    self.act(m, Action::Stall(true));
                }
                self.timers.set(Timer::StallEnd(m), now + duration);
            }
            FaultKind::MediaDrop => {
                if self.devs[m].media.is_some() {
                    self.timers.set(Timer::MediaDropEnd(m), now + duration);
                }
            }
            FaultKind::ServerRestart => {}
        }
        let end = if kind == FaultKind::Kill { now } else { now + duration };
        // Nobody else in the room: nothing to tell.
        let converged = (kind == FaultKind::Kill && pending.is_empty()).then_some(now);
        self.watches.push(Watch {
            kind,
            subject: Some(m),
            device: self.devs[m].id.clone(),
            start: now,
            at_s,
            end,
            pending,
            detected: None,
            converged,
        });
    }

    // ---- the end --------------------------------------------------------------------------------

    fn say_goodbye(&mut self, now: Instant) {
        self.lifecycle = Lifecycle::Ending { until: now + GOODBYE };
        for m in 0..self.devs.len() {
            self.stop_media(m, now);
            self.devs[m].phase = Phase::Dead;
            if std::mem::replace(&mut self.devs[m].session, Session::None) != Session::None {
                let call = self.call.id;
                self.act(m, Action::Goodbye { call });
            }
        }
    }
}
