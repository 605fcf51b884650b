//! The driver on loopback: a handle's commands reach the worker that owns the
//! room, the core's events reach the participant's route, and shutdown removes
//! everyone with `shutdown` before the workers stop.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use fleetcall_media::{DriverConfig, LeaveReason, PolicyChange, Rights, RoomId, SfuConfig, SfuDriver, SfuError, SfuEvent};
use str0m::media::{Direction, MediaKind};
use str0m::{Candidate, Rtc};
use tokio::sync::mpsc;

fn config(workers: usize) -> DriverConfig {
    DriverConfig {
        bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        first_port: 0,
        workers,
        advertise_ip: None,
        sfu: SfuConfig::default(),
        audio_threads: 1,
        pipeline: fleetcall_dsp::PipelineConfig::default(),
    }
}

/// A device's offer publishing one audio track.
fn offer() -> fleetcall_media::SdpOffer {
    let mut rtc = Rtc::new(std::time::Instant::now());
    rtc.add_local_candidate(Candidate::host("127.0.0.1:4000".parse().unwrap(), "udp").unwrap());
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    api.apply().unwrap().0
}

/// The first event on the route that `wanted` picks, skipping others.
async fn wait_for<T>(events: &mut mpsc::UnboundedReceiver<SfuEvent>, wanted: impl Fn(SfuEvent) -> Option<T>) -> T {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("an event in time").expect("the route is open");
        if let Some(found) = wanted(event) {
            return found;
        }
    }
}

#[tokio::test]
async fn commands_reach_the_room_and_shutdown_removes_everyone() {
    let driver = SfuDriver::start(config(2)).unwrap();
    let sfu = driver.handle();
    let addrs = sfu.local_addrs();
    assert_eq!(addrs.len(), 2);
    assert!(addrs.iter().all(|a| a.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST) && a.port() != 0), "{addrs:?}");

    let (a_tx, mut a_events) = mpsc::unbounded_channel();
    let (b_tx, mut b_events) = mpsc::unbounded_channel();
    let room = RoomId::from("ward-1");
    let (a, joined) = sfu.join(room.clone(), "bed-1".into(), offer(), Rights::ALL, a_tx).await.unwrap();
    let answer = joined.answer.to_sdp_string();
    assert!(addrs.iter().any(|addr| answer.contains(&format!("{} {}", addr.ip(), addr.port()))), "the answer names a worker's socket: {answer}");
    let (b, joined) = sfu.join(room.clone(), "bed-2".into(), offer(), Rights::ALL, b_tx).await.unwrap();
    assert_eq!(joined.others, vec![(a.participant, "bed-1".to_owned())]);
    let joiner = wait_for(&mut a_events, |e| match e {
        SfuEvent::ParticipantJoined { participant, .. } => Some(participant),
        _ => None,
    })
    .await;
    assert_eq!(joiner, b.participant);

    let stats = sfu.stats().await.unwrap();
    assert_eq!((stats.rooms, stats.participants), (1, 2));
    assert_eq!(sfu.room_sizes().await.unwrap(), vec![(room.clone(), 2)]);

    let policy = sfu.set_policy(PolicyChange::Room { room: room.clone(), on: Some(true) }).await.unwrap();
    assert_eq!(policy.rooms.get(&room), Some(&true));
    assert_eq!(sfu.policy().await.unwrap(), policy, "every worker holds the same policy");

    sfu.leave(b, LeaveReason::Requested).await.unwrap();
    assert!(matches!(sfu.leave(b, LeaveReason::Requested).await, Err(SfuError::UnknownParticipant(_))));
    let reason = wait_for(&mut b_events, |e| match e {
        SfuEvent::Removed { reason, .. } => Some(reason),
        _ => None,
    })
    .await;
    assert_eq!(reason, LeaveReason::Requested);
    assert!(b_events.recv().await.is_none(), "the route closes with the removal");

    driver.shutdown();
    let mut removed = None;
    while let Some(event) = a_events.recv().await {
        if let SfuEvent::Removed { reason, .. } = event {
            removed = Some(reason);
        }
    }
    assert_eq!(removed, Some(LeaveReason::Shutdown));
    assert!(matches!(sfu.stats().await, Err(SfuError::ShuttingDown)));
}

#[test]
fn binding_every_interface_needs_an_advertised_address() {
    let err = SfuDriver::start(DriverConfig { bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED), ..config(1) }).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}
