//! [`Notification`]: IIS's server-application notification (`BITSServerNotificationType` and
//! `BITSServerNotificationURL`) as a [`CompletionHandler`].

use std::time::Duration;

use http::{StatusCode, Uri};

use super::notify::{self, AppReply, NotifyBody, NotifyError, NotifyRequest, TimeoutPhase};
use super::{CompletedUpload, Completion, CompletionError, CompletionHandler, Reply};

/// How the application receives the upload (`BITSServerNotificationType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotificationType {
    /// Type 1: the application gets file paths (`BITS-Request-DataFile-Name`,
    /// `BITS-Response-DataFile-Name`) and no body; it writes its reply to the response file.
    /// It must run on this machine or see the same paths.
    ByReference,
    /// Type 2: the application gets the whole upload as the POST body, streamed; its response
    /// body is the reply.
    ByValue,
}

/// Longest notification or reply URL IIS accepts.
pub(crate) const MAX_URL_LEN: usize = 2200;

/// An HTTP notification to a server application when an upload completes, as IIS sends it.
///
/// The server POSTs to the URL with `BITS-Original-Request-URL` (and, by reference, the two
/// file-name headers). A query string on the upload URL is appended to the notification URL;
/// a relative notification URL is resolved against the upload URL's folder. The application
/// answers 200, optionally with `BITS-Static-Response-URL` (the reply is that URL) and
/// `BITS-Copy-File-To-Destination` (the upload is also placed at its destination). Any other
/// status is relayed to the client with context `0x7`; 503 and an unreachable application
/// count as busy ([`CompletionPolicy`](super::CompletionPolicy)).
///
/// ```
/// use std::time::Duration;
/// use axum_bits::completion::Notification;
///
/// let notify = Notification::by_value("http://127.0.0.1:9000/process")
///     .send_timeout(Duration::from_secs(60));
/// # drop(notify);
/// ```
#[derive(Debug, Clone)]
pub struct Notification {
    kind: NotificationType,
    url: String,
    timeouts: notify::Timeouts,
    max_reply_size: u64,
}

impl Notification {
    /// A notification of the given type to `url`: absolute `http://` (HTTPS is not supported,
    /// as in IIS) or relative to the upload URL's folder.
    pub fn new(kind: NotificationType, url: impl Into<String>) -> Self {
        Self {
            kind,
            url: url.into(),
            timeouts: notify::Timeouts {
                connect: Duration::from_secs(30),
                send: Duration::from_secs(120),
                receive: Duration::from_secs(120),
            },
            max_reply_size: 64 << 20,
        }
    }

    /// A by-reference (type 1) notification.
    pub fn by_reference(url: impl Into<String>) -> Self {
        Self::new(NotificationType::ByReference, url)
    }

    /// A by-value (type 2) notification.
    pub fn by_value(url: impl Into<String>) -> Self {
        Self::new(NotificationType::ByValue, url)
    }

    /// How long connecting may take; a failure counts as a busy application. Default: 30 s.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.timeouts.connect = timeout;
        self
    }

    /// How long sending the request (the upload, by value) and waiting for the response head
    /// may take; expiry answers the client 408 with context `0x7`. Default: 2 minutes.
    #[must_use]
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.timeouts.send = timeout;
        self
    }

    /// How long reading the response body (the reply) may take. Default: 2 minutes.
    ///
    /// The three timeouts together should stay below the Windows client's 5-minute response
    /// timeout, or the client gives up on the final fragment before the server answers.
    #[must_use]
    pub fn receive_timeout(mut self, timeout: Duration) -> Self {
        self.timeouts.receive = timeout;
        self
    }

    /// Largest reply body accepted from the application. Default: 64 MiB.
    #[must_use]
    pub fn max_reply_size(mut self, bytes: u64) -> Self {
        self.max_reply_size = bytes;
        self
    }

    /// The notification type.
    pub fn kind(&self) -> NotificationType {
        self.kind
    }

    /// The configured URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Checks the URL: at most 2,200 characters, `http://` if absolute.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.url.is_empty() || self.url.len() > MAX_URL_LEN {
            return Err("the URL must have 1 to 2,200 characters".into());
        }
        if self.url.starts_with("http://") {
            let uri: Uri = self.url.parse().map_err(|_| "not a URL".to_owned())?;
            return match uri.authority() {
                Some(_) => Ok(()),
                None => Err("the URL has no host".into()),
            };
        }
        if self.url.contains("://") {
            return Err("only http:// notification URLs are supported (as in IIS)".into());
        }
        let path = self.url.trim_start_matches('/');
        format!("http://host/{path}")
            .parse::<Uri>()
            .map(drop)
            .map_err(|_| "not a relative URL".into())
    }
}

/// The URL to POST to for an upload of `original` (absolute): relative notification URLs are
/// resolved against `original`'s folder, and `original`'s query is appended.
pub(crate) fn target(notification_url: &str, original: &Uri) -> Result<Uri, String> {
    let mut url = if notification_url.contains("://") {
        notification_url.to_owned()
    } else {
        let scheme = original.scheme_str().unwrap_or("http");
        let authority = original
            .authority()
            .ok_or("the upload URL has no host to resolve a relative notification URL against")?;
        if notification_url.starts_with('/') {
            format!("{scheme}://{authority}{notification_url}")
        } else {
            let path = original.path();
            let folder = &path[..path.rfind('/').map_or(0, |i| i + 1)];
            let folder = if folder.is_empty() { "/" } else { folder };
            format!("{scheme}://{authority}{folder}{notification_url}")
        }
    };
    if let Some(query) = original.query().filter(|q| !q.is_empty()) {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(query);
    }
    url.parse()
        .map_err(|_| format!("invalid notification target {url:?}"))
}

impl CompletionHandler for Notification {
    async fn complete(&self, upload: CompletedUpload) -> Result<Completion, CompletionError> {
        let original: Uri = upload
            .url
            .parse()
            .map_err(|_| CompletionError::failed(format!("invalid upload URL {:?}", upload.url)))?;
        let target = target(&self.url, &original).map_err(CompletionError::failed)?;
        let body = match self.kind {
            NotificationType::ByReference => NotifyBody::ByReference {
                request_file: upload.staged_path.clone(),
                response_file: upload.reply_path.clone(),
            },
            NotificationType::ByValue => NotifyBody::ByValue {
                file: upload.staged_path.clone(),
                len: upload.size,
            },
        };
        let request = NotifyRequest {
            target,
            original_url: upload.url.clone(),
            body,
        };
        let answer = notify::notify(
            &request,
            &self.timeouts,
            &upload.reply_path,
            self.max_reply_size,
        )
        .await
        .map_err(|error| match error {
            NotifyError::Unreachable(source) => CompletionError::Busy(Some(source)),
            NotifyError::Timeout(TimeoutPhase::Connect) => CompletionError::Busy(None),
            NotifyError::Timeout(_) => CompletionError::Timeout,
            NotifyError::Status(StatusCode::SERVICE_UNAVAILABLE) => CompletionError::Busy(None),
            NotifyError::Status(status) => CompletionError::Status(status),
            NotifyError::Malformed(why) => CompletionError::InvalidAnswer(why),
            other => CompletionError::failed(other),
        })?;
        let reply = match answer.reply {
            AppReply::Static(url) => Reply::StaticUrl(url),
            AppReply::Written { .. } => Reply::File(upload.reply_path.clone()),
            // By reference, the application writes the reply file itself, or not at all.
            AppReply::None if upload.reply_path.exists() => Reply::File(upload.reply_path.clone()),
            AppReply::None => Reply::None,
        };
        Ok(Completion::reply(reply).copy_to_destination(answer.copy_to_destination))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(url: &str, original: &str) -> String {
        target(url, &original.parse().unwrap()).unwrap().to_string()
    }

    #[test]
    fn targets_follow_the_iis_rules() {
        assert_eq!(
            t(
                "http://otherserver/myvdir2/bag.asp",
                "http://myserver/myvdir/subdir/file.asp?ACCOUNT=86433"
            ),
            "http://otherserver/myvdir2/bag.asp?ACCOUNT=86433"
        );
        assert_eq!(
            t("myasp.asp", "http://myserver/myvdir/file.txt"),
            "http://myserver/myvdir/myasp.asp"
        );
        assert_eq!(
            t("/app/x", "http://myserver:8080/myvdir/file.txt?a=1"),
            "http://myserver:8080/app/x?a=1"
        );
        assert_eq!(
            t("http://app/process?mode=x", "http://h/f.bin?acct=42"),
            "http://app/process?mode=x&acct=42"
        );
        assert_eq!(t("p", "http://h/f.bin"), "http://h/p");
    }

    #[test]
    fn validation() {
        for ok in [
            "http://app/x",
            "http://127.0.0.1:9/x?y=1",
            "process.asp",
            "/abs/path",
        ] {
            assert!(Notification::by_value(ok).validate().is_ok(), "{ok}");
        }
        let long = format!("http://app/{}", "x".repeat(2200));
        for bad in ["", "https://app/x", "ftp://app/x", long.as_str()] {
            assert!(Notification::by_value(bad).validate().is_err(), "{bad}");
        }
    }
}
