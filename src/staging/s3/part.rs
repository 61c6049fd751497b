//! [`S3Part`]: writes a fragment's bytes into the session's parts and tails.

use std::sync::Arc;

use bytes::{Buf, Bytes};
use object_store::{ObjectStoreExt, PutPayload};
use tokio::sync::OwnedSemaphorePermit;

use super::layout::{Piece, State, Tail};
use super::{Inner, MAX_PIECES, io_error};
use crate::session::SessionId;
use crate::staging::{PartWriter, StagingError};

/// Writes consecutive bytes of a session into an [`S3Staging`](super::S3Staging).
///
/// Holds at most one part's worth of new bytes in memory (counted against the node's memory
/// budget); [`finish`](PartWriter::finish) stores what does not fill a part as a tail object,
/// so every byte passed to [`write`](PartWriter::write) is in the bucket when it returns.
#[derive(Debug)]
pub struct S3Part {
    inner: Arc<Inner>,
    id: SessionId,
    state: State,
    /// Bytes still to drop: re-sent bytes inside parts already uploaded.
    skip: u64,
    /// Where the next byte kept goes; the pieces from here on are replaced at the first one.
    start: u64,
    truncated: bool,
    buffer: std::collections::VecDeque<Bytes>,
    buffered: u64,
    permits: Vec<OwnedSemaphorePermit>,
    generation: u64,
    nonce: u32,
    failed: bool,
    /// The offset the writer was opened at.
    offset: u64,
    /// Whether `state` came from this node's cache and nothing has been stored since: another
    /// node may have changed the session meanwhile (the first stored byte tells).
    unverified: bool,
}

impl S3Part {
    pub(super) fn new(
        inner: Arc<Inner>,
        id: SessionId,
        state: State,
        offset: u64,
        cached: bool,
    ) -> Self {
        let covered = state.covered();
        let generation = state.next_generation;
        Self {
            inner,
            id,
            skip: covered.saturating_sub(offset),
            start: offset.max(covered),
            truncated: false,
            buffer: std::collections::VecDeque::new(),
            buffered: 0,
            permits: Vec::new(),
            generation,
            nonce: uuid::Uuid::new_v4().as_u128() as u32,
            state,
            failed: false,
            offset,
            unverified: cached,
        }
    }

    fn pieces_len(&self) -> u64 {
        self.state.pieces.iter().map(|p| p.len).sum()
    }

    /// Holds `len` new bytes against the node's memory budget. When the budget is spent, the
    /// bytes already buffered are stored as a tail first, so that a writer never waits while
    /// holding any of the budget (writers waiting on each other would never wake).
    async fn reserve(&mut self, len: u64) -> Result<(), StagingError> {
        let kib = len
            .div_ceil(1024)
            .clamp(1, u64::from(self.inner.budget_kib));
        let kib = u32::try_from(kib).unwrap_or(u32::MAX);
        loop {
            match self.inner.budget.clone().try_acquire_many_owned(kib) {
                Ok(permit) => {
                    self.permits.push(permit);
                    return Ok(());
                }
                Err(tokio::sync::TryAcquireError::NoPermits) if self.buffered > 0 => {
                    self.store_tail().await?;
                    self.permits.clear();
                }
                Err(_) => {
                    self.permits.clear();
                    let permit = self
                        .inner
                        .budget
                        .clone()
                        .acquire_many_owned(kib)
                        .await
                        .map_err(|_| closed())?;
                    self.permits.push(permit);
                    return Ok(());
                }
            }
        }
    }

    /// Takes the first `len` buffered bytes.
    fn take(&mut self, mut len: u64) -> Vec<Bytes> {
        let mut out = Vec::new();
        while len > 0 {
            let Some(first) = self.buffer.front_mut() else {
                break;
            };
            let n = (first.len() as u64).min(len);
            let n_usize = usize::try_from(n).unwrap_or(usize::MAX);
            if n_usize == first.len() {
                out.extend(self.buffer.pop_front());
            } else {
                out.push(first.split_to(n_usize));
            }
            len -= n;
            self.buffered -= n;
        }
        out
    }

    /// The pieces and the first buffered bytes make a whole part: uploads it, records it, and
    /// deletes the tails it replaces.
    async fn flush_part(&mut self) -> Result<(), StagingError> {
        let flushed = self.flush_part_once().await;
        if self.retry_after(&flushed).await? {
            return Ok(());
        }
        self.unverified = false;
        flushed
    }

    async fn store_tail(&mut self) -> Result<(), StagingError> {
        let stored = self.store_tail_once().await;
        if !self.retry_after(&stored).await? {
            self.unverified = false;
            return stored;
        }
        // Placed anew where the bucket says: what is still buffered is stored from there.
        while self.pieces_len() + self.buffered >= self.state.part_size {
            self.flush_part_once().await?;
        }
        if self.buffered > 0 {
            self.store_tail_once().await?;
        }
        Ok(())
    }

    /// After a piece of a cached state was found gone (another node uploaded the part it
    /// belonged to, and the record did not follow, as when that node died in the middle of a
    /// fragment): reads the session again from the bucket and places the buffered bytes
    /// there. `true` if so (the caller's loop goes on from the new state); the error if the
    /// session really holds less than the writer was opened at.
    async fn retry_after(
        &mut self,
        result: &Result<(), StagingError>,
    ) -> Result<bool, StagingError> {
        if !(self.unverified && matches!(result, Err(StagingError::PartShort { .. }))) {
            return Ok(false);
        }
        self.unverified = false;
        let fresh = match self.inner.list_state(self.id).await? {
            Some(state) if !state.done => state,
            _ => return Err(StagingError::PartShort { held: 0 }),
        };
        let held = fresh.held();
        if self.offset > held {
            return Err(StagingError::PartShort { held });
        }
        // Nothing was stored yet: the buffer holds the bytes from the offset on.
        let covered = fresh.covered();
        let skip = covered.saturating_sub(self.offset);
        let dropped = skip.min(self.buffered);
        self.take(dropped);
        self.skip = skip - dropped;
        self.start = self.offset.max(covered);
        self.generation = fresh.next_generation;
        self.state = fresh;
        self.truncated = false;
        if self.buffered > 0 {
            self.state.truncate(self.start);
            self.truncated = true;
        }
        Ok(true)
    }

    async fn flush_part_once(&mut self) -> Result<(), StagingError> {
        let inner = self.inner.clone();
        let need = self.state.part_size - self.pieces_len();
        let upto = self.state.covered() + self.state.part_size;
        // Parts in flight are bounded per node; the stored pieces are read back under it.
        let _flight = inner
            .flights
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| closed())?;
        let mut payload = inner.gather(self.id, &self.state, upto).await?;
        payload.extend(self.take(need));
        let number = self.state.parts.len() + 1;
        let etag = inner
            .upload_part(self.id, &self.state, number, PutPayload::from_iter(payload))
            .await?;
        self.state.parts.push(etag);
        self.unverified = false;
        let mut replaced: Vec<String> = self.state.pieces.drain(..).map(|p| p.name).collect();
        replaced.append(&mut self.state.stale);
        inner.delete_quietly(self.id, replaced).await;
        self.start = self.state.covered();
        // What is left in the buffer is held again, by itself.
        self.permits.clear();
        self.hold_buffer().await
    }

    /// Holds what is left in the buffer after a part was cut from it against the budget, or
    /// stores it as a tail when the budget is spent.
    async fn hold_buffer(&mut self) -> Result<(), StagingError> {
        if self.buffered == 0 {
            return Ok(());
        }
        let kib = self
            .buffered
            .div_ceil(1024)
            .clamp(1, u64::from(self.inner.budget_kib));
        let kib = u32::try_from(kib).unwrap_or(u32::MAX);
        match self.inner.budget.clone().try_acquire_many_owned(kib) {
            Ok(permit) => {
                self.permits.push(permit);
                Ok(())
            }
            // The part just uploaded confirmed the state: no second look needed.
            Err(_) => self.store_tail_once().await,
        }
    }

    /// Stores the buffered bytes as one tail object (gathering the pieces into it when there
    /// are too many of them).
    async fn store_tail_once(&mut self) -> Result<(), StagingError> {
        let inner = self.inner.clone();
        let gather = self.state.pieces.len() >= MAX_PIECES;
        let (start, mut payload) = if gather {
            let stored = self.pieces_len();
            let _flight = inner
                .flights
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| closed())?;
            let covered = self.state.covered();
            let payload = inner.gather(self.id, &self.state, covered + stored).await?;
            // A generation of its own, so the gathered tail replaces the pieces.
            self.generation += 1;
            (covered, payload)
        } else {
            (self.state.covered() + self.pieces_len(), Vec::new())
        };
        let len = self.buffered;
        payload.extend(self.take(len));
        let tail = Tail {
            generation: self.generation,
            start,
            nonce: self.nonce,
            len: payload.iter().map(|b| b.len() as u64).sum(),
        };
        inner
            .s3
            .put(
                &inner.object(self.id, &tail.name()),
                PutPayload::from_iter(payload),
            )
            .await
            .map_err(io_error)?;
        if gather {
            let replaced: Vec<String> = self.state.pieces.drain(..).map(|p| p.name).collect();
            self.state.stale.extend(replaced);
        }
        self.state.pieces.push(Piece {
            name: tail.name(),
            start: tail.start,
            from: 0,
            len: tail.len,
        });
        self.state.next_generation = self.generation + 1;
        Ok(())
    }

    async fn write_inner(&mut self, mut chunk: Bytes) -> Result<(), StagingError> {
        if self.skip > 0 {
            let n = usize::try_from(self.skip)
                .unwrap_or(usize::MAX)
                .min(chunk.len());
            chunk.advance(n);
            self.skip -= n as u64;
        }
        if chunk.is_empty() {
            return Ok(());
        }
        if !self.truncated {
            self.state.truncate(self.start);
            self.truncated = true;
        }
        self.reserve(chunk.len() as u64).await?;
        self.buffered += chunk.len() as u64;
        self.buffer.push_back(chunk);
        while self.pieces_len() + self.buffered >= self.state.part_size {
            self.flush_part().await?;
        }
        Ok(())
    }

    async fn finish_inner(&mut self) -> Result<(), StagingError> {
        while self.pieces_len() + self.buffered >= self.state.part_size {
            self.flush_part().await?;
        }
        if self.buffered > 0 {
            self.store_tail().await?;
        }
        let stale = std::mem::take(&mut self.state.stale);
        if self.truncated {
            self.inner.delete_quietly(self.id, stale).await;
        } else {
            self.state.stale = stale;
        }
        self.permits.clear();
        Ok(())
    }
}

impl PartWriter for S3Part {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StagingError> {
        if self.failed {
            return Err(StagingError::Io(std::io::Error::other(
                "an earlier write to the staged part failed",
            )));
        }
        let written = self.write_inner(chunk).await;
        if written.is_err() {
            self.failed = true;
            self.inner.forget(self.id);
        }
        written
    }

    async fn finish(mut self) -> Result<(), StagingError> {
        if self.failed {
            return Err(StagingError::Io(std::io::Error::other(
                "an earlier write to the staged part failed",
            )));
        }
        match self.finish_inner().await {
            Ok(()) => {
                self.inner.remember(self.id, self.state.clone());
                Ok(())
            }
            Err(e) => {
                self.inner.forget(self.id);
                Err(e)
            }
        }
    }
}

fn closed() -> StagingError {
    StagingError::Io(std::io::Error::other("the staging is closed"))
}
