//! One room of simulated devices, driven by one task: the devices' control
//! sessions (the client SDK: a QUIC group call, or a named room over
//! WebSocket), their media links, the room's ledger, churn and faults.
//!
//! Both paths speak the device protocol through the controller; they differ
//! only in how a device gets into the call. On QUIC the first device creates
//! a group call and invites the others (a member that was in it before joins
//! again directly). On WebSocket every device joins the named room with
//! `RoomJoin`. From the `CallState` that shows a device `JOINING` on, media
//! (offer, answer, server renegotiation), participant updates, leaving and
//! the call's end are the same code.
//!
//! The task owns everything of its room, so measuring needs no locks: a
//! frame sent by one device and received by another meet in the same
//! [`Ledger`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetcall_signaling::client::{Client, ClientError, ClientEvent};
use fleetcall_signaling::ids::CallId;
use fleetcall_signaling::pb::{
    self, CallPhase, EndReason, ErrorCode, ParticipantStatus, client_frame,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::mpsc;

use crate::audio::Mic;
use crate::context::Ctx;
use crate::control::{register, register_ws};
use crate::ledger::{Ledger, Match, Member};
use crate::media::{Link, MAX_DATAGRAM, readable};
use crate::outcome::{FaultOutcome, GroupResult, Live, secs};
use crate::peer::{FRAME_TICKS, PeerEvent, Sent};
use crate::scenario::{ControlPath, FaultKind};

/// One send tick of the room: a 20 ms frame per device.
const TICK: Duration = Duration::from_millis(20);
/// After the stop, receive this long before leaving (packets in flight).
const DRAIN: Duration = Duration::from_millis(600);
/// A device's loss counts from this long after it first hears a talker
/// (the other publishers' streams open through renegotiation meanwhile).
const RX_SETTLE: Duration = Duration::from_secs(1);
/// Longest wait for the goodbyes at the end.
const GOODBYE: Duration = Duration::from_secs(4);

/// What the orchestrator tells a room.
#[derive(Debug)]
pub enum RoomCommand {
    /// A random listener leaves and rejoins after the delay.
    Churn { rejoin_after: Duration },
    /// Strike a random device.
    Fault {
        kind: FaultKind,
        duration: Duration,
        at_s: f64,
    },
    /// The server was restarted; it served again at `ready`.
    ServerRestarted { at_s: f64, ready: Instant },
    /// Stop sending, leave, report.
    Stop,
}

/// A room to run.
#[derive(Debug, Clone)]
pub struct RoomPlan {
    /// Its number in the run.
    pub index: usize,
    /// Devices.
    pub per_room: usize,
    /// The first `talkers` devices talk.
    pub talkers: usize,
    /// Signaling path (`Quic` or `Ws`).
    pub control: ControlPath,
    /// When each device starts (the ramp).
    pub starts: Vec<Instant>,
    /// Seed of the room's random choices.
    pub seed: u64,
}

/// What a device's control session reports to the room task.
#[derive(Debug)]
enum Ctl {
    Registered(
        Result<(Client, mpsc::UnboundedReceiver<ClientEvent>), String>,
        Duration,
    ),
    Event(ClientEvent),
    Reply(Req, Result<u64, ReqError>),
}

/// Why a request failed.
#[derive(Debug)]
struct ReqError {
    /// The server's error code, when it refused.
    code: Option<ErrorCode>,
    message: String,
    /// The session was lost or the request timed out (a fault, a
    /// restart): tried again, not a failure.
    transient: bool,
}

impl From<ClientError> for ReqError {
    fn from(e: ClientError) -> Self {
        let transient = matches!(
            e,
            ClientError::SessionLost | ClientError::TimedOut | ClientError::Stopped
        );
        match e {
            ClientError::Refused { code, message, .. } => ReqError {
                code: Some(code),
                message,
                transient: false,
            },
            other => ReqError {
                code: None,
                message: other.to_string(),
                transient,
            },
        }
    }
}

/// Requests whose replies matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Req {
    Create,
    Invite,
    Join,
    /// WebSocket: `RoomJoin`.
    RoomJoin,
    Offer,
    Answer,
    Leave,
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
    /// Left on purpose; rejoins at `rejoin_at`.
    Away,
    /// Killed, or stopped at the end.
    Dead,
}

#[derive(Debug)]
enum Session {
    None,
    Up(Client),
}

#[derive(Debug)]
struct Dev {
    id: String,
    talker: bool,
    mic: Mic,
    phase: Phase,
    session: Session,
    link: Option<Link>,
    /// Media connected now.
    media_up: bool,
    /// The join request of the current participation, and whether a talker
    /// was already up then (join-to-first-audio counts only then).
    join_at: Option<(Instant, bool)>,
    /// QUIC: part of the current call before (may `GroupJoin` directly).
    member_before: bool,
    /// The room call (its serial) the device takes part in.
    serial: Option<u64>,
    /// Had a session once (a later fresh one is a re-registration).
    registered_once: bool,
    /// Fresh sessions seen (`Connected { resumed: false }`): the first is
    /// the registration, later ones re-registrations.
    fresh_sessions: u32,
    rejoin_at: Option<Instant>,
    stall_until: Option<Instant>,
    /// The last packet it sent.
    last_sent: Option<Instant>,
}

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

/// The room task's state.
struct Room {
    ctx: Arc<Ctx>,
    plan: RoomPlan,
    name: String,
    devs: Vec<Dev>,
    call: Option<CallId>,
    creating: bool,
    /// Who created the current call (the preferred inviter).
    creator: Option<Member>,
    /// Counts the room's calls: a server restarts its call ids, so an id
    /// alone does not tell the call before a restart from the one after.
    call_serial: u64,
    ledger: Ledger,
    watches: Vec<Watch>,
    result: GroupResult,
    /// Distinct slot streams seen per receiver.
    slot_streams: HashMap<Member, HashSet<Arc<str>>>,
    stopping: Option<Instant>,
    goodbye_until: Option<Instant>,
    rng: StdRng,
    ctl_tx: mpsc::UnboundedSender<(Member, Ctl)>,
    scan_from: usize,
}

/// Runs a room until told to stop; returns what it measured.
pub async fn run(
    ctx: Arc<Ctx>,
    plan: RoomPlan,
    mut commands: mpsc::UnboundedReceiver<RoomCommand>,
) -> GroupResult {
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel();
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
                link: None,
                media_up: false,
                join_at: None,
                member_before: false,
                serial: None,
                registered_once: false,
                fresh_sessions: 0,
                rejoin_at: None,
                stall_until: None,
                last_sent: None,
            }
        })
        .collect();
    let mut room = Room {
        ledger: Ledger::new(plan.per_room, ctx.window),
        rng: StdRng::seed_from_u64(plan.seed),
        ctx,
        name,
        devs,
        call: None,
        creating: false,
        creator: None,
        call_serial: 0,
        watches: Vec::new(),
        result: GroupResult::default(),
        slot_streams: HashMap::new(),
        stopping: None,
        goodbye_until: None,
        ctl_tx,
        scan_from: 0,
        plan,
    };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let first_tick = room
        .plan
        .starts
        .first()
        .copied()
        .unwrap_or_else(Instant::now);
    let mut tick = tokio::time::interval_at(first_tick.into(), TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        room.flush_all();
        if room
            .goodbye_until
            .is_some_and(|until| Instant::now() >= until || room.all_gone())
        {
            break;
        }
        let deadline = room.next_deadline();
        let links: Vec<(usize, &Link)> = room
            .devs
            .iter()
            .enumerate()
            .filter_map(|(m, d)| d.link.as_ref().map(|l| (m, l)))
            .collect();
        let scan_from = room.scan_from;
        tokio::select! {
            // Control first: an answer or an offer unblocks media.
            biased;
            Some((member, ctl)) = ctl_rx.recv() => room.on_ctl(member, ctl),
            command = commands.recv() => match command {
                Some(command) => room.on_command(command),
                // The orchestrator is gone: stop as if told.
                None => room.on_command(RoomCommand::Stop),
            },
            scheduled = tick.tick() => room.on_tick(scheduled.into_std()),
            member = readable(&links, scan_from) => {
                drop(links);
                room.scan_from = member + 1;
                room.on_readable(&mut buf);
            }
            () = sleep_until(deadline) => room.on_timeout(),
        }
    }
    room.finish()
}

async fn sleep_until(deadline: Instant) {
    tokio::time::sleep_until(deadline.into()).await;
}

impl Room {
    fn all_gone(&self) -> bool {
        self.devs.iter().all(|d| d.phase == Phase::Dead)
    }

    /// The earliest of: a device's ramp start, a rejoin, a fault's end, a
    /// peer's timer, the end of the drain.
    fn next_deadline(&self) -> Instant {
        let mut at = Instant::now() + Duration::from_secs(1);
        for (m, d) in self.devs.iter().enumerate() {
            if d.phase == Phase::Pending && self.stopping.is_none() {
                at = at.min(self.plan.starts[m]);
            }
            for t in [
                d.rejoin_at,
                d.stall_until,
                d.link.as_ref().and_then(|l| l.drop_until),
            ]
            .into_iter()
            .flatten()
            {
                at = at.min(t);
            }
            if let Some(t) = d.link.as_ref().and_then(|l| l.peer.poll_timeout()) {
                at = at.min(t);
            }
        }
        if let Some(stop) = self.stopping
            && self.goodbye_until.is_none()
        {
            at = at.min(stop + DRAIN);
        }
        if let Some(until) = self.goodbye_until {
            at = at.min(until);
        }
        at
    }

    fn flush_all(&mut self) {
        let now = Instant::now();
        for d in &mut self.devs {
            if let Some(link) = &mut d.link {
                link.flush(now);
            }
        }
    }

    fn on_timeout(&mut self) {
        let now = Instant::now();
        if let Some(stop) = self.stopping
            && self.goodbye_until.is_none()
            && now >= stop + DRAIN
        {
            self.say_goodbye(now);
        }
        for m in 0..self.devs.len() {
            if self.stopping.is_none()
                && self.devs[m].phase == Phase::Pending
                && now >= self.plan.starts[m]
            {
                self.start_device(m, now);
            }
            if self.devs[m].rejoin_at.is_some_and(|t| now >= t) {
                self.devs[m].rejoin_at = None;
                if self.stopping.is_none()
                    && matches!(self.devs[m].phase, Phase::Away | Phase::Ready)
                {
                    self.devs[m].phase = Phase::Ready;
                    self.want_join(m, now);
                }
            }
            if self.devs[m].stall_until.is_some_and(|t| now >= t) {
                self.devs[m].stall_until = None;
                if let Session::Up(client) = &self.devs[m].session {
                    client.simulate_stall(false);
                }
            }
            let mut restored = false;
            if let Some(link) = &mut self.devs[m].link {
                if link.drop_until.is_some_and(|t| now >= t) {
                    link.drop_until = None;
                    restored = true;
                }
                if link.peer.poll_timeout().is_some_and(|t| t <= now) {
                    link.peer.handle_timeout(now);
                }
            }
            let _ = restored;
            self.peer_events(m);
        }
    }

    // ---- devices: start, join, leave --------------------------------------------------------

    fn start_device(&mut self, m: Member, now: Instant) {
        self.devs[m].phase = Phase::Connecting;
        let tx = self.ctl_tx.clone();
        let ctx = self.ctx.clone();
        let id = self.devs[m].id.clone();
        let room = (self.plan.control == ControlPath::Ws).then(|| self.name.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let result = match room {
                Some(room) => register_ws(&ctx, &id, &room).await,
                None => register(&ctx, &id).await,
            };
            let _ = tx.send((m, Ctl::Registered(result, started.elapsed())));
        });
        let _ = now;
    }

    /// A device that should be in the call asks to be.
    fn want_join(&mut self, m: Member, now: Instant) {
        if self.stopping.is_some() || self.devs[m].phase != Phase::Ready {
            return;
        }
        match self.plan.control {
            ControlPath::Ws => self.room_join(m, now),
            _ => {
                let Some(call) = self.call else {
                    if !self.creating {
                        self.create_call(m, now);
                    }
                    return;
                };
                if self.devs[m].member_before {
                    self.quic_group_join(m, call, now);
                } else if let Some(inviter) = self.inviter() {
                    // The invitation comes back as `IncomingCall`, answered with `GroupJoin`.
                    let ids = vec![self.devs[m].id.clone()];
                    self.request(
                        inviter,
                        Req::Invite,
                        client_frame::Kind::GroupInvite(pb::GroupInvite {
                            call_id: call.0,
                            invitees: ids,
                        }),
                    );
                    self.devs[m].phase = Phase::Joining;
                }
            }
        }
    }

    /// A member that can invite: in the call, connected, not stalled; the
    /// call's creator first.
    fn inviter(&self) -> Option<Member> {
        let healthy = |d: &Dev| {
            d.phase == Phase::InCall
                && d.stall_until.is_none()
                && matches!(&d.session, Session::Up(client) if client.status().connected)
        };
        self.creator
            .filter(|&c| healthy(&self.devs[c]))
            .or_else(|| self.devs.iter().position(healthy))
    }

    /// Whether another talker is sending right now (a join then measures
    /// setup, not a talker's pause).
    fn talker_up(&self, except: Member) -> bool {
        let now = Instant::now();
        self.devs.iter().enumerate().any(|(i, d)| {
            i != except
                && d.talker
                && d.media_up
                && d.last_sent
                    .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_millis(100))
        })
    }

    fn create_call(&mut self, m: Member, now: Instant) {
        self.creating = true;
        self.devs[m].phase = Phase::Joining;
        self.devs[m].join_at = Some((now, self.talker_up(m)));
        let name = self.name.clone();
        self.request(
            m,
            Req::Create,
            client_frame::Kind::GroupCreate(pb::GroupCreate {
                name,
                invitees: Vec::new(),
            }),
        );
    }

    fn room_join(&mut self, m: Member, now: Instant) {
        self.devs[m].phase = Phase::Joining;
        self.devs[m].join_at = Some((now, self.talker_up(m)));
        let room = self.name.clone();
        self.request(
            m,
            Req::RoomJoin,
            client_frame::Kind::RoomJoin(pb::RoomJoin { room }),
        );
    }

    /// The room's call is `call` (from the join's reply or the `CallState`,
    /// whichever comes first); device `m` takes part in it.
    fn adopt_room_call(&mut self, m: Member, call: CallId) {
        if self.call != Some(call) {
            self.call = Some(call);
            self.call_serial += 1;
        }
        self.devs[m].serial = Some(self.call_serial);
    }

    fn quic_group_join(&mut self, m: Member, call: CallId, now: Instant) {
        self.devs[m].phase = Phase::Joining;
        self.devs[m].join_at = Some((now, self.talker_up(m)));
        self.request(
            m,
            Req::Join,
            client_frame::Kind::GroupJoin(pb::GroupJoin { call_id: call.0 }),
        );
    }

    /// Sends a request of member `m` in the background; the reply comes
    /// back as [`Ctl::Reply`].
    fn request(&mut self, m: Member, what: Req, kind: client_frame::Kind) {
        let Session::Up(client) = &self.devs[m].session else {
            return;
        };
        let reply = client.request(kind);
        let tx = self.ctl_tx.clone();
        tokio::spawn(async move {
            let result = reply.await.map_err(ReqError::from);
            let _ = tx.send((m, Ctl::Reply(what, result)));
        });
    }

    /// Creates the device's media link and its offer.
    fn start_media(&mut self, m: Member, now: Instant) -> anyhow::Result<String> {
        self.stop_media(m);
        // A timestamp residue per member keeps the room's timestamps apart.
        let ts_base = (self.rng.random::<u32>() / FRAME_TICKS) * FRAME_TICKS + m as u32;
        let seq_base: u16 = self.rng.random();
        let mut link = Link::bind(&self.ctx.factory, self.ctx.bind_ip, now, ts_base, seq_base)?;
        let offer = link.peer.create_offer(now)?;
        self.devs[m].link = Some(link);
        Ok(offer)
    }

    fn stop_media(&mut self, m: Member) {
        let d = &mut self.devs[m];
        if d.link.take().is_some() && d.media_up {
            d.media_up = false;
            Live::sub(&self.ctx.live.media_up, 1);
        }
        // Media torn down: the device stops counting loss until it hears
        // again after its next join.
        self.ledger.stop_counting(m, Instant::now());
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

    // ---- control events ---------------------------------------------------------------------

    fn on_ctl(&mut self, m: Member, ctl: Ctl) {
        let now = Instant::now();
        match ctl {
            Ctl::Registered(Ok((client, mut events)), elapsed) => {
                match self.plan.control {
                    ControlPath::Ws => self.result.ws_connect.record(elapsed),
                    _ => self.result.register.record(elapsed),
                }
                Live::add(&self.ctx.live.registered, 1);
                let d = &mut self.devs[m];
                d.registered_once = true;
                if d.phase == Phase::Dead || self.stopping.is_some() {
                    return;
                }
                d.session = Session::Up(client);
                d.phase = Phase::Ready;
                let tx = self.ctl_tx.clone();
                tokio::spawn(async move {
                    while let Some(event) = events.recv().await {
                        if tx.send((m, Ctl::Event(event))).is_err() {
                            return;
                        }
                    }
                });
                self.want_join(m, now);
            }
            Ctl::Registered(Err(e), _) => {
                self.devs[m].phase = Phase::Dead;
                self.fail(m, format!("registration: {e}"));
            }
            Ctl::Event(event) => self.on_event(m, event, now),
            Ctl::Reply(what, result) => self.on_reply(m, what, result, now),
        }
    }

    fn on_reply(&mut self, m: Member, what: Req, result: Result<u64, ReqError>, now: Instant) {
        match (what, result) {
            (Req::Create, Ok(call)) => {
                self.creating = false;
                if self.call != Some(CallId(call)) || self.devs[m].serial.is_none() {
                    self.call_serial += 1;
                }
                self.call = Some(CallId(call));
                self.creator = Some(m);
                self.devs[m].serial = Some(self.call_serial);
                self.devs[m].member_before = true;
                self.devs[m].phase = Phase::InCall;
                // Everyone registered and waiting joins now.
                for other in 0..self.devs.len() {
                    if other != m
                        && self.devs[other].phase == Phase::Ready
                        && self.devs[other].rejoin_at.is_none()
                    {
                        self.want_join(other, now);
                    }
                }
            }
            (Req::Create, Err(e)) => {
                self.creating = false;
                self.devs[m].phase = Phase::Ready;
                self.fail_or_retry(m, "group create", &e);
                self.devs[m].rejoin_at = Some(now + Duration::from_secs(1));
            }
            (Req::RoomJoin, Ok(call)) => {
                if self.devs[m].phase == Phase::Dead || self.stopping.is_some() {
                    return;
                }
                self.adopt_room_call(m, CallId(call));
                if self.devs[m].phase == Phase::Joining {
                    self.devs[m].phase = Phase::InCall;
                }
            }
            (Req::RoomJoin, Err(e)) => {
                if self.devs[m].phase == Phase::Dead || self.stopping.is_some() {
                    return;
                }
                self.devs[m].phase = Phase::Ready;
                self.fail_or_retry(m, "room join", &e);
                self.devs[m].rejoin_at = Some(now + Duration::from_secs(1));
            }
            (Req::Join, Ok(_)) => {
                self.devs[m].serial = Some(self.call_serial);
                self.devs[m].member_before = true;
                self.devs[m].phase = Phase::InCall;
            }
            (
                Req::Join,
                Err(ReqError {
                    code,
                    message: e,
                    transient,
                }),
            ) => {
                if self.devs[m].phase == Phase::Dead || self.stopping.is_some() {
                    return;
                }
                self.devs[m].phase = Phase::Ready;
                match code {
                    Some(ErrorCode::CallEnded | ErrorCode::UnknownCall) => {
                        // The group is gone (e.g. the server restarted): build it again.
                        self.call = None;
                        self.want_join(m, now);
                    }
                    Some(ErrorCode::Forbidden) => {
                        self.devs[m].member_before = false;
                        self.want_join(m, now);
                    }
                    _ => {
                        self.fail_or_retry(
                            m,
                            "group join",
                            &ReqError {
                                code,
                                message: e,
                                transient,
                            },
                        );
                        self.devs[m].rejoin_at = Some(now + Duration::from_secs(1));
                    }
                }
            }
            (Req::Invite, Err(e)) => {
                if self.stopping.is_none() {
                    self.fail_or_retry(m, "group invite", &e);
                }
                // The invitees wait in `Joining`; put them back to try again.
                for d in &mut self.devs {
                    if d.phase == Phase::Joining && !d.member_before && d.join_at.is_none() {
                        d.phase = Phase::Ready;
                        d.rejoin_at = Some(now + Duration::from_secs(1));
                    }
                }
            }
            (Req::Offer | Req::Answer, Err(e))
                if self.stopping.is_none() && self.devs[m].phase != Phase::Dead =>
            {
                let what = if what == Req::Offer {
                    "SDP offer"
                } else {
                    "SDP answer"
                };
                self.fail_or_retry(m, what, &e);
            }
            _ => {}
        }
    }

    fn on_event(&mut self, m: Member, event: ClientEvent, now: Instant) {
        tracing::trace!(device = %self.devs[m].id, phase = ?self.devs[m].phase, ?event, "control event");
        if self.devs[m].phase == Phase::Dead {
            return;
        }
        match event {
            ClientEvent::Connected { resumed: false, .. } => {
                self.devs[m].fresh_sessions += 1;
                if self.devs[m].fresh_sessions > 1 {
                    // A fresh session after a lost one: every call of the old one is over.
                    self.record_reregistration(now);
                }
            }
            ClientEvent::Ended { close, reason } => {
                // Refused for good (a credential problem): the SDK has stopped.
                self.stop_media(m);
                let d = &mut self.devs[m];
                d.phase = Phase::Dead;
                d.session = Session::None;
                self.fail(
                    m,
                    format!("refused by the server ({}): {reason}", close.as_str_name()),
                );
                return;
            }
            ClientEvent::SessionUnknown { .. } => {
                self.stop_media(m);
                self.devs[m].serial = None;
                let d = &mut self.devs[m];
                if matches!(d.phase, Phase::InCall | Phase::Joining) {
                    d.phase = Phase::Ready;
                    d.rejoin_at = Some(now + Duration::from_millis(100));
                }
            }
            ClientEvent::IncomingCall(incoming) => {
                if Some(CallId(incoming.call_id)) == self.call
                    && self.devs[m].phase == Phase::Joining
                {
                    self.devs[m].join_at = Some((now, self.talker_up(m)));
                    self.request(
                        m,
                        Req::Join,
                        client_frame::Kind::GroupJoin(pb::GroupJoin {
                            call_id: incoming.call_id,
                        }),
                    );
                } else if self.stopping.is_none() {
                    // Not ours (a stale invitation): refuse.
                    self.request(
                        m,
                        Req::Leave,
                        client_frame::Kind::Decline(pb::Decline {
                            call_id: incoming.call_id,
                        }),
                    );
                }
            }
            ClientEvent::CallState(state) => {
                if self.call.is_none()
                    && self.creating
                    && self.devs[m].phase == Phase::Joining
                    && state.group_name == self.name
                {
                    // The creator hears of its call before the reply to the
                    // create (events and replies travel different paths here).
                    self.call = Some(CallId(state.call_id));
                    self.call_serial += 1;
                    self.devs[m].serial = Some(self.call_serial);
                }
                if self.plan.control == ControlPath::Ws
                    && self.devs[m].phase == Phase::Joining
                    && state.group_name == self.name
                    && state.phase != CallPhase::Ended as i32
                {
                    // Likewise a room's joiner: its `CallState` may come
                    // before the reply to `RoomJoin`.
                    self.adopt_room_call(m, CallId(state.call_id));
                }
                if Some(CallId(state.call_id)) != self.call {
                    return;
                }
                let me = &self.devs[m].id;
                let joining = state
                    .participants
                    .iter()
                    .any(|p| p.device_id == *me && p.status == ParticipantStatus::Joining as i32);
                if joining
                    && self.devs[m].link.is_none()
                    && matches!(self.devs[m].phase, Phase::Joining | Phase::InCall)
                {
                    self.devs[m].phase = Phase::InCall;
                    match self.start_media(m, now) {
                        Ok(offer) => {
                            let Session::Up(client) = &self.devs[m].session else {
                                return;
                            };
                            let reply = client.sdp_offer(CallId(state.call_id), 1, offer);
                            let tx = self.ctl_tx.clone();
                            tokio::spawn(async move {
                                let result = reply.await.map(|()| 0).map_err(ReqError::from);
                                let _ = tx.send((m, Ctl::Reply(Req::Offer, result)));
                            });
                        }
                        Err(e) => self.fail(m, format!("media: {e:#}")),
                    }
                }
                if state.phase == CallPhase::Ended as i32 {
                    let whole = self.devs[m].serial == Some(self.call_serial);
                    self.call_over(m, now, whole);
                }
            }
            ClientEvent::CallEnded(ended) => {
                if Some(CallId(ended.call_id)) != self.call && self.devs[m].serial.is_none() {
                    return;
                }
                if self.devs[m].serial != Some(self.call_serial) {
                    // The end of a call this device was in before (a stalled
                    // device reading the old server's last frames after a
                    // restart): only its own part is over.
                    self.call_over(m, now, false);
                    return;
                }
                let whole = matches!(
                    EndReason::try_from(ended.reason),
                    Ok(EndReason::ServerShutdown
                        | EndReason::Empty
                        | EndReason::EndedByOwner
                        | EndReason::EndedByOperator)
                );
                self.call_over(m, now, whole);
            }
            ClientEvent::ParticipantUpdate(update) => {
                let Some(subject) = self.devs.iter().position(|d| d.id == update.device_id) else {
                    return;
                };
                let status = ParticipantStatus::try_from(update.status)
                    .unwrap_or(ParticipantStatus::Unspecified);
                self.told(m, subject, status, now);
            }
            ClientEvent::SdpAnswer(answer) => {
                if Some(CallId(answer.call_id)) != self.call {
                    return;
                }
                tracing::debug!(device = %self.devs[m].id, since_join = ?self.devs[m].join_at.map(|(t, _)| now - t), "sdp answer");
                if let Some(link) = &mut self.devs[m].link
                    && let Err(e) = link.peer.accept_answer(now, &answer.sdp)
                {
                    self.fail(m, format!("SDP answer: {e:#}"));
                }
            }
            ClientEvent::SdpOffer(offer) => {
                if Some(CallId(offer.call_id)) != self.call {
                    return;
                }
                tracing::debug!(device = %self.devs[m].id, since_join = ?self.devs[m].join_at.map(|(t, _)| now - t), "sdp offer");
                let Some(link) = &mut self.devs[m].link else {
                    return;
                };
                match link.peer.accept_offer(now, &offer.sdp) {
                    Ok(sdp) => {
                        let Session::Up(client) = &self.devs[m].session else {
                            return;
                        };
                        let reply = client.sdp_answer(CallId(offer.call_id), offer.revision, sdp);
                        let tx = self.ctl_tx.clone();
                        tokio::spawn(async move {
                            let result = reply.await.map(|()| 0).map_err(ReqError::from);
                            let _ = tx.send((m, Ctl::Reply(Req::Answer, result)));
                        });
                    }
                    Err(e) => self.fail(m, format!("SDP offer: {e:#}")),
                }
            }
            _ => {}
        }
        self.peer_events(m);
    }

    /// Device `m`'s participation in the call ended; `whole`: the call too.
    fn call_over(&mut self, m: Member, now: Instant, whole: bool) {
        self.stop_media(m);
        self.devs[m].serial = None;
        if whole {
            self.call = None;
            for d in &mut self.devs {
                d.member_before = false;
            }
        }
        let d = &mut self.devs[m];
        if matches!(d.phase, Phase::InCall | Phase::Joining) && self.stopping.is_none() {
            // Not asked for: come back (a fault, a restart).
            d.phase = Phase::Ready;
            d.rejoin_at = Some(now + Duration::from_millis(200));
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
        let restarted = *self
            .ctx
            .live
            .restarted_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(ready) = restarted
            && let Ok(mut h) = self.ctx.live.reregister.lock()
        {
            h.record(now.saturating_duration_since(ready));
        }
    }

    // ---- media ------------------------------------------------------------------------------

    /// A socket is readable: drains every device's socket (a forwarded
    /// packet usually reaches several members of the room at once; checking
    /// a socket that has nothing costs no system call).
    fn on_readable(&mut self, buf: &mut [u8]) {
        for m in 0..self.devs.len() {
            let got = self.devs[m]
                .link
                .as_mut()
                .map_or(0, |link| link.drain_socket(buf));
            if got > 0 {
                self.peer_events(m);
            }
        }
    }

    /// Handles what member `m`'s peer reported.
    fn peer_events(&mut self, m: Member) {
        loop {
            let Some(link) = &mut self.devs[m].link else {
                return;
            };
            let Some(event) = link.peer.poll_event() else {
                return;
            };
            let now = Instant::now();
            match event {
                PeerEvent::Connected => {
                    tracing::debug!(device = %self.devs[m].id, since_join = ?self.devs[m].join_at.map(|(t, _)| now - t), "media connected");
                    if !self.devs[m].media_up {
                        self.devs[m].media_up = true;
                        Live::add(&self.ctx.live.media_up, 1);
                    }
                }
                PeerEvent::Disconnected => {
                    if self.devs[m].media_up {
                        self.devs[m].media_up = false;
                        Live::sub(&self.ctx.live.media_up, 1);
                    }
                }
                PeerEvent::Failed(reason) => {
                    self.fail(m, format!("media failed: {reason}"));
                    self.stop_media(m);
                }
                PeerEvent::Packet(packet) => {
                    Live::add(&self.ctx.live.received, 1);
                    if packet.stream.starts_with("slot-") {
                        self.slot_streams
                            .entry(m)
                            .or_default()
                            .insert(packet.stream.clone());
                    }
                    let found = self
                        .ledger
                        .on_received(now, m, packet.timestamp, &packet.payload);
                    let sent = match found {
                        Match::Exact(s) | Match::Payload(s) | Match::Reencoded(s) => s,
                        Match::Own | Match::Unknown => continue,
                    };
                    if !sent.speaker {
                        continue;
                    }
                    if let Some((at, eligible)) = self.devs[m].join_at.take() {
                        tracing::debug!(device = %self.devs[m].id, since_join = ?(now - at), "first audio");
                        if eligible {
                            self.result
                                .join_to_audio
                                .record(now.saturating_duration_since(at));
                        }
                        // It hears: its loss counts once the other streams
                        // had time to open too.
                        if !self.faulted(m) {
                            self.ledger.start_counting(m, now + RX_SETTLE);
                        }
                    }
                    self.heard(m, sent.sender, now);
                }
            }
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

    fn on_tick(&mut self, scheduled: Instant) {
        let now = Instant::now();
        self.result
            .tick_late
            .record(now.saturating_duration_since(scheduled));
        if self.stopping.is_some() {
            return;
        }
        for m in 0..self.devs.len() {
            let d = &mut self.devs[m];
            let Some(link) = &mut d.link else { continue };
            if !d.media_up || link.dropping(now) {
                continue;
            }
            let frame = d.mic.next_frame();
            match link.peer.send(now, frame) {
                Sent::Rtp { timestamp, seq } => {
                    // A payload exists: `send` returned Rtp.
                    let payload = frame.payload.as_deref().unwrap_or_default();
                    let talker = d.talker && frame.voice;
                    self.ledger
                        .on_sent(now, m, timestamp, seq, payload, talker, d.talker);
                    d.last_sent = Some(now);
                    Live::add(&self.ctx.live.sent, 1);
                }
                Sent::Dtx => {}
                Sent::NotConnected => self.result.unsent += 1,
            }
            link.flush(now);
        }
    }

    // ---- orchestrator commands --------------------------------------------------------------

    fn on_command(&mut self, command: RoomCommand) {
        let now = Instant::now();
        match command {
            RoomCommand::Churn { rejoin_after } => {
                let listeners: Vec<Member> = (0..self.devs.len())
                    .filter(|&m| {
                        !self.devs[m].talker
                            && self.devs[m].phase == Phase::InCall
                            && self.devs[m].media_up
                            && !self.faulted(m)
                    })
                    .collect();
                if listeners.is_empty() {
                    return;
                }
                let m = listeners[self.rng.random_range(0..listeners.len())];
                self.leave(m, now);
                self.devs[m].phase = Phase::Away;
                self.devs[m].rejoin_at = Some(now + rejoin_after);
            }
            RoomCommand::Fault {
                kind,
                duration,
                at_s,
            } => self.fault(kind, duration, at_s, now),
            RoomCommand::ServerRestarted { at_s, ready } => {
                let pending: HashSet<Member> = (0..self.devs.len())
                    .filter(|&m| self.devs[m].phase != Phase::Dead)
                    .collect();
                let now = Instant::now();
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
                if self.stopping.is_none() {
                    self.stopping = Some(now);
                }
            }
        }
    }

    fn faulted(&self, m: Member) -> bool {
        self.watches
            .iter()
            .any(|w| w.subject == Some(m) && w.converged.is_none())
    }

    /// Leaves on purpose (churn).
    fn leave(&mut self, m: Member, now: Instant) {
        self.stop_media(m);
        // Gone on its own: it need not hear of a fault's victim anymore.
        for w in &mut self.watches {
            if w.kind == FaultKind::Kill
                && w.converged.is_none()
                && w.pending.remove(&m)
                && w.pending.is_empty()
            {
                w.converged = Some(now);
            }
        }
        match &self.devs[m].session {
            Session::Up(_) => {
                if let Some(call) = self.call {
                    self.request(
                        m,
                        Req::Leave,
                        client_frame::Kind::GroupLeave(pb::GroupLeave { call_id: call.0 }),
                    );
                }
            }
            Session::None => {}
        }
    }

    fn fault(&mut self, kind: FaultKind, duration: Duration, at_s: f64, now: Instant) {
        let candidates: Vec<Member> = (0..self.devs.len())
            .filter(|&m| {
                self.devs[m].phase == Phase::InCall && self.devs[m].media_up && !self.faulted(m)
            })
            .collect();
        if candidates.is_empty() {
            self.result.failures.push(
                &self.ctx.live,
                format!("{}: no device to strike with {}", self.name, kind.as_str()),
            );
            return;
        }
        let m = candidates[self.rng.random_range(0..candidates.len())];
        self.ledger.disturb(m, now);
        let mut pending = HashSet::new();
        match kind {
            FaultKind::Kill => {
                pending = (0..self.devs.len())
                    .filter(|&o| o != m && self.devs[o].phase == Phase::InCall)
                    .collect();
                let d = &mut self.devs[m];
                match std::mem::replace(&mut d.session, Session::None) {
                    Session::Up(client) => {
                        // Cut the link silently, then drop the last handle so
                        // the client does not reconnect.
                        client.simulate_drop();
                        drop(client);
                    }
                    Session::None => {}
                }
                d.phase = Phase::Dead;
                self.stop_media(m);
            }
            FaultKind::Stall => {
                if let Session::Up(client) = &self.devs[m].session {
                    client.simulate_stall(true);
                }
                self.devs[m].stall_until = Some(now + duration);
            }
            FaultKind::MediaDrop => {
                if let Some(link) = &mut self.devs[m].link {
                    link.drop_until = Some(now + duration);
                }
            }
            FaultKind::ServerRestart => {}
        }
        let end = if kind == FaultKind::Kill {
            now
        } else {
            now + duration
        };
        self.watches.push(Watch {
            kind,
            subject: Some(m),
            device: self.devs[m].id.clone(),
            start: now,
            at_s,
            end,
            pending,
            detected: None,
            converged: None,
        });
        if kind == FaultKind::Kill {
            // Nobody else in the room: nothing to tell.
            if let Some(w) = self.watches.last_mut()
                && w.pending.is_empty()
            {
                w.converged = Some(now);
            }
        }
    }

    // ---- the end ----------------------------------------------------------------------------

    fn say_goodbye(&mut self, now: Instant) {
        self.goodbye_until = Some(now + GOODBYE);
        for m in 0..self.devs.len() {
            self.stop_media(m);
            let d = &mut self.devs[m];
            d.phase = Phase::Dead;
            match std::mem::replace(&mut d.session, Session::None) {
                Session::Up(client) => {
                    let call = self.call;
                    tokio::spawn(async move {
                        if let Some(call) = call {
                            let _ = tokio::time::timeout(
                                GOODBYE,
                                client.request(client_frame::Kind::GroupLeave(pb::GroupLeave {
                                    call_id: call.0,
                                })),
                            )
                            .await;
                        }
                        client.close().await;
                    });
                }
                Session::None => {}
            }
        }
    }

    fn finish(mut self) -> GroupResult {
        let slots = self
            .slot_streams
            .values()
            .map(HashSet::len)
            .max()
            .unwrap_or(0);
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
            let from = if matches!(w.kind, FaultKind::Kill) {
                w.start
            } else {
                w.end
            };
            self.result.faults.push(FaultOutcome {
                kind: w.kind,
                device: w.device.clone(),
                at_s: if w.kind == FaultKind::ServerRestart {
                    w.at_s
                } else {
                    secs(ramp_end, w.start)
                },
                detected_s: w.detected.map(|t| secs(w.start, t)),
                converged_s: w.converged.map(|t| secs(from, t)),
            });
        }
        for d in &self.devs {
            if let Some(link) = &d.link {
                self.result.send_errors += link.send_errors;
            }
        }
        self.result
    }
}
