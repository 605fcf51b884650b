//! Protection of quiet, distant speech against the noise suppressor.
//!
//! RNNoise alone removes noise well from a near talker, but when the talker is
//! far away (speech 20-30 dB below a normal level, close to or under the room
//! noise) it also removes much of the speech, and intelligibility falls. The
//! pipeline does not change RNNoise; it controls how much of RNNoise's
//! attenuation reaches the output:
//!
//! - **Attenuation limit.** The output mixes the denoised signal with the
//!   time-aligned input, `y = d + m * (x - d)`, so no frequency is ever
//!   attenuated by more than `-20 log10(m)` dB. Where RNNoise wrongly removes
//!   speech, the speech survives at that level, with the noise around it no
//!   louder than in the input.
//! - **SNR-adaptive depth.** RNNoise is reliable when the talker is well above
//!   the noise and unreliable near or below it, so the limit follows the track's
//!   estimated speech-to-noise ratio: shallow (5 dB) at 0 dB SNR and below,
//!   deeper (15 dB) at 20 dB and above.
//! - **Deeper in pauses, VAD-aware.** When speech is unlikely the limit may go
//!   further (by `pause_extra_db`). "Speech likely" is RNNoise's voice detector
//!   *or* a level rise in the 300-3400 Hz band (which catches quiet speech the
//!   detector misses), held for a hangover; the limit deepens gradually after
//!   speech and relaxes at once at an onset, so soft word endings and onsets
//!   keep their level.
//! - **Pre-gain.** Quiet input is lifted towards a normal speech level before
//!   RNNoise (and the gain removed after): the model's features are absolute
//!   log energies and very quiet talkers fall outside what it was trained on.

use crate::BLOCK_SAMPLES;
use crate::meters::power_dbfs;
use crate::signal::{Biquad, MinTracker};

/// Parameters of the distant-talker protection. [`Protection::default`] is the
/// tuned setting; [`Protection::plain`] is RNNoise without protection, kept for
/// comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Protection {
    /// Level towards which quiet input is lifted before RNNoise, in dBFS RMS
    /// (measured over about two seconds); `None` disables the pre-gain.
    pub level_target_dbfs: Option<f32>,
    /// Largest pre-gain, in dB.
    pub max_pre_gain_db: f32,
    /// Largest attenuation while speech is likely, for a track whose speech is
    /// at most `low_snr_db` above the noise (`f32::INFINITY`: no limit).
    pub low_snr_limit_db: f32,
    /// Largest attenuation while speech is likely, for a track whose speech is
    /// at least `high_snr_db` above the noise; linear in between.
    pub high_snr_limit_db: f32,
    /// Estimated SNR (dB) at and below which the shallow limit applies.
    pub low_snr_db: f32,
    /// Estimated SNR (dB) at and above which the deep limit applies.
    pub high_snr_db: f32,
    /// Further attenuation allowed while speech is unlikely, in dB.
    pub pause_extra_db: f32,
    /// RNNoise voice probability at or above which a block counts as speech.
    pub speech_threshold: f32,
    /// A block also counts as speech when the 300-3400 Hz band has been this
    /// many dB above its own noise floor for 30 ms; `None` trusts RNNoise's
    /// voice detector alone.
    pub band_rise_db: Option<f32>,
    /// How long speech stays likely after the last speech block, in ms.
    pub hangover_ms: u32,
    /// Time for the limit to deepen by `pause_extra_db` after speech, in ms.
    pub release_ms: u32,
}

impl Default for Protection {
    fn default() -> Self {
        Self {
            level_target_dbfs: Some(-30.0),
            max_pre_gain_db: 24.0,
            low_snr_limit_db: 5.0,
            high_snr_limit_db: 15.0,
            low_snr_db: 0.0,
            high_snr_db: 20.0,
            pause_extra_db: 12.0,
            speech_threshold: 0.3,
            band_rise_db: Some(3.0),
            hangover_ms: 300,
            release_ms: 200,
        }
    }
}

impl Protection {
    /// Plain RNNoise: no pre-gain, no attenuation limit.
    pub fn plain() -> Self {
        Self {
            level_target_dbfs: None,
            max_pre_gain_db: 0.0,
            low_snr_limit_db: f32::INFINITY,
            high_snr_limit_db: f32::INFINITY,
            low_snr_db: 0.0,
            high_snr_db: 20.0,
            pause_extra_db: 0.0,
            speech_threshold: 0.5,
            band_rise_db: None,
            hangover_ms: 0,
            release_ms: 0,
        }
    }

    /// A fixed attenuation limit, the same in speech and pauses at any SNR.
    pub fn fixed_limit(limit_db: f32) -> Self {
        Self {
            low_snr_limit_db: limit_db,
            high_snr_limit_db: limit_db,
            pause_extra_db: 0.0,
            ..Self::default()
        }
    }

    /// The attenuation limit while speech is likely, at an estimated SNR.
    fn speech_limit_db(&self, snr_db: f32) -> f32 {
        let span = (self.high_snr_db - self.low_snr_db).max(1e-3);
        let t = ((snr_db - self.low_snr_db) / span).clamp(0.0, 1.0);
        self.low_snr_limit_db + t * (self.high_snr_limit_db - self.low_snr_limit_db)
    }
}

/// Amplitude factor of an attenuation limit: the share of the input kept.
fn limit_to_mix(limit_db: f32) -> f32 {
    if limit_db.is_finite() {
        10f32.powf(-limit_db.max(0.0) / 20.0)
    } else {
        0.0
    }
}

const BLOCK_MS: u32 = (BLOCK_SAMPLES as u32 * 1000) / crate::SAMPLE_RATE;

/// Blocks the speech band must stay above its floor to count (30 ms): longer
/// than a key click, shorter than a syllable.
const BAND_MIN_BLOCKS: u32 = 3;

/// Noise floor trackers' sub-window: 0.5 s (six of them make the window).
const FLOOR_SUB_WINDOW_BLOCKS: u32 = 50;

/// Smoothing of block powers before floor tracking (about 50 ms).
const FLOOR_SMOOTHING: f32 = 0.18;

/// Smoothing of the speech level (about 3 s).
const SPEECH_LEVEL_SMOOTHING: f32 = 0.0033;

/// Level-based speech evidence from the telephone band, independent of RNNoise.
#[derive(Debug, Clone)]
struct BandDetector {
    high_pass: Biquad,
    low_pass: Biquad,
    smoothed: Option<f32>,
    floor: MinTracker,
    above: u32,
}

impl BandDetector {
    fn new() -> Self {
        Self {
            high_pass: Biquad::high_pass(300.0),
            low_pass: Biquad::low_pass(3400.0),
            smoothed: None,
            floor: MinTracker::new(FLOOR_SUB_WINDOW_BLOCKS),
            above: 0,
        }
    }

    /// Whether the band has been `rise` (a power ratio) above its floor for long
    /// enough, after this block.
    fn update(&mut self, block: &[f32], rise: f32) -> bool {
        let mut power = 0.0;
        for &x in block {
            let y = self.low_pass.filter(self.high_pass.filter(x));
            power += y * y;
        }
        power /= block.len().max(1) as f32;
        // The floor follows a 50 ms average, so single quiet blocks do not pull
        // it under the noise.
        let smoothed = self.smoothed.get_or_insert(power);
        *smoothed += FLOOR_SMOOTHING * (power - *smoothed);
        let floor = self.floor.update(*smoothed);
        self.above = if power > floor * rise {
            self.above + 1
        } else {
            0
        };
        self.above >= BAND_MIN_BLOCKS
    }
}

/// The track's speech-to-noise ratio, from blocks judged speech and a noise floor.
#[derive(Debug, Clone)]
struct SnrEstimator {
    smoothed: Option<f32>,
    floor: MinTracker,
    speech: Option<f32>,
}

impl SnrEstimator {
    fn new() -> Self {
        Self {
            smoothed: None,
            floor: MinTracker::new(FLOOR_SUB_WINDOW_BLOCKS),
            speech: None,
        }
    }

    /// Updates with one block and returns the SNR in dB, or `None` before any
    /// speech has been seen.
    fn update(&mut self, power: f32, speech: bool) -> Option<f32> {
        let smoothed = self.smoothed.get_or_insert(power);
        *smoothed += FLOOR_SMOOTHING * (power - *smoothed);
        let floor = self.floor.update(*smoothed).max(1e-3);
        if speech {
            let level = self.speech.get_or_insert(power);
            *level += SPEECH_LEVEL_SMOOTHING * (power - *level);
        }
        self.speech
            .map(|speech| 10.0 * ((speech - floor).max(1e-3) / floor).log10())
    }
}

/// Per-block decisions of the protection, for one track.
#[derive(Debug, Clone)]
pub(crate) struct Protector {
    config: Protection,
    /// Blocks left in the speech hangover.
    hold: u32,
    /// Share of the input kept in the output (0: pure RNNoise).
    mix: f32,
    /// Smoothed input power for the pre-gain.
    level: Option<f32>,
    /// Linear pre-gain for the next block.
    pre_gain: f32,
    band: BandDetector,
    snr: SnrEstimator,
    snr_db: Option<f32>,
}

impl Protector {
    pub(crate) fn new(config: Protection) -> Self {
        Self {
            config,
            hold: 0,
            mix: limit_to_mix(config.low_snr_limit_db),
            level: None,
            pre_gain: 1.0,
            band: BandDetector::new(),
            snr: SnrEstimator::new(),
            snr_db: None,
        }
    }

    /// The linear gain to apply to the next block before RNNoise.
    pub(crate) fn pre_gain(&self) -> f32 {
        self.pre_gain
    }

    /// The SNR estimate the limit follows, in dB.
    pub(crate) fn snr_db(&self) -> Option<f32> {
        self.snr_db
    }

    /// The attenuation limit in force, in dB.
    pub(crate) fn limit_db(&self) -> f32 {
        if self.mix <= 0.0 {
            f32::INFINITY
        } else {
            -20.0 * self.mix.log10()
        }
    }

    /// Takes one block's voice probability, its mono samples and their power
    /// (16-bit units) and returns the share of input to keep in the output for
    /// that block.
    pub(crate) fn update(&mut self, vad: f32, block: &[f32], input_power: f32) -> f32 {
        let config = self.config;
        let band = match config.band_rise_db {
            Some(rise) => self.band.update(block, 10f32.powf(rise / 10.0)),
            None => false,
        };
        let speech_now = vad >= config.speech_threshold || band;
        if speech_now {
            self.hold = config.hangover_ms / BLOCK_MS + 1;
        } else {
            self.hold = self.hold.saturating_sub(1);
        }
        if let Some(snr) = self.snr.update(input_power, speech_now) {
            self.snr_db = Some(snr);
        }
        // Until speech has been heard, assume the worst case: a weak talker.
        let speech_limit = config.speech_limit_db(self.snr_db.unwrap_or(config.low_snr_db));
        let speech_mix = limit_to_mix(speech_limit);
        let pause_mix = limit_to_mix(speech_limit + config.pause_extra_db);
        self.mix = if self.hold > 0 {
            // Onsets relax the limit at once; a falling SNR estimate does too.
            if self.mix > speech_mix {
                speech_mix.max(self.mix * 0.99)
            } else {
                speech_mix
            }
        } else {
            // Deepen towards the pause limit in equal dB steps over release_ms.
            let steps = (config.release_ms / BLOCK_MS).max(1) as f32;
            let step = limit_to_mix(config.pause_extra_db / steps);
            (self.mix * step).min(speech_mix).max(pause_mix)
        };

        if let Some(target_dbfs) = config.level_target_dbfs {
            let level = self.level.get_or_insert(input_power);
            // Two seconds of smoothing.
            *level += (input_power - *level) / 200.0;
            let gain_db = (target_dbfs - power_dbfs(*level)).clamp(0.0, config.max_pre_gain_db);
            let target = 10f32.powf(gain_db / 20.0);
            // Glide so the gain never steps within RNNoise's 20 ms window.
            self.pre_gain += (target - self.pre_gain) * 0.05;
        }
        self.mix
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mean power in 16-bit units of a signal at `dbfs`.
    fn power(dbfs: f32) -> f32 {
        (32768.0f32 * 32768.0) * 10f32.powf(dbfs / 10.0)
    }

    #[test]
    fn limit_follows_snr_speech_and_pauses() {
        let mut protector = Protector::new(Protection::default());
        // Before speech: the shallow limit.
        protector.update(0.0, &[], power(-60.0));
        assert!(protector.limit_db() < 6.0, "{}", protector.limit_db());
        // Alternate 1 s of speech at -26 dBFS and 1 s of noise at -66 dBFS: a
        // clean talker, so the limit goes to the deep end.
        for i in 0..600 {
            let speech = (i / 100) % 2 == 0;
            let p = if speech { power(-26.0) } else { power(-66.0) };
            protector.update(if speech { 0.9 } else { 0.0 }, &[], p);
        }
        // 600 blocks end in a noise second: pause limit, 15 + 12 dB.
        assert!(
            (protector.limit_db() - 27.0).abs() < 0.1,
            "{}",
            protector.limit_db()
        );
        // An onset relaxes it in one block.
        protector.update(0.9, &[], power(-26.0));
        assert!(
            (protector.limit_db() - 15.0).abs() < 0.1,
            "{}",
            protector.limit_db()
        );
    }

    #[test]
    fn low_snr_keeps_the_shallow_limit() {
        let mut protector = Protector::new(Protection::default());
        for _ in 0..600 {
            protector.update(0.9, &[], power(-40.0));
        }
        // Speech no louder than its own floor: the estimate is low, limit 5 dB.
        assert!(
            (protector.limit_db() - 5.0).abs() < 0.1,
            "{}",
            protector.limit_db()
        );
    }

    #[test]
    fn band_rise_counts_as_speech_without_vad() {
        let config = Protection {
            band_rise_db: Some(3.0),
            ..Protection::default()
        };
        let mut protector = Protector::new(config);
        let tone = |amplitude: f32| -> Vec<f32> {
            (0..BLOCK_SAMPLES)
                .map(|i| amplitude * (i as f32 * 0.13).sin())
                .collect()
        };
        for _ in 0..100 {
            protector.update(0.0, &tone(10.0), power(-70.0));
        }
        let quiet_limit = protector.limit_db();
        for _ in 0..5 {
            protector.update(0.0, &tone(100.0), power(-50.0));
        }
        // Quiet: no speech seen, so the shallow limit plus the pause allowance.
        assert!((quiet_limit - 17.0).abs() < 0.1, "{quiet_limit}");
        // The 20 dB rise is speech at 20 dB SNR: the deep speech limit, 15 dB.
        assert!(
            (protector.limit_db() - 15.0).abs() < 0.1,
            "{}",
            protector.limit_db()
        );
    }

    #[test]
    fn plain_has_no_limit() {
        let mut protector = Protector::new(Protection::plain());
        assert_eq!(protector.update(0.9, &[], 1.0e6), 0.0);
        assert_eq!(protector.update(0.0, &[], 1.0e6), 0.0);
        assert_eq!(protector.pre_gain(), 1.0);
    }

    #[test]
    fn pre_gain_lifts_quiet_input_only() {
        let mut quiet = Protector::new(Protection::default());
        let mut loud = Protector::new(Protection::default());
        for _ in 0..1000 {
            quiet.update(0.0, &[], power(-56.0));
            loud.update(0.0, &[], power(-20.0));
        }
        let quiet_db = 20.0 * quiet.pre_gain().log10();
        assert!((quiet_db - 24.0).abs() < 0.1, "{quiet_db}");
        assert_eq!(loud.pre_gain(), 1.0);
    }
}
