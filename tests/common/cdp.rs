//! Headless Chromium driven over the DevTools protocol (a WebSocket and JSON),
//! enough to open pages and evaluate JavaScript in them.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A Chromium process and its DevTools connection; killed on drop.
pub struct Browser {
    child: Child,
    profile: PathBuf,
    socket: Socket,
    next_id: u64,
}

/// An open page: its target and DevTools session ids.
#[derive(Debug, Clone)]
pub struct Page {
    target: String,
    session: String,
}

impl Browser {
    /// Starts headless Chromium with a fake microphone and camera.
    pub async fn launch() -> anyhow::Result<Browser> {
        Self::launch_with(&[]).await
    }

    /// Like [`Browser::launch`] with extra command-line flags (e.g.
    /// `--use-file-for-fake-audio-capture=<wav>%noloop`).
    pub async fn launch_with(extra: &[String]) -> anyhow::Result<Browser> {
        let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .context("chromium is not installed (scripts/test installs it)")?;
        let profile = std::env::temp_dir().join(format!("fleetcall-chromium-{}-{}", std::process::id(), rand_suffix()));
        let mut child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream",
                "--autoplay-policy=no-user-gesture-required",
                "--remote-debugging-port=0",
            ])
            .args(extra)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning chromium")?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(30)).context("chromium did not print its DevTools address")?;
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str()).await.context("connecting to DevTools")?;
        Ok(Browser { child, profile, socket, next_id: 1 })
    }

    /// Opens `url` in a new tab.
    pub async fn open(&mut self, url: &str) -> anyhow::Result<Page> {
        let target = self.call(None, "Target.createTarget", json!({ "url": url })).await?;
        let target_id = target["targetId"].as_str().context("targetId")?.to_owned();
        let attached = self.call(None, "Target.attachToTarget", json!({ "targetId": target_id, "flatten": true })).await?;
        let session = attached["sessionId"].as_str().context("sessionId")?.to_owned();
        Ok(Page { target: target_id, session })
    }

    /// Closes the tab as a user would: the page gets `pagehide` first.
    pub async fn close(&mut self, page: &Page) -> anyhow::Result<()> {
        self.call(None, "Target.closeTarget", json!({ "targetId": page.target })).await?;
        Ok(())
    }

    /// Evaluates `expression` (awaiting a promise) and returns its JSON value.
    pub async fn eval(&mut self, page: &Page, expression: &str) -> anyhow::Result<Value> {
        let result = self
            .call(
                Some(&page.session),
                "Runtime.evaluate",
                json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
            )
            .await?;
        if let Some(exception) = result.get("exceptionDetails") {
            bail!("page threw: {exception}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Polls `expression` until it evaluates to the string `expected`; fails after `limit`.
    pub async fn wait_for(&mut self, page: &Page, expression: &str, expected: &str, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let value = self.eval(page, expression).await?;
            if value == json!(expected) {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("`{expression}` is {value}, expected {expected} within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            request["sessionId"] = json!(session);
        }
        self.socket.send(Message::Text(request.to_string().into())).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let message = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .with_context(|| format!("{method} timed out"))?
                .context("DevTools closed")??;
            let Message::Text(text) = message else { continue };
            let value: Value = serde_json::from_str(&text)?;
            if value["id"] != json!(id) {
                continue; // an event
            }
            if let Some(error) = value.get("error") {
                bail!("{method} failed: {error}");
            }
            return Ok(value["result"].clone());
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}
