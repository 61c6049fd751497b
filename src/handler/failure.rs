//! Everything that can stop a packet. Each error type owns its Ack, as axum's rejections own
//! their responses; [`Failure`] only gathers them and delegates.

use http::StatusCode;

use crate::completion::{Busy, CompletionError, CompletionPolicy};
use crate::destination::DestinationError;
use crate::hooks::Veto;
use crate::protocol::{Ack, Hresult};
use crate::request_body::BodyError;
use crate::session::machine::Refusal;
use crate::session_lock::LockError;
use crate::shared::CommitError;
use crate::staging::StagingError;
use crate::store::StoreError;

/// Why a packet was not carried out.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Destination(#[from] DestinationError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error("the server's session limit is reached")]
    TooManySessions,
    #[error("the owner's session limit is reached")]
    OwnerLimit,
    #[error(transparent)]
    Vetoed(#[from] Veto),
    /// The completion handler did not complete the upload.
    #[error("completion failed: {0}")]
    Application(CompletionError),
    /// The destination is busy: the completion policy decides the answer.
    #[error("the destination is busy: {0}")]
    DestinationBusy(StagingError),
}

impl Failure {
    /// An application answer the server cannot use.
    pub(crate) fn invalid_answer(why: &str) -> Self {
        Self::Application(CompletionError::InvalidAnswer(why.to_owned()))
    }

    /// The error Ack. `policy` decides what a busy destination or application answers.
    pub(crate) fn ack(&self, policy: &CompletionPolicy) -> Ack {
        match self {
            Self::Refused(r) => r.ack(),
            Self::Destination(e) => e.ack(),
            Self::Store(e) => e.ack(),
            Self::Lock(e) => e.ack(),
            Self::Staging(e) => e.ack(),
            Self::Body(e) => e.ack(),
            Self::Commit(e) => e.ack(),
            // 503 is transient for the client: it retries later.
            Self::TooManySessions | Self::OwnerLimit => {
                Ack::error(StatusCode::SERVICE_UNAVAILABLE, Hresult::TOO_MANY_SESSIONS)
            }
            Self::Vetoed(veto) => veto.ack(),
            Self::Application(error) => error.ack(policy),
            Self::DestinationBusy(_) => policy.busy_ack(Busy::Destination),
        }
    }

    /// Logs the failure: at error level if the server is at fault, else at debug.
    pub(crate) fn log(&self) {
        let server_fault = match self {
            Self::Store(e) => e.is_server_fault(),
            Self::Lock(LockError::Store(_)) => true,
            Self::Lock(LockError::Busy) => {
                tracing::warn!("another node kept the session's lease for the whole wait");
                return;
            }
            Self::Application(_) | Self::DestinationBusy(_) => {
                tracing::warn!(error = %self, source = ?std::error::Error::source(self), "upload not completed");
                return;
            }
            Self::Staging(e) | Self::Body(BodyError::Staging(e)) => e.is_server_fault(),
            Self::Commit(e) => e.is_server_fault(),
            _ => false,
        };
        if server_fault {
            tracing::error!(error = %self, source = ?std::error::Error::source(self), "packet failed");
        } else {
            // The span carries the destination and owner: an operator whose client got a 403
            // or a 404 sees why without turning on debug.
            tracing::info!(reason = %self, "packet refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorContext;

    fn answer(failure: Failure, policy: CompletionPolicy) -> (u16, Option<Hresult>, u32) {
        let ack = failure.ack(&policy);
        let (code, context) = match ack.error_code() {
            Some((code, ErrorContext::RemoteApplication)) => (Some(code), 7),
            Some((code, _)) => (Some(code), 5),
            None => (None, 0),
        };
        (ack.status().as_u16(), code, context)
    }

    #[test]
    fn every_failure_delegates_to_the_ack_of_its_error() {
        let retry = CompletionPolicy::RetryLater;
        assert_eq!(
            answer(Failure::Lock(LockError::Busy), retry),
            (503, Some(Hresult::BUSY), 5)
        );
        assert_eq!(
            answer(Failure::Body(BodyError::TooLong), retry),
            (400, Some(Hresult::E_INVALIDARG), 5)
        );
        assert_eq!(
            answer(Failure::OwnerLimit, retry),
            (503, Some(Hresult::TOO_MANY_SESSIONS), 5)
        );
        assert_eq!(
            answer(Failure::invalid_answer("x"), retry),
            (400, Some(Hresult::E_INVALIDARG), 5)
        );
    }

    #[test]
    fn the_completion_policy_decides_a_busy_answer() {
        let busy = || Failure::DestinationBusy(StagingError::DestinationExists);
        assert_eq!(
            answer(busy(), CompletionPolicy::RetryLater),
            (503, Some(Hresult::FILE_EXISTS), 5)
        );
        assert_eq!(
            answer(busy(), CompletionPolicy::Reject),
            (403, Some(Hresult::E_ACCESSDENIED), 5)
        );
        let application = || Failure::Application(CompletionError::Busy(None));
        assert_eq!(
            answer(application(), CompletionPolicy::Reject),
            (403, Some(Hresult::E_ACCESSDENIED), 7)
        );
        assert_eq!(answer(application(), CompletionPolicy::RetryLater).0, 503);
    }
}
