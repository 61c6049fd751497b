//! The sessions this node ended lately, in a ring of bounded size: what the status page shows
//! as "recently ended" beyond the tombstones the store keeps (expired sessions leave none).

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use super::EndedSession;

/// Ended sessions kept for the status page.
const CAPACITY: usize = 100;

/// The ring.
#[derive(Debug, Default)]
pub(crate) struct Recent {
    ended: Mutex<VecDeque<EndedSession>>,
}

impl Recent {
    /// Notes that a session ended, forgetting the oldest beyond the capacity.
    pub(crate) fn push(&self, ended: EndedSession) {
        let mut ring = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        if ring.len() == CAPACITY {
            ring.pop_front();
        }
        ring.push_back(ended);
    }

    /// The sessions, newest first.
    pub(crate) fn list(&self) -> Vec<EndedSession> {
        let ring = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        ring.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::EndReason;
    use crate::session::SessionId;

    fn ended(n: u64) -> EndedSession {
        EndedSession {
            id: SessionId::new(),
            destination: format!("f{n}"),
            owner: None,
            received: n,
            total: Some(n),
            committed: false,
            reason: EndReason::Expired,
            ended_ms: n,
        }
    }

    #[test]
    fn keeps_the_newest_up_to_its_capacity() {
        let recent = Recent::default();
        for n in 0..(CAPACITY as u64 + 5) {
            recent.push(ended(n));
        }
        let list = recent.list();
        assert_eq!(list.len(), CAPACITY);
        assert_eq!(list[0].received, CAPACITY as u64 + 4);
        assert_eq!(list[CAPACITY - 1].received, 5);
    }
}
