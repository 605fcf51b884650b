//! The device protocol over WebSocket: token identity, the same frames as on
//! QUIC in proto3 JSON, a call between two browser devices, bad input.

mod common;

use std::time::Duration;

use common::Server;
use fleetcall_signaling::pki::DeviceTokens;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message};

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn token(server: &Server, id: &str) -> String {
    DeviceTokens::open_or_init(&server.data_dir.join("pki")).unwrap().issue(id).unwrap()
}

async fn connect(server: &Server, token: &str) -> anyhow::Result<Socket> {
    let url = format!("{}/device?token={token}", server.ws_url());
    Ok(tokio_tungstenite::connect_async(url).await?.0)
}

async fn send(ws: &mut Socket, frame: Value) -> anyhow::Result<()> {
    ws.send(Message::Text(frame.to_string().into())).await?;
    Ok(())
}

/// The next frame that is not a heartbeat (heartbeats are acked on the way).
async fn next(ws: &mut Socket) -> anyhow::Result<Value> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next()).await?.ok_or_else(|| anyhow::anyhow!("socket ended"))??;
        let Message::Text(text) = message else { anyhow::bail!("unexpected {message:?}") };
        let frame: Value = serde_json::from_str(&text)?;
        if let Some(hb) = frame.get("heartbeat") {
            let seq = hb.get("seq").cloned().unwrap_or(json!("0"));
            send(ws, json!({ "heartbeatAck": { "seq": seq, "echoSentAtMs": hb.get("sentAtMs").cloned().unwrap_or(json!("0")) } })).await?;
            continue;
        }
        return Ok(frame);
    }
}

async fn register(server: &Server, id: &str) -> anyhow::Result<Socket> {
    let mut ws = connect(server, &token(server, id)).await?;
    send(&mut ws, json!({ "hello": { "minVersion": 1, "maxVersion": 1, "softwareVersion": "web 1" } })).await?;
    let welcome = next(&mut ws).await?;
    assert_eq!(welcome["welcome"]["deviceId"], id, "{welcome}");
    Ok(ws)
}

#[tokio::test]
async fn browser_devices_call_each_other_over_json_frames() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let mut nurse = register(&server, "kiosk-1").await?;
    let mut ward = register(&server, "kiosk-2").await?;

    send(&mut nurse, json!({ "opId": "1", "invite": { "callee": "kiosk-2" } })).await?;
    let ack = next(&mut nurse).await?;
    assert_eq!(ack["replyTo"], "1", "{ack}");
    let call_id = ack["ack"]["callId"].clone();
    assert!(call_id.is_string(), "{ack}");

    let incoming = loop {
        let frame = next(&mut ward).await?;
        if frame.get("incomingCall").is_some() {
            break frame;
        }
    };
    assert_eq!(incoming["incomingCall"]["from"], "kiosk-1");
    assert_eq!(incoming["incomingCall"]["callId"], call_id);

    send(&mut ward, json!({ "opId": "1", "decline": { "callId": call_id } })).await?;
    for ws in [&mut nurse, &mut ward] {
        let ended = loop {
            let frame = next(ws).await?;
            if frame.get("callEnded").is_some() {
                break frame;
            }
        };
        assert_eq!(ended["callEnded"]["reason"], "END_REASON_DECLINED", "{ended}");
    }

    let calls: Value = serde_json::from_str(&common::http_get(&format!("{}/api/calls", server.url), Some(&server.admin_token)).await?)?;
    assert_eq!(calls[0]["phase"], "CALL_PHASE_ENDED", "{calls}");
    assert_eq!(calls[0]["end_reason"], "END_REASON_DECLINED", "{calls}");
    Ok(())
}

#[tokio::test]
async fn bad_tokens_and_bad_frames_get_clear_answers() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let forged = token(&server, "kiosk-1").replacen("kiosk-1", "kiosk-9", 1);
    for bad in ["", "kiosk-1", forged.as_str()] {
        match connect(&server, bad).await {
            Err(e) => match e.downcast_ref::<tungstenite::Error>() {
                Some(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
                other => panic!("expected 401 for {bad:?}, got {other:?}"),
            },
            Ok(_) => panic!("token {bad:?} was accepted"),
        }
    }

    let mut ws = register(&server, "kiosk-1").await?;
    // Not JSON, then an unknown kind: errors, and the socket stays usable.
    send(&mut ws, json!("not a frame")).await?;
    ws.send(Message::Text("{{{".into())).await?;
    for _ in 0..2 {
        let error = next(&mut ws).await?;
        assert_eq!(error["error"]["code"], "ERROR_CODE_MALFORMED_FRAME", "{error}");
    }
    send(&mut ws, json!({ "opId": "5", "teleport": {} })).await?;
    let error = next(&mut ws).await?;
    assert_eq!(error["error"]["code"], "ERROR_CODE_UNKNOWN_MESSAGE", "{error}");
    send(&mut ws, json!({ "opId": "6", "accept": { "callId": "999" } })).await?;
    let error = next(&mut ws).await?;
    assert_eq!(error["error"]["code"], "ERROR_CODE_UNKNOWN_CALL", "{error}");

    // Oversize: an error, then close code 4000 + FRAME_TOO_LARGE.
    let huge = json!({ "opId": "7", "invite": { "callee": "x".repeat(70 * 1024) } });
    send(&mut ws, huge).await?;
    let error = next(&mut ws).await?;
    assert_eq!(error["error"]["code"], "ERROR_CODE_FRAME_TOO_LARGE", "{error}");
    let close = tokio::time::timeout(Duration::from_secs(5), ws.next()).await?;
    match close {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 4002),
        other => panic!("expected a close frame, got {other:?}"),
    }
    Ok(())
}
