//! `fleetcall`: the server binary. Parses the command line; `serve` hands
//! the configuration to [`fleetcall::server::run`], the other commands are
//! the operator's tools (CA, enrollment, tokens, revocation, admin tables)
//! and the reference device agent.

mod admin_cli;
mod credentials;
mod device_agent;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetcall::config::{Config, LogFormat, ServeArgs};
use fleetcall::server::{self, Listeners};
use fleetcall_signaling::pki::Pki;

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
            let listeners = Listeners::bind(&config)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let result = runtime.block_on(server::run(config, listeners, shutdown_signal()));
            // `run` kept to its deadline; whatever is still going (a media
            // worker that would not stop) is cut off now, not waited for.
            runtime.shutdown_background();
            result
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

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
