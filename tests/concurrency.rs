//! Many clients at once over real sockets: independent sessions in parallel, two connections
//! racing on one session (the per-session lock, protocol reference section 8.1), and
//! Create-Sessions racing for one destination (section 8.4: one wins, the rest get 409).

mod common;

use std::time::Duration;

use common::{BitsClient, RawConn, RawResponse, TestServer, data, fragment_head};

/// A small deterministic generator for sizes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + usize::try_from(self.next() % (hi - lo + 1) as u64).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_simultaneous_sessions_land_byte_identical() {
    const SESSIONS: u64 = 40;
    let server = TestServer::start(|b| b).await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(SESSIONS as usize));
    let mut tasks = Vec::new();
    for i in 0..SESSIONS {
        let addr = server.addr;
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x5EED_0000 + i * 7919);
            let len = rng.range(200 * 1024, 600 * 1024);
            let source = data(len, 1000 + i);
            let path = format!("/c{i:02}.bin");
            // One client (connection pool) per session: the sessions really use separate
            // sockets.
            let client = BitsClient::new(addr);
            let sid = client.create_ok(&path).await;
            // Everyone sends fragments at the same time.
            barrier.wait().await;
            let total = len as u64;
            let mut offset = 0usize;
            let mut fragments = 0;
            while offset < len {
                let end = (offset + rng.range(5 * 1024, 96 * 1024)).min(len);
                let reply = client
                    .fragment(&path, &sid, offset as u64, &source[offset..end], total)
                    .await;
                reply.assert_ok();
                assert_eq!(reply.received(), Some(end as u64), "session {i}: {reply:?}");
                offset = end;
                fragments += 1;
            }
            client.close(&path, &sid).await.assert_ok();
            (path, source, fragments)
        }));
    }
    let mut fragments = 0;
    for task in tasks {
        let (path, source, n) = task.await.expect("session task");
        fragments += n;
        let stored = std::fs::read(server.root.join(&path[1..])).expect("uploaded file");
        assert!(stored == source, "{path} differs from its source");
    }
    assert!(fragments >= SESSIONS as usize * 3, "{fragments} fragments");
    assert!(
        common::parts(&server.root).is_empty(),
        "{:?}",
        server.leftovers()
    );
    // Only the session records (tombstones) remain.
    let leftovers = server.leftovers();
    assert_eq!(leftovers.len(), SESSIONS as usize, "{leftovers:?}");
    assert!(
        leftovers
            .iter()
            .all(|p| p.extension().is_some_and(|e| e == "json"))
    );
    server.stop().await;
}

fn received(response: &RawResponse) -> u64 {
    response
        .header("BITS-Received-Content-Range")
        .expect("BITS-Received-Content-Range")
        .parse()
        .expect("numeric offset")
}

/// Fragment A (0..1.5 MiB) holds the session while its body trickles in; fragment B
/// (0.5..2 MiB) arrives on a second connection meanwhile. Run concurrently, B would be a
/// gap (416, offset 0) at once; serialized behind A it is an overlap completing the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_fragments_on_two_connections_are_serialized() {
    const MIB: usize = 1 << 20;
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let path = "/same.bin";
    let source = data(2 * MIB, 77);
    let total = source.len();
    let sid = client.create_ok(path).await;

    let (a_first, a_len) = (0, 3 * MIB / 2);
    let (b_first, b_len) = (MIB / 2, 3 * MIB / 2);
    let mut a = RawConn::connect(server.addr).await;
    a.write(&fragment_head(path, &sid, a_first, a_len, total))
        .await;
    a.write(&source[..256 * 1024]).await;
    // A's handler holds the session once it streams into the part (its 256 KiB write
    // buffer is full by now); only then does B arrive.
    let part = server
        .root
        .join(".bits")
        .join("parts")
        .join(format!("{sid}.part"));
    let start = std::time::Instant::now();
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < 256 * 1024 {
        assert!(start.elapsed() < Duration::from_secs(10), "A never wrote");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let mut b = RawConn::connect(server.addr).await;
    b.write(&fragment_head(path, &sid, b_first, b_len, total))
        .await;
    b.write(&source[b_first..b_first + 64 * 1024]).await;
    let early = tokio::time::timeout(Duration::from_millis(400), b.read_response()).await;
    assert!(
        early.is_err(),
        "fragment B was answered while fragment A held the session: {early:?}"
    );

    // A's body completes: A is answered first, with exactly its own end.
    a.write(&source[256 * 1024..a_len]).await;
    let reply_a = a.read_response().await.expect("Ack for A");
    assert_eq!(reply_a.status, 200, "{reply_a:?}");
    assert_eq!(received(&reply_a), (a_first + a_len) as u64);

    // Then B: an overlap whose new bytes complete the file.
    b.write(&source[b_first + 64 * 1024..b_first + b_len]).await;
    let reply_b = b.read_response().await.expect("Ack for B");
    assert_eq!(reply_b.status, 200, "{reply_b:?}");
    assert_eq!(received(&reply_b), total as u64);

    client.close(path, &sid).await.assert_ok();
    assert!(std::fs::read(server.root.join("same.bin")).unwrap() == source);
    assert!(common::parts(&server.root).is_empty());
    server.stop().await;
}

/// Rounds of two fragments sent at the same moment from the same offset on two connections,
/// with different lengths. Whatever the order, the Acks must match one serial execution:
/// the first processed reports its own end, the second the larger end; never a 500 from a
/// lost update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_fragments_from_one_offset_match_a_serial_order() {
    let server = TestServer::start(|b| b).await;
    let path = "/race.bin";
    let source = std::sync::Arc::new(data(900 * 1024, 5));
    let total = source.len() as u64;
    let c1 = BitsClient::new(server.addr);
    let c2 = BitsClient::new(server.addr);
    let sid = c1.create_ok(path).await;
    let mut rng = Rng(99);
    let mut offset = 0usize;
    let mut rounds = 0;
    while offset < source.len() {
        let len1 = rng.range(1, 64 * 1024).min(source.len() - offset);
        let len2 = rng.range(1, 64 * 1024).min(source.len() - offset);
        let send = |client: BitsClient, len: usize| {
            let (source, sid) = (source.clone(), sid.clone());
            tokio::spawn(async move {
                client
                    .fragment(
                        path,
                        &sid,
                        offset as u64,
                        &source[offset..offset + len],
                        total,
                    )
                    .await
            })
        };
        let (t1, t2) = (send(c1.clone(), len1), send(c2.clone(), len2));
        let (r1, r2) = (t1.await.unwrap(), t2.await.unwrap());
        r1.assert_ok();
        r2.assert_ok();
        let (e1, e2) = ((offset + len1) as u64, (offset + len2) as u64);
        let max = e1.max(e2);
        let got = (r1.received().unwrap(), r2.received().unwrap());
        assert!(
            got == (e1, max) || got == (max, e2),
            "round {rounds} at {offset}: ends {e1}/{e2}, Acks {got:?}"
        );
        offset = usize::try_from(max).unwrap();
        rounds += 1;
    }
    assert!(rounds >= 10);
    c1.close(path, &sid).await.assert_ok();
    assert!(std::fs::read(server.root.join("race.bin")).unwrap() == *source);
    assert!(common::parts(&server.root).is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_create_sessions_for_one_destination_one_wins() {
    const CLIENTS: usize = 24;
    let server = TestServer::start(|b| b).await;
    let path = "/contested.bin";
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let client = BitsClient::new(server.addr);
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            // Warm the connection so the Creates race on the server, not in connecting.
            client.ping(path).await.assert_ok();
            barrier.wait().await;
            let reply = client.create(path).await;
            (client, reply)
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let (client, reply) = task.await.unwrap();
        if reply.status == 200 {
            reply.assert_ok();
            winners.push((client, reply.session_id()));
        } else {
            reply.assert_error(409, "0x80070020");
        }
    }
    assert_eq!(winners.len(), 1, "exactly one Create-Session may win");

    // The winner uploads; afterwards the destination exists and a new session is refused.
    let (client, sid) = winners.pop().unwrap();
    let source = data(50_000, 8);
    client.send_all(path, &sid, &source, 16 * 1024).await;
    client.close(path, &sid).await.assert_ok();
    assert!(std::fs::read(server.root.join("contested.bin")).unwrap() == source);
    client.create(path).await.assert_error(403, "0x80070005");
    assert!(common::parts(&server.root).is_empty());
    server.stop().await;
}
