//! The object-storage benchmark of axum-bits: uploads through the layer with `S3Staging` into
//! an S3-compatible server, against `object_store` itself uploading the same bytes in the
//! same parts to the same server from the same machine (the most that server allows).
//!
//! ```text
//! . .ci/services.sh                                   # moto on 127.0.0.1 (exports its URL and pid)
//! cargo bench --bench s3 --features s3                # the full run
//! cargo bench --bench s3 --features s3 -- --quick     # CI size (CI runs this)
//! cargo bench --bench s3 --features s3 -- --runs 5 --rss-gib 1,4,8
//! ```
//!
//! The server is `AXUM_BITS_TEST_S3_URL` (moto from `.ci/services.sh`, with S3's real 5 MiB
//! minimum part); `AXUM_BITS_TEST_S3_PID`, when set, is its process, whose CPU time is read
//! from `/proc`. Without the URL the benchmark says so and exits (with `CI=true` it fails).
//! Every run works in a bucket of its own and deletes what it uploaded after each
//! measurement.
//!
//! * **bits**: this program re-executed as a child process (`AXUM_BITS_BENCH_S3_SERVER`),
//!   `axum::serve` on an ephemeral 127.0.0.1 port on a default multi-threaded tokio runtime:
//!   `BitsLayer::builder(root).staging(S3Staging ...)` with the default `FileStore` in a
//!   temporary folder, the default part size (8 MiB) and the default commit point (the last
//!   Fragment uploads the last part and completes the multipart upload at the destination
//!   with `If-None-Match: *`). Both uploaders' request timeout is raised to 600 s (moto
//!   takes about 13 s per GiB to complete an upload). The client, in this process, sends Create-Session, the Fragments one
//!   after another and Close-Session on one kept-alive connection (reqwest), every body a
//!   slice of one pre-generated buffer of incompressible bytes. Time: Create-Session sent ..
//!   Close-Session Ack; "final s" is the last Fragment's share (the commit).
//! * **direct**: `object_store`'s `MultipartStore`, in this process: create the multipart
//!   upload, put the same bytes in the same 8 MiB parts one after another (a BITS client sends
//!   one fragment at a time), complete it. Time: create .. complete.
//!
//! Parts:
//!
//! 1. **8 MiB fragments**: a 1 GiB file (`--gib`; `--quick`: 64 MiB), bits and direct
//!    interleaved, `--runs` times each (default 3, `--quick` 1); the ratio of the medians
//!    (bits MB/s / direct MB/s; aim: at least 0.8). CPU per fragment of the bits node, of
//!    this process for direct, and of the S3 server for both.
//! 2. **64 KiB fragments**: a 64 MiB file (`--small-mib`; `--quick`: 8 MiB), the same way;
//!    direct puts the same bytes in 8 MiB parts. Every fragment is stored before its Ack, so
//!    this measures the per-fragment cost of durability without local disk.
//! 3. **Memory**: peak RSS (`VmHWM`) of a fresh bits node after one upload in 8 MiB fragments
//!    of each size in `--rss-gib` (default 1,4; `--quick`: 64 and 128 MiB). Flat means the
//!    same for every size.
//! 4. **Requests**: the same uploads, smaller (64 MiB in 8 MiB fragments, 8 MiB in 64 KiB
//!    ones), through a counting proxy between the uploader and the S3 server, by kind of
//!    request, per fragment (direct: per part).
//!
//! After every upload the object is read back and compared with what was sent. MB = 10^6
//! bytes; RSS in MiB.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::routing::get;
use axum_bits::BitsLayer;
use axum_bits::staging::S3Staging;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::MultipartStore;
use object_store::path::Path as Key;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/common/node.rs"]
mod node;

/// The `/proc` readings of the throughput benchmark.
#[allow(dead_code)]
#[path = "throughput/measure.rs"]
mod measure;

use measure::{proc_cpu_secs, proc_status_kib};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Selects the server role in a child process.
const ROLE_ENV: &str = "AXUM_BITS_BENCH_S3_SERVER";
/// The child's upload root (local records only).
const ROOT_ENV: &str = "AXUM_BITS_BENCH_S3_ROOT";
/// The child's S3 endpoint (the server, or the counting proxy).
const ENDPOINT_ENV: &str = "AXUM_BITS_BENCH_S3_ENDPOINT";
/// The child's bucket.
const BUCKET_ENV: &str = "AXUM_BITS_BENCH_S3_BUCKET";
/// The BITS upload protocol.
const PROTOCOL: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";
/// The staging's part size (its default) and direct's.
const PART: usize = 8 << 20;
const MIB: u64 = 1 << 20;

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
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(url) = std::env::var("AXUM_BITS_TEST_S3_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        if std::env::var("CI").as_deref() == Ok("true") {
            eprintln!("AXUM_BITS_TEST_S3_URL is not set: .ci/run must start moto");
            return ExitCode::FAILURE;
        }
        println!("AXUM_BITS_TEST_S3_URL is not set (source .ci/services.sh); nothing measured");
        return ExitCode::SUCCESS;
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&options, &url)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The command line.
struct Options {
    large_mib: u64,
    small_mib: u64,
    rss_mib: Vec<u64>,
    runs: usize,
    count: bool,
}

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> Result<Self, Error> {
        let mut options = Self {
            large_mib: 1024,
            small_mib: 64,
            rss_mib: vec![1024, 4096],
            runs: 3,
            count: true,
        };
        let mut quick = false;
        let mut args = args.peekable();
        let number = |v: Option<String>, flag: &str| -> Result<f64, Error> {
            v.ok_or_else(|| format!("{flag} needs a value"))?
                .parse::<f64>()
                .map_err(|e| format!("{flag}: {e}").into())
        };
        let (mut gib, mut small, mut rss, mut runs) = (None, None, None, None);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => quick = true,
                "--gib" => gib = Some(number(args.next(), "--gib")?),
                "--small-mib" => small = Some(number(args.next(), "--small-mib")?),
                "--runs" => runs = Some(number(args.next(), "--runs")? as usize),
                "--no-count" => options.count = false,
                "--rss-gib" => {
                    let list = args.next().ok_or("--rss-gib needs a value")?;
                    rss = Some(
                        list.split(',')
                            .map(|v| v.parse::<f64>().map(|g| (g * 1024.0) as u64))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| format!("--rss-gib: {e}"))?,
                    );
                }
                "--bench" => {}
                "--help" | "-h" => {
                    return Err(
                        "usage: s3 [--quick] [--gib G] [--small-mib M] [--rss-gib G,G] \
                                [--runs N] [--no-count]"
                            .into(),
                    );
                }
                other => return Err(format!("unknown argument {other:?} (try --help)").into()),
            }
        }
        if quick {
            options = Self {
                large_mib: 64,
                small_mib: 8,
                rss_mib: vec![64, 128],
                runs: 1,
                count: options.count,
            };
        }
        options.large_mib = gib.map_or(options.large_mib, |g| (g * 1024.0) as u64);
        options.small_mib = small.map_or(options.small_mib, |m| m as u64);
        options.rss_mib = rss.unwrap_or(options.rss_mib);
        options.runs = runs.unwrap_or(options.runs).max(1);
        for mib in [options.large_mib, options.small_mib]
            .iter()
            .chain(&options.rss_mib)
        {
            if *mib == 0 || *mib % 8 != 0 {
                return Err("sizes must be whole multiples of 8 MiB".into());
            }
        }
        Ok(options)
    }
}

// ------------------------------------------------------------------------------------------
// The measurements.

async fn run(options: &Options, url: &str) -> Result<(), Error> {
    let bucket = Bucket::create(url).await?;
    let payload = Payload::new();
    let s3_pid = std::env::var("AXUM_BITS_TEST_S3_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok());
    println!("S3 server {url} (pid {s3_pid:?}), bucket {}", bucket.name);

    println!(
        "\n1. {} MiB in 8 MiB fragments (bits) / parts (direct), {} run(s) each, interleaved",
        options.large_mib, options.runs
    );
    let large = compare(
        &bucket,
        &payload,
        s3_pid,
        options.large_mib * MIB,
        PART,
        options.runs,
    )
    .await?;
    println!(
        "\n2. {} MiB in 64 KiB fragments (bits) / 8 MiB parts (direct), {} run(s) each",
        options.small_mib, options.runs
    );
    let small = compare(
        &bucket,
        &payload,
        s3_pid,
        options.small_mib * MIB,
        64 << 10,
        options.runs,
    )
    .await?;

    println!("\n3. Peak RSS of a fresh bits node, one upload in 8 MiB fragments");
    println!("{:>10} {:>10} {:>10}", "file MiB", "MB/s", "RSS MiB");
    let mut rss = Vec::new();
    for &mib in &options.rss_mib {
        let node = BitsNode::start(&bucket, url)?;
        let measured = node
            .upload(&bucket, &payload, None, mib * MIB, PART)
            .await?;
        let peak = proc_status_kib(node.pid(), "VmHWM")? as f64 / 1024.0;
        drop(node);
        println!("{mib:>10} {:>10.0} {peak:>10.1}", measured.mb_per_s());
        rss.push((mib, peak));
    }

    if options.count {
        println!("\n4. Requests to the S3 server, by kind, per fragment (direct: per part)");
        count_requests(&bucket, &payload, url).await?;
    }

    println!("\nSummary");
    println!(
        "  8 MiB fragments: bits / direct = {:.2} (aim >= 0.80): {}",
        large,
        if large >= 0.8 { "PASS" } else { "MISS" }
    );
    println!("  64 KiB fragments: bits / direct = {small:.2} (context)");
    if let (Some(first), Some(last)) = (rss.first(), rss.last()) {
        println!(
            "  peak RSS {:.1} MiB at {} MiB, {:.1} MiB at {} MiB (ratio {:.2})",
            first.1,
            first.0,
            last.1,
            last.0,
            last.1 / first.1
        );
    }
    bucket.empty().await?;
    Ok(())
}

/// One measured upload.
#[derive(Default, Clone, Copy)]
struct Measured {
    bytes: u64,
    secs: f64,
    final_secs: f64,
    uploader_cpu: f64,
    server_cpu: Option<f64>,
}

impl Measured {
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
}

/// Direct and bits, interleaved, `runs` times; prints a row per run and the medians, returns
/// the ratio of the median rates.
async fn compare(
    bucket: &Bucket,
    payload: &Payload,
    s3_pid: Option<u32>,
    size: u64,
    fragment: usize,
    runs: usize,
) -> Result<f64, Error> {
    let fragments = size / fragment as u64;
    let parts = size / PART as u64;
    println!(
        "{:>8} {:>4} {:>9} {:>8} {:>8} {:>16} {:>16}",
        "", "run", "MB/s", "s", "final s", "uploader ms/frag", "S3 srv ms/frag"
    );
    let (mut bits, mut direct) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let cpu = |m: Option<f64>, n: u64| {
            m.map_or_else(|| "-".to_owned(), |c| format!("{:.3}", c * 1e3 / n as f64))
        };
        let d = measure_direct(bucket, payload, s3_pid, size, fragment).await?;
        println!(
            "{:>8} {run:>4} {:>9.0} {:>8.2} {:>8.2} {:>16.3} {:>16}",
            "direct",
            d.mb_per_s(),
            d.secs,
            d.final_secs,
            d.uploader_cpu * 1e3 / parts as f64,
            cpu(d.server_cpu, parts),
        );
        direct.push(d);
        let node = BitsNode::start(bucket, &bucket.url)?;
        let b = node.upload(bucket, payload, s3_pid, size, fragment).await?;
        drop(node);
        println!(
            "{:>8} {run:>4} {:>9.0} {:>8.2} {:>8.2} {:>16.3} {:>16}",
            "bits",
            b.mb_per_s(),
            b.secs,
            b.final_secs,
            b.uploader_cpu * 1e3 / fragments as f64,
            cpu(b.server_cpu, fragments),
        );
        bits.push(b);
    }
    let median = |v: &[Measured]| {
        let mut rates: Vec<f64> = v.iter().map(Measured::mb_per_s).collect();
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let (b, d) = (median(&bits), median(&direct));
    println!(
        "  medians: bits {b:.0} MB/s, direct {d:.0} MB/s: {:.2}",
        b / d
    );
    // Before the last fragment (the commit) and the last part (the completion).
    let before_end = |v: &[Measured], last: usize| {
        let mut rates: Vec<f64> = v
            .iter()
            .map(|m| (m.bytes - last as u64) as f64 / (m.secs - m.final_secs) / 1e6)
            .collect();
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    if fragments > 1 && parts > 1 {
        let (b_up, d_up) = (before_end(&bits, fragment), before_end(&direct, PART));
        println!(
            "  up to the last fragment / part: bits {b_up:.0} MB/s, direct {d_up:.0} MB/s: {:.2}",
            b_up / d_up
        );
    }
    Ok(b / d)
}

/// `object_store` uploading the file's bytes in 8 MiB parts, one after another.
async fn measure_direct(
    bucket: &Bucket,
    payload: &Payload,
    s3_pid: Option<u32>,
    size: u64,
    fragment: usize,
) -> Result<Measured, Error> {
    let s3 = bucket.client(&bucket.url)?;
    let key = Key::from("direct/file.bin");
    let parts = payload.parts(size, fragment);
    let before = s3_pid.map(|p| proc_cpu_secs(Some(p))).transpose()?;
    let cpu_before = proc_cpu_secs(None)?;
    let (secs, final_secs) = direct_upload(&s3, &key, &parts).await?;
    let mut measured = Measured {
        bytes: size,
        secs,
        final_secs,
        uploader_cpu: proc_cpu_secs(None)? - cpu_before,
        ..Measured::default()
    };
    if let (Some(p), Some(before)) = (s3_pid, before) {
        measured.server_cpu = Some(proc_cpu_secs(Some(p))? - before);
    }
    drop(parts);
    payload.verify(&s3, &key, size, fragment).await?;
    bucket.empty().await?;
    Ok(measured)
}

/// Returns the whole time and the last part's share (its upload and the completion).
async fn direct_upload(s3: &AmazonS3, key: &Key, parts: &[Bytes]) -> Result<(f64, f64), Error> {
    let started = Instant::now();
    let mut last = Instant::now();
    let id = s3.create_multipart(key).await?;
    let mut done = Vec::with_capacity(parts.len());
    for (index, part) in parts.iter().enumerate() {
        last = Instant::now();
        done.push(
            s3.put_part(key, &id, index, PutPayload::from(part.clone()))
                .await?,
        );
    }
    s3.complete_multipart(key, &id, done).await?;
    Ok((
        started.elapsed().as_secs_f64(),
        last.elapsed().as_secs_f64(),
    ))
}

/// Part 4: every upload through a counting proxy.
async fn count_requests(bucket: &Bucket, payload: &Payload, url: &str) -> Result<(), Error> {
    let proxy = CountingProxy::start(url).await?;
    let cases: [(&str, u64, usize); 4] = [
        ("direct", 64 * MIB, PART),
        ("bits", 64 * MIB, PART),
        ("direct", 8 * MIB, 64 << 10),
        ("bits", 8 * MIB, 64 << 10),
    ];
    for (who, size, fragment) in cases {
        proxy.reset();
        let units = if who == "direct" {
            let s3 = bucket.client(&proxy.url())?;
            direct_upload(
                &s3,
                &Key::from("direct/file.bin"),
                &payload.parts(size, fragment),
            )
            .await?;
            size / PART as u64
        } else {
            let node = BitsNode::start(bucket, &proxy.url())?;
            node.upload(bucket, payload, None, size, fragment).await?;
            size / fragment as u64
        };
        let counts = proxy.counts();
        bucket.empty().await?;
        let total: u64 = counts.values().sum();
        let kinds = counts
            .iter()
            .map(|(kind, n)| format!("{kind} {:.2}", *n as f64 / units as f64))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "  {who:>6}, {} MiB in {} KiB {}: {:.2} requests per {} ({kinds})",
            size / MIB,
            fragment >> 10,
            if who == "direct" {
                "parts of 8 MiB"
            } else {
                "fragments"
            },
            total as f64 / units as f64,
            if who == "direct" { "part" } else { "fragment" },
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// The bucket, the payload, the bits node and its client.

struct Bucket {
    url: String,
    name: String,
}

impl Bucket {
    async fn create(url: &str) -> Result<Self, Error> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let name = format!("bench-{nanos:x}");
        // moto takes unsigned requests; a real service would want them signed.
        let created = reqwest::Client::builder()
            .no_proxy()
            .build()?
            .put(format!("{url}/{name}"))
            .send()
            .await?;
        if !created.status().is_success() {
            return Err(format!("creating bucket {name}: {}", created.status()).into());
        }
        Ok(Self {
            url: url.to_owned(),
            name,
        })
    }

    fn client(&self, endpoint: &str) -> Result<AmazonS3, Error> {
        Ok(AmazonS3Builder::new()
            .with_bucket_name(&self.name)
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_client_options(client_options())
            .build()?)
    }

    /// Deletes every object and aborts every multipart upload (so the server frees them).
    async fn empty(&self) -> Result<(), Error> {
        let s3 = self.client(&self.url)?;
        let keys = s3.list(None).map(|meta| meta.map(|m| m.location)).boxed();
        let mut deleted = s3.delete_stream(keys);
        while let Some(result) = deleted.next().await {
            result?;
        }
        // object_store lists no multipart uploads: ask the server directly (unsigned, as
        // moto allows) and abort each.
        let http = reqwest::Client::builder().no_proxy().build()?;
        let listing = http
            .get(format!("{}/{}?uploads", self.url, self.name))
            .send()
            .await?
            .text()
            .await?;
        for upload in listing.split("<Upload>").skip(1) {
            let field = |name: &str| {
                upload
                    .split_once(&format!("<{name}>"))
                    .and_then(|(_, rest)| rest.split_once(&format!("</{name}>")))
                    .map(|(value, _)| value.to_owned())
            };
            if let (Some(key), Some(id)) = (field("Key"), field("UploadId")) {
                s3.abort_multipart(&Key::from(key), &id).await?;
            }
        }
        Ok(())
    }
}

/// Incompressible bytes: fragment `i` of a file sent in fragments of `size` is the buffer's
/// slice at `(i × 4099) mod 1 MiB`, so that no two neighbouring fragments are the same and a
/// misplaced part shows in the comparison.
struct Payload {
    buffer: Bytes,
}

const WINDOW: usize = 1 << 20;
const STRIDE: usize = 4099;

impl Payload {
    fn new() -> Self {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut buffer = BytesMut::with_capacity(PART + WINDOW);
        while buffer.len() < PART + WINDOW {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            buffer.extend_from_slice(&state.to_le_bytes());
        }
        Self {
            buffer: buffer.freeze(),
        }
    }

    fn fragment(&self, index: u64, size: usize) -> Bytes {
        let start = (index as usize).wrapping_mul(STRIDE) % WINDOW;
        self.buffer.slice(start..start + size)
    }

    /// The file's bytes in 8 MiB parts (slices when fragments are parts, copies otherwise).
    fn parts(&self, file: u64, fragment: usize) -> Vec<Bytes> {
        let per_part = (PART / fragment) as u64;
        (0..file / PART as u64)
            .map(|part| {
                if per_part == 1 {
                    return self.fragment(part, fragment);
                }
                let mut bytes = BytesMut::with_capacity(PART);
                for i in part * per_part..(part + 1) * per_part {
                    bytes.extend_from_slice(&self.fragment(i, fragment));
                }
                bytes.freeze()
            })
            .collect()
    }

    /// Reads `key` back and compares it with the file sent in fragments of `fragment`.
    async fn verify(
        &self,
        s3: &AmazonS3,
        key: &Key,
        file: u64,
        fragment: usize,
    ) -> Result<(), Error> {
        let mut stream = s3.get(key).await?.into_stream();
        let mut position = 0u64;
        while let Some(chunk) = stream.next().await {
            let mut chunk = chunk?;
            while !chunk.is_empty() {
                let index = position / fragment as u64;
                let within = (position % fragment as u64) as usize;
                let expected = self.fragment(index, fragment).slice(within..);
                let n = expected.len().min(chunk.len());
                if chunk[..n] != expected[..n] {
                    return Err(format!("{key}: bytes differ near offset {position}").into());
                }
                position += n as u64;
                chunk = chunk.slice(n..);
            }
        }
        if position != file {
            return Err(format!("{key}: {position} bytes, {file} sent").into());
        }
        Ok(())
    }
}

/// A bits server in a child process, on its own temporary root.
struct BitsNode {
    node: node::Node,
    _root: tempfile::TempDir,
}

impl BitsNode {
    fn start(bucket: &Bucket, endpoint: &str) -> Result<Self, Error> {
        let root = tempfile::tempdir()?;
        let node = node::NodeCommand::new("bits")
            .env(ROLE_ENV, "bits")
            .env(ROOT_ENV, root.path())
            .env(ENDPOINT_ENV, endpoint)
            .env(BUCKET_ENV, &bucket.name)
            .try_spawn()
            .map_err(|e| format!("bits server: {e}"))?;
        Ok(Self { node, _root: root })
    }

    fn pid(&self) -> u32 {
        self.node.pid()
    }

    /// One upload of `file` bytes in fragments of `fragment` to `bench/file.bin`, with the
    /// CPU time of the node and of the S3 server (`s3_pid`) it took; then (untimed) read back
    /// and compared, and the bucket emptied.
    async fn upload(
        &self,
        bucket: &Bucket,
        payload: &Payload,
        s3_pid: Option<u32>,
        file: u64,
        fragment: usize,
    ) -> Result<Measured, Error> {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let s3_before = s3_pid.map(|p| proc_cpu_secs(Some(p))).transpose()?;
        let node_before = proc_cpu_secs(Some(self.pid()))?;
        let url = self.node.url("/file.bin");
        let bits_post = reqwest::Method::from_bytes(b"BITS_POST")?;
        let started = Instant::now();
        let reply = client
            .request(bits_post.clone(), &url)
            .header("BITS-Packet-Type", "Create-Session")
            .header("BITS-Supported-Protocols", PROTOCOL)
            .header("Content-Length", "0")
            .send()
            .await?;
        let reply = expect_ok(reply, "Create-Session").await?;
        let session = reply
            .headers()
            .get("BITS-Session-Id")
            .ok_or("no BITS-Session-Id on the Create-Session Ack")?
            .clone();
        let mut last = Instant::now();
        let n = file / fragment as u64;
        for index in 0..n {
            let offset = index * fragment as u64;
            let end = offset + fragment as u64;
            last = Instant::now();
            let reply = client
                .request(bits_post.clone(), &url)
                .header("BITS-Packet-Type", "Fragment")
                .header("BITS-Session-Id", session.clone())
                .header(
                    "Content-Range",
                    format!("bytes {offset}-{}/{file}", end - 1),
                )
                .body(payload.fragment(index, fragment))
                .send()
                .await?;
            let reply = expect_ok(reply, "Fragment").await?;
            let received = reply
                .headers()
                .get("BITS-Received-Content-Range")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if received != Some(end) {
                return Err(format!("fragment ending at {end}: server has {received:?}").into());
            }
        }
        let reply = client
            .request(bits_post, &url)
            .header("BITS-Packet-Type", "Close-Session")
            .header("BITS-Session-Id", session)
            .header("Content-Length", "0")
            .send()
            .await?;
        expect_ok(reply, "Close-Session").await?;
        let mut measured = Measured {
            bytes: file,
            secs: started.elapsed().as_secs_f64(),
            final_secs: last.elapsed().as_secs_f64(),
            uploader_cpu: proc_cpu_secs(Some(self.pid()))? - node_before,
            server_cpu: None,
        };
        if let (Some(p), Some(before)) = (s3_pid, s3_before) {
            measured.server_cpu = Some(proc_cpu_secs(Some(p))? - before);
        }
        let s3 = bucket.client(&bucket.url)?;
        payload
            .verify(&s3, &Key::from("bench/file.bin"), file, fragment)
            .await?;
        bucket.empty().await?;
        Ok(measured)
    }
}

/// The request timeout of both uploaders: moto takes about 13 s per GiB to complete an upload,
/// longer than `object_store`'s default 30 s for a file of a few GiB.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_allow_http(true)
        .with_timeout(TIMEOUT)
}

/// Fails on a non-200 reply.
async fn expect_ok(reply: reqwest::Response, what: &str) -> Result<reqwest::Response, Error> {
    if reply.status() != reqwest::StatusCode::OK {
        let status = reply.status();
        let headers = format!("{:?}", reply.headers());
        let body = reply.text().await.unwrap_or_default();
        return Err(format!("{what}: {status} {headers} {body}").into());
    }
    Ok(reply)
}

/// The child: a bits server with S3 staging, until the parent kills it (or dies).
fn serve(role: &str) -> Result<(), Error> {
    if role != "bits" {
        return Err(format!("unknown role {role:?}").into());
    }
    let root = std::env::var(ROOT_ENV)?;
    let endpoint = std::env::var(ENDPOINT_ENV)?;
    let bucket = std::env::var(BUCKET_ENV)?;
    node::exit_with_parent();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let staging = S3Staging::builder()
            .bucket(bucket)
            .prefix("bench")
            .endpoint(endpoint)
            .region("us-east-1")
            .path_style(true)
            .credentials("test", "test")
            .request_timeout(TIMEOUT)
            .build()?;
        let bits = BitsLayer::builder(&root)
            .max_upload_size(1 << 40)
            .staging(staging)
            .build()?;
        let app = Router::new()
            .route("/", get(|| async { "axum-bits S3 benchmark server" }))
            .layer(bits);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        node::announce(listener.local_addr()?);
        axum::serve(listener, app).await?;
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------
// The counting proxy.

/// An HTTP/1.1 proxy that forwards every byte and counts the requests by kind (it reads each
/// request head and skips the body its `Content-Length` announces; object_store sends no
/// chunked bodies).
struct CountingProxy {
    addr: std::net::SocketAddr,
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl CountingProxy {
    async fn start(upstream: &str) -> Result<Self, Error> {
        let upstream: std::net::SocketAddr = upstream.trim_start_matches("http://").parse()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        let shared = counts.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counts = shared.clone();
                tokio::spawn(async move {
                    if let Ok(server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = relay(client, server, counts).await;
                    }
                });
            }
        });
        Ok(Self { addr, counts })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn reset(&self) {
        self.counts.lock().map(|mut c| c.clear()).unwrap_or(());
    }

    fn counts(&self) -> BTreeMap<String, u64> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

async fn relay(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
) -> Result<(), Error> {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let answers = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
    });
    let mut buffer = BytesMut::with_capacity(64 << 10);
    'requests: loop {
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            if client_read.read_buf(&mut buffer).await? == 0 {
                break 'requests;
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let mut body = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<u64>().ok())?
            })
            .unwrap_or(0);
        if let Ok(mut counts) = counts.lock() {
            *counts.entry(kind(&head)).or_default() += 1;
        }
        let head = buffer.split_to(head_end);
        server_write.write_all(&head).await?;
        while body > 0 {
            if buffer.is_empty() && client_read.read_buf(&mut buffer).await? == 0 {
                break 'requests;
            }
            let n = (body as usize).min(buffer.len());
            let chunk = buffer.split_to(n);
            server_write.write_all(&chunk).await?;
            body -= n as u64;
        }
    }
    let _ = server_write.shutdown().await;
    let _ = answers.await;
    Ok(())
}

/// A request's kind, from its request line: the S3 operation it is.
fn kind(head: &str) -> String {
    let line = head.lines().next().unwrap_or_default();
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or("?"), words.next().unwrap_or("?"));
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let has = |name: &str| {
        query
            .split('&')
            .any(|p| p == name || p.starts_with(&format!("{name}=")))
    };
    let operation = match method {
        "PUT" if has("partNumber") => "upload part",
        "PUT" => "put",
        "POST" if has("uploads") => "create upload",
        "POST" if has("uploadId") => "complete upload",
        "POST" if has("delete") => "delete many",
        "GET" if has("list-type") || has("prefix") => "list",
        "GET" => "get",
        "HEAD" => "head",
        "DELETE" if has("uploadId") => "abort upload",
        "DELETE" => "delete",
        other => other,
    };
    operation.to_owned()
}
