//! A layer configured from a TOML file, over a real socket.

mod common;

use axum_bits::Settings;
use common::{TestServer, data};

const TOO_LARGE: &str = "0x80200020";

#[tokio::test]
async fn max_upload_size_from_a_file_refuses_a_larger_upload() {
    let settings = Settings::from_toml_str(
        r#"
        # A small limit, in a humane size.
        max_upload_size = "64KiB"
        allow_overwrites = true
        "#,
    )
    .expect("settings");
    let server = TestServer::start(|builder| settings.apply(builder)).await;
    let client = server.client();

    // One byte over the limit: the first Fragment announcing it is refused as too large.
    let sid = client.create_ok("/big.bin").await;
    let reply = client
        .fragment("/big.bin", &sid, 0, &data(4096, 1), (64 << 10) + 1)
        .await;
    reply.assert_error(500, TOO_LARGE);
    assert!(!server.root.join("big.bin").exists());

    // At the limit, the upload lands; and the file's allow_overwrites lets it land again.
    let bytes = data(64 << 10, 2);
    for _ in 0..2 {
        client.upload("/ok.bin", &bytes, 16 << 10).await;
        assert_eq!(
            std::fs::read(server.root.join("ok.bin")).expect("file"),
            bytes
        );
    }
    server.stop().await;
}
