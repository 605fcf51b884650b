//! The control stream unusable while the QUIC connection stays up, on a real
//! network (tests/netlab): every datagram on the QUIC port big enough to
//! carry a control frame is dropped, both ways, while QUIC's keep-alives and
//! acks (and the call's media, on its own port) pass. The server detects it
//! within 3 missed heartbeats, the device turns `degraded` then
//! `unreachable`, and its call converges; the device itself keeps running
//! and rejoins once the path carries frames again.
//!
//! Default heartbeat (2 s), so the QUIC keep-alive (3 s) fires within the
//! detection window: detection bound `(3 + 1) × 2 s` = 8 s, below QUIC's
//! 10 s idle timeout, which never fires because keep-alives arrive. A call
//! with connected media then converges after the resume grace (10 s).

mod common;
mod netlab;
mod quic_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetcall_signaling::client::ClientEvent;
use fleetcall_signaling::pb::EndReason;
use netlab::{assert_no_leaks, ReachabilityWatch};
use quic_support::{call_row, call_with_media, reason, wait_device, PROMPT};

/// UDP payloads above this are dropped. Measured here with the relay's size
/// histogram (`Lab::relay`, `Relay::sizes`) over 8 s of an idle registered
/// device: packets carrying only QUIC PING/ACK frames were 30–33 bytes,
/// every packet carrying a control frame 39 bytes or more (the smallest is a
/// heartbeat ack; sequence numbers and timestamps only grow).
const CONTROL_BLACKHOLE_BYTES: u16 = 36;
const DETECTION: Duration = Duration::from_secs(8);
const RESUME_GRACE: Duration = Duration::from_secs(10);
/// Polling and scheduling on a busy 2-core machine.
const MARGIN: Duration = Duration::from_secs(2);

#[test]
fn control_stream_blackholed_while_quic_stays_up() -> anyhow::Result<()> {
    netlab::run("control-blackhole", |lab| async move {
        let server = Arc::new(lab.start_server(&[])?);
        let mut alice = lab.device(&server, "alice", &[]).await?;
        let mut bob = lab.device(&server, "bob", &[]).await?;
        let call = call_with_media(&mut alice, &mut bob).await?;
        let watch = ReachabilityWatch::start(server.clone(), "bob");
        tokio::time::sleep(Duration::from_millis(300)).await;

        let blackhole = lab.drop_larger_than(&bob.node, server.quic_addr.port(), CONTROL_BLACKHOLE_BYTES)?;
        let struck = Instant::now();
        let struck_at = watch.elapsed();
        let (row, _) = wait_device(&server, "bob", DETECTION + PROMPT, |r| r["reachability"] == "unreachable").await?;
        let detected = struck.elapsed();
        let passed = blackhole.passed_each()?;
        // Media is not the control plane's hostage: it still flows.
        let heard = alice.heard();
        alice.hears(heard, 25, PROMPT).await?;

        let ended = alice.ended(call, DETECTION + RESUME_GRACE + PROMPT).await?;
        let converged = struck.elapsed();
        assert_eq!((reason(&ended), ended.by.as_str()), (EndReason::ConnectionLost, "bob"), "{ended:?}");
        assert_eq!(call_row(&server, call).await?["phase"], "CALL_PHASE_ENDED");
        blackhole.heal()?;
        let healed = Instant::now();
        // Bob never stopped; its session is gone, and it is told so.
        bob.expect(PROMPT * 2, "session unknown", |e| matches!(e, ClientEvent::SessionUnknown { .. }).then_some(())).await?;
        bob.stop_media();
        bob.expect(PROMPT, "fresh session", |e| matches!(e, ClientEvent::Connected { resumed: false, .. }).then_some(())).await?;
        let rejoined = healed.elapsed();
        wait_device(&server, "bob", PROMPT, |r| r["reachability"] == "online").await?;
        // One more poll of the watch, and time to see a flap if there were one.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let changes = watch.stop().await?;

        assert!(passed.iter().all(|&n| n > 0), "QUIC packets kept passing both ways during the black-hole: {passed:?}");
        assert!(row["last_error"].as_str().is_some_and(|e| e.contains("heartbeat")), "detected by the heartbeats: {row}");
        assert!(detected <= DETECTION + MARGIN, "unreachable {detected:?} after the black-hole, bound {DETECTION:?} + {MARGIN:?}");
        let states: Vec<&str> = changes.iter().map(|(_, s)| s.as_str()).collect();
        assert_eq!(states, ["online", "degraded", "unreachable", "online"], "{changes:?} (black-hole at {struck_at:?})");
        let bound = DETECTION + RESUME_GRACE;
        assert!(converged <= bound + MARGIN, "call ended {converged:?} after the black-hole, bound {bound:?} + {MARGIN:?}");
        println!(
            "netlab figure: control black-holed, QUIC up ({passed:?} small packets passed up/down): unreachable after {detected:?} (bound {DETECTION:?}), \
             call ended for alice after {converged:?} (bound {:?}), bob rejoined {rejoined:?} after the heal; states {changes:?}",
            DETECTION + RESUME_GRACE
        );
        assert_no_leaks(&server, 2, PROMPT).await?;
        Ok(())
    })
}
