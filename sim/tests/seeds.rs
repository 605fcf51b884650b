//! Runs the simulation over many seeds: `cargo test` runs a few hundred,
//! `FLEETCALL_SIM_SEEDS=N` runs N (from `FLEETCALL_SIM_FIRST`), and
//! `FLEETCALL_SIM_SEED=N` replays one. A failure prints its seed, the
//! command that replays it and the events before it.

use std::time::Duration;

use fleetcall_sim::{run_seeds, seeds_from_env};

/// Seeds of a plain `cargo test`.
const DEFAULT_SEEDS: u64 = 300;

#[test]
fn every_seed_holds_the_invariants_converges_after_the_heal_and_leaks_nothing() {
    let seeds = seeds_from_env(DEFAULT_SEEDS);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let summary = run_seeds(&seeds, threads);
    let minutes = summary.took.as_secs_f64() / 60.0;
    println!(
        "{} seeds in {:.1} s on {threads} threads: {:.0} seeds/min; {} calls ({} active), {} terminal events, {} members in calls at convergence, peak forwarding {}",
        summary.seeds,
        summary.took.as_secs_f64(),
        summary.seeds as f64 / minutes,
        summary.calls,
        summary.active_calls,
        summary.terminals,
        summary.members_at_convergence,
        summary.peak_forwarding,
    );
    if let (Some(median), Some(worst)) = (summary.convergence.get(summary.convergence.len() / 2), summary.convergence.last()) {
        let p99 = summary.convergence[(summary.convergence.len() * 99 / 100).min(summary.convergence.len() - 1)];
        println!("convergence after the heal: median {median:?}, p99 {p99:?}, worst {worst:?}");
    }
    if seeds.len() == 1 {
        println!("{:?}\n{:#?}", summary.reports, fleetcall_sim::plan::Plan::new(seeds[0]).faults);
    }
    for failure in &summary.failures {
        eprintln!("{failure}\n");
    }
    assert!(
        summary.failures.is_empty(),
        "{} of {} seeds failed: {:?} (replay: FLEETCALL_SIM_SEED=<seed> cargo test -p fleetcall-sim --test seeds -- --nocapture)",
        summary.failures.len(),
        summary.seeds,
        summary.failures.iter().map(|f| f.seed).collect::<Vec<_>>()
    );
    assert!(summary.convergence.iter().all(|c| *c <= Duration::from_secs(98)));
}

#[test]
fn a_seed_replays_the_same_history() {
    let identity = fleetcall_peer::DtlsIdentity::generate().unwrap();
    for seed in [3, 17, 42] {
        let first = fleetcall_sim::run_seed(seed, &identity).unwrap_or_else(|f| panic!("{f}"));
        let second = fleetcall_sim::run_seed(seed, &identity).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!((first.digest, first.calls, first.terminals), (second.digest, second.calls, second.terminals), "seed {seed}");
    }
}
