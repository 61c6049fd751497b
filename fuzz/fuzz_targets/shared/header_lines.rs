//! Header maps from fuzz bytes, shared by the `packet` and `ack` targets.

use http::{HeaderMap, HeaderName, HeaderValue};

/// Splits `data` into lines (`\n`). A line whose first byte is below `known.len()` names
/// `known[byte]` and the rest of the line is its value; any other line is `name:value`. Names
/// or values `http` refuses are skipped; repeated names are appended.
pub fn header_map(data: &[u8], known: &[HeaderName]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some((&first, rest)) = line.split_first() else {
            continue;
        };
        let (name, value) = match known.get(usize::from(first)) {
            Some(name) => (name.clone(), rest),
            None => {
                let Some(colon) = line.iter().position(|&b| b == b':') else {
                    continue;
                };
                let Ok(name) = HeaderName::from_bytes(&line[..colon]) else {
                    continue;
                };
                (name, &line[colon + 1..])
            }
        };
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(name, value);
        }
    }
    headers
}
