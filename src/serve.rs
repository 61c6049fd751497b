//! A hardened HTTP/1.1 accept loop for a public BITS server.
//!
//! `axum::serve` sets no timeout on reading request headers, so a client that sends its
//! headers a byte at a time ("slow-loris") holds a connection, a task and a file descriptor
//! for as long as it likes, and enough of them starve the server. [`serve`] is the same loop
//! with the limits a server on the open network needs: a header read timeout, a cap on open
//! connections, and graceful shutdown. Fragment bodies are bounded by the layer's own
//! [`body_idle_timeout`](crate::BitsLayerBuilder::body_idle_timeout).
//!
//! Windows clients speak HTTP/1.1 to BITS servers, so this loop serves HTTP/1.1 only. Use any
//! other server (`axum::serve`, hyper directly, a TLS acceptor) if you need more; the layer
//! does not depend on this module.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
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
        shutdown_timeout: Duration::from_secs(60),
    }
}

/// A configured accept loop; see [`serve`].
#[must_use = "a server does nothing until it is run"]
#[derive(Debug)]
pub struct Serve<S> {
    listener: TcpListener,
    service: S,
    header_read_timeout: Duration,
    max_connections: usize,
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
            shutdown_timeout,
        } = self;
        let graceful = GracefulShutdown::new();
        let slots = Arc::new(Semaphore::new(max_connections));
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
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
            let connection =
                builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "connection ended with an error");
                }
                drop(slot);
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
