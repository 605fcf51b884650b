//! The agent's audio: a looping microphone from a WAV file, and what it
//! hears, decoded per remote stream and mixed 20 ms at a time.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use audiopus::coder::Decoder;
use audiopus::{Channels, SampleRate};
use fleetcall_peer::PeerError;
use fleetcall_peer::wav::{self, FRAME_SAMPLES};
use tracing::{debug, warn};

/// Decoded audio kept per remote stream before the oldest is dropped.
const MAX_BUFFERED: usize = 10 * FRAME_SAMPLES;
/// The longest Opus frame (120 ms) in samples.
const MAX_DECODED: usize = 6 * FRAME_SAMPLES;

/// A looping microphone from a WAV file.
#[derive(Debug)]
pub struct Mic {
    samples: Vec<i16>,
    position: usize,
}

impl Mic {
    /// Loads a 48 kHz mono 16-bit PCM WAV file.
    pub fn open(path: &Path) -> Result<Mic, PeerError> {
        Ok(Mic { samples: wav::read(path)?, position: 0 })
    }

    /// The next 20 ms, wrapping around at the end.
    pub fn next_frame(&mut self) -> [i16; FRAME_SAMPLES] {
        let mut frame = [0; FRAME_SAMPLES];
        for sample in &mut frame {
            *sample = self.samples[self.position];
            self.position = (self.position + 1) % self.samples.len();
        }
        frame
    }
}

/// What the device hears: one Opus decoder per remote stream, and the mix.
#[derive(Default)]
pub struct Listener {
    decoders: BTreeMap<Arc<str>, Decoder>,
    mixer: Mixer,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("streams", &self.decoders.len()).finish_non_exhaustive()
    }
}

impl Listener {
    /// Decodes one Opus frame of `stream` into its buffer. A remote's bad
    /// packet costs one frame of its audio.
    pub fn hear(&mut self, stream: &Arc<str>, payload: &[u8]) {
        let decoder = match self.decoders.entry(stream.clone()) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                match Decoder::new(SampleRate::Hz48000, Channels::Mono) {
                    Ok(decoder) => e.insert(decoder),
                    Err(err) => {
                        warn!(error = %err, "Opus decoder");
                        return;
                    }
                }
            }
        };
        let mut pcm = [0i16; MAX_DECODED];
        match decoder.decode(Some(payload), &mut pcm[..], false) {
            Ok(n) => self.mixer.push(stream, &pcm[..n.min(pcm.len())]),
            Err(e) => debug!(error = %e, %stream, "undecodable frame"),
        }
    }

    /// The next 20 ms of the mix.
    pub fn mix(&mut self) -> [i16; FRAME_SAMPLES] {
        self.mixer.mix()
    }
}

/// Decoded audio per remote stream, mixed 20 ms at a time.
#[derive(Debug, Default)]
struct Mixer {
    streams: BTreeMap<Arc<str>, VecDeque<i16>>,
}

impl Mixer {
    fn push(&mut self, stream: &Arc<str>, pcm: &[i16]) {
        let buffer = self.streams.entry(stream.clone()).or_default();
        buffer.extend(pcm);
        // A sender faster than our clock (or a burst) must not grow latency forever.
        let excess = buffer.len().saturating_sub(MAX_BUFFERED);
        buffer.drain(..excess);
    }

    /// One frame: the sum of every stream's next 20 ms, saturating; silence
    /// where a stream has nothing.
    fn mix(&mut self) -> [i16; FRAME_SAMPLES] {
        let mut sum = [0i32; FRAME_SAMPLES];
        for buffer in self.streams.values_mut() {
            for (acc, sample) in sum.iter_mut().zip(buffer.drain(..buffer.len().min(FRAME_SAMPLES))) {
                *acc += i32::from(sample);
            }
        }
        // Clamped to the i16 range first, so the cast cannot wrap.
        sum.map(|s| s.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("fleetcall-agent-{}-{name}", std::process::id()))
    }

    #[test]
    fn mic_loops_and_refuses_other_formats() {
        let good = temp("good.wav");
        wav::write(&good, &(0..1000).map(|i| i as i16).collect::<Vec<_>>()).unwrap();
        let mut mic = Mic::open(&good).unwrap();
        let first = mic.next_frame();
        let second = mic.next_frame();
        assert_eq!(first[959], 959);
        assert_eq!(second[39], 999);
        assert_eq!(second[40], 0, "wraps around");

        let stereo = temp("stereo.wav");
        let spec = hound::WavSpec { channels: 2, sample_rate: 48_000, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
        let mut w = hound::WavWriter::create(&stereo, spec).unwrap();
        for _ in 0..100 {
            w.write_sample(0i16).unwrap();
        }
        w.finalize().unwrap();
        let err = Mic::open(&stereo).unwrap_err().to_string();
        assert!(err.contains("48000 Hz mono 16-bit") && err.contains("2 channel"), "{err}");
        let slow = temp("slow.wav");
        let spec = hound::WavSpec { channels: 1, sample_rate: 16_000, ..spec };
        let mut w = hound::WavWriter::create(&slow, spec).unwrap();
        for _ in 0..100 {
            w.write_sample(0i16).unwrap();
        }
        w.finalize().unwrap();
        assert!(Mic::open(&slow).unwrap_err().to_string().contains("16000 Hz"));
        let empty = temp("empty.wav");
        wav::write(&empty, &[]).unwrap();
        assert!(Mic::open(&empty).is_err());
        assert!(Mic::open(&temp("missing.wav")).is_err());
        for p in [good, stereo, slow, empty] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn mixer_sums_saturates_pads_and_bounds_latency() {
        let mut mixer = Mixer::default();
        let a: Arc<str> = "1".into();
        let b: Arc<str> = "2".into();
        mixer.push(&a, &[20_000; FRAME_SAMPLES]);
        mixer.push(&b, &[20_000; FRAME_SAMPLES / 2]);
        let frame = mixer.mix();
        assert_eq!(frame[0], i16::MAX, "saturates");
        assert_eq!(frame[FRAME_SAMPLES - 1], 20_000, "b ran out: only a");
        assert_eq!(mixer.mix(), [0; FRAME_SAMPLES], "silence when nothing is buffered");
        mixer.push(&a, &vec![1; 3 * MAX_BUFFERED]);
        assert_eq!(mixer.streams[&a].len(), MAX_BUFFERED);
    }

    #[test]
    fn a_listener_decodes_and_mixes_real_opus() {
        let encoder = audiopus::coder::Encoder::new(SampleRate::Hz48000, Channels::Mono, audiopus::Application::Voip).unwrap();
        let tone: Vec<i16> = (0..FRAME_SAMPLES).map(|i| ((i as f32 / 10.0).sin() * 8000.0) as i16).collect();
        let mut packet = [0u8; 1275];
        let n = encoder.encode(&tone, &mut packet).unwrap();
        let mut listener = Listener::default();
        let stream: Arc<str> = "7".into();
        listener.hear(&stream, &packet[..n]);
        assert!(listener.mix().iter().any(|&s| s != 0), "decoded audio is mixed");
        assert_eq!(listener.mix(), [0; FRAME_SAMPLES], "one frame in, one frame out");
    }
}
