//! HTTP Basic authentication in front of the BITS layer, in the way the Windows BITS client
//! expects it: a challenge first.
//!
//! ```text
//! cargo run --example basic_auth -- --user alice:secret [--user bob:hunter2]
//!     [--listen 127.0.0.1:8080] [--root ./uploads] [--status-token TOKEN]
//! ```
//!
//! Windows sends credentials only in answer to a `401` with a `WWW-Authenticate` header it
//! can answer, and only the credentials the job was given:
//!
//! ```text
//! bitsadmin /create /upload demo
//! bitsadmin /addfile demo http://HOST:8080/upload/demo.bin C:\demo.bin
//! bitsadmin /setcredentials demo SERVER BASIC alice secret
//! bitsadmin /resume demo
//! ```
//!
//! or `Start-BitsTransfer -TransferType Upload -Authentication Basic -Credential alice ...`.
//! From any OS:
//! `cargo run --example upload -- Cargo.toml http://127.0.0.1:8080/upload/Cargo.toml --user alice:secret`.
//!
//! The middleware ([`authenticate_bits`]) runs outside the [`BitsLayer`] and looks only at
//! BITS requests: every `BITS_POST` (Ping included, which is where Windows expects the
//! challenge) and the `GET`s of upload-reply URLs (below a `.bits` folder), which are served
//! to their owner only. Good credentials become an [`Owner`] in the request's extensions,
//! which the BITS layer records with the session: a session then answers its owner only.
//! Missing or wrong credentials get `401` with `WWW-Authenticate: Basic realm="..."`, before
//! any body is read. Every other request passes through untouched, so the app's own routes
//! keep their own rules: `/` is public, and `/status` checks a bearer token of its own.
//!
//! # Use TLS
//!
//! Basic sends the password with every packet, merely base64-encoded: over plain HTTP anyone
//! on the path reads it. Serve this over HTTPS only, in one of two ways:
//!
//! * Terminate TLS in a reverse proxy or load balancer that passes `BITS_POST` and every
//!   `BITS-*` header through unchanged and does not buffer request bodies, and set
//!   [`public_origin`](axum_bits::BitsLayerBuilder::public_origin) to the public
//!   `https://` origin, so that the URLs the layer hands out (reply URLs) point at the
//!   proxy rather than at the plain-HTTP address behind it. Bind this server to an address
//!   only the proxy reaches.
//! * Or serve TLS in this process with rustls (`tokio-rustls` around the accepted
//!   connections, as part C of `tests/client.rs` does) and tell the layer with
//!   [`https(true)`](axum_bits::BitsLayerBuilder::https) or `public_origin`.
//!
//! The user table here keeps SHA-256 digests of the passwords and compares them in constant
//! time. That is enough for an example: a real deployment keeps salted, slow hashes (argon2,
//! bcrypt) or asks its identity provider.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum_bits::protocol::is_bits_post;
use axum_bits::{BitsLayer, Owner};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::Parser;
use sha2::{Digest as _, Sha256};

/// The challenge of a `401`: Basic, in realm "BITS uploads", with UTF-8 credentials.
pub(crate) const CHALLENGE: &str = "Basic realm=\"BITS uploads\", charset=\"UTF-8\"";

/// A BITS upload server that asks for HTTP Basic credentials.
#[derive(Debug, Parser)]
struct Args {
    /// A user who may upload, `NAME:PASSWORD` (repeat for more users).
    #[arg(long = "user", value_name = "NAME:PASSWORD", required = true, value_parser = parse_user)]
    users: Vec<(String, String)>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Folder uploads land in (`BITS_POST /upload/a.bin` → ROOT/a.bin).
    #[arg(long, default_value = "./uploads")]
    root: PathBuf,
    /// The bearer token `GET /status` wants (the app's own authentication, which the Basic
    /// middleware leaves alone).
    #[arg(long, default_value = "status-token")]
    status_token: String,
}

fn parse_user(text: &str) -> Result<(String, String), String> {
    match text.split_once(':') {
        Some((name, password)) if !name.is_empty() => Ok((name.to_owned(), password.to_owned())),
        _ => Err(format!("{text:?} is not NAME:PASSWORD")),
    }
}

/// Who may upload: user names and the SHA-256 digests of their passwords.
#[derive(Debug, Default)]
pub(crate) struct Users {
    digests: HashMap<String, [u8; 32]>,
}

impl Users {
    /// Adds (or replaces) a user.
    pub(crate) fn add(&mut self, name: impl Into<String>, password: &str) {
        self.digests
            .insert(name.into(), digest(password.as_bytes()));
    }

    /// The owner an `Authorization` header proves, or `None` for a missing, malformed or
    /// wrong one.
    pub(crate) fn authenticate(&self, authorization: Option<&HeaderValue>) -> Option<Owner> {
        let (name, password) = basic_credentials(authorization?)?;
        let given = digest(password.as_bytes());
        // An unknown user costs the same comparison as a known one, so that response times
        // do not tell which user names exist.
        let (known, expected) = match self.digests.get(&name) {
            Some(expected) => (true, *expected),
            None => (false, digest(b"")),
        };
        (constant_time_eq(&given, &expected) && known).then(|| Owner::new(name))
    }
}

impl FromIterator<(String, String)> for Users {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let mut users = Self::default();
        for (name, password) in iter {
            users.add(name, &password);
        }
        users
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Equal digests, compared without stopping at the first difference.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// `Basic base64(name:password)` (RFC 7617), the scheme name in any case.
fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let (scheme, encoded) = value.to_str().ok()?.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = BASE64.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (name, password) = text.split_once(':')?;
    Some((name.to_owned(), password.to_owned()))
}

/// Whether the BITS layer will answer this request and so needs its owner: any `BITS_POST`,
/// and the download of an upload-reply (a `GET` or `HEAD` below a `.bits` folder).
fn is_for_bits(request: &Request) -> bool {
    let method = request.method();
    is_bits_post(method)
        || ((method == Method::GET || method == Method::HEAD)
            && request.uri().path().split('/').any(|part| part == ".bits"))
}

/// The middleware: BITS requests need good Basic credentials and carry their [`Owner`] on;
/// everything else passes through as it came.
pub(crate) async fn authenticate_bits(
    State(users): State<Arc<Users>>,
    mut request: Request,
    next: Next,
) -> Response {
    if !is_for_bits(&request) {
        return next.run(request).await;
    }
    match users.authenticate(request.headers().get(header::AUTHORIZATION)) {
        Some(owner) => {
            request.extensions_mut().insert(owner);
            next.run(request).await
        }
        None => challenge(),
    }
}

/// `401` with the challenge Windows answers with the job's credentials. No body is read:
/// a large fragment is refused before it is sent on.
fn challenge() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(CHALLENGE),
        )],
    )
        .into_response()
}

/// The app's own authentication for `/status`: a bearer token, nothing to do with BITS.
async fn require_status_token(
    State(token): State<Arc<str>>,
    request: Request,
    next: Next,
) -> Response {
    let expected = format!("Bearer {token}");
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    if given == Some(expected.as_bytes()) {
        next.run(request).await
    } else {
        StatusCode::FORBIDDEN.into_response()
    }
}

/// The app: its own routes, the BITS layer, and the Basic middleware outside the layer.
pub(crate) fn app(bits: BitsLayer, users: Users, status_token: &str) -> Router {
    let token: Arc<str> = Arc::from(status_token);
    Router::new()
        .route("/", get(|| async { "public: anyone may read this\n" }))
        .route(
            "/status",
            get(|| async { "ok\n" })
                .route_layer(middleware::from_fn_with_state(token, require_status_token)),
        )
        // Layers run outside-in: the credentials are checked first, so the BITS layer sees
        // the Owner.
        .layer(bits)
        .layer(middleware::from_fn_with_state(
            Arc::new(users),
            authenticate_bits,
        ))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt::init();
    let args = Args::parse();
    let bits = BitsLayer::builder(&args.root)
        .prefix("/upload")
        .session_timeout(Duration::from_secs(24 * 3600))
        .build()?;
    tokio::spawn(bits.sweeper().run());
    let users: Users = args.users.into_iter().collect();
    let app = app(bits, users, &args.status_token);

    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!(
        "BITS uploads to http://{}/upload/... need Basic credentials; they land in {}",
        listener.local_addr()?,
        args.root.display()
    );
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(value: &str) -> HeaderValue {
        HeaderValue::from_str(value).unwrap()
    }

    fn basic(credentials: &str) -> HeaderValue {
        header(&format!("Basic {}", BASE64.encode(credentials)))
    }

    #[test]
    fn only_the_right_password_names_the_owner() {
        let users: Users = [("alice".to_owned(), "se:cret".to_owned())]
            .into_iter()
            .collect();
        let owner = users.authenticate(Some(&basic("alice:se:cret")));
        assert_eq!(owner.as_ref().map(Owner::as_str), Some("alice"));
        let lower = header(&format!("basic {}", BASE64.encode("alice:se:cret")));
        assert!(users.authenticate(Some(&lower)).is_some());
        for wrong in ["alice:secret", "alice:", "bob:se:cret", ":se:cret", "alice"] {
            assert!(users.authenticate(Some(&basic(wrong))).is_none(), "{wrong}");
        }
        assert!(users.authenticate(None).is_none());
        assert!(users.authenticate(Some(&header("Bearer abc"))).is_none());
        assert!(users.authenticate(Some(&header("Basic !!!"))).is_none());
    }

    #[test]
    fn user_arguments() {
        assert_eq!(parse_user("a:b:c"), Ok(("a".to_owned(), "b:c".to_owned())));
        assert!(parse_user("nobody").is_err());
        assert!(parse_user(":pw").is_err());
    }
}
