//! [`Settings`]: the [`BitsLayerBuilder`]'s options read from a TOML file (feature
//! `settings`).
//!
//! Every key is optional and maps onto the builder setter of the same name; a key left out
//! keeps the builder's default, so a file holds only what it changes. Unknown keys are
//! errors, and every error names the key and its line.
//!
//! ```toml
//! root = "/srv/uploads"
//! prefix = "/upload"
//! max_upload_size = "4GiB"
//! session_timeout = "14d"
//! allow_overwrites = false
//! completion_policy = "retry_later"
//!
//! [notification]
//! url = "http://127.0.0.1:9000/uploaded"
//! type = "by_value"
//! send_timeout = "1m"
//! ```
//!
//! # Values
//!
//! * **Durations** are strings of numbers with units, largest first or not, optionally
//!   separated by spaces: `"500ms"`, `"30s"`, `"1h30m"`, `"14d"`. The units are `ns`, `us`,
//!   `ms`, `s`, `m` (minutes), `h` and `d` (24 hours). A bare number is refused: it has no
//!   unit.
//! * **Sizes** are integers (bytes) or strings of an integer and a unit: `"16M"`, `"4GiB"`,
//!   `"512 KiB"`, `"10MB"`. `K`, `M`, `G`, `T` and `KiB`, `MiB`, `GiB`, `TiB` are powers of
//!   1024; `KB`, `MB`, `GB`, `TB` are powers of 1000; `B` is bytes. Units ignore case.
//! * **`commit_point`** is `"last_fragment"` or `"close_session"`.
//! * **`completion_policy`** is `"reject"`, `"retry_later"`, `"defer"` (with the default
//!   [`Backoff`]), or `{ defer = { first = "10s", max = "10m", attempts = 12 } }` (each of
//!   the three optional).
//! * **`notification`** is a table with `url` and `type` (`"by_reference"` or `"by_value"`),
//!   and optionally `connect_timeout`, `send_timeout`, `receive_timeout` and
//!   `max_reply_size`; see [`NotificationSettings`].
//!
//! The session store, the staging, a completion handler and hooks are code, not settings:
//! give them to the builder yourself, before or after [`Settings::apply`].
//!
//! # In a configuration of your own
//!
//! [`Settings`] is [`Deserialize`], so an application can make it one table of its own
//! configuration, and read the whole file with [`from_toml_str`] or [`from_file`] for the
//! same error messages:
//!
//! ```
//! use axum_bits::Settings;
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct AppConfig {
//!     listen: String,
//!     bits: Settings,
//! }
//!
//! # fn main() -> Result<(), axum_bits::SettingsError> {
//! let config: AppConfig = axum_bits::settings::from_toml_str(
//!     r#"
//!     listen = "127.0.0.1:8080"
//!
//!     [bits]
//!     max_upload_size = "1GiB"
//!     "#,
//! )?;
//! assert_eq!(config.listen, "127.0.0.1:8080");
//! assert_eq!(config.bits.max_upload_size, Some(1 << 30));
//! # Ok(()) }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use crate::completion::{Backoff, CompletionPolicy, Notification, NotificationType};
use crate::config::CommitPoint;
use crate::layer::BitsLayerBuilder;

/// The [`BitsLayerBuilder`]'s options as data, to read from a configuration file.
///
/// Each field is one builder setter, named alike; `None` (the key left out of the file)
/// keeps the builder's default. [`apply`](Self::apply) sets the rest. See the
/// [module documentation](self) for the file format.
///
/// ```
/// use axum_bits::{BitsLayer, Settings};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let tmp = tempfile::tempdir()?;
/// # let uploads = tmp.path().join("uploads");
/// let settings = Settings::from_toml_str(
///     r#"
///     max_upload_size = "4GiB"
///     session_timeout = "7d"
///     body_idle_timeout = "1m30s"
///     allow_overwrites = true
///     "#,
/// )?;
/// assert_eq!(settings.max_upload_size, Some(4 << 30));
/// let bits = settings.apply(BitsLayer::builder(&uploads)).build()?;
/// # drop(bits);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Settings {
    /// The folder uploads land in; replaces the one given to
    /// [`BitsLayer::builder`](crate::BitsLayer::builder). See [`BitsLayerBuilder::root`].
    pub root: Option<PathBuf>,
    /// See [`BitsLayerBuilder::prefix`].
    pub prefix: Option<String>,
    /// A size. See [`BitsLayerBuilder::max_upload_size`].
    #[serde(with = "size")]
    pub max_upload_size: Option<u64>,
    /// A duration. See [`BitsLayerBuilder::session_timeout`].
    #[serde(with = "duration")]
    pub session_timeout: Option<Duration>,
    /// See [`BitsLayerBuilder::allow_overwrites`].
    pub allow_overwrites: Option<bool>,
    /// See [`BitsLayerBuilder::host_id`].
    pub host_id: Option<String>,
    /// A duration (sent in whole seconds, rounded up). See
    /// [`BitsLayerBuilder::host_id_fallback_timeout`].
    #[serde(with = "duration")]
    pub host_id_fallback_timeout: Option<Duration>,
    /// A duration. See [`BitsLayerBuilder::sweep_interval`].
    #[serde(with = "duration")]
    pub sweep_interval: Option<Duration>,
    /// See [`BitsLayerBuilder::max_sessions`].
    pub max_sessions: Option<usize>,
    /// See [`BitsLayerBuilder::max_sessions_per_owner`].
    pub max_sessions_per_owner: Option<usize>,
    /// See [`BitsLayerBuilder::max_sessions_per_peer`].
    pub max_sessions_per_peer: Option<usize>,
    /// A duration. See [`BitsLayerBuilder::reclaim_empty_after`].
    #[serde(with = "duration")]
    pub reclaim_empty_after: Option<Duration>,
    /// A duration. See [`BitsLayerBuilder::tombstone_retention`].
    #[serde(with = "duration")]
    pub tombstone_retention: Option<Duration>,
    /// See [`BitsLayerBuilder::max_tombstones`].
    pub max_tombstones: Option<usize>,
    /// See [`BitsLayerBuilder::max_tombstones_per_owner`].
    pub max_tombstones_per_owner: Option<usize>,
    /// A duration. See [`BitsLayerBuilder::abandoned_after`].
    #[serde(with = "duration")]
    pub abandoned_after: Option<Duration>,
    /// A duration. See [`BitsLayerBuilder::lease_ttl`].
    #[serde(with = "duration")]
    pub lease_ttl: Option<Duration>,
    /// See [`BitsLayerBuilder::sync_data`].
    pub sync_data: Option<bool>,
    /// See [`BitsLayerBuilder::sync_on_commit`].
    pub sync_on_commit: Option<bool>,
    /// A size. See [`BitsLayerBuilder::max_fragment_size`].
    #[serde(with = "size")]
    pub max_fragment_size: Option<u64>,
    /// A duration. See [`BitsLayerBuilder::body_idle_timeout`].
    #[serde(with = "duration")]
    pub body_idle_timeout: Option<Duration>,
    /// A size: bytes a second. See [`BitsLayerBuilder::min_body_rate`].
    #[serde(with = "size")]
    pub min_body_rate: Option<u64>,
    /// A duration. See [`BitsLayerBuilder::body_rate_grace`].
    #[serde(with = "duration")]
    pub body_rate_grace: Option<Duration>,
    /// `"last_fragment"` or `"close_session"`. See [`BitsLayerBuilder::commit_point`].
    #[serde(with = "commit_point")]
    pub commit_point: Option<CommitPoint>,
    /// See [`BitsLayerBuilder::create_directories`].
    pub create_directories: Option<bool>,
    /// See [`BitsLayerBuilder::public_origin`].
    pub public_origin: Option<String>,
    /// See [`BitsLayerBuilder::https`].
    pub https: Option<bool>,
    /// See [`BitsLayerBuilder::replies_dir`].
    pub replies_dir: Option<PathBuf>,
    /// See [`BitsLayerBuilder::notification`].
    pub notification: Option<NotificationSettings>,
    /// `"reject"`, `"retry_later"`, `"defer"` or `{ defer = { first, max, attempts } }`. See
    /// [`BitsLayerBuilder::completion_policy`].
    #[serde(with = "completion_policy")]
    pub completion_policy: Option<CompletionPolicy>,
}

impl Settings {
    /// Reads settings from TOML text (a whole file, not a table in one).
    ///
    /// ```
    /// use axum_bits::Settings;
    ///
    /// let error = Settings::from_toml_str("max_upload_sise = 1024").unwrap_err();
    /// assert_eq!(error.key(), Some("max_upload_sise"));
    /// assert!(error.to_string().contains("unknown field `max_upload_sise`"));
    /// ```
    pub fn from_toml_str(text: &str) -> Result<Self, SettingsError> {
        from_toml_str(text)
    }

    /// Reads settings from a TOML file. This reads the file with blocking I/O: call it at
    /// startup, or from [`tokio::task::spawn_blocking`].
    ///
    /// ```
    /// use axum_bits::Settings;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let tmp = tempfile::tempdir()?;
    /// let path = tmp.path().join("bits.toml");
    /// std::fs::write(&path, "session_timeout = \"2d\"\n")?;
    /// let settings = Settings::from_file(&path)?;
    /// assert_eq!(settings.session_timeout, Some(std::time::Duration::from_secs(2 * 86_400)));
    /// # Ok(()) }
    /// ```
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SettingsError> {
        from_file(path)
    }

    /// Calls the builder setter of every field that is set, and returns the builder. A field
    /// that is `None` leaves the builder's value alone, whether its default or one set before.
    /// The values are checked by [`build`](BitsLayerBuilder::build), as for the setters.
    ///
    /// ```
    /// use axum_bits::{BitsLayer, Settings};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let tmp = tempfile::tempdir()?;
    /// let settings = Settings::from_toml_str("max_sessions = 10")?;
    /// // Settings from code override the file's: set them after applying it.
    /// let builder = settings
    ///     .apply(BitsLayer::builder(tmp.path()))
    ///     .max_upload_size(1 << 20);
    /// let bits = builder.build()?;
    /// # drop(bits);
    /// # Ok(()) }
    /// ```
    pub fn apply(self, mut builder: BitsLayerBuilder) -> BitsLayerBuilder {
        // Taken apart field by field, so that a new field cannot be forgotten here.
        let Self {
            root,
            prefix,
            max_upload_size,
            session_timeout,
            allow_overwrites,
            host_id,
            host_id_fallback_timeout,
            sweep_interval,
            max_sessions,
            max_sessions_per_owner,
            max_sessions_per_peer,
            reclaim_empty_after,
            tombstone_retention,
            max_tombstones,
            max_tombstones_per_owner,
            abandoned_after,
            lease_ttl,
            sync_data,
            sync_on_commit,
            max_fragment_size,
            body_idle_timeout,
            min_body_rate,
            body_rate_grace,
            commit_point,
            create_directories,
            public_origin,
            https,
            replies_dir,
            notification,
            completion_policy,
        } = self;
        if let Some(root) = root {
            builder = builder.root(root);
        }
        if let Some(prefix) = prefix {
            builder = builder.prefix(prefix);
        }
        if let Some(bytes) = max_upload_size {
            builder = builder.max_upload_size(bytes);
        }
        if let Some(timeout) = session_timeout {
            builder = builder.session_timeout(timeout);
        }
        if let Some(allow) = allow_overwrites {
            builder = builder.allow_overwrites(allow);
        }
        if let Some(host) = host_id {
            builder = builder.host_id(host);
        }
        if let Some(timeout) = host_id_fallback_timeout {
            builder = builder.host_id_fallback_timeout(timeout);
        }
        if let Some(interval) = sweep_interval {
            builder = builder.sweep_interval(interval);
        }
        if let Some(sessions) = max_sessions {
            builder = builder.max_sessions(sessions);
        }
        if let Some(sessions) = max_sessions_per_owner {
            builder = builder.max_sessions_per_owner(sessions);
        }
        if let Some(sessions) = max_sessions_per_peer {
            builder = builder.max_sessions_per_peer(sessions);
        }
        if let Some(idle) = reclaim_empty_after {
            builder = builder.reclaim_empty_after(idle);
        }
        if let Some(retention) = tombstone_retention {
            builder = builder.tombstone_retention(retention);
        }
        if let Some(tombstones) = max_tombstones {
            builder = builder.max_tombstones(tombstones);
        }
        if let Some(tombstones) = max_tombstones_per_owner {
            builder = builder.max_tombstones_per_owner(tombstones);
        }
        if let Some(idle) = abandoned_after {
            builder = builder.abandoned_after(idle);
        }
        if let Some(ttl) = lease_ttl {
            builder = builder.lease_ttl(ttl);
        }
        if let Some(on) = sync_data {
            builder = builder.sync_data(on);
        }
        if let Some(on) = sync_on_commit {
            builder = builder.sync_on_commit(on);
        }
        if let Some(bytes) = max_fragment_size {
            builder = builder.max_fragment_size(bytes);
        }
        if let Some(timeout) = body_idle_timeout {
            builder = builder.body_idle_timeout(timeout);
        }
        if let Some(rate) = min_body_rate {
            builder = builder.min_body_rate(rate);
        }
        if let Some(grace) = body_rate_grace {
            builder = builder.body_rate_grace(grace);
        }
        if let Some(point) = commit_point {
            builder = builder.commit_point(point);
        }
        if let Some(create) = create_directories {
            builder = builder.create_directories(create);
        }
        if let Some(origin) = public_origin {
            builder = builder.public_origin(origin);
        }
        if let Some(on) = https {
            builder = builder.https(on);
        }
        if let Some(dir) = replies_dir {
            builder = builder.replies_dir(dir);
        }
        if let Some(notification) = notification {
            builder = builder.notification(notification.into());
        }
        if let Some(policy) = completion_policy {
            builder = builder.completion_policy(policy);
        }
        builder
    }
}

/// An IIS-style server-application [`Notification`] as data: the `[notification]` table of
/// [`Settings`].
///
/// ```
/// use axum_bits::Settings;
/// use axum_bits::completion::NotificationType;
///
/// # fn main() -> Result<(), axum_bits::SettingsError> {
/// let settings = Settings::from_toml_str(
///     r#"
///     [notification]
///     url = "http://127.0.0.1:9000/uploaded"
///     type = "by_reference"
///     connect_timeout = "5s"
///     "#,
/// )?;
/// let notification = settings.notification.expect("a notification");
/// assert_eq!(notification.kind, NotificationType::ByReference);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NotificationSettings {
    /// Where notifications go. See [`Notification::new`].
    pub url: String,
    /// `type` in the file: `"by_reference"` or `"by_value"`.
    #[serde(rename = "type", with = "notification_type")]
    pub kind: NotificationType,
    /// A duration. See [`Notification::connect_timeout`].
    #[serde(default, with = "duration")]
    pub connect_timeout: Option<Duration>,
    /// A duration. See [`Notification::send_timeout`].
    #[serde(default, with = "duration")]
    pub send_timeout: Option<Duration>,
    /// A duration. See [`Notification::receive_timeout`].
    #[serde(default, with = "duration")]
    pub receive_timeout: Option<Duration>,
    /// A size. See [`Notification::max_reply_size`].
    #[serde(default, with = "size")]
    pub max_reply_size: Option<u64>,
}

impl NotificationSettings {
    /// A notification of this type to `url`, with the default timeouts and reply size.
    ///
    /// ```
    /// use axum_bits::completion::{Notification, NotificationType};
    /// use axum_bits::settings::NotificationSettings;
    ///
    /// let settings = NotificationSettings::new(NotificationType::ByValue, "http://127.0.0.1:9000/");
    /// let notification = Notification::from(settings);
    /// assert_eq!(notification.url(), "http://127.0.0.1:9000/");
    /// ```
    pub fn new(kind: NotificationType, url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            kind,
            connect_timeout: None,
            send_timeout: None,
            receive_timeout: None,
            max_reply_size: None,
        }
    }
}

impl From<NotificationSettings> for Notification {
    fn from(settings: NotificationSettings) -> Self {
        let mut notification = Notification::new(settings.kind, settings.url);
        if let Some(timeout) = settings.connect_timeout {
            notification = notification.connect_timeout(timeout);
        }
        if let Some(timeout) = settings.send_timeout {
            notification = notification.send_timeout(timeout);
        }
        if let Some(timeout) = settings.receive_timeout {
            notification = notification.receive_timeout(timeout);
        }
        if let Some(bytes) = settings.max_reply_size {
            notification = notification.max_reply_size(bytes);
        }
        notification
    }
}

/// Why settings could not be read.
///
/// ```
/// use axum_bits::{Settings, SettingsError};
///
/// match Settings::from_toml_str("session_timeout = \"30x\"") {
///     Err(SettingsError::Invalid { key, line, .. }) => {
///         assert_eq!(key.as_deref(), Some("session_timeout"));
///         assert_eq!(line, Some(1));
///     }
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// The file could not be read.
    #[error("cannot read the settings file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The text is not TOML, or not settings: an unknown key, a missing one, or a value of
    /// the wrong type or form (such as a duration without a unit).
    #[error("{}", describe(path.as_deref(), key.as_deref(), message))]
    Invalid {
        /// The file, when the settings came from one.
        path: Option<PathBuf>,
        /// The dotted key the error is about (`notification.url`), when there is one.
        key: Option<String>,
        /// The line (1-based) the error is on, when known.
        line: Option<usize>,
        /// What is wrong, as the TOML parser puts it: the line and column, the line itself
        /// with the place marked, and the reason.
        message: String,
    },
}

impl SettingsError {
    /// The dotted key an [`Invalid`](Self::Invalid) error is about, when there is one.
    ///
    /// ```
    /// use axum_bits::Settings;
    ///
    /// let error = Settings::from_toml_str("[notification]\nurl = 7\ntype = \"by_value\"")
    ///     .unwrap_err();
    /// assert_eq!(error.key(), Some("notification.url"));
    /// ```
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Invalid { key, .. } => key.as_deref(),
            Self::Read { .. } => None,
        }
    }

    fn invalid(text: &str, path: Option<&Path>, error: &toml::de::Error) -> Self {
        let at = error.span().map(|span| span.start);
        Self::Invalid {
            path: path.map(Path::to_path_buf),
            key: at.and_then(|at| key_at(text, at)),
            line: at
                .and_then(|at| text.get(..at))
                .map(|before| before.matches('\n').count() + 1),
            message: error.to_string().trim_end().to_owned(),
        }
    }
}

fn describe(path: Option<&Path>, key: Option<&str>, message: &str) -> String {
    let mut text = String::from("invalid settings");
    if let Some(path) = path {
        text.push_str(&format!(" in {}", path.display()));
    }
    if let Some(key) = key {
        text.push_str(&format!(", key `{key}`"));
    }
    text.push_str(": ");
    text.push_str(message);
    text
}

/// The dotted key whose name or value holds byte `at` of the TOML `text`.
fn key_at(text: &str, at: usize) -> Option<String> {
    fn find(table: &toml::de::DeTable<'_>, at: usize, path: &mut Vec<String>) -> bool {
        for (key, value) in table.iter() {
            path.push(key.get_ref().to_string());
            if let toml::de::DeValue::Table(inner) = value.get_ref() {
                if find(inner, at, path) {
                    return true;
                }
            }
            if key.span().contains(&at) || value.span().contains(&at) {
                return true;
            }
            path.pop();
        }
        false
    }
    let document = toml::de::DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    find(document.get_ref(), at, &mut path).then(|| path.join("."))
}

/// Reads any configuration from TOML text with the errors of [`Settings::from_toml_str`]:
/// for a configuration of your own that holds [`Settings`] as one of its tables.
///
/// ```
/// use axum_bits::Settings;
///
/// #[derive(serde::Deserialize)]
/// #[serde(deny_unknown_fields)]
/// struct AppConfig {
///     bits: Settings,
/// }
///
/// let error = axum_bits::settings::from_toml_str::<AppConfig>("[bits]\nmax_sessions = \"many\"")
///     .err()
///     .expect("an error");
/// assert_eq!(error.key(), Some("bits.max_sessions"));
/// ```
pub fn from_toml_str<T: DeserializeOwned>(text: &str) -> Result<T, SettingsError> {
    toml::from_str(text).map_err(|error| SettingsError::invalid(text, None, &error))
}

/// Reads any configuration from a TOML file with the errors of [`Settings::from_file`] (and
/// its blocking I/O): for a configuration of your own that holds [`Settings`] as one of its
/// tables.
///
/// ```
/// use axum_bits::Settings;
///
/// #[derive(serde::Deserialize)]
/// struct AppConfig {
///     bits: Settings,
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let tmp = tempfile::tempdir()?;
/// let path = tmp.path().join("app.toml");
/// std::fs::write(&path, "[bits]\nprefix = \"/upload\"\n")?;
/// let config: AppConfig = axum_bits::settings::from_file(&path)?;
/// assert_eq!(config.bits.prefix.as_deref(), Some("/upload"));
/// # Ok(()) }
/// ```
pub fn from_file<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<T, SettingsError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|error| SettingsError::invalid(&text, Some(path), &error))
}

/// Duration units, smallest first, with their length in nanoseconds.
const DURATION_UNITS: [(&str, u128); 7] = [
    ("ns", 1),
    ("us", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 60 * 60 * 1_000_000_000),
    ("d", 24 * 60 * 60 * 1_000_000_000),
];

/// Parses `"30s"`, `"1h30m"`, `"500ms"`, `"14d"`, `"1h 30m"`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = |reason: &str| format!("invalid duration {text:?}: {reason}");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(invalid(
            "it is empty; write a number and a unit, such as \"30s\"",
        ));
    }
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(invalid("expected a number before each unit"));
        }
        let (number, tail) = rest.split_at(digits);
        let number: u128 = number
            .parse()
            .map_err(|_| invalid("the number is too large"))?;
        let tail = tail.trim_start();
        let letters = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(letters);
        let length = match DURATION_UNITS.iter().find(|(name, _)| *name == unit) {
            Some((_, length)) => *length,
            None if unit.is_empty() => {
                return Err(invalid(&format!(
                    "{number} has no unit (ns, us, ms, s, m, h or d)"
                )));
            }
            None => {
                return Err(invalid(&format!(
                    "unknown unit {unit:?} (expected ns, us, ms, s, m, h or d)"
                )));
            }
        };
        nanos = number
            .checked_mul(length)
            .and_then(|part| nanos.checked_add(part))
            .ok_or_else(|| invalid("it is too long"))?;
        rest = tail.trim_start();
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| invalid("it is too long"))?;
    // The remainder is below a second, so it fits.
    let subsec = (nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, subsec))
}

/// Writes a duration the way [`parse_duration`] reads it, largest unit first: `"1h30m"`.
fn format_duration(duration: Duration) -> String {
    let mut nanos = duration.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    let mut text = String::new();
    for (unit, length) in DURATION_UNITS.iter().rev() {
        let count = nanos / length;
        if count > 0 {
            text.push_str(&format!("{count}{unit}"));
            nanos %= length;
        }
    }
    text
}

/// Parses `"16M"`, `"4GiB"`, `"512 KiB"`, `"10MB"`, `"1024"`.
fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = |reason: &str| format!("invalid size {text:?}: {reason}");
    let trimmed = text.trim();
    let digits = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    if digits == 0 {
        return Err(invalid(
            "expected a number of bytes, optionally with a unit, such as \"16MiB\"",
        ));
    }
    let (number, unit) = trimmed.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| invalid("the number is too large"))?;
    let factor: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(invalid(&format!(
                "unknown unit {:?} (expected B, K, M, G, T, KiB, MiB, GiB, TiB, KB, MB, GB or TB)",
                unit.trim_start()
            )));
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| invalid("it is too large"))
}

/// A [`Duration`] as a humane string.
struct Humane(Duration);

impl Serialize for Humane {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Humane {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HumaneVisitor;

        impl Visitor<'_> for HumaneVisitor {
            type Value = Humane;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\", \"1h30m\" or \"14d\"")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Humane, E> {
                parse_duration(text).map(Humane).map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, number: u64) -> Result<Humane, E> {
                Err(E::custom(format!(
                    "invalid duration {number}: it has no unit; write \"{number}s\" for seconds"
                )))
            }

            fn visit_i64<E: de::Error>(self, number: i64) -> Result<Humane, E> {
                Err(E::custom(format!(
                    "invalid duration {number}: expected a string such as \"30s\""
                )))
            }
        }

        deserializer.deserialize_any(HumaneVisitor)
    }
}

/// A byte count, from an integer or a humane string.
struct Bytes(u64);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BytesVisitor;

        impl Visitor<'_> for BytesVisitor {
            type Value = Bytes;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of bytes, or a size such as \"16MiB\" or \"4GiB\"")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Bytes, E> {
                parse_size(text).map(Bytes).map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, number: u64) -> Result<Bytes, E> {
                Ok(Bytes(number))
            }

            fn visit_i64<E: de::Error>(self, number: i64) -> Result<Bytes, E> {
                u64::try_from(number).map(Bytes).map_err(|_| {
                    E::custom(format!("invalid size {number}: it must not be negative"))
                })
            }
        }

        deserializer.deserialize_any(BytesVisitor)
    }
}

/// `serde(with)` for an optional humane [`Duration`].
mod duration {
    use super::*;

    pub(super) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value.map(Humane).serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<Humane>::deserialize(deserializer)?.map(|humane| humane.0))
    }
}

/// `serde(with)` for an optional size in bytes (written back as a plain integer).
mod size {
    use super::*;

    pub(super) fn serialize<S: Serializer>(
        value: &Option<u64>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value.serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<u64>, D::Error> {
        Ok(Option::<Bytes>::deserialize(deserializer)?.map(|bytes| bytes.0))
    }
}

/// `serde(with)` for an optional [`CommitPoint`]: `"last_fragment"` or `"close_session"`.
mod commit_point {
    use super::*;

    #[derive(Deserialize, Serialize)]
    #[serde(rename_all = "snake_case")]
    enum Name {
        LastFragment,
        CloseSession,
    }

    pub(super) fn serialize<S: Serializer>(
        value: &Option<CommitPoint>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value
            .map(|point| match point {
                CommitPoint::LastFragment => Name::LastFragment,
                CommitPoint::CloseSession => Name::CloseSession,
            })
            .serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<CommitPoint>, D::Error> {
        Ok(
            Option::<Name>::deserialize(deserializer)?.map(|name| match name {
                Name::LastFragment => CommitPoint::LastFragment,
                Name::CloseSession => CommitPoint::CloseSession,
            }),
        )
    }
}

/// `serde(with)` for a [`NotificationType`]: `"by_reference"` or `"by_value"`.
mod notification_type {
    use super::*;

    #[derive(Deserialize, Serialize)]
    #[serde(rename_all = "snake_case")]
    enum Name {
        ByReference,
        ByValue,
    }

    pub(super) fn serialize<S: Serializer>(
        value: &NotificationType,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            NotificationType::ByReference => Name::ByReference,
            NotificationType::ByValue => Name::ByValue,
        }
        .serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<NotificationType, D::Error> {
        Ok(match Name::deserialize(deserializer)? {
            Name::ByReference => NotificationType::ByReference,
            Name::ByValue => NotificationType::ByValue,
        })
    }
}

/// `serde(with)` for an optional [`CompletionPolicy`]: `"reject"`, `"retry_later"`,
/// `"defer"`, or `{ defer = { first, max, attempts } }`.
mod completion_policy {
    use super::*;

    const NAMES: &[&str] = &["reject", "retry_later", "defer"];

    /// The retry schedule of `defer`; each key left out keeps [`Backoff::default`]'s.
    #[derive(Default, Deserialize, Serialize)]
    #[serde(default, deny_unknown_fields)]
    struct BackoffSettings {
        #[serde(with = "super::duration")]
        first: Option<Duration>,
        #[serde(with = "super::duration")]
        max: Option<Duration>,
        attempts: Option<u32>,
    }

    impl From<BackoffSettings> for Backoff {
        fn from(settings: BackoffSettings) -> Self {
            let default = Backoff::default();
            Backoff::new(
                settings.first.unwrap_or(default.first),
                settings.max.unwrap_or(default.max),
                settings.attempts.unwrap_or(default.attempts),
            )
        }
    }

    struct Policy(CompletionPolicy);

    impl Serialize for Policy {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            match self.0 {
                CompletionPolicy::Reject => serializer.serialize_str("reject"),
                CompletionPolicy::RetryLater => serializer.serialize_str("retry_later"),
                CompletionPolicy::Defer(backoff) => {
                    let mut map = serializer.serialize_map(Some(1))?;
                    map.serialize_entry(
                        "defer",
                        &BackoffSettings {
                            first: Some(backoff.first),
                            max: Some(backoff.max),
                            attempts: Some(backoff.attempts),
                        },
                    )?;
                    map.end()
                }
            }
        }
    }

    impl<'de> Deserialize<'de> for Policy {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct PolicyVisitor;

            impl<'de> Visitor<'de> for PolicyVisitor {
                type Value = Policy;

                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str(
                        "\"reject\", \"retry_later\", \"defer\" or { defer = { first, max, \
                         attempts } }",
                    )
                }

                fn visit_str<E: de::Error>(self, name: &str) -> Result<Policy, E> {
                    match name {
                        "reject" => Ok(Policy(CompletionPolicy::Reject)),
                        "retry_later" => Ok(Policy(CompletionPolicy::RetryLater)),
                        "defer" => Ok(Policy(CompletionPolicy::Defer(Backoff::default()))),
                        other => Err(E::unknown_variant(other, NAMES)),
                    }
                }

                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Policy, A::Error> {
                    let Some(name) = map.next_key::<String>()? else {
                        return Err(de::Error::custom(
                            "expected { defer = { first, max, attempts } }",
                        ));
                    };
                    if name != "defer" {
                        return Err(de::Error::unknown_variant(&name, &["defer"]));
                    }
                    let backoff: BackoffSettings = map.next_value()?;
                    if map.next_key::<de::IgnoredAny>()?.is_some() {
                        return Err(de::Error::custom(
                            "expected one key, defer: { defer = { first, max, attempts } }",
                        ));
                    }
                    Ok(Policy(CompletionPolicy::Defer(backoff.into())))
                }
            }

            deserializer.deserialize_any(PolicyVisitor)
        }
    }

    pub(super) fn serialize<S: Serializer>(
        value: &Option<CompletionPolicy>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value.map(Policy).serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<CompletionPolicy>, D::Error> {
        Ok(Option::<Policy>::deserialize(deserializer)?.map(|policy| policy.0))
    }
}
