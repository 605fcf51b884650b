//! The media sockets of one group task (a room, a call pair): one UDP
//! socket per media link, keyed by the caller, read only when the kernel
//! says it has datagrams.
//!
//! A task drives many links; polling every socket on every wake would make
//! each wake cost the whole group. Each socket instead has one readiness
//! future in a [`FuturesUnordered`], which polls only the futures whose
//! socket woke it, so [`Sockets::readable`] names the one link with work.

use std::collections::HashMap;
use std::hash::Hash;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::future::{AbortHandle, Abortable, BoxFuture, FutureExt};
use futures_util::stream::FuturesUnordered;
use tokio::net::UdpSocket;

use fleetcall_peer::Datagram;

/// Largest datagram the server sends.
pub const MAX_DATAGRAM: usize = 2048;

struct Slot {
    socket: Arc<UdpSocket>,
    /// Cancels the socket's readiness future when it closes.
    watch: AbortHandle,
}

/// UDP sockets by key. See the [module docs](self).
pub struct Sockets<K> {
    slots: HashMap<K, Slot>,
    ready: FuturesUnordered<Abortable<BoxFuture<'static, K>>>,
    send_errors: u64,
}

impl<K> std::fmt::Debug for Sockets<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockets")
            .field("open", &self.slots.len())
            .field("send_errors", &self.send_errors)
            .finish()
    }
}

impl<K> Default for Sockets<K> {
    fn default() -> Self {
        Sockets { slots: HashMap::new(), ready: FuturesUnordered::new(), send_errors: 0 }
    }
}

impl<K: Copy + Eq + Hash + Send + 'static> Sockets<K> {
    /// Binds a socket on `ip` for `key` (closing the one it had); returns
    /// its address.
    pub fn open(&mut self, key: K, ip: IpAddr) -> io::Result<SocketAddr> {
        self.close(key);
        let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?;
        socket.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(socket)?);
        let local = socket.local_addr()?;
        let watch = watch(&self.ready, key, socket.clone());
        self.slots.insert(key, Slot { socket, watch });
        Ok(local)
    }

    /// Closes `key`'s socket, if it has one.
    pub fn close(&mut self, key: K) {
        if let Some(slot) = self.slots.remove(&key) {
            // The future ends (and lets go of the socket) on the next poll.
            slot.watch.abort();
        }
    }

    /// Sends from `key`'s socket without waiting: a full socket buffer is
    /// loss, as on a real network (counted in [`send_errors`](Self::send_errors)).
    pub fn send(&mut self, key: K, datagram: &Datagram) {
        let Some(slot) = self.slots.get(&key) else { return };
        if slot.socket.try_send_to(&datagram.contents, datagram.destination).is_err() {
            self.send_errors += 1;
        }
    }

    /// A key whose socket has datagrams waiting; pending while none has.
    /// Read it with [`try_recv`](Self::try_recv) until that says `None`:
    /// only then is the socket watched again. Cancel-safe.
    pub async fn readable(&mut self) -> K {
        loop {
            match self.ready.next().await {
                Some(Ok(key)) => return key,
                // A closed socket's future.
                Some(Err(_aborted)) => {}
                // Nothing to watch: a socket opened later is seen on the
                // caller's next call.
                None => std::future::pending().await,
            }
        }
    }

    /// The next datagram waiting on `key`'s socket; `None` once it has no
    /// more (it is then watched again) or is closed.
    pub fn try_recv(&mut self, key: K, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        let slot = self.slots.get_mut(&key)?;
        loop {
            match slot.socket.try_recv_from(buf) {
                Ok(got) => return Some(got),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    slot.watch = watch(&self.ready, key, slot.socket.clone());
                    return None;
                }
                // Other errors (ICMP) are transient: read on.
                Err(_) => {}
            }
        }
    }

    /// Datagrams the sockets refused so far.
    pub fn send_errors(&self) -> u64 {
        self.send_errors
    }
}

/// Watches `socket` for readability in `ready`; the handle cancels it.
fn watch<K: Send + 'static>(ready: &FuturesUnordered<Abortable<BoxFuture<'static, K>>>, key: K, socket: Arc<UdpSocket>) -> AbortHandle {
    let (handle, registration) = AbortHandle::new_pair();
    let readable = async move {
        // An error surfaces on the next read.
        let _ = socket.readable().await;
        key
    };
    ready.push(Abortable::new(readable.boxed(), registration));
    handle
}
