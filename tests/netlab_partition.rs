//! Partitions on a real network (tests/netlab): the path between two devices
//! in a call dropped for 2 s, 8 s and 60 s, and one-way partitions between a
//! device and the server.
//!
//! Heartbeats every 0.5 s (detection bound `(3 + 1) × 0.5` = 2 s); the
//! media disconnect grace (5 s) and the resume grace (10 s) are the
//! defaults. For a call whose media is up the documented bound is
//! detection + resume grace = 12 s (PROTOCOL.md, "Degraded and unreachable:
//! convergence"); the media road (the SFU removes a participant silent for
//! the disconnect grace) usually ends it sooner.

mod common;
mod netlab;
mod quic_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Server;
use fleetcall_signaling::client::ClientEvent;
use fleetcall_signaling::pb::EndReason;
use netlab::{assert_no_leaks, Lab, LabDevice, ReachabilityWatch, Way};
use quic_support::{call_row, call_with_media, reason, wait_device, PROMPT};

const HEARTBEAT: &str = "0.5";
const DETECTION: Duration = Duration::from_millis(4 * 500);
const DISCONNECT_GRACE: Duration = Duration::from_secs(5);
const RESUME_GRACE: Duration = Duration::from_secs(10);
/// A call with connected media converges within this after its path dies.
const ESTABLISHED_BOUND: Duration = Duration::from_millis(2000 + 10_000);
/// A device back on the network reconnects within the SDK's backoff cap
/// (1 s in these tests) plus a handshake; 2 s of margin for a busy machine.
const RECONNECT_BOUND: Duration = Duration::from_secs(3);
/// Polling and scheduling on a busy 2-core machine.
const MARGIN: Duration = Duration::from_secs(2);
/// Detection bound plus 2 s of margin.
const DETECTED_BOUND: Duration = Duration::from_millis(2000 + 2000);

async fn call(lab: &Lab) -> anyhow::Result<(Server, LabDevice, LabDevice, fleetcall_signaling::ids::CallId)> {
    let server = lab.start_server(&["--heartbeat-secs", HEARTBEAT])?;
    let mut alice = lab.device(&server, "alice", &[]).await?;
    let mut bob = lab.device(&server, "bob", &[]).await?;
    let call = call_with_media(&mut alice, &mut bob).await?;
    alice.drain();
    bob.drain();
    Ok((server, alice, bob, call))
}

/// Bob's path to the server (so to alice) is dropped for `outage`, shorter
/// than the media grace: the call survives, media resumes, nobody is rung
/// again, and nothing ends.
async fn short_outage(lab: Lab, outage: Duration) -> anyhow::Result<()> {
    let (server, mut alice, mut bob, call) = call(&lab).await?;
    let cut = lab.cut(&bob.node, Way::Both)?;
    let struck = Instant::now();
    tokio::time::sleep(outage).await;
    cut.heal()?;
    let healed = Instant::now();
    let (alice_from, bob_from) = (alice.heard(), bob.heard());
    alice.hears(alice_from, 25, PROMPT).await?;
    let alice_back = healed.elapsed();
    bob.hears(bob_from, 25, PROMPT).await?;
    let bob_back = healed.elapsed();
    // Past every grace that could end it had the outage counted as a loss.
    tokio::time::sleep_until((struck + DISCONNECT_GRACE + DETECTION + Duration::from_secs(1)).into()).await;
    for device in [&mut alice, &mut bob] {
        let events = device.drain();
        let wrong: Vec<_> = events
            .iter()
            .filter(|e| matches!(e, ClientEvent::CallEnded(_) | ClientEvent::IncomingCall(_) | ClientEvent::SessionUnknown { .. }))
            .collect();
        assert!(wrong.is_empty(), "{}: the call must survive a {outage:?} outage unchanged: {wrong:#?}", device.id);
    }
    let row = call_row(&server, call).await?;
    assert_eq!(row["phase"], "CALL_PHASE_ACTIVE", "{row}");
    // Still flowing both ways.
    let (alice_from, bob_from) = (alice.heard(), bob.heard());
    alice.hears(alice_from, 25, PROMPT).await?;
    bob.hears(bob_from, 25, PROMPT).await?;
    assert!(alice_back.max(bob_back) <= RECONNECT_BOUND, "media back after {alice_back:?} / {bob_back:?}");
    println!("netlab figure: {outage:?} outage mid-call: media back after {alice_back:?} (alice) / {bob_back:?} (bob), no re-ring, call active");

    alice.client.hangup(call).await?;
    assert_eq!(reason(&alice.ended(call, PROMPT).await?), EndReason::Hangup);
    assert_eq!(reason(&bob.ended(call, PROMPT).await?), EndReason::Hangup);
    assert_no_leaks(&server, 2, PROMPT).await?;
    Ok(())
}

/// Bob's path is dropped for `outage`, longer than the media grace: alice
/// and the server converge to `ended` within the bound; bob converges when
/// the network returns (with the same end if its session is still there,
/// or an explicit `SessionUnknown` after the resume grace).
async fn long_outage(lab: Lab, outage: Duration) -> anyhow::Result<()> {
    let (server, mut alice, mut bob, call) = call(&lab).await?;
    let cut = lab.cut(&bob.node, Way::Both)?;
    let struck = Instant::now();

    let ended = alice.ended(call, ESTABLISHED_BOUND + PROMPT).await?;
    let alice_took = struck.elapsed();
    assert!(matches!(reason(&ended), EndReason::MediaFailed | EndReason::ConnectionLost), "{ended:?}");
    assert_eq!(ended.by, "bob", "{ended:?}");
    assert!(alice_took <= ESTABLISHED_BOUND + MARGIN, "alice converged {alice_took:?} after the cut, bound {ESTABLISHED_BOUND:?} + {MARGIN:?}");
    let row = call_row(&server, call).await?;
    assert_eq!(row["phase"], "CALL_PHASE_ENDED", "{row}");
    assert_eq!(row["end_reason"].as_str(), Some(reason(&ended).as_str_name()), "{row}");
    // The media server let go of both at once, while bob is still away.
    server.wait_stats(PROMPT, |s| s["participants"] == 0 && s["forwarding_entries"] == 0 && s["rooms"] == 0).await?;
    println!("netlab figure: {outage:?} outage mid-call: alice and server ended ({}) {alice_took:?} after the cut (bound {ESTABLISHED_BOUND:?})", reason(&ended).as_str_name());

    tokio::time::sleep_until((struck + outage).into()).await;
    cut.heal()?;
    let healed = Instant::now();
    if outage < DETECTION + RESUME_GRACE {
        let resumed = bob
            .expect(RECONNECT_BOUND + PROMPT, "resume", |e| match e {
                ClientEvent::Connected { resumed, .. } => Some(*resumed),
                _ => None,
            })
            .await?;
        assert!(resumed, "bob is back within the grace: {:#?}", bob.seen);
        let bob_ended = bob.ended(call, PROMPT).await?;
        assert_eq!((reason(&bob_ended), bob_ended.by.as_str()), (reason(&ended), "bob"), "one reason everywhere: {bob_ended:?}");
    } else {
        bob.expect(RECONNECT_BOUND + PROMPT, "session unknown", |e| matches!(e, ClientEvent::SessionUnknown { .. }).then_some(())).await?;
        bob.stop_media();
        bob.expect(PROMPT, "fresh session", |e| matches!(e, ClientEvent::Connected { resumed: false, .. }).then_some(())).await?;
    }
    let bob_took = healed.elapsed();
    assert!(bob_took <= RECONNECT_BOUND, "bob converged {bob_took:?} after the heal, bound {RECONNECT_BOUND:?}");
    println!("netlab figure: {outage:?} outage mid-call: bob converged {bob_took:?} after the heal");
    let ends = bob.seen.iter().filter(|e| matches!(e, ClientEvent::CallEnded(m) if m.call_id == call.0)).count();
    assert!(ends <= 1, "at most one call_ended: {:#?}", bob.seen);

    assert_no_leaks(&server, 2, PROMPT).await?;
    Ok(())
}

#[test]
fn path_dropped_for_2s_mid_call_resumes() -> anyhow::Result<()> {
    netlab::run("outage-2s", |lab| short_outage(lab, Duration::from_secs(2)))
}

#[test]
fn path_dropped_for_8s_mid_call_ends_everywhere() -> anyhow::Result<()> {
    netlab::run("outage-8s", |lab| long_outage(lab, Duration::from_secs(8)))
}

#[test]
fn path_dropped_for_60s_mid_call_ends_everywhere() -> anyhow::Result<()> {
    netlab::run("outage-60s", |lab| long_outage(lab, Duration::from_secs(60)))
}

/// Only one direction between bob and the server works for 6 s: both ends
/// detect it, bob stays unreachable on the server for as long as it lasts
/// (no flapping on the half that still arrives), and comes back once.
async fn one_way(lab: Lab, way: Way) -> anyhow::Result<()> {
    let server = Arc::new(lab.start_server(&["--heartbeat-secs", HEARTBEAT])?);
    let mut bob = lab.device(&server, "bob", &[]).await?;
    let watch = ReachabilityWatch::start(server.clone(), "bob");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let cut = lab.cut(&bob.node, way)?;
    let struck = Instant::now();
    let struck_at = watch.elapsed();
    // Both ends at once, each timed on its own.
    let server_side = async {
        wait_device(&server, "bob", DETECTED_BOUND + PROMPT, |r| r["reachability"] == "unreachable").await?;
        anyhow::Ok(struck.elapsed())
    };
    let device_side = async {
        bob.expect(DETECTED_BOUND + PROMPT, "disconnect", |e| matches!(e, ClientEvent::Disconnected { .. }).then_some(())).await?;
        anyhow::Ok(struck.elapsed())
    };
    let (server_took, device_took) = tokio::join!(server_side, device_side);
    let (server_took, device_took) = (server_took?, device_took?);
    tokio::time::sleep_until((struck + Duration::from_secs(6)).into()).await;
    cut.heal()?;
    let healed_at = watch.elapsed();
    let healed = Instant::now();
    let resumed = bob
        .expect(RECONNECT_BOUND + PROMPT, "reconnect", |e| match e {
            ClientEvent::Connected { resumed, .. } => Some(*resumed),
            _ => None,
        })
        .await?;
    wait_device(&server, "bob", PROMPT, |r| r["reachability"] == "online").await?;
    let back_after = healed.elapsed();
    // Stable afterwards.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let changes = watch.stop().await?;

    assert!(resumed, "bob resumed its session: {:#?}", bob.seen);
    assert!(server_took <= DETECTED_BOUND, "{way:?}: server detected after {server_took:?}, bound {DETECTED_BOUND:?}");
    assert!(device_took <= DETECTED_BOUND, "{way:?}: device detected after {device_took:?}, bound {DETECTED_BOUND:?}");
    // online, (degraded), unreachable while it lasts, online once after.
    let states: Vec<&str> = changes.iter().map(|(_, s)| s.as_str()).collect();
    let expected_with = ["online", "degraded", "unreachable", "online"];
    let expected_without = ["online", "unreachable", "online"];
    assert!(states == expected_with || states == expected_without, "{way:?}: flapping or missed: {changes:?} (cut at {struck_at:?}, healed at {healed_at:?})");
    let back = changes.last().map(|(at, _)| *at).unwrap_or_default();
    assert!(back >= healed_at, "{way:?}: online again only after the heal: {changes:?}, healed at {healed_at:?}");
    let disconnects = bob.seen.iter().filter(|e| matches!(e, ClientEvent::Disconnected { .. })).count();
    assert_eq!(disconnects, 1, "{way:?}: the device saw one loss: {:#?}", bob.seen);
    println!(
        "netlab figure: one-way partition {way:?}: server detected {server_took:?}, device {device_took:?} after the cut (bound {DETECTED_BOUND:?}); online again {back_after:?} after the heal; states {changes:?}"
    );
    assert_no_leaks(&server, 1, PROMPT).await?;
    Ok(())
}

#[test]
fn server_to_device_dropped_is_detected_both_ways_without_flapping() -> anyhow::Result<()> {
    netlab::run("oneway-down", |lab| one_way(lab, Way::ToNode))
}

#[test]
fn device_to_server_dropped_is_detected_both_ways_without_flapping() -> anyhow::Result<()> {
    netlab::run("oneway-up", |lab| one_way(lab, Way::FromNode))
}
