//! The peer crate's one error type.

use std::path::PathBuf;

/// Why a peer command, its driver or a WAV file failed. Network input never
/// produces one of these: bad datagrams are dropped and counted instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The SDP text did not parse or could not be negotiated.
    #[error("invalid SDP: {0}")]
    InvalidSdp(String),
    /// The command does not fit the peer's state (a second join offer, an
    /// answer with no offer pending, a bad local address).
    #[error("media peer: {0}")]
    State(String),
    /// The DTLS certificate could not be generated.
    #[error("DTLS certificate: {0}")]
    Certificate(String),
    /// The driver's socket.
    #[error("media socket: {0}")]
    Io(#[from] std::io::Error),
    /// The driver's task has stopped.
    #[error("the media peer has stopped")]
    Stopped,
    /// A WAV file could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Wav {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: hound::Error,
    },
    /// A WAV file in a format other than 48 kHz mono 16-bit PCM.
    #[error(
        "{}: need a 48000 Hz mono 16-bit PCM WAV file, got {} Hz, {} channel(s), {}-bit {:?}",
        path.display(),
        spec.sample_rate,
        spec.channels,
        spec.bits_per_sample,
        spec.sample_format
    )]
    WavFormat {
        /// The file.
        path: PathBuf,
        /// Its format.
        spec: hound::WavSpec,
    },
    /// A WAV file without a single sample.
    #[error("{}: no samples", path.display())]
    WavEmpty {
        /// The file.
        path: PathBuf,
    },
}
