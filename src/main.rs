//! `fleetcall`: the server binary. Parses configuration and wires the media
//! plane, signaling and HTTP together; the logic lives in the crates.

mod admin_cli;
mod config;
mod credentials;
mod device_agent;
mod http;
mod metrics;
mod secrets;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum_server::accept::NoDelayAcceptor;
use clap::{Parser, Subcommand};
use fleetcall_dsp::PipelineConfig;
use fleetcall_sfu::audio::SuppressionPolicy;
use fleetcall_sfu::{DriverConfig, SfuConfig, SfuDriver};
use fleetcall_signaling::controller::{self, Controller};
use fleetcall_signaling::grants::{Grant, RoomPattern};
use fleetcall_signaling::pki::Pki;
use fleetcall_signaling::quic::{self, QuicConfig};
use fleetcall_signaling::revocations::Revocations;
use fleetcall_signaling::service::{unix_now, ControlPlane};
use fleetcall_signaling::tokens::{AccessTokens, TokenRequest};
use fleetcall_signaling::ws_device::TokenCheck;
use std::path::PathBuf;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{AudioMode, Config, LogFormat, ServeArgs};

#[derive(Debug, Parser)]
#[command(name = "fleetcall", version, about = "WebRTC media server for institutional device fleets")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: SFU, device control plane, signaling and web client.
    Serve(ServeArgs),
    /// The installation's certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Devices: enrollment, tokens, revocation.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Access tokens for browsers and other WebSocket clients.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print the device state table of a running server.
    Devices(admin_cli::AdminArgs),
    /// Print the live and recently ended calls of a running server.
    Calls(admin_cli::AdminArgs),
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create the CA and the server's QUIC certificate (done on first `serve` too).
    Init {
        /// Data directory of the server.
        #[arg(long, env = "FLEETCALL_DATA_DIR", default_value = "fleetcall-data")]
        data_dir: PathBuf,
        /// Names and IPs devices use to reach the server (certificate SANs).
        #[arg(long = "name")]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Issue a client certificate and key for a device.
    Enroll(credentials::EnrollArgs),
    /// Print an access token for a device without a certificate (WebSocket).
    Token(credentials::DeviceTokenArgs),
    /// End every credential of a device now: live connections close within
    /// a second, reconnects are refused, also after a restart.
    Revoke(credentials::RevokeArgs),
    /// Run a reference device: register, ring, answer, send a WAV file as
    /// the microphone and record what it hears.
    Run(device_agent::RunArgs),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print an access token for named rooms.
    Create(credentials::TokenArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = Config::load(args)?;
            init_tracing(config.log_format);
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(serve(config))
        }
        Command::Ca(CaCommand::Init { data_dir, names }) => {
            let pki = Pki::open_or_init(data_dir.join("pki"), &names)?;
            println!("CA ready: {}", pki.ca_path().display());
            Ok(())
        }
        Command::Device(DeviceCommand::Enroll(args)) => credentials::enroll(args),
        Command::Device(DeviceCommand::Token(args)) => credentials::device_token(args),
        Command::Device(DeviceCommand::Revoke(args)) => credentials::revoke(args),
        Command::Token(TokenCommand::Create(args)) => credentials::create_token(args),
        Command::Device(DeviceCommand::Run(args)) => {
            init_tracing(LogFormat::Text);
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(device_agent::run(args))
        }
        Command::Devices(args) => admin_cli::run(args, admin_cli::Table::Devices),
        Command::Calls(args) => admin_cli::run(args, admin_cli::Table::Calls),
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    secrets::ensure_data_dir(&config.data_dir)?;
    let admin_token = secrets::admin_token(&config.data_dir)?;

    let driver = SfuDriver::start(DriverConfig {
        bind_ip: config.media_bind,
        first_port: config.media_port,
        workers: config.workers,
        advertise_ip: config.advertise_ip,
        sfu: SfuConfig {
            disconnect_grace: config.disconnect_grace,
            max_room_size: config.max_room_size,
            suppression: SuppressionPolicy { default: config.suppression, ..SuppressionPolicy::default() },
            audio_slots: config.audio_slots,
            ..SfuConfig::default()
        },
        audio_threads: config.audio_threads,
        pipeline: match config.audio_mode {
            AudioMode::Voip => PipelineConfig::default(),
            AudioMode::LowDelay => PipelineConfig::low_delay(),
        },
    })
    .context("starting the media plane")?;

    let mut names = vec![config.quic_addr.ip().to_string()];
    names.extend(config.advertise_ip.map(|ip| ip.to_string()));
    let pki = Pki::open_or_init(config.data_dir.join("pki"), &names).context("opening the installation CA")?;
    let mut control_config = controller::Config::default();
    control_config.heartbeat_interval = config.heartbeat;
    control_config.ring_timeout = config.ring_timeout;
    control_config.resume_grace = config.resume_grace;
    control_config.max_room_members = config.max_room_size;
    let seed: [u8; 32] = rand::random();
    let now = std::time::Instant::now();
    let mut controller = Controller::new(control_config, now, seed).context("controller settings")?;
    let revocations = Revocations::open(pki.dir()).context("reading the revocation list")?;
    for (subject, at) in revocations.entries() {
        controller.handle_revoke(now, subject, *at);
    }
    let tokens = AccessTokens::open_or_init(pki.dir()).context("opening the token signing key")?;
    let control = ControlPlane::start(controller, driver.handle());
    let quic_config = QuicConfig { bind: config.quic_addr, ..QuicConfig::default() };
    let endpoint = quic::bind(&quic_config, pki.server_tls()?).with_context(|| format!("binding QUIC on {}", config.quic_addr))?;
    let quic_addr = endpoint.local_addr()?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let quic_task = tokio::spawn(quic::serve(endpoint, quic_config, control.clone(), shutdown_rx));
    let ready = Arc::new(AtomicBool::new(true));
    let scrape = metrics::Scrape {
        sfu: driver.handle(),
        control: control.clone(),
        site: config.metrics_site.clone(),
        room_labels: config.metrics_room_labels,
    };
    if let Some(addr) = config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics on {addr}"))?;
        println!("fleetcall metrics http://{}/metrics", listener.local_addr()?);
        let scrape = scrape.clone();
        let app = axum::Router::new().route("/metrics", axum::routing::get(move || {
            let scrape = scrape.clone();
            async move { http::serve_metrics(&scrape).await }
        }));
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    let state = http::AppState {
        sfu: driver.handle(),
        control: control.clone(),
        token_check: TokenCheck::new(tokens.clone()),
        tokens: tokens.clone(),
        revocations: Arc::new(Mutex::new(revocations)),
        allowed_origins: config.allowed_origins.clone().into(),
        scheme: if config.tls { "https" } else { "http" },
        metrics: config.metrics_addr.is_none().then_some(scrape),
        ready: ready.clone(),
        admin_token: admin_token.into(),
    };
    let app = http::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let handle = axum_server::Handle::new();
    let server = if config.tls {
        let ips: Vec<_> = [Some(config.http_addr.ip()), config.advertise_ip].into_iter().flatten().collect();
        let tls = secrets::tls_config(&config.data_dir, &ips)?;
        let tls = axum_server::tls_rustls::RustlsConfig::from_config(tls);
        // No Nagle delay on control frames: an SDP answer waited ~40 ms for
        // the previous frame's ACK without it.
        let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls).acceptor(NoDelayAcceptor);
        tokio::spawn(axum_server::bind(config.http_addr).acceptor(acceptor).handle(handle.clone()).serve(app))
    } else {
        tokio::spawn(axum_server::bind(config.http_addr).acceptor(NoDelayAcceptor).handle(handle.clone()).serve(app))
    };
    let Some(addr) = handle.listening().await else {
        let result = server.await.context("HTTP server task")?;
        return Err(result.err().map_or_else(|| anyhow::anyhow!("HTTP server stopped"), anyhow::Error::from))
            .with_context(|| format!("binding HTTP on {}", config.http_addr));
    };
    let scheme = if config.tls { "https" } else { "http" };
    info!(%addr, %quic_addr, data_dir = %config.data_dir.display(), "fleetcall ready");
    // Tests and humans read these lines to find the server.
    println!("fleetcall quic {quic_addr}");
    if addr.ip().is_loopback() {
        // Zero configuration: a short-lived guest link to a demo room, for
        // this machine only; every other bind needs real tokens.
        let demo = TokenRequest {
            identity: "guest".into(),
            ttl: DEMO_LINK_TTL,
            grant: Grant { rooms: vec![RoomPattern::parse(DEMO_ROOM)?], publish: true, subscribe: true },
            guest: true,
        };
        let token = tokens.mint(&demo, unix_now())?;
        println!("fleetcall join {scheme}://{addr}/?room={DEMO_ROOM}&token={token}&autojoin=1");
        info!(room = DEMO_ROOM, ttl = ?DEMO_LINK_TTL, "open the join link in two tabs to talk");
    }
    println!("fleetcall serving {scheme}://{addr}/");
    let _ = std::io::stdout().flush();

    let mut server = server;
    tokio::select! {
        result = &mut server => {
            result.context("HTTP server task")?.context("HTTP server failed")?;
            return Ok(());
        }
        () = shutdown_signal() => {}
    }

    info!(timeout = ?config.shutdown_timeout, "shutting down");
    // One deadline for the whole shutdown; what has not finished by then is
    // cut off when the process exits.
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
    ready.store(false, Ordering::Relaxed);
    // Devices and browsers hear SERVER_SHUTDOWN on every call and their
    // connections close; then HTTP drains.
    if tokio::time::timeout_at(deadline, control.shutdown()).await.is_err() {
        warn!("the control plane did not shut down in time");
    }
    let _ = shutdown_tx.send(true);
    handle.graceful_shutdown(Some(deadline.saturating_duration_since(tokio::time::Instant::now())));
    if tokio::time::timeout_at(deadline, async {
        let _ = quic_task.await;
        let _ = server.await;
    })
    .await
    .is_err()
    {
        warn!("connections did not drain in time");
    }
    let media = tokio::task::spawn_blocking(move || driver.shutdown());
    if tokio::time::timeout_at(deadline + std::time::Duration::from_secs(1), media).await.is_err() {
        warn!("media workers did not stop in time");
    }
    info!("stopped");
    Ok(())
}

/// The room of the loopback join link.
const DEMO_ROOM: &str = "demo";
/// How long the loopback join link works.
const DEMO_LINK_TTL: Duration = Duration::from_secs(2 * 3600);

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
