//! What the transports refuse before the controller sees anything: sockets
//! per source address, and the counters of every refusal.
//!
//! The transports have no Prometheus registry; they count into a shared
//! [`TransportStats`] of plain atomics, which the binary's `/metrics` reads
//! at scrape time (as it reads the controller's `Stats`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Open sockets per source IP, capped. Cloning shares the table.
#[derive(Debug, Clone)]
pub struct AddressLimit {
    inner: Arc<Table>,
}

#[derive(Debug)]
struct Table {
    max_per_address: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
    /// Where the sockets open now are shown.
    stats: Arc<TransportStats>,
}

/// One socket of an address, counted until dropped.
#[derive(Debug)]
pub struct AddressSlot {
    table: Arc<Table>,
    ip: IpAddr,
}

impl AddressLimit {
    /// At most `max_per_address` sockets per source IP at once; the sockets
    /// open now are shown in `stats.connections`.
    pub fn new(max_per_address: usize, stats: Arc<TransportStats>) -> Self {
        AddressLimit { inner: Arc::new(Table { max_per_address, open: Mutex::default(), stats }) }
    }

    /// A slot for one more socket from `ip`, or `None` when it holds the
    /// most already.
    pub fn try_acquire(&self, ip: IpAddr) -> Option<AddressSlot> {
        let mut open = self.inner.lock();
        let n = open.entry(canonical(ip)).or_insert(0);
        if *n >= self.inner.max_per_address {
            if *n == 0 {
                open.remove(&canonical(ip));
            }
            return None;
        }
        *n += 1;
        self.inner.stats.connections.fetch_add(1, Ordering::Relaxed);
        Some(AddressSlot { table: self.inner.clone(), ip: canonical(ip) })
    }

    /// Whether `ip` holds the most sockets already.
    pub fn is_full(&self, ip: IpAddr) -> bool {
        self.inner.lock().get(&canonical(ip)).copied().unwrap_or(0) >= self.inner.max_per_address
    }

    /// Sockets open now, over every address.
    pub fn open(&self) -> usize {
        self.inner.lock().values().sum()
    }

    /// Addresses with a socket open now.
    pub fn addresses(&self) -> usize {
        self.inner.lock().len()
    }
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // A poisoned lock only means a panic elsewhere between two plain
        // integer updates; the map is still valid.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            self.table.stats.connections.fetch_sub(1, Ordering::Relaxed);
            // Forget idle addresses: the table only holds those with a socket.
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// An IPv4 client on a dual-stack socket arrives as `::ffff:a.b.c.d`; it is
/// the same address as `a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Why a transport refused or closed a socket before (or instead of) the
/// controller hearing of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The source address holds the most sockets already.
    PerAddress,
    /// The transport holds the most sockets already (all addresses).
    Capacity,
    /// A TCP connection sent no complete HTTP request in time (TLS handshake
    /// included).
    RequestTimeout,
    /// A QUIC handshake did not complete in time.
    HandshakeTimeout,
    /// A QUIC connection opened no control stream in time.
    StreamTimeout,
}

impl Refusal {
    /// Every reason, for series that exist before the first event.
    pub const ALL: [Refusal; 5] = [Refusal::PerAddress, Refusal::Capacity, Refusal::RequestTimeout, Refusal::HandshakeTimeout, Refusal::StreamTimeout];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::PerAddress => "per_address",
            Refusal::Capacity => "capacity",
            Refusal::RequestTimeout => "request_timeout",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::StreamTimeout => "stream_timeout",
        }
    }
}

/// The transport a socket came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// The device control plane.
    Quic,
    /// The HTTP port: web client, admin API and the device WebSocket.
    Http,
}

impl Transport {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Http => "http",
        }
    }
}

/// Counters of one transport. Shared by its accept loop and every socket
/// task; read at scrape time.
#[derive(Debug, Default)]
pub struct TransportStats {
    refused: [AtomicU64; Refusal::ALL.len()],
    /// QUIC Retry packets sent (address validation under handshake load).
    pub retries: AtomicU64,
    /// QUIC handshakes in progress now.
    pub handshakes: AtomicU64,
    /// Sockets open now (QUIC: handshakes included).
    pub connections: AtomicU64,
}

impl TransportStats {
    /// Counts one refusal.
    pub fn refused(&self, why: Refusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals so far for `why`.
    pub fn refusals(&self, why: Refusal) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_its_slots_and_gets_them_back() {
        let stats = Arc::new(TransportStats::default());
        let limit = AddressLimit::new(2, stats.clone());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limit.try_acquire(a).unwrap();
        let _second = limit.try_acquire(a).unwrap();
        assert!(limit.try_acquire(a).is_none(), "a third socket from one address is refused");
        assert!(limit.try_acquire("::ffff:10.0.0.1".parse().unwrap()).is_none(), "the v4-mapped form is the same address");
        assert!(limit.is_full(a));
        let _other = limit.try_acquire(b).expect("another address is not affected");
        assert_eq!((limit.open(), limit.addresses()), (3, 2));
        assert_eq!(stats.connections.load(Ordering::Relaxed), 3);
        drop(first);
        assert!(!limit.is_full(a));
        assert!(limit.try_acquire(a).is_some(), "a closed socket frees its slot");
        assert_eq!(limit.open(), 2, "the dropped temporary slot went back");
    }

    #[test]
    fn a_zero_limit_refuses_and_remembers_nothing() {
        let limit = AddressLimit::new(0, Arc::default());
        assert!(limit.try_acquire("10.0.0.1".parse().unwrap()).is_none());
        assert_eq!(limit.addresses(), 0);
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let stats = TransportStats::default();
        stats.refused(Refusal::PerAddress);
        stats.refused(Refusal::PerAddress);
        stats.refused(Refusal::StreamTimeout);
        assert_eq!(stats.refusals(Refusal::PerAddress), 2);
        assert_eq!(stats.refusals(Refusal::StreamTimeout), 1);
        assert_eq!(stats.refusals(Refusal::Capacity), 0);
    }
}
