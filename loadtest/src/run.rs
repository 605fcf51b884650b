//! The orchestrator: plans the ramp, starts the groups, injects churn and
//! faults on schedule, samples the server and the tool, stops everything,
//! checks that the server let go of everything, and builds the report.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetcall_peer::DtlsIdentity;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::{mpsc, watch};

use crate::audio::{Clip, default_speech, read_wav};
use crate::context::{Ctx, speech_variants};
use crate::control::{Enroller, Registrar, TokenIssuer};
use crate::outcome::{GroupResult, Live};
use crate::progress::Progress;
use crate::report::{self, Leak, Mark, Report};
use crate::room::{self, RoomCommand, RoomPlan};
use crate::scenario::{ControlPath, FaultKind, Scenario, Suppression, Timeline};
use crate::server::{Server, proc_sample};
use crate::{calls, idle};

/// How the run reaches the world.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Local IP for every socket (media and QUIC); `None`: the one that routes to the server.
    pub bind_ip: Option<IpAddr>,
    /// Show the progress bar.
    pub progress: bool,
    /// Longest wait for the server to let go of everything after the run.
    pub leak_wait: Duration,
    /// Reconnect with the SDK's fleet backoff instead of a quick one.
    pub fleet_backoff: bool,
    /// The command line, for the report.
    pub command: String,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            bind_ip: None,
            progress: false,
            leak_wait: Duration::from_secs(30),
            fleet_backoff: false,
            command: String::new(),
        }
    }
}

/// Runs the scenario against a fleetcall server.
pub async fn run(
    scenario: &Scenario,
    server: &mut Server,
    options: &RunOptions,
) -> anyhow::Result<Report> {
    let seed = scenario.seed.unwrap_or_else(rand::random);
    eprintln!("fleetcall-loadtest: seed {seed} (rerun with --seed {seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let bind_ip = match options.bind_ip {
        Some(ip) => ip,
        None => fleetcall_peer::route_to(server.quic)
            .context("finding the local interface that reaches the server (set --bind-ip)")?,
    };

    // Audio: one speech variant per talker of a room (calls: two).
    let samples = match &scenario.wav {
        Some(path) => read_wav(path)?,
        None => default_speech(scenario.noise),
    };
    let variants = scenario
        .rooms
        .talkers
        .max(if scenario.calls.per_sec > 0.0 { 2 } else { 1 });
    let dtx = scenario.dtx;
    let speech =
        tokio::task::spawn_blocking(move || speech_variants(&samples, variants, dtx)).await??;
    let silence = Arc::new(Clip::silence()?);
    let needs_quic = scenario.idle.devices > 0
        || scenario.calls.per_sec > 0.0
        || (scenario.rooms.count > 0 && scenario.room_control() == ControlPath::Quic);
    let enroller = if needs_quic {
        Some(Enroller::open(&server.data_dir)?)
    } else {
        None
    };
    let tokens = if scenario.rooms.count > 0 && scenario.room_control() == ControlPath::Ws {
        Some(TokenIssuer::open(&server.data_dir)?)
    } else {
        None
    };

    let previous_policy = match scenario.suppression {
        Suppression::Server => None,
        Suppression::On => Some(
            server
                .set_suppression(true)
                .await
                .context("turning suppression on")?,
        ),
        Suppression::Off => Some(
            server
                .set_suppression(false)
                .await
                .context("turning suppression off")?,
        ),
    };

    // The server before any device.
    let baseline = Mark::take(server, &Live::default()).await;

    let Timeline {
        t0,
        ramp_end,
        window,
    } = Timeline::starting_now(scenario);
    let (duration, end) = (window.1 - ramp_end, window.1);
    let live = Arc::new(Live::default());
    let ctx = Arc::new(Ctx {
        identity: DtlsIdentity::generate()?,
        speech,
        silence,
        talk: scenario.talk,
        control: Registrar {
            quic: server.quic,
            ws_url: server.ws_url(),
            enroller,
            tokens,
            bind_ip,
            fleet_backoff: options.fleet_backoff,
        },
        bind_ip,
        live: live.clone(),
        window,
        ramp_end,
        prefix: "lt".into(),
    });
    let slot = |k: usize| t0 + Duration::from_secs_f64(k as f64 / scenario.ramp_per_sec);
    let mut next_slot = 0;

    // Rooms.
    let control = scenario.room_control();
    let mut room_tasks = Vec::new();
    let mut room_commands = Vec::new();
    for index in 0..scenario.rooms.count {
        let starts: Vec<Instant> = (0..scenario.rooms.per_room)
            .map(|_| {
                next_slot += 1;
                slot(next_slot - 1)
            })
            .collect();
        let plan = RoomPlan {
            index,
            per_room: scenario.rooms.per_room,
            talkers: scenario.rooms.talkers,
            control,
            starts,
            seed: rng.random(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        room_commands.push(tx);
        room_tasks.push(tokio::spawn(room::run(ctx.clone(), plan, rx)));
    }

    // Call pairs: each calls every `interval`, staggered so the storm runs at the rate.
    let (stop_tx, stop_rx) = watch::channel(false);
    let pairs = scenario.call_pairs();
    let mut pair_tasks = Vec::new();
    if pairs > 0 {
        let interval = Duration::from_secs_f64(pairs as f64 / scenario.calls.per_sec);
        for index in 0..pairs {
            let starts = [slot(next_slot), slot(next_slot + 1)];
            next_slot += 2;
            let plan = calls::PairPlan {
                index,
                starts,
                first_call: ramp_end
                    + Duration::from_secs_f64(index as f64 / scenario.calls.per_sec),
                interval,
                until: ramp_end
                    + duration.saturating_sub(Duration::from_secs_f64(
                        scenario.calls.duration_secs + scenario.calls.answer_after_secs + 1.0,
                    )),
                answer_after: Duration::from_secs_f64(scenario.calls.answer_after_secs),
                talk: Duration::from_secs_f64(scenario.calls.duration_secs),
                seed: rng.random(),
            };
            pair_tasks.push(tokio::spawn(calls::run(ctx.clone(), plan, stop_rx.clone())));
        }
    }

    // Idle devices, in chunks of 200 per task.
    let mut idle_tasks = Vec::new();
    let mut first = 0;
    while first < scenario.idle.devices {
        let n = (scenario.idle.devices - first).min(200);
        let starts: Vec<Instant> = (0..n).map(|k| slot(next_slot + k)).collect();
        next_slot += n;
        idle_tasks.push(tokio::spawn(idle::run(
            ctx.clone(),
            first,
            starts,
            stop_rx.clone(),
        )));
        first += n;
    }

    // Churn and fault schedule, relative to the end of the ramp.
    let mut events: Vec<(Instant, Event)> = Vec::new();
    if scenario.rooms.churn_per_sec > 0.0 {
        let every = Duration::from_secs_f64(1.0 / scenario.rooms.churn_per_sec);
        let mut at = window.0;
        let last = window
            .1
            .checked_sub(Duration::from_secs_f64(
                scenario.rooms.rejoin_after_secs + 1.0,
            ))
            .unwrap_or(window.0);
        while at < last {
            events.push((at, Event::Churn));
            at += every;
        }
    }
    for fault in &scenario.faults {
        events.push((
            ramp_end + Duration::from_secs_f64(fault.at_secs),
            Event::Fault(*fault),
        ));
    }
    events.sort_by_key(|(at, _)| *at);

    let mut progress = Progress::new(options.progress, t0, ramp_end, end, scenario.devices());
    let mut marks = report::Marks {
        baseline: Some(baseline),
        ..report::Marks::default()
    };
    let mut sampler = tokio::time::interval(Duration::from_millis(500));
    let mut events = events.into_iter().peekable();
    let mut restarts = Vec::new();
    let mut peak_rss = 0u64;
    let mut last_stats_at = Instant::now() - Duration::from_secs(10);
    let mut forwarded_now = None;
    let mut marked_start = false;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if !marked_start && now >= window.0 {
            marked_start = true;
            marks.start = Some(Mark::take(server, &live).await);
        }
        let next_event = events.peek().map(|(at, _)| *at);
        let wake = [Some(end), next_event, (!marked_start).then_some(window.0)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(end);
        tokio::select! {
            _ = sampler.tick() => {
                let server_sample = server.pid.and_then(proc_sample);
                if let Some(s) = server_sample {
                    peak_rss = peak_rss.max(s.rss_bytes);
                }
                if now.duration_since(last_stats_at) >= Duration::from_secs(2) {
                    last_stats_at = now;
                    forwarded_now = server.stats().await.ok().and_then(|s| s["rtp_forwarded"].as_u64());
                }
                progress.update(now, &live, server_sample, proc_sample(std::process::id()), forwarded_now);
            }
            () = tokio::time::sleep_until(wake.into()) => {
                while let Some((at, _)) = events.peek() {
                    if *at > Instant::now() {
                        break;
                    }
                    let Some((_, event)) = events.next() else { break };
                    match event {
                        Event::Churn => {
                            let i = rng.random_range(0..room_commands.len());
                            let _ = room_commands[i].send(RoomCommand::Churn { rejoin_after: Duration::from_secs_f64(scenario.rooms.rejoin_after_secs) });
                        }
                        Event::Fault(fault) if fault.kind == FaultKind::ServerRestart => {
                            let at_s = crate::outcome::secs(ramp_end, Instant::now());
                            progress.note(&format!("restarting the server at {at_s} s"));
                            let began = Instant::now();
                            server.restart().await.context("restarting the server")?;
                            let ready = Instant::now();
                            *live.restarted_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(ready);
                            restarts.push((at_s, began, ready));
                            for tx in &room_commands {
                                let _ = tx.send(RoomCommand::ServerRestarted { at_s, ready });
                            }
                        }
                        Event::Fault(fault) => {
                            let at_s = crate::outcome::secs(ramp_end, Instant::now());
                            // Different rooms where possible.
                            let mut rooms: Vec<usize> = (0..room_commands.len()).collect();
                            for k in 0..fault.count {
                                if rooms.is_empty() {
                                    rooms = (0..room_commands.len()).collect();
                                }
                                let pick = rng.random_range(0..rooms.len());
                                let i = rooms.swap_remove(pick);
                                let _ = room_commands[i].send(RoomCommand::Fault {
                                    kind: fault.kind,
                                    duration: Duration::from_secs_f64(fault.duration_secs),
                                    at_s,
                                });
                                let _ = k;
                            }
                        }
                    }
                }
            }
        }
    }
    marks.end = Some(Mark::take(server, &live).await);
    progress.phase("leaving");

    // Stop: rooms drain and leave; pairs hang up; idle devices close.
    for tx in &room_commands {
        let _ = tx.send(RoomCommand::Stop);
    }
    let _ = stop_tx.send(true);
    let mut result = GroupResult::default();
    for task in room_tasks.into_iter().chain(pair_tasks).chain(idle_tasks) {
        match task.await {
            Ok(r) => result.merge(r),
            Err(e) => result
                .failures
                .push(&live, format!("a group task failed: {e}")),
        }
    }
    let finished = Instant::now();

    // Restore the policy we changed.
    if let Some(before) = previous_policy {
        let _ = server.set_suppression(before).await;
    }

    progress.phase("leak check");
    let leak = Leak::check(server, options.leak_wait).await;
    progress.finish();
    let reregister = live
        .reregister
        .lock()
        .map(|h| h.clone())
        .unwrap_or_default();
    let restart_faults = restarts
        .iter()
        .map(|(at_s, began, ready)| (*at_s, crate::outcome::secs(*began, *ready)))
        .collect();
    Ok(Report::build(report::Inputs {
        scenario,
        seed,
        command: &options.command,
        control,
        bind_ip,
        server,
        t0,
        ramp_end,
        window,
        finished,
        result,
        marks,
        peak_rss,
        leak,
        reregister,
        restarts: restart_faults,
        threads: tokio::runtime::Handle::current().metrics().num_workers(),
    }))
}

#[derive(Debug, Clone, Copy)]
enum Event {
    Churn,
    Fault(crate::scenario::Fault),
}
