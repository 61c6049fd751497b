//! The BITS upload protocol on the wire: packet parsing and Ack building.
//!
//! Everything in this module is pure: it takes [`http::request::Parts`] or header values and
//! returns values. No I/O happens here, which is why it is public and fuzzed: a client
//! implementation or a test harness can use the same parsers. [`ParsedAck`] reads a
//! server's answer the way a client needs it.

mod ack;
mod error;
pub mod headers;
mod hresult;
mod method;
mod packet;
mod range;
mod response;

pub use ack::{Ack, ErrorContext};
pub use error::ProtocolError;
pub use hresult::Hresult;
pub use method::{BITS_POST, bits_post, is_bits_post};
pub use packet::{CreateSession, Fragment, Packet, PacketType, SessionHeader, negotiate_protocol};
pub use range::FragmentRange;
pub use response::{AckParseError, ParsedAck};

/// The one upload protocol that exists: "BITS 1.5 Upload Protocol", in its canonical braced form.
pub const UPLOAD_PROTOCOL: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";

/// Header values longer than this are rejected with 400 + `E_INVALIDARG` (Windows servers'
/// limit, [MC-BUP] note 2).
pub const MAX_HEADER_VALUE_LEN: usize = 4096;

/// The smallest fragment a BITS client sends: 5 KiB, the floor of the Windows client's halving
/// after a 413. A server must take fragments this small, and a client never goes below it.
pub(crate) const MIN_FRAGMENT_SIZE: u64 = 5 * 1024;
