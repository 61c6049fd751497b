//! URL path → destination: anything accepted stays a plain relative path under the root.

#![no_main]

use std::path::{Component, Path};

use axum_bits::destination::{Destination, from_url_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let reserved = [".bits".to_owned()];
    let Ok(destination) = from_url_path(path, "/", &reserved) else {
        return;
    };
    let s = destination.as_str();
    assert!(!s.is_empty());
    assert!(!s.contains('\\'), "backslash in {s:?}");
    assert!(!s.contains('\0'), "NUL in {s:?}");
    assert!(!s.starts_with('/'), "absolute: {s:?}");
    let components: Vec<&str> = s.split('/').collect();
    for c in &components {
        assert!(!c.is_empty(), "empty component in {s:?}");
        assert!(*c != "." && *c != "..", "dot component in {s:?}");
    }
    // Every `%` started an escape of two hex digits.
    assert!(
        path.split('%').skip(1).all(|after| after
            .as_bytes()
            .get(..2)
            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))),
        "malformed escape accepted: {path:?}"
    );
    // The reserved folder is no component in any case or compatibility form (Unicode
    // compatibility caseless matching). `.bitsy` is an ordinary name, so this is not a
    // prefix test.
    for c in &components {
        assert!(
            !caseless::compatibility_caseless_match_str(c, ".bits"),
            "reserved folder reachable: {s:?}"
        );
    }

    let root = Path::new("/root");
    let full = destination.under(root);
    assert!(full.starts_with(root), "{full:?} escapes {root:?}");
    let below: Vec<Component<'_>> = full
        .strip_prefix(root)
        .expect("below root")
        .components()
        .collect();
    assert_eq!(below.len(), components.len(), "{s:?} -> {full:?}");
    assert!(below.iter().all(|c| matches!(c, Component::Normal(_))));

    // What a store writes back must validate to the same destination.
    assert_eq!(
        Destination::from_stored(s, &reserved).as_ref(),
        Ok(&destination)
    );
});
