//! (e) What a metrics recorder costs: the sequential 64 KiB upload of (b) to a bits server
//! with a Prometheus recorder installed behind a switch, its fragments sent in blocks with the
//! recorder off or on, and a look at the Prometheus text the recorder renders (see
//! the program's documentation for the method and the target).

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;

use crate::Error;
use crate::cli::Options;
use crate::client::{close_session, create_session, send_fragment};
use crate::measure::threads_cpu_secs;
use crate::payload::{verify, warm_up};
use crate::report::{Summary, median, spread};
use crate::scenario::stream_file;
use crate::servers::{self, RECORDER_ENV};
use crate::small::SMALL_FRAGMENT;

/// The aim: a recorder costs at most this share of the fragments per second.
const MAX_COST: f64 = 0.05;
/// Fragments sent before the recorder is switched.
const BLOCK: u64 = 32;
/// The rows of a run: the recorder off, on.
const LABELS: [&str; 2] = ["recorder off", "recorder on (Prometheus)"];

/// What the timed fragments sent with the recorder off, or on, took.
#[derive(Debug, Clone, Copy)]
struct Share {
    fragments: u64,
    /// The client's time from sending each block's first fragment to its last Ack.
    secs: f64,
    /// The server's CPU time over those blocks (`None`: not measurable on this kernel).
    cpu_secs: Option<f64>,
}

impl Share {
    fn rate(&self) -> f64 {
        self.fragments as f64 / self.secs
    }

    fn cpu_us(&self) -> Option<f64> {
        self.cpu_secs.map(|c| c * 1e6 / self.fragments as f64)
    }
}

pub(crate) fn part_e(
    options: &Options,
    payload: &Bytes,
    base: &Path,
    summary: &mut Summary,
) -> Result<(), Error> {
    let n = options.b_fragments;
    if n < 2 * BLOCK + 2 {
        return Err(format!("(e) needs --b-fragments of at least {}", 2 * BLOCK + 2).into());
    }
    let fragment = payload.slice(..SMALL_FRAGMENT);
    println!();
    println!(
        "(e) one sequential upload of {n} fragments of {} KiB in blocks of {BLOCK}, the \
         recorder off or on for each block (pairs of blocks, one of each, in a random order; \
         the first and last fragment untimed); {} run(s), each in a fresh server",
        SMALL_FRAGMENT >> 10,
        options.e_runs
    );
    println!(
        "{:>3}  {:<26} {:>9} {:>9} {:>8} {:>15}",
        "run", "", "fragments", "frag/s", "time s", "srv CPU us/frag"
    );
    println!("{}", "-".repeat(76));
    let warm = options.warm_up.then_some(payload);
    let mut runs: Vec<[Share; 2]> = Vec::with_capacity(options.e_runs);
    // Every run's pairs of blocks: the off block's time / the on block's.
    let mut all_pairs: Vec<f64> = Vec::new();
    let mut text = String::new();
    for run in 1..=options.e_runs {
        let (shares, pairs, scraped) = run_once(run, &fragment, n, base, warm)?;
        for (label, share) in LABELS.iter().zip(&shares) {
            println!(
                "{:>3}  {:<26} {:>9} {:>9.0} {:>8.3} {:>15}",
                run,
                label,
                share.fragments,
                share.rate(),
                share.secs,
                share
                    .cpu_us()
                    .map_or_else(|| "-".into(), |c| format!("{c:.1}"))
            );
        }
        let [off, on] = shares;
        let ratio = on.rate() / off.rate();
        let cpu = match (on.cpu_us(), off.cpu_us()) {
            (Some(on), Some(off)) => format!(
                ", srv CPU {:+.1} us/frag ({:+.1} %)",
                on - off,
                (on / off - 1.0) * 100.0
            ),
            _ => String::new(),
        };
        let typical = median(&pairs);
        println!(
            "{:>3}  on / off: median of {} pairs of blocks {typical:.3}x (cost {:+.1} %), \
             totals {ratio:.3}x ({:+.1} %){cpu}",
            "",
            pairs.len(),
            (1.0 - typical) * 100.0,
            (1.0 - ratio) * 100.0
        );
        runs.push(shares);
        all_pairs.extend(pairs);
        text = scraped;
    }

    let rates = |i: usize| -> Vec<f64> { runs.iter().map(|r| r[i].rate()).collect() };
    let ratios: Vec<f64> = runs.iter().map(|r| r[1].rate() / r[0].rate()).collect();
    // Each run's server CPU per fragment, off and on, and on / off - 1 in %.
    let cpu: Option<(Vec<f64>, Vec<f64>, Vec<f64>)> = runs
        .iter()
        .map(|r| {
            let (off, on) = (r[0].cpu_us()?, r[1].cpu_us()?);
            Some((off, on, (on / off - 1.0) * 100.0))
        })
        .collect::<Option<Vec<_>>>()
        .map(|v| {
            (
                v.iter().map(|c| c.0).collect(),
                v.iter().map(|c| c.1).collect(),
                v.iter().map(|c| c.2).collect(),
            )
        });
    if options.e_runs > 1 {
        println!("spread over {} runs (min / median / max)", options.e_runs);
        println!(
            "     frag/s off {}   on {}   ratio on / off {}",
            spread(&rates(0), 0),
            spread(&rates(1), 0),
            spread(&ratios, 3)
        );
        if let Some((off, on, extra)) = &cpu {
            println!(
                "     srv CPU us/frag off {}   on {}   on / off {} %",
                spread(off, 1),
                spread(on, 1),
                spread(extra, 1)
            );
        }
    }
    // Judged on the pairs of blocks: a stall of the machine (write-back, another process)
    // slows one block of a pair and moves a run's totals by several percent either way, but
    // hardly the median of its pairs.
    let cost = 1.0 - median(&all_pairs);
    println!(
        "median over all {} pairs of blocks: on / off {:.3}x (cost {:+.1} %)",
        all_pairs.len(),
        1.0 - cost,
        cost * 100.0
    );
    summary.target(
        format!("(e) recorder cost, {n} x 64 KiB: frag/s"),
        format!(
            "{:.1} % (median of {} pairs)",
            cost * 100.0,
            all_pairs.len()
        ),
        "<= 5 %",
        cost <= MAX_COST,
    );
    summary.context(
        "(e) the same from the runs' totals (median)".into(),
        format!(
            "{:.1} % ({:.0} / {:.0} /s)",
            (1.0 - median(&ratios)) * 100.0,
            median(&rates(1)),
            median(&rates(0))
        ),
    );
    if let Some((off, on, extra)) = &cpu {
        // The median of the runs' own comparisons.
        summary.context(
            "(e) srv CPU us/frag, recorder on / off".into(),
            format!(
                "{:+.1} % ({:.1} / {:.1})",
                median(extra),
                median(on),
                median(off)
            ),
        );
    }
    let families = families(&text);
    let series: usize = families.iter().map(|f| f.1).sum();
    println!(
        "Prometheus text after the last run: {series} series in {} metrics, no session id or \
         file name in it",
        families.len()
    );
    for (name, count) in &families {
        println!("     {count:>4}  {name}");
    }
    summary.context(
        "(e) Prometheus series after one upload".into(),
        format!("{series} in {} metrics, no ids", families.len()),
    );
    Ok(())
}

/// One run: a fresh server with the recorder, the upload, the recorder's Prometheus text
/// (checked), and the check of the file.
fn run_once(
    run: usize,
    fragment: &Bytes,
    n: u64,
    base: &Path,
    warm_up_with: Option<&Bytes>,
) -> Result<([Share; 2], Vec<f64>, String), Error> {
    let len = fragment.len() as u64;
    let total = len * n;
    let root = tempfile::Builder::new()
        .prefix("axum-bits-bench-")
        .tempdir_in(base)?;
    if let Some(payload) = warm_up_with {
        warm_up(root.path(), total, payload)?;
    }
    let server = servers::start("bits", root.path(), &[(RECORDER_ENV, "1")])?;
    let (pid, port) = (server.pid(), server.addr().port());
    let url = format!("http://127.0.0.1:{port}/{}", stream_file(0));
    // A fresh runtime per run: dropping it closes the client's pooled connection.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (shares, pairs, recorded, session_id) = runtime.block_on(async {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let share = Share {
            fragments: 0,
            secs: 0.0,
            cpu_secs: Some(0.0),
        };
        let mut shares = [share; 2];
        // Create-Session, the first fragment (which creates the part file), the last (which
        // commits) and Close-Session are sent untimed with the recorder on, so that every
        // metric is in the text.
        switch(&client, port, true).await?;
        let session = create_session(&client, &url).await?;
        let session_id = session.to_str()?.to_owned();
        let mut offset = send_fragment(&client, &url, &session, fragment, 0, total).await?;
        let mut recorded = 1;
        let timed_end = total - len;
        let mut order = BlockOrder::new(run);
        // The time of the current pair's full blocks (off, on), and each pair's on / off.
        let mut pair: [Option<f64>; 2] = [None, None];
        let mut pairs = Vec::new();
        while offset < timed_end {
            let on = order.next_is_on();
            switch(&client, port, on).await?;
            let cpu_before = threads_cpu_secs(pid)?;
            let started = Instant::now();
            let mut sent = 0;
            while sent < BLOCK && offset < timed_end {
                offset = send_fragment(&client, &url, &session, fragment, offset, total).await?;
                sent += 1;
            }
            let secs = started.elapsed().as_secs_f64();
            let cpu_after = threads_cpu_secs(pid)?;
            let share = &mut shares[usize::from(on)];
            share.fragments += sent;
            share.secs += secs;
            share.cpu_secs = match (share.cpu_secs, cpu_before, cpu_after) {
                (Some(sum), Some(before), Some(after)) => Some(sum + after - before),
                _ => None,
            };
            if on {
                recorded += sent;
            }
            pair[usize::from(on)] = (sent == BLOCK).then_some(secs);
            if let [Some(off), Some(on)] = pair {
                pairs.push(off / on);
                pair = [None, None];
            }
        }
        switch(&client, port, true).await?;
        send_fragment(&client, &url, &session, fragment, offset, total).await?;
        close_session(&client, &url, session).await?;
        recorded += 1;
        Ok::<_, Error>((shares, pairs, recorded, session_id))
    })?;
    drop(runtime);
    let text = scrape(port)?;
    check(&text, recorded, &session_id)?;
    server.stop();
    verify(&root.path().join(stream_file(0)), total, fragment)?;
    root.close()?;
    Ok((shares, pairs, text))
}

/// The state of each block: blocks go in pairs, one off and one on, in an order drawn for
/// each pair (xorshift64, seeded with the run).
///
/// Not simply off, on, off, on: whatever recurs every even number of blocks (such as the
/// server's write-back of a part every 32 MiB, 16 blocks of 32 fragments) would fall in
/// blocks of one state; in one full run the measured cost flipped sign with the first block's
/// state, by about 10 %.
struct BlockOrder {
    state: u64,
    /// The second block of the current pair, if its first has been handed out.
    pending: Option<bool>,
}

impl BlockOrder {
    fn new(run: usize) -> Self {
        Self {
            state: 0x9E37_79B9_7F4A_7C15 ^ (run as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9),
            pending: None,
        }
    }

    fn next_is_on(&mut self) -> bool {
        if let Some(on) = self.pending.take() {
            return on;
        }
        let x = &mut self.state;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        let on = (*x >> 32) & 1 == 1;
        self.pending = Some(!on);
        on
    }
}

/// `PUT /recorder/on` or `/recorder/off`.
async fn switch(client: &reqwest::Client, port: u16, on: bool) -> Result<(), Error> {
    let to = if on { "on" } else { "off" };
    let reply = client
        .put(format!("http://127.0.0.1:{port}/recorder/{to}"))
        .send()
        .await?;
    if !reply.status().is_success() {
        return Err(format!("PUT /recorder/{to}: {}", reply.status()).into());
    }
    Ok(())
}

/// `GET /metrics`: the recorder's Prometheus text.
fn scrape(port: u16) -> Result<String, Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let reply = client
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await?;
        if reply.status() != reqwest::StatusCode::OK {
            return Err(format!("GET /metrics: {}", reply.status()).into());
        }
        Ok(reply.text().await?)
    })
}

/// The rendered text must count the `n` fragments sent with the recorder on (so the switch
/// works both ways), and hold neither the upload's session id nor any other GUID (with or
/// without braces), nor its file name.
fn check(text: &str, n: u64, session_id: &str) -> Result<(), Error> {
    let fragments = text.lines().find_map(|line| {
        let labels = line.strip_prefix("bits_packets_total{")?;
        (labels.contains("packet=\"fragment\"") && labels.contains("outcome=\"ok\""))
            .then(|| line.rsplit(' ').next()?.parse::<f64>().ok())?
    });
    if fragments != Some(n as f64) {
        return Err(format!(
            "the recorder's bits_packets_total for ok fragments is {fragments:?}, expected the \
             {n} sent with it on"
        )
        .into());
    }
    let bare = session_id.trim_matches(['{', '}']);
    if text
        .to_ascii_lowercase()
        .contains(&bare.to_ascii_lowercase())
    {
        return Err(format!("the session id {session_id} in the Prometheus text").into());
    }
    if let Some(guid) = find_guid(text) {
        return Err(
            format!("a GUID ({guid}) in the Prometheus text: a session id as a label?").into(),
        );
    }
    let file = stream_file(0);
    if text.contains(&file) {
        return Err(format!("the file name {file} in the Prometheus text").into());
    }
    Ok(())
}

/// The first `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (hex digits) in `text`.
fn find_guid(text: &str) -> Option<&str> {
    const SHAPE: &[u8; 36] = b"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx";
    let bytes = text.as_bytes();
    (0..bytes.len().saturating_sub(SHAPE.len() - 1)).find_map(|start| {
        let window = &bytes[start..start + SHAPE.len()];
        let fits = window.iter().zip(SHAPE).all(|(&b, &s)| {
            if s == b'-' {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
        fits.then(|| text.get(start..start + SHAPE.len()))?
    })
}

/// The metrics of a Prometheus text (by their `# TYPE` lines) with the number of series
/// (sample lines) of each.
fn families(text: &str) -> Vec<(String, usize)> {
    let mut families: Vec<(String, usize)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let name = words.next().unwrap_or_default();
            let kind = words.next().unwrap_or_default();
            families.push((format!("{name} ({kind})"), 0));
        } else if !line.is_empty() && !line.starts_with('#') {
            match families.last_mut() {
                Some(family) => family.1 += 1,
                None => families.push(("(untyped)".into(), 1)),
            }
        }
    }
    families
}
