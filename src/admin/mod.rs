//! What an operator needs to see and do while uploads run: list and inspect the sessions in
//! flight, cancel one, run a sweep now (IIS's "Run CleanUp Task"), and the sessions that
//! ended recently. The Rust API is on the [`BitsHandle`](crate::BitsHandle); [`router`]
//! (feature `axum`) serves the same as JSON, with a live status page, for the application to
//! mount behind its own authentication. Nothing here is ever mounted by default.
//!
//! Every session is listed, whichever node of a farm created it: the listing reads the
//! session store, which a farm shares. The recently ended sessions are this node's (expiry,
//! cancellation and close are seen by the node that carries them out), merged with the
//! tombstones the store still keeps.
//!
//! ```
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! # let root = tempfile::tempdir()?;
//! use std::time::Duration;
//! use axum_bits::BitsLayer;
//! use axum_bits::admin::{SessionQuery, SessionState};
//!
//! let bits = BitsLayer::builder(root.path()).build()?;
//! let handle = bits.handle();
//! let stuck = SessionQuery::new()
//!     .state(SessionState::Receiving)
//!     .idle_longer_than(Duration::from_secs(3600));
//! for session in handle.sessions(&stuck).await?.sessions {
//!     println!("{} {} {}/{:?}", session.id, session.destination, session.received, session.total);
//!     handle.cancel_session(session.id).await?;
//! }
//! # Ok(()) }
//! ```

#[cfg(feature = "axum")]
mod page;
mod recent;
#[cfg(feature = "axum")]
mod router;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::session::{DeferredStatus, Phase, SessionId, SessionRecord, duration_ms, now_ms};
use crate::shared::Shared;

pub(crate) use recent::Recent;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use router::router;

/// Where a session stands, as the admin API reports and filters it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SessionState {
    /// Fragments are arriving.
    Receiving,
    /// Every byte arrived; waiting for Close-Session (or committed already).
    Complete,
    /// Every byte arrived and its commit waits for a busy destination (a deferred commit
    /// pending or failed).
    Deferred,
    /// Closed by the client; kept as a tombstone for a while.
    Closed,
    /// Cancelled; kept as a tombstone for a while.
    Cancelled,
}

impl SessionState {
    pub(crate) fn of(record: &SessionRecord) -> Self {
        match record.phase {
            Phase::Receiving => Self::Receiving,
            Phase::Complete if record.is_deferred() => Self::Deferred,
            Phase::Complete => Self::Complete,
            Phase::Closed => Self::Closed,
            Phase::Cancelled => Self::Cancelled,
        }
    }

    /// Whether the session is still open (not closed or cancelled).
    pub fn is_open(self) -> bool {
        matches!(self, Self::Receiving | Self::Complete | Self::Deferred)
    }

    /// The name the JSON API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Receiving => "receiving",
            Self::Complete => "complete",
            Self::Deferred => "deferred",
            Self::Closed => "closed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s names.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Receiving,
            Self::Complete,
            Self::Deferred,
            Self::Closed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }
}

/// Which sessions [`BitsHandle::sessions`](crate::BitsHandle::sessions) lists: every filter
/// set must match. Sessions come oldest first; a page ends with the cursor of the next one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionQuery {
    /// Only sessions in this state.
    pub state: Option<SessionState>,
    /// Only sessions of this owner (the [`Owner`](crate::Owner)'s name).
    pub owner: Option<String>,
    /// Only sessions without a successful packet for longer than this.
    pub idle_longer_than: Option<Duration>,
    /// Only sessions whose destination (relative to the upload root, `/`-separated) starts
    /// with this.
    pub destination_prefix: Option<String>,
    /// Where the page starts: the `next` of the previous page. A cursor no page handed out
    /// starts at the first page (the admin router answers it with 400).
    pub cursor: Option<String>,
    /// Sessions per page: default 100, at most 1,000.
    pub limit: Option<usize>,
}

/// Default sessions per page.
const DEFAULT_LIMIT: usize = 100;
/// Most sessions per page.
const MAX_LIMIT: usize = 1000;

impl SessionQuery {
    /// Every session, first page.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only sessions in `state`.
    pub fn state(mut self, state: SessionState) -> Self {
        self.state = Some(state);
        self
    }

    /// Only sessions of `owner`.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// Only sessions idle for longer than `idle`.
    pub fn idle_longer_than(mut self, idle: Duration) -> Self {
        self.idle_longer_than = Some(idle);
        self
    }

    /// Only sessions whose destination starts with `prefix`.
    pub fn destination_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.destination_prefix = Some(prefix.into());
        self
    }

    /// The page that starts at `cursor` (a previous page's `next`).
    pub fn cursor(mut self, cursor: impl Into<String>) -> Self {
        self.cursor = Some(cursor.into());
        self
    }

    /// At most `limit` sessions per page (capped at 1,000).
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    fn matches(&self, record: &SessionRecord, now: u64) -> bool {
        if self
            .state
            .is_some_and(|state| state != SessionState::of(record))
        {
            return false;
        }
        if let Some(owner) = &self.owner {
            if record.owner.as_ref().map(|o| o.as_str()) != Some(owner.as_str()) {
                return false;
            }
        }
        if let Some(idle) = self.idle_longer_than {
            if now.saturating_sub(record.updated_ms) <= duration_ms(idle) {
                return false;
            }
        }
        if let Some(prefix) = &self.destination_prefix {
            if !record.destination.starts_with(prefix.as_str()) {
                return false;
            }
        }
        true
    }
}

/// One page of sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SessionPage {
    /// The sessions, oldest first.
    pub sessions: Vec<SessionInfo>,
    /// The cursor of the next page, if there are more sessions.
    pub next: Option<String>,
}

/// Everything the server knows about one session, for operators. Times are milliseconds since
/// the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SessionInfo {
    /// The session id, as in `BITS-Session-Id`.
    pub id: SessionId,
    /// Where it stands.
    pub state: SessionState,
    /// The destination, relative to the upload root.
    pub destination: String,
    /// The owner, if an authentication layer named one.
    pub owner: Option<String>,
    /// The client's address, for an anonymous session.
    pub peer: Option<String>,
    /// `Content-Name` from Create-Session, if sent.
    pub content_name: Option<String>,
    /// Bytes received, contiguous from offset 0.
    pub received: u64,
    /// The file's size, once the first fragment said it.
    pub total: Option<u64>,
    /// Bytes held in staging for it (what it received, until it is committed or ended).
    pub staged_bytes: u64,
    /// Whether the file reached its destination.
    pub committed: bool,
    /// When it was created.
    pub created_ms: u64,
    /// Its last successful packet.
    pub last_activity_ms: u64,
    /// When it expires (or, for a tombstone, is forgotten) without another packet; `None`
    /// while a deferred commit runs.
    pub expires_ms: Option<u64>,
    /// The host id of the node that served its last packet, if the nodes have host ids.
    pub node: Option<String>,
    /// The reply of an upload-reply session, once the application answered.
    pub reply: Option<ReplyInfo>,
    /// The deferred commit, if its destination was busy.
    pub deferred: Option<DeferredInfo>,
}

/// The application's answer to an upload-reply session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ReplyInfo {
    /// The URL the client was given in `BITS-Reply-URL`.
    pub url: String,
    /// Size of the reply the server keeps, if it keeps one (not a static URL).
    pub stored_len: Option<u64>,
}

/// A deferred commit's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeferredInfo {
    /// Where it stands.
    pub status: DeferredStatus,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due.
    pub next_attempt_ms: u64,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

impl SessionInfo {
    pub(crate) fn of(shared: &Shared, record: &SessionRecord) -> Self {
        let state = SessionState::of(record);
        let keep = crate::retention::keep_time(shared, record);
        let expires_ms =
            (!record.is_deferred()).then(|| record.updated_ms.saturating_add(duration_ms(keep)));
        Self {
            id: record.id,
            state,
            destination: record.destination.clone(),
            owner: record.owner.as_ref().map(|o| o.as_str().to_owned()),
            peer: record.peer.map(|p| p.to_string()),
            content_name: record.content_name.clone(),
            received: record.received,
            total: record.total,
            staged_bytes: if state.is_open() && !record.committed {
                record.received
            } else {
                0
            },
            committed: record.committed,
            created_ms: record.created_ms,
            last_activity_ms: record.updated_ms,
            expires_ms,
            node: record.node.clone(),
            reply: record.outcome.as_ref().map(|o| ReplyInfo {
                url: o.reply_url.clone(),
                stored_len: o.stored_reply.map(|r| r.len),
            }),
            deferred: record.deferred.as_ref().map(|d| DeferredInfo {
                status: d.status,
                attempts: d.attempts,
                next_attempt_ms: d.next_attempt_ms,
                last_error: d.last_error.clone(),
            }),
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EndReason {
    /// Close-Session after every byte arrived.
    Closed,
    /// Close-Session before every byte arrived: nothing was committed.
    ClosedIncomplete,
    /// Cancel-Session.
    Cancelled,
    /// Idle for the session timeout.
    Expired,
    /// Uploads were disabled.
    Disabled,
    /// The server was full and the session had never received a byte.
    Reclaimed,
    /// The same owner created a new session for its destination while it had never received
    /// a byte (a lost Create-Session Ack).
    Replaced,
    /// An operator cancelled it ([`BitsHandle::cancel_session`](crate::BitsHandle::cancel_session)).
    Admin,
}

impl EndReason {
    /// The name the JSON API and the `reason` label of `bits_sessions_ended_total` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::ClosedIncomplete => "closed_incomplete",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
            Self::Disabled => "disabled",
            Self::Reclaimed => "reclaimed",
            Self::Replaced => "replaced",
            Self::Admin => "admin",
        }
    }
}

/// A session that ended on this node, for the status page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct EndedSession {
    /// The session id.
    pub id: SessionId,
    /// Its destination.
    pub destination: String,
    /// Its owner.
    pub owner: Option<String>,
    /// Bytes it had received.
    pub received: u64,
    /// The file's size, if known.
    pub total: Option<u64>,
    /// Whether its file reached the destination.
    pub committed: bool,
    /// Why it ended.
    pub reason: EndReason,
    /// When it ended.
    pub ended_ms: u64,
}

impl EndedSession {
    pub(crate) fn of(record: &SessionRecord, reason: EndReason, ended_ms: u64) -> Self {
        Self {
            id: record.id,
            destination: record.destination.clone(),
            owner: record.owner.as_ref().map(|o| o.as_str().to_owned()),
            received: record.received,
            total: record.total,
            committed: record.committed,
            reason,
            ended_ms,
        }
    }
}

/// What the status page shows: the sessions in flight, the deferred commits, the sessions that
/// ended recently, and totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Overview {
    /// When this was read.
    pub now_ms: u64,
    /// Open sessions (receiving or complete), oldest first, at most 1,000.
    pub in_flight: Vec<SessionInfo>,
    /// Sessions whose commit is deferred (pending or failed).
    pub deferred: Vec<SessionInfo>,
    /// Sessions that ended recently, newest first.
    pub recent: Vec<EndedSession>,
    /// Open sessions in all.
    pub open: usize,
    /// Bytes the open sessions have received.
    pub bytes_received: u64,
    /// Bytes the open sessions will have when complete (those whose size is known).
    pub bytes_expected: u64,
    /// Whether the layer serves packets (not shut down or disabled).
    pub running: bool,
}

/// Most open sessions the overview lists one by one.
const OVERVIEW_MAX: usize = 1000;
/// Most ended sessions the overview lists.
const RECENT_MAX: usize = 50;

/// Lists `shared`'s sessions under its prefix.
pub(crate) async fn sessions(
    shared: &Shared,
    query: &SessionQuery,
) -> Result<SessionPage, crate::store::StoreError> {
    let now = now_ms();
    let mut matching = listed(shared).await?;
    matching.retain(|r| query.matches(r, now));
    let start = match query.cursor.as_deref().and_then(parse_cursor) {
        Some(after) => matching.partition_point(|r| (r.created_ms, r.id) <= after),
        None => 0,
    };
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let page = &matching[start.min(matching.len())..];
    let next = (page.len() > limit).then(|| cursor_of(&page[limit - 1]));
    Ok(SessionPage {
        sessions: page
            .iter()
            .take(limit)
            .map(|r| SessionInfo::of(shared, r))
            .collect(),
        next,
    })
}

/// The records of `shared`'s prefix, oldest first (by creation, then id: the cursor's order).
async fn listed(shared: &Shared) -> Result<Vec<SessionRecord>, crate::store::StoreError> {
    let mut records = shared.store.list().await?;
    records.retain(|r| shared.is_under_prefix(r));
    records.sort_by_key(|r| (r.created_ms, r.id));
    Ok(records)
}

/// Whether `cursor` is one a page handed out.
pub(crate) fn is_cursor(cursor: &str) -> bool {
    parse_cursor(cursor).is_some()
}

/// A cursor: the sort key of the last session of a page, `created_ms` and id.
fn cursor_of(record: &SessionRecord) -> String {
    let id = record.id.to_string();
    format!("{}-{}", record.created_ms, id.trim_matches(['{', '}']))
}

fn parse_cursor(cursor: &str) -> Option<(u64, SessionId)> {
    let (created, id) = cursor.split_once('-')?;
    Some((created.parse().ok()?, SessionId::parse(id)?))
}

/// The status page's data.
pub(crate) async fn overview(shared: &Shared) -> Result<Overview, crate::store::StoreError> {
    let now = now_ms();
    let records = listed(shared).await?;
    let mut overview = Overview {
        now_ms: now,
        in_flight: Vec::new(),
        deferred: Vec::new(),
        recent: Vec::new(),
        open: 0,
        bytes_received: 0,
        bytes_expected: 0,
        running: shared.lifecycle.state() == crate::lifecycle::State::Running,
    };
    let mut tombstones = Vec::new();
    for record in &records {
        if record.is_deferred() {
            overview.deferred.push(SessionInfo::of(shared, record));
        }
        if record.is_open() {
            overview.open += 1;
            overview.bytes_received += record.received;
            overview.bytes_expected += record.total.unwrap_or(0);
            if overview.in_flight.len() < OVERVIEW_MAX {
                overview.in_flight.push(SessionInfo::of(shared, record));
            }
        } else {
            let reason = match record.phase {
                Phase::Cancelled => EndReason::Cancelled,
                _ => EndReason::Closed,
            };
            tombstones.push(EndedSession::of(record, reason, record.updated_ms));
        }
    }
    // This node's own account comes first: it knows why (expired, cancelled by an operator).
    let mut recent = shared.recent.list();
    for tombstone in tombstones {
        if !recent.iter().any(|e| e.id == tombstone.id) {
            recent.push(tombstone);
        }
    }
    recent.sort_by_key(|e| std::cmp::Reverse(e.ended_ms));
    recent.truncate(RECENT_MAX);
    overview.recent = recent;
    Ok(overview)
}

/// Whether a deferred commit counts as pending or failed in the gauge.
pub(crate) fn deferred_counts(records: &[SessionRecord]) -> (usize, usize) {
    let status = |s| {
        records
            .iter()
            .filter(|r| r.deferred.as_ref().is_some_and(|d| d.status == s))
            .count()
    };
    (
        status(DeferredStatus::Pending),
        status(DeferredStatus::Failed),
    )
}

/// Why an admin action failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The session store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Another node kept the session busy for the whole wait; try again.
    #[error("another node is working on the session")]
    Busy,
    /// The staged data could not be deleted.
    #[error(transparent)]
    Staging(#[from] crate::staging::StagingError),
}

impl From<crate::session_lock::LockError> for AdminError {
    fn from(error: crate::session_lock::LockError) -> Self {
        match error {
            crate::session_lock::LockError::Busy => Self::Busy,
            crate::session_lock::LockError::Store(error) => Self::Store(error),
        }
    }
}

impl crate::BitsHandle {
    /// Lists the sessions of this layer's prefix that match `query`, oldest first, a page at
    /// a time. On a farm's shared store, every node lists every session.
    pub async fn sessions(
        &self,
        query: &SessionQuery,
    ) -> Result<SessionPage, crate::store::StoreError> {
        sessions(&self.shared, query).await
    }

    /// One session's details, tombstones included; `None` if the store has no such session
    /// under this layer's prefix.
    pub async fn session(
        &self,
        id: SessionId,
    ) -> Result<Option<SessionInfo>, crate::store::StoreError> {
        let shared = &self.shared;
        Ok(shared
            .store
            .load(id)
            .await?
            .filter(|r| shared.is_under_prefix(r))
            .map(|r| SessionInfo::of(shared, &r)))
    }

    /// Cancels an open session as Cancel-Session would: its staged data and reply are
    /// deleted (a deferred commit is abandoned), and it is kept as a cancelled tombstone, so
    /// that the client's next packet is told the session is gone. A file already committed
    /// stays. Waits for a packet in flight for the session to finish. Returns false if there
    /// is no open session `id` under this layer's prefix.
    pub async fn cancel_session(&self, id: SessionId) -> Result<bool, AdminError> {
        let shared = &self.shared;
        let Some(mut session) = shared.lock_session(id).await? else {
            return Ok(false);
        };
        if !session.record.is_open() || !shared.is_under_prefix(&session.record) {
            session.unlock().await;
            return Ok(false);
        }
        let result = async {
            let mut doomed = session.record.clone();
            doomed.deferred = None;
            crate::shared::release(shared, &doomed).await?;
            session
                .save(|r| {
                    r.phase = Phase::Cancelled;
                    r.deferred = None;
                    let reason = crate::session::CancelReason::Administrator;
                    shared.queue(r, crate::session::EventKind::Cancelled { reason });
                    r.end(Phase::Cancelled);
                })
                .await?;
            Ok::<_, AdminError>(())
        }
        .await;
        if result.is_ok() {
            session.deliver().await;
        }
        let record = session.record.clone();
        session.unlock().await;
        result?;
        tracing::info!(session = %id, destination = %record.destination, owner = ?record.owner, "session cancelled by an operator");
        shared.deferred_touched();
        crate::retention::session_ended(shared, &record, EndReason::Admin).await;
        Ok(true)
    }

    /// Runs a sweep now, as the [`Sweeper`](crate::Sweeper) does on its schedule (IIS's "Run
    /// CleanUp Task"): expires idle sessions, forgets old tombstones.
    pub async fn sweep_now(&self) -> Result<crate::SweepReport, crate::store::StoreError> {
        crate::Sweeper {
            shared: self.shared.clone(),
        }
        .sweep()
        .await
    }

    /// The sessions this node ended lately (at most 100), newest first.
    pub fn recently_ended(&self) -> Vec<EndedSession> {
        self.shared.recent.list()
    }

    /// What the status page shows: sessions in flight, deferred commits, recently ended
    /// sessions and totals.
    pub async fn overview(&self) -> Result<Overview, crate::store::StoreError> {
        overview(&self.shared).await
    }
}
