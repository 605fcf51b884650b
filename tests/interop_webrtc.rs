//! Three clients built on the `webrtc` crate (not str0m, which the server
//! runs) join one named room of a real `fleetcall` process through the device
//! protocol over WebSocket and hear each other's Opus through the SFU. When
//! one disconnects abruptly, without a leave, the server holds nothing of it
//! within the grace plus 2 s, and the others keep talking.
//!
//! Two ways to vanish: the process dies (socket dropped without a close frame,
//! media stops: the session is kept for the resume grace, then removed), and
//! the media path goes silent while the socket stays open and heartbeats keep
//! moving, which only the media server's silence grace can detect.

mod common;

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{json, Value};

use common::webrtc_peer::{error_code, Peer};
use common::Server;

/// Media silence tolerated by the SFU; short, so the silence test is quick.
const GRACE_SECS: u64 = 4;
const GRACE: Duration = Duration::from_secs(GRACE_SECS);
/// A closed socket's session waits this long for a resume. Shorter than the
/// media grace, so a killed client is removed as a lost connection, not as
/// lost media.
const RESUME_GRACE_SECS: u64 = 2;
const RESUME_GRACE: Duration = Duration::from_secs(RESUME_GRACE_SECS);
/// Generous bounds for a busy 2-core machine; a healthy run needs a fraction.
const CONNECT_LIMIT: Duration = Duration::from_secs(15);
const AUDIO_LIMIT: Duration = Duration::from_secs(15);
/// Half a second of 20 ms frames.
const SOME_AUDIO: u64 = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_client_leaves_nothing_behind() -> anyhow::Result<()> {
    let server = start_server()?;
    let [a, b, c] = three_in_a_call(&server, "kill-test").await?;
    let call = a.call_id.clone();

    let killed_at = Instant::now();
    a.kill().await;
    // The others hear at once that A's control connection is gone, and
    // after the resume grace that A is.
    for peer in [&b, &c] {
        peer.wait_message(RESUME_GRACE, |m| is_update(m, "A", "PARTICIPANT_STATUS_RECONNECTING")).await?;
    }
    for peer in [&b, &c] {
        let (gone_at, gone) = peer.wait_message(RESUME_GRACE + Duration::from_secs(2), |m| is_update(m, "A", "PARTICIPANT_STATUS_GONE")).await?;
        assert_eq!(gone["participantUpdate"]["reason"], "END_REASON_CONNECTION_LOST", "{}: {gone}", peer.name);
        let after = gone_at - killed_at;
        assert!(after >= RESUME_GRACE - Duration::from_millis(500), "{}: A removed {after:?} after it died, before the resume grace", peer.name);
    }
    wait_for_exactly(&server, &call, 2, killed_at + RESUME_GRACE + Duration::from_secs(2)).await?;
    b.wait_receiving(&["C"], SOME_AUDIO, AUDIO_LIMIT).await?;
    c.wait_receiving(&["B"], SOME_AUDIO, AUDIO_LIMIT).await?;

    // A polite leave next: the last one left holds its own track and nothing else.
    check_clean(&b);
    b.leave().await?;
    let (_, gone) = c.wait_message(AUDIO_LIMIT, |m| is_update(m, "B", "PARTICIPANT_STATUS_GONE")).await?;
    assert_eq!(gone["participantUpdate"]["reason"], "END_REASON_LEFT", "{gone}");
    wait_for_exactly(&server, &call, 1, Instant::now() + AUDIO_LIMIT).await?;

    check_clean(&c);
    c.leave().await?;
    wait_for_exactly(&server, &call, 0, Instant::now() + AUDIO_LIMIT).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_removed_after_the_grace() -> anyhow::Result<()> {
    let server = start_server()?;
    let [a, b, c] = three_in_a_call(&server, "silence-test").await?;
    let call = a.call_id.clone();

    let silent_since = a.silence_media();
    // Its socket stays open and heartbeating, so only the silence grace can end it.
    let removal_limit = GRACE + Duration::from_secs(2);
    let (ended_at, ended) = a.wait_message(removal_limit, |m| m["callEnded"]["callId"] == call.as_str()).await?;
    assert_eq!(ended["callEnded"]["reason"], "END_REASON_MEDIA_FAILED", "{ended}");
    let after = ended_at - silent_since;
    // The last datagram got through a frame or so before the cut; the margin
    // covers a stalled machine, and still tells "after the grace" from "at once".
    assert!(after >= GRACE - Duration::from_secs(1), "removed {after:?} after the media stopped, before the grace {GRACE:?}");
    assert!(after <= removal_limit, "removed {after:?} after the media stopped");
    wait_for_exactly(&server, &call, 2, silent_since + removal_limit).await?;
    for peer in [&b, &c] {
        let (_, gone) = peer.wait_message(removal_limit, |m| is_update(m, "A", "PARTICIPANT_STATUS_GONE")).await?;
        assert_eq!(gone["participantUpdate"]["reason"], "END_REASON_MEDIA_FAILED", "{}: {gone}", peer.name);
    }
    b.wait_receiving(&["C"], SOME_AUDIO, AUDIO_LIMIT).await?;
    c.wait_receiving(&["B"], SOME_AUDIO, AUDIO_LIMIT).await?;

    // The removed client's session is still open, out of the call, and
    // frames still move both ways.
    let offer = json!({ "sdpOffer": { "callId": call, "sessionId": a.session_id(), "revision": "2", "sdp": a.local_sdp().await? } });
    let reply = a.request(offer).await?;
    assert_eq!(error_code(&reply), "ERROR_CODE_NOT_IN_CALL", "{reply}");
    let reply = a.request(json!({ "groupLeave": { "callId": call } })).await?;
    assert!(reply.get("ack").is_some(), "leaving a call one is already out of is an ack: {reply}");
    let acks = a.heartbeat_acks();
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.heartbeat_acks() == acks {
        assert!(Instant::now() < deadline, "A's heartbeats are no longer answered: {}", a.message_summary());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!a.messages().iter().any(|m| m.get("_closed").is_some()), "{}", a.message_summary());

    // Then the other two vanish the other way: the last one is killed.
    check_clean(&b);
    b.leave().await?;
    wait_for_exactly(&server, &call, 1, Instant::now() + AUDIO_LIMIT).await?;
    check_clean(&c);
    let killed_at = Instant::now();
    c.kill().await;
    wait_for_exactly(&server, &call, 0, killed_at + RESUME_GRACE + Duration::from_secs(2)).await?;
    Ok(())
}

fn start_server() -> anyhow::Result<Server> {
    Server::start(&["--disconnect-grace-secs", &GRACE_SECS.to_string(), "--resume-grace-secs", &RESUME_GRACE_SECS.to_string()])
}

/// Three peers in `room`, each hearing the other two.
async fn three_in_a_call(server: &Server, room: &str) -> anyhow::Result<[Peer; 3]> {
    let a = Peer::join(server, room, "A").await?;
    let b = Peer::join(server, room, "B").await?;
    let c = Peer::join(server, room, "C").await?;
    assert!(a.others_at_join.is_empty(), "{:?}", a.others_at_join);
    assert_eq!(b.others_at_join, ["A"]);
    assert_eq!(c.others_at_join, ["A", "B"]);
    assert!(a.call_id == b.call_id && b.call_id == c.call_id, "one room, one call: {} {} {}", a.call_id, b.call_id, c.call_id);
    let peers = [a, b, c];
    for peer in &peers {
        peer.wait_connected(CONNECT_LIMIT).await?;
    }
    for peer in &peers {
        let others: Vec<&str> = ["A", "B", "C"].into_iter().filter(|id| *id != peer.name).collect();
        peer.wait_receiving(&others, SOME_AUDIO, AUDIO_LIMIT).await?;
    }
    for peer in &peers {
        check_clean(peer);
    }
    wait_for_exactly(server, &peers[0].call_id, 3, Instant::now() + CONNECT_LIMIT).await?;
    Ok(peers)
}

/// Waits until the server holds exactly what `n` connected publishers in one
/// room need, and nothing more: in the SFU, and as members of `call` in the
/// controller (which ends the room with its last member); fails at
/// `deadline` with the last figures.
async fn wait_for_exactly(server: &Server, call: &str, n: u64, deadline: Instant) -> anyhow::Result<()> {
    let expected = json!({
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
        let row = call_row(server, call).await?;
        let members = row["members"].as_array().map_or(0, Vec::len) as u64;
        let phase_ok = if n > 0 {
            row["phase"] == "CALL_PHASE_ACTIVE"
        } else {
            row["phase"] == "CALL_PHASE_ENDED" && row["end_reason"] == "END_REASON_EMPTY"
        };
        if expected.as_object().expect("object").iter().all(|(key, value)| stats[key] == *value) && members == n && phase_ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("expected {expected} and {n} members for {n} participants, stats are {stats}, the call is {row}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `GET /api/calls` row of `call`.
async fn call_row(server: &Server, call: &str) -> anyhow::Result<Value> {
    let body = common::http_get(&format!("{}/api/calls", server.url), Some(&server.admin_token)).await?;
    let rows: Value = serde_json::from_str(&body)?;
    let row = rows.as_array().and_then(|rows| rows.iter().find(|r| r["id"].as_u64() == call.parse().ok()));
    row.cloned().ok_or_else(|| anyhow::anyhow!("call {call} not in {rows}"))
}

fn is_update(message: &Value, device: &str, status: &str) -> bool {
    let update = &message["participantUpdate"];
    update["deviceId"] == device && update["status"] == status
}

/// No renegotiation failed and no packet came out of the wrong track.
fn check_clean(peer: &Peer) {
    assert_eq!(peer.failures(), Vec::<String>::new(), "{}", peer.name);
    assert_eq!(peer.misrouted(), 0, "{}: packets on the wrong participant's track", peer.name);
}
