//! The sans-IO control-plane controller: the one owner of every device,
//! session and call.
//!
//! # Driving it
//!
//! ```text
//! loop {
//!     // one input, with the current time
//!     ctl.handle_frame(now, conn, frame);        // or handle_connection_up/down,
//!                                                //    handle_wire_error, handle_sfu,
//!                                                //    handle_timeout
//!     while let Some(out) = ctl.poll_output() {  // drain after every input
//!         match out { Output::Send{..} => .., Output::Close{..} => .., Output::Sfu(cmd) => .. }
//!     }
//!     sleep_until(ctl.poll_timeout());           // then call handle_timeout(now)
//! }
//! ```
//!
//! Every `handle_*` first fires the timers due at or before `now`, so timers
//! win ties against input in the same instant, and a driver that is late to
//! call `handle_timeout` still sees a consistent state. Time never runs
//! backwards inside: an earlier `now` is clamped to the latest seen.
//!
//! # Model
//!
//! * A **connection** ([`ConnId`]) carries one [`Credential`], proved by the
//!   transport: the device identity, a key that tells "the same credential"
//!   apart from another one, and a [`Grant`](crate::grants::Grant). Its first
//!   frame must be `Hello`. A revoked credential is refused; a different
//!   credential for an identity that has a session is refused
//!   (`IDENTITY_IN_USE`) and the incumbent keeps its calls.
//! * A **session** ([`SessionId`]) is created by `Hello` and outlives its
//!   connection for the resume grace. Each attachment to a connection gets a
//!   fresh [`Epoch`]. One session per device: a fresh `Hello` ends the old one.
//! * A **call** ([`CallId`]) has members: *invited* (alerted, not answered) or
//!   *joined* (with a media participation, one SFU participant named by a
//!   [`ParticipantKey`]). Its phase is live (inviting, ringing, connecting,
//!   active) until it ends, once, with a reason; the ended state is absorbing
//!   and kept as a tombstone for a while so late requests get consistent
//!   answers. A **named room** is a group call found by its name, joined by
//!   anyone whose grant covers the name, ended when its last member leaves.
//!
//! See `signaling/PROTOCOL.md` for the flows and the liveness rules.

mod calls;
mod media;
mod rate;
mod sessions;
pub mod sfu;
mod stats;
mod timers;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use rand::{SeedableRng, rngs::StdRng};
use tracing::{debug, info, trace};

pub use self::sfu::{LeaveReason, RemovalReason, SfuCommand, SfuNotice};
pub use self::stats::{DurationHistogram, Refusal, Stats, Transition};
use self::timers::{LegTimer, Timer, TimerTable};
use crate::Error;
use crate::grants::{Credential, RoomName};
use crate::ids::{CallId, ConnId, DeviceId, Epoch, ParticipantKey, SessionId};
use crate::pb::{
    self, CallKind, CallPhase, CloseReason, EndReason, ErrorCode, ParticipantStatus, ServerFrame,
    client_frame, server_frame,
};

/// Lowest protocol version this server speaks.
pub const PROTOCOL_VERSION_MIN: u32 = 1;
/// Highest protocol version this server speaks.
pub const PROTOCOL_VERSION_MAX: u32 = 1;

/// Longest software version string kept, in bytes.
const MAX_SOFTWARE_VERSION: usize = 64;
/// Longest group name, in bytes.
const MAX_GROUP_NAME: usize = 64;

/// Controller settings. Defaults follow the issue: heartbeat every 2 s,
/// degraded after 2 missed, unreachable after 3, ring timeout 30 s.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Both sides send a heartbeat this often.
    pub heartbeat_interval: Duration,
    /// Missed heartbeats after which a device is `Degraded`.
    pub degraded_after_missed: u32,
    /// Missed heartbeats after which a device is `Unreachable`: its connection
    /// is closed and its session detached.
    pub unreachable_after_missed: u32,
    /// How long a detached session waits for a resume.
    pub resume_grace: Duration,
    /// A new connection must send `Hello` within this time.
    pub hello_timeout: Duration,
    /// An invitation that is not answered within this time ends.
    pub ring_timeout: Duration,
    /// A joined device must send its media offer within this time.
    pub offer_timeout: Duration,
    /// The SFU must answer a join or a device offer within this time.
    pub sfu_timeout: Duration,
    /// Media must connect within this time after the join answer.
    pub connect_timeout: Duration,
    /// A device must answer a server offer within this time.
    pub answer_timeout: Duration,
    /// How long an ended call is remembered (idempotent late requests).
    pub ended_call_retention: Duration,
    /// Malformed/unknown frames tolerated per connection before closing it.
    pub max_errors_per_connection: u32,
    /// Replies remembered per session for duplicate `op_id`s.
    pub op_cache_size: usize,
    /// Bytes of session frames kept until the device acknowledges them
    /// (`Heartbeat.ack_seq`), for replay after a resume. A session whose
    /// buffer overflows cannot be resumed (the device is told
    /// `SessionUnknown` and rejoins).
    pub replay_limit_bytes: usize,
    /// Members (joined + invited) per group call.
    pub max_group_members: usize,
    /// Members per named room.
    pub max_room_members: usize,
    /// Frames per second one connection may send, sustained. Frames over
    /// the rate are answered `RATE_LIMITED` and not processed.
    pub messages_per_second: u32,
    /// Frames one connection may send at once above the sustained rate
    /// (the bucket's size).
    pub message_burst: u32,
    /// Frames refused for the rate, since the connection's bucket was last
    /// full, after which the connection is closed (`RATE_LIMITED`).
    pub max_rate_limited_frames: u32,
    /// Sessions (devices) the node holds; a new device beyond is
    /// `Rejected{OVERLOADED}` and closed. Resuming or replacing its own
    /// session is always allowed.
    pub max_devices: usize,
    /// Live calls (1:1, group and named rooms) the node holds; creating one
    /// more is refused with `OVERLOADED`. Joining live ones is not affected.
    pub max_calls: usize,
    /// Invitations one device may have ringing at once (1:1 and group).
    /// A callee rings for one call at a time: a second caller gets `BUSY`.
    pub max_pending_invites: usize,
    /// Frames queued for one connection before it counts as not reading
    /// and is closed (`NOT_READING`); read by the driver (`service.rs`).
    pub outbound_queue: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval: Duration::from_secs(2),
            degraded_after_missed: 2,
            unreachable_after_missed: 3,
            resume_grace: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            ring_timeout: Duration::from_secs(30),
            offer_timeout: Duration::from_secs(10),
            sfu_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(15),
            answer_timeout: Duration::from_secs(10),
            ended_call_retention: Duration::from_secs(120),
            max_errors_per_connection: 16,
            op_cache_size: 64,
            replay_limit_bytes: 256 * 1024,
            max_group_members: 32,
            max_room_members: 100,
            // A join is 5 frames, heartbeats 1 a second both ways, and a
            // renegotiation answer per change in the room (one offer in
            // flight at a time); 100 people joining a room within 2 s cost
            // each member about 100 answers. 20/s with a burst of 100
            // holds that with margin.
            messages_per_second: 20,
            message_burst: 100,
            max_rate_limited_frames: 50,
            // As many as the QUIC endpoint takes connections
            // (`QuicConfig::max_connections`).
            max_devices: 20_000,
            // Every device of a full node in a 1:1 call.
            max_calls: 10_000,
            // A group ringing all of its other members at once.
            max_pending_invites: 31,
            outbound_queue: 256,
        }
    }
}

impl Config {
    /// Checks the values for consistency.
    pub fn validate(&self) -> Result<(), Error> {
        if self.heartbeat_interval.is_zero() {
            return Err(Error::InvalidConfig("heartbeat_interval must be > 0"));
        }
        if self.degraded_after_missed == 0
            || self.unreachable_after_missed <= self.degraded_after_missed
        {
            return Err(Error::InvalidConfig(
                "need 0 < degraded_after_missed < unreachable_after_missed",
            ));
        }
        if self.op_cache_size == 0 || self.max_group_members < 2 || self.max_room_members < 2 {
            return Err(Error::InvalidConfig(
                "op_cache_size >= 1, max_group_members >= 2 and max_room_members >= 2",
            ));
        }
        if self.messages_per_second == 0 || self.message_burst == 0 {
            return Err(Error::InvalidConfig("messages_per_second and message_burst must be >= 1"));
        }
        if self.max_devices == 0 || self.max_calls == 0 || self.max_pending_invites == 0 || self.outbound_queue == 0 {
            return Err(Error::InvalidConfig(
                "max_devices, max_calls, max_pending_invites and outbound_queue must be >= 1",
            ));
        }
        Ok(())
    }

    /// Worst-case time from the moment a control stream stops moving until
    /// the device is declared unreachable: `(unreachable_after_missed + 1)`
    /// heartbeat intervals (the fault may strike just after an ack).
    pub fn detection_bound(&self) -> Duration {
        self.heartbeat_interval * (self.unreachable_after_missed + 1)
    }
}

/// What the controller asks its driver to do.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Output {
    /// Send a frame on a connection (binary on QUIC, JSON on WebSocket).
    Send {
        /// Target connection.
        conn: ConnId,
        /// The frame.
        frame: ServerFrame,
    },
    /// Close a connection (after sending the frames queued before this).
    /// The controller has already forgotten it; a later
    /// `handle_connection_down` for it is ignored.
    Close {
        /// The connection.
        conn: ConnId,
        /// QUIC application close code / WebSocket close code 4000 + value.
        reason: CloseReason,
    },
    /// A command for the SFU.
    Sfu(SfuCommand),
}

/// Whether frames are known to move to and from a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reachability {
    /// Heartbeats are acked.
    Online,
    /// Some heartbeats went unacked; the stream may be stuck.
    Degraded,
    /// No live connection (closed, or stuck and closed by us).
    Unreachable,
}

/// One row of the device state table (admin API, CLI, metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceSnapshot {
    /// The device.
    pub id: DeviceId,
    /// Current reachability.
    pub reachability: Reachability,
    /// When a heartbeat or heartbeat ack last arrived from it.
    pub last_heartbeat: Option<Instant>,
    /// Round-trip time of the last acked server heartbeat.
    pub heartbeat_rtt: Option<Duration>,
    /// The call it is in (invited or joined), if any.
    pub call: Option<CallId>,
    /// That call's phase.
    pub call_phase: Option<CallPhase>,
    /// Its control session(s); at most one in this version.
    pub sessions: Vec<SessionId>,
    /// Its SFU participants (media sessions).
    pub participants: Vec<ParticipantKey>,
    /// Software version from its last `Hello`.
    pub version: String,
    /// Last error seen on its connection or session.
    pub last_error: Option<String>,
}

/// One call, for the admin API and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallSnapshot {
    /// The call.
    pub id: CallId,
    /// 1:1 or group.
    pub kind: CallKind,
    /// Current phase (`Ended` is terminal).
    pub phase: CallPhase,
    /// Why it ended.
    pub end_reason: Option<EndReason>,
    /// Caller (1:1), owner (group) or who opened it (room).
    pub initiator: DeviceId,
    /// The group's or the room's name (empty for 1:1 calls).
    pub name: String,
    /// When it was created.
    pub created_at: Instant,
    /// When it ended.
    pub ended_at: Option<Instant>,
    /// Current members and their status.
    pub members: Vec<(DeviceId, ParticipantStatus, Option<ParticipantKey>)>,
}

/// Gauges computed on demand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Gauges {
    /// Calls (live and remembered ended ones) by phase.
    pub calls_by_phase: BTreeMap<CallPhase, u64>,
    /// Known devices by reachability.
    pub devices_by_reachability: BTreeMap<Reachability, u64>,
    /// Open connections.
    pub connections: u64,
    /// Sessions, attached or detached.
    pub sessions: u64,
    /// Detached sessions waiting for a resume.
    pub sessions_detached: u64,
    /// SFU participants the controller believes exist.
    pub sfu_participants: u64,
    /// Armed timers.
    pub timers: u64,
}

/// The controller. See the module docs.
#[derive(Debug)]
pub struct Controller {
    config: Config,
    rng: StdRng,
    /// Origin of the millisecond timestamps in heartbeats.
    origin: Instant,
    /// Latest `now` seen; time is clamped to never run backwards.
    last_now: Instant,
    conns: BTreeMap<ConnId, Conn>,
    devices: BTreeMap<DeviceId, Device>,
    sessions: BTreeMap<SessionId, Session>,
    calls: BTreeMap<CallId, Call>,
    /// Live named rooms.
    rooms: BTreeMap<RoomName, CallId>,
    /// Subject -> Unix seconds of its latest revocation.
    revoked: BTreeMap<String, u64>,
    /// Every participant the controller has or may have in the SFU.
    legs: BTreeMap<ParticipantKey, (CallId, DeviceId)>,
    timers: TimerTable,
    out: VecDeque<Output>,
    next_session: u64,
    next_call: u64,
    next_epoch: u64,
    /// Calls whose phase is live (tombstones not counted), for `max_calls`.
    live_calls: usize,
    stats: Stats,
}

#[derive(Debug)]
struct Conn {
    device: DeviceId,
    credential: Credential,
    state: ConnState,
    errors: u32,
    rate: rate::RateLimiter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    AwaitingHello,
    Attached(SessionId),
}

#[derive(Debug)]
struct Device {
    session: Option<SessionId>,
    version: String,
    last_heartbeat: Option<Instant>,
    rtt: Option<Duration>,
    last_error: Option<String>,
    reachability: Reachability,
}

#[derive(Debug)]
struct Session {
    device: DeviceId,
    /// The credential that created it; a resume or a replacement must
    /// present the same one.
    credential: Credential,
    epoch: Epoch,
    token: [u8; 16],
    link: Link,
    hb: Heartbeats,
    /// Last moment both directions were proven (Hello or latest ack).
    last_proof: Instant,
    call: Option<CallId>,
    /// Replies by op id, without their `seq`.
    ops: VecDeque<(u64, ServerFrame)>,
    /// Session frames not yet acknowledged by the device, in `seq` order.
    replay: VecDeque<ServerFrame>,
    replay_bytes: usize,
    /// Frames were dropped from `replay`: the session cannot be resumed.
    replay_overflow: bool,
    /// `seq` of the next session frame.
    next_seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Attached(ConnId),
    Detached { since: Instant },
}

#[derive(Debug, Default)]
struct Heartbeats {
    /// Sequence number of the next heartbeat to send (the first is 1).
    next_seq: u64,
    /// Highest acked sequence number.
    last_acked: u64,
    /// Consecutive intervals whose heartbeat was not acked in time.
    missed: u32,
}

#[derive(Debug)]
struct Call {
    kind: CallKindState,
    phase: Phase,
    created_at: Instant,
    members: BTreeMap<DeviceId, Member>,
    /// Everyone who was ever a member: may rejoin a live group, and gets
    /// idempotent answers about an ended call.
    former: BTreeSet<DeviceId>,
}

#[derive(Debug, Clone)]
enum CallKindState {
    Direct { caller: DeviceId, callee: DeviceId },
    Group { owner: DeviceId, name: String },
    /// A named room; it has no owner.
    Room { name: RoomName, creator: DeviceId },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Live(LivePhase),
    Ended { reason: EndReason, at: Instant },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LivePhase {
    Inviting,
    Ringing,
    Connecting,
    Active,
}

impl LivePhase {
    fn wire(self) -> CallPhase {
        match self {
            LivePhase::Inviting => CallPhase::Inviting,
            LivePhase::Ringing => CallPhase::Ringing,
            LivePhase::Connecting => CallPhase::Connecting,
            LivePhase::Active => CallPhase::Active,
        }
    }
}

impl Phase {
    fn wire(self) -> CallPhase {
        match self {
            Phase::Live(p) => p.wire(),
            Phase::Ended { .. } => CallPhase::Ended,
        }
    }
}

#[derive(Debug)]
struct Member {
    session: SessionId,
    state: MemberState,
    /// Who rang it, while it is `Invited` (for `max_pending_invites`).
    invited_by: Option<DeviceId>,
    /// Its session is detached; media goes on until the grace ends.
    reconnecting: bool,
}

#[derive(Debug)]
enum MemberState {
    Invited,
    Joined(Leg),
}

/// One device's media participation: one SFU participant.
#[derive(Debug)]
struct Leg {
    key: ParticipantKey,
    phase: LegPhase,
    /// A `Join` was sent, no `JoinFailed`/`Removed` came back and no
    /// `Leave` went out.
    in_sfu: bool,
    /// Revision of the device's joining offer, echoed in the answer.
    join_revision: u64,
    /// The participant's id in the SFU, once joined (0 before).
    media_id: u64,
    /// The revision of a server offer awaiting the device's answer.
    server_offer: Option<u64>,
    /// A device offer (ICE restart) awaiting the SFU's answer: its revision.
    device_offer: Option<u64>,
    next_revision: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LegPhase {
    AwaitingOffer,
    Joining,
    Connecting,
    Connected,
}

impl Member {
    fn status(&self) -> ParticipantStatus {
        match &self.state {
            _ if self.reconnecting => ParticipantStatus::Reconnecting,
            MemberState::Invited => ParticipantStatus::Invited,
            MemberState::Joined(leg) if leg.phase == LegPhase::Connected => {
                ParticipantStatus::Connected
            }
            MemberState::Joined(_) => ParticipantStatus::Joining,
        }
    }

    fn leg(&self) -> Option<&Leg> {
        match &self.state {
            MemberState::Joined(leg) => Some(leg),
            MemberState::Invited => None,
        }
    }

    fn leg_mut(&mut self) -> Option<&mut Leg> {
        match &mut self.state {
            MemberState::Joined(leg) => Some(leg),
            MemberState::Invited => None,
        }
    }
}

impl Call {
    fn is_live(&self) -> bool {
        matches!(self.phase, Phase::Live(_))
    }

    fn initiator(&self) -> &DeviceId {
        match &self.kind {
            CallKindState::Direct { caller, .. } => caller,
            CallKindState::Group { owner, .. } => owner,
            CallKindState::Room { creator, .. } => creator,
        }
    }

    fn wire_kind(&self) -> CallKind {
        match self.kind {
            CallKindState::Direct { .. } => CallKind::Direct,
            CallKindState::Group { .. } => CallKind::Group,
            CallKindState::Room { .. } => CallKind::Room,
        }
    }

    /// Group calls and rooms: participants come and go, the call goes on.
    fn is_multiparty(&self) -> bool {
        !matches!(self.kind, CallKindState::Direct { .. })
    }

    /// Most members (joined + invited) the call may hold.
    fn capacity(&self, config: &Config) -> usize {
        match self.kind {
            CallKindState::Room { .. } => config.max_room_members,
            _ => config.max_group_members,
        }
    }
}

/// Why a call or a participation ends, and who caused it.
#[derive(Debug, Clone)]
struct Cause {
    reason: EndReason,
    by: Option<DeviceId>,
    detail: String,
    /// When the fault began, for the convergence histogram.
    fault_at: Option<Instant>,
}

impl Cause {
    fn new(reason: EndReason) -> Self {
        Cause {
            reason,
            by: None,
            detail: String::new(),
            fault_at: None,
        }
    }

    fn by(mut self, device: &DeviceId) -> Self {
        self.by = Some(device.clone());
        self
    }

    fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    fn fault_at(mut self, at: Instant) -> Self {
        self.fault_at = Some(at);
        self
    }

    /// Why `device`'s participant leaves the SFU when this cause ends its
    /// membership: the call's reason names one device (`by`), and only that
    /// device's session was lost; everyone else just leaves.
    fn leave_reason(&self, device: &DeviceId) -> LeaveReason {
        match self.reason {
            EndReason::ServerShutdown => LeaveReason::Shutdown,
            EndReason::ConnectionLost if self.by.as_ref() == Some(device) => {
                LeaveReason::SignalingClosed
            }
            _ => LeaveReason::Requested,
        }
    }
}

/// A refused request: becomes an `Error` reply.
#[derive(Debug, Clone)]
struct Reject {
    code: ErrorCode,
    message: String,
    call_id: u64,
}

impl Reject {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Reject {
            code,
            message: message.into(),
            call_id: 0,
        }
    }

    fn call(mut self, call: u64) -> Self {
        self.call_id = call;
        self
    }
}

type Handled = Result<u64, Reject>;

impl Controller {
    /// A controller starting at `now`. `seed` feeds the CSPRNG for resume
    /// tokens: the driver passes OS entropy, tests a fixed seed.
    pub fn new(config: Config, now: Instant, seed: [u8; 32]) -> Result<Self, Error> {
        config.validate()?;
        Ok(Controller {
            config,
            rng: StdRng::from_seed(seed),
            origin: now,
            last_now: now,
            conns: BTreeMap::new(),
            devices: BTreeMap::new(),
            sessions: BTreeMap::new(),
            calls: BTreeMap::new(),
            rooms: BTreeMap::new(),
            revoked: BTreeMap::new(),
            legs: BTreeMap::new(),
            timers: TimerTable::default(),
            out: VecDeque::new(),
            next_session: 1,
            next_call: 1,
            next_epoch: 1,
            live_calls: 0,
            stats: Stats {
                heartbeat_rtt: stats::DurationHistogram::with_bounds_ms(&[1, 2, 5, 10, 25, 50, 100, 250, 500, 1000]),
                ..Stats::default()
            },
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    // ---- inputs -----------------------------------------------------------

    /// A transport connection came up with a proven `credential`; `unix_now`
    /// is the driver's wall clock (Unix seconds), the clock credentials are
    /// stated in. A revoked credential is answered
    /// `Rejected{CREDENTIAL_REVOKED}` and closed; the connection closes
    /// (`CREDENTIAL_EXPIRED`) when the credential expires.
    pub fn handle_connection_up(&mut self, now: Instant, unix_now: u64, conn: ConnId, credential: Credential) {
        let now = self.advance(now);
        if self.conns.contains_key(&conn) {
            // A driver bug; keep the first one.
            debug!(%conn, "duplicate connection id ignored");
            return;
        }
        let device = credential.identity.clone();
        let valid_for = Duration::from_secs(credential.expires_at.saturating_sub(unix_now));
        debug!(%conn, %device, "connection up");
        self.devices
            .entry(device.clone())
            .or_insert_with(|| Device {
                session: None,
                version: String::new(),
                last_heartbeat: None,
                rtt: None,
                last_error: None,
                reachability: Reachability::Unreachable,
            });
        let revoked = self.is_revoked(&credential);
        self.conns.insert(
            conn,
            Conn {
                device,
                credential,
                state: ConnState::AwaitingHello,
                errors: 0,
                rate: rate::RateLimiter::new(now),
            },
        );
        if revoked {
            info!(%conn, "revoked credential refused");
            self.reject(conn, ErrorCode::CredentialRevoked, "this credential has been revoked", CloseReason::Revoked);
            return;
        }
        if valid_for.is_zero() {
            info!(%conn, "expired credential refused");
            self.reject(conn, ErrorCode::CredentialExpired, "this credential has expired", CloseReason::CredentialExpired);
            return;
        }
        self.timers
            .set(Timer::Hello(conn), now + self.config.hello_timeout);
        self.timers.set(Timer::CredentialExpiry(conn), now + valid_for);
    }

    /// Revokes every credential of `subject` issued at or before `at` (Unix
    /// seconds): their connections close (`REVOKED`), their sessions end
    /// without resume, and their calls converge (`END_REASON_REVOKED`); later
    /// connections with them are refused. Returns how many sessions ended.
    pub fn handle_revoke(&mut self, now: Instant, subject: &str, at: u64) -> usize {
        let now = self.advance(now);
        let cutoff = self.revoked.entry(subject.to_owned()).or_insert(at);
        *cutoff = (*cutoff).max(at);
        info!(subject, at, "credentials revoked");
        let conns: Vec<ConnId> = self.conns.iter().filter(|(_, c)| self.is_revoked(&c.credential)).map(|(id, _)| *id).collect();
        let sessions: Vec<SessionId> = self.sessions.iter().filter(|(_, s)| self.is_revoked(&s.credential)).map(|(id, _)| *id).collect();
        for sid in &sessions {
            let device = self.sessions[sid].device.clone();
            let cause = Cause::new(EndReason::Revoked).by(&device).detail("the device's credential was revoked");
            self.terminate_session(now, *sid, cause);
        }
        for conn in conns {
            self.note_device_error(conn, "credential revoked");
            self.close(conn, CloseReason::Revoked);
        }
        sessions.len()
    }

    fn is_revoked(&self, credential: &Credential) -> bool {
        self.revoked.get(&credential.subject).is_some_and(|at| credential.issued_at <= *at)
    }

    /// Refuses a connection: `Rejected{code}`, then the close.
    fn reject(&mut self, conn: ConnId, code: ErrorCode, reason: &str, close: CloseReason) {
        *self.stats.errors_sent.entry(code).or_default() += 1;
        self.send(
            conn,
            0,
            server_frame::Kind::Rejected(pb::Rejected {
                code: code as i32,
                reason: reason.into(),
                server_min_version: PROTOCOL_VERSION_MIN,
                server_max_version: PROTOCOL_VERSION_MAX,
            }),
        );
        self.close(conn, close);
    }

    /// A transport connection went away (closed by the peer, timed out,
    /// reset). `detail` is recorded as the device's last error.
    pub fn handle_connection_down(&mut self, now: Instant, conn: ConnId, detail: &str) {
        let now = self.advance(now);
        let Some(c) = self.conns.remove(&conn) else {
            trace!(%conn, "down for unknown connection");
            return;
        };
        debug!(%conn, device = %c.device, detail, "connection down");
        self.timers.cancel(Timer::Hello(conn));
        self.timers.cancel(Timer::CredentialExpiry(conn));
        if let ConnState::Attached(sid) = c.state {
            let attached_here = self
                .sessions
                .get(&sid)
                .is_some_and(|s| s.link == Link::Attached(conn));
            if attached_here {
                self.detach(now, sid, format!("connection lost: {detail}"));
            }
        }
    }

    /// The driver found `conn`'s outbound queue full (`outbound_queue`
    /// frames waiting): the device stopped reading. The connection closes
    /// (`NOT_READING`) and its session detaches as for a lost connection,
    /// so no other device's frames wait on it.
    pub fn handle_not_reading(&mut self, now: Instant, conn: ConnId) {
        let now = self.advance(now);
        if !self.conns.contains_key(&conn) {
            return;
        }
        *self.stats.refused.entry(Refusal::OutboundQueue).or_default() += 1;
        info!(%conn, "not reading its stream: closing");
        self.note_device_error(conn, "not reading its stream");
        self.close_and_detach(now, conn, CloseReason::NotReading, "not reading its stream");
    }

    /// A decoded frame arrived on `conn`.
    pub fn handle_frame(&mut self, now: Instant, conn: ConnId, frame: pb::ClientFrame) {
        let now = self.advance(now);
        let Some(c) = self.conns.get(&conn) else {
            trace!(%conn, "frame for unknown connection dropped");
            return;
        };
        let state = c.state;
        let op_id = frame.op_id;
        if !self.admit(now, conn, op_id) {
            return;
        }
        match (state, frame.kind) {
            (ConnState::AwaitingHello, Some(client_frame::Kind::Hello(hello))) => {
                self.on_hello(now, conn, hello);
            }
            (ConnState::AwaitingHello, _) => {
                self.send_error(
                    conn,
                    op_id,
                    ErrorCode::NotRegistered,
                    "first frame must be hello",
                    0,
                );
                self.note_device_error(conn, "frame before hello");
                self.close(conn, CloseReason::ProtocolError);
            }
            (ConnState::Attached(_), None) => {
                self.send_error(
                    conn,
                    op_id,
                    ErrorCode::UnknownMessage,
                    "unknown message kind",
                    0,
                );
                self.count_bad_frame(conn);
            }
            (ConnState::Attached(_), Some(client_frame::Kind::Hello(_))) => {
                self.send_error(
                    conn,
                    op_id,
                    ErrorCode::UnexpectedHello,
                    "already registered",
                    0,
                );
            }
            (ConnState::Attached(sid), Some(client_frame::Kind::Heartbeat(hb))) => {
                self.on_device_heartbeat(now, conn, sid, hb);
            }
            (ConnState::Attached(sid), Some(client_frame::Kind::HeartbeatAck(ack))) => {
                self.on_heartbeat_ack(now, sid, ack);
            }
            (ConnState::Attached(sid), Some(kind)) => self.on_request(now, conn, sid, op_id, kind),
        }
    }

    /// The connection's decoder failed (see [`crate::wire`]). Fatal errors
    /// close the connection (the session detaches and may be resumed);
    /// a malformed frame is answered with an error and counted.
    pub fn handle_wire_error(&mut self, now: Instant, conn: ConnId, error: &Error) {
        let now = self.advance(now);
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let state = c.state;
        // A bad frame costs as much as a good one: it counts against the rate.
        if !error.is_fatal() && !self.admit(now, conn, 0) {
            return;
        }
        debug!(%conn, %error, "wire error");
        self.send_error(conn, 0, error.error_code(), &error.to_string(), 0);
        self.note_device_error(conn, &error.to_string());
        if error.is_fatal() || state == ConnState::AwaitingHello {
            self.close_and_detach(now, conn, error.close_reason(), &error.to_string());
        } else {
            self.count_bad_frame(conn);
        }
    }

    /// A notice from the SFU.
    pub fn handle_sfu(&mut self, now: Instant, notice: SfuNotice) {
        let now = self.advance(now);
        self.on_sfu_notice(now, notice);
    }

    /// Fires every timer due at or before `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
    }

    /// Server shutdown: every live call ends with `SERVER_SHUTDOWN`, every
    /// connection is closed, every session is dropped (no resume).
    pub fn handle_shutdown(&mut self, now: Instant) {
        let now = self.advance(now);
        let live: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, c)| c.is_live())
            .map(|(id, _)| *id)
            .collect();
        for id in live {
            self.end_call(now, id, Cause::new(EndReason::ServerShutdown));
        }
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.close(conn, CloseReason::Shutdown);
        }
        let sessions: Vec<SessionId> = self.sessions.keys().copied().collect();
        for sid in sessions {
            self.terminate_session(now, sid, Cause::new(EndReason::ServerShutdown));
        }
    }

    /// An operator ends a call (admin API). Returns false if the call is
    /// unknown or already ended (ending is idempotent).
    pub fn handle_operator_end(&mut self, now: Instant, call: CallId) -> bool {
        let now = self.advance(now);
        self.end_call(now, call, Cause::new(EndReason::EndedByOperator))
    }

    /// A device's own noise suppression setting: the SFU applies it to its
    /// participants now and later; the controller keeps no copy (one owner).
    fn on_set_noise_suppression(&mut self, sid: SessionId, m: pb::SetNoiseSuppression) -> Handled {
        let device = self
            .sessions
            .get(&sid)
            .map(|s| s.device.clone())
            .ok_or_else(|| Reject::new(ErrorCode::NotRegistered, "no session"))?;
        let on = (!m.use_default).then_some(m.enabled);
        debug!(%device, ?on, "noise suppression setting");
        self.out.push_back(Output::Sfu(SfuCommand::SetSuppression { device, on }));
        Ok(0)
    }

    // ---- outputs ----------------------------------------------------------

    /// The next thing to do; drain after every input.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    // ---- observation ------------------------------------------------------

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Gauges, computed now.
    pub fn gauges(&self) -> Gauges {
        let mut g = Gauges::default();
        for call in self.calls.values() {
            *g.calls_by_phase.entry(call.phase.wire()).or_default() += 1;
        }
        for id in self.devices.keys() {
            let r = self.reachability_of(id);
            *g.devices_by_reachability.entry(r).or_default() += 1;
        }
        g.connections = self.conns.len() as u64;
        g.sessions = self.sessions.len() as u64;
        g.sessions_detached = self
            .sessions
            .values()
            .filter(|s| matches!(s.link, Link::Detached { .. }))
            .count() as u64;
        g.sfu_participants = self.legs.len() as u64;
        g.timers = self.timers.len() as u64;
        g
    }

    /// One device's row of the state table.
    pub fn device(&self, id: &DeviceId) -> Option<DeviceSnapshot> {
        let d = self.devices.get(id)?;
        let session = d
            .session
            .and_then(|sid| self.sessions.get(&sid).map(|s| (sid, s)));
        let call = session.and_then(|(_, s)| s.call);
        let participants = self
            .legs
            .iter()
            .filter(|(_, (_, dev))| dev == id)
            .map(|(key, _)| *key)
            .collect();
        Some(DeviceSnapshot {
            id: id.clone(),
            reachability: self.reachability_of(id),
            last_heartbeat: d.last_heartbeat,
            heartbeat_rtt: d.rtt,
            call,
            call_phase: call
                .and_then(|c| self.calls.get(&c))
                .map(|c| c.phase.wire()),
            sessions: session.map(|(sid, _)| sid).into_iter().collect(),
            participants,
            version: d.version.clone(),
            last_error: d.last_error.clone(),
        })
    }

    /// The whole device state table, ordered by id.
    pub fn devices(&self) -> Vec<DeviceSnapshot> {
        self.devices
            .keys()
            .filter_map(|id| self.device(id))
            .collect()
    }

    /// One call (live, or ended and still remembered).
    pub fn call(&self, id: CallId) -> Option<CallSnapshot> {
        let c = self.calls.get(&id)?;
        let (end_reason, ended_at) = match c.phase {
            Phase::Ended { reason, at } => (Some(reason), Some(at)),
            Phase::Live(_) => (None, None),
        };
        Some(CallSnapshot {
            id,
            kind: c.wire_kind(),
            phase: c.phase.wire(),
            end_reason,
            initiator: c.initiator().clone(),
            name: match &c.kind {
                CallKindState::Direct { .. } => String::new(),
                CallKindState::Group { name, .. } => name.clone(),
                CallKindState::Room { name, .. } => name.to_string(),
            },
            created_at: c.created_at,
            ended_at,
            members: c
                .members
                .iter()
                .map(|(d, m)| (d.clone(), m.status(), m.leg().map(|l| l.key)))
                .collect(),
        })
    }

    /// All calls the controller holds, ordered by id.
    pub fn calls(&self) -> Vec<CallSnapshot> {
        self.calls.keys().filter_map(|id| self.call(*id)).collect()
    }

    /// The SFU participants the controller believes exist, with their call.
    pub fn sfu_participants(&self) -> Vec<(ParticipantKey, CallId)> {
        self.legs.iter().map(|(k, (c, _))| (*k, *c)).collect()
    }

    /// Checks the controller's internal invariants at `now` and lists every
    /// violation (empty when healthy). For tests and debug assertions.
    pub fn audit(&self, now: Instant) -> Vec<String> {
        let mut bad = Vec::new();
        for (id, call) in &self.calls {
            match call.phase {
                Phase::Ended { .. } if !call.members.is_empty() => {
                    bad.push(format!("{id} ended but has members"));
                }
                Phase::Live(LivePhase::Inviting | LivePhase::Ringing)
                    if now.saturating_duration_since(call.created_at)
                        >= self.config.ring_timeout =>
                {
                    bad.push(format!("{id} still ringing after the ring timeout"));
                }
                _ => {}
            }
            for (dev, m) in &call.members {
                match self.sessions.get(&m.session) {
                    None => bad.push(format!("{id}: member {dev} has no session")),
                    Some(s) if s.device != *dev || s.call != Some(*id) => {
                        bad.push(format!(
                            "{id}: member {dev} session disagrees ({:?})",
                            s.call
                        ));
                    }
                    Some(_) => {}
                }
                if let Some(leg) = m.leg()
                    && self.legs.get(&leg.key) != Some(&(*id, dev.clone()))
                {
                    bad.push(format!("{id}: leg {} of {dev} not indexed", leg.key));
                }
                if let CallKindState::Direct { caller, callee } = &call.kind
                    && dev != caller
                    && dev != callee
                {
                    bad.push(format!("{id}: stranger {dev} in a 1:1 call"));
                }
                // No waiting state without a deadline: nothing can get stuck.
                let attached = self
                    .sessions
                    .get(&m.session)
                    .is_some_and(|s| matches!(s.link, Link::Attached(_)));
                let mut need = Vec::new();
                match &m.state {
                    MemberState::Invited => need.push(Timer::Ring(*id, m.session)),
                    MemberState::Joined(leg) => {
                        let phase_timer = match leg.phase {
                            LegPhase::AwaitingOffer => Some(LegTimer::Offer),
                            LegPhase::Joining => Some(LegTimer::SfuJoin),
                            LegPhase::Connecting => Some(LegTimer::Connect),
                            LegPhase::Connected => None,
                        };
                        need.extend(phase_timer.map(|t| Timer::Leg(leg.key, t)));
                        if leg.server_offer.is_some() && attached {
                            need.push(Timer::Leg(leg.key, LegTimer::Answer));
                        }
                        if leg.device_offer.is_some() {
                            need.push(Timer::Leg(leg.key, LegTimer::SfuAnswer));
                        }
                    }
                }
                for t in need {
                    if self.timers.get(t).is_none() {
                        bad.push(format!("{id}: {dev} waits without a deadline ({t:?})"));
                    }
                }
            }
        }
        let live = self.calls.values().filter(|c| c.is_live()).count();
        if live != self.live_calls {
            bad.push(format!("{live} live calls, counted {}", self.live_calls));
        }
        for (key, (call, dev)) in &self.legs {
            let ok = self.calls.get(call).is_some_and(|c| {
                c.is_live()
                    && c.members
                        .get(dev)
                        .and_then(|m| m.leg())
                        .is_some_and(|l| l.key == *key)
            });
            if !ok {
                bad.push(format!("participant {key} has no live call member"));
            }
        }
        for (sid, s) in &self.sessions {
            if let Some(call) = s.call
                && !self.calls.get(&call).is_some_and(|c| {
                    c.is_live() && c.members.get(&s.device).is_some_and(|m| m.session == *sid)
                })
            {
                bad.push(format!("{sid} points at {call} which does not hold it"));
            }
            match s.link {
                Link::Detached { since } => {
                    if now.saturating_duration_since(since) >= self.config.resume_grace {
                        bad.push(format!("{sid} detached longer than the grace"));
                    }
                    if self.timers.get(Timer::ResumeGrace(*sid, s.epoch)).is_none() {
                        bad.push(format!("{sid} detached without a grace deadline"));
                    }
                }
                Link::Attached(conn) => {
                    if self.conns.get(&conn).map(|c| c.state) != Some(ConnState::Attached(*sid)) {
                        bad.push(format!("{sid} attached to {conn} which does not know it"));
                    }
                    if self.timers.get(Timer::Heartbeat(*sid, s.epoch)).is_none() {
                        bad.push(format!("{sid} attached without a heartbeat deadline"));
                    }
                }
            }
            if self.devices.get(&s.device).and_then(|d| d.session) != Some(*sid) {
                bad.push(format!("{sid} is not its device's session"));
            }
        }
        for (conn, c) in &self.conns {
            if c.state == ConnState::AwaitingHello && self.timers.get(Timer::Hello(*conn)).is_none()
            {
                bad.push(format!("{conn} awaits hello without a deadline"));
            }
            if self.timers.get(Timer::CredentialExpiry(*conn)).is_none() {
                bad.push(format!("{conn} has no credential expiry"));
            }
            if self.is_revoked(&c.credential) {
                bad.push(format!("{conn} carries a revoked credential"));
            }
        }
        for (name, id) in &self.rooms {
            let indexed = self.calls.get(id).is_some_and(|c| {
                c.is_live() && matches!(&c.kind, CallKindState::Room { name: n, .. } if n == name)
            });
            if !indexed {
                bad.push(format!("room {name} points at {id}, not its live call"));
            }
        }
        for (id, call) in &self.calls {
            if let CallKindState::Room { name, .. } = &call.kind
                && call.is_live()
                && self.rooms.get(name) != Some(id)
            {
                bad.push(format!("{id}: live room {name} is not indexed"));
            }
        }
        for s in self.sessions.values() {
            if self.is_revoked(&s.credential) {
                bad.push(format!("{} holds a session with a revoked credential", s.device));
            }
        }
        bad
    }

    // ---- shared internals -------------------------------------------------

    /// Clamps time and fires every due timer.
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
            Timer::Hello(conn) => {
                if self
                    .conns
                    .get(&conn)
                    .is_some_and(|c| c.state == ConnState::AwaitingHello)
                {
                    self.note_device_error(conn, "no hello in time");
                    self.close(conn, CloseReason::HelloTimeout);
                }
            }
            Timer::CredentialExpiry(conn) => self.on_credential_expired(now, conn),
            Timer::Heartbeat(sid, epoch) => self.on_heartbeat_timer(now, sid, epoch),
            Timer::ResumeGrace(sid, epoch) => self.on_grace_timer(now, sid, epoch),
            Timer::Ring(call, sid) => self.on_ring_timer(now, call, sid),
            Timer::Leg(key, which) => self.on_leg_timer(now, key, which),
            Timer::ForgetCall(call) => {
                if self.calls.get(&call).is_some_and(|c| !c.is_live()) {
                    self.calls.remove(&call);
                }
            }
        }
    }

    fn on_request(
        &mut self,
        now: Instant,
        conn: ConnId,
        sid: SessionId,
        op_id: u64,
        kind: client_frame::Kind,
    ) {
        use client_frame::Kind as K;
        if op_id == 0 {
            self.send_error(
                conn,
                0,
                ErrorCode::MissingOpId,
                "requests need a non-zero op_id",
                0,
            );
            self.count_bad_frame(conn);
            return;
        }
        let cached = self.sessions.get(&sid).and_then(|s| {
            s.ops
                .iter()
                .find(|(op, _)| *op == op_id)
                .map(|(_, f)| f.clone())
        });
        if let Some(frame) = cached {
            self.stats.duplicate_requests += 1;
            debug!(%sid, op_id, "duplicate request answered from cache");
            self.deliver(sid, frame, None);
            return;
        }
        // The reply goes before every event the request causes, in the
        // output queue and in `seq` order.
        let mark = self.out.len();
        let Some(reply_seq) = self.sessions.get_mut(&sid).map(|s| {
            s.next_seq += 1;
            s.next_seq - 1
        }) else {
            return;
        };
        let result = match kind {
            K::Invite(m) => self.on_invite(now, sid, m),
            K::Ringing(m) => self.on_ringing(now, sid, m.call_id),
            K::Accept(m) => self.on_accept(now, sid, m.call_id),
            K::Decline(m) => self.on_decline(now, sid, m.call_id),
            K::Cancel(m) => self.on_cancel(now, sid, m.call_id),
            K::Hangup(m) => self.on_hangup(now, sid, m.call_id),
            K::GroupCreate(m) => self.on_group_create(now, sid, m),
            K::GroupInvite(m) => self.on_group_invite(now, sid, m),
            K::GroupJoin(m) => self.on_group_join(now, sid, m.call_id),
            K::GroupLeave(m) => self.on_group_leave(now, sid, m.call_id),
            K::GroupEnd(m) => self.on_group_end(now, sid, m.call_id),
            K::RoomJoin(m) => self.on_room_join(now, sid, m),
            K::SdpOffer(m) => self.on_sdp_offer(now, sid, m),
            K::SdpAnswer(m) => self.on_sdp_answer(now, sid, m),
            K::IceRestart(m) => self.on_ice_restart(now, sid, m),
            K::SetNoiseSuppression(m) => self.on_set_noise_suppression(sid, m),
            K::Hello(_) | K::Heartbeat(_) | K::HeartbeatAck(_) => {
                // Dispatched in handle_frame; cannot reach here.
                Err(Reject::new(ErrorCode::InvalidState, "not a request"))
            }
        };
        let reply = match result {
            Ok(call_id) => ServerFrame {
                reply_to: op_id,
                seq: 0,
                kind: Some(server_frame::Kind::Ack(pb::Ack { call_id })),
            },
            Err(rej) => {
                debug!(%sid, op_id, code = ?rej.code, message = %rej.message, "request refused");
                *self.stats.errors_sent.entry(rej.code).or_default() += 1;
                ServerFrame {
                    reply_to: op_id,
                    seq: 0,
                    kind: Some(server_frame::Kind::Error(pb::Error {
                        code: rej.code as i32,
                        message: rej.message,
                        call_id: rej.call_id,
                    })),
                }
            }
        };
        if let Some(s) = self.sessions.get_mut(&sid) {
            if s.ops.len() >= self.config.op_cache_size {
                s.ops.pop_front();
            }
            s.ops.push_back((op_id, reply.clone()));
        }
        let _ = conn; // the session is attached to `conn`; deliver sends there
        self.deliver(sid, reply, Some((mark, reply_seq)));
    }

    /// Sends a frame on a connection (no caching, no session involved).
    fn send(&mut self, conn: ConnId, reply_to: u64, kind: server_frame::Kind) {
        self.out.push_back(Output::Send {
            conn,
            frame: ServerFrame {
                reply_to,
                seq: 0,
                kind: Some(kind),
            },
        });
    }

    fn send_error(&mut self, conn: ConnId, reply_to: u64, code: ErrorCode, msg: &str, call: u64) {
        *self.stats.errors_sent.entry(code).or_default() += 1;
        self.send(
            conn,
            reply_to,
            server_frame::Kind::Error(pb::Error {
                code: code as i32,
                message: msg.into(),
                call_id: call,
            }),
        );
    }

    /// Pushes an event to a session.
    fn push(&mut self, sid: SessionId, kind: server_frame::Kind) {
        self.deliver(
            sid,
            ServerFrame {
                reply_to: 0,
                seq: 0,
                kind: Some(kind),
            },
            None,
        );
    }

    /// Delivers a session frame: numbers it (or uses the reserved `seq`),
    /// keeps it for replay until acknowledged, and sends it if the session
    /// is attached. With `at`, the send is placed at that position of the
    /// output queue (a reply goes before the events its request caused).
    fn deliver(&mut self, sid: SessionId, mut frame: ServerFrame, at: Option<(usize, u64)>) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        frame.seq = match at {
            Some((_, seq)) => seq,
            None => {
                let seq = s.next_seq;
                s.next_seq += 1;
                seq
            }
        };
        if !s.replay_overflow {
            let len = prost::Message::encoded_len(&frame);
            if s.replay_bytes + len > self.config.replay_limit_bytes {
                debug!(%sid, "replay buffer full: session no longer resumable");
                s.replay_overflow = true;
                s.replay.clear();
                s.replay_bytes = 0;
            } else {
                let pos = s.replay.partition_point(|f| f.seq < frame.seq);
                s.replay.insert(pos, frame.clone());
                s.replay_bytes += len;
            }
        }
        if let Link::Attached(conn) = s.link {
            let out = Output::Send { conn, frame };
            match at {
                Some((mark, _)) => self.out.insert(mark, out),
                None => self.out.push_back(out),
            }
        }
    }

    /// Forgets a connection and tells the driver to close it.
    fn close(&mut self, conn: ConnId, reason: CloseReason) {
        if self.conns.remove(&conn).is_none() {
            return;
        }
        debug!(%conn, ?reason, "closing connection");
        self.timers.cancel(Timer::Hello(conn));
        self.timers.cancel(Timer::CredentialExpiry(conn));
        *self.stats.connections_closed.entry(reason).or_default() += 1;
        self.out.push_back(Output::Close { conn, reason });
    }

    /// Closes a connection and detaches the session attached to it, if any.
    fn close_and_detach(&mut self, now: Instant, conn: ConnId, reason: CloseReason, detail: &str) {
        let state = self.conns.get(&conn).map(|c| c.state);
        self.close(conn, reason);
        if let Some(ConnState::Attached(sid)) = state
            && self
                .sessions
                .get(&sid)
                .is_some_and(|s| s.link == Link::Attached(conn))
        {
            self.detach(now, sid, detail.to_string());
        }
    }

    /// Applies the connection's message rate to one inbound frame. Over the
    /// rate the frame is not processed: it is answered `RATE_LIMITED` (the
    /// client may send it again later, with the same op id), and a
    /// connection that keeps flooding is closed. Returns whether to process.
    fn admit(&mut self, now: Instant, conn: ConnId, op_id: u64) -> bool {
        let (per_second, burst) = (self.config.messages_per_second, self.config.message_burst);
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        let rate::Verdict::Refuse(refused) = c.rate.take(now, per_second, burst) else {
            return true;
        };
        *self.stats.refused.entry(Refusal::RateLimited).or_default() += 1;
        let message = format!("over {per_second} messages a second: not processed, send it again later");
        self.send_error(conn, op_id, ErrorCode::RateLimited, &message, 0);
        if refused == 1 {
            debug!(%conn, per_second, burst, "connection over its message rate");
        }
        if refused > self.config.max_rate_limited_frames {
            let detail = "kept sending over the message rate";
            info!(%conn, refused, "{detail}: closing");
            self.note_device_error(conn, detail);
            self.close_and_detach(now, conn, CloseReason::RateLimited, detail);
        }
        false
    }

    fn count_bad_frame(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.errors += 1;
        if c.errors > self.config.max_errors_per_connection {
            self.send_error(conn, 0, ErrorCode::TooManyErrors, "too many bad frames", 0);
            self.note_device_error(conn, "too many bad frames");
            let now = self.last_now;
            self.close_and_detach(now, conn, CloseReason::TooManyErrors, "too many bad frames");
        }
    }

    fn note_device_error(&mut self, conn: ConnId, detail: &str) {
        if let Some(c) = self.conns.get(&conn)
            && let Some(d) = self.devices.get_mut(&c.device)
        {
            d.last_error = Some(detail.to_string());
        }
    }

    fn alloc_epoch(&mut self) -> Epoch {
        let e = Epoch(self.next_epoch);
        self.next_epoch += 1;
        e
    }

    fn reachability_of(&self, device: &DeviceId) -> Reachability {
        let Some(sid) = self.devices.get(device).and_then(|d| d.session) else {
            return Reachability::Unreachable;
        };
        match self.sessions.get(&sid) {
            Some(s) => match s.link {
                Link::Detached { .. } => Reachability::Unreachable,
                Link::Attached(_) if s.hb.missed >= self.config.degraded_after_missed => {
                    Reachability::Degraded
                }
                Link::Attached(_) => Reachability::Online,
            },
            None => Reachability::Unreachable,
        }
    }

    /// Records a reachability change of `device`, if there was one.
    fn update_reachability(&mut self, device: &DeviceId) {
        let now_r = self.reachability_of(device);
        let Some(d) = self.devices.get_mut(device) else {
            return;
        };
        if d.reachability != now_r {
            debug!(%device, from = ?d.reachability, to = ?now_r, "reachability");
            *self
                .stats
                .reachability_changes
                .entry((d.reachability, now_r))
                .or_default() += 1;
            d.reachability = now_r;
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_bound_is_four_intervals() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.detection_bound(), Duration::from_secs(8));
        let bad = Config {
            unreachable_after_missed: 2,
            ..Config::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
