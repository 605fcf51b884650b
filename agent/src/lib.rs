//! fleetcall-agent: the reference device agent, `fleetcall device run`.
//!
//! Registers with the device's certificate, rings when called (answers with
//! `--auto-answer`), calls `--call OTHER` once registered, joins the call's
//! media with one Opus track fed from a looping WAV file (`--mic`, or
//! silence) and writes what it hears, decoded and mixed, to `--record`.
//! Ctrl-C or SIGTERM hang up first, then close the connection.
//!
//! Lifecycle lines go to stdout, one per line, for humans and scripts:
//! `registered ID session N`, `incoming call C from X`, `call C PHASE`,
//! `media connected call C`, `call C ended REASON by X`,
//! `disconnected: DETAIL`, `reconnected session N resumed BOOL`,
//! `session lost: REASON`, `stopped`.
//!
//! The signaling is the device SDK (`fleetcall_signaling::client`), the
//! media a [`fleetcall_peer::MediaPeer`]; this crate only decides what a
//! device does with them ([`agent`]) and what it plays and hears
//! ([`audio`]).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use audiopus::coder::Encoder;
use audiopus::{Application, Channels, SampleRate};
use fleetcall_peer::wav::Recording;
use fleetcall_signaling::client::{Client, ClientConfig};

mod agent;
pub mod audio;
mod error;

pub use error::AgentError;

use crate::agent::Agent;
use crate::audio::Mic;

/// `fleetcall device run` flags.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The device id (must match the certificate's).
    #[arg(long)]
    pub id: String,
    /// The installation CA certificate (PEM) the server's certificate is checked against.
    #[arg(long)]
    pub ca: PathBuf,
    /// The device certificate (PEM), from `fleetcall device enroll`.
    #[arg(long)]
    pub cert: PathBuf,
    /// The device key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// The server's QUIC address.
    #[arg(long, default_value = "127.0.0.1:4433")]
    pub server: SocketAddr,
    /// The name in the server certificate.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Answer incoming calls at once.
    #[arg(long)]
    pub auto_answer: bool,
    /// Call this device once registered.
    #[arg(long, value_name = "OTHER_ID")]
    pub call: Option<String>,
    /// Microphone: a 48 kHz mono 16-bit WAV file, looped. Silence without it.
    #[arg(long, value_name = "IN.wav")]
    pub mic: Option<PathBuf>,
    /// Write what the device hears (decoded, mixed) to this WAV file.
    #[arg(long, value_name = "OUT.wav")]
    pub record: Option<PathBuf>,
    /// Stop after this many seconds (hanging up first).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// IP of the media socket. Default: the interface that routes to the server.
    #[arg(long)]
    pub media_ip: Option<IpAddr>,
}

/// Runs the agent until Ctrl-C, SIGTERM or `--duration`.
pub async fn run(args: RunArgs) -> Result<(), AgentError> {
    let mic = args.mic.as_deref().map(Mic::open).transpose()?;
    let recording = args.record.as_deref().map(Recording::create).transpose()?;
    let duration = args
        .duration
        .map(|secs| {
            Duration::try_from_secs_f64(secs)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or(AgentError::Duration)
        })
        .transpose()?;
    let media_ip = match args.media_ip {
        Some(ip) => ip,
        None => fleetcall_peer::route_to(args.server).map_err(AgentError::Route)?,
    };
    check_identity(&args.cert, &args.id)?;
    let mut config = ClientConfig::from_files(
        args.server,
        args.server_name.clone(),
        &args.ca,
        &args.cert,
        &args.key,
    )
    .map_err(AgentError::Identity)?;
    config.core.software_version = concat!("fleetcall-device/", env!("CARGO_PKG_VERSION")).into();
    let (client, events) = Client::connect(config)
        .await
        .map_err(|source| AgentError::Connect { server: args.server, source })?;
    let encoder = Encoder::new(SampleRate::Hz48000, Channels::Mono, Application::Voip)
        .map_err(AgentError::Opus)?;

    let mut agent = Agent::new(args.id.clone(), client, args.auto_answer, media_ip, mic, encoder, recording);
    let outcome = agent.run(events, args.call.as_deref(), duration).await;
    agent.shutdown().await;
    println!("stopped");
    outcome
}

/// Refuses to run when `--id` is not the identity the certificate carries.
fn check_identity(cert: &Path, id: &str) -> Result<(), AgentError> {
    use rustls::pki_types::pem::PemObject;
    let unreadable = |source: Box<dyn std::error::Error + Send + Sync>| AgentError::Certificate {
        path: cert.to_owned(),
        source,
    };
    let der = rustls::pki_types::CertificateDer::from_pem_file(cert)
        .map_err(|e| unreadable(Box::new(e)))?;
    let named =
        fleetcall_signaling::pki::device_id_of(&der).map_err(|e| unreadable(Box::new(e)))?;
    if named != id {
        return Err(AgentError::WrongIdentity { path: cert.to_owned(), named, id: id.to_owned() });
    }
    Ok(())
}
