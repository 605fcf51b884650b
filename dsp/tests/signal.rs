//! What the pipeline does to simple signals: silence, a steady tone, clipping.

mod common;

use common::*;
use fleetcall_dsp::{EncoderMode, Pipeline, PipelineConfig};

/// Sends `signal` through sender -> pipeline -> receiver; returns the received
/// audio and the pipeline.
fn through(config: PipelineConfig, signal: &[f32]) -> (Vec<f32>, Pipeline) {
    let sender = sender(config.channels, false);
    let mut pipeline = Pipeline::new(config).unwrap();
    let mut receiver = Receiver::new(config.channels);
    let mut out = Vec::new();
    for packet in encode(&sender, signal, FRAME, usize::from(config.channels)) {
        pipeline.process(&packet, &mut out).unwrap();
        receiver.receive(&out);
    }
    (receiver.audio, pipeline)
}

fn configs() -> [PipelineConfig; 2] {
    [
        PipelineConfig::default(),
        PipelineConfig {
            fec: false,
            encoder_mode: EncoderMode::LowDelay,
            ..PipelineConfig::default()
        },
    ]
}

#[test]
fn silence_in_silence_out() {
    for config in configs() {
        let (audio, pipeline) = through(config, &vec![0.0; RATE * 2]);
        let peak = audio.iter().fold(0.0f32, |a, x| a.max(x.abs()));
        assert!(peak < 1e-4, "{:?}: peak {peak}", config.encoder_mode);
        let meters = pipeline.meters();
        assert_eq!(meters.output.clipped_samples, 0);
        assert!(meters.input.rms_dbfs < -90.0, "{:?}", meters.input);
    }
}

/// A steady tone is not noise to a speech model: RNNoise passes a tone that
/// starts on its own (no speech, no noise around it). If a build or a model
/// started removing it, this test would fail and the protection would still
/// cap the loss (the tone's track has no measurable SNR, so the shallow limit
/// plus the pause allowance applies: at most 17 dB); alarms and test tones
/// played into a room would then reach listeners that much quieter.
#[test]
fn tone_at_minus_20_dbfs_passes_within_1_db() {
    for config in configs() {
        let input = sine(1000.0, -20.0, 3.0);
        let (audio, pipeline) = through(config, &input);
        // Compare the last second, long after every fade and smoothing.
        let tail = |x: &[f32]| rms_dbfs(&x[x.len() - RATE..]);
        let change = tail(&audio) - tail(&input);
        assert!(
            change.abs() < 1.0,
            "{:?}: tone changed by {change:.2} dB",
            config.encoder_mode
        );
        let meters = pipeline.meters();
        assert!(
            (meters.input.peak_dbfs + 20.0).abs() < 1.0,
            "{:?}",
            meters.input
        );
        assert_eq!(meters.input.clipped_samples, 0);
    }
}

#[test]
fn clipping_is_counted() {
    // A 440 Hz sine driven 6 dB over full scale and clipped: |2 sin| >= 1 for
    // two thirds of every period.
    let clipped: Vec<f32> = sine(440.0, 6.0, 2.0)
        .into_iter()
        .map(|x| x.clamp(-1.0, 1.0))
        .collect();
    let (_, pipeline) = through(PipelineConfig::default(), &clipped);
    let ratio = pipeline.meters().input.clipping_ratio();
    // Opus rebuilds the flat tops with ripple, so only part of them comes back
    // above the threshold (see `CLIP_LEVEL`).
    assert!((0.2..=0.5).contains(&ratio), "clipping ratio {ratio}");

    // Loud but not clipped: almost nothing counts.
    let (_, loud) = through(PipelineConfig::default(), &sine(440.0, -1.0, 2.0));
    let ratio = loud.meters().input.clipping_ratio();
    assert!(
        ratio < 0.01,
        "clipping ratio of a clean -1 dBFS sine {ratio}"
    );
    let (_, clean) = through(PipelineConfig::default(), &sine(440.0, -20.0, 2.0));
    assert_eq!(clean.meters().input.clipped_samples, 0);
}

/// Switching suppression mid-call fades instead of stepping: no block jumps
/// straight from the suppressed level to the full level (a click), and the
/// level never overshoots the unsuppressed one.
#[test]
fn switching_suppression_fades() {
    let mut rng = Rng(7);
    let mut pink = 0.0f32;
    // Steady noise at about -30 dBFS, which RNNoise removes.
    let noise: Vec<f32> = (0..RATE * 4)
        .map(|_| {
            pink = 0.95 * pink + 0.05 * rng.uniform();
            pink * 0.25
        })
        .collect();
    let sender = sender(1, false);
    let mut pipeline = Pipeline::new(PipelineConfig::default()).unwrap();
    let mut receiver = Receiver::new(1);
    let mut out = Vec::new();
    for (i, packet) in encode(&sender, &noise, FRAME, 1).iter().enumerate() {
        match i {
            100 => pipeline.set_suppression(false),
            150 => pipeline.set_suppression(true),
            _ => {}
        }
        pipeline.process(packet, &mut out).unwrap();
        receiver.receive(&out);
    }
    let blocks: Vec<f32> = receiver.audio.chunks_exact(480).map(rms_dbfs).collect();
    let suppressed = blocks[150..200].iter().sum::<f32>() / 50.0;
    let open = blocks[240..290].iter().sum::<f32>() / 50.0;
    // A noise-only track has no speech to estimate an SNR from, so the shallow
    // limit plus the pause allowance applies.
    assert!(
        open - suppressed > 6.0,
        "suppression works: {suppressed:.1} vs {open:.1} dBFS"
    );
    let midway = |range: std::ops::Range<usize>| {
        blocks[range]
            .iter()
            .filter(|&&b| b > suppressed + 2.0 && b < open - 2.0)
            .count()
    };
    // Off at block 200 (packet 100), on at block 300 (after a 30 ms warm-up).
    assert!(midway(195..215) >= 2, "fade out: {:?}", &blocks[195..215]);
    assert!(midway(298..320) >= 2, "fade in: {:?}", &blocks[298..320]);
    let loudest =
        |range: std::ops::Range<usize>| blocks[range].iter().fold(f32::MIN, |a, &b| a.max(b));
    let (peak, open_peak) = (loudest(190..330), loudest(240..290));
    assert!(
        peak < open_peak + 1.5,
        "no overshoot: {peak:.1} vs {open_peak:.1}"
    );
}
