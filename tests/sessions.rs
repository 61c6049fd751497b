//! Session edge cases: a retried Create-Session after a lost Ack, a commit retried after a
//! failed commit, and backends that fail (a panic, a full disk).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum_bits::SessionId;
use axum_bits::destination::Destination;
use axum_bits::staging::{LocalStaging, Staging, StagingError};
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

#[tokio::test]
async fn failed_commit_is_retried_by_the_resent_final_fragment() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/h.bin").await;
    let bytes = data(3000, 4);
    client
        .fragment("/h.bin", &sid, 0, &bytes[..1000], 3000)
        .await
        .assert_ok();
    // Another process creates the destination meanwhile: the commit must not clobber it.
    std::fs::write(server.root.join("h.bin"), b"someone else").unwrap();
    let reply = client
        .fragment("/h.bin", &sid, 1000, &bytes[1000..], 3000)
        .await;
    // The default policy, RetryLater: a transient 503 ("file exists"), data kept.
    reply.assert_error(503, "0x80070050");
    assert_eq!(reply.received(), Some(3000));
    assert_eq!(
        std::fs::read(server.root.join("h.bin")).unwrap(),
        b"someone else"
    );

    // Once the obstacle is gone, the client's retry of the final fragment commits.
    std::fs::remove_file(server.root.join("h.bin")).unwrap();
    client
        .fragment("/h.bin", &sid, 1000, &bytes[1000..], 3000)
        .await
        .assert_ok();
    assert_eq!(std::fs::read(server.root.join("h.bin")).unwrap(), bytes);
    client.close("/h.bin", &sid).await.assert_ok();
    assert!(common::parts(&server.root).is_empty());
}

/// `LocalStaging` with injected faults, standing in for a failing or buggy backend: it panics
/// on Create-Session if `panic_on_create`, and its disk is "full" while `full` is set.
#[derive(Clone)]
struct FaultyStaging {
    inner: LocalStaging,
    panic_on_create: bool,
    full: Arc<AtomicBool>,
}

impl FaultyStaging {
    fn new(root: &std::path::Path) -> Self {
        Self {
            inner: LocalStaging::new(root).unwrap(),
            panic_on_create: false,
            full: Arc::default(),
        }
    }
}

struct FaultyPart {
    inner: <LocalStaging as Staging>::Part,
    full: Arc<AtomicBool>,
}

impl axum_bits::staging::PartWriter for FaultyPart {
    async fn write(&mut self, chunk: bytes::Bytes) -> Result<(), StagingError> {
        if self.full.load(Ordering::SeqCst) {
            return Err(StagingError::Io(std::io::Error::from_raw_os_error(28)));
        }
        self.inner.write(chunk).await
    }
    async fn finish(self) -> Result<(), StagingError> {
        self.inner.finish().await
    }
}

impl Staging for FaultyStaging {
    type Part = FaultyPart;

    async fn check_destination(
        &self,
        d: &Destination,
        overwrite: bool,
    ) -> Result<(), StagingError> {
        self.inner.check_destination(d, overwrite).await
    }
    async fn create(&self, id: SessionId) -> Result<(), StagingError> {
        assert!(!self.panic_on_create, "bug in a staging backend");
        self.inner.create(id).await
    }
    async fn len(&self, id: SessionId) -> Result<Option<u64>, StagingError> {
        self.inner.len(id).await
    }
    async fn open(&self, id: SessionId, offset: u64) -> Result<FaultyPart, StagingError> {
        Ok(FaultyPart {
            inner: self.inner.open(id, offset).await?,
            full: self.full.clone(),
        })
    }
    async fn commit(
        &self,
        id: SessionId,
        d: &Destination,
        total: u64,
        overwrite: bool,
    ) -> Result<(), StagingError> {
        self.inner.commit(id, d, total, overwrite).await
    }
    async fn discard(&self, id: SessionId) -> Result<(), StagingError> {
        self.inner.discard(id).await
    }
    async fn list(&self) -> Result<Vec<SessionId>, StagingError> {
        self.inner.list().await
    }
}

#[tokio::test]
async fn a_panicking_backend_still_gets_an_error_ack_and_the_server_lives_on() {
    let tmp = tempfile::tempdir().unwrap();
    let staging = FaultyStaging {
        panic_on_create: true,
        ..FaultyStaging::new(tmp.path())
    };
    let server = TestServer::start_in(tmp.path(), move |b| b.staging(staging)).await;
    let client = server.client();
    client
        .create("/p.bin")
        .await
        .assert_error(500, "0x80004005");
    client.ping("/p.bin").await.assert_ok();
}

#[tokio::test]
async fn disk_full_is_a_transient_500_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let staging = FaultyStaging::new(tmp.path());
    let full = staging.full.clone();
    let server = TestServer::start_in(tmp.path(), move |b| b.staging(staging)).await;
    let client = server.client();
    let bytes = data(8000, 9);
    let sid = client.create_ok("/d.bin").await;
    client
        .fragment("/d.bin", &sid, 0, &bytes[..3000], 8000)
        .await
        .assert_ok();

    full.store(true, Ordering::SeqCst);
    let reply = client
        .fragment("/d.bin", &sid, 3000, &bytes[3000..], 8000)
        .await;
    reply.assert_error(500, "0x80070070");
    assert_eq!(reply.received(), Some(3000));
    assert!(!tmp.path().join("d.bin").exists());

    // Space comes back; the client's retry continues from the acknowledged offset.
    full.store(false, Ordering::SeqCst);
    client.send_all("/d.bin", &sid, &bytes, 8000).await;
    client.close("/d.bin", &sid).await.assert_ok();
    assert_eq!(std::fs::read(tmp.path().join("d.bin")).unwrap(), bytes);
}

/// A shared store that logs every call the layer makes (each would be a round trip on a
/// database), answering from a `MemoryStore`.
#[derive(Clone, Default)]
struct Logged {
    inner: Arc<axum_bits::store::MemoryStore>,
    calls: Arc<std::sync::Mutex<Vec<&'static str>>>,
}

impl Logged {
    fn log(&self, call: &'static str) {
        self.calls.lock().unwrap().push(call);
    }
    fn take(&self) -> Vec<&'static str> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl SessionStore for Logged {
    async fn create(
        &self,
        r: &axum_bits::session::SessionRecord,
    ) -> Result<(), axum_bits::store::StoreError> {
        self.log("create");
        self.inner.create(r).await
    }
    async fn load(
        &self,
        id: SessionId,
    ) -> Result<Option<axum_bits::session::SessionRecord>, axum_bits::store::StoreError> {
        self.log("load");
        self.inner.load(id).await
    }
    async fn update(
        &self,
        expected: u64,
        r: &axum_bits::session::SessionRecord,
    ) -> Result<(), axum_bits::store::StoreError> {
        self.log("update");
        self.inner.update(expected, r).await
    }
    async fn remove(&self, id: SessionId) -> Result<bool, axum_bits::store::StoreError> {
        self.log("remove");
        self.inner.remove(id).await
    }
    async fn list(
        &self,
    ) -> Result<Vec<axum_bits::session::SessionRecord>, axum_bits::store::StoreError> {
        self.log("list");
        self.inner.list().await
    }
    fn is_shared(&self) -> bool {
        true
    }
    async fn acquire_lease(
        &self,
        id: SessionId,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, axum_bits::store::StoreError> {
        self.log("acquire_lease");
        self.inner.acquire_lease(id, holder, ttl).await
    }
    async fn release_lease(
        &self,
        id: SessionId,
        holder: &str,
    ) -> Result<(), axum_bits::store::StoreError> {
        self.log("release_lease");
        self.inner.release_lease(id, holder).await
    }
    // As a database store does: one call (one round trip) each.
    async fn lease_and_load(
        &self,
        id: SessionId,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<axum_bits::store::Leased, axum_bits::store::StoreError> {
        self.log("lease_and_load");
        self.inner.lease_and_load(id, holder, ttl).await
    }
    async fn update_and_release(
        &self,
        expected: u64,
        r: &axum_bits::session::SessionRecord,
        holder: &str,
    ) -> Result<(), axum_bits::store::StoreError> {
        self.log("update_and_release");
        self.inner.update_and_release(expected, r, holder).await
    }
}

#[tokio::test]
async fn a_fragment_in_the_middle_costs_a_shared_store_two_calls() {
    let store = Logged::default();
    let server = TestServer::start({
        let store = store.clone();
        move |b| b.store(store)
    })
    .await;
    let client = server.client();
    let file = data(3000, 18);
    let sid = client.create_ok("/two-calls.bin").await;
    client
        .fragment("/two-calls.bin", &sid, 0, &file[..1000], 3000)
        .await
        .assert_ok();
    store.take();
    let mid = client
        .fragment("/two-calls.bin", &sid, 1000, &file[1000..2000], 3000)
        .await;
    mid.assert_ok();
    assert_eq!(mid.received(), Some(2000));
    assert_eq!(
        store.take(),
        ["lease_and_load", "update_and_release"],
        "a mid-upload Fragment: the lease and the record in one call, the update and the \
         release in another"
    );
    // A re-sent fragment too.
    client
        .fragment("/two-calls.bin", &sid, 1000, &file[1000..2000], 3000)
        .await
        .assert_ok();
    assert_eq!(store.take(), ["lease_and_load", "update_and_release"]);
    // The next packet finds the lease free at once and the record as stored.
    client
        .fragment("/two-calls.bin", &sid, 2000, &file[2000..], 3000)
        .await
        .assert_ok();
    client.close("/two-calls.bin", &sid).await.assert_ok();
    assert_eq!(
        std::fs::read(server.root.join("two-calls.bin")).unwrap(),
        file
    );
    server.stop().await;
}
