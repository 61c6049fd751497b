//! `Content-Range` parsing: whatever is accepted is a well-formed range that prints back to
//! a value parsing to the same range.

#![no_main]

use axum_bits::protocol::FragmentRange;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(range) = FragmentRange::parse(data) else {
        return;
    };
    let (start, end, total) = (range.start(), range.end(), range.total());
    assert!(start <= end, "start {start} > end {end}");
    assert!(end <= total, "end {end} > total {total}");
    assert_eq!(range.len(), end - start);
    assert_eq!(range.is_empty(), start == end);
    assert_eq!(range.is_final(), end == total);
    // Only `bytes */0` is empty.
    if range.is_empty() {
        assert_eq!(total, 0);
    }
    assert_eq!(FragmentRange::new(start, end, total), Some(range));

    let printed = range.to_string();
    let reparsed = FragmentRange::parse(printed.as_bytes())
        .unwrap_or_else(|e| panic!("{printed:?} (from {range:?}) does not parse: {e}"));
    assert_eq!(reparsed, range, "{printed:?}");
    assert_eq!(reparsed.to_string(), printed);
});
