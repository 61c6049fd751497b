//! The GET/HEAD handler the Windows client downloads an upload-reply session's reply with, at
//! the URL [`replies`](crate::replies) names: owner-only, with ranges and validators so that an
//! interrupted download resumes.

mod conditional;

use std::time::{Duration, UNIX_EPOCH};

use http::request::Parts;
use http::{Method, Response, StatusCode};

use crate::body::file::FileBody;
use crate::session::{Owner, SessionId};
use crate::shared::Shared;

/// A download response: headers plus the part of the reply file to stream, if any.
pub(crate) type Download = Response<Option<FileBody>>;

fn plain(status: StatusCode) -> Download {
    let mut response = Response::new(None);
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from_static("0"),
    );
    response
}

/// Serves a GET or HEAD of a reply URL. Unknown sessions, sessions of another owner and
/// sessions without a stored reply all get 404.
pub(crate) async fn respond(shared: &Shared, parts: &Parts, id: SessionId) -> Download {
    let Some(mode) = &shared.reply else {
        return plain(StatusCode::NOT_FOUND);
    };
    let owner = parts.extensions.get::<Owner>();
    let record = match shared.store.load(id).await {
        Ok(Some(record)) => record,
        Ok(None) => return plain(StatusCode::NOT_FOUND),
        Err(error) => {
            tracing::warn!(%error, session = %id, "cannot load a session to serve its reply");
            return plain(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let stored = record
        .outcome
        .as_ref()
        .and_then(|o| o.stored_reply)
        .filter(|_| record.is_open() && record.is_owned_by(owner));
    let Some(stored) = stored else {
        return plain(StatusCode::NOT_FOUND);
    };
    let etag = format!("\"{}-{:x}-{:x}\"", id_hex(id), stored.len, stored.stored_ms);
    let modified = UNIX_EPOCH + Duration::from_millis(stored.stored_ms);
    let selection = conditional::select(&parts.headers, stored.len, &etag, modified);
    let head = conditional::response_head(selection, stored.len, &etag, modified);
    let body = match selection.span(stored.len) {
        Some((offset, count)) if parts.method != Method::HEAD && count > 0 => {
            let opened = if shared.staging.keeps_replies() {
                shared
                    .staging
                    .get_reply(id, offset, count)
                    .await
                    .map(|reader| FileBody::from_reader(reader, count))
                    .map_err(|e| e.to_string())
            } else {
                mode.replies
                    .open_at(id, offset)
                    .await
                    .map(|file| FileBody::new(file, count))
                    .map_err(|e| e.to_string())
            };
            match opened {
                Ok(body) => Some(body),
                Err(error) => {
                    tracing::warn!(%error, session = %id, "cannot open a stored reply");
                    return plain(StatusCode::NOT_FOUND);
                }
            }
        }
        _ => None,
    };
    head.body(body)
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR))
}

fn id_hex(id: SessionId) -> String {
    id.to_string()
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect()
}
