//! Credentials of QUIC devices, with real processes: a revoked device is cut
//! off at once and stays out (also after a restart) until it is enrolled
//! again; a certificate's identity belongs to that certificate.

mod common;
mod quic_support;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Server;
use fleetcall_signaling::client::ClientEvent;
use fleetcall_signaling::pb::{CloseReason, EndReason, ErrorCode};
use fleetcall_signaling::pki::DeviceFiles;
use futures_util::{SinkExt, StreamExt};
use quic_support::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// A fresh QUIC connection with `files` is refused with `code` and closed with `close`.
async fn refused(server: &Server, files: &DeviceFiles, code: ErrorCode, close: CloseReason) -> anyhow::Result<()> {
    let mut raw = Raw::with_files(server, files).await?;
    let rejected = raw.rejected().await?;
    assert_eq!(rejected.code(), code, "{rejected:?}");
    assert_eq!(raw.close_code().await?, Some(close as u64));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_cut_off_at_once_and_stays_out_after_a_restart() -> anyhow::Result<()> {
    let mut server = Server::start(&[])?;
    let mut alice = Device::connect(&server, "alice").await?;
    let mut bob = Device::connect(&server, "bob").await?;
    let call = call_with_media(&mut alice, &mut bob).await?;

    let asked = Instant::now();
    let (status, body) = http_post(&server, "/api/devices/bob/revoke").await?;
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body)?;
    assert_eq!((reply["subject"].as_str(), reply["sessions_ended"].as_u64()), (Some("bob"), Some(1)), "{reply}");
    // Closed within a second of the request, with the reason on the wire.
    bob.expect(Duration::from_secs(1), "ended REVOKED", |e| {
        matches!(e, ClientEvent::Ended { close: CloseReason::Revoked, .. }).then_some(())
    })
    .await?;
    let cut_off = asked.elapsed();
    assert!(cut_off < Duration::from_secs(1), "{cut_off:?}");
    // The other side hears a clear end, and nothing of bob stays behind.
    let ended = alice.ended(call, PROMPT).await?;
    assert_eq!((reason(&ended), ended.by.as_str()), (EndReason::Revoked, "bob"));
    server.wait_stats(PROMPT, |s| s["participants"] == 0 && s["rooms"] == 0).await?;
    let (row, _) = wait_device(&server, "bob", PROMPT, |r| r["reachability"] == "unreachable").await?;
    assert_eq!(row["sessions"], json!([]), "{row}");

    // The same certificate cannot come back, whatever the SDK keeps trying.
    refused(&server, &bob.files, ErrorCode::CredentialRevoked, CloseReason::Revoked).await?;
    let listed = api(&server, "/api/revocations").await?;
    assert!(listed["bob"].as_u64().is_some(), "{listed}");
    drop(bob);

    // Nor after a restart: the list is in the data dir.
    server.restart(&[])?;
    let files = DeviceFiles { cert: server.data_dir.join("devices/bob.pem"), key: server.data_dir.join("devices/bob.key"), ca: server.data_dir.join("devices/ca.pem") };
    refused(&server, &files, ErrorCode::CredentialRevoked, CloseReason::Revoked).await?;
    // Alice is unaffected by it all and calls on.
    let mut alice = Device::connect_enrolled(&server, "alice", alice.files.clone()).await?;

    // Enrolled again (a replacement device), bob is back.
    let out = server.data_dir.join("reenrolled");
    let status = Command::new(env!("CARGO_BIN_EXE_fleetcall"))
        .args(["device", "enroll", "bob", "--data-dir"])
        .arg(&server.data_dir)
        .arg("--out")
        .arg(&out)
        .status()?;
    assert!(status.success());
    let fresh = DeviceFiles { cert: out.join("bob.pem"), key: out.join("bob.key"), ca: out.join("ca.pem") };
    // Its certificate may start in the next second (after the revocation).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut bob = Device::connect_enrolled(&server, "bob", fresh).await?;
    call_with_media(&mut alice, &mut bob).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_agent_stops_for_good_when_revoked() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let files = enroll(&server, "kiosk")?;
    let mut agent = Agent::spawn(&server, &files, "kiosk", &[])?;
    agent.line("registered kiosk", PROMPT).await?;
    let (status, _) = http_post(&server, "/api/devices/kiosk/revoke").await?;
    assert_eq!(status, 200);
    // It says why and exits instead of retrying a credential that cannot work.
    let (status, output) = agent.exit(PROMPT).await?;
    assert!(!status.success(), "{output:?}");
    assert!(output.iter().any(|l| l.starts_with("refused for good (CLOSE_REASON_REVOKED)")), "{output:?}");
    Ok(())
}

/// A WebSocket client for `token`: sends Hello, returns the first frame
/// that is not a heartbeat and the close code that followed (if any).
async fn ws_hello(server: &Server, token: &str) -> anyhow::Result<(Value, Option<u16>)> {
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url(token)).await?;
    let hello = json!({ "hello": { "minVersion": 1, "maxVersion": 1, "softwareVersion": "test" } });
    ws.send(Message::text(hello.to_string())).await?;
    let mut first = None;
    let mut close = None;
    while let Ok(Some(message)) = tokio::time::timeout(PROMPT, ws.next()).await {
        match message? {
            Message::Text(text) => {
                let frame: Value = serde_json::from_str(&text)?;
                if frame.get("heartbeat").is_none() && first.is_none() {
                    first = Some(frame);
                }
            }
            Message::Close(frame) => {
                close = frame.map(|f| u16::from(f.code));
                break;
            }
            _ => {}
        }
    }
    Ok((first.unwrap_or(Value::Null), close))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_belongs_to_its_certificate() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let mut alice = Device::connect(&server, "alice").await?;
    let mut bob = Device::connect(&server, "bob").await?;
    let call = call_with_media(&mut alice, &mut bob).await?;

    // A token minted for bob's id, on the WebSocket: refused, bob keeps his
    // call and its media.
    let heard = alice.heard();
    let (first, close) = ws_hello(&server, &server.token("bob", &[])).await?;
    assert_eq!(first["rejected"]["code"], "ERROR_CODE_IDENTITY_IN_USE", "{first}");
    assert_eq!(close, Some(4000 + CloseReason::IdentityInUse as u16));
    alice.hears(heard, 25, PROMPT).await?;
    let row = call_row(&server, call).await?;
    assert_eq!((row["phase"].as_str(), row["members"].as_array().map(Vec::len)), (Some("CALL_PHASE_ACTIVE"), Some(2)), "{row}");
    let (row, _) = wait_device(&server, "bob", PROMPT, |r| r["reachability"] == "online").await?;
    assert!(row["last_error"].as_str().is_some_and(|e| e.contains("different credential")), "{row}");

    // The same certificate on a second connection (the device rebooted)
    // replaces the first: the old connection closes REPLACED.
    let mut rebooted = Raw::with_files(&server, &bob.files).await?;
    let welcome = rebooted.hello().await?;
    assert_eq!(welcome.device_id, "bob");
    bob.expect(PROMPT, "close REPLACED", |e| matches!(e, ClientEvent::Disconnected { close: Some(CloseReason::Replaced), .. }).then_some(())).await?;
    let ended = alice.ended(call, PROMPT).await?;
    assert_eq!(reason(&ended), EndReason::ConnectionLost);
    rebooted.alive(1).await?;
    Ok(())
}
