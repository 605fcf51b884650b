//! The async shell around the [`Controller`]: one task owns it, transports,
//! the admin API and the SFU bridge talk to it only by messages.
//!
//! Every connection has a bounded outbound queue. The controller task never
//! waits on one: a frame that does not fit means the device stopped reading,
//! and that connection is closed (`NOT_READING`) while every other device's
//! frames keep moving.
//!
//! The SFU is on the far side of an [`SfuLink`]: commands out in order,
//! notices in. Whoever holds the link (the `fleetcall` binary's bridge)
//! carries them to the media plane; this crate knows no media plane.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

use crate::Error;
use crate::controller::{CallSnapshot, Controller, DeviceSnapshot, Gauges, Output, SfuCommand, SfuNotice, Stats};
use crate::grants::Credential;
use crate::ids::{CallId, ConnId};
use crate::pb::{self, CloseReason};

/// Frames queued for one connection before it counts as not reading.
pub const OUTBOUND_QUEUE: usize = 256;

/// What a connection task receives from the controller.
#[derive(Debug)]
pub struct ConnectionLink {
    /// Frames to write, in order.
    pub frames: mpsc::Receiver<pb::ServerFrame>,
    /// Becomes `Some` when the controller closes the connection: write the
    /// frames still queued, then close with this reason.
    pub close: watch::Receiver<Option<CloseReason>>,
}

impl ConnectionLink {
    /// Resolves once the controller closed the connection because the device
    /// stopped reading. A writer races its blocked write against this; any
    /// other close lets the write in flight finish first.
    pub async fn not_reading(&mut self) {
        if self.close.wait_for(|reason| *reason == Some(CloseReason::NotReading)).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

struct ConnectionEnds {
    frames: mpsc::Sender<pb::ServerFrame>,
    close: watch::Sender<Option<CloseReason>>,
}

enum Input {
    Up { conn: ConnId, credential: Credential, ends: ConnectionEnds },
    Frame { conn: ConnId, frame: pb::ClientFrame },
    WireError { conn: ConnId, error: Error },
    Down { conn: ConnId, detail: String },
    Sfu(SfuNotice),
    Devices(oneshot::Sender<Vec<DeviceSnapshot>>),
    Calls(oneshot::Sender<Vec<CallSnapshot>>),
    Observe(oneshot::Sender<(Stats, Gauges)>),
    EndCall { call: CallId, reply: oneshot::Sender<bool> },
    Revoke { subject: String, at: u64, reply: oneshot::Sender<usize> },
}

/// Cloneable handle to the control plane, for transports and the admin API.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    input: mpsc::Sender<Input>,
    next_conn: Arc<AtomicU64>,
    /// Connections closed NOT_READING by this shell (the controller's own
    /// stats count only the closes it decides).
    not_reading: Arc<AtomicU64>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Input")
    }
}

/// The control plane is gone (shut down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the control plane has stopped")]
pub struct Stopped;

impl ControlPlane {
    /// The control plane around `controller`: the handle transports and the
    /// admin API use, the controller's end of the SFU boundary (for the
    /// bridge to the media plane), and the task that owns the controller,
    /// for the caller to spawn.
    pub fn new(controller: Controller) -> (ControlPlane, SfuLink, ControllerTask) {
        // Transports wait when the controller is this far behind: backpressure
        // instead of unbounded memory.
        let (input, rx) = mpsc::channel(16 * 1024);
        // Unbounded: the controller never waits on the SFU.
        let (sfu_commands, commands) = mpsc::unbounded_channel();
        let link = SfuLink { commands, notices: SfuNotices(input.clone()) };
        let not_reading = Arc::new(AtomicU64::new(0));
        let task = ControllerTask { controller, input: rx, sfu: sfu_commands, not_reading: not_reading.clone() };
        (ControlPlane { input, next_conn: Arc::new(AtomicU64::new(1)), not_reading }, link, task)
    }

    /// Registers a new connection with the credential its transport proved;
    /// frames for it arrive on the returned link.
    pub async fn connection_up(&self, credential: Credential) -> Result<(ConnId, ConnectionLink), Stopped> {
        let conn = ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        let (frames_tx, frames) = mpsc::channel(OUTBOUND_QUEUE);
        let (close_tx, close) = watch::channel(None);
        let ends = ConnectionEnds { frames: frames_tx, close: close_tx };
        self.send(Input::Up { conn, credential, ends }).await?;
        Ok((conn, ConnectionLink { frames, close }))
    }

    /// Connections closed so far because their outbound queue was full.
    pub fn closed_not_reading(&self) -> u64 {
        self.not_reading.load(Ordering::Relaxed)
    }

    /// A decoded frame from `conn`.
    pub async fn frame(&self, conn: ConnId, frame: pb::ClientFrame) -> Result<(), Stopped> {
        self.send(Input::Frame { conn, frame }).await
    }

    /// The decoder of `conn` failed.
    pub async fn wire_error(&self, conn: ConnId, error: Error) -> Result<(), Stopped> {
        self.send(Input::WireError { conn, error }).await
    }

    /// `conn` closed.
    pub async fn connection_down(&self, conn: ConnId, detail: String) -> Result<(), Stopped> {
        self.send(Input::Down { conn, detail }).await
    }

    /// The device state table.
    pub async fn devices(&self) -> Result<Vec<DeviceSnapshot>, Stopped> {
        self.ask(Input::Devices).await
    }

    /// Live and recently ended calls.
    pub async fn calls(&self) -> Result<Vec<CallSnapshot>, Stopped> {
        self.ask(Input::Calls).await
    }

    /// Counters and gauges.
    pub async fn observe(&self) -> Result<(Stats, Gauges), Stopped> {
        self.ask(Input::Observe).await
    }

    /// Ends a call for everyone; false if unknown or already ended.
    pub async fn end_call(&self, call: CallId) -> Result<bool, Stopped> {
        self.ask(|reply| Input::EndCall { call, reply }).await
    }

    /// Revokes the credentials of `subject` issued at or before `at` (Unix
    /// seconds): their connections close now. Returns the sessions ended.
    pub async fn revoke(&self, subject: String, at: u64) -> Result<usize, Stopped> {
        self.ask(|reply| Input::Revoke { subject, at, reply }).await
    }

    async fn send(&self, input: Input) -> Result<(), Stopped> {
        self.input.send(input).await.map_err(|_| Stopped)
    }

    async fn ask<T>(&self, input: impl FnOnce(oneshot::Sender<T>) -> Input) -> Result<T, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.send(input(reply)).await?;
        rx.await.map_err(|_| Stopped)
    }
}

/// The controller's end of the SFU boundary: what the bridge to the media
/// plane reads and reports.
#[derive(Debug)]
pub struct SfuLink {
    /// Commands, in the order the controller emitted them. Ends (`None`)
    /// once the controller task has stopped and every command was read.
    pub commands: mpsc::UnboundedReceiver<SfuCommand>,
    /// Where the SFU's notices go.
    pub notices: SfuNotices,
}

/// Hands SFU notices to the controller.
#[derive(Debug, Clone)]
pub struct SfuNotices(mpsc::Sender<Input>);

impl SfuNotices {
    /// Queues `notice` for the controller; `Stopped` once it has stopped.
    pub async fn send(&self, notice: SfuNotice) -> Result<(), Stopped> {
        self.0.send(Input::Sfu(notice)).await.map_err(|_| Stopped)
    }
}

/// The task that owns the [`Controller`]; see [`ControlPlane::new`].
#[derive(Debug)]
pub struct ControllerTask {
    controller: Controller,
    input: mpsc::Receiver<Input>,
    sfu: mpsc::UnboundedSender<SfuCommand>,
    not_reading: Arc<AtomicU64>,
}

impl ControllerTask {
    /// Runs the controller until `stop` resolves. Then every live call ends
    /// with `SERVER_SHUTDOWN`, every connection closes after the frames
    /// queued for it, and the task ends: [`ControlPlane`] calls return
    /// [`Stopped`] from then on, and the [`SfuLink`]'s commands end after
    /// the last `Leave`.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        let ControllerTask { controller: mut ctl, mut input, sfu, not_reading } = self;
        let mut conns: HashMap<ConnId, ConnectionEnds> = HashMap::new();
        let mut stop = std::pin::pin!(stop);
        loop {
            drain(&mut ctl, &mut conns, &sfu, &not_reading);
            let deadline = ctl.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                input = input.recv() => {
                    // Every handle is gone: nobody can talk to the controller.
                    let Some(input) = input else { return };
                    handle(&mut ctl, &mut conns, input);
                }
                // Without a deadline only input wakes the controller.
                () = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    ctl.handle_timeout(now());
                }
                () = &mut stop => {
                    ctl.handle_shutdown(now());
                    drain(&mut ctl, &mut conns, &sfu, &not_reading);
                    // Dropping the connections' ends lets each writer finish
                    // its queue and close with the reason already set.
                    return;
                }
            }
        }
    }
}

fn handle(ctl: &mut Controller, conns: &mut HashMap<ConnId, ConnectionEnds>, input: Input) {
    let now = now();
    match input {
        Input::Up { conn, credential, ends } => {
            conns.insert(conn, ends);
            ctl.handle_connection_up(now, unix_now(), conn, credential);
        }
        Input::Frame { conn, frame } => ctl.handle_frame(now, conn, frame),
        Input::WireError { conn, error } => ctl.handle_wire_error(now, conn, &error),
        Input::Down { conn, detail } => {
            conns.remove(&conn);
            ctl.handle_connection_down(now, conn, &detail);
        }
        Input::Sfu(notice) => ctl.handle_sfu(now, notice),
        // A requester that went away does not want the answer.
        Input::Devices(reply) => {
            let _ = reply.send(ctl.devices());
        }
        Input::Calls(reply) => {
            let _ = reply.send(ctl.calls());
        }
        Input::Observe(reply) => {
            let _ = reply.send((ctl.stats().clone(), ctl.gauges()));
        }
        Input::EndCall { call, reply } => {
            let _ = reply.send(ctl.handle_operator_end(now, call));
        }
        Input::Revoke { subject, at, reply } => {
            let _ = reply.send(ctl.handle_revoke(now, &subject, at));
        }
    }
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The wall clock, in which credentials are stated.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Carries out everything the controller asked for, as the sans-IO contract
/// requires after every input.
fn drain(ctl: &mut Controller, conns: &mut HashMap<ConnId, ConnectionEnds>, sfu: &mpsc::UnboundedSender<SfuCommand>, not_reading: &AtomicU64) {
    while let Some(output) = ctl.poll_output() {
        match output {
            Output::Send { conn, frame } => {
                let Some(ends) = conns.get(&conn) else { continue };
                if ends.frames.try_send(frame).is_err() {
                    warn!(%conn, "device is not reading its stream; closing");
                    not_reading.fetch_add(1, Ordering::Relaxed);
                    if let Some(ends) = conns.remove(&conn) {
                        let _ = ends.close.send(Some(CloseReason::NotReading));
                    }
                    ctl.handle_connection_down(now(), conn, "not reading its stream");
                }
            }
            Output::Close { conn, reason } => {
                if let Some(ends) = conns.remove(&conn) {
                    let _ = ends.close.send(Some(reason));
                }
            }
            // The link only closes once the bridge has stopped, after this
            // task: nobody is left to apply the command then.
            Output::Sfu(command) => {
                let _ = sfu.send(command);
            }
        }
    }
}
