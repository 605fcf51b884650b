//! The device transport: QUIC with mutual TLS, one long-lived bidirectional
//! stream per device carrying length-delimited protobuf frames both ways.
//!
//! The device opens the stream; its identity is the common name of the client
//! certificate the installation CA issued (see [`crate::pki`]). QUIC keep-alive
//! proves the path; the controller's heartbeats prove that frames move.
//! Connection migration is on: a device whose address changes keeps its
//! connection and session.
//!
//! Limits before the controller hears of a connection: at most
//! `max_connections` in all and `max_connections_per_address` per source IP
//! (handshakes in progress count), a handshake that completes within
//! `handshake_timeout`, a control stream opened within `stream_timeout`.
//! Once `retry_threshold` handshakes are in progress, an Initial
//! from an address not yet validated gets a Retry instead of a slot: a
//! forged source never receives it, so spoofed Initials cost no connection
//! slot and cannot use up a real address's share.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncReadExt;
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::grants::Credential;
use crate::ids::ConnId;
use crate::limits::{AddressLimit, Refusal, TransportStats};
use crate::pb::{self, CloseReason};
use crate::pki;
use crate::service::{ConnectionLink, ControlPlane};
use crate::wire::{FrameDecoder, encode_frame};

/// QUIC transport settings.
#[derive(Debug, Clone)]
pub struct QuicConfig {
    /// QUIC keep-alive: proves the path even when no frames move.
    pub keep_alive: Duration,
    /// A connection with no packets for this long is dead.
    pub idle_timeout: Duration,
    /// A device must open its stream within this time of the handshake.
    pub stream_timeout: Duration,
    /// Most simultaneous connections; more are refused.
    pub max_connections: usize,
    /// Most simultaneous connections (handshakes included) from one source
    /// IP; more are refused. Devices in a ward may share one NAT address, so
    /// this is a bound against one greedy address, not a per-device rule.
    pub max_connections_per_address: usize,
    /// Once this many handshakes are in progress, a new Initial from an
    /// address not yet validated is answered with a Retry (0: always).
    pub retry_threshold: usize,
    /// A handshake must complete within this time.
    pub handshake_timeout: Duration,
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            keep_alive: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(10),
            stream_timeout: Duration::from_secs(10),
            max_connections: 20_000,
            max_connections_per_address: 256,
            retry_threshold: 64,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The QUIC endpoint on a bound `socket`, with the installation's server
/// certificate. Needs a tokio runtime.
pub fn endpoint(socket: std::net::UdpSocket, config: &QuicConfig, tls: rustls::ServerConfig) -> std::io::Result<Endpoint> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport(config)));
    server.migration(true);
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, runtime)
}

/// The transport parameters shared by server and devices.
pub fn transport(config: &QuicConfig) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(config.keep_alive));
    // A configured duration in seconds always fits a QUIC idle timeout.
    transport.max_idle_timeout(Some(config.idle_timeout.try_into().expect("idle timeout fits")));
    // One control stream per device; nothing else may be opened.
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport
}

/// How long connections the controller is closing get to write their last
/// frames before the endpoint closes whatever is left.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How long the closed endpoint waits for its peers to hear the close.
const IDLE_GRACE: Duration = Duration::from_secs(1);

/// Accepts devices until `stop` resolves; then lets the connections finish
/// (the controller is closing them), closes the endpoint and returns.
/// Refusals, Retries and handshakes in progress are counted in `stats`.
pub async fn serve(endpoint: Endpoint, config: QuicConfig, control: ControlPlane, stats: Arc<TransportStats>, stop: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let addresses = AddressLimit::new(config.max_connections_per_address, stats.clone());
    // Each connection task holds a clone; `recv` returns `None` once the last
    // one has finished.
    let (running, mut finished) = mpsc::channel::<()>(1);
    let mut stop = std::pin::pin!(stop);
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            () = &mut stop => break,
        };
        let Some(incoming) = incoming else { break };
        let remote = incoming.remote_address();
        // Under handshake load, or from an address at its limit, only a
        // source that proves it receives our packets gets a slot: a Retry
        // costs a datagram and no state.
        let loaded = stats.handshakes.load(Ordering::Relaxed) >= config.retry_threshold as u64;
        if !incoming.remote_address_validated() && incoming.may_retry() && (loaded || addresses.is_full(remote.ip())) {
            stats.retries.fetch_add(1, Ordering::Relaxed);
            debug!(%remote, loaded, "validating the address first (Retry)");
            // Fails only for an Initial that already answered a Retry,
            // which `may_retry` ruled out.
            let _ = incoming.retry();
            continue;
        }
        let Some(address_slot) = addresses.try_acquire(remote.ip()) else {
            stats.refused(Refusal::PerAddress);
            // Counted; at debug so that a flood does not flood the log.
            debug!(%remote, "connection limit of this address reached; refusing");
            incoming.refuse();
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            stats.refused(Refusal::Capacity);
            warn!(%remote, "connection limit reached; refusing");
            incoming.refuse();
            continue;
        };
        let connecting = match incoming.accept() {
            Ok(connecting) => connecting,
            Err(e) => {
                debug!(%remote, error = %e, "could not accept");
                continue;
            }
        };
        stats.handshakes.fetch_add(1, Ordering::Relaxed);
        let control = control.clone();
        let config = config.clone();
        let stats = stats.clone();
        let running = running.clone();
        tokio::spawn(
            async move {
                // Dropping an unfinished handshake abandons the connection.
                let handshake = tokio::time::timeout(config.handshake_timeout, connecting).await;
                stats.handshakes.fetch_sub(1, Ordering::Relaxed);
                match handshake {
                    Ok(Ok(connection)) => serve_connection(connection, &config, &control, &stats).await,
                    // Wrong or missing client certificate, or a broken handshake.
                    Ok(Err(e)) => info!(error = %e, "handshake failed"),
                    Err(_) => {
                        stats.refused(Refusal::HandshakeTimeout);
                        info!("handshake did not complete in time");
                    }
                }
                drop(address_slot);
                drop(slot);
                drop(running);
            }
            .instrument(info_span!("quic", %remote)),
        );
    }
    drop(running);
    let _ = tokio::time::timeout(CLOSE_GRACE, finished.recv()).await;
    endpoint.close(VarInt::from(CloseReason::Shutdown as u32), b"shutdown");
    let _ = tokio::time::timeout(IDLE_GRACE, endpoint.wait_idle()).await;
}

async fn serve_connection(connection: Connection, config: &QuicConfig, control: &ControlPlane, stats: &TransportStats) {
    let credential = match credential(&connection) {
        Ok(credential) => credential,
        Err(e) => {
            info!(error = %e, "no usable device identity");
            close(&connection, CloseReason::ProtocolError);
            return;
        }
    };
    let span = info_span!("device", id = %credential.identity);
    async {
        let (send, recv) = match tokio::time::timeout(config.stream_timeout, connection.accept_bi()).await {
            Ok(Ok(streams)) => streams,
            Ok(Err(e)) => {
                debug!(error = %e, "connection ended before its stream opened");
                return;
            }
            Err(_) => {
                stats.refused(Refusal::StreamTimeout);
                close(&connection, CloseReason::HelloTimeout);
                return;
            }
        };
        let Ok((conn, link)) = control.connection_up(credential).await else {
            close(&connection, CloseReason::Shutdown);
            return;
        };
        debug!(%conn, "control stream open");
        let writer = tokio::spawn(write_frames(send, link, connection.clone()));
        let detail = read_frames(recv, conn, control).await;
        // The controller may be gone at shutdown; nothing to tell then.
        let _ = control.connection_down(conn, detail).await;
        // The writer ends once the controller drops the connection's queue.
        let _ = writer.await;
    }
    .instrument(span)
    .await;
}

/// The credential of the verified client certificate.
fn credential(connection: &Connection) -> Result<Credential, Box<dyn std::error::Error + Send + Sync>> {
    let certs = connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or("no client certificate")?;
    let leaf = certs.first().ok_or("empty certificate chain")?;
    Ok(pki::device_credential(leaf)?)
}

/// Decodes frames until the stream ends; returns why it ended.
async fn read_frames(mut recv: RecvStream, conn: ConnId, control: &ControlPlane) -> String {
    let mut buffer = BytesMut::with_capacity(16 * 1024);
    let mut decoder = FrameDecoder::new();
    loop {
        match recv.read_buf(&mut buffer).await {
            Ok(0) => return "stream finished".into(),
            Ok(_) => {}
            Err(e) => return e.to_string(),
        }
        loop {
            match decoder.decode::<pb::ClientFrame>(&mut buffer) {
                Ok(Some(frame)) => {
                    if control.frame(conn, frame).await.is_err() {
                        return "server stopping".into();
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    let fatal = error.is_fatal();
                    let detail = error.to_string();
                    if control.wire_error(conn, error).await.is_err() || fatal {
                        return detail;
                    }
                }
            }
        }
    }
}

/// Writes the controller's frames; on close, flushes what is queued (within a
/// bound) so the last error reaches the device, then closes the connection.
async fn write_frames(mut send: SendStream, mut link: ConnectionLink, connection: Connection) {
    let mut buffer = BytesMut::new();
    // Bytes of the frame in `buffer` already written.
    let mut written = 0;
    'frames: loop {
        tokio::select! {
            // Frames before the close: the close comes after what was queued.
            biased;
            frame = link.frames.recv() => {
                let Some(frame) = frame else { break };
                buffer.clear();
                written = 0;
                if encode_frame(&frame, &mut buffer).is_err() {
                    continue; // the controller never builds oversize frames
                }
                while written < buffer.len() {
                    tokio::select! {
                        // The frame first: a close signalled right behind it
                        // (an error, then the close) must not cut it off.
                        biased;
                        // Quinn's `write` is cancel-safe: nothing is lost
                        // when the close wins, and the flush below goes on
                        // from `written`.
                        n = send.write(&buffer[written..]) => match n {
                            Ok(n) => written += n,
                            Err(_) => return,
                        },
                        // A device that stopped reading blocks the write forever.
                        _ = link.close.changed() => break 'frames,
                    }
                }
            }
            _ = link.close.changed() => break,
        }
    }
    let Some(reason) = *link.close.borrow() else { return };
    let flush = async {
        if send.write_all(&buffer[written..]).await.is_err() {
            return;
        }
        while let Ok(frame) = link.frames.try_recv() {
            buffer.clear();
            if encode_frame(&frame, &mut buffer).is_ok() && send.write_all(&buffer).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
        let _ = send.stopped().await;
    };
    if reason != CloseReason::NotReading {
        let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
    }
    close(&connection, reason);
}

fn close(connection: &Connection, reason: CloseReason) {
    connection.close(VarInt::from(reason as u32), reason.as_str_name().as_bytes());
}
