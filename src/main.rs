//! `fleetcall`: the server binary. Parses configuration and wires the media
//! plane, signaling and HTTP together; the logic lives in the crates.

mod config;
mod http;
mod secrets;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetcall_sfu::{DriverConfig, SfuConfig, SfuDriver};
use fleetcall_signaling::ws::WsContext;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{Config, LogFormat, ServeArgs};

#[derive(Debug, Parser)]
#[command(name = "fleetcall", version, about = "WebRTC media server for institutional device fleets")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: SFU, signaling and web client.
    Serve(ServeArgs),
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
        sfu: SfuConfig { disconnect_grace: config.disconnect_grace, max_room_size: config.max_room_size, ..SfuConfig::default() },
    })
    .context("starting the media plane")?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let ready = Arc::new(AtomicBool::new(true));
    let state = http::AppState {
        ws: WsContext { sfu: driver.handle(), shutdown: shutdown_rx },
        ready: ready.clone(),
        admin_token: admin_token.into(),
    };
    let app = http::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let handle = axum_server::Handle::new();
    let server = if config.tls {
        let ips: Vec<_> = [Some(config.http_addr.ip()), config.advertise_ip].into_iter().flatten().collect();
        let tls = secrets::tls_config(&config.data_dir, &ips)?;
        let tls = axum_server::tls_rustls::RustlsConfig::from_config(tls);
        tokio::spawn(axum_server::bind_rustls(config.http_addr, tls).handle(handle.clone()).serve(app))
    } else {
        tokio::spawn(axum_server::bind(config.http_addr).handle(handle.clone()).serve(app))
    };
    let Some(addr) = handle.listening().await else {
        let result = server.await.context("HTTP server task")?;
        return Err(result.err().map_or_else(|| anyhow::anyhow!("HTTP server stopped"), anyhow::Error::from))
            .with_context(|| format!("binding HTTP on {}", config.http_addr));
    };
    let scheme = if config.tls { "https" } else { "http" };
    info!(%addr, data_dir = %config.data_dir.display(), "fleetcall ready");
    // Tests and humans read this line to find the server.
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
    ready.store(false, Ordering::Relaxed);
    // Sockets tell their clients and leave; then HTTP drains within the deadline.
    let _ = shutdown_tx.send(true);
    handle.graceful_shutdown(Some(config.shutdown_timeout));
    if tokio::time::timeout(config.shutdown_timeout + std::time::Duration::from_secs(1), server).await.is_err() {
        warn!("HTTP connections did not drain in time");
    }
    tokio::task::spawn_blocking(move || driver.shutdown()).await.context("stopping the media plane")?;
    info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
