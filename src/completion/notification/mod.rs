//! [`Notification`]: IIS's server-application notification (`BITSServerNotificationType` and
//! `BITSServerNotificationURL`) as a [`CompletionHandler`].

use std::time::Duration;

use http::uri::PathAndQuery;
use http::{StatusCode, Uri};

mod exchange;

use exchange::{AppReply, NotifyBody, NotifyError, NotifyRequest, TimeoutPhase};

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
/// file-name headers). The application answers 200, optionally with
/// `BITS-Static-Response-URL` (the reply is that URL) and `BITS-Copy-File-To-Destination`
/// (the upload is also placed at its destination). Any other status is relayed to the client
/// with context `0x7`; 503 and an unreachable application count as busy
/// ([`CompletionPolicy`](super::CompletionPolicy)).
///
/// # Where notifications go
///
/// Only where the operator says: the scheme, host, port and path of every notification are
/// fixed when the layer is built, and nothing a client sends (its `Host` header, an
/// absolute-form request target, its upload path) changes them.
///
/// * An absolute `http://` URL is used as it is.
/// * A relative URL (`/notify`, or `notify`: both mean the same) is resolved against the
///   root of [`public_origin`](crate::BitsLayerBuilder::public_origin), which must then be
///   set and be `http://`; without it,
///   [`build`](crate::BitsLayerBuilder::build) fails with
///   [`ConfigError::RelativeNotificationUrl`](crate::ConfigError::RelativeNotificationUrl).
///   IIS resolves a relative URL against the folder of the upload URL instead; the host and
///   path of that URL are the client's to choose, so axum-bits does not.
/// * As in IIS, the query of the upload URL is appended to the notification URL (after the
///   URL's own query, joined with `&`). That is the only part a client chooses: it stays a
///   query, whatever it holds (`?`, `@`, `/`, percent-encoded characters); a fragment (`#…`)
///   never reaches the server, and characters a URL cannot carry (spaces, control characters
///   such as CR and LF) are refused. The application must treat the query as client input.
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
    timeouts: exchange::Timeouts,
    max_reply_size: u64,
    /// `url` made absolute, when the layer is built.
    base: Option<Uri>,
}

impl Notification {
    /// A notification of the given type to `url`: absolute `http://` (HTTPS is not supported,
    /// as in IIS) or relative to the configured
    /// [`public_origin`](crate::BitsLayerBuilder::public_origin) (see
    /// [Where notifications go](Self#where-notifications-go)).
    pub fn new(kind: NotificationType, url: impl Into<String>) -> Self {
        Self {
            kind,
            url: url.into(),
            timeouts: exchange::Timeouts {
                connect: Duration::from_secs(30),
                send: Duration::from_secs(120),
                receive: Duration::from_secs(120),
            },
            max_reply_size: 64 << 20,
            base: None,
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

    /// Checks the URL and makes it absolute, against `public_origin` if it is relative.
    pub(crate) fn resolve(&mut self, public_origin: Option<&str>) -> Result<(), UrlError> {
        self.base = Some(base_url(&self.url, public_origin)?);
        Ok(())
    }
}

/// Why a notification URL cannot be used; the builder reports it as a
/// [`ConfigError`](crate::ConfigError).
#[derive(Debug, thiserror::Error)]
pub(crate) enum UrlError {
    /// Not an `http://` URL or a relative path of at most 2,200 characters.
    #[error("invalid notification URL {url:?}: {reason}")]
    Invalid { url: String, reason: String },
    /// Relative, and no origin was configured to resolve it against.
    #[error(
        "relative notification URL {0:?} needs an origin to resolve against: set public_origin \
         to the http://host[:port] clients reach this server at, or give an absolute http:// URL"
    )]
    Relative(String),
}

/// The absolute URL notifications go to: `url` if it is absolute, else `url` on the root of
/// `origin`, an origin the operator configured (never one from a request).
pub(crate) fn base_url(url: &str, origin: Option<&str>) -> Result<Uri, UrlError> {
    let invalid = |reason: String| UrlError::Invalid {
        url: url.to_owned(),
        reason,
    };
    if url.is_empty() || url.len() > MAX_URL_LEN {
        return Err(invalid("the URL must have 1 to 2,200 characters".into()));
    }
    let first_segment = url.split(['/', '?', '#']).next().unwrap_or_default();
    if url.contains("://") || first_segment.contains(':') {
        if !url.starts_with("http://") {
            return Err(invalid(
                "only http:// notification URLs are supported (as in IIS)".into(),
            ));
        }
        let uri: Uri = url.parse().map_err(|_| invalid("not a URL".into()))?;
        return match uri.host() {
            Some(host) if !host.is_empty() => Ok(uri),
            _ => Err(invalid("the URL has no host".into())),
        };
    }
    if url.starts_with("//") {
        return Err(invalid(
            "a URL starting with // names a host: write it as an absolute http:// URL".into(),
        ));
    }
    let origin = origin.ok_or_else(|| UrlError::Relative(url.to_owned()))?;
    if !origin.starts_with("http://") {
        return Err(invalid(format!(
            "it is relative to public_origin {origin:?}, but notifications are sent over \
             http:// only (as in IIS): give an absolute http:// URL"
        )));
    }
    let origin: Uri = origin
        .parse()
        .map_err(|_| invalid(format!("public_origin {origin:?} is not a URL")))?;
    let path = url.strip_prefix('/').unwrap_or(url);
    let path_and_query: PathAndQuery = format!("/{path}")
        .parse()
        .map_err(|_| invalid("not a relative URL".into()))?;
    let mut parts = origin.into_parts();
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).map_err(|_| invalid("not a relative URL".into()))
}

/// The URL to POST to for an upload whose URL has `query`: `base` with the query appended, as
/// IIS does. Only the query is the client's: the scheme, authority and path are `base`'s
/// whatever the query holds.
pub(crate) fn target(base: &Uri, query: Option<&str>) -> Result<Uri, String> {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok(base.clone());
    };
    if query
        .bytes()
        .any(|b| b.is_ascii_control() || b == b' ' || b == b'#')
    {
        return Err("the upload URL's query has characters a URL cannot carry".into());
    }
    let path = base.path();
    let path_and_query = match base.query() {
        Some(own) if !own.is_empty() => format!("{path}?{own}&{query}"),
        _ => format!("{path}?{query}"),
    };
    let path_and_query: PathAndQuery = path_and_query
        .parse()
        .map_err(|_| "the upload URL's query cannot be appended to the notification URL")?;
    if path_and_query.path() != path {
        return Err("the upload URL's query would change the notification path".into());
    }
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).map_err(|_| "invalid notification target".into())
}

impl CompletionHandler for Notification {
    async fn complete(&self, upload: CompletedUpload) -> Result<Completion, CompletionError> {
        let original: Uri = upload
            .url
            .parse()
            .map_err(|_| CompletionError::failed(format!("invalid upload URL {:?}", upload.url)))?;
        // Resolved when the layer was built; used on its own, only an absolute URL will do.
        let base = match &self.base {
            Some(base) => base.clone(),
            None => base_url(&self.url, None).map_err(CompletionError::failed)?,
        };
        let target = target(&base, original.query()).map_err(CompletionError::failed)?;
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
        let answer = exchange::notify(
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

    fn base(url: &str, origin: Option<&str>) -> Result<String, UrlError> {
        base_url(url, origin).map(|uri| uri.to_string())
    }

    fn t(url: &str, origin: Option<&str>, query: Option<&str>) -> String {
        target(&base_url(url, origin).unwrap(), query)
            .unwrap()
            .to_string()
    }

    #[test]
    fn absolute_urls_are_kept() {
        for ok in [
            "http://app/x",
            "http://127.0.0.1:9/x?y=1",
            "http://[::1]:9/x",
        ] {
            assert_eq!(base(ok, None).unwrap(), ok);
            assert_eq!(base(ok, Some("http://public")).unwrap(), ok);
        }
        assert_eq!(base("http://app", None).unwrap(), "http://app/");
    }

    #[test]
    fn relative_urls_resolve_against_the_configured_origin_only() {
        let origin = Some("http://files.example.com:8080");
        for (url, expected) in [
            ("/notify", "http://files.example.com:8080/notify"),
            ("notify", "http://files.example.com:8080/notify"),
            (
                "app/x.asp?mode=1",
                "http://files.example.com:8080/app/x.asp?mode=1",
            ),
            ("/", "http://files.example.com:8080/"),
        ] {
            assert_eq!(base(url, origin).unwrap(), expected, "{url}");
        }
        let error = base_url("/notify", None).unwrap_err();
        assert!(
            matches!(&error, UrlError::Relative(url) if url == "/notify"),
            "{error:?}"
        );
        assert!(error.to_string().contains("public_origin"), "{error}");
        // Notifications are http only: an https origin cannot resolve a relative URL.
        let error = base_url("/notify", Some("https://files.example.com")).unwrap_err();
        assert!(matches!(error, UrlError::Invalid { .. }));
        assert!(error.to_string().contains("absolute http://"), "{error}");
    }

    #[test]
    fn invalid_urls() {
        let long = format!("http://app/{}", "x".repeat(2200));
        for bad in [
            "",
            "https://app/x",
            "ftp://app/x",
            "HTTP://app/x",
            "http://",
            "https:app",
            "//evil.example/x",
            "/bad path",
            long.as_str(),
        ] {
            assert!(
                matches!(
                    base_url(bad, Some("http://h")),
                    Err(UrlError::Invalid { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_query_is_appended_as_iis_does() {
        // IIS's example (protocol reference, section 10.5).
        assert_eq!(
            t(
                "http://otherserver/myvdir2/bag.asp",
                None,
                Some("ACCOUNT=86433")
            ),
            "http://otherserver/myvdir2/bag.asp?ACCOUNT=86433"
        );
        assert_eq!(
            t("http://app/process?mode=x", None, Some("acct=42")),
            "http://app/process?mode=x&acct=42"
        );
        assert_eq!(
            t("/app/x", Some("http://h:8080"), Some("a=1")),
            "http://h:8080/app/x?a=1"
        );
        assert_eq!(t("http://app/p", None, Some("")), "http://app/p");
        assert_eq!(t("http://app/p", None, None), "http://app/p");
    }

    #[test]
    fn the_query_never_changes_the_authority_or_path() {
        let base = base_url("http://app:9000/notify", None).unwrap();
        for query in [
            "@127.0.0.1:1/x",
            "?//127.0.0.1:1/x",
            "x/../../admin",
            "u=http://127.0.0.1:1/x&b=2",
            "%2F%2F127.0.0.1%3A1%2F%0D%0AHost:%20evil",
            "a=\u{e9}",
        ] {
            let uri = target(&base, Some(query)).unwrap();
            assert_eq!(uri.scheme_str(), Some("http"), "{query}");
            assert_eq!(uri.authority().unwrap().as_str(), "app:9000", "{query}");
            assert_eq!(uri.path(), "/notify", "{query}");
            assert_eq!(uri.query(), Some(query), "{query}");
        }
        for query in ["a\r\nHost: evil", "a b", "a#@evil/", "a\0"] {
            assert!(target(&base, Some(query)).is_err(), "{query:?}");
        }
    }
}
