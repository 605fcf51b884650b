//! The server under test: reached by its addresses, or started by the tool
//! (`--spawn`), which then knows its pid and can restart it. Reads the
//! admin API, `/metrics`, and the process's CPU and memory from `/proc`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::http;

/// Linux reports process CPU times in ticks of 1/100 s (USER_HZ).
const TICKS_PER_SEC: f64 = 100.0;
/// Page size for `/proc/<pid>/statm`.
const PAGE_BYTES: u64 = 4096;

/// CPU and memory of a process at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// User + system CPU seconds since the process started.
    pub cpu_secs: f64,
    /// Of those, in the kernel (system calls; on loopback also the
    /// delivery of the datagrams it sends to the receiving sockets).
    pub sys_secs: f64,
    /// Resident memory.
    pub rss_bytes: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/statm`; `None` if the process is gone.
pub fn proc_sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 2..)?
        .split_whitespace()
        .collect();
    // After the name: state is field 3, utime 14 and stime 15 (1-based).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(ProcSample {
        cpu_secs: (utime + stime) / TICKS_PER_SEC,
        sys_secs: stime / TICKS_PER_SEC,
        rss_bytes: resident * PAGE_BYTES,
    })
}

/// Context switches of a process's threads since they started, from
/// `/proc/<pid>/task/*/status`: each voluntary one is a sleep that ended in
/// a wake-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Switches {
    /// Every thread, voluntary and involuntary.
    pub all: u64,
    /// Voluntary switches of the media workers (threads named `sfu-worker-N`):
    /// their wake-ups.
    pub worker_wakeups: u64,
    /// Media worker threads found.
    pub workers: usize,
}

/// Reads the context switches of every thread of `pid`; `None` if the
/// process is gone.
pub fn thread_switches(pid: u32) -> Option<Switches> {
    let mut switches = Switches::default();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        // A thread may end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        let count = |name| status_field(&status, name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let voluntary = count("voluntary_ctxt_switches:");
        switches.all += voluntary + count("nonvoluntary_ctxt_switches:");
        if status_field(&status, "Name:").is_some_and(|n| n.starts_with("sfu-worker")) {
            switches.worker_wakeups += voluntary;
            switches.workers += 1;
        }
    }
    Some(switches)
}

/// The value of one `Name:\tvalue` line of a `/proc` status file.
fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim)
}

/// Series of interest from `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MetricsSample {
    /// `fleetcall_process_cpu_seconds_total`.
    pub cpu_secs: Option<f64>,
    /// `fleetcall_process_resident_memory_bytes`.
    pub rss_bytes: Option<f64>,
    /// `fleetcall_rtp_forwarded_total`.
    pub rtp_forwarded: Option<f64>,
    /// `fleetcall_media_socket_calls_total`, every worker and direction.
    pub media_socket_calls: Option<f64>,
}

/// Sums every sample of `name` (any labels) in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// How the tool reaches the server.
#[derive(Debug)]
pub struct Server {
    /// `http://host:port`, no trailing slash.
    pub http: String,
    /// The device control plane.
    pub quic: SocketAddr,
    /// The server's data directory (CA, admin token).
    pub data_dir: PathBuf,
    /// Bearer token of the admin API.
    pub admin_token: String,
    /// Its process, for `/proc`.
    pub pid: Option<u32>,
    spawned: Option<Spawned>,
}

#[derive(Debug)]
struct Spawned {
    child: Child,
    binary: PathBuf,
    args: Vec<String>,
    /// Removed at the end (a data dir the tool made).
    temp_dir: bool,
}

impl Server {
    /// A running server: checks that it answers and that the token works.
    pub async fn connect(
        http: &str,
        quic: SocketAddr,
        data_dir: &Path,
        token: Option<String>,
        pid: Option<u32>,
    ) -> anyhow::Result<Server> {
        let http = http.trim_end_matches('/').to_owned();
        let health = http::request(
            "GET",
            &format!("{http}/healthz"),
            None,
            None,
            Duration::from_secs(3),
        )
        .await
        .with_context(|| format!("the server is not reachable at {http}"))?;
        if health.status != 200 {
            bail!(
                "{http}/healthz answered {}: is this a fleetcall server?",
                health.status
            );
        }
        let admin_token = match token {
            Some(t) => t,
            None => {
                let path = data_dir.join("admin-token");
                std::fs::read_to_string(&path)
                    .with_context(|| format!("reading the admin token {} (give --data-dir of the server, or --admin-token)", path.display()))?
                    .trim()
                    .to_owned()
            }
        };
        let server = Server {
            http,
            quic,
            data_dir: data_dir.to_owned(),
            admin_token,
            pid,
            spawned: None,
        };
        server
            .stats()
            .await
            .context("the admin API refused the token")?;
        if let Some(pid) = pid {
            proc_sample(pid)
                .with_context(|| format!("no process {pid} to read CPU and memory from"))?;
        }
        Ok(server)
    }

    /// Starts `binary serve` on free loopback ports with `args` appended;
    /// its data directory is `data_dir` or a fresh one under the temp dir.
    /// With `cpus` (a `taskset` list such as `0`), the server runs only there.
    pub async fn spawn(
        binary: &Path,
        args: &[String],
        data_dir: Option<&Path>,
        cpus: Option<&str>,
    ) -> anyhow::Result<Server> {
        let http_port = free_port(false)?;
        let quic_port = free_port(true)?;
        let (dir, temp_dir) = match data_dir {
            Some(d) => (d.to_owned(), false),
            None => (
                std::env::temp_dir().join(format!(
                    "fleetcall-loadtest-{}-{}",
                    std::process::id(),
                    unique()
                )),
                true,
            ),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut full = vec![
            "serve".to_owned(),
            "--http-addr".into(),
            format!("127.0.0.1:{http_port}"),
            "--quic-addr".into(),
            format!("127.0.0.1:{quic_port}"),
            "--media-port".into(),
            "0".into(),
            "--data-dir".into(),
            dir.display().to_string(),
            // Every simulated device comes from 127.0.0.1: the per-address
            // limits that protect a site from one misbehaving host would
            // refuse all but the first 256.
            "--quic-max-connections-per-ip".into(),
            "1000000".into(),
            "--http-max-connections-per-ip".into(),
            "1000000".into(),
        ];
        full.extend(args.iter().cloned());
        let (binary, full) = match cpus {
            // `taskset` execs the server: the pid stays the server's.
            Some(cpus) => (
                PathBuf::from("taskset"),
                [
                    vec![
                        "-c".to_owned(),
                        cpus.to_owned(),
                        binary.display().to_string(),
                    ],
                    full,
                ]
                .concat(),
            ),
            None => (binary.to_owned(), full),
        };
        let child = start(&binary, &full, &dir).await?;
        let pid = child.id();
        let admin_token = std::fs::read_to_string(dir.join("admin-token"))
            .context("the spawned server wrote no admin token")?
            .trim()
            .to_owned();
        let mut server = Server {
            http: format!("http://127.0.0.1:{http_port}"),
            quic: SocketAddr::from(([127, 0, 0, 1], quic_port)),
            data_dir: dir,
            admin_token,
            pid: Some(pid),
            spawned: Some(Spawned {
                child,
                binary,
                args: full,
                temp_dir,
            }),
        };
        if let Err(e) = server.stats().await {
            server.stop();
            return Err(e.context("the spawned server's admin API"));
        }
        Ok(server)
    }

    /// Whether the tool started the server.
    pub fn is_spawned(&self) -> bool {
        self.spawned.is_some()
    }

    /// Stops the spawned server gracefully (SIGTERM) and starts it again on
    /// the same addresses and data; returns when it serves.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let spawned = self
            .spawned
            .as_mut()
            .context("only a server the tool started can be restarted")?;
        terminate(&mut spawned.child).await;
        spawned.child = start(&spawned.binary, &spawned.args, &self.data_dir).await?;
        self.pid = Some(spawned.child.id());
        Ok(())
    }

    /// Stops a spawned server (SIGTERM, then SIGKILL); nothing otherwise.
    pub fn stop(&mut self) {
        if let Some(mut spawned) = self.spawned.take() {
            sigterm(spawned.child.id());
            let deadline = Instant::now() + Duration::from_secs(8);
            while Instant::now() < deadline {
                if matches!(spawned.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = spawned.child.kill();
            let _ = spawned.child.wait();
            if spawned.temp_dir {
                let _ = std::fs::remove_dir_all(&self.data_dir);
            }
        }
    }

    /// `GET /api/stats`.
    pub async fn stats(&self) -> anyhow::Result<Value> {
        let body =
            http::get_ok(&format!("{}/api/stats", self.http), Some(&self.admin_token)).await?;
        serde_json::from_str(&body).context("parsing /api/stats")
    }

    /// `GET /api/calls`.
    pub async fn calls(&self) -> anyhow::Result<Value> {
        let body =
            http::get_ok(&format!("{}/api/calls", self.http), Some(&self.admin_token)).await?;
        serde_json::from_str(&body).context("parsing /api/calls")
    }

    /// `GET /metrics`, the series the report uses.
    pub async fn metrics(&self) -> anyhow::Result<MetricsSample> {
        let text = http::get_ok(&format!("{}/metrics", self.http), None).await?;
        Ok(MetricsSample {
            cpu_secs: metric_sum(&text, "fleetcall_process_cpu_seconds_total"),
            rss_bytes: metric_sum(&text, "fleetcall_process_resident_memory_bytes"),
            rtp_forwarded: metric_sum(&text, "fleetcall_rtp_forwarded_total"),
            media_socket_calls: metric_sum(&text, "fleetcall_media_socket_calls_total"),
        })
    }

    /// Sets the default noise-suppression policy; returns the previous one.
    pub async fn set_suppression(&self, on: bool) -> anyhow::Result<bool> {
        let body = http::get_ok(
            &format!("{}/api/policy", self.http),
            Some(&self.admin_token),
        )
        .await?;
        let before = serde_json::from_str::<Value>(&body)?
            .get("default")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let change = serde_json::json!({ "scope": "default", "on": on }).to_string();
        let response = http::request(
            "PUT",
            &format!("{}/api/policy", self.http),
            Some(&self.admin_token),
            Some(&change),
            Duration::from_secs(10),
        )
        .await?;
        if response.status != 200 {
            bail!("PUT /api/policy: {} {}", response.status, response.body);
        }
        Ok(before)
    }

    /// The WebSocket endpoint of the device protocol.
    pub fn ws_url(&self) -> String {
        format!("{}/ws/device", self.http.replacen("http", "ws", 1))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the server and waits for its "serving" line.
async fn start(binary: &Path, args: &[String], dir: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .context("server log")?;
    let mut child = Command::new(binary)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("LOADTEST_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("fleetcall serving ")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(());
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(())) => Ok(child),
        _ => {
            let _ = child.kill();
            let status = child.wait().ok();
            bail!(
                "{} did not start serving (exit: {status:?}); see {}",
                binary.display(),
                dir.join("server.log").display()
            )
        }
    }
}

/// SIGTERM, up to 10 s for a graceful exit, then SIGKILL.
async fn terminate(child: &mut Child) {
    sigterm(child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGTERM through the shell's builtin `kill` (a minimal system may lack
/// the `kill` binary; there is no safe std API for signals).
fn sigterm(pid: u32) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -TERM {pid}"))
        .status();
}

fn free_port(udp: bool) -> anyhow::Result<u16> {
    Ok(if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    })
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_switches_of_every_thread() {
        let before = thread_switches(std::process::id()).unwrap();
        // A sleep is a voluntary switch; a thread of its own shows up in the count.
        std::thread::spawn(|| std::thread::sleep(Duration::from_millis(5))).join().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let after = thread_switches(std::process::id()).unwrap();
        assert!(after.all > before.all, "{before:?} -> {after:?}");
        assert_eq!((after.workers, after.worker_wakeups), (0, 0), "no media workers here");
        assert!(thread_switches(u32::MAX).is_none());
    }

    #[test]
    fn reads_this_process() {
        let sample = proc_sample(std::process::id()).unwrap();
        assert!(
            sample.rss_bytes > 1_000_000 && sample.cpu_secs >= 0.0,
            "{sample:?}"
        );
        assert!(proc_sample(u32::MAX).is_none());
    }

    #[test]
    fn sums_prometheus_series() {
        let text = "# HELP x\nfleetcall_rtp_forwarded_total{worker=\"0\",site=\"a\"} 10\nfleetcall_rtp_forwarded_total{worker=\"1\",site=\"a\"} 5\n\
                    fleetcall_rtp_forwarded_totally 99\nfleetcall_process_cpu_seconds_total 1.5\n";
        assert_eq!(
            metric_sum(text, "fleetcall_rtp_forwarded_total"),
            Some(15.0)
        );
        assert_eq!(
            metric_sum(text, "fleetcall_process_cpu_seconds_total"),
            Some(1.5)
        );
        assert_eq!(metric_sum(text, "missing"), None);
    }
}
