//! fleetcall-dsp: server-side audio processing.
//!
//! Pure functions and structs with caller-owned buffers: no threads, no I/O.
//! A per-track pipeline decodes Opus, removes background noise with RNNoise
//! (`nnnoiseless`) while protecting quiet, distant speech, re-encodes to Opus,
//! and meters the audio before and after.
