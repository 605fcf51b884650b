//! A room: its members, its speaker selection, and its forwarding — who
//! receives which published track on which of their m-lines.
//!
//! Audio in a room of at most `audio_slots + 1` goes to every subscriber on
//! an m-line per publisher, like video always does (*track outlets*). A
//! bigger room forwards audio by active-speaker selection ([`crate::speakers`])
//! into a fixed number of *slots* per listener, so the cost of a packet does
//! not grow with the room. Both are [`Outlet`]s, written the same way.

use std::collections::HashMap;

use str0m::media::{MediaKind, Mid};

use crate::ids::{ParticipantId, RoomId, TrackKey};
use crate::outlet::{OutState, Outlet};
use crate::speakers::{Changed, SpeakerSelector};
use crate::stats::SfuStats;

#[derive(Debug)]
pub(crate) struct Room {
    pub id: RoomId,
    pub members: Vec<ParticipantId>,
    /// Runs in every room: it also names the active speakers.
    pub selector: SpeakerSelector,
    /// The speakers last announced.
    pub announced: Vec<ParticipantId>,
    pub forwarding: Forwarding,
}

impl Room {
    pub(crate) fn new(id: RoomId, selector: SpeakerSelector) -> Self {
        Room { id, members: Vec::new(), selector, announced: Vec::new(), forwarding: Forwarding::default() }
    }

    /// After the selection changed: reassigns listeners' slots (slot rooms,
    /// `reassign`) and returns the speakers to announce, if they changed.
    /// Never on a packet's path unless the selection changed.
    pub(crate) fn selection_changed(&mut self, changed: Changed, reassign: bool, stats: &mut SfuStats) -> Option<Vec<ParticipantId>> {
        if changed.selection {
            stats.speaker_changes += 1;
        }
        if changed.any() {
            stats.room_speakers.observe(self.selector.speaking() as f64);
        }
        if reassign && self.forwarding.slot_mode {
            stats.slot_switches += self.forwarding.reassign_slots(&self.selector, &self.members);
        }
        let speakers = self.selector.speakers();
        if speakers == self.announced {
            return None;
        }
        self.announced = speakers.clone();
        Some(speakers)
    }
}

/// A track outlet: one subscriber's m-line carrying one published track.
#[derive(Debug)]
struct Edge {
    subscriber: ParticipantId,
    kind: MediaKind,
    outlet: Outlet,
}

/// One audio slot of a listener.
#[derive(Debug)]
struct Slot {
    /// The speaker's track the selection assigned to it.
    source: Option<TrackKey>,
    outlet: Outlet,
}

/// How a packet of a track reaches the room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reach {
    /// On its track outlets.
    Tracks,
    /// Audio in a slot room, selected: in the slots assigned to it.
    Selected,
    /// Audio in a slot room, not selected: nowhere.
    NotSelected,
}

/// A room's forwarding. Every subscriber edge lives here once; the indexes
/// that see it from the subscriber's side are kept by these methods only.
#[derive(Debug, Default)]
pub(crate) struct Forwarding {
    /// Audio goes through slots. Sticky for the room's life: in a room of at
    /// most `audio_slots + 1` the selection pins everyone, so every listener
    /// hears every other participant through its slots anyway, and a room at
    /// the boundary never renegotiates on each join and leave.
    slot_mode: bool,
    /// Every published track -> its track outlets, one per subscriber.
    tracks: HashMap<TrackKey, Vec<Edge>>,
    /// Subscriber -> its track outlets' m-lines and what they carry: the
    /// edges of `tracks` seen from the other end.
    received: HashMap<ParticipantId, Vec<(Mid, TrackKey)>>,
    /// Slot rooms: each subscribing listener's slots.
    slots: HashMap<ParticipantId, Vec<Slot>>,
    /// Slot rooms: a selected audio track -> (listener, slot index). Derived
    /// from the slots' assignments whenever they change.
    slot_routes: HashMap<TrackKey, Vec<(ParticipantId, usize)>>,
}

impl Forwarding {
    pub(crate) fn is_slot_mode(&self) -> bool {
        self.slot_mode
    }

    /// A new track may be subscribed to.
    pub(crate) fn publish(&mut self, source: TrackKey) {
        self.tracks.entry(source).or_default();
    }

    /// The track is published (its publisher has not left).
    pub(crate) fn is_published(&self, source: TrackKey) -> bool {
        self.tracks.contains_key(&source)
    }

    /// `subscriber` receives `source` on `mid`, once the offer adding it is
    /// answered. False when the track is gone.
    pub(crate) fn subscribe(&mut self, source: TrackKey, kind: MediaKind, subscriber: ParticipantId, mid: Mid) -> bool {
        let Some(edges) = self.tracks.get_mut(&source) else { return false };
        edges.push(Edge { subscriber, kind, outlet: Outlet::track(mid) });
        self.received.entry(subscriber).or_default().push((mid, source));
        true
    }

    /// The track is gone: returns the subscribers' m-lines that carried it,
    /// to stop.
    pub(crate) fn unpublish(&mut self, source: TrackKey) -> Vec<(ParticipantId, Mid)> {
        let edges = self.tracks.remove(&source).unwrap_or_default();
        self.slot_routes.remove(&source);
        let mut stopped = Vec::with_capacity(edges.len());
        for edge in edges {
            let Some(mid) = edge.outlet.mid else { continue };
            self.forget_received(edge.subscriber, mid);
            stopped.push((edge.subscriber, mid));
        }
        stopped
    }

    /// The subscriber left: everything it received goes.
    pub(crate) fn remove_subscriber(&mut self, subscriber: ParticipantId) {
        for (_, source) in self.received.remove(&subscriber).unwrap_or_default() {
            if let Some(edges) = self.tracks.get_mut(&source) {
                edges.retain(|e| e.subscriber != subscriber);
            }
        }
        if self.slots.remove(&subscriber).is_some() {
            for routes in self.slot_routes.values_mut() {
                routes.retain(|(listener, _)| *listener != subscriber);
            }
        }
    }

    /// The track a subscriber's m-line carries, if it is a track outlet.
    pub(crate) fn source_of(&self, subscriber: ParticipantId, mid: Mid) -> Option<TrackKey> {
        self.received.get(&subscriber)?.iter().find(|(m, _)| *m == mid).map(|(_, source)| *source)
    }

    /// Whether `mid` is one of the subscriber's outlets (track or slot).
    pub(crate) fn is_outlet(&self, subscriber: ParticipantId, mid: Mid) -> bool {
        self.source_of(subscriber, mid).is_some() || self.slots.get(&subscriber).is_some_and(|slots| slots.iter().any(|s| s.outlet.mid == Some(mid)))
    }

    /// The subscriber answered our offer: every outlet in it opens. Returns
    /// the tracks that start flowing on track outlets.
    pub(crate) fn open(&mut self, subscriber: ParticipantId) -> Vec<(TrackKey, MediaKind)> {
        let mut opened = Vec::new();
        for (mid, source) in self.received.get(&subscriber).into_iter().flatten() {
            let Some(edges) = self.tracks.get_mut(source) else { continue };
            for edge in edges.iter_mut().filter(|e| e.subscriber == subscriber && e.outlet.mid == Some(*mid)) {
                if edge.outlet.state == OutState::Negotiating {
                    edge.outlet.state = OutState::Open;
                    opened.push((*source, edge.kind));
                }
            }
        }
        for slot in self.slots.get_mut(&subscriber).into_iter().flatten() {
            if slot.outlet.mid.is_some() {
                slot.outlet.state = OutState::Open;
            }
        }
        opened
    }

    /// Our offer to the subscriber was abandoned (it sent its own): its
    /// outlets in that offer never reached the session. Removes those track
    /// outlets and returns their tracks to add again, and un-offers those
    /// slots and returns their indexes to add again.
    pub(crate) fn abandon_offer(&mut self, subscriber: ParticipantId) -> (Vec<(TrackKey, MediaKind)>, Vec<usize>) {
        let mut tracks = Vec::new();
        let Forwarding { tracks: all, received, .. } = self;
        if let Some(received) = received.get_mut(&subscriber) {
            received.retain(|(mid, source)| {
                let Some(edges) = all.get_mut(source) else { return false };
                let Some(i) = edges.iter().position(|e| e.subscriber == subscriber && e.outlet.mid == Some(*mid)) else { return false };
                if edges[i].outlet.state == OutState::Open {
                    return true;
                }
                tracks.push((*source, edges.remove(i).kind));
                false
            });
        }
        let mut slots = Vec::new();
        for (i, slot) in self.slots.get_mut(&subscriber).into_iter().flatten().enumerate() {
            if slot.outlet.mid.is_some() && slot.outlet.state == OutState::Negotiating {
                slot.outlet.mid = None;
                slots.push(i);
            }
        }
        (tracks, slots)
    }

    /// The room outgrew forwarding everyone's audio to everyone: from now
    /// on audio goes through slots.
    pub(crate) fn enter_slot_mode(&mut self) {
        self.slot_mode = true;
    }

    /// Removes the subscriber's audio track outlets (slots replace them) and
    /// returns their m-lines, to stop.
    pub(crate) fn take_audio_outlets(&mut self, subscriber: ParticipantId) -> Vec<Mid> {
        let Some(received) = self.received.get_mut(&subscriber) else { return Vec::new() };
        let mut stopped = Vec::new();
        received.retain(|(mid, source)| {
            let Some(edges) = self.tracks.get_mut(source) else { return false };
            let before = edges.len();
            edges.retain(|e| !(e.subscriber == subscriber && e.outlet.mid == Some(*mid) && e.kind == MediaKind::Audio));
            if edges.len() == before {
                return true;
            }
            stopped.push(*mid);
            false
        });
        stopped
    }

    /// Gives a listener `count` slots, to be offered.
    pub(crate) fn add_slots(&mut self, listener: ParticipantId, count: usize) {
        self.slots.insert(listener, (0..count).map(|_| Slot { source: None, outlet: Outlet::slot() }).collect());
    }

    /// The listener's slot `index`, if it has not been offered yet.
    pub(crate) fn unoffered_slot(&mut self, listener: ParticipantId, index: usize) -> Option<&mut Outlet> {
        self.slots.get_mut(&listener)?.get_mut(index).map(|s| &mut s.outlet).filter(|o| o.mid.is_none())
    }

    /// Calls `write` with every open outlet a packet of `source` goes to.
    pub(crate) fn each_outlet(&mut self, source: TrackKey, kind: MediaKind, mut write: impl FnMut(ParticipantId, &mut Outlet)) -> Reach {
        if kind == MediaKind::Audio && self.slot_mode {
            let Some(routes) = self.slot_routes.get(&source).filter(|r| !r.is_empty()) else { return Reach::NotSelected };
            for &(listener, index) in routes {
                let Some(slot) = self.slots.get_mut(&listener).and_then(|s| s.get_mut(index)) else { continue };
                if slot.outlet.is_open() {
                    write(listener, &mut slot.outlet);
                }
            }
            return Reach::Selected;
        }
        for edge in self.tracks.get_mut(&source).into_iter().flatten() {
            if edge.outlet.is_open() {
                write(edge.subscriber, &mut edge.outlet);
            }
        }
        Reach::Tracks
    }

    /// Gives every listener's slots to what the selection says it hears,
    /// keeping a speaker in the slot it has; rebuilds the routes. Returns how
    /// many slots changed hands.
    fn reassign_slots(&mut self, selector: &SpeakerSelector, members: &[ParticipantId]) -> u64 {
        self.slot_routes.clear();
        let mut switches = 0;
        let mut heard = Vec::with_capacity(selector.config().slots);
        for member in members {
            let Some(slots) = self.slots.get_mut(member) else { continue };
            heard.clear();
            heard.extend(selector.heard_by(*member));
            for slot in slots.iter_mut() {
                if slot.source.is_some_and(|s| !heard.contains(&s)) {
                    slot.source = None;
                }
            }
            for key in &heard {
                if slots.iter().any(|s| s.source == Some(*key)) {
                    continue;
                }
                if let Some(free) = slots.iter_mut().find(|s| s.source.is_none()) {
                    free.source = Some(*key);
                    switches += 1;
                }
            }
            for (index, slot) in slots.iter().enumerate() {
                if let Some(key) = slot.source {
                    self.slot_routes.entry(key).or_default().push((*member, index));
                }
            }
        }
        switches
    }

    /// Track outlets, negotiating or open.
    /// Every track outlet, as (published track, subscriber, negotiated).
    pub(crate) fn outlets(&self) -> impl Iterator<Item = (TrackKey, ParticipantId, bool)> + '_ {
        self.tracks
            .iter()
            .flat_map(|(source, edges)| edges.iter().map(move |edge| (*source, edge.subscriber, edge.outlet.state == OutState::Open)))
    }

    pub(crate) fn track_outlets(&self) -> usize {
        self.tracks.values().map(Vec::len).sum()
    }

    /// Slots offered, negotiating or open.
    pub(crate) fn offered_slots(&self) -> usize {
        self.slots.values().flatten().filter(|s| s.outlet.mid.is_some()).count()
    }

    fn forget_received(&mut self, subscriber: ParticipantId, mid: Mid) {
        if let Some(received) = self.received.get_mut(&subscriber) {
            received.retain(|(m, _)| *m != mid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(n: u64, mid: &str) -> TrackKey {
        TrackKey { publisher: ParticipantId(n), mid: mid.into() }
    }

    /// Both views of every edge agree.
    fn assert_consistent(f: &Forwarding) {
        let mut from_tracks: Vec<(ParticipantId, Mid, TrackKey)> =
            f.tracks.iter().flat_map(|(source, edges)| edges.iter().map(|e| (e.subscriber, e.outlet.mid.unwrap(), *source))).collect();
        let mut from_received: Vec<(ParticipantId, Mid, TrackKey)> =
            f.received.iter().flat_map(|(sub, r)| r.iter().map(|(mid, source)| (*sub, *mid, *source))).collect();
        from_tracks.sort_by_key(|(s, m, t)| (*s, m.to_string(), t.publisher));
        from_received.sort_by_key(|(s, m, t)| (*s, m.to_string(), t.publisher));
        assert_eq!(from_tracks, from_received);
    }

    #[test]
    fn edges_stay_consistent_through_every_change() {
        let (a_audio, a_video, b_audio) = (track(1, "0"), track(1, "1"), track(2, "0"));
        let (a, b, c) = (ParticipantId(1), ParticipantId(2), ParticipantId(3));
        let mut f = Forwarding::default();
        for source in [a_audio, a_video, b_audio] {
            f.publish(source);
        }
        assert!(f.subscribe(a_audio, MediaKind::Audio, b, "5".into()));
        assert!(f.subscribe(a_video, MediaKind::Video, b, "6".into()));
        assert!(f.subscribe(a_audio, MediaKind::Audio, c, "5".into()));
        assert!(f.subscribe(b_audio, MediaKind::Audio, c, "7".into()));
        assert!(!f.subscribe(track(9, "0"), MediaKind::Audio, c, "8".into()), "an unpublished track");
        assert_consistent(&f);
        assert_eq!(f.track_outlets(), 4);

        assert_eq!(f.open(b), vec![(a_audio, MediaKind::Audio), (a_video, MediaKind::Video)]);
        assert!(f.open(b).is_empty(), "opens once");
        assert_eq!(f.source_of(b, "6".into()), Some(a_video));
        assert!(f.is_outlet(c, "7".into()) && !f.is_outlet(c, "6".into()));

        // c's offer is abandoned: both its outlets go back to be added.
        let (requeue, slots) = f.abandon_offer(c);
        assert_eq!((requeue.len(), slots.len()), (2, 0));
        assert_consistent(&f);
        // b's open outlets survive an abandoned offer.
        assert!(f.abandon_offer(b).0.is_empty());

        f.enter_slot_mode();
        assert_eq!(f.take_audio_outlets(b), vec![Mid::from("5")], "audio moves to slots, video stays");
        assert_consistent(&f);
        assert_eq!(f.unpublish(a_video), vec![(b, Mid::from("6"))]);
        assert_consistent(&f);
        f.subscribe(b_audio, MediaKind::Audio, a, "3".into());
        f.remove_subscriber(a);
        assert_consistent(&f);
        assert_eq!(f.track_outlets(), 0);
    }
}
