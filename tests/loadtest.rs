//! The load tester against a real server it starts: a short run of a few
//! rooms, 1:1 calls and idle devices must lose nothing on loopback (within
//! a tolerance), report every figure, and leave nothing on the server; the
//! WebSocket path (named rooms on `/ws/device`) with audio slots and a fault
//! converges; a violated SLO sets the exit code.
//!
//! And the client SDK's WebSocket transport the tool's rooms run on, against
//! the same real server: a named room over `/ws/device`, a silent drop and a
//! stall that resume, refusals that end the client for good (revoked,
//! forged, expired, identity in use) on both transports, and `wss://`
//! trusting only the certificate it is given.

use std::path::PathBuf;
use std::time::Duration;

use fleetcall_loadtest::cli::{EXIT_OK, EXIT_SLO, main_with};
use fleetcall_loadtest::http;
use fleetcall_loadtest::report::{Report, from_json};
use fleetcall_loadtest::server::Server;
use fleetcall_signaling::backoff::Backoff;
use fleetcall_signaling::client::{Client, ClientConfig, ClientError, ClientEvent};
use fleetcall_signaling::grants::{Grant, RoomPattern};
use fleetcall_signaling::pb::{CloseReason, ParticipantStatus};
use fleetcall_signaling::pki::{Enrollment, Pki};
use fleetcall_signaling::service::unix_now;
use fleetcall_signaling::tokens::{AccessTokens, TokenRequest};
use tokio::sync::mpsc::UnboundedReceiver;

const BIN: &str = env!("CARGO_BIN_EXE_fleetcall");

fn out_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fleetcall-loadtest-{}-{name}.json", std::process::id()))
}

/// Runs the tool in-process; returns its exit code and the JSON report.
fn run(name: &str, args: &[&str]) -> (i32, Option<Report>) {
    let out = out_path(name);
    let _ = std::fs::remove_file(&out);
    let mut argv = vec!["fleetcall-loadtest", "--spawn", BIN, "--quiet", "--out", out.to_str().unwrap()];
    argv.extend_from_slice(args);
    let code = main_with(argv);
    let report = std::fs::read_to_string(&out).ok().map(|text| from_json(&text).expect("the report parses"));
    let _ = std::fs::remove_file(&out);
    (code, report)
}

#[test]
fn a_short_mixed_run_loses_nothing_and_leaves_nothing() {
    let (code, report) = run(
        "mixed",
        &[
            "--rooms", "3", "--per-room", "3", "--talkers", "2", "--duration", "4", "--settle", "1.5", "--ramp", "40/s",
            "--calls-per-sec", "1", "--call-secs", "1", "--answer-after", "0.1", "--idle", "4",
            "--slo", "loss=1%,leaks=0,failures=0",
        ],
    );
    let r = report.expect("a report");
    eprintln!("{}", r.table());
    assert_eq!(code, EXIT_OK, "violations: {:?}", r.slo.violations);
    // Structure: what was planned, registered and measured.
    assert_eq!(r.target, "fleetcall");
    assert_eq!(r.room_control, "quic");
    assert_eq!(r.devices, 3 * 3 + 2 * r.scenario.call_pairs() + 4);
    assert_eq!(r.registered as usize, r.devices, "every device registered");
    assert_eq!(r.failures, 0, "{:?}", r.failure_samples);
    // Every listener hears both talkers of its room (each talker hears the
    // other): 3 rooms x 2 talkers x 2 receivers.
    assert_eq!(r.media.streams, 12);
    assert!(r.media.expected > 12 * 50, "at least a second of audio per stream: {}", r.media.expected);
    let loss = r.media.loss.expect("loss measured");
    assert!(loss <= 0.01, "loss {loss} on loopback");
    assert!(r.media.worst_stream_loss <= 0.05, "worst stream {}", r.media.worst_stream_loss);
    assert_eq!(r.media.own_audio, 0, "nobody hears itself");
    assert!(r.media.matched_exact > 0 && r.media.matched_reencoded == 0, "audio passes through untouched");
    assert!(r.latency.audio_e2e.count > 100 && r.latency.audio_e2e.p99_ms.is_some());
    assert_eq!(r.latency.register.count as usize, r.devices);
    assert!(r.latency.join_to_first_audio.count >= 1);
    assert!(r.latency.invite_to_ringing.count >= 1 && r.latency.answer_to_first_audio.count >= 1);
    assert!(r.calls.0 >= 1 && r.calls.1 >= 1, "calls placed and answered: {:?}", r.calls);
    assert!(r.resources.server_cpu_pct.is_some() && r.resources.server_rss_mb.is_some());
    assert!(r.resources.server_forwarded_packets.unwrap_or(0) > 0);
    // What a forwarded packet costs, split: user and kernel time add up to
    // the total (each rounded to the ns), and the packet costs some system
    // calls and wake-ups, but not dozens (a batch holds several packets).
    let res = &r.resources;
    let (user, sys, total) = (res.server_user_us_per_packet.unwrap(), res.server_sys_us_per_packet.unwrap(), res.server_cpu_us_per_packet.unwrap());
    assert!(user >= 0.0 && sys >= 0.0 && (user + sys - total).abs() < 0.01, "{user} + {sys} != {total}");
    let calls = res.media_syscalls_per_packet.expect("the server counts its socket calls");
    assert!(calls > 0.0 && calls < 20.0, "{calls} media socket calls per forwarded packet");
    assert!(res.media_workers.is_some_and(|w| w >= 1), "media worker threads found: {:?}", res.media_workers);
    let wakeups = res.worker_wakeups_per_packet.expect("worker wake-ups from /proc");
    assert!(wakeups > 0.0 && wakeups < 20.0 && res.worker_wakeups_per_s.unwrap() > 0.0, "{wakeups} wake-ups per packet");
    assert!(res.server_switches_per_packet.unwrap() >= wakeups, "every worker wake-up is a server context switch");
    // The leak check.
    assert!(r.leak.checked && r.leak.clean, "{:?}", r.leak);
    assert_eq!(r.leak.total(), 0);
}

#[test]
fn websocket_rooms_on_audio_slots_converge_after_a_fault() {
    let (code, report) = run(
        "slots",
        &[
            "--rooms", "2", "--per-room", "6", "--talkers", "2", "--control", "ws", "--duration", "5", "--settle", "1",
            "--ramp", "40/s", "--fault", "media-drop:1@1.5+0.5", "--slo", "leaks=0,converge_max_s=3", "--seed", "1",
        ],
    );
    let r = report.expect("a report");
    eprintln!("{}", r.table());
    assert_eq!(code, EXIT_OK, "violations: {:?}", r.slo.violations);
    assert_eq!(r.room_control, "ws");
    assert_eq!(r.media.slot_rooms, 2, "rooms of 6 with 3 slots forward through slots");
    assert_eq!(r.media.uncounted_rooms, 0);
    // 2 rooms x 2 talkers x 5 listeners; the fault's victim may be a
    // talker whose streams then count only until the fault.
    assert!(r.media.streams >= 2 * 2 * 5 - 5, "streams {}", r.media.streams);
    assert!(r.media.loss.is_some_and(|l| l <= 0.01), "loss {:?}", r.media.loss);
    assert_eq!(r.faults.len(), 1);
    assert!(r.faults[0].converged_s.is_some(), "{:?}", r.faults);
    assert!(r.leak.clean, "{:?}", r.leak);
}

#[test]
fn a_violated_slo_sets_the_exit_code() {
    let (code, report) = run("slo", &["--rooms", "1", "--per-room", "2", "--duration", "2", "--settle", "0.5", "--slo", "latency_p99_ms=0"]);
    let r = report.expect("a report");
    assert_eq!(code, EXIT_SLO);
    assert!(!r.slo.passed);
    assert!(r.slo.violations[0].starts_with("latency_p99_ms"), "{:?}", r.slo.violations);
}

// ---- the SDK's WebSocket transport and permanent refusals -------------------------------------

const WAIT: Duration = Duration::from_secs(10);

/// Waits for the first event `pick` accepts; fails with what was seen.
async fn expect<T>(
    events: &mut UnboundedReceiver<ClientEvent>,
    what: &str,
    mut pick: impl FnMut(&ClientEvent) -> Option<T>,
) -> T {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(WAIT, async {
        while let Some(event) = events.recv().await {
            if let Some(found) = pick(&event) {
                return Some(found);
            }
            seen.push(event);
        }
        None
    })
    .await;
    match found {
        Ok(Some(found)) => found,
        Ok(None) => panic!("{what}: the client stopped; seen {seen:#?}"),
        Err(_) => panic!("{what}: not within {WAIT:?}; seen {seen:#?}"),
    }
}

/// After `Ended` nothing follows: the client stopped, its event stream ends.
async fn expect_stopped(events: &mut UnboundedReceiver<ClientEvent>, who: &str) {
    match tokio::time::timeout(WAIT, events.recv()).await {
        Ok(None) => {}
        Ok(Some(event)) => panic!("{who}: an event after Ended: {event:?}"),
        Err(_) => panic!("{who}: still running {WAIT:?} after Ended"),
    }
}

fn token(tokens: &AccessTokens, identity: &str, rooms: &[&str], ttl: Duration, now: u64) -> String {
    let rooms = rooms.iter().map(|r| RoomPattern::parse(r).unwrap()).collect();
    let request = TokenRequest { identity: identity.into(), ttl, grant: Grant::device(rooms), guest: false };
    tokens.mint(&request, now).unwrap()
}

fn ws_config(server: &Server, token: String) -> ClientConfig {
    let mut config = ClientConfig::websocket(server.ws_url(), token);
    config.backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    config
}

async fn connect(config: ClientConfig, who: &str) -> (Client, UnboundedReceiver<ClientEvent>) {
    let (client, mut events) = Client::connect(config).await.unwrap_or_else(|e| panic!("{who}: {e}"));
    expect(&mut events, who, |e| matches!(e, ClientEvent::Connected { resumed: false, .. }).then_some(())).await;
    (client, events)
}

async fn revoke(server: &Server, id: &str) {
    let url = format!("{}/api/devices/{id}/revoke", server.http);
    let response = http::request("POST", &url, Some(&server.admin_token), None, WAIT).await.unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
}

/// A connect refused for good fails at once with `Ended` and its reason.
async fn refused(config: ClientConfig) -> (CloseReason, String) {
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(WAIT, Client::connect(config)).await.expect("connect returns, it does not retry");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    match result {
        Err(ClientError::Ended { close, reason }) => (close, reason),
        Err(other) => panic!("expected Ended, got {other:?}"),
        Ok(_) => panic!("expected Ended, got a session"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_over_websocket_joins_a_room_resumes_and_ends_for_good_when_refused() {
    let bin = PathBuf::from(BIN);
    let mut server = Server::spawn(&bin, &[], None, None).await.expect("the server starts");
    let tokens = AccessTokens::open_or_init(&server.data_dir.join("pki")).unwrap();
    let day = Duration::from_secs(24 * 3600);
    let now = unix_now();

    // Two devices meet in a named room over WebSocket.
    let (alice, mut alice_events) =
        connect(ws_config(&server, token(&tokens, "ws-alice", &["ward-*"], day, now)), "alice").await;
    let (bob, mut bob_events) =
        connect(ws_config(&server, token(&tokens, "ws-bob", &["ward-3"], day, now)), "bob").await;
    assert!(alice.status().local_addr.is_some_and(|a| a.ip().is_loopback()), "{:?}", alice.status());
    let call = alice.room_join("ward-3").await.expect("alice joins");
    let state = expect(&mut alice_events, "alice's call state", |e| match e {
        ClientEvent::CallState(s) if s.call_id == call.0 => Some(s.clone()),
        _ => None,
    })
    .await;
    assert_eq!(state.group_name, "ward-3");
    assert!(
        state.participants.iter().any(|p| p.device_id == "ws-alice" && p.status == ParticipantStatus::Joining as i32),
        "{state:?}"
    );
    assert_eq!(bob.room_join("ward-3").await.expect("bob joins"), call, "one room, one call");
    expect(&mut alice_events, "alice hears of bob", |e| {
        matches!(e, ClientEvent::ParticipantUpdate(u) if u.call_id == call.0 && u.device_id == "ws-bob").then_some(())
    })
    .await;
    // Outside the grant: refused, the session goes on.
    let forbidden = bob.room_join("lobby").await.expect_err("lobby is not bob's");
    assert!(
        matches!(forbidden, ClientError::Refused { code: fleetcall_signaling::pb::ErrorCode::Forbidden, .. }),
        "{forbidden:?}"
    );

    // A silent drop: the client reconnects and resumes the same session.
    let session = alice.session().expect("a session");
    alice.simulate_drop();
    expect(&mut alice_events, "alice loses the link", |e| matches!(e, ClientEvent::Disconnected { .. }).then_some(()))
        .await;
    let resumed = expect(&mut alice_events, "alice resumes", |e| match e {
        ClientEvent::Connected { session, resumed, .. } => Some((*session, *resumed)),
        _ => None,
    })
    .await;
    assert_eq!(resumed, (session, true));
    // Requests still work on the new socket (the room is still hers).
    alice.group_leave(call).await.expect("alice leaves");
    assert!(matches!(alice.rebind().await, Err(ClientError::Unsupported(_))), "no socket migration on TCP");

    // Another credential for alice's identity: refused, alice keeps hers.
    let (close, reason) = refused(ws_config(&server, token(&tokens, "ws-alice", &["ward-3"], day, now))).await;
    assert_eq!(close, CloseReason::IdentityInUse, "{reason}");
    assert!(alice.status().connected);

    // Revoked while connected: bob hears `Ended` once and stops; his pending
    // request fails with the same reason; his token no longer connects.
    let pending = bob.room_join("ward-3");
    revoke(&server, "ws-bob").await;
    let ended = expect(&mut bob_events, "bob is ended", |e| match e {
        ClientEvent::Ended { close, .. } => Some(*close),
        ClientEvent::Disconnected { .. } => panic!("a permanent close is not a disconnect"),
        _ => None,
    })
    .await;
    assert_eq!(ended, CloseReason::Revoked);
    expect_stopped(&mut bob_events, "bob").await;
    match pending.await {
        // Answered before the revocation arrived, or failed by it.
        Ok(_) | Err(ClientError::Ended { close: CloseReason::Revoked, .. }) => {}
        Err(other) => panic!("bob's request: {other:?}"),
    }
    assert!(matches!(bob.room_join("ward-3").await, Err(ClientError::Stopped)));
    let (close, _) = refused(ws_config(&server, token(&tokens, "ws-bob", &["ward-3"], day, now))).await;
    assert_eq!(close, CloseReason::Revoked);

    // Forged and expired tokens are refused at the first connect.
    let forged = AccessTokens::from_secret(&[7; 32]);
    let (close, _) = refused(ws_config(&server, token(&forged, "ws-carol", &["ward-3"], day, now))).await;
    assert_eq!(close, CloseReason::Unauthenticated);
    let (close, _) =
        refused(ws_config(&server, token(&tokens, "ws-carol", &["ward-3"], Duration::from_secs(1), now - 60))).await;
    assert_eq!(close, CloseReason::CredentialExpired);

    // QUIC: a revoked certificate ends the client the same way.
    let pki = Pki::open_or_init(server.data_dir.join("pki"), &[]).unwrap();
    let files = pki.enroll("quic-dave", &server.data_dir.join("sdk-devices"), &Enrollment::default()).unwrap();
    let quic = || {
        let mut config =
            ClientConfig::from_files(server.quic, "localhost", &files.ca, &files.cert, &files.key).unwrap();
        config.backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        config
    };
    let (_dave, mut dave_events) = connect(quic(), "dave").await;
    revoke(&server, "quic-dave").await;
    let ended = expect(&mut dave_events, "dave is ended", |e| match e {
        ClientEvent::Ended { close, .. } => Some(*close),
        ClientEvent::Disconnected { .. } => panic!("a permanent close is not a disconnect"),
        _ => None,
    })
    .await;
    assert_eq!(ended, CloseReason::Revoked);
    expect_stopped(&mut dave_events, "dave").await;
    let (close, _) = refused(quic()).await;
    assert_eq!(close, CloseReason::Revoked);

    // A stall past the server's heartbeat timeout (3 missed 2 s intervals,
    // counted from its first unanswered heartbeat): once it reads again,
    // alice learns why the server closed, and resumes.
    alice.simulate_stall(true);
    tokio::time::sleep(Duration::from_secs(9)).await;
    alice.simulate_stall(false);
    let close = expect(&mut alice_events, "alice's stall is noticed", |e| match e {
        ClientEvent::Disconnected { close, .. } => Some(*close),
        _ => None,
    })
    .await;
    assert_eq!(close, Some(CloseReason::HeartbeatTimeout));
    let resumed = expect(&mut alice_events, "alice resumes after the stall", |e| match e {
        ClientEvent::Connected { session, resumed, .. } => Some((*session, *resumed)),
        _ => None,
    })
    .await;
    assert_eq!(resumed, (session, true));

    alice.close().await;
    server.stop();
}

/// A server on HTTPS (`--tls on`, its self-signed certificate) stopped on drop.
struct HttpsServer {
    child: std::process::Child,
    dir: PathBuf,
    port: u16,
}

impl HttpsServer {
    fn start() -> HttpsServer {
        let free = |udp: bool| {
            if udp {
                std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
            } else {
                std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
            }
        };
        let (port, quic) = (free(false), free(true));
        let dir = std::env::temp_dir().join(format!("fleetcall-loadtest-wss-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let child = std::process::Command::new(BIN)
            .args(["serve", "--tls", "on", "--media-port", "0"])
            .args(["--http-addr", &format!("127.0.0.1:{port}"), "--quic-addr", &format!("127.0.0.1:{quic}")])
            .arg("--data-dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting the server");
        let server = HttpsServer { child, dir, port };
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() || !server.dir.join("tls/cert.pem").exists() {
            assert!(started.elapsed() < WAIT, "the HTTPS server did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_over_wss_trusts_only_the_certificate_it_is_given() {
    let server = HttpsServer::start();
    let tokens = AccessTokens::open_or_init(&server.dir.join("pki")).unwrap();
    let token = token(&tokens, "wss-erin", &["ward-3"], Duration::from_secs(3600), unix_now());
    let url = format!("wss://localhost:{}/ws/device", server.port);
    let config =
        ClientConfig::websocket(url.clone(), token.clone()).trusting(&server.dir.join("tls/cert.pem")).unwrap();
    let (erin, _events) = connect(config, "erin").await;
    erin.room_join("ward-3").await.expect("erin joins over wss");
    erin.close().await;

    // Without the certificate there is nothing to trust; with another, TLS fails.
    let error = Client::connect(ClientConfig::websocket(url.clone(), token.clone())).await.expect_err("no trust");
    assert!(matches!(&error, ClientError::Connect { reason, .. } if reason.contains("trust")), "{error:?}");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap().cert.pem();
    let other_path = server.dir.join("other.pem");
    std::fs::write(&other_path, other).unwrap();
    let config = ClientConfig::websocket(url, token).trusting(&other_path).unwrap();
    let error = Client::connect(config).await.expect_err("a certificate nobody trusts");
    assert!(matches!(&error, ClientError::Connect { reason, .. } if reason.contains("TLS")), "{error:?}");
}
