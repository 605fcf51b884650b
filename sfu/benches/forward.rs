//! Nanoseconds per forwarded audio packet in the SFU core.
//!
//! Media peers (fleetcall-peer) publish and receive in virtual time (the same harness as
//! the tests); every call into the SFU core is timed (datagrams in, timers,
//! polling its output: SRTP decrypt, speaker selection, routing, SRTP encrypt
//! and queueing for every listener, RTCP and STUN too). The figure is that
//! time divided by the packets written to listeners: what forwarding costs
//! in the core, before the UDP system calls.
//!
//! `talkers/{all_to_all,slots}/N`: rooms of N where 3 participants talk and
//! the others are muted (they publish an audio track but send nothing), once
//! with every publisher on its own m-line at every listener
//! (`audio_slots = 0`) and once with 3 audio slots per listener. Both
//! forward the same packets (3 talkers to N - 1 listeners); what differs is
//! how many streams each listener's `Rtc` carries. `FORWARD_SIZES=20,200`
//! and `FORWARD_MODES=slots` narrow the run; `FORWARD_ROOMS=50` sets the
//! number of rooms of 5 in the last case (default 20).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::Net;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fleetcall_sfu::SfuConfig;

const TALKERS: usize = 3;

/// Builds `rooms` rooms of `size` where the first `talkers` joiners of each talk.
fn fleet(rooms: usize, size: usize, talkers: usize, audio_slots: usize) -> Net {
    let config = SfuConfig { disconnect_grace: Duration::from_secs(3600), audio_slots, max_room_size: 1000, ..SfuConfig::default() };
    let mut net = Net::with_config(config);
    for room in 0..rooms {
        for member in 0..size {
            let i = net.join(&format!("room-{room}"));
            net.clients[i].talking = member < talkers;
            net.clients[i].level = Some(if member < talkers { -20 } else { -127 });
        }
    }
    let slot_mode = audio_slots > 0 && size > audio_slots + 1;
    let ready = |n: &Net| {
        let stats = n.stats();
        let wired = if slot_mode { stats.audio_slots == rooms * size * audio_slots } else { stats.forwarding_entries == rooms * size * (size - 1) };
        wired && n.clients.iter().all(|c| c.connected)
    };
    assert!(net.run_until(Duration::from_secs(30), ready), "fleet connected");
    net.run(Duration::from_secs(1));
    net
}

/// One iteration is one packet written to a listener.
fn bench(c: &mut Criterion, group: &str, name: &str, net: &mut Net) {
    let mut group = c.benchmark_group(group);
    group.throughput(Throughput::Elements(1));
    group.sample_size(10).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let (time, forwarded) = (net.sfu_time, net.stats().rtp_forwarded);
            while net.stats().rtp_forwarded < forwarded + iters {
                net.run(Duration::from_millis(20));
            }
            // Scale to exactly `iters` packets: a 20 ms step overshoots.
            let written = net.stats().rtp_forwarded - forwarded;
            let per_packet = (net.sfu_time - time).as_secs_f64() / written as f64;
            Duration::from_secs_f64(per_packet * iters as f64)
        })
    });
    group.finish();
}

fn forward(c: &mut Criterion) {
    let sizes: Vec<usize> = std::env::var("FORWARD_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![5, 20, 50, 200]);
    for size in sizes {
        let modes = std::env::var("FORWARD_MODES").unwrap_or_else(|_| "slots,all_to_all".into());
        for (mode, slots) in [("slots", 3), ("all_to_all", 0)] {
            if !modes.split(',').any(|m| m == mode) {
                continue;
            }
            let mut net = fleet(1, size, TALKERS, slots);
            bench(c, "talkers", &format!("{mode}/{size}"), &mut net);
            let stats = net.stats();
            // Selection must be quiet while the same three talk.
            println!(
                "{mode}/{size}: speaker changes {}, slot switches {}, forwarded {}, suppressed by selection {}",
                stats.speaker_changes, stats.slot_switches, stats.selection_forwarded, stats.selection_suppressed,
            );
        }
    }
    let rooms = std::env::var("FORWARD_ROOMS").ok().and_then(|n| n.parse().ok()).unwrap_or(20);
    let mut net = fleet(rooms, 5, 1, 0);
    bench(c, "forward", &format!("{rooms}_rooms_of_5_1_talker_each"), &mut net);
}

criterion_group!(benches, forward);
criterion_main!(benches);
