//! A device's media link: its [`Peer`] on its own UDP socket, driven by the
//! task of its group (many devices per task, many tasks per thread).

use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::task::Poll;
use std::time::Instant;

use anyhow::Context;
use tokio::net::UdpSocket;

use crate::peer::{Peer, PeerFactory};

/// Largest datagram the server sends.
pub const MAX_DATAGRAM: usize = 2048;

/// A peer and its socket.
#[derive(Debug)]
pub struct Link {
    /// The WebRTC session.
    pub peer: Peer,
    socket: UdpSocket,
    /// A media-drop fault: every datagram both ways is dropped until then.
    pub drop_until: Option<Instant>,
    /// Datagrams the socket refused (full buffer).
    pub send_errors: u64,
}

impl Link {
    /// Binds a socket on `ip` and creates the peer on it.
    pub fn bind(
        factory: &PeerFactory,
        ip: IpAddr,
        now: Instant,
        ts_base: u32,
        seq_base: u16,
    ) -> anyhow::Result<Link> {
        let std_socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("binding a media socket on {ip}"))?;
        std_socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(std_socket)?;
        let local = socket.local_addr()?;
        let peer = factory.peer(now, local, ts_base, seq_base)?;
        Ok(Link {
            peer,
            socket,
            drop_until: None,
            send_errors: 0,
        })
    }

    /// Whether a media-drop fault holds at `now`.
    pub fn dropping(&self, now: Instant) -> bool {
        self.drop_until.is_some_and(|until| now < until)
    }

    /// Sends everything the peer has queued (or drops it during a fault).
    pub fn flush(&mut self, now: Instant) {
        let dropping = self.dropping(now);
        while let Some(datagram) = self.peer.poll_transmit() {
            if dropping {
                continue;
            }
            // Non-blocking: a full socket buffer is loss, as on a real network.
            if self
                .socket
                .try_send_to(&datagram.contents, datagram.destination)
                .is_err()
            {
                self.send_errors += 1;
            }
        }
    }

    /// Reads every datagram waiting on the socket into the peer; returns
    /// how many arrived.
    pub fn drain_socket(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        loop {
            match self.socket.try_recv_from(buf) {
                Ok((len, source)) => {
                    n += 1;
                    let now = Instant::now();
                    if self.dropping(now) {
                        continue;
                    }
                    self.peer.handle_datagram(now, source, &buf[..len]);
                }
                // WouldBlock: drained. Other errors (ICMP) are transient.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return n,
                Err(_) => {}
            }
        }
    }
}

/// Resolves to the index of a link whose socket is readable; pending
/// forever when there is none. `links` is scanned from position `start`
/// (rotate it between calls so no socket starves).
pub async fn readable(links: &[(usize, &Link)], start: usize) -> usize {
    poll_fn(|cx| {
        let n = links.len();
        for k in 0..n {
            let (i, link) = links[(start + k) % n];
            // Errors (ICMP) surface on the next read; count it readable.
            if link.socket.poll_recv_ready(cx).is_ready() {
                return Poll::Ready(i);
            }
        }
        Poll::Pending
    })
    .await
}
