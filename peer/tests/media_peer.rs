//! The media peer ([`fleetcall_peer::Peer`], frame mode) against the SFU
//! core, in virtual time: join offers, renegotiation answers, frames
//! delivered per remote stream, and garbage on its socket.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fleetcall_peer::{DtlsIdentity, FRAME, Output, Peer as PeerCore, PeerConfig, PeerEvent as MediaEvent};
use fleetcall_sfu::{JoinRequest, Output as SfuOutput, ParticipantId, Rights, RoomId, SdpAnswer, SdpOffer, Sfu, SfuConfig, SfuEvent};

const SFU_ADDR: &str = "10.0.0.100:5000";

struct Peer {
    core: PeerCore,
    id: ParticipantId,
    events: Vec<MediaEvent>,
}

struct Net {
    sfu: Sfu,
    /// The core's deadline, from its last `poll_output`.
    sfu_timeout: Option<Instant>,
    sfu_addr: SocketAddr,
    peers: Vec<Peer>,
    now: Instant,
    wire: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
}

impl Net {
    fn new() -> Net {
        let sfu_addr: SocketAddr = SFU_ADDR.parse().unwrap();
        let config = SfuConfig { candidates: vec![sfu_addr], ..SfuConfig::default() };
        Net { sfu: Sfu::new(config), sfu_timeout: None, sfu_addr, peers: Vec::new(), now: Instant::now(), wire: VecDeque::new() }
    }

    fn join(&mut self, room: &str) -> anyhow::Result<usize> {
        let index = self.peers.len();
        let local: SocketAddr = format!("10.0.0.{}:4000", index + 1).parse()?;
        let mut core = PeerCore::new(self.now, local, &DtlsIdentity::generate()?, PeerConfig::default())?;
        let offer = core.create_offer(self.now)?;
        assert!(offer.contains("a=sendonly"), "{offer}");
        let id = ParticipantId(index as u64 + 1);
        let joined = self.sfu.join(
            self.now,
            JoinRequest { room: RoomId::from(room), participant: id, name: format!("peer-{index}"), offer: SdpOffer::from_sdp_string(&offer)?, rights: Rights::ALL },
        )?;
        core.accept_answer(self.now, &joined.answer.to_sdp_string())?;
        // A second join offer is refused: one participation per peer.
        assert!(core.create_offer(self.now).is_err());
        self.peers.push(Peer { core, id, events: Vec::new() });
        self.pump()?;
        Ok(index)
    }

    /// Moves datagrams, events and offers until nothing moves.
    fn pump(&mut self) -> anyhow::Result<()> {
        loop {
            let mut moved = false;
            let mut sfu_events = Vec::new();
            loop {
                match self.sfu.poll_output() {
                    SfuOutput::Transmit(t) => self.wire.push_back((t.source, t.destination, t.contents)),
                    SfuOutput::Event(e) => sfu_events.push(e),
                    // No track here has suppression on.
                    SfuOutput::Audio(_) => {}
                    SfuOutput::Timeout(at) => {
                        self.sfu_timeout = at;
                        break;
                    }
                }
            }
            for peer in &mut self.peers {
                loop {
                    match peer.core.poll_output() {
                        Output::Transmit(d) => self.wire.push_back((peer.core.local_addr(), d.destination, d.contents)),
                        Output::Event(e) => peer.events.push(e),
                        Output::Timeout(_) => break,
                    }
                }
            }
            while let Some((from, to, bytes)) = self.wire.pop_front() {
                moved = true;
                if to == self.sfu_addr {
                    self.sfu.handle_datagram(self.now, from, to, &bytes);
                } else if let Some(peer) = self.peers.iter_mut().find(|p| p.core.local_addr() == to) {
                    peer.core.handle_datagram(self.now, from, &bytes);
                }
            }
            for event in sfu_events {
                moved = true;
                if let SfuEvent::Offer { participant, offer } = event {
                    let now = self.now;
                    let peer = self.peers.iter_mut().find(|p| p.id == participant).expect("offer for a peer");
                    let answer = peer.core.accept_offer(now, &offer.to_sdp_string())?;
                    self.sfu.accept_answer(now, participant, SdpAnswer::from_sdp_string(&answer)?)?;
                }
            }
            if !moved {
                return Ok(());
            }
        }
    }

    /// Runs for `duration` of virtual time; every connected peer sends a
    /// frame every 20 ms whose first byte is its index.
    fn run(&mut self, duration: Duration) -> anyhow::Result<()> {
        let end = self.now + duration;
        let mut next_frame = self.now;
        while self.now < end {
            let mut next = end.min(next_frame);
            next = self.sfu_timeout.map_or(next, |t| t.min(next));
            for peer in &self.peers {
                next = peer.core.poll_timeout().map_or(next, |t| t.min(next));
            }
            self.now = next.max(self.now + Duration::from_micros(100));
            let now = self.now;
            self.sfu.handle_timeout(now);
            for peer in &mut self.peers {
                if peer.core.poll_timeout().is_some_and(|t| t <= now) {
                    peer.core.handle_timeout(now);
                }
            }
            if now >= next_frame {
                for (i, peer) in self.peers.iter_mut().enumerate() {
                    peer.core.send_opus(now, &[i as u8, 0xfc, 0xff, 0xfe]);
                }
                next_frame += FRAME;
            }
            self.pump()?;
        }
        Ok(())
    }
}

#[test]
fn peers_hear_each_other_per_stream() -> anyhow::Result<()> {
    let mut net = Net::new();
    let a = net.join("ward-1")?;
    let b = net.join("ward-1")?;
    net.run(Duration::from_secs(3))?;

    for (me, other) in [(a, b), (b, a)] {
        let peer = &net.peers[me];
        let stats = peer.core.stats();
        assert!(stats.connected, "peer {me}: {stats:?}");
        // The other's track is named by its SFU participant number.
        let stream = net.peers[other].id.to_string();
        assert_eq!(stats.received_by_stream.keys().cloned().collect::<Vec<_>>(), vec![stream.clone()], "peer {me}: {stats:?}");
        // 3 s of 20 ms frames, minus the time to connect and negotiate.
        assert!(stats.received_by_stream[&stream] >= 100, "peer {me}: {stats:?}");
        assert!(stats.frames_sent >= 100 && stats.frames_unsent < 20, "peer {me}: {stats:?}");
        assert!(peer.events.contains(&MediaEvent::Connected));
        assert!(peer.events.contains(&MediaEvent::StreamAdded { stream: stream.as_str().into() }), "{:?}", &peer.events[..3]);
        // Every frame came from the other peer, on its stream, in RTP order.
        let frames: Vec<_> = peer
            .events
            .iter()
            .filter_map(|e| match e {
                MediaEvent::Frame(f) => Some(f),
                _ => None,
            })
            .collect();
        assert!(frames.iter().all(|f| f.payload[0] == other as u8 && *f.stream == *stream));
        assert!(frames.windows(2).all(|w| w[1].rtp_time > w[0].rtp_time), "RTP time increases");
        assert!(frames.windows(2).any(|w| w[1].rtp_time - w[0].rtp_time == 960), "one frame is 960 ticks");
    }
    Ok(())
}

#[test]
fn garbage_on_the_socket_is_counted_not_fatal() -> anyhow::Result<()> {
    let seed: u64 = std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x6a7b);
    println!("seed = {seed:#x}");
    let mut net = Net::new();
    let a = net.join("ward-2")?;
    let b = net.join("ward-2")?;
    net.run(Duration::from_secs(1))?;
    // xorshift: deterministic bytes from the seed.
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let sfu_addr = net.sfu_addr;
    for i in 0..2000 {
        let len = (next() % 300) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Some look like RTP, STUN or DTLS at first glance.
        match i % 4 {
            0 if len > 1 => bytes[0] = 0x80,
            1 if len > 1 => bytes[0] = 0x00,
            2 if len > 1 => bytes[0] = 22,
            _ => {}
        }
        let now = net.now;
        net.peers[a].core.handle_datagram(now, sfu_addr, &bytes);
    }
    let before = net.peers[a].core.stats().received_by_stream.values().sum::<u64>();
    net.run(Duration::from_secs(1))?;
    let stats = net.peers[a].core.stats().clone();
    assert!(stats.connected, "{stats:?}");
    assert!(stats.datagrams_rejected > 0, "{stats:?}");
    assert!(stats.received_by_stream.values().sum::<u64>() >= before + 40, "media still flows: {stats:?}");
    assert!(!net.peers[a].events.iter().any(|e| matches!(e, MediaEvent::Failed(_))));
    let _ = b;
    Ok(())
}
