//! SIGTERM: connected clients are told `left: shutdown`, their sockets close
//! with "going away", and the process exits cleanly within its deadline.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use str0m::media::{Direction, MediaKind};
use str0m::Rtc;
use tokio_tungstenite::tungstenite::Message;

fn offer() -> String {
    let mut rtc = Rtc::new(Instant::now());
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    api.apply().unwrap().0.to_sdp_string()
}

#[tokio::test]
async fn sigterm_tells_clients_and_exits_within_the_deadline() -> anyhow::Result<()> {
    let mut server = Server::start(&["--shutdown-timeout-secs", "3"])?;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url()).await?;
    let join = json!({ "type": "join", "room": "shutdown", "name": "device", "sdp": offer() });
    ws.send(Message::Text(join.to_string().into())).await?;
    let joined: Value = match ws.next().await.unwrap()? {
        Message::Text(t) => serde_json::from_str(&t)?,
        other => anyhow::bail!("unexpected {other:?}"),
    };
    assert_eq!(joined["type"], "joined", "{joined}");

    let pid = server.child.id();
    assert!(common::sigterm(pid)?);
    let signalled = Instant::now();

    let mut left = None;
    let mut close_code = None;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        match message? {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t)?;
                if v["type"] == "left" {
                    left = Some(v["reason"].clone());
                }
            }
            Message::Close(frame) => {
                close_code = frame.map(|f| u16::from(f.code));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(left, Some(json!("shutdown")));
    assert_eq!(close_code, Some(1001));

    // Deadline 3 s; allow generous slack for a busy machine.
    let exit = loop {
        if let Some(status) = server.child.try_wait()? {
            break status;
        }
        anyhow::ensure!(signalled.elapsed() < Duration::from_secs(10), "server still running 10 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "clean exit: {exit}");
    Ok(())
}
