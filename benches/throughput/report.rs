//! The summary (one line per target: measured value, target, PASS or MISS) and the number
//! formatting the tables share.

use std::time::Duration;

use crate::Error;

/// The result column of a summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pass,
    Miss,
    Error,
    /// A number to read a target's next to; no target of its own.
    Context,
}

/// One line of the summary.
struct Line {
    name: String,
    measured: String,
    target: String,
    status: Status,
}

/// What the summary at the end lists; `failed` makes the exit status 1.
#[derive(Default)]
pub(crate) struct Summary {
    lines: Vec<Line>,
    pub(crate) failed: bool,
}

impl Summary {
    pub(crate) fn target(&mut self, name: String, measured: String, target: &str, pass: bool) {
        self.lines.push(Line {
            name,
            measured,
            target: target.to_owned(),
            status: if pass { Status::Pass } else { Status::Miss },
        });
    }

    pub(crate) fn context(&mut self, name: String, measured: String) {
        self.lines.push(Line {
            name,
            measured,
            target: "-".into(),
            status: Status::Context,
        });
    }

    pub(crate) fn error(&mut self, part: &str, error: &Error) {
        println!("  part ({part}) FAILED: {}", chain(error.as_ref()));
        self.lines.push(Line {
            name: format!("({part}) did not complete"),
            measured: "error (see above)".into(),
            target: "-".into(),
            status: Status::Error,
        });
        self.failed = true;
    }

    pub(crate) fn print(&self, elapsed: Duration) {
        println!();
        println!("summary ({:.0} s in all)", elapsed.as_secs_f64());
        println!("{:<50} {:>30} {:>22}  result", "what", "measured", "target");
        println!("{}", "-".repeat(112));
        for line in &self.lines {
            let status = match line.status {
                Status::Pass => "PASS",
                Status::Miss => "MISS",
                Status::Error => "ERROR",
                Status::Context => "",
            };
            println!(
                "{:<50} {:>30} {:>22}  {status}",
                line.name, line.measured, line.target
            );
        }
        if self.failed {
            println!("errors occurred: exit status 1");
        }
    }
}

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

pub(crate) fn spread(values: &[f64], decimals: usize) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let (Some(min), Some(max)) = (sorted.first(), sorted.last()) else {
        return "-".into();
    };
    format!(
        "{:.*} / {:.*} / {:.*}",
        decimals,
        min,
        decimals,
        median(&sorted),
        decimals,
        max
    )
}

/// An error and its sources, on one line.
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
