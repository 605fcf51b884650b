//! Shared state for several nodes: the store interface as data.
//!
//! The controller will not call a database. It emits [`StoreOp`]s and takes
//! back [`StoreResult`]s, so it stays sans-IO and testable in virtual time; a
//! thin driver hands each op to a [`Store`] (`execute(op) -> result`). Two
//! backends keep the same semantics:
//!
//! * [`MemoryStore`]: one node, zero configuration, the default. Its rules
//!   live in the sans-IO [`MemoryState`] (`apply(now, op)`), which a test in
//!   virtual time can drive directly.
//! * [`RedisStore`]: several nodes on one Redis. Every write is one Lua
//!   script, so each check-and-set is atomic on the server; every op is
//!   bounded by a timeout and answers [`StoreError::Unavailable`] instead of
//!   hanging.
//!
//! What the ops mean, the keys, TTLs and the fencing argument:
//! `signaling/STATE.md`.
//!
//! Not wired yet: the server only opens the configured store at startup
//! (and refuses to start when Redis was asked for and cannot be reached).

mod memory;
mod redis_backend;

use std::fmt;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

pub use self::memory::{MemoryState, MemoryStore};
pub use self::redis_backend::RedisStore;
use crate::ids::DeviceId;

/// Longest node id or call key, in bytes.
pub const MAX_KEY_LEN: usize = 128;
/// Most op ids a call record remembers for replays (the newest ones).
pub const REMEMBERED_OPS: usize = 8;
/// How long a record outlives its use: an ended call's record (for late
/// readers and replays), a lease record after it expires (so epochs continue),
/// a running call's record past its owner's lease (so a taker-over finds it).
pub const RETAIN: Duration = Duration::from_secs(600);
/// Longest value (node info, call detail, push payload), in bytes.
pub const MAX_VALUE_LEN: usize = 64 * 1024;

fn check_key(what: &'static str, id: &str) -> Result<(), StoreError> {
    if id.trim().is_empty() || id.len() > MAX_KEY_LEN || id.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!("{what} {id:?}: 1-{MAX_KEY_LEN} bytes, no control characters")));
    }
    Ok(())
}

/// One node of the deployment (stable across its restarts: its name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(String);

impl NodeId {
    /// Checks and wraps a node id: 1..=128 bytes, no control characters.
    pub fn new(id: impl Into<String>) -> Result<Self, StoreError> {
        let id = id.into();
        check_key("node id", &id)?;
        Ok(NodeId(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The shared name of a call: what every node that wants the call (a named
/// room, a direct call's id) uses, so that concurrent creators meet on one key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CallKey(String);

impl CallKey {
    /// Checks and wraps a call key: 1..=128 bytes, no control characters.
    pub fn new(key: impl Into<String>) -> Result<Self, StoreError> {
        let key = key.into();
        check_key("call key", &key)?;
        Ok(CallKey(key))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CallKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The fencing number of a call's ownership. Every new owner gets a larger
/// one than every owner before it; a write carrying any other epoch than the
/// current lease's is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OwnerEpoch(pub u64);

/// A call record's version: 1 at creation, +1 per committed transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u64);

/// Names one intended write. Retrying a write with the same op id (after a
/// timeout left its outcome unknown) returns the first commit's answer
/// instead of transitioning twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OpId(pub u64);

/// Where a call is in its life, as far as the store cares: only `Ended`
/// has a rule (it is absorbing). Everything else about the call (members,
/// reason, media address) is the controller's, in [`CallRecord::detail`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Created, not yet connected (ringing, first join in progress).
    Setup,
    /// Media flowing.
    Live,
    /// Over, for good: no transition leaves it.
    Ended,
}

impl Phase {
    fn code(self) -> u8 {
        match self {
            Phase::Setup => 0,
            Phase::Live => 1,
            Phase::Ended => 2,
        }
    }

    fn from_code(code: i64) -> Option<Phase> {
        match code {
            0 => Some(Phase::Setup),
            1 => Some(Phase::Live),
            2 => Some(Phase::Ended),
            _ => None,
        }
    }
}

/// Who writes a call record: the node and the lease epoch it believes it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Writer {
    pub node: NodeId,
    pub epoch: OwnerEpoch,
}

/// A call's ownership lease as the store holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub owner: NodeId,
    pub epoch: OwnerEpoch,
    /// Time left before another node may take the call over (0 if expired).
    pub expires_in: Duration,
}

/// A versioned call record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRecord {
    pub version: Version,
    pub phase: Phase,
    /// The writer of the latest version.
    pub written_by: Writer,
    /// The controller's encoding of the rest of the call.
    pub detail: Bytes,
}

/// A node whose heartbeat has not expired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveNode {
    pub node: NodeId,
    /// What the node registered (its addresses, as the controller encodes them).
    pub info: Bytes,
    pub expires_in: Duration,
}

/// Everything a node asks of the shared state. TTLs are explicit so the
/// caller's configuration (heartbeat interval, lease length) stays its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// Registers the node or renews its liveness for `ttl`.
    Heartbeat { node: NodeId, info: Bytes, ttl: Duration },
    /// Removes the node from the live list now (clean shutdown).
    Deregister { node: NodeId },
    /// The nodes whose heartbeat has not expired.
    LiveNodes,
    /// Takes the call's lease if nobody holds it live; a new owner gets a
    /// larger epoch than any before it. The current holder re-acquiring gets
    /// its own lease renewed (same epoch).
    AcquireLease { call: CallKey, node: NodeId, ttl: Duration },
    /// Extends the holder's lease (also after it expired, as long as nobody
    /// took it over: the epoch still proves nobody else wrote).
    RenewLease { call: CallKey, writer: Writer, ttl: Duration },
    /// Gives the lease up now; the next owner gets a larger epoch.
    ReleaseLease { call: CallKey, writer: Writer },
    /// The live lease, if any.
    ReadLease { call: CallKey },
    /// Creates the call record at version 1; the writer must hold the live lease.
    CreateCall { call: CallKey, op: OpId, writer: Writer, phase: Phase, detail: Bytes },
    /// Moves the record from `expected` to `expected + 1`; the writer must
    /// hold the live lease and the record must not be `Ended`.
    Transition { call: CallKey, op: OpId, writer: Writer, expected: Version, phase: Phase, detail: Bytes },
    /// The call record, if any.
    ReadCall { call: CallKey },
    /// The device's control connection is on `node` now (whoever had it before).
    ClaimDevice { device: DeviceId, node: NodeId, ttl: Duration },
    /// Extends the device's location, only if `node` still holds it.
    RefreshDevice { device: DeviceId, node: NodeId, ttl: Duration },
    /// Forgets the device's location, only if `node` still holds it.
    ReleaseDevice { device: DeviceId, node: NodeId },
    /// Which node holds the device's control connection, if any.
    ReadDevice { device: DeviceId },
    /// Sends a push to a node's channel (at most once, only to a node
    /// subscribed right now).
    Publish { node: NodeId, payload: Bytes },
}

impl StoreOp {
    /// Refuses what no backend should see: values over the limit, zero TTLs.
    fn validate(&self) -> Result<(), StoreError> {
        let (ttl, value) = match self {
            StoreOp::Heartbeat { ttl, info, .. } => (Some(*ttl), Some(info)),
            StoreOp::AcquireLease { ttl, .. } | StoreOp::RenewLease { ttl, .. } => (Some(*ttl), None),
            StoreOp::ClaimDevice { ttl, .. } | StoreOp::RefreshDevice { ttl, .. } => (Some(*ttl), None),
            StoreOp::CreateCall { detail, .. } | StoreOp::Transition { detail, .. } => (None, Some(detail)),
            StoreOp::Publish { payload, .. } => (None, Some(payload)),
            _ => (None, None),
        };
        if ttl.is_some_and(|ttl| ttl.as_millis() == 0 || ttl > Duration::from_secs(86_400)) {
            return Err(StoreError::Invalid(format!("ttl {ttl:?} must be 1 ms to 1 day")));
        }
        if let Some(value) = value.filter(|v| v.len() > MAX_VALUE_LEN) {
            return Err(StoreError::Invalid(format!("value of {} bytes exceeds {MAX_VALUE_LEN}", value.len())));
        }
        Ok(())
    }
}

/// What a successful op answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Heartbeat: whether the node was still live before it (false: first
    /// start, or others already saw it as dead).
    Heartbeat { was_live: bool },
    /// Deregister, ReleaseLease, RefreshDevice, ReleaseDevice.
    Done,
    /// LiveNodes, ordered by node id.
    Nodes(Vec<LiveNode>),
    /// AcquireLease, RenewLease: the lease the caller holds now.
    Lease(Lease),
    /// ReadLease.
    CurrentLease(Option<Lease>),
    /// CreateCall, Transition. `replayed`: this op id had already committed,
    /// and this is that first answer again (nothing was written).
    Committed { version: Version, replayed: bool },
    /// ReadCall.
    Call(Option<CallRecord>),
    /// ClaimDevice: who held it before (a node that must drop it).
    DeviceClaimed { previous: Option<NodeId> },
    /// ReadDevice.
    Device(Option<NodeId>),
    /// Publish: how many subscribers took it (0: nobody listens on that node).
    Published { receivers: u64 },
}

/// The result of one op.
pub type StoreResult = Result<StoreOutcome, StoreError>;

/// Why an op did not do what it asked, each with an explicit [`ErrorCode`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The record is at another version than expected: re-read, decide again.
    #[error("version conflict: the record is at version {}", current.0)]
    VersionConflict { current: Version },
    /// The writer does not hold the call's lease (another owner took it, or
    /// nobody holds it): every write of a fenced-off owner ends here.
    #[error("stale epoch: the lease is {}", describe(current))]
    StaleEpoch { current: Option<Lease> },
    /// The writer's lease ran out; renew it (if nobody took over) and retry.
    #[error("the lease expired")]
    LeaseExpired,
    /// Another node holds the call's lease live.
    #[error("lease held by {} (epoch {})", holder.owner, holder.epoch.0)]
    LeaseHeld { holder: Lease },
    /// The call has ended; ended calls never change again.
    #[error("the call has ended (version {})", version.0)]
    Terminal { version: Version },
    /// CreateCall on a key that has a record.
    #[error("the call already exists (version {})", version.0)]
    AlreadyExists { version: Version },
    /// Transition of a record that does not exist.
    #[error("no such record")]
    NotFound,
    /// RefreshDevice/ReleaseDevice by a node that no longer holds the device.
    #[error("the device is held by {}", holder.as_ref().map_or("nobody", |n| n.as_str()))]
    NotHolder { holder: Option<NodeId> },
    /// What is in the store cannot be read as what the key should hold.
    #[error("malformed record at {key}: {detail}")]
    Malformed { key: String, detail: String },
    /// The store could not be reached or did not answer in time. For a
    /// write the outcome is unknown: retry with the same op id.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// The op itself is wrong (empty id, zero TTL, oversized value).
    #[error("invalid store operation: {0}")]
    Invalid(String),
}

fn describe(lease: &Option<Lease>) -> String {
    match lease {
        Some(lease) => format!("held by {} at epoch {}", lease.owner, lease.epoch.0),
        None => "not held".into(),
    }
}

/// Stable names of [`StoreError`]s, for metrics, logs and the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    VersionConflict,
    StaleEpoch,
    LeaseExpired,
    LeaseHeld,
    Terminal,
    AlreadyExists,
    NotFound,
    NotHolder,
    Malformed,
    Unavailable,
    Invalid,
}

impl ErrorCode {
    /// The code as a label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::VersionConflict => "version_conflict",
            ErrorCode::StaleEpoch => "stale_epoch",
            ErrorCode::LeaseExpired => "lease_expired",
            ErrorCode::LeaseHeld => "lease_held",
            ErrorCode::Terminal => "terminal",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NotHolder => "not_holder",
            ErrorCode::Malformed => "malformed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Invalid => "invalid",
        }
    }
}

impl StoreError {
    /// The error's explicit code.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::VersionConflict { .. } => ErrorCode::VersionConflict,
            StoreError::StaleEpoch { .. } => ErrorCode::StaleEpoch,
            StoreError::LeaseExpired => ErrorCode::LeaseExpired,
            StoreError::LeaseHeld { .. } => ErrorCode::LeaseHeld,
            StoreError::Terminal { .. } => ErrorCode::Terminal,
            StoreError::AlreadyExists { .. } => ErrorCode::AlreadyExists,
            StoreError::NotFound => ErrorCode::NotFound,
            StoreError::NotHolder { .. } => ErrorCode::NotHolder,
            StoreError::Malformed { .. } => ErrorCode::Malformed,
            StoreError::Unavailable(_) => ErrorCode::Unavailable,
            StoreError::Invalid(_) => ErrorCode::Invalid,
        }
    }
}

/// What arrives on a node's push channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// One published payload.
    Message(Bytes),
    /// Pushes may have been lost here (the subscription was re-established,
    /// or this reader fell behind): the reader reconciles from the records.
    Gap,
}

/// A node's subscription to its own push channel. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    inbound: mpsc::Receiver<Inbound>,
}

impl Subscription {
    /// Pushes buffered for a reader before older ones are dropped (a [`Inbound::Gap`]).
    pub const BUFFER: usize = 1024;

    /// The next push; `None` once the store is gone.
    pub async fn recv(&mut self) -> Option<Inbound> {
        self.inbound.recv().await
    }
}

/// A backend: executes ops, subscribes to push channels.
pub trait Store: Send + Sync {
    /// Runs one op. Never hangs: a backend that cannot answer within its
    /// timeout answers [`StoreError::Unavailable`].
    fn execute(&self, op: StoreOp) -> impl Future<Output = StoreResult> + Send;
    /// Subscribes to `node`'s push channel.
    fn subscribe(&self, node: NodeId) -> impl Future<Output = Result<Subscription, StoreError>> + Send;
}

/// Which backend, and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendConfig {
    /// In-process state: one node.
    Memory,
    /// Shared state in Redis.
    Redis(RedisConfig),
}

/// How to reach Redis.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host[:port][/db]` (or `rediss://`, `unix://`).
    pub url: String,
    /// Bound on every op, reconnects included. At most [`RedisConfig::MAX_TIMEOUT`].
    pub timeout: Duration,
    /// Prefix of every key and channel (several deployments on one Redis).
    pub prefix: String,
}

impl RedisConfig {
    /// The default bound on one op.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
    /// The longest bound allowed: past it an unreachable Redis stalls callers too long.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(2);
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &str = "fc:";

    /// Checks the URL and the timeout.
    pub fn new(url: impl Into<String>, timeout: Duration) -> Result<Self, StoreError> {
        let config = RedisConfig { url: url.into(), timeout, prefix: Self::DEFAULT_PREFIX.into() };
        if timeout.is_zero() || timeout > Self::MAX_TIMEOUT {
            return Err(StoreError::Invalid(format!("redis timeout {timeout:?} must be above 0 and at most {:?}", Self::MAX_TIMEOUT)));
        }
        ::redis::Client::open(config.url.as_str()).map_err(|e| StoreError::Invalid(format!("redis url {}: {e}", config.redacted_url())))?;
        Ok(config)
    }

    /// The URL without its password, for logs and errors.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig").field("url", &self.redacted_url()).field("timeout", &self.timeout).field("prefix", &self.prefix).finish()
    }
}

/// `redis://user:secret@host` -> `redis://user:***@host`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{scheme}://{user}:***{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

/// The configured backend, opened.
#[derive(Clone, Debug)]
pub enum StateStore {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl StateStore {
    /// Opens the backend. Redis must answer a PING within the timeout: a node
    /// asked to share state never starts alone and silently.
    pub async fn open(config: &BackendConfig) -> Result<StateStore, StoreError> {
        Ok(match config {
            BackendConfig::Memory => StateStore::Memory(MemoryStore::new()),
            BackendConfig::Redis(redis) => StateStore::Redis(RedisStore::connect(redis.clone()).await?),
        })
    }

    /// "memory" or "redis".
    pub fn backend(&self) -> &'static str {
        match self {
            StateStore::Memory(_) => "memory",
            StateStore::Redis(_) => "redis",
        }
    }
}

impl Store for StateStore {
    async fn execute(&self, op: StoreOp) -> StoreResult {
        match self {
            StateStore::Memory(store) => store.execute(op).await,
            StateStore::Redis(store) => store.execute(op).await,
        }
    }

    async fn subscribe(&self, node: NodeId) -> Result<Subscription, StoreError> {
        match self {
            StateStore::Memory(store) => store.subscribe(node).await,
            StateStore::Redis(store) => store.subscribe(node).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(redact("redis://:hunter2@db:6379/0"), "redis://:***@db:6379/0");
        assert_eq!(redact("redis://app:hunter2@db"), "redis://app:***@db");
        assert_eq!(redact("redis://db:6379/0"), "redis://db:6379/0");
        let config = RedisConfig::new("redis://app:hunter2@db", Duration::from_secs(1)).unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn bad_redis_settings_are_refused() {
        assert!(RedisConfig::new("http://db", Duration::from_secs(1)).is_err());
        assert!(RedisConfig::new("redis://db", Duration::from_secs(3)).is_err());
        assert!(RedisConfig::new("redis://db", Duration::ZERO).is_err());
        assert!(NodeId::new(" ").is_err());
        assert!(CallKey::new("x".repeat(MAX_KEY_LEN + 1)).is_err());
        assert_eq!(StoreError::LeaseExpired.code().as_str(), "lease_expired");
    }
}
