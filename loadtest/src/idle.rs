//! Idle devices: registered on the QUIC control plane and doing nothing but
//! keep their session alive (heartbeats both ways). What one server holds,
//! and how fast they come back after a server restart.

use std::sync::Arc;
use std::time::Instant;

use fleetcall_signaling::client::{Client, ClientEvent};
use tokio::sync::{mpsc, watch};

use crate::context::Ctx;
use crate::outcome::{GroupResult, Live};

/// Registers one device per start time, keeps them until `stop`, closes them.
pub async fn run(
    ctx: Arc<Ctx>,
    first: usize,
    starts: Vec<Instant>,
    mut stop: watch::Receiver<bool>,
) -> GroupResult {
    let (tx, mut rx) = mpsc::unbounded_channel::<(
        usize,
        Result<(Client, mpsc::UnboundedReceiver<ClientEvent>), String>,
        f64,
    )>();
    let count = starts.len();
    for (i, start) in starts.into_iter().enumerate() {
        let (ctx, tx) = (ctx.clone(), tx.clone());
        tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let begun = Instant::now();
            let result = ctx.control.register(&format!("{}-i{}", ctx.prefix, first + i)).await;
            let _ = tx.send((i, result, begun.elapsed().as_secs_f64()));
        });
    }
    drop(tx);
    let mut result = GroupResult::default();
    let mut clients = Vec::with_capacity(count);
    let (event_tx, mut event_rx) = mpsc::unbounded_channel::<(usize, ClientEvent)>();
    // Fresh sessions per device: the first is the registration, later ones
    // re-registrations (the server lost the session).
    let mut fresh = vec![0u32; count];
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some((i, registered, secs)) = rx.recv() => match registered {
                Ok((client, mut events)) => {
                    result.register.record(std::time::Duration::from_secs_f64(secs));
                    Live::add(&ctx.live.registered, 1);
                    clients.push(client);
                    let event_tx = event_tx.clone();
                    tokio::spawn(async move {
                        while let Some(event) = events.recv().await {
                            if event_tx.send((i, event)).is_err() {
                                return;
                            }
                        }
                    });
                }
                Err(e) => result.failures.push(&ctx.live, format!("{}-i{}: registration: {e}", ctx.prefix, first + i)),
            },
            Some((i, event)) = event_rx.recv() => {
                if let ClientEvent::Connected { resumed: false, .. } = event {
                    fresh[i] += 1;
                    if fresh[i] == 1 {
                        continue;
                    }
                    let restarted = *ctx.live.restarted_at.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(ready) = restarted
                        && let Ok(mut h) = ctx.live.reregister.lock() {
                            h.record(Instant::now().saturating_duration_since(ready));
                        }
                }
            }
        }
    }
    for client in clients {
        tokio::spawn(async move { client.close().await });
    }
    result
}
