//! Orderly shutdown, runtime disabling of uploads, start-up recovery and session limits, over
//! real sockets (protocol reference sections 5.3, 8, 11 and 12.2).

mod common;

use std::path::Path;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use axum_bits::session::{Phase, SessionRecord};
use axum_bits::store::{FileStore, SessionStore};
use axum_bits::{BitsLayer, CommitPoint};
use common::{RawConn, TestServer, data, fragment_head, leftovers, owner_from_header, parts};

const SHUTTING_DOWN: &str = "0x8007045B";

async fn records(root: &Path) -> Vec<SessionRecord> {
    let store = FileStore::open(root.join(".bits/sessions")).expect("store");
    store.list().await.expect("list")
}

async fn record(root: &Path, sid: &str) -> SessionRecord {
    records(root)
        .await
        .into_iter()
        .find(|r| r.id.to_string() == sid)
        .expect("the session's record")
}

fn part_path(root: &Path, sid: &str) -> std::path::PathBuf {
    root.join(".bits/parts").join(format!("{sid}.part"))
}

/// Sends the head and `sent` bytes of a `len`-byte fragment at 0 and waits until the server
/// has written them (the part file grows), leaving the body unfinished.
async fn start_fragment(
    server: &TestServer,
    path: &str,
    sid: &str,
    body: &[u8],
    sent: usize,
) -> RawConn {
    let mut raw = server.raw().await;
    raw.write(&fragment_head(path, sid, 0, body.len(), body.len()))
        .await;
    raw.write(&body[..sent]).await;
    raw
}

#[tokio::test]
async fn shutdown_refuses_new_sessions_and_lets_fragments_in_flight_finish() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/a.bin").await;
    let body = data(300_000, 1);
    let mut raw = start_fragment(&server, "/a.bin", &sid, &body, 100_000).await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let handle = server.layer.handle();
    let shutdown = tokio::spawn(handle.shutdown(Duration::from_secs(10)));
    // Refused at once: the state changes when shutdown is called.
    client
        .create("/b.bin")
        .await
        .assert_error(503, SHUTTING_DOWN);
    assert!(!handle.is_running());
    // The open session's fragment still finishes.
    raw.write(&body[100_000..]).await;
    let ack = raw.read_response().await.expect("an Ack");
    assert_eq!(ack.status, 200, "{ack:?}");
    assert_eq!(ack.header("BITS-Received-Content-Range"), Some("300000"));

    let report = tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("shutdown completes once nothing is in flight")
        .expect("join");
    assert!(report.drained, "{report:?}");
    assert_eq!(report.interrupted, 0);
    assert!(report.closed);
    // Shut down: every packet is refused, transiently.
    client.ping("/").await.assert_error(503, SHUTTING_DOWN);
    client
        .close("/a.bin", &sid)
        .await
        .assert_error(503, SHUTTING_DOWN);
    // Nothing was deleted: the session is open and holds every byte.
    let r = record(&server.root, &sid).await;
    assert_eq!((r.phase, r.received), (Phase::Complete, 300_000));
    // A second call returns the same report at once.
    let again = tokio::time::timeout(
        Duration::from_millis(500),
        handle.shutdown(Duration::from_secs(10)),
    )
    .await
    .expect("immediate");
    assert_eq!(again, report);
}

#[tokio::test]
async fn shutdown_stops_a_stalled_fragment_at_the_deadline_and_the_client_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(tmp.path(), |b| b).await;
    let client = server.client();
    let sid = client.create_ok("/big.bin").await;
    let body = data(500_000, 2);
    let mut raw = start_fragment(&server, "/big.bin", &sid, &body, 200_000).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = std::time::Instant::now();
    let report = server
        .layer
        .handle()
        .shutdown(Duration::from_millis(300))
        .await;
    assert!(!report.drained, "{report:?}");
    assert_eq!(report.interrupted, 1, "{report:?}");
    assert_eq!(report.abandoned, 0, "{report:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // The fragment is answered: transient, with the offset of what arrived.
    let ack = raw.read_response().await.expect("an Ack");
    assert_eq!(ack.status, 503, "{ack:?}");
    assert_eq!(ack.header("BITS-Error-Code"), Some(SHUTTING_DOWN));
    assert_eq!(ack.header("BITS-Received-Content-Range"), Some("200000"));
    server.stop().await;
    assert_eq!(record(tmp.path(), &sid).await.received, 200_000);

    // A new server on the same root: the client resumes from the recorded offset.
    let server = TestServer::start_in(tmp.path(), |b| b).await;
    let client = server.client();
    let reply = client
        .fragment("/big.bin", &sid, 200_000, &body[200_000..], 500_000)
        .await;
    reply.assert_ok();
    client.close("/big.bin", &sid).await.assert_ok();
    assert!(std::fs::read(tmp.path().join("big.bin")).unwrap() == body);
}

#[tokio::test]
async fn sweeper_stops_at_shutdown() {
    let server = TestServer::start(|b| b.sweep_interval(Duration::from_millis(10))).await;
    let sweeper = tokio::spawn(server.layer.sweeper().run());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!sweeper.is_finished());
    server.layer.handle().shutdown(Duration::from_secs(1)).await;
    tokio::time::timeout(Duration::from_secs(2), sweeper)
        .await
        .expect("the sweeper ends")
        .expect("join");
}

#[tokio::test]
async fn disabled_uploads_get_501_and_their_sessions_are_cleaned_up() {
    let server = TestServer::start(|b| b.prefix("/up")).await;
    let client = server.client();
    // One open session with staged data, one finished (a tombstone), one committed file.
    let open = client.create_ok("/up/open.bin").await;
    client
        .fragment("/up/open.bin", &open, 0, &data(5000, 3), 10_000)
        .await
        .assert_ok();
    client.upload("/up/done.bin", &data(3000, 4), 1000).await;
    assert!(!parts(&server.root).is_empty());

    let handle = server.layer.handle();
    let report = handle.disable_uploads().await.expect("disable");
    assert_eq!((report.sessions, report.tombstones), (1, 1), "{report:?}");
    assert!(
        leftovers(&server.root).is_empty(),
        "{:?}",
        server.leftovers()
    );
    assert!(
        server.root.join("done.bin").exists(),
        "committed files stay"
    );

    // Every BITS packet under the prefix: 501 + E_ACCESSDENIED (fatal for the client).
    client.ping("/up/x").await.assert_error(501, "0x80070005");
    client
        .create("/up/new.bin")
        .await
        .assert_error(501, "0x80070005");
    client
        .fragment("/up/open.bin", &open, 5000, &data(5000, 3), 10_000)
        .await
        .assert_error(501, "0x80070005");
    // Other requests still reach the application.
    let page = reqwest::get(server.url("/hello")).await.unwrap();
    assert_eq!(page.status(), 200);

    assert!(handle.enable_uploads());
    assert!(!handle.enable_uploads(), "already enabled");
    client.upload("/up/again.bin", &data(2000, 5), 700).await;
}

#[tokio::test]
async fn disabling_stops_a_fragment_in_flight() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/slow.bin").await;
    let body = data(100_000, 6);
    let mut raw = start_fragment(&server, "/slow.bin", &sid, &body, 30_000).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let report = tokio::time::timeout(
        Duration::from_secs(3),
        server.layer.handle().disable_uploads(),
    )
    .await
    .expect("disable does not wait for the stalled body")
    .expect("disable");
    assert_eq!(report.sessions, 1);
    let ack = raw.read_response().await.expect("an Ack");
    assert!(ack.status == 503 || ack.status == 501, "{ack:?}");
    assert!(
        leftovers(&server.root).is_empty(),
        "{:?}",
        server.leftovers()
    );
}

#[tokio::test]
async fn recovery_repairs_what_a_crash_left_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let server = TestServer::start_in(root, |b| b.commit_point(CommitPoint::CloseSession)).await;
    let client = server.client();
    let body = data(50_000, 7);
    // (a) the part is shorter than the record says (a power loss without sync_data)
    let short = client.create_ok("/short.bin").await;
    client
        .fragment("/short.bin", &short, 0, &body[..40_000], 50_000)
        .await
        .assert_ok();
    // (b) the part is gone
    let lost = client.create_ok("/lost.bin").await;
    client
        .fragment("/lost.bin", &lost, 0, &body[..20_000], 50_000)
        .await
        .assert_ok();
    // (c) a commit moved the file (a rename) but the record was not updated
    let renamed = client.create_ok("/renamed.bin").await;
    client
        .fragment("/renamed.bin", &renamed, 0, &body, 50_000)
        .await
        .assert_ok();
    // (d) a commit linked the file but did not unlink the part
    let linked = client.create_ok("/linked.bin").await;
    client
        .fragment("/linked.bin", &linked, 0, &body, 50_000)
        .await
        .assert_ok();
    server.stop().await;

    std::fs::OpenOptions::new()
        .write(true)
        .open(part_path(root, &short))
        .unwrap()
        .set_len(25_000)
        .unwrap();
    std::fs::remove_file(part_path(root, &lost)).unwrap();
    std::fs::rename(part_path(root, &renamed), root.join("renamed.bin")).unwrap();
    std::fs::hard_link(part_path(root, &linked), root.join("linked.bin")).unwrap();
    // (e) a part nobody owns
    let orphan = part_path(root, "{8D1A7C54-3C1B-4E8F-9A55-0F3D2E6B7A10}");
    std::fs::write(&orphan, b"orphan").unwrap();

    let layer = BitsLayer::builder(root)
        .commit_point(CommitPoint::CloseSession)
        .build()
        .unwrap();
    let report = layer.handle().recover().await.expect("recover");
    assert_eq!(report.sessions, 4, "{report:?}");
    assert_eq!(report.orphan_parts, 1, "{report:?}");
    assert_eq!(report.offsets_rewound, 1, "{report:?}");
    assert_eq!(report.parts_recreated, 1, "{report:?}");
    assert_eq!(report.commits_completed, 2, "{report:?}");
    assert!(report.repaired_anything());
    assert!(!orphan.exists());
    // A second scan finds nothing to do.
    let again = layer.handle().recover().await.expect("recover");
    assert!(!again.repaired_anything(), "{again:?}");

    let server = TestServer::serve(
        root,
        layer.clone(),
        Router::new()
            .route("/", get(|| async { "app" }))
            .layer(layer),
    )
    .await;
    let client = server.client();
    // (a) resumes from the data that is there, (b) from byte 0.
    let reply = client
        .fragment("/short.bin", &short, 40_000, &body[40_000..], 50_000)
        .await;
    assert_eq!(reply.received(), Some(25_000), "{reply:?}");
    client.send_all("/short.bin", &short, &body, 10_000).await;
    client.close("/short.bin", &short).await.assert_ok();
    assert!(std::fs::read(root.join("short.bin")).unwrap() == body);
    let reply = client
        .fragment("/lost.bin", &lost, 20_000, &body[20_000..], 50_000)
        .await;
    assert_eq!(reply.received(), Some(0), "{reply:?}");
    client.send_all("/lost.bin", &lost, &body, 10_000).await;
    client.close("/lost.bin", &lost).await.assert_ok();
    assert!(std::fs::read(root.join("lost.bin")).unwrap() == body);
    // (c), (d): committed; Close-Session succeeds and the files are whole.
    for (sid, name) in [(&renamed, "renamed.bin"), (&linked, "linked.bin")] {
        assert!(record(root, sid).await.committed);
        client.close(&format!("/{name}"), sid).await.assert_ok();
        assert!(std::fs::read(root.join(name)).unwrap() == body);
    }
    assert!(parts(root).is_empty(), "{:?}", parts(root));
}

#[tokio::test]
async fn a_commit_that_finished_before_a_crash_is_recognised_without_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let server = TestServer::start_in(root, |b| b.commit_point(CommitPoint::CloseSession)).await;
    let client = server.client();
    let body = data(30_000, 8);
    let sid = client.create_ok("/c.bin").await;
    client
        .fragment("/c.bin", &sid, 0, &body, 30_000)
        .await
        .assert_ok();
    // The commit's rename happened, its record update did not.
    std::fs::rename(part_path(root, &sid), root.join("c.bin")).unwrap();
    client.close("/c.bin", &sid).await.assert_ok();
    assert!(std::fs::read(root.join("c.bin")).unwrap() == body);
    let r = record(root, &sid).await;
    assert!(r.committed && r.phase == Phase::Closed, "{r:?}");

    // The same with a link that was not yet unlinked, at the last fragment.
    let server = TestServer::start_in(root, |b| b).await;
    let client = server.client();
    let sid = client.create_ok("/d.bin").await;
    client
        .fragment("/d.bin", &sid, 0, &body[..10_000], 30_000)
        .await
        .assert_ok();
    std::fs::write(part_path(root, &sid), &body).unwrap();
    std::fs::hard_link(part_path(root, &sid), root.join("d.bin")).unwrap();
    client
        .fragment("/d.bin", &sid, 10_000, &body[10_000..], 30_000)
        .await
        .assert_ok();
    client.close("/d.bin", &sid).await.assert_ok();
    assert!(std::fs::read(root.join("d.bin")).unwrap() == body);
    assert!(parts(root).is_empty());
}

/// A running server trusts the part over the record: staged data lost behind its back (a
/// part truncated or deleted) rewinds the session to what the part holds, with a 416 the
/// client resumes from, and the file still ends up whole.
#[tokio::test]
async fn a_part_that_lost_data_while_running_rewinds_the_session() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let server = TestServer::start_in(root, |b| b).await;
    let client = server.client();
    let body = data(40_000, 9);
    let sid = client.create_ok("/lossy.bin").await;
    client
        .fragment("/lossy.bin", &sid, 0, &body[..20_000], 40_000)
        .await
        .assert_ok();
    std::fs::OpenOptions::new()
        .write(true)
        .open(part_path(root, &sid))
        .unwrap()
        .set_len(12_000)
        .unwrap();
    let reply = client
        .fragment("/lossy.bin", &sid, 20_000, &body[20_000..30_000], 40_000)
        .await;
    reply.assert_error(416, "0x0");
    assert_eq!(reply.received(), Some(12_000), "{reply:?}");
    assert_eq!(record(root, &sid).await.received, 12_000);
    // A re-sent fragment below the new offset is new data again, not a duplicate.
    let reply = client
        .fragment("/lossy.bin", &sid, 10_000, &body[10_000..30_000], 40_000)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(30_000), "{reply:?}");

    // A deleted part holds nothing: back to byte 0.
    std::fs::remove_file(part_path(root, &sid)).unwrap();
    let reply = client
        .fragment("/lossy.bin", &sid, 30_000, &body[30_000..], 40_000)
        .await;
    reply.assert_error(416, "0x0");
    assert_eq!(reply.received(), Some(0), "{reply:?}");
    client.send_all("/lossy.bin", &sid, &body, 15_000).await;
    client.close("/lossy.bin", &sid).await.assert_ok();
    assert!(std::fs::read(root.join("lossy.bin")).unwrap() == body);
    assert!(parts(root).is_empty());
}

#[tokio::test]
async fn recovery_removes_orphan_replies() {
    use axum_bits::completion::{CompletedUpload, Completion, CompletionError, Reply};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let layer = BitsLayer::builder(root)
        .upload_reply_handler(|_upload: CompletedUpload| async move {
            Ok::<_, CompletionError>(Completion::reply(Reply::Bytes("ok".into())))
        })
        .build()
        .unwrap();
    let orphan = root
        .join(".bits/replies")
        .join("{0B7E3A52-2D4F-4C1A-8E9B-5A6C7D8E9F01}.reply");
    std::fs::write(&orphan, b"stale").unwrap();
    let report = layer.handle().recover().await.expect("recover");
    assert_eq!(report.orphan_replies, 1, "{report:?}");
    assert!(!orphan.exists());
}

#[tokio::test]
async fn per_owner_session_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = BitsLayer::builder(tmp.path())
        .max_sessions_per_owner(2)
        .max_sessions(4)
        .build()
        .unwrap();
    let app = Router::new()
        .layer(layer.clone())
        .layer(axum::middleware::from_fn(owner_from_header));
    let server = TestServer::serve(tmp.path(), layer, app).await;
    let client = server.client();
    let create = |user: &'static str, path: &'static str| {
        let client = client.clone();
        async move {
            let mut headers = vec![
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", common::PROTOCOL),
            ];
            if !user.is_empty() {
                headers.push(("x-user", user));
            }
            client.send(path, &headers, Vec::new()).await
        }
    };
    let first = create("alice", "/a1").await;
    first.assert_ok();
    create("alice", "/a2").await.assert_ok();
    // Alice's third session: 503 (transient), as IIS's BITSNumberOfSessionsLimit.
    create("alice", "/a3").await.assert_error(503, "0x80070045");
    // Bob has his own allowance; anonymous requests only meet the global limit.
    create("bob", "/b1").await.assert_ok();
    create("", "/n1").await.assert_ok();
    create("", "/n2").await.assert_error(503, "0x80070045");
    // Alice cancels one and may create again.
    let sid = first.session_id();
    let cancel = client
        .send(
            "/a1",
            &[
                ("BITS-Packet-Type", "Cancel-Session"),
                ("BITS-Session-Id", &sid),
                ("x-user", "alice"),
            ],
            Vec::new(),
        )
        .await;
    cancel.assert_ok();
    create("alice", "/a3").await.assert_ok();
}

#[tokio::test]
async fn sync_data_uploads_work() {
    let server = TestServer::start(|b| b.sync_data(true)).await;
    let body = data(1 << 20, 9);
    server
        .client()
        .upload("/durable.bin", &body, 256 * 1024)
        .await;
    assert!(std::fs::read(server.root.join("durable.bin")).unwrap() == body);
}

#[tokio::test]
async fn a_shut_down_layer_cannot_be_enabled_again() {
    let server = TestServer::start(|b| b).await;
    let handle = server.layer.handle();
    handle.disable_uploads().await.expect("disable");
    let report = handle.shutdown(Duration::from_millis(100)).await;
    assert!(report.closed, "{report:?}");
    assert!(!handle.enable_uploads());
    assert!(!handle.is_running());
    server
        .client()
        .ping("/")
        .await
        .assert_error(501, "0x80070005");
}
