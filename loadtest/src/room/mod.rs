//! One room of simulated devices: the devices' control sessions (the client
//! SDK: a QUIC group call, or a named room over WebSocket), their media
//! links, the room's ledger, churn and faults.
//!
//! Both paths speak the device protocol through the controller; they differ
//! only in how a device gets into the call. On QUIC the first device creates
//! a group call and invites the others (a member that was in it before joins
//! again directly). On WebSocket every device joins the named room with
//! `RoomJoin`. From the `CallState` that shows a device `JOINING` on, media
//! (offer, answer, server renegotiation), participant updates, leaving and
//! the call's end are the same code.
//!
//! The house shape: [`RoomCore`] (`machine.rs`) decides everything and
//! measures, sans-IO; [`run`] is the thin loop around it. One task owns the
//! room, so measuring needs no locks: a frame sent by one device and
//! received by another meet in the same ledger. The loop reads the clock
//! once per wake, hands the core that one input, and carries out what the
//! core asks: datagrams on the media sockets, sockets to open and close,
//! requests of the SDK clients (in background tasks, whose results come
//! back as inputs). It wakes for a readable socket (only that one is read),
//! the 20 ms send tick, a control message, an orchestrator command, or the
//! core's next deadline.

mod machine;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetcall_signaling::client::{Client, ClientEvent};
use fleetcall_signaling::pb::{self, client_frame};
use tokio::sync::mpsc;

use crate::context::Ctx;
use crate::ledger::Member;
use crate::outcome::GroupResult;
use crate::scenario::{ControlPath, FaultKind};
use crate::sockets::{MAX_DATAGRAM, Sockets};

pub use machine::{Action, Output, Req, ReqError, RoomCore};

/// One send tick of the room: a 20 ms frame per device.
const TICK: Duration = fleetcall_peer::FRAME;

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

/// What the devices' background tasks report to the room's loop.
#[derive(Debug)]
enum Ctl {
    Registered(
        Result<(Client, mpsc::UnboundedReceiver<ClientEvent>), String>,
        Duration,
    ),
    Event(ClientEvent),
    Reply(Req, Result<u64, ReqError>),
}

/// Runs a room until told to stop; returns what it measured.
pub async fn run(
    ctx: Arc<Ctx>,
    plan: RoomPlan,
    mut commands: mpsc::UnboundedReceiver<RoomCommand>,
) -> GroupResult {
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel();
    let first_tick = plan.starts.first().copied().unwrap_or_else(now);
    let mut core = RoomCore::new(ctx.clone(), plan);
    let mut io = Io { ctx, clients: HashMap::new(), sockets: Sockets::default(), ctl_tx };
    let mut tick = tokio::time::interval_at(first_tick.into(), TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut now = now();
    loop {
        let deadline = io.carry_out(&mut core, now);
        if core.is_done(now) {
            break;
        }
        tokio::select! {
            // Control first: an answer or an offer unblocks media.
            biased;
            Some((member, ctl)) = ctl_rx.recv() => {
                now = self::now();
                match ctl {
                    Ctl::Registered(Ok((client, events)), elapsed) => {
                        if core.handle_registered(now, member, Ok(()), elapsed) {
                            io.adopt(member, client, events);
                        }
                    }
                    Ctl::Registered(Err(e), elapsed) => {
                        core.handle_registered(now, member, Err(e), elapsed);
                    }
                    Ctl::Event(event) => core.handle_event(now, member, event),
                    Ctl::Reply(what, result) => core.handle_reply(now, member, what, result),
                }
            }
            command = commands.recv() => {
                now = self::now();
                // The orchestrator is gone: stop as if told.
                core.handle_command(now, command.unwrap_or(RoomCommand::Stop));
            }
            scheduled = tick.tick() => {
                now = self::now();
                core.handle_tick(now, scheduled.into_std());
            }
            member = io.sockets.readable() => {
                now = self::now();
                // Every datagram waiting: the socket is watched again only then.
                while let Some((n, source)) = io.sockets.try_recv(member, &mut buf) {
                    core.handle_datagram(now, member, source, &buf[..n]);
                }
            }
            // No deadline: the branch is off.
            () = tokio::time::sleep_until(deadline.unwrap_or(now).into()), if deadline.is_some() => {
                now = self::now();
                core.handle_timeout(now);
            }
        }
    }
    core.finish(io.sockets.send_errors())
}

/// Time from tokio's clock, so paused-time tests work.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// What the loop owns besides the core: the devices' SDK clients and media
/// sockets.
struct Io {
    ctx: Arc<Ctx>,
    clients: HashMap<Member, Client>,
    sockets: Sockets<Member>,
    ctl_tx: mpsc::UnboundedSender<(Member, Ctl)>,
}

impl Io {
    /// Carries out what the core asked for; returns its next deadline.
    fn carry_out(&mut self, core: &mut RoomCore, now: Instant) -> Option<Instant> {
        loop {
            match core.poll_output() {
                Output::Transmit { member, datagram } => self.sockets.send(member, &datagram),
                Output::OpenMedia(member) => {
                    let bound = self.sockets.open(member, self.ctx.bind_ip);
                    core.handle_media_socket(now, member, bound);
                }
                Output::CloseMedia(member) => self.sockets.close(member),
                Output::Control { member, action } => self.control(member, action),
                Output::Timeout(deadline) => return deadline,
            }
        }
    }

    /// Keeps a registered device's client and forwards its events.
    fn adopt(&mut self, m: Member, client: Client, mut events: mpsc::UnboundedReceiver<ClientEvent>) {
        self.clients.insert(m, client);
        let tx = self.ctl_tx.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if tx.send((m, Ctl::Event(event))).is_err() {
                    return;
                }
            }
        });
    }

    fn control(&mut self, m: Member, action: Action) {
        let tx = self.ctl_tx.clone();
        match action {
            Action::Register { id, room } => {
                let ctx = self.ctx.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let result = match room {
                        Some(room) => ctx.control.register_ws(&id, &room).await,
                        None => ctx.control.register(&id).await,
                    };
                    let _ = tx.send((m, Ctl::Registered(result, started.elapsed())));
                });
            }
            Action::Request(what, kind) => {
                let Some(client) = self.clients.get(&m) else { return };
                let reply = client.request(kind);
                tokio::spawn(async move {
                    let result = reply.await.map_err(ReqError::from);
                    let _ = tx.send((m, Ctl::Reply(what, result)));
                });
            }
            Action::SdpOffer { call, sdp } => {
                let Some(client) = self.clients.get(&m) else { return };
                let reply = client.sdp_offer(call, 1, sdp);
                tokio::spawn(async move {
                    let result = reply.await.map(|()| 0).map_err(ReqError::from);
                    let _ = tx.send((m, Ctl::Reply(Req::Offer, result)));
                });
            }
            Action::SdpAnswer { call, revision, sdp } => {
                let Some(client) = self.clients.get(&m) else { return };
                let reply = client.sdp_answer(call, revision, sdp);
                tokio::spawn(async move {
                    let result = reply.await.map(|()| 0).map_err(ReqError::from);
                    let _ = tx.send((m, Ctl::Reply(Req::Answer, result)));
                });
            }
            Action::Stall(on) => {
                if let Some(client) = self.clients.get(&m) {
                    client.simulate_stall(on);
                }
            }
            Action::Kill => {
                // Cut the link silently, then drop the last handle so the
                // client does not reconnect.
                if let Some(client) = self.clients.remove(&m) {
                    client.simulate_drop();
                }
            }
            Action::Forget => {
                self.clients.remove(&m);
            }
            Action::Goodbye { call } => {
                let Some(client) = self.clients.remove(&m) else { return };
                tokio::spawn(async move {
                    if let Some(call) = call {
                        let leave = client_frame::Kind::GroupLeave(pb::GroupLeave { call_id: call.0 });
                        let _ = tokio::time::timeout(machine::GOODBYE, client.request(leave)).await;
                    }
                    client.close().await;
                });
            }
        }
    }
}
