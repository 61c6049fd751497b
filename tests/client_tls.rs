#![cfg(feature = "client")]
//! The BITS upload client over HTTPS, against this crate's server behind TLS (rustls with a
//! throw-away self-signed certificate for 127.0.0.1), over real sockets: BITS servers on the
//! internet (IIS among them) are reached over HTTPS, and nothing else exercises the client's
//! certificate options end to end.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum_bits::client::{BitsClient, BitsClientBuilder, Error, UploadSource};
use axum_bits::completion::{CompletedUpload, Completion, CompletionError, Reply};
use axum_bits::{BitsLayer, BitsLayerBuilder};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// This crate's server behind TLS on an ephemeral port of 127.0.0.1.
struct TlsServer {
    addr: SocketAddr,
    root: PathBuf,
    /// The server's certificate, PEM: the one root a client must trust.
    cert_pem: String,
    _tmp: tempfile::TempDir,
    _accept: tokio::task::JoinHandle<()>,
}

impl TlsServer {
    async fn start(configure: impl FnOnce(BitsLayerBuilder) -> BitsLayerBuilder) -> Self {
        let certified =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("certificate");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .expect("server config");
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let tmp = tempfile::tempdir().expect("tempdir");
        let layer = configure(BitsLayer::builder(tmp.path()))
            .build()
            .expect("layer");
        let app = Router::new().layer(layer);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    // A client that refuses the certificate ends the handshake: not an error here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                        .await;
                });
            }
        });
        Self {
            addr,
            root: tmp.path().to_path_buf(),
            cert_pem: certified.cert.pem(),
            _tmp: tmp,
            _accept: accept,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }
}

fn builder() -> BitsClientBuilder {
    BitsClient::builder()
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .no_progress_timeout(Duration::from_secs(3))
        .request_timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(2))
        .no_proxy()
}

fn bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// Uploads `len` bytes to `/name` in 32 KiB fragments and checks the file arrived.
async fn upload_checked(client: &BitsClient, server: &TlsServer, name: &str, len: usize) {
    let data = bytes(len);
    let uploaded = client
        .upload(
            server.url(&format!("/{name}")),
            UploadSource::bytes(data.clone()),
        )
        .fragment_size(32 * 1024)
        .await
        .unwrap_or_else(|e| panic!("uploading {name}: {e}"));
    assert_eq!(uploaded.bytes, len as u64);
    assert!(
        std::fs::read(server.root.join(name)).unwrap() == data,
        "{name} differs"
    );
}

async fn within<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), test)
        .await
        .expect("the test did not finish within 20 s")
}

#[tokio::test]
async fn uploads_over_https_to_a_server_whose_certificate_is_trusted() {
    within(async {
        let server = TlsServer::start(|b| b).await;
        let client = builder()
            .add_root_certificate_pem(server.cert_pem.clone())
            .build()
            .expect("client");
        client.ping(&server.url("/")).await.expect("ping");
        upload_checked(&client, &server, "secure.bin", 300_000).await;
    })
    .await;
}

#[tokio::test]
async fn an_untrusted_certificate_fails_the_upload_and_no_file_appears() {
    within(async {
        let server = TlsServer::start(|b| b).await;
        // A long no-progress timeout: a refused certificate must not be retried until then.
        let client = builder()
            .no_progress_timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let started = std::time::Instant::now();
        let error = client
            .upload(
                server.url("/untrusted.bin"),
                UploadSource::bytes(bytes(1000)),
            )
            .await
            .expect_err("a self-signed certificate is not trusted by default");
        assert!(matches!(error, Error::Transport { .. }), "{error:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "retried: {error:?}"
        );
        let text = format!("{error}");
        assert!(text.to_lowercase().contains("certificate"), "{text}");
        assert!(!server.root.join("untrusted.bin").exists());
    })
    .await;
}

#[tokio::test]
async fn accepting_invalid_certificates_is_an_explicit_opt_in() {
    within(async {
        let server = TlsServer::start(|b| b).await;
        let client = builder()
            .danger_accept_invalid_certs(true)
            .build()
            .expect("client");
        upload_checked(&client, &server, "anyway.bin", 10_000).await;
    })
    .await;
}

/// Replies with the upload's length in decimal.
async fn length(upload: CompletedUpload) -> Result<Completion, CompletionError> {
    let reply = upload.size.to_string().into_bytes();
    Ok(Completion::reply(Reply::Bytes(reply.into())))
}

#[tokio::test]
async fn an_upload_reply_job_fetches_its_reply_over_https() {
    within(async {
        let server = TlsServer::start(|b| b.completion_handler(length).https(true)).await;
        let client = builder()
            .add_root_certificate_pem(server.cert_pem.clone())
            .build()
            .expect("client");
        let uploaded = client
            .upload(server.url("/job.bin"), UploadSource::bytes(bytes(70_000)))
            .fragment_size(32 * 1024)
            .reply_in_memory(1024)
            .await
            .expect("upload-reply over https");
        let url = uploaded.reply_url.expect("a reply URL");
        assert_eq!(url.scheme(), "https", "{url}");
        let reply = uploaded.reply.expect("a reply");
        assert_eq!(reply.body.as_deref(), Some(&b"70000"[..]));
    })
    .await;
}

/// A farm node's `BITS-Host-Id` name that its certificate does not cover: the client goes back
/// to the original URL at once instead of waiting out the fallback timeout, and the upload
/// completes there.
#[tokio::test]
async fn a_host_id_whose_certificate_is_refused_falls_back_to_the_original_url() {
    within(async {
        let server = TlsServer::start(|b| {
            b.host_id("localhost")
                .host_id_fallback_timeout(Duration::from_secs(600))
        })
        .await;
        let client = builder()
            .add_root_certificate_pem(server.cert_pem.clone())
            .no_progress_timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        upload_checked(&client, &server, "farm.bin", 100_000).await;
    })
    .await;
}
