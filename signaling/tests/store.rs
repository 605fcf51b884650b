//! The state store (issue 13, first slice): the same behaviour suite on the
//! memory and the Redis backend, the memory rules in virtual time, and the
//! Redis-only properties against a real `redis-server` each test starts on
//! its own port (no persistence, killed on drop): three racing nodes, fenced
//! old owners, a stopped and a killed Redis, garbage in keys, and figures.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleetcall_signaling::ids::DeviceId;
use fleetcall_signaling::store::{
    CallKey, ErrorCode, Inbound, Lease, MemoryState, MemoryStore, NodeId, OpId, OwnerEpoch, Phase, RedisConfig, RedisStore, Store, StoreError,
    StoreOp, StoreOutcome, StoreResult, Version, Writer, RETAIN,
};

// ---- a real redis-server of the test's own ---------------------------------

/// `redis-server` on a free loopback port with a temp dir, no RDB, no AOF.
struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("fleetcall-store-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = RedisServer { port, dir, child: None };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: install it with `scripts/deps test`");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen on {} within 10 s", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Through the shell's builtin `kill`: a minimal system may lack the
    /// binary, and std has no safe API for signals.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        assert!(Command::new("sh").arg("-c").arg(format!("kill {signal} {pid}")).status().unwrap().success(), "kill {signal} {pid}");
    }

    /// SIGKILL, reaped: the port is free again.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A raw connection for poking at keys behind the store's back.
    async fn raw(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too.
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn redis_store(server: &RedisServer) -> RedisStore {
    RedisStore::connect(RedisConfig::new(server.url(), Duration::from_secs(1)).unwrap()).await.unwrap()
}

// ---- helpers ---------------------------------------------------------------

fn node(id: &str) -> NodeId {
    NodeId::new(id).unwrap()
}

fn call(key: &str) -> CallKey {
    CallKey::new(key).unwrap()
}

fn device(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

fn writer(node_id: &str, lease: &Lease) -> Writer {
    Writer { node: node(node_id), epoch: lease.epoch }
}

fn lease_of(result: StoreResult) -> Lease {
    match result {
        Ok(StoreOutcome::Lease(lease)) => lease,
        other => panic!("expected a lease, got {other:?}"),
    }
}

fn version_of(result: StoreResult) -> (Version, bool) {
    match result {
        Ok(StoreOutcome::Committed { version, replayed }) => (version, replayed),
        other => panic!("expected a commit, got {other:?}"),
    }
}

fn code(result: StoreResult) -> ErrorCode {
    match result {
        Err(error) => error.code(),
        Ok(outcome) => panic!("expected a refusal, got {outcome:?}"),
    }
}

fn create(call_key: &CallKey, op: u64, by: Writer) -> StoreOp {
    StoreOp::CreateCall { call: call_key.clone(), op: OpId(op), writer: by, phase: Phase::Setup, detail: Bytes::from_static(b"members=a,b") }
}

fn transition(call_key: &CallKey, op: u64, by: Writer, expected: u64, phase: Phase) -> StoreOp {
    StoreOp::Transition { call: call_key.clone(), op: OpId(op), writer: by, expected: Version(expected), phase, detail: Bytes::from(format!("v{expected}")) }
}

const LEASE: Duration = Duration::from_secs(30);
/// Short enough to wait out in a test, long enough for a busy machine.
const SHORT: Duration = Duration::from_millis(300);

// ---- one behaviour suite, two backends ----------------------------------------

/// The store's rules, through `execute` only. `a` and `b` are two nodes' handles
/// (for Redis: two connections).
async fn behaviour<S: Store>(a: &S, b: &S) {
    // Versions: create at 1, each transition +1, a wrong expectation is a conflict.
    let room = call("ward-3");
    let lease = lease_of(a.execute(StoreOp::AcquireLease { call: room.clone(), node: node("a"), ttl: LEASE }).await);
    let by_a = writer("a", &lease);
    assert_eq!(version_of(a.execute(create(&room, 1, by_a.clone())).await), (Version(1), false));
    assert_eq!(code(b.execute(create(&room, 2, by_a.clone())).await), ErrorCode::AlreadyExists, "a second create is refused");
    assert_eq!(version_of(a.execute(transition(&room, 3, by_a.clone(), 1, Phase::Live)).await), (Version(2), false));
    match a.execute(transition(&room, 4, by_a.clone(), 1, Phase::Live)).await {
        Err(StoreError::VersionConflict { current }) => assert_eq!(current, Version(2)),
        other => panic!("expected a version conflict, got {other:?}"),
    }
    // Op-id replay: the first answer again, no second transition.
    assert_eq!(version_of(a.execute(transition(&room, 3, by_a.clone(), 1, Phase::Live)).await), (Version(2), true));
    assert_eq!(version_of(b.execute(create(&room, 1, by_a.clone())).await), (Version(1), true), "a replayed create answers its version");
    let Ok(StoreOutcome::Call(Some(record))) = b.execute(StoreOp::ReadCall { call: room.clone() }).await else { panic!("the record reads back") };
    assert_eq!((record.version, record.phase, &record.written_by, &record.detail[..]), (Version(2), Phase::Live, &by_a, &b"v1"[..]));

    // Fencing: a node without the lease cannot write, whatever epoch it claims.
    let forged = Writer { node: node("b"), epoch: lease.epoch };
    match b.execute(transition(&room, 5, forged, 2, Phase::Live)).await {
        Err(StoreError::StaleEpoch { current: Some(current) }) => assert_eq!((current.owner, current.epoch), (node("a"), lease.epoch)),
        other => panic!("expected a stale epoch, got {other:?}"),
    }
    assert_eq!(code(b.execute(StoreOp::AcquireLease { call: room.clone(), node: node("b"), ttl: LEASE }).await), ErrorCode::LeaseHeld);
    let again = lease_of(a.execute(StoreOp::AcquireLease { call: room.clone(), node: node("a"), ttl: LEASE }).await);
    assert_eq!(again.epoch, lease.epoch, "the holder re-acquiring keeps its epoch");

    // Terminal states absorb: ended never goes live again, not even for the owner.
    assert_eq!(version_of(a.execute(transition(&room, 6, by_a.clone(), 2, Phase::Ended)).await), (Version(3), false));
    assert_eq!(code(a.execute(transition(&room, 7, by_a.clone(), 3, Phase::Live)).await), ErrorCode::Terminal);
    assert_eq!(code(a.execute(transition(&room, 8, by_a.clone(), 3, Phase::Ended)).await), ErrorCode::Terminal);
    assert_eq!(version_of(a.execute(transition(&room, 6, by_a.clone(), 2, Phase::Ended)).await), (Version(3), true), "its own replay still answers");

    // Lease expiry and takeover: the epoch grows, the old owner is fenced off.
    let door = call("door-1");
    let old = lease_of(a.execute(StoreOp::AcquireLease { call: door.clone(), node: node("a"), ttl: SHORT }).await);
    let by_old = writer("a", &old);
    version_of(a.execute(create(&door, 10, by_old.clone())).await);
    let quiet = call("quiet");
    let mine = lease_of(b.execute(StoreOp::AcquireLease { call: quiet.clone(), node: node("b"), ttl: SHORT }).await);
    version_of(b.execute(create(&quiet, 20, writer("b", &mine))).await);
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    // Expired but not taken over: the holder renews (same epoch) and writes again.
    assert_eq!(code(b.execute(transition(&quiet, 21, writer("b", &mine), 1, Phase::Live)).await), ErrorCode::LeaseExpired);
    assert_eq!(lease_of(b.execute(StoreOp::RenewLease { call: quiet.clone(), writer: writer("b", &mine), ttl: LEASE }).await).epoch, mine.epoch);
    assert_eq!(version_of(b.execute(transition(&quiet, 21, writer("b", &mine), 1, Phase::Live)).await), (Version(2), false));
    assert_eq!(code(a.execute(transition(&door, 11, by_old.clone(), 1, Phase::Live)).await), ErrorCode::LeaseExpired, "an expired lease writes nothing");
    let Ok(StoreOutcome::CurrentLease(None)) = b.execute(StoreOp::ReadLease { call: door.clone() }).await else { panic!("no live lease") };
    let new = lease_of(b.execute(StoreOp::AcquireLease { call: door.clone(), node: node("b"), ttl: LEASE }).await);
    assert!(new.epoch > old.epoch, "takeover epoch {:?} must exceed {:?}", new.epoch, old.epoch);
    // After the takeover, every write of the old owner is refused: 100 of them, of every kind.
    let mut refused = 0;
    for i in 0..100u64 {
        let attempt = match i % 5 {
            0 => transition(&door, 100 + i, by_old.clone(), 1, Phase::Live),
            1 => transition(&door, 100 + i, by_old.clone(), 1, Phase::Ended),
            2 => StoreOp::RenewLease { call: door.clone(), writer: by_old.clone(), ttl: LEASE },
            3 => StoreOp::ReleaseLease { call: door.clone(), writer: by_old.clone() },
            _ => create(&door, 100 + i, by_old.clone()),
        };
        match a.execute(attempt).await {
            Err(StoreError::StaleEpoch { .. } | StoreError::AlreadyExists { .. }) => refused += 1,
            other => panic!("write {i} of the fenced-off owner: {other:?}"),
        }
    }
    assert_eq!(refused, 100);
    let by_new = writer("b", &new);
    assert_eq!(version_of(b.execute(transition(&door, 200, by_new.clone(), 1, Phase::Live)).await), (Version(2), false), "the new owner writes");
    // Renew keeps the epoch; release lets the next owner in with a larger one.
    let renewed = lease_of(b.execute(StoreOp::RenewLease { call: door.clone(), writer: by_new.clone(), ttl: LEASE }).await);
    assert_eq!(renewed.epoch, new.epoch);
    assert_eq!(b.execute(StoreOp::ReleaseLease { call: door.clone(), writer: by_new.clone() }).await, Ok(StoreOutcome::Done));
    let third = lease_of(a.execute(StoreOp::AcquireLease { call: door.clone(), node: node("a"), ttl: LEASE }).await);
    assert!(third.epoch > new.epoch);
    assert_eq!(code(b.execute(transition(&door, 201, by_new, 2, Phase::Live)).await), ErrorCode::StaleEpoch);
    assert_eq!(code(a.execute(transition(&room, 9, by_a, 1, Phase::Live)).await), ErrorCode::Terminal);
    assert_eq!(code(a.execute(transition(&call("nowhere"), 1, writer("a", &third), 1, Phase::Live)).await), ErrorCode::NotFound);

    // Node liveness: present while heartbeating, gone one TTL after the last beat.
    let beat = |n: &str, ttl| StoreOp::Heartbeat { node: node(n), info: Bytes::from(format!("{n}.media:50000")), ttl };
    assert_eq!(a.execute(beat("a", SHORT)).await, Ok(StoreOutcome::Heartbeat { was_live: false }));
    assert_eq!(a.execute(beat("a", SHORT)).await, Ok(StoreOutcome::Heartbeat { was_live: true }));
    assert_eq!(b.execute(beat("b", LEASE)).await, Ok(StoreOutcome::Heartbeat { was_live: false }));
    let Ok(StoreOutcome::Nodes(live)) = b.execute(StoreOp::LiveNodes).await else { panic!("live nodes") };
    assert_eq!(live.iter().map(|n| n.node.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(&live[0].info[..], b"a.media:50000");
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    let Ok(StoreOutcome::Nodes(live)) = b.execute(StoreOp::LiveNodes).await else { panic!("live nodes") };
    assert_eq!(live.iter().map(|n| n.node.as_str()).collect::<Vec<_>>(), ["b"], "a stopped beating");
    assert_eq!(a.execute(beat("a", SHORT)).await, Ok(StoreOutcome::Heartbeat { was_live: false }), "a learns it was seen as dead");
    b.execute(StoreOp::Deregister { node: node("b") }).await.unwrap();
    let Ok(StoreOutcome::Nodes(live)) = b.execute(StoreOp::LiveNodes).await else { panic!("live nodes") };
    assert!(live.iter().all(|n| n.node != node("b")));

    // Device locations: the last claim wins; only the holder refreshes or releases.
    let pad = device("bed-12");
    assert_eq!(a.execute(StoreOp::ClaimDevice { device: pad.clone(), node: node("a"), ttl: LEASE }).await, Ok(StoreOutcome::DeviceClaimed { previous: None }));
    assert_eq!(b.execute(StoreOp::ClaimDevice { device: pad.clone(), node: node("b"), ttl: LEASE }).await, Ok(StoreOutcome::DeviceClaimed { previous: Some(node("a")) }));
    assert_eq!(a.execute(StoreOp::RefreshDevice { device: pad.clone(), node: node("a"), ttl: LEASE }).await, Err(StoreError::NotHolder { holder: Some(node("b")) }));
    assert_eq!(a.execute(StoreOp::ReleaseDevice { device: pad.clone(), node: node("a") }).await, Err(StoreError::NotHolder { holder: Some(node("b")) }));
    assert_eq!(a.execute(StoreOp::ReadDevice { device: pad.clone() }).await, Ok(StoreOutcome::Device(Some(node("b")))));
    assert_eq!(b.execute(StoreOp::RefreshDevice { device: pad.clone(), node: node("b"), ttl: SHORT }).await, Ok(StoreOutcome::Done));
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert_eq!(a.execute(StoreOp::ReadDevice { device: pad.clone() }).await, Ok(StoreOutcome::Device(None)), "the location expires");
    assert_eq!(b.execute(StoreOp::ReleaseDevice { device: pad.clone(), node: node("b") }).await, Err(StoreError::NotHolder { holder: None }));

    // Pushes: to the node's own channel, counted; nobody listening is 0.
    let mut inbox = a.subscribe(node("a")).await.unwrap();
    assert_eq!(b.execute(StoreOp::Publish { node: node("a"), payload: Bytes::from_static(b"ring bed-12") }).await, Ok(StoreOutcome::Published { receivers: 1 }));
    assert_eq!(b.execute(StoreOp::Publish { node: node("c"), payload: Bytes::from_static(b"lost") }).await, Ok(StoreOutcome::Published { receivers: 0 }));
    let got = tokio::time::timeout(Duration::from_secs(5), inbox.recv()).await.expect("push arrives");
    assert_eq!(got, Some(Inbound::Message(Bytes::from_static(b"ring bed-12"))));

    // Bad input is refused before it reaches a backend.
    assert_eq!(code(a.execute(StoreOp::AcquireLease { call: room.clone(), node: node("a"), ttl: Duration::ZERO }).await), ErrorCode::Invalid);
    let huge = Bytes::from(vec![0u8; 70_000]);
    assert_eq!(code(a.execute(StoreOp::Publish { node: node("a"), payload: huge }).await), ErrorCode::Invalid);
}

#[tokio::test]
async fn behaviour_on_the_memory_backend() {
    let store = MemoryStore::new();
    behaviour(&store, &store.clone()).await;
}

#[tokio::test]
async fn behaviour_on_the_redis_backend() {
    let server = RedisServer::start();
    behaviour(&redis_store(&server).await, &redis_store(&server).await).await;
}

// ---- the memory rules in virtual time -----------------------------------------

#[test]
fn memory_state_runs_in_virtual_time() {
    let mut state = MemoryState::new();
    let t0 = Instant::now();
    let room = call("ward-3");
    let lease = lease_of(state.apply(t0, StoreOp::AcquireLease { call: room.clone(), node: node("a"), ttl: Duration::from_secs(5) }));
    assert_eq!(lease.epoch, OwnerEpoch(1));
    version_of(state.apply(t0, create(&room, 1, writer("a", &lease))));
    // 4.999 s later the lease holds; at 5 s it does not.
    let held = state.apply(t0 + Duration::from_millis(4_999), StoreOp::AcquireLease { call: room.clone(), node: node("b"), ttl: Duration::from_secs(5) });
    match held {
        Err(StoreError::LeaseHeld { holder }) => assert_eq!(holder.expires_in, Duration::from_millis(1)),
        other => panic!("{other:?}"),
    }
    let t1 = t0 + Duration::from_secs(5);
    assert_eq!(code(state.apply(t1, transition(&room, 2, writer("a", &lease), 1, Phase::Live))), ErrorCode::LeaseExpired);
    let taken = lease_of(state.apply(t1, StoreOp::AcquireLease { call: room.clone(), node: node("b"), ttl: Duration::from_secs(5) }));
    assert_eq!(taken.epoch, OwnerEpoch(2));
    assert_eq!(code(state.apply(t1, transition(&room, 2, writer("a", &lease), 1, Phase::Live))), ErrorCode::StaleEpoch);
    version_of(state.apply(t1, transition(&room, 3, writer("b", &taken), 1, Phase::Ended)));
    // A lease that ran out is renewed by its holder as long as nobody took
    // over (the epoch proves nobody else wrote), and then writes again.
    let quiet = call("quiet");
    let mine = lease_of(state.apply(t0, StoreOp::AcquireLease { call: quiet.clone(), node: node("a"), ttl: Duration::from_secs(5) }));
    version_of(state.apply(t0, create(&quiet, 1, writer("a", &mine))));
    let late = t0 + Duration::from_secs(60);
    assert_eq!(code(state.apply(late, transition(&quiet, 2, writer("a", &mine), 1, Phase::Live))), ErrorCode::LeaseExpired);
    assert_eq!(lease_of(state.apply(late, StoreOp::RenewLease { call: quiet.clone(), writer: writer("a", &mine), ttl: Duration::from_secs(5) })).epoch, mine.epoch);
    assert_eq!(version_of(state.apply(late, transition(&quiet, 2, writer("a", &mine), 1, Phase::Live))), (Version(2), false));
    // An ended record is kept RETAIN for late readers and replays, then forgotten.
    let read = |state: &mut MemoryState, at| state.apply(at, StoreOp::ReadCall { call: room.clone() });
    assert!(matches!(read(&mut state, t1 + RETAIN - Duration::from_millis(1)), Ok(StoreOutcome::Call(Some(_)))));
    assert_eq!(read(&mut state, t1 + RETAIN), Ok(StoreOutcome::Call(None)));
    // Only the newest ops are remembered for replays.
    let other = call("door-1");
    let owner = lease_of(state.apply(t1, StoreOp::AcquireLease { call: other.clone(), node: node("a"), ttl: Duration::from_secs(60) }));
    version_of(state.apply(t1, create(&other, 1000, writer("a", &owner))));
    for v in 1..=10 {
        version_of(state.apply(t1, transition(&other, 1000 + v, writer("a", &owner), v, Phase::Live)));
    }
    assert_eq!(version_of(state.apply(t1, transition(&other, 1010, writer("a", &owner), 9, Phase::Live))), (Version(11), true));
    assert_eq!(code(state.apply(t1, transition(&other, 1001, writer("a", &owner), 1, Phase::Live))), ErrorCode::VersionConflict, "op 1001 is forgotten");
}

// ---- Redis only ---------------------------------------------------------------

/// Three nodes (three connections) race to own and create the same call,
/// 1,000 times: exactly one wins every time, and the others see the winner.
#[tokio::test]
async fn three_nodes_racing_for_a_call_leave_exactly_one_owner() {
    let server = RedisServer::start();
    let nodes = [redis_store(&server).await, redis_store(&server).await, redis_store(&server).await];
    let names = ["n1", "n2", "n3"];
    for round in 0..1_000u64 {
        let key = call(&format!("room-{round}"));
        let claim = |i: usize| {
            let (store, key) = (&nodes[i], key.clone());
            async move {
                let acquired = store.execute(StoreOp::AcquireLease { call: key.clone(), node: node(names[i]), ttl: LEASE }).await;
                match acquired {
                    Ok(StoreOutcome::Lease(lease)) => {
                        let created = store.execute(create(&key, round * 3 + i as u64, writer(names[i], &lease))).await;
                        Ok((lease, created))
                    }
                    other => Err(other),
                }
            }
        };
        let results = tokio::join!(claim(0), claim(1), claim(2));
        let results = [results.0, results.1, results.2];
        let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let (lease, created) = winners[0];
        assert!(matches!(created, Ok(StoreOutcome::Committed { version: Version(1), replayed: false })), "round {round}: {created:?}");
        for loser in results.iter().filter_map(|r| r.as_ref().err()) {
            match loser {
                Err(StoreError::LeaseHeld { holder }) => assert_eq!((&holder.owner, holder.epoch), (&lease.owner, lease.epoch)),
                other => panic!("round {round}: a loser got {other:?}"),
            }
        }
    }
}

/// A stopped Redis (SIGSTOP: connections open, no answers) and a killed one
/// both answer Unavailable within the 1 s bound; a Redis restarted empty is
/// used again within 10 s, subscriptions included (after a Gap).
#[tokio::test]
async fn a_stopped_or_killed_redis_fails_fast_and_is_used_again_when_back() {
    let mut server = RedisServer::start();
    let store = redis_store(&server).await;
    let mut inbox = store.subscribe(node("a")).await.unwrap();
    let room = call("ward-3");
    let lease = lease_of(store.execute(StoreOp::AcquireLease { call: room.clone(), node: node("a"), ttl: LEASE }).await);
    version_of(store.execute(create(&room, 1, writer("a", &lease))).await);
    let ops = || {
        vec![
            transition(&room, 2, writer("a", &lease), 1, Phase::Live),
            StoreOp::ReadCall { call: room.clone() },
            StoreOp::Heartbeat { node: node("a"), info: Bytes::new(), ttl: LEASE },
            StoreOp::ReadDevice { device: device("bed-1") },
            StoreOp::Publish { node: node("b"), payload: Bytes::from_static(b"x") },
        ]
    };
    // Bound 1 s; asserted with margin for a busy machine, under the 2 s promise.
    let bound = Duration::from_millis(1_900);
    let assert_unavailable = |label: &str, started: Instant, result: StoreResult| {
        let took = started.elapsed();
        assert_eq!(code(result), ErrorCode::Unavailable, "{label}");
        assert!(took < bound, "{label}: Unavailable after {took:?}");
        took
    };

    server.signal("-STOP");
    let mut slowest = Duration::ZERO;
    for op in ops() {
        let started = Instant::now();
        let label = format!("stopped: {op:?}");
        slowest = slowest.max(assert_unavailable(&label, started, store.execute(op).await));
    }
    println!("redis stopped (SIGSTOP): slowest Unavailable after {slowest:?}");
    let started = Instant::now();
    assert_unavailable("subscribe while stopped", started, store.subscribe(node("b")).await.map(|_| StoreOutcome::Done));
    server.signal("-CONT");
    let back = wait_until_usable(&store).await;
    assert!(back < Duration::from_secs(10), "usable again {back:?} after SIGCONT");
    println!("redis continued (SIGCONT): usable again after {back:?}");

    server.kill();
    let mut slowest = Duration::ZERO;
    for op in ops() {
        let started = Instant::now();
        let label = format!("killed: {op:?}");
        slowest = slowest.max(assert_unavailable(&label, started, store.execute(op).await));
    }
    println!("redis killed: slowest Unavailable after {slowest:?}");
    server.spawn();
    let back = wait_until_usable(&store).await;
    assert!(back < Duration::from_secs(10), "usable again {back:?} after the restart");
    println!("redis restarted empty: usable again after {back:?}");
    // Restarted empty: the call is gone, and a new owner gets an epoch above the old one.
    assert_eq!(store.execute(StoreOp::ReadCall { call: room.clone() }).await, Ok(StoreOutcome::Call(None)));
    let after = lease_of(store.execute(StoreOp::AcquireLease { call: room.clone(), node: node("b"), ttl: LEASE }).await);
    assert!(after.epoch > lease.epoch, "epochs keep growing across an emptied Redis");
    assert_eq!(code(store.execute(create(&room, 9, writer("a", &lease))).await), ErrorCode::StaleEpoch);

    // The subscription comes back by itself and says it may have missed pushes.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut saw_gap = false;
    loop {
        assert!(Instant::now() < deadline, "the subscription did not come back within 10 s");
        let published = store.execute(StoreOp::Publish { node: node("a"), payload: Bytes::from_static(b"after") }).await;
        if let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(300), inbox.recv()).await {
            match item {
                Inbound::Gap => saw_gap = true,
                Inbound::Message(payload) => {
                    assert_eq!(&payload[..], b"after");
                    assert_eq!(published, Ok(StoreOutcome::Published { receivers: 1 }));
                    break;
                }
            }
        }
    }
    assert!(saw_gap, "a re-established subscription reports a Gap");
}

/// Polls a cheap op until it succeeds; how long that took.
async fn wait_until_usable(store: &RedisStore) -> Duration {
    let started = Instant::now();
    while store.execute(StoreOp::ReadLease { call: call("probe") }).await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(15), "redis not usable again after 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

/// Garbage in any key the store reads is a Malformed error naming the key.
#[tokio::test]
async fn garbage_in_redis_is_a_clear_error() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let mut raw = server.raw().await;
    let set = |key: &str, value: &str| redis::cmd("SET").arg(key).arg(value).to_owned();
    let hset = |key: &str, fields: &[(&str, &str)]| {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(key);
        for (field, value) in fields {
            cmd.arg(*field).arg(*value);
        }
        cmd
    };
    for cmd in [
        set("fc:c:string-call", "garbage"),
        set("fc:l:string-lease", "garbage"),
        hset("fc:c:bad-version", &[("v", "seven"), ("p", "1"), ("o", "a"), ("e", "1"), ("d", "")]),
        hset("fc:c:bad-phase", &[("v", "1"), ("p", "9"), ("o", "a"), ("e", "1"), ("d", "")]),
        hset("fc:c:half", &[("v", "1")]),
        hset("fc:l:bad-lease", &[("o", "a"), ("e", "x"), ("x", "1")]),
        hset("fc:l:other-hash", &[("z", "1")]),
        hset("fc:d:hash-device", &[("z", "1")]),
        set("fc:d:control-device", "\u{1}node"),
        set("fc:n", "garbage"),
    ] {
        cmd.exec_async(&mut raw).await.unwrap();
    }
    let w = Writer { node: node("a"), epoch: OwnerEpoch(1) };
    let cases = [
        ("fc:c:string-call", StoreOp::ReadCall { call: call("string-call") }),
        ("fc:c:string-call", transition(&call("string-call"), 1, w.clone(), 1, Phase::Live)),
        ("fc:c:string-call", StoreOp::AcquireLease { call: call("string-call"), node: node("a"), ttl: LEASE }),
        ("fc:l:string-lease", StoreOp::AcquireLease { call: call("string-lease"), node: node("a"), ttl: LEASE }),
        ("fc:l:string-lease", StoreOp::ReadLease { call: call("string-lease") }),
        ("fc:c:bad-version", StoreOp::ReadCall { call: call("bad-version") }),
        ("fc:c:bad-version", transition(&call("bad-version"), 1, w.clone(), 1, Phase::Live)),
        ("fc:c:bad-phase", StoreOp::ReadCall { call: call("bad-phase") }),
        ("fc:c:half", StoreOp::ReadCall { call: call("half") }),
        ("fc:l:bad-lease", StoreOp::RenewLease { call: call("bad-lease"), writer: w.clone(), ttl: LEASE }),
        ("fc:l:other-hash", StoreOp::AcquireLease { call: call("other-hash"), node: node("a"), ttl: LEASE }),
        ("fc:d:hash-device", StoreOp::ReadDevice { device: device("hash-device") }),
        ("fc:d:hash-device", StoreOp::ClaimDevice { device: device("hash-device"), node: node("a"), ttl: LEASE }),
        ("fc:d:hash-device", StoreOp::RefreshDevice { device: device("hash-device"), node: node("a"), ttl: LEASE }),
        ("fc:d:control-device", StoreOp::ReadDevice { device: device("control-device") }),
        ("fc:n", StoreOp::LiveNodes),
        ("fc:n", StoreOp::Heartbeat { node: node("a"), info: Bytes::new(), ttl: LEASE }),
    ];
    for (key, op) in cases {
        let label = format!("{op:?}");
        match store.execute(op).await {
            Err(StoreError::Malformed { key: named, detail }) => {
                assert!(named == key || detail.contains(key), "{label}: names {named:?} / {detail:?}, expected {key}");
                assert!(!detail.is_empty());
            }
            other => panic!("{label}: expected Malformed, got {other:?}"),
        }
    }
    // The store is still fine for everything else.
    let lease = lease_of(store.execute(StoreOp::AcquireLease { call: call("clean"), node: node("a"), ttl: LEASE }).await);
    version_of(store.execute(create(&call("clean"), 1, writer("a", &lease))).await);
}

/// Figures for STATE.md: transitions per second through Redis (one call at a
/// time, and 16 calls at once over one connection), p99 latency, and the
/// bytes Redis keeps per device, per call and per node.
#[tokio::test]
async fn figures_transitions_and_bytes() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let per_call = 500u64;

    let run_call = |index: u64| {
        let store = store.clone();
        async move {
            let key = call(&format!("bench-{index}"));
            let lease = lease_of(store.execute(StoreOp::AcquireLease { call: key.clone(), node: node("a"), ttl: LEASE }).await);
            let by = writer("a", &lease);
            version_of(store.execute(create(&key, 0, by.clone())).await);
            let mut latencies = Vec::with_capacity(per_call as usize);
            for v in 1..=per_call {
                let started = Instant::now();
                let op = StoreOp::Transition { call: key.clone(), op: OpId(v), writer: by.clone(), expected: Version(v), phase: Phase::Live, detail: Bytes::from_static(&[7; 48]) };
                assert_eq!(version_of(store.execute(op).await), (Version(v + 1), false));
                latencies.push(started.elapsed());
            }
            latencies
        }
    };
    let started = Instant::now();
    let mut sequential = run_call(0).await;
    let sequential_rate = per_call as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut parallel: Vec<Duration> = futures_util::future::join_all((1..=16).map(run_call)).await.into_iter().flatten().collect();
    let parallel_rate = parallel.len() as f64 / started.elapsed().as_secs_f64();
    let p = |latencies: &mut Vec<Duration>, q: f64| {
        latencies.sort();
        latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)]
    };
    println!("transitions, 1 call at a time: {sequential_rate:.0}/s, p50 {:?}, p99 {:?}", p(&mut sequential, 0.5), p(&mut sequential, 0.99));
    println!("transitions, 16 calls at once: {parallel_rate:.0}/s, p50 {:?}, p99 {:?}", p(&mut parallel, 0.5), p(&mut parallel, 0.99));
    assert!(p(&mut parallel, 0.99) < Duration::from_secs(1), "a transition took a second at p99");

    // Bytes: a device location, a call record with 48 bytes of detail and its lease, a node.
    store.execute(StoreOp::ClaimDevice { device: device("ward3-bed12"), node: node("node-a"), ttl: LEASE }).await.unwrap();
    store.execute(StoreOp::Heartbeat { node: node("node-a"), info: Bytes::from_static(b"10.0.0.11:50000"), ttl: LEASE }).await.unwrap();
    let mut raw = server.raw().await;
    let device_bytes = memory_usage(&mut raw, "fc:d:ward3-bed12").await;
    let call_bytes = memory_usage(&mut raw, "fc:c:bench-0").await;
    let lease_bytes = memory_usage(&mut raw, "fc:l:bench-0").await;
    let node_bytes = memory_usage(&mut raw, "fc:ni").await + memory_usage(&mut raw, "fc:n").await;
    println!("bytes in Redis: device {device_bytes}, call record {call_bytes} (48 B detail, 8 remembered ops), lease {lease_bytes}, one node {node_bytes}");
    assert!(device_bytes < 200 && call_bytes + lease_bytes < 1_000, "values grew: device {device_bytes}, call {call_bytes} + lease {lease_bytes}");
}

async fn memory_usage(raw: &mut redis::aio::MultiplexedConnection, key: &str) -> u64 {
    let bytes: Option<u64> = redis::cmd("MEMORY").arg("USAGE").arg(key).query_async(raw).await.unwrap();
    bytes.unwrap_or_else(|| panic!("{key} missing"))
}
