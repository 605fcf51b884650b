//! The media plane's part of the admin API's JSON: `GET /api/stats`,
//! `GET`/`PUT /api/policy`.
//!
//! The core's types are plain structs (its crate knows no serialization);
//! these wrappers give them their JSON, field for field as the API has always
//! spelled them.

use std::collections::HashMap;

use fleetcall_sfu::audio::{PolicyChange, SuppressionPolicy};
use fleetcall_sfu::histogram::Histogram;
use fleetcall_sfu::{DropCounts, RoomId, SfuStats};
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `GET /api/stats`: every field of [`SfuStats`].
#[derive(Debug, Clone, Copy)]
pub struct StatsJson<'a>(pub &'a SfuStats);

impl Serialize for StatsJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Exhaustive, so a new field cannot be left out of the API.
        let SfuStats {
            rooms,
            participants,
            tracks,
            forwarding_entries,
            demux_entries,
            processed_tracks,
            suppressed_tracks,
            datagrams_in,
            bytes_in,
            datagrams_out,
            bytes_out,
            rtp_forwarded,
            dropped,
            removed,
            nacks_received,
            keyframe_requests_received,
            keyframe_requests_sent,
            reported_loss,
            reported_jitter,
            rtt,
            join_to_first_audio,
            slot_rooms,
            audio_slots,
            speaking,
            speaker_changes,
            slot_switches,
            selection_forwarded,
            selection_suppressed,
            room_speakers,
        } = self.0;
        let mut out = serializer.serialize_struct("SfuStats", 29)?;
        out.serialize_field("rooms", rooms)?;
        out.serialize_field("participants", participants)?;
        out.serialize_field("tracks", tracks)?;
        out.serialize_field("forwarding_entries", forwarding_entries)?;
        out.serialize_field("demux_entries", demux_entries)?;
        out.serialize_field("processed_tracks", processed_tracks)?;
        out.serialize_field("suppressed_tracks", suppressed_tracks)?;
        out.serialize_field("datagrams_in", datagrams_in)?;
        out.serialize_field("bytes_in", bytes_in)?;
        out.serialize_field("datagrams_out", datagrams_out)?;
        out.serialize_field("bytes_out", bytes_out)?;
        out.serialize_field("rtp_forwarded", rtp_forwarded)?;
        out.serialize_field("dropped", &DropsJson(dropped))?;
        out.serialize_field("removed", removed)?;
        out.serialize_field("nacks_received", nacks_received)?;
        out.serialize_field("keyframe_requests_received", keyframe_requests_received)?;
        out.serialize_field("keyframe_requests_sent", keyframe_requests_sent)?;
        out.serialize_field("reported_loss", &HistogramJson(reported_loss))?;
        out.serialize_field("reported_jitter", &HistogramJson(reported_jitter))?;
        out.serialize_field("rtt", &HistogramJson(rtt))?;
        out.serialize_field("join_to_first_audio", &HistogramJson(join_to_first_audio))?;
        out.serialize_field("slot_rooms", slot_rooms)?;
        out.serialize_field("audio_slots", audio_slots)?;
        out.serialize_field("speaking", speaking)?;
        out.serialize_field("speaker_changes", speaker_changes)?;
        out.serialize_field("slot_switches", slot_switches)?;
        out.serialize_field("selection_forwarded", selection_forwarded)?;
        out.serialize_field("selection_suppressed", selection_suppressed)?;
        out.serialize_field("room_speakers", &HistogramJson(room_speakers))?;
        out.end()
    }
}

struct DropsJson<'a>(&'a DropCounts);

impl Serialize for DropsJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let DropCounts { unknown_source, malformed, rejected, unroutable, not_permitted, dsp_overflow, oversize, address_taken } = self.0;
        let mut out = serializer.serialize_struct("DropCounts", 8)?;
        out.serialize_field("unknown_source", unknown_source)?;
        out.serialize_field("malformed", malformed)?;
        out.serialize_field("rejected", rejected)?;
        out.serialize_field("unroutable", unroutable)?;
        out.serialize_field("not_permitted", not_permitted)?;
        out.serialize_field("dsp_overflow", dsp_overflow)?;
        out.serialize_field("oversize", oversize)?;
        out.serialize_field("address_taken", address_taken)?;
        out.end()
    }
}

struct HistogramJson<'a>(&'a Histogram);

impl Serialize for HistogramJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Histogram { bounds, counts, sum, count } = self.0;
        let mut out = serializer.serialize_struct("Histogram", 4)?;
        out.serialize_field("bounds", bounds)?;
        out.serialize_field("counts", counts)?;
        out.serialize_field("sum", sum)?;
        out.serialize_field("count", count)?;
        out.end()
    }
}

/// `GET`/`PUT /api/policy` answers: the [`SuppressionPolicy`] in force,
/// `{"default": bool, "rooms": {name: bool}, "devices": {id: bool}}`.
#[derive(Debug, Clone, Copy)]
pub struct PolicyJson<'a>(pub &'a SuppressionPolicy);

impl Serialize for PolicyJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Rooms<'a>(&'a HashMap<RoomId, bool>);
        impl Serialize for Rooms<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut map = serializer.serialize_map(Some(self.0.len()))?;
                for (room, on) in self.0 {
                    map.serialize_entry(&room.0, on)?;
                }
                map.end()
            }
        }
        let SuppressionPolicy { default, rooms, devices } = self.0;
        let mut out = serializer.serialize_struct("SuppressionPolicy", 3)?;
        out.serialize_field("default", default)?;
        out.serialize_field("rooms", &Rooms(rooms))?;
        out.serialize_field("devices", devices)?;
        out.end()
    }
}

/// `PUT /api/policy` bodies: a [`PolicyChange`], by `scope`:
/// `{"scope": "default", "on": bool}`, `{"scope": "room", "room": name,
/// "on": bool | null}`, `{"scope": "device", "device": id, "on": bool |
/// null}` (null clears the setting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyChangeJson(pub PolicyChange);

impl<'de> Deserialize<'de> for PolicyChangeJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// The JSON shape; the change itself is the core's.
        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case", tag = "scope")]
        enum Body {
            Default { on: bool },
            Room { room: String, on: Option<bool> },
            Device { device: String, on: Option<bool> },
        }
        Ok(PolicyChangeJson(match Body::deserialize(deserializer)? {
            Body::Default { on } => PolicyChange::Default { on },
            Body::Room { room, on } => PolicyChange::Room { room: RoomId(room), on },
            Body::Device { device, on } => PolicyChange::Device { device, on },
        }))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    #[test]
    fn stats_keep_the_api_spelling() {
        let mut stats = SfuStats { participants: 3, ..SfuStats::default() };
        stats.dropped.not_permitted = 4;
        stats.removed.insert("ice_timeout", 2);
        stats.rtt.observe(0.002);
        let value = serde_json::to_value(StatsJson(&stats)).unwrap();
        let keys: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 29, "{keys:?}");
        assert_eq!(value["participants"], 3);
        assert_eq!(value["dropped"]["not_permitted"], 4);
        assert_eq!(value["removed"], json!({ "ice_timeout": 2 }));
        assert_eq!(value["rtt"]["count"], 1);
        assert_eq!(value["rtt"]["counts"][1], 1);
        assert_eq!(value["rtt"]["bounds"].as_array().unwrap().len(), stats.rtt.bounds.len());
        for key in ["rooms", "forwarding_entries", "demux_entries", "processed_tracks", "suppressed_tracks", "slot_rooms", "room_speakers"] {
            assert!(value.get(key).is_some(), "{key}");
        }
    }

    #[test]
    fn policy_changes_read_and_policies_write_as_before() {
        let change = |body: Value| serde_json::from_value::<PolicyChangeJson>(body).map(|c| c.0);
        assert_eq!(change(json!({ "scope": "default", "on": true })).unwrap(), PolicyChange::Default { on: true });
        assert_eq!(
            change(json!({ "scope": "room", "room": "call-7", "on": true })).unwrap(),
            PolicyChange::Room { room: RoomId::from("call-7"), on: Some(true) }
        );
        assert_eq!(change(json!({ "scope": "device", "device": "bob", "on": null })).unwrap(), PolicyChange::Device { device: "bob".into(), on: None });
        assert!(change(json!({ "scope": "planet" })).is_err());
        assert!(change(json!({ "scope": "default" })).is_err());

        let mut policy = SuppressionPolicy::default();
        policy.apply(PolicyChange::Room { room: RoomId::from("icu"), on: Some(false) });
        policy.apply(PolicyChange::Device { device: "bed-1".into(), on: Some(true) });
        let value = serde_json::to_value(PolicyJson(&policy)).unwrap();
        assert_eq!(value, json!({ "default": false, "rooms": { "icu": false }, "devices": { "bed-1": true } }));
    }
}
