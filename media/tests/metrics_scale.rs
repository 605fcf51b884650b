//! Figures, run by hand: the media plane's share of a `/metrics` scrape with
//! 1,000 connected participants.
//!
//! ```sh
//! cargo test --release -p fleetcall-media --test metrics_scale -- --ignored --nocapture
//! ```
//!
//! Four sans-IO cores (the driver asks every worker for its stats, then
//! builds the families) each hold 250 str0m clients, connected and publishing,
//! in 25 rooms of 10: 1,000 participants and 1,000 tracks. Times what a scrape does with them: `Sfu::stats` on every core,
//! merging, the metric families and the text encoding. Prints figures,
//! asserts only that the fill happened.

// The SFU core's virtual-time harness: this figure is about what the driver
// does with the cores' stats, not about the cores.
#[path = "../../sfu/tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Net;
use fleetcall_sfu::audio::AudioTotals;
use fleetcall_sfu::SfuStats;

const CORES: usize = 4;
/// The harness addresses at most 255 clients per core.
const PER_CORE: usize = 250;
const ROOM_SIZE: usize = 10;
const SCRAPES: usize = 1_000;

#[test]
#[ignore = "figures, run by hand (see the file's docs)"]
fn stats_and_families_with_1000_connected_participants() {
    let fill = Instant::now();
    let mut cores: Vec<Net> = (0..CORES).map(|_| Net::new(Duration::from_secs(3600))).collect();
    for (c, net) in cores.iter_mut().enumerate() {
        for i in 0..PER_CORE {
            let client = net.join(&format!("ward-{c}-{}", i / ROOM_SIZE));
            // Connected and publishing, but quiet: the fill is quicker, and
            // what a scrape walks does not depend on who talks.
            net.clients[client].talking = false;
        }
        let full = |n: &Net| n.clients.iter().all(|c| c.connected) && n.stats().tracks == PER_CORE;
        assert!(net.run_until(Duration::from_secs(20), full), "core {c} did not connect: {:?}", net.stats());
    }
    println!("filled {} participants in {:.1} s", CORES * PER_CORE, fill.elapsed().as_secs_f64());

    let mut times = Vec::with_capacity(SCRAPES);
    let mut text = Vec::new();
    for _ in 0..SCRAPES {
        let start = Instant::now();
        let mut total = SfuStats::default();
        for net in &cores {
            total.merge(&net.sfu.stats());
        }
        let families = fleetcall_media::metrics::families(&total, &AudioTotals::default());
        text.clear();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &families, &mut text).unwrap();
        times.push(start.elapsed());
    }
    times.sort();
    let stats_only = {
        let start = Instant::now();
        for _ in 0..SCRAPES {
            for net in &cores {
                std::hint::black_box(net.sfu.stats());
            }
        }
        start.elapsed() / SCRAPES as u32
    };
    let total = {
        let mut total = SfuStats::default();
        for net in &cores {
            total.merge(&net.sfu.stats());
        }
        total
    };
    println!(
        "{} participants, {} tracks, {} forwarding entries in {} rooms on {CORES} cores: media families {} bytes; \
         per scrape median {:.1} µs, p90 {:.1} µs (Sfu::stats on every core: {:.1} µs)",
        total.participants,
        total.tracks,
        total.forwarding_entries,
        total.rooms,
        text.len(),
        times[SCRAPES / 2].as_secs_f64() * 1e6,
        times[SCRAPES * 9 / 10].as_secs_f64() * 1e6,
        stats_only.as_secs_f64() * 1e6,
    );
}
