//! Small signal-processing parts shared by the meters and the protection.

/// A second-order IIR filter (transposed direct form II), designed with the
/// usual bilinear-transform formulas for Butterworth-like sections (Q = 0.707).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Biquad {
    b: [f32; 3],
    a: [f32; 2],
    state: [f32; 2],
}

impl Biquad {
    /// A high-pass section at `cutoff` Hz.
    pub(crate) fn high_pass(cutoff: f32) -> Self {
        let (cos, alpha) = Self::prewarp(cutoff);
        Self::normalized(
            [(1.0 + cos) / 2.0, -(1.0 + cos), (1.0 + cos) / 2.0],
            cos,
            alpha,
        )
    }

    /// A low-pass section at `cutoff` Hz.
    pub(crate) fn low_pass(cutoff: f32) -> Self {
        let (cos, alpha) = Self::prewarp(cutoff);
        Self::normalized(
            [(1.0 - cos) / 2.0, 1.0 - cos, (1.0 - cos) / 2.0],
            cos,
            alpha,
        )
    }

    fn prewarp(cutoff: f32) -> (f32, f32) {
        let w0 = std::f32::consts::TAU * cutoff / crate::SAMPLE_RATE as f32;
        (w0.cos(), w0.sin() / (2.0 * std::f32::consts::FRAC_1_SQRT_2))
    }

    fn normalized(b: [f32; 3], cos: f32, alpha: f32) -> Self {
        let a0 = 1.0 + alpha;
        Self {
            b: b.map(|x| x / a0),
            a: [-2.0 * cos / a0, (1.0 - alpha) / a0],
            state: [0.0; 2],
        }
    }

    pub(crate) fn filter(&mut self, x: f32) -> f32 {
        let y = self.b[0] * x + self.state[0];
        self.state[0] = self.b[1] * x - self.a[0] * y + self.state[1];
        self.state[1] = self.b[2] * x - self.a[1] * y;
        y
    }
}

/// Sub-windows kept by [`MinTracker`].
const MIN_WINDOWS: usize = 6;

/// Minimum of a value over a sliding window of `MIN_WINDOWS` sub-windows
/// (minimum statistics): follows a falling floor at once and a rising one within
/// one window length.
#[derive(Debug, Clone)]
pub(crate) struct MinTracker {
    sub_len: u32,
    count: u32,
    current: f32,
    mins: [f32; MIN_WINDOWS],
    next: usize,
}

impl MinTracker {
    /// A tracker over `MIN_WINDOWS * sub_len` updates.
    pub(crate) fn new(sub_len: u32) -> Self {
        Self {
            sub_len,
            count: 0,
            current: f32::INFINITY,
            mins: [f32::INFINITY; MIN_WINDOWS],
            next: 0,
        }
    }

    /// Adds one value and returns the minimum over the window.
    pub(crate) fn update(&mut self, value: f32) -> f32 {
        self.current = self.current.min(value);
        self.count += 1;
        let floor = self.mins.iter().fold(self.current, |a, &b| a.min(b));
        if self.count == self.sub_len {
            self.mins[self.next] = self.current;
            self.next = (self.next + 1) % MIN_WINDOWS;
            self.current = f32::INFINITY;
            self.count = 0;
        }
        floor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gain_at(mut filter: Biquad, freq: f32) -> f32 {
        let mut peak = 0.0f32;
        for i in 0..48_000 {
            let y = filter.filter((std::f32::consts::TAU * freq * i as f32 / 48_000.0).sin());
            if i > 24_000 {
                peak = peak.max(y.abs());
            }
        }
        20.0 * peak.log10()
    }

    #[test]
    fn filters_are_3_db_down_at_cutoff() {
        assert!((gain_at(Biquad::high_pass(300.0), 300.0) + 3.0).abs() < 0.2);
        assert!(gain_at(Biquad::high_pass(300.0), 3000.0).abs() < 0.1);
        assert!((gain_at(Biquad::low_pass(3400.0), 3400.0) + 3.0).abs() < 0.2);
        assert!(gain_at(Biquad::low_pass(3400.0), 12_000.0) < -20.0);
    }

    #[test]
    fn min_tracker_forgets_after_its_window() {
        let mut tracker = MinTracker::new(10);
        assert_eq!(tracker.update(1.0), 1.0);
        for _ in 0..10 {
            tracker.update(5.0);
        }
        // The 1.0 is still within the window...
        assert_eq!(tracker.update(5.0), 1.0);
        for _ in 0..60 {
            tracker.update(5.0);
        }
        // ...and gone once six sub-windows have passed.
        assert_eq!(tracker.update(5.0), 5.0);
    }
}
