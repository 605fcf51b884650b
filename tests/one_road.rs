//! Nobody hears a call they were not let into (issue 11), with real
//! processes: two QUIC devices talk in a 1:1 call, media flowing both ways,
//! while WebSocket clients try the way in as a visitor on the LAN would,
//! each with a real `webrtc`-crate peer connection ready to receive:
//!
//! - no token, an empty one, one that is not a token;
//! - a genuine token for another room, trying the room named after the
//!   devices' call (`call-<id>`, the old media room name) and the call's id;
//! - a genuine token for every room, trying the call's id directly
//!   (`groupJoin`, `sdpOffer`, `iceRestart`, `hangup`, `groupEnd`);
//! - an expired token; tokens with a forged signature (the payload edited to
//!   the device's identity and every room, signed with another key, `alg:
//!   none`);
//! - a subscribe-only token offering a `sendonly` track (and, allowed, the
//!   same token listening);
//! - genuine tokens for the room `call-<id>` and for the prefix `call-*`:
//!   the old attack, which must land the visitor alone in a room of its own;
//! - a page from a foreign `Origin` (HTTP 403 on the upgrade);
//! - a token for the identity of one of the live QUIC devices
//!   (IDENTITY_IN_USE; the device keeps its call).
//!
//! Each is refused with its error code or lands alone; none receives a
//! single RTP packet; both devices' media keeps flowing with no gap over
//! 200 ms (inter-arrival measured at each device), neither device is offered
//! a renegotiation or hears a second stream, and `GET /api/calls` shows the
//! devices' call ACTIVE with exactly its two members throughout.

mod common;
mod quic_support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use fleetcall_signaling::client::ClientEvent;
use fleetcall_signaling::grants::{Grant, RoomPattern};
use fleetcall_signaling::ids::CallId;
use fleetcall_signaling::tokens::{AccessTokens, TokenRequest};
use serde_json::{json, Value};

use common::webrtc_peer::{error_code, Door, Intruder, Plan, Refusal};
use common::{base64url_decode, base64url_encode, unix_now, Server};
use quic_support::{call_with_media, Device, PROMPT};

/// The issue's bound on the devices' inter-arrival gaps.
const MAX_GAP: Duration = Duration::from_millis(200);
/// How long each admitted visitor is given to receive something.
const LISTEN: Duration = Duration::from_secs(2);
/// Generous bound for a step on a busy 2-core machine.
const LIMIT: Duration = Duration::from_secs(15);

const BED: &str = "ward3-bed12";
const DESK: &str = "ward3-desk";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_hears_a_call_they_were_not_let_into() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let mut bed = Device::connect(&server, BED).await?;
    let mut desk = Device::connect(&server, DESK).await?;
    let call = call_with_media(&mut bed, &mut desk).await?;
    let id = call.0.to_string();
    let named = format!("call-{id}");
    println!("devices' call {id}");
    // From here on, nothing may reach the devices but their call's own media.
    bed.drain();
    desk.drain();
    let gaps = [GapWatch::start(&bed)?, GapWatch::start(&desk)?];
    let watch = CallWatch::start(&server, call, [BED, DESK]);

    // Everyone who tried, kept connected to the end: none may hear anything.
    let mut visitors: Vec<Intruder> = Vec::new();
    let unauthenticated = || Refusal::Rejected { code: "ERROR_CODE_UNAUTHENTICATED".into(), close: Some(4010) };
    let room = |r: &str| Door::Room(r.to_owned());

    // No credential at all.
    for (name, token) in [("no token", None), ("empty token", Some(String::new())), ("not a token", Some("not-a-token".to_owned()))] {
        let visitor = Intruder::attempt(&server, Plan::with_token(name, token, room(&named))).await?;
        refused(&mut visitors, visitor, unauthenticated())?;
    }

    // A genuine token for another room opens neither the room named after
    // the call nor the call.
    let lobby = server.token("visitor-lobby", &["lobby"]);
    let visitor = Intruder::attempt(&server, Plan::with_token("visitor-lobby", Some(lobby.clone()), room(&named))).await?;
    refused(&mut visitors, visitor, Refusal::Request { request: "roomJoin".into(), code: "ERROR_CODE_FORBIDDEN".into() })?;
    let visitor = Intruder::attempt(&server, Plan::with_token("visitor-lobby-2", Some(server.token("visitor-lobby-2", &["lobby"])), Door::Call(id.clone()))).await?;
    refused(&mut visitors, visitor, Refusal::Request { request: "groupJoin".into(), code: "ERROR_CODE_NOT_IN_CALL".into() })?;

    // A token for every room still opens no call it was not invited to,
    // by any request that names the call.
    let everywhere = Intruder::attempt(&server, Plan::with_token("visitor-all", Some(server.token("visitor-all", &["*"])), Door::Call(id.clone()))).await?;
    ensure!(
        everywhere.refusal == Some(Refusal::Request { request: "groupJoin".into(), code: "ERROR_CODE_NOT_IN_CALL".into() }),
        "visitor-all: {:?}; {}",
        everywhere.refusal,
        everywhere.message_summary()
    );
    let session = everywhere.welcome.as_ref().map_or(Value::Null, |w| w["sessionId"].clone());
    let offer = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n";
    for body in [
        json!({ "sdpOffer": { "callId": id, "sessionId": session, "revision": "1", "sdp": offer } }),
        json!({ "sdpAnswer": { "callId": id, "sessionId": session, "revision": "1", "sdp": offer } }),
        json!({ "iceRestart": { "callId": id, "sessionId": session, "revision": "1", "sdp": offer } }),
        json!({ "accept": { "callId": id } }),
        json!({ "hangup": { "callId": id } }),
        json!({ "groupEnd": { "callId": id } }),
    ] {
        let reply = everywhere.request(body.clone()).await?;
        ensure!(error_code(&reply) == "ERROR_CODE_NOT_IN_CALL", "visitor-all: {body} answered {reply}");
    }
    visitors.push(everywhere);

    // An expired token, even for the right name.
    let expired = server.expired_token("visitor-late", &[&named]);
    let visitor = Intruder::attempt(&server, Plan::with_token("visitor-late", Some(expired), room(&named))).await?;
    refused(&mut visitors, visitor, Refusal::Rejected { code: "ERROR_CODE_CREDENTIAL_EXPIRED".into(), close: Some(4011) })?;

    // Forged signatures: refused for the signature, whatever the payload says.
    let edited = edit_claims(&lobby, |claims| {
        claims["sub"] = json!(BED);
        claims["rooms"] = json!(["*"]);
    })?;
    let strange_key = AccessTokens::from_secret(&rand::random::<[u8; 32]>());
    let grant = Grant { rooms: vec![RoomPattern::parse("*")?], publish: true, subscribe: true };
    let other_key = strange_key.mint(&TokenRequest { identity: "visitor-key".into(), ttl: Duration::from_secs(3600), grant, guest: false }, unix_now())?;
    let unsigned = {
        let header = base64url_encode(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = lobby.split('.').nth(1).context("a JWT has three parts")?;
        format!("{header}.{claims}.")
    };
    for (name, token) in [("forged payload", edited), ("another key", other_key), ("alg none", unsigned)] {
        let visitor = Intruder::attempt(&server, Plan::with_token(name, Some(token), room(&named))).await?;
        let reason = visitor.messages().iter().find_map(|m| m["rejected"]["reason"].as_str().map(str::to_owned)).unwrap_or_default();
        if name != "alg none" {
            ensure!(reason.contains("signature"), "{name}: refused for another reason: {reason:?}");
        }
        refused(&mut visitors, visitor, unauthenticated())?;
    }

    // A subscribe-only token may listen, never publish: the server refuses
    // the track itself.
    let listen_only = server.token_with("visitor-ear", &["lobby"], false, Duration::from_secs(3600));
    let visitor = Intruder::attempt(&server, Plan::with_token("visitor-ear", Some(listen_only), room("lobby"))).await?;
    refused(&mut visitors, visitor, Refusal::Request { request: "sdpOffer".into(), code: "ERROR_CODE_FORBIDDEN".into() })?;
    let listen_only = server.token_with("visitor-ear-2", &["lobby"], false, Duration::from_secs(3600));
    let listener = Intruder::attempt(&server, Plan::with_token("visitor-ear-2", Some(listen_only), room("lobby")).listen_only()).await?;
    ensure!(listener.refusal.is_none(), "a listener with a listen-only token is let into its room: {:?}; {}", listener.refusal, listener.message_summary());
    listener.wait_connected(LIMIT).await?;
    // With the refused publisher, whose track never reached the SFU: the
    // listener hears nothing of it (checked with everyone's at the end).
    expect_members(&listener, &id, &["visitor-ear", "visitor-ear-2"])?;
    visitors.push(listener);

    // The old attack: a genuine token for the room named like the devices'
    // media room lands in a room of its own, alone, and hears nothing.
    let mut rooms_seen = vec![id.clone()];
    for (name, grant) in [("visitor-exact", named.clone()), ("visitor-prefix", "call-*".to_owned())] {
        let visitor = Intruder::attempt(&server, Plan::with_token(name, Some(server.token(name, &[&grant])), room(&named))).await?;
        ensure!(visitor.refusal.is_none(), "{name}: a genuine token for {grant} opens room {named}: {:?}; {}", visitor.refusal, visitor.message_summary());
        visitor.wait_connected(LIMIT).await?;
        let own = visitor.call_id.clone().context("in a call")?;
        ensure!(!rooms_seen.contains(&own), "{name}: room {named} is call {own}, which is not new: {rooms_seen:?}");
        rooms_seen.push(own.clone());
        expect_members(&visitor, &id, &[name])?;
        tokio::time::sleep(LISTEN).await;
        ensure!(visitor.rtp_packets() == 0, "{name}: heard {} RTP packets in room {named}", visitor.rtp_packets());
        // Gone again: the next one opens the name afresh.
        let reply = visitor.request(json!({ "groupLeave": { "callId": own } })).await?;
        ensure!(reply.get("ack").is_some(), "{name}: groupLeave answered {reply}");
        let (_, ended) = visitor.wait_message(LIMIT, |m| m["callEnded"]["callId"] == own.as_str()).await?;
        ensure!(ended["callEnded"]["reason"] == "END_REASON_LEFT", "{name}: {ended}");
        visitors.push(visitor);
    }

    // A page from another origin cannot open the socket at all, even with a
    // genuine token; the server's own origin can.
    let token = server.token("visitor-page", &[&named]);
    let visitor = Intruder::attempt(&server, Plan::with_token("visitor-page", Some(token.clone()), room(&named)).origin("http://evil.example")).await?;
    refused(&mut visitors, visitor, Refusal::Http(403))?;
    let own_origin = Intruder::attempt(&server, Plan::with_token("visitor-page", Some(token), Door::None).origin(&server.url)).await?;
    ensure!(own_origin.refusal.is_none() && own_origin.welcome.is_some(), "the server's own origin: {:?}", own_origin.refusal);
    visitors.push(own_origin);

    // A WebSocket token for the identity of a live QUIC device: refused in
    // answer to hello; the device keeps its session and its call.
    let clash = server.token(BED, &["*"]);
    let visitor = Intruder::attempt(&server, Plan::with_token(BED, Some(clash), Door::Call(id.clone()))).await?;
    refused(&mut visitors, visitor, Refusal::Rejected { code: "ERROR_CODE_IDENTITY_IN_USE".into(), close: Some(4013) })?;

    // Media keeps flowing a little longer, then the verdicts.
    tokio::time::sleep(LISTEN).await;
    for visitor in &visitors {
        ensure!(visitor.rtp_packets() == 0, "{}: received {} RTP packets", visitor.name, visitor.rtp_packets());
        // A refused request costs the session nothing; its heartbeats kept it.
        if matches!(visitor.refusal, None | Some(Refusal::Request { .. })) {
            ensure!(visitor.open(), "{}: the socket closed: {}", visitor.name, visitor.message_summary());
        }
    }
    let samples = watch.stop().await?;
    for (gaps, device) in gaps.into_iter().zip([&bed, &desk]) {
        let seen = gaps.stop();
        println!("{}: {} frames over {:?}, longest gap {:?}", device.id, seen.frames, seen.watched, seen.longest);
        ensure!(seen.longest <= MAX_GAP, "{}: a gap of {:?} in its media (frames {}, over {:?})", device.id, seen.longest, seen.frames, seen.watched);
        // Most of the frames sent meanwhile arrived: media did not just trickle.
        let expected = seen.watched.as_millis() as u64 / 20;
        ensure!(seen.frames >= expected * 9 / 10, "{}: {} frames in {:?}, expected about {expected}", device.id, seen.frames, seen.watched);
        let streams = device.media_stats().received_by_stream;
        ensure!(streams.len() == 1, "{}: hears more than its peer: {streams:?}", device.id);
    }
    println!("GET /api/calls: {samples} samples, the call ACTIVE with exactly its two members in each");
    for device in [&mut bed, &mut desk] {
        let fresh = device.drain();
        let disturbed: Vec<&ClientEvent> = fresh
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    ClientEvent::SdpOffer(_)
                        | ClientEvent::ParticipantUpdate(_)
                        | ClientEvent::CallEnded(_)
                        | ClientEvent::CallState(_)
                        | ClientEvent::Disconnected { .. }
                        | ClientEvent::Connected { .. }
                        | ClientEvent::IncomingCall(_)
                )
            })
            .collect();
        ensure!(disturbed.is_empty(), "{}: the call was touched: {disturbed:#?}", device.id);
    }
    // The devices are still in their call and can end it as usual.
    desk.client.hangup(call).await?;
    for device in [&mut bed, &mut desk] {
        let ended = device.ended(call, PROMPT).await?;
        ensure!(quic_support::reason(&ended) == fleetcall_signaling::pb::EndReason::Hangup, "{}: {ended:?}", device.id);
    }
    Ok(())
}

/// `visitor` was refused exactly as `expected`; kept for the final check.
fn refused(visitors: &mut Vec<Intruder>, visitor: Intruder, expected: Refusal) -> anyhow::Result<()> {
    ensure!(
        visitor.refusal.as_ref() == Some(&expected),
        "{}: expected {expected:?}, got {:?}; frames {}",
        visitor.name,
        visitor.refusal,
        visitor.message_summary()
    );
    visitors.push(visitor);
    Ok(())
}

/// An admitted visitor's room is not the devices' call and holds exactly
/// `expected` (device ids, sorted).
fn expect_members(visitor: &Intruder, devices_call: &str, expected: &[&str]) -> anyhow::Result<()> {
    let own = visitor.call_id.as_deref().context("in a call")?;
    ensure!(own != devices_call, "{}: let into the devices' call {devices_call}", visitor.name);
    let state = visitor
        .messages()
        .into_iter()
        .find(|m| m["callState"]["callId"] == own)
        .with_context(|| format!("{}: no callState for {own}: {}", visitor.name, visitor.message_summary()))?;
    let members: Vec<&str> = state["callState"]["participants"].as_array().into_iter().flatten().filter_map(|p| p["deviceId"].as_str()).collect();
    ensure!(members == expected, "{}: room {own} holds {members:?}, expected {expected:?}", visitor.name);
    ensure!(state["callState"]["kind"] == "CALL_KIND_ROOM", "{}: {state}", visitor.name);
    Ok(())
}

/// `token` with its claims changed by `edit` and its signature kept.
fn edit_claims(token: &str, edit: impl Fn(&mut Value)) -> anyhow::Result<String> {
    let parts: Vec<&str> = token.split('.').collect();
    ensure!(parts.len() == 3, "a JWT has three parts: {token}");
    let text = base64url_decode(parts[1]);
    ensure!(base64url_encode(&text) == parts[1], "the claims re-encode as they came");
    let mut claims: Value = serde_json::from_slice(&text)?;
    edit(&mut claims);
    Ok([parts[0], &base64url_encode(claims.to_string().as_bytes()), parts[2]].join("."))
}

/// Watches one device's received-frame counter from its own OS thread
/// (sampling every 2 ms, so a busy async runtime cannot hide or fake a gap)
/// and keeps the longest time between two frames.
struct GapWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Gaps>,
}

#[derive(Debug)]
struct Gaps {
    longest: Duration,
    frames: u64,
    watched: Duration,
}

impl GapWatch {
    fn start(device: &Device) -> anyhow::Result<GapWatch> {
        let peer = device.current.as_ref().context("the device is in a call")?.peer.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let first = peer.stats().frames_received;
            let (mut last, mut last_at, mut longest) = (first, start, Duration::ZERO);
            while !stopping.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(2));
                let frames = peer.stats().frames_received;
                if frames != last {
                    let now = Instant::now();
                    longest = longest.max(now - last_at);
                    (last, last_at) = (frames, now);
                }
            }
            // Silence up to the end counts too.
            longest = longest.max(last_at.elapsed());
            Gaps { longest, frames: last - first, watched: start.elapsed() }
        });
        Ok(GapWatch { stop, thread })
    }

    fn stop(self) -> Gaps {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the gap watch does not panic")
    }
}

/// Polls `GET /api/calls` every 100 ms: the call must be ACTIVE with exactly
/// `members`, all connected, in every sample.
struct CallWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<anyhow::Result<u64>>,
    /// Rows that broke the rule.
    wrong: Arc<Mutex<Vec<Value>>>,
}

impl CallWatch {
    fn start(server: &Server, call: CallId, members: [&str; 2]) -> CallWatch {
        let (url, token) = (format!("{}/api/calls", server.url), server.admin_token.clone());
        let mut expected: Vec<String> = members.iter().map(|m| (*m).to_owned()).collect();
        expected.sort();
        let stop = Arc::new(AtomicBool::new(false));
        let wrong = Arc::new(Mutex::new(Vec::new()));
        let (stopping, wrong_rows) = (stop.clone(), wrong.clone());
        let task = tokio::spawn(async move {
            let mut samples = 0;
            while !stopping.load(Ordering::Relaxed) {
                let rows: Value = serde_json::from_str(&common::http_get(&url, Some(&token)).await?)?;
                let row = rows.as_array().and_then(|rows| rows.iter().find(|r| r["id"] == call.0)).cloned().unwrap_or(Value::Null);
                let statuses: BTreeMap<String, String> = row["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|m| (m["device"].as_str().unwrap_or("?").to_owned(), m["status"].as_str().unwrap_or("?").to_owned()))
                    .collect();
                let right = row["phase"] == "CALL_PHASE_ACTIVE"
                    && statuses.keys().cloned().collect::<Vec<_>>() == expected
                    && statuses.values().all(|s| s == "PARTICIPANT_STATUS_CONNECTED");
                if !right {
                    wrong_rows.lock().unwrap().push(row);
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(samples)
        });
        CallWatch { stop, task, wrong }
    }

    /// Stops polling; the number of samples, all of which were right.
    async fn stop(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.task.await??;
        let wrong = self.wrong.lock().unwrap().clone();
        ensure!(wrong.is_empty(), "GET /api/calls showed the devices' call otherwise in {} of {samples} samples: {wrong:?}", wrong.len());
        ensure!(samples >= 10, "only {samples} samples of GET /api/calls");
        Ok(samples)
    }
}
