//! The control plane's Prometheus series: every name in one place.
//!
//! Built at scrape time from the controller's plain [`Stats`] and [`Gauges`]
//! (fleetcall-signaling knows no Prometheus). Labels are bounded enums
//! (reachability, phase, reason, code), never ids.

use fleetcall_media::metrics::Family;
use fleetcall_signaling::controller::{DurationHistogram, Gauges, Reachability, Refusal, Stats};
use fleetcall_signaling::pb::{CallPhase, CloseReason, EndReason, ErrorCode};
use prometheus::proto::MetricFamily;

fn reachability_name(r: Reachability) -> &'static str {
    match r {
        Reachability::Online => "online",
        Reachability::Degraded => "degraded",
        Reachability::Unreachable => "unreachable",
    }
}

/// `CALL_PHASE_RINGING` -> `ringing`.
fn phase_name(phase: CallPhase) -> String {
    phase.as_str_name().trim_start_matches("CALL_PHASE_").to_lowercase()
}

/// `END_REASON_RING_TIMEOUT` -> `ring_timeout`; `none` when not ended.
fn reason_name(reason: Option<EndReason>) -> String {
    reason.map_or_else(|| "none".to_owned(), |r| r.as_str_name().trim_start_matches("END_REASON_").to_lowercase())
}

fn seconds(family: Family, labels: &[(&str, &str)], h: &DurationHistogram) -> Family {
    let bounds: Vec<f64> = h.bounds.iter().map(|b| b.as_secs_f64()).collect();
    family.buckets(labels, &bounds, &h.counts, h.sum.as_secs_f64(), h.count)
}

/// Every control-plane series.
pub fn families(stats: &Stats, gauges: &Gauges) -> Vec<MetricFamily> {
    let total = |n: u64| n as f64;
    let mut devices = Family::gauge("fleetcall_devices", "Known devices by reachability.");
    for r in [Reachability::Online, Reachability::Degraded, Reachability::Unreachable] {
        devices = devices.value(&[("reachability", reachability_name(r))], total(gauges.devices_by_reachability.get(&r).copied().unwrap_or(0)));
    }
    let mut calls = Family::gauge("fleetcall_calls", "Calls by phase (ended calls are remembered for a while).");
    for phase in [CallPhase::Inviting, CallPhase::Ringing, CallPhase::Connecting, CallPhase::Active, CallPhase::Ended] {
        calls = calls.value(&[("phase", &phase_name(phase))], total(gauges.calls_by_phase.get(&phase).copied().unwrap_or(0)));
    }
    let mut transitions = Family::counter("fleetcall_call_transitions_total", "Call phase transitions; from=unspecified is creation, reason is set on the end.");
    for (t, n) in &stats.call_transitions {
        transitions = transitions.value(&[("from", &phase_name(t.from)), ("to", &phase_name(t.to)), ("reason", &reason_name(t.reason))], total(*n));
    }
    // Enumerated label sets get every value, zeros included, so dashboards
    // see a series before the first event.
    let mut removed = Family::counter("fleetcall_group_participants_removed_total", "Group participants removed while the call went on, by reason.");
    for reason in (1..).map_while(|i| EndReason::try_from(i).ok()) {
        removed = removed.value(&[("reason", &reason_name(Some(reason)))], total(stats.participants_removed.get(&reason).copied().unwrap_or(0)));
    }
    let mut errors = Family::counter("fleetcall_protocol_errors_total", "Error replies sent to devices, by code.");
    for code in (1..64).filter_map(|i| ErrorCode::try_from(i).ok()) {
        let name = code.as_str_name().trim_start_matches("ERROR_CODE_").to_lowercase();
        errors = errors.value(&[("code", &name)], total(stats.errors_sent.get(&code).copied().unwrap_or(0)));
    }
    let mut closed = Family::counter("fleetcall_connections_closed_total", "Device connections the server closed, by reason.");
    for reason in (1..).map_while(|i| CloseReason::try_from(i).ok()) {
        let name = reason.as_str_name().trim_start_matches("CLOSE_REASON_").to_lowercase();
        closed = closed.value(&[("reason", &name)], total(stats.connections_closed.get(&reason).copied().unwrap_or(0)));
    }
    let mut refused = Family::counter(
        "fleetcall_control_refused_total",
        "Frames, requests and connections the controller refused at a limit: rate_limited (a frame over its connection's message rate), devices (devices per node), calls (live calls per node), pending_invites (invitations ringing per device), call_full (members per call or room), outbound_queue (a connection that stopped reading).",
    );
    for r in Refusal::ALL {
        refused = refused.value(&[("reason", r.as_str())], total(stats.refused.get(&r).copied().unwrap_or(0)));
    }
    let mut reachability = Family::counter("fleetcall_reachability_changes_total", "Device reachability changes (flapping shows here).");
    for ((from, to), n) in &stats.reachability_changes {
        reachability = reachability.value(&[("from", reachability_name(*from)), ("to", reachability_name(*to))], total(*n));
    }
    let families = vec![
        devices.build(),
        Family::gauge("fleetcall_control_connections", "Open device control connections.").value(&[], total(gauges.connections)).build(),
        Family::gauge("fleetcall_sessions", "Device sessions, by whether a connection carries them.")
            .value(&[("state", "attached")], total(gauges.sessions.saturating_sub(gauges.sessions_detached)))
            .value(&[("state", "detached")], total(gauges.sessions_detached))
            .build(),
        calls.build(),
        // Leak checks (tests/netlab): at rest every timer belongs to a
        // connection, a session or a remembered ended call; a ring or media
        // deadline left over shows as a surplus here.
        Family::gauge("fleetcall_control_timers", "Armed controller deadlines (heartbeats, graces, rings, media steps, tombstones).").value(&[], total(gauges.timers)).build(),
        Family::gauge("fleetcall_control_media_legs", "SFU participants the controller believes exist.").value(&[], total(gauges.sfu_participants)).build(),
        Family::counter("fleetcall_calls_created_total", "Calls created, by kind.")
            .value(&[("kind", "direct")], total(stats.direct_calls_created))
            .value(&[("kind", "group")], total(stats.group_calls_created))
            .value(&[("kind", "room")], total(stats.rooms_opened))
            .build(),
        transitions.build(),
        removed.build(),
        Family::counter("fleetcall_heartbeats_total", "Heartbeats: sent by the server, acks received, received from devices, missed intervals.")
            .value(&[("event", "sent")], total(stats.heartbeats_sent))
            .value(&[("event", "acked")], total(stats.heartbeat_acks_received))
            .value(&[("event", "received")], total(stats.heartbeats_received))
            .value(&[("event", "missed")], total(stats.heartbeats_missed))
            .build(),
        seconds(Family::histogram("fleetcall_heartbeat_rtt_seconds", "Round-trip time of server heartbeats through the control stream."), &[], &stats.heartbeat_rtt).build(),
        reachability.build(),
        Family::counter("fleetcall_sessions_total", "Session outcomes: created, resumed within the grace, unknown on resume (full rejoin), swept stale, replaced.")
            .value(&[("outcome", "created")], total(stats.sessions_created))
            .value(&[("outcome", "resumed")], total(stats.sessions_resumed))
            .value(&[("outcome", "rejoined")], total(stats.sessions_unknown))
            .value(&[("outcome", "swept")], total(stats.stale_sessions_swept))
            .value(&[("outcome", "replaced")], total(stats.sessions_replaced))
            .build(),
        Family::counter("fleetcall_duplicate_requests_total", "Requests answered from the idempotency cache.").value(&[], total(stats.duplicate_requests)).build(),
        errors.build(),
        closed.build(),
        refused.build(),
        Family::counter("fleetcall_stale_sfu_notices_total", "SFU notices for participations the controller no longer knows (ignored).")
            .value(&[], total(stats.stale_sfu_notices))
            .build(),
        seconds(Family::histogram("fleetcall_convergence_seconds", "From a fault to the call (or participant) reaching its terminal state."), &[], &stats.fault_to_convergence).build(),
        seconds(Family::histogram("fleetcall_ring_to_answer_seconds", "From an invitation to its answer."), &[], &stats.ring_to_answer).build(),
    ];
    // Transitions and reachability changes have no series until they happen.
    families.into_iter().filter(|f| !f.get_metric().is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fleetcall_signaling::controller::Transition;

    use super::*;

    #[test]
    fn series_follow_the_controller() {
        let mut stats = Stats::default();
        stats.call_transitions.insert(Transition { from: CallPhase::Ringing, to: CallPhase::Ended, reason: Some(EndReason::RingTimeout) }, 2);
        stats.heartbeats_missed = 4;
        stats.refused.insert(Refusal::RateLimited, 7);
        stats.fault_to_convergence.observe(Duration::from_millis(700));
        let mut gauges = Gauges::default();
        gauges.devices_by_reachability.insert(Reachability::Degraded, 3);
        gauges.calls_by_phase.insert(CallPhase::Ringing, 1);
        let mut text = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &families(&stats, &gauges), &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("fleetcall_devices{reachability=\"degraded\"} 3\n"), "{text}");
        assert!(text.contains("fleetcall_calls{phase=\"ringing\"} 1\n"));
        assert!(text.contains("fleetcall_call_transitions_total{from=\"ringing\",to=\"ended\",reason=\"ring_timeout\"} 2\n"));
        assert!(text.contains("fleetcall_heartbeats_total{event=\"missed\"} 4\n"));
        assert!(text.contains("fleetcall_control_refused_total{reason=\"rate_limited\"} 7\n"), "{text}");
        assert!(text.contains("fleetcall_control_refused_total{reason=\"devices\"} 0\n"), "every limit has a series from the start");
        assert!(text.contains("fleetcall_connections_closed_total{reason=\"rate_limited\"} 0\n"), "{text}");
        assert!(text.contains("fleetcall_convergence_seconds_bucket{le=\"1\"} 1\n"), "{text}");
        assert!(text.contains("fleetcall_control_timers 0\n"), "{text}");
    }
}
