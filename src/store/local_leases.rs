//! Session leases kept in process memory, for the built-in single-process stores. They never
//! need them (the layer leases only on shared stores), but keeping the contract makes them
//! usable as references for the conformance suite.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::session::SessionId;

#[derive(Debug, Default)]
pub(crate) struct LocalLeases(Mutex<HashMap<SessionId, (String, Instant)>>);

impl LocalLeases {
    pub(crate) fn acquire(&self, id: SessionId, holder: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut leases = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        leases.retain(|_, (_, until)| *until > now);
        match leases.get(&id) {
            Some((current, _)) if current != holder => false,
            _ => {
                leases.insert(id, (holder.to_owned(), now + ttl));
                true
            }
        }
    }

    pub(crate) fn release(&self, id: SessionId, holder: &str) {
        let mut leases = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if leases
            .get(&id)
            .is_some_and(|(current, _)| current == holder)
        {
            leases.remove(&id);
        }
    }
}
