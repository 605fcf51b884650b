//! What the rejected "one shared port" design would add per datagram: copying
//! it out of the receive buffer and handing it to the worker that owns its
//! room over a channel. With a port per worker this cost is zero (the kernel
//! delivers each datagram to the right socket).

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// A typical Opus RTP datagram.
const DATAGRAM: usize = 160;

fn handoff(c: &mut Criterion) {
    let mut group = c.benchmark_group("shared_port_handoff");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("copy_and_channel_per_datagram", |b| {
        b.iter_custom(|iters| {
            let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(4096);
            let consumer = thread::spawn(move || {
                let mut sum = 0u64;
                for datagram in rx {
                    sum = sum.wrapping_add(u64::from(datagram[0]));
                }
                sum
            });
            let buffer = [0x80u8; DATAGRAM];
            let start = Instant::now();
            for _ in 0..iters {
                tx.send(buffer.to_vec()).unwrap();
            }
            drop(tx);
            std::hint::black_box(consumer.join().unwrap());
            start.elapsed()
        })
    });
    group.finish();
}

criterion_group!(benches, handoff);
criterion_main!(benches);
