//! The admin API, its JSON router and status page, and the health routes, over real sockets:
//! listing with filters and a cursor, one session's details, cancelling (its data deleted, the
//! client told the session is gone), a sweep on demand, the recently ended list, a page that
//! shows client-controlled names as text, readiness that turns 503 while draining, disabled or
//! short of space, and a farm whose every node lists every session.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum_bits::admin::{SessionQuery, SessionState};
use axum_bits::health::{self, ReadinessCheck};
use axum_bits::store::MemoryStore;
use axum_bits::{BitsLayer, SessionId};
use common::{TestServer, data, fragment_head, parts};
use serde_json::Value;

/// A server with the admin router under `/admin` and the health routes, owners from `x-user`.
async fn admin_server(
    configure: impl FnOnce(axum_bits::BitsLayerBuilder) -> axum_bits::BitsLayerBuilder,
) -> (TestServer, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let layer = configure(BitsLayer::builder(tmp.path())).build().unwrap();
    let server = serve(tmp.path(), layer).await;
    (server, tmp)
}

async fn serve(root: &std::path::Path, layer: BitsLayer) -> TestServer {
    let app = Router::new()
        .nest("/admin", axum_bits::admin::router(layer.handle()))
        .merge(health::routes(layer.handle()))
        .layer(layer.clone())
        .layer(axum::middleware::from_fn(common::owner_from_header));
    TestServer::serve(root, layer, app).await
}

async fn get(server: &TestServer, path: &str) -> (u16, String) {
    let response = reqwest::get(server.url(path)).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn get_json(server: &TestServer, path: &str) -> (u16, Value) {
    let (status, body) = get(server, path).await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

async fn send(server: &TestServer, method: reqwest::Method, path: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .request(method, server.url(path))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// Creates a session as `user` (or anonymously) and sends `first` bytes of a `total`-byte file.
async fn start_upload(
    server: &TestServer,
    path: &str,
    user: Option<&str>,
    first: usize,
    total: usize,
) -> String {
    let client = reqwest::Client::new();
    let mut request = client
        .request(common::bits_post(), server.url(path))
        .header("BITS-Packet-Type", "Create-Session")
        .header("BITS-Supported-Protocols", common::PROTOCOL);
    if let Some(user) = user {
        request = request.header("x-user", user);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let sid = response.headers()["bits-session-id"]
        .to_str()
        .unwrap()
        .to_owned();
    if first > 0 {
        let mut request = client
            .request(common::bits_post(), server.url(path))
            .header("BITS-Packet-Type", "Fragment")
            .header("BITS-Session-Id", &sid)
            .header("Content-Range", format!("bytes 0-{}/{total}", first - 1))
            .body(data(first, 1));
        if let Some(user) = user {
            request = request.header("x-user", user);
        }
        assert_eq!(request.send().await.unwrap().status(), 200);
    }
    sid
}

fn ids(page: &Value) -> Vec<String> {
    page["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn sessions_are_listed_filtered_paged_and_detailed() {
    let (server, _tmp) = admin_server(|b| b.host_id("node-a").create_directories(true)).await;
    let a = start_upload(&server, "/dir/a.bin", Some("alice"), 100, 1000).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let b = start_upload(&server, "/dir/b.bin", Some("bob"), 0, 0).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let c = start_upload(&server, "/c.bin", None, 1000, 1000).await;

    let (status, all) = get_json(&server, "/admin/sessions").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(ids(&all), [a.as_str(), b.as_str(), c.as_str()]);
    assert!(all["next"].is_null());

    let (_, page) = get_json(&server, "/admin/sessions?owner=alice").await;
    assert_eq!(ids(&page), [a.as_str()]);
    let (_, page) = get_json(&server, "/admin/sessions?destination_prefix=dir%2F").await;
    assert_eq!(ids(&page), [a.as_str(), b.as_str()]);
    let (_, page) = get_json(&server, "/admin/sessions?state=complete").await;
    assert_eq!(ids(&page), [c.as_str()]);
    let (_, page) = get_json(&server, "/admin/sessions?idle_longer_than=3600").await;
    assert!(ids(&page).is_empty());

    // Two pages of two.
    let (_, first) = get_json(&server, "/admin/sessions?limit=2").await;
    assert_eq!(ids(&first), [a.as_str(), b.as_str()]);
    let cursor = first["next"].as_str().expect("a next page");
    let (_, second) = get_json(&server, &format!("/admin/sessions?limit=2&cursor={cursor}")).await;
    assert_eq!(ids(&second), [c.as_str()]);
    assert!(second["next"].is_null());

    let (status, bad) = get_json(&server, "/admin/sessions?state=bogus").await;
    assert_eq!(status, 400, "{bad}");

    let (status, one) = get_json(&server, &format!("/admin/sessions/{a}")).await;
    assert_eq!(status, 200);
    assert_eq!(one["destination"], "dir/a.bin");
    assert_eq!(one["owner"], "alice");
    assert_eq!(one["state"], "receiving");
    assert_eq!(one["received"], 100);
    assert_eq!(one["total"], 1000);
    assert_eq!(one["staged_bytes"], 100);
    assert_eq!(one["node"], "node-a");
    assert!(one["expires_ms"].as_u64().unwrap() > one["last_activity_ms"].as_u64().unwrap());
    let (status, _) = get_json(&server, &format!("/admin/sessions/{}", SessionId::new())).await;
    assert_eq!(status, 404);

    // The same through the Rust API.
    let handle = server.layer.handle();
    let page = handle
        .sessions(&SessionQuery::new().state(SessionState::Receiving))
        .await
        .unwrap();
    assert_eq!(page.sessions.len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn an_operator_cancels_a_session_and_its_data_goes() {
    let (server, tmp) = admin_server(|b| b).await;
    let sid = start_upload(&server, "/a.bin", None, 500, 1000).await;
    assert_eq!(parts(tmp.path()).len(), 1);

    let (status, body) = send(
        &server,
        reqwest::Method::DELETE,
        &format!("/admin/sessions/{sid}"),
    )
    .await;
    assert_eq!(
        (status, &body["cancelled"]),
        (200, &Value::Bool(true)),
        "{body}"
    );
    assert!(parts(tmp.path()).is_empty(), "{:?}", parts(tmp.path()));
    // Again: nothing open by that id.
    let (status, _) = send(
        &server,
        reqwest::Method::POST,
        &format!("/admin/sessions/{sid}/cancel"),
    )
    .await;
    assert_eq!(status, 404);

    // The client is told its session is gone.
    let client = server.client();
    client
        .fragment("/a.bin", &sid, 500, &data(500, 2), 1000)
        .await
        .assert_error(500, "0x8020001F");
    assert!(!tmp.path().join("a.bin").exists());

    let (_, recent) = get_json(&server, "/admin/recent").await;
    assert_eq!(recent[0]["id"], sid.as_str());
    assert_eq!(recent[0]["reason"], "admin");
    let (_, one) = get_json(&server, &format!("/admin/sessions/{sid}")).await;
    assert_eq!(one["state"], "cancelled");
    server.stop().await;
}

#[tokio::test]
async fn a_sweep_on_demand_expires_idle_sessions() {
    let (server, tmp) = admin_server(|b| b.session_timeout(Duration::from_millis(300))).await;
    let sid = start_upload(&server, "/idle.bin", None, 10, 100).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, report) = send(&server, reqwest::Method::POST, "/admin/sweep").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["expired"], 1, "{report}");
    assert!(parts(tmp.path()).is_empty());
    let recent = server.layer.handle().recently_ended();
    assert_eq!(recent[0].id.to_string(), sid);
    assert_eq!(recent[0].reason.as_str(), "expired");
    server.stop().await;
}

#[tokio::test]
async fn the_status_page_shows_client_names_as_text() {
    let (server, _tmp) = admin_server(|b| b).await;
    // A name and an owner made to be markup (`<`, `>` and `"` are not allowed in file names,
    // as on Windows; `&` and `'` are, and the owner name is the authentication layer's).
    let path = "/a%26lt%3B%27b.bin";
    let sid = start_upload(&server, path, Some("<b onmouseover=x>eve</b>"), 250, 1000).await;
    let response = reqwest::get(server.url("/admin")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/html; charset=utf-8"
    );
    assert!(
        response.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    let html = response.text().await.unwrap();
    assert!(html.contains(&sid), "{html}");
    assert!(html.contains("a&amp;lt;&#39;b.bin"), "{html}");
    assert!(
        html.contains("&lt;b onmouseover=x&gt;eve&lt;/b&gt;"),
        "{html}"
    );
    assert!(!html.contains("<script"), "{html}");
    assert!(!html.contains("<b onmouseover"), "{html}");
    assert!(html.contains("value=\"25\""), "{html}");
    server.stop().await;
}

#[tokio::test]
async fn readiness_follows_draining_disabling_and_free_space() {
    let (server, _tmp) = admin_server(|b| b).await;
    let handle = server.layer.handle();
    let (status, body) = get(&server, "/livez").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, ready) = get_json(&server, "/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["ready"], true);

    let too_much = ReadinessCheck::default().min_free_space(u64::MAX);
    let readiness = handle.readiness(&too_much).await;
    assert!(!readiness.ready);
    assert!(
        readiness.checks[2].detail.contains("below"),
        "{readiness:?}"
    );

    handle.disable_uploads().await.unwrap();
    let (status, ready) = get_json(&server, "/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["checks"][0]["detail"], "uploads disabled");
    assert!(handle.enable_uploads());

    // A fragment in flight keeps the shutdown draining: readiness says 503 meanwhile, while
    // liveness still says the layer answers.
    let sid = server.client().create_ok("/slow.bin").await;
    let mut raw = server.raw().await;
    raw.write(&fragment_head("/slow.bin", &sid, 0, 1000, 1000))
        .await;
    raw.write(&data(10, 3)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let draining = tokio::spawn(handle.shutdown(Duration::from_secs(30)));
    let (status, ready) = get_json(&server, "/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["checks"][0]["detail"], "shutting down: draining");
    assert_eq!(get(&server, "/livez").await.0, 200);
    raw.write(&data(990, 4)).await;
    let ack = raw.read_response().await.expect("the fragment's Ack");
    assert_eq!(ack.status, 200);
    draining.await.unwrap();
    assert!(!handle.is_live());
    assert_eq!(get(&server, "/livez").await.0, 503);
    server.stop().await;
}

#[tokio::test]
async fn every_node_of_a_farm_lists_every_session() {
    let store = Arc::new(MemoryStore::new());
    let root = tempfile::tempdir().unwrap();
    let node = |host: &str| {
        BitsLayer::builder(root.path())
            .store(store.clone())
            .host_id(host)
            .build()
            .unwrap()
    };
    let a = serve(root.path(), node("node-a")).await;
    let b = serve(root.path(), node("node-b")).await;
    let sid = start_upload(&a, "/farm.bin", None, 100, 300).await;
    let (_, page) = get_json(&b, "/admin/sessions").await;
    assert_eq!(ids(&page), [sid.as_str()]);
    assert_eq!(page["sessions"][0]["node"], "node-a");
    // The next fragment goes to the other node, which then names itself.
    b.client()
        .fragment("/farm.bin", &sid, 100, &data(100, 5), 300)
        .await
        .assert_ok();
    let (_, one) = get_json(&a, &format!("/admin/sessions/{sid}")).await;
    assert_eq!(one["node"], "node-b");
    assert_eq!(one["received"], 200);
    a.stop().await;
    b.stop().await;
}
