#![cfg(feature = "client")]
//! The BITS upload client (`axum_bits::client`, feature `client`) over real sockets on
//! 127.0.0.1.
//!
//! Part A runs it against this crate's own server (`BitsLayer` on an axum `Router`). Part B
//! runs it against a scripted peer that speaks hand-written HTTP/1.1 the way IIS does
//! (protocol reference sections 4, 5, 9, 12-14, 16): braced upper-case session ids,
//! `Accept-encoding: identity`, no `BITS-Session-Id` on Fragment and Close Acks, 416 with
//! `BITS-Error-Code: 0x0`, relative reply URLs with backslashes. Every request the peer sees
//! is recorded, and each scenario injects the fault it is about. Part C runs it over HTTPS
//! against the server behind rustls.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::routing::get;
use axum_bits::client::{
    BitsClient, BitsClientBuilder, Error, Progress, UploadBuilder, UploadPhase, UploadSource,
    Uploaded,
};
use axum_bits::completion::{CompletedUpload, Completion, CompletionError, Reply as AppReply};
use axum_bits::protocol::Hresult;
use axum_bits::{BitsLayer, BitsLayerBuilder};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// The one upload protocol GUID, as the client must send it.
const PROTOCOL: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";

// ---------------------------------------------------------------------------------------------
// Shared helpers

/// Runs a test body with a generous limit, so that a hang fails instead of blocking.
async fn within<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), test)
        .await
        .expect("the test did not finish within 20 s")
}

/// A client that gives up quickly: short backoff, bounded no-progress timeout.
fn builder() -> BitsClientBuilder {
    BitsClient::builder()
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .no_progress_timeout(Duration::from_secs(5))
        .request_timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(2))
        .no_proxy()
}

fn client() -> BitsClient {
    builder().build().expect("client")
}

/// An upload of `bytes` to `url` in fragments of `fragment` bytes, by the test client; add
/// options and `.await` it.
fn upload_bytes(url: String, bytes: &[u8], fragment: u64) -> UploadBuilder {
    client()
        .upload(url, UploadSource::bytes(bytes.to_vec()))
        .fragment_size(fragment)
}

/// Deterministic pseudo-random bytes (xorshift).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}`.
fn is_braced_guid(id: &str) -> bool {
    let Some(inner) = id.strip_prefix('{').and_then(|s| s.strip_suffix('}')) else {
        return false;
    };
    let groups: Vec<&str> = inner.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Every progress report of an upload.
#[derive(Clone, Default)]
struct Reports(Arc<Mutex<Vec<Progress>>>);

impl Reports {
    fn callback(&self) -> impl Fn(&Progress) + Send + Sync + 'static {
        let all = self.0.clone();
        move |p: &Progress| all.lock().unwrap().push(p.clone())
    }

    fn all(&self) -> Vec<Progress> {
        self.0.lock().unwrap().clone()
    }
}

/// A stream that hands out at most `step` bytes per read.
struct Trickle {
    data: Vec<u8>,
    at: usize,
    step: usize,
}

impl AsyncRead for Trickle {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = this
            .step
            .min(buf.remaining())
            .min(this.data.len() - this.at);
        buf.put_slice(&this.data[this.at..this.at + n]);
        this.at += n;
        Poll::Ready(Ok(()))
    }
}

// ---------------------------------------------------------------------------------------------
// Part A harness: the crate's own server

/// One `BITS_POST` as it reached the server (before any tampering).
#[derive(Debug, Clone)]
struct Packet {
    kind: String,
    host: String,
    range: Option<String>,
    session: Option<String>,
    len: u64,
    /// The client's `x-test-run` header.
    run: Option<String>,
}

impl Packet {
    /// The first byte of a Fragment's `Content-Range`.
    fn start(&self) -> Option<u64> {
        let range = self.range.as_deref()?.strip_prefix("bytes ")?;
        if range.starts_with('*') {
            return Some(0);
        }
        range.split('-').next()?.parse().ok()
    }
}

/// Runs before the BITS layer sees a packet (the layer is given to it when the server starts).
type Hook = Arc<dyn Fn(Packet) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

struct Server {
    addr: SocketAddr,
    root: PathBuf,
    packets: Arc<Mutex<Vec<Packet>>>,
    _tmp: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Server {
    async fn start(configure: impl FnOnce(BitsLayerBuilder) -> BitsLayerBuilder) -> Self {
        Self::start_with(configure, |_| None).await
    }

    /// A server whose requests pass a recorder (and the hook, if any) before the BITS layer.
    async fn start_with(
        configure: impl FnOnce(BitsLayerBuilder) -> BitsLayerBuilder,
        hook: impl FnOnce(&BitsLayer) -> Option<Hook>,
    ) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layer: BitsLayer = configure(BitsLayer::builder(tmp.path()))
            .build()
            .expect("layer");
        let hook = hook(&layer);
        let packets = Arc::new(Mutex::new(Vec::new()));
        let log = packets.clone();
        let recorder = move |request: Request, next: Next| {
            let (log, hook) = (log.clone(), hook.clone());
            async move {
                if request.method().as_str() == "BITS_POST" {
                    let headers = request.headers();
                    let text = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let packet = Packet {
                        kind: text("bits-packet-type").unwrap_or_default(),
                        host: text("host").unwrap_or_default(),
                        range: text("content-range"),
                        session: text("bits-session-id"),
                        len: text("content-length")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0),
                        run: text("x-test-run"),
                    };
                    log.lock().unwrap().push(packet.clone());
                    if let Some(hook) = &hook {
                        hook(packet).await;
                    }
                }
                next.run(request).await
            }
        };
        let app = Router::new()
            .route("/hello", get(|| async { "hello" }))
            .layer(layer)
            .layer(middleware::from_fn(recorder));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .expect("serve");
        });
        Self {
            addr,
            root: tmp.path().to_path_buf(),
            packets,
            _tmp: tmp,
            _stop: stop,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn packets(&self) -> Vec<Packet> {
        self.packets.lock().unwrap().clone()
    }

    fn kinds(&self) -> Vec<String> {
        self.packets().into_iter().map(|p| p.kind).collect()
    }

    /// Staged part files (`root/.bits/parts/*.part`, see `LocalStaging`).
    fn parts(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.root.join(".bits").join("parts")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "part"))
            .collect()
    }

    fn read(&self, path: &str) -> Vec<u8> {
        std::fs::read(self.root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Sends a 1-byte Fragment for session `id` outside the client: the status and the
    /// `BITS-Error-Code` of the answer.
    async fn probe_session(&self, path: &str, id: &str) -> (u16, Option<String>) {
        let response = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .request(
                reqwest::Method::from_bytes(b"BITS_POST").unwrap(),
                self.url(path),
            )
            .header("BITS-Packet-Type", "Fragment")
            .header("BITS-Session-Id", id)
            .header("Content-Range", "bytes 0-0/1")
            .body(vec![0u8])
            .send()
            .await
            .expect("probe");
        let code = response
            .headers()
            .get("bits-error-code")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        (response.status().as_u16(), code)
    }
}

// ---------------------------------------------------------------------------------------------
// Part A: against the crate's own server

#[tokio::test]
async fn a_file_goes_up_in_fragments_and_lands_byte_identical() {
    within(async {
        let server = Server::start(|b| b).await;
        let bytes = random_bytes(1 << 20, 1);
        let local = tempfile::tempdir().unwrap();
        let path = local.path().join("report.bin");
        std::fs::write(&path, &bytes).unwrap();

        let uploaded = client()
            .upload(
                server.url("/report.bin"),
                UploadSource::file(&path).await.unwrap(),
            )
            .fragment_size(64 * 1024)
            .await
            .expect("upload");

        assert_eq!(uploaded.bytes, 1 << 20);
        assert!(
            is_braced_guid(&uploaded.session_id),
            "{}",
            uploaded.session_id
        );
        assert_eq!((uploaded.restarts, uploaded.retries), (0, 0));
        assert!(uploaded.reply_url.is_none() && uploaded.reply.is_none());
        assert_eq!(server.read("report.bin"), bytes);
        assert_eq!(server.parts(), Vec::<PathBuf>::new());
        let kinds = server.kinds();
        assert_eq!(kinds.iter().filter(|k| *k == "Fragment").count(), 16);
        assert_eq!(kinds.first().map(String::as_str), Some("Ping"));
        assert_eq!(kinds.last().map(String::as_str), Some("Close-Session"));
        // The file's name goes along as Content-Name; every fragment carries the session id.
        for p in server.packets().iter().filter(|p| p.kind == "Fragment") {
            assert_eq!(p.session.as_deref(), Some(uploaded.session_id.as_str()));
            assert_eq!(p.len, 64 * 1024);
        }
    })
    .await;
}

#[tokio::test]
async fn bytes_and_streams_of_awkward_sizes_including_empty() {
    within(async {
        let server = Server::start(|b| b).await;
        let client = client();
        let fragment = 8 * 1024;
        for (i, len) in [0usize, 1, 5 * 1024 + 7, 3 * 8192, 3 * 8192 + 1, 50_001]
            .into_iter()
            .enumerate()
        {
            let bytes = random_bytes(len, 10 + i as u64);
            for kind in ["bytes", "reader"] {
                let source = match kind {
                    "bytes" => UploadSource::bytes(bytes.clone()),
                    _ => UploadSource::reader(
                        Trickle {
                            data: bytes.clone(),
                            at: 0,
                            step: 1000,
                        },
                        len as u64,
                    ),
                };
                let name = format!("{kind}-{len}.bin");
                let uploaded = client
                    .upload(server.url(&format!("/{name}")), source)
                    .fragment_size(fragment)
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(uploaded.bytes, len as u64, "{name}");
                let landed = server.read(&name);
                assert_eq!(landed.len(), len, "{name}");
                assert!(landed == bytes, "{name}: content differs");
            }
        }
        assert_eq!(server.parts(), Vec::<PathBuf>::new());
        // Fragments never exceed the fragment size, and the empty file is one `bytes */0`.
        let packets = server.packets();
        assert!(packets.iter().all(|p| p.len <= fragment));
        assert!(
            packets
                .iter()
                .any(|p| p.range.as_deref() == Some("bytes */0")),
            "{packets:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn progress_only_moves_forward_and_ends_finished() {
    within(async {
        let server = Server::start(|b| b).await;
        let total = 300_000u64;
        let reports = Reports::default();
        let uploaded = client()
            .upload(
                server.url("/progress.bin"),
                UploadSource::bytes(random_bytes(total as usize, 2)),
            )
            .fragment_size(64 * 1024)
            .on_progress(reports.callback())
            .await
            .expect("upload");
        let all = reports.all();
        assert!(all.len() > 5, "{all:?}");
        let mut last_ack = 0;
        for p in &all {
            assert_eq!(p.total, total);
            assert!(p.acknowledged >= last_ack, "acknowledged went back: {p:?}");
            last_ack = p.acknowledged;
            assert!(p.sent() <= total, "{p:?}");
            assert!(p.in_flight <= 64 * 1024, "{p:?}");
        }
        assert!(
            all.iter().any(|p| p.in_flight > 0),
            "no report while bytes were in flight"
        );
        let last = all.last().unwrap();
        assert_eq!(last.acknowledged, total);
        assert_eq!(last.phase, UploadPhase::Finished);
        assert_eq!(
            last.session_id.as_deref(),
            Some(uploaded.session_id.as_str())
        );
        assert!(all.iter().any(|p| p.phase == UploadPhase::Closing));
        assert!(all.iter().any(|p| p.phase == UploadPhase::Uploading));
    })
    .await;
}

#[tokio::test]
async fn a_server_that_appears_late_is_waited_for_with_retrying_reports() {
    within(async {
        // A port nobody listens on (yet): connections are refused until the server starts.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("addr");
        let tmp = tempfile::tempdir().expect("tempdir");
        let layer = BitsLayer::builder(tmp.path()).build().expect("layer");
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let listener = TcpListener::bind(addr).await.expect("bind again");
            axum::serve(listener, Router::new().layer(layer)).await
        });
        let bytes = random_bytes(40_000, 77);
        let reports = Reports::default();
        let started = Instant::now();
        let uploaded = builder()
            .retry_backoff(Duration::from_millis(200), Duration::from_millis(800))
            .no_progress_timeout(Duration::from_secs(15))
            .build()
            .unwrap()
            .upload(
                format!("http://{addr}/late.bin"),
                UploadSource::bytes(bytes.clone()),
            )
            .fragment_size(16 * 1024)
            .on_progress(reports.callback())
            .await
            .expect("upload once the server is up");
        assert!(started.elapsed() >= Duration::from_secs(2));
        assert!(uploaded.retries >= 1, "{uploaded:?}");
        assert_eq!(std::fs::read(tmp.path().join("late.bin")).unwrap(), bytes);
        let all = reports.all();
        // Retrying follows every refused attempt, before the wait, with the delay and why.
        let first = all
            .iter()
            .position(|p| matches!(p.phase, UploadPhase::Retrying { .. }))
            .unwrap_or_else(|| panic!("no Retrying report: {all:?}"));
        assert_eq!(all[0].phase, UploadPhase::Connecting, "{all:?}");
        assert!(
            all[..first]
                .iter()
                .all(|p| p.phase == UploadPhase::Connecting)
        );
        for p in &all {
            if let UploadPhase::Retrying {
                delay,
                error,
                reason,
                ..
            } = &p.phase
            {
                // The reason is the innermost cause alone.
                assert!(
                    reason.to_lowercase().starts_with("connection refused"),
                    "{reason}"
                );
                assert!(
                    !delay.is_zero() && *delay <= Duration::from_millis(800),
                    "{p:?}"
                );
                assert!(error.starts_with("Ping"), "{error}");
                assert!(
                    error.to_lowercase().contains("connection refused"),
                    "{error}"
                );
                assert!(p.retries >= 1, "{p:?}");
            }
        }
        let retrying = all
            .iter()
            .filter(|p| matches!(p.phase, UploadPhase::Retrying { .. }))
            .count();
        assert_eq!(retrying as u32, uploaded.retries, "one report per retry");
        assert_eq!(all.last().map(|p| &p.phase), Some(&UploadPhase::Finished));
        late.abort();
    })
    .await;
}

#[tokio::test]
async fn a_413_shrinks_fragments_to_what_the_server_takes() {
    within(async {
        let server = Server::start(|b| b.max_fragment_size(16 * 1024)).await;
        let bytes = random_bytes(200_000, 3);
        let reports = Reports::default();
        upload_bytes(server.url("/shrunk.bin"), &bytes, 1 << 20)
            .on_progress(reports.callback())
            .await
            .expect("upload");
        assert_eq!(server.read("shrunk.bin"), bytes);
        let size = reports.all().last().unwrap().fragment_size;
        assert!((5 * 1024..=16 * 1024).contains(&size), "{size}");
        // A stream shrinks within the fragment it holds.
        let reports = Reports::default();
        client()
            .upload(
                server.url("/shrunk-stream.bin"),
                UploadSource::reader(std::io::Cursor::new(bytes.clone()), bytes.len() as u64),
            )
            .fragment_size(100 * 1024)
            .on_progress(reports.callback())
            .await
            .expect("stream upload");
        assert_eq!(server.read("shrunk-stream.bin"), bytes);
        let size = reports.all().last().unwrap().fragment_size;
        assert!((5 * 1024..=16 * 1024).contains(&size), "{size}");
        // The sub-case "limit below 5 KiB" cannot be built: the server refuses the setting.
        assert!(
            BitsLayer::builder(server.root.join("x"))
                .max_fragment_size(4 * 1024)
                .build()
                .is_err()
        );
    })
    .await;
}

#[tokio::test]
async fn an_existing_destination_is_access_denied_without_retries() {
    within(async {
        let server = Server::start(|b| b).await;
        std::fs::write(server.root.join("taken.bin"), b"old").unwrap();
        let started = Instant::now();
        let error = client()
            .upload(server.url("/taken.bin"), UploadSource::bytes(vec![1u8; 10]))
            .await
            .expect_err("the destination exists");
        assert!(started.elapsed() < Duration::from_secs(3));
        let Error::Server(e) = &error else {
            panic!("{error:?}")
        };
        assert_eq!(e.status(), 403, "{e}");
        assert_eq!(e.code(), Some(Hresult::E_ACCESSDENIED));
        assert!(e.is_ack() && !e.is_transient());
        assert!(error.to_string().contains("0x80070005"), "{error}");
        assert_eq!(server.kinds(), ["Ping", "Create-Session"]);
        assert_eq!(server.read("taken.bin"), b"old");
    })
    .await;
}

#[tokio::test]
async fn a_file_over_the_size_limit_fails_at_once_with_too_large() {
    within(async {
        let server = Server::start(|b| b.max_upload_size(1000)).await;
        let reports = Reports::default();
        let started = Instant::now();
        let error = client()
            .upload(
                server.url("/big.bin"),
                UploadSource::bytes(vec![7u8; 10_000]),
            )
            .fragment_size(8 * 1024)
            .on_progress(reports.callback())
            .await
            .expect_err("too large");
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(matches!(error, Error::Server(_)), "{error:?}");
        assert_eq!(error.code(), Some(Hresult::BG_E_TOO_LARGE));
        assert_eq!(error.code().unwrap().0, 0x8020_0020);
        assert!(error.to_string().contains("0x80200020"), "{error}");
        let fragments = server
            .kinds()
            .into_iter()
            .filter(|k| k == "Fragment")
            .count();
        assert_eq!(fragments, 1, "not retried");
        assert!(reports.all().iter().all(|p| p.retries == 0));
        assert!(!server.root.join("big.bin").exists());
    })
    .await;
}

#[tokio::test]
async fn cancelling_tells_the_server_which_forgets_everything() {
    within(async {
        let server = Server::start(|b| b).await;
        let fired = Arc::new(Notify::new());
        let session = Arc::new(Mutex::new(None::<String>));
        let (fire, seen) = (fired.clone(), session.clone());
        let signal = fired.clone();
        let error = client()
            .upload(
                server.url("/cancelled.bin"),
                UploadSource::bytes(random_bytes(1 << 20, 4)),
            )
            .fragment_size(64 * 1024)
            .on_progress(move |p| {
                // After the first Ack that took bytes, a session surely exists.
                if p.acknowledged > 0 {
                    *seen.lock().unwrap() = p.session_id.clone();
                    fire.notify_one();
                }
            })
            .cancel_on(async move { signal.notified().await })
            .await
            .expect_err("cancelled");
        assert!(matches!(error, Error::Cancelled), "{error:?}");
        let id = session.lock().unwrap().clone().expect("a session id");
        let packets = server.packets();
        let cancels: Vec<&Packet> = packets
            .iter()
            .filter(|p| p.kind == "Cancel-Session")
            .collect();
        assert_eq!(cancels.len(), 1, "{packets:?}");
        assert_eq!(cancels[0].session.as_deref(), Some(id.as_str()));
        assert!(packets.iter().filter(|p| p.kind == "Fragment").count() < 16);
        assert!(packets.iter().all(|p| p.kind != "Close-Session"));
        // Nothing staged, nothing committed, and the session is gone.
        assert_eq!(server.parts(), Vec::<PathBuf>::new());
        assert!(!server.root.join("cancelled.bin").exists());
        let (status, code) = server.probe_session("/cancelled.bin", &id).await;
        assert_eq!(
            (status, code.as_deref()),
            (500, Some("0x8020001F")),
            "the cancelled session still answers"
        );

        // Cancelling a session the server never heard of is fine.
        client()
            .cancel_session(
                &server.url("/cancelled.bin"),
                "{01234567-89AB-4CDE-8F01-23456789ABCD}",
            )
            .await
            .expect("an unknown session counts as cancelled");
    })
    .await;
}

#[tokio::test]
async fn a_dropped_upload_resumes_its_session_without_resending_everything() {
    within(async {
        let server = Server::start(|b| b).await;
        let total = 1 << 20;
        let bytes = random_bytes(total, 5);
        let url = server.url("/resumed.bin");
        let halfway = Arc::new(Notify::new());
        let session = Arc::new(Mutex::new(None::<String>));
        let (reached, seen) = (halfway.clone(), session.clone());
        let first = client()
            .upload(&url, UploadSource::bytes(bytes.clone()))
            .fragment_size(64 * 1024)
            .on_progress(move |p| {
                if p.session_id.is_some() {
                    seen.lock().unwrap().clone_from(&p.session_id);
                }
                if p.acknowledged >= 4 * 64 * 1024 {
                    reached.notify_one();
                }
            });
        tokio::select! {
            outcome = first => panic!("the upload finished before it was dropped: {outcome:?}"),
            () = halfway.notified() => {}
        }
        let id = session.lock().unwrap().clone().expect("a session id");
        assert!(!server.root.join("resumed.bin").exists());

        let reports = Reports::default();
        let uploaded = builder()
            .header("x-test-run", "second")
            .build()
            .unwrap()
            .upload(&url, UploadSource::bytes(bytes.clone()))
            .fragment_size(64 * 1024)
            .resume(id.clone())
            .on_progress(reports.callback())
            .await
            .expect("resumed upload");
        assert_eq!(uploaded.session_id, id);
        assert_eq!(uploaded.restarts, 0);
        assert_eq!(server.read("resumed.bin"), bytes);
        assert_eq!(server.parts(), Vec::<PathBuf>::new());
        let after: Vec<Packet> = server
            .packets()
            .into_iter()
            .filter(|p| p.run.as_deref() == Some("second"))
            .collect();
        assert_eq!(
            after[0].range.as_deref(),
            Some("bytes 0-0/1048576"),
            "a probe"
        );
        assert!(
            after.iter().all(|p| p.kind != "Create-Session"),
            "{after:?}"
        );
        assert!(after.iter().all(|p| p.session.as_deref() == Some(&*id)));
        // After the probe, the fragments go on from where the server was, at least the four
        // fragments acknowledged before the drop.
        assert!(after[1].start().unwrap() >= 4 * 64 * 1024, "{:?}", after[1]);
        let resent: u64 = after
            .iter()
            .filter(|p| p.kind == "Fragment")
            .map(|p| p.len)
            .sum();
        assert!(
            resent < total as u64,
            "the second run sent {resent} bytes: {after:?}"
        );
        // Dropping the future is not cancelling: no Cancel-Session was ever sent.
        assert!(!server.packets().iter().any(|p| p.kind == "Cancel-Session"));
        assert!(reports.all().iter().all(|p| p.acknowledged <= total as u64));
    })
    .await;
}

/// Replies with the upload's bytes reversed.
async fn reverse(upload: CompletedUpload) -> Result<Completion, CompletionError> {
    let mut staged = tokio::fs::read(&upload.staged_path)
        .await
        .map_err(CompletionError::failed)?;
    staged.reverse();
    Ok(Completion::reply(AppReply::Bytes(staged.into())))
}

#[tokio::test]
async fn upload_reply_jobs_get_their_reply_in_memory_or_in_a_file() {
    within(async {
        let server = Server::start(|b| b.upload_reply_handler(reverse)).await;
        let bytes = random_bytes(300_000, 6);
        let mut reversed = bytes.clone();
        reversed.reverse();

        let uploaded = upload_bytes(server.url("/r1.bin"), &bytes, 64 * 1024)
            .reply_in_memory(1 << 20)
            .await
            .expect("upload-reply");
        let url = uploaded.reply_url.clone().expect("a reply URL");
        let reply = uploaded.reply.expect("a reply");
        assert_eq!(reply.url, url);
        assert_eq!(reply.len, bytes.len() as u64);
        assert!(
            reply.body.as_deref() == Some(&reversed[..]),
            "reply differs"
        );
        assert!(reply.path.is_none());

        let local = tempfile::tempdir().unwrap();
        let target = local.path().join("reply.bin");
        let uploaded = upload_bytes(server.url("/r2.bin"), &bytes, 64 * 1024)
            .reply_to_file(&target)
            .await
            .expect("upload-reply to a file");
        assert!(uploaded.reply_url.is_some());
        let reply = uploaded.reply.expect("a reply");
        assert_eq!(reply.path.as_deref(), Some(target.as_path()));
        assert!(reply.body.is_none());
        assert!(std::fs::read(&target).unwrap() == reversed, "reply differs");

        // An empty upload gets its (empty) reply too.
        let uploaded = client()
            .upload(server.url("/r3.bin"), UploadSource::bytes(Vec::new()))
            .reply_in_memory(1 << 20)
            .await
            .expect("empty upload-reply");
        assert_eq!(uploaded.reply.expect("a reply").len, 0);

        // Every session was closed after its reply was fetched.
        let kinds = server.kinds();
        assert_eq!(kinds.iter().filter(|k| *k == "Close-Session").count(), 3);
        assert_eq!(server.parts(), Vec::<PathBuf>::new());
    })
    .await;
}

#[tokio::test]
async fn asking_a_server_without_replies_for_one_is_no_reply_url() {
    within(async {
        let server = Server::start(|b| b).await;
        let bytes = random_bytes(20_000, 7);
        let error = upload_bytes(server.url("/plain.bin"), &bytes, 8 * 1024)
            .reply_in_memory(1 << 20)
            .await
            .expect_err("no reply URL");
        assert!(matches!(error, Error::NoReplyUrl), "{error:?}");
        // The upload itself went through, and the session was closed.
        assert_eq!(server.read("plain.bin"), bytes);
        assert_eq!(
            server.kinds().last().map(String::as_str),
            Some("Close-Session")
        );
        assert_eq!(server.parts(), Vec::<PathBuf>::new());
    })
    .await;
}

#[tokio::test]
async fn the_session_follows_the_host_id() {
    within(async {
        let server = Server::start(|b| b.host_id("127.0.0.1")).await;
        let port = server.addr.port();
        let bytes = random_bytes(40_000, 8);
        let url = format!("http://localhost:{port}/hosted.bin");
        client()
            .upload(&url, UploadSource::bytes(bytes.clone()))
            .fragment_size(16 * 1024)
            .await
            .expect("upload");
        assert_eq!(server.read("hosted.bin"), bytes);
        let (original, moved) = (format!("localhost:{port}"), format!("127.0.0.1:{port}"));
        let seen: Vec<(String, String)> = server
            .packets()
            .into_iter()
            .map(|p| (p.kind, p.host))
            .collect();
        let expected: Vec<(String, String)> = [
            ("Ping", &original),
            ("Create-Session", &original),
            ("Ping", &moved),
            ("Fragment", &moved),
            ("Fragment", &moved),
            ("Fragment", &moved),
            ("Close-Session", &moved),
        ]
        .into_iter()
        .map(|(k, h)| (k.to_owned(), h.clone()))
        .collect();
        assert_eq!(seen, expected);
    })
    .await;
}

#[tokio::test]
async fn a_session_the_server_forgot_starts_over_from_zero() {
    within(async {
        // Sessions expire after 500 ms idle: the sweeper runs, once they have, just before
        // the third Fragment reaches the layer, so the server has forgotten the session (and
        // deleted its data) when that Fragment arrives.
        let server = Server::start_with(
            // Long enough that the packets before the third never find their session expired
            // (a packet past the timeout finds it gone, whatever the sweeper does).
            |b| b.session_timeout(Duration::from_millis(500)),
            |layer| {
                let sweeper = layer.sweeper();
                let fragments = Arc::new(Mutex::new(0));
                let hook: Hook = Arc::new(move |packet: Packet| {
                    let (sweeper, fragments) = (sweeper.clone(), fragments.clone());
                    Box::pin(async move {
                        let n = {
                            let mut n = fragments.lock().unwrap();
                            *n += usize::from(packet.kind == "Fragment");
                            *n
                        };
                        if packet.kind == "Fragment" && n == 3 {
                            // Until the clock has moved past the timeout.
                            while sweeper.sweep().await.expect("sweep").expired == 0 {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    })
                });
                Some(hook)
            },
        )
        .await;
        let bytes = random_bytes(100_000, 9);
        let reports = Reports::default();
        let uploaded = upload_bytes(server.url("/again.bin"), &bytes, 16 * 1024)
            .on_progress(reports.callback())
            .await
            .expect("upload");
        assert_eq!(uploaded.restarts, 1);
        assert_eq!(server.read("again.bin"), bytes);
        let packets = server.packets();
        let creates: Vec<usize> = packets
            .iter()
            .enumerate()
            .filter(|(_, p)| p.kind == "Create-Session")
            .map(|(i, _)| i)
            .collect();
        assert_eq!(creates.len(), 2, "{packets:?}");
        // After the second Create-Session: a new session, from byte 0.
        let restarted = &packets[creates[1] + 1..];
        let first = restarted.iter().find(|p| p.kind == "Fragment").unwrap();
        assert_eq!(first.start(), Some(0), "{first:?}");
        assert_eq!(first.session.as_deref(), Some(uploaded.session_id.as_str()));
        assert_ne!(packets[creates[0] + 2].session, first.session);
        assert_eq!(reports.all().last().unwrap().restarts, 1);
        assert_eq!(server.parts(), Vec::<PathBuf>::new());
    })
    .await;
}

#[tokio::test]
async fn resuming_a_session_the_server_does_not_know_starts_over() {
    within(async {
        let server = Server::start(|b| b).await;
        let bytes = random_bytes(30_000, 30);
        let unknown = "{0BADBEEF-0000-4000-8000-000000000000}";
        let uploaded = upload_bytes(server.url("/unknown.bin"), &bytes, 16 * 1024)
            .resume(unknown)
            .await
            .expect("upload");
        assert_eq!(uploaded.restarts, 1);
        assert_ne!(uploaded.session_id, unknown);
        assert_eq!(server.read("unknown.bin"), bytes);
        // The 1-byte probe, then a new session from byte 0.
        let packets = server.packets();
        assert_eq!(packets[0].range.as_deref(), Some("bytes 0-0/30000"));
        assert_eq!(packets[0].session.as_deref(), Some(unknown));
        assert_eq!(packets[1].kind, "Create-Session");
        assert_eq!(packets[2].start(), Some(0));
    })
    .await;
}

#[tokio::test]
async fn a_file_that_changes_or_a_short_stream_fails_the_upload() {
    within(async {
        let server = Server::start(|b| b).await;
        let local = tempfile::tempdir().unwrap();
        let path = local.path().join("growing.bin");
        std::fs::write(&path, random_bytes(40_000, 31)).unwrap();
        let grow = path.clone();
        let grown = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let error = client()
            .upload(
                server.url("/growing.bin"),
                UploadSource::file(&path).await.unwrap(),
            )
            .fragment_size(8192)
            .on_progress(move |p| {
                use std::io::Write as _;
                if p.acknowledged > 0 && !grown.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    let mut file = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&grow)
                        .unwrap();
                    file.write_all(b"more").unwrap();
                }
            })
            .await
            .expect_err("the file changed");
        assert!(
            matches!(&error, Error::LocalFileChanged { path: p } if *p == path),
            "{error:?}"
        );
        assert!(!server.root.join("growing.bin").exists());

        let error = client()
            .upload(
                server.url("/short.bin"),
                UploadSource::reader(std::io::Cursor::new(vec![1u8; 10_000]), 20_000),
            )
            .fragment_size(8192)
            .await
            .expect_err("the stream is short");
        assert!(matches!(error, Error::Source { .. }), "{error:?}");
        assert!(!server.root.join("short.bin").exists());
    })
    .await;
}

#[tokio::test]
async fn a_reply_over_the_memory_limit_is_reply_too_large() {
    within(async {
        let server = Server::start(|b| b.upload_reply_handler(reverse)).await;
        let error = client()
            .upload(
                server.url("/big-reply.bin"),
                UploadSource::bytes(random_bytes(30_000, 32)),
            )
            .fragment_size(16 * 1024)
            .reply_in_memory(1000)
            .await
            .expect_err("too large");
        assert!(
            matches!(error, Error::ReplyTooLarge { limit: 1000 }),
            "{error:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_failed_reply_download_still_releases_the_session() {
    within(async {
        let server = Server::start(|b| b.upload_reply_handler(reverse)).await;
        let error = client()
            .upload(
                server.url("/released.bin"),
                UploadSource::bytes(random_bytes(30_000, 33)),
            )
            .fragment_size(16 * 1024)
            .reply_in_memory(1000)
            .await
            .expect_err("too large");
        assert!(matches!(error, Error::ReplyTooLarge { .. }), "{error:?}");
        // The server holds the staged upload and the reply until the session ends; the client
        // must end it (Close-Session as for NoReplyUrl, or Cancel-Session), not leave it to the
        // session timeout (14 days by default): the error does not even carry the session id.
        let kinds = server.kinds();
        assert!(
            matches!(
                kinds.last().map(String::as_str),
                Some("Close-Session" | "Cancel-Session")
            ),
            "{kinds:?}"
        );
        assert_eq!(server.parts(), Vec::<PathBuf>::new());
    })
    .await;
}

#[tokio::test]
async fn an_empty_reply_and_parallel_uploads_on_one_client() {
    within(async {
        let server = Server::start(|b| {
            b.upload_reply_handler(|_: CompletedUpload| async {
                Ok::<_, CompletionError>(Completion::reply(AppReply::None))
            })
        })
        .await;
        let client = client();
        let (a, b) = (random_bytes(70_000, 34), random_bytes(90_000, 35));
        let (one, two) = tokio::join!(
            client
                .upload(server.url("/p1.bin"), UploadSource::bytes(a.clone()))
                .fragment_size(16 * 1024)
                .reply_in_memory(1 << 20),
            client
                .upload(server.url("/p2.bin"), UploadSource::bytes(b.clone()))
                .fragment_size(16 * 1024)
                .reply_in_memory(1 << 20),
        );
        let (one, two) = (one.expect("first"), two.expect("second"));
        assert_ne!(one.session_id, two.session_id);
        for uploaded in [one, two] {
            let reply = uploaded.reply.expect("a reply");
            assert_eq!(reply.len, 0);
            assert_eq!(reply.body.as_deref(), Some(&[][..]));
        }
        assert_eq!(server.parts(), Vec::<PathBuf>::new());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Part B harness: a scripted IIS-like peer over hand-written HTTP/1.1

/// One request as the peer read it.
#[derive(Debug, Clone)]
struct Seen {
    conn: usize,
    method: String,
    target: String,
    /// Names as sent, in order.
    headers: Vec<(String, String)>,
    /// Body bytes the peer actually read.
    body_len: usize,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `BITS-Packet-Type`, or the method for other requests.
    fn packet(&self) -> &str {
        self.header("BITS-Packet-Type").unwrap_or(&self.method)
    }

    fn content_length(&self) -> usize {
        self.header("Content-Length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// `Content-Range` as `[start, end)` of `total`.
    fn range(&self) -> Option<(u64, u64, u64)> {
        let spec = self.header("Content-Range")?.strip_prefix("bytes ")?;
        let (span, total) = spec.split_once('/')?;
        let total = total.parse().ok()?;
        if span == "*" {
            return Some((0, 0, total));
        }
        let (first, last) = span.split_once('-')?;
        let (first, last): (u64, u64) = (first.parse().ok()?, last.parse().ok()?);
        Some((first, last + 1, total))
    }

    fn session(&self) -> Option<&str> {
        self.header("BITS-Session-Id")
    }
}

/// An answer: status, headers in wire order and spelling, body.
#[derive(Debug, Clone)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            206 => "Partial Content",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Request Entity Too Large",
            416 => "Requested Range Not Satisfiable",
            500 => "Internal Server Error",
            502 => "Bad Gateway",
            503 => "Service Unavailable",
            _ => "Whatever",
        };
        let mut head = format!("HTTP/1.1 {} {reason}\r\n", self.status);
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if !self
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// An Ack (`BITS-Packet-Type: Ack`, `Content-Length: 0`) with these headers in between.
fn ack(status: u16, extra: &[(&str, &str)]) -> Resp {
    let mut resp = Resp::new(status).header("BITS-Packet-Type", "Ack");
    for (name, value) in extra {
        resp = resp.header(name, *value);
    }
    resp.header("Content-Length", "0")
}

/// An error Ack with this `BITS-Error-Code` and context 0x5.
fn error_ack(status: u16, code: &str) -> Resp {
    ack(
        status,
        &[("BITS-Error-Code", code), ("BITS-Error-Context", "0x5")],
    )
}

/// What the peer does with a request, decided when its head has been read.
enum Act {
    /// What IIS would do.
    Default,
    /// Read the body, answer this.
    Reply(Resp),
    /// Read this many body bytes (kept, as a server that keeps a partial body does), then
    /// close the connection without answering.
    DropAfter(usize),
    /// Read the body, write these bytes, close the connection.
    Raw(Vec<u8>),
    /// Read the body and never answer (until the client gives up on the connection).
    Hang,
}

#[derive(Debug, Default)]
struct PeerSession {
    target: String,
    data: Vec<u8>,
    total: Option<u64>,
}

/// The peer's server state: what IIS would keep.
#[derive(Debug, Default)]
struct Iis {
    sessions: HashMap<String, PeerSession>,
    /// Session ids handed out, in order.
    created: Vec<String>,
    /// Closed, complete uploads by request target.
    files: HashMap<String, Vec<u8>>,
    /// Upload-reply: every completed upload gets this reply.
    reply: Option<Vec<u8>>,
    /// Reply bodies by request target.
    replies: HashMap<String, Vec<u8>>,
    /// Sent on the next Create-Session Ack: `BITS-Host-Id` and its fallback timeout.
    host_id: Option<(String, String)>,
    /// Upload-reply: this `BITS-Reply-URL` instead of IIS's relative one.
    reply_url: Option<String>,
}

const ETAG: &str = "\"reply-v1\"";

impl Iis {
    fn handle(&mut self, req: &Seen, body: &[u8]) -> Resp {
        if req.method == "GET" {
            return self.get(req);
        }
        if req.method != "BITS_POST" {
            return Resp::new(405).header("Allow", "GET, BITS_POST");
        }
        match req.packet() {
            "Ping" => ack(200, &[]),
            "Create-Session" => {
                let offered = req.header("BITS-Supported-Protocols").unwrap_or("");
                if !offered.to_ascii_lowercase().contains(&PROTOCOL[1..37]) {
                    return error_ack(400, "0x80070057");
                }
                let id = uuid::Uuid::new_v4().braced().to_string().to_uppercase();
                self.created.push(id.clone());
                self.sessions.insert(
                    id.clone(),
                    PeerSession {
                        target: req.target.clone(),
                        ..PeerSession::default()
                    },
                );
                let mut resp = Resp::new(200)
                    .header("BITS-Packet-Type", "Ack")
                    .header("BITS-Protocol", PROTOCOL)
                    .header("BITS-Session-Id", id)
                    .header("Accept-encoding", "identity");
                if let Some((host, fallback)) = self.host_id.take() {
                    resp = resp
                        .header("BITS-Host-Id", host)
                        .header("BITS-Host-Id-Fallback-Timeout", fallback);
                }
                resp.header("Content-Length", "0")
            }
            "Fragment" => self.fragment(req, body),
            "Close-Session" => {
                let Some(session) = req.session().and_then(|id| self.sessions.remove(id)) else {
                    return error_ack(500, "0x8020001F");
                };
                if session.total == Some(session.data.len() as u64) {
                    self.files.insert(session.target, session.data);
                }
                ack(200, &[])
            }
            "Cancel-Session" => {
                if let Some(id) = req.session() {
                    self.sessions.remove(id);
                }
                ack(200, &[])
            }
            _ => error_ack(400, "0x80070057"),
        }
    }

    /// Section 5.2: append, skip overlap, 416 on a gap; no session id on the Ack (IIS 6).
    fn fragment(&mut self, req: &Seen, body: &[u8]) -> Resp {
        let Some(id) = req.session().map(str::to_owned) else {
            return error_ack(400, "0x80070057");
        };
        let Some(session) = self.sessions.get_mut(&id) else {
            return error_ack(500, "0x8020001F");
        };
        let Some((first, end, total)) = req.range() else {
            return error_ack(400, "0x80070057");
        };
        if end - first != body.len() as u64 {
            return error_ack(400, "0x80070057");
        }
        session.total = Some(total);
        let received = session.data.len() as u64;
        if first > received {
            let received = received.to_string();
            return ack(
                416,
                &[
                    ("BITS-Received-Content-Range", &received),
                    ("BITS-Error-Code", "0x0"),
                    ("BITS-Error-Context", "0x5"),
                ],
            );
        }
        let skip = (received - first) as usize;
        if skip < body.len() {
            session.data.extend_from_slice(&body[skip..]);
        }
        let received = session.data.len() as u64;
        let text = received.to_string();
        if received == total {
            if let Some(reply) = self.reply.clone() {
                let dir = session.target.rsplit_once('/').map_or("", |(d, _)| d);
                let inner = id.trim_start_matches('{').trim_end_matches('}');
                self.replies.insert(
                    format!("{dir}/BITS-Sessions/Replies/%7B{inner}%7D/responsefile.bin"),
                    reply,
                );
                let url = self
                    .reply_url
                    .clone()
                    .unwrap_or_else(|| format!("BITS-Sessions\\Replies\\{id}\\responsefile.bin"));
                return ack(
                    200,
                    &[
                        ("BITS-Received-Content-Range", &text),
                        ("BITS-Reply-URL", &url),
                    ],
                );
            }
        }
        ack(200, &[("BITS-Received-Content-Range", &text)])
    }

    /// A partially read fragment body: keep what continues the file.
    fn keep_partial(&mut self, req: &Seen, body: &[u8]) {
        let (Some(id), Some((first, _, total))) = (req.session(), req.range()) else {
            return;
        };
        if let Some(session) = self.sessions.get_mut(id) {
            session.total = Some(total);
            let received = session.data.len() as u64;
            let skip = received.saturating_sub(first) as usize;
            if first <= received && skip < body.len() {
                session.data.extend_from_slice(&body[skip..]);
            }
        }
    }

    /// The reply file: `Range: bytes=N-` answered 206 with a strong ETag; a stale `If-Range`
    /// gets the whole reply.
    fn get(&self, req: &Seen) -> Resp {
        let Some(reply) = self.replies.get(&req.target) else {
            return Resp::new(404).body("not found");
        };
        let len = reply.len();
        let from = req
            .header("Range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<usize>().ok());
        let fresh = req.header("If-Range").is_none_or(|v| v == ETAG);
        match from {
            Some(from) if fresh && from < len => Resp::new(206)
                .header("Content-Range", format!("bytes {from}-{}/{len}", len - 1))
                .header("ETag", ETAG)
                .body(reply[from..].to_vec()),
            Some(_) if fresh => Resp::new(416).header("Content-Range", format!("bytes */{len}")),
            _ => Resp::new(200).header("ETag", ETAG).body(reply.clone()),
        }
    }
}

type Script = Box<dyn FnMut(&Seen, &mut Iis) -> Act + Send>;

struct PeerState {
    iis: Iis,
    log: Vec<Seen>,
    script: Script,
}

struct Peer {
    addr: SocketAddr,
    state: Arc<Mutex<PeerState>>,
}

impl Peer {
    /// A peer on 127.0.0.1 whose answers `script` may override.
    async fn start(script: impl FnMut(&Seen, &mut Iis) -> Act + Send + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(PeerState {
            iis: Iis::default(),
            log: Vec::new(),
            script: Box::new(script),
        }));
        let shared = state.clone();
        tokio::spawn(async move {
            let mut conn = 0;
            while let Ok((stream, _)) = listener.accept().await {
                conn += 1;
                tokio::spawn(serve_conn(stream, shared.clone(), conn));
            }
        });
        Self { addr, state }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn with<R>(&self, f: impl FnOnce(&mut Iis) -> R) -> R {
        f(&mut self.state.lock().unwrap().iis)
    }

    fn log(&self) -> Vec<Seen> {
        self.state.lock().unwrap().log.clone()
    }

    fn kinds(&self) -> Vec<String> {
        self.log().iter().map(|s| s.packet().to_owned()).collect()
    }

    fn fragments(&self) -> Vec<Seen> {
        self.log()
            .into_iter()
            .filter(|s| s.packet() == "Fragment")
            .collect()
    }

    fn file(&self, target: &str) -> Option<Vec<u8>> {
        self.with(|iis| iis.files.get(target).cloned())
    }

    /// Uploads `bytes` to `path` in `fragment`-byte fragments and checks the peer got them.
    async fn upload_checked(&self, path: &str, bytes: &[u8], fragment: u64) -> Uploaded {
        let uploaded = upload_bytes(self.url(path), bytes, fragment)
            .await
            .expect("upload");
        assert_eq!(self.file(path).as_deref(), Some(bytes), "{path} differs");
        uploaded
    }
}

/// Reads until `buf` holds `\r\n\r\n`; the head's length. `None` at EOF.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i);
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads up to `n` body bytes (fewer at EOF).
async fn read_body(stream: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Vec<u8> {
    while buf.len() < n {
        let mut chunk = [0u8; 65536];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    let take = n.min(buf.len());
    buf.drain(..take).collect()
}

async fn serve_conn(mut stream: TcpStream, state: Arc<Mutex<PeerState>>, conn: usize) {
    let mut buf = Vec::new();
    loop {
        let Some(head_end) = read_head(&mut stream, &mut buf).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split(' ');
        let mut seen = Seen {
            conn,
            method: request_line.next().unwrap_or_default().to_owned(),
            target: request_line.next().unwrap_or_default().to_owned(),
            headers: lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                .collect(),
            body_len: 0,
        };
        let len = seen.content_length();
        let act = {
            let mut guard = state.lock().unwrap();
            let PeerState { iis, script, .. } = &mut *guard;
            script(&seen, iis)
        };
        let want = match act {
            Act::DropAfter(n) => n.min(len),
            _ => len,
        };
        let body = read_body(&mut stream, &mut buf, want).await;
        seen.body_len = body.len();
        let (bytes, close) = {
            let mut guard = state.lock().unwrap();
            guard.log.push(seen.clone());
            if body.len() < want {
                return;
            }
            match act {
                Act::Default => (guard.iis.handle(&seen, &body).to_bytes(), false),
                Act::Reply(resp) => (resp.to_bytes(), false),
                Act::DropAfter(_) => {
                    guard.iis.keep_partial(&seen, &body);
                    return;
                }
                Act::Raw(bytes) => (bytes, true),
                Act::Hang => (Vec::new(), true),
            }
        };
        if bytes.is_empty() && close {
            // Hang: wait for the client to close its end.
            let _ = stream.read(&mut [0u8; 1]).await;
            return;
        }
        if stream.write_all(&bytes).await.is_err() {
            return;
        }
        if close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// Counts calls of one packet type inside a script.
fn nth(counter: &mut usize, req: &Seen, packet: &str) -> usize {
    if req.packet() == packet {
        *counter += 1;
        *counter
    } else {
        0
    }
}

/// Fragment starts as sent.
fn starts(fragments: &[Seen]) -> Vec<u64> {
    fragments
        .iter()
        .map(|f| f.range().expect("Content-Range").0)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Part B: against the scripted peer

#[tokio::test]
async fn iis_happy_path_has_the_exact_packet_sequence() {
    within(async {
        let peer = Peer::start(|_, _| Act::Default).await;
        let bytes = random_bytes(20_000, 20);
        let uploaded = client()
            .upload(
                peer.url("/up/report.bin"),
                UploadSource::bytes(bytes.clone()).with_name("report.bin"),
            )
            .fragment_size(8192)
            .await
            .expect("upload");
        let id = peer.with(|iis| iis.created.clone());
        assert_eq!(id.len(), 1);
        let id = &id[0];
        assert_eq!(&uploaded.session_id, id, "the id is kept verbatim");
        assert_eq!(peer.file("/up/report.bin").as_deref(), Some(&bytes[..]));

        let log = peer.log();
        let kinds: Vec<&str> = log.iter().map(Seen::packet).collect();
        assert_eq!(
            kinds,
            [
                "Ping",
                "Create-Session",
                "Fragment",
                "Fragment",
                "Fragment",
                "Close-Session"
            ]
        );
        for req in &log {
            assert_eq!(req.method, "BITS_POST", "{req:?}");
            assert_eq!(req.target, "/up/report.bin", "{req:?}");
            let length = req.header("Content-Length").expect("Content-Length");
            assert_eq!(length, req.body_len.to_string(), "{req:?}");
            if req.packet() != "Fragment" {
                assert_eq!(length, "0", "{req:?}");
                assert!(req.header("Content-Range").is_none(), "{req:?}");
            }
            assert!(req.header("Content-Encoding").is_none(), "{req:?}");
        }
        assert!(log[0].session().is_none() && log[1].session().is_none());
        assert_eq!(log[1].header("BITS-Supported-Protocols"), Some(PROTOCOL));
        let ranges: Vec<&str> = log[2..5]
            .iter()
            .map(|f| f.header("Content-Range").unwrap())
            .collect();
        assert_eq!(
            ranges,
            [
                "bytes 0-8191/20000",
                "bytes 8192-16383/20000",
                "bytes 16384-19999/20000"
            ]
        );
        for req in &log[2..] {
            assert_eq!(req.session(), Some(id.as_str()), "{req:?}");
        }
        for req in &log[2..5] {
            assert_eq!(req.header("Content-Name"), Some("report.bin"));
        }
    })
    .await;
}

#[tokio::test]
async fn iis_resync_follows_received_down_on_416_and_up_on_200() {
    within(async {
        let bytes = random_bytes(40_000, 21);
        let known = bytes.clone();
        let mut fragments = 0;
        let peer = Peer::start(move |req, iis| {
            let n = nth(&mut fragments, req, "Fragment");
            let id = req.session().unwrap_or_default().to_owned();
            if let Some(session) = iis.sessions.get_mut(&id) {
                match n {
                    // The peer lost bytes: it holds 4096, the client sends from 8192 → 416.
                    2 => session.data.truncate(4096),
                    // The peer had more than the client knew: it holds 30,000 → 200, 30000.
                    4 => session.data = known[..30_000].to_vec(),
                    _ => {}
                }
            }
            Act::Default
        })
        .await;
        let uploaded = peer.upload_checked("/up/resync.bin", &bytes, 8192).await;
        assert_eq!(
            starts(&peer.fragments()),
            [0, 8192, 4096, 12288, 30_000, 38_192]
        );
        assert_eq!((uploaded.retries, uploaded.restarts), (0, 0));
    })
    .await;
}

#[tokio::test]
async fn iis_connection_dropped_mid_fragment_is_retried_from_the_peer_offset() {
    within(async {
        let mut fragments = 0;
        let peer = Peer::start(move |req, _| match nth(&mut fragments, req, "Fragment") {
            2 => Act::DropAfter(5000),
            _ => Act::Default,
        })
        .await;
        let bytes = random_bytes(40_000, 22);
        let uploaded = peer
            .upload_checked("/up/dropped.bin", &bytes, 16 * 1024)
            .await;
        let sent = peer.fragments();
        assert_eq!(sent[1].body_len, 5000, "the peer read part of fragment 2");
        // Fragment 2 again from its start (the last Ack), then on from the peer's offset.
        assert_eq!(starts(&sent), [0, 16_384, 16_384, 32_768]);
        assert!(uploaded.retries >= 1, "{uploaded:?}");
        assert_eq!(uploaded.restarts, 0);
    })
    .await;
}

#[tokio::test]
async fn iis_busy_and_proxy_errors_are_retried() {
    within(async {
        let mut fragments = 0;
        let peer = Peer::start(move |req, _| match nth(&mut fragments, req, "Fragment") {
            2 => Act::Reply(error_ack(503, "0x800700AA")),
            3 => Act::Reply(
                Resp::new(502)
                    .header("Content-Type", "text/html")
                    .body("<html><body>Bad Gateway</body></html>"),
            ),
            _ => Act::Default,
        })
        .await;
        let bytes = random_bytes(30_000, 23);
        let reports = Reports::default();
        let uploaded = upload_bytes(peer.url("/up/busy.bin"), &bytes, 16 * 1024)
            .on_progress(reports.callback())
            .await
            .expect("upload");
        assert!(uploaded.retries >= 2, "{uploaded:?}");
        assert_eq!(uploaded.restarts, 0);
        assert_eq!(peer.file("/up/busy.bin").as_deref(), Some(&bytes[..]));
        assert_eq!(starts(&peer.fragments()), [0, 16_384, 16_384, 16_384]);
        let retrying: Vec<String> = reports
            .all()
            .into_iter()
            .filter_map(|p| match p.phase {
                UploadPhase::Retrying { error, .. } => Some(error),
                _ => None,
            })
            .collect();
        assert!(
            retrying.iter().any(|e| e.contains("0x800700AA")),
            "{retrying:?}"
        );
        assert!(retrying.iter().any(|e| e.contains("502")), "{retrying:?}");
    })
    .await;
}

#[tokio::test]
async fn iis_close_session_500_is_sent_again() {
    within(async {
        let mut closes = 0;
        let peer = Peer::start(move |req, _| match nth(&mut closes, req, "Close-Session") {
            1 => Act::Reply(error_ack(500, "0x80004005")),
            _ => Act::Default,
        })
        .await;
        let bytes = random_bytes(10_000, 24);
        let uploaded = peer.upload_checked("/up/close.bin", &bytes, 8192).await;
        assert_eq!(
            peer.kinds(),
            [
                "Ping",
                "Create-Session",
                "Fragment",
                "Fragment",
                "Close-Session",
                "Close-Session"
            ]
        );
        assert_eq!(uploaded.restarts, 0);
        assert!(uploaded.retries >= 1);
    })
    .await;
}

#[tokio::test]
async fn iis_close_session_not_found_starts_the_upload_over() {
    within(async {
        let mut closes = 0;
        let peer = Peer::start(move |req, _| match nth(&mut closes, req, "Close-Session") {
            1 => Act::Reply(error_ack(500, "0x8020001F")),
            _ => Act::Default,
        })
        .await;
        let bytes = random_bytes(10_000, 25);
        let uploaded = peer.upload_checked("/up/lost.bin", &bytes, 8192).await;
        assert_eq!(uploaded.restarts, 1);
        assert_eq!(
            peer.kinds(),
            [
                "Ping",
                "Create-Session",
                "Fragment",
                "Fragment",
                "Close-Session",
                "Create-Session",
                "Fragment",
                "Fragment",
                "Close-Session"
            ]
        );
        let created = peer.with(|iis| iis.created.clone());
        assert_eq!(uploaded.session_id, created[1]);
        assert_eq!(starts(&peer.fragments()), [0, 8192, 0, 8192]);
    })
    .await;
}

#[tokio::test]
async fn a_plain_web_server_is_not_mistaken_for_bits() {
    within(async {
        let page = Peer::start(|_, _| {
            Act::Reply(
                Resp::new(200)
                    .header("Content-Type", "text/html")
                    .body("<html>welcome</html>"),
            )
        })
        .await;
        let error = client()
            .upload(page.url("/up/x.bin"), UploadSource::bytes(vec![1u8; 100]))
            .await
            .expect_err("not BITS");
        let Error::InvalidResponse { reason, .. } = &error else {
            panic!("{error:?}")
        };
        assert!(reason.contains("BITS"), "{reason}");
        assert!(error.to_string().contains("BITS"), "{error}");
        assert_eq!(page.log().len(), 1, "not retried");

        let refusing = Peer::start(|_, _| {
            Act::Reply(
                Resp::new(405)
                    .header("Allow", "GET, HEAD, POST")
                    .body("Method Not Allowed"),
            )
        })
        .await;
        let error = client()
            .upload(
                refusing.url("/up/x.bin"),
                UploadSource::bytes(vec![1u8; 100]),
            )
            .await
            .expect_err("405");
        let Error::Server(e) = &error else {
            panic!("{error:?}")
        };
        assert_eq!(e.status(), 405);
        assert!(!e.is_ack() && !e.is_transient());
        assert!(e.hint().contains("BITS_POST"), "{}", e.hint());
        assert_eq!(refusing.log().len(), 1, "not retried");
    })
    .await;
}

#[tokio::test]
async fn iis_session_not_found_in_lower_case_without_0x_restarts() {
    within(async {
        let mut fragments = 0;
        let peer = Peer::start(move |req, _| match nth(&mut fragments, req, "Fragment") {
            2 => Act::Reply(error_ack(500, "8020001f")),
            _ => Act::Default,
        })
        .await;
        let bytes = random_bytes(20_000, 26);
        let uploaded = peer.upload_checked("/up/lower.bin", &bytes, 8192).await;
        assert_eq!(uploaded.restarts, 1);
        assert_eq!(starts(&peer.fragments()), [0, 8192, 0, 8192, 16_384]);
        assert_eq!(
            peer.kinds()
                .iter()
                .filter(|k| *k == "Create-Session")
                .count(),
            2
        );
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_host_id_falls_back_after_its_timeout() {
    within(async {
        let first_session = Arc::new(Mutex::new(None::<String>));
        let stranded = first_session.clone();
        let peer = Peer::start(move |req, iis| {
            // The first session "lives on 127.0.0.2": this host does not know it.
            if req.packet() == "Fragment"
                && req.session().is_some()
                && req.session() == stranded.lock().unwrap().as_deref()
            {
                return Act::Reply(error_ack(500, "0x8020001F"));
            }
            if req.packet() == "Create-Session" && iis.created.is_empty() {
                iis.host_id = Some(("127.0.0.2".into(), "1".into()));
            }
            Act::Default
        })
        .await;
        let port = peer.addr.port();
        let refused = TcpStream::connect(("127.0.0.2", port)).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused),
            "127.0.0.2:{port} must refuse connections: {refused:?}"
        );

        let bytes = random_bytes(20_000, 27);
        let started = Instant::now();
        let upload = upload_bytes(peer.url("/up/farm.bin"), &bytes, 8192).on_progress({
            let first = first_session.clone();
            move |p| {
                let mut first = first.lock().unwrap();
                if first.is_none() {
                    first.clone_from(&p.session_id);
                }
            }
        });
        let uploaded = upload.await.expect("upload");
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
        assert_eq!(uploaded.restarts, 1);
        assert!(uploaded.retries >= 1);
        assert_eq!(peer.file("/up/farm.bin").as_deref(), Some(&bytes[..]));
        let created = peer.with(|iis| iis.created.clone());
        assert_eq!(created.len(), 2);
        assert_eq!(uploaded.session_id, created[1]);
        // Nothing reached this host between the first Create-Session and the fallback but
        // the Ping that found it again, then the stranded session's fragment.
        let kinds = peer.kinds();
        assert_eq!(
            &kinds[..5],
            [
                "Ping",
                "Create-Session",
                "Ping",
                "Fragment",
                "Create-Session"
            ]
        );
    })
    .await;
}

#[tokio::test]
async fn a_received_offset_past_the_end_is_an_invalid_response() {
    within(async {
        let peer = Peer::start(|req, _| {
            if req.packet() == "Fragment" {
                Act::Reply(ack(200, &[("BITS-Received-Content-Range", "20010")]))
            } else {
                Act::Default
            }
        })
        .await;
        let error = client()
            .upload(
                peer.url("/up/past.bin"),
                UploadSource::bytes(vec![0u8; 20_000]),
            )
            .fragment_size(8192)
            .await
            .expect_err("invalid");
        let Error::InvalidResponse { packet, reason, .. } = &error else {
            panic!("{error:?}")
        };
        assert_eq!(*packet, "Fragment");
        // It names the header and the value that is wrong.
        assert!(
            reason.contains("BITS-Received-Content-Range") && reason.contains("20010"),
            "{reason}"
        );
        assert_eq!(peer.fragments().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn iis_413_to_five_kib_fragments_is_fragment_too_large() {
    within(async {
        let peer = Peer::start(|req, _| {
            if req.packet() == "Fragment" {
                Act::Reply(ack(413, &[("BITS-Received-Content-Range", "0")]))
            } else {
                Act::Default
            }
        })
        .await;
        let error = client()
            .upload(
                peer.url("/up/tiny.bin"),
                UploadSource::bytes(vec![0u8; 50_000]),
            )
            .fragment_size(20 * 1024)
            .await
            .expect_err("too large");
        assert!(matches!(error, Error::FragmentTooLarge(5120)), "{error:?}");
        let lens: Vec<usize> = peer.fragments().iter().map(|f| f.body_len).collect();
        assert_eq!(lens, [20 * 1024, 10 * 1024, 5 * 1024]);
    })
    .await;
}

#[tokio::test]
async fn iis_reply_download_resumes_after_an_interruption() {
    within(async {
        let reply = random_bytes(50_000, 28);
        let half = reply.len() / 2;
        let partial = {
            let mut raw = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-{}/{}\r\n\
                 Content-Length: {}\r\nETag: {ETAG}\r\n\r\n",
                reply.len() - 1,
                reply.len(),
                reply.len()
            )
            .into_bytes();
            raw.extend_from_slice(&reply[..half]);
            raw
        };
        let mut gets = 0;
        let peer = Peer::start(move |req, _| match nth(&mut gets, req, "GET") {
            1 => Act::Raw(partial.clone()),
            _ => Act::Default,
        })
        .await;
        peer.with(|iis| iis.reply = Some(reply.clone()));
        let bytes = random_bytes(12_000, 29);
        let uploaded = upload_bytes(peer.url("/vdir/app/order.xml"), &bytes, 8192)
            .reply_in_memory(1 << 20)
            .await
            .expect("upload-reply");
        let id = peer.with(|iis| iis.created[0].clone());
        let inner = id.trim_start_matches('{').trim_end_matches('}');
        let path = format!("/vdir/app/BITS-Sessions/Replies/%7B{inner}%7D/responsefile.bin");
        let url = uploaded.reply_url.clone().expect("reply URL");
        assert_eq!(url.as_str(), peer.url(&path));
        let got = uploaded.reply.expect("reply");
        assert!(got.body.as_deref() == Some(&reply[..]), "reply differs");
        assert_eq!(got.len, reply.len() as u64);

        let log = peer.log();
        let kinds: Vec<&str> = log.iter().map(Seen::packet).collect();
        assert_eq!(
            kinds,
            [
                "Ping",
                "Create-Session",
                "Fragment",
                "Fragment",
                "GET",
                "GET",
                "Close-Session"
            ]
        );
        let (first, second) = (&log[4], &log[5]);
        assert_eq!(first.target, path);
        assert_eq!(first.header("Range"), Some("bytes=0-"));
        assert_eq!(second.target, path);
        assert_eq!(second.header("Range"), Some(&*format!("bytes={half}-")));
        assert_eq!(second.header("If-Range"), Some(ETAG));
        assert_ne!(
            first.conn, second.conn,
            "the interrupted connection is gone"
        );
        assert_eq!(
            peer.file("/vdir/app/order.xml").as_deref(),
            Some(&bytes[..])
        );
    })
    .await;
}

#[tokio::test]
async fn a_stream_cannot_go_back_when_the_peer_lost_bytes() {
    within(async {
        let mut fragments = 0;
        let peer = Peer::start(move |req, iis| {
            if nth(&mut fragments, req, "Fragment") == 3 {
                let id = req.session().unwrap_or_default();
                if let Some(session) = iis.sessions.get_mut(id) {
                    session.data.truncate(4096);
                }
            }
            Act::Default
        })
        .await;
        let bytes = random_bytes(40_000, 40);
        let error = client()
            .upload(
                peer.url("/up/stream.bin"),
                UploadSource::reader(std::io::Cursor::new(bytes), 40_000),
            )
            .fragment_size(8192)
            .await
            .expect_err("not rewindable");
        assert!(
            matches!(
                error,
                Error::NotRewindable {
                    offset: 4096,
                    position: 16_384
                }
            ),
            "{error:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_close_whose_ack_was_lost_counts_as_closed() {
    within(async {
        let mut closes = 0;
        let peer = Peer::start(move |req, iis| {
            if nth(&mut closes, req, "Close-Session") == 1 {
                // The peer closes the session, then the connection drops before the Ack.
                let id = req.session().unwrap_or_default();
                if let Some(session) = iis.sessions.remove(id) {
                    iis.files.insert(session.target, session.data);
                }
                return Act::DropAfter(0);
            }
            Act::Default
        })
        .await;
        let bytes = random_bytes(10_000, 41);
        let uploaded = upload_bytes(peer.url("/up/closed.bin"), &bytes, 8192)
            .await
            .expect("a repeated Close-Session answered 0x8020001F is a success");
        assert_eq!(uploaded.restarts, 0);
        assert_eq!(peer.file("/up/closed.bin").as_deref(), Some(&bytes[..]));
        assert_eq!(
            peer.kinds(),
            [
                "Ping",
                "Create-Session",
                "Fragment",
                "Fragment",
                "Close-Session",
                "Close-Session"
            ]
        );
    })
    .await;
}

#[tokio::test]
async fn a_dropped_create_session_is_sent_again() {
    within(async {
        let mut creates = 0;
        let peer = Peer::start(
            move |req, _| match nth(&mut creates, req, "Create-Session") {
                1 => Act::DropAfter(0),
                _ => Act::Default,
            },
        )
        .await;
        let bytes = random_bytes(10_000, 42);
        let uploaded = upload_bytes(peer.url("/up/create.bin"), &bytes, 8192)
            .await
            .expect("upload");
        assert!(uploaded.retries >= 1);
        assert_eq!(peer.file("/up/create.bin").as_deref(), Some(&bytes[..]));
        assert_eq!(
            peer.kinds(),
            [
                "Ping",
                "Create-Session",
                "Create-Session",
                "Fragment",
                "Fragment",
                "Close-Session"
            ]
        );
    })
    .await;
}

#[tokio::test]
async fn a_peer_that_always_loses_the_session_is_too_many_restarts() {
    within(async {
        let peer = Peer::start(|req, _| {
            if req.packet() == "Fragment" {
                Act::Reply(error_ack(500, "0x8020001F"))
            } else {
                Act::Default
            }
        })
        .await;
        let error = builder()
            .max_restarts(2)
            .build()
            .unwrap()
            .upload(
                peer.url("/up/lost.bin"),
                UploadSource::bytes(vec![1u8; 100]),
            )
            .await
            .expect_err("too many restarts");
        assert!(matches!(error, Error::TooManyRestarts(2)), "{error:?}");
        let kinds = peer.kinds();
        assert_eq!(kinds.iter().filter(|k| *k == "Create-Session").count(), 3);
    })
    .await;
}

#[tokio::test]
async fn a_peer_that_stays_busy_is_no_progress() {
    within(async {
        let peer = Peer::start(|req, _| {
            if req.packet() == "Fragment" {
                Act::Reply(error_ack(503, "0x800700AA"))
            } else {
                Act::Default
            }
        })
        .await;
        let started = Instant::now();
        let error = builder()
            .no_progress_timeout(Duration::from_millis(300))
            .build()
            .unwrap()
            .upload(
                peer.url("/up/busy.bin"),
                UploadSource::bytes(vec![1u8; 100]),
            )
            .await
            .expect_err("no progress");
        let elapsed = started.elapsed();
        assert!(matches!(error, Error::NoProgress { .. }), "{error:?}");
        assert_eq!(error.code(), Some(Hresult::BUSY));
        assert!(
            elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(5),
            "{elapsed:?}"
        );
        assert!(peer.fragments().len() >= 2, "retried meanwhile");
    })
    .await;
}

#[tokio::test]
async fn redirects_and_foreign_protocols_are_refused() {
    within(async {
        let elsewhere = Peer::start(|_, _| Act::Default).await;
        let target = elsewhere.url("/up/x.bin");
        let redirecting =
            Peer::start(move |_, _| Act::Reply(Resp::new(307).header("Location", target.clone())))
                .await;
        let error = client()
            .upload(
                redirecting.url("/up/x.bin"),
                UploadSource::bytes(vec![1u8; 10]),
            )
            .await
            .expect_err("redirect");
        let Error::Server(e) = &error else {
            panic!("{error:?}")
        };
        assert_eq!(e.status(), 307);
        assert!(e.hint().contains("redirect"), "{}", e.hint());
        assert_eq!(redirecting.log().len(), 1);
        assert!(
            elsewhere.log().is_empty(),
            "BITS packets never follow redirects"
        );

        let foreign = Peer::start(|req, _| {
            if req.packet() == "Create-Session" {
                Act::Reply(ack(
                    200,
                    &[
                        ("BITS-Protocol", "{00000000-0000-0000-0000-000000000001}"),
                        ("BITS-Session-Id", "{11111111-2222-3333-4444-555555555555}"),
                    ],
                ))
            } else {
                Act::Default
            }
        })
        .await;
        let error = client()
            .upload(foreign.url("/up/x.bin"), UploadSource::bytes(vec![1u8; 10]))
            .await
            .expect_err("protocol");
        assert!(matches!(error, Error::ProtocolMismatch(_)), "{error:?}");
        assert_eq!(foreign.kinds(), ["Ping", "Create-Session"]);
    })
    .await;
}

#[tokio::test]
async fn cancel_session_is_sent_again_on_5xx_and_done_on_not_found() {
    within(async {
        let mut cancels = 0;
        let peer = Peer::start(
            move |req, _| match nth(&mut cancels, req, "Cancel-Session") {
                1 | 2 => Act::Reply(error_ack(500, "0x80004005")),
                3 => Act::Reply(error_ack(500, "0x8020001F")),
                _ => Act::Default,
            },
        )
        .await;
        let id = "{6F1C2B7E-0D4A-4C55-9B8E-2A7D3C1E9F40}";
        client()
            .cancel_session(&peer.url("/up/x.bin"), id)
            .await
            .expect("cancelled");
        let log = peer.log();
        assert_eq!(log.len(), 3);
        assert!(log.iter().all(|r| r.session() == Some(id)));
        assert!(log.iter().all(|r| r.header("Content-Length") == Some("0")));
    })
    .await;
}

#[tokio::test]
async fn credentials_go_with_every_packet_but_not_to_another_host() {
    within(async {
        let reply = random_bytes(5000, 43);
        let elsewhere = Peer::start(|_, _| Act::Default).await;
        elsewhere.with(|iis| {
            iis.replies
                .insert("/elsewhere/reply.bin".into(), reply.clone())
        });
        let peer = Peer::start(|_, _| Act::Default).await;
        let reply_url = elsewhere.url("/elsewhere/reply.bin");
        peer.with(|iis| {
            iis.reply = Some(Vec::new());
            iis.reply_url = Some(reply_url.clone());
        });
        let uploaded = builder()
            .header("X-Api-Key", "k3y")
            .basic_auth("uploader", "secret")
            .build()
            .unwrap()
            .upload(
                peer.url("/up/auth.bin"),
                UploadSource::bytes(vec![5u8; 9000]),
            )
            .fragment_size(8192)
            .reply_in_memory(1 << 20)
            .await
            .expect("upload-reply");
        assert!(uploaded.reply.unwrap().body.as_deref() == Some(&reply[..]));
        let basic = "Basic dXBsb2FkZXI6c2VjcmV0";
        for req in peer.log() {
            assert_eq!(req.header("X-Api-Key"), Some("k3y"), "{req:?}");
            assert_eq!(req.header("Authorization"), Some(basic), "{req:?}");
        }
        let gets = elsewhere.log();
        assert_eq!(gets.len(), 1);
        assert!(gets[0].header("X-Api-Key").is_none(), "{:?}", gets[0]);
        assert!(gets[0].header("Authorization").is_none(), "{:?}", gets[0]);
    })
    .await;
}

#[tokio::test]
async fn a_fragment_without_an_answer_times_out_and_is_sent_again() {
    within(async {
        let mut fragments = 0;
        let peer = Peer::start(move |req, _| match nth(&mut fragments, req, "Fragment") {
            2 => Act::Hang,
            _ => Act::Default,
        })
        .await;
        let bytes = random_bytes(20_000, 46);
        let uploaded = builder()
            .request_timeout(Duration::from_millis(500))
            .build()
            .unwrap()
            .upload(peer.url("/up/hang.bin"), UploadSource::bytes(bytes.clone()))
            .fragment_size(8192)
            .await
            .expect("upload");
        assert!(uploaded.retries >= 1);
        assert_eq!(peer.file("/up/hang.bin").as_deref(), Some(&bytes[..]));
        assert_eq!(starts(&peer.fragments()), [0, 8192, 8192, 16_384]);
    })
    .await;
}

/// A peer that takes the first `first` bytes, then answers every Fragment 200 with
/// `BITS-Received-Content-Range` = the fragment's start: it never takes another byte.
async fn stuck_peer(first: u64) -> Peer {
    Peer::start(move |req, iis| {
        let Some((start, _, _)) = req.range() else {
            return Act::Default;
        };
        let held = req
            .session()
            .and_then(|id| iis.sessions.get(id))
            .map_or(0, |s| s.data.len() as u64);
        if held < first {
            return Act::Default;
        }
        let start = start.to_string();
        Act::Reply(ack(200, &[("BITS-Received-Content-Range", &start)]))
    })
    .await
}

/// Uploads to a stuck peer with a 300 ms no-progress timeout; the error and the fragments sent.
async fn upload_to_stuck(peer: &Peer) -> (Error, usize) {
    let error = builder()
        .no_progress_timeout(Duration::from_millis(300))
        .build()
        .unwrap()
        .upload(
            peer.url("/up/stuck.bin"),
            UploadSource::bytes(vec![1u8; 30_000]),
        )
        .fragment_size(8192)
        .await
        .expect_err("no progress");
    (error, peer.fragments().len())
}

#[tokio::test]
async fn a_peer_that_stops_taking_bytes_is_no_progress() {
    within(async {
        let peer = stuck_peer(8192).await;
        let (error, sent) = upload_to_stuck(&peer).await;
        let Error::NoProgress { last, .. } = &error else {
            panic!("{error:?}")
        };
        assert!(matches!(**last, Error::InvalidResponse { .. }), "{last:?}");
        // Backoff between attempts: a handful of fragments, not thousands.
        assert!((3..100).contains(&sent), "{sent} fragments");
    })
    .await;
}

#[tokio::test]
async fn a_peer_that_never_takes_a_byte_is_no_progress() {
    within(async {
        let peer = stuck_peer(0).await;
        let (error, sent) = tokio::time::timeout(Duration::from_secs(5), upload_to_stuck(&peer))
            .await
            .expect("the 300 ms no-progress timeout ends the upload");
        assert!(matches!(error, Error::NoProgress { .. }), "{error:?}");
        assert!((2..100).contains(&sent), "{sent} fragments");
    })
    .await;
}

#[tokio::test]
async fn credentials_do_not_follow_a_reply_redirect_to_another_host() {
    within(async {
        let reply = random_bytes(5000, 44);
        let elsewhere = Peer::start(|_, _| Act::Default).await;
        elsewhere.with(|iis| {
            iis.replies
                .insert("/elsewhere/reply.bin".into(), reply.clone())
        });
        let location = elsewhere.url("/elsewhere/reply.bin");
        let peer = Peer::start(move |req, _| {
            if req.method == "GET" {
                Act::Reply(Resp::new(302).header("Location", location.clone()))
            } else {
                Act::Default
            }
        })
        .await;
        peer.with(|iis| iis.reply = Some(Vec::new()));
        let uploaded = builder()
            .header("X-Api-Key", "k3y")
            .basic_auth("uploader", "secret")
            .build()
            .unwrap()
            .upload(
                peer.url("/up/auth.bin"),
                UploadSource::bytes(vec![5u8; 9000]),
            )
            .fragment_size(8192)
            .reply_in_memory(1 << 20)
            .await
            .expect("upload-reply");
        assert!(uploaded.reply.unwrap().body.as_deref() == Some(&reply[..]));
        // The same-host reply URL got the credentials ...
        let get = peer.log().into_iter().find(|r| r.method == "GET").unwrap();
        assert_eq!(get.header("X-Api-Key"), Some("k3y"));
        // ... and the host it redirected to must not.
        let gets = elsewhere.log();
        assert_eq!(gets.len(), 1);
        assert!(gets[0].header("Authorization").is_none(), "{:?}", gets[0]);
        assert!(gets[0].header("X-Api-Key").is_none(), "{:?}", gets[0]);
    })
    .await;
}

#[tokio::test]
async fn reply_download_retries_are_counted() {
    within(async {
        let reply = random_bytes(10_000, 45);
        let mut gets = 0;
        let peer = Peer::start(move |req, _| match nth(&mut gets, req, "GET") {
            1 => Act::Reply(Resp::new(503).body("busy")),
            _ => Act::Default,
        })
        .await;
        peer.with(|iis| iis.reply = Some(reply.clone()));
        let reports = Reports::default();
        let uploaded = client()
            .upload(
                peer.url("/up/count.bin"),
                UploadSource::bytes(vec![9u8; 100]),
            )
            .reply_in_memory(1 << 20)
            .on_progress(reports.callback())
            .await
            .expect("upload-reply");
        assert_eq!(peer.kinds().iter().filter(|k| *k == "GET").count(), 2);
        let last = reports.all().last().unwrap().clone();
        assert_eq!(last.retries, uploaded.retries, "{last:?}");
        assert_eq!(uploaded.retries, 1);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Part C: over HTTPS. The server behind rustls with a throw-away self-signed certificate for
// 127.0.0.1: BITS servers on the internet (IIS among them) are reached over HTTPS, and nothing
// else exercises the client's certificate options end to end.

/// This crate's server behind TLS on an ephemeral port of 127.0.0.1.
struct TlsServer {
    addr: SocketAddr,
    root: PathBuf,
    /// The server's certificate, PEM: the one root a client must trust.
    cert_pem: String,
    _tmp: tempfile::TempDir,
    _accept: tokio::task::JoinHandle<()>,
}

impl TlsServer {
    async fn start(configure: impl FnOnce(BitsLayerBuilder) -> BitsLayerBuilder) -> Self {
        let certified =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("certificate");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .expect("server config");
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let tmp = tempfile::tempdir().expect("tempdir");
        let layer = configure(BitsLayer::builder(tmp.path()))
            .build()
            .expect("layer");
        let app = Router::new().layer(layer);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    // A client that refuses the certificate ends the handshake: not an error here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                        .await;
                });
            }
        });
        Self {
            addr,
            root: tmp.path().to_path_buf(),
            cert_pem: certified.cert.pem(),
            _tmp: tmp,
            _accept: accept,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }
}

/// Uploads `len` bytes to `/name` in 32 KiB fragments and checks the file arrived.
async fn upload_checked(client: &BitsClient, server: &TlsServer, name: &str, len: usize) {
    let data = random_bytes(len, 40);
    let uploaded = client
        .upload(
            server.url(&format!("/{name}")),
            UploadSource::bytes(data.clone()),
        )
        .fragment_size(32 * 1024)
        .await
        .unwrap_or_else(|e| panic!("uploading {name}: {e}"));
    assert_eq!(uploaded.bytes, len as u64);
    assert!(
        std::fs::read(server.root.join(name)).unwrap() == data,
        "{name} differs"
    );
}

#[tokio::test]
async fn uploads_over_https_to_a_server_whose_certificate_is_trusted() {
    within(async {
        let server = TlsServer::start(|b| b).await;
        let client = builder()
            .add_root_certificate_pem(server.cert_pem.clone())
            .build()
            .expect("client");
        client.ping(&server.url("/")).await.expect("ping");
        upload_checked(&client, &server, "secure.bin", 300_000).await;
    })
    .await;
}

#[tokio::test]
async fn an_untrusted_certificate_fails_the_upload_and_no_file_appears() {
    within(async {
        let server = TlsServer::start(|b| b).await;
        // A long no-progress timeout: a refused certificate must not be retried until then.
        let client = builder()
            .no_progress_timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let started = std::time::Instant::now();
        let error = client
            .upload(
                server.url("/untrusted.bin"),
                UploadSource::bytes(random_bytes(1000, 41)),
            )
            .await
            .expect_err("a self-signed certificate is not trusted by default");
        assert!(matches!(error, Error::Transport { .. }), "{error:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "retried: {error:?}"
        );
        let text = format!("{error}");
        assert!(text.to_lowercase().contains("certificate"), "{text}");
        assert!(!server.root.join("untrusted.bin").exists());
    })
    .await;
}

#[tokio::test]
async fn accepting_invalid_certificates_is_an_explicit_opt_in() {
    within(async {
        let server = TlsServer::start(|b| b).await;
        let client = builder()
            .danger_accept_invalid_certs(true)
            .build()
            .expect("client");
        upload_checked(&client, &server, "anyway.bin", 10_000).await;
    })
    .await;
}

/// Replies with the upload's length in decimal.
async fn reply_length(upload: CompletedUpload) -> Result<Completion, CompletionError> {
    let reply = upload.size.to_string().into_bytes();
    Ok(Completion::reply(AppReply::Bytes(reply.into())))
}

#[tokio::test]
async fn an_upload_reply_job_fetches_its_reply_over_https() {
    within(async {
        let server = TlsServer::start(|b| b.upload_reply_handler(reply_length).https(true)).await;
        let client = builder()
            .add_root_certificate_pem(server.cert_pem.clone())
            .build()
            .expect("client");
        let uploaded = client
            .upload(
                server.url("/job.bin"),
                UploadSource::bytes(random_bytes(70_000, 42)),
            )
            .fragment_size(32 * 1024)
            .reply_in_memory(1024)
            .await
            .expect("upload-reply over https");
        let url = uploaded.reply_url.expect("a reply URL");
        assert_eq!(url.scheme(), "https", "{url}");
        let reply = uploaded.reply.expect("a reply");
        assert_eq!(reply.body.as_deref(), Some(&b"70000"[..]));
    })
    .await;
}

/// A farm node's `BITS-Host-Id` name that its certificate does not cover: the client goes back
/// to the original URL at once instead of waiting out the fallback timeout, and the upload
/// completes there.
#[tokio::test]
async fn a_host_id_whose_certificate_is_refused_falls_back_to_the_original_url() {
    within(async {
        let server = TlsServer::start(|b| {
            b.host_id("localhost")
                .host_id_fallback_timeout(Duration::from_secs(600))
        })
        .await;
        let client = builder()
            .add_root_certificate_pem(server.cert_pem.clone())
            .no_progress_timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        upload_checked(&client, &server, "farm.bin", 100_000).await;
    })
    .await;
}
