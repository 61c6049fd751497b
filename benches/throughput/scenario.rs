//! One measurement of (a), (b) and (d): a fresh server process for a scenario, the uploads
//! of a workload against it, the server's RSS and CPU readings, and the check of every file.

use std::path::Path;

use bytes::Bytes;

use crate::Error;
use crate::client::run_streams;
use crate::measure::{proc_cpu_secs, proc_status_kib};
use crate::payload::{verify, warm_up};
use crate::servers::{self, NO_COMMIT_SYNC_ENV};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    Bits,
    /// The bits server with `sync_on_commit(false)`.
    BitsNoCommitSync,
    Baseline,
    BaselineFsync,
}

impl Scenario {
    pub(crate) fn label(self) -> &'static str {
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
pub(crate) struct Workload {
    pub(crate) fragment: Bytes,
    pub(crate) per_stream: u64,
    pub(crate) streams: usize,
}

impl Workload {
    pub(crate) fn stream_bytes(&self) -> u64 {
        self.fragment.len() as u64 * self.per_stream
    }

    pub(crate) fn total(&self) -> u64 {
        self.stream_bytes() * self.streams as u64
    }

    pub(crate) fn requests(&self) -> u64 {
        self.per_stream * self.streams as u64
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Measurement {
    pub(crate) secs: f64,
    /// For the BITS server: from the start of the last Fragment to the Close-Session Ack
    /// (the longest over the streams), which covers the commit.
    pub(crate) final_secs: Option<f64>,
    pub(crate) idle_rss_kib: u64,
    pub(crate) peak_rss_kib: u64,
    pub(crate) server_cpu_secs: f64,
}

impl Measurement {
    pub(crate) fn mb_per_sec(&self, total: u64) -> f64 {
        total as f64 / 1e6 / self.secs
    }
}

pub(crate) fn final_secs(m: &Measurement) -> String {
    m.final_secs
        .map_or_else(|| "-".to_owned(), |c| format!("{c:.3}"))
}

/// Starts a server for `scenario`, runs `work` against it, checks the files, and stops it.
pub(crate) fn measure(
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
    let server = servers::start(scenario.role(), root.path(), scenario.env())?;
    let pid = server.pid();
    let idle_rss_kib = proc_status_kib(pid, "VmRSS")?;
    let cpu_before = proc_cpu_secs(Some(pid))?;
    // A fresh runtime per measurement: dropping it closes the client's pooled connections
    // before the server's readings are taken and it is stopped.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (secs, final_secs) = runtime.block_on(run_streams(scenario, server.addr().port(), work))?;
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

pub(crate) fn stream_file(stream: usize) -> String {
    format!("upload-{stream}.bin")
}
