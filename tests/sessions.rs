//! Session edge cases: a retried Create-Session after a lost Ack, a commit retried after a
//! failed commit, and backends that fail (a panic, a full disk).

mod common;

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
    reply.assert_error(403, "0x80070005");
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

/// A staging that delegates to `LocalStaging` but panics when a session is created, standing
/// in for a bug in a user's backend.
struct PanickingStaging(LocalStaging);

impl Staging for PanickingStaging {
    type Part = <LocalStaging as Staging>::Part;

    async fn check_destination(
        &self,
        destination: &Destination,
        overwrite: bool,
    ) -> Result<(), StagingError> {
        self.0.check_destination(destination, overwrite).await
    }
    async fn create(&self, _: SessionId) -> Result<(), StagingError> {
        panic!("bug in a staging backend")
    }
    async fn len(&self, id: SessionId) -> Result<Option<u64>, StagingError> {
        self.0.len(id).await
    }
    async fn open(&self, id: SessionId, offset: u64) -> Result<Self::Part, StagingError> {
        self.0.open(id, offset).await
    }
    async fn commit(
        &self,
        id: SessionId,
        destination: &Destination,
        total: u64,
        overwrite: bool,
    ) -> Result<(), StagingError> {
        self.0.commit(id, destination, total, overwrite).await
    }
    async fn discard(&self, id: SessionId) -> Result<(), StagingError> {
        self.0.discard(id).await
    }
    async fn list(&self) -> Result<Vec<SessionId>, StagingError> {
        self.0.list().await
    }
}

#[tokio::test]
async fn a_panicking_backend_still_gets_an_error_ack_and_the_server_lives_on() {
    let tmp = tempfile::tempdir().unwrap();
    let local = LocalStaging::new(tmp.path()).unwrap();
    let server =
        TestServer::start_in(tmp.path(), move |b| b.staging(PanickingStaging(local))).await;
    let client = server.client();
    client
        .create("/p.bin")
        .await
        .assert_error(500, "0x80004005");
    client.ping("/p.bin").await.assert_ok();
}

/// A `LocalStaging` whose disk is "full" while the flag is set.
#[derive(Clone)]
struct FullDisk {
    inner: LocalStaging,
    full: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

struct FullPart {
    inner: <LocalStaging as Staging>::Part,
    full: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn no_space() -> StagingError {
    StagingError::Io(std::io::Error::from_raw_os_error(28))
}

impl axum_bits::staging::PartWriter for FullPart {
    async fn write(&mut self, chunk: bytes::Bytes) -> Result<(), StagingError> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(no_space());
        }
        self.inner.write(chunk).await
    }
    async fn finish(self) -> Result<(), StagingError> {
        self.inner.finish().await
    }
}

impl Staging for FullDisk {
    type Part = FullPart;

    async fn check_destination(
        &self,
        d: &Destination,
        overwrite: bool,
    ) -> Result<(), StagingError> {
        self.inner.check_destination(d, overwrite).await
    }
    async fn create(&self, id: SessionId) -> Result<(), StagingError> {
        self.inner.create(id).await
    }
    async fn len(&self, id: SessionId) -> Result<Option<u64>, StagingError> {
        self.inner.len(id).await
    }
    async fn open(&self, id: SessionId, offset: u64) -> Result<FullPart, StagingError> {
        Ok(FullPart {
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
async fn disk_full_is_a_transient_500_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let full = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let staging = FullDisk {
        inner: LocalStaging::new(tmp.path()).unwrap(),
        full: full.clone(),
    };
    let server = TestServer::start_in(tmp.path(), move |b| b.staging(staging)).await;
    let client = server.client();
    let bytes = data(8000, 9);
    let sid = client.create_ok("/d.bin").await;
    client
        .fragment("/d.bin", &sid, 0, &bytes[..3000], 8000)
        .await
        .assert_ok();

    full.store(true, std::sync::atomic::Ordering::SeqCst);
    let reply = client
        .fragment("/d.bin", &sid, 3000, &bytes[3000..], 8000)
        .await;
    reply.assert_error(500, "0x80070070");
    assert_eq!(reply.received(), Some(3000));
    assert!(!tmp.path().join("d.bin").exists());

    // Space comes back; the client's retry continues from the acknowledged offset.
    full.store(false, std::sync::atomic::Ordering::SeqCst);
    client.send_all("/d.bin", &sid, &bytes, 8000).await;
    client.close("/d.bin", &sid).await.assert_ok();
    assert_eq!(std::fs::read(tmp.path().join("d.bin")).unwrap(), bytes);
}
