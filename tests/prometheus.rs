//! The dashboards and alert rules against a real Prometheus scraping a real
//! server during a short call.
//!
//! Three `webrtc`-crate peers talk in a named room with noise suppression on
//! (media and audio series move) while seven devices on the WebSocket device protocol
//! place calls (answered, declined, rung out, lost during setup and resumed,
//! an unknown session) so the control-plane series move. A Prometheus started
//! here scrapes the server every second. Then every PromQL expression of
//! `dashboards/*.json` and every alert rule of `dashboards/alerts.yml` (without
//! its final threshold, see dashboards/README.md) must return data, a number
//! and not just NaN: no typo'd metric name or label, no dead panel. promtool checks the rules, both configs
//! and a scrape taken during the call.
//!
//! Needs `prometheus` and `promtool` (Debian's `prometheus` package, installed
//! by `scripts/deps test`); without them the test fails and says so.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use common::webrtc_peer::Peer;
use common::Server;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// The `--metrics-site` of the server, and what `$site` becomes.
const SITE: &str = "prometheus-test";
/// Control-plane timers, short so the call scenario takes seconds.
const HEARTBEAT_SECS: &str = "1";
const RING_TIMEOUT_SECS: &str = "2";
/// Generous bounds for a busy 2-core machine; a healthy run needs a fraction.
const STEP_LIMIT: Duration = Duration::from_secs(15);
/// How long the queries may take to all return data once the call is over.
const DATA_LIMIT: Duration = Duration::from_secs(30);
/// Half a second of 20 ms frames.
const SOME_AUDIO: u64 = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_returns_data() -> anyhow::Result<()> {
    let tools = Tools::find()?;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    let alerts = dir.join("alerts.yml");
    tools.promtool(&["check", "rules"], &[&alerts], None)?;
    tools.promtool(&["check", "config"], &[&dir.join("prometheus.yml")], None)?;
    let panels = dashboard_queries(&dir)?;
    let rules_text = std::fs::read_to_string(&alerts)?;
    let rule_count = rules_text.lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    let for_count = rules_text.lines().filter(|l| l.trim_start().starts_with("for:")).count();
    ensure!(rule_count > 0 && for_count == rule_count, "every alert needs a `for:` ({rule_count} alerts, {for_count} `for:`)");

    let server = Server::start(&[
        "--suppression",
        "on",
        "--heartbeat-secs",
        HEARTBEAT_SECS,
        "--ring-timeout-secs",
        RING_TIMEOUT_SECS,
        "--metrics-site",
        SITE,
        "--metrics-room-labels",
        "true",
    ])?;
    let prometheus = Prometheus::start(&tools, &server, &alerts)?;
    prometheus.wait_ready().await?;
    println!("prometheus on {}", prometheus.addr);
    // Scraping before anything happens, so every event shows as an increase.
    prometheus.wait_scrapes(2).await?;

    // Media and control plane at once, as on a real site.
    let (peers, (mut pair, devices)) = tokio::try_join!(room_call(&server), device_calls(&server))?;
    // Each end reason above made a new series, and Prometheus counts no
    // increase for a series' first sample: end one more call once it has
    // seen them, so the failed-call share has a denominator.
    prometheus.wait_scrapes(prometheus.scrapes().await? + 1).await?;
    let [caller, callee] = &mut pair;
    declined(caller, callee).await?;

    // A scrape while the call runs, for promtool's linter.
    let scrape = common::http_get(&format!("{}/metrics", server.url), None).await?;
    tools.promtool(&["check", "metrics"], &[], Some(&scrape)).context("promtool check metrics on a scrape taken during the call")?;
    println!("/metrics during the call: {} bytes, {} lines", scrape.len(), scrape.lines().count());

    // Let Prometheus see the final state at least twice (rates need two samples).
    let scrapes = prometheus.scrapes().await?;
    prometheus.wait_scrapes(scrapes + 3).await?;

    let mut checks = Vec::new();
    for (origin, expr) in &panels {
        checks.push(Check { origin: origin.clone(), expr: expr.clone(), needs_data: true });
    }
    let rules = prometheus.rules(rule_count).await?;
    for rule in &rules {
        let name = rule["name"].as_str().unwrap_or("?");
        ensure!(["critical", "warning", "info"].contains(&rule["labels"]["severity"].as_str().unwrap_or("")), "alert {name}: severity label missing or unknown");
        for annotation in ["summary", "description"] {
            ensure!(rule["annotations"][annotation].as_str().is_some_and(|a| !a.is_empty()), "alert {name}: no {annotation} annotation");
        }
        let query = rule["query"].as_str().context("rule without query")?;
        let watched = strip_threshold(query).with_context(|| format!("alert {name}: expr is not `<expression> <comparison> <number>` at the top level: {query}"))?;
        checks.push(Check { origin: format!("alert {name} (full)"), expr: query.to_owned(), needs_data: false });
        checks.push(Check { origin: format!("alert {name} (without threshold)"), expr: watched, needs_data: true });
    }
    let results = prometheus.evaluate(&checks).await?;
    println!("{} queries returned data ({} from dashboards, {} alert rules)", results.len(), panels.len(), rules.len());

    // The rules also ran inside Prometheus every second: none may fail there.
    for rule in prometheus.rules(rule_count).await? {
        ensure!(rule["health"] == "ok", "alert {} does not evaluate: {}", rule["name"], rule["lastError"]);
    }

    for peer in peers {
        peer.leave().await?;
    }
    drop((pair, devices));
    Ok(())
}

// ---- what the dashboards and rules must look like ----------------------------

/// Every `targets[].expr` of every dashboard with the template variables
/// substituted later, keyed by "file: panel title"; checks the conventions
/// (description, datasource variable, site filter) on the way.
fn dashboard_queries(dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut queries = Vec::new();
    let mut boards = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        boards += 1;
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let board: Value = serde_json::from_str(&std::fs::read_to_string(&path)?).with_context(|| format!("{name}: not JSON"))?;
        let variables = board["templating"]["list"].as_array().with_context(|| format!("{name}: no templating"))?;
        ensure!(variables.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"), "{name}: no datasource variable");
        ensure!(variables.iter().any(|v| v["name"] == "site"), "{name}: no site variable");
        for variable in variables.iter().filter(|v| v["type"] == "query") {
            // label_values(metric, label): the metric must carry the label.
            let definition = variable["definition"].as_str().unwrap_or("");
            let (metric, label) = definition
                .strip_prefix("label_values(")
                .and_then(|rest| rest.strip_suffix(')'))
                .and_then(|args| args.split_once(','))
                .with_context(|| format!("{name}: variable {}: expected label_values(metric, label), got {definition:?}", variable["name"]))?;
            queries.push((format!("{name}: variable {}", variable["name"]), format!("count by ({}) ({}{{site=~\"$site\"}})", label.trim(), metric.trim())));
        }
        let mut panels: Vec<&Value> = board["panels"].as_array().with_context(|| format!("{name}: no panels"))?.iter().collect();
        while let Some(panel) = panels.pop() {
            let title = panel["title"].as_str().unwrap_or("?");
            ensure!(panel["description"].as_str().is_some_and(|d| d.len() > 20), "{name}: panel {title:?} has no description");
            panels.extend(panel["panels"].as_array().into_iter().flatten());
            let targets = panel["targets"].as_array().into_iter().flatten();
            if panel["type"] != "row" {
                ensure!(panel["datasource"]["uid"] == "${datasource}", "{name}: panel {title:?} does not use the datasource variable");
                ensure!(panel["targets"].as_array().is_some_and(|t| !t.is_empty()), "{name}: panel {title:?} has no query");
            }
            for target in targets {
                let expr = target["expr"].as_str().with_context(|| format!("{name}: panel {title:?}: target without expr"))?;
                ensure!(expr.contains("$site"), "{name}: panel {title:?} ignores the site variable: {expr}");
                ensure!(target["datasource"]["uid"] == "${datasource}", "{name}: panel {title:?}: a target does not use the datasource variable");
                queries.push((format!("{name}: {title} (panel {}, {})", panel["id"], target["refId"].as_str().unwrap_or("?")), expr.to_owned()));
            }
        }
    }
    ensure!(boards >= 4, "expected at least four dashboards in {}, found {boards}", dir.display());
    Ok(queries)
}

/// `<expression> <comparison> <number>` -> `<expression>`, when the
/// comparison is at the top level (outside brackets and strings).
fn strip_threshold(expr: &str) -> Option<String> {
    let expr = expr.trim_end();
    let number_start = expr.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.').len();
    if number_start == expr.len() {
        return None;
    }
    let rest = expr[..number_start].trim_end();
    let rest = rest.strip_suffix('-').map_or(rest, str::trim_end);
    let lhs = [">=", "<=", "==", "!=", ">", "<"].iter().find_map(|op| rest.strip_suffix(op))?;
    let (mut depth, mut quote) = (0i32, None);
    for c in lhs.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'' | '`') => quote = Some(c),
            (None, '(' | '[' | '{') => depth += 1,
            (None, ')' | ']' | '}') => depth -= 1,
            _ => {}
        }
    }
    (depth == 0 && quote.is_none()).then(|| lhs.trim().to_owned())
}

/// Grafana's variables -> values for an instant query now. The window covers
/// the whole test, so every event of the scenario is inside every range.
fn substitute(expr: &str, window: &str) -> anyhow::Result<String> {
    let mut out = expr.to_owned();
    for (variable, value) in [("site", SITE), ("__rate_interval", window), ("__interval", window), ("__range", window)] {
        out = out.replace(&format!("${{{variable}}}"), value).replace(&format!("${variable}"), value);
    }
    ensure!(!out.contains('$'), "unknown template variable in {expr}");
    Ok(out)
}

#[derive(Debug)]
struct Check {
    origin: String,
    expr: String,
    /// Must return at least one value that is a number, not NaN (else: must
    /// only be valid PromQL).
    needs_data: bool,
}

// ---- the call ----------------------------------------------------------------

/// Three peers in a room hear each other; one leaves (a removal), two stay
/// for the scrapes.
async fn room_call(server: &Server) -> anyhow::Result<Vec<Peer>> {
    let mut peers = Vec::new();
    for name in ["A", "B", "C"] {
        peers.push(Peer::join(server, "ward-7", name).await?);
    }
    for peer in &peers {
        peer.wait_connected(STEP_LIMIT).await?;
    }
    for peer in &peers {
        wait_audio(peer, 2 * SOME_AUDIO).await?;
    }
    let leaving = peers.pop().context("three peers")?;
    leaving.leave().await?;
    wait_audio(&peers[0], SOME_AUDIO).await?;
    Ok(peers)
}

/// Waits until `packets` more audio packets arrived from anyone. Denoised
/// audio is re-encoded, so the payload no longer names its sender and the
/// peer files it as "misrouted": count both.
async fn wait_audio(peer: &Peer, packets: u64) -> anyhow::Result<()> {
    let total = || peer.received().values().sum::<u64>() + peer.misrouted();
    let (start, deadline) = (total(), Instant::now() + STEP_LIMIT);
    while total() < start + packets {
        ensure!(Instant::now() < deadline, "{}: {} audio packets within {STEP_LIMIT:?}, expected {packets} (failures {:?})", peer.name, total() - start, peer.failures());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Device calls that end every common way, at once. Returns the devices,
/// still connected: a pair to call again, and the others.
async fn device_calls(server: &Server) -> anyhow::Result<([Device; 2], Vec<Device>)> {
    let (a, pair, c, ()) = tokio::try_join!(answered_then_hung_up(server), declined_then_rung_out(server), lost_during_setup_then_resumed(server), unknown_session(server))?;
    Ok((pair, a.into_iter().chain(c).collect()))
}

async fn answered_then_hung_up(server: &Server) -> anyhow::Result<[Device; 2]> {
    let mut caller = Device::connect(server, "kiosk-a", None).await?;
    let mut callee = Device::connect(server, "kiosk-b", None).await?;
    let call = caller.invite("kiosk-b").await?;
    callee.ring(&call).await?;
    callee.request(json!({ "accept": { "callId": call } })).await?;
    caller.request(json!({ "hangup": { "callId": call } })).await?;
    for device in [&mut caller, &mut callee] {
        device.wait_ended(&call, "END_REASON_HANGUP").await?;
    }
    Ok([caller, callee])
}

async fn declined_then_rung_out(server: &Server) -> anyhow::Result<[Device; 2]> {
    let mut caller = Device::connect(server, "kiosk-c", None).await?;
    let mut callee = Device::connect(server, "kiosk-d", None).await?;
    declined(&mut caller, &mut callee).await?;
    let call = caller.invite(&callee.id).await?;
    callee.ring(&call).await?;
    caller.wait_ended(&call, "END_REASON_RING_TIMEOUT").await?;
    Ok([caller, callee])
}

async fn declined(caller: &mut Device, callee: &mut Device) -> anyhow::Result<()> {
    let call = caller.invite(&callee.id).await?;
    callee.ring(&call).await?;
    callee.request(json!({ "decline": { "callId": call } })).await?;
    caller.wait_ended(&call, "END_REASON_DECLINED").await
}

/// The callee answers, then its control stream stops moving (it no longer
/// acks heartbeats): degraded, unreachable, connection closed, the call ends
/// with connection_lost (a convergence). It comes back and resumes.
async fn lost_during_setup_then_resumed(server: &Server) -> anyhow::Result<[Device; 2]> {
    let mut caller = Device::connect(server, "kiosk-e", None).await?;
    let mut callee = Device::connect(server, "kiosk-f", None).await?;
    let call = caller.invite("kiosk-f").await?;
    callee.ring(&call).await?;
    callee.request(json!({ "accept": { "callId": call } })).await?;
    callee.silent.store(true, Ordering::Relaxed);
    caller.wait_ended(&call, "END_REASON_CONNECTION_LOST").await?;
    callee.wait_closed().await?;
    let resume = json!({
        "sessionId": callee.welcome["sessionId"],
        "resumeToken": callee.welcome["resumeToken"],
        "lastSeq": callee.last_seq.load(Ordering::Relaxed).to_string(),
    });
    // The same token: a different credential could not take over the identity.
    let back = Device::connect_with(server, "kiosk-f", callee.token.clone(), Some(resume)).await?;
    ensure!(back.welcome["resumed"] == true, "kiosk-f did not resume: {}", back.welcome);
    Ok([caller, back])
}

/// A device resumes a session the server never had: told so, it rejoins.
async fn unknown_session(server: &Server) -> anyhow::Result<()> {
    let resume = json!({ "sessionId": "999999", "resumeToken": "AAAA", "lastSeq": "0" });
    let device = Device::connect(server, "kiosk-g", Some(resume)).await?;
    ensure!(device.welcome.get("sessionUnknown").is_some(), "expected sessionUnknown, got {}", device.welcome);
    Ok(())
}

/// A device on the WebSocket device protocol. A background task acks the
/// server's heartbeats (unless `silent`) and passes every other frame on.
struct Device {
    id: String,
    /// Its access token (a resume must prove the same credential).
    token: String,
    out: mpsc::UnboundedSender<Message>,
    frames: mpsc::UnboundedReceiver<Value>,
    /// Stop acking heartbeats: the control stream looks open but does not move.
    silent: Arc<AtomicBool>,
    /// Highest `seq` received, for `Resume.last_seq`.
    last_seq: Arc<AtomicU64>,
    /// The `welcome` (or `sessionUnknown`) frame's body.
    welcome: Value,
    next_op: u64,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Device {
    /// Connects `id` with a fresh token of its own (no rooms: devices here
    /// only place and take calls).
    async fn connect(server: &Server, id: &str, resume: Option<Value>) -> anyhow::Result<Device> {
        Device::connect_with(server, id, server.token(id, &[]), resume).await
    }

    async fn connect_with(server: &Server, id: &str, token: String, resume: Option<Value>) -> anyhow::Result<Device> {
        let (ws, _) = tokio_tungstenite::connect_async(server.ws_url(&token)).await.with_context(|| format!("{id}: connecting"))?;
        let (mut sink, mut stream) = ws.split();
        let (out, mut outbox) = mpsc::unbounded_channel::<Message>();
        let writer = tokio::spawn(async move {
            while let Some(message) = outbox.recv().await {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
        });
        let (frames_tx, frames) = mpsc::unbounded_channel();
        let silent = Arc::new(AtomicBool::new(false));
        let last_seq = Arc::new(AtomicU64::new(0));
        let reader = tokio::spawn({
            let (out, silent, last_seq) = (out.clone(), silent.clone(), last_seq.clone());
            async move {
                while let Some(Ok(message)) = stream.next().await {
                    let Message::Text(text) = message else { continue };
                    let Ok(frame) = serde_json::from_str::<Value>(&text) else { continue };
                    if let Some(seq) = frame["seq"].as_str().and_then(|s| s.parse().ok()) {
                        last_seq.fetch_max(seq, Ordering::Relaxed);
                    }
                    if let Some(hb) = frame.get("heartbeat") {
                        if !silent.load(Ordering::Relaxed) {
                            let ack = json!({ "heartbeatAck": { "seq": hb["seq"], "echoSentAtMs": hb["sentAtMs"] } });
                            let _ = out.send(Message::Text(ack.to_string().into()));
                        }
                        continue;
                    }
                    if frames_tx.send(frame).is_err() {
                        break;
                    }
                }
            }
        });
        let mut device = Device { id: id.to_owned(), token, out, frames, silent, last_seq, welcome: Value::Null, next_op: 1, tasks: [writer, reader] };
        let mut hello = json!({ "minVersion": 1, "maxVersion": 1, "softwareVersion": "prometheus-test 1" });
        if let Some(resume) = resume {
            hello["resume"] = resume;
        }
        device.send(json!({ "hello": hello }))?;
        let first = device.next(|f| f.get("welcome").is_some() || f.get("sessionUnknown").is_some() || f.get("rejected").is_some()).await?;
        device.welcome = first.get("welcome").cloned().unwrap_or(first);
        Ok(device)
    }

    fn send(&self, frame: Value) -> anyhow::Result<()> {
        self.out.send(Message::Text(frame.to_string().into())).with_context(|| format!("{}: socket closed", self.id))
    }

    /// The next frame matching `wanted`, skipping others.
    async fn next(&mut self, wanted: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + STEP_LIMIT;
        loop {
            match tokio::time::timeout_at(deadline, self.frames.recv()).await {
                Ok(Some(frame)) if wanted(&frame) => return Ok(frame),
                Ok(Some(_)) => {}
                Ok(None) => bail!("{}: socket closed while waiting", self.id),
                Err(_) => bail!("{}: no expected frame within {STEP_LIMIT:?}", self.id),
            }
        }
    }

    /// Sends a request and returns its `ack`; an error reply fails.
    async fn request(&mut self, mut body: Value) -> anyhow::Result<Value> {
        let op = self.next_op.to_string();
        self.next_op += 1;
        body["opId"] = json!(op);
        self.send(body.clone())?;
        let reply = self.next(|f| f["replyTo"] == op.as_str()).await?;
        reply.get("ack").cloned().with_context(|| format!("{}: {body} answered with {reply}", self.id))
    }

    async fn invite(&mut self, callee: &str) -> anyhow::Result<Value> {
        let ack = self.request(json!({ "invite": { "callee": callee } })).await?;
        let call = ack["callId"].clone();
        ensure!(call.is_string(), "{}: invite ack without call id: {ack}", self.id);
        Ok(call)
    }

    /// Waits for the incoming call and says the device is ringing.
    async fn ring(&mut self, call: &Value) -> anyhow::Result<()> {
        self.next(|f| f["incomingCall"]["callId"] == *call).await?;
        self.request(json!({ "ringing": { "callId": call } })).await?;
        Ok(())
    }

    async fn wait_ended(&mut self, call: &Value, reason: &str) -> anyhow::Result<()> {
        let ended = self.next(|f| f["callEnded"]["callId"] == *call).await?;
        ensure!(ended["callEnded"]["reason"] == reason, "{}: expected {reason}, got {ended}", self.id);
        Ok(())
    }

    /// Waits until the server has closed the socket.
    async fn wait_closed(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + STEP_LIMIT;
        loop {
            match tokio::time::timeout_at(deadline, self.frames.recv()).await {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(_) => bail!("{}: the server did not close the stalled connection within {STEP_LIMIT:?}", self.id),
            }
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

// ---- Prometheus and promtool -------------------------------------------------

struct Tools {
    prometheus: PathBuf,
    promtool: PathBuf,
}

impl Tools {
    /// Finds both binaries on PATH, or fails with what to install.
    fn find() -> anyhow::Result<Tools> {
        let find = |name: &str| {
            std::env::var_os("PATH")
                .into_iter()
                .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
                .map(|dir| dir.join(name))
                .find(|path| path.is_file())
                .with_context(|| format!("`{name}` is not on PATH: this test needs a real Prometheus. Install Debian's `prometheus` package (`scripts/deps test` does)"))
        };
        Ok(Tools { prometheus: find("prometheus")?, promtool: find("promtool")? })
    }

    /// Runs promtool; fails with its output unless it succeeds.
    fn promtool(&self, args: &[&str], files: &[&Path], stdin: Option<&str>) -> anyhow::Result<String> {
        let mut child = Command::new(&self.promtool)
            .args(args)
            .args(files)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running promtool")?;
        if let Some(text) = stdin {
            // Dropped at the end of the statement: promtool sees end of input.
            child.stdin.take().context("promtool stdin")?.write_all(text.as_bytes())?;
        }
        let output = child.wait_with_output()?;
        let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        ensure!(output.status.success(), "promtool {} {files:?} failed ({}):\n{said}", args.join(" "), output.status);
        println!("promtool {} {}: ok", args.join(" "), files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(" "));
        Ok(said)
    }
}

/// A Prometheus process on an ephemeral loopback port with its own storage,
/// scraping the server every second; killed and removed on drop.
struct Prometheus {
    child: Child,
    addr: String,
    dir: PathBuf,
    started: Instant,
}

impl Prometheus {
    fn start(tools: &Tools, server: &Server, alerts: &Path) -> anyhow::Result<Prometheus> {
        let dir = std::env::temp_dir().join(format!("fleetcall-prometheus-{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos()));
        std::fs::create_dir_all(&dir)?;
        let target = server.url.strip_prefix("http://").context("the test server serves plain HTTP on loopback")?;
        // The job name is the one dashboards/prometheus.yml and the rules use.
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: fleetcall\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['{target}']\n",
            alerts.display()
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        tools.promtool(&["check", "config"], &[&config_path], None)?;
        // The port is picked free, then handed over; another process could
        // take it in between, so a few tries.
        let mut last = String::new();
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let addr = format!("127.0.0.1:{port}");
            let log = std::fs::File::create(dir.join("prometheus.log"))?;
            let mut child = Command::new(&tools.prometheus)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("spawning prometheus")?;
            std::thread::sleep(Duration::from_millis(300));
            match child.try_wait()? {
                None => return Ok(Prometheus { child, addr, dir, started: Instant::now() }),
                Some(status) => last = format!("{status}: {}", std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()),
            }
        }
        bail!("prometheus did not start: {last}")
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STEP_LIMIT;
        loop {
            if let Ok((200, _)) = self.http("GET", "/-/ready", None).await {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "prometheus not ready within {STEP_LIMIT:?}: {}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Successful scrapes of the server so far.
    async fn scrapes(&self) -> anyhow::Result<u64> {
        let result = self.query(&format!("count_over_time(fleetcall_build_info{{site=\"{SITE}\"}}[1h])")).await?;
        Ok(result.first().and_then(|s| s["value"][1].as_str()).and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    async fn wait_scrapes(&self, n: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + STEP_LIMIT;
        loop {
            let done = self.scrapes().await?;
            if done >= n {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "prometheus scraped {done} times, expected {n} within {STEP_LIMIT:?}: {}", self.log());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The alerting rules as Prometheus loaded them (`name`, `query`,
    /// `health`, ...); waits until all `expected` are loaded and evaluated.
    async fn rules(&self, expected: usize) -> anyhow::Result<Vec<Value>> {
        let deadline = Instant::now() + STEP_LIMIT;
        loop {
            let (status, body) = self.http("GET", "/api/v1/rules?type=alert", None).await?;
            ensure!(status == 200, "GET /api/v1/rules: {status} {body}");
            let body: Value = serde_json::from_str(&body)?;
            let rules: Vec<Value> = body["data"]["groups"].as_array().into_iter().flatten().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()).collect();
            let evaluated = rules.iter().all(|r| r["health"] != "unknown");
            if rules.len() == expected && evaluated {
                return Ok(rules);
            }
            ensure!(Instant::now() < deadline, "prometheus loaded {} of {expected} alert rules (evaluated: {evaluated}) within {STEP_LIMIT:?}", rules.len());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Evaluates every check until all pass or [`DATA_LIMIT`] runs out (some
    /// series, such as the per-second audio samples, lag the call a little);
    /// returns each check's values.
    async fn evaluate(&self, checks: &[Check]) -> anyhow::Result<BTreeMap<String, Vec<f64>>> {
        let deadline = Instant::now() + DATA_LIMIT;
        let mut passed = BTreeMap::new();
        loop {
            let window = format!("{}s", self.started.elapsed().as_secs() + 60);
            let mut failures = Vec::new();
            let pending: Vec<&Check> = checks.iter().filter(|c| !passed.contains_key(&c.origin)).collect();
            for check in pending {
                let key = check.origin.clone();
                let expr = substitute(&check.expr, &window)?;
                match self.query(&expr).await {
                    Ok(result) => {
                        let values: Vec<f64> = result.iter().filter_map(|s| s["value"][1].as_str()).filter_map(|v| v.parse().ok()).collect();
                        if !check.needs_data || values.iter().any(|v| !v.is_nan()) {
                            passed.insert(key, values);
                        } else if result.is_empty() {
                            failures.push(format!("{}: no data for {expr}", check.origin));
                        } else {
                            failures.push(format!("{}: only NaN for {expr}", check.origin));
                        }
                    }
                    Err(e) => failures.push(format!("{}: {e:#}", check.origin)),
                }
            }
            if failures.is_empty() {
                return Ok(passed);
            }
            if Instant::now() > deadline {
                bail!("{} of {} queries failed:\n{}", failures.len(), checks.len(), failures.join("\n"));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// An instant query now; the result vector, or the API's error.
    async fn query(&self, expr: &str) -> anyhow::Result<Vec<Value>> {
        let (status, body) = self.http("POST", "/api/v1/query", Some(&format!("query={}", percent_encode(expr)))).await?;
        let body: Value = serde_json::from_str(&body).with_context(|| format!("query {expr}: status {status}, body {body}"))?;
        ensure!(body["status"] == "success", "query {expr}: {} {}", body["errorType"], body["error"]);
        Ok(body["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// HTTP/1.0 (so no chunked encoding), one connection per request.
    async fn http(&self, method: &str, path: &str, form: Option<&str>) -> anyhow::Result<(u16, String)> {
        let mut stream = tokio::net::TcpStream::connect(&self.addr).await?;
        let body = form.unwrap_or("");
        let head = format!("{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n", self.addr, body.len());
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let (head, body) = response.split_once("\r\n\r\n").context("HTTP response")?;
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("HTTP status line")?;
        Ok((status, body.to_owned()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn thresholds_strip_only_at_the_top_level() {
    assert_eq!(strip_threshold("up{job=\"fleetcall\"} < 1").as_deref(), Some("up{job=\"fleetcall\"}"));
    assert_eq!(strip_threshold("a / b > 0.05").as_deref(), Some("a / b"));
    assert_eq!(strip_threshold("histogram_quantile(0.9, x) > -35").as_deref(), Some("histogram_quantile(0.9, x)"));
    assert_eq!(strip_threshold("(a * on (site) (b == bool 0)) > 0").as_deref(), Some("(a * on (site) (b == bool 0))"));
    assert_eq!(strip_threshold("sum(rate(x[5m]))"), None);
    assert_eq!(strip_threshold("sum(x > 1)"), None);
    assert_eq!(strip_threshold("a == bool 1"), None);
    assert_eq!(strip_threshold("x{a=\"(\"} > 2").as_deref(), Some("x{a=\"(\"}"));
}
