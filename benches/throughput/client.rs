//! The HTTP clients of (a), (b) and (d): reqwest, one client (so one kept-alive connection)
//! per stream, every body a `Bytes` slice of the payload; (e) sends its BITS packets one by
//! one. The paced clients of (c) are in `paced.rs`.

use std::time::Instant;

use axum::http::{HeaderMap, HeaderValue};
use bytes::Bytes;

use crate::scenario::{Scenario, Workload, stream_file};
use crate::servers::FSYNC_HEADER;
use crate::{Error, PROTOCOL};

/// Runs the streams of `work` at once; returns the wall time and the longest "final" time.
pub(crate) async fn run_streams(
    scenario: Scenario,
    port: u16,
    work: &Workload,
) -> Result<(f64, Option<f64>), Error> {
    let clients = (0..work.streams)
        .map(|_| reqwest::Client::builder().no_proxy().build())
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (stream, client) in clients.into_iter().enumerate() {
        let url = format!("http://127.0.0.1:{port}/{}", stream_file(stream));
        let (fragment, n) = (work.fragment.clone(), work.per_stream);
        tasks.spawn(async move {
            match scenario {
                Scenario::Bits | Scenario::BitsNoCommitSync => {
                    upload_bits(&client, &url, &fragment, n).await.map(Some)
                }
                Scenario::Baseline => upload_baseline(&client, &url, &fragment, n, false)
                    .await
                    .map(|()| None),
                Scenario::BaselineFsync => upload_baseline(&client, &url, &fragment, n, true)
                    .await
                    .map(|()| None),
            }
        });
    }
    let mut longest_final: Option<f64> = None;
    while let Some(joined) = tasks.join_next().await {
        let final_secs = joined.map_err(|e| format!("upload task: {e}"))??;
        longest_final = match (longest_final, final_secs) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    Ok((started.elapsed().as_secs_f64(), longest_final))
}

/// Create-Session, `n` fragments, Close-Session. Returns the time from the start of the last
/// Fragment to the Close-Session Ack.
async fn upload_bits(
    client: &reqwest::Client,
    url: &str,
    fragment: &Bytes,
    n: u64,
) -> Result<f64, Error> {
    let total = fragment.len() as u64 * n;
    let session = create_session(client, url).await?;
    let mut offset = 0u64;
    let mut last_fragment = Instant::now();
    while offset < total {
        last_fragment = Instant::now();
        offset = send_fragment(client, url, &session, fragment, offset, total).await?;
    }
    close_session(client, url, session).await?;
    Ok(last_fragment.elapsed().as_secs_f64())
}

fn bits_post() -> Result<reqwest::Method, Error> {
    Ok(reqwest::Method::from_bytes(b"BITS_POST")?)
}

/// Create-Session; returns the session id.
pub(crate) async fn create_session(
    client: &reqwest::Client,
    url: &str,
) -> Result<HeaderValue, Error> {
    let reply = client
        .request(bits_post()?, url)
        .header("BITS-Packet-Type", "Create-Session")
        .header("BITS-Supported-Protocols", PROTOCOL)
        .send()
        .await?;
    let reply = expect_ok(reply, "Create-Session").await?;
    Ok(reply
        .headers()
        .get("BITS-Session-Id")
        .ok_or("no BITS-Session-Id on the Create-Session Ack")?
        .clone())
}

/// One Fragment of `fragment`'s bytes at `offset` of a `total`-byte upload; checks the Ack's
/// `BITS-Received-Content-Range` and returns it (the next offset).
pub(crate) async fn send_fragment(
    client: &reqwest::Client,
    url: &str,
    session: &HeaderValue,
    fragment: &Bytes,
    offset: u64,
    total: u64,
) -> Result<u64, Error> {
    let end = offset + fragment.len() as u64;
    let reply = client
        .request(bits_post()?, url)
        .header("BITS-Packet-Type", "Fragment")
        .header("BITS-Session-Id", session.clone())
        .header(
            "Content-Range",
            format!("bytes {offset}-{}/{total}", end - 1),
        )
        .body(fragment.clone())
        .send()
        .await?;
    let reply = expect_ok(reply, "Fragment").await?;
    let received = received_range(reply.headers());
    if received != Some(end) {
        return Err(format!("fragment ending at {end}: server reports {received:?}").into());
    }
    Ok(end)
}

/// Close-Session.
pub(crate) async fn close_session(
    client: &reqwest::Client,
    url: &str,
    session: HeaderValue,
) -> Result<(), Error> {
    let reply = client
        .request(bits_post()?, url)
        .header("BITS-Packet-Type", "Close-Session")
        .header("BITS-Session-Id", session)
        .send()
        .await?;
    expect_ok(reply, "Close-Session").await?;
    Ok(())
}

/// The same POSTs to the baseline handler, appending to one file.
async fn upload_baseline(
    client: &reqwest::Client,
    url: &str,
    fragment: &Bytes,
    n: u64,
    fsync_at_end: bool,
) -> Result<(), Error> {
    for i in 1..=n {
        let mut request = client.post(url).body(fragment.clone());
        if fsync_at_end && i == n {
            request = request.header(FSYNC_HEADER, "1");
        }
        expect_ok(request.send().await?, "POST").await?;
    }
    Ok(())
}

/// Fails on a non-200 reply; drains the (empty) body so the connection is reused.
async fn expect_ok(reply: reqwest::Response, what: &str) -> Result<reqwest::Response, Error> {
    if reply.status() != reqwest::StatusCode::OK {
        let status = reply.status();
        let headers = format!("{:?}", reply.headers());
        let body = reply.text().await.unwrap_or_default();
        return Err(format!("{what}: {status} {headers} {body}").into());
    }
    Ok(reply)
}

/// `BITS-Received-Content-Range` of a Fragment Ack.
pub(crate) fn received_range(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("BITS-Received-Content-Range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}
