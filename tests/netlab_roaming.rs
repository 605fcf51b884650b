//! A device's address changes mid-call on a real network (tests/netlab): the
//! control connection migrates (QUIC: the server validates the new path, no
//! reconnect), the media restarts ICE from a socket on the new address, and
//! the call survives with an audio gap under 1 s each way.

mod common;
mod netlab;
mod quic_support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetcall_signaling::client::ClientEvent;
use netlab::{assert_no_leaks, GapMeter};
use quic_support::{call_row, call_with_media, reason, PROMPT};

/// The pass figure.
const MAX_GAP: Duration = Duration::from_secs(1);

#[test]
fn address_change_mid_call_keeps_the_call() -> anyhow::Result<()> {
    netlab::run("roaming", |lab| async move {
        let server = lab.start_server(&["--heartbeat-secs", "0.5"])?;
        let mut alice = lab.device(&server, "alice", &[]).await?;
        let mut bob = lab.device(&server, "bob", &[]).await?;
        let call = call_with_media(&mut alice, &mut bob).await?;
        let meter = |d: &quic_support::Device| -> anyhow::Result<GapMeter> {
            let peer = d.current.as_ref().map(|m| m.peer.clone()).context("media")?;
            Ok(GapMeter::start(move || peer.stats()))
        };
        let (alice_hears, bob_hears) = (meter(&alice)?, meter(&bob)?);
        tokio::time::sleep(Duration::from_secs(1)).await;
        alice.drain();
        bob.drain();

        let old = bob.node.ip();
        let moved = Instant::now();
        let new = lab.move_address(&bob.node)?;
        bob.restart_media_at(IpAddr::V4(new)).await?;
        let restarted = moved.elapsed();
        // Past the media grace (5 s) and several heartbeats on the new path.
        tokio::time::sleep(Duration::from_secs(7)).await;
        let (alice_from, bob_from) = (alice.heard(), bob.heard());
        alice.hears(alice_from, 25, PROMPT).await?;
        bob.hears(bob_from, 25, PROMPT).await?;

        let row = call_row(&server, call).await?;
        assert_eq!(row["phase"], "CALL_PHASE_ACTIVE", "{row}");
        for device in [&mut alice, &mut bob] {
            let events = device.drain();
            let wrong: Vec<_> = events
                .iter()
                .filter(|e| matches!(e, ClientEvent::CallEnded(_) | ClientEvent::Disconnected { .. } | ClientEvent::SessionUnknown { .. }))
                .collect();
            assert!(wrong.is_empty(), "{}: the call and the connection survive the move {old} -> {new}: {wrong:#?}", device.id);
        }
        let gap_at_alice = alice_hears.worst().values().copied().max().unwrap_or_default();
        let gap_at_bob = bob_hears.worst().values().copied().max().unwrap_or_default();
        assert!(gap_at_alice < MAX_GAP && gap_at_bob < MAX_GAP, "audio gaps {gap_at_alice:?} (alice hearing bob) / {gap_at_bob:?} (bob hearing alice), bound {MAX_GAP:?}");
        println!(
            "netlab figure: address change mid-call ({old} -> {new}): ICE restart answered in {restarted:?}; audio gap {gap_at_alice:?} at alice, {gap_at_bob:?} at bob (bound {MAX_GAP:?}); no reconnect"
        );

        alice.client.hangup(call).await?;
        alice.ended(call, PROMPT).await?;
        let ended = bob.ended(call, PROMPT).await?;
        assert_eq!(reason(&ended), fleetcall_signaling::pb::EndReason::Hangup);
        assert_no_leaks(&server, 2, PROMPT).await?;
        Ok(())
    })
}
