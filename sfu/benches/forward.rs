//! Nanoseconds per forwarded audio packet in the SFU core.
//!
//! str0m client peers publish and receive in virtual time (the same harness as
//! the tests); only the SFU's handling of talkers' RTP is timed: SRTP decrypt,
//! routing, and SRTP encrypt + queueing for every subscriber. The figure is
//! that time divided by the number of subscribers each packet reaches.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::Net;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Builds `rooms` rooms of `size` where only the first joiner of each talks.
fn fleet(rooms: usize, size: usize) -> Net {
    let mut net = Net::new(Duration::from_secs(3600));
    for room in 0..rooms {
        for member in 0..size {
            let i = net.join(&format!("room-{room}"));
            net.clients[i].talking = member == 0;
        }
    }
    assert!(net.run_until(Duration::from_secs(10), |n| n.stats().forwarding_entries == rooms * size * (size - 1)
        && n.clients.iter().all(|c| c.connected)), "fleet connected");
    net.run(Duration::from_secs(1));
    net
}

fn bench(c: &mut Criterion, name: &str, rooms: usize, size: usize) {
    let mut net = fleet(rooms, size);
    let fanout = (size - 1) as u64;
    let mut group = c.benchmark_group("forward");
    group.throughput(Throughput::Elements(fanout));
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let (time, packets) = (net.rtp_in_time, net.rtp_in);
            while net.rtp_in < packets + iters {
                net.run(Duration::from_millis(20));
            }
            // Scale to exactly `iters` packets: a 20 ms step may overshoot.
            let per_packet = (net.rtp_in_time - time).as_secs_f64() / (net.rtp_in - packets) as f64;
            Duration::from_secs_f64(per_packet * iters as f64)
        })
    });
    group.finish();
}

fn forward(c: &mut Criterion) {
    bench(c, "1_room_1_talker_50_listeners", 1, 51);
    bench(c, "20_rooms_of_5_1_talker_each", 20, 5);
}

criterion_group!(benches, forward);
criterion_main!(benches);
