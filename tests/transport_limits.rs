//! The transports' limits, crossed on a real server process over real
//! sockets: sockets per source address (HTTP and QUIC), idle
//! unauthenticated sockets (1,000 TCP connections that send nothing or
//! half a request; QUIC connections that open no stream; handshakes that
//! never complete), QUIC address validation under handshake load, a
//! WebSocket client that stops reading, and length prefixes far past the
//! frame limit. Each asserts the refusal and its counter, and that a device
//! on the same server keeps working meanwhile.
//!
//! Offenders connect from other loopback addresses (127.0.0.2, ...), so
//! per-address limits never touch the well-behaved devices on 127.0.0.1.

mod common;
mod quic_support;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use common::Server;
use fleetcall_signaling::pb::{CloseReason, ErrorCode};
use futures_util::{SinkExt, StreamExt};
use quic_support::{call_with_media, devices, enroll, Device, Raw, PROMPT};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::Message;

/// Generous bound for a busy 2-core machine.
const LIMIT: Duration = Duration::from_secs(20);

type Socket = tokio_tungstenite::WebSocketStream<TcpStream>;

// ---- helpers -------------------------------------------------------------------

/// `127.0.0.<n>`: every 127/8 address is this machine's.
fn loopback(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

fn http_addr(server: &Server) -> SocketAddr {
    server.url.trim_start_matches("http://").parse().expect("the server's HTTP address")
}

/// A TCP connection to the HTTP port from `from`.
async fn tcp_from(server: &Server, from: IpAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    Ok(socket.connect(http_addr(server)).await?)
}

/// The value of the series `name` whose labels include `labels`.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (head, value) = line.rsplit_once(' ')?;
        let rest = head.strip_prefix(name)?;
        if !(rest.is_empty() || rest.starts_with('{')) {
            return None;
        }
        labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))).then(|| value.parse().ok())?
    })
}

async fn metric(server: &Server, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let text = common::http_get(&format!("{}/metrics", server.url), None).await?;
    series(&text, name, labels).with_context(|| format!("no series {name}{labels:?} in\n{text}"))
}

/// Polls `name{labels}` until `done` holds; returns the value.
async fn wait_metric(server: &Server, name: &str, labels: &[(&str, &str)], limit: Duration, done: impl Fn(f64) -> bool) -> anyhow::Result<f64> {
    let start = Instant::now();
    loop {
        let value = metric(server, name, labels).await?;
        if done(value) {
            return Ok(value);
        }
        if start.elapsed() > limit {
            bail!("{name}{labels:?} is {value} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A device WebSocket from `from`, registered (`hello` answered).
async fn ws_register(server: &Server, from: IpAddr, id: &str) -> anyhow::Result<Socket> {
    ws_register_with(server, from, id, &[]).await
}

/// [`ws_register`] with a grant for `rooms`.
async fn ws_register_with(server: &Server, from: IpAddr, id: &str, rooms: &[&str]) -> anyhow::Result<Socket> {
    let stream = tcp_from(server, from).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(server.ws_url(&server.token(id, rooms)), stream).await?;
    ws_send(&mut ws, json!({ "hello": { "minVersion": 1, "maxVersion": 1, "softwareVersion": "web 1" } })).await?;
    loop {
        let frame = ws_next(&mut ws, PROMPT).await?;
        if frame.get("welcome").is_some() {
            return Ok(ws);
        }
    }
}

async fn ws_send(ws: &mut Socket, frame: Value) -> anyhow::Result<()> {
    ws.send(Message::Text(frame.to_string().into())).await?;
    Ok(())
}

async fn ws_next(ws: &mut Socket, limit: Duration) -> anyhow::Result<Value> {
    loop {
        let message = tokio::time::timeout(limit, ws.next()).await.context("no frame in time")?.context("socket ended")??;
        if let Message::Text(text) = message {
            return Ok(serde_json::from_str(&text)?);
        }
    }
}

/// A device on a WebSocket that proves, over and over, that its frames
/// move: a heartbeat every 100 ms, each acked. Records the slowest ack
/// and stops at the first failure.
struct Prober {
    slowest_ms: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
    probes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    async fn start(server: &Server, id: &str) -> anyhow::Result<Prober> {
        let mut ws = ws_register(server, loopback(1), id).await?;
        let slowest_ms = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(AtomicU64::new(0));
        let (slowest, fail, count) = (slowest_ms.clone(), failed.clone(), probes.clone());
        let task = tokio::spawn(async move {
            for seq in 1u64.. {
                let sent = Instant::now();
                let ok = async {
                    ws_send(&mut ws, json!({ "heartbeat": { "seq": seq.to_string(), "sentAtMs": "1" } })).await?;
                    loop {
                        let frame = ws_next(&mut ws, LIMIT).await?;
                        if let Some(hb) = frame.get("heartbeat") {
                            let seq = hb.get("seq").cloned().unwrap_or(json!("0"));
                            ws_send(&mut ws, json!({ "heartbeatAck": { "seq": seq, "echoSentAtMs": "1" } })).await?;
                        }
                        if frame["heartbeatAck"]["seq"] == json!(seq.to_string()) {
                            return anyhow::Ok(());
                        }
                    }
                }
                .await;
                if let Err(e) = ok {
                    eprintln!("prober: {e:#}");
                    fail.store(true, Ordering::Relaxed);
                    return;
                }
                slowest.fetch_max(sent.elapsed().as_millis() as u64, Ordering::Relaxed);
                count.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(Prober { slowest_ms, failed, probes, task })
    }

    /// Every probe was answered, the slowest within `bound`.
    fn check(&self, bound: Duration) -> anyhow::Result<()> {
        anyhow::ensure!(!self.failed.load(Ordering::Relaxed), "the well-behaved WebSocket device failed");
        anyhow::ensure!(self.probes.load(Ordering::Relaxed) > 0, "no probe answered");
        let slowest = Duration::from_millis(self.slowest_ms.load(Ordering::Relaxed));
        anyhow::ensure!(slowest <= bound, "a heartbeat took {slowest:?} to be acked");
        Ok(())
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Samples a device's received audio every 10 ms and keeps the longest time
/// without a new frame.
struct GapMonitor {
    longest_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl GapMonitor {
    fn start(device: &Device) -> GapMonitor {
        let Some(media) = &device.current else { panic!("{} has no media", device.id) };
        let peer = media.peer.clone();
        let longest_ms = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (longest, stopping) = (longest_ms.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut last = peer.stats().frames_received;
            let mut since = Instant::now();
            while !stopping.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let now = peer.stats().frames_received;
                if now != last {
                    longest.fetch_max(since.elapsed().as_millis() as u64, Ordering::Relaxed);
                    last = now;
                    since = Instant::now();
                }
            }
            longest.fetch_max(since.elapsed().as_millis() as u64, Ordering::Relaxed);
        });
        GapMonitor { longest_ms, stop, task: Some(task) }
    }

    async fn longest(mut self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        Duration::from_millis(self.longest_ms.load(Ordering::Relaxed))
    }
}

/// A QUIC client endpoint on `from` with the device identity of `files`.
fn quic_client(from: IpAddr, files: &fleetcall_signaling::pki::DeviceFiles) -> anyhow::Result<(quinn::Endpoint, quinn::ClientConfig)> {
    let tls = fleetcall_signaling::pki::device_tls(&std::fs::read(&files.ca)?, &std::fs::read(&files.cert)?, &std::fs::read(&files.key)?)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(fleetcall_signaling::quic::transport(&Default::default())));
    Ok((quinn::Endpoint::client(SocketAddr::new(from, 0))?, config))
}

/// Real QUIC Initial packets, each of a fresh connection attempt: a quinn
/// client "connects" to a UDP socket of ours that only records the first
/// datagram (the Initial carrying the ClientHello) and never answers.
async fn capture_initials(files: &fleetcall_signaling::pki::DeviceFiles, n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let sink = UdpSocket::bind("127.0.0.1:0").await?;
    let (endpoint, config) = quic_client(loopback(1), files)?;
    let mut initials = Vec::new();
    let mut attempts = Vec::new();
    let mut buf = vec![0u8; 2048];
    for _ in 0..n {
        // Kept until every Initial is taken, so none is a retransmission.
        attempts.push(endpoint.connect_with(config.clone(), sink.local_addr()?, "localhost")?);
        let len = tokio::time::timeout(PROMPT, sink.recv(&mut buf)).await.context("no Initial")??;
        initials.push(buf[..len].to_vec());
    }
    drop(attempts);
    endpoint.close(0u32.into(), b"");
    Ok(initials)
}

// ---- idle unauthenticated sockets -----------------------------------------------

/// 1,000 TCP connections to the HTTP port that never complete a request —
/// silent, half a request line and headers, or the first bytes of the
/// HTTP/2 preface (hyper reads those with no timer of its own) — are all
/// closed by the server within its request timeout plus a margin, the
/// server's open-socket count returns to its baseline, and meanwhile a
/// media call keeps its audio with no gap over 200 ms and a WebSocket device
/// has every heartbeat acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_unauthenticated_sockets_are_closed_and_calls_go_on() -> anyhow::Result<()> {
    const SOCKETS: usize = 1000;
    const TIMEOUT: Duration = Duration::from_secs(3);
    let server = Server::start(&["--http-request-timeout-secs", "3"])?;
    let mut alice = Device::connect(&server, "alice").await?;
    let mut bob = Device::connect(&server, "bob").await?;
    call_with_media(&mut alice, &mut bob).await?;
    let prober = Prober::start(&server, "kiosk").await?;
    let baseline = metric(&server, "fleetcall_transport_connections", &[("transport", "http")]).await?;
    let refused_before = metric(&server, "fleetcall_transport_refused_total", &[("transport", "http"), ("reason", "request_timeout")]).await?;
    let gaps = GapMonitor::start(&bob);

    // Spread over four addresses, each under the default 256 per address.
    let opened = Instant::now();
    let mut idle = Vec::with_capacity(SOCKETS);
    for i in 0..SOCKETS {
        let mut socket = tcp_from(&server, loopback(10 + (i / 250) as u8)).await?;
        match i % 3 {
            0 => {}
            1 => socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").await?,
            _ => socket.write_all(b"PRI * HTTP/2.0\r\n").await?,
        }
        idle.push(socket);
    }
    let open = wait_metric(&server, "fleetcall_transport_connections", &[("transport", "http")], LIMIT, |v| v >= baseline + SOCKETS as f64 * 0.9).await?;
    eprintln!("{open} HTTP sockets open with the idle ones (baseline {baseline})");

    // Every one is closed by the server: its read ends (EOF or reset).
    let closed: Vec<_> = futures_util::future::join_all(idle.into_iter().map(|mut socket| async move {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(TIMEOUT + LIMIT, socket.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(Instant::now()),
                Ok(Ok(_)) => continue, // hyper may answer a timed-out head with 408
                Err(_) => return None,
            }
        }
    }))
    .await;
    let still_open = closed.iter().filter(|c| c.is_none()).count();
    anyhow::ensure!(still_open == 0, "{still_open} idle sockets were never closed");
    let last = closed.iter().flatten().max().copied().context("none closed")?;
    let first = closed.iter().flatten().min().copied().context("none closed")?;
    eprintln!("closed {:?} to {:?} after opening began", first - opened, last - opened);
    assert!(first - opened >= TIMEOUT / 2, "closed before the timeout: {:?}", first - opened);
    assert!(last - opened <= TIMEOUT + LIMIT, "closed too late: {:?}", last - opened);

    wait_metric(&server, "fleetcall_transport_connections", &[("transport", "http")], LIMIT, |v| v <= baseline).await.context("back to the baseline")?;
    let refused = metric(&server, "fleetcall_transport_refused_total", &[("transport", "http"), ("reason", "request_timeout")]).await?;
    assert!(refused - refused_before >= SOCKETS as f64, "each idle socket is counted: {refused_before} -> {refused}");

    // The call went on with no gap, and the WebSocket device never waited.
    let longest = gaps.longest().await;
    assert!(longest <= Duration::from_millis(200), "bob's audio stopped for {longest:?}");
    let heard = bob.media_stats().frames_received;
    bob.hears(heard, 25, PROMPT).await?;
    prober.check(Duration::from_secs(1))?;
    let table = devices(&server).await?;
    assert_eq!(table["alice"]["reachability"], "online", "{}", table["alice"]);
    Ok(())
}

/// A WebSocket that never says Hello is closed with HELLO_TIMEOUT (the
/// controller's hello timeout, 10 s by default), and a QUIC connection that
/// completes its handshake but never opens the control stream is closed
/// with HELLO_TIMEOUT after the stream timeout, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_never_say_hello_are_closed() -> anyhow::Result<()> {
    let server = Server::start(&["--quic-stream-timeout-secs", "1"])?;
    let _alice = Device::connect(&server, "alice").await?;

    // QUIC: the handshake, then nothing (quinn opens a stream on the wire
    // only with its first byte, so no stream is ever opened here).
    let files = enroll(&server, "mute")?;
    let (endpoint, config) = quic_client(loopback(2), &files)?;
    let started = Instant::now();
    let connection = endpoint.connect_with(config, server.quic_addr, "localhost")?.await?;
    let error = tokio::time::timeout(LIMIT, connection.closed()).await.context("the silent connection stayed open")?;
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(close.error_code.into_inner(), CloseReason::HelloTimeout as u64),
        other => bail!("expected HELLO_TIMEOUT, got {other}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(800), "not before the stream timeout: {:?}", started.elapsed());
    assert!(metric(&server, "fleetcall_transport_refused_total", &[("transport", "quic"), ("reason", "stream_timeout")]).await? >= 1.0);

    // WebSocket: a valid token, then nothing.
    let stream = tcp_from(&server, loopback(2)).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(server.ws_url(&server.token("quiet", &[])), stream).await?;
    let started = Instant::now();
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10) + LIMIT, ws.next()).await.context("the silent socket stayed open")? {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => bail!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.map(|f| u16::from(f.code)), Some(4000 + CloseReason::HelloTimeout as u16));
    assert!(started.elapsed() >= Duration::from_secs(8), "not before the hello timeout: {:?}", started.elapsed());

    // The registered device was never disturbed, and a new one registers.
    let mut probe = Raw::enrolled(&server, "probe").await?;
    probe.hello().await?;
    probe.alive(1).await?;
    let table = devices(&server).await?;
    assert_eq!(table["alice"]["reachability"], "online", "{}", table["alice"]);
    Ok(())
}

// ---- sockets per address ----------------------------------------------------------

/// Over its limit an address's next TCP connection is closed at once and
/// its next QUIC connection refused (after a Retry proves the address is
/// real), each counted; devices on another address register and call
/// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_over_its_socket_limit_is_refused_and_others_go_on() -> anyhow::Result<()> {
    let server = Server::start(&["--http-max-connections-per-ip", "4", "--quic-max-connections-per-ip", "2"])?;

    // HTTP: four held connections from 127.0.0.2, then a fifth.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tcp_from(&server, loopback(2)).await?);
    }
    wait_metric(&server, "fleetcall_transport_connections", &[("transport", "http")], LIMIT, |v| v >= 4.0).await?;
    let mut fifth = tcp_from(&server, loopback(2)).await?;
    let _ = fifth.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut answer = Vec::new();
    match tokio::time::timeout(PROMPT, fifth.read_to_end(&mut answer)).await {
        Ok(_) => assert!(answer.is_empty(), "the fifth connection got an answer: {}", String::from_utf8_lossy(&answer)),
        Err(_) => bail!("the fifth connection from one address stayed open"),
    }
    assert!(metric(&server, "fleetcall_transport_refused_total", &[("transport", "http"), ("reason", "per_address")]).await? >= 1.0);
    // Another address is not affected: a page and a device socket.
    let (status, _) = common::http_get_status(&format!("{}/healthz", server.url), None).await?;
    assert_eq!(status, 200);
    let mut kiosk = ws_register(&server, loopback(1), "kiosk").await?;
    ws_send(&mut kiosk, json!({ "heartbeat": { "seq": "1", "sentAtMs": "1" } })).await?;
    // A closed connection gives its slot back.
    drop(held.pop());
    let start = Instant::now();
    loop {
        let mut again = tcp_from(&server, loopback(2)).await?;
        again.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(PROMPT, again.read_to_end(&mut answer)).await;
        if answer.starts_with(b"HTTP/1.1 200") {
            break;
        }
        anyhow::ensure!(start.elapsed() < LIMIT, "the freed slot never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // QUIC: two connections from 127.0.0.2, then a third.
    let files = enroll(&server, "crowd")?;
    let (endpoint, config) = quic_client(loopback(2), &files)?;
    let mut connections = Vec::new();
    for _ in 0..2 {
        connections.push(endpoint.connect_with(config.clone(), server.quic_addr, "localhost")?.await?);
    }
    let retries = metric(&server, "fleetcall_quic_retries_total", &[]).await?;
    // With a fresh client config: the first two's token store holds the
    // server's address-validation tokens (NEW_TOKEN), which need no Retry.
    let (fresh, fresh_config) = quic_client(loopback(2), &files)?;
    let third = fresh.connect_with(fresh_config, server.quic_addr, "localhost")?.await;
    match third {
        Err(quinn::ConnectionError::ConnectionClosed(close)) => assert_eq!(close.error_code, quinn::TransportErrorCode::CONNECTION_REFUSED),
        other => bail!("the third connection from one address was not refused: {other:?}"),
    }
    assert!(metric(&server, "fleetcall_transport_refused_total", &[("transport", "quic"), ("reason", "per_address")]).await? >= 1.0);
    assert!(metric(&server, "fleetcall_quic_retries_total", &[]).await? > retries, "an address at its limit is validated first");
    // Devices on 127.0.0.1 register and call.
    let mut alice = Device::connect(&server, "alice").await?;
    let mut bob = Device::connect(&server, "bob").await?;
    call_with_media(&mut alice, &mut bob).await?;
    // The kiosk's heartbeat was acked all along.
    loop {
        let frame = ws_next(&mut kiosk, PROMPT).await?;
        if frame["heartbeatAck"]["seq"] == "1" {
            break;
        }
    }
    drop(connections);
    Ok(())
}

// ---- QUIC address validation ----------------------------------------------------

/// With the Retry threshold at 0 every new address is validated first:
/// real devices follow the Retry, register and call; the counter rises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_follow_the_retry_when_every_address_is_validated() -> anyhow::Result<()> {
    let server = Server::start(&["--quic-retry-threshold", "0"])?;
    let mut alice = Device::connect(&server, "alice").await?;
    let mut bob = Device::connect(&server, "bob").await?;
    call_with_media(&mut alice, &mut bob).await?;
    let retries = metric(&server, "fleetcall_quic_retries_total", &[]).await?;
    assert!(retries >= 2.0, "each device's first Initial got a Retry: {retries}");
    Ok(())
}

/// Forged Initials (real ones, replayed from an address that never answers)
/// hold at most `retry_threshold` handshakes: past it every one gets a Retry
/// and no slot. The handshakes they hold end at the handshake timeout. A
/// real device connects meanwhile (through a Retry) and its call goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_initials_cost_no_slot_past_the_retry_threshold() -> anyhow::Result<()> {
    const FORGED: usize = 40;
    const THRESHOLD: usize = 4;
    let server = Server::start(&["--quic-retry-threshold", "4", "--quic-handshake-timeout-secs", "2"])?;
    let mut alice = Device::connect(&server, "alice").await?;
    let mut bob = Device::connect(&server, "bob").await?;
    call_with_media(&mut alice, &mut bob).await?;
    let gaps = GapMonitor::start(&bob);
    let retries_before = metric(&server, "fleetcall_quic_retries_total", &[]).await?;
    let open_before = metric(&server, "fleetcall_transport_connections", &[("transport", "quic")]).await?;

    let files = enroll(&server, "forger")?;
    let initials = capture_initials(&files, FORGED).await?;
    let forger = UdpSocket::bind(SocketAddr::new(loopback(3), 0)).await?;
    for initial in &initials {
        forger.send_to(initial, server.quic_addr).await?;
    }
    let retries = wait_metric(&server, "fleetcall_quic_retries_total", &[], LIMIT, |v| v >= retries_before + (FORGED - THRESHOLD) as f64).await?;
    let handshakes = metric(&server, "fleetcall_quic_handshakes", &[]).await?;
    assert!(handshakes <= THRESHOLD as f64, "{handshakes} handshakes held, threshold {THRESHOLD}");
    let open = metric(&server, "fleetcall_transport_connections", &[("transport", "quic")]).await?;
    assert!(open - open_before <= THRESHOLD as f64, "forged Initials hold {} slots", open - open_before);
    eprintln!("{} retries, {handshakes} handshakes held", retries - retries_before);

    // A real device gets through while the forged handshakes are held.
    let carol = Device::connect(&server, "carol").await?;
    // The held ones end at the handshake timeout.
    wait_metric(&server, "fleetcall_quic_handshakes", &[], LIMIT, |v| v == 0.0).await?;
    assert!(metric(&server, "fleetcall_transport_refused_total", &[("transport", "quic"), ("reason", "handshake_timeout")]).await? >= 1.0);
    wait_metric(&server, "fleetcall_transport_connections", &[("transport", "quic")], LIMIT, |v| v <= open_before + 1.0).await?;

    let longest = gaps.longest().await;
    assert!(longest <= Duration::from_millis(200), "bob's audio stopped for {longest:?}");
    let table = devices(&server).await?;
    for id in ["alice", "bob", "carol"] {
        assert_eq!(table[id]["reachability"], "online", "{}", table[id]);
    }
    drop(carol);
    Ok(())
}

// ---- a WebSocket client that stops reading ----------------------------------------

/// A WebSocket client in a room that stops reading (and writing), its TCP
/// connection open and its receive buffer small, while the server pushes to
/// it (another device joins and leaves the room over and over) is closed
/// NOT_READING and its socket released; another WebSocket device keeps
/// every heartbeat acked promptly meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_stops_reading_is_closed_and_blocks_nobody() -> anyhow::Result<()> {
    // The churner pushes as fast as it can: not what the message rate limit
    // is about here.
    let server = Server::start(&["--messages-per-second", "100000", "--message-burst", "100000"])?;
    let prober = Prober::start(&server, "kiosk").await?;
    let closed_before = metric(&server, "fleetcall_connections_closed_total", &[("reason", "not_reading")]).await?;

    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    socket.bind(SocketAddr::new(loopback(2), 0))?;
    let stream = socket.connect(http_addr(&server)).await?;
    let (mut greedy, _) = tokio_tungstenite::client_async(server.ws_url(&server.token("greedy", &["ward"])), stream).await?;
    ws_send(&mut greedy, json!({ "hello": { "minVersion": 1, "maxVersion": 1, "softwareVersion": "web 1" } })).await?;
    while ws_next(&mut greedy, PROMPT).await?.get("welcome").is_none() {}
    ws_request(&mut greedy, 1, json!({ "roomJoin": { "room": "ward" } })).await?;
    // From here on `greedy` neither reads nor writes.

    let mut churn = ws_register_with(&server, loopback(1), "churn", &["ward"]).await?;
    let started = Instant::now();
    let mut op = 1u64;
    let mut closed = closed_before;
    while closed <= closed_before {
        for _ in 0..50 {
            op += 1;
            let ack = ws_request(&mut churn, op, json!({ "roomJoin": { "room": "ward" } })).await?;
            let call = ack["ack"]["callId"].clone();
            op += 1;
            ws_request(&mut churn, op, json!({ "groupLeave": { "callId": call } })).await?;
        }
        closed = metric(&server, "fleetcall_connections_closed_total", &[("reason", "not_reading")]).await?;
        anyhow::ensure!(started.elapsed() < LIMIT, "the server kept queueing for a client that does not read");
    }
    eprintln!("closed NOT_READING after {} joins and leaves", op / 2);
    // The server lets go of the socket while the client still reads
    // nothing (the kiosk, the churner and this scrape are what stays open).
    wait_metric(&server, "fleetcall_transport_connections", &[("transport", "http")], LIMIT, |v| v <= 3.0)
        .await
        .context("the server kept the socket of a client that stopped reading")?;
    // Reading it now drains what was buffered, then ends.
    let ended = tokio::time::timeout(LIMIT, async {
        while let Some(Ok(_)) = greedy.next().await {}
    })
    .await;
    anyhow::ensure!(ended.is_ok(), "the server kept the socket of a client that stopped reading");
    let table = devices(&server).await?;
    assert_eq!(table["greedy"]["reachability"], "unreachable", "{}", table["greedy"]);
    prober.check(Duration::from_secs(1))?;
    Ok(())
}

/// Sends a request with `op` as its id and returns the reply to it,
/// answering heartbeats on the way; an error reply is an error.
async fn ws_request(ws: &mut Socket, op: u64, mut frame: Value) -> anyhow::Result<Value> {
    frame["opId"] = json!(op.to_string());
    ws_send(ws, frame).await?;
    loop {
        let reply = ws_next(ws, PROMPT).await?;
        if let Some(hb) = reply.get("heartbeat") {
            let seq = hb.get("seq").cloned().unwrap_or(json!("0"));
            ws_send(ws, json!({ "heartbeatAck": { "seq": seq, "echoSentAtMs": "1" } })).await?;
        }
        if reply["replyTo"] == json!(op.to_string()) {
            anyhow::ensure!(reply.get("error").is_none(), "request {op} refused: {reply}");
            return Ok(reply);
        }
    }
}

// ---- length prefixes far past the frame limit ----------------------------------------

/// A QUIC length prefix announcing 4 GiB and then nothing is refused on the
/// prefix alone (FRAME_TOO_LARGE at once, no body awaited); a WebSocket
/// frame header announcing 4 GiB is cut at once too. A device on the same
/// server keeps its call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_gib_announced_are_refused_on_the_header() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let mut alice = Device::connect(&server, "alice").await?;
    let mut bob = Device::connect(&server, "bob").await?;
    call_with_media(&mut alice, &mut bob).await?;

    let mut big = Raw::enrolled(&server, "big").await?;
    big.hello().await?;
    // 2^32 as a varint, and no body.
    big.send_bytes(&[0x80, 0x80, 0x80, 0x80, 0x10]).await?;
    assert_eq!(big.error().await?.0, ErrorCode::FrameTooLarge);
    assert_eq!(big.close_code().await?, Some(CloseReason::FrameTooLarge as u64));

    let mut ws = ws_register(&server, loopback(2), "huge").await?;
    // FIN + text, masked, 64-bit length 2^32, the mask, and nothing else.
    let mut header = vec![0x81, 0xff];
    header.extend_from_slice(&(1u64 << 32).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    ws.get_mut().write_all(&header).await?;
    let cut = tokio::time::timeout(PROMPT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    anyhow::ensure!(cut.is_ok(), "a frame header announcing 4 GiB kept the socket open");

    let heard = bob.media_stats().frames_received;
    bob.hears(heard, 25, PROMPT).await?;
    let table = devices(&server).await?;
    assert_eq!(table["alice"]["reachability"], "online", "{}", table["alice"]);
    Ok(())
}
