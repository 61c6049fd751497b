//! Header names of the protocol. HTTP/1 serialisation lower-cases names; the Windows client
//! matches them case-insensitively.

use http::HeaderName;

/// `BITS-Packet-Type`: the packet kind on requests, `Ack` on responses.
pub const BITS_PACKET_TYPE: HeaderName = HeaderName::from_static("bits-packet-type");
/// `BITS-Session-Id`: the server-issued session id, echoed by the client on every packet.
pub const BITS_SESSION_ID: HeaderName = HeaderName::from_static("bits-session-id");
/// `BITS-Supported-Protocols`: the protocol GUIDs a client offers on Create-Session.
pub const BITS_SUPPORTED_PROTOCOLS: HeaderName =
    HeaderName::from_static("bits-supported-protocols");
/// `BITS-Protocol`: the GUID the server chose, on a successful Create-Session Ack.
pub const BITS_PROTOCOL: HeaderName = HeaderName::from_static("bits-protocol");
/// `BITS-Received-Content-Range`: the next byte the server expects, on every Fragment Ack.
pub const BITS_RECEIVED_CONTENT_RANGE: HeaderName =
    HeaderName::from_static("bits-received-content-range");
/// `BITS-Reply-URL`: where an upload-reply client downloads the reply.
pub const BITS_REPLY_URL: HeaderName = HeaderName::from_static("bits-reply-url");
/// `BITS-Host-Id`: the host the client must use for the rest of the session.
pub const BITS_HOST_ID: HeaderName = HeaderName::from_static("bits-host-id");
/// `BITS-Host-Id-Fallback-Timeout`: seconds after which the client may return to the original
/// host.
pub const BITS_HOST_ID_FALLBACK_TIMEOUT: HeaderName =
    HeaderName::from_static("bits-host-id-fallback-timeout");
/// `BITS-Error-Code`: the HRESULT of an error Ack (win32 name).
pub const BITS_ERROR_CODE: HeaderName = HeaderName::from_static("bits-error-code");
/// `BITS-Error`: the same HRESULT under the name [MC-BUP] uses; sent alongside
/// `BITS-Error-Code`.
pub const BITS_ERROR: HeaderName = HeaderName::from_static("bits-error");
/// `BITS-Error-Context`: who produced the error (`0x5` server, `0x7` server application).
pub const BITS_ERROR_CONTEXT: HeaderName = HeaderName::from_static("bits-error-context");
/// `Content-Name`: the client's local file name. Informational only; never used as a path.
pub const CONTENT_NAME: HeaderName = HeaderName::from_static("content-name");
