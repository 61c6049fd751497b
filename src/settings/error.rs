//! Reading settings from TOML text or a file, and what goes wrong: errors that name the file,
//! the key and the line.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

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

/// Reads any configuration from TOML text with the errors of [`Settings::from_toml_str`](super::Settings::from_toml_str):
/// for a configuration of your own that holds [`Settings`](super::Settings) as one of its tables.
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

/// Reads any configuration from a TOML file with the errors of [`Settings::from_file`](super::Settings::from_file) (and
/// its blocking I/O): for a configuration of your own that holds [`Settings`](super::Settings) as one of its
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
