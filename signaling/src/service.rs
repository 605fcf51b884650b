//! The async shell around the [`Controller`]: one task owns it, transports
//! and the SFU talk to it only by messages.
//!
//! Every connection has a bounded outbound queue. The controller task never
//! waits on one: a frame that does not fit means the device stopped reading,
//! and that connection is closed (`NOT_READING`) while every other device's
//! frames keep moving.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use fleetcall_sfu::audio::PolicyChange;
use fleetcall_sfu::{LeaveReason, Rights, RoomId, SdpAnswer, SdpOffer, Session, SfuEvent, SfuHandle};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::Error;
use crate::controller::{CallSnapshot, Controller, DeviceSnapshot, Gauges, Output, SfuCommand, SfuNotice, Stats};
use crate::grants::Credential;
use crate::ids::{CallId, ConnId, ParticipantKey};
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
    Shutdown(oneshot::Sender<()>),
}

/// Cloneable handle to the control plane, for transports and the admin API.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    input: mpsc::Sender<Input>,
    next_conn: Arc<AtomicU64>,
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
    /// Starts the controller task and the SFU adapter task.
    pub fn start(controller: Controller, sfu: SfuHandle) -> ControlPlane {
        // Transports wait when the controller is this far behind: backpressure
        // instead of unbounded memory.
        let (input, rx) = mpsc::channel(16 * 1024);
        let (sfu_commands, sfu_rx) = mpsc::unbounded_channel();
        tokio::spawn(run_controller(controller, rx, sfu_commands));
        tokio::spawn(run_sfu_adapter(sfu, sfu_rx, input.clone()));
        ControlPlane { input, next_conn: Arc::new(AtomicU64::new(1)) }
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

    /// Ends every call, closes every connection, and waits until done.
    pub async fn shutdown(&self) -> Result<(), Stopped> {
        self.ask(Input::Shutdown).await
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

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The wall clock, in which credentials are stated.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn run_controller(
    mut ctl: Controller,
    mut input: mpsc::Receiver<Input>,
    sfu: mpsc::UnboundedSender<SfuCommand>,
) {
    let mut conns: HashMap<ConnId, ConnectionEnds> = HashMap::new();
    loop {
        drain(&mut ctl, &mut conns, &sfu);
        let deadline = ctl.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            input = input.recv() => {
                let Some(input) = input else { return };
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
                    Input::Devices(reply) => { let _ = reply.send(ctl.devices()); }
                    Input::Calls(reply) => { let _ = reply.send(ctl.calls()); }
                    Input::Observe(reply) => { let _ = reply.send((ctl.stats().clone(), ctl.gauges())); }
                    Input::EndCall { call, reply } => { let _ = reply.send(ctl.handle_operator_end(now, call)); }
                    Input::Revoke { subject, at, reply } => { let _ = reply.send(ctl.handle_revoke(now, &subject, at)); }
                    Input::Shutdown(done) => {
                        ctl.handle_shutdown(now);
                        drain(&mut ctl, &mut conns, &sfu);
                        let _ = done.send(());
                    }
                }
            }
            () = sleep_until(deadline) => ctl.handle_timeout(now()),
        }
    }
}

/// Carries out everything the controller asked for, as the sans-IO contract
/// requires after every input.
fn drain(ctl: &mut Controller, conns: &mut HashMap<ConnId, ConnectionEnds>, sfu: &mpsc::UnboundedSender<SfuCommand>) {
    while let Some(output) = ctl.poll_output() {
        match output {
            Output::Send { conn, frame } => {
                let Some(ends) = conns.get(&conn) else { continue };
                if ends.frames.try_send(frame).is_err() {
                    warn!(%conn, "device is not reading its stream; closing");
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
            // The adapter only stops with the runtime.
            Output::Sfu(command) => {
                let _ = sfu.send(command);
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Applies SFU commands in order and turns SFU events into notices. Commands
/// are applied one at a time so a `Leave` never overtakes its `Join`.
async fn run_sfu_adapter(sfu: SfuHandle, mut commands: mpsc::UnboundedReceiver<SfuCommand>, notices: mpsc::Sender<Input>) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut sessions: HashMap<ParticipantKey, Session> = HashMap::new();
    let mut keys: HashMap<fleetcall_sfu::ParticipantId, ParticipantKey> = HashMap::new();
    loop {
        let notice = tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else { return };
                apply(&sfu, command, &events_tx, &mut sessions, &mut keys).await
            }
            event = events.recv() => {
                let Some(event) = event else { return };
                translate(event, &mut sessions, &mut keys)
            }
        };
        if let Some(notice) = notice
            && notices.send(Input::Sfu(notice)).await.is_err() {
                return;
            }
    }
}

async fn apply(
    sfu: &SfuHandle,
    command: SfuCommand,
    events: &mpsc::UnboundedSender<SfuEvent>,
    sessions: &mut HashMap<ParticipantKey, Session>,
    keys: &mut HashMap<fleetcall_sfu::ParticipantId, ParticipantKey>,
) -> Option<SfuNotice> {
    match command {
        SfuCommand::Join { room, participant, display_name, offer_sdp, publish, subscribe } => {
            let offer = match SdpOffer::from_sdp_string(&offer_sdp) {
                Ok(offer) => offer,
                Err(e) => return Some(SfuNotice::JoinFailed { participant, error: format!("invalid SDP offer: {e}") }),
            };
            // The SFU's room namespace is the controller's call ids.
            let room = RoomId(format!("call-{}", room.0));
            let rights = Rights { publish, subscribe };
            match sfu.join(room, display_name.to_string(), offer, rights, events.clone()).await {
                Ok((session, joined)) => {
                    debug!(%participant, sfu_participant = %session.participant, "joined the SFU");
                    sessions.insert(participant, session);
                    keys.insert(session.participant, participant);
                    let media_id = session.participant.0;
                    Some(SfuNotice::Joined { participant, answer_sdp: joined.answer.to_sdp_string(), media_id })
                }
                Err(e) => Some(SfuNotice::JoinFailed { participant, error: e.to_string() }),
            }
        }
        SfuCommand::Answer { participant, sdp } => {
            let session = *sessions.get(&participant)?;
            let answer = match SdpAnswer::from_sdp_string(&sdp) {
                Ok(answer) => answer,
                Err(e) => {
                    // Unusable answers end the participant, as in the SFU itself.
                    leave(sfu, participant, sessions, keys, LeaveReason::NegotiationFailed).await;
                    return Some(SfuNotice::Removed { participant, reason: format!("invalid SDP answer: {e}") });
                }
            };
            match sfu.accept_answer(session, answer).await {
                Ok(()) => None,
                Err(e) => {
                    debug!(%participant, error = %e, "answer refused");
                    None
                }
            }
        }
        SfuCommand::Offer { participant, sdp } => {
            let session = *sessions.get(&participant)?;
            let offer = match SdpOffer::from_sdp_string(&sdp) {
                Ok(offer) => offer,
                Err(e) => {
                    leave(sfu, participant, sessions, keys, LeaveReason::NegotiationFailed).await;
                    return Some(SfuNotice::Removed { participant, reason: format!("invalid SDP offer: {e}") });
                }
            };
            match sfu.accept_offer(session, offer).await {
                Ok(answer) => Some(SfuNotice::Answer { participant, sdp: answer.to_sdp_string() }),
                Err(e) => {
                    leave(sfu, participant, sessions, keys, LeaveReason::NegotiationFailed).await;
                    Some(SfuNotice::Removed { participant, reason: e.to_string() })
                }
            }
        }
        SfuCommand::Leave { participant, .. } => {
            leave(sfu, participant, sessions, keys, LeaveReason::Requested).await;
            None
        }
        SfuCommand::SetSuppression { device, on } => {
            let change = PolicyChange::Device { device: device.to_string(), on };
            if let Err(e) = sfu.set_policy(change).await {
                warn!(%device, error = %e, "suppression setting not applied");
            }
            None
        }
    }
}

/// Forgets the participant first, so the SFU's `Removed` for it is not
/// reported back as if the SFU had dropped it on its own.
async fn leave(
    sfu: &SfuHandle,
    participant: ParticipantKey,
    sessions: &mut HashMap<ParticipantKey, Session>,
    keys: &mut HashMap<fleetcall_sfu::ParticipantId, ParticipantKey>,
    reason: LeaveReason,
) {
    let Some(session) = sessions.remove(&participant) else { return };
    keys.remove(&session.participant);
    // Already gone in the SFU is the outcome we want.
    let _ = sfu.leave(session, reason).await;
}

fn translate(
    event: SfuEvent,
    sessions: &mut HashMap<ParticipantKey, Session>,
    keys: &mut HashMap<fleetcall_sfu::ParticipantId, ParticipantKey>,
) -> Option<SfuNotice> {
    match event {
        SfuEvent::Offer { participant, offer } => {
            let key = *keys.get(&participant)?;
            Some(SfuNotice::Offer { participant: key, sdp: offer.to_sdp_string() })
        }
        SfuEvent::Connected { participant } => Some(SfuNotice::Connected { participant: *keys.get(&participant)? }),
        SfuEvent::ActiveSpeakers { to, speakers } => {
            let participant = *keys.get(&to)?;
            // Speakers the adapter no longer knows are leaving: not worth naming.
            let speakers = speakers.iter().filter_map(|s| keys.get(s).copied()).collect();
            Some(SfuNotice::ActiveSpeakers { participant, speakers })
        }
        SfuEvent::Removed { participant, reason } => {
            let key = keys.remove(&participant)?;
            sessions.remove(&key);
            info!(%key, reason = reason.as_str(), "SFU removed a participant");
            Some(SfuNotice::Removed { participant: key, reason: reason.as_str().to_owned() })
        }
        // Membership is the controller's business; it tells devices itself.
        _ => None,
    }
}
