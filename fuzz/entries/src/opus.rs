//! Opus packets into the DSP pipeline the way a DSP thread runs it
//! (`fleetcall_sfu::audio::TrackProcessor`: loss concealment and FEC over
//! `fleetcall_dsp::Pipeline`'s decode -> RNNoise -> encode).
//!
//! The first byte picks the pipeline's configuration (the default, the
//! low-delay coder, stereo, DTX); then records, one per RTP packet: the
//! payload is the Opus packet, the tag's bit 0 the marker, bit 1 switches
//! suppression before it, and `(tag >> 2) - 8` the sequence step
//! (negative: late, 0: a duplicate, above 1: loss). A fresh pipeline per
//! input: it costs well under a millisecond, and crashes reproduce alone.
//!
//! Invariants: every output packet is valid Opus that a standard decoder
//! decodes (in the pipeline's channel count) to the duration its TOC
//! announces; output sequence numbers strictly increase; one input gives at
//! most its concealed run plus one outputs; a late input gives none.

use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Instant;

use audiopus::coder::Decoder;
use audiopus::{Channels, SampleRate};
use fleetcall_dsp::PipelineConfig;
use fleetcall_dsp::packet::{MAX_PACKET_SAMPLES, inspect};
use fleetcall_sfu::audio::{AudioPacket, AudioTotals, TrackProcessor};
use fleetcall_sfu::{ParticipantId, TrackKey};

use crate::records;

/// The processor's longest concealed run (`sfu/src/audio.rs`).
const MAX_CONCEALED_RUN: u64 = 25;

fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn config(choice: u8) -> PipelineConfig {
    match choice % 4 {
        0 => PipelineConfig::default(),
        1 => PipelineConfig::low_delay(),
        2 => PipelineConfig { channels: 2, ..PipelineConfig::default() },
        _ => PipelineConfig { dtx: true, suppression: false, ..PipelineConfig::default() },
    }
}

/// Runs one input (see the module docs).
pub fn run(data: &[u8]) {
    let Some((&choice, data)) = data.split_first() else { return };
    let config = config(choice);
    let channels = if config.channels == 2 { Channels::Stereo } else { Channels::Mono };
    let mut processor = TrackProcessor::new(config).expect("valid pipeline config");
    let mut check = Decoder::new(SampleRate::Hz48000, channels).expect("opus decoder");
    let mut pcm = vec![0i16; MAX_PACKET_SAMPLES * 2];
    let track = TrackKey { publisher: ParticipantId(1), mid: "0".into() };
    let mut totals = AudioTotals::default();
    let mut results = Vec::new();
    let mut suppress = config.suppression;
    // Extended sequence numbers as str0m hands them over: far from 0 and
    // from the end of u64, as a real stream is.
    let mut seq: u64 = 1 << 20;
    let mut timestamp: u32 = 0x1234_5678;
    let mut last_out: Option<u64> = None;
    let mut highest_in: Option<u64> = None;

    for (tag, payload) in records::split(data).take(200) {
        let step = i64::from(tag >> 2) - 8;
        seq = seq.saturating_add_signed(step);
        timestamp = timestamp.wrapping_add((step as i32 as u32).wrapping_mul(960));
        if tag & 2 != 0 {
            suppress = !suppress;
            processor.set_suppression(suppress);
        }
        let packet = AudioPacket { seq, timestamp, marker: tag & 1 != 0, payload: Arc::from(payload), arrived: start() };
        results.clear();
        processor.process(Instant::now, track, &packet, &mut results, &mut totals);

        let late = highest_in.is_some_and(|h| seq <= h);
        if late {
            assert!(results.is_empty(), "a late or duplicate packet (seq {seq}) produced output");
        }
        let bound = highest_in.map_or(1, |h| (seq.saturating_sub(h + 1)).min(MAX_CONCEALED_RUN) + 1);
        assert!(results.len() as u64 <= bound, "{} outputs for one input (bound {bound})", results.len());
        highest_in = Some(highest_in.map_or(seq, |h| h.max(seq)));
        for out in &results {
            assert!(last_out.is_none_or(|l| out.seq > l), "output seq {} after {last_out:?}", out.seq);
            last_out = Some(out.seq);
            assert!(out.seq <= seq, "output seq {} beyond the input's {seq}", out.seq);
            let info = inspect(&out.payload).unwrap_or_else(|e| panic!("output is not Opus ({e:?}): {:02x?}", &out.payload[..]));
            // No check of the TOC's stereo flag: a stereo libopus encoder
            // codes near-mono frames as mono, which stereo decoders play.
            let _ = info.stereo;
            let decoded = check.decode(Some(&out.payload[..]), &mut pcm, false);
            let decoded = decoded.unwrap_or_else(|e| panic!("our own output does not decode ({e}): {:02x?}", &out.payload[..]));
            assert_eq!(decoded, info.samples(), "output decodes to another duration than its TOC says");
            assert!(out.speech_probability.is_finite() && (0.0..=1.0).contains(&out.speech_probability));
        }
    }
}
