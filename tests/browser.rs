//! The admin status page in a real browser: headless Chromium loads `/admin` while an upload
//! is paused half-way, and the test reads the DOM Chromium built from it. (`Router::nest`
//! serves the page at `/admin`; `/admin/` is a 404.)
//!
//! Chromium is `AXUM_BITS_CHROMIUM` if set, else `chromium` or `chromium-browser` on `PATH`.
//! Without it the test is skipped (a line on stderr says so), except with `CI=true`, where it
//! fails: `.ci/run` installs Chromium before the tests.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use axum::Router;
use common::{BitsClient, TestServer, data, owner_from_header};

/// How long Chromium may take to load the page and dump its DOM.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);

/// Chromium's executable, or why there is none.
fn chromium() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("AXUM_BITS_CHROMIUM") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "AXUM_BITS_CHROMIUM is {}, which is not a file",
                path.display()
            ))
        };
    }
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for name in ["chromium", "chromium-browser"] {
        if let Some(path) = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
            return Ok(path);
        }
    }
    Err("neither AXUM_BITS_CHROMIUM is set nor chromium or chromium-browser on PATH".to_owned())
}

/// Chromium, or `None` (after saying so on stderr) when the test should be skipped.
fn chromium_or_skip() -> Option<PathBuf> {
    match chromium() {
        Ok(path) => Some(path),
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("tests/browser.rs needs Chromium under CI=true: {why}")
        }
        Err(why) => {
            // Past the test harness's capture, so that a skip shows without --nocapture.
            let _ = writeln!(
                std::io::stderr(),
                "tests/browser.rs skipped: {why} (install the `chromium` package)"
            );
            None
        }
    }
}

/// The DOM Chromium builds from `url`, serialised (`--dump-dom`). Fails the test if Chromium
/// does not finish within [`CHROMIUM_TIMEOUT`] (it is killed) or exits with an error.
async fn dump_dom(chromium: &Path, url: &str) -> String {
    let profile = tempfile::tempdir().expect("tempdir");
    let mut command = tokio::process::Command::new(chromium);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Dropping the child (when the timeout drops the future below) kills it.
        .kill_on_drop(true);
    #[cfg(unix)]
    command.process_group(0);
    let child = command.spawn().expect("start Chromium");
    #[cfg(unix)]
    let group = child.id();
    let started = Instant::now();
    let output = match tokio::time::timeout(CHROMIUM_TIMEOUT, child.wait_with_output()).await {
        Ok(output) => output.expect("Chromium's output"),
        Err(_) => {
            // The browser process is killed on drop; its helpers (zygote, renderer) share its
            // process group.
            #[cfg(unix)]
            if let Some(group) = group {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{group}")])
                    .status();
            }
            panic!("Chromium did not dump {url} within {CHROMIUM_TIMEOUT:?}; killed it");
        }
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "Chromium failed ({}) on {url}; stderr:\n{stderr}",
        output.status
    );
    let dom = String::from_utf8(output.stdout).expect("UTF-8 DOM");
    assert!(
        dom.contains("</html>"),
        "Chromium dumped no document for {url} after {:?}; stdout:\n{dom}\nstderr:\n{stderr}",
        started.elapsed()
    );
    dom
}

/// The element that starts with the first `<{tag}` holding `marker` in its start tag, up to
/// the first `</{tag}>` after it (no nesting of the same tag inside, as on the status page).
fn element<'a>(html: &'a str, tag: &str, marker: &str) -> Option<&'a str> {
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut from = 0;
    while let Some(i) = html[from..].find(&open).map(|i| i + from) {
        let head_end = i + html[i..].find('>')?;
        if html[i..head_end].contains(marker) {
            let end = head_end + html[head_end..].find(&close)? + close.len();
            return Some(&html[i..end]);
        }
        from = head_end;
    }
    None
}

/// The value of `name` in the first start tag of `html`.
fn attr<'a>(html: &'a str, name: &str) -> Option<&'a str> {
    let head = &html[..html.find('>')?];
    let key = format!(" {name}=\"");
    let start = head.find(&key)? + key.len();
    let len = head[start..].find('"')?;
    Some(&head[start..start + len])
}

/// What the HTML serialiser writes for a text node holding `text`.
fn serialized_text(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('\u{A0}', "&nbsp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A file name that is markup once its entities are decoded. The destination rules refuse
/// `<`, `>` and `"` in a file name (they are invalid on Windows), so the name carries the
/// markup as entities: a page that escaped all but `&` would show `<img ...>` instead.
const NAME: &str = "&lt;img src=x onerror=alert(1)&gt; Tom's.bin";
/// The same name, percent-encoded for the URL path.
const NAME_IN_URL: &str = "%26lt%3Bimg%20src%3Dx%20onerror%3Dalert(1)%26gt%3B%20Tom%27s.bin";
/// An owner with real markup: owners come from the application (here the `x-user` header),
/// which allows `<` and `>`.
const OWNER: &str = "<img src=x onerror=alert(2)><script>document.title='pwned'</script>";

#[tokio::test]
async fn status_page_in_chromium_shows_a_paused_upload_escaped() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let layer = axum_bits::BitsLayer::builder(tmp.path()).build().unwrap();
    let app = Router::new()
        .nest("/admin", axum_bits::admin::router(layer.handle()))
        .layer(layer.clone())
        .layer(axum::middleware::from_fn(owner_from_header));
    let server = TestServer::serve(tmp.path(), layer, app).await;

    let mut headers = http::HeaderMap::new();
    headers.insert("x-user", OWNER.parse().unwrap());
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let client = BitsClient::with_http(server.addr, http);
    let path = format!("/{NAME_IN_URL}");
    let sid = client.create_ok(&path).await;
    let bytes = data(2000, 7);
    let reply = client.fragment(&path, &sid, 0, &bytes[..1000], 2000).await;
    reply.assert_ok();
    assert_eq!(reply.received(), Some(1000));
    // The server took the name as it is.
    let info = server
        .layer
        .handle()
        .session(axum_bits::SessionId::parse(&sid).unwrap())
        .await
        .unwrap()
        .expect("the session");
    assert_eq!(info.destination, NAME);

    let started = Instant::now();
    let dom = dump_dom(&chromium, &server.url("/admin")).await;
    eprintln!("Chromium dumped the page in {:?}", started.elapsed());

    // No script ran and no element came from a client's string.
    // The owner's script would retitle the page.
    assert_eq!(
        element(&dom, "title", ""),
        Some("<title>BITS uploads</title>"),
        "{dom}"
    );
    assert_eq!(dom.matches("<title").count(), 1, "{dom}");
    assert!(
        !dom.contains("<img"),
        "an <img> element on the page:\n{dom}"
    );
    assert!(
        !dom.contains("<script"),
        "a <script> element on the page:\n{dom}"
    );

    let table = element(&dom, "table", "id=\"sessions\"").expect("the sessions table");
    let row = element(table, "tr", &format!("data-session=\"{sid}\"")).expect("the session's row");
    assert_eq!(attr(row, "class"), Some("session"), "{row}");
    assert_eq!(attr(row, "data-received"), Some("1000"), "{row}");
    assert_eq!(attr(row, "data-total"), Some("2000"), "{row}");
    let progress = element(row, "progress", "max=\"100\"").expect("a progress bar");
    assert_eq!(attr(progress, "value"), Some("50"), "{progress}");
    let percent = element(row, "span", "class=\"percent\"").expect("the percentage");
    assert!(percent.contains(">50%<"), "{percent}");

    // The name is text, exactly as uploaded: its entities are not decoded into markup.
    let name = element(row, "td", "class=\"name\"").expect("the name cell");
    let expected = format!("<td class=\"name\">{}<br>", serialized_text(NAME));
    assert!(name.starts_with(&expected), "{name}\nexpected {expected}");
    // The owner's markup is text too.
    assert!(row.contains(&serialized_text(OWNER)), "{row}");
    assert!(row.contains("&lt;img"), "{row}");

    let open = element(&dom, "b", "id=\"open\"").expect("the open count");
    assert_eq!(open, "<b id=\"open\">1</b>", "{dom}");

    server.stop().await;
}
