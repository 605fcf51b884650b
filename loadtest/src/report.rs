//! The report: one structure for `--json`, a table for humans, and the SLO
//! verdict that sets the exit code.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::histogram::{Histogram, Summary};
use crate::outcome::{FaultOutcome, GroupResult, Live, secs};
use crate::scenario::{ControlPath, FaultKind, Scenario, Slo};
use crate::server::{MetricsSample, ProcSample, Server, Switches, proc_sample, thread_switches};

/// A continuous Opus stream: 50 packets per second.
const STREAM_PPS: f64 = 50.0;

/// The state of things at one instant (start and end of the window).
#[derive(Debug, Clone)]
pub struct Mark {
    at: Instant,
    server: Option<ProcSample>,
    switches: Option<Switches>,
    tool: Option<ProcSample>,
    forwarded: Option<u64>,
    metrics: Option<MetricsSample>,
    received: u64,
}

impl Mark {
    /// Samples the server, the tool and the counters.
    pub async fn take(server: &Server, live: &Live) -> Mark {
        let forwarded = server
            .stats()
            .await
            .ok()
            .and_then(|s| s["rtp_forwarded"].as_u64());
        let metrics = server.metrics().await.ok();
        Mark {
            at: Instant::now(),
            server: server.pid.and_then(proc_sample),
            switches: server.pid.and_then(thread_switches),
            tool: proc_sample(std::process::id()),
            forwarded,
            metrics,
            received: Live::get(&live.received),
        }
    }

    /// A mark without a fleetcall server (Janus: the process only).
    pub fn take_process(pid: Option<u32>, live: &Live) -> Mark {
        Mark {
            at: Instant::now(),
            server: pid.and_then(proc_sample),
            switches: pid.and_then(thread_switches),
            tool: proc_sample(std::process::id()),
            forwarded: None,
            metrics: None,
            received: Live::get(&live.received),
        }
    }
}

/// Marks at the start and end of the measurement window.
#[derive(Debug, Clone, Default)]
pub struct Marks {
    /// Before the first device (the server's baseline).
    pub baseline: Option<Mark>,
    /// Window start.
    pub start: Option<Mark>,
    /// Window end.
    pub end: Option<Mark>,
}

/// What the server held after the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Leak {
    /// The check ran (the admin API answered).
    pub checked: bool,
    /// Nothing left: no room, participant, track, forwarding or demux
    /// entry, live call.
    pub clean: bool,
    /// Seconds after the devices left until it was clean.
    pub clean_after_s: Option<f64>,
    /// Rooms left.
    pub rooms: u64,
    /// Participants left.
    pub participants: u64,
    /// Published tracks left.
    pub tracks: u64,
    /// Forwarding entries left.
    pub forwarding_entries: u64,
    /// Demultiplexing entries left.
    pub demux_entries: u64,
    /// Calls not ended.
    pub live_calls: u64,
}

impl Leak {
    /// Polls the admin API until everything is gone or `wait` passed.
    pub async fn check(server: &Server, wait: Duration) -> Leak {
        let start = Instant::now();
        let mut last = Leak::default();
        loop {
            if let Ok(leak) = Leak::read(server).await {
                last = leak;
                if last.clean {
                    last.clean_after_s = Some(secs(start, Instant::now()));
                    return last;
                }
            }
            if start.elapsed() >= wait {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn read(server: &Server) -> anyhow::Result<Leak> {
        let stats = server.stats().await?;
        let calls = server.calls().await?;
        let n = |k: &str| stats[k].as_u64().unwrap_or(0);
        let live_calls = calls.as_array().map_or(0, |a| {
            a.iter()
                .filter(|c| c["phase"].as_str() != Some("CALL_PHASE_ENDED"))
                .count() as u64
        });
        let mut leak = Leak {
            checked: true,
            clean: false,
            clean_after_s: None,
            rooms: n("rooms"),
            participants: n("participants"),
            tracks: n("tracks"),
            forwarding_entries: n("forwarding_entries"),
            demux_entries: n("demux_entries"),
            live_calls,
        };
        leak.clean = leak.total() == 0;
        Ok(leak)
    }

    /// Everything left, summed.
    pub fn total(&self) -> u64 {
        self.rooms
            + self.participants
            + self.tracks
            + self.forwarding_entries
            + self.demux_entries
            + self.live_calls
    }
}

/// Latencies, milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latencies {
    /// QUIC registration: handshake + `Hello`/`Welcome`.
    pub register: Summary,
    /// WebSocket registration: connect + `Hello`/`Welcome` (rooms on `/ws/device`).
    pub ws_connect: Summary,
    /// Join request to the first talker packet (only joins with a talker up).
    pub join_to_first_audio: Summary,
    /// Invite to `RINGING` at the caller.
    pub invite_to_ringing: Summary,
    /// Accept to the first audio packet, each side.
    pub answer_to_first_audio: Summary,
    /// Server restart: the new process serving to each device registered again.
    pub reregister_after_restart: Summary,
    /// End-to-end audio: send to receive, talker packets.
    pub audio_e2e: Summary,
}

/// Media figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Media {
    /// Talker streams (receiver, talker pairs) counted for loss.
    pub streams: u64,
    /// Their packets sent in the window.
    pub expected: u64,
    /// Of those, received.
    pub delivered: u64,
    /// 1 - delivered / expected.
    pub loss: Option<f64>,
    /// Worst stream.
    pub worst_stream_loss: f64,
    /// Streams over 1 % loss.
    pub streams_over_1pct: u64,
    /// Interarrival jitter per stream.
    pub jitter: Summary,
    /// Packets the devices sent (all, whole run).
    pub packets_sent: u64,
    /// Packets the devices received (all, whole run).
    pub packets_received: u64,
    /// Received and matched by timestamp and payload.
    pub matched_exact: u64,
    /// Matched by timestamp, payload re-encoded (suppression).
    pub matched_reencoded: u64,
    /// Matched by payload, timestamp rewritten (slots).
    pub matched_payload: u64,
    /// Matched by nothing (comfort noise of several silent devices looks alike).
    pub unmatched: u64,
    /// A device heard itself.
    pub own_audio: u64,
    /// Rooms with audio slots.
    pub slot_rooms: u64,
    /// Rooms whose loss is not counted (more talkers than slots).
    pub uncounted_rooms: u64,
    /// Frames the devices could not send (media not connected).
    pub unsent_frames: u64,
    /// Datagrams the tool's sockets refused.
    pub socket_errors: u64,
}

impl Media {
    /// The media figures of a run's results.
    pub fn of(r: &GroupResult) -> Media {
        let m = &r.media;
        Media {
            streams: m.streams,
            expected: m.expected,
            delivered: m.delivered,
            loss: (m.expected > 0).then(|| round6(1.0 - m.delivered as f64 / m.expected as f64)),
            worst_stream_loss: round6(m.worst_stream_loss),
            streams_over_1pct: m.streams_over_1pct,
            jitter: m.jitter.summary(),
            packets_sent: m.sent,
            packets_received: m.received,
            matched_exact: m.exact,
            matched_reencoded: m.reencoded,
            matched_payload: m.payload_only,
            unmatched: m.unknown,
            own_audio: m.own,
            slot_rooms: r.slot_rooms,
            uncounted_rooms: r.uncounted_rooms,
            unsent_frames: r.unsent,
            socket_errors: r.send_errors,
        }
    }
}

/// Server and tool resources over the window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Resources {
    /// Seconds of the measurement window.
    pub measured_s: Option<f64>,
    /// Where the server figures come from: `proc` or `metrics`.
    pub server_source: Option<String>,
    /// Server CPU, % of one core, over the window.
    pub server_cpu_pct: Option<f64>,
    /// Of that, in the kernel (`/proc` only).
    pub server_sys_pct: Option<f64>,
    /// Server resident memory at the end of the window, MB.
    pub server_rss_mb: Option<f64>,
    /// Largest resident memory seen, MB.
    pub server_peak_rss_mb: Option<f64>,
    /// Resident memory before the first device, MB.
    pub server_baseline_rss_mb: Option<f64>,
    /// Idle-device runs: server memory per registered device, KB (RSS at
    /// the end of the window less the baseline, over the devices).
    pub server_kb_per_device: Option<f64>,
    /// Idle-device runs: server CPU per registered device, µs per second.
    pub server_us_per_device_second: Option<f64>,
    /// RTP packets the server forwarded in the window (its counter).
    pub server_forwarded_packets: Option<u64>,
    /// Packets the devices received in the window.
    pub received_packets: u64,
    /// Server CPU per forwarded packet, µs (the server's counter, or what
    /// the devices received when it has none).
    pub server_cpu_us_per_packet: Option<f64>,
    /// Of that, in user space and in the kernel (`/proc` only).
    pub server_user_us_per_packet: Option<f64>,
    pub server_sys_us_per_packet: Option<f64>,
    /// System calls on the media sockets (recvmmsg and sendmmsg) per
    /// forwarded packet, from the server's counter.
    pub media_syscalls_per_packet: Option<f64>,
    /// Context switches of every server thread per forwarded packet
    /// (`/proc`): each wake-up and preemption, whatever its cause.
    pub server_switches_per_packet: Option<f64>,
    /// Wake-ups of the media workers (their voluntary context switches,
    /// `/proc`) per second, summed over workers, and per forwarded packet.
    pub worker_wakeups_per_s: Option<f64>,
    pub worker_wakeups_per_packet: Option<f64>,
    /// Media worker threads seen.
    pub media_workers: Option<usize>,
    /// Continuous (50 pps) audio streams one server core would forward at that cost.
    pub streams_per_core: Option<f64>,
    /// Forwarded streams during the window, as 50 pps equivalents.
    pub forwarded_streams: Option<f64>,
    /// Talker streams (counted for loss) per server core: the streams of
    /// this scenario one core holds, every server overhead included.
    pub talker_streams_per_core: Option<f64>,
    /// The tool's CPU over the window, % of one core.
    pub tool_cpu_pct: Option<f64>,
    /// How late the tool's 20 ms send ticks fired: its own overload.
    pub tool_tick_late: Summary,
    /// Tool worker threads.
    pub tool_threads: usize,
}

/// An SLO verdict.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Verdict {
    /// The thresholds.
    pub thresholds: Slo,
    /// What broke them.
    pub violations: Vec<String>,
    /// No violation.
    pub passed: bool,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// `fleetcall` or `janus`.
    pub target: String,
    /// Tool version.
    pub version: String,
    /// The command line.
    pub command: String,
    /// The seed of every random choice.
    pub seed: u64,
    /// The scenario as run.
    pub scenario: Scenario,
    /// Signaling of the room devices: `quic`, `ws` or `janus-http`.
    pub room_control: String,
    /// Local IP of the devices.
    pub bind_ip: String,
    /// Seconds of the ramp.
    pub ramp_s: f64,
    /// Measurement window, seconds after the ramp: [start, end].
    pub window_s: (f64, f64),
    /// Seconds from the start to everyone gone.
    pub total_s: f64,
    /// Devices planned.
    pub devices: usize,
    /// Devices that registered (or connected their WebSocket).
    pub registered: u64,
    /// Failures (registration, joins, media, unexpected ends).
    pub failures: u64,
    /// The first failure reasons.
    pub failure_samples: Vec<String>,
    /// Requests tried again after a transient error (a fault, a restart).
    pub retries: u64,
    /// Latencies.
    pub latency: Latencies,
    /// Media.
    pub media: Media,
    /// 1:1 calls placed, answered, and slots skipped because a pair was busy.
    pub calls: (u64, u64, u64),
    /// Faults and convergence.
    pub faults: Vec<FaultOutcome>,
    /// Resources.
    pub resources: Resources,
    /// What the server held after the run.
    pub leak: Leak,
    /// The SLO verdict.
    pub slo: Verdict,
}

/// Everything [`Report::build`] needs.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// The scenario.
    pub scenario: &'a Scenario,
    /// Its seed.
    pub seed: u64,
    /// The command line.
    pub command: &'a str,
    /// Room signaling.
    pub control: ControlPath,
    /// Devices' IP.
    pub bind_ip: IpAddr,
    /// The server.
    pub server: &'a Server,
    /// Start of the ramp.
    pub t0: Instant,
    /// End of the ramp.
    pub ramp_end: Instant,
    /// The window.
    pub window: (Instant, Instant),
    /// Everyone gone.
    pub finished: Instant,
    /// Merged group results.
    pub result: GroupResult,
    /// Window marks.
    pub marks: Marks,
    /// Largest server RSS seen.
    pub peak_rss: u64,
    /// The leak check.
    pub leak: Leak,
    /// Re-registrations after restarts.
    pub reregister: Histogram,
    /// Restarts: (seconds after the ramp, seconds until the new server served).
    pub restarts: Vec<(f64, f64)>,
    /// Tool threads.
    pub threads: usize,
}

impl Report {
    /// Assembles the report and evaluates the SLOs.
    pub fn build(i: Inputs<'_>) -> Report {
        let r = &i.result;
        let m = &r.media;
        let media = Media::of(r);
        let mut faults = r.faults.clone();
        for (k, (at_s, served_after)) in i.restarts.iter().enumerate() {
            // Room watches of a restart carry the rooms' convergence; add
            // one line for the restart itself (the slowest room).
            let rooms: Vec<&FaultOutcome> = r
                .faults
                .iter()
                .filter(|f| f.kind == FaultKind::ServerRestart && (f.at_s - at_s).abs() < 1e-6)
                .collect();
            // Converged: every room has audio again and every device that
            // was registered registered again (the slowest of both).
            let rooms_converged = rooms
                .iter()
                .map(|f| f.converged_s)
                .collect::<Option<Vec<f64>>>()
                .map(|v| v.into_iter().fold(0.0, f64::max));
            let quic_devices = r.register.count();
            let devices_converged = match i.reregister.summary() {
                s if quic_devices == 0 => Some(0.0).filter(|_| s.count == 0),
                s if s.count >= quic_devices => s.max_ms.map(|ms| ms / 1000.0),
                _ => None,
            };
            let converged = match (rooms_converged, devices_converged) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (None, Some(b)) if rooms.is_empty() => Some(b),
                _ => None,
            };
            faults
                .retain(|f| !(f.kind == FaultKind::ServerRestart && (f.at_s - at_s).abs() < 1e-6));
            faults.push(FaultOutcome {
                kind: FaultKind::ServerRestart,
                device: format!(
                    "server (restart {}; served again after {served_after} s)",
                    k + 1
                ),
                at_s: *at_s,
                detected_s: None,
                converged_s: converged,
            });
        }
        let resources = resources(&i);
        let leak = i.leak.clone();
        let mut resources = resources;
        resources.talker_streams_per_core =
            talker_streams_per_core(m.streams, resources.server_cpu_pct);
        let mut report = Report {
            target: "fleetcall".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            command: i.command.to_owned(),
            seed: i.seed,
            scenario: i.scenario.clone(),
            room_control: match i.control {
                ControlPath::Ws => "ws".into(),
                _ => "quic".into(),
            },
            bind_ip: i.bind_ip.to_string(),
            ramp_s: secs(i.t0, i.ramp_end),
            window_s: (secs(i.ramp_end, i.window.0), secs(i.ramp_end, i.window.1)),
            total_s: secs(i.t0, i.finished),
            devices: i.scenario.devices(),
            registered: 0,
            failures: r.failures.count,
            failure_samples: r.failures.samples.clone(),
            retries: r.retries,
            latency: Latencies {
                register: r.register.summary(),
                ws_connect: r.ws_connect.summary(),
                join_to_first_audio: r.join_to_audio.summary(),
                invite_to_ringing: r.invite_to_ringing.summary(),
                answer_to_first_audio: r.answer_to_audio.summary(),
                reregister_after_restart: i.reregister.summary(),
                audio_e2e: m.latency.summary(),
            },
            media,
            calls: (r.calls_placed, r.calls_answered, r.calls_skipped),
            faults,
            resources,
            leak,
            slo: Verdict::default(),
        };
        report.registered = r.register.count() + r.ws_connect.count();
        report.evaluate(&i.scenario.slo);
        report
    }

    /// Checks the thresholds.
    pub fn evaluate(&mut self, slo: &Slo) {
        let mut v = Vec::new();
        let mut check = |name: &str, limit: Option<f64>, value: Option<f64>| {
            if let Some(limit) = limit {
                match value {
                    Some(value) if value <= limit => {}
                    Some(value) => {
                        v.push(format!("{name} = {} > {}", fmt_num(value), fmt_num(limit)))
                    }
                    None => v.push(format!(
                        "{name}: not measured in this run (limit {})",
                        fmt_num(limit)
                    )),
                }
            }
        };
        check("loss", slo.loss, self.media.loss);
        check(
            "stream_loss",
            slo.stream_loss,
            (self.media.streams > 0).then_some(self.media.worst_stream_loss),
        );
        check(
            "latency_p99_ms",
            slo.latency_p99_ms,
            self.latency.audio_e2e.p99_ms,
        );
        check(
            "join_p99_ms",
            slo.join_p99_ms,
            self.latency.join_to_first_audio.p99_ms,
        );
        check(
            "register_p99_ms",
            slo.register_p99_ms,
            self.latency.register.p99_ms,
        );
        check(
            "ringing_p99_ms",
            slo.ringing_p99_ms,
            self.latency.invite_to_ringing.p99_ms,
        );
        check(
            "answer_p99_ms",
            slo.answer_p99_ms,
            self.latency.answer_to_first_audio.p99_ms,
        );
        let slowest = if self.faults.is_empty() {
            None
        } else {
            // A fault that never converged counts as infinitely slow.
            Some(
                self.faults
                    .iter()
                    .map(|f| f.converged_s.unwrap_or(f64::INFINITY))
                    .fold(0.0, f64::max),
            )
        };
        check("converge_max_s", slo.converge_max_s, slowest);
        check(
            "leaks",
            slo.leaks.map(|l| l as f64),
            self.leak.checked.then_some(self.leak.total() as f64),
        );
        check(
            "failures",
            slo.failures.map(|l| l as f64),
            Some(self.failures as f64),
        );
        check(
            "server_cpu_pct",
            slo.server_cpu_pct,
            self.resources.server_cpu_pct,
        );
        self.slo = Verdict {
            thresholds: slo.clone(),
            passed: v.is_empty(),
            violations: v,
        };
    }

    /// The summary table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let s = &self.scenario;
        let _ = writeln!(
            t,
            "fleetcall-loadtest {} against {} — seed {}",
            self.version, self.target, self.seed
        );
        if s.rooms.count > 0 {
            let _ = writeln!(
                t,
                "  rooms {} x {} ({} talking) over {}, suppression {:?}",
                s.rooms.count, s.rooms.per_room, s.rooms.talkers, self.room_control, s.suppression
            );
        }
        if s.calls.per_sec > 0.0 {
            let _ = writeln!(
                t,
                "  1:1 calls {}/s of {} s, answered after {} s",
                s.calls.per_sec, s.calls.duration_secs, s.calls.answer_after_secs
            );
        }
        if s.idle.devices > 0 {
            let _ = writeln!(t, "  idle devices {}", s.idle.devices);
        }
        let _ = writeln!(
            t,
            "  {} devices, ramp {} s, window {}..{} s after the ramp, total {} s",
            self.devices, self.ramp_s, self.window_s.0, self.window_s.1, self.total_s
        );
        let _ = writeln!(
            t,
            "\n{:<28} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "count", "p50", "p95", "p99", "max"
        );
        for (name, sum) in [
            ("register (QUIC)", &self.latency.register),
            ("websocket connect", &self.latency.ws_connect),
            ("join -> first audio", &self.latency.join_to_first_audio),
            ("invite -> ringing", &self.latency.invite_to_ringing),
            ("answer -> first audio", &self.latency.answer_to_first_audio),
            (
                "re-register after restart",
                &self.latency.reregister_after_restart,
            ),
            ("audio end to end", &self.latency.audio_e2e),
            ("jitter per stream", &self.media.jitter),
        ] {
            if sum.count > 0 {
                let _ = writeln!(
                    t,
                    "{:<28} {:>8} {:>9} {:>9} {:>9} {:>9}",
                    name,
                    sum.count,
                    opt(sum.p50_ms),
                    opt(sum.p95_ms),
                    opt(sum.p99_ms),
                    opt(sum.max_ms)
                );
            }
        }
        let m = &self.media;
        let had_media = m.packets_sent + m.packets_received > 0;
        if had_media {
            let _ = writeln!(t, "\nmedia");
            let _ = writeln!(
                t,
                "  talker streams {}: {} of {} packets delivered, loss {}, worst stream {}, {} over 1 %",
                m.streams,
                m.delivered,
                m.expected,
                m.loss.map_or("n/a".into(), pct),
                pct(m.worst_stream_loss),
                m.streams_over_1pct
            );
            let _ = writeln!(
                t,
                "  packets sent {}, received {} (exact {}, re-encoded {}, by payload {}, unmatched {}, own {})",
                m.packets_sent,
                m.packets_received,
                m.matched_exact,
                m.matched_reencoded,
                m.matched_payload,
                m.unmatched,
                m.own_audio
            );
            if m.slot_rooms > 0 {
                let _ = writeln!(
                    t,
                    "  rooms on audio slots {} (loss not counted in {})",
                    m.slot_rooms, m.uncounted_rooms
                );
            }
            if self.calls.0 > 0 || self.calls.2 > 0 {
                let _ = writeln!(
                    t,
                    "  1:1 calls placed {}, answered {}, skipped {}",
                    self.calls.0, self.calls.1, self.calls.2
                );
            }
        }
        let r = &self.resources;
        let _ = writeln!(t, "\nresources over the window");
        let _ = writeln!(
            t,
            "  server CPU {} of a core{} ({}), RSS {} MB (peak {} MB)",
            r.server_cpu_pct
                .map_or("n/a".into(), |v| format!("{v:.1} %")),
            r.server_sys_pct
                .map_or(String::new(), |v| format!(", {v:.1} % in the kernel")),
            r.server_source.as_deref().unwrap_or("no source"),
            opt(r.server_rss_mb),
            opt(r.server_peak_rss_mb)
        );
        if had_media {
            let _ = writeln!(
                t,
                "  forwarded packets {} (devices received {}), server CPU {} µs per packet, {} continuous streams per core (forwarding now {} streams)",
                r.server_forwarded_packets
                    .map_or("n/a".into(), |v| v.to_string()),
                r.received_packets,
                opt(r.server_cpu_us_per_packet),
                r.streams_per_core
                    .map_or("n/a".into(), |v| format!("{v:.0}")),
                r.forwarded_streams
                    .map_or("n/a".into(), |v| format!("{v:.0}"))
            );
            let _ = writeln!(
                t,
                "  per forwarded packet: {} µs user + {} µs kernel, {} media socket calls, {} server context switches; media workers ({}) woke {} times a second, {} per packet",
                opt(r.server_user_us_per_packet),
                opt(r.server_sys_us_per_packet),
                opt(r.media_syscalls_per_packet),
                opt(r.server_switches_per_packet),
                r.media_workers.map_or("n/a".into(), |w| w.to_string()),
                opt(r.worker_wakeups_per_s),
                opt(r.worker_wakeups_per_packet)
            );
            if let Some(per_core) = r.talker_streams_per_core {
                let _ = writeln!(
                    t,
                    "  talker streams per server core: {per_core:.0} ({} streams at {} of a core)",
                    m.streams,
                    r.server_cpu_pct
                        .map_or("n/a".into(), |v| format!("{v:.1} %"))
                );
            }
        }
        if let (Some(kb), Some(us)) = (r.server_kb_per_device, r.server_us_per_device_second) {
            let _ = writeln!(
                t,
                "  per idle device: {kb} KB of server memory (baseline {} MB), {us} µs of server CPU per second (heartbeats)",
                opt(r.server_baseline_rss_mb)
            );
        }
        let _ = writeln!(
            t,
            "  tool CPU {} of a core on {} threads, send ticks late p99 {} ms, max {} ms",
            r.tool_cpu_pct.map_or("n/a".into(), |v| format!("{v:.1} %")),
            r.tool_threads,
            opt(r.tool_tick_late.p99_ms),
            opt(r.tool_tick_late.max_ms)
        );
        if !self.faults.is_empty() {
            let _ = writeln!(
                t,
                "\n{:<16} {:<44} {:>8} {:>10} {:>11}",
                "fault", "device", "at (s)", "told (s)", "converged"
            );
            for f in &self.faults {
                let _ = writeln!(
                    t,
                    "{:<16} {:<44} {:>8} {:>10} {:>11}",
                    f.kind.as_str(),
                    f.device,
                    f.at_s,
                    opt(f.detected_s),
                    f.converged_s.map_or("never".into(), |v| format!("{v} s"))
                );
            }
        }
        let l = &self.leak;
        let _ = writeln!(t);
        if self.target == "janus" {
            let _ = writeln!(
                t,
                "leak check: not applicable (Janus; the session and its rooms were destroyed)"
            );
        } else if !l.checked {
            let _ = writeln!(t, "leak check: not possible (the admin API did not answer)");
        } else if l.clean {
            let _ = writeln!(
                t,
                "leak check: clean {} s after the devices left",
                opt(l.clean_after_s)
            );
        } else {
            let _ = writeln!(
                t,
                "leak check: LEFT rooms {}, participants {}, tracks {}, forwarding entries {}, demux entries {}, live calls {}",
                l.rooms,
                l.participants,
                l.tracks,
                l.forwarding_entries,
                l.demux_entries,
                l.live_calls
            );
        }
        let _ = writeln!(
            t,
            "devices registered {} of {}, failures {}",
            self.registered, self.devices, self.failures
        );
        for sample in &self.failure_samples {
            let _ = writeln!(t, "  - {sample}");
        }
        if self.slo.thresholds != Slo::default() {
            if self.slo.passed {
                let _ = writeln!(t, "SLO: passed");
            } else {
                let _ = writeln!(t, "SLO: VIOLATED");
                for v in &self.slo.violations {
                    let _ = writeln!(t, "  - {v}");
                }
            }
        }
        t
    }
}

fn resources(i: &Inputs<'_>) -> Resources {
    let mut res = Resources {
        tool_tick_late: i.result.tick_late.summary(),
        tool_threads: i.threads,
        ..Resources::default()
    };
    res.server_peak_rss_mb = (i.peak_rss > 0).then(|| mb(i.peak_rss as f64));
    let (Some(a), Some(b)) = (&i.marks.start, &i.marks.end) else {
        return res;
    };
    let mut f = window_figures(a, b);
    if !i.restarts.is_empty() {
        // A new process: its CPU time and counters started again from zero.
        f = WindowFigures {
            span: f.span,
            received: f.received,
            tool_cpu_pct: f.tool_cpu_pct,
            source: Some("n/a: the server restarted"),
            ..WindowFigures::default()
        };
    }
    res.measured_s = f.span;
    res.server_source = f.source.map(str::to_owned);
    res.server_cpu_pct = f.server_cpu_pct;
    res.server_sys_pct = f.server_sys_pct;
    res.server_rss_mb = f.server_rss_mb;
    res.server_forwarded_packets = f.forwarded;
    res.received_packets = f.received;
    res.server_cpu_us_per_packet = f.cpu_us_per_packet;
    res.server_user_us_per_packet = f.user_us_per_packet;
    res.server_sys_us_per_packet = f.sys_us_per_packet;
    res.media_syscalls_per_packet = f.media_syscalls_per_packet;
    res.server_switches_per_packet = f.switches_per_packet;
    res.worker_wakeups_per_s = f.worker_wakeups_per_s;
    res.worker_wakeups_per_packet = f.worker_wakeups_per_packet;
    res.media_workers = f.media_workers;
    res.streams_per_core = f.streams_per_core;
    res.forwarded_streams = f.forwarded_streams;
    res.tool_cpu_pct = f.tool_cpu_pct;
    let base_rss = i.marks.baseline.as_ref().and_then(|m| {
        m.server
            .map(|s| s.rss_bytes as f64)
            .or(m.metrics.and_then(|x| x.rss_bytes))
    });
    res.server_baseline_rss_mb = base_rss.map(mb);
    let devices = i.result.register.count() as f64;
    if i.scenario.idle.devices > 0
        && i.scenario.rooms.count == 0
        && i.scenario.calls.per_sec <= 0.0
        && devices > 0.0
    {
        let end_rss = b
            .server
            .map(|s| s.rss_bytes as f64)
            .or(b.metrics.and_then(|x| x.rss_bytes));
        if let (Some(base), Some(end)) = (base_rss, end_rss) {
            res.server_kb_per_device = Some(round1((end - base) / 1e3 / devices));
        }
        res.server_us_per_device_second = f
            .server_cpu_pct
            .map(|pct| round3(pct / 100.0 * 1e6 / devices));
    }
    res
}

/// What two marks say about the window between them.
#[derive(Debug, Clone, Default)]
pub struct WindowFigures {
    /// Seconds between the marks.
    pub span: Option<f64>,
    /// `proc` or `metrics`.
    pub source: Option<&'static str>,
    /// Server CPU, % of a core.
    pub server_cpu_pct: Option<f64>,
    /// Of that, kernel.
    pub server_sys_pct: Option<f64>,
    /// Server RSS at the end, MB.
    pub server_rss_mb: Option<f64>,
    /// The server's forwarded-packet counter over the window.
    pub forwarded: Option<u64>,
    /// Packets the devices received over the window.
    pub received: u64,
    /// Server CPU per forwarded (or, without the counter, delivered) packet, µs.
    pub cpu_us_per_packet: Option<f64>,
    /// Of that, user space and kernel.
    pub user_us_per_packet: Option<f64>,
    pub sys_us_per_packet: Option<f64>,
    /// Media socket system calls per packet.
    pub media_syscalls_per_packet: Option<f64>,
    /// Context switches of every server thread per packet.
    pub switches_per_packet: Option<f64>,
    /// Media worker wake-ups per second and per packet, and the workers.
    pub worker_wakeups_per_s: Option<f64>,
    pub worker_wakeups_per_packet: Option<f64>,
    pub media_workers: Option<usize>,
    /// Continuous streams per core at that cost.
    pub streams_per_core: Option<f64>,
    /// Streams forwarded, as 50 pps equivalents.
    pub forwarded_streams: Option<f64>,
    /// Tool CPU, % of a core.
    pub tool_cpu_pct: Option<f64>,
}

/// Figures of the window between two marks.
pub fn window_figures(a: &Mark, b: &Mark) -> WindowFigures {
    let mut f = WindowFigures::default();
    let span = b.at.saturating_duration_since(a.at).as_secs_f64();
    if span <= 0.0 {
        return f;
    }
    f.span = Some(round3(span));
    if let (Some(x), Some(y)) = (a.server, b.server) {
        f.server_sys_pct = Some(round1(100.0 * (y.sys_secs - x.sys_secs) / span));
    }
    let (cpu, rss, source) = match (a.server, b.server) {
        (Some(x), Some(y)) => (
            Some(y.cpu_secs - x.cpu_secs),
            Some(y.rss_bytes as f64),
            Some("proc"),
        ),
        _ => match (
            a.metrics.and_then(|m| m.cpu_secs),
            b.metrics.and_then(|m| m.cpu_secs),
        ) {
            (Some(x), Some(y)) => (
                Some(y - x),
                b.metrics.and_then(|m| m.rss_bytes),
                Some("metrics"),
            ),
            _ => (None, None, None),
        },
    };
    f.source = source;
    f.server_cpu_pct = cpu.map(|c| round1(100.0 * c / span));
    f.server_rss_mb = rss.map(mb);
    f.forwarded = match (a.forwarded, b.forwarded) {
        (Some(x), Some(y)) => Some(y.saturating_sub(x)),
        _ => None,
    };
    f.received = b.received.saturating_sub(a.received);
    let packets = f.forwarded.unwrap_or(f.received);
    if let (Some(cpu), true) = (cpu, packets > 0) {
        let us = cpu * 1e6 / packets as f64;
        f.cpu_us_per_packet = Some(round3(us));
        f.streams_per_core = (us > 0.0).then(|| (1e6 / us / STREAM_PPS).round());
    }
    let per_packet = |count: f64| (packets > 0).then(|| round3(count / packets as f64));
    if let (Some(x), Some(y)) = (a.server, b.server) {
        let sys = y.sys_secs - x.sys_secs;
        let user = (y.cpu_secs - x.cpu_secs) - sys;
        f.user_us_per_packet = per_packet(user * 1e6);
        f.sys_us_per_packet = per_packet(sys * 1e6);
    }
    if let (Some(x), Some(y)) = (a.switches, b.switches) {
        f.switches_per_packet = per_packet(y.all.saturating_sub(x.all) as f64);
        if y.workers > 0 {
            let wakeups = y.worker_wakeups.saturating_sub(x.worker_wakeups) as f64;
            f.worker_wakeups_per_s = Some(round1(wakeups / span));
            f.worker_wakeups_per_packet = per_packet(wakeups);
            f.media_workers = Some(y.workers);
        }
    }
    if let (Some(x), Some(y)) = (
        a.metrics.and_then(|m| m.media_socket_calls),
        b.metrics.and_then(|m| m.media_socket_calls),
    ) {
        f.media_syscalls_per_packet = per_packet(y - x);
    }
    f.forwarded_streams = (packets > 0).then(|| round1(packets as f64 / span / STREAM_PPS));
    if let (Some(x), Some(y)) = (a.tool, b.tool) {
        f.tool_cpu_pct = Some(round1(100.0 * (y.cpu_secs - x.cpu_secs) / span));
    }
    f
}

/// Talker streams per server core.
pub fn talker_streams_per_core(streams: u64, cpu_pct: Option<f64>) -> Option<f64> {
    cpu_pct
        .filter(|c| *c > 0.0 && streams > 0)
        .map(|c| (streams as f64 / (c / 100.0)).round())
}

fn mb(bytes: f64) -> f64 {
    round1(bytes / 1e6)
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn round6(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

fn pct(v: f64) -> String {
    format!("{:.3} %", v * 100.0)
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), fmt_num)
}

fn fmt_num(v: f64) -> String {
    if v.is_infinite() {
        "never".into()
    } else if v == v.trunc() && v.abs() < 1e12 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
    }
}

/// The JSON report.
pub fn to_json(report: &Report) -> String {
    // Plain data with string keys: serialization cannot fail.
    serde_json::to_string_pretty(report).expect("report JSON")
}

/// Reads a JSON report back (for comparisons and tests).
pub fn from_json(text: &str) -> anyhow::Result<Report> {
    Ok(serde_json::from_str(text)?)
}

/// A value from the report by JSON pointer, for scripts.
pub fn pointer(report: &Report, path: &str) -> Option<Value> {
    serde_json::to_value(report).ok()?.pointer(path).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            target: "fleetcall".into(),
            version: "0".into(),
            command: String::new(),
            seed: 1,
            scenario: Scenario::default(),
            room_control: "quic".into(),
            bind_ip: "127.0.0.1".into(),
            ramp_s: 1.0,
            window_s: (2.0, 10.0),
            total_s: 12.0,
            devices: 10,
            registered: 10,
            failures: 0,
            failure_samples: Vec::new(),
            retries: 0,
            latency: Latencies::default(),
            media: Media {
                streams: 4,
                expected: 1000,
                delivered: 990,
                loss: Some(0.01),
                worst_stream_loss: 0.02,
                packets_sent: 1200,
                ..Media::default()
            },
            calls: (0, 0, 0),
            faults: Vec::new(),
            resources: Resources::default(),
            leak: Leak {
                checked: true,
                clean: true,
                ..Leak::default()
            },
            slo: Verdict::default(),
        }
    }

    #[test]
    fn slo_violations_name_the_figure_and_unmeasured_ones_fail() {
        let mut r = report();
        let mut slo = Slo::default();
        slo.apply("loss=1%,leaks=0,failures=0").unwrap();
        r.evaluate(&slo);
        assert!(r.slo.passed, "{:?}", r.slo.violations);
        slo.apply("stream_loss=1%,join_p99_ms=150").unwrap();
        r.evaluate(&slo);
        assert!(!r.slo.passed);
        assert_eq!(r.slo.violations.len(), 2, "{:?}", r.slo.violations);
        assert!(
            r.slo.violations[0].starts_with("stream_loss = 0.02 > 0.01"),
            "{:?}",
            r.slo.violations
        );
        assert!(r.slo.violations[1].contains("not measured"));
        r.leak = Leak {
            checked: true,
            clean: false,
            participants: 2,
            ..Leak::default()
        };
        let mut leaks = Slo::default();
        leaks.apply("leaks=0").unwrap();
        r.evaluate(&leaks);
        assert_eq!(r.slo.violations, vec!["leaks = 2 > 0".to_owned()]);
        r.faults.push(FaultOutcome {
            kind: FaultKind::Kill,
            device: "x".into(),
            at_s: 1.0,
            detected_s: None,
            converged_s: None,
        });
        let mut conv = Slo::default();
        conv.apply("converge_max_s=20").unwrap();
        r.evaluate(&conv);
        assert_eq!(
            r.slo.violations,
            vec!["converge_max_s = never > 20".to_owned()]
        );
    }

    #[test]
    fn json_round_trips_and_the_table_names_the_essentials() {
        let r = report();
        let back = from_json(&to_json(&r)).unwrap();
        assert_eq!(back.media.delivered, 990);
        assert_eq!(pointer(&r, "/media/loss"), Some(serde_json::json!(0.01)));
        let table = r.table();
        assert!(
            table.contains("loss 1.000 %") && table.contains("leak check: clean"),
            "{table}"
        );
    }
}
