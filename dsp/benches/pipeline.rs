//! Cost of one 20 ms mono frame: decode only, decode + RNNoise, and the full
//! pipeline for both encoder modes at several complexities (48 kbit/s output).
//! Streams per core = 20 ms / time.
//!
//! The input is a synthetic talker (a voiced harmonic source with syllable-rate
//! envelope and pauses) in pink-ish noise, coded like a browser would (Opus
//! VoIP, 32 kbit/s, complexity 10, FEC). Every packet carries audio (no DTX),
//! so the figures are the busy case.

use std::hint::black_box;

use audiopus::coder::{Decoder, Encoder};
use audiopus::{Application, Bitrate, Channels, SampleRate, Signal};
use criterion::{Criterion, criterion_group, criterion_main};
use fleetcall_dsp::{Pipeline, PipelineConfig};
use nnnoiseless::DenoiseState;

const FRAME: usize = 960;
const PACKETS: usize = 250;

/// Deterministic talker-in-noise test signal, in [-1, 1].
fn test_signal(samples: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut noise = || {
        // xorshift64*: fixed seed, no dependency.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    let (mut pink, mut phase) = (0.0f32, 0.0f32);
    (0..samples)
        .map(|i| {
            let t = i as f32 / 48_000.0;
            let syllable = (t * 4.0 * std::f32::consts::TAU).sin().max(0.0);
            let talking = (t * 0.4 * std::f32::consts::TAU).sin() > -0.3;
            let pitch = 120.0 + 30.0 * (t * 1.3 * std::f32::consts::TAU).sin();
            phase = (phase + pitch / 48_000.0).fract();
            let voiced: f32 = (1..20)
                .map(|h| (phase * h as f32 * std::f32::consts::TAU).sin() / h as f32)
                .sum();
            pink = 0.98 * pink + 0.02 * noise();
            let speech = if talking {
                0.08 * syllable * voiced
            } else {
                0.0
            };
            speech + 0.05 * pink
        })
        .collect()
}

fn encoded_packets() -> Vec<Vec<u8>> {
    let mut encoder = Encoder::new(SampleRate::Hz48000, Channels::Mono, Application::Voip).unwrap();
    encoder.set_signal(Signal::Voice).unwrap();
    encoder.set_bitrate(Bitrate::BitsPerSecond(32_000)).unwrap();
    encoder
        .set_encoder_ctl_request(audiopus::ffi::OPUS_SET_COMPLEXITY_REQUEST, 10)
        .unwrap();
    encoder.set_inband_fec(true).unwrap();
    encoder.set_packet_loss_perc(10).unwrap();
    let signal = test_signal(FRAME * PACKETS);
    let mut buf = [0u8; 1500];
    signal
        .chunks_exact(FRAME)
        .map(|frame| {
            let len = encoder.encode_float(frame, &mut buf).unwrap();
            buf[..len].to_vec()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let packets = encoded_packets();
    let mut group = c.benchmark_group("frame_20ms");

    group.bench_function("decode", |b| {
        let mut decoder = Decoder::new(SampleRate::Hz48000, Channels::Mono).unwrap();
        let mut pcm = vec![0.0f32; FRAME];
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % PACKETS;
            decoder
                .decode_float(Some(&packets[i][..]), &mut pcm[..], false)
                .unwrap();
            black_box(&pcm);
        });
    });

    group.bench_function("decode+rnnoise", |b| {
        let mut decoder = Decoder::new(SampleRate::Hz48000, Channels::Mono).unwrap();
        let mut denoise = DenoiseState::new();
        let mut pcm = vec![0.0f32; FRAME];
        let mut out = vec![0.0f32; FRAME];
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % PACKETS;
            decoder
                .decode_float(Some(&packets[i][..]), &mut pcm[..], false)
                .unwrap();
            for x in &mut pcm {
                *x *= 32768.0;
            }
            for (o, x) in out.chunks_exact_mut(480).zip(pcm.chunks_exact(480)) {
                black_box(denoise.process_frame(o, x));
            }
        });
    });

    let low_delay = PipelineConfig::low_delay();
    let configs = [
        ("transcode_voip_c5", PipelineConfig { suppression: false, ..PipelineConfig::default() }),
        ("pipeline_voip_c5_default", PipelineConfig::default()),
        ("pipeline_voip_c0", PipelineConfig { complexity: 0, ..PipelineConfig::default() }),
        ("transcode_lowdelay_c2", PipelineConfig { suppression: false, ..low_delay }),
        ("pipeline_lowdelay_c2", low_delay),
        ("pipeline_lowdelay_c0", PipelineConfig { complexity: 0, ..low_delay }),
        ("pipeline_lowdelay_c5", PipelineConfig { complexity: 5, ..low_delay }),
    ];
    for (name, config) in configs {
        group.bench_function(name, |b| {
            let mut pipeline = Pipeline::new(config).unwrap();
            let mut out = Vec::with_capacity(4000);
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % PACKETS;
                black_box(pipeline.process(&packets[i], &mut out).unwrap());
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: the machine is shared and the figures are medians anyway.
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
