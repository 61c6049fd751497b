//! Mounting the BITS layer into an existing axum app: uploads only under `/upload`, an
//! authentication middleware that names the session owner, and the app's own routes untouched.
//!
//! ```text
//! cargo run --example mount
//! ```
//! Then upload from Windows with
//! `bitsadmin /transfer demo /upload http://HOST:8080/upload/demo.bin C:\demo.bin`
//! (the example accepts everyone as user "demo" unless an `X-User` header says otherwise).
//! `examples/basic_auth.rs` shows real authentication, with the challenge Windows needs.

use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum_bits::{BitsLayer, Owner};

/// Stand-in for real authentication: whoever the request says it is.
async fn authenticate(mut request: Request, next: Next) -> Response {
    let user = request
        .headers()
        .get("x-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("demo")
        .to_owned();
    request.extensions_mut().insert(Owner::new(user));
    next.run(request).await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt::init();
    let root = std::env::temp_dir().join("axum-bits-mount-example");
    let bits = BitsLayer::builder(&root)
        .prefix("/upload")
        .max_upload_size(1 << 30)
        .session_timeout(Duration::from_secs(24 * 3600))
        .build()?;
    tokio::spawn(bits.sweeper().run());

    let app = Router::new()
        .route("/", get(|| async { "the app's own routes keep working" }))
        .route("/health", get(|| async { "ok" }))
        // Layers run outside-in: authentication first, so the BITS layer sees the Owner.
        .layer(bits)
        .layer(middleware::from_fn(authenticate));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    println!(
        "uploads under http://{}/upload/ land in {}",
        listener.local_addr()?,
        root.display()
    );
    axum::serve(listener, app).await?;
    Ok(())
}
