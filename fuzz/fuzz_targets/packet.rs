//! Header maps built from fuzz bytes, parsed as BITS packets.
//!
//! The input is split into lines (`\n`). A line whose first byte is below `KNOWN.len()` names
//! one of the protocol's headers by index and the rest of the line is its value, so the
//! fuzzer reaches the interesting headers without guessing their names; any other line is
//! `name:value`. Names or values `http` refuses are skipped; repeated names are appended, so
//! duplicate headers are exercised too. The whole input is also offered to
//! `negotiate_protocol` as one header value.

#![no_main]

use axum_bits::protocol::{
    FragmentRange, MAX_HEADER_VALUE_LEN, Packet, PacketType, UPLOAD_PROTOCOL, headers as h,
    negotiate_protocol,
};
use http::{HeaderMap, HeaderName, HeaderValue, header};
use libfuzzer_sys::fuzz_target;

#[path = "shared/header_lines.rs"]
mod header_lines;

const KNOWN: [HeaderName; 9] = [
    h::BITS_PACKET_TYPE,
    h::BITS_SESSION_ID,
    h::BITS_SUPPORTED_PROTOCOLS,
    h::CONTENT_NAME,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::CONTENT_ENCODING,
    header::TRANSFER_ENCODING,
    header::EXPECT,
];

fn check_packet(headers: &HeaderMap, packet: &Packet) {
    assert!(
        headers.values().all(|v| v.len() <= MAX_HEADER_VALUE_LEN),
        "accepted an oversized header value"
    );
    // Repeated headers the packet depends on all say the same thing.
    for ty in &headers.get_all(h::BITS_PACKET_TYPE) {
        assert_eq!(
            PacketType::parse(ty.as_bytes()),
            Some(packet.packet_type()),
            "conflicting packet types accepted"
        );
    }
    if let Some(id) = packet.session_id() {
        let bytes = id.value().as_bytes();
        assert!(!bytes.is_empty(), "empty session id accepted");
        assert_eq!(bytes, bytes.trim_ascii(), "session id not trimmed");
        for sent in &headers.get_all(h::BITS_SESSION_ID) {
            assert!(
                sent.as_bytes().trim_ascii().eq_ignore_ascii_case(bytes),
                "conflicting session ids accepted"
            );
        }
    }
    match packet {
        Packet::CreateSession(create) => {
            let names: Vec<_> = headers.get_all(h::CONTENT_NAME).iter().collect();
            assert_eq!(create.content_name.is_some(), !names.is_empty());
            assert!(
                names.windows(2).all(|pair| pair[0] == pair[1]),
                "conflicting Content-Name accepted"
            );
            // Several header lines form one list: one of them must offer the protocol.
            assert!(
                headers
                    .get_all(h::BITS_SUPPORTED_PROTOCOLS)
                    .iter()
                    .any(|v| negotiate_protocol(Some(v)) == Ok(UPLOAD_PROTOCOL)),
                "Create-Session accepted without the upload protocol"
            );
        }
        Packet::Fragment(fragment) => {
            let ranges: Vec<_> = headers.get_all(header::CONTENT_RANGE).iter().collect();
            assert!(!ranges.is_empty(), "Fragment without Content-Range");
            for range in ranges {
                assert_eq!(FragmentRange::parse(range.as_bytes()), Ok(fragment.range));
            }
            let lengths: Vec<_> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
            assert!(!lengths.is_empty(), "Fragment without Content-Length");
            for length in lengths {
                let text = std::str::from_utf8(length.as_bytes()).expect("digits");
                assert_eq!(text.trim().parse::<u64>().ok(), Some(fragment.range.len()));
            }
        }
        Packet::Ping | Packet::CloseSession(_) | Packet::CancelSession(_) => {
            assert!(!headers.contains_key(header::TRANSFER_ENCODING));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let headers = header_lines::header_map(data, &KNOWN);
    if let Ok(packet) = Packet::from_headers(&headers) {
        check_packet(&headers, &packet);
    }

    assert!(negotiate_protocol(None).is_err());
    if let Ok(value) = HeaderValue::from_bytes(data)
        && let Ok(chosen) = negotiate_protocol(Some(&value))
    {
        assert_eq!(chosen, UPLOAD_PROTOCOL);
        let guid = &UPLOAD_PROTOCOL.as_bytes()[1..UPLOAD_PROTOCOL.len() - 1];
        assert!(
            data.windows(guid.len())
                .any(|w| w.eq_ignore_ascii_case(guid)),
            "negotiated without the GUID in the offer"
        );
    }
});
