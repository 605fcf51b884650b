//! The device client SDK: a device's control connection over QUIC.
//!
//! [`Client::connect`] dials the server with the device's certificate, opens
//! the one bidirectional stream, registers (`Hello` -> `Welcome`) and returns
//! a handle plus a stream of [`ClientEvent`]s. From then on a task keeps the
//! session alive on its own:
//!
//! * heartbeats both ways (ours every `Welcome.heartbeat_interval_ms`,
//!   carrying the highest `ServerFrame.seq` processed; the server's answered
//!   at once);
//! * requests get an op id and resolve to their reply ([`Client::request`]),
//!   or fail after the request timeout;
//! * when the connection is lost, or the server stops acking heartbeats, it
//!   reconnects with capped, fully jittered exponential backoff and resumes
//!   the session (`Hello.resume`); frames already handled are not handed on
//!   twice, unanswered requests are sent again with the same op id. When the
//!   server no longer knows the session the application hears
//!   [`ClientEvent::SessionUnknown`] and rejoins what it needs.
//!
//! The protocol logic lives in the sans-IO [`ClientCore`]; this module is its
//! async driver. Test hooks simulate the field's failures:
//! [`Client::simulate_stall`] (the device stops reading and writing its stream
//! while QUIC stays up), [`Client::simulate_drop`] (the link dies without a
//! goodbye) and [`Client::rebind`] (the device's address changes: QUIC
//! migrates the connection).

mod machine;
mod socket;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use quinn::{Connection, ConnectionError, Endpoint, EndpointConfig, ReadError, RecvStream, SendStream, VarInt};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{Instrument, debug, info, info_span, warn};

pub use self::machine::{
    CLIENT_VERSION_MAX, CLIENT_VERSION_MIN, ClientCore, ClientEvent, CoreConfig, CoreEvent, OpId, RequestFailure,
};
use self::socket::CuttableSocket;
use crate::backoff::Backoff;
use crate::ids::{CallId, SessionId};
use crate::pb::{self, CloseReason, ErrorCode, ServerFrame, client_frame, server_frame};
use crate::pki::{self, PkiError};
use crate::quic::{self, QuicConfig};
use crate::wire::{FrameDecoder, MAX_FRAME_BYTES, encode_frame};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The device's certificate, key or CA could not be used.
    #[error("device identity: {0}")]
    Identity(#[from] PkiError),
    /// Reading an identity file failed.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The UDP socket could not be set up.
    #[error("socket: {0}")]
    Socket(#[from] std::io::Error),
    /// The QUIC handshake failed (unreachable server, refused certificate, ...).
    #[error("connecting to {server}: {reason}")]
    Connect {
        /// The server address.
        server: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The connection closed before a session was established.
    #[error("connection closed before registration ({}): {detail}", .close.map_or("no close code", |c| c.as_str_name()))]
    Closed {
        /// The server's close code, if it sent one.
        close: Option<CloseReason>,
        /// What happened.
        detail: String,
    },
    /// The server refused to establish a session.
    #[error("the server rejected the session: {0}")]
    Rejected(String),
    /// The server answered the request with an error.
    #[error("request refused: {} ({message})", .code.as_str_name())]
    Refused {
        /// The protocol error code.
        code: ErrorCode,
        /// The server's message.
        message: String,
        /// The call it concerns, 0 if none.
        call_id: u64,
    },
    /// No reply within the request timeout.
    #[error("no reply within the request timeout")]
    TimedOut,
    /// The session ended before the reply came.
    #[error("the session was lost before the reply")]
    SessionLost,
    /// A request too large for one frame.
    #[error("request of {0} bytes exceeds the frame limit")]
    TooLarge(usize),
    /// The reply was neither `Ack` nor `Error`.
    #[error("unexpected reply frame")]
    UnexpectedReply,
    /// The client task has stopped (closed, or the runtime is going away).
    #[error("the client has stopped")]
    Stopped,
}

/// How to reach the server and who we are.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server's QUIC address.
    pub server: SocketAddr,
    /// The name in the server certificate (`localhost`, a DNS name or IP).
    pub server_name: String,
    /// The device identity (see [`pki::device_tls`]).
    pub tls: Arc<rustls::ClientConfig>,
    /// Local address to bind; port 0 picks one.
    pub bind: SocketAddr,
    /// Protocol settings.
    pub core: CoreConfig,
    /// A handshake must complete within this time.
    pub connect_timeout: Duration,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// QUIC keep-alive and idle timeout (the server's defaults).
    pub quic: QuicConfig,
}

impl ClientConfig {
    /// Settings with the fleet defaults.
    pub fn new(server: SocketAddr, server_name: impl Into<String>, tls: rustls::ClientConfig) -> Self {
        let bind = match server.ip() {
            IpAddr::V4(ip) if ip.is_loopback() => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            IpAddr::V6(ip) if ip.is_loopback() => SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
            IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        ClientConfig {
            server,
            server_name: server_name.into(),
            tls: Arc::new(tls),
            bind,
            core: CoreConfig::default(),
            connect_timeout: Duration::from_secs(10),
            backoff: Backoff::fleet_default(),
            quic: QuicConfig::default(),
        }
    }

    /// Settings from enrolled files: the CA that issued the server
    /// certificate, the device certificate and its key (PEM).
    pub fn from_files(
        server: SocketAddr,
        server_name: impl Into<String>,
        ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, ClientError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| ClientError::File { path: path.display().to_string(), source })
        };
        let tls = pki::device_tls(&read(ca)?, &read(cert)?, &read(key)?)?;
        Ok(Self::new(server, server_name, tls))
    }
}

/// A snapshot of the client's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStatus {
    /// The current (or last) session.
    pub session: Option<SessionId>,
    /// Welcomed on a live connection.
    pub connected: bool,
    /// Highest `ServerFrame.seq` processed.
    pub last_seq: u64,
    /// Round-trip time of the last acked heartbeat.
    pub rtt: Option<Duration>,
    /// Local address of the current connection.
    pub local_addr: Option<SocketAddr>,
    /// Connections established after the first.
    pub reconnects: u64,
}

enum Command {
    Request { kind: client_frame::Kind, reply: oneshot::Sender<Result<ServerFrame, ClientError>> },
    Stall(bool),
    Drop,
    Rebind(oneshot::Sender<Result<SocketAddr, ClientError>>),
    Close(oneshot::Sender<()>),
}

/// Handle to a connected device. Cheap to clone; the connection closes when
/// the last handle is dropped or [`Client::close`] is called.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::UnboundedSender<Command>,
    status: watch::Receiver<ClientStatus>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl Client {
    /// Connects and registers. Fails if the first connection cannot be
    /// established (wrong identity, unreachable server, rejected session);
    /// later losses are repaired in the background.
    pub async fn connect(config: ClientConfig) -> Result<(Client, mpsc::UnboundedReceiver<ClientEvent>), ClientError> {
        let quic = quic_client_config(&config)?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (events, event_rx) = mpsc::unbounded_channel();
        let (status, status_rx) = watch::channel(ClientStatus::default());
        let span = info_span!("client", server = %config.server);
        let mut driver = Driver {
            core: ClientCore::new(config.core.clone(), now()),
            backoff: config.backoff.clone(),
            config,
            quic,
            commands: command_rx,
            events,
            waiters: HashMap::new(),
            status,
            rng: StdRng::from_seed(rand::random()),
            stalled: false,
            ready: None,
            rejected: None,
            connections: 0,
        };
        let link = driver.establish().instrument(span.clone()).await?;
        let (ready, welcomed) = oneshot::channel();
        driver.ready = Some(ready);
        tokio::spawn(driver.run(link).instrument(span));
        welcomed.await.map_err(|_| ClientError::Stopped)??;
        Ok((Client { commands, status: status_rx }, event_rx))
    }

    /// Sends a request and resolves to its reply frame (`Ack` or `Error`).
    ///
    /// The request is queued when this is called, not when the future is
    /// first polled: requests go out in the order of the calls, and the
    /// future may be awaited anywhere (it owns everything it needs).
    pub fn request_frame(
        &self,
        kind: client_frame::Kind,
    ) -> impl Future<Output = Result<ServerFrame, ClientError>> + Send + 'static {
        let submitted = self.submit(kind);
        async move { submitted?.await.map_err(|_| ClientError::Stopped)? }
    }

    fn submit(&self, kind: client_frame::Kind) -> Result<oneshot::Receiver<Result<ServerFrame, ClientError>>, ClientError> {
        let probe = pb::ClientFrame { op_id: u64::MAX, kind: Some(kind) };
        let len = prost::Message::encoded_len(&probe);
        if len > MAX_FRAME_BYTES {
            return Err(ClientError::TooLarge(len));
        }
        let Some(kind) = probe.kind else { return Err(ClientError::UnexpectedReply) };
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Request { kind, reply }).map_err(|_| ClientError::Stopped)?;
        Ok(rx)
    }

    /// Sends a request; `Ok` carries `Ack.call_id`, a server `Error` becomes
    /// [`ClientError::Refused`]. Queued at the call, like [`Client::request_frame`].
    pub fn request(&self, kind: client_frame::Kind) -> impl Future<Output = Result<u64, ClientError>> + Send + 'static {
        let reply = self.request_frame(kind);
        async move {
            match reply.await?.kind {
                Some(server_frame::Kind::Ack(ack)) => Ok(ack.call_id),
                Some(server_frame::Kind::Error(e)) => Err(ClientError::Refused {
                    code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
                    message: e.message,
                    call_id: e.call_id,
                }),
                _ => Err(ClientError::UnexpectedReply),
            }
        }
    }

    fn request_unit(&self, kind: client_frame::Kind) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        let reply = self.request(kind);
        async move { reply.await.map(drop) }
    }

    /// Calls `callee`; resolves to the new call.
    pub fn invite(&self, callee: &str) -> impl Future<Output = Result<CallId, ClientError>> + Send + 'static {
        let reply = self.request(client_frame::Kind::Invite(pb::Invite { callee: callee.into() }));
        async move { reply.await.map(CallId) }
    }

    /// Tells the caller this device is alerting.
    pub fn ringing(&self, call: CallId) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        self.request_unit(client_frame::Kind::Ringing(pb::Ringing { call_id: call.0 }))
    }

    /// Answers a call (joins a group call).
    pub fn accept(&self, call: CallId) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        self.request_unit(client_frame::Kind::Accept(pb::Accept { call_id: call.0 }))
    }

    /// Refuses a call.
    pub fn decline(&self, call: CallId) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        self.request_unit(client_frame::Kind::Decline(pb::Decline { call_id: call.0 }))
    }

    /// Withdraws an unanswered invitation.
    pub fn cancel(&self, call: CallId) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        self.request_unit(client_frame::Kind::Cancel(pb::Cancel { call_id: call.0 }))
    }

    /// Ends the call (leaves a group call).
    pub fn hangup(&self, call: CallId) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        self.request_unit(client_frame::Kind::Hangup(pb::Hangup { call_id: call.0 }))
    }

    /// Turns server-side noise suppression of this device's microphone on or
    /// off (`None`: back to the room/server default), also mid-call.
    pub fn set_noise_suppression(&self, on: Option<bool>) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        let setting = pb::SetNoiseSuppression { enabled: on.unwrap_or(false), use_default: on.is_none() };
        self.request_unit(client_frame::Kind::SetNoiseSuppression(setting))
    }

    /// Sends this device's media offer for `call`; the SFU's answer comes as
    /// [`ClientEvent::SdpAnswer`] with the same revision.
    pub fn sdp_offer(
        &self,
        call: CallId,
        revision: u64,
        sdp: String,
    ) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        let session_id = self.session().map_or(0, |s| s.0);
        self.request_unit(client_frame::Kind::SdpOffer(pb::SdpOffer { call_id: call.0, session_id, revision, sdp }))
    }

    /// Answers a server offer ([`ClientEvent::SdpOffer`]) with its revision.
    pub fn sdp_answer(
        &self,
        call: CallId,
        revision: u64,
        sdp: String,
    ) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        let session_id = self.session().map_or(0, |s| s.0);
        self.request_unit(client_frame::Kind::SdpAnswer(pb::SdpAnswer { call_id: call.0, session_id, revision, sdp }))
    }

    /// The current session.
    pub fn session(&self) -> Option<SessionId> {
        self.status.borrow().session
    }

    /// A snapshot of the client's state.
    pub fn status(&self) -> ClientStatus {
        self.status.borrow().clone()
    }

    /// Moves the connection to a fresh UDP socket on the same interface, as
    /// when the device's address changes; QUIC migrates the connection and
    /// the session goes on. Returns the new local address.
    pub async fn rebind(&self) -> Result<SocketAddr, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Rebind(reply)).map_err(|_| ClientError::Stopped)?;
        rx.await.map_err(|_| ClientError::Stopped)?
    }

    /// Test hook: with `true` the device stops reading and writing its
    /// stream and stops its timers, while QUIC keeps the path alive: what a
    /// hung device looks like to the server. `false` resumes.
    pub fn simulate_stall(&self, stalled: bool) {
        let _ = self.commands.send(Command::Stall(stalled));
    }

    /// Test hook: the link dies at once and silently (no QUIC close reaches
    /// the server); the client reconnects and resumes as after a real loss.
    pub fn simulate_drop(&self) {
        let _ = self.commands.send(Command::Drop);
    }

    /// Closes the connection cleanly and stops the client. The server keeps
    /// the session for its resume grace.
    pub async fn close(&self) {
        let (reply, rx) = oneshot::channel();
        if self.commands.send(Command::Close(reply)).is_ok() {
            let _ = rx.await;
        }
    }
}

fn quic_client_config(config: &ClientConfig) -> Result<quinn::ClientConfig, ClientError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config.tls.clone())
        .map_err(|e| ClientError::Identity(PkiError::Certificate(e.to_string())))?;
    let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
    quic.transport_config(Arc::new(quic::transport(&config.quic)));
    Ok(quic)
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// One QUIC connection and its control stream.
struct Link {
    endpoint: Endpoint,
    /// Cuts the endpoint's socket (see [`Client::simulate_drop`]).
    cut: Arc<AtomicBool>,
    connection: Connection,
    send: SendStream,
    recv: RecvStream,
}

impl Link {
    fn close(&self, detail: &str) {
        self.connection.close(VarInt::from_u32(0), detail.as_bytes());
    }
}

/// How a connection ended.
enum LinkEnd {
    Lost { close: Option<CloseReason>, detail: String },
    Stop,
}

/// The task that owns the core and the connection.
struct Driver {
    config: ClientConfig,
    quic: quinn::ClientConfig,
    core: ClientCore,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<ClientEvent>,
    waiters: HashMap<OpId, oneshot::Sender<Result<ServerFrame, ClientError>>>,
    status: watch::Sender<ClientStatus>,
    backoff: Backoff,
    rng: StdRng,
    stalled: bool,
    /// Told the outcome of the first registration.
    ready: Option<oneshot::Sender<Result<(), ClientError>>>,
    /// The server's `Rejected` reason, for the first registration's error.
    rejected: Option<String>,
    connections: u64,
}

impl Driver {
    async fn run(mut self, first: Link) {
        let mut link = first;
        loop {
            self.connections += 1;
            self.core.handle_connected(now());
            let (close, detail) = match self.run_link(link).await {
                LinkEnd::Stop => return,
                LinkEnd::Lost { close, detail } => (close, detail),
            };
            info!(close = close.map(|c| c.as_str_name()), %detail, "connection lost");
            self.core.handle_disconnected(now(), close, detail.clone());
            self.dispatch();
            if let Some(ready) = self.ready.take() {
                let error = match self.rejected.take() {
                    Some(reason) => ClientError::Rejected(reason),
                    None => ClientError::Closed { close, detail },
                };
                let _ = ready.send(Err(error));
                return;
            }
            link = loop {
                let delay = self.backoff.next_delay(&mut self.rng);
                debug!(?delay, attempt = self.backoff.attempt(), "reconnecting");
                if !self.idle(delay).await {
                    return;
                }
                match self.establish().await {
                    Ok(link) => break link,
                    Err(e) => info!(error = %e, "reconnect failed"),
                }
            };
        }
    }

    /// Dials the server and opens the control stream, on a fresh socket.
    async fn establish(&mut self) -> Result<Link, ClientError> {
        let server = self.config.server;
        let connect_error = |reason: String| ClientError::Connect { server, reason };
        let cut = Arc::new(AtomicBool::new(false));
        let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
        let socket = CuttableSocket::wrap(&*runtime, std::net::UdpSocket::bind(self.config.bind)?, cut.clone())?;
        let endpoint = Endpoint::new_with_abstract_socket(EndpointConfig::default(), None, socket, runtime)?;
        let connecting = endpoint
            .connect_with(self.quic.clone(), server, &self.config.server_name)
            .map_err(|e| connect_error(e.to_string()))?;
        let connection = match tokio::time::timeout(self.config.connect_timeout, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => return Err(connect_error(e.to_string())),
            Err(_) => return Err(connect_error("handshake timed out".into())),
        };
        let (send, recv) = connection.open_bi().await.map_err(|e| connect_error(e.to_string()))?;
        debug!(local = ?endpoint.local_addr().ok(), "connected");
        Ok(Link { endpoint, cut, connection, send, recv })
    }

    /// Serves one connection until it ends.
    async fn run_link(&mut self, link: Link) -> LinkEnd {
        let mut inbound = BytesMut::with_capacity(16 * 1024);
        let mut scratch = vec![0u8; 16 * 1024];
        let mut outbound = BytesMut::new();
        let mut decoder = FrameDecoder::new();
        let mut link = link;
        self.status.send_modify(|s| s.local_addr = link.endpoint.local_addr().ok());
        loop {
            if !self.stalled {
                while let Some(frame) = self.core.poll_transmit() {
                    outbound.clear();
                    // Requests were size-checked; the core's own frames are small.
                    if encode_frame(&frame, &mut outbound).is_err() {
                        warn!(op_id = frame.op_id, "frame too large to send dropped");
                        continue;
                    }
                    if let Err(e) = link.send.write_all(&outbound).await {
                        return self.lost(&link, format!("write failed: {e}")).await;
                    }
                }
            }
            if let Some(detail) = self.dispatch() {
                link.close(&detail);
                return LinkEnd::Lost { close: None, detail };
            }
            let deadline = if self.stalled { None } else { self.core.poll_timeout() };
            tokio::select! {
                // Commands first: a close or a test hook must not wait behind
                // a busy stream.
                biased;
                command = self.commands.recv() => {
                    let Some(command) = command else {
                        // Every handle is gone: nobody can use the session.
                        link.close("client dropped");
                        return LinkEnd::Stop;
                    };
                    match command {
                        Command::Request { kind, reply } => {
                            let op = self.core.request(now(), kind);
                            self.waiters.insert(op, reply);
                        }
                        Command::Stall(stalled) => {
                            info!(stalled, "stall (test hook)");
                            self.stalled = stalled;
                        }
                        Command::Drop => {
                            info!("dropping the connection silently (test hook)");
                            link.cut.store(true, Ordering::Relaxed);
                            link.close("dropped");
                            return LinkEnd::Lost { close: None, detail: "connection dropped (test hook)".into() };
                        }
                        Command::Rebind(reply) => {
                            let result = rebind(&link);
                            if let Ok(addr) = &result {
                                info!(%addr, "rebound to a new socket");
                                self.status.send_modify(|s| s.local_addr = Some(*addr));
                            }
                            let _ = reply.send(result);
                        }
                        Command::Close(reply) => {
                            link.close("bye");
                            // Let the close reach the server.
                            let _ = tokio::time::timeout(Duration::from_secs(1), link.endpoint.wait_idle()).await;
                            self.fail_waiters();
                            let _ = reply.send(());
                            return LinkEnd::Stop;
                        }
                    }
                }
                // Quinn's read is cancel-safe: a command arriving first loses nothing.
                read = link.recv.read(&mut scratch), if !self.stalled => match read {
                    Ok(Some(n)) => {
                        inbound.extend_from_slice(&scratch[..n]);
                        loop {
                            match decoder.decode::<ServerFrame>(&mut inbound) {
                                Ok(Some(frame)) => self.core.handle_frame(now(), frame),
                                Ok(None) => break,
                                Err(e) if e.is_fatal() => {
                                    let detail = format!("bad frame from the server: {e}");
                                    warn!(%detail);
                                    link.connection.close(VarInt::from_u32(CloseReason::ProtocolError as u32), b"bad frame");
                                    return LinkEnd::Lost { close: None, detail };
                                }
                                Err(e) => warn!(error = %e, "malformed frame from the server skipped"),
                            }
                        }
                    }
                    // The server finished its side; its close follows.
                    Ok(None) => return self.lost(&link, "the server finished the stream".into()).await,
                    Err(ReadError::ConnectionLost(e)) => {
                        let (close, detail) = describe(&e);
                        return LinkEnd::Lost { close, detail };
                    }
                    Err(e) => return self.lost(&link, format!("read failed: {e}")).await,
                },
                () = sleep_until(deadline) => self.core.handle_timeout(now()),
            }
        }
    }

    /// The stream broke: wait briefly for the connection's close reason.
    async fn lost(&self, link: &Link, detail: String) -> LinkEnd {
        match tokio::time::timeout(Duration::from_secs(2), link.connection.closed()).await {
            Ok(e) => {
                let (close, why) = describe(&e);
                LinkEnd::Lost { close, detail: format!("{detail}; {why}") }
            }
            Err(_) => {
                link.close(&detail);
                LinkEnd::Lost { close: None, detail }
            }
        }
    }

    /// Between connections: waits `delay` while taking requests (queued for
    /// the next session) and running the core's timers. False: stop.
    async fn idle(&mut self, delay: Duration) -> bool {
        let until = now() + delay;
        loop {
            self.dispatch();
            let deadline = self.core.poll_timeout().map_or(until, |t| t.min(until));
            tokio::select! {
                command = self.commands.recv() => match command {
                    None => return false,
                    Some(Command::Request { kind, reply }) => {
                        let op = self.core.request(now(), kind);
                        self.waiters.insert(op, reply);
                    }
                    Some(Command::Stall(stalled)) => self.stalled = stalled,
                    Some(Command::Drop) => {}
                    Some(Command::Rebind(reply)) => {
                        // The next connection uses a fresh socket anyway.
                        let _ = reply.send(Err(ClientError::Closed { close: None, detail: "not connected".into() }));
                    }
                    Some(Command::Close(reply)) => {
                        self.fail_waiters();
                        let _ = reply.send(());
                        return false;
                    }
                },
                () = sleep_until(Some(deadline)) => {
                    let now = now();
                    self.core.handle_timeout(now);
                    if now >= until {
                        self.dispatch();
                        return true;
                    }
                }
            }
        }
    }

    /// Hands the core's events on; returns why the link is unusable, if it is.
    fn dispatch(&mut self) -> Option<String> {
        let mut unresponsive = None;
        while let Some(event) = self.core.poll_event() {
            match event {
                CoreEvent::Reply { op, frame } => {
                    if let Some(waiter) = self.waiters.remove(&op) {
                        let _ = waiter.send(Ok(frame));
                    }
                }
                CoreEvent::RequestFailed { op, failure } => {
                    if let Some(waiter) = self.waiters.remove(&op) {
                        let _ = waiter.send(Err(match failure {
                            RequestFailure::TimedOut => ClientError::TimedOut,
                            RequestFailure::SessionLost => ClientError::SessionLost,
                        }));
                    }
                }
                CoreEvent::Unresponsive { detail } => unresponsive = Some(detail),
                CoreEvent::Event(event) => {
                    match &event {
                        ClientEvent::Connected { session, resumed, .. } => {
                            info!(%session, resumed, "registered");
                            self.backoff.reset();
                            if let Some(ready) = self.ready.take() {
                                let _ = ready.send(Ok(()));
                            }
                        }
                        ClientEvent::SessionUnknown { session, reason } => {
                            info!(%session, %reason, "the server no longer knows the session");
                        }
                        ClientEvent::Rejected(rejected) => {
                            warn!(reason = %rejected.reason, "session rejected");
                            self.rejected = Some(rejected.reason.clone());
                        }
                        _ => {}
                    }
                    // The application may have stopped listening; the
                    // session goes on regardless.
                    let _ = self.events.send(event);
                }
            }
        }
        let status = ClientStatus {
            session: self.core.session(),
            connected: self.core.is_up(),
            last_seq: self.core.last_seq(),
            rtt: self.core.rtt(),
            local_addr: self.status.borrow().local_addr,
            reconnects: self.connections.saturating_sub(1),
        };
        self.status.send_if_modified(|s| {
            let changed = *s != status;
            *s = status;
            changed
        });
        unresponsive
    }

    fn fail_waiters(&mut self) {
        for (_, waiter) in self.waiters.drain() {
            let _ = waiter.send(Err(ClientError::Stopped));
        }
    }
}

/// Moves the endpoint to a new socket on the same IP.
fn rebind(link: &Link) -> Result<SocketAddr, ClientError> {
    let ip = link.endpoint.local_addr()?.ip();
    let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?;
    link.endpoint.rebind_abstract(CuttableSocket::wrap(&quinn::TokioRuntime, socket, link.cut.clone())?)?;
    Ok(link.endpoint.local_addr()?)
}

/// The server's close code and a description of a connection error.
fn describe(error: &ConnectionError) -> (Option<CloseReason>, String) {
    match error {
        ConnectionError::ApplicationClosed(close) => {
            let reason = i32::try_from(close.error_code.into_inner()).ok().and_then(|c| CloseReason::try_from(c).ok());
            (reason, format!("closed by the server: {}", String::from_utf8_lossy(&close.reason)))
        }
        other => (None, other.to_string()),
    }
}
