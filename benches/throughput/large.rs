//! (a) Large fragments: MB/s of one large upload in 8 MiB requests, bits against the
//! baseline (see the program's documentation for the method and the target).

use std::path::Path;

use bytes::Bytes;

use crate::cli::Options;
use crate::report::{Summary, median, mib, spread};
use crate::scenario::{Measurement, Scenario, Workload, final_secs, measure};
use crate::{Error, FRAGMENT};

/// (a); returns the bits measurement whose peak RSS is the median, for (d).
pub(crate) fn part_a(
    options: &Options,
    payload: &Bytes,
    base: &Path,
    summary: &mut Summary,
) -> Result<Measurement, Error> {
    let total = options.a_total;
    let work = Workload {
        fragment: payload.clone(),
        per_stream: total / FRAGMENT as u64,
        streams: 1,
    };
    println!();
    println!(
        "(a) one {} MiB upload in {} MiB requests, one kept-alive connection; {} run(s)",
        total >> 20,
        FRAGMENT >> 20,
        options.runs
    );
    println!(
        "{:>3}  {:<32} {:>9} {:>8} {:>8} {:>10} {:>9} {:>9}",
        "run", "server", "MB/s", "time s", "final s", "srv CPU s", "idle RSS", "peak RSS"
    );
    println!("{}", "-".repeat(96));
    const ALL: [Scenario; 4] = [
        Scenario::Bits,
        Scenario::Baseline,
        Scenario::BaselineFsync,
        Scenario::BitsNoCommitSync,
    ];
    let mut results: Vec<[Measurement; 4]> = Vec::with_capacity(options.runs);
    for run in 1..=options.runs {
        let mut row = [None; 4];
        for (slot, scenario) in row.iter_mut().zip(ALL) {
            let m = measure(scenario, &work, base, options.warm_up.then_some(payload))?;
            print_a_row(&run.to_string(), scenario, &m, total);
            *slot = Some(m);
        }
        let [Some(bits), Some(plain), Some(fsync), Some(fast)] = row else {
            return Err("a scenario was not measured".into());
        };
        let b = bits.mb_per_sec(total);
        println!(
            "{:>3}  ratio bits / baseline: {:.2}x vs fsync at end (judged), {:.2}x vs no fsync; \
             sync_on_commit(false) / baseline (no fsync): {:.2}x",
            "",
            b / fsync.mb_per_sec(total),
            b / plain.mb_per_sec(total),
            fast.mb_per_sec(total) / plain.mb_per_sec(total)
        );
        results.push([bits, plain, fsync, fast]);
    }

    let speeds =
        |i: usize| -> Vec<f64> { results.iter().map(|r| r[i].mb_per_sec(total)).collect() };
    let ratios: Vec<f64> = results
        .iter()
        .map(|r| r[0].mb_per_sec(total) / r[1].mb_per_sec(total))
        .collect();
    let fsync_ratios: Vec<f64> = results
        .iter()
        .map(|r| r[0].mb_per_sec(total) / r[2].mb_per_sec(total))
        .collect();
    if options.runs > 1 {
        println!("spread over {} runs (min / median / max)", options.runs);
        for (i, scenario) in ALL.into_iter().enumerate() {
            let peaks: Vec<f64> = results.iter().map(|r| mib(r[i].peak_rss_kib)).collect();
            println!(
                "     {:<32} MB/s {}   peak RSS MiB {}",
                scenario.label(),
                spread(&speeds(i), 0),
                spread(&peaks, 1)
            );
        }
        println!(
            "     {:<32} {}",
            "ratio bits / baseline (no fsync)",
            spread(&ratios, 2)
        );
        println!(
            "     {:<32} {}",
            "ratio bits / baseline (fsync)",
            spread(&fsync_ratios, 2)
        );
    }
    // Judged against the baseline that makes its file as durable as a commit does (an fsync
    // of the file and its folder after the last POST).
    let ratio = median(&fsync_ratios);
    summary.target(
        format!(
            "(a) MB/s bits / baseline with fsync, {} MiB in 8 MiB",
            total >> 20
        ),
        format!(
            "{ratio:.2} ({:.0} / {:.0} MB/s)",
            median(&speeds(0)),
            median(&speeds(2))
        ),
        ">= 0.95",
        ratio >= 0.95,
    );
    let plain_ratio = median(&ratios);
    summary.context(
        "(a) the same against the baseline without fsync".into(),
        format!(
            "{plain_ratio:.2} ({:.0} / {:.0} MB/s)",
            median(&speeds(0)),
            median(&speeds(1))
        ),
    );
    let fast_ratios: Vec<f64> = results
        .iter()
        .map(|r| r[3].mb_per_sec(total) / r[1].mb_per_sec(total))
        .collect();
    let fast_ratio = median(&fast_ratios);
    summary.context(
        "(a) sync_on_commit(false) / baseline without fsync".into(),
        format!(
            "{fast_ratio:.2} ({:.0} / {:.0} MB/s)",
            median(&speeds(3)),
            median(&speeds(1))
        ),
    );
    let mut bits: Vec<Measurement> = results.iter().map(|r| r[0]).collect();
    bits.sort_by_key(|m| m.peak_rss_kib);
    Ok(bits[bits.len() / 2])
}

fn print_a_row(run: &str, scenario: Scenario, m: &Measurement, total: u64) {
    println!(
        "{:>3}  {:<32} {:>9.1} {:>8.3} {:>8} {:>10.2} {:>9.1} {:>9.1}",
        run,
        scenario.label(),
        m.mb_per_sec(total),
        m.secs,
        final_secs(m),
        m.server_cpu_secs,
        mib(m.idle_rss_kib),
        mib(m.peak_rss_kib)
    );
}
