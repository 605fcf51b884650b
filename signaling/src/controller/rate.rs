//! The per-connection message rate, in virtual time.
//!
//! A token bucket kept as one instant (GCRA, the "generic cell rate
//! algorithm"): `tat` is when the bucket would be full again. Each admitted
//! frame pushes it one emission interval (`1 / rate`) later; a frame is
//! refused when that would put `tat` more than a burst's worth of intervals
//! ahead of `now`. No floating point, no clock: `now` is the controller's.

use std::time::{Duration, Instant};

/// One connection's bucket.
#[derive(Debug, Clone)]
pub(super) struct RateLimiter {
    /// Theoretical arrival time: the bucket is full at and after it.
    tat: Instant,
    /// Frames refused since the bucket was last full.
    refused: u32,
}

/// What the bucket says about one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Within the rate: process it.
    Admit,
    /// Over the rate: answer it with `RATE_LIMITED`; the count of frames
    /// refused since the bucket was last full.
    Refuse(u32),
}

impl RateLimiter {
    /// A full bucket at `now`.
    pub(super) fn new(now: Instant) -> Self {
        RateLimiter { tat: now, refused: 0 }
    }

    /// Takes one token at `now` for a bucket refilling `per_second` tokens
    /// a second and holding `burst` (both at least 1, see `Config::validate`).
    pub(super) fn take(&mut self, now: Instant, per_second: u32, burst: u32) -> Verdict {
        let interval = Duration::from_secs(1) / per_second.max(1);
        if self.tat <= now {
            // Full again: the client slowed down, earlier refusals are forgiven.
            self.tat = now;
            self.refused = 0;
        }
        let tolerance = interval * burst.max(1).saturating_sub(1);
        if self.tat.saturating_duration_since(now) > tolerance {
            self.refused = self.refused.saturating_add(1);
            return Verdict::Refuse(self.refused);
        }
        self.tat += interval;
        Verdict::Admit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(r: &mut RateLimiter, now: Instant, n: u32) -> u32 {
        (0..n).filter(|_| r.take(now, 20, 60) == Verdict::Admit).count() as u32
    }

    #[test]
    fn burst_then_rate_then_forgiven_when_full() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(t0);
        assert_eq!(admitted(&mut r, t0, 100), 60, "a burst of 60 at once");
        assert_eq!(r.take(t0, 20, 60), Verdict::Refuse(41));
        // 20 a second after that: one every 50 ms.
        assert_eq!(admitted(&mut r, t0 + Duration::from_millis(49), 5), 0);
        assert_eq!(admitted(&mut r, t0 + Duration::from_millis(50), 5), 1);
        assert_eq!(admitted(&mut r, t0 + Duration::from_millis(1050), 100), 20);
        // Quiet for the whole bucket (3 s): full again, refusals forgotten.
        let later = t0 + Duration::from_millis(1050 + 3000);
        assert_eq!(admitted(&mut r, later, 60), 60);
        assert_eq!(r.take(later, 20, 60), Verdict::Refuse(1));
    }

    #[test]
    fn steady_rate_just_under_the_limit_is_never_refused() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(t0);
        for i in 0..10_000u32 {
            // 19.9 frames a second, for over eight minutes.
            let at = t0 + Duration::from_micros(u64::from(i) * 50_250);
            assert_eq!(r.take(at, 20, 1), Verdict::Admit, "frame {i}");
        }
    }
}
