//! One participant of a group of 6 leaves, gracefully and by kill, on a
//! real network (tests/netlab): the other five hear each other with no gap
//! over 200 ms, and only the leaver's forwarding entries go.
//!
//! "Killed" is what the network sees of a device whose process dies: its
//! link is cut (nothing it would still send escapes), its sockets are
//! closed, and the link returns, so from then on its kernel answers
//! whatever still arrives with ICMP port-unreachable, as after a real kill.
//! (The agent process, which can be SIGKILLed, does not join rooms.)
//! Forwarding is all-to-all (`--audio-slots 0`), so every survivor receives
//! one stream per other participant and a gap in any of them is seen.

mod common;
mod netlab;
mod quic_support;

use std::time::{Duration, Instant};

use anyhow::Context;
use common::Server;
use fleetcall_signaling::client::ClientEvent;
use fleetcall_signaling::ids::CallId;
use fleetcall_signaling::pb::{EndReason, ParticipantStatus};
use netlab::{assert_no_leaks, GapMeter, Lab, LabDevice, Way};
use quic_support::{reason, PROMPT};

const MEMBERS: usize = 6;
/// The pass figure for the others' audio.
const MAX_GAP: Duration = Duration::from_millis(200);
/// A killed participant whose media is connected is removed once its media
/// has been silent for the disconnect grace (5 s), or at the latest after
/// detection (2 s) + resume grace (10 s); 2 s of margin.
const KILLED_BOUND: Duration = Duration::from_secs(2 + 10 + 2);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Leaving {
    Gracefully,
    Killed,
}

/// Until every one of `devices` receives `streams` remote streams, each of
/// which has delivered at least 25 frames.
async fn all_hear(devices: &[LabDevice], streams: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let missing: Vec<String> = devices
            .iter()
            .filter_map(|d| {
                let stats = d.media_stats();
                let flowing = stats.received_by_stream.values().filter(|&&n| n >= 25).count();
                (flowing < streams).then(|| format!("{}: {:?}", d.id, stats.received_by_stream))
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(start.elapsed() < PROMPT * 3, "not everyone hears {streams} streams: {missing:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The media id (msid stream id) of `device` as the others were told.
fn media_id_of(seen: &[ClientEvent], device: &str) -> Option<u64> {
    seen.iter().rev().find_map(|e| match e {
        ClientEvent::ParticipantUpdate(u) if u.device_id == device && u.media_id != 0 => Some(u.media_id),
        ClientEvent::CallState(s) => s.participants.iter().find(|p| p.device_id == device && p.media_id != 0).map(|p| p.media_id),
        _ => None,
    })
}

async fn room_of_six(lab: &Lab, server: &Server) -> anyhow::Result<(Vec<LabDevice>, CallId)> {
    let mut devices = Vec::new();
    let mut room = None;
    for i in 0..MEMBERS {
        let mut device = lab.device(server, &format!("ward-{i}"), &["ward"]).await?;
        let call = device.client.room_join("ward").await?;
        device.start_media(call, 300.0 + 110.0 * i as f32).await?;
        room = Some(call);
        devices.push(device);
    }
    let room = room.context("a room")?;
    all_hear(&devices, MEMBERS - 1).await?;
    let every = (MEMBERS * (MEMBERS - 1)) as u64;
    server.wait_stats(PROMPT, |s| s["participants"] == MEMBERS as u64 && s["forwarding_entries"] == every).await?;
    Ok((devices, room))
}

async fn one_of_six_leaves(lab: Lab, leaving: Leaving) -> anyhow::Result<()> {
    let server = lab.start_server(&["--heartbeat-secs", "0.5", "--audio-slots", "0"])?;
    let (mut devices, room) = room_of_six(&lab, &server).await?;
    let mut leaver = devices.pop().context("six")?;
    for device in &mut devices {
        device.drain();
    }
    let leaver_media = media_id_of(&devices[0].seen, &leaver.id).with_context(|| format!("media id of {}: {:#?}", leaver.id, devices[0].seen))?;
    let meters: Vec<GapMeter> = devices
        .iter()
        .map(|d| {
            let peer = d.current.as_ref().map(|m| m.peer.clone()).context("media")?;
            Ok(GapMeter::start(move || peer.stats()))
        })
        .collect::<anyhow::Result<_>>()?;
    // A second of steady audio as the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let struck = Instant::now();
    // A device that left gracefully stays registered.
    let _still_registered = match leaving {
        Leaving::Gracefully => {
            leaver.client.group_leave(room).await?;
            assert_eq!(reason(&leaver.ended(room, PROMPT).await?), EndReason::Left);
            Some(leaver)
        }
        Leaving::Killed => {
            let cut = lab.cut(&leaver.node, Way::Both)?;
            drop(leaver);
            cut.heal()?;
            None
        }
    };
    let survivors = (MEMBERS - 1) as u64;
    let (_, _) = server
        .wait_stats(KILLED_BOUND + PROMPT, |s| s["participants"] == survivors && s["forwarding_entries"] == survivors * (survivors - 1))
        .await?;
    let removed = struck.elapsed();
    // The others keep talking through the renegotiation that removed its track.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut worst = Duration::ZERO;
    for (device, meter) in devices.iter_mut().zip(&meters) {
        let gaps = meter.worst();
        let others: Vec<(&String, &Duration)> = gaps.iter().filter(|(stream, _)| **stream != leaver_media.to_string()).collect();
        assert_eq!(others.len(), MEMBERS - 2, "{}: streams {gaps:?} (leaver's: {leaver_media})", device.id);
        for (stream, gap) in &others {
            assert!(**gap <= MAX_GAP, "{}: stream {stream} went silent for {gap:?} while a participant left {leaving:?}: {gaps:?}", device.id);
            worst = worst.max(**gap);
        }
        let events = device.drain();
        let gone = events.iter().chain(device.seen.iter()).any(|e| {
            matches!(e, ClientEvent::ParticipantUpdate(u) if u.device_id == format!("ward-{}", MEMBERS - 1) && u.status == ParticipantStatus::Gone as i32)
        });
        assert!(gone, "{}: told the leaver is gone: {:#?}", device.id, device.seen);
        assert!(!device.seen.iter().any(|e| matches!(e, ClientEvent::CallEnded(_))), "{}: the room goes on: {:#?}", device.id, device.seen);
    }
    if leaving == Leaving::Killed {
        assert!(removed <= KILLED_BOUND, "killed participant removed after {removed:?}, bound {KILLED_BOUND:?}");
    }
    println!(
        "netlab figure: one of {MEMBERS} left {leaving:?}: its media gone after {removed:?}, worst gap in the others' {} streams {worst:?} (bound {MAX_GAP:?})",
        (MEMBERS - 1) * (MEMBERS - 2)
    );

    for device in &mut devices {
        device.client.group_leave(room).await?;
        device.ended(room, PROMPT).await?;
    }
    let sessions = survivors + u64::from(leaving == Leaving::Gracefully);
    assert_no_leaks(&server, sessions, KILLED_BOUND + PROMPT).await?;
    Ok(())
}

#[test]
fn one_of_six_leaves_gracefully_others_keep_their_audio() -> anyhow::Result<()> {
    netlab::run("group-leave", |lab| one_of_six_leaves(lab, Leaving::Gracefully))
}

#[test]
fn one_of_six_killed_others_keep_their_audio() -> anyhow::Result<()> {
    netlab::run("group-kill", |lab| one_of_six_leaves(lab, Leaving::Killed))
}
