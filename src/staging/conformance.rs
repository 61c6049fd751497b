//! The checks every [`Staging`] must pass, with the feature `conformance`, as
//! [`store::conformance`](crate::store::conformance) is for stores. [`LocalStaging`] passes
//! them; run them against your own staging in a test:
//!
//! ```
//! use std::sync::Arc;
//! use axum_bits::staging::LocalStaging;
//! use axum_bits::staging::conformance::{self, LocalDestinations};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let root = tempfile::tempdir().unwrap();
//! let staging = LocalStaging::new(root.path()).unwrap();
//! conformance::run(Arc::new(staging), &LocalDestinations::new(root.path())).await;
//! # }
//! ```
//!
//! The checks see the destinations through [`Destinations`]: a staging that commits somewhere
//! other than local files (an object store) gives a `Destinations` that reads and writes
//! there. Every check uses destinations of its own at the top of the root
//! (`conformance-<id>-<name>`) and panics with what went wrong.
//!
//! [`LocalStaging`]: super::LocalStaging

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use super::{PartWriter, Staging, StagingError};
use crate::destination::Destination;
use crate::session::SessionId;

/// How the checks read and create destinations behind the staging's back.
pub trait Destinations: Send + Sync {
    /// The bytes at `destination`, or `None` if nothing is there.
    fn read(&self, destination: &Destination) -> impl Future<Output = Option<Vec<u8>>> + Send;

    /// Puts `bytes` at `destination`, as another writer would.
    fn put(&self, destination: &Destination, bytes: &[u8]) -> impl Future<Output = ()> + Send;
}

/// The destinations of a staging that commits to files under a local root, such as
/// [`LocalStaging`](super::LocalStaging).
#[derive(Debug, Clone)]
pub struct LocalDestinations {
    root: PathBuf,
}

impl LocalDestinations {
    /// Destinations are files under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn path(&self, destination: &Destination) -> PathBuf {
        destination.under(&self.root)
    }
}

impl Destinations for LocalDestinations {
    async fn read(&self, destination: &Destination) -> Option<Vec<u8>> {
        tokio::fs::read(self.path(destination)).await.ok()
    }

    async fn put(&self, destination: &Destination, bytes: &[u8]) {
        let path = self.path(destination);
        tokio::fs::write(&path, bytes)
            .await
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

/// Runs every check against `staging`, in order.
pub async fn run<S: Staging>(staging: Arc<S>, destinations: &impl Destinations) {
    part_lifecycle(staging.as_ref()).await;
    writes_start_where_the_part_ends(staging.as_ref(), destinations).await;
    commit_moves_exactly_total_bytes(staging.as_ref(), destinations).await;
    an_empty_file_commits(staging.as_ref(), destinations).await;
    commits_never_clobber_without_overwrite(staging.as_ref(), destinations).await;
    a_missing_part_commits_nothing(staging.as_ref(), destinations).await;
    parts_created_for_their_destination(staging.as_ref(), destinations).await;
    concurrent_commits_to_one_destination(staging, destinations).await;
}

/// A destination at the top of the root that no other check uses.
pub fn fresh_destination(name: &str) -> Destination {
    let unique = SessionId::new().to_string();
    let unique = unique.trim_matches(['{', '}']);
    Destination::from_stored(&format!("conformance-{unique}-{name}"), &[])
        .unwrap_or_else(|e| panic!("a conformance destination is invalid: {e}"))
}

/// `len` bytes that differ from those of any other `seed`.
fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Opens the part at `offset`, writes `data` in a few chunks and finishes: the first error.
async fn write_at<S: Staging>(
    staging: &S,
    id: SessionId,
    offset: u64,
    data: &[u8],
) -> Result<(), StagingError> {
    let mut part = staging.open(id, offset).await?;
    for chunk in data.chunks(4096.max(data.len() / 3)) {
        part.write(Bytes::copy_from_slice(chunk)).await?;
    }
    part.finish().await
}

async fn len<S: Staging>(staging: &S, id: SessionId) -> Option<u64> {
    staging
        .len(id)
        .await
        .unwrap_or_else(|e| panic!("len: {e:?}"))
}

async fn created<S: Staging>(staging: &S) -> SessionId {
    let id = SessionId::new();
    staging
        .create(id)
        .await
        .unwrap_or_else(|e| panic!("create: {e:?}"));
    id
}

async fn written<S: Staging>(staging: &S, data: &[u8]) -> SessionId {
    let id = created(staging).await;
    write_at(staging, id, 0, data)
        .await
        .unwrap_or_else(|e| panic!("writing a new part: {e:?}"));
    id
}

async fn discard<S: Staging>(staging: &S, id: SessionId) {
    staging
        .discard(id)
        .await
        .unwrap_or_else(|e| panic!("discard: {e:?}"));
}

/// A part is created empty, grows by appends, is listed while it exists, and is gone after
/// a discard, which may be repeated (and may name a part that never existed).
pub async fn part_lifecycle<S: Staging>(staging: &S) {
    let id = created(staging).await;
    assert_eq!(len(staging, id).await, Some(0), "a new part is empty");
    let listed = staging
        .list()
        .await
        .unwrap_or_else(|e| panic!("list: {e:?}"));
    assert!(listed.contains(&id), "a part is listed while it exists");

    let first = bytes(10_000, 1);
    write_at(staging, id, 0, &first)
        .await
        .unwrap_or_else(|e| panic!("first write: {e:?}"));
    assert_eq!(len(staging, id).await, Some(10_000));
    write_at(staging, id, 10_000, &bytes(5_000, 2))
        .await
        .unwrap_or_else(|e| panic!("append at the end: {e:?}"));
    assert_eq!(len(staging, id).await, Some(15_000), "appends add up");

    discard(staging, id).await;
    assert_eq!(len(staging, id).await, None, "a discarded part is gone");
    let listed = staging
        .list()
        .await
        .unwrap_or_else(|e| panic!("list: {e:?}"));
    assert!(!listed.contains(&id), "a discarded part is not listed");
    discard(staging, id).await;
    discard(staging, SessionId::new()).await;
}

/// A write past the end of the part is refused with [`StagingError::PartShort`] naming what
/// the part holds (at the open, the first write or the finish); a write inside the part
/// replaces the bytes from its offset on, as after a session was rewound.
pub async fn writes_start_where_the_part_ends<S: Staging>(
    staging: &S,
    destinations: &impl Destinations,
) {
    let id = written(staging, &bytes(8_000, 3)).await;
    match write_at(staging, id, 9_000, &bytes(100, 4)).await {
        Err(StagingError::PartShort { held: 8_000 }) => {}
        other => panic!("a write past the end must be PartShort {{ held: 8000 }}: {other:?}"),
    }
    let missing = SessionId::new();
    match write_at(staging, missing, 10, &bytes(10, 5)).await {
        Err(StagingError::PartShort { held: 0 }) => {}
        other => panic!("a write into a missing part must be PartShort {{ held: 0 }}: {other:?}"),
    }
    discard(staging, missing).await;

    // Rewound to 5,000: the bytes from there on are written again, differently.
    let mut expected = bytes(8_000, 3);
    let again = bytes(4_000, 6);
    write_at(staging, id, 5_000, &again)
        .await
        .unwrap_or_else(|e| panic!("a write inside the part: {e:?}"));
    expected.truncate(5_000);
    expected.extend_from_slice(&again);
    let destination = fresh_destination("rewound.bin");
    staging
        .commit(id, &destination, expected.len() as u64, false)
        .await
        .unwrap_or_else(|e| panic!("commit after a rewrite: {e:?}"));
    assert_eq!(
        destinations.read(&destination).await.as_deref(),
        Some(&expected[..]),
        "the file holds the bytes written last at each offset"
    );
    discard(staging, id).await;
}

/// A commit puts exactly the first `total` bytes of the part at the destination, and the
/// staging can tell afterwards that the commit happened (or answers `false`, never a wrong
/// `true`).
pub async fn commit_moves_exactly_total_bytes<S: Staging>(
    staging: &S,
    destinations: &impl Destinations,
) {
    let data = bytes(20_000, 7);
    let id = written(staging, &data).await;
    let destination = fresh_destination("exact.bin");
    staging
        .check_destination(&destination, false)
        .await
        .unwrap_or_else(|e| panic!("an absent destination may be uploaded: {e:?}"));
    let never = fresh_destination("never.bin");
    assert!(
        !staging
            .committed(id, &never, 19_990)
            .await
            .unwrap_or_else(|e| panic!("committed: {e:?}")),
        "nothing was committed to a destination that does not exist"
    );
    staging
        .commit(id, &destination, 19_990, false)
        .await
        .unwrap_or_else(|e| panic!("commit: {e:?}"));
    assert_eq!(
        destinations.read(&destination).await.as_deref(),
        Some(&data[..19_990]),
        "the destination holds exactly the first `total` bytes"
    );
    let committed = staging
        .committed(id, &destination, 19_990)
        .await
        .unwrap_or_else(|e| panic!("committed after a commit: {e:?}"));
    if committed {
        assert_eq!(
            destinations.read(&destination).await.as_deref(),
            Some(&data[..19_990])
        );
    }
    discard(staging, id).await;
    assert_eq!(
        destinations.read(&destination).await.as_deref(),
        Some(&data[..19_990]),
        "discarding the session's part never touches its committed file"
    );
}

/// A zero-length upload commits an empty file.
pub async fn an_empty_file_commits<S: Staging>(staging: &S, destinations: &impl Destinations) {
    let id = created(staging).await;
    let destination = fresh_destination("empty.bin");
    staging
        .commit(id, &destination, 0, false)
        .await
        .unwrap_or_else(|e| panic!("commit of an empty part: {e:?}"));
    assert_eq!(
        destinations.read(&destination).await.as_deref(),
        Some(&[][..]),
        "an empty upload is an empty file"
    );
    discard(staging, id).await;
}

/// Without overwrite an existing destination is never replaced, neither by the check nor by
/// the commit, whose error says it may succeed later; with overwrite it is replaced.
pub async fn commits_never_clobber_without_overwrite<S: Staging>(
    staging: &S,
    destinations: &impl Destinations,
) {
    let destination = fresh_destination("taken.bin");
    destinations.put(&destination, b"someone else's").await;
    match staging.check_destination(&destination, false).await {
        Err(StagingError::DestinationExists) => {}
        other => panic!("an existing destination must be DestinationExists: {other:?}"),
    }
    staging
        .check_destination(&destination, true)
        .await
        .unwrap_or_else(|e| panic!("with overwrite an existing destination is fine: {e:?}"));

    let data = bytes(12_345, 8);
    let id = written(staging, &data).await;
    match staging.commit(id, &destination, 12_345, false).await {
        Err(error) if error.is_busy() => {}
        other => panic!("a commit onto an existing file must be refused as busy: {other:?}"),
    }
    assert_eq!(
        destinations.read(&destination).await.as_deref(),
        Some(&b"someone else's"[..]),
        "a refused commit leaves the destination untouched"
    );
    staging
        .commit(id, &destination, 12_345, true)
        .await
        .unwrap_or_else(|e| panic!("a commit with overwrite: {e:?}"));
    assert_eq!(
        destinations.read(&destination).await.as_deref(),
        Some(&data[..]),
        "with overwrite the destination is replaced"
    );
    discard(staging, id).await;
}

/// A session whose part is gone commits nothing.
pub async fn a_missing_part_commits_nothing<S: Staging>(
    staging: &S,
    destinations: &impl Destinations,
) {
    let id = written(staging, &bytes(3_000, 9)).await;
    discard(staging, id).await;
    let destination = fresh_destination("lost.bin");
    match staging.commit(id, &destination, 3_000, false).await {
        Err(StagingError::PartMissing | StagingError::Incomplete { .. }) => {}
        other => panic!("committing a missing part must fail: {other:?}"),
    }
    assert_eq!(
        destinations.read(&destination).await,
        None,
        "a failed commit creates nothing"
    );
}

/// Parts made with [`Staging::create_for`] (which a staging may place at the destination
/// itself) commit like any: exactly `total` bytes, never over an existing file without
/// overwrite (the refused commit can be retried with it), and a commit retried after it
/// succeeded either succeeds again or is recognised by [`Staging::committed`].
pub async fn parts_created_for_their_destination<S: Staging>(
    staging: &S,
    destinations: &impl Destinations,
) {
    let data = bytes(150_000, 10);
    let destination = fresh_destination("in-place.bin");
    let id = SessionId::new();
    staging
        .create_for(id, &destination)
        .await
        .unwrap_or_else(|e| panic!("create_for: {e:?}"));
    write_at(staging, id, 0, &data)
        .await
        .unwrap_or_else(|e| panic!("writing a part made for its destination: {e:?}"));
    staging
        .commit(id, &destination, 149_999, false)
        .await
        .unwrap_or_else(|e| panic!("commit: {e:?}"));
    assert_eq!(
        destinations.read(&destination).await.as_deref(),
        Some(&data[..149_999]),
        "the destination holds exactly the first `total` bytes"
    );
    match staging.commit(id, &destination, 149_999, false).await {
        Ok(()) => {}
        Err(StagingError::PartMissing | StagingError::DestinationExists) => assert!(
            staging
                .committed(id, &destination, 149_999)
                .await
                .unwrap_or_else(|e| panic!("committed: {e:?}")),
            "a commit retried after it succeeded must be recognised as done"
        ),
        Err(other) => panic!("a commit retried after it succeeded: {other:?}"),
    }
    assert_eq!(
        destinations.read(&destination).await.as_deref(),
        Some(&data[..149_999])
    );
    discard(staging, id).await;

    let taken = fresh_destination("in-place-taken.bin");
    let id = SessionId::new();
    staging
        .create_for(id, &taken)
        .await
        .unwrap_or_else(|e| panic!("create_for: {e:?}"));
    write_at(staging, id, 0, &data)
        .await
        .unwrap_or_else(|e| panic!("writing: {e:?}"));
    destinations.put(&taken, b"someone else's").await;
    match staging.commit(id, &taken, 150_000, false).await {
        Err(error) if error.is_busy() => {}
        other => panic!("a commit onto a file created meanwhile must be busy: {other:?}"),
    }
    assert_eq!(
        destinations.read(&taken).await.as_deref(),
        Some(&b"someone else's"[..]),
        "a refused commit leaves the destination untouched"
    );
    staging
        .commit(id, &taken, 150_000, true)
        .await
        .unwrap_or_else(|e| panic!("the same commit with overwrite: {e:?}"));
    assert_eq!(
        destinations.read(&taken).await.as_deref(),
        Some(&data[..]),
        "with overwrite the destination is replaced"
    );
    discard(staging, id).await;
}

/// Sessions racing to commit to one destination without overwrite: exactly one file wins,
/// whole, and every other commit is refused as busy.
pub async fn concurrent_commits_to_one_destination<S: Staging>(
    staging: Arc<S>,
    destinations: &impl Destinations,
) {
    const RACERS: u8 = 8;
    let destination = fresh_destination("raced.bin");
    let mut sessions = Vec::new();
    for seed in 0..RACERS {
        let data = bytes(40_000, 100 + seed);
        sessions.push((written(staging.as_ref(), &data).await, data));
    }
    let tasks: Vec<_> = sessions
        .iter()
        .map(|(id, _)| {
            let (staging, destination, id) = (staging.clone(), destination.clone(), *id);
            tokio::spawn(async move { staging.commit(id, &destination, 40_000, false).await })
        })
        .collect();
    let mut winners = Vec::new();
    for (task, (id, data)) in tasks.into_iter().zip(&sessions) {
        match task.await {
            Ok(Ok(())) => winners.push(data.clone()),
            Ok(Err(error)) if error.is_busy() => {}
            Ok(Err(error)) => panic!("a racing commit failed otherwise: {error:?}"),
            Err(panic) => std::panic::resume_unwind(panic.into_panic()),
        }
        discard(staging.as_ref(), *id).await;
    }
    assert_eq!(winners.len(), 1, "exactly one racing commit wins");
    assert_eq!(
        destinations.read(&destination).await.as_deref(),
        Some(&winners[0][..]),
        "the destination holds the winner's file, whole"
    );
}
