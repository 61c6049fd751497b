use http::Method;

/// The extension method every BITS upload packet uses.
pub const BITS_POST: &str = "BITS_POST";

/// `BITS_POST` as a [`Method`], for building requests.
pub fn bits_post() -> Method {
    // An upper-case token is always a valid extension method; the fallback is unreachable.
    Method::from_bytes(BITS_POST.as_bytes()).unwrap_or(Method::POST)
}

/// Whether a request method is `BITS_POST`. Methods are case-sensitive in HTTP, and Windows
/// always sends the upper-case form.
pub fn is_bits_post(method: &Method) -> bool {
    method.as_str() == BITS_POST
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_the_exact_method() {
        assert!(is_bits_post(&Method::from_bytes(b"BITS_POST").unwrap()));
        assert!(!is_bits_post(&Method::from_bytes(b"bits_post").unwrap()));
        assert!(!is_bits_post(&Method::POST));
        assert!(!is_bits_post(&Method::GET));
        assert!(is_bits_post(&bits_post()));
    }
}
