//! The one S3 request the staging writes itself, a multipart completion with
//! `If-None-Match: *` (`object_store` sends none): its body, how its answer reads, and the
//! ETag S3 gives the object it makes. Pure: no I/O.

use md5::{Digest, Md5};

/// The `CompleteMultipartUpload` body for parts 1.. with these ETags.
pub(super) fn complete_body(etags: &[String]) -> String {
    let mut body = String::from("<CompleteMultipartUpload>");
    for (index, etag) in etags.iter().enumerate() {
        body.push_str(&format!(
            "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
            index + 1,
            escape(etag)
        ));
    }
    body.push_str("</CompleteMultipartUpload>");
    body
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// What a completion's answer means.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// The object is made.
    Done,
    /// The key exists and may not be replaced (412 `PreconditionFailed`).
    Exists,
    /// No such upload: completed (or aborted) already.
    Gone,
    /// The bucket is full or over its quota.
    Full(String),
    /// Worth another attempt (5xx, `SlowDown`, a 409 conditional-request conflict, or a 200
    /// whose body is an error, which S3 sends when a completion fails after it began).
    Retry(String),
    /// Anything else: a failure the staging reports.
    Fail(String),
}

/// Reads the status and body of a `CompleteMultipartUpload` answer.
pub(super) fn completion_answer(status: u16, body: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(body);
    let code = error_code(&text);
    let message = || format!("completing the upload: {status} {}", code.unwrap_or(""));
    if matches!(code, Some("QuotaExceeded" | "XMinioStorageFull")) || status == 507 {
        return Answer::Full(message());
    }
    match (status, code) {
        (200, None) => Answer::Done,
        (412, _) | (_, Some("PreconditionFailed")) => Answer::Exists,
        (404, _) | (_, Some("NoSuchUpload")) => Answer::Gone,
        (409, _) | (500..=599, _) | (200, Some(_)) => Answer::Retry(message()),
        (_, Some("SlowDown" | "InternalError" | "ServiceUnavailable" | "RequestTimeout")) => {
            Answer::Retry(message())
        }
        _ => Answer::Fail(message()),
    }
}

/// The `<Code>` of an S3 error body, if it is one.
fn error_code(text: &str) -> Option<&str> {
    let error = &text[text.find("<Error>")?..];
    let start = error.find("<Code>")? + "<Code>".len();
    let end = error[start..].find("</Code>")? + start;
    Some(error[start..end].trim())
}

/// The ETag S3 gives an object completed from parts with these ETags (without quotes): the
/// MD5 of their MD5s, a dash and their number. `None` when a part's ETag is not an MD5 (an
/// encrypted bucket, some compatible services): the object cannot be recognised then.
pub(super) fn multipart_etag(etags: &[String]) -> Option<String> {
    let mut md5 = Md5::new();
    for etag in etags {
        let hex = etag.trim_matches('"');
        if hex.len() != 32 {
            return None;
        }
        let bytes = (0..32)
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        md5.update(&bytes);
    }
    let digest: String = md5.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("{digest}-{}", etags.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_lists_the_parts_in_order_escaped() {
        let body = complete_body(&["\"a1\"".into(), "b&2".into()]);
        assert_eq!(
            body,
            "<CompleteMultipartUpload>\
             <Part><PartNumber>1</PartNumber><ETag>&quot;a1&quot;</ETag></Part>\
             <Part><PartNumber>2</PartNumber><ETag>b&amp;2</ETag></Part>\
             </CompleteMultipartUpload>"
        );
        assert_eq!(
            complete_body(&[]),
            "<CompleteMultipartUpload></CompleteMultipartUpload>"
        );
    }

    fn error(code: &str) -> Vec<u8> {
        format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>m</Message></Error>")
            .into_bytes()
    }

    #[test]
    fn answers() {
        let done = b"<CompleteMultipartUploadResult><ETag>x</ETag></CompleteMultipartUploadResult>";
        assert_eq!(completion_answer(200, done), Answer::Done);
        assert_eq!(completion_answer(200, b""), Answer::Done);
        assert_eq!(
            completion_answer(412, &error("PreconditionFailed")),
            Answer::Exists
        );
        assert_eq!(completion_answer(412, b""), Answer::Exists);
        assert_eq!(completion_answer(404, &error("NoSuchUpload")), Answer::Gone);
        assert!(matches!(
            completion_answer(200, &error("InternalError")),
            Answer::Retry(_)
        ));
        assert!(matches!(
            completion_answer(503, &error("SlowDown")),
            Answer::Retry(_)
        ));
        assert!(matches!(completion_answer(500, b""), Answer::Retry(_)));
        assert!(matches!(
            completion_answer(409, &error("ConditionalRequestConflict")),
            Answer::Retry(_)
        ));
        assert!(matches!(
            completion_answer(403, &error("QuotaExceeded")),
            Answer::Full(_)
        ));
        assert!(matches!(completion_answer(507, b""), Answer::Full(_)));
        assert!(matches!(
            completion_answer(400, &error("InvalidPart")),
            Answer::Fail(_)
        ));
        assert!(matches!(
            completion_answer(403, &error("AccessDenied")),
            Answer::Fail(_)
        ));
    }

    #[test]
    fn the_multipart_etag_is_the_md5_of_the_parts_md5s() {
        // MD5("") and MD5("a"), as a server gives them.
        let parts = [
            "\"d41d8cd98f00b204e9800998ecf8427e\"".to_owned(),
            "\"0cc175b9c0f1b6a831c399e269772661\"".to_owned(),
        ];
        // md5(d41d8c..27e 0cc175..661), by another implementation.
        assert_eq!(
            multipart_etag(&parts).as_deref(),
            Some("68083ea43d0307eecfa2b4749f19df15-2")
        );
        assert_eq!(multipart_etag(&["\"not-an-md5\"".to_owned()]), None);
    }
}
