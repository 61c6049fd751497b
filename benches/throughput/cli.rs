//! The command line: the flags, their defaults and their `--quick` sizes.

use std::time::Duration;

use crate::FRAGMENT;

pub(crate) const USAGE: &str =
    "usage: throughput [--quick] [--only a,b,c,d,e] [--runs N] [--no-warm-up] [part flags]
  --quick               a CI-sized run of every part (sizes below in brackets)
  --only LIST           run only these parts, e.g. a,c (default: a,b,c,d,e)
  --runs N              repeat (a) and (b) N times, print the spread and judge the
                        medians (default 3 [1])
  --no-warm-up          skip the untimed page-cache warm-up before each measurement
  --mib N               (a) upload size in MiB, a multiple of 8; also the small upload of (d)
                        (default 1024 [64])
  --b-fragments N       (b) and (e) 64 KiB fragments / POSTs per measurement
                        (default 4096 [512])
  --b-streams N         (b) concurrent uploads / POST streams of the extra row (default 8)
  --c-sessions N        (c) concurrent sessions (default 1000 [100])
  --c-size-kib N        (c) upload size per session in KiB (default 1024 [256])
  --c-fragment-kib N    (c) fragment size in KiB, at most 8192 (default 256 [64])
  --c-rate-kib N        (c) per-client body rate in KiB/s (default 512)
  --c-ramp-ms N         (c) arrivals spread over this many ms (default 1000 [200])
  --c-baseline          (c) also send the same paced load as plain POSTs to the baseline,
                        with and without an fsync per file (default in a full run)
  --no-c-baseline       (c) skip those
  --d-mib N             (d) large upload size in MiB, a multiple of 8 (default 4096 [256])
  --e-runs N            (e) runs, each a fresh server whose recorder is switched off and on
                        between blocks of fragments (default 5 [3])";

#[derive(Debug, Clone, Copy)]
pub(crate) struct Parts {
    pub(crate) a: bool,
    pub(crate) b: bool,
    pub(crate) c: bool,
    pub(crate) d: bool,
    pub(crate) e: bool,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct CConfig {
    pub(crate) sessions: usize,
    pub(crate) size: u64,
    pub(crate) fragment: u64,
    /// Bytes per second of each client's bodies.
    pub(crate) rate: u64,
    pub(crate) ramp: Duration,
}

#[derive(Debug)]
pub(crate) struct Options {
    pub(crate) quick: bool,
    pub(crate) parts: Parts,
    pub(crate) runs: usize,
    pub(crate) warm_up: bool,
    pub(crate) a_total: u64,
    pub(crate) b_fragments: u64,
    pub(crate) b_streams: usize,
    pub(crate) c: CConfig,
    /// Also run (c)'s load as plain POSTs against the baseline, for context (default: unless
    /// `--quick`).
    pub(crate) c_baseline: bool,
    pub(crate) d_total: u64,
    /// (e): runs, each a fresh server whose recorder is switched between blocks of fragments.
    pub(crate) e_runs: usize,
}

impl Options {
    /// `None` for `--help`.
    pub(crate) fn parse(args: impl Iterator<Item = String>) -> Result<Option<Self>, String> {
        let mut quick = false;
        let mut parts = None;
        let mut runs = None;
        let mut warm_up = true;
        let mut c_baseline = None;
        let (mut mib, mut b_fragments, mut b_streams) = (None, None, None);
        let (mut c_sessions, mut c_size, mut c_fragment, mut c_rate, mut c_ramp) =
            (None, None, None, None, None);
        let mut d_mib = None;
        let mut e_runs = None;
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
                "--help" | "-h" => return Ok(None),
                "--quick" => quick = true,
                "--no-warm-up" => warm_up = false,
                "--c-baseline" => c_baseline = Some(true),
                "--no-c-baseline" => c_baseline = Some(false),
                "--only" => {
                    let list = args.next().ok_or("--only needs a list such as a,c")?;
                    parts = Some(parse_parts(&list)?);
                }
                "--runs" => runs = Some(to_usize(value("--runs")?)?),
                "--mib" => mib = Some(value("--mib")?),
                "--b-fragments" => b_fragments = Some(value("--b-fragments")?),
                "--b-streams" => b_streams = Some(to_usize(value("--b-streams")?)?),
                "--c-sessions" => c_sessions = Some(to_usize(value("--c-sessions")?)?),
                "--c-size-kib" => c_size = Some(value("--c-size-kib")?),
                "--c-fragment-kib" => c_fragment = Some(value("--c-fragment-kib")?),
                "--c-rate-kib" => c_rate = Some(value("--c-rate-kib")?),
                "--c-ramp-ms" => c_ramp = Some(value("--c-ramp-ms")?),
                "--d-mib" => d_mib = Some(value("--d-mib")?),
                "--e-runs" => e_runs = Some(to_usize(value("--e-runs")?)?),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        let pick =
            |set: Option<u64>, full: u64, ci: u64| set.unwrap_or(if quick { ci } else { full });
        let mib = pick(mib, 1024, 64);
        let d_mib = pick(d_mib, 4096, 256);
        if mib % 8 != 0 || d_mib % 8 != 0 {
            return Err("--mib and --d-mib must be multiples of 8".into());
        }
        let b_fragments = pick(b_fragments, 4096, 512);
        let b_streams = b_streams.unwrap_or(8);
        // The machine is noisy: a full run reports medians of three.
        let runs = runs.unwrap_or(if quick { 1 } else { 3 });
        if runs == 0 {
            return Err("--runs must be at least 1".into());
        }
        if b_fragments < b_streams as u64 {
            return Err("--b-fragments must be at least --b-streams".into());
        }
        let c = CConfig {
            sessions: c_sessions.unwrap_or(if quick { 100 } else { 1000 }),
            size: pick(c_size, 1024, 256) << 10,
            fragment: pick(c_fragment, 256, 64) << 10,
            rate: c_rate.unwrap_or(512) << 10,
            ramp: Duration::from_millis(pick(c_ramp, 1000, 200)),
        };
        if c.fragment > FRAGMENT as u64 {
            return Err(format!(
                "--c-fragment-kib must be at most {}",
                FRAGMENT >> 10
            ));
        }
        Ok(Some(Self {
            quick,
            parts: parts.unwrap_or(Parts {
                a: true,
                b: true,
                c: true,
                d: true,
                e: true,
            }),
            runs,
            warm_up,
            a_total: mib << 20,
            b_fragments,
            b_streams,
            c,
            c_baseline: c_baseline.unwrap_or(!quick),
            d_total: d_mib << 20,
            e_runs: e_runs.unwrap_or(if quick { 3 } else { 5 }),
        }))
    }
}

fn to_usize(v: u64) -> Result<usize, String> {
    usize::try_from(v).map_err(|e| e.to_string())
}

fn parse_parts(list: &str) -> Result<Parts, String> {
    let mut parts = Parts {
        a: false,
        b: false,
        c: false,
        d: false,
        e: false,
    };
    for part in list.split(',').map(str::trim) {
        match part {
            "a" => parts.a = true,
            "b" => parts.b = true,
            "c" => parts.c = true,
            "d" => parts.d = true,
            "e" => parts.e = true,
            other => return Err(format!("unknown part {other:?} in --only (a to e)")),
        }
    }
    Ok(parts)
}
