//! What a group of devices (a room, a call) sent and received: matches each
//! received packet to the frame it was sent as, and from that counts loss
//! per stream, jitter and end-to-end latency. Sans-IO: time is an argument.
//!
//! A received packet is matched by its RTP timestamp (each device of a group
//! has its own residue modulo one frame, so timestamps never collide; the
//! server keeps them in all-to-all forwarding, with or without noise
//! suppression) or, when the server rewrote the timestamp (audio slots,
//! Janus), by the bytes of its Opus payload. A timestamp match whose payload
//! differs is counted as re-encoded (suppression) — or as corrupted when the
//! server should pass audio through untouched.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::histogram::Histogram;

/// A device's index in its group.
pub type Member = usize;

/// How long sent frames stay matchable: far more than any sane latency.
const KEEP: Duration = Duration::from_secs(2);

/// A frame as it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentRef {
    /// Who sent it.
    pub sender: Member,
    /// When it was handed to the network.
    pub at: Instant,
    /// A talker's speech (counted for loss and latency), not comfort noise.
    pub talker: bool,
    /// Sent by a talking device (speech or the comfort noise of its pauses).
    pub speaker: bool,
    hash: u64,
}

/// How a received packet was matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// Same timestamp, same payload.
    Exact(SentRef),
    /// Same timestamp, other payload (re-encoded by the server).
    Reencoded(SentRef),
    /// Timestamp rewritten, payload identical.
    Payload(SentRef),
    /// The receiver's own frame came back.
    Own,
    /// Nothing sent in this group in the last seconds looks like it.
    Unknown,
}

/// Per receiver and sender.
#[derive(Debug, Clone, Default)]
struct Pair {
    /// Delivered in closed counting segments of the receiver.
    received_done: u64,
    /// Delivered in the open segment.
    seg_received: u64,
    /// Send times of the last packets delivered in the open segment (to
    /// take back those after the segment's cut).
    recent: VecDeque<Instant>,
    /// RFC 3550 interarrival jitter against the send clock, seconds.
    jitter: f64,
    last: Option<(Instant, Instant)>,
}

/// Delivered packets remembered per pair to close a segment: more than
/// arrive within [`GUARD`] at 50 packets per second.
const RECENT: usize = 32;

/// A receiver's counting ends this long before it stops listening: packets
/// in flight then are not its loss.
pub const GUARD: Duration = Duration::from_millis(200);

/// Talker sends are counted in buckets of this width.
const BUCKET: Duration = Duration::from_millis(100);

/// Per sender.
#[derive(Debug, Clone, Default)]
struct Sender {
    sent: u64,
    /// Talker packets per bucket of the window.
    buckets: Vec<u32>,
    /// Its talker packets count (false after a fault struck it).
    counted: bool,
}

/// Per receiver: when it counts loss.
#[derive(Debug, Clone, Default)]
struct Receiver {
    /// Counting since this bucket boundary.
    open: Option<Instant>,
    /// Closed counting segments: [start, end) on bucket boundaries.
    segments: Vec<(Instant, Instant)>,
}

/// Totals of a group, for the report.
#[derive(Debug, Clone, Default)]
pub struct LedgerTotals {
    /// Packets sent (talkers and comfort noise).
    pub sent: u64,
    /// Packets received (all).
    pub received: u64,
    /// Received and matched by timestamp and payload.
    pub exact: u64,
    /// Matched by timestamp with another payload.
    pub reencoded: u64,
    /// Matched by payload only.
    pub payload_only: u64,
    /// Not matched.
    pub unknown: u64,
    /// A device received its own audio.
    pub own: u64,
    /// Talker streams counted for loss (receiver, talker pairs).
    pub streams: u64,
    /// Their packets expected in the counting segments.
    pub expected: u64,
    /// Of those, received.
    pub delivered: u64,
    /// Loss of the worst stream (0..=1).
    pub worst_stream_loss: f64,
    /// Streams losing more than 1 %.
    pub streams_over_1pct: u64,
    /// End-to-end latency of matched talker packets.
    pub latency: Histogram,
    /// Final interarrival jitter per counted stream (recorded as durations).
    pub jitter: Histogram,
}

/// The group's record.
///
/// Loss is counted per (receiver, talker) stream over the receiver's
/// counting segments: from when the driver says it listens (after its
/// join settled, and not before the window) to when it stops (leaves, is
/// struck by a fault, or the window ends), less [`GUARD`]. Expected are
/// the talker packets sent in those segments (whole buckets), delivered
/// the ones received of them.
#[derive(Debug)]
pub struct Ledger {
    window: (Instant, Instant),
    by_ts: HashMap<u32, SentRef>,
    /// Payload hash -> frame; `None` when two frames share a payload.
    by_hash: HashMap<u64, Option<SentRef>>,
    expiry: VecDeque<(Instant, u32, u64)>,
    senders: Vec<Sender>,
    receivers: Vec<Receiver>,
    pairs: HashMap<(Member, Member), Pair>,
    totals: LedgerTotals,
}

impl Ledger {
    /// A group of `members`; loss is counted for frames sent in `window`.
    pub fn new(members: usize, window: (Instant, Instant)) -> Self {
        Ledger {
            window,
            by_ts: HashMap::new(),
            by_hash: HashMap::new(),
            expiry: VecDeque::new(),
            senders: vec![
                Sender {
                    counted: true,
                    ..Sender::default()
                };
                members
            ],
            receivers: vec![Receiver::default(); members],
            pairs: HashMap::new(),
            totals: LedgerTotals::default(),
        }
    }

    fn bucket_of(&self, at: Instant) -> Option<usize> {
        (at >= self.window.0 && at < self.window.1)
            .then(|| (at.duration_since(self.window.0).as_nanos() / BUCKET.as_nanos()) as usize)
    }

    /// The first bucket boundary at or after `at`, within the window.
    fn ceil(&self, at: Instant) -> Instant {
        if at <= self.window.0 {
            return self.window.0;
        }
        let n = at
            .duration_since(self.window.0)
            .as_nanos()
            .div_ceil(BUCKET.as_nanos());
        (self.window.0 + BUCKET * n as u32).min(self.window.1)
    }

    /// The last bucket boundary at or before `at`, within the window.
    fn floor(&self, at: Instant) -> Instant {
        if at <= self.window.0 {
            return self.window.0;
        }
        let n = at.duration_since(self.window.0).as_nanos() / BUCKET.as_nanos();
        (self.window.0 + BUCKET * n as u32).min(self.window.1)
    }

    /// A member sent a frame; `talker`: speech counted for loss and latency;
    /// `speaker`: the member is one of the talkers.
    pub fn on_sent(
        &mut self,
        now: Instant,
        sender: Member,
        timestamp: u32,
        payload: &[u8],
        talker: bool,
        speaker: bool,
    ) {
        self.expire(now);
        let hash = fnv1a(payload);
        let sent = SentRef {
            sender,
            at: now,
            talker,
            speaker,
            hash,
        };
        self.by_ts.insert(timestamp, sent);
        // Only speech is unique enough to be recognised by its bytes (the
        // comfort noise of silent devices repeats).
        if talker {
            self.by_hash
                .entry(hash)
                .and_modify(|e| *e = None)
                .or_insert(Some(sent));
        }
        self.expiry.push_back((now, timestamp, hash));
        self.totals.sent += 1;
        let bucket = self.bucket_of(now);
        let buckets = self
            .window
            .1
            .saturating_duration_since(self.window.0)
            .as_nanos()
            .div_ceil(BUCKET.as_nanos()) as usize;
        if let Some(s) = self.senders.get_mut(sender) {
            s.sent += 1;
            if let (true, true, Some(b)) = (talker, s.counted, bucket) {
                if s.buckets.is_empty() {
                    s.buckets = vec![0; buckets.max(1)];
                }
                if let Some(n) = s.buckets.get_mut(b) {
                    *n += 1;
                }
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, ts, hash)) = self.expiry.front() {
            if now.saturating_duration_since(at) < KEEP {
                break;
            }
            self.expiry.pop_front();
            if self.by_ts.get(&ts).is_some_and(|s| s.at == at) {
                self.by_ts.remove(&ts);
            }
            match self.by_hash.get(&hash) {
                Some(Some(s)) if s.at != at => {}
                _ => {
                    // Gone, ambiguous or this one: an ambiguous entry is
                    // dropped with its first frame (it may become matchable).
                    self.by_hash.remove(&hash);
                }
            }
        }
    }

    /// A member received a packet at `arrival`.
    pub fn on_received(
        &mut self,
        arrival: Instant,
        receiver: Member,
        timestamp: u32,
        payload: &[u8],
    ) -> Match {
        self.totals.received += 1;
        let hash = fnv1a(payload);
        let by_hash = match self.by_hash.get(&hash) {
            Some(Some(s)) => Some(*s),
            _ => None,
        };
        let found = match (self.by_ts.get(&timestamp), by_hash) {
            (Some(s), _) if s.hash == hash => Match::Exact(*s),
            // A rewritten timestamp may hit another frame's by chance: the
            // payload decides.
            (_, Some(s)) => Match::Payload(s),
            (Some(s), None) => Match::Reencoded(*s),
            (None, None) => Match::Unknown,
        };
        let sent = match found {
            Match::Exact(s) | Match::Reencoded(s) | Match::Payload(s) if s.sender == receiver => {
                self.totals.own += 1;
                return Match::Own;
            }
            Match::Exact(s) => {
                self.totals.exact += 1;
                s
            }
            Match::Reencoded(s) => {
                self.totals.reencoded += 1;
                s
            }
            Match::Payload(s) => {
                self.totals.payload_only += 1;
                s
            }
            Match::Own | Match::Unknown => {
                self.totals.unknown += 1;
                return Match::Unknown;
            }
        };
        if !sent.talker {
            return found;
        }
        let counting = self
            .receivers
            .get(receiver)
            .and_then(|r| r.open)
            .is_some_and(|open| sent.at >= open && sent.at < self.window.1);
        let pair = self.pairs.entry((receiver, sent.sender)).or_default();
        if counting {
            pair.seg_received += 1;
            if pair.recent.len() == RECENT {
                pair.recent.pop_front();
            }
            pair.recent.push_back(sent.at);
        }
        if let Some((last_arrival, last_sent)) = pair.last {
            // Packets out of order do not move the estimate.
            if arrival >= last_arrival && sent.at >= last_sent {
                let d =
                    (arrival - last_arrival).as_secs_f64() - (sent.at - last_sent).as_secs_f64();
                pair.jitter += (d.abs() - pair.jitter) / 16.0;
            }
        }
        pair.last = Some((arrival, sent.at));
        self.totals
            .latency
            .record(arrival.saturating_duration_since(sent.at));
        found
    }

    /// Member `r` listens from `at` on (its join settled): its loss counts
    /// from the next bucket boundary (not before the window).
    pub fn start_counting(&mut self, r: Member, at: Instant) {
        let start = self.ceil(at);
        if let Some(rx) = self.receivers.get_mut(r)
            && rx.open.is_none()
            && start < self.window.1
        {
            rx.open = Some(start);
        }
    }

    /// Member `r` stops listening at `now` (leaves, fault): its open segment
    /// closes [`GUARD`] earlier.
    pub fn stop_counting(&mut self, r: Member, now: Instant) {
        let cut = self.floor(now.checked_sub(GUARD).unwrap_or(now));
        self.close(r, cut);
    }

    fn close(&mut self, r: Member, cut: Instant) {
        let Some(start) = self.receivers.get_mut(r).and_then(|rx| rx.open.take()) else {
            return;
        };
        for ((receiver, _), pair) in self.pairs.iter_mut() {
            if *receiver != r {
                continue;
            }
            let late = pair.recent.iter().filter(|t| **t >= cut).count() as u64;
            pair.received_done += pair.seg_received.saturating_sub(late);
            pair.seg_received = 0;
            pair.recent.clear();
        }
        if cut > start {
            self.receivers[r].segments.push((start, cut));
        }
    }

    /// A fault struck member `m`: it stops counting as receiver and its
    /// talker packets no longer count.
    pub fn disturb(&mut self, m: Member, now: Instant) {
        self.stop_counting(m, now);
        if let Some(s) = self.senders.get_mut(m) {
            s.counted = false;
        }
    }

    /// Whether `m` counts as a receiver now.
    pub fn is_counting(&self, m: Member) -> bool {
        self.receivers.get(m).is_some_and(|r| r.open.is_some())
    }

    /// Frames a member sent.
    pub fn sent_by(&self, member: Member) -> u64 {
        self.senders.get(member).map_or(0, |s| s.sent)
    }

    /// Talker packets of `s` in [start, end).
    fn sent_between(&self, s: Member, start: Instant, end: Instant) -> u64 {
        let Some(sender) = self.senders.get(s) else {
            return 0;
        };
        if sender.buckets.is_empty() {
            return 0;
        }
        let b0 = (start.saturating_duration_since(self.window.0).as_nanos() / BUCKET.as_nanos())
            as usize;
        let b1 =
            (end.saturating_duration_since(self.window.0).as_nanos() / BUCKET.as_nanos()) as usize;
        sender.buckets[b0.min(sender.buckets.len())..b1.min(sender.buckets.len())]
            .iter()
            .map(|&n| u64::from(n))
            .sum()
    }

    /// Closes every open segment at the end of the window and sums up;
    /// `hears` says which (receiver, talker) pairs are expected to carry
    /// audio (e.g. everyone but oneself).
    pub fn totals(&mut self, hears: impl Fn(Member, Member) -> bool) -> LedgerTotals {
        let end = self.window.1;
        for r in 0..self.receivers.len() {
            self.close(r, end);
        }
        let mut totals = self.totals.clone();
        let members = self.senders.len();
        for talker in 0..members {
            for receiver in (0..members).filter(|&r| r != talker && hears(r, talker)) {
                let expected: u64 = self.receivers[receiver]
                    .segments
                    .iter()
                    .map(|&(a, b)| self.sent_between(talker, a, b))
                    .sum();
                if expected == 0 {
                    continue;
                }
                let pair = self.pairs.get(&(receiver, talker));
                let got = pair.map_or(0, |p| p.received_done).min(expected);
                totals.streams += 1;
                totals.expected += expected;
                totals.delivered += got;
                let loss = 1.0 - got as f64 / expected as f64;
                totals.worst_stream_loss = totals.worst_stream_loss.max(loss);
                if loss > 0.01 {
                    totals.streams_over_1pct += 1;
                }
                if let Some(p) = pair {
                    totals.jitter.record(Duration::from_secs_f64(p.jitter));
                }
            }
        }
        totals
    }
}

/// FNV-1a: a fast hash to recognise payloads.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn counts_loss_latency_and_match_kinds() {
        let t0 = Instant::now();
        let mut l = Ledger::new(3, (t0 + ms(100), t0 + ms(1100)));
        l.start_counting(1, t0);
        l.start_counting(2, t0);
        // Member 0 talks: 60 frames every 20 ms from t0; 1 and 2 listen.
        for i in 0..60u64 {
            let at = t0 + ms(20 * i);
            let ts = 960 * i as u32;
            let payload = [1, 2, (i % 256) as u8, (i / 256) as u8];
            l.on_sent(at, 0, ts, &payload, true, true);
            // 1 gets everything 5 ms later; 2 loses every 10th frame and
            // gets the rest through a timestamp-rewriting path 8 ms later.
            assert!(
                matches!(l.on_received(at + ms(5), 1, ts, &payload), Match::Exact(s) if s.sender == 0)
            );
            if i % 10 != 0 {
                assert!(matches!(
                    l.on_received(at + ms(8), 2, ts + 7, &payload),
                    Match::Payload(_)
                ));
            }
        }
        // Own audio and garbage are flagged.
        l.on_sent(t0 + ms(1200), 1, 5, b"xyz", false, false);
        assert_eq!(l.on_received(t0 + ms(1201), 1, 5, b"xyz"), Match::Own);
        assert_eq!(
            l.on_received(t0 + ms(1201), 1, 12345, b"nothing"),
            Match::Unknown
        );
        assert!(matches!(
            l.on_received(t0 + ms(1202), 2, 5, b"re-encoded"),
            Match::Reencoded(_)
        ));

        let totals = l.totals(|_, _| true);
        // Window [100, 1100) ms holds frames 5..=54: 50 frames.
        assert_eq!(totals.streams, 2);
        assert_eq!(totals.expected, 100);
        assert_eq!(totals.delivered, 50 + 45);
        assert!((totals.worst_stream_loss - 0.1).abs() < 1e-9);
        assert_eq!(totals.streams_over_1pct, 1);
        assert_eq!(totals.exact, 60);
        assert_eq!(totals.payload_only, 54);
        assert_eq!((totals.own, totals.unknown, totals.reencoded), (1, 1, 1));
        let lat = totals.latency.summary();
        assert_eq!(lat.count, 114);
        assert!(
            lat.p50_ms.unwrap() >= 4.9 && lat.max_ms.unwrap() <= 8.001,
            "{lat:?}"
        );
        // Constant delay: no jitter.
        assert!(totals.jitter.summary().max_ms.unwrap() < 0.01);
    }

    #[test]
    fn a_receiver_that_leaves_and_comes_back_counts_only_while_it_listens() {
        let t0 = Instant::now();
        let mut l = Ledger::new(2, (t0, t0 + ms(4000)));
        l.start_counting(1, t0);
        for i in 0..200u64 {
            let at = t0 + ms(20 * i);
            let payload = i.to_le_bytes();
            l.on_sent(at, 0, 960 * i as u32, &payload, true, true);
            // 1 leaves at 1000 ms, rejoins at 2000 ms, hears from 2150 ms
            // and starts counting 1 s after that; nothing is lost.
            let listening = at < t0 + ms(1000) || at >= t0 + ms(2150);
            if listening {
                l.on_received(at + ms(3), 1, 960 * i as u32, &payload);
            }
            if at == t0 + ms(1000) {
                l.stop_counting(1, at);
            }
            if at == t0 + ms(2160) {
                l.start_counting(1, at + ms(1000));
            }
        }
        let totals = l.totals(|_, _| true);
        // Counted: [0, 800) and [3200, 4000): 40 + 40 frames.
        assert_eq!((totals.expected, totals.delivered), (80, 80));
        assert_eq!(totals.worst_stream_loss, 0.0);
    }

    #[test]
    fn jitter_grows_with_uneven_arrival_and_struck_members_are_left_out() {
        let t0 = Instant::now();
        let mut l = Ledger::new(3, (t0, t0 + ms(10_000)));
        for r in 0..3 {
            l.start_counting(r, t0);
        }
        for i in 0..100u64 {
            let at = t0 + ms(20 * i);
            l.on_sent(at, 0, 960 * i as u32, &i.to_le_bytes(), true, true);
            let delay = if i % 2 == 0 { 1 } else { 11 };
            l.on_received(at + ms(delay), 1, 960 * i as u32, &i.to_le_bytes());
        }
        l.disturb(2, t0 + ms(2000));
        let totals = l.totals(|_, _| true);
        let jitter = totals.jitter.summary().max_ms.unwrap();
        assert!(jitter > 5.0 && jitter < 10.5, "{jitter}");
        // 2 was struck at 2 s and heard nothing before: its stream counts
        // until then (a total loss), 1's is whole.
        assert_eq!(totals.streams, 2);
        assert!(!l.is_counting(2));
        let mut l2 = Ledger::new(2, (t0, t0 + ms(10_000)));
        l2.start_counting(1, t0);
        l2.disturb(0, t0);
        l2.on_sent(t0 + ms(10), 0, 0, b"a", true, true);
        assert_eq!(
            l2.totals(|_, _| true).streams,
            0,
            "a struck talker's packets do not count"
        );
    }

    #[test]
    fn identical_payloads_are_ambiguous_and_old_frames_expire() {
        let t0 = Instant::now();
        let mut l = Ledger::new(3, (t0, t0 + ms(10_000)));
        l.on_sent(t0, 0, 0, b"cn", true, true);
        l.on_sent(t0, 1, 1, b"cn", true, true);
        assert_eq!(
            l.on_received(t0, 2, 999, b"cn"),
            Match::Unknown,
            "two senders, one payload"
        );
        l.on_sent(t0, 0, 7, b"noise", false, false);
        assert_eq!(
            l.on_received(t0, 2, 8, b"noise"),
            Match::Unknown,
            "comfort noise is matched by timestamp only"
        );
        assert!(matches!(l.on_received(t0, 2, 1, b"cn"), Match::Exact(s) if s.sender == 1));
        l.on_sent(t0 + ms(5000), 0, 960, b"late", true, true);
        assert_eq!(
            l.on_received(t0 + ms(5000), 2, 0, b"cn"),
            Match::Unknown,
            "expired"
        );
        assert_eq!(l.sent_by(0), 3);
        assert_eq!(l.by_ts.len(), 1);
        assert!(l.by_hash.len() <= 1);
    }
}
