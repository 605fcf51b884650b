//! Three clients built on the `webrtc` crate (not str0m, which the server
//! runs) join one room of a real `fleetcall` process through the signaling
//! endpoint and hear each other's Opus through the SFU. When one disconnects
//! abruptly, without a leave, the server holds nothing of it within the
//! grace plus 2 s, and the others keep talking.
//!
//! Two ways to vanish: the process dies (socket dropped without a close frame,
//! media stops), and the media path goes silent while the socket stays open,
//! which only the silence grace can detect.

mod common;

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;

use common::webrtc_peer::Peer;
use common::Server;

/// Short, so the silence test is quick.
const GRACE_SECS: u64 = 3;
const GRACE: Duration = Duration::from_secs(GRACE_SECS);
/// The issue's bound: entries gone within the grace plus 2 s.
const REMOVAL_LIMIT: Duration = Duration::from_secs(GRACE_SECS + 2);
/// Generous bounds for a busy 2-core machine; a healthy run needs a fraction.
const CONNECT_LIMIT: Duration = Duration::from_secs(15);
const AUDIO_LIMIT: Duration = Duration::from_secs(15);
/// Half a second of 20 ms frames.
const SOME_AUDIO: u64 = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_client_leaves_nothing_behind() -> anyhow::Result<()> {
    let server = start_server()?;
    let [a, b, c] = three_in_a_call(&server, "kill-test").await?;
    let (gone, b_id, c_id) = (a.participant, b.participant, c.participant);

    let killed_at = Instant::now();
    a.kill().await;
    // The closed socket ends the session at once; the grace only bounds it.
    wait_for_exactly(&server, 2, killed_at + REMOVAL_LIMIT).await?;
    for peer in [&b, &c] {
        let (_, left) = peer.wait_message(REMOVAL_LIMIT, |m| is_left(m, gone)).await?;
        assert_eq!(left["reason"], "signaling_closed", "{}: {left}", peer.name);
    }
    b.wait_receiving(&[c_id], SOME_AUDIO, AUDIO_LIMIT).await?;
    c.wait_receiving(&[b_id], SOME_AUDIO, AUDIO_LIMIT).await?;

    // A polite leave next: the last one left holds its own track and nothing else.
    check_clean(&b);
    b.leave().await?;
    let (_, left) = c.wait_message(REMOVAL_LIMIT, |m| is_left(m, b_id)).await?;
    assert_eq!(left["reason"], "requested", "{left}");
    wait_for_exactly(&server, 1, Instant::now() + REMOVAL_LIMIT).await?;

    check_clean(&c);
    c.leave().await?;
    wait_for_exactly(&server, 0, Instant::now() + REMOVAL_LIMIT).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_removed_after_the_grace() -> anyhow::Result<()> {
    let server = start_server()?;
    let [a, b, c] = three_in_a_call(&server, "silence-test").await?;
    let (gone, b_id, c_id) = (a.participant, b.participant, c.participant);

    let silent_since = a.silence_media();
    // Its socket stays open and reading, so only the silence grace can end it.
    let (left_at, left) = a.wait_message(REMOVAL_LIMIT, |m| m["type"] == "left").await?;
    assert_eq!(left["reason"], "ice_timeout", "{left}");
    let after = left_at - silent_since;
    // The last datagram got through a frame or so before the cut; the margin
    // covers a stalled machine, and still tells "after the grace" from "at once".
    assert!(after >= GRACE - Duration::from_secs(1), "removed {after:?} after the media stopped, before the grace {GRACE:?}");
    assert!(after <= REMOVAL_LIMIT, "removed {after:?} after the media stopped");
    wait_for_exactly(&server, 2, silent_since + REMOVAL_LIMIT).await?;
    for peer in [&b, &c] {
        let (_, left) = peer.wait_message(REMOVAL_LIMIT, |m| is_left(m, gone)).await?;
        assert_eq!(left["reason"], "ice_timeout", "{}: {left}", peer.name);
    }
    b.wait_receiving(&[c_id], SOME_AUDIO, AUDIO_LIMIT).await?;
    c.wait_receiving(&[b_id], SOME_AUDIO, AUDIO_LIMIT).await?;

    // The removed client's socket is still open and back to not joined.
    a.send_text(r#"{"type":"leave"}"#)?;
    let (_, error) = a.wait_message(REMOVAL_LIMIT, |m| m["type"] == "error").await?;
    assert_eq!(error["code"], "not_joined", "{error}");
    assert!(!a.messages().iter().any(|m| m["type"] == "_closed"), "{}", a.message_summary());

    // Then the other two vanish the other way: the last one is killed.
    check_clean(&b);
    b.leave().await?;
    wait_for_exactly(&server, 1, Instant::now() + REMOVAL_LIMIT).await?;
    check_clean(&c);
    let killed_at = Instant::now();
    c.kill().await;
    wait_for_exactly(&server, 0, killed_at + REMOVAL_LIMIT).await?;
    Ok(())
}

fn start_server() -> anyhow::Result<Server> {
    Server::start(&["--disconnect-grace-secs", &GRACE_SECS.to_string()])
}

/// Three peers in `room`, each hearing the other two.
async fn three_in_a_call(server: &Server, room: &str) -> anyhow::Result<[Peer; 3]> {
    let a = Peer::join(server, room, "A").await?;
    let b = Peer::join(server, room, "B").await?;
    let c = Peer::join(server, room, "C").await?;
    assert_eq!(b.others_at_join, [a.participant]);
    assert_eq!(c.others_at_join, [a.participant, b.participant]);
    let peers = [a, b, c];
    for peer in &peers {
        peer.wait_connected(CONNECT_LIMIT).await?;
    }
    for peer in &peers {
        let others: Vec<u64> = peers.iter().map(|p| p.participant).filter(|id| *id != peer.participant).collect();
        peer.wait_receiving(&others, SOME_AUDIO, AUDIO_LIMIT).await?;
    }
    for peer in &peers {
        check_clean(peer);
    }
    wait_for_exactly(server, 3, Instant::now() + CONNECT_LIMIT).await?;
    Ok(peers)
}

/// Waits until the server holds exactly what `n` connected publishers in one
/// room need, and nothing more; fails at `deadline` with the last stats.
async fn wait_for_exactly(server: &Server, n: u64, deadline: Instant) -> anyhow::Result<()> {
    let expected = serde_json::json!({
        "rooms": u64::from(n > 0),
        "participants": n,
        "tracks": n,
        // Each track to each of the others.
        "forwarding_entries": n * n.saturating_sub(1),
        // Each participant's ICE ufrag and its one address.
        "demux_entries": 2 * n,
    });
    loop {
        let stats = server.stats().await?;
        if expected.as_object().expect("object").iter().all(|(key, value)| stats[key] == *value) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("expected {expected} for {n} participants, stats are {stats}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn is_left(message: &Value, participant: u64) -> bool {
    message["type"] == "participant_left" && message["id"] == participant
}

/// No renegotiation failed and no packet came out of the wrong track.
fn check_clean(peer: &Peer) {
    assert_eq!(peer.failures(), Vec::<String>::new(), "{}", peer.name);
    assert_eq!(peer.misrouted(), 0, "{}: packets on the wrong participant's track", peer.name);
}
