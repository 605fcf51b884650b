//! The browser WebSocket transport: one task per socket speaking
//! [`crate::protocol`] and driving the SFU through its handle.
//!
//! A socket is in one room at most. Closing the socket leaves the room at once
//! (`signaling_closed`), so a closed tab never lingers for the ICE grace.

use std::net::SocketAddr;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use fleetcall_sfu::{LeaveReason, RoomId, SdpAnswer, SdpOffer, Session, SfuError, SfuEvent, SfuHandle};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, info_span, Instrument};

use crate::protocol::{
    valid_display_name, valid_room_name, ClientMessage, ErrorCode, ParticipantInfo, ServerMessage, MAX_FRAME_BYTES,
};

/// Close code for a frame over the size limit (RFC 6455 "message too big").
const CLOSE_TOO_BIG: u16 = 1009;
/// Close code when the server goes away.
const CLOSE_GOING_AWAY: u16 = 1001;

/// What a socket task needs from the server.
#[derive(Debug, Clone)]
pub struct WsContext {
    /// The media plane.
    pub sfu: SfuHandle,
    /// Turns true when the server starts shutting down.
    pub shutdown: watch::Receiver<bool>,
}

/// Upgrades an HTTP request to a signaling socket.
pub fn upgrade(ws: WebSocketUpgrade, peer: SocketAddr, context: WsContext) -> Response {
    // Frames a bit over the limit still arrive, so they get a clear error
    // instead of a bare protocol failure; far bigger ones are cut off by tungstenite.
    ws.max_message_size(4 * MAX_FRAME_BYTES)
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .max_frame_size(4 * MAX_FRAME_BYTES)
        .on_upgrade(move |socket| serve(socket, context).instrument(info_span!("ws", %peer)))
}

/// Where a socket stands.
enum State {
    Idle,
    Joined { session: Session, events: mpsc::UnboundedReceiver<SfuEvent> },
}

/// Runs one socket until it closes or the server shuts down.
pub async fn serve(mut socket: WebSocket, mut context: WsContext) {
    debug!("signaling socket open");
    let mut state = State::Idle;
    loop {
        let event = async {
            match &mut state {
                State::Joined { events, .. } => events.recv().await,
                State::Idle => std::future::pending().await,
            }
        };
        tokio::select! {
            // Shutdown first, so a busy socket cannot delay it.
            biased;
            _ = context.shutdown.changed() => {
                if let State::Joined { session, .. } = &state {
                    let _ = context.sfu.leave(*session, LeaveReason::Shutdown).await;
                    let _ = send(&mut socket, &ServerMessage::Left { reason: LeaveReason::Shutdown.as_str().into() }).await;
                }
                close(&mut socket, CLOSE_GOING_AWAY, "server shutting down").await;
                return;
            }
            event = event => {
                let Some(event) = event else { continue };
                let removed = matches!(event, SfuEvent::Removed { .. });
                if let Some(message) = translate(event)
                    && send(&mut socket, &message).await.is_err() {
                        break;
                    }
                if removed {
                    state = State::Idle;
                }
            }
            message = socket.recv() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Binary(_))) => {
                        let _ = reply_error(&mut socket, ErrorCode::BadMessage, "binary frames are not part of the protocol").await;
                        continue;
                    }
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Ok(_)) => continue, // ping/pong: answered by axum
                    Some(Err(e)) => {
                        debug!(error = %e, "socket read failed");
                        if e.to_string().contains("too long") || e.to_string().contains("too big") {
                            let _ = reply_error(&mut socket, ErrorCode::MessageTooLarge, "frame exceeds the limit").await;
                            close(&mut socket, CLOSE_TOO_BIG, "frame too large").await;
                        }
                        break;
                    }
                };
                if text.len() > MAX_FRAME_BYTES {
                    let _ = reply_error(&mut socket, ErrorCode::MessageTooLarge, &format!("frame of {} bytes exceeds {MAX_FRAME_BYTES}", text.len())).await;
                    close(&mut socket, CLOSE_TOO_BIG, "frame too large").await;
                    break;
                }
                let reply = match serde_json::from_str::<ClientMessage>(&text) {
                    Ok(message) => handle(&context.sfu, &mut state, message).await,
                    Err(e) => Some(error(ErrorCode::BadMessage, &e.to_string())),
                };
                if let Some(reply) = reply
                    && send(&mut socket, &reply).await.is_err() {
                        break;
                    }
            }
        }
    }
    if let State::Joined { session, .. } = state {
        // The participant may be gone already; nothing else to clean then.
        let _ = context.sfu.leave(session, LeaveReason::SignalingClosed).await;
    }
    debug!("signaling socket closed");
}

/// Applies one client message; returns the reply, if any.
async fn handle(sfu: &SfuHandle, state: &mut State, message: ClientMessage) -> Option<ServerMessage> {
    let joined = match state {
        State::Joined { session, .. } => Some(*session),
        State::Idle => None,
    };
    match (message, joined) {
        (ClientMessage::Join { room, name, sdp }, None) => {
            if !valid_room_name(&room) {
                return Some(error(ErrorCode::InvalidRoom, "room names are 1-64 characters of A-Z a-z 0-9 _ . -"));
            }
            if !valid_display_name(&name) {
                return Some(error(ErrorCode::InvalidName, "display names are 1-64 bytes without control characters"));
            }
            let offer = match SdpOffer::from_sdp_string(&sdp) {
                Ok(offer) => offer,
                Err(e) => return Some(error(ErrorCode::InvalidSdp, &e.to_string())),
            };
            let (events_tx, events) = mpsc::unbounded_channel();
            match sfu.join(RoomId(room.clone()), name.clone(), offer, events_tx).await {
                Ok((session, joined)) => {
                    info!(%room, participant = %session.participant, %name, "joined");
                    *state = State::Joined { session, events };
                    let participants = joined.others.into_iter().map(|(id, name)| ParticipantInfo { id: id.0, name }).collect();
                    Some(ServerMessage::Joined {
                        participant: session.participant.0,
                        room,
                        sdp: joined.answer.to_sdp_string(),
                        participants,
                    })
                }
                Err(e) => Some(sfu_error(e)),
            }
        }
        (ClientMessage::Join { .. }, Some(_)) => Some(error(ErrorCode::AlreadyJoined, "leave first")),
        (ClientMessage::Answer { sdp }, Some(session)) => {
            let answer = match SdpAnswer::from_sdp_string(&sdp) {
                Ok(answer) => answer,
                Err(e) => return Some(error(ErrorCode::InvalidSdp, &e.to_string())),
            };
            sfu.accept_answer(session, answer).await.err().map(sfu_error)
        }
        (ClientMessage::Offer { sdp }, Some(session)) => {
            let offer = match SdpOffer::from_sdp_string(&sdp) {
                Ok(offer) => offer,
                Err(e) => return Some(error(ErrorCode::InvalidSdp, &e.to_string())),
            };
            match sfu.accept_offer(session, offer).await {
                Ok(answer) => Some(ServerMessage::Answer { sdp: answer.to_sdp_string() }),
                Err(e) => Some(sfu_error(e)),
            }
        }
        (ClientMessage::Leave, Some(session)) => {
            // Already removed (ICE timeout racing the leave) is fine: the outcome is the same.
            let _ = sfu.leave(session, LeaveReason::Requested).await;
            *state = State::Idle;
            Some(ServerMessage::Left { reason: LeaveReason::Requested.as_str().into() })
        }
        (_, None) => Some(error(ErrorCode::NotJoined, "join a room first")),
    }
}

/// The client-facing form of an SFU event.
fn translate(event: SfuEvent) -> Option<ServerMessage> {
    match event {
        SfuEvent::Offer { offer, .. } => Some(ServerMessage::Offer { sdp: offer.to_sdp_string() }),
        SfuEvent::ParticipantJoined { participant, name, .. } => {
            Some(ServerMessage::ParticipantJoined { id: participant.0, name })
        }
        SfuEvent::ParticipantLeft { participant, reason, .. } => {
            Some(ServerMessage::ParticipantLeft { id: participant.0, reason: reason.as_str().into() })
        }
        SfuEvent::ActiveSpeakers { speakers, .. } => {
            Some(ServerMessage::ActiveSpeakers { speakers: speakers.into_iter().map(|p| p.0).collect() })
        }
        SfuEvent::Removed { reason, .. } => Some(ServerMessage::Left { reason: reason.as_str().into() }),
        _ => None,
    }
}

fn error(code: ErrorCode, message: &str) -> ServerMessage {
    ServerMessage::Error { code, message: message.into() }
}

fn sfu_error(e: SfuError) -> ServerMessage {
    let code = match &e {
        SfuError::InvalidSdp(_) => ErrorCode::InvalidSdp,
        SfuError::NoPendingOffer(_) => ErrorCode::NoPendingOffer,
        SfuError::UnknownParticipant(_) => ErrorCode::NotJoined,
        SfuError::ShuttingDown => ErrorCode::ShuttingDown,
        _ => ErrorCode::Overloaded,
    };
    error(code, &e.to_string())
}

async fn send(socket: &mut WebSocket, message: &ServerMessage) -> Result<(), axum::Error> {
    // Serializing our own enum cannot fail.
    let text = serde_json::to_string(message).expect("server message serializes");
    socket.send(Message::Text(Utf8Bytes::from(text))).await
}

async fn reply_error(socket: &mut WebSocket, code: ErrorCode, message: &str) -> Result<(), axum::Error> {
    send(socket, &error(code, message)).await
}

async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame { code, reason: Utf8Bytes::from_static(reason) };
    let _ = socket.send(Message::Close(Some(frame))).await;
}
