//! The admin API as an axum router: JSON, and the status page.

use std::time::Duration;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{StatusCode, header};
use serde::Serialize;

use super::{AdminError, SessionQuery, SessionState, page};
use crate::BitsHandle;
use crate::session::SessionId;
use crate::store::StoreError;

/// The admin API and the live status page, for the application to mount (with
/// `Router::nest`) **behind its own authentication**; the crate never mounts it.
///
/// | request | answer |
/// |---|---|
/// | `GET /` | the status page (HTML; refreshes itself every 5 s) |
/// | `GET /overview` | what the page shows, as JSON ([`Overview`](super::Overview)) |
/// | `GET /sessions?state=&owner=&idle_longer_than=&destination_prefix=&cursor=&limit=` | a page of sessions ([`SessionPage`](super::SessionPage)); `idle_longer_than` in seconds, `state` one of `receiving`, `complete`, `deferred`, `closed`, `cancelled` |
/// | `GET /sessions/{id}` | one session ([`SessionInfo`](super::SessionInfo)), or 404 |
/// | `DELETE /sessions/{id}` or `POST /sessions/{id}/cancel` | cancels it: `{"cancelled":true}`, or 404 if no such open session |
/// | `POST /sweep` | runs a sweep now: the [`SweepReport`](crate::SweepReport) |
/// | `GET /recent` | the sessions this node ended lately |
///
/// Errors are JSON `{"error": "..."}`: 400 for a bad query, 500 when the store fails, 503
/// while another node holds the session.
///
/// ```
/// # fn run(root: &std::path::Path) -> Result<(), axum_bits::ConfigError> {
/// use axum::{Router, middleware};
/// use axum_bits::BitsLayer;
///
/// let bits = BitsLayer::builder(root).build()?;
/// let admin = axum_bits::admin::router(bits.handle())
///     // Your authentication, e.g. a bearer token check, wraps the admin router only.
///     .layer(middleware::from_fn(|request, next: middleware::Next| async move {
///         // ... check request's Authorization, else return 401 ...
///         next.run(request).await
///     }));
/// let app: Router = Router::new().nest("/admin", admin).layer(bits);
/// # Ok(()) }
/// ```
pub fn router<S>(handle: BitsHandle) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/", get(status_page))
        .route("/overview", get(overview))
        .route("/sessions", get(sessions))
        .route("/sessions/{id}", get(session).delete(cancel))
        .route("/sessions/{id}/cancel", post(cancel))
        .route("/sweep", post(sweep))
        .route("/recent", get(recent))
        .with_state(handle)
}

/// A JSON answer.
fn json(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => (
            status,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(error) => fail(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

fn fail(status: StatusCode, error: &str) -> Response {
    let body = serde_json::to_string(&ErrorBody { error }).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn store_failed(error: &StoreError) -> Response {
    tracing::warn!(%error, "admin request: the session store failed");
    fail(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string())
}

async fn status_page(State(handle): State<BitsHandle>) -> Response {
    match handle.overview().await {
        Ok(overview) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
                // Nothing on the page runs script or loads anything from elsewhere.
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
                ),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            page::render(&overview),
        )
            .into_response(),
        Err(error) => store_failed(&error),
    }
}

async fn overview(State(handle): State<BitsHandle>) -> Response {
    match handle.overview().await {
        Ok(overview) => json(StatusCode::OK, &overview),
        Err(error) => store_failed(&error),
    }
}

/// Parses the listing's query string.
fn parse_query(raw: Option<&str>) -> Result<SessionQuery, String> {
    let mut query = SessionQuery::new();
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = decode(value)?;
        match key {
            "state" => {
                query.state = Some(
                    SessionState::parse(&value)
                        .ok_or_else(|| format!("unknown state {value:?}"))?,
                );
            }
            "owner" => query.owner = Some(value),
            "idle_longer_than" => {
                let seconds: u64 = value
                    .parse()
                    .map_err(|_| "idle_longer_than is a number of seconds".to_owned())?;
                query.idle_longer_than = Some(Duration::from_secs(seconds));
            }
            "destination_prefix" => query.destination_prefix = Some(value),
            "cursor" if super::is_cursor(&value) => query.cursor = Some(value),
            "cursor" => return Err("the cursor is not one a page handed out".to_owned()),
            "limit" => {
                query.limit = Some(value.parse().map_err(|_| "limit is a number".to_owned())?);
            }
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    Ok(query)
}

/// Decodes a form-encoded query value (`+` is a space).
fn decode(value: &str) -> Result<String, String> {
    let plus = value.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| "a query value is not UTF-8".to_owned())
}

async fn sessions(State(handle): State<BitsHandle>, RawQuery(raw): RawQuery) -> Response {
    let query = match parse_query(raw.as_deref()) {
        Ok(query) => query,
        Err(error) => return fail(StatusCode::BAD_REQUEST, &error),
    };
    match handle.sessions(&query).await {
        Ok(page) => json(StatusCode::OK, &page),
        Err(error) => store_failed(&error),
    }
}

async fn session(State(handle): State<BitsHandle>, Path(id): Path<String>) -> Response {
    let Some(id) = SessionId::parse(&id) else {
        return fail(StatusCode::NOT_FOUND, "no such session");
    };
    match handle.session(id).await {
        Ok(Some(info)) => json(StatusCode::OK, &info),
        Ok(None) => fail(StatusCode::NOT_FOUND, "no such session"),
        Err(error) => store_failed(&error),
    }
}

#[derive(Serialize)]
struct Cancelled {
    cancelled: bool,
}

async fn cancel(State(handle): State<BitsHandle>, Path(id): Path<String>) -> Response {
    let Some(id) = SessionId::parse(&id) else {
        return fail(StatusCode::NOT_FOUND, "no such open session");
    };
    match handle.cancel_session(id).await {
        Ok(true) => json(StatusCode::OK, &Cancelled { cancelled: true }),
        Ok(false) => fail(StatusCode::NOT_FOUND, "no such open session"),
        Err(AdminError::Busy) => fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "another node is working on the session; try again",
        ),
        Err(error) => {
            tracing::warn!(%error, session = %id, "admin cancel failed");
            fail(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string())
        }
    }
}

async fn sweep(State(handle): State<BitsHandle>) -> Response {
    match handle.sweep_now().await {
        Ok(report) => json(StatusCode::OK, &report),
        Err(error) => store_failed(&error),
    }
}

async fn recent(State(handle): State<BitsHandle>) -> Response {
    json(StatusCode::OK, &handle.recently_ended())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_filter() {
        let q = parse_query(Some(
            "state=receiving&owner=a+b%2Fc&idle_longer_than=60&destination_prefix=dir%2F&cursor=17-6f1c2a3e-0b4d-4c5e-8f70-1a2b3c4d5e6f&limit=5",
        ))
        .unwrap();
        assert_eq!(q.state, Some(SessionState::Receiving));
        assert_eq!(q.owner.as_deref(), Some("a b/c"));
        assert_eq!(q.idle_longer_than, Some(Duration::from_secs(60)));
        assert_eq!(q.destination_prefix.as_deref(), Some("dir/"));
        assert_eq!(
            q.cursor.as_deref(),
            Some("17-6f1c2a3e-0b4d-4c5e-8f70-1a2b3c4d5e6f")
        );
        assert_eq!(q.limit, Some(5));
        assert_eq!(parse_query(None).unwrap(), SessionQuery::new());
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        assert!(parse_query(Some("state=gone")).is_err());
        assert!(parse_query(Some("idle_longer_than=1h")).is_err());
        assert!(parse_query(Some("limit=-1")).is_err());
        assert!(parse_query(Some("colour=red")).is_err());
        assert!(parse_query(Some("cursor=x")).is_err());
        assert!(parse_query(Some("owner=%FF")).is_err());
    }
}
