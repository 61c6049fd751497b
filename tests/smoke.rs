//! The happy path over a real socket, as a first check that the harness and server agree.

mod common;

use common::{TestServer, data};

#[tokio::test]
async fn three_fragment_upload_lands_byte_identical() {
    let server = TestServer::start(|b| b).await;
    let client = server.client();
    client.ping("/inbox/report.bin").await.assert_ok();
    std::fs::create_dir(server.root.join("inbox")).unwrap();
    let bytes = data(10_000, 1);
    client.upload("/inbox/report.bin", &bytes, 4096).await;
    assert_eq!(
        std::fs::read(server.root.join("inbox/report.bin")).unwrap(),
        bytes
    );
    assert!(common::parts(&server.root).is_empty());
    server.stop().await;
}
