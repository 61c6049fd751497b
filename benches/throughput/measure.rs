//! Readings of the machine: a process's RSS and CPU time from `/proc`, the open-file limit,
//! and a filesystem's free space.

use std::path::Path;
use std::process::Command;

use crate::Error;

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on every Linux port).
const USER_HZ: f64 = 100.0;

/// Free bytes on the filesystem of `dir`, from `df -Pk` (std has no statvfs, and the crate
/// allows no unsafe code).
pub(crate) fn free_bytes(dir: &Path) -> Result<u64, Error> {
    let output = Command::new("df")
        .arg("-Pk")
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run df to check free space: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "df -Pk {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .nth(1)
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib << 10)
        .ok_or_else(|| format!("cannot read the free space from df's output {text:?}").into())
}

/// A `kB` field of `/proc/<pid>/status`, in KiB.
pub(crate) fn proc_status_kib(pid: u32, field: &str) -> Result<u64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().strip_suffix("kB")?.trim().parse().ok()
        })
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status").into())
}

/// User plus system CPU time of a process (`None`: this one), in seconds.
pub(crate) fn proc_cpu_secs(pid: Option<u32>) -> Result<f64, Error> {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_owned(),
        |p| format!("/proc/{p}/stat"),
    );
    let stat = std::fs::read_to_string(&path)?;
    // The command name (field 2) may hold spaces; fields from 3 on follow its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => Ok((user + system) as f64 / USER_HZ),
        _ => Err(format!("cannot read the CPU times in {path}").into()),
    }
}

/// The CPU time of a process's threads now alive, in seconds, to the nanosecond: the sum of
/// `se.sum_exec_runtime` (ms) in `/proc/<pid>/task/*/sched`. `None` where the kernel does not
/// have those files (a debugging interface some kernels leave out). Unlike the clock ticks of
/// [`proc_cpu_secs`], it can tell a few milliseconds apart; a thread that has exited no longer
/// counts.
pub(crate) fn threads_cpu_secs(pid: u32) -> Result<Option<f64>, Error> {
    if !Path::new(&format!("/proc/{pid}/sched")).exists() {
        return Ok(None);
    }
    let mut total_ms = 0.0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let sched = match std::fs::read_to_string(task?.path().join("sched")) {
            Ok(sched) => sched,
            // The thread has just exited.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        let runtime = sched.lines().find_map(|line| {
            let value = line.strip_prefix("se.sum_exec_runtime")?;
            value
                .trim_start()
                .strip_prefix(':')?
                .trim()
                .parse::<f64>()
                .ok()
        });
        match runtime {
            Some(ms) => total_ms += ms,
            None => return Ok(None),
        }
    }
    Ok(Some(total_ms / 1e3))
}

/// The soft limit on open files of this process (inherited by the servers).
pub(crate) fn open_files_limit() -> Result<u64, Error> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .ok_or("no \"Max open files\" in /proc/self/limits")?;
    match line.split_whitespace().nth(3) {
        Some("unlimited") => Ok(u64::MAX),
        Some(soft) => Ok(soft.parse()?),
        None => Err(format!("cannot read {line:?}").into()),
    }
}
