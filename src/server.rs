//! The server: every part started, wired together, and stopped together.
//!
//! [`run`] is all of `fleetcall serve` after the command line: tests call it
//! with [`Listeners`] they bound on `127.0.0.1:0` and a shutdown future of
//! their own, as mini-redis's tests do.
//!
//! Shutdown has one mechanism. When `shutdown` resolves, one watch channel
//! tells every part to stop and carries the deadline they share
//! (`shutdown_timeout` from then); each part holds a [`Running`] and drops it
//! when it has finished; `run` waits for the last one, then stops the media
//! plane, all within that deadline. What has not finished by then is cut
//! off. What stopping means to each part:
//!
//! - the controller ends every call (`SERVER_SHUTDOWN`), closes every
//!   connection after its queued frames, and ends;
//! - the bridge applies the commands it left (the Leaves), and ends;
//! - QUIC stops accepting, lets its connections write their last frames and
//!   closes the endpoint;
//! - HTTP and the metrics server stop accepting and finish the requests in
//!   flight; each device socket writes its queue and its close;
//! - the media plane goes last, when nothing feeds it any more.

use std::future::Future;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum_server::accept::NoDelayAcceptor;
use fleetcall_dsp::PipelineConfig;
use fleetcall_media::{DriverConfig, SfuConfig, SfuDriver, SuppressionPolicy};
use fleetcall_signaling::controller::Controller;
use fleetcall_signaling::grants::{Grant, RoomPattern};
use fleetcall_signaling::pki::Pki;
use fleetcall_signaling::quic;
use fleetcall_signaling::revocations::Revocations;
use fleetcall_signaling::service::{unix_now, ControlPlane};
use fleetcall_signaling::store::StateStore;
use fleetcall_signaling::tokens::{AccessTokens, TokenRequest};
use fleetcall_signaling::ws_device::TokenCheck;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{AudioMode, Config};
use crate::{bridge, http, metrics, secrets};

/// The room of the loopback join link.
const DEMO_ROOM: &str = "demo";
/// How long the loopback join link works.
const DEMO_LINK_TTL: Duration = Duration::from_secs(2 * 3600);

/// The sockets the server listens on, bound before it starts (the media
/// plane binds its own UDP ports from the configuration).
#[derive(Debug)]
pub struct Listeners {
    /// Web client, device WebSocket, admin API, and `/metrics` unless
    /// `metrics` is set.
    pub http: TcpListener,
    /// `/metrics` on its own address.
    pub metrics: Option<TcpListener>,
    /// The device control plane (QUIC).
    pub quic: UdpSocket,
}

impl Listeners {
    /// Binds the addresses of `config`.
    pub fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let http = tcp(config.http_addr).with_context(|| format!("binding HTTP on {}", config.http_addr))?;
        let metrics = match config.metrics_addr {
            Some(addr) => Some(tcp(addr).with_context(|| format!("binding metrics on {addr}"))?),
            None => None,
        };
        let quic = UdpSocket::bind(config.quic_addr).with_context(|| format!("binding QUIC on {}", config.quic_addr))?;
        Ok(Listeners { http, metrics, quic })
    }
}

fn tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    // tokio takes it over and needs it non-blocking.
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Held by every part of the server while it runs; [`run`] waits until the
/// last one is dropped.
#[derive(Debug, Clone)]
pub struct Running {
    // Never sent on: dropping the last one is the message.
    _finished: mpsc::Sender<()>,
}

/// Tells the parts to stop, with the deadline they share.
#[derive(Debug, Clone)]
struct Stop(watch::Receiver<Option<Instant>>);

impl Stop {
    /// Resolves with the deadline once the parts must stop (also if `run`
    /// is gone).
    async fn deadline(mut self) -> Instant {
        match self.0.wait_for(Option::is_some).await {
            Ok(deadline) => deadline.unwrap_or_else(Instant::now),
            Err(_) => Instant::now(),
        }
    }

    /// Resolves once the parts must stop.
    async fn signal(self) {
        self.deadline().await;
    }
}

/// Runs a part of the server; it counts as finished when `part` returns.
fn spawn(running: &Running, part: impl Future<Output = ()> + Send + 'static) {
    let running = running.clone();
    tokio::spawn(async move {
        part.await;
        drop(running);
    });
}

/// Runs the server on `listeners` until `shutdown` resolves (SIGTERM or
/// Ctrl-C for the binary), then stops it within `config.shutdown_timeout`.
pub async fn run(config: Config, listeners: Listeners, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    secrets::ensure_data_dir(&config.data_dir)?;
    let admin_token = secrets::admin_token(&config.data_dir)?;
    // Shared state: opened (Redis must answer) but not consumed yet; the
    // controller is wired to it in the next slice of issue 13.
    let state_store = StateStore::open(&config.state).await.context("opening the state store")?;
    info!(backend = state_store.backend(), "state store open");

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
            max_tracks_per_participant: config.max_tracks_per_participant,
            max_datagram: config.max_datagram_bytes,
            dsp_queue_per_track: config.dsp_queue_per_track,
            ..SfuConfig::default()
        },
        audio_threads: config.audio_threads,
        worker_queue: config.worker_queue,
        pipeline: match config.audio_mode {
            AudioMode::Voip => PipelineConfig::default(),
            AudioMode::LowDelay => PipelineConfig::low_delay(),
        },
    })
    .context("starting the media plane")?;

    let mut names = vec![config.quic_addr.ip().to_string()];
    names.extend(config.advertise_ip.map(|ip| ip.to_string()));
    let pki = Pki::open_or_init(config.data_dir.join("pki"), &names).context("opening the installation CA")?;
    let control_config = config.controller.clone();
    let seed: [u8; 32] = rand::random();
    let now = std::time::Instant::now();
    let mut controller = Controller::new(control_config, now, seed).context("controller settings")?;
    let revocations = Revocations::open(pki.dir()).context("reading the revocation list")?;
    for (subject, at) in revocations.entries() {
        controller.handle_revoke(now, subject, *at);
    }
    let tokens = AccessTokens::open_or_init(pki.dir()).context("opening the token signing key")?;

    let (stop_all, stop) = watch::channel(None);
    let stop = Stop(stop);
    let (running, mut finished) = mpsc::channel(1);
    let running = Running { _finished: running };

    let (control, sfu_link, controller_task) = ControlPlane::new(controller);
    spawn(&running, controller_task.run(stop.clone().signal()));
    spawn(&running, bridge::run(driver.handle(), sfu_link));

    let quic_config = config.quic.clone();
    let quic_addr = listeners.quic.local_addr()?;
    let endpoint = quic::endpoint(listeners.quic, &quic_config, pki.server_tls()?).with_context(|| format!("starting QUIC on {quic_addr}"))?;
    let transports = metrics::Transports::default();
    spawn(&running, quic::serve(endpoint, quic_config, control.clone(), transports.quic.clone(), stop.clone().signal()));

    let ready = Arc::new(AtomicBool::new(true));
    let scrape = metrics::Scrape {
        sfu: driver.handle(),
        control: control.clone(),
        site: config.metrics_site.clone(),
        room_labels: config.metrics_room_labels,
        transports: transports.clone(),
    };
    if let Some(listener) = listeners.metrics {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        println!("fleetcall metrics http://{}/metrics", listener.local_addr()?);
        let scrape = scrape.clone();
        let app = axum::Router::new().route("/metrics", axum::routing::get(move || {
            let scrape = scrape.clone();
            async move { http::serve_metrics(&scrape).await }
        }));
        let stop = stop.clone().signal();
        spawn(&running, async move {
            // Nothing to do about a failed metrics server but log it.
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                warn!(error = %e, "metrics server failed");
            }
        });
    }

    let addr = listeners.http.local_addr()?;
    let scheme = if config.tls { "https" } else { "http" };
    let state = http::AppState {
        sfu: driver.handle(),
        control,
        token_check: TokenCheck::new(tokens.clone()),
        tokens: tokens.clone(),
        revocations: Arc::new(Mutex::new(revocations)),
        allowed_origins: config.allowed_origins.clone().into(),
        scheme,
        metrics: config.metrics_addr.is_none().then_some(scrape),
        ready: ready.clone(),
        admin_token: admin_token.into(),
        running: running.clone(),
    };
    let app = http::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let handle = axum_server::Handle::new();
    let mut server = axum_server::from_tcp(listeners.http)?.handle(handle.clone());
    // hyper times the headers of every request (idle keep-alive included)
    // only with a timer; the acceptor times what comes before (see
    // `http::LimitAcceptor`).
    server.http_builder().http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(config.http_limits.request_timeout);
    // The HTTP server runs until it is told to stop, unless it fails.
    let (http_ended, mut http_result) = oneshot::channel();
    if config.tls {
        let ips: Vec<_> = [Some(config.http_addr.ip()), config.advertise_ip].into_iter().flatten().collect();
        let tls = secrets::tls_config(&config.data_dir, &ips)?;
        let tls = axum_server::tls_rustls::RustlsConfig::from_config(tls);
        // No Nagle delay on control frames: an SDP answer waited ~40 ms for
        // the previous frame's ACK without it.
        let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls).acceptor(NoDelayAcceptor);
        let server = server.acceptor(http::LimitAcceptor::new(acceptor, &config.http_limits, transports.http.clone())).serve(app);
        spawn(&running, async move {
            let _ = http_ended.send(server.await);
        });
    } else {
        let server = server.acceptor(http::LimitAcceptor::new(NoDelayAcceptor, &config.http_limits, transports.http.clone())).serve(app);
        spawn(&running, async move {
            let _ = http_ended.send(server.await);
        });
    }
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let deadline = stop.deadline().await;
            handle.graceful_shutdown(Some(deadline.saturating_duration_since(Instant::now())));
        });
    }

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

    // Until told to stop, or until the HTTP server fails: then the rest
    // stops the same way and `run` returns its error.
    let failed = tokio::select! {
        () = shutdown => None,
        result = &mut http_result => Some(match result {
            Ok(Ok(())) => anyhow::anyhow!("HTTP server stopped"),
            Ok(Err(e)) => anyhow::Error::from(e).context("HTTP server failed"),
            Err(_) => anyhow::anyhow!("HTTP server task panicked"),
        }),
    };

    info!(timeout = ?config.shutdown_timeout, "shutting down");
    let deadline = Instant::now() + config.shutdown_timeout;
    ready.store(false, Ordering::Relaxed);
    // A send error means no part listens any more: all have stopped.
    let _ = stop_all.send(Some(deadline));
    // Ours is not a part: only theirs count.
    drop(running);
    if tokio::time::timeout_at(deadline, finished.recv()).await.is_err() {
        warn!("connections did not drain in time");
    }
    // Last, now that nothing feeds it: every participant is removed and the
    // workers stop (their join blocks, so off the runtime).
    let media = tokio::task::spawn_blocking(move || driver.shutdown());
    if tokio::time::timeout_at(deadline, media).await.is_err() {
        warn!("media workers did not stop in time");
    }
    // Held until here so the store lives as long as the server (nothing uses it yet).
    drop(state_store);
    info!("stopped");
    failed.map_or(Ok(()), Err)
}
