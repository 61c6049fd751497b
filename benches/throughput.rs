//! The benchmark program of axum-bits: the BITS layer against a plain axum handler that
//! streams POST bodies to a file, in four parts, each against a target of the performance
//! issue. One run prints every part's table and ends with a summary: one line per target with
//! the measured value, the target and PASS or MISS.
//!
//! ```text
//! cargo bench --bench throughput                    # the full run (all four parts)
//! cargo bench --bench throughput -- --quick         # a CI-sized run of every part and code path
//! cargo bench --bench throughput -- --only a,c      # some of the parts
//! cargo bench --bench throughput -- --runs 5        # (a) and (b) five times (full run: 3)
//! cargo bench --bench throughput -- --help          # every flag
//! ```
//!
//! # Common set-up
//!
//! Each server runs in a child process (this program re-executed with
//! `AXUM_BITS_BENCH_SERVER=bits|baseline`), started fresh for every measurement, so its peak
//! RSS (`VmHWM` in `/proc/<pid>/status`) and its CPU time (`utime + stime` in
//! `/proc/<pid>/stat`) are that measurement's own. Both servers are `axum::serve` (no
//! connection cap) on an ephemeral 127.0.0.1 port, on a default multi-threaded tokio runtime.
//! The clients live in this process and send every body from one pre-generated 8 MiB buffer of
//! incompressible bytes (`Bytes` slices, no copies).
//!
//! * **bits**: `BitsLayer::builder(root).max_upload_size(1 TiB)` with the default `FileStore`,
//!   `LocalStaging` and commit point (the commit, an fsync of the part file, a link into place
//!   and an fsync of the folder, runs with the last Fragment). An upload is Create-Session,
//!   the Fragments one after another, Close-Session, on one kept-alive connection, as the
//!   Windows client does. For part (c) `max_sessions` and `max_sessions_per_owner` are raised
//!   to twice the number of sessions.
//! * **baseline**: an axum handler that opens `root/<name>` in append mode and writes each
//!   body frame with `tokio::fs::File`; the same POSTs, one after another on one kept-alive
//!   connection. With the header `x-bench-fsync` it fsyncs the file after the body.
//!
//! Before each measurement of (a), (b) and (d) as many bytes as the measurement uploads are
//! written to a scratch file and deleted, untimed, so that no server pays for faulting in
//! fresh page-cache memory (slow on VMs that hand idle memory back to the host;
//! `--no-warm-up` skips it). After each measurement every uploaded file is read back and
//! compared with what was sent. Files go to a temporary folder under `$AXUM_BITS_BENCH_DIR`
//! (default: the system temp folder; it should be on a real disk, not tmpfs) and are removed
//! after each measurement. With `AXUM_BITS_BENCH_SYNC_DATA=1` the bits server runs with
//! `sync_data(true)` (an fsync of the fragment's data and of its session record before every
//! Ack). MB = 10^6 bytes; RSS in MiB.
//!
//! # (a) Large fragments: MB/s
//!
//! One 1 GiB upload (`--mib`; `--quick`: 64 MiB) in 8 MiB requests, by the bits server and by
//! the baseline. MB/s = bytes / (first request sent .. last response received); for bits that
//! is Create-Session .. Close-Session Ack, and "final s" is the time from the start of the
//! last Fragment to the end (it includes the commit). Target: bits / baseline >= 0.95 against
//! the baseline as is (data left in the page cache). The baseline with an fsync after the last
//! POST, the durability point the bits commit reaches, is an extra row for context.
//!
//! # (b) Small fragments: requests per second
//!
//! One sequential upload of 4,096 Fragments of 64 KiB (256 MiB; `--b-fragments`; `--quick`:
//! 512) to the bits server, in fragments per second = fragments / (Create-Session .. Close-Session
//! Ack), against as many sequential 64 KiB POSTs to the baseline, in POSTs per second = POSTs /
//! (first sent .. last answered). Target: bits / baseline >= 0.70. Extra row: the same number
//! of requests split over 8 concurrent uploads / POST streams (`--b-streams`), each on its own
//! connection, rate = all requests / wall time. "srv CPU us/req" is the server process's CPU
//! time divided by the requests.
//!
//! # (c) 1,000 concurrent sessions: Ack latency
//!
//! A closed loop that keeps 1,000 requests in flight has, by Little's law, a latency of 1,000 /
//! throughput (about a second on two cores) whatever the server does, so the clients are paced
//! like real BITS clients behind WAN links. 1,000 client tasks (`--c-sessions`; `--quick`:
//! 100), each with its own HTTP/1.1 connection (hyper's connection-level client), arrive
//! spread uniformly over a 1 s ramp (`--c-ramp-ms`; `--quick`: 200). Each connects, sends
//! Create-Session, then its 1 MiB (`--c-size-kib`; `--quick`: 256) as Fragments of 256 KiB
//! (`--c-fragment-kib`; `--quick`: 64) whose bodies are streamed at 512 KiB/s
//! (`--c-rate-kib`): 16 KiB chunks released on a tokio sleep schedule, the k-th chunk k x 16
//! KiB / rate after the body is first polled. Then Close-Session. The client runs on a
//! two-thread tokio runtime.
//!
//! The Ack latency of a packet is the time from the moment the request was fully handed to the
//! connection (for Create-Session and Close-Session, just before the request is sent; for a
//! Fragment, when its paced body yields its last chunk) until the response head has been
//! parsed. Every packet's latency is recorded; p50, p99 and max are over all packets (nearest
//! rank), also shown per packet type, the last Fragment (whose Ack waits for the commit)
//! apart from the others. "peak open" is the most sessions open at once as the clients see
//! them (from the Create-Session Ack to the Close-Session Ack), to show that the sessions did
//! overlap (if the server falls behind, later sessions start after earlier ones ended and it
//! is lower); total time runs from the first Create-Session sent to the last Close-Session
//! Ack. Client and server CPU seconds show how busy the machine was. Any non-200 answer,
//! transport error, wrong `BITS-Received-Content-Range` or file that does not match what was
//! sent is an error (the first few are printed), and that session stops there. Targets: no
//! errors, p99 < 100 ms. The server needs about two file descriptors per session (its socket,
//! the part file of a fragment in flight): the program stops with a clear message if
//! `ulimit -n` is too low. A full run (or `--c-baseline`) then sends the same paced fragments
//! from the same clients as plain POSTs (no Create or Close) to a fresh baseline server, for
//! context: what the load itself costs on the machine, once with each file fsynced after its
//! last POST (the durability the default commit gives) and once without.
//!
//! # (d) Memory: peak RSS does not grow with the upload
//!
//! The bits server's peak RSS (`VmHWM`) for one 1 GiB upload (the same size as (a), whose bits
//! measurement it reuses when (a) runs) and for one 4 GiB upload (`--d-mib`; `--quick`: 64 MiB
//! and 256 MiB), in 8 MiB Fragments, each in a fresh server process. The free space of the
//! bench folder is checked (with `df`) before the large upload. Targets: both < 64 MiB, and
//! large / small within 0.90 ..= 1.10.
//!
//! # Exit status
//!
//! 0 when every selected part ran without an error, whether or not its targets were met
//! (timings on a shared machine are noisy; the summary says PASS or MISS); 1 when a part could
//! not run (a server or disk error, a wrong file) or (c) saw any error; 2 for bad arguments.

use std::convert::Infallible;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum_bits::BitsLayer;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Size of every fragment / POST body in (a) and (d), and of the payload buffer.
const FRAGMENT: usize = 8 << 20;
/// Size of every fragment / POST body in (b).
const SMALL_FRAGMENT: usize = 64 << 10;
/// The chunks a paced body of (c) yields.
const PACE_CHUNK: usize = 16 << 10;
/// Selects the server role in a child process.
const ROLE_ENV: &str = "AXUM_BITS_BENCH_SERVER";
/// The upload root of a child server.
const ROOT_ENV: &str = "AXUM_BITS_BENCH_ROOT";
/// `1`: the bits server fsyncs every fragment and record before its Ack (`sync_data(true)`).
const SYNC_DATA_ENV: &str = "AXUM_BITS_BENCH_SYNC_DATA";
/// `1`: the bits server commits without fsyncs (`sync_on_commit(false)`).
const NO_COMMIT_SYNC_ENV: &str = "AXUM_BITS_BENCH_NO_COMMIT_SYNC";
/// Raises the bits server's `max_sessions` and `max_sessions_per_owner` to this.
const MAX_SESSIONS_ENV: &str = "AXUM_BITS_BENCH_MAX_SESSIONS";
/// Where the temporary upload roots are made.
const DIR_ENV: &str = "AXUM_BITS_BENCH_DIR";
/// A child announces its port with this line.
const PORT_LINE: &str = "listening on port ";
/// Asks the baseline handler to fsync the file after writing the body.
const FSYNC_HEADER: &str = "x-bench-fsync";
/// The one upload protocol.
const PROTOCOL: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";
/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on every Linux port).
const USER_HZ: f64 = 100.0;
/// How many errors of (c) are printed.
const SHOWN_ERRORS: usize = 5;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        return match serve(&role) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{role} server: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("{message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let summary = run(&options);
    summary.print(started.elapsed());
    if summary.failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

const USAGE: &str =
    "usage: throughput [--quick] [--only a,b,c,d] [--runs N] [--no-warm-up] [part flags]
  --quick               a CI-sized run of every part (sizes below in brackets)
  --only LIST           run only these parts, e.g. a,c (default: a,b,c,d)
  --runs N              repeat (a) and (b) N times, print the spread and judge the
                        medians (default 3 [1])
  --no-warm-up          skip the untimed page-cache warm-up before each measurement
  --mib N               (a) upload size in MiB, a multiple of 8; also the small upload of (d)
                        (default 1024 [64])
  --b-fragments N       (b) 64 KiB fragments / POSTs per measurement (default 4096 [512])
  --b-streams N         (b) concurrent uploads / POST streams of the extra row (default 8)
  --c-sessions N        (c) concurrent sessions (default 1000 [100])
  --c-size-kib N        (c) upload size per session in KiB (default 1024 [256])
  --c-fragment-kib N    (c) fragment size in KiB, at most 8192 (default 256 [64])
  --c-rate-kib N        (c) per-client body rate in KiB/s (default 512)
  --c-ramp-ms N         (c) arrivals spread over this many ms (default 1000 [200])
  --c-baseline          (c) also send the same paced load as plain POSTs to the baseline,
                        with and without an fsync per file (default in a full run)
  --no-c-baseline       (c) skip those
  --d-mib N             (d) large upload size in MiB, a multiple of 8 (default 4096 [256])";

#[derive(Debug, Clone, Copy)]
struct Parts {
    a: bool,
    b: bool,
    c: bool,
    d: bool,
}

#[derive(Debug, Clone, Copy)]
struct CConfig {
    sessions: usize,
    size: u64,
    fragment: u64,
    /// Bytes per second of each client's bodies.
    rate: u64,
    ramp: Duration,
}

#[derive(Debug)]
struct Options {
    quick: bool,
    parts: Parts,
    runs: usize,
    warm_up: bool,
    a_total: u64,
    b_fragments: u64,
    b_streams: usize,
    c: CConfig,
    /// Also run (c)'s load as plain POSTs against the baseline, for context (default: unless
    /// `--quick`).
    c_baseline: bool,
    d_total: u64,
}

impl Options {
    /// `None` for `--help`.
    fn parse(args: impl Iterator<Item = String>) -> Result<Option<Self>, String> {
        let mut quick = false;
        let mut parts = None;
        let mut runs = None;
        let mut warm_up = true;
        let mut c_baseline = None;
        let (mut mib, mut b_fragments, mut b_streams) = (None, None, None);
        let (mut c_sessions, mut c_size, mut c_fragment, mut c_rate, mut c_ramp) =
            (None, None, None, None, None);
        let mut d_mib = None;
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|&v| v > 0)
                    .ok_or(format!("{name} needs a positive number"))
            };
            match arg.as_str() {
                // Passed by `cargo bench`.
                "--bench" => {}
                "--help" | "-h" => return Ok(None),
                "--quick" => quick = true,
                "--no-warm-up" => warm_up = false,
                "--c-baseline" => c_baseline = Some(true),
                "--no-c-baseline" => c_baseline = Some(false),
                "--only" => {
                    let list = args.next().ok_or("--only needs a list such as a,c")?;
                    parts = Some(parse_parts(&list)?);
                }
                "--runs" => runs = Some(to_usize(value("--runs")?)?),
                "--mib" => mib = Some(value("--mib")?),
                "--b-fragments" => b_fragments = Some(value("--b-fragments")?),
                "--b-streams" => b_streams = Some(to_usize(value("--b-streams")?)?),
                "--c-sessions" => c_sessions = Some(to_usize(value("--c-sessions")?)?),
                "--c-size-kib" => c_size = Some(value("--c-size-kib")?),
                "--c-fragment-kib" => c_fragment = Some(value("--c-fragment-kib")?),
                "--c-rate-kib" => c_rate = Some(value("--c-rate-kib")?),
                "--c-ramp-ms" => c_ramp = Some(value("--c-ramp-ms")?),
                "--d-mib" => d_mib = Some(value("--d-mib")?),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        let pick =
            |set: Option<u64>, full: u64, ci: u64| set.unwrap_or(if quick { ci } else { full });
        let mib = pick(mib, 1024, 64);
        let d_mib = pick(d_mib, 4096, 256);
        if mib % 8 != 0 || d_mib % 8 != 0 {
            return Err("--mib and --d-mib must be multiples of 8".into());
        }
        let b_fragments = pick(b_fragments, 4096, 512);
        let b_streams = b_streams.unwrap_or(8);
        // The machine is noisy: a full run reports medians of three.
        let runs = runs.unwrap_or(if quick { 1 } else { 3 });
        if runs == 0 {
            return Err("--runs must be at least 1".into());
        }
        if b_fragments < b_streams as u64 {
            return Err("--b-fragments must be at least --b-streams".into());
        }
        let c = CConfig {
            sessions: c_sessions.unwrap_or(if quick { 100 } else { 1000 }),
            size: pick(c_size, 1024, 256) << 10,
            fragment: pick(c_fragment, 256, 64) << 10,
            rate: c_rate.unwrap_or(512) << 10,
            ramp: Duration::from_millis(pick(c_ramp, 1000, 200)),
        };
        if c.fragment > FRAGMENT as u64 {
            return Err(format!(
                "--c-fragment-kib must be at most {}",
                FRAGMENT >> 10
            ));
        }
        Ok(Some(Self {
            quick,
            parts: parts.unwrap_or(Parts {
                a: true,
                b: true,
                c: true,
                d: true,
            }),
            runs,
            warm_up,
            a_total: mib << 20,
            b_fragments,
            b_streams,
            c,
            c_baseline: c_baseline.unwrap_or(!quick),
            d_total: d_mib << 20,
        }))
    }
}

fn to_usize(v: u64) -> Result<usize, String> {
    usize::try_from(v).map_err(|e| e.to_string())
}

fn parse_parts(list: &str) -> Result<Parts, String> {
    let mut parts = Parts {
        a: false,
        b: false,
        c: false,
        d: false,
    };
    for part in list.split(',').map(str::trim) {
        match part {
            "a" => parts.a = true,
            "b" => parts.b = true,
            "c" => parts.c = true,
            "d" => parts.d = true,
            other => return Err(format!("unknown part {other:?} in --only (a, b, c or d)")),
        }
    }
    Ok(parts)
}

// ------------------------------------------------------------------------------------------
// Child: the servers.

fn serve(role: &str) -> Result<(), Error> {
    let root = PathBuf::from(std::env::var(ROOT_ENV)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let app = match role {
            "bits" => {
                let sync_data = std::env::var_os(SYNC_DATA_ENV).is_some_and(|v| v == "1");
                let no_commit_sync = std::env::var_os(NO_COMMIT_SYNC_ENV).is_some_and(|v| v == "1");
                let mut builder = BitsLayer::builder(&root)
                    .max_upload_size(1 << 40)
                    .sync_data(sync_data)
                    .sync_on_commit(!no_commit_sync);
                if let Ok(limit) = std::env::var(MAX_SESSIONS_ENV) {
                    let limit: usize = limit.parse()?;
                    builder = builder.max_sessions(limit).max_sessions_per_owner(limit);
                }
                Router::new()
                    .route("/", get(|| async { "axum-bits benchmark server" }))
                    .layer(builder.build()?)
            }
            "baseline" => Router::new()
                .route("/{name}", post(baseline_upload))
                .with_state(Arc::new(root)),
            other => return Err(format!("unknown role {other:?}").into()),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("{PORT_LINE}{}", listener.local_addr()?.port());
        // The parent closes our stdin to stop us.
        let stdin_closed = async {
            let mut sink = Vec::new();
            let _ = tokio::io::stdin().read_to_end(&mut sink).await;
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(stdin_closed)
            .await?;
        Ok(())
    })
}

/// The baseline: append the body to `root/name`, one frame at a time.
async fn baseline_upload(
    State(root): State<Arc<PathBuf>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, (StatusCode, String)> {
    let internal = |e: std::io::Error| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    if name.starts_with('.') || name.contains(['/', '\\']) {
        return Err((StatusCode::BAD_REQUEST, "bad name".into()));
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join(&name))
        .await
        .map_err(internal)?;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            file.write_all(&data).await.map_err(internal)?;
        }
    }
    file.flush().await.map_err(internal)?;
    if headers.contains_key(FSYNC_HEADER) {
        file.sync_all().await.map_err(internal)?;
    }
    Ok(StatusCode::OK)
}

// ------------------------------------------------------------------------------------------
// Parent: the parts and the summary.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pass,
    Miss,
    Error,
    /// A number to read a target's next to; no target of its own.
    Context,
}

struct Line {
    name: String,
    measured: String,
    target: String,
    status: Status,
}

#[derive(Default)]
struct Summary {
    lines: Vec<Line>,
    failed: bool,
}

impl Summary {
    fn target(&mut self, name: String, measured: String, target: &str, pass: bool) {
        self.lines.push(Line {
            name,
            measured,
            target: target.to_owned(),
            status: if pass { Status::Pass } else { Status::Miss },
        });
    }

    fn context(&mut self, name: String, measured: String) {
        self.lines.push(Line {
            name,
            measured,
            target: "-".into(),
            status: Status::Context,
        });
    }

    fn error(&mut self, part: &str, error: &Error) {
        println!("  part ({part}) FAILED: {}", chain(error.as_ref()));
        self.lines.push(Line {
            name: format!("({part}) did not complete"),
            measured: "error (see above)".into(),
            target: "-".into(),
            status: Status::Error,
        });
        self.failed = true;
    }

    fn print(&self, elapsed: Duration) {
        println!();
        println!("summary ({:.0} s in all)", elapsed.as_secs_f64());
        println!("{:<50} {:>30} {:>22}  result", "what", "measured", "target");
        println!("{}", "-".repeat(112));
        for line in &self.lines {
            let status = match line.status {
                Status::Pass => "PASS",
                Status::Miss => "MISS",
                Status::Error => "ERROR",
                Status::Context => "",
            };
            println!(
                "{:<50} {:>30} {:>22}  {status}",
                line.name, line.measured, line.target
            );
        }
        if self.failed {
            println!("errors occurred: exit status 1");
        }
    }
}

/// The folder every measurement makes its own folder in, under the temporary directory (or
/// `AXUM_BITS_BENCH_DIR`); removed at the end if empty.
///
/// It is marked as a top of directory hierarchies (`chattr +T`), so that ext4 spreads the
/// folders made in it over the disk's block groups instead of packing them next to each other.
/// Without that, on an ext4 without a journal (which skips inodes deleted in the last minutes
/// by scanning past them), the thousands of files one (c) measurement deletes would slow every
/// file creation of the next one, and of a run started soon after; that cost would be charged
/// to whichever server came next. Elsewhere the mark is unknown and harmless.
struct BenchDir(PathBuf);

impl BenchDir {
    fn make(base: &Path) -> Result<Self, Error> {
        let dir = base.join("axum-bits-bench");
        std::fs::create_dir_all(&dir)?;
        // Best effort: without it the numbers are only noisier.
        let _ = Command::new("chattr")
            .arg("+T")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        Ok(Self(dir))
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn run(options: &Options) -> Summary {
    let mut summary = Summary::default();
    let payload = Bytes::from(pseudo_random(FRAGMENT));
    let base = std::env::var_os(DIR_ENV).map_or_else(std::env::temp_dir, PathBuf::from);
    let bench_dir = match BenchDir::make(&base) {
        Ok(dir) => dir,
        Err(e) => {
            summary.error("setup", &e);
            return summary;
        }
    };
    let base = bench_dir.0.clone();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "axum-bits benchmark{}: client in this process, each server in a child process of its \
         own, all on 127.0.0.1 ({cores} cores); files under {}",
        if options.quick { " (--quick)" } else { "" },
        base.display()
    );
    println!("MB = 10^6 bytes; RSS in MiB (idle: after start-up, peak: VmHWM after the upload)");

    let mut a_bits = None;
    if options.parts.a {
        match part_a(options, &payload, &base, &mut summary) {
            Ok(bits) => a_bits = Some(bits),
            Err(e) => summary.error("a", &e),
        }
    }
    if options.parts.b {
        if let Err(e) = part_b(options, &payload, &base, &mut summary) {
            summary.error("b", &e);
        }
    }
    if options.parts.c {
        if let Err(e) = part_c(options, &payload, &base, &mut summary) {
            summary.error("c", &e);
        }
    }
    if options.parts.d {
        if let Err(e) = part_d(options, &payload, &base, a_bits, &mut summary) {
            summary.error("d", &e);
        }
    }
    drop(bench_dir);
    summary
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Bits,
    /// The bits server with `sync_on_commit(false)`.
    BitsNoCommitSync,
    Baseline,
    BaselineFsync,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Self::Bits => "bits (FileStore + LocalStaging)",
            Self::BitsNoCommitSync => "bits, sync_on_commit(false)",
            Self::Baseline => "baseline (no fsync)",
            Self::BaselineFsync => "baseline (fsync at end)",
        }
    }

    fn role(self) -> &'static str {
        match self {
            Self::Bits | Self::BitsNoCommitSync => "bits",
            Self::Baseline | Self::BaselineFsync => "baseline",
        }
    }

    /// Environment of the child server.
    fn env(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::BitsNoCommitSync => &[(NO_COMMIT_SYNC_ENV, "1")],
            _ => &[],
        }
    }
}

/// `streams` uploads at once, each `per_stream` requests with `fragment` as the body.
struct Workload {
    fragment: Bytes,
    per_stream: u64,
    streams: usize,
}

impl Workload {
    fn stream_bytes(&self) -> u64 {
        self.fragment.len() as u64 * self.per_stream
    }

    fn total(&self) -> u64 {
        self.stream_bytes() * self.streams as u64
    }

    fn requests(&self) -> u64 {
        self.per_stream * self.streams as u64
    }
}

#[derive(Debug, Clone, Copy)]
struct Measurement {
    secs: f64,
    /// For the BITS server: from the start of the last Fragment to the Close-Session Ack
    /// (the longest over the streams), which covers the commit.
    final_secs: Option<f64>,
    idle_rss_kib: u64,
    peak_rss_kib: u64,
    server_cpu_secs: f64,
}

impl Measurement {
    fn mb_per_sec(&self, total: u64) -> f64 {
        total as f64 / 1e6 / self.secs
    }
}

// ---- (a)

/// (a); returns the bits measurement whose peak RSS is the median, for (d).
fn part_a(
    options: &Options,
    payload: &Bytes,
    base: &Path,
    summary: &mut Summary,
) -> Result<Measurement, Error> {
    let total = options.a_total;
    let work = Workload {
        fragment: payload.clone(),
        per_stream: total / FRAGMENT as u64,
        streams: 1,
    };
    println!();
    println!(
        "(a) one {} MiB upload in {} MiB requests, one kept-alive connection; {} run(s)",
        total >> 20,
        FRAGMENT >> 20,
        options.runs
    );
    println!(
        "{:>3}  {:<32} {:>9} {:>8} {:>8} {:>10} {:>9} {:>9}",
        "run", "server", "MB/s", "time s", "final s", "srv CPU s", "idle RSS", "peak RSS"
    );
    println!("{}", "-".repeat(96));
    const ALL: [Scenario; 4] = [
        Scenario::Bits,
        Scenario::Baseline,
        Scenario::BaselineFsync,
        Scenario::BitsNoCommitSync,
    ];
    let mut results: Vec<[Measurement; 4]> = Vec::with_capacity(options.runs);
    for run in 1..=options.runs {
        let mut row = [None; 4];
        for (slot, scenario) in row.iter_mut().zip(ALL) {
            let m = measure(scenario, &work, base, options.warm_up.then_some(payload))?;
            print_a_row(&run.to_string(), scenario, &m, total);
            *slot = Some(m);
        }
        let [Some(bits), Some(plain), Some(fsync), Some(fast)] = row else {
            return Err("a scenario was not measured".into());
        };
        let b = bits.mb_per_sec(total);
        println!(
            "{:>3}  ratio bits / baseline: {:.2}x vs no fsync (headline), {:.2}x vs fsync at end; \
             sync_on_commit(false) / baseline: {:.2}x",
            "",
            b / plain.mb_per_sec(total),
            b / fsync.mb_per_sec(total),
            fast.mb_per_sec(total) / plain.mb_per_sec(total)
        );
        results.push([bits, plain, fsync, fast]);
    }

    let speeds =
        |i: usize| -> Vec<f64> { results.iter().map(|r| r[i].mb_per_sec(total)).collect() };
    let ratios: Vec<f64> = results
        .iter()
        .map(|r| r[0].mb_per_sec(total) / r[1].mb_per_sec(total))
        .collect();
    if options.runs > 1 {
        println!("spread over {} runs (min / median / max)", options.runs);
        for (i, scenario) in ALL.into_iter().enumerate() {
            let peaks: Vec<f64> = results.iter().map(|r| mib(r[i].peak_rss_kib)).collect();
            println!(
                "     {:<32} MB/s {}   peak RSS MiB {}",
                scenario.label(),
                spread(&speeds(i), 0),
                spread(&peaks, 1)
            );
        }
        let fsync_ratios: Vec<f64> = results
            .iter()
            .map(|r| r[0].mb_per_sec(total) / r[2].mb_per_sec(total))
            .collect();
        println!(
            "     {:<32} {}",
            "ratio bits / baseline (no fsync)",
            spread(&ratios, 2)
        );
        println!(
            "     {:<32} {}",
            "ratio bits / baseline (fsync)",
            spread(&fsync_ratios, 2)
        );
    }
    let ratio = median(&ratios);
    summary.target(
        format!("(a) MB/s bits / baseline, {} MiB in 8 MiB", total >> 20),
        format!(
            "{ratio:.2} ({:.0} / {:.0} MB/s)",
            median(&speeds(0)),
            median(&speeds(1))
        ),
        ">= 0.95",
        ratio >= 0.95,
    );
    let fast_ratios: Vec<f64> = results
        .iter()
        .map(|r| r[3].mb_per_sec(total) / r[1].mb_per_sec(total))
        .collect();
    let fast_ratio = median(&fast_ratios);
    summary.target(
        "(a) the same, sync_on_commit(false)".into(),
        format!(
            "{fast_ratio:.2} ({:.0} / {:.0} MB/s)",
            median(&speeds(3)),
            median(&speeds(1))
        ),
        ">= 0.95",
        fast_ratio >= 0.95,
    );
    let mut bits: Vec<Measurement> = results.iter().map(|r| r[0]).collect();
    bits.sort_by_key(|m| m.peak_rss_kib);
    Ok(bits[bits.len() / 2])
}

fn print_a_row(run: &str, scenario: Scenario, m: &Measurement, total: u64) {
    println!(
        "{:>3}  {:<32} {:>9.1} {:>8.3} {:>8} {:>10.2} {:>9.1} {:>9.1}",
        run,
        scenario.label(),
        m.mb_per_sec(total),
        m.secs,
        final_secs(m),
        m.server_cpu_secs,
        mib(m.idle_rss_kib),
        mib(m.peak_rss_kib)
    );
}

fn final_secs(m: &Measurement) -> String {
    m.final_secs
        .map_or_else(|| "-".to_owned(), |c| format!("{c:.3}"))
}

// ---- (b)

fn part_b(
    options: &Options,
    payload: &Bytes,
    base: &Path,
    summary: &mut Summary,
) -> Result<(), Error> {
    let fragment = payload.slice(..SMALL_FRAGMENT);
    let n = options.b_fragments;
    println!();
    println!(
        "(b) {n} requests of {} KiB: one sequential upload / POST stream, and {} at once \
         (each on its own connection); {} run(s)",
        SMALL_FRAGMENT >> 10,
        options.b_streams,
        options.runs
    );
    println!(
        "{:>3} {:>7}  {:<32} {:>9} {:>7} {:>8} {:>8} {:>14} {:>9}",
        "run",
        "streams",
        "server",
        "req/s",
        "MB/s",
        "time s",
        "final s",
        "srv CPU us/req",
        "peak RSS"
    );
    println!("{}", "-".repeat(106));
    let mut shapes = vec![1];
    if options.b_streams > 1 {
        shapes.push(options.b_streams);
    }
    // rates[shape] = (bits req/s, baseline req/s) per run.
    let mut rates: Vec<Vec<(f64, f64)>> = vec![Vec::new(); shapes.len()];
    for run in 1..=options.runs {
        for (shape, &streams) in shapes.iter().enumerate() {
            let work = Workload {
                fragment: fragment.clone(),
                per_stream: n / streams as u64,
                streams,
            };
            let mut pair = [0.0; 2];
            for (slot, scenario) in pair.iter_mut().zip([Scenario::Bits, Scenario::Baseline]) {
                let m = measure(scenario, &work, base, options.warm_up.then_some(payload))?;
                let requests = work.requests() as f64;
                *slot = requests / m.secs;
                println!(
                    "{:>3} {:>7}  {:<32} {:>9.0} {:>7.1} {:>8.3} {:>8} {:>14.0} {:>9.1}",
                    run,
                    streams,
                    scenario.label(),
                    *slot,
                    m.mb_per_sec(work.total()),
                    m.secs,
                    final_secs(&m),
                    m.server_cpu_secs * 1e6 / requests,
                    mib(m.peak_rss_kib)
                );
            }
            println!(
                "{:>3} {:>7}  ratio bits fragments/s / baseline POSTs/s: {:.2}x",
                "",
                "",
                pair[0] / pair[1]
            );
            rates[shape].push((pair[0], pair[1]));
        }
    }
    if options.runs > 1 {
        println!("spread over {} runs (min / median / max)", options.runs);
        for (shape, &streams) in shapes.iter().enumerate() {
            let bits: Vec<f64> = rates[shape].iter().map(|r| r.0).collect();
            let plain: Vec<f64> = rates[shape].iter().map(|r| r.1).collect();
            let ratio: Vec<f64> = rates[shape].iter().map(|r| r.0 / r.1).collect();
            println!(
                "    {streams:>7}  bits req/s {}   baseline req/s {}   ratio {}",
                spread(&bits, 0),
                spread(&plain, 0),
                spread(&ratio, 2)
            );
        }
    }
    let bits: Vec<f64> = rates[0].iter().map(|r| r.0).collect();
    let plain: Vec<f64> = rates[0].iter().map(|r| r.1).collect();
    let ratio: Vec<f64> = rates[0].iter().map(|r| r.0 / r.1).collect();
    let ratio = median(&ratio);
    summary.target(
        format!("(b) {n} x 64 KiB sequential: fragments/s / POSTs/s"),
        format!(
            "{ratio:.2} ({:.0} / {:.0} /s)",
            median(&bits),
            median(&plain)
        ),
        ">= 0.70",
        ratio >= 0.70,
    );
    Ok(())
}

// ---- (a), (b) and (d): one measurement

/// Starts a server for `scenario`, runs `work` against it, checks the files, and stops it.
fn measure(
    scenario: Scenario,
    work: &Workload,
    base: &Path,
    warm_up_with: Option<&Bytes>,
) -> Result<Measurement, Error> {
    let root = tempfile::Builder::new()
        .prefix("axum-bits-bench-")
        .tempdir_in(base)?;
    if let Some(payload) = warm_up_with {
        warm_up(root.path(), work.total(), payload)?;
    }
    let mut server = ChildServer::start(scenario.role(), root.path(), scenario.env())?;
    let pid = server.pid();
    let idle_rss_kib = proc_status_kib(pid, "VmRSS")?;
    let cpu_before = proc_cpu_secs(Some(pid))?;
    // A fresh runtime per measurement: dropping it closes the client's pooled connections, so
    // the server's graceful shutdown does not wait for them.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (secs, final_secs) = runtime.block_on(run_streams(scenario, server.port, work))?;
    drop(runtime);
    let peak_rss_kib = proc_status_kib(pid, "VmHWM")?;
    let server_cpu_secs = proc_cpu_secs(Some(pid))? - cpu_before;
    server.stop();
    for stream in 0..work.streams {
        verify(
            &root.path().join(stream_file(stream)),
            work.stream_bytes(),
            &work.fragment,
        )?;
    }
    root.close()?;
    Ok(Measurement {
        secs,
        final_secs,
        idle_rss_kib,
        peak_rss_kib,
        server_cpu_secs,
    })
}

fn stream_file(stream: usize) -> String {
    format!("upload-{stream}.bin")
}

/// Runs the streams of `work` at once; returns the wall time and the longest "final" time.
async fn run_streams(
    scenario: Scenario,
    port: u16,
    work: &Workload,
) -> Result<(f64, Option<f64>), Error> {
    let clients = (0..work.streams)
        .map(|_| reqwest::Client::builder().no_proxy().build())
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (stream, client) in clients.into_iter().enumerate() {
        let url = format!("http://127.0.0.1:{port}/{}", stream_file(stream));
        let (fragment, n) = (work.fragment.clone(), work.per_stream);
        tasks.spawn(async move {
            match scenario {
                Scenario::Bits | Scenario::BitsNoCommitSync => {
                    upload_bits(&client, &url, &fragment, n).await.map(Some)
                }
                Scenario::Baseline => upload_baseline(&client, &url, &fragment, n, false)
                    .await
                    .map(|()| None),
                Scenario::BaselineFsync => upload_baseline(&client, &url, &fragment, n, true)
                    .await
                    .map(|()| None),
            }
        });
    }
    let mut longest_final: Option<f64> = None;
    while let Some(joined) = tasks.join_next().await {
        let final_secs = joined.map_err(|e| format!("upload task: {e}"))??;
        longest_final = match (longest_final, final_secs) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    Ok((started.elapsed().as_secs_f64(), longest_final))
}

/// Create-Session, `n` fragments, Close-Session. Returns the time from the start of the last
/// Fragment to the Close-Session Ack.
async fn upload_bits(
    client: &reqwest::Client,
    url: &str,
    fragment: &Bytes,
    n: u64,
) -> Result<f64, Error> {
    let bits_post = reqwest::Method::from_bytes(b"BITS_POST")?;
    let total = fragment.len() as u64 * n;

    let reply = client
        .request(bits_post.clone(), url)
        .header("BITS-Packet-Type", "Create-Session")
        .header("BITS-Supported-Protocols", PROTOCOL)
        .send()
        .await?;
    let reply = expect_ok(reply, "Create-Session").await?;
    let session = reply
        .headers()
        .get("BITS-Session-Id")
        .ok_or("no BITS-Session-Id on the Create-Session Ack")?
        .clone();

    let mut offset = 0u64;
    let mut last_fragment = Instant::now();
    while offset < total {
        let end = offset + fragment.len() as u64;
        last_fragment = Instant::now();
        let reply = client
            .request(bits_post.clone(), url)
            .header("BITS-Packet-Type", "Fragment")
            .header("BITS-Session-Id", session.clone())
            .header(
                "Content-Range",
                format!("bytes {offset}-{}/{total}", end - 1),
            )
            .body(fragment.clone())
            .send()
            .await?;
        let reply = expect_ok(reply, "Fragment").await?;
        let received = received_range(reply.headers());
        if received != Some(end) {
            return Err(format!("fragment ending at {end}: server reports {received:?}").into());
        }
        offset = end;
    }

    let reply = client
        .request(bits_post, url)
        .header("BITS-Packet-Type", "Close-Session")
        .header("BITS-Session-Id", session)
        .send()
        .await?;
    expect_ok(reply, "Close-Session").await?;
    Ok(last_fragment.elapsed().as_secs_f64())
}

/// The same POSTs to the baseline handler, appending to one file.
async fn upload_baseline(
    client: &reqwest::Client,
    url: &str,
    fragment: &Bytes,
    n: u64,
    fsync_at_end: bool,
) -> Result<(), Error> {
    for i in 1..=n {
        let mut request = client.post(url).body(fragment.clone());
        if fsync_at_end && i == n {
            request = request.header(FSYNC_HEADER, "1");
        }
        expect_ok(request.send().await?, "POST").await?;
    }
    Ok(())
}

/// Fails on a non-200 reply; drains the (empty) body so the connection is reused.
async fn expect_ok(reply: reqwest::Response, what: &str) -> Result<reqwest::Response, Error> {
    if reply.status() != reqwest::StatusCode::OK {
        let status = reply.status();
        let headers = format!("{:?}", reply.headers());
        let body = reply.text().await.unwrap_or_default();
        return Err(format!("{what}: {status} {headers} {body}").into());
    }
    Ok(reply)
}

/// `BITS-Received-Content-Range` of a Fragment Ack.
fn received_range(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("BITS-Received-Content-Range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

// ---- (c)

fn part_c(
    options: &Options,
    payload: &Bytes,
    base: &Path,
    summary: &mut Summary,
) -> Result<(), Error> {
    let c = options.c;
    println!();
    println!(
        "(c) {} sessions of {} KiB, each on its own connection, arriving over {} ms; \
         {} KiB fragments paced at {} KiB/s in {} KiB chunks",
        c.sessions,
        c.size >> 10,
        c.ramp.as_millis(),
        c.fragment >> 10,
        c.rate >> 10,
        PACE_CHUNK >> 10
    );
    // The server holds a socket per session and, while a fragment is in flight, its part
    // file; the client a socket per session. Both inherit this process's limit.
    let needed = 2 * c.sessions as u64 + 256;
    let limit = open_files_limit()?;
    if limit < needed {
        return Err(format!(
            "the open-file limit (ulimit -n) is {limit}; {} sessions need about {needed}: \
             raise it (ulimit -n {needed}) or lower --c-sessions",
            c.sessions
        )
        .into());
    }
    let fragment = payload.slice(..usize::try_from(c.fragment)?);
    let bits = measure_c(CServer::Bits, c, &fragment, base, true)?;
    bits.print(CServer::Bits);
    println!("    the same with sync_on_commit(false):");
    let fast = measure_c(CServer::Bits, c, &fragment, base, false)?;
    fast.print(CServer::Bits);
    let context = if options.c_baseline {
        println!(
            "    the same paced load as plain POSTs (one per fragment, no Create/Close) \
             to the baseline, for context; each file fsynced after its last POST:"
        );
        let baseline = measure_c(CServer::Baseline, c, &fragment, base, true)?;
        baseline.print(CServer::Baseline);
        println!("    the baseline without the fsync:");
        let plain = measure_c(CServer::Baseline, c, &fragment, base, false)?;
        plain.print(CServer::Baseline);
        Some((baseline, plain))
    } else {
        None
    };

    let label = format!("{} sessions x {} KiB", c.sessions, c.size >> 10);
    summary.target(
        format!("(c) errors, {label}"),
        bits.errors.len().to_string(),
        "0",
        bits.errors.is_empty(),
    );
    let overall = bits.overall();
    summary.target(
        format!("(c) p99 Ack latency, {label}"),
        format!(
            "{:.1} ms (p50 {:.1}, max {:.1})",
            overall.p99, overall.p50, overall.max
        ),
        "< 100 ms",
        overall.n > 0 && overall.p99 < 100.0,
    );
    let fast_overall = fast.overall();
    summary.target(
        "(c) the same, sync_on_commit(false)".into(),
        format!(
            "{:.1} ms (p50 {:.1}, max {:.1}), {} errors",
            fast_overall.p99,
            fast_overall.p50,
            fast_overall.max,
            fast.errors.len()
        ),
        "< 100 ms",
        fast_overall.n > 0 && fast_overall.p99 < 100.0 && fast.errors.is_empty(),
    );
    if let Some((synced, plain)) = &context {
        for (name, result) in [
            ("(c) baseline, fsync after the last POST", synced),
            ("(c) baseline, no fsync", plain),
        ] {
            let overall = result.overall();
            summary.context(
                name.into(),
                format!(
                    "{:.1} ms (p50 {:.1}, max {:.1}), {} errors",
                    overall.p99,
                    overall.p50,
                    overall.max,
                    result.errors.len()
                ),
            );
        }
    }
    let wanted = c.sessions.div_ceil(10) * 9;
    summary.target(
        "(c) peak sessions open at once".into(),
        format!("{} of {}", bits.peak_open, c.sessions),
        &format!(">= {wanted} (90%)"),
        bits.peak_open >= wanted,
    );
    if !bits.errors.is_empty()
        || !fast.errors.is_empty()
        || context
            .is_some_and(|(synced, plain)| !synced.errors.is_empty() || !plain.errors.is_empty())
    {
        summary.failed = true;
    }
    Ok(())
}

/// Which server the clients of (c) talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CServer {
    Bits,
    /// Plain POSTs of the same paced fragments, for context.
    Baseline,
}

/// What (c) measured.
struct CResult {
    sessions: usize,
    completed: usize,
    errors: Vec<String>,
    peak_open: usize,
    total_secs: f64,
    latencies: Vec<(PacketKind, Duration)>,
    client_cpu: f64,
    server_cpu: f64,
    peak_rss_kib: u64,
}

impl CResult {
    fn overall(&self) -> Percentiles {
        Percentiles::of(self.latencies.iter().map(|&(_, d)| d).collect())
    }

    fn print(&self, server: CServer) {
        let (open, span) = match server {
            CServer::Bits => (
                "Create Ack .. Close Ack",
                "first Create-Session .. last Close-Session Ack",
            ),
            CServer::Baseline => ("first POST Ack .. last POST Ack", "first POST .. last Ack"),
        };
        println!(
            "    sessions completed       {} of {} ({} errors)",
            self.completed,
            self.sessions,
            self.errors.len()
        );
        println!(
            "    peak open at once        {} (seen by the clients, {open})",
            self.peak_open
        );
        println!(
            "    total time               {:.3} s ({span})",
            self.total_secs
        );
        println!(
            "    {:<24} {:>8} {:>8} {:>8} {:>8}",
            "Ack latency ms", "p50", "p99", "max", "n"
        );
        let row = |name: &str, p: &Percentiles| {
            println!(
                "    {:<24} {:>8.2} {:>8.2} {:>8.2} {:>8}",
                name, p.p50, p.p99, p.max, p.n
            );
        };
        row("  all packets", &self.overall());
        for kind in PacketKind::ALL {
            let some: Vec<Duration> = self
                .latencies
                .iter()
                .filter(|&&(k, _)| k == kind)
                .map(|&(_, d)| d)
                .collect();
            if !some.is_empty() {
                row(&format!("  {}", kind.name(server)), &Percentiles::of(some));
            }
        }
        println!(
            "    CPU s                    client {:.2}, server {:.2} (over {:.2} s of wall time)",
            self.client_cpu, self.server_cpu, self.total_secs
        );
        println!(
            "    server peak RSS          {:.1} MiB",
            mib(self.peak_rss_kib)
        );
        for error in self.errors.iter().take(SHOWN_ERRORS) {
            println!("    error: {error}");
        }
        if self.errors.len() > SHOWN_ERRORS {
            println!(
                "    ... and {} more errors",
                self.errors.len() - SHOWN_ERRORS
            );
        }
    }
}

/// One run of (c) against a fresh `server`; checks every file that was uploaded.
fn measure_c(
    server: CServer,
    c: CConfig,
    fragment: &Bytes,
    base: &Path,
    commit_sync: bool,
) -> Result<CResult, Error> {
    let root = tempfile::Builder::new()
        .prefix("axum-bits-bench-")
        .tempdir_in(base)?;
    let max_sessions = (2 * c.sessions).to_string();
    let mut child = match server {
        CServer::Bits => {
            let no_commit_sync = if commit_sync { "0" } else { "1" };
            ChildServer::start(
                "bits",
                root.path(),
                &[
                    (MAX_SESSIONS_ENV, &max_sessions),
                    (NO_COMMIT_SYNC_ENV, no_commit_sync),
                ],
            )?
        }
        CServer::Baseline => ChildServer::start("baseline", root.path(), &[])?,
    };
    let pid = child.pid();
    let server_cpu_before = proc_cpu_secs(Some(pid))?;
    let client_cpu_before = proc_cpu_secs(None)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (sessions, peak_open) = runtime.block_on(run_sessions(
        server,
        child.port,
        c,
        fragment.clone(),
        commit_sync,
    ));
    drop(runtime);
    let client_cpu = proc_cpu_secs(None)? - client_cpu_before;
    let server_cpu = proc_cpu_secs(Some(pid))? - server_cpu_before;
    let peak_rss_kib = proc_status_kib(pid, "VmHWM")?;
    child.stop();

    let mut errors: Vec<String> = Vec::new();
    let mut latencies: Vec<(PacketKind, Duration)> = Vec::new();
    let (mut first_sent, mut last_ack) = (None::<Instant>, None::<Instant>);
    let mut completed = 0usize;
    for (i, session) in sessions.into_iter().enumerate() {
        latencies.extend(session.latencies);
        first_sent = min_instant(first_sent, session.first_sent);
        last_ack = max_instant(last_ack, session.last_ack);
        if let Some(error) = session.error {
            errors.push(error);
        } else if let Err(e) = verify(&root.path().join(c_file(i)), c.size, fragment) {
            errors.push(format!("session {i}: {e}"));
        } else {
            completed += 1;
        }
    }
    // Deleted now, so that the next measurement reuses the page cache this one filled
    // rather than memory the machine has not touched yet (slow to fault in on a VM).
    drop(root);
    let total_secs = match (first_sent, last_ack) {
        (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    Ok(CResult {
        sessions: c.sessions,
        completed,
        errors,
        peak_open,
        total_secs,
        latencies,
        client_cpu,
        server_cpu,
        peak_rss_kib,
    })
}

fn c_file(session: usize) -> String {
    format!("c-{session:05}.bin")
}

fn min_instant(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn max_instant(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PacketKind {
    Create,
    /// A Fragment that does not complete the file.
    Fragment,
    /// The Fragment that completes the file: the server commits it before the Ack.
    LastFragment,
    Close,
}

impl PacketKind {
    const ALL: [Self; 4] = [
        Self::Create,
        Self::Fragment,
        Self::LastFragment,
        Self::Close,
    ];

    fn name(self, server: CServer) -> &'static str {
        match (self, server) {
            (Self::Create, _) => "Create-Session",
            (Self::Fragment, CServer::Bits) => "Fragment (not last)",
            (Self::LastFragment, CServer::Bits) => "Fragment (last, commit)",
            (Self::Fragment, CServer::Baseline) => "POST (not last)",
            (Self::LastFragment, CServer::Baseline) => "POST (last)",
            (Self::Close, _) => "Close-Session",
        }
    }
}

/// p50, p99 and max in ms (nearest rank).
struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
    n: usize,
}

impl Percentiles {
    fn of(mut values: Vec<Duration>) -> Self {
        values.sort();
        let rank = |q: f64| -> f64 {
            if values.is_empty() {
                return f64::NAN;
            }
            let i = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1;
            values[i].as_secs_f64() * 1e3
        };
        Self {
            p50: rank(0.50),
            p99: rank(0.99),
            max: rank(1.0),
            n: values.len(),
        }
    }
}

/// What one client of (c) saw.
#[derive(Default)]
struct SessionOutcome {
    latencies: Vec<(PacketKind, Duration)>,
    first_sent: Option<Instant>,
    last_ack: Option<Instant>,
    error: Option<String>,
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
async fn run_sessions(
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

// ---- (d)

fn part_d(
    options: &Options,
    payload: &Bytes,
    base: &Path,
    from_a: Option<Measurement>,
    summary: &mut Summary,
) -> Result<(), Error> {
    let (small, large) = (options.a_total, options.d_total);
    println!();
    println!(
        "(d) bits server peak RSS for one {} MiB and one {} MiB upload in {} MiB fragments, \
         a fresh server each",
        small >> 20,
        large >> 20,
        FRAGMENT >> 20
    );
    let workload = |total: u64| Workload {
        fragment: payload.clone(),
        per_stream: total / FRAGMENT as u64,
        streams: 1,
    };
    let warm = options.warm_up.then_some(payload);
    let (small_m, reused) = match from_a {
        Some(m) => (m, true),
        None => (
            measure(Scenario::Bits, &workload(small), base, warm)?,
            false,
        ),
    };
    let avail = free_bytes(base)?;
    let needed = large + (256 << 20);
    if avail < needed {
        return Err(format!(
            "{} has {} MiB free; the {} MiB upload needs {} MiB (use --d-mib or {DIR_ENV})",
            base.display(),
            avail >> 20,
            large >> 20,
            needed >> 20
        )
        .into());
    }
    let large_m = measure(Scenario::Bits, &workload(large), base, warm)?;
    println!(
        "    {:>10} {:>9} {:>8} {:>10} {:>9}",
        "upload MiB", "MB/s", "time s", "idle RSS", "peak RSS"
    );
    for (total, m, note) in [
        (
            small,
            &small_m,
            if reused {
                "  (the bits run of (a))"
            } else {
                ""
            },
        ),
        (large, &large_m, ""),
    ] {
        println!(
            "    {:>10} {:>9.1} {:>8.3} {:>10.1} {:>9.1}{note}",
            total >> 20,
            m.mb_per_sec(total),
            m.secs,
            mib(m.idle_rss_kib),
            mib(m.peak_rss_kib)
        );
    }
    let ratio = large_m.peak_rss_kib as f64 / small_m.peak_rss_kib as f64;
    println!(
        "    peak RSS ratio {} MiB / {} MiB: {ratio:.3}",
        large >> 20,
        small >> 20
    );
    for (total, m) in [(small, &small_m), (large, &large_m)] {
        summary.target(
            format!("(d) bits peak RSS, {} MiB upload", total >> 20),
            format!("{:.1} MiB", mib(m.peak_rss_kib)),
            "< 64 MiB",
            m.peak_rss_kib < 64 << 10,
        );
    }
    summary.target(
        format!("(d) peak RSS {} MiB / {} MiB", large >> 20, small >> 20),
        format!("{ratio:.3}"),
        "0.90 ..= 1.10",
        (0.9..=1.1).contains(&ratio),
    );
    Ok(())
}

/// Free bytes on the filesystem of `dir`, from `df -Pk` (std has no statvfs, and the crate
/// allows no unsafe code).
fn free_bytes(dir: &Path) -> Result<u64, Error> {
    let output = Command::new("df")
        .arg("-Pk")
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run df to check free space: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "df -Pk {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .nth(1)
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib << 10)
        .ok_or_else(|| format!("cannot read the free space from df's output {text:?}").into())
}

// ------------------------------------------------------------------------------------------
// Helpers.

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn spread(values: &[f64], decimals: usize) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let (Some(min), Some(max)) = (sorted.first(), sorted.last()) else {
        return "-".into();
    };
    format!(
        "{:.*} / {:.*} / {:.*}",
        decimals,
        min,
        decimals,
        median(&sorted),
        decimals,
        max
    )
}

/// An error and its sources, on one line.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Writes `total` bytes (rounded up to whole payloads) to a scratch file and deletes it,
/// untimed.
///
/// On a VM whose host takes back idle guest memory, the first `total` bytes of page cache
/// written after a pause cost a host page fault each: `dd` of 1 GiB runs at ~450 MB/s the
/// first time and ~5 GB/s right after. Without this, whichever server is measured first pays
/// for it.
fn warm_up(dir: &Path, total: u64, payload: &Bytes) -> Result<(), Error> {
    use std::io::Write as _;
    let path = dir.join("warm-up.tmp");
    let mut file = std::fs::File::create(&path)?;
    for _ in 0..total.div_ceil(payload.len() as u64) {
        file.write_all(payload)?;
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(())
}

/// The uploaded file must be `chunk` repeated, cut at `total` bytes.
fn verify(path: &Path, total: u64, chunk: &[u8]) -> Result<(), Error> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = file.metadata()?.len();
    if len != total {
        return Err(format!("{}: {len} bytes, expected {total}", path.display()).into());
    }
    let mut buffer = vec![0; chunk.len()];
    let mut offset = 0u64;
    while offset < total {
        let n = usize::try_from((total - offset).min(chunk.len() as u64))?;
        file.read_exact(&mut buffer[..n])?;
        if buffer[..n] != chunk[..n] {
            return Err(format!(
                "{}: the bytes at {offset} differ from what was sent",
                path.display()
            )
            .into());
        }
        offset += n as u64;
    }
    Ok(())
}

/// Deterministic incompressible bytes (xorshift64).
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A `kB` field of `/proc/<pid>/status`, in KiB.
fn proc_status_kib(pid: u32, field: &str) -> Result<u64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().strip_suffix("kB")?.trim().parse().ok()
        })
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status").into())
}

/// User plus system CPU time of a process (`None`: this one), in seconds.
fn proc_cpu_secs(pid: Option<u32>) -> Result<f64, Error> {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_owned(),
        |p| format!("/proc/{p}/stat"),
    );
    let stat = std::fs::read_to_string(&path)?;
    // The command name (field 2) may hold spaces; fields from 3 on follow its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => Ok((user + system) as f64 / USER_HZ),
        _ => Err(format!("cannot read the CPU times in {path}").into()),
    }
}

/// The soft limit on open files of this process (inherited by the servers).
fn open_files_limit() -> Result<u64, Error> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .ok_or("no \"Max open files\" in /proc/self/limits")?;
    match line.split_whitespace().nth(3) {
        Some("unlimited") => Ok(u64::MAX),
        Some(soft) => Ok(soft.parse()?),
        None => Err(format!("cannot read {line:?}").into()),
    }
}

/// A server child process; stopped (stdin closed, killed if it lingers) on drop.
struct ChildServer {
    child: Child,
    port: u16,
}

impl ChildServer {
    fn start(role: &str, root: &Path, env: &[(&str, &str)]) -> Result<Self, Error> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .env(ROLE_ENV, role)
            .env(ROOT_ENV, root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn()?;
        let mut line = String::new();
        let read = match child.stdout.take() {
            Some(stdout) => BufReader::new(stdout).read_line(&mut line).map(drop),
            None => Err(std::io::Error::other("no stdout pipe")),
        };
        let port = line
            .trim()
            .strip_prefix(PORT_LINE)
            .and_then(|p| p.parse().ok());
        let mut server = Self { child, port: 0 };
        match (read, port) {
            (Ok(()), Some(port)) => {
                server.port = port;
                Ok(server)
            }
            (read, _) => {
                server.stop();
                Err(
                    format!("{role} server did not report its port (got {line:?}, {read:?})")
                        .into(),
                )
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}
