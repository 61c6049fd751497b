use std::fmt;

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use super::{Hresult, UPLOAD_PROTOCOL, headers as h};

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

    /// An error Ack from the BITS server itself (`BITS-Error-Context: 0x5`), the common case:
    /// the status plus `BITS-Error-Code` (and `BITS-Error`) and `BITS-Error-Context`.
    pub fn error(status: StatusCode, code: Hresult) -> Self {
        Self::error_with_context(status, code, ErrorContext::RemoteFile)
    }

    /// An error Ack relaying the server application's failure (`BITS-Error-Context: 0x7`).
    pub fn application_error(status: StatusCode, code: Hresult) -> Self {
        Self::error_with_context(status, code, ErrorContext::RemoteApplication)
    }

    /// An error Ack with the given `BITS-Error-Context`.
    pub fn error_with_context(status: StatusCode, code: Hresult, context: ErrorContext) -> Self {
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
        let app = Ack::application_error(StatusCode::INTERNAL_SERVER_ERROR, Hresult(0x801901F4));
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
