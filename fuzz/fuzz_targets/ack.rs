//! Response header maps built from fuzz bytes, read as Acks by `protocol::ParsedAck::parse`
//! (what the client does with every answer).
//!
//! The first byte picks the status (`100 + byte * 2`, so 100..=610, invalid ones skipped);
//! the rest is split into lines as in the `packet` target: a line whose first byte is below
//! `KNOWN.len()` names a protocol header by index, any other line is `name:value`.

#![no_main]

use axum_bits::protocol::{Ack, ErrorContext, Hresult, ParsedAck, headers as h};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;

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
    let mut headers = HeaderMap::new();
    for line in rest.split(|&b| b == b'\n') {
        let Some((&first, value)) = line.split_first() else {
            continue;
        };
        let (name, value) = match KNOWN.get(usize::from(first)) {
            Some(name) => (name.clone(), value),
            None => {
                let Some(colon) = line.iter().position(|&b| b == b':') else {
                    continue;
                };
                let Ok(name) = HeaderName::from_bytes(&line[..colon]) else {
                    continue;
                };
                (name, &line[colon + 1..])
            }
        };
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(name, value);
        }
    }
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
        let sent = Ack::error(status, Hresult(code.0), context);
        let again = ParsedAck::parse(status, &sent.headers()).expect("our own Ack parses");
        assert_eq!(again.error_code(), Some(code));
        assert!(again.is_ack());
    }
});
