//! What can go wrong in an upload, and what to tell the person running it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use http::StatusCode;

use crate::protocol::Hresult;

/// Why an upload (or a single packet) failed.
///
/// Every variant's message is written for the person running the upload; a
/// [`ServerError`] adds [`ServerError::hint`] with what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL cannot be used for a BITS upload.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server answered with an error that retrying will not fix, or with a transient one
    /// for longer than the no-progress timeout.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// A header given to the builder has an invalid name or value.
    #[error("the header {0:?} has an invalid name or value")]
    InvalidHeader(String),
    /// A session id to resume or cancel that cannot be sent in a header.
    #[error("{0:?} is not a valid BITS session id")]
    InvalidSessionId(String),
    /// The server's answer does not follow the protocol (`BG_E_INVALID_SERVER_RESPONSE`).
    #[error("{packet}: the server's answer ({status}) is not a valid BITS Ack: {reason}")]
    InvalidResponse {
        /// The packet that was answered.
        packet: &'static str,
        /// The answer's HTTP status.
        status: StatusCode,
        /// What is wrong with it.
        reason: String,
    },
    /// The request did not get an answer: connection refused or reset, TLS failure, timeout.
    #[error("{packet}: {}", with_causes(source))]
    Transport {
        /// The packet that was being sent.
        packet: &'static str,
        /// What went wrong below HTTP.
        #[source]
        source: TransportError,
    },
    /// Transient failures went on for longer than the no-progress timeout.
    #[error("no progress for {:.0?}; giving up. The last error: {last}", elapsed)]
    NoProgress {
        /// How long nothing moved.
        elapsed: Duration,
        /// The failure that ended it.
        last: Box<Error>,
    },
    /// The server kept losing the session (`BG_E_SESSION_NOT_FOUND`) and the upload started
    /// over more often than allowed.
    #[error("the server lost the upload session {0} times; giving up")]
    TooManyRestarts(u32),
    /// The server answers 413 even to fragments of the smallest size a BITS client sends.
    #[error(
        "the server rejects fragments of {0} bytes as too large (413), and BITS does not go \
         below 5 KiB"
    )]
    FragmentTooLarge(u64),
    /// The server chose a protocol this client does not speak.
    #[error("the server chose the unknown upload protocol {0:?}")]
    ProtocolMismatch(String),
    /// Reading the file (or stream) being uploaded failed.
    #[error("reading {}: {source}", path.as_ref().map_or("the upload source".into(), |p| p.display().to_string()))]
    Source {
        /// The file, if the source is one.
        path: Option<PathBuf>,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file's size or modification time changed after the upload began
    /// (`BG_E_LOCAL_FILE_CHANGED`).
    #[error("{} changed while it was being uploaded", path.display())]
    LocalFileChanged {
        /// The file.
        path: PathBuf,
    },
    /// The server asked for bytes a stream source has already passed.
    #[error(
        "the server asked for byte {offset} again, but the stream being uploaded is already \
         past byte {position} and cannot go back (upload a file to allow that)"
    )]
    NotRewindable {
        /// The byte the server expects next.
        offset: u64,
        /// The first byte the stream can still provide.
        position: u64,
    },
    /// A reply was asked for, but the final Ack carried no `BITS-Reply-URL`. The upload itself
    /// completed and the session was closed.
    #[error(
        "the upload completed, but the server sent no BITS-Reply-URL: this URL is not set up \
         for upload-reply jobs"
    )]
    NoReplyUrl,
    /// The reply is larger than the in-memory limit.
    #[error("the reply is larger than the {limit} bytes allowed in memory")]
    ReplyTooLarge {
        /// The limit.
        limit: u64,
    },
    /// Writing the reply to its file failed.
    #[error("writing the reply to {}: {source}", path.display())]
    ReplyWrite {
        /// The reply file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The upload was cancelled; the server was sent Cancel-Session.
    #[error("the upload was cancelled")]
    Cancelled,
    /// The HTTP client could not be built (TLS setup, an invalid certificate, ...).
    #[error("building the HTTP client: {}", with_causes(.0))]
    Build(#[source] TransportError),
}

/// A failure of the HTTP transport underneath the protocol: connecting (refused, unreachable,
/// a name that does not resolve), TLS, a timeout, a connection cut off, or setting up the HTTP
/// client.
///
/// It is opaque so that the HTTP library the client is built on can change without changing
/// this API. Its message is the top-level one; [`source`](std::error::Error::source) leads
/// to the causes, the innermost of which is usually the most telling ("Connection refused").
#[derive(Debug)]
pub struct TransportError(reqwest::Error);

impl TransportError {
    pub(crate) fn new(error: reqwest::Error) -> Self {
        Self(error)
    }

    /// Whether the request (or connecting) took longer than its timeout.
    pub fn is_timeout(&self) -> bool {
        self.0.is_timeout()
    }

    /// Whether the failure happened while connecting: refused, unreachable, a name that did
    /// not resolve, a failed TLS handshake.
    pub fn is_connect(&self) -> bool {
        self.0.is_connect()
    }

    /// Whether the server's certificate was refused (unknown issuer, expired, wrong name,
    /// none at all). Retrying meets the same certificate.
    pub fn is_certificate(&self) -> bool {
        super::is_certificate_error(&self.0)
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // The wrapped error is an implementation detail: its causes are what tell.
        self.0.source()
    }
}

/// An error and its causes, `: `-separated (reqwest's own message hides the cause, such as
/// "connection refused").
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = e.source();
    }
    text
}

impl Error {
    /// The server's error, if this is one (also inside [`Error::NoProgress`]).
    pub fn server_error(&self) -> Option<&ServerError> {
        match self {
            Self::Server(e) => Some(e),
            Self::NoProgress { last, .. } => last.server_error(),
            _ => None,
        }
    }

    /// The `BITS-Error-Code` the server sent, if any.
    pub fn code(&self) -> Option<Hresult> {
        self.server_error().and_then(ServerError::code)
    }

    /// The failure in a few words, for a status line: the innermost cause of a transport
    /// failure ("Connection refused (os error 111)"), the status and code of a server's
    /// answer, what is wrong with an invalid one.
    pub(crate) fn brief(&self) -> String {
        match self {
            Self::Transport { source, .. } | Self::Build(source) => {
                let mut innermost: &dyn std::error::Error = source;
                while let Some(cause) = innermost.source() {
                    innermost = cause;
                }
                innermost.to_string()
            }
            Self::Server(e) => e.brief(),
            Self::InvalidResponse { reason, .. } => reason.clone(),
            Self::NoProgress { last, .. } => last.brief(),
            other => other.to_string(),
        }
    }
}

/// An error answer from the server (or from something in front of it, when
/// [`ServerError::is_ack`] is false).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub(crate) packet: &'static str,
    pub(crate) status: StatusCode,
    pub(crate) code: Option<Hresult>,
    pub(crate) context: Option<u32>,
    pub(crate) is_ack: bool,
    pub(crate) transient: bool,
    /// Whether the request carried credentials (Basic or an `Authorization` header).
    pub(crate) credentials: bool,
}

impl ServerError {
    /// The packet (or `reply download`) that was answered.
    pub fn packet(&self) -> &'static str {
        self.packet
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// `BITS-Error-Code`.
    pub fn code(&self) -> Option<Hresult> {
        self.code
    }

    /// `BITS-Error-Context`: 5 when the BITS server itself failed, 7 when its application did.
    pub fn context(&self) -> Option<u32> {
        self.context
    }

    /// Whether the answer was a BITS Ack. If not, it came from a proxy, an authentication
    /// layer, or a web server that does not handle BITS at this URL.
    pub fn is_ack(&self) -> bool {
        self.is_ack
    }

    /// Whether the protocol counts this error as transient (worth retrying later).
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// Whether the refused request carried credentials (Basic, or an `Authorization`
    /// header): a 401 then means they were wrong rather than missing.
    pub fn credentials_sent(&self) -> bool {
        self.credentials
    }

    /// The status and the code's name (or number), or that the answer was not an Ack.
    fn brief(&self) -> String {
        let status = self.status;
        match self.code {
            Some(code) => match code.name() {
                Some(name) => format!("{status}, {name}"),
                None => format!("{status}, BITS-Error-Code {code}"),
            },
            None if !self.is_ack => format!("{status}, not a BITS Ack"),
            None => status.to_string(),
        }
    }

    /// What the error most likely means and what to do about it.
    pub fn hint(&self) -> String {
        if let Some(text) = self.code.and_then(Hresult::description) {
            let code = self.code.unwrap_or(Hresult::S_OK);
            return match (code, self.status.as_u16()) {
                (Hresult::E_ACCESSDENIED, 501) => {
                    "BITS uploads are not enabled for this URL on the server".into()
                }
                (Hresult::E_ACCESSDENIED, _) => format!(
                    "{text}; check the URL, your credentials, and whether the server allows \
                     overwriting"
                ),
                (Hresult::E_INVALIDARG, _) => format!(
                    "{text} (a path that names a folder, a changed file size, or a server that \
                     dislikes this client's headers)"
                ),
                _ => text,
            };
        }
        match self.status.as_u16() {
            401 if self.credentials => "the server refused the credentials sent: check the user \
                                        name and password (or the token), and that the account \
                                        may upload here"
                .into(),
            401 => "the server wants credentials and none were sent: give a user name and \
                    password (Basic) or an Authorization header"
                .into(),
            407 => "the proxy wants credentials".into(),
            404 if !self.is_ack => {
                "the URL does not exist on the server (or BITS uploads are not enabled there)"
                    .into()
            }
            405 | 501 if !self.is_ack => {
                "the server does not accept BITS_POST at this URL: BITS uploads are not enabled \
                 there"
                    .into()
            }
            300..=399 => "the server redirects; BITS uploads do not follow redirects, so use \
                          the final URL"
                .into(),
            _ if !self.is_ack => "the answer is not a BITS Ack: a proxy, a load balancer, or a \
                                  web server without BITS answered"
                .into(),
            _ if self.transient => "a temporary server-side failure".into(),
            _ => "the server refused the request".into(),
        }
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: the server answered {}", self.packet, self.status)?;
        match self.code {
            Some(code) => {
                write!(f, " with BITS-Error-Code {code}")?;
                if let Some(name) = code.name() {
                    write!(f, " ({name})")?;
                }
                match self.context {
                    Some(7) => f.write_str(" from the server's application")?,
                    Some(5) | None => {}
                    Some(other) => write!(f, ", context {other:#x}")?,
                }
            }
            None if !self.is_ack => f.write_str(" (not a BITS Ack)")?,
            None => {}
        }
        write!(f, ": {}", self.hint())
    }
}

impl std::error::Error for ServerError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status: u16, code: Option<u32>, context: Option<u32>, is_ack: bool) -> ServerError {
        ServerError {
            packet: "Fragment",
            status: StatusCode::from_u16(status).unwrap(),
            code: code.map(Hresult),
            context,
            is_ack,
            transient: false,
            credentials: false,
        }
    }

    #[test]
    fn messages_name_the_code_and_say_what_to_do() {
        let too_large = server(500, Some(0x8020_0020), Some(5), true).to_string();
        assert!(
            too_large.contains("0x80200020 (BG_E_TOO_LARGE)"),
            "{too_large}"
        );
        assert!(
            too_large.contains("larger than the server accepts"),
            "{too_large}"
        );

        let disabled = server(501, Some(0x8007_0005), Some(5), true).to_string();
        assert!(disabled.contains("not enabled"), "{disabled}");

        let denied = server(403, Some(0x8007_0005), Some(5), true).to_string();
        assert!(denied.contains("overwriting"), "{denied}");

        let app = server(500, Some(0x8019_01F4), Some(7), true).to_string();
        assert!(app.contains("from the server's application"), "{app}");
        assert!(app.contains("answered HTTP 500"), "{app}");

        let proxy = server(502, None, None, false).to_string();
        assert!(proxy.contains("not a BITS Ack"), "{proxy}");

        let auth = server(401, None, None, false).to_string();
        assert!(auth.contains("credentials"), "{auth}");
        assert!(auth.contains("none were sent"), "{auth}");
        let refused = ServerError {
            credentials: true,
            ..server(401, None, None, false)
        }
        .to_string();
        assert!(refused.contains("refused the credentials"), "{refused}");
        assert!(!refused.contains("none were sent"), "{refused}");

        let method = server(405, None, None, false).hint();
        assert!(method.contains("BITS_POST"), "{method}");

        let unknown = server(500, Some(0x1234_5678), Some(0x9), true).to_string();
        assert!(unknown.contains("0x12345678"), "{unknown}");
        assert!(unknown.contains("context 0x9"), "{unknown}");
    }

    #[test]
    fn briefs_are_short() {
        let busy = Error::NoProgress {
            elapsed: Duration::from_secs(1),
            last: Box::new(Error::Server(server(503, Some(0x8007_0070), Some(5), true))),
        };
        assert_eq!(busy.brief(), "503 Service Unavailable, ERROR_DISK_FULL");
        let unknown = Error::Server(server(500, Some(0x1234_5678), None, true));
        assert_eq!(
            unknown.brief(),
            "500 Internal Server Error, BITS-Error-Code 0x12345678"
        );
        assert_eq!(
            Error::Server(server(502, None, None, false)).brief(),
            "502 Bad Gateway, not a BITS Ack"
        );
        let invalid = Error::InvalidResponse {
            packet: "Fragment",
            status: StatusCode::OK,
            reason: "no BITS-Session-Id".into(),
        };
        assert_eq!(invalid.brief(), "no BITS-Session-Id");
        assert_eq!(Error::Cancelled.brief(), "the upload was cancelled");
    }

    #[test]
    fn code_is_found_through_no_progress() {
        let e = Error::NoProgress {
            elapsed: Duration::from_secs(1),
            last: Box::new(Error::Server(server(503, Some(0x8007_00AA), Some(5), true))),
        };
        assert_eq!(e.code(), Some(Hresult::BUSY));
        assert!(Error::Cancelled.code().is_none());
    }
}
