//! Sessions: ids, owners, the record a [`SessionStore`](crate::store::SessionStore) keeps, and
//! the events it carries until the hooks have them. (What each packet does to a record is a
//! pure state machine inside the crate.)

mod event;
pub(crate) mod machine;

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub(crate) use event::enqueue;
pub use event::{CancelReason, Event, EventKind};

/// A session id: a random (v4) GUID, braced and upper-case as IIS sends it, e.g.
/// `{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}`.
///
/// It doubles as a capability, so it is generated from a cryptographically random source.
/// Parsing accepts any case and optional braces, so lookups are case-insensitive; ids that are
/// not GUIDs can never name a session (and never reach a file name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SessionId(uuid::Uuid);

impl SessionId {
    /// A new random id.
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    /// Parses an id as a client echoes it: braces optional, any case, surrounding whitespace
    /// ignored. Only the hyphenated GUID form is accepted.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let inner = s
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or(s);
        if inner.len() != 36 {
            return None;
        }
        uuid::Uuid::try_parse(inner).ok().map(Self)
    }
}

impl Default for SessionId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = uuid::Uuid::encode_buffer();
        f.write_str(self.0.braced().encode_upper(&mut buf))
    }
}

impl From<SessionId> for String {
    fn from(id: SessionId) -> Self {
        id.to_string()
    }
}

impl TryFrom<String> for SessionId {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s).ok_or_else(|| format!("not a session id: {s:?}"))
    }
}

/// Who a request acts for. An authentication layer that runs before the BITS layer inserts it
/// into the request extensions; a session created with an owner answers only to requests of
/// the same owner (others are told the session does not exist).
///
/// ```
/// use axum_bits::Owner;
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(Owner::new("alice"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner(String);

impl Owner {
    /// An owner identified by a stable name (a user name, a subject id).
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The owner's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key anonymous sessions from `peer` are counted under.
    pub(crate) fn peer(peer: std::net::IpAddr) -> Self {
        Self(format!("\u{1}peer {peer}"))
    }
}

/// The owner's name, as logs show it.
impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a session is in its life cycle (protocol reference, section 8.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Phase {
    /// Fragments are arriving.
    Receiving,
    /// Every byte has arrived; the file is committed or waiting for its commit point.
    Complete,
    /// Closed by the client: staged data is gone. Kept as a tombstone so that repeats get
    /// consistent answers.
    Closed,
    /// Cancelled by the client: staged data is gone. Kept as a tombstone.
    Cancelled,
}

/// Everything the server keeps about one session.
///
/// Records are plain data (serde) so that any store can keep them. `revision` is bumped by
/// every change and is what [`SessionStore::update`](crate::store::SessionStore::update)
/// compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SessionRecord {
    /// The session id.
    pub id: SessionId,
    /// Bumped on every update; the compare-and-set token.
    pub revision: u64,
    /// Destination relative to the upload root, `/`-separated, already validated.
    pub destination: String,
    /// The request target of Create-Session (path and query), as sent.
    pub request_url: String,
    /// The owner, if an authentication layer supplied one.
    pub owner: Option<Owner>,
    /// `Content-Name` from Create-Session, if the client sent one (informational).
    pub content_name: Option<String>,
    /// Total size, fixed by the first Fragment.
    pub total: Option<u64>,
    /// Contiguous bytes held from offset 0: the next byte the server expects.
    pub received: u64,
    /// Life-cycle phase.
    pub phase: Phase,
    /// Whether the file has been moved to its destination.
    pub committed: bool,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Last successful packet for the session, milliseconds since the Unix epoch. Expiry is
    /// measured from here.
    pub updated_ms: u64,
    /// Whether the session keeps other sessions from uploading to its destination while it is
    /// open. Upload-reply sessions do not: many clients post to one application URL.
    #[serde(default = "yes")]
    pub claims_destination: bool,
    /// `scheme://host[:port]` the client addressed at Create-Session, if known; with
    /// `request_url` it makes the absolute URL an application is told about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The application's answer to a completed upload-reply session, kept so that a repeated
    /// final fragment gets the same reply URL without a second notification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// A commit that found its destination busy and finishes in the background
    /// ([`CompletionPolicy::Defer`](crate::CompletionPolicy::Defer)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred: Option<DeferredState>,
    /// Events not yet delivered to the hooks (at-least-once delivery survives a restart).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<Event>,
    /// The client's address, for an anonymous session (no `owner`) whose request carried one
    /// ([`PeerAddr`] or axum's `ConnectInfo`): the per-peer limits count by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<std::net::IpAddr>,
    /// The host id of the node that last changed the record, if the nodes have host ids
    /// ([`host_id`](crate::BitsLayerBuilder::host_id)), for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// The address of the client a request came from. The per-peer limits on anonymous sessions
/// ([`max_sessions_per_peer`](crate::BitsLayerBuilder::max_sessions_per_peer)) read it from
/// the request extensions; [`serve`](crate::serve) inserts it, and so does axum's
/// `into_make_service_with_connect_info::<SocketAddr>()` (as `ConnectInfo`, which the layer
/// also reads). Behind a reverse proxy, insert it yourself from the proxy's forwarding header,
/// in a layer that runs before the BITS layer and trusts only the proxy.
///
/// ```
/// use axum_bits::PeerAddr;
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(PeerAddr("192.0.2.7".parse().unwrap()));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub std::net::IpAddr);

fn yes() -> bool {
    true
}

/// What the application answered for a completed upload-reply session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Outcome {
    /// The URL sent as `BITS-Reply-URL`.
    pub reply_url: String,
    /// Whether the server stores the reply (and deletes it with the session), as opposed to a
    /// static URL the application owns.
    pub stored_reply: Option<StoredReply>,
    /// Whether the application asked for the upload to be placed at its destination too.
    pub copy_to_destination: bool,
}

/// A reply the server keeps for a session, served at its reply URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StoredReply {
    /// Size in bytes.
    pub len: u64,
    /// When it was stored, milliseconds since the Unix epoch (its `Last-Modified`).
    pub stored_ms: u64,
}

/// Progress of a deferred commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeferredState {
    /// Where it stands.
    pub status: DeferredStatus,
    /// Attempts made so far (the first, in the request, counts).
    pub attempts: u32,
    /// When the next attempt is due, milliseconds since the Unix epoch.
    pub next_attempt_ms: u64,
    /// Why the last attempt did not succeed.
    pub last_error: Option<String>,
}

/// Where a deferred commit stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeferredStatus {
    /// Waiting for its next attempt.
    Pending,
    /// The file reached its destination.
    Completed,
    /// Every attempt failed; the staged file is kept until the session expires.
    Failed,
    /// Cancelled by the application; the staged file is deleted.
    Cancelled,
}

impl SessionRecord {
    /// A fresh record in [`Phase::Receiving`].
    pub fn new(
        id: SessionId,
        destination: String,
        request_url: String,
        owner: Option<Owner>,
        now_ms: u64,
    ) -> Self {
        Self {
            id,
            revision: 0,
            destination,
            request_url,
            owner,
            content_name: None,
            total: None,
            received: 0,
            phase: Phase::Receiving,
            committed: false,
            created_ms: now_ms,
            updated_ms: now_ms,
            claims_destination: true,
            origin: None,
            outcome: None,
            deferred: None,
            outbox: Vec::new(),
            peer: None,
            node: None,
        }
    }

    /// Who the session counts against for the per-owner limits (open sessions, tombstones):
    /// its owner, or for an anonymous session whose peer address is known, a key of that
    /// address that no owner name can equal (it starts with a control character). Stores
    /// that index owners (for [`count_open_for`](crate::store::SessionStore::count_open_for))
    /// index this.
    pub fn counted_as(&self) -> Option<Owner> {
        match (&self.owner, self.peer) {
            (Some(owner), _) => Some(owner.clone()),
            (None, Some(peer)) => Some(Owner::peer(peer)),
            (None, None) => None,
        }
    }

    /// Ends the session in `phase` ([`Phase::Closed`] or [`Phase::Cancelled`]) and shrinks the
    /// record to a tombstone: what a repeated packet needs (id, owner, phase, sizes, whether
    /// the file was committed or accepted, a deferred commit still running) and nothing else,
    /// so that what ended sessions leave behind stays small. The request path stays, without
    /// its query.
    pub fn end(&mut self, phase: Phase) {
        self.phase = phase;
        // The path stays: it says which prefix the tombstone belongs to (disabling uploads).
        if let Some(query) = self.request_url.find(['?', '#']) {
            self.request_url.truncate(query);
        }
        self.content_name = None;
        self.origin = None;
        if let Some(outcome) = &mut self.outcome {
            // Kept only as "the application accepted the upload" (see `is_accepted`).
            outcome.reply_url.clear();
            outcome.stored_reply = None;
        }
    }

    /// Whether this is a tombstone that may be forgotten: ended, with no deferred commit
    /// still needing its staged data.
    pub fn is_tombstone(&self) -> bool {
        !self.is_open() && !self.is_deferred()
    }

    /// Records that the part holds `received` contiguous bytes of a `total`-byte file. The
    /// session becomes [`Phase::Complete`] exactly when all of them are there, whichever path
    /// (a whole fragment or the kept prefix of a broken one) got it there.
    pub fn advance(&mut self, total: u64, received: u64) {
        self.total = Some(total);
        self.received = received;
        if received == total && self.phase == Phase::Receiving {
            self.phase = Phase::Complete;
        }
    }

    /// Records that the part holds only `received` bytes (data lost to a power loss without
    /// fsync, or a part deleted behind the server's back): the session resumes from there, and
    /// a complete one goes back to receiving, forgetting its application outcome and deferred
    /// commit, which were about bytes that are gone.
    pub fn rewind(&mut self, received: u64) {
        self.received = received;
        if self.phase == Phase::Complete {
            self.phase = Phase::Receiving;
            self.outcome = None;
            self.deferred = None;
        }
    }

    /// Whether the session is still open (not closed, cancelled or expired).
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Receiving | Phase::Complete)
    }

    /// Whether the session is open and [counted as](Self::counted_as) `owner` (against the
    /// per-owner or per-peer session limit).
    pub fn is_open_for(&self, owner: &Owner) -> bool {
        self.is_open() && self.counted_as().as_ref() == Some(owner)
    }

    /// Whether the session holds its destination: it [claims](Self::claims_destination) it,
    /// its file has not been committed, and it is open or has a pending deferred commit. A
    /// store refuses to create a second record that holds the same destination (the
    /// [store contract](crate::store::SessionStore#contract)).
    pub fn holds_destination(&self) -> bool {
        self.claims_destination && !self.committed && (self.is_open() || self.is_deferred())
    }

    /// Whether a deferred commit is still waiting to be carried out.
    pub fn is_deferred(&self) -> bool {
        self.deferred
            .as_ref()
            .is_some_and(|d| d.status == DeferredStatus::Pending)
    }

    /// Whether the server accepted the whole upload: committed, handed to the application, or
    /// queued for a deferred commit. A repeated final fragment is then answered with success.
    pub fn is_accepted(&self) -> bool {
        self.committed || self.outcome.is_some() || self.deferred.is_some()
    }

    /// Whether the session has had no successful packet since `cutoff_ms`.
    pub fn is_idle_since(&self, cutoff_ms: u64) -> bool {
        self.updated_ms < cutoff_ms
    }

    /// Whether `owner` may act on this session.
    pub fn is_owned_by(&self, owner: Option<&Owner>) -> bool {
        match &self.owner {
            None => true,
            Some(mine) => owner == Some(mine),
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, duration_ms)
}

/// A duration in whole milliseconds, saturating (as records keep times).
pub(crate) fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_format_and_parse() {
        let id = SessionId::new();
        let s = id.to_string();
        assert_eq!(s.len(), 38);
        assert!(s.starts_with('{') && s.ends_with('}'));
        assert_eq!(s, s.to_uppercase());
        assert_eq!(SessionId::parse(&s), Some(id));
        assert_eq!(SessionId::parse(&s.to_lowercase()), Some(id));
        assert_eq!(SessionId::parse(&s[1..37]), Some(id));
        assert_eq!(SessionId::parse(&format!(" {s} ")), Some(id));
    }

    #[test]
    fn id_rejects_non_guids() {
        for s in [
            "",
            "{}",
            "{6F1C2B7E-0D4A-4C55-9B8E-2A7D3C1E9F4}",
            "{6F1C2B7E0D4A4C559B8E2A7D3C1E9F40}",
            "6F1C2B7E0D4A4C559B8E2A7D3C1E9F40",
            "{6F1C2B7E-0D4A-4C55-9B8E-2A7D3C1E9F40",
            "../../etc/passwd",
            "{urn:uuid:6F1C2B7E-0D4A-4C55-9B8E-2A7D3C1E9F40}",
        ] {
            assert_eq!(SessionId::parse(s), None, "{s}");
        }
    }

    #[test]
    fn ids_are_unique() {
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| SessionId::new()).collect();
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn record_round_trips_through_json() {
        let mut r = SessionRecord::new(
            SessionId::new(),
            "a/b.bin".into(),
            "/a/b.bin?x=1".into(),
            Some(Owner::new("alice")),
            42,
        );
        r.total = Some(10);
        r.received = 5;
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<SessionRecord>(&json).unwrap(), r);
    }

    #[test]
    fn advance_completes_exactly_at_the_total() {
        let mut r = SessionRecord::new(SessionId::new(), "x".into(), "/x".into(), None, 0);
        r.advance(10, 9);
        assert_eq!(
            (r.total, r.received, r.phase),
            (Some(10), 9, Phase::Receiving)
        );
        r.advance(10, 10);
        assert_eq!(r.phase, Phase::Complete);
        let mut empty = SessionRecord::new(SessionId::new(), "y".into(), "/y".into(), None, 0);
        empty.advance(0, 0);
        assert_eq!(empty.phase, Phase::Complete);
    }

    #[test]
    fn rewind_reopens_a_complete_session() {
        let mut r = SessionRecord::new(SessionId::new(), "x".into(), "/x".into(), None, 0);
        r.advance(10, 6);
        r.rewind(4);
        assert_eq!((r.received, r.phase), (4, Phase::Receiving));
        r.advance(10, 10);
        assert_eq!(r.phase, Phase::Complete);
        r.rewind(0);
        assert_eq!((r.received, r.phase), (0, Phase::Receiving));
        assert!(r.outcome.is_none() && r.deferred.is_none());
    }

    #[test]
    fn ownership() {
        let mut r = SessionRecord::new(SessionId::new(), "x".into(), "/x".into(), None, 0);
        assert!(r.is_owned_by(None));
        assert!(r.is_owned_by(Some(&Owner::new("bob"))));
        r.owner = Some(Owner::new("alice"));
        assert!(r.is_owned_by(Some(&Owner::new("alice"))));
        assert!(!r.is_owned_by(Some(&Owner::new("bob"))));
        assert!(!r.is_owned_by(None));
    }
}
