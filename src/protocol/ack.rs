use std::fmt;

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use super::{UPLOAD_PROTOCOL, headers as h};

/// An HRESULT as carried by `BITS-Error-Code`, formatted `0x` + 8 upper-case hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hresult(pub u32);

impl Hresult {
    /// No error; paired with 416 as [MC-BUP] does.
    pub const S_OK: Self = Self(0);
    /// `E_INVALIDARG`: the request is malformed or refers to something invalid. Fatal.
    pub const E_INVALIDARG: Self = Self(0x8007_0057);
    /// `E_ACCESSDENIED`: not allowed (403), or uploads disabled (501). Fatal.
    pub const E_ACCESSDENIED: Self = Self(0x8007_0005);
    /// `E_FAIL`: an unspecified server-side failure; sent with 500 so the client retries.
    pub const E_FAIL: Self = Self(0x8000_4005);
    /// `BG_E_SESSION_NOT_FOUND`: the session id is unknown; the client starts a new session.
    pub const BG_E_SESSION_NOT_FOUND: Self = Self(0x8020_001F);
    /// `BG_E_TOO_LARGE`: the file is larger than the server accepts. Fatal.
    pub const BG_E_TOO_LARGE: Self = Self(0x8020_0020);
    /// `HRESULT_FROM_WIN32(ERROR_DISK_FULL)`: the server is out of space. Transient.
    pub const DISK_FULL: Self = Self(0x8007_0070);
    /// `HRESULT_FROM_WIN32(ERROR_PATH_NOT_FOUND)`: the destination's folder does not exist.
    pub const PATH_NOT_FOUND: Self = Self(0x8007_0003);
    /// `HRESULT_FROM_WIN32(ERROR_SHARING_VIOLATION)`: another session is uploading the same
    /// destination.
    pub const SHARING_VIOLATION: Self = Self(0x8007_0020);
    /// `HRESULT_FROM_WIN32(ERROR_TOO_MANY_SESS)`: the server's session limit is reached.
    pub const TOO_MANY_SESSIONS: Self = Self(0x8007_0045);
    /// `HRESULT_FROM_WIN32(ERROR_TIMEOUT)`: the fragment body stalled, or the server
    /// application did not answer in time. ([MC-BUP] prints `0x80070112` for the latter, which
    /// decodes to an unrelated Win32 error; the client only displays the code, the 408 status
    /// is what makes it retry.)
    pub const TIMEOUT: Self = Self(0x8007_05B4);
    /// `HRESULT_FROM_WIN32(ERROR_FILE_EXISTS)`: the destination exists (transient form).
    pub const FILE_EXISTS: Self = Self(0x8007_0050);
    /// `HRESULT_FROM_WIN32(ERROR_SHUTDOWN_IN_PROGRESS)`: the server is shutting down (sent
    /// with 503, so the client retries later).
    pub const SHUTTING_DOWN: Self = Self(0x8007_045B);
    /// `ERROR_BUSY`: another server node is working on the session (503; the client retries).
    pub const BUSY: Self = Self(0x8007_00AA);

    /// `BG_E_HTTP_ERROR_<status>` (`0x80190000 + status`): how an application's HTTP status
    /// is relayed to the client.
    pub fn http_error(status: StatusCode) -> Self {
        Self(0x8019_0000 + u32::from(status.as_u16()))
    }

    /// The HTTP status a `BG_E_HTTP_ERROR_<status>` code relays, if this is one.
    pub fn relayed_http_status(self) -> Option<StatusCode> {
        let status = self.0.checked_sub(0x8019_0000)?;
        u16::try_from(status)
            .ok()
            .filter(|s| (100..=599).contains(s))
            .and_then(|s| StatusCode::from_u16(s).ok())
    }

    /// The symbolic name of a code a BITS server sends or a BITS client reports, if known
    /// (`BG_E_SESSION_NOT_FOUND`, `E_INVALIDARG`, ...).
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "S_OK",
            0x8007_0057 => "E_INVALIDARG",
            0x8007_0005 => "E_ACCESSDENIED",
            0x8000_4005 => "E_FAIL",
            0x8020_001F => "BG_E_SESSION_NOT_FOUND",
            0x8020_0020 => "BG_E_TOO_LARGE",
            0x8020_001B => "BG_E_INVALID_SERVER_RESPONSE",
            0x8020_0022 => "BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH",
            0x8020_001D => "BG_E_LOCAL_FILE_CHANGED",
            0x8007_0070 => "ERROR_DISK_FULL",
            0x8007_0003 => "ERROR_PATH_NOT_FOUND",
            0x8007_0020 => "ERROR_SHARING_VIOLATION",
            0x8007_0045 => "ERROR_TOO_MANY_SESS",
            0x8007_05B4 => "ERROR_TIMEOUT",
            0x8007_0112 => "ERROR_TIMEOUT (as printed by MC-BUP)",
            0x8007_0050 => "ERROR_FILE_EXISTS",
            0x8007_045B => "ERROR_SHUTDOWN_IN_PROGRESS",
            0x8007_00AA => "ERROR_BUSY",
            _ if self.relayed_http_status().is_some() => "BG_E_HTTP_ERROR",
            _ => return None,
        })
    }

    /// What the code means, in a sentence a person can act on; `None` for unknown codes.
    pub fn description(self) -> Option<String> {
        let text = match self.0 {
            0 => "no error",
            0x8007_0057 => "the server rejected the request as invalid",
            0x8007_0005 => {
                "access denied: not allowed to write this URL, the file exists and may not be \
                 overwritten, or BITS uploads are not enabled here"
            }
            0x8000_4005 => "the server failed for an unspecified reason",
            0x8020_001F => "the server does not know the upload session (expired or lost)",
            0x8020_0020 => "the file is larger than the server accepts",
            0x8020_001B => "the server's answer did not follow the BITS protocol",
            0x8020_0022 => "client and server have no upload protocol in common",
            0x8020_001D => "the local file changed while it was being uploaded",
            0x8007_0070 => "the server is out of disk space",
            0x8007_0003 => "the destination folder does not exist on the server",
            0x8007_0020 => "another upload to the same destination is in progress",
            0x8007_0045 => "the server has too many upload sessions open",
            0x8007_05B4 | 0x8007_0112 => "the server (or its application) did not finish in time",
            0x8007_0050 => "the destination file already exists",
            0x8007_045B => "the server is shutting down",
            0x8007_00AA => "another server node is busy with this session",
            _ => {
                return self
                    .relayed_http_status()
                    .map(|s| format!("the server application answered HTTP {s}"));
            }
        };
        Some(text.to_owned())
    }
}

impl fmt::Display for Hresult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            f.write_str("0x0")
        } else {
            write!(f, "0x{:08X}", self.0)
        }
    }
}

/// `BITS-Error-Context`: who produced an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorContext {
    /// `0x5`: the BITS server itself (`BG_ERROR_CONTEXT_REMOTE_FILE`).
    RemoteFile,
    /// `0x7`: the server application behind a notification
    /// (`BG_ERROR_CONTEXT_REMOTE_APPLICATION`).
    RemoteApplication,
}

impl fmt::Display for ErrorContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RemoteFile => "0x5",
            Self::RemoteApplication => "0x7",
        })
    }
}

/// A protocol response: an HTTP response with `BITS-Packet-Type: Ack`, `Content-Length: 0`
/// and no body, whose status and headers carry the outcome.
///
/// Built with plain setters and turned into a response by [`Ack::into_response`]; nothing here
/// does I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    status: StatusCode,
    error: Option<(Hresult, ErrorContext)>,
    session_id: Option<HeaderValue>,
    protocol: bool,
    received: Option<u64>,
    host_id: Option<HeaderValue>,
    host_id_fallback_timeout: Option<u64>,
    reply_url: Option<HeaderValue>,
}

impl Ack {
    /// A 200 Ack.
    pub fn ok() -> Self {
        Self::with_status(StatusCode::OK)
    }

    /// An Ack with the given status and no error headers (416 and 413 are sent this way or
    /// with [`Ack::error`]).
    pub fn with_status(status: StatusCode) -> Self {
        Self {
            status,
            error: None,
            session_id: None,
            protocol: false,
            received: None,
            host_id: None,
            host_id_fallback_timeout: None,
            reply_url: None,
        }
    }

    /// An error Ack: the status plus `BITS-Error-Code` (and `BITS-Error`) and
    /// `BITS-Error-Context`.
    pub fn error(status: StatusCode, code: Hresult, context: ErrorContext) -> Self {
        Self {
            error: Some((code, context)),
            ..Self::with_status(status)
        }
    }

    /// Echoes `BITS-Session-Id`.
    pub fn session_id(mut self, id: HeaderValue) -> Self {
        self.session_id = Some(id);
        self
    }

    /// Echoes `BITS-Session-Id` if there is one.
    pub fn maybe_session_id(mut self, id: Option<HeaderValue>) -> Self {
        self.session_id = id;
        self
    }

    /// Adds `BITS-Protocol` and `Accept-Encoding: identity` (successful Create-Session only).
    pub fn protocol(mut self) -> Self {
        self.protocol = true;
        self
    }

    /// Sets `BITS-Received-Content-Range`: the next byte the server expects.
    pub fn received(mut self, received: u64) -> Self {
        self.received = Some(received);
        self
    }

    /// Sets `BITS-Host-Id`, and `BITS-Host-Id-Fallback-Timeout` if a timeout is given.
    pub fn host_id(mut self, host: HeaderValue, fallback_timeout: Option<u64>) -> Self {
        self.host_id = Some(host);
        self.host_id_fallback_timeout = fallback_timeout;
        self
    }

    /// Sets `BITS-Reply-URL` (final fragment of an upload-reply session).
    pub fn reply_url(mut self, url: HeaderValue) -> Self {
        self.reply_url = Some(url);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The error code and context, if this is an error Ack.
    pub fn error_code(&self) -> Option<(Hresult, ErrorContext)> {
        self.error
    }

    /// The headers this Ack puts on the wire.
    pub fn headers(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(8);
        map.insert(h::BITS_PACKET_TYPE, HeaderValue::from_static("Ack"));
        if let Some(id) = &self.session_id {
            map.insert(h::BITS_SESSION_ID, id.clone());
        }
        if self.protocol {
            map.insert(h::BITS_PROTOCOL, HeaderValue::from_static(UPLOAD_PROTOCOL));
            map.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        if let Some(received) = self.received {
            map.insert(h::BITS_RECEIVED_CONTENT_RANGE, HeaderValue::from(received));
        }
        if let Some(host) = &self.host_id {
            map.insert(h::BITS_HOST_ID, host.clone());
            if let Some(secs) = self.host_id_fallback_timeout {
                map.insert(h::BITS_HOST_ID_FALLBACK_TIMEOUT, HeaderValue::from(secs));
            }
        }
        if let Some(url) = &self.reply_url {
            map.insert(h::BITS_REPLY_URL, url.clone());
        }
        if let Some((code, context)) = self.error {
            let code = HeaderValue::from(code);
            map.insert(h::BITS_ERROR_CODE, code.clone());
            map.insert(h::BITS_ERROR, code);
            map.insert(h::BITS_ERROR_CONTEXT, HeaderValue::from(context));
        }
        map.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        map
    }

    /// The HTTP response: status, Ack headers, and an empty body of type `B`.
    pub fn into_response<B: Default>(self) -> Response<B> {
        let mut response = Response::new(B::default());
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers();
        response
    }
}

impl From<Hresult> for HeaderValue {
    fn from(code: Hresult) -> Self {
        // Hex digits and "0x" are always a valid header value.
        HeaderValue::from_str(&code.to_string()).unwrap_or(HeaderValue::from_static("0x80004005"))
    }
}

impl From<ErrorContext> for HeaderValue {
    fn from(context: ErrorContext) -> Self {
        HeaderValue::from_static(match context {
            ErrorContext::RemoteFile => "0x5",
            ErrorContext::RemoteApplication => "0x7",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(map: &'a HeaderMap, name: &str) -> Option<&'a str> {
        map.get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn hresult_format() {
        assert_eq!(Hresult::BG_E_SESSION_NOT_FOUND.to_string(), "0x8020001F");
        assert_eq!(Hresult::E_INVALIDARG.to_string(), "0x80070057");
        assert_eq!(Hresult::S_OK.to_string(), "0x0");
        assert_eq!(Hresult(5).to_string(), "0x00000005");
    }

    #[test]
    fn plain_ack_has_only_packet_type_and_length() {
        let response = Ack::ok().into_response::<()>();
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(headers.len(), 2);
        assert_eq!(get(headers, "BITS-Packet-Type"), Some("Ack"));
        assert_eq!(get(headers, "content-length"), Some("0"));
    }

    #[test]
    fn create_session_ack() {
        let headers = Ack::ok()
            .session_id(HeaderValue::from_static(
                "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}",
            ))
            .protocol()
            .host_id(HeaderValue::from_static("node1.example.com"), Some(86400))
            .headers();
        assert_eq!(get(&headers, "bits-protocol"), Some(UPLOAD_PROTOCOL));
        assert_eq!(get(&headers, "accept-encoding"), Some("identity"));
        assert_eq!(
            get(&headers, "bits-session-id"),
            Some("{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}")
        );
        assert_eq!(get(&headers, "bits-host-id"), Some("node1.example.com"));
        assert_eq!(
            get(&headers, "bits-host-id-fallback-timeout"),
            Some("86400")
        );
        assert!(headers.get("bits-error-code").is_none());
    }

    #[test]
    fn fallback_timeout_needs_host_id() {
        let headers = Ack::ok().headers();
        assert!(headers.get("bits-host-id").is_none());
        assert!(headers.get("bits-host-id-fallback-timeout").is_none());
    }

    #[test]
    fn error_ack_carries_code_twice_and_context() {
        let ack = Ack::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            Hresult::BG_E_SESSION_NOT_FOUND,
            ErrorContext::RemoteFile,
        );
        let headers = ack.headers();
        assert_eq!(get(&headers, "bits-error-code"), Some("0x8020001F"));
        assert_eq!(get(&headers, "bits-error"), Some("0x8020001F"));
        assert_eq!(get(&headers, "bits-error-context"), Some("0x5"));
        assert_eq!(get(&headers, "content-length"), Some("0"));
        assert!(headers.get("bits-protocol").is_none());
    }

    #[test]
    fn fragment_ack_received() {
        let headers = Ack::with_status(StatusCode::RANGE_NOT_SATISFIABLE)
            .received(4096)
            .headers();
        assert_eq!(get(&headers, "bits-received-content-range"), Some("4096"));
        let app = Ack::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            Hresult(0x801901F4),
            ErrorContext::RemoteApplication,
        );
        assert_eq!(get(&app.headers(), "bits-error-context"), Some("0x7"));
    }

    #[test]
    fn reply_url() {
        let headers = Ack::ok()
            .reply_url(HeaderValue::from_static("http://h/r"))
            .headers();
        assert_eq!(get(&headers, "bits-reply-url"), Some("http://h/r"));
    }
}
