//! The clients of (c): each its own HTTP/1.1 connection (hyper's connection-level client),
//! Create-Session, Fragments whose bodies are released at a fixed rate, Close-Session, and the
//! time of every Ack.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::PROTOCOL;
use crate::cli::CConfig;
use crate::client::received_range;
use crate::concurrent::{CServer, PacketKind, c_file};
use crate::report::chain;
use crate::servers::FSYNC_HEADER;

/// The chunks a paced body of (c) yields.
pub(crate) const PACE_CHUNK: usize = 16 << 10;

/// What one client of (c) saw.
#[derive(Default)]
pub(crate) struct SessionOutcome {
    pub(crate) latencies: Vec<(PacketKind, Duration)>,
    pub(crate) first_sent: Option<Instant>,
    pub(crate) last_ack: Option<Instant>,
    pub(crate) error: Option<String>,
}

/// Sessions open at once, as the clients see them.
#[derive(Default)]
struct Gauge {
    open: AtomicUsize,
    peak: AtomicUsize,
}

impl Gauge {
    fn enter(&self) -> OpenSession<'_> {
        let now = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        OpenSession(self)
    }
}

struct OpenSession<'a>(&'a Gauge);

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs every client of (c); returns what each saw, and the peak of open sessions.
pub(crate) async fn run_sessions(
    server: CServer,
    port: u16,
    c: CConfig,
    fragment: Bytes,
    fsync_last: bool,
) -> (Vec<SessionOutcome>, usize) {
    let load = Arc::new(Load {
        server,
        port,
        c,
        fragment,
        gauge: Gauge::default(),
        fsync_last,
    });
    // A little time to spawn every task before the first one is due.
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..c.sessions {
        let arrival = start + c.ramp.mul_f64(i as f64 / c.sessions as f64);
        let load = load.clone();
        tasks.spawn(async move {
            tokio::time::sleep_until(arrival).await;
            let mut outcome = SessionOutcome::default();
            if let Err(e) = client_session(&load, i, &mut outcome).await {
                outcome.error = Some(format!("session {i}: {e}"));
            }
            (i, outcome)
        });
    }
    let mut outcomes: Vec<SessionOutcome> = (0..c.sessions)
        .map(|_| SessionOutcome {
            error: Some("the client task did not finish".into()),
            ..SessionOutcome::default()
        })
        .collect();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((i, outcome)) => outcomes[i] = outcome,
            // A panic in this program; the session keeps its "did not finish" error.
            Err(e) => eprintln!("a client task failed: {e}"),
        }
    }
    (outcomes, load.gauge.peak.load(Ordering::SeqCst))
}

/// What every client of one (c) run shares.
struct Load {
    server: CServer,
    port: u16,
    c: CConfig,
    /// The body of a whole fragment; shorter ones are its beginning.
    fragment: Bytes,
    gauge: Gauge,
    /// The baseline fsyncs each file after its last POST, as the bits commit does.
    fsync_last: bool,
}

/// One client of (c): its own connection, Create-Session, the paced Fragments, Close-Session.
async fn client_session(load: &Load, i: usize, outcome: &mut SessionOutcome) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", load.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("set_nodelay: {e}"))?;
    let (mut sender, connection) = http1::handshake::<_, PacedBody>(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {}", chain(&e)))?;
    let connection = tokio::spawn(connection);
    let result = packets(load, i, &mut sender, outcome).await;
    drop(sender);
    // The Close-Session Ack has arrived (or the session failed): just close the socket.
    connection.abort();
    result
}

async fn packets(
    load: &Load,
    i: usize,
    sender: &mut http1::SendRequest<PacedBody>,
    outcome: &mut SessionOutcome,
) -> Result<(), String> {
    let Load {
        server,
        port,
        c,
        ref fragment,
        ref gauge,
        fsync_last,
    } = *load;
    let host = format!("127.0.0.1:{port}");
    let path = format!("/{}", c_file(i));
    let request = |packet: &str| {
        let builder = http::Request::builder()
            .uri(path.as_str())
            .header(http::header::HOST, host.as_str());
        match server {
            CServer::Bits => builder
                .method("BITS_POST")
                .header("BITS-Packet-Type", packet),
            CServer::Baseline => builder.method("POST"),
        }
    };
    let built = |r: Result<http::Request<PacedBody>, http::Error>| r.map_err(|e| e.to_string());

    let mut session = None;
    let mut open = None;
    if server == CServer::Bits {
        let create = request("Create-Session")
            .header("BITS-Supported-Protocols", PROTOCOL)
            .header(http::header::CONTENT_LENGTH, "0")
            .body(PacedBody::empty());
        let ack = exchange(sender, built(create)?, None).await?;
        outcome.first_sent = Some(ack.sent);
        outcome.latencies.push((PacketKind::Create, ack.latency));
        ack.expect_ok("Create-Session")?;
        let id = ack
            .headers
            .get("BITS-Session-Id")
            .cloned()
            .ok_or("no BITS-Session-Id on the Create-Session Ack")?;
        session = Some(id);
        open = Some(gauge.enter());
    }

    let interval = Duration::from_secs_f64(PACE_CHUNK as f64 / c.rate as f64);
    let mut offset = 0u64;
    while offset < c.size {
        let len = c.fragment.min(c.size - offset);
        let end = offset + len;
        let written = Arc::new(OnceLock::new());
        let body = PacedBody::paced(
            fragment.slice(..usize::try_from(len).map_err(|e| e.to_string())?),
            interval,
            Some(written.clone()),
        );
        let mut request = request("Fragment").header(http::header::CONTENT_LENGTH, len.to_string());
        if server == CServer::Baseline && fsync_last && end == c.size {
            request = request.header(FSYNC_HEADER, "1");
        }
        if let Some(id) = &session {
            request = request.header("BITS-Session-Id", id.clone()).header(
                "Content-Range",
                format!("bytes {offset}-{}/{}", end - 1, c.size),
            );
        }
        let ack = exchange(sender, built(request.body(body))?, Some(&written)).await?;
        outcome.first_sent.get_or_insert(ack.sent);
        let kind = if end == c.size {
            PacketKind::LastFragment
        } else {
            PacketKind::Fragment
        };
        outcome.latencies.push((kind, ack.latency));
        ack.expect_ok(kind.name(server))?;
        if session.is_some() {
            let received = received_range(&ack.headers);
            if received != Some(end) {
                return Err(format!(
                    "Fragment ending at {end}: BITS-Received-Content-Range {received:?}"
                ));
            }
        } else if open.is_none() {
            open = Some(gauge.enter());
        }
        outcome.last_ack = Some(ack.acked);
        offset = end;
    }

    let Some(id) = session else {
        return Ok(());
    };
    let close = request("Close-Session")
        .header("BITS-Session-Id", id)
        .header(http::header::CONTENT_LENGTH, "0")
        .body(PacedBody::empty());
    let ack = exchange(sender, built(close)?, None).await?;
    drop(open);
    outcome.latencies.push((PacketKind::Close, ack.latency));
    outcome.last_ack = Some(ack.acked);
    ack.expect_ok("Close-Session")
}

/// A response head and when it came.
struct Answer {
    status: http::StatusCode,
    headers: HeaderMap,
    /// Just before the request was handed to the connection.
    sent: Instant,
    acked: Instant,
    latency: Duration,
}

impl Answer {
    fn expect_ok(&self, what: &str) -> Result<(), String> {
        if self.status == http::StatusCode::OK {
            return Ok(());
        }
        let header = |name: &str| {
            self.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        Err(format!(
            "{what}: HTTP {}, BITS-Error-Code {}, BITS-Error-Context {}",
            self.status,
            header("BITS-Error-Code"),
            header("BITS-Error-Context")
        ))
    }
}

/// Sends `request` and waits for the response head; the latency runs from `written` (when
/// the body yielded its last chunk) or, for a request without a body, from when it was sent.
/// Reads the response body so that the connection can be reused.
async fn exchange(
    sender: &mut http1::SendRequest<PacedBody>,
    request: http::Request<PacedBody>,
    written: Option<&OnceLock<Instant>>,
) -> Result<Answer, String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection: {}", chain(&e)))?;
    let sent = Instant::now();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {}", chain(&e)))?;
    let acked = Instant::now();
    let from = written.and_then(|w| w.get().copied()).unwrap_or(sent);
    let (parts, body) = response.into_parts();
    body.collect()
        .await
        .map_err(|e| format!("response body: {}", chain(&e)))?;
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        sent,
        acked,
        latency: acked.saturating_duration_since(from),
    })
}

/// A request body streamed at a fixed rate, like a client behind a slow link: the k-th chunk
/// is released k intervals after the body is first polled. Records when it yields its last
/// chunk. Empty for packets without a body.
struct PacedBody {
    data: Bytes,
    interval: Duration,
    sent: u32,
    started: Option<tokio::time::Instant>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    written: Option<Arc<OnceLock<Instant>>>,
}

impl PacedBody {
    fn empty() -> Self {
        Self::paced(Bytes::new(), Duration::ZERO, None)
    }

    fn paced(data: Bytes, interval: Duration, written: Option<Arc<OnceLock<Instant>>>) -> Self {
        Self {
            data,
            interval,
            sent: 0,
            started: None,
            sleep: None,
            written,
        }
    }

    fn mark_written(&self) {
        if let Some(written) = &self.written {
            let _ = written.set(Instant::now());
        }
    }
}

impl http_body::Body for PacedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.data.is_empty() {
            this.mark_written();
            return Poll::Ready(None);
        }
        let now = tokio::time::Instant::now();
        let started = *this.started.get_or_insert(now);
        let due = started + this.interval * (this.sent + 1);
        if now < due {
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if sleep.deadline() != due {
                sleep.as_mut().reset(due);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        let chunk = this.data.split_to(PACE_CHUNK.min(this.data.len()));
        this.sent += 1;
        if this.data.is_empty() {
            this.mark_written();
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.len() as u64)
    }
}
