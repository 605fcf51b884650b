//! A small virtual-time network around one SFU core with real media peers
//! (`fleetcall_peer::Peer`, the device side every SFU test uses), for the
//! SDP and datagram targets. Built once per thread and kept: joining and
//! connecting costs milliseconds, an input microseconds.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fleetcall_peer::{AudioFrame, DtlsIdentity, Output, Peer, PeerConfig, PeerEvent};
use fleetcall_sfu::{JoinRequest, Output as SfuOutput, ParticipantId, Rights, RoomId, SdpAnswer, SdpOffer, Sfu, SfuConfig, SfuEvent};

/// The SFU's socket.
pub const SFU_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 100)), 5000);
/// The room every stage client is in.
pub const ROOM: &str = "fuzz-room";

/// One media peer in the room.
pub struct Client {
    pub addr: SocketAddr,
    pub peer: Peer,
    pub participant: ParticipantId,
    /// SRTP packets (not RTCP) the SFU sent this client since the counter
    /// was reset.
    pub received: u64,
}

/// The network.
pub struct Stage {
    pub sfu: Sfu,
    pub identity: DtlsIdentity,
    pub now: Instant,
    pub clients: Vec<Client>,
    next_participant: u64,
    wire: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// Server offers to participants that are not stage clients (stage
    /// clients answer at once; the SDP target answers these itself).
    pub offers: Vec<(ParticipantId, SdpOffer)>,
    /// Participants the SFU removed on its own.
    pub removed: Vec<ParticipantId>,
    /// Every client -> SFU datagram, when set (seed capture).
    pub capture: Option<Vec<Vec<u8>>>,
    frame_no: u8,
}

impl Stage {
    /// An SFU core and no clients.
    pub fn new() -> Stage {
        let config = SfuConfig { candidates: vec![SFU_ADDR], ..SfuConfig::default() };
        Stage {
            sfu: Sfu::new(config),
            identity: DtlsIdentity::generate().expect("DTLS identity"),
            now: Instant::now(),
            clients: Vec::new(),
            next_participant: 1,
            wire: VecDeque::new(),
            offers: Vec::new(),
            removed: Vec::new(),
            capture: None,
            frame_no: 0,
        }
    }

    /// A fresh participant id (never reused, as the driver's).
    pub fn next_id(&mut self) -> ParticipantId {
        let id = ParticipantId(self.next_participant);
        self.next_participant += 1;
        id
    }

    /// A new peer at `10.0.0.<n>` and its join offer, not sent anywhere.
    pub fn offer_from_new_peer(&mut self, n: u8) -> (Peer, String, SocketAddr) {
        let addr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, n)), 4000 + u16::from(n));
        let mut peer = Peer::new(self.now, addr, &self.identity, PeerConfig::default()).expect("peer");
        let offer = peer.create_offer(self.now).expect("offer");
        (peer, offer, addr)
    }

    /// A client joins [`ROOM`] publishing one audio track and connects.
    pub fn join_client(&mut self) -> usize {
        let n = 1 + self.clients.len() as u8;
        let (mut peer, offer, addr) = self.offer_from_new_peer(n);
        let participant = self.next_id();
        let request = JoinRequest {
            room: RoomId::from(ROOM),
            participant,
            name: format!("client-{n}"),
            offer: SdpOffer::from_sdp_string(&offer).expect("the peer's offer parses"),
            rights: Rights::ALL,
        };
        let joined = self.sfu.join(self.now, request).expect("join accepted");
        peer.accept_answer(self.now, &joined.answer.to_sdp_string()).expect("answer accepted");
        self.clients.push(Client { addr, peer, participant, received: 0 });
        let i = self.clients.len() - 1;
        self.drain_client(i);
        self.pump();
        let connected = self.run_until(Duration::from_secs(5), |s| s.clients[i].peer.is_connected());
        assert!(connected, "stage client {i} connects");
        i
    }

    /// Advances virtual time, serving every deadline, for `duration`.
    pub fn run(&mut self, duration: Duration) {
        let end = self.now + duration;
        while self.now < end {
            self.now = end.min(self.now + Duration::from_millis(5));
            self.sfu.handle_timeout(self.now);
            for i in 0..self.clients.len() {
                self.clients[i].peer.handle_timeout(self.now);
                self.drain_client(i);
            }
            self.pump();
        }
    }

    /// Runs until `done` or `limit`; whether `done` held.
    pub fn run_until(&mut self, limit: Duration, done: impl Fn(&Stage) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            if done(self) {
                return true;
            }
            self.run(Duration::from_millis(10));
        }
        done(self)
    }

    /// Drains the SFU and moves every datagram until nothing moves.
    pub fn pump(&mut self) {
        loop {
            let mut moved = self.drain_sfu();
            while let Some((from, to, bytes)) = self.wire.pop_front() {
                moved = true;
                if to == SFU_ADDR {
                    if let Some(capture) = &mut self.capture {
                        capture.push(bytes.clone());
                    }
                    self.sfu.handle_datagram(self.now, from, to, &bytes);
                    self.drain_sfu();
                    continue;
                }
                let Some(i) = self.clients.iter().position(|c| c.addr == to) else { continue };
                if is_rtp(&bytes) {
                    self.clients[i].received += 1;
                }
                self.clients[i].peer.handle_datagram(self.now, from, &bytes);
                self.drain_client(i);
            }
            if !moved {
                return;
            }
        }
    }

    /// Drains the SFU's outputs to its timeout; whether there were any.
    pub fn drain_sfu(&mut self) -> bool {
        let mut any = false;
        loop {
            match self.sfu.poll_output() {
                SfuOutput::Transmit(t) => self.wire.push_back((t.source, t.destination, t.contents)),
                SfuOutput::Event(SfuEvent::Offer { participant, offer }) => self.server_offer(participant, offer),
                SfuOutput::Event(SfuEvent::Removed { participant, .. }) => self.removed.push(participant),
                SfuOutput::Event(_) | SfuOutput::Audio(_) => {}
                SfuOutput::Timeout(_) => return any,
            }
            any = true;
        }
    }

    fn server_offer(&mut self, participant: ParticipantId, offer: SdpOffer) {
        let Some(i) = self.clients.iter().position(|c| c.participant == participant) else {
            self.offers.push((participant, offer));
            return;
        };
        let answer = self.clients[i].peer.accept_offer(self.now, &offer.to_sdp_string()).expect("stage peers answer");
        self.drain_client(i);
        let answer = SdpAnswer::from_sdp_string(&answer).expect("the peer's answer parses");
        self.sfu.accept_answer(self.now, participant, answer).expect("the SFU takes a stage peer's answer");
    }

    fn drain_client(&mut self, i: usize) {
        let c = &mut self.clients[i];
        loop {
            match c.peer.poll_output() {
                Output::Timeout(_) => return,
                Output::Transmit(t) => self.wire.push_back((c.addr, t.destination, t.contents)),
                Output::Event(PeerEvent::Failed(reason)) => panic!("stage client {i} failed: {reason}"),
                Output::Event(_) => {}
            }
        }
    }

    /// Client `from` sends one audio frame; how many SRTP packets reached
    /// client `to` in the 20 ms after (str0m paces its sends on timeouts).
    pub fn send_frame(&mut self, from: usize, to: usize) -> u64 {
        self.frame_no = self.frame_no.wrapping_add(1);
        self.clients[to].received = 0;
        let payload = vec![0x48, self.frame_no, 0xde, 0xad];
        self.clients[from].peer.send_audio(self.now, &AudioFrame { payload: Some(payload.into()), level: None });
        self.drain_client(from);
        self.pump();
        self.run(Duration::from_millis(20));
        self.clients[to].received
    }
}

/// RTP, not RTCP (RFC 5761 demultiplexing by payload type).
fn is_rtp(datagram: &[u8]) -> bool {
    matches!(datagram, [128..=191, pt, ..] if !(192..=223).contains(pt))
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("addr", &self.addr).field("participant", &self.participant).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage").field("clients", &self.clients).field("sfu", &self.sfu).finish_non_exhaustive()
    }
}

impl Default for Stage {
    fn default() -> Self {
        Self::new()
    }
}
