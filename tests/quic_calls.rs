//! Calls between devices on the client SDK over real QUIC, with the real
//! server process: register, ring, answer, audio through the SFU both ways,
//! hangup converging everywhere; the operator ending a call; the admin API
//! during and after a call; a device's address changing mid-call
//! (migration) and its connection dropping (resume).

mod common;
mod quic_support;

use std::time::Duration;

use common::Server;
use fleetcall_signaling::client::ClientEvent;
use fleetcall_signaling::pb::{CallPhase, EndReason};
use quic_support::{call_row, call_with_media, devices, http_post, live_calls, reason, Device, PROMPT};

/// No participants and no forwarding entries left in the SFU.
fn sfu_empty(stats: &serde_json::Value) -> bool {
    stats["participants"] == 0 && stats["forwarding_entries"] == 0 && stats["rooms"] == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_rings_carries_audio_both_ways_and_hangup_converges() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let mut alice = Device::connect(&server, "alice").await?;
    let mut bob = Device::connect(&server, "bob").await?;
    let call = call_with_media(&mut alice, &mut bob).await?;

    // The admin API during the call.
    let table = devices(&server).await?;
    for id in ["alice", "bob"] {
        let row = &table[id];
        assert_eq!(row["reachability"], "online", "{row}");
        assert_eq!(row["call"], call.0, "{row}");
        assert_eq!(row["call_phase"], "CALL_PHASE_ACTIVE", "{row}");
        assert_eq!(row["sessions"].as_array().map(Vec::len), Some(1), "{row}");
        assert_eq!(row["media_sessions"].as_array().map(Vec::len), Some(1), "{row}");
    }
    let row = call_row(&server, call).await?;
    assert_eq!((row["phase"].as_str(), row["kind"].as_str(), row["initiator"].as_str()), (Some("CALL_PHASE_ACTIVE"), Some("CALL_KIND_DIRECT"), Some("alice")), "{row}");
    let members = row["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 2, "{row}");
    assert!(members.iter().all(|m| m["status"] == "PARTICIPANT_STATUS_CONNECTED" && m["media_session"].is_string()), "{row}");
    let stats = server.stats().await?;
    assert_eq!((stats["rooms"].as_u64(), stats["participants"].as_u64(), stats["forwarding_entries"].as_u64()), (Some(1), Some(2), Some(2)), "{stats}");

    bob.client.hangup(call).await?;
    for device in [&mut alice, &mut bob] {
        let ended = device.ended(call, PROMPT).await?;
        assert_eq!((reason(&ended), ended.by.as_str()), (EndReason::Hangup, "bob"), "{}: {ended:?}", device.id);
    }
    server.wait_stats(PROMPT, sfu_empty).await?;
    let row = call_row(&server, call).await?;
    assert_eq!((row["phase"].as_str(), row["end_reason"].as_str()), (Some("CALL_PHASE_ENDED"), Some("END_REASON_HANGUP")), "{row}");
    assert!(row["members"].as_array().is_some_and(Vec::is_empty), "{row}");
    let table = devices(&server).await?;
    for id in ["alice", "bob"] {
        assert!(table[id]["call"].is_null() && table[id]["media_sessions"].as_array().is_some_and(Vec::is_empty), "{}", table[id]);
        assert_eq!(table[id]["reachability"], "online", "{}", table[id]);
    }
    // Exactly one CallEnded each, and hanging up again is harmless.
    bob.client.hangup(call).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for device in [&mut alice, &mut bob] {
        device.drain();
        let ended = device.seen.iter().filter(|e| matches!(e, ClientEvent::CallEnded(m) if m.call_id == call.0)).count();
        assert_eq!(ended, 1, "{}: {:#?}", device.id, device.seen);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_ends_a_call_for_both_devices() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let mut alice = Device::connect(&server, "alice").await?;
    let mut bob = Device::connect(&server, "bob").await?;
    let call = call_with_media(&mut alice, &mut bob).await?;

    let (status, body) = http_post(&server, &format!("/api/calls/{}/end", call.0)).await?;
    assert_eq!(status, 200, "{body}");
    for device in [&mut alice, &mut bob] {
        let ended = device.ended(call, PROMPT).await?;
        assert_eq!(reason(&ended), EndReason::EndedByOperator, "{}: {ended:?}", device.id);
    }
    server.wait_stats(PROMPT, sfu_empty).await?;
    assert!(live_calls(&server).await?.is_empty());
    // Ending it again: nothing live by that id.
    let (status, body) = http_post(&server, &format!("/api/calls/{}/end", call.0)).await?;
    assert_eq!(status, 404, "{body}");
    // Both are free for the next call.
    let next = bob.client.invite("alice").await?;
    assert_eq!(alice.incoming(PROMPT).await?.call_id, next.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_change_mid_call_keeps_session_call_and_media() -> anyhow::Result<()> {
    let server = Server::start(&["--heartbeat-secs", "0.5"])?;
    let mut alice = Device::connect(&server, "alice").await?;
    let mut bob = Device::connect(&server, "bob").await?;
    let call = call_with_media(&mut alice, &mut bob).await?;
    let session = alice.client.session();
    let before = alice.client.status().local_addr.expect("connected");

    let after = alice.client.rebind().await?;
    assert_ne!(before, after, "a new socket");
    let (heard_by_alice, heard_by_bob) = (alice.heard(), bob.heard());
    // Six heartbeat intervals: the server would have closed a stuck or lost
    // connection by now (3 missed); frames keep moving on the new path.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let row = devices(&server).await?.remove("alice").unwrap_or_default();
    assert_eq!(row["reachability"], "online", "{row}");
    assert!(row["last_heartbeat_secs_ago"].as_f64().is_some_and(|s| s < 1.5), "heartbeats keep coming: {row}");
    assert_eq!(row["sessions"][0], session.map(|s| s.0).unwrap_or_default(), "same session: {row}");
    // Media is on its own socket and goes on regardless.
    alice.hears(heard_by_alice, 50, PROMPT).await?;
    bob.hears(heard_by_bob, 50, PROMPT).await?;
    // The control plane did not notice anything: no reconnect, no new session.
    let status = alice.client.status();
    assert_eq!((status.session, status.reconnects, status.local_addr), (session, 0, Some(after)), "{status:?}");
    let fresh = alice.drain();
    assert!(
        !fresh.iter().any(|e| matches!(e, ClientEvent::Disconnected { .. } | ClientEvent::Connected { .. } | ClientEvent::CallEnded(_))),
        "{fresh:#?}"
    );
    assert_eq!(call_row(&server, call).await?["phase"], "CALL_PHASE_ACTIVE");
    // And requests still get their replies on the new path.
    bob.client.hangup(call).await?;
    assert_eq!(reason(&alice.ended(call, PROMPT).await?), EndReason::Hangup);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_resumes_and_keeps_the_call() -> anyhow::Result<()> {
    let server = Server::start(&["--heartbeat-secs", "0.5"])?;
    let mut alice = Device::connect(&server, "alice").await?;
    let mut bob = Device::connect(&server, "bob").await?;
    let call = call_with_media(&mut alice, &mut bob).await?;
    let session = alice.client.session();

    // The link dies without a goodbye; the client comes back on a new
    // connection and resumes.
    alice.client.simulate_drop();
    alice.expect(PROMPT, "disconnect", |e| matches!(e, ClientEvent::Disconnected { .. }).then_some(())).await?;
    let resumed = alice
        .expect(PROMPT, "resume", |e| match e {
            ClientEvent::Connected { session, resumed, call } => Some((*session, *resumed, *call)),
            _ => None,
        })
        .await?;
    assert_eq!(resumed, (session.expect("session"), true, Some(call)), "same session, still in the call");
    // The server restates the call after a resume.
    alice.phase(call, CallPhase::Active, PROMPT).await?;
    let (heard_by_alice, heard_by_bob) = (alice.heard(), bob.heard());
    alice.hears(heard_by_alice, 25, PROMPT).await?;
    bob.hears(heard_by_bob, 25, PROMPT).await?;
    let row = devices(&server).await?.remove("alice").unwrap_or_default();
    assert_eq!((row["reachability"].as_str(), row["call"].as_u64()), (Some("online"), Some(call.0)), "{row}");
    assert_eq!(row["sessions"][0], session.map(|s| s.0).unwrap_or_default(), "{row}");
    // Requests work on the resumed session.
    alice.client.hangup(call).await?;
    for device in [&mut alice, &mut bob] {
        let ended = device.ended(call, PROMPT).await?;
        assert_eq!((reason(&ended), ended.by.as_str()), (EndReason::Hangup, "alice"), "{}", device.id);
    }
    for device in [&alice, &bob] {
        let ended = device.seen.iter().filter(|e| matches!(e, ClientEvent::CallEnded(_))).count();
        assert_eq!(ended, 1, "{}: exactly one CallEnded: {:#?}", device.id, device.seen);
    }
    server.wait_stats(PROMPT, sfu_empty).await?;
    Ok(())
}

/// Frames the device received in total.
fn received(device: &Device) -> u64 {
    device.media_stats().received_by_stream.values().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppression_switches_mid_call_from_the_device_and_the_admin_api() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let mut alice = Device::connect(&server, "alice").await?;
    let mut bob = Device::connect(&server, "bob").await?;
    let call = call_with_media(&mut alice, &mut bob).await?;
    let stats = server.stats().await?;
    assert_eq!(stats["processed_tracks"], 0, "policy off by default: {stats}");

    // The device asks for its own microphone to be denoised.
    alice.client.set_noise_suppression(Some(true)).await?;
    server.wait_stats(PROMPT, |s| s["suppressed_tracks"] == 1).await?;
    // The operator turns it on for bob too, through the admin API.
    let (status, body) = quic_support::http_put(&server, "/api/policy", r#"{"scope":"device","device":"bob","on":true}"#).await?;
    assert_eq!(status, 200, "{body}");
    server.wait_stats(PROMPT, |s| s["suppressed_tracks"] == 2).await?;

    // Media keeps flowing both ways through the pipelines; the call is intact.
    let before = (received(&alice), received(&bob));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(received(&alice) >= before.0 + 20 && received(&bob) >= before.1 + 20, "{before:?} -> {:?}", (received(&alice), received(&bob)));
    assert_eq!(call_row(&server, call).await?["phase"], "CALL_PHASE_ACTIVE");

    // Back to the default: the pipelines stay (no jump in delay) but stop denoising.
    alice.client.set_noise_suppression(None).await?;
    let (status, body) = quic_support::http_put(&server, "/api/policy", r#"{"scope":"device","device":"bob","on":null}"#).await?;
    assert_eq!(status, 200, "{body}");
    server.wait_stats(PROMPT, |s| s["suppressed_tracks"] == 0 && s["processed_tracks"] == 2).await?;
    let (status, _) = quic_support::http_put(&server, "/api/policy", r#"{"scope":"planet"}"#).await?;
    assert_eq!(status, 400, "a bad policy body is refused");
    bob.client.hangup(call).await?;
    server.wait_stats(PROMPT, sfu_empty).await?;
    Ok(())
}
