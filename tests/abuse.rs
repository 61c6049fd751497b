//! What one determined client can do to the server, over real sockets, and the bounds that
//! hold against it: sessions ended in a loop leave a bounded number of compact tombstones on
//! every store; trickled bodies are cut off and unused bodies never delay an Ack, also with a
//! thousand trickling connections; one anonymous address cannot fill the server; a session
//! past its timeout is gone at its next packet, whatever the sweep interval.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum_bits::store::{FileStore, MemoryStore, SessionStore};
use axum_bits::{BitsLayer, BitsLayerBuilder, SessionId};
use common::{BitsClient, PROTOCOL, RawConn, RawResponse, TestServer, data, fragment_head};
use tokio::io::AsyncWriteExt;

const NOT_FOUND: &str = "0x8020001F";
const TOO_MANY_SESSIONS: &str = "0x80070045";
const TIMEOUT: &str = "0x800705B4";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn create_request(path: &str) -> Vec<u8> {
    format!(
        "BITS_POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nBITS-Packet-Type: Create-Session\r\n\
         BITS-Supported-Protocols: {PROTOCOL}\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

fn cancel_request(path: &str, sid: &str) -> Vec<u8> {
    format!(
        "BITS_POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nBITS-Packet-Type: Cancel-Session\r\n\
         BITS-Session-Id: {sid}\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

fn header<'a>(response: &'a RawResponse, name: &str) -> &'a str {
    response
        .header(name)
        .unwrap_or_else(|| panic!("no {name} in {response:?}"))
}

/// Create-Session then Cancel-Session, `cycles` times, on one keep-alive connection.
async fn create_cancel_loop(raw: &mut RawConn, cycles: usize) {
    for i in 0..cycles {
        let path = format!("/churn-{}.bin", i % 7);
        let created = raw.exchange(&create_request(&path)).await;
        assert_eq!(created.status, 200, "{created:?}");
        let sid = header(&created, "BITS-Session-Id").to_owned();
        let cancelled = raw.exchange(&cancel_request(&path, &sid)).await;
        assert_eq!(cancelled.status, 200, "{cancelled:?}");
    }
}

/// Files and bytes in a folder (not recursive).
fn files_and_bytes(dir: &Path) -> (usize, u64) {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(std::fs::Metadata::is_file)
                .fold((0, 0), |(n, bytes), m| (n + 1, bytes + m.len()))
        })
        .unwrap_or((0, 0))
}

/// This process's resident memory in KiB (Linux), for a rough flatness check.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Serves `layer` with the peer address of each connection (as `axum_bits::serve` and axum's
/// `ConnectInfo` provide it), so that per-peer limits apply.
async fn serve_with_peers(layer: BitsLayer) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().layer(layer);
    tokio::spawn(async move {
        axum_bits::serve(listener, app)
            .run(std::future::pending())
            .await
            .expect("serve");
    });
    addr
}

/// A client whose connections come from `local` (any address of 127.0.0.0/8 works on Linux).
fn client_from(addr: SocketAddr, local: &str) -> BitsClient {
    let local: IpAddr = local.parse().unwrap();
    BitsClient::with_http(
        addr,
        reqwest::Client::builder()
            .local_address(local)
            .no_proxy()
            .build()
            .unwrap(),
    )
}

// ---------------------------------------------------------------------------------------
// 3. What ended sessions leave behind
// ---------------------------------------------------------------------------------------

/// The report: one keep-alive connection repeating Create-Session then Cancel-Session left
/// 20,000 record files in 26 s, kept for 14 days. Now the tombstones stay within their limits
/// (256 per owner or peer by default, trimmed every 64 ends), the storage and the memory
/// stay flat, the newest tombstones still answer repeats, and other clients still get in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_create_cancel_cycles_leave_storage_and_memory_flat() {
    let server = TestServer::start(|b| b).await;
    let sessions = server.root.join(".bits").join("sessions");
    let mut raw = server.raw().await;
    let started = Instant::now();

    create_cancel_loop(&mut raw, 5_000).await;
    eprintln!("5,000 cycles in {:?}", started.elapsed());
    let (files_at_5k, bytes_at_5k) = files_and_bytes(&sessions);
    let rss_at_5k = rss_kib();
    create_cancel_loop(&mut raw, 15_000).await;
    let (files, bytes) = files_and_bytes(&sessions);
    let rss = rss_kib();
    eprintln!(
        "20,000 cycles in {:?}: record files {files_at_5k} -> {files} ({bytes_at_5k} -> {bytes} \
         bytes), RSS {rss_at_5k:?} -> {rss:?} KiB",
        started.elapsed()
    );
    // 256 kept for this (anonymous) client, plus at most 64 ended since the last trim.
    assert!(files <= 256 + 64, "{files} record files left");
    assert!(bytes <= 320 * 4096, "{bytes} bytes of records left");
    if let (Some(before), Some(after)) = (rss_at_5k, rss) {
        assert!(
            after < before + 16 * 1024,
            "RSS grew from {before} to {after} KiB over 15,000 more cycles"
        );
    }

    // The newest tombstone still answers a repeated Cancel consistently.
    let created = raw.exchange(&create_request("/last.bin")).await;
    let sid = header(&created, "BITS-Session-Id").to_owned();
    assert_eq!(
        raw.exchange(&cancel_request("/last.bin", &sid))
            .await
            .status,
        200
    );
    assert_eq!(
        raw.exchange(&cancel_request("/last.bin", &sid))
            .await
            .status,
        200
    );

    // Another client creates and uploads as usual.
    let other = server.client();
    let body = data(10_000, 1);
    other.upload("/other.bin", &body, 4096).await;
    assert_eq!(std::fs::read(server.root.join("other.bin")).unwrap(), body);

    // A restarted server loads only what is left.
    server.stop().await;
    let (files_after_restart, _) = files_and_bytes(&sessions);
    assert!(files_after_restart <= 256 + 64 + 1);
}

/// The same bound on every store, with small limits: what a client ending sessions in a loop
/// leaves behind is at most the per-owner limit plus one trimming interval, and a sweep brings
/// it back to the limit.
async fn churn_is_bounded_on<S: SessionStore>(store: S, root: &Path) {
    let store = Arc::new(store);
    let layer_store = store.clone();
    let server = TestServer::start_in(root, |b| {
        b.store(layer_store)
            .max_tombstones(200)
            .max_tombstones_per_owner(40)
    })
    .await;
    let mut raw = server.raw().await;
    create_cancel_loop(&mut raw, 600).await;
    let sweeper = server.layer.sweeper();
    let left = store.list().await.unwrap().len();
    assert!(left <= 40 + 64, "{left} records left after 600 cycles");
    sweeper.sweep().await.expect("sweep");
    let left = store.list().await.unwrap().len();
    assert!(left <= 40, "{left} records left after a sweep");
    // Other clients are unaffected.
    let id = server.client().create_ok("/fine.bin").await;
    assert!(SessionId::parse(&id).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_is_bounded_on_the_memory_store() {
    let tmp = tempfile::tempdir().unwrap();
    churn_is_bounded_on(MemoryStore::new(), tmp.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_is_bounded_on_the_file_store() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path().join("records")).unwrap();
    churn_is_bounded_on(store, tmp.path()).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_is_bounded_on_the_sqlite_store() {
    let tmp = tempfile::tempdir().unwrap();
    let store = axum_bits::store::SqliteStore::open(tmp.path().join("s.db"))
        .await
        .unwrap();
    churn_is_bounded_on(store, tmp.path()).await;
}

/// A service's URL from the environment; `None` (skipped) outside CI, a failure under CI.
fn service_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) => Some(url),
        Err(_) if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
            panic!("{var} is not set: .ci/run must start the service (.ci/services.sh)")
        }
        Err(_) => {
            eprintln!("{var} is not set; test skipped");
            None
        }
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_is_bounded_on_the_postgres_store() {
    let Some(url) = service_url("AXUM_BITS_TEST_POSTGRES_URL") else {
        return;
    };
    let prefix = format!("a{}_", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let store = axum_bits::store::PostgresStore::connect(&url)
        .await
        .unwrap()
        .with_table_prefix(&prefix)
        .unwrap();
    store.migrate().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let outcome = tokio::spawn(async move { churn_is_bounded_on(store, tmp.path()).await }).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql(&format!(
        "DROP TABLE IF EXISTS {prefix}sessions, {prefix}leases, {prefix}schema"
    ))
    .execute(&pool)
    .await
    .unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_is_bounded_on_the_redis_store() {
    let Some(url) = service_url("AXUM_BITS_TEST_REDIS_URL") else {
        return;
    };
    let prefix = format!("abuse-{}", uuid::Uuid::new_v4().simple());
    let store = axum_bits::store::RedisStore::connect(&url)
        .await
        .unwrap()
        .with_key_prefix(&prefix)
        .unwrap();
    store.migrate().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    churn_is_bounded_on(store, tmp.path()).await;
}

// ---------------------------------------------------------------------------------------
// 4. Trickled and unused bodies
// ---------------------------------------------------------------------------------------

/// The report: a Fragment declaring 16 MiB, fed one byte every 20 s, was still open after
/// 141 s (the idle timeout restarts with every byte). Now a body must keep the minimum average
/// rate after its grace period: it is cut off with 408, what arrived is kept and reported.
#[tokio::test]
async fn a_trickled_fragment_is_cut_off_with_408_and_keeps_what_arrived() {
    let server = TestServer::start(|b| {
        b.min_body_rate(1024)
            .body_rate_grace(Duration::from_secs(1))
    })
    .await;
    let sid = server.client().create_ok("/slow.bin").await;
    let mut raw = server.raw().await;
    let total = 1 << 20;
    raw.write(&fragment_head("/slow.bin", &sid, 0, total, total))
        .await;
    let started = Instant::now();
    let mut stream = raw.into_inner();
    let mut sent = 0u64;
    // One byte every 100 ms: far inside the 60 s idle timeout, far below 1 KiB/s.
    let answer = loop {
        if stream.write_all(b"x").await.is_ok() {
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > Duration::from_secs(3) {
            break read_answer(stream).await;
        }
    };
    let elapsed = started.elapsed();
    let answer = answer.expect("an Ack before the connection closed");
    assert_eq!(answer.status, 408, "{answer:?}");
    assert_eq!(header(&answer, "BITS-Error-Code"), TIMEOUT);
    let kept: u64 = header(&answer, "BITS-Received-Content-Range")
        .parse()
        .unwrap();
    assert!(kept > 0 && kept <= sent, "kept {kept} of {sent} sent");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    // The session resumes from what was kept.
    let rest = data(total - usize::try_from(kept).unwrap(), 2);
    server
        .client()
        .fragment("/slow.bin", &sid, kept, &rest, total as u64)
        .await
        .assert_ok();
}

/// The status of the response head that arrives on `reader`, within 15 s.
async fn read_status(mut reader: tokio::net::tcp::OwnedReadHalf) -> Result<u16, String> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let read = async {
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = reader
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read failed after {} bytes: {e}", head.len()))?;
            if n == 0 {
                return Err(format!("closed after {} bytes", head.len()));
            }
            head.extend_from_slice(&chunk[..n]);
        }
        let head = String::from_utf8_lossy(&head);
        let line = head.lines().next().unwrap_or_default();
        line.split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status in {line:?}"))
    };
    tokio::time::timeout(Duration::from_secs(15), read)
        .await
        .map_err(|_| "no answer in 15 s".to_owned())?
}

/// Reads one response from a stream the test wrote to by hand.
async fn read_answer(stream: tokio::net::TcpStream) -> Option<RawResponse> {
    RawConn::from_stream(stream).read_response().await
}

/// The report: a Ping declaring `Content-Length: 30000000` and trickling it held its
/// connection 101 s with no answer, because bodies the packet does not use were drained
/// before the Ack. Now the Ack goes out at once, and a body that is not read to its end at a
/// reasonable pace closes the connection.
#[tokio::test]
async fn a_packet_whose_body_is_not_used_is_answered_at_once() {
    let server = TestServer::start(|b| {
        b.min_body_rate(1024)
            .body_rate_grace(Duration::from_secs(1))
    })
    .await;
    for (what, head) in [
        (
            "ping",
            "BITS_POST /p.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nBITS-Packet-Type: Ping\r\n\
             Content-Length: 30000000\r\n\r\n"
                .to_owned(),
        ),
        (
            "fragment of an unknown session",
            String::from_utf8(fragment_head(
                "/p.bin",
                "{00000000-0000-4000-8000-000000000000}",
                0,
                1 << 20,
                1 << 20,
            ))
            .unwrap(),
        ),
    ] {
        let mut raw = server.raw().await;
        raw.write(head.as_bytes()).await;
        raw.write(b"abc").await;
        let started = Instant::now();
        let answer = raw.read_response().await.expect("an Ack");
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(1),
            "{what}: Ack after {waited:?}"
        );
        if what == "ping" {
            // A Ping carries no body: one that declares a body is malformed.
            assert_eq!(answer.status, 400, "{what}: {answer:?}");
            assert_eq!(header(&answer, "BITS-Error-Code"), "0x80070057");
        } else {
            assert_eq!(answer.status, 500, "{what}: {answer:?}");
            assert_eq!(header(&answer, "BITS-Error-Code"), NOT_FOUND);
        }
        // The body then trickles: the connection is closed within the grace period and a bit.
        assert!(
            raw.is_closed(Duration::from_secs(5)).await,
            "{what}: a trickled unused body kept its connection"
        );
    }
    // A refused fragment whose body does arrive at a normal pace keeps its connection usable.
    let mut raw = server.raw().await;
    let body = data(200_000, 3);
    let mut request = fragment_head(
        "/p.bin",
        "{00000000-0000-4000-8000-000000000000}",
        0,
        body.len(),
        body.len(),
    );
    request.extend_from_slice(&body);
    let answer = raw.exchange(&request).await;
    assert_eq!(header(&answer, "BITS-Error-Code"), NOT_FOUND);
    let ping = raw
        .exchange(b"BITS_POST /p.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nBITS-Packet-Type: Ping\r\nContent-Length: 0\r\n\r\n")
        .await;
    assert_eq!(ping.status, 200, "{ping:?}");
}

/// A thousand connections trickling bodies (half Pings with a body, half fragments of real
/// sessions) do not keep the server from answering another client promptly: its Pings and a
/// whole upload go through while they trickle, and the trickled fragments are cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_trickling_connections_leave_the_server_responsive() {
    let server = TestServer::start(|b| {
        b.min_body_rate(1024)
            .body_rate_grace(Duration::from_secs(2))
            .max_sessions(2000)
    })
    .await;
    let client = server.client();
    let mut sids = Vec::new();
    for i in 0..500 {
        sids.push(client.create_ok(&format!("/t{i}.bin")).await);
    }
    let mut tricklers = Vec::new();
    for i in 0..1000 {
        let head = if i % 2 == 0 {
            "BITS_POST /p.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nBITS-Packet-Type: Ping\r\n\
             Content-Length: 30000000\r\n\r\n"
                .as_bytes()
                .to_vec()
        } else {
            let sid = &sids[i / 2];
            fragment_head(&format!("/t{}.bin", i / 2), sid, 0, 16 << 20, 16 << 20)
        };
        // A hundred new connections at a time: a burst of a thousand handshakes overflows the
        // kernel's queue of SYNs (SYN cookies then reset some connections before the server
        // ever accepts them, which is not what this test is about).
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let addr = server.addr;
        let is_ping = i % 2 == 0;
        tricklers.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
            let (reader, mut writer) = stream.into_split();
            writer.write_all(&head).await.ok()?;
            let started = Instant::now();
            let trickle = tokio::spawn(async move {
                while started.elapsed() < Duration::from_secs(8) {
                    if writer.write_all(b"x").await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
            let status = read_status(reader).await;
            let answered = started.elapsed();
            trickle.abort();
            Some((is_ping, status, answered))
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut latencies = Vec::new();
    let body = data(256 << 10, 4);
    let probe_started = Instant::now();
    while probe_started.elapsed() < Duration::from_secs(5) {
        let started = Instant::now();
        client.ping("/probe").await.assert_ok();
        latencies.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    client.upload("/probe.bin", &body, 64 << 10).await;
    let upload = started.elapsed();
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let max = latencies[latencies.len() - 1];
    eprintln!(
        "with 1,000 trickling connections: {} pings, p50 {p50:?}, max {max:?}; a 256 KiB upload \
         in {upload:?}",
        latencies.len()
    );
    assert_eq!(std::fs::read(server.root.join("probe.bin")).unwrap(), body);
    assert!(max < Duration::from_secs(2), "a Ping took {max:?}");
    assert!(
        upload < Duration::from_secs(5),
        "the upload took {upload:?}"
    );
    // The tricklers themselves: each Ping (its body unused) was answered at once, each
    // trickled fragment was cut off with 408 after the grace period.
    let (mut ping_waits, mut cut_off) = (Vec::new(), Vec::new());
    for trickler in tricklers {
        let (is_ping, status, answered) = trickler.await.unwrap().expect("connected");
        if is_ping {
            assert_eq!(status, Ok(400), "a trickled Ping, after {answered:?}");
            ping_waits.push(answered);
        } else {
            assert_eq!(status, Ok(408), "a trickled fragment, after {answered:?}");
            cut_off.push(answered);
        }
    }
    ping_waits.sort();
    cut_off.sort();
    eprintln!(
        "trickled Pings answered after {:?} (max), trickled fragments cut off after {:?} to {:?}",
        ping_waits[ping_waits.len() - 1],
        cut_off[0],
        cut_off[cut_off.len() - 1]
    );
    assert!(ping_waits[ping_waits.len() - 1] < Duration::from_secs(2));
    assert!(cut_off[cut_off.len() - 1] < Duration::from_secs(7));
}

// ---------------------------------------------------------------------------------------
// 5. Anonymous clients
// ---------------------------------------------------------------------------------------

/// The report: 1,024 Create-Sessions from one anonymous client took 0.39 s, and every other
/// client then got 503 until the sessions expired (14 days). Now one peer address holds at most
/// `max_sessions_per_peer` (100) open anonymous sessions, and others still get in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_anonymous_address_cannot_fill_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = BitsLayer::builder(tmp.path()).build().unwrap();
    let addr = serve_with_peers(layer).await;
    let flooder = client_from(addr, "127.0.0.2");
    let mut created = 0;
    for i in 0..1024 {
        let reply = flooder.create(&format!("/flood-{i}.bin")).await;
        if reply.status != 200 {
            reply.assert_error(503, TOO_MANY_SESSIONS);
            break;
        }
        created += 1;
    }
    assert_eq!(created, 100, "sessions one address could open");
    // Another address is unaffected.
    let other = client_from(addr, "127.0.0.3");
    let sid = other.create_ok("/mine.bin").await;
    other
        .fragment("/mine.bin", &sid, 0, &data(1000, 5), 1000)
        .await
        .assert_ok();
}

/// When the server is full, a Create-Session reclaims the place of a session that never
/// received a byte and has been idle for `reclaim_empty_after`; a session with data is never
/// reclaimed, and a reclaimed session's client is told it is gone (and starts over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_reclaims_sessions_that_never_received_a_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = BitsLayer::builder(tmp.path())
        .max_sessions(4)
        .reclaim_empty_after(Duration::from_millis(300))
        .build()
        .unwrap();
    let addr = serve_with_peers(layer).await;
    let squatter = client_from(addr, "127.0.0.2");
    let mut empty = Vec::new();
    for i in 0..3 {
        empty.push(squatter.create_ok(&format!("/empty-{i}.bin")).await);
    }
    let worker = client_from(addr, "127.0.0.3");
    let busy = worker.create_ok("/busy.bin").await;
    worker
        .fragment("/busy.bin", &busy, 0, &data(10, 6), 100)
        .await
        .assert_ok();

    // Full, and nothing idle long enough yet.
    worker
        .create("/new-0.bin")
        .await
        .assert_error(503, TOO_MANY_SESSIONS);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Now the three empty sessions can be reclaimed, one per Create-Session; never the busy one.
    for i in 1..=3 {
        worker.create_ok(&format!("/new-{i}.bin")).await;
    }
    worker
        .create("/new-4.bin")
        .await
        .assert_error(503, TOO_MANY_SESSIONS);
    for sid in &empty {
        squatter
            .fragment("/empty-0.bin", sid, 0, &data(10, 7), 100)
            .await
            .assert_error(500, NOT_FOUND);
    }
    worker
        .fragment("/busy.bin", &busy, 10, &data(90, 8), 100)
        .await
        .assert_ok();
}

// ---------------------------------------------------------------------------------------
// 6. Expiry without a sweep
// ---------------------------------------------------------------------------------------

/// The report: with `--session-timeout 2`, a Fragment 5 s later was accepted and the data
/// stayed, because expiry waited for the next sweep (hourly). Now the packet is answered as for
/// a session that does not exist, and the session's data is deleted then.
#[tokio::test]
async fn a_session_past_its_timeout_is_gone_at_its_next_packet() {
    fn configure(b: BitsLayerBuilder) -> BitsLayerBuilder {
        b.session_timeout(Duration::from_millis(800))
    }
    let server = TestServer::start(configure).await;
    let client = server.client();
    let sid = client.create_ok("/late.bin").await;
    client
        .fragment("/late.bin", &sid, 0, &data(1000, 9), 3000)
        .await
        .assert_ok();
    assert_eq!(common::parts(&server.root).len(), 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    client
        .fragment("/late.bin", &sid, 1000, &data(2000, 10), 3000)
        .await
        .assert_error(500, NOT_FOUND);
    assert!(common::parts(&server.root).is_empty(), "the part stayed");
    assert!(
        std::fs::read_dir(server.root.join(".bits").join("sessions"))
            .unwrap()
            .next()
            .is_none(),
        "the record stayed"
    );
    assert!(!server.root.join("late.bin").exists());
    // Close and Cancel see the same.
    client
        .close("/late.bin", &sid)
        .await
        .assert_error(500, NOT_FOUND);
}
