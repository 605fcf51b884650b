//! Latency histograms for the report: an HDR histogram (`hdrhistogram`,
//! values within 1 % over any range, a few kilobytes) for the percentiles,
//! with the exact sum, min and max kept beside it for the mean and the
//! extremes.

use std::time::Duration;

use serde::Serialize;

/// Significant digits the percentiles keep (1 %).
const SIGFIG: u8 = 2;

/// Durations, recorded in microseconds.
#[derive(Debug, Clone)]
pub struct Histogram {
    hdr: hdrhistogram::Histogram<u64>,
    sum_us: f64,
    min_us: f64,
    max_us: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            // Auto-resizing: it grows to the largest value recorded.
            hdr: hdrhistogram::Histogram::new(SIGFIG).expect("2 significant digits are valid"),
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

    /// Records one value in microseconds (negative and NaN values count as 0).
    pub fn record_us(&mut self, us: f64) {
        let us = if us.is_finite() { us.max(0.0) } else { 0.0 };
        let value = us.round() as u64;
        // It grows to hold the value; beyond what an HDR histogram can
        // hold at all (millennia), it counts as its largest value.
        if self.hdr.record(value).is_err() {
            self.hdr.saturating_record(value);
        }
        self.sum_us += us;
        self.min_us = self.min_us.min(us);
        self.max_us = self.max_us.max(us);
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Histogram) {
        // Only fails for histograms that cannot resize; ours all can.
        let _ = self.hdr.add(&other.hdr);
        self.sum_us += other.sum_us;
        self.min_us = self.min_us.min(other.min_us);
        self.max_us = self.max_us.max(other.max_us);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.hdr.len()
    }

    /// The value under which a fraction `q` (0..=1) of the samples lie, in
    /// microseconds: the upper edge of its HDR bucket, clamped to the exact
    /// min and max. `None` without samples.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        if (q * count as f64).ceil() as u64 >= count {
            return Some(self.max_us);
        }
        // The upper edge of the bucket the sample falls in.
        let edge = self.hdr.value_at_quantile(q) as f64;
        Some(edge.clamp(self.min_us, self.max_us))
    }

    /// Count, mean and the usual percentiles in milliseconds.
    pub fn summary(&self) -> Summary {
        let count = self.count();
        let ms = |us: Option<f64>| us.map(|v| round3(v / 1000.0));
        Summary {
            count,
            mean_ms: (count > 0).then(|| round3(self.sum_us / count as f64 / 1000.0)),
            p50_ms: ms(self.quantile_us(0.50)),
            p95_ms: ms(self.quantile_us(0.95)),
            p99_ms: ms(self.quantile_us(0.99)),
            max_ms: (count > 0).then(|| round3(self.max_us / 1000.0)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_a_percent_of_the_truth() {
        let mut h = Histogram::default();
        for us in 1..=10_000u32 {
            h.record_us(f64::from(us));
        }
        for (q, truth) in [(0.5, 5_000.0), (0.95, 9_500.0), (0.99, 9_900.0)] {
            let got = h.quantile_us(q).unwrap();
            assert!((got - truth).abs() / truth < 0.011, "q{q}: {got} vs {truth}");
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
        assert!(a.quantile_us(0.25).unwrap() <= 1.0, "values under 1 µs land in the lowest bucket");
        assert_eq!(a.quantile_us(1.0), Some(1e18), "huge values keep their exact max");
        let p50 = a.quantile_us(0.5).unwrap();
        assert!(p50 <= 1.0, "two of four samples are 0: {p50}");
        let p75 = a.quantile_us(0.75).unwrap();
        assert!((p75 - 3000.0).abs() / 3000.0 < 0.011, "{p75}");
    }
}
