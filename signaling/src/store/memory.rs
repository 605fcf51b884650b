//! The single-node backend: the store's rules as a sans-IO state machine
//! ([`MemoryState`]) and the thin async wrapper the server runs ([`MemoryStore`]).
//!
//! The rules are the Redis scripts' rules (`lua/*.lua`), case for case; the
//! behaviour suite in `signaling/tests/store.rs` runs against both.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::broadcast;

use super::{
    CallKey, CallRecord, Inbound, Lease, LiveNode, NodeId, OpId, OwnerEpoch, Phase, Store, StoreError, StoreOp, StoreOutcome, StoreResult, Subscription,
    Version, Writer, REMEMBERED_OPS, RETAIN,
};
use crate::ids::DeviceId;

/// Ops between two sweeps of expired entries.
const SWEEP_EVERY: u64 = 256;

#[derive(Debug)]
struct LeaseEntry {
    owner: NodeId,
    epoch: OwnerEpoch,
    expires: Instant,
}

#[derive(Debug)]
struct CallEntry {
    record: CallRecord,
    /// The newest committed op ids and the version each produced.
    ops: VecDeque<(OpId, Version)>,
    /// Kept until then: refreshed by the owner, shorter once ended.
    retained_until: Instant,
}

/// Every record of one node's shared state, in memory. Time is an input, so
/// a test can drive it in virtual time.
#[derive(Debug)]
pub struct MemoryState {
    nodes: BTreeMap<NodeId, (Bytes, Instant)>,
    leases: HashMap<CallKey, LeaseEntry>,
    calls: HashMap<CallKey, CallEntry>,
    devices: HashMap<DeviceId, (NodeId, Instant)>,
    /// The last epoch handed out, for all calls: a lease record that is
    /// forgotten never lets an epoch be handed out twice.
    last_epoch: u64,
    applied: u64,
}

impl Default for MemoryState {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryState {
    pub fn new() -> Self {
        MemoryState { nodes: BTreeMap::new(), leases: HashMap::new(), calls: HashMap::new(), devices: HashMap::new(), last_epoch: 0, applied: 0 }
    }

    /// Applies one op at `now`. Publish is not state: [`MemoryStore`] carries it.
    pub fn apply(&mut self, now: Instant, op: StoreOp) -> StoreResult {
        op.validate()?;
        self.applied += 1;
        if self.applied.is_multiple_of(SWEEP_EVERY) {
            self.sweep(now);
        }
        match op {
            StoreOp::Heartbeat { node, info, ttl } => {
                let was_live = self.nodes.get(&node).is_some_and(|(_, until)| *until > now);
                self.nodes.insert(node, (info, now + ttl));
                Ok(StoreOutcome::Heartbeat { was_live })
            }
            StoreOp::Deregister { node } => {
                self.nodes.remove(&node);
                Ok(StoreOutcome::Done)
            }
            StoreOp::LiveNodes => Ok(StoreOutcome::Nodes(
                self.nodes
                    .iter()
                    .filter(|(_, (_, until))| *until > now)
                    .map(|(node, (info, until))| LiveNode { node: node.clone(), info: info.clone(), expires_in: *until - now })
                    .collect(),
            )),
            StoreOp::AcquireLease { call, node, ttl } => self.acquire(now, call, node, ttl),
            StoreOp::RenewLease { call, writer, ttl } => {
                let lease = self.leases.get_mut(&call).filter(|l| l.owner == writer.node && l.epoch == writer.epoch);
                let Some(lease) = lease else {
                    return Err(StoreError::StaleEpoch { current: self.live_lease(now, &call) });
                };
                lease.expires = now + ttl;
                let lease = Lease { owner: lease.owner.clone(), epoch: lease.epoch, expires_in: ttl };
                self.retain_call(now, &call, ttl);
                Ok(StoreOutcome::Lease(lease))
            }
            StoreOp::ReleaseLease { call, writer } => match self.leases.get_mut(&call) {
                Some(lease) if lease.owner == writer.node && lease.epoch == writer.epoch => {
                    lease.expires = now;
                    Ok(StoreOutcome::Done)
                }
                _ => Err(StoreError::StaleEpoch { current: self.live_lease(now, &call) }),
            },
            StoreOp::ReadLease { call } => Ok(StoreOutcome::CurrentLease(self.live_lease(now, &call))),
            StoreOp::CreateCall { call, op, writer, phase, detail } => {
                if let Some(entry) = self.live_call(now, &call) {
                    return match replayed(entry, op) {
                        Some(version) => Ok(StoreOutcome::Committed { version, replayed: true }),
                        None => Err(StoreError::AlreadyExists { version: entry.record.version }),
                    };
                }
                let lease_left = self.fence(now, &call, &writer)?;
                let record = CallRecord { version: Version(1), phase, written_by: writer, detail };
                let retained_until = now + retention(phase, lease_left);
                self.calls.insert(call, CallEntry { record, ops: VecDeque::from([(op, Version(1))]), retained_until });
                Ok(StoreOutcome::Committed { version: Version(1), replayed: false })
            }
            StoreOp::Transition { call, op, writer, expected, phase, detail } => {
                let Some(entry) = self.live_call(now, &call) else { return Err(StoreError::NotFound) };
                if let Some(version) = replayed(entry, op) {
                    return Ok(StoreOutcome::Committed { version, replayed: true });
                }
                if entry.record.phase == Phase::Ended {
                    return Err(StoreError::Terminal { version: entry.record.version });
                }
                let current = entry.record.version;
                let lease_left = self.fence(now, &call, &writer)?;
                if current != expected {
                    return Err(StoreError::VersionConflict { current });
                }
                let entry = self.calls.get_mut(&call).expect("checked above");
                let version = Version(current.0 + 1);
                entry.record = CallRecord { version, phase, written_by: writer, detail };
                entry.ops.push_back((op, version));
                if entry.ops.len() > REMEMBERED_OPS {
                    entry.ops.pop_front();
                }
                entry.retained_until = now + retention(phase, lease_left);
                Ok(StoreOutcome::Committed { version, replayed: false })
            }
            StoreOp::ReadCall { call } => Ok(StoreOutcome::Call(self.live_call(now, &call).map(|entry| entry.record.clone()))),
            StoreOp::ClaimDevice { device, node, ttl } => {
                let previous = self.devices.insert(device, (node, now + ttl)).filter(|(_, until)| *until > now).map(|(node, _)| node);
                Ok(StoreOutcome::DeviceClaimed { previous })
            }
            StoreOp::RefreshDevice { device, node, ttl } => {
                let held = self.device_holder(now, &device);
                if held.as_ref() != Some(&node) {
                    return Err(StoreError::NotHolder { holder: held });
                }
                self.devices.insert(device, (node, now + ttl));
                Ok(StoreOutcome::Done)
            }
            StoreOp::ReleaseDevice { device, node } => {
                let held = self.device_holder(now, &device);
                if held.as_ref() != Some(&node) {
                    return Err(StoreError::NotHolder { holder: held });
                }
                self.devices.remove(&device);
                Ok(StoreOutcome::Done)
            }
            StoreOp::ReadDevice { device } => Ok(StoreOutcome::Device(self.device_holder(now, &device))),
            StoreOp::Publish { .. } => Err(StoreError::Invalid("publish is carried by MemoryStore, not the state".into())),
        }
    }

    fn acquire(&mut self, now: Instant, call: CallKey, node: NodeId, ttl: Duration) -> StoreResult {
        let epoch = match self.leases.get(&call) {
            Some(lease) if lease.expires > now && lease.owner != node => {
                return Err(StoreError::LeaseHeld { holder: Lease { owner: lease.owner.clone(), epoch: lease.epoch, expires_in: lease.expires - now } });
            }
            // The live holder asking again (a retry): the same lease, renewed.
            Some(lease) if lease.expires > now => lease.epoch,
            _ => {
                self.last_epoch += 1;
                OwnerEpoch(self.last_epoch)
            }
        };
        self.leases.insert(call.clone(), LeaseEntry { owner: node.clone(), epoch, expires: now + ttl });
        self.retain_call(now, &call, ttl);
        Ok(StoreOutcome::Lease(Lease { owner: node, epoch, expires_in: ttl }))
    }

    /// The writer's live lease's time left, or why it may not write.
    fn fence(&self, now: Instant, call: &CallKey, writer: &Writer) -> Result<Duration, StoreError> {
        match self.leases.get(call) {
            Some(lease) if lease.owner == writer.node && lease.epoch == writer.epoch => {
                if lease.expires <= now {
                    return Err(StoreError::LeaseExpired);
                }
                Ok(lease.expires - now)
            }
            _ => Err(StoreError::StaleEpoch { current: self.live_lease(now, call) }),
        }
    }

    fn live_lease(&self, now: Instant, call: &CallKey) -> Option<Lease> {
        let lease = self.leases.get(call).filter(|lease| lease.expires > now)?;
        Some(Lease { owner: lease.owner.clone(), epoch: lease.epoch, expires_in: lease.expires - now })
    }

    fn live_call(&self, now: Instant, call: &CallKey) -> Option<&CallEntry> {
        self.calls.get(call).filter(|entry| entry.retained_until > now)
    }

    /// A renewed lease keeps its (unended) call record.
    fn retain_call(&mut self, now: Instant, call: &CallKey, ttl: Duration) {
        if let Some(entry) = self.calls.get_mut(call).filter(|entry| entry.record.phase != Phase::Ended && entry.retained_until > now) {
            entry.retained_until = now + ttl + RETAIN;
        }
    }

    fn device_holder(&self, now: Instant, device: &DeviceId) -> Option<NodeId> {
        self.devices.get(device).filter(|(_, until)| *until > now).map(|(node, _)| node.clone())
    }

    /// Forgets what has expired, as Redis's TTLs would.
    fn sweep(&mut self, now: Instant) {
        self.nodes.retain(|_, (_, until)| *until > now);
        self.leases.retain(|_, lease| lease.expires + RETAIN > now);
        self.calls.retain(|_, entry| entry.retained_until > now);
        self.devices.retain(|_, (_, until)| *until > now);
    }
}

fn replayed(entry: &CallEntry, op: OpId) -> Option<Version> {
    entry.ops.iter().find(|(id, _)| *id == op).map(|(_, version)| *version)
}

/// How long a record written now is kept: an ended call for [`RETAIN`], a
/// running one for as long as its lease plus [`RETAIN`].
fn retention(phase: Phase, lease_left: Duration) -> Duration {
    match phase {
        Phase::Ended => RETAIN,
        _ => lease_left + RETAIN,
    }
}

/// [`MemoryState`] behind a lock, on the wall clock, with in-process push channels.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<MemoryState>>,
    channels: Arc<Mutex<HashMap<NodeId, broadcast::Sender<Bytes>>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    async fn execute(&self, op: StoreOp) -> StoreResult {
        if let StoreOp::Publish { node, payload } = op {
            StoreOp::Publish { node: node.clone(), payload: payload.clone() }.validate()?;
            let channels = self.channels.lock().expect("store channels");
            let receivers = channels.get(&node).map_or(0, |sender| sender.send(payload).unwrap_or(0));
            return Ok(StoreOutcome::Published { receivers: receivers as u64 });
        }
        self.state.lock().expect("store state").apply(Instant::now(), op)
    }

    async fn subscribe(&self, node: NodeId) -> Result<Subscription, StoreError> {
        let mut channels = self.channels.lock().expect("store channels");
        channels.retain(|_, sender| sender.receiver_count() > 0);
        let sender = channels.entry(node).or_insert_with(|| broadcast::channel(Subscription::BUFFER).0);
        Ok(Subscription::from_broadcast(sender.subscribe()))
    }
}

impl Subscription {
    fn from_broadcast(mut pushes: broadcast::Receiver<Bytes>) -> Subscription {
        // A small relay task turns a lagging receiver into one Gap.
        let (inbound, receiver) = tokio::sync::mpsc::channel(Subscription::BUFFER);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = pushes.recv() => next,
                    () = inbound.closed() => return,
                };
                let item = match next {
                    Ok(payload) => Inbound::Message(payload),
                    Err(broadcast::error::RecvError::Lagged(_)) => Inbound::Gap,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if inbound.send(item).await.is_err() {
                    return;
                }
            }
        });
        Subscription { inbound: receiver }
    }
}
