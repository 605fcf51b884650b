//! The bridge between the controller and the media plane: the only code that
//! knows both the controller's messages (`SfuCommand`, `SfuNotice`) and the
//! media plane's handle (`SfuHandle`).
//!
//! It translates and decides nothing. Each command becomes one call on the
//! handle, and each result or SFU event at most one notice; what to do about
//! a refusal, a failed negotiation or a removal is the controller's call
//! (it answers a `NegotiationFailed` with a `Leave`, for instance). SDP is
//! parsed here, once, into str0m's types: that is the media plane's edge.
//!
//! It holds one id map, [`Participations`]: the controller's
//! `ParticipantKey` <-> the participant's `Session` in the SFU. The map stays
//! because the SFU places a participant (the worker that owns its room, and
//! an id unique across workers) when it joins, and a key (session + epoch)
//! does not fit that id. Letting the controller choose the SFU's id (its
//! epoch, which is unique) would save the reverse index only: commands would
//! still need the worker, events the session. Not worth coupling the SFU's
//! ids to the controller's counters.

use std::collections::HashMap;

use fleetcall_media::{
    LeaveReason as SfuLeaveReason, ParticipantId, PolicyChange, Rights, RoomId, SdpAnswer, SdpOffer, Session, SfuEvent,
    SfuHandle,
};
use fleetcall_signaling::controller::{LeaveReason, RemovalReason, SfuCommand, SfuNotice};
use fleetcall_signaling::ids::ParticipantKey;
use fleetcall_signaling::sdp::Sdp;
use fleetcall_signaling::service::SfuLink;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Carries the controller's commands to the SFU, in order, and the SFU's
/// answers and events back, until the controller has stopped and every
/// command it gave is applied.
pub async fn run(sfu: SfuHandle, link: SfuLink) {
    let SfuLink { mut commands, notices } = link;
    let (events, mut sfu_events) = mpsc::unbounded_channel();
    let mut bridge = Bridge { sfu, events, participations: Participations::default() };
    loop {
        let notice = tokio::select! {
            // One command at a time, awaited: a Leave never overtakes its Join.
            command = commands.recv() => match command {
                Some(command) => bridge.apply(command).await,
                // The controller has stopped, and its last commands (the
                // Leaves of a shutdown) are applied.
                None => return,
            },
            // Never `None`: the bridge holds a sender itself.
            Some(event) = sfu_events.recv() => bridge.translate(event),
        };
        if let Some(notice) = notice {
            // Fails only once the controller has stopped: nobody listens
            // then, and the commands it left still get applied.
            let _ = notices.send(notice).await;
        }
    }
}

struct Bridge {
    sfu: SfuHandle,
    /// Given to the SFU with every join: its events come back here.
    events: mpsc::UnboundedSender<SfuEvent>,
    participations: Participations,
}

impl Bridge {
    /// Applies one command; the notice that answers it, if any.
    async fn apply(&mut self, command: SfuCommand) -> Option<SfuNotice> {
        match command {
            SfuCommand::Join { room, participant, display_name, offer_sdp, publish, subscribe } => {
                let offer = match SdpOffer::from_sdp_string(offer_sdp.as_str()) {
                    Ok(offer) => offer,
                    Err(e) => return Some(SfuNotice::JoinFailed { participant, error: format!("invalid SDP offer: {e}") }),
                };
                // The SFU's room namespace is the controller's call ids.
                let room = RoomId(format!("call-{}", room.0));
                let rights = Rights { publish, subscribe };
                match self.sfu.join(room, display_name.to_string(), offer, rights, self.events.clone()).await {
                    Ok((session, joined)) => {
                        debug!(%participant, sfu_participant = %session.participant, "joined the SFU");
                        self.participations.insert(participant, session);
                        let answer_sdp = from_sfu(joined.answer.to_sdp_string());
                        Some(SfuNotice::Joined { participant, answer_sdp, media_id: session.participant.0 })
                    }
                    Err(e) => Some(SfuNotice::JoinFailed { participant, error: e.to_string() }),
                }
            }
            SfuCommand::Answer { participant, sdp } => {
                let session = self.participations.session(participant)?;
                let answer = match SdpAnswer::from_sdp_string(sdp.as_str()) {
                    Ok(answer) => answer,
                    Err(e) => return Some(SfuNotice::NegotiationFailed { participant, error: format!("invalid SDP answer: {e}") }),
                };
                // An answer the SFU parsed but cannot apply makes it remove
                // the participant, which it reports itself (`Removed`); the
                // other refusals (gone already, no offer pending) change
                // nothing.
                if let Err(e) = self.sfu.accept_answer(session, answer).await {
                    debug!(%participant, error = %e, "answer refused");
                }
                None
            }
            SfuCommand::Offer { participant, sdp } => {
                let session = self.participations.session(participant)?;
                let offer = match SdpOffer::from_sdp_string(sdp.as_str()) {
                    Ok(offer) => offer,
                    Err(e) => return Some(SfuNotice::NegotiationFailed { participant, error: format!("invalid SDP offer: {e}") }),
                };
                match self.sfu.accept_offer(session, offer).await {
                    Ok(answer) => Some(SfuNotice::Answer { participant, sdp: from_sfu(answer.to_sdp_string()) }),
                    Err(e) => Some(SfuNotice::NegotiationFailed { participant, error: e.to_string() }),
                }
            }
            SfuCommand::Leave { participant, reason } => {
                // Forgotten first: the SFU's `Removed` for it is the echo of
                // this command, not news for the controller.
                let session = self.participations.forget(participant)?;
                // Already gone in the SFU is the outcome we want.
                let _ = self.sfu.leave(session, to_sfu(reason)).await;
                None
            }
            SfuCommand::SetSuppression { device, on } => {
                let change = PolicyChange::Device { device: device.to_string(), on };
                if let Err(e) = self.sfu.set_policy(change).await {
                    warn!(%device, error = %e, "suppression setting not applied");
                }
                None
            }
        }
    }

    /// The notice an SFU event becomes, if the controller needs to hear it.
    fn translate(&mut self, event: SfuEvent) -> Option<SfuNotice> {
        match event {
            SfuEvent::Offer { participant, offer } => {
                let participant = self.participations.key(participant)?;
                Some(SfuNotice::Offer { participant, sdp: from_sfu(offer.to_sdp_string()) })
            }
            SfuEvent::Connected { participant } => Some(SfuNotice::Connected { participant: self.participations.key(participant)? }),
            SfuEvent::ActiveSpeakers { to, speakers } => {
                let participant = self.participations.key(to)?;
                // Speakers no longer mapped are leaving: not worth naming.
                let speakers = speakers.iter().filter_map(|s| self.participations.key(*s)).collect();
                Some(SfuNotice::ActiveSpeakers { participant, speakers })
            }
            SfuEvent::Removed { participant, reason } => {
                let key = self.participations.forget_id(participant)?;
                info!(%key, reason = reason.as_str(), "SFU removed a participant");
                Some(SfuNotice::Removed { participant: key, reason: from_sfu_reason(reason) })
            }
            // Membership is the controller's business; it tells devices itself.
            _ => None,
        }
    }
}

/// The controller's leave reason as the SFU counts it.
fn to_sfu(reason: LeaveReason) -> SfuLeaveReason {
    match reason {
        LeaveReason::Requested => SfuLeaveReason::Requested,
        LeaveReason::SignalingClosed => SfuLeaveReason::SignalingClosed,
        LeaveReason::NegotiationFailed => SfuLeaveReason::NegotiationFailed,
        LeaveReason::Shutdown => SfuLeaveReason::Shutdown,
    }
}

/// Why the SFU removed a participant, as the controller hears it.
fn from_sfu_reason(reason: SfuLeaveReason) -> RemovalReason {
    match reason {
        SfuLeaveReason::IceTimeout => RemovalReason::IceTimeout,
        SfuLeaveReason::NegotiationFailed => RemovalReason::NegotiationFailed,
        SfuLeaveReason::Shutdown => RemovalReason::Shutdown,
        SfuLeaveReason::Closed => RemovalReason::Closed,
        // Only a Leave removes for these, and a participant is forgotten
        // before its Leave is applied, so they never reach here. A reason the
        // SFU gains later still means the participant is gone: reported as
        // its connection closing.
        _ => RemovalReason::Closed,
    }
}

/// An SDP the SFU wrote.
fn from_sfu(text: String) -> Sdp {
    // str0m writes at least the `v=` line.
    Sdp::new(text).expect("the SFU's SDP is never empty")
}

/// The one id map: each participation the controller names by its
/// `ParticipantKey`, and its `Session` in the SFU. Indexed both ways
/// (commands name keys, SFU events name SFU ids); both indexes change only
/// together, here.
#[derive(Debug, Default)]
struct Participations {
    sessions: HashMap<ParticipantKey, Session>,
    keys: HashMap<ParticipantId, ParticipantKey>,
}

impl Participations {
    fn insert(&mut self, key: ParticipantKey, session: Session) {
        self.keys.insert(session.participant, key);
        self.sessions.insert(key, session);
    }

    fn session(&self, key: ParticipantKey) -> Option<Session> {
        self.sessions.get(&key).copied()
    }

    fn key(&self, id: ParticipantId) -> Option<ParticipantKey> {
        self.keys.get(&id).copied()
    }

    fn forget(&mut self, key: ParticipantKey) -> Option<Session> {
        let session = self.sessions.remove(&key)?;
        self.keys.remove(&session.participant);
        Some(session)
    }

    fn forget_id(&mut self, id: ParticipantId) -> Option<ParticipantKey> {
        let key = self.keys.remove(&id)?;
        self.sessions.remove(&key);
        Some(key)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::{Duration, Instant};

    use fleetcall_dsp::PipelineConfig;
    use fleetcall_media::{DriverConfig, SfuConfig, SfuDriver};
    use fleetcall_signaling::ids::{CallId, DeviceId, Epoch, SessionId};
    use str0m::Rtc;
    use str0m::media::{Direction, MediaKind};

    use super::*;

    fn offer() -> Sdp {
        let mut rtc = Rtc::new(Instant::now());
        let mut change = rtc.sdp_api();
        change.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let (offer, _pending) = change.apply().expect("an offer with one audio track");
        Sdp::new(offer.to_sdp_string()).unwrap()
    }

    fn join(participant: ParticipantKey, offer_sdp: Sdp) -> SfuCommand {
        SfuCommand::Join {
            room: CallId(1),
            participant,
            display_name: DeviceId::new("bed-12").unwrap(),
            offer_sdp,
            publish: true,
            subscribe: true,
        }
    }

    #[tokio::test]
    async fn the_bridge_reports_and_the_controller_decides() {
        let driver = SfuDriver::start(DriverConfig {
            bind_ip: Ipv4Addr::LOCALHOST.into(),
            first_port: 0,
            workers: 1,
            advertise_ip: None,
            sfu: SfuConfig::default(),
            audio_threads: 1,
            pipeline: PipelineConfig::default(),
        })
        .unwrap();
        let (events, mut sfu_events) = mpsc::unbounded_channel();
        let mut bridge = Bridge { sfu: driver.handle(), events, participations: Participations::default() };
        let key = ParticipantKey { session: SessionId(7), epoch: Epoch(3) };

        // An offer the SFU cannot parse is refused, and nothing is created.
        let notice = bridge.apply(join(key, Sdp::new("not sdp").unwrap())).await;
        assert!(matches!(&notice, Some(SfuNotice::JoinFailed { participant, error }) if *participant == key && error.starts_with("invalid SDP offer")), "{notice:?}");
        assert_eq!(bridge.sfu.stats().await.unwrap().participants, 0);

        let Some(SfuNotice::Joined { participant, media_id, .. }) = bridge.apply(join(key, offer())).await else { panic!("not joined") };
        assert_eq!(participant, key);
        assert_eq!(bridge.participations.session(key).map(|s| s.participant.0), Some(media_id));

        // An answer it cannot parse is reported; the participant stays until
        // the controller says otherwise.
        let notice = bridge.apply(SfuCommand::Answer { participant: key, sdp: Sdp::new("v=0 answer").unwrap() }).await;
        assert!(matches!(&notice, Some(SfuNotice::NegotiationFailed { participant, error }) if *participant == key && error.starts_with("invalid SDP answer")), "{notice:?}");
        assert_eq!(bridge.sfu.stats().await.unwrap().participants, 1);

        // The controller's reason reaches the SFU as given.
        assert_eq!(bridge.apply(SfuCommand::Leave { participant: key, reason: LeaveReason::NegotiationFailed }).await, None);
        let stats = bridge.sfu.stats().await.unwrap();
        assert_eq!(stats.participants, 0);
        assert_eq!(stats.removed.get("negotiation_failed"), Some(&1), "{:?}", stats.removed);
        // The SFU's own report of that removal is not news for the controller.
        let echo = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match sfu_events.recv().await {
                    Some(event @ SfuEvent::Removed { .. }) => break event,
                    Some(_) => continue,
                    None => panic!("events ended"),
                }
            }
        })
        .await
        .expect("the SFU reports the removal");
        assert_eq!(bridge.translate(echo), None);
        // Commands for a participant the SFU no longer has change nothing.
        assert_eq!(bridge.apply(SfuCommand::Leave { participant: key, reason: LeaveReason::Requested }).await, None);
        assert_eq!(bridge.apply(SfuCommand::Answer { participant: key, sdp: Sdp::new("v=0").unwrap() }).await, None);
        drop(bridge);
        tokio::task::spawn_blocking(move || driver.shutdown()).await.unwrap();
    }

    #[test]
    fn reasons_keep_their_names_across() {
        for (ours, theirs) in [
            (LeaveReason::Requested, "requested"),
            (LeaveReason::SignalingClosed, "signaling_closed"),
            (LeaveReason::NegotiationFailed, "negotiation_failed"),
            (LeaveReason::Shutdown, "shutdown"),
        ] {
            assert_eq!(to_sfu(ours).as_str(), theirs);
        }
        for (theirs, ours) in [
            (SfuLeaveReason::IceTimeout, RemovalReason::IceTimeout),
            (SfuLeaveReason::Closed, RemovalReason::Closed),
            (SfuLeaveReason::NegotiationFailed, RemovalReason::NegotiationFailed),
            (SfuLeaveReason::Shutdown, RemovalReason::Shutdown),
        ] {
            assert_eq!(from_sfu_reason(theirs), ours);
        }
    }
}
