//! Crash and restart with a real second server process on the same directories.
//!
//! The test binary re-executes itself: the `child_server` test serves the BITS layer on an
//! ephemeral port when `AXUM_BITS_CHILD_ROOT` is set (and does nothing otherwise). The tests
//! upload part of a file, SIGKILL the child (between fragments and in the middle of a
//! fragment body), start a new child on the same root and let the client resume the way
//! Windows does: from where it believes it is, following `BITS-Received-Content-Range`
//! (protocol reference, sections 5.2–5.4, 8 and 16.2).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use axum_bits::completion::Backoff;
use axum_bits::session::DeferredStatus;
use axum_bits::session::{Phase, SessionRecord};
use axum_bits::{BitsLayer, CompletionPolicy};
use common::node::{self, Node, NodeCommand};
use common::{BitsClient, RawConn, Reply, data, fragment_head};

const CHILD_ENV: &str = "AXUM_BITS_CHILD_ROOT";
/// `defer`: the child commits busy destinations in the background (and runs its sweeper).
const POLICY_ENV: &str = "AXUM_BITS_CHILD_POLICY";
const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const FRAG: usize = 256 * KIB;

/// The server half of the self-exec trick. A no-op unless `AXUM_BITS_CHILD_ROOT` is set, in
/// which case it serves a default `BitsLayer` on that root until it is killed (or its parent
/// closes its stdin).
#[test]
fn child_server() {
    let Some(root) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    node::run_child(async move {
        let mut builder = BitsLayer::builder(PathBuf::from(root));
        let defer = std::env::var(POLICY_ENV).is_ok_and(|p| p == "defer");
        if defer {
            let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(100), 1000);
            builder = builder.completion_policy(CompletionPolicy::Defer(backoff));
        }
        let layer = builder.build().expect("layer");
        if defer {
            tokio::spawn(layer.sweeper().run());
        }
        let app = Router::new()
            .route("/", get(|| async { "child" }))
            .layer(layer);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        node::announce(listener.local_addr().expect("addr"));
        axum::serve(listener, app).await.expect("serve");
    });
}

/// Starts a child server on `root` and waits until it listens. The child is SIGKILLed and
/// reaped when dropped, so a failing test leaves no server behind.
fn spawn(root: &Path) -> Node {
    spawn_with(root, "default")
}

fn spawn_with(root: &Path, policy: &str) -> Node {
    NodeCommand::new("child_server")
        .env(CHILD_ENV, root)
        .env(POLICY_ENV, policy)
        .spawn()
}

/// Every session record in the root (only call while no server runs on it).
/// The session records on disk, read directly: opening a `FileStore` would delete the
/// temporary file of a write the running server is making.
async fn records(root: &Path) -> Vec<SessionRecord> {
    let dir = root.join(".bits").join("sessions");
    let mut records = Vec::new();
    for entry in std::fs::read_dir(dir).expect("sessions folder") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            // The server rewrites records in place while it runs, so a read can catch one
            // half-written (or removed): read again until it parses.
            let mut attempts = 0;
            let record = loop {
                match std::fs::read(&path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break None,
                    Ok(bytes) => match serde_json::from_slice(&bytes) {
                        Ok(record) => break Some(record),
                        Err(e) if attempts >= 100 => panic!("{}: {e}", path.display()),
                        Err(_) => {}
                    },
                    Err(e) => panic!("{}: {e}", path.display()),
                }
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            };
            records.extend(record);
        }
    }
    records
}

fn part_path(root: &Path, sid: &str) -> PathBuf {
    root.join(".bits").join("parts").join(format!("{sid}.part"))
}

fn part_len(root: &Path, sid: &str) -> u64 {
    std::fs::metadata(part_path(root, sid)).map_or(0, |m| m.len())
}

/// Asserts the first `n` bytes of the session's part equal the source.
fn assert_part_prefix(root: &Path, sid: &str, source: &[u8], n: u64) {
    let part = std::fs::read(part_path(root, sid)).expect("part file");
    let n = usize::try_from(n).expect("usize");
    assert!(part.len() >= n, "part holds {} < {n} bytes", part.len());
    assert!(
        part[..n] == source[..n],
        "part prefix of {n} bytes differs from the source"
    );
}

/// Asserts everything under `.bits` is a closed tombstone: no parts, no temporary files,
/// every record closed.
async fn assert_only_closed_tombstones(root: &Path, expected_records: usize) {
    assert!(
        common::parts(root).is_empty(),
        "{:?}",
        common::leftovers(root)
    );
    for file in common::leftovers(root) {
        assert!(
            file.extension().is_some_and(|e| e == "json")
                && file.parent() == Some(root.join(".bits").join("sessions").as_path()),
            "unexpected leftover {}",
            file.display()
        );
    }
    let records = records(root).await;
    assert_eq!(records.len(), expected_records, "{records:?}");
    for record in &records {
        assert_eq!(record.phase, Phase::Closed, "{record:?}");
    }
}

/// The client's resume loop: sends `frag`-byte fragments starting at `offset`, jumping to
/// `BITS-Received-Content-Range` after every Ack (200 and 416 alike), until the server holds
/// everything. Asserts each 200 Ack reports exactly the end of the fragment it answers.
async fn resume(
    client: &BitsClient,
    path: &str,
    sid: &str,
    source: &[u8],
    mut offset: u64,
    frag: usize,
) -> Vec<Reply> {
    let total = source.len() as u64;
    let mut replies = Vec::new();
    while offset < total || replies.is_empty() {
        let start = usize::try_from(offset).expect("usize");
        let end = (start + frag).min(source.len());
        let reply = client
            .fragment(path, sid, offset, &source[start..end], total)
            .await;
        reply.assert_ack();
        let received = reply.received().expect("BITS-Received-Content-Range");
        match reply.status {
            // Exactly the fragment's end, unless the server already held more than that.
            200 => assert!(received >= end as u64, "{reply:?}"),
            416 => assert!(
                received < offset,
                "416 for a fragment at {offset}: {reply:?}"
            ),
            _ => panic!("unexpected Ack while resuming: {reply:?}"),
        }
        offset = received;
        replies.push(reply);
        if offset == total {
            break;
        }
    }
    replies
}

/// Polls until `check` holds, failing after `limit`.
async fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn resumes_after_sigkill_between_and_during_fragments() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let path = "/big.bin";
    let source = data(3 * MIB, 42);
    let total = source.len();

    // First process: five fragments, every Ack exact.
    let server = spawn(root);
    let client = BitsClient::new(server.addr());
    let sid = client.create_ok(path).await;
    for i in 0..5 {
        let first = i * FRAG;
        let reply = client
            .fragment(
                path,
                &sid,
                first as u64,
                &source[first..first + FRAG],
                total as u64,
            )
            .await;
        reply.assert_ok();
        assert_eq!(reply.received(), Some((first + FRAG) as u64));
    }
    // The client never saw the fifth Ack: it believes the server holds 4 fragments.
    let acked = 5 * FRAG as u64;
    let believed = 4 * FRAG as u64;
    server.stop();

    // Durable state: the record holds the acknowledged offset, the part holds the bytes.
    let recs = records(root).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].id.to_string(), sid);
    assert_eq!(recs[0].phase, Phase::Receiving);
    assert_eq!(recs[0].received, acked);
    assert_eq!(recs[0].total, Some(total as u64));
    assert_part_prefix(root, &sid, &source, acked);

    // Second process: re-sent fragments for acknowledged bytes get 200 and the same offset.
    let server = spawn(root);
    let client = BitsClient::new(server.addr());
    let b = usize::try_from(believed).unwrap();
    let reply = client
        .fragment(path, &sid, believed, &source[b..b + FRAG], total as u64)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(acked), "acknowledged offset lost");
    let reply = client
        .fragment(path, &sid, 0, &source[..FRAG], total as u64)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(acked), "acknowledged offset lost");

    // A 1 MiB fragment whose body is cut off by a crash: 640 KiB sent, then SIGKILL once the
    // server has streamed part of it to the part file.
    let a = usize::try_from(acked).unwrap();
    let big = MIB;
    let sent = 640 * KIB;
    let mut raw = RawConn::connect(server.addr()).await;
    raw.write(&fragment_head(path, &sid, a, big, total)).await;
    raw.write(&source[a..a + sent]).await;
    wait_for(Duration::from_secs(10), "the part to grow", || {
        part_len(root, &sid) >= acked + 256 * KIB as u64
    })
    .await;
    server.stop();
    drop(raw);

    let recs = records(root).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    let durable = recs[0].received;
    assert!(
        (acked..=acked + sent as u64).contains(&durable),
        "record offset {durable} outside [{acked}, {}]",
        acked + sent as u64
    );
    assert_part_prefix(root, &sid, &source, durable);

    // Third process: the client last saw `acked`; it is impatient and first tries a fragment
    // further on (a gap: 416 with the server's offset), then follows the offsets to the end.
    let server = spawn(root);
    let client = BitsClient::new(server.addr());
    let ahead = (10 * FRAG) as u64;
    let reply = client
        .fragment(
            path,
            &sid,
            ahead,
            &source[10 * FRAG..11 * FRAG],
            total as u64,
        )
        .await;
    reply.assert_error(416, "0x0");
    let resumed_at = reply.received().expect("received on 416");
    assert!(
        (acked..=acked + sent as u64).contains(&resumed_at),
        "server resumed at {resumed_at}, acknowledged {acked}"
    );
    assert_eq!(
        resumed_at, durable,
        "offset differs from the durable record"
    );
    // The client re-sends from its own belief (acked), an overlap if the server kept more.
    let replies = resume(&client, path, &sid, &source, acked, FRAG).await;
    assert_eq!(replies.last().unwrap().received(), Some(total as u64));
    // Committed at the last fragment (default commit point), before Close.
    assert!(std::fs::read(root.join("big.bin")).unwrap() == source);
    client.close(path, &sid).await.assert_ok();
    assert!(std::fs::read(root.join("big.bin")).unwrap() == source);
    server.stop();
    assert_only_closed_tombstones(root, 1).await;

    // Fourth process: the tombstone answers repeats consistently (section 8.5).
    let server = spawn(root);
    let client = BitsClient::new(server.addr());
    client.close(path, &sid).await.assert_ok();
    let last = total - FRAG;
    let reply = client
        .fragment(path, &sid, last as u64, &source[last..], total as u64)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(total as u64));
    client.create(path).await.assert_error(403, "0x80070005");
    server.stop();
    assert!(std::fs::read(root.join("big.bin")).unwrap() == source);
    assert_only_closed_tombstones(root, 1).await;
}

#[tokio::test]
async fn sigkill_with_half_a_fragment_sent_then_after_the_final_ack() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let path = "/half.bin";
    let source = data(MIB + 12_345, 7);
    let total = source.len();

    let server = spawn(root);
    let client = BitsClient::new(server.addr());
    let sid = client.create_ok(path).await;
    client
        .fragment(path, &sid, 0, &source[..FRAG], total as u64)
        .await
        .assert_ok();
    // Half of the second fragment's body, then the server dies.
    let mut raw = RawConn::connect(server.addr()).await;
    raw.write(&fragment_head(path, &sid, FRAG, FRAG, total))
        .await;
    raw.write(&source[FRAG..FRAG + FRAG / 2]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.stop();
    drop(raw);

    let recs = records(root).await;
    assert_eq!(recs.len(), 1);
    assert!((FRAG as u64..=(FRAG + FRAG / 2) as u64).contains(&recs[0].received));

    // The client re-sends the interrupted fragment and follows the offsets.
    let server = spawn(root);
    let client = BitsClient::new(server.addr());
    let replies = resume(&client, path, &sid, &source, FRAG as u64, FRAG).await;
    let final_reply = replies.last().unwrap();
    assert_eq!(final_reply.received(), Some(total as u64));
    assert!(std::fs::read(root.join("half.bin")).unwrap() == source);
    // The final Ack is lost and the server dies before the client's Close-Session.
    server.stop();
    assert!(std::fs::read(root.join("half.bin")).unwrap() == source);

    let server = spawn(root);
    let client = BitsClient::new(server.addr());
    let last = total - 5000;
    let reply = client
        .fragment(path, &sid, last as u64, &source[last..], total as u64)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(total as u64));
    client.close(path, &sid).await.assert_ok();
    server.stop();
    assert!(std::fs::read(root.join("half.bin")).unwrap() == source);
    assert_only_closed_tombstones(root, 1).await;
}

#[tokio::test]
async fn restart_after_losing_unsynced_part_data_resumes_from_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let path = "/lossy.bin";
    let source = data(MIB + MIB / 2, 9);
    let total = source.len() as u64;

    let server = spawn(root);
    let client = BitsClient::new(server.addr());
    let sid = client.create_ok(path).await;
    for first in (0..4 * FRAG).step_by(FRAG) {
        let reply = client
            .fragment(
                path,
                &sid,
                first as u64,
                &source[first..first + FRAG],
                total,
            )
            .await;
        reply.assert_ok();
        assert_eq!(reply.received(), Some((first + FRAG) as u64));
    }
    server.stop();

    // A power loss took the unsynced tail of the part (the default staging does not fsync
    // fragments): the part is shorter than the record claims.
    let kept = 600_000u64;
    std::fs::OpenOptions::new()
        .write(true)
        .open(part_path(root, &sid))
        .unwrap()
        .set_len(kept)
        .unwrap();

    let server = spawn(root);
    let client = BitsClient::new(server.addr());
    let first = 4 * FRAG;
    let reply = client
        .fragment(
            path,
            &sid,
            first as u64,
            &source[first..first + FRAG],
            total,
        )
        .await;
    reply.assert_error(416, "0x0");
    assert_eq!(reply.received(), Some(kept), "must resume from the data");
    resume(&client, path, &sid, &source, kept, FRAG).await;
    client.close(path, &sid).await.assert_ok();
    server.stop();
    assert!(std::fs::read(root.join("lossy.bin")).unwrap() == source);
    assert_only_closed_tombstones(root, 1).await;
}

/// RetryLater (the default policy): a destination that appears during the upload gets a
/// transient 503; the data survives a SIGKILL, and the client's later retry of the final
/// fragment on the restarted server commits once the obstacle is gone.
#[tokio::test]
async fn retry_later_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let source = data(3 * FRAG, 41);
    let total = source.len() as u64;
    let server = spawn(root);
    let client = BitsClient::new(server.addr());
    let sid = client.create_ok("/busy.bin").await;
    for i in 0..2 {
        let range = i * FRAG..(i + 1) * FRAG;
        client
            .fragment("/busy.bin", &sid, range.start as u64, &source[range], total)
            .await
            .assert_ok();
    }
    std::fs::write(root.join("busy.bin"), b"in the way").unwrap();
    let reply = client
        .fragment(
            "/busy.bin",
            &sid,
            2 * FRAG as u64,
            &source[2 * FRAG..],
            total,
        )
        .await;
    reply.assert_error(503, "0x80070050");
    assert_eq!(reply.received(), Some(total));
    server.stop();

    std::fs::remove_file(root.join("busy.bin")).unwrap();
    let server = spawn(root);
    let client = BitsClient::new(server.addr());
    let reply = client
        .fragment(
            "/busy.bin",
            &sid,
            2 * FRAG as u64,
            &source[2 * FRAG..],
            total,
        )
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(total));
    assert!(std::fs::read(root.join("busy.bin")).unwrap() == source);
    client.close("/busy.bin", &sid).await.assert_ok();
    drop(server);
    assert_only_closed_tombstones(root, 1).await;
}

/// Defer: the client is told the upload is done; the commit waits in the store for the
/// destination to clear, survives a SIGKILL, and the restarted server finishes it.
#[tokio::test]
async fn deferred_commit_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let source = data(2 * FRAG + 100, 42);
    let total = source.len() as u64;
    let server = spawn_with(root, "defer");
    let client = BitsClient::new(server.addr());
    let sid = client.create_ok("/later.bin").await;
    client
        .fragment("/later.bin", &sid, 0, &source[..FRAG], total)
        .await
        .assert_ok();
    std::fs::write(root.join("later.bin"), b"in the way").unwrap();
    let reply = client
        .fragment("/later.bin", &sid, FRAG as u64, &source[FRAG..], total)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(total));
    client.close("/later.bin", &sid).await.assert_ok();
    // A few background attempts fail while the destination is in the way. (Polled: on a busy
    // machine the second attempt may take longer than its backoff.)
    let waited = std::time::Instant::now();
    loop {
        let attempts = records(root).await.first().and_then(|r| r.deferred.clone());
        if attempts.as_ref().is_some_and(|d| d.attempts >= 2) {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "no second attempt within 10 s: {attempts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop();

    let pending = records(root).await;
    assert_eq!(pending.len(), 1);
    let state = pending[0].deferred.as_ref().expect("a deferred commit");
    assert_eq!(state.status, DeferredStatus::Pending);
    assert!(state.attempts >= 2, "{state:?}");
    assert_eq!(part_len(root, &sid), total, "the staged file is kept");
    assert_eq!(
        std::fs::read(root.join("later.bin")).unwrap(),
        b"in the way"
    );

    std::fs::remove_file(root.join("later.bin")).unwrap();
    let server = spawn_with(root, "defer");
    wait_for(Duration::from_secs(20), "the deferred commit", || {
        std::fs::read(root.join("later.bin")).is_ok_and(|b| b == source)
    })
    .await;
    wait_for(Duration::from_secs(5), "the part to go", || {
        common::parts(root).is_empty()
    })
    .await;
    // The record follows the move; a kill in between would be healed by the next process,
    // but this test reads the record this process wrote.
    let deadline = Instant::now() + Duration::from_secs(5);
    while records(root).await[0].deferred.as_ref().map(|d| d.status)
        != Some(DeferredStatus::Completed)
    {
        assert!(Instant::now() < deadline, "the record never said Completed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(server);
    let done = records(root).await;
    assert_eq!(
        done[0].deferred.as_ref().map(|d| d.status),
        Some(DeferredStatus::Completed)
    );
    assert_only_closed_tombstones(root, 1).await;
}
