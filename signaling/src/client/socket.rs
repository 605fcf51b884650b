//! A UDP socket for quinn that can be cut: while cut, it swallows every
//! datagram both ways, like a cable pulled out. The client uses it to drop a
//! connection without the goodbye a QUIC close would send.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};

/// Wraps the runtime's socket; shares its switch with every socket the same
/// endpoint is rebound to.
pub(super) struct CuttableSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    cut: Arc<AtomicBool>,
}

impl fmt::Debug for CuttableSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CuttableSocket").field("cut", &self.cut.load(Ordering::Relaxed)).finish()
    }
}

impl CuttableSocket {
    pub(super) fn wrap(
        runtime: &dyn Runtime,
        socket: std::net::UdpSocket,
        cut: Arc<AtomicBool>,
    ) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Ok(Arc::new(CuttableSocket { inner: runtime.wrap_udp_socket(socket)?, cut }))
    }

    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }
}

impl AsyncUdpSocket for CuttableSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if self.is_cut() {
            // Pretend it left: a lost datagram, as on a dead link.
            return Ok(());
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(&self, cx: &mut Context, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> Poll<io::Result<usize>> {
        loop {
            match self.inner.poll_recv(cx, bufs, meta) {
                // Read and discarded; polling again registers the waker.
                Poll::Ready(Ok(_)) if self.is_cut() => continue,
                other => return other,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
