//! Configuration: embedded defaults < TOML file < environment < flags.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use fleetcall_media::{DriverConfig, SfuConfig};
use fleetcall_signaling::controller;
use fleetcall_signaling::quic::QuicConfig;
use fleetcall_signaling::store::{BackendConfig, RedisConfig};
use serde::Deserialize;

use crate::http::HttpLimits;

/// When to serve HTTPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// HTTPS unless the HTTP address is loopback (browsers need a secure
    /// context for the microphone, and loopback already is one).
    Auto,
    /// Always HTTPS with the self-signed certificate in the data dir.
    On,
    /// Plain HTTP.
    Off,
}

/// On or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    On,
    Off,
}

/// How denoised audio is re-encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AudioMode {
    Voip,
    LowDelay,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Where the shared state lives (signaling/STATE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    /// In this process: one node, no configuration.
    Memory,
    /// Redis at `redis_url`; the server does not start without it.
    Redis,
    /// Redis when `redis_url` is set, else memory. Never a silent fall-back
    /// to memory when a configured Redis is unreachable.
    Auto,
}

/// `fleetcall serve` flags. Each also reads a `FLEETCALL_*` variable. The
/// default is no flag at all (tests start from it).
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML configuration file (see README for the keys).
    #[arg(long, env = "FLEETCALL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for TLS material and the admin token; created on first start.
    #[arg(long, env = "FLEETCALL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// HTTP listen address (web client, signaling, health, admin API).
    #[arg(long, env = "FLEETCALL_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Serve HTTPS: auto | on | off.
    #[arg(long, env = "FLEETCALL_TLS")]
    pub tls: Option<TlsMode>,
    /// Another web origin (`https://portal.example`) whose pages may open the
    /// device socket, besides the server's own; repeatable.
    #[arg(long = "allowed-origin", env = "FLEETCALL_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// IP the media (UDP) sockets bind.
    #[arg(long, env = "FLEETCALL_MEDIA_BIND")]
    pub media_bind: Option<IpAddr>,
    /// First media UDP port; worker i uses first + i. 0 picks ephemeral ports.
    #[arg(long, env = "FLEETCALL_MEDIA_PORT")]
    pub media_port: Option<u16>,
    /// Media worker threads (one UDP port each). Default: one per core.
    #[arg(long, env = "FLEETCALL_WORKERS")]
    pub workers: Option<usize>,
    /// LAN or public IP announced to devices for media.
    #[arg(long, env = "FLEETCALL_ADVERTISE_IP")]
    pub advertise_ip: Option<IpAddr>,
    /// Seconds a participant may be silent or ICE-disconnected before removal.
    #[arg(long, env = "FLEETCALL_DISCONNECT_GRACE_SECS")]
    pub disconnect_grace_secs: Option<f64>,
    /// Most participants in one room.
    #[arg(long, env = "FLEETCALL_MAX_ROOM_SIZE")]
    pub max_room_size: Option<usize>,
    /// Seconds to drain connections on SIGTERM/Ctrl-C before exiting anyway.
    #[arg(long, env = "FLEETCALL_SHUTDOWN_TIMEOUT_SECS")]
    pub shutdown_timeout_secs: Option<f64>,
    /// Log format: text | json. Filter with RUST_LOG.
    #[arg(long, env = "FLEETCALL_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Denoise every publisher's audio unless a room or device says otherwise: on | off.
    #[arg(long, env = "FLEETCALL_SUPPRESSION")]
    pub suppression: Option<Switch>,
    /// Coder of denoised audio: voip (keeps in-band FEC, 16.7 ms added delay)
    /// or low-delay (CELT, no FEC, 12.7 ms, about 40 % less CPU).
    #[arg(long, env = "FLEETCALL_AUDIO_MODE")]
    pub audio_mode: Option<AudioMode>,
    /// Threads running noise suppression. Default: one per core.
    #[arg(long, env = "FLEETCALL_AUDIO_THREADS")]
    pub audio_threads: Option<usize>,
    /// Audio tracks per listener in rooms larger than this + 1, chosen by
    /// active-speaker detection; 0 forwards everyone to everyone. Default 3.
    #[arg(long, env = "FLEETCALL_AUDIO_SLOTS")]
    pub audio_slots: Option<usize>,
    // Media plane limits (README "Limits").
    /// Joins waiting at one media worker before more are refused (`overloaded`).
    #[arg(long, env = "FLEETCALL_WORKER_QUEUE")]
    pub worker_queue: Option<usize>,
    /// Most tracks one participant may publish.
    #[arg(long, env = "FLEETCALL_MAX_TRACKS_PER_PARTICIPANT")]
    pub max_tracks_per_participant: Option<usize>,
    /// Longest datagram taken on the media ports, in bytes.
    #[arg(long, env = "FLEETCALL_MAX_DATAGRAM_BYTES")]
    pub max_datagram_bytes: Option<usize>,
    /// Packets of one track waiting for noise suppression before more are dropped.
    #[arg(long, env = "FLEETCALL_DSP_QUEUE_PER_TRACK")]
    pub dsp_queue_per_track: Option<usize>,
    /// Serve /metrics on this address instead of the HTTP port.
    #[arg(long, env = "FLEETCALL_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// `site` label on every series.
    #[arg(long, env = "FLEETCALL_METRICS_SITE")]
    pub metrics_site: Option<String>,
    /// Per-room series (one per live room; costs a series per room).
    #[arg(long, env = "FLEETCALL_METRICS_ROOM_LABELS")]
    pub metrics_room_labels: Option<bool>,
    /// UDP address of the device control plane (QUIC).
    #[arg(long, env = "FLEETCALL_QUIC_ADDR")]
    pub quic_addr: Option<SocketAddr>,
    /// Seconds between heartbeats, both ways.
    #[arg(long, env = "FLEETCALL_HEARTBEAT_SECS")]
    pub heartbeat_secs: Option<f64>,
    /// Seconds an unanswered call rings.
    #[arg(long, env = "FLEETCALL_RING_TIMEOUT_SECS")]
    pub ring_timeout_secs: Option<f64>,
    /// Seconds a device's session survives a lost connection (resume).
    #[arg(long, env = "FLEETCALL_RESUME_GRACE_SECS")]
    pub resume_grace_secs: Option<f64>,
    #[command(flatten)]
    pub control_limits: ControlLimitArgs,
    /// Shared state: memory (default, one node) | redis | auto (redis when --redis-url is set).
    #[arg(long, env = "FLEETCALL_STATE_BACKEND")]
    pub state_backend: Option<StateBackend>,
    /// Redis for shared state: redis://[user:password@]host[:port][/db].
    #[arg(long, env = "FLEETCALL_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Seconds one Redis operation may take before it fails as unavailable (at most 2). Default 1.
    #[arg(long, env = "FLEETCALL_REDIS_TIMEOUT_SECS")]
    pub redis_timeout_secs: Option<f64>,

    // ---- transport limits (TOML section [transport]) ----
    /// Most TCP connections (device WebSockets included) from one source IP
    /// on the HTTP port. Default 256.
    #[arg(long, env = "FLEETCALL_HTTP_MAX_CONNECTIONS_PER_IP")]
    pub http_max_connections_per_ip: Option<usize>,
    /// Seconds a TCP connection has to complete its first HTTP request (TLS
    /// handshake included) and each later one's headers. Default 10.
    #[arg(long, env = "FLEETCALL_HTTP_REQUEST_TIMEOUT_SECS")]
    pub http_request_timeout_secs: Option<f64>,
    /// Most QUIC device connections in all (handshakes included). Default 20000.
    #[arg(long, env = "FLEETCALL_QUIC_MAX_CONNECTIONS")]
    pub quic_max_connections: Option<usize>,
    /// Most QUIC connections from one source IP (handshakes included). Default 256.
    #[arg(long, env = "FLEETCALL_QUIC_MAX_CONNECTIONS_PER_IP")]
    pub quic_max_connections_per_ip: Option<usize>,
    /// QUIC handshakes in progress from which new unvalidated addresses get a
    /// Retry first (0: always). Default 64.
    #[arg(long, env = "FLEETCALL_QUIC_RETRY_THRESHOLD")]
    pub quic_retry_threshold: Option<usize>,
    /// Seconds a QUIC handshake may take. Default 10.
    #[arg(long, env = "FLEETCALL_QUIC_HANDSHAKE_TIMEOUT_SECS")]
    pub quic_handshake_timeout_secs: Option<f64>,
    /// Seconds a QUIC device has to open its control stream after the
    /// handshake. Default 10.
    #[arg(long, env = "FLEETCALL_QUIC_STREAM_TIMEOUT_SECS")]
    pub quic_stream_timeout_secs: Option<f64>,
    // ---- end of transport limits ----
}

// ---- control-plane limits (issue 15): flags, [control] keys, resolved ------

/// Limits the controller enforces; each flag also reads its `FLEETCALL_*`
/// variable and the `[control]` key of the same name. Defaults are the
/// controller's (`fleetcall_signaling::controller::Config::default()`).
#[derive(Debug, Default, Args)]
pub struct ControlLimitArgs {
    /// Frames per second one control connection may send, sustained (default 20).
    #[arg(long, env = "FLEETCALL_MESSAGES_PER_SECOND")]
    pub messages_per_second: Option<u32>,
    /// Frames one control connection may send at once above the rate (default 100).
    #[arg(long, env = "FLEETCALL_MESSAGE_BURST")]
    pub message_burst: Option<u32>,
    /// Frames refused for the rate before the connection is closed (default 50).
    #[arg(long, env = "FLEETCALL_MAX_RATE_LIMITED_FRAMES")]
    pub max_rate_limited_frames: Option<u32>,
    /// Devices (sessions) this node holds; more are refused OVERLOADED (default 20000).
    #[arg(long, env = "FLEETCALL_MAX_DEVICES")]
    pub max_devices: Option<usize>,
    /// Live calls and rooms this node holds; more are refused OVERLOADED (default 10000).
    #[arg(long, env = "FLEETCALL_MAX_CALLS")]
    pub max_calls: Option<usize>,
    /// Invitations one device may have ringing at once (default 31).
    #[arg(long, env = "FLEETCALL_MAX_PENDING_INVITES")]
    pub max_pending_invites: Option<usize>,
    /// Frames queued for a connection before it is closed as not reading (default 256).
    #[arg(long, env = "FLEETCALL_OUTBOUND_QUEUE")]
    pub outbound_queue: Option<usize>,
}

/// The controller's settings: its defaults, then the `[control]` keys,
/// then flags/environment.
fn controller_config(args: &ServeArgs, file: &FileControl, max_room_size: usize) -> anyhow::Result<controller::Config> {
    let (limits, mut c) = (&args.control_limits, controller::Config::default());
    c.heartbeat_interval = seconds("heartbeat interval", args.heartbeat_secs.or(file.heartbeat_secs).unwrap_or(2.0))?;
    c.ring_timeout = seconds("ring timeout", args.ring_timeout_secs.or(file.ring_timeout_secs).unwrap_or(30.0))?;
    c.resume_grace = seconds("resume grace", args.resume_grace_secs.or(file.resume_grace_secs).unwrap_or(10.0))?;
    c.max_room_members = max_room_size;
    c.messages_per_second = limits.messages_per_second.or(file.messages_per_second).unwrap_or(c.messages_per_second);
    c.message_burst = limits.message_burst.or(file.message_burst).unwrap_or(c.message_burst);
    c.max_rate_limited_frames = limits.max_rate_limited_frames.or(file.max_rate_limited_frames).unwrap_or(c.max_rate_limited_frames);
    c.max_devices = limits.max_devices.or(file.max_devices).unwrap_or(c.max_devices);
    c.max_calls = limits.max_calls.or(file.max_calls).unwrap_or(c.max_calls);
    c.max_pending_invites = limits.max_pending_invites.or(file.max_pending_invites).unwrap_or(c.max_pending_invites);
    c.outbound_queue = limits.outbound_queue.or(file.outbound_queue).unwrap_or(c.outbound_queue);
    let positive = [
        ("messages_per_second", c.messages_per_second as usize),
        ("message_burst", c.message_burst as usize),
        ("max_devices", c.max_devices),
        ("max_calls", c.max_calls),
        ("max_pending_invites", c.max_pending_invites),
        ("outbound_queue", c.outbound_queue),
    ];
    for (name, value) in positive {
        if value == 0 {
            bail!("{name} must be at least 1");
        }
    }
    Ok(c)
}

// ---- end of control-plane limits --------------------------------------------

/// The configuration file. Unknown keys are errors, so a typo never silently
/// falls back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    log_format: Option<LogFormat>,
    state_backend: Option<StateBackend>,
    redis_url: Option<String>,
    redis_timeout_secs: Option<f64>,
    #[serde(default)]
    http: FileHttp,
    #[serde(default)]
    media: FileMedia,
    #[serde(default)]
    shutdown: FileShutdown,
    #[serde(default)]
    control: FileControl,
    #[serde(default)]
    metrics: FileMetrics,
    #[serde(default)]
    transport: FileTransport,
}

// ---- transport limits ----
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTransport {
    http_max_connections_per_ip: Option<usize>,
    http_request_timeout_secs: Option<f64>,
    quic_max_connections: Option<usize>,
    quic_max_connections_per_ip: Option<usize>,
    quic_retry_threshold: Option<usize>,
    quic_handshake_timeout_secs: Option<f64>,
    quic_stream_timeout_secs: Option<f64>,
}

impl FileTransport {
    /// The limits of both transports: flags over the file over defaults.
    fn resolve(self, args: &ServeArgs) -> anyhow::Result<(HttpLimits, QuicConfig)> {
        let http_default = HttpLimits::default();
        let http = HttpLimits {
            max_connections_per_address: args.http_max_connections_per_ip.or(self.http_max_connections_per_ip).unwrap_or(http_default.max_connections_per_address),
            request_timeout: match args.http_request_timeout_secs.or(self.http_request_timeout_secs) {
                Some(secs) => seconds("HTTP request timeout", secs)?,
                None => http_default.request_timeout,
            },
        };
        let quic_default = QuicConfig::default();
        let quic_seconds = |what, flag: Option<f64>, file: Option<f64>, default| flag.or(file).map_or(Ok(default), |secs| seconds(what, secs));
        let quic = QuicConfig {
            max_connections: args.quic_max_connections.or(self.quic_max_connections).unwrap_or(quic_default.max_connections),
            max_connections_per_address: args.quic_max_connections_per_ip.or(self.quic_max_connections_per_ip).unwrap_or(quic_default.max_connections_per_address),
            retry_threshold: args.quic_retry_threshold.or(self.quic_retry_threshold).unwrap_or(quic_default.retry_threshold),
            handshake_timeout: quic_seconds("QUIC handshake timeout", args.quic_handshake_timeout_secs, self.quic_handshake_timeout_secs, quic_default.handshake_timeout)?,
            stream_timeout: quic_seconds("QUIC stream timeout", args.quic_stream_timeout_secs, self.quic_stream_timeout_secs, quic_default.stream_timeout)?,
            ..quic_default
        };
        if http.max_connections_per_address == 0 || quic.max_connections == 0 || quic.max_connections_per_address == 0 {
            bail!("connection limits must be at least 1");
        }
        Ok((http, quic))
    }
}
// ---- end of transport limits ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    addr: Option<SocketAddr>,
    site: Option<String>,
    room_labels: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileControl {
    quic_addr: Option<SocketAddr>,
    heartbeat_secs: Option<f64>,
    ring_timeout_secs: Option<f64>,
    resume_grace_secs: Option<f64>,
    // Control-plane limits (issue 15), see `ControlLimits`.
    messages_per_second: Option<u32>,
    message_burst: Option<u32>,
    max_rate_limited_frames: Option<u32>,
    max_devices: Option<usize>,
    max_calls: Option<usize>,
    max_pending_invites: Option<usize>,
    outbound_queue: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHttp {
    addr: Option<SocketAddr>,
    tls: Option<TlsMode>,
    allowed_origins: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMedia {
    bind: Option<IpAddr>,
    first_port: Option<u16>,
    workers: Option<usize>,
    advertise_ip: Option<IpAddr>,
    disconnect_grace_secs: Option<f64>,
    max_room_size: Option<usize>,
    suppression: Option<Switch>,
    audio_threads: Option<usize>,
    audio_mode: Option<AudioMode>,
    audio_slots: Option<usize>,
    worker_queue: Option<usize>,
    max_tracks_per_participant: Option<usize>,
    max_datagram_bytes: Option<usize>,
    dsp_queue_per_track: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShutdown {
    timeout_secs: Option<f64>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub http_addr: SocketAddr,
    pub tls: bool,
    pub allowed_origins: Vec<String>,
    pub media_bind: IpAddr,
    pub media_port: u16,
    pub workers: usize,
    pub advertise_ip: Option<IpAddr>,
    pub disconnect_grace: Duration,
    pub max_room_size: usize,
    pub suppression: bool,
    pub audio_threads: usize,
    pub audio_mode: AudioMode,
    pub audio_slots: usize,
    pub worker_queue: usize,
    pub max_tracks_per_participant: usize,
    pub max_datagram_bytes: usize,
    pub dsp_queue_per_track: usize,
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
    pub metrics_addr: Option<SocketAddr>,
    pub metrics_site: String,
    pub metrics_room_labels: bool,
    pub quic_addr: SocketAddr,
    /// The controller's settings: timers and limits.
    pub controller: controller::Config,
    /// Limits of the HTTP port (sockets per address, first-request deadline).
    pub http_limits: HttpLimits,
    /// The QUIC transport, limits included.
    pub quic: QuicConfig,
    /// Where the shared state lives.
    pub state: BackendConfig,
}

/// The state backend: flags over the file; `auto` picks Redis when a URL is set.
fn state_config(args: &ServeArgs, file: &FileConfig) -> anyhow::Result<BackendConfig> {
    let backend = args.state_backend.or(file.state_backend).unwrap_or(StateBackend::Memory);
    let url = args.redis_url.clone().or_else(|| file.redis_url.clone()).filter(|url| !url.trim().is_empty());
    let timeout = match args.redis_timeout_secs.or(file.redis_timeout_secs) {
        Some(secs) => seconds("redis timeout", secs)?,
        None => RedisConfig::DEFAULT_TIMEOUT,
    };
    let redis = |url: String| RedisConfig::new(url, timeout).map(BackendConfig::Redis).map_err(anyhow::Error::from);
    match (backend, url) {
        (StateBackend::Memory, None) => Ok(BackendConfig::Memory),
        (StateBackend::Memory, Some(_)) => bail!("redis_url is set but state_backend is memory: set state_backend to redis or auto, or remove redis_url"),
        (StateBackend::Redis, None) => bail!("state_backend redis needs redis_url (--redis-url, FLEETCALL_REDIS_URL)"),
        (StateBackend::Redis | StateBackend::Auto, Some(url)) => redis(url),
        (StateBackend::Auto, None) => Ok(BackendConfig::Memory),
    }
}

impl Config {
    /// Merges flags/environment (already merged by clap) over the file over defaults.
    pub fn load(args: ServeArgs) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let http_addr = args.http_addr.or(file.http.addr).unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)));
        let tls = match args.tls.or(file.http.tls).unwrap_or(TlsMode::Auto) {
            TlsMode::Auto => !http_addr.ip().is_loopback(),
            TlsMode::On => true,
            TlsMode::Off => false,
        };
        let workers = args
            .workers
            .or(file.media.workers)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let state = state_config(&args, &file)?;
        let (http_limits, quic) = file.transport.resolve(&args)?;
        let max_room_size = args.max_room_size.or(file.media.max_room_size).unwrap_or(100);
        let controller = controller_config(&args, &file.control, max_room_size)?;
        let config = Config {
            data_dir: args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("fleetcall-data")),
            http_addr,
            tls,
            allowed_origins: if args.allowed_origins.is_empty() { file.http.allowed_origins.unwrap_or_default() } else { args.allowed_origins },
            media_bind: args.media_bind.or(file.media.bind).unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            media_port: args.media_port.or(file.media.first_port).unwrap_or(50_000),
            workers,
            advertise_ip: args.advertise_ip.or(file.media.advertise_ip),
            disconnect_grace: seconds("disconnect grace", args.disconnect_grace_secs.or(file.media.disconnect_grace_secs).unwrap_or(5.0))?,
            max_room_size,
            suppression: args.suppression.or(file.media.suppression) == Some(Switch::On),
            audio_threads: args.audio_threads.or(file.media.audio_threads).unwrap_or(workers),
            audio_mode: args.audio_mode.or(file.media.audio_mode).unwrap_or(AudioMode::Voip),
            audio_slots: args.audio_slots.or(file.media.audio_slots).unwrap_or(3),
            worker_queue: args.worker_queue.or(file.media.worker_queue).unwrap_or(DriverConfig::DEFAULT_WORKER_QUEUE),
            max_tracks_per_participant: args
                .max_tracks_per_participant
                .or(file.media.max_tracks_per_participant)
                .unwrap_or(SfuConfig::default().max_tracks_per_participant),
            max_datagram_bytes: args.max_datagram_bytes.or(file.media.max_datagram_bytes).unwrap_or(SfuConfig::default().max_datagram),
            dsp_queue_per_track: args.dsp_queue_per_track.or(file.media.dsp_queue_per_track).unwrap_or(SfuConfig::default().dsp_queue_per_track),
            shutdown_timeout: seconds("shutdown timeout", args.shutdown_timeout_secs.or(file.shutdown.timeout_secs).unwrap_or(5.0))?,
            log_format: args.log_format.or(file.log_format).unwrap_or(LogFormat::Text),
            metrics_addr: args.metrics_addr.or(file.metrics.addr),
            metrics_site: args.metrics_site.or(file.metrics.site).unwrap_or_else(|| "default".into()),
            metrics_room_labels: args.metrics_room_labels.or(file.metrics.room_labels).unwrap_or(false),
            quic_addr: args.quic_addr.or(file.control.quic_addr).unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 4433))),
            controller,
            http_limits,
            quic,
            state,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.workers == 0 || self.workers > 256 {
            bail!("workers must be between 1 and 256, got {}", self.workers);
        }
        if self.media_port != 0 && usize::from(self.media_port) + self.workers - 1 > usize::from(u16::MAX) {
            bail!("media ports {}..{} run past 65535", self.media_port, usize::from(self.media_port) + self.workers - 1);
        }
        if self.media_bind.is_unspecified() && self.advertise_ip.is_none() {
            bail!("media bind {} needs --advertise-ip: the address devices reach this server on", self.media_bind);
        }
        if self.max_room_size < 2 {
            bail!("max room size must be at least 2");
        }
        for (name, value) in [("worker queue", self.worker_queue), ("max tracks per participant", self.max_tracks_per_participant), ("DSP queue per track", self.dsp_queue_per_track)] {
            if value == 0 {
                bail!("{name} must be at least 1");
            }
        }
        // A DTLS flight or a video packet must still fit.
        if self.max_datagram_bytes < 1200 {
            bail!("max datagram bytes must be at least 1200 (WebRTC packets are up to about 1200), got {}", self.max_datagram_bytes);
        }
        for origin in &self.allowed_origins {
            let host = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
            if host.is_none_or(|h| h.is_empty() || h.contains('/')) {
                bail!("allowed origin {origin:?} is not scheme://host[:port]");
            }
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

fn seconds(what: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{what} must be a positive number of seconds, got {value}"))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn load(args: &[&str]) -> anyhow::Result<Config> {
        let cli = Cli::try_parse_from(std::iter::once("fleetcall").chain(args.iter().copied()))?;
        Config::load(cli.serve)
    }

    #[test]
    fn zero_configuration_listens_on_loopback_without_tls() {
        let config = load(&[]).unwrap();
        assert!(config.http_addr.ip().is_loopback());
        assert!(config.media_bind.is_loopback());
        assert!(!config.tls);
        assert_eq!(config.disconnect_grace, Duration::from_secs(5));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("fleetcall-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fleetcall.toml");
        std::fs::write(&path, "[http]\naddr = \"0.0.0.0:9000\"\n[media]\nworkers = 3\nadvertise_ip = \"10.1.2.3\"\nbind = \"0.0.0.0\"\n").unwrap();
        let config = load(&["--config", path.to_str().unwrap(), "--workers", "1"]).unwrap();
        assert_eq!(config.workers, 1);
        assert_eq!(config.http_addr.port(), 9000);
        assert!(config.tls, "a LAN address gets HTTPS in auto mode");
        assert_eq!(config.advertise_ip, Some("10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn bad_configuration_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("fleetcall-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("typo.toml");
        std::fs::write(&path, "[media]\nworkerz = 3\n").unwrap();
        let err = load(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(format!("{err:#}").contains("workerz"), "{err:#}");
        assert!(load(&["--media-bind", "0.0.0.0"]).unwrap_err().to_string().contains("advertise"));
        assert!(load(&["--workers", "0"]).is_err());
        assert!(load(&["--disconnect-grace-secs", "-1"]).is_err());
        assert!(load(&["--config", "/nonexistent/fleetcall.toml"]).is_err());
        assert!(load(&["--allowed-origin", "portal.example"]).is_err());
        assert!(load(&["--allowed-origin", "https://portal.example/app"]).is_err());
        assert_eq!(load(&["--allowed-origin", "https://portal.example"]).unwrap().allowed_origins, ["https://portal.example"]);
    }

    #[test]
    fn control_limits_come_from_flags_the_file_or_the_controller() {
        let defaults = controller::Config::default();
        let config = load(&[]).unwrap();
        assert_eq!(config.controller.messages_per_second, defaults.messages_per_second);
        assert_eq!(config.controller.outbound_queue, defaults.outbound_queue);
        let dir = std::env::temp_dir().join(format!("fleetcall-config-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("limits.toml");
        std::fs::write(&path, "[control]\nmessages_per_second = 5\nmax_devices = 40\nmax_calls = 9\noutbound_queue = 64\n").unwrap();
        let config = load(&["--config", path.to_str().unwrap(), "--max-devices", "50", "--max-pending-invites", "3"]).unwrap();
        let applied = &config.controller;
        assert_eq!((applied.messages_per_second, applied.max_devices, applied.max_calls), (5, 50, 9));
        assert_eq!((applied.max_pending_invites, applied.outbound_queue, applied.message_burst), (3, 64, defaults.message_burst));
        applied.validate().unwrap();
        assert!(format!("{:#}", load(&["--outbound-queue", "0"]).unwrap_err()).contains("outbound_queue"));
        assert!(load(&["--messages-per-second", "0"]).is_err());
        std::fs::write(&path, "[control]\nmax_device = 4\n").unwrap();
        assert!(format!("{:#}", load(&["--config", path.to_str().unwrap()]).unwrap_err()).contains("max_device"));
    }

    #[test]
    fn state_backend_is_memory_unless_redis_is_configured() {
        assert_eq!(load(&[]).unwrap().state, BackendConfig::Memory);
        assert_eq!(load(&["--state-backend", "auto"]).unwrap().state, BackendConfig::Memory);
        let BackendConfig::Redis(redis) = load(&["--state-backend", "auto", "--redis-url", "redis://db:6379"]).unwrap().state else { panic!("auto with a url is redis") };
        assert_eq!((redis.url.as_str(), redis.timeout), ("redis://db:6379", RedisConfig::DEFAULT_TIMEOUT));
        let dir = std::env::temp_dir().join(format!("fleetcall-config-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fleetcall.toml");
        std::fs::write(&path, "state_backend = \"redis\"\nredis_url = \"redis://db\"\nredis_timeout_secs = 0.5\n").unwrap();
        let BackendConfig::Redis(redis) = load(&["--config", path.to_str().unwrap()]).unwrap().state else { panic!("the file asks for redis") };
        assert_eq!(redis.timeout, Duration::from_millis(500));
        let error = |args: &[&str]| format!("{:#}", load(args).unwrap_err());
        assert!(error(&["--state-backend", "redis"]).contains("needs redis_url"));
        assert!(error(&["--redis-url", "redis://db"]).contains("state_backend is memory"));
        assert!(error(&["--state-backend", "redis", "--redis-url", "http://db"]).contains("redis url"));
        assert!(error(&["--state-backend", "redis", "--redis-url", "redis://db", "--redis-timeout-secs", "3"]).contains("at most"));
        assert!(load(&["--state-backend", "cluster"]).is_err());
    }

    #[test]
    fn transport_limits_have_safe_defaults_and_read_flags_and_file() {
        let config = load(&[]).unwrap();
        assert_eq!(config.http_limits.max_connections_per_address, 256);
        assert_eq!(config.http_limits.request_timeout, Duration::from_secs(10));
        assert_eq!((config.quic.max_connections_per_address, config.quic.retry_threshold), (256, 64));
        let dir = std::env::temp_dir().join(format!("fleetcall-config-transport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fleetcall.toml");
        std::fs::write(&path, "[transport]\nhttp_max_connections_per_ip = 8\nquic_retry_threshold = 0\nquic_stream_timeout_secs = 2.5\n").unwrap();
        let config = load(&["--config", path.to_str().unwrap(), "--http-request-timeout-secs", "3"]).unwrap();
        assert_eq!(config.http_limits.max_connections_per_address, 8);
        assert_eq!(config.http_limits.request_timeout, Duration::from_secs(3));
        assert_eq!(config.quic.retry_threshold, 0);
        assert_eq!(config.quic.stream_timeout, Duration::from_millis(2500));
        assert_eq!(config.quic.keep_alive, QuicConfig::default().keep_alive, "what is not configured keeps its default");
        std::fs::write(&path, "[transport]\nquic_retry_treshold = 0\n").unwrap();
        assert!(format!("{:#}", load(&["--config", path.to_str().unwrap()]).unwrap_err()).contains("quic_retry_treshold"));
        assert!(load(&["--http-max-connections-per-ip", "0"]).is_err());
        assert!(load(&["--quic-handshake-timeout-secs", "0"]).is_err());
    }
}
