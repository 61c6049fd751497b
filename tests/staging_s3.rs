//! `S3Staging` against a real S3-compatible server (moto, started by `.ci/services.sh`): the
//! staging conformance suite, parts of S3's real 5 MiB and of 64 KiB, every fragment shape,
//! a takeover by another node, a key that appears during the upload, cleanup after 1,000
//! cancelled uploads, and whole uploads over real sockets through the layer.
//!
//! The servers' URLs come from `AXUM_BITS_TEST_S3_URL` (S3's real minimum part) and
//! `AXUM_BITS_TEST_S3_SMALL_URL` (a 4 KiB minimum, for many parts in little time). Every
//! test works in a bucket of its own.

#![cfg(all(feature = "s3", feature = "conformance"))]

mod common;

use std::sync::Arc;

use axum_bits::destination::Destination;
use axum_bits::session::SessionId;
use axum_bits::staging::conformance::{self, Destinations, fresh_destination};
use axum_bits::staging::{PartWriter, S3Staging, Staging, StagingError};
use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use common::{TestServer, data};

/// The URL in `var`, or `None` (skip) outside CI when it is not set.
fn server_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{var} is not set: .ci/run must start moto (.ci/services.sh)")
        }
        _ => {
            eprintln!("{var} is not set; skipping this S3 test");
            None
        }
    }
}

/// A fresh bucket on the server at `url`.
struct Bucket {
    url: String,
    name: String,
}

impl Bucket {
    async fn new(url: &str) -> Self {
        let id = SessionId::new().to_string();
        let name = format!("t-{}", id.trim_matches(['{', '}']).to_lowercase());
        // moto takes unsigned requests; a real service would want them signed.
        let created = reqwest::Client::new()
            .put(format!("{url}/{name}"))
            .send()
            .await
            .expect("create bucket");
        assert!(created.status().is_success(), "{created:?}");
        Self {
            url: url.to_owned(),
            name,
        }
    }

    fn staging(&self, part_size: u64) -> S3Staging {
        S3Staging::builder()
            .bucket(&self.name)
            .prefix("up")
            .endpoint(&self.url)
            .region("us-east-1")
            .path_style(true)
            .credentials("test", "test")
            .part_size(part_size)
            .memory_budget(64 << 20)
            .build()
            .expect("staging")
    }

    fn raw(&self) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_bucket_name(&self.name)
            .with_endpoint(&self.url)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_virtual_hosted_style_request(false)
            .build()
            .expect("raw client")
    }

    fn destinations(&self) -> S3Destinations {
        S3Destinations { s3: self.raw() }
    }

    /// Every key in the bucket.
    async fn keys(&self) -> Vec<String> {
        use futures_util::TryStreamExt;
        let s3 = self.raw();
        let listed: Vec<_> = s3.list(None).try_collect().await.expect("list");
        listed.into_iter().map(|m| m.location.to_string()).collect()
    }

    /// Multipart uploads still open in the bucket (ListMultipartUploads).
    async fn open_uploads(&self) -> usize {
        let body = reqwest::Client::new()
            .get(format!("{}/{}?uploads", self.url, self.name))
            .send()
            .await
            .expect("list uploads")
            .text()
            .await
            .expect("body");
        body.matches("<UploadId>").count()
    }
}

/// Destinations are keys under the staging's prefix `up`.
struct S3Destinations {
    s3: AmazonS3,
}

fn key(destination: &Destination) -> Path {
    destination
        .as_str()
        .split('/')
        .fold(Path::from("up"), |p, part| p.join(part))
}

impl Destinations for S3Destinations {
    async fn read(&self, destination: &Destination) -> Option<Vec<u8>> {
        let got = self.s3.get(&key(destination)).await.ok()?;
        Some(got.bytes().await.expect("read").to_vec())
    }

    async fn put(&self, destination: &Destination, bytes: &[u8]) {
        self.s3
            .put(&key(destination), PutPayload::from(bytes.to_vec()))
            .await
            .expect("put");
    }
}

/// Opens at `offset`, writes `data` in chunks of `chunk` bytes, finishes.
async fn write_at(
    staging: &S3Staging,
    id: SessionId,
    offset: u64,
    data: &[u8],
    chunk: usize,
) -> Result<(), StagingError> {
    let mut part = staging.open(id, offset).await?;
    for piece in data.chunks(chunk.max(1)) {
        part.write(Bytes::copy_from_slice(piece)).await?;
    }
    part.finish().await
}

#[tokio::test]
async fn conformance_with_s3s_real_part_size() {
    let Some(url) = server_url("AXUM_BITS_TEST_S3_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    let staging = Arc::new(bucket.staging(5 << 20));
    conformance::run(staging, &bucket.destinations()).await;
}

#[tokio::test]
async fn conformance_with_small_parts() {
    let Some(url) = server_url("AXUM_BITS_TEST_S3_SMALL_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    // Parts of 8 KiB: the suite's files of 10 to 40 KB span several parts.
    let staging = Arc::new(small(&bucket, 8 << 10));
    conformance::run(staging, &bucket.destinations()).await;
}

/// A staging with parts below S3's minimum, for the small server (started with
/// `S3_UPLOAD_PART_MIN_SIZE=4096`), so that files of a few dozen KB span several parts.
fn small(bucket: &Bucket, part_size: u64) -> S3Staging {
    small_via(bucket, &bucket.url, part_size)
        .build()
        .expect("staging")
}

/// The builder of [`small`], reaching the bucket's server at `endpoint` (e.g. a proxy).
fn small_via(
    bucket: &Bucket,
    endpoint: &str,
    part_size: u64,
) -> axum_bits::staging::S3StagingBuilder {
    S3Staging::builder()
        .bucket(&bucket.name)
        .prefix("up")
        .endpoint(endpoint)
        .region("us-east-1")
        .path_style(true)
        .credentials("test", "test")
        .allow_small_parts(true)
        .part_size(part_size)
        .memory_budget(64 << 20)
}

/// A 12 MiB file with S3's real minimum part (5 MiB): fragments of every shape (1 byte,
/// unaligned, crossing a part boundary, one spanning a whole part from its start), re-sent
/// and overlapping fragments, then the commit: the object is byte-identical and nothing of
/// the staging is left in the bucket.
#[tokio::test]
async fn real_part_size_every_fragment_shape() {
    let Some(url) = server_url("AXUM_BITS_TEST_S3_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    let staging = bucket.staging(5 << 20);
    let file = data(12 << 20, 1);
    let id = SessionId::new();
    staging.create(id).await.expect("create");
    const P: usize = 5 << 20;
    // (start, end) of each fragment, as a client's retries might send them.
    let fragments = [
        (0, 1),
        (1, 70_001),
        (70_001, 70_002),
        (30_000, 1_000_000), // overlaps what is held: only new bytes count
        (1_000_000, P - 10),
        (P - 10, P + 10), // crosses the first part boundary
        (P + 10, 2 * P),
        (2 * P, 12 << 20), // from a part boundary to the end
    ];
    let mut held = 0usize;
    for (start, end) in fragments {
        let new_from = held.max(start);
        write_at(
            &staging,
            id,
            new_from as u64,
            &file[new_from..end],
            64 << 10,
        )
        .await
        .unwrap_or_else(|e| panic!("fragment {start}..{end}: {e:?}"));
        held = held.max(end);
        assert_eq!(staging.len(id).await.expect("len"), Some(held as u64));
    }
    let destination = fresh_destination("big.bin");
    staging
        .commit(id, &destination, file.len() as u64, false)
        .await
        .expect("commit");
    let got = bucket
        .destinations()
        .read(&destination)
        .await
        .expect("object");
    assert!(got == file, "the object differs from the file");
    staging.discard(id).await.expect("discard");
    let keys = bucket.keys().await;
    assert_eq!(
        keys,
        [key(&destination).to_string()],
        "only the file is left"
    );
    assert_eq!(
        bucket.open_uploads().await,
        0,
        "no multipart upload is left open"
    );
}

/// Stages `file[from..to]` at `from` in chunks of 1,000 bytes.
async fn stage(staging: &S3Staging, id: SessionId, file: &[u8], from: usize, to: usize) {
    write_at(staging, id, from as u64, &file[from..to], 1_000)
        .await
        .unwrap_or_else(|e| panic!("writing {from}..{to}: {e:?}"));
}

async fn committed_bytes(
    staging: &S3Staging,
    bucket: &Bucket,
    id: SessionId,
    len: usize,
) -> Vec<u8> {
    let destination = fresh_destination("file.bin");
    staging
        .commit(id, &destination, len as u64, false)
        .await
        .expect("commit");
    staging.discard(id).await.expect("discard");
    bucket
        .destinations()
        .read(&destination)
        .await
        .expect("object")
}

/// A record behind the staged parts (a node died after storing a fragment, before its record
/// said so): the fragment is sent again from the record's offset, inside a part already
/// uploaded. Those bytes are not stored twice, and the file comes out whole.
#[tokio::test]
async fn a_fragment_resent_from_inside_an_uploaded_part() {
    let Some(url) = server_url("AXUM_BITS_TEST_S3_SMALL_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    let staging = small(&bucket, 8 << 10);
    let file = data(40_000, 2);
    let id = SessionId::new();
    staging.create(id).await.expect("create");
    stage(&staging, id, &file, 0, 20_000).await;
    // The record says 5,000: parts 1 and 2 (0..16,384) and a tail are in the bucket.
    stage(&staging, id, &file, 5_000, 30_000).await;
    assert_eq!(staging.len(id).await.expect("len"), Some(30_000));
    stage(&staging, id, &file, 30_000, 40_000).await;
    assert!(committed_bytes(&staging, &bucket, id, 40_000).await == file);
}

/// Nodes with nothing in common but the bucket take turns on one upload, one of them dying in
/// the middle of a fragment (its writer dropped unfinished): every node continues from what
/// the bucket holds, and the file is byte-identical.
#[tokio::test]
async fn another_node_takes_over_in_the_middle_of_a_fragment() {
    let Some(url) = server_url("AXUM_BITS_TEST_S3_SMALL_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    let (a, b) = (small(&bucket, 8 << 10), small(&bucket, 8 << 10));
    let file = data(100_000, 3);
    let id = SessionId::new();
    a.create(id).await.expect("create");
    stage(&a, id, &file, 0, 12_345).await;
    stage(&b, id, &file, 12_345, 30_000).await;
    // Node A sends on from where it wrote last: its memory of the session is stale.
    stage(&a, id, &file, 30_000, 41_000).await;
    // Node B dies in the middle of a fragment that crossed a part boundary.
    {
        let mut part = b.open(id, 41_000).await.expect("open");
        for chunk in file[41_000..60_000].chunks(1_000) {
            part.write(Bytes::copy_from_slice(chunk))
                .await
                .expect("write");
        }
    }
    // What survives is whole parts and finished fragments: at least the 41,000 acknowledged.
    let held = a.len(id).await.expect("len").expect("part") as usize;
    assert!((41_000..=60_000).contains(&held), "held {held}");
    stage(&a, id, &file, held, 100_000).await;
    assert!(committed_bytes(&b, &bucket, id, 100_000).await == file);
}

/// A key that appears at the destination during the upload (after Create-Session checked it)
/// is never replaced without overwrites, for a file of one part (a conditional PUT) and of
/// several: completed in place with `If-None-Match: *` (an upload made for its destination,
/// as the layer makes them) or at the session's own key and then copied (as for upload-reply
/// sessions).
#[tokio::test]
async fn a_key_that_appears_during_the_upload_is_not_replaced() {
    let Some(url) = server_url("AXUM_BITS_TEST_S3_SMALL_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    let staging = small(&bucket, 8 << 10);
    for (len, in_place) in [
        (5_000, false),
        (50_000, false),
        (5_000, true),
        (50_000, true),
    ] {
        let file = data(len, 4);
        let id = SessionId::new();
        let destination = fresh_destination("contested.bin");
        staging
            .check_destination(&destination, false)
            .await
            .expect("free at Create-Session");
        if in_place {
            staging
                .create_for(id, &destination)
                .await
                .expect("create_for");
        } else {
            staging.create(id).await.expect("create");
        }
        stage(&staging, id, &file, 0, len / 2).await;
        bucket.destinations().put(&destination, b"theirs").await;
        stage(&staging, id, &file, len / 2, len).await;
        match staging.commit(id, &destination, len as u64, false).await {
            Err(error) if error.is_busy() => {}
            other => panic!("{len} bytes: the commit must be refused as busy: {other:?}"),
        }
        assert_eq!(
            bucket.destinations().read(&destination).await.as_deref(),
            Some(&b"theirs"[..]),
            "{len} bytes: the other writer's object stays"
        );
        // Once it is gone, a later attempt (a deferred commit) publishes the file.
        bucket
            .raw()
            .delete(&key(&destination))
            .await
            .expect("delete");
        staging
            .commit(id, &destination, len as u64, false)
            .await
            .expect("commit once the key is free");
        assert!(
            bucket
                .destinations()
                .read(&destination)
                .await
                .expect("object")
                == file
        );
        staging.discard(id).await.expect("discard");
    }
}

/// Fragments of one byte, and a file of one byte and of none, through parts of 8 KiB.
#[tokio::test]
async fn one_byte_fragments_and_tiny_files() {
    let Some(url) = server_url("AXUM_BITS_TEST_S3_SMALL_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    let staging = small(&bucket, 8 << 10);
    let file = data(8_300, 5);
    let id = SessionId::new();
    staging.create(id).await.expect("create");
    // 8,190 bytes in big pieces, then one byte at a time across the part boundary.
    stage(&staging, id, &file, 0, 8_190).await;
    for at in 8_190..8_200 {
        stage(&staging, id, &file, at, at + 1).await;
    }
    stage(&staging, id, &file, 8_200, 8_300).await;
    assert!(committed_bytes(&staging, &bucket, id, 8_300).await == file);

    for len in [0, 1] {
        let file = data(len, 6);
        let id = SessionId::new();
        staging.create(id).await.expect("create");
        stage(&staging, id, &file, 0, len).await;
        assert!(committed_bytes(&staging, &bucket, id, len).await == file);
    }
    assert_eq!(bucket.open_uploads().await, 0);
}

/// A server whose bytes go to `staging`, with its records in its own temporary folder.
async fn server(staging: S3Staging) -> TestServer {
    TestServer::start(|b| b.staging(staging)).await
}

/// Whole uploads over real sockets, the way Windows sends them: a file of several parts in
/// fragments that do not line up with the parts, re-sent fragments, a zero-length file; the
/// objects are byte-identical and the staging leaves nothing behind.
#[tokio::test]
async fn uploads_through_the_layer() {
    let Some(url) = server_url("AXUM_BITS_TEST_S3_SMALL_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    let server = server(small(&bucket, 16 << 10)).await;
    let client = server.client();
    let file = data(200_000, 7);
    let sid = client.create_ok("/inbox/a.bin").await;
    let total = file.len() as u64;
    // A fragment, then the same one again, then one overlapping both.
    client
        .fragment("/inbox/a.bin", &sid, 0, &file[..30_000], total)
        .await
        .assert_ok();
    let again = client
        .fragment("/inbox/a.bin", &sid, 0, &file[..30_000], total)
        .await;
    again.assert_ok();
    assert_eq!(again.received(), Some(30_000));
    let overlap = client
        .fragment("/inbox/a.bin", &sid, 20_000, &file[20_000..50_000], total)
        .await;
    overlap.assert_ok();
    assert_eq!(overlap.received(), Some(50_000));
    // A gap is refused with where to resume.
    let gap = client
        .fragment("/inbox/a.bin", &sid, 60_000, &file[60_000..70_000], total)
        .await;
    assert_eq!((gap.status, gap.received()), (416, Some(50_000)));
    client.send_all("/inbox/a.bin", &sid, &file, 7_777).await;
    client.close("/inbox/a.bin", &sid).await.assert_ok();
    let got = bucket
        .destinations()
        .read(&Destination::from_stored("inbox/a.bin", &[]).expect("destination"))
        .await
        .expect("the object");
    assert!(got == file, "the object differs from the file");

    let sid = client.create_ok("/inbox/empty.bin").await;
    let headers = [
        ("BITS-Packet-Type", "Fragment"),
        ("BITS-Session-Id", sid.as_str()),
        ("Content-Range", "bytes */0"),
        ("Content-Length", "0"),
    ];
    client
        .send("/inbox/empty.bin", &headers, Vec::new())
        .await
        .assert_ok();
    client.close("/inbox/empty.bin", &sid).await.assert_ok();
    let empty = Destination::from_stored("inbox/empty.bin", &[]).expect("destination");
    assert_eq!(
        bucket.destinations().read(&empty).await.as_deref(),
        Some(&[][..])
    );

    let mut keys = bucket.keys().await;
    keys.sort();
    assert_eq!(keys, ["up/inbox/a.bin", "up/inbox/empty.bin"]);
    assert_eq!(bucket.open_uploads().await, 0);
    server.stop().await;
}

/// 1,000 uploads cancelled at various points (before any byte, after a tail, after whole
/// parts) leave no object and no open multipart upload in the bucket.
#[tokio::test]
async fn a_thousand_cancelled_uploads_leave_nothing() {
    let Some(url) = server_url("AXUM_BITS_TEST_S3_SMALL_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    let server = server(small(&bucket, 8 << 10)).await;
    let file = Arc::new(data(20_000, 8));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let (client, file) = (server.client(), file.clone());
        tasks.spawn(async move {
            for i in 0..125 {
                let path = format!("/c/{worker}-{i}.bin");
                let sid = client.create_ok(&path).await;
                let len = [0, 3_000, 20_000][i % 3];
                if len > 0 {
                    client
                        .fragment(&path, &sid, 0, &file[..len - 1], file.len() as u64)
                        .await
                        .assert_ok();
                }
                client.cancel(&path, &sid).await.assert_ok();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("worker");
    }
    assert_eq!(
        bucket.keys().await,
        Vec::<String>::new(),
        "no object is left"
    );
    assert_eq!(
        bucket.open_uploads().await,
        0,
        "no multipart upload is left"
    );
    server.stop().await;
}

/// A node's memory of a session goes stale when another node uploads a part and dies before
/// the record follows (the record's offset is then where the first node wrote last). The
/// first node continues, with a fragment that completes a part and with one that does not,
/// and the file comes out whole.
#[tokio::test]
async fn a_node_whose_memory_of_the_session_is_stale() {
    let Some(url) = server_url("AXUM_BITS_TEST_S3_SMALL_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    let (a, b) = (small(&bucket, 8 << 10), small(&bucket, 8 << 10));
    for next in [20_000, 13_000] {
        let file = data(40_000, 9);
        let id = SessionId::new();
        a.create(id).await.expect("create");
        stage(&a, id, &file, 0, 10_000).await;
        // B uploads part 2 (8,192..16,384), deleting A's tail, and dies before its record.
        {
            let mut part = b.open(id, 10_000).await.expect("open");
            part.write(Bytes::copy_from_slice(&file[10_000..17_000]))
                .await
                .expect("write");
        }
        // A goes on from 10,000, as the record says.
        stage(&a, id, &file, 10_000, next).await;
        assert!(a.len(id).await.expect("len").expect("part") >= next as u64);
        stage(&a, id, &file, next, 40_000).await;
        assert!(
            committed_bytes(&a, &bucket, id, 40_000).await == file,
            "next {next}"
        );
    }
}

/// What the stand-in network between the server and the object store does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Network {
    /// Passes every byte.
    Up,
    /// Refuses connections (closes them at once).
    Down,
    /// Answers every request 503 Slow Down.
    Busy,
    /// Answers every request as a full MinIO does (507 `XMinioStorageFull`).
    Full,
    /// Passes every byte, but holds each request whose head mentions the slowed session for
    /// three seconds first.
    SlowFor(SessionId),
    /// Passes every byte, but closes the connection of the next multipart completion (`POST
    /// ...?uploadId=`) after the server got it, before its answer arrives; then
    /// `RefuseCompletions`.
    LoseCompletionAnswers,
    /// Passes every byte, but answers every multipart completion itself with 412
    /// `PreconditionFailed`, as a service may answer the retry of a conditional completion
    /// that succeeded (the key exists now).
    RefuseCompletions,
}

/// A TCP proxy in front of the object store whose behaviour the test switches; a switch
/// drops the connections already open, so that pooled ones see it too.
struct FaultyProxy {
    addr: std::net::SocketAddr,
    mode: Arc<tokio::sync::watch::Sender<Network>>,
}

impl FaultyProxy {
    async fn start(upstream: &str) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream: std::net::SocketAddr = upstream
            .trim_start_matches("http://")
            .parse()
            .expect("an ip:port upstream");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (mode, watch) = tokio::sync::watch::channel(Network::Up);
        let mode = Arc::new(mode);
        let switch = mode.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut watch = watch.clone();
                let switch = switch.clone();
                tokio::spawn(async move {
                    let now = *watch.borrow_and_update();
                    let serve = async {
                        match now {
                            Network::Down => {}
                            Network::Busy | Network::Full => {
                                let mut head = Vec::new();
                                let mut byte = [0u8; 1];
                                while !head.ends_with(b"\r\n\r\n") {
                                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                                        return;
                                    }
                                    head.push(byte[0]);
                                }
                                let answer = if now == Network::Busy {
                                    "HTTP/1.1 503 Slow Down\r\ncontent-length: 0\r\n\
                                     connection: close\r\n\r\n"
                                        .to_owned()
                                } else {
                                    let body = "<Error><Code>XMinioStorageFull</Code></Error>";
                                    format!(
                                        "HTTP/1.1 507 Insufficient Storage\r\ncontent-length: \
                                         {}\r\nconnection: close\r\n\r\n{body}",
                                        body.len()
                                    )
                                };
                                let _ = client.write_all(answer.as_bytes()).await;
                            }
                            Network::LoseCompletionAnswers | Network::RefuseCompletions => {
                                let Ok(server) = tokio::net::TcpStream::connect(upstream).await
                                else {
                                    return;
                                };
                                let lose = now == Network::LoseCompletionAnswers;
                                if relay_completions(client, server, lose).await {
                                    switch.send_replace(Network::RefuseCompletions);
                                }
                            }
                            Network::Up | Network::SlowFor(_) => {
                                if let Network::SlowFor(slowed) = now {
                                    let key = slowed.to_string();
                                    let key = key.trim_matches(['{', '}']);
                                    let mut head = vec![0u8; 4096];
                                    let n = client.peek(&mut head).await.unwrap_or(0);
                                    if String::from_utf8_lossy(&head[..n])
                                        .to_lowercase()
                                        .contains(&key.to_lowercase())
                                    {
                                        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                                    }
                                }
                                let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await
                                else {
                                    return;
                                };
                                let _ =
                                    tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            }
                        }
                    };
                    // A switch of mode ends the connection.
                    tokio::select! {
                        () = serve => {}
                        _ = watch.changed() => {}
                    }
                });
            }
        });
        Self { addr, mode }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, network: Network) {
        self.mode.send_replace(network);
    }
}

/// Relays one connection request by request. With `lose`, once a multipart completion
/// (`POST ...?uploadId=`) has reached the server, the connection closes when the first byte
/// of its answer comes back (the server carried it out, the client never hears of it), and
/// this returns true. Without, every completion is answered 412 here and never forwarded.
async fn relay_completions(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    lose: bool,
) -> bool {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, to_client) = client.into_split();
    let to_client = Arc::new(tokio::sync::Mutex::new(to_client));
    let (mut from_server, mut to_server) = server.into_split();
    let losing = Arc::new(AtomicBool::new(false));
    let armed = losing.clone();
    let lost = losing.clone();
    let answering = to_client.clone();
    let answers = async move {
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            let n = from_server.read(&mut buffer).await.unwrap_or(0);
            if n == 0 || armed.load(Ordering::SeqCst) {
                return;
            }
            if answering
                .lock()
                .await
                .write_all(&buffer[..n])
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let requests = async move {
        let mut buffer = Vec::new();
        loop {
            let head_end = loop {
                if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end + 4;
                }
                let mut chunk = vec![0u8; 64 << 10];
                let n = from_client.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buffer.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buffer[..head_end]).to_lowercase();
            let body: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buffer.len() < head_end + body {
                let mut chunk = vec![0u8; 64 << 10];
                let n = from_client.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buffer.extend_from_slice(&chunk[..n]);
            }
            let line = head.lines().next().unwrap_or("");
            let request: Vec<u8> = buffer.drain(..head_end + body).collect();
            if line.starts_with("post ") && line.contains("uploadid=") {
                if !lose {
                    let body = "<Error><Code>PreconditionFailed</Code></Error>";
                    let answer = format!(
                        "HTTP/1.1 412 Precondition Failed\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if to_client
                        .lock()
                        .await
                        .write_all(answer.as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                losing.store(true, Ordering::SeqCst);
            }
            if to_server.write_all(&request).await.is_err() {
                return;
            }
        }
    };
    // The answers end first once a completion is on its way (or either side closes).
    tokio::select! {
        () = answers => {}
        () = requests => {}
    }
    lost.load(Ordering::SeqCst)
}

/// The object store unreachable, then answering 503, in the middle of an upload: the client
/// gets a transient error Ack (500 `E_FAIL`, never a bare 500 or a hang) that reports the
/// offset the server holds; a full bucket answers as a full disk does (500
/// `ERROR_DISK_FULL`); once the store is back the same fragment succeeds, and the file comes
/// out whole.
#[tokio::test]
async fn an_unreachable_or_failing_object_store_is_a_transient_error() {
    let Some(url) = server_url("AXUM_BITS_TEST_S3_SMALL_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    let proxy = FaultyProxy::start(&url).await;
    let staging = small_via(&bucket, &proxy.url(), 8 << 10)
        .amazon_s3(|s3| {
            s3.with_retry(object_store::RetryConfig {
                backoff: Default::default(),
                max_retries: 1,
                retry_timeout: std::time::Duration::from_secs(2),
            })
        })
        .build()
        .expect("staging");
    let server = server(staging).await;
    let client = server.client();
    let file = data(60_000, 10);
    let total = file.len() as u64;
    let path = "/faults/file.bin";
    let sid = client.create_ok(path).await;
    client
        .fragment(path, &sid, 0, &file[..10_000], total)
        .await
        .assert_ok();
    for fault in [Network::Down, Network::Busy] {
        proxy.set(fault);
        let started = std::time::Instant::now();
        let failed = client
            .fragment(path, &sid, 10_000, &file[10_000..30_000], total)
            .await;
        failed.assert_error(500, "0x80004005");
        assert_eq!(failed.received(), Some(10_000), "{fault:?}: {failed:?}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{fault:?}: slow answer"
        );
    }
    // A full bucket is the object store's disk full.
    proxy.set(Network::Full);
    let full = client
        .fragment(path, &sid, 10_000, &file[10_000..30_000], total)
        .await;
    full.assert_error(500, "0x80070070");
    assert_eq!(full.received(), Some(10_000));
    proxy.set(Network::Up);
    let resumed = client
        .fragment(path, &sid, 10_000, &file[10_000..30_000], total)
        .await;
    resumed.assert_ok();
    assert_eq!(resumed.received(), Some(30_000));
    client.send_all(path, &sid, &file, 9_000).await;
    client.close(path, &sid).await.assert_ok();
    let destination = Destination::from_stored("faults/file.bin", &[]).expect("destination");
    assert!(
        bucket
            .destinations()
            .read(&destination)
            .await
            .expect("object")
            == file
    );

    // One session's requests to the store are slow: another session goes on meanwhile.
    let slow_sid = client.create_ok("/faults/slow.bin").await;
    let quick_sid = client.create_ok("/faults/quick.bin").await;
    proxy.set(Network::SlowFor(
        SessionId::parse(&slow_sid).expect("a session id"),
    ));
    let slow = {
        let (client, sid, body) = (server.client(), slow_sid.clone(), file[..20_000].to_vec());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let ack = client
                .fragment("/faults/slow.bin", &sid, 0, &body, 60_000)
                .await;
            (ack, started.elapsed())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    client
        .fragment("/faults/quick.bin", &quick_sid, 0, &file[..20_000], 60_000)
        .await
        .assert_ok();
    let quick = started.elapsed();
    let (slow_ack, slow_took) = slow.await.expect("the slow fragment");
    slow_ack.assert_ok();
    assert!(
        slow_took >= std::time::Duration::from_secs(3),
        "the slow session was not slowed"
    );
    assert!(
        quick < std::time::Duration::from_secs(2),
        "the other session waited {quick:?} for the slow one"
    );
    server.stop().await;
}

/// Upload-reply on object storage: the application gets the upload as a local copy (here it
/// hashes it), for a file of one part and of several; with `copy_to_destination` the file is
/// also published in the bucket. The copy is deleted with the session, and the bucket keeps
/// only the published file.
#[tokio::test]
async fn upload_reply_gets_a_local_copy_of_an_object_staged_upload() {
    use axum_bits::completion::{CompletedUpload, Completion, CompletionError, Reply as AppReply};
    use sha2::{Digest, Sha256};

    let Some(url) = server_url("AXUM_BITS_TEST_S3_SMALL_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    let staging = small(&bucket, 8 << 10);
    let server = TestServer::start(|b| {
        b.staging(staging)
            .upload_reply_handler(|upload: CompletedUpload| async move {
                let bytes = tokio::fs::read(&upload.staged_path)
                    .await
                    .map_err(CompletionError::failed)?;
                let digest = format!("{:x}", Sha256::digest(&bytes));
                let copy = upload.destination.ends_with("keep.bin");
                Ok::<_, CompletionError>(
                    Completion::reply(AppReply::Bytes(digest.into())).copy_to_destination(copy),
                )
            })
    })
    .await;
    let client = server.client();
    for (path, len) in [("/r/small.bin", 5_000), ("/r/keep.bin", 50_000)] {
        let file = data(len, 11);
        let sid = client.create_ok(path).await;
        client.send_all(path, &sid, &file, 7_000).await;
        // The final fragment again: the same reply URL, without asking the application twice.
        let last = len - len % 7_000;
        let again = client
            .fragment(path, &sid, last as u64, &file[last..], len as u64)
            .await;
        again.assert_ok();
        let reply_url = again
            .header("BITS-Reply-URL")
            .expect("a reply URL")
            .to_owned();
        let reply = reqwest::get(&reply_url).await.expect("the reply");
        assert_eq!(reply.status(), 200);
        let want = format!("{:x}", Sha256::digest(&file));
        assert_eq!(reply.text().await.expect("its body"), want, "{path}");
        client.close(path, &sid).await.assert_ok();
    }
    let copies: Vec<_> = std::fs::read_dir(server.root.join(".bits").join("replies"))
        .map(|dir| dir.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(copies.is_empty(), "left in the reply folder: {copies:?}");
    let keep = Destination::from_stored("r/keep.bin", &[]).expect("destination");
    assert!(bucket.destinations().read(&keep).await.expect("published") == data(50_000, 11));
    assert_eq!(
        bucket.keys().await,
        [key(&keep).to_string()],
        "only the copied file is left"
    );
    assert_eq!(bucket.open_uploads().await, 0);
    server.stop().await;
}

/// Tails gathered by another node (after 256 tiny fragments) that then died before its record:
/// this node's memory names tails that are gone. Its next fragment reads the bucket again and
/// is stored after what is there, and the file comes out whole.
#[tokio::test]
async fn tails_gathered_by_another_node_behind_this_ones_back() {
    let Some(url) = server_url("AXUM_BITS_TEST_S3_SMALL_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    let (a, b) = (small(&bucket, 8 << 10), small(&bucket, 8 << 10));
    let file = data(4_000, 12);
    let id = SessionId::new();
    a.create(id).await.expect("create");
    for at in (0..2_560).step_by(10) {
        stage(&a, id, &file, at, at + 10).await;
    }
    // B gathers the 256 tails into one with its 5 bytes, and dies before its record.
    stage(&b, id, &file, 2_560, 2_565).await;
    // A goes on from 2,560 with more bytes than B stored.
    stage(&a, id, &file, 2_560, 2_600).await;
    assert_eq!(a.len(id).await.expect("len"), Some(2_600));
    stage(&a, id, &file, 2_600, 4_000).await;
    assert!(committed_bytes(&a, &bucket, id, 4_000).await == file);
}

/// What recovery and disabling do to object staging: at start-up the staged objects of a
/// session without a record (a node that died between staging bytes and recording the
/// session) are deleted and its multipart upload aborted, while recorded sessions keep theirs
/// and resume; disabling uploads deletes every session's objects and upload, and leaves the
/// committed files.
#[tokio::test]
async fn recovery_and_disabling_clean_the_bucket() {
    let Some(url) = server_url("AXUM_BITS_TEST_S3_SMALL_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    let staging = small(&bucket, 8 << 10);
    let server = server(staging.clone()).await;
    let handle = server.layer.handle();
    let client = server.client();
    let file = data(50_000, 11);
    let total = file.len() as u64;
    let a = client.create_ok("/r/a.bin").await;
    client
        .fragment("/r/a.bin", &a, 0, &file[..30_000], total)
        .await
        .assert_ok();
    let b = client.create_ok("/r/b.bin").await;
    client
        .fragment("/r/b.bin", &b, 0, &file[..20_000], total)
        .await
        .assert_ok();
    let orphan = SessionId::new();
    staging.create(orphan).await.expect("create");
    write_at(&staging, orphan, 0, &file[..10_000], 3_000)
        .await
        .expect("stage");
    assert_eq!(bucket.open_uploads().await, 3);
    let orphan_prefix = format!(
        "up/.bits/staging/{}",
        orphan.to_string().trim_matches(['{', '}'])
    );
    assert!(
        bucket
            .keys()
            .await
            .iter()
            .any(|k| k.starts_with(&orphan_prefix))
    );

    let report = handle.recover().await.expect("recover");
    assert_eq!(report.orphan_parts, 1, "{report:?}");
    assert!(
        !bucket
            .keys()
            .await
            .iter()
            .any(|k| k.starts_with(&orphan_prefix)),
        "the orphan's objects are gone"
    );
    assert_eq!(
        bucket.open_uploads().await,
        2,
        "the orphan's upload is aborted"
    );

    // The recorded sessions resume where they were.
    client.send_all("/r/a.bin", &a, &file, 9_000).await;
    client.close("/r/a.bin", &a).await.assert_ok();
    let a_file = Destination::from_stored("r/a.bin", &[]).expect("destination");
    assert!(bucket.destinations().read(&a_file).await.as_deref() == Some(&file[..]));

    let report = handle.disable_uploads().await.expect("disable");
    assert_eq!(report.sessions, 1, "{report:?}");
    assert_eq!(bucket.keys().await, ["up/r/a.bin"]);
    assert_eq!(bucket.open_uploads().await, 0);
    let refused = client
        .fragment("/r/b.bin", &b, 20_000, &file[20_000..], total)
        .await;
    assert_eq!(refused.status, 501, "{refused:?}");
    server.stop().await;
}

/// A multipart completion that the server carried out but whose answer was lost (the
/// connection closed before it arrived): the staging retries, is told the key exists, and
/// recognises the object as its own by its ETag, so the commit succeeds; an object someone
/// else made at the key is not taken for one's own.
#[tokio::test]
async fn a_completion_whose_answer_is_lost_is_recognised() {
    let Some(url) = server_url("AXUM_BITS_TEST_S3_SMALL_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    let proxy = FaultyProxy::start(&url).await;
    let staging = small_via(&bucket, &proxy.url(), 8 << 10)
        .build()
        .expect("staging");
    let file = data(50_000, 12);
    let id = SessionId::new();
    let destination = fresh_destination("lost-answer.bin");
    staging
        .create_for(id, &destination)
        .await
        .expect("create_for");
    stage(&staging, id, &file, 0, file.len()).await;
    proxy.set(Network::LoseCompletionAnswers);
    staging
        .commit(id, &destination, file.len() as u64, false)
        .await
        .expect("the commit whose first answer was lost");
    assert!(bucket.destinations().read(&destination).await.as_deref() == Some(&file[..]));
    proxy.set(Network::Up);
    staging.discard(id).await.expect("discard");

    // Someone else's object of the same size at the key is not mistaken for the upload.
    let id = SessionId::new();
    let taken = fresh_destination("lost-answer-taken.bin");
    staging.create_for(id, &taken).await.expect("create_for");
    stage(&staging, id, &file, 0, file.len()).await;
    let theirs = data(50_000, 13);
    proxy.set(Network::LoseCompletionAnswers);
    bucket.destinations().put(&taken, &theirs).await;
    match staging.commit(id, &taken, file.len() as u64, false).await {
        Err(error) if error.is_busy() => {}
        other => panic!("an object made by someone else is not the upload: {other:?}"),
    }
    assert!(bucket.destinations().read(&taken).await.as_deref() == Some(&theirs[..]));
    proxy.set(Network::Up);
    staging.discard(id).await.expect("discard");
    assert_eq!(bucket.open_uploads().await, 0);
}

/// Upload-reply in a farm that shares only the store and the bucket: the reply the
/// application gave on one node is kept in the bucket, so the other node serves the reply
/// URL (whole and in ranges); it is deleted from the bucket with the session, and the local
/// copy of the upload the application read, left on a node where the session did not end,
/// by that node's next sweep.
#[tokio::test]
async fn any_node_serves_a_reply_kept_in_the_bucket() {
    use axum_bits::completion::{CompletedUpload, Completion, CompletionError, Reply as AppReply};

    let Some(url) = server_url("AXUM_BITS_TEST_S3_SMALL_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    let staging = small(&bucket, 8 << 10);
    let store = Arc::new(axum_bits::store::MemoryStore::new());
    let node = |staging: S3Staging, store: Arc<axum_bits::store::MemoryStore>| {
        TestServer::start(move |b| {
            b.staging(staging).store(store).upload_reply_handler(
                |upload: CompletedUpload| async move {
                    let bytes = tokio::fs::read(&upload.staged_path)
                        .await
                        .map_err(CompletionError::failed)?;
                    let mut reply = format!("{} bytes:", bytes.len()).into_bytes();
                    reply.extend(bytes.iter().rev().take(30_000));
                    Ok::<_, CompletionError>(Completion::reply(AppReply::Bytes(reply.into())))
                },
            )
        })
    };
    let a = node(staging.clone(), store.clone()).await;
    let b = node(staging.clone(), store.clone()).await;
    let file = data(40_000, 14);
    let sid = a.client().create_ok("/r/file.bin").await;
    // Node A receives the whole file and asks the application; B answers the last fragment
    // again (a client's retry) with the same reply URL.
    a.client().send_all("/r/file.bin", &sid, &file, 9_000).await;
    let last = 36_000;
    let ack = b
        .client()
        .fragment("/r/file.bin", &sid, last, &file[last as usize..], 40_000)
        .await;
    ack.assert_ok();
    let reply_url = ack
        .header("BITS-Reply-URL")
        .expect("a reply URL")
        .to_owned();
    let mut want = b"40000 bytes:".to_vec();
    want.extend(file.iter().rev().take(30_000));

    let replies: Vec<_> = bucket
        .keys()
        .await
        .into_iter()
        .filter(|k| k.starts_with("up/.bits/replies/"))
        .collect();
    assert_eq!(replies.len(), 1, "the reply is in the bucket: {replies:?}");
    // No reply on either node's disk; the node that asked the application holds the local
    // copy of the upload it read, until the session ends.
    let local = |node: &TestServer| -> Vec<String> {
        std::fs::read_dir(node.root.join(".bits").join("replies"))
            .map(|dir| {
                dir.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(local(&a), [format!("{sid}.upload")]);
    assert_eq!(local(&b), Vec::<String>::new());
    // Served by either node, whatever host the URL names.
    let path = reply_url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(_, path)| format!("/{path}"))
        .expect("a path in the reply URL");
    let http = reqwest::Client::new();
    for node in [&a, &b] {
        let whole = http.get(node.url(&path)).send().await.expect("the reply");
        assert_eq!(whole.status(), 200);
        assert!(whole.bytes().await.expect("body")[..] == want[..]);
        let range = http
            .get(node.url(&path))
            .header("Range", "bytes=100-20099")
            .send()
            .await
            .expect("a range of the reply");
        assert_eq!(range.status(), 206);
        assert!(range.bytes().await.expect("body")[..] == want[100..20_100]);
    }
    // The session ends on the node that did not ask the application.
    b.client().close("/r/file.bin", &sid).await.assert_ok();
    assert_eq!(
        bucket.keys().await,
        Vec::<String>::new(),
        "the reply and the staged upload are gone with the session"
    );
    // The other node's next sweep deletes its local copy.
    assert_eq!(local(&a), [format!("{sid}.upload")]);
    let swept = a.layer.sweeper().sweep().await.expect("sweep");
    assert_eq!(swept.replies, 1, "{swept:?}");
    assert_eq!(local(&a), Vec::<String>::new());
    assert_eq!(bucket.open_uploads().await, 0);
    a.stop().await;
    b.stop().await;
}

/// Expiry on object staging: sessions idle past the session timeout, one with tails only and
/// one with uploaded parts (a multipart upload at its destination), are deleted by a sweep
/// with every staged object and their multipart uploads; a file committed before stays.
#[tokio::test]
async fn expired_sessions_leave_nothing_in_the_bucket() {
    use std::time::Duration;

    let Some(url) = server_url("AXUM_BITS_TEST_S3_SMALL_URL") else {
        return;
    };
    let bucket = Bucket::new(&url).await;
    let server = TestServer::start(|b| {
        b.staging(small(&bucket, 8 << 10))
            .session_timeout(Duration::from_millis(500))
    })
    .await;
    let client = server.client();
    let file = data(30_000, 15);
    let total = file.len() as u64;
    let kept = client.create_ok("/e/kept.bin").await;
    client.send_all("/e/kept.bin", &kept, &file, 7_000).await;
    let tails = client.create_ok("/e/tails.bin").await;
    client
        .fragment("/e/tails.bin", &tails, 0, &file[..3_000], total)
        .await
        .assert_ok();
    let parts = client.create_ok("/e/parts.bin").await;
    client
        .fragment("/e/parts.bin", &parts, 0, &file[..20_000], total)
        .await
        .assert_ok();
    assert_eq!(bucket.open_uploads().await, 2);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let report = server.layer.sweeper().sweep().await.expect("sweep");
    assert_eq!(report.expired, 3, "{report:?}");
    assert_eq!(bucket.keys().await, ["up/e/kept.bin"]);
    assert_eq!(bucket.open_uploads().await, 0);
    let refused = client
        .fragment("/e/parts.bin", &parts, 20_000, &file[20_000..], total)
        .await;
    refused.assert_error(500, "0x8020001F");
    server.stop().await;
}
