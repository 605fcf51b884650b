//! Shared helpers for the end-to-end tests: a real `fleetcall` server process
//! on loopback with a fresh data dir and ephemeral ports.

#![allow(dead_code)]

pub mod cdp;
pub mod webrtc_peer;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fleetcall_signaling::grants::{Grant, RoomPattern};
use fleetcall_signaling::tokens::{AccessTokens, TokenRequest};

/// A running server; killed on drop.
pub struct Server {
    pub child: Child,
    /// e.g. `http://127.0.0.1:40123`, without a trailing slash.
    pub url: String,
    /// The device control plane (QUIC) address.
    pub quic_addr: std::net::SocketAddr,
    pub data_dir: PathBuf,
    pub admin_token: String,
    /// The zero-configuration guest link the server printed (loopback only).
    pub join_link: Option<String>,
}

impl Server {
    /// Starts `fleetcall serve` with `extra` flags and waits until it serves.
    pub fn start(extra: &[&str]) -> anyhow::Result<Server> {
        let data_dir = std::env::temp_dir().join(format!(
            "fleetcall-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos()
        ));
        Server::start_in(data_dir, extra)
    }

    /// Kills the server and starts a new one on the same data dir (new
    /// ports), as an operator's restart would.
    pub fn restart(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let fresh = Server::start_in(self.data_dir.clone(), extra)?;
        // `fresh` takes over the process; the old value must not delete the
        // data dir when it is dropped by the swap below.
        let old = std::mem::replace(self, fresh);
        std::mem::forget(old);
        Ok(())
    }

    /// Starts `fleetcall serve` on `data_dir` (created if missing).
    pub fn start_in(data_dir: PathBuf, extra: &[&str]) -> anyhow::Result<Server> {
        Server::launch(data_dir, &["--http-addr", "127.0.0.1:0", "--media-port", "0", "--quic-addr", "127.0.0.1:0"], extra)
    }

    /// Starts `fleetcall serve` listening where `listen` says (the
    /// `--http-addr`, `--media-*` and `--quic-addr` flags), then `extra`.
    pub fn launch(data_dir: PathBuf, listen: &[&str], extra: &[&str]) -> anyhow::Result<Server> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleetcall"))
            .arg("serve")
            .args(listen)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning fleetcall")?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut quic_addr = None;
        let mut join_link = None;
        let url = loop {
            let Some(line) = lines.next() else {
                let status = child.wait()?;
                bail!("fleetcall exited before serving: {status}");
            };
            let line = line?;
            if let Some(addr) = line.strip_prefix("fleetcall quic ") {
                quic_addr = Some(addr.trim().parse()?);
            }
            if let Some(link) = line.strip_prefix("fleetcall join ") {
                join_link = Some(link.trim().to_owned());
            }
            if let Some(url) = line.strip_prefix("fleetcall serving ") {
                break url.trim_end_matches('/').to_owned();
            }
        };
        let quic_addr = quic_addr.context("fleetcall printed no QUIC address")?;
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let admin_token = std::fs::read_to_string(data_dir.join("admin-token"))?.trim().to_owned();
        Ok(Server { child, url, quic_addr, data_dir, admin_token, join_link })
    }

    /// The device protocol WebSocket URL with `token`.
    pub fn ws_url(&self, token: &str) -> String {
        format!("{}/ws/device?token={token}", self.url.replacen("http", "ws", 1))
    }

    /// The server's token signing key (the test runs on the server's machine).
    pub fn tokens(&self) -> AccessTokens {
        AccessTokens::open_or_init(&self.data_dir.join("pki")).expect("the server's signing key")
    }

    /// An access token for `identity`: the named `rooms` (names or
    /// `prefix*`), publish and subscribe, one hour.
    pub fn token(&self, identity: &str, rooms: &[&str]) -> String {
        self.token_with(identity, rooms, true, Duration::from_secs(3600))
    }

    /// An access token with every setting explicit.
    pub fn token_with(&self, identity: &str, rooms: &[&str], publish: bool, ttl: Duration) -> String {
        self.token_issued(identity, rooms, publish, ttl, unix_now())
    }

    /// A genuine token for `identity` and `rooms` that expired an hour ago.
    pub fn expired_token(&self, identity: &str, rooms: &[&str]) -> String {
        self.token_issued(identity, rooms, true, Duration::from_secs(60), unix_now() - 3600)
    }

    /// An access token issued at `issued_at` (Unix seconds).
    pub fn token_issued(&self, identity: &str, rooms: &[&str], publish: bool, ttl: Duration, issued_at: u64) -> String {
        let grant = Grant {
            rooms: rooms.iter().map(|r| RoomPattern::parse(r).expect("room pattern")).collect(),
            publish,
            subscribe: true,
        };
        let request = TokenRequest { identity: identity.into(), ttl, grant, guest: false };
        self.tokens().mint(&request, issued_at).expect("token")
    }

    /// `GET /api/stats` as JSON.
    pub async fn stats(&self) -> anyhow::Result<serde_json::Value> {
        let body = http_get(&format!("{}/api/stats", self.url), Some(&self.admin_token)).await?;
        Ok(serde_json::from_str(&body)?)
    }

    /// Polls the stats until `done` holds; returns the last stats and when.
    pub async fn wait_stats(
        &self,
        limit: Duration,
        mut done: impl FnMut(&serde_json::Value) -> bool,
    ) -> anyhow::Result<(serde_json::Value, Duration)> {
        let start = Instant::now();
        loop {
            let stats = self.stats().await?;
            if done(&stats) {
                return Ok((stats, start.elapsed()));
            }
            if start.elapsed() > limit {
                bail!("stats did not converge in {limit:?}: {stats}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// Seconds since the Unix epoch, as tokens count time.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs()
}

/// Base64url without padding, as JWTs spell their parts (for forging).
pub fn base64url_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The inverse of [`base64url_encode`]; empty for text that is not base64url.
pub fn base64url_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).unwrap_or_default()
}

/// Sends SIGTERM with the shell's builtin `kill` (a fresh Debian may lack
/// the procps `kill` binary); true if delivered.
pub fn sigterm(pid: u32) -> std::io::Result<bool> {
    Ok(Command::new("sh").arg("-c").arg(format!("kill -TERM {pid}")).status()?.success())
}

/// A minimal HTTP/1.1 GET over a fresh TCP connection; returns the body of a 200.
pub async fn http_get(url: &str, bearer: Option<&str>) -> anyhow::Result<String> {
    let (status, body) = http_get_status(url, bearer).await?;
    if status != 200 {
        bail!("GET {url}: status {status}");
    }
    Ok(body)
}

/// Like [`http_get`], but returns the status code and body of any response.
pub async fn http_get_status(url: &str, bearer: Option<&str>) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").context("http URL")?;
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    let auth = bearer.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").context("HTTP response")?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).with_context(|| format!("GET {url}: bad status line"))?;
    Ok((status, body.to_owned()))
}
