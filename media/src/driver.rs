//! The UDP driver: worker threads, each owning one [`Sfu`] core and one socket.
//!
//! A worker's loop: wait for a datagram batch, a command, audio back from
//! the DSP threads or the core's deadline; feed it to the core with the
//! time from tokio's clock; then carry out what the core asks
//! ([`Output`]) until it says when to wake it. The worker makes no decision
//! of its own.
//!
//! # One UDP port per worker
//!
//! Each worker binds its own port from a small configured range and every room
//! is pinned to one worker by a hash of its name; that room's participants get
//! the worker's port as their host candidate. The alternative, one shared port
//! whose receive path hands each datagram to the owning worker, costs a
//! cross-thread queue push, a wake-up and a cache miss per datagram, and needs
//! a global address table shared (and locked or sharded) across threads. With
//! a port per worker the kernel does the hand-off for free, the demux tables
//! stay inside the worker, and forwarding never takes a lock. Firewalls need
//! a range of N ports (N = workers, default one per core) instead of one, which
//! is a fair price on an institutional LAN. Measured (`media/benches/handoff.rs`,
//! 2-core VM): the copy and channel hand-off alone cost about 150 ns per
//! datagram before any wake-up, about 2.5 % of the 6 µs a 5-person room's
//! packet costs in the core, on every datagram of every room.
//!
//! # Batched I/O
//!
//! Receive uses `quinn-udp` (recvmmsg, GRO); a GRO buffer holds several
//! datagrams from one source at a fixed stride. After each receive batch the
//! core is drained and what it produced goes out in one `sendmmsg`
//! ([`crate::outbox`]): audio fan-out goes to many destinations, which GSO
//! cannot batch. The worker counts its socket calls for the scrape
//! (`fleetcall_media_socket_calls_total`): calls per forwarded packet is
//! what batching buys.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use fleetcall_sfu::audio::{PolicyChange, SuppressionPolicy};
use fleetcall_sfu::{
    JoinRequest, Joined, LeaveReason, Output, ParticipantId, Rights, RoomId, SdpAnswer, SdpOffer, Sfu, SfuConfig, SfuError, SfuEvent, SfuStats,
};
use quinn_udp::{RecvMeta, UdpSocketState, BATCH_SIZE};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, info, info_span, warn};

use crate::audio::{AudioPool, MeterSnapshot, Produced};
use crate::outbox::Outbox;

/// Where the media plane listens.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Local IP to bind (`0.0.0.0` for all interfaces).
    pub bind_ip: IpAddr,
    /// First port; worker `i` binds `first_port + i`. Port 0 binds an
    /// ephemeral port per worker (tests).
    pub first_port: u16,
    /// Number of workers (and ports).
    pub workers: usize,
    /// IP announced to devices in ICE host candidates. Required when
    /// `bind_ip` is unspecified.
    pub advertise_ip: Option<IpAddr>,
    /// Settings of each core; its `candidates` are filled in per worker.
    pub sfu: SfuConfig,
    /// Threads running noise suppression pipelines.
    pub audio_threads: usize,
    /// How processed tracks are decoded, denoised and encoded.
    pub pipeline: fleetcall_dsp::PipelineConfig,
    /// Commands one worker may have waiting. A join beyond it is refused at
    /// once with [`SfuError::Overloaded`]; commands for participants
    /// already in (answers, offers, leaves) wait for room instead.
    pub worker_queue: usize,
}

impl DriverConfig {
    /// Commands waiting per worker, by default: a whole assembly of
    /// devices joining one room at once (about 1 ms each) fits.
    pub const DEFAULT_WORKER_QUEUE: usize = 1024;
}

/// Receive buffer per batch slot: room for a GRO batch of datagrams.
const SLOT_BYTES: usize = 64 * 1024;

/// Receive batches one wake-up handles at most before the loop looks at
/// its other inputs.
const BATCHES_PER_WAKE: usize = 8;

/// Socket buffers big enough for bursts of fan-out on a busy worker.
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// A participant's place: its worker and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    worker: usize,
    /// The participant id in the SFU.
    pub participant: ParticipantId,
}

enum Command {
    Join {
        request: JoinRequest,
        events: mpsc::UnboundedSender<SfuEvent>,
        reply: oneshot::Sender<Result<Joined, SfuError>>,
    },
    Answer {
        participant: ParticipantId,
        answer: SdpAnswer,
        reply: oneshot::Sender<Result<(), SfuError>>,
    },
    Offer {
        participant: ParticipantId,
        offer: SdpOffer,
        reply: oneshot::Sender<Result<SdpAnswer, SfuError>>,
    },
    Leave {
        participant: ParticipantId,
        reason: LeaveReason,
        reply: oneshot::Sender<Result<(), SfuError>>,
    },
    Stats {
        reply: oneshot::Sender<SfuStats>,
    },
    Rooms {
        reply: oneshot::Sender<Vec<(RoomId, usize)>>,
    },
    /// Apply a change, if any, and reply with the policy in force.
    Policy {
        change: Option<PolicyChange>,
        reply: oneshot::Sender<SuppressionPolicy>,
    },
}

#[derive(Debug)]
struct Worker {
    commands: mpsc::Sender<Command>,
    calls: Arc<SocketCalls>,
    /// Tells the worker to remove everyone (they hear `shutdown`) and stop,
    /// ahead of whatever commands wait.
    stop: Arc<Notify>,
    local_addr: SocketAddr,
}

/// A worker's socket calls and what they moved; the worker is the only
/// writer, the scrape reads.
#[derive(Debug, Default)]
struct SocketCalls {
    /// `recvmmsg` calls, the ones that found nothing included.
    receive: AtomicU64,
    /// `sendmmsg` calls.
    send: AtomicU64,
    /// Datagrams the kernel did not take (full send buffer, refused address).
    unsent: AtomicU64,
}

/// Cloneable handle to the media plane; every call is a message to a worker.
#[derive(Debug, Clone)]
pub struct SfuHandle {
    workers: Arc<[Worker]>,
    next_participant: Arc<AtomicU64>,
    audio: Arc<AudioPool>,
    /// Joins refused because their worker's queue was full.
    overloaded: Arc<AtomicU64>,
}

/// The outcome of a command a worker has queued. Commands to one worker are
/// applied in the order they were queued, so a caller may queue the next
/// (a participant's answer after its join) before this resolves.
#[derive(Debug)]
#[must_use = "the command is applied whether or not its outcome is awaited"]
pub struct Reply<T>(Option<oneshot::Receiver<Result<T, SfuError>>>);

impl<T> Future for Reply<T> {
    type Output = Result<T, SfuError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            // Never queued: the worker had stopped.
            None => Poll::Ready(Err(SfuError::ShuttingDown)),
            Some(reply) => Pin::new(reply).poll(cx).map(|outcome| outcome.unwrap_or(Err(SfuError::ShuttingDown))),
        }
    }
}

/// Owns the worker threads.
#[derive(Debug)]
pub struct SfuDriver {
    handle: SfuHandle,
    threads: Vec<JoinHandle<()>>,
}

impl SfuDriver {
    /// Binds one socket per worker and starts the workers and the DSP
    /// threads.
    pub fn start(config: DriverConfig) -> io::Result<SfuDriver> {
        let advertise_ip = match (config.advertise_ip, config.bind_ip.is_unspecified()) {
            (Some(ip), _) => ip,
            (None, false) => config.bind_ip,
            (None, true) => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "an advertise IP is required when binding all interfaces"));
            }
        };
        let crypto = Arc::new(str0m::crypto::from_feature_flags());
        // The default provider generates certificates; failing would be a bug.
        let cert = crypto.dtls_provider.generate_certificate().expect("DTLS certificate");

        let worker_count = config.workers.max(1);
        let (processed_tx, mut processed_rx): (Vec<_>, Vec<_>) = (0..worker_count).map(|_| mpsc::unbounded_channel()).unzip();
        let audio = Arc::new(AudioPool::start(config.audio_threads, config.pipeline, processed_tx)?);
        let mut workers = Vec::new();
        let mut threads = Vec::new();
        for (index, processed) in processed_rx.drain(..).enumerate() {
            let port = if config.first_port == 0 { 0 } else { config.first_port + index as u16 };
            let socket = std::net::UdpSocket::bind((config.bind_ip, port))?;
            socket.set_nonblocking(true)?;
            let local_addr = socket.local_addr()?;
            let advertised = SocketAddr::new(advertise_ip, local_addr.port());
            let sfu_config = SfuConfig { candidates: vec![advertised], ..config.sfu.clone() };
            let sfu = Sfu::with_certificate(sfu_config, crypto.clone(), cert.clone());
            let (tx, rx) = mpsc::channel(config.worker_queue.max(1));
            let stop = Arc::new(Notify::new());
            let pool = audio.clone();
            let worker_stop = stop.clone();
            let calls = Arc::new(SocketCalls::default());
            let worker_calls = calls.clone();
            let thread = std::thread::Builder::new()
                .name(format!("sfu-worker-{index}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("worker runtime");
                    let span = info_span!("sfu_worker", worker = index, %local_addr);
                    let _enter = span.enter();
                    let io = WorkerIo { index, advertised, commands: rx, stop: worker_stop, processed, audio: pool, calls: worker_calls };
                    if let Err(e) = runtime.block_on(run_worker(sfu, socket, io)) {
                        warn!(error = %e, "worker stopped on socket error");
                    }
                })?;
            info!(worker = index, %local_addr, %advertised, "media worker listening");
            workers.push(Worker { commands: tx, calls, stop, local_addr });
            threads.push(thread);
        }
        let handle = SfuHandle { workers: workers.into(), next_participant: Arc::new(AtomicU64::new(1)), audio, overloaded: Arc::default() };
        Ok(SfuDriver { handle, threads })
    }

    /// A handle for signaling.
    pub fn handle(&self) -> SfuHandle {
        self.handle.clone()
    }

    /// Removes every participant (they hear `shutdown`) and joins the workers.
    /// Handles still alive get [`SfuError::ShuttingDown`] afterwards.
    pub fn shutdown(self) {
        for worker in self.handle.workers.iter() {
            // A worker that already stopped has nothing left to shut down.
            worker.stop.notify_one();
        }
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

impl SfuHandle {
    /// The sockets the workers bound.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.workers.iter().map(|w| w.local_addr).collect()
    }

    /// Queues a join of `room` by a new participant at the worker that owns
    /// the room. Refused at once with [`SfuError::Overloaded`] when that
    /// worker has its queue full: new work waits nowhere without end, and
    /// the participant's place is known before the worker answers. Events
    /// for it arrive on `events` after the reply, in order.
    pub fn join(
        &self,
        room: RoomId,
        name: String,
        offer: SdpOffer,
        rights: Rights,
        events: mpsc::UnboundedSender<SfuEvent>,
    ) -> Result<(Session, Reply<Joined>), SfuError> {
        let worker = self.worker_of(&room);
        let participant = ParticipantId(self.next_participant.fetch_add(1, Ordering::Relaxed));
        let request = JoinRequest { room, participant, name, offer, rights };
        let (reply, outcome) = oneshot::channel();
        match self.workers[worker].commands.try_send(Command::Join { request, events, reply }) {
            Ok(()) => Ok((Session { worker, participant }, Reply(Some(outcome)))),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overloaded.fetch_add(1, Ordering::Relaxed);
                Err(SfuError::Overloaded)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SfuError::ShuttingDown),
        }
    }

    /// Queues the participant's answer to the SFU's offer (waiting for room
    /// in the worker's queue).
    pub async fn accept_answer(&self, session: Session, answer: SdpAnswer) -> Reply<()> {
        self.queue(session.worker, |reply| Command::Answer { participant: session.participant, answer, reply }).await
    }

    /// Queues the participant's own offer (ICE restart); the reply is the answer.
    pub async fn accept_offer(&self, session: Session, offer: SdpOffer) -> Reply<SdpAnswer> {
        self.queue(session.worker, |reply| Command::Offer { participant: session.participant, offer, reply }).await
    }

    /// Queues the participant's removal.
    pub async fn leave(&self, session: Session, reason: LeaveReason) -> Reply<()> {
        self.queue(session.worker, |reply| Command::Leave { participant: session.participant, reason, reply }).await
    }

    /// Joins refused so far because their worker's queue was full.
    pub fn overloaded(&self) -> u64 {
        self.overloaded.load(Ordering::Relaxed)
    }

    /// Counts summed over all workers.
    pub async fn stats(&self) -> Result<SfuStats, SfuError> {
        let mut total = SfuStats::default();
        for worker in 0..self.workers.len() {
            let stats = self.call(worker, |reply| Command::Stats { reply }).await?;
            total.merge(&stats);
        }
        Ok(total)
    }

    /// Changes the suppression policy on every worker; returns the policy now in force.
    pub async fn set_policy(&self, change: PolicyChange) -> Result<SuppressionPolicy, SfuError> {
        let mut policy = SuppressionPolicy::default();
        for worker in 0..self.workers.len() {
            let change = Some(change.clone());
            policy = self.call(worker, |reply| Command::Policy { change, reply }).await?;
        }
        Ok(policy)
    }

    /// The suppression policy in force (the same on every worker).
    pub async fn policy(&self) -> Result<SuppressionPolicy, SfuError> {
        self.call(0, |reply| Command::Policy { change: None, reply }).await
    }

    /// Participants per room, over all workers.
    pub async fn room_sizes(&self) -> Result<Vec<(RoomId, usize)>, SfuError> {
        let mut all = Vec::new();
        for worker in 0..self.workers.len() {
            all.extend(self.call(worker, |reply| Command::Rooms { reply }).await?);
        }
        Ok(all)
    }

    /// Every media-plane metric family, for a scrape.
    pub async fn metric_families(&self) -> Result<Vec<prometheus::proto::MetricFamily>, SfuError> {
        let stats = self.stats().await?;
        let audio = self.audio.clone();
        let totals = tokio::task::spawn_blocking(move || audio.totals()).await.unwrap_or_default();
        let mut families = crate::metrics::families(&stats, &totals);
        families.push(
            crate::metrics::Family::counter("fleetcall_media_joins_refused_total", "Joins the media plane refused before trying them, by reason.")
                .value(&[("reason", "overloaded")], self.overloaded() as f64)
                .build(),
        );
        let (mut calls, mut unsent) = (
            crate::metrics::Family::counter("fleetcall_media_socket_calls_total", "System calls on the media sockets, by worker and direction (recvmmsg, sendmmsg)."),
            crate::metrics::Family::counter("fleetcall_media_datagrams_unsent_total", "Datagrams the kernel did not take (full send buffer, refused address), by worker."),
        );
        for (index, worker) in self.workers.iter().enumerate() {
            let index = index.to_string();
            let count = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
            calls = calls
                .value(&[("worker", &index), ("direction", "receive")], count(&worker.calls.receive))
                .value(&[("worker", &index), ("direction", "send")], count(&worker.calls.send));
            unsent = unsent.value(&[("worker", &index)], count(&worker.calls.unsent));
        }
        families.push(calls.build());
        families.push(unsent.build());
        Ok(families)
    }

    /// Meters of every denoised track.
    pub async fn audio_meters(&self) -> MeterSnapshot {
        let audio = self.audio.clone();
        tokio::task::spawn_blocking(move || audio.meters()).await.unwrap_or_default()
    }

    /// Rooms are pinned to workers by a stable hash of their name.
    fn worker_of(&self, room: &RoomId) -> usize {
        let mut hasher = DefaultHasher::new();
        room.hash(&mut hasher);
        (hasher.finish() % self.workers.len() as u64) as usize
    }

    /// Queues a command (waiting for room) whose outcome may be an error.
    async fn queue<T>(&self, worker: usize, command: impl FnOnce(oneshot::Sender<Result<T, SfuError>>) -> Command) -> Reply<T> {
        let (reply, outcome) = oneshot::channel();
        match self.workers[worker].commands.send(command(reply)).await {
            Ok(()) => Reply(Some(outcome)),
            Err(_) => Reply(None),
        }
    }

    /// Queues a command (waiting for room) and waits for its answer.
    async fn call<T>(&self, worker: usize, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, SfuError> {
        let (reply, rx) = oneshot::channel();
        self.workers[worker].commands.send(command(reply)).await.map_err(|_| SfuError::ShuttingDown)?;
        rx.await.map_err(|_| SfuError::ShuttingDown)
    }
}

/// A worker's channels besides its socket.
struct WorkerIo {
    index: usize,
    advertised: SocketAddr,
    commands: mpsc::Receiver<Command>,
    stop: Arc<Notify>,
    /// Packets the DSP threads produced for this worker's tracks.
    processed: mpsc::UnboundedReceiver<Produced>,
    audio: Arc<AudioPool>,
    calls: Arc<SocketCalls>,
}

/// Where a worker carries out its core's outputs.
struct Sinks<'a> {
    socket: &'a UdpSocket,
    outbox: Outbox,
    calls: &'a SocketCalls,
    /// Each participant's signaling route, from its join to its removal.
    routes: HashMap<ParticipantId, mpsc::UnboundedSender<SfuEvent>>,
    audio: &'a AudioPool,
    worker: usize,
}

async fn run_worker(mut sfu: Sfu, socket: std::net::UdpSocket, io: WorkerIo) -> io::Result<()> {
    let WorkerIo { index, advertised, mut commands, stop, mut processed, audio, calls } = io;
    let state = UdpSocketState::new((&socket).into())?;
    // Best effort: the kernel may cap these; smaller buffers only drop earlier.
    let _ = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES);
    let _ = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES);
    let outbox = Outbox::new(socket.local_addr()?);
    let socket = UdpSocket::from_std(socket)?;
    let mut out = Sinks { socket: &socket, outbox, calls: &calls, routes: HashMap::new(), audio: &audio, worker: index };
    let mut inbox = Inbox { buffer: vec![0u8; SLOT_BYTES * BATCH_SIZE], metas: [RecvMeta::default(); BATCH_SIZE], advertised };

    loop {
        let deadline = out.carry_out(&mut sfu).map(tokio::time::Instant::from_std);
        tokio::select! {
            biased;
            () = stop.notified() => break,
            // Commands first, so a leave never waits behind a flood of
            // media; and media right after each one, so a queue of joins
            // never holds the calls on this worker off for longer than one
            // command takes.
            command = commands.recv() => {
                let now = tokio::time::Instant::now().into_std();
                // No handle left: the server is gone.
                let Some(command) = command else { break };
                handle_command(&mut sfu, now, command, &mut out.routes);
                out.carry_out(&mut sfu);
                let now = tokio::time::Instant::now().into_std();
                inbox.receive(&mut sfu, now, &state, &mut out, false);
                while let Ok((track, produced)) = processed.try_recv() {
                    sfu.handle_processed(now, track, produced);
                }
                sfu.handle_timeout(now);
            }
            // Disabled (not spinning) if the pool is gone at shutdown.
            Some((track, produced)) = processed.recv() => {
                let now = tokio::time::Instant::now().into_std();
                sfu.handle_processed(now, track, produced);
            }
            ready = socket.readable() => {
                ready?;
                let now = tokio::time::Instant::now().into_std();
                inbox.receive(&mut sfu, now, &state, &mut out, true);
            }
            // No deadline: nothing to wake for until some input arrives.
            () = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                sfu.handle_timeout(tokio::time::Instant::now().into_std());
            }
        }
    }
    // Told to stop, or nobody can command it any more: everyone hears
    // `shutdown`.
    sfu.remove_all(tokio::time::Instant::now().into_std(), LeaveReason::Shutdown);
    out.carry_out(&mut sfu);
    Ok(())
}

/// Receive buffers of one worker.
struct Inbox {
    buffer: Vec<u8>,
    metas: [RecvMeta; BATCH_SIZE],
    advertised: SocketAddr,
}

impl Inbox {
    /// Feeds the core what the socket holds, a bounded number of batches
    /// (so a flood that never lets it run dry still leaves the other inputs
    /// their turn), carrying out what the core asks after each batch: one
    /// drain of every `Rtc` a batch wrote to and one `sendmmsg`, and no
    /// packet waits for more than its own batch. `readiness`: go through
    /// tokio's readiness flag, which a `WouldBlock` clears; without,
    /// straight to the socket, since the flag may not have been refreshed
    /// while a command ran.
    fn receive(&mut self, sfu: &mut Sfu, now: std::time::Instant, state: &UdpSocketState, out: &mut Sinks<'_>, readiness: bool) {
        let socket = out.socket;
        for _ in 0..BATCHES_PER_WAKE {
            let mut slices: Vec<IoSliceMut<'_>> = self.buffer.chunks_mut(SLOT_BYTES).map(IoSliceMut::new).collect();
            out.calls.receive.fetch_add(1, Ordering::Relaxed);
            let received = if readiness {
                socket.try_io(Interest::READABLE, || state.recv(socket.into(), &mut slices, &mut self.metas))
            } else {
                state.recv(socket.into(), &mut slices, &mut self.metas)
            };
            let count = match received {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // ICMP errors surface here on Linux; they concern one peer only.
                Err(e) => {
                    debug!(error = %e, "udp receive error");
                    return;
                }
            };
            for (meta, slot) in self.metas.iter().zip(self.buffer.chunks(SLOT_BYTES)).take(count) {
                let stride = meta.stride.max(1);
                for datagram in slot[..meta.len].chunks(stride) {
                    sfu.handle_datagram(now, meta.addr, self.advertised, datagram);
                }
            }
            out.carry_out(sfu);
        }
    }
}

fn handle_command(
    sfu: &mut Sfu,
    now: std::time::Instant,
    command: Command,
    routes: &mut HashMap<ParticipantId, mpsc::UnboundedSender<SfuEvent>>,
) {
    // A dropped reply means the caller gave up; the outcome still stands.
    match command {
        Command::Join { request, events, reply } => {
            let participant = request.participant;
            let result = sfu.join(now, request);
            if result.is_ok() {
                routes.insert(participant, events);
            }
            let _ = reply.send(result);
        }
        Command::Answer { participant, answer, reply } => {
            let _ = reply.send(sfu.accept_answer(now, participant, answer));
        }
        Command::Offer { participant, offer, reply } => {
            let _ = reply.send(sfu.accept_offer(now, participant, offer));
        }
        Command::Leave { participant, reason, reply } => {
            let _ = reply.send(sfu.leave(now, participant, reason));
        }
        Command::Stats { reply } => {
            let _ = reply.send(sfu.stats());
        }
        Command::Rooms { reply } => {
            let _ = reply.send(sfu.room_sizes());
        }
        Command::Policy { change, reply } => {
            if let Some(change) = change {
                sfu.set_policy(change);
            }
            let _ = reply.send(sfu.policy().clone());
        }
    }
}

impl Sinks<'_> {
    /// Does what the core asks until it says when to wake it: sends the
    /// datagrams (in batches), routes each event to its participant, hands
    /// audio to the DSP threads. Returns the core's deadline.
    fn carry_out(&mut self, sfu: &mut Sfu) -> Option<std::time::Instant> {
        loop {
            match sfu.poll_output() {
                Output::Transmit(t) => {
                    self.outbox.push(t);
                    if self.outbox.len() >= crate::outbox::SEND_BATCH {
                        self.flush();
                    }
                }
                Output::Event(event) => {
                    let to = event.recipient();
                    let removed = matches!(event, SfuEvent::Removed { .. });
                    if let Some(route) = self.routes.get(&to) {
                        // The session may be gone already; then nobody needs the event.
                        let _ = route.send(event);
                    }
                    if removed {
                        self.routes.remove(&to);
                    }
                }
                Output::Audio(command) => self.audio.send(command, self.worker),
                Output::Timeout(deadline) => {
                    self.flush();
                    return deadline;
                }
            }
        }
    }

    fn flush(&mut self) {
        if self.outbox.len() == 0 {
            return;
        }
        let sent = self.outbox.flush(self.socket);
        self.calls.send.fetch_add(sent.calls, Ordering::Relaxed);
        self.calls.unsent.fetch_add(sent.dropped, Ordering::Relaxed);
    }
}
