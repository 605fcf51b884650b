//! The load tester against a real server it starts: a short run of a few
//! rooms, 1:1 calls and idle devices must lose nothing on loopback (within
//! a tolerance), report every figure, and leave nothing on the server; the
//! WebSocket path with audio slots, a fault and churn converges; a violated
//! SLO sets the exit code.

use std::path::PathBuf;

use fleetcall_loadtest::cli::{EXIT_OK, EXIT_SLO, main_with};
use fleetcall_loadtest::report::{Report, from_json};

const BIN: &str = env!("CARGO_BIN_EXE_fleetcall");

fn out_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fleetcall-loadtest-{}-{name}.json", std::process::id()))
}

/// Runs the tool in-process; returns its exit code and the JSON report.
fn run(name: &str, args: &[&str]) -> (i32, Option<Report>) {
    let out = out_path(name);
    let _ = std::fs::remove_file(&out);
    let mut argv = vec!["fleetcall-loadtest", "--spawn", BIN, "--quiet", "--out", out.to_str().unwrap()];
    argv.extend_from_slice(args);
    let code = main_with(argv);
    let report = std::fs::read_to_string(&out).ok().map(|text| from_json(&text).expect("the report parses"));
    let _ = std::fs::remove_file(&out);
    (code, report)
}

#[test]
fn a_short_mixed_run_loses_nothing_and_leaves_nothing() {
    let (code, report) = run(
        "mixed",
        &[
            "--rooms", "3", "--per-room", "3", "--talkers", "2", "--duration", "4", "--settle", "1.5", "--ramp", "40/s",
            "--calls-per-sec", "1", "--call-secs", "1", "--answer-after", "0.1", "--idle", "4",
            "--slo", "loss=1%,leaks=0,failures=0",
        ],
    );
    let r = report.expect("a report");
    eprintln!("{}", r.table());
    assert_eq!(code, EXIT_OK, "violations: {:?}", r.slo.violations);
    // Structure: what was planned, registered and measured.
    assert_eq!(r.target, "fleetcall");
    assert_eq!(r.room_control, "quic");
    assert_eq!(r.devices, 3 * 3 + 2 * r.scenario.call_pairs() + 4);
    assert_eq!(r.registered as usize, r.devices, "every device registered");
    assert_eq!(r.failures, 0, "{:?}", r.failure_samples);
    // Every listener hears both talkers of its room (each talker hears the
    // other): 3 rooms x 2 talkers x 2 receivers.
    assert_eq!(r.media.streams, 12);
    assert!(r.media.expected > 12 * 50, "at least a second of audio per stream: {}", r.media.expected);
    let loss = r.media.loss.expect("loss measured");
    assert!(loss <= 0.01, "loss {loss} on loopback");
    assert!(r.media.worst_stream_loss <= 0.05, "worst stream {}", r.media.worst_stream_loss);
    assert_eq!(r.media.own_audio, 0, "nobody hears itself");
    assert!(r.media.matched_exact > 0 && r.media.matched_reencoded == 0, "audio passes through untouched");
    assert!(r.latency.audio_e2e.count > 100 && r.latency.audio_e2e.p99_ms.is_some());
    assert_eq!(r.latency.register.count as usize, r.devices);
    assert!(r.latency.join_to_first_audio.count >= 1);
    assert!(r.latency.invite_to_ringing.count >= 1 && r.latency.answer_to_first_audio.count >= 1);
    assert!(r.calls.0 >= 1 && r.calls.1 >= 1, "calls placed and answered: {:?}", r.calls);
    assert!(r.resources.server_cpu_pct.is_some() && r.resources.server_rss_mb.is_some());
    assert!(r.resources.server_forwarded_packets.unwrap_or(0) > 0);
    // The leak check.
    assert!(r.leak.checked && r.leak.clean, "{:?}", r.leak);
    assert_eq!(r.leak.total(), 0);
}

#[test]
fn websocket_rooms_on_audio_slots_converge_after_a_fault() {
    let (code, report) = run(
        "slots",
        &[
            "--rooms", "2", "--per-room", "6", "--talkers", "2", "--control", "ws", "--duration", "5", "--settle", "1",
            "--ramp", "40/s", "--fault", "media-drop:1@1.5+0.5", "--slo", "leaks=0,converge_max_s=3", "--seed", "1",
        ],
    );
    let r = report.expect("a report");
    eprintln!("{}", r.table());
    assert_eq!(code, EXIT_OK, "violations: {:?}", r.slo.violations);
    assert_eq!(r.room_control, "ws");
    assert_eq!(r.media.slot_rooms, 2, "rooms of 6 with 3 slots forward through slots");
    assert_eq!(r.media.uncounted_rooms, 0);
    // 2 rooms x 2 talkers x 5 listeners; the fault's victim may be a
    // talker whose streams then count only until the fault.
    assert!(r.media.streams >= 2 * 2 * 5 - 5, "streams {}", r.media.streams);
    assert!(r.media.loss.is_some_and(|l| l <= 0.01), "loss {:?}", r.media.loss);
    assert_eq!(r.faults.len(), 1);
    assert!(r.faults[0].converged_s.is_some(), "{:?}", r.faults);
    assert!(r.leak.clean, "{:?}", r.leak);
}

#[test]
fn a_violated_slo_sets_the_exit_code() {
    let (code, report) = run("slo", &["--rooms", "1", "--per-room", "2", "--duration", "2", "--settle", "0.5", "--slo", "latency_p99_ms=0"]);
    let r = report.expect("a report");
    assert_eq!(code, EXIT_SLO);
    assert!(!r.slo.passed);
    assert!(r.slo.violations[0].starts_with("latency_p99_ms"), "{:?}", r.slo.violations);
}
