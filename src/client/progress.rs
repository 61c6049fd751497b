//! Progress reports, for progress bars and logs.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Where an upload is, handed to the callback of
/// [`UploadBuilder::on_progress`](super::UploadBuilder::on_progress) after every body frame
/// sent and every Ack.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// The file's size.
    pub total: u64,
    /// Bytes the server has acknowledged (its `BITS-Received-Content-Range`).
    pub acknowledged: u64,
    /// Bytes of the current fragment sent and not yet acknowledged.
    pub in_flight: u64,
    /// The fragment size in use (it shrinks when the server answers 413).
    pub fragment_size: u64,
    /// The session id, once the server has given one.
    pub session_id: Option<String>,
    /// What the client is doing.
    pub phase: UploadPhase,
    /// Transient failures retried so far.
    pub retries: u32,
    /// Times the server lost the session and the upload started over.
    pub restarts: u32,
    /// Time since the upload began.
    pub elapsed: Duration,
}

impl Progress {
    /// `acknowledged + in_flight`, never above `total`: what a progress bar shows.
    pub fn sent(&self) -> u64 {
        self.acknowledged
            .saturating_add(self.in_flight)
            .min(self.total)
    }
}

/// What an upload is doing, as the client sees it (the server's record of a session has its
/// own [`session::Phase`](crate::session::Phase)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UploadPhase {
    /// Ping and Create-Session.
    Connecting,
    /// Sending fragments.
    Uploading,
    /// Waiting before a retry, after a transient failure. Reported once per retry, as the
    /// wait begins; the next report comes when the wait is over, so a status line that
    /// counts down needs a timer of its own.
    Retrying {
        /// How long until the next attempt.
        delay: Duration,
        /// The failure being retried, in full (the packet, the causes, what to do).
        error: String,
        /// The failure in a few words, for a status line: the innermost cause of a transport
        /// failure (`Connection refused (os error 111)`), or the status and `BITS-Error-Code`
        /// of a server's answer (`503 Service Unavailable, ERROR_DISK_FULL`).
        reason: String,
    },
    /// Downloading the reply of an upload-reply job.
    DownloadingReply {
        /// Bytes of the reply received.
        received: u64,
        /// The reply's size, once known.
        total: Option<u64>,
    },
    /// Close-Session.
    Closing,
    /// Done.
    Finished,
}

/// The progress callback.
pub(crate) type Callback = Arc<dyn Fn(&Progress) + Send + Sync>;

/// The shared progress of one upload and the callback that hears about it.
pub(crate) struct Tracker {
    state: Mutex<Progress>,
    started: Instant,
    callback: Option<Callback>,
}

impl Tracker {
    pub(crate) fn new(total: u64, callback: Option<Callback>) -> Self {
        Self {
            state: Mutex::new(Progress {
                total,
                acknowledged: 0,
                in_flight: 0,
                fragment_size: 0,
                session_id: None,
                phase: UploadPhase::Connecting,
                retries: 0,
                restarts: 0,
                elapsed: Duration::ZERO,
            }),
            started: Instant::now(),
            callback,
        }
    }

    /// Changes the state and tells the callback.
    pub(crate) fn update(&self, change: impl FnOnce(&mut Progress)) {
        let report = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            change(&mut state);
            state.elapsed = self.started.elapsed();
            self.callback.as_ref().map(|_| state.clone())
        };
        if let (Some(callback), Some(report)) = (&self.callback, report) {
            callback(&report);
        }
    }

    /// `n` more body bytes went out.
    pub(crate) fn sent(&self, n: u64) {
        self.update(|p| p.in_flight = p.in_flight.saturating_add(n));
    }

    /// A copy of the current state.
    #[cfg(test)]
    pub(crate) fn snapshot(&self) -> Progress {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        state.elapsed = self.started.elapsed();
        state
    }
}
