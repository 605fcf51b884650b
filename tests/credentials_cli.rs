//! Minting and ending credentials the way an operator does: the CLI and the
//! admin API against a real server, with their bad input.

mod common;
mod quic_support;

use std::path::Path;
use std::process::{Command, Output};

use common::Server;
use fleetcall_signaling::client::ClientError;
use fleetcall_signaling::pb::ErrorCode;
use fleetcall_signaling::pki::DeviceFiles;
use quic_support::*;
use serde_json::Value;

fn fleetcall(args: &[&str], data_dir: &Path) -> anyhow::Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_fleetcall")).args(args).arg("--data-dir").arg(data_dir).output()?)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// `POST path` with a JSON body and the admin token.
async fn post_json(server: &Server, path: &str, body: &str) -> anyhow::Result<(u16, Value)> {
    let (status, text) = http_request(server, "POST", path, body).await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_minted_by_the_cli_and_the_api_open_their_rooms_only() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let tokens = server.tokens();
    let now = common::unix_now();

    let cli = fleetcall(&["token", "create", "--room", "ward-3", "--room", "lab-*", "--identity", "Nurse A", "--ttl", "8h"], &server.data_dir)?;
    assert!(cli.status.success(), "{cli:?}");
    let verified = tokens.verify(&stdout(&cli), now)?;
    assert_eq!(verified.credential.identity.as_str(), "Nurse A");
    assert_eq!(verified.credential.grant.rooms.iter().map(ToString::to_string).collect::<Vec<_>>(), ["ward-3", "lab-*"]);
    assert!(verified.credential.grant.publish);
    assert!(verified.credential.expires_at.abs_diff(now + 8 * 3600) < 60);
    let listen = fleetcall(&["token", "create", "--room", "ward-3", "--identity", "Visitor", "--subscribe-only"], &server.data_dir)?;
    assert!(!tokens.verify(&stdout(&listen), now)?.credential.grant.publish);

    let (status, body) = post_json(&server, "/api/tokens", r#"{"identity":"Nurse B","rooms":["ward-3"],"ttl":"30m"}"#).await?;
    assert_eq!(status, 200, "{body}");
    let api = tokens.verify(body["token"].as_str().unwrap_or_default(), now)?;
    assert_eq!((api.credential.identity.as_str(), body["expires_at"].as_u64()), ("Nurse B", Some(api.credential.expires_at)));

    // The token works where it should and nowhere else.
    let url = server.url.replacen("http", "ws", 1) + "/ws/device";
    let config = fleetcall_signaling::client::ClientConfig::websocket(&url, body["token"].as_str().unwrap_or_default());
    let (client, _events) = fleetcall_signaling::client::Client::connect(config).await?;
    assert!(client.room_join("ward-3").await.is_ok());
    let ward4 = client.room_join("ward-4").await;
    assert!(matches!(ward4, Err(ClientError::Refused { code: ErrorCode::Forbidden | ErrorCode::AlreadyInCall, .. })), "{ward4:?}");
    client.close().await;

    // Bad input: a clear error, and nothing minted.
    for (args, needle) in [
        (vec!["token", "create", "--room", "ward 3", "--identity", "x"], "ward 3"),
        (vec!["token", "create", "--room", "ward-3", "--identity", ""], "identity"),
        (vec!["token", "create", "--room", "ward-3", "--identity", "x", "--ttl", "0s"], "lifetime"),
        (vec!["token", "create", "--room", "ward-3", "--identity", "x", "--ttl", "9999d"], "lifetime"),
        (vec!["token", "create", "--room", "ward-3", "--identity", "x", "--ttl", "soon"], "soon"),
        (vec!["token", "create", "--identity", "x"], "--room"),
    ] {
        let out = fleetcall(&args, &server.data_dir)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stdout(&out).is_empty() && stderr.contains(needle), "{args:?}: {stderr}");
    }
    for body in [
        r#"{"identity":"x","rooms":["ward 3"]}"#,
        r#"{"identity":"","rooms":["ward-3"]}"#,
        r#"{"identity":"x","rooms":["ward-3"],"ttl":"forever"}"#,
        r#"{"identity":"x","rooms":["ward-3"],"publish":true}"#,
        "not json",
    ] {
        let (status, reply) = post_json(&server, "/api/tokens", body).await?;
        assert_eq!(status, 400, "{body}: {reply}");
        assert!(reply.get("token").is_none() && reply.get("error").is_some(), "{body}: {reply}");
    }
    // Without the admin token there is no token.
    let (status, _) = common::http_get_status(&format!("{}/api/tokens", server.url), None).await?;
    assert!(status == 401 || status == 405, "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revoke_command_goes_through_the_server_or_the_data_dir() -> anyhow::Result<()> {
    let mut server = Server::start(&[])?;
    let mut bed = Device::connect(&server, "bed-7").await?;
    let out = fleetcall(&["device", "revoke", "bed-7", "--server", &server.url], &server.data_dir)?;
    assert!(out.status.success(), "{out:?}");
    let reply: Value = serde_json::from_str(&stdout(&out))?;
    assert_eq!(reply["sessions_ended"], 1, "{reply}");
    bed.expect(PROMPT, "ended", |e| matches!(e, fleetcall_signaling::client::ClientEvent::Ended { .. }).then_some(())).await?;

    // With no server running, the command writes the list the next server
    // reads.
    let files = enroll(&server, "bed-8")?;
    let data_dir = server.data_dir.clone();
    let _ = server.child.kill();
    let _ = server.child.wait();
    let out = fleetcall(&["device", "revoke", "bed-8", "--server", &server.url], &data_dir)?;
    assert!(out.status.success() && stdout(&out).contains("no server"), "{out:?}");
    server.restart(&[])?;
    let mut raw = Raw::with_files(&server, &files).await?;
    assert_eq!(raw.rejected().await?.code(), ErrorCode::CredentialRevoked);
    // Garbage in: an identity that is not one.
    let out = fleetcall(&["device", "revoke", &"x".repeat(200), "--server", &server.url], &server.data_dir)?;
    assert!(!out.status.success(), "{out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrollment_grant_opens_its_room_to_a_device() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let out_dir = server.data_dir.join("wall");
    let out = Command::new(env!("CARGO_BIN_EXE_fleetcall"))
        .args(["device", "enroll", "wall-3", "--room", "ward-3", "--validity", "30d", "--data-dir"])
        .arg(&server.data_dir)
        .arg("--out")
        .arg(&out_dir)
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let files = DeviceFiles { cert: out_dir.join("wall-3.pem"), key: out_dir.join("wall-3.key"), ca: out_dir.join("ca.pem") };
    let wall = Device::connect_enrolled(&server, "wall-3", files).await?;
    let plain = Device::connect(&server, "bed-1").await?;
    let call = wall.client.room_join("ward-3").await?;
    let refused = plain.client.room_join("ward-3").await;
    assert!(matches!(refused, Err(ClientError::Refused { code: ErrorCode::Forbidden, .. })), "{refused:?}");
    let other = wall.client.room_join("ward-4").await;
    assert!(matches!(other, Err(ClientError::Refused { code: ErrorCode::Forbidden, .. })), "{other:?}");
    let row = call_row(&server, call).await?;
    assert_eq!((row["kind"].as_str(), row["name"].as_str()), (Some("CALL_KIND_ROOM"), Some("ward-3")), "{row}");
    // A validity that is not one is refused at enrollment.
    let bad = Command::new(env!("CARGO_BIN_EXE_fleetcall"))
        .args(["device", "enroll", "wall-4", "--validity", "0s", "--data-dir"])
        .arg(&server.data_dir)
        .arg("--out")
        .arg(&out_dir)
        .output()?;
    assert!(!bad.status.success() && !out_dir.join("wall-4.pem").exists(), "{bad:?}");
    Ok(())
}
