//! The protocol over real sockets: every packet type and every error row of the protocol
//! reference (sections 4, 5, 8, 12 and the checklist in section 19).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use axum_bits::session::SessionRecord;
use axum_bits::store::StoreError;
use axum_bits::{BitsLayer, CommitPoint, CompletionPolicy};
use common::{BitsClient, PROTOCOL, Reply, TestServer, data, owner_from_header, parts};

const E_INVALIDARG: &str = "0x80070057";
const E_ACCESSDENIED: &str = "0x80070005";
const SESSION_NOT_FOUND: &str = "0x8020001F";
const TOO_LARGE: &str = "0x80200020";

/// A syntactically valid session id no server ever issued.
const UNKNOWN_SID: &str = "{DEADBEEF-0000-4000-8000-000000000000}";

// ---------------------------------------------------------------------------------------------
// helpers

/// Sends a Fragment with exactly these headers (plus the packet type and session id).
async fn fragment_with(
    client: &BitsClient,
    path: &str,
    sid: &str,
    range: &str,
    extra: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    let mut headers = vec![
        ("BITS-Packet-Type", "Fragment"),
        ("BITS-Session-Id", sid),
        ("Content-Range", range),
    ];
    headers.extend_from_slice(extra);
    client.send(path, &headers, body).await
}

/// The part file of one session, if it exists.
fn part_of(root: &Path, sid: &str) -> Option<PathBuf> {
    parts(root).into_iter().find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.eq_ignore_ascii_case(&format!("{sid}.part")))
    })
}

fn part_len(root: &Path, sid: &str) -> Option<u64> {
    part_of(root, sid).map(|p| std::fs::metadata(p).unwrap().len())
}

fn read(root: &Path, name: &str) -> Option<Vec<u8>> {
    std::fs::read(root.join(name)).ok()
}

/// Compares large buffers without printing them.
fn assert_bytes(actual: Option<Vec<u8>>, expected: &[u8], what: &str) {
    let actual = actual.unwrap_or_else(|| panic!("{what}: file missing"));
    assert!(
        actual == expected,
        "{what}: {} bytes on disk, {} expected, first difference at {:?}",
        actual.len(),
        expected.len(),
        actual.iter().zip(expected).position(|(a, b)| a != b)
    );
}

/// A braced random (version 4) GUID, as the reference recommends (section 4.2, step 5).
fn assert_braced_guid(sid: &str) {
    assert_eq!(sid.len(), 38, "{sid}");
    assert!(sid.starts_with('{') && sid.ends_with('}'), "{sid}");
    assert_eq!(&sid[15..16], "4", "not a v4 GUID: {sid}");
    let inner = &sid[1..37];
    for (i, c) in inner.char_indices() {
        if [8, 13, 18, 23].contains(&i) {
            assert_eq!(c, '-', "{sid}");
        } else {
            assert!(c.is_ascii_hexdigit(), "{sid}");
        }
    }
}

fn assert_no_error_headers(reply: &Reply) {
    for name in ["BITS-Error-Code", "BITS-Error", "BITS-Error-Context"] {
        assert!(reply.header(name).is_none(), "{name} on {reply:?}");
    }
}

/// Every header name on the reply except the transport's `date`.
fn header_names(reply: &Reply) -> Vec<String> {
    let mut names: Vec<String> = reply
        .headers
        .keys()
        .map(|n| n.as_str().to_owned())
        .filter(|n| n != "date")
        .collect();
    names.sort();
    names
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|s| s.to_ascii_lowercase()).collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// Ping

#[tokio::test]
async fn ping_is_a_plain_ack_without_session() {
    let server = TestServer::start(|b| b).await;
    let reply = server.client().ping("/any/where.bin").await;
    reply.assert_ok();
    assert_no_error_headers(&reply);
    assert_eq!(
        header_names(&reply),
        sorted(&["BITS-Packet-Type", "Content-Length"])
    );
    // Ping creates nothing.
    assert!(parts(&server.root).is_empty());
}

#[tokio::test]
async fn ping_with_unknown_session_id_is_not_session_checked() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    for sid in [UNKNOWN_SID, "{nonsense}", "x"] {
        client
            .send(
                "/a.bin",
                &[("BITS-Packet-Type", "Ping"), ("BITS-Session-Id", sid)],
                Vec::new(),
            )
            .await
            .assert_ok();
    }
}

#[tokio::test]
async fn ping_with_body_is_invalid() {
    let server = TestServer::start(|b| b).await;
    let reply = server
        .client()
        .send("/a.bin", &[("BITS-Packet-Type", "Ping")], b"hello".to_vec())
        .await;
    reply.assert_error(400, E_INVALIDARG);
}

#[tokio::test]
async fn missing_or_unknown_packet_type_is_invalid() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    client
        .send("/a.bin", &[], Vec::new())
        .await
        .assert_error(400, E_INVALIDARG);
    for ty in ["Foo", "Ack", "", "Create Session"] {
        client
            .send("/a.bin", &[("BITS-Packet-Type", ty)], Vec::new())
            .await
            .assert_error(400, E_INVALIDARG);
    }
    assert!(parts(&server.root).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Create-Session

#[tokio::test]
async fn create_session_with_standard_guid() {
    let server = TestServer::start(|b| b).await;
    let reply = server.client().create("/report.bin").await;
    reply.assert_ok();
    assert_no_error_headers(&reply);
    assert_eq!(reply.header("BITS-Protocol"), Some(PROTOCOL));
    assert_eq!(reply.header("Accept-Encoding"), Some("identity"));
    assert_braced_guid(&reply.session_id());
    assert!(reply.header("BITS-Host-Id").is_none());
    assert!(reply.header("BITS-Host-Id-Fallback-Timeout").is_none());
    assert!(reply.header("BITS-Received-Content-Range").is_none());
    assert_eq!(
        header_names(&reply),
        sorted(&[
            "BITS-Packet-Type",
            "BITS-Protocol",
            "BITS-Session-Id",
            "Accept-Encoding",
            "Content-Length"
        ])
    );
    // The staging area exists, the destination does not yet.
    assert!(part_of(&server.root, &reply.session_id()).is_some());
    assert!(!server.root.join("report.bin").exists());
}

#[tokio::test]
async fn create_session_protocol_negotiation_variants() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let zero = "{00000000-0000-0000-0000-000000000000}";
    let offers = [
        PROTOCOL.to_ascii_uppercase(),
        format!("{zero} {PROTOCOL}"),
        format!("{zero},{PROTOCOL}"),
        format!("{zero}, {PROTOCOL}"),
        format!("{PROTOCOL} {zero}"),
        PROTOCOL.trim_matches(|c| c == '{' || c == '}').to_owned(),
    ];
    for (i, offer) in offers.iter().enumerate() {
        let path = format!("/n{i}.bin");
        let reply = client
            .send(
                &path,
                &[
                    ("BITS-Packet-Type", "Create-Session"),
                    ("BITS-Supported-Protocols", offer),
                ],
                Vec::new(),
            )
            .await;
        reply.assert_ok();
        // Always the braced canonical form, whatever the client's spelling.
        assert!(
            reply
                .header("BITS-Protocol")
                .is_some_and(|p| p.eq_ignore_ascii_case(PROTOCOL) && p.starts_with('{')),
            "{offer}: {reply:?}"
        );
        assert_braced_guid(&reply.session_id());
    }
}

#[tokio::test]
async fn create_session_without_a_known_protocol_is_refused() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let offers = [
        "{00000000-0000-0000-0000-000000000000}",
        "{00000000-0000-0000-0000-000000000000} {11111111-1111-1111-1111-111111111111}",
        "",
        "7df0354d249b430f820d3d2a9bef4931",
    ];
    for offer in offers {
        let reply = client
            .send(
                "/p.bin",
                &[
                    ("BITS-Packet-Type", "Create-Session"),
                    ("BITS-Supported-Protocols", offer),
                ],
                Vec::new(),
            )
            .await;
        reply.assert_error(400, E_INVALIDARG);
        assert!(reply.header("BITS-Protocol").is_none(), "{reply:?}");
        assert!(reply.header("BITS-Session-Id").is_none(), "{reply:?}");
    }
    // Missing header altogether.
    let reply = client
        .send(
            "/p.bin",
            &[("BITS-Packet-Type", "Create-Session")],
            Vec::new(),
        )
        .await;
    reply.assert_error(400, E_INVALIDARG);
    assert!(reply.header("BITS-Protocol").is_none(), "{reply:?}");
    assert!(reply.header("BITS-Session-Id").is_none(), "{reply:?}");
    assert!(parts(&server.root).is_empty());
    // Nothing was reserved either: the destination can still be opened.
    client.create_ok("/p.bin").await;
}

#[tokio::test]
async fn create_session_with_body_is_refused() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let reply = client
        .send(
            "/b.bin",
            &[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", PROTOCOL),
            ],
            b"12345678".to_vec(),
        )
        .await;
    reply.assert_error(400, E_INVALIDARG);
    assert!(reply.header("BITS-Protocol").is_none());
    assert!(parts(&server.root).is_empty());
    client.create_ok("/b.bin").await;
}

#[tokio::test]
async fn header_value_limit_is_4096_bytes() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let create = |path: &'static str, name: String| {
        let client = client.clone();
        async move {
            client
                .send(
                    path,
                    &[
                        ("BITS-Packet-Type", "Create-Session"),
                        ("BITS-Supported-Protocols", PROTOCOL),
                        ("Content-Name", &name),
                    ],
                    Vec::new(),
                )
                .await
        }
    };
    create("/at-limit.bin", "n".repeat(4096)).await.assert_ok();
    create("/over-limit.bin", "n".repeat(4097))
        .await
        .assert_error(400, E_INVALIDARG);
    // An over-long protocol list is refused the same way, even though it names the GUID.
    let mut offer = String::from(PROTOCOL);
    while offer.len() <= 4096 {
        offer.push_str(" {00000000-0000-0000-0000-000000000000}");
    }
    client
        .send(
            "/over-limit.bin",
            &[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", &offer),
            ],
            Vec::new(),
        )
        .await
        .assert_error(400, E_INVALIDARG);
    // An unknown header counts too.
    let padding = "p".repeat(5000);
    client
        .send(
            "/over-limit.bin",
            &[("BITS-Packet-Type", "Ping"), ("X-Padding", &padding)],
            Vec::new(),
        )
        .await
        .assert_error(400, E_INVALIDARG);
    assert_eq!(parts(&server.root).len(), 1);
}

#[tokio::test]
async fn two_creates_for_two_urls_get_different_ids() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let a = client.create_ok("/one.bin").await;
    let b = client.create_ok("/two.bin").await;
    assert_braced_guid(&a);
    assert_braced_guid(&b);
    assert_ne!(a.to_ascii_uppercase(), b.to_ascii_uppercase());
    assert_eq!(parts(&server.root).len(), 2);
}

#[tokio::test]
async fn host_id_headers_only_when_configured() {
    let both = TestServer::start(|b| {
        b.host_id("node7.example.com")
            .host_id_fallback_timeout(Duration::from_secs(86400))
    })
    .await;
    let reply = both.client().create("/h.bin").await;
    reply.assert_ok();
    assert_eq!(reply.header("BITS-Host-Id"), Some("node7.example.com"));
    assert_eq!(reply.header("BITS-Host-Id-Fallback-Timeout"), Some("86400"));

    let host_only = TestServer::start(|b| b.host_id("10.0.0.7")).await;
    let reply = host_only.client().create("/h.bin").await;
    reply.assert_ok();
    assert_eq!(reply.header("BITS-Host-Id"), Some("10.0.0.7"));
    assert!(reply.header("BITS-Host-Id-Fallback-Timeout").is_none());

    // A fallback timeout alone means nothing without a host id.
    let fallback_only =
        TestServer::start(|b| b.host_id_fallback_timeout(Duration::from_secs(60))).await;
    let reply = fallback_only.client().create("/h.bin").await;
    reply.assert_ok();
    assert!(reply.header("BITS-Host-Id").is_none());
    assert!(reply.header("BITS-Host-Id-Fallback-Timeout").is_none());

    let neither = TestServer::start(|b| b).await;
    let reply = neither.client().create("/h.bin").await;
    reply.assert_ok();
    assert!(reply.header("BITS-Host-Id").is_none());
    assert!(reply.header("BITS-Host-Id-Fallback-Timeout").is_none());

    // Host id is a Create-Session header only: Ping and Fragment Acks do not carry it.
    let client = both.client();
    let sid_both = client.create_ok("/h2.bin").await;
    let frag = client.fragment("/h2.bin", &sid_both, 0, b"abc", 6).await;
    frag.assert_ok();
    assert!(frag.header("BITS-Host-Id").is_none());
    assert!(
        client
            .ping("/h2.bin")
            .await
            .header("BITS-Host-Id")
            .is_none()
    );
}

#[tokio::test]
async fn create_session_on_a_directory_is_invalid() {
    let server = TestServer::start(|b| b.allow_overwrites(true)).await;
    std::fs::create_dir(server.root.join("inbox")).unwrap();
    let client = server.client();
    for path in ["/inbox", "/inbox/", "/"] {
        let reply = client.create(path).await;
        reply.assert_error(400, E_INVALIDARG);
        assert!(reply.header("BITS-Session-Id").is_none(), "{reply:?}");
    }
    assert!(server.root.join("inbox").is_dir());
    assert!(parts(&server.root).is_empty());
}

#[tokio::test]
async fn existing_file_without_overwrites_is_access_denied() {
    let server = TestServer::start(|b| b).await;
    std::fs::write(server.root.join("taken.bin"), b"original").unwrap();
    let reply = server.client().create("/taken.bin").await;
    reply.assert_error(403, E_ACCESSDENIED);
    assert!(reply.header("BITS-Protocol").is_none());
    assert_eq!(read(&server.root, "taken.bin").unwrap(), b"original");
    assert!(parts(&server.root).is_empty());
}

#[tokio::test]
async fn existing_file_with_overwrites_is_replaced() {
    let server = TestServer::start(|b| b.allow_overwrites(true)).await;
    std::fs::write(server.root.join("taken.bin"), b"original").unwrap();
    let client = server.client();
    let bytes = data(3000, 7);
    client.upload("/taken.bin", &bytes, 1000).await;
    assert_bytes(read(&server.root, "taken.bin"), &bytes, "overwritten file");
}

#[tokio::test]
async fn destination_of_an_open_session_is_busy() {
    let server = TestServer::start(|b| b.allow_overwrites(true)).await;
    let client = server.client();
    let first = client.create_ok("/busy.bin").await;
    let reply = client.create("/busy.bin").await;
    assert_eq!(reply.status, 409, "{reply:?}");
    reply.assert_ack();
    assert!(reply.header("BITS-Protocol").is_none());
    // Transient: once the holder is gone the destination is free again.
    client.cancel("/busy.bin", &first).await.assert_ok();
    let second = client.create_ok("/busy.bin").await;
    assert_ne!(first, second);
}

#[tokio::test]
async fn destination_that_appears_during_the_upload_is_never_replaced() {
    // With CompletionPolicy::Reject the client is told for good (403, fatal).
    let server = TestServer::start(|b| b.completion_policy(CompletionPolicy::Reject)).await;
    let client = server.client();
    let sid = client.create_ok("/race.bin").await;
    let bytes = data(6000, 12);
    client
        .fragment("/race.bin", &sid, 0, &bytes[..4000], 6000)
        .await
        .assert_ok();
    // Another process writes the destination meanwhile; overwrites are off.
    std::fs::write(server.root.join("race.bin"), b"someone else").unwrap();
    let reply = client
        .fragment("/race.bin", &sid, 4000, &bytes[4000..], 6000)
        .await;
    reply.assert_error(403, E_ACCESSDENIED);
    assert_eq!(read(&server.root, "race.bin").unwrap(), b"someone else");
    client.close("/race.bin", &sid).await;
    assert_eq!(read(&server.root, "race.bin").unwrap(), b"someone else");
}

#[tokio::test]
async fn query_string_is_not_part_of_the_destination() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let bytes = data(3000, 13);
    client
        .upload("/q.bin?acct=42&x=..%2f..%2fetc", &bytes, 1000)
        .await;
    assert_bytes(read(&server.root, "q.bin"), &bytes, "file");
    let names: Vec<_> = std::fs::read_dir(&server.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != ".bits")
        .collect();
    assert_eq!(names, ["q.bin"]);
}

#[tokio::test]
async fn fragment_without_content_length_is_invalid() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/chunked.bin").await;
    let mut raw = server.raw().await;
    let request = format!(
        "BITS_POST /chunked.bin HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Fragment\r\n\
         BITS-Session-Id: {sid}\r\nContent-Range: bytes 0-3/4\r\n\
         Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
    );
    let response = raw.exchange(request.as_bytes()).await;
    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(response.header("BITS-Error-Code"), Some(E_INVALIDARG));
    assert_eq!(response.header("Content-Length"), Some("0"));
    // No Content-Length and no body at all.
    let mut raw = server.raw().await;
    let request = format!(
        "BITS_POST /chunked.bin HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Fragment\r\n\
         BITS-Session-Id: {sid}\r\nContent-Range: bytes 0-3/4\r\n\r\n"
    );
    let response = raw.exchange(request.as_bytes()).await;
    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(response.header("BITS-Error-Code"), Some(E_INVALIDARG));
    assert!(!server.root.join("chunked.bin").exists());
    assert_eq!(part_len(&server.root, &sid), Some(0));
}

#[tokio::test]
async fn missing_parent_folder_is_not_found() {
    let server = TestServer::start(|b| b).await;
    let reply = server.client().create("/no/such/folder/f.bin").await;
    assert_eq!(reply.status, 404, "{reply:?}");
    reply.assert_ack();
    assert!(reply.header("BITS-Error-Code").is_some(), "{reply:?}");
    assert!(reply.header("BITS-Protocol").is_none());
    assert!(!server.root.join("no").exists());
    assert!(parts(&server.root).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Fragment

#[tokio::test]
async fn fragments_append_and_report_next_expected_byte() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/f.bin").await;
    let bytes = data(10_000, 1);

    let reply = client
        .fragment("/f.bin", &sid, 0, &bytes[..4096], 10_000)
        .await;
    reply.assert_ok();
    assert_no_error_headers(&reply);
    assert_eq!(reply.received(), Some(4096));
    assert_eq!(reply.header("BITS-Session-Id"), Some(sid.as_str()));
    assert_eq!(part_len(&server.root, &sid), Some(4096));

    let reply = client
        .fragment("/f.bin", &sid, 4096, &bytes[4096..8192], 10_000)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(8192));
    assert!(!server.root.join("f.bin").exists(), "committed too early");
    assert!(reply.header("BITS-Reply-URL").is_none());

    let reply = client
        .fragment("/f.bin", &sid, 8192, &bytes[8192..], 10_000)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(10_000));
    assert!(reply.header("BITS-Reply-URL").is_none());
    // CommitPoint::LastFragment (the default): the file is in place before the final Ack.
    assert_bytes(read(&server.root, "f.bin"), &bytes, "committed file");
}

#[tokio::test]
async fn overlap_writes_only_the_tail() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/o.bin").await;
    let bytes = data(10_000, 2);
    client
        .fragment("/o.bin", &sid, 0, &bytes[..4096], 10_000)
        .await
        .assert_ok();

    // 2048..6143: the part already held (2048..4095) carries different bytes in this body,
    // which must not replace what is stored.
    let mut body = vec![0xEE; 2048];
    body.extend_from_slice(&bytes[4096..6144]);
    let reply = client.fragment("/o.bin", &sid, 2048, &body, 10_000).await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(6144));
    assert_eq!(part_len(&server.root, &sid), Some(6144));
    let part = std::fs::read(part_of(&server.root, &sid).unwrap()).unwrap();
    assert!(part == bytes[..6144], "stored bytes changed by an overlap");

    client.send_all("/o.bin", &sid, &bytes, 4096).await;
    client.close("/o.bin", &sid).await.assert_ok();
    assert_bytes(read(&server.root, "o.bin"), &bytes, "file after overlap");
}

#[tokio::test]
async fn large_overlap_skips_across_many_body_frames() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/big-overlap.bin").await;
    let bytes = data(1_500_000, 16);
    client
        .fragment("/big-overlap.bin", &sid, 0, &bytes[..600_000], 1_500_000)
        .await
        .assert_ok();
    // 500,000 already-held bytes (poisoned here) precede 400,000 new ones.
    let mut body = vec![0xA5; 500_000];
    body.extend_from_slice(&bytes[600_000..1_000_000]);
    let reply = client
        .fragment("/big-overlap.bin", &sid, 100_000, &body, 1_500_000)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(1_000_000));
    let reply = client
        .fragment(
            "/big-overlap.bin",
            &sid,
            1_000_000,
            &bytes[1_000_000..],
            1_500_000,
        )
        .await;
    reply.assert_ok();
    assert_bytes(read(&server.root, "big-overlap.bin"), &bytes, "file");
}

#[tokio::test]
async fn duplicate_fragment_changes_nothing() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/d.bin").await;
    let bytes = data(10_000, 3);
    client
        .fragment("/d.bin", &sid, 0, &bytes[..4096], 10_000)
        .await
        .assert_ok();
    for (first, len) in [(0u64, 1024usize), (0, 4096), (1000, 96), (4095, 1)] {
        let reply = client
            .fragment("/d.bin", &sid, first, &vec![0x55; len], 10_000)
            .await;
        reply.assert_ok();
        assert_eq!(reply.received(), Some(4096), "{first}+{len}");
    }
    let part = std::fs::read(part_of(&server.root, &sid).unwrap()).unwrap();
    assert!(part == bytes[..4096], "a duplicate changed stored data");
}

#[tokio::test]
async fn gap_is_416_with_server_offset_and_writes_nothing() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/g.bin").await;
    let bytes = data(10_000, 4);
    client
        .fragment("/g.bin", &sid, 0, &bytes[..4096], 10_000)
        .await
        .assert_ok();
    for first in [8192u64, 4097] {
        let end = (first as usize + 1808).min(10_000);
        let reply = client
            .fragment("/g.bin", &sid, first, &bytes[first as usize..end], 10_000)
            .await;
        assert_eq!(reply.status, 416, "{reply:?}");
        reply.assert_ack();
        assert_eq!(reply.received(), Some(4096));
        assert_eq!(reply.header("BITS-Session-Id"), Some(sid.as_str()));
        // MC-BUP pairs 416 with HRESULT 0; a failure HRESULT would be fatal for the client.
        if let Some(code) = reply.header("BITS-Error-Code") {
            assert!(
                code.eq_ignore_ascii_case("0x0") || code.eq_ignore_ascii_case("0x00000000"),
                "failure HRESULT on 416: {reply:?}"
            );
        }
        assert_eq!(part_len(&server.root, &sid), Some(4096));
    }
    assert!(!server.root.join("g.bin").exists());
    // The client adopts the server's offset and finishes.
    client.send_all("/g.bin", &sid, &bytes, 4096).await;
    assert_bytes(read(&server.root, "g.bin"), &bytes, "file after gap");
}

#[tokio::test]
async fn capitalised_bytes_unit_is_accepted() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/cap.bin").await;
    let reply = fragment_with(
        &client,
        "/cap.bin",
        &sid,
        "Bytes 0-9/10",
        &[],
        b"0123456789".to_vec(),
    )
    .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(10));
    assert_eq!(read(&server.root, "cap.bin").unwrap(), b"0123456789");
}

#[tokio::test]
async fn missing_or_malformed_content_range_is_invalid() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/r.bin").await;

    let reply = client
        .send(
            "/r.bin",
            &[("BITS-Packet-Type", "Fragment"), ("BITS-Session-Id", &sid)],
            b"0123456789".to_vec(),
        )
        .await;
    reply.assert_error(400, E_INVALIDARG);

    for (range, body_len) in [
        ("bytes 10-5/100", 6usize),
        ("bytes 0-99/50", 100),
        ("bytes abc", 3),
        ("bytes 0-9", 10),
        ("bytes */10", 0),
        ("octets 0-9/10", 10),
        ("bytes -5/10", 5),
        ("bytes 0-9/*", 10),
    ] {
        let reply = fragment_with(&client, "/r.bin", &sid, range, &[], vec![7; body_len]).await;
        reply.assert_error(400, E_INVALIDARG);
    }
    assert_eq!(part_len(&server.root, &sid), Some(0));
    // The session is untouched: a good fragment still starts at 0.
    let reply = client.fragment("/r.bin", &sid, 0, b"abcd", 4).await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(4));
}

#[tokio::test]
async fn content_length_must_match_the_range() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/len.bin").await;
    // reqwest sets Content-Length from the body: 5 and 15 bytes for a 10-byte range.
    for body in [vec![1u8; 5], vec![1u8; 15]] {
        let reply = fragment_with(&client, "/len.bin", &sid, "bytes 0-9/100", &[], body).await;
        reply.assert_error(400, E_INVALIDARG);
    }
    assert_eq!(part_len(&server.root, &sid), Some(0));
    let reply = client.fragment("/len.bin", &sid, 0, &[2; 10], 100).await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(10));
}

#[tokio::test]
async fn total_may_not_change_between_fragments() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/t.bin").await;
    let bytes = data(100, 5);
    client
        .fragment("/t.bin", &sid, 0, &bytes[..50], 100)
        .await
        .assert_ok();
    for total in [101u64, 99, 60] {
        let reply = client
            .fragment("/t.bin", &sid, 50, &bytes[50..60], total)
            .await;
        reply.assert_error(400, E_INVALIDARG);
    }
    assert_eq!(part_len(&server.root, &sid), Some(50));
    let reply = client.fragment("/t.bin", &sid, 50, &bytes[50..], 100).await;
    reply.assert_ok();
    assert_bytes(read(&server.root, "t.bin"), &bytes, "file");
}

#[tokio::test]
async fn fragment_without_session_id_is_invalid() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let reply = client
        .send(
            "/x.bin",
            &[
                ("BITS-Packet-Type", "Fragment"),
                ("Content-Range", "bytes 0-3/4"),
            ],
            b"abcd".to_vec(),
        )
        .await;
    reply.assert_error(400, E_INVALIDARG);
    assert!(!server.root.join("x.bin").exists());
}

#[tokio::test]
async fn fragment_for_unknown_session_is_session_not_found() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    for sid in [UNKNOWN_SID, "{not-a-guid}", "../../etc/passwd"] {
        let reply = client.fragment("/u.bin", sid, 0, b"abcd", 4).await;
        reply.assert_error(500, SESSION_NOT_FOUND);
        assert_eq!(reply.header("BITS-Session-Id"), Some(sid), "{reply:?}");
    }
    assert!(!server.root.join("u.bin").exists());
    assert!(parts(&server.root).is_empty());
}

#[tokio::test]
async fn total_over_the_upload_limit_is_too_large() {
    let server = TestServer::start(|b| b.max_upload_size(1_000_000)).await;
    let client = server.client();
    let sid = client.create_ok("/big.bin").await;
    let reply = client
        .fragment("/big.bin", &sid, 0, &data(4096, 1), 5_000_000)
        .await;
    reply.assert_error(500, TOO_LARGE);
    assert_eq!(reply.received(), Some(0));
    assert_eq!(part_len(&server.root, &sid), Some(0));
    assert!(!server.root.join("big.bin").exists());
    // Exactly at the limit is fine.
    let bytes = data(4096, 2);
    let reply = client
        .fragment("/big.bin", &sid, 0, &bytes, 1_000_000)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(4096));
}

#[tokio::test]
async fn fragment_over_the_fragment_limit_is_plain_413() {
    let server = TestServer::start(|b| b.max_fragment_size(8192)).await;
    let client = server.client();
    let sid = client.create_ok("/frag.bin").await;
    let bytes = data(20_000, 6);
    client
        .fragment("/frag.bin", &sid, 0, &bytes[..4096], 20_000)
        .await
        .assert_ok();
    let reply = client
        .fragment("/frag.bin", &sid, 4096, &bytes[4096..14_096], 20_000)
        .await;
    assert_eq!(reply.status, 413, "{reply:?}");
    reply.assert_ack();
    assert_no_error_headers(&reply);
    assert_eq!(reply.received(), Some(4096));
    assert_eq!(part_len(&server.root, &sid), Some(4096));
    // Exactly at the limit is accepted; the client shrinks and finishes.
    let reply = client
        .fragment("/frag.bin", &sid, 4096, &bytes[4096..12_288], 20_000)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(12_288));
    client.send_all("/frag.bin", &sid, &bytes, 5000).await;
    assert_bytes(read(&server.root, "frag.bin"), &bytes, "file after 413");
}

#[tokio::test]
async fn only_identity_content_encoding_is_accepted() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/enc.bin").await;
    for encoding in ["gzip", "deflate", "br", "identity, gzip"] {
        let reply = fragment_with(
            &client,
            "/enc.bin",
            &sid,
            "bytes 0-3/8",
            &[("Content-Encoding", encoding)],
            b"abcd".to_vec(),
        )
        .await;
        reply.assert_error(400, E_INVALIDARG);
    }
    assert_eq!(part_len(&server.root, &sid), Some(0));
    for (first, encoding) in [(0u64, "identity"), (4, "Identity")] {
        let range = format!("bytes {first}-{}/8", first + 3);
        let reply = fragment_with(
            &client,
            "/enc.bin",
            &sid,
            &range,
            &[("Content-Encoding", encoding)],
            b"abcd".to_vec(),
        )
        .await;
        reply.assert_ok();
        assert_eq!(reply.received(), Some(first + 4));
    }
    assert_eq!(read(&server.root, "enc.bin").unwrap(), b"abcdabcd");
}

#[tokio::test]
async fn final_fragment_commits_and_resent_final_fragment_is_ok() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/final.bin").await;
    let bytes = data(5000, 8);
    client
        .fragment("/final.bin", &sid, 0, &bytes[..3000], 5000)
        .await
        .assert_ok();
    let reply = client
        .fragment("/final.bin", &sid, 3000, &bytes[3000..], 5000)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(5000));
    assert_bytes(read(&server.root, "final.bin"), &bytes, "committed file");

    // The final Ack got lost: the client sends the final fragment again.
    let reply = client
        .fragment("/final.bin", &sid, 3000, &bytes[3000..], 5000)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(5000));
    // ... or the whole file again.
    let reply = client.fragment("/final.bin", &sid, 0, &bytes, 5000).await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(5000));
    assert_bytes(read(&server.root, "final.bin"), &bytes, "file after resend");

    client.close("/final.bin", &sid).await.assert_ok();
    // Even after Close, a late copy of the final fragment gets the total (8.5).
    let reply = client
        .fragment("/final.bin", &sid, 3000, &bytes[3000..], 5000)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(5000));
    assert_bytes(read(&server.root, "final.bin"), &bytes, "file after close");
    assert!(parts(&server.root).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Close-Session

#[tokio::test]
async fn close_after_completion_releases_everything() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/c.bin").await;
    let bytes = data(9000, 9);
    client.send_all("/c.bin", &sid, &bytes, 4096).await;
    let reply = client.close("/c.bin", &sid).await;
    reply.assert_ok();
    assert_no_error_headers(&reply);
    assert_eq!(reply.header("BITS-Session-Id"), Some(sid.as_str()));
    assert!(parts(&server.root).is_empty());
    assert_bytes(read(&server.root, "c.bin"), &bytes, "closed file");

    // Repeated Close (lost Ack) → 200 again.
    for _ in 0..2 {
        let reply = client.close("/c.bin", &sid).await;
        reply.assert_ok();
        assert_eq!(reply.header("BITS-Session-Id"), Some(sid.as_str()));
    }
    assert_bytes(
        read(&server.root, "c.bin"),
        &bytes,
        "file after repeated close",
    );
}

#[tokio::test]
async fn close_unknown_session_is_session_not_found() {
    let server = TestServer::start(|b| b).await;
    let reply = server.client().close("/c.bin", UNKNOWN_SID).await;
    reply.assert_error(500, SESSION_NOT_FOUND);
    assert_eq!(reply.header("BITS-Session-Id"), Some(UNKNOWN_SID));
}

#[tokio::test]
async fn close_incomplete_session_discards_the_partial_file() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/partial.bin").await;
    client
        .fragment("/partial.bin", &sid, 0, &data(4096, 1), 10_000)
        .await
        .assert_ok();
    assert_eq!(part_len(&server.root, &sid), Some(4096));
    let reply = client.close("/partial.bin", &sid).await;
    reply.assert_ok();
    assert!(parts(&server.root).is_empty());
    assert!(!server.root.join("partial.bin").exists());
    // The rest of the file cannot revive the session.
    let reply = client
        .fragment("/partial.bin", &sid, 4096, &data(5904, 2), 10_000)
        .await;
    reply.assert_error(500, SESSION_NOT_FOUND);
    assert!(!server.root.join("partial.bin").exists());
    // A session that never got a byte closes the same way.
    let empty = client.create_ok("/partial.bin").await;
    client.close("/partial.bin", &empty).await.assert_ok();
    assert!(!server.root.join("partial.bin").exists());
    assert!(parts(&server.root).is_empty());
}

#[tokio::test]
async fn close_with_body_or_without_id_is_invalid() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/cb.bin").await;
    let bytes = data(100, 1);
    client
        .fragment("/cb.bin", &sid, 0, &bytes[..60], 100)
        .await
        .assert_ok();

    let reply = client
        .send(
            "/cb.bin",
            &[
                ("BITS-Packet-Type", "Close-Session"),
                ("BITS-Session-Id", &sid),
            ],
            b"12345678".to_vec(),
        )
        .await;
    reply.assert_error(400, E_INVALIDARG);
    let reply = client
        .send(
            "/cb.bin",
            &[("BITS-Packet-Type", "Close-Session")],
            Vec::new(),
        )
        .await;
    reply.assert_error(400, E_INVALIDARG);
    // Neither refused Close touched the session (a Close would have discarded the part).
    assert_eq!(part_len(&server.root, &sid), Some(60));
    let reply = client
        .fragment("/cb.bin", &sid, 60, &bytes[60..], 100)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(100));
    client.close("/cb.bin", &sid).await.assert_ok();
    assert!(parts(&server.root).is_empty());
    assert_bytes(read(&server.root, "cb.bin"), &bytes, "file");
}

// ---------------------------------------------------------------------------------------------
// Cancel-Session

#[tokio::test]
async fn cancel_before_completion_deletes_everything() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/x.bin").await;
    client
        .fragment("/x.bin", &sid, 0, &data(4096, 1), 10_000)
        .await
        .assert_ok();
    let reply = client.cancel("/x.bin", &sid).await;
    reply.assert_ok();
    assert_no_error_headers(&reply);
    assert_eq!(reply.header("BITS-Session-Id"), Some(sid.as_str()));
    assert!(parts(&server.root).is_empty());
    assert!(!server.root.join("x.bin").exists());

    let reply = client
        .fragment("/x.bin", &sid, 4096, &data(5904, 2), 10_000)
        .await;
    reply.assert_error(500, SESSION_NOT_FOUND);
    assert!(parts(&server.root).is_empty());
    assert!(!server.root.join("x.bin").exists());

    // Repeated Cancel → 200.
    client.cancel("/x.bin", &sid).await.assert_ok();
}

#[tokio::test]
async fn cancel_after_completion_keeps_the_committed_file() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/kept.bin").await;
    let bytes = data(6000, 3);
    client.send_all("/kept.bin", &sid, &bytes, 4096).await;
    assert_bytes(read(&server.root, "kept.bin"), &bytes, "committed file");
    for _ in 0..2 {
        client.cancel("/kept.bin", &sid).await.assert_ok();
    }
    assert_bytes(read(&server.root, "kept.bin"), &bytes, "file after cancel");
    assert!(parts(&server.root).is_empty());
}

#[tokio::test]
async fn cancel_unknown_session_is_session_not_found() {
    let server = TestServer::start(|b| b).await;
    let reply = server.client().cancel("/x.bin", UNKNOWN_SID).await;
    reply.assert_error(500, SESSION_NOT_FOUND);
    let reply = server
        .client()
        .send(
            "/x.bin",
            &[("BITS-Packet-Type", "Cancel-Session")],
            Vec::new(),
        )
        .await;
    reply.assert_error(400, E_INVALIDARG);
}

#[tokio::test]
async fn cancel_after_close_is_ok() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let bytes = data(100, 4);
    let sid = client.upload("/cc.bin", &bytes, 100).await;
    client.cancel("/cc.bin", &sid).await.assert_ok();
    assert_bytes(read(&server.root, "cc.bin"), &bytes, "file");
}

// ---------------------------------------------------------------------------------------------
// CommitPoint::CloseSession

#[tokio::test]
async fn commit_on_close_session() {
    let server = TestServer::start(|b| b.commit_point(CommitPoint::CloseSession)).await;
    let client = server.client();
    let sid = client.create_ok("/late.bin").await;
    let bytes = data(10_000, 5);
    client.send_all("/late.bin", &sid, &bytes, 4096).await;
    assert!(
        !server.root.join("late.bin").exists(),
        "committed before Close"
    );
    // A re-sent final fragment does not commit either.
    let reply = client
        .fragment("/late.bin", &sid, 8192, &bytes[8192..], 10_000)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(10_000));
    assert!(
        !server.root.join("late.bin").exists(),
        "committed before Close"
    );

    client.close("/late.bin", &sid).await.assert_ok();
    assert_bytes(read(&server.root, "late.bin"), &bytes, "file after Close");
    assert!(parts(&server.root).is_empty());
    client.close("/late.bin", &sid).await.assert_ok();
}

#[tokio::test]
async fn commit_on_close_session_cancel_deletes_the_upload() {
    let server = TestServer::start(|b| b.commit_point(CommitPoint::CloseSession)).await;
    let client = server.client();
    let sid = client.create_ok("/gone.bin").await;
    let bytes = data(10_000, 6);
    client.send_all("/gone.bin", &sid, &bytes, 4096).await;
    client.cancel("/gone.bin", &sid).await.assert_ok();
    assert!(!server.root.join("gone.bin").exists());
    assert!(parts(&server.root).is_empty());
    client
        .close("/gone.bin", &sid)
        .await
        .assert_error(500, SESSION_NOT_FOUND);
    assert!(!server.root.join("gone.bin").exists());
}

// ---------------------------------------------------------------------------------------------
// Ack shape across every outcome

#[tokio::test]
async fn every_response_is_a_well_formed_ack() {
    let server = TestServer::start(|b| b.max_fragment_size(8192).max_upload_size(50_000)).await;
    let client = server.client();
    std::fs::write(server.root.join("exists.bin"), b"x").unwrap();
    let sid = client.create_ok("/ack.bin").await;
    let mut replies = vec![
        client.ping("/ack.bin").await,
        client.create("/ack2.bin").await,
        client.create("/exists.bin").await,
        client.create("/ack.bin").await,
        client.create("/missing/dir.bin").await,
        client.create("/").await,
        client
            .send("/ack.bin", &[("BITS-Packet-Type", "Nope")], Vec::new())
            .await,
        client
            .fragment("/ack.bin", &sid, 0, &data(100, 1), 1000)
            .await,
        client
            .fragment("/ack.bin", &sid, 500, &data(100, 1), 1000)
            .await,
        client
            .fragment("/ack.bin", &sid, 0, &data(100, 1), 999)
            .await,
        client
            .fragment("/ack.bin", UNKNOWN_SID, 0, &data(100, 1), 1000)
            .await,
        client.close("/ack.bin", UNKNOWN_SID).await,
        client.cancel("/ack.bin", UNKNOWN_SID).await,
    ];
    let big = client.create_ok("/big.bin").await;
    replies.push(
        client
            .fragment("/big.bin", &big, 0, &data(10, 1), 60_000)
            .await,
    );
    replies.push(
        client
            .fragment("/big.bin", &big, 0, &data(9000, 1), 20_000)
            .await,
    );
    replies.push(
        client
            .fragment("/ack.bin", &sid, 100, &data(900, 1), 1000)
            .await,
    );
    replies.push(client.close("/ack.bin", &sid).await);
    replies.push(client.close("/ack.bin", &sid).await);
    replies.push(client.cancel("/ack.bin", &sid).await);

    let mut statuses = Vec::new();
    for reply in &replies {
        reply.assert_ack();
        if reply.status == 200 {
            assert_no_error_headers(reply);
        } else if reply.status != 413 && reply.status != 416 {
            let code = reply.header("BITS-Error-Code");
            assert!(
                code.is_some(),
                "error Ack without BITS-Error-Code: {reply:?}"
            );
            assert_eq!(reply.header("BITS-Error"), code, "{reply:?}");
            assert_eq!(reply.header("BITS-Error-Context"), Some("0x5"), "{reply:?}");
            let code = code.unwrap();
            assert!(
                code.starts_with("0x") && code.len() == 10,
                "HRESULT format: {reply:?}"
            );
        }
        statuses.push(reply.status);
    }
    // Every kind of outcome was exercised.
    for status in [200, 400, 403, 404, 409, 413, 416, 500] {
        assert!(statuses.contains(&status), "no {status} in {statuses:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Session expiry and limits

#[tokio::test]
async fn idle_sessions_expire() {
    let server = TestServer::start(|b| b.session_timeout(Duration::from_millis(200))).await;
    let client = server.client();
    let sid = client.create_ok("/old.bin").await;
    client
        .fragment("/old.bin", &sid, 0, &data(100, 1), 1000)
        .await
        .assert_ok();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let fresh = client.create_ok("/fresh.bin").await;
    let fresh_at = Instant::now();
    let report = server.layer.sweeper().sweep().await.unwrap();
    let fresh_is_young = fresh_at.elapsed() < Duration::from_millis(150);
    assert!(report.expired >= 1, "{report:?}");

    let reply = client
        .fragment("/old.bin", &sid, 100, &data(100, 2), 1000)
        .await;
    reply.assert_error(500, SESSION_NOT_FOUND);
    client
        .close("/old.bin", &sid)
        .await
        .assert_error(500, SESSION_NOT_FOUND);
    assert!(part_of(&server.root, &sid).is_none());
    assert!(!server.root.join("old.bin").exists());
    // The destination is free again.
    client.create_ok("/old.bin").await;

    if fresh_is_young {
        assert_eq!(report.expired, 1, "{report:?}");
        let reply = client.fragment("/fresh.bin", &fresh, 0, b"ok", 2).await;
        reply.assert_ok();
        assert_eq!(read(&server.root, "fresh.bin").unwrap(), b"ok");
    }
}

#[tokio::test]
async fn expiry_keeps_a_committed_file() {
    // Long enough that the fragments never find their session expired on a slow machine.
    let server = TestServer::start(|b| b.session_timeout(Duration::from_millis(300))).await;
    let client = server.client();
    let sid = client.create_ok("/kept.bin").await;
    let bytes = data(5000, 14);
    client.send_all("/kept.bin", &sid, &bytes, 4096).await;
    // No Close-Session ever arrives (the client crashed after the final Ack).
    tokio::time::sleep(Duration::from_millis(400)).await;
    let report = server.layer.sweeper().sweep().await.unwrap();
    assert_eq!(report.expired, 1, "{report:?}");
    assert_bytes(read(&server.root, "kept.bin"), &bytes, "file after expiry");
    assert!(parts(&server.root).is_empty());
}

/// Reference 18.28: the session timer is reset "on any successful packet for the session";
/// the builder documents `session_timeout` as "without a successful packet". A re-sent
/// fragment the server already holds is answered 200, so it is such a packet.
#[tokio::test]
async fn duplicate_fragment_resets_the_session_timer() {
    const TIMEOUT: Duration = Duration::from_millis(600);
    let server = TestServer::start(|b| b.session_timeout(TIMEOUT)).await;
    let client = server.client();
    let sid = client.create_ok("/dup.bin").await;
    let bytes = data(100, 15);
    client
        .fragment("/dup.bin", &sid, 0, &bytes[..10], 100)
        .await
        .assert_ok();
    let first_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(350)).await;
    // The Ack of the first fragment was lost; the client sends it again.
    let reply = client
        .fragment("/dup.bin", &sid, 0, &bytes[..10], 100)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(10));
    let duplicate_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(350)).await;
    let report = server.layer.sweeper().sweep().await.unwrap();
    let since_duplicate = duplicate_at.elapsed();
    assert!(first_at.elapsed() > TIMEOUT);
    if since_duplicate >= TIMEOUT {
        eprintln!("machine too slow to judge ({since_duplicate:?} since the duplicate)");
        return;
    }
    assert_eq!(
        report.expired, 0,
        "session expired {since_duplicate:?} after a successful packet (timeout {TIMEOUT:?})"
    );
    let reply = client
        .fragment("/dup.bin", &sid, 10, &bytes[10..], 100)
        .await;
    reply.assert_ok();
    assert_bytes(read(&server.root, "dup.bin"), &bytes, "file");
}

#[tokio::test]
async fn refused_packets_keep_the_connection_usable() {
    let server = TestServer::start(|b| b.max_fragment_size(8192)).await;
    let client = server.client();
    let sid = client.create_ok("/conn.bin").await;
    client
        .fragment("/conn.bin", &sid, 0, &data(100, 1), 100_000)
        .await
        .assert_ok();
    let mut raw = server.raw().await;
    let ping = b"BITS_POST /conn.bin HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Ping\r\n\
                 Content-Length: 0\r\n\r\n";
    let fragment = |range: &str, sid: &str, len: usize| {
        let mut request = format!(
            "BITS_POST /conn.bin HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Fragment\r\n\
             BITS-Session-Id: {sid}\r\nContent-Range: {range}\r\nContent-Length: {len}\r\n\r\n"
        )
        .into_bytes();
        request.extend(data(len, 2));
        request
    };
    let cases: Vec<(Vec<u8>, u16)> = vec![
        // Content-Length larger than the range.
        (fragment("bytes 100-109/100000", &sid, 5000), 400),
        // Gap.
        (fragment("bytes 5000-9999/100000", &sid, 5000), 416),
        // Over the fragment limit.
        (fragment("bytes 100-20099/100000", &sid, 20_000), 413),
        // Unknown session.
        (fragment("bytes 0-4999/100000", UNKNOWN_SID, 5000), 500),
        // Body on a Ping.
        (
            b"BITS_POST /conn.bin HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Ping\r\n\
              Content-Length: 5\r\n\r\nhello"
                .to_vec(),
            400,
        ),
    ];
    for (request, status) in cases {
        let response = raw.exchange(&request).await;
        assert_eq!(response.status, status, "{response:?}");
        assert_eq!(response.header("BITS-Packet-Type"), Some("Ack"));
        // The refused body was consumed: the next request on this connection is parsed as one.
        let response = raw.exchange(ping).await;
        assert_eq!(response.status, 200, "after a {status}: {response:?}");
        assert_eq!(response.header("BITS-Packet-Type"), Some("Ack"));
    }
    assert_eq!(part_len(&server.root, &sid), Some(100));
}

#[tokio::test]
async fn session_limit_answers_503() {
    let server = TestServer::start(|b| b.max_sessions(2)).await;
    let client = server.client();
    let a = client.create_ok("/s1.bin").await;
    let _b = client.create_ok("/s2.bin").await;
    let reply = client.create("/s3.bin").await;
    assert_eq!(reply.status, 503, "{reply:?}");
    reply.assert_ack();
    assert!(reply.header("BITS-Error-Code").is_some(), "{reply:?}");
    assert!(reply.header("BITS-Session-Id").is_none(), "{reply:?}");
    assert!(reply.header("BITS-Protocol").is_none(), "{reply:?}");
    assert_eq!(parts(&server.root).len(), 2);
    // A finished session frees its slot.
    client.send_all("/s1.bin", &a, b"done", 4).await;
    client.close("/s1.bin", &a).await.assert_ok();
    client.create_ok("/s3.bin").await;
}

/// A store whose creates take a round trip, as a database's do: a create is not visible to
/// the session counts until it has finished.
struct SlowCreates(axum_bits::store::MemoryStore);

impl axum_bits::store::SessionStore for SlowCreates {
    async fn create(&self, record: &SessionRecord) -> Result<(), StoreError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.0.create(record).await
    }
    async fn load(&self, id: axum_bits::SessionId) -> Result<Option<SessionRecord>, StoreError> {
        self.0.load(id).await
    }
    async fn update(&self, expected: u64, record: &SessionRecord) -> Result<(), StoreError> {
        self.0.update(expected, record).await
    }
    async fn remove(&self, id: axum_bits::SessionId) -> Result<bool, StoreError> {
        self.0.remove(id).await
    }
    async fn list(&self) -> Result<Vec<SessionRecord>, StoreError> {
        self.0.list().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_never_exceed_the_session_limit() {
    let server = TestServer::start(|b| {
        b.max_sessions(5)
            .store(SlowCreates(axum_bits::store::MemoryStore::new()))
    })
    .await;
    // Collected first, so that all of them are in flight at once.
    let creates: Vec<_> = (0..40)
        .map(|i| {
            let client = server.client();
            tokio::spawn(async move { client.create(&format!("/race{i}.bin")).await.status })
        })
        .collect();
    let mut statuses = Vec::new();
    for create in creates {
        statuses.push(create.await.unwrap());
    }
    let created = statuses.iter().filter(|&&s| s == 200).count();
    assert_eq!(created, 5, "{statuses:?}");
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 503),
        "{statuses:?}"
    );
    assert_eq!(parts(&server.root).len(), 5);
}

// ---------------------------------------------------------------------------------------------
// Owner isolation

#[tokio::test]
async fn sessions_belong_to_their_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = BitsLayer::builder(tmp.path()).build().unwrap();
    let app = Router::new()
        .route("/", get(|| async { "app" }))
        .layer(layer.clone())
        .layer(axum::middleware::from_fn(owner_from_header));
    let server = TestServer::serve(tmp.path(), layer, app).await;
    let client = server.client();
    fn as_user<'a>(user: &'a str, headers: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut v = headers.to_vec();
        v.push(("X-User", user));
        v
    }

    let reply = client
        .send(
            "/mine.bin",
            &as_user(
                "alice",
                &[
                    ("BITS-Packet-Type", "Create-Session"),
                    ("BITS-Supported-Protocols", PROTOCOL),
                ],
            ),
            Vec::new(),
        )
        .await;
    reply.assert_ok();
    let sid = reply.session_id();
    let bytes = data(8000, 11);
    let frag = |first: usize, end: usize| format!("bytes {first}-{}/8000", end - 1);

    let range = frag(0, 4000);
    let reply = client
        .send(
            "/mine.bin",
            &as_user(
                "alice",
                &[
                    ("BITS-Packet-Type", "Fragment"),
                    ("BITS-Session-Id", &sid),
                    ("Content-Range", &range),
                ],
            ),
            bytes[..4000].to_vec(),
        )
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(4000));

    // Bob, and an anonymous request, cannot see alice's session at all.
    let range = frag(4000, 8000);
    let fragment_headers = [
        ("BITS-Packet-Type", "Fragment"),
        ("BITS-Session-Id", sid.as_str()),
        ("Content-Range", range.as_str()),
    ];
    for headers in [as_user("bob", &fragment_headers), fragment_headers.to_vec()] {
        let reply = client.send("/mine.bin", &headers, vec![0xAB; 4000]).await;
        reply.assert_error(500, SESSION_NOT_FOUND);
        assert!(reply.received().is_none(), "offset leaked: {reply:?}");
    }
    for ty in ["Close-Session", "Cancel-Session"] {
        let reply = client
            .send(
                "/mine.bin",
                &as_user(
                    "bob",
                    &[("BITS-Packet-Type", ty), ("BITS-Session-Id", &sid)],
                ),
                Vec::new(),
            )
            .await;
        reply.assert_error(500, SESSION_NOT_FOUND);
    }
    assert!(!tmp.path().join("mine.bin").exists());
    assert_eq!(part_len(tmp.path(), &sid), Some(4000));

    // Alice carries on undisturbed.
    let reply = client
        .send(
            "/mine.bin",
            &as_user("alice", &fragment_headers),
            bytes[4000..].to_vec(),
        )
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(8000));
    client
        .send(
            "/mine.bin",
            &as_user(
                "alice",
                &[
                    ("BITS-Packet-Type", "Close-Session"),
                    ("BITS-Session-Id", &sid),
                ],
            ),
            Vec::new(),
        )
        .await
        .assert_ok();
    assert_bytes(read(tmp.path(), "mine.bin"), &bytes, "alice's file");
}
