//! Devices for the real-QUIC end-to-end tests: enrolled identities, the
//! client SDK with a media peer that answers SDP on its own and sends real
//! Opus, raw QUIC connections for bad input, the reference agent as a child
//! process, and the admin API.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use audiopus::coder::Encoder;
use audiopus::{Application, Channels, SampleRate};
use bytes::BytesMut;
use fleetcall_peer::{MediaConfig, MediaPeer, PeerStats, FRAME};
use fleetcall_signaling::backoff::Backoff;
use fleetcall_signaling::client::{Client, ClientConfig, ClientEvent};
use fleetcall_signaling::ids::CallId;
use fleetcall_signaling::pb::{self, CallPhase, EndReason, ServerFrame};
use fleetcall_signaling::pki::{DeviceFiles, Enrollment, Pki};
use fleetcall_signaling::wire::{encode_frame, FrameDecoder};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::common::{http_get, Server};

/// Generous bound for things that take milliseconds on an idle machine.
pub const PROMPT: Duration = Duration::from_secs(5);

/// Issues a certificate for `id` from the server's CA.
pub fn enroll(server: &Server, id: &str) -> anyhow::Result<DeviceFiles> {
    let pki = Pki::open_or_init(server.data_dir.join("pki"), &[])?;
    Ok(pki.enroll(id, &server.data_dir.join("devices"), &Enrollment::default())?)
}

/// Client settings for an enrolled device, with quick reconnects.
pub fn client_config(server: &Server, files: &DeviceFiles) -> anyhow::Result<ClientConfig> {
    let mut config = ClientConfig::from_files(server.quic_addr, "localhost", &files.ca, &files.cert, &files.key)?;
    config.backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    Ok(config)
}

/// Real Opus: one second of a tone, encoded once and looped.
fn tone_frames(hz: f32) -> anyhow::Result<Vec<Vec<u8>>> {
    let encoder = Encoder::new(SampleRate::Hz48000, Channels::Mono, Application::Voip)?;
    let mut frames = Vec::new();
    for f in 0..50 {
        let pcm: Vec<i16> = (0..960)
            .map(|i| {
                let t = (f * 960 + i) as f32 / 48_000.0;
                (8000.0 * (2.0 * std::f32::consts::PI * hz * t).sin()) as i16
            })
            .collect();
        let mut packet = [0u8; 1275];
        let n = encoder.encode(&pcm, &mut packet)?;
        frames.push(packet[..n].to_vec());
    }
    Ok(frames)
}

/// The media side of a device in one call.
pub struct Media {
    pub call: CallId,
    pub peer: MediaPeer,
    sender: tokio::task::JoinHandle<()>,
}

impl Drop for Media {
    fn drop(&mut self) {
        self.sender.abort();
    }
}

/// A device on the client SDK. A background task answers the SFU's SDP for
/// the media peer; every event is also handed to the test.
pub struct Device {
    pub id: String,
    pub client: Client,
    pub files: DeviceFiles,
    events: mpsc::UnboundedReceiver<ClientEvent>,
    /// Every event the test has looked at, for failure messages.
    pub seen: Vec<ClientEvent>,
    media: Arc<Mutex<Option<(CallId, MediaPeer)>>>,
    pub current: Option<Media>,
    /// Where the device's sockets live (see [`Home`]).
    home: Home,
    /// ICE restarts sent, for their revisions.
    restarts: u64,
}

/// Where a device's sockets are made: a socket belongs to the network
/// namespace of the thread that creates it, so a device of the network lab
/// (tests/netlab) makes its QUIC endpoint and media socket on a runtime
/// whose thread entered its namespace; everything else (channels, events,
/// timers) works from any runtime.
#[derive(Debug, Clone)]
pub struct Home {
    /// The runtime inside the device's namespace; `None`: the caller's.
    pub runtime: Option<tokio::runtime::Handle>,
    /// The media socket's IP (its ICE candidate).
    pub media_ip: IpAddr,
}

impl Home {
    /// The test's own network: loopback.
    pub fn local() -> Home {
        Home { runtime: None, media_ip: IpAddr::V4(Ipv4Addr::LOCALHOST) }
    }

    /// Runs `work` where the device's sockets belong.
    pub async fn run<T: Send + 'static>(&self, work: impl Future<Output = T> + Send + 'static) -> anyhow::Result<T> {
        match &self.runtime {
            Some(runtime) => Ok(runtime.spawn(work).await?),
            None => Ok(work.await),
        }
    }
}

impl Device {
    /// Enrolls `id` and registers it.
    pub async fn connect(server: &Server, id: &str) -> anyhow::Result<Device> {
        Device::connect_enrolled(server, id, enroll(server, id)?).await
    }

    /// Registers `id` with the identity in `files`.
    pub async fn connect_enrolled(server: &Server, id: &str, files: DeviceFiles) -> anyhow::Result<Device> {
        let config = client_config(server, &files)?;
        Device::connect_from(id, files, config, Home::local()).await
    }

    /// Registers `id` with `config`, its sockets made at `home`.
    pub async fn connect_from(id: &str, files: DeviceFiles, config: ClientConfig, home: Home) -> anyhow::Result<Device> {
        let (client, mut raw) = home.run(Client::connect(config)).await?.with_context(|| format!("{id} connecting"))?;
        let (forward, events) = mpsc::unbounded_channel();
        let media: Arc<Mutex<Option<(CallId, MediaPeer)>>> = Arc::default();
        let pump_media = media.clone();
        let pump_client = client.clone();
        let who = id.to_owned();
        tokio::spawn(async move {
            while let Some(event) = raw.recv().await {
                let peer = pump_media.lock().unwrap().clone();
                match (&event, peer) {
                    (ClientEvent::SdpAnswer(answer), Some((call, peer))) if answer.call_id == call.0 => {
                        if let Err(e) = peer.accept_answer(answer.sdp.clone()).await {
                            eprintln!("{who}: answer refused: {e}");
                        }
                    }
                    (ClientEvent::SdpOffer(offer), Some((call, peer))) if offer.call_id == call.0 => match peer.accept_offer(offer.sdp.clone()).await {
                        Ok(sdp) => {
                            let reply = pump_client.sdp_answer(call, offer.revision, sdp);
                            let who = who.clone();
                            tokio::spawn(async move {
                                if let Err(e) = reply.await {
                                    eprintln!("{who}: sdp answer failed: {e}");
                                }
                            });
                        }
                        Err(e) => eprintln!("{who}: offer refused: {e}"),
                    },
                    _ => {}
                }
                if forward.send(event).is_err() {
                    return;
                }
            }
        });
        let mut device = Device { id: id.to_owned(), client, files, events, seen: Vec::new(), media, current: None, home, restarts: 0 };
        device.expect(PROMPT, "registration", |e| matches!(e, ClientEvent::Connected { resumed: false, .. }).then_some(())).await?;
        Ok(device)
    }

    /// Starts a media peer for `call`, offers it, and sends a tone every 20 ms.
    pub async fn start_media(&mut self, call: CallId, hz: f32) -> anyhow::Result<()> {
        let config = MediaConfig { bind: SocketAddr::new(self.home.media_ip, 0), ..MediaConfig::default() };
        let (peer, events) = self.home.run(MediaPeer::start(config)).await??;
        // Counters are enough here; the peer counts what the test checks.
        drop(events);
        *self.media.lock().unwrap() = Some((call, peer.clone()));
        let offer = peer.create_offer().await?;
        self.client.sdp_offer(call, 1, offer).await.with_context(|| format!("{}: media offer", self.id))?;
        let frames = tone_frames(hz)?;
        let sender_peer = peer.clone();
        let sender = tokio::spawn(async move {
            let mut tick = tokio::time::interval(FRAME);
            for frame in frames.iter().cycle() {
                tick.tick().await;
                if sender_peer.send_opus(frame.clone()).is_err() {
                    return;
                }
            }
        });
        self.current = Some(Media { call, peer, sender });
        Ok(())
    }

    /// The device's address changed to `ip`: its media moves to a socket
    /// there and restarts ICE (`ice_restart`; the pump applies the answer).
    pub async fn restart_media_at(&mut self, ip: IpAddr) -> anyhow::Result<()> {
        let (call, peer) = self.current.as_ref().map(|m| (m.call, m.peer.clone())).context("no media to move")?;
        let offer = peer.move_to(ip).await?;
        let session = self.client.session().context("no session")?;
        self.restarts += 1;
        // Above the join offer's revision 1; the server only echoes it.
        let revision = 100 + self.restarts;
        let restart = pb::IceRestart { call_id: call.0, session_id: session.0, revision, sdp: offer };
        self.client.request(pb::client_frame::Kind::IceRestart(restart)).await.with_context(|| format!("{}: ice restart", self.id))?;
        self.home.media_ip = ip;
        Ok(())
    }

    /// Stops the media of the current call.
    pub fn stop_media(&mut self) {
        *self.media.lock().unwrap() = None;
        self.current = None;
    }

    /// The media counters of the current call.
    pub fn media_stats(&self) -> PeerStats {
        self.current.as_ref().map(|m| m.peer.stats()).unwrap_or_default()
    }

    /// Frames received from the one remote stream of a 1:1 call.
    pub fn heard(&self) -> u64 {
        self.media_stats().frames_received
    }

    /// Waits until `pick` selects an event, skipping others.
    pub async fn expect<T>(&mut self, limit: Duration, what: &str, mut pick: impl FnMut(&ClientEvent) -> Option<T>) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let event = match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => bail!("{}: events ended while waiting for {what}; seen {:#?}", self.id, self.seen),
                Err(_) => bail!("{}: no {what} within {limit:?}; seen {:#?}", self.id, self.seen),
            };
            self.seen.push(event.clone());
            if let Some(found) = pick(&event) {
                return Ok(found);
            }
        }
    }

    /// Takes every event that arrived so far.
    pub fn drain(&mut self) -> Vec<ClientEvent> {
        let mut fresh = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            self.seen.push(event.clone());
            fresh.push(event);
        }
        fresh
    }

    pub async fn incoming(&mut self, limit: Duration) -> anyhow::Result<pb::IncomingCall> {
        self.expect(limit, "incoming call", |e| match e {
            ClientEvent::IncomingCall(m) => Some(m.clone()),
            _ => None,
        })
        .await
    }

    pub async fn phase(&mut self, call: CallId, phase: CallPhase, limit: Duration) -> anyhow::Result<pb::CallState> {
        self.expect(limit, phase.as_str_name(), |e| match e {
            ClientEvent::CallState(s) if s.call_id == call.0 && s.phase == phase as i32 => Some(s.clone()),
            _ => None,
        })
        .await
    }

    pub async fn ended(&mut self, call: CallId, limit: Duration) -> anyhow::Result<pb::CallEnded> {
        let ended = self
            .expect(limit, "call ended", |e| match e {
                ClientEvent::CallEnded(m) if m.call_id == call.0 => Some(m.clone()),
                _ => None,
            })
            .await?;
        if self.current.as_ref().is_some_and(|m| m.call == call) {
            self.stop_media();
        }
        Ok(ended)
    }

    /// Waits until this device has heard `frames` frames more than `from`.
    pub async fn hears(&self, from: u64, frames: u64, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let stats = self.media_stats();
            if stats.frames_received >= from + frames {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("{}: heard {} frames, wanted {} more than {from} within {limit:?}: {stats:?}", self.id, stats.frames_received, frames);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn reason(ended: &pb::CallEnded) -> EndReason {
    EndReason::try_from(ended.reason).unwrap_or(EndReason::Unspecified)
}

/// Alice calls bob, bob answers, both send audio and hear each other.
pub async fn call_with_media(alice: &mut Device, bob: &mut Device) -> anyhow::Result<CallId> {
    let call = alice.client.invite(&bob.id).await?;
    alice.start_media(call, 440.0).await?;
    let incoming = bob.incoming(PROMPT).await?;
    assert_eq!((incoming.call_id, incoming.from.as_str()), (call.0, alice.id.as_str()));
    bob.client.ringing(call).await?;
    alice.phase(call, CallPhase::Ringing, PROMPT).await?;
    bob.client.accept(call).await?;
    bob.start_media(call, 660.0).await?;
    alice.phase(call, CallPhase::Active, PROMPT * 2).await?;
    bob.phase(call, CallPhase::Active, PROMPT).await?;
    // Half a second of 20 ms frames each way, through the SFU.
    alice.hears(0, 25, PROMPT * 2).await?;
    bob.hears(0, 25, PROMPT * 2).await?;
    for device in [&*alice, &*bob] {
        let stats = device.media_stats();
        assert_eq!(stats.received_by_stream.len(), 1, "{}: one remote stream in a 1:1 call: {stats:?}", device.id);
    }
    Ok(call)
}

// ---- admin API -------------------------------------------------------------

pub async fn api(server: &Server, path: &str) -> anyhow::Result<Value> {
    let body = http_get(&format!("{}{path}", server.url), Some(&server.admin_token)).await?;
    Ok(serde_json::from_str(&body)?)
}

/// `GET /api/devices`, as a map from device id to row.
pub async fn devices(server: &Server) -> anyhow::Result<std::collections::BTreeMap<String, Value>> {
    let rows = api(server, "/api/devices").await?;
    let rows = rows.as_array().context("device table is an array")?;
    Ok(rows.iter().map(|r| (r["id"].as_str().unwrap_or_default().to_owned(), r.clone())).collect())
}

/// `GET /api/calls` row of one call.
pub async fn call_row(server: &Server, call: CallId) -> anyhow::Result<Value> {
    let rows = api(server, "/api/calls").await?;
    rows.as_array()
        .and_then(|rows| rows.iter().find(|r| r["id"] == call.0))
        .cloned()
        .with_context(|| format!("call {} not in {rows}", call.0))
}

/// Calls that are not ended.
pub async fn live_calls(server: &Server) -> anyhow::Result<Vec<Value>> {
    let rows = api(server, "/api/calls").await?;
    Ok(rows.as_array().context("calls")?.iter().filter(|r| r["phase"] != "CALL_PHASE_ENDED").cloned().collect())
}

/// Polls the device table until `done` holds for the row of `id`.
pub async fn wait_device(server: &Server, id: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> anyhow::Result<(Value, Duration)> {
    let start = Instant::now();
    loop {
        let row = devices(server).await?.remove(id).unwrap_or(Value::Null);
        if done(&row) {
            return Ok((row, start.elapsed()));
        }
        if start.elapsed() > limit {
            bail!("device {id} did not get there within {limit:?}: {row}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A minimal HTTP/1.1 POST without a body; returns status and body.
pub async fn http_post(server: &Server, path: &str) -> anyhow::Result<(u16, String)> {
    http_request(server, "POST", path, "").await
}

/// `PUT path` with a JSON body and the admin token.
pub async fn http_put(server: &Server, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    http_request(server, "PUT", path, body).await
}

pub async fn http_request(server: &Server, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = server.url.strip_prefix("http://").context("http URL")?;
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        server.admin_token,
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").context("HTTP response")?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("status line")?;
    Ok((status, body.to_owned()))
}

// ---- raw QUIC ----------------------------------------------------------------

/// A QUIC connection speaking frames by hand, for bad input.
pub struct Raw {
    pub connection: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    buffer: BytesMut,
    decoder: FrameDecoder,
    _endpoint: quinn::Endpoint,
}

impl Raw {
    /// Connects with `tls` and opens the control stream.
    pub async fn connect(server: &Server, tls: rustls::ClientConfig) -> anyhow::Result<Raw> {
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(fleetcall_signaling::quic::transport(&Default::default())));
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let connection = endpoint.connect_with(config, server.quic_addr, "localhost")?.await?;
        let (send, recv) = connection.open_bi().await?;
        Ok(Raw { connection, send, recv, buffer: BytesMut::new(), decoder: FrameDecoder::new(), _endpoint: endpoint })
    }

    /// Enrolls `id` and connects as it.
    pub async fn enrolled(server: &Server, id: &str) -> anyhow::Result<Raw> {
        Raw::with_files(server, &enroll(server, id)?).await
    }

    /// Connects with an enrolled device's certificate.
    pub async fn with_files(server: &Server, files: &DeviceFiles) -> anyhow::Result<Raw> {
        let tls = fleetcall_signaling::pki::device_tls(&std::fs::read(&files.ca)?, &std::fs::read(&files.cert)?, &std::fs::read(&files.key)?)?;
        Raw::connect(server, tls).await
    }

    /// Sends `Hello` and returns the `Rejected` frame the server answers with.
    pub async fn rejected(&mut self) -> anyhow::Result<pb::Rejected> {
        let hello = pb::Hello { min_version: 1, max_version: 1, software_version: "raw".into(), resume: None };
        // The server may refuse before reading it (a revoked credential).
        let _ = self.send_frame(0, pb::client_frame::Kind::Hello(hello)).await;
        self.next(PROMPT, |f| match &f.kind {
            Some(pb::server_frame::Kind::Rejected(r)) => Some(r.clone()),
            _ => None,
        })
        .await
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.send.write_all(bytes).await?;
        Ok(())
    }

    pub async fn send_frame(&mut self, op_id: u64, kind: pb::client_frame::Kind) -> anyhow::Result<()> {
        let mut buf = BytesMut::new();
        encode_frame(&pb::ClientFrame { op_id, kind: Some(kind) }, &mut buf)?;
        self.send_bytes(&buf).await
    }

    pub async fn hello(&mut self) -> anyhow::Result<pb::Welcome> {
        self.send_frame(
            0,
            pb::client_frame::Kind::Hello(pb::Hello { min_version: 1, max_version: 1, software_version: "raw".into(), resume: None }),
        )
        .await?;
        self.next(PROMPT, |f| match &f.kind {
            Some(pb::server_frame::Kind::Welcome(w)) => Some(w.clone()),
            _ => None,
        })
        .await
    }

    /// The next frame `pick` selects (skipping heartbeats and others), or an
    /// error naming what was seen if the stream ends or time runs out.
    pub async fn next<T>(&mut self, limit: Duration, mut pick: impl FnMut(&ServerFrame) -> Option<T>) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(frame) = self.decoder.decode::<ServerFrame>(&mut self.buffer)? {
                if let Some(found) = pick(&frame) {
                    return Ok(found);
                }
                seen.push(frame);
            }
            match tokio::time::timeout_at(deadline, self.recv.read(&mut chunk)).await {
                Ok(Ok(Some(n))) => self.buffer.extend_from_slice(&chunk[..n]),
                Ok(Ok(None)) => bail!("stream finished; seen {seen:?}"),
                Ok(Err(e)) => bail!("stream failed: {e}; seen {seen:?}"),
                Err(_) => bail!("nothing selected within {limit:?}; seen {seen:?}"),
            }
        }
    }

    /// The next `Error` frame's code.
    pub async fn error(&mut self) -> anyhow::Result<(pb::ErrorCode, u64)> {
        self.next(PROMPT, |f| match &f.kind {
            Some(pb::server_frame::Kind::Error(e)) => Some((pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified), f.reply_to)),
            _ => None,
        })
        .await
    }

    /// Proves the connection still moves frames: a heartbeat is acked.
    pub async fn alive(&mut self, seq: u64) -> anyhow::Result<()> {
        self.send_frame(0, pb::client_frame::Kind::Heartbeat(pb::Heartbeat { seq, sent_at_ms: 1, ack_seq: 0 })).await?;
        self.next(PROMPT, |f| matches!(&f.kind, Some(pb::server_frame::Kind::HeartbeatAck(a)) if a.seq == seq).then_some(())).await
    }

    /// Waits for the connection to close; returns the application close code.
    pub async fn close_code(&self) -> anyhow::Result<Option<u64>> {
        let error = tokio::time::timeout(PROMPT, self.connection.closed()).await.context("connection still open")?;
        Ok(match error {
            quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
            _ => None,
        })
    }
}

// ---- the reference agent as a process ---------------------------------------

/// `fleetcall device run` as a child process; killed on drop.
pub struct Agent {
    pub child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    pub output: Vec<String>,
}

impl Agent {
    pub fn spawn(server: &Server, files: &DeviceFiles, id: &str, extra: &[&str]) -> anyhow::Result<Agent> {
        Agent::spawn_in(None, server.quic_addr, files, id, extra)
    }

    /// The agent inside the network namespace `netns` (`ip netns exec`,
    /// which execs it: the child is the agent itself, so signals reach it),
    /// or here.
    pub fn spawn_in(netns: Option<&str>, quic_addr: SocketAddr, files: &DeviceFiles, id: &str, extra: &[&str]) -> anyhow::Result<Agent> {
        let mut command = match netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_fleetcall")]);
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_fleetcall")),
        };
        let mut child = command
            .args(["device", "run", "--id", id, "--server", &quic_addr.to_string(), "--server-name", "localhost"])
            .arg("--ca")
            .arg(&files.ca)
            .arg("--cert")
            .arg(&files.cert)
            .arg("--key")
            .arg(&files.key)
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning fleetcall device run")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Agent { child, lines, output: Vec::new() })
    }

    /// Waits for the agent to exit on its own; its status and every line it
    /// printed.
    pub async fn exit(&mut self, limit: Duration) -> anyhow::Result<(std::process::ExitStatus, Vec<String>)> {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if start.elapsed() > limit {
                bail!("agent still running after {limit:?}; output {:?}", self.output);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The reader thread ends with the pipe.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
            self.output.push(line);
        }
        Ok((status, self.output.clone()))
    }

    /// Waits for a stdout line starting with `prefix` (or finds one printed
    /// earlier).
    pub async fn line(&mut self, prefix: &str, limit: Duration) -> anyhow::Result<String> {
        if let Some(line) = self.output.iter().find(|l| l.starts_with(prefix)) {
            return Ok(line.clone());
        }
        let start = Instant::now();
        loop {
            while let Ok(line) = self.lines.try_recv() {
                self.output.push(line.clone());
                if line.starts_with(prefix) {
                    return Ok(line);
                }
            }
            if start.elapsed() > limit {
                bail!("no line {prefix:?} within {limit:?}; output {:?}", self.output);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("agent exited ({status}) before {prefix:?}; output {:?}", self.output);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where test files go for this process.
pub fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fleetcall-quic-{}-{name}", std::process::id()))
}
