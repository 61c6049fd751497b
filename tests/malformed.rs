//! Malformed-packet storm: at least 10,000 generated requests, most of them broken on purpose,
//! sent over real TCP connections to a live server, every answer checked.
//!
//! Each answer must be one of
//! * a well-formed BITS Ack (`BITS-Packet-Type: Ack`, `Content-Length: 0`, no body; a non-200
//!   status carries `BITS-Error-Code: 0x` + 8 hex digits and `BITS-Error-Context: 0x5`/`0x7`,
//!   except a plain 413 and a 416, whose code is HRESULT 0),
//! * a pass-through: the app's own answer, recognised by the `x-app: 1` header that a middleware
//!   *inside* the BITS layer puts on every app response (fallback and 405 included), or
//! * a transport rejection: hyper's bare 400/414/431 for a request it cannot parse, allowed
//!   only where the generator deliberately broke the HTTP syntax.
//!
//! Besides: a `BITS_POST` under the prefix must get an Ack and everything else must pass
//! through; no 5xx without BITS headers; no panic; no hang (5 s per exchange; only requests
//! that were deliberately cut short and closed may end without an answer). Afterwards a
//! normal upload still works byte for byte, and cancelled sessions left no part files.
//!
//! The generator is a seeded splitmix64. Environment knobs:
//! `MALFORMED_SEED` (decimal or `0x` hex), `MALFORMED_PACKETS` (default 10,000) and
//! `MALFORMED_WORKERS` (concurrent connections, default 8). Each worker draws its requests from
//! its own stream derived from the seed; with `MALFORMED_WORKERS=1` a run is one stream against
//! a server only it changes, so the same seed replays the same requests (up to the session ids
//! the server hands out). A failure report quotes the exact request bytes.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum_bits::BitsLayer;
use common::{BitsClient, PROTOCOL, data, parts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEFAULT_SEED: u64 = 0xB175_5EED_2024_0001;
const DEFAULT_PACKETS: usize = 10_000;
const DEFAULT_WORKERS: usize = 8;

const PREFIX: &str = "/up";
const MAX_FRAGMENT: u64 = 64 * 1024;
const MAX_UPLOAD: u64 = 1 << 20;
const BODY_IDLE: Duration = Duration::from_millis(300);
/// Every exchange (write, then read the answer) must finish within this.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// The header the app's middleware puts on every app response.
const APP_MARKER: &str = "x-app";
/// The protocol's header value limit.
const MAX_VALUE: usize = 4096;
/// Failures reported in detail (all are counted).
const REPORTED_FAILURES: usize = 12;

static PANICS: AtomicUsize = AtomicUsize::new(0);

// ---------------------------------------------------------------------------------------------
// deterministic randomness

/// splitmix64: tiny, fast, good enough to drive a generator, and reproducible everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "empty range");
        self.next() % n
    }

    fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn size(&mut self, lo: usize, hi: usize) -> usize {
        self.between(lo as u64, hi as u64) as usize
    }

    /// True with probability `per_mille` / 1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    fn pick<'a, T: ?Sized>(&mut self, items: &[&'a T]) -> &'a T {
        items[self.index(items.len())]
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Printable ASCII (no control characters), e.g. for header values.
    fn printable(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| char::from(b' ' + self.below(95) as u8))
            .collect()
    }

    /// Characters valid in an HTTP token (method, header name).
    fn token(&mut self, len: usize) -> String {
        const TCHAR: &[u8] =
            b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        (0..len)
            .map(|_| char::from(TCHAR[self.index(TCHAR.len())]))
            .collect()
    }

    fn mixed_case(&mut self, s: &str) -> String {
        s.chars()
            .map(|c| {
                if self.below(2) == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    }

    /// A braced upper-case GUID that no session has.
    fn guid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{{{:08X}-{:04X}-4{:03X}-A{:03X}-{:012X}}}",
            a >> 32,
            (a >> 16) & 0xFFFF,
            a & 0xFFF,
            b >> 52,
            b & 0xFFFF_FFFF_FFFF
        )
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.index(i + 1));
        }
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("{name}={v:?}: {e}"))
        }
        Err(_) => default,
    }
}

// ---------------------------------------------------------------------------------------------
// the generated requests

/// Where a request must end up, judged from its method and raw path only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `BITS_POST` (exactly) at or under the prefix: the layer must answer with an Ack.
    Bits,
    /// Anything else: the app must answer.
    App,
    /// The target's meaning is up to the URI parser (a `#` in it): either is fine.
    Either,
}

/// How the request's bytes end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Everything announced is sent.
    Complete,
    /// More bytes than `Content-Length` announces: they form a garbage next request.
    Extra,
    /// Only the first `n` body bytes, and the connection stays open: the server must still
    /// answer (its body idle timeout, or the app not reading the body).
    Stall(usize),
    /// Only the first `n` body bytes, then the write half is shut: answer or close.
    HalfClose(usize),
    /// Only the first `n` body bytes, then the connection is dropped: nothing to observe.
    Drop(usize),
    /// Only the first `n` bytes of the head, then the write half is shut: answer or close.
    HeadCut(usize),
}

impl Ending {
    fn name(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Extra => "extra bytes",
            Self::Stall(_) => "stall",
            Self::HalfClose(_) => "half-close",
            Self::Drop(_) => "drop",
            Self::HeadCut(_) => "head cut",
        }
    }

    /// Whether the server may end the exchange by closing without an answer.
    fn may_close(self) -> bool {
        matches!(self, Self::HalfClose(_) | Self::Drop(_) | Self::HeadCut(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ping,
    Create,
    Fragment,
    Close,
    Cancel,
    /// No `BITS-Packet-Type` header.
    Missing,
    /// A `BITS-Packet-Type` that names no packet.
    Unknown,
}

const PACKET_TYPES: [(Kind, &str); 5] = [
    (Kind::Ping, "Ping"),
    (Kind::Create, "Create-Session"),
    (Kind::Fragment, "Fragment"),
    (Kind::Close, "Close-Session"),
    (Kind::Cancel, "Cancel-Session"),
];

/// A session the server created, as the workers know it.
#[derive(Debug, Clone)]
struct KnownSession {
    id: String,
    total: u64,
    received: u64,
}

/// One generated request and what the server may answer.
struct Case {
    label: String,
    head: Vec<u8>,
    body: Vec<u8>,
    ending: Ending,
    expect_continue: bool,
    /// The only packet type is Fragment: its Acks report the next expected byte.
    fragment_only: bool,
    /// The file size the `Content-Range` announces, if it names one.
    range_total: Option<u64>,
    head_request: bool,
    route: Route,
    /// The HTTP syntax is broken on purpose: hyper may refuse it with a bare 400/414/431.
    transport_risk: bool,
    /// So large that hyper stops reading before the end: it may reset instead of answering.
    oversize: bool,
    /// The client opens a new connection after this request (the server may close this one).
    last_on_connection: bool,
    /// An answer that is certain: status and `BITS-Error-Code` (if any).
    expected: Option<(u16, Option<&'static str>)>,
    kind: Kind,
    /// The known session this packet names (as created), if any.
    session: Option<String>,
}

/// Header lines (without CRLF) of a request being generated.
struct Lines {
    lines: Vec<Vec<u8>>,
    over_limit: bool,
}

impl Lines {
    fn push(&mut self, rng: &mut Rng, name: &str, value: impl AsRef<[u8]>) {
        let name = match rng.below(20) {
            0..=11 => name.to_owned(),
            12..=14 => name.to_ascii_lowercase(),
            15..=16 => name.to_ascii_uppercase(),
            _ => rng.mixed_case(name),
        };
        let value = value.as_ref();
        self.over_limit |= value.len() > MAX_VALUE;
        let mut line = name.into_bytes();
        line.extend_from_slice(b": ");
        line.extend_from_slice(value);
        self.lines.push(line);
    }
}

fn generate(rng: &mut Rng, sessions: &Mutex<Vec<KnownSession>>) -> Case {
    let mut label = Vec::<String>::new();
    let mut risk = false;
    let mut oversize = false;
    let mut last_on_connection = false;

    // -- method
    let method: Vec<u8> = match rng.below(100) {
        0..=67 => b"BITS_POST".to_vec(),
        68..=73 => rng.mixed_case("bits_post").into_bytes(),
        74..=83 => rng
            .pick(&[
                "GET",
                "POST",
                "PUT",
                "HEAD",
                "OPTIONS",
                "DELETE",
                "PATCH",
                "TRACE",
                "BITS_GET",
                "BITS-POST",
                "BITSPOST",
                "BITS_POST2",
                "_BITS_POST",
                "BITS_POST_",
            ])
            .as_bytes()
            .to_vec(),
        84..=90 => {
            let len = rng.size(1, 24);
            rng.token(len).into_bytes()
        }
        91..=95 => {
            let len = rng.size(100, 3000);
            rng.token(len).into_bytes()
        }
        _ => {
            risk = true;
            rng.pick::<[u8]>(&[
                b"BITS POST",
                b"BITS_POST\x01",
                b"BITS(POST)",
                b"BITS_POST\xC3\xA9",
                b"",
                b"BITS_POST:",
                b"B@TS",
                b"\x7fBITS_POST",
                b"BITS\"POST",
            ])
            .to_vec()
        }
    };
    let head_request = method == b"HEAD";
    label.push(String::from_utf8_lossy(&method[..method.len().min(24)]).into_owned());

    // -- request target
    let target = gen_target(rng, &mut risk, &mut oversize);
    let route = route_of(&method, &target);

    // -- version
    let mut http10 = false;
    let version: &[u8] = match rng.below(1000) {
        0..=969 => b"HTTP/1.1",
        970..=979 => {
            last_on_connection = true;
            http10 = true;
            b"HTTP/1.0"
        }
        _ => {
            risk = true;
            rng.pick::<[u8]>(&[
                b"HTTP/1.2",
                b"HTTP/2.0",
                b"HTTP/0.9",
                b"HTTPS/1.1",
                b"http/1.1",
                b"HTTP/1.1 x",
            ])
        }
    };

    // -- the packet
    let mut lines = Lines {
        lines: Vec::new(),
        over_limit: false,
    };
    let kind = match rng.below(100) {
        0..=9 => Kind::Ping,
        10..=24 => Kind::Create,
        25..=62 => Kind::Fragment,
        63..=71 => Kind::Close,
        72..=79 => Kind::Cancel,
        80..=87 => Kind::Missing,
        _ => Kind::Unknown,
    };
    let mut clear_type = true;
    match kind {
        Kind::Missing => {}
        Kind::Unknown => {
            let value = match rng.below(10) {
                0 => {
                    let len = rng.size(MAX_VALUE - 8, MAX_VALUE + 2000);
                    "A".repeat(len)
                }
                1 => {
                    let len = rng.size(1, 40);
                    let token = rng.token(len);
                    if PACKET_TYPES
                        .iter()
                        .any(|(_, n)| n.eq_ignore_ascii_case(&token))
                    {
                        "Unknown".to_owned()
                    } else {
                        token
                    }
                }
                _ => rng
                    .pick(&[
                        "",
                        "Ack",
                        "Foo",
                        "Create Session",
                        "CreateSession",
                        "Pings",
                        "Fragment2",
                        "Close_Session",
                        "Fragment;x",
                        "Ping, Ping",
                        "Cancel-Sessions",
                        "-",
                    ])
                    .to_owned(),
            };
            label.push(format!("type={:?}", &value[..value.len().min(20)]));
            lines.push(rng, "BITS-Packet-Type", value);
        }
        _ => {
            let name = PACKET_TYPES
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, n)| *n)
                .expect("a packet type");
            let value = match rng.below(10) {
                0..=5 => name.to_owned(),
                6 => name.to_ascii_uppercase(),
                7 => name.to_ascii_lowercase(),
                8 => rng.mixed_case(name),
                _ => format!(" {name}\t"),
            };
            label.push(value.trim().to_owned());
            lines.push(rng, "BITS-Packet-Type", value);
        }
    }
    if rng.chance(40) {
        // Two packet types: which one counts is the server's business, but it must Ack.
        clear_type = false;
        let (_, other) = PACKET_TYPES[rng.index(PACKET_TYPES.len())];
        label.push(format!("+type={other}"));
        let value = rng_case(rng, other);
        lines.push(rng, "BITS-Packet-Type", value);
    }

    // -- session id
    let known = {
        let sessions = sessions.lock().expect("sessions");
        (!sessions.is_empty()).then(|| sessions[rng.index(sessions.len())].clone())
    };
    let wants_session = matches!(kind, Kind::Fragment | Kind::Close | Kind::Cancel);
    let mut session = None;
    if wants_session || rng.chance(80) {
        let (values, name, named) = gen_session_id(rng, known.as_ref());
        label.push(format!("sid={name}"));
        if named {
            session = known.as_ref().map(|k| k.id.clone());
        }
        for value in values {
            lines.push(rng, "BITS-Session-Id", value);
        }
    }

    // -- protocols
    if kind == Kind::Create || rng.chance(50) {
        let (values, name) = gen_protocols(rng);
        label.push(format!("protocols={name}"));
        for value in values {
            lines.push(rng, "BITS-Supported-Protocols", value);
        }
    }

    // -- range and body
    let mut range_total = None;
    let mut body = Vec::new();
    if kind == Kind::Fragment || rng.chance(50) {
        let (total, received) = match (&session, &known) {
            (Some(_), Some(k)) => (k.total, k.received),
            _ => (gen_total(rng), 0),
        };
        let (value, len, name) = gen_range(rng, total, received);
        label.push(format!("range={name}"));
        range_total = value
            .as_deref()
            .and_then(|v| v.rsplit_once('/'))
            .and_then(|(_, t)| t.parse().ok());
        if let Some(value) = value {
            lines.push(rng, "Content-Range", value);
        }
        if kind == Kind::Fragment {
            let len = match len {
                Some(len) if len <= MAX_FRAGMENT + 16 * 1024 => len as usize,
                _ => rng.size(0, 512),
            };
            body = rng.bytes(len);
        }
    }
    if kind != Kind::Fragment && rng.chance(80) {
        let len = rng.size(1, 2000);
        label.push(format!("body on a bodyless packet ({len})"));
        body = rng.bytes(len);
    }

    // -- framing: Content-Length / Transfer-Encoding, and how the bytes end
    let mut definite = true; // the body length is announced and honest
    let mut overlong = false; // the length announces far more than will be sent
    let mut chunked: Option<Vec<u8>> = None; // the body, chunked
    match rng.below(1000) {
        0..=829 => {
            if !body.is_empty() || rng.below(2) == 0 {
                lines.push(rng, "Content-Length", body.len().to_string());
            } else {
                label.push("no length".into());
            }
        }
        830..=879 => {
            label.push("no length".into());
            definite = body.is_empty();
            if !body.is_empty() {
                // Without a length the body is not a body: it is the next request.
                last_on_connection = true;
            }
        }
        880..=899 => {
            label.push("length twice".into());
            lines.push(rng, "Content-Length", body.len().to_string());
            lines.push(rng, "Content-Length", body.len().to_string());
        }
        900..=924 => {
            risk = true;
            let value = rng.pick(&[
                "99999999999999999999999",
                "18446744073709551616",
                "abc",
                "1e3",
                "0x10",
                "-1",
                "+5",
                "",
                "5, 6",
                "1 2",
            ]);
            label.push(format!("length={value:?}"));
            lines.push(rng, "Content-Length", value);
            definite = false;
            last_on_connection = true;
        }
        925..=939 => {
            risk = true;
            label.push("two different lengths".into());
            lines.push(rng, "Content-Length", body.len().to_string());
            lines.push(rng, "Content-Length", (body.len() + 1).to_string());
            definite = false;
            last_on_connection = true;
        }
        940..=969 => {
            // Announces far more than will ever come: a truncated body by definition.
            let value = rng.pick(&["1000000", "1000000000000", "18446744073709551613"]);
            label.push(format!("length={value}"));
            lines.push(rng, "Content-Length", value);
            definite = false;
            overlong = true;
        }
        970..=989 => {
            label.push("chunked".into());
            lines.push(rng, "Transfer-Encoding", "chunked");
            // HTTP/1.0 has no transfer codings: hyper refuses them there.
            risk |= http10;
            if rng.below(4) == 0 {
                risk = true;
                label.push("and a length".into());
                lines.push(rng, "Content-Length", body.len().to_string());
            }
            let mut encoded = encode_chunked(rng, &body);
            if rng.below(5) == 0 {
                label.push("broken chunks".into());
                encoded.splice(0..0, b"zz\r\n".iter().copied());
                last_on_connection = true;
            }
            chunked = Some(encoded);
        }
        _ => {
            risk = true;
            let value = rng.pick(&["gzip", "chunked, gzip", "identity", "chunked;x", "x"]);
            label.push(format!("transfer-encoding={value}"));
            lines.push(rng, "Transfer-Encoding", value);
            definite = false;
            last_on_connection = true;
        }
    }

    // -- other headers
    if rng.chance(950) {
        lines.push(rng, "Host", "127.0.0.1");
    }
    if rng.chance(300) {
        lines.push(rng, "User-Agent", "Microsoft BITS/7.8");
    }
    if rng.chance(100) {
        let len = rng.size(0, 300);
        let value = rng.printable(len);
        lines.push(rng, "Content-Name", value);
    }
    if rng.chance(70) {
        let value = rng.pick(&["gzip", "identity", "gzip, identity", "", "br", "IDENTITY"]);
        label.push(format!("content-encoding={value:?}"));
        lines.push(rng, "Content-Encoding", value);
    }
    if rng.chance(20) {
        label.push("connection: close".into());
        lines.push(rng, "Connection", "close");
        last_on_connection = true;
    }
    if rng.chance(100) {
        for i in 0..rng.between(1, 5) {
            let len = rng.size(0, 200);
            let value = rng.printable(len);
            lines.push(rng, &format!("X-Junk-{i}"), value);
        }
    }
    if rng.chance(20) {
        let len = rng.size(MAX_VALUE - 2, MAX_VALUE + 3000);
        label.push(format!("long header ({len})"));
        lines.push(rng, "X-Long", "v".repeat(len));
    }
    if rng.chance(20) {
        label.push("obs-text value".into());
        lines.push(rng, "X-Obs", b"caf\xe9 \xff");
    }
    if rng.chance(10) {
        risk = true;
        let count = rng.between(101, 140);
        label.push(format!("{count} headers"));
        for i in 0..count {
            lines.push(rng, &format!("X-Many-{i}"), "1");
        }
    }
    if rng.chance(12) {
        risk = true;
        let line = rng.pick::<[u8]>(&[
            b"Bad Name: x",
            b"Bad\x01Name: x",
            b": no-name",
            b"NoColonHere",
            b" folded continuation",
            b"X-Ctl: a\x00b",
            b"X-Ctl: a\x01b",
            b"X-Del: a\x7fb",
            b"X-Cr: a\rb",
        ]);
        label.push(format!("bad header line {}", escape(line)));
        lines.lines.push(line.to_vec());
    }
    if rng.chance(3) {
        risk = true;
        oversize = true;
        label.push("giant header block".into());
        lines.push(rng, "X-Giant", "g".repeat(450 * 1024));
    }

    // -- Expect and the ending
    let mut ending = Ending::Complete;
    let cut = |rng: &mut Rng, len: usize| if len == 0 { 0 } else { rng.index(len) };
    if overlong {
        // Whatever is sent is short of the announced length.
        ending = match rng.below(3) {
            0 => Ending::Stall(body.len()),
            1 => Ending::HalfClose(body.len()),
            _ => Ending::Drop(body.len()),
        };
    } else if let Some(encoded) = chunked {
        if rng.below(10) == 0 {
            ending = Ending::HalfClose(cut(rng, encoded.len()));
        }
        body = encoded;
    } else if definite && !body.is_empty() {
        ending = match rng.below(1000) {
            0..=869 => Ending::Complete,
            870..=899 => Ending::Extra,
            900..=919 => Ending::Stall(cut(rng, body.len())),
            920..=969 => Ending::HalfClose(cut(rng, body.len())),
            _ => Ending::Drop(cut(rng, body.len())),
        };
    }
    let expect = ending != Ending::Extra && rng.chance(50);
    // An impatient client sends the body right away (RFC 9110 allows it); a polite one waits.
    let impatient = expect && rng.below(2) == 0;
    let expect_continue = expect && !impatient;
    if expect {
        label.push(
            if impatient {
                "expect 100-continue, body at once"
            } else {
                "expect 100-continue"
            }
            .into(),
        );
        lines.push(rng, "Expect", "100-continue");
        last_on_connection |= impatient;
    }
    if rng.below(2) == 0 {
        rng.shuffle(&mut lines.lines);
    }

    let mut head = method;
    head.push(b' ');
    head.extend_from_slice(&target);
    head.push(b' ');
    head.extend_from_slice(version);
    head.extend_from_slice(b"\r\n");
    for line in &lines.lines {
        head.extend_from_slice(line);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    if ending == Ending::Extra {
        let garbage = rng.size(1, 60);
        let garbage = rng.printable(garbage);
        body.extend_from_slice(garbage.as_bytes());
    }
    if rng.chance(10) {
        ending = Ending::HeadCut(rng.size(1, head.len() - 1));
    }
    if ending != Ending::Complete {
        last_on_connection = true;
    }
    label.push(format!("end={}", ending.name()));

    // Certain answers: a BITS_POST under the prefix that hyper accepts, whose packet type is
    // missing or unknown, is refused as malformed; a clean Ping is accepted.
    let certain = route == Route::Bits
        && !risk
        && clear_type
        && matches!(ending, Ending::Complete | Ending::Stall(_));
    let expected = match kind {
        Kind::Missing | Kind::Unknown if certain => Some((400, Some("0x80070057"))),
        Kind::Ping if certain && body.is_empty() && !overlong && !lines.over_limit => {
            Some((200, None))
        }
        _ => None,
    };

    Case {
        label: label.join(" "),
        head,
        body,
        ending,
        expect_continue,
        fragment_only: kind == Kind::Fragment && clear_type,
        range_total,
        head_request,
        route,
        transport_risk: risk,
        oversize,
        last_on_connection,
        expected,
        kind,
        session,
    }
}

fn rng_case(rng: &mut Rng, s: &str) -> String {
    if rng.below(2) == 0 {
        s.to_owned()
    } else {
        rng.mixed_case(s)
    }
}

fn gen_target(rng: &mut Rng, risk: &mut bool, oversize: &mut bool) -> Vec<u8> {
    let roll = rng.below(1000);
    if roll < 3 {
        *risk = true;
        *oversize = true;
        return format!("{PREFIX}/{}", "a".repeat(70_000)).into_bytes();
    }
    if roll < 45 {
        // Bytes a request target may not hold: hyper refuses them or passes them on verbatim.
        *risk = true;
        let target = rng.pick::<[u8]>(&[
            b"/up/x y",
            b"/up/\xc3\xa9t\xc3\xa9",
            b"/up/x\"q",
            b"/up/x{y}|z",
            b"/up/a\\b",
            b"/up/x\x01",
            b"/up/x\x7f",
            b"*",
            b"",
            b"up/x.bin",
            b"/\x00",
            b"/hello world",
        ]);
        return target.to_vec();
    }
    if roll < 200 {
        let target = rng.pick(&[
            "/",
            "/hello",
            "/upload",
            "/upload/x.bin",
            "/UP/x.bin",
            "/Up",
            "/%75p/x.bin",
            "/%2Fup/x.bin",
            "/u",
            "/other/x.bin",
            "/up.txt",
            "/upx/y",
            "//up/x.bin",
            "/hello?x=1",
            "http://127.0.0.1/hello",
            "http://127.0.0.1",
            "/.%2e/up/x.bin",
            "/%00",
        ]);
        return target.as_bytes().to_vec();
    }
    let name = match rng.below(40) {
        0..=11 => format!("f{}.bin", rng.below(40)),
        12..=13 => format!("d{}/f.bin", rng.below(5)),
        14 => "n".repeat(rng.size(250, 400)),
        15 => "a/".repeat(rng.size(1000, 4000)) + "z",
        _ => rng
            .pick(&[
                "..",
                "../x",
                "../../etc/passwd",
                "%2e%2e",
                "%2e%2e/x",
                "%2E%2E%2Fhello",
                ".",
                "x%00y",
                "%00",
                "a%2fb",
                "%5c..%5cx",
                "CON",
                "nul.txt",
                "trailing.",
                "trailing%20",
                ".bits/parts/x.part",
                "%2ebits/x",
                "",
                "x.bin?query=1&y=%00",
                "%C3%A9t%C3%A9.txt",
                "%FF%FE.bin",
                "%zz",
                "x%",
                ";x=1",
                "x#frag",
            ])
            .to_owned(),
    };
    let target = match rng.below(20) {
        0 => format!("{PREFIX}?q={name}"),
        1 => PREFIX.to_owned(),
        2 => format!("{PREFIX}//{name}"),
        3 => format!("http://127.0.0.1{PREFIX}/{name}"),
        4 => format!("http://example.com:81{PREFIX}/{name}"),
        _ => format!("{PREFIX}/{name}"),
    };
    target.into_bytes()
}

/// Where a request must go, from the raw method and target, as the layer decides: the exact
/// method and the undecoded path at or under the prefix.
fn route_of(method: &[u8], target: &[u8]) -> Route {
    if method != b"BITS_POST" {
        return Route::App;
    }
    if target.contains(&b'#') {
        return Route::Either;
    }
    let mut path = target;
    for scheme in [&b"http://"[..], b"https://"] {
        if let Some(rest) = target.strip_prefix(scheme) {
            path = rest
                .iter()
                .position(|&b| b == b'/' || b == b'?')
                .map_or(&b""[..], |i| &rest[i..]);
        }
    }
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    if path == PREFIX.as_bytes() || path.starts_with(format!("{PREFIX}/").as_bytes()) {
        Route::Bits
    } else {
        Route::App
    }
}

/// Values for `BITS-Session-Id` (none: no header), a name for the label, and whether the
/// value names the known session.
fn gen_session_id(
    rng: &mut Rng,
    known: Option<&KnownSession>,
) -> (Vec<Vec<u8>>, &'static str, bool) {
    let roll = rng.below(100);
    if let Some(known) = known.filter(|_| roll < 50) {
        let id = &known.id;
        let bare = &id[1..id.len() - 1];
        let (value, name) = match rng.below(10) {
            0..=5 => (id.clone(), "known"),
            6 => (id.to_ascii_lowercase(), "known lower-case"),
            7 => (bare.to_owned(), "known without braces"),
            8 => (format!("  {id} "), "known padded"),
            _ => (format!("{{{id}}}"), "known double braces"),
        };
        // Double braces do not name the session.
        return (vec![value.into_bytes()], name, !name.ends_with("braces"));
    }
    let (values, name): (Vec<Vec<u8>>, &str) = match roll {
        0..=64 => (vec![rng.guid().into_bytes()], "unknown"),
        65..=69 => (
            vec![rng.guid().to_ascii_lowercase().into_bytes()],
            "unknown lower-case",
        ),
        70..=79 => {
            let garbage = rng.pick(&[
                "{not-a-guid}",
                "12345",
                "{7df0354d-249b-430f-820d-3d2a9bef4931",
                "../../etc/passwd",
                "%00",
                "{00000000-0000-0000-0000-000000000000}",
                "{ZZZZZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZZZZZZZZZ}",
                "{}",
                "null",
            ]);
            (vec![garbage.as_bytes().to_vec()], "garbage")
        }
        80..=84 => (vec![Vec::new()], "empty"),
        85..=89 => {
            let len = rng.size(MAX_VALUE - 4, MAX_VALUE + 3000);
            (vec![rng.token(len).into_bytes()], "huge")
        }
        90..=92 => (vec![b"{caf\xe9}".to_vec()], "obs-text"),
        93..=96 => (
            vec![rng.guid().into_bytes(), rng.guid().into_bytes()],
            "twice",
        ),
        _ => (Vec::new(), "absent"),
    };
    (values, name, false)
}

fn gen_protocols(rng: &mut Rng) -> (Vec<String>, &'static str) {
    let other = "{00000000-0000-0000-0000-000000000000}";
    match rng.below(20) {
        0..=8 => (vec![PROTOCOL.to_owned()], "ok"),
        9 => (vec![PROTOCOL.to_ascii_uppercase()], "upper-case"),
        10 => (
            vec![PROTOCOL[1..PROTOCOL.len() - 1].to_owned()],
            "no braces",
        ),
        11 => (vec![format!("{other} {PROTOCOL}")], "list"),
        12 => (vec![format!("{other},{PROTOCOL}")], "comma list"),
        13 => (vec![other.to_owned()], "unknown"),
        14 => (vec![String::new()], "empty"),
        15 => {
            let len = rng.size(MAX_VALUE - 4, MAX_VALUE + 3000);
            (vec![rng.printable(len)], "huge")
        }
        16 => {
            let mut list: Vec<String> = (0..rng.between(100, 150)).map(|_| rng.guid()).collect();
            list.push(PROTOCOL.to_owned());
            (vec![list.join(" ")], "many")
        }
        17 => (vec![other.to_owned(), PROTOCOL.to_owned()], "twice"),
        18 => (vec![format!("{PROTOCOL}x")], "almost"),
        _ => (Vec::new(), "absent"),
    }
}

fn gen_total(rng: &mut Rng) -> u64 {
    match rng.below(10) {
        0..=3 => rng.between(1, 4096),
        4..=7 => rng.between(4097, 200_000),
        8 => MAX_UPLOAD,
        _ => rng.between(MAX_UPLOAD + 1, MAX_UPLOAD * 1000),
    }
}

/// A `Content-Range` value (none: no header), the body length it announces if it has a usable
/// shape, and a name for the label.
fn gen_range(
    rng: &mut Rng,
    total: u64,
    received: u64,
) -> (Option<String>, Option<u64>, &'static str) {
    let span = |first: u64, len: u64| (first, first + len - 1);
    // An empty file's session takes no more bytes; aim at a 1-byte file instead.
    let total = total.max(1);
    match rng.below(100) {
        0..=54 => {
            let first = match rng.below(10) {
                0..=5 => received,
                6 => received.saturating_sub(rng.between(1, 500)),
                7 => received + rng.between(1, 500),
                8 => 0,
                _ => rng.below(total),
            }
            .min(total - 1);
            let room = total - first;
            let len = match rng.below(10) {
                0..=7 => rng.between(1, room.min(4096)),
                8 => MAX_FRAGMENT + rng.between(1, 8000),
                _ => room.min(8192),
            };
            let (first, last) = span(first, len);
            let total = total.max(last + 1);
            (
                Some(format!("bytes {first}-{last}/{total}")),
                Some(len),
                "valid",
            )
        }
        55..=59 => {
            let (a, b) = (rng.between(1, 1000), rng.between(0, 999));
            let (last, first) = (a.min(b), a.max(b) + 1);
            (
                Some(format!("bytes {first}-{last}/{total}")),
                None,
                "inverted",
            )
        }
        60..=63 => {
            let value = rng.pick(&[
                "bytes 0-18446744073709551615/18446744073709551615",
                "bytes 0-9/18446744073709551616",
                "bytes 18446744073709551615-18446744073709551615/18446744073709551615",
                "bytes 0-99999999999999999999999/99999999999999999999999",
                "bytes 18446744073709551614-18446744073709551614/18446744073709551615",
            ]);
            (Some(value.to_owned()), Some(1), "overflow")
        }
        64..=66 => {
            let value = rng.pick(&[
                "bytes -1-5/10",
                "bytes 0--5/10",
                "bytes -5/10",
                "bytes 0-9/-10",
            ]);
            (Some(value.to_owned()), None, "negative")
        }
        67..=70 => {
            let len = rng.between(1, 100);
            let value = match rng.below(6) {
                0 => format!("0-{}/{total}", len - 1),
                1 => format!("bytes0-{}/{total}", len - 1),
                2 => format!("items 0-{}/{total}", len - 1),
                3 => format!("bytes=0-{}/{total}", len - 1),
                4 => format!("Bytes 0-{}/{total}", len - 1),
                _ => format!("BYTES  0-{}/{total}", len - 1),
            };
            (Some(value), Some(len), "unit")
        }
        71..=73 => {
            let value = rng.pick(&["bytes */10", "bytes 0-9/*", "bytes */*", "*", "bytes *"]);
            (Some(value.to_owned()), Some(10), "star")
        }
        74 => (Some("bytes */0".to_owned()), Some(0), "empty file"),
        75..=79 => {
            let len = rng.between(1, 100).min(total);
            let first = received.min(total - len);
            let (first, last) = span(first, len);
            let other = total.saturating_add(rng.between(1, 1000));
            (
                Some(format!("bytes {first}-{last}/{other}")),
                Some(len),
                "total mismatch",
            )
        }
        80..=84 => {
            let big = rng.between(MAX_UPLOAD + 1, u64::MAX / 2);
            let len = rng.between(1, 100);
            (
                Some(format!("bytes 0-{}/{big}", len - 1)),
                Some(len),
                "over max size",
            )
        }
        85..=87 => {
            let len = rng.between(1, 100);
            (
                Some(format!("bytes 0-{len}/{len}")),
                Some(len + 1),
                "last = total",
            )
        }
        88..=89 => (Some(String::new()), None, "empty"),
        90..=91 => {
            let len = rng.size(0, 80);
            (Some(rng.printable(len)), None, "garbage")
        }
        92 => {
            let len = rng.size(MAX_VALUE - 4, MAX_VALUE + 3000);
            (
                Some(format!("bytes 0-0/1{}", "0".repeat(len))),
                Some(1),
                "huge",
            )
        }
        93..=94 => (
            Some(" bytes 0-9/10 , bytes 0-9/10".into()),
            Some(10),
            "list",
        ),
        _ => (None, None, "absent"),
    }
}

fn encode_chunked(rng: &mut Rng, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let n = rng.size(1, rest.len().min(3000));
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

// ---------------------------------------------------------------------------------------------
// a raw HTTP/1.1 client

#[derive(Debug)]
struct WireResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    close_delimited: bool,
}

impl WireResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn headers_named(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }

    fn summary(&self) -> String {
        let mut out = format!("{}", self.status);
        for (n, v) in &self.headers {
            let _ = write!(out, "\n    {n}: {v}");
        }
        if !self.body.is_empty() {
            let _ = write!(out, "\n    body: {}", escape(&self.body));
        }
        out
    }
}

/// How reading an answer ended without one.
#[derive(Debug)]
enum NoAnswer {
    /// EOF or a connection error; `partial` if some response bytes had arrived.
    Closed { partial: bool, why: String },
    /// Bytes that are not an HTTP/1.1 response.
    Malformed(String),
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Whether the server may close this kept-alive connection before the next request
    /// without having said so: the app answered the last request without reading its body,
    /// and hyper does not always drain an unread body.
    may_close: bool,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::new(),
            may_close: false,
        })
    }

    async fn fill(&mut self) -> Result<(), NoAnswer> {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk).await {
            Ok(0) => Err(NoAnswer::Closed {
                partial: !self.buf.is_empty(),
                why: "EOF".into(),
            }),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(NoAnswer::Closed {
                partial: !self.buf.is_empty(),
                why: e.to_string(),
            }),
        }
    }

    /// Reads one response, interim (1xx) ones included.
    async fn read_one(&mut self, head_request: bool) -> Result<WireResponse, NoAnswer> {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if self.buf.len() > 1 << 20 {
                return Err(NoAnswer::Malformed("response head over 1 MiB".into()));
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = parse_status_line(status_line)
            .ok_or_else(|| NoAnswer::Malformed(format!("status line {status_line:?}")))?;
        let mut headers = Vec::new();
        for line in lines {
            let (name, value) = line
                .split_once(':')
                .filter(|(n, _)| !n.is_empty() && !n.contains([' ', '\t']))
                .ok_or_else(|| NoAnswer::Malformed(format!("header line {line:?}")))?;
            headers.push((name.to_owned(), value.trim().to_owned()));
        }
        let mut response = WireResponse {
            status,
            headers,
            body: Vec::new(),
            close_delimited: false,
        };
        if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
            return Ok(response);
        }
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            response.body = self.read_chunked().await?;
        } else if let Some(len) = response.header("content-length") {
            if response.headers_named("content-length") > 1 {
                return Err(NoAnswer::Malformed("Content-Length twice".into()));
            }
            let len: usize = len
                .parse()
                .map_err(|_| NoAnswer::Malformed(format!("Content-Length {len:?}")))?;
            while self.buf.len() < len {
                self.fill().await?;
            }
            response.body = self.buf.drain(..len).collect();
        } else {
            // Close-delimited.
            response.close_delimited = true;
            while self.fill().await.is_ok() {}
            response.body = std::mem::take(&mut self.buf);
        }
        Ok(response)
    }

    async fn read_chunked(&mut self) -> Result<Vec<u8>, NoAnswer> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                self.fill().await?;
            };
            let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            self.buf.drain(..line_end + 2);
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| NoAnswer::Malformed(format!("chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, then an empty line.
                loop {
                    let end = loop {
                        if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                            break i;
                        }
                        self.fill().await?;
                    };
                    self.buf.drain(..end + 2);
                    if end == 0 {
                        return Ok(body);
                    }
                }
            }
            while self.buf.len() < size + 2 {
                self.fill().await?;
            }
            body.extend(self.buf.drain(..size));
            if self.buf.drain(..2).as_slice() != b"\r\n" {
                return Err(NoAnswer::Malformed("chunk not followed by CRLF".into()));
            }
        }
    }

    /// Reads the final response, skipping interim ones; `Ok(true, _)` if a 100 was among them.
    async fn read_final(&mut self, head_request: bool) -> Result<(bool, WireResponse), NoAnswer> {
        let mut continued = false;
        loop {
            let response = self.read_one(head_request).await?;
            if (100..200).contains(&response.status) && response.status != 101 {
                continued |= response.status == 100;
                continue;
            }
            return Ok((continued, response));
        }
    }
}

fn parse_status_line(line: &str) -> Option<u16> {
    let rest = line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))?;
    let code = rest.get(..3)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) || !(rest.len() == 3 || rest[3..].starts_with(' '))
    {
        return None;
    }
    code.parse().ok().filter(|c| (100..600).contains(c))
}

/// What became of one request.
enum Outcome {
    Answered {
        response: WireResponse,
        continued: bool,
    },
    NoAnswer(NoAnswer),
    /// The connection was dropped on purpose.
    Dropped,
}

async fn exchange(conn: &mut Conn, case: &Case) -> Outcome {
    if let Ending::HeadCut(n) = case.ending {
        let _ = conn.stream.write_all(&case.head[..n]).await;
        let _ = conn.stream.shutdown().await;
        return answer(conn, case).await;
    }
    let body_part = match case.ending {
        Ending::Complete | Ending::Extra => &case.body[..],
        Ending::Stall(n) | Ending::HalfClose(n) | Ending::Drop(n) => &case.body[..n],
        Ending::HeadCut(_) => unreachable!("handled above"),
    };
    let mut continued = false;
    if case.expect_continue {
        // A well-behaved client: the head, then the body only after "100 Continue".
        if let Err(e) = conn.stream.write_all(&case.head).await {
            return written_badly(conn, case, e).await;
        }
        match conn.read_one(case.head_request).await {
            Ok(r) if r.status == 100 => continued = true,
            Ok(response) => {
                return Outcome::Answered {
                    response,
                    continued,
                };
            }
            Err(e) => return Outcome::NoAnswer(e),
        }
        if let Err(e) = conn.stream.write_all(body_part).await {
            return written_badly(conn, case, e).await;
        }
    } else {
        // One write, so that a refused request sits in the server's buffer, not the kernel's.
        let mut bytes = case.head.clone();
        bytes.extend_from_slice(body_part);
        if let Err(e) = conn.stream.write_all(&bytes).await {
            return written_badly(conn, case, e).await;
        }
    }
    match case.ending {
        Ending::Drop(_) => return Outcome::Dropped,
        Ending::HalfClose(_) => {
            let _ = conn.stream.shutdown().await;
        }
        _ => {}
    }
    match answer(conn, case).await {
        Outcome::Answered {
            response,
            continued: c,
        } => Outcome::Answered {
            response,
            continued: continued || c,
        },
        other => other,
    }
}

async fn answer(conn: &mut Conn, case: &Case) -> Outcome {
    match conn.read_final(case.head_request).await {
        Ok((continued, response)) => Outcome::Answered {
            response,
            continued,
        },
        Err(e) => Outcome::NoAnswer(e),
    }
}

/// A write failed: the server closed early. It may still have answered.
async fn written_badly(conn: &mut Conn, case: &Case, error: std::io::Error) -> Outcome {
    match answer(conn, case).await {
        Outcome::NoAnswer(NoAnswer::Closed { partial, why }) => {
            Outcome::NoAnswer(NoAnswer::Closed {
                partial,
                why: format!("write failed ({error}), then {why}"),
            })
        }
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// judging answers

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Ack,
    PassThrough,
    Transport,
}

fn is_hex_code(code: &str, digits: std::ops::RangeInclusive<usize>) -> bool {
    code.strip_prefix("0x")
        .is_some_and(|h| digits.contains(&h.len()) && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Which kind of answer this is, or why it is none of the allowed kinds.
fn classify(r: &WireResponse) -> Result<Class, String> {
    let app = r.header(APP_MARKER);
    let ack = r.header("BITS-Packet-Type");
    if app.is_some() {
        if app != Some("1") || ack.is_some() {
            return Err("an app response with BITS headers or a bad marker".into());
        }
        if r.status >= 500 {
            return Err("a 5xx from the app without BITS headers".into());
        }
        return Ok(Class::PassThrough);
    }
    let Some(ack) = ack else {
        if r.headers
            .iter()
            .any(|(n, _)| n.to_ascii_lowercase().starts_with("bits-"))
        {
            return Err("BITS headers without BITS-Packet-Type".into());
        }
        // hyper's automatic answers to requests it cannot parse (proto/h1/role.rs on_error).
        return if matches!(r.status, 400 | 414 | 431) && r.body.is_empty() {
            Ok(Class::Transport)
        } else {
            Err(format!(
                "status {} is neither an Ack, nor the app's, nor a transport rejection",
                r.status
            ))
        };
    };
    if !ack.eq_ignore_ascii_case("Ack") || r.headers_named("BITS-Packet-Type") != 1 {
        return Err(format!(
            "BITS-Packet-Type {ack:?} (once) expected to be Ack"
        ));
    }
    if r.header("content-length") != Some("0") || !r.body.is_empty() || r.close_delimited {
        return Err("an Ack without Content-Length: 0 or with a body".into());
    }
    for name in [
        "BITS-Error-Code",
        "BITS-Error",
        "BITS-Error-Context",
        "BITS-Session-Id",
        "BITS-Protocol",
        "BITS-Received-Content-Range",
    ] {
        if r.headers_named(name) > 1 {
            return Err(format!("{name} more than once"));
        }
    }
    if let Some(protocol) = r.header("BITS-Protocol") {
        if r.status != 200 || protocol != PROTOCOL {
            return Err(format!("BITS-Protocol {protocol:?} on a {} Ack", r.status));
        }
    }
    if let Some(received) = r.header("BITS-Received-Content-Range") {
        if received.parse::<u64>().is_err() {
            return Err(format!("BITS-Received-Content-Range {received:?}"));
        }
    }
    let code = r.header("BITS-Error-Code");
    let context = r.header("BITS-Error-Context");
    if r.header("BITS-Error")
        .is_some_and(|alias| Some(alias) != code)
    {
        return Err("BITS-Error differs from BITS-Error-Code".into());
    }
    if code.is_some() != context.is_some() {
        return Err("BITS-Error-Code and BITS-Error-Context not paired".into());
    }
    if let Some(context) = context {
        if context != "0x5" && context != "0x7" {
            return Err(format!("BITS-Error-Context {context:?}"));
        }
    }
    match (r.status, code) {
        (200, None) => Ok(Class::Ack),
        (200, Some(_)) => Err("error headers on a 200 Ack".into()),
        // Plain 413 asks the client to shrink its fragments; 416 carries HRESULT 0 ("0x0").
        (413, None) => Ok(Class::Ack),
        (416, None) => Ok(Class::Ack),
        (416, Some(code)) if is_hex_code(code, 1..=8) => Ok(Class::Ack),
        (_, Some(code)) if is_hex_code(code, 8..=8) => Ok(Class::Ack),
        (_, Some(code)) => Err(format!("BITS-Error-Code {code:?} is not 0x + 8 hex digits")),
        (_, None) => Err("an error Ack without BITS-Error-Code".into()),
    }
}

/// Checks an answer against what the request allows; `Err` describes the violation.
fn judge(case: &Case, r: &WireResponse) -> Result<Class, String> {
    let class = classify(r)?;
    let route = if matches!(case.ending, Ending::HeadCut(_)) {
        Route::Either
    } else {
        case.route
    };
    match (class, route) {
        (Class::Ack, Route::App) => {
            return Err("an Ack for a request that is not the layer's".into());
        }
        (Class::PassThrough, Route::Bits) => {
            return Err("a BITS_POST under the prefix reached the app".into());
        }
        (Class::Transport, _)
            if !case.transport_risk && !matches!(case.ending, Ending::HeadCut(_)) =>
        {
            return Err("a transport rejection of a request hyper should parse".into());
        }
        _ => {}
    }
    let reports_offset = r.status == 416 || (case.fragment_only && matches!(r.status, 200 | 413));
    if class == Class::Ack && reports_offset && r.header("BITS-Received-Content-Range").is_none() {
        return Err("a Fragment Ack without BITS-Received-Content-Range".into());
    }
    if let Some((status, code)) = case.expected {
        let got = (r.status, r.header("BITS-Error-Code"));
        if got != (status, code) {
            return Err(format!(
                "expected {status} {code:?}, got {} {:?}",
                got.0, got.1
            ));
        }
    }
    Ok(class)
}

// ---------------------------------------------------------------------------------------------
// the storm

#[derive(Default)]
struct Stats {
    exchanges: usize,
    acks: BTreeMap<String, usize>,
    pass_through: BTreeMap<u16, usize>,
    transport: BTreeMap<u16, usize>,
    closes: BTreeMap<String, usize>,
    endings: BTreeMap<&'static str, usize>,
    continues: usize,
    expectations_checked: usize,
    stale_retries: usize,
    connections: usize,
}

struct Shared {
    addr: SocketAddr,
    seed: u64,
    sessions: Mutex<Vec<KnownSession>>,
    cancelled: Mutex<Vec<String>>,
    stats: Mutex<Stats>,
    failures: Mutex<Vec<String>>,
    failure_count: AtomicUsize,
}

impl Shared {
    fn fail(
        &self,
        worker: usize,
        index: usize,
        case: &Case,
        why: &str,
        response: Option<&WireResponse>,
    ) {
        self.failure_count.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.failures.lock().expect("failures");
        if failures.len() >= REPORTED_FAILURES {
            return;
        }
        let mut report = format!(
            "worker {worker} packet {index} (seed {:#x}): {why}",
            self.seed
        );
        let _ = write!(report, "\n  case: {}", case.label);
        let _ = write!(
            report,
            "\n  route {:?}, transport risk {}, ending {:?}, waits for 100-continue {}",
            case.route, case.transport_risk, case.ending, case.expect_continue
        );
        let _ = write!(report, "\n  request head: {}", escape(&case.head));
        let _ = write!(
            report,
            "\n  request body ({} bytes): {}",
            case.body.len(),
            escape(&case.body)
        );
        if let Some(r) = response {
            let _ = write!(report, "\n  response: {}", r.summary());
        }
        failures.push(report);
    }

    fn count(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.stats.lock().expect("stats"));
    }

    fn close(&self, how: &str) {
        self.count(|s| *s.closes.entry(how.to_owned()).or_default() += 1);
    }

    fn tally(&self, case: &Case, r: &WireResponse, class: Class, continued: bool) {
        self.count(|s| {
            s.continues += usize::from(continued);
            s.expectations_checked += usize::from(case.expected.is_some());
            match class {
                Class::Ack => {
                    let key = match r.header("BITS-Error-Code") {
                        Some(code) => format!("{} {code}", r.status),
                        None => r.status.to_string(),
                    };
                    *s.acks.entry(key).or_default() += 1;
                }
                Class::PassThrough => *s.pass_through.entry(r.status).or_default() += 1,
                Class::Transport => *s.transport.entry(r.status).or_default() += 1,
            }
        });
    }

    /// Learns from an Ack: new sessions, offsets, cancellations.
    fn learn(&self, case: &Case, r: &WireResponse, rng: &mut Rng) {
        if r.status != 200 && r.status != 416 {
            return;
        }
        let header_sid = r.header("BITS-Session-Id");
        match case.kind {
            Kind::Create if r.status == 200 && r.header("BITS-Protocol").is_some() => {
                if let Some(id) = header_sid {
                    let total = gen_total(rng);
                    let mut sessions = self.sessions.lock().expect("sessions");
                    sessions.push(KnownSession {
                        id: id.to_owned(),
                        total: total.min(MAX_UPLOAD),
                        received: 0,
                    });
                    if sessions.len() > 64 {
                        sessions.remove(0);
                    }
                }
            }
            Kind::Fragment => {
                let (Some(sid), Some(received)) = (
                    &case.session,
                    r.header("BITS-Received-Content-Range")
                        .and_then(|v| v.parse().ok()),
                ) else {
                    return;
                };
                let mut sessions = self.sessions.lock().expect("sessions");
                if let Some(s) = sessions.iter_mut().find(|s| &s.id == sid) {
                    s.received = received;
                    // A fragment the server took names the session's total (unless the
                    // session is finished: then any fragment is a duplicate).
                    let took = r.status == 200 && case.fragment_only;
                    if let Some(total) = case.range_total.filter(|&t| took && t <= MAX_UPLOAD) {
                        s.total = total;
                    }
                }
            }
            Kind::Cancel if r.status == 200 => {
                if let Some(id) = header_sid.and_then(normalized_guid) {
                    self.cancelled.lock().expect("cancelled").push(id);
                }
            }
            _ => {}
        }
    }
}

fn total<K>(counts: &BTreeMap<K, usize>) -> usize {
    counts.values().sum()
}

/// A session id as the server names its part files: braced, upper-case.
fn normalized_guid(id: &str) -> Option<String> {
    let id = id.trim();
    let bare = id
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or(id);
    (bare.len() == 36 && bare.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
        .then(|| format!("{{{}}}", bare.to_ascii_uppercase()))
}

async fn worker(shared: Arc<Shared>, worker: usize, packets: usize) {
    let mut rng = Rng(shared.seed ^ (worker as u64).wrapping_mul(0xA076_1D64_78BD_642F));
    let mut conn: Option<Conn> = None;
    for index in 0..packets {
        let case = generate(&mut rng, &shared.sessions);
        shared.count(|s| *s.endings.entry(case.ending.name()).or_default() += 1);
        let fail = |why: &str, response: Option<&WireResponse>| {
            shared.fail(worker, index, &case, why, response);
        };
        for attempt in 1..=2 {
            let mut c = match conn.take() {
                Some(c) => c,
                None => match Conn::connect(shared.addr).await {
                    Ok(c) => {
                        shared.count(|s| s.connections += 1);
                        c
                    }
                    Err(e) => {
                        fail(&format!("cannot connect: {e}"), None);
                        break;
                    }
                },
            };
            let may_close = c.may_close;
            let Ok(outcome) = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(&mut c, &case)).await
            else {
                fail(
                    &format!("no answer and no close within {EXCHANGE_TIMEOUT:?} (hang)"),
                    None,
                );
                break;
            };
            shared.count(|s| s.exchanges += 1);
            match outcome {
                Outcome::Dropped => shared.close("dropped by the client"),
                Outcome::NoAnswer(NoAnswer::Malformed(why)) => {
                    fail(&format!("malformed response: {why}"), None);
                }
                Outcome::NoAnswer(NoAnswer::Closed { partial: true, why }) => {
                    fail(&format!("response cut short: {why}"), None);
                }
                Outcome::NoAnswer(NoAnswer::Closed { why, .. }) => {
                    if case.oversize {
                        shared.close("oversize request closed without an answer");
                    } else if case.ending.may_close() {
                        shared.close(&format!("{} closed without an answer", case.ending.name()));
                    } else if may_close && attempt == 1 {
                        // The server ended the kept-alive connection as the request went out.
                        shared.count(|s| s.stale_retries += 1);
                        continue;
                    } else {
                        fail(&format!("closed without an answer: {why}"), None);
                    }
                }
                Outcome::Answered {
                    response,
                    continued,
                } => match judge(&case, &response) {
                    Ok(class) => {
                        shared.tally(&case, &response, class, continued);
                        if class == Class::Ack {
                            shared.learn(&case, &response, &mut rng);
                        }
                        if reusable(&case, &response, class, continued) {
                            c.may_close = class == Class::PassThrough && !case.body.is_empty();
                            conn = Some(c);
                        }
                    }
                    Err(why) => fail(&why, Some(&response)),
                },
            }
            break;
        }
    }
}

/// Whether the connection can carry the next request: the exchange ended cleanly and neither
/// side asked to close.
fn reusable(case: &Case, response: &WireResponse, class: Class, continued: bool) -> bool {
    let body_withheld = case.expect_continue && !continued && !case.body.is_empty();
    let close = response
        .header("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
    !(case.last_on_connection
        || class == Class::Transport
        || response.close_delimited
        || body_withheld
        || close)
}

/// `bytes` for a failure report: printable ASCII kept, CRLF and the rest escaped, long runs of
/// one byte shortened, the whole capped.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        if out.len() > 3000 {
            let _ = write!(out, "…({} more bytes)", bytes.len() - i);
            break;
        }
        let b = bytes[i];
        let run = bytes[i..].iter().take_while(|&&x| x == b).count();
        if run > 16 {
            let _ = write!(out, "<{} × {}>", escape(&[b]), run);
            i += run;
            continue;
        }
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
        i += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// the server

async fn mark_app(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(APP_MARKER, HeaderValue::from_static("1"));
    response
}

struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    shutdown: tokio::sync::oneshot::Sender<()>,
}

async fn start_server(root: &Path) -> Server {
    let layer = BitsLayer::builder(root)
        .prefix(PREFIX)
        .max_fragment_size(MAX_FRAGMENT)
        .max_upload_size(MAX_UPLOAD)
        .body_idle_timeout(BODY_IDLE)
        .max_sessions(1_000_000)
        .build()
        .expect("layer");
    let app = Router::new()
        .route("/", get(|| async { "app root" }))
        .route(
            "/hello",
            get(|| async { "hello from the app" }).post(|| async { "posted" }),
        )
        .route(
            "/up/app-page",
            get(|| async { "an app page under the prefix" }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "app fallback") })
        .layer(axum::middleware::map_response(mark_app))
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (shutdown, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
    });
    Server {
        addr,
        task,
        shutdown,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packet_storm() {
    let started = Instant::now();
    let seed = env_number("MALFORMED_SEED", DEFAULT_SEED);
    let packets = env_number("MALFORMED_PACKETS", DEFAULT_PACKETS as u64) as usize;
    let workers = env_number("MALFORMED_WORKERS", DEFAULT_WORKERS as u64).max(1) as usize;
    println!(
        "malformed: seed {seed:#x} (MALFORMED_SEED), {packets} packets (MALFORMED_PACKETS), \
         {workers} workers (MALFORMED_WORKERS)"
    );
    // Panics in the server's connection tasks are caught by tokio; count them.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous_hook(info);
    }));

    // The upload root sits three folders deep, so that an escape from it shows.
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = &tmp.path().join("a/b/root");
    std::fs::create_dir_all(root).expect("upload root");
    let server = start_server(root).await;
    let client = BitsClient::new(server.addr);
    let shared = Arc::new(Shared {
        addr: server.addr,
        seed,
        sessions: Mutex::new(Vec::new()),
        cancelled: Mutex::new(Vec::new()),
        stats: Mutex::new(Stats::default()),
        failures: Mutex::new(Vec::new()),
        failure_count: AtomicUsize::new(0),
    });
    // Sessions for the packets to name (more are learned from Create-Session Acks).
    let mut rng = Rng(seed);
    for i in 0..8 {
        let id = client.create_ok(&format!("{PREFIX}/seed-{i}.bin")).await;
        let total = gen_total(&mut rng).min(MAX_UPLOAD);
        let session = KnownSession {
            id,
            total,
            received: 0,
        };
        shared.sessions.lock().expect("sessions").push(session);
    }

    let per_worker = packets.div_ceil(workers);
    let tasks: Vec<_> = (0..workers)
        .map(|w| tokio::spawn(worker(shared.clone(), w, per_worker)))
        .collect();
    for task in tasks {
        task.await.expect("worker task");
    }
    let storm = started.elapsed();

    let stats = std::mem::take(&mut *shared.stats.lock().expect("stats"));
    let cancelled = shared.cancelled.lock().expect("cancelled").clone();
    println!(
        "malformed: {} exchanges on {} connections in {storm:.2?} ({} stale keep-alive retries)",
        stats.exchanges, stats.connections, stats.stale_retries
    );
    println!("  Acks ({}):", total(&stats.acks));
    for (key, n) in &stats.acks {
        println!("    {key:<16} {n}");
    }
    println!(
        "  pass-throughs ({}): {:?}",
        total(&stats.pass_through),
        stats.pass_through
    );
    println!(
        "  transport rejections ({}): {:?}",
        total(&stats.transport),
        stats.transport
    );
    println!("  closes ({}): {:?}", total(&stats.closes), stats.closes);
    println!("  endings: {:?}", stats.endings);
    println!(
        "  100-continue seen {}, exact answers checked {}, sessions cancelled {}",
        stats.continues,
        stats.expectations_checked,
        cancelled.len()
    );

    let failures = shared.failures.lock().expect("failures").clone();
    let failure_count = shared.failure_count.load(Ordering::SeqCst);
    assert!(
        failures.is_empty(),
        "{failure_count} bad exchanges (seed {seed:#x}); the first {}:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "something panicked (see the output above)"
    );

    // Still alive, and still right.
    assert!(!server.task.is_finished(), "the server task ended");
    client.ping(&format!("{PREFIX}/x")).await.assert_ok();
    let app = reqwest::get(format!("http://{}/hello", server.addr))
        .await
        .expect("GET /hello");
    assert_eq!(app.status(), 200);
    assert_eq!(
        app.headers().get(APP_MARKER).map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let payload = data(300_000, seed);
    client
        .upload(
            &format!("{PREFIX}/after-the-storm.bin"),
            &payload,
            48 * 1024,
        )
        .await;
    let stored = std::fs::read(root.join("after-the-storm.bin")).expect("uploaded file");
    assert!(
        stored == payload,
        "the upload after the storm differs ({} bytes stored)",
        stored.len()
    );
    // Every session the storm left open answers, and its cancellation removes its part.
    let open = shared.sessions.lock().expect("sessions").clone();
    let mut cancelled = cancelled;
    let path = format!("{PREFIX}/x");
    for session in open {
        let cancel = client.cancel(&path, &session.id);
        let reply = tokio::time::timeout(EXCHANGE_TIMEOUT, cancel)
            .await
            .unwrap_or_else(|_| panic!("Cancel-Session of {} hangs", session.id));
        reply.assert_ack();
        match reply.status {
            200 => cancelled.extend(normalized_guid(&session.id)),
            _ => {
                reply.assert_error(500, "0x8020001F");
            }
        }
    }
    let left: Vec<_> = parts(root)
        .into_iter()
        .filter(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .is_some_and(|s| cancelled.iter().any(|c| c == s))
        })
        .collect();
    assert!(
        left.is_empty(),
        "part files of cancelled sessions: {left:?}"
    );
    let mut dir = tmp.path().to_path_buf();
    for inner in ["a", "b", "root"] {
        let entries: Vec<_> = std::fs::read_dir(&dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            entries,
            [inner],
            "something escaped the upload root into {dir:?}"
        );
        dir.push(inner);
    }

    // The storm was what it claims to be.
    assert!(stats.exchanges >= packets, "{} exchanges", stats.exchanges);
    assert!(total(&stats.acks) >= packets / 3, "too few Acks");
    assert!(stats.acks.keys().any(|k| k == "200"), "no successful Ack");
    assert!(
        total(&stats.pass_through) >= packets / 10,
        "too few pass-throughs"
    );
    assert!(total(&stats.transport) > 0, "no transport rejection");
    assert!(
        stats.expectations_checked > packets / 50,
        "too few exact answers checked"
    );
    assert!(!cancelled.is_empty(), "no session was cancelled");

    let _ = server.shutdown.send(());
    server.task.abort();
    println!("malformed: total {:.2?}", started.elapsed());
}
