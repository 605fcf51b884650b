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
//! The fill goes through the real server: 10,000 devices register over the
//! WebSocket device protocol and 1,000 participants join 100 rooms of 10 over
//! the room protocol (an SDP offer each; no media, so the disconnect grace is
//! set long). Series carry no per-device or per-participant label, so the
//! size should not grow; the time can, because a scrape walks the controller's
//! device table and every worker's participants. Prints figures, asserts only
//! that the fill happened. Needs 12,000 open files (`ulimit -n`).

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use common::Server;
use fleetcall_signaling::pki::DeviceTokens;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use str0m::media::{Direction, MediaKind};
use str0m::Rtc;
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
    ensure!(limit >= (DEVICES + ROOMS * ROOM_SIZE + 1_000) as u64, "needs about 12,000 open files, the limit is {limit}: run `ulimit -n 20000` first");
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
    let tokens = DeviceTokens::open_or_init(&server.data_dir.join("pki"))?;
    let ws_url = server.ws_url();
    let devices: Vec<_> = futures_util::stream::iter(0..DEVICES)
        .map(|i| {
            let token = tokens.issue(&format!("bed-{i:05}"));
            let url = ws_url.clone();
            async move { register(&url, &token?).await }
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
            let url = ws_url.clone();
            async move { join(&url, &format!("ward-{:03}", i % ROOMS), &format!("bed-{i}")).await }
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
    Ok(Server { child, url: url.context("url")?, quic_addr: quic_addr.context("no QUIC address")?, data_dir, admin_token })
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
async fn register(ws_url: &str, token: &str) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{ws_url}/device?token={token}")).await?;
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

/// One room participant with an audio track; server offers are left
/// unanswered (the participant keeps its place and its entries).
async fn join(ws_url: &str, room: &str, name: &str) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let offer = {
        let mut rtc = Rtc::new(Instant::now());
        let mut api = rtc.sdp_api();
        api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        api.apply().context("an offer")?.0.to_sdp_string()
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await?;
    send(&mut ws, json!({ "type": "join", "room": room, "name": name, "sdp": offer })).await?;
    let joined = next(&mut ws).await?;
    ensure!(joined["type"] == "joined", "{name}: {joined}");
    Ok(tokio::spawn(async move { while next(&mut ws).await.is_ok() {} }))
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
