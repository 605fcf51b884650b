//! What a core counts: plain numbers a driver turns into metrics and admin
//! API answers. Nothing here knows Prometheus or JSON.

use std::collections::BTreeMap;

use crate::histogram::{bounds, Histogram};

/// Datagrams the core dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounts {
    /// From an address no participant uses, not a STUN request for one.
    pub unknown_source: u64,
    /// Not a STUN, DTLS, RTP or RTCP datagram.
    pub malformed: u64,
    /// The participant's `Rtc` refused it.
    pub rejected: u64,
    /// RTP that could not be routed (unknown SSRC, codec the subscriber lacks,
    /// sequence number from before the subscription).
    pub unroutable: u64,
    /// RTP from a participant whose grant does not let it publish.
    pub not_permitted: u64,
    /// Audio for a DSP pipeline that already had its queue full
    /// (`SfuConfig::dsp_queue_per_track`).
    pub dsp_overflow: u64,
    /// Longer than `SfuConfig::max_datagram`: no WebRTC stack sends more
    /// than a path MTU.
    pub oversize: u64,
    /// STUN naming one participant from an address another participant
    /// holds: never allowed to take the address over (see `Demux`).
    pub address_taken: u64,
}

/// Counts that prove nothing leaks, traffic counters, and the quality the
/// participants report over RTCP.
#[derive(Debug, Clone, PartialEq)]
pub struct SfuStats {
    /// Rooms with at least one participant.
    pub rooms: usize,
    /// Participants in all rooms.
    pub participants: usize,
    /// Incoming tracks (published m-lines).
    pub tracks: usize,
    /// Publisher track -> subscriber entries, negotiating or open.
    pub forwarding_entries: usize,
    /// Demux keys (remote addresses and ufrags) still held.
    pub demux_entries: usize,
    /// Audio tracks going through a DSP pipeline.
    pub processed_tracks: usize,
    /// Of those, the ones being denoised now.
    pub suppressed_tracks: usize,
    /// Datagrams received.
    pub datagrams_in: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Datagrams sent.
    pub datagrams_out: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// RTP packets written to a subscriber.
    pub rtp_forwarded: u64,
    /// Dropped datagrams.
    pub dropped: DropCounts,
    /// Participants removed, by [`LeaveReason::as_str`](crate::LeaveReason::as_str).
    pub removed: BTreeMap<&'static str, u64>,
    /// NACKs participants sent about what we forward to them.
    pub nacks_received: u64,
    /// PLI and FIR participants sent.
    pub keyframe_requests_received: u64,
    /// Keyframe requests we sent to publishers.
    pub keyframe_requests_sent: u64,
    /// Loss fraction participants report (RTCP receiver reports), per report.
    pub reported_loss: Histogram,
    /// Jitter participants report, seconds, per report.
    pub reported_jitter: Histogram,
    /// Round-trip time to participants, seconds, per report.
    pub rtt: Histogram,
    /// From join to the first audio packet forwarded to the participant, seconds.
    pub join_to_first_audio: Histogram,
    /// Rooms forwarding audio by speaker selection (audio slots).
    pub slot_rooms: usize,
    /// Audio slot m-lines, negotiating or open.
    pub audio_slots: usize,
    /// Audio tracks speaking now, all rooms.
    pub speaking: usize,
    /// Changes of a room's selection of speakers.
    pub speaker_changes: u64,
    /// A listener's slot given to another speaker.
    pub slot_switches: u64,
    /// Audio packets in slot rooms from selected speakers (forwarded).
    pub selection_forwarded: u64,
    /// Audio packets in slot rooms from unselected publishers (not forwarded).
    pub selection_suppressed: u64,
    /// Tracks speaking in a room, observed at every change of its speakers.
    pub room_speakers: Histogram,
}

impl Default for SfuStats {
    fn default() -> Self {
        SfuStats {
            rooms: 0,
            participants: 0,
            tracks: 0,
            forwarding_entries: 0,
            demux_entries: 0,
            processed_tracks: 0,
            suppressed_tracks: 0,
            datagrams_in: 0,
            bytes_in: 0,
            datagrams_out: 0,
            bytes_out: 0,
            rtp_forwarded: 0,
            dropped: DropCounts::default(),
            removed: BTreeMap::new(),
            nacks_received: 0,
            keyframe_requests_received: 0,
            keyframe_requests_sent: 0,
            reported_loss: Histogram::new(bounds::LOSS_RATIO),
            reported_jitter: Histogram::new(bounds::JITTER_SECONDS),
            rtt: Histogram::new(bounds::RTT_SECONDS),
            join_to_first_audio: Histogram::new(bounds::LATENCY_SECONDS),
            slot_rooms: 0,
            audio_slots: 0,
            speaking: 0,
            speaker_changes: 0,
            slot_switches: 0,
            selection_forwarded: 0,
            selection_suppressed: 0,
            room_speakers: Histogram::new(bounds::SPEAKERS),
        }
    }
}

impl SfuStats {
    /// Adds another core's stats (counts, counters and histograms).
    pub fn merge(&mut self, other: &SfuStats) {
        self.rooms += other.rooms;
        self.participants += other.participants;
        self.tracks += other.tracks;
        self.forwarding_entries += other.forwarding_entries;
        self.demux_entries += other.demux_entries;
        self.processed_tracks += other.processed_tracks;
        self.suppressed_tracks += other.suppressed_tracks;
        self.datagrams_in += other.datagrams_in;
        self.bytes_in += other.bytes_in;
        self.datagrams_out += other.datagrams_out;
        self.bytes_out += other.bytes_out;
        self.rtp_forwarded += other.rtp_forwarded;
        self.dropped.unknown_source += other.dropped.unknown_source;
        self.dropped.malformed += other.dropped.malformed;
        self.dropped.rejected += other.dropped.rejected;
        self.dropped.unroutable += other.dropped.unroutable;
        self.dropped.not_permitted += other.dropped.not_permitted;
        self.dropped.dsp_overflow += other.dropped.dsp_overflow;
        self.dropped.oversize += other.dropped.oversize;
        self.dropped.address_taken += other.dropped.address_taken;
        for (reason, count) in &other.removed {
            *self.removed.entry(reason).or_default() += count;
        }
        self.nacks_received += other.nacks_received;
        self.keyframe_requests_received += other.keyframe_requests_received;
        self.keyframe_requests_sent += other.keyframe_requests_sent;
        self.reported_loss.merge(&other.reported_loss);
        self.reported_jitter.merge(&other.reported_jitter);
        self.rtt.merge(&other.rtt);
        self.join_to_first_audio.merge(&other.join_to_first_audio);
        self.slot_rooms += other.slot_rooms;
        self.audio_slots += other.audio_slots;
        self.speaking += other.speaking;
        self.speaker_changes += other.speaker_changes;
        self.slot_switches += other.slot_switches;
        self.selection_forwarded += other.selection_forwarded;
        self.selection_suppressed += other.selection_suppressed;
        self.room_speakers.merge(&other.room_speakers);
    }
}
