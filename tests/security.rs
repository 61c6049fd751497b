//! Security over real sockets: no request names or writes anything outside the upload root
//! (encoded traversal, symbolic links, Windows device names), staged files are private,
//! limits hold, and one owner's session is invisible to everyone else.
//!
//! Requests whose exact bytes matter go through `RawConn` (reqwest normalises paths). Each
//! test's upload root is `<tempdir>/root`, next to `<tempdir>/outside`, so an escape would show
//! up as a change in the tempdir outside the root.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum_bits::{BitsLayer, BitsLayerBuilder};
use common::{
    BitsClient, PROTOCOL, RawResponse, Reply, TestServer, data, leftovers, owner_from_header,
};

const E_INVALIDARG: &str = "0x80070057";
const E_ACCESSDENIED: &str = "0x80070005";
const PATH_NOT_FOUND: &str = "0x80070003";
const SESSION_NOT_FOUND: &str = "0x8020001F";
const TOO_LARGE: &str = "0x80200020";

/// A well-formed session id no server issued.
const UNKNOWN_SID: &str = "{DEADBEEF-0000-4000-8000-000000000000}";

/// What `outside/target.bin` holds; an upload must never change it.
const TARGET: &[u8] = b"outside the root: must never change";

// ---------------------------------------------------------------------------------------------
// helpers

/// A tempdir holding the upload root (`root/`) and a folder beside it (`outside/`, with
/// `target.bin`), plus a snapshot of everything in the tempdir outside the root.
struct Sandbox {
    tmp: tempfile::TempDir,
    server: TestServer,
    before: BTreeMap<PathBuf, Entry>,
}

#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir,
    File(Vec<u8>),
    Link(PathBuf),
}

impl Sandbox {
    async fn new(configure: impl FnOnce(BitsLayerBuilder) -> BitsLayerBuilder) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("outside")).unwrap();
        std::fs::write(tmp.path().join("outside/target.bin"), TARGET).unwrap();
        let server = TestServer::start_in(&tmp.path().join("root"), configure).await;
        let before = tree(tmp.path(), &server.root);
        Self {
            tmp,
            server,
            before,
        }
    }

    fn root(&self) -> &Path {
        &self.server.root
    }

    fn outside(&self) -> PathBuf {
        self.tmp.path().join("outside")
    }

    /// Nothing outside the root was created, changed or removed.
    fn assert_confined(&self) {
        assert_eq!(tree(self.tmp.path(), self.root()), self.before);
    }

    /// Everything under the root except the server's own `.bits` folder, relative, sorted.
    fn uploads(&self) -> Vec<PathBuf> {
        let mut all = tree(self.root(), &self.root().join(".bits"));
        all.remove(Path::new(""));
        all.into_keys().collect()
    }
}

/// Every entry under `dir` except `skip` and what lies below it, symbolic links not followed,
/// keyed by path relative to `dir`.
fn tree(dir: &Path, skip: &Path) -> BTreeMap<PathBuf, Entry> {
    fn walk(base: &Path, dir: &Path, skip: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path == skip {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let key = path.strip_prefix(base).unwrap().to_path_buf();
            if meta.is_symlink() {
                out.insert(key, Entry::Link(std::fs::read_link(&path).unwrap()));
            } else if meta.is_dir() {
                out.insert(key, Entry::Dir);
                walk(base, &path, skip, out);
            } else {
                out.insert(key, Entry::File(std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::from([(PathBuf::new(), Entry::Dir)]);
    walk(dir, dir, skip, &mut out);
    out
}

/// A `BITS_POST` with exactly these bytes in the request target.
fn raw_request(target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!("BITS_POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (name, value) in headers {
        write!(head, "{name}: {value}\r\n").unwrap();
    }
    write!(head, "Content-Length: {}\r\n\r\n", body.len()).unwrap();
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

async fn send(
    server: &TestServer,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let request = raw_request(target, headers, body);
    server.raw().await.exchange(&request).await
}

async fn create(server: &TestServer, target: &str) -> RawResponse {
    let headers = [
        ("BITS-Packet-Type", "Create-Session"),
        ("BITS-Supported-Protocols", PROTOCOL),
    ];
    send(server, target, &headers, b"").await
}

async fn fragment(
    server: &TestServer,
    target: &str,
    sid: &str,
    first: usize,
    bytes: &[u8],
    total: usize,
) -> RawResponse {
    let range = format!("bytes {first}-{}/{total}", first + bytes.len() - 1);
    let headers = [
        ("BITS-Packet-Type", "Fragment"),
        ("BITS-Session-Id", sid),
        ("Content-Range", &range),
    ];
    send(server, target, &headers, bytes).await
}

async fn close(server: &TestServer, target: &str, sid: &str) -> RawResponse {
    let headers = [
        ("BITS-Packet-Type", "Close-Session"),
        ("BITS-Session-Id", sid),
    ];
    send(server, target, &headers, b"").await
}

/// A 200 Ack (no error headers); returns its session id, if any.
fn assert_ok(r: &RawResponse, what: &str) -> Option<String> {
    assert_eq!(
        (
            r.status,
            r.header("BITS-Packet-Type"),
            r.header("BITS-Error-Code")
        ),
        (200, Some("Ack"), None),
        "{what}: {r:?}"
    );
    r.header("BITS-Session-Id").map(str::to_owned)
}

/// An error Ack: this status and `BITS-Error-Code`, context 0x5, empty body.
fn assert_refused(r: &RawResponse, status: u16, code: &str, what: &str) {
    assert_eq!(
        (
            r.status,
            r.header("BITS-Packet-Type"),
            r.header("BITS-Error-Code"),
            r.header("BITS-Error-Context"),
            r.header("Content-Length"),
        ),
        (status, Some("Ack"), Some(code), Some("0x5"), Some("0")),
        "{what}: {r:?}"
    );
}

/// Create-Session, one Fragment with everything, Close-Session, all on `target`; each must
/// succeed.
async fn upload(server: &TestServer, target: &str, bytes: &[u8]) {
    let sid = assert_ok(&create(server, target).await, target).expect("session id");
    let r = fragment(server, target, &sid, 0, bytes, bytes.len()).await;
    assert_ok(&r, target);
    assert_eq!(
        r.header("BITS-Received-Content-Range"),
        Some(bytes.len().to_string().as_str())
    );
    assert_ok(&close(server, target, &sid).await, target);
}

// ---------------------------------------------------------------------------------------------
// 1. path confinement

#[tokio::test]
async fn encoded_traversal_is_refused_with_invalid_arg() {
    let sandbox = Sandbox::new(|b| b.create_directories(true)).await;
    for target in [
        "/%2e%2e/x",
        "/%2E%2E%2Fx",
        "/a/%2e%2e/%2e%2e/x",
        "/..%2fx",
        "/%2e%2e%2f%2e%2e%2fx",
        "/%5c..%5cx",
        "/..%5cx",
        "/x%00.txt",
        "/C:/x",
        "/c%3a%5cx",
        "/x:stream",
        "/x%3a%3a$DATA",
        "/a/%2e/x",
        "/x%0a.txt",
        &format!("/{}", "a".repeat(256)),
    ] {
        assert_refused(
            &create(&sandbox.server, target).await,
            400,
            E_INVALIDARG,
            target,
        );
    }
    assert_eq!(leftovers(sandbox.root()), Vec::<PathBuf>::new());
    assert_eq!(sandbox.uploads(), Vec::<PathBuf>::new());
    sandbox.assert_confined();
}

/// A raw backslash in the request target: refused as an invalid name.
#[tokio::test]
async fn raw_backslash_traversal_is_refused() {
    let sandbox = Sandbox::new(|b| b.create_directories(true)).await;
    for target in ["/..\\x", "/a\\..\\..\\x"] {
        assert_refused(
            &create(&sandbox.server, target).await,
            400,
            E_INVALIDARG,
            target,
        );
    }
    assert_eq!(sandbox.uploads(), Vec::<PathBuf>::new());
    sandbox.assert_confined();
}

/// `%252e%252e` is decoded once, to the literal folder name `%2e%2e`: a missing folder (404),
/// and once it exists, an upload lands inside it, inside the root.
#[tokio::test]
async fn double_encoding_is_decoded_once_and_stays_inside() {
    let sandbox = Sandbox::new(|b| b).await;
    let target = "/%252e%252e/x";
    assert_refused(
        &create(&sandbox.server, target).await,
        404,
        PATH_NOT_FOUND,
        target,
    );
    std::fs::create_dir(sandbox.root().join("%2e%2e")).unwrap();
    upload(&sandbox.server, target, b"double").await;
    assert_eq!(
        std::fs::read(sandbox.root().join("%2e%2e/x")).unwrap(),
        b"double"
    );
    assert_eq!(
        sandbox.uploads(),
        [PathBuf::from("%2e%2e"), PathBuf::from("%2e%2e/x")]
    );
    sandbox.assert_confined();
}

/// `//etc/passwd` is `etc/passwd` below the root, never `/etc/passwd`.
#[tokio::test]
async fn absolute_looking_path_is_relative_to_the_root() {
    let sandbox = Sandbox::new(|b| b.create_directories(true)).await;
    upload(&sandbox.server, "//etc/passwd", b"not root's").await;
    assert_eq!(
        std::fs::read(sandbox.root().join("etc/passwd")).unwrap(),
        b"not root's"
    );
    assert_eq!(
        sandbox.uploads(),
        [PathBuf::from("etc"), PathBuf::from("etc/passwd")]
    );
    sandbox.assert_confined();
}

/// Fullwidth dots (U+FF0E) and a fullwidth solidus (U+FF0F) are ordinary characters: the
/// names are literal and land inside the root.
#[tokio::test]
async fn fullwidth_dots_are_literal_names_inside_the_root() {
    let sandbox = Sandbox::new(|b| b.create_directories(true)).await;
    upload(&sandbox.server, "/%EF%BC%8E%EF%BC%8E/x", b"one").await;
    upload(&sandbox.server, "/%EF%BC%8E%EF%BC%8E%EF%BC%8Fy", b"two").await;
    assert_eq!(
        std::fs::read(sandbox.root().join("\u{FF0E}\u{FF0E}/x")).unwrap(),
        b"one"
    );
    assert_eq!(
        std::fs::read(sandbox.root().join("\u{FF0E}\u{FF0E}\u{FF0F}y")).unwrap(),
        b"two"
    );
    assert_eq!(sandbox.uploads().len(), 3);
    sandbox.assert_confined();
}

/// A 255-byte name is fine; a destination over 1,024 bytes is invalid (fatal for the client)
/// and creates nothing, and a URL longer than the server reads is refused before BITS runs.
#[tokio::test]
async fn very_long_names() {
    let sandbox = Sandbox::new(|b| b).await;
    let longest = "n".repeat(255);
    upload(&sandbox.server, &format!("/{longest}"), b"long").await;
    assert_eq!(
        std::fs::read(sandbox.root().join(&longest)).unwrap(),
        b"long"
    );

    let deep = format!("/{}", "d".repeat(255)).repeat(40);
    assert_refused(
        &create(&sandbox.server, &deep).await,
        400,
        E_INVALIDARG,
        "deep",
    );

    let huge = format!("/{}", "u".repeat(70_000));
    let r = create(&sandbox.server, &huge).await;
    assert_eq!(r.status, 414, "{r:?}");
    assert_eq!(sandbox.uploads(), [PathBuf::from(&longest)]);
    sandbox.assert_confined();
}

/// With `create_directories`, a destination deeper than the filesystem can hold (here 10 KiB,
/// over Linux's 4 KiB `PATH_MAX`) is refused up front as invalid, rather than accepted and
/// then failing every Fragment with a transient 500 (the client would retry until its job
/// times out) while leaving a trail of folders.
#[tokio::test]
async fn path_too_long_for_the_filesystem_is_refused_at_create_session() {
    let sandbox = Sandbox::new(|b| b.create_directories(true)).await;
    let deep = format!("/{}", "d".repeat(255)).repeat(40);
    assert_refused(
        &create(&sandbox.server, &deep).await,
        400,
        E_INVALIDARG,
        "deep",
    );
    assert_eq!(sandbox.uploads(), Vec::<PathBuf>::new());
    sandbox.assert_confined();
}

/// The server's own folder (staged parts, session records) is off limits in any case, at any
/// depth and however encoded, even with overwrites allowed.
#[tokio::test]
async fn the_servers_own_folder_is_forbidden() {
    let sandbox = Sandbox::new(|b| b.allow_overwrites(true).create_directories(true)).await;
    let sid = assert_ok(&create(&sandbox.server, "/victim.bin").await, "create").unwrap();
    let before = tree(&sandbox.root().join(".bits"), Path::new(""));
    let encoded = sid.replace('{', "%7B").replace('}', "%7D");
    for target in [
        format!("/.bits/sessions/{encoded}.json"),
        format!("/.bits/parts/{encoded}.part"),
        "/.BITS/x".to_owned(),
        "/%2ebits/x".to_owned(),
        "/sub/.Bits/x".to_owned(),
    ] {
        let r = create(&sandbox.server, &target).await;
        assert_refused(&r, 403, E_ACCESSDENIED, &target);
    }
    assert_eq!(tree(&sandbox.root().join(".bits"), Path::new("")), before);
    sandbox.assert_confined();
}

/// Unicode spellings of `.bits` that a case-insensitive or normalizing filesystem may take for
/// the server's folder (a long s, fullwidth letters, dotted and dotless i, a combining dot,
/// invisible characters) are forbidden like `.bits`, at any depth; plain non-ASCII names are
/// ordinary uploads.
#[tokio::test]
async fn the_servers_own_folder_is_forbidden_in_any_unicode_spelling() {
    let sandbox = Sandbox::new(|b| b.allow_overwrites(true).create_directories(true)).await;
    assert_ok(&create(&sandbox.server, "/victim.bin").await, "create");
    let before = tree(&sandbox.root().join(".bits"), Path::new(""));
    for target in [
        "/.bit%C5%BF/x",
        "/.%EF%BD%82%EF%BD%89%EF%BD%94%EF%BD%93/x",
        "/%EF%BC%8Ebits/x",
        "/.B%C4%B0TS/x",
        "/.b%C4%B1ts/x",
        "/.bi%CC%87ts/x",
        "/.b%E2%80%8Bits/x",
        "/.bi%C2%ADts/x",
        "/%EF%BB%BF.bits/x",
        "/sub/.bit%C5%BF/replies/x",
    ] {
        let r = create(&sandbox.server, target).await;
        assert_refused(&r, 403, E_ACCESSDENIED, target);
    }
    assert_eq!(tree(&sandbox.root().join(".bits"), Path::new("")), before);
    assert_eq!(sandbox.uploads(), Vec::<PathBuf>::new());
    upload(&sandbox.server, "/rapport-%C3%A9t%C3%A9.bin", b"fr").await;
    upload(&sandbox.server, "/%E6%8A%A5%E5%91%8A.bin", b"zh").await;
    assert_eq!(
        std::fs::read(sandbox.root().join("rapport-\u{E9}t\u{E9}.bin")).unwrap(),
        b"fr"
    );
    assert_eq!(
        std::fs::read(sandbox.root().join("\u{62A5}\u{544A}.bin")).unwrap(),
        b"zh"
    );
    sandbox.assert_confined();
}

/// A `%` that does not start a two-hex-digit escape is a malformed URL, not a literal name;
/// `%25` is a literal `%`, and an encoded slash separates folders like `/`.
#[tokio::test]
async fn malformed_percent_escapes_are_invalid_arg() {
    let sandbox = Sandbox::new(|b| b.create_directories(true)).await;
    for target in ["/%", "/%zz", "/a%2", "/%g0", "/x%", "/dir/%zz/y", "/%%41"] {
        assert_refused(
            &create(&sandbox.server, target).await,
            400,
            E_INVALIDARG,
            target,
        );
    }
    assert_eq!(leftovers(sandbox.root()), Vec::<PathBuf>::new());
    assert_eq!(sandbox.uploads(), Vec::<PathBuf>::new());
    upload(&sandbox.server, "/100%25.bin", b"percent").await;
    upload(&sandbox.server, "/dir%2Fok.bin", b"slash").await;
    assert_eq!(
        std::fs::read(sandbox.root().join("100%.bin")).unwrap(),
        b"percent"
    );
    assert_eq!(
        std::fs::read(sandbox.root().join("dir/ok.bin")).unwrap(),
        b"slash"
    );
    sandbox.assert_confined();
}

/// The destination is fixed by Create-Session: later packets sent to a traversal URL still
/// commit to the session's own destination.
#[tokio::test]
async fn later_packets_cannot_move_the_destination() {
    let sandbox = Sandbox::new(|b| b).await;
    let sid = assert_ok(&create(&sandbox.server, "/ok.bin").await, "create").unwrap();
    let evil = "/..%2fescaped.bin";
    assert_ok(
        &fragment(&sandbox.server, evil, &sid, 0, b"abc", 3).await,
        evil,
    );
    assert_ok(&close(&sandbox.server, evil, &sid).await, evil);
    assert_eq!(
        std::fs::read(sandbox.root().join("ok.bin")).unwrap(),
        b"abc"
    );
    assert_eq!(sandbox.uploads(), [PathBuf::from("ok.bin")]);
    sandbox.assert_confined();
}

// ---------------------------------------------------------------------------------------------
// 2. symbolic links

#[cfg(unix)]
async fn escape_through_directory_link(overwrite: bool) {
    let sandbox = Sandbox::new(|b| b.allow_overwrites(overwrite)).await;
    std::os::unix::fs::symlink(sandbox.outside(), sandbox.root().join("escape")).unwrap();
    let r = create(&sandbox.server, "/escape/x.bin").await;
    assert_refused(&r, 403, E_ACCESSDENIED, "/escape/x.bin");
    assert_eq!(leftovers(sandbox.root()), Vec::<PathBuf>::new());
    sandbox.assert_confined();
}

#[cfg(unix)]
#[tokio::test]
async fn directory_link_out_of_the_root_is_forbidden() {
    escape_through_directory_link(false).await;
}

#[cfg(unix)]
#[tokio::test]
async fn directory_link_out_of_the_root_is_forbidden_with_overwrites() {
    escape_through_directory_link(true).await;
}

#[cfg(unix)]
#[tokio::test]
async fn file_link_out_of_the_root_is_an_existing_file() {
    let sandbox = Sandbox::new(|b| b).await;
    let link = sandbox.root().join("link.bin");
    std::os::unix::fs::symlink(sandbox.outside().join("target.bin"), &link).unwrap();
    assert_refused(
        &create(&sandbox.server, "/link.bin").await,
        403,
        E_ACCESSDENIED,
        "link",
    );
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    sandbox.assert_confined();
}

/// With overwrites the link itself is replaced by the upload; its target is untouched.
#[cfg(unix)]
#[tokio::test]
async fn file_link_out_of_the_root_is_replaced_not_written_through() {
    let sandbox = Sandbox::new(|b| b.allow_overwrites(true)).await;
    let link = sandbox.root().join("link.bin");
    std::os::unix::fs::symlink(sandbox.outside().join("target.bin"), &link).unwrap();
    upload(&sandbox.server, "/link.bin", b"replacement").await;
    assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
    assert_eq!(std::fs::read(&link).unwrap(), b"replacement");
    sandbox.assert_confined();
}

/// A hard link to a file outside is a directory entry like any other: replaced, not written
/// through.
#[cfg(unix)]
#[tokio::test]
async fn hard_link_out_of_the_root_is_replaced_not_written_through() {
    let sandbox = Sandbox::new(|b| b.allow_overwrites(true)).await;
    let hard = sandbox.root().join("hard.bin");
    std::fs::hard_link(sandbox.outside().join("target.bin"), &hard).unwrap();
    upload(&sandbox.server, "/hard.bin", b"replacement").await;
    assert_eq!(std::fs::read(&hard).unwrap(), b"replacement");
    sandbox.assert_confined();
}

/// `root/d` is a real folder at Create-Session and a link to `outside` by the last fragment:
/// the commit re-checks the path and refuses.
#[cfg(unix)]
async fn folder_swapped_for_a_link_mid_upload(overwrite: bool) {
    let sandbox = Sandbox::new(|b| b.allow_overwrites(overwrite)).await;
    let (server, dir) = (&sandbox.server, sandbox.root().join("d"));
    std::fs::create_dir(&dir).unwrap();
    let bytes = data(2000, 7);
    let sid = assert_ok(&create(server, "/d/f.bin").await, "create").unwrap();
    assert_ok(
        &fragment(server, "/d/f.bin", &sid, 0, &bytes[..1000], 2000).await,
        "first",
    );

    std::fs::remove_dir(&dir).unwrap();
    std::os::unix::fs::symlink(sandbox.outside(), &dir).unwrap();
    let r = fragment(server, "/d/f.bin", &sid, 1000, &bytes[1000..], 2000).await;
    assert_refused(&r, 403, E_ACCESSDENIED, "last fragment");
    assert_refused(
        &close(server, "/d/f.bin", &sid).await,
        403,
        E_ACCESSDENIED,
        "close",
    );
    sandbox.assert_confined();
}

#[cfg(unix)]
#[tokio::test]
async fn folder_swapped_for_a_link_mid_upload_is_not_followed() {
    folder_swapped_for_a_link_mid_upload(false).await;
}

#[cfg(unix)]
#[tokio::test]
async fn folder_swapped_for_a_link_mid_upload_is_not_followed_with_overwrites() {
    folder_swapped_for_a_link_mid_upload(true).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Windows names

#[tokio::test]
async fn windows_device_names_and_invalid_characters_are_refused() {
    let sandbox = Sandbox::new(|b| b.create_directories(true)).await;
    for target in [
        "/CON",
        "/con.txt",
        "/NUL",
        "/aux.tar.gz",
        "/COM1",
        "/LPT9.log",
        "/prn",
        "/CONIN$",
        "/dir/nul.bin",
        "/CON/x",
        "/name.",
        "/name%20",
        "/dir./x",
        "/a%3Cb",
        "/a%3Eb",
        "/a%7Cb",
        "/a%22b",
        "/a*b",
        "/a%3Fb",
    ] {
        assert_refused(
            &create(&sandbox.server, target).await,
            400,
            E_INVALIDARG,
            target,
        );
    }
    assert_eq!(leftovers(sandbox.root()), Vec::<PathBuf>::new());
    assert_eq!(sandbox.uploads(), Vec::<PathBuf>::new());
    sandbox.assert_confined();
}

/// Windows treats the superscript digits ¹ ² ³ as digits in COM# and LPT# device names
/// ("Naming Files, Paths, and Namespaces").
#[tokio::test]
async fn superscript_device_names_are_refused() {
    let sandbox = Sandbox::new(|b| b).await;
    for target in ["/COM%C2%B9", "/lpt%C2%B3.log", "/com%C2%B2.txt"] {
        assert_refused(
            &create(&sandbox.server, target).await,
            400,
            E_INVALIDARG,
            target,
        );
    }
    assert_eq!(leftovers(sandbox.root()), Vec::<PathBuf>::new());
}

// ---------------------------------------------------------------------------------------------
// 4. permissions

#[cfg(unix)]
#[tokio::test]
async fn staged_files_are_private_and_the_result_is_not_world_writable() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let sandbox = Sandbox::new(|b| b).await;
    let (server, root) = (&sandbox.server, sandbox.root());
    let bytes = data(2000, 3);
    let sid = assert_ok(&create(server, "/result.bin").await, "create").unwrap();
    assert_ok(
        &fragment(server, "/result.bin", &sid, 0, &bytes[..1000], 2000).await,
        "first",
    );

    let staged = common::parts(root);
    let records: Vec<_> = leftovers(root)
        .into_iter()
        .filter(|p| p.starts_with(root.join(".bits/sessions")))
        .collect();
    assert_eq!(staged.len(), 1);
    assert!(
        records
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "json"))
    );
    for file in staged.iter().chain(&records) {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }

    assert_ok(
        &fragment(server, "/result.bin", &sid, 1000, &bytes[1000..], 2000).await,
        "last",
    );
    let result = root.join("result.bin");
    assert_eq!(std::fs::read(&result).unwrap(), bytes);
    assert_eq!(mode(&result), 0o644);
}

// ---------------------------------------------------------------------------------------------
// 5. bounds

#[tokio::test]
async fn header_value_over_4096_bytes_is_invalid_arg() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    let create = |name: String| {
        let client = client.clone();
        async move {
            let headers = [
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", PROTOCOL),
                ("Content-Name", name.as_str()),
            ];
            client.send("/f.bin", &headers, Vec::new()).await
        }
    };
    create("n".repeat(4097))
        .await
        .assert_error(400, E_INVALIDARG);
    assert_eq!(server.leftovers(), Vec::<PathBuf>::new());
    create("n".repeat(4096)).await.assert_ok();

    // An oversized session id is refused and not echoed.
    let long_id = "i".repeat(5000);
    let reply = client.close("/f.bin", &long_id).await;
    reply.assert_error(400, E_INVALIDARG);
    assert_eq!(reply.header("BITS-Session-Id"), None);
}

/// hyper refuses a header block it will not buffer (431, or a closed connection) before the
/// layer sees it; the server keeps serving.
#[tokio::test]
async fn huge_header_blocks_are_rejected_and_the_server_survives() {
    let server = TestServer::start(|b| b).await;
    let names: Vec<String> = (0..200).map(|i| format!("X-Pad-{i}")).collect();
    let mut many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    many.push(("BITS-Packet-Type", "Ping"));
    let huge = "h".repeat(1 << 20);
    let one_huge = [("BITS-Packet-Type", "Ping"), ("X-Huge", huge.as_str())];
    for headers in [&many[..], &one_huge[..]] {
        let status = rejection(&server, raw_request("/f.bin", headers, b"")).await;
        assert!(matches!(status, Some(431) | None), "{status:?}");
    }
    assert_ok(
        &send(&server, "/f.bin", &[("BITS-Packet-Type", "Ping")], b"").await,
        "ping",
    );
}

/// Sends `request` while reading the answer (the server may answer and close before it has
/// read everything); returns the answer's status, or `None` if the connection closed without
/// one.
async fn rejection(server: &TestServer, request: Vec<u8>) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut read, mut write) = tokio::net::TcpStream::connect(server.addr)
        .await
        .unwrap()
        .into_split();
    let writer = tokio::spawn(async move { write.write_all(&request).await.map(|()| write) });
    let mut answer = Vec::new();
    let mut chunk = [0; 4096];
    let read_all = async {
        while let Ok(n @ 1..) = read.read(&mut chunk).await {
            answer.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_all)
        .await
        .expect("the server answers or closes within 10 s");
    writer.abort();
    let head = String::from_utf8_lossy(&answer);
    head.split(' ')
        .nth(1)
        .map(|s| s.parse().expect("a status code"))
}

#[tokio::test]
async fn fragment_over_max_fragment_size_gets_a_plain_413() {
    let server = TestServer::start(|b| b.max_fragment_size(64 * 1024)).await;
    let client = server.client();
    let sid = client.create_ok("/big.bin").await;
    let bytes = data(64 * 1024 + 1, 5);
    let reply = client
        .fragment("/big.bin", &sid, 0, &bytes, bytes.len() as u64)
        .await;
    assert_eq!(reply.status, 413, "{reply:?}");
    reply.assert_ack();
    assert_eq!(reply.header("BITS-Error-Code"), None);
    assert_eq!(reply.received(), Some(0));

    // The client shrinks its fragments and carries on.
    client.send_all("/big.bin", &sid, &bytes, 64 * 1024).await;
    client.close("/big.bin", &sid).await.assert_ok();
    assert_eq!(std::fs::read(server.root.join("big.bin")).unwrap(), bytes);
}

#[tokio::test]
async fn total_over_max_upload_size_is_too_large() {
    let server = TestServer::start(|b| b.max_upload_size(1 << 20)).await;
    let client = server.client();
    let sid = client.create_ok("/big.bin").await;
    let reply = client
        .fragment("/big.bin", &sid, 0, b"0123456789", (1 << 20) + 1)
        .await;
    reply.assert_error(500, TOO_LARGE);
    assert!(!server.root.join("big.bin").exists());

    let sid = client.create_ok("/ok.bin").await;
    let reply = client
        .fragment("/ok.bin", &sid, 0, b"0123456789", 1 << 20)
        .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(10));
}

// ---------------------------------------------------------------------------------------------
// 6. owners

/// Sets the request's [`Owner`] from `X-User`, as an authentication layer would.
async fn owned_server() -> (tempfile::TempDir, TestServer) {
    let tmp = tempfile::tempdir().unwrap();
    let layer = BitsLayer::builder(tmp.path()).build().unwrap();
    let app = Router::new()
        .layer(layer.clone())
        .layer(axum::middleware::from_fn(owner_from_header));
    let server = TestServer::serve(tmp.path(), layer, app).await;
    (tmp, server)
}

/// A reply's status and headers, without `Date`, with the echoed session id made generic.
fn shape(reply: &Reply, sid: &str) -> (u16, Vec<(String, String)>) {
    let mut headers: Vec<_> = reply
        .headers
        .iter()
        .filter(|(name, _)| *name != http::header::DATE)
        .map(|(name, value)| {
            let value = value.to_str().unwrap();
            let value = if value == sid { "<the id sent>" } else { value };
            (name.as_str().to_owned(), value.to_owned())
        })
        .collect();
    headers.sort();
    (reply.status, headers)
}

/// Sends one packet as `user` (or as nobody).
async fn as_user(
    client: &BitsClient,
    user: Option<&str>,
    packet: &str,
    sid: &str,
    extra: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    let mut headers = vec![("BITS-Packet-Type", packet), ("BITS-Session-Id", sid)];
    headers.extend_from_slice(extra);
    if let Some(user) = user {
        headers.push(("X-User", user));
    }
    client.send("/alice.bin", &headers, body).await
}

#[tokio::test]
async fn another_owner_cannot_tell_a_session_from_an_unknown_one() {
    let (_tmp, server) = owned_server().await;
    let client = server.client();
    let bytes = data(8000, 11);
    let (first_half, second_half) = (
        [("Content-Range", "bytes 0-3999/8000")],
        [("Content-Range", "bytes 4000-7999/8000")],
    );
    let created = client
        .send(
            "/alice.bin",
            &[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", PROTOCOL),
                ("X-User", "alice"),
            ],
            Vec::new(),
        )
        .await;
    created.assert_ok();
    let alice = created.session_id();
    let reply = as_user(
        &client,
        Some("alice"),
        "Fragment",
        &alice,
        &first_half,
        bytes[..4000].to_vec(),
    )
    .await;
    reply.assert_ok();

    for intruder in [Some("bob"), None] {
        for (packet, extra, body) in [
            ("Fragment", &second_half[..], vec![0xEE; 4000]),
            ("Close-Session", &[][..], Vec::new()),
            ("Cancel-Session", &[][..], Vec::new()),
        ] {
            let theirs = as_user(&client, intruder, packet, &alice, extra, body.clone()).await;
            let nobodys = as_user(&client, intruder, packet, UNKNOWN_SID, extra, body).await;
            nobodys.assert_error(500, SESSION_NOT_FOUND);
            assert_eq!(
                shape(&theirs, &alice),
                shape(&nobodys, UNKNOWN_SID),
                "{intruder:?} {packet}"
            );
        }
    }

    let reply = as_user(
        &client,
        Some("alice"),
        "Fragment",
        &alice,
        &second_half,
        bytes[4000..].to_vec(),
    )
    .await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(8000));
    as_user(
        &client,
        Some("alice"),
        "Close-Session",
        &alice,
        &[],
        Vec::new(),
    )
    .await
    .assert_ok();
    assert_eq!(std::fs::read(server.root.join("alice.bin")).unwrap(), bytes);
}

// ---------------------------------------------------------------------------------------------
// 7. repeated headers

/// A header the packet depends on, repeated with another value, is refused with 400
/// `E_INVALIDARG` and changes nothing: a proxy that reads the last copy must not see another
/// packet than the server. Repeats with the same value (in any case) are fine.
#[tokio::test]
async fn conflicting_repeated_headers_are_invalid_arg() {
    let sandbox = Sandbox::new(|b| b).await;
    let server = &sandbox.server;
    let target = "/repeated.bin";
    let sid = assert_ok(&create(server, target).await, "create").expect("session id");
    let refused = |r: RawResponse, what: &str| assert_refused(&r, 400, E_INVALIDARG, what);

    let headers = [
        ("BITS-Packet-Type", "Fragment"),
        ("BITS-Session-Id", sid.as_str()),
        ("Content-Range", "bytes 0-2/6"),
        ("bits-packet-type", "Close-Session"),
    ];
    refused(send(server, target, &headers, b"abc").await, "packet type");
    let headers = [
        ("BITS-Packet-Type", "Fragment"),
        ("BITS-Session-Id", sid.as_str()),
        ("BITS-SESSION-ID", UNKNOWN_SID),
        ("Content-Range", "bytes 0-2/6"),
    ];
    let r = send(server, target, &headers, b"abc").await;
    // Which session the client meant is unknown: the Ack names none and reports no offset.
    assert_eq!(r.header("BITS-Session-Id"), None, "{r:?}");
    assert_eq!(r.header("BITS-Received-Content-Range"), None, "{r:?}");
    refused(r, "session id");
    let headers = [
        ("BITS-Packet-Type", "Fragment"),
        ("BITS-Session-Id", sid.as_str()),
        ("Content-Range", "bytes 0-2/6"),
        ("content-range", "bytes 3-5/6"),
    ];
    refused(send(server, target, &headers, b"abc").await, "range");
    let headers = [
        ("BITS-Packet-Type", "Close-Session"),
        ("BITS-Session-Id", UNKNOWN_SID),
        ("BITS-Session-Id", sid.as_str()),
    ];
    refused(send(server, target, &headers, b"").await, "close");
    let headers = [
        ("BITS-Packet-Type", "Create-Session"),
        ("BITS-Supported-Protocols", PROTOCOL),
        ("Content-Name", "a.bin"),
        ("Content-Name", "b.bin"),
    ];
    refused(
        send(server, "/other.bin", &headers, b"").await,
        "content name",
    );

    // Nothing happened: the session is open and still expects byte 0.
    let lower = sid.to_ascii_lowercase();
    let headers = [
        ("BITS-Packet-Type", "Fragment"),
        ("bits-packet-type", "FRAGMENT"),
        ("BITS-Session-Id", sid.as_str()),
        ("BITS-Session-Id", lower.as_str()),
        ("Content-Range", "bytes 0-5/6"),
        ("Content-Range", "Bytes 0-5/6"),
    ];
    let r = send(server, target, &headers, b"abcdef").await;
    assert_ok(&r, "agreeing repeats");
    assert_eq!(r.header("BITS-Received-Content-Range"), Some("6"));
    assert_ok(&close(server, target, &sid).await, "close");
    assert_eq!(
        std::fs::read(sandbox.root().join("repeated.bin")).unwrap(),
        b"abcdef"
    );
    assert_eq!(sandbox.uploads(), [PathBuf::from("repeated.bin")]);
    sandbox.assert_confined();
}
