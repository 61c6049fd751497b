//! HTTP client notifying the server application of a completed upload.
//!
//! This mirrors the IIS BITS server extension: once an upload is complete the
//! server POSTs to the application URL, either passing the uploaded file's
//! path (by reference) or its content (by value), and uses the application's
//! answer as the reply to the BITS client.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_LENGTH, HOST, USER_AGENT};
use http::uri::Scheme;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::fs::{File, OpenOptions};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::body::file::FileBody;

/// Request header carrying the URL the BITS client uploaded to.
const ORIGINAL_REQUEST_URL: HeaderName = HeaderName::from_static("bits-original-request-url");
/// Request header naming the uploaded file (by reference).
const REQUEST_DATAFILE_NAME: HeaderName = HeaderName::from_static("bits-request-datafile-name");
/// Request header naming the file the application writes its reply to (by reference).
const RESPONSE_DATAFILE_NAME: HeaderName = HeaderName::from_static("bits-response-datafile-name");
/// Response header redirecting the client to a static reply URL.
const STATIC_RESPONSE_URL: HeaderName = HeaderName::from_static("bits-static-response-url");
/// Response header asking the server to copy the upload to its destination.
const COPY_FILE_TO_DESTINATION: HeaderName =
    HeaderName::from_static("bits-copy-file-to-destination");

/// Value of the `User-Agent` request header.
const USER_AGENT_VALUE: &str = "axum-bits";
/// Port used when the target URI has none.
const DEFAULT_PORT: u16 = 80;

/// Time limits for the phases of a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timeouts {
    /// Bounds establishing the TCP connection.
    pub(crate) connect: Duration,
    /// Bounds sending the request (body included) until the response head arrives.
    pub(crate) send: Duration,
    /// Bounds reading the response body.
    pub(crate) receive: Duration,
}

/// How the uploaded data is handed to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NotifyBody {
    /// Only file paths are sent; the application reads and writes the files itself.
    ByReference {
        /// The uploaded file.
        request_file: PathBuf,
        /// The file the application may write its reply to.
        response_file: PathBuf,
    },
    /// The uploaded file's content is sent as the request body.
    ByValue {
        /// The uploaded file.
        file: PathBuf,
        /// Number of bytes to send from the start of `file`.
        len: u64,
    },
}

/// A notification to send to the server application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NotifyRequest {
    /// The application URL; must be `http://`.
    pub(crate) target: Uri,
    /// The URL the BITS client uploaded to.
    pub(crate) original_url: String,
    /// How the uploaded data is passed.
    pub(crate) body: NotifyBody,
}

/// What the application answered as the reply for the BITS client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AppReply {
    /// By reference: nothing was said; the caller checks the response file.
    None,
    /// By value: the application's response body, written to the reply file.
    Written {
        /// Length of the reply in bytes.
        len: u64,
    },
    /// The reply is to be fetched from this absolute URL.
    Static(String),
}

/// The application's successful answer to a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AppAnswer {
    /// The reply for the BITS client.
    pub(crate) reply: AppReply,
    /// Whether the application asked for the upload to be copied to its destination.
    pub(crate) copy_to_destination: bool,
}

/// The phase of a notification that ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeoutPhase {
    /// Establishing the TCP connection.
    Connect,
    /// Sending the request and waiting for the response head.
    Send,
    /// Reading the response body.
    Receive,
}

/// Why a notification failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotifyError {
    /// The application could not be reached, or the connection failed.
    #[error("server application unreachable")]
    Unreachable(#[source] Box<dyn StdError + Send + Sync>),
    /// A phase of the notification timed out.
    #[error("server application notification timed out ({0:?})")]
    Timeout(TimeoutPhase),
    /// The application answered with a non-success status.
    #[error("server application answered {0}")]
    Status(StatusCode),
    /// The application's reply exceeded the allowed size.
    #[error("server application reply larger than {max} bytes")]
    ReplyTooLarge {
        /// The maximum allowed reply size.
        max: u64,
    },
    /// The request could not be built or the answer was invalid.
    #[error("malformed notification: {0}")]
    Malformed(String),
    /// A local file operation failed.
    #[error("notification I/O error")]
    Io(#[from] std::io::Error),
}

/// The request body type: empty by reference, the file by value.
type NotifyRequestBody = Either<Empty<Bytes>, FileBody>;

/// Aborts the connection task when the notification ends, however it ends.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Notifies the server application of a completed upload and returns its answer.
///
/// By value, a successful answer's body is written to `reply_file` (at most
/// `max_reply` bytes); on failure no partial reply file is left behind.
pub(crate) async fn notify(
    request: &NotifyRequest,
    timeouts: &Timeouts,
    reply_file: &Path,
    max_reply: u64,
) -> Result<AppAnswer, NotifyError> {
    let (host, port, host_header) = target_address(&request.target)?;
    let http_request = build_request(request, host_header).await?;

    let stream = match timeout(timeouts.connect, TcpStream::connect((host, port))).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return Err(NotifyError::Unreachable(Box::new(err))),
        Err(_) => return Err(NotifyError::Timeout(TimeoutPhase::Connect)),
    };

    let exchange = async {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(hyper_error)?;
        let task = AbortOnDrop(tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "notification connection ended with an error");
            }
        }));
        let response = sender
            .send_request(http_request)
            .await
            .map_err(hyper_error)?;
        Ok::<_, NotifyError>((task, response))
    };
    let (_task, response) = match timeout(timeouts.send, exchange).await {
        Ok(result) => result?,
        Err(_) => return Err(NotifyError::Timeout(TimeoutPhase::Send)),
    };

    let status = response.status();
    tracing::debug!(uri = %request.target, status = %status, "server application notified");
    if !status.is_success() {
        return Err(NotifyError::Status(status));
    }

    let headers = response.headers();
    let copy_to_destination = headers.contains_key(COPY_FILE_TO_DESTINATION);
    let static_url = headers
        .get(STATIC_RESPONSE_URL)
        .map(static_response_url)
        .transpose()?;

    let reply = match (static_url, &request.body) {
        (Some(url), _) => AppReply::Static(url),
        (None, NotifyBody::ByReference { .. }) => AppReply::None,
        (None, NotifyBody::ByValue { .. }) => {
            let len = receive_reply(
                response.into_body(),
                reply_file,
                max_reply,
                timeouts.receive,
            )
            .await?;
            AppReply::Written { len }
        }
    };
    Ok(AppAnswer {
        reply,
        copy_to_destination,
    })
}

/// Extracts the host to connect to, the port and the `Host` header value.
fn target_address(target: &Uri) -> Result<(&str, u16, HeaderValue), NotifyError> {
    if target.scheme() != Some(&Scheme::HTTP) {
        return Err(NotifyError::Malformed(format!(
            "application URL {target} is not http://"
        )));
    }
    let authority = target
        .authority()
        .ok_or_else(|| NotifyError::Malformed(format!("application URL {target} has no host")))?;
    let host = authority.host();
    let port = authority.port_u16().unwrap_or(DEFAULT_PORT);
    let host_header = if port == DEFAULT_PORT {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    };
    let host_header = header_value(host_header, "Host")?;
    // IPv6 literals are bracketed in URIs but not when connecting.
    let connect_host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((connect_host, port, host_header))
}

/// Builds the notification request, opening the uploaded file when sent by value.
async fn build_request(
    request: &NotifyRequest,
    host_header: HeaderValue,
) -> Result<Request<NotifyRequestBody>, NotifyError> {
    let path_and_query = request
        .target
        .path_and_query()
        .map_or("/", |pq| pq.as_str());
    let builder = Request::builder()
        .method(Method::POST)
        .uri(path_and_query)
        .version(Version::HTTP_11)
        .header(HOST, host_header)
        .header(USER_AGENT, USER_AGENT_VALUE)
        .header(ACCEPT, "*/*")
        .header(
            ORIGINAL_REQUEST_URL,
            header_value(request.original_url.clone(), "original request URL")?,
        );
    let (builder, body) = match &request.body {
        NotifyBody::ByReference {
            request_file,
            response_file,
        } => {
            let builder = builder
                .header(REQUEST_DATAFILE_NAME, path_header_value(request_file)?)
                .header(RESPONSE_DATAFILE_NAME, path_header_value(response_file)?)
                .header(CONTENT_LENGTH, 0);
            (builder, Either::Left(Empty::new()))
        }
        NotifyBody::ByValue { file, len } => {
            let file = File::open(file).await?;
            let available = file.metadata().await?.len();
            if available < *len {
                return Err(NotifyError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("uploaded file holds {available} bytes, expected {len}"),
                )));
            }
            let builder = builder.header(CONTENT_LENGTH, *len);
            (builder, Either::Right(FileBody::new(file, *len)))
        }
    };
    builder
        .body(body)
        .map_err(|err| NotifyError::Malformed(format!("invalid notification request: {err}")))
}

/// Converts a string into a header value, naming `what` in the error.
fn header_value(value: String, what: &str) -> Result<HeaderValue, NotifyError> {
    HeaderValue::try_from(value)
        .map_err(|_| NotifyError::Malformed(format!("{what} is not a valid header value")))
}

/// Converts a file path into a header value.
fn path_header_value(path: &Path) -> Result<HeaderValue, NotifyError> {
    let text = path
        .to_str()
        .ok_or_else(|| NotifyError::Malformed(format!("path {} is not UTF-8", path.display())))?;
    header_value(text.to_owned(), "file path")
}

/// Validates a `BITS-Static-Response-URL` value: it must be an absolute
/// `http://` or `https://` URL.
fn static_response_url(value: &HeaderValue) -> Result<String, NotifyError> {
    let invalid = || NotifyError::Malformed("invalid BITS-Static-Response-URL".to_owned());
    let text = value.to_str().map_err(|_| invalid())?.trim();
    if crate::completion::is_absolute_http_url(text) {
        Ok(text.to_owned())
    } else {
        Err(invalid())
    }
}

/// Maps a hyper client error: unparsable answers are malformed, anything else
/// means the conversation with the application broke down.
fn hyper_error(err: hyper::Error) -> NotifyError {
    if err.is_parse() {
        NotifyError::Malformed(format!("invalid answer from server application: {err}"))
    } else {
        NotifyError::Unreachable(Box::new(err))
    }
}

/// Writes the application's response body to `reply_file`, bounded by
/// `max_reply` bytes and the `receive` timeout; removes the file on failure.
async fn receive_reply(
    body: Incoming,
    reply_file: &Path,
    max_reply: u64,
    receive: Duration,
) -> Result<u64, NotifyError> {
    if body.size_hint().lower() > max_reply {
        return Err(NotifyError::ReplyTooLarge { max: max_reply });
    }
    let mut file = create_reply_file(reply_file).await?;
    let result = match timeout(receive, copy_body(body, &mut file, max_reply)).await {
        Ok(result) => result,
        Err(_) => Err(NotifyError::Timeout(TimeoutPhase::Receive)),
    };
    let result = match result {
        Ok(len) => file
            .sync_all()
            .await
            .map(|()| len)
            .map_err(NotifyError::from),
        Err(err) => Err(err),
    };
    drop(file);
    if result.is_err() {
        if let Err(err) = tokio::fs::remove_file(reply_file).await {
            tracing::warn!(path = %reply_file.display(), error = %err, "cannot remove partial reply file");
        }
    }
    result
}

/// Creates (or truncates) the reply file, readable by the owner only on unix. A symbolic link
/// in its place is refused, never written through.
async fn create_reply_file(path: &Path) -> std::io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
        // The flag's bits fit an i32 (open(2) takes an int).
        options.custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    }
    OpenOptions::from(options).open(path).await
}

/// Copies the response body into `file`, failing once more than `max_reply`
/// bytes arrived.
async fn copy_body(
    mut body: Incoming,
    file: &mut File,
    max_reply: u64,
) -> Result<u64, NotifyError> {
    let mut written: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| NotifyError::Unreachable(Box::new(err)))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        written = written.saturating_add(data.len() as u64);
        if written > max_reply {
            return Err(NotifyError::ReplyTooLarge { max: max_reply });
        }
        file.write_all(&data).await?;
    }
    file.flush().await?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::extract::{Request as AxumRequest, State};
    use axum::routing::post;
    use http::HeaderMap;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Distinguishes the temporary directories of concurrently running tests.
    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    /// A temporary directory removed when dropped.
    struct TestDir(PathBuf);

    impl TestDir {
        /// Creates a fresh empty directory.
        fn new() -> Self {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("notify-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&path).expect("create test dir");
            Self(path)
        }

        /// A path inside the directory.
        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// One request as seen by the test application.
    #[derive(Debug, Clone)]
    struct Recorded {
        method: Method,
        uri: String,
        headers: HeaderMap,
        body: Bytes,
    }

    /// Requests seen by the test application.
    type Seen = Arc<Mutex<Vec<Recorded>>>;

    /// 64-bit FNV-1a checksum.
    fn fnv(data: &[u8]) -> u64 {
        data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }

    /// Deterministic test data of `len` bytes.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Records the request and answers with the body's length and checksum.
    async fn record(State(seen): State<Seen>, request: AxumRequest) -> String {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.expect("request body").to_bytes();
        let reply = format!("len={} sum={:016x}", body.len(), fnv(&body));
        seen.lock().expect("lock").push(Recorded {
            method: parts.method,
            uri: parts.uri.to_string(),
            headers: parts.headers,
            body,
        });
        reply
    }

    /// Serves `app` on an ephemeral local port.
    async fn serve(app: Router) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// Serves a recording application, returning its address and what it saw.
    async fn serve_recorder() -> (SocketAddr, Seen) {
        let seen = Seen::default();
        let app = Router::new()
            .route("/app/notify", post(record))
            .with_state(seen.clone());
        (serve(app).await, seen)
    }

    /// Serves one connection with a canned raw HTTP answer, written after the
    /// whole request arrived; the connection is held open for `hold`.
    async fn serve_raw(answer: &'static [u8], hold: Duration) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut request = Vec::new();
            let mut buf = [0u8; 8192];
            let head_end = loop {
                let n = stream.read(&mut buf).await.expect("read request");
                assert!(n > 0, "request ended early");
                request.extend_from_slice(&buf[..n]);
                if let Some(pos) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                    break pos + 4;
                }
            };
            let head = String::from_utf8_lossy(&request[..head_end]).to_ascii_lowercase();
            let body_len: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().expect("content-length"));
            while request.len() < head_end + body_len {
                let n = stream.read(&mut buf).await.expect("read body");
                assert!(n > 0, "request body ended early");
                request.extend_from_slice(&buf[..n]);
            }
            stream.write_all(answer).await.expect("write answer");
            tokio::time::sleep(hold).await;
        });
        addr
    }

    /// Generous timeouts for tests that should not time out.
    fn timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(5),
            send: Duration::from_secs(5),
            receive: Duration::from_secs(5),
        }
    }

    /// The application URL on `addr`.
    fn target(addr: SocketAddr) -> Uri {
        format!("http://{addr}/app/notify?job=1")
            .parse()
            .expect("target uri")
    }

    /// A by-reference notification to `addr`.
    fn by_reference(addr: SocketAddr, dir: &TestDir) -> NotifyRequest {
        NotifyRequest {
            target: target(addr),
            original_url: "http://bits.example/upload/a.bin".to_owned(),
            body: NotifyBody::ByReference {
                request_file: dir.path("request.bin"),
                response_file: dir.path("response.bin"),
            },
        }
    }

    /// A by-value notification to `addr` sending `data`, written to a file.
    fn by_value(addr: SocketAddr, dir: &TestDir, data: &[u8]) -> NotifyRequest {
        let file = dir.path("upload.bin");
        std::fs::write(&file, data).expect("write upload");
        NotifyRequest {
            target: target(addr),
            original_url: "http://bits.example/upload/a.bin".to_owned(),
            body: NotifyBody::ByValue {
                file,
                len: data.len() as u64,
            },
        }
    }

    /// Serves `handler` on `/app/notify` of a fresh application.
    async fn serve_route<H, T>(handler: H) -> SocketAddr
    where
        H: axum::handler::Handler<T, ()>,
        T: 'static,
    {
        serve(Router::new().route("/app/notify", post(handler))).await
    }

    #[tokio::test]
    async fn by_value_sends_file_and_writes_reply() {
        let dir = TestDir::new();
        let (addr, seen) = serve_recorder().await;
        let data = pattern(100_000);
        let request = by_value(addr, &dir, &data);
        let reply_file = dir.path("reply.bin");

        let answer = notify(&request, &timeouts(), &reply_file, 1024)
            .await
            .expect("notify");

        let expected = format!("len={} sum={:016x}", data.len(), fnv(&data));
        assert_eq!(
            answer,
            AppAnswer {
                reply: AppReply::Written {
                    len: expected.len() as u64
                },
                copy_to_destination: false,
            }
        );
        assert_eq!(
            std::fs::read(&reply_file).expect("reply"),
            expected.as_bytes()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&reply_file)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 1);
        let got = &seen[0];
        assert_eq!(got.method, Method::POST);
        assert_eq!(got.uri, "/app/notify?job=1");
        assert_eq!(got.body, data);
        let h = &got.headers;
        assert_eq!(h[HOST], format!("127.0.0.1:{}", addr.port()).as_str());
        assert_eq!(h[USER_AGENT], "axum-bits");
        assert_eq!(h[ACCEPT], "*/*");
        assert_eq!(h[CONTENT_LENGTH], data.len().to_string().as_str());
        assert_eq!(
            h["bits-original-request-url"],
            "http://bits.example/upload/a.bin"
        );
        assert!(!h.contains_key("bits-request-datafile-name"));
        assert!(!h.contains_key("bits-response-datafile-name"));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_link_in_place_of_the_reply_file_is_not_written_through() {
        let dir = TestDir::new();
        let (addr, _seen) = serve_recorder().await;
        let outside = dir.path("outside.txt");
        std::fs::write(&outside, b"keep me").expect("outside file");
        let reply_file = dir.path("reply.bin");
        std::os::unix::fs::symlink(&outside, &reply_file).expect("link");

        let request = by_value(addr, &dir, b"data");
        notify(&request, &timeouts(), &reply_file, 1024)
            .await
            .expect_err("a link in place of the reply file is refused");
        assert_eq!(std::fs::read(&outside).expect("outside"), b"keep me");
    }

    #[tokio::test]
    async fn by_reference_sends_paths_only() {
        let dir = TestDir::new();
        let seen = Seen::default();
        let app = Router::new()
            .route(
                "/app/notify",
                post(
                    |State(seen): State<Seen>, request: AxumRequest| async move {
                        let response_file = request.headers()["bits-response-datafile-name"]
                            .to_str()
                            .expect("path")
                            .to_owned();
                        tokio::fs::write(response_file, b"app reply")
                            .await
                            .expect("write response file");
                        record(State(seen), request).await
                    },
                ),
            )
            .with_state(seen.clone());
        let addr = serve(app).await;
        let request = by_reference(addr, &dir);
        let reply_file = dir.path("reply.bin");

        let answer = notify(&request, &timeouts(), &reply_file, 1024)
            .await
            .expect("notify");

        assert_eq!(
            answer,
            AppAnswer {
                reply: AppReply::None,
                copy_to_destination: false,
            }
        );
        assert!(!reply_file.exists());
        assert_eq!(
            std::fs::read(dir.path("response.bin")).expect("response file"),
            b"app reply"
        );
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 1);
        let got = &seen[0];
        assert_eq!(got.method, Method::POST);
        assert_eq!(got.uri, "/app/notify?job=1");
        assert!(got.body.is_empty());
        let h = &got.headers;
        assert_eq!(h[HOST], format!("127.0.0.1:{}", addr.port()).as_str());
        assert_eq!(h[USER_AGENT], "axum-bits");
        assert_eq!(h[ACCEPT], "*/*");
        assert_eq!(h[CONTENT_LENGTH], "0");
        assert_eq!(
            h["bits-original-request-url"],
            "http://bits.example/upload/a.bin"
        );
        assert_eq!(
            h["bits-request-datafile-name"],
            dir.path("request.bin").to_str().expect("utf-8")
        );
        assert_eq!(
            h["bits-response-datafile-name"],
            dir.path("response.bin").to_str().expect("utf-8")
        );
    }

    #[tokio::test]
    async fn static_url_replaces_reply() {
        let dir = TestDir::new();
        let addr = serve_route(|| async {
            (
                [("BITS-Static-Response-URL", "https://example.com/reply?id=7")],
                "ignored body",
            )
        })
        .await;
        let reply_file = dir.path("reply.bin");

        let answer = notify(
            &by_value(addr, &dir, b"data"),
            &timeouts(),
            &reply_file,
            1024,
        )
        .await
        .expect("notify");
        assert_eq!(
            answer.reply,
            AppReply::Static("https://example.com/reply?id=7".to_owned())
        );
        assert!(!reply_file.exists());

        let answer = notify(&by_reference(addr, &dir), &timeouts(), &reply_file, 1024)
            .await
            .expect("notify");
        assert_eq!(
            answer.reply,
            AppReply::Static("https://example.com/reply?id=7".to_owned())
        );
    }

    #[tokio::test]
    async fn relative_static_url_is_malformed() {
        let dir = TestDir::new();
        let addr = serve_route(|| async { ([("BITS-Static-Response-URL", "/reply")], "") }).await;
        let reply_file = dir.path("reply.bin");
        let err = notify(
            &by_value(addr, &dir, b"data"),
            &timeouts(),
            &reply_file,
            1024,
        )
        .await
        .expect_err("relative URL");
        assert!(matches!(err, NotifyError::Malformed(_)), "{err:?}");
        assert!(!reply_file.exists());
    }

    #[tokio::test]
    async fn copy_header_sets_flag() {
        let dir = TestDir::new();
        let addr =
            serve_route(|| async { ([("BITS-Copy-File-To-Destination", "true")], "ok") }).await;
        let reply_file = dir.path("reply.bin");

        let answer = notify(&by_reference(addr, &dir), &timeouts(), &reply_file, 1024)
            .await
            .expect("notify");
        assert_eq!(
            answer,
            AppAnswer {
                reply: AppReply::None,
                copy_to_destination: true,
            }
        );

        let answer = notify(
            &by_value(addr, &dir, b"data"),
            &timeouts(),
            &reply_file,
            1024,
        )
        .await
        .expect("notify");
        assert_eq!(
            answer,
            AppAnswer {
                reply: AppReply::Written { len: 2 },
                copy_to_destination: true,
            }
        );
        assert_eq!(std::fs::read(&reply_file).expect("reply"), b"ok");
    }

    #[tokio::test]
    async fn empty_answer_writes_empty_reply() {
        let dir = TestDir::new();
        let addr = serve_route(|| async {}).await;
        let reply_file = dir.path("reply.bin");
        let answer = notify(
            &by_value(addr, &dir, b"data"),
            &timeouts(),
            &reply_file,
            1024,
        )
        .await
        .expect("notify");
        assert_eq!(answer.reply, AppReply::Written { len: 0 });
        assert_eq!(std::fs::read(&reply_file).expect("reply"), b"");
    }

    #[tokio::test]
    async fn error_status_is_reported() {
        for status in [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::SERVICE_UNAVAILABLE,
        ] {
            let dir = TestDir::new();
            let addr = serve_route(move || async move { (status, "failure") }).await;
            let reply_file = dir.path("reply.bin");
            let err = notify(
                &by_value(addr, &dir, b"data"),
                &timeouts(),
                &reply_file,
                1024,
            )
            .await
            .expect_err("error status");
            assert!(
                matches!(err, NotifyError::Status(s) if s == status),
                "{err:?}"
            );
            assert!(!reply_file.exists());
        }
    }

    #[tokio::test]
    async fn slow_application_times_out_in_send() {
        let dir = TestDir::new();
        let addr = serve_route(|| async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            "late"
        })
        .await;
        let timeouts = Timeouts {
            send: Duration::from_millis(200),
            ..timeouts()
        };
        let reply_file = dir.path("reply.bin");
        let err = notify(&by_value(addr, &dir, b"data"), &timeouts, &reply_file, 1024)
            .await
            .expect_err("timeout");
        assert!(
            matches!(err, NotifyError::Timeout(TimeoutPhase::Send)),
            "{err:?}"
        );
        assert!(!reply_file.exists());
    }

    #[tokio::test]
    async fn slow_body_times_out_in_receive() {
        let dir = TestDir::new();
        let addr = serve_raw(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
            Duration::from_secs(3),
        )
        .await;
        let timeouts = Timeouts {
            receive: Duration::from_millis(200),
            ..timeouts()
        };
        let reply_file = dir.path("reply.bin");
        let err = notify(&by_value(addr, &dir, b"data"), &timeouts, &reply_file, 1024)
            .await
            .expect_err("timeout");
        assert!(
            matches!(err, NotifyError::Timeout(TimeoutPhase::Receive)),
            "{err:?}"
        );
        assert!(!reply_file.exists());
    }

    #[tokio::test]
    async fn refused_connection_is_unreachable() {
        let dir = TestDir::new();
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            listener.local_addr().expect("local addr")
        };
        let reply_file = dir.path("reply.bin");
        let err = notify(&by_reference(addr, &dir), &timeouts(), &reply_file, 1024)
            .await
            .expect_err("refused");
        assert!(matches!(err, NotifyError::Unreachable(_)), "{err:?}");
    }

    #[tokio::test]
    async fn original_url_cannot_inject_headers() {
        let dir = TestDir::new();
        let (addr, seen) = serve_recorder().await;
        for original in [
            "http://bits.example/a.bin\r\nX-Injected: 1",
            "http://bits.example/a.bin\nX-Injected: 1",
            "http://bits.example/a.bin\0",
        ] {
            let mut request = by_value(addr, &dir, b"data");
            request.original_url = original.to_owned();
            let err = notify(&request, &timeouts(), &dir.path("reply.bin"), 1024)
                .await
                .expect_err("not a header value");
            assert!(matches!(err, NotifyError::Malformed(_)), "{err:?}");
        }
        assert!(seen.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn non_http_scheme_is_rejected() {
        let dir = TestDir::new();
        let mut request = by_reference("127.0.0.1:1".parse().expect("addr"), &dir);
        request.target = Uri::from_static("https://127.0.0.1/app");
        let err = notify(&request, &timeouts(), &dir.path("reply.bin"), 1024)
            .await
            .expect_err("https");
        assert!(matches!(err, NotifyError::Malformed(_)), "{err:?}");
    }

    #[tokio::test]
    async fn oversized_reply_is_refused() {
        let dir = TestDir::new();
        let addr = serve_route(|| async { "x".repeat(100) }).await;
        let reply_file = dir.path("reply.bin");
        let err = notify(&by_value(addr, &dir, b"data"), &timeouts(), &reply_file, 10)
            .await
            .expect_err("too large");
        assert!(
            matches!(err, NotifyError::ReplyTooLarge { max: 10 }),
            "{err:?}"
        );
        assert!(!reply_file.exists());
    }

    #[tokio::test]
    async fn oversized_reply_without_length_is_refused() {
        let dir = TestDir::new();
        let addr = serve_raw(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello, this is far too long",
            Duration::ZERO,
        )
        .await;
        let reply_file = dir.path("reply.bin");
        let err = notify(&by_value(addr, &dir, b"data"), &timeouts(), &reply_file, 10)
            .await
            .expect_err("too large");
        assert!(
            matches!(err, NotifyError::ReplyTooLarge { max: 10 }),
            "{err:?}"
        );
        assert!(!reply_file.exists());
    }

    #[tokio::test]
    async fn reply_until_connection_close() {
        let dir = TestDir::new();
        let addr = serve_raw(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello",
            Duration::ZERO,
        )
        .await;
        let reply_file = dir.path("reply.bin");
        let answer = notify(
            &by_value(addr, &dir, b"data"),
            &timeouts(),
            &reply_file,
            1024,
        )
        .await
        .expect("notify");
        assert_eq!(answer.reply, AppReply::Written { len: 5 });
        assert_eq!(std::fs::read(&reply_file).expect("reply"), b"hello");
    }

    #[tokio::test]
    async fn large_upload_is_streamed() {
        let dir = TestDir::new();
        let (addr, seen) = serve_recorder().await;
        let data = pattern(10 * 1024 * 1024);
        let request = by_value(addr, &dir, &data);
        let reply_file = dir.path("reply.bin");

        let answer = notify(&request, &timeouts(), &reply_file, 1024)
            .await
            .expect("notify");

        let expected = format!("len={} sum={:016x}", data.len(), fnv(&data));
        assert_eq!(
            answer.reply,
            AppReply::Written {
                len: expected.len() as u64
            }
        );
        assert_eq!(
            std::fs::read(&reply_file).expect("reply"),
            expected.as_bytes()
        );
        let seen = seen.lock().expect("lock");
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].body.len(), data.len());
    }
}
