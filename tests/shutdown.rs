//! SIGTERM: every connected client hears it. Two `webrtc` peers talking in a
//! room are told `callEnded{SERVER_SHUTDOWN}`, an idle session is told nothing
//! but the close, every socket closes with 4008 (4000 + SHUTDOWN), and the
//! process exits cleanly within its deadline.

mod common;

use std::time::{Duration, Instant};

use common::webrtc_peer::{close_code, Peer, Raw};
use common::Server;

/// The server's shutdown deadline.
const DEADLINE_SECS: u64 = 3;
/// Generous bounds for a busy 2-core machine.
const LIMIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_tells_clients_and_exits_within_the_deadline() -> anyhow::Result<()> {
    let mut server = Server::start(&["--shutdown-timeout-secs", &DEADLINE_SECS.to_string()])?;
    let a = Peer::join(&server, "shutdown", "A").await?;
    let b = Peer::join(&server, "shutdown", "B").await?;
    for peer in [&a, &b] {
        peer.wait_connected(LIMIT).await?;
    }
    a.wait_receiving(&["B"], 25, LIMIT).await?;
    b.wait_receiving(&["A"], 25, LIMIT).await?;
    let (mut idle, _) = Raw::register(&server, &server.token("idle", &[])).await?;

    let pid = server.child.id();
    assert!(common::sigterm(pid)?);
    let signalled = Instant::now();

    let deadline = Duration::from_secs(DEADLINE_SECS);
    for peer in [&a, &b] {
        let call = peer.call_id.clone();
        let (ended_at, ended) = peer.wait_message(LIMIT, |m| m["callEnded"]["callId"] == call.as_str()).await?;
        assert_eq!(ended["callEnded"]["reason"], "END_REASON_SERVER_SHUTDOWN", "{}: {ended}", peer.name);
        let (closed_at, closed) = peer.wait_message(LIMIT, |m| m.get("_closed").is_some()).await?;
        assert_eq!(close_code(&closed), Some(4008), "{}: {closed}", peer.name);
        assert!(ended_at <= closed_at, "{}: the call ends before the socket closes", peer.name);
        assert!(closed_at - signalled <= deadline, "{}: closed {:?} after SIGTERM, deadline {deadline:?}", peer.name, closed_at - signalled);
        let frames_after_end = peer.messages().iter().skip_while(|m| m.get("callEnded").is_none()).filter(|m| m.get("callEnded").is_some()).count();
        assert_eq!(frames_after_end, 1, "{}: exactly one callEnded: {}", peer.name, peer.message_summary());
    }
    let frame = idle.next().await?;
    assert_eq!(close_code(&frame), Some(4008), "the idle session: {frame}");
    assert!(signalled.elapsed() <= deadline + Duration::from_secs(1), "idle session closed {:?} after SIGTERM", signalled.elapsed());

    // Deadline 3 s; allow generous slack for a busy machine.
    let exit = loop {
        if let Some(status) = server.child.try_wait()? {
            break status;
        }
        anyhow::ensure!(signalled.elapsed() < Duration::from_secs(10), "server still running 10 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "clean exit: {exit}");
    Ok(())
}
