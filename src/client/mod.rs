//! A BITS upload client (feature `client`): upload to IIS's BITS Server Extension or to this
//! crate's server from Linux, macOS or a CI pipeline, without Windows.
//!
//! ```no_run
//! use axum_bits::client::{BitsClient, Error, UploadSource};
//!
//! # async fn run() -> Result<(), Error> {
//! let client = BitsClient::builder().basic_auth("uploader", "secret").build()?;
//! let uploaded = client
//!     .upload(
//!         "https://files.example.com/inbox/report.bin",
//!         UploadSource::file("report.bin").await?,
//!     )
//!     .on_progress(|p| eprint!("\r{} / {} bytes", p.sent(), p.total))
//!     .await?;
//! println!("uploaded {} bytes in session {}", uploaded.bytes, uploaded.session_id);
//! # Ok(())
//! # }
//! ```
//!
//! # What it does
//!
//! It speaks the protocol as the Windows client does:
//!
//! | Situation | What the client does |
//! |---|---|
//! | Start | Ping, then Create-Session offering `{7df0354d-...}`; follows `BITS-Host-Id` (Ping to it first), falling back to the original host after `BITS-Host-Id-Fallback-Timeout` of failed connections, or at once (and for the rest of the upload) if the host's certificate is refused |
//! | Every Fragment Ack, 200 or 416 | continues at the server's `BITS-Received-Content-Range`, forwards or backwards |
//! | 413 | sends the same bytes in fragments half the size, never below 5 KiB |
//! | `BG_E_SESSION_NOT_FOUND` (`0x8020001F`) | creates a new session and starts over from byte 0 (at most [`max_restarts`](BitsClientBuilder::max_restarts) times) |
//! | 5xx (but 501/505), 408, 409, 429, transport failures | retries with jittered exponential backoff (1 s doubling to 60 s) until nothing has moved for [`no_progress_timeout`](BitsClientBuilder::no_progress_timeout) (5 min) |
//! | 4xx, 501, `E_INVALIDARG`, `E_ACCESSDENIED`, `BG_E_TOO_LARGE`, redirects, a refused server certificate | stops with an error that names the code and what to do about it |
//! | Close-Session answered 5xx | re-sends it; `0x8020001F` after an uncertain attempt counts as closed |
//! | [`cancel_on(signal)`](UploadBuilder::cancel_on) fires | sends Cancel-Session and returns [`Error::Cancelled`] |
//! | Upload-reply ([`reply_to_file`](UploadBuilder::reply_to_file), [`reply_in_memory`](UploadBuilder::reply_in_memory)) | downloads `BITS-Reply-URL` (IIS's relative, backslashed form resolved against the upload URL) with `Range`, resumed with `If-Range` after interruptions, then closes |
//!
//! Errors say what went wrong in words: [`ServerError`]'s message names the
//! `BITS-Error-Code` and what to do about it ([`ServerError::hint`]).
//!
//! # Sources, TLS and credentials
//!
//! An [`UploadSource`] is a file (re-readable from any offset; a change of its size or
//! modification time during the upload is `BG_E_LOCAL_FILE_CHANGED`), bytes, or a stream of
//! known length (which keeps only the current fragment, so it survives retries and 413s but
//! not a server that asks for earlier bytes). File fragments are streamed from disk with
//! positional reads a few chunks ahead of the socket; memory does not grow with the fragment
//! size. [`resume(session_id)`](UploadBuilder::resume) continues an interrupted upload's
//! session in a later run.
//!
//! HTTPS uses rustls with the system's and Mozilla's roots
//! ([`add_root_certificate_pem`](BitsClientBuilder::add_root_certificate_pem) for an internal
//! CA; part C of `tests/client.rs` runs the client against the server behind TLS). Basic
//! credentials and any extra header go with every packet, and to the reply only if it is on
//! the same host.
//!
//! Not supported: NTLM and Negotiate (Kerberos) authentication, which IIS sites often use
//! (Basic, and any header such as a bearer token, are); HTTP/2 (BITS is HTTP/1.1).
//!
//! # The command-line uploader
//!
//! `examples/upload.rs` in the repository is a command-line uploader with a progress bar;
//! while the server cannot be reached, or answers with a transient error, the bar says why and
//! counts down to the next attempt (`retrying in 4 s (connection refused)`):
//!
//! ```text
//! cargo run --example upload -- FILE URL [--fragment-size 8M] [--reply-out PATH]
//!     [--resume SESSION-ID] [--user USER:PASSWORD] [--header 'NAME: VALUE'] [--no-progress-timeout SECS]
//!     [--insecure] [--quiet]
//! ```
//!
//! ```text
//! uploading big.bin (28.6 MiB) to http://127.0.0.1:8080/big.bin
//! session {BBE1231B-22CD-474E-82B2-4F0BF4634207} (continue an interrupted upload with --resume {BBE1231B-22CD-474E-82B2-4F0BF4634207})
//! [##############################] 100% 28.6 MiB / 28.6 MiB  217.0 MiB/s
//! done: 28.6 MiB in 0.1 s (216.9 MiB/s), session {BBE1231B-22CD-474E-82B2-4F0BF4634207}
//! ```
//!
//! An error is printed with its BITS meaning, for instance
//! `error: Create-Session: the server answered 403 Forbidden with BITS-Error-Code 0x80070005
//! (E_ACCESSDENIED): access denied: ...; check the URL, your credentials, and whether the
//! server allows overwriting`. Ctrl-C cancels the session on the server. The exit code is 1
//! for a failed upload, 2 for bad arguments, 130 when cancelled.

mod error;
mod policy;
mod progress;
mod reply;
mod source;
mod upload;

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::Url;

pub use error::{Error, ServerError, TransportError};
pub use progress::{Progress, UploadPhase};
pub use reply::DownloadedReply;
pub use source::UploadSource;
pub use upload::{UploadBuilder, Uploaded};

use crate::protocol::headers as h;
use crate::protocol::{
    AckParseError, MIN_FRAGMENT_SIZE, PacketType, ParsedAck, UPLOAD_PROTOCOL, bits_post,
};
use policy::{RetryDelay, Verdict, judge};

/// A BITS upload client. Cheap to clone; clones share connections.
#[derive(Clone, Debug)]
pub struct BitsClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Redirects are never followed by it: BITS packets do not follow them, and reply
    /// downloads follow them one hop at a time (credentials stay with the upload's hosts).
    http: reqwest::Client,
    config: Config,
}

#[derive(Debug, Clone)]
struct Config {
    fragment_size: u64,
    ping: bool,
    follow_host_id: bool,
    request_timeout: Duration,
    no_progress_timeout: Duration,
    retry_initial: Duration,
    retry_max: Duration,
    max_restarts: u32,
    headers: HeaderMap,
    basic_auth: Option<(String, String)>,
}

impl Config {
    /// Whether packets carry credentials: Basic, or an `Authorization` header.
    fn sends_credentials(&self) -> bool {
        self.basic_auth.is_some() || self.headers.contains_key(header::AUTHORIZATION)
    }
}

impl BitsClient {
    /// A client with the defaults of [`BitsClientBuilder`].
    pub fn new() -> Result<Self, Error> {
        Self::builder().build()
    }

    /// Configures a client.
    pub fn builder() -> BitsClientBuilder {
        BitsClientBuilder::default()
    }

    /// Uploads `source` to `url`; configure the upload on the returned builder and `.await`
    /// it.
    pub fn upload(&self, url: impl AsRef<str>, source: UploadSource) -> UploadBuilder {
        UploadBuilder::new(self.clone(), parse_url(url.as_ref()), source)
    }

    /// Sends one Ping (no retries): checks that the URL speaks BITS and gets authentication
    /// done.
    pub async fn ping(&self, url: &str) -> Result<(), Error> {
        let url = parse_url(url)?;
        let config = &self.inner.config;
        let answer = self
            .exchange(&url, PacketType::Ping, None, None)
            .await
            .map_err(|e| transport(PacketType::Ping, e))?;
        match judge(
            PacketType::Ping,
            answer.status,
            answer.ack,
            config.sends_credentials(),
        ) {
            Verdict::Done(_) => Ok(()),
            Verdict::Transient(e) => Err(Error::Server(e)),
            Verdict::Fatal(e) => Err(e),
            other => Err(unexpected(PacketType::Ping, answer.status, &other)),
        }
    }

    /// Cancels a session (for instance one left behind by an interrupted upload whose id was
    /// saved): Cancel-Session, re-sent on transient errors until the no-progress timeout. A
    /// session the server no longer knows counts as cancelled.
    pub async fn cancel_session(&self, url: &str, session_id: &str) -> Result<(), Error> {
        let url = parse_url(url)?;
        let id = HeaderValue::from_str(session_id)
            .map_err(|_| Error::InvalidSessionId(session_id.to_owned()))?;
        let config = &self.inner.config;
        let mut backoff = RetryDelay::new(config.retry_initial, config.retry_max);
        let started = std::time::Instant::now();
        loop {
            let error = match self
                .exchange(&url, PacketType::CancelSession, Some(&id), None)
                .await
            {
                Err(e) => transport(PacketType::CancelSession, e),
                Ok(answer) => match judge(
                    PacketType::CancelSession,
                    answer.status,
                    answer.ack,
                    config.sends_credentials(),
                ) {
                    Verdict::Done(_) | Verdict::SessionLost => return Ok(()),
                    Verdict::Transient(e) => Error::Server(e),
                    Verdict::Fatal(e) => return Err(e),
                    other => {
                        return Err(unexpected(PacketType::CancelSession, answer.status, &other));
                    }
                },
            };
            if started.elapsed() >= config.no_progress_timeout {
                return Err(Error::NoProgress {
                    elapsed: started.elapsed(),
                    last: Box::new(error),
                });
            }
            tokio::time::sleep(backoff.next_delay(policy::random())).await;
        }
    }

    /// One request: a packet, its session id, and for a Fragment its range and body.
    async fn exchange(
        &self,
        url: &Url,
        packet: PacketType,
        session_id: Option<&HeaderValue>,
        fragment: Option<FragmentRequest>,
    ) -> Result<Answer, reqwest::Error> {
        let config = &self.inner.config;
        let mut request = self
            .inner
            .http
            .request(bits_post(), url.clone())
            .timeout(config.request_timeout)
            .headers(config.headers.clone())
            .header(h::BITS_PACKET_TYPE, packet.as_str());
        if let Some((user, password)) = &config.basic_auth {
            request = request.basic_auth(user, Some(password));
        }
        if let Some(id) = session_id {
            request = request.header(h::BITS_SESSION_ID, id.clone());
        }
        if packet == PacketType::CreateSession {
            request = request.header(h::BITS_SUPPORTED_PROTOCOLS, UPLOAD_PROTOCOL);
        }
        request = match fragment {
            Some(fragment) => {
                let mut request = request
                    .header(header::CONTENT_RANGE, fragment.range)
                    .header(header::CONTENT_LENGTH, fragment.len);
                if let Some(name) = fragment.content_name {
                    request = request.header(h::CONTENT_NAME, name);
                }
                request.body(reqwest::Body::wrap(fragment.body))
            }
            None => request
                .header(header::CONTENT_LENGTH, 0)
                .body(reqwest::Body::from(bytes::Bytes::new())),
        };
        let response = request.send().await?;
        let status = response.status();
        let ack = ParsedAck::parse(status, response.headers());
        discard_body(response).await;
        Ok(Answer { status, ack })
    }
}

/// The parts of a Fragment request.
struct FragmentRequest {
    range: String,
    len: u64,
    content_name: Option<HeaderValue>,
    body: source::FragmentBody,
}

/// A response, read as an Ack.
struct Answer {
    status: StatusCode,
    ack: Result<ParsedAck, AckParseError>,
}

/// Reads and drops a response body (Acks have none; an error page from a proxy might), so
/// that the connection can be reused; a body over 64 KiB is abandoned with its connection.
async fn discard_body(mut response: reqwest::Response) {
    let mut left: usize = 64 * 1024;
    while let Ok(Some(chunk)) = response.chunk().await {
        match left.checked_sub(chunk.len()) {
            Some(rest) => left = rest,
            None => return,
        }
    }
}

fn parse_url(url: &str) -> Result<Url, Error> {
    let invalid = |reason: String| Error::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(
            "only http and https URLs can take BITS uploads".into(),
        ));
    }
    if parsed.host().is_none() {
        return Err(invalid("the URL has no host".into()));
    }
    if parsed.fragment().is_some() {
        return Err(invalid("a URL fragment (#...) cannot be sent".into()));
    }
    Ok(parsed)
}

/// Whether a transport failure is the server's certificate being refused (unknown issuer,
/// expired, wrong name, none at all): a retry meets the same certificate, so it is fatal.
pub(crate) fn is_certificate_error(error: &reqwest::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            );
        }
        next = match e.downcast_ref::<std::io::Error>() {
            // An io::Error's `source` skips the error it wraps: look inside instead.
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    false
}

fn transport(packet: PacketType, source: reqwest::Error) -> Error {
    Error::Transport {
        packet: packet.as_str(),
        source: TransportError::new(source),
    }
}

fn build_error(source: reqwest::Error) -> Error {
    Error::Build(TransportError::new(source))
}

/// A verdict that cannot follow this packet (a Fragment-only answer to another packet).
fn unexpected(packet: PacketType, status: StatusCode, verdict: &Verdict) -> Error {
    Error::InvalidResponse {
        packet: packet.as_str(),
        status,
        reason: format!("unexpected answer {verdict:?}"),
    }
}

/// Configures a [`BitsClient`].
///
/// ```
/// use std::time::Duration;
/// use axum_bits::client::BitsClient;
///
/// let client = BitsClient::builder()
///     .fragment_size(1 << 20)
///     .no_progress_timeout(Duration::from_secs(60))
///     .basic_auth("uploader", "secret")
///     .build()?;
/// # Ok::<(), axum_bits::client::Error>(())
/// ```
#[derive(Debug)]
pub struct BitsClientBuilder {
    config: Config,
    user_agent: String,
    connect_timeout: Duration,
    no_proxy: bool,
    accept_invalid_certs: bool,
    root_certificates: Vec<Vec<u8>>,
    http_client: Option<reqwest::Client>,
    invalid_header: Option<String>,
}

impl Default for BitsClientBuilder {
    fn default() -> Self {
        Self {
            config: Config {
                fragment_size: 8 << 20,
                ping: true,
                follow_host_id: true,
                request_timeout: Duration::from_secs(10 * 60),
                no_progress_timeout: Duration::from_secs(5 * 60),
                retry_initial: Duration::from_secs(1),
                retry_max: Duration::from_secs(60),
                max_restarts: 5,
                headers: HeaderMap::new(),
                basic_auth: None,
            },
            user_agent: format!(
                "axum-bits/{} (BITS upload client)",
                env!("CARGO_PKG_VERSION")
            ),
            connect_timeout: Duration::from_secs(30),
            no_proxy: false,
            accept_invalid_certs: false,
            root_certificates: Vec::new(),
            http_client: None,
            invalid_header: None,
        }
    }
}

impl BitsClientBuilder {
    /// Bytes per fragment (default 8 MiB; at least 5 KiB). Windows sends 5 KB to 13 MB; a
    /// server that wants less answers 413 and the client halves it for the rest of the upload.
    pub fn fragment_size(mut self, bytes: u64) -> Self {
        self.config.fragment_size = bytes.max(MIN_FRAGMENT_SIZE);
        self
    }

    /// Whether to send a Ping before Create-Session and to a `BITS-Host-Id` host, as Windows
    /// does (default true).
    pub fn ping(mut self, ping: bool) -> Self {
        self.config.ping = ping;
        self
    }

    /// Whether to follow `BITS-Host-Id` (default true, as the protocol requires in a farm
    /// that uses it).
    pub fn follow_host_id(mut self, follow: bool) -> Self {
        self.config.follow_host_id = follow;
        self
    }

    /// How long one request may take, from sending it to the end of the Ack (default 10
    /// minutes: the final fragment of an upload-reply job waits for the server's
    /// application).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// How long to connect (default 30 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long transient errors are retried without any progress before the upload fails
    /// (default 5 minutes; Windows' is 14 days). Progress is any Ack that moves the upload
    /// forward.
    pub fn no_progress_timeout(mut self, timeout: Duration) -> Self {
        self.config.no_progress_timeout = timeout;
        self
    }

    /// The delay before the first retry (default 1 s), doubling up to `max` (default 60 s),
    /// with jitter.
    pub fn retry_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.config.retry_initial = initial;
        self.config.retry_max = max;
        self
    }

    /// How many times an upload may start over because the server lost its session
    /// (default 5).
    pub fn max_restarts(mut self, restarts: u32) -> Self {
        self.config.max_restarts = restarts;
        self
    }

    /// HTTP Basic credentials, sent with every packet (use HTTPS).
    pub fn basic_auth(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.config.basic_auth = Some((user.into(), password.into()));
        self
    }

    /// A header sent with every packet, and with the reply download when it goes to the same
    /// host (an `Authorization: Bearer ...`, an API key).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(mut value)) => {
                if name == header::AUTHORIZATION {
                    value.set_sensitive(true);
                }
                self.config.headers.insert(name, value);
            }
            _ => self.invalid_header = Some(name.to_owned()),
        }
        self
    }

    /// The `User-Agent` (default `axum-bits/<version> (BITS upload client)`).
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = user_agent.into();
        self
    }

    /// Ignores `HTTP(S)_PROXY` and the system's proxy settings.
    pub fn no_proxy(mut self) -> Self {
        self.no_proxy = true;
        self
    }

    /// Trusts an extra root certificate (PEM), for servers with an internal CA.
    pub fn add_root_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificates.push(pem.into());
        self
    }

    /// Accepts any server certificate. Only for tests against self-signed servers.
    pub fn danger_accept_invalid_certs(mut self, accept: bool) -> Self {
        self.accept_invalid_certs = accept;
        self
    }

    /// Uses this HTTP client (your TLS, proxy and connection settings) instead of building
    /// one; the connection options of this builder are then ignored. It should not follow
    /// redirects (build it with `redirect(Policy::none())`): BITS uploads never do, and the
    /// reply download follows them itself so that credentials stay with the upload's hosts.
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http_client = Some(client);
        self
    }

    /// Builds the client.
    pub fn build(self) -> Result<BitsClient, Error> {
        if let Some(name) = self.invalid_header {
            return Err(Error::InvalidHeader(name));
        }
        let http = match self.http_client {
            Some(client) => client,
            None => {
                let mut builder = reqwest::Client::builder()
                    .user_agent(self.user_agent.clone())
                    .connect_timeout(self.connect_timeout)
                    .pool_idle_timeout(Duration::from_secs(90))
                    .tcp_nodelay(true)
                    .redirect(reqwest::redirect::Policy::none())
                    .referer(false)
                    .danger_accept_invalid_certs(self.accept_invalid_certs);
                if self.no_proxy {
                    builder = builder.no_proxy();
                }
                for pem in &self.root_certificates {
                    let cert = reqwest::Certificate::from_pem(pem).map_err(build_error)?;
                    builder = builder.add_root_certificate(cert);
                }
                builder.build().map_err(build_error)?
            }
        };
        Ok(BitsClient {
            inner: Arc::new(Inner {
                http,
                config: self.config,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(parse_url("http://h/f.bin").is_ok());
        assert!(parse_url("https://h:8443/a/f.bin?x=1").is_ok());
        for bad in ["ftp://h/f", "h/f.bin", "http://h/f#frag", "file:///x", ""] {
            assert!(
                matches!(parse_url(bad), Err(Error::InvalidUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn builder_rejects_bad_headers_and_clamps_fragments() {
        assert!(
            BitsClient::builder()
                .header("bad header", "x")
                .build()
                .is_err()
        );
        assert!(
            BitsClient::builder()
                .header("x-ok", "bad\nvalue")
                .build()
                .is_err()
        );
        let client = BitsClient::builder().fragment_size(1).build().unwrap();
        assert_eq!(client.inner.config.fragment_size, MIN_FRAGMENT_SIZE);
        let bearer = BitsClient::builder()
            .header("authorization", "Bearer t")
            .build()
            .unwrap();
        let value = bearer
            .inner
            .config
            .headers
            .get(header::AUTHORIZATION)
            .unwrap();
        assert_eq!(value, "Bearer t");
        assert!(value.is_sensitive());
    }
}
