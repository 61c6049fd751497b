//! Screenshots of the admin status page, for a person to look at: a server with the admin
//! router under `/admin`, a few uploads in every state, and headless Chromium photographing
//! the page at a phone's size (412×915) and a laptop's (1280×800).
//!
//! ```text
//! cargo run --example status_page -- [FOLDER]
//! ```
//!
//! Writes `FOLDER/status-page-phone.png` and `FOLDER/status-page-desktop.png` (FOLDER defaults
//! to `target/status-page`), prints their paths and exits. Chromium is `AXUM_BITS_CHROMIUM` if
//! set, else `chromium` or `chromium-browser` on `PATH`.
//!
//! The uploads: two paused part-way (25 % and 87 %, with owners), one whose size is not known
//! yet (only Create-Session), one closed after its last byte and one cancelled.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum_bits::{BitsLayer, Owner};

const PROTOCOL: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";

/// How long Chromium may take for one screenshot.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);

type Error = Box<dyn std::error::Error>;

/// The owner named by `X-User`, if any (a stand-in for the application's authentication).
async fn owner_from_header(mut request: Request, next: Next) -> Response {
    let user = request
        .headers()
        .get("x-user")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(user) = user {
        request.extensions_mut().insert(Owner::new(user));
    }
    next.run(request).await
}

/// A BITS client just big enough to leave sessions in the states the page shows.
struct Client {
    http: reqwest::Client,
    base: String,
    user: Option<&'static str>,
}

impl Client {
    async fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<String, Error> {
        let method = reqwest::Method::from_bytes(b"BITS_POST")?;
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(user) = self.user {
            request = request.header("x-user", user);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.body(body).send().await?;
        if !response.status().is_success() {
            return Err(format!("{path}: {:?}", response).into());
        }
        Ok(response
            .headers()
            .get("BITS-Session-Id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned())
    }

    /// Create-Session: the session's id.
    async fn create(&self, path: &str) -> Result<String, Error> {
        let headers = [
            ("BITS-Packet-Type", "Create-Session"),
            ("BITS-Supported-Protocols", PROTOCOL),
        ];
        self.post(path, &headers, Vec::new()).await
    }

    /// The first `sent` bytes of a `total`-byte file, as one Fragment.
    async fn fragment(&self, path: &str, id: &str, sent: u64, total: u64) -> Result<(), Error> {
        let range = format!("bytes 0-{}/{total}", sent - 1);
        let headers = [
            ("BITS-Packet-Type", "Fragment"),
            ("BITS-Session-Id", id),
            ("Content-Range", range.as_str()),
        ];
        let body = (0..sent).map(|i| i as u8).collect();
        self.post(path, &headers, body).await.map(drop)
    }

    async fn end(&self, path: &str, id: &str, packet: &str) -> Result<(), Error> {
        let headers = [("BITS-Packet-Type", packet), ("BITS-Session-Id", id)];
        self.post(path, &headers, Vec::new()).await.map(drop)
    }
}

/// Chromium's executable.
fn chromium() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os("AXUM_BITS_CHROMIUM") {
        return Ok(PathBuf::from(path));
    }
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    ["chromium", "chromium-browser"]
        .iter()
        .flat_map(|name| dirs.iter().map(move |d| d.join(name)))
        .find(|p| p.is_file())
        .ok_or_else(|| "Chromium not found: set AXUM_BITS_CHROMIUM or put chromium on PATH".into())
}

/// Photographs `url` at `width`×`height` into `png`.
async fn screenshot(
    chromium: &Path,
    url: &str,
    (width, height): (u32, u32),
    png: &Path,
) -> Result<(), Error> {
    let profile = tempfile::tempdir()?;
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
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--window-size={width},{height}"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn()?;
    let output = tokio::time::timeout(CHROMIUM_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("Chromium took longer than {CHROMIUM_TIMEOUT:?}; killed it"))??;
    if !output.status.success() || !png.is_file() {
        return Err(format!(
            "Chromium failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let folder = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("target/status-page"), PathBuf::from);
    std::fs::create_dir_all(&folder)?;
    let folder = std::path::absolute(&folder)?;
    let chromium = chromium()?;

    let root = tempfile::tempdir()?;
    let bits = BitsLayer::builder(root.path())
        .create_directories(true)
        .build()?;
    let app = Router::new()
        .nest("/admin", axum_bits::admin::router(bits.handle()))
        .layer(bits)
        .layer(middleware::from_fn(owner_from_header));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(error) = axum::serve(listener, app).await {
            eprintln!("server: {error}");
        }
    });

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let client = |user| Client {
        http: http.clone(),
        base: format!("http://{addr}"),
        user,
    };
    let (alice, bob, anonymous) = (client(Some("alice")), client(Some("bob")), client(None));

    let report = "/reports/2024-q4/summary.pdf";
    let id = alice.create(report).await?;
    alice.fragment(report, &id, 3 << 18, 3 << 20).await?;

    let backup = "/backups/laptop-7f3a/disk-image-2024-11-30-full-backup.vhdx";
    let id = bob.create(backup).await?;
    bob.fragment(backup, &id, 870_000, 1_000_000).await?;

    anonymous.create("/logs/unknown-size.log").await?;

    let photo = "/inbox/photo.jpg";
    let id = anonymous.create(photo).await?;
    anonymous.fragment(photo, &id, 40_000, 40_000).await?;
    anonymous.end(photo, &id, "Close-Session").await?;

    let iso = "/inbox/abandoned.iso";
    let id = alice.create(iso).await?;
    alice.fragment(iso, &id, 10_000, 700_000).await?;
    alice.end(iso, &id, "Cancel-Session").await?;

    let url = format!("http://{addr}/admin");
    for (name, size) in [("phone", (412, 915)), ("desktop", (1280, 800))] {
        let png = folder.join(format!("status-page-{name}.png"));
        screenshot(&chromium, &url, size, &png).await?;
        println!("{}", png.display());
    }
    Ok(())
}
