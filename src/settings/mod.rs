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
//!   [`Backoff`](crate::completion::Backoff)), or `{ defer = { first = "10s", max = "10m", attempts = 12 } }` (each of
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

mod error;
mod values;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::completion::{CompletionPolicy, Notification, NotificationType};
use crate::config::CommitPoint;
use crate::layer::BitsLayerBuilder;

pub use error::{SettingsError, from_file, from_toml_str};
use values::{commit_point, completion_policy, duration, notification_type, size};

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

#[cfg(test)]
mod tests {
    use super::values::{format_duration, parse_duration, parse_size};
    use super::*;
    use crate::BitsLayer;
    use crate::completion::Backoff;

    fn debug(builder: BitsLayerBuilder) -> String {
        format!("{builder:?}")
    }

    /// Every key, each set to something other than its default.
    const EVERY_KEY: &str = r#"
        root = "elsewhere"
        prefix = "/upload"
        max_upload_size = "4GiB"
        session_timeout = "7d"
        allow_overwrites = true
        host_id = "node1.example.com"
        host_id_fallback_timeout = "1m30s"
        sweep_interval = "10m"
        max_sessions = 10
        max_sessions_per_owner = 3
        max_sessions_per_peer = 4
        reclaim_empty_after = "2m"
        tombstone_retention = "12h"
        max_tombstones = 100
        max_tombstones_per_owner = 5
        abandoned_after = "45s"
        lease_ttl = "20s"
        sync_data = true
        sync_on_commit = false
        max_fragment_size = "8MiB"
        body_idle_timeout = "90s"
        min_body_rate = "2K"
        body_rate_grace = "15s"
        commit_point = "close_session"
        create_directories = true
        public_origin = "http://files.example.com:8080"
        https = true
        replies_dir = "replies"
        completion_policy = { defer = { first = "5s", max = "1m", attempts = 3 } }

        [notification]
        url = "/uploaded"
        type = "by_reference"
        connect_timeout = "5s"
        send_timeout = "1m"
        receive_timeout = "3m"
        max_reply_size = "1MiB"
    "#;

    /// [`EVERY_KEY`] through the setters.
    fn every_key_by_hand() -> BitsLayerBuilder {
        let secs = Duration::from_secs;
        BitsLayer::builder("elsewhere")
            .prefix("/upload")
            .max_upload_size(4 << 30)
            .session_timeout(secs(7 * 86_400))
            .allow_overwrites(true)
            .host_id("node1.example.com")
            .host_id_fallback_timeout(secs(90))
            .sweep_interval(secs(600))
            .max_sessions(10)
            .max_sessions_per_owner(3)
            .max_sessions_per_peer(4)
            .reclaim_empty_after(secs(120))
            .tombstone_retention(secs(12 * 3600))
            .max_tombstones(100)
            .max_tombstones_per_owner(5)
            .abandoned_after(secs(45))
            .lease_ttl(secs(20))
            .sync_data(true)
            .sync_on_commit(false)
            .max_fragment_size(8 << 20)
            .body_idle_timeout(secs(90))
            .min_body_rate(2048)
            .body_rate_grace(secs(15))
            .commit_point(CommitPoint::CloseSession)
            .create_directories(true)
            .public_origin("http://files.example.com:8080")
            .https(true)
            .replies_dir("replies")
            .notification(
                Notification::by_reference("/uploaded")
                    .connect_timeout(secs(5))
                    .send_timeout(secs(60))
                    .receive_timeout(secs(180))
                    .max_reply_size(1 << 20),
            )
            .completion_policy(CompletionPolicy::Defer(Backoff::new(secs(5), secs(60), 3)))
    }

    /// The settings' fields as JSON: `null` for those not set.
    fn fields(settings: &Settings) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(settings).unwrap() {
            serde_json::Value::Object(fields) => fields,
            other => panic!("settings serialized as {other}"),
        }
    }

    #[test]
    fn no_settings_leave_the_builders_defaults() {
        let bare = debug(BitsLayer::builder("uploads"));
        assert_eq!(
            debug(Settings::default().apply(BitsLayer::builder("uploads"))),
            bare
        );
        let empty = Settings::from_toml_str("# nothing set\n").unwrap();
        assert_eq!(empty, Settings::default());
        assert_eq!(debug(empty.apply(BitsLayer::builder("uploads"))), bare);

        // The same validated configuration, too.
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let bare = BitsLayer::builder(a.path()).build().unwrap();
        let applied = Settings::default()
            .apply(BitsLayer::builder(b.path()))
            .build()
            .unwrap();
        assert_eq!(format!("{applied:?}"), format!("{bare:?}"));
    }

    #[test]
    fn every_key_calls_its_setter() {
        let settings = Settings::from_toml_str(EVERY_KEY).unwrap();
        // EVERY_KEY misses no field.
        for (key, value) in fields(&settings) {
            assert!(!value.is_null(), "EVERY_KEY does not set {key}");
        }
        assert_eq!(
            debug(settings.apply(BitsLayer::builder("unused"))),
            debug(every_key_by_hand())
        );
    }

    #[test]
    fn each_key_alone_changes_the_builder() {
        let every = Settings::from_toml_str(EVERY_KEY).unwrap();
        let default = debug(BitsLayer::builder("unused"));
        for (key, value) in fields(&every) {
            let mut one = serde_json::Map::new();
            one.insert(key.clone(), value);
            let one: Settings = serde_json::from_value(one.into()).unwrap();
            assert_ne!(
                debug(one.apply(BitsLayer::builder("unused"))),
                default,
                "{key} alone changed nothing"
            );
        }
    }

    #[test]
    fn applied_settings_build_a_layer_with_them() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("from-the-file");
        let text = format!(
            "root = {:?}\nmax_upload_size = \"1MiB\"\nsession_timeout = \"1h30m\"\n",
            root.display().to_string()
        );
        let layer = Settings::from_toml_str(&text)
            .unwrap()
            .apply(BitsLayer::builder(tmp.path().join("not-this-one")))
            .build()
            .unwrap();
        let shown = format!("{layer:?}");
        assert!(shown.contains("max_upload_size: 1048576"), "{shown}");
        assert!(shown.contains("session_timeout: 5400s"), "{shown}");
        // The root from the file is the one used.
        assert!(root.join(".bits").is_dir());
        assert!(!tmp.path().join("not-this-one").exists());
    }

    #[test]
    fn settings_serialize_to_what_they_read() {
        let settings = Settings::from_toml_str(EVERY_KEY).unwrap();
        let json = serde_json::to_value(&settings).unwrap();
        assert_eq!(json["session_timeout"], "7d");
        assert_eq!(json["host_id_fallback_timeout"], "1m30s");
        assert_eq!(json["max_upload_size"], 4u64 << 30);
        assert_eq!(json["commit_point"], "close_session");
        assert_eq!(json["notification"]["type"], "by_reference");
        assert_eq!(json["completion_policy"]["defer"]["attempts"], 3);
        assert_eq!(serde_json::from_value::<Settings>(json).unwrap(), settings);
        for policy in ["reject", "retry_later"] {
            let settings =
                Settings::from_toml_str(&format!("completion_policy = {policy:?}")).unwrap();
            let json = serde_json::to_value(&settings).unwrap();
            assert_eq!(json["completion_policy"], policy);
        }
    }

    #[test]
    fn durations_are_humane() {
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        for (text, expected) in [
            ("30s", secs(30)),
            ("500ms", ms(500)),
            ("14d", secs(14 * 86_400)),
            ("1h30m", secs(5_400)),
            ("1h 30m", secs(5_400)),
            (" 2m ", secs(120)),
            ("1s500ms", ms(1_500)),
            ("90m", secs(5_400)),
            ("0s", Duration::ZERO),
            ("7us", Duration::from_micros(7)),
            ("3ns", Duration::from_nanos(3)),
        ] {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
        for (duration, text) in [
            (secs(5_400), "1h30m"),
            (secs(14 * 86_400), "14d"),
            (ms(1_500), "1s500ms"),
            (Duration::ZERO, "0s"),
            (Duration::new(90_061, 1), "1d1h1m1s1ns"),
        ] {
            assert_eq!(format_duration(duration), text);
            assert_eq!(parse_duration(text), Ok(duration), "{text}");
        }
        let settings = Settings::from_toml_str(
            "session_timeout = \"14d\"\nbody_idle_timeout = \"500ms\"\nlease_ttl = \"1h30m\"",
        )
        .unwrap();
        assert_eq!(settings.session_timeout, Some(secs(14 * 86_400)));
        assert_eq!(settings.body_idle_timeout, Some(ms(500)));
        assert_eq!(settings.lease_ttl, Some(secs(5_400)));
    }

    #[test]
    fn sizes_are_humane() {
        for (text, expected) in [
            ("1024", 1024),
            ("16M", 16 << 20),
            ("4GiB", 4 << 30),
            ("4gib", 4 << 30),
            ("512 KiB", 512 << 10),
            ("2T", 2 << 40),
            ("10MB", 10_000_000),
            ("3kb", 3_000),
            ("7B", 7),
        ] {
            assert_eq!(parse_size(text), Ok(expected), "{text}");
        }
        let settings = Settings::from_toml_str(
            "max_upload_size = 1_000_000\nmax_fragment_size = \"16M\"\nmin_body_rate = \"1KiB\"",
        )
        .unwrap();
        assert_eq!(settings.max_upload_size, Some(1_000_000));
        assert_eq!(settings.max_fragment_size, Some(16 << 20));
        assert_eq!(settings.min_body_rate, Some(1024));
    }

    /// The error for `text`, asserting that it names `key`, is on `line` and says `reason`.
    fn assert_invalid(text: &str, key: &str, line: usize, reason: &str) {
        let error = Settings::from_toml_str(text).expect_err(text);
        let shown = error.to_string();
        match &error {
            SettingsError::Invalid {
                key: Some(found),
                line: Some(on),
                message,
                path: None,
            } => {
                assert_eq!(found, key, "{shown}");
                assert_eq!(*on, line, "{shown}");
                assert!(message.contains(&format!("line {line}")), "{shown}");
            }
            other => panic!("{text}: {other:?}"),
        }
        assert!(shown.contains(&format!("key `{key}`")), "{shown}");
        assert!(shown.contains(reason), "{text}: {shown}");
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        assert_invalid(
            "prefix = \"/u\"\nmax_upload_sise = 10\n",
            "max_upload_sise",
            2,
            "unknown field `max_upload_sise`",
        );
        assert_invalid(
            "[notification]\nurl = \"http://127.0.0.1:9/\"\ntype = \"by_value\"\ntimeout = \"1s\"",
            "notification.timeout",
            4,
            "unknown field `timeout`",
        );
        assert_invalid(
            "\n\ncompletion_policy = { defer = { tries = 3 } }",
            "completion_policy.defer.tries",
            3,
            "unknown field `tries`",
        );
        assert_invalid("[bits]\nprefix = \"/\"", "bits", 1, "unknown field `bits`");
    }

    #[test]
    fn invalid_values_name_their_key() {
        for (text, key, reason) in [
            (
                "session_timeout = \"30x\"",
                "session_timeout",
                "unknown unit \"x\"",
            ),
            ("session_timeout = 30", "session_timeout", "write \"30s\""),
            ("lease_ttl = \"\"", "lease_ttl", "it is empty"),
            ("lease_ttl = \"s\"", "lease_ttl", "expected a number"),
            ("lease_ttl = \"10\"", "lease_ttl", "10 has no unit"),
            (
                "sweep_interval = \"99999999999999999999d\"",
                "sweep_interval",
                "too",
            ),
            (
                "max_upload_size = \"4 parsecs\"",
                "max_upload_size",
                "unknown unit \"parsecs\"",
            ),
            (
                "max_upload_size = -1",
                "max_upload_size",
                "must not be negative",
            ),
            (
                "max_upload_size = \"99999999T\"",
                "max_upload_size",
                "too large",
            ),
            ("max_upload_size = 1.5", "max_upload_size", "invalid type"),
            ("max_sessions = \"many\"", "max_sessions", "expected usize"),
            (
                "allow_overwrites = \"yes\"",
                "allow_overwrites",
                "expected a boolean",
            ),
            (
                "commit_point = \"close\"",
                "commit_point",
                "unknown variant `close`",
            ),
            (
                "completion_policy = \"maybe\"",
                "completion_policy",
                "unknown variant `maybe`",
            ),
            (
                "completion_policy = { later = {} }",
                "completion_policy",
                "unknown variant `later`",
            ),
            (
                "[notification]\nurl = \"http://127.0.0.1:9/\"\ntype = \"by_carrier\"",
                "notification.type",
                "unknown variant `by_carrier`",
            ),
        ] {
            let line = text.lines().count();
            assert_invalid(text, key, line, reason);
        }
        // A missing key names its table.
        let error = Settings::from_toml_str("[notification]\ntype = \"by_value\"").unwrap_err();
        assert_eq!(error.key(), Some("notification"), "{error}");
        assert!(error.to_string().contains("missing field `url`"), "{error}");
        // Not TOML at all: the line still is.
        let error = Settings::from_toml_str("prefix = \"/\"\nmax_sessions =").unwrap_err();
        assert!(
            matches!(error, SettingsError::Invalid { line: Some(2), .. }),
            "{error:?}"
        );
    }

    #[test]
    fn values_are_checked_when_the_layer_is_built() {
        let settings = Settings::from_toml_str("max_fragment_size = \"1K\"").unwrap();
        let error = settings
            .apply(BitsLayer::builder("unused"))
            .build()
            .map(drop)
            .unwrap_err();
        assert!(
            matches!(error, crate::ConfigError::FragmentLimitTooSmall(1024)),
            "{error:?}"
        );
    }

    #[test]
    fn file_errors_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("missing.toml");
        let error = Settings::from_file(&missing).unwrap_err();
        assert!(matches!(error, SettingsError::Read { .. }), "{error:?}");
        assert!(error.to_string().contains("missing.toml"), "{error}");

        let path = tmp.path().join("bits.toml");
        std::fs::write(&path, "max_sessions = 10\nsession_timeout = \"1y\"\n").unwrap();
        let error = Settings::from_file(&path).unwrap_err();
        let shown = error.to_string();
        assert!(shown.contains("bits.toml"), "{shown}");
        assert!(shown.contains("key `session_timeout`"), "{shown}");
        assert!(shown.contains("line 2"), "{shown}");

        std::fs::write(&path, "max_sessions = 10\n").unwrap();
        assert_eq!(Settings::from_file(&path).unwrap().max_sessions, Some(10));
    }

    /// The example server's `--config` file, as the example reads it.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ExampleFile {
        server: ExampleServer,
        bits: Settings,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ExampleServer {
        listen: std::net::SocketAddr,
        store: String,
        staging: String,
        s3_endpoint: Option<String>,
    }

    #[test]
    fn the_example_configuration_reads_and_states_the_defaults() {
        let file: ExampleFile = from_toml_str(include_str!("../../examples/server.toml")).unwrap();
        assert_eq!(file.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(file.server.store, "file");
        assert_eq!(file.server.staging, "local");
        assert_eq!(file.server.s3_endpoint, None);
        let mut bits = file.bits;
        assert_eq!(bits.root.as_deref(), Some(Path::new("./uploads")));
        assert_eq!(bits.max_upload_size.take(), Some(4 << 30));
        // Every other value it sets is the builder's default, as its comments say.
        assert_eq!(
            debug(bits.apply(BitsLayer::builder("unused"))),
            debug(BitsLayer::builder("./uploads"))
        );
    }
}
