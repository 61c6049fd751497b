//! Upload throughput and server memory: the BITS layer against a plain streaming handler.
//!
//! ```text
//! cargo bench --bench throughput                    # 1 GiB, one run
//! cargo bench --bench throughput -- --runs 3        # three runs and their spread
//! cargo bench --bench throughput -- --quick         # 64 MiB (CI)
//! cargo bench --bench throughput -- --mib 256       # any size, in 8 MiB steps
//! ```
//!
//! Each server runs in a child process (this program re-executed with
//! `AXUM_BITS_BENCH_SERVER=bits|baseline`), so its peak RSS (`VmHWM` in `/proc/<pid>/status`)
//! is its own. Both listen on 127.0.0.1, on an ephemeral port they print on stdout, and run a
//! default multi-threaded tokio runtime. The client lives in this process and sends every
//! request body from one pre-generated 8 MiB buffer (`Bytes` clones, no copies), one request
//! at a time over a kept-alive connection, as the Windows BITS client does.
//!
//! * **bits**: `BitsLayer::builder(root).max_upload_size(..)` with the default `FileStore` and
//!   `LocalStaging`; Create-Session, one 8 MiB Fragment after another, Close-Session. The
//!   clock runs from Create-Session to the Close-Session Ack, which includes the commit (an
//!   fsync of the part file, a link into place and an fsync of the folder; by default it
//!   runs with the last Fragment). "final s" is the time from the last Fragment's start to
//!   the end.
//! * **baseline**: an axum handler that opens the file in append mode and writes each body
//!   frame with `tokio::fs::File`. The same 8 MiB POSTs go to it. It is measured twice: as is
//!   (data left in the page cache) and with an fsync after the last POST, which is the
//!   durability point the BITS commit reaches and so the fair comparison.
//!
//! Before each measurement the same number of bytes is written to a scratch file and deleted,
//! untimed, so that no server pays for faulting in fresh page-cache memory (which is slow on
//! VMs that hand idle memory back to the host; `--no-warm-up` skips it).
//!
//! With `AXUM_BITS_BENCH_SYNC_DATA=1` the bits server runs with `sync_data(true)` (an fsync of
//! the fragment's data and of its session record before every Ack).
//!
//! Files go to a temporary folder under `$AXUM_BITS_BENCH_DIR` (default: the system temp
//! folder; it should be on a real disk, not tmpfs) and are removed after each measurement.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum_bits::BitsLayer;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Size of every fragment / POST body.
const FRAGMENT: usize = 8 << 20;
/// Selects the server role in a child process.
const ROLE_ENV: &str = "AXUM_BITS_BENCH_SERVER";
/// The upload root of a child server.
const ROOT_ENV: &str = "AXUM_BITS_BENCH_ROOT";
/// `1`: the bits server fsyncs every fragment and record before its Ack (`sync_data(true)`).
const SYNC_DATA_ENV: &str = "AXUM_BITS_BENCH_SYNC_DATA";
/// Where the temporary upload roots are made.
const DIR_ENV: &str = "AXUM_BITS_BENCH_DIR";
/// A child announces its port with this line.
const PORT_LINE: &str = "listening on port ";
/// Asks the baseline handler to fsync the file after writing the body.
const FSYNC_HEADER: &str = "x-bench-fsync";
/// The one upload protocol.
const PROTOCOL: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";
/// Name of the uploaded file under each root.
const FILE_NAME: &str = "upload.bin";

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        return match serve(&role) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{role} server: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: throughput [--quick] [--mib N] [--runs N] [--no-warm-up]
  --quick       upload 64 MiB instead of 1024 MiB (CI)
  --mib N       upload N MiB (a multiple of 8)
  --runs N      repeat the whole measurement N times and print the spread (default 1)
  --no-warm-up  skip the untimed page-cache warm-up before each measurement";

#[derive(Debug)]
struct Options {
    total: u64,
    runs: usize,
    warm_up: bool,
}

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut mib: u64 = 1024;
        let mut runs = 1;
        let mut warm_up = true;
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|&v| v > 0)
                    .ok_or(format!("{name} needs a positive number"))
            };
            match arg.as_str() {
                // Passed by `cargo bench`.
                "--bench" => {}
                "--quick" => mib = 64,
                "--no-warm-up" => warm_up = false,
                "--mib" => mib = value("--mib")?,
                "--runs" => runs = usize::try_from(value("--runs")?).map_err(|e| e.to_string())?,
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if mib % 8 != 0 {
            return Err("--mib must be a multiple of 8".into());
        }
        Ok(Self {
            total: mib << 20,
            runs,
            warm_up,
        })
    }
}

// ------------------------------------------------------------------------------------------
// Child: the servers.

fn serve(role: &str) -> Result<(), Error> {
    let root = PathBuf::from(std::env::var(ROOT_ENV)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let app = match role {
            "bits" => {
                let sync_data = std::env::var_os(SYNC_DATA_ENV).is_some_and(|v| v == "1");
                let bits = BitsLayer::builder(&root)
                    .max_upload_size(1 << 40)
                    .sync_data(sync_data)
                    .build()?;
                Router::new()
                    .route("/", get(|| async { "axum-bits benchmark server" }))
                    .layer(bits)
            }
            "baseline" => Router::new()
                .route("/{name}", post(baseline_upload))
                .with_state(Arc::new(root)),
            other => return Err(format!("unknown role {other:?}").into()),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("{PORT_LINE}{}", listener.local_addr()?.port());
        // The parent closes our stdin to stop us.
        let stdin_closed = async {
            let mut sink = Vec::new();
            let _ = tokio::io::stdin().read_to_end(&mut sink).await;
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(stdin_closed)
            .await?;
        Ok(())
    })
}

/// The baseline: append the body to `root/name`, one frame at a time.
async fn baseline_upload(
    State(root): State<Arc<PathBuf>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, (StatusCode, String)> {
    let internal = |e: std::io::Error| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    if name.starts_with('.') || name.contains(['/', '\\']) {
        return Err((StatusCode::BAD_REQUEST, "bad name".into()));
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join(&name))
        .await
        .map_err(internal)?;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            file.write_all(&data).await.map_err(internal)?;
        }
    }
    file.flush().await.map_err(internal)?;
    if headers.contains_key(FSYNC_HEADER) {
        file.sync_all().await.map_err(internal)?;
    }
    Ok(StatusCode::OK)
}

// ------------------------------------------------------------------------------------------
// Parent: the client and the report.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Bits,
    Baseline,
    BaselineFsync,
}

impl Scenario {
    const ALL: [Self; 3] = [Self::Bits, Self::Baseline, Self::BaselineFsync];

    fn label(self) -> &'static str {
        match self {
            Self::Bits => "bits (FileStore + LocalStaging)",
            Self::Baseline => "baseline (no fsync)",
            Self::BaselineFsync => "baseline (fsync at end)",
        }
    }

    fn role(self) -> &'static str {
        match self {
            Self::Bits => "bits",
            Self::Baseline | Self::BaselineFsync => "baseline",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Measurement {
    secs: f64,
    /// For the BITS server: from the start of the last Fragment to the Close-Session Ack,
    /// which covers the commit (by default it runs with the last Fragment).
    final_secs: Option<f64>,
    idle_rss_kib: u64,
    peak_rss_kib: u64,
}

impl Measurement {
    fn mb_per_sec(&self, total: u64) -> f64 {
        total as f64 / 1e6 / self.secs
    }
}

fn run(options: &Options) -> Result<(), Error> {
    let payload = Bytes::from(pseudo_random(FRAGMENT));
    let base = std::env::var_os(DIR_ENV).map_or_else(std::env::temp_dir, PathBuf::from);

    println!(
        "axum-bits throughput: {} MiB per upload in {} MiB requests, {} run(s); \
         client in this process, each server in its own process, all on 127.0.0.1; files under {}",
        options.total >> 20,
        FRAGMENT >> 20,
        options.runs,
        base.display()
    );
    println!("MB = 10^6 bytes; RSS in MiB (idle: after start-up, peak: VmHWM after the upload)");
    println!();
    print_header();

    let mut results: Vec<[Measurement; 3]> = Vec::with_capacity(options.runs);
    for run in 1..=options.runs {
        let mut row = Vec::with_capacity(3);
        for scenario in Scenario::ALL {
            let m = measure(scenario, options, &payload, &base)?;
            print_row(&run.to_string(), scenario, &m, options.total);
            row.push(m);
        }
        let row: [Measurement; 3] = row.try_into().expect("three scenarios");
        print_ratio(&row, options.total);
        results.push(row);
    }

    if options.runs > 1 {
        println!();
        println!("spread over {} runs (min / median / max)", options.runs);
        for (i, scenario) in Scenario::ALL.into_iter().enumerate() {
            let speeds: Vec<f64> = results
                .iter()
                .map(|r| r[i].mb_per_sec(options.total))
                .collect();
            let peaks: Vec<f64> = results.iter().map(|r| mib(r[i].peak_rss_kib)).collect();
            println!(
                "  {:<32} MB/s {}   peak RSS MiB {}",
                scenario.label(),
                spread(&speeds, 0),
                spread(&peaks, 1)
            );
        }
        let ratios: Vec<f64> = results
            .iter()
            .map(|r| r[0].mb_per_sec(options.total) / r[2].mb_per_sec(options.total))
            .collect();
        let raw_ratios: Vec<f64> = results
            .iter()
            .map(|r| r[0].mb_per_sec(options.total) / r[1].mb_per_sec(options.total))
            .collect();
        println!(
            "  {:<32} {}",
            "ratio bits / baseline (fsync)",
            spread(&ratios, 2)
        );
        println!(
            "  {:<32} {}",
            "ratio bits / baseline (no fsync)",
            spread(&raw_ratios, 2)
        );
    }
    Ok(())
}

fn print_header() {
    println!(
        "{:>3}  {:<32} {:>9} {:>8} {:>8} {:>9} {:>9}",
        "run", "server", "MB/s", "time s", "final s", "idle RSS", "peak RSS"
    );
    println!("{}", "-".repeat(85));
}

fn print_row(run: &str, scenario: Scenario, m: &Measurement, total: u64) {
    let close = m
        .final_secs
        .map_or_else(|| "-".to_owned(), |c| format!("{c:.3}"));
    println!(
        "{:>3}  {:<32} {:>9.1} {:>8.3} {:>8} {:>9.1} {:>9.1}",
        run,
        scenario.label(),
        m.mb_per_sec(total),
        m.secs,
        close,
        mib(m.idle_rss_kib),
        mib(m.peak_rss_kib)
    );
}

fn print_ratio(row: &[Measurement; 3], total: u64) {
    let bits = row[0].mb_per_sec(total);
    println!(
        "{:>3}  ratio bits / baseline: {:.2}x vs fsync at end, {:.2}x vs no fsync",
        "",
        bits / row[2].mb_per_sec(total),
        bits / row[1].mb_per_sec(total)
    );
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn spread(values: &[f64], decimals: usize) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    format!(
        "{:.*} / {:.*} / {:.*}",
        decimals,
        sorted[0],
        decimals,
        median,
        decimals,
        sorted[sorted.len() - 1]
    )
}

/// Starts a server for `scenario`, uploads `total` bytes to it, checks the file, and stops it.
fn measure(
    scenario: Scenario,
    options: &Options,
    payload: &Bytes,
    base: &Path,
) -> Result<Measurement, Error> {
    let total = options.total;
    let root = tempfile::Builder::new()
        .prefix("axum-bits-bench-")
        .tempdir_in(base)?;
    if options.warm_up {
        warm_up(root.path(), total, payload)?;
    }
    let mut server = ChildServer::start(scenario.role(), root.path())?;
    let idle_rss_kib = proc_status_kib(server.pid(), "VmRSS")?;
    let url = format!("http://127.0.0.1:{}/{FILE_NAME}", server.port);
    // A fresh runtime per measurement: dropping it closes the client's pooled connection, so
    // the server's graceful shutdown does not wait for it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (secs, final_secs) = runtime.block_on(async {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let timing = match scenario {
            Scenario::Bits => upload_bits(&client, &url, total, payload).await?,
            Scenario::Baseline => (
                upload_baseline(&client, &url, total, payload, false).await?,
                None,
            ),
            Scenario::BaselineFsync => (
                upload_baseline(&client, &url, total, payload, true).await?,
                None,
            ),
        };
        Ok::<_, Error>(timing)
    })?;
    drop(runtime);
    let peak_rss_kib = proc_status_kib(server.pid(), "VmHWM")?;
    server.stop();
    verify(&root.path().join(FILE_NAME), total, payload)?;
    root.close()?;
    Ok(Measurement {
        secs,
        final_secs,
        idle_rss_kib,
        peak_rss_kib,
    })
}

/// Create-Session, every fragment, Close-Session. Returns the total time and the time from the
/// start of the last Fragment to the Close-Session Ack.
async fn upload_bits(
    client: &reqwest::Client,
    url: &str,
    total: u64,
    payload: &Bytes,
) -> Result<(f64, Option<f64>), Error> {
    let bits_post = reqwest::Method::from_bytes(b"BITS_POST")?;
    let started = Instant::now();

    let reply = client
        .request(bits_post.clone(), url)
        .header("BITS-Packet-Type", "Create-Session")
        .header("BITS-Supported-Protocols", PROTOCOL)
        .send()
        .await?;
    let reply = expect_ok(reply, "Create-Session").await?;
    let session = reply
        .headers()
        .get("BITS-Session-Id")
        .ok_or("no BITS-Session-Id on the Create-Session Ack")?
        .clone();

    let mut offset = 0u64;
    let mut last_fragment = started;
    while offset < total {
        let end = offset + payload.len() as u64;
        last_fragment = Instant::now();
        let reply = client
            .request(bits_post.clone(), url)
            .header("BITS-Packet-Type", "Fragment")
            .header("BITS-Session-Id", session.clone())
            .header(
                "Content-Range",
                format!("bytes {offset}-{}/{total}", end - 1),
            )
            .body(payload.clone())
            .send()
            .await?;
        let reply = expect_ok(reply, "Fragment").await?;
        let received = reply
            .headers()
            .get("BITS-Received-Content-Range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if received != Some(end) {
            return Err(format!("fragment ending at {end}: server reports {received:?}").into());
        }
        offset = end;
    }

    let reply = client
        .request(bits_post, url)
        .header("BITS-Packet-Type", "Close-Session")
        .header("BITS-Session-Id", session)
        .send()
        .await?;
    expect_ok(reply, "Close-Session").await?;
    Ok((
        started.elapsed().as_secs_f64(),
        Some(last_fragment.elapsed().as_secs_f64()),
    ))
}

/// The same POSTs to the baseline handler, appending to one file.
async fn upload_baseline(
    client: &reqwest::Client,
    url: &str,
    total: u64,
    payload: &Bytes,
    fsync_at_end: bool,
) -> Result<f64, Error> {
    let started = Instant::now();
    let mut offset = 0u64;
    while offset < total {
        offset += payload.len() as u64;
        let mut request = client.post(url).body(payload.clone());
        if fsync_at_end && offset == total {
            request = request.header(FSYNC_HEADER, "1");
        }
        expect_ok(request.send().await?, "POST").await?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Fails on a non-200 reply; drains the (empty) body so the connection is reused.
async fn expect_ok(reply: reqwest::Response, what: &str) -> Result<reqwest::Response, Error> {
    if reply.status() != reqwest::StatusCode::OK {
        let status = reply.status();
        let headers = format!("{:?}", reply.headers());
        let body = reply.text().await.unwrap_or_default();
        return Err(format!("{what}: {status} {headers} {body}").into());
    }
    Ok(reply)
}

/// Writes `total` bytes to a scratch file and deletes it, untimed.
///
/// On a VM whose host takes back idle guest memory, the first `total` bytes of page cache
/// written after a pause cost a host page fault each: `dd` of 1 GiB runs at ~450 MB/s the
/// first time and ~5 GB/s right after. Without this, whichever server is measured first pays
/// for it.
fn warm_up(dir: &Path, total: u64, payload: &Bytes) -> Result<(), Error> {
    use std::io::Write as _;
    let path = dir.join("warm-up.tmp");
    let mut file = std::fs::File::create(&path)?;
    for _ in 0..total / payload.len() as u64 {
        file.write_all(payload)?;
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(())
}

/// The uploaded file must be the payload repeated.
fn verify(path: &Path, total: u64, payload: &Bytes) -> Result<(), Error> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len != total {
        return Err(format!("{}: {len} bytes, expected {total}", path.display()).into());
    }
    let mut chunk = vec![0; payload.len()];
    for i in 0..total / payload.len() as u64 {
        file.read_exact(&mut chunk)?;
        if chunk[..] != payload[..] {
            return Err(format!("{}: chunk {i} differs from what was sent", path.display()).into());
        }
    }
    Ok(())
}

/// Deterministic incompressible bytes (xorshift64).
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A `kB` field of `/proc/<pid>/status`, in KiB.
fn proc_status_kib(pid: u32, field: &str) -> Result<u64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().strip_suffix("kB")?.trim().parse().ok()
        })
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status").into())
}

/// A server child process; stopped (stdin closed, killed if it lingers) on drop.
struct ChildServer {
    child: Child,
    port: u16,
}

impl ChildServer {
    fn start(role: &str, root: &Path) -> Result<Self, Error> {
        let mut child = Command::new(std::env::current_exe()?)
            .env(ROLE_ENV, role)
            .env(ROOT_ENV, root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let port = line
            .trim()
            .strip_prefix(PORT_LINE)
            .and_then(|p| p.parse().ok());
        let mut server = Self { child, port: 0 };
        match port {
            Some(port) => {
                server.port = port;
                Ok(server)
            }
            None => {
                server.stop();
                Err(format!("{role} server did not report its port (got {line:?})").into())
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}
