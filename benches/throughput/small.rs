//! (b) Small fragments: requests per second of 64 KiB fragments against as many 64 KiB POSTs
//! (see the program's documentation for the method and the target).

use std::path::Path;

use bytes::Bytes;

use crate::Error;
use crate::cli::Options;
use crate::report::{Summary, median, mib, spread};
use crate::scenario::{Scenario, Workload, final_secs, measure};

/// Size of every fragment / POST body in (b) and (e).
pub(crate) const SMALL_FRAGMENT: usize = 64 << 10;

pub(crate) fn part_b(
    options: &Options,
    payload: &Bytes,
    base: &Path,
    summary: &mut Summary,
) -> Result<(), Error> {
    let fragment = payload.slice(..SMALL_FRAGMENT);
    let n = options.b_fragments;
    println!();
    println!(
        "(b) {n} requests of {} KiB: one sequential upload / POST stream, and {} at once \
         (each on its own connection); {} run(s)",
        SMALL_FRAGMENT >> 10,
        options.b_streams,
        options.runs
    );
    println!(
        "{:>3} {:>7}  {:<32} {:>9} {:>7} {:>8} {:>8} {:>14} {:>9}",
        "run",
        "streams",
        "server",
        "req/s",
        "MB/s",
        "time s",
        "final s",
        "srv CPU us/req",
        "peak RSS"
    );
    println!("{}", "-".repeat(106));
    let mut shapes = vec![1];
    if options.b_streams > 1 {
        shapes.push(options.b_streams);
    }
    // rates[shape] = (bits req/s, baseline req/s) per run; cpu[shape] the same in server CPU
    // microseconds per request.
    let mut rates: Vec<Vec<(f64, f64)>> = vec![Vec::new(); shapes.len()];
    let mut cpu: Vec<Vec<(f64, f64)>> = vec![Vec::new(); shapes.len()];
    // For context, the sequential upload with `sync_on_commit(false)`: how much of the gap is
    // the commit's durability (the write-back while the part grows, and the final fsync).
    let mut no_sync: Vec<f64> = Vec::new();
    for run in 1..=options.runs {
        for (shape, &streams) in shapes.iter().enumerate() {
            let work = Workload {
                fragment: fragment.clone(),
                per_stream: n / streams as u64,
                streams,
            };
            let mut pair = [0.0; 3];
            let mut cpu_pair = [0.0; 3];
            let scenarios: &[Scenario] = if streams == 1 {
                &[
                    Scenario::Bits,
                    Scenario::Baseline,
                    Scenario::BitsNoCommitSync,
                ]
            } else {
                &[Scenario::Bits, Scenario::Baseline]
            };
            for ((slot, cpu_slot), &scenario) in
                pair.iter_mut().zip(cpu_pair.iter_mut()).zip(scenarios)
            {
                let m = measure(scenario, &work, base, options.warm_up.then_some(payload))?;
                let requests = work.requests() as f64;
                *slot = requests / m.secs;
                *cpu_slot = m.server_cpu_secs * 1e6 / requests;
                println!(
                    "{:>3} {:>7}  {:<32} {:>9.0} {:>7.1} {:>8.3} {:>8} {:>14.0} {:>9.1}",
                    run,
                    streams,
                    scenario.label(),
                    *slot,
                    m.mb_per_sec(work.total()),
                    m.secs,
                    final_secs(&m),
                    m.server_cpu_secs * 1e6 / requests,
                    mib(m.peak_rss_kib)
                );
            }
            println!(
                "{:>3} {:>7}  ratio bits fragments/s / baseline POSTs/s: {:.2}x",
                "",
                "",
                pair[0] / pair[1]
            );
            rates[shape].push((pair[0], pair[1]));
            cpu[shape].push((cpu_pair[0], cpu_pair[1]));
            if streams == 1 {
                no_sync.push(pair[2] / pair[1]);
            }
        }
    }
    if options.runs > 1 {
        println!("spread over {} runs (min / median / max)", options.runs);
        for (shape, &streams) in shapes.iter().enumerate() {
            let bits: Vec<f64> = rates[shape].iter().map(|r| r.0).collect();
            let plain: Vec<f64> = rates[shape].iter().map(|r| r.1).collect();
            let ratio: Vec<f64> = rates[shape].iter().map(|r| r.0 / r.1).collect();
            println!(
                "    {streams:>7}  bits req/s {}   baseline req/s {}   ratio {}",
                spread(&bits, 0),
                spread(&plain, 0),
                spread(&ratio, 2)
            );
        }
    }
    let bits: Vec<f64> = rates[0].iter().map(|r| r.0).collect();
    let plain: Vec<f64> = rates[0].iter().map(|r| r.1).collect();
    let ratio: Vec<f64> = rates[0].iter().map(|r| r.0 / r.1).collect();
    let ratio = median(&ratio);
    summary.target(
        format!("(b) {n} x 64 KiB sequential: fragments/s / POSTs/s"),
        format!(
            "{ratio:.2} ({:.0} / {:.0} /s)",
            median(&bits),
            median(&plain)
        ),
        ">= 0.85",
        ratio >= 0.85,
    );
    let bits_cpu: Vec<f64> = cpu[0].iter().map(|c| c.0).collect();
    let plain_cpu: Vec<f64> = cpu[0].iter().map(|c| c.1).collect();
    summary.context(
        "(b) server CPU us per fragment / per POST".into(),
        format!(
            "{:.0} / {:.0} us ({:+.0} %)",
            median(&bits_cpu),
            median(&plain_cpu),
            (median(&bits_cpu) / median(&plain_cpu) - 1.0) * 100.0
        ),
    );
    summary.context(
        "(b) the same with sync_on_commit(false)".into(),
        format!("{:.2}", median(&no_sync)),
    );
    Ok(())
}
