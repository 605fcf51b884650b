//! Janus' VideoRoom as a peer-comparison target: the same audio rooms,
//! devices and measurements as against fleetcall, over Janus' HTTP API
//! (long-poll events), one publisher and one subscriber PeerConnection per
//! device (Janus' multistream subscriber: one PeerConnection for every
//! other publisher of the room). Start Janus with `loadtest/bench/janus.sh`.
//!
//! Janus rewrites sequence numbers and timestamps per subscriber, so
//! received frames are matched by their Opus payload (talkers' speech is
//! unique per room); the comfort noise of silent devices counts as
//! received packets but is not matched.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use fleetcall_peer::{DtlsIdentity, FRAME, FRAME_TICKS, Mode, Output, Peer, PeerConfig, PeerEvent, Sent};

use crate::audio::{Clip, Mic, default_speech, read_wav};
use crate::context::{Ctx, speech_variants};
use crate::control::Registrar;
use crate::http;
use crate::ledger::{Ledger, Match, Member};
use crate::outcome::{GroupResult, Live, secs};
use crate::sockets::{MAX_DATAGRAM, Sockets};
use crate::progress::Progress;
use crate::report::{Latencies, Leak, Mark, Marks, Media, Report, Resources, Verdict};
use crate::run::RunOptions;
use crate::scenario::{Scenario, Timeline};
use crate::server::proc_sample;

const RX_SETTLE: Duration = Duration::from_secs(1);
/// Janus answers a long poll after 30 s without events.
const POLL_TIMEOUT: Duration = Duration::from_secs(40);

/// Runs the audio-room scenario against Janus' VideoRoom at `url`
/// (`http://host:8088/janus`); `pid`: Janus' process, for its CPU.
pub async fn run(
    scenario: &Scenario,
    url: &str,
    pid: Option<u32>,
    options: &RunOptions,
) -> anyhow::Result<Report> {
    let url = url.trim_end_matches('/').to_owned();
    let info = http::request(
        "GET",
        &format!("{url}/info"),
        None,
        None,
        Duration::from_secs(3),
    )
    .await
    .with_context(|| {
        format!("Janus is not reachable at {url} (start it with loadtest/bench/janus.sh)")
    })?;
    let info: Value =
        serde_json::from_str(&info.body).with_context(|| format!("{url}/info is not Janus"))?;
    if info["plugins"].get("janus.plugin.videoroom").is_none() {
        bail!("{url}: Janus has no VideoRoom plugin loaded");
    }
    if let Some(pid) = pid {
        proc_sample(pid).with_context(|| format!("no process {pid} to read Janus' CPU from"))?;
    }
    let seed = scenario.seed.unwrap_or_else(rand::random);
    eprintln!(
        "fleetcall-loadtest: seed {seed} (rerun with --seed {seed}), target Janus {} at {url}",
        info["version_string"].as_str().unwrap_or("?")
    );
    let host: SocketAddr = {
        let rest = url
            .strip_prefix("http://")
            .context("Janus URL must be http://")?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        tokio::net::lookup_host(hostport)
            .await?
            .next()
            .with_context(|| format!("resolving {hostport}"))?
    };
    let bind_ip: IpAddr = match options.bind_ip {
        Some(ip) => ip,
        None => fleetcall_peer::route_to(host)?,
    };
    if bind_ip.is_loopback() {
        bail!(
            "Janus 1.1.2 gathers no loopback candidates: run it in a namespace (loadtest/bench/janus.sh) and bind a non-loopback IP"
        );
    }

    let samples = match &scenario.wav {
        Some(path) => read_wav(path)?,
        None => default_speech(scenario.noise),
    };
    let (variants, dtx) = (scenario.rooms.talkers.max(1), scenario.dtx);
    let speech =
        tokio::task::spawn_blocking(move || speech_variants(&samples, variants, dtx)).await??;
    let Timeline {
        t0,
        ramp_end,
        window,
    } = Timeline::starting_now(scenario);
    let live = Arc::new(Live::default());
    let ctx = Arc::new(Ctx {
        identity: DtlsIdentity::generate()?,
        speech,
        silence: Arc::new(Clip::silence()?),
        talk: scenario.talk,
        // Janus' devices are WebRTC peers only: nothing registers.
        control: Registrar { quic: host, ws_url: String::new(), enroller: None, tokens: None, bind_ip, fleet_backoff: false },
        bind_ip,
        live: live.clone(),
        window,
        ramp_end,
        prefix: "lt".into(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut slot = 0usize;
    let base_room: u64 = 700_000 + u64::from(rand::random::<u16>()) * 1000;
    for index in 0..scenario.rooms.count {
        let starts: Vec<Instant> = (0..scenario.rooms.per_room)
            .map(|_| {
                slot += 1;
                t0 + Duration::from_secs_f64((slot - 1) as f64 / scenario.ramp_per_sec)
            })
            .collect();
        let plan = Plan {
            room: base_room + index as u64,
            index,
            talkers: scenario.rooms.talkers,
            starts,
        };
        tasks.push(tokio::spawn(run_room(
            ctx.clone(),
            plan,
            url.clone(),
            stop_rx.clone(),
        )));
    }

    let end = window.1;
    let mut progress = Progress::new(options.progress, t0, ramp_end, end, scenario.devices());
    let mut marks = Marks::default();
    let mut sampler = tokio::time::interval(Duration::from_millis(500));
    let mut peak_rss = 0;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if marks.start.is_none() && now >= window.0 {
            marks.start = Some(Mark::take_process(pid, &live));
        }
        let wake = if marks.start.is_none() {
            window.0.min(end)
        } else {
            end
        };
        tokio::select! {
            _ = sampler.tick() => {
                let sample = pid.and_then(proc_sample);
                if let Some(s) = sample {
                    peak_rss = peak_rss.max(s.rss_bytes);
                }
                progress.update(now, &live, sample, proc_sample(std::process::id()), None);
            }
            () = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    marks.end = Some(Mark::take_process(pid, &live));
    progress.phase("leaving");
    let _ = stop_tx.send(true);
    let mut result = GroupResult::default();
    for task in tasks {
        match task.await {
            Ok(r) => result.merge(r),
            Err(e) => result
                .failures
                .push(&live, format!("a room task failed: {e}")),
        }
    }
    let finished = Instant::now();
    progress.finish();
    Ok(report(
        scenario, seed, options, bind_ip, t0, ramp_end, window, finished, result, marks, peak_rss,
    ))
}

#[allow(clippy::too_many_arguments)]
fn report(
    scenario: &Scenario,
    seed: u64,
    options: &RunOptions,
    bind_ip: IpAddr,
    t0: Instant,
    ramp_end: Instant,
    window: (Instant, Instant),
    finished: Instant,
    result: GroupResult,
    marks: Marks,
    peak_rss: u64,
) -> Report {
    let m = &result.media;
    let mut resources = Resources {
        tool_tick_late: result.tick_late.summary(),
        tool_threads: tokio::runtime::Handle::current().metrics().num_workers(),
        ..Resources::default()
    };
    resources.server_peak_rss_mb = (peak_rss > 0).then(|| (peak_rss as f64 / 1e5).round() / 10.0);
    if let (Some(a), Some(b)) = (&marks.start, &marks.end) {
        let figures = crate::report::window_figures(a, b);
        resources.measured_s = figures.span;
        resources.server_cpu_pct = figures.server_cpu_pct;
        resources.server_sys_pct = figures.server_sys_pct;
        resources.server_rss_mb = figures.server_rss_mb;
        resources.server_source = figures.server_cpu_pct.map(|_| "proc".to_owned());
        resources.received_packets = figures.received;
        resources.server_cpu_us_per_packet = figures.cpu_us_per_packet;
        resources.server_user_us_per_packet = figures.user_us_per_packet;
        resources.server_sys_us_per_packet = figures.sys_us_per_packet;
        resources.server_switches_per_packet = figures.switches_per_packet;
        resources.streams_per_core = figures.streams_per_core;
        resources.forwarded_streams = figures.forwarded_streams;
        resources.tool_cpu_pct = figures.tool_cpu_pct;
    }
    resources.talker_streams_per_core =
        crate::report::talker_streams_per_core(m.streams, resources.server_cpu_pct);
    let mut report = Report {
        target: "janus".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        command: options.command.clone(),
        seed,
        scenario: scenario.clone(),
        room_control: "janus-http".into(),
        bind_ip: bind_ip.to_string(),
        ramp_s: secs(t0, ramp_end),
        window_s: (secs(ramp_end, window.0), secs(ramp_end, window.1)),
        total_s: secs(t0, finished),
        devices: scenario.rooms.count * scenario.rooms.per_room,
        registered: result.ws_connect.count(),
        failures: result.failures.count,
        failure_samples: result.failures.samples.clone(),
        retries: result.retries,
        latency: Latencies {
            audio_e2e: m.latency.summary(),
            join_to_first_audio: result.join_to_audio.summary(),
            ..Latencies::default()
        },
        media: Media::of(&result),
        calls: (0, 0, 0),
        faults: Vec::new(),
        resources,
        leak: Leak::default(),
        slo: Verdict::default(),
    };
    report.evaluate(&scenario.slo);
    report
}

/// Janus and fleetcall side by side, as ratios (Janus / fleetcall).
pub fn compare(janus: &Report, fleetcall: &Report) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "\nside by side, same scenario, one run (Janus first)");
    let _ = writeln!(
        t,
        "{:<44} {:>14} {:>14} {:>12}",
        "", "janus", "fleetcall", "janus/fc"
    );
    let row = |t: &mut String, name: &str, a: Option<f64>, b: Option<f64>, digits: usize| {
        let f = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.digits$}"));
        let ratio = match (a, b) {
            (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
            _ => "n/a".into(),
        };
        let _ = writeln!(t, "{name:<44} {:>14} {:>14} {:>12}", f(a), f(b), ratio);
    };
    let (j, f) = (&janus.resources, &fleetcall.resources);
    row(
        &mut t,
        "server CPU, % of one core",
        j.server_cpu_pct,
        f.server_cpu_pct,
        1,
    );
    row(
        &mut t,
        "packets delivered to the devices (window)",
        Some(j.received_packets as f64),
        Some(f.received_packets as f64),
        0,
    );
    let per = |r: &Resources| match (r.server_cpu_pct, r.measured_s) {
        (Some(cpu), Some(span)) if r.received_packets > 0 => {
            Some(cpu / 100.0 * span * 1e6 / r.received_packets as f64)
        }
        _ => None,
    };
    let (pj, pf) = (per(j), per(f));
    row(&mut t, "server CPU per delivered packet, µs", pj, pf, 2);
    let spc = |us: Option<f64>| us.filter(|v| *v > 0.0).map(|us| 1e6 / us / 50.0);
    row(
        &mut t,
        "continuous streams per core (50 pps)",
        spc(pj),
        spc(pf),
        0,
    );
    row(
        &mut t,
        "talker-stream loss, %",
        janus.media.loss.map(|l| l * 100.0),
        fleetcall.media.loss.map(|l| l * 100.0),
        3,
    );
    row(
        &mut t,
        "worst stream loss, %",
        Some(janus.media.worst_stream_loss * 100.0),
        Some(fleetcall.media.worst_stream_loss * 100.0),
        3,
    );
    row(
        &mut t,
        "audio end to end p50, ms",
        janus.latency.audio_e2e.p50_ms,
        fleetcall.latency.audio_e2e.p50_ms,
        2,
    );
    row(
        &mut t,
        "audio end to end p99, ms",
        janus.latency.audio_e2e.p99_ms,
        fleetcall.latency.audio_e2e.p99_ms,
        2,
    );
    row(
        &mut t,
        "server RSS, MB",
        j.server_rss_mb,
        f.server_rss_mb,
        1,
    );
    row(
        &mut t,
        "tool CPU, % of one core",
        j.tool_cpu_pct,
        f.tool_cpu_pct,
        1,
    );
    let _ = writeln!(
        t,
        "(per delivered packet: packets the devices received in the window, from either server; the ratio > 1 means Janus costs more)"
    );
    t
}

#[derive(Debug, Clone)]
struct Plan {
    room: u64,
    index: usize,
    talkers: usize,
    starts: Vec<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Role {
    Pub,
    Sub,
}

#[derive(Debug)]
enum JCtl {
    Attached(Member, Role, Result<u64, String>),
    Events(Vec<Value>),
    Failed(Member, String),
}

#[derive(Debug)]
struct JDev {
    id: String,
    talker: bool,
    mic: Mic,
    started: bool,
    pub_handle: Option<u64>,
    sub_handle: Option<u64>,
    /// Its publisher and subscriber peers, with their deadlines; their
    /// sockets are in the room's [`Sockets`], keyed `(member, role)`.
    pub_peer: Option<(Peer, Option<Instant>)>,
    sub_peer: Option<(Peer, Option<Instant>)>,
    feed: Option<u64>,
    /// Janus reported the publisher's PeerConnection up.
    pub_up: bool,
    sending: bool,
    subscribed_at: Option<Instant>,
    heard: bool,
}

struct JRoom {
    ctx: Arc<Ctx>,
    plan: Plan,
    url: String,
    session: u64,
    devs: Vec<JDev>,
    handles: HashMap<u64, (Member, Role)>,
    ledger: Ledger,
    result: GroupResult,
    tx: mpsc::UnboundedSender<JCtl>,
    subscribing: bool,
    sockets: Sockets<(Member, Role)>,
}

async fn post(url: &str, body: Value) -> anyhow::Result<Value> {
    let response = http::request(
        "POST",
        url,
        None,
        Some(&body.to_string()),
        Duration::from_secs(10),
    )
    .await?;
    let value: Value = serde_json::from_str(&response.body)
        .with_context(|| format!("{url}: not JSON: {}", response.body))?;
    if value["janus"] == "error" {
        bail!("{url}: {}", value["error"]);
    }
    if let Some(error) = value["plugindata"]["data"].get("error") {
        bail!("{url}: {error}");
    }
    Ok(value)
}

fn transaction() -> String {
    format!("{:016x}", rand::random::<u64>())
}

async fn run_room(
    ctx: Arc<Ctx>,
    plan: Plan,
    url: String,
    mut stop: watch::Receiver<bool>,
) -> GroupResult {
    let mut result = GroupResult::default();
    let session = match setup_room(&url, plan.room, plan.starts.len()).await {
        Ok(session) => session,
        Err(e) => {
            result
                .failures
                .push(&ctx.live, format!("janus room {}: {e:#}", plan.index));
            return result;
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    // The session's events: one long poll at a time.
    let poll_url = format!("{url}/{session}?maxev=100");
    let poll_tx = tx.clone();
    let poller = tokio::spawn(async move {
        loop {
            match http::request("GET", &poll_url, None, None, POLL_TIMEOUT).await {
                Ok(response) => {
                    let events = match serde_json::from_str::<Value>(&response.body) {
                        Ok(Value::Array(events)) => events,
                        Ok(single) => vec![single],
                        Err(_) => Vec::new(),
                    };
                    if poll_tx.send(JCtl::Events(events)).is_err() {
                        return;
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    });
    let devs = (0..plan.starts.len())
        .map(|m| {
            let talker = m < plan.talkers;
            JDev {
                id: format!("{}-j{}-{m}", ctx.prefix, plan.index),
                talker,
                mic: Mic::new(
                    ctx.speech_variant(m.min(plan.talkers.saturating_sub(1))),
                    ctx.silence.clone(),
                    talker,
                    ctx.talk,
                    m * 37,
                ),
                started: false,
                pub_handle: None,
                sub_handle: None,
                pub_peer: None,
                sub_peer: None,
                feed: None,
                pub_up: false,
                sending: false,
                subscribed_at: None,
                heard: false,
            }
        })
        .collect();
    let mut room = JRoom {
        ledger: Ledger::new(plan.starts.len(), ctx.window),
        ctx,
        plan,
        url,
        session,
        devs,
        handles: HashMap::new(),
        result,
        tx,
        subscribing: false,
        sockets: Sockets::default(),
    };
    let mut tick = tokio::time::interval_at(room.plan.starts[0].into(), FRAME);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut keepalive = tokio::time::interval(Duration::from_secs(20));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let deadline = room.deadline();
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(ctl) = rx.recv() => room.on_ctl(now(), ctl),
            scheduled = tick.tick() => room.on_tick(now(), scheduled.into_std()),
            _ = keepalive.tick() => {
                let url = format!("{}/{}", room.url, room.session);
                tokio::spawn(async move { let _ = post(&url, json!({"janus": "keepalive", "transaction": transaction()})).await; });
            }
            key = room.sockets.readable() => room.on_readable(now(), key, &mut buf),
            () = tokio::time::sleep_until(deadline.into()) => room.on_timeout(now()),
        }
    }
    poller.abort();
    // Destroying the session hangs up every handle.
    let _ = post(
        &format!("{}/{}", room.url, room.session),
        json!({"janus": "destroy", "transaction": transaction()}),
    )
    .await;
    room.finish()
}

/// Creates a session and the room; returns the session.
async fn setup_room(url: &str, room: u64, publishers: usize) -> anyhow::Result<u64> {
    let created = post(
        url,
        json!({"janus": "create", "transaction": transaction()}),
    )
    .await?;
    let session = created["data"]["id"].as_u64().context("no session id")?;
    let attached = post(&format!("{url}/{session}"), json!({"janus": "attach", "plugin": "janus.plugin.videoroom", "transaction": transaction()})).await?;
    let handle = attached["data"]["id"].as_u64().context("no handle id")?;
    post(
        &format!("{url}/{session}/{handle}"),
        json!({"janus": "message", "transaction": transaction(), "body": {
            "request": "create", "room": room, "publishers": publishers, "audiocodec": "opus",
            "audiolevel_ext": true, "permanent": false
        }}),
    )
    .await
    .context("creating the room")?;
    Ok(session)
}

/// Time from tokio's clock, so paused-time tests work.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl JRoom {
    /// The earliest of a device's start and a peer's timer (a second at
    /// most: the loop also wakes for the stop).
    fn deadline(&self) -> Instant {
        let mut at = now() + Duration::from_secs(1);
        for (m, d) in self.devs.iter().enumerate() {
            if !d.started {
                at = at.min(self.plan.starts[m]);
            }
            for (_, deadline) in [&d.pub_peer, &d.sub_peer].into_iter().flatten() {
                if let Some(t) = deadline {
                    at = at.min(*t);
                }
            }
        }
        at
    }

    fn handle_url(&self, handle: u64) -> String {
        format!("{}/{}/{handle}", self.url, self.session)
    }

    fn attach(&self, m: Member, role: Role) {
        let url = format!("{}/{}", self.url, self.session);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = post(&url, json!({"janus": "attach", "plugin": "janus.plugin.videoroom", "transaction": transaction()}))
                .await
                .and_then(|v| v["data"]["id"].as_u64().context("no handle id"))
                .map_err(|e| format!("{e:#}"));
            let _ = tx.send(JCtl::Attached(m, role, result));
        });
    }

    /// Sends a plugin message (with an SDP), then says trickle is complete.
    fn message(&self, m: Member, handle: u64, body: Value, jsep: Option<Value>) {
        let url = self.handle_url(handle);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut request =
                json!({"janus": "message", "transaction": transaction(), "body": body});
            if let Some(jsep) = jsep {
                request["jsep"] = jsep;
            }
            if let Err(e) = post(&url, request).await {
                let _ = tx.send(JCtl::Failed(m, format!("{e:#}")));
                return;
            }
            let _ = post(&url, json!({"janus": "trickle", "transaction": transaction(), "candidate": {"completed": true}})).await;
        });
    }

    fn on_timeout(&mut self, now: Instant) {
        for m in 0..self.devs.len() {
            if !self.devs[m].started && now >= self.plan.starts[m] {
                self.devs[m].started = true;
                self.attach(m, Role::Pub);
            }
            for role in [Role::Pub, Role::Sub] {
                if let Some((peer, deadline)) = self.peer_mut(m, role)
                    && deadline.is_some_and(|t| t <= now)
                {
                    peer.handle_timeout(now);
                    self.drain_peer(now, (m, role));
                }
            }
        }
    }

    fn fail(&mut self, m: Member, reason: String) {
        let reason = format!("{}: {reason}", self.devs[m].id);
        self.result.failures.push(&self.ctx.live, reason);
    }

    fn peer_mut(&mut self, m: Member, role: Role) -> Option<&mut (Peer, Option<Instant>)> {
        let d = &mut self.devs[m];
        match role {
            Role::Pub => d.pub_peer.as_mut(),
            Role::Sub => d.sub_peer.as_mut(),
        }
    }

    /// Binds a socket for `m`'s peer in `role` and creates the peer on it.
    fn new_peer(&mut self, now: Instant, m: Member, role: Role) -> anyhow::Result<Peer> {
        let local = self
            .sockets
            .open((m, role), self.ctx.bind_ip)
            .with_context(|| format!("binding a media socket on {}", self.ctx.bind_ip))?;
        let first_timestamp = (rand::random::<u32>() / FRAME_TICKS) * FRAME_TICKS + m as u32;
        let config = PeerConfig { mode: Mode::Rtp, first_timestamp, first_seq: rand::random(), ..PeerConfig::default() };
        Ok(Peer::new(now, local, &self.ctx.identity, config)?)
    }

    fn on_ctl(&mut self, now: Instant, ctl: JCtl) {
        match ctl {
            JCtl::Attached(m, role, Err(e)) => self.fail(m, format!("attach ({role:?}): {e}")),
            JCtl::Attached(m, Role::Pub, Ok(handle)) => {
                self.handles.insert(handle, (m, Role::Pub));
                self.devs[m].pub_handle = Some(handle);
                let offer = self.new_peer(now, m, Role::Pub).and_then(|mut peer| {
                    let offer = peer.create_offer(now)?;
                    self.devs[m].pub_peer = Some((peer, None));
                    Ok(offer)
                });
                self.drain_peer(now, (m, Role::Pub));
                match offer {
                    Ok(sdp) => {
                        let body = json!({"request": "joinandconfigure", "ptype": "publisher", "room": self.plan.room,
                                          "display": self.devs[m].id, "audio": true, "video": false});
                        self.message(m, handle, body, Some(json!({"type": "offer", "sdp": sdp})));
                    }
                    Err(e) => self.fail(m, format!("publisher offer: {e:#}")),
                }
            }
            JCtl::Attached(m, Role::Sub, Ok(handle)) => {
                self.handles.insert(handle, (m, Role::Sub));
                self.devs[m].sub_handle = Some(handle);
                let streams: Vec<Value> = (0..self.devs.len())
                    .filter(|&o| o != m)
                    .filter_map(|o| self.devs[o].feed)
                    .map(|f| json!({"feed": f}))
                    .collect();
                self.devs[m].subscribed_at = Some(now);
                self.message(m, handle, json!({"request": "join", "ptype": "subscriber", "room": self.plan.room, "streams": streams}), None);
            }
            JCtl::Failed(m, e) => self.fail(m, e),
            JCtl::Events(events) => {
                for event in events {
                    self.on_event(&event, now);
                }
            }
        }
    }

    fn on_event(&mut self, event: &Value, now: Instant) {
        let Some(&(m, role)) = event["sender"].as_u64().and_then(|h| self.handles.get(&h)) else {
            return;
        };
        if event["janus"] == "webrtcup" && role == Role::Pub {
            // Janus takes a feed for subscriptions once its PeerConnection is up.
            self.devs[m].pub_up = true;
            self.maybe_subscribe();
            return;
        }
        let data = &event["plugindata"]["data"];
        let jsep = &event["jsep"];
        match (role, data["videoroom"].as_str()) {
            (Role::Pub, Some("joined")) => {
                self.devs[m].feed = data["id"].as_u64();
                if let (Some(sdp), Some((peer, _))) = (jsep["sdp"].as_str(), &mut self.devs[m].pub_peer) {
                    let result = peer.accept_answer(now, sdp);
                    self.drain_peer(now, (m, Role::Pub));
                    if let Err(e) = result {
                        self.fail(m, format!("publisher answer: {e:#}"));
                    }
                }
                Live::add(&self.ctx.live.registered, 1);
                self.result.ws_connect.record(Duration::ZERO);
                self.maybe_subscribe();
            }
            (Role::Sub, Some("attached" | "updated")) => {
                let Some(sdp) = jsep["sdp"].as_str() else {
                    return;
                };
                let answer = self.new_peer(now, m, Role::Sub).and_then(|mut peer| {
                    let answer = peer.accept_offer(now, sdp)?;
                    self.devs[m].sub_peer = Some((peer, None));
                    Ok(answer)
                });
                self.drain_peer(now, (m, Role::Sub));
                match (answer, self.devs[m].sub_handle) {
                    (Ok(answer), Some(handle)) => {
                        self.message(
                            m,
                            handle,
                            json!({"request": "start"}),
                            Some(json!({"type": "answer", "sdp": answer})),
                        );
                    }
                    (Err(e), _) => self.fail(m, format!("subscriber answer: {e:#}")),
                    _ => {}
                }
            }
            (_, Some("event")) if data.get("error").is_some() => {
                self.fail(m, format!("janus: {}", data["error"]))
            }
            _ => {}
        }
    }

    /// Everyone published: everyone subscribes to everyone else, in one
    /// PeerConnection each.
    fn maybe_subscribe(&mut self) {
        if !self.subscribing && self.devs.iter().all(|d| d.feed.is_some() && d.pub_up) {
            self.subscribing = true;
            for o in 0..self.devs.len() {
                self.attach(o, Role::Sub);
            }
        }
    }

    /// A peer's socket has datagrams: all of them to the peer.
    fn on_readable(&mut self, now: Instant, key: (Member, Role), buf: &mut [u8]) {
        while let Some((n, source)) = self.sockets.try_recv(key, buf) {
            if let Some((peer, _)) = self.peer_mut(key.0, key.1) {
                peer.handle_datagram(now, source, &buf[..n]);
            }
        }
        self.drain_peer(now, key);
    }

    /// Carries out what a peer asked for: datagrams out, its events, its
    /// next deadline.
    fn drain_peer(&mut self, now: Instant, (m, role): (Member, Role)) {
        loop {
            let Some((peer, deadline)) = self.peer_mut(m, role) else { return };
            match peer.poll_output() {
                Output::Transmit(datagram) => self.sockets.send((m, role), &datagram),
                Output::Event(event) => self.on_peer_event(now, m, role, event),
                Output::Timeout(at) => {
                    *deadline = at;
                    return;
                }
            }
        }
    }

    fn on_peer_event(&mut self, now: Instant, m: Member, role: Role, event: PeerEvent) {
        match (role, event) {
            (Role::Pub, PeerEvent::Connected) => self.devs[m].sending = true,
            (Role::Pub, PeerEvent::Disconnected) => self.devs[m].sending = false,
            (Role::Pub, PeerEvent::Failed(reason)) => self.fail(m, format!("publisher media failed: {reason}")),
            (Role::Sub, PeerEvent::Packet(packet)) => {
                Live::add(&self.ctx.live.received, 1);
                let found = self.ledger.on_received(now, m, packet.timestamp, &packet.payload);
                let sent = match found {
                    Match::Exact(s) | Match::Payload(s) | Match::Reencoded(s) => s,
                    Match::Own | Match::Unknown => return,
                };
                if sent.speaker && !self.devs[m].heard {
                    self.devs[m].heard = true;
                    if let Some(at) = self.devs[m].subscribed_at {
                        self.result.join_to_audio.record(now.saturating_duration_since(at));
                    }
                    self.ledger.start_counting(m, now + RX_SETTLE);
                }
            }
            (Role::Sub, PeerEvent::Failed(reason)) => self.fail(m, format!("subscriber media failed: {reason}")),
            _ => {}
        }
    }

    fn on_tick(&mut self, now: Instant, scheduled: Instant) {
        self.result.tick_late.record(now.saturating_duration_since(scheduled));
        for m in 0..self.devs.len() {
            let d = &mut self.devs[m];
            let Some((peer, _)) = &mut d.pub_peer else {
                continue;
            };
            if !d.sending {
                continue;
            }
            let frame = d.mic.next_frame();
            match peer.send_audio(now, &frame.audio()) {
                Sent::Written { timestamp } => {
                    let payload = frame.payload.as_deref().unwrap_or_default();
                    self.ledger.on_sent(now, m, timestamp, payload, d.talker && frame.voice, d.talker);
                    Live::add(&self.ctx.live.sent, 1);
                }
                Sent::Dtx => {}
                Sent::NotConnected => self.result.unsent += 1,
            }
            self.drain_peer(now, (m, Role::Pub));
        }
    }

    fn finish(mut self) -> GroupResult {
        let totals = self.ledger.totals(|_, _| true);
        self.result.add_media(totals);
        self.result.send_errors += self.sockets.send_errors();
        self.result
    }
}
