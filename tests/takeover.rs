//! A Create-Session whose Ack was lost is retried by the client; the orphaned first session must
//! not block the destination for the whole session timeout.

mod common;

use axum_bits::SessionId;
use axum_bits::store::{FileStore, SessionStore};
use common::{TestServer, data};

async fn age(store: &FileStore, sid: &str, by_ms: u64) {
    let id = SessionId::parse(sid).unwrap();
    let mut record = store.load(id).await.unwrap().unwrap();
    let expected = record.revision;
    record.revision += 1;
    record.updated_ms -= by_ms;
    store.update(expected, &record).await.unwrap();
}

#[tokio::test]
async fn abandoned_session_without_bytes_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path().join("records")).unwrap();
    let handle = store.clone();
    let server = TestServer::start_in(tmp.path(), move |b| b.store(store)).await;
    let client = server.client();

    let orphan = client.create_ok("/f.bin").await;
    // A fresh holder is a concurrent job: 409, the client retries later.
    client
        .create("/f.bin")
        .await
        .assert_error(409, "0x80070020");

    age(&handle, &orphan, 60_000).await;
    let sid = client.create_ok("/f.bin").await;
    assert_ne!(sid, orphan);
    let bytes = data(5000, 3);
    client
        .fragment("/f.bin", &orphan, 0, &bytes, 5000)
        .await
        .assert_error(500, "0x8020001F");
    client.send_all("/f.bin", &sid, &bytes, 2000).await;
    client.close("/f.bin", &sid).await.assert_ok();
    assert_eq!(std::fs::read(tmp.path().join("f.bin")).unwrap(), bytes);
    assert!(common::parts(tmp.path()).is_empty());
}

#[tokio::test]
async fn idle_session_with_bytes_keeps_its_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path().join("records")).unwrap();
    let handle = store.clone();
    let server = TestServer::start_in(tmp.path(), move |b| b.store(store)).await;
    let client = server.client();

    let first = client.create_ok("/g.bin").await;
    client
        .fragment("/g.bin", &first, 0, b"abc", 10)
        .await
        .assert_ok();
    age(&handle, &first, 60_000).await;
    client
        .create("/g.bin")
        .await
        .assert_error(409, "0x80070020");
    assert_eq!(
        client
            .fragment("/g.bin", &first, 3, b"defghij", 10)
            .await
            .assert_ok()
            .received(),
        Some(10)
    );
}
