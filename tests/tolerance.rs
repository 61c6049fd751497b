//! What real Windows clients (and the odd third-party client) put on the wire: any header
//! casing and order, mixed-case packet types, `Content-Name` everywhere, bodyless packets
//! without `Content-Length`, Pings at any time, 1-byte and 13 MB fragments, and the exact
//! byte layout of the protocol reference's worked example 16.1.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{BitsClient, PROTOCOL, TestServer, data, parts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// a raw HTTP/1.1 client that keeps the status line and header case

#[derive(Debug)]
struct WireResponse {
    status_line: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl WireResponse {
    fn header(&self, name: &str) -> Option<&str> {
        let mut found = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name));
        let first = found.next().map(|(_, v)| v.as_str());
        assert!(found.next().is_none(), "{name} sent twice: {self:?}");
        first
    }

    /// Asserts the exact set of headers (names case-insensitive, values exact), allowing only
    /// the transport's `Date` besides.
    fn assert_headers(&self, expected: &[(&str, &str)]) {
        for (name, value) in expected {
            assert_eq!(self.header(name), Some(*value), "{name}: {self:?}");
        }
        for (name, _) in &self.headers {
            let known = name.eq_ignore_ascii_case("date")
                || expected.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
            assert!(known, "unexpected header {name}: {self:?}");
        }
    }
}

struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn exchange(&mut self, bytes: &[u8]) -> WireResponse {
        self.send(bytes).await;
        self.response().await
    }

    async fn response(&mut self) -> WireResponse {
        tokio::time::timeout(Duration::from_secs(30), self.read_response())
            .await
            .expect("a response within 30 s")
    }

    async fn read_response(&mut self) -> WireResponse {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            assert!(self.fill().await, "connection closed before a response");
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap().to_owned();
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').expect("header line");
                (n.to_owned(), v.trim().to_owned())
            })
            .collect();
        let len = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse::<usize>().unwrap());
        while self.buf.len() < len {
            assert!(self.fill().await, "connection closed inside a body");
        }
        let body = self.buf.drain(..len).collect();
        WireResponse {
            status_line,
            status,
            headers,
            body,
        }
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Whether the server keeps the connection open (no EOF within `wait`).
    async fn still_open(&mut self, wait: Duration) -> bool {
        let mut one = [0u8; 1];
        tokio::time::timeout(wait, self.stream.read(&mut one))
            .await
            .is_err()
    }
}

/// `BITS_POST <target>` with exactly these header lines (in this order and case) and body.
fn request(target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("BITS_POST {target} HTTP/1.1\r\n").into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn assert_file(path: &Path, expected: &[u8]) {
    let actual = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        actual == expected,
        "{}: {} bytes, {} expected, first difference at {:?}",
        path.display(),
        actual.len(),
        expected.len(),
        actual.iter().zip(expected).position(|(a, b)| a != b)
    );
}

/// Every file under `dir`, relative, skipping the server's `.bits` folder.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if entry.file_name() == ".bits" {
                continue;
            }
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                out.push(path.strip_prefix(base).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------------
// packet types, header names and order

#[tokio::test]
async fn packet_types_in_any_case() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let send = |ty: &'static str, sid: Option<String>, range: Option<String>, body: Vec<u8>| {
        let client = client.clone();
        async move {
            let mut headers = vec![("BITS-Packet-Type", ty)];
            if let Some(sid) = &sid {
                headers.push(("BITS-Session-Id", sid));
            }
            if let Some(range) = &range {
                headers.push(("Content-Range", range));
            }
            if ty.eq_ignore_ascii_case("create-session") {
                headers.push(("BITS-Supported-Protocols", PROTOCOL));
            }
            client.send("/mixed.bin", &headers, body).await
        }
    };
    for ty in ["pInG", "PING", "ping", " Ping "] {
        send(ty, None, None, Vec::new()).await.assert_ok();
    }
    let reply = send("cReAtE-sEsSiOn", None, None, Vec::new()).await;
    reply.assert_ok();
    let sid = reply.session_id();
    let bytes = data(30, 1);
    let reply = send(
        "FRAGMENT",
        Some(sid.clone()),
        Some("bytes 0-9/30".into()),
        bytes[..10].to_vec(),
    )
    .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(10));
    let reply = send(
        "fragment",
        Some(sid.clone()),
        Some("bytes 10-29/30".into()),
        bytes[10..].to_vec(),
    )
    .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(30));
    send("CLOSE-SESSION", Some(sid), None, Vec::new())
        .await
        .assert_ok();
    assert_file(&server.root.join("mixed.bin"), &bytes);

    let reply = send("CREATE-SESSION", None, None, Vec::new()).await;
    // The destination exists now (overwrites off): the packet type was understood.
    reply.assert_error(403, "0x80070005");
    let other = client.create_ok("/other.bin").await;
    send("cancel-SESSION", Some(other), None, Vec::new())
        .await
        .assert_ok();
    assert!(parts(&server.root).is_empty());
}

#[tokio::test]
async fn header_names_in_any_case_and_order() {
    let server = TestServer::start(|b| b).await;
    let mut wire = Wire::connect(server.addr).await;
    let create = wire
        .exchange(&request(
            "/order.bin",
            &[
                ("bits-supported-PROTOCOLS", PROTOCOL),
                ("content-LENGTH", "0"),
                ("hOsT", "example"),
                ("BITS-PACKET-TYPE", "Create-Session"),
            ],
            b"",
        ))
        .await;
    assert_eq!(create.status, 200, "{create:?}");
    let sid = create.header("BITS-Session-Id").unwrap().to_owned();

    let bytes = data(5000, 2);
    let frag = wire
        .exchange(&request(
            "/order.bin",
            &[
                ("CONTENT-LENGTH", "3000"),
                ("content-range", "bytes 0-2999/5000"),
                ("host", "example"),
                ("Bits-Session-ID", &sid),
                ("bits-packet-type", "Fragment"),
            ],
            &bytes[..3000],
        ))
        .await;
    assert_eq!(frag.status, 200, "{frag:?}");
    assert_eq!(frag.header("BITS-Received-Content-Range"), Some("3000"));

    let frag = wire
        .exchange(&request(
            "/order.bin",
            &[
                ("Bits-Packet-Type", "Fragment"),
                ("CONTENT-RANGE", "bytes 3000-4999/5000"),
                ("bits-session-id", &sid),
                ("Host", "example"),
                ("Content-length", "2000"),
            ],
            &bytes[3000..],
        ))
        .await;
    assert_eq!(frag.status, 200, "{frag:?}");
    assert_eq!(frag.header("BITS-Received-Content-Range"), Some("5000"));

    let close = wire
        .exchange(&request(
            "/order.bin",
            &[
                ("BITS-SESSION-ID", &sid),
                ("CONTENT-length", "0"),
                ("HOST", "example"),
                ("bits-packet-TYPE", "Close-Session"),
            ],
            b"",
        ))
        .await;
    assert_eq!(close.status, 200, "{close:?}");
    assert_file(&server.root.join("order.bin"), &bytes);
    assert!(parts(&server.root).is_empty());
}

#[tokio::test]
async fn hostile_content_name_is_never_a_path() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(root.join("inbox")).unwrap();
    let server = TestServer::start_in(&root, |b| b).await;
    let client = server.client();
    let names = [
        "../../etc/passwd",
        "..\\..\\windows\\win.ini",
        "/etc/shadow",
        "C:\\evil.bin",
        ".bits/parts/x.part",
        "report.bin",
    ];
    let bytes = data(6000, 3);
    client
        .send(
            "/inbox/report.bin",
            &[("BITS-Packet-Type", "Ping"), ("Content-Name", names[0])],
            Vec::new(),
        )
        .await
        .assert_ok();
    let reply = client
        .send(
            "/inbox/report.bin",
            &[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", PROTOCOL),
                ("Content-Name", names[0]),
            ],
            Vec::new(),
        )
        .await;
    reply.assert_ok();
    let sid = reply.session_id();
    // Windows sends Content-Name on every Fragment; here it differs every time.
    for (i, chunk) in bytes.chunks(1000).enumerate() {
        let first = i * 1000;
        let range = format!("bytes {first}-{}/6000", first + chunk.len() - 1);
        let reply = client
            .send(
                "/inbox/report.bin",
                &[
                    ("BITS-Packet-Type", "Fragment"),
                    ("BITS-Session-Id", &sid),
                    ("Content-Range", &range),
                    ("Content-Name", names[i % names.len()]),
                ],
                chunk.to_vec(),
            )
            .await;
        reply.assert_ok();
    }
    client
        .send(
            "/inbox/report.bin",
            &[
                ("BITS-Packet-Type", "Close-Session"),
                ("BITS-Session-Id", &sid),
                ("Content-Name", names[0]),
            ],
            Vec::new(),
        )
        .await
        .assert_ok();
    assert_file(&root.join("inbox/report.bin"), &bytes);
    // Nothing anywhere else, inside or outside the root.
    assert_eq!(files_under(&root), [PathBuf::from("inbox/report.bin")]);
    let outside: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside, ["root"]);
    assert!(parts(&root).is_empty());
}

#[tokio::test]
async fn bodyless_packets_without_content_length() {
    let server = TestServer::start(|b| b).await;
    let mut wire = Wire::connect(server.addr).await;
    let host = ("Host", "example");
    let ping = wire
        .exchange(&request(
            "/nl.bin",
            &[host, ("BITS-Packet-Type", "Ping")],
            b"",
        ))
        .await;
    assert_eq!(ping.status, 200, "{ping:?}");
    let create = wire
        .exchange(&request(
            "/nl.bin",
            &[
                host,
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", PROTOCOL),
            ],
            b"",
        ))
        .await;
    assert_eq!(create.status, 200, "{create:?}");
    let sid = create.header("BITS-Session-Id").unwrap().to_owned();
    let frag = wire
        .exchange(&request(
            "/nl.bin",
            &[
                host,
                ("BITS-Packet-Type", "Fragment"),
                ("BITS-Session-Id", &sid),
                ("Content-Range", "bytes 0-4/5"),
                ("Content-Length", "5"),
            ],
            b"hello",
        ))
        .await;
    assert_eq!(frag.status, 200, "{frag:?}");
    let close = wire
        .exchange(&request(
            "/nl.bin",
            &[
                host,
                ("BITS-Packet-Type", "Close-Session"),
                ("BITS-Session-Id", &sid),
            ],
            b"",
        ))
        .await;
    assert_eq!(close.status, 200, "{close:?}");
    assert_eq!(std::fs::read(server.root.join("nl.bin")).unwrap(), b"hello");

    let create = wire
        .exchange(&request(
            "/nl2.bin",
            &[
                host,
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", PROTOCOL),
            ],
            b"",
        ))
        .await;
    assert_eq!(create.status, 200, "{create:?}");
    let sid = create.header("BITS-Session-Id").unwrap().to_owned();
    let cancel = wire
        .exchange(&request(
            "/nl2.bin",
            &[
                host,
                ("BITS-Packet-Type", "Cancel-Session"),
                ("BITS-Session-Id", &sid),
            ],
            b"",
        ))
        .await;
    assert_eq!(cancel.status, 200, "{cancel:?}");
    for r in [&ping, &create, &frag, &close, &cancel] {
        assert_eq!(r.header("Content-Length"), Some("0"), "{r:?}");
        assert!(r.body.is_empty());
    }
    assert!(parts(&server.root).is_empty());
    assert!(wire.still_open(Duration::from_millis(50)).await);
}

#[tokio::test]
async fn ping_at_any_time() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let path = "/pings.bin";
    client.ping(path).await.assert_ok();
    let sid = client.create_ok(path).await;
    client.ping(path).await.assert_ok();
    let bytes = data(9000, 4);
    let reply = client.fragment(path, &sid, 0, &bytes[..4000], 9000).await;
    assert_eq!(reply.received(), Some(4000));
    client.ping(path).await.assert_ok();
    // Ping with the session's own id: still no session logic, no state change.
    let reply = client
        .send(
            path,
            &[("BITS-Packet-Type", "Ping"), ("BITS-Session-Id", &sid)],
            Vec::new(),
        )
        .await;
    reply.assert_ok();
    assert!(reply.received().is_none());
    // Resume after a Ping: the server still expects byte 4000.
    let reply = client
        .fragment(path, &sid, 4000, &bytes[4000..8000], 9000)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(8000));
    client.ping(path).await.assert_ok();
    let reply = client
        .fragment(path, &sid, 8000, &bytes[8000..], 9000)
        .await;
    assert_eq!(reply.received(), Some(9000));
    // IIS traces show a Ping between the last Fragment and Close-Session.
    client.ping(path).await.assert_ok();
    client.close(path, &sid).await.assert_ok();
    client.ping(path).await.assert_ok();
    assert_file(&server.root.join("pings.bin"), &bytes);
}

#[tokio::test]
async fn one_byte_fragments() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let bytes = data(40, 5);
    let sid = client.create_ok("/tiny.bin").await;
    for (i, byte) in bytes.iter().enumerate() {
        let reply = client
            .fragment("/tiny.bin", &sid, i as u64, &[*byte], 40)
            .await;
        reply.assert_ok();
        assert_eq!(reply.received(), Some(i as u64 + 1));
        if i + 1 < bytes.len() {
            assert!(!server.root.join("tiny.bin").exists());
        }
    }
    client.close("/tiny.bin", &sid).await.assert_ok();
    assert_file(&server.root.join("tiny.bin"), &bytes);
}

#[tokio::test]
async fn thirteen_megabyte_fragment() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    const BIG: usize = 13 * 1000 * 1000;
    let bytes = data(BIG + 1000, 6);
    let total = bytes.len() as u64;
    let sid = client.create_ok("/big.bin").await;
    let reply = client
        .fragment("/big.bin", &sid, 0, &bytes[..BIG], total)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(BIG as u64));
    let reply = client
        .fragment("/big.bin", &sid, BIG as u64, &bytes[BIG..], total)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(total));
    client.close("/big.bin", &sid).await.assert_ok();
    assert_file(&server.root.join("big.bin"), &bytes);
}

#[tokio::test]
async fn session_id_in_lower_case_is_the_same_session() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/lower.bin").await;
    let lower = sid.to_ascii_lowercase();
    assert_ne!(sid, lower, "ids are issued in upper case");
    let bytes = data(2000, 7);
    let reply = client
        .fragment("/lower.bin", &lower, 0, &bytes[..1000], 2000)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(1000));
    // The Ack echoes the id verbatim, as the client sent it.
    assert_eq!(reply.header("BITS-Session-Id"), Some(lower.as_str()));
    // Upper and lower case name one and the same session.
    let reply = client
        .fragment("/lower.bin", &sid, 1000, &bytes[1000..], 2000)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(2000));
    let reply = client.close("/lower.bin", &lower).await;
    reply.assert_ok();
    assert_eq!(reply.header("BITS-Session-Id"), Some(lower.as_str()));
    assert_file(&server.root.join("lower.bin"), &bytes);
    assert!(parts(&server.root).is_empty());
}

// ---------------------------------------------------------------------------------------------
// the worked example, byte for byte

#[tokio::test]
async fn worked_example_16_1_on_one_keep_alive_connection() {
    let server = TestServer::start(|b| b).await;
    std::fs::create_dir(server.root.join("inbox")).unwrap();
    let file = data(10_000, 161);
    let common = [
        ("Host", "files.example.com"),
        ("Accept", "*/*"),
        ("User-Agent", "Microsoft BITS/7.8"),
        ("Connection", "Keep-Alive"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut headers = common.to_vec();
        headers.extend_from_slice(extra);
        headers
    };
    let mut wire = Wire::connect(server.addr).await;

    // Ping
    let ping = wire
        .exchange(&request(
            "/inbox/report.bin",
            &with(&[("BITS-Packet-Type", "Ping"), ("Content-Length", "0")]),
            b"",
        ))
        .await;
    assert_eq!(ping.status_line, "HTTP/1.1 200 OK");
    ping.assert_headers(&[("BITS-Packet-Type", "Ack"), ("Content-Length", "0")]);
    assert!(ping.body.is_empty());

    // Create-Session
    let create = wire
        .exchange(&request(
            "/inbox/report.bin",
            &with(&[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", PROTOCOL),
                ("Content-Length", "0"),
            ]),
            b"",
        ))
        .await;
    assert_eq!(create.status_line, "HTTP/1.1 200 OK");
    let sid = create.header("BITS-Session-Id").unwrap().to_owned();
    create.assert_headers(&[
        ("BITS-Packet-Type", "Ack"),
        ("BITS-Protocol", PROTOCOL),
        ("BITS-Session-Id", &sid),
        ("Accept-Encoding", "identity"),
        ("Content-Length", "0"),
    ]);
    assert!(create.body.is_empty());
    assert_eq!(sid.len(), 38);
    assert_eq!(sid, sid.to_ascii_uppercase());

    // Three fragments: 4096, 4096, 1808.
    for (first, len) in [(0usize, 4096usize), (4096, 4096), (8192, 1808)] {
        let range = format!("bytes {first}-{}/10000", first + len - 1);
        let length = len.to_string();
        let mut headers = with(&[("BITS-Packet-Type", "Fragment")]);
        headers.push(("BITS-Session-Id", &sid));
        headers.push(("Content-Name", "report.bin"));
        headers.push(("Content-Range", &range));
        headers.push(("Content-Length", &length));
        let ack = wire
            .exchange(&request(
                "/inbox/report.bin",
                &headers,
                &file[first..first + len],
            ))
            .await;
        assert_eq!(ack.status_line, "HTTP/1.1 200 OK", "{ack:?}");
        let received = (first + len).to_string();
        ack.assert_headers(&[
            ("BITS-Packet-Type", "Ack"),
            ("BITS-Session-Id", &sid),
            ("BITS-Received-Content-Range", &received),
            ("Content-Length", "0"),
        ]);
        assert!(ack.body.is_empty());
    }
    // CommitPoint::LastFragment: the file is in place before Close-Session.
    assert_file(&server.root.join("inbox/report.bin"), &file);

    // Close-Session
    let mut headers = with(&[("BITS-Packet-Type", "Close-Session")]);
    headers.push(("BITS-Session-Id", &sid));
    headers.push(("Content-Name", "report.bin"));
    headers.push(("Content-Length", "0"));
    let close = wire
        .exchange(&request("/inbox/report.bin", &headers, b""))
        .await;
    assert_eq!(close.status_line, "HTTP/1.1 200 OK");
    close.assert_headers(&[
        ("BITS-Packet-Type", "Ack"),
        ("BITS-Session-Id", &sid),
        ("Content-Length", "0"),
    ]);
    assert!(close.body.is_empty());

    assert_file(&server.root.join("inbox/report.bin"), &file);
    assert!(parts(&server.root).is_empty());
    assert_eq!(
        files_under(&server.root),
        [PathBuf::from("inbox/report.bin")]
    );
    // Still the same keep-alive connection, and still open.
    assert!(wire.still_open(Duration::from_millis(50)).await);
}

// ---------------------------------------------------------------------------------------------
// Expect: 100-continue, zero-length files, URL forms

#[tokio::test]
async fn fragment_with_expect_100_continue() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let sid = client.create_ok("/expect.bin").await;
    let bytes = data(8000, 8);
    let mut wire = Wire::connect(server.addr).await;
    wire.send(&request(
        "/expect.bin",
        &[
            ("Host", "example"),
            ("BITS-Packet-Type", "Fragment"),
            ("BITS-Session-Id", &sid),
            ("Content-Range", "bytes 0-7999/8000"),
            ("Content-Length", "8000"),
            ("Expect", "100-continue"),
        ],
        b"",
    ))
    .await;
    let interim = wire.response().await;
    assert_eq!(interim.status, 100, "{interim:?}");
    wire.send(&bytes).await;
    let ack = wire.response().await;
    assert_eq!(ack.status, 200, "{ack:?}");
    assert_eq!(ack.header("BITS-Received-Content-Range"), Some("8000"));
    assert_eq!(ack.header("BITS-Packet-Type"), Some("Ack"));
    assert_file(&server.root.join("expect.bin"), &bytes);
    let close = wire
        .exchange(&request(
            "/expect.bin",
            &[
                ("Host", "example"),
                ("BITS-Packet-Type", "Close-Session"),
                ("BITS-Session-Id", &sid),
                ("Content-Length", "0"),
            ],
            b"",
        ))
        .await;
    assert_eq!(close.status, 200, "{close:?}");
}

#[tokio::test]
async fn refused_fragment_with_expect_gets_the_final_answer_without_100() {
    let server = TestServer::start(|b| b).await;
    let mut wire = Wire::connect(server.addr).await;
    wire.send(&request(
        "/expect.bin",
        &[
            ("Host", "example"),
            ("BITS-Packet-Type", "Fragment"),
            ("BITS-Session-Id", "{DEADBEEF-0000-4000-8000-000000000000}"),
            ("Content-Range", "bytes 0-7999/8000"),
            ("Content-Length", "8000"),
            ("Expect", "100-continue"),
        ],
        b"",
    ))
    .await;
    let answer = wire.response().await;
    assert_eq!(answer.status, 500, "{answer:?}");
    assert_eq!(answer.header("BITS-Error-Code"), Some("0x8020001F"));
    assert_eq!(answer.header("BITS-Packet-Type"), Some("Ack"));
    assert!(!server.root.join("expect.bin").exists());
}

#[tokio::test]
async fn zero_length_file() {
    let server = TestServer::start(|b| b).await;
    let mut wire = Wire::connect(server.addr).await;
    let create = wire
        .exchange(&request(
            "/empty.bin",
            &[
                ("Host", "example"),
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", PROTOCOL),
                ("Content-Length", "0"),
            ],
            b"",
        ))
        .await;
    assert_eq!(create.status, 200, "{create:?}");
    let sid = create.header("BITS-Session-Id").unwrap().to_owned();
    let empty_fragment = request(
        "/empty.bin",
        &[
            ("Host", "example"),
            ("BITS-Packet-Type", "Fragment"),
            ("BITS-Session-Id", &sid),
            ("Content-Range", "bytes */0"),
            ("Content-Length", "0"),
        ],
        b"",
    );
    for _ in 0..2 {
        let ack = wire.exchange(&empty_fragment).await;
        assert_eq!(ack.status, 200, "{ack:?}");
        assert_eq!(ack.header("BITS-Received-Content-Range"), Some("0"));
        assert!(ack.header("BITS-Error-Code").is_none());
        let meta = std::fs::metadata(server.root.join("empty.bin")).unwrap();
        assert!(meta.is_file() && meta.len() == 0, "{meta:?}");
    }
    let close = wire
        .exchange(&request(
            "/empty.bin",
            &[
                ("Host", "example"),
                ("BITS-Packet-Type", "Close-Session"),
                ("BITS-Session-Id", &sid),
                ("Content-Length", "0"),
            ],
            b"",
        ))
        .await;
    assert_eq!(close.status, 200, "{close:?}");
    assert_eq!(std::fs::read(server.root.join("empty.bin")).unwrap(), b"");
    assert!(parts(&server.root).is_empty());
}

#[tokio::test]
async fn absolute_form_request_target_from_a_proxy() {
    let server = TestServer::start(|b| b).await;
    std::fs::create_dir(server.root.join("inbox")).unwrap();
    let target = "http://files.example.com/inbox/proxied.bin";
    let mut wire = Wire::connect(server.addr).await;
    let create = wire
        .exchange(&request(
            target,
            &[
                ("Host", "files.example.com"),
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", PROTOCOL),
                ("Content-Length", "0"),
            ],
            b"",
        ))
        .await;
    assert_eq!(create.status, 200, "{create:?}");
    let sid = create.header("BITS-Session-Id").unwrap().to_owned();
    let frag = wire
        .exchange(&request(
            target,
            &[
                ("Host", "files.example.com"),
                ("BITS-Packet-Type", "Fragment"),
                ("BITS-Session-Id", &sid),
                ("Content-Range", "bytes 0-4/5"),
                ("Content-Length", "5"),
            ],
            b"proxy",
        ))
        .await;
    assert_eq!(frag.status, 200, "{frag:?}");
    assert_eq!(
        std::fs::read(server.root.join("inbox/proxied.bin")).unwrap(),
        b"proxy"
    );
}

#[tokio::test]
async fn same_session_over_several_connections() {
    // Windows may reconnect between packets; the session lives on the server, not the
    // connection.
    let server = TestServer::start(|b| b).await;
    let bytes = data(3000, 9);
    let sid = BitsClient::new(server.addr).create_ok("/multi.bin").await;
    for (i, chunk) in bytes.chunks(1000).enumerate() {
        let reply = BitsClient::new(server.addr)
            .fragment("/multi.bin", &sid, (i * 1000) as u64, chunk, 3000)
            .await;
        reply.assert_ok();
    }
    BitsClient::new(server.addr)
        .close("/multi.bin", &sid)
        .await
        .assert_ok();
    assert_file(&server.root.join("multi.bin"), &bytes);
}

#[tokio::test]
async fn stalled_body_keeps_what_arrived_and_the_client_resumes() {
    // A slow or broken network: the body stops half way. The server gives up after the idle
    // timeout, keeps the bytes that did arrive and reports them (reference 5.4).
    let server = TestServer::start(|b| b.body_idle_timeout(Duration::from_millis(200))).await;
    let client = server.client();
    let sid = client.create_ok("/stall.bin").await;
    let bytes = data(10_000, 10);
    let mut wire = Wire::connect(server.addr).await;
    wire.send(&request(
        "/stall.bin",
        &[
            ("Host", "example"),
            ("BITS-Packet-Type", "Fragment"),
            ("BITS-Session-Id", &sid),
            ("Content-Range", "bytes 0-9999/10000"),
            ("Content-Length", "10000"),
        ],
        &bytes[..6000],
    ))
    .await;
    let ack = wire.response().await;
    assert_eq!(ack.header("BITS-Packet-Type"), Some("Ack"), "{ack:?}");
    let received: u64 = ack
        .header("BITS-Received-Content-Range")
        .expect("the offset on a Fragment Ack")
        .parse()
        .unwrap();
    // 408 is transient for the client; the layer documents that the bytes that arrived are
    // kept.
    assert_eq!(ack.status, 408, "{ack:?}");
    assert_eq!(received, 6000, "{ack:?}");
    assert!(!server.root.join("stall.bin").exists());
    // The client resynchronises from the reported offset and finishes.
    client.send_all("/stall.bin", &sid, &bytes, 4096).await;
    client.close("/stall.bin", &sid).await.assert_ok();
    assert_file(&server.root.join("stall.bin"), &bytes);
}

#[tokio::test]
async fn content_name_with_non_ascii_bytes_is_ignored() {
    // Windows file names are Unicode; a client may put raw UTF-8 (or a legacy code page) on
    // the wire. The header is informational only and must not break the packet.
    let server = TestServer::start(|b| b).await;
    let mut wire = Wire::connect(server.addr).await;
    let mut create = b"BITS_POST /unicode.bin HTTP/1.1\r\nHost: example\r\n\
        BITS-Packet-Type: Create-Session\r\nContent-Length: 0\r\nContent-Name: "
        .to_vec();
    create.extend_from_slice("r\u{e9}sum\u{e9} \u{65e5}\u{672c}.txt".as_bytes());
    create
        .extend_from_slice(format!("\r\nBITS-Supported-Protocols: {PROTOCOL}\r\n\r\n").as_bytes());
    let reply = wire.exchange(&create).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let sid = reply.header("BITS-Session-Id").unwrap().to_owned();
    let mut fragment = format!(
        "BITS_POST /unicode.bin HTTP/1.1\r\nHost: example\r\nBITS-Packet-Type: Fragment\r\n\
         BITS-Session-Id: {sid}\r\nContent-Range: bytes 0-2/3\r\nContent-Length: 3\r\n\
         Content-Name: "
    )
    .into_bytes();
    // "résumé.txt" in Windows-1252.
    fragment.extend_from_slice(b"r\xe9sum\xe9.txt\r\n\r\nabc");
    let reply = wire.exchange(&fragment).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("BITS-Received-Content-Range"), Some("3"));
    assert_eq!(
        std::fs::read(server.root.join("unicode.bin")).unwrap(),
        b"abc"
    );
}
