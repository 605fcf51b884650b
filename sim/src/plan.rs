//! What happens in one run, drawn from its seed before it starts: the
//! network's quality, the faults and what the users do.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Devices in every run: enough for 1:1 calls, a group of three and a
/// room at the size where every listener still gets a track per
/// publisher (`SfuConfig::audio_slots` + 1), so the SFU's forwarding can
/// be compared edge by edge with the controller's view.
pub const DEVICES: usize = 4;

/// Faults and user actions happen in `[0, FAULT_WINDOW)`; then the
/// network heals and the users only hang up.
pub const FAULT_WINDOW: Duration = Duration::from_secs(30);

/// Which traffic a cut drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plane {
    /// The control connection (QUIC: its stream and keep-alives).
    pub control: bool,
    /// Media datagrams.
    pub media: bool,
}

/// Which way a cut drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Way {
    /// Server -> device.
    pub to_device: bool,
    /// Device -> server.
    pub to_server: bool,
}

/// One fault, over `[from, until)` after the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The device's path drops packets of `plane` going `way`.
    Cut { device: usize, from: Duration, until: Duration, plane: Plane, way: Way },
    /// The device's control stream stops moving both ways while QUIC keeps
    /// the connection alive (the field's worst case: the UI stays open).
    Freeze { device: usize, from: Duration, until: Duration },
    /// The device's process is killed at `from` and boots at `until`.
    Crash { device: usize, from: Duration, until: Duration },
    /// The device's process is suspended (SIGSTOP, a stalled event loop):
    /// its clock jumps when it runs again.
    PauseDevice { device: usize, from: Duration, until: Duration },
    /// The server's controller and SFU core are suspended: their clock
    /// jumps, and every timer due meanwhile fires at once.
    PauseServer { from: Duration, until: Duration },
}

impl Fault {
    /// The interval it covers.
    pub fn span(&self) -> (Duration, Duration) {
        match *self {
            Fault::Cut { from, until, .. }
            | Fault::Freeze { from, until, .. }
            | Fault::Crash { from, until, .. }
            | Fault::PauseDevice { from, until, .. }
            | Fault::PauseServer { from, until } => (from, until),
        }
    }
}

/// What a user decides to do; the target is resolved when it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Call device `n`.
    Call(usize),
    /// Open a group with the devices in this bit set.
    Group(u8),
    /// Join the named room.
    Room,
    /// Hang up or leave the current call.
    Hangup,
    /// Restart ICE on the current call.
    IceRestart,
}

/// Everything one seed decides.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The seed.
    pub seed: u64,
    /// Probability that a media datagram is lost, and that a control
    /// packet needs a retransmission (0 to 30 %).
    pub loss: f64,
    /// One-way latency.
    pub latency: Duration,
    /// Extra random delay per packet, up to this (reorders datagrams).
    pub jitter: Duration,
    /// Faults, by start time.
    pub faults: Vec<Fault>,
    /// (when, device, what), by time.
    pub intents: Vec<(Duration, usize, Intent)>,
}

fn span(rng: &mut StdRng, start_max: Duration) -> (Duration, Duration) {
    let from = Duration::from_millis(rng.random_range(1_000..start_max.as_millis() as u64));
    // Short blips, outages the heartbeats see, and outages that outlast
    // the resume grace and the QUIC idle timeout.
    let length = match rng.random_range(0..10) {
        0..=3 => rng.random_range(200..3_000),
        4..=7 => rng.random_range(3_000..12_000),
        _ => rng.random_range(12_000..40_000),
    };
    let until = (from + Duration::from_millis(length)).min(FAULT_WINDOW);
    (from, until)
}

impl Plan {
    /// The plan of `seed`. Seeds below 10 have no faults at all (the
    /// baseline every faulty run is compared with).
    pub fn new(seed: u64) -> Plan {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed);
        let faulty = seed >= 10;
        let loss = if faulty { rng.random_range(0.0..0.3) } else { 0.0 };
        let latency = Duration::from_millis(rng.random_range(1..80));
        let jitter = Duration::from_millis(if faulty { rng.random_range(0..40) } else { 0 });
        let mut faults = Vec::new();
        if faulty {
            for _ in 0..rng.random_range(0..=4) {
                let device = rng.random_range(0..DEVICES);
                let (from, until) = span(&mut rng, FAULT_WINDOW - Duration::from_secs(2));
                let fault = match rng.random_range(0..100) {
                    0..=44 => {
                        let plane = match rng.random_range(0..3) {
                            0 => Plane { control: true, media: true },
                            1 => Plane { control: true, media: false },
                            _ => Plane { control: false, media: true },
                        };
                        let way = match rng.random_range(0..4) {
                            0 => Way { to_device: true, to_server: false },
                            1 => Way { to_device: false, to_server: true },
                            _ => Way { to_device: true, to_server: true },
                        };
                        Fault::Cut { device, from, until, plane, way }
                    }
                    45..=59 => Fault::Freeze { device, from, until },
                    60..=74 => Fault::Crash { device, from, until },
                    75..=89 => {
                        let until = (from + Duration::from_millis(rng.random_range(300..6_000))).min(FAULT_WINDOW);
                        Fault::PauseDevice { device, from, until }
                    }
                    _ => {
                        let until = (from + Duration::from_millis(rng.random_range(300..6_000))).min(FAULT_WINDOW);
                        Fault::PauseServer { from, until }
                    }
                };
                faults.push(fault);
            }
        }
        faults.sort_by_key(|f| f.span().0);
        let mut intents = Vec::new();
        for device in 0..DEVICES {
            let mut at = Duration::from_millis(rng.random_range(300..3_000));
            while at < FAULT_WINDOW {
                let intent = match rng.random_range(0..100) {
                    0..=34 => {
                        let other = (device + rng.random_range(1..DEVICES)) % DEVICES;
                        Intent::Call(other)
                    }
                    35..=49 => Intent::Group(rng.random_range(1..16u8) & !(1 << device)),
                    50..=59 => Intent::Room,
                    60..=89 => Intent::Hangup,
                    _ => Intent::IceRestart,
                };
                intents.push((at, device, intent));
                at += Duration::from_millis(rng.random_range(1_000..8_000));
            }
        }
        intents.sort_by_key(|(at, device, _)| (*at, *device));
        Plan { seed, loss, latency, jitter, faults, intents }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_draws_the_same_plan_and_faults_end_in_the_window() {
        for seed in 0..200 {
            let (a, b) = (Plan::new(seed), Plan::new(seed));
            assert_eq!((a.faults.clone(), a.intents.len()), (b.faults.clone(), b.intents.len()));
            assert!(a.loss <= 0.3);
            for fault in &a.faults {
                let (from, until) = fault.span();
                assert!(from <= until && until <= FAULT_WINDOW, "{fault:?}");
            }
            if seed < 10 {
                assert!(a.faults.is_empty() && a.loss == 0.0);
            }
        }
        let kinds = (10..2_000).flat_map(|s| Plan::new(s).faults).fold([0; 5], |mut n, f| {
            n[match f {
                Fault::Cut { .. } => 0,
                Fault::Freeze { .. } => 1,
                Fault::Crash { .. } => 2,
                Fault::PauseDevice { .. } => 3,
                Fault::PauseServer { .. } => 4,
            }] += 1;
            n
        });
        assert!(kinds.iter().all(|n| *n > 100), "every kind of fault is drawn: {kinds:?}");
    }
}
