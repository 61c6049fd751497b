//! The metrics a scripted upload records, read back from a recorder installed for this test
//! binary alone (its own process): packets by type and outcome, an error Ack by status and
//! code, sessions created and ended, new and re-sent bytes, sizes, the commit, store calls and
//! a sweep; and that no label carries a session id, an owner or a file name.

mod common;

use std::collections::HashMap;

use common::{TestServer, data};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};

/// One metric's series, by its labels (sorted `key=value` pairs).
struct Snapshot(Vec<(CompositeKey, Option<metrics::Unit>, DebugValue)>);

impl Snapshot {
    fn take(snapshotter: &Snapshotter) -> Self {
        Self(
            snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .map(|(key, unit, _, value)| (key, unit, value))
                .collect(),
        )
    }

    fn series(&self, name: &str) -> HashMap<String, &DebugValue> {
        self.0
            .iter()
            .filter(|(key, _, _)| key.key().name() == name)
            .map(|(key, _, value)| {
                let mut labels: Vec<String> = key
                    .key()
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                labels.sort();
                (labels.join(","), value)
            })
            .collect()
    }

    fn counter(&self, name: &str, labels: &str) -> u64 {
        match self.series(name).get(labels) {
            Some(DebugValue::Counter(n)) => *n,
            Some(other) => panic!("{name}{{{labels}}} is not a counter: {other:?}"),
            None => 0,
        }
    }

    fn gauge(&self, name: &str, labels: &str) -> f64 {
        match self.series(name).get(labels) {
            Some(DebugValue::Gauge(v)) => v.into_inner(),
            other => panic!("{name}{{{labels}}} is not a gauge: {other:?}"),
        }
    }

    fn histogram(&self, name: &str, labels: &str) -> Vec<f64> {
        match self.series(name).get(labels) {
            Some(DebugValue::Histogram(values)) => values.iter().map(|v| v.into_inner()).collect(),
            Some(other) => panic!("{name}{{{labels}}} is not a histogram: {other:?}"),
            None => Vec::new(),
        }
    }

    fn unit(&self, name: &str) -> Option<metrics::Unit> {
        self.0
            .iter()
            .find(|(key, _, _)| key.key().name() == name)
            .and_then(|(_, unit, _)| *unit)
    }
}

#[tokio::test]
async fn a_scripted_upload_records_what_happened() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");
    axum_bits::metrics::describe();

    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let file = data(300_000, 7);
    let total = file.len() as u64;

    client.ping("/evil.bin").await.assert_ok();
    let sid = client.create_ok("/evil.bin").await;
    client
        .fragment("/evil.bin", &sid, 0, &file[..100_000], total)
        .await
        .assert_ok();
    // A retry of the same fragment (its Ack was lost): no byte is written twice.
    client
        .fragment("/evil.bin", &sid, 0, &file[..100_000], total)
        .await
        .assert_ok();
    // A gap: the client is told where to resume.
    client
        .fragment("/evil.bin", &sid, 200_000, &file[200_000..], total)
        .await
        .assert_error(416, "0x0");
    // Overlapping the held bytes by 50,000.
    client
        .fragment("/evil.bin", &sid, 50_000, &file[50_000..], total)
        .await
        .assert_ok();
    client.close("/evil.bin", &sid).await.assert_ok();
    assert_eq!(
        std::fs::read(server.root.join("evil.bin")).expect("committed"),
        file
    );
    let other = client.create_ok("/b.bin").await;
    client.cancel("/b.bin", &other).await.assert_ok();
    server.layer.handle().sweep_now().await.expect("sweep");

    let s = Snapshot::take(&snapshotter);
    let packets = "bits_packets_total";
    assert_eq!(s.counter(packets, "outcome=ok,packet=ping"), 1);
    assert_eq!(s.counter(packets, "outcome=ok,packet=create_session"), 2);
    assert_eq!(s.counter(packets, "outcome=ok,packet=fragment"), 3);
    assert_eq!(s.counter(packets, "outcome=error,packet=fragment"), 1);
    assert_eq!(s.counter(packets, "outcome=ok,packet=close_session"), 1);
    assert_eq!(s.counter(packets, "outcome=ok,packet=cancel_session"), 1);
    assert_eq!(
        s.counter("bits_errors_total", "code=0x0,packet=fragment,status=416"),
        1
    );
    assert_eq!(s.series("bits_errors_total").len(), 1);
    assert_eq!(
        s.histogram("bits_packet_duration_seconds", "outcome=ok,packet=fragment")
            .len(),
        3
    );
    assert_eq!(s.counter("bits_sessions_created_total", ""), 2);
    assert_eq!(s.counter("bits_sessions_ended_total", "reason=closed"), 1);
    assert_eq!(
        s.counter("bits_sessions_ended_total", "reason=cancelled"),
        1
    );
    assert_eq!(s.gauge("bits_sessions_open", ""), 0.0);
    assert_eq!(s.counter("bits_bytes_received_total", ""), total);
    assert_eq!(
        s.counter("bits_bytes_duplicate_total", ""),
        100_000 + 50_000
    );
    assert_eq!(
        s.histogram("bits_fragment_size_bytes", ""),
        [100_000.0, 100_000.0, 250_000.0]
    );
    assert_eq!(s.histogram("bits_upload_size_bytes", ""), [total as f64]);
    assert_eq!(
        s.histogram("bits_commit_duration_seconds", "outcome=ok")
            .len(),
        1
    );
    assert!(
        !s.histogram(
            "bits_store_operation_duration_seconds",
            "operation=load,outcome=ok"
        )
        .is_empty()
    );
    assert!(
        !s.histogram(
            "bits_store_operation_duration_seconds",
            "operation=update,outcome=ok"
        )
        .is_empty()
    );
    assert_eq!(s.counter("bits_sweeps_total", "outcome=ok"), 1);
    assert_eq!(s.gauge("bits_deferred_commits", "status=pending"), 0.0);
    assert_eq!(
        s.unit("bits_packet_duration_seconds"),
        Some(metrics::Unit::Seconds)
    );
    assert_eq!(
        s.unit("bits_bytes_received_total"),
        Some(metrics::Unit::Bytes)
    );

    // Every label value comes from a closed set: no id, no name.
    for (key, _, _) in &s.0 {
        for label in key.key().labels() {
            let value = label.value();
            assert!(
                !value.contains('{') && !value.contains("evil") && !value.contains(".bin"),
                "{}: {}={value}",
                key.key().name(),
                label.key()
            );
        }
        assert!(key.key().name().starts_with("bits_"));
        assert!(matches!(
            key.kind(),
            MetricKind::Counter | MetricKind::Gauge | MetricKind::Histogram
        ));
    }
    server.stop().await;
}
