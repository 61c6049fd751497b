//! How the layer mounts into an axum app: `BITS_POST` reaches it whatever the routes say,
//! every other request reaches the app untouched, `.prefix` confines it, nested routers work,
//! and no request target can place anything outside the upload root.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use axum_bits::BitsLayer;
use common::{BitsClient, PROTOCOL, TestServer, bits_post, data, leftovers, parts};

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

struct Plain {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Plain {
    /// Asserts the response came from the app, not from the BITS layer.
    fn assert_from_app(&self, status: u16, body: &[u8]) {
        assert_eq!(
            self.status,
            status,
            "body {:?}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(
            self.body,
            body,
            "body {:?}",
            String::from_utf8_lossy(&self.body)
        );
        for name in self.headers.keys() {
            assert!(
                !name.as_str().starts_with("bits-"),
                "BITS header {name} on an app response"
            );
        }
    }
}

async fn plain(
    method: reqwest::Method,
    url: String,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Plain {
    let mut request = http().request(method, url);
    for (n, v) in headers {
        request = request.header(*n, *v);
    }
    let response = request.body(body).send().await.unwrap();
    Plain {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.bytes().await.unwrap().to_vec(),
    }
}

fn assert_file(path: &Path, expected: &[u8]) {
    let actual = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(actual == expected, "{}: content differs", path.display());
}

/// Every file and folder under `dir`, relative, including the server's own.
fn tree(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            out.push(path.strip_prefix(base).unwrap().to_path_buf());
            if path.is_dir() {
                walk(base, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------------
// BITS_POST reaches the layer before routing

#[tokio::test]
async fn bits_post_reaches_the_layer_on_unrouted_and_get_only_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = BitsLayer::builder(tmp.path()).build().unwrap();
    let app = Router::new()
        .route("/get-only.bin", get(|| async { "a GET route" }))
        .route("/post-only.bin", post(|| async { "a POST route" }))
        .layer(layer.clone());
    let server = TestServer::serve(tmp.path(), layer, app).await;
    let client = server.client();

    for path in ["/unrouted.bin", "/get-only.bin", "/post-only.bin"] {
        let reply = client.ping(path).await;
        assert_ne!(
            reply.status, 405,
            "{path}: method router answered: {reply:?}"
        );
        reply.assert_ok();
        let bytes = data(5000, path.len() as u64);
        client.upload(path, &bytes, 2000).await;
        assert_file(&tmp.path().join(&path[1..]), &bytes);
    }
    // The app itself is unchanged.
    plain(
        reqwest::Method::GET,
        server.url("/get-only.bin"),
        &[],
        vec![],
    )
    .await
    .assert_from_app(200, b"a GET route");
    plain(
        reqwest::Method::POST,
        server.url("/post-only.bin"),
        &[],
        vec![],
    )
    .await
    .assert_from_app(200, b"a POST route");
}

#[tokio::test]
async fn app_responses_and_request_bodies_are_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = BitsLayer::builder(tmp.path()).build().unwrap();
    let app = Router::new()
        .route(
            "/echo.bin",
            post(|body: axum::body::Bytes| async move {
                (
                    axum::http::StatusCode::CREATED,
                    [
                        ("x-app", "yes"),
                        ("content-type", "application/octet-stream"),
                    ],
                    body,
                )
            })
            .put(|| async { axum::http::StatusCode::NO_CONTENT }),
        )
        .layer(layer.clone());
    let server = TestServer::serve(tmp.path(), layer, app).await;
    let body = data(300_000, 3);
    let reply = plain(
        reqwest::Method::POST,
        server.url("/echo.bin"),
        &[
            ("BITS-Packet-Type", "Fragment"),
            ("Content-Range", "bytes 0-9/10"),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(reply.status, 201);
    assert!(reply.body == body, "the app's body was changed");
    assert_eq!(reply.headers.get("x-app").unwrap(), "yes");
    assert!(reply.headers.get("bits-packet-type").is_none());
    plain(reqwest::Method::PUT, server.url("/echo.bin"), &[], vec![])
        .await
        .assert_from_app(204, b"");
    // The same URL still takes uploads.
    let client = server.client();
    client.upload("/echo.bin", b"uploaded", 100).await;
    assert_file(&tmp.path().join("echo.bin"), b"uploaded");
}

#[tokio::test]
async fn other_methods_pass_through_untouched() {
    let server = TestServer::start(|b| b).await;
    // Standard methods on BITS-enabled URLs, even carrying BITS headers, reach the app.
    let bits_headers = [
        ("BITS-Packet-Type", "Create-Session"),
        ("BITS-Supported-Protocols", PROTOCOL),
    ];
    plain(
        reqwest::Method::GET,
        server.url("/hello"),
        &bits_headers,
        vec![],
    )
    .await
    .assert_from_app(200, b"hello from the app");
    plain(reqwest::Method::GET, server.url("/"), &[], vec![])
        .await
        .assert_from_app(200, b"app root");
    plain(
        reqwest::Method::POST,
        server.url("/hello"),
        &bits_headers,
        b"some body".to_vec(),
    )
    .await
    .assert_from_app(200, b"posted");
    let head = plain(reqwest::Method::HEAD, server.url("/hello"), &[], vec![]).await;
    head.assert_from_app(200, b"");
    assert_eq!(
        head.headers
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some("18"),
        "HEAD keeps the GET length of the app's body"
    );
    // A path the app does not know: the app's own 404, not an Ack.
    plain(
        reqwest::Method::GET,
        server.url("/nothing.bin"),
        &[],
        vec![],
    )
    .await
    .assert_from_app(404, b"");
    plain(
        reqwest::Method::POST,
        server.url("/nothing.bin"),
        &bits_headers,
        vec![],
    )
    .await
    .assert_from_app(404, b"");
    // Methods are case-sensitive: `bits_post` is not BITS_POST.
    let lower = reqwest::Method::from_bytes(b"bits_post").unwrap();
    let reply = plain(lower, server.url("/hello"), &bits_headers, vec![]).await;
    assert_eq!(reply.status, 405);
    assert!(reply.headers.get("bits-packet-type").is_none());
    // None of that created a session.
    assert!(parts(&server.root).is_empty());
    assert!(!server.root.join("hello").exists());
}

// ---------------------------------------------------------------------------------------------
// prefix

#[tokio::test]
async fn prefix_confines_the_layer() {
    let server = TestServer::start(|b| b.prefix("/upload")).await;
    let client = server.client();
    std::fs::create_dir(server.root.join("sub")).unwrap();

    let bytes = data(7000, 1);
    client.upload("/upload/a.bin", &bytes, 3000).await;
    assert_file(&server.root.join("a.bin"), &bytes);
    assert!(!server.root.join("upload").exists());
    client
        .upload("/upload/sub/b.bin", &bytes[..100], 3000)
        .await;
    assert_file(&server.root.join("sub/b.bin"), &bytes[..100]);

    // Below the prefix the usual path rules apply.
    client
        .create("/upload/.bits/sessions/x")
        .await
        .assert_error(403, "0x80070005");
    // (Raw bytes: the URL parser in reqwest would resolve `%2e%2e` itself.)
    let mut raw = server.raw().await;
    let response = raw
        .exchange(
            format!(
                "BITS_POST /upload/%2e%2e/escape.bin HTTP/1.1\r\nHost: x\r\n\
                 BITS-Packet-Type: Create-Session\r\nBITS-Supported-Protocols: {PROTOCOL}\r\n\
                 Content-Length: 0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(response.header("BITS-Error-Code"), Some("0x80070057"));
    assert!(!server.root.parent().unwrap().join("escape.bin").exists());

    // The prefix itself names the root folder.
    client
        .create("/upload")
        .await
        .assert_error(400, "0x80070057");
    client
        .create("/upload/")
        .await
        .assert_error(400, "0x80070057");

    // Outside the prefix BITS_POST is just another request for the app.
    let create = [
        ("BITS-Packet-Type", "Create-Session"),
        ("BITS-Supported-Protocols", PROTOCOL),
    ];
    for (path, status) in [
        ("/hello", 405),
        ("/", 405),
        ("/other.bin", 404),
        ("/uploads/a.bin", 404),
        ("/uploadx", 404),
    ] {
        plain(bits_post(), server.url(path), &create, vec![])
            .await
            .assert_from_app(status, b"");
    }
    // Standard methods below the prefix pass through too.
    plain(
        reqwest::Method::GET,
        server.url("/upload/a.bin"),
        &[],
        vec![],
    )
    .await
    .assert_from_app(404, b"");
    assert!(!server.root.join("hello").exists());
    assert!(!server.root.join("other.bin").exists());
    assert!(parts(&server.root).is_empty());
}

#[tokio::test]
async fn prefix_with_trailing_slash() {
    let server = TestServer::start(|b| b.prefix("/drop/")).await;
    let client = server.client();
    client.upload("/drop/c.bin", b"abc", 10).await;
    assert_file(&server.root.join("c.bin"), b"abc");
    plain(
        bits_post(),
        server.url("/dropped.bin"),
        &[("BITS-Packet-Type", "Ping")],
        vec![],
    )
    .await
    .assert_from_app(404, b"");
}

// ---------------------------------------------------------------------------------------------
// nested routers

#[tokio::test]
async fn layer_wrapping_a_nested_router() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("api")).unwrap();
    let layer = BitsLayer::builder(tmp.path()).build().unwrap();
    let api = Router::new()
        .route("/status", get(|| async { "api ok" }))
        .route("/items", post(|| async { "item created" }));
    let app = Router::new()
        .route("/", get(|| async { "home" }))
        .nest("/api", api)
        .layer(layer.clone());
    let server = TestServer::serve(tmp.path(), layer, app).await;
    let client = server.client();

    // The layer sees the full path: the destination keeps the /api folder.
    let bytes = data(4000, 2);
    client.upload("/api/data.bin", &bytes, 1500).await;
    assert_file(&tmp.path().join("api/data.bin"), &bytes);
    // Even a path the nested router routes for GET only.
    client.upload("/api/status", b"not a route", 100).await;
    assert_file(&tmp.path().join("api/status"), b"not a route");

    plain(reqwest::Method::GET, server.url("/api/status"), &[], vec![])
        .await
        .assert_from_app(200, b"api ok");
    plain(reqwest::Method::POST, server.url("/api/items"), &[], vec![])
        .await
        .assert_from_app(200, b"item created");
    plain(reqwest::Method::GET, server.url("/"), &[], vec![])
        .await
        .assert_from_app(200, b"home");
}

#[tokio::test]
async fn layer_inside_a_nested_service_with_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    // A router mounted with `nest_service` receives every path below its mount point, with
    // the mount point stripped: the layer's prefix is relative to it. (With `nest`, axum
    // flattens the inner routes, so a layer inside it only sees the inner routes.)
    let layer = BitsLayer::builder(tmp.path())
        .prefix("/in")
        .build()
        .unwrap();
    let files = Router::new()
        .route("/list", get(|| async { "file list" }))
        .layer(layer.clone());
    let app = Router::new()
        .route("/", get(|| async { "home" }))
        .nest_service("/files", files);
    let server = TestServer::serve(tmp.path(), layer, app).await;
    let client = server.client();

    client.upload("/files/in/report.bin", b"nested", 100).await;
    assert_file(&tmp.path().join("report.bin"), b"nested");
    plain(reqwest::Method::GET, server.url("/files/list"), &[], vec![])
        .await
        .assert_from_app(200, b"file list");
    // Outside the nested router the layer is not applied.
    plain(
        bits_post(),
        server.url("/in/report2.bin"),
        &[("BITS-Packet-Type", "Ping")],
        vec![],
    )
    .await
    .assert_from_app(404, b"");
}

#[tokio::test]
async fn one_layer_on_two_routers_shares_sessions() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = BitsLayer::builder(tmp.path()).build().unwrap();
    let app = Router::new()
        .merge(
            Router::new()
                .route("/a", get(|| async { "a" }))
                .layer(layer.clone()),
        )
        .merge(
            Router::new()
                .route("/b", get(|| async { "b" }))
                .layer(layer.clone()),
        );
    let server = TestServer::serve(tmp.path(), layer, app).await;
    let client = server.client();
    let sid = client.create_ok("/a").await;
    // The same session is known whichever clone of the layer answers.
    client.fragment("/a", &sid, 0, b"xyz", 3).await.assert_ok();
    client.close("/a", &sid).await.assert_ok();
    assert_file(&tmp.path().join("a"), b"xyz");
}

// ---------------------------------------------------------------------------------------------
// path safety over the wire

#[tokio::test]
async fn hostile_request_targets_never_leave_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(root.join("a")).unwrap();
    let server = TestServer::start_in(&root, |b| b.allow_overwrites(true)).await;
    let before_root = tree(&root);
    let before_leftovers = leftovers(&root);
    let before_outside = tree(tmp.path());

    let cases = [
        ("/../x", 400, "0x80070057"),
        ("/a/../../x", 400, "0x80070057"),
        ("/%2e%2e/x", 400, "0x80070057"),
        ("/%2E%2E%2Fx", 400, "0x80070057"),
        ("/a/%2e%2e/%2e%2e/x", 400, "0x80070057"),
        ("/.", 400, "0x80070057"),
        ("/a%5cb", 400, "0x80070057"),
        ("/a%5c..%5c..%5cx", 400, "0x80070057"),
        ("/x%00y", 400, "0x80070057"),
        ("/x%0ay", 400, "0x80070057"),
        ("/CON", 400, "0x80070057"),
        ("/con.txt", 400, "0x80070057"),
        ("/a/LPT1", 400, "0x80070057"),
        ("/c%3a%5cwindows", 400, "0x80070057"),
        ("/x.txt:stream", 400, "0x80070057"),
        ("/%ff", 400, "0x80070057"),
        ("/.bits/sessions/x", 403, "0x80070005"),
        ("/.bits/parts/x.part", 403, "0x80070005"),
        ("/.BITS/x", 403, "0x80070005"),
        ("/%2ebits/x", 403, "0x80070005"),
        ("/.bits", 403, "0x80070005"),
        // Reserved at every depth: reply URLs live at `<folder>/.bits/replies/...`.
        ("/a/.bits", 403, "0x80070005"),
        ("/a/.bits/replies/x", 403, "0x80070005"),
    ];
    let mut raw = server.raw().await;
    for (target, status, code) in cases {
        let request = format!(
            "BITS_POST {target} HTTP/1.1\r\nHost: example\r\nBITS-Packet-Type: Create-Session\r\n\
             BITS-Supported-Protocols: {PROTOCOL}\r\nContent-Length: 0\r\n\r\n"
        );
        let response = raw.exchange(request.as_bytes()).await;
        assert_eq!(response.status, status, "{target}: {response:?}");
        assert_eq!(response.header("BITS-Packet-Type"), Some("Ack"), "{target}");
        assert_eq!(response.header("BITS-Error-Code"), Some(code), "{target}");
        assert_eq!(
            response.header("BITS-Error-Context"),
            Some("0x5"),
            "{target}"
        );
        assert_eq!(response.header("Content-Length"), Some("0"), "{target}");
        assert!(response.header("BITS-Session-Id").is_none(), "{target}");
        assert!(response.body.is_empty());
    }
    assert_eq!(
        tree(&root),
        before_root,
        "something was created in the root"
    );
    assert_eq!(leftovers(&root), before_leftovers, "a session was created");
    assert_eq!(tree(tmp.path()), before_outside);

    // Harmless look-alikes are ordinary names inside the root.
    let client = BitsClient::new(server.addr);
    for (target, name) in [
        ("/%252e%252e", "%2e%2e"),
        ("/..x", "..x"),
        ("/my%20file.bin", "my file.bin"),
        ("/caf%C3%A9.txt", "caf\u{e9}.txt"),
        ("/console.txt", "console.txt"),
        ("/a/.bitsy", "a/.bitsy"),
    ] {
        client.upload(target, name.as_bytes(), 100).await;
        assert_file(&root.join(name), name.as_bytes());
    }
    let outside: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside, ["root"]);
}

#[cfg(unix)]
#[tokio::test]
async fn symlinked_folder_is_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, root.join("link")).unwrap();
    let server = TestServer::start_in(&root, |b| b).await;
    let reply = server.client().create("/link/x.bin").await;
    assert_eq!(reply.status, 403, "{reply:?}");
    reply.assert_ack();
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    assert_eq!(reply.header("BITS-Error-Code"), Some("0x80070005"));
    assert!(!elsewhere.join("x.bin").exists());
}

#[cfg(unix)]
#[tokio::test]
async fn symlinked_destination_is_replaced_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let outside = tmp.path().join("outside.txt");
    std::fs::write(&outside, b"precious").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("evil.bin")).unwrap();

    // Overwrites off: the link counts as an existing file.
    let server = TestServer::start_in(&root, |b| b).await;
    server
        .client()
        .create("/evil.bin")
        .await
        .assert_error(403, "0x80070005");
    server.stop().await;

    // Overwrites on: the link itself is replaced; its target is never written.
    let server = TestServer::start_in(&root, |b| b.allow_overwrites(true)).await;
    server.client().upload("/evil.bin", b"upload", 100).await;
    assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
    let meta = std::fs::symlink_metadata(root.join("evil.bin")).unwrap();
    assert!(meta.file_type().is_file(), "{meta:?}");
    assert_eq!(std::fs::read(root.join("evil.bin")).unwrap(), b"upload");
}
