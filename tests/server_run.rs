//! `server::run` inside the test's own process: the server the binary runs,
//! on listeners the test bound, stopped by a future the test resolves. A
//! device SDK client registers over the WebSocket with a token and joins a
//! room; resolving the shutdown future closes it with SHUTDOWN and `run`
//! returns within its deadline, after which nothing listens any more.

mod common;

use std::time::{Duration, Instant};

use anyhow::Context;
use fleetcall::config::{Config, ServeArgs};
use fleetcall::server::{self, Listeners};
use fleetcall_signaling::client::{Client, ClientConfig, ClientEvent};
use fleetcall_signaling::grants::{Grant, RoomPattern};
use fleetcall_signaling::pb::CloseReason;
use fleetcall_signaling::service::unix_now;
use fleetcall_signaling::tokens::{AccessTokens, TokenRequest};
use tokio::sync::{mpsc, oneshot};

/// The server's shutdown deadline.
const DEADLINE: Duration = Duration::from_secs(2);
/// Generous bounds for a busy 2-core machine.
const LIMIT: Duration = Duration::from_secs(15);

async fn next_event(events: &mut mpsc::UnboundedReceiver<ClientEvent>, what: &str, mut want: impl FnMut(&ClientEvent) -> bool) -> anyhow::Result<ClientEvent> {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv()).await.with_context(|| format!("waiting for {what}"))?;
        let event = event.with_context(|| format!("the client ended before {what}"))?;
        if want(&event) {
            return Ok(event);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_devices_and_stops_when_its_shutdown_future_resolves() -> anyhow::Result<()> {
    let data_dir = std::env::temp_dir().join(format!("fleetcall-server-run-{}", std::process::id()));
    let args = ServeArgs {
        data_dir: Some(data_dir.clone()),
        http_addr: Some("127.0.0.1:0".parse()?),
        quic_addr: Some("127.0.0.1:0".parse()?),
        media_port: Some(0),
        shutdown_timeout_secs: Some(DEADLINE.as_secs_f64()),
        ..ServeArgs::default()
    };
    let config = Config::load(args)?;
    let listeners = Listeners::bind(&config)?;
    let http = listeners.http.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(server::run(config, listeners, async move {
        let _ = stopped.await;
    }));

    // Ready once every part is up (the listener accepts before that).
    let started = Instant::now();
    while common::http_get_status(&format!("http://{http}/readyz"), None).await.map(|(status, _)| status).ok() != Some(200) {
        anyhow::ensure!(started.elapsed() < LIMIT, "the server never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The server made the signing key in its data dir; the test mints with it.
    let tokens = AccessTokens::open_or_init(&data_dir.join("pki"))?;
    let grant = Grant { rooms: vec![RoomPattern::parse("ward-7")?], publish: true, subscribe: true };
    let token = tokens.mint(&TokenRequest { identity: "bed-1".into(), ttl: Duration::from_secs(600), grant, guest: false }, unix_now())?;
    let (client, mut events) = Client::connect(ClientConfig::websocket(format!("ws://{http}/ws/device"), token)).await?;
    next_event(&mut events, "the session", |e| matches!(e, ClientEvent::Connected { .. })).await?;
    client.room_join("ward-7").await.context("joining the granted room")?;
    assert!(client.room_join("ward-8").await.is_err(), "a room outside the grant is refused");

    let _ = stop.send(());
    let stopping = Instant::now();
    let closed = next_event(&mut events, "the shutdown close", |e| matches!(e, ClientEvent::Disconnected { .. })).await?;
    let ClientEvent::Disconnected { close, .. } = closed else { unreachable!() };
    assert_eq!(close, Some(CloseReason::Shutdown), "the device is told why");
    drop(client);

    let result = tokio::time::timeout(LIMIT, server).await.context("run did not return")??;
    result.context("run returned an error")?;
    // The deadline, plus the margin a busy machine needs.
    assert!(stopping.elapsed() < DEADLINE + Duration::from_secs(5), "run took {:?}", stopping.elapsed());
    assert!(tokio::net::TcpStream::connect(http).await.is_err(), "nothing listens after run returned");
    std::fs::remove_dir_all(&data_dir).ok();
    Ok(())
}

/// `state_backend = redis` means Redis or nothing: a Redis that does not
/// answer stops the start with a clear error, well within its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_to_start_when_the_configured_redis_does_not_answer() -> anyhow::Result<()> {
    // A port nobody listens on any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let data_dir = std::env::temp_dir().join(format!("fleetcall-server-run-redis-{}", std::process::id()));
    let args = ServeArgs {
        data_dir: Some(data_dir.clone()),
        http_addr: Some("127.0.0.1:0".parse()?),
        quic_addr: Some("127.0.0.1:0".parse()?),
        media_port: Some(0),
        state_backend: Some(fleetcall::config::StateBackend::Redis),
        redis_url: Some(format!("redis://{closed}/")),
        ..ServeArgs::default()
    };
    let config = Config::load(args)?;
    let listeners = Listeners::bind(&config)?;
    let started = Instant::now();
    let result = tokio::time::timeout(LIMIT, server::run(config, listeners, std::future::pending())).await.context("run did not return")?;
    let error = format!("{:#}", result.expect_err("the server must not start without its Redis"));
    assert!(error.contains("state store") && error.contains("unavailable"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5), "refused after {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(())
}
