//! Bad input costs nothing but itself. Two `webrtc` crate clients stay in a
//! room on a real `fleetcall` process while other sockets send malformed,
//! unknown and oversize device-protocol frames, frames before `hello`, joins
//! of bad rooms and rooms not granted, requests for calls they are not in,
//! bad SDP, and thousands of garbage datagrams at the media port. Each gets
//! a clear error (or close code) or is dropped and counted; the call keeps
//! its audio and nothing is left behind.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fleetcall_signaling::wire::MAX_FRAME_BYTES;
use serde_json::{json, Value};
use tokio::net::UdpSocket;
use tokio_tungstenite::tungstenite::Message;

use common::webrtc_peer::{close_code, error_code, hello, Door, Intruder, Peer, Plan, Raw};
use common::{http_get_status, Server};

/// Generous bounds for a busy 2-core machine; a healthy run needs a fraction.
const LIMIT: Duration = Duration::from_secs(15);
/// Half a second of 20 ms frames.
const SOME_AUDIO: u64 = 25;
/// The server's deadline for `hello` after connect.
const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// Bad frames a connection may send before it is closed.
const BAD_FRAME_BUDGET: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signaling_gets_clear_errors_and_the_call_goes_on() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let (a, b) = two_in_a_call(&server, "ward-1").await?;
    let call = a.call_id.clone();
    // Says nothing at all; checked at the end, after the hello deadline.
    let connected_at = Instant::now();
    let mut mute = Raw::connect(&server.ws_url(&server.token("mute", &["ward-1"]))).await?;

    // One registered session takes every non-fatal mistake in turn and stays
    // usable. Its token grants ward-1 (the live room) and ward-new.
    let nurse = Intruder::attempt(&server, Plan::with_token("Nurse", Some(server.token("Nurse", &["ward-1", "ward-new"])), Door::None)).await?;
    assert!(nurse.refusal.is_none() && nurse.welcome.is_some(), "{:?}: {}", nurse.refusal, nurse.message_summary());
    // Frames that are not a request the server knows: answered, counted
    // against the connection's budget, and nothing else.
    let bad_frames: Vec<(&str, Message, &str)> = vec![
        ("not JSON", Message::text("hello?"), "ERROR_CODE_MALFORMED_FRAME"),
        ("empty text", Message::text(""), "ERROR_CODE_MALFORMED_FRAME"),
        ("JSON, not an object", Message::text("[1,2,3]"), "ERROR_CODE_MALFORMED_FRAME"),
        ("a JSON string", Message::text(r#""roomJoin""#), "ERROR_CODE_MALFORMED_FRAME"),
        ("binary frame", Message::binary(vec![0u8, 159, 146, 150]), "ERROR_CODE_MALFORMED_FRAME"),
        ("opId not a number", Message::text(r#"{"opId":"x","roomJoin":{"room":"ward-1"}}"#), "ERROR_CODE_MALFORMED_FRAME"),
        ("a field of the wrong type", Message::text(r#"{"opId":"900","roomJoin":{"room":7}}"#), "ERROR_CODE_MALFORMED_FRAME"),
        ("two kinds in one frame", Message::text(r#"{"opId":"901","roomJoin":{"room":"ward-1"},"hangup":{"callId":"1"}}"#), "ERROR_CODE_MALFORMED_FRAME"),
        ("unknown kind", Message::text(r#"{"opId":"902","teleport":{"to":"ward-1"}}"#), "ERROR_CODE_UNKNOWN_MESSAGE"),
        ("no kind at all", Message::text("{}"), "ERROR_CODE_UNKNOWN_MESSAGE"),
        ("request without opId", Message::text(r#"{"roomJoin":{"room":"ward-1"}}"#), "ERROR_CODE_MISSING_OP_ID"),
    ];
    assert!(bad_frames.len() < BAD_FRAME_BUDGET);
    for (what, message, code) in bad_frames {
        let mark = nurse.message_count();
        nurse.send_message(message)?;
        let (_, reply) = nurse.wait_message_since(mark, LIMIT, |m| m.get("error").is_some() || m.get("_closed").is_some()).await.context(what)?;
        expect_error(what, &reply, code)?;
    }
    // Requests the server understands but refuses; they cost no budget.
    let long_room = "r".repeat(200);
    let live = json!(call);
    let requests: Vec<(&str, Value, &str)> = vec![
        ("room with a space", json!({ "roomJoin": { "room": "a b" } }), "ERROR_CODE_INVALID_ARGUMENT"),
        ("empty room", json!({ "roomJoin": { "room": "" } }), "ERROR_CODE_INVALID_ARGUMENT"),
        ("200-character room", json!({ "roomJoin": { "room": long_room } }), "ERROR_CODE_INVALID_ARGUMENT"),
        ("room with a slash", json!({ "roomJoin": { "room": "ward/1" } }), "ERROR_CODE_INVALID_ARGUMENT"),
        ("room with non-ASCII", json!({ "roomJoin": { "room": "station-ä" } }), "ERROR_CODE_INVALID_ARGUMENT"),
        ("room the token does not grant", json!({ "roomJoin": { "room": "ward-9" } }), "ERROR_CODE_FORBIDDEN"),
        ("offer into no call", json!({ "sdpOffer": { "callId": "999", "revision": "1", "sdp": "v=0" } }), "ERROR_CODE_UNKNOWN_CALL"),
        ("offer into the live room, not joined", json!({ "sdpOffer": { "callId": live, "revision": "1", "sdp": a.local_sdp().await? } }), "ERROR_CODE_NOT_IN_CALL"),
        ("groupJoin of the room's call, not joined", json!({ "groupJoin": { "callId": live } }), "ERROR_CODE_NOT_IN_CALL"),
        ("groupEnd of the room's call, not joined", json!({ "groupEnd": { "callId": live } }), "ERROR_CODE_NOT_IN_CALL"),
        ("answer with no call", json!({ "sdpAnswer": { "callId": live, "revision": "1", "sdp": "v=0" } }), "ERROR_CODE_NOT_IN_CALL"),
        ("hangup of no call", json!({ "hangup": { "callId": "999" } }), "ERROR_CODE_UNKNOWN_CALL"),
        ("invite with an empty callee", json!({ "invite": { "callee": "" } }), "ERROR_CODE_INVALID_ARGUMENT"),
        ("invite yourself", json!({ "invite": { "callee": "Nurse" } }), "ERROR_CODE_INVALID_ARGUMENT"),
    ];
    for (what, body, code) in requests {
        let reply = nurse.request(body).await.context(what)?;
        expect_error(what, &reply, code)?;
    }
    let mark = nurse.message_count();
    nurse.send(hello())?;
    let (_, reply) = nurse.wait_message_since(mark, LIMIT, |m| m.get("error").is_some() || m.get("welcome").is_some()).await?;
    expect_error("second hello", &reply, "ERROR_CODE_UNEXPECTED_HELLO")?;

    // Bad SDP into a room nobody is in: the controller passes it on, the
    // media server refuses it, the participation ends with a clear reason
    // and the room does not outlive it.
    for (what, sdp) in [("SDP that is not SDP", "not sdp"), ("SDP cut after one line", "v=0\r\n")] {
        let reply = nurse.request(json!({ "roomJoin": { "room": "ward-new" } })).await?;
        let fresh = reply["ack"]["callId"].as_str().with_context(|| format!("{what}: roomJoin answered {reply}"))?.to_owned();
        assert_ne!(fresh, call, "{what}: ward-new is its own call");
        let reply = nurse.request(json!({ "sdpOffer": { "callId": fresh, "revision": "1", "sdp": sdp } })).await?;
        assert!(reply.get("ack").is_some(), "{what}: {reply}");
        let (_, ended) = nurse.wait_message(LIMIT, |m| m["callEnded"]["callId"] == fresh.as_str()).await?;
        assert_eq!(ended["callEnded"]["reason"], "END_REASON_MEDIA_FAILED", "{what}: {ended}");
        assert!(ended["callEnded"]["detail"].as_str().is_some_and(|d| !d.is_empty()), "{what}: {ended}");
    }
    let reply = nurse.request(json!({ "roomJoin": { "room": "ward-new" } })).await?;
    let fresh = reply["ack"]["callId"].as_str().with_context(|| format!("roomJoin answered {reply}"))?.to_owned();
    let reply = nurse.request(json!({ "sdpOffer": { "callId": fresh, "revision": "1", "sdp": "" } })).await?;
    expect_error("empty SDP", &reply, "ERROR_CODE_INVALID_ARGUMENT")?;
    let reply = nurse.request(json!({ "groupLeave": { "callId": fresh } })).await?;
    assert!(reply.get("ack").is_some(), "{reply}");
    let stats = server.stats().await?;
    assert_eq!((stats["rooms"].as_u64(), stats["participants"].as_u64()), (Some(1), Some(2)), "{stats}");
    assert_eq!(live_calls(&server).await?, std::slice::from_ref(&call), "only the room with the two peers is live");

    // Mistakes on a joined socket are refused and leave the session alone.
    // Both peers answered the server's only offer before they heard each
    // other, and nobody joins or leaves here, so no offer is outstanding.
    let a_sdp = a.local_sdp().await?;
    let session = a.session_id();
    let reply = a.request(json!({ "roomJoin": { "room": "ward-1" } })).await?;
    assert_eq!(reply["ack"]["callId"], call.as_str(), "joining the room one is in is success: {reply}");
    let joined_cases: Vec<(&str, Value, &str)> = vec![
        ("join a room not granted", json!({ "roomJoin": { "room": "ward-2" } }), "ERROR_CODE_FORBIDDEN"),
        ("answer with no offer pending", json!({ "sdpAnswer": { "callId": call, "sessionId": session, "revision": "1", "sdp": a_sdp } }), "ERROR_CODE_NO_PENDING_OFFER"),
        ("a second join offer", json!({ "sdpOffer": { "callId": call, "sessionId": session, "revision": "2", "sdp": a_sdp } }), "ERROR_CODE_INVALID_STATE"),
        ("an offer naming another session", json!({ "sdpOffer": { "callId": call, "sessionId": "123456", "revision": "2", "sdp": a_sdp } }), "ERROR_CODE_STALE_SESSION"),
        ("ICE restart with an empty SDP", json!({ "iceRestart": { "callId": call, "sessionId": session, "revision": "2", "sdp": "" } }), "ERROR_CODE_INVALID_ARGUMENT"),
        ("end a room (it has no owner)", json!({ "groupEnd": { "callId": call } }), "ERROR_CODE_FORBIDDEN"),
        ("invite while in a call", json!({ "invite": { "callee": "B" } }), "ERROR_CODE_ALREADY_IN_CALL"),
        ("unknown kind while joined", json!({ "teleport": {} }), "ERROR_CODE_UNKNOWN_MESSAGE"),
    ];
    for (what, body, code) in joined_cases {
        let reply = a.request(body).await.context(what)?;
        expect_error(what, &reply, code)?;
    }

    // Frames before hello end the connection with a reason.
    let token = server.token("early", &["ward-1"]);
    let before_hello: Vec<(&str, Value, &str, u16)> = vec![
        ("a request before hello", json!({ "opId": "1", "roomJoin": { "room": "ward-1" } }), "ERROR_CODE_NOT_REGISTERED", 4001),
        ("a heartbeat before hello", json!({ "heartbeat": { "seq": "1", "sentAtMs": "1" } }), "ERROR_CODE_NOT_REGISTERED", 4001),
    ];
    for (what, frame, code, close) in before_hello {
        let mut raw = Raw::connect(&server.ws_url(&token)).await?;
        raw.send(frame).await.context(what)?;
        let reply = raw.next().await.context(what)?;
        expect_error(what, &reply, code)?;
        assert_eq!(raw.closed().await.context(what)?, Some(close), "{what}");
    }
    let mut raw = Raw::connect(&server.ws_url(&token)).await?;
    raw.send_message(Message::text("{{{")).await?;
    let reply = raw.next().await.context("malformed before hello")?;
    expect_error("malformed before hello", &reply, "ERROR_CODE_MALFORMED_FRAME")?;
    assert_eq!(raw.closed().await.context("malformed before hello")?, Some(4001), "malformed before hello");
    for (min, max) in [(2, 3), (0, 0), (3, 1)] {
        let mut raw = Raw::connect(&server.ws_url(&token)).await?;
        raw.send(json!({ "hello": { "minVersion": min, "maxVersion": max } })).await?;
        let reply = raw.next().await.with_context(|| format!("versions {min}..={max}"))?;
        assert_eq!(reply["rejected"]["code"], "ERROR_CODE_UNSUPPORTED_VERSION", "versions {min}..={max}: {reply}");
        assert_eq!((reply["rejected"]["serverMinVersion"].as_u64(), reply["rejected"]["serverMaxVersion"].as_u64()), (Some(1), Some(1)), "{reply}");
        assert_eq!(raw.closed().await.with_context(|| format!("versions {min}..={max}"))?, Some(4003), "versions {min}..={max}");
    }

    // Too many bad frames: the budget runs out, the connection closes.
    let (mut raw, _) = Raw::register(&server, &server.token("noisy", &["ward-1"])).await?;
    for _ in 0..=BAD_FRAME_BUDGET {
        raw.send_message(Message::text("nonsense")).await.context("too many errors")?;
    }
    let mut malformed = 0;
    let last = loop {
        let frame = raw.next().await.context("too many errors")?;
        match frame["error"]["code"].as_str() {
            Some("ERROR_CODE_MALFORMED_FRAME") => malformed += 1,
            _ => break frame,
        }
    };
    assert_eq!(last["error"]["code"], "ERROR_CODE_TOO_MANY_ERRORS", "after {malformed} errors: {last}");
    assert_eq!(malformed, BAD_FRAME_BUDGET + 1, "each bad frame is answered");
    assert_eq!(raw.closed().await.context("too many errors")?, Some(4007), "too many errors");

    // Oversize frames end the socket with a reason. Just over the limit the
    // server has read the whole frame, so it answers and closes cleanly.
    let (mut big, _) = Raw::register(&server, &server.token("big", &["ward-1"])).await?;
    big.send(json!({ "opId": "1", "roomJoin": { "room": "a".repeat(MAX_FRAME_BYTES + 1) } })).await?;
    let reply = big.next().await.context("just over the frame limit")?;
    expect_error("just over the frame limit", &reply, "ERROR_CODE_FRAME_TOO_LARGE")?;
    assert_eq!(big.closed().await.context("just over the frame limit")?, Some(4002), "just over the frame limit");
    // Past the WebSocket layer's own cap (2 x the limit) the server stops
    // reading mid-frame; the socket must end (how is up to the WebSocket
    // layer), and nothing else changes.
    let (mut big, _) = Raw::register(&server, &server.token("bigger", &["ward-1"])).await?;
    let sent = big.send(json!({ "opId": "1", "roomJoin": { "room": "a".repeat(5 * MAX_FRAME_BYTES) } })).await;
    if sent.is_ok() {
        let end = big.next_matching(|f| f.get("error").is_some()).await.context("far over the frame limit")?;
        if end.get("error").is_some() {
            expect_error("far over the frame limit", &end, "ERROR_CODE_FRAME_TOO_LARGE")?;
            let code = big.closed().await.context("far over the frame limit")?;
            assert!(matches!(code, None | Some(4002) | Some(1009)), "{code:?}");
        }
    }

    // The call never noticed.
    a.wait_receiving(&["B"], SOME_AUDIO, LIMIT).await?;
    b.wait_receiving(&["A"], SOME_AUDIO, LIMIT).await?;
    expect_call_intact(&server, &a, &b).await?;

    // The session that took all the mistakes is still open and still answers.
    let reply = nurse.request(json!({ "roomJoin": { "room": "a b" } })).await?;
    expect_error("at the end", &reply, "ERROR_CODE_INVALID_ARGUMENT")?;
    assert!(nurse.open(), "{}", nurse.message_summary());

    // The socket that never said hello is closed at the deadline, with the reason.
    let end = tokio::time::timeout(HELLO_DEADLINE + LIMIT, mute.next_matching(|_| false)).await.context("no close after the hello deadline")??;
    assert_eq!(close_code(&end), Some(4004), "{end}");
    let waited = connected_at.elapsed();
    assert!(waited >= HELLO_DEADLINE - Duration::from_secs(1), "closed after {waited:?}, before the hello deadline");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_are_dropped_and_the_call_goes_on() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let (a, b) = two_in_a_call(&server, "ward-2").await?;
    let seed: u64 = std::env::var("GARBAGE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("garbage seed {seed} (GARBAGE_SEED={seed} repeats this run)");
    let mut rng = SplitMix(seed);

    let before = server.stats().await?;
    let heard_before = (a.received_from("B"), b.received_from("A"));
    let started = Instant::now();
    let blast = Blast::new(&mut rng, 3_000);
    let sent = blast.send_to(a.media_addr, Duration::from_secs(2)).await?;
    let blast_took = started.elapsed();
    let heard_during = (a.received_from("B") - heard_before.0, b.received_from("A") - heard_before.1);
    // Audio went on while the garbage arrived: at least a quarter of the
    // frames sent meanwhile, a loose floor for a loaded machine.
    let floor = (blast_took.as_millis() / 20 / 4) as u64;
    assert!(heard_during.0 >= floor && heard_during.1 >= floor, "during {blast_took:?} of garbage the peers heard {heard_during:?} frames, expected at least {floor} each");

    // Every datagram from the garbage sockets is dropped as unknown or
    // malformed (empty ones never reach the core). The kernel may lose some
    // when the receive buffer fills on a stalled machine, hence the floor.
    let dropped = |s: &Value| s["dropped"]["unknown_source"].as_u64().unwrap_or(0) + s["dropped"]["malformed"].as_u64().unwrap_or(0);
    let counted = sent.total - sent.empty;
    let (after, _) = server.wait_stats(LIMIT, |s| dropped(s) - dropped(&before) >= counted * 3 / 4).await?;
    let dropped_now = dropped(&after) - dropped(&before);
    assert!(dropped_now <= counted, "{dropped_now} dropped of {counted} garbage datagrams: legitimate traffic was dropped too? {after}");

    // Garbage from the address the server knows a participant by reaches its
    // `Rtc`, which must refuse it without ending the session.
    for _ in 0..300 {
        a.send_from_our_address(&blast.pick(&mut rng)).await?;
    }

    a.wait_receiving(&["B"], SOME_AUDIO, LIMIT).await?;
    b.wait_receiving(&["A"], SOME_AUDIO, LIMIT).await?;
    expect_call_intact(&server, &a, &b).await?;
    Ok(())
}

/// STUN naming a participant's ufrag but failing its integrity check must
/// neither map the sender's address to that participant nor keep it alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_stun_claims_no_address_and_no_life() -> anyhow::Result<()> {
    let server = Server::start(&["--disconnect-grace-secs", "2"])?;
    let (a, b) = two_in_a_call(&server, "ward-3").await?;
    let seed: u64 = rand::random();
    println!("stun seed {seed}");
    let mut rng = SplitMix(seed);
    let before = server.stats().await?;
    let intruder = UdpSocket::bind("127.0.0.1:0").await?;
    for _ in 0..20 {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        socket.send_to(&stun_binding_request(&format!("{}:intruder", a.server_ufrag), &mut rng), a.media_addr).await?;
    }
    // The peers' media queues behind the requests on the server's socket, so
    // once they have heard each other again the requests were handled.
    a.wait_receiving(&["B"], SOME_AUDIO, LIMIT).await?;
    b.wait_receiving(&["A"], SOME_AUDIO, LIMIT).await?;
    let stats = server.stats().await?;
    assert_eq!(stats["demux_entries"], 4, "intruders were mapped to a participant: {stats}");
    let dropped = |s: &Value| s["dropped"].as_object().map_or(0, |d| d.values().filter_map(Value::as_u64).sum::<u64>());
    assert!(dropped(&stats) >= dropped(&before) + 20, "refused STUN was not counted: {stats}");

    // A's device dies while an intruder keeps sending STUN for A's ufrag: A
    // must still be removed after the grace.
    let silent_since = a.silence_media();
    let (ufrag, target) = (a.server_ufrag.clone(), a.media_addr);
    let keep_alive = tokio::spawn(async move {
        loop {
            let _ = intruder.send_to(&stun_binding_request(&format!("{ufrag}:intruder"), &mut rng), target).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let call = a.call_id.clone();
    let left = a.wait_message(Duration::from_secs(2 + 2), |m| m["callEnded"]["callId"] == call.as_str()).await;
    keep_alive.abort();
    let (left_at, left) = left?;
    assert_eq!(left["callEnded"]["reason"], "END_REASON_MEDIA_FAILED", "{left}");
    assert!(left_at - silent_since >= Duration::from_millis(1500), "removed early: {:?}", left_at - silent_since);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_need_the_admin_token() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let url = format!("{}/api/stats", server.url);
    let wrong = format!("{}x", server.admin_token);
    for (token, expected) in [(None, 401), (Some("nope"), 401), (Some(wrong.as_str()), 401), (Some(&server.admin_token[1..]), 401)] {
        let (status, body) = http_get_status(&url, token).await?;
        assert_eq!(status, expected, "token {token:?}: {body}");
        assert!(!body.contains("participants"), "token {token:?} got stats: {body}");
    }
    let (status, body) = http_get_status(&url, Some(&server.admin_token)).await?;
    assert_eq!(status, 200, "{body}");
    let stats: Value = serde_json::from_str(&body)?;
    assert_eq!(stats["participants"], 0, "{stats}");
    Ok(())
}

/// Two peers in `room`, hearing each other.
async fn two_in_a_call(server: &Server, room: &str) -> anyhow::Result<(Peer, Peer)> {
    let a = Peer::join(server, room, "A").await?;
    let b = Peer::join(server, room, "B").await?;
    for peer in [&a, &b] {
        peer.wait_connected(LIMIT).await?;
    }
    a.wait_receiving(&["B"], SOME_AUDIO, LIMIT).await?;
    b.wait_receiving(&["A"], SOME_AUDIO, LIMIT).await?;
    expect_call_intact(server, &a, &b).await?;
    Ok((a, b))
}

/// The server holds exactly the two-party call, in the media server and in
/// the controller, and the peers saw no error and no one leave.
async fn expect_call_intact(server: &Server, a: &Peer, b: &Peer) -> anyhow::Result<()> {
    let stats = server.stats().await?;
    for (key, value) in [("rooms", 1), ("participants", 2), ("tracks", 2), ("forwarding_entries", 2), ("demux_entries", 4)] {
        assert_eq!(stats[key], value, "{key}: {stats}");
    }
    let calls = api_calls(server).await?;
    let row = calls.iter().find(|r| r["id"].as_u64() == a.call_id.parse().ok()).with_context(|| format!("call {} not in {calls:?}", a.call_id))?;
    assert_eq!(row["phase"], "CALL_PHASE_ACTIVE", "{row}");
    let members: Vec<&str> = row["members"].as_array().into_iter().flatten().filter_map(|m| m["device"].as_str()).collect();
    assert_eq!(members, ["A", "B"], "{row}");
    for peer in [a, b] {
        assert_eq!(peer.failures(), Vec::<String>::new(), "{}", peer.name);
        assert_eq!(peer.misrouted(), 0, "{}", peer.name);
        let ended = peer.messages().iter().any(|m| m.get("callEnded").is_some() || m.get("_closed").is_some() || m["participantUpdate"]["status"] == "PARTICIPANT_STATUS_GONE");
        assert!(!ended, "{}: {}", peer.name, peer.message_summary());
    }
    Ok(())
}

/// `GET /api/calls`.
async fn api_calls(server: &Server) -> anyhow::Result<Vec<Value>> {
    let body = common::http_get(&format!("{}/api/calls", server.url), Some(&server.admin_token)).await?;
    let rows: Value = serde_json::from_str(&body)?;
    Ok(rows.as_array().cloned().unwrap_or_default())
}

/// Ids of the calls that have not ended, as the protocol spells them.
async fn live_calls(server: &Server) -> anyhow::Result<Vec<String>> {
    Ok(api_calls(server).await?.iter().filter(|r| r["phase"] != "CALL_PHASE_ENDED").map(|r| r["id"].to_string()).collect())
}

/// `reply` is an error with `code` and a readable message.
fn expect_error(what: &str, reply: &Value, code: &str) -> anyhow::Result<()> {
    if error_code(reply) != code {
        bail!("{what}: expected {code}, got {reply}");
    }
    if reply["error"]["message"].as_str().is_none_or(str::is_empty) {
        bail!("{what}: error without a message: {reply}");
    }
    Ok(())
}

/// A seeded generator: a failing run can be repeated exactly.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Garbage datagrams of every shape the demultiplexer distinguishes.
struct Blast {
    datagrams: Vec<Vec<u8>>,
}

struct Sent {
    total: u64,
    empty: u64,
}

impl Blast {
    fn new(rng: &mut SplitMix, count: usize) -> Blast {
        Blast { datagrams: (0..count).map(|i| Blast::make(rng, i % 8)).collect() }
    }

    fn pick(&self, rng: &mut SplitMix) -> Vec<u8> {
        self.datagrams[rng.below(self.datagrams.len())].clone()
    }

    fn make(rng: &mut SplitMix, kind: usize) -> Vec<u8> {
        match kind {
            // Random bytes: any first byte, so every class by RFC 7983.
            0 => {
                let len = 1 + rng.below(1200);
                rng.bytes(len)
            }
            1 => Vec::new(),
            // A STUN header cut short, or claiming more than it carries.
            2 => {
                let mut m = stun_binding_request("nobody:nobody", rng);
                if rng.below(2) == 0 {
                    m.truncate(1 + rng.below(19));
                } else {
                    m[2..4].copy_from_slice(&4000u16.to_be_bytes());
                }
                m
            }
            // Well-formed STUN for a ufrag no participant has.
            3 => stun_binding_request(&format!("{:x}:x", rng.next()), rng),
            // RTP with an Opus payload type and a random SSRC.
            4 => {
                let mut m = vec![0x80, 111];
                m.extend(rng.bytes(10));
                let len = rng.below(200);
                m.extend(rng.bytes(len));
                m
            }
            // An RTCP sender report header.
            5 => {
                let mut m = vec![0x80, 200, 0, 6];
                m.extend(rng.bytes(24));
                m
            }
            // A DTLS 1.2 handshake record header and noise.
            6 => {
                let mut m = vec![0x16, 0xFE, 0xFD];
                let len = rng.below(300);
                m.extend(rng.bytes(len));
                m
            }
            // First bytes no protocol on this port uses.
            _ => {
                let mut m = vec![[0x04, 0x40, 0xC0, 0xFF][rng.below(4)]];
                let len = rng.below(100);
                m.extend(rng.bytes(len));
                m
            }
        }
    }

    /// Sends everything from a few fresh sockets, spread over `over`.
    async fn send_to(&self, target: SocketAddr, over: Duration) -> anyhow::Result<Sent> {
        let mut sockets = Vec::new();
        for _ in 0..4 {
            sockets.push(UdpSocket::bind("127.0.0.1:0").await?);
        }
        let batches = self.datagrams.chunks(15);
        let pause = over / batches.len() as u32;
        let mut tick = tokio::time::interval(pause);
        let mut sent = Sent { total: 0, empty: 0 };
        for (i, batch) in batches.enumerate() {
            tick.tick().await;
            for datagram in batch {
                sockets[i % sockets.len()].send_to(datagram, target).await?;
                sent.total += 1;
                sent.empty += u64::from(datagram.is_empty());
            }
        }
        Ok(sent)
    }
}

/// A STUN binding request with USERNAME `username`, a wrong
/// MESSAGE-INTEGRITY and a correct FINGERPRINT (so only the integrity check
/// can refuse it).
fn stun_binding_request(username: &str, rng: &mut SplitMix) -> Vec<u8> {
    fn attribute(m: &mut Vec<u8>, kind: u16, value: &[u8]) {
        m.extend(kind.to_be_bytes());
        m.extend((value.len() as u16).to_be_bytes());
        m.extend(value);
        m.resize(m.len().next_multiple_of(4), 0);
    }
    let mut m = vec![0x00, 0x01, 0, 0, 0x21, 0x12, 0xA4, 0x42];
    m.extend(rng.bytes(12));
    attribute(&mut m, 0x0006, username.as_bytes());
    attribute(&mut m, 0x0024, &(rng.next() as u32).to_be_bytes()); // PRIORITY
    attribute(&mut m, 0x802A, &rng.next().to_be_bytes()); // ICE-CONTROLLING
    attribute(&mut m, 0x0008, &rng.bytes(20)); // MESSAGE-INTEGRITY
    // The length covers the FINGERPRINT attribute while it is computed.
    let length = (m.len() - 20 + 8) as u16;
    m[2..4].copy_from_slice(&length.to_be_bytes());
    let fingerprint = crc32(&m) ^ 0x5354_554E;
    attribute(&mut m, 0x8028, &fingerprint.to_be_bytes());
    m
}

/// CRC-32 (IEEE 802.3), as STUN's FINGERPRINT uses.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in data {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}
