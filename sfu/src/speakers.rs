//! Active-speaker selection for one room. Sans-IO: fed one observation per
//! audio packet, it says when the selection or the dominant speaker changed.
//!
//! # Model
//!
//! Each published audio track has a smoothed activity score in 0..=1, from
//! the packet's RFC 6464 audio level, or from RNNoise's speech probability
//! when the track goes through a DSP pipeline (noise then scores low however
//! loud it is). Fast attack and slow release, then two thresholds
//! (hysteresis) turn the score into *speaking* / *not speaking*.
//!
//! The selection is a ranked list of at most `slots + 1` tracks:
//!
//! - the first `slots` ("top") are what a listener outside the selection
//!   hears, one per slot;
//! - a listener inside the selection hears the others, `slots` at most:
//!   nobody hears themselves and every listener fills all its slots;
//! - a speaking track outside the top takes the place of a top track that is
//!   *replaceable*: not speaking and silent for at least the hold time, or
//!   never heard. The oldest silence goes first; the displaced track keeps
//!   the extra place (`slots + 1`) so the talkers in the top still hear it.
//! - a talker still speaking is never displaced, so slots do not flap
//!   between two people talking over each other.
//! - while a room has at most `slots + 1` audio tracks, all are selected
//!   (pinned): everyone hears everyone.
//!
//! The *dominant* speaker, shown to users, is the selected track that spoke
//! most recently; it changes only when it is silent and another selected
//! track speaks.
//!
//! Cost per packet: one hash lookup, a multiply-add, and a scan of at most
//! `slots + 1` entries when a track outside the top speaks.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::ids::ParticipantId;
use crate::ids::TrackKey;

/// What one packet says about its track's activity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activity {
    /// RFC 6464 audio level as str0m reports it: -127 (silence) ..= 0 dBov.
    Level(i8),
    /// Speech probability from the DSP pipeline, 0..=1, with the track's
    /// latest RFC 6464 level if it sends one: RNNoise calls digital silence
    /// (a muted microphone) speech, so a level under [`SILENT_DBOV`] wins.
    Speech {
        /// RNNoise's probability.
        probability: f32,
        /// The latest audio level of the track, -127..=0 dBov.
        level: Option<i8>,
    },
}

/// At or under this level (dBov) a packet is silence whatever RNNoise says.
pub const SILENT_DBOV: i8 = -70;

impl Activity {
    /// The activity score of one packet, 0..=1.
    fn score(self) -> f32 {
        match self {
            // -30 dBov and louder is certainly a voice near the microphone,
            // -65 dBov and quieter is room tone.
            Activity::Level(level) => ((65.0 - f32::from(level.unsigned_abs())) / 35.0).clamp(0.0, 1.0),
            Activity::Speech { level: Some(level), .. } if level <= SILENT_DBOV => 0.0,
            Activity::Speech { probability, .. } if probability.is_finite() => probability.clamp(0.0, 1.0),
            Activity::Speech { .. } => 0.0,
        }
    }
}

/// Tuning of the selection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelectorConfig {
    /// Audio slots per listener (at least 1).
    pub slots: usize,
    /// How long a selected speaker keeps its place after it stops talking
    /// while someone else waits to talk.
    pub hold: Duration,
    /// Smoothing weight of a packet scoring above the current score.
    pub attack: f32,
    /// Smoothing weight of a packet scoring below the current score.
    pub release: f32,
    /// Score at which a silent track starts speaking.
    pub on: f32,
    /// Score under which a speaking track stops.
    pub off: f32,
}

impl Default for SelectorConfig {
    fn default() -> Self {
        // With 20 ms packets: a talker crosses `on` in 2-3 packets (< 60 ms)
        // and drops under `off` about 200 ms after the last syllable.
        SelectorConfig { slots: 3, hold: Duration::from_millis(500), attack: 0.5, release: 0.12, on: 0.5, off: 0.3 }
    }
}

/// What an observation changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changed {
    /// The ranked selection (who is heard) changed.
    pub selection: bool,
    /// The dominant speaker changed.
    pub dominant: bool,
}

impl Changed {
    /// Anything changed.
    pub fn any(self) -> bool {
        self.selection || self.dominant
    }
}

#[derive(Debug, Clone)]
struct Entry {
    key: TrackKey,
    score: f32,
    speaking: bool,
    /// Last packet that found the track speaking.
    last_speech: Option<Instant>,
}

/// The speaker selection of one room.
#[derive(Debug, Clone)]
pub struct SpeakerSelector {
    config: SelectorConfig,
    entries: Vec<Entry>,
    index: HashMap<TrackKey, usize>,
    /// Selected tracks: `slots` top places, then at most one extra.
    ranked: Vec<TrackKey>,
    dominant: Option<TrackKey>,
}

impl SpeakerSelector {
    /// An empty selection.
    pub fn new(config: SelectorConfig) -> Self {
        let config = SelectorConfig { slots: config.slots.max(1), ..config };
        SpeakerSelector { config, entries: Vec::new(), index: HashMap::new(), ranked: Vec::with_capacity(config.slots + 1), dominant: None }
    }

    /// The configuration in force.
    pub fn config(&self) -> &SelectorConfig {
        &self.config
    }

    fn capacity(&self) -> usize {
        self.config.slots + 1
    }

    /// A new audio track. Selected at once while the room is small.
    pub fn add(&mut self, key: TrackKey) -> Changed {
        if self.index.contains_key(&key) {
            return Changed::default();
        }
        self.index.insert(key, self.entries.len());
        self.entries.push(Entry { key, score: 0.0, speaking: false, last_speech: None });
        if self.entries.len() <= self.capacity() {
            self.ranked.push(key);
            return Changed { selection: true, dominant: false };
        }
        Changed::default()
    }

    /// A track is gone. When the room becomes small again, every track is
    /// selected.
    pub fn remove(&mut self, key: TrackKey) -> Changed {
        let Some(i) = self.index.remove(&key) else { return Changed::default() };
        self.entries.swap_remove(i);
        if let Some(moved) = self.entries.get(i) {
            self.index.insert(moved.key, i);
        }
        let mut changed = Changed::default();
        if let Some(pos) = self.ranked.iter().position(|k| *k == key) {
            self.ranked.remove(pos);
            changed.selection = true;
        }
        if self.dominant == Some(key) {
            self.dominant = None;
            changed.dominant = true;
        }
        if self.entries.len() <= self.capacity() && self.ranked.len() < self.entries.len() {
            for entry in &self.entries {
                if !self.ranked.contains(&entry.key) {
                    self.ranked.push(entry.key);
                }
            }
            changed.selection = true;
        }
        changed
    }

    /// One packet of `key` at `now`.
    pub fn observe(&mut self, now: Instant, key: TrackKey, activity: Activity) -> Changed {
        let Some(&i) = self.index.get(&key) else { return Changed::default() };
        let config = self.config;
        let entry = &mut self.entries[i];
        let x = activity.score();
        let weight = if x > entry.score { config.attack } else { config.release };
        entry.score += weight * (x - entry.score);
        if entry.speaking && entry.score < config.off {
            entry.speaking = false;
        } else if !entry.speaking && entry.score >= config.on {
            entry.speaking = true;
        }
        if !entry.speaking {
            return Changed::default();
        }
        entry.last_speech = Some(now);

        let mut changed = Changed::default();
        let slots = config.slots;
        let pos = self.ranked.iter().position(|k| *k == key);
        if pos.is_none_or(|p| p >= slots) {
            if self.ranked.len() < slots && pos.is_none() {
                self.ranked.push(key);
                changed.selection = true;
            } else if let Some(victim) = self.replaceable(now, 0..slots.min(self.ranked.len())) {
                let displaced = self.ranked[victim];
                self.ranked[victim] = key;
                match pos {
                    // The extra speaker swaps places with the silent one.
                    Some(p) => self.ranked[p] = displaced,
                    None if self.ranked.len() > slots => self.ranked[slots] = displaced,
                    None => self.ranked.push(displaced),
                }
                changed.selection = true;
            } else if pos.is_none() {
                // No top place is free: wait in the extra place, heard by
                // the talkers in the top.
                if self.ranked.len() == slots {
                    self.ranked.push(key);
                    changed.selection = true;
                } else if self.replaceable(now, slots..self.ranked.len()).is_some() {
                    self.ranked[slots] = key;
                    changed.selection = true;
                }
            }
        }
        if self.dominant != Some(key) && self.ranked.contains(&key) {
            let dominant_speaking = self.dominant.and_then(|d| self.index.get(&d)).is_some_and(|&d| self.entries[d].speaking);
            if !dominant_speaking || self.dominant.is_some_and(|d| !self.ranked.contains(&d)) {
                self.dominant = Some(key);
                changed.dominant = true;
            }
        }
        changed
    }

    /// The place in `places` of the replaceable track silent the longest;
    /// never-heard tracks first.
    fn replaceable(&self, now: Instant, places: std::ops::Range<usize>) -> Option<usize> {
        places
            .filter_map(|i| {
                let entry = &self.entries[*self.index.get(&self.ranked[i])?];
                let silent = !entry.speaking && entry.last_speech.is_none_or(|at| now.saturating_duration_since(at) >= self.config.hold);
                silent.then_some((i, entry.last_speech))
            })
            .min_by_key(|(_, last)| *last)
            .map(|(i, _)| i)
    }

    /// Every selected track: the top places first, then the extra one.
    pub fn selected(&self) -> &[TrackKey] {
        &self.ranked
    }

    /// Whether `key` is selected.
    pub fn is_selected(&self, key: TrackKey) -> bool {
        self.ranked.contains(&key)
    }

    /// The tracks `listener` hears: the others of the selection if it is
    /// selected itself, else the top places. Never its own.
    pub fn heard_by(&self, listener: ParticipantId) -> impl Iterator<Item = TrackKey> + '_ {
        let inside = self.ranked.iter().any(|k| k.publisher == listener);
        let take = if inside { self.ranked.len() } else { self.config.slots };
        self.ranked.iter().copied().filter(move |k| k.publisher != listener).take(take.min(self.config.slots))
    }

    /// The dominant speaker's track.
    pub fn dominant(&self) -> Option<TrackKey> {
        self.dominant
    }

    /// Publishers of the selection, the dominant speaker first.
    pub fn speakers(&self) -> Vec<ParticipantId> {
        let mut out: Vec<ParticipantId> = Vec::with_capacity(self.ranked.len());
        for key in self.dominant.iter().chain(self.ranked.iter()) {
            if !out.contains(&key.publisher) {
                out.push(key.publisher);
            }
        }
        out
    }

    /// Tracks speaking now.
    pub fn speaking(&self) -> usize {
        self.entries.iter().filter(|e| e.speaking).count()
    }

    /// Whether `key` is speaking now.
    pub fn is_speaking(&self, key: TrackKey) -> bool {
        self.index.get(&key).is_some_and(|&i| self.entries[i].speaking)
    }

    /// Every audio track known.
    pub fn tracks(&self) -> impl Iterator<Item = TrackKey> + '_ {
        self.entries.iter().map(|e| e.key)
    }

    /// Audio tracks known.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No audio track known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKET: Duration = Duration::from_millis(20);
    const LOUD: Activity = Activity::Level(-20);
    const QUIET: Activity = Activity::Level(-127);

    fn key(n: u64) -> TrackKey {
        TrackKey { publisher: ParticipantId(n), mid: "0".into() }
    }

    /// A selector with `tracks` tracks (1..=tracks) and `slots` slots.
    fn selector(slots: usize, tracks: u64) -> SpeakerSelector {
        let mut s = SpeakerSelector::new(SelectorConfig { slots, ..SelectorConfig::default() });
        for n in 1..=tracks {
            s.add(key(n));
        }
        s
    }

    /// Runs `duration` of 20 ms packets where `activity(n)` is track n's.
    fn run(s: &mut SpeakerSelector, now: &mut Instant, duration: Duration, tracks: u64, activity: impl Fn(u64) -> Activity) -> Vec<(Duration, Vec<TrackKey>)> {
        let start = *now;
        let mut changes = Vec::new();
        let end = *now + duration;
        while *now < end {
            for n in 1..=tracks {
                if s.observe(*now, key(n), activity(n)).selection {
                    changes.push((*now - start, s.selected().to_vec()));
                }
            }
            *now += PACKET;
        }
        changes
    }

    fn set(keys: &[TrackKey]) -> Vec<u64> {
        let mut v: Vec<u64> = keys.iter().map(|k| k.publisher.0).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn small_rooms_select_everyone_without_speech() {
        let mut s = selector(3, 4);
        assert_eq!(set(s.selected()), vec![1, 2, 3, 4]);
        s.add(key(5));
        assert_eq!(s.selected().len(), 4, "the fifth waits for a place");
        s.remove(key(1));
        assert_eq!(set(s.selected()), vec![2, 3, 4, 5], "small again: all selected");
    }

    #[test]
    fn a_new_talker_takes_a_silent_place_within_200_ms() {
        let mut s = selector(2, 6);
        let mut now = Instant::now();
        // 1..=3 selected from the start (pinned), and they never spoke.
        run(&mut s, &mut now, Duration::from_secs(1), 6, |_| QUIET);
        let changes = run(&mut s, &mut now, Duration::from_secs(1), 6, |n| if n == 6 { LOUD } else { QUIET });
        let (at, selected) = &changes[0];
        assert!(*at <= Duration::from_millis(200), "took {at:?}");
        assert!(selected[..2].contains(&key(6)), "{selected:?}");
        assert_eq!(s.dominant(), Some(key(6)));
        assert_eq!(s.speakers()[0], ParticipantId(6));
    }

    #[test]
    fn a_talker_who_stops_is_replaced_after_the_hold_time_not_before() {
        let mut s = selector(1, 4);
        let mut now = Instant::now();
        run(&mut s, &mut now, Duration::from_secs(2), 4, |n| if n == 3 { LOUD } else { QUIET });
        assert_eq!(s.selected()[0], key(3));
        // 3 stops while 4 starts: 4 waits in the extra place for the hold.
        let changes = run(&mut s, &mut now, Duration::from_secs(2), 4, |n| if n == 4 { LOUD } else { QUIET });
        let promoted = changes.iter().find(|(_, sel)| sel[0] == key(4)).map(|(at, _)| *at).expect("4 promoted");
        let hold = s.config().hold;
        assert!(promoted >= hold, "not before the hold: {promoted:?}");
        assert!(promoted <= hold + Duration::from_millis(400), "soon after the hold: {promoted:?}");
        assert_eq!(s.selected(), &[key(4), key(3)], "3 keeps the extra place");
    }

    #[test]
    fn two_talkers_at_once_do_not_flap() {
        let mut s = selector(1, 5);
        let mut now = Instant::now();
        run(&mut s, &mut now, Duration::from_secs(1), 5, |n| if n == 5 { LOUD } else { QUIET });
        assert_eq!(s.selected()[0], key(5));
        // 4 talks over 5, louder: 5 keeps the slot.
        let changes = run(&mut s, &mut now, Duration::from_secs(5), 5, |n| match n {
            5 => Activity::Level(-35),
            4 => Activity::Level(-10),
            _ => QUIET,
        });
        assert_eq!(s.selected()[0], key(5));
        assert!(changes.len() <= 1, "at most 4 entering the extra place: {changes:?}");
    }

    #[test]
    fn speech_probability_beats_loudness() {
        let mut s = selector(1, 4);
        let mut now = Instant::now();
        // 3 is loud noise (low speech probability), 4 a quiet talker.
        run(&mut s, &mut now, Duration::from_secs(3), 4, |n| match n {
            3 => Activity::Speech { probability: 0.1, level: None },
            4 => Activity::Speech { probability: 0.9, level: None },
            _ => Activity::Speech { probability: 0.0, level: None },
        });
        assert_eq!(s.selected()[0], key(4));
        assert!(!s.is_selected(key(3)));
        assert!(!s.is_speaking(key(3)));
    }

    #[test]
    fn a_muted_microphone_is_silence_whatever_rnnoise_says() {
        let mut s = selector(1, 3);
        let mut now = Instant::now();
        run(&mut s, &mut now, Duration::from_secs(1), 3, |_| Activity::Speech { probability: 0.9, level: Some(-127) });
        assert_eq!(s.speaking(), 0);
    }

    #[test]
    fn nobody_hears_themselves_and_insiders_hear_the_extra() {
        let mut s = selector(2, 6);
        let mut now = Instant::now();
        run(&mut s, &mut now, Duration::from_secs(1), 6, |n| if n >= 4 { LOUD } else { QUIET });
        let sel = set(s.selected());
        assert_eq!(sel.len(), 3);
        for listener in 1..=6u64 {
            let heard: Vec<TrackKey> = s.heard_by(ParticipantId(listener)).collect();
            assert!(heard.iter().all(|k| k.publisher.0 != listener));
            assert_eq!(heard.len(), 2, "every slot is filled for {listener}");
            if !sel.contains(&listener) {
                assert_eq!(heard, s.selected()[..2].to_vec());
            }
        }
    }

    #[test]
    fn randomized_observations_keep_the_invariants() {
        let seed = std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
        });
        println!("seed {seed} (rerun with SEED={seed})");
        let mut rng = seed;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut s = selector(3, 0);
        let mut now = Instant::now();
        let mut live: Vec<u64> = Vec::new();
        for step in 0..20_000u64 {
            match next() % 100 {
                0 => {
                    let n = 100 + step;
                    s.add(key(n));
                    live.push(n);
                }
                1 if !live.is_empty() => {
                    let n = live.swap_remove((next() % live.len() as u64) as usize);
                    s.remove(key(n));
                }
                _ if !live.is_empty() => {
                    let n = live[(next() % live.len() as u64) as usize];
                    let activity = if next() % 2 == 0 { Activity::Level(-((next() % 128) as i8)) } else { Activity::Speech { probability: (next() % 1000) as f32 / 1000.0, level: None } };
                    s.observe(now, key(n), activity);
                }
                _ => {}
            }
            now += Duration::from_millis(next() % 20);
            let sel = s.selected();
            assert!(sel.len() <= 4, "seed {seed}: {sel:?}");
            assert_eq!(sel.len(), set(sel).into_iter().collect::<std::collections::BTreeSet<_>>().len(), "seed {seed}: duplicates");
            assert!(sel.iter().all(|k| live.contains(&k.publisher.0)), "seed {seed}: stale entry");
            if live.len() <= 4 {
                assert_eq!(sel.len(), live.len(), "seed {seed}: small rooms select all");
            }
            if let Some(d) = s.dominant() {
                assert!(live.contains(&d.publisher.0), "seed {seed}: stale dominant");
            }
        }
    }
}
