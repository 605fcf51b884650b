//! fleetcall-sim: the controller and the SFU core together, in virtual time,
//! with seeded faults, checked after every step.
//!
//! One run ([`run_seed`]) is four devices and one server. The devices are
//! the SDK's protocol core ([`ClientCore`](fleetcall_signaling::client::ClientCore))
//! with its driver's reconnect rule, and the media peer
//! ([`fleetcall_peer::Peer`]); the server is the controller and one SFU
//! core joined by the bridge's own translation
//! ([`fleetcall::bridge::translate`]). For the first 30 s the users call,
//! answer, open groups and rooms, hang up and restart ICE, while the seed's
//! faults strike: datagram loss (0-30 %), latency and jitter, cuts of the
//! control or media path (one way or both, short or past the QUIC idle
//! timeout), control streams that stop moving while QUIC stays up, device
//! crashes and reboots, and suspended processes (device or server) whose
//! clocks jump. Then the network heals and the run must:
//!
//! 1. hold the invariants after every step: the controller's own audit;
//!    no participant in the SFU the controller does not believe in, and no
//!    forwarding outside the controller's calls; a terminal event at most
//!    once per call and device, with the server's reason;
//! 2. converge within [`convergence_bound`]: every device online in the
//!    session the server holds for it; every live call fully connected and
//!    shown by exactly its members; the SFU holding exactly the controller's
//!    participants and forwarding every member to every other; every call a
//!    device showed ended for it exactly once (or with its session);
//! 3. carry audio: every member hears every other;
//! 4. leak nothing once everyone hangs up and the tombstones are
//!    forgotten: no room, participant, track, forwarding entry, demux
//!    entry, call, participation or timer beyond one heartbeat and one
//!    credential expiry per connected device.
//!
//! A failure names its seed; `FLEETCALL_SIM_SEED=N` replays it. See the
//! crate's README for the seed counts and what a run costs.

pub mod device;
pub mod plan;
pub mod server;
pub mod world;

use std::time::{Duration, Instant};

use fleetcall_peer::DtlsIdentity;
use fleetcall_signaling::controller::Config;
use fleetcall_signaling::pb::CallPhase;

pub use crate::world::{Report, Violation, World};

/// How long after the network heals everything must have converged: a
/// dead link is found (`Config::detection_bound`), a dial in flight fails
/// (the SDK's connect timeout), the next dial waits at most the backoff's
/// cap, a session not resumed is swept (`resume_grace`), and a call in
/// setup takes at most its chain of deadlines (device offer, SFU join,
/// media connect, one renegotiation answer).
pub fn convergence_bound(config: &Config) -> Duration {
    config.detection_bound()
        + device::CONNECT_TIMEOUT
        + BACKOFF_CAP
        + config.resume_grace
        + config.offer_timeout
        + config.sfu_timeout
        + config.connect_timeout
        + config.answer_timeout
}

/// The largest reconnect delay of the SDK (`Backoff::fleet_default`).
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// How long every member gets to hear every other once converged.
const HEARING: Duration = Duration::from_secs(3);

/// How long the hang-ups of the teardown may take.
const TEARDOWN: Duration = Duration::from_secs(30);

/// A failed run.
#[derive(Debug)]
pub struct Failure {
    /// Its seed.
    pub seed: u64,
    /// What failed.
    pub violation: Violation,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed {} failed at {} ms: {}", self.seed, self.violation.at_ms, self.violation.what)?;
        writeln!(f, "replay: {}", replay_command(self.seed))?;
        write!(f, "last events:\n{}", self.violation.trace)
    }
}

/// The command that replays one seed.
pub fn replay_command(seed: u64) -> String {
    format!("FLEETCALL_SIM_SEED={seed} cargo test -p fleetcall-sim --test seeds -- --nocapture")
}

/// Runs one seed from start to teardown.
pub fn run_seed(seed: u64, identity: &DtlsIdentity) -> Result<Report, Failure> {
    // str0m draws its ICE credentials, SSRCs and timer jitter from this
    // thread's fastrand generator: seeded, a run replays its media timing too.
    fastrand::seed(seed);
    let mut world = World::new(seed, identity.clone());
    run(&mut world).map_err(|violation| Failure { seed, violation })
}

fn run(world: &mut World) -> Result<Report, Violation> {
    world.run_until(world.heal_time())?;
    world.heal();
    let healed = world.now;
    let bound = convergence_bound(world.server.ctl.config());
    world.run_while(healed + bound, every(Duration::from_millis(50), |w| w.unconverged().is_some()))?;
    if let Some(why) = world.unconverged() {
        return Err(world.violation(format!("not converged {bound:?} after the network healed: {why}")));
    }
    let convergence = world.now - healed;
    world.members_at_convergence = world.server.ctl.calls().iter().filter(|c| c.phase != CallPhase::Ended).map(|c| c.members.len()).sum();
    let since = world.now;
    world.run_while(since + HEARING, every(Duration::from_millis(100), move |w| w.unheard(since).is_some()))?;
    if let Some(why) = world.unheard(since) {
        return Err(world.violation(format!("converged but silent: {why}")));
    }
    world.hang_up_all();
    let hung_up = world.now;
    let busy = |w: &World| {
        w.server.ctl.calls().iter().any(|c| c.phase != CallPhase::Ended) || !w.server.participations.is_empty()
    };
    world.run_while(hung_up + TEARDOWN, every(Duration::from_millis(100), busy))?;
    // Tombstones are kept for late requests, then forgotten.
    let retention = world.server.ctl.config().ended_call_retention;
    world.run_until(world.now + retention + Duration::from_secs(1))?;
    if let Some(leak) = world.leaks() {
        return Err(world.violation(format!("leaked after the teardown: {leak}")));
    }
    Ok(world.report(convergence))
}

/// Evaluates `cond` at most every `period` of virtual time (it is not free),
/// holding its last answer in between.
fn every(period: Duration, mut cond: impl FnMut(&World) -> bool) -> impl FnMut(&World) -> bool {
    let mut last: Option<(Instant, bool)> = None;
    move |w| match last {
        Some((at, answer)) if w.now < at + period => answer,
        _ => {
            let answer = cond(w);
            last = Some((w.now, answer));
            answer
        }
    }
}

/// The seeds to run: `FLEETCALL_SIM_SEED=N` replays one, otherwise
/// `FLEETCALL_SIM_SEEDS=COUNT` (default `default_count`) from
/// `FLEETCALL_SIM_FIRST` (default 0).
pub fn seeds_from_env(default_count: u64) -> Vec<u64> {
    let var = |name: &str| std::env::var(name).ok().map(|v| v.trim().parse::<u64>().unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}")));
    if let Some(seed) = var("FLEETCALL_SIM_SEED") {
        return vec![seed];
    }
    let first = var("FLEETCALL_SIM_FIRST").unwrap_or(0);
    let count = var("FLEETCALL_SIM_SEEDS").unwrap_or(default_count);
    (first..first.saturating_add(count)).collect()
}

/// The outcome of many seeds.
#[derive(Debug, Default)]
pub struct Summary {
    /// Seeds run.
    pub seeds: u64,
    /// The runs that failed, by seed.
    pub failures: Vec<Failure>,
    /// Convergence times of the runs that passed.
    pub convergence: Vec<Duration>,
    /// Calls created and terminal events received, over all runs.
    pub calls: u64,
    /// Terminal events devices received, over all runs.
    pub terminals: u64,
    /// Members of live calls at convergence, summed.
    pub members_at_convergence: u64,
    /// The largest forwarding table seen.
    pub peak_forwarding: usize,
    /// Calls that became active.
    pub active_calls: u64,
    /// Every passing run's report, by seed.
    pub reports: Vec<(u64, Report)>,
    /// Wall-clock time.
    pub took: Duration,
}

/// Runs `seeds` on `threads` threads (one DTLS identity shared: making
/// one costs a millisecond).
pub fn run_seeds(seeds: &[u64], threads: usize) -> Summary {
    let started = Instant::now();
    let identity = DtlsIdentity::generate().expect("a DTLS identity");
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&seed) = seeds.get(i) else { return };
                    let result = run_seed(seed, &identity);
                    results.lock().expect("no panics while holding it").push((seed, result));
                }
            });
        }
    });
    let mut summary = Summary { seeds: seeds.len() as u64, ..Summary::default() };
    for (seed, result) in results.into_inner().expect("no panics while holding it") {
        match result {
            Ok(report) => {
                summary.reports.push((seed, report.clone()));
                summary.convergence.push(report.convergence);
                summary.calls += report.calls;
                summary.terminals += report.terminals;
                summary.members_at_convergence += report.members_at_convergence as u64;
                summary.peak_forwarding = summary.peak_forwarding.max(report.peak_forwarding);
                summary.active_calls += report.media_connected;
            }
            Err(failure) => summary.failures.push(failure),
        }
    }
    summary.failures.sort_by_key(|f| f.seed);
    summary.reports.sort_by_key(|(seed, _)| *seed);
    summary.convergence.sort();
    summary.took = started.elapsed();
    summary
}

#[cfg(test)]
mod tests {
    use fleetcall_signaling::backoff::Backoff;
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn the_bound_uses_the_sdks_backoff_cap_and_the_documented_timeouts() {
        let mut backoff = Backoff::fleet_default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..64 {
            backoff.next_delay(&mut rng);
        }
        assert_eq!(backoff.ceiling(), BACKOFF_CAP);
        // 8 + 10 + 30 + 10 + (10 + 5 + 15 + 10)
        assert_eq!(convergence_bound(&Config::default()), Duration::from_secs(98));
    }
}
