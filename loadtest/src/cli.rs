//! The command line: flags (over an optional TOML scenario), the target,
//! the run, the output and the exit code.
//!
//! Exit codes: 0 the run completed and every SLO held; 1 the run could not
//! be done (server unreachable, bad files, ...); 2 bad usage (flags,
//! impossible scenario); 3 an SLO was violated.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::report::{self, Report};
use crate::run::{RunOptions, run};
use crate::scenario::{
    ControlPath, Fault, Scenario, Suppression, TargetKind, parse_rate, parse_secs, parse_talk,
};
use crate::server::Server;

/// Exit code: the run completed and every SLO held.
pub const EXIT_OK: i32 = 0;
/// Exit code: the run could not be done.
pub const EXIT_ERROR: i32 = 1;
/// Exit code: bad usage.
pub const EXIT_USAGE: i32 = 2;
/// Exit code: an SLO was violated.
pub const EXIT_SLO: i32 = 3;

/// Drives realistic fleet load through fleetcall's real protocols (QUIC
/// control plane or WebSocket, WebRTC media with Opus audio) and reports
/// what held: latencies, loss, jitter, convergence after faults, server
/// CPU and memory, and whether the server let go of everything.
#[derive(Debug, Parser)]
#[command(name = "fleetcall-loadtest", version, after_help = AFTER_HELP)]
pub struct Args {
    /// Start this fleetcall binary on free loopback ports with a fresh data
    /// dir (the tool then knows its pid and can restart it).
    #[arg(long, value_name = "FLEETCALL_BIN", help_heading = "Target")]
    pub spawn: Option<PathBuf>,
    /// Extra flag for the spawned server (repeat: --server-arg=--workers --server-arg=1).
    #[arg(
        long = "server-arg",
        value_name = "ARG",
        allow_hyphen_values = true,
        help_heading = "Target"
    )]
    pub server_args: Vec<String>,
    /// Run the spawned server on these CPUs only (a taskset list, e.g. 0).
    #[arg(long, value_name = "LIST", requires = "spawn", help_heading = "Target")]
    pub server_cpus: Option<String>,
    /// HTTP address of a running server (admin API, /metrics, /ws/device).
    #[arg(long, default_value = "http://127.0.0.1:8080", help_heading = "Target")]
    pub http: String,
    /// QUIC control-plane address of a running server.
    #[arg(long, default_value = "127.0.0.1:4433", help_heading = "Target")]
    pub quic: SocketAddr,
    /// The server's data dir (its CA enrolls the devices; admin token).
    #[arg(long, help_heading = "Target")]
    pub data_dir: Option<PathBuf>,
    /// Admin API token (default: <data-dir>/admin-token).
    #[arg(long, help_heading = "Target")]
    pub admin_token: Option<String>,
    /// The server's pid: CPU and memory from /proc (else from /metrics).
    #[arg(long, help_heading = "Target")]
    pub server_pid: Option<u32>,
    /// Local IP of the devices' sockets (default: the one routing to the server).
    #[arg(long, help_heading = "Target")]
    pub bind_ip: Option<IpAddr>,
    /// Janus HTTP API (e.g. http://10.200.0.2:8088/janus): run the rooms against its VideoRoom.
    #[arg(long, value_name = "URL", help_heading = "Janus")]
    pub janus: Option<String>,
    /// Janus' pid, for its CPU and memory.
    #[arg(long, help_heading = "Janus")]
    pub janus_pid: Option<u32>,
    /// With --janus and a fleetcall target: run the same rooms against Janus,
    /// then fleetcall, and print both side by side with ratios.
    #[arg(long, help_heading = "Janus")]
    pub compare: bool,

    /// Scenario file (TOML); flags override it.
    #[arg(long, value_name = "FILE", help_heading = "Scenario")]
    pub scenario: Option<PathBuf>,
    /// Rooms (group calls).
    #[arg(long, help_heading = "Scenario")]
    pub rooms: Option<usize>,
    /// Devices per room.
    #[arg(long, help_heading = "Scenario")]
    pub per_room: Option<usize>,
    /// Talkers per room; the others are silent (DTX).
    #[arg(long, help_heading = "Scenario")]
    pub talkers: Option<usize>,
    /// Load time after the ramp (30s, 2m).
    #[arg(long, value_parser = parse_secs, help_heading = "Scenario")]
    pub duration: Option<f64>,
    /// Device starts per second (50/s).
    #[arg(long, value_parser = parse_rate, help_heading = "Scenario")]
    pub ramp: Option<f64>,
    /// Time after the ramp before loss counts.
    #[arg(long, value_parser = parse_secs, help_heading = "Scenario")]
    pub settle: Option<f64>,
    /// Room signaling: quic (group calls, <= 32 devices), ws (named rooms on /ws/device), auto.
    #[arg(long, help_heading = "Scenario")]
    pub control: Option<ControlPath>,
    /// Noise suppression for every publisher during the run: on, off, server (leave it).
    #[arg(long, help_heading = "Scenario")]
    pub suppression: Option<Suppression>,
    /// Microphone: 48 kHz mono 16-bit WAV (default: generated speech).
    #[arg(long, help_heading = "Scenario")]
    pub wav: Option<PathBuf>,
    /// Room noise under the generated speech.
    #[arg(long, help_heading = "Scenario")]
    pub noise: bool,
    /// Talkers talk ON seconds, pause OFF seconds (4,2), or continuous.
    #[arg(long, value_parser = parse_talk, value_name = "ON,OFF", help_heading = "Scenario")]
    pub talk: Option<crate::audio::TalkPattern>,
    /// Opus DTX for the talkers' speech: on (pauses are silent) or off.
    #[arg(long, value_name = "on|off", help_heading = "Scenario")]
    pub dtx: Option<OnOff>,
    /// Leaves per second (a listener leaves and rejoins).
    #[arg(long, value_parser = parse_rate, help_heading = "Scenario")]
    pub churn: Option<f64>,
    /// How long a churned device stays away.
    #[arg(long, value_parser = parse_secs, help_heading = "Scenario")]
    pub rejoin_after: Option<f64>,
    /// New 1:1 calls per second (invite, ring, answer, talk, hang up).
    #[arg(long, value_parser = parse_rate, help_heading = "Scenario")]
    pub calls_per_sec: Option<f64>,
    /// How long an answered 1:1 call lasts.
    #[arg(long, value_parser = parse_secs, help_heading = "Scenario")]
    pub call_secs: Option<f64>,
    /// How long the callee rings before answering.
    #[arg(long, value_parser = parse_secs, help_heading = "Scenario")]
    pub answer_after: Option<f64>,
    /// Registered idle devices (QUIC).
    #[arg(long, help_heading = "Scenario")]
    pub idle: Option<usize>,
    /// A fault: KIND[:COUNT]@AT[+DURATION], kinds kill, stall, media-drop,
    /// server-restart (repeatable; AT counts from the end of the ramp).
    #[arg(long, help_heading = "Scenario")]
    pub fault: Vec<Fault>,
    /// Tool worker threads (default: one per core).
    #[arg(long, help_heading = "Scenario")]
    pub threads: Option<usize>,
    /// Seed of every random choice (printed on every run).
    #[arg(long, help_heading = "Scenario")]
    pub seed: Option<u64>,

    /// Thresholds that fail the run: KEY=VALUE[,...] (loss=1%, stream_loss,
    /// latency_p99_ms, join_p99_ms, register_p99_ms, ringing_p99_ms,
    /// answer_p99_ms, converge_max_s, leaks, failures, server_cpu_pct).
    #[arg(long, help_heading = "Output")]
    pub slo: Vec<String>,
    /// Print the report as JSON on stdout (the table goes to stderr).
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// Also write the JSON report (the last one, with --compare) to this file.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    pub out: Option<PathBuf>,
    /// No progress bar and no table on stderr.
    #[arg(long, help_heading = "Output")]
    pub quiet: bool,
    /// Longest wait for the server to let go of everything after the run.
    #[arg(long, value_parser = parse_secs, default_value = "30", help_heading = "Output")]
    pub leak_wait: f64,
    /// Devices reconnect with the SDK's fleet backoff (500 ms .. 30 s) instead of a quick one.
    #[arg(long, help_heading = "Output")]
    pub fleet_backoff: bool,
    /// Write the generated speech clip to this WAV file and exit.
    #[arg(long, value_name = "OUT.wav", help_heading = "Output")]
    pub write_wav: Option<PathBuf>,
}

/// On or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

const AFTER_HELP: &str = "\
Examples:
  fleetcall-loadtest --spawn target/release/fleetcall --rooms 100 --per-room 5 --talkers 1 --duration 60 --ramp 50/s
  fleetcall-loadtest --data-dir /var/lib/fleetcall --http http://10.0.0.5:8080 --quic 10.0.0.5:4433 --rooms 20 --per-room 20 --talkers 3 --slo loss=1%,latency_p99_ms=50,leaks=0
  fleetcall-loadtest --spawn target/release/fleetcall --idle 10000 --ramp 500/s --duration 60 --fault server-restart@20 --fleet-backoff

Exit codes: 0 ok, 1 the run could not be done, 2 bad usage or impossible scenario, 3 an SLO was violated.";

impl Args {
    /// The scenario: the file (if any) with the flags over it.
    pub fn scenario(&self) -> anyhow::Result<Scenario> {
        let mut s = match &self.scenario {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                Scenario::from_toml(&text).with_context(|| format!("{}", path.display()))?
            }
            None => Scenario::default(),
        };
        macro_rules! set {
            ($flag:expr, $field:expr) => {
                if let Some(v) = $flag.clone() {
                    $field = v;
                }
            };
        }
        set!(self.rooms, s.rooms.count);
        set!(self.per_room, s.rooms.per_room);
        set!(self.talkers, s.rooms.talkers);
        set!(self.duration, s.duration_secs);
        set!(self.ramp, s.ramp_per_sec);
        set!(self.settle, s.settle_secs);
        set!(self.control, s.control);
        set!(self.suppression, s.suppression);
        set!(self.talk, s.talk);
        set!(self.churn, s.rooms.churn_per_sec);
        set!(self.rejoin_after, s.rooms.rejoin_after_secs);
        set!(self.calls_per_sec, s.calls.per_sec);
        set!(self.call_secs, s.calls.duration_secs);
        set!(self.answer_after, s.calls.answer_after_secs);
        set!(self.idle, s.idle.devices);
        set!(self.threads, s.threads);
        if let Some(d) = self.dtx {
            s.dtx = d == OnOff::On;
        }
        if self.wav.is_some() {
            s.wav = self.wav.clone();
        }
        if self.noise {
            s.noise = true;
        }
        if self.seed.is_some() {
            s.seed = self.seed;
        }
        s.faults.extend(self.fault.iter().copied());
        for spec in &self.slo {
            s.slo.apply(spec)?;
        }
        Ok(s)
    }

    fn target_kind(&self) -> TargetKind {
        if self.janus.is_some() && !self.compare {
            TargetKind::Janus
        } else if self.spawn.is_some() {
            TargetKind::Spawned
        } else {
            TargetKind::Running
        }
    }
}

/// Parses the process's command line, runs, prints, and returns the exit code.
pub fn main() -> i32 {
    main_with(std::env::args_os())
}

/// Like [`main`] with the given arguments (the first is the program name).
pub fn main_with<I, T>(argv: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
    let command = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let args = match Args::try_parse_from(&argv) {
        Ok(args) => args,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return code;
        }
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    if let Some(path) = &args.write_wav {
        return match fleetcall_peer::wav::write(path, &crate::audio::default_speech(args.noise)) {
            Ok(()) => {
                eprintln!("wrote {}", path.display());
                EXIT_OK
            }
            Err(e) => {
                eprintln!("fleetcall-loadtest: {e:#}");
                EXIT_ERROR
            }
        };
    }
    let scenario = match args.scenario().and_then(|s| {
        s.validate(args.target_kind())?;
        if args.compare && args.janus.is_none() {
            anyhow::bail!("--compare needs --janus URL");
        }
        check_file_limit(&s)?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fleetcall-loadtest: {e:#}");
            return EXIT_USAGE;
        }
    };
    let threads = if scenario.threads > 0 {
        scenario.threads
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetcall-loadtest: starting the runtime: {e}");
            return EXIT_ERROR;
        }
    };
    let result = runtime.block_on(execute(&args, &scenario, command));
    // Devices' tasks may linger (closing connections): do not wait for them.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(reports) => {
            let last = reports.last().map(|r| r.slo.passed).unwrap_or(false);
            let passed = reports.iter().all(|r| r.slo.passed) && last;
            if passed { EXIT_OK } else { EXIT_SLO }
        }
        Err(e) => {
            eprintln!("fleetcall-loadtest: {e:#}");
            EXIT_ERROR
        }
    }
}

async fn execute(args: &Args, scenario: &Scenario, command: String) -> anyhow::Result<Vec<Report>> {
    let options = RunOptions {
        bind_ip: args.bind_ip,
        progress: !args.quiet && !args.json,
        leak_wait: Duration::from_secs_f64(args.leak_wait),
        fleet_backoff: args.fleet_backoff,
        command,
    };
    let mut reports = Vec::new();
    if let Some(janus) = &args.janus {
        let report = crate::janus::run(scenario, janus, args.janus_pid, &options).await?;
        emit(args, &report);
        if !args.compare {
            if let Some(path) = &args.out {
                std::fs::write(path, report::to_json(&report))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            reports.push(report);
            return Ok(reports);
        }
        reports.push(report);
    }
    let mut server = match &args.spawn {
        Some(binary) => {
            Server::spawn(
                binary,
                &args.server_args,
                args.data_dir.as_deref(),
                args.server_cpus.as_deref(),
            )
            .await?
        }
        None => {
            let data_dir = args
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("fleetcall-data"));
            Server::connect(
                &args.http,
                args.quic,
                &data_dir,
                args.admin_token.clone(),
                args.server_pid,
            )
            .await?
        }
    };
    let report = run(scenario, &mut server, &options).await;
    server.stop();
    let report = report?;
    emit(args, &report);
    if args.compare
        && let Some(janus) = reports.first()
    {
        let text = crate::janus::compare(janus, &report);
        if args.json {
            eprint!("{text}");
        } else {
            print!("{text}");
        }
    }
    if let Some(path) = &args.out {
        std::fs::write(path, report::to_json(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    reports.push(report);
    Ok(reports)
}

fn emit(args: &Args, report: &Report) {
    if args.json {
        println!("{}", report::to_json(report));
        if !args.quiet {
            eprint!("{}", report.table());
        }
    } else {
        print!("{}", report.table());
    }
}

/// Refuses runs that would exhaust the open-file limit (a socket per
/// device's media, one per QUIC connection).
fn check_file_limit(s: &Scenario) -> anyhow::Result<()> {
    // Room and call devices: a control connection and a media socket; idle
    // devices: the control connection.
    let needed = 2 * (s.devices() - s.idle.devices) + s.idle.devices + 64;
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(soft) = soft
        && needed > soft
    {
        anyhow::bail!(
            "{} devices need about {needed} open files; the limit is {soft} (raise it with ulimit -n)",
            s.devices()
        );
    }
    Ok(())
}
