//! Control-plane plumbing of a simulated device: enrollment and client
//! settings for the QUIC device protocol (the signaling client SDK), and a
//! WebSocket session speaking the browser room protocol.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use fleetcall_signaling::backoff::Backoff;
use fleetcall_signaling::client::{Client, ClientConfig, ClientEvent};

use fleetcall_signaling::pki::{DeviceFiles, Pki};
use fleetcall_signaling::protocol::{ClientMessage, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::context::Ctx;

/// Issues device identities from the server's CA (same machine), reusing
/// the files of an earlier run.
#[derive(Debug, Clone)]
pub struct Enroller {
    pki: Pki,
    dir: PathBuf,
}

impl Enroller {
    /// Opens the CA in `<data_dir>/pki`; identities go to `<data_dir>/loadtest-devices`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let pki_dir = data_dir.join("pki");
        if !pki_dir.join("ca.pem").exists() {
            anyhow::bail!(
                "{}: no CA here; --data-dir must be the server's data directory (on this machine)",
                pki_dir.display()
            );
        }
        let pki = Pki::open_or_init(&pki_dir, &[]).context("opening the server's CA")?;
        Ok(Enroller {
            pki,
            dir: data_dir.join("loadtest-devices"),
        })
    }

    /// The identity of `id`: issued now, or the one issued before.
    pub fn identity(&self, id: &str) -> anyhow::Result<DeviceFiles> {
        let files = DeviceFiles {
            cert: self.dir.join(format!("{id}.pem")),
            key: self.dir.join(format!("{id}.key")),
            ca: self.dir.join("ca.pem"),
        };
        if files.cert.exists() && files.key.exists() && files.ca.exists() {
            return Ok(files);
        }
        let _ = std::fs::remove_file(&files.cert);
        let _ = std::fs::remove_file(&files.key);
        self.pki
            .enroll(id, &self.dir)
            .with_context(|| format!("enrolling {id}"))
    }
}

/// Client settings for a simulated device.
pub fn client_config(
    server: SocketAddr,
    files: &DeviceFiles,
    bind_ip: IpAddr,
    fleet_backoff: bool,
) -> anyhow::Result<ClientConfig> {
    let mut config =
        ClientConfig::from_files(server, "localhost", &files.ca, &files.cert, &files.key)
            .context("device identity")?;
    config.bind = SocketAddr::new(bind_ip, 0);
    config.core.software_version = concat!("fleetcall-loadtest/", env!("CARGO_PKG_VERSION")).into();
    config.connect_timeout = Duration::from_secs(10);
    if !fleet_backoff {
        // Faster than the fleet default: a load test wants to see the
        // server converge, not the backoff's ceiling.
        config.backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    }
    Ok(config)
}

/// A browser-protocol session on `/ws`: messages out through a channel,
/// messages in on the owner's channel tagged with `tag`.
#[derive(Debug)]
pub struct WsSession {
    out: mpsc::UnboundedSender<ClientMessage>,
    tasks: [JoinHandle<()>; 2],
}

/// What a WebSocket session reports.
#[derive(Debug)]
pub enum WsEvent {
    /// A server message.
    Message(ServerMessage),
    /// The socket closed or failed.
    Closed(String),
}

impl WsSession {
    /// Connects to `url` (`ws://host/ws`); events go to `events` as `(tag, event)`.
    pub async fn connect<T: Copy + Send + 'static>(
        url: &str,
        tag: T,
        events: mpsc::UnboundedSender<(T, WsEvent)>,
    ) -> anyhow::Result<WsSession> {
        let (socket, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .with_context(|| format!("{url}: no WebSocket handshake within 10 s"))?
        .with_context(|| format!("connecting to {url}"))?;
        let (mut sink, mut stream) = socket.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<ClientMessage>();
        let writer = tokio::spawn(async move {
            while let Some(message) = out_rx.recv().await {
                // Serializing our own message types cannot fail.
                let text = serde_json::to_string(&message).expect("client message JSON");
                if sink.send(Message::text(text)).await.is_err() {
                    return;
                }
            }
            // The owner dropped the session: close politely.
            let _ = sink.close().await;
        });
        let reader = tokio::spawn(async move {
            let reason = loop {
                match stream.next().await {
                    Some(Ok(Message::Text(text))) => {
                        match serde_json::from_str::<ServerMessage>(&text) {
                            Ok(message) => {
                                if events.send((tag, WsEvent::Message(message))).is_err() {
                                    return;
                                }
                            }
                            Err(e) => tracing::debug!(error = %e, "unknown server message skipped"),
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        break format!("closed by the server: {frame:?}");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break format!("socket error: {e}"),
                    None => break "socket closed".to_owned(),
                }
            };
            let _ = events.send((tag, WsEvent::Closed(reason)));
        });
        Ok(WsSession {
            out,
            tasks: [writer, reader],
        })
    }

    /// Queues a message.
    pub fn send(&self, message: ClientMessage) {
        // A closed socket shows up as `WsEvent::Closed`.
        let _ = self.out.send(message);
    }

    /// Cuts the connection without a goodbye (a killed device).
    pub fn kill(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for WsSession {
    fn drop(&mut self) {
        // The writer closes the socket once the channel is gone; the reader
        // has nobody to tell anymore.
        self.tasks[1].abort();
    }
}

/// The local IP that routes to `server` (no packet is sent).
pub fn route_to(server: SocketAddr) -> std::io::Result<IpAddr> {
    let any: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(server)?;
    Ok(socket.local_addr()?.ip())
}

/// Enrolls (or reuses) a device identity and registers it with the SDK.
pub async fn register(
    ctx: &Ctx,
    id: &str,
) -> Result<(Client, mpsc::UnboundedReceiver<ClientEvent>), String> {
    let enroller = ctx.enroller.clone().ok_or("no CA to enroll devices with")?;
    let id_owned = id.to_owned();
    let (server, bind_ip, fleet_backoff) = (ctx.quic, ctx.bind_ip, ctx.fleet_backoff);
    let config = tokio::task::spawn_blocking(move || {
        let files = enroller.identity(&id_owned)?;
        client_config(server, &files, bind_ip, fleet_backoff)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("{e:#}"))?;
    Client::connect(config).await.map_err(|e| e.to_string())
}
