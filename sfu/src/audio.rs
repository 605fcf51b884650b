//! Server-side noise suppression of published Opus tracks: what the core
//! decides and hands out, and the sans-IO processor a DSP thread runs.
//!
//! The SFU core decides which tracks are processed (the suppression policy)
//! and emits [`AudioCommand`]s; a driver runs the pipelines off the core's
//! thread (fleetcall-media's DSP pool) so that a worker never spends its time
//! denoising one room while packets of other rooms wait, and feeds the
//! results back as [`ProcessedAudio`].
//!
//! [`TrackProcessor`] keeps the output a continuous RTP stream: one output
//! packet per input packet with the publisher's sequence number and
//! timestamp, and one concealed (or FEC-rebuilt) packet per lost one, so
//! subscribers see no gaps and no jumps.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use fleetcall_dsp::{Pipeline, PipelineConfig, TrackMeters};

use crate::histogram::{bounds, Histogram};
use crate::ids::{RoomId, TrackKey};

/// Losses longer than this (in packets, 20 ms each) are not concealed packet
/// by packet: the stream is treated as restarted.
const MAX_CONCEALED_RUN: u64 = 25;

/// Whether a publisher's audio is denoised. Device settings win over room
/// settings, which win over the default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SuppressionPolicy {
    /// For rooms and devices without their own setting.
    pub default: bool,
    /// Per room.
    pub rooms: HashMap<RoomId, bool>,
    /// Per device (a participant's name is its device id on the control plane).
    pub devices: HashMap<String, bool>,
}

impl SuppressionPolicy {
    /// The setting for a publisher.
    pub fn applies(&self, room: &RoomId, device: &str) -> bool {
        self.devices.get(device).or_else(|| self.rooms.get(room)).copied().unwrap_or(self.default)
    }
}

/// A change to the suppression policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyChange {
    /// The default for everything without its own setting.
    Default { on: bool },
    /// One room; `None` clears its setting.
    Room { room: RoomId, on: Option<bool> },
    /// One device; `None` clears its setting.
    Device { device: String, on: Option<bool> },
}

impl SuppressionPolicy {
    /// Applies a change.
    pub fn apply(&mut self, change: PolicyChange) {
        match change {
            PolicyChange::Default { on } => self.default = on,
            PolicyChange::Room { room, on: Some(on) } => {
                self.rooms.insert(room, on);
            }
            PolicyChange::Room { room, on: None } => {
                self.rooms.remove(&room);
            }
            PolicyChange::Device { device, on: Some(on) } => {
                self.devices.insert(device, on);
            }
            PolicyChange::Device { device, on: None } => {
                self.devices.remove(&device);
            }
        }
    }
}

/// One received Opus packet of a processed track.
#[derive(Debug, Clone)]
pub struct AudioPacket {
    /// Extended RTP sequence number.
    pub seq: u64,
    /// RTP timestamp.
    pub timestamp: u32,
    /// RTP marker bit (start of a talk spurt).
    pub marker: bool,
    /// Opus payload.
    pub payload: Arc<[u8]>,
    /// When it arrived, for the end-to-end audio delay.
    pub arrived: Instant,
}

/// What the core asks of the DSP threads.
#[derive(Debug)]
pub enum AudioCommand {
    /// Process one packet of a track (creating its pipeline on first use).
    Process {
        /// The track.
        track: TrackKey,
        /// The packet.
        packet: AudioPacket,
    },
    /// Switch a running pipeline's suppression (fades, no glitch).
    Suppress {
        /// The track.
        track: TrackKey,
        /// On or off.
        on: bool,
    },
    /// The track is gone: drop its pipeline.
    Close {
        /// The track.
        track: TrackKey,
    },
}

impl AudioCommand {
    /// The track it concerns.
    pub fn track(&self) -> TrackKey {
        match self {
            AudioCommand::Process { track, .. } | AudioCommand::Suppress { track, .. } | AudioCommand::Close { track } => *track,
        }
    }
}

/// One output packet of a processed track, to forward in place of the input.
#[derive(Debug, Clone)]
pub struct ProcessedAudio {
    /// The track.
    pub track: TrackKey,
    /// Sequence number: the input's, or a lost one's.
    pub seq: u64,
    /// RTP timestamp: the input's, or extrapolated for a lost one.
    pub timestamp: u32,
    /// The input's marker bit (false on concealed packets).
    pub marker: bool,
    /// The cleaned Opus packet.
    pub payload: Arc<[u8]>,
    /// RNNoise's speech probability of the packet's last 10 ms.
    pub speech_probability: f32,
    /// Arrival of the input packet.
    pub arrived: Instant,
}

/// What all processed tracks did, for metrics: counters that never go back
/// (closed tracks' counts are kept) and distributions sampled once a second
/// per track (levels) or per packet (processing time).
#[derive(Debug, Clone, PartialEq)]
pub struct AudioTotals {
    /// Tracks with a pipeline now.
    pub tracks: usize,
    /// Of those, the ones being denoised.
    pub suppressed: usize,
    /// Packets processed.
    pub packets: u64,
    /// Packets lost before the server.
    pub lost: u64,
    /// Lost packets rebuilt from in-band FEC.
    pub fec_recovered: u64,
    /// Packets concealed (lost without FEC, or undecodable).
    pub concealed: u64,
    /// Undecodable input packets.
    pub decode_errors: u64,
    /// Input RMS level, dBFS.
    pub input_level: Histogram,
    /// Input noise floor, dBFS.
    pub noise_floor: Histogram,
    /// Estimated SNR before suppression, dB.
    pub snr_before: Histogram,
    /// Estimated SNR after suppression, dB.
    pub snr_after: Histogram,
    /// Attenuation applied, dB.
    pub attenuation: Histogram,
    /// Speech probability (RNNoise VAD).
    pub speech_probability: Histogram,
    /// Processing time per packet, seconds.
    pub processing: Histogram,
}

impl Default for AudioTotals {
    fn default() -> Self {
        AudioTotals {
            tracks: 0,
            suppressed: 0,
            packets: 0,
            lost: 0,
            fec_recovered: 0,
            concealed: 0,
            decode_errors: 0,
            input_level: Histogram::new(bounds::LEVEL_DBFS),
            noise_floor: Histogram::new(bounds::LEVEL_DBFS),
            snr_before: Histogram::new(bounds::DECIBELS),
            snr_after: Histogram::new(bounds::DECIBELS),
            attenuation: Histogram::new(bounds::DECIBELS),
            speech_probability: Histogram::new(bounds::RATIO),
            processing: Histogram::new(bounds::PROCESSING_SECONDS),
        }
    }
}

impl AudioTotals {
    /// Adds another thread's totals.
    pub fn merge(&mut self, other: &AudioTotals) {
        self.tracks += other.tracks;
        self.suppressed += other.suppressed;
        self.packets += other.packets;
        self.lost += other.lost;
        self.fec_recovered += other.fec_recovered;
        self.concealed += other.concealed;
        self.decode_errors += other.decode_errors;
        self.input_level.merge(&other.input_level);
        self.noise_floor.merge(&other.noise_floor);
        self.snr_before.merge(&other.snr_before);
        self.snr_after.merge(&other.snr_after);
        self.attenuation.merge(&other.attenuation);
        self.speech_probability.merge(&other.speech_probability);
        self.processing.merge(&other.processing);
    }

    /// Adds a track's packet counters (for a closed track, or a snapshot).
    pub fn add_counters(&mut self, meters: &TrackMeters) {
        self.packets += meters.packets.received;
        self.lost += meters.packets.lost;
        self.fec_recovered += meters.packets.fec_recovered;
        self.concealed += meters.packets.concealed;
        self.decode_errors += meters.packets.decode_errors;
    }

    fn sample_levels(&mut self, meters: &TrackMeters) {
        self.input_level.observe(f64::from(meters.input.rms_dbfs));
        self.noise_floor.observe(f64::from(meters.input.noise_floor_dbfs));
        self.snr_before.observe(f64::from(meters.input.snr_db));
        self.snr_after.observe(f64::from(meters.output.snr_db));
        self.speech_probability.observe(f64::from(meters.speech.probability));
        if meters.suppression.enabled {
            self.attenuation.observe(f64::from(meters.suppression.attenuation_db));
        }
    }
}

/// Levels are sampled into [`AudioTotals`] once per this many packets (1 s).
const SAMPLE_EVERY_PACKETS: u64 = 50;

/// Keeps one track's processed output continuous. Sans-IO.
#[derive(Debug)]
pub struct TrackProcessor {
    pipeline: Pipeline,
    /// The sequence number expected next, and the timestamp it should carry.
    next: Option<(u64, u32)>,
    out: Vec<u8>,
}

impl TrackProcessor {
    /// A processor for a new track.
    pub fn new(config: PipelineConfig) -> Result<Self, fleetcall_dsp::DspError> {
        Ok(TrackProcessor { pipeline: Pipeline::new(config)?, next: None, out: Vec::with_capacity(1500) })
    }

    /// Processes one packet, appending the output packets to `results`: one
    /// per lost packet before it (concealed, or rebuilt from its FEC), then
    /// one for it. A packet older than one already processed is dropped.
    ///
    /// `clock` is the caller's: it times the packet's own decode, denoise and
    /// encode for the processing-time meters, the one thing here that needs
    /// to know how long work took.
    pub fn process(&mut self, clock: impl Fn() -> Instant, track: TrackKey, packet: &AudioPacket, results: &mut Vec<ProcessedAudio>, totals: &mut AudioTotals) {
        if let Some((next_seq, mut next_ts)) = self.next {
            if packet.seq < next_seq {
                return; // late: its slot was concealed already
            }
            let missing = packet.seq - next_seq;
            if missing > 0 && missing <= MAX_CONCEALED_RUN {
                for i in 0..missing {
                    let next_packet = (i + 1 == missing).then_some(&packet.payload[..]);
                    let Ok(lost) = self.pipeline.process_lost(next_packet, &mut self.out) else { continue };
                    results.push(ProcessedAudio {
                        track,
                        seq: next_seq + i,
                        timestamp: next_ts,
                        marker: false,
                        payload: self.out.as_slice().into(),
                        speech_probability: lost.speech_probability,
                        arrived: packet.arrived,
                    });
                    next_ts = next_ts.wrapping_add(lost.samples);
                }
            }
        }
        let started = clock();
        let Ok(processed) = self.pipeline.process(&packet.payload, &mut self.out) else { return };
        let elapsed = clock().saturating_duration_since(started);
        self.pipeline.record_processing_time(elapsed);
        totals.processing.observe(elapsed.as_secs_f64());
        if self.pipeline.meters().packets.received.is_multiple_of(SAMPLE_EVERY_PACKETS) {
            totals.sample_levels(self.pipeline.meters());
        }
        results.push(ProcessedAudio {
            track,
            seq: packet.seq,
            timestamp: packet.timestamp,
            marker: packet.marker,
            payload: self.out.as_slice().into(),
            speech_probability: processed.speech_probability,
            arrived: packet.arrived,
        });
        self.next = Some((packet.seq + 1, packet.timestamp.wrapping_add(processed.samples)));
    }

    /// Switches suppression, fading.
    pub fn set_suppression(&mut self, on: bool) {
        self.pipeline.set_suppression(on);
    }

    /// The track's meters.
    pub fn meters(&self) -> &TrackMeters {
        self.pipeline.meters()
    }

    /// Whether it is denoising now.
    pub fn suppressing(&self) -> bool {
        self.pipeline.meters().suppression.enabled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ParticipantId;

    fn opus_packets(count: usize) -> Vec<Vec<u8>> {
        let encoder = audiopus::coder::Encoder::new(audiopus::SampleRate::Hz48000, audiopus::Channels::Mono, audiopus::Application::Voip).unwrap();
        (0..count)
            .map(|i| {
                let frame: Vec<i16> = (0..960).map(|n| ((((i * 960 + n) as f32) * 0.05).sin() * 3000.0) as i16).collect();
                let mut out = vec![0u8; 1500];
                let len = encoder.encode(&frame, &mut out).unwrap();
                out.truncate(len);
                out
            })
            .collect()
    }

    fn packet(seq: u64, payload: &[u8]) -> AudioPacket {
        AudioPacket { seq, timestamp: 1000 + (seq as u32) * 960, marker: seq == 0, payload: payload.into(), arrived: Instant::now() }
    }

    #[test]
    fn output_is_continuous_through_loss_and_reordering() {
        let track = TrackKey { publisher: ParticipantId(1), mid: "0".into() };
        let mut processor = TrackProcessor::new(PipelineConfig::default()).unwrap();
        let payloads = opus_packets(10);
        let mut out = Vec::new();
        // 0, 1, [2, 3 lost], 4, 5, 3 (late), 6..9
        for seq in [0u64, 1, 4, 5, 3, 6, 7, 8, 9] {
            processor.process(Instant::now, track, &packet(seq, &payloads[seq as usize]), &mut out, &mut AudioTotals::default());
        }
        let seqs: Vec<u64> = out.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, (0..10).collect::<Vec<_>>(), "one packet per sequence number, in order");
        for pair in out.windows(2) {
            assert_eq!(pair[1].timestamp.wrapping_sub(pair[0].timestamp), 960, "timestamps advance by the packet duration");
        }
        assert!(out[0].marker && out.iter().skip(1).all(|p| !p.marker));
        assert_eq!(processor.meters().packets.lost, 2);
    }

    #[test]
    fn a_long_outage_restarts_the_stream_instead_of_concealing_it() {
        let track = TrackKey { publisher: ParticipantId(1), mid: "0".into() };
        let mut processor = TrackProcessor::new(PipelineConfig::default()).unwrap();
        let payloads = opus_packets(2);
        let mut out = Vec::new();
        let mut totals = AudioTotals::default();
        processor.process(Instant::now, track, &packet(0, &payloads[0]), &mut out, &mut totals);
        processor.process(Instant::now, track, &packet(1000, &payloads[1]), &mut out, &mut totals);
        assert_eq!(totals.processing.count, 2);
        assert_eq!(out.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![0, 1000]);
    }

    #[test]
    fn policy_prefers_device_then_room_then_default() {
        let mut policy = SuppressionPolicy::default();
        let (room, other) = (RoomId::from("icu"), RoomId::from("lobby"));
        assert!(!policy.applies(&room, "bed-1"));
        policy.apply(PolicyChange::Default { on: true });
        policy.apply(PolicyChange::Room { room: room.clone(), on: Some(false) });
        assert!(!policy.applies(&room, "bed-1"));
        assert!(policy.applies(&other, "bed-1"));
        policy.apply(PolicyChange::Device { device: "bed-1".into(), on: Some(true) });
        assert!(policy.applies(&room, "bed-1"));
        policy.apply(PolicyChange::Device { device: "bed-1".into(), on: None });
        assert!(!policy.applies(&room, "bed-1"));
    }
}
