//! URL path → destination under the upload root. Pure: no filesystem access.
//!
//! The path is percent-decoded exactly once and split on `/`; every component must be a plain
//! file name. Malformed escapes (`%`, `%zz`), `..`, `.`, backslashes, NUL and control
//! characters, `:` (drive prefixes and NTFS streams), Windows device names and the server's
//! own reserved folders are refused, so no request can name anything outside the root.
//!
//! A reserved name is refused in every spelling a filesystem might take for it: any case
//! (Unicode full case folding, so `.bit\u{17F}` with a long s is `.bits`), any compatibility
//! form (fullwidth `．ｂｉｔｓ`), with or without combining marks and with invisible
//! characters (U+200B, U+00AD, U+FEFF) inserted.

use std::path::{Path, PathBuf};

use caseless::Caseless;
use http::StatusCode;
use percent_encoding::percent_decode_str;
use unicode_normalization::{UnicodeNormalization, char::is_combining_mark};

use crate::protocol::{Ack, Hresult};

/// A validated destination: one or more plain components, relative to the upload root.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination(String);

impl Destination {
    /// The destination as a `/`-separated relative path, e.g. `inbox/report.bin`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The destination's path under `root`.
    pub fn under(&self, root: &Path) -> PathBuf {
        let mut path = root.to_path_buf();
        path.extend(self.0.split('/'));
        path
    }

    /// Re-validates a destination read back from a store.
    pub fn from_stored(s: &str, reserved: &[String]) -> Result<Self, DestinationError> {
        let mut out = String::with_capacity(s.len());
        for component in s.split('/') {
            push_component(&mut out, component, reserved)?;
        }
        Ok(Self(out))
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a URL cannot be an upload destination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DestinationError {
    /// The URL is not below the layer's prefix.
    #[error("the URL is outside the upload prefix")]
    OutsidePrefix,
    /// The URL names the upload root itself, which is a directory.
    #[error("the URL names a directory")]
    Directory,
    /// A component is not a plain file name.
    #[error("invalid path: {0}")]
    Invalid(&'static str),
    /// The URL names a folder the server keeps for itself (staging, session records).
    #[error("the path is reserved for the server")]
    Reserved,
}

impl DestinationError {
    /// The Ack for this error: 403 `E_ACCESSDENIED` for reserved folders, 400 `E_INVALIDARG`
    /// otherwise.
    pub fn ack(&self) -> Ack {
        match self {
            Self::Reserved => Ack::error(StatusCode::FORBIDDEN, Hresult::E_ACCESSDENIED),
            _ => Ack::error(StatusCode::BAD_REQUEST, Hresult::E_INVALIDARG),
        }
    }
}

/// Longest destination path accepted, in bytes: well inside what filesystems take (Linux
/// allows 4,096 for a whole path, 255 per name), so that a destination accepted at
/// Create-Session can be created at the commit.
pub const MAX_DESTINATION_LEN: usize = 1024;

/// Maps a request path (no query) below `prefix` to a destination.
///
/// `prefix` is `/` or a path like `/upload` (no trailing slash needed). `reserved` lists
/// component names that requests may not use at any depth (the staging folder and reply URLs,
/// e.g. `.bits`), compared in any case and Unicode form, because the destination may live on
/// a filesystem that ignores case or normalization.
///
/// Every `%` must start an escape of two hex digits: `/%zz`, `/a%2` or a lone `%` are invalid,
/// not literal names. An encoded slash (`%2F`) separates components like `/` does, and each
/// side is checked on its own; an encoded backslash (`%5C`) is refused like a raw one.
pub fn from_url_path(
    path: &str,
    prefix: &str,
    reserved: &[String],
) -> Result<Destination, DestinationError> {
    let rest = strip_prefix(path, prefix).ok_or(DestinationError::OutsidePrefix)?;
    if !escapes_are_valid(rest) {
        return Err(DestinationError::Invalid(
            "`%` must be followed by two hex digits",
        ));
    }
    let decoded = percent_decode_str(rest)
        .decode_utf8()
        .map_err(|_| DestinationError::Invalid("not UTF-8 after percent-decoding"))?;
    let mut out = String::with_capacity(decoded.len());
    // Empty components (`a//b`, a trailing `/`) carry no name; a path of only those is the
    // root directory.
    for component in decoded.split('/').filter(|c| !c.is_empty()) {
        push_component(&mut out, component, reserved)?;
    }
    if out.is_empty() {
        return Err(DestinationError::Directory);
    }
    if out.len() > MAX_DESTINATION_LEN {
        return Err(DestinationError::Invalid(
            "the destination path is longer than 1,024 bytes",
        ));
    }
    if decoded.ends_with('/') {
        return Err(DestinationError::Directory);
    }
    Ok(Destination(out))
}

/// Whether `path` lies at or below `prefix`, and the remainder if so.
pub(crate) fn strip_prefix<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// Whether every `%` in `s` starts a `%XX` escape.
fn escapes_are_valid(s: &str) -> bool {
    s.split('%').skip(1).all(|after| {
        after
            .as_bytes()
            .get(..2)
            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    })
}

/// A name's comparison key for reserved names: what is left of it after every equivalence a
/// filesystem might apply, and a few more, so that whatever a filesystem could take for a
/// reserved name has that name's key.
///
/// Compatibility caseless matching (Unicode 3.13, D146: NFD, full case folding, NFKD, full
/// case folding, NFKD), then without default-ignorable code points (zero-width characters, the
/// soft hyphen, the byte-order mark, variation selectors: HFS+ and some tools ignore them) and
/// without combining marks, and with the dotless `ı` read as `i`. Dropping the marks is
/// stricter than any filesystem, but it is the simple way to make the dotted `İ` (which folds
/// to `i` + U+0307) an `i`; it only means that a name such as `.bïts` is reserved too.
fn fold(name: &str) -> String {
    name.chars()
        .filter(|&c| !is_default_ignorable(c))
        .nfd()
        .default_case_fold()
        .nfkd()
        .default_case_fold()
        .nfkd()
        .filter(|&c| !is_default_ignorable(c) && !is_combining_mark(c))
        .map(|c| if c == '\u{131}' { 'i' } else { c })
        .collect()
}

/// Unicode's `Default_Ignorable_Code_Point` (DerivedCoreProperties.txt; the set is stable:
/// its unassigned ranges are included in advance).
fn is_default_ignorable(c: char) -> bool {
    matches!(
        c,
        '\u{AD}'
            | '\u{34F}'
            | '\u{61C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

fn push_component(
    out: &mut String,
    component: &str,
    reserved: &[String],
) -> Result<(), DestinationError> {
    check_component(component)?;
    if !reserved.is_empty() {
        let key = fold(component);
        if reserved.iter().any(|r| fold(r) == key) {
            return Err(DestinationError::Reserved);
        }
    }
    if !out.is_empty() {
        out.push('/');
    }
    out.push_str(component);
    Ok(())
}

fn check_component(c: &str) -> Result<(), DestinationError> {
    use DestinationError::Invalid;
    if c.is_empty() {
        return Err(Invalid("empty path component"));
    }
    if c == "." || c == ".." {
        return Err(Invalid("`.` and `..` are not allowed"));
    }
    if c.len() > 255 {
        return Err(Invalid("a path component is longer than 255 bytes"));
    }
    if c.chars().any(|ch| ch.is_control()) {
        return Err(Invalid("control characters are not allowed"));
    }
    if c.contains(['\\', ':', '*', '?', '"', '<', '>', '|']) {
        return Err(Invalid("characters that are invalid in Windows file names"));
    }
    if c.ends_with(['.', ' ']) {
        return Err(Invalid("a name may not end with a dot or a space"));
    }
    let stem = c.split('.').next().unwrap_or(c).trim_end();
    let device = |name: &str| stem.eq_ignore_ascii_case(name);
    // Bytes, not str slices: a name may be any UTF-8, and slicing it at a byte index could
    // fall inside a character.
    // `COM1`..`COM9`, `COM0`, and the superscripts `COM¹` `COM²` `COM³`, which Windows counts
    // as digits too.
    let numbered = |base: &str| {
        let Some(number) = stem
            .get(..base.len())
            .filter(|b| b.eq_ignore_ascii_case(base))
            .and_then(|_| stem.get(base.len()..))
        else {
            return false;
        };
        let mut chars = number.chars();
        matches!(
            (chars.next(), chars.next()),
            (Some('0'..='9' | '¹' | '²' | '³'), None)
        )
    };
    if ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
        .iter()
        .any(|d| device(d))
        || numbered("COM")
        || numbered("LPT")
    {
        return Err(Invalid("Windows device names are not allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reserved() -> Vec<String> {
        vec![".bits".into()]
    }

    fn map(path: &str) -> Result<String, DestinationError> {
        from_url_path(path, "/", &reserved()).map(|d| d.0)
    }

    #[test]
    fn plain_paths() {
        assert_eq!(map("/report.bin").unwrap(), "report.bin");
        assert_eq!(map("/inbox/report.bin").unwrap(), "inbox/report.bin");
        assert_eq!(map("/a//b.bin").unwrap(), "a/b.bin");
        assert_eq!(map("/my%20file.bin").unwrap(), "my file.bin");
        assert_eq!(map("/caf%C3%A9.txt").unwrap(), "café.txt");
        assert_eq!(map("/.hidden").unwrap(), ".hidden");
        assert_eq!(map("/a.b.c").unwrap(), "a.b.c");
        assert_eq!(map("/console.txt").unwrap(), "console.txt");
        assert_eq!(map("/com10").unwrap(), "com10");
        // Found by the fuzzer: a 4-byte name whose last character is 2 bytes long.
        assert_eq!(map("/in\u{45A}").unwrap(), "in\u{45A}");
        assert_eq!(map("/CO\u{45A}").unwrap(), "CO\u{45A}");
        assert_eq!(
            map("/\u{45A}\u{45A}\u{45A}").unwrap(),
            "\u{45A}\u{45A}\u{45A}"
        );
    }

    #[test]
    fn decodes_exactly_once() {
        // %252e%252e decodes once to %2e%2e, a harmless literal name.
        assert_eq!(map("/%252e%252e/x").unwrap(), "%2e%2e/x");
    }

    #[test]
    fn traversal_and_bad_names() {
        for path in [
            "/../etc/passwd",
            "/a/../../b",
            "/%2e%2e/x",
            "/%2E%2E%2Fetc%2Fpasswd",
            "/a/%2e/b",
            "/a\\b",
            "/a%5c..%5cb",
            "/x%00.bin",
            "/C:/windows",
            "/c%3a%5cwindows",
            "/file.txt:stream",
            "/a%0ab",
            "/trailing.",
            "/trailing%20",
            "/CON",
            "/con.txt",
            "/Lpt1.log",
            "/nul",
            "/COM9",
            "/com%C2%B9",
            "/LPT%C2%B3.log",
            "/%ff%fe",
            "/what?",
        ] {
            assert!(
                matches!(map(path), Err(DestinationError::Invalid(_))),
                "{path} -> {:?}",
                map(path)
            );
        }
        let long = format!("/{}", "a".repeat(256));
        assert!(map(&long).is_err());
        assert!(map(&format!("/{}", "a".repeat(255))).is_ok());
        // Names that only look like devices are fine.
        for ok in [
            "/COM10",
            "/COMX",
            "/com",
            "/LPT1x",
            "/COM%C2%B9%C2%B9",
            "/CONSOLE",
        ] {
            assert!(map(ok).is_ok(), "{ok}");
        }
        let deep = "/".to_owned() + &vec!["d".repeat(200); 5].join("/");
        assert!(map(&deep).is_ok());
        let too_deep = "/".to_owned() + &vec!["d".repeat(200); 6].join("/");
        assert!(matches!(map(&too_deep), Err(DestinationError::Invalid(_))));
    }

    #[test]
    fn directories() {
        assert_eq!(map("/"), Err(DestinationError::Directory));
        assert_eq!(map(""), Err(DestinationError::Directory));
        assert_eq!(map("//"), Err(DestinationError::Directory));
        assert_eq!(map("/inbox/"), Err(DestinationError::Directory));
    }

    #[test]
    fn reserved_folder() {
        assert_eq!(map("/.bits/parts/x"), Err(DestinationError::Reserved));
        assert_eq!(map("/.BITS/x"), Err(DestinationError::Reserved));
        assert_eq!(map("/%2ebits/x"), Err(DestinationError::Reserved));
        assert_eq!(map("/.bits"), Err(DestinationError::Reserved));
        // Reserved at every depth: reply URLs live at `<folder>/.bits/replies/...`.
        assert_eq!(map("/x/.bits"), Err(DestinationError::Reserved));
        assert_eq!(map("/x/.Bits/replies/r"), Err(DestinationError::Reserved));
        assert_eq!(map("/.bitsy").unwrap(), ".bitsy");
    }

    #[test]
    fn reserved_folder_in_any_unicode_spelling() {
        for path in [
            // U+017F LATIN SMALL LETTER LONG S folds to `s`.
            "/.bit%C5%BF/x",
            "/.bit\u{17F}",
            // U+212A KELVIN SIGN is `K`: a reserved `.kit` would catch it (below).
            // Fullwidth letters and full stop.
            "/.\u{FF42}\u{FF49}\u{FF54}\u{FF53}",
            "/\u{FF0E}bits",
            "/\u{FF0E}\u{FF22}\u{FF29}\u{FF34}\u{FF33}/x",
            // Dotted capital I (folds to i + U+0307) and dotless i.
            "/.B\u{130}TS",
            "/.b\u{131}ts",
            // Decomposed: i + combining dot above, s + combining dot below.
            "/.bi\u{307}ts",
            "/.bit\u{1E63}",
            "/.bits\u{323}",
            // Default-ignorable characters some filesystems drop.
            "/.b\u{200B}its",
            "/.bi\u{AD}ts",
            "/\u{FEFF}.bits",
            "/.bits\u{200D}",
            "/.bi\u{34F}ts",
            "/.bits\u{FE0F}",
            "/.bi%E2%80%8Bts/x",
            // Mathematical and circled letters are compatibility forms of plain ones.
            "/.\u{1D41B}its",
            "/.\u{24D1}its",
            // At any depth.
            "/x/.bit\u{17F}/replies/r",
            "/x/y/.\u{FF42}its",
        ] {
            assert_eq!(map(path), Err(DestinationError::Reserved), "{path}");
        }
        let kit = vec![".kit".to_owned()];
        assert_eq!(
            from_url_path("/.\u{212A}it", "/", &kit),
            Err(DestinationError::Reserved)
        );
        assert_eq!(
            Destination::from_stored("a/.bit\u{17F}/x", &reserved()),
            Err(DestinationError::Reserved)
        );
        assert_eq!(
            Destination::from_stored(".\u{FF42}its", &reserved()),
            Err(DestinationError::Reserved)
        );
        // `ß` folds to `ss`: a reserved `.bitss` is reserved as `.bitß` too.
        let ss = vec![".bitss".to_owned()];
        assert_eq!(
            from_url_path("/.bit\u{DF}", "/", &ss),
            Err(DestinationError::Reserved)
        );
    }

    #[test]
    fn plain_unicode_names_are_not_reserved() {
        for (path, name) in [
            ("/rapport-%C3%A9t%C3%A9.bin", "rapport-\u{E9}t\u{E9}.bin"),
            (
                "/rapport-e\u{301}te\u{301}.bin",
                "rapport-e\u{301}te\u{301}.bin",
            ),
            ("/%E6%8A%A5%E5%91%8A.bin", "\u{62A5}\u{544A}.bin"),
            ("/Stra\u{DF}e.txt", "Stra\u{DF}e.txt"),
            (
                "/\u{FF42}\u{FF49}\u{FF54}\u{FF53}",
                "\u{FF42}\u{FF49}\u{FF54}\u{FF53}",
            ),
            ("/.bit", ".bit"),
            ("/.bitz", ".bitz"),
            ("/bits", "bits"),
            ("/.b\u{131}t", ".b\u{131}t"),
            ("/a\u{200D}b", "a\u{200D}b"),
            ("/.bits.d/x", ".bits.d/x"),
        ] {
            assert_eq!(map(path).as_deref(), Ok(name), "{path}");
        }
    }

    #[test]
    fn folding() {
        assert_eq!(fold(".BITS"), ".bits");
        assert_eq!(fold(".bit\u{17F}"), ".bits");
        assert_eq!(fold("\u{FF0E}\u{FF22}\u{FF29}\u{FF34}\u{FF33}"), ".bits");
        assert_eq!(fold("\u{130}\u{131}I"), "iii");
        assert_eq!(fold("\u{212A}"), "k");
        assert_eq!(fold("a\u{200B}\u{AD}\u{FEFF}\u{E0041}b"), "ab");
        assert_eq!(fold("Stra\u{DF}e"), "strasse");
        assert_eq!(fold("\u{E9}t\u{E9}"), "ete");
        assert_eq!(fold("\u{62A5}\u{544A}"), "\u{62A5}\u{544A}");
    }

    #[test]
    fn invalid_percent_escapes() {
        for path in [
            "/%",
            "/%zz",
            "/a%2",
            "/%g0",
            "/%0g",
            "/x%",
            "/%%41",
            "/a/%/b",
            "/ok%41/%z1",
            "/%-1",
            "/% 20",
        ] {
            assert_eq!(
                map(path),
                Err(DestinationError::Invalid(
                    "`%` must be followed by two hex digits"
                )),
                "{path}"
            );
        }
        assert_eq!(map("/%41%62%2e%2Ec").unwrap(), "Ab..c");
        assert_eq!(map("/100%25.txt").unwrap(), "100%.txt");
        // An encoded slash separates components, each checked on its own.
        assert_eq!(map("/a%2Fb.bin").unwrap(), "a/b.bin");
        assert_eq!(map("/a%2fb.bin").unwrap(), "a/b.bin");
        assert!(matches!(
            map("/a%2F..%2Fb"),
            Err(DestinationError::Invalid(_))
        ));
        assert_eq!(map("/x%2F.bits/y"), Err(DestinationError::Reserved));
        assert!(matches!(map("/a%5Cb"), Err(DestinationError::Invalid(_))));
        // The prefix is matched before decoding: an encoded slash does not end it.
        assert_eq!(
            from_url_path("/upload%2Fa.bin", "/upload", &reserved()),
            Err(DestinationError::OutsidePrefix)
        );
    }

    #[test]
    fn prefixes() {
        let r = reserved();
        assert_eq!(
            from_url_path("/upload/a.bin", "/upload", &r).unwrap().0,
            "a.bin"
        );
        assert_eq!(
            from_url_path("/upload/a.bin", "/upload/", &r).unwrap().0,
            "a.bin"
        );
        assert_eq!(
            from_url_path("/uploads/a.bin", "/upload", &r),
            Err(DestinationError::OutsidePrefix)
        );
        assert_eq!(
            from_url_path("/upload", "/upload", &r),
            Err(DestinationError::Directory)
        );
        assert_eq!(strip_prefix("/a/b", "/"), Some("/a/b"));
        assert_eq!(strip_prefix("/ab", "/a"), None);
    }

    #[test]
    fn under_root() {
        let d = map("/a/b.bin").unwrap();
        let d = Destination(d);
        assert_eq!(d.under(Path::new("/srv")), PathBuf::from("/srv/a/b.bin"));
        assert_eq!(Destination::from_stored("a/b.bin", &reserved()), Ok(d));
        assert!(Destination::from_stored("../x", &reserved()).is_err());
        assert!(Destination::from_stored(".bits/x", &reserved()).is_err());
    }

    #[test]
    fn acks() {
        assert_eq!(
            DestinationError::Reserved.ack().status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            DestinationError::Invalid("x").ack().status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            DestinationError::Directory.ack().status(),
            StatusCode::BAD_REQUEST
        );
    }
}
