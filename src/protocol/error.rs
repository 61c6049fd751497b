use http::StatusCode;

use super::{Ack, Hresult};

/// Why a `BITS_POST` request is not a well-formed packet.
///
/// Every variant is the client's fault and answers with 400 + `E_INVALIDARG` (0x80070057),
/// context 0x5, as the protocol reference prescribes for malformed packets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// No `BITS-Packet-Type` header.
    #[error("the request has no BITS-Packet-Type header")]
    MissingPacketType,
    /// A `BITS-Packet-Type` the protocol does not define.
    #[error("unknown BITS-Packet-Type {0:?}")]
    UnknownPacketType(String),
    /// A header value is longer than the protocol's 4 KB limit.
    #[error("the value of header {0} is longer than 4096 bytes")]
    HeaderTooLarge(String),
    /// A header value that must be text is not.
    #[error("the value of header {0} is not valid text")]
    InvalidHeader(&'static str),
    /// A header the packet depends on is repeated with different values. A proxy or log that
    /// reads another of them than the server would see another packet.
    #[error("header {0} is repeated with conflicting values")]
    ConflictingHeader(&'static str),
    /// Create-Session without `BITS-Supported-Protocols`, or without a GUID the server speaks.
    #[error("no supported protocol: the client offered {offered:?}")]
    NoSupportedProtocol {
        /// What the client offered, if anything.
        offered: Option<String>,
    },
    /// A packet that needs `BITS-Session-Id` has none.
    #[error("the packet has no BITS-Session-Id header")]
    MissingSessionId,
    /// A packet that must be bodyless declares a body.
    #[error("this packet type must not carry a body")]
    UnexpectedBody,
    /// A Fragment without a usable `Content-Length`.
    #[error("the fragment has no valid Content-Length")]
    MissingContentLength,
    /// A Fragment without `Content-Range`.
    #[error("the fragment has no Content-Range header")]
    MissingContentRange,
    /// A `Content-Range` that does not parse or is not a valid range.
    #[error("invalid Content-Range: {reason}")]
    InvalidContentRange {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `Content-Length` differs from the length of `Content-Range`, or the body carried a
    /// different number of bytes.
    #[error("the body length {actual} does not match the Content-Range length {expected}")]
    LengthMismatch {
        /// Bytes the range announces.
        expected: u64,
        /// Bytes the request declared or carried.
        actual: u64,
    },
    /// A `Content-Encoding` other than `identity`.
    #[error("unsupported Content-Encoding {0:?}: only identity is accepted")]
    UnsupportedEncoding(String),
}

impl ProtocolError {
    /// The Ack that answers this error: 400, `E_INVALIDARG`, context 0x5.
    pub fn ack(&self) -> Ack {
        Ack::error(StatusCode::BAD_REQUEST, Hresult::E_INVALIDARG)
    }
}
