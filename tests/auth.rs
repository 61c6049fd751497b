#![cfg(feature = "client")]
//! `examples/basic_auth.rs` over a real socket on 127.0.0.1: HTTP Basic in front of the BITS
//! layer, challenged as Windows expects, with the crate's own client on the other end.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum_bits::BitsLayer;
use axum_bits::client::{BitsClient, Error, UploadSource};
use axum_bits::hooks::{Event, Hooks, Veto};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

#[path = "../examples/basic_auth.rs"]
#[allow(dead_code)]
mod basic_auth;

use basic_auth::{CHALLENGE, Users};

const STATUS_TOKEN: &str = "t0ken";

/// Records every session created, with its owner.
#[derive(Clone, Default)]
struct Owners(Arc<Mutex<Vec<Event>>>);

impl Hooks for Owners {
    async fn on_create(&self, event: &Event) -> Result<(), Veto> {
        self.0.lock().unwrap().push(event.clone());
        Ok(())
    }
}

impl Owners {
    /// (destination, owner) of every session created.
    fn created(&self) -> Vec<(String, Option<String>)> {
        let events = self.0.lock().unwrap();
        events
            .iter()
            .map(|e| {
                let owner = e.owner.as_ref().map(|o| o.as_str().to_owned());
                (e.destination.clone(), owner)
            })
            .collect()
    }
}

struct Server {
    addr: std::net::SocketAddr,
    root: tempfile::TempDir,
    owners: Owners,
}

impl Server {
    /// The example's app, with users alice (password "secret") and bob ("hunter2").
    async fn start() -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        let owners = Owners::default();
        let bits = BitsLayer::builder(root.path())
            .prefix("/upload")
            .hooks(owners.clone())
            .build()
            .expect("layer");
        let mut users = Users::default();
        users.add("alice", "secret");
        users.add("bob", "hunter2");
        let app = basic_auth::app(bits, users, STATUS_TOKEN);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, root, owners }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// One raw HTTP/1.1 request (`Connection: close`): the status line and the headers of
    /// the answer, lower-cased names.
    async fn raw(&self, head: &str, body: &[u8]) -> (String, Vec<(String, String)>) {
        let mut stream = TcpStream::connect(self.addr).await.expect("connect");
        let request = format!(
            "{head}\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        // A server that refuses the packet need not read the body: a failed write is fine.
        let _ = stream.write_all(body).await;
        let mut answer = Vec::new();
        // The server may close without reading an unwanted body: keep what arrived.
        let _ = stream.read_to_end(&mut answer).await;
        let text = String::from_utf8_lossy(&answer);
        let head = text.split("\r\n\r\n").next().unwrap_or_default();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or_default().to_owned();
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        (status, headers)
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn client(credentials: Option<(&str, &str)>) -> BitsClient {
    let mut builder = BitsClient::builder()
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .no_progress_timeout(Duration::from_secs(5))
        .no_proxy();
    if let Some((user, password)) = credentials {
        builder = builder.basic_auth(user, password);
    }
    builder.build().expect("client")
}

async fn within<T>(test: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), test)
        .await
        .expect("the test did not finish within 20 s")
}

#[tokio::test]
async fn the_right_credentials_upload_and_name_the_owner() {
    within(async {
        let server = Server::start().await;
        let bytes: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let uploaded = client(Some(("alice", "secret")))
            .upload(
                server.url("/upload/report.bin"),
                UploadSource::bytes(bytes.clone()),
            )
            .fragment_size(16 * 1024)
            .await
            .expect("upload with the right password");
        assert_eq!(uploaded.bytes, 50_000);
        assert_eq!(uploaded.retries, 0, "{uploaded:?}");
        let landed = std::fs::read(server.root.path().join("report.bin")).expect("file");
        assert!(landed == bytes, "the file differs");
        assert_eq!(
            server.owners.created(),
            [("report.bin".to_owned(), Some("alice".to_owned()))]
        );
    })
    .await;
}

#[tokio::test]
async fn no_credentials_and_a_wrong_password_are_told_apart() {
    within(async {
        let server = Server::start().await;
        let upload = |credentials| {
            client(credentials).upload(
                server.url("/upload/nope.bin"),
                UploadSource::bytes(vec![1u8; 10_000]),
            )
        };

        let none = upload(None).await.expect_err("no credentials");
        let wrong = upload(Some(("alice", "guess")))
            .await
            .expect_err("wrong password");
        let unknown = upload(Some(("mallory", "secret")))
            .await
            .expect_err("unknown user");
        for error in [&none, &wrong, &unknown] {
            let Error::Server(e) = error else {
                panic!("not a server error: {error:?}");
            };
            assert_eq!(e.status(), 401, "{error}");
            assert!(!e.is_ack(), "{error}");
            assert!(!e.is_transient(), "{error}");
        }
        let (none, wrong, unknown) = (none.to_string(), wrong.to_string(), unknown.to_string());
        assert!(none.contains("none were sent"), "{none}");
        assert!(!none.contains("refused the credentials"), "{none}");
        for refused in [&wrong, &unknown] {
            assert!(refused.contains("refused the credentials"), "{refused}");
            assert!(refused.contains("user name and password"), "{refused}");
            assert!(!refused.contains("none were sent"), "{refused}");
        }
        // Nothing got as far as a session.
        assert!(server.owners.created().is_empty());
        assert!(!server.root.path().join("nope.bin").exists());
    })
    .await;
}

#[tokio::test]
async fn unauthenticated_bits_packets_get_a_basic_challenge() {
    within(async {
        let server = Server::start().await;
        for authorization in ["", "Authorization: Basic YWxpY2U6Z3Vlc3M=\r\n"] {
            let (status, headers) = server
                .raw(
                    &format!(
                        "BITS_POST /upload/x.bin HTTP/1.1\r\n{authorization}BITS-Packet-Type: Ping"
                    ),
                    b"",
                )
                .await;
            assert!(status.starts_with("HTTP/1.1 401"), "{status}");
            assert_eq!(header(&headers, "www-authenticate"), Some(CHALLENGE));
            assert!(CHALLENGE.starts_with("Basic realm=\""));
        }
        // A Fragment is refused without the BITS layer reading its body.
        let (status, headers) = server
            .raw(
                "BITS_POST /upload/x.bin HTTP/1.1\r\nBITS-Packet-Type: Fragment\r\n\
                 BITS-Session-Id: {00000000-0000-0000-0000-000000000000}\r\n\
                 Content-Range: bytes 0-65535/65536",
                &[0u8; 65_536],
            )
            .await;
        assert!(status.starts_with("HTTP/1.1 401"), "{status}");
        assert_eq!(header(&headers, "www-authenticate"), Some(CHALLENGE));
        // Answered with the right credentials, the same Ping is a BITS Ack.
        let (status, headers) = server
            .raw(
                "BITS_POST /upload/x.bin HTTP/1.1\r\n\
                 Authorization: Basic Ym9iOmh1bnRlcjI=\r\nBITS-Packet-Type: Ping",
                b"",
            )
            .await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert_eq!(header(&headers, "bits-packet-type"), Some("Ack"));
    })
    .await;
}

#[tokio::test]
async fn the_apps_own_routes_keep_their_own_rules() {
    within(async {
        let server = Server::start().await;
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let get = |path: &str, authorization: Option<&str>| {
            let mut request = http.get(server.url(path));
            if let Some(value) = authorization {
                request = request.header("Authorization", value);
            }
            async move { request.send().await.expect("GET").status().as_u16() }
        };
        // Public, with or without credentials.
        assert_eq!(get("/", None).await, 200);
        assert_eq!(get("/", Some("Basic bm9ib2R5Om5vcGU=")).await, 200);
        // Its own bearer token, which the Basic middleware neither wants nor rejects.
        assert_eq!(get("/status", None).await, 403);
        assert_eq!(get("/status", Some("Basic YWxpY2U6c2VjcmV0")).await, 403);
        let bearer = format!("Bearer {STATUS_TOKEN}");
        assert_eq!(get("/status", Some(&bearer)).await, 200);
    })
    .await;
}
