//! The device client SDK: a device's control connection, over QUIC (the
//! device's certificate) or WebSocket (an access token).
//!
//! [`Client::connect`] dials the server, opens the one control channel (the
//! QUIC bidirectional stream, or a WebSocket on `/ws/device?token=` carrying
//! one proto3 JSON frame per text message), registers (`Hello` -> `Welcome`)
//! and returns a handle plus a stream of [`ClientEvent`]s. From then on a
//! task keeps the session alive on its own, the same way on both transports:
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
//!   [`ClientEvent::SessionUnknown`] and rejoins what it needs;
//! * when the server refuses the credential for good (missing, expired,
//!   revoked, identity held by another credential, no common version) the
//!   application hears [`ClientEvent::Ended`] once and the client stops; a
//!   first connection refused so makes [`Client::connect`] fail with
//!   [`ClientError::Ended`].
//!
//! The protocol logic lives in the sans-IO [`ClientCore`]; this module is its
//! async driver, one loop over a link of either transport. Test hooks
//! simulate the field's failures: [`Client::simulate_stall`] (the device
//! stops reading and writing while the transport stays up),
//! [`Client::simulate_drop`] (the link dies without a goodbye) and, on QUIC,
//! [`Client::rebind`] (the device's address changes: QUIC migrates the
//! connection).

mod machine;
mod socket;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use quinn::{Connection, ConnectionError, Endpoint, EndpointConfig, ReadError, RecvStream, SendStream, VarInt};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::{Instrument, debug, info, info_span, warn};

pub use self::machine::{
    CLIENT_VERSION_MAX, CLIENT_VERSION_MIN, ClientCore, ClientEvent, CoreConfig, CoreEvent, OpId, RequestFailure,
};
use self::socket::CuttableSocket;
use crate::backoff::Backoff;
use crate::ids::{CallId, SessionId};
use crate::pb::{self, ClientFrame, CloseReason, ErrorCode, ServerFrame, client_frame, server_frame};
use crate::pki::{self, PkiError};
use crate::quic::{self, QuicConfig};
use crate::wire::{FrameDecoder, MAX_FRAME_BYTES, decode_json, encode_frame, encode_json};

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
    /// The socket could not be set up.
    #[error("socket: {0}")]
    Socket(#[from] std::io::Error),
    /// The server could not be reached: QUIC handshake failed (unreachable,
    /// refused certificate, ...), or TCP, TLS or the WebSocket upgrade did.
    #[error("connecting to {server}: {reason}")]
    Connect {
        /// The server: its QUIC address, or the WebSocket URL (without token).
        server: String,
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
    /// The server refused to establish a session, for a reason this client
    /// does not know to be permanent.
    #[error("the server rejected the session: {0}")]
    Rejected(String),
    /// The server refused this client for good (see [`ClientEvent::Ended`]):
    /// a new credential is needed; the client does not retry.
    #[error("the server refused this client for good ({}): {reason}", .close.as_str_name())]
    Ended {
        /// Why (a `Rejected` code as its matching close reason).
        close: CloseReason,
        /// The server's explanation.
        reason: String,
    },
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
    /// The operation does not exist on this transport.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The client task has stopped (closed, ended, or the runtime is going away).
    #[error("the client has stopped")]
    Stopped,
}

/// How the client reaches the server and proves who it is.
#[derive(Debug, Clone)]
pub enum Transport {
    /// The device control plane: QUIC with the device's certificate.
    Quic(QuicTarget),
    /// `/ws/device` with an access token.
    WebSocket(WsTarget),
}

/// A server on QUIC.
#[derive(Debug, Clone)]
pub struct QuicTarget {
    /// The server's QUIC address.
    pub server: SocketAddr,
    /// The name in the server certificate (`localhost`, a DNS name or IP).
    pub server_name: String,
    /// The device identity (see [`pki::device_tls`]).
    pub tls: Arc<rustls::ClientConfig>,
    /// QUIC keep-alive and idle timeout (the server's defaults).
    pub quic: QuicConfig,
}

/// A server on WebSocket.
#[derive(Clone)]
pub struct WsTarget {
    /// `ws://host:port/ws/device` or `wss://...`; the token is added as the
    /// `token` query parameter.
    pub url: String,
    /// The access token (a JWT from `fleetcall token create` or the admin API).
    pub token: String,
    /// Whom to trust for `wss://` (see [`server_tls`]); required for `wss://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for WsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential: never in logs.
        f.debug_struct("WsTarget").field("url", &self.url).field("tls", &self.tls.is_some()).finish_non_exhaustive()
    }
}

/// How to reach the server and who we are.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// QUIC or WebSocket, with the credential.
    pub transport: Transport,
    /// Local address to bind; port 0 picks one. On WebSocket an unspecified
    /// address with port 0 leaves the choice to the system.
    pub bind: SocketAddr,
    /// Protocol settings.
    pub core: CoreConfig,
    /// A connection (handshakes included) must be up within this time.
    pub connect_timeout: Duration,
    /// Reconnect delays.
    pub backoff: Backoff,
}

impl ClientConfig {
    /// QUIC settings with the fleet defaults.
    pub fn new(server: SocketAddr, server_name: impl Into<String>, tls: rustls::ClientConfig) -> Self {
        let bind = match server.ip() {
            IpAddr::V4(ip) if ip.is_loopback() => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            IpAddr::V6(ip) if ip.is_loopback() => SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
            IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let target =
            QuicTarget { server, server_name: server_name.into(), tls: Arc::new(tls), quic: QuicConfig::default() };
        Self::with_transport(Transport::Quic(target), bind)
    }

    /// QUIC settings from enrolled files: the CA that issued the server
    /// certificate, the device certificate and its key (PEM).
    pub fn from_files(
        server: SocketAddr,
        server_name: impl Into<String>,
        ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, ClientError> {
        let tls = pki::device_tls(&read_file(ca)?, &read_file(cert)?, &read_file(key)?)?;
        Ok(Self::new(server, server_name, tls))
    }

    /// WebSocket settings with the fleet defaults: `url` is the device
    /// endpoint (`ws://host:port/ws/device`); for `wss://` set the trust with
    /// [`ClientConfig::trusting`].
    pub fn websocket(url: impl Into<String>, token: impl Into<String>) -> Self {
        let target = WsTarget { url: url.into(), token: token.into(), tls: None };
        Self::with_transport(Transport::WebSocket(target), SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
    }

    /// For `wss://`: trusts the certificates in the PEM file (the server's
    /// HTTPS certificate or the CA that issued it).
    pub fn trusting(mut self, pem: &Path) -> Result<Self, ClientError> {
        if let Transport::WebSocket(target) = &mut self.transport {
            target.tls = Some(Arc::new(server_tls(&read_file(pem)?)?));
        }
        Ok(self)
    }

    fn with_transport(transport: Transport, bind: SocketAddr) -> Self {
        ClientConfig {
            transport,
            bind,
            core: CoreConfig::default(),
            connect_timeout: Duration::from_secs(10),
            backoff: Backoff::fleet_default(),
        }
    }

    /// The server as logs and errors name it (never with the token).
    fn server(&self) -> String {
        match &self.transport {
            Transport::Quic(target) => target.server.to_string(),
            Transport::WebSocket(target) => target.url.clone(),
        }
    }
}

/// TLS for `wss://` without a client certificate (the token is the
/// credential), trusting the certificates in `pem`.
pub fn server_tls(pem: &[u8]) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| PkiError::Certificate(e.to_string()))?;
        roots.add(cert).map_err(|e| PkiError::Certificate(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(PkiError::Certificate("no certificate in PEM".into()).into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Certificate(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

fn read_file(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::File { path: path.display().to_string(), source })
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
    /// established (wrong identity, unreachable server, rejected session:
    /// [`ClientError::Ended`] for a refused credential); later losses are
    /// repaired in the background.
    pub async fn connect(config: ClientConfig) -> Result<(Client, mpsc::UnboundedReceiver<ClientEvent>), ClientError> {
        let dialer = Dialer::new(&config)?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (events, event_rx) = mpsc::unbounded_channel();
        let (status, status_rx) = watch::channel(ClientStatus::default());
        let span = info_span!("client", server = %config.server());
        let mut driver = Driver {
            core: ClientCore::new(config.core.clone(), now()),
            backoff: config.backoff.clone(),
            config,
            dialer,
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

    fn submit(
        &self,
        kind: client_frame::Kind,
    ) -> Result<oneshot::Receiver<Result<ServerFrame, ClientError>>, ClientError> {
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

    /// Joins the named room (1-64 of `A-Z a-z 0-9 _ . -`, covered by the
    /// credential's grant); resolves to the room's call. A `CallState` with
    /// this device `JOINING` follows: send the media offer then.
    pub fn room_join(&self, room: &str) -> impl Future<Output = Result<CallId, ClientError>> + Send + 'static {
        let reply = self.request(client_frame::Kind::RoomJoin(pb::RoomJoin { room: room.into() }));
        async move { reply.await.map(CallId) }
    }

    /// Leaves a group call or room; the others stay.
    pub fn group_leave(&self, call: CallId) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        self.request_unit(client_frame::Kind::GroupLeave(pb::GroupLeave { call_id: call.0 }))
    }

    /// Turns server-side noise suppression of this device's microphone on or
    /// off (`None`: back to the room/server default), also mid-call.
    pub fn set_noise_suppression(
        &self,
        on: Option<bool>,
    ) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
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
    /// the session goes on. Returns the new local address. QUIC only.
    pub async fn rebind(&self) -> Result<SocketAddr, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Rebind(reply)).map_err(|_| ClientError::Stopped)?;
        rx.await.map_err(|_| ClientError::Stopped)?
    }

    /// Test hook: with `true` the device stops reading and writing its
    /// stream and stops its timers, while the transport stays up (QUIC keeps
    /// the path alive, the TCP connection stays open): what a hung device
    /// looks like to the server. `false` resumes.
    pub fn simulate_stall(&self, stalled: bool) {
        let _ = self.commands.send(Command::Stall(stalled));
    }

    /// Test hook: the link dies at once and silently, like a pulled cable:
    /// nothing more reaches the server (no QUIC close; on WebSocket no close
    /// frame, and the TCP connection stays open until the server gives up on
    /// it). The client reconnects and resumes as after a real loss.
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

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Longest a silently dropped WebSocket is held open (see [`Client::simulate_drop`]).
const DROPPED_SOCKET_HOLD: Duration = Duration::from_secs(60);

/// What a transport needs to dial, prepared once.
enum Dialer {
    Quic { config: quinn::ClientConfig, server: SocketAddr, server_name: String },
    Ws(WsDialer),
}

struct WsDialer {
    /// The URL with the token: only ever handed to the handshake.
    request: String,
    host: String,
    port: u16,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Dialer {
    fn new(config: &ClientConfig) -> Result<Dialer, ClientError> {
        match &config.transport {
            Transport::Quic(target) => {
                let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(target.tls.clone())
                    .map_err(|e| ClientError::Identity(PkiError::Certificate(e.to_string())))?;
                let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
                quic.transport_config(Arc::new(quic::transport(&target.quic)));
                Ok(Dialer::Quic { config: quic, server: target.server, server_name: target.server_name.clone() })
            }
            Transport::WebSocket(target) => WsDialer::new(target).map(Dialer::Ws),
        }
    }
}

impl WsDialer {
    fn new(target: &WsTarget) -> Result<WsDialer, ClientError> {
        let bad = |reason: &str| ClientError::Connect { server: target.url.clone(), reason: reason.into() };
        let uri: Uri = target.url.parse().map_err(|_| bad("not a URL"))?;
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(bad("the URL must start with ws:// or wss://")),
        };
        let host = uri.host().ok_or_else(|| bad("the URL has no host"))?;
        // `[::1]` in a URL, `::1` for the resolver and TLS.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let tls = if secure {
            let config = target.tls.clone().ok_or_else(|| bad("wss:// needs the server's certificate to trust"))?;
            let name = ServerName::try_from(host.clone()).map_err(|_| bad("the host is not a valid TLS name"))?;
            Some((tokio_rustls::TlsConnector::from(config), name))
        } else {
            None
        };
        let separator = if target.url.contains('?') { '&' } else { '?' };
        let request = format!("{}{separator}token={}", target.url, query_escape(&target.token));
        Ok(WsDialer { request, host, port, tls })
    }

    async fn dial(&self, bind: SocketAddr) -> Result<WsLink, String> {
        let any_bind = bind.ip().is_unspecified() && bind.port() == 0;
        let remote = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("resolving {}: {e}", self.host))?
            .find(|addr| any_bind || addr.is_ipv4() == bind.is_ipv4())
            .ok_or_else(|| format!("{} has no address of the bind address's family", self.host))?;
        let socket =
            if remote.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(|e| e.to_string())?;
        if !any_bind {
            socket.bind(bind).map_err(|e| format!("binding {bind}: {e}"))?;
        }
        let tcp = socket.connect(remote).await.map_err(|e| e.to_string())?;
        // Frames are small and must not wait for more.
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok();
        let io: Box<dyn Io> = match &self.tls {
            Some((connector, name)) => {
                Box::new(connector.connect(name.clone(), tcp).await.map_err(|e| format!("TLS: {e}"))?)
            }
            None => Box::new(tcp),
        };
        // The server's limits: a frame over the protocol's limit is an error,
        // far bigger ones are cut here.
        let config = WebSocketConfig::default()
            .max_message_size(Some(2 * MAX_FRAME_BYTES))
            .max_frame_size(Some(2 * MAX_FRAME_BYTES));
        let (socket, _) = tokio_tungstenite::client_async_with_config(self.request.as_str(), io, Some(config))
            .await
            .map_err(|e| match e {
                tungstenite::Error::Http(response) => format!("WebSocket upgrade refused: HTTP {}", response.status()),
                other => format!("WebSocket handshake: {other}"),
            })?;
        Ok(WsLink { socket, local })
    }
}

/// Percent-encodes everything but the URL-safe characters (a JWT needs none).
fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The byte stream under a WebSocket: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// One connection and its control channel, on either transport.
enum Link {
    Quic(QuicLink),
    Ws(WsLink),
}

/// One QUIC connection and its control stream.
struct QuicLink {
    endpoint: Endpoint,
    /// Cuts the endpoint's socket (see [`Client::simulate_drop`]).
    cut: Arc<AtomicBool>,
    connection: Connection,
    send: SendStream,
    recv: RecvStream,
    inbound: BytesMut,
    scratch: Vec<u8>,
    outbound: BytesMut,
    decoder: FrameDecoder,
}

/// One WebSocket on `/ws/device`.
struct WsLink {
    socket: WebSocketStream<Box<dyn Io>>,
    local: Option<SocketAddr>,
}

/// How a connection ended.
enum LinkEnd {
    Lost { close: Option<CloseReason>, detail: String },
    Stop,
}

impl Link {
    fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Link::Quic(link) => link.endpoint.local_addr().ok(),
            Link::Ws(link) => link.local,
        }
    }

    /// Writes one frame; `Err`: the link is gone.
    async fn write(&mut self, frame: &ClientFrame) -> Result<(), LinkEnd> {
        match self {
            Link::Quic(link) => {
                link.outbound.clear();
                // Requests were size-checked; the core's own frames are small.
                if encode_frame(frame, &mut link.outbound).is_err() {
                    warn!(op_id = frame.op_id, "frame too large to send dropped");
                    return Ok(());
                }
                match link.send.write_all(&link.outbound).await {
                    Ok(()) => Ok(()),
                    Err(e) => Err(link.lost(format!("write failed: {e}")).await),
                }
            }
            Link::Ws(link) => {
                let Ok(text) = encode_json(frame) else {
                    warn!(op_id = frame.op_id, "frame too large to send dropped");
                    return Ok(());
                };
                match link.socket.send(Message::text(text)).await {
                    Ok(()) => Ok(()),
                    Err(e) => Err(link.lost(format!("write failed: {e}")).await),
                }
            }
        }
    }

    /// Waits for input and appends the frames it completes to `frames`;
    /// `Err`: the link is gone (after the frames that came before its end).
    /// Cancel-safe while it waits: both transports' reads lose nothing when
    /// dropped, and decoding does not wait.
    async fn read(&mut self, frames: &mut Vec<ServerFrame>) -> Result<(), LinkEnd> {
        match self {
            Link::Quic(link) => link.read(frames).await,
            Link::Ws(link) => link.read(frames).await,
        }
    }

    /// Gives up on the link at once (it stopped moving frames).
    fn abort(self, detail: &str) {
        match self {
            Link::Quic(link) => link.close(detail),
            // Dropping the socket closes it: the server reads its end.
            Link::Ws(link) => drop(link),
        }
    }

    /// The test hook's pulled cable: nothing more reaches the server.
    fn cut(self) {
        match self {
            Link::Quic(link) => {
                link.cut.store(true, Ordering::Relaxed);
                link.close("dropped");
            }
            Link::Ws(mut link) => {
                // Closing the TCP connection would tell the server at once;
                // hold it, reading nothing anyone hears of, until the server
                // gives up on it and closes it.
                tokio::spawn(async move {
                    let drain = async { while link.socket.next().await.is_some() {} };
                    let _ = tokio::time::timeout(DROPPED_SOCKET_HOLD, drain).await;
                });
            }
        }
    }

    /// Closes politely and lets the goodbye reach the server.
    async fn close(self) {
        match self {
            Link::Quic(link) => {
                link.close("bye");
                let _ = tokio::time::timeout(Duration::from_secs(1), link.endpoint.wait_idle()).await;
            }
            Link::Ws(mut link) => {
                let goodbye = async {
                    link.socket.close(None).await?;
                    // The server's answering close completes the handshake.
                    while link.socket.next().await.is_some() {}
                    Ok::<_, tungstenite::Error>(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), goodbye).await;
            }
        }
    }

    /// Moves a QUIC endpoint to a new socket on the same IP.
    fn rebind(&self) -> Result<SocketAddr, ClientError> {
        let Link::Quic(link) = self else {
            return Err(ClientError::Unsupported("rebind: only a QUIC connection can move to a new socket"));
        };
        let ip = link.endpoint.local_addr()?.ip();
        let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?;
        link.endpoint.rebind_abstract(CuttableSocket::wrap(&quinn::TokioRuntime, socket, link.cut.clone())?)?;
        Ok(link.endpoint.local_addr()?)
    }
}

impl QuicLink {
    fn close(&self, detail: &str) {
        self.connection.close(VarInt::from_u32(0), detail.as_bytes());
    }

    async fn read(&mut self, frames: &mut Vec<ServerFrame>) -> Result<(), LinkEnd> {
        let n = match self.recv.read(&mut self.scratch).await {
            Ok(Some(n)) => n,
            // The server finished its side; its close follows.
            Ok(None) => return Err(self.lost("the server finished the stream".into()).await),
            Err(ReadError::ConnectionLost(e)) => {
                let (close, detail) = describe(&e);
                return Err(LinkEnd::Lost { close, detail });
            }
            Err(e) => return Err(self.lost(format!("read failed: {e}")).await),
        };
        self.inbound.extend_from_slice(&self.scratch[..n]);
        loop {
            match self.decoder.decode::<ServerFrame>(&mut self.inbound) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => return Ok(()),
                Err(e) if e.is_fatal() => {
                    let detail = format!("bad frame from the server: {e}");
                    warn!(%detail);
                    self.connection.close(VarInt::from_u32(CloseReason::ProtocolError as u32), b"bad frame");
                    return Err(LinkEnd::Lost { close: None, detail });
                }
                Err(e) => warn!(error = %e, "malformed frame from the server skipped"),
            }
        }
    }

    /// The stream broke: wait briefly for the connection's close reason.
    async fn lost(&self, detail: String) -> LinkEnd {
        match tokio::time::timeout(Duration::from_secs(2), self.connection.closed()).await {
            Ok(e) => {
                let (close, why) = describe(&e);
                LinkEnd::Lost { close, detail: format!("{detail}; {why}") }
            }
            Err(_) => {
                self.close(&detail);
                LinkEnd::Lost { close: None, detail }
            }
        }
    }
}

impl WsLink {
    async fn read(&mut self, frames: &mut Vec<ServerFrame>) -> Result<(), LinkEnd> {
        match self.socket.next().await {
            Some(Ok(Message::Text(text))) => match decode_json::<ServerFrame>(&text) {
                Ok(frame) => frames.push(frame),
                Err(e) => warn!(error = %e, "malformed frame from the server skipped"),
            },
            Some(Ok(Message::Binary(_))) => warn!("binary message from the server skipped"),
            Some(Ok(Message::Close(frame))) => return Err(ws_closed(frame.as_ref())),
            // Pings are answered by tungstenite.
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(LinkEnd::Lost { close: None, detail: format!("socket error: {e}") }),
            None => return Err(LinkEnd::Lost { close: None, detail: "socket closed".into() }),
        }
        Ok(())
    }

    /// A write failed: the server's close frame may still be in the socket.
    async fn lost(&mut self, detail: String) -> LinkEnd {
        let close_frame = async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Close(frame))) => return Some(ws_closed(frame.as_ref())),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return None,
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(2), close_frame).await {
            Ok(Some(LinkEnd::Lost { close, detail: why })) => {
                LinkEnd::Lost { close, detail: format!("{detail}; {why}") }
            }
            _ => LinkEnd::Lost { close: None, detail },
        }
    }
}

/// The server's close code (4000 + [`CloseReason`]) and what it said.
fn ws_closed(frame: Option<&tungstenite::protocol::CloseFrame>) -> LinkEnd {
    let Some(frame) = frame else {
        return LinkEnd::Lost { close: None, detail: "closed by the server".into() };
    };
    let code = u16::from(frame.code);
    let close = code.checked_sub(4000).and_then(|c| CloseReason::try_from(i32::from(c)).ok());
    LinkEnd::Lost { close, detail: format!("closed by the server: {code} {}", frame.reason) }
}

/// The task that owns the core and the connection.
struct Driver {
    config: ClientConfig,
    dialer: Dialer,
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
            if let Some((close, reason)) = self.core.ended() {
                // Told the application (and a waiting `connect`) in `dispatch`.
                warn!(close = close.as_str_name(), %reason, "refused for good; not reconnecting");
                return;
            }
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

    /// Dials the server and opens the control channel, on a fresh socket.
    async fn establish(&mut self) -> Result<Link, ClientError> {
        let connect_error = |reason: String| ClientError::Connect { server: self.config.server(), reason };
        match &self.dialer {
            Dialer::Quic { config, server, server_name } => {
                let cut = Arc::new(AtomicBool::new(false));
                let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
                let socket =
                    CuttableSocket::wrap(&*runtime, std::net::UdpSocket::bind(self.config.bind)?, cut.clone())?;
                let endpoint = Endpoint::new_with_abstract_socket(EndpointConfig::default(), None, socket, runtime)?;
                let connecting = endpoint
                    .connect_with(config.clone(), *server, server_name)
                    .map_err(|e| connect_error(e.to_string()))?;
                let connection = match tokio::time::timeout(self.config.connect_timeout, connecting).await {
                    Ok(Ok(connection)) => connection,
                    Ok(Err(e)) => return Err(connect_error(e.to_string())),
                    Err(_) => return Err(connect_error("handshake timed out".into())),
                };
                let (send, recv) = connection.open_bi().await.map_err(|e| connect_error(e.to_string()))?;
                debug!(local = ?endpoint.local_addr().ok(), "connected");
                Ok(Link::Quic(QuicLink {
                    endpoint,
                    cut,
                    connection,
                    send,
                    recv,
                    inbound: BytesMut::with_capacity(16 * 1024),
                    scratch: vec![0u8; 16 * 1024],
                    outbound: BytesMut::new(),
                    decoder: FrameDecoder::new(),
                }))
            }
            Dialer::Ws(ws) => {
                match tokio::time::timeout(self.config.connect_timeout, ws.dial(self.config.bind)).await {
                    Ok(Ok(link)) => {
                        debug!(local = ?link.local, "connected");
                        Ok(Link::Ws(link))
                    }
                    Ok(Err(reason)) => Err(connect_error(reason)),
                    Err(_) => Err(connect_error("handshake timed out".into())),
                }
            }
        }
    }

    /// Serves one connection until it ends.
    async fn run_link(&mut self, mut link: Link) -> LinkEnd {
        let mut frames = Vec::new();
        self.status.send_modify(|s| s.local_addr = link.local_addr());
        loop {
            if !self.stalled {
                while let Some(frame) = self.core.poll_transmit() {
                    if let Err(end) = link.write(&frame).await {
                        return end;
                    }
                }
            }
            if let Some(detail) = self.dispatch() {
                link.abort(&detail);
                return LinkEnd::Lost { close: None, detail };
            }
            if let Some((close, _)) = self.core.ended() {
                // The server closes right after its refusal; nothing to wait for.
                link.abort("refused");
                return LinkEnd::Lost { close: Some(close), detail: "refused".into() };
            }
            let deadline = if self.stalled { None } else { self.core.poll_timeout() };
            tokio::select! {
                // Commands first: a close or a test hook must not wait behind
                // a busy stream.
                biased;
                command = self.commands.recv() => {
                    let Some(command) = command else {
                        // Every handle is gone: nobody can use the session.
                        link.abort("client dropped");
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
                            link.cut();
                            return LinkEnd::Lost { close: None, detail: "connection dropped (test hook)".into() };
                        }
                        Command::Rebind(reply) => {
                            let result = link.rebind();
                            if let Ok(addr) = &result {
                                info!(%addr, "rebound to a new socket");
                                self.status.send_modify(|s| s.local_addr = Some(*addr));
                            }
                            let _ = reply.send(result);
                        }
                        Command::Close(reply) => {
                            link.close().await;
                            self.fail_waiters();
                            let _ = reply.send(());
                            return LinkEnd::Stop;
                        }
                    }
                }
                // `Link::read` is cancel-safe: a command arriving first loses nothing.
                read = link.read(&mut frames), if !self.stalled => {
                    for frame in frames.drain(..) {
                        self.core.handle_frame(now(), frame);
                    }
                    if let Err(end) = read {
                        return end;
                    }
                }
                () = sleep_until(deadline) => self.core.handle_timeout(now()),
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
                            RequestFailure::Ended => self.ended_error(),
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
                        ClientEvent::Ended { close, reason } => {
                            warn!(close = close.as_str_name(), %reason, "the server refused this client for good");
                            if let Some(ready) = self.ready.take() {
                                let _ = ready.send(Err(self.ended_error()));
                            }
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

    fn ended_error(&self) -> ClientError {
        match self.core.ended() {
            Some((close, reason)) => ClientError::Ended { close, reason: reason.to_owned() },
            None => ClientError::Stopped,
        }
    }

    fn fail_waiters(&mut self) {
        for (_, waiter) in self.waiters.drain() {
            let _ = waiter.send(Err(ClientError::Stopped));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dialer(url: &str, token: &str) -> Result<WsDialer, ClientError> {
        let Transport::WebSocket(target) = ClientConfig::websocket(url, token).transport else { unreachable!() };
        WsDialer::new(&target)
    }

    #[test]
    fn the_token_goes_into_the_query_and_never_into_names() {
        let d = dialer("ws://127.0.0.1:8080/ws/device", "aaa.bbb-_.ccc").unwrap();
        assert_eq!(d.request, "ws://127.0.0.1:8080/ws/device?token=aaa.bbb-_.ccc");
        assert_eq!((d.host.as_str(), d.port, d.tls.is_none()), ("127.0.0.1", 8080, true));
        let d = dialer("ws://[::1]/ws/device?x=1", "a b&c").unwrap();
        assert_eq!(d.request, "ws://[::1]/ws/device?x=1&token=a%20b%26c");
        assert_eq!((d.host.as_str(), d.port), ("::1", 80));
        let config = ClientConfig::websocket("ws://h/ws/device", "secret-token");
        assert!(!format!("{config:?}").contains("secret-token"));
        assert_eq!(config.server(), "ws://h/ws/device");
    }

    #[test]
    fn bad_urls_are_refused_before_dialing() {
        for (url, needle) in
            [("http://h/ws/device", "ws:// or wss://"), ("not a url", "not a URL"), ("wss://h/ws/device", "trust")]
        {
            let Err(ClientError::Connect { server, reason }) = dialer(url, "t") else { panic!("{url} accepted") };
            assert!(reason.contains(needle), "{url}: {reason}");
            assert_eq!(server, url);
        }
        assert!(matches!(server_tls(b"no pem here"), Err(ClientError::Identity(_))));
    }

    #[test]
    fn websocket_close_codes_are_4000_plus_the_reason() {
        let frame = |code: u16| tungstenite::protocol::CloseFrame { code: code.into(), reason: "why".into() };
        for (code, close) in [
            (4012, Some(CloseReason::Revoked)),
            (4005, Some(CloseReason::HeartbeatTimeout)),
            (1000, None),
            (4999, None),
        ] {
            let LinkEnd::Lost { close: got, detail } = ws_closed(Some(&frame(code))) else { panic!() };
            assert_eq!(got, close, "{code}");
            assert!(detail.contains("why"), "{detail}");
        }
        assert!(matches!(ws_closed(None), LinkEnd::Lost { close: None, .. }));
    }
}
