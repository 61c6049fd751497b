//! No escape from the upload root through a folder swapped for a symbolic link while commits
//! run (issue 14).
//!
//! A thread swaps `root/d`, a real folder, with `root/l`, a symbolic link to a folder outside
//! the root, with `renameat2(RENAME_EXCHANGE)` in a tight loop, while the final fragments of
//! hundreds of sessions for `d/...` commit. Checking the folder by name and then linking by
//! name again loses that race; a commit resolved through folder handles opened beneath the
//! root without following links cannot. Each client must get either a success with its file
//! inside the root or a 403 `E_ACCESSDENIED` Ack, and nothing outside the root may be created
//! or replaced.

#![cfg(target_os = "linux")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use common::{Reply, TestServer};
use rustix::fs::{CWD, Mode, OFlags, RenameFlags};

const E_ACCESSDENIED: &str = "0x80070005";
/// Commits raced per test.
const COMMITS: usize = 300;
/// Fragments in flight at once.
const PARALLEL: usize = 8;

/// Swaps `dir/a` and `dir/b` (`renameat2(RENAME_EXCHANGE)`) until dropped.
struct Swapper {
    stop: Arc<AtomicBool>,
    swaps: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Swapper {
    fn start(dir: &Path, a: &'static str, b: &'static str) -> Self {
        let fd = rustix::fs::openat(
            CWD,
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (stop, swaps) = (stop.clone(), swaps.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    rustix::fs::renameat_with(&fd, a, &fd, b, RenameFlags::EXCHANGE).unwrap();
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Self {
            stop,
            swaps,
            thread: Some(thread),
        }
    }

    /// Stops swapping; returns the number of swaps done.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        self.swaps.load(Ordering::Relaxed)
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Every file under `dir` with its content, symbolic links not followed (a link is recorded
/// by its target), keyed by path relative to `dir`.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let key = path.strip_prefix(base).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(key, target.into_os_string().into_encoded_bytes());
            } else if meta.is_dir() {
                walk(base, &path, out);
            } else {
                out.insert(key, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn content(i: usize) -> Vec<u8> {
    format!("upload {i}: {}", "x".repeat(i % 97)).into_bytes()
}

fn outside_content(i: usize) -> Vec<u8> {
    format!("outside the root, file {i}: must never change").into_bytes()
}

/// Creates `COMMITS` sessions for `d/<name i>` while `d` is a real folder, then sends each
/// one's only (so final) fragment while `d` and `l` (a link to `outside`) are swapped, and
/// checks every answer and both trees.
async fn race(overwrite: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
    let name = |i: usize| format!("f{i}.bin");
    std::fs::create_dir(&outside).unwrap();
    if overwrite {
        // What the link would lead a commit to replace.
        for i in 0..COMMITS {
            std::fs::write(outside.join(name(i)), outside_content(i)).unwrap();
        }
    }
    let server = TestServer::start_in(&root, |b| b.allow_overwrites(overwrite)).await;
    std::fs::create_dir(root.join("d")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("l")).unwrap();
    let outside_before = snapshot(&outside);

    let client = server.client();
    let mut sessions = Vec::with_capacity(COMMITS);
    for i in 0..COMMITS {
        sessions.push(client.create_ok(&format!("/d/{}", name(i))).await);
    }

    let started = Instant::now();
    let swapper = Swapper::start(&root, "d", "l");
    let mut answers: Vec<(usize, Reply)> = Vec::with_capacity(COMMITS);
    let mut next = sessions.into_iter().enumerate();
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.len() < PARALLEL {
            let Some((i, sid)) = next.next() else { break };
            let client = client.clone();
            running.spawn(async move {
                let bytes = content(i);
                let path = format!("/d/f{i}.bin");
                let reply = client
                    .fragment(&path, &sid, 0, &bytes, bytes.len() as u64)
                    .await;
                (i, reply)
            });
        }
        match running.join_next().await {
            Some(answer) => answers.push(answer.unwrap()),
            None => break,
        }
    }
    let swaps = swapper.stop();
    let elapsed = started.elapsed();

    // Whichever name the real folder ended up under.
    let real = ["d", "l"]
        .into_iter()
        .map(|n| root.join(n))
        .find(|p| std::fs::symlink_metadata(p).unwrap().is_dir())
        .unwrap();
    let inside = snapshot(&real);
    let outside_after = snapshot(&outside);
    let escaped: Vec<_> = outside_after
        .iter()
        .filter(|(path, bytes)| outside_before.get(*path) != Some(*bytes))
        .map(|(path, _)| path.clone())
        .collect();

    let (mut committed, mut refused, mut other, mut lost) = (0, 0, Vec::new(), Vec::new());
    for (i, reply) in &answers {
        let code = reply.header("BITS-Error-Code");
        match (reply.status, code) {
            (200, _) => {
                reply.assert_ok();
                assert_eq!(
                    reply.received(),
                    Some(content(*i).len() as u64),
                    "{reply:?}"
                );
                if inside.get(Path::new(&name(*i))) != Some(&content(*i)) {
                    // Acknowledged, but the file is not in the root.
                    lost.push(*i);
                }
                committed += 1;
            }
            (403, Some(E_ACCESSDENIED)) => {
                reply.assert_error(403, E_ACCESSDENIED);
                refused += 1;
            }
            (status, code) => other.push((*i, status, code.map(str::to_owned))),
        }
    }
    eprintln!(
        "overwrite={overwrite}: {committed} committed ({} of them not inside the root), \
         {refused} refused, {} other answers; {} of {COMMITS} files outside the root created \
         or replaced; {swaps} swaps in {elapsed:?}",
        lost.len(),
        other.len(),
        escaped.len(),
    );
    assert_eq!(answers.len(), COMMITS);
    assert!(
        escaped.is_empty(),
        "{} files outside the root were created or replaced: {:?}",
        escaped.len(),
        &escaped[..escaped.len().min(10)]
    );
    assert!(
        lost.is_empty(),
        "acknowledged but not in the root: {lost:?}"
    );
    assert!(other.is_empty(), "answers other than 200 or 403: {other:?}");
    // Both outcomes happened, so the race was real.
    assert!(committed > 0 && refused > 0, "{committed} / {refused}");
    assert!(swaps > 0);
    assert_eq!(outside_after, outside_before);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_folder_never_leads_a_commit_outside_the_root() {
    race(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_folder_never_leads_an_overwrite_outside_the_root() {
    race(true).await;
}
