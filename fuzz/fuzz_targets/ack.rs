//! Response header maps built from fuzz bytes, read as Acks by `protocol::ParsedAck::parse`
//! (what the client does with every answer).
//!
//! The first byte picks the status (`100 + byte * 2`, so 100..=610, invalid ones skipped);
//! the rest is split into lines by `shared/header_lines.rs`, as in the `packet` target.

#![no_main]

use axum_bits::protocol::{Ack, ErrorContext, Hresult, ParsedAck, headers as h};
use http::{HeaderName, StatusCode};
use libfuzzer_sys::fuzz_target;

#[path = "shared/header_lines.rs"]
mod header_lines;

const KNOWN: [HeaderName; 10] = [
    h::BITS_PACKET_TYPE,
    h::BITS_SESSION_ID,
    h::BITS_PROTOCOL,
    h::BITS_RECEIVED_CONTENT_RANGE,
    h::BITS_REPLY_URL,
    h::BITS_HOST_ID,
    h::BITS_HOST_ID_FALLBACK_TIMEOUT,
    h::BITS_ERROR_CODE,
    h::BITS_ERROR,
    h::BITS_ERROR_CONTEXT,
];

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(status) = StatusCode::from_u16(100 + u16::from(first) * 2) else {
        return;
    };
    let headers = header_lines::header_map(rest, &KNOWN);
    let Ok(ack) = ParsedAck::parse(status, &headers) else {
        return;
    };
    assert_eq!(ack.status(), status);
    // What was accepted agrees with the headers it came from.
    if let Some(received) = ack.received() {
        let raw = headers[&h::BITS_RECEIVED_CONTENT_RANGE].to_str().expect("ascii");
        assert_eq!(raw.trim().parse::<u64>().ok(), Some(received));
    }
    if let Some(host) = ack.host_id() {
        assert!(!host.is_empty() && host.len() <= 300);
        assert!(!host.contains(['/', ' ', '@']), "{host:?}");
    }
    if let Some(id) = ack.session_id() {
        assert!(!id.as_bytes().trim_ascii().is_empty());
    }
    // Whatever the server could have sent in an error Ack reads back the same.
    if let (Some(code), Some(context)) = (ack.error_code(), ack.error_context()) {
        let context = match context {
            5 => ErrorContext::RemoteFile,
            7 => ErrorContext::RemoteApplication,
            _ => return,
        };
        let sent = Ack::error_with_context(status, Hresult(code.0), context);
        let again = ParsedAck::parse(status, &sent.headers()).expect("our own Ack parses");
        assert_eq!(again.error_code(), Some(code));
        assert!(again.is_ack());
    }
});
