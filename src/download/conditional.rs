//! Conditional and range request handling for serving a stored reply file.
//!
//! This module is pure: it only looks at request headers and metadata of the
//! representation (length, entity tag, modification time) and decides what to
//! send, following RFC 9110 sections 13 (conditional requests) and 14 (range
//! requests). Reading the bytes is left to the caller, see [`Selection::span`].
//!
//! Deliberate simplifications, all allowed by RFC 9110:
//! - only a single range is ever served; a request for several ranges gets the
//!   full representation (a server MAY ignore the Range header field);
//! - a header field that cannot be parsed is ignored, which always results in
//!   sending more (never less) than asked for.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{
    ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, HeaderName,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, LAST_MODIFIED, RANGE,
};
use http::{HeaderMap, Response, StatusCode};

/// Largest number of seconds since the Unix epoch that `httpdate` can format
/// (9999-12-31T23:59:59Z); later times would make it panic.
const MAX_HTTP_DATE_SECS: u64 = 253_402_300_799;

/// What part of a representation of `len` bytes to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Selection {
    /// The whole representation, `200 OK`.
    Full,
    /// One byte range, `206 Partial Content`.
    Partial {
        /// Offset of the first byte to send.
        start: u64,
        /// Offset of the last byte to send (inclusive).
        end: u64,
    },
    /// A single valid range lying entirely outside the representation,
    /// `416 Range Not Satisfiable`.
    Unsatisfiable,
    /// The client's cached copy is current, `304 Not Modified`.
    NotModified,
}

impl Selection {
    /// Returns the byte span `(offset, count)` of the representation to send
    /// as the body, or `None` when no body is sent.
    ///
    /// A `Partial` selection that does not lie within `len` bytes (which
    /// [`select`] never produces) also yields `None`.
    pub(crate) fn span(&self, len: u64) -> Option<(u64, u64)> {
        match *self {
            Selection::Full => Some((0, len)),
            Selection::Partial { start, end } if start <= end && end < len => {
                Some((start, end - start + 1))
            }
            Selection::Partial { .. } | Selection::Unsatisfiable | Selection::NotModified => None,
        }
    }
}

/// Decides from the request headers (Range, If-Range, If-None-Match,
/// If-Modified-Since) what to send for a GET or HEAD request.
///
/// `etag` is the representation's entity tag including its quotes, e.g.
/// `"abc"`; `last_modified` is its modification time (sub-second precision is
/// ignored, as HTTP dates have whole seconds).
pub(crate) fn select(
    headers: &HeaderMap,
    len: u64,
    etag: &str,
    last_modified: SystemTime,
) -> Selection {
    if is_not_modified(headers, etag, last_modified) {
        return Selection::NotModified;
    }
    let Some(range) = single_value(headers, &RANGE) else {
        return Selection::Full;
    };
    if headers.contains_key(IF_RANGE) && !if_range_matches(headers, etag, last_modified) {
        return Selection::Full;
    }
    match parse_range(range) {
        Some(range) => range.resolve(len),
        None => Selection::Full,
    }
}

/// Builds the status and headers (no body) of the response for `selection`.
///
/// Every response carries `Accept-Ranges`, `ETag`, `Last-Modified` and
/// `Cache-Control`; all but `304` also carry `Content-Type` and
/// `Content-Length`, and `206`/`416` carry `Content-Range`. A `Partial`
/// selection that does not lie within `len` bytes is answered as
/// [`Selection::Unsatisfiable`].
///
/// An `etag` that is not a valid header value surfaces as an error when the
/// builder is finished.
pub(crate) fn response_head(
    selection: Selection,
    len: u64,
    etag: &str,
    last_modified: SystemTime,
) -> http::response::Builder {
    let builder = Response::builder()
        .header(ACCEPT_RANGES, "bytes")
        .header(ETAG, etag)
        .header(
            LAST_MODIFIED,
            httpdate::fmt_http_date(whole_seconds(last_modified)),
        )
        .header(CACHE_CONTROL, "private");
    match selection {
        Selection::NotModified => builder.status(StatusCode::NOT_MODIFIED),
        Selection::Full => builder
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, len),
        Selection::Partial { start, end } => match selection.span(len) {
            Some((_, count)) => builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, count)
                .header(CONTENT_RANGE, format!("bytes {start}-{end}/{len}")),
            None => unsatisfiable(builder, len),
        },
        Selection::Unsatisfiable => unsatisfiable(builder, len),
    }
}

/// Adds the status and headers of a `416 Range Not Satisfiable` response.
fn unsatisfiable(builder: http::response::Builder, len: u64) -> http::response::Builder {
    builder
        .status(StatusCode::RANGE_NOT_SATISFIABLE)
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_LENGTH, 0_u64)
        .header(CONTENT_RANGE, format!("bytes */{len}"))
}

/// Evaluates If-None-Match, or If-Modified-Since when If-None-Match is absent
/// (RFC 9110 section 13.2.2), returning `true` when a `304` should be sent.
fn is_not_modified(headers: &HeaderMap, etag: &str, last_modified: SystemTime) -> bool {
    if headers.contains_key(IF_NONE_MATCH) {
        return if_none_match_matches(headers, etag);
    }
    let Some(since) = single_value(headers, &IF_MODIFIED_SINCE)
        .and_then(|value| httpdate::parse_http_date(trim_ows(value)).ok())
    else {
        return false;
    };
    whole_seconds(last_modified) <= since
}

/// Returns `true` when any If-None-Match field line is `*` or lists an entity
/// tag that weakly matches `etag`. A malformed field never matches.
fn if_none_match_matches(headers: &HeaderMap, etag: &str) -> bool {
    let Some(ours) = parse_single_etag(etag.as_bytes()) else {
        // Our own tag is unusable, so only `*` can match.
        return headers
            .get_all(IF_NONE_MATCH)
            .iter()
            .any(|value| value.as_bytes().trim_ascii() == b"*");
    };
    let mut matched = false;
    for value in &headers.get_all(IF_NONE_MATCH) {
        let value = value.as_bytes().trim_ascii();
        if value == b"*" {
            matched = true;
            continue;
        }
        let Some(tags) = parse_etag_list(value) else {
            return false;
        };
        matched |= tags.iter().any(|tag| tag.opaque == ours.opaque);
    }
    matched
}

/// Returns `true` when the If-Range field allows the Range to be applied
/// (RFC 9110 section 13.1.5): an entity tag that strongly matches `etag`, or
/// an HTTP date exactly equal to `last_modified` in whole seconds.
fn if_range_matches(headers: &HeaderMap, etag: &str, last_modified: SystemTime) -> bool {
    let Some(value) = single_value(headers, &IF_RANGE) else {
        return false;
    };
    let value = trim_ows(value);
    if value.starts_with("W/") || value.starts_with('"') {
        let Some(theirs) = parse_single_etag(value.as_bytes()) else {
            return false;
        };
        let Some(ours) = parse_single_etag(etag.as_bytes()) else {
            return false;
        };
        return !theirs.weak && !ours.weak && theirs.opaque == ours.opaque;
    }
    httpdate::parse_http_date(value).is_ok_and(|date| date == whole_seconds(last_modified))
}

/// Returns the value of a header that occurs exactly once and is visible
/// ASCII, or `None` if it is absent, repeated or not textual.
fn single_value<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok()
}

/// Removes optional whitespace (spaces and horizontal tabs) at both ends.
fn trim_ows(value: &str) -> &str {
    value.trim_matches([' ', '\t'])
}

/// Truncates `time` to whole seconds, clamped to the range `httpdate` can
/// format (the Unix epoch up to the end of year 9999).
fn whole_seconds(time: SystemTime) -> SystemTime {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
        .min(MAX_HTTP_DATE_SECS);
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(UNIX_EPOCH)
}

/// A parsed entity tag (RFC 9110 section 8.8.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EntityTag<'a> {
    /// Whether the tag carried the `W/` weakness indicator.
    weak: bool,
    /// The characters between the double quotes.
    opaque: &'a [u8],
}

/// Returns whether `byte` may appear inside the quotes of an entity tag.
fn is_etagc(byte: u8) -> bool {
    byte == 0x21 || (0x23..=0x7e).contains(&byte) || byte >= 0x80
}

/// Parses one entity tag at the start of `input`, returning it and the rest.
fn parse_etag_prefix(input: &[u8]) -> Option<(EntityTag<'_>, &[u8])> {
    let (weak, rest) = match input.strip_prefix(b"W/") {
        Some(rest) => (true, rest),
        None => (false, input),
    };
    let rest = rest.strip_prefix(b"\"")?;
    let close = rest.iter().position(|&byte| byte == b'"')?;
    let (opaque, rest) = rest.split_at(close);
    if !opaque.iter().all(|&byte| is_etagc(byte)) {
        return None;
    }
    Some((EntityTag { weak, opaque }, rest.get(1..)?))
}

/// Parses a value that must consist of exactly one entity tag, allowing
/// surrounding whitespace.
fn parse_single_etag(input: &[u8]) -> Option<EntityTag<'_>> {
    let (tag, rest) = parse_etag_prefix(input.trim_ascii())?;
    rest.is_empty().then_some(tag)
}

/// Parses a comma-separated list of entity tags (RFC 9110 section 5.6.1),
/// tolerating empty list elements. Returns `None` if the list is malformed.
fn parse_etag_list(mut input: &[u8]) -> Option<Vec<EntityTag<'_>>> {
    let mut tags = Vec::new();
    loop {
        input = input.trim_ascii_start();
        if input.is_empty() {
            return Some(tags);
        }
        if let Some(rest) = input.strip_prefix(b",") {
            input = rest;
            continue;
        }
        let (tag, rest) = parse_etag_prefix(input)?;
        tags.push(tag);
        let rest = rest.trim_ascii_start();
        if rest.is_empty() {
            return Some(tags);
        }
        input = rest.strip_prefix(b",")?;
    }
}

/// A single syntactically valid byte range specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByteRange {
    /// `first-last`, both inclusive, with `first <= last`.
    FromTo(u64, u64),
    /// `first-`: from `first` to the end.
    From(u64),
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

impl ByteRange {
    /// Resolves the range against a representation of `len` bytes.
    fn resolve(self, len: u64) -> Selection {
        let Some(last) = len.checked_sub(1) else {
            return Selection::Unsatisfiable;
        };
        match self {
            ByteRange::FromTo(first, _) | ByteRange::From(first) if first > last => {
                Selection::Unsatisfiable
            }
            ByteRange::FromTo(first, end) => Selection::Partial {
                start: first,
                end: end.min(last),
            },
            ByteRange::From(first) => Selection::Partial {
                start: first,
                end: last,
            },
            ByteRange::Suffix(0) => Selection::Unsatisfiable,
            ByteRange::Suffix(count) => Selection::Partial {
                start: len.saturating_sub(count),
                end: last,
            },
        }
    }
}

/// Parses a Range field value holding exactly one byte range. Returns `None`
/// for other units, several ranges, or anything malformed.
fn parse_range(value: &str) -> Option<ByteRange> {
    let (unit, specs) = value.split_once('=')?;
    if !trim_ows(unit).eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = specs
        .split(',')
        .map(trim_ows)
        .filter(|spec| !spec.is_empty());
    let spec = specs.next()?;
    if specs.next().is_some() {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    match (trim_ows(first), trim_ows(last)) {
        ("", count) => parse_digits(count).map(ByteRange::Suffix),
        (first, "") => parse_digits(first).map(ByteRange::From),
        (first, last) => {
            let (first, last) = (parse_digits(first)?, parse_digits(last)?);
            (first <= last).then_some(ByteRange::FromTo(first, last))
        }
    }
}

/// Parses a non-empty string of ASCII digits, rejecting signs and overflow.
fn parse_digits(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// Modification time used by the tests: Sun, 06 Nov 1994 08:49:37 GMT,
    /// plus a fraction of a second that HTTP dates cannot express.
    fn modified() -> SystemTime {
        UNIX_EPOCH + Duration::new(784_111_777, 250_000_000)
    }

    const MODIFIED: &str = "Sun, 06 Nov 1994 08:49:37 GMT";
    const ONE_SECOND_EARLIER: &str = "Sun, 06 Nov 1994 08:49:36 GMT";
    const ONE_SECOND_LATER: &str = "Sun, 06 Nov 1994 08:49:38 GMT";
    const ETAG_VALUE: &str = "\"abc\"";

    /// A byte span as returned by [`Selection::span`].
    type Span = Option<(u64, u64)>;

    /// Header `(name, value)` pairs.
    type Pairs<'a> = &'a [(&'a str, &'a str)];

    /// Builds a header map, appending repeated names as separate field lines.
    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for &(name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("valid name"),
                HeaderValue::from_str(value).expect("valid value"),
            );
        }
        map
    }

    /// Runs `select` with the test etag and modification time.
    fn sel(pairs: &[(&str, &str)], len: u64) -> Selection {
        select(&headers(pairs), len, ETAG_VALUE, modified())
    }

    /// Shorthand for a partial selection.
    fn partial(start: u64, end: u64) -> Selection {
        Selection::Partial { start, end }
    }

    #[test]
    fn range_forms() {
        use Selection::{Full, Unsatisfiable};
        let cases: &[(&str, u64, Selection)] = &[
            // The BITS client's request.
            ("bytes=0-9976", 10240, partial(0, 9976)),
            ("bytes=9977-10239", 10240, partial(9977, 10239)),
            ("bytes=0-10239", 10240, partial(0, 10239)),
            ("bytes=0-0", 100, partial(0, 0)),
            ("bytes=99-99", 100, partial(99, 99)),
            ("bytes=10-19", 100, partial(10, 19)),
            // Last byte position clamped to the end.
            ("bytes=0-100", 100, partial(0, 99)),
            ("bytes=50-18446744073709551615", 100, partial(50, 99)),
            // Open-ended.
            ("bytes=0-", 100, partial(0, 99)),
            ("bytes=42-", 100, partial(42, 99)),
            ("bytes=99-", 100, partial(99, 99)),
            // Suffix.
            ("bytes=-1", 100, partial(99, 99)),
            ("bytes=-10", 100, partial(90, 99)),
            ("bytes=-100", 100, partial(0, 99)),
            ("bytes=-20000", 100, partial(0, 99)),
            ("bytes=-18446744073709551615", 100, partial(0, 99)),
            ("bytes=-0", 100, Unsatisfiable),
            // First position at or beyond the end.
            ("bytes=100-", 100, Unsatisfiable),
            ("bytes=100-200", 100, Unsatisfiable),
            ("bytes=100-100", 100, Unsatisfiable),
            ("bytes=18446744073709551615-", 100, Unsatisfiable),
            // Zero-length representation.
            ("bytes=0-", 0, Unsatisfiable),
            ("bytes=0-0", 0, Unsatisfiable),
            ("bytes=-5", 0, Unsatisfiable),
            ("bytes=-0", 0, Unsatisfiable),
            // Invalid: first > last is ignored, even if also out of range.
            ("bytes=5-2", 100, Full),
            ("bytes=500-200", 100, Full),
            ("bytes=5-2", 0, Full),
            // Unit is case-insensitive; whitespace around tokens is allowed.
            ("Bytes=0-9", 100, partial(0, 9)),
            ("BYTES=0-9", 100, partial(0, 9)),
            ("bytes = 0-9", 100, partial(0, 9)),
            ("bytes= 0-9 ", 100, partial(0, 9)),
            ("bytes=0 - 9", 100, partial(0, 9)),
            ("bytes=\t-5\t", 100, partial(95, 99)),
            // Empty list elements are tolerated.
            ("bytes=0-9,", 100, partial(0, 9)),
            ("bytes=, 0-9", 100, partial(0, 9)),
            // Other units.
            ("items=0-9", 100, Full),
            ("bytesx=0-9", 100, Full),
            ("=0-9", 100, Full),
            // Several ranges are served in full.
            ("bytes=0-9,20-29", 100, Full),
            ("bytes=0-9, 20-29", 100, Full),
            ("bytes=0-9,200-299", 100, Full),
            ("bytes=0-0,-1", 100, Full),
            // Garbage.
            ("bytes=a-b", 100, Full),
            ("bytes=-", 100, Full),
            ("bytes=", 100, Full),
            ("bytes=,", 100, Full),
            ("bytes", 100, Full),
            ("", 100, Full),
            ("0-9", 100, Full),
            ("bytes=1-2-3", 100, Full),
            ("bytes=--1", 100, Full),
            ("bytes=+1-2", 100, Full),
            ("bytes=1-+2", 100, Full),
            ("bytes=-+2", 100, Full),
            ("bytes=0x1-2", 100, Full),
            ("bytes=1", 100, Full),
            ("bytes=1 2-3", 100, Full),
            ("bytes==0-9", 100, Full),
            ("bytes=0-9;", 100, Full),
            // Overflowing digits.
            ("bytes=0-18446744073709551616", 100, Full),
            ("bytes=18446744073709551616-", 100, Full),
            ("bytes=-18446744073709551616", 100, Full),
            ("bytes=0-99999999999999999999999999", 100, Full),
        ];
        for &(range, len, expected) in cases {
            assert_eq!(
                sel(&[("range", range)], len),
                expected,
                "Range: {range:?}, len {len}"
            );
        }
    }

    #[test]
    fn no_range_is_full() {
        assert_eq!(sel(&[], 100), Selection::Full);
        assert_eq!(sel(&[], 0), Selection::Full);
        assert_eq!(sel(&[("accept", "*/*")], 0), Selection::Full);
    }

    #[test]
    fn repeated_range_lines_are_full() {
        let pairs = [("range", "bytes=0-9"), ("range", "bytes=10-19")];
        assert_eq!(sel(&pairs, 100), Selection::Full);
    }

    #[test]
    fn non_ascii_range_is_full() {
        let mut map = HeaderMap::new();
        map.insert(
            RANGE,
            HeaderValue::from_bytes(b"bytes=0-9\xff").expect("valid value"),
        );
        assert_eq!(select(&map, 100, ETAG_VALUE, modified()), Selection::Full);
    }

    #[test]
    fn if_range() {
        use Selection::{Full, Unsatisfiable};
        let cases: &[(&str, Selection)] = &[
            // Strong exact entity-tag match.
            ("\"abc\"", partial(0, 9)),
            (" \"abc\" ", partial(0, 9)),
            // Mismatches.
            ("\"abd\"", Full),
            ("\"ABC\"", Full),
            ("\"abc\"x", Full),
            ("\"abc\", \"abc\"", Full),
            ("\"\"", Full),
            // Weak tags never match.
            ("W/\"abc\"", Full),
            ("w/\"abc\"", Full),
            // Dates must equal Last-Modified in whole seconds.
            (MODIFIED, partial(0, 9)),
            ("Sunday, 06-Nov-94 08:49:37 GMT", partial(0, 9)),
            ("Sun Nov  6 08:49:37 1994", partial(0, 9)),
            (ONE_SECOND_EARLIER, Full),
            (ONE_SECOND_LATER, Full),
            // Neither a tag nor a date.
            ("abc", Full),
            ("", Full),
            ("\"abc", Full),
            ("*", Full),
        ];
        for &(if_range, expected) in cases {
            let pairs = [("range", "bytes=0-9"), ("if-range", if_range)];
            assert_eq!(sel(&pairs, 100), expected, "If-Range: {if_range:?}");
        }
        // A match lets an unsatisfiable range through; a mismatch does not.
        let pairs = [("range", "bytes=200-"), ("if-range", ETAG_VALUE)];
        assert_eq!(sel(&pairs, 100), Unsatisfiable);
        let pairs = [("range", "bytes=200-"), ("if-range", "\"old\"")];
        assert_eq!(sel(&pairs, 100), Full);
    }

    #[test]
    fn if_range_without_range_is_ignored() {
        assert_eq!(sel(&[("if-range", ETAG_VALUE)], 100), Selection::Full);
        assert_eq!(sel(&[("if-range", "\"old\"")], 100), Selection::Full);
    }

    #[test]
    fn if_range_repeated_is_full() {
        let pairs = [
            ("range", "bytes=0-9"),
            ("if-range", ETAG_VALUE),
            ("if-range", ETAG_VALUE),
        ];
        assert_eq!(sel(&pairs, 100), Selection::Full);
    }

    #[test]
    fn if_range_never_matches_weak_own_etag() {
        let map = headers(&[("range", "bytes=0-9"), ("if-range", "W/\"abc\"")]);
        assert_eq!(select(&map, 100, "W/\"abc\"", modified()), Selection::Full);
        let map = headers(&[("range", "bytes=0-9"), ("if-range", "\"abc\"")]);
        assert_eq!(select(&map, 100, "W/\"abc\"", modified()), Selection::Full);
    }

    #[test]
    fn if_none_match() {
        use Selection::{Full, NotModified};
        let cases: &[(&str, Selection)] = &[
            ("*", NotModified),
            (" * ", NotModified),
            ("\"abc\"", NotModified),
            ("W/\"abc\"", NotModified),
            ("\"x\", \"abc\"", NotModified),
            ("\"x\",W/\"abc\",\"y\"", NotModified),
            (" , \"abc\" ,, ", NotModified),
            ("\"x\"", Full),
            ("\"x\", \"y\"", Full),
            ("\"ABC\"", Full),
            ("w/\"abc\"", Full),
            ("", Full),
            // Malformed lists never match.
            ("abc", Full),
            ("\"abc\" \"x\"", Full),
            ("\"abc\", x", Full),
            ("\"abc", Full),
            ("*, \"abc\"", Full),
        ];
        for &(value, expected) in cases {
            assert_eq!(
                sel(&[("if-none-match", value)], 100),
                expected,
                "If-None-Match: {value:?}"
            );
        }
    }

    #[test]
    fn if_none_match_over_several_lines() {
        let pairs = [("if-none-match", "\"x\""), ("if-none-match", "\"abc\"")];
        assert_eq!(sel(&pairs, 100), Selection::NotModified);
        let pairs = [("if-none-match", "\"x\""), ("if-none-match", "*")];
        assert_eq!(sel(&pairs, 100), Selection::NotModified);
        let pairs = [("if-none-match", "\"x\""), ("if-none-match", "\"y\"")];
        assert_eq!(sel(&pairs, 100), Selection::Full);
    }

    #[test]
    fn if_none_match_with_weak_own_etag() {
        let map = headers(&[("if-none-match", "\"abc\"")]);
        assert_eq!(
            select(&map, 100, "W/\"abc\"", modified()),
            Selection::NotModified
        );
    }

    #[test]
    fn if_none_match_with_unparsable_own_etag() {
        let map = headers(&[("if-none-match", "abc")]);
        assert_eq!(select(&map, 100, "abc", modified()), Selection::Full);
        let map = headers(&[("if-none-match", "*")]);
        assert_eq!(select(&map, 100, "abc", modified()), Selection::NotModified);
    }

    #[test]
    fn if_modified_since() {
        use Selection::{Full, NotModified};
        let cases: &[(&str, Selection)] = &[
            (MODIFIED, NotModified),
            (ONE_SECOND_LATER, NotModified),
            ("Fri, 31 Dec 9999 23:59:59 GMT", NotModified),
            (ONE_SECOND_EARLIER, Full),
            ("Thu, 01 Jan 1970 00:00:00 GMT", Full),
            ("Sunday, 06-Nov-94 08:49:37 GMT", NotModified),
            ("Sun Nov  6 08:49:37 1994", NotModified),
            (" Sun, 06 Nov 1994 08:49:37 GMT ", NotModified),
            ("garbage", Full),
            ("", Full),
            ("Sun, 06 Nov 1994 08:49:37", Full),
            ("784111777", Full),
        ];
        for &(value, expected) in cases {
            assert_eq!(
                sel(&[("if-modified-since", value)], 100),
                expected,
                "If-Modified-Since: {value:?}"
            );
        }
    }

    #[test]
    fn if_modified_since_repeated_is_ignored() {
        let pairs = [
            ("if-modified-since", MODIFIED),
            ("if-modified-since", MODIFIED),
        ];
        assert_eq!(sel(&pairs, 100), Selection::Full);
    }

    #[test]
    fn if_none_match_takes_precedence_over_if_modified_since() {
        let pairs = [("if-none-match", "\"x\""), ("if-modified-since", MODIFIED)];
        assert_eq!(sel(&pairs, 100), Selection::Full);
        let pairs = [("if-none-match", "abc"), ("if-modified-since", MODIFIED)];
        assert_eq!(sel(&pairs, 100), Selection::Full);
        let pairs = [
            ("if-none-match", "\"abc\""),
            ("if-modified-since", ONE_SECOND_EARLIER),
        ];
        assert_eq!(sel(&pairs, 100), Selection::NotModified);
    }

    #[test]
    fn not_modified_takes_precedence_over_range() {
        let pairs = [("range", "bytes=0-9"), ("if-none-match", ETAG_VALUE)];
        assert_eq!(sel(&pairs, 100), Selection::NotModified);
        let pairs = [("range", "bytes=0-9"), ("if-modified-since", MODIFIED)];
        assert_eq!(sel(&pairs, 100), Selection::NotModified);
        let pairs = [("range", "bytes=0-9"), ("if-none-match", "\"x\"")];
        assert_eq!(sel(&pairs, 100), partial(0, 9));
        let pairs = [
            ("range", "bytes=0-9"),
            ("if-modified-since", ONE_SECOND_EARLIER),
        ];
        assert_eq!(sel(&pairs, 100), partial(0, 9));
    }

    #[test]
    fn last_modified_before_epoch_is_treated_as_epoch() {
        let before = UNIX_EPOCH - Duration::from_secs(10);
        let map = headers(&[("if-modified-since", "Thu, 01 Jan 1970 00:00:00 GMT")]);
        assert_eq!(
            select(&map, 100, ETAG_VALUE, before),
            Selection::NotModified
        );
    }

    #[test]
    fn span() {
        let cases: &[(Selection, u64, Span)] = &[
            (Selection::Full, 100, Some((0, 100))),
            (Selection::Full, 0, Some((0, 0))),
            (partial(0, 9976), 10240, Some((0, 9977))),
            (partial(0, 0), 100, Some((0, 1))),
            (partial(99, 99), 100, Some((99, 1))),
            (partial(10, 19), 100, Some((10, 10))),
            (partial(0, u64::MAX - 1), u64::MAX, Some((0, u64::MAX))),
            (Selection::Unsatisfiable, 100, None),
            (Selection::NotModified, 100, None),
            // Partial selections outside the representation.
            (partial(5, 2), 100, None),
            (partial(0, 100), 100, None),
            (partial(0, 0), 0, None),
        ];
        for &(selection, len, expected) in cases {
            assert_eq!(selection.span(len), expected, "{selection:?}, len {len}");
        }
    }

    /// Finishes `response_head` and returns the status and every header as
    /// `(name, value)` pairs in order of insertion.
    fn head(
        selection: Selection,
        len: u64,
        last_modified: SystemTime,
    ) -> (u16, Vec<(String, String)>) {
        let response = response_head(selection, len, ETAG_VALUE, last_modified)
            .body(())
            .expect("valid response");
        let pairs = response
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    value.to_str().expect("ascii").to_owned(),
                )
            })
            .collect();
        (response.status().as_u16(), pairs)
    }

    /// Builds the expected header list: the common headers followed by `extra`.
    fn expected(last_modified: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let common = [
            ("accept-ranges", "bytes"),
            ("etag", ETAG_VALUE),
            ("last-modified", last_modified),
            ("cache-control", "private"),
        ];
        common
            .iter()
            .chain(extra)
            .map(|&(name, value)| (name.to_owned(), value.to_owned()))
            .collect()
    }

    #[test]
    fn response_heads() {
        let octets = ("content-type", "application/octet-stream");
        let cases: &[(Selection, u64, u16, Pairs<'_>)] = &[
            (
                Selection::Full,
                10240,
                200,
                &[octets, ("content-length", "10240")],
            ),
            (Selection::Full, 0, 200, &[octets, ("content-length", "0")]),
            (
                partial(0, 9976),
                10240,
                206,
                &[
                    octets,
                    ("content-length", "9977"),
                    ("content-range", "bytes 0-9976/10240"),
                ],
            ),
            (
                partial(0, 0),
                100,
                206,
                &[
                    octets,
                    ("content-length", "1"),
                    ("content-range", "bytes 0-0/100"),
                ],
            ),
            (
                partial(99, 99),
                100,
                206,
                &[
                    octets,
                    ("content-length", "1"),
                    ("content-range", "bytes 99-99/100"),
                ],
            ),
            (
                Selection::Unsatisfiable,
                100,
                416,
                &[
                    octets,
                    ("content-length", "0"),
                    ("content-range", "bytes */100"),
                ],
            ),
            (
                Selection::Unsatisfiable,
                0,
                416,
                &[
                    octets,
                    ("content-length", "0"),
                    ("content-range", "bytes */0"),
                ],
            ),
            // A partial selection outside the representation is a 416.
            (
                partial(0, 100),
                100,
                416,
                &[
                    octets,
                    ("content-length", "0"),
                    ("content-range", "bytes */100"),
                ],
            ),
            (
                partial(5, 2),
                100,
                416,
                &[
                    octets,
                    ("content-length", "0"),
                    ("content-range", "bytes */100"),
                ],
            ),
            (Selection::NotModified, 100, 304, &[]),
        ];
        for &(selection, len, status, extra) in cases {
            assert_eq!(
                head(selection, len, modified()),
                (status, expected(MODIFIED, extra)),
                "{selection:?}, len {len}"
            );
        }
    }

    #[test]
    fn response_head_clamps_unformattable_dates() {
        let cases: &[(SystemTime, &str)] = &[
            (UNIX_EPOCH, "Thu, 01 Jan 1970 00:00:00 GMT"),
            (
                UNIX_EPOCH - Duration::from_secs(1),
                "Thu, 01 Jan 1970 00:00:00 GMT",
            ),
            (
                UNIX_EPOCH + Duration::from_secs(MAX_HTTP_DATE_SECS + 1_000),
                "Fri, 31 Dec 9999 23:59:59 GMT",
            ),
        ];
        for &(time, formatted) in cases {
            assert_eq!(
                head(Selection::NotModified, 1, time),
                (304, expected(formatted, &[])),
                "{time:?}"
            );
        }
    }

    #[test]
    fn response_head_rejects_invalid_etag() {
        let result = response_head(Selection::Full, 1, "\"a\nb\"", modified()).body(());
        assert!(result.is_err());
    }
}
