//! An upload-reply server with an in-process completion handler: every finished upload is
//! answered with the SHA-256 of its bytes, which the client downloads as its reply.
//!
//! ```text
//! cargo run --example upload_reply -- [--listen 127.0.0.1:8080] [--root ./uploads]
//! ```
//!
//! On Windows: `bitsadmin /create /upload job`, `bitsadmin /setreplyfilename ...`, or
//! `Start-BitsTransfer -TransferType UploadReply`; the reply file then holds the hex digest.
//! Nothing is written to the destination: the handler does not ask for a copy.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::Router;
use axum_bits::BitsLayer;
use axum_bits::completion::{CompletedUpload, Completion, CompletionError, Reply};
use clap::Parser;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Folder for the server's own state (staged uploads and replies live in ROOT/.bits).
    #[arg(long, default_value = "./uploads")]
    root: PathBuf,
}

/// Hashes the staged upload without reading it into memory at once.
async fn digest(upload: CompletedUpload) -> Result<Completion, CompletionError> {
    let mut file = tokio::fs::File::open(&upload.staged_path)
        .await
        .map_err(CompletionError::failed)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 16];
    loop {
        let n = file.read(&mut buf).await.map_err(CompletionError::failed)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    tracing::info!(url = %upload.url, size = upload.size, sha256 = %hex, "upload hashed");
    Ok(Completion::reply(Reply::Bytes(format!("{hex}\n").into())))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    std::fs::create_dir_all(&args.root)?;
    let bits = BitsLayer::builder(&args.root)
        .upload_reply_handler(digest)
        .build()?;
    tokio::spawn(bits.sweeper().run());
    let app = Router::new().layer(bits);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "upload-reply server ready");
    axum::serve(listener, app).await?;
    Ok(())
}
