//! Property tests of the Fragment rules against a model (protocol reference, section 5):
//! random sequences of fragments with repeats, overlaps, gaps, bodies cut off mid-way and
//! process restarts, run in-process through `tower::ServiceExt::oneshot` on a `Router` with
//! the layer. After every packet the Ack's `BITS-Received-Content-Range` must be the model's
//! `received`; at the end the client follows the offset to completion and the file must be
//! byte-identical to its source.

mod common;

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Method, Request, StatusCode};
use axum::routing::get;
use axum_bits::BitsLayer;
use axum_bits::session::Phase;
use axum_bits::store::{FileStore, SessionStore};
use http_body::Frame;
use proptest::prelude::*;
use tower::ServiceExt;

use common::{PROTOCOL, data};

const PATH: &str = "/prop.bin";

/// A request body that yields its chunks and then, if `fail`, an I/O error: a client that
/// disconnects in the middle of the body.
struct CutBody {
    chunks: VecDeque<Bytes>,
    fail: bool,
}

impl http_body::Body for CutBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Some(chunk) = this.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if this.fail {
            this.fail = false;
            return Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "client went away",
            ))));
        }
        Poll::Ready(None)
    }
}

/// The answer to one packet.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    received: Option<u64>,
    error_code: Option<String>,
    session_id: Option<String>,
}

/// A server "process": a router over a layer on `root`. Restarting builds a fresh layer on
/// the same root; its `FileStore` reloads the records from disk.
struct Server {
    root: PathBuf,
    app: Router,
}

impl Server {
    fn start(root: &Path) -> Self {
        let layer = BitsLayer::builder(root).build().expect("layer");
        let app = Router::new()
            .route("/", get(|| async { "app" }))
            .layer(layer);
        Self {
            root: root.to_path_buf(),
            app,
        }
    }

    fn restart(&mut self) {
        *self = Self::start(&self.root);
    }

    async fn send(&self, headers: &[(&str, String)], body: Body) -> Answer {
        let mut request = Request::builder()
            .method(Method::from_bytes(b"BITS_POST").unwrap())
            .uri(PATH);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = self
            .app
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .expect("infallible");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(header("BITS-Packet-Type").as_deref(), Some("Ack"));
        Answer {
            status: response.status(),
            received: header("BITS-Received-Content-Range").map(|v| v.parse().unwrap()),
            error_code: header("BITS-Error-Code"),
            session_id: header("BITS-Session-Id"),
        }
    }

    async fn create(&self) -> String {
        let answer = self
            .send(
                &[
                    ("BITS-Packet-Type", "Create-Session".into()),
                    ("BITS-Supported-Protocols", PROTOCOL.into()),
                    ("Content-Length", "0".into()),
                ],
                Body::empty(),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        answer.session_id.expect("session id")
    }

    async fn close(&self, sid: &str) -> Answer {
        self.send(
            &[
                ("BITS-Packet-Type", "Close-Session".into()),
                ("BITS-Session-Id", sid.into()),
                ("Content-Length", "0".into()),
            ],
            Body::empty(),
        )
        .await
    }

    /// A Fragment `first..first+body.len()` of a `total`-byte file. The body arrives in
    /// `pieces` chunks; with `cut = Some(k)` only its first `k` bytes arrive, then an error.
    async fn fragment(
        &self,
        sid: &str,
        first: u64,
        body: Vec<u8>,
        total: u64,
        pieces: usize,
        cut: Option<usize>,
    ) -> Answer {
        let len = body.len();
        let sent = cut.unwrap_or(len);
        let mut chunks = VecDeque::new();
        let step = sent.div_ceil(pieces.max(1)).max(1);
        let mut at = 0;
        while at < sent {
            let end = (at + step).min(sent);
            chunks.push_back(Bytes::copy_from_slice(&body[at..end]));
            at = end;
        }
        let body = Body::new(CutBody {
            chunks,
            fail: cut.is_some(),
        });
        self.send(
            &[
                ("BITS-Packet-Type", "Fragment".into()),
                ("BITS-Session-Id", sid.into()),
                (
                    "Content-Range",
                    format!("bytes {first}-{}/{total}", first + len as u64 - 1),
                ),
                ("Content-Length", len.to_string()),
            ],
            body,
        )
        .await
    }
}

/// Where a fragment starts, relative to the server's offset when it is sent.
#[derive(Debug, Clone)]
enum Start {
    /// At the next expected byte (a normal append).
    AtReceived,
    /// Somewhere before it (overlap or duplicate).
    Behind(u32),
    /// Beyond it (a gap).
    Ahead(u32),
    /// Anywhere in the file.
    Anywhere(u32),
}

/// How long a fragment is.
#[derive(Debug, Clone)]
enum Len {
    /// `1 + n % (bytes left from its start)`.
    Bytes(u32),
    /// Up to the last byte of the file (a final fragment).
    ToEnd,
}

/// Where the body of a fragment breaks off (the client disconnects).
#[derive(Debug, Clone)]
enum Cut {
    /// After `n % (len + 1)` bytes.
    After(u32),
    /// After every byte, before the body is formally finished.
    AllBytes,
}

#[derive(Debug, Clone)]
enum Op {
    Fragment {
        start: Start,
        len: Len,
        pieces: u8,
        cut: Option<Cut>,
        /// Garbage in the body bytes the server already holds (must never be written).
        garble_held: bool,
    },
    /// A fragment announcing a different total (400, offset unchanged).
    WrongTotal,
    /// The server process restarts.
    Restart,
}

fn start_strategy() -> impl Strategy<Value = Start> {
    prop_oneof![
        4 => Just(Start::AtReceived),
        2 => any::<u32>().prop_map(Start::Behind),
        1 => any::<u32>().prop_map(Start::Ahead),
        2 => any::<u32>().prop_map(Start::Anywhere),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let fragment = (
        start_strategy(),
        prop_oneof![
            4 => (0u32..24 * 1024).prop_map(Len::Bytes),
            1 => Just(Len::ToEnd),
        ],
        1u8..=4,
        prop_oneof![
            6 => Just(None),
            2 => any::<u32>().prop_map(|n| Some(Cut::After(n))),
            1 => Just(Some(Cut::AllBytes)),
        ],
        any::<bool>(),
    )
        .prop_map(|(start, len, pieces, cut, garble_held)| Op::Fragment {
            start,
            len,
            pieces,
            cut,
            garble_held,
        });
    prop_oneof![
        10 => fragment,
        1 => Just(Op::WrongTotal),
        2 => Just(Op::Restart),
    ]
}

fn part_path(root: &Path, sid: &str) -> PathBuf {
    root.join(".bits").join("parts").join(format!("{sid}.part"))
}

/// The server's state as the protocol defines it.
struct Model {
    total: u64,
    received: u64,
}

impl Model {
    fn complete(&self) -> bool {
        self.received == self.total
    }
}

fn as_usize(n: u64) -> usize {
    usize::try_from(n).unwrap()
}

/// Checks what must hold between packets: the part's prefix up to `received` is the source
/// (while the session is open), and a complete upload is at its destination (the default
/// commit point is the last fragment, section 8.3).
fn check_storage(root: &Path, sid: &str, source: &[u8], model: &Model, ctx: &str) {
    if model.complete() {
        let stored = std::fs::read(root.join(&PATH[1..]))
            .unwrap_or_else(|e| panic!("{ctx}: all bytes acknowledged, but no file: {e}"));
        assert!(
            stored == source,
            "{ctx}: committed file differs from source"
        );
    } else {
        let part = std::fs::read(part_path(root, sid)).expect("part file");
        let n = as_usize(model.received);
        assert!(part.len() >= n, "{ctx}: part shorter than received");
        assert!(
            part[..n] == source[..n],
            "{ctx}: part prefix differs from source"
        );
    }
}

async fn run(size: usize, seed: u64, ops: Vec<Op>) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let source = data(size, seed);
    let total = size as u64;
    let mut server = Server::start(root);
    let sid = server.create().await;
    let mut model = Model { total, received: 0 };

    for (step, op) in ops.into_iter().enumerate() {
        let r = model.received;
        let ctx = format!("step {step} ({op:?}), model received {r} of {total}");
        match op {
            Op::Restart => {
                server.restart();
                continue;
            }
            Op::WrongTotal => {
                if r == 0 {
                    continue; // the total is not fixed yet: this would fix it
                }
                let first = r.min(total - 1);
                let byte = source[as_usize(first)..=as_usize(first)].to_vec();
                let a = server.fragment(&sid, first, byte, total + 1, 1, None).await;
                assert_eq!(a.status, StatusCode::BAD_REQUEST, "{ctx}: {a:?}");
                assert_eq!(a.error_code.as_deref(), Some("0x80070057"), "{ctx}: {a:?}");
                assert_eq!(a.received, Some(r), "{ctx}: {a:?}");
            }
            Op::Fragment {
                start,
                len,
                pieces,
                cut,
                garble_held,
            } => {
                let first = match start {
                    Start::AtReceived => r.min(total - 1),
                    Start::Behind(x) if r > 0 => r - 1 - u64::from(x) % r,
                    Start::Behind(_) => 0,
                    Start::Ahead(x) if r + 1 < total => r + 1 + u64::from(x) % (total - r - 1),
                    Start::Ahead(_) => r.min(total - 1),
                    Start::Anywhere(x) => u64::from(x) % total,
                };
                let len = match len {
                    Len::Bytes(n) => 1 + u64::from(n) % (total - first),
                    Len::ToEnd => total - first,
                };
                let end = first + len;
                let mut body = source[as_usize(first)..as_usize(end)].to_vec();
                if garble_held && first < r {
                    let held = as_usize(r.min(end) - first);
                    for b in &mut body[..held] {
                        *b ^= 0xA5;
                    }
                }
                let cut = cut.map(|cut| match cut {
                    Cut::After(n) => as_usize(u64::from(n) % (len + 1)),
                    Cut::AllBytes => as_usize(len),
                });
                let a = server
                    .fragment(&sid, first, body, total, usize::from(pieces), cut)
                    .await;
                let ctx = format!("{ctx}: range {first}..{end}, cut {cut:?}: {a:?}");
                let got = a.received.unwrap_or_else(|| panic!("{ctx}: no received"));
                if model.complete() {
                    // Already complete: 200 with the total, whatever the body (section 5.5).
                    assert_eq!(a.status, StatusCode::OK, "{ctx}");
                    assert_eq!(got, total, "{ctx}");
                } else if first > r {
                    // Gap: 416, nothing written, offset unchanged (section 5.2).
                    assert_eq!(a.status, StatusCode::RANGE_NOT_SATISFIABLE, "{ctx}");
                    assert_eq!(a.error_code.as_deref(), Some("0x0"), "{ctx}");
                    assert_eq!(got, r, "{ctx}");
                } else if end <= r {
                    // Pure duplicate: 200 with the current offset; the body is not needed.
                    assert_eq!(a.status, StatusCode::OK, "{ctx}");
                    assert_eq!(got, r, "{ctx}");
                } else if let Some(k) = cut {
                    // Cut off mid-body: the old offset, or the old one plus a durable prefix
                    // of what arrived (section 5.4). A success only if every byte arrived.
                    if a.status == StatusCode::OK {
                        assert_eq!(k as u64, len, "{ctx}");
                        assert_eq!(got, end, "{ctx}");
                    }
                    let arrived_end = (first + k as u64).max(r);
                    assert!((r..=arrived_end).contains(&got), "{ctx}");
                    model.received = got;
                } else {
                    // Append or overlap: 200 with the fragment's end.
                    assert_eq!(a.status, StatusCode::OK, "{ctx}");
                    assert_eq!(got, end, "{ctx}");
                    model.received = end;
                }
                if a.status == StatusCode::OK {
                    assert!(a.error_code.is_none(), "{ctx}");
                    check_storage(root, &sid, &source, &model, &ctx);
                } else if !model.complete() {
                    check_storage(root, &sid, &source, &model, &ctx);
                }
            }
        }
    }

    // The client finishes by following the server's offset.
    let mut rounds = 0;
    loop {
        let r = model.received;
        let first = r.min(total - 1);
        let end = (first + 8 * 1024).min(total);
        let a = server
            .fragment(
                &sid,
                first,
                source[as_usize(first)..as_usize(end)].to_vec(),
                total,
                2,
                None,
            )
            .await;
        let ctx = format!("finishing from {r} of {total}: {a:?}");
        assert_eq!(a.status, StatusCode::OK, "{ctx}");
        assert_eq!(a.received, Some(end.max(r)), "{ctx}");
        model.received = end.max(r);
        check_storage(root, &sid, &source, &model, &ctx);
        if model.complete() {
            break;
        }
        rounds += 1;
        assert!(rounds <= 64, "{ctx}: no progress");
    }
    let a = server.close(&sid).await;
    assert_eq!(a.status, StatusCode::OK, "close: {a:?}");
    let stored = std::fs::read(root.join(&PATH[1..])).expect("uploaded file after Close");
    assert!(stored == source, "file differs from source after Close");
    assert!(
        common::parts(root).is_empty(),
        "{:?}",
        common::leftovers(root)
    );
    let records = FileStore::open(root.join(".bits").join("sessions"))
        .unwrap()
        .list()
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].phase, Phase::Closed);
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn fragment_sequences_follow_the_received_offset(
        size in 1usize..=64 * 1024,
        seed in any::<u64>(),
        ops in proptest::collection::vec(op_strategy(), 0..=20),
    ) {
        block_on(run(size, seed, ops));
    }
}

/// Regression for the sequence the property test finds: the final fragment's body delivers
/// every byte and then fails (the client resets the connection before the body is
/// formally finished, or the body stalls past the idle timeout after its last byte). The
/// server keeps the arrived bytes, so the session holds all `total` bytes; the client's
/// retry of the final fragment is then answered 200 with `received == total`, which per
/// sections 5.5 and 8.3 means the upload is complete and (default commit point) committed,
/// and Close-Session must leave the file at its destination.
#[test]
fn body_failing_after_its_last_byte_still_completes_the_upload() {
    block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let source = data(1000, 3);
        let server = Server::start(root);
        let sid = server.create().await;
        server
            .fragment(&sid, 0, source[..600].to_vec(), 1000, 1, None)
            .await;
        let cut = server
            .fragment(&sid, 600, source[600..].to_vec(), 1000, 2, Some(400))
            .await;
        // Every byte arrived, so the server may count the fragment (200, 1000) or refuse it
        // and report what it keeps (600, or 1000 if it kept the bytes).
        assert!(
            (cut.status == StatusCode::OK && cut.received == Some(1000))
                || (cut.status != StatusCode::OK && matches!(cut.received, Some(600 | 1000))),
            "{cut:?}"
        );

        // The client retries the final fragment and follows the answer.
        let retry = server
            .fragment(&sid, 600, source[600..].to_vec(), 1000, 1, None)
            .await;
        assert_eq!(retry.status, StatusCode::OK, "{retry:?}");
        assert_eq!(retry.received, Some(1000), "{retry:?}");
        let committed = std::fs::read(root.join(&PATH[1..]));
        let close = server.close(&sid).await;
        assert_eq!(close.status, StatusCode::OK, "{close:?}");
        let after_close = std::fs::read(root.join(&PATH[1..]));
        assert!(
            committed.as_deref().ok() == Some(&source[..]),
            "200 with received == total but the file was not committed: {committed:?}"
        );
        assert!(
            after_close.as_deref().ok() == Some(&source[..]),
            "Close-Session after a fully acknowledged upload lost the file: {after_close:?}"
        );
    });
}
