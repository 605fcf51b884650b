//! The media plane's Prometheus series: every name in one place.
//!
//! Cores keep plain stats ([`SfuStats`], [`AudioTotals`]); at scrape time the
//! driver turns them into metric families here. Labels are bounded: drop
//! reasons, removal reasons, stages. Nothing per room, participant or packet.
//!
//! The family builder ([`Family`]) is shared with the server's other series.

use fleetcall_sfu::audio::AudioTotals;
use fleetcall_sfu::histogram::Histogram;
use fleetcall_sfu::SfuStats;
use prometheus::proto::{Bucket, Counter, Gauge, Histogram as PromHistogram, LabelPair, Metric, MetricFamily, MetricType};

/// A metric family under construction.
#[derive(Debug)]
pub struct Family(MetricFamily);

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Family {
        let mut family = MetricFamily::default();
        family.set_name(name.to_owned());
        family.set_help(help.to_owned());
        family.set_field_type(kind);
        Family(family)
    }

    /// A counter family (name ends in `_total`).
    pub fn counter(name: &str, help: &str) -> Family {
        Family::new(name, help, MetricType::COUNTER)
    }

    /// A gauge family.
    pub fn gauge(name: &str, help: &str) -> Family {
        Family::new(name, help, MetricType::GAUGE)
    }

    /// A histogram family.
    pub fn histogram(name: &str, help: &str) -> Family {
        Family::new(name, help, MetricType::HISTOGRAM)
    }

    /// Adds one series with `labels` and `value` (counter or gauge).
    pub fn value(mut self, labels: &[(&str, &str)], value: f64) -> Family {
        let mut metric = metric(labels);
        match self.0.get_field_type() {
            MetricType::COUNTER => {
                let mut counter = Counter::default();
                counter.set_value(value);
                metric.set_counter(counter);
            }
            _ => {
                let mut gauge = Gauge::default();
                gauge.set_value(value);
                metric.set_gauge(gauge);
            }
        }
        self.0.mut_metric().push(metric);
        self
    }

    /// Adds one histogram series from plain bucket counts.
    pub fn buckets(mut self, labels: &[(&str, &str)], bounds: &[f64], counts: &[u64], sum: f64, count: u64) -> Family {
        let mut histogram = PromHistogram::default();
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(bounds.len());
        for (bound, n) in bounds.iter().zip(counts) {
            cumulative += n;
            let mut bucket = Bucket::default();
            bucket.set_upper_bound(*bound);
            bucket.set_cumulative_count(cumulative);
            buckets.push(bucket);
        }
        histogram.set_bucket(buckets);
        histogram.set_sample_sum(sum);
        histogram.set_sample_count(count);
        let mut metric = metric(labels);
        metric.set_histogram(histogram);
        self.0.mut_metric().push(metric);
        self
    }

    /// Adds one series from a [`Histogram`].
    pub fn observed(self, labels: &[(&str, &str)], histogram: &Histogram) -> Family {
        self.buckets(labels, histogram.bounds, &histogram.counts, histogram.sum, histogram.count)
    }

    /// The finished family.
    pub fn build(self) -> MetricFamily {
        self.0
    }
}

fn metric(labels: &[(&str, &str)]) -> Metric {
    let mut metric = Metric::default();
    metric.set_label(
        labels
            .iter()
            .map(|(name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name((*name).to_owned());
                pair.set_value((*value).to_owned());
                pair
            })
            .collect(),
    );
    metric
}

/// Every media-plane series.
pub fn families(stats: &SfuStats, audio: &AudioTotals) -> Vec<MetricFamily> {
    let count = |n: usize| n as f64;
    let total = |n: u64| n as f64;
    let mut removed = Family::counter("fleetcall_participants_removed_total", "Participants removed from the SFU, by reason (ice_timeout and closed are ICE/DTLS failures).");
    for reason in ["requested", "ice_timeout", "signaling_closed", "negotiation_failed", "closed", "shutdown"] {
        removed = removed.value(&[("reason", reason)], total(stats.removed.get(reason).copied().unwrap_or(0)));
    }
    vec![
        Family::gauge("fleetcall_rooms", "Rooms with at least one participant.").value(&[], count(stats.rooms)).build(),
        Family::gauge("fleetcall_participants", "Participants in all rooms.").value(&[], count(stats.participants)).build(),
        Family::gauge("fleetcall_tracks", "Published tracks (incoming m-lines).").value(&[], count(stats.tracks)).build(),
        Family::gauge("fleetcall_forwarding_entries", "Publisher track to subscriber entries, negotiating or open.")
            .value(&[], count(stats.forwarding_entries))
            .build(),
        Family::counter("fleetcall_media_packets_total", "Media datagrams (RTP, RTCP, STUN, DTLS) by direction.")
            .value(&[("direction", "in")], total(stats.datagrams_in))
            .value(&[("direction", "out")], total(stats.datagrams_out))
            .build(),
        Family::counter("fleetcall_media_bytes_total", "Media bytes by direction.")
            .value(&[("direction", "in")], total(stats.bytes_in))
            .value(&[("direction", "out")], total(stats.bytes_out))
            .build(),
        Family::counter("fleetcall_rtp_forwarded_total", "RTP packets written to a subscriber.").value(&[], total(stats.rtp_forwarded)).build(),
        Family::counter("fleetcall_media_dropped_total", "Datagrams dropped, by reason.")
            .value(&[("reason", "unknown_source")], total(stats.dropped.unknown_source))
            .value(&[("reason", "malformed")], total(stats.dropped.malformed))
            .value(&[("reason", "rejected")], total(stats.dropped.rejected))
            .value(&[("reason", "unroutable")], total(stats.dropped.unroutable))
            .value(&[("reason", "not_permitted")], total(stats.dropped.not_permitted))
            .value(&[("reason", "dsp_overflow")], total(stats.dropped.dsp_overflow))
            .value(&[("reason", "oversize")], total(stats.dropped.oversize))
            .value(&[("reason", "address_taken")], total(stats.dropped.address_taken))
            .build(),
        removed.build(),
        Family::counter("fleetcall_rtcp_nacks_received_total", "NACKs participants sent about forwarded media.").value(&[], total(stats.nacks_received)).build(),
        Family::counter("fleetcall_rtcp_keyframe_requests_total", "Keyframe requests (PLI/FIR), by direction.")
            .value(&[("direction", "received")], total(stats.keyframe_requests_received))
            .value(&[("direction", "sent")], total(stats.keyframe_requests_sent))
            .build(),
        Family::histogram("fleetcall_rtcp_loss_ratio", "Loss fraction participants report in RTCP receiver reports.")
            .observed(&[], &stats.reported_loss)
            .build(),
        Family::histogram("fleetcall_rtcp_jitter_seconds", "Interarrival jitter participants report in RTCP receiver reports.")
            .observed(&[], &stats.reported_jitter)
            .build(),
        Family::histogram("fleetcall_rtt_seconds", "Round-trip time to participants from RTCP.").observed(&[], &stats.rtt).build(),
        Family::histogram("fleetcall_join_to_first_audio_seconds", "From joining the SFU to the first audio packet sent to the participant.")
            .observed(&[], &stats.join_to_first_audio)
            .build(),
        Family::gauge("fleetcall_slot_rooms", "Rooms forwarding audio by active-speaker selection into audio slots.").value(&[], count(stats.slot_rooms)).build(),
        Family::gauge("fleetcall_audio_slots", "Audio slot m-lines (listener slots), negotiating or open.").value(&[], count(stats.audio_slots)).build(),
        Family::gauge("fleetcall_speaking_tracks", "Audio tracks speaking now (speaker selection), all rooms.").value(&[], count(stats.speaking)).build(),
        Family::counter("fleetcall_speaker_changes_total", "Changes of a room's selection of speakers.").value(&[], total(stats.speaker_changes)).build(),
        Family::counter("fleetcall_audio_slot_switches_total", "A listener's audio slot given to another speaker.").value(&[], total(stats.slot_switches)).build(),
        Family::counter("fleetcall_audio_selection_packets_total", "Audio packets in slot rooms: forwarded (selected speaker) or suppressed by selection.")
            .value(&[("outcome", "forwarded")], total(stats.selection_forwarded))
            .value(&[("outcome", "suppressed")], total(stats.selection_suppressed))
            .build(),
        Family::histogram("fleetcall_room_speakers", "Tracks speaking in a room, observed at every change of its speakers.")
            .observed(&[], &stats.room_speakers)
            .build(),
        Family::gauge("fleetcall_audio_streams", "Audio tracks going through a DSP pipeline, by whether they are denoised now.")
            .value(&[("suppression", "on")], count(audio.suppressed))
            .value(&[("suppression", "off")], count(audio.tracks - audio.suppressed.min(audio.tracks)))
            .build(),
        Family::counter("fleetcall_audio_packets_total", "Audio packets through the DSP pipelines, by outcome.")
            .value(&[("outcome", "processed")], total(audio.packets))
            .value(&[("outcome", "lost")], total(audio.lost))
            .value(&[("outcome", "fec_recovered")], total(audio.fec_recovered))
            .value(&[("outcome", "concealed")], total(audio.concealed))
            .build(),
        Family::counter("fleetcall_audio_decode_errors_total", "Undecodable audio packets (concealed, the stream goes on).")
            .value(&[], total(audio.decode_errors))
            .build(),
        Family::histogram("fleetcall_audio_input_level_dbfs", "Input RMS level of processed tracks, sampled once a second per track.")
            .observed(&[], &audio.input_level)
            .build(),
        Family::histogram("fleetcall_audio_noise_floor_dbfs", "Input noise floor of processed tracks, sampled once a second per track.")
            .observed(&[], &audio.noise_floor)
            .build(),
        Family::histogram("fleetcall_audio_snr_db", "Estimated speech-to-noise ratio, before and after suppression.")
            .observed(&[("stage", "before")], &audio.snr_before)
            .observed(&[("stage", "after")], &audio.snr_after)
            .build(),
        Family::histogram("fleetcall_audio_attenuation_db", "Attenuation the suppressor applied, sampled once a second per denoised track.")
            .observed(&[], &audio.attenuation)
            .build(),
        Family::histogram("fleetcall_audio_speech_probability", "RNNoise speech probability, sampled once a second per track.")
            .observed(&[], &audio.speech_probability)
            .build(),
        Family::histogram("fleetcall_audio_processing_seconds", "DSP time per 20 ms audio packet (decode, denoise, encode).")
            .observed(&[], &audio.processing)
            .build(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(families: &[MetricFamily]) -> String {
        let mut buffer = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), families, &mut buffer).unwrap();
        String::from_utf8(buffer).unwrap()
    }

    #[test]
    fn series_follow_the_stats() {
        let mut stats = SfuStats { participants: 3, rtp_forwarded: 42, ..SfuStats::default() };
        stats.dropped.malformed = 7;
        stats.removed.insert("ice_timeout", 2);
        stats.join_to_first_audio.observe(0.08);
        let text = encode(&families(&stats, &AudioTotals::default()));
        assert!(text.contains("fleetcall_participants 3\n"), "{text}");
        assert!(text.contains("fleetcall_rtp_forwarded_total 42\n"));
        assert!(text.contains("fleetcall_media_dropped_total{reason=\"malformed\"} 7\n"));
        assert!(text.contains("fleetcall_participants_removed_total{reason=\"ice_timeout\"} 2\n"));
        assert!(text.contains("fleetcall_join_to_first_audio_seconds_bucket{le=\"0.1\"} 1\n"), "{text}");
        assert!(text.contains("fleetcall_join_to_first_audio_seconds_bucket{le=\"0.05\"} 0\n"));
        assert!(text.contains("fleetcall_join_to_first_audio_seconds_count 1\n"));
    }

    #[test]
    fn speaker_selection_series_follow_the_stats() {
        let mut stats = SfuStats { slot_rooms: 2, slot_switches: 9, selection_forwarded: 30, selection_suppressed: 70, ..SfuStats::default() };
        stats.room_speakers.observe(2.0);
        let text = encode(&families(&stats, &AudioTotals::default()));
        assert!(text.contains("fleetcall_slot_rooms 2\n"), "{text}");
        assert!(text.contains("fleetcall_audio_slot_switches_total 9\n"));
        assert!(text.contains("fleetcall_audio_selection_packets_total{outcome=\"suppressed\"} 70\n"));
        assert!(text.contains("fleetcall_room_speakers_bucket{le=\"2\"} 1\n"), "{text}");
        assert!(text.contains("fleetcall_room_speakers_bucket{le=\"1\"} 0\n"));
    }

    #[test]
    fn suppression_shows_in_the_audio_series() {
        let mut audio = AudioTotals { tracks: 2, suppressed: 1, packets: 100, ..AudioTotals::default() };
        audio.processing.observe(0.00025);
        let text = encode(&families(&SfuStats::default(), &audio));
        assert!(text.contains("fleetcall_audio_streams{suppression=\"on\"} 1\n"), "{text}");
        assert!(text.contains("fleetcall_audio_streams{suppression=\"off\"} 1\n"));
        assert!(text.contains("fleetcall_audio_processing_seconds_bucket{le=\"0.0003\"} 1\n"));
    }
}
