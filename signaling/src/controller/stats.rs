//! Plain counters for the metrics exporter (which lives in the driver).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::pb::{CallPhase, CloseReason, EndReason, ErrorCode};

use super::Reachability;

/// Counters since the controller started. Gauges (calls by phase, devices by
/// reachability) are computed on demand by
/// [`Controller::gauges`](super::Controller::gauges).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Stats {
    /// 1:1 calls created.
    pub direct_calls_created: u64,
    /// Group calls created.
    pub group_calls_created: u64,
    /// Named rooms opened (a room reopened after it emptied counts again).
    pub rooms_opened: u64,
    /// Call phase transitions; `from: Unspecified` is creation, `to: Ended`
    /// carries the reason.
    pub call_transitions: BTreeMap<Transition, u64>,
    /// Group participants removed while the call went on, by reason.
    pub participants_removed: BTreeMap<EndReason, u64>,
    /// Heartbeats the server sent.
    pub heartbeats_sent: u64,
    /// Acks the server received for its heartbeats.
    pub heartbeat_acks_received: u64,
    /// Heartbeats received from devices (and acked).
    pub heartbeats_received: u64,
    /// Heartbeat intervals that ended without the ack for their heartbeat.
    pub heartbeats_missed: u64,
    /// Reachability changes `(from, to)`.
    pub reachability_changes: BTreeMap<(Reachability, Reachability), u64>,
    /// Sessions created by a fresh `Hello`.
    pub sessions_created: u64,
    /// Sessions resumed within the grace.
    pub sessions_resumed: u64,
    /// Resume attempts answered with `SessionUnknown` (the device rejoins).
    pub sessions_unknown: u64,
    /// Detached sessions swept when their grace ended.
    pub stale_sessions_swept: u64,
    /// Sessions ended because the device started a fresh one.
    pub sessions_replaced: u64,
    /// Requests whose `op_id` was seen before (answered from the cache).
    pub duplicate_requests: u64,
    /// Error replies sent, by code.
    pub errors_sent: BTreeMap<ErrorCode, u64>,
    /// Connections the controller closed, by reason.
    pub connections_closed: BTreeMap<CloseReason, u64>,
    /// SFU notices for participants the controller no longer knows.
    pub stale_sfu_notices: u64,
    /// Requests, frames and connections refused because a limit was
    /// reached, by limit.
    pub refused: BTreeMap<Refusal, u64>,
    /// Time from a fault (last proof of life of the failed session, or the
    /// start of the phase that timed out) until the call or participant
    /// reached its terminal state.
    pub fault_to_convergence: DurationHistogram,
    /// Round-trip time of acked server heartbeats.
    pub heartbeat_rtt: DurationHistogram,
    /// From an invitation to its answer (1:1 calls).
    pub ring_to_answer: DurationHistogram,
}

/// Which limit refused something (see [`Config`](super::Config)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// A frame over the connection's message rate (`messages_per_second`,
    /// `message_burst`): answered `RATE_LIMITED`, not processed.
    RateLimited,
    /// A new device while the node holds `max_devices` sessions.
    Devices,
    /// A new call or room while the node holds `max_calls` live ones.
    Calls,
    /// Invitations over `max_pending_invites` from one device.
    PendingInvites,
    /// A member over a call's or room's capacity (`max_group_members`,
    /// `max_room_members`).
    CallFull,
    /// A connection whose outbound queue (`outbound_queue`) was full.
    OutboundQueue,
}

impl Refusal {
    /// Every limit, for exporters that show zeros too.
    pub const ALL: [Refusal; 6] = [
        Refusal::RateLimited,
        Refusal::Devices,
        Refusal::Calls,
        Refusal::PendingInvites,
        Refusal::CallFull,
        Refusal::OutboundQueue,
    ];

    /// A stable lower-case name (metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::RateLimited => "rate_limited",
            Refusal::Devices => "devices",
            Refusal::Calls => "calls",
            Refusal::PendingInvites => "pending_invites",
            Refusal::CallFull => "call_full",
            Refusal::OutboundQueue => "outbound_queue",
        }
    }
}

/// One call phase transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Transition {
    /// Phase before; `Unspecified` for a new call.
    pub from: CallPhase,
    /// Phase after.
    pub to: CallPhase,
    /// Set when `to` is `Ended`.
    pub reason: Option<EndReason>,
}

/// A fixed-bucket histogram of durations.
#[derive(Debug, Clone, PartialEq)]
pub struct DurationHistogram {
    /// Upper bounds of the buckets, ascending; a last implicit bucket is +Inf.
    pub bounds: Vec<Duration>,
    /// Observations per bucket (non-cumulative), `bounds.len() + 1` entries.
    pub counts: Vec<u64>,
    /// Number of observations.
    pub count: u64,
    /// Sum of observations.
    pub sum: Duration,
    /// Largest observation.
    pub max: Duration,
}

impl Default for DurationHistogram {
    fn default() -> Self {
        let bounds: Vec<Duration> = [
            100, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 30_000, 60_000,
        ]
        .into_iter()
        .map(Duration::from_millis)
        .collect();
        let counts = vec![0; bounds.len() + 1];
        DurationHistogram {
            bounds,
            counts,
            count: 0,
            sum: Duration::ZERO,
            max: Duration::ZERO,
        }
    }
}

impl DurationHistogram {
    /// An empty histogram with these bucket bounds, in milliseconds.
    pub fn with_bounds_ms(bounds_ms: &[u64]) -> Self {
        let bounds: Vec<Duration> = bounds_ms.iter().copied().map(Duration::from_millis).collect();
        let counts = vec![0; bounds.len() + 1];
        DurationHistogram { bounds, counts, count: 0, sum: Duration::ZERO, max: Duration::ZERO }
    }

    /// Records one observation.
    pub fn observe(&mut self, d: Duration) {
        let i = self
            .bounds
            .iter()
            .position(|b| d <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.count += 1;
        self.sum += d;
        self.max = self.max.max(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets() {
        let mut h = DurationHistogram::default();
        h.observe(Duration::from_millis(100));
        h.observe(Duration::from_secs(7));
        h.observe(Duration::from_secs(600));
        assert_eq!(h.counts[0], 1);
        assert_eq!(h.counts[5], 1);
        assert_eq!(*h.counts.last().unwrap(), 1);
        assert_eq!(h.count, 3);
        assert_eq!(h.max, Duration::from_secs(600));
    }
}
