//! What the device does: one task that reads the SDK's events, the call's
//! media events and a 20 ms clock, and acts on each.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use audiopus::coder::Encoder;
use fleetcall_peer::wav::{FRAME_SAMPLES, Recording};
use fleetcall_peer::{FRAME, MediaConfig, MediaKind, MediaPeer, PeerError, PeerEvent};
use fleetcall_signaling::client::{Client, ClientError, ClientEvent};
use fleetcall_signaling::ids::CallId;
use fleetcall_signaling::pb::{CallPhase, EndReason, ParticipantStatus};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::AgentError;
use crate::audio::{Listener, Mic};

/// The call the device is in.
struct Call {
    id: CallId,
    phase: CallPhase,
    media: Option<Media>,
}

/// The call's media peer and what it heard.
struct Media {
    peer: MediaPeer,
    events: mpsc::Receiver<PeerEvent>,
    connected: bool,
    listener: Listener,
}

pub(crate) struct Agent {
    id: String,
    client: Client,
    auto_answer: bool,
    media_ip: IpAddr,
    call: Option<Call>,
    mic: Option<Mic>,
    encoder: Encoder,
    recording: Option<Recording>,
}

impl Agent {
    pub(crate) fn new(
        id: String,
        client: Client,
        auto_answer: bool,
        media_ip: IpAddr,
        mic: Option<Mic>,
        encoder: Encoder,
        recording: Option<Recording>,
    ) -> Self {
        Agent { id, client, auto_answer, media_ip, call: None, mic, encoder, recording }
    }

    /// Runs until Ctrl-C, SIGTERM, `duration`, or a refusal for good.
    pub(crate) async fn run(
        &mut self,
        mut events: mpsc::UnboundedReceiver<ClientEvent>,
        callee: Option<&str>,
        duration: Option<Duration>,
    ) -> Result<(), AgentError> {
        // Without --duration the branch is off; the instant is never reached.
        let deadline = tokio::time::Instant::now() + duration.unwrap_or_default();
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(AgentError::Signal)?;
        let mut frames = tokio::time::interval(FRAME);
        // After a stall, carry on at the normal pace rather than in a burst.
        frames.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The registration first, so the lines come in the order things happened.
        while let Ok(event) = events.try_recv() {
            self.on_event(event).await;
        }
        if let Some(callee) = callee {
            let call = self
                .client
                .invite(callee)
                .await
                .map_err(|source| AgentError::Call { callee: callee.to_owned(), source })?;
            println!("calling {callee}: call {}", call.0);
            self.call = Some(Call { id: call, phase: CallPhase::Inviting, media: None });
        }
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => { info!("interrupted"); return Ok(()) }
                _ = terminate.recv() => { info!("terminated"); return Ok(()) }
                () = tokio::time::sleep_until(deadline), if duration.is_some() => {
                    info!("duration reached");
                    return Ok(());
                }
                event = events.recv() => {
                    let Some(event) = event else { return Err(AgentError::ClientStopped) };
                    if let ClientEvent::Ended { close, reason } = &event {
                        // Permanent: this credential will not get in again.
                        println!("refused for good ({}): {reason}", close.as_str_name());
                        return Err(AgentError::Refused { close: close.as_str_name().into(), reason: reason.clone() });
                    }
                    self.on_event(event).await;
                }
                event = media_event(&mut self.call) => self.on_media(event),
                _ = frames.tick() => self.on_frame(),
            }
        }
    }

    async fn on_event(&mut self, event: ClientEvent) {
        debug!(?event, "event");
        match event {
            ClientEvent::Connected { session, resumed: true, .. } => {
                println!("reconnected session {} resumed true", session.0)
            }
            ClientEvent::Connected { session, resumed: false, .. } => {
                println!("registered {} session {}", self.id, session.0);
            }
            ClientEvent::Disconnected { detail, .. } => println!("disconnected: {detail}"),
            ClientEvent::SessionUnknown { reason, .. } => {
                // Every call of the old session is over.
                println!("session lost: {reason}");
                self.call = None;
            }
            ClientEvent::Rejected(rejected) => println!("rejected: {}", rejected.reason),
            ClientEvent::ServerError(error) => {
                warn!(code = error.code, message = %error.message, "server error")
            }
            ClientEvent::IncomingCall(incoming) => {
                let call = CallId(incoming.call_id);
                println!("incoming call {} from {}", call.0, incoming.from);
                if self.call.as_ref().is_some_and(|c| c.id != call) {
                    // The server never alerts a busy device; be safe anyway.
                    spawn_request("decline", self.client.decline(call));
                    return;
                }
                self.call = Some(Call { id: call, phase: CallPhase::Inviting, media: None });
                spawn_request("ringing", self.client.ringing(call));
                if self.auto_answer {
                    spawn_request("accept", self.client.accept(call));
                }
            }
            ClientEvent::CallState(state) => {
                let call = CallId(state.call_id);
                let phase = CallPhase::try_from(state.phase).unwrap_or(CallPhase::Unspecified);
                if self.call.is_none() && phase == CallPhase::Ended {
                    return;
                }
                let current = self
                    .call
                    .get_or_insert_with(|| Call { id: call, phase: CallPhase::Unspecified, media: None });
                if current.id != call {
                    return;
                }
                if current.phase != phase {
                    println!("call {} {}", call.0, phase.as_str_name().trim_start_matches("CALL_PHASE_"));
                    current.phase = phase;
                }
                let joining = state
                    .participants
                    .iter()
                    .any(|p| p.device_id == self.id && p.status == ParticipantStatus::Joining as i32);
                if joining
                    && current.media.is_none()
                    && let Err(e) = self.join_media(call).await
                {
                    warn!(error = %e, "joining media failed");
                }
            }
            ClientEvent::CallEnded(ended) => {
                let reason = EndReason::try_from(ended.reason).unwrap_or(EndReason::Unspecified);
                println!(
                    "call {} ended {} by {}",
                    ended.call_id,
                    reason.as_str_name().trim_start_matches("END_REASON_"),
                    ended.by
                );
                if self.call.as_ref().is_some_and(|c| c.id.0 == ended.call_id) {
                    self.call = None;
                }
            }
            ClientEvent::ParticipantUpdate(update) => {
                let status = ParticipantStatus::try_from(update.status).unwrap_or(ParticipantStatus::Unspecified);
                info!(call = update.call_id, device = %update.device_id, status = status.as_str_name(), "participant");
            }
            ClientEvent::SdpAnswer(answer) => {
                let Some(media) = self.media_of(answer.call_id) else { return };
                if let Err(e) = media.peer.accept_answer(answer.sdp).await {
                    warn!(error = %e, "the SFU's answer was refused");
                }
            }
            ClientEvent::SdpOffer(offer) => {
                let Some(media) = self.media_of(offer.call_id) else { return };
                match media.peer.accept_offer(offer.sdp).await {
                    Ok(sdp) => spawn_request(
                        "sdp answer",
                        self.client.sdp_answer(CallId(offer.call_id), offer.revision, sdp),
                    ),
                    Err(e) => warn!(error = %e, "the SFU's offer was refused"),
                }
            }
            _ => {}
        }
    }

    fn media_of(&mut self, call: u64) -> Option<&mut Media> {
        self.call.as_mut().filter(|c| c.id.0 == call)?.media.as_mut()
    }

    /// Starts the media peer and offers it to the call.
    async fn join_media(&mut self, call: CallId) -> Result<(), PeerError> {
        let config = MediaConfig { bind: SocketAddr::new(self.media_ip, 0), ..MediaConfig::default() };
        let (peer, events) = MediaPeer::start(config).await?;
        let offer = peer.create_offer().await?;
        spawn_request("sdp offer", self.client.sdp_offer(call, 1, offer));
        if let Some(current) = self.call.as_mut() {
            current.media = Some(Media { peer, events, connected: false, listener: Listener::default() });
        }
        Ok(())
    }

    fn on_media(&mut self, event: PeerEvent) {
        let Some(call) = self.call.as_mut() else { return };
        let Some(media) = call.media.as_mut() else { return };
        match event {
            PeerEvent::Connected => {
                media.connected = true;
                println!("media connected call {}", call.id.0);
            }
            PeerEvent::Disconnected => {
                media.connected = false;
                info!(call = call.id.0, "media disconnected");
            }
            PeerEvent::Frame(frame) if frame.kind == MediaKind::Audio && self.recording.is_some() => {
                media.listener.hear(&frame.stream, &frame.payload);
            }
            PeerEvent::Failed(reason) => warn!(%reason, "media failed"),
            _ => {}
        }
    }

    /// Every 20 ms: one microphone frame out, one mixed frame to the recording.
    fn on_frame(&mut self) {
        let Some(media) = self.call.as_mut().and_then(|c| c.media.as_mut()) else { return };
        if !media.connected {
            return;
        }
        let pcm = match self.mic.as_mut() {
            Some(mic) => mic.next_frame(),
            None => [0; FRAME_SAMPLES],
        };
        let mut packet = [0u8; 1275];
        match self.encoder.encode(&pcm, &mut packet) {
            Ok(n) => {
                let _ = media.peer.send_opus(packet[..n].to_vec());
            }
            Err(e) => warn!(error = %e, "Opus encode"),
        }
        if let Some(recording) = self.recording.as_mut()
            && let Err(e) = recording.write(&media.listener.mix())
        {
            warn!(error = %e, "recording failed; stopping it");
            self.recording = None;
        }
    }

    /// Hangs up the current call, closes the connection, finishes the recording.
    pub(crate) async fn shutdown(&mut self) {
        if let Some(call) = self.call.take() {
            match tokio::time::timeout(Duration::from_secs(3), self.client.hangup(call.id)).await {
                Ok(Ok(())) => println!("hung up call {}", call.id.0),
                Ok(Err(e)) => warn!(error = %e, "hangup failed"),
                Err(_) => warn!("hangup not answered in time"),
            }
        }
        self.client.close().await;
        if let Some(recording) = self.recording.take() {
            match recording.finish() {
                Ok(path) => info!(path = %path.display(), "recording written"),
                Err(e) => warn!(error = %e, "finishing the recording"),
            }
        }
    }
}

/// The next media event of the current call, or never.
async fn media_event(call: &mut Option<Call>) -> PeerEvent {
    match call.as_mut().and_then(|c| c.media.as_mut()) {
        Some(media) => match media.events.recv().await {
            Some(event) => event,
            // The peer stopped: nothing more will come.
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Awaits a request in the background, logging a failure.
fn spawn_request(
    what: &'static str,
    request: impl Future<Output = Result<(), ClientError>> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(e) = request.await {
            warn!(error = %e, "{what} failed");
        }
    });
}
