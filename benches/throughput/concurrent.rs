//! (c) 1,000 concurrent sessions: the Ack latency of every packet of paced clients, each on
//! its own connection (see the program's documentation for the method and the targets). The
//! clients themselves are in `paced.rs`.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::Error;
use crate::cli::{CConfig, Options};
use crate::measure::{open_files_limit, proc_cpu_secs, proc_status_kib};
use crate::paced::{PACE_CHUNK, run_sessions};
use crate::payload::verify;
use crate::report::{Summary, mib};
use crate::servers::{self, MAX_SESSIONS_ENV, NO_COMMIT_SYNC_ENV};

/// How many errors of (c) are printed.
const SHOWN_ERRORS: usize = 5;

pub(crate) fn part_c(
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
    // 100 MiB for 1,000 slow clients, in proportion for other counts (at least 16 MiB, as
    // an idle server takes about 5).
    let rss_limit = (100.0 * c.sessions as f64 / 1000.0).max(16.0);
    summary.target(
        format!("(c) server peak RSS, {label}"),
        format!("{:.1} MiB", mib(bits.peak_rss_kib)),
        &format!("<= {rss_limit:.0} MiB"),
        mib(bits.peak_rss_kib) <= rss_limit,
    );
    if let Some((synced, _)) = &context {
        summary.context(
            "(c) baseline server peak RSS, fsync after the last POST".into(),
            format!("{:.1} MiB", mib(synced.peak_rss_kib)),
        );
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
pub(crate) enum CServer {
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
    let child = match server {
        CServer::Bits => {
            let no_commit_sync = if commit_sync { "0" } else { "1" };
            servers::start(
                "bits",
                root.path(),
                &[
                    (MAX_SESSIONS_ENV, &max_sessions),
                    (NO_COMMIT_SYNC_ENV, no_commit_sync),
                ],
            )?
        }
        CServer::Baseline => servers::start("baseline", root.path(), &[])?,
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
        child.addr().port(),
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

pub(crate) fn c_file(session: usize) -> String {
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
pub(crate) enum PacketKind {
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

    pub(crate) fn name(self, server: CServer) -> &'static str {
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
