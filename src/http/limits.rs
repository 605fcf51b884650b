//! Limits on the HTTP port's TCP connections, before hyper sees them:
//! sockets per source IP, and a deadline for the first complete request.
//!
//! The deadline runs from the accept. It covers the TLS handshake and the
//! part of a connection hyper does not time: `serve_connection_with_upgrades`
//! first reads up to 24 bytes to tell HTTP/2 from HTTP/1 with no timer, so a
//! socket that sends nothing would otherwise stay open for ever. It ends
//! with the server's first write (a response, or the 101 of the device
//! WebSocket), which only a complete request gets (so the first answer must
//! also begin within the deadline: every handler here answers in
//! milliseconds, the WebSocket upgrade at once); after that hyper's
//! `header_read_timeout` bounds every idle keep-alive wait, and the
//! controller's hello timeout bounds a WebSocket that never says Hello.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::accept::Accept;
use fleetcall_signaling::limits::{AddressLimit, AddressSlot, Refusal, TransportStats};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tracing::debug;

/// The HTTP port's limits.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Most simultaneous TCP connections (device WebSockets included) from
    /// one source IP.
    pub max_connections_per_address: usize,
    /// A connection must complete its first request (TLS handshake
    /// included) within this time of its accept; also hyper's header read
    /// timeout for every later request on it.
    pub request_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        // Browsers open up to six HTTP/1.1 connections per origin and one
        // WebSocket per tab; 256 leaves room for a few dozen browsers behind
        // one NAT or proxy (an operator behind a reverse proxy raises it).
        HttpLimits { max_connections_per_address: 256, request_timeout: Duration::from_secs(10) }
    }
}

/// An acceptor that applies [`HttpLimits`] around `inner` (plain TCP or TLS).
#[derive(Debug, Clone)]
pub struct LimitAcceptor<A> {
    inner: A,
    addresses: AddressLimit,
    stats: Arc<TransportStats>,
    request_timeout: Duration,
}

impl<A> LimitAcceptor<A> {
    /// Applies `limits` to what `inner` accepts, counting into `stats`.
    pub fn new(inner: A, limits: &HttpLimits, stats: Arc<TransportStats>) -> Self {
        LimitAcceptor { inner, addresses: AddressLimit::new(limits.max_connections_per_address, stats.clone()), stats, request_timeout: limits.request_timeout }
    }
}

type Accepting<T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send>>;

impl<A, S> Accept<TcpStream, S> for LimitAcceptor<A>
where
    A: Accept<TcpStream, S>,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = Limited<A::Stream>;
    type Service = A::Service;
    type Future = Accepting<(Self::Stream, Self::Service)>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let slot = match stream.peer_addr() {
            Ok(peer) => match self.addresses.try_acquire(peer.ip()) {
                Some(slot) => slot,
                None => {
                    self.stats.refused(Refusal::PerAddress);
                    // Counted; at debug so that a flood does not flood the log.
                    debug!(%peer, "connection limit of this address reached; closing");
                    // Dropping the stream closes it.
                    return Box::pin(std::future::ready(Err(io::Error::other("too many connections from this address"))));
                }
            },
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let deadline = Instant::now() + self.request_timeout;
        let accepting = self.inner.accept(stream, service);
        let stats = self.stats.clone();
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, accepting).await {
                Ok(Ok((stream, service))) => Ok((Limited { inner: stream, _slot: slot, first_request: Some(Box::pin(tokio::time::sleep_until(deadline))), expired: false, stats }, service)),
                Ok(Err(e)) => Err(e),
                Err(_) => {
                    stats.refused(Refusal::RequestTimeout);
                    debug!("TLS handshake did not complete in time");
                    Err(io::Error::new(io::ErrorKind::TimedOut, "no request in time"))
                }
            }
        })
    }
}

/// A connection under [`HttpLimits`]: holds its address's slot until it
/// closes, and fails its reads once the first-request deadline passed with
/// nothing written yet.
#[derive(Debug)]
pub struct Limited<S> {
    inner: S,
    _slot: AddressSlot,
    /// Until the server's first write.
    first_request: Option<Pin<Box<Sleep>>>,
    expired: bool,
    stats: Arc<TransportStats>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = &mut this.first_request
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.first_request = None;
            this.expired = true;
            this.stats.refused(Refusal::RequestTimeout);
            debug!("no complete request in time; closing");
        }
        if this.expired {
            // hyper drops the connection on a read error: that closes it.
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no complete request in time")));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            // Only a complete request is answered.
            this.first_request = None;
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.first_request = None;
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use axum_server::accept::DefaultAcceptor;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    #[tokio::test]
    async fn a_silent_socket_fails_its_reads_at_the_deadline_and_an_answered_one_does_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stats = Arc::new(TransportStats::default());
        let limits = HttpLimits { max_connections_per_address: 2, request_timeout: Duration::from_millis(200) };
        let acceptor = LimitAcceptor::new(DefaultAcceptor, &limits, stats.clone());

        let (_client, server) = pair(&listener).await;
        let (mut silent, ()) = acceptor.accept(server, ()).await.unwrap();
        let started = std::time::Instant::now();
        let error = silent.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(150), "not before the deadline");
        assert_eq!(stats.refusals(Refusal::RequestTimeout), 1);

        let (mut client, server) = pair(&listener).await;
        let (mut answered, ()) = acceptor.accept(server, ()).await.unwrap();
        answered.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(answered.read(&mut [0u8; 16]).await.unwrap(), 1, "past the deadline, an answered connection reads on");
        assert_eq!(stats.refusals(Refusal::RequestTimeout), 1);
        assert_eq!(stats.connections.load(std::sync::atomic::Ordering::Relaxed), 2);

        // Two are open from 127.0.0.1: a third is refused, and counted.
        let (_client, server) = pair(&listener).await;
        assert!(acceptor.accept(server, ()).await.is_err());
        assert_eq!(stats.refusals(Refusal::PerAddress), 1);
        drop(silent);
        let (_client, server) = pair(&listener).await;
        assert!(acceptor.accept(server, ()).await.is_ok(), "a closed connection frees its slot");
    }
}
