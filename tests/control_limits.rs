//! The message-rate limit over a real WebSocket on the real server binary: a
//! browser socket that floods frames gets `RATE_LIMITED` answers and is
//! closed with `RATE_LIMITED` (4014), counted in the metrics, while another
//! browser on the same server keeps its room, its heartbeats and its
//! answers.

mod common;

use std::time::{Duration, Instant};

use anyhow::Context;
use common::Server;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Generous for a busy 2-core machine.
const LIMIT: Duration = Duration::from_secs(15);

async fn send(ws: &mut Socket, frame: Value) -> anyhow::Result<()> {
    ws.send(Message::Text(frame.to_string().into())).await?;
    Ok(())
}

/// The next message: a JSON frame, or the close code.
async fn recv(ws: &mut Socket) -> anyhow::Result<Result<Value, u16>> {
    loop {
        let message = tokio::time::timeout(LIMIT, ws.next()).await.context("waiting for a frame")?.context("socket ended")??;
        match message {
            Message::Text(text) => return Ok(Ok(serde_json::from_str(&text)?)),
            Message::Close(frame) => return Ok(Err(frame.map_or(0, |f| u16::from(f.code)))),
            _ => {}
        }
    }
}

/// Reads until `want` matches a frame, answering server heartbeats on the
/// way; returns the frame and how many server heartbeats came meanwhile.
async fn until(ws: &mut Socket, what: &str, want: impl Fn(&Value) -> bool) -> anyhow::Result<(Value, usize)> {
    let mut heartbeats = 0;
    loop {
        let frame = recv(ws).await?.map_err(|code| anyhow::anyhow!("closed ({code}) while waiting for {what}"))?;
        if let Some(hb) = frame.get("heartbeat") {
            heartbeats += 1;
            send(ws, json!({ "heartbeatAck": { "seq": hb["seq"], "echoSentAtMs": hb["sentAtMs"] } })).await?;
        }
        if want(&frame) {
            return Ok((frame, heartbeats));
        }
    }
}

async fn register(server: &Server, id: &str) -> anyhow::Result<Socket> {
    let token = server.token(id, &["ward-*"]);
    let mut ws = tokio_tungstenite::connect_async(server.ws_url(&token)).await?.0;
    send(&mut ws, json!({ "hello": { "minVersion": 1, "maxVersion": 1, "softwareVersion": "limits 1" } })).await?;
    let (welcome, _) = until(&mut ws, "the welcome", |f| f.get("welcome").is_some()).await?;
    assert_eq!(welcome["welcome"]["deviceId"], id, "{welcome}");
    Ok(ws)
}

fn series(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_browser_is_rate_limited_and_closed_while_another_keeps_its_room() -> anyhow::Result<()> {
    // The default rate (20/s, burst 100); a small refusal budget also
    // proves the flag reaches the controller.
    let server = Server::start(&["--max-rate-limited-frames", "10"])?;
    let mut nurse = register(&server, "kiosk-nurse").await?;
    send(&mut nurse, json!({ "opId": "1", "roomJoin": { "room": "ward-3" } })).await?;
    let (ack, _) = until(&mut nurse, "the join ack", |f| f["replyTo"] == "1").await?;
    assert!(ack["ack"]["callId"].is_string(), "{ack}");

    // 1,000 heartbeats as fast as the socket takes them, then read what
    // came back. Sends may fail once the server has closed.
    let mut flood = register(&server, "kiosk-flood").await?;
    let started = Instant::now();
    for seq in 1..=1000u32 {
        let frame = json!({ "heartbeat": { "seq": seq.to_string(), "sentAtMs": "0", "ackSeq": "0" } });
        if flood.send(Message::Text(frame.to_string().into())).await.is_err() {
            break;
        }
    }
    let (mut acks, mut limited) = (0, 0);
    let close = loop {
        match recv(&mut flood).await {
            Ok(Ok(frame)) => {
                acks += usize::from(frame.get("heartbeatAck").is_some());
                if frame["error"]["code"] == "ERROR_CODE_RATE_LIMITED" {
                    limited += 1;
                    assert!(frame["error"]["message"].as_str().unwrap_or("").contains("messages a second"), "{frame}");
                }
            }
            Ok(Err(code)) => break code,
            Err(e) => return Err(e.context(format!("no close after {acks} acks and {limited} refusals"))),
        }
    };
    assert_eq!(close, 4014, "closed with RATE_LIMITED");
    assert_eq!(limited, 11, "refusals answered until the budget of 10 ran out");
    // The burst (less the Hello) and whatever the rate refilled meanwhile.
    let refill = (started.elapsed().as_secs_f64() * 20.0).ceil() as usize + 2;
    assert!((90..=100 + refill).contains(&acks), "{acks} heartbeats processed");

    // The other browser on the same server: its heartbeats keep coming and
    // being acked, and its requests are answered.
    let (_, heartbeats) = until(&mut nurse, "a server heartbeat", |f| f.get("heartbeat").is_some()).await?;
    assert!(heartbeats >= 1);
    send(&mut nurse, json!({ "heartbeat": { "seq": "1", "sentAtMs": "0", "ackSeq": "0" } })).await?;
    until(&mut nurse, "the ack of its heartbeat", |f| f["heartbeatAck"]["seq"] == "1").await?;
    send(&mut nurse, json!({ "opId": "2", "groupLeave": { "callId": ack["ack"]["callId"] } })).await?;
    let (left, _) = until(&mut nurse, "the leave ack", |f| f["replyTo"] == "2").await?;
    assert!(left.get("ack").is_some(), "{left}");

    let metrics = common::http_get(&format!("{}/metrics", server.url), None).await?;
    let refused = series(&metrics, "fleetcall_control_refused_total{reason=\"rate_limited\",site=\"default\"}")
        .or_else(|| series(&metrics, "fleetcall_control_refused_total{site=\"default\",reason=\"rate_limited\"}"))
        .with_context(|| format!("no refused series in\n{metrics}"))?;
    assert_eq!(refused, 11.0);
    let closed = metrics.lines().find(|l| l.starts_with("fleetcall_connections_closed_total") && l.contains("reason=\"rate_limited\""));
    assert!(closed.is_some_and(|l| l.ends_with(" 1")), "{closed:?}");
    Ok(())
}
