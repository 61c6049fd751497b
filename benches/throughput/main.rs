//! The benchmark program of axum-bits: the BITS layer against a plain axum handler that
//! streams POST bodies to a file, in four parts, each against a target of the performance
//! issue, and a fifth, (e), on what a metrics recorder costs the BITS server. One run prints
//! every part's table and ends with a summary: one line per target with the measured value,
//! the target and PASS or MISS.
//!
//! ```text
//! cargo bench --bench throughput                    # the full run (all five parts)
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
//! incompressible bytes (`Bytes` slices, no copies). The child processes are started, watched
//! and killed with the tests' child-server harness, `tests/common/node.rs` (see `servers.rs`
//! for what of it is used).
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
//! the baseline with an fsync of the file and its folder after the last POST: the durability
//! a committed BITS upload has (it survives a power loss), so the honest comparison. The
//! baseline as is (data left in the page cache) and `sync_on_commit(false)` against it are
//! rows for context.
//!
//! # (b) Small fragments: requests per second
//!
//! One sequential upload of 4,096 Fragments of 64 KiB (256 MiB; `--b-fragments`; `--quick`:
//! 512) to the bits server, in fragments per second = fragments / (Create-Session .. Close-Session
//! Ack), against as many sequential 64 KiB POSTs to the baseline, in POSTs per second = POSTs /
//! (first sent .. last answered). Target: bits / baseline >= 0.85; the server CPU per
//! fragment against the baseline's per POST is reported next to it, and, for context, the
//! sequential upload to a bits server with `sync_on_commit(false)` (no write-back while the
//! part grows, no fsync at the commit; the baseline makes no fsync either). Extra row: the same number
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
//! errors, p99 < 100 ms, and the server's peak RSS at most 100 MiB for 1,000 sessions (in
//! proportion for other counts, at least 16 MiB). The server needs about two file descriptors per session (its socket,
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
//! # (e) A metrics recorder's cost
//!
//! The crate records its metrics through the `metrics` facade and installs no recorder; with
//! none installed each record is an atomic load. (e) measures what an installed one costs on
//! the sequential upload of (b): 4,096 Fragments of 64 KiB (`--b-fragments`; `--quick`: 512)
//! to a bits server with a Prometheus recorder (`metrics-exporter-prometheus`) installed as
//! its global recorder at start-up (`AXUM_BITS_BENCH_RECORDER=1`), built as the crate's
//! documentation advises: `PrometheusBuilder::new()` with `DURATION_BUCKETS` for
//! `Matcher::Suffix("_seconds")` and `SIZE_BUCKETS` for `Matcher::Suffix("_bytes")`,
//! `build_recorder()`, then `axum_bits::metrics::describe()`, and an upkeep task every 5 s as
//! `PrometheusBuilder::install` would run.
//!
//! The recorder sits behind a switch (`servers::Switched`: a `metrics::Recorder` that passes
//! each record to the Prometheus recorder while an `AtomicBool` is on, to
//! `metrics::NoopRecorder` while it is off; `PUT /recorder/on|off` flips it). The client sends
//! the Fragments in blocks of 32, switching the recorder before each block (untimed), and adds
//! each block's time (first request sent .. last Ack) and the server's
//! CPU time over it to the state it ran in. Two server processes, one per state, would not
//! do: on the development VM two processes of the same server, measured in alternating blocks,
//! differed by up to 17 % in fragments per second, more than the cost to be measured; within
//! one process both states share the machine's moods, the part file and the session. Off
//! costs what no recorder costs plus one indirect call and one atomic load per record (a
//! Fragment makes eight or so: its packet's count and duration, its size, the byte counters,
//! the durations of its store calls). Create-Session, the first Fragment (which creates the
//! part file), the last one (which commits) and Close-Session are sent untimed, the recorder
//! on.
//!
//! The blocks go in pairs, one off and one on, in an order drawn at random for each pair. In a
//! strict off, on, off, on, whatever recurs every even number of blocks (such as the part's
//! write-back every 32 MiB, 16 blocks) falls in blocks of one state: in one full run the
//! measured cost flipped sign with the first block's state, by about 10 %.
//!
//! 5 runs (`--e-runs`; `--quick`: 3), each in a fresh server after the warm-up. Each run
//! prints the fragments per second of each state (its fragments / the sum of its blocks'
//! times), their ratio on / off, and the median of its pairs' ratios (the off block's time /
//! the on block's). The cost is 1 - the median of the pairs' ratios over all runs: the
//! machine's stalls (a write-back, another process) slow one block of a pair and move a run's
//! totals either way by several percent, at times more than 10 %, but hardly the median of
//! its pairs. Target: cost <= 5 %.
//! The summary also gives 1 - the median of the runs' ratios of totals, for context. The
//! server's CPU time per fragment of each state is compared as the median of the runs' on /
//! off - 1. It is the sum of `se.sum_exec_runtime` over the server's threads
//! (`/proc/<pid>/task/*/sched`, in nanoseconds; the clock ticks of `/proc/<pid>/stat` are too
//! coarse for blocks of 32 fragments), "-" where the kernel lacks those files.
//!
//! After each run the server's `GET /metrics` is fetched. Its `bits_packets_total` must count
//! exactly the Fragments sent with the recorder on (so the switch works both ways), and it
//! must hold neither the upload's session id nor any GUID (8-4-4-4-12 hex digits, with or
//! without braces), nor the file name; the last run's is printed as a count of series (sample
//! lines, each histogram bucket one) per metric. A failed check is an error.
//!
//! # Layout
//!
//! `cli.rs` the flags; `servers.rs` the two servers and their child processes (and the
//! switched recorder of (e)); `client.rs` the reqwest clients of (a), (b), (d) and (e),
//! `paced.rs` the paced clients of (c); `measure.rs` the `/proc` and `df` readings;
//! `payload.rs` the bytes sent, the warm-up and the check of the files; `scenario.rs` one
//! measurement of (a), (b) or (d); `large.rs`, `small.rs`, `concurrent.rs`, `memory.rs` and
//! `recorder.rs` the parts (a) to (e); `report.rs` the summary.
//!
//! # Exit status
//!
//! 0 when every selected part ran without an error, whether or not its targets were met
//! (timings on a shared machine are noisy; the summary says PASS or MISS); 1 when a part could
//! not run (a server or disk error, a wrong file, a failed check of (e)'s Prometheus text) or
//! (c) saw any error; 2 for bad arguments.

mod cli;
mod client;
mod concurrent;
mod large;
mod measure;
mod memory;
mod paced;
mod payload;
mod recorder;
mod report;
mod scenario;
mod servers;
mod small;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use bytes::Bytes;

use crate::cli::{Options, USAGE};
use crate::report::Summary;

/// Size of every fragment / POST body in (a) and (d), and of the payload buffer.
const FRAGMENT: usize = 8 << 20;
/// Where the temporary upload roots are made.
const DIR_ENV: &str = "AXUM_BITS_BENCH_DIR";
/// The one upload protocol.
const PROTOCOL: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    if let Ok(role) = std::env::var(servers::ROLE_ENV) {
        return match servers::serve(&role) {
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
    let payload = Bytes::from(payload::pseudo_random(FRAGMENT));
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
        match large::part_a(options, &payload, &base, &mut summary) {
            Ok(bits) => a_bits = Some(bits),
            Err(e) => summary.error("a", &e),
        }
    }
    if options.parts.b {
        if let Err(e) = small::part_b(options, &payload, &base, &mut summary) {
            summary.error("b", &e);
        }
    }
    if options.parts.c {
        if let Err(e) = concurrent::part_c(options, &payload, &base, &mut summary) {
            summary.error("c", &e);
        }
    }
    if options.parts.d {
        if let Err(e) = memory::part_d(options, &payload, &base, a_bits, &mut summary) {
            summary.error("d", &e);
        }
    }
    if options.parts.e {
        if let Err(e) = recorder::part_e(options, &payload, &base, &mut summary) {
            summary.error("e", &e);
        }
    }
    drop(bench_dir);
    summary
}
