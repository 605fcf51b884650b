//! fleetcall-dsp: server-side audio processing.
//!
//! Pure functions and structs with caller-owned buffers: no threads, no I/O, no
//! clock. A per-track [`Pipeline`] decodes Opus, removes background noise with
//! RNNoise (`nnnoiseless`) while protecting quiet, distant speech
//! ([`Protection`]), re-encodes to Opus, and meters the audio before and after
//! ([`TrackMeters`]).
//!
//! One packet in gives one packet out, of the same duration, so the forwarder
//! keeps the publisher's RTP sequence numbers and timestamps; the audio inside
//! is delayed by [`Pipeline::latency`] (16.5 ms: 10 ms RNNoise, 6.5 ms encoder
//! look-ahead).
//!
//! ```
//! use fleetcall_dsp::{Input, Pipeline, PipelineConfig};
//!
//! # fn main() -> Result<(), fleetcall_dsp::DspError> {
//! let mut pipeline = Pipeline::new(PipelineConfig::default())?;
//! let mut out = Vec::with_capacity(1500); // reused for every packet
//!
//! # let received_payload: &[u8] = &[0x48]; // a 20 ms SILK packet, empty: DTX
//! // For each RTP packet of the publisher, in sequence order:
//! let processed = pipeline.process(received_payload, &mut out)?;
//! assert_eq!(processed.samples, 960); // forward `out` with the same timestamp
//!
//! // For a sequence gap, once per missing packet; pass the packet after the gap
//! // for the last one so its in-band FEC can be used.
//! let lost = pipeline.process_lost(Some(received_payload), &mut out)?;
//! assert_eq!(lost.input, Input::Concealed);
//!
//! // A policy change mid-call fades over 50 ms.
//! pipeline.set_suppression(false);
//! let meters = pipeline.meters();
//! assert_eq!(meters.packets.sent, 2);
//! # Ok(())
//! # }
//! ```

mod error;
pub mod meters;
pub mod packet;
mod pipeline;
mod protect;
mod signal;

pub use error::DspError;
pub use meters::TrackMeters;
pub use pipeline::{EncoderMode, Input, InputError, Pipeline, PipelineConfig, Processed};
pub use protect::Protection;

/// The one sample rate of the pipeline (Opus in WebRTC, and RNNoise).
pub const SAMPLE_RATE: u32 = 48_000;

/// RNNoise's block: 10 ms at 48 kHz.
pub const BLOCK_SAMPLES: usize = nnnoiseless::DenoiseState::FRAME_SIZE;
