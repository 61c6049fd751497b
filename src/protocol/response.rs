//! Reading an Ack: what a client learns from a server's response, parsed without I/O.

use http::{HeaderMap, HeaderValue, StatusCode};

use super::{Hresult, headers as h, range::parse_u64};

/// Longest `BITS-Host-Id` a server may send (win32: 300 characters).
const MAX_HOST_ID_LEN: usize = 300;

/// A server's response to a `BITS_POST`, as a client reads it.
///
/// [`ParsedAck::parse`] is lenient where real servers differ (header-name case, the value
/// case of `Ack`, `BITS-Error-Code` with or without `0x`, the [MC-BUP] `BITS-Error` name,
/// GoBITS's bare `0`/`5`) and strict where a wrong value would make a client lose its place
/// (`BITS-Received-Content-Range` must be a plain decimal number).
///
/// ```
/// use axum_bits::protocol::{Hresult, ParsedAck};
/// use http::{HeaderMap, HeaderValue, StatusCode};
///
/// let mut headers = HeaderMap::new();
/// headers.insert("BITS-Packet-Type", HeaderValue::from_static("Ack"));
/// headers.insert("BITS-Error-Code", HeaderValue::from_static("0x8020001F"));
/// headers.insert("BITS-Error-Context", HeaderValue::from_static("0x5"));
/// let ack = ParsedAck::parse(StatusCode::INTERNAL_SERVER_ERROR, &headers)?;
/// assert!(ack.is_ack());
/// assert_eq!(ack.error_code(), Some(Hresult::BG_E_SESSION_NOT_FOUND));
/// assert_eq!(ack.error_context(), Some(5));
/// # Ok::<(), axum_bits::protocol::AckParseError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedAck {
    status: StatusCode,
    is_ack: bool,
    session_id: Option<HeaderValue>,
    protocol: Option<String>,
    received: Option<u64>,
    reply_url: Option<String>,
    host_id: Option<String>,
    host_id_fallback_timeout: Option<u64>,
    error_code: Option<Hresult>,
    error_context: Option<u32>,
}

/// A BITS header in a response that cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the response header `{header}` has an invalid value {value:?}")]
pub struct AckParseError {
    header: &'static str,
    value: String,
}

impl AckParseError {
    fn new(header: &'static str, value: &HeaderValue) -> Self {
        Self {
            header,
            value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
        }
    }

    /// The header's name, as the protocol spells it.
    pub fn header(&self) -> &'static str {
        self.header
    }
}

impl ParsedAck {
    /// Reads the protocol headers of a response.
    ///
    /// A missing header is `None`; a present one with a value that cannot be right is an
    /// error. Whether the response is an Ack at all is [`ParsedAck::is_ack`]: a proxy's or a
    /// non-BITS server's answer parses fine and says `false`.
    pub fn parse(status: StatusCode, headers: &HeaderMap) -> Result<Self, AckParseError> {
        let text = |name: &http::HeaderName, label: &'static str| {
            headers
                .get(name)
                .map(|v| {
                    v.to_str()
                        .map(|s| s.trim().to_owned())
                        .map_err(|_| AckParseError::new(label, v))
                })
                .transpose()
        };
        let decimal = |name: &http::HeaderName, label: &'static str| {
            headers
                .get(name)
                .map(|v| parse_u64(v.as_bytes().trim_ascii()).ok_or(AckParseError::new(label, v)))
                .transpose()
        };

        let is_ack = headers
            .get(h::BITS_PACKET_TYPE)
            .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"Ack"));
        let session_id = headers
            .get(h::BITS_SESSION_ID)
            .filter(|v| !v.as_bytes().trim_ascii().is_empty())
            .cloned();
        let error_code = headers
            .get(h::BITS_ERROR_CODE)
            .or_else(|| headers.get(h::BITS_ERROR))
            .map(|v| parse_hresult(v.as_bytes()).ok_or(AckParseError::new("BITS-Error-Code", v)))
            .transpose()?;
        let error_context = headers
            .get(h::BITS_ERROR_CONTEXT)
            .map(|v| parse_hresult(v.as_bytes()).ok_or(AckParseError::new("BITS-Error-Context", v)))
            .transpose()?
            .map(|code| code.0);
        let host_id = text(&h::BITS_HOST_ID, "BITS-Host-Id")?;
        if let (Some(host), Some(value)) = (&host_id, headers.get(h::BITS_HOST_ID)) {
            if !valid_host_id(host) {
                return Err(AckParseError::new("BITS-Host-Id", value));
            }
        }
        Ok(Self {
            status,
            is_ack,
            session_id,
            protocol: text(&h::BITS_PROTOCOL, "BITS-Protocol")?,
            received: decimal(
                &h::BITS_RECEIVED_CONTENT_RANGE,
                "BITS-Received-Content-Range",
            )?,
            reply_url: text(&h::BITS_REPLY_URL, "BITS-Reply-URL")?.filter(|u| !u.is_empty()),
            host_id,
            host_id_fallback_timeout: decimal(
                &h::BITS_HOST_ID_FALLBACK_TIMEOUT,
                "BITS-Host-Id-Fallback-Timeout",
            )?,
            error_code,
            error_context,
        })
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Whether the response says `BITS-Packet-Type: Ack` (any case). A response without it
    /// came from something that is not a BITS server: a proxy, a plain web server, an
    /// authentication layer.
    pub fn is_ack(&self) -> bool {
        self.is_ack
    }

    /// `BITS-Session-Id`, exactly as sent (a client echoes it verbatim).
    pub fn session_id(&self) -> Option<&HeaderValue> {
        self.session_id.as_ref()
    }

    /// `BITS-Protocol`: the protocol GUID the server chose.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// `BITS-Received-Content-Range`: the next byte the server expects.
    pub fn received(&self) -> Option<u64> {
        self.received
    }

    /// `BITS-Reply-URL`, as sent (it may be relative, with backslashes, as IIS writes it).
    pub fn reply_url(&self) -> Option<&str> {
        self.reply_url.as_deref()
    }

    /// `BITS-Host-Id`: the host (no scheme, no port) to use for the rest of the session.
    pub fn host_id(&self) -> Option<&str> {
        self.host_id.as_deref()
    }

    /// `BITS-Host-Id-Fallback-Timeout`, in seconds.
    pub fn host_id_fallback_timeout(&self) -> Option<u64> {
        self.host_id_fallback_timeout
    }

    /// `BITS-Error-Code` (or `BITS-Error`).
    pub fn error_code(&self) -> Option<Hresult> {
        self.error_code
    }

    /// `BITS-Error-Context`: 5 for the server itself, 7 for its application.
    pub fn error_context(&self) -> Option<u32> {
        self.error_context
    }
}

/// An HRESULT as servers write it: hex with or without `0x`/`x` (any case), or a negative
/// decimal (a signed 32-bit rendering).
fn parse_hresult(value: &[u8]) -> Option<Hresult> {
    let value = std::str::from_utf8(value).ok()?.trim();
    if let Some(negative) = value.strip_prefix('-') {
        let n: i64 = negative.parse().ok()?;
        let signed = i32::try_from(-n).ok()?;
        return Some(Hresult(signed as u32));
    }
    let hex = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
        .or_else(|| value.strip_prefix('x'))
        .or_else(|| value.strip_prefix('X'))
        .unwrap_or(value);
    if hex.is_empty() || hex.len() > 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok().map(Hresult)
}

/// A host name or IP address: no scheme, port, path or whitespace; IPv6 with or without
/// brackets.
fn valid_host_id(host: &str) -> bool {
    if host.is_empty() || host.len() > MAX_HOST_ID_LEN {
        return false;
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if bare.contains(':') {
        return bare.parse::<std::net::Ipv6Addr>().is_ok();
    }
    bare.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(status: u16, pairs: &[(&str, &str)]) -> Result<ParsedAck, AckParseError> {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        ParsedAck::parse(StatusCode::from_u16(status).unwrap(), &headers)
    }

    #[test]
    fn create_session_ack_as_iis_sends_it() {
        let ack = parse(
            200,
            &[
                ("BITS-Packet-Type", "Ack"),
                ("BITS-Protocol", "{7df0354d-249b-430f-820d-3d2a9bef4931}"),
                ("BITS-Session-Id", "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}"),
                ("Accept-encoding", "identity"),
                ("BITS-Host-Id", "node7.example.com"),
                ("BITS-Host-Id-Fallback-Timeout", "86400"),
                ("Content-Length", "0"),
            ],
        )
        .unwrap();
        assert!(ack.is_ack());
        assert_eq!(ack.status(), StatusCode::OK);
        assert_eq!(
            ack.session_id().unwrap(),
            "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}"
        );
        assert_eq!(
            ack.protocol(),
            Some("{7df0354d-249b-430f-820d-3d2a9bef4931}")
        );
        assert_eq!(ack.host_id(), Some("node7.example.com"));
        assert_eq!(ack.host_id_fallback_timeout(), Some(86400));
        assert_eq!(ack.received(), None);
        assert_eq!(ack.error_code(), None);
    }

    #[test]
    fn packet_type_and_names_ignore_case() {
        for value in ["Ack", "ACK", "ack", " Ack "] {
            assert!(
                parse(200, &[("bits-packet-type", value)]).unwrap().is_ack(),
                "{value}"
            );
        }
        assert!(!parse(200, &[]).unwrap().is_ack());
        assert!(
            !parse(200, &[("BITS-Packet-Type", "Fragment")])
                .unwrap()
                .is_ack()
        );
    }

    #[test]
    fn received_is_strict_decimal() {
        let ack = parse(416, &[("Bits-Received-Content-Range", " 4096 ")]).unwrap();
        assert_eq!(ack.received(), Some(4096));
        for bad in [
            "-1",
            "0x10",
            "12a",
            "",
            "bytes 0-9/10",
            "18446744073709551616",
        ] {
            let err = parse(200, &[("BITS-Received-Content-Range", bad)]).unwrap_err();
            assert_eq!(err.header(), "BITS-Received-Content-Range", "{bad}");
        }
        assert_eq!(
            parse(
                200,
                &[("BITS-Received-Content-Range", "18446744073709551615")]
            )
            .unwrap()
            .received(),
            Some(u64::MAX)
        );
    }

    #[test]
    fn error_codes_in_every_format_servers_use() {
        for (value, code) in [
            ("0x8020001F", 0x8020_001F),
            ("0x8020001f", 0x8020_001F),
            ("0X8020001F", 0x8020_001F),
            ("x8020001F", 0x8020_001F),
            ("8020001F", 0x8020_001F),
            ("0", 0),
            ("0x0", 0),
            ("-2145386465", 0x8020_001F),
        ] {
            let ack = parse(500, &[("BITS-Error-Code", value)]).unwrap();
            assert_eq!(ack.error_code(), Some(Hresult(code)), "{value}");
        }
        for bad in ["", "0x", "0x123456789", "error", "0x80g0", "-99999999999"] {
            assert!(parse(500, &[("BITS-Error-Code", bad)]).is_err(), "{bad}");
        }
    }

    #[test]
    fn mc_bup_error_header_name_is_a_fallback() {
        let ack = parse(500, &[("BITS-Error", "0x80070057")]).unwrap();
        assert_eq!(ack.error_code(), Some(Hresult::E_INVALIDARG));
        let both = parse(
            500,
            &[
                ("BITS-Error", "0x80070057"),
                ("BITS-Error-Code", "0x8020001F"),
            ],
        )
        .unwrap();
        assert_eq!(both.error_code(), Some(Hresult::BG_E_SESSION_NOT_FOUND));
    }

    #[test]
    fn error_context_formats() {
        for (value, context) in [("0x5", 5), ("5", 5), ("0x7", 7), ("0x00000007", 7)] {
            let ack = parse(500, &[("BITS-Error-Context", value)]).unwrap();
            assert_eq!(ack.error_context(), Some(context), "{value}");
        }
        assert!(parse(500, &[("BITS-Error-Context", "server")]).is_err());
    }

    #[test]
    fn host_id_is_a_host_only() {
        for good in [
            "node7",
            "node7.example.com",
            "10.0.0.7",
            "fe80::1",
            "[fe80::1]",
            "a_b",
        ] {
            assert_eq!(
                parse(200, &[("BITS-Host-Id", good)]).unwrap().host_id(),
                Some(good)
            );
        }
        let long = "a".repeat(301);
        for bad in [
            "http://node7",
            "node7:8080",
            "node7/x",
            "no de",
            "",
            long.as_str(),
            "[zz::1]",
        ] {
            assert!(parse(200, &[("BITS-Host-Id", bad)]).is_err(), "{bad}");
        }
        assert!(parse(200, &[("BITS-Host-Id-Fallback-Timeout", "soon")]).is_err());
    }

    #[test]
    fn reply_url_kept_as_sent() {
        let iis = r"BITS-Sessions\Replies\{C85B4E0A-9EB9-4114-BFA4-8A43B4710091}\responsefile.bin";
        let ack = parse(200, &[("BITS-Reply-URL", iis)]).unwrap();
        assert_eq!(ack.reply_url(), Some(iis));
        assert_eq!(
            parse(200, &[("BITS-Reply-URL", " ")]).unwrap().reply_url(),
            None
        );
    }

    #[test]
    fn empty_session_id_is_absent() {
        assert!(
            parse(200, &[("BITS-Session-Id", "")])
                .unwrap()
                .session_id()
                .is_none()
        );
    }

    #[test]
    fn round_trips_what_the_server_sends() {
        use crate::protocol::Ack;
        let sent = Ack::error(StatusCode::SERVICE_UNAVAILABLE, Hresult::BUSY)
            .session_id(HeaderValue::from_static("{X}"))
            .received(77);
        let ack = ParsedAck::parse(sent.status(), &sent.headers()).unwrap();
        assert!(ack.is_ack());
        assert_eq!(ack.error_code(), Some(Hresult::BUSY));
        assert_eq!(ack.error_context(), Some(5));
        assert_eq!(ack.received(), Some(77));
        assert_eq!(ack.session_id().unwrap(), "{X}");
    }

    #[test]
    fn hresult_names_and_relayed_statuses() {
        assert_eq!(
            Hresult::BG_E_SESSION_NOT_FOUND.name(),
            Some("BG_E_SESSION_NOT_FOUND")
        );
        assert_eq!(
            Hresult(0x8019_01F4).relayed_http_status(),
            Some(StatusCode::INTERNAL_SERVER_ERROR)
        );
        assert_eq!(Hresult(0x8019_01F4).name(), Some("BG_E_HTTP_ERROR"));
        assert!(Hresult(0x8019_01F4).description().unwrap().contains("500"));
        assert_eq!(Hresult(0x8019_0000).relayed_http_status(), None);
        assert_eq!(Hresult(0x1234_5678).name(), None);
        assert_eq!(Hresult(0x1234_5678).description(), None);
    }
}
