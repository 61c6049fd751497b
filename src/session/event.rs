//! What happens to a session, as data: the events a session's record keeps in its outbox
//! until the application's [`Hooks`](crate::hooks::Hooks) have taken them.

use serde::{Deserialize, Serialize};

use super::{Owner, SessionId, SessionRecord};

/// Something that happened to a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Event {
    /// Idempotency key: the same on every delivery of this event, different for every other
    /// event. `{session}/created`, `{session}/progress/{received}`, `{session}/completed`, ...
    pub key: String,
    /// The session.
    pub session_id: SessionId,
    /// The destination under the upload root.
    pub destination: String,
    /// The owner, if an authentication layer supplied one.
    pub owner: Option<Owner>,
    /// When it happened, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What happened.
    pub kind: EventKind,
}

/// What happened to a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// Create-Session, before the client is told the session id ([`Hooks::on_create`](crate::hooks::Hooks::on_create)).
    Created,
    /// A fragment was stored: `received` of `total` bytes are held.
    Progress {
        /// Contiguous bytes held.
        received: u64,
        /// File size.
        total: u64,
    },
    /// The upload is finished: committed to its destination, handed to the completion
    /// handler, or (for a deferred commit) finally committed.
    Completed {
        /// File size.
        size: u64,
        /// Whether the file is at its destination.
        committed: bool,
    },
    /// The session ended without a finished upload: Cancel-Session, Close-Session before the
    /// last byte, or a deferred commit that was cancelled or ran out of attempts.
    Cancelled {
        /// Why.
        reason: CancelReason,
    },
    /// The session had no progress for the session timeout and was deleted.
    Expired,
}

/// Why a session ended unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CancelReason {
    /// The client sent Cancel-Session.
    CancelSession,
    /// The client sent Close-Session before every byte arrived.
    ClosedIncomplete,
    /// The application cancelled a deferred commit.
    DeferredCancelled,
    /// A deferred commit ran out of attempts.
    DeferredFailed,
    /// Uploads were disabled for the session's prefix
    /// ([`BitsHandle::disable_uploads`](crate::BitsHandle::disable_uploads)).
    UploadsDisabled,
    /// The server was full and the session, which had received no byte, had been idle for
    /// [`reclaim_empty_after`](crate::BitsLayerBuilder::reclaim_empty_after): its place went
    /// to a new session.
    Reclaimed,
    /// An operator cancelled it through the admin API
    /// ([`BitsHandle::cancel_session`](crate::BitsHandle::cancel_session)).
    Administrator,
}

impl Event {
    pub(crate) fn new(record: &SessionRecord, kind: EventKind, at_ms: u64) -> Self {
        let suffix = match &kind {
            EventKind::Created => "created".to_owned(),
            EventKind::Progress { received, .. } => format!("progress/{received}"),
            EventKind::Completed { .. } => "completed".to_owned(),
            EventKind::Cancelled { .. } => "cancelled".to_owned(),
            EventKind::Expired => "expired".to_owned(),
        };
        Self {
            key: format!("{}/{suffix}", record.id),
            session_id: record.id,
            destination: record.destination.clone(),
            owner: record.owner.clone(),
            at_ms,
            kind,
        }
    }
}

/// Adds `event` to a record's outbox. A newer progress event replaces an undelivered older
/// one: only the latest offset matters.
pub(crate) fn enqueue(record: &mut SessionRecord, event: Event) {
    if matches!(event.kind, EventKind::Progress { .. }) {
        record
            .outbox
            .retain(|e| !matches!(e.kind, EventKind::Progress { .. }));
    }
    record.outbox.push(event);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_distinct() {
        let r = SessionRecord::new(SessionId::new(), "a/b".into(), "/a/b".into(), None, 0);
        let p = |n| {
            Event::new(
                &r,
                EventKind::Progress {
                    received: n,
                    total: 10,
                },
                1,
            )
        };
        assert_eq!(p(5).key, p(5).key);
        assert_ne!(p(5).key, p(6).key);
        let c = Event::new(
            &r,
            EventKind::Completed {
                size: 10,
                committed: true,
            },
            1,
        );
        assert_eq!(c.key, format!("{}/completed", r.id));
    }

    #[test]
    fn progress_coalesces_in_the_outbox() {
        let mut r = SessionRecord::new(SessionId::new(), "a".into(), "/a".into(), None, 0);
        let ev = |r: &SessionRecord, kind| Event::new(r, kind, 0);
        let created = ev(&r, EventKind::Created);
        enqueue(&mut r, created);
        for n in [1, 2, 3] {
            let e = ev(
                &r,
                EventKind::Progress {
                    received: n,
                    total: 3,
                },
            );
            enqueue(&mut r, e);
        }
        let done = ev(
            &r,
            EventKind::Completed {
                size: 3,
                committed: true,
            },
        );
        enqueue(&mut r, done);
        let kinds: Vec<_> = r
            .outbox
            .iter()
            .map(|e| e.key.rsplit_once('/').unwrap().1.to_owned())
            .collect();
        assert_eq!(kinds, ["created", "3", "completed"]);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<SessionRecord>(&json).unwrap(), r);
    }
}
