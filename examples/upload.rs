//! Upload a file to a BITS server (IIS, or this crate's) from any OS.
//!
//! ```text
//! cargo run --example upload -- FILE URL [--fragment-size N] [--reply-out PATH]
//! ```
//!
//! Try it against the example server, which stores `BITS_POST /NAME` as `./uploads/NAME`:
//! `cargo run --example server` in one terminal, then
//! `cargo run --example upload -- Cargo.toml http://127.0.0.1:8080/Cargo.toml` in another
//! (a second run fails with access denied: the server does not overwrite unless started with
//! `--allow-overwrites`).
//!
//! A progress bar (bytes, rate, ETA) goes to stderr. While the server cannot be reached or
//! answers with a transient error, it says so and counts down to the next attempt
//! (`retrying in 4 s (connection refused)`). Ctrl-C cancels the upload and tells the
//! server (Cancel-Session). The session id is printed as soon as the server gives one; an
//! interrupted upload continues with `--resume ID`. Every error is printed with what it means
//! and what to do about it; the exit code is 1 for a failed upload, 2 for bad arguments and
//! 130 for a cancelled one.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
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

    let bar = Arc::new(Mutex::new(Bar::new(args.quiet)));
    let reports = Arc::clone(&bar);
    let timer = Arc::clone(&bar);
    // Between reports (a wait before a retry sends none), the bar is redrawn by a timer.
    let ticker = tokio::spawn(async move {
        let mut every = tokio::time::interval(TICK);
        loop {
            every.tick().await;
            if let Ok(mut bar) = timer.lock() {
                bar.tick(Instant::now());
            }
        }
    });
    let mut upload = client
        .upload(&args.url, source)
        .on_progress(move |p| {
            if let Ok(mut bar) = reports.lock() {
                bar.report(p, Instant::now());
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
    let done = upload.await;
    // Stopped before anything else is printed, so that no redraw lands on a later line.
    ticker.abort();
    let _ = ticker.await;
    let done = done?;

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

/// A one-line progress bar on stderr. A change of phase is drawn at once; byte counts at
/// most ten times a second; a timer redraws it in between (the rate decays while nothing
/// moves, and a wait before a retry counts down).
struct Bar {
    quiet: bool,
    /// The latest report.
    latest: Option<Progress>,
    /// When the latest report's phase began.
    phase_since: Instant,
    last_draw: Option<Instant>,
    session: Option<String>,
    /// (time, bytes sent) of the reports of the last few seconds, for the rate.
    samples: VecDeque<(Instant, u64)>,
}

/// Byte updates closer together than this are not drawn.
const REDRAW_EVERY: Duration = Duration::from_millis(100);
/// How often the timer redraws.
const TICK: Duration = Duration::from_millis(250);
/// The rate is averaged over this long.
const RATE_WINDOW: Duration = Duration::from_secs(5);

impl Bar {
    fn new(quiet: bool) -> Self {
        Self {
            quiet,
            latest: None,
            phase_since: Instant::now(),
            last_draw: None,
            session: None,
            samples: VecDeque::new(),
        }
    }

    /// A progress report from the client.
    fn report(&mut self, p: &Progress, now: Instant) {
        if p.session_id.is_some() && p.session_id != self.session {
            self.session = p.session_id.clone();
            match (&self.session, self.quiet) {
                (Some(id), true) => eprintln!("{}", session_line(id)),
                // Over the bar, which is drawn again below it.
                (Some(id), false) => eprintln!("\r{}\x1b[K", session_line(id)),
                (None, _) => {}
            }
        }
        if self.quiet {
            return;
        }
        let new_phase = is_new_phase(self.latest.as_ref().map(|l| &l.phase), &p.phase);
        if new_phase {
            self.phase_since = now;
        }
        self.samples.push_back((now, p.sent()));
        self.latest = Some(p.clone());
        let due = self.last_draw.is_none_or(|t| now - t >= REDRAW_EVERY);
        if new_phase || due {
            self.draw(now);
        }
    }

    /// The timer: redraws what is there.
    fn tick(&mut self, now: Instant) {
        if !self.quiet && self.latest.is_some() {
            self.draw(now);
        }
    }

    fn draw(&mut self, now: Instant) {
        self.last_draw = Some(now);
        let Some(view) = self.view(now) else {
            return;
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{}\x1b[K", status_line(&view));
        let _ = err.flush();
    }

    /// What the status line shows now.
    fn view(&mut self, now: Instant) -> Option<View> {
        let p = self.latest.as_ref()?;
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now - *t > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        let sent = p.sent();
        // Bytes per second since the oldest sample of the window, up to now: it falls to
        // zero while nothing moves.
        let rate = match self.samples.front() {
            Some((t0, b0)) if now > *t0 && sent >= *b0 => {
                (sent - b0) as f64 / (now - *t0).as_secs_f64()
            }
            _ => 0.0,
        };
        let activity = match &p.phase {
            UploadPhase::Connecting => Activity::Connecting { retries: p.retries },
            UploadPhase::Retrying { delay, reason, .. } => Activity::Retrying {
                left: delay.saturating_sub(now - self.phase_since),
                reason: reason.clone(),
            },
            UploadPhase::DownloadingReply { received, total } => Activity::DownloadingReply {
                received: *received,
                total: *total,
            },
            UploadPhase::Closing => Activity::Closing,
            UploadPhase::Finished => Activity::Finished,
            _ => Activity::Uploading,
        };
        Some(View {
            total: p.total,
            sent,
            rate,
            activity,
        })
    }
}

/// Whether `next` starts a new phase (drawn at once) rather than updating the bytes of the
/// current one (drawn at most every [`REDRAW_EVERY`]).
fn is_new_phase(last: Option<&UploadPhase>, next: &UploadPhase) -> bool {
    match (last, next) {
        (None, _) => true,
        // Each retry is reported once, as its wait begins: always news.
        (_, UploadPhase::Retrying { .. }) => true,
        (Some(last), next) => std::mem::discriminant(last) != std::mem::discriminant(next),
    }
}

fn session_line(id: &str) -> String {
    format!("session {id} (continue an interrupted upload with --resume {id})")
}

/// Everything the status line shows.
#[derive(Debug, Clone, PartialEq)]
struct View {
    total: u64,
    sent: u64,
    /// Bytes per second, lately.
    rate: f64,
    activity: Activity,
}

/// What the upload is doing, as the status line says it.
#[derive(Debug, Clone, PartialEq)]
enum Activity {
    Connecting { retries: u32 },
    Uploading,
    Retrying { left: Duration, reason: String },
    DownloadingReply { received: u64, total: Option<u64> },
    Closing,
    Finished,
}

/// The status line: a bar, the percentage, the bytes, and what is going on.
fn status_line(view: &View) -> String {
    const WIDTH: usize = 30;
    let fraction = if view.total == 0 {
        1.0
    } else {
        view.sent as f64 / view.total as f64
    };
    let filled = ((fraction * WIDTH as f64) as usize).min(WIDTH);
    let mut line = format!(
        "[{}{}] {:>3.0}% {} / {}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        fraction * 100.0,
        human(view.sent),
        human(view.total),
    );
    let moving = format!("  {}/s", human(view.rate as u64));
    match &view.activity {
        Activity::Connecting { retries: 0 } => line.push_str("  connecting"),
        Activity::Connecting { retries } => {
            line.push_str(&format!("  connecting (retry {retries})"));
        }
        Activity::Uploading => {
            line.push_str(&moving);
            if view.rate >= 1.0 && view.sent < view.total {
                let secs = ((view.total - view.sent) as f64 / view.rate) as u64;
                line.push_str(&format!("  ETA {}:{:02}", secs / 60, secs % 60));
            }
        }
        Activity::Retrying { left, reason } => {
            // Whole seconds, rounded up: "in 0 s" only once the wait is over.
            let secs = left.as_millis().div_ceil(1000);
            line.push_str(&format!(
                "  retrying in {secs} s ({})",
                truncate(&tidy(reason), 60)
            ));
        }
        Activity::DownloadingReply { received, total } => {
            line.push_str(&moving);
            line.push_str(&format!("  reply {}", human(*received)));
            if let Some(total) = total {
                line.push_str(&format!(" / {}", human(*total)));
            }
        }
        Activity::Closing => line.push_str("  closing"),
        Activity::Finished => {}
    }
    line
}

/// A cause as the OS words it ("Connection refused (os error 111)"), as a phrase for the
/// middle of a line ("connection refused").
fn tidy(reason: &str) -> String {
    let reason = match reason.rfind(" (os error ") {
        Some(i) if reason.ends_with(')') => &reason[..i],
        _ => reason,
    };
    let mut chars = reason.chars();
    match (chars.next(), chars.next()) {
        // "Connection refused" reads as a phrase; "BUSY" or "HTTP" stay as they are.
        (Some(first), Some(second)) if first.is_uppercase() && second.is_lowercase() => first
            .to_lowercase()
            .chain(reason[first.len_utf8()..].chars())
            .collect(),
        _ => reason.to_owned(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn view(sent: u64, rate: f64, activity: Activity) -> View {
        View {
            total: 4 << 20,
            sent,
            rate,
            activity,
        }
    }

    #[test]
    fn a_wait_before_a_retry_counts_down_with_its_reason() {
        let waiting = |left| {
            status_line(&view(
                1 << 20,
                5000.0,
                Activity::Retrying {
                    left,
                    reason: "Connection refused (os error 111)".into(),
                },
            ))
        };
        let line = waiting(Duration::from_millis(3_400));
        assert!(
            line.contains("retrying in 4 s (connection refused)"),
            "{line}"
        );
        assert!(line.contains(" 25% 1.0 MiB / 4.0 MiB"), "{line}");
        // No rate or ETA while waiting: nothing moves.
        assert!(!line.contains("/s") && !line.contains("ETA"), "{line}");
        assert!(waiting(Duration::from_millis(900)).contains("retrying in 1 s"));
        assert!(waiting(Duration::ZERO).contains("retrying in 0 s"));
        let long = status_line(&view(
            0,
            0.0,
            Activity::Retrying {
                left: Duration::from_secs(60),
                reason: "x".repeat(200),
            },
        ));
        assert!(long.contains(&format!("({}...)", "x".repeat(60))), "{long}");
    }

    #[test]
    fn every_phase_says_what_it_is() {
        let line = |activity| status_line(&view(2 << 20, 1024.0 * 1024.0, activity));
        assert!(line(Activity::Connecting { retries: 0 }).ends_with("  connecting"));
        assert!(line(Activity::Connecting { retries: 3 }).ends_with("  connecting (retry 3)"));
        let uploading = line(Activity::Uploading);
        assert!(uploading.contains("1.0 MiB/s  ETA 0:02"), "{uploading}");
        assert!(uploading.starts_with(&format!("[{}{}]  50%", "#".repeat(15), ".".repeat(15))));
        let stalled = status_line(&view(2 << 20, 0.0, Activity::Uploading));
        assert!(stalled.ends_with("0 B/s"), "{stalled}");
        assert!(line(Activity::Closing).ends_with("  closing"));
        let reply = line(Activity::DownloadingReply {
            received: 512,
            total: Some(2048),
        });
        assert!(reply.ends_with("reply 512 B / 2.0 KiB"), "{reply}");
        let done = status_line(&View {
            total: 0,
            sent: 0,
            rate: 0.0,
            activity: Activity::Finished,
        });
        assert!(done.contains("100% 0 B / 0 B"), "{done}");
    }

    #[test]
    fn phase_changes_are_drawn_byte_updates_are_throttled() {
        let retrying = UploadPhase::Retrying {
            delay: Duration::from_secs(1),
            error: "Fragment: ...".into(),
            reason: "Connection reset by peer (os error 104)".into(),
        };
        assert!(is_new_phase(None, &UploadPhase::Connecting));
        assert!(is_new_phase(Some(&UploadPhase::Connecting), &retrying));
        assert!(is_new_phase(Some(&UploadPhase::Uploading), &retrying));
        assert!(is_new_phase(Some(&retrying), &retrying));
        assert!(is_new_phase(Some(&retrying), &UploadPhase::Connecting));
        assert!(is_new_phase(
            Some(&UploadPhase::Uploading),
            &UploadPhase::Finished
        ));
        assert!(!is_new_phase(
            Some(&UploadPhase::Uploading),
            &UploadPhase::Uploading
        ));
        let reply = |received| UploadPhase::DownloadingReply {
            received,
            total: None,
        };
        assert!(!is_new_phase(Some(&reply(1)), &reply(2)));
    }

    #[test]
    fn os_causes_read_as_phrases() {
        assert_eq!(
            tidy("Connection refused (os error 111)"),
            "connection refused"
        );
        assert_eq!(
            tidy("Connection reset by peer (os error 104)"),
            "connection reset by peer"
        );
        assert_eq!(tidy("operation timed out"), "operation timed out");
        assert_eq!(
            tidy("503 Service Unavailable, ERROR_BUSY"),
            "503 Service Unavailable, ERROR_BUSY"
        );
        assert_eq!(
            tidy("HTTP status server error (502)"),
            "HTTP status server error (502)"
        );
        assert_eq!(tidy(""), "");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert_eq!(parse_size("5 KiB"), Ok(5 << 10));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("1T").is_err());
        assert_eq!(human(1536), "1.5 KiB");
    }
}
