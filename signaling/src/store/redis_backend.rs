//! The shared backend: every op on one Redis, every write one Lua script
//! (`lua/`), every op bounded by [`RedisConfig::timeout`].
//!
//! The connection is a `redis::aio::ConnectionManager`: one multiplexed
//! connection that reconnects by itself after an I/O error, and scripts go
//! by EVALSHA with a reload when Redis answers NOSCRIPT (a Redis restarted
//! empty has no scripts). The bound is ours, around the whole op (connect,
//! retries and reply included), so a stopped Redis (SIGSTOP: the socket
//! still accepts, nothing answers) costs the caller at most the timeout.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::{Client, RedisError, Script, Value};
use tokio::sync::mpsc;

use super::{
    CallKey, CallRecord, Inbound, Lease, LiveNode, NodeId, OwnerEpoch, Phase, RedisConfig, Store, StoreError, StoreOp, StoreOutcome, StoreResult,
    Subscription, Version, Writer, REMEMBERED_OPS, RETAIN,
};
use crate::ids::DeviceId;

/// Pause between two attempts to re-establish a lost push subscription.
const RESUBSCRIBE_EVERY: Duration = Duration::from_millis(250);

/// The scripts, each with the shared prelude in front.
struct Scripts {
    heartbeat: Script,
    deregister: Script,
    live_nodes: Script,
    acquire: Script,
    renew: Script,
    release: Script,
    read_lease: Script,
    create: Script,
    transition: Script,
    device_refresh: Script,
    device_release: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let script = |body: &str| Script::new(&format!("{}\n{body}", include_str!("lua/common.lua")));
    Scripts {
        heartbeat: script(include_str!("lua/heartbeat.lua")),
        deregister: script(include_str!("lua/deregister.lua")),
        live_nodes: script(include_str!("lua/live_nodes.lua")),
        acquire: script(include_str!("lua/acquire.lua")),
        renew: script(include_str!("lua/renew.lua")),
        release: script(include_str!("lua/release.lua")),
        read_lease: script(include_str!("lua/read_lease.lua")),
        create: script(include_str!("lua/create.lua")),
        transition: script(include_str!("lua/transition.lua")),
        device_refresh: script(include_str!("lua/device_refresh.lua")),
        device_release: script(include_str!("lua/device_release.lua")),
    }
});

/// Key and channel names (`signaling/STATE.md`).
#[derive(Debug)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn live_nodes(&self) -> String {
        format!("{}n", self.prefix)
    }
    fn node_info(&self) -> String {
        format!("{}ni", self.prefix)
    }
    fn lease(&self, call: &CallKey) -> String {
        format!("{}l:{call}", self.prefix)
    }
    fn call(&self, call: &CallKey) -> String {
        format!("{}c:{call}", self.prefix)
    }
    fn device(&self, device: &DeviceId) -> String {
        format!("{}d:{device}", self.prefix)
    }
    fn pushes(&self, node: &NodeId) -> String {
        format!("{}p:{node}", self.prefix)
    }
}

/// Several nodes' shared state on one Redis. Cheap to clone (one connection).
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    client: Client,
    connection: ConnectionManager,
    keys: Keys,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects and checks that Redis answers a PING within the timeout.
    pub async fn connect(config: RedisConfig) -> Result<RedisStore, StoreError> {
        let client = Client::open(config.url.as_str()).map_err(|e| StoreError::Invalid(format!("redis url {}: {e}", config.redacted_url())))?;
        // Reconnect attempts stay short and frequent: when Redis comes back,
        // the next op (or the one after) finds a fresh connection. The op
        // bound below is what callers see meanwhile.
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), manager)
            .map_err(|e| StoreError::Invalid(format!("redis at {}: {e}", config.redacted_url())))?;
        let keys = Keys { prefix: config.prefix.clone() };
        let store = RedisStore { inner: Arc::new(Inner { config, client, connection, keys }) };
        store
            .bounded("PING", async {
                let mut connection = store.inner.connection.clone();
                redis::cmd("PING").query_async::<String>(&mut connection).await
            })
            .await?;
        Ok(store)
    }

    /// The configuration in force.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// Runs `request` within the timeout; what it answers or why not.
    async fn bounded<T>(&self, key: &str, request: impl Future<Output = Result<T, RedisError>>) -> Result<T, StoreError> {
        let timeout = self.inner.config.timeout;
        match tokio::time::timeout(timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(classify(key, &self.inner.config, error)),
            Err(_) => Err(StoreError::Unavailable(format!("redis at {} did not answer within {timeout:?}", self.inner.config.redacted_url()))),
        }
    }

    /// Runs a script on `keys` (the first names the record in errors).
    async fn eval(&self, script: &Script, keys: &[&str], args: Vec<Vec<u8>>) -> Result<Reply, StoreError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let key = keys.last().copied().unwrap_or_default();
        let value = self
            .bounded(key, async {
                let mut connection = self.inner.connection.clone();
                invocation.invoke_async::<Value>(&mut connection).await
            })
            .await?;
        Reply::parse(key, value)
    }

    async fn run(&self, op: StoreOp) -> StoreResult {
        let keys = &self.inner.keys;
        let scripts = &*SCRIPTS;
        let retain = ms(RETAIN);
        match op {
            StoreOp::Heartbeat { node, info, ttl } => {
                let reply = self.eval(&scripts.heartbeat, &[&keys.live_nodes(), &keys.node_info()], vec![arg(&node), info.to_vec(), ms(ttl)]).await?;
                reply.expect_ok()?;
                Ok(StoreOutcome::Heartbeat { was_live: reply.int(1)? == 1 })
            }
            StoreOp::Deregister { node } => {
                self.eval(&scripts.deregister, &[&keys.live_nodes(), &keys.node_info()], vec![arg(&node)]).await?.expect_ok()?;
                Ok(StoreOutcome::Done)
            }
            StoreOp::LiveNodes => {
                let reply = self.eval(&scripts.live_nodes, &[&keys.live_nodes(), &keys.node_info()], vec![]).await?;
                reply.expect_ok()?;
                let mut nodes = Vec::new();
                for at in (1..reply.items.len()).step_by(3) {
                    nodes.push(LiveNode { node: reply.node(at)?, info: reply.bytes(at + 1)?, expires_in: reply.millis(at + 2)? });
                }
                nodes.sort_by(|a, b| a.node.cmp(&b.node));
                Ok(StoreOutcome::Nodes(nodes))
            }
            StoreOp::AcquireLease { call, node, ttl } => {
                let reply = self.eval(&scripts.acquire, &[&keys.lease(&call), &keys.call(&call)], vec![arg(&node), ms(ttl), retain]).await?;
                match reply.status() {
                    "HELD" => Err(StoreError::LeaseHeld { holder: reply.lease(1)? }),
                    _ => {
                        reply.expect_ok()?;
                        Ok(StoreOutcome::Lease(Lease { owner: node, epoch: OwnerEpoch(reply.uint(1)?), expires_in: reply.millis(2)? }))
                    }
                }
            }
            StoreOp::RenewLease { call, writer, ttl } => {
                let args = vec![arg(&writer.node), arg(writer.epoch.0), ms(ttl), retain];
                let reply = self.eval(&scripts.renew, &[&keys.lease(&call), &keys.call(&call)], args).await?;
                reply.expect_ok()?;
                Ok(StoreOutcome::Lease(Lease { owner: writer.node, epoch: OwnerEpoch(reply.uint(1)?), expires_in: reply.millis(2)? }))
            }
            StoreOp::ReleaseLease { call, writer } => {
                self.eval(&scripts.release, &[&keys.lease(&call)], vec![arg(&writer.node), arg(writer.epoch.0), retain]).await?.expect_ok()?;
                Ok(StoreOutcome::Done)
            }
            StoreOp::ReadLease { call } => {
                let reply = self.eval(&scripts.read_lease, &[&keys.lease(&call)], vec![]).await?;
                reply.expect_ok()?;
                Ok(StoreOutcome::CurrentLease(if reply.items.len() > 1 { Some(reply.lease(1)?) } else { None }))
            }
            StoreOp::CreateCall { call, op, writer, phase, detail } => {
                let args = vec![arg(&writer.node), arg(writer.epoch.0), op_arg(op.0), arg(phase.code()), detail.to_vec(), retain, arg(REMEMBERED_OPS)];
                let reply = self.eval(&scripts.create, &[&keys.lease(&call), &keys.call(&call)], args).await?;
                reply.committed()
            }
            StoreOp::Transition { call, op, writer, expected, phase, detail } => {
                let args = vec![
                    arg(&writer.node),
                    arg(writer.epoch.0),
                    op_arg(op.0),
                    arg(expected.0),
                    arg(phase.code()),
                    detail.to_vec(),
                    retain,
                    arg(REMEMBERED_OPS),
                ];
                let reply = self.eval(&scripts.transition, &[&keys.lease(&call), &keys.call(&call)], args).await?;
                reply.committed()
            }
            StoreOp::ReadCall { call } => {
                let key = keys.call(&call);
                let fields: Vec<Option<Vec<u8>>> = self
                    .bounded(&key, async {
                        let mut connection = self.inner.connection.clone();
                        redis::cmd("HMGET").arg(&key).arg(&["v", "p", "o", "e", "d"]).query_async(&mut connection).await
                    })
                    .await?;
                Ok(StoreOutcome::Call(call_record(&key, fields)?))
            }
            StoreOp::ClaimDevice { device, node, ttl } => {
                let key = keys.device(&device);
                let previous: Option<Vec<u8>> = self
                    .bounded(&key, async {
                        let mut connection = self.inner.connection.clone();
                        redis::cmd("SET").arg(&key).arg(node.as_str()).arg("PX").arg(ttl.as_millis() as u64).arg("GET").query_async(&mut connection).await
                    })
                    .await?;
                Ok(StoreOutcome::DeviceClaimed { previous: previous.map(|holder| node_id(&key, holder)).transpose()? })
            }
            StoreOp::RefreshDevice { device, node, ttl } => {
                let key = keys.device(&device);
                self.eval(&scripts.device_refresh, &[&key], vec![arg(&node), ms(ttl)]).await?.holder_checked()
            }
            StoreOp::ReleaseDevice { device, node } => {
                let key = keys.device(&device);
                self.eval(&scripts.device_release, &[&key], vec![arg(&node)]).await?.holder_checked()
            }
            StoreOp::ReadDevice { device } => {
                let key = keys.device(&device);
                let holder: Option<Vec<u8>> = self
                    .bounded(&key, async {
                        let mut connection = self.inner.connection.clone();
                        redis::cmd("GET").arg(&key).query_async(&mut connection).await
                    })
                    .await?;
                Ok(StoreOutcome::Device(holder.map(|holder| node_id(&key, holder)).transpose()?))
            }
            StoreOp::Publish { node, payload } => {
                let channel = keys.pushes(&node);
                let receivers: u64 = self
                    .bounded(&channel, async {
                        let mut connection = self.inner.connection.clone();
                        redis::cmd("PUBLISH").arg(&channel).arg(payload.as_ref()).query_async(&mut connection).await
                    })
                    .await?;
                Ok(StoreOutcome::Published { receivers })
            }
        }
    }
}

impl Store for RedisStore {
    async fn execute(&self, op: StoreOp) -> StoreResult {
        op.validate()?;
        self.run(op).await
    }

    /// Subscribes within the timeout; afterwards a relay task keeps the
    /// subscription up, re-subscribing every 250 ms while Redis is gone and
    /// reporting a [`Inbound::Gap`] each time it had to.
    async fn subscribe(&self, node: NodeId) -> Result<Subscription, StoreError> {
        let channel = self.inner.keys.pushes(&node);
        let pubsub = self.bounded(&channel, open_pubsub(&self.inner.client, &channel)).await?;
        let (inbound, receiver) = mpsc::channel(Subscription::BUFFER);
        let (client, timeout) = (self.inner.client.clone(), self.inner.config.timeout);
        tokio::spawn(relay(client, channel, pubsub, inbound, timeout));
        Ok(Subscription { inbound: receiver })
    }
}

async fn open_pubsub(client: &Client, channel: &str) -> Result<PubSub, RedisError> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub)
}

/// Moves pushes from Redis to the subscriber until it goes away.
async fn relay(client: Client, channel: String, mut pubsub: PubSub, inbound: mpsc::Sender<Inbound>, timeout: Duration) {
    let mut lost = false;
    loop {
        let mut messages = pubsub.into_on_message();
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(message) => deliver(&inbound, Inbound::Message(Bytes::copy_from_slice(message.get_payload_bytes())), &mut lost),
                    None => break,
                },
                () = inbound.closed() => return,
            }
        }
        tracing::warn!(channel, "push subscription lost; re-subscribing");
        pubsub = loop {
            if inbound.is_closed() {
                return;
            }
            if let Ok(Ok(pubsub)) = tokio::time::timeout(timeout, open_pubsub(&client, &channel)).await {
                break pubsub;
            }
            tokio::time::sleep(RESUBSCRIBE_EVERY).await;
        };
        deliver(&inbound, Inbound::Gap, &mut lost);
    }
}

/// Hands one item to a subscriber that may be behind: never waits; what
/// does not fit is dropped and reported as one Gap once there is room.
fn deliver(inbound: &mpsc::Sender<Inbound>, item: Inbound, lost: &mut bool) {
    if *lost {
        if inbound.try_send(Inbound::Gap).is_err() {
            return;
        }
        *lost = false;
        if item == Inbound::Gap {
            return;
        }
    }
    if inbound.try_send(item).is_err() {
        *lost = true;
    }
}

/// What a Redis error means to the caller: the data is bad, or Redis is not
/// answering usefully right now.
fn classify(key: &str, config: &RedisConfig, error: RedisError) -> StoreError {
    use redis::ErrorKind;
    let malformed = match error.kind() {
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => true,
        _ => error.code() == Some("WRONGTYPE") || error.to_string().contains("user_script"),
    };
    if malformed {
        return StoreError::Malformed { key: key.to_owned(), detail: error.to_string() };
    }
    StoreError::Unavailable(format!("redis at {}: {error}", config.redacted_url()))
}

fn arg(value: impl std::fmt::Display) -> Vec<u8> {
    value.to_string().into_bytes()
}

fn op_arg(op: u64) -> Vec<u8> {
    format!("{op:x}").into_bytes()
}

fn ms(duration: Duration) -> Vec<u8> {
    arg(duration.as_millis())
}

fn node_id(key: &str, raw: Vec<u8>) -> Result<NodeId, StoreError> {
    let text = String::from_utf8(raw).map_err(|_| malformed(key, "node id is not UTF-8"))?;
    NodeId::new(text).map_err(|e| malformed(key, &e.to_string()))
}

fn malformed(key: &str, detail: &str) -> StoreError {
    StoreError::Malformed { key: key.to_owned(), detail: detail.to_owned() }
}

/// A call record from `HMGET v p o e d`.
fn call_record(key: &str, fields: Vec<Option<Vec<u8>>>) -> Result<Option<CallRecord>, StoreError> {
    if fields.iter().all(Option::is_none) {
        return Ok(None);
    }
    let [Some(v), Some(p), Some(o), Some(e), Some(d)] = <[Option<Vec<u8>>; 5]>::try_from(fields).map_err(|_| malformed(key, "HMGET answered a wrong count"))? else {
        return Err(malformed(key, "call record misses fields"));
    };
    let number = |raw: &[u8], what: &str| -> Result<u64, StoreError> {
        std::str::from_utf8(raw).ok().and_then(|t| t.parse().ok()).ok_or_else(|| malformed(key, &format!("{what} is not a number")))
    };
    let phase = i64::try_from(number(&p, "phase")?).ok().and_then(Phase::from_code).ok_or_else(|| malformed(key, "unknown phase"))?;
    Ok(Some(CallRecord {
        version: Version(number(&v, "version")?),
        phase,
        written_by: Writer { node: node_id(key, o)?, epoch: OwnerEpoch(number(&e, "epoch")?) },
        detail: Bytes::from(d),
    }))
}

/// A script's answer: `{status, ...}`.
struct Reply {
    key: String,
    items: Vec<Value>,
}

impl Reply {
    fn parse(key: &str, value: Value) -> Result<Reply, StoreError> {
        let Value::Array(items) = value else { return Err(malformed(key, "script answered a non-array")) };
        let reply = Reply { key: key.to_owned(), items };
        if reply.status() == "MALFORMED" {
            return Err(malformed(key, &reply.text(1).unwrap_or_else(|_| "unreadable".into())));
        }
        Ok(reply)
    }

    fn status(&self) -> &str {
        match self.items.first() {
            Some(Value::BulkString(raw)) => std::str::from_utf8(raw).unwrap_or(""),
            Some(Value::SimpleString(text)) => text,
            _ => "",
        }
    }

    fn bad(&self, what: &str) -> StoreError {
        malformed(&self.key, &format!("script answer: {what}"))
    }

    fn int(&self, at: usize) -> Result<i64, StoreError> {
        match self.items.get(at) {
            Some(Value::Int(n)) => Ok(*n),
            _ => Err(self.bad(&format!("item {at} is not an integer"))),
        }
    }

    fn uint(&self, at: usize) -> Result<u64, StoreError> {
        u64::try_from(self.int(at)?).map_err(|_| self.bad("negative number"))
    }

    fn millis(&self, at: usize) -> Result<Duration, StoreError> {
        Ok(Duration::from_millis(self.int(at)?.max(0) as u64))
    }

    fn bytes(&self, at: usize) -> Result<Bytes, StoreError> {
        match self.items.get(at) {
            Some(Value::BulkString(raw)) => Ok(Bytes::copy_from_slice(raw)),
            _ => Err(self.bad(&format!("item {at} is not a string"))),
        }
    }

    fn text(&self, at: usize) -> Result<String, StoreError> {
        String::from_utf8(self.bytes(at)?.to_vec()).map_err(|_| self.bad("not UTF-8"))
    }

    fn node(&self, at: usize) -> Result<NodeId, StoreError> {
        node_id(&self.key, self.bytes(at)?.to_vec())
    }

    fn lease(&self, at: usize) -> Result<Lease, StoreError> {
        Ok(Lease { owner: self.node(at)?, epoch: OwnerEpoch(self.uint(at + 1)?), expires_in: self.millis(at + 2)? })
    }

    /// OK, or the refusal the status names.
    fn expect_ok(&self) -> Result<(), StoreError> {
        match self.status() {
            "OK" => Ok(()),
            "STALE" => Err(StoreError::StaleEpoch { current: if self.items.len() > 1 { Some(self.lease(1)?) } else { None } }),
            "EXPIRED" => Err(StoreError::LeaseExpired),
            "NOTFOUND" => Err(StoreError::NotFound),
            "TERMINAL" => Err(StoreError::Terminal { version: Version(self.uint(1)?) }),
            "EXISTS" => Err(StoreError::AlreadyExists { version: Version(self.uint(1)?) }),
            "CONFLICT" => Err(StoreError::VersionConflict { current: Version(self.uint(1)?) }),
            "NOTHOLDER" => Err(StoreError::NotHolder { holder: if self.items.len() > 1 { Some(self.node(1)?) } else { None } }),
            other => Err(self.bad(&format!("unknown status {other:?}"))),
        }
    }

    fn committed(&self) -> StoreResult {
        if self.status() == "REPLAY" {
            return Ok(StoreOutcome::Committed { version: Version(self.uint(1)?), replayed: true });
        }
        self.expect_ok()?;
        Ok(StoreOutcome::Committed { version: Version(self.uint(1)?), replayed: false })
    }

    fn holder_checked(&self) -> StoreResult {
        self.expect_ok()?;
        Ok(StoreOutcome::Done)
    }
}
