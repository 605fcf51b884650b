//! A plain fixed-bucket histogram: what cores record, and what a driver
//! turns into a Prometheus histogram at scrape time.

/// Observations counted into fixed buckets (upper bounds, ascending; an
/// implicit last bucket is +Inf).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Upper bounds, ascending.
    pub bounds: &'static [f64],
    /// Observations per bucket (not cumulative), `bounds.len() + 1` entries.
    pub counts: Vec<u64>,
    /// Sum of observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds`.
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0, count: 0 }
    }

    /// Records one observation. NaN is ignored.
    pub fn observe(&mut self, value: f64) {
        if value.is_nan() {
            return;
        }
        let bucket = self.bounds.iter().position(|b| value <= *b).unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum += value;
        self.count += 1;
    }

    /// Adds another histogram over the same bounds (from another worker).
    pub fn merge(&mut self, other: &Histogram) {
        debug_assert_eq!(self.bounds, other.bounds);
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
        self.count += other.count;
    }
}

/// Bucket bounds used across the media plane.
pub mod bounds {
    /// Loss fractions.
    pub const LOSS_RATIO: &[f64] = &[0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5];
    /// Interarrival jitter, seconds.
    pub const JITTER_SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16];
    /// Round-trip times, seconds.
    pub const RTT_SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
    /// Setup latencies (join to first audio), seconds.
    pub const LATENCY_SECONDS: &[f64] = &[0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
    /// Audio levels, dBFS.
    pub const LEVEL_DBFS: &[f64] = &[-90.0, -70.0, -60.0, -50.0, -40.0, -30.0, -20.0, -10.0, -3.0, 0.0];
    /// Signal-to-noise ratios and attenuation, dB.
    pub const DECIBELS: &[f64] = &[0.0, 3.0, 6.0, 10.0, 15.0, 20.0, 30.0, 40.0];
    /// Ratios in 0..=1.
    pub const RATIO: &[f64] = &[0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0];
    /// DSP processing time per 20 ms frame, seconds.
    pub const PROCESSING_SECONDS: &[f64] = &[0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.001, 0.002, 0.005, 0.02];
    /// Speakers talking at once in a room.
    pub const SPEAKERS: &[f64] = &[0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 10.0];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket_and_merge() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        h.observe(0.5);
        h.observe(2.0);
        h.observe(9.0);
        h.observe(f64::NAN);
        assert_eq!(h.counts, vec![1, 1, 1]);
        let mut total = Histogram::new(&[1.0, 2.0]);
        total.merge(&h);
        total.merge(&h);
        assert_eq!((total.counts.clone(), total.count, total.sum), (vec![2, 2, 2], 6, 23.0));
    }
}
