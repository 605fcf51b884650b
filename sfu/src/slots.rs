//! Audio slots: a listener's fixed outgoing audio m-lines that carry whoever
//! the speaker selection puts there.
//!
//! Each slot is one str0m `StreamTx` with its own SSRC, so the listener sees
//! one continuous RTP stream per slot whatever the speaker:
//!
//! - sequence numbers: the speaker's, shifted so the first packet after a
//!   switch is the previous packet's + 1 (a speaker's own losses stay gaps,
//!   as they should for the receiver's loss statistics);
//! - timestamps: the speaker's, shifted so the first packet after a switch
//!   lies the elapsed wall-clock time (at 48 kHz, at least one 20 ms frame)
//!   after the previous one, so the jitter buffer sees time move on;
//! - the marker bit on the first packet after a switch (start of a talk
//!   spurt: the jitter buffer may resynchronise there);
//! - the CSRC is the speaker's participant id (low 32 bits), so a client can
//!   tell who is in a slot with `RTCRtpReceiver.getContributingSources()`.

use std::time::Instant;

use str0m::media::{Mid, Pt};

use crate::participant::{OutState, TrackKey};

/// Opus RTP clock.
const CLOCK_HZ: u64 = 48_000;

/// The least a timestamp moves across a switch: one 20 ms frame.
const MIN_SWITCH_ADVANCE: u32 = 960;

/// One outgoing audio slot of a listener.
#[derive(Debug)]
pub(crate) struct Slot {
    /// Its m-line, once offered.
    pub mid: Option<Mid>,
    pub state: OutState,
    /// The speaker's track assigned to it by the selection.
    pub source: Option<TrackKey>,
    /// Publisher payload type -> listener payload type, for the last one seen.
    pub pt: Option<(Pt, Pt)>,
    rewrite: Rewrite,
}

impl Slot {
    pub(crate) fn new() -> Self {
        Slot { mid: None, state: OutState::Negotiating, source: None, pt: None, rewrite: Rewrite::default() }
    }
}

impl std::ops::Deref for Slot {
    type Target = Rewrite;
    fn deref(&self) -> &Rewrite {
        &self.rewrite
    }
}

impl std::ops::DerefMut for Slot {
    fn deref_mut(&mut self) -> &mut Rewrite {
        &mut self.rewrite
    }
}

/// A rewritten packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// Extended sequence number in the slot's stream.
    pub seq: u64,
    /// RTP timestamp in the slot's stream.
    pub timestamp: u32,
    /// First packet after a speaker switch (or the very first).
    pub switched: bool,
}

/// The sequence and timestamp state of one slot's stream.
#[derive(Debug, Default, Clone)]
pub struct Rewrite {
    /// The speaker's track whose packets the stream carries now.
    current: Option<TrackKey>,
    /// Added to the speaker's extended sequence number.
    seq_offset: i64,
    /// The first output sequence number of the current speaker: anything
    /// older belongs to before the switch and is dropped.
    first_seq: u64,
    /// Added (wrapping) to the speaker's timestamp.
    ts_offset: u32,
    /// The last packet written: output seq, timestamp, arrival.
    last: Option<(u64, u32, Instant)>,
}

impl Rewrite {
    /// Maps a packet of `speaker` (extended seq, timestamp, arrival) into
    /// the stream; `None` for a packet from before the latest switch.
    pub fn map(&mut self, speaker: TrackKey, seq: u64, timestamp: u32, arrived: Instant) -> Option<Rewritten> {
        let switched = self.current != Some(speaker);
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
            self.current = Some(speaker);
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

    /// The speaker's track the stream carries now.
    pub fn current(&self) -> Option<TrackKey> {
        self.current
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
}
