//! Virtual-time harness: one [`Controller`], simulated devices and an
//! in-memory SFU.
//!
//! * Time only moves when the harness moves it; the next event is the
//!   earliest of the controller's timeout, frames in flight, SFU notices and
//!   device heartbeats.
//! * Every frame goes through the real codec: protobuf framing for QUIC
//!   devices, proto3 JSON for browser devices.
//! * A device's link delivers in order with a seeded latency. "Loss" on a
//!   reliable stream is modelled the way it shows up in the field: a stream
//!   that stops moving (`freeze`: frames are held, the connection stays up)
//!   and connections that drop (frames in flight are lost).
//! * Simulated devices behave like a real client by default: they ack
//!   heartbeats and send their own, ring when invited, offer media when they
//!   are in a call, answer server offers.
//! * [`Sim::check`] asserts the invariants after a step.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::BytesMut;
pub use fleetcall_signaling::controller::RemovalReason;
use fleetcall_signaling::controller::{Config, Controller, Output, SfuCommand, SfuNotice};
use fleetcall_signaling::grants::{Credential, CredentialKey, Grant, RoomPattern};
use fleetcall_signaling::ids::{CallId, ConnId, DeviceId, ParticipantKey};
use fleetcall_signaling::sdp::Sdp;
use fleetcall_signaling::pb::{
    self, CallEnded, ClientFrame, CloseReason, ServerFrame, client_frame::Kind as C,
    server_frame::Kind as S,
};
use fleetcall_signaling::wire::{self, FrameDecoder};
use rand::{RngExt, SeedableRng, rngs::StdRng};

/// How a simulated device reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Length-delimited protobuf on a QUIC stream.
    Quic,
    /// proto3 JSON text frames on a WebSocket.
    WebSocket,
}

/// What a simulated device does on its own.
#[derive(Debug, Clone)]
pub struct Auto {
    /// Ack server heartbeats and send its own.
    pub heartbeat: bool,
    /// Send `Ringing` when invited.
    pub ringing: bool,
    /// Send `Accept` (1:1) or `GroupJoin` (group) when invited.
    pub accept: bool,
    /// Send the joining `SdpOffer` when it is in a call without media.
    pub media: bool,
    /// Answer server renegotiation offers.
    pub answer_offers: bool,
}

impl Default for Auto {
    fn default() -> Self {
        Auto {
            heartbeat: true,
            ringing: true,
            accept: false,
            media: true,
            answer_offers: true,
        }
    }
}

/// Unix seconds at the start of every simulation (credentials are stated in
/// wall-clock time).
pub const UNIX_START: u64 = 1_800_000_000;

/// A device credential: its identity, a key derived from `key_name`, issued
/// at the simulation's start, valid for a year, with `grant`.
pub fn credential(identity: &str, key_name: &str, grant: Grant) -> Credential {
    Credential {
        identity: DeviceId::new(identity).unwrap(),
        subject: identity.to_string(),
        key: CredentialKey::digest(key_name.as_bytes()),
        issued_at: UNIX_START,
        expires_at: UNIX_START + 365 * 86_400,
        grant,
    }
}

/// A grant for every room.
pub fn all_rooms() -> Grant {
    Grant::device(vec![RoomPattern::parse("*").unwrap()])
}

/// A simulated device.
#[derive(Debug)]
pub struct Dev {
    pub id: DeviceId,
    /// Presented on every connection.
    pub credential: Credential,
    pub transport: Transport,
    pub conn: Option<ConnId>,
    /// (session id, resume token) from the last Welcome.
    pub session: Option<(u64, Vec<u8>)>,
    /// Stream not moving: frames in both directions are held.
    pub frozen: bool,
    /// Frames to the device are held; frames from it still flow.
    pub deaf: bool,
    pub auto: Auto,
    pub latency: Duration,
    /// Every frame received, with its arrival time.
    pub inbox: Vec<(Instant, ServerFrame)>,
    /// Close reasons received, in order.
    pub closes: Vec<CloseReason>,
    /// Calls the device believes it is in (its own view).
    pub in_call: BTreeSet<u64>,
    /// Terminal events, in order.
    pub ended: Vec<(Instant, CallEnded)>,
    /// Terminal events that arrived for a call the device was not in.
    pub duplicate_terminal: Vec<CallEnded>,
    /// Highest session `seq` processed (reset by a fresh Welcome).
    pub last_seq: u64,
    /// Session frames that came twice or out of order: (expected, got).
    pub seq_errors: Vec<(u64, u64)>,
    to_server: VecDeque<(Instant, ClientFrame)>,
    to_device: VecDeque<(Instant, ServerFrame)>,
    next_op: u64,
    ops: BTreeMap<u64, &'static str>,
    answered: BTreeSet<u64>,
    offered: BTreeSet<(u64, u64)>,
    hb_seq: u64,
    next_hb: Option<Instant>,
}

/// One SFU participant in the fake SFU.
#[derive(Debug, Clone)]
pub struct FakeParticipant {
    pub room: CallId,
    pub device: DeviceId,
    pub connected: bool,
}

/// In-memory SFU: answers joins, connects media after a delay, renegotiates
/// the others when someone connects.
#[derive(Debug)]
pub struct FakeSfu {
    pub participants: BTreeMap<ParticipantKey, FakeParticipant>,
    pub commands: Vec<SfuCommand>,
    pending: VecDeque<(Instant, SfuNotice)>,
    pub join_delay: Duration,
    pub connect_delay: Duration,
    /// Devices whose joins are refused.
    pub refuse: BTreeSet<DeviceId>,
    /// Devices whose next join only is refused.
    pub refuse_once: BTreeSet<DeviceId>,
    /// Devices whose media never connects.
    pub no_media: BTreeSet<DeviceId>,
    /// The SFU's next media id.
    next_media_id: u64,
    /// Send renegotiation offers to others when a participant connects.
    pub renegotiate: bool,
    /// Never answer anything (a stuck SFU).
    pub silent: bool,
    offers: u64,
}

/// The harness.
#[derive(Debug)]
pub struct Sim {
    pub seed: u64,
    pub start: Instant,
    pub now: Instant,
    pub ctl: Controller,
    pub sfu: FakeSfu,
    pub devs: BTreeMap<String, Dev>,
    conns: BTreeMap<ConnId, String>,
    next_conn: u64,
    rng: StdRng,
    /// Extra random latency per frame, up to this (0: none).
    pub jitter: Duration,
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// An SDP for the fake SFU and the simulated devices (they never parse it).
pub fn sdp(text: &str) -> Sdp {
    Sdp::new(text).expect("test SDPs are not empty")
}

impl Sim {
    /// A harness with the default configuration.
    pub fn new(seed: u64) -> Self {
        Self::with_config(seed, Config::default())
    }

    pub fn with_config(seed: u64, config: Config) -> Self {
        println!("sim seed = {seed} (rerun with this seed to reproduce)");
        let start = Instant::now();
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        Sim {
            seed,
            start,
            now: start,
            ctl: Controller::new(config, start, key).expect("valid config"),
            sfu: FakeSfu {
                participants: BTreeMap::new(),
                commands: Vec::new(),
                pending: VecDeque::new(),
                join_delay: ms(5),
                connect_delay: ms(150),
                refuse: BTreeSet::new(),
                refuse_once: BTreeSet::new(),
                no_media: BTreeSet::new(),
                next_media_id: 1,
                renegotiate: true,
                silent: false,
                offers: 0,
            },
            devs: BTreeMap::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            rng: StdRng::seed_from_u64(seed),
            jitter: Duration::ZERO,
        }
    }

    /// Milliseconds since the start, for messages.
    pub fn t(&self) -> u128 {
        (self.now - self.start).as_millis()
    }

    // ---- devices ----------------------------------------------------------

    /// Adds a QUIC device, connects it and waits for its Welcome.
    pub fn add(&mut self, name: &str) -> &mut Self {
        self.add_with(name, Transport::Quic, Auto::default())
    }

    pub fn add_with(&mut self, name: &str, transport: Transport, auto: Auto) -> &mut Self {
        // QUIC devices: their certificate, no room grants. WebSocket clients:
        // a token for every room.
        let grant = match transport {
            Transport::Quic => Grant::device(Vec::new()),
            Transport::WebSocket => all_rooms(),
        };
        self.add_credentialed(name, transport, auto, credential(name, name, grant))
    }

    /// Adds a device presenting `credential`, connects it and waits for its
    /// Welcome.
    pub fn add_credentialed(&mut self, name: &str, transport: Transport, auto: Auto, credential: Credential) -> &mut Self {
        self.add_unwelcomed(name, transport, auto, credential);
        let welcomed = self.run_until_cond(secs(1), |s| s.dev(name).session.is_some());
        assert!(welcomed.is_some(), "{name} was not welcomed");
        self
    }

    /// Adds a device and connects it without waiting for anything (it may be
    /// refused).
    pub fn add_unwelcomed(&mut self, name: &str, transport: Transport, auto: Auto, credential: Credential) {
        let dev = Dev {
            id: credential.identity.clone(),
            credential,
            transport,
            conn: None,
            session: None,
            frozen: false,
            deaf: false,
            auto,
            latency: ms(10),
            inbox: Vec::new(),
            closes: Vec::new(),
            in_call: BTreeSet::new(),
            ended: Vec::new(),
            duplicate_terminal: Vec::new(),
            last_seq: 0,
            seq_errors: Vec::new(),
            to_server: VecDeque::new(),
            to_device: VecDeque::new(),
            next_op: 1,
            ops: BTreeMap::new(),
            answered: BTreeSet::new(),
            offered: BTreeSet::new(),
            hb_seq: 0,
            next_hb: None,
        };
        self.devs.insert(name.to_string(), dev);
        self.connect(name, false);
    }

    /// The wall clock of the simulation, in Unix seconds.
    pub fn unix_now(&self) -> u64 {
        UNIX_START + (self.now - self.start).as_secs()
    }

    pub fn dev(&self, name: &str) -> &Dev {
        self.devs
            .get(name)
            .unwrap_or_else(|| panic!("no device {name}"))
    }

    pub fn dev_mut(&mut self, name: &str) -> &mut Dev {
        self.devs
            .get_mut(name)
            .unwrap_or_else(|| panic!("no device {name}"))
    }

    /// Opens a new connection for `name` and sends Hello (resuming its last
    /// session if `resume`).
    pub fn connect(&mut self, name: &str, resume: bool) -> ConnId {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let now = self.now;
        let dev = self.devs.get_mut(name).unwrap();
        dev.conn = Some(conn);
        dev.frozen = false;
        dev.to_server.clear();
        dev.to_device.clear();
        let credential = dev.credential.clone();
        self.conns.insert(conn, name.to_string());
        let unix_now = self.unix_now();
        self.ctl.handle_connection_up(now, unix_now, conn, credential);
        self.drain();
        let resume = if resume {
            let last_seq = self.dev(name).last_seq;
            self.dev(name)
                .session
                .clone()
                .map(|(session_id, resume_token)| pb::Resume {
                    session_id,
                    resume_token,
                    last_seq,
                })
        } else {
            None
        };
        let hello = C::Hello(pb::Hello {
            min_version: 1,
            max_version: 1,
            software_version: "sim 1.0".into(),
            resume,
        });
        self.send_frame(
            name,
            ClientFrame {
                op_id: 0,
                kind: Some(hello),
            },
        );
        conn
    }

    /// The device's connection drops (both sides notice).
    pub fn drop_connection(&mut self, name: &str) {
        let now = self.now;
        let dev = self.dev_mut(name);
        let Some(conn) = dev.conn.take() else { return };
        dev.to_server.clear();
        dev.to_device.clear();
        dev.next_hb = None;
        self.conns.remove(&conn);
        self.ctl.handle_connection_down(now, conn, "simulated drop");
        self.drain();
    }

    /// Reconnects after a drop; `resume` tries to resume the last session.
    pub fn reconnect(&mut self, name: &str, resume: bool) {
        self.drop_connection(name);
        self.connect(name, resume);
    }

    /// The stream stops moving in both directions; the connection stays up.
    pub fn freeze(&mut self, name: &str) {
        self.dev_mut(name).frozen = true;
    }

    pub fn unfreeze(&mut self, name: &str) {
        self.dev_mut(name).frozen = false;
    }

    /// Sends a request; returns its op id.
    pub fn request(&mut self, name: &str, kind: C) -> u64 {
        let dev = self.dev_mut(name);
        let op = dev.next_op;
        dev.next_op += 1;
        dev.ops.insert(op, kind_name(&kind));
        self.send_frame(
            name,
            ClientFrame {
                op_id: op,
                kind: Some(kind),
            },
        );
        op
    }

    /// Sends a request with a chosen op id (to replay one).
    pub fn request_with_op(&mut self, name: &str, op: u64, kind: C) {
        self.dev_mut(name).ops.insert(op, kind_name(&kind));
        self.send_frame(
            name,
            ClientFrame {
                op_id: op,
                kind: Some(kind),
            },
        );
    }

    /// Queues any frame from the device.
    pub fn send_frame(&mut self, name: &str, frame: ClientFrame) {
        let at = self.now + self.link_delay(name);
        let dev = self.dev_mut(name);
        let at = dev.to_server.back().map_or(at, |(t, _)| at.max(*t));
        dev.to_server.push_back((at, frame));
    }

    fn link_delay(&mut self, name: &str) -> Duration {
        let jitter = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_micros(self.rng.random_range(0..=self.jitter.as_micros() as u64))
        };
        self.dev(name).latency + jitter
    }

    /// The reply to `op`, if it arrived.
    pub fn reply(&self, name: &str, op: u64) -> Option<&ServerFrame> {
        self.dev(name)
            .inbox
            .iter()
            .map(|(_, f)| f)
            .find(|f| f.reply_to == op)
    }

    /// The call id from the Ack of `op`; panics with the reply otherwise.
    pub fn acked_call(&self, name: &str, op: u64) -> u64 {
        match self.reply(name, op).and_then(|f| f.kind.as_ref()) {
            Some(S::Ack(a)) => a.call_id,
            other => panic!("{name} op {op}: expected ack, got {other:?}"),
        }
    }

    /// The error code of the reply to `op`; panics otherwise.
    pub fn error_of(&self, name: &str, op: u64) -> pb::ErrorCode {
        match self.reply(name, op).and_then(|f| f.kind.as_ref()) {
            Some(S::Error(e)) => e.code(),
            other => panic!("{name} op {op}: expected error, got {other:?}"),
        }
    }

    /// Invites `callee` from `caller`, runs briefly, returns the call id.
    pub fn invite(&mut self, caller: &str, callee: &str) -> u64 {
        let op = self.request(
            caller,
            C::Invite(pb::Invite {
                callee: callee.into(),
            }),
        );
        self.run_for(ms(100));
        self.acked_call(caller, op)
    }

    /// A 1:1 call, answered and with media connected on both sides.
    pub fn active_call(&mut self, caller: &str, callee: &str) -> u64 {
        let call = self.invite(caller, callee);
        let op = self.request(callee, C::Accept(pb::Accept { call_id: call }));
        self.run_for(ms(600));
        self.acked_call(callee, op);
        assert_eq!(
            self.phase(call),
            pb::CallPhase::Active,
            "call {call} not active"
        );
        call
    }

    /// Creates a group owned by `owner` with the others joined and connected.
    pub fn group(&mut self, owner: &str, others: &[&str]) -> u64 {
        for o in others {
            self.dev_mut(o).auto.accept = true;
        }
        let op = self.request(
            owner,
            C::GroupCreate(pb::GroupCreate {
                name: "ward".into(),
                invitees: others.iter().map(|s| s.to_string()).collect(),
            }),
        );
        self.run_for(ms(1500));
        for o in others {
            self.dev_mut(o).auto.accept = false;
        }
        self.acked_call(owner, op)
    }

    /// Frames of one kind received by a device.
    pub fn received<'a, T>(&'a self, name: &str, pick: impl Fn(&'a S) -> Option<T>) -> Vec<T> {
        self.dev(name)
            .inbox
            .iter()
            .filter_map(|(_, f)| f.kind.as_ref().and_then(&pick))
            .collect()
    }

    /// Terminal events a device received for `call`.
    pub fn ended_for(&self, name: &str, call: u64) -> Vec<CallEnded> {
        self.dev(name)
            .ended
            .iter()
            .filter(|(_, e)| e.call_id == call)
            .map(|(_, e)| e.clone())
            .collect()
    }

    pub fn phase(&self, call: u64) -> pb::CallPhase {
        self.ctl
            .call(CallId(call))
            .map(|c| c.phase)
            .unwrap_or(pb::CallPhase::Unspecified)
    }

    pub fn end_reason(&self, call: u64) -> Option<pb::EndReason> {
        self.ctl.call(CallId(call)).and_then(|c| c.end_reason)
    }

    // ---- time -------------------------------------------------------------

    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Processes every event up to and including `until`.
    pub fn run_until(&mut self, until: Instant) {
        while let Some(next) = self.next_event() {
            if next > until {
                break;
            }
            self.now = self.now.max(next);
            self.step();
        }
        self.now = self.now.max(until);
        self.ctl.handle_timeout(self.now);
        self.drain();
    }

    /// Runs until `cond` holds, at most `limit`; returns the time it took.
    pub fn run_until_cond(
        &mut self,
        limit: Duration,
        mut cond: impl FnMut(&Sim) -> bool,
    ) -> Option<Duration> {
        let begin = self.now;
        let until = begin + limit;
        loop {
            if cond(self) {
                return Some(self.now - begin);
            }
            match self.next_event() {
                Some(next) if next <= until => {
                    self.now = self.now.max(next);
                    self.step();
                }
                _ => {
                    self.now = until;
                    self.ctl.handle_timeout(until);
                    self.drain();
                    return cond(self).then(|| self.now - begin);
                }
            }
        }
    }

    /// Jumps the clock (a suspended process, a stalled event loop): nothing
    /// is delivered in between, then everything due happens at once.
    pub fn jump(&mut self, d: Duration) {
        self.now += d;
        self.ctl.handle_timeout(self.now);
        self.drain();
    }

    fn next_event(&self) -> Option<Instant> {
        let mut next = self.ctl.poll_timeout();
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        for dev in self.devs.values() {
            if dev.conn.is_some() && !dev.frozen {
                consider(dev.to_server.front().map(|(t, _)| *t));
                if !dev.deaf {
                    consider(dev.to_device.front().map(|(t, _)| *t));
                }
            }
            if dev.conn.is_some() {
                consider(dev.next_hb);
            }
        }
        consider(self.sfu.pending.front().map(|(t, _)| *t));
        next
    }

    /// Handles everything due at `self.now`.
    fn step(&mut self) {
        let now = self.now;
        self.ctl.handle_timeout(now);
        self.drain();
        let names: Vec<String> = self.devs.keys().cloned().collect();
        for name in &names {
            // Device -> server.
            loop {
                let dev = self.devs.get_mut(name).unwrap();
                if dev.frozen || dev.conn.is_none() {
                    break;
                }
                match dev.to_server.front() {
                    Some((t, _)) if *t <= now => {}
                    _ => break,
                }
                let (_, frame) = dev.to_server.pop_front().unwrap();
                let conn = dev.conn.unwrap();
                let frame = through_codec_client(dev.transport, &frame);
                self.ctl.handle_frame(now, conn, frame);
                self.drain();
            }
            // Server -> device.
            loop {
                let dev = self.devs.get_mut(name).unwrap();
                if dev.frozen || dev.deaf || dev.conn.is_none() {
                    break;
                }
                match dev.to_device.front() {
                    Some((t, _)) if *t <= now => {}
                    _ => break,
                }
                let (_, frame) = dev.to_device.pop_front().unwrap();
                let frame = through_codec_server(dev.transport, &frame);
                self.on_device_frame(name, frame);
            }
            // Device heartbeat.
            let dev = self.devs.get_mut(name).unwrap();
            if dev.conn.is_some() && dev.next_hb.is_some_and(|t| t <= now) {
                dev.hb_seq += 1;
                let seq = dev.hb_seq;
                dev.next_hb = Some(now + secs(2));
                let at_ms = (now - self.start).as_millis() as u64;
                let ack_seq = dev.last_seq;
                let hb = pb::Heartbeat {
                    seq,
                    sent_at_ms: at_ms,
                    ack_seq,
                };
                self.send_frame(
                    name,
                    ClientFrame {
                        op_id: 0,
                        kind: Some(C::Heartbeat(hb)),
                    },
                );
            }
        }
        while self.sfu.pending.front().is_some_and(|(t, _)| *t <= now) {
            let (_, notice) = self.sfu.pending.pop_front().unwrap();
            if let SfuNotice::Connected { participant } = &notice {
                self.sfu_connected(*participant);
            }
            self.ctl.handle_sfu(now, notice);
            self.drain();
        }
    }

    /// Applies every controller output.
    pub fn drain(&mut self) {
        while let Some(out) = self.ctl.poll_output() {
            match out {
                Output::Send { conn, frame } => {
                    let Some(name) = self.conns.get(&conn).cloned() else {
                        continue;
                    };
                    let at = self.now + self.link_delay(&name);
                    let dev = self.dev_mut(&name);
                    let at = dev.to_device.back().map_or(at, |(t, _)| at.max(*t));
                    dev.to_device.push_back((at, frame));
                }
                Output::Close { conn, reason } => {
                    let Some(name) = self.conns.remove(&conn) else {
                        continue;
                    };
                    let dev = self.dev_mut(&name);
                    if dev.conn == Some(conn) {
                        // Frames already queued before the close still arrive
                        // on a real stream (close after flush); deliver them.
                        let queued: Vec<_> = if dev.frozen {
                            Vec::new()
                        } else {
                            dev.to_device.drain(..).collect()
                        };
                        dev.conn = None;
                        dev.to_server.clear();
                        dev.to_device.clear();
                        dev.next_hb = None;
                        dev.closes.push(reason);
                        for (_, f) in queued {
                            self.on_device_frame(&name, f);
                        }
                    }
                    // The driver reports the closed connection; ignored.
                    let now = self.now;
                    self.ctl
                        .handle_connection_down(now, conn, "closed by server");
                }
                Output::Sfu(cmd) => self.sfu_command(cmd),
                other => panic!("unexpected output {other:?}"),
            }
        }
    }

    // ---- the simulated client ---------------------------------------------

    fn on_device_frame(&mut self, name: &str, frame: ServerFrame) {
        let now = self.now;
        let dev = self.dev_mut(name);
        dev.inbox.push((now, frame.clone()));
        if let Some(S::Welcome(w)) = &frame.kind
            && !w.resumed
        {
            dev.last_seq = 0;
        }
        if frame.seq != 0 {
            // Session frames arrive exactly once, in order, across resumes.
            if frame.seq != dev.last_seq + 1 {
                dev.seq_errors.push((dev.last_seq + 1, frame.seq));
                if frame.seq <= dev.last_seq {
                    return;
                }
            }
            dev.last_seq = frame.seq;
        }
        let op_kind = dev.ops.get(&frame.reply_to).copied();
        let Some(kind) = frame.kind else { return };
        match kind {
            S::Welcome(w) => {
                dev.session = Some((w.session_id, w.resume_token.clone()));
                if !w.resumed {
                    // Op ids and the call view belong to the session.
                    dev.in_call.clear();
                    dev.answered.clear();
                }
                if dev.auto.heartbeat {
                    dev.next_hb = Some(now + secs(2));
                }
            }
            S::SessionUnknown(_) => dev.in_call.clear(),
            S::Heartbeat(hb) if dev.auto.heartbeat => {
                let ack = C::HeartbeatAck(pb::HeartbeatAck {
                    seq: hb.seq,
                    echo_sent_at_ms: hb.sent_at_ms,
                });
                self.send_frame(
                    name,
                    ClientFrame {
                        op_id: 0,
                        kind: Some(ack),
                    },
                );
            }
            // A client acts on the first reply to an op only (a replayed op
            // gets the cached reply again).
            S::Ack(_) if !dev.answered.insert(frame.reply_to) => {}
            S::Ack(a)
                if matches!(
                    op_kind,
                    Some("invite" | "group_create" | "group_join" | "accept" | "room_join")
                ) && a.call_id != 0 =>
            {
                // Not yet in the view if the call already ended (busy...).
                let ended = dev.ended.iter().any(|(_, e)| e.call_id == a.call_id);
                if !ended || matches!(op_kind, Some("group_join" | "room_join")) {
                    dev.in_call.insert(a.call_id);
                }
            }
            S::IncomingCall(inc) => {
                dev.in_call.insert(inc.call_id);
                let (ringing, accept) = (dev.auto.ringing, dev.auto.accept);
                if ringing {
                    self.request(
                        name,
                        C::Ringing(pb::Ringing {
                            call_id: inc.call_id,
                        }),
                    );
                }
                if accept {
                    let kind = if inc.kind() == pb::CallKind::Group {
                        C::GroupJoin(pb::GroupJoin {
                            call_id: inc.call_id,
                        })
                    } else {
                        C::Accept(pb::Accept {
                            call_id: inc.call_id,
                        })
                    };
                    self.request(name, kind);
                }
            }
            S::CallState(st) => {
                let me = dev.id.to_string();
                let joining = st
                    .participants
                    .iter()
                    .any(|p| p.device_id == me && p.status() == pb::ParticipantStatus::Joining);
                let session = dev.session.as_ref().map_or(0, |s| s.0);
                if dev.auto.media && joining && dev.offered.insert((st.call_id, session)) {
                    self.request(
                        name,
                        C::SdpOffer(pb::SdpOffer {
                            call_id: st.call_id,
                            session_id: session,
                            revision: 1,
                            sdp: format!("v=0 offer from {me}"),
                        }),
                    );
                }
            }
            S::SdpOffer(offer) if dev.auto.answer_offers => {
                self.request(
                    name,
                    C::SdpAnswer(pb::SdpAnswer {
                        call_id: offer.call_id,
                        session_id: offer.session_id,
                        revision: offer.revision,
                        sdp: "v=0 answer".into(),
                    }),
                );
            }
            S::CallEnded(e) => {
                if !dev.in_call.remove(&e.call_id) {
                    dev.duplicate_terminal.push(e.clone());
                }
                // A rejoin in the same session offers again.
                let call = e.call_id;
                dev.offered.retain(|(c, _)| *c != call);
                dev.ended.push((now, e));
            }
            _ => {}
        }
    }

    // ---- the fake SFU -----------------------------------------------------

    fn sfu_command(&mut self, cmd: SfuCommand) {
        self.sfu.commands.push(cmd.clone());
        if self.sfu.silent {
            if let SfuCommand::Leave { participant, .. } = cmd {
                self.sfu.participants.remove(&participant);
            }
            return;
        }
        let now = self.now;
        match cmd {
            SfuCommand::Join {
                room,
                participant,
                display_name,
                ..
            } => {
                if self.sfu.refuse.contains(&display_name)
                    || self.sfu.refuse_once.remove(&display_name)
                {
                    self.sfu.pending.push_back((
                        now + self.sfu.join_delay,
                        SfuNotice::JoinFailed {
                            participant,
                            error: "refused".into(),
                        },
                    ));
                    return;
                }
                let media = !self.sfu.no_media.contains(&display_name);
                self.sfu.participants.insert(
                    participant,
                    FakeParticipant {
                        room,
                        device: display_name,
                        connected: false,
                    },
                );
                let media_id = self.sfu.next_media_id;
                self.sfu.next_media_id += 1;
                self.sfu.pending.push_back((
                    now + self.sfu.join_delay,
                    SfuNotice::Joined {
                        participant,
                        answer_sdp: sdp("v=0 sfu answer"),
                        media_id,
                    },
                ));
                if media {
                    self.sfu.pending.push_back((
                        now + self.sfu.join_delay + self.sfu.connect_delay,
                        SfuNotice::Connected { participant },
                    ));
                }
            }
            SfuCommand::Offer { participant, .. } => {
                self.sfu.pending.push_back((
                    now + self.sfu.join_delay,
                    SfuNotice::Answer {
                        participant,
                        sdp: sdp("v=0 sfu restart answer"),
                    },
                ));
            }
            SfuCommand::Answer { .. } | SfuCommand::SetSuppression { .. } => {}
            SfuCommand::Leave { participant, .. } => {
                self.sfu.participants.remove(&participant);
            }
        }
        // Notices must stay in time order.
        self.sfu.pending.make_contiguous().sort_by_key(|(t, _)| *t);
    }

    fn sfu_connected(&mut self, key: ParticipantKey) {
        let Some(p) = self.sfu.participants.get_mut(&key) else {
            return;
        };
        p.connected = true;
        if !self.sfu.renegotiate {
            return;
        }
        let room = p.room;
        let others: Vec<ParticipantKey> = self
            .sfu
            .participants
            .iter()
            .filter(|(k, p)| **k != key && p.room == room && p.connected)
            .map(|(k, _)| *k)
            .collect();
        let now = self.now;
        for other in others {
            self.sfu.offers += 1;
            let text = format!("v=0 sfu reoffer {}", self.sfu.offers);
            self.sfu.pending.push_back((
                now + ms(1),
                SfuNotice::Offer {
                    participant: other,
                    sdp: sdp(&text),
                },
            ));
        }
        self.sfu.pending.make_contiguous().sort_by_key(|(t, _)| *t);
    }

    /// The SFU drops a participant on its own (ICE timeout).
    pub fn sfu_remove(&mut self, key: ParticipantKey, reason: RemovalReason) {
        self.sfu.participants.remove(&key);
        let now = self.now;
        self.ctl.handle_sfu(
            now,
            SfuNotice::Removed {
                participant: key,
                reason,
            },
        );
        self.drain();
    }

    /// The participant key the controller gave `name` in `call`.
    pub fn key_of(&self, name: &str, call: u64) -> Option<ParticipantKey> {
        self.ctl
            .call(CallId(call))?
            .members
            .iter()
            .find(|(d, _, _)| d.as_str() == name)
            .and_then(|(_, _, k)| *k)
    }

    // ---- invariants -------------------------------------------------------

    /// Every invariant that must hold between steps; panics with the seed.
    pub fn check(&self) {
        let now = self.now;
        let seed = self.seed;
        let bad = self.ctl.audit(now);
        assert!(
            bad.is_empty(),
            "seed {seed} t={}ms: controller audit failed: {bad:#?}",
            self.t()
        );
        // No SFU participant without a live call session.
        let known: BTreeMap<ParticipantKey, CallId> =
            self.ctl.sfu_participants().into_iter().collect();
        for (key, p) in &self.sfu.participants {
            let call = known.get(key);
            assert!(
                call == Some(&p.room),
                "seed {seed} t={}ms: SFU participant {key} of {} in {:?} has no live call session",
                self.t(),
                p.device,
                p.room
            );
            let live = self
                .ctl
                .call(p.room)
                .is_some_and(|c| c.phase != pb::CallPhase::Ended);
            assert!(live, "seed {seed}: SFU participant {key} in an ended call");
        }
        // Exactly one terminal event per device participation, and session
        // frames exactly once, in order.
        for (name, dev) in &self.devs {
            assert!(
                dev.seq_errors.is_empty(),
                "seed {seed}: {name} saw session frames out of order (expected, got): {:?}",
                dev.seq_errors
            );
            assert!(
                dev.duplicate_terminal.is_empty(),
                "seed {seed}: {name} got a terminal event for a call it was not in: {:?}",
                dev.duplicate_terminal
            );
        }
    }
}

fn kind_name(kind: &C) -> &'static str {
    match kind {
        C::Invite(_) => "invite",
        C::Accept(_) => "accept",
        C::GroupCreate(_) => "group_create",
        C::GroupJoin(_) => "group_join",
        C::RoomJoin(_) => "room_join",
        _ => "other",
    }
}

/// Sends a client frame through the real encoder and decoder.
fn through_codec_client(transport: Transport, frame: &ClientFrame) -> ClientFrame {
    match transport {
        Transport::Quic => {
            let mut buf = BytesMut::from(&wire::encode_frame_to_vec(frame).unwrap()[..]);
            FrameDecoder::new().decode(&mut buf).unwrap().unwrap()
        }
        Transport::WebSocket => wire::decode_json(&wire::encode_json(frame).unwrap()).unwrap(),
    }
}

fn through_codec_server(transport: Transport, frame: &ServerFrame) -> ServerFrame {
    match transport {
        Transport::Quic => {
            let mut buf = BytesMut::from(&wire::encode_frame_to_vec(frame).unwrap()[..]);
            FrameDecoder::new().decode(&mut buf).unwrap().unwrap()
        }
        Transport::WebSocket => wire::decode_json(&wire::encode_json(frame).unwrap()).unwrap(),
    }
}

/// A seed from `FLEETCALL_SEED` or a fixed default, printed by `Sim::new`.
pub fn seed_from_env(default: u64) -> u64 {
    std::env::var("FLEETCALL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
