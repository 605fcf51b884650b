//! Messages on a registered device's socket, into the sans-IO controller the
//! way the transports hand them over (`ws_device.rs`: text -> `decode_json`
//! -> `handle_frame`, or `handle_wire_error`; `quic.rs`: bytes ->
//! `FrameDecoder` -> the same two).
//!
//! Set-up per input (a controller costs microseconds, and a fresh one keeps
//! every crash reproducible from its input alone): a bystander device in a
//! named room with connected media, and the fuzzed device registered with a
//! grant for every room. The fuzzed device's records:
//!
//! | tag % 6 | record |
//! | --- | --- |
//! | 0 | a WebSocket text message (not UTF-8: the socket closes, as tungstenite does) |
//! | 1 | a WebSocket binary message |
//! | 2 | bytes on its QUIC stream |
//! | 3 | time passes: `payload[0]` x 10 ms, the bystander heartbeating |
//! | 4 | its connection drops and a new one comes up (no hello yet) |
//! | 5 | the SFU removes its newest participant |
//!
//! A fake SFU answers every join and offer and connects media at once.
//! After every record the controller's own audit must be clean and every
//! frame it queued must be encodable; at the end the bystander must still
//! be registered, online, in its live call, and answered at once.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fleetcall_signaling::Error;
use fleetcall_signaling::controller::{Config, Controller, Output, Reachability, RemovalReason, SfuCommand, SfuNotice};
use fleetcall_signaling::grants::{Credential, CredentialKey, Grant, RoomPattern};
use fleetcall_signaling::ids::{CallId, ConnId, DeviceId, ParticipantKey};
use fleetcall_signaling::pb::{self, ClientFrame, client_frame::Kind as C, server_frame::Kind as S};
use fleetcall_signaling::sdp::Sdp;
use fleetcall_signaling::wire::{FrameDecoder, decode_json, encode_frame_to_vec, encode_json};

use crate::records;

/// Unix seconds the credentials are stated in.
const UNIX_NOW: u64 = 1_800_000_000;
const BYSTANDER: ConnId = ConnId(1);
const FIRST_FUZZED: ConnId = ConnId(2);
/// The bystander's named room.
pub const ROOM: &str = "ward-3";

/// One clock for the process: the controller only compares instants.
fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn credential(identity: &str) -> Credential {
    Credential {
        identity: DeviceId::new(identity).expect("valid id"),
        subject: identity.to_owned(),
        key: CredentialKey::digest(identity.as_bytes()),
        issued_at: UNIX_NOW - 60,
        expires_at: UNIX_NOW + 86_400,
        grant: Grant::device(vec![RoomPattern::parse("*").expect("valid pattern")]),
    }
}

/// The controller and what stands around it.
struct World {
    ctl: Controller,
    now: Instant,
    /// The fuzzed device's connection now, and its QUIC decoder.
    conn: ConnId,
    decoder: FrameDecoder,
    buffer: BytesMut,
    closed: bool,
    next_conn: u64,
    /// The bystander's call, and every frame it got.
    bystander_call: Option<CallId>,
    bystander_inbox: Vec<pb::ServerFrame>,
    bystander_hb: u64,
    /// Fuzzed device's participants, newest last.
    fuzzed_legs: Vec<ParticipantKey>,
    bystander_legs: Vec<ParticipantKey>,
    media_id: u64,
}

impl World {
    fn new() -> World {
        let now = start();
        let ctl = Controller::new(Config::default(), now, [7; 32]).expect("default config is valid");
        let mut world = World {
            ctl,
            now,
            conn: FIRST_FUZZED,
            decoder: FrameDecoder::new(),
            buffer: BytesMut::new(),
            closed: false,
            next_conn: FIRST_FUZZED.0 + 1,
            bystander_call: None,
            bystander_inbox: Vec::new(),
            bystander_hb: 0,
            fuzzed_legs: Vec::new(),
            bystander_legs: Vec::new(),
            media_id: 1,
        };
        world.ctl.handle_connection_up(now, UNIX_NOW, BYSTANDER, credential("bystander"));
        world.bystander(0, C::Hello(hello()));
        world.bystander(1, C::RoomJoin(pb::RoomJoin { room: ROOM.into() }));
        let call = world
            .bystander_inbox
            .iter()
            .find_map(|f| match &f.kind {
                Some(S::Ack(ack)) if f.reply_to == 1 => Some(ack.call_id),
                _ => None,
            })
            .expect("the bystander's room join is acked");
        world.bystander_call = Some(CallId(call));
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendrecv\r\n".to_owned();
        world.bystander(2, C::SdpOffer(pb::SdpOffer { call_id: call, sdp, ..Default::default() }));
        assert!(!world.bystander_legs.is_empty(), "the bystander's offer reaches the SFU");

        world.ctl.handle_connection_up(now, UNIX_NOW, FIRST_FUZZED, credential("fuzzed"));
        world.fuzzed(ClientFrame { op_id: 0, kind: Some(C::Hello(hello())) });
        world.check();
        world
    }

    fn bystander(&mut self, op_id: u64, kind: C) {
        self.ctl.handle_frame(self.now, BYSTANDER, ClientFrame { op_id, kind: Some(kind) });
        self.drain();
    }

    fn fuzzed(&mut self, frame: ClientFrame) {
        self.ctl.handle_frame(self.now, self.conn, frame);
        self.drain();
    }

    fn wire_error(&mut self, error: &Error) {
        self.ctl.handle_wire_error(self.now, self.conn, error);
        self.drain();
    }

    fn connection_down(&mut self, detail: &str) {
        self.ctl.handle_connection_down(self.now, self.conn, detail);
        self.closed = true;
        self.drain();
    }

    /// Carries every output: frames to their devices, commands to the fake
    /// SFU, and what the bystander and the SFU answer, until all is quiet.
    fn drain(&mut self) {
        loop {
            let mut notices = Vec::new();
            let mut acks = Vec::new();
            while let Some(output) = self.ctl.poll_output() {
                match output {
                    Output::Send { conn, frame } => {
                        // The writers drop a frame they cannot encode: the
                        // controller must never build one.
                        encode_frame_to_vec(&frame).unwrap_or_else(|e| panic!("unencodable frame for {conn}: {e}"));
                        encode_json(&frame).unwrap_or_else(|e| panic!("frame for {conn} has no JSON form: {e}"));
                        if conn == BYSTANDER {
                            if let Some(S::Heartbeat(hb)) = &frame.kind {
                                acks.push(pb::HeartbeatAck { seq: hb.seq, echo_sent_at_ms: hb.sent_at_ms });
                            }
                            self.bystander_inbox.push(frame);
                        }
                    }
                    Output::Close { conn, reason } => {
                        assert_ne!(conn, BYSTANDER, "the bystander was closed ({reason:?}) by another device's input");
                        if conn == self.conn {
                            self.closed = true;
                        }
                    }
                    Output::Sfu(command) => notices.extend(self.sfu(command)),
                    _ => {}
                }
            }
            if acks.is_empty() && notices.is_empty() {
                return;
            }
            for ack in acks {
                self.ctl.handle_frame(self.now, BYSTANDER, ClientFrame { op_id: 0, kind: Some(C::HeartbeatAck(ack)) });
            }
            for notice in notices {
                self.ctl.handle_sfu(self.now, notice);
            }
        }
    }

    /// The fake SFU: joins and offers succeed, media connects at once.
    fn sfu(&mut self, command: SfuCommand) -> Vec<SfuNotice> {
        let answer = || Sdp::new("v=0\r\ns=fake answer\r\n").expect("not empty");
        match command {
            SfuCommand::Join { participant, display_name, .. } => {
                if display_name.as_str() == "bystander" {
                    self.bystander_legs.push(participant);
                } else {
                    self.fuzzed_legs.push(participant);
                }
                self.media_id += 1;
                vec![
                    SfuNotice::Joined { participant, answer_sdp: answer(), media_id: self.media_id },
                    SfuNotice::Connected { participant },
                ]
            }
            SfuCommand::Offer { participant, .. } => vec![SfuNotice::Answer { participant, sdp: answer() }],
            SfuCommand::Leave { participant, .. } => {
                self.fuzzed_legs.retain(|p| *p != participant);
                self.bystander_legs.retain(|p| *p != participant);
                Vec::new()
            }
            SfuCommand::Answer { .. } | SfuCommand::SetSuppression { .. } => Vec::new(),
        }
    }

    /// Time passes in steps the bystander's heartbeats keep up with.
    fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        while self.now < end {
            self.now = end.min(self.now + Duration::from_millis(500));
            self.bystander_hb += 1;
            let hb = pb::Heartbeat { seq: self.bystander_hb, sent_at_ms: 0, ack_seq: 0 };
            self.ctl.handle_frame(self.now, BYSTANDER, ClientFrame { op_id: 0, kind: Some(C::Heartbeat(hb)) });
            self.ctl.handle_timeout(self.now);
            self.drain();
        }
    }

    fn check(&self) {
        let bad = self.ctl.audit(self.now);
        assert!(bad.is_empty(), "controller invariants broken: {bad:?}");
    }

    /// The bystander lost nothing.
    fn check_bystander(&mut self) {
        let id = DeviceId::new("bystander").expect("valid id");
        let device = self.ctl.device(&id).expect("the bystander is still known");
        assert_eq!(device.reachability, Reachability::Online, "bystander: {device:?}");
        let call = self.bystander_call.expect("set up");
        assert_eq!(device.call, Some(call), "the bystander was taken out of its call: {device:?}");
        let snapshot = self.ctl.call(call).expect("the bystander's call exists");
        assert!(snapshot.end_reason.is_none(), "the bystander's call ended: {snapshot:?}");
        assert!(!self.bystander_legs.is_empty(), "the bystander's media was removed");
        let before = self.bystander_inbox.len();
        self.bystander_hb += 1;
        let hb = pb::Heartbeat { seq: self.bystander_hb, sent_at_ms: 0, ack_seq: 0 };
        self.bystander(0, C::Heartbeat(hb));
        let acked = self.bystander_inbox[before..].iter().any(|f| matches!(&f.kind, Some(S::HeartbeatAck(a)) if a.seq == self.bystander_hb));
        assert!(acked, "the bystander's heartbeat was not answered");
    }
}

fn hello() -> pb::Hello {
    pb::Hello { min_version: 1, max_version: 1, software_version: "fuzz".into(), resume: None }
}

/// Runs one input (see the module docs for the records).
pub fn run(data: &[u8]) {
    let mut world = World::new();
    for (tag, payload) in records::split(data).take(256) {
        match tag % 6 {
            0 => match std::str::from_utf8(payload) {
                Ok(text) => match decode_json::<ClientFrame>(text) {
                    Ok(frame) => world.fuzzed(frame),
                    Err(error) => world.wire_error(&error),
                },
                Err(_) => world.connection_down("invalid UTF-8 in a text message"),
            },
            1 => {
                let io = std::io::Error::other("binary frames are not part of the protocol");
                world.wire_error(&Error::MalformedJson(serde_json::Error::io(io)));
            }
            2 => {
                world.buffer.extend_from_slice(payload);
                loop {
                    match world.decoder.decode::<ClientFrame>(&mut world.buffer) {
                        Ok(Some(frame)) => world.fuzzed(frame),
                        Ok(None) => break,
                        Err(error) => {
                            let fatal = error.is_fatal();
                            world.wire_error(&error);
                            if fatal {
                                world.connection_down(&error.to_string());
                                break;
                            }
                        }
                    }
                }
            }
            3 => world.advance(Duration::from_millis(10 * u64::from(payload.first().copied().unwrap_or(1)))),
            4 => {
                if !world.closed {
                    world.connection_down("connection lost");
                }
                world.conn = ConnId(world.next_conn);
                world.next_conn += 1;
                world.decoder = FrameDecoder::new();
                world.buffer.clear();
                world.closed = false;
                world.ctl.handle_connection_up(world.now, UNIX_NOW, world.conn, credential("fuzzed"));
                world.drain();
            }
            _ => {
                if let Some(participant) = world.fuzzed_legs.pop() {
                    world.ctl.handle_sfu(world.now, SfuNotice::Removed { participant, reason: RemovalReason::IceTimeout });
                    world.drain();
                }
            }
        }
        world.check();
    }
    world.check_bystander();
}
