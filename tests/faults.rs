//! Fault injection over real sockets: a disk that fills up (a real tmpfs, and an injected
//! staging with a byte budget), a failing session store, clients that vanish mid-body, and
//! bodies that trickle or stall.
//!
//! Every fault must end in an Ack the Windows client can act on (a transient status with the
//! right HRESULT), an offset that never runs ahead of the bytes really held, and an upload
//! that completes byte-identical once the fault is gone.

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum_bits::destination::Destination;
use axum_bits::session::SessionRecord;
use axum_bits::staging::{LocalStaging, PartWriter, Staging, StagingError};
use axum_bits::store::{FileStore, MemoryStore, SessionStore, StoreError};
use axum_bits::{Owner, SessionId};
use bytes::Bytes;
use common::{BitsClient, Captured, RawResponse, Reply, TestServer, data, fragment_head, parts};

/// `HRESULT_FROM_WIN32(ERROR_DISK_FULL)`: transient for the client.
const DISK_FULL: &str = "0x80070070";
/// `E_FAIL` with a 500: transient for the client.
const E_FAIL: &str = "0x80004005";
/// `HRESULT_FROM_WIN32(ERROR_TIMEOUT)`, sent with 408 for a stalled body.
const TIMEOUT: &str = "0x800705B4";
/// The OS error for "no space left": `ENOSPC` on Unix, `ERROR_DISK_FULL` on Windows.
const ENOSPC: i32 = if cfg!(windows) { 112 } else { 28 };

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The part file of session `sid` under the default staging folder.
fn part_of(root: &Path, sid: &str) -> PathBuf {
    let id = SessionId::parse(sid).expect("a session id");
    root.join(".bits").join("parts").join(format!("{id}.part"))
}

/// Asserts that the part of `sid` holds at least `received` bytes and that they are the
/// client's: an offset the server reports is never ahead of its data, and nothing below it
/// was lost or changed.
fn assert_holds(root: &Path, sid: &str, sent: &[u8], received: u64) {
    let part = std::fs::read(part_of(root, sid)).expect("the session's part file");
    let received = usize::try_from(received).unwrap();
    assert!(
        part.len() >= received,
        "the server reports {received} bytes but its part holds {}",
        part.len()
    );
    assert!(
        part[..received] == sent[..received],
        "the first {received} bytes of the part are not what the client sent"
    );
}

/// Asserts that `path` holds exactly `expected` (without printing megabytes on failure).
fn assert_file(path: &Path, expected: &[u8]) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        got == expected,
        "{} differs: {} bytes, expected {}",
        path.display(),
        got.len(),
        expected.len()
    );
}

/// Asserts an error Ack on a Fragment and returns the offset it reports.
fn fragment_error(reply: &Reply, status: u16, code: &str) -> u64 {
    reply.assert_error(status, code);
    reply
        .received()
        .expect("BITS-Received-Content-Range on a Fragment's error Ack")
}

/// Asserts the Ack shape of a raw response and its status, error code and context.
fn assert_raw_ack(response: &RawResponse, status: u16, code: Option<&str>) {
    assert_eq!(response.status, status, "{response:?}");
    assert!(response.body.is_empty(), "{response:?}");
    assert_eq!(
        response.header("BITS-Packet-Type"),
        Some("Ack"),
        "{response:?}"
    );
    assert_eq!(response.header("BITS-Error-Code"), code, "{response:?}");
    let context = code.map(|_| "0x5");
    assert_eq!(
        response.header("BITS-Error-Context"),
        context,
        "{response:?}"
    );
}

/// The offset a raw Fragment Ack reports.
fn raw_received(response: &RawResponse) -> u64 {
    response
        .header("BITS-Received-Content-Range")
        .expect("BITS-Received-Content-Range on a Fragment Ack")
        .parse()
        .expect("a numeric offset")
}

/// Sends the rest of `sent` from `from`, the offset the server last reported, the way the
/// client resumes: every fragment must be a plain append acknowledged in full.
async fn resume(client: &BitsClient, path: &str, sid: &str, sent: &[u8], from: u64, size: usize) {
    let total = sent.len() as u64;
    let mut offset = from;
    while offset < total {
        let end = (offset as usize + size).min(sent.len());
        let reply = client
            .fragment(path, sid, offset, &sent[offset as usize..end], total)
            .await;
        reply.assert_ok();
        assert_eq!(reply.received(), Some(end as u64), "{reply:?}");
        offset = end as u64;
    }
}

/// Fails the test if `future` does not finish within `limit`: a hang is a bug.
async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {limit:?}"))
}

// ---------------------------------------------------------------------------------------
// 1. A real full disk: a small tmpfs as the upload root
// ---------------------------------------------------------------------------------------

/// A tmpfs mounted on a fresh temporary folder, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `2m`); the error says why it could not.
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if output.status.success() {
            Ok(Self { dir })
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmount = |lazy: bool| {
            let mut command = Command::new("umount");
            if lazy {
                command.arg("-l");
            }
            command
                .arg(self.dir.path())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !unmount(false) && !unmount(true) {
            eprintln!(
                "could not unmount the tmpfs at {}",
                self.dir.path().display()
            );
        }
    }
}

/// Mounts a tmpfs of `size`, or says why it cannot and that the injected-staging tests
/// cover disk-full instead.
fn tmpfs_or_skip(size: &str) -> Option<Tmpfs> {
    Tmpfs::mount(size)
        .inspect_err(|why| {
            eprintln!(
                "tmpfs unavailable ({why}): disk-full covered by the injected-staging test only"
            );
        })
        .ok()
}

/// Fills the filesystem of `dir` up to the last byte with a file; returns its path.
fn fill_up(dir: &Path) -> PathBuf {
    use std::io::Write as _;
    let path = dir.join("filler.bin");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    path
}

#[tokio::test]
async fn real_full_disk_acks_disk_full_keeps_acknowledged_bytes_and_resumes() {
    let Some(fs) = tmpfs_or_skip("2m") else {
        return;
    };
    let root = fs.path();
    // The session records live on another disk, so that the offset the server reports is
    // its own bookkeeping, not the result of a record write failing too.
    let records = tempfile::tempdir().unwrap();
    let store = FileStore::open(records.path()).unwrap();
    // Half the filesystem is taken: a 1.5 MiB upload cannot fit until it is freed.
    let filler = root.join("filler.bin");
    std::fs::write(&filler, vec![0u8; 1 << 20]).unwrap();
    let server = TestServer::start_in(root, move |b| b.store(store)).await;
    let client = server.client();
    let sent = data(1536 << 10, 1);
    let total = sent.len() as u64;
    const FRAGMENT: usize = 256 << 10;
    let sid = client.create_ok("/big.bin").await;

    let mut acknowledged = 0u64;
    let full = loop {
        let end = (acknowledged as usize + FRAGMENT).min(sent.len());
        let body = &sent[acknowledged as usize..end];
        let reply = client
            .fragment("/big.bin", &sid, acknowledged, body, total)
            .await;
        if reply.status != 200 {
            break reply;
        }
        assert_eq!(reply.assert_ok().received(), Some(end as u64), "{reply:?}");
        acknowledged = end as u64;
        assert!(
            acknowledged < total,
            "the whole file fitted: the disk never filled up"
        );
    };
    assert!(acknowledged > 0, "not even the first fragment fitted");
    let received = fragment_error(&full, 500, DISK_FULL);
    assert!(
        (acknowledged..total).contains(&received),
        "offset {received} after {acknowledged} acknowledged bytes: {full:?}"
    );
    assert_holds(root, &sid, &sent, received);
    assert!(!root.join("big.bin").exists());

    // Space comes back; the client resumes from the offset the server reported.
    std::fs::remove_file(&filler).unwrap();
    resume(&client, "/big.bin", &sid, &sent, received, FRAGMENT).await;
    client.close("/big.bin", &sid).await.assert_ok();
    assert_file(&root.join("big.bin"), &sent);
    assert!(parts(root).is_empty());
    server.stop().await;
}

#[tokio::test]
async fn real_full_disk_under_the_session_records_too_is_transient() {
    let Some(fs) = tmpfs_or_skip("1m") else {
        return;
    };
    let root = fs.path();
    // The default layout: parts, records and destinations all on the disk that fills up.
    let server = TestServer::start_in(root, |b| b).await;
    let client = server.client();
    let sent = data(200_000, 11);
    let total = sent.len() as u64;
    let sid = client.create_ok("/r.bin").await;
    let filler = fill_up(root);

    // No record can be written: Create-Session is refused as transient, leaving nothing.
    client
        .create("/other.bin")
        .await
        .assert_error(500, DISK_FULL);
    assert!(
        parts(root).iter().all(|p| *p == part_of(root, &sid)),
        "{:?}",
        parts(root)
    );
    let full = client
        .fragment("/r.bin", &sid, 0, &sent[..100_000], total)
        .await;
    let received = fragment_error(&full, 500, DISK_FULL);
    assert_eq!(received, 0, "{full:?}");

    std::fs::remove_file(&filler).unwrap();
    resume(&client, "/r.bin", &sid, &sent, received, 100_000).await;
    client.close("/r.bin", &sid).await.assert_ok();
    assert_file(&root.join("r.bin"), &sent);
    server.stop().await;
}

#[tokio::test]
async fn create_refused_on_a_full_disk_leaves_no_files_behind() {
    let Some(fs) = tmpfs_or_skip("1m") else {
        return;
    };
    let root = fs.path();
    let server = TestServer::start_in(root, |b| b).await;
    let client = server.client();
    let filler = fill_up(root);
    for _ in 0..3 {
        client.create("/x.bin").await.assert_error(500, DISK_FULL);
    }
    assert_eq!(common::leftovers(root), Vec::<PathBuf>::new());
    std::fs::remove_file(&filler).unwrap();
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// 2. An injected full disk: a staging with a byte budget
// ---------------------------------------------------------------------------------------

/// `LocalStaging` on a disk with `space` bytes free, shared with the test (which may refill
/// it). A write beyond the space stores what fits and fails with ENOSPC, as a real disk does;
/// while `fail_commit` is set the next commit fails with ENOSPC and touches nothing.
#[derive(Clone)]
struct SmallDisk {
    inner: LocalStaging,
    space: Arc<AtomicU64>,
    fail_commit: Arc<AtomicBool>,
}

impl SmallDisk {
    fn new(root: &Path, space: u64) -> Self {
        Self {
            inner: LocalStaging::new(root).unwrap(),
            space: Arc::new(AtomicU64::new(space)),
            fail_commit: Arc::default(),
        }
    }
}

fn enospc() -> StagingError {
    StagingError::Io(io::Error::from_raw_os_error(ENOSPC))
}

struct SmallDiskPart {
    inner: <LocalStaging as Staging>::Part,
    space: Arc<AtomicU64>,
}

impl PartWriter for SmallDiskPart {
    async fn write(&mut self, mut chunk: Bytes) -> Result<(), StagingError> {
        let wanted = chunk.len() as u64;
        let mut granted = 0;
        // The closure always answers `Some`, so this cannot fail.
        let _ = self
            .space
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |free| {
                granted = free.min(wanted);
                Some(free - granted)
            });
        if granted == wanted {
            return self.inner.write(chunk).await;
        }
        if granted > 0 {
            self.inner.write(chunk.split_to(granted as usize)).await?;
        }
        Err(enospc())
    }

    async fn finish(self) -> Result<(), StagingError> {
        self.inner.finish().await
    }
}

impl Staging for SmallDisk {
    type Part = SmallDiskPart;

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
    async fn open(&self, id: SessionId, offset: u64) -> Result<SmallDiskPart, StagingError> {
        Ok(SmallDiskPart {
            inner: self.inner.open(id, offset).await?,
            space: self.space.clone(),
        })
    }
    async fn commit(
        &self,
        id: SessionId,
        d: &Destination,
        total: u64,
        overwrite: bool,
    ) -> Result<(), StagingError> {
        if self.fail_commit.swap(false, Ordering::SeqCst) {
            return Err(enospc());
        }
        self.inner.commit(id, d, total, overwrite).await
    }
    async fn discard(&self, id: SessionId) -> Result<(), StagingError> {
        self.inner.discard(id).await
    }
    async fn list(&self) -> Result<Vec<SessionId>, StagingError> {
        self.inner.list().await
    }
    async fn committed(
        &self,
        id: SessionId,
        d: &Destination,
        total: u64,
    ) -> Result<bool, StagingError> {
        self.inner.committed(id, d, total).await
    }
    async fn close(&self) -> Result<(), StagingError> {
        self.inner.close().await
    }
    fn path(&self, id: SessionId) -> Option<PathBuf> {
        self.inner.path(id)
    }
}

#[tokio::test]
async fn injected_full_disk_acks_disk_full_keeps_acknowledged_bytes_and_resumes_after_refill() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let disk = SmallDisk::new(root, 100_000);
    let space = disk.space.clone();
    let server = TestServer::start_in(root, move |b| b.staging(disk)).await;
    let client = server.client();
    let sent = data(300_000, 2);
    let total = sent.len() as u64;
    const FRAGMENT: usize = 64 << 10;
    let sid = client.create_ok("/d.bin").await;
    let acknowledged = client
        .fragment("/d.bin", &sid, 0, &sent[..FRAGMENT], total)
        .await
        .assert_ok()
        .received()
        .unwrap();
    assert_eq!(acknowledged, FRAGMENT as u64);

    // The second fragment runs out of space about half way in.
    let full = client
        .fragment(
            "/d.bin",
            &sid,
            acknowledged,
            &sent[FRAGMENT..2 * FRAGMENT],
            total,
        )
        .await;
    let received = fragment_error(&full, 500, DISK_FULL);
    assert!(
        (acknowledged..total).contains(&received),
        "offset {received} after {acknowledged} acknowledged bytes: {full:?}"
    );
    assert_holds(root, &sid, &sent, received);

    // Still full: the client's retry fails the same way and claims no progress.
    let again = client
        .fragment(
            "/d.bin",
            &sid,
            received,
            &sent[received as usize..][..FRAGMENT],
            total,
        )
        .await;
    assert_eq!(
        fragment_error(&again, 500, DISK_FULL),
        received,
        "{again:?}"
    );
    assert_holds(root, &sid, &sent, received);
    assert!(!root.join("d.bin").exists());

    space.store(u64::MAX, Ordering::SeqCst);
    resume(&client, "/d.bin", &sid, &sent, received, FRAGMENT).await;
    client.close("/d.bin", &sid).await.assert_ok();
    assert_file(&root.join("d.bin"), &sent);
    assert!(parts(root).is_empty());
}

#[tokio::test]
async fn commit_out_of_space_is_transient_leaves_no_partial_file_and_the_retry_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let disk = SmallDisk::new(root, u64::MAX);
    let fail_commit = disk.fail_commit.clone();
    fail_commit.store(true, Ordering::SeqCst);
    let server = TestServer::start_in(root, move |b| b.staging(disk)).await;
    let client = server.client();
    let sent = data(100_000, 3);
    let total = sent.len() as u64;
    let sid = client.create_ok("/c.bin").await;
    client
        .fragment("/c.bin", &sid, 0, &sent[..60_000], total)
        .await
        .assert_ok();

    let last = client
        .fragment("/c.bin", &sid, 60_000, &sent[60_000..], total)
        .await;
    let received = fragment_error(&last, 500, DISK_FULL);
    assert!(received <= total, "{last:?}");
    assert!(
        !fail_commit.load(Ordering::SeqCst),
        "the commit was never tried"
    );
    assert!(
        !root.join("c.bin").exists(),
        "a failed commit left a file behind"
    );
    assert_holds(root, &sid, &sent, received);

    // The client retries the final fragment; this time the commit goes through.
    let retry = client
        .fragment("/c.bin", &sid, 60_000, &sent[60_000..], total)
        .await;
    retry.assert_ok();
    assert_eq!(retry.received(), Some(total), "{retry:?}");
    assert_file(&root.join("c.bin"), &sent);
    client.close("/c.bin", &sid).await.assert_ok();
    assert!(parts(root).is_empty());
}

// ---------------------------------------------------------------------------------------
// 3. A failing session store
// ---------------------------------------------------------------------------------------

/// Which store operations fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Fault {
    #[default]
    None,
    /// `create`, `load` and `update` fail: the backend is unreachable.
    Outage,
    /// Only `update` fails: records can be read but not written.
    Updates,
    /// Only the `update` that records a commit fails (after the file was moved).
    CommitRecord,
    /// `load` never answers: the backend hangs.
    Hang,
}

/// A `MemoryStore` whose operations fail with a backend error as `fault` says.
struct FlakyStore {
    inner: Arc<MemoryStore>,
    fault: Arc<Mutex<Fault>>,
}

impl FlakyStore {
    /// Fails `update` of `record`, or `create`/`load` when `record` is `None`, if the fault
    /// says so.
    fn check(&self, update: Option<&SessionRecord>) -> Result<(), StoreError> {
        let fails = match (*self.fault.lock().unwrap(), update) {
            (Fault::None, _) => false,
            (Fault::Outage, _) => true,
            (Fault::Updates, update) => update.is_some(),
            (Fault::CommitRecord, update) => update.is_some_and(|r| r.committed),
            (Fault::Hang, _) => false,
        };
        if fails {
            Err(StoreError::backend(io::Error::other("injected")))
        } else {
            Ok(())
        }
    }
}

impl SessionStore for FlakyStore {
    async fn create(&self, record: &SessionRecord) -> Result<(), StoreError> {
        self.check(None)?;
        self.inner.create(record).await
    }
    async fn load(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        self.check(None)?;
        if *self.fault.lock().unwrap() == Fault::Hang {
            std::future::pending::<()>().await;
        }
        self.inner.load(id).await
    }
    async fn update(&self, expected: u64, record: &SessionRecord) -> Result<(), StoreError> {
        self.check(Some(record))?;
        self.inner.update(expected, record).await
    }
    async fn remove(&self, id: SessionId) -> Result<bool, StoreError> {
        self.inner.remove(id).await
    }
    async fn list(&self) -> Result<Vec<SessionRecord>, StoreError> {
        self.inner.list().await
    }
    async fn count_open(&self) -> Result<usize, StoreError> {
        self.inner.count_open().await
    }
    async fn count_open_for(&self, owner: &Owner) -> Result<usize, StoreError> {
        self.inner.count_open_for(owner).await
    }
    async fn close(&self) -> Result<(), StoreError> {
        self.inner.close().await
    }
}

/// A server on a fresh root with a [`FlakyStore`]; returns the fault switch and the store
/// behind it.
async fn flaky_server() -> (TestServer, Arc<Mutex<Fault>>, Arc<MemoryStore>) {
    let fault = Arc::new(Mutex::new(Fault::None));
    let inner = Arc::new(MemoryStore::new());
    let store = FlakyStore {
        inner: inner.clone(),
        fault: fault.clone(),
    };
    let server = TestServer::start(move |b| b.store(store)).await;
    (server, fault, inner)
}

fn set(fault: &Mutex<Fault>, to: Fault) {
    *fault.lock().unwrap() = to;
}

/// Asserts that the record of `sid` claims no byte its part does not hold.
async fn assert_record_honest(root: &Path, store: &MemoryStore, sid: &str) {
    let id = SessionId::parse(sid).unwrap();
    let record = store.load(id).await.unwrap().expect("the session's record");
    let held = std::fs::metadata(part_of(root, sid)).map_or(0, |m| m.len());
    assert!(
        record.received <= held,
        "the record claims {} bytes, the part holds {held}",
        record.received
    );
}

#[tokio::test]
async fn store_outage_gets_transient_acks_and_the_client_carries_on() {
    let (server, fault, store) = flaky_server().await;
    let client = server.client();
    let sent = data(120_000, 4);
    let total = sent.len() as u64;

    set(&fault, Fault::Outage);
    client.create("/s.bin").await.assert_error(500, E_FAIL);
    assert!(
        parts(&server.root).is_empty(),
        "a failed Create-Session left a part"
    );

    set(&fault, Fault::None);
    let sid = client.create_ok("/s.bin").await;
    client
        .fragment("/s.bin", &sid, 0, &sent[..40_000], total)
        .await
        .assert_ok();

    set(&fault, Fault::Outage);
    let reply = client
        .fragment("/s.bin", &sid, 40_000, &sent[40_000..80_000], total)
        .await;
    reply.assert_error(500, E_FAIL);
    // The record cannot be read, so an offset is optional, but never one beyond the data.
    assert!(reply.received().is_none_or(|r| r <= 40_000), "{reply:?}");
    client.close("/s.bin", &sid).await.assert_error(500, E_FAIL);
    assert!(!server.root.join("s.bin").exists());

    // The store is back: the client re-sends its fragment and follows the server's offset.
    set(&fault, Fault::None);
    let reply = client
        .fragment("/s.bin", &sid, 40_000, &sent[40_000..80_000], total)
        .await;
    reply.assert_ok();
    let received = reply.received().expect("an offset");
    assert_eq!(received, 80_000, "{reply:?}");
    assert_record_honest(&server.root, &store, &sid).await;
    resume(&client, "/s.bin", &sid, &sent, received, 40_000).await;
    client.close("/s.bin", &sid).await.assert_ok();
    assert_file(&server.root.join("s.bin"), &sent);
}

#[tokio::test]
async fn record_update_failing_after_the_write_is_transient_and_the_retry_completes() {
    let (server, fault, store) = flaky_server().await;
    let client = server.client();
    let sent = data(150_000, 5);
    let total = sent.len() as u64;
    let sid = client.create_ok("/u.bin").await;
    client
        .fragment("/u.bin", &sid, 0, &sent[..50_000], total)
        .await
        .assert_ok();

    // The bytes reach the part, the record does not: the Ack may not claim them. The client
    // retries the same fragment while the store still fails, then once it works again.
    set(&fault, Fault::Updates);
    for _ in 0..2 {
        let reply = client
            .fragment("/u.bin", &sid, 50_000, &sent[50_000..100_000], total)
            .await;
        assert_eq!(fragment_error(&reply, 500, E_FAIL), 50_000, "{reply:?}");
        assert_holds(&server.root, &sid, &sent, 50_000);
        assert_record_honest(&server.root, &store, &sid).await;
    }
    set(&fault, Fault::None);
    let reply = client
        .fragment("/u.bin", &sid, 50_000, &sent[50_000..100_000], total)
        .await;
    assert_eq!(reply.assert_ok().received(), Some(100_000), "{reply:?}");

    // The same on the final fragment: every byte is in the part, yet nothing may complete.
    set(&fault, Fault::Updates);
    let reply = client
        .fragment("/u.bin", &sid, 100_000, &sent[100_000..], total)
        .await;
    assert_eq!(fragment_error(&reply, 500, E_FAIL), 100_000, "{reply:?}");
    assert_record_honest(&server.root, &store, &sid).await;
    assert!(!server.root.join("u.bin").exists());

    set(&fault, Fault::None);
    resume(&client, "/u.bin", &sid, &sent, 100_000, 50_000).await;
    client.close("/u.bin", &sid).await.assert_ok();
    assert_file(&server.root.join("u.bin"), &sent);
    assert!(parts(&server.root).is_empty());
}

/// The record of `sid` in the default store's folder, as a restarted server would read it.
#[cfg(unix)]
fn record_on_disk(root: &Path, sid: &str) -> SessionRecord {
    let id = SessionId::parse(sid).expect("a session id");
    let path = root
        .join(".bits")
        .join("sessions")
        .join(format!("{id}.json"));
    serde_json::from_slice(&std::fs::read(path).expect("the session's record")).expect("JSON")
}

/// With the default store and staging, a fragment's last write and its record's update run
/// in one blocking call (`FileStore::update_after`): the record must come after the bytes,
/// and not at all when they could not be written.
#[cfg(unix)]
#[tokio::test]
async fn a_fragment_whose_bytes_cannot_be_written_leaves_the_record_where_it_was() {
    const FRAGMENT: usize = 64 << 10;
    let server = TestServer::start(|b| b).await;
    let root = server.root.clone();
    let client = server.client();
    let sent = data(3 * FRAGMENT, 7);
    let total = sent.len() as u64;
    let sid = client.create_ok("/ordered.bin").await;
    client
        .fragment("/ordered.bin", &sid, 0, &sent[..FRAGMENT], total)
        .await
        .assert_ok();
    assert_eq!(record_on_disk(&root, &sid).received, FRAGMENT as u64);

    // A link takes the part's place: the next fragment's bytes cannot go in.
    let part = part_of(&root, &sid);
    let aside = root.join("aside.part");
    std::fs::rename(&part, &aside).unwrap();
    std::os::unix::fs::symlink(&aside, &part).unwrap();
    let reply = client
        .fragment(
            "/ordered.bin",
            &sid,
            FRAGMENT as u64,
            &sent[FRAGMENT..2 * FRAGMENT],
            total,
        )
        .await;
    reply.assert_error(403, "0x80070005");
    assert!(
        reply.received().is_none_or(|r| r == FRAGMENT as u64),
        "{reply:?}"
    );
    assert_eq!(
        record_on_disk(&root, &sid).received,
        FRAGMENT as u64,
        "the record moved past the bytes the part holds"
    );
    assert_eq!(std::fs::metadata(&aside).unwrap().len(), FRAGMENT as u64);

    // The part is back: the client resends from the server's offset and completes.
    std::fs::remove_file(&part).unwrap();
    std::fs::rename(&aside, &part).unwrap();
    resume(
        &client,
        "/ordered.bin",
        &sid,
        &sent,
        FRAGMENT as u64,
        FRAGMENT,
    )
    .await;
    assert_eq!(record_on_disk(&root, &sid).received, total);
    client.close("/ordered.bin", &sid).await.assert_ok();
    assert_file(&root.join("ordered.bin"), &sent);
    assert!(parts(&root).is_empty());
    server.stop().await;
}

/// The one-trip path is taken where it should be: on the default store and staging every
/// whole fragment writes its last bytes and its record in one blocking call; on any other
/// store (here a `MemoryStore`) none does. Proves the downcasts in the fragment handler
/// still find the default types.
#[tokio::test]
async fn default_store_and_staging_write_a_fragment_and_its_record_in_one_blocking_call() {
    const ONE_TRIP: &str = "last write and record update in one blocking call";
    const FRAGMENT: usize = 64 << 10;
    let sent = data(3 * FRAGMENT, 11);
    let logs = Captured::default();
    let _guard = logs.install("axum_bits=trace");

    let server = TestServer::start(|b| b).await;
    let client = server.client();
    client.upload("/one-trip.bin", &sent, FRAGMENT).await;
    assert_file(&server.root.join("one-trip.bin"), &sent);
    server.stop().await;
    let text = logs.text();
    assert_eq!(text.matches(ONE_TRIP).count(), 3, "{text}");

    let before = logs.text().len();
    let server = TestServer::start(|b| b.store(MemoryStore::new())).await;
    let client = server.client();
    client.upload("/two-trips.bin", &sent, FRAGMENT).await;
    assert_file(&server.root.join("two-trips.bin"), &sent);
    server.stop().await;
    let text = logs.text();
    let after = &text[before..];
    assert!(
        after.contains("packet=\"fragment\""),
        "no Fragment logged: {after}"
    );
    assert_eq!(after.matches(ONE_TRIP).count(), 0, "{after}");
}

#[tokio::test]
async fn commit_record_failing_after_the_move_is_transient_and_the_retry_confirms_it() {
    let (server, fault, _) = flaky_server().await;
    let client = server.client();
    let sent = data(90_000, 6);
    let total = sent.len() as u64;
    let sid = client.create_ok("/m.bin").await;
    client
        .fragment("/m.bin", &sid, 0, &sent[..45_000], total)
        .await
        .assert_ok();

    set(&fault, Fault::CommitRecord);
    let reply = client
        .fragment("/m.bin", &sid, 45_000, &sent[45_000..], total)
        .await;
    reply.assert_error(500, E_FAIL);
    assert!(reply.received().is_some_and(|r| r <= total), "{reply:?}");
    // The move itself is atomic: the file is either absent or whole.
    let dest = server.root.join("m.bin");
    if dest.exists() {
        assert_file(&dest, &sent);
    }

    set(&fault, Fault::None);
    let retry = client
        .fragment("/m.bin", &sid, 45_000, &sent[45_000..], total)
        .await;
    retry.assert_ok();
    assert_eq!(retry.received(), Some(total), "{retry:?}");
    client.close("/m.bin", &sid).await.assert_ok();
    assert_file(&dest, &sent);
    assert!(parts(&server.root).is_empty());
}

// ---------------------------------------------------------------------------------------
// 4. A client vanishing mid-body
// ---------------------------------------------------------------------------------------

/// Sends 80,000 of a 200,000-byte fragment, then drops the connection (with a TCP reset if
/// `reset`). The next Fragment on a new connection learns what the server kept; the upload
/// then completes and the server keeps serving.
async fn vanish_mid_body(reset: bool) {
    const TOTAL: usize = 200_000;
    const ARRIVED: usize = 80_000;
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sent = data(TOTAL, 7);
    let sid = client.create_ok("/v.bin").await;

    let mut conn = server.raw().await;
    conn.write(&fragment_head("/v.bin", &sid, 0, TOTAL, TOTAL))
        .await;
    conn.write(&sent[..ARRIVED]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stream = conn.into_inner();
    if reset {
        stream.set_zero_linger().unwrap();
    }
    drop(stream);

    // One byte at offset 0: a duplicate if the server kept anything, so the Ack reports
    // exactly what it kept (or 1 if it kept nothing).
    let probe = within(
        Duration::from_secs(5),
        "the Fragment after the vanished one",
        client.fragment("/v.bin", &sid, 0, &sent[..1], TOTAL as u64),
    )
    .await;
    probe.assert_ok();
    let kept = probe.received().expect("an offset");
    assert!(
        kept <= ARRIVED as u64,
        "kept {kept} of {ARRIVED} bytes sent: {probe:?}"
    );
    assert_holds(&server.root, &sid, &sent, kept);
    eprintln!("vanished client (reset: {reset}): the server kept {kept} of {ARRIVED} bytes");

    resume(&client, "/v.bin", &sid, &sent, kept, 64 << 10).await;
    client.close("/v.bin", &sid).await.assert_ok();
    assert_file(&server.root.join("v.bin"), &sent);
    for _ in 0..3 {
        within(Duration::from_secs(5), "Ping", client.ping("/"))
            .await
            .assert_ok();
    }
}

#[tokio::test]
async fn client_closing_mid_body_keeps_at_most_what_arrived_and_the_upload_resumes() {
    vanish_mid_body(false).await;
}

#[tokio::test]
async fn client_resetting_mid_body_keeps_at_most_what_arrived_and_the_upload_resumes() {
    vanish_mid_body(true).await;
}

// ---------------------------------------------------------------------------------------
// 5. Slow and stalled bodies
// ---------------------------------------------------------------------------------------

const IDLE: Duration = Duration::from_millis(300);

#[tokio::test]
async fn body_trickling_a_byte_every_100_ms_is_not_idle() {
    let server = TestServer::start(|b| b.body_idle_timeout(IDLE)).await;
    let client = server.client();
    let sent = data(4096, 8);
    let sid = client.create_ok("/t.bin").await;

    let mut conn = server.raw().await;
    conn.write(&fragment_head("/t.bin", &sid, 0, sent.len(), sent.len()))
        .await;
    let started = Instant::now();
    for byte in &sent[..20] {
        conn.write(std::slice::from_ref(byte)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The body as a whole took far longer than the idle timeout; no gap did.
    assert!(started.elapsed() > 5 * IDLE);
    let ack = conn.exchange(&sent[20..]).await;
    assert_raw_ack(&ack, 200, None);
    assert_eq!(raw_received(&ack), sent.len() as u64, "{ack:?}");
    client.close("/t.bin", &sid).await.assert_ok();
    assert_file(&server.root.join("t.bin"), &sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_stalled_bodies_are_cut_off_while_an_upload_proceeds() {
    const STALLED: usize = 50;
    const SIZE: usize = 10_000;
    let server = TestServer::start(|b| b.body_idle_timeout(IDLE)).await;
    let client = server.client();
    let sent = data(SIZE, 9);
    let mut sids = Vec::new();
    for i in 0..STALLED {
        sids.push(client.create_ok(&format!("/stall-{i}.bin")).await);
    }

    // Each connection sends a different prefix, then goes silent; a task per connection
    // times how long the server takes to give up on it.
    let mut stalls = Vec::new();
    for (i, sid) in sids.iter().enumerate() {
        let arrived = 1_000 + 100 * i;
        let mut conn = server.raw().await;
        let path = format!("/stall-{i}.bin");
        conn.write(&fragment_head(&path, sid, 0, SIZE, SIZE)).await;
        conn.write(&sent[..arrived]).await;
        let silent_since = Instant::now();
        stalls.push(tokio::spawn(async move {
            let ack = conn
                .read_response()
                .await
                .expect("an Ack for the stalled body");
            (ack, silent_since.elapsed(), Instant::now(), arrived)
        }));
    }

    // Meanwhile an ordinary upload on another connection goes through untroubled.
    let normal = data(128 << 10, 10);
    let upload = client.upload("/normal.bin", &normal, 32 << 10);
    within(Duration::from_secs(5), "the ordinary upload", upload).await;
    let upload_done = Instant::now();
    assert_file(&server.root.join("normal.bin"), &normal);

    for (stall, sid) in stalls.into_iter().zip(&sids) {
        let cut_off = within(Duration::from_secs(5), "a stalled body's Ack", stall).await;
        let (ack, silent_for, cut_at, arrived) = cut_off.unwrap();
        assert_raw_ack(&ack, 408, Some(TIMEOUT));
        assert_eq!(raw_received(&ack), arrived as u64, "{ack:?}");
        assert!(
            (IDLE..Duration::from_secs(1)).contains(&silent_for),
            "cut off after {silent_for:?} of silence (idle timeout {IDLE:?})"
        );
        assert!(
            upload_done < cut_at,
            "the upload waited for the stalled bodies"
        );
        assert_holds(&server.root, sid, &sent, arrived as u64);
    }
    client.ping("/").await.assert_ok();
}

/// Readiness tells a load balancer the store is down, and a hung store fails it within the
/// check's timeout instead of hanging the probe; liveness checks nothing of the kind.
#[tokio::test]
async fn readiness_fails_fast_when_the_store_is_down_or_hangs() {
    use axum_bits::health::ReadinessCheck;
    let (server, fault, _) = flaky_server().await;
    let handle = server.layer.handle();
    let check = ReadinessCheck::default().timeout(Duration::from_millis(300));
    assert!(handle.readiness(&check).await.ready);

    set(&fault, Fault::Outage);
    let readiness = handle.readiness(&check).await;
    assert!(!readiness.ready);
    let store = &readiness.checks[1];
    assert_eq!((store.name, store.ok), ("store", false), "{readiness:?}");
    assert!(store.detail.contains("failed"), "{readiness:?}");

    set(&fault, Fault::Hang);
    let started = std::time::Instant::now();
    let readiness = handle.readiness(&check).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(!readiness.ready);
    assert!(
        readiness.checks[1].detail.contains("no answer"),
        "{readiness:?}"
    );
    assert!(handle.is_live());
    set(&fault, Fault::None);
    assert!(handle.readiness(&check).await.ready);
    server.stop().await;
}
