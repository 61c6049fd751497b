//! Crash safety under fire: many concurrent uploads while the server process is SIGKILLed at
//! random moments, dozens of times, and restarted on the same root and port.
//!
//! The test binary re-executes itself (`common::node`, as in `restart.rs`): the
//! `crash_child_server` test serves the BITS layer when `AXUM_BITS_CRASH_CHILD_ROOT` is set
//! (and does nothing otherwise). A killer thread SIGKILLs the child after a random delay and
//! starts the next one on the same root and port, until every upload is done. Meanwhile
//! clients that behave like Windows (protocol reference, sections 4, 5.2, 8.5 and 13.1) upload files: they re-send a
//! packet whose Ack never came, follow `BITS-Received-Content-Range`, retry transient errors
//! and start over on `0x8020001F`. Afterwards every file must be intact, every session a
//! tombstone, and one sweep must leave nothing behind.
//!
//! The run is random: the seed is printed, and `AXUM_BITS_CRASH_SEED=<seed>` repeats its
//! file sizes, fragment sizes and kill delays (the interleaving with the uploads still varies).
//! `RUST_LOG=axum_bits=debug` makes the children log to stderr.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use axum_bits::BitsLayer;
use axum_bits::session::{Phase, SessionRecord};
use bytes::Bytes;
use common::node::{self, Node, NodeCommand};
use common::{PROTOCOL, bits_post};

const ROOT_ENV: &str = "AXUM_BITS_CRASH_CHILD_ROOT";
const PORT_ENV: &str = "AXUM_BITS_CRASH_CHILD_PORT";
const SEED_ENV: &str = "AXUM_BITS_CRASH_SEED";
/// The name of the child's test function, which the parent runs with `--exact`.
const CHILD_TEST: &str = "crash_child_server";

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Concurrent clients, each uploading its files one after the other.
const CLIENTS: usize = 8;
/// Files every client uploads at least; it starts more until `MIN_KILLS` kills happened.
const MIN_FILES: usize = 2;
/// Files a client uploads at most (bounds the run if kills are slow to come).
const MAX_FILES: usize = 100;
const FILE_SIZE: (u64, u64) = (2 * MIB, 6 * MIB);
const FRAGMENT_SIZE: (u64, u64) = (64 * KIB, MIB);
/// A client's think time after a Fragment Ack, so that kills also land between packets.
const PAUSE_MS: (u64, u64) = (10, 200);
/// How long the killer lets each child live.
const KILL_DELAY_MS: (u64, u64) = (150, 900);
const MIN_KILLS: u64 = 50;

/// The child's `abandoned_after`: a client whose Create-Session Ack was lost by a kill
/// retries Create-Session and gets 409 until its first session has been idle this long.
const ABANDONED_AFTER: Duration = Duration::from_millis(200);
/// Per request, like a client's transport timeout (short: the server is local).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A client's pause before re-sending a packet.
const RETRY_SLEEP_MS: (u64, u64) = (30, 50);
/// Tries of one packet without an answer that lets the client move on: a wedged session.
const MAX_TRIES_PER_PACKET: u32 = 300;
/// Timeouts of one packet: a live server that does not answer for this many times 5 s.
const MAX_TIMEOUTS_PER_PACKET: u32 = 3;
/// Create-Session restarts (`0x8020001F`) of one upload.
const MAX_RESTARTS_PER_UPLOAD: u32 = 10;
/// Requests over the whole run, all clients together.
const MAX_REQUESTS: u64 = 200_000;
/// The whole upload phase.
const DEADLINE: Duration = Duration::from_secs(110);

// ---------------------------------------------------------------------------------------------
// The child server.

/// The server half of the self-exec trick. A no-op unless `AXUM_BITS_CRASH_CHILD_ROOT` is set,
/// in which case it serves the BITS layer on that root and on 127.0.0.1 at the port in
/// `AXUM_BITS_CRASH_CHILD_PORT` until it is killed (or its parent closes its stdin).
#[test]
fn crash_child_server() {
    let Some(root) = std::env::var_os(ROOT_ENV) else {
        return;
    };
    let port: u16 = std::env::var(PORT_ENV)
        .expect("the port")
        .parse()
        .expect("a port number");
    node::run_child(async move {
        let layer = BitsLayer::builder(PathBuf::from(root))
            .abandoned_after(ABANDONED_AFTER)
            .build()
            .expect("layer");
        let app = Router::new()
            .route("/", get(|| async { "crash child" }))
            .layer(layer);
        // The previous child's port may take a moment to be free again.
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let started = Instant::now();
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && started.elapsed() < Duration::from_secs(2) =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot bind {addr}: {e}"),
            }
        };
        node::announce(addr);
        axum::serve(listener, app).await.expect("serve");
    });
}

/// Starts a child server on `root` and `port` and waits until it listens. The child is
/// SIGKILLed and reaped when dropped, so that no exit path, panics included, leaves a server
/// behind.
fn spawn_server(root: &Path, port: u16) -> Node {
    NodeCommand::new(CHILD_TEST)
        .env(ROOT_ENV, root)
        .env(PORT_ENV, port.to_string())
        .try_spawn()
        .unwrap_or_else(|e| panic!("the child server did not start listening on port {port}: {e}"))
}

/// A port for every child of the run, free now. Taken below the kernel's ephemeral range when
/// possible: while no child listens, a client's connect to a port inside that range can be
/// given the very same port as its source and connect to itself (TCP simultaneous open), and
/// that connection would then keep the next child from binding.
fn pick_port(rng: &mut Rng) -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > 11_000 {
        for _ in 0..200 {
            let port =
                u16::try_from(rng.range(10_000, u64::from(ephemeral_low) - 1)).expect("a port");
            if std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

// ---------------------------------------------------------------------------------------------
// Shared state of a run: counters, the kill log, the failure flag.

/// SplitMix64: small, seedable, good enough for test schedules.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Self {
        let mut rng = Self(seed ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        rng.next();
        rng
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn millis(&mut self, (lo, hi): (u64, u64)) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

/// Counters of one kind of event, all clients together.
#[derive(Debug, Default)]
struct Stats {
    requests: AtomicU64,
    uploads: AtomicU64,
    file_bytes: AtomicU64,
    body_bytes_sent: AtomicU64,
    // Transport failures, each followed by a re-send of the same packet.
    refused: AtomicU64,
    reset: AtomicU64,
    timeout: AtomicU64,
    // Transient error Acks, each followed by a re-send of the same packet.
    conflict_409: AtomicU64,
    unavailable_503: AtomicU64,
    other_5xx: AtomicU64,
    // Requests cut off by a kill (reset), by packet type: where the kills landed.
    create_cut: AtomicU64,
    fragment_cut: AtomicU64,
    /// Final fragments, whose Ack waits for the commit.
    final_cut: AtomicU64,
    close_cut: AtomicU64,
    // Re-sends by packet type.
    create_retries: AtomicU64,
    fragment_retries: AtomicU64,
    close_retries: AtomicU64,
    // Offset jumps and restarts.
    range_416: AtomicU64,
    resync_200: AtomicU64,
    session_lost: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn count(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

struct Run {
    seed: u64,
    base: String,
    start: Instant,
    kills: AtomicU64,
    /// Set by the first client that finds a bug (or by a dying killer): the others stop.
    failed: AtomicBool,
    stats: Stats,
    /// Kills and restarts with their time since `start`, to read next to a client's trace.
    kill_log: Mutex<Vec<String>>,
}

impl Run {
    fn ms(&self) -> u128 {
        self.start.elapsed().as_millis()
    }

    fn kills(&self) -> u64 {
        self.kills.load(Ordering::SeqCst)
    }

    fn log_kill(&self, line: String) {
        self.kill_log.lock().expect("kill log").push(line);
    }

    fn kill_log(&self) -> String {
        self.kill_log.lock().expect("kill log").join("\n")
    }

    /// Fails the client if the run is over: another client failed, or limits are exceeded.
    fn check(&self) -> Result<(), Failure> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(Failure::Aborted);
        }
        if self.start.elapsed() > DEADLINE {
            return Err(Failure::Bug(format!(
                "the uploads are not done after {DEADLINE:?}: a session is wedged or the \
                 server is too slow"
            )));
        }
        if count(&self.stats.requests) > MAX_REQUESTS {
            return Err(Failure::Bug(format!(
                "more than {MAX_REQUESTS} requests: the clients are spinning"
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The killer.

/// The thread that kills and restarts the child. Dropping it (on any exit path) stops the
/// thread and with it the last child.
struct Killer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Downtime>>,
}

/// How long clients found no server: from each SIGKILL to the next child listening.
#[derive(Debug, Default)]
struct Downtime {
    total: Duration,
    max: Duration,
}

/// Marks the run failed if the killer thread panics (a child that does not start).
struct FailOnPanic(Arc<Run>);

impl Drop for FailOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.failed.store(true, Ordering::SeqCst);
        }
    }
}

impl Killer {
    fn start(run: Arc<Run>, root: PathBuf, port: u16, first: Node) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let _alarm = FailOnPanic(run.clone());
            let mut rng = Rng::new(run.seed, 1);
            let mut server = first;
            let mut downtime = Downtime::default();
            loop {
                let wake = Instant::now() + rng.millis(KILL_DELAY_MS);
                while !stopping.load(Ordering::SeqCst) && Instant::now() < wake {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let killed = Instant::now();
                let at = run.ms();
                server.kill();
                let kill = run.kills.fetch_add(1, Ordering::SeqCst) + 1;
                server = spawn_server(&root, port);
                let down = killed.elapsed();
                downtime.total += down;
                downtime.max = downtime.max.max(down);
                run.log_kill(format!(
                    "[{at:>6} ms] kill #{kill}; next child listening after {} ms",
                    down.as_millis()
                ));
            }
            server.kill();
            downtime
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops killing, stops the last child and reports the downtime.
    fn finish(mut self) -> Downtime {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.take().expect("the killer thread");
        match thread.join() {
            Ok(downtime) => downtime,
            Err(_) => panic!("the killer thread failed (see its panic above)"),
        }
    }
}

impl Drop for Killer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client.

/// Why a client stopped.
#[derive(Debug)]
enum Failure {
    /// Another client failed first.
    Aborted,
    /// What the test exists to find.
    Bug(String),
}

/// One file: its name under the root and how to regenerate its content.
#[derive(Debug, Clone)]
struct Upload {
    name: String,
    len: usize,
    seed: u64,
}

impl Upload {
    fn content(&self) -> Vec<u8> {
        common::data(self.len, self.seed)
    }
}

/// An Ack, reduced to what the client looks at.
#[derive(Debug)]
struct Ack {
    status: u16,
    received: Option<u64>,
    code: Option<String>,
    session: Option<String>,
}

impl Ack {
    fn session_lost(&self) -> bool {
        self.code
            .as_deref()
            .is_some_and(|c| c.eq_ignore_ascii_case("0x8020001F"))
    }

    /// Errors the client treats as fatal whatever the status (section 13.1).
    fn fatal_code(&self) -> bool {
        self.code.as_deref().is_some_and(|c| {
            ["0x80070005", "0x80070057", "0x80200020"]
                .iter()
                .any(|f| c.eq_ignore_ascii_case(f))
        })
    }

    /// 409, and 5xx other than 501 and 505: the client re-sends the packet later.
    fn transient(&self) -> bool {
        !self.session_lost()
            && !self.fatal_code()
            && (self.status == 409
                || ((500..600).contains(&self.status) && !matches!(self.status, 501 | 505)))
    }
}

/// What became of one request.
enum Exchange {
    Ack(Ack),
    /// No Ack: the server died (or was not there yet) or the client gave up waiting.
    Lost(Loss, String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    Refused,
    Reset,
    Timeout,
}

#[derive(Debug, Clone, Copy)]
enum Packet {
    Create,
    /// `last`: the final fragment, whose Ack waits for the commit.
    Fragment {
        last: bool,
    },
    Close,
}

/// A client that behaves like Windows, on its own connection pool.
struct Client {
    id: usize,
    http: reqwest::Client,
    run: Arc<Run>,
    /// Retry jitter and think time.
    jitter: Rng,
    /// The latest events, for the report of a failure.
    trace: VecDeque<Event>,
}

const TRACE_LEN: usize = 40;

/// A line of a client's trace; repeats of one event share a line.
struct Event {
    first_ms: u128,
    last_ms: u128,
    text: String,
    repeats: u32,
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.repeats == 1 {
            write!(f, "[{:>6} ms] {}", self.first_ms, self.text)
        } else {
            write!(
                f,
                "[{:>6} ms] {} (x{} until {} ms)",
                self.first_ms, self.text, self.repeats, self.last_ms
            )
        }
    }
}

/// One packet to deliver.
struct Request<'a> {
    packet: Packet,
    /// For the trace: the path and the packet, with its range for a Fragment.
    what: &'a str,
    path: &'a str,
    headers: &'a [(&'a str, String)],
    body: Bytes,
    /// The acknowledged offset, which no Ack of this Fragment may report less than.
    floor: Option<u64>,
}

impl Client {
    fn new(id: usize, run: Arc<Run>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("http client");
        let jitter = Rng::new(run.seed, 1000 + id as u64);
        Self {
            id,
            http,
            run,
            jitter,
            trace: VecDeque::new(),
        }
    }

    fn note(&mut self, text: String) {
        let now = self.run.ms();
        if let Some(last) = self.trace.back_mut().filter(|e| e.text == text) {
            last.repeats += 1;
            last.last_ms = now;
            return;
        }
        if self.trace.len() == TRACE_LEN {
            self.trace.pop_front();
        }
        self.trace.push_back(Event {
            first_ms: now,
            last_ms: now,
            text,
            repeats: 1,
        });
    }

    /// A bug report: what went wrong and this client's latest events. Stops the other
    /// clients.
    fn bug(&mut self, what: String) -> Failure {
        self.run.failed.store(true, Ordering::SeqCst);
        let trace: Vec<String> = self.trace.iter().map(Event::to_string).collect();
        Failure::Bug(format!(
            "client {} at {} ms: {what}\n  latest events of this client:\n    {}",
            self.id,
            self.run.ms(),
            trace.join("\n    ")
        ))
    }

    /// Uploads files until it did `MIN_FILES` and the killer `MIN_KILLS` kills.
    async fn run(mut self, mut layout: Rng) -> Result<Vec<Upload>, Failure> {
        let mut done = Vec::new();
        while done.len() < MAX_FILES && (done.len() < MIN_FILES || self.run.kills() < MIN_KILLS) {
            let upload = Upload {
                name: format!("crash-c{}-f{}.bin", self.id, done.len()),
                len: usize::try_from(layout.range(FILE_SIZE.0, FILE_SIZE.1)).expect("usize"),
                seed: layout.next(),
            };
            let fragments = Rng::new(upload.seed, 2);
            self.upload(&upload, fragments).await?;
            bump(&self.run.stats.uploads);
            self.run
                .stats
                .file_bytes
                .fetch_add(upload.len as u64, Ordering::Relaxed);
            done.push(upload);
        }
        Ok(done)
    }

    /// One upload: Create-Session, Fragments from the server's offset, Close-Session.
    async fn upload(&mut self, upload: &Upload, mut sizes: Rng) -> Result<(), Failure> {
        let source = upload.clone();
        let data = Bytes::from(
            tokio::task::spawn_blocking(move || source.content())
                .await
                .expect("data"),
        );
        let path = format!("/{}", upload.name);
        let total = data.len() as u64;
        let mut restarts = 0;
        'session: loop {
            let sid = self.create(&path).await?;
            // The server's offset: every byte below it is acknowledged and never sent again.
            let mut offset = 0u64;
            while offset < total {
                let end = (offset + sizes.range(FRAGMENT_SIZE.0, FRAGMENT_SIZE.1)).min(total);
                let Some(received) = self.fragment(&path, &sid, &data, offset, end).await? else {
                    restarts += 1;
                    if restarts > MAX_RESTARTS_PER_UPLOAD {
                        return Err(self.bug(format!(
                            "{path}: more than {MAX_RESTARTS_PER_UPLOAD} restarts"
                        )));
                    }
                    continue 'session;
                };
                offset = received;
                if offset < total {
                    tokio::time::sleep(self.jitter.millis(PAUSE_MS)).await;
                }
            }
            self.close(&path, &sid).await?;
            return Ok(());
        }
    }

    async fn create(&mut self, path: &str) -> Result<String, Failure> {
        let headers = [
            ("BITS-Packet-Type", "Create-Session".to_owned()),
            ("BITS-Supported-Protocols", PROTOCOL.to_owned()),
        ];
        let what = format!("{path} Create-Session");
        let ack = self
            .deliver(Request {
                packet: Packet::Create,
                what: &what,
                path,
                headers: &headers,
                body: Bytes::new(),
                floor: None,
            })
            .await?;
        match (ack.status, ack.session) {
            (200, Some(sid)) => {
                self.note(format!("{what}: 200, session {sid}"));
                Ok(sid)
            }
            (status, session) => Err(self.bug(format!(
                "{what} refused: {status} {:?} (session {session:?})",
                ack.code
            ))),
        }
    }

    /// Sends `data[offset..end]` and returns the server's new offset, or `None` if the session
    /// is gone (`0x8020001F`: start over).
    async fn fragment(
        &mut self,
        path: &str,
        sid: &str,
        data: &Bytes,
        offset: u64,
        end: u64,
    ) -> Result<Option<u64>, Failure> {
        let total = data.len() as u64;
        let headers = [
            ("BITS-Packet-Type", "Fragment".to_owned()),
            ("BITS-Session-Id", sid.to_owned()),
            (
                "Content-Range",
                format!("bytes {offset}-{}/{total}", end - 1),
            ),
        ];
        let body = data
            .slice(usize::try_from(offset).expect("usize")..usize::try_from(end).expect("usize"));
        let what = format!("{path} Fragment {offset}-{}/{total}", end - 1);
        let ack = self
            .deliver(Request {
                packet: Packet::Fragment { last: end == total },
                what: &what,
                path,
                headers: &headers,
                body,
                floor: Some(offset),
            })
            .await?;
        if ack.session_lost() {
            bump(&self.run.stats.session_lost);
            self.note(format!("{what}: session {sid} not found, starting over"));
            return Ok(None);
        }
        let Some(received) = ack.received else {
            return Err(self.bug(format!(
                "{what}: Ack without BITS-Received-Content-Range: {ack:?}"
            )));
        };
        if received < offset {
            return Err(self.bug(format!(
                "{what}: the server acknowledged {offset} bytes earlier and now holds {received}: \
                 acknowledged bytes were lost ({ack:?})"
            )));
        }
        if received > total {
            return Err(self.bug(format!("{what}: offset beyond the end: {ack:?}")));
        }
        match ack.status {
            200 if received >= end => {
                if received > end {
                    bump(&self.run.stats.resync_200);
                }
                self.note(format!("{what}: 200, received {received}"));
                Ok(Some(received))
            }
            // A gap, although the fragment starts at the server's own offset.
            416 => {
                bump(&self.run.stats.range_416);
                Err(self.bug(format!(
                    "{what}: 416 for a fragment at the acknowledged offset: {ack:?}"
                )))
            }
            _ => Err(self.bug(format!("{what}: unexpected Ack {ack:?}"))),
        }
    }

    /// Close-Session, re-sent until it is acknowledged. Every byte was acknowledged, so the
    /// session must be known (as a tombstone if an earlier Close got through).
    async fn close(&mut self, path: &str, sid: &str) -> Result<(), Failure> {
        let headers = [
            ("BITS-Packet-Type", "Close-Session".to_owned()),
            ("BITS-Session-Id", sid.to_owned()),
        ];
        let what = format!("{path} Close-Session {sid}");
        let ack = self
            .deliver(Request {
                packet: Packet::Close,
                what: &what,
                path,
                headers: &headers,
                body: Bytes::new(),
                floor: None,
            })
            .await?;
        if ack.status == 200 {
            self.note(format!("{what}: 200"));
            Ok(())
        } else {
            Err(self.bug(format!(
                "{what}: a fully acknowledged session refused: {ack:?}"
            )))
        }
    }

    /// Sends one packet until an Ack other than a transient error comes back: re-sends it
    /// after connection failures and timeouts (the Ack was lost) and after 409/5xx.
    async fn deliver(&mut self, request: Request<'_>) -> Result<Ack, Failure> {
        let Request {
            packet,
            what,
            path,
            headers,
            body,
            floor,
        } = request;
        let mut tries = 0;
        let mut timeouts = 0;
        loop {
            if let Err(failure) = self.run.check() {
                return Err(match failure {
                    Failure::Bug(why) => self.bug(format!("{what}: {why}")),
                    aborted => aborted,
                });
            }
            tries += 1;
            if tries > 1 {
                let stats = &self.run.stats;
                bump(match packet {
                    Packet::Create => &stats.create_retries,
                    Packet::Fragment { .. } => &stats.fragment_retries,
                    Packet::Close => &stats.close_retries,
                });
            }
            if tries > MAX_TRIES_PER_PACKET {
                return Err(self.bug(format!(
                    "{what}: no usable Ack after {MAX_TRIES_PER_PACKET} tries across kills: \
                     the session is wedged"
                )));
            }
            self.run
                .stats
                .body_bytes_sent
                .fetch_add(body.len() as u64, Ordering::Relaxed);
            match self.exchange(path, headers, body.clone()).await {
                Exchange::Ack(ack) => {
                    if let (Some(floor), Some(received)) = (floor, ack.received) {
                        if received < floor {
                            return Err(self.bug(format!(
                                "{what}: Ack reports offset {received} below the acknowledged \
                                 {floor}: {ack:?}"
                            )));
                        }
                    }
                    if !ack.transient() {
                        return Ok(ack);
                    }
                    let stats = &self.run.stats;
                    bump(match ack.status {
                        409 => &stats.conflict_409,
                        503 => &stats.unavailable_503,
                        _ => &stats.other_5xx,
                    });
                    self.note(format!("{what}: transient {ack:?}"));
                }
                Exchange::Lost(loss, error) => {
                    let stats = &self.run.stats;
                    bump(match loss {
                        Loss::Refused => &stats.refused,
                        Loss::Reset => &stats.reset,
                        Loss::Timeout => &stats.timeout,
                    });
                    if loss == Loss::Reset {
                        bump(match packet {
                            Packet::Create => &stats.create_cut,
                            Packet::Fragment { .. } => &stats.fragment_cut,
                            Packet::Close => &stats.close_cut,
                        });
                        if matches!(packet, Packet::Fragment { last: true }) {
                            bump(&stats.final_cut);
                        }
                    }
                    self.note(format!("{what}: no Ack ({loss:?}: {error})"));
                    if loss == Loss::Timeout {
                        timeouts += 1;
                        if timeouts > MAX_TIMEOUTS_PER_PACKET {
                            return Err(self.bug(format!(
                                "{what}: {timeouts} timeouts of {REQUEST_TIMEOUT:?}: the server \
                                 hangs"
                            )));
                        }
                    }
                }
            }
            tokio::time::sleep(self.jitter.millis(RETRY_SLEEP_MS)).await;
        }
    }

    /// One `BITS_POST`.
    async fn exchange(&self, path: &str, headers: &[(&str, String)], body: Bytes) -> Exchange {
        bump(&self.run.stats.requests);
        let mut request = self
            .http
            .request(bits_post(), format!("{}{path}", self.run.base));
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let lost = |e: reqwest::Error| {
            let loss = if e.is_timeout() {
                Loss::Timeout
            } else if e.is_connect() {
                Loss::Refused
            } else {
                Loss::Reset
            };
            // The innermost source says what happened (reset, incomplete message, ...).
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text = s.to_string();
                source = s.source();
            }
            Exchange::Lost(loss, text)
        };
        let response = match request.body(body).send().await {
            Ok(response) => response,
            Err(e) => return lost(e),
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let is_ack = header("BITS-Packet-Type").as_deref() == Some("Ack");
        let received = header("BITS-Received-Content-Range");
        let ack = Ack {
            status,
            received: received.as_deref().and_then(|v| v.parse().ok()),
            code: header("BITS-Error-Code"),
            session: header("BITS-Session-Id"),
        };
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(e) => return lost(e),
        };
        // Not an Ack at all, or a malformed one: the client would call it a protocol error.
        if !is_ack || !body.is_empty() || (received.is_some() && ack.received.is_none()) {
            return Exchange::Ack(Ack {
                status: 0,
                code: Some(format!(
                    "not a valid Ack: status {status}, headers {headers:?}, {} body bytes",
                    body.len()
                )),
                ..ack
            });
        }
        Exchange::Ack(ack)
    }
}

// ---------------------------------------------------------------------------------------------
// The test.

fn seed() -> u64 {
    match std::env::var(SEED_ENV) {
        Ok(s) => {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            }
            .unwrap_or_else(|e| panic!("{SEED_ENV}={s}: {e}"))
        }
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64,
    }
}

/// Compares a destination file with what was sent.
fn verify(root: &Path, upload: &Upload) -> Result<(), String> {
    let name = &upload.name;
    let got = std::fs::read(root.join(name)).map_err(|e| format!("{name}: {e}"))?;
    let want = upload.content();
    if got == want {
        return Ok(());
    }
    let first = got
        .iter()
        .zip(&want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    Err(format!(
        "{name}: {} bytes, {} expected; first difference at byte {first}",
        got.len(),
        want.len()
    ))
}

/// Every session record under the root, read straight from its file: a record that does not
/// parse is a failure here (the store itself would skip it with a warning).
fn read_records(root: &Path) -> Vec<SessionRecord> {
    let sessions = root.join(".bits").join("sessions");
    common::leftovers(root)
        .into_iter()
        .map(|file| {
            assert!(
                file.parent() == Some(sessions.as_path())
                    && file.extension().is_some_and(|e| e == "json"),
                "unexpected leftover {}",
                file.display()
            );
            let bytes = std::fs::read(&file).expect("read a record");
            serde_json::from_slice::<SessionRecord>(&bytes).unwrap_or_else(|e| {
                panic!(
                    "{}: not a session record ({e}): {}",
                    file.display(),
                    String::from_utf8_lossy(&bytes)
                )
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_survive_sigkills_at_random_moments() {
    let seed = seed();
    println!("crash test seed {seed} (repeat with {SEED_ENV}={seed})");
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().to_path_buf();
    let mut rng = Rng::new(seed, 0);
    let port = pick_port(&mut rng);
    let run = Arc::new(Run {
        seed,
        base: format!("http://127.0.0.1:{port}"),
        start: Instant::now(),
        kills: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        stats: Stats::default(),
        kill_log: Mutex::new(Vec::new()),
    });

    let first = spawn_server(&root, port);
    let killer = Killer::start(run.clone(), root.clone(), port, first);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let run = run.clone();
            let layout = Rng::new(seed, 100 + id as u64);
            tokio::spawn(Client::new(id, run).run(layout))
        })
        .collect();
    let mut uploads = Vec::new();
    let mut bugs = Vec::new();
    for client in clients {
        match client.await {
            Ok(Ok(done)) => uploads.extend(done),
            Ok(Err(Failure::Aborted)) => {}
            Ok(Err(Failure::Bug(bug))) => {
                run.failed.store(true, Ordering::SeqCst);
                bugs.push(bug);
            }
            Err(e) => {
                run.failed.store(true, Ordering::SeqCst);
                bugs.push(format!("a client panicked: {e}"));
            }
        }
    }
    // Stops the killer and the last child: no server runs on the root from here on.
    let downtime = killer.finish();
    let elapsed = run.start.elapsed();
    let kills = run.kills();
    let stats = &run.stats;
    let kill_count = kills.max(1);
    println!(
        "crash test seed {seed}: {kills} kills (downtime mean {} ms, max {} ms), \
         {} uploads of {} MiB in {:.1} s; {} requests, {} MiB of fragment bodies sent \
         (re-sends included)",
        downtime.total.as_millis() / u128::from(kill_count),
        downtime.max.as_millis(),
        count(&stats.uploads),
        count(&stats.file_bytes) / MIB,
        elapsed.as_secs_f64(),
        count(&stats.requests),
        count(&stats.body_bytes_sent) / MIB,
    );
    println!(
        "  cut off by a kill: Create {}, Fragment {} (final {}), Close {}; \
         re-sent after: refused {}, reset {}, timeout {}, 409 {}, 503 {}, other 5xx {}; \
         re-sent by packet: Create {}, Fragment {}, Close {}; \
         200 resync {}, 416 {}, session lost {}",
        count(&stats.create_cut),
        count(&stats.fragment_cut),
        count(&stats.final_cut),
        count(&stats.close_cut),
        count(&stats.refused),
        count(&stats.reset),
        count(&stats.timeout),
        count(&stats.conflict_409),
        count(&stats.unavailable_503),
        count(&stats.other_5xx),
        count(&stats.create_retries),
        count(&stats.fragment_retries),
        count(&stats.close_retries),
        count(&stats.resync_200),
        count(&stats.range_416),
        count(&stats.session_lost),
    );
    assert!(
        bugs.is_empty(),
        "seed {seed}: {}\n\nkills:\n{}",
        bugs.join("\n\n"),
        run.kill_log()
    );
    assert!(
        kills >= MIN_KILLS,
        "only {kills} kills happened before the uploads were done"
    );
    assert_eq!(
        count(&stats.session_lost),
        0,
        "an acknowledged session was forgotten: no session expires in this test"
    );

    // Every file is exactly what was sent.
    let verifying = Instant::now();
    let checks: Vec<_> = uploads
        .chunks(uploads.len().div_ceil(2).max(1))
        .map(|chunk| {
            let (root, chunk) = (root.clone(), chunk.to_vec());
            tokio::task::spawn_blocking(move || {
                chunk
                    .iter()
                    .filter_map(|u| verify(&root, u).err())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut corrupt = Vec::new();
    for check in checks {
        corrupt.extend(check.await.expect("verification"));
    }
    assert!(corrupt.is_empty(), "seed {seed}: {corrupt:#?}");
    let verified = verifying.elapsed();

    // No staged data is left, and every record is a tombstone: one closed session per file
    // (committed, every byte received), plus cancelled sessions that a lost Create-Session
    // Ack left without a byte and the client's second Create-Session replaced.
    assert!(
        common::parts(&root).is_empty(),
        "seed {seed}: part files left: {:?}",
        common::parts(&root)
    );
    let records = read_records(&root);
    let mut closed: BTreeMap<String, Vec<&SessionRecord>> = BTreeMap::new();
    let mut abandoned = 0;
    for record in &records {
        match record.phase {
            Phase::Closed => closed
                .entry(record.destination.trim_start_matches('/').to_owned())
                .or_default()
                .push(record),
            Phase::Cancelled
                if record.received == 0 && record.total.is_none() && !record.committed =>
            {
                abandoned += 1;
            }
            _ => panic!("seed {seed}: not a tombstone: {record:?}"),
        }
    }
    for upload in &uploads {
        let total = upload.len as u64;
        match closed.remove(&upload.name).as_deref() {
            Some([record]) => assert!(
                record.committed && record.received == total && record.total == Some(total),
                "seed {seed}: {}: {record:?}",
                upload.name
            ),
            other => panic!(
                "seed {seed}: {}: one closed session expected, found {other:?}",
                upload.name
            ),
        }
    }
    assert!(
        closed.is_empty(),
        "seed {seed}: closed sessions for no upload: {closed:?}"
    );
    println!(
        "  {} tombstones: {} closed, {abandoned} replaced after a lost Create-Session Ack",
        records.len(),
        uploads.len()
    );

    // Once the tombstones expire, one sweep removes them all.
    let layer = BitsLayer::builder(&root)
        .session_timeout(Duration::from_millis(1))
        .build()
        .expect("layer");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let sweeping = Instant::now();
    let report = layer.sweeper().sweep().await.expect("sweep");
    let swept = sweeping.elapsed();
    assert_eq!(report.expired, 0, "{report:?}");
    assert_eq!(report.tombstones, records.len(), "{report:?}");
    assert!(
        common::leftovers(&root).is_empty(),
        "seed {seed}: left after the sweep: {:?}",
        common::leftovers(&root)
    );
    for upload in &uploads {
        let len = std::fs::metadata(root.join(&upload.name)).map(|m| m.len());
        assert_eq!(len.ok(), Some(upload.len as u64), "{}", upload.name);
    }
    println!(
        "  files verified in {:.1} s, tombstones swept in {:.1} s; {:.1} s in all",
        verified.as_secs_f64(),
        swept.as_secs_f64(),
        run.start.elapsed().as_secs_f64()
    );
}
