//! Forced failures over real QUIC against the real server process: a device
//! process killed while its call rings, and a device that stops reading its
//! stream while the QUIC connection stays up. Each converges to one clear
//! state within the detection bound, and other devices are not delayed.
//!
//! Heartbeats run every 0.5 s, so the detection bound (PROTOCOL.md: a stream
//! that stops moving is unreachable within `(3 + 1) × interval`) is 2 s. The
//! asserted bounds add a margin for a busy 2-core machine.

mod common;
mod quic_support;

use std::time::{Duration, Instant};

use common::Server;
use fleetcall_signaling::client::ClientEvent;
use fleetcall_signaling::pb::{CallPhase, CloseReason, EndReason};
use quic_support::{devices, enroll, live_calls, reason, wait_device, Agent, Device, PROMPT};

/// `--heartbeat-secs 0.5`.
const HEARTBEAT_MS: u64 = 500;
/// Unreachable after 3 missed intervals; the fault may strike just after an ack.
const DETECTION: Duration = Duration::from_millis(4 * HEARTBEAT_MS);
/// Scheduling noise on a loaded machine.
const MARGIN: Duration = Duration::from_millis(2500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_callee_while_ringing_ends_the_call_unavailable() -> anyhow::Result<()> {
    let server = Server::start(&["--heartbeat-secs", "0.5"])?;
    let files = enroll(&server, "bed-7")?;
    // The callee is the reference agent, a real process; it rings but does
    // not answer.
    let mut callee = Agent::spawn(&server, &files, "bed-7", &[])?;
    callee.line("registered bed-7", PROMPT * 2).await?;
    let mut nurse = Device::connect(&server, "nurse").await?;

    let call = nurse.client.invite("bed-7").await?;
    nurse.start_media(call, 440.0).await?;
    callee.line("incoming call", PROMPT).await?;
    nurse.phase(call, CallPhase::Ringing, PROMPT).await?;
    // The caller's media is in the SFU while it rings.
    server.wait_stats(PROMPT, |s| s["participants"] == 1).await?;

    callee.child.kill()?;
    let killed = Instant::now();
    callee.child.wait()?;
    let ended = nurse.ended(call, DETECTION + MARGIN + Duration::from_secs(2)).await?;
    let took = killed.elapsed();
    assert_eq!((reason(&ended), ended.by.as_str()), (EndReason::Unavailable, "bed-7"), "{ended:?}");
    assert!(took <= DETECTION + MARGIN, "converged in {took:?}, bound {DETECTION:?} + {MARGIN:?}");
    println!("killed callee detected and the call ended in {took:?} (bound {DETECTION:?})");

    // The server converged: nothing live, the callee unreachable and free,
    // the caller online and free, no media left.
    assert!(live_calls(&server).await?.is_empty(), "{:?}", live_calls(&server).await?);
    let table = devices(&server).await?;
    assert_eq!((table["bed-7"]["reachability"].as_str(), table["bed-7"]["call"].as_u64()), (Some("unreachable"), None), "{}", table["bed-7"]);
    assert_eq!((table["nurse"]["reachability"].as_str(), table["nurse"]["call"].as_u64()), (Some("online"), None), "{}", table["nurse"]);
    server.wait_stats(PROMPT, |s| s["participants"] == 0 && s["forwarding_entries"] == 0).await?;
    // Calling it again is answered at once: unavailable.
    let again = nurse.client.invite("bed-7").await?;
    assert_eq!(reason(&nurse.ended(again, PROMPT).await?), EndReason::Unavailable);
    Ok(())
}

/// A device that stops reading its stream is disconnected. Its outbound
/// queue (256 frames) does not fill from heartbeats and one invitation, and
/// the QUIC receive window holds far more than that, so the server's writer
/// is never blocked and the close comes from the heartbeat rule
/// (`HEARTBEAT_TIMEOUT`). A device flooded with pushes would instead fill the
/// queue and be closed as `NOT_READING` at once; both are accepted here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_reader_is_disconnected_without_delaying_others() -> anyhow::Result<()> {
    let server = Server::start(&["--heartbeat-secs", "0.5"])?;
    let mut stuck = Device::connect(&server, "stuck").await?;
    let mut dana = Device::connect(&server, "dana").await?;
    let mut bob = Device::connect(&server, "bob").await?;
    let mut carol = Device::connect(&server, "carol").await?;
    let session = stuck.client.session();

    stuck.client.simulate_stall(true);
    let stalled = Instant::now();
    // A push for the stuck device: it is invited and cannot hear it.
    let ringing_stuck = dana.client.invite("stuck").await?;

    // Meanwhile bob and carol get through a whole call setup; every push
    // arrives promptly.
    let prompt = Duration::from_millis(1500);
    let mut worst = Duration::ZERO;
    let sent = Instant::now();
    let call = bob.client.invite("carol").await?;
    carol.incoming(prompt).await?;
    worst = worst.max(sent.elapsed());
    let sent = Instant::now();
    carol.client.ringing(call).await?;
    bob.phase(call, CallPhase::Ringing, prompt).await?;
    worst = worst.max(sent.elapsed());
    let sent = Instant::now();
    carol.client.accept(call).await?;
    bob.phase(call, CallPhase::Connecting, prompt).await?;
    carol.phase(call, CallPhase::Connecting, prompt).await?;
    worst = worst.max(sent.elapsed());
    let sent = Instant::now();
    carol.client.hangup(call).await?;
    bob.ended(call, prompt).await?;
    carol.ended(call, prompt).await?;
    worst = worst.max(sent.elapsed());
    let during = stalled.elapsed();
    println!("pushes to others while a device was stuck: worst {worst:?}, all done {during:?} after the stall");

    // The stuck device is declared unreachable within the bound, and the
    // call ringing it converges.
    let (row, _) = wait_device(&server, "stuck", DETECTION + MARGIN + Duration::from_secs(2), |r| r["reachability"] == "unreachable").await?;
    let detected = stalled.elapsed();
    assert!(detected <= DETECTION + MARGIN, "detected after {detected:?}: {row}");
    let ended = dana.ended(ringing_stuck, PROMPT).await?;
    assert_eq!((reason(&ended), ended.by.as_str()), (EndReason::Unavailable, "stuck"), "{ended:?}");
    assert!(row["last_error"].as_str().is_some_and(|e| !e.is_empty()), "a reason is recorded: {row}");
    println!("stuck device unreachable after {detected:?}: {}", row["last_error"]);

    // Others were never disturbed.
    for device in [&mut dana, &mut bob, &mut carol] {
        device.drain();
        assert!(!device.seen.iter().any(|e| matches!(e, ClientEvent::Disconnected { .. })), "{}: {:#?}", device.id, device.seen);
    }
    assert!(live_calls(&server).await?.is_empty());

    // When the device wakes up it learns why it was closed, and resumes
    // within the grace: the end of the call that rang it is delivered then.
    stuck.client.simulate_stall(false);
    let close = stuck
        .expect(PROMPT, "disconnect", |e| match e {
            ClientEvent::Disconnected { close, .. } => Some(*close),
            _ => None,
        })
        .await?;
    assert!(matches!(close, Some(CloseReason::HeartbeatTimeout | CloseReason::NotReading)), "closed with {close:?}");
    let resumed = stuck
        .expect(PROMPT, "reconnect", |e| match e {
            ClientEvent::Connected { session, resumed, .. } => Some((*session, *resumed)),
            _ => None,
        })
        .await?;
    assert_eq!(Some(resumed.0), session, "same session");
    assert!(resumed.1, "resumed");
    let ended = stuck.ended(ringing_stuck, PROMPT).await?;
    assert_eq!(reason(&ended), EndReason::Unavailable);
    wait_device(&server, "stuck", PROMPT, |r| r["reachability"] == "online").await?;
    Ok(())
}
