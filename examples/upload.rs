//! Upload a file to a BITS server (IIS, or this crate's) from any OS.
//!
//! ```text
//! cargo run --example upload -- FILE URL [--fragment-size N] [--reply-out PATH]
//! ```
//!
//! Try it against the example server: `cargo run --example server` in one terminal, then
//! `cargo run --example upload -- Cargo.toml http://127.0.0.1:8080/uploads/Cargo.toml`.
//!
//! A progress bar (bytes, rate, ETA) goes to stderr. Ctrl-C cancels the upload and tells the
//! server (Cancel-Session). The session id is printed as soon as the server gives one; an
//! interrupted upload continues with `--resume ID`. Every error is printed with what it means
//! and what to do about it; the exit code is 1 for a failed upload, 2 for bad arguments and
//! 130 for a cancelled one.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum_bits::client::{BitsClient, Error, Progress, UploadPhase, UploadSource};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Upload a file to a BITS server (BITS_POST, resumable, like bitsadmin /upload)")]
struct Args {
    /// The file to upload.
    file: PathBuf,
    /// Where to upload it: the destination file's URL (http or https).
    url: String,
    /// Bytes per fragment: a number with an optional K, M or G suffix (powers of 1024).
    #[arg(long, default_value = "8M", value_parser = parse_size)]
    fragment_size: u64,
    /// Make this an upload-reply job and write the server's reply to this file.
    #[arg(long)]
    reply_out: Option<PathBuf>,
    /// Continue an interrupted upload in this session instead of creating one.
    #[arg(long)]
    resume: Option<String>,
    /// Basic credentials, `user:password`.
    #[arg(long)]
    user: Option<String>,
    /// An extra header for every packet, `Name: value` (e.g. `Authorization: Bearer ...`).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Give up after this many seconds without progress.
    #[arg(long, default_value_t = 300)]
    no_progress_timeout: u64,
    /// Accept any TLS certificate (self-signed test servers only).
    #[arg(long)]
    insecure: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        other => return Err(format!("unknown unit {other:?}")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Cancelled) => {
            eprintln!("\ncancelled; the server was told to drop the session");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("\nerror: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Error> {
    let mut builder = BitsClient::builder()
        .fragment_size(args.fragment_size)
        .no_progress_timeout(Duration::from_secs(args.no_progress_timeout))
        .danger_accept_invalid_certs(args.insecure);
    if let Some(credentials) = &args.user {
        let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
        builder = builder.basic_auth(user, password);
    }
    for header in &args.headers {
        let (name, value) = header.split_once(':').unwrap_or((header, ""));
        builder = builder.header(name.trim(), value.trim());
    }
    let client = builder.build()?;

    let source = UploadSource::file(&args.file).await?;
    let total = source.len();
    eprintln!(
        "uploading {} ({}) to {}",
        args.file.display(),
        human(total),
        args.url
    );

    let bar = Mutex::new(Bar::new(args.quiet));
    let mut upload = client
        .upload(&args.url, source)
        .on_progress(move |p| {
            if let Ok(mut bar) = bar.lock() {
                bar.show(p);
            }
        })
        .cancel_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
    if let Some(path) = &args.reply_out {
        upload = upload.reply_to_file(path);
    }
    if let Some(id) = &args.resume {
        upload = upload.resume(id);
    }
    let done = upload.await?;

    let secs = done.elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "\ndone: {} in {:.1} s ({}/s), session {}{}",
        human(done.bytes),
        secs,
        human((done.bytes as f64 / secs) as u64),
        done.session_id,
        match (done.retries, done.restarts) {
            (0, 0) => String::new(),
            (r, s) => format!(", {r} retries, {s} restarts"),
        }
    );
    if let Some(reply) = &done.reply {
        eprintln!(
            "reply: {} from {} written to {}",
            human(reply.len),
            reply.url,
            reply
                .path
                .as_deref()
                .unwrap_or(std::path::Path::new("-"))
                .display()
        );
    }
    Ok(())
}

/// A one-line progress bar on stderr, redrawn at most ten times a second.
struct Bar {
    quiet: bool,
    last_draw: Option<Instant>,
    session: Option<String>,
    /// (time, bytes) samples of the last few seconds, for the rate.
    samples: Vec<(Instant, u64)>,
}

impl Bar {
    fn new(quiet: bool) -> Self {
        Self {
            quiet,
            last_draw: None,
            session: None,
            samples: Vec::new(),
        }
    }

    fn show(&mut self, p: &Progress) {
        if p.session_id.is_some() && p.session_id != self.session {
            self.session = p.session_id.clone();
            if let Some(id) = &self.session {
                eprintln!("\rsession {id} (continue an interrupted upload with --resume {id})");
            }
        }
        let finished = p.phase == UploadPhase::Finished;
        let now = Instant::now();
        if self.quiet
            || (!finished
                && self
                    .last_draw
                    .is_some_and(|t| now - t < Duration::from_millis(100)))
        {
            return;
        }
        self.last_draw = Some(now);
        let sent = p.sent();
        self.samples.push((now, sent));
        self.samples
            .retain(|(t, _)| now - *t <= Duration::from_secs(5));
        let rate = match (self.samples.first(), self.samples.last()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 && b1 >= b0 => {
                (b1 - b0) as f64 / (*t1 - *t0).as_secs_f64()
            }
            _ => 0.0,
        };
        let fraction = if p.total == 0 {
            1.0
        } else {
            sent as f64 / p.total as f64
        };
        let width = 30;
        let filled = ((fraction * width as f64) as usize).min(width);
        let eta = if rate > 0.0 && sent < p.total {
            let secs = ((p.total - sent) as f64 / rate) as u64;
            format!("ETA {}:{:02}", secs / 60, secs % 60)
        } else {
            String::new()
        };
        let status = match &p.phase {
            UploadPhase::Connecting => "connecting".to_owned(),
            UploadPhase::Uploading | UploadPhase::Finished => String::new(),
            UploadPhase::Retrying { delay, error } => {
                format!("retry in {:.0?}: {}", delay, truncate(error, 60))
            }
            UploadPhase::DownloadingReply { received, .. } => format!("reply {}", human(*received)),
            UploadPhase::Closing => "closing".to_owned(),
            _ => String::new(),
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r[{}{}] {:>3.0}% {} / {}  {}/s  {} {}\x1b[K",
            "#".repeat(filled),
            ".".repeat(width - filled),
            fraction * 100.0,
            human(sent),
            human(p.total),
            human(rate as u64),
            eta,
            status
        );
        let _ = err.flush();
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_owned(),
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
