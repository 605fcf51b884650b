//! [`MediaPeer`]: one [`Peer`] on its own UDP socket, in one small tokio
//! task. For a device (one peer at a time); a process that runs many peers
//! drives the sans-IO core itself.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, info_span, trace};

use crate::{DtlsIdentity, Output, Peer, PeerConfig, PeerError, PeerEvent, PeerStats};

/// Big enough for any datagram the SFU sends.
const MAX_DATAGRAM: usize = 2048;

/// Settings of a [`MediaPeer`].
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// The UDP socket's address: a concrete IP the SFU can reach (port 0
    /// picks one).
    pub bind: SocketAddr,
    /// Events buffered for the application; more are dropped and counted.
    pub event_capacity: usize,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig { bind: SocketAddr::from(([127, 0, 0, 1], 0)), event_capacity: 1024 }
    }
}

enum Command {
    CreateOffer(oneshot::Sender<Result<String, PeerError>>),
    AcceptAnswer(String, oneshot::Sender<Result<(), PeerError>>),
    AcceptOffer(String, oneshot::Sender<Result<String, PeerError>>),
    SendOpus(Vec<u8>),
    MoveTo(IpAddr, oneshot::Sender<Result<String, PeerError>>),
}

/// A frame-mode, audio-only [`Peer`] with a fresh certificate on its own
/// UDP socket. Dropping every handle stops it.
#[derive(Debug, Clone)]
pub struct MediaPeer {
    commands: mpsc::UnboundedSender<Command>,
    local: SocketAddr,
    stats: Arc<Mutex<PeerStats>>,
}

impl MediaPeer {
    /// Binds the socket and starts the peer's task.
    pub async fn start(
        config: MediaConfig,
    ) -> Result<(MediaPeer, mpsc::Receiver<PeerEvent>), PeerError> {
        let socket = UdpSocket::bind(config.bind).await?;
        let local = socket.local_addr()?;
        if local.ip().is_unspecified() {
            return Err(PeerError::State(format!(
                "bind a concrete IP, not {local}: it is the ICE candidate"
            )));
        }
        let identity = DtlsIdentity::generate()?;
        let peer = Peer::new(now(), local, &identity, PeerConfig::default())?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (events, event_rx) = mpsc::channel(config.event_capacity.max(1));
        let stats = Arc::new(Mutex::new(PeerStats::default()));
        let driver =
            Driver { peer, socket, commands: command_rx, events, stats: stats.clone(), dropped: 0 };
        tokio::spawn(driver.run().instrument(info_span!("media_peer", %local)));
        Ok((MediaPeer { commands, local, stats }, event_rx))
    }

    /// The join offer (one `sendonly` Opus m-line).
    pub async fn create_offer(&self) -> Result<String, PeerError> {
        self.ask(Command::CreateOffer).await
    }

    /// Applies the SFU's answer to the join offer.
    pub async fn accept_answer(&self, sdp: String) -> Result<(), PeerError> {
        self.ask(|reply| Command::AcceptAnswer(sdp, reply)).await
    }

    /// Answers an SFU renegotiation offer.
    pub async fn accept_offer(&self, sdp: String) -> Result<String, PeerError> {
        self.ask(|reply| Command::AcceptOffer(sdp, reply)).await
    }

    /// Queues one 20 ms Opus frame (the caller paces). Frames before the
    /// peer connects are dropped and counted.
    pub fn send_opus(&self, payload: Vec<u8>) -> Result<(), PeerError> {
        self.commands.send(Command::SendOpus(payload)).map_err(|_| PeerError::Stopped)
    }

    /// The device's address changed to `ip`: moves to a new socket there
    /// and returns the ICE restart offer to send (`ice_restart`); the
    /// server's answer goes to [`accept_answer`](Self::accept_answer).
    pub async fn move_to(&self, ip: IpAddr) -> Result<String, PeerError> {
        self.ask(|reply| Command::MoveTo(ip, reply)).await
    }

    /// The counters (updated after every step of the peer's task).
    pub fn stats(&self) -> PeerStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The UDP socket's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, PeerError>>) -> Command,
    ) -> Result<T, PeerError> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(command(reply)).map_err(|_| PeerError::Stopped)?;
        rx.await.map_err(|_| PeerError::Stopped)?
    }
}

/// The local IP the system would use to reach `server` (no packet is
/// sent): what a media socket binds to when nothing else is said, since
/// its address is the peer's ICE candidate.
pub fn route_to(server: SocketAddr) -> std::io::Result<IpAddr> {
    let any: SocketAddr =
        if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(server)?;
    Ok(socket.local_addr()?.ip())
}

/// Time from tokio's clock, so paused-time tests work.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

struct Driver {
    peer: Peer,
    socket: UdpSocket,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::Sender<PeerEvent>,
    stats: Arc<Mutex<PeerStats>>,
    dropped: u64,
}

impl Driver {
    async fn run(mut self) {
        let mut buffer = vec![0u8; MAX_DATAGRAM];
        loop {
            let deadline = self.flush().await;
            tokio::select! {
                // Commands first: sending our frame on time matters more than
                // reading the next datagram a little earlier.
                biased;
                command = self.commands.recv() => {
                    // Every handle is gone: stop.
                    let Some(command) = command else { return };
                    let now = now();
                    match command {
                        Command::CreateOffer(reply) => { let _ = reply.send(self.peer.create_offer(now)); }
                        Command::AcceptAnswer(sdp, reply) => { let _ = reply.send(self.peer.accept_answer(now, &sdp)); }
                        Command::AcceptOffer(sdp, reply) => { let _ = reply.send(self.peer.accept_offer(now, &sdp)); }
                        Command::SendOpus(payload) => { self.peer.send_opus(now, &payload); }
                        Command::MoveTo(ip, reply) => { let _ = reply.send(self.move_to(ip).await); }
                    }
                }
                received = self.socket.recv_from(&mut buffer) => match received {
                    Ok((n, source)) => self.peer.handle_datagram(now(), source, &buffer[..n]),
                    // ICMP errors surface here on some systems; the next read goes on.
                    Err(e) => trace!(error = %e, "receive failed"),
                },
                // A failed peer wants no more time (the branch is off then).
                () = tokio::time::sleep_until(deadline.unwrap_or_else(now).into()), if deadline.is_some() => {
                    self.peer.handle_timeout(now());
                }
            }
        }
    }

    /// A socket on the new address, then the peer's restart offer.
    async fn move_to(&mut self, ip: IpAddr) -> Result<String, PeerError> {
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
        let local = socket.local_addr()?;
        self.socket = socket;
        self.peer.move_to(now(), local)
    }

    /// Carries out what the peer asked for; returns its next deadline.
    async fn flush(&mut self) -> Option<Instant> {
        let deadline = loop {
            match self.peer.poll_output() {
                Output::Transmit(datagram) => {
                    // A lost datagram is what UDP promises; ICE and RTCP cope.
                    if let Err(e) = self.socket.send_to(&datagram.contents, datagram.destination).await {
                        trace!(error = %e, "send failed");
                    }
                }
                Output::Event(event) => {
                    if self.events.try_send(event).is_err() {
                        self.dropped += 1;
                    }
                }
                Output::Timeout(deadline) => break deadline,
            }
        };
        if let Ok(mut stats) = self.stats.lock() {
            *stats = self.peer.stats().clone();
            stats.events_dropped = self.dropped;
        }
        deadline
    }
}
