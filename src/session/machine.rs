//! The session state machine: `(record, packet, limits) -> decision`, with no I/O.
//!
//! The handler loads a record, asks here what to do, carries the effects out, and only then
//! stores the new record and sends the Ack. Keeping the decisions pure lets them be tested
//! exhaustively (and property-tested) without a server.

use http::StatusCode;

use super::{Phase, SessionRecord};
use crate::protocol::{Ack, FragmentRange, Hresult};

/// The limits a Fragment is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Largest file accepted (`BITSMaximumUploadSize`).
    pub max_upload_size: u64,
    /// Largest fragment body accepted; larger ones get a plain 413 so the client shrinks them.
    pub max_fragment_size: u64,
}

/// Why a packet for a session is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum Refusal {
    /// The session does not exist (never did, expired, cancelled, or belongs to someone else).
    #[error("session not found")]
    NotFound,
    /// The fragment starts beyond the next expected byte.
    #[error("fragment starts beyond the next expected byte")]
    Gap,
    /// The fragment body is larger than the server accepts in one piece.
    #[error("fragment larger than the fragment limit")]
    FragmentTooLarge,
    /// The announced file size is over the upload limit.
    #[error("file of {total} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// Announced size.
        total: u64,
        /// Configured limit.
        max: u64,
    },
    /// The fragment announces a different total from the one the first fragment fixed.
    #[error("total changed from {recorded} to {announced}")]
    TotalChanged {
        /// Total fixed by the first fragment.
        recorded: u64,
        /// Total this fragment announces.
        announced: u64,
    },
}

impl Refusal {
    /// The Ack for this refusal (the handler adds the session id and received offset).
    pub(crate) fn ack(&self) -> Ack {
        match self {
            Self::NotFound => Ack::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                Hresult::BG_E_SESSION_NOT_FOUND,
            ),
            // [MC-BUP] pairs 416 with HRESULT 0: "not an error", the client just resyncs.
            Self::Gap => Ack::error(StatusCode::RANGE_NOT_SATISFIABLE, Hresult::S_OK),
            // No BITS-Error-Code: 0x80200020 would be fatal and defeat the client's shrinking.
            Self::FragmentTooLarge => Ack::with_status(StatusCode::PAYLOAD_TOO_LARGE),
            Self::TooLarge { .. } => {
                Ack::error(StatusCode::INTERNAL_SERVER_ERROR, Hresult::BG_E_TOO_LARGE)
            }
            Self::TotalChanged { .. } => Ack::error(StatusCode::BAD_REQUEST, Hresult::E_INVALIDARG),
        }
    }
}

/// The bytes of a fragment that are new to the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Write {
    /// Leading body bytes the session already holds; they are read and dropped.
    pub skip: u64,
    /// File offset the first new byte goes to (the session's `received`).
    pub offset: u64,
    /// New bytes to write.
    pub len: u64,
    /// The file's total size (fixed now if this is the first fragment).
    pub total: u64,
}

impl Write {
    /// `received` after the write.
    pub(crate) fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// Whether the write completes the file.
    pub(crate) fn completes(&self) -> bool {
        self.end() == self.total
    }
}

/// What to do with a Fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FragmentDecision {
    /// Write the new bytes, then advance `received`.
    Write(Write),
    /// Nothing new: Ack 200 with the current `received` (duplicate or already complete).
    Duplicate,
    /// Refuse the fragment; nothing is written.
    Refuse(Refusal),
}

/// Decides what a Fragment does to a session.
///
/// Gap → 416; overlap → write only the tail; duplicate → 200 with the current offset; a
/// different total than the first fragment fixed → 400; a total over the limit → 500
/// `BG_E_TOO_LARGE`; a body over the fragment limit → 413. A fragment for a closed session
/// whose file was committed is answered as a duplicate so a client that lost the final Ack
/// finishes cleanly.
pub(crate) fn fragment(
    record: &SessionRecord,
    range: &FragmentRange,
    limits: &Limits,
) -> FragmentDecision {
    use FragmentDecision::{Duplicate, Refuse};
    if !record.is_open() {
        return if record.is_accepted() {
            Duplicate
        } else {
            Refuse(Refusal::NotFound)
        };
    }
    match record.total {
        Some(recorded) if recorded != range.total() => {
            return Refuse(Refusal::TotalChanged {
                recorded,
                announced: range.total(),
            });
        }
        None if range.total() > limits.max_upload_size => {
            return Refuse(Refusal::TooLarge {
                total: range.total(),
                max: limits.max_upload_size,
            });
        }
        _ => {}
    }
    if range.len() > limits.max_fragment_size {
        return Refuse(Refusal::FragmentTooLarge);
    }
    if record.phase == Phase::Complete {
        return Duplicate;
    }
    let received = record.received;
    if range.start() > received {
        return Refuse(Refusal::Gap);
    }
    // An empty file is complete as soon as its (empty) fragment arrives.
    if range.end() > received || range.total() == 0 {
        FragmentDecision::Write(Write {
            skip: received - range.start(),
            offset: received,
            len: range.end().saturating_sub(received),
            total: range.total(),
        })
    } else {
        Duplicate
    }
}

/// What to do with a Close-Session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseDecision {
    /// Not every byte arrived: delete the staged data, create nothing, close.
    Discard,
    /// Complete but not yet at its destination: commit, then delete staging and close.
    Commit,
    /// Nothing (more) to put at the destination: delete what is left (a reply, staged data
    /// unless a deferred commit still needs it) and close.
    Release,
    /// Closed before: answer 200 again.
    Repeat,
    /// Cancelled before (or otherwise gone): the session does not exist.
    Refuse(Refusal),
}

/// Whether a complete session's file still has to be moved to its destination. In upload-reply
/// mode (`reply_mode`) only if the application asked for it; never while a deferred commit owns
/// the file.
pub(crate) fn needs_commit(record: &SessionRecord, reply_mode: bool) -> bool {
    let wanted = if reply_mode {
        record
            .outcome
            .as_ref()
            .is_some_and(|o| o.copy_to_destination)
    } else {
        true
    };
    record.phase == Phase::Complete && wanted && !record.committed && record.deferred.is_none()
}

/// Decides what a Close-Session does. `reply_mode`: a completion handler is configured.
pub(crate) fn close(record: &SessionRecord, reply_mode: bool) -> CloseDecision {
    match record.phase {
        Phase::Receiving => CloseDecision::Discard,
        Phase::Complete if needs_commit(record, reply_mode) => CloseDecision::Commit,
        Phase::Complete => CloseDecision::Release,
        Phase::Closed => CloseDecision::Repeat,
        Phase::Cancelled => CloseDecision::Refuse(Refusal::NotFound),
    }
}

/// What to do with a Cancel-Session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelDecision {
    /// Delete staged data (a committed file stays where it is) and mark cancelled.
    Discard,
    /// Closed or cancelled before: answer 200 again.
    Repeat,
}

/// Decides what a Cancel-Session does.
pub(crate) fn cancel(record: &SessionRecord) -> CancelDecision {
    if record.is_open() {
        CancelDecision::Discard
    } else {
        CancelDecision::Repeat
    }
}

/// Whether a session (or tombstone) has seen no successful packet for `timeout_ms`.
pub(crate) fn is_expired(record: &SessionRecord, now_ms: u64, timeout_ms: u64) -> bool {
    record.is_idle_since(now_ms.saturating_sub(timeout_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionId;

    const LIMITS: Limits = Limits {
        max_upload_size: 1_000_000,
        max_fragment_size: 16 << 20,
    };

    fn record(total: Option<u64>, received: u64) -> SessionRecord {
        let mut r = SessionRecord::new(SessionId::new(), "f".into(), "/f".into(), None, 0);
        r.total = total;
        r.received = received;
        r
    }

    fn range(first: u64, last: u64, total: u64) -> FragmentRange {
        FragmentRange::new(first, last + 1, total).unwrap()
    }

    fn write(skip: u64, offset: u64, len: u64, total: u64) -> FragmentDecision {
        FragmentDecision::Write(Write {
            skip,
            offset,
            len,
            total,
        })
    }

    #[test]
    fn first_fragment_fixes_total_and_appends() {
        assert_eq!(
            fragment(&record(None, 0), &range(0, 4095, 10000), &LIMITS),
            write(0, 0, 4096, 10000)
        );
    }

    #[test]
    fn append_overlap_duplicate_gap() {
        let r = record(Some(10000), 4096);
        assert_eq!(
            fragment(&r, &range(4096, 8191, 10000), &LIMITS),
            write(0, 4096, 4096, 10000)
        );
        assert_eq!(
            fragment(&r, &range(2048, 6143, 10000), &LIMITS),
            write(2048, 4096, 2048, 10000)
        );
        assert_eq!(
            fragment(&r, &range(0, 1023, 10000), &LIMITS),
            FragmentDecision::Duplicate
        );
        assert_eq!(
            fragment(&r, &range(0, 4095, 10000), &LIMITS),
            FragmentDecision::Duplicate
        );
        assert_eq!(
            fragment(&r, &range(8192, 9999, 10000), &LIMITS),
            FragmentDecision::Refuse(Refusal::Gap)
        );
        assert_eq!(
            fragment(&r, &range(4097, 4097, 10000), &LIMITS),
            FragmentDecision::Refuse(Refusal::Gap)
        );
    }

    #[test]
    fn final_fragment_completes() {
        let r = record(Some(10000), 8192);
        let FragmentDecision::Write(w) = fragment(&r, &range(8192, 9999, 10000), &LIMITS) else {
            panic!()
        };
        assert!(w.completes());
        assert_eq!(w.end(), 10000);
        let FragmentDecision::Write(w) = fragment(&r, &range(0, 8192, 10000), &LIMITS) else {
            panic!()
        };
        assert!(!w.completes());
    }

    #[test]
    fn total_rules() {
        assert_eq!(
            fragment(&record(Some(10000), 0), &range(0, 9, 10001), &LIMITS),
            FragmentDecision::Refuse(Refusal::TotalChanged {
                recorded: 10000,
                announced: 10001
            })
        );
        assert_eq!(
            fragment(&record(None, 0), &range(0, 9, 1_000_001), &LIMITS),
            FragmentDecision::Refuse(Refusal::TooLarge {
                total: 1_000_001,
                max: 1_000_000
            })
        );
        assert!(matches!(
            fragment(&record(None, 0), &range(0, 9, 1_000_000), &LIMITS),
            FragmentDecision::Write(_)
        ));
        let small = Limits {
            max_fragment_size: 10,
            ..LIMITS
        };
        assert_eq!(
            fragment(&record(None, 0), &range(0, 10, 100), &small),
            FragmentDecision::Refuse(Refusal::FragmentTooLarge)
        );
        assert!(matches!(
            fragment(&record(None, 0), &range(0, 9, 100), &small),
            FragmentDecision::Write(_)
        ));
    }

    #[test]
    fn zero_length_file() {
        let empty = FragmentRange::new(0, 0, 0).unwrap();
        let FragmentDecision::Write(w) = fragment(&record(None, 0), &empty, &LIMITS) else {
            panic!()
        };
        assert_eq!((w.len, w.completes()), (0, true));
        let mut done = record(Some(0), 0);
        done.phase = Phase::Complete;
        assert_eq!(
            fragment(&done, &empty, &LIMITS),
            FragmentDecision::Duplicate
        );
    }

    #[test]
    fn complete_and_closed_sessions() {
        let mut r = record(Some(100), 100);
        r.phase = Phase::Complete;
        assert_eq!(
            fragment(&r, &range(90, 99, 100), &LIMITS),
            FragmentDecision::Duplicate
        );
        r.phase = Phase::Closed;
        assert_eq!(
            fragment(&r, &range(90, 99, 100), &LIMITS),
            FragmentDecision::Refuse(Refusal::NotFound)
        );
        r.committed = true;
        assert_eq!(
            fragment(&r, &range(90, 99, 100), &LIMITS),
            FragmentDecision::Duplicate
        );
        r.committed = false;
        r.deferred = Some(crate::session::DeferredState {
            status: crate::session::DeferredStatus::Pending,
            attempts: 1,
            next_attempt_ms: 0,
            last_error: None,
        });
        assert_eq!(
            fragment(&r, &range(90, 99, 100), &LIMITS),
            FragmentDecision::Duplicate
        );
        r.deferred = None;
        r.phase = Phase::Cancelled;
        r.committed = false;
        assert_eq!(
            fragment(&r, &range(0, 9, 100), &LIMITS),
            FragmentDecision::Refuse(Refusal::NotFound)
        );
    }

    #[test]
    fn close_decisions() {
        let mut r = record(Some(100), 50);
        assert_eq!(close(&r, false), CloseDecision::Discard);
        r.phase = Phase::Complete;
        r.received = 100;
        assert_eq!(close(&r, false), CloseDecision::Commit);
        // Upload-reply: only an application that asked for the copy gets one.
        assert_eq!(close(&r, true), CloseDecision::Release);
        r.outcome = Some(crate::session::Outcome {
            reply_url: "http://h/r".into(),
            stored_reply: None,
            copy_to_destination: true,
        });
        assert_eq!(close(&r, true), CloseDecision::Commit);
        r.committed = true;
        assert_eq!(close(&r, false), CloseDecision::Release);
        assert_eq!(close(&r, true), CloseDecision::Release);
        r.phase = Phase::Closed;
        assert_eq!(close(&r, false), CloseDecision::Repeat);
        r.phase = Phase::Cancelled;
        assert_eq!(close(&r, false), CloseDecision::Refuse(Refusal::NotFound));
    }

    #[test]
    fn cancel_decisions() {
        let mut r = record(None, 0);
        assert_eq!(cancel(&r), CancelDecision::Discard);
        r.phase = Phase::Complete;
        assert_eq!(cancel(&r), CancelDecision::Discard);
        r.phase = Phase::Closed;
        assert_eq!(cancel(&r), CancelDecision::Repeat);
        r.phase = Phase::Cancelled;
        assert_eq!(cancel(&r), CancelDecision::Repeat);
    }

    #[test]
    fn expiry() {
        let mut r = record(None, 0);
        r.updated_ms = 1_000;
        assert!(!is_expired(&r, 1_500, 1_000));
        assert!(!is_expired(&r, 2_000, 1_000));
        assert!(is_expired(&r, 2_001, 1_000));
        assert!(!is_expired(&r, 10, 1_000));
    }

    #[test]
    fn refusal_acks() {
        assert_eq!(
            Refusal::NotFound.ack().status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            Refusal::NotFound.ack().error_code().map(|e| e.0),
            Some(Hresult::BG_E_SESSION_NOT_FOUND)
        );
        assert_eq!(
            Refusal::Gap.ack().status(),
            StatusCode::RANGE_NOT_SATISFIABLE
        );
        assert_eq!(Refusal::FragmentTooLarge.ack().error_code(), None);
        assert_eq!(
            Refusal::TooLarge { total: 2, max: 1 }
                .ack()
                .error_code()
                .map(|e| e.0),
            Some(Hresult::BG_E_TOO_LARGE)
        );
    }
}
