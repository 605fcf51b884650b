//! Reconnect backoff for device clients: capped exponential with full jitter.
//!
//! The delay before attempt `n` (0-based) is uniform in
//! `[0, min(cap, base * 2^n)]`. Full jitter spreads a fleet that lost the
//! server at the same moment over the whole window instead of letting it
//! return in synchronized waves. Sans-IO: the caller passes the RNG and sleeps.

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// `base`: ceiling of the first delay; `cap`: largest ceiling.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// Defaults for the fleet: 500 ms base, 30 s cap.
    pub fn fleet_default() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(30))
    }

    /// Attempts made since the last [`reset`](Self::reset).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before the next attempt; counts the attempt.
    pub fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let ceiling = self.ceiling().as_nanos();
        self.attempt = self.attempt.saturating_add(1);
        // Uniform in [0, ceiling]: scale a 64-bit random number.
        let nanos = (ceiling * u128::from(rng.next_u64())) >> 64;
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Call once a connection has been established and welcomed.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    #[test]
    fn ceilings_double_then_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut rng = StdRng::seed_from_u64(1);
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            ceilings.push(b.ceiling().as_millis());
            let d = b.next_delay(&mut rng);
            assert!(d <= Duration::from_secs(1));
        }
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        // Huge attempt counts neither overflow nor exceed the cap.
        b.attempt = u32::MAX;
        assert_eq!(b.ceiling(), Duration::from_secs(1));
        assert!(b.next_delay(&mut rng) <= Duration::from_secs(1));
    }

    #[test]
    fn full_jitter_spreads_a_fleet_over_the_window() {
        let seed = 0x5eed;
        println!("seed = {seed:#x}");
        let mut rng = StdRng::seed_from_u64(seed);
        // 1000 devices at their 5th attempt: ceiling 30 s with these settings.
        let delays: Vec<Duration> = (0..1000)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(30));
                for _ in 0..4 {
                    b.next_delay(&mut rng);
                }
                b.next_delay(&mut rng)
            })
            .collect();
        // Ten 3-second buckets each get roughly a tenth, none more than twice.
        let mut buckets = [0u32; 10];
        for d in &delays {
            assert!(*d <= Duration::from_secs(30));
            buckets[((d.as_secs_f64() / 3.0) as usize).min(9)] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (50..=200).contains(&n)),
            "{buckets:?}"
        );
    }
}
