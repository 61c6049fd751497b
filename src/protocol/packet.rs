use http::{HeaderMap, HeaderName, HeaderValue, header, request::Parts};

use super::{
    FragmentRange, MAX_HEADER_VALUE_LEN, ProtocolError, UPLOAD_PROTOCOL, headers as h,
    range::parse_u64,
};

/// The five request packet types. Parsed case-insensitively: Windows sends `Create-Session`,
/// [MC-BUP] writes `CREATE-SESSION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketType {
    /// Ping: no session, no state; used to get authentication done cheaply.
    Ping,
    /// Create-Session: opens an upload session for the request URL.
    CreateSession,
    /// Fragment: one contiguous byte range of the file.
    Fragment,
    /// Close-Session: the client is done; the server releases everything.
    CloseSession,
    /// Cancel-Session: the client abandons the upload.
    CancelSession,
}

impl PacketType {
    /// Parses a `BITS-Packet-Type` value, ignoring case and surrounding whitespace.
    pub fn parse(value: &[u8]) -> Option<Self> {
        let value = value.trim_ascii();
        [
            (&b"Ping"[..], Self::Ping),
            (b"Create-Session", Self::CreateSession),
            (b"Fragment", Self::Fragment),
            (b"Close-Session", Self::CloseSession),
            (b"Cancel-Session", Self::CancelSession),
        ]
        .into_iter()
        .find_map(|(name, ty)| value.eq_ignore_ascii_case(name).then_some(ty))
    }

    /// The canonical spelling, as Windows sends it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Ping => "Ping",
            Self::CreateSession => "Create-Session",
            Self::Fragment => "Fragment",
            Self::CloseSession => "Close-Session",
            Self::CancelSession => "Cancel-Session",
        }
    }
}

impl std::fmt::Display for PacketType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `BITS-Session-Id` value exactly as the client sent it (trimmed), kept as a header value
/// so that Acks echo it verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionHeader(HeaderValue);

impl SessionHeader {
    /// The value as sent.
    pub fn value(&self) -> &HeaderValue {
        &self.0
    }

    /// The value as text, if it is visible ASCII.
    pub fn as_str(&self) -> Option<&str> {
        self.0.to_str().ok()
    }
}

/// A parsed Create-Session packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSession {
    /// The client's local file name (`Content-Name`), if sent. Informational only.
    pub content_name: Option<String>,
}

/// A parsed Fragment packet (headers only; the body is streamed separately).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    /// The session the fragment belongs to.
    pub session_id: SessionHeader,
    /// The range the body covers; `Content-Length` has been checked to equal its length.
    pub range: FragmentRange,
}

/// A request packet, parsed from the headers of a `BITS_POST` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Ping.
    Ping,
    /// Create-Session (the protocol has been negotiated).
    CreateSession(CreateSession),
    /// Fragment.
    Fragment(Fragment),
    /// Close-Session.
    CloseSession(SessionHeader),
    /// Cancel-Session.
    CancelSession(SessionHeader),
}

impl Packet {
    /// Parses the packet a `BITS_POST` request carries. The method is not checked here.
    ///
    /// Header values over [`MAX_HEADER_VALUE_LEN`] are refused, except credentials
    /// (`Authorization`, `Proxy-Authorization`, `Cookie`), which belong to the authentication
    /// layer.
    ///
    /// Tolerates what Windows sends: any header casing and order, mixed-case packet types,
    /// `Content-Name` on any packet, a missing `Content-Length` on bodyless packets, a
    /// `BITS-Session-Id` on Ping.
    ///
    /// `BITS-Packet-Type`, `BITS-Session-Id`, `Content-Range`, `Content-Length` and
    /// `Content-Name` may be repeated only with the same value (ignoring surrounding
    /// whitespace, and ASCII case except for `Content-Name`); conflicting repeats are
    /// [`ProtocolError::ConflictingHeader`], since something in front of the server that reads
    /// another of them would see another packet. `BITS-Supported-Protocols` lines form one
    /// list, as HTTP allows for list headers.
    pub fn parse(parts: &Parts) -> Result<Self, ProtocolError> {
        Self::from_headers(&parts.headers)
    }

    /// [`Packet::parse`] over a bare header map.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, ProtocolError> {
        // Credentials are exempt: they belong to the authentication layer, and Kerberos
        // tokens in `Authorization` routinely exceed 4 KB.
        let credential = |name: &http::HeaderName| {
            [
                header::AUTHORIZATION,
                header::PROXY_AUTHORIZATION,
                header::COOKIE,
            ]
            .contains(name)
        };
        if let Some((name, _)) = headers
            .iter()
            .find(|(name, value)| value.len() > MAX_HEADER_VALUE_LEN && !credential(name))
        {
            return Err(ProtocolError::HeaderTooLarge(name.as_str().to_owned()));
        }
        let ty = single(headers, &h::BITS_PACKET_TYPE, "BITS-Packet-Type")?
            .ok_or(ProtocolError::MissingPacketType)?;
        let ty = PacketType::parse(ty.as_bytes()).ok_or_else(|| {
            ProtocolError::UnknownPacketType(String::from_utf8_lossy(ty.as_bytes()).into_owned())
        })?;
        match ty {
            PacketType::Ping => {
                bodyless(headers)?;
                Ok(Self::Ping)
            }
            PacketType::CreateSession => {
                bodyless(headers)?;
                // Several header lines are one comma-separated list.
                let offered = headers.get_all(h::BITS_SUPPORTED_PROTOCOLS);
                if !offered.iter().any(|v| negotiate_protocol(Some(v)).is_ok()) {
                    negotiate_protocol(offered.iter().next())?;
                }
                Ok(Self::CreateSession(CreateSession {
                    content_name: content_name(headers)?,
                }))
            }
            PacketType::Fragment => {
                let session_id = session_id(headers)?;
                identity_encoding(headers)?;
                let length = content_length(headers)?.ok_or(ProtocolError::MissingContentLength)?;
                let range = single(headers, &header::CONTENT_RANGE, "Content-Range")?
                    .ok_or(ProtocolError::MissingContentRange)?;
                let range = FragmentRange::parse(range.as_bytes())?;
                if length != range.len() {
                    return Err(ProtocolError::LengthMismatch {
                        expected: range.len(),
                        actual: length,
                    });
                }
                Ok(Self::Fragment(Fragment { session_id, range }))
            }
            PacketType::CloseSession => {
                bodyless(headers)?;
                Ok(Self::CloseSession(session_id(headers)?))
            }
            PacketType::CancelSession => {
                bodyless(headers)?;
                Ok(Self::CancelSession(session_id(headers)?))
            }
        }
    }

    /// The packet's type.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Self::Ping => PacketType::Ping,
            Self::CreateSession(_) => PacketType::CreateSession,
            Self::Fragment(_) => PacketType::Fragment,
            Self::CloseSession(_) => PacketType::CloseSession,
            Self::CancelSession(_) => PacketType::CancelSession,
        }
    }

    /// The session id the packet names, if its type carries one.
    pub fn session_id(&self) -> Option<&SessionHeader> {
        match self {
            Self::Ping | Self::CreateSession(_) => None,
            Self::Fragment(f) => Some(&f.session_id),
            Self::CloseSession(id) | Self::CancelSession(id) => Some(id),
        }
    }
}

/// Picks the upload protocol from a `BITS-Supported-Protocols` value: GUIDs separated by
/// spaces and/or commas, braces optional, compared case-insensitively. Returns the canonical
/// braced GUID.
pub fn negotiate_protocol(offered: Option<&HeaderValue>) -> Result<&'static str, ProtocolError> {
    let offered = offered.ok_or(ProtocolError::NoSupportedProtocol { offered: None })?;
    let wanted = UPLOAD_PROTOCOL.as_bytes();
    let wanted = &wanted[1..wanted.len() - 1];
    let found = offered
        .as_bytes()
        .split(|&b| b == b',' || b.is_ascii_whitespace())
        .map(|guid| {
            let guid = guid.strip_prefix(b"{").unwrap_or(guid);
            guid.strip_suffix(b"}").unwrap_or(guid)
        })
        .any(|guid| guid.eq_ignore_ascii_case(wanted));
    if found {
        Ok(UPLOAD_PROTOCOL)
    } else {
        Err(ProtocolError::NoSupportedProtocol {
            offered: Some(String::from_utf8_lossy(offered.as_bytes()).into_owned()),
        })
    }
}

/// The value of a header the packet depends on, if present. Repeats must agree: equal once
/// surrounding whitespace is trimmed, ignoring ASCII case (packet types, session ids and the
/// range unit are all compared that way).
fn single<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
    label: &'static str,
) -> Result<Option<&'a HeaderValue>, ProtocolError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let key = first.as_bytes().trim_ascii();
    if values.all(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(key)) {
        Ok(Some(first))
    } else {
        Err(ProtocolError::ConflictingHeader(label))
    }
}

fn session_id(headers: &HeaderMap) -> Result<SessionHeader, ProtocolError> {
    let value = single(headers, &h::BITS_SESSION_ID, "BITS-Session-Id")?
        .ok_or(ProtocolError::MissingSessionId)?;
    let trimmed = value.as_bytes().trim_ascii();
    if trimmed.is_empty() {
        return Err(ProtocolError::MissingSessionId);
    }
    if trimmed.len() == value.len() {
        return Ok(SessionHeader(value.clone()));
    }
    HeaderValue::from_bytes(trimmed)
        .map(SessionHeader)
        .map_err(|_| ProtocolError::InvalidHeader("BITS-Session-Id"))
}

/// `Content-Length`, if present. Several headers must agree (hyper already refuses
/// conflicting ones); a value that is not a decimal number is malformed.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ProtocolError> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let parsed =
            parse_u64(value.as_bytes().trim_ascii()).ok_or(ProtocolError::MissingContentLength)?;
        if length.is_some_and(|l| l != parsed) {
            return Err(ProtocolError::MissingContentLength);
        }
        length = Some(parsed);
    }
    Ok(length)
}

/// Bodyless packets may omit `Content-Length` (some clients do) but must not declare a body,
/// neither by a non-zero length nor by a transfer coding.
fn bodyless(headers: &HeaderMap) -> Result<(), ProtocolError> {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return Err(ProtocolError::UnexpectedBody);
    }
    match content_length(headers) {
        Ok(None | Some(0)) => Ok(()),
        Ok(Some(_)) | Err(_) => Err(ProtocolError::UnexpectedBody),
    }
}

fn identity_encoding(headers: &HeaderMap) -> Result<(), ProtocolError> {
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let value = value.as_bytes().trim_ascii();
        if !value.is_empty() && !value.eq_ignore_ascii_case(b"identity") {
            return Err(ProtocolError::UnsupportedEncoding(
                String::from_utf8_lossy(value).into_owned(),
            ));
        }
    }
    Ok(())
}

/// `Content-Name`, if sent. A file name, so repeats must be byte for byte the same.
fn content_name(headers: &HeaderMap) -> Result<Option<String>, ProtocolError> {
    let mut values = headers.get_all(h::CONTENT_NAME).iter();
    let first = values.next();
    if values.any(|v| Some(v) != first) {
        return Err(ProtocolError::ConflictingHeader("Content-Name"));
    }
    Ok(first.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SID: &str = "{6F1C2B7E-0D4A-4C55-9B8E-2A7D3C1E9F40}";

    fn parse(pairs: &[(&str, &str)]) -> Result<Packet, ProtocolError> {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        Packet::from_headers(&headers)
    }

    #[test]
    fn packet_types_any_case() {
        for (s, ty) in [
            ("Ping", PacketType::Ping),
            ("pInG", PacketType::Ping),
            ("CREATE-SESSION", PacketType::CreateSession),
            ("fragment", PacketType::Fragment),
            (" Close-Session ", PacketType::CloseSession),
            ("cancel-SESSION", PacketType::CancelSession),
        ] {
            assert_eq!(PacketType::parse(s.as_bytes()), Some(ty), "{s}");
        }
        for s in ["", "Foo", "Ack", "Create Session", "Pings", "Fragment2"] {
            assert_eq!(PacketType::parse(s.as_bytes()), None, "{s}");
        }
        for ty in [
            PacketType::Ping,
            PacketType::CreateSession,
            PacketType::Fragment,
            PacketType::CloseSession,
            PacketType::CancelSession,
        ] {
            assert_eq!(PacketType::parse(ty.as_str().as_bytes()), Some(ty));
        }
    }

    #[test]
    fn ping() {
        assert_eq!(parse(&[("BITS-Packet-Type", "Ping")]), Ok(Packet::Ping));
        assert_eq!(
            parse(&[("bits-packet-type", "pInG"), ("content-length", "0")]),
            Ok(Packet::Ping)
        );
        assert_eq!(
            parse(&[
                ("BITS-Packet-Type", "Ping"),
                ("BITS-Session-Id", "{nonsense}")
            ]),
            Ok(Packet::Ping)
        );
        assert_eq!(
            parse(&[("BITS-Packet-Type", "Ping"), ("Content-Length", "5")]),
            Err(ProtocolError::UnexpectedBody)
        );
        assert_eq!(
            parse(&[
                ("BITS-Packet-Type", "Ping"),
                ("Transfer-Encoding", "chunked")
            ]),
            Err(ProtocolError::UnexpectedBody)
        );
    }

    #[test]
    fn missing_and_unknown_type() {
        assert_eq!(parse(&[]), Err(ProtocolError::MissingPacketType));
        assert_eq!(
            parse(&[("BITS-Packet-Type", "Foo")]),
            Err(ProtocolError::UnknownPacketType("Foo".into()))
        );
        assert_eq!(
            parse(&[("BITS-Packet-Type", "Ack")]),
            Err(ProtocolError::UnknownPacketType("Ack".into()))
        );
    }

    #[test]
    fn create_session_negotiation() {
        let ok = |offered: &str| {
            parse(&[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", offered),
                ("Content-Length", "0"),
            ])
        };
        assert!(ok(UPLOAD_PROTOCOL).is_ok());
        assert!(ok("{7DF0354D-249B-430F-820D-3D2A9BEF4931}").is_ok());
        assert!(ok("7df0354d-249b-430f-820d-3d2a9bef4931").is_ok());
        assert!(
            ok("{00000000-0000-0000-0000-000000000000} {7df0354d-249b-430f-820d-3d2a9bef4931}")
                .is_ok()
        );
        assert!(
            ok("{00000000-0000-0000-0000-000000000000},{7df0354d-249b-430f-820d-3d2a9bef4931}")
                .is_ok()
        );
        assert!(
            ok("{00000000-0000-0000-0000-000000000000} , {7df0354d-249b-430f-820d-3d2a9bef4931}")
                .is_ok()
        );
        assert!(matches!(
            ok("{00000000-0000-0000-0000-000000000000}"),
            Err(ProtocolError::NoSupportedProtocol { offered: Some(_) })
        ));
        assert!(matches!(
            ok(""),
            Err(ProtocolError::NoSupportedProtocol { .. })
        ));
        assert!(matches!(
            ok("{7df0354d-249b-430f-820d-3d2a9bef4931x}"),
            Err(ProtocolError::NoSupportedProtocol { .. })
        ));
        assert_eq!(
            parse(&[("BITS-Packet-Type", "Create-Session")]),
            Err(ProtocolError::NoSupportedProtocol { offered: None })
        );
        assert!(
            parse(&[
                ("BITS-Packet-Type", "Create-Session"),
                (
                    "BITS-Supported-Protocols",
                    "{00000000-0000-0000-0000-000000000000}"
                ),
                ("BITS-Supported-Protocols", UPLOAD_PROTOCOL),
            ])
            .is_ok()
        );
        assert_eq!(
            parse(&[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", UPLOAD_PROTOCOL),
                ("Content-Length", "8"),
            ]),
            Err(ProtocolError::UnexpectedBody)
        );
        assert_eq!(
            parse(&[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", UPLOAD_PROTOCOL),
                ("Content-Name", "report.bin"),
            ]),
            Ok(Packet::CreateSession(CreateSession {
                content_name: Some("report.bin".into())
            }))
        );
    }

    fn fragment(extra: &[(&str, &str)]) -> Result<Packet, ProtocolError> {
        let mut pairs = vec![("BITS-Packet-Type", "Fragment"), ("BITS-Session-Id", SID)];
        pairs.extend_from_slice(extra);
        parse(&pairs)
    }

    #[test]
    fn fragment_ok() {
        let packet = fragment(&[
            ("Content-Range", "bytes 0-4095/10000"),
            ("Content-Length", "4096"),
            ("Content-Name", "report.bin"),
            ("Content-Encoding", "identity"),
        ])
        .unwrap();
        let Packet::Fragment(f) = packet else {
            panic!("not a fragment")
        };
        assert_eq!(f.session_id.as_str(), Some(SID));
        assert_eq!(f.range, FragmentRange::new(0, 4096, 10000).unwrap());
    }

    #[test]
    fn fragment_errors() {
        assert_eq!(
            fragment(&[("Content-Length", "10")]),
            Err(ProtocolError::MissingContentRange)
        );
        assert_eq!(
            fragment(&[("Content-Range", "bytes 0-9/10")]),
            Err(ProtocolError::MissingContentLength)
        );
        assert_eq!(
            fragment(&[("Content-Range", "bytes 0-9/10"), ("Content-Length", "ten")]),
            Err(ProtocolError::MissingContentLength)
        );
        assert_eq!(
            fragment(&[("Content-Range", "bytes 0-9/10"), ("Content-Length", "9")]),
            Err(ProtocolError::LengthMismatch {
                expected: 10,
                actual: 9
            })
        );
        assert!(matches!(
            fragment(&[("Content-Range", "bytes 10-5/100"), ("Content-Length", "0")]),
            Err(ProtocolError::InvalidContentRange { .. })
        ));
        assert_eq!(
            fragment(&[
                ("Content-Range", "bytes 0-9/10"),
                ("Content-Length", "10"),
                ("Content-Encoding", "gzip"),
            ]),
            Err(ProtocolError::UnsupportedEncoding("gzip".into()))
        );
        assert_eq!(
            parse(&[
                ("BITS-Packet-Type", "Fragment"),
                ("Content-Range", "bytes 0-9/10"),
                ("Content-Length", "10"),
            ]),
            Err(ProtocolError::MissingSessionId)
        );
        assert_eq!(
            fragment(&[
                ("Content-Range", "bytes 0-9/10"),
                ("Content-Length", "10"),
                ("Content-Length", "11"),
            ]),
            Err(ProtocolError::MissingContentLength)
        );
    }

    #[test]
    fn zero_length_fragment() {
        let packet = fragment(&[("Content-Range", "bytes */0"), ("Content-Length", "0")]).unwrap();
        let Packet::Fragment(f) = packet else {
            panic!("not a fragment")
        };
        assert!(f.range.is_empty());
    }

    #[test]
    fn close_and_cancel() {
        for (ty, want) in [("Close-Session", true), ("CANCEL-SESSION", false)] {
            let packet = parse(&[
                ("BITS-Packet-Type", ty),
                ("BITS-Session-Id", &format!("  {SID} ")),
                ("Content-Name", "x.bin"),
            ])
            .unwrap();
            let id = packet.session_id().unwrap();
            assert_eq!(id.as_str(), Some(SID));
            assert_eq!(matches!(packet, Packet::CloseSession(_)), want);
            assert_eq!(
                parse(&[("BITS-Packet-Type", ty)]),
                Err(ProtocolError::MissingSessionId)
            );
            assert_eq!(
                parse(&[("BITS-Packet-Type", ty), ("BITS-Session-Id", "  ")]),
                Err(ProtocolError::MissingSessionId)
            );
            assert_eq!(
                parse(&[
                    ("BITS-Packet-Type", ty),
                    ("BITS-Session-Id", SID),
                    ("Content-Length", "3")
                ]),
                Err(ProtocolError::UnexpectedBody)
            );
        }
    }

    #[test]
    fn conflicting_repeats_are_refused() {
        let conflict = |label| Err(ProtocolError::ConflictingHeader(label));
        assert_eq!(
            parse(&[
                ("BITS-Packet-Type", "Ping"),
                ("BITS-Packet-Type", "Fragment")
            ]),
            conflict("BITS-Packet-Type")
        );
        assert_eq!(
            parse(&[
                ("BITS-Packet-Type", "Close-Session"),
                ("BITS-Session-Id", SID),
                ("BITS-Packet-Type", "Cancel-Session"),
            ]),
            conflict("BITS-Packet-Type")
        );
        let other = "{11111111-2222-4333-8444-555555555555}";
        for ty in ["Close-Session", "Cancel-Session"] {
            assert_eq!(
                parse(&[
                    ("BITS-Packet-Type", ty),
                    ("BITS-Session-Id", SID),
                    ("BITS-Session-Id", other),
                ]),
                conflict("BITS-Session-Id")
            );
        }
        assert_eq!(
            fragment(&[
                ("BITS-Session-Id", other),
                ("Content-Range", "bytes 0-9/10"),
                ("Content-Length", "10"),
            ]),
            conflict("BITS-Session-Id")
        );
        assert_eq!(
            fragment(&[
                ("Content-Range", "bytes 0-9/20"),
                ("Content-Range", "bytes 10-19/20"),
                ("Content-Length", "10"),
            ]),
            conflict("Content-Range")
        );
        assert_eq!(
            fragment(&[
                ("Content-Range", "bytes 0-9/10"),
                ("Content-Range", "bytes 0-9/11"),
                ("Content-Length", "10"),
            ]),
            conflict("Content-Range")
        );
        assert_eq!(
            parse(&[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", UPLOAD_PROTOCOL),
                ("Content-Name", "a.bin"),
                ("Content-Name", "b.bin"),
            ]),
            conflict("Content-Name")
        );
        assert_eq!(
            parse(&[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", UPLOAD_PROTOCOL),
                ("Content-Name", "a.bin"),
                ("Content-Name", "A.bin"),
            ]),
            conflict("Content-Name")
        );
        assert_eq!(
            ProtocolError::ConflictingHeader("BITS-Session-Id")
                .ack()
                .status(),
            http::StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn agreeing_repeats_are_tolerated() {
        assert_eq!(
            parse(&[("BITS-Packet-Type", "Ping"), ("bits-packet-type", "PING")]),
            Ok(Packet::Ping)
        );
        let packet = parse(&[
            ("BITS-Packet-Type", "Close-Session"),
            ("BITS-Session-Id", SID),
            (
                "BITS-Session-Id",
                &format!(" {} ", SID.to_ascii_lowercase()),
            ),
        ])
        .unwrap();
        assert_eq!(
            packet.session_id().and_then(SessionHeader::as_str),
            Some(SID)
        );
        let packet = fragment(&[
            ("BITS-Session-Id", SID),
            ("Content-Range", "bytes 0-9/10"),
            ("Content-Range", "Bytes 0-9/10"),
            ("Content-Length", "10"),
            ("Content-Length", "10"),
        ])
        .unwrap();
        assert_eq!(
            packet,
            Packet::Fragment(Fragment {
                session_id: SessionHeader(HeaderValue::from_static(SID)),
                range: FragmentRange::new(0, 10, 10).unwrap(),
            })
        );
        assert_eq!(
            parse(&[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", UPLOAD_PROTOCOL),
                ("Content-Name", "a.bin"),
                ("Content-Name", "a.bin"),
            ]),
            Ok(Packet::CreateSession(CreateSession {
                content_name: Some("a.bin".into())
            }))
        );
        // Ping ignores the session id, so conflicting ones do not matter there.
        assert_eq!(
            parse(&[
                ("BITS-Packet-Type", "Ping"),
                ("BITS-Session-Id", SID),
                ("BITS-Session-Id", "{other}"),
            ]),
            Ok(Packet::Ping)
        );
    }

    #[test]
    fn oversized_header_value() {
        let big = "x".repeat(MAX_HEADER_VALUE_LEN + 1);
        assert_eq!(
            parse(&[("BITS-Packet-Type", "Ping"), ("X-Whatever", &big)]),
            Err(ProtocolError::HeaderTooLarge("x-whatever".into()))
        );
        let kerberos = format!("Negotiate {}", "Y".repeat(12_000));
        assert_eq!(
            parse(&[("BITS-Packet-Type", "Ping"), ("Authorization", &kerberos)]),
            Ok(Packet::Ping)
        );
        let edge = "x".repeat(MAX_HEADER_VALUE_LEN);
        assert_eq!(
            parse(&[("BITS-Packet-Type", "Ping"), ("X-Whatever", &edge)]),
            Ok(Packet::Ping)
        );
    }

    #[test]
    fn every_error_is_a_400_einvalidarg_ack() {
        let ack = ProtocolError::MissingPacketType.ack();
        assert_eq!(ack.status(), http::StatusCode::BAD_REQUEST);
        assert_eq!(
            ack.error_code(),
            Some((
                super::super::Hresult::E_INVALIDARG,
                super::super::ErrorContext::RemoteFile
            ))
        );
    }
}
