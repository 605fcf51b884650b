//! A callee lost while its call rings, on a real network (tests/netlab):
//! its process killed or paused, or its link cut. The caller hears `UNAVAILABLE`, the
//! call is `ended` on the server within the detection bound + 2 s, and
//! nothing is left: no ring timer, no media, no session beyond the grace.
//!
//! Heartbeats every 0.5 s: a stream that stops moving is unreachable within
//! `(3 + 1) × interval` = 2 s (PROTOCOL.md, "Liveness").

mod common;
mod netlab;
mod quic_support;

use std::time::{Duration, Instant};

use fleetcall_signaling::client::ClientEvent;
use fleetcall_signaling::ids::CallId;
use fleetcall_signaling::pb::{CallPhase, EndReason};
use netlab::{assert_no_leaks, signal, Way};
use nix::sys::signal::Signal;
use quic_support::{call_row, reason, PROMPT};

const HEARTBEAT: &str = "0.5";
const DETECTION_MS: u64 = 4 * 500;
/// The pass figure: detection bound + 2 s.
const BOUND: Duration = Duration::from_millis(DETECTION_MS + 2000);
/// A short resume grace, so the lost callee's session is swept (and the leak
/// check sees it gone) without waiting the default 10 s.
const GRACE: &str = "4";
const SERVER: [&str; 4] = ["--heartbeat-secs", HEARTBEAT, "--resume-grace-secs", GRACE];

/// Polls `/api/calls` until `call` is ended; how long after `since`.
async fn server_ended(server: &common::Server, call: CallId, since: Instant) -> anyhow::Result<(String, Duration)> {
    loop {
        let row = call_row(server, call).await?;
        if row["phase"] == "CALL_PHASE_ENDED" {
            return Ok((row["end_reason"].as_str().unwrap_or_default().to_owned(), since.elapsed()));
        }
        anyhow::ensure!(since.elapsed() < BOUND * 3, "call {} not ended on the server: {row}", call.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn killed_callee_while_ringing_ends_unavailable() -> anyhow::Result<()> {
    netlab::run("killed-callee", |lab| async move {
        let server = lab.start_server(&SERVER)?;
        // The callee is the reference agent, a real process in its own
        // namespace; it rings and does not answer.
        let (mut callee, _node) = lab.agent(&server, "bed-7", &[])?;
        callee.line("registered bed-7", PROMPT * 2).await?;
        let mut nurse = lab.device(&server, "nurse", &[]).await?;

        let call = nurse.client.invite("bed-7").await?;
        nurse.start_media(call, 440.0).await?;
        callee.line("incoming call", PROMPT).await?;
        nurse.phase(call, CallPhase::Ringing, PROMPT).await?;
        server.wait_stats(PROMPT, |s| s["participants"] == 1).await?;

        signal(callee.child.id(), Signal::SIGKILL)?;
        let killed = Instant::now();
        callee.child.wait()?;
        let ended = nurse.ended(call, BOUND * 3).await?;
        let caller_took = killed.elapsed();
        let (server_reason, server_took) = server_ended(&server, call, killed).await?;
        assert_eq!((reason(&ended), ended.by.as_str()), (EndReason::Unavailable, "bed-7"), "{ended:?}");
        assert_eq!(server_reason, "END_REASON_UNAVAILABLE");
        assert!(caller_took <= BOUND, "caller heard UNAVAILABLE {caller_took:?} after the kill, bound {BOUND:?}");
        println!("netlab figure: killed callee while ringing: caller unavailable after {caller_took:?}, server ended within {server_took:?} (bound {BOUND:?})");

        // The nurse keeps its session; the killed callee's is swept after the grace.
        let clean = assert_no_leaks(&server, 1, PROMPT * 2).await?;
        println!("netlab figure: killed callee: server clean {clean:?} after the caller converged");
        Ok(())
    })
}

#[test]
fn callee_link_cut_while_ringing_ends_unavailable() -> anyhow::Result<()> {
    netlab::run("cut-callee", |lab| async move {
        let server = lab.start_server(&SERVER)?;
        let mut bob = lab.device(&server, "bob", &[]).await?;
        let mut nurse = lab.device(&server, "nurse", &[]).await?;

        let call = nurse.client.invite("bob").await?;
        nurse.start_media(call, 440.0).await?;
        bob.incoming(PROMPT).await?;
        bob.client.ringing(call).await?;
        nurse.phase(call, CallPhase::Ringing, PROMPT).await?;

        let cut = lab.cut(&bob.node, Way::Both)?;
        let struck = Instant::now();
        let ended = nurse.ended(call, BOUND * 3).await?;
        let caller_took = struck.elapsed();
        let (server_reason, server_took) = server_ended(&server, call, struck).await?;
        assert_eq!((reason(&ended), ended.by.as_str()), (EndReason::Unavailable, "bob"), "{ended:?}");
        assert_eq!(server_reason, "END_REASON_UNAVAILABLE");
        assert!(caller_took <= BOUND, "caller heard UNAVAILABLE {caller_took:?} after the cut, bound {BOUND:?}");
        println!("netlab figure: callee link cut while ringing: caller unavailable after {caller_took:?}, server ended within {server_took:?} (bound {BOUND:?})");

        // The callee's side converges too once the link is back: it resumes
        // within the grace and hears the end of the call that rang it.
        cut.heal()?;
        let healed = Instant::now();
        let resumed = bob
            .expect(PROMPT, "resumed session", |e| match e {
                ClientEvent::Connected { resumed, .. } => Some(*resumed),
                _ => None,
            })
            .await?;
        assert!(resumed, "bob resumed its session: {:#?}", bob.seen);
        let bob_ended = bob.ended(call, PROMPT).await?;
        assert_eq!(reason(&bob_ended), EndReason::Unavailable, "{bob_ended:?}");
        println!("netlab figure: callee link cut while ringing: callee heard the end {:?} after the heal", healed.elapsed());
        let ends = bob.seen.iter().filter(|e| matches!(e, ClientEvent::CallEnded(m) if m.call_id == call.0)).count();
        assert_eq!(ends, 1, "exactly one call_ended: {:#?}", bob.seen);

        assert_no_leaks(&server, 2, PROMPT).await?;
        Ok(())
    })
}

#[test]
fn paused_callee_while_ringing_ends_unavailable_and_hears_it_on_waking() -> anyhow::Result<()> {
    netlab::run("paused-callee", |lab| async move {
        let server = lab.start_server(&SERVER)?;
        let (mut callee, _node) = lab.agent(&server, "bed-9", &[])?;
        callee.line("registered bed-9", PROMPT * 2).await?;
        let mut nurse = lab.device(&server, "nurse", &[]).await?;

        let call = nurse.client.invite("bed-9").await?;
        callee.line("incoming call", PROMPT).await?;
        nurse.phase(call, CallPhase::Ringing, PROMPT).await?;

        // A frozen process: its sockets stay open, nothing is read or sent.
        signal(callee.child.id(), Signal::SIGSTOP)?;
        let paused = Instant::now();
        let ended = nurse.ended(call, BOUND * 3).await?;
        let caller_took = paused.elapsed();
        let (server_reason, _) = server_ended(&server, call, paused).await?;
        assert_eq!((reason(&ended), ended.by.as_str()), (EndReason::Unavailable, "bed-9"), "{ended:?}");
        assert_eq!(server_reason, "END_REASON_UNAVAILABLE");
        assert!(caller_took <= BOUND, "caller heard UNAVAILABLE {caller_took:?} after the pause, bound {BOUND:?}");

        // Woken within the resume grace, the callee resumes and hears the end.
        signal(callee.child.id(), Signal::SIGCONT)?;
        let woken = Instant::now();
        callee.line("reconnected session", PROMPT).await?;
        let end = callee.line(&format!("call {} ended", call.0), PROMPT).await?;
        assert_eq!(end, format!("call {} ended UNAVAILABLE by bed-9", call.0));
        println!("netlab figure: paused callee while ringing: caller unavailable after {caller_took:?} (bound {BOUND:?}), callee heard the end {:?} after waking", woken.elapsed());
        assert_no_leaks(&server, 2, PROMPT).await?;
        Ok(())
    })
}
