//! Upload-reply sessions end to end (protocol reference sections 9 and 10, checklist 60-70):
//! HTTP notifications to a small application, in-process completion handlers, reply
//! downloads, completion policies, deferred commits and session hooks.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use axum_bits::completion::{
    Backoff, CompletedUpload, Completion, CompletionError, Reply as AppReply,
};
use axum_bits::hooks::{CancelReason, Event, EventKind, HookError, Hooks, Veto};
use axum_bits::session::DeferredStatus;
use axum_bits::{BitsLayer, BitsLayerBuilder, CompletionPolicy, Notification, Owner, SessionId};
use common::{
    BitsClient, Captured, PROTOCOL, RawResponse, Reply, TestServer, data, leftovers, parts,
};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// The server application

/// One notification as the application received it.
#[derive(Debug, Clone)]
struct Notified {
    method: String,
    uri: String,
    headers: http::HeaderMap,
    body: Vec<u8>,
    /// By reference: the bytes of `BITS-Request-DataFile-Name` when the request arrived.
    request_file: Option<Vec<u8>>,
}

/// How the application answers.
#[derive(Debug, Clone)]
enum Answer {
    /// 200 with these headers and body.
    Ok(Vec<(&'static str, String)>, Vec<u8>),
    /// This status with a small body.
    Status(u16),
    /// Sleeps, then 200.
    Sleep(Duration),
    /// By reference: writes these bytes to `BITS-Response-DataFile-Name`, answers 200.
    WriteResponseFile(Vec<u8>),
}

#[derive(Clone)]
struct AppState {
    seen: Arc<Mutex<Vec<Notified>>>,
    answer: Arc<Mutex<Answer>>,
}

struct App {
    addr: SocketAddr,
    state: AppState,
}

impl App {
    async fn start(answer: Answer) -> Self {
        let state = AppState {
            seen: Arc::default(),
            answer: Arc::new(Mutex::new(answer)),
        };
        let router = Router::new()
            .fallback(app_handler)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}/notify", self.addr)
    }

    fn set(&self, answer: Answer) {
        *self.state.answer.lock().unwrap() = answer;
    }

    fn seen(&self) -> Vec<Notified> {
        self.state.seen.lock().unwrap().clone()
    }
}

async fn app_handler(
    State(state): State<AppState>,
    request: axum::extract::Request,
) -> axum::response::Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap()
        .to_vec();
    let request_file = parts
        .headers
        .get("bits-request-datafile-name")
        .map(|p| std::fs::read(p.to_str().unwrap()).unwrap());
    state.seen.lock().unwrap().push(Notified {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body,
        request_file,
    });
    let answer = state.answer.lock().unwrap().clone();
    let response = http::Response::builder();
    let (response, body) = match answer {
        Answer::Ok(headers, body) => {
            let mut response = response.status(200);
            for (name, value) in headers {
                response = response.header(name, value);
            }
            (response, body)
        }
        Answer::Status(status) => (response.status(status), b"app error".to_vec()),
        Answer::Sleep(wait) => {
            tokio::time::sleep(wait).await;
            (response.status(200), b"late".to_vec())
        }
        Answer::WriteResponseFile(bytes) => {
            let path = parts.headers["bits-response-datafile-name"]
                .to_str()
                .unwrap();
            std::fs::write(path, bytes).unwrap();
            (response.status(200), Vec::new())
        }
    };
    response.body(axum::body::Body::from(body)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Sends `bytes` to `path` in three fragments; returns the session id and the final Ack.
async fn upload3(client: &BitsClient, path: &str, bytes: &[u8]) -> (String, Reply) {
    let sid = client.create_ok(path).await;
    let (total, n) = (bytes.len() as u64, bytes.len());
    let cuts = [0, n / 3, 2 * n / 3, n];
    for i in 0..2 {
        let reply = client
            .fragment(
                path,
                &sid,
                cuts[i] as u64,
                &bytes[cuts[i]..cuts[i + 1]],
                total,
            )
            .await;
        reply.assert_ok();
        assert_eq!(reply.received(), Some(cuts[i + 1] as u64), "{reply:?}");
        assert!(reply.header("BITS-Reply-URL").is_none(), "{reply:?}");
    }
    let last = resend_last(client, path, &sid, bytes).await;
    (sid, last)
}

/// (Re-)sends the last third of `bytes`: the final fragment of [`upload3`].
async fn resend_last(client: &BitsClient, path: &str, sid: &str, bytes: &[u8]) -> Reply {
    let from = 2 * bytes.len() / 3;
    client
        .fragment(path, sid, from as u64, &bytes[from..], bytes.len() as u64)
        .await
}

/// The reply URL the server derives for session `sid` uploaded into `folder` (`/a/`).
fn reply_url(server: &TestServer, folder: &str, sid: &str) -> String {
    let inner = sid.trim_start_matches('{').trim_end_matches('}');
    format!(
        "http://{}{folder}.bits/replies/%7B{inner}%7D/reply.bin",
        server.addr
    )
}

/// Asserts a successful final Ack carrying `BITS-Reply-URL`; returns the URL.
fn assert_final(reply: &Reply, total: usize) -> String {
    reply.assert_ok();
    assert_eq!(reply.received(), Some(total as u64), "{reply:?}");
    reply
        .header("BITS-Reply-URL")
        .unwrap_or_else(|| panic!("no BITS-Reply-URL: {reply:?}"))
        .to_owned()
}

/// Asserts an error Ack from the application side: context 0x7.
fn assert_app_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    reply.assert_ack();
    assert_eq!(reply.header("BITS-Error-Code"), Some(code), "{reply:?}");
    assert_eq!(reply.header("BITS-Error-Context"), Some("0x7"), "{reply:?}");
    assert!(reply.header("BITS-Reply-URL").is_none(), "{reply:?}");
}

/// A plain HTTP request (GET/HEAD of a reply URL).
async fn fetch(method: &str, url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = reqwest::Client::new().request(method.parse().unwrap(), url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    Reply {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.bytes().await.unwrap().to_vec(),
    }
}

/// Stored replies (`ROOT/.bits/replies/*.reply`).
fn replies(root: &Path) -> Vec<PathBuf> {
    leftovers(root)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "reply"))
        .collect()
}

async fn notification_server(notification: Notification) -> TestServer {
    let server = TestServer::start(|b| b.notification(notification)).await;
    std::fs::create_dir(server.root.join("orders")).unwrap();
    server
}

/// Sets the request's [`Owner`] from `X-User` (default `alice`), outside the BITS layer.
async fn owner_from_header(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let user = request
        .headers()
        .get("x-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("alice")
        .to_owned();
    request.extensions_mut().insert(Owner::new(user));
    next.run(request).await
}

/// A server whose requests all carry an owner (see [`owner_from_header`]).
async fn owner_server(
    configure: impl FnOnce(BitsLayerBuilder) -> BitsLayerBuilder,
) -> (TestServer, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let layer = configure(BitsLayer::builder(tmp.path())).build().unwrap();
    let app = Router::new()
        .route("/", get(|| async { "app" }))
        .layer(layer.clone())
        .layer(axum::middleware::from_fn(owner_from_header));
    (TestServer::serve(tmp.path(), layer, app).await, tmp)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Notifications (checklist 60-70)

#[tokio::test]
async fn by_value_notification_and_reply_download() {
    let app = App::start(Answer::Ok(Vec::new(), b"<ack order='42'/>".to_vec())).await;
    let server = notification_server(Notification::by_value(app.url())).await;
    let client = server.client();
    let bytes = data(30_001, 1);
    let path = "/orders/order.xml?acct=42";

    let (sid, last) = upload3(&client, path, &bytes).await;
    let url = assert_final(&last, bytes.len());
    assert_eq!(url, reply_url(&server, "/orders/", &sid));

    let seen = app.seen();
    assert_eq!(seen.len(), 1);
    let n = &seen[0];
    assert_eq!(n.method, "POST");
    assert_eq!(n.uri, "/notify?acct=42");
    assert_eq!(n.body, bytes);
    assert_eq!(n.headers["content-length"], "30001");
    assert_eq!(
        n.headers["bits-original-request-url"],
        server.url("/orders/order.xml?acct=42").as_str()
    );
    assert!(!n.headers.contains_key("bits-request-datafile-name"));
    assert!(!n.headers.contains_key("bits-response-datafile-name"));
    assert!(!server.root.join("orders/order.xml").exists());

    let got = fetch("GET", &url, &[]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body, b"<ack order='42'/>");
    assert_eq!(got.header("Content-Length"), Some("17"));
    assert_eq!(got.header("Accept-Ranges"), Some("bytes"));

    client.close(path, &sid).await.assert_ok();
    assert_eq!(fetch("GET", &url, &[]).await.status, 404);
    assert_eq!(fetch("HEAD", &url, &[]).await.status, 404);
    assert!(!server.root.join("orders/order.xml").exists());
    assert_eq!(parts(&server.root), Vec::<PathBuf>::new());
    assert_eq!(replies(&server.root), Vec::<PathBuf>::new());
    assert_eq!(app.seen().len(), 1);
}

#[tokio::test]
async fn by_reference_notification() {
    let app = App::start(Answer::WriteResponseFile(b"written by the app".to_vec())).await;
    let server = notification_server(Notification::by_reference(app.url())).await;
    let client = server.client();
    let bytes = data(9_000, 2);

    let (sid, last) = upload3(&client, "/orders/in.bin", &bytes).await;
    let url = assert_final(&last, bytes.len());
    assert_eq!(url, reply_url(&server, "/orders/", &sid));

    let seen = app.seen();
    assert_eq!(seen.len(), 1);
    let n = &seen[0];
    assert_eq!(n.method, "POST");
    assert_eq!(n.uri, "/notify");
    assert!(n.body.is_empty());
    assert_eq!(n.headers["content-length"], "0");
    assert_eq!(
        n.headers["bits-original-request-url"],
        server.url("/orders/in.bin").as_str()
    );
    assert_eq!(n.request_file.as_deref(), Some(&bytes[..]));
    let request_file = n.headers["bits-request-datafile-name"].to_str().unwrap();
    let response_file = n.headers["bits-response-datafile-name"].to_str().unwrap();
    assert!(Path::new(request_file).is_absolute(), "{request_file}");
    assert!(Path::new(response_file).is_absolute(), "{response_file}");
    assert_ne!(request_file, response_file);

    let got = fetch("GET", &url, &[]).await;
    assert_eq!(
        (got.status, got.body.as_slice()),
        (200, &b"written by the app"[..])
    );
    client.close("/orders/in.bin", &sid).await.assert_ok();
    assert_eq!(fetch("GET", &url, &[]).await.status, 404);
    assert!(!Path::new(request_file).exists());
    assert!(!Path::new(response_file).exists());
    assert!(!server.root.join("orders/in.bin").exists());
}

#[tokio::test]
async fn static_response_url() {
    let fixed = "https://cdn.example.com/replies/42.xml?v=1";
    let app = App::start(Answer::Ok(
        vec![("BITS-Static-Response-URL", fixed.to_owned())],
        Vec::new(),
    ))
    .await;
    let server = notification_server(Notification::by_value(app.url())).await;
    let client = server.client();
    let bytes = data(3_000, 3);

    let (sid, last) = upload3(&client, "/orders/a.bin", &bytes).await;
    assert_eq!(assert_final(&last, bytes.len()), fixed);
    // Nothing stored and nothing served for a static reply.
    assert_eq!(replies(&server.root), Vec::<PathBuf>::new());
    let derived = reply_url(&server, "/orders/", &sid);
    assert_eq!(fetch("GET", &derived, &[]).await.status, 404);
    client.close("/orders/a.bin", &sid).await.assert_ok();

    // A reply URL over 2,200 characters: E_INVALIDARG (checklist 70).
    let long = format!("https://cdn.example.com/{}", "x".repeat(2_300 - 24));
    assert_eq!(long.len(), 2_300);
    app.set(Answer::Ok(
        vec![("BITS-Static-Response-URL", long)],
        Vec::new(),
    ));
    let (_, last) = upload3(&client, "/orders/b.bin", &bytes).await;
    assert_eq!(last.status, 400, "{last:?}");
    last.assert_ack();
    assert_eq!(last.header("BITS-Error-Code"), Some("0x80070057"));
    assert_eq!(last.header("BITS-Error-Context"), Some("0x5"));
    assert!(last.header("BITS-Reply-URL").is_none());

    // Not absolute: E_INVALIDARG too.
    app.set(Answer::Ok(
        vec![("BITS-Static-Response-URL", "/relative/reply".to_owned())],
        Vec::new(),
    ));
    let (_, last) = upload3(&client, "/orders/c.bin", &bytes).await;
    assert_eq!(last.status, 400, "{last:?}");
    assert_eq!(last.header("BITS-Error-Code"), Some("0x80070057"));
}

#[tokio::test]
async fn copy_file_to_destination() {
    let app = App::start(Answer::Ok(
        vec![("BITS-Copy-File-To-Destination", "1".to_owned())],
        b"copied".to_vec(),
    ))
    .await;
    let server = notification_server(Notification::by_value(app.url())).await;
    let client = server.client();
    let bytes = data(20_000, 4);

    let (sid, last) = upload3(&client, "/orders/kept.bin", &bytes).await;
    let url = assert_final(&last, bytes.len());
    assert_eq!(
        std::fs::read(server.root.join("orders/kept.bin")).unwrap(),
        bytes
    );
    assert_eq!(fetch("GET", &url, &[]).await.body, b"copied");
    client.close("/orders/kept.bin", &sid).await.assert_ok();
    assert_eq!(
        std::fs::read(server.root.join("orders/kept.bin")).unwrap(),
        bytes
    );
    assert_eq!(parts(&server.root), Vec::<PathBuf>::new());
    assert_eq!(app.seen().len(), 1);
}

#[tokio::test]
async fn application_errors_are_relayed_and_retried() {
    let app = App::start(Answer::Status(500)).await;
    let server = notification_server(Notification::by_value(app.url())).await;
    let client = server.client();
    let bytes = data(6_000, 5);

    let (sid, last) = upload3(&client, "/orders/r.bin", &bytes).await;
    assert_app_error(&last, 500, "0x801901F4");
    assert_eq!(app.seen().len(), 1);

    app.set(Answer::Ok(Vec::new(), b"second time".to_vec()));
    let again = resend_last(&client, "/orders/r.bin", &sid, &bytes).await;
    let url = assert_final(&again, bytes.len());
    assert_eq!(url, reply_url(&server, "/orders/", &sid));
    assert_eq!(fetch("GET", &url, &[]).await.body, b"second time");
    let seen = app.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].body, bytes);

    app.set(Answer::Status(403));
    let (_, last) = upload3(&client, "/orders/f.bin", &bytes).await;
    assert_app_error(&last, 403, "0x80190193");
    assert_eq!(app.seen().len(), 3);
    assert!(!server.root.join("orders/r.bin").exists());
    assert!(!server.root.join("orders/f.bin").exists());
}

#[tokio::test]
async fn application_timeout_is_408() {
    let app = App::start(Answer::Sleep(Duration::from_secs(2))).await;
    let notification = Notification::by_value(app.url()).send_timeout(Duration::from_millis(300));
    let server = notification_server(notification).await;
    let client = server.client();
    let bytes = data(1_000, 6);

    let started = std::time::Instant::now();
    let (_, last) = upload3(&client, "/orders/slow.bin", &bytes).await;
    assert_app_error(&last, 408, "0x800705B4");
    assert!(started.elapsed() < Duration::from_millis(1_800));
    assert_eq!(app.seen().len(), 1);
}

#[tokio::test]
async fn repeated_final_fragment_does_not_notify_again() {
    let app = App::start(Answer::Ok(Vec::new(), b"once".to_vec())).await;
    let server = notification_server(Notification::by_value(app.url())).await;
    let client = server.client();
    let bytes = data(4_000, 7);

    let (sid, last) = upload3(&client, "/orders/once.bin", &bytes).await;
    let url = assert_final(&last, bytes.len());
    app.set(Answer::Ok(Vec::new(), b"twice".to_vec()));
    for _ in 0..2 {
        let again = resend_last(&client, "/orders/once.bin", &sid, &bytes).await;
        assert_eq!(assert_final(&again, bytes.len()), url);
    }
    assert_eq!(app.seen().len(), 1);
    assert_eq!(fetch("GET", &url, &[]).await.body, b"once");
}

#[tokio::test]
async fn unreachable_application() {
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let url = format!("http://{closed}/notify");
    let bytes = data(2_000, 8);

    let server = notification_server(Notification::by_value(url.clone())).await;
    let (sid, last) = upload3(&server.client(), "/orders/u.bin", &bytes).await;
    assert_app_error(&last, 503, "0x801901F7");
    // Still complete and un-notified: a re-send gets the same answer.
    let again = resend_last(&server.client(), "/orders/u.bin", &sid, &bytes).await;
    assert_app_error(&again, 503, "0x801901F7");

    let server = TestServer::start(|b| {
        b.notification(Notification::by_value(url))
            .completion_policy(CompletionPolicy::Reject)
    })
    .await;
    let (_, last) = upload3(&server.client(), "/u.bin", &bytes).await;
    assert_app_error(&last, 403, "0x80070005");
}

/// One upload over a raw connection with exactly this request target and `Host` header
/// (Create-Session, one Fragment, Close-Session); returns the final Fragment's Ack.
async fn raw_upload(server: &TestServer, target: &str, host: &str, bytes: &[u8]) -> RawResponse {
    let mut conn = server.raw().await;
    let create = conn
        .exchange(
            format!(
                "BITS_POST {target} HTTP/1.1\r\nHost: {host}\r\n\
                 BITS-Packet-Type: Create-Session\r\nBITS-Supported-Protocols: {PROTOCOL}\r\n\
                 Content-Length: 0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
    assert_eq!(create.status, 200, "{target} / {host}: {create:?}");
    let sid = create.header("BITS-Session-Id").unwrap().to_owned();
    let mut fragment = format!(
        "BITS_POST {target} HTTP/1.1\r\nHost: {host}\r\nBITS-Packet-Type: Fragment\r\n\
         BITS-Session-Id: {sid}\r\nContent-Range: bytes 0-{}/{}\r\nContent-Length: {}\r\n\r\n",
        bytes.len() - 1,
        bytes.len(),
        bytes.len()
    )
    .into_bytes();
    fragment.extend_from_slice(bytes);
    let last = conn.exchange(&fragment).await;
    conn.exchange(
        format!(
            "BITS_POST {target} HTTP/1.1\r\nHost: {host}\r\nBITS-Packet-Type: Close-Session\r\n\
             BITS-Session-Id: {sid}\r\nContent-Length: 0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    last
}

/// Server-side request forgery: where the server connects never depends on what a client
/// sends. A stand-in internal service on another port records every request and answers like
/// an application (a reply of its own, a copy to the destination). Whatever `Host` header,
/// absolute-form target or query the client sends, it receives nothing, and the application
/// the operator configured receives every notification, by value and by reference, at the path
/// the operator gave, with only the query the client's.
#[tokio::test]
async fn notifications_go_only_where_the_operator_says() {
    let internal = App::start(Answer::Ok(
        vec![
            ("BITS-Copy-File-To-Destination", "true".to_owned()),
            (
                "BITS-Static-Response-URL",
                "http://internal.example/secret".to_owned(),
            ),
        ],
        b"internal secret".to_vec(),
    ))
    .await;
    let app = App::start(Answer::Ok(Vec::new(), b"the real reply".to_vec())).await;
    let inside = internal.addr.to_string();
    // Relative URLs resolve against `public_origin`: in production the front end that routes
    // `/notify` to the application; here the application itself stands in for it.
    let origin = format!("http://{}", app.addr);
    type Configure = Box<dyn Fn(BitsLayerBuilder) -> BitsLayerBuilder>;
    // (what the operator configured, the query of the configured URL, how)
    let configs: Vec<(&str, &str, Configure)> = vec![
        (
            "relative, no origin",
            "",
            Box::new(|b| b.notification(Notification::by_value("/notify"))),
        ),
        (
            "by value, relative to public_origin",
            "",
            Box::new({
                let origin = origin.clone();
                move |b| {
                    b.public_origin(origin.clone())
                        .notification(Notification::by_value("/notify"))
                }
            }),
        ),
        (
            "by reference, relative to public_origin without a slash",
            "",
            Box::new({
                let origin = origin.clone();
                move |b| {
                    b.public_origin(origin.clone())
                        .notification(Notification::by_reference("notify"))
                }
            }),
        ),
        (
            "by reference, absolute",
            "",
            Box::new({
                let url = app.url();
                move |b| b.notification(Notification::by_reference(url.clone()))
            }),
        ),
        (
            "by value, absolute with a query of its own",
            "mode=x",
            Box::new({
                let url = format!("{}?mode=x", app.url());
                move |b| b.notification(Notification::by_value(url.clone()))
            }),
        ),
    ];
    let bytes = data(3_000, 14);
    for (config, own_query, configure) in configs {
        let tmp = tempfile::tempdir().unwrap();
        if let Err(error) = configure(BitsLayer::builder(tmp.path())).build() {
            // Refusing the configuration is as good as never connecting where a client says.
            assert!(
                error.to_string().contains("public_origin"),
                "{config}: {error}"
            );
            continue;
        }
        let server = TestServer::start(&configure).await;
        std::fs::create_dir(server.root.join("orders")).unwrap();
        let own = server.addr.to_string();
        // What the client sends (request target, `Host`) and the query the application must
        // see: only the query is the client's, and it stays a query.
        let attack = |target: &str, host: &str, query: &str| {
            (target.to_owned(), host.to_owned(), query.to_owned())
        };
        let attacks = [
            attack("/orders/a.bin?acct=42", &own, "acct=42"),
            attack("/orders/a.bin?acct=42", &inside, "acct=42"),
            attack("/orders/a.bin", &format!("app@{inside}"), ""),
            attack(
                &format!("http://{inside}/orders/a.bin?acct=42"),
                &own,
                "acct=42",
            ),
            attack(&format!("http://{inside}/orders/a.bin"), &inside, ""),
            attack(&format!("http://app@{inside}/orders/a.bin"), &own, ""),
            attack(
                &format!("/orders/a.bin?@{inside}/x"),
                &own,
                &format!("@{inside}/x"),
            ),
            attack(
                &format!("/orders/a.bin??//{inside}/x"),
                &own,
                &format!("?//{inside}/x"),
            ),
            attack(&format!("/orders/a.bin?a=1#@{inside}/x"), &own, "a=1"),
            attack(
                &format!("/orders/a.bin?u=http://{inside}/x&b=2"),
                &own,
                &format!("u=http://{inside}/x&b=2"),
            ),
            attack(
                "/orders/a.bin?%2F%2Finternal%3A1%2F%0D%0AHost:%20internal",
                &own,
                "%2F%2Finternal%3A1%2F%0D%0AHost:%20internal",
            ),
        ];
        let before = app.seen().len();
        let mut acks = Vec::new();
        for (target, host, _) in &attacks {
            acks.push(raw_upload(&server, target, host, &bytes).await);
        }

        let forged: Vec<_> = internal
            .seen()
            .iter()
            .map(|n| format!("{} {} {:?}", n.method, n.uri, n.headers))
            .collect();
        assert!(
            forged.is_empty(),
            "{config}: the internal service received {forged:#?}"
        );
        let seen = app.seen();
        assert_eq!(seen.len() - before, attacks.len(), "{config}");
        for ((target, host, query), (ack, n)) in
            attacks.iter().zip(acks.iter().zip(&seen[before..]))
        {
            let what = format!("{config}: {target} with Host {host}");
            assert_eq!(ack.status, 200, "{what}: {ack:?}");
            let reply_url = ack.header("BITS-Reply-URL").unwrap_or_default();
            assert!(reply_url.contains("/.bits/replies/"), "{what}: {ack:?}");
            let query: Vec<&str> = [own_query, query.as_str()]
                .into_iter()
                .filter(|q| !q.is_empty())
                .collect();
            let expected = match query.join("&") {
                q if q.is_empty() => "/notify".to_owned(),
                q => format!("/notify?{q}"),
            };
            assert_eq!(n.uri, expected, "{what}");
            match &n.request_file {
                Some(file) => assert_eq!(file, &bytes, "{what}"),
                None => assert_eq!(n.body, bytes, "{what}"),
            }
        }
        assert!(!server.root.join("orders/a.bin").exists(), "{config}");
    }
}

// ---------------------------------------------------------------------------------------------
// Reply downloads and in-process handlers

#[tokio::test]
async fn reply_download_ranges_and_owner() {
    let reply = data(100, 9);
    let body = reply.clone();
    let (server, _tmp) = owner_server(move |b| {
        b.upload_reply_handler(move |_upload: CompletedUpload| {
            let body = body.clone();
            async move { Ok::<_, CompletionError>(Completion::reply(AppReply::Bytes(body.into()))) }
        })
    })
    .await;
    let client = server.client();
    let (sid, last) = upload3(&client, "/r.bin", &data(5_000, 10)).await;
    let url = assert_final(&last, 5_000);
    assert_eq!(url, reply_url(&server, "/", &sid));

    let full = fetch("GET", &url, &[]).await;
    assert_eq!(full.status, 200, "{full:?}");
    assert_eq!(full.body, reply);
    assert_eq!(full.header("Content-Length"), Some("100"));
    assert_eq!(full.header("Accept-Ranges"), Some("bytes"));
    assert!(full.header("Last-Modified").is_some(), "{full:?}");
    let etag = full.header("ETag").expect("ETag").to_owned();

    let part = fetch("GET", &url, &[("Range", "bytes=0-9")]).await;
    assert_eq!(part.status, 206, "{part:?}");
    assert_eq!(part.header("Content-Range"), Some("bytes 0-9/100"));
    assert_eq!(part.body, &reply[..10]);

    let head = fetch("HEAD", &url, &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("Content-Length"), Some("100"));
    assert!(head.body.is_empty());

    let beyond = fetch("GET", &url, &[("Range", "bytes=200-300")]).await;
    assert_eq!(beyond.status, 416, "{beyond:?}");
    assert_eq!(beyond.header("Content-Range"), Some("bytes */100"));

    let same = [("Range", "bytes=90-99"), ("If-Range", etag.as_str())];
    let part = fetch("GET", &url, &same).await;
    assert_eq!((part.status, part.body.as_slice()), (206, &reply[90..]));
    let stale = [("Range", "bytes=90-99"), ("If-Range", "\"other\"")];
    let whole = fetch("GET", &url, &stale).await;
    assert_eq!((whole.status, whole.body.len()), (200, 100));

    let other = fetch("GET", &url, &[("X-User", "bob")]).await;
    assert_eq!((other.status, other.body.len()), (404, 0));
    assert_eq!(fetch("HEAD", &url, &[("X-User", "bob")]).await.status, 404);

    client.cancel("/r.bin", &sid).await.assert_ok();
    assert_eq!(fetch("GET", &url, &[]).await.status, 404);
    assert_eq!(replies(&server.root), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn in_process_handler_hashes_the_upload() {
    let seen: Arc<Mutex<Vec<CompletedUpload>>> = Arc::default();
    let log = seen.clone();
    let (server, _tmp) = owner_server(move |b| {
        b.upload_reply_handler(move |upload: CompletedUpload| {
            let log = log.clone();
            async move {
                let staged = tokio::fs::read(&upload.staged_path).await.unwrap();
                let digest = hex(&Sha256::digest(&staged));
                log.lock().unwrap().push(upload);
                Ok::<_, CompletionError>(Completion::reply(AppReply::Bytes(digest.into())))
            }
        })
    })
    .await;
    let client = server.client();
    let bytes = data(70_000, 11);
    let (sid, last) = upload3(&client, "/sums.bin?x=1", &bytes).await;
    let url = assert_final(&last, bytes.len());

    let expected = hex(&Sha256::digest(&bytes));
    assert_eq!(expected.len(), 64);
    assert_eq!(fetch("GET", &url, &[]).await.body, expected.as_bytes());

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let upload = &seen[0];
    assert_eq!(upload.session_id.to_string(), sid);
    assert_eq!(upload.size, 70_000);
    assert_eq!(upload.url, server.url("/sums.bin?x=1"));
    assert_eq!(upload.destination, "sums.bin");
    assert_eq!(upload.owner, Some(Owner::new("alice")));
    client.close("/sums.bin?x=1", &sid).await.assert_ok();
    assert!(!upload.staged_path.exists());
    assert!(!server.root.join("sums.bin").exists());
}

// ---------------------------------------------------------------------------------------------
// Hooks

#[derive(Clone, Default)]
struct Recorder {
    created: Arc<Mutex<Vec<Event>>>,
    events: Arc<Mutex<Vec<Event>>>,
    failed: Arc<Mutex<Vec<String>>>,
    down: Arc<AtomicBool>,
}

impl Hooks for Recorder {
    async fn on_create(&self, event: &Event) -> Result<(), Veto> {
        if event.destination.starts_with("secret") {
            return Err(Veto::forbidden());
        }
        self.created.lock().unwrap().push(event.clone());
        Ok(())
    }

    async fn on_event(&self, event: &Event) -> Result<(), HookError> {
        if self.down.load(Ordering::SeqCst) {
            self.failed.lock().unwrap().push(event.key.clone());
            return Err(HookError::new("down"));
        }
        self.events.lock().unwrap().push(event.clone());
        Ok(())
    }
}

impl Recorder {
    fn kinds(&self) -> Vec<EventKind> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.kind.clone())
            .collect()
    }
    fn keys(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.key.clone())
            .collect()
    }
}

#[tokio::test]
async fn hooks_see_progress_completion_and_cancel() {
    let hooks = Recorder::default();
    let server = TestServer::start(|b| b.hooks(hooks.clone())).await;
    let client = server.client();
    let bytes = data(9_000, 12);

    let (sid, last) = upload3(&client, "/plain.bin", &bytes).await;
    last.assert_ok();
    assert!(last.header("BITS-Reply-URL").is_none(), "{last:?}");
    client.close("/plain.bin", &sid).await.assert_ok();
    assert_eq!(std::fs::read(server.root.join("plain.bin")).unwrap(), bytes);

    let progress = |received| EventKind::Progress {
        received,
        total: 9_000,
    };
    assert_eq!(
        hooks.kinds(),
        [
            progress(3_000),
            progress(6_000),
            progress(9_000),
            EventKind::Completed {
                size: 9_000,
                committed: true
            },
        ]
    );
    let keys = hooks.keys();
    assert_eq!(keys[3], format!("{sid}/completed"));
    let mut unique = keys.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), keys.len(), "{keys:?}");
    let created = hooks.created.lock().unwrap().clone();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].kind, EventKind::Created);
    assert_eq!(created[0].session_id.to_string(), sid);
    assert!(
        hooks
            .events
            .lock()
            .unwrap()
            .iter()
            .all(|e| e.destination == "plain.bin")
    );

    let other = client.create_ok("/other.bin").await;
    client.cancel("/other.bin", &other).await.assert_ok();
    let events = hooks.events.lock().unwrap().clone();
    assert_eq!(events.len(), 5);
    assert_eq!(events[4].key, format!("{other}/cancelled"));
    assert_eq!(
        events[4].kind,
        EventKind::Cancelled {
            reason: CancelReason::CancelSession
        }
    );
}

#[tokio::test]
async fn hooks_veto_sessions() {
    let hooks = Recorder::default();
    let server = TestServer::start(|b| b.hooks(hooks.clone())).await;
    let reply = server.client().create("/secret-plans.bin").await;
    reply.assert_error(403, "0x80070005");
    assert!(reply.header("BITS-Session-Id").is_none(), "{reply:?}");
    assert_eq!(leftovers(&server.root), Vec::<PathBuf>::new());
    assert!(hooks.created.lock().unwrap().is_empty());
    assert!(hooks.events.lock().unwrap().is_empty());
    server.client().create_ok("/public.bin").await;
}

#[tokio::test]
async fn failed_event_deliveries_are_repeated_by_the_sweeper() {
    let hooks = Recorder::default();
    hooks.down.store(true, Ordering::SeqCst);
    let server = TestServer::start(|b| b.hooks(hooks.clone())).await;
    let client = server.client();
    let bytes = data(3_000, 13);

    let sid = client.upload("/late.bin", &bytes, 1_000).await;
    assert_eq!(std::fs::read(server.root.join("late.bin")).unwrap(), bytes);
    let failed = hooks.failed.lock().unwrap().clone();
    assert!(
        failed.contains(&format!("{sid}/progress/3000")),
        "{failed:?}"
    );
    assert!(hooks.events.lock().unwrap().is_empty());

    hooks.down.store(false, Ordering::SeqCst);
    server.layer.sweeper().sweep().await.unwrap();
    // Undelivered progress coalesces to the latest offset; the keys are the ones offered before.
    assert_eq!(
        hooks.keys(),
        [format!("{sid}/progress/3000"), format!("{sid}/completed")]
    );
    assert_eq!(
        hooks.kinds()[1],
        EventKind::Completed {
            size: 3_000,
            committed: true
        }
    );
    // Delivered events are forgotten.
    server.layer.sweeper().sweep().await.unwrap();
    assert_eq!(hooks.keys().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Deferred commits

#[tokio::test]
async fn deferred_commit_finishes_in_the_background() {
    let policy = CompletionPolicy::Defer(Backoff::new(
        Duration::from_millis(100),
        Duration::from_millis(200),
        50,
    ));
    let server = TestServer::start(|b| b.completion_policy(policy)).await;
    let client = server.client();
    let deferred = server.layer.deferred();
    let (a, b) = (data(6_000, 14), data(3_000, 15));

    let sid_a = client.create_ok("/busy.bin").await;
    client
        .fragment("/busy.bin", &sid_a, 0, &a[..3_000], 6_000)
        .await
        .assert_ok();
    std::fs::write(server.root.join("busy.bin"), b"someone else").unwrap();
    let last = client
        .fragment("/busy.bin", &sid_a, 3_000, &a[3_000..], 6_000)
        .await;
    last.assert_ok();
    assert_eq!(last.received(), Some(6_000));
    client.close("/busy.bin", &sid_a).await.assert_ok();

    let sid_b = client.create_ok("/taken.bin").await;
    std::fs::write(server.root.join("taken.bin"), b"keep me").unwrap();
    client
        .fragment("/taken.bin", &sid_b, 0, &b, 3_000)
        .await
        .assert_ok();
    client.close("/taken.bin", &sid_b).await.assert_ok();

    let id_a = SessionId::parse(&sid_a).unwrap();
    let id_b = SessionId::parse(&sid_b).unwrap();
    let mut list = deferred.list().await.unwrap();
    list.sort_by_key(|d| d.destination.clone());
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(
        (list[0].id, list[0].destination.as_str()),
        (id_a, "busy.bin")
    );
    assert_eq!(
        (list[1].id, list[1].destination.as_str()),
        (id_b, "taken.bin")
    );
    assert!(
        list.iter().all(|d| d.status == DeferredStatus::Pending),
        "{list:?}"
    );
    assert_eq!((list[0].size, list[0].attempts), (6_000, 1));
    assert_eq!(parts(&server.root).len(), 2);
    assert_eq!(
        std::fs::read(server.root.join("busy.bin")).unwrap(),
        b"someone else"
    );

    std::fs::remove_file(server.root.join("busy.bin")).unwrap();
    let sweeper = tokio::spawn(server.layer.sweeper().run());
    let done = tokio::time::timeout(Duration::from_secs(3), deferred.wait(id_a))
        .await
        .expect("deferred commit within 3 s")
        .unwrap();
    assert_eq!(done, Some(DeferredStatus::Completed));
    assert_eq!(std::fs::read(server.root.join("busy.bin")).unwrap(), a);

    assert!(deferred.cancel(id_b).await.unwrap());
    let b_state = deferred.get(id_b).await.unwrap().unwrap();
    assert_eq!(b_state.status, DeferredStatus::Cancelled);
    assert!(!deferred.cancel(id_b).await.unwrap());
    assert_eq!(
        std::fs::read(server.root.join("taken.bin")).unwrap(),
        b"keep me"
    );
    assert_eq!(parts(&server.root), Vec::<PathBuf>::new());
    sweeper.abort();
}

// ---------------------------------------------------------------------------------------------
// Being told about finished plain uploads (issue 15 B.1)

/// Hooks that count the events they see.
#[derive(Clone, Default)]
struct Counting(Arc<Mutex<Vec<String>>>);

impl Hooks for Counting {
    async fn on_event(&self, event: &Event) -> Result<(), HookError> {
        self.0.lock().unwrap().push(event.key.clone());
        Ok(())
    }
}

#[tokio::test]
async fn on_upload_committed_reports_a_plain_upload_with_its_file_in_place() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let hooks = Counting::default();
    let server = TestServer::start({
        let hooks = hooks.clone();
        move |b| {
            b.hooks(hooks).create_directories(true).on_upload_committed(
                move |upload: axum_bits::hooks::CommittedUpload| {
                    let tx = tx.clone();
                    async move {
                        // The file is at its destination, whole, when the callback runs.
                        let on_disk = std::fs::read(&upload.path).ok();
                        let _ = tx.send((upload, on_disk));
                    }
                },
            )
        }
    })
    .await;
    let client = server.client();
    let bytes = data(30_000, 9);
    let (sid, last) = upload3(&client, "/inbox/plain.bin", &bytes).await;
    last.assert_ok();
    client.close("/inbox/plain.bin", &sid).await.assert_ok();

    let (upload, on_disk) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the callback runs")
        .expect("a report");
    assert_eq!(upload.destination, "inbox/plain.bin");
    assert_eq!(upload.path, server.root.join("inbox/plain.bin"));
    assert_eq!(upload.size, bytes.len() as u64);
    assert_eq!(upload.session_id.to_string(), sid);
    assert_eq!(on_disk.as_deref(), Some(&bytes[..]));
    assert_eq!(
        std::fs::read(server.root.join("inbox/plain.bin")).unwrap(),
        bytes
    );
    assert!(rx.try_recv().is_err(), "reported once");
    // The application's own hooks still hear every event beside the callback.
    let keys = hooks.0.lock().unwrap().clone();
    assert!(keys.iter().any(|k| k.ends_with("/completed")), "{keys:?}");
}

#[tokio::test]
async fn an_upload_the_upload_reply_handler_neither_copies_nor_answers_is_a_warning() {
    let logs = Captured::default();
    // The test runtime is single-threaded: the server's tasks log on this thread.
    let _guard = logs.install("warn");
    let server = TestServer::start(|b| {
        b.upload_reply_handler(|upload: CompletedUpload| async move {
            if upload.destination.ends_with("answered.bin") {
                Ok::<_, CompletionError>(Completion::reply(AppReply::Bytes("ok".into())))
            } else {
                Ok(Completion::reply(AppReply::None))
            }
        })
    })
    .await;
    let client = server.client();
    let bytes = data(9_000, 2);

    let (_, last) = upload3(&client, "/drop/answered.bin", &bytes).await;
    last.assert_ok();
    let quiet = logs.text();
    assert!(!quiet.contains("neither copied"), "{quiet}");

    let (_, last) = upload3(&client, "/drop/silent.bin", &bytes).await;
    last.assert_ok();
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("neither copied"))
        .unwrap_or_else(|| panic!("no warning in {text:?}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("drop/silent.bin"), "{line}");
    assert!(!server.root.join("drop/silent.bin").exists());
}
