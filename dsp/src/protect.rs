//! Protection of quiet, distant speech against the noise suppressor.
//!
//! RNNoise alone removes noise well from a near talker, but when the talker is
//! far away (speech 20-30 dB below a normal level, close to or under the room
//! noise) it also removes much of the speech, and intelligibility falls. The
//! pipeline does not change RNNoise; it controls how much of RNNoise's
//! attenuation reaches the output:
//!
//! - **Pre-gain.** Quiet input is lifted towards a normal speech level before
//!   RNNoise (and the gain removed after), because the model's features are
//!   absolute log energies and quiet talkers fall outside what it was trained on.
//! - **Attenuation limit.** The output mixes the denoised signal with the
//!   time-aligned input, `y = d + m * (x - d)`, so no bin is ever attenuated by
//!   more than `-20 log10(m)` dB. The limit is shallow while speech is likely and
//!   deep in clear noise.
//! - **VAD-aware smoothing.** "Speech likely" follows RNNoise's voice activity
//!   with a hangover, and the limit deepens slowly after speech but relaxes at
//!   once at a speech onset, so word endings and soft consonants keep their level.

use crate::BLOCK_SAMPLES;

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
    /// Largest attenuation while speech is likely, in dB.
    pub speech_limit_db: f32,
    /// Largest attenuation when speech is unlikely, in dB (`f32::INFINITY`: none).
    pub noise_limit_db: f32,
    /// RNNoise voice probability at or above which a block counts as speech.
    pub speech_threshold: f32,
    /// How long speech stays "likely" after the last speech block, in ms.
    pub hangover_ms: u32,
    /// Time for the limit to move from the speech limit to the noise limit, in ms.
    pub release_ms: u32,
}

impl Default for Protection {
    fn default() -> Self {
        Self {
            level_target_dbfs: Some(-30.0),
            max_pre_gain_db: 24.0,
            speech_limit_db: 6.0,
            noise_limit_db: 24.0,
            speech_threshold: 0.3,
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
            speech_limit_db: f32::INFINITY,
            noise_limit_db: f32::INFINITY,
            speech_threshold: 0.5,
            hangover_ms: 0,
            release_ms: 0,
        }
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
}

impl Protector {
    pub(crate) fn new(config: Protection) -> Self {
        Self { config, hold: 0, mix: limit_to_mix(config.speech_limit_db), level: None, pre_gain: 1.0 }
    }

    /// The linear gain to apply to the next block before RNNoise.
    pub(crate) fn pre_gain(&self) -> f32 {
        self.pre_gain
    }

    /// The attenuation limit in force, in dB.
    pub(crate) fn limit_db(&self) -> f32 {
        if self.mix <= 0.0 { f32::INFINITY } else { -20.0 * self.mix.log10() }
    }

    /// Takes one block's voice probability and input power (16-bit units) and
    /// returns the share of input to keep in the output for that block.
    pub(crate) fn update(&mut self, vad: f32, input_power: f32) -> f32 {
        let config = &self.config;
        if vad >= config.speech_threshold {
            self.hold = config.hangover_ms / BLOCK_MS + 1;
        } else {
            self.hold = self.hold.saturating_sub(1);
        }
        let speech_mix = limit_to_mix(config.speech_limit_db);
        let noise_mix = limit_to_mix(config.noise_limit_db);
        self.mix = if self.hold > 0 {
            // Onsets relax the limit at once.
            self.mix.max(speech_mix)
        } else {
            // Deepen towards the noise limit in equal dB steps over release_ms.
            let steps = (config.release_ms / BLOCK_MS).max(1) as f32;
            if noise_mix <= 0.0 {
                // An unlimited noise limit: walk 30 dB then drop to zero.
                let step = limit_to_mix(30.0 / steps);
                let next = self.mix * step;
                if next < speech_mix * limit_to_mix(30.0) { 0.0 } else { next }
            } else if speech_mix > 0.0 {
                let step = (noise_mix / speech_mix).powf(1.0 / steps);
                (self.mix * step).max(noise_mix)
            } else {
                noise_mix
            }
        };

        if let Some(target_dbfs) = config.level_target_dbfs {
            let tau_blocks = 200.0; // two seconds
            let level = self.level.get_or_insert(input_power);
            *level += (input_power - *level) / tau_blocks;
            let level_dbfs = crate::meters::power_dbfs(*level);
            let gain_db = (target_dbfs - level_dbfs).clamp(0.0, config.max_pre_gain_db);
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

    #[test]
    fn limit_is_shallow_during_speech_and_deepens_after() {
        let mut protector = Protector::new(Protection::default());
        for _ in 0..20 {
            protector.update(0.9, 1.0e6);
        }
        assert!((protector.limit_db() - 6.0).abs() < 0.01);
        // Within the hangover the limit holds.
        for _ in 0..20 {
            protector.update(0.0, 1.0e3);
        }
        assert!((protector.limit_db() - 6.0).abs() < 0.01);
        for _ in 0..100 {
            protector.update(0.0, 1.0e3);
        }
        assert!((protector.limit_db() - 24.0).abs() < 0.01);
        // An onset relaxes it in one block.
        protector.update(0.8, 1.0e6);
        assert!((protector.limit_db() - 6.0).abs() < 0.01);
    }

    #[test]
    fn plain_has_no_limit() {
        let mut protector = Protector::new(Protection::plain());
        assert_eq!(protector.update(0.9, 1.0e6), 0.0);
        assert_eq!(protector.update(0.0, 1.0e6), 0.0);
        assert_eq!(protector.pre_gain(), 1.0);
    }

    #[test]
    fn pre_gain_lifts_quiet_input_only() {
        let mut quiet = Protector::new(Protection::default());
        let mut loud = Protector::new(Protection::default());
        // -56 dBFS and -20 dBFS mean power in 16-bit units.
        let power = |dbfs: f32| (32768.0f32 * 32768.0) * 10f32.powf(dbfs / 10.0);
        for _ in 0..1000 {
            quiet.update(0.0, power(-56.0));
            loud.update(0.0, power(-20.0));
        }
        let quiet_db = 20.0 * quiet.pre_gain().log10();
        assert!((quiet_db - 24.0).abs() < 0.1, "{quiet_db}");
        assert_eq!(loud.pre_gain(), 1.0);
    }
}
