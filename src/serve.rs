//! A hardened HTTP/1.1 accept loop for a public BITS server.
//!
//! `axum::serve` sets no timeout on reading request headers, so a client that sends its
//! headers a byte at a time ("slow-loris") holds a connection, a task and a file descriptor
//! for as long as it likes, and enough of them starve the server. [`serve`] is the same loop
//! with the limits a server on the open network needs: a header read timeout, a cap on open
//! connections, bounded read buffers, and graceful shutdown. Fragment bodies are bounded by the layer's own
//! [`body_idle_timeout`](crate::BitsLayerBuilder::body_idle_timeout).
//!
//! Windows clients speak HTTP/1.1 to BITS servers, so this loop serves HTTP/1.1 only. Use any
//! other server (`axum::serve`, hyper directly, a TLS acceptor) if you need more; the layer
//! does not depend on this module.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_service::Service;

/// Serves `service` (an axum `Router`, or any tower service) on `listener`. Configure it, then
/// [`run`](Serve::run) it.
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// use std::time::Duration;
/// let app = axum::Router::new();
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// axum_bits::serve(listener, app)
///     .header_read_timeout(Duration::from_secs(10))
///     .max_connections(4096)
///     .run(async { let _ = tokio::signal::ctrl_c().await; })
///     .await
/// # }
/// ```
pub fn serve<S>(listener: TcpListener, service: S) -> Serve<S> {
    Serve {
        listener,
        service,
        header_read_timeout: Duration::from_secs(30),
        max_connections: 10_000,
        full_read_buffers: 64,
        small_read_buffer: 16 << 10,
        shutdown_timeout: Duration::from_secs(60),
    }
}

/// The least read buffer hyper accepts.
const MIN_READ_BUFFER: usize = 8 << 10;

/// A configured accept loop; see [`serve`].
#[must_use = "a server does nothing until it is run"]
#[derive(Debug)]
pub struct Serve<S> {
    listener: TcpListener,
    service: S,
    header_read_timeout: Duration,
    max_connections: usize,
    full_read_buffers: usize,
    small_read_buffer: usize,
    shutdown_timeout: Duration,
}

impl<S> Serve<S> {
    /// How long a client may take to send a request's headers (including the wait for the
    /// next request on a kept-alive connection once it has started); the connection is closed
    /// after it. Default: 30 seconds.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Most connections open at once; further clients wait in the listen backlog until one
    /// closes. Default: 10,000.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// Bounds what the connections' read buffers hold between them. A connection reads into a
    /// buffer that grows while reads fill it, up to hyper's default of about 400 KiB, and
    /// stays that large while the connection is open: what a fast upload wants, and what
    /// makes thousands of slow ones cost hundreds of MiB. So at most `full` connections at a
    /// time may grow theirs that far; a connection accepted while `full` others may gets at
    /// most `small` bytes (at least 8 KiB), which also bounds its request head (hyper answers a
    /// longer one with 431). Default: 64 and 16 KiB, the head limit of Windows' own HTTP
    /// server, ample for BITS, whose header values are at most 4 KB.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    /// // Every connection reads into at most 32 KiB.
    /// axum_bits::serve(listener, axum::Router::new())
    ///     .read_buffers(0, 32 << 10)
    ///     .run(std::future::pending())
    ///     .await
    /// # }
    /// ```
    pub fn read_buffers(mut self, full: usize, small: usize) -> Self {
        self.full_read_buffers = full;
        self.small_read_buffer = small.max(MIN_READ_BUFFER);
        self
    }

    /// After the shutdown signal, how long open connections may take to finish their
    /// requests before they are dropped. Default: 60 seconds.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Accepts connections until `signal` resolves, then stops accepting, lets requests in
    /// flight finish (closing idle connections), and returns.
    pub async fn run<B>(self, signal: impl Future<Output = ()>) -> io::Result<()>
    where
        S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<crate::BoxError>,
    {
        let Self {
            listener,
            service,
            header_read_timeout,
            max_connections,
            full_read_buffers,
            small_read_buffer,
            shutdown_timeout,
        } = self;
        let graceful = GracefulShutdown::new();
        let slots = Arc::new(Semaphore::new(max_connections));
        let full_buffers = Arc::new(FullBuffers(AtomicUsize::new(full_read_buffers)));
        let mut full = hyper::server::conn::http1::Builder::new();
        full.timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        let mut small = full.clone();
        small.max_buf_size(small_read_buffer);
        tokio::pin!(signal);
        loop {
            let accepted = tokio::select! {
                () = &mut signal => break,
                accepted = accept(&listener, &slots) => accepted,
            };
            let Some((stream, peer, slot)) = accepted else {
                continue;
            };
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
            let service = WithPeer {
                inner: service.clone(),
                peer,
            };
            let full_buffer = full_buffers.take();
            let builder = if full_buffer.is_some() { &full } else { &small };
            let connection =
                builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "connection ended with an error");
                }
                drop((slot, full_buffer));
            });
        }
        drop(listener);
        if tokio::time::timeout(shutdown_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                ?shutdown_timeout,
                "connections still open after the shutdown timeout; dropped"
            );
        }
        Ok(())
    }
}

/// The next connection, once a slot is free. `None` after a failed accept (logged; the loop
/// goes on, pausing briefly when out of file descriptors).
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(
    tokio::net::TcpStream,
    std::net::SocketAddr,
    tokio::sync::OwnedSemaphorePermit,
)> {
    let slot = slots.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, peer)) => Some((stream, peer, slot)),
        Err(error) => {
            tracing::warn!(%error, "accept failed");
            // EMFILE and friends: give closing connections a moment instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// How many more connections may have a full read buffer.
struct FullBuffers(AtomicUsize);

impl FullBuffers {
    /// One of the full buffers, if one is left; given back when dropped.
    fn take(self: &Arc<Self>) -> Option<FullBuffer> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .ok()
            .map(|_| FullBuffer(self.clone()))
    }
}

/// A connection's claim on a full read buffer.
struct FullBuffer(Arc<FullBuffers>);

impl Drop for FullBuffer {
    fn drop(&mut self) {
        self.0.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// Puts the connection's peer address into every request's extensions, as
/// [`PeerAddr`](crate::PeerAddr) and (feature `axum`) as axum's `ConnectInfo`, so that the
/// per-peer limits and the app's own `ConnectInfo` extractor see it.
#[derive(Clone)]
struct WithPeer<S> {
    inner: S,
    peer: std::net::SocketAddr,
}

impl<S, B> Service<Request<B>> for WithPeer<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let extensions = request.extensions_mut();
        extensions.insert(crate::PeerAddr(self.peer.ip()));
        #[cfg(feature = "axum")]
        extensions.insert(axum::extract::ConnectInfo(self.peer));
        self.inner.call(request)
    }
}
