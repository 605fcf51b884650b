//! What to run: rooms, 1:1 call storms, idle devices, churn, faults and SLO
//! thresholds, from flags or a TOML file (flags win), checked before
//! anything starts so an impossible scenario is a clear error, not a hang.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::audio::TalkPattern;

/// Most members of a group call on the QUIC control plane (joined + invited).
pub const QUIC_GROUP_MAX: usize = 32;

/// Which signaling path the room devices use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ControlPath {
    /// QUIC when the room fits a group call, WebSocket otherwise.
    Auto,
    /// The device control plane: group calls over QUIC with the client SDK.
    Quic,
    /// The device protocol over WebSocket (`/ws/device`, an access token
    /// per device): the room is a named room joined with `RoomJoin`, up to
    /// the server's `--max-room-size` members.
    Ws,
}

/// Noise suppression for the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Suppression {
    /// Leave the server's policy alone.
    Server,
    /// Every publisher's audio is denoised (set through `PUT /api/policy`).
    On,
    /// No publisher's audio is denoised.
    Off,
}

/// Rooms of devices (group calls).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rooms {
    /// How many rooms.
    pub count: usize,
    /// Devices per room.
    pub per_room: usize,
    /// Talkers per room; the others are silent (DTX).
    pub talkers: usize,
    /// Leaves per second over the whole run (a random listener leaves and
    /// rejoins `rejoin_after_secs` later).
    pub churn_per_sec: f64,
    /// Seconds a churned device stays away.
    pub rejoin_after_secs: f64,
}

impl Default for Rooms {
    fn default() -> Self {
        Rooms {
            count: 0,
            per_room: 5,
            talkers: 1,
            churn_per_sec: 0.0,
            rejoin_after_secs: 1.0,
        }
    }
}

/// A 1:1 call storm: invite, ring, answer, talk, hang up, at a rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Calls {
    /// New calls per second.
    pub per_sec: f64,
    /// Seconds a call lasts once answered.
    pub duration_secs: f64,
    /// Seconds the callee rings before it answers.
    pub answer_after_secs: f64,
}

impl Default for Calls {
    fn default() -> Self {
        Calls {
            per_sec: 0.0,
            duration_secs: 5.0,
            answer_after_secs: 0.2,
        }
    }
}

/// Registered devices that only keep their session alive.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Idle {
    /// How many.
    pub devices: usize,
}

/// A fault injected during the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Devices vanish: no goodbye on the control plane, media stops.
    Kill,
    /// Devices stop reading and writing their control stream (the transport
    /// stays up).
    Stall,
    /// Devices drop every media datagram both ways for a while.
    MediaDrop,
    /// The server is stopped and started again (needs `--spawn`).
    ServerRestart,
}

impl FaultKind {
    /// Its name in flags and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Stall => "stall",
            FaultKind::MediaDrop => "media-drop",
            FaultKind::ServerRestart => "server-restart",
        }
    }
}

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// What.
    pub kind: FaultKind,
    /// Devices it strikes (ignored for a server restart).
    #[serde(default = "one")]
    pub count: usize,
    /// Seconds after the ramp.
    pub at_secs: f64,
    /// How long it lasts (stall, media drop).
    #[serde(default)]
    pub duration_secs: f64,
}

fn one() -> usize {
    1
}

impl std::str::FromStr for Fault {
    type Err = anyhow::Error;

    /// `KIND[:COUNT]@AT[+DURATION]`, e.g. `kill:3@10s`, `media-drop:2@5s+3s`,
    /// `server-restart@20s`.
    fn from_str(s: &str) -> anyhow::Result<Fault> {
        let (head, timing) = s
            .split_once('@')
            .with_context(|| format!("fault {s:?}: expected KIND[:COUNT]@AT[+DURATION]"))?;
        let (kind, count) = match head.split_once(':') {
            Some((kind, count)) => (
                kind,
                count
                    .parse()
                    .with_context(|| format!("fault {s:?}: bad count {count:?}"))?,
            ),
            None => (head, 1),
        };
        let kind = match kind {
            "kill" => FaultKind::Kill,
            "stall" => FaultKind::Stall,
            "media-drop" | "media_drop" => FaultKind::MediaDrop,
            "server-restart" | "server_restart" | "restart" => FaultKind::ServerRestart,
            other => bail!(
                "fault {s:?}: unknown kind {other:?} (kill, stall, media-drop, server-restart)"
            ),
        };
        let (at, duration) = match timing.split_once('+') {
            Some((at, duration)) => (parse_secs(at)?, parse_secs(duration)?),
            None => (parse_secs(timing)?, 0.0),
        };
        Ok(Fault {
            kind,
            count,
            at_secs: at,
            duration_secs: duration,
        })
    }
}

/// Thresholds that fail the run (exit code 3) when violated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Slo {
    /// Largest overall loss of talker streams (fraction, 0.01 = 1 %).
    pub loss: Option<f64>,
    /// Largest loss of any one stream.
    pub stream_loss: Option<f64>,
    /// p99 end-to-end audio latency, ms.
    pub latency_p99_ms: Option<f64>,
    /// p99 join-to-first-audio, ms.
    pub join_p99_ms: Option<f64>,
    /// p99 registration, ms.
    pub register_p99_ms: Option<f64>,
    /// p99 invite-to-ringing, ms.
    pub ringing_p99_ms: Option<f64>,
    /// p99 answer-to-first-audio, ms.
    pub answer_p99_ms: Option<f64>,
    /// Slowest convergence after a fault, s.
    pub converge_max_s: Option<f64>,
    /// State left on the server after the run (rooms + participants +
    /// forwarding entries + live calls); 0 to require a clean server.
    pub leaks: Option<u64>,
    /// Devices that failed to join, register or connect media.
    pub failures: Option<u64>,
    /// Average server CPU over the window, % of one core.
    pub server_cpu_pct: Option<f64>,
}

impl Slo {
    /// Applies `key=value[,key=value...]`; `loss=1%` and `loss=0.01` mean the same.
    pub fn apply(&mut self, spec: &str) -> anyhow::Result<()> {
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .with_context(|| format!("SLO {item:?}: expected KEY=VALUE"))?;
            let number = |v: &str| -> anyhow::Result<f64> {
                let (v, scale) = match v.strip_suffix('%') {
                    Some(v) => (v, 0.01),
                    None => (v, 1.0),
                };
                let n: f64 = v
                    .trim()
                    .parse()
                    .with_context(|| format!("SLO {item:?}: {v:?} is not a number"))?;
                if !n.is_finite() || n < 0.0 {
                    bail!("SLO {item:?}: must be a non-negative number");
                }
                Ok(n * scale)
            };
            let v = number(value)?;
            match key.trim() {
                "loss" => self.loss = Some(v),
                "stream_loss" => self.stream_loss = Some(v),
                "latency_p99_ms" => self.latency_p99_ms = Some(v),
                "join_p99_ms" => self.join_p99_ms = Some(v),
                "register_p99_ms" => self.register_p99_ms = Some(v),
                "ringing_p99_ms" => self.ringing_p99_ms = Some(v),
                "answer_p99_ms" => self.answer_p99_ms = Some(v),
                "converge_max_s" => self.converge_max_s = Some(v),
                "leaks" => self.leaks = Some(v as u64),
                "failures" => self.failures = Some(v as u64),
                "server_cpu_pct" => self.server_cpu_pct = Some(v),
                other => bail!(
                    "SLO {item:?}: unknown key {other:?} (loss, stream_loss, latency_p99_ms, join_p99_ms, register_p99_ms, \
                     ringing_p99_ms, answer_p99_ms, converge_max_s, leaks, failures, server_cpu_pct)"
                ),
            }
        }
        Ok(())
    }
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// Seconds of load after the ramp.
    pub duration_secs: f64,
    /// Device starts per second.
    pub ramp_per_sec: f64,
    /// Seconds after the ramp before loss is counted.
    pub settle_secs: f64,
    /// Signaling of room devices.
    pub control: ControlPath,
    /// Noise suppression.
    pub suppression: Suppression,
    /// Microphone WAV (48 kHz mono 16-bit); the generated speech clip if unset.
    pub wav: Option<PathBuf>,
    /// Room noise under the generated clip.
    pub noise: bool,
    /// Talkers' talk/silence pattern.
    pub talk: TalkPattern,
    /// Opus DTX for the talkers' speech (silent devices always use it):
    /// without it talkers send every 20 ms, pauses included.
    pub dtx: bool,
    /// Worker threads of the tool (0: one per core).
    pub threads: usize,
    /// Seed of every random choice; random if unset (printed either way).
    pub seed: Option<u64>,
    /// Rooms.
    pub rooms: Rooms,
    /// 1:1 calls.
    pub calls: Calls,
    /// Idle devices.
    pub idle: Idle,
    /// Faults.
    pub faults: Vec<Fault>,
    /// Thresholds.
    pub slo: Slo,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            duration_secs: 30.0,
            ramp_per_sec: 50.0,
            settle_secs: 2.0,
            control: ControlPath::Auto,
            suppression: Suppression::Server,
            wav: None,
            noise: false,
            talk: TalkPattern::CONTINUOUS,
            dtx: true,
            threads: 0,
            seed: None,
            rooms: Rooms::default(),
            calls: Calls::default(),
            idle: Idle::default(),
            faults: Vec::new(),
            slo: Slo::default(),
        }
    }
}

impl Scenario {
    /// Reads a TOML scenario file.
    pub fn from_toml(text: &str) -> anyhow::Result<Scenario> {
        toml::from_str(text).context("parsing the scenario")
    }

    /// The signaling path rooms use.
    pub fn room_control(&self) -> ControlPath {
        match self.control {
            ControlPath::Auto if self.rooms.per_room <= QUIC_GROUP_MAX => ControlPath::Quic,
            ControlPath::Auto => ControlPath::Ws,
            other => other,
        }
    }

    /// Devices the 1:1 storm needs: enough pairs for the calls that overlap.
    pub fn call_pairs(&self) -> usize {
        if self.calls.per_sec <= 0.0 {
            return 0;
        }
        let busy =
            self.calls.per_sec * (self.calls.duration_secs + self.calls.answer_after_secs + 3.0);
        (busy * 1.5).ceil() as usize + 1
    }

    /// Every simulated device.
    pub fn devices(&self) -> usize {
        self.rooms.count * self.rooms.per_room + 2 * self.call_pairs() + self.idle.devices
    }

    /// Seconds the ramp takes.
    pub fn ramp_secs(&self) -> f64 {
        self.devices() as f64 / self.ramp_per_sec
    }

    /// Refuses scenarios that cannot run.
    pub fn validate(&self, target: TargetKind) -> anyhow::Result<()> {
        let r = &self.rooms;
        if r.count == 0 && self.calls.per_sec <= 0.0 && self.idle.devices == 0 {
            bail!("nothing to run: give --rooms, --calls-per-sec or --idle");
        }
        for (what, v) in [
            ("--duration", self.duration_secs),
            ("--ramp", self.ramp_per_sec),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{what} must be a positive number, got {v}");
            }
        }
        if !(self.settle_secs.is_finite() && self.settle_secs >= 0.0)
            || self.settle_secs >= self.duration_secs
        {
            bail!(
                "--settle ({} s) must be shorter than --duration ({} s)",
                self.settle_secs,
                self.duration_secs
            );
        }
        if !(self.talk.on_secs >= 0.0
            && self.talk.off_secs >= 0.0
            && self.talk.on_secs + self.talk.off_secs > 0.0)
        {
            bail!("--talk needs non-negative seconds, not both zero");
        }
        if r.count > 0 {
            if r.per_room < 2 {
                bail!(
                    "a room needs at least 2 devices, got --per-room {}",
                    r.per_room
                );
            }
            if r.talkers > r.per_room {
                bail!(
                    "--talkers {} is more than the {} devices of a room",
                    r.talkers,
                    r.per_room
                );
            }
            if self.control == ControlPath::Quic && r.per_room > QUIC_GROUP_MAX {
                bail!(
                    "a QUIC group call holds at most {QUIC_GROUP_MAX} members, got --per-room {}; use --control ws",
                    r.per_room
                );
            }
            if r.per_room > 900 {
                bail!("at most 900 devices per room");
            }
        }
        if !(r.churn_per_sec.is_finite()
            && r.churn_per_sec >= 0.0
            && r.rejoin_after_secs.is_finite()
            && r.rejoin_after_secs >= 0.0)
        {
            bail!("--churn and --rejoin-after must be non-negative");
        }
        if r.churn_per_sec > 0.0 && (r.count == 0 || r.per_room <= r.talkers) {
            bail!("--churn needs rooms with listeners (devices that are not talkers)");
        }
        let c = &self.calls;
        if !(c.per_sec.is_finite()
            && c.per_sec >= 0.0
            && c.duration_secs.is_finite()
            && c.duration_secs > 0.0)
        {
            bail!("--calls-per-sec must be non-negative and --call-secs positive");
        }
        if !(c.answer_after_secs.is_finite() && c.answer_after_secs >= 0.0) {
            bail!("--answer-after must be non-negative");
        }
        for fault in &self.faults {
            if !(fault.at_secs.is_finite()
                && fault.at_secs >= 0.0
                && fault.duration_secs.is_finite()
                && fault.duration_secs >= 0.0)
            {
                bail!("fault {}: times must be non-negative", fault.kind.as_str());
            }
            if fault.at_secs + fault.duration_secs >= self.duration_secs {
                bail!(
                    "fault {} at {} s (+{} s) does not end before --duration {} s",
                    fault.kind.as_str(),
                    fault.at_secs,
                    fault.duration_secs,
                    self.duration_secs
                );
            }
            match fault.kind {
                FaultKind::ServerRestart if target != TargetKind::Spawned => {
                    bail!("a server-restart fault needs a server the tool starts (--spawn)")
                }
                FaultKind::ServerRestart => {}
                kind => {
                    if r.count == 0 {
                        bail!(
                            "fault {}: strikes room devices; give --rooms",
                            kind.as_str()
                        );
                    }
                    if fault.count == 0 || fault.count > r.count * r.per_room {
                        bail!(
                            "fault {}: {} devices asked, the rooms hold {}",
                            kind.as_str(),
                            fault.count,
                            r.count * r.per_room
                        );
                    }
                    if matches!(kind, FaultKind::Stall | FaultKind::MediaDrop)
                        && fault.duration_secs <= 0.0
                    {
                        bail!(
                            "fault {} needs a duration: {}:N@AT+DURATION",
                            kind.as_str(),
                            kind.as_str()
                        );
                    }
                }
            }
        }
        if target == TargetKind::Janus {
            if self.calls.per_sec > 0.0
                || self.idle.devices > 0
                || !self.faults.is_empty()
                || r.churn_per_sec > 0.0
            {
                bail!(
                    "against Janus only the audio-room scenario runs (no calls, idle devices, churn or faults)"
                );
            }
            if self.suppression == Suppression::On {
                bail!("Janus has no noise suppression");
            }
        }
        Ok(())
    }
}

/// What the tool runs against, as far as validation cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A fleetcall server that was already running.
    Running,
    /// A fleetcall server the tool started.
    Spawned,
    /// Janus' VideoRoom.
    Janus,
}

/// `30`, `30s`, `1.5s`, `500ms`, `2m`.
pub fn parse_secs(s: &str) -> anyhow::Result<f64> {
    let s = s.trim();
    let (number, scale) = if let Some(v) = s.strip_suffix("ms") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = number
        .trim()
        .parse()
        .with_context(|| format!("{s:?} is not a duration (e.g. 30s, 500ms, 2m)"))?;
    if !v.is_finite() || v < 0.0 {
        bail!("{s:?}: a duration must be a non-negative number");
    }
    Ok(v * scale)
}

/// `50`, `50/s`.
pub fn parse_rate(s: &str) -> anyhow::Result<f64> {
    let number = s.trim().strip_suffix("/s").unwrap_or(s.trim());
    let v: f64 = number
        .parse()
        .with_context(|| format!("{s:?} is not a rate (e.g. 50/s)"))?;
    if !v.is_finite() || v <= 0.0 {
        bail!("{s:?}: a rate must be positive");
    }
    Ok(v)
}

/// `ON,OFF` seconds of a talk pattern, e.g. `4,2`; `continuous`.
pub fn parse_talk(s: &str) -> anyhow::Result<TalkPattern> {
    if s == "continuous" {
        return Ok(TalkPattern::CONTINUOUS);
    }
    let (on, off) = s.split_once(',').with_context(|| {
        format!("--talk {s:?}: expected ON,OFF seconds (e.g. 4,2) or continuous")
    })?;
    Ok(TalkPattern {
        on_secs: parse_secs(on)?,
        off_secs: parse_secs(off)?,
    })
}

/// When a run's phases begin and end.
#[derive(Debug, Clone, Copy)]
pub struct Timeline {
    /// Device starts begin.
    pub t0: Instant,
    /// The last device has started; the load time counts from here.
    pub ramp_end: Instant,
    /// Figures count in this window; it ends with the load.
    pub window: (Instant, Instant),
}

impl Timeline {
    /// The scenario's timeline, starting shortly after now.
    pub fn starting_now(scenario: &Scenario) -> Timeline {
        let t0 = Instant::now() + Duration::from_millis(200);
        let ramp_end = t0 + Duration::from_secs_f64(scenario.ramp_secs());
        let settled = ramp_end + Duration::from_secs_f64(scenario.settle_secs);
        Timeline {
            t0,
            ramp_end,
            window: (
                settled,
                ramp_end + Duration::from_secs_f64(scenario.duration_secs),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rooms(count: usize, per_room: usize, talkers: usize) -> Scenario {
        Scenario {
            rooms: Rooms {
                count,
                per_room,
                talkers,
                ..Rooms::default()
            },
            ..Scenario::default()
        }
    }

    #[test]
    fn parses_durations_rates_faults_and_slos() {
        assert_eq!(parse_secs("30").unwrap(), 30.0);
        assert_eq!(parse_secs("1.5s").unwrap(), 1.5);
        assert_eq!(parse_secs("500ms").unwrap(), 0.5);
        assert_eq!(parse_secs("2m").unwrap(), 120.0);
        assert!(parse_secs("soon").is_err() && parse_secs("-1").is_err());
        assert_eq!(parse_rate("50/s").unwrap(), 50.0);
        assert!(parse_rate("0").is_err());
        let f: Fault = "media-drop:2@5s+3s".parse().unwrap();
        assert_eq!(
            f,
            Fault {
                kind: FaultKind::MediaDrop,
                count: 2,
                at_secs: 5.0,
                duration_secs: 3.0
            }
        );
        let f: Fault = "server-restart@20".parse().unwrap();
        assert_eq!((f.kind, f.count), (FaultKind::ServerRestart, 1));
        assert!(
            "explode:1@2"
                .parse::<Fault>()
                .unwrap_err()
                .to_string()
                .contains("unknown kind")
        );
        assert!("kill:1".parse::<Fault>().is_err());
        let mut slo = Slo::default();
        slo.apply("loss=1%, latency_p99_ms=50,leaks=0").unwrap();
        assert_eq!(
            (slo.loss, slo.latency_p99_ms, slo.leaks),
            (Some(0.01), Some(50.0), Some(0))
        );
        assert!(
            slo.apply("speed=3")
                .unwrap_err()
                .to_string()
                .contains("unknown key")
        );
        assert!(slo.apply("loss=lots").is_err());
        assert_eq!(
            parse_talk("4,2").unwrap(),
            TalkPattern {
                on_secs: 4.0,
                off_secs: 2.0
            }
        );
        assert!(parse_talk("4").is_err());
    }

    #[test]
    fn toml_scenarios_refuse_typos() {
        let s = Scenario::from_toml(
            "duration_secs = 10\n[rooms]\ncount = 3\nper_room = 20\ntalkers = 3\n[[faults]]\nkind = \"kill\"\ncount = 2\nat_secs = 3\n[slo]\nloss = 0.01\n",
        )
        .unwrap();
        assert_eq!(
            (s.rooms.count, s.rooms.per_room, s.faults.len(), s.slo.loss),
            (3, 20, 1, Some(0.01))
        );
        s.validate(TargetKind::Running).unwrap();
        assert!(
            format!(
                "{:#}",
                Scenario::from_toml("[rooms]\ncuont = 3\n").unwrap_err()
            )
            .contains("cuont")
        );
    }

    #[test]
    fn the_shipped_scenario_parses_and_runs_against_fleetcall() {
        let s = Scenario::from_toml(include_str!("../scenarios/fleet.toml")).unwrap();
        assert_eq!(
            (
                s.rooms.count,
                s.calls.per_sec,
                s.idle.devices,
                s.faults.len()
            ),
            (40, 2.0, 500, 3)
        );
        assert_eq!(s.faults[1].kind, FaultKind::MediaDrop);
        assert_eq!(s.slo.leaks, Some(0));
        s.validate(TargetKind::Running).unwrap();
    }

    #[test]
    fn impossible_scenarios_are_refused_with_the_reason() {
        let err = |s: Scenario, target| s.validate(target).unwrap_err().to_string();
        assert!(err(Scenario::default(), TargetKind::Running).contains("nothing to run"));
        assert!(err(rooms(2, 1, 1), TargetKind::Running).contains("at least 2"));
        assert!(err(rooms(2, 3, 4), TargetKind::Running).contains("more than"));
        let mut big = rooms(1, 50, 3);
        assert_eq!(big.room_control(), ControlPath::Ws);
        big.control = ControlPath::Quic;
        assert!(err(big, TargetKind::Running).contains("at most 32"));
        let mut restart = rooms(1, 2, 1);
        restart.faults.push("server-restart@5".parse().unwrap());
        assert!(err(restart.clone(), TargetKind::Running).contains("--spawn"));
        restart.validate(TargetKind::Spawned).unwrap();
        let mut late = rooms(1, 2, 1);
        late.faults.push("kill@40".parse().unwrap());
        assert!(err(late, TargetKind::Running).contains("before --duration"));
        let mut many = rooms(1, 2, 1);
        many.faults.push("kill:5@1".parse().unwrap());
        assert!(err(many, TargetKind::Running).contains("5 devices"));
        let mut janus = rooms(1, 5, 1);
        janus.calls.per_sec = 1.0;
        assert!(err(janus, TargetKind::Janus).contains("Janus"));
        let mut settle = rooms(1, 2, 1);
        settle.settle_secs = 40.0;
        assert!(err(settle, TargetKind::Running).contains("--settle"));
    }

    #[test]
    fn device_counts() {
        let mut s = rooms(10, 5, 1);
        s.idle.devices = 7;
        s.calls.per_sec = 1.0;
        s.calls.duration_secs = 2.0;
        assert_eq!(s.call_pairs(), 9);
        assert_eq!(s.devices(), 50 + 18 + 7);
    }
}
