//! A simulated device: the SDK's protocol core ([`ClientCore`]: heartbeats,
//! resume, request retries), the reconnect rule of the SDK's driver (full
//! jitter backoff, drop the link when the core says it is unresponsive),
//! the media peer ([`Peer`]) of a call, and an application that does what
//! the reference agent does with the events (ring, offer media when it is
//! joining, answer the SFU's offers, tear media down when the call ends).
//!
//! What a user does (invite, accept, hang up, ...) comes from the
//! scenario as [`Action`]s; the device only records what it saw, and the
//! world checks it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use fleetcall_peer::{AudioFrame, DtlsIdentity, Output as PeerOutput, Peer, PeerConfig, PeerError, PeerEvent, Sent};
use fleetcall_signaling::backoff::Backoff;
use fleetcall_signaling::client::{ClientCore, ClientEvent, CoreConfig, CoreEvent, OpId, RequestFailure};
use fleetcall_signaling::grants::Credential;
use fleetcall_signaling::ids::{ConnId, DeviceId};
use fleetcall_signaling::pb::{self, CallKind, CallPhase, EndReason, ParticipantStatus, ServerFrame, client_frame::Kind as C};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// A connected device sends one audio frame this often. Real devices send
/// one every 20 ms; a sparser stream proves the same forwarding for a fifth
/// of the cost.
pub const AUDIO_EVERY: Duration = Duration::from_millis(100);

/// The SDK's default connect timeout (`ClientConfig::connect_timeout`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Something a user does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Call another device.
    Invite(String),
    /// Answer the call it rings for.
    Accept(u64),
    /// Refuse the call it rings for.
    Decline(u64),
    /// Leave the current call (hang up, leave the group, end it if owner).
    Hangup,
    /// Open a group with these invitees.
    GroupCreate(Vec<String>),
    /// Join the named room `ward`.
    RoomJoin,
    /// Restart ICE on the current call's media.
    IceRestart,
}

/// The device's control connection, as its driver sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Waiting to dial at `retry_at`.
    Down { retry_at: Instant },
    /// Dialing; the handshake completes (or fails) at `at`.
    Dialing { conn: ConnId, at: Instant },
    /// The stream is open.
    Up { conn: ConnId },
    /// Crashed: the process is gone until it reboots.
    Off,
}

/// The call the application shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppCall {
    /// The call.
    pub id: u64,
    /// 1:1, group or room, once known.
    pub kind: CallKind,
    /// Ringing here, not answered.
    pub invited: bool,
    /// It created the group (may end it).
    pub owner: bool,
}

/// The media of the current call.
#[derive(Debug)]
pub struct Media {
    /// The call it belongs to.
    pub call: u64,
    /// The peer.
    pub peer: Peer,
    /// Its address (the ICE host candidate).
    pub addr: SocketAddr,
    /// The peer's deadline.
    pub deadline: Option<Instant>,
    /// ICE and DTLS are up.
    pub connected: bool,
    /// The last frame heard from each other device (by index).
    pub heard: BTreeMap<u8, Instant>,
    /// When the next audio frame goes out.
    pub next_frame: Instant,
    /// The revision of our offer the server has not answered yet.
    pub offered: Option<u64>,
    frames_sent: u64,
}

/// What the world must do for the device after it handled its events.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Media datagrams: (from, to, bytes).
    pub datagrams: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// The core gave up on the link: abort it (the server hears a close).
    pub abort: Option<ConnId>,
}

/// One terminal event the application received.
#[derive(Debug, Clone)]
pub struct Terminal {
    /// When it arrived.
    pub at: Instant,
    /// The frame.
    pub ended: pb::CallEnded,
    /// The incarnation (boot) it arrived in.
    pub incarnation: u32,
}

/// A simulated device.
#[derive(Debug)]
pub struct Device {
    /// Its index in the world; the first byte of its audio payloads.
    pub index: u8,
    /// Its device id as a string.
    pub name: String,
    /// Presented on every connection.
    pub credential: Credential,
    /// The SDK's protocol core (replaced at a reboot).
    pub core: ClientCore,
    /// Its control connection.
    pub link: Link,
    backoff: Backoff,
    rng: StdRng,
    /// The current call's media.
    pub media: Option<Media>,
    /// The call the application shows.
    pub call: Option<AppCall>,
    /// Boots so far (0: the first).
    pub incarnation: u32,
    /// Requests in flight and what they were.
    ops: BTreeMap<OpId, &'static str>,
    /// Every terminal event received, in order.
    pub terminals: Vec<Terminal>,
    /// Calls the application dropped because its session was lost (the
    /// server no longer knew it, or a fresh session replaced it).
    pub lost_with_session: Vec<u64>,
    /// Calls it has a participation in as far as it knows (invited or
    /// joined): each must end with exactly one terminal event, or with the
    /// session.
    open: BTreeSet<u64>,
    /// Requests that may have opened a participation (invite, group
    /// create or join, room join) and failed without a reply: the server
    /// may have carried them out, and the SDK drops a reply that comes
    /// after the request timed out. Each may show up as one terminal event
    /// for a call it never heard of.
    unknown_outcomes: u32,
    /// Things this device saw that must never happen.
    pub violations: Vec<String>,
    /// Actions the user decided on, due later (answering a ring).
    pub scheduled: Vec<(Instant, Action)>,
    /// Users act (the fault window); after it they only hang up.
    pub users_active: bool,
    peers_made: u16,
    /// What it did and saw, for the world's trace.
    pub log: Vec<String>,
    /// Revisions of this device's ICE restart offers (the join offer is 1).
    revisions: u64,
    out: Outbox,
}

fn core_config() -> CoreConfig {
    CoreConfig { software_version: "fleetcall-sim".into(), ..CoreConfig::default() }
}

impl Device {
    /// A device that dials at `now`.
    pub fn new(index: u8, credential: Credential, seed: u64, now: Instant) -> Self {
        Device {
            index,
            name: credential.identity.to_string(),
            credential,
            core: ClientCore::new(core_config(), now),
            link: Link::Down { retry_at: now },
            backoff: Backoff::fleet_default(),
            rng: StdRng::seed_from_u64(seed ^ (u64::from(index) << 56)),
            media: None,
            call: None,
            incarnation: 0,
            ops: BTreeMap::new(),
            terminals: Vec::new(),
            lost_with_session: Vec::new(),
            open: BTreeSet::new(),
            unknown_outcomes: 0,
            violations: Vec::new(),
            scheduled: Vec::new(),
            users_active: true,
            peers_made: 0,
            log: Vec::new(),
            revisions: 1,
            out: Outbox::default(),
        }
    }

    /// The device id.
    pub fn id(&self) -> &DeviceId {
        &self.credential.identity
    }

    /// The process dies: nothing of it survives but its credential.
    pub fn crash(&mut self) {
        self.link = Link::Off;
        self.media = None;
        self.call = None;
        self.open.clear();
        self.ops.clear();
        self.scheduled.clear();
    }

    /// The process starts again and dials at once, with no session.
    pub fn reboot(&mut self, now: Instant) {
        self.core = ClientCore::new(core_config(), now);
        self.backoff = Backoff::fleet_default();
        self.incarnation += 1;
        self.link = Link::Down { retry_at: now };
    }

    /// The next reconnect delay (the SDK driver's rule).
    pub fn next_backoff(&mut self) -> Duration {
        self.backoff.next_delay(&mut self.rng)
    }

    /// A random number for the scenario, from this device's stream.
    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// The earliest moment this device has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        if self.link == Link::Off {
            return None;
        }
        let link = match self.link {
            Link::Down { retry_at } => Some(retry_at),
            Link::Dialing { at, .. } => Some(at),
            Link::Up { .. } | Link::Off => None,
        };
        let media = self.media.as_ref().and_then(|m| {
            let frame = m.connected.then_some(m.next_frame);
            [m.deadline, frame].into_iter().flatten().min()
        });
        let scheduled = self.scheduled.iter().map(|(at, _)| *at).min();
        [self.core.poll_timeout(), link, media, scheduled].into_iter().flatten().min()
    }

    /// Takes what the world must carry out.
    pub fn take_outbox(&mut self) -> Outbox {
        std::mem::take(&mut self.out)
    }

    /// A frame arrived on the stream.
    pub fn handle_frame(&mut self, now: Instant, frame: ServerFrame, identity: &DtlsIdentity) {
        self.core.handle_frame(now, frame);
        self.handle_events(now, identity);
    }

    /// Time passed: the core's timers, the peer's, audio, the user's plans.
    pub fn handle_timeout(&mut self, now: Instant, identity: &DtlsIdentity) {
        self.core.handle_timeout(now);
        self.handle_events(now, identity);
        if let Some(media) = &mut self.media {
            if media.deadline.is_some_and(|at| at <= now) {
                media.peer.handle_timeout(now);
            }
            if media.connected && media.next_frame <= now {
                media.next_frame = now + AUDIO_EVERY;
                media.frames_sent += 1;
                // Tagged with the sender's index, so a receiver can tell
                // whom it heard without decoding.
                let payload = vec![self.index, 0xde, 0xad, (media.frames_sent & 0xff) as u8];
                let sent = media.peer.send_audio(now, &AudioFrame { payload: Some(payload.into()), level: None });
                debug_assert!(matches!(sent, Sent::Written { .. } | Sent::NotConnected));
            }
        }
        self.drain_peer(now);
        let due: Vec<Action> = {
            let (due, later): (Vec<_>, Vec<_>) = self.scheduled.drain(..).partition(|(at, _)| *at <= now);
            self.scheduled = later;
            due.into_iter().map(|(_, a)| a).collect()
        };
        for action in due {
            self.act(now, action);
        }
    }

    /// A media datagram for the current peer.
    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, destination: SocketAddr, contents: &[u8]) {
        let Some(media) = self.media.as_mut().filter(|m| m.addr == destination) else { return };
        media.peer.handle_datagram(now, source, contents);
        self.drain_peer(now);
    }

    /// The stream is open: the core says Hello.
    pub fn handle_connected(&mut self, now: Instant, conn: ConnId, identity: &DtlsIdentity) {
        self.link = Link::Up { conn };
        self.core.handle_connected(now);
        self.handle_events(now, identity);
    }

    /// The connection is gone; dial again after the backoff.
    pub fn handle_disconnected(&mut self, now: Instant, close: Option<pb::CloseReason>, detail: &str, identity: &DtlsIdentity) {
        self.core.handle_disconnected(now, close, detail);
        let delay = self.next_backoff();
        self.link = Link::Down { retry_at: now + delay };
        self.handle_events(now, identity);
        if let Some((close, reason)) = self.core.ended() {
            self.violations.push(format!("refused for good ({close:?}): {reason}"));
        }
    }

    /// A user's action. Actions that no longer fit the state do nothing,
    /// like a button that is gone.
    pub fn act(&mut self, now: Instant, action: Action) {
        if self.link == Link::Off {
            return;
        }
        match action {
            Action::Invite(callee) if self.call.is_none() => self.request(now, "invite", C::Invite(pb::Invite { callee })),
            Action::GroupCreate(invitees) if self.call.is_none() => {
                self.request(now, "group_create", C::GroupCreate(pb::GroupCreate { name: "ward".into(), invitees }))
            }
            Action::RoomJoin if self.call.is_none() => {
                self.request(now, "room_join", C::RoomJoin(pb::RoomJoin { room: "ward-3".into() }))
            }
            Action::Accept(call) if self.call.as_ref().is_some_and(|c| c.id == call && c.invited) => {
                let kind = self.call.as_ref().map(|c| c.kind);
                if let Some(c) = &mut self.call {
                    c.invited = false;
                }
                match kind {
                    Some(CallKind::Direct) => self.request(now, "accept", C::Accept(pb::Accept { call_id: call })),
                    _ => self.request(now, "group_join", C::GroupJoin(pb::GroupJoin { call_id: call })),
                }
            }
            Action::Decline(call) if self.call.as_ref().is_some_and(|c| c.id == call && c.invited) => {
                self.request(now, "decline", C::Decline(pb::Decline { call_id: call }));
            }
            Action::Hangup => {
                let Some(call) = self.call.clone() else { return };
                match (call.kind, call.invited) {
                    (_, true) => self.request(now, "decline", C::Decline(pb::Decline { call_id: call.id })),
                    (CallKind::Direct, false) => self.request(now, "hangup", C::Hangup(pb::Hangup { call_id: call.id })),
                    (CallKind::Group, false) if call.owner && self.rng.random_bool(0.5) => {
                        self.request(now, "group_end", C::GroupEnd(pb::GroupEnd { call_id: call.id }))
                    }
                    (_, false) => self.request(now, "group_leave", C::GroupLeave(pb::GroupLeave { call_id: call.id })),
                }
            }
            Action::IceRestart => {
                let Some(session) = self.core.session() else { return };
                let Some(media) = self.media.as_mut().filter(|m| m.connected) else { return };
                let call = media.call;
                if let Ok(sdp) = media.peer.restart_ice(now) {
                    self.revisions += 1;
                    let revision = self.revisions;
                    media.offered = Some(revision);
                    self.request(now, "ice_restart", C::IceRestart(pb::IceRestart { call_id: call, session_id: session.0, revision, sdp }));
                }
                self.drain_peer(now);
            }
            _ => {}
        }
    }

    fn request(&mut self, now: Instant, what: &'static str, kind: C) {
        let call = match &kind {
            C::SdpOffer(m) => m.call_id,
            C::SdpAnswer(m) => m.call_id,
            C::IceRestart(m) => m.call_id,
            C::Accept(m) => m.call_id,
            C::Decline(m) => m.call_id,
            C::Hangup(m) => m.call_id,
            C::GroupJoin(m) => m.call_id,
            C::GroupLeave(m) => m.call_id,
            _ => 0,
        };
        self.log.push(format!("{} asks {what} {call}", self.name));
        let op = self.core.request(now, kind);
        self.ops.insert(op, what);
    }

    /// Acts on everything the core reported, as the application and the
    /// SDK's driver do.
    fn handle_events(&mut self, now: Instant, identity: &DtlsIdentity) {
        while let Some(event) = self.core.poll_event() {
            match event {
                CoreEvent::Reply { op, frame } => self.on_reply(op, frame),
                CoreEvent::RequestFailed { op, failure } => {
                    let what = self.ops.remove(&op);
                    let opening = matches!(what, Some("invite" | "group_create" | "group_join" | "room_join"));
                    if opening && failure == RequestFailure::TimedOut {
                        self.unknown_outcomes += 1;
                    }
                }
                CoreEvent::Unresponsive { detail } => {
                    self.log.push(format!("{} core: {detail}", self.name));
                    if let Link::Up { conn } = self.link {
                        self.out.abort = Some(conn);
                    }
                }
                CoreEvent::Event(event) => self.on_event(now, event, identity),
                _ => {}
            }
        }
    }

    fn on_reply(&mut self, op: OpId, frame: ServerFrame) {
        let Some(what) = self.ops.remove(&op) else { return };
        let Some(pb::server_frame::Kind::Ack(ack)) = frame.kind else { return };
        let kind = match what {
            "invite" => CallKind::Direct,
            "group_create" => CallKind::Group,
            "room_join" => CallKind::Room,
            // A rejoin of a group it was in (also right after leaving it).
            "group_join" => CallKind::Group,
            _ => return,
        };
        // The reply comes before every event its request caused (a busy
        // callee's call_ended), so the participation opens here.
        if ack.call_id != 0 && self.call.as_ref().is_none_or(|c| c.id == ack.call_id) {
            let owner = what == "group_create";
            self.show(AppCall { id: ack.call_id, kind, invited: false, owner });
        }
    }

    fn on_event(&mut self, now: Instant, event: ClientEvent, identity: &DtlsIdentity) {
        let summary = match &event {
            ClientEvent::Connected { session, resumed, call } => Some(format!("connected {session} resumed {resumed} call {call:?}")),
            ClientEvent::SessionUnknown { session, .. } => Some(format!("session {session} unknown")),
            ClientEvent::IncomingCall(m) => Some(format!("incoming call {}", m.call_id)),
            ClientEvent::CallState(m) => Some(format!(
                "call {} {:?} {:?}",
                m.call_id,
                m.phase(),
                m.participants.iter().map(|p| (p.device_id.as_str(), p.status())).collect::<Vec<_>>()
            )),
            ClientEvent::CallEnded(m) => Some(format!("call {} ended {:?}", m.call_id, m.reason())),
            ClientEvent::SdpOffer(m) => Some(format!("server offer {} rev {}", m.call_id, m.revision)),
            ClientEvent::SdpAnswer(m) => Some(format!("server answer {} rev {}", m.call_id, m.revision)),
            _ => None,
        };
        if let Some(summary) = summary {
            self.log.push(format!("{} hears {summary}", self.name));
        }
        match event {
            ClientEvent::Connected { resumed, .. } => {
                self.backoff.reset();
                if !resumed {
                    self.session_lost();
                }
            }
            ClientEvent::SessionUnknown { .. } => self.session_lost(),
            ClientEvent::Ended { close, reason } => self.violations.push(format!("refused for good ({close:?}): {reason}")),
            ClientEvent::IncomingCall(incoming) => {
                let call = incoming.call_id;
                if self.call.as_ref().is_some_and(|c| c.id != call) {
                    // The server never alerts a busy device; be safe anyway.
                    self.open.insert(call);
                    self.request(now, "decline", C::Decline(pb::Decline { call_id: call }));
                    return;
                }
                self.show(AppCall { id: call, kind: incoming.kind(), invited: true, owner: false });
                self.request(now, "ringing", C::Ringing(pb::Ringing { call_id: call }));
                if self.users_active {
                    // The person at the device: answers, refuses, or lets it ring.
                    let after = Duration::from_millis(self.rng.random_range(200..6_000));
                    let choice = self.rng.random_range(0..100);
                    if choice < 60 {
                        self.scheduled.push((now + after, Action::Accept(call)));
                    } else if choice < 75 {
                        self.scheduled.push((now + after, Action::Decline(call)));
                    }
                }
            }
            ClientEvent::CallState(state) => self.on_call_state(now, state, identity),
            ClientEvent::SdpAnswer(answer) => {
                let Some(media) = self.media.as_mut().filter(|m| m.call == answer.call_id) else { return };
                if media.offered != Some(answer.revision) {
                    self.log.push(format!("{} ignores an answer to revision {}", self.name, answer.revision));
                    return;
                }
                media.offered = None;
                // A refusal leaves the peer as it was; the controller's
                // deadlines end a participation that cannot connect.
                if let Err(e) = media.peer.accept_answer(now, &answer.sdp) {
                    self.log.push(format!("{} refuses the answer: {e}", self.name));
                    self.sdp_refused(&e);
                }
                self.drain_peer(now);
            }
            ClientEvent::SdpOffer(offer) => {
                let Some(session) = self.core.session() else { return };
                let Some(media) = self.media.as_mut().filter(|m| m.call == offer.call_id) else { return };
                match media.peer.accept_offer(now, &offer.sdp) {
                    Ok(sdp) => {
                        let answer = pb::SdpAnswer { call_id: offer.call_id, session_id: session.0, revision: offer.revision, sdp };
                        self.request(now, "sdp_answer", C::SdpAnswer(answer));
                    }
                    Err(e) => {
                        self.log.push(format!("{} refuses the offer: {e}", self.name));
                        self.sdp_refused(&e);
                    }
                }
                self.drain_peer(now);
            }
            ClientEvent::CallEnded(ended) => {
                let twice = self.terminals.iter().any(|t| t.incarnation == self.incarnation && t.ended.call_id == ended.call_id);
                if self.open.remove(&ended.call_id) {
                    // The one terminal event of an open participation.
                } else if !twice && self.unknown_outcomes > 0 {
                    self.unknown_outcomes -= 1;
                } else {
                    let what = if twice { "a second call_ended" } else { "a call_ended for a call it was not in" };
                    self.violations.push(format!("{what}: {ended:?}"));
                }
                if self.call.as_ref().is_some_and(|c| c.id == ended.call_id) {
                    self.call = None;
                    self.media = None;
                }
                self.scheduled.retain(|(_, a)| !matches!(a, Action::Accept(c) | Action::Decline(c) if *c == ended.call_id));
                self.terminals.push(Terminal { at: now, ended, incarnation: self.incarnation });
            }
            _ => {}
        }
    }

    /// The server's SDP does not fit the peer's session: the two sides
    /// disagree about it, which no exchange in the protocol should cause. A
    /// server offer superseded by our own pending one is refused by design.
    fn sdp_refused(&mut self, error: &PeerError) {
        if matches!(error, PeerError::InvalidSdp(_)) {
            self.violations.push(format!("the peer cannot apply the server's SDP: {error}"));
        }
    }

    /// Every call of the old session is over: tear media down.
    fn session_lost(&mut self) {
        self.call = None;
        self.lost_with_session.extend(std::mem::take(&mut self.open));
        self.media = None;
        self.scheduled.clear();
        self.ops.clear();
    }

    fn on_call_state(&mut self, now: Instant, state: pb::CallState, identity: &DtlsIdentity) {
        let phase = state.phase();
        if phase == CallPhase::Ended {
            return;
        }
        let me = state.participants.iter().find(|p| p.device_id == self.name).map(|p| p.status());
        let Some(me) = me else { return };
        match &self.call {
            None => {
                // Joined by a request whose reply it did not act on, or a
                // resume's current state: the server sends call states to
                // members only.
                self.show(AppCall { id: state.call_id, kind: state.kind(), invited: me == ParticipantStatus::Invited, owner: state.owner == self.name });
            }
            Some(call) if call.id != state.call_id => return,
            Some(_) => {}
        }
        if let Some(call) = &mut self.call {
            call.kind = state.kind();
        }
        if me == ParticipantStatus::Joining && self.media.is_none() {
            self.start_media(now, state.call_id, identity);
        }
    }

    /// A new peer for the call, and its join offer.
    fn start_media(&mut self, now: Instant, call: u64, identity: &DtlsIdentity) {
        let Some(session) = self.core.session() else { return };
        self.peers_made = self.peers_made.wrapping_add(1);
        // A fresh port per peer, as a device binds one per call.
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, self.index, 1)), 10_000 + self.peers_made);
        let Ok(mut peer) = Peer::new(now, addr, identity, PeerConfig::default()) else { return };
        let Ok(sdp) = peer.create_offer(now) else { return };
        self.media = Some(Media {
            call,
            peer,
            addr,
            deadline: Some(now),
            connected: false,
            heard: BTreeMap::new(),
            next_frame: now,
            offered: Some(1),
            frames_sent: 0,
        });
        self.request(now, "sdp_offer", C::SdpOffer(pb::SdpOffer { call_id: call, session_id: session.0, revision: 1, sdp }));
        self.drain_peer(now);
    }

    fn drain_peer(&mut self, now: Instant) {
        let Some(media) = &mut self.media else { return };
        loop {
            match media.peer.poll_output() {
                PeerOutput::Timeout(at) => {
                    media.deadline = at;
                    return;
                }
                PeerOutput::Transmit(d) => self.out.datagrams.push((media.addr, d.destination, d.contents)),
                PeerOutput::Event(PeerEvent::Failed(reason)) => self.log.push(format!("{}'s media failed: {reason}", self.name)),
                PeerOutput::Event(PeerEvent::Connected) => {
                    self.log.push(format!("{}'s media connected", self.name));
                    media.connected = true;
                    media.next_frame = media.next_frame.max(now);
                }
                PeerOutput::Event(PeerEvent::Disconnected) => {
                    self.log.push(format!("{}'s media disconnected", self.name));
                    media.connected = false;
                }
                PeerOutput::Event(PeerEvent::Frame(frame)) => {
                    if let Some(sender) = frame.payload.first() {
                        media.heard.insert(*sender, now);
                    }
                }
                PeerOutput::Event(_) => {}
            }
        }
    }

    /// The application shows `call`, a participation of its own.
    fn show(&mut self, call: AppCall) {
        self.open.insert(call.id);
        self.call = Some(call);
    }

    /// Calls it has a participation in that have not ended for it.
    pub fn open_participations(&self) -> &BTreeSet<u64> {
        &self.open
    }

    /// Terminal events of this boot for `call`.
    pub fn terminals_for(&self, call: u64) -> impl Iterator<Item = &Terminal> {
        self.terminals.iter().filter(move |t| t.ended.call_id == call && t.incarnation == self.incarnation)
    }

    /// Whether it got a terminal event of `reason` for `call` in this boot.
    pub fn ended_with(&self, call: u64, reason: EndReason) -> bool {
        self.terminals_for(call).any(|t| t.ended.reason() == reason)
    }
}
