//! Limits, timeouts and policies: plain data with safe defaults.

use std::time::Duration;

use http::HeaderValue;

/// When a finished upload is moved to its destination (protocol reference, section 8.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommitPoint {
    /// When the last byte arrives, before the final Fragment's Ack (as IIS does). A later
    /// Cancel-Session leaves the committed file alone; a lost Close-Session loses nothing.
    #[default]
    LastFragment,
    /// At Close-Session (as [MC-BUP] describes). Until then the file stays staged; a
    /// Cancel-Session or expiry deletes it.
    CloseSession,
}

/// Why a layer could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The default session store could not be opened.
    #[error("cannot open the session store")]
    Store(#[from] crate::store::StoreError),
    /// The default staging area could not be set up (including: not on the upload root's
    /// filesystem).
    #[error("cannot set up the staging folder for the upload root {}: {source}", root.display())]
    Staging {
        /// The upload root given to the builder.
        root: std::path::PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// `host_id` is not a bare host name or address of at most 300 characters.
    #[error("invalid host id {0:?}: expected a host name or IP address (no scheme, no port)")]
    InvalidHostId(String),
    /// `max_fragment_size` is below what the Windows client can shrink to.
    #[error("max_fragment_size {0} is below the 5 KiB Windows clients can shrink fragments to")]
    FragmentLimitTooSmall(u64),
    /// `prefix` is not an absolute URL path.
    #[error("invalid prefix {0:?}: expected an absolute path such as /upload")]
    InvalidPrefix(String),
    /// The notification URL is not an `http://` URL or a relative path of at most 2,200
    /// characters.
    #[error("invalid notification URL {url:?}: {reason}")]
    InvalidNotificationUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The notification URL is relative and no origin was configured to resolve it against.
    /// A relative URL resolves against
    /// [`public_origin`](crate::BitsLayerBuilder::public_origin) only, never against a
    /// request, whose host and path the client chooses.
    #[error(
        "relative notification URL {0:?} needs an origin to resolve against: set public_origin \
         to the http://host[:port] clients reach this server at, or give an absolute http:// URL"
    )]
    RelativeNotificationUrl(String),
    /// `public_origin` is not `http(s)://host[:port]`.
    #[error("invalid public origin {0:?}: expected scheme://host[:port] with no path")]
    InvalidPublicOrigin(String),
    /// The reply folder could not be created.
    #[error("cannot create the reply folder {}: {source}", dir.display())]
    Replies {
        /// The reply folder.
        dir: std::path::PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A limit or timeout is zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
}

impl From<crate::completion::UrlError> for ConfigError {
    fn from(error: crate::completion::UrlError) -> Self {
        use crate::completion::UrlError;
        match error {
            UrlError::Invalid { url, reason } => Self::InvalidNotificationUrl { url, reason },
            UrlError::Relative(url) => Self::RelativeNotificationUrl(url),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) prefix: String,
    pub(crate) max_upload_size: u64,
    pub(crate) session_timeout: Duration,
    pub(crate) allow_overwrites: bool,
    pub(crate) max_fragment_size: u64,
    pub(crate) max_sessions: usize,
    pub(crate) max_sessions_per_owner: usize,
    pub(crate) abandoned_after: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) sync_data: bool,
    pub(crate) sync_on_commit: bool,
    pub(crate) body_idle_timeout: Duration,
    pub(crate) min_body_rate: u64,
    pub(crate) body_rate_grace: Duration,
    pub(crate) max_sessions_per_peer: usize,
    pub(crate) reclaim_empty_after: Duration,
    pub(crate) tombstone_retention: Duration,
    pub(crate) max_tombstones: usize,
    pub(crate) max_tombstones_per_owner: usize,
    pub(crate) host_id: Option<String>,
    pub(crate) host_id_fallback_timeout: Option<u64>,
    pub(crate) commit_point: CommitPoint,
    pub(crate) sweep_interval: Duration,
    pub(crate) create_directories: bool,
    pub(crate) reserved: Vec<String>,
    pub(crate) completion_policy: crate::completion::CompletionPolicy,
    pub(crate) public_origin: Option<String>,
    pub(crate) https: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            prefix: "/".into(),
            max_upload_size: u64::MAX,
            session_timeout: Duration::from_secs(14 * 24 * 60 * 60),
            allow_overwrites: false,
            max_fragment_size: 16 << 20,
            max_sessions: 1024,
            max_sessions_per_owner: 50,
            abandoned_after: Duration::from_secs(30),
            lease_ttl: Duration::from_secs(10),
            sync_data: false,
            sync_on_commit: true,
            body_idle_timeout: Duration::from_secs(60),
            min_body_rate: 1024,
            body_rate_grace: Duration::from_secs(30),
            max_sessions_per_peer: 100,
            reclaim_empty_after: Duration::from_secs(60),
            tombstone_retention: Duration::from_secs(24 * 60 * 60),
            max_tombstones: 8192,
            max_tombstones_per_owner: 256,
            host_id: None,
            host_id_fallback_timeout: None,
            commit_point: CommitPoint::LastFragment,
            sweep_interval: Duration::from_secs(60 * 60),
            create_directories: false,
            reserved: vec![".bits".into()],
            completion_policy: crate::completion::CompletionPolicy::default(),
            public_origin: None,
            https: false,
        }
    }
}

impl Config {
    /// How fast a fragment body must arrive.
    pub(crate) fn pace(&self) -> crate::request_body::Pace {
        crate::request_body::Pace {
            idle: self.body_idle_timeout,
            min_rate: self.min_body_rate,
            grace: self.body_rate_grace,
        }
    }

    pub(crate) fn validate(&self) -> Result<ValidConfig, ConfigError> {
        if !self.prefix.starts_with('/') || self.prefix.contains(['?', '#']) {
            return Err(ConfigError::InvalidPrefix(self.prefix.clone()));
        }
        if self.max_fragment_size < crate::protocol::MIN_FRAGMENT_SIZE {
            return Err(ConfigError::FragmentLimitTooSmall(self.max_fragment_size));
        }
        for (name, zero) in [
            ("max_upload_size", self.max_upload_size == 0),
            ("max_sessions", self.max_sessions == 0),
            ("max_sessions_per_owner", self.max_sessions_per_owner == 0),
            ("max_sessions_per_peer", self.max_sessions_per_peer == 0),
            ("session_timeout", self.session_timeout.is_zero()),
            ("body_idle_timeout", self.body_idle_timeout.is_zero()),
            ("sweep_interval", self.sweep_interval.is_zero()),
            ("lease_ttl", self.lease_ttl.is_zero()),
        ] {
            if zero {
                return Err(ConfigError::Zero(name));
            }
        }
        if let Some(origin) = &self.public_origin {
            if !valid_origin(origin) {
                return Err(ConfigError::InvalidPublicOrigin(origin.clone()));
            }
        }
        let host_id = self
            .host_id
            .as_deref()
            .map(|host| {
                valid_host(host)
                    .then(|| HeaderValue::from_str(host).ok())
                    .flatten()
                    .ok_or_else(|| ConfigError::InvalidHostId(host.to_owned()))
            })
            .transpose()?;
        Ok(ValidConfig {
            config: self.clone(),
            host_id_header: host_id,
        })
    }
}

/// A bare host: a DNS name, an IPv4 address or a bracket-less IPv6 address; no scheme, port,
/// path or user info (the client keeps its own scheme and port).
fn valid_host(host: &str) -> bool {
    if host.is_empty() || host.len() > 300 {
        return false;
    }
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        return true;
    }
    host.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// `http(s)://authority` with nothing after the authority.
fn valid_origin(origin: &str) -> bool {
    origin.parse::<http::Uri>().ok().is_some_and(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https"))
            && uri.authority().is_some()
            && !origin.trim_end_matches('/').ends_with(':')
            && uri.path_and_query().is_none_or(|pq| pq.as_str() == "/")
            && origin.matches('/').count() == 2
    })
}

/// A checked [`Config`] (it derefs to it), with what checking derived from it.
#[derive(Debug, Clone)]
pub(crate) struct ValidConfig {
    pub(crate) config: Config,
    /// `host_id` as the `BITS-Host-Id` header value.
    pub(crate) host_id_header: Option<HeaderValue>,
}

impl std::ops::Deref for ValidConfig {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_safe() {
        let c = Config::default();
        assert!(!c.allow_overwrites);
        assert_eq!(c.session_timeout, Duration::from_secs(1_209_600));
        assert_eq!(c.max_fragment_size, 16 << 20);
        assert_eq!(c.commit_point, CommitPoint::LastFragment);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn host_ids() {
        for ok in ["node1", "node1.example.com", "10.0.0.7", "fe80::1"] {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in [
            "",
            "http://node1",
            "node1:8080",
            "node1/x",
            "a b",
            &"x".repeat(301),
        ] {
            assert!(!valid_host(bad), "{bad}");
        }
    }

    #[test]
    fn origins() {
        for ok in [
            "http://h",
            "https://files.example.com",
            "http://10.0.0.1:8080",
        ] {
            assert!(valid_origin(ok), "{ok}");
        }
        for bad in [
            "h",
            "ftp://h",
            "http://h/x",
            "http://h/",
            "https://",
            "http://h:",
        ] {
            assert!(!valid_origin(bad), "{bad}");
        }
    }

    #[test]
    fn rejects_bad_values() {
        let c = Config {
            max_fragment_size: 100,
            ..Config::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::FragmentLimitTooSmall(100))
        ));
        let c = Config {
            prefix: "upload".into(),
            ..Config::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::InvalidPrefix(_))));
        let c = Config {
            max_sessions: 0,
            ..Config::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Zero("max_sessions"))
        ));
    }
}
