//! The device side of the protocol, sans-IO: registration, heartbeats both
//! ways, request bookkeeping, delivery numbers and resume.
//!
//! Inputs: [`ClientCore::handle_connected`] (a fresh stream is open),
//! [`ClientCore::handle_frame`], [`ClientCore::handle_disconnected`],
//! [`ClientCore::handle_timeout`] and [`ClientCore::request`]. Outputs:
//! [`ClientCore::poll_transmit`] (frames to write, in order),
//! [`ClientCore::poll_event`] and [`ClientCore::poll_timeout`]. Drain both
//! queues after every input. Time is an argument and never runs backwards.
//!
//! Refusal: a `Rejected` frame with a credential or version code, or a close
//! with a credential reason (UNAUTHENTICATED, CREDENTIAL_EXPIRED, REVOKED,
//! IDENTITY_IN_USE), will not change by trying again. The core then ends for
//! good: [`ClientEvent::Ended`] once, every request fails with
//! [`RequestFailure::Ended`], and it ignores every later input. The driver
//! stops instead of reconnecting.
//!
//! Delivery: every session frame carries `ServerFrame.seq`. The core hands a
//! frame on at most once (a replayed frame with `seq <= last_seq` is dropped),
//! reports `last_seq` in every `Heartbeat.ack_seq` and in `Resume.last_seq`,
//! and sends requests that got no reply again after a resume with the same
//! `op_id` (the server answers a repeat from its cache).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use tracing::{debug, trace};

use crate::ids::{CallId, SessionId};
use crate::pb::{self, ClientFrame, CloseReason, ErrorCode, ServerFrame, client_frame, server_frame};

/// Protocol versions this client speaks.
pub const CLIENT_VERSION_MIN: u32 = 1;
/// Highest protocol version this client speaks.
pub const CLIENT_VERSION_MAX: u32 = 1;

/// Settings of the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreConfig {
    /// Sent in `Hello`, shown in the server's device table.
    pub software_version: String,
    /// A request without a reply after this long fails with
    /// [`RequestFailure::TimedOut`] (the time spent reconnecting counts).
    pub request_timeout: Duration,
    /// A `Hello` without `Welcome` after this long makes the link unusable.
    pub welcome_timeout: Duration,
    /// Consecutive heartbeat intervals without the ack of our latest
    /// heartbeat after which the server counts as unreachable (the
    /// server applies the same rule, see PROTOCOL.md).
    pub unreachable_after_missed: u32,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            software_version: concat!("fleetcall-client/", env!("CARGO_PKG_VERSION")).into(),
            request_timeout: Duration::from_secs(10),
            welcome_timeout: Duration::from_secs(10),
            unreachable_after_missed: 3,
        }
    }
}

/// A request's operation id, unique within the client's lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub u64);

/// Why a request got no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFailure {
    /// No reply within the request timeout.
    TimedOut,
    /// The session ended (the server no longer knew it) before the reply:
    /// the request may or may not have been carried out.
    SessionLost,
    /// The server refused this client for good ([`ClientEvent::Ended`]).
    Ended,
}

/// What the application hears from the client.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// A session is established (`resumed: false`: a new one) or resumed.
    Connected {
        /// The session.
        session: SessionId,
        /// The previous session goes on.
        resumed: bool,
        /// The call the session is in, if any (a `CallState` follows).
        call: Option<CallId>,
    },
    /// The server no longer had the session this client tried to resume:
    /// every call of it has ended. A `Connected { resumed: false }` follows;
    /// tear media down and rejoin what is still needed.
    SessionUnknown {
        /// The lost session.
        session: SessionId,
        /// The server's explanation.
        reason: String,
    },
    /// The server refused this client for good: its credential is missing,
    /// forged, expired or revoked, another credential holds its identity, or
    /// there is no common protocol version. Sent once, instead of
    /// `Disconnected`; nothing follows. The client has stopped and does not
    /// reconnect: a new credential (or software) is needed.
    Ended {
        /// Why; a `Rejected` frame's code is given as its matching close
        /// reason (CREDENTIAL_REVOKED as REVOKED, ...).
        close: CloseReason,
        /// The server's explanation.
        reason: String,
    },
    /// The connection is gone; the client reconnects on its own.
    Disconnected {
        /// The server's close code, when it closed the connection.
        close: Option<CloseReason>,
        /// What happened, for logs.
        detail: String,
    },
    /// The server refused to establish a session for a reason this client
    /// does not know to be permanent (a code from a newer server); it
    /// reconnects. Known refusals end the client ([`ClientEvent::Ended`]).
    Rejected(pb::Rejected),
    /// An error frame not tied to a request (a problem with a frame).
    ServerError(pb::Error),
    /// You are invited.
    IncomingCall(pb::IncomingCall),
    /// A call's phase and participants.
    CallState(pb::CallState),
    /// A call is over for this device.
    CallEnded(pb::CallEnded),
    /// Another participant's status changed.
    ParticipantUpdate(pb::ParticipantUpdate),
    /// The server renegotiates media: answer with the same revision.
    SdpOffer(pb::SdpOffer),
    /// The media server's answer to this device's offer.
    SdpAnswer(pb::SdpAnswer),
    /// A push this client does not interpret (for example `ActiveSpeakers`).
    Other(ServerFrame),
}

/// What the core asks its driver to do besides writing frames.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CoreEvent {
    /// For the application.
    Event(ClientEvent),
    /// The reply (`Ack` or `Error`) to a request.
    Reply {
        /// The request.
        op: OpId,
        /// The reply frame.
        frame: ServerFrame,
    },
    /// A request will get no reply.
    RequestFailed {
        /// The request.
        op: OpId,
        /// Why.
        failure: RequestFailure,
    },
    /// Frames no longer move on this connection (no `Welcome`, or the
    /// server stopped acking heartbeats): drop it and reconnect.
    Unresponsive {
        /// Why, for logs.
        detail: String,
    },
}

/// What a deadline is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    /// Send the next heartbeat; count the previous one if it was not acked.
    Heartbeat,
    /// `Welcome` must arrive after `Hello`.
    Welcome,
    /// The earliest request deadline.
    Request,
}

impl Timer {
    const COUNT: usize = 3;

    fn index(self) -> usize {
        match self {
            Timer::Heartbeat => 0,
            Timer::Welcome => 1,
            Timer::Request => 2,
        }
    }

    const ALL: [Timer; Timer::COUNT] = [Timer::Heartbeat, Timer::Welcome, Timer::Request];
}

/// One deadline per timer name.
#[derive(Debug, Default)]
struct Timers([Option<Instant>; Timer::COUNT]);

impl Timers {
    fn set(&mut self, timer: Timer, at: Instant) {
        self.0[timer.index()] = Some(at);
    }

    fn cancel(&mut self, timer: Timer) {
        self.0[timer.index()] = None;
    }

    fn next(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }

    /// Takes the first timer due at `now`, in declaration order.
    fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        let timer = Timer::ALL.into_iter().find(|t| self.0[t.index()].is_some_and(|at| at <= now))?;
        self.cancel(timer);
        Some(timer)
    }
}

/// The state of the current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// No connection.
    Down,
    /// `Hello` sent.
    AwaitingWelcome,
    /// Welcomed: requests and heartbeats flow.
    Up,
}

/// What the server told us in `Welcome`.
#[derive(Debug, Clone)]
struct Session {
    id: SessionId,
    token: Vec<u8>,
    heartbeat_interval: Duration,
}

#[derive(Debug)]
struct Pending {
    kind: client_frame::Kind,
    deadline: Instant,
    /// Written on the current connection.
    sent: bool,
}

#[derive(Debug, Default)]
struct Heartbeats {
    /// Sequence number of the next heartbeat (the first is 1).
    next_seq: u64,
    last_acked: u64,
    missed: u32,
}

/// The client core. See the module docs.
#[derive(Debug)]
pub struct ClientCore {
    config: CoreConfig,
    /// Origin of the millisecond timestamps in heartbeats.
    origin: Instant,
    last_now: Instant,
    link: Link,
    session: Option<Session>,
    /// Highest `ServerFrame.seq` handed on in this session.
    last_seq: u64,
    next_op: u64,
    requests: BTreeMap<OpId, Pending>,
    hb: Heartbeats,
    rtt: Option<Duration>,
    timers: Timers,
    transmit: VecDeque<ClientFrame>,
    events: VecDeque<CoreEvent>,
    /// Refused for good (absorbing): the reason and the server's words.
    ended: Option<(CloseReason, String)>,
}

/// Close reasons after which reconnecting cannot succeed.
fn is_permanent(close: CloseReason) -> bool {
    matches!(
        close,
        CloseReason::Unauthenticated
            | CloseReason::CredentialExpired
            | CloseReason::Revoked
            | CloseReason::IdentityInUse
    )
}

/// The close reason that goes with a permanent `Rejected` code (the server
/// closes with it right after the frame); `None`: not known to be permanent.
fn permanent_rejection(code: i32) -> Option<CloseReason> {
    match ErrorCode::try_from(code).ok()? {
        ErrorCode::Unauthenticated => Some(CloseReason::Unauthenticated),
        ErrorCode::CredentialExpired => Some(CloseReason::CredentialExpired),
        ErrorCode::CredentialRevoked => Some(CloseReason::Revoked),
        ErrorCode::IdentityInUse => Some(CloseReason::IdentityInUse),
        ErrorCode::UnsupportedVersion => Some(CloseReason::UnsupportedVersion),
        _ => None,
    }
}

impl ClientCore {
    /// A core with no connection yet.
    pub fn new(config: CoreConfig, now: Instant) -> Self {
        ClientCore {
            config,
            origin: now,
            last_now: now,
            link: Link::Down,
            session: None,
            last_seq: 0,
            next_op: 1,
            requests: BTreeMap::new(),
            hb: Heartbeats::default(),
            rtt: None,
            timers: Timers::default(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            ended: None,
        }
    }

    // ---- inputs -----------------------------------------------------------

    /// A new stream is open: sends `Hello`, resuming the session if there is one.
    pub fn handle_connected(&mut self, now: Instant) {
        let now = self.advance(now);
        if self.ended.is_some() {
            return;
        }
        self.transmit.clear();
        for pending in self.requests.values_mut() {
            pending.sent = false;
        }
        let resume = self.session.as_ref().map(|s| pb::Resume {
            session_id: s.id.0,
            resume_token: s.token.clone(),
            last_seq: self.last_seq,
        });
        debug!(resume = resume.is_some(), last_seq = self.last_seq, "hello");
        self.link = Link::AwaitingWelcome;
        self.timers.cancel(Timer::Heartbeat);
        self.timers.set(Timer::Welcome, now + self.config.welcome_timeout);
        self.transmit.push_back(ClientFrame {
            op_id: 0,
            kind: Some(client_frame::Kind::Hello(pb::Hello {
                min_version: CLIENT_VERSION_MIN,
                max_version: CLIENT_VERSION_MAX,
                software_version: self.config.software_version.clone(),
                resume,
            })),
        });
    }

    /// The connection is gone. Requests without a reply wait for the next
    /// connection (and their deadline), unless `close` is a permanent reason:
    /// then the core ends.
    pub fn handle_disconnected(&mut self, now: Instant, close: Option<CloseReason>, detail: impl Into<String>) {
        self.advance(now);
        if self.link == Link::Down {
            return;
        }
        if let Some(close) = close.filter(|c| is_permanent(*c)) {
            self.end(close, detail.into());
            return;
        }
        self.link = Link::Down;
        self.transmit.clear();
        self.timers.cancel(Timer::Heartbeat);
        self.timers.cancel(Timer::Welcome);
        for pending in self.requests.values_mut() {
            pending.sent = false;
        }
        self.emit(ClientEvent::Disconnected { close, detail: detail.into() });
    }

    /// A frame from the server.
    pub fn handle_frame(&mut self, now: Instant, frame: ServerFrame) {
        let now = self.advance(now);
        if self.link == Link::Down {
            trace!("frame after the connection went down dropped");
            return;
        }
        if frame.seq != 0 {
            if frame.seq <= self.last_seq {
                trace!(seq = frame.seq, last = self.last_seq, "replayed frame already handled");
                return;
            }
            self.last_seq = frame.seq;
        }
        let Some(kind) = frame.kind.clone() else {
            // A kind from a newer server: nothing to do with it.
            debug!(seq = frame.seq, "frame of an unknown kind ignored");
            return;
        };
        use server_frame::Kind as S;
        match kind {
            S::Welcome(welcome) => self.on_welcome(now, welcome),
            S::Rejected(rejected) => match permanent_rejection(rejected.code) {
                Some(close) => self.end(close, rejected.reason),
                None => self.emit(ClientEvent::Rejected(rejected)),
            },
            S::SessionUnknown(unknown) => self.on_session_unknown(unknown),
            S::Heartbeat(hb) => {
                if self.link == Link::Up {
                    self.transmit.push_back(ClientFrame {
                        op_id: 0,
                        kind: Some(client_frame::Kind::HeartbeatAck(pb::HeartbeatAck {
                            seq: hb.seq,
                            echo_sent_at_ms: hb.sent_at_ms,
                        })),
                    });
                }
            }
            S::HeartbeatAck(ack) => self.on_heartbeat_ack(now, ack),
            S::Ack(_) | S::Error(_) if frame.reply_to != 0 => {
                let op = OpId(frame.reply_to);
                if self.requests.remove(&op).is_some() {
                    self.arm_request_timer();
                    self.events.push_back(CoreEvent::Reply { op, frame });
                } else {
                    // A repeat answered from the server's cache, or a reply
                    // after the request timed out.
                    trace!(op = op.0, "reply to no pending request");
                }
            }
            S::Error(error) => self.emit(ClientEvent::ServerError(error)),
            S::Ack(_) => debug!("ack without reply_to ignored"),
            S::IncomingCall(m) => self.emit(ClientEvent::IncomingCall(m)),
            S::CallState(m) => self.emit(ClientEvent::CallState(m)),
            S::CallEnded(m) => self.emit(ClientEvent::CallEnded(m)),
            S::ParticipantUpdate(m) => self.emit(ClientEvent::ParticipantUpdate(m)),
            S::SdpOffer(m) => self.emit(ClientEvent::SdpOffer(m)),
            S::SdpAnswer(m) => self.emit(ClientEvent::SdpAnswer(m)),
            // Pushes this version does not model (e.g. kinds added to the
            // schema later) reach the application as they are.
            #[allow(unreachable_patterns)]
            other => self.emit(ClientEvent::Other(ServerFrame { kind: Some(other), ..frame })),
        }
    }

    /// Fires the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
    }

    /// Queues a request; it is written once the session is up (at once if it
    /// is) and its reply comes as [`CoreEvent::Reply`].
    pub fn request(&mut self, now: Instant, kind: client_frame::Kind) -> OpId {
        let now = self.advance(now);
        let op = OpId(self.next_op);
        self.next_op += 1;
        if self.ended.is_some() {
            self.events.push_back(CoreEvent::RequestFailed { op, failure: RequestFailure::Ended });
            return op;
        }
        let up = self.link == Link::Up;
        if up {
            self.transmit.push_back(ClientFrame { op_id: op.0, kind: Some(kind.clone()) });
        }
        self.requests.insert(op, Pending { kind, deadline: now + self.config.request_timeout, sent: up });
        self.arm_request_timer();
        op
    }

    // ---- outputs ----------------------------------------------------------

    /// The next frame to write.
    pub fn poll_transmit(&mut self) -> Option<ClientFrame> {
        self.transmit.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<CoreEvent> {
        self.events.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    // ---- observation ------------------------------------------------------

    /// The current session, if one was welcomed.
    pub fn session(&self) -> Option<SessionId> {
        self.session.as_ref().map(|s| s.id)
    }

    /// Highest `ServerFrame.seq` handed on in the current session.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// True between `Welcome` and the loss of the connection.
    pub fn is_up(&self) -> bool {
        self.link == Link::Up
    }

    /// Why the server refused this client for good, if it did (see
    /// [`ClientEvent::Ended`]).
    pub fn ended(&self) -> Option<(CloseReason, &str)> {
        self.ended.as_ref().map(|(close, reason)| (*close, reason.as_str()))
    }

    /// Round-trip time of the last acked heartbeat.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Requests without a reply yet.
    pub fn pending_requests(&self) -> usize {
        self.requests.len()
    }

    // ---- internals --------------------------------------------------------

    fn advance(&mut self, now: Instant) -> Instant {
        let now = now.max(self.last_now);
        self.last_now = now;
        while let Some(timer) = self.timers.pop_due(now) {
            self.on_timer(now, timer);
        }
        now
    }

    fn on_timer(&mut self, now: Instant, timer: Timer) {
        trace!(?timer, "timer");
        match timer {
            Timer::Heartbeat => self.on_heartbeat_timer(now),
            Timer::Welcome => {
                if self.link == Link::AwaitingWelcome {
                    self.unresponsive("no welcome in time".into());
                }
            }
            Timer::Request => {
                let due: Vec<OpId> =
                    self.requests.iter().filter(|(_, p)| p.deadline <= now).map(|(op, _)| *op).collect();
                for op in due {
                    self.requests.remove(&op);
                    debug!(op = op.0, "request timed out");
                    self.events.push_back(CoreEvent::RequestFailed { op, failure: RequestFailure::TimedOut });
                }
                self.arm_request_timer();
            }
        }
    }

    fn arm_request_timer(&mut self) {
        match self.requests.values().map(|p| p.deadline).min() {
            Some(at) => self.timers.set(Timer::Request, at),
            None => self.timers.cancel(Timer::Request),
        }
    }

    fn emit(&mut self, event: ClientEvent) {
        self.events.push_back(CoreEvent::Event(event));
    }

    /// Refused for good: nothing is sent or handed on after this.
    fn end(&mut self, close: CloseReason, reason: String) {
        debug!(close = close.as_str_name(), %reason, "refused for good");
        self.link = Link::Down;
        self.session = None;
        self.transmit.clear();
        self.timers = Timers::default();
        self.emit(ClientEvent::Ended { close, reason: reason.clone() });
        self.fail_all(RequestFailure::Ended);
        self.ended = Some((close, reason));
    }

    fn unresponsive(&mut self, detail: String) {
        debug!(%detail, "link unresponsive");
        self.timers.cancel(Timer::Heartbeat);
        self.timers.cancel(Timer::Welcome);
        self.events.push_back(CoreEvent::Unresponsive { detail });
    }

    fn on_welcome(&mut self, now: Instant, welcome: pb::Welcome) {
        if self.link != Link::AwaitingWelcome {
            debug!("unexpected welcome ignored");
            return;
        }
        let resumed = welcome.resumed && self.session.as_ref().is_some_and(|s| s.id.0 == welcome.session_id);
        if !resumed {
            // A new session: numbering starts again, and nothing asked of the
            // old one will be answered.
            self.last_seq = 0;
            self.fail_all(RequestFailure::SessionLost);
        }
        // Zero would mean a heartbeat storm; the server never sends it.
        let interval = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(10)));
        self.session = Some(Session {
            id: SessionId(welcome.session_id),
            token: welcome.resume_token.clone(),
            heartbeat_interval: interval,
        });
        self.link = Link::Up;
        self.timers.cancel(Timer::Welcome);
        self.hb = Heartbeats { next_seq: 1, last_acked: 0, missed: 0 };
        // Requests still unanswered go again, with the same op ids.
        for (op, pending) in &mut self.requests {
            pending.sent = true;
            self.transmit.push_back(ClientFrame { op_id: op.0, kind: Some(pending.kind.clone()) });
        }
        self.send_heartbeat(now);
        self.timers.set(Timer::Heartbeat, now + interval);
        debug!(session = welcome.session_id, resumed, "welcomed");
        self.emit(ClientEvent::Connected {
            session: SessionId(welcome.session_id),
            resumed,
            call: (welcome.call_id != 0).then_some(CallId(welcome.call_id)),
        });
    }

    fn on_session_unknown(&mut self, unknown: pb::SessionUnknown) {
        let session = self.session.take().map_or(SessionId(unknown.session_id), |s| s.id);
        self.last_seq = 0;
        self.emit(ClientEvent::SessionUnknown { session, reason: unknown.reason });
        self.fail_all(RequestFailure::SessionLost);
    }

    fn fail_all(&mut self, failure: RequestFailure) {
        for op in std::mem::take(&mut self.requests).into_keys() {
            self.events.push_back(CoreEvent::RequestFailed { op, failure });
        }
        self.timers.cancel(Timer::Request);
    }

    fn on_heartbeat_timer(&mut self, now: Instant) {
        if self.link != Link::Up {
            return;
        }
        let latest = self.hb.next_seq - 1;
        if self.hb.last_acked < latest {
            self.hb.missed += 1;
        }
        if self.hb.missed >= self.config.unreachable_after_missed {
            let detail = format!("{} heartbeats not acked: the server is unreachable", self.hb.missed);
            self.unresponsive(detail);
            return;
        }
        self.send_heartbeat(now);
        let interval = self.session.as_ref().map_or(Duration::from_secs(2), |s| s.heartbeat_interval);
        self.timers.set(Timer::Heartbeat, now + interval);
    }

    fn send_heartbeat(&mut self, now: Instant) {
        let seq = self.hb.next_seq;
        self.hb.next_seq += 1;
        self.transmit.push_back(ClientFrame {
            op_id: 0,
            kind: Some(client_frame::Kind::Heartbeat(pb::Heartbeat {
                seq,
                sent_at_ms: self.millis(now),
                ack_seq: self.last_seq,
            })),
        });
    }

    fn on_heartbeat_ack(&mut self, now: Instant, ack: pb::HeartbeatAck) {
        if self.link != Link::Up || ack.seq == 0 || ack.seq >= self.hb.next_seq {
            return;
        }
        self.hb.last_acked = self.hb.last_acked.max(ack.seq);
        if ack.seq + 1 == self.hb.next_seq {
            self.hb.missed = 0;
        }
        // The echo is network input: use it only if it is plausible.
        if let Some(sent) = self.origin.checked_add(Duration::from_millis(ack.echo_sent_at_ms)).filter(|t| *t <= now) {
            self.rtt = Some(now - sent);
        }
    }

    fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::pb::client_frame::Kind as C;
    use crate::pb::server_frame::Kind as S;

    const HB: Duration = Duration::from_millis(500);

    fn welcome(session: u64, resumed: bool) -> ServerFrame {
        frame(
            0,
            0,
            S::Welcome(pb::Welcome {
                version: 1,
                session_id: session,
                epoch: 7,
                resume_token: vec![session as u8; 16],
                heartbeat_interval_ms: HB.as_millis() as u32,
                resume_grace_ms: 10_000,
                resumed,
                max_frame_bytes: 65_536,
                device_id: "bed-1".into(),
                call_id: 0,
                grant: None,
            }),
        )
    }

    fn frame(reply_to: u64, seq: u64, kind: S) -> ServerFrame {
        ServerFrame { reply_to, seq, kind: Some(kind) }
    }

    fn push(seq: u64, call: u64) -> ServerFrame {
        frame(0, seq, S::CallEnded(pb::CallEnded { call_id: call, ..Default::default() }))
    }

    fn drain(core: &mut ClientCore) -> (Vec<ClientFrame>, Vec<CoreEvent>) {
        let frames = std::iter::from_fn(|| core.poll_transmit()).collect();
        let events = std::iter::from_fn(|| core.poll_event()).collect();
        (frames, events)
    }

    /// A core with a welcomed session 5, queues drained.
    fn up(now: Instant) -> ClientCore {
        let mut core = ClientCore::new(CoreConfig::default(), now);
        core.handle_connected(now);
        core.handle_frame(now, welcome(5, false));
        drain(&mut core);
        core
    }

    fn heartbeats(frames: &[ClientFrame]) -> Vec<pb::Heartbeat> {
        frames
            .iter()
            .filter_map(|f| match &f.kind {
                Some(C::Heartbeat(hb)) => Some(*hb),
                _ => None,
            })
            .collect()
    }

    fn ended_calls(events: &[CoreEvent]) -> Vec<u64> {
        events
            .iter()
            .filter_map(|e| match e {
                CoreEvent::Event(ClientEvent::CallEnded(m)) => Some(m.call_id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn hello_then_welcome_starts_heartbeats() {
        let t0 = Instant::now();
        let mut core = ClientCore::new(CoreConfig::default(), t0);
        core.handle_connected(t0);
        let (frames, _) = drain(&mut core);
        let Some(C::Hello(hello)) = &frames[0].kind else { panic!("{frames:?}") };
        assert!(hello.resume.is_none());
        assert_eq!((hello.min_version, hello.max_version), (1, 1));
        assert!(!core.is_up());

        core.handle_frame(t0, welcome(5, false));
        let (frames, events) = drain(&mut core);
        assert_eq!(heartbeats(&frames).len(), 1, "first heartbeat at once");
        assert_eq!(
            events,
            vec![CoreEvent::Event(ClientEvent::Connected { session: SessionId(5), resumed: false, call: None })]
        );
        assert_eq!(core.poll_timeout(), Some(t0 + HB));
    }

    #[test]
    fn seq_is_acked_and_replays_are_dropped() {
        let t0 = Instant::now();
        let mut core = up(t0);
        core.handle_frame(t0, push(1, 10));
        core.handle_frame(t0, push(2, 11));
        // A replay of something already handled, and a connection-level
        // frame (seq 0) in between.
        core.handle_frame(t0, push(2, 11));
        core.handle_frame(t0, frame(0, 0, S::Heartbeat(pb::Heartbeat { seq: 4, sent_at_ms: 99, ack_seq: 0 })));
        core.handle_frame(t0, push(1, 10));
        let (frames, events) = drain(&mut core);
        assert_eq!(ended_calls(&events), vec![10, 11]);
        assert_eq!(core.last_seq(), 2);
        // The server's heartbeat is answered with its seq and timestamp.
        assert!(
            frames.iter().any(|f| matches!(&f.kind, Some(C::HeartbeatAck(a)) if a.seq == 4 && a.echo_sent_at_ms == 99))
        );
        // The next heartbeat reports what was processed.
        core.handle_frame(t0, frame(0, 0, S::HeartbeatAck(pb::HeartbeatAck { seq: 1, echo_sent_at_ms: 0 })));
        core.handle_timeout(t0 + HB);
        let (frames, _) = drain(&mut core);
        assert_eq!(heartbeats(&frames).iter().map(|h| (h.seq, h.ack_seq)).collect::<Vec<_>>(), vec![(2, 2)]);
    }

    #[test]
    fn resume_carries_last_seq_and_resends_unanswered_requests() {
        let t0 = Instant::now();
        let mut core = up(t0);
        let answered = core.request(t0, C::Ringing(pb::Ringing { call_id: 3 }));
        let lost = core.request(t0, C::Accept(pb::Accept { call_id: 3 }));
        core.handle_frame(t0, frame(answered.0, 1, S::Ack(pb::Ack { call_id: 3 })));
        core.handle_frame(t0, push(2, 3));
        let (frames, events) = drain(&mut core);
        assert_eq!(frames.iter().filter(|f| f.op_id != 0).count(), 2);
        assert!(
            events.contains(&CoreEvent::Reply {
                op: answered,
                frame: frame(answered.0, 1, S::Ack(pb::Ack { call_id: 3 }))
            })
        );

        let t1 = t0 + Duration::from_millis(100);
        core.handle_disconnected(t1, Some(CloseReason::HeartbeatTimeout), "closed");
        // Asked while down: held until the session is back.
        let queued = core.request(t1, C::Hangup(pb::Hangup { call_id: 3 }));
        let (frames, events) = drain(&mut core);
        assert!(frames.is_empty());
        assert!(matches!(
            &events[..],
            [CoreEvent::Event(ClientEvent::Disconnected { close: Some(CloseReason::HeartbeatTimeout), .. })]
        ));

        core.handle_connected(t1);
        let (frames, _) = drain(&mut core);
        let Some(C::Hello(hello)) = &frames[0].kind else { panic!("{frames:?}") };
        let resume = hello.resume.clone().expect("resume");
        assert_eq!((resume.session_id, resume.last_seq, resume.resume_token), (5, 2, vec![5; 16]));
        assert_eq!(frames.len(), 1, "nothing before the welcome");

        core.handle_frame(t1, welcome(5, true));
        // The server replays what we had not acked: seq 2 again, then news.
        core.handle_frame(t1, push(2, 3));
        core.handle_frame(t1, push(3, 4));
        let (frames, events) = drain(&mut core);
        let resent: Vec<u64> = frames.iter().filter(|f| f.op_id != 0).map(|f| f.op_id).collect();
        assert_eq!(resent, vec![lost.0, queued.0], "same op ids, in order");
        assert_eq!(ended_calls(&events), vec![4]);
        assert!(events.contains(&CoreEvent::Event(ClientEvent::Connected {
            session: SessionId(5),
            resumed: true,
            call: None
        })));
        // The answer to a resent request arrives once; a cached repeat is ignored.
        core.handle_frame(t1, frame(lost.0, 4, S::Ack(pb::Ack { call_id: 3 })));
        core.handle_frame(t1, frame(lost.0, 5, S::Ack(pb::Ack { call_id: 3 })));
        let (_, events) = drain(&mut core);
        assert_eq!(events.iter().filter(|e| matches!(e, CoreEvent::Reply { .. })).count(), 1);
        assert_eq!(core.pending_requests(), 1);
    }

    #[test]
    fn session_unknown_fails_requests_and_starts_over() {
        let t0 = Instant::now();
        let mut core = up(t0);
        core.handle_frame(t0, push(1, 9));
        let op = core.request(t0, C::Hangup(pb::Hangup { call_id: 9 }));
        core.handle_disconnected(t0, None, "lost");
        core.handle_connected(t0);
        drain(&mut core);
        core.handle_frame(
            t0,
            frame(0, 0, S::SessionUnknown(pb::SessionUnknown { session_id: 5, reason: "expired".into() })),
        );
        core.handle_frame(t0, welcome(6, false));
        // Numbering restarts in the new session: seq 1 is news.
        core.handle_frame(t0, push(1, 12));
        let (frames, events) = drain(&mut core);
        assert!(frames.iter().all(|f| f.op_id == 0), "nothing of the old session is sent again");
        assert_eq!(
            events[0],
            CoreEvent::Event(ClientEvent::SessionUnknown { session: SessionId(5), reason: "expired".into() })
        );
        assert!(events.contains(&CoreEvent::RequestFailed { op, failure: RequestFailure::SessionLost }));
        assert!(events.contains(&CoreEvent::Event(ClientEvent::Connected {
            session: SessionId(6),
            resumed: false,
            call: None
        })));
        assert_eq!(ended_calls(&events), vec![12]);
        assert_eq!(core.session(), Some(SessionId(6)));
    }

    #[test]
    fn unacked_heartbeats_make_the_link_unresponsive() {
        let t0 = Instant::now();
        let mut core = up(t0);
        // Acks keep it alive.
        let mut now = t0;
        for _ in 0..5 {
            let (frames, events) = drain(&mut core);
            assert!(events.is_empty(), "{events:?}");
            let seq = heartbeats(&frames).last().map_or(0, |h| h.seq);
            if seq > 0 {
                core.handle_frame(now, frame(0, 0, S::HeartbeatAck(pb::HeartbeatAck { seq, echo_sent_at_ms: 0 })));
            }
            now += HB;
            core.handle_timeout(now);
        }
        drain(&mut core);
        // Then silence: the third unacked interval gives up.
        for missed in 1..=3 {
            now += HB;
            core.handle_timeout(now);
            let (_, events) = drain(&mut core);
            let gave_up = events.iter().any(|e| matches!(e, CoreEvent::Unresponsive { .. }));
            assert_eq!(gave_up, missed == 3, "after {missed} missed: {events:?}");
        }
        assert_eq!(core.poll_timeout(), None);
    }

    #[test]
    fn requests_time_out_and_late_replies_are_ignored() {
        let t0 = Instant::now();
        let mut core = up(t0);
        let config = CoreConfig::default();
        let op = core.request(t0, C::Invite(pb::Invite { callee: "x".into() }));
        // Keep the link alive meanwhile; only the request should expire.
        let mut now = t0;
        while now < t0 + config.request_timeout - HB {
            now += HB;
            let (frames, events) = drain(&mut core);
            assert!(!events.iter().any(|e| matches!(e, CoreEvent::RequestFailed { .. })));
            if let Some(hb) = heartbeats(&frames).last() {
                core.handle_frame(
                    now,
                    frame(0, 0, S::HeartbeatAck(pb::HeartbeatAck { seq: hb.seq, echo_sent_at_ms: 0 })),
                );
            }
            core.handle_timeout(now);
        }
        core.handle_timeout(t0 + config.request_timeout);
        let (_, events) = drain(&mut core);
        assert!(events.contains(&CoreEvent::RequestFailed { op, failure: RequestFailure::TimedOut }), "{events:?}");
        core.handle_frame(now, frame(op.0, 1, S::Ack(pb::Ack { call_id: 1 })));
        let (_, events) = drain(&mut core);
        assert!(events.is_empty(), "{events:?}");
    }

    #[test]
    fn no_welcome_in_time_is_unresponsive() {
        let t0 = Instant::now();
        let mut core = ClientCore::new(CoreConfig::default(), t0);
        core.handle_connected(t0);
        drain(&mut core);
        core.handle_timeout(t0 + CoreConfig::default().welcome_timeout);
        let (_, events) = drain(&mut core);
        assert!(matches!(&events[..], [CoreEvent::Unresponsive { .. }]), "{events:?}");
    }

    #[test]
    fn time_never_runs_backwards_and_bad_acks_are_ignored() {
        let t0 = Instant::now();
        let mut core = up(t0 + Duration::from_secs(1));
        // An ack for a heartbeat never sent, and an implausible echo.
        core.handle_frame(t0, frame(0, 0, S::HeartbeatAck(pb::HeartbeatAck { seq: 99, echo_sent_at_ms: 0 })));
        core.handle_frame(t0, frame(0, 0, S::HeartbeatAck(pb::HeartbeatAck { seq: 1, echo_sent_at_ms: u64::MAX })));
        assert_eq!(core.rtt(), None);
        // A frame with no kind (from a newer server) changes nothing but seq.
        core.handle_frame(t0, ServerFrame { reply_to: 0, seq: 1, kind: None });
        assert_eq!(core.last_seq(), 1);
        let (_, events) = drain(&mut core);
        assert!(events.is_empty());
    }

    fn rejected(code: ErrorCode) -> ServerFrame {
        frame(
            0,
            0,
            S::Rejected(pb::Rejected {
                code: code as i32,
                reason: format!("{} here", code.as_str_name()),
                server_min_version: 1,
                server_max_version: 1,
            }),
        )
    }

    /// After the end nothing moves: no frame, no event, no timer, and a new
    /// request fails at once.
    fn assert_inert(core: &mut ClientCore, now: Instant) {
        core.handle_disconnected(now, Some(CloseReason::Revoked), "closed");
        core.handle_connected(now);
        core.handle_frame(now, welcome(5, true));
        core.handle_timeout(now + Duration::from_secs(60));
        let (frames, events) = drain(core);
        assert!(frames.is_empty() && events.is_empty(), "{frames:?} {events:?}");
        assert_eq!(core.poll_timeout(), None);
        assert!(!core.is_up());
        let op = core.request(now, C::RoomJoin(pb::RoomJoin { room: "ward-3".into() }));
        let (frames, events) = drain(core);
        assert!(frames.is_empty());
        assert_eq!(events, vec![CoreEvent::RequestFailed { op, failure: RequestFailure::Ended }]);
    }

    #[test]
    fn permanent_rejections_end_the_core_once() {
        for (code, close) in [
            (ErrorCode::Unauthenticated, CloseReason::Unauthenticated),
            (ErrorCode::CredentialExpired, CloseReason::CredentialExpired),
            (ErrorCode::CredentialRevoked, CloseReason::Revoked),
            (ErrorCode::IdentityInUse, CloseReason::IdentityInUse),
            (ErrorCode::UnsupportedVersion, CloseReason::UnsupportedVersion),
        ] {
            let t0 = Instant::now();
            let mut core = up(t0);
            // A request in flight when the link drops; the reconnect is refused.
            let op = core.request(t0, C::GroupLeave(pb::GroupLeave { call_id: 3 }));
            core.handle_disconnected(t0, None, "lost");
            core.handle_connected(t0);
            drain(&mut core);
            core.handle_frame(t0, rejected(code));
            let (frames, events) = drain(&mut core);
            assert!(frames.is_empty(), "{code:?}: {frames:?}");
            assert_eq!(
                events,
                vec![
                    CoreEvent::Event(ClientEvent::Ended { close, reason: format!("{} here", code.as_str_name()) }),
                    CoreEvent::RequestFailed { op, failure: RequestFailure::Ended },
                ],
                "{code:?}"
            );
            assert_eq!(core.ended().map(|(c, _)| c), Some(close));
            assert_eq!(core.session(), None);
            // The server's close that follows the frame is not news.
            assert_inert(&mut core, t0);
        }
    }

    #[test]
    fn permanent_close_reasons_end_the_core_and_others_reconnect() {
        for close in [
            CloseReason::Unauthenticated,
            CloseReason::CredentialExpired,
            CloseReason::Revoked,
            CloseReason::IdentityInUse,
        ] {
            let t0 = Instant::now();
            let mut core = up(t0);
            let op = core.request(t0, C::Hangup(pb::Hangup { call_id: 3 }));
            drain(&mut core);
            core.handle_disconnected(t0, Some(close), "closed by the server");
            let (_, events) = drain(&mut core);
            assert_eq!(
                events,
                vec![
                    CoreEvent::Event(ClientEvent::Ended { close, reason: "closed by the server".into() }),
                    CoreEvent::RequestFailed { op, failure: RequestFailure::Ended },
                ],
                "{close:?}"
            );
            assert_inert(&mut core, t0);
        }
        for close in
            [None, Some(CloseReason::HeartbeatTimeout), Some(CloseReason::Replaced), Some(CloseReason::Shutdown)]
        {
            let t0 = Instant::now();
            let mut core = up(t0);
            core.handle_disconnected(t0, close, "closed");
            let (_, events) = drain(&mut core);
            assert!(
                matches!(&events[..], [CoreEvent::Event(ClientEvent::Disconnected { .. })]),
                "{close:?}: {events:?}"
            );
            assert_eq!(core.ended(), None);
            core.handle_connected(t0);
            let (frames, _) = drain(&mut core);
            assert!(
                matches!(&frames[..], [ClientFrame { kind: Some(C::Hello(h)), .. }] if h.resume.is_some()),
                "{frames:?}"
            );
        }
    }

    #[test]
    fn a_rejection_of_unknown_permanence_is_reported_and_retried() {
        let t0 = Instant::now();
        let mut core = ClientCore::new(CoreConfig::default(), t0);
        core.handle_connected(t0);
        drain(&mut core);
        core.handle_frame(t0, rejected(ErrorCode::Overloaded));
        let (_, events) = drain(&mut core);
        assert!(
            matches!(&events[..], [CoreEvent::Event(ClientEvent::Rejected(r))] if r.code == ErrorCode::Overloaded as i32)
        );
        assert_eq!(core.ended(), None);
        core.handle_disconnected(t0, None, "closed");
        core.handle_connected(t0);
        let (frames, _) = drain(&mut core);
        assert!(matches!(&frames[..], [ClientFrame { kind: Some(C::Hello(_)), .. }]), "{frames:?}");
    }
}
