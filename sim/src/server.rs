//! The server, sans-IO: the controller and one SFU core joined by the
//! bridge's translation, applied in the same call instead of through the
//! media workers' queues.
//!
//! Ordering is the bridge's contract (`signaling::controller::sfu`):
//! commands are applied in the order the controller gave them, a command's
//! outcome reaches the controller before the SFU events that follow from
//! it, and events in the order the SFU produced them.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use fleetcall::bridge::translate::{self, Participations};
use fleetcall_sfu::audio::{AudioCommand, PolicyChange};
use fleetcall_sfu::{JoinRequest, Output as SfuOutput, ParticipantId, Rights, Sfu, SfuConfig};
use fleetcall_signaling::controller::{Config, Controller, Output, SfuCommand, SfuNotice};
use fleetcall_signaling::ids::ConnId;
use fleetcall_signaling::pb::{CloseReason, ServerFrame};

/// Where the SFU core listens.
pub const SFU_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 100)), 5000);

/// What the server hands the network.
#[derive(Debug)]
pub enum ToNetwork {
    /// A control frame on a connection.
    Frame { conn: ConnId, frame: ServerFrame },
    /// The connection closes after the frames queued before it.
    Close { conn: ConnId, reason: CloseReason },
    /// A media datagram from the SFU.
    Datagram { destination: SocketAddr, contents: Vec<u8> },
}

/// The controller, the SFU core and the translation between them.
#[derive(Debug)]
pub struct Server {
    /// The control plane.
    pub ctl: Controller,
    /// The media plane's core.
    pub sfu: Sfu,
    /// The bridge's id map.
    pub participations: Participations<ParticipantId>,
    next_participant: u64,
    /// The SFU's deadline, as its last drain said.
    sfu_deadline: Option<Instant>,
    notices: VecDeque<SfuNotice>,
    /// For the network.
    pub out: VecDeque<ToNetwork>,
    /// Commands and notices, for the world's trace.
    pub log: Vec<String>,
}

impl Server {
    /// A server starting at `now`.
    pub fn new(config: Config, now: Instant, seed: u64) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        let sfu_config = SfuConfig { candidates: vec![SFU_ADDR], ..SfuConfig::default() };
        Server {
            ctl: Controller::new(config, now, key).expect("the default config is valid"),
            sfu: Sfu::new(sfu_config),
            participations: Participations::default(),
            next_participant: 1,
            sfu_deadline: None,
            notices: VecDeque::new(),
            out: VecDeque::new(),
            log: Vec::new(),
        }
    }

    /// The earliest deadline of either core.
    pub fn deadline(&self) -> Option<Instant> {
        [self.ctl.poll_timeout(), self.sfu_deadline].into_iter().flatten().min()
    }

    /// Fires what is due in both cores.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.ctl.handle_timeout(now);
        if self.sfu_deadline.is_some_and(|at| at <= now) {
            self.sfu.handle_timeout(now);
        }
        self.pump(now);
    }

    /// A media datagram for the SFU.
    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, contents: &[u8]) {
        self.sfu.handle_datagram(now, source, SFU_ADDR, contents);
        self.pump(now);
    }

    /// Moves everything between the controller, the SFU and the network
    /// until both cores are quiet. Call after every input to either core.
    pub fn pump(&mut self, now: Instant) {
        loop {
            let mut moved = false;
            while let Some(output) = self.ctl.poll_output() {
                moved = true;
                match output {
                    Output::Send { conn, frame } => self.out.push_back(ToNetwork::Frame { conn, frame }),
                    Output::Close { conn, reason } => self.out.push_back(ToNetwork::Close { conn, reason }),
                    Output::Sfu(command) => {
                        self.log.push(format!("sfu command {}", describe_command(&command)));
                        if let Some(notice) = self.apply(now, command) {
                            self.notices.push_back(notice);
                        }
                        // The command's outcome first, then what followed.
                        self.drain_sfu(now);
                    }
                    other => panic!("an output the simulation does not know: {other:?}"),
                }
            }
            self.drain_sfu(now);
            while let Some(notice) = self.notices.pop_front() {
                moved = true;
                self.log.push(format!("sfu notice {}", describe_notice(&notice)));
                self.ctl.handle_sfu(now, notice);
            }
            if !moved {
                return;
            }
        }
    }

    /// One command applied to the core, as the bridge translates it.
    fn apply(&mut self, now: Instant, command: SfuCommand) -> Option<SfuNotice> {
        match command {
            SfuCommand::Join { room, participant, display_name, offer_sdp, publish, subscribe } => {
                let offer = match translate::join_offer(participant, &offer_sdp) {
                    Ok(offer) => offer,
                    Err(refused) => return Some(refused),
                };
                let id = ParticipantId(self.next_participant);
                self.next_participant += 1;
                self.participations.insert(participant, id);
                let request = JoinRequest {
                    room: translate::room_of(room),
                    participant: id,
                    name: display_name.to_string(),
                    offer,
                    rights: Rights { publish, subscribe },
                };
                let result = self.sfu.join(now, request);
                Some(self.participations.joined(participant, id, result))
            }
            SfuCommand::Answer { participant, sdp } => {
                let id = self.participations.session(participant)?;
                let answer = match translate::device_answer(participant, &sdp) {
                    Ok(answer) => answer,
                    Err(refused) => return Some(refused),
                };
                let result = self.sfu.accept_answer(now, id, answer);
                translate::answer_outcome(participant, result)
            }
            SfuCommand::Offer { participant, sdp } => {
                let id = self.participations.session(participant)?;
                let offer = match translate::device_offer(participant, &sdp) {
                    Ok(offer) => offer,
                    Err(refused) => return Some(refused),
                };
                Some(translate::offer_outcome(participant, self.sfu.accept_offer(now, id, offer)))
            }
            SfuCommand::Leave { participant, reason } => {
                let id = self.participations.forget(participant)?;
                // Already gone in the SFU is the outcome we want.
                let _ = self.sfu.leave(now, id, translate::to_sfu(reason));
                None
            }
            SfuCommand::SetSuppression { device, on } => {
                self.sfu.set_policy(PolicyChange::Device { device: device.to_string(), on });
                None
            }
        }
    }

    fn drain_sfu(&mut self, now: Instant) {
        loop {
            match self.sfu.poll_output() {
                SfuOutput::Transmit(t) => self.out.push_back(ToNetwork::Datagram { destination: t.destination, contents: t.contents }),
                SfuOutput::Event(event) => {
                    if let Some(notice) = self.participations.translate(event) {
                        self.notices.push_back(notice);
                    }
                }
                // Suppression is off in the simulation; a pipeline that
                // drops the packet still answers, so the track's queue
                // bound counts it.
                SfuOutput::Audio(AudioCommand::Process { track, .. }) => self.sfu.handle_processed(now, track, []),
                SfuOutput::Audio(_) => {}
                SfuOutput::Timeout(at) => {
                    self.sfu_deadline = at;
                    return;
                }
            }
        }
    }
}

fn describe_command(command: &SfuCommand) -> String {
    match command {
        SfuCommand::Join { room, participant, display_name, .. } => format!("join {participant} ({display_name}) to {room}"),
        SfuCommand::Answer { participant, .. } => format!("answer of {participant}"),
        SfuCommand::Offer { participant, .. } => format!("offer of {participant}"),
        SfuCommand::Leave { participant, reason } => format!("leave {participant} ({reason:?})"),
        SfuCommand::SetSuppression { device, on } => format!("suppression {device} {on:?}"),
    }
}

fn describe_notice(notice: &SfuNotice) -> String {
    match notice {
        SfuNotice::Joined { participant, media_id, .. } => format!("joined {participant} as {media_id}"),
        SfuNotice::JoinFailed { participant, error } => format!("join failed {participant}: {error}"),
        SfuNotice::Offer { participant, .. } => format!("offer to {participant}"),
        SfuNotice::Answer { participant, .. } => format!("answer to {participant}"),
        SfuNotice::Connected { participant } => format!("connected {participant}"),
        SfuNotice::ActiveSpeakers { participant, speakers } => format!("speakers for {participant}: {speakers:?}"),
        SfuNotice::NegotiationFailed { participant, error } => format!("negotiation failed {participant}: {error}"),
        SfuNotice::Removed { participant, reason } => format!("removed {participant} ({reason:?})"),
    }
}
