//! (d) Memory: the bits server's peak RSS does not grow with the upload (see the program's
//! documentation for the method and the targets).

use std::path::Path;

use bytes::Bytes;

use crate::cli::Options;
use crate::measure::free_bytes;
use crate::report::{Summary, mib};
use crate::scenario::{Measurement, Scenario, Workload, measure};
use crate::{DIR_ENV, Error, FRAGMENT};

pub(crate) fn part_d(
    options: &Options,
    payload: &Bytes,
    base: &Path,
    from_a: Option<Measurement>,
    summary: &mut Summary,
) -> Result<(), Error> {
    let (small, large) = (options.a_total, options.d_total);
    println!();
    println!(
        "(d) bits server peak RSS for one {} MiB and one {} MiB upload in {} MiB fragments, \
         a fresh server each",
        small >> 20,
        large >> 20,
        FRAGMENT >> 20
    );
    let workload = |total: u64| Workload {
        fragment: payload.clone(),
        per_stream: total / FRAGMENT as u64,
        streams: 1,
    };
    let warm = options.warm_up.then_some(payload);
    let (small_m, reused) = match from_a {
        Some(m) => (m, true),
        None => (
            measure(Scenario::Bits, &workload(small), base, warm)?,
            false,
        ),
    };
    let avail = free_bytes(base)?;
    let needed = large + (256 << 20);
    if avail < needed {
        return Err(format!(
            "{} has {} MiB free; the {} MiB upload needs {} MiB (use --d-mib or {DIR_ENV})",
            base.display(),
            avail >> 20,
            large >> 20,
            needed >> 20
        )
        .into());
    }
    let large_m = measure(Scenario::Bits, &workload(large), base, warm)?;
    println!(
        "    {:>10} {:>9} {:>8} {:>10} {:>9}",
        "upload MiB", "MB/s", "time s", "idle RSS", "peak RSS"
    );
    for (total, m, note) in [
        (
            small,
            &small_m,
            if reused {
                "  (the bits run of (a))"
            } else {
                ""
            },
        ),
        (large, &large_m, ""),
    ] {
        println!(
            "    {:>10} {:>9.1} {:>8.3} {:>10.1} {:>9.1}{note}",
            total >> 20,
            m.mb_per_sec(total),
            m.secs,
            mib(m.idle_rss_kib),
            mib(m.peak_rss_kib)
        );
    }
    let ratio = large_m.peak_rss_kib as f64 / small_m.peak_rss_kib as f64;
    println!(
        "    peak RSS ratio {} MiB / {} MiB: {ratio:.3}",
        large >> 20,
        small >> 20
    );
    for (total, m) in [(small, &small_m), (large, &large_m)] {
        summary.target(
            format!("(d) bits peak RSS, {} MiB upload", total >> 20),
            format!("{:.1} MiB", mib(m.peak_rss_kib)),
            "< 64 MiB",
            m.peak_rss_kib < 64 << 10,
        );
    }
    summary.target(
        format!("(d) peak RSS {} MiB / {} MiB", large >> 20, small >> 20),
        format!("{ratio:.3}"),
        "0.90 ..= 1.10",
        (0.9..=1.1).contains(&ratio),
    );
    Ok(())
}
