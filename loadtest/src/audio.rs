//! The microphone of a simulated device: a WAV file (or the generated
//! default speech clip) encoded once to Opus with DTX, and played from a
//! per-device offset with a talk/silence pattern.
//!
//! Frames are 20 ms at 48 kHz mono. An encoded frame of at most 2 bytes is a
//! DTX frame and is not sent (what WebRTC does): a device in silence sends
//! a comfort-noise packet about every 400 ms and nothing else.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use audiopus::coder::Encoder;
use audiopus::{Application, Channels, SampleRate};
use fleetcall_peer::wav::{self, FRAME_SAMPLES};
use fleetcall_peer::{AudioFrame, AudioLevel};

/// Sample rate of every clip.
pub const RATE: u32 = wav::SAMPLE_RATE;
/// libopus `OPUS_SET_DTX_REQUEST`.
const OPUS_SET_DTX: i32 = 4016;
/// Packets this short are DTX frames: not transmitted.
const DTX_MAX_BYTES: usize = 2;
/// A frame louder than this (dBov) is voice for the voice-activity flag.
const VOICE_DBOV: i8 = -50;

/// One 20 ms frame of a clip.
#[derive(Debug, Clone)]
pub struct ClipFrame {
    /// The Opus packet, or `None` for a DTX frame (nothing is sent).
    pub payload: Option<Arc<[u8]>>,
    /// RFC 6464 level as str0m carries it: -127 (silence) ..= 0 dBov.
    pub level: i8,
    /// Voice activity (RFC 6464 V bit).
    pub voice: bool,
}

impl ClipFrame {
    /// The frame as a peer sends it: the packet with its level.
    pub fn audio(&self) -> AudioFrame {
        AudioFrame {
            payload: self.payload.clone(),
            level: Some(AudioLevel { dbov: self.level, voice: self.voice }),
        }
    }
}

/// An encoded clip, looped by the devices that play it.
#[derive(Debug)]
pub struct Clip {
    frames: Vec<ClipFrame>,
}

impl Clip {
    /// Encodes 48 kHz mono samples with DTX (a trailing partial frame is dropped).
    pub fn encode(samples: &[i16]) -> anyhow::Result<Clip> {
        Clip::encode_with(samples, true)
    }

    /// Encodes with or without DTX; without, every frame is sent.
    pub fn encode_with(samples: &[i16], dtx: bool) -> anyhow::Result<Clip> {
        if samples.len() < FRAME_SAMPLES {
            bail!("the clip is shorter than one 20 ms frame");
        }
        let mut encoder = Encoder::new(SampleRate::Hz48000, Channels::Mono, Application::Voip)
            .context("Opus encoder")?;
        encoder
            .set_encoder_ctl_request(OPUS_SET_DTX, i32::from(dtx))
            .context("setting Opus DTX")?;
        let mut out = [0u8; 1500];
        let mut frames = Vec::with_capacity(samples.len() / FRAME_SAMPLES);
        for pcm in samples.chunks_exact(FRAME_SAMPLES) {
            let n = encoder.encode(pcm, &mut out).context("Opus encode")?;
            let level = level_dbov(pcm);
            frames.push(ClipFrame {
                payload: (!dtx || n > DTX_MAX_BYTES).then(|| Arc::from(&out[..n])),
                level,
                voice: level > VOICE_DBOV,
            });
        }
        Ok(Clip { frames })
    }

    /// Two seconds of digital silence: what a muted or quiet device sends
    /// (DTX: a comfort-noise packet every 400 ms).
    pub fn silence() -> anyhow::Result<Clip> {
        Clip::encode(&vec![0; 100 * FRAME_SAMPLES])
    }

    /// Frames in the clip.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Never true: a clip has at least one frame.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frame `i` modulo the clip's length.
    pub fn frame(&self, i: usize) -> &ClipFrame {
        &self.frames[i % self.frames.len()]
    }

    /// Share of frames that are sent (not DTX).
    pub fn sent_ratio(&self) -> f64 {
        self.frames.iter().filter(|f| f.payload.is_some()).count() as f64 / self.frames.len() as f64
    }
}

/// When a talker talks: `on` seconds of the clip, then `off` seconds of
/// silence, repeated. `off == 0`: the clip without a break (its own pauses
/// are still DTX).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TalkPattern {
    /// Seconds talking.
    pub on_secs: f64,
    /// Seconds silent.
    pub off_secs: f64,
}

impl TalkPattern {
    /// Talks all the time.
    pub const CONTINUOUS: TalkPattern = TalkPattern {
        on_secs: 1.0,
        off_secs: 0.0,
    };

    fn frames(secs: f64) -> u64 {
        (secs * 50.0).round().max(0.0) as u64
    }

    /// Whether frame number `n` of a talker falls in a talking period.
    pub fn talking(&self, n: u64) -> bool {
        let (on, off) = (Self::frames(self.on_secs), Self::frames(self.off_secs));
        off == 0 || on > 0 && n % (on + off) < on
    }
}

/// What one device plays: the speech clip from its own offset when it
/// talks, the silence clip otherwise.
#[derive(Debug, Clone)]
pub struct Mic {
    speech: Arc<Clip>,
    silence: Arc<Clip>,
    talker: bool,
    pattern: TalkPattern,
    offset: usize,
    /// Frames produced so far.
    n: u64,
}

impl Mic {
    /// A microphone; `offset` (frames) keeps talkers of one room apart.
    pub fn new(
        speech: Arc<Clip>,
        silence: Arc<Clip>,
        talker: bool,
        pattern: TalkPattern,
        offset: usize,
    ) -> Self {
        Mic {
            speech,
            silence,
            talker,
            pattern,
            offset,
            n: 0,
        }
    }

    /// Whether this device is one of its room's talkers.
    pub fn is_talker(&self) -> bool {
        self.talker
    }

    /// The next 20 ms.
    pub fn next_frame(&mut self) -> &ClipFrame {
        let n = self.n;
        self.n += 1;
        if self.talker && self.pattern.talking(n) {
            self.speech.frame(self.offset + n as usize)
        } else {
            self.silence.frame(n as usize)
        }
    }
}

/// RFC 6464 level of a frame, as str0m carries it (-127..=0 dBov).
pub fn level_dbov(pcm: &[i16]) -> i8 {
    let energy: f64 = pcm
        .iter()
        .map(|&s| f64::from(s) * f64::from(s))
        .sum::<f64>()
        / pcm.len().max(1) as f64;
    if energy <= 0.0 {
        return -127;
    }
    let db = 10.0 * (energy / (32768.0 * 32768.0)).log10();
    db.round().clamp(-127.0, 0.0) as i8
}

/// Loads a 48 kHz mono 16-bit PCM WAV file of at least one frame.
pub fn read_wav(path: &Path) -> anyhow::Result<Vec<i16>> {
    let samples = wav::read(path)?;
    if samples.len() < FRAME_SAMPLES {
        bail!("{}: shorter than one 20 ms frame", path.display());
    }
    Ok(samples)
}

/// The default microphone: 8 s of synthetic speech (voiced syllables with
/// vowel formants and a falling pitch, consonant bursts, pauses between
/// phrases for DTX), optionally over steady room noise at about -40 dBFS.
/// Deterministic: the same samples on every run.
pub fn default_speech(noise: bool) -> Vec<i16> {
    const VOWELS: [(f32, f32, f32); 5] = [
        (730.0, 1090.0, 2440.0),
        (270.0, 2290.0, 3010.0),
        (300.0, 870.0, 2240.0),
        (530.0, 1840.0, 2480.0),
        (570.0, 840.0, 2410.0),
    ];
    let total = 8 * RATE as usize;
    let mut out = vec![0f32; total];
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let rate = RATE as f32;
    let mut t = (0.25 * rate) as usize;
    while t < total {
        // One phrase: 3-6 syllables with a declining pitch.
        let syllables = 3 + (rng.next() % 4) as usize;
        let f0_start = 120.0 + rng.unit() * 80.0;
        for s in 0..syllables {
            let len = ((0.12 + rng.unit() * 0.14) * rate) as usize;
            let (f1, f2, f3) = VOWELS[(rng.next() % 5) as usize];
            let f0 = f0_start * (1.0 - 0.04 * s as f32);
            let gain = 0.5 + 0.5 * rng.unit();
            // A consonant: 25 ms of bright noise before most syllables.
            if !rng.next().is_multiple_of(3) {
                let burst = (0.025 * rate) as usize;
                let mut last = 0.0;
                for i in 0..burst.min(total.saturating_sub(t)) {
                    let white = rng.unit() * 2.0 - 1.0;
                    out[t + i] += 0.08 * (white - last);
                    last = white;
                }
                t += burst;
            }
            let harmonics = (3800.0 / f0) as usize;
            let mut phase = 0.0f32;
            for i in 0..len.min(total.saturating_sub(t)) {
                let x = i as f32 / len as f32;
                // Raised-cosine attack and release, 20 ms each.
                let edge = (0.02 * rate) as usize;
                let env = if i < edge {
                    0.5 - 0.5 * (std::f32::consts::PI * i as f32 / edge as f32).cos()
                } else if i + edge > len {
                    0.5 - 0.5 * (std::f32::consts::PI * (len - i) as f32 / edge as f32).cos()
                } else {
                    1.0
                };
                let pitch = f0 * (1.0 + 0.05 * (1.0 - x));
                phase += 2.0 * std::f32::consts::PI * pitch / rate;
                let mut v = 0.0;
                for k in 1..=harmonics {
                    let f = pitch * k as f32;
                    let formant = |fc: f32, bw: f32| 1.0 / (1.0 + ((f - fc) / bw).powi(2));
                    let amp = (formant(f1, 90.0)
                        + 0.7 * formant(f2, 110.0)
                        + 0.4 * formant(f3, 150.0)
                        + 0.02)
                        / (k as f32).sqrt();
                    v += amp * (phase * k as f32).sin();
                }
                out[t + i] += 0.12 * gain * env * v;
            }
            t += len + ((0.02 + rng.unit() * 0.05) * rate) as usize;
        }
        // A pause between phrases: long enough for DTX.
        t += ((0.35 + rng.unit() * 0.6) * rate) as usize;
    }
    if noise {
        // Steady room noise: white noise through a one-pole low-pass.
        let mut low = 0.0f32;
        for sample in &mut out {
            low = 0.9 * low + 0.1 * (rng.unit() * 2.0 - 1.0);
            *sample += 0.035 * low;
        }
    }
    let peak = out.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let scale = 0.5 * 32767.0 / peak;
    out.iter()
        .map(|v| (v * scale).round().clamp(-32768.0, 32767.0) as i16)
        .collect()
}

/// A small deterministic generator for the synthetic clip.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_clip_has_speech_and_pauses_and_dtx_engages() {
        let samples = default_speech(false);
        assert_eq!(samples.len(), 8 * RATE as usize);
        assert_eq!(samples, default_speech(false), "deterministic");
        let clip = Clip::encode(&samples).unwrap();
        assert_eq!(clip.len(), 400);
        let sent = clip.sent_ratio();
        assert!(
            sent > 0.4 && sent < 0.95,
            "speech is sent, pauses are DTX: {sent}"
        );
        let loud = (0..clip.len()).filter(|&i| clip.frame(i).voice).count();
        assert!(loud > 100, "voiced frames: {loud}");
        // Every frame that is sent and marked as voice carries a real packet.
        assert!((0..clip.len()).all(|i| !clip.frame(i).voice
            || clip.frame(i).payload.as_ref().is_some_and(|p| p.len() > 10)));
    }

    #[test]
    fn noise_fills_the_pauses() {
        let quiet = Clip::encode(&default_speech(false)).unwrap();
        let noisy = Clip::encode(&default_speech(true)).unwrap();
        assert!(noisy.sent_ratio() >= quiet.sent_ratio());
        let min_level = |c: &Clip| (0..c.len()).map(|i| c.frame(i).level).min().unwrap();
        assert!(
            min_level(&noisy) > -70,
            "noise never falls silent: {}",
            min_level(&noisy)
        );
        assert_eq!(min_level(&quiet), -127);
    }

    #[test]
    fn silence_is_mostly_dtx() {
        let silence = Clip::silence().unwrap();
        let sent = (0..silence.len())
            .filter(|&i| silence.frame(i).payload.is_some())
            .count();
        assert!(
            sent > 0 && sent <= 15,
            "comfort noise about every 400 ms: {sent} of 100"
        );
        assert!(
            (0..silence.len()).all(|i| silence.frame(i).level == -127 && !silence.frame(i).voice)
        );
    }

    #[test]
    fn talk_pattern_and_mic_offsets() {
        let p = TalkPattern {
            on_secs: 0.1,
            off_secs: 0.06,
        };
        let talking: Vec<bool> = (0..10).map(|n| p.talking(n)).collect();
        assert_eq!(
            talking,
            [
                true, true, true, true, true, false, false, false, true, true
            ]
        );
        assert!(TalkPattern::CONTINUOUS.talking(12345));
        let speech = Arc::new(Clip::encode(&default_speech(false)).unwrap());
        let silence = Arc::new(Clip::silence().unwrap());
        let mut a = Mic::new(
            speech.clone(),
            silence.clone(),
            true,
            TalkPattern::CONTINUOUS,
            0,
        );
        let mut b = Mic::new(
            speech.clone(),
            silence.clone(),
            true,
            TalkPattern::CONTINUOUS,
            7,
        );
        for _ in 0..7 {
            a.next_frame();
        }
        assert_eq!(
            a.next_frame().payload,
            b.next_frame().payload,
            "offsets shift the clip"
        );
        let mut quiet = Mic::new(speech, silence, false, TalkPattern::CONTINUOUS, 0);
        assert!(!quiet.is_talker());
        assert!((0..100).all(|_| !quiet.next_frame().voice));
    }

    #[test]
    fn wav_round_trip_and_refusals() {
        let dir =
            std::env::temp_dir().join(format!("fleetcall-loadtest-audio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.wav");
        wav::write(&good, &default_speech(true)[..RATE as usize]).unwrap();
        assert_eq!(read_wav(&good).unwrap().len(), RATE as usize);
        let short = dir.join("short.wav");
        wav::write(&short, &[0; 100]).unwrap();
        assert!(
            read_wav(&short)
                .unwrap_err()
                .to_string()
                .contains("shorter")
        );
        let stereo = dir.join("stereo.wav");
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: RATE,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(&stereo, spec).unwrap();
        for _ in 0..4000 {
            w.write_sample(0i16).unwrap();
        }
        w.finalize().unwrap();
        assert!(
            read_wav(&stereo)
                .unwrap_err()
                .to_string()
                .contains("2 channel")
        );
        assert!(read_wav(&dir.join("missing.wav")).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn levels() {
        assert_eq!(level_dbov(&[0; 960]), -127);
        assert_eq!(level_dbov(&[32767; 960]), 0);
        let quarter: Vec<i16> = vec![8192; 960];
        assert_eq!(level_dbov(&quarter), -12);
    }
}
