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
