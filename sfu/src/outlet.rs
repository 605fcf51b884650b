//! The one write path: a subscriber's outgoing m-line ([`Outlet`]) and how a
//! publisher's packet is written into it.
//!
//! An outlet carries either one publisher track for as long as both exist
//! (a *track* outlet: video, and audio in rooms small enough to forward
//! everyone to everyone) or whichever speaker the selection puts there (an
//! audio *slot*, see [`crate::speakers`]). Both write the same way; each
//! outlet is one str0m `StreamTx` with its own SSRC, and [`Rewrite`] keeps
//! what the subscriber receives on it one continuous RTP stream:
//!
//! - sequence numbers: the publisher's, shifted so the outlet's first packet
//!   lies under 2^15 (the receiver's SRTP rollover counter starts at 0, and
//!   it has no other way to learn it) and, in a slot, so the first packet
//!   after a speaker switch is the previous packet's + 1 (a speaker's own
//!   losses stay gaps, as they should for the receiver's loss statistics);
//! - timestamps: the publisher's; in a slot, shifted at a switch so the first
//!   packet after it lies the elapsed wall-clock time (at 48 kHz, at least
//!   one 20 ms frame) after the previous one, so the jitter buffer sees time
//!   move on;
//! - in a slot, the marker bit on the first packet after a switch (start of a
//!   talk spurt: the jitter buffer may resynchronise there) and the speaker's
//!   participant id (low 32 bits) as the CSRC, so a client can tell who is in
//!   a slot with `RTCRtpReceiver.getContributingSources()`.
//!
//! A track outlet never switches, so for it the rewrite is a fixed offset.

use std::sync::Arc;
use std::time::Instant;

use str0m::format::Codec;
use str0m::media::{Mid, Pt};
use str0m::rtp::{ExtensionValues, RtpWrite};
use str0m::Rtc;

use crate::ids::TrackKey;

/// Opus RTP clock.
const CLOCK_HZ: u64 = 48_000;

/// The least a timestamp moves across a switch: one 20 ms frame.
const MIN_SWITCH_ADVANCE: u32 = 960;

/// A publisher's packet to write to subscribers.
#[derive(Debug)]
pub(crate) struct Packet {
    /// The publisher's payload type.
    pub pt: Pt,
    /// The publisher's extended sequence number.
    pub seq: u64,
    pub timestamp: u32,
    pub marker: bool,
    pub exts: ExtensionValues,
    pub payload: Arc<[u8]>,
    pub arrived: Instant,
}

/// Where an outgoing m-line stands in SDP negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutState {
    /// In an offer the participant has not answered yet.
    Negotiating,
    /// Negotiated: packets flow.
    Open,
}

/// What an outlet carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Carries {
    /// One publisher track.
    Track,
    /// Whichever speaker the room's selection assigns.
    Slot,
}

/// One outgoing m-line of a subscriber.
#[derive(Debug)]
pub(crate) struct Outlet {
    /// Its m-line, once offered.
    pub mid: Option<Mid>,
    pub state: OutState,
    carries: Carries,
    /// Publisher payload type -> subscriber payload type, for the last one seen.
    pt: Option<(Pt, Pt)>,
    rewrite: Rewrite,
}

impl Outlet {
    /// A track outlet on a just-offered m-line.
    pub(crate) fn track(mid: Mid) -> Self {
        Outlet { mid: Some(mid), state: OutState::Negotiating, carries: Carries::Track, pt: None, rewrite: Rewrite::default() }
    }

    /// An audio slot, offered later.
    pub(crate) fn slot() -> Self {
        Outlet { mid: None, state: OutState::Negotiating, carries: Carries::Slot, pt: None, rewrite: Rewrite::default() }
    }

    /// Offered on `mid`, waiting for the answer.
    pub(crate) fn offer(&mut self, mid: Mid) {
        self.mid = Some(mid);
        self.state = OutState::Negotiating;
    }

    /// Offered and answered: packets flow.
    pub(crate) fn is_open(&self) -> bool {
        self.mid.is_some() && self.state == OutState::Open
    }

    /// Writes a packet of `source` into the subscriber's `rtc` on this
    /// m-line (SRTP and the datagram follow when the `Rtc` is drained).
    /// False when it cannot be routed: the codec is not negotiated on the
    /// m-line, the stream is gone, or the packet is from before the latest
    /// switch.
    pub(crate) fn write(&mut self, rtc: &mut Rtc, source: TrackKey, codec: Codec, packet: &Packet) -> bool {
        let Some(mid) = self.mid.filter(|_| self.state == OutState::Open) else { return false };
        let pt = match self.pt {
            Some((pt_in, pt_out)) if pt_in == packet.pt => pt_out,
            _ => {
                let Some(pt_out) = negotiated_pt(rtc, mid, codec) else { return false };
                self.pt = Some((packet.pt, pt_out));
                pt_out
            }
        };
        let Some(rewritten) = self.rewrite.map(source, packet.seq, packet.timestamp, packet.arrived) else { return false };
        let mut api = rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, None) else { return false };
        let write = RtpWrite::new(pt, rewritten.seq.into(), rewritten.timestamp, packet.arrived, packet.payload.clone())
            .ext_vals(packet.exts.clone())
            .nackable(codec.is_video());
        let write = match self.carries {
            Carries::Track => write.marker(packet.marker),
            Carries::Slot => write.marker(packet.marker || rewritten.switched).csrc(&[source.publisher.0 as u32]),
        };
        tx.write_rtp(write);
        true
    }
}

/// The payload type the subscriber negotiated for `codec` on `mid`.
fn negotiated_pt(rtc: &Rtc, mid: Mid, codec: Codec) -> Option<Pt> {
    let media = rtc.media(mid)?;
    let params = rtc.codec_config().params();
    media.remote_pts().iter().copied().find(|pt| params.iter().any(|p| p.pt() == *pt && p.spec().codec == codec))
}

/// A rewritten packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rewritten {
    /// Extended sequence number in the outlet's stream.
    seq: u64,
    /// RTP timestamp in the outlet's stream.
    timestamp: u32,
    /// First packet of a new publisher in the stream (or the very first).
    switched: bool,
}

/// The sequence and timestamp state of one outlet's stream.
#[derive(Debug, Default, Clone)]
struct Rewrite {
    /// The publisher's track whose packets the stream carries now.
    current: Option<TrackKey>,
    /// Added to the publisher's extended sequence number.
    seq_offset: i64,
    /// The first output sequence number of the current publisher: anything
    /// older belongs to before the switch and is dropped.
    first_seq: u64,
    /// Added (wrapping) to the publisher's timestamp.
    ts_offset: u32,
    /// The last packet written: output seq, timestamp, arrival.
    last: Option<(u64, u32, Instant)>,
}

impl Rewrite {
    /// Maps a packet of `source` (extended seq, timestamp, arrival) into
    /// the stream; `None` for a packet from before the latest switch.
    fn map(&mut self, source: TrackKey, seq: u64, timestamp: u32, arrived: Instant) -> Option<Rewritten> {
        let switched = self.current != Some(source);
        if switched {
            let (out_seq, out_ts) = match self.last {
                // Keep the first stream under 2^16 so the receiver's SRTP
                // rollover counter starts at 0 (str0m's ROC caveat).
                None => (seq & 0x7fff, timestamp),
                Some((last_seq, last_ts, at)) => {
                    let elapsed = arrived.saturating_duration_since(at);
                    let samples = (elapsed.as_micros() as u64 * CLOCK_HZ / 1_000_000).min(u64::from(u32::MAX / 4)) as u32;
                    (last_seq + 1, last_ts.wrapping_add(samples.max(MIN_SWITCH_ADVANCE)))
                }
            };
            self.current = Some(source);
            self.seq_offset = out_seq as i64 - seq as i64;
            self.first_seq = out_seq;
            self.ts_offset = out_ts.wrapping_sub(timestamp);
        }
        let out_seq = u64::try_from(seq as i64 + self.seq_offset).ok().filter(|s| *s >= self.first_seq)?;
        let out_ts = timestamp.wrapping_add(self.ts_offset);
        let newest = self.last.is_none_or(|(last_seq, _, _)| out_seq > last_seq);
        if newest {
            self.last = Some((out_seq, out_ts, arrived));
        }
        Some(Rewritten { seq: out_seq, timestamp: out_ts, switched })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ids::ParticipantId;

    fn speaker(n: u64) -> TrackKey {
        TrackKey { publisher: ParticipantId(n), mid: "0".into() }
    }

    #[test]
    fn a_switch_continues_sequence_and_advances_time_by_the_gap() {
        let (a, b) = (speaker(1), speaker(2));
        let start = Instant::now();
        let mut slot = Rewrite::default();
        let first = slot.map(a, 70_000, 5_000, start).unwrap();
        assert!(first.switched && first.seq < 0x8000);
        let second = slot.map(a, 70_001, 5_960, start + Duration::from_millis(20)).unwrap();
        assert_eq!((second.seq, second.timestamp, second.switched), (first.seq + 1, 5_960, false));
        // b's first packet 300 ms later, with unrelated numbers.
        let third = slot.map(b, 12, 4_000_000_000, start + Duration::from_millis(320)).unwrap();
        assert_eq!(third.seq, second.seq + 1);
        assert_eq!(third.timestamp, 5_960 + 300 * 48);
        assert!(third.switched);
        let fourth = slot.map(b, 13, 4_000_000_960, start + Duration::from_millis(340)).unwrap();
        assert_eq!((fourth.seq, fourth.timestamp, fourth.switched), (third.seq + 1, third.timestamp + 960, false));
        // A late packet of b from before the switch, and of a after it.
        assert_eq!(slot.map(b, 11, 3_999_999_040, start + Duration::from_millis(341)), None);
        assert!(slot.map(a, 70_002, 6_920, start + Duration::from_millis(342)).unwrap().switched);
    }

    #[test]
    fn an_immediate_switch_still_moves_one_frame() {
        let start = Instant::now();
        let mut slot = Rewrite::default();
        let first = slot.map(speaker(1), 1, 0, start).unwrap();
        let second = slot.map(speaker(2), 900, 77, start).unwrap();
        assert_eq!(second.seq, first.seq + 1);
        assert_eq!(second.timestamp, 960);
    }

    #[test]
    fn a_speakers_own_loss_stays_a_gap() {
        let start = Instant::now();
        let mut slot = Rewrite::default();
        let first = slot.map(speaker(1), 10, 0, start).unwrap();
        let after_loss = slot.map(speaker(1), 12, 1920, start + Duration::from_millis(40)).unwrap();
        assert_eq!(after_loss.seq, first.seq + 2);
    }

    #[test]
    fn one_publisher_keeps_its_timestamps_and_its_reordering() {
        let start = Instant::now();
        let mut track = Rewrite::default();
        let first = track.map(speaker(1), 0x1_fff0, 123_456, start).unwrap();
        assert!(first.seq < 0x8000, "the first packet starts the rollover counter at 0");
        assert_eq!(first.timestamp, 123_456);
        let later = track.map(speaker(1), 0x2_0005, 123_456 + 21 * 960, start + Duration::from_millis(420)).unwrap();
        let reordered = track.map(speaker(1), 0x2_0004, 123_456 + 20 * 960, start + Duration::from_millis(421)).unwrap();
        assert_eq!((later.seq - first.seq, later.timestamp), (0x15, 123_456 + 21 * 960));
        assert_eq!(reordered.seq, later.seq - 1, "a late packet after the first is still written");
        assert!(!later.switched && !reordered.switched);
    }
}
