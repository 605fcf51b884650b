//! The device protocol over WebSocket, for browsers and other devices that
//! cannot speak QUIC: the same `fleetcall.v1` frames as on the QUIC stream,
//! one canonical proto3 JSON object per text message.
//!
//! The identity comes from the transport: a device token
//! ([`crate::pki::DeviceTokens`]) in the `token` query parameter, checked
//! before the upgrade. Close codes are 4000 + [`CloseReason`].

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use tracing::{Instrument, debug, info_span};

use crate::Error;
use crate::ids::{ConnId, DeviceId};
use crate::pb::{self, CloseReason};
use crate::service::{ConnectionLink, ControlPlane};
use crate::wire::{MAX_FRAME_BYTES, decode_json, encode_json};

/// Upgrades an authenticated request to a device socket.
pub fn upgrade(ws: WebSocketUpgrade, device: DeviceId, control: ControlPlane) -> Response {
    // A little over the frame limit still arrives, so the controller can
    // answer FRAME_TOO_LARGE before closing; far bigger is cut by tungstenite.
    // Small buffers: a fleet of idle devices each holds one socket, and the
    // 128 KiB default read buffer made that about 134 KB per device.
    ws.max_message_size(2 * MAX_FRAME_BYTES)
        .max_frame_size(2 * MAX_FRAME_BYTES)
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .on_upgrade(move |socket| {
        let span = info_span!("ws_device", id = %device);
        serve(socket, device, control).instrument(span)
    })
}

async fn serve(socket: WebSocket, device: DeviceId, control: ControlPlane) {
    let Ok((conn, link)) = control.connection_up(device).await else { return };
    let (sink, mut stream) = socket.split();
    let writer = tokio::spawn(write_frames(sink, link));
    let detail = loop {
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
    };
    // The control plane may already be gone at shutdown.
    let _ = control.connection_down(conn, detail).await;
    let _ = writer.await;
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
