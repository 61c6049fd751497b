//! Shared harness: a real server on an ephemeral 127.0.0.1 port, a BITS client over reqwest,
//! and a raw-socket connection that controls exact bytes and header case.

#![allow(dead_code, unreachable_pub)]

pub mod node;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use axum_bits::{BitsLayer, BitsLayerBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An authentication stand-in for tests: the `x-user` header, if present, becomes the request's
/// [`axum_bits::Owner`]. Apply it outside the BITS layer (`Router::layer` after it).
pub async fn owner_from_header(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let user = request
        .headers()
        .get("x-user")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(user) = user {
        request.extensions_mut().insert(axum_bits::Owner::new(user));
    }
    next.run(request).await
}

/// A log writer a test can read back: [`install`](Self::install) makes it the current
/// thread's subscriber (a `#[tokio::test]` runtime is single-threaded, so the server's tasks
/// log there too).
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    /// Captures what `filter` (an `EnvFilter` directive, e.g. `"axum_bits=trace"`) lets
    /// through, until the guard drops.
    pub fn install(&self, filter: &str) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || logs.clone())
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut held) = self.0.lock() {
            held.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The one upload protocol GUID.
pub const PROTOCOL: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";

/// A server running in this process on an ephemeral port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub root: PathBuf,
    pub layer: BitsLayer,
    _tmp: Option<tempfile::TempDir>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// A server on a fresh temporary root, configured by `configure`.
    pub async fn start(configure: impl FnOnce(BitsLayerBuilder) -> BitsLayerBuilder) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut server = Self::start_in(tmp.path(), configure).await;
        server._tmp = Some(tmp);
        server
    }

    /// A server on `root` (which may hold state from an earlier server).
    pub async fn start_in(
        root: &Path,
        configure: impl FnOnce(BitsLayerBuilder) -> BitsLayerBuilder,
    ) -> Self {
        let layer = configure(BitsLayer::builder(root)).build().expect("layer");
        let app = Router::new()
            .route("/", get(|| async { "app root" }))
            .route(
                "/hello",
                get(|| async { "hello from the app" }).post(|| async { "posted" }),
            )
            .layer(layer.clone());
        Self::serve(root, layer, app).await
    }

    /// Serves an arbitrary app (the caller applies `layer` where it wants).
    pub async fn serve(root: &Path, layer: BitsLayer, app: Router) -> Self {
        let listener = listen();
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .expect("serve");
        });
        Self {
            addr,
            root: root.to_path_buf(),
            layer,
            _tmp: None,
            shutdown: Some(tx),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn client(&self) -> BitsClient {
        BitsClient::new(self.addr)
    }

    pub async fn raw(&self) -> RawConn {
        RawConn::connect(self.addr).await
    }

    /// Stops accepting and waits for the server task (open connections are dropped).
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
        let _ = self.task.await;
    }

    /// Files (not directories) under the staging and session folders.
    pub fn leftovers(&self) -> Vec<PathBuf> {
        leftovers(&self.root)
    }
}

/// Files under `root/.bits` (staged parts and session records).
pub fn leftovers(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root.join(".bits"), &mut out);
    out
}

/// Part files only (`root/.bits/parts`).
pub fn parts(root: &Path) -> Vec<PathBuf> {
    leftovers(root)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "part"))
        .collect()
}

/// Deterministic pseudo-random bytes.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A response, fully read.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn session_id(&self) -> String {
        self.header("BITS-Session-Id")
            .expect("BITS-Session-Id on the Ack")
            .to_owned()
    }

    pub fn received(&self) -> Option<u64> {
        self.header("BITS-Received-Content-Range")
            .map(|v| v.parse().expect("numeric BITS-Received-Content-Range"))
    }

    /// Asserts the Ack shape every response must have: `BITS-Packet-Type: Ack`,
    /// `Content-Length: 0`, no body; error headers only on non-200 and always paired.
    pub fn assert_ack(&self) -> &Self {
        assert_eq!(self.header("BITS-Packet-Type"), Some("Ack"), "{self:?}");
        assert_eq!(self.header("Content-Length"), Some("0"), "{self:?}");
        assert!(self.body.is_empty(), "{self:?}");
        let code = self.header("BITS-Error-Code");
        assert_eq!(
            code.is_some(),
            self.header("BITS-Error-Context").is_some(),
            "{self:?}"
        );
        assert_eq!(code, self.header("BITS-Error"), "{self:?}");
        if self.status == 200 {
            assert!(code.is_none(), "error headers on a 200 Ack: {self:?}");
        }
        self
    }

    /// Asserts a successful Ack.
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(self.status, 200, "{self:?}");
        self.assert_ack()
    }

    /// Asserts an error Ack with this status, `BITS-Error-Code` and context 0x5.
    pub fn assert_error(&self, status: u16, code: &str) -> &Self {
        assert_eq!(self.status, status, "{self:?}");
        self.assert_ack();
        assert_eq!(self.header("BITS-Error-Code"), Some(code), "{self:?}");
        assert_eq!(self.header("BITS-Error-Context"), Some("0x5"), "{self:?}");
        self
    }
}

/// A BITS client over reqwest (keep-alive connection pool).
#[derive(Clone)]
pub struct BitsClient {
    http: reqwest::Client,
    base: String,
}

pub fn bits_post() -> reqwest::Method {
    reqwest::Method::from_bytes(b"BITS_POST").expect("method")
}

impl BitsClient {
    /// A client on an HTTP client of the caller's (e.g. bound to another local address).
    pub fn with_http(addr: SocketAddr, http: reqwest::Client) -> Self {
        Self {
            http,
            base: format!("http://{addr}"),
        }
    }

    pub fn new(addr: SocketAddr) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
            base: format!("http://{addr}"),
        }
    }

    /// Sends a `BITS_POST` with exactly these extra headers and body.
    pub async fn send(&self, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
        let mut request = self
            .http
            .request(bits_post(), format!("{}{}", self.base, path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.body(body).send().await.expect("request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("body").to_vec();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn ping(&self, path: &str) -> Reply {
        self.send(path, &[("BITS-Packet-Type", "Ping")], Vec::new())
            .await
    }

    pub async fn create(&self, path: &str) -> Reply {
        self.send(
            path,
            &[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", PROTOCOL),
            ],
            Vec::new(),
        )
        .await
    }

    /// Creates a session and returns its id, asserting success.
    pub async fn create_ok(&self, path: &str) -> String {
        let reply = self.create(path).await;
        reply.assert_ok();
        reply.session_id()
    }

    /// Sends `body` as the fragment starting at `first` of a `total`-byte file.
    pub async fn fragment(
        &self,
        path: &str,
        sid: &str,
        first: u64,
        body: &[u8],
        total: u64,
    ) -> Reply {
        let range = if body.is_empty() {
            format!("bytes */{total}")
        } else {
            format!(
                "bytes {}-{}/{}",
                first,
                first + body.len() as u64 - 1,
                total
            )
        };
        self.send(
            path,
            &[
                ("BITS-Packet-Type", "Fragment"),
                ("BITS-Session-Id", sid),
                ("Content-Range", &range),
            ],
            body.to_vec(),
        )
        .await
    }

    pub async fn close(&self, path: &str, sid: &str) -> Reply {
        self.send(
            path,
            &[
                ("BITS-Packet-Type", "Close-Session"),
                ("BITS-Session-Id", sid),
            ],
            Vec::new(),
        )
        .await
    }

    pub async fn cancel(&self, path: &str, sid: &str) -> Reply {
        self.send(
            path,
            &[
                ("BITS-Packet-Type", "Cancel-Session"),
                ("BITS-Session-Id", sid),
            ],
            Vec::new(),
        )
        .await
    }

    /// Uploads `data` to `path` the way Windows does (Create-Session, fragments following
    /// `BITS-Received-Content-Range`, Close-Session) and returns the session id.
    pub async fn upload(&self, path: &str, data: &[u8], fragment_size: usize) -> String {
        let sid = self.create_ok(path).await;
        self.send_all(path, &sid, data, fragment_size).await;
        self.close(path, &sid).await.assert_ok();
        sid
    }

    /// Sends fragments from the server's offset until it holds everything.
    pub async fn send_all(&self, path: &str, sid: &str, data: &[u8], fragment_size: usize) {
        let total = data.len() as u64;
        let mut offset = 0u64;
        loop {
            let end = (offset as usize + fragment_size).min(data.len());
            let reply = self
                .fragment(path, sid, offset, &data[offset as usize..end], total)
                .await;
            assert!(reply.status == 200 || reply.status == 416, "{reply:?}");
            reply.assert_ack();
            offset = reply.received().expect("received");
            if offset == total {
                return;
            }
        }
    }
}

/// The head of a raw Fragment request for `len` bytes at `first` of a `total`-byte file.
pub fn fragment_head(path: &str, sid: &str, first: usize, len: usize, total: usize) -> Vec<u8> {
    format!(
        "BITS_POST {path} HTTP/1.1\r\n\
         Host: 127.0.0.1\r\n\
         BITS-Packet-Type: Fragment\r\n\
         BITS-Session-Id: {sid}\r\n\
         Content-Range: bytes {first}-{last}/{total}\r\n\
         Content-Length: {len}\r\n\r\n",
        last = first + len - 1
    )
    .into_bytes()
}

/// A raw HTTP/1.1 connection: sends exact bytes, parses responses with header case kept.
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Headers in wire order, names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl RawConn {
    /// A raw connection over a stream the caller opened (and may have written to).
    pub fn from_stream(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Writes a request and reads one response.
    pub async fn exchange(&mut self, bytes: &[u8]) -> RawResponse {
        self.write(bytes).await;
        self.read_response().await.expect("a response")
    }

    /// Reads one response (head, then `Content-Length` body bytes). `None` if the connection
    /// closed first. Fails the test after 30 s.
    pub async fn read_response(&mut self) -> Option<RawResponse> {
        tokio::time::timeout(Duration::from_secs(30), self.read_response_inner())
            .await
            .expect("response within 30 s")
    }

    async fn read_response_inner(&mut self) -> Option<RawResponse> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).expect("utf8 head");
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.to_owned(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().expect("length"));
        while self.buf.len() < len {
            if !self.fill().await {
                return None;
            }
        }
        let body = self.buf.drain(..len).collect();
        Some(RawResponse {
            status,
            headers,
            body,
        })
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Whether the server closed the connection (reads EOF within `wait`).
    pub async fn is_closed(&mut self, wait: Duration) -> bool {
        let mut chunk = [0u8; 1];
        matches!(
            tokio::time::timeout(wait, self.stream.read(&mut chunk)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    pub fn into_inner(self) -> TcpStream {
        self.stream
    }
}

/// A listener on an ephemeral 127.0.0.1 port with a backlog of 4,096 (tokio's `bind` asks for
/// 1,024): the tests that open a thousand connections at once must not see the kernel's
/// queue of not-yet-accepted connections overflow (it then drops, or with SYN cookies
/// resets, connections the server never saw), which says nothing about the server.
pub fn listen() -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    socket.listen(4096).expect("listen")
}
