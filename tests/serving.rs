//! `axum_bits::serve`: slow clients cannot hold the server, and shutdown composes with the
//! layer's own.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use axum_bits::BitsLayer;
use common::{BitsClient, data};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Served {
    addr: SocketAddr,
    layer: BitsLayer,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _tmp: tempfile::TempDir,
}

async fn start(
    configure: impl FnOnce(axum_bits::Serve<Router>) -> axum_bits::Serve<Router>,
) -> Served {
    let tmp = tempfile::tempdir().unwrap();
    let layer = BitsLayer::builder(tmp.path()).build().unwrap();
    let app = Router::new()
        .route("/", get(|| async { "app" }))
        .layer(layer.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = configure(axum_bits::serve(listener, app));
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    Served {
        addr,
        layer,
        stop: Some(tx),
        task,
        _tmp: tmp,
    }
}

/// Opens a connection that sends a request head one byte at a time, forever.
fn slow_loris(addr: SocketAddr) -> tokio::task::JoinHandle<Duration> {
    tokio::spawn(async move {
        let started = Instant::now();
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            return started.elapsed();
        };
        let head = b"BITS_POST /x.bin HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Ping\r\nX-Pad: ";
        for byte in head.iter().chain(std::iter::repeat(&b'a')) {
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            // Closed by the server? (EOF or a 408 it sends before closing.)
            let mut buf = [0u8; 256];
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await
            {
                break;
            }
            if started.elapsed() > Duration::from_secs(20) {
                break;
            }
        }
        started.elapsed()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_cannot_hold_the_server() {
    let served = start(|s| {
        s.header_read_timeout(Duration::from_millis(500))
            .max_connections(32)
    })
    .await;
    // More slow connections than the server has slots.
    let loris: Vec<_> = (0..64).map(|_| slow_loris(served.addr)).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A real upload still gets through, a little delayed at most.
    let started = Instant::now();
    let body = data(200_000, 1);
    BitsClient::new(served.addr)
        .upload("/real.bin", &body, 64 * 1024)
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "upload took {:?}",
        started.elapsed()
    );

    // Every slow connection was cut off around the header timeout, not held.
    for task in loris {
        let held = task.await.unwrap();
        assert!(held < Duration::from_secs(5), "held for {held:?}");
    }
    served.stop.map(|tx| tx.send(()));
    tokio::time::timeout(Duration::from_secs(5), served.task)
        .await
        .expect("serve returns after the signal")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_composes_with_the_accept_loop() {
    let mut served = start(|s| s.shutdown_timeout(Duration::from_secs(5))).await;
    let client = BitsClient::new(served.addr);
    let sid = client.create_ok("/a.bin").await;
    client
        .fragment("/a.bin", &sid, 0, &data(1000, 2), 2000)
        .await
        .assert_ok();
    let handle = served.layer.handle();
    let shutdown = tokio::spawn(handle.shutdown(Duration::from_secs(1)));
    served.stop.take().map(|tx| tx.send(()));
    tokio::time::timeout(Duration::from_secs(5), &mut served.task)
        .await
        .expect("the loop stops")
        .unwrap()
        .unwrap();
    let report = shutdown.await.unwrap();
    assert!(report.drained && report.closed, "{report:?}");
    // The listener is closed; the session waits on disk for the next process.
    assert!(TcpStream::connect(served.addr).await.is_err());
}

/// Sends `GET /` with a header of `pad` bytes on a fresh connection; the response status, or
/// `None` if the server closed the connection without one.
async fn get_with_header(addr: SocketAddr, pad: usize) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(pad)
    );
    if stream.write_all(head.as_bytes()).await.is_err() {
        return None;
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Waits until `addr` answers a request with a `pad`-byte header with `status`, for at most
/// five seconds (a closed connection gives its slot back as the server notices).
async fn until_status(addr: SocketAddr, pad: usize, status: Option<u16>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = get_with_header(addr, pad).await;
        if got == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still {got:?}, expected {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn read_buffers_are_full_only_for_the_first_connections_and_come_back() {
    // A request head longer than the small buffer shows which buffer a connection got.
    const HEAD: usize = 20 << 10;
    let served = start(|s| s.read_buffers(1, 8 << 10)).await;
    // With the full buffer free, a connection takes it and reads the long head.
    assert_eq!(get_with_header(served.addr, HEAD).await, Some(200));

    // A connection holds the full buffer: the next one gets the small buffer and its long
    // head is refused, while a short head is served.
    let holder = TcpStream::connect(served.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = get_with_header(served.addr, HEAD).await;
    assert!(matches!(refused, Some(431) | None), "{refused:?}");
    assert_eq!(get_with_header(served.addr, 100).await, Some(200));

    // Once it is closed the full buffer comes back.
    drop(holder);
    until_status(served.addr, HEAD, Some(200)).await;

    // No full buffers at all: every connection gets the small one.
    let small = start(|s| s.read_buffers(0, 8 << 10)).await;
    let refused = get_with_header(small.addr, HEAD).await;
    assert!(matches!(refused, Some(431) | None), "{refused:?}");
    assert_eq!(get_with_header(small.addr, 100).await, Some(200));
}
