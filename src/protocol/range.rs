use super::ProtocolError;

/// The byte range a Fragment carries, from its `Content-Range` header.
///
/// Held half-open, `[start, end)`, so that the defensive zero-length form `bytes */0`
/// (protocol reference, section 7) is the empty range `[0, 0)` of a 0-byte file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FragmentRange {
    start: u64,
    end: u64,
    total: u64,
}

impl FragmentRange {
    /// Builds a range, checking `start <= end <= total`.
    pub fn new(start: u64, end: u64, total: u64) -> Option<Self> {
        (start <= end && end <= total).then_some(Self { start, end, total })
    }

    /// Parses `bytes <first>-<last>/<total>` (inclusive, zero-based) or `bytes */0`.
    ///
    /// The unit is compared case-insensitively (Windows sends `bytes`, the docs print
    /// `Bytes`); surrounding whitespace is ignored. Everything else is strict: decimal digits
    /// that fit in a `u64`, `first <= last < total`.
    pub fn parse(value: &[u8]) -> Result<Self, ProtocolError> {
        let bad = |reason| ProtocolError::InvalidContentRange { reason };
        let value = value.trim_ascii();
        let (unit, rest) = value
            .split_at_checked(5)
            .ok_or(bad("expected `bytes <first>-<last>/<total>`"))?;
        if !unit.eq_ignore_ascii_case(b"bytes") {
            return Err(bad("the unit must be `bytes`"));
        }
        let spec = rest.trim_ascii_start();
        if spec.len() == rest.len() {
            return Err(bad("expected a space after `bytes`"));
        }
        let slash = spec
            .iter()
            .position(|&b| b == b'/')
            .ok_or(bad("missing `/<total>`"))?;
        let (span, total) = (&spec[..slash], &spec[slash + 1..]);
        let total = parse_u64(total).ok_or(bad("the total is not a decimal number"))?;
        if span == b"*" {
            return if total == 0 {
                Ok(Self {
                    start: 0,
                    end: 0,
                    total: 0,
                })
            } else {
                Err(bad("`*` is only accepted for an empty file (`bytes */0`)"))
            };
        }
        let dash = span
            .iter()
            .position(|&b| b == b'-')
            .ok_or(bad("missing `-` between first and last"))?;
        let first = parse_u64(&span[..dash]).ok_or(bad("first is not a decimal number"))?;
        let last = parse_u64(&span[dash + 1..]).ok_or(bad("last is not a decimal number"))?;
        if first > last {
            return Err(bad("first is greater than last"));
        }
        if last >= total {
            return Err(bad("last is not below the total"));
        }
        // last < total <= u64::MAX, so last + 1 cannot overflow.
        Ok(Self {
            start: first,
            end: last + 1,
            total,
        })
    }

    /// First byte offset of the range.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the last byte of the range.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Size of the whole file, as the client announced it.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Number of bytes in the range, which the body must carry exactly.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the range is empty (only the zero-length file form).
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Whether this is the final fragment: the one that includes the file's last byte.
    pub fn is_final(&self) -> bool {
        self.end == self.total
    }
}

impl std::fmt::Display for FragmentRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            write!(f, "bytes */{}", self.total)
        } else {
            write!(f, "bytes {}-{}/{}", self.start, self.end - 1, self.total)
        }
    }
}

/// Strict decimal: at least one digit, digits only, no sign, fits in a u64.
pub(crate) fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> (u64, u64, u64) {
        let r = FragmentRange::parse(s.as_bytes()).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        (r.start(), r.end(), r.total())
    }

    fn err(s: &str) {
        assert!(
            FragmentRange::parse(s.as_bytes()).is_err(),
            "{s:?} was accepted"
        );
    }

    #[test]
    fn parses_windows_form() {
        assert_eq!(ok("bytes 0-4891/4892"), (0, 4892, 4892));
        assert_eq!(ok("bytes 4096-8191/10000"), (4096, 8192, 10000));
        assert_eq!(ok("bytes 9999-9999/10000"), (9999, 10000, 10000));
    }

    #[test]
    fn unit_is_case_insensitive_and_whitespace_tolerated() {
        assert_eq!(ok("Bytes 0-9/10"), (0, 10, 10));
        assert_eq!(ok("BYTES 0-9/10"), (0, 10, 10));
        assert_eq!(ok("  bytes   0-9/10  "), (0, 10, 10));
        assert_eq!(ok("bytes\t0-9/10"), (0, 10, 10));
    }

    #[test]
    fn zero_length_file() {
        let r = FragmentRange::parse(b"bytes */0").unwrap();
        assert!(r.is_empty() && r.is_final());
        assert_eq!(r.len(), 0);
        err("bytes */10");
        err("bytes 0-9/*");
        err("bytes */*");
    }

    #[test]
    fn rejects_malformed() {
        for s in [
            "",
            "bytes",
            "bytes ",
            "bytes0-9/10",
            "octets 0-9/10",
            "bytes 10-5/100",
            "bytes 0-99/50",
            "bytes 0-10/10",
            "bytes abc",
            "bytes -5/10",
            "bytes 0-/10",
            "bytes 0-9/",
            "bytes 0-9",
            "bytes +1-9/10",
            "bytes 0-9/10/11",
            "bytes 0 - 9/10",
            "bytes 0x0-9/10",
            "bytes 0-9/0",
            "bytes 0-18446744073709551616/18446744073709551617",
        ] {
            err(s);
        }
    }

    #[test]
    fn u64_edges() {
        let max = u64::MAX;
        assert_eq!(ok(&format!("bytes 0-{}/{max}", max - 1)), (0, max, max));
        err(&format!("bytes 0-{max}/{max}"));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(max));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b"007"), Some(7));
    }

    #[test]
    fn display_round_trips() {
        for s in ["bytes 0-4891/4892", "bytes */0", "bytes 5-5/6"] {
            assert_eq!(FragmentRange::parse(s.as_bytes()).unwrap().to_string(), s);
        }
    }

    #[test]
    fn new_checks_order() {
        assert!(FragmentRange::new(0, 0, 0).is_some());
        assert!(FragmentRange::new(1, 0, 5).is_none());
        assert!(FragmentRange::new(0, 6, 5).is_none());
    }
}
