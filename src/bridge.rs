//! The bridge between the controller and the media plane: the only code that
//! knows both the controller's messages (`SfuCommand`, `SfuNotice`) and the
//! media plane's handle (`SfuHandle`).
//!
//! It translates and decides nothing. Each command becomes one call on the
//! handle, and each outcome or SFU event at most one notice; what to do about
//! a refusal, a failed negotiation or a removal is the controller's call
//! (it answers a `NegotiationFailed` with a `Leave`, for instance). SDP is
//! parsed here, once, into str0m's types: that is the media plane's edge.
//!
//! Commands are queued at their worker in the order the controller gave
//! them (so a Leave never overtakes its Join), and their outcomes awaited
//! together: a worker busy with a queue of joins delays nobody else's, and
//! a join it has no room for is refused at once (`overloaded`).
//!
//! It holds one id map, [`Participations`]: the controller's
//! `ParticipantKey` <-> the participant's `Session` in the SFU. The map stays
//! because the SFU places a participant (the worker that owns its room, and
//! an id unique across workers) when it joins, and a key (session + epoch)
//! does not fit that id. Letting the controller choose the SFU's id (its
//! epoch, which is unique) would save the reverse index only: commands would
//! still need the worker, events the session. Not worth coupling the SFU's
//! ids to the controller's counters.

pub mod translate;

use fleetcall_media::{Joined, ParticipantId, PolicyChange, Rights, SdpAnswer, Session, SfuError, SfuEvent, SfuHandle};
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use fleetcall_signaling::controller::{SfuCommand, SfuNotice};
use fleetcall_signaling::ids::ParticipantKey;
use fleetcall_signaling::service::SfuLink;
use tokio::sync::mpsc;
use tracing::warn;

use self::translate::{Participations, Placement, device_answer, device_offer, join_offer, room_of, to_sfu};

/// Carries the controller's commands to the SFU, in order, and the SFU's
/// answers and events back, until the controller has stopped and every
/// command it gave is applied.
pub async fn run(sfu: SfuHandle, link: SfuLink) {
    let SfuLink { mut commands, notices } = link;
    let (events, mut sfu_events) = mpsc::unbounded_channel();
    let mut bridge = Bridge { sfu, events, participations: Participations::default() };
    let mut pending = FuturesUnordered::new();
    let mut controller_gone = false;
    while !(controller_gone && pending.is_empty()) {
        let notice = tokio::select! {
            // Outcomes before events: a worker answers a command before it
            // reports anything that follows from it, and the controller must
            // hear them in that order (a join's answer before its removal).
            biased;
            Some(outcome) = pending.next() => bridge.settle(outcome),
            // Never `None`: the bridge holds a sender itself.
            Some(event) = sfu_events.recv() => bridge.translate(event),
            command = commands.recv(), if !controller_gone => match command {
                Some(command) => match bridge.queue(command).await {
                    Queued::Awaiting(outcome) => {
                        pending.push(outcome);
                        None
                    }
                    Queued::Answered(notice) => notice,
                },
                // The controller has stopped; its last commands (the Leaves
                // of a shutdown) are applied before the bridge returns.
                None => {
                    controller_gone = true;
                    None
                }
            },
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
    participations: Participations<Session>,
}

impl Placement for Session {
    fn participant(&self) -> ParticipantId {
        self.participant
    }
}

/// A command handed to the SFU, or answered without it.
enum Queued {
    Awaiting(BoxFuture<'static, Outcome>),
    Answered(Option<SfuNotice>),
}

/// What a worker answered to a queued command.
enum Outcome {
    Join { participant: ParticipantKey, session: Session, result: Result<Joined, SfuError> },
    Offer { participant: ParticipantKey, result: Result<SdpAnswer, SfuError> },
    Answer { participant: ParticipantKey, result: Result<(), SfuError> },
    Applied,
}

impl Bridge {
    /// Queues one command at the SFU; a notice at once when it never gets
    /// there (bad SDP, a full worker, a participant already gone).
    async fn queue(&mut self, command: SfuCommand) -> Queued {
        use Queued::{Answered, Awaiting};
        match command {
            SfuCommand::Join { room, participant, display_name, offer_sdp, publish, subscribe } => {
                let offer = match join_offer(participant, &offer_sdp) {
                    Ok(offer) => offer,
                    Err(refused) => return Answered(Some(refused)),
                };
                let room = room_of(room);
                let rights = Rights { publish, subscribe };
                match self.sfu.join(room, display_name.to_string(), offer, rights, self.events.clone()) {
                    Ok((session, reply)) => {
                        // Known before the worker answers, so the commands
                        // that follow find it.
                        self.participations.insert(participant, session);
                        Awaiting(Box::pin(async move { Outcome::Join { participant, session, result: reply.await } }))
                    }
                    Err(e) => Answered(Some(SfuNotice::JoinFailed { participant, error: e.to_string() })),
                }
            }
            SfuCommand::Answer { participant, sdp } => {
                let Some(session) = self.participations.session(participant) else { return Answered(None) };
                let answer = match device_answer(participant, &sdp) {
                    Ok(answer) => answer,
                    Err(refused) => return Answered(Some(refused)),
                };
                let reply = self.sfu.accept_answer(session, answer).await;
                Awaiting(Box::pin(async move { Outcome::Answer { participant, result: reply.await } }))
            }
            SfuCommand::Offer { participant, sdp } => {
                let Some(session) = self.participations.session(participant) else { return Answered(None) };
                let offer = match device_offer(participant, &sdp) {
                    Ok(offer) => offer,
                    Err(refused) => return Answered(Some(refused)),
                };
                let reply = self.sfu.accept_offer(session, offer).await;
                Awaiting(Box::pin(async move { Outcome::Offer { participant, result: reply.await } }))
            }
            SfuCommand::Leave { participant, reason } => {
                // Forgotten first: the SFU's `Removed` for it is the echo of
                // this command, not news for the controller.
                let Some(session) = self.participations.forget(participant) else { return Answered(None) };
                let reply = self.sfu.leave(session, to_sfu(reason)).await;
                // Already gone in the SFU is the outcome we want.
                Awaiting(Box::pin(async move {
                    let _ = reply.await;
                    Outcome::Applied
                }))
            }
            SfuCommand::SetSuppression { device, on } => {
                let change = PolicyChange::Device { device: device.to_string(), on };
                if let Err(e) = self.sfu.set_policy(change).await {
                    warn!(%device, error = %e, "suppression setting not applied");
                }
                Answered(None)
            }
        }
    }

    /// The notice a worker's answer becomes, if any.
    fn settle(&mut self, outcome: Outcome) -> Option<SfuNotice> {
        match outcome {
            Outcome::Join { participant, session, result } => Some(self.participations.joined(participant, session, result)),
            Outcome::Offer { participant, result } => Some(translate::offer_outcome(participant, result)),
            Outcome::Answer { participant, result } => translate::answer_outcome(participant, result),
            Outcome::Applied => None,
        }
    }

    /// The notice an SFU event becomes, if the controller needs to hear it.
    fn translate(&mut self, event: SfuEvent) -> Option<SfuNotice> {
        self.participations.translate(event)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::{Duration, Instant};

    use fleetcall_dsp::PipelineConfig;
    use fleetcall_media::{DriverConfig, SfuConfig, SfuDriver};
    use fleetcall_signaling::controller::LeaveReason;
    use fleetcall_signaling::ids::{CallId, DeviceId, Epoch, SessionId};
    use fleetcall_signaling::sdp::Sdp;
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

    impl Bridge {
        /// One command, from queueing to its notice, as `run` carries it.
        async fn apply(&mut self, command: SfuCommand) -> Option<SfuNotice> {
            match self.queue(command).await {
                Queued::Answered(notice) => notice,
                Queued::Awaiting(outcome) => {
                    let outcome = outcome.await;
                    self.settle(outcome)
                }
            }
        }
    }

    /// One worker on loopback, queueing at most `worker_queue` commands.
    fn driver(worker_queue: usize) -> SfuDriver {
        SfuDriver::start(DriverConfig {
            bind_ip: Ipv4Addr::LOCALHOST.into(),
            first_port: 0,
            workers: 1,
            advertise_ip: None,
            sfu: SfuConfig::default(),
            audio_threads: 1,
            pipeline: PipelineConfig::default(),
            worker_queue,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn the_bridge_reports_and_the_controller_decides() {
        let driver = driver(DriverConfig::DEFAULT_WORKER_QUEUE);
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

    #[tokio::test]
    async fn a_join_its_worker_has_no_room_for_is_refused_at_once_and_leaves_nothing_behind() {
        let driver = driver(1);
        let (events, _sfu_events) = mpsc::unbounded_channel();
        let mut bridge = Bridge { sfu: driver.handle(), events, participations: Participations::default() };
        let offer = offer();
        let (mut refused, mut queued) = (0, Vec::new());
        for epoch in 0..50 {
            let key = ParticipantKey { session: SessionId(1), epoch: Epoch(epoch) };
            match bridge.queue(join(key, offer.clone())).await {
                Queued::Answered(Some(SfuNotice::JoinFailed { participant, error })) => {
                    assert_eq!(participant, key);
                    assert!(error.contains("overloaded"), "{error}");
                    refused += 1;
                }
                Queued::Awaiting(outcome) => queued.push(outcome),
                Queued::Answered(other) => panic!("unexpected {other:?}"),
            }
        }
        assert!(refused > 0, "a queue of one overflowed");
        assert_eq!(bridge.participations.len(), queued.len(), "only queued joins are mapped");
        for outcome in queued {
            let outcome = outcome.await;
            assert!(matches!(bridge.settle(outcome), Some(SfuNotice::Joined { .. })));
        }
        assert_eq!(bridge.sfu.stats().await.unwrap().participants, 50 - refused);
        drop(bridge);
        tokio::task::spawn_blocking(move || driver.shutdown()).await.unwrap();
    }
}
