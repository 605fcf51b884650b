//! The network lab: the server and each device in a Linux network namespace
//! of its own, joined by veth links to one bridge, so that faults strike a
//! real network path instead of loopback.
//!
//! ```text
//!   <lab>-srv (10.77.0.1)     <lab>-d-bob (10.77.0.11)   ...
//!        eth0                      eth0
//!         |  veth                   |  veth
//!        s0 ------ br0 (hub) ------ d1            <lab>-hub, 10.77.0.254 on br0
//! ```
//!
//! - **Namespaces** are named `netlab<pid>-<n>-<role>`, unique per test and
//!   process, so tests run in parallel; every lab uses the same private
//!   /24 since namespaces never see each other. [`Lab`] removes its own on
//!   drop (also when a test panics), and sweeps those of test processes that
//!   died without cleaning up.
//! - **The test body runs inside the server's namespace** ([`run`]): the
//!   server is its child process and inherits it, and the admin API on the
//!   server's loopback is reachable whatever the lab does to the links.
//! - **Devices** ([`Lab::device`]) are the SDK's [`Device`] with their
//!   sockets made on a runtime whose thread entered the device's namespace
//!   with `setns` ([`Home`]); the reference agent runs there as a real
//!   process under `ip netns exec` ([`Lab::agent`]) where a test needs
//!   SIGKILL or SIGSTOP ([`signal`]).
//! - **Faults** are nftables rules on the hub's bridge ([`Lab::cut`],
//!   [`Lab::loss`], [`Lab::drop_larger_than`]), so the ends see a silent
//!   network: their sends succeed and vanish, as on a real LAN (a drop in the
//!   sender's own OUTPUT chain would fail its `sendmsg` instead). A
//!   [`Fault`] is healed on drop.
//! - **Control black-hole.** Once encrypted, the control stream's packets and
//!   QUIC's keep-alives look alike to nftables, but not in size: a 1-RTT
//!   packet carrying only PING/ACK frames is about 30 bytes, a packet
//!   carrying a stream frame (a heartbeat ack is the smallest) is larger.
//!   [`Lab::drop_larger_than`] drops the larger ones on the QUIC port only,
//!   so the QUIC connection stays up (keep-alives and acks pass, counted by
//!   [`Fault::passed_each`]) and media flows, while no control frame moves.
//!   Sizes were measured on this code with the relay's histogram, see
//!   `CONTROL_BLACKHOLE_BYTES` in tests/netlab_control.rs. (A relay that
//!   parsed QUIC could do the same by frame type, but the payload is
//!   encrypted; size is what the network can see.)
//! - **Delay, jitter, reordering**: the kernel here has no `netem` qdisc, so
//!   [`Relay`] is a userspace UDP relay in the hub that devices dial instead
//!   of the server.
//! - **Addresses** change with [`Lab::move_address`].
//!
//! Where the kernel refuses namespaces the lab fails with a message saying
//! so; it never skips.

#![allow(dead_code)]

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::{Deref, DerefMut};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fleetcall_signaling::grants::RoomPattern;
use fleetcall_signaling::pki::{DeviceFiles, Enrollment, Pki};
use nix::sched::CloneFlags;
use rand::RngExt;
use serde_json::Value;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

use crate::common::{http_get, Server};
use crate::quic_support::{self, Agent, Device, Home as Placement};

/// The lab's /24.
const SUBNET: [u8; 3] = [10, 77, 0];
/// The server's address.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The hub's own address on the bridge (relays listen here).
pub const HUB_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 254);
/// Devices get .11, .12, ...; a moved device gets its host number + 100.
const FIRST_DEVICE_HOST: u8 = 11;

/// Labs made by this process, for unique names.
static LABS: AtomicU32 = AtomicU32::new(0);

/// Builds a lab for `scenario`, then runs `body` on a runtime inside the
/// server's namespace (see the module docs). A panic in `body` is the
/// test's panic; the lab is torn down either way.
pub fn run<F, Fut>(scenario: &str, body: F) -> anyhow::Result<()>
where
    F: FnOnce(Lab) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let lab = Lab::new(scenario)?;
    let netns = lab.server.ns.clone();
    let thread = std::thread::Builder::new().name(format!("netlab-{scenario}")).spawn(move || -> anyhow::Result<()> {
        // Everything this thread starts from now on (runtime workers, the
        // server process, admin API sockets) is inside the server's namespace.
        enter(&netns)?;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        runtime.block_on(body(lab))
    })?;
    match thread.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Moves the calling thread into the network namespace `netns`.
fn enter(netns: &str) -> anyhow::Result<()> {
    let path = format!("/run/netns/{netns}");
    let file = File::open(&path).with_context(|| format!("netlab: opening {path}"))?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("netlab: the kernel refused to enter network namespace {netns} (setns needs root / CAP_SYS_ADMIN)"))?;
    Ok(())
}

/// One namespace on the bridge: the server or a device.
#[derive(Debug)]
pub struct Node {
    /// The namespace's name (`ip netns`).
    pub ns: String,
    /// Its bridge port in the hub: where the lab's rules match it.
    pub port: String,
    ip: Mutex<Ipv4Addr>,
}

impl Node {
    /// Its current address.
    pub fn ip(&self) -> Ipv4Addr {
        *self.ip.lock().unwrap()
    }
}

/// Which traffic of a node a fault drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Everything to and from it.
    Both,
    /// What it sends (device -> server).
    FromNode,
    /// What it is sent (server -> device).
    ToNode,
}

/// A lab: its namespaces live as long as this value.
#[derive(Debug)]
pub struct Lab {
    /// `netlab<pid>-<n>`: the prefix of every namespace of this lab.
    pub name: String,
    pub hub: String,
    pub server: Arc<Node>,
    /// Every namespace made, the hub first.
    namespaces: Mutex<Vec<String>>,
    next_host: Mutex<u8>,
    /// A runtime in the hub, started for the first relay.
    hub_home: Mutex<Option<Arc<Home>>>,
}

impl Lab {
    /// Creates the hub with its bridge and the server's namespace.
    pub fn new(scenario: &str) -> anyhow::Result<Lab> {
        sweep_dead_labs();
        let name = format!("netlab{}-{}", std::process::id(), LABS.fetch_add(1, Ordering::Relaxed));
        let hub = format!("{name}-hub");
        let lab = Lab {
            name: name.clone(),
            hub: hub.clone(),
            server: Arc::new(Node { ns: format!("{name}-srv"), port: "s0".into(), ip: Mutex::new(SERVER_IP) }),
            namespaces: Mutex::new(Vec::new()),
            next_host: Mutex::new(FIRST_DEVICE_HOST),
            hub_home: Mutex::new(None),
        };
        if let Err(e) = ip(&["netns", "add", &hub]) {
            bail!(
                "netlab ({scenario}): the kernel refused a network namespace ({e:#}). These tests need root \
                 and network namespaces (CONFIG_NET_NS, iproute2, nftables: scripts/deps test); they are not skipped."
            );
        }
        lab.namespaces.lock().unwrap().push(hub.clone());
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "addr", "add", &format!("{HUB_IP}/24"), "dev", "br0"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        // What a node sends is matched where it enters the bridge
        // (prerouting: forwarded or addressed to the hub); what it is sent,
        // where it leaves (postrouting).
        nft(
            &hub,
            &["-f", "-"],
            Some(
                "table bridge netlab {\n\
                 chain from_nodes { type filter hook prerouting priority 0; policy accept; }\n\
                 chain to_nodes { type filter hook postrouting priority 0; policy accept; }\n\
                 }\n",
            ),
        )
        .context("netlab: nftables refused the lab's table (is nftables installed? scripts/deps test)")?;
        lab.attach(&lab.server)?;
        Ok(lab)
    }

    /// A new namespace on the bridge for the device `id`.
    pub fn node(&self, id: &str) -> anyhow::Result<Arc<Node>> {
        let host = {
            let mut next = self.next_host.lock().unwrap();
            if *next >= 100 {
                bail!("netlab: at most {} devices per lab", 100 - FIRST_DEVICE_HOST);
            }
            *next += 1;
            *next - 1
        };
        let label: String = id.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).take(24).collect();
        let node = Arc::new(Node {
            ns: format!("{}-d{host}-{label}", self.name),
            port: format!("d{host}"),
            ip: Mutex::new(Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], host)),
        });
        self.attach(&node)?;
        Ok(node)
    }

    fn attach(&self, node: &Node) -> anyhow::Result<()> {
        ip(&["netns", "add", &node.ns])?;
        self.namespaces.lock().unwrap().push(node.ns.clone());
        ip(&["-n", &node.ns, "link", "set", "lo", "up"])?;
        // Made from the hub with the peer straight in the node: no name ever
        // exists in the machine's own namespace.
        ip(&["-n", &self.hub, "link", "add", &node.port, "type", "veth", "peer", "name", "eth0", "netns", &node.ns])?;
        ip(&["-n", &self.hub, "link", "set", &node.port, "master", "br0", "up"])?;
        ip(&["-n", &node.ns, "addr", "add", &format!("{}/24", node.ip()), "dev", "eth0"])?;
        ip(&["-n", &node.ns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Starts `fleetcall serve` in the server's namespace: control and media
    /// on the lab address, HTTP (admin API) on its loopback.
    pub fn start_server(&self, extra: &[&str]) -> anyhow::Result<Server> {
        let data_dir = std::env::temp_dir().join(format!("fleetcall-{}", self.name));
        let media = SERVER_IP.to_string();
        let quic = format!("{SERVER_IP}:0");
        let listen = ["--http-addr", "127.0.0.1:0", "--media-bind", &media, "--media-port", "0", "--quic-addr", &quic];
        Server::launch(data_dir, &listen, extra)
    }

    /// Enrolls `id` (with `rooms` granted), gives it a namespace and
    /// registers it there on the SDK.
    pub async fn device(&self, server: &Server, id: &str, rooms: &[&str]) -> anyhow::Result<LabDevice> {
        self.device_via(server, id, rooms, server.quic_addr).await
    }

    /// Like [`Lab::device`], but dialing `quic` (a [`Relay`] in front of
    /// the server).
    pub async fn device_via(&self, server: &Server, id: &str, rooms: &[&str], quic: SocketAddr) -> anyhow::Result<LabDevice> {
        let files = enroll(server, id, rooms)?;
        let node = self.node(id)?;
        let home = Home::enter(&node.ns)?;
        let placement = Placement { runtime: Some(home.handle.clone()), media_ip: IpAddr::V4(node.ip()) };
        let mut config = quic_support::client_config(server, &files)?;
        if let fleetcall_signaling::client::Transport::Quic(target) = &mut config.transport {
            target.server = quic;
        }
        let device = Device::connect_from(id, files, config, placement).await?;
        Ok(LabDevice { device, node, home })
    }

    /// The reference agent (`fleetcall device run`) as a process in a new
    /// namespace of its own.
    pub fn agent(&self, server: &Server, id: &str, extra: &[&str]) -> anyhow::Result<(Agent, Arc<Node>)> {
        let files = enroll(server, id, &[])?;
        let node = self.node(id)?;
        let agent = Agent::spawn_in(Some(&node.ns), server.quic_addr, &files, id, extra)?;
        Ok((agent, node))
    }

    /// Drops the traffic of `node` that `way` names until the fault heals.
    pub fn cut(&self, node: &Node, way: Way) -> anyhow::Result<Fault> {
        self.rules(node, way, "drop")
    }

    /// Drops `percent` % of the traffic `way` names, at random.
    pub fn loss(&self, node: &Node, way: Way, percent: u32) -> anyhow::Result<Fault> {
        self.rules(node, way, &format!("numgen random mod 100 < {percent} drop"))
    }

    /// Between `node` and the server's UDP port `port`, both ways: drops
    /// datagrams whose payload exceeds `bytes` (the control black-hole, see
    /// the module docs) and counts those that pass ([`Fault::passed`]).
    /// Other traffic (media) is untouched.
    pub fn drop_larger_than(&self, node: &Node, port: u16, bytes: u16) -> anyhow::Result<Fault> {
        // `udp length` counts the 8-byte UDP header.
        let length = bytes + 8;
        let up = format!("udp dport {port}");
        let down = format!("udp sport {port}");
        let mut fault = self.rules_each(node, Some(&format!("{up} udp length > {length} drop")), Some(&format!("{down} udp length > {length} drop")))?;
        let mut counters =
            self.rules_each(node, Some(&format!("{up} udp length <= {length} counter")), Some(&format!("{down} udp length <= {length} counter")))?;
        // One fault owns both sets of rules; `counters` is left empty.
        fault.counters = std::mem::take(&mut counters.rules);
        fault.rules.extend(fault.counters.iter().cloned());
        Ok(fault)
    }

    fn rules(&self, node: &Node, way: Way, action: &str) -> anyhow::Result<Fault> {
        let from = matches!(way, Way::Both | Way::FromNode).then_some(action);
        let to = matches!(way, Way::Both | Way::ToNode).then_some(action);
        self.rules_each(node, from, to)
    }

    /// Adds `from` to what `node` sends and `to` to what it is sent.
    fn rules_each(&self, node: &Node, from: Option<&str>, to: Option<&str>) -> anyhow::Result<Fault> {
        let mut fault = Fault { hub: self.hub.clone(), rules: Vec::new(), counters: Vec::new() };
        let mut add = |chain: &str, side: &str, action: &str| -> anyhow::Result<()> {
            let rule = format!("{side} \"{}\" {action}", node.port);
            let echo = nft(&self.hub, &["--echo", "--handle", "add", "rule", "bridge", "netlab", chain, &rule], None)?;
            let handle = echo
                .lines()
                .find_map(|l| l.split_once("# handle "))
                .and_then(|(_, h)| h.trim().parse::<u64>().ok())
                .with_context(|| format!("netlab: no rule handle in nft's echo {echo:?}"))?;
            fault.rules.push((chain.to_owned(), handle));
            Ok(())
        };
        if let Some(action) = from {
            add("from_nodes", "iifname", action)?;
        }
        if let Some(action) = to {
            add("to_nodes", "oifname", action)?;
        }
        Ok(fault)
    }

    /// Gives `node` a new address (its host number + 100) and removes the
    /// old one, as a device roaming to another access point would see it.
    /// Sockets bound to the unspecified address send from the new one.
    pub fn move_address(&self, node: &Node) -> anyhow::Result<Ipv4Addr> {
        let old = node.ip();
        let host = old.octets()[3];
        let new = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], if host >= 100 { host - 100 } else { host + 100 });
        // Without this, removing the first address of the subnet also
        // removes the new one (a secondary of the same /24).
        command("ip", &["netns", "exec", &node.ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/conf/eth0/promote_secondaries"], None)?;
        ip(&["-n", &node.ns, "addr", "add", &format!("{new}/24"), "dev", "eth0"])?;
        ip(&["-n", &node.ns, "addr", "del", &format!("{old}/24"), "dev", "eth0"])?;
        *node.ip.lock().unwrap() = new;
        Ok(new)
    }

    /// A relay in the hub that forwards UDP from `HUB_IP:<port>` to
    /// `upstream`, shaped by `shape`.
    pub async fn relay(&self, upstream: SocketAddr, shape: Shape) -> anyhow::Result<Relay> {
        let home = {
            let mut slot = self.hub_home.lock().unwrap();
            match &*slot {
                Some(home) => home.clone(),
                None => {
                    let home = Arc::new(Home::enter(&self.hub)?);
                    *slot = Some(home.clone());
                    home
                }
            }
        };
        let shape = Arc::new(Mutex::new(shape));
        let listen = SocketAddr::from((HUB_IP, 0));
        let task_shape = shape.clone();
        let sizes: Arc<Mutex<Sizes>> = Arc::default();
        let task_sizes = sizes.clone();
        let (ready, bound) = oneshot::channel();
        let task = home.handle.spawn(async move {
            match UdpSocket::bind(listen).await {
                Ok(socket) => {
                    let socket = Arc::new(socket);
                    let _ = ready.send(socket.local_addr());
                    relay_loop(socket, upstream, task_shape, task_sizes).await;
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            }
        });
        let addr = bound.await.context("relay task")??;
        Ok(Relay { addr, shape, sizes, task, _home: home })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The relay runtime first: it lives in the hub.
        self.hub_home.lock().unwrap().take();
        let namespaces = std::mem::take(&mut *self.namespaces.lock().unwrap());
        for ns in namespaces.iter().rev() {
            kill_processes_in(ns);
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("netlab: could not remove namespace {ns}: {e:#}");
            }
        }
    }
}

/// SIGKILLs the processes this test left in `ns` (its server and agents;
/// the lab made the namespace, so nothing else runs there).
fn kill_processes_in(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else { return };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        let _ = signal(pid as u32, nix::sys::signal::Signal::SIGKILL);
    }
}

/// Removes namespaces of labs whose test process is gone (killed before
/// its `Drop` could run).
fn sweep_dead_labs() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("netlab").and_then(|rest| rest.split('-').next()).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            kill_processes_in(&name);
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// Sends `signal` to a process (SIGSTOP pauses it, SIGCONT resumes,
/// SIGKILL kills).
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
    let pid = i32::try_from(pid).context("pid")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).with_context(|| format!("{signal} to {pid}"))?;
    Ok(())
}

/// Nftables rules of one fault; removed on [`Fault::heal`] or drop.
#[derive(Debug)]
pub struct Fault {
    hub: String,
    rules: Vec<(String, u64)>,
    /// Counter rules among `rules` (see [`Lab::drop_larger_than`]).
    counters: Vec<(String, u64)>,
}

impl Fault {
    /// Ends the fault now.
    pub fn heal(mut self) -> anyhow::Result<()> {
        self.remove()
    }

    /// Packets the fault's counter rules let through so far, in all.
    pub fn passed(&self) -> anyhow::Result<u64> {
        Ok(self.passed_each()?.iter().sum())
    }

    /// The same per counter rule: from the node, then to it.
    pub fn passed_each(&self) -> anyhow::Result<Vec<u64>> {
        let listing = nft(&self.hub, &["--handle", "list", "table", "bridge", "netlab"], None)?;
        let mut packets = Vec::new();
        for (_, handle) in &self.counters {
            let line = listing
                .lines()
                .find(|l| l.trim_end().ends_with(&format!("# handle {handle}")))
                .with_context(|| format!("counter rule {handle} not in {listing}"))?;
            let count = line
                .split_once("packets ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .with_context(|| format!("no packet count in {line:?}"))?;
            packets.push(count);
        }
        Ok(packets)
    }

    fn remove(&mut self) -> anyhow::Result<()> {
        for (chain, handle) in std::mem::take(&mut self.rules) {
            nft(&self.hub, &["delete", "rule", "bridge", "netlab", &chain, "handle", &handle.to_string()], None)?;
        }
        Ok(())
    }
}

impl Drop for Fault {
    fn drop(&mut self) {
        // The hub may already be gone at the end of a failed test.
        let _ = self.remove();
    }
}

/// A thread inside a namespace with a tokio runtime of its own: sockets
/// made by its tasks belong to that namespace.
#[derive(Debug)]
pub struct Home {
    pub handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Home {
    pub fn enter(netns: &str) -> anyhow::Result<Home> {
        let (ready, handle) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let netns = netns.to_owned();
        let thread = std::thread::Builder::new().name(format!("home-{netns}")).spawn(move || {
            let runtime = enter(&netns).and_then(|()| {
                // One thread: blocking-pool threads it might start are its
                // children and so share its namespace too.
                Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
            });
            match runtime {
                Ok(runtime) => {
                    let _ = ready.send(Ok(runtime.handle().clone()));
                    // Until the owner drops the home (or the test ends).
                    let _ = runtime.block_on(stopped);
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            }
        })?;
        let handle = handle.recv().context("home thread")??;
        Ok(Home { handle, stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        // The thread drops its runtime and with it every task and socket;
        // waiting for it means those sockets are closed when this returns.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A device of the lab: the SDK device, its namespace and its home.
pub struct LabDevice {
    pub device: Device,
    pub node: Arc<Node>,
    home: Home,
}

impl Deref for LabDevice {
    type Target = Device;
    fn deref(&self) -> &Device {
        &self.device
    }
}

impl DerefMut for LabDevice {
    fn deref_mut(&mut self) -> &mut Device {
        &mut self.device
    }
}

/// Issues a certificate for `id` granting `rooms`.
pub fn enroll(server: &Server, id: &str, rooms: &[&str]) -> anyhow::Result<DeviceFiles> {
    let pki = Pki::open_or_init(server.data_dir.join("pki"), &[])?;
    let rooms = rooms.iter().map(|r| RoomPattern::parse(r).map_err(|e| anyhow::anyhow!("room {r}: {e}"))).collect::<anyhow::Result<_>>()?;
    Ok(pki.enroll(id, &server.data_dir.join("devices"), &Enrollment { rooms, ..Enrollment::default() })?)
}

// ---- the relay -----------------------------------------------------------------

/// How a [`Relay`] treats each datagram, both ways.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape {
    /// Added to every datagram.
    pub delay: Duration,
    /// Plus a uniform random share of this.
    pub jitter: Duration,
    /// This share of datagrams (0..=1) is held back `hold` longer, so later
    /// ones overtake it.
    pub reorder: f64,
    pub hold: Duration,
}

/// A userspace UDP relay: one socket towards the clients, one upstream
/// socket per client address (so the server sees one address per client).
#[derive(Debug)]
pub struct Relay {
    /// Where clients send (`HUB_IP:<port>`).
    pub addr: SocketAddr,
    shape: Arc<Mutex<Shape>>,
    sizes: Arc<Mutex<Sizes>>,
    task: tokio::task::JoinHandle<()>,
    _home: Arc<Home>,
}

/// Datagrams a relay carried, by UDP payload size, each way.
#[derive(Debug, Clone, Default)]
pub struct Sizes {
    pub upstream: std::collections::BTreeMap<usize, u64>,
    pub downstream: std::collections::BTreeMap<usize, u64>,
}

impl Relay {
    /// Changes the shaping from the next datagram on.
    pub fn set_shape(&self, shape: Shape) {
        *self.shape.lock().unwrap() = shape;
    }

    /// The sizes carried so far.
    pub fn sizes(&self) -> Sizes {
        self.sizes.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// When a datagram should leave, after shaping.
fn shaped_delay(shape: &Shape) -> Duration {
    let mut rng = rand::rng();
    let mut delay = shape.delay;
    if !shape.jitter.is_zero() {
        delay += shape.jitter.mul_f64(rng.random_range(0.0..1.0));
    }
    if shape.reorder > 0.0 && rng.random_range(0.0..1.0) < shape.reorder {
        delay += shape.hold;
    }
    delay
}

/// Sends `datagram` from `socket` to `to` after its shaped delay.
async fn send_later(socket: Arc<UdpSocket>, to: SocketAddr, datagram: Vec<u8>, shape: &Mutex<Shape>) {
    let delay = shaped_delay(&shape.lock().unwrap());
    if delay.is_zero() {
        // In order, without a task per datagram.
        let _ = socket.send_to(&datagram, to).await;
        return;
    }
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = socket.send_to(&datagram, to).await;
    });
}

async fn relay_loop(clients: Arc<UdpSocket>, upstream: SocketAddr, shape: Arc<Mutex<Shape>>, sizes: Arc<Mutex<Sizes>>) {
    let mut flows: std::collections::HashMap<SocketAddr, Arc<UdpSocket>> = std::collections::HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, from)) = clients.recv_from(&mut buf).await else { return };
        let flow = match flows.get(&from) {
            Some(flow) => flow.clone(),
            None => {
                let Ok(socket) = UdpSocket::bind(SocketAddr::from((HUB_IP, 0))).await else { continue };
                let socket = Arc::new(socket);
                flows.insert(from, socket.clone());
                // The way back for this client.
                let back = socket.clone();
                let clients = clients.clone();
                let shape = shape.clone();
                let sizes = sizes.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok((n, _)) = back.recv_from(&mut buf).await {
                        *sizes.lock().unwrap().downstream.entry(n).or_default() += 1;
                        send_later(clients.clone(), from, buf[..n].to_vec(), &shape).await;
                    }
                });
                socket
            }
        };
        *sizes.lock().unwrap().upstream.entry(n).or_default() += 1;
        send_later(flow, upstream, buf[..n].to_vec(), &shape).await;
    }
}

// ---- the server's state: convergence and leaks ----------------------------------

/// One sample of everything that must return to rest after a scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Residue {
    pub rooms: u64,
    pub participants: u64,
    pub forwarding_entries: u64,
    pub live_calls: Vec<u64>,
    /// Device rows still naming a call or a media session.
    pub devices_in_calls: Vec<String>,
    /// Controller deadlines beyond one per connection (credential expiry),
    /// one per session (heartbeat or resume grace) and one per remembered
    /// ended call (its tombstone): a ring or media deadline left behind.
    pub surplus_timers: i64,
    /// SFU participants the controller still believes in.
    pub media_legs: u64,
    /// Sessions, attached or detached.
    pub sessions: u64,
}

impl Residue {
    pub fn is_clean(&self, sessions: u64) -> bool {
        self.rooms == 0
            && self.participants == 0
            && self.forwarding_entries == 0
            && self.live_calls.is_empty()
            && self.devices_in_calls.is_empty()
            && self.surplus_timers == 0
            && self.media_legs == 0
            && self.sessions == sessions
    }
}

/// Reads the stats, calls, device table and controller gauges.
pub async fn residue(server: &Server) -> anyhow::Result<Residue> {
    let stats = server.stats().await?;
    let calls = quic_support::api(server, "/api/calls").await?;
    let calls = calls.as_array().context("calls")?;
    let live_calls: Vec<u64> = calls.iter().filter(|c| c["phase"] != "CALL_PHASE_ENDED").filter_map(|c| c["id"].as_u64()).collect();
    let ended_calls = (calls.len() - live_calls.len()) as i64;
    let devices = quic_support::devices(server).await?;
    let devices_in_calls = devices
        .iter()
        .filter(|(_, row)| !row["call"].is_null() || row["media_sessions"].as_array().is_some_and(|m| !m.is_empty()))
        .map(|(id, row)| format!("{id}: {row}"))
        .collect();
    let metrics = http_get(&format!("{}/metrics", server.url), None).await?;
    let gauge = |name: &str| -> anyhow::Result<i64> {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()).map(|v| v as i64).context(l.to_owned()))
            .sum::<anyhow::Result<i64>>()
    };
    let sessions = gauge("fleetcall_sessions")?;
    let connections = gauge("fleetcall_control_connections")?;
    let timers = gauge("fleetcall_control_timers")?;
    let count = |v: &Value| v.as_u64().unwrap_or(u64::MAX);
    Ok(Residue {
        rooms: count(&stats["rooms"]),
        participants: count(&stats["participants"]),
        forwarding_entries: count(&stats["forwarding_entries"]),
        live_calls,
        devices_in_calls,
        surplus_timers: timers - connections - sessions - ended_calls,
        media_legs: gauge("fleetcall_control_media_legs")? as u64,
        sessions: sessions as u64,
    })
}

/// Waits until nothing of any call is left on the server and `sessions`
/// sessions remain; returns how long that took, or fails naming the leak.
pub async fn assert_no_leaks(server: &Server, sessions: u64, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let residue = residue(server).await?;
        if residue.is_clean(sessions) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("leak: {limit:?} after the scenario the server still holds {residue:#?} (wanted {sessions} sessions, nothing else)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Records every change of one device's reachability in the server's
/// table, polled every 50 ms.
pub struct ReachabilityWatch {
    origin: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<anyhow::Result<Vec<(Duration, String)>>>,
}

impl ReachabilityWatch {
    pub fn start(server: Arc<Server>, id: &str) -> ReachabilityWatch {
        let origin = Instant::now();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (id, flag) = (id.to_owned(), stop.clone());
        let task = tokio::spawn(async move {
            let mut changes: Vec<(Duration, String)> = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let row = quic_support::devices(&server).await?.remove(&id).unwrap_or_default();
                let now = row["reachability"].as_str().unwrap_or("absent").to_owned();
                if changes.last().is_none_or(|(_, last)| *last != now) {
                    changes.push((origin.elapsed(), now));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(changes)
        });
        ReachabilityWatch { origin, stop, task }
    }

    /// Time since the watch started (the scale of its records).
    pub fn elapsed(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Stops; every change with its time since the start.
    pub async fn stop(self) -> anyhow::Result<Vec<(Duration, String)>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

// ---- media gaps ---------------------------------------------------------------------

/// Watches a device's received frames per remote stream every 10 ms and
/// keeps the longest time each stream went without a new frame.
#[derive(Debug)]
pub struct GapMeter {
    worst: Arc<Mutex<std::collections::BTreeMap<String, Duration>>>,
    task: tokio::task::JoinHandle<()>,
}

impl GapMeter {
    /// Starts watching `stats` (a device's media counters).
    pub fn start(stats: impl Fn() -> fleetcall_peer::PeerStats + Send + 'static) -> GapMeter {
        let worst: Arc<Mutex<std::collections::BTreeMap<String, Duration>>> = Arc::default();
        let record = worst.clone();
        let task = tokio::spawn(async move {
            let mut last: std::collections::BTreeMap<String, (u64, Instant)> = Default::default();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tick.tick().await;
                let now = Instant::now();
                for (stream, frames) in stats().received_by_stream {
                    let entry = last.entry(stream.clone()).or_insert((frames, now));
                    if frames != entry.0 {
                        *entry = (frames, now);
                    }
                    let silent = now - entry.1;
                    let mut worst = record.lock().unwrap();
                    let w = worst.entry(stream).or_default();
                    *w = (*w).max(silent);
                }
            }
        });
        GapMeter { worst, task }
    }

    /// The longest silence of each stream so far.
    pub fn worst(&self) -> std::collections::BTreeMap<String, Duration> {
        self.worst.lock().unwrap().clone()
    }

    /// Forgets the worst silences measured so far (from a quiet start).
    pub fn reset(&self) {
        self.worst.lock().unwrap().clear();
    }
}

impl Drop for GapMeter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---- commands ----------------------------------------------------------------------

/// Runs `ip args`; its stderr in the error.
fn ip(args: &[&str]) -> anyhow::Result<String> {
    command("ip", args, None)
}

/// Runs `nft args` inside `netns`.
fn nft(netns: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut full = vec!["netns", "exec", netns, "nft"];
    full.extend_from_slice(args);
    command("ip", &full, stdin)
}

fn command(program: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("netlab: running {program} (install iproute2 and nftables: scripts/deps test)"))?;
    if let Some(text) = stdin {
        child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{program} {}: {} {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
