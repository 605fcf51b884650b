//! Figures, run by hand: how long a `/metrics` scrape takes and how large it
//! is with 10,000 connected devices and 1,000 SFU participants.
//!
//! ```sh
//! cargo build --release --bin fleetcall
//! FLEETCALL_BIN=target/release/fleetcall cargo test --test metrics_scale -- --ignored --nocapture
//! ```
//!
//! `FLEETCALL_BIN` picks the server binary to measure (default: the test
//! build's); only the server's speed matters here, not the test client's.
//!
//! The fill goes through the real server, each with its own access token:
//! 10,000 devices register over the WebSocket device protocol, and 1,000
//! participants join 100 named rooms of 10 the same way (`roomJoin`, an SDP
//! offer from a str0m media peer that connects and answers every
//! renegotiation, but sends nothing, so the disconnect grace is set long).
//! Series carry no per-device or per-participant label, so the size should
//! not grow; the time can, because a scrape walks the controller's device
//! table and every worker's participants. Prints figures, asserts only that
//! the fill happened. Needs 13,000 open files (`ulimit -n`).

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use common::Server;
use fleetcall_peer::{MediaConfig, MediaPeer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const DEVICES: usize = 10_000;
const ROOMS: usize = 100;
const ROOM_SIZE: usize = 10;
/// Scrapes per measurement.
const SCRAPES: usize = 50;
/// Connections opened at once while filling.
const CONCURRENCY: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "figures, run by hand (see the file's docs)"]
async fn scrape_with_10000_devices_and_1000_participants() -> anyhow::Result<()> {
    let limit = open_file_limit()?;
    // A socket per device, a socket and a UDP socket per participant.
    ensure!(limit >= (DEVICES + 2 * ROOMS * ROOM_SIZE + 1_000) as u64, "needs about 13,000 open files, the limit is {limit}: run `ulimit -n 20000` first");
    let server = start(&[
        // No heartbeat falls due while filling and measuring, so the figures
        // are the scrape alone, not heartbeat traffic.
        "--heartbeat-secs",
        "600",
        // Participants send no media: keep them.
        "--disconnect-grace-secs",
        "3600",
        "--max-room-size",
        "100",
        "--metrics-room-labels",
        "true",
    ])?;

    println!("| fill | bytes (without room series) | lines (room series) | scrape median | p90 | max | server RSS |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    measure(&server, "empty server").await?;

    let started = Instant::now();
    let devices: Vec<_> = futures_util::stream::iter(0..DEVICES)
        .map(|i| {
            let url = server.ws_url(&server.token(&format!("bed-{i:05}"), &[]));
            async move { register(&url).await }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let fill_devices = started.elapsed();
    let scrape = common::http_get(&format!("{}/metrics", server.url), None).await?;
    ensure!(scrape.contains(&format!("fleetcall_devices{{reachability=\"online\",site=\"default\"}} {DEVICES}\n")), "not every device is online:\n{scrape}");
    measure(&server, "10,000 devices").await?;

    let started = Instant::now();
    let participants: Vec<_> = futures_util::stream::iter(0..ROOMS * ROOM_SIZE)
        .map(|i| {
            let room = format!("ward-{:03}", i % ROOMS);
            let url = server.ws_url(&server.token(&format!("visitor-{i:04}"), &[&room]));
            async move { join(&url, &room).await }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let fill_participants = started.elapsed();
    let stats = server.stats().await?;
    ensure!(stats["participants"] == ROOMS * ROOM_SIZE, "participants: {stats}");
    measure(&server, "10,000 devices + 1,000 participants in 100 rooms").await?;

    println!(
        "\nfilled in {:.1} s (devices) + {:.1} s (participants); SFU: {stats}",
        fill_devices.as_secs_f64(),
        fill_participants.as_secs_f64(),
    );
    drop((devices, participants));
    Ok(())
}

/// Like `Server::start`, with the binary from `FLEETCALL_BIN` if set.
fn start(extra: &[&str]) -> anyhow::Result<Server> {
    let bin = std::env::var_os("FLEETCALL_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fleetcall")), PathBuf::from);
    let data_dir = std::env::temp_dir().join(format!("fleetcall-scale-{}", std::process::id()));
    let mut child = Command::new(&bin)
        .args(["serve", "--http-addr", "127.0.0.1:0", "--media-port", "0", "--quic-addr", "127.0.0.1:0", "--data-dir"])
        .arg(&data_dir)
        .args(extra)
        // A line per connecting device would drown the figures.
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    println!("server: {}", bin.display());
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let (mut url, mut quic_addr) = (None, None);
    while url.is_none() {
        let line = lines.next().context("the server exited before serving")??;
        if let Some(addr) = line.strip_prefix("fleetcall quic ") {
            quic_addr = Some(addr.trim().parse()?);
        }
        url = line.strip_prefix("fleetcall serving ").map(|u| u.trim_end_matches('/').to_owned());
    }
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let admin_token = std::fs::read_to_string(data_dir.join("admin-token"))?.trim().to_owned();
    Ok(Server { child, url: url.context("url")?, quic_addr: quic_addr.context("no QUIC address")?, data_dir, admin_token, join_link: None })
}

/// Scrapes [`SCRAPES`] times one after the other and prints a table row.
async fn measure(server: &Server, fill: &str) -> anyhow::Result<()> {
    let url = format!("{}/metrics", server.url);
    let mut times = Vec::with_capacity(SCRAPES);
    let mut text = String::new();
    for _ in 0..SCRAPES {
        let start = Instant::now();
        text = common::http_get(&url, None).await?;
        times.push(start.elapsed());
    }
    times.sort();
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    let room_lines: Vec<&str> = text.lines().filter(|l| l.contains("fleetcall_room_participants")).collect();
    let room_bytes: usize = room_lines.iter().map(|l| l.len() + 1).sum();
    println!(
        "| {fill} | {} ({}) | {} ({}) | {} | {} | {} | {} MB |",
        text.len(),
        text.len() - room_bytes,
        text.lines().count(),
        room_lines.iter().filter(|l| !l.starts_with('#')).count(),
        ms(times[SCRAPES / 2]),
        ms(times[SCRAPES * 9 / 10]),
        ms(times[SCRAPES - 1]),
        resident_mb(server)?
    );
    Ok(())
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One device: hello, welcome, then a task that acks heartbeats (none falls
/// due with the long interval) and keeps the socket read.
async fn register(url: &str) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    send(&mut ws, json!({ "hello": { "minVersion": 1, "maxVersion": 1, "softwareVersion": "fill 1" } })).await?;
    let welcome = next(&mut ws).await?;
    ensure!(welcome.get("welcome").is_some(), "expected welcome, got {welcome}");
    Ok(tokio::spawn(async move {
        while let Ok(frame) = next(&mut ws).await {
            if let Some(hb) = frame.get("heartbeat") {
                let ack = json!({ "heartbeatAck": { "seq": hb["seq"], "echoSentAtMs": hb["sentAtMs"] } });
                if send(&mut ws, ack).await.is_err() {
                    break;
                }
            }
        }
    }))
}

/// One room participant: `roomJoin` and the offer of a str0m media peer
/// with an audio track; returns once the SFU's answer is applied. A task then
/// answers every renegotiation (an unanswered offer would end the
/// participation) and acks heartbeats.
async fn join(url: &str, room: &str) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (peer, events) = MediaPeer::start(MediaConfig::default()).await?;
    // Nothing is sent or listened to; the peer counts what it drops.
    drop(events);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    send(&mut ws, json!({ "hello": { "minVersion": 1, "maxVersion": 1, "softwareVersion": "fill 1" } })).await?;
    let welcome = next(&mut ws).await?;
    let session = welcome["welcome"]["sessionId"].clone();
    ensure!(session.is_string(), "{room}: expected welcome, got {welcome}");
    send(&mut ws, json!({ "opId": "1", "roomJoin": { "room": room } })).await?;
    let ack = next_reply(&mut ws, "1").await?;
    let call = ack["ack"]["callId"].clone();
    ensure!(call.is_string(), "{room}: roomJoin answered {ack}");
    let offer = peer.create_offer().await?;
    send(&mut ws, json!({ "opId": "2", "sdpOffer": { "callId": call, "sessionId": session, "revision": "1", "sdp": offer } })).await?;
    let ack = next_reply(&mut ws, "2").await?;
    ensure!(ack.get("ack").is_some(), "{room}: sdpOffer answered {ack}");
    loop {
        let frame = next(&mut ws).await?;
        if let Some(answer) = frame.get("sdpAnswer") {
            peer.accept_answer(answer["sdp"].as_str().unwrap_or_default().to_owned()).await?;
            break;
        }
        ensure!(frame.get("callEnded").is_none(), "{room}: {frame}");
    }
    Ok(tokio::spawn(async move {
        let mut op = 3u64;
        while let Ok(frame) = next(&mut ws).await {
            let reply = if let Some(hb) = frame.get("heartbeat") {
                json!({ "heartbeatAck": { "seq": hb["seq"], "echoSentAtMs": hb["sentAtMs"] } })
            } else if let Some(offer) = frame.get("sdpOffer") {
                let Ok(sdp) = peer.accept_offer(offer["sdp"].as_str().unwrap_or_default().to_owned()).await else { break };
                op += 1;
                json!({ "opId": op.to_string(), "sdpAnswer": { "callId": offer["callId"], "sessionId": offer["sessionId"], "revision": offer["revision"], "sdp": sdp } })
            } else {
                continue;
            };
            if send(&mut ws, reply).await.is_err() {
                break;
            }
        }
    }))
}

/// The reply to request `op`, skipping (and acking) what comes before it.
async fn next_reply(ws: &mut Socket, op: &str) -> anyhow::Result<Value> {
    loop {
        let frame = next(ws).await?;
        if let Some(hb) = frame.get("heartbeat") {
            send(ws, json!({ "heartbeatAck": { "seq": hb["seq"], "echoSentAtMs": hb["sentAtMs"] } })).await?;
        } else if frame["replyTo"] == op {
            return Ok(frame);
        }
    }
}

async fn send(ws: &mut Socket, frame: Value) -> anyhow::Result<()> {
    ws.send(Message::Text(frame.to_string().into())).await?;
    Ok(())
}

async fn next(ws: &mut Socket) -> anyhow::Result<Value> {
    loop {
        let message = ws.next().await.context("socket ended")??;
        if let Message::Text(text) = message {
            return Ok(serde_json::from_str(&text)?);
        }
    }
}

fn open_file_limit() -> anyhow::Result<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits.lines().find(|l| l.starts_with("Max open files")).context("no open-files limit")?;
    line.split_whitespace().nth(3).and_then(|soft| soft.parse().ok()).context("open-files limit")
}

fn resident_mb(server: &Server) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id()))?;
    let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).context("VmRSS")?;
    Ok(kb / 1024)
}
