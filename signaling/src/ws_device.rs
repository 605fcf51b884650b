//! The device protocol over WebSocket, for browsers and other devices that
//! cannot speak QUIC: the same `fleetcall.v1` frames as on the QUIC stream,
//! one canonical proto3 JSON object per text message.
//!
//! The identity comes from the transport: a signed access token
//! ([`crate::tokens`]) in the `token` query parameter. A missing, forged or
//! expired token still gets its socket, long enough to hear why: one
//! `Rejected` frame (`UNAUTHENTICATED`, `CREDENTIAL_EXPIRED`) and the close
//! (browsers cannot read an HTTP status on a refused upgrade). Close codes
//! are 4000 + [`CloseReason`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use tracing::{Instrument, debug, info, info_span};

use crate::Error;
use crate::controller::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use crate::grants::{Credential, CredentialKey};
use crate::ids::{ConnId, DeviceId};
use crate::pb::{self, CloseReason, ErrorCode};
use crate::service::{ConnectionLink, ControlPlane, unix_now};
use crate::tokens::{AccessTokens, TokenError};
use crate::wire::{MAX_FRAME_BYTES, decode_json, encode_json};

/// Checks the tokens of WebSocket clients.
#[derive(Debug, Clone)]
pub struct TokenCheck {
    tokens: AccessTokens,
    /// The number of each guest (link, tab) seen, so a reconnecting tab
    /// keeps its identity and resumes its session.
    guests: Arc<Mutex<Guests>>,
}

#[derive(Debug, Default)]
struct Guests {
    numbers: HashMap<(CredentialKey, String), u64>,
    next: u64,
}

/// Guests remembered at most (demo links live two hours; beyond this the
/// oldest tabs just get a new number when they reconnect).
const MAX_GUESTS: usize = 10_000;

/// Longest tab id a guest may name itself by.
const MAX_GUEST_TAB: usize = 64;

/// Why a socket gets no session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// In the `Rejected` frame.
    pub code: ErrorCode,
    /// The close code (4000 + value).
    pub close: CloseReason,
    /// Human-readable, in the `Rejected` frame.
    pub reason: String,
}

impl TokenCheck {
    /// Checks tokens signed with `tokens`' key.
    pub fn new(tokens: AccessTokens) -> Self {
        TokenCheck { tokens, guests: Arc::default() }
    }

    /// The credential a token proves now, or why not. Each tab of a guest
    /// link (`tab`: an id the page chose, kept across its reconnects) is a
    /// numbered identity: `guest #1`, `guest #2`, ...
    pub fn check(&self, token: Option<&str>, tab: Option<&str>) -> Result<Credential, Refusal> {
        let refuse = |code, close, reason: String| Refusal { code, close, reason };
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(refuse(ErrorCode::Unauthenticated, CloseReason::Unauthenticated, "an access token is required (?token=)".into()));
        };
        let verified = self.tokens.verify(token, unix_now()).map_err(|e| match e {
            TokenError::Expired(_) => refuse(ErrorCode::CredentialExpired, CloseReason::CredentialExpired, e.to_string()),
            _ => refuse(ErrorCode::Unauthenticated, CloseReason::Unauthenticated, e.to_string()),
        })?;
        let mut credential = verified.credential;
        if verified.guest {
            let n = self.guest_number(credential.key, tab);
            credential.identity = DeviceId::new(format!("{} #{n}", credential.subject))
                .map_err(|e| refuse(ErrorCode::Unauthenticated, CloseReason::Unauthenticated, e.to_string()))?;
        }
        Ok(credential)
    }
}

impl TokenCheck {
    fn guest_number(&self, link: CredentialKey, tab: Option<&str>) -> u64 {
        // A poisoned lock only means a panic elsewhere mid-insert; the map
        // is still a valid map.
        let mut guests = self.guests.lock().unwrap_or_else(|e| e.into_inner());
        guests.next += 1;
        let fresh = guests.next;
        let Some(tab) = tab.filter(|t| !t.is_empty() && t.len() <= MAX_GUEST_TAB) else {
            return fresh;
        };
        if guests.numbers.len() >= MAX_GUESTS {
            guests.numbers.clear();
        }
        *guests.numbers.entry((link, tab.to_owned())).or_insert(fresh)
    }
}

/// Upgrades a request to a device socket: a session for the token's
/// credential, or a `Rejected` frame and a close. `guard` is dropped when
/// the socket's task has finished (a server's shutdown waits for that).
pub fn upgrade(ws: WebSocketUpgrade, credential: Result<Credential, Refusal>, control: ControlPlane, guard: impl Send + 'static) -> Response {
    // A little over the frame limit still arrives, so the controller can
    // answer FRAME_TOO_LARGE before closing; far bigger is cut by tungstenite.
    // Small buffers: a fleet of idle devices each holds one socket, and the
    // 128 KiB default read buffer made that about 134 KB per device.
    ws.max_message_size(2 * MAX_FRAME_BYTES)
        .max_frame_size(2 * MAX_FRAME_BYTES)
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .on_upgrade(move |socket| async move {
            match credential {
                Ok(credential) => {
                    let span = info_span!("ws_device", id = %credential.identity);
                    serve(socket, credential, control).instrument(span).await;
                }
                Err(refusal) => refuse(socket, refusal).await,
            }
            drop(guard);
        })
}

/// Tells a socket without a usable credential why, and closes it.
async fn refuse(mut socket: WebSocket, refusal: Refusal) {
    info!(code = refusal.code.as_str_name(), reason = %refusal.reason, "socket refused");
    let frame = pb::ServerFrame {
        reply_to: 0,
        seq: 0,
        kind: Some(pb::server_frame::Kind::Rejected(pb::Rejected {
            code: refusal.code as i32,
            reason: refusal.reason,
            server_min_version: PROTOCOL_VERSION_MIN,
            server_max_version: PROTOCOL_VERSION_MAX,
        })),
    };
    let send = async {
        if let Ok(text) = encode_json(&frame) {
            socket.send(Message::Text(Utf8Bytes::from(text))).await?;
        }
        let close = CloseFrame { code: 4000 + refusal.close as u16, reason: Utf8Bytes::from(refusal.close.as_str_name()) };
        socket.send(Message::Close(Some(close))).await?;
        // Read (and drop) what the client sent meanwhile, its hello most
        // often, until its close: a socket closed with unread data is reset
        // by the kernel, and the reset can destroy our close frame before
        // the client reads it.
        while let Some(Ok(message)) = socket.recv().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
        Ok::<(), axum::Error>(())
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send).await;
}

/// How long a socket the server closed may take to answer the close before
/// it is dropped (a client that stopped reading never answers).
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

async fn serve(socket: WebSocket, credential: Credential, control: ControlPlane) {
    let Ok((conn, link)) = control.connection_up(credential).await else { return };
    let (sink, mut stream) = socket.split();
    let mut writer = tokio::spawn(write_frames(sink, link));
    let read = async {
        loop {
            let message = match stream.next().await {
                Some(Ok(message)) => message,
                Some(Err(e)) => break e.to_string(),
                None => break "socket closed".to_owned(),
            };
            let result = match message {
                Message::Text(text) => match decode_json::<pb::ClientFrame>(&text) {
                    Ok(frame) => control.frame(conn, frame).await,
                    Err(error) => wire_error(&control, conn, error).await,
                },
                Message::Binary(_) => {
                    let error = Error::MalformedJson(serde_json::Error::io(std::io::Error::other("binary frames are not part of the protocol")));
                    wire_error(&control, conn, error).await
                }
                Message::Close(_) => break "socket closed".to_owned(),
                _ => Ok(()), // ping/pong: answered by axum
            };
            if result.is_err() {
                break "server stopping".to_owned();
            }
        }
    };
    let mut read = std::pin::pin!(read);
    // The writer ends when the controller closed the connection. A client
    // that stopped reading never answers that close and may keep its TCP
    // connection open without end: the reader gets a grace for the answer
    // (so an orderly close is not reset), then the socket is dropped.
    let detail = tokio::select! {
        detail = &mut read => detail,
        _ = &mut writer => tokio::time::timeout(CLOSE_GRACE, &mut read).await.unwrap_or_else(|_| "closed by the server".to_owned()),
    };
    // The control plane may already be gone at shutdown.
    let _ = control.connection_down(conn, detail).await;
    // Finished already if it won the race above; awaiting it again then
    // returns at once.
    if !writer.is_finished() {
        let _ = writer.await;
    }
    debug!(%conn, "device socket closed");
}

async fn wire_error(control: &ControlPlane, conn: ConnId, error: Error) -> Result<(), crate::service::Stopped> {
    control.wire_error(conn, error).await
}

async fn write_frames(mut sink: futures_util::stream::SplitSink<WebSocket, Message>, mut link: ConnectionLink) {
    loop {
        tokio::select! {
            // Frames before the close: the close comes after what was queued.
            biased;
            frame = link.frames.recv() => {
                let Some(frame) = frame else { break };
                let Ok(text) = encode_json(&frame) else { continue };
                tokio::select! {
                    sent = sink.send(Message::Text(Utf8Bytes::from(text))) => if sent.is_err() { return },
                    // A client that stopped reading blocks the send forever;
                    // any other close waits for this frame (often its error).
                    () = link.not_reading() => break,
                }
            }
            _ = link.close.changed() => break,
        }
    }
    let Some(reason) = *link.close.borrow() else { return };
    if reason != CloseReason::NotReading {
        let flush = async {
            while let Ok(frame) = link.frames.try_recv() {
                let Ok(text) = encode_json(&frame) else { continue };
                if sink.send(Message::Text(Utf8Bytes::from(text))).await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), flush).await;
    }
    let frame = CloseFrame { code: 4000 + reason as u16, reason: Utf8Bytes::from(reason.as_str_name()) };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), sink.send(Message::Close(Some(frame)))).await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::grants::{Grant, RoomPattern};
    use crate::tokens::TokenRequest;

    fn check() -> (TokenCheck, AccessTokens) {
        let tokens = AccessTokens::from_secret(b"0123456789abcdef0123456789abcdef");
        (TokenCheck::new(tokens.clone()), tokens)
    }

    fn mint(tokens: &AccessTokens, guest: bool, ttl: Duration) -> String {
        let grant = Grant { rooms: vec![RoomPattern::parse("demo").unwrap()], publish: true, subscribe: true };
        tokens.mint(&TokenRequest { identity: "guest".into(), ttl, grant, guest }, unix_now()).unwrap()
    }

    #[test]
    fn each_tab_of_a_guest_link_keeps_its_own_number() {
        let (check, tokens) = check();
        let link = mint(&tokens, true, Duration::from_secs(60));
        let id = |tab| check.check(Some(&link), tab).unwrap().identity.to_string();
        let first = id(Some("tab-a"));
        assert_eq!(id(Some("tab-a")), first, "a reconnecting tab keeps its identity");
        let second = id(Some("tab-b"));
        assert_ne!(second, first);
        assert!(first.starts_with("guest #") && second.starts_with("guest #"));
        // Without a (usable) tab id every connection is a new guest.
        assert_ne!(id(None), id(None));
        assert_ne!(id(Some(&"x".repeat(MAX_GUEST_TAB + 1))), first);
        // Tokens that are not guest links keep their subject.
        let plain = mint(&tokens, false, Duration::from_secs(60));
        assert_eq!(check.check(Some(&plain), Some("tab-a")).unwrap().identity.as_str(), "guest");
    }

    #[test]
    fn missing_bad_and_expired_tokens_are_refused_with_their_reason() {
        let (check, tokens) = check();
        let refusal = |token: Option<&str>| check.check(token, None).unwrap_err();
        assert_eq!(refusal(None).code, ErrorCode::Unauthenticated);
        assert_eq!(refusal(Some("")).close, CloseReason::Unauthenticated);
        assert_eq!(refusal(Some("not.a.token")).code, ErrorCode::Unauthenticated);
        let other = AccessTokens::from_secret(b"another installation's key......");
        let foreign = other.mint(&TokenRequest { identity: "x".into(), ttl: Duration::from_secs(60), grant: Grant::device(Vec::new()), guest: false }, unix_now()).unwrap();
        assert!(refusal(Some(&foreign)).reason.contains("signature"));
        let old = tokens
            .mint(&TokenRequest { identity: "x".into(), ttl: Duration::from_secs(60), grant: Grant::device(Vec::new()), guest: false }, unix_now() - 120)
            .unwrap();
        let expired = refusal(Some(&old));
        assert_eq!((expired.code, expired.close), (ErrorCode::CredentialExpired, CloseReason::CredentialExpired));
    }
}
