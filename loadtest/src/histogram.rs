//! A latency histogram: log-spaced buckets (2 % wide) for percentiles over
//! millions of samples in a few kilobytes, with exact count, sum, min and max.

use std::time::Duration;

use serde::Serialize;

/// Smallest value with its own bucket, in microseconds; smaller ones share
/// bucket 0.
const FLOOR_US: f64 = 1.0;
/// Relative width of a bucket.
const GROWTH: f64 = 1.02;
/// Buckets up to about 1.02^1200 µs (hours): anything larger lands in the last.
const BUCKETS: usize = 1200;

/// Durations, recorded in microseconds.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum_us: f64,
    min_us: f64,
    max_us: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            count: 0,
            sum_us: 0.0,
            min_us: f64::INFINITY,
            max_us: 0.0,
        }
    }
}

impl Histogram {
    /// Records one duration.
    pub fn record(&mut self, value: Duration) {
        self.record_us(value.as_secs_f64() * 1e6);
    }

    /// Records one value in microseconds (negative values count as 0).
    pub fn record_us(&mut self, us: f64) {
        let us = if us.is_finite() { us.max(0.0) } else { 0.0 };
        self.counts[bucket(us)] += 1;
        self.count += 1;
        self.sum_us += us;
        self.min_us = self.min_us.min(us);
        self.max_us = self.max_us.max(us);
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.sum_us += other.sum_us;
        self.min_us = self.min_us.min(other.min_us);
        self.max_us = self.max_us.max(other.max_us);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The value under which a fraction `q` (0..=1) of the samples lie, in
    /// microseconds: the upper edge of its bucket, clamped to the exact
    /// min and max. `None` without samples.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        if rank >= self.count {
            return Some(self.max_us);
        }
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(upper_edge(i).clamp(self.min_us, self.max_us));
            }
        }
        Some(self.max_us)
    }

    /// Count, mean and the usual percentiles in milliseconds.
    pub fn summary(&self) -> Summary {
        let ms = |us: Option<f64>| us.map(|v| round3(v / 1000.0));
        Summary {
            count: self.count,
            mean_ms: (self.count > 0).then(|| round3(self.sum_us / self.count as f64 / 1000.0)),
            p50_ms: ms(self.quantile_us(0.50)),
            p95_ms: ms(self.quantile_us(0.95)),
            p99_ms: ms(self.quantile_us(0.99)),
            max_ms: (self.count > 0).then(|| round3(self.max_us / 1000.0)),
        }
    }
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_ms: Option<f64>,
    /// Median.
    pub p50_ms: Option<f64>,
    /// 95th percentile.
    pub p95_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// Largest sample.
    pub max_ms: Option<f64>,
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn bucket(us: f64) -> usize {
    if us <= FLOOR_US {
        return 0;
    }
    let i = ((us / FLOOR_US).ln() / GROWTH.ln()).ceil() as usize;
    i.min(BUCKETS - 1)
}

fn upper_edge(i: usize) -> f64 {
    FLOOR_US * GROWTH.powi(i as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_a_bucket_of_the_truth() {
        let mut h = Histogram::default();
        for us in 1..=10_000u32 {
            h.record_us(f64::from(us));
        }
        for (q, truth) in [(0.5, 5_000.0), (0.95, 9_500.0), (0.99, 9_900.0)] {
            let got = h.quantile_us(q).unwrap();
            assert!(
                (got - truth).abs() / truth < 0.025,
                "q{q}: {got} vs {truth}"
            );
        }
        assert_eq!(h.quantile_us(1.0), Some(10_000.0), "the max is exact");
        assert_eq!(h.quantile_us(0.0), Some(1.0), "the min is exact");
        let s = h.summary();
        assert_eq!(s.count, 10_000);
        assert_eq!(s.max_ms, Some(10.0));
        assert!((s.mean_ms.unwrap() - 5.0005).abs() < 1e-3);
    }

    #[test]
    fn empty_merge_and_odd_values() {
        let mut a = Histogram::default();
        assert_eq!(a.quantile_us(0.5), None);
        assert_eq!(a.summary().p99_ms, None);
        let mut b = Histogram::default();
        b.record(Duration::from_millis(3));
        b.record_us(-5.0);
        b.record_us(f64::NAN);
        b.record_us(1e18);
        a.merge(&b);
        assert_eq!(a.count(), 4);
        assert_eq!(
            a.quantile_us(0.25),
            Some(1.0),
            "the first bucket holds everything up to 1 µs"
        );
        assert_eq!(
            a.quantile_us(1.0),
            Some(1e18),
            "huge values keep their exact max"
        );
    }
}
