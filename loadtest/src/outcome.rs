//! What each group of devices measured, merged into the run's totals, and
//! the live counters behind the progress bar.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::histogram::Histogram;
use crate::ledger::LedgerTotals;
use crate::scenario::FaultKind;

/// Counters the groups bump and the progress bar reads.
#[derive(Debug, Default)]
pub struct Live {
    /// Devices registered on the control plane (QUIC or WebSocket).
    pub registered: AtomicU64,
    /// Devices whose media is connected now.
    pub media_up: AtomicU64,
    /// RTP packets sent.
    pub sent: AtomicU64,
    /// RTP packets received.
    pub received: AtomicU64,
    /// Calls answered (1:1 storm).
    pub calls: AtomicU64,
    /// Failures of any kind.
    pub failures: AtomicU64,
    /// Server restart: when the new process served, for re-registration times.
    pub restarted_at: Mutex<Option<Instant>>,
    /// Re-registration after a restart, from the moment the new server served.
    pub reregister: Mutex<Histogram>,
}

impl Live {
    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts from a gauge, never below zero.
    pub fn sub(counter: &AtomicU64, n: u64) {
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(n))
        });
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One injected fault and how the system converged.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct FaultOutcome {
    /// What.
    pub kind: FaultKind,
    /// The device it struck (empty for a server restart).
    pub device: String,
    /// Seconds after the ramp it struck.
    pub at_s: f64,
    /// Until others were told (kill: the first of them; stall/drop: that
    /// the device is reconnecting or gone), seconds after the fault.
    pub detected_s: Option<f64>,
    /// Until the system converged, seconds: kill — every other member was
    /// told the device is gone; stall, media drop — the device hears or is
    /// heard again, counted from the end of the fault; server restart —
    /// every room has audio again, from the moment the new server served.
    pub converged_s: Option<f64>,
}

/// Failures, counted, with the first few reasons.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Failures {
    /// How many.
    pub count: u64,
    /// The first reasons.
    pub samples: Vec<String>,
}

impl Failures {
    const SAMPLES: usize = 10;

    /// Records one.
    pub fn push(&mut self, live: &Live, reason: String) {
        tracing::debug!(%reason, "failure");
        self.count += 1;
        Live::add(&live.failures, 1);
        if self.samples.len() < Self::SAMPLES {
            self.samples.push(reason);
        }
    }

    /// Adds another set.
    pub fn merge(&mut self, other: &Failures) {
        self.count += other.count;
        for s in &other.samples {
            if self.samples.len() < Self::SAMPLES {
                self.samples.push(s.clone());
            }
        }
    }
}

/// What a group (room, call pair, idle devices) measured.
#[derive(Debug, Default)]
pub struct GroupResult {
    /// Media totals.
    pub media: LedgerTotals,
    /// Registration (QUIC handshake + Hello/Welcome).
    pub register: Histogram,
    /// WebSocket registration: connect + `Hello`/`Welcome` (rooms on `/ws/device`).
    pub ws_connect: Histogram,
    /// Join request to the first audio packet from a talker.
    pub join_to_audio: Histogram,
    /// Invite sent to the caller seeing `RINGING`.
    pub invite_to_ringing: Histogram,
    /// Accept sent to the first audio packet, each side of the call.
    pub answer_to_audio: Histogram,
    /// Faults.
    pub faults: Vec<FaultOutcome>,
    /// Failures.
    pub failures: Failures,
    /// Requests tried again after a transient error (session lost, timeout).
    pub retries: u64,
    /// Rooms whose audio came through slots.
    pub slot_rooms: u64,
    /// Rooms whose loss was not counted (more talkers than slots).
    pub uncounted_rooms: u64,
    /// Calls placed, answered, skipped (the pair was still busy).
    pub calls_placed: u64,
    /// Calls answered.
    pub calls_answered: u64,
    /// Calls the storm could not place in time.
    pub calls_skipped: u64,
    /// How late the 20 ms send ticks fired (the tool's own overload).
    pub tick_late: Histogram,
    /// Frames not sent because media was not connected.
    pub unsent: u64,
    /// Datagrams the tool's sockets refused.
    pub send_errors: u64,
}

impl GroupResult {
    /// Adds another group's results.
    pub fn merge(&mut self, other: GroupResult) {
        let m = &mut self.media;
        let o = &other.media;
        m.sent += o.sent;
        m.received += o.received;
        m.exact += o.exact;
        m.reencoded += o.reencoded;
        m.payload_only += o.payload_only;
        m.unknown += o.unknown;
        m.own += o.own;
        m.streams += o.streams;
        m.expected += o.expected;
        m.delivered += o.delivered;
        m.worst_stream_loss = m.worst_stream_loss.max(o.worst_stream_loss);
        m.streams_over_1pct += o.streams_over_1pct;
        m.latency.merge(&o.latency);
        m.jitter.merge(&o.jitter);
        self.register.merge(&other.register);
        self.ws_connect.merge(&other.ws_connect);
        self.join_to_audio.merge(&other.join_to_audio);
        self.invite_to_ringing.merge(&other.invite_to_ringing);
        self.answer_to_audio.merge(&other.answer_to_audio);
        self.faults.extend(other.faults);
        self.failures.merge(&other.failures);
        self.retries += other.retries;
        self.slot_rooms += other.slot_rooms;
        self.uncounted_rooms += other.uncounted_rooms;
        self.calls_placed += other.calls_placed;
        self.calls_answered += other.calls_answered;
        self.calls_skipped += other.calls_skipped;
        self.tick_late.merge(&other.tick_late);
        self.unsent += other.unsent;
        self.send_errors += other.send_errors;
    }

    /// Adds a ledger's totals.
    pub fn add_media(&mut self, totals: LedgerTotals) {
        let mut other = GroupResult {
            media: totals,
            ..GroupResult::default()
        };
        other.faults = Vec::new();
        self.merge(other);
    }
}

/// Seconds between two instants, rounded to milliseconds.
pub fn secs(from: Instant, to: Instant) -> f64 {
    (to.saturating_duration_since(from).as_secs_f64() * 1000.0).round() / 1000.0
}

/// Seconds of a duration, rounded to milliseconds.
pub fn dur_secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}
