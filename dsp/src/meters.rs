//! Audio quality meters per published track, as plain numbers and counters.
//!
//! Everything is measured on decoded audio in 10 ms blocks, once before
//! suppression (`input`) and once after (`output`, what is re-encoded). Gauges
//! are smoothed over about a second so an exporter can sample them at any rate;
//! counters only grow, so an exporter can turn them into rates. Levels are in
//! dB relative to full scale; silence reads [`SILENCE_DBFS`] rather than minus
//! infinity so every value stays a finite number.

use std::time::Duration;

use crate::BLOCK_SAMPLES;
use crate::signal::MinTracker;

/// The level reported for digital silence.
pub const SILENCE_DBFS: f32 = -120.0;

/// A sample at or above this fraction of full scale (-0.5 dBFS) counts as
/// clipped. The meters see decoded audio: Opus rebuilds a clipped waveform's
/// flat tops with ripple, so the source's exact clipped fraction cannot be
/// recovered, and a threshold right at full scale would miss most of it. Half a
/// dB below catches about half of a hard-clipped sine's flat tops, while a clean
/// sine peaking at -1 dBFS reads well under 1 %.
pub const CLIP_LEVEL: f32 = 0.944;

/// Full scale in the sample unit used inside the pipeline (16-bit range, which is
/// what RNNoise expects).
pub(crate) const FULL_SCALE: f32 = 32768.0;

/// Level, clipping and noise of one signal (before or after suppression).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SignalStats {
    /// RMS level, smoothed over about one second.
    pub rms_dbfs: f32,
    /// Highest absolute sample over the last one to two seconds.
    pub peak_dbfs: f32,
    /// Estimated background noise level: the minimum of the 50 ms block power
    /// over the last three seconds (falls at once, rises within three seconds).
    pub noise_floor_dbfs: f32,
    /// Level of the blocks judged to be speech, smoothed over a few seconds.
    pub speech_level_dbfs: f32,
    /// Speech level over noise floor; 0 until speech has been seen.
    pub snr_db: f32,
    /// Samples measured (all channels).
    pub samples: u64,
    /// Samples at or above [`CLIP_LEVEL`] of full scale.
    pub clipped_samples: u64,
}

impl SignalStats {
    /// Fraction of all measured samples that were clipped.
    pub fn clipping_ratio(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            self.clipped_samples as f64 / self.samples as f64
        }
    }
}

impl Default for SignalStats {
    fn default() -> Self {
        Self {
            rms_dbfs: SILENCE_DBFS,
            peak_dbfs: SILENCE_DBFS,
            noise_floor_dbfs: SILENCE_DBFS,
            speech_level_dbfs: SILENCE_DBFS,
            snr_db: 0.0,
            samples: 0,
            clipped_samples: 0,
        }
    }
}

/// What RNNoise's voice activity detector says about the input.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpeechStats {
    /// Speech probability, smoothed over about 100 ms.
    pub probability: f32,
    /// Fraction of scored blocks that were speech (probability at or above 0.5).
    pub ratio: f32,
    /// 10 ms blocks scored by the detector. Blocks are not scored while
    /// suppression is off, since RNNoise does not run then.
    pub blocks: u64,
    /// Scored blocks judged to be speech.
    pub speech_blocks: u64,
}

/// What the suppressor did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SuppressionStats {
    /// Whether suppression is on (it fades in and out over a few blocks).
    pub enabled: bool,
    /// Input power over output power, smoothed over about one second.
    pub attenuation_db: f32,
    /// The attenuation limit in force for the last block: low while speech is
    /// likely, high in clear noise (see [`Protection`](crate::Protection)).
    pub limit_db: f32,
    /// Gain applied before RNNoise (and removed after) to lift quiet talkers into
    /// the level range the model was trained on.
    pub pre_gain_db: f32,
    /// The speech-to-noise estimate the limit follows (0 until speech is heard).
    pub snr_db: f32,
}

/// Packet and frame counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketStats {
    /// Packets given to `process`.
    pub received: u64,
    /// Packets written (one per `process` or `process_lost` call).
    pub sent: u64,
    /// Packets reported lost through `process_lost`.
    pub lost: u64,
    /// Lost packets rebuilt from in-band FEC of the next packet.
    pub fec_recovered: u64,
    /// Packets replaced by packet loss concealment (loss without FEC, or a
    /// decode error).
    pub concealed: u64,
    /// DTX packets received.
    pub dtx: u64,
    /// Inputs that could not be decoded; the sum of the kinds below.
    pub decode_errors: u64,
    /// Empty payloads.
    pub empty: u64,
    /// Payloads over [`MAX_PACKET_BYTES`](crate::packet::MAX_PACKET_BYTES).
    pub oversize: u64,
    /// Payloads with broken framing, or that libopus rejected.
    pub corrupt: u64,
    /// Packets whose channel count differs from the negotiated one. They are
    /// still decoded (libopus down- or up-mixes) but counted as errors, since
    /// the sender is not doing what it negotiated.
    pub channel_mismatch: u64,
    /// Encoder failures or durations the encoder cannot take; an empty packet
    /// of the right duration was sent instead.
    pub encode_errors: u64,
    /// Output packets that carried no audio (DTX from our encoder or passed on).
    pub dtx_sent: u64,
}

/// Processing time, as measured and reported by the caller.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessingStats {
    /// Packets timed.
    pub packets: u64,
    /// Audio covered by the timed packets, in samples per channel.
    pub audio_samples: u64,
    /// Sum of the reported times.
    pub total: Duration,
    /// Time of the last packet.
    pub last: Duration,
    /// Longest time of any packet.
    pub max: Duration,
}

impl ProcessingStats {
    /// Mean processing time per 20 ms of audio, in microseconds.
    pub fn micros_per_20ms(&self) -> f64 {
        if self.audio_samples == 0 {
            return 0.0;
        }
        let frames = self.audio_samples as f64 / (crate::SAMPLE_RATE as f64 / 50.0);
        self.total.as_secs_f64() * 1e6 / frames
    }
}

/// All meters of one published track.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TrackMeters {
    /// Decoded audio before suppression.
    pub input: SignalStats,
    /// Audio after suppression, as given to the encoder.
    pub output: SignalStats,
    /// Voice activity of the input.
    pub speech: SpeechStats,
    /// Suppression state and effect.
    pub suppression: SuppressionStats,
    /// Packet counters.
    pub packets: PacketStats,
    /// Processing time reported by the caller.
    pub processing: ProcessingStats,
}

/// Smoothing constant for an exponential average with time constant `tau`
/// seconds, updated once per block.
fn ema_alpha(tau: f32) -> f32 {
    1.0 - (-(BLOCK_SAMPLES as f32 / crate::SAMPLE_RATE as f32) / tau).exp()
}

/// Power (mean square in full-scale units) to dBFS.
pub(crate) fn power_dbfs(power: f32) -> f32 {
    let full = FULL_SCALE * FULL_SCALE;
    if power <= 0.0 {
        SILENCE_DBFS
    } else {
        (10.0 * (power / full).log10()).max(SILENCE_DBFS)
    }
}

/// Blocks in one peak-hold window (one second).
const PEAK_WINDOW_BLOCKS: u32 = 100;
/// Noise floor tracking sub-window: half a second (six make the window).
const FLOOR_SUB_WINDOW_BLOCKS: u32 = 50;

/// Keeps the running state behind one [`SignalStats`].
#[derive(Debug, Clone)]
pub(crate) struct SignalMeter {
    pub(crate) stats: SignalStats,
    power: f32,
    short_power: f32,
    floor: MinTracker,
    speech_power: Option<f32>,
    peak_now: f32,
    peak_before: f32,
    window_blocks: u32,
}

impl Default for SignalMeter {
    fn default() -> Self {
        Self {
            stats: SignalStats::default(),
            power: 0.0,
            short_power: 0.0,
            floor: MinTracker::new(FLOOR_SUB_WINDOW_BLOCKS),
            speech_power: None,
            peak_now: 0.0,
            peak_before: 0.0,
            window_blocks: 0,
        }
    }
}

impl SignalMeter {
    /// Measures one block of samples (any channel layout) in 16-bit units.
    pub(crate) fn update(&mut self, samples: &[f32], speech: bool) {
        if samples.is_empty() {
            return;
        }
        let clip = CLIP_LEVEL * FULL_SCALE;
        let (mut sum, mut peak, mut clipped) = (0.0f32, 0.0f32, 0u64);
        for &x in samples {
            sum += x * x;
            peak = peak.max(x.abs());
            clipped += u64::from(x.abs() >= clip);
        }
        let block_power = sum / samples.len() as f32;
        self.update_levels(block_power, peak, speech);
        self.stats.samples += samples.len() as u64;
        self.stats.clipped_samples += clipped;
    }

    fn update_levels(&mut self, block_power: f32, peak: f32, speech: bool) {
        if self.stats.samples == 0 {
            // Start the averages at the first block rather than at silence.
            self.power = block_power;
            self.short_power = block_power;
        }
        self.power += ema_alpha(1.0) * (block_power - self.power);
        // The floor follows a 50 ms average so one quiet block among noisy ones
        // does not drag it down.
        self.short_power += ema_alpha(0.05) * (block_power - self.short_power);
        let floor = self.floor.update(self.short_power);
        if speech {
            let speech_power = self.speech_power.unwrap_or(block_power);
            self.speech_power = Some(speech_power + ema_alpha(3.0) * (block_power - speech_power));
        }
        self.peak_now = self.peak_now.max(peak);
        self.window_blocks += 1;
        if self.window_blocks == PEAK_WINDOW_BLOCKS {
            self.peak_before = self.peak_now;
            self.peak_now = 0.0;
            self.window_blocks = 0;
        }

        let stats = &mut self.stats;
        stats.rms_dbfs = power_dbfs(self.power);
        let peak = self.peak_now.max(self.peak_before);
        stats.peak_dbfs = power_dbfs(peak * peak);
        stats.noise_floor_dbfs = power_dbfs(floor);
        if let Some(speech_power) = self.speech_power {
            stats.speech_level_dbfs = power_dbfs(speech_power);
            let floor = floor.max(1e-3);
            stats.snr_db =
                (10.0 * ((speech_power - floor).max(1e-3) / floor).log10()).clamp(-30.0, 120.0);
        }
    }
}

/// Keeps the running state behind [`SpeechStats`].
#[derive(Debug, Clone, Default)]
pub(crate) struct SpeechMeter {
    pub(crate) stats: SpeechStats,
}

impl SpeechMeter {
    pub(crate) fn update(&mut self, probability: f32) {
        let stats = &mut self.stats;
        stats.probability += ema_alpha(0.1) * (probability - stats.probability);
        stats.blocks += 1;
        stats.speech_blocks += u64::from(probability >= 0.5);
        stats.ratio = stats.speech_blocks as f32 / stats.blocks as f32;
    }
}

/// Keeps the running state behind the attenuation gauge.
#[derive(Debug, Clone, Default)]
pub(crate) struct AttenuationMeter {
    input_power: f32,
    output_power: f32,
}

impl AttenuationMeter {
    /// Returns the smoothed attenuation in dB after one block.
    pub(crate) fn update(&mut self, input_power: f32, output_power: f32) -> f32 {
        let alpha = ema_alpha(1.0);
        self.input_power += alpha * (input_power - self.input_power);
        self.output_power += alpha * (output_power - self.output_power);
        if self.input_power <= 1e-3 {
            return 0.0;
        }
        10.0 * (self.input_power / self.output_power.max(1e-6)).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(amplitude_dbfs: f32, samples: usize) -> Vec<f32> {
        let amplitude = FULL_SCALE * 10f32.powf(amplitude_dbfs / 20.0);
        (0..samples)
            .map(|i| amplitude * (i as f32 * 2.0 * std::f32::consts::PI * 1000.0 / 48_000.0).sin())
            .collect()
    }

    #[test]
    fn sine_level_and_peak() {
        let mut meter = SignalMeter::default();
        let signal = tone(-20.0, 48_000 * 5);
        for block in signal.chunks(BLOCK_SAMPLES) {
            meter.update(block, false);
        }
        // A sine's RMS is 3 dB below its peak.
        assert!(
            (meter.stats.peak_dbfs + 20.0).abs() < 0.05,
            "{:?}",
            meter.stats
        );
        assert!(
            (meter.stats.rms_dbfs + 23.01).abs() < 0.1,
            "{:?}",
            meter.stats
        );
        assert_eq!(meter.stats.clipped_samples, 0);
    }

    #[test]
    fn counts_clipped_samples_exactly() {
        let mut meter = SignalMeter::default();
        let mut block = vec![0.5 * FULL_SCALE; BLOCK_SAMPLES];
        block[..48].fill(FULL_SCALE);
        block[48..60].fill(-FULL_SCALE);
        block[60] = 0.943 * FULL_SCALE;
        meter.update(&block, false);
        assert_eq!(meter.stats.clipped_samples, 60);
        assert!((meter.stats.clipping_ratio() - 0.125).abs() < 1e-9);
    }

    #[test]
    fn noise_floor_tracks_pauses_and_snr_follows() {
        let mut meter = SignalMeter::default();
        let loud = tone(-20.0, BLOCK_SAMPLES);
        let quiet = tone(-60.0, BLOCK_SAMPLES);
        for i in 0..1000 {
            // One second of "speech" then one second of "noise", repeated.
            if (i / 100) % 2 == 0 {
                meter.update(&loud, true);
            } else {
                meter.update(&quiet, false);
            }
        }
        let stats = meter.stats;
        assert!((stats.noise_floor_dbfs + 63.0).abs() < 1.5, "{stats:?}");
        assert!((stats.speech_level_dbfs + 23.0).abs() < 1.0, "{stats:?}");
        assert!((stats.snr_db - 40.0).abs() < 2.0, "{stats:?}");
    }

    #[test]
    fn silence_reads_as_floor_value() {
        let mut meter = SignalMeter::default();
        meter.update(&[0.0; BLOCK_SAMPLES], false);
        assert_eq!(meter.stats.rms_dbfs, SILENCE_DBFS);
        assert_eq!(meter.stats.peak_dbfs, SILENCE_DBFS);
    }

    #[test]
    fn speech_ratio_counts_blocks() {
        let mut meter = SpeechMeter::default();
        for p in [0.9, 0.1, 0.6, 0.2] {
            meter.update(p);
        }
        assert_eq!((meter.stats.blocks, meter.stats.speech_blocks), (4, 2));
        assert!((meter.stats.ratio - 0.5).abs() < 1e-6);
    }
}
