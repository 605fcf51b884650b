//! The device protocol over WebSocket: token identity, the same frames as on
//! QUIC in proto3 JSON, a call between two browser devices, bad tokens and
//! bad input.

mod common;

use std::time::Duration;

use common::Server;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn token(server: &Server, id: &str) -> String {
    server.token(id, &[])
}

async fn connect(server: &Server, token: &str) -> anyhow::Result<Socket> {
    Ok(tokio_tungstenite::connect_async(server.ws_url(token)).await?.0)
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
    // What the token allows, as the server read it.
    assert_eq!(welcome["welcome"]["grant"]["publish"], true, "{welcome}");
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
    // A token's payload edited to another identity keeps a signature that
    // no longer matches.
    let genuine = token(&server, "kiosk-1");
    let parts: Vec<&str> = genuine.split('.').collect();
    let claims = String::from_utf8(common::base64url_decode(parts[1]))?;
    assert!(claims.contains(r#""sub":"kiosk-1""#), "{claims}");
    assert_eq!(common::base64url_encode(claims.as_bytes()), parts[1], "the payload re-encodes as it came");
    let forged = [parts[0], &common::base64url_encode(claims.replace(r#""sub":"kiosk-1""#, r#""sub":"kiosk-9""#).as_bytes()), parts[2]].join(".");
    let expired = server.expired_token("kiosk-1", &[]);
    let refused = [
        ("", "ERROR_CODE_UNAUTHENTICATED", 4010),
        ("kiosk-1", "ERROR_CODE_UNAUTHENTICATED", 4010),
        (forged.as_str(), "ERROR_CODE_UNAUTHENTICATED", 4010),
        (expired.as_str(), "ERROR_CODE_CREDENTIAL_EXPIRED", 4011),
    ];
    for (bad, code, close) in refused {
        // The upgrade succeeds, so a browser can read why: one frame, then the close.
        let mut ws = connect(&server, bad).await?;
        let frame = next(&mut ws).await?;
        assert_eq!(frame["rejected"]["code"], code, "token {bad:?}: {frame}");
        assert!(frame["rejected"]["reason"].as_str().is_some_and(|r| !r.is_empty()), "{frame}");
        if bad == forged {
            // Refused for its signature, not for its shape.
            assert!(frame["rejected"]["reason"].as_str().is_some_and(|r| r.contains("signature")), "{frame}");
        }
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await? {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), close, "token {bad:?}"),
            other => panic!("token {bad:?}: expected a close frame, got {other:?}"),
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

/// A browser sends `hello` as soon as the socket opens, so it often writes
/// into a socket the server is already refusing. The close code must still
/// arrive: were the server to drop the socket with the hello unread, its
/// kernel would answer with a reset that can destroy the close frame before
/// the client reads it (the client would see 1006, not 4010).
#[tokio::test]
async fn a_refused_socket_keeps_its_close_code_when_hello_comes_at_once() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let (mut lost, mut unexplained) = (0, 0);
    for _ in 0..100 {
        let mut ws = connect(&server, "").await?;
        send(&mut ws, json!({ "hello": { "minVersion": 1, "maxVersion": 1, "softwareVersion": "web 1" } })).await?;
        let (mut close, mut rejected) = (None, false);
        while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            match message {
                Ok(Message::Close(frame)) => {
                    close = frame.map(|f| u16::from(f.code));
                    break;
                }
                Ok(Message::Text(text)) => rejected |= text.contains("ERROR_CODE_UNAUTHENTICATED"),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        lost += u32::from(close != Some(4010));
        unexplained += u32::from(!rejected);
    }
    assert_eq!((lost, unexplained), (0, 0), "of 100 refused sockets, {lost} lost their close code and {unexplained} their rejected frame");
    Ok(())
}
