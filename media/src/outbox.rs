//! A worker's outgoing datagrams, sent in batches: one `sendmmsg` for up to
//! [`SEND_BATCH`] datagrams instead of one `sendmsg` each.
//!
//! Audio fan-out sends every packet to a different address, which GSO cannot
//! batch (it splits one buffer into segments for one destination); `sendmmsg`
//! takes a destination per datagram. The kernel still does the same work per
//! datagram; what a batch saves is the system call entry and exit, which on
//! this kind of VM costs about as much as a small send itself.

use std::io::{self, IoSlice};
use std::net::{SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;

use fleetcall_sfu::Transmit;
use nix::errno::Errno;
use nix::sys::socket::{sendmmsg, MsgFlags, MultiHeaders, SockaddrIn, SockaddrIn6, SockaddrLike};
use tracing::debug;

/// Datagrams per `sendmmsg` (the kernel takes up to 1024 at once; a batch is
/// rarely over a few dozen, and the headers are allocated once for this many).
pub(crate) const SEND_BATCH: usize = 64;

/// What sending cost and lost, for the worker's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sent {
    /// System calls made.
    pub calls: u64,
    /// Datagrams the kernel took.
    pub datagrams: u64,
    /// Datagrams dropped: the send buffer was full, or the kernel refused
    /// the destination.
    pub dropped: u64,
}

/// Datagrams waiting for the next flush, and the send headers, kept from
/// one flush to the next.
#[derive(Debug)]
pub(crate) struct Outbox {
    queued: Vec<Transmit>,
    family: Family,
}

/// The socket's address family decides how destinations are written: an
/// IPv6 socket (dual-stack) reaches IPv4 peers through mapped addresses.
#[derive(Debug)]
enum Family {
    V4(MultiHeaders<SockaddrIn>),
    V6(MultiHeaders<SockaddrIn6>),
}

impl Outbox {
    /// An outbox for a socket bound to `local`.
    pub(crate) fn new(local: SocketAddr) -> Outbox {
        let family = match local {
            SocketAddr::V4(_) => Family::V4(MultiHeaders::preallocate(SEND_BATCH, None)),
            SocketAddr::V6(_) => Family::V6(MultiHeaders::preallocate(SEND_BATCH, None)),
        };
        Outbox { queued: Vec::with_capacity(SEND_BATCH), family }
    }

    /// Queues a datagram for the next flush.
    pub(crate) fn push(&mut self, transmit: Transmit) {
        self.queued.push(transmit);
    }

    /// Datagrams queued.
    pub(crate) fn len(&self) -> usize {
        self.queued.len()
    }

    /// Sends everything queued, never blocking. UDP semantics: what the
    /// kernel cannot take now (a full send buffer) is dropped, as the network
    /// would drop it, and a destination the kernel refuses costs only its
    /// own datagram.
    pub(crate) fn flush(&mut self, socket: &impl AsRawFd) -> Sent {
        let mut sent = Sent::default();
        let fd = socket.as_raw_fd();
        let mut next = 0;
        while next < self.queued.len() {
            let batch = &self.queued[next..self.queued.len().min(next + SEND_BATCH)];
            sent.calls += 1;
            let result = match &mut self.family {
                Family::V4(headers) => send(fd, headers, batch, |a| match a {
                    SocketAddr::V4(a) => Some(SockaddrIn::from(a)),
                    SocketAddr::V6(_) => None,
                }),
                Family::V6(headers) => send(fd, headers, batch, |a| {
                    Some(SockaddrIn6::from(match a {
                        SocketAddr::V4(a) => SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0),
                        SocketAddr::V6(a) => a,
                    }))
                }),
            };
            match result {
                Ok(count) => {
                    sent.datagrams += count as u64;
                    next += count;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    sent.dropped += (self.queued.len() - next) as u64;
                    break;
                }
                // The first datagram of the batch was refused (an address
                // of the wrong family, a route the kernel has not got).
                Err(e) => {
                    debug!(error = %e, destination = %self.queued[next].destination, "udp send failed");
                    sent.dropped += 1;
                    next += 1;
                }
            }
        }
        self.queued.clear();
        sent
    }
}

/// One `sendmmsg` of `batch`; returns how many datagrams the kernel took
/// (at least one), or the error of the first.
fn send<S: SockaddrLike + Copy>(
    fd: std::os::fd::RawFd,
    headers: &mut MultiHeaders<S>,
    batch: &[Transmit],
    address: impl Fn(SocketAddr) -> Option<S>,
) -> io::Result<usize> {
    let addresses: Vec<Option<S>> = batch.iter().map(|t| address(t.destination)).collect();
    if addresses[0].is_none() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // A destination the socket cannot reach ends the batch before it; the
    // next call starts with it and reports it alone.
    let usable = addresses.iter().take_while(|a| a.is_some()).count();
    let slices: Vec<[IoSlice<'_>; 1]> = batch[..usable].iter().map(|t| [IoSlice::new(&t.contents)]).collect();
    match sendmmsg(fd, headers, &slices, &addresses[..usable], [], MsgFlags::MSG_DONTWAIT) {
        Ok(results) => Ok(results.count().max(1)),
        Err(Errno::EAGAIN) => Err(io::Error::from(io::ErrorKind::WouldBlock)),
        Err(errno) => Err(io::Error::from(errno)),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};
    use std::time::Duration;

    use super::*;

    fn listener(ip: std::net::IpAddr) -> UdpSocket {
        let socket = UdpSocket::bind((ip, 0)).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        socket
    }

    fn transmit(from: &UdpSocket, to: &UdpSocket, payload: u8) -> Transmit {
        Transmit { source: from.local_addr().unwrap(), destination: to.local_addr().unwrap(), contents: vec![payload; 100] }
    }

    fn receive(socket: &UdpSocket) -> Vec<u8> {
        let mut buffer = [0u8; 1500];
        let (len, _) = socket.recv_from(&mut buffer).unwrap();
        buffer[..len].to_vec()
    }

    #[test]
    fn one_call_sends_to_every_destination() {
        let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let listeners: Vec<UdpSocket> = (0..5).map(|_| listener(Ipv4Addr::LOCALHOST.into())).collect();
        let mut outbox = Outbox::new(sender.local_addr().unwrap());
        for (i, l) in listeners.iter().enumerate() {
            outbox.push(transmit(&sender, l, i as u8));
        }
        assert_eq!(outbox.flush(&sender), Sent { calls: 1, datagrams: 5, dropped: 0 });
        assert_eq!(outbox.len(), 0);
        for (i, l) in listeners.iter().enumerate() {
            assert_eq!(receive(l), vec![i as u8; 100]);
        }
    }

    #[test]
    fn more_than_a_batch_takes_more_calls() {
        let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let l = listener(Ipv4Addr::LOCALHOST.into());
        let mut outbox = Outbox::new(sender.local_addr().unwrap());
        for i in 0..SEND_BATCH + 3 {
            outbox.push(transmit(&sender, &l, i as u8));
        }
        assert_eq!(outbox.flush(&sender), Sent { calls: 2, datagrams: SEND_BATCH as u64 + 3, dropped: 0 });
        for i in 0..SEND_BATCH + 3 {
            assert_eq!(receive(&l)[0], i as u8, "in order");
        }
    }

    #[test]
    fn an_ipv6_socket_reaches_ipv4_peers_through_mapped_addresses() {
        let sender = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).unwrap();
        let v4 = listener(Ipv4Addr::LOCALHOST.into());
        let v6 = listener(Ipv6Addr::LOCALHOST.into());
        let mut outbox = Outbox::new(sender.local_addr().unwrap());
        outbox.push(Transmit { source: sender.local_addr().unwrap(), destination: v4.local_addr().unwrap(), contents: vec![4] });
        outbox.push(Transmit { source: sender.local_addr().unwrap(), destination: v6.local_addr().unwrap(), contents: vec![6] });
        assert_eq!(outbox.flush(&sender), Sent { calls: 1, datagrams: 2, dropped: 0 });
        assert_eq!(receive(&v4), vec![4]);
        assert_eq!(receive(&v6), vec![6]);
    }

    #[test]
    fn a_destination_the_socket_cannot_reach_costs_only_its_own_datagram() {
        let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let l = listener(Ipv4Addr::LOCALHOST.into());
        let mut outbox = Outbox::new(sender.local_addr().unwrap());
        outbox.push(transmit(&sender, &l, 1));
        // IPv6 from an IPv4 socket, then the port-0 address no socket can send to.
        outbox.push(Transmit { source: sender.local_addr().unwrap(), destination: "[::1]:9".parse().unwrap(), contents: vec![0xff] });
        outbox.push(Transmit { source: sender.local_addr().unwrap(), destination: "127.0.0.1:0".parse().unwrap(), contents: vec![0xfe] });
        outbox.push(transmit(&sender, &l, 2));
        let sent = outbox.flush(&sender);
        assert_eq!((sent.datagrams, sent.dropped), (2, 2), "{sent:?}");
        assert_eq!(receive(&l), vec![1; 100]);
        assert_eq!(receive(&l), vec![2; 100]);
    }
}
