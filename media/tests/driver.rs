//! The driver on loopback: a handle's commands reach the worker that owns the
//! room, the core's events reach the participant's route, and shutdown removes
//! everyone with `shutdown` before the workers stop.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use fleetcall_media::{
    DriverConfig, LeaveReason, PolicyChange, Rights, RoomId, SdpAnswer, SdpOffer, SfuConfig, SfuDriver, SfuError, SfuEvent, SfuHandle,
};
use fleetcall_peer::{MediaConfig, MediaPeer, PeerEvent};
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
        worker_queue: DriverConfig::DEFAULT_WORKER_QUEUE,
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
    let (a, joined) = sfu.join(room.clone(), "bed-1".into(), offer(), Rights::ALL, a_tx).unwrap();
    let joined = joined.await.unwrap();
    let answer = joined.answer.to_sdp_string();
    assert!(addrs.iter().any(|addr| answer.contains(&format!("{} {}", addr.ip(), addr.port()))), "the answer names a worker's socket: {answer}");
    let (b, joined) = sfu.join(room.clone(), "bed-2".into(), offer(), Rights::ALL, b_tx).unwrap();
    let joined = joined.await.unwrap();
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

    sfu.leave(b, LeaveReason::Requested).await.await.unwrap();
    assert!(matches!(sfu.leave(b, LeaveReason::Requested).await.await, Err(SfuError::UnknownParticipant(_))));
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

/// A real peer in `room`: joined, its answers to the SFU's renegotiations
/// given for as long as the route lives. Returns the peer and its events.
async fn connect(sfu: &SfuHandle, room: &RoomId, name: &str) -> (MediaPeer, mpsc::Receiver<PeerEvent>) {
    let (peer, events) = MediaPeer::start(MediaConfig::default()).await.unwrap();
    let offer = SdpOffer::from_sdp_string(&peer.create_offer().await.unwrap()).unwrap();
    let (route, mut sfu_events) = mpsc::unbounded_channel();
    let (session, joined) = sfu.join(room.clone(), name.into(), offer, Rights::ALL, route).unwrap();
    peer.accept_answer(joined.await.unwrap().answer.to_sdp_string()).await.unwrap();
    let (sfu, answering) = (sfu.clone(), peer.clone());
    tokio::spawn(async move {
        while let Some(event) = sfu_events.recv().await {
            if let SfuEvent::Offer { offer, .. } = event {
                let Ok(answer) = answering.accept_offer(offer.to_sdp_string()).await else { return };
                let answer = SdpAnswer::from_sdp_string(&answer).unwrap();
                let _ = sfu.accept_answer(session, answer).await.await;
            }
        }
    });
    (peer, events)
}

/// `peer` sends `burst` of `frames` (round and round) every `every`, until
/// the task is dropped or aborted.
fn talk(peer: MediaPeer, frames: Arc<Vec<Vec<u8>>>, burst: usize, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        for n in 0.. {
            tick.tick().await;
            for i in 0..burst {
                if peer.send_opus(frames[(n * burst + i) % frames.len()].clone()).is_err() {
                    return;
                }
            }
        }
    })
}

/// When each frame reached a listener.
#[derive(Clone)]
struct Arrivals(Arc<Mutex<Vec<Instant>>>);

impl Arrivals {
    /// Records the frames among a peer's events.
    fn record(mut events: mpsc::Receiver<PeerEvent>) -> Arrivals {
        let arrivals = Arrivals(Arc::default());
        let recorded = arrivals.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if matches!(event, PeerEvent::Frame(_)) {
                    recorded.0.lock().unwrap().push(Instant::now());
                }
            }
        });
        arrivals
    }

    /// Waits (at most 10 s) until `count` frames have arrived.
    async fn wait_for(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.0.lock().unwrap().len() < count {
            assert!(Instant::now() < deadline, "the call never carried audio");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Frames since `start`, the last one's arrival, and the longest silence
    /// from `start` on.
    fn since(&self, start: Instant) -> (usize, Instant, Duration) {
        let arrivals: Vec<Instant> = self.0.lock().unwrap().iter().copied().filter(|at| *at >= start).collect();
        let Some(&last) = arrivals.last() else { return (0, start, Duration::MAX) };
        let mut gap = arrivals[0] - start;
        for pair in arrivals.windows(2) {
            gap = gap.max(pair[1] - pair[0]);
        }
        (arrivals.len(), last, gap)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_flood_at_one_worker_is_refused_while_its_calls_keep_their_audio() {
    let driver = SfuDriver::start(DriverConfig { worker_queue: 16, ..config(1) }).unwrap();
    let sfu = driver.handle();
    let room = RoomId::from("ward");
    let (talker, _talker_events) = connect(&sfu, &room, "talker").await;
    let (_listener, heard) = connect(&sfu, &room, "listener").await;
    // 20 ms Opus frames (the payload is opaque to the SFU: no DSP here).
    let _talking = talk(talker, Arc::new(vec![vec![0xfc, 0xff, 0xfe]]), 1, Duration::from_millis(20));
    let arrivals = Arrivals::record(heard);
    arrivals.wait_for(25).await;

    // Two seconds of joins, far faster than the worker can take them, each
    // into a room of its own on the same worker.
    let offer_sdp = offer().to_sdp_string();
    let flood_started = Instant::now();
    let (mut queued, mut refused, mut replies) = (0, 0, Vec::new());
    while flood_started.elapsed() < Duration::from_secs(2) {
        for _ in 0..20 {
            let (route, _events) = mpsc::unbounded_channel();
            let offer = SdpOffer::from_sdp_string(&offer_sdp).unwrap();
            match sfu.join(RoomId(format!("flood-{queued}-{refused}")), "flood".into(), offer, Rights::ALL, route) {
                Ok((_, reply)) => {
                    queued += 1;
                    replies.push(reply);
                }
                Err(SfuError::Overloaded) => refused += 1,
                Err(e) => panic!("a join refused for another reason: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Every join the worker queued is carried out; the rest were refused at
    // once and counted.
    for reply in replies {
        reply.await.expect("a queued join is applied");
    }
    let flood_ended = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(refused > queued, "the flood outran the queue: {queued} queued, {refused} refused");
    assert_eq!(sfu.overloaded(), refused);
    let families = sfu.metric_families().await.unwrap();
    let counted = families.iter().find(|f| f.name() == "fleetcall_media_joins_refused_total").expect("the refusal counter");
    assert_eq!(counted.get_metric()[0].get_counter().value(), refused as f64);

    // The call on the flooded worker kept its audio.
    let (heard, last, gap) = arrivals.since(flood_started);
    assert!(heard >= 100, "the listener heard {heard} frames during the flood");
    assert!(last > flood_ended, "audio went on after the flood");
    assert!(gap <= Duration::from_millis(200), "audio gap of {gap:?} during the flood");

    // Once the queue has drained, joins are taken again.
    let (route, _events) = mpsc::unbounded_channel();
    let (_, reply) = sfu.join(RoomId::from("after"), "late".into(), offer(), Rights::ALL, route).expect("room in the queue again");
    reply.await.unwrap();
    tokio::task::spawn_blocking(move || driver.shutdown()).await.unwrap();
}

/// 20 ms of a 440 Hz tone as real Opus (the DSP decodes what it denoises).
fn opus_frames(count: usize) -> Vec<Vec<u8>> {
    use audiopus::coder::Encoder;
    use audiopus::{Application, Channels, SampleRate};
    let encoder = Encoder::new(SampleRate::Hz48000, Channels::Mono, Application::Voip).unwrap();
    (0..count)
        .map(|frame| {
            let pcm: Vec<i16> =
                (0..960).map(|i| ((((frame * 960 + i) as f32) * 440.0 * std::f32::consts::TAU / 48_000.0).sin() * 8000.0) as i16).collect();
            let mut out = vec![0u8; 1500];
            let len = encoder.encode(&pcm, &mut out).unwrap();
            out.truncate(len);
            out
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_ten_times_faster_than_real_time_costs_only_its_own_track() {
    // Everyone denoised, on one DSP thread: the fast publisher's packets and
    // the honest call's share it.
    let mut config = config(1);
    config.sfu.suppression.default = true;
    // Low, so that bursts from a debug-build peer (which sends not much
    // faster than the DSP thread denoises) cross it.
    config.sfu.dsp_queue_per_track = 2;
    let driver = SfuDriver::start(config).unwrap();
    let sfu = driver.handle();
    let (honest, _) = connect(&sfu, &RoomId::from("ward"), "honest").await;
    let (_listener, heard) = connect(&sfu, &RoomId::from("ward"), "listener").await;
    let (greedy, _) = connect(&sfu, &RoomId::from("lab"), "greedy").await;
    let (_greedy_listener, _greedy_heard) = connect(&sfu, &RoomId::from("lab"), "lab-listener").await;
    let frames = Arc::new(opus_frames(50));
    let arrivals = Arrivals::record(heard);
    let _honest = talk(honest, frames.clone(), 1, Duration::from_millis(20));
    arrivals.wait_for(25).await;
    let stats = sfu.stats().await.unwrap();
    assert_eq!(stats.suppressed_tracks, 4, "{stats:?}");

    // 500 ms of audio every 50 ms: ten times real time, in bursts.
    let started = Instant::now();
    let before = stats.dropped.dsp_overflow;
    let greedy = talk(greedy, frames, 25, Duration::from_millis(50));
    tokio::time::sleep(Duration::from_secs(3)).await;
    greedy.abort();

    let stats = sfu.stats().await.unwrap();
    assert!(stats.dropped.dsp_overflow > before, "the fast publisher's excess is dropped and counted: {:?}", stats.dropped);
    assert_eq!(stats.participants, 4, "nobody was removed");
    let (heard, _, gap) = arrivals.since(started);
    assert!(heard >= 100, "the honest call carried {heard} frames meanwhile");
    assert!(gap <= Duration::from_millis(200), "the honest call had an audio gap of {gap:?}");
    tokio::task::spawn_blocking(move || driver.shutdown()).await.unwrap();
}
