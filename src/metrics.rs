//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`, on by
//! default).
//!
//! The crate records; it never installs a recorder. Install the exporter of your choice (for
//! Prometheus, `metrics-exporter-prometheus`) before serving, then call [`describe`] once so
//! that the exporter knows each metric's unit and help text. With no recorder installed, each
//! record costs an atomic load.
//!
//! Every BITS packet is the one method `BITS_POST`, so generic HTTP metrics cannot tell a
//! Create-Session from a Fragment; these can. No label ever carries a session id, an owner, a
//! file name or a URL: every label below has a closed set of values.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `bits_packets_total` | counter | `packet`, `outcome` | packets answered, by type and outcome (`ok`, `error`) |
//! | `bits_packet_duration_seconds` | histogram | `packet`, `outcome` | from the request to its Ack |
//! | `bits_errors_total` | counter | `packet`, `status`, `code` | error Acks by HTTP status and `BITS-Error-Code` (a code the crate does not know is `other`) |
//! | `bits_sessions_created_total` | counter | | sessions created |
//! | `bits_sessions_ended_total` | counter | `reason` | sessions ended: `closed`, `closed_incomplete`, `cancelled`, `expired`, `disabled`, `reclaimed`, `replaced`, `admin` ([`crate::admin::EndReason`]) |
//! | `bits_sessions_open` | gauge | | open sessions in the store, counted at each sweep and kept up to date by this node's packets in between (in a farm every node reports the farm's count: aggregate with `max`) |
//! | `bits_bytes_received_total` | counter | | new bytes written to staging |
//! | `bits_bytes_duplicate_total` | counter | | bytes of re-sent or overlapping fragments, not written again |
//! | `bits_fragment_size_bytes` | histogram | | the range of each Fragment packet |
//! | `bits_upload_size_bytes` | histogram | | the size of each finished upload |
//! | `bits_commit_duration_seconds` | histogram | `outcome` | moving a finished file to its destination (fsync, link, object-store completion) |
//! | `bits_completion_duration_seconds` | histogram | `kind` (`handler`, `notification`), `outcome` | the upload-reply application's time |
//! | `bits_store_operation_duration_seconds` | histogram | `operation`, `outcome` | session-store calls |
//! | `bits_lease_wait_seconds` | histogram | | time spent waiting for another node's lease on a session |
//! | `bits_deferred_commits` | gauge | `status` (`pending`, `failed`) | deferred commits in the store, counted at each sweep |
//! | `bits_sweeps_total` | counter | `outcome` | sweeps run |
//! | `bits_sweep_removed_total` | counter | `kind` (`expired`, `tombstone`, `reply`) | what sweeps removed |
//!
//! # Histogram buckets
//!
//! Exporters that render histograms as summaries unless told otherwise (Prometheus's does)
//! should be given buckets; summaries cannot be added up across the nodes of a farm.
//! [`DURATION_BUCKETS`] suit every `_seconds` histogram (a Fragment Ack takes milliseconds, a
//! commit of a large file on object storage tens of seconds), [`SIZE_BUCKETS`] the `_bytes`
//! ones:
//!
//! ```ignore
//! use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
//!
//! let prometheus = PrometheusBuilder::new()
//!     .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), axum_bits::metrics::DURATION_BUCKETS)?
//!     .set_buckets_for_metric(Matcher::Suffix("_bytes".into()), axum_bits::metrics::SIZE_BUCKETS)?
//!     .install_recorder()?;
//! axum_bits::metrics::describe();
//! ```

use std::future::Future;
use std::time::{Duration, Instant};

#[cfg(feature = "metrics")]
use ::metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

/// Without the `metrics` feature every record is a no-op that still evaluates its labels
/// (so that the code compiles the same either way).
#[cfg(not(feature = "metrics"))]
mod noop {
    pub(crate) struct Noop;
    impl Noop {
        pub(crate) fn increment<T>(&self, _: T) {}
        pub(crate) fn decrement<T>(&self, _: T) {}
        pub(crate) fn set<T>(&self, _: T) {}
        pub(crate) fn record<T>(&self, _: T) {}
    }
    macro_rules! noop_metric {
        ($name:expr $(, $key:literal => $value:expr)* $(,)?) => {{
            let _ = ($name, $(&$value,)*);
            $crate::metrics::noop::Noop
        }};
    }
    pub(crate) use noop_metric as counter;
    pub(crate) use noop_metric as gauge;
    pub(crate) use noop_metric as histogram;
}
#[cfg(not(feature = "metrics"))]
use noop::{counter, gauge, histogram};

use crate::admin::EndReason;
use crate::protocol::{Ack, Hresult, PacketType};

/// Bucket bounds, in seconds, for the duration histograms: 1 ms to 2 minutes.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Bucket bounds, in bytes, for the size histograms: 4 KiB to 16 GiB, by fours.
pub const SIZE_BUCKETS: &[f64] = &[
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
    1_073_741_824.0,
    4_294_967_296.0,
    17_179_869_184.0,
];

pub(crate) const PACKETS: &str = "bits_packets_total";
pub(crate) const PACKET_DURATION: &str = "bits_packet_duration_seconds";
pub(crate) const ERRORS: &str = "bits_errors_total";
pub(crate) const SESSIONS_CREATED: &str = "bits_sessions_created_total";
pub(crate) const SESSIONS_ENDED: &str = "bits_sessions_ended_total";
pub(crate) const SESSIONS_OPEN: &str = "bits_sessions_open";
pub(crate) const BYTES_RECEIVED: &str = "bits_bytes_received_total";
pub(crate) const BYTES_DUPLICATE: &str = "bits_bytes_duplicate_total";
pub(crate) const FRAGMENT_SIZE: &str = "bits_fragment_size_bytes";
pub(crate) const UPLOAD_SIZE: &str = "bits_upload_size_bytes";
pub(crate) const COMMIT_DURATION: &str = "bits_commit_duration_seconds";
pub(crate) const COMPLETION_DURATION: &str = "bits_completion_duration_seconds";
pub(crate) const STORE_DURATION: &str = "bits_store_operation_duration_seconds";
pub(crate) const LEASE_WAIT: &str = "bits_lease_wait_seconds";
pub(crate) const DEFERRED: &str = "bits_deferred_commits";
pub(crate) const SWEEPS: &str = "bits_sweeps_total";
pub(crate) const SWEEP_REMOVED: &str = "bits_sweep_removed_total";

/// Describes every metric (unit and help text) to the recorder installed now. Call it once,
/// after installing your recorder; metrics recorded before still count, only their help text
/// is missing.
pub fn describe() {
    #[cfg(feature = "metrics")]
    describe_all();
}

#[cfg(feature = "metrics")]
fn describe_all() {
    describe_counter!(
        PACKETS,
        Unit::Count,
        "BITS packets answered, by packet type and outcome"
    );
    describe_histogram!(
        PACKET_DURATION,
        Unit::Seconds,
        "Time from a BITS packet to its Ack"
    );
    describe_counter!(
        ERRORS,
        Unit::Count,
        "BITS error Acks, by packet, HTTP status and BITS-Error-Code"
    );
    describe_counter!(
        SESSIONS_CREATED,
        Unit::Count,
        "BITS upload sessions created"
    );
    describe_counter!(
        SESSIONS_ENDED,
        Unit::Count,
        "BITS upload sessions ended, by reason"
    );
    describe_gauge!(
        SESSIONS_OPEN,
        Unit::Count,
        "Open BITS upload sessions in the session store"
    );
    describe_counter!(
        BYTES_RECEIVED,
        Unit::Bytes,
        "New upload bytes written to staging"
    );
    describe_counter!(
        BYTES_DUPLICATE,
        Unit::Bytes,
        "Bytes of re-sent or overlapping fragments, not written again"
    );
    describe_histogram!(
        FRAGMENT_SIZE,
        Unit::Bytes,
        "Size of each Fragment packet's range"
    );
    describe_histogram!(UPLOAD_SIZE, Unit::Bytes, "Size of each finished upload");
    describe_histogram!(
        COMMIT_DURATION,
        Unit::Seconds,
        "Time to move a finished upload to its destination"
    );
    describe_histogram!(
        COMPLETION_DURATION,
        Unit::Seconds,
        "Time the upload-reply application took, by kind and outcome"
    );
    describe_histogram!(
        STORE_DURATION,
        Unit::Seconds,
        "Session store call latency, by operation and outcome"
    );
    describe_histogram!(
        LEASE_WAIT,
        Unit::Seconds,
        "Time spent waiting for another node's lease on a session"
    );
    describe_gauge!(
        DEFERRED,
        Unit::Count,
        "Deferred commits in the session store, by status"
    );
    describe_counter!(SWEEPS, Unit::Count, "Expiry sweeps run, by outcome");
    describe_counter!(SWEEP_REMOVED, Unit::Count, "What sweeps removed, by kind");
}

/// The `packet` label of a packet type; `malformed` for a packet whose type is unknown.
pub(crate) fn packet_label(packet: Option<PacketType>) -> &'static str {
    match packet {
        Some(PacketType::Ping) => "ping",
        Some(PacketType::CreateSession) => "create_session",
        Some(PacketType::Fragment) => "fragment",
        Some(PacketType::CloseSession) => "close_session",
        Some(PacketType::CancelSession) => "cancel_session",
        None => "malformed",
    }
}

/// The `code` label of an HRESULT: its hex form if the crate knows it, else `other`, so that
/// codes an application makes up cannot grow the label set.
fn code_label(code: Hresult) -> String {
    if code.name().is_some() {
        code.to_string()
    } else {
        "other".to_owned()
    }
}

/// Records one answered packet.
pub(crate) fn packet(packet: Option<PacketType>, ack: &Ack, elapsed: Duration) {
    let packet = packet_label(packet);
    let outcome = if ack.status().is_success() {
        "ok"
    } else {
        "error"
    };
    counter!(PACKETS, "packet" => packet, "outcome" => outcome).increment(1);
    histogram!(PACKET_DURATION, "packet" => packet, "outcome" => outcome)
        .record(elapsed.as_secs_f64());
    if let Some((code, _)) = ack.error_code() {
        let status = ack.status().as_u16().to_string();
        counter!(ERRORS, "packet" => packet, "status" => status, "code" => code_label(code))
            .increment(1);
    }
}

pub(crate) fn session_created() {
    counter!(SESSIONS_CREATED).increment(1);
    gauge!(SESSIONS_OPEN).increment(1.0);
}

pub(crate) fn session_ended(reason: EndReason) {
    counter!(SESSIONS_ENDED, "reason" => reason.as_str()).increment(1);
    gauge!(SESSIONS_OPEN).decrement(1.0);
}

pub(crate) fn sessions_open(count: usize) {
    gauge!(SESSIONS_OPEN).set(count as f64);
}

pub(crate) fn deferred(pending: usize, failed: usize) {
    gauge!(DEFERRED, "status" => "pending").set(pending as f64);
    gauge!(DEFERRED, "status" => "failed").set(failed as f64);
}

/// A fragment of `len` bytes, of which the session held `duplicate` already.
pub(crate) fn fragment(len: u64, duplicate: u64) {
    histogram!(FRAGMENT_SIZE).record(len as f64);
    counter!(BYTES_DUPLICATE).increment(duplicate);
}

/// New bytes written to staging.
pub(crate) fn bytes_received(written: u64) {
    counter!(BYTES_RECEIVED).increment(written);
}

pub(crate) fn upload_finished(size: u64) {
    histogram!(UPLOAD_SIZE).record(size as f64);
}

fn outcome<T, E>(result: &Result<T, E>) -> &'static str {
    if result.is_ok() { "ok" } else { "error" }
}

pub(crate) fn commit<T, E>(result: &Result<T, E>, elapsed: Duration) {
    histogram!(COMMIT_DURATION, "outcome" => outcome(result)).record(elapsed.as_secs_f64());
}

pub(crate) fn completion<T, E>(kind: &'static str, result: &Result<T, E>, elapsed: Duration) {
    histogram!(COMPLETION_DURATION, "kind" => kind, "outcome" => outcome(result))
        .record(elapsed.as_secs_f64());
}

/// Times a store call.
pub(crate) async fn store<T, E>(
    operation: &'static str,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let start = Instant::now();
    let result = call.await;
    store_call(operation, &result, start.elapsed());
    result
}

/// Records a store call that took `elapsed`.
pub(crate) fn store_call<T, E>(operation: &'static str, result: &Result<T, E>, elapsed: Duration) {
    histogram!(STORE_DURATION, "operation" => operation, "outcome" => outcome(result))
        .record(elapsed.as_secs_f64());
}

pub(crate) fn lease_wait(elapsed: Duration) {
    histogram!(LEASE_WAIT).record(elapsed.as_secs_f64());
}

pub(crate) fn sweep<E>(report: Result<&crate::SweepReport, E>) {
    let Ok(report) = report else {
        counter!(SWEEPS, "outcome" => "error").increment(1);
        return;
    };
    counter!(SWEEPS, "outcome" => "ok").increment(1);
    let removed = [
        ("expired", report.expired),
        ("tombstone", report.tombstones),
        ("reply", report.replies),
    ];
    for (kind, n) in removed {
        counter!(SWEEP_REMOVED, "kind" => kind).increment(n as u64);
    }
}
