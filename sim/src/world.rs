//! The world: the server, the devices and the network between them, in
//! virtual time, with the faults of one [`Plan`].
//!
//! Network model:
//! * a control connection is one ordered, reliable stream (QUIC): a lost
//!   packet shows up as a retransmission delay, a cut or a frozen stream
//!   holds frames until it ends, and a cut in either direction that lasts
//!   the QUIC idle timeout kills the connection on both sides. A close
//!   reaches the other side when the path lets it, at the latest as that
//!   side's idle timeout;
//! * media datagrams are lost with the plan's probability, delayed with
//!   its latency and jitter (so they reorder), and dropped while cut;
//! * a paused process (device or server) handles nothing until it runs
//!   again, then everything due at once;
//! * a crashed device loses everything but its credential; its connection
//!   dies of the server's idle timeout, its media of the SFU's silence
//!   timer.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fleetcall::bridge::translate::room_of;
use fleetcall_peer::DtlsIdentity;
use fleetcall_sfu::{ParticipantId, TrackOutlet};
use fleetcall_signaling::client::CoreConfig;
use fleetcall_signaling::controller::{Config, Reachability};
use fleetcall_signaling::grants::{Credential, CredentialKey, Grant, RoomPattern};
use fleetcall_signaling::ids::{CallId, ConnId, DeviceId, ParticipantKey};
use fleetcall_signaling::pb::{CallKind, CallPhase, ClientFrame, CloseReason, EndReason, ParticipantStatus, ServerFrame};
use fleetcall_signaling::wire::{self, FrameDecoder};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::device::{Action, CONNECT_TIMEOUT, Device, Link};
use crate::plan::{DEVICES, FAULT_WINDOW, Fault, Intent, Plan};
use crate::server::{SFU_ADDR, Server, ToNetwork};

/// QUIC's idle timeout (`QuicConfig::idle_timeout`, the server's and the
/// SDK's default).
pub const QUIC_IDLE: Duration = Duration::from_secs(10);

/// Past `Config::detection_bound` after a fault, what the detection may
/// still wait for: the fault's last frames in flight and a heartbeat
/// timer's own lateness.
pub const DETECTION_MARGIN: Duration = Duration::from_millis(500);

/// Unix seconds at the start (credentials are stated in wall-clock time).
const UNIX_START: u64 = 1_800_000_000;

/// A control connection's two directions.
#[derive(Debug)]
struct Stream {
    device: usize,
    /// When it was established.
    opened: Instant,
    incarnation: u32,
    up: VecDeque<(Instant, Up)>,
    down: VecDeque<(Instant, Down)>,
    /// The controller has not closed or lost it.
    server_open: bool,
    /// The device has not closed or lost it.
    device_open: bool,
    /// A cut long enough kills it (QUIC idle timeout) at this moment.
    dies_at: Option<Instant>,
}

#[derive(Debug)]
enum Up {
    Frame(ClientFrame),
    /// The device closed the connection.
    Close,
}

#[derive(Debug)]
enum Down {
    Frame(ServerFrame),
    Close(CloseReason),
}

/// Which way a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dir {
    ToDevice,
    ToServer,
}

/// A media datagram in flight: (arrival, order sent, from, to, bytes).
type InFlight = (Instant, u64, SocketAddr, SocketAddr, Vec<u8>);

/// A failed invariant: what, when, and the recent history.
#[derive(Debug)]
pub struct Violation {
    /// Virtual milliseconds since the start.
    pub at_ms: u128,
    /// What was wrong.
    pub what: String,
    /// The last events before it.
    pub trace: String,
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// From the heal to convergence.
    pub convergence: Duration,
    /// Calls the controller created.
    pub calls: u64,
    /// Terminal events devices received.
    pub terminals: u64,
    /// Faults in the plan.
    pub faults: usize,
    /// Members of live calls at convergence (each heard every other).
    pub members_at_convergence: usize,
    /// Most forwarding entries the SFU held at once.
    pub peak_forwarding: usize,
    /// Calls that became active.
    pub media_connected: u64,
    /// A digest of every device's terminal events, in order (equal for two
    /// runs of one seed).
    pub digest: u64,
}

/// The simulated world of one seed.
#[derive(Debug)]
pub struct World {
    /// What the seed decided.
    pub plan: Plan,
    /// The start of virtual time.
    pub start: Instant,
    /// Virtual now.
    pub now: Instant,
    /// The server.
    pub server: Server,
    /// The devices, by index.
    pub devices: Vec<Device>,
    identity: DtlsIdentity,
    /// The control streams' randomness: one generator per device and
    /// direction (a stream's frames come in the controller's order).
    links: BTreeMap<(usize, Dir), StdRng>,
    /// How often each datagram header was seen per link: a datagram's fate
    /// is drawn from its header and that count, never from the order in
    /// which the cores emit datagrams (the SFU core and str0m iterate std
    /// hash maps, whose order differs between processes).
    headers: BTreeMap<(usize, Dir, u64), u32>,
    streams: BTreeMap<ConnId, Stream>,
    next_conn: u64,
    /// Media datagrams in flight: (arrival, order, from, to, bytes).
    media: BinaryHeap<Reverse<InFlight>>,
    media_order: u64,
    crashes_done: BTreeSet<usize>,
    next_intent: usize,
    /// Terminal events already checked, per device.
    terminals_checked: Vec<usize>,
    trace: VecDeque<String>,
    peak_forwarding: usize,
    /// When a control frame of each device last reached the server, and
    /// one for it reached the device: the detection bound runs from the
    /// moment the stream stops moving, which frames delayed by loss before
    /// a fault may postpone.
    last_up: Vec<Option<Instant>>,
    last_down: Vec<Option<Instant>>,
    /// Members of live calls when the world converged.
    pub members_at_convergence: usize,
}

fn credential(name: &str) -> Credential {
    Credential {
        identity: DeviceId::new(name).expect("a valid device id"),
        subject: name.to_string(),
        key: CredentialKey::digest(name.as_bytes()),
        issued_at: UNIX_START,
        expires_at: UNIX_START + 365 * 86_400,
        grant: Grant::device(vec![RoomPattern::parse("ward-*").expect("a valid pattern")]),
    }
}

/// Device `i`'s id.
pub fn device_name(i: usize) -> String {
    format!("bed-{i}")
}

/// Sends a frame through the real codec: protobuf framing for even devices
/// (QUIC), proto3 JSON for odd ones (WebSocket).
fn through_codec<M>(device: usize, frame: &M) -> M
where
    M: prost::Message + Default + serde::Serialize + serde::de::DeserializeOwned,
{
    if device.is_multiple_of(2) {
        let mut buf = BytesMut::from(&wire::encode_frame_to_vec(frame).expect("frames encode")[..]);
        FrameDecoder::new().decode(&mut buf).expect("frames decode").expect("a whole frame")
    } else {
        wire::decode_json(&wire::encode_json(frame).expect("frames encode")).expect("frames decode")
    }
}

impl World {
    /// The world of `seed`, with every device about to dial.
    pub fn new(seed: u64, identity: DtlsIdentity) -> World {
        let start = Instant::now();
        let plan = Plan::new(seed);
        let devices = (0..DEVICES).map(|i| Device::new(i as u8, credential(&device_name(i)), seed, start)).collect();
        World {
            server: Server::new(Config::default(), start, seed),
            plan,
            start,
            now: start,
            devices,
            identity,
            links: BTreeMap::new(),
            headers: BTreeMap::new(),
            streams: BTreeMap::new(),
            next_conn: 1,
            media: BinaryHeap::new(),
            media_order: 0,
            crashes_done: BTreeSet::new(),
            next_intent: 0,
            terminals_checked: vec![0; DEVICES],
            trace: VecDeque::new(),
            peak_forwarding: 0,
            last_up: vec![None; DEVICES],
            last_down: vec![None; DEVICES],
            members_at_convergence: 0,
        }
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn note(&mut self, what: impl FnOnce() -> String) {
        if self.trace.len() == 120 {
            self.trace.pop_front();
        }
        let line = format!("{:>8} ms  {}", self.elapsed().as_millis(), what());
        if std::env::var_os("FLEETCALL_SIM_TRACE").is_some() {
            println!("{line}");
        }
        self.trace.push_back(line);
    }

    /// A violation at now, with the recent history.
    pub fn violation(&self, what: String) -> Violation {
        let mut trace = String::new();
        for line in &self.trace {
            let _ = writeln!(trace, "  {line}");
        }
        for d in &self.devices {
            let ended: Vec<String> = d.terminals.iter().map(|t| format!("{}ms boot {} call {} {:?} by {:?} ({})", (t.at - self.start).as_millis(), t.incarnation, t.ended.call_id, t.ended.reason(), t.ended.by, t.ended.detail)).collect();
            let _ = writeln!(trace, "  {}: shows {:?}, link {:?}, terminals {ended:#?}", d.name, d.call, d.link);
        }
        Violation { at_ms: self.elapsed().as_millis(), what, trace }
    }

    // ---- the fault plan ---------------------------------------------------

    fn offset(&self, t: Instant) -> Duration {
        t - self.start
    }

    /// Whether `device`'s path drops `dir` packets of the control (or
    /// media) plane at `t`; if so, until when.
    fn cut_until(&self, device: usize, control: bool, dir: Dir, t: Instant) -> Option<Instant> {
        let at = self.offset(t);
        self.plan
            .faults
            .iter()
            .filter_map(|f| match *f {
                Fault::Cut { device: d, from, until, plane, way }
                    if d == device
                        && from <= at
                        && at < until
                        && (if control { plane.control } else { plane.media })
                        && (if dir == Dir::ToDevice { way.to_device } else { way.to_server }) =>
                {
                    Some(self.start + until)
                }
                _ => None,
            })
            .max()
    }

    /// The earliest moment at or after `t` at which the control stream of
    /// `device` moves `dir`.
    fn stream_moves_at(&self, device: usize, dir: Dir, mut t: Instant) -> Instant {
        loop {
            let at = self.offset(t);
            let frozen = self.plan.faults.iter().filter_map(|f| match *f {
                Fault::Freeze { device: d, from, until } if d == device && from <= at && at < until => Some(self.start + until),
                _ => None,
            });
            match frozen.chain(self.cut_until(device, true, dir, t)).max() {
                Some(until) => t = until,
                None => return t,
            }
        }
    }

    /// When a connection opened at `opened` dies of a long cut, if it does.
    fn idle_death(&self, device: usize, opened: Instant) -> Option<Instant> {
        self.plan
            .faults
            .iter()
            .filter_map(|f| match *f {
                Fault::Cut { device: d, from, until, plane, .. } if d == device && plane.control => {
                    let quiet_from = (self.start + from).max(opened);
                    (quiet_from + QUIC_IDLE <= self.start + until).then_some(quiet_from + QUIC_IDLE)
                }
                _ => None,
            })
            .min()
    }

    /// The moment the process in question (the server, or a device) runs
    /// again, if it is paused at `t`.
    fn paused_until(&self, device: Option<usize>, t: Instant) -> Option<Instant> {
        let at = self.offset(t);
        self.plan
            .faults
            .iter()
            .filter_map(|f| match (*f, device) {
                (Fault::PauseServer { from, until }, None) if from <= at && at < until => Some(self.start + until),
                (Fault::PauseDevice { device: d, from, until }, Some(x)) if d == x && from <= at && at < until => Some(self.start + until),
                _ => None,
            })
            .max()
    }

    fn reboot_at(&self, device: usize) -> Option<Instant> {
        self.plan.faults.iter().find_map(|f| match *f {
            Fault::Crash { device: d, until, .. } if d == device && self.devices[d].link == Link::Off => Some(self.start + until),
            _ => None,
        })
    }

    /// The random stream of one control stream direction.
    fn link(&mut self, device: usize, dir: Dir) -> &mut StdRng {
        let seed = self.plan.seed;
        self.links.entry((device, dir)).or_insert_with(|| {
            let tag = (device as u64) << 8 | dir as u64;
            StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ tag)
        })
    }

    fn jitter(&mut self, device: usize, dir: Dir) -> Duration {
        let jitter = self.plan.jitter.as_micros() as u64;
        Duration::from_micros(if jitter == 0 { 0 } else { self.link(device, dir).random_range(0..=jitter) })
    }

    /// Whether a datagram is lost, and its extra delay: a hash of the seed,
    /// the link, the datagram's header and how often that header went
    /// this way before (a retransmission draws again).
    fn datagram_fate(&mut self, device: usize, dir: Dir, contents: &[u8]) -> (bool, Duration) {
        // What identifies a datagram and is the same in every run: the STUN
        // header's type and transaction id, the DTLS record's type, epoch
        // and number, the RTP fixed header, an RTCP packet's type and SSRC.
        // Never a length (signatures and DTLS records vary in size with the
        // OS's randomness) and never an RTCP report's wall-clock time.
        // Lists of byte ranges, some of one range.
        #[allow(clippy::single_range_in_vec_init)]
        let ranges: &[std::ops::Range<usize>] = match contents {
            [0..=3, ..] => &[0..2, 4..20],
            [20..=63, ..] => &[0..11],
            [128..=191, second, ..] if (64..=95).contains(&(second & 0x7f)) => &[0..2, 4..8],
            _ => &[0..12],
        };
        let mut header = 0xcbf2_9ce4_8422_2325u64;
        for byte in ranges.iter().flat_map(|r| contents.get(r.clone()).unwrap_or_default()) {
            header = (header ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
        let seen = self.headers.entry((device, dir, header)).or_default();
        *seen += 1;
        let mut x = self.plan.seed ^ header ^ u64::from(*seen) << 40 ^ (device as u64) << 56 ^ (dir as u64) << 62;
        let mut next = || {
            // splitmix64
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let lost = (next() >> 11) as f64 / (1u64 << 53) as f64 <= self.plan.loss && self.plan.loss > 0.0;
        let jitter = self.plan.jitter.as_micros() as u64;
        (lost, Duration::from_micros(next() % (jitter + 1)))
    }

    /// When a control frame sent now arrives, after `last` (the stream is
    /// ordered).
    fn frame_arrival(&mut self, device: usize, dir: Dir, last: Option<Instant>) -> Instant {
        let mut t = self.now + self.plan.latency + self.jitter(device, dir);
        // A lost packet costs a retransmission timeout, doubling.
        let mut rto = Duration::from_millis(200);
        let loss = self.plan.loss;
        for _ in 0..6 {
            if !self.link(device, dir).random_bool(loss) {
                break;
            }
            t += rto;
            rto *= 2;
        }
        let t = self.stream_moves_at(device, dir, t);
        last.map_or(t, |last| t.max(last))
    }

    /// When a close sent now reaches the other side: when the path lets it,
    /// at the latest as that side's idle timeout.
    fn close_arrival(&mut self, device: usize, dir: Dir, last: Option<Instant>) -> Instant {
        let nominal = self.now + self.plan.latency;
        let open = self.cut_until(device, true, dir, nominal).unwrap_or(nominal);
        let t = open.min(self.now + QUIC_IDLE);
        last.map_or(t, |last| t.max(last))
    }

    // ---- the loop ---------------------------------------------------------

    /// The next moment anything happens.
    fn next_event(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        let server_paused = self.paused_until(None, self.now);
        consider(server_paused.or(self.server.deadline()));
        for stream in self.streams.values() {
            consider(stream.up.front().map(|(t, _)| server_paused.map_or(*t, |p| p.max(*t))));
            let device_paused = self.paused_until(Some(stream.device), self.now);
            consider(stream.down.front().map(|(t, _)| device_paused.map_or(*t, |p| p.max(*t))));
            consider(stream.dies_at);
        }
        for (i, device) in self.devices.iter().enumerate() {
            match (device.link, self.paused_until(Some(i), self.now)) {
                (Link::Off, _) => consider(self.reboot_at(i)),
                (_, Some(until)) => consider(Some(until)),
                _ => consider(device.deadline()),
            }
        }
        consider(self.media.peek().map(|Reverse((t, ..))| *t));
        for fault in &self.plan.faults {
            if let Fault::Crash { device, from, .. } = *fault
                && !self.crashes_done.contains(&device)
            {
                consider(Some(self.start + from));
            }
        }
        consider(self.plan.intents.get(self.next_intent).map(|(at, ..)| self.start + *at));
        next
    }

    /// Runs until `until`, checking the invariants after every step.
    pub fn run_until(&mut self, until: Instant) -> Result<(), Violation> {
        self.run_while(until, |_| true).map(|_| ())
    }

    /// Runs while `go_on` holds, at most until `until`; returns whether it
    /// stopped because `go_on` failed.
    pub fn run_while(&mut self, until: Instant, mut go_on: impl FnMut(&World) -> bool) -> Result<bool, Violation> {
        loop {
            if !go_on(self) {
                return Ok(true);
            }
            let next = self.next_event().map_or(until, |t| t.min(until));
            if next > until || self.now >= until {
                self.now = until;
                return Ok(false);
            }
            // Never stand still: str0m may ask for "now" again.
            self.now = next.max(self.now + Duration::from_micros(100)).min(until.max(self.now));
            self.step();
            self.check_step()?;
        }
    }

    fn step(&mut self) {
        let now = self.now;
        self.apply_crashes();
        self.kill_idle_streams();
        let server_paused = self.paused_until(None, now).is_some();
        if !server_paused && self.server.deadline().is_some_and(|t| t <= now) {
            self.server.handle_timeout(now);
            self.flush_server();
        }
        if !server_paused {
            self.deliver_up();
        }
        self.deliver_down();
        for i in 0..self.devices.len() {
            self.step_device(i);
        }
        self.deliver_media();
        self.run_intents();
    }

    fn apply_crashes(&mut self) {
        let at = self.elapsed();
        let due: Vec<usize> = self
            .plan
            .faults
            .iter()
            .filter_map(|f| match *f {
                Fault::Crash { device, from, .. } if from <= at && !self.crashes_done.contains(&device) => Some(device),
                _ => None,
            })
            .collect();
        for device in due {
            self.crashes_done.insert(device);
            self.note(|| format!("{} crashes", device_name(device)));
            self.devices[device].crash();
            // Nothing closes the connection: the server's idle timeout does.
            let now = self.now;
            for stream in self.streams.values_mut().filter(|s| s.device == device && s.device_open) {
                stream.device_open = false;
                stream.up.clear();
                stream.dies_at = Some(stream.dies_at.map_or(now + QUIC_IDLE, |t| t.min(now + QUIC_IDLE)));
            }
        }
    }

    fn kill_idle_streams(&mut self) {
        let now = self.now;
        let server_paused = self.paused_until(None, now).is_some();
        let dying: Vec<ConnId> = self.streams.iter().filter(|(_, s)| s.dies_at.is_some_and(|t| t <= now)).map(|(c, _)| *c).collect();
        for conn in dying {
            let stream = &self.streams[&conn];
            let (device, server_open, device_open) = (stream.device, stream.server_open, stream.device_open);
            if server_open && !server_paused {
                self.note(|| format!("{conn} of {} idles out at the server", device_name(device)));
                self.server.ctl.handle_connection_down(now, conn, "idle timeout");
                self.server.pump(now);
                self.streams.get_mut(&conn).expect("known").server_open = false;
                self.flush_server();
            }
            if device_open && self.paused_until(Some(device), now).is_none() {
                self.note(|| format!("{conn} of {} idles out at the device", device_name(device)));
                self.streams.get_mut(&conn).expect("known").device_open = false;
                if self.devices[device].link == (Link::Up { conn }) {
                    self.devices[device].handle_disconnected(now, None, "idle timeout", &self.identity);
                    self.flush_device(device);
                }
            }
            let stream = &self.streams[&conn];
            if !stream.server_open && !stream.device_open {
                self.streams.remove(&conn);
            }
        }
    }

    fn deliver_up(&mut self) {
        let now = self.now;
        let conns: Vec<ConnId> = self.streams.keys().copied().collect();
        for conn in conns {
            while let Some(stream) = self.streams.get_mut(&conn) {
                if stream.up.front().is_none_or(|(t, _)| *t > now) {
                    break;
                }
                let (_, item) = stream.up.pop_front().expect("a front");
                let (device, open) = (stream.device, stream.server_open);
                if !open {
                    continue;
                }
                match item {
                    Up::Frame(frame) => {
                        self.last_up[device] = Some(now);
                        let frame = through_codec(device, &frame);
                        self.server.ctl.handle_frame(now, conn, frame);
                    }
                    Up::Close => {
                        self.note(|| format!("{conn} closed by {}", device_name(device)));
                        self.server.ctl.handle_connection_down(now, conn, "closed by the device");
                        if let Some(stream) = self.streams.get_mut(&conn) {
                            stream.server_open = false;
                        }
                    }
                }
                self.server.pump(now);
                self.flush_server();
            }
            self.forget_if_closed(conn);
        }
    }

    fn forget_if_closed(&mut self, conn: ConnId) {
        if self.streams.get(&conn).is_some_and(|s| !s.server_open && !s.device_open && s.up.is_empty() && s.down.is_empty()) {
            self.streams.remove(&conn);
        }
    }

    fn deliver_down(&mut self) {
        let now = self.now;
        let conns: Vec<ConnId> = self.streams.keys().copied().collect();
        for conn in conns {
            while let Some(stream) = self.streams.get_mut(&conn) {
                let device = stream.device;
                if self.paused_until(Some(device), now).is_some() {
                    break;
                }
                let Some(stream) = self.streams.get_mut(&conn) else { break };
                if stream.down.front().is_none_or(|(t, _)| *t > now) {
                    break;
                }
                let (_, item) = stream.down.pop_front().expect("a front");
                let current = stream.incarnation == self.devices[device].incarnation && self.devices[device].link == (Link::Up { conn });
                if !current {
                    continue;
                }
                match item {
                    Down::Frame(frame) => {
                        self.last_down[device] = Some(now);
                        let frame = through_codec(device, &frame);
                        self.devices[device].handle_frame(now, frame, &self.identity);
                    }
                    Down::Close(reason) => {
                        self.note(|| format!("{conn} closed by the server ({reason:?}) reaches {}", device_name(device)));
                        if let Some(stream) = self.streams.get_mut(&conn) {
                            stream.device_open = false;
                        }
                        self.devices[device].handle_disconnected(now, Some(reason), "closed by the server", &self.identity);
                    }
                }
                self.flush_device(device);
            }
            self.forget_if_closed(conn);
        }
    }

    fn step_device(&mut self, i: usize) {
        let now = self.now;
        if self.devices[i].link == Link::Off {
            if self.reboot_at(i).is_some_and(|t| t <= now) {
                self.note(|| format!("{} boots", device_name(i)));
                self.devices[i].reboot(now);
            } else {
                return;
            }
        }
        if self.paused_until(Some(i), now).is_some() {
            return;
        }
        match self.devices[i].link {
            Link::Down { retry_at } if retry_at <= now => {
                let conn = ConnId(self.next_conn);
                self.next_conn += 1;
                let at = now + self.plan.latency * 2;
                self.devices[i].link = Link::Dialing { conn, at };
            }
            Link::Dialing { conn, at } if at <= now => self.finish_dial(i, conn, at),
            _ => {}
        }
        if self.devices[i].deadline().is_some_and(|t| t <= now) {
            self.devices[i].handle_timeout(now, &self.identity);
        }
        self.flush_device(i);
    }

    fn finish_dial(&mut self, i: usize, conn: ConnId, at: Instant) {
        let now = self.now;
        let path_open = self.cut_until(i, true, Dir::ToServer, now).is_none() && self.cut_until(i, true, Dir::ToDevice, now).is_none();
        if !path_open || self.paused_until(None, now).is_some() {
            // The handshake never completes: the dial times out.
            let started = at - self.plan.latency * 2;
            let delay = self.devices[i].next_backoff();
            self.devices[i].link = Link::Down { retry_at: (started + CONNECT_TIMEOUT).max(now) + delay };
            return;
        }
        self.note(|| format!("{} connects as {conn}", device_name(i)));
        let unix_now = UNIX_START + self.elapsed().as_secs();
        let credential = self.devices[i].credential.clone();
        self.server.ctl.handle_connection_up(now, unix_now, conn, credential);
        let stream = Stream {
            device: i,
            opened: now,
            incarnation: self.devices[i].incarnation,
            up: VecDeque::new(),
            down: VecDeque::new(),
            server_open: true,
            device_open: true,
            dies_at: self.idle_death(i, now),
        };
        self.streams.insert(conn, stream);
        self.server.pump(now);
        self.flush_server();
        self.devices[i].handle_connected(now, conn, &self.identity);
        self.flush_device(i);
    }

    /// Puts what device `i` produced on the network.
    fn flush_device(&mut self, i: usize) {
        let now = self.now;
        for line in std::mem::take(&mut self.devices[i].log) {
            self.note(|| line);
        }
        let outbox = self.devices[i].take_outbox();
        for (from, to, contents) in outbox.datagrams {
            self.send_datagram(i, Dir::ToServer, from, to, contents);
        }
        if let Link::Up { conn } = self.devices[i].link {
            while let Some(frame) = self.devices[i].core.poll_transmit() {
                let last = self.streams.get(&conn).and_then(|s| s.up.back().map(|(t, _)| *t));
                let at = self.frame_arrival(i, Dir::ToServer, last);
                if let Some(stream) = self.streams.get_mut(&conn) {
                    stream.up.push_back((at, Up::Frame(frame)));
                }
            }
        }
        if let Some(conn) = outbox.abort {
            // The SDK's driver aborts the link and reconnects.
            self.note(|| format!("{} finds {conn} unresponsive", device_name(i)));
            let last = self.streams.get(&conn).and_then(|s| s.up.back().map(|(t, _)| *t));
            let at = self.close_arrival(i, Dir::ToServer, last);
            if let Some(stream) = self.streams.get_mut(&conn) {
                stream.device_open = false;
                stream.up.push_back((at, Up::Close));
            }
            self.devices[i].handle_disconnected(now, None, "unresponsive", &self.identity);
            self.flush_device(i);
        }
    }

    /// Puts what the server produced on the network.
    fn flush_server(&mut self) {
        for line in std::mem::take(&mut self.server.log) {
            self.note(|| line);
        }
        while let Some(out) = self.server.out.pop_front() {
            match out {
                ToNetwork::Frame { conn, frame } => {
                    let Some(stream) = self.streams.get(&conn) else { continue };
                    if !stream.device_open && stream.incarnation != self.devices[stream.device].incarnation {
                        continue;
                    }
                    let (device, last) = (stream.device, stream.down.back().map(|(t, _)| *t));
                    let at = self.frame_arrival(device, Dir::ToDevice, last);
                    if let Some(stream) = self.streams.get_mut(&conn) {
                        stream.down.push_back((at, Down::Frame(frame)));
                    }
                }
                ToNetwork::Close { conn, reason } => {
                    let Some(stream) = self.streams.get(&conn) else { continue };
                    let (device, last) = (stream.device, stream.down.back().map(|(t, _)| *t));
                    self.note(|| format!("server closes {conn} of {} ({reason:?})", device_name(device)));
                    let at = self.close_arrival(device, Dir::ToDevice, last);
                    if let Some(stream) = self.streams.get_mut(&conn) {
                        stream.server_open = false;
                        stream.down.push_back((at, Down::Close(reason)));
                    }
                }
                ToNetwork::Datagram { destination, contents } => {
                    let Some(device) = self.device_at(destination) else { continue };
                    self.send_datagram(device, Dir::ToDevice, SFU_ADDR, destination, contents);
                }
            }
        }
    }

    /// The device whose media peer (of any boot) has `addr`.
    fn device_at(&self, addr: SocketAddr) -> Option<usize> {
        match addr.ip() {
            std::net::IpAddr::V4(ip) if ip.octets()[..2] == [10, 1] => Some(usize::from(ip.octets()[2])).filter(|i| *i < self.devices.len()),
            _ => None,
        }
    }

    fn send_datagram(&mut self, device: usize, dir: Dir, from: SocketAddr, to: SocketAddr, contents: Vec<u8>) {
        if self.cut_until(device, false, dir, self.now).is_some() {
            return;
        }
        let (lost, jitter) = self.datagram_fate(device, dir, &contents);
        if lost {
            return;
        }
        let at = self.now + self.plan.latency + jitter;
        self.media_order += 1;
        self.media.push(Reverse((at, self.media_order, from, to, contents)));
    }

    fn deliver_media(&mut self) {
        let now = self.now;
        let mut held = Vec::new();
        while self.media.peek().is_some_and(|Reverse((t, ..))| *t <= now) {
            let Reverse((at, order, from, to, contents)) = self.media.pop().expect("a datagram");
            if to == SFU_ADDR {
                if let Some(until) = self.paused_until(None, now) {
                    held.push(Reverse((until.max(at), order, from, to, contents)));
                    continue;
                }
                self.server.handle_datagram(now, from, &contents);
                self.flush_server();
            } else if let Some(device) = self.device_at(to) {
                if let Some(until) = self.paused_until(Some(device), now) {
                    held.push(Reverse((until.max(at), order, from, to, contents)));
                    continue;
                }
                if self.devices[device].link == Link::Off {
                    continue;
                }
                self.devices[device].handle_datagram(now, from, to, &contents);
                self.flush_device(device);
            }
        }
        self.media.extend(held);
    }

    fn run_intents(&mut self) {
        let now = self.now;
        while let Some(&(at, device, intent)) = self.plan.intents.get(self.next_intent) {
            if self.start + at > now {
                break;
            }
            self.next_intent += 1;
            if self.paused_until(Some(device), now).is_some() || self.devices[device].link == Link::Off {
                continue;
            }
            let action = match intent {
                Intent::Call(other) => Action::Invite(device_name(other)),
                Intent::Group(set) => {
                    let invitees: Vec<String> = (0..DEVICES).filter(|d| set & (1 << d) != 0).map(device_name).collect();
                    if invitees.is_empty() {
                        continue;
                    }
                    Action::GroupCreate(invitees)
                }
                Intent::Room => Action::RoomJoin,
                Intent::Hangup => Action::Hangup,
                Intent::IceRestart => Action::IceRestart,
            };
            self.note(|| format!("{} does {action:?}", device_name(device)));
            self.devices[device].act(now, action);
            self.flush_device(device);
        }
    }

    /// The users stop doing anything but hanging up; the network heals.
    pub fn heal(&mut self) {
        self.plan.loss = 0.0;
        self.next_intent = self.plan.intents.len();
        for device in &mut self.devices {
            device.users_active = false;
            device.scheduled.clear();
        }
    }

    /// Everyone hangs up.
    pub fn hang_up_all(&mut self) {
        let now = self.now;
        for i in 0..self.devices.len() {
            self.devices[i].act(now, Action::Hangup);
            self.flush_device(i);
        }
    }

    // ---- invariants -------------------------------------------------------

    /// The SFU participant of each participation the bridge maps.
    fn sfu_ids(&self) -> BTreeMap<ParticipantKey, ParticipantId> {
        self.server.participations.iter().collect()
    }

    /// Checked after every step.
    fn check_step(&mut self) -> Result<(), Violation> {
        let now = self.now;
        // A suspended controller's timers are late by design; it is audited
        // once it ran them.
        let audit = if self.paused_until(None, now).is_some() { Vec::new() } else { self.server.ctl.audit(now) };
        if !audit.is_empty() {
            return Err(self.violation(format!("controller audit: {audit:?}")));
        }
        // The SFU holds only participants the controller believes in, in
        // their call's room (no ghost after the controller removed one).
        let legs: BTreeMap<ParticipantKey, CallId> = self.server.ctl.sfu_participants().into_iter().collect();
        let ids = self.sfu_ids();
        let stats = self.server.sfu.stats();
        if stats.participants != ids.len() {
            return Err(self.violation(format!("the SFU has {} participants, the bridge maps {}", stats.participants, ids.len())));
        }
        let key_of: BTreeMap<ParticipantId, ParticipantKey> = ids.iter().map(|(k, id)| (*id, *k)).collect();
        for key in ids.keys() {
            if !legs.contains_key(key) {
                return Err(self.violation(format!("ghost participant {key} in the SFU: the controller has no such participation")));
            }
        }
        let forwarding = self.server.sfu.forwarding();
        self.peak_forwarding = self.peak_forwarding.max(forwarding.len());
        for outlet in forwarding {
            let call_of = |id: ParticipantId| key_of.get(&id).and_then(|k| legs.get(k)).map(|c| room_of(*c));
            if call_of(outlet.publisher).as_ref() != Some(&outlet.room) || call_of(outlet.subscriber).as_ref() != Some(&outlet.room) {
                return Err(self.violation(format!("forwarding outside the controller's calls: {outlet:?}")));
            }
        }
        self.check_detection()?;
        for i in 0..self.devices.len() {
            if let Some(v) = self.devices[i].violations.first() {
                let v = format!("{}: {v}", device_name(i));
                return Err(self.violation(v));
            }
            // Each terminal event carries the server's reason.
            while self.terminals_checked[i] < self.devices[i].terminals.len() {
                let t = self.devices[i].terminals[self.terminals_checked[i]].clone();
                self.terminals_checked[i] += 1;
                let Some(call) = self.server.ctl.call(CallId(t.ended.call_id)) else { continue };
                let call_level = matches!(t.ended.reason(), EndReason::Empty | EndReason::EndedByOwner);
                if (call.kind == CallKind::Direct || call_level) && call.end_reason != Some(t.ended.reason()) {
                    return Err(self.violation(format!(
                        "{} got call_ended {:?} for {} which the server ended with {:?}",
                        device_name(i),
                        t.ended.reason(),
                        call.id,
                        call.end_reason
                    )));
                }
            }
        }
        Ok(())
    }

    /// A device cut off from the server (its control path cut either way,
    /// its stream frozen, its process killed) is unreachable for the server,
    /// and the device is off the connection it had, within the detection
    /// bound of the fault, for as long as the fault lasts.
    fn check_detection(&self) -> Result<(), Violation> {
        let bound = self.server.ctl.config().detection_bound() + DETECTION_MARGIN;
        let at = self.elapsed();
        for fault in &self.plan.faults {
            let (device, from, until, device_side) = match *fault {
                Fault::Cut { device, from, until, plane, .. } if plane.control => (device, from, until, true),
                Fault::Freeze { device, from, until } => (device, from, until, true),
                Fault::Crash { device, from, until } => (device, from, until, false),
                _ => continue,
            };
            if at >= until {
                continue;
            }
            let moved_until = |last: Option<Instant>| last.map_or(from, |t| self.offset(t).max(from));
            // A suspended process detects late, by design: its timers fire
            // when it runs again.
            let paused = |who: Option<usize>| {
                self.plan.faults.iter().any(|f| match (*f, who) {
                    (Fault::PauseServer { from: p, until: q }, None) => p < at && q > from,
                    (Fault::PauseDevice { device: d, from: p, until: q }, Some(x)) => d == x && p < at && q > from,
                    _ => false,
                })
            };
            let name = &self.devices[device].name;
            if !paused(None) && at >= moved_until(self.last_up[device]) + bound {
                let reachability = self.server.ctl.device(self.devices[device].id()).map(|r| r.reachability);
                if reachability.is_some_and(|r| r != Reachability::Unreachable) {
                    return Err(self.violation(format!(
                        "{name} cut off at {} ms ({fault:?}) is still {reachability:?} for the server after {bound:?}",
                        from.as_millis(),
                    )));
                }
            }
            // A device still waiting for its Welcome gives up after the
            // SDK's welcome timeout instead (no heartbeats before it).
            let welcomed = self.devices[device].core.is_up();
            if device_side
                && !paused(Some(device))
                && at >= moved_until(self.last_down[device]) + bound
                && let Link::Up { conn } = self.devices[device].link
                && let Some(stream) = self.streams.get(&conn)
                && stream.opened < self.start + from
                && (welcomed || self.now >= stream.opened + CoreConfig::default().welcome_timeout + DETECTION_MARGIN)
            {
                return Err(self.violation(format!("{name} still uses {conn} {bound:?} after it was cut off ({fault:?})")));
            }
        }
        Ok(())
    }

    /// Why the world has not converged yet; `None` once it has: every device
    /// online in the session the server holds for it, every call the
    /// server holds fully connected and shown by exactly its members, the
    /// SFU holding exactly the controller's participants and forwarding
    /// every member to every other, and every call a device showed ended
    /// for it exactly once.
    pub fn unconverged(&self) -> Option<String> {
        let ctl = &self.server.ctl;
        for device in &self.devices {
            let Link::Up { .. } = device.link else { return Some(format!("{} is not connected", device.name)) };
            if !device.core.is_up() || device.core.pending_requests() > 0 {
                return Some(format!("{} has no session or requests in flight", device.name));
            }
            let row = ctl.device(device.id())?;
            if row.sessions != device.core.session().into_iter().collect::<Vec<_>>() {
                return Some(format!("{} believes in {:?}, the server holds {:?}", device.name, device.core.session(), row.sessions));
            }
            if row.call.map(|c| c.0) != device.call.as_ref().map(|c| c.id) {
                return Some(format!("{} shows {:?}, the server has it in {:?}", device.name, device.call, row.call));
            }
            if device.call.is_some() && !device.media.as_ref().is_some_and(|m| m.connected) {
                return Some(format!("{} is in a call without connected media", device.name));
            }
        }
        let ids = self.sfu_ids();
        let mut expected = Vec::new();
        for call in ctl.calls().into_iter().filter(|c| c.phase != CallPhase::Ended) {
            if call.members.iter().any(|(_, status, _)| *status != ParticipantStatus::Connected) {
                return Some(format!("{} has members not connected: {:?}", call.id, call.members));
            }
            let members: Vec<ParticipantId> = call.members.iter().filter_map(|(_, _, key)| key.and_then(|k| ids.get(&k).copied())).collect();
            if members.len() != call.members.len() {
                return Some(format!("{} has members the SFU does not hold", call.id));
            }
            for p in &members {
                for s in members.iter().filter(|s| *s != p) {
                    expected.push(TrackOutlet { room: room_of(call.id), publisher: *p, subscriber: *s, open: true });
                }
            }
        }
        if ids.len() != ctl.sfu_participants().len() {
            return Some(format!("the SFU holds {} participants, the controller {}", ids.len(), ctl.sfu_participants().len()));
        }
        expected.sort();
        let forwarding = self.server.sfu.forwarding();
        if forwarding != expected {
            return Some(format!("the SFU forwards {forwarding:?}, the controller's calls need {expected:?}"));
        }
        for device in &self.devices {
            let open: Vec<u64> = device.open_participations().iter().copied().collect();
            if open != device.call.iter().map(|c| c.id).collect::<Vec<_>>() {
                return Some(format!("{} has participations {open:?} not ended, showing {:?}", device.name, device.call));
            }
        }
        None
    }

    /// Every member of every live call hears every other since `since`.
    pub fn unheard(&self, since: Instant) -> Option<String> {
        for call in self.server.ctl.calls().into_iter().filter(|c| c.phase != CallPhase::Ended) {
            let members: Vec<usize> = call.members.iter().filter_map(|(d, _, _)| self.devices.iter().position(|x| x.id() == d)).collect();
            for &listener in &members {
                let media = self.devices[listener].media.as_ref()?;
                for &talker in members.iter().filter(|t| **t != listener) {
                    if media.heard.get(&(talker as u8)).is_none_or(|t| *t < since) {
                        return Some(format!("{} does not hear {} in {}", device_name(listener), device_name(talker), call.id));
                    }
                }
            }
        }
        None
    }

    /// What is left once every call is over and forgotten: nothing but one
    /// session, connection and their two timers per device.
    pub fn leaks(&self) -> Option<String> {
        let ctl = &self.server.ctl;
        let g = ctl.gauges();
        let stats = self.server.sfu.stats();
        let sfu = (stats.rooms, stats.participants, stats.tracks, stats.forwarding_entries, stats.demux_entries, stats.audio_slots);
        if sfu != (0, 0, 0, 0, 0, 0) {
            return Some(format!("the SFU kept (rooms, participants, tracks, forwarding, demux, slots) = {sfu:?}"));
        }
        if !self.server.participations.is_empty() {
            return Some(format!("the bridge still maps {} participations", self.server.participations.len()));
        }
        let devices = self.devices.len() as u64;
        if !ctl.calls().is_empty() || g.sfu_participants != 0 {
            return Some(format!("the controller kept calls {:?} and {} participants", ctl.calls(), g.sfu_participants));
        }
        if (g.sessions, g.sessions_detached, g.connections) != (devices, 0, devices) {
            return Some(format!("sessions {} ({} detached) and connections {} for {devices} devices", g.sessions, g.sessions_detached, g.connections));
        }
        // A heartbeat deadline per session, a credential expiry per connection.
        if g.timers != 2 * devices {
            return Some(format!("{} timers armed, expected {}", g.timers, 2 * devices));
        }
        for device in &self.devices {
            if device.call.is_some() || device.media.is_some() {
                return Some(format!("{} still shows {:?}", device.name, device.call));
            }
        }
        None
    }

    /// A digest of what each device went through: every terminal event
    /// (boot, call, reason, by), in order. Times are left out: str0m's DTLS
    /// draws from the OS, so media may connect some milliseconds earlier or
    /// later in another run of the same seed.
    fn outcome_digest(&self) -> u64 {
        let mut digest = 0xcbf2_9ce4_8422_2325u64;
        for device in &self.devices {
            for t in &device.terminals {
                let line = format!("{} {} {} {:?} {}", device.name, t.incarnation, t.ended.call_id, t.ended.reason(), t.ended.by);
                for byte in line.bytes() {
                    digest = (digest ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
                }
            }
        }
        digest
    }

    /// The measured figures.
    pub fn report(&self, convergence: Duration) -> Report {
        Report {
            convergence,
            calls: { let s = self.server.ctl.stats(); s.direct_calls_created + s.group_calls_created + s.rooms_opened },
            terminals: self.devices.iter().map(|d| d.terminals.len() as u64).sum(),
            faults: self.plan.faults.len(),
            members_at_convergence: self.members_at_convergence,
            peak_forwarding: self.peak_forwarding,
            digest: self.outcome_digest(),
            media_connected: self.server.ctl.stats().call_transitions.iter().filter(|(t, _)| t.to == CallPhase::Active).map(|(_, n)| *n).sum(),
        }
    }

    /// The end of the fault window.
    pub fn heal_time(&self) -> Instant {
        self.start + FAULT_WINDOW
    }
}
