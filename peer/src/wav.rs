//! WAV files as peers speak them: 48 kHz mono 16-bit PCM, read whole (a
//! microphone) or written 20 ms at a time (a recording).

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::PeerError;

/// The sample rate of every file (Opus' native rate).
pub const SAMPLE_RATE: u32 = 48_000;
/// Samples in one 20 ms frame.
pub const FRAME_SAMPLES: usize = 960;

const SPEC: hound::WavSpec = hound::WavSpec {
    channels: 1,
    sample_rate: SAMPLE_RATE,
    bits_per_sample: 16,
    sample_format: hound::SampleFormat::Int,
};

/// Reads a 48 kHz mono 16-bit PCM WAV file with at least one sample; any
/// other format is refused with what it is.
pub fn read(path: &Path) -> Result<Vec<i16>, PeerError> {
    let wav_error = |source| PeerError::Wav { path: path.to_owned(), source };
    let reader = hound::WavReader::open(path).map_err(wav_error)?;
    let spec = reader.spec();
    if spec != SPEC {
        return Err(PeerError::WavFormat { path: path.to_owned(), spec });
    }
    let samples = reader.into_samples::<i16>().collect::<Result<Vec<_>, _>>().map_err(wav_error)?;
    if samples.is_empty() {
        return Err(PeerError::WavEmpty { path: path.to_owned() });
    }
    Ok(samples)
}

/// Writes samples as a 48 kHz mono 16-bit PCM WAV file.
pub fn write(path: &Path, samples: &[i16]) -> Result<(), PeerError> {
    let mut recording = Recording::create(path)?;
    recording.write(samples)?;
    recording.finish().map(drop)
}

/// A WAV file being written (48 kHz mono 16-bit PCM).
pub struct Recording {
    path: PathBuf,
    writer: hound::WavWriter<BufWriter<File>>,
}

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Recording {
    /// Creates (or truncates) the file.
    pub fn create(path: &Path) -> Result<Recording, PeerError> {
        let writer = hound::WavWriter::create(path, SPEC)
            .map_err(|source| PeerError::Wav { path: path.to_owned(), source })?;
        Ok(Recording { path: path.to_owned(), writer })
    }

    /// Appends samples.
    pub fn write(&mut self, pcm: &[i16]) -> Result<(), PeerError> {
        pcm.iter()
            .try_for_each(|&s| self.writer.write_sample(s))
            .map_err(|source| PeerError::Wav { path: self.path.clone(), source })
    }

    /// Completes the header; returns the file's path.
    pub fn finish(self) -> Result<PathBuf, PeerError> {
        match self.writer.finalize() {
            Ok(()) => Ok(self.path),
            Err(source) => Err(PeerError::Wav { path: self.path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("fleetcall-peer-wav-{}-{name}", std::process::id()))
    }

    fn write_spec(path: &Path, rate: u32, channels: u16, samples: &[i16]) {
        let spec = hound::WavSpec { channels, sample_rate: rate, ..SPEC };
        let mut w = hound::WavWriter::create(path, spec).unwrap();
        for &s in samples {
            w.write_sample(s).unwrap();
        }
        w.finalize().unwrap();
    }

    #[test]
    fn round_trip_and_refusals() {
        let good = temp("good.wav");
        let samples: Vec<i16> = (0..1000).map(|i| i as i16).collect();
        write(&good, &samples).unwrap();
        assert_eq!(read(&good).unwrap(), samples);

        let stereo = temp("stereo.wav");
        write_spec(&stereo, 48_000, 2, &[0; 100]);
        let err = read(&stereo).unwrap_err().to_string();
        assert!(err.contains("48000 Hz mono 16-bit") && err.contains("2 channel"), "{err}");
        let slow = temp("slow.wav");
        write_spec(&slow, 16_000, 1, &[0; 100]);
        assert!(read(&slow).unwrap_err().to_string().contains("16000 Hz"));
        let empty = temp("empty.wav");
        write(&empty, &[]).unwrap();
        assert!(read(&empty).unwrap_err().to_string().contains("no samples"));
        assert!(read(&temp("missing.wav")).is_err());
        for p in [good, stereo, slow, empty] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn a_recording_is_a_readable_wav() {
        let path = temp("rec.wav");
        let mut rec = Recording::create(&path).unwrap();
        rec.write(&[7; FRAME_SAMPLES]).unwrap();
        rec.write(&[8; FRAME_SAMPLES]).unwrap();
        assert_eq!(rec.finish().unwrap(), path);
        let heard = read(&path).unwrap();
        assert_eq!(heard.len(), 2 * FRAME_SAMPLES);
        assert_eq!((heard[0], heard[FRAME_SAMPLES]), (7, 8));
        let _ = std::fs::remove_file(path);
    }
}
