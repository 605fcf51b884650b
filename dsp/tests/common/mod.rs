//! Shared helpers for the pipeline tests: a browser-like sender, a receiver,
//! and test signals.

#![allow(dead_code)] // each test file uses a different subset

use audiopus::coder::{Decoder, Encoder};
use audiopus::{Application, Bitrate, Channels, SampleRate, Signal};

pub const RATE: usize = 48_000;
pub const FRAME: usize = 960;

/// An Opus encoder configured like a browser: VoIP, 32 kbit/s, FEC.
pub fn sender(channels: u8, dtx: bool) -> Encoder {
    let ch = if channels == 2 {
        Channels::Stereo
    } else {
        Channels::Mono
    };
    let mut encoder = Encoder::new(SampleRate::Hz48000, ch, Application::Voip).unwrap();
    encoder.set_signal(Signal::Voice).unwrap();
    encoder
        .set_bitrate(Bitrate::BitsPerSecond(32_000 * i32::from(channels)))
        .unwrap();
    encoder.set_inband_fec(true).unwrap();
    encoder.set_packet_loss_perc(20).unwrap();
    encoder
        .set_encoder_ctl_request(audiopus::ffi::OPUS_SET_DTX_REQUEST, i32::from(dtx))
        .unwrap();
    encoder
}

/// Encodes `signal` (interleaved, [-1, 1]) in packets of `frame` samples per channel.
pub fn encode(encoder: &Encoder, signal: &[f32], frame: usize, channels: usize) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; 4000];
    signal
        .chunks_exact(frame * channels)
        .map(|chunk| {
            let len = encoder.encode_float(chunk, &mut buf).unwrap();
            buf[..len].to_vec()
        })
        .collect()
}

/// A receiver: decodes every packet, in order, into one signal.
pub struct Receiver {
    decoder: Decoder,
    pcm: Vec<f32>,
    channels: usize,
    pub audio: Vec<f32>,
}

impl Receiver {
    pub fn new(channels: u8) -> Self {
        let ch = if channels == 2 {
            Channels::Stereo
        } else {
            Channels::Mono
        };
        Self {
            decoder: Decoder::new(SampleRate::Hz48000, ch).unwrap(),
            pcm: vec![0.0; 5760 * usize::from(channels)],
            channels: usize::from(channels),
            audio: Vec::new(),
        }
    }

    /// Decodes one packet; returns samples per channel.
    pub fn receive(&mut self, packet: &[u8]) -> usize {
        let n = self
            .decoder
            .decode_float(Some(packet), &mut self.pcm[..], false)
            .expect("output packet decodes");
        self.audio.extend_from_slice(&self.pcm[..n * self.channels]);
        n
    }
}

/// A sine of `freq` Hz with peak `dbfs`, `seconds` long, mono.
pub fn sine(freq: f32, dbfs: f32, seconds: f32) -> Vec<f32> {
    let amplitude = 10f32.powf(dbfs / 20.0);
    (0..(seconds * RATE as f32) as usize)
        .map(|i| amplitude * (std::f32::consts::TAU * freq * i as f32 / RATE as f32).sin())
        .collect()
}

/// A deterministic talker-like signal (voiced harmonics with a syllable
/// envelope and pauses) in low pink-ish noise, mono, [-1, 1].
pub fn talker(seconds: f32, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed | 1);
    let (mut pink, mut phase) = (0.0f32, 0.0f32);
    (0..(seconds * RATE as f32) as usize)
        .map(|i| {
            let t = i as f32 / RATE as f32;
            let syllable = (t * 4.0 * std::f32::consts::TAU).sin().max(0.0);
            let talking = (t * 0.4 * std::f32::consts::TAU).sin() > -0.3;
            let pitch = 120.0 + 30.0 * (t * 1.3 * std::f32::consts::TAU).sin();
            phase = (phase + pitch / RATE as f32).fract();
            let voiced: f32 = (1..20)
                .map(|h| (phase * h as f32 * std::f32::consts::TAU).sin() / h as f32)
                .sum();
            pink = 0.98 * pink + 0.02 * rng.uniform();
            let speech = if talking {
                0.08 * syllable * voiced
            } else {
                0.0
            };
            speech + 0.02 * pink
        })
        .collect()
}

/// RMS level in dBFS.
pub fn rms_dbfs(signal: &[f32]) -> f32 {
    let power = signal.iter().map(|x| x * x).sum::<f32>() / signal.len().max(1) as f32;
    10.0 * power.max(1e-20).log10()
}

/// xorshift64*, for reproducible noise and fuzzing without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}
