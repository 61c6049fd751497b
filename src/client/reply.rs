//! Upload-reply: fetching the reply named by `BITS-Reply-URL`, resumably, with `Range`.

use std::path::PathBuf;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, StatusCode, header};
use reqwest::Url;
use tokio::io::{AsyncSeekExt as _, AsyncWriteExt as _};

use super::policy::{self, RetryDelay};
use super::progress::{Tracker, UploadPhase};
use super::{BitsClient, Error, ServerError, TransportError, is_certificate_error};

const PACKET: &str = "reply download";
/// Redirects followed per attempt (a BITS download job follows them silently).
const MAX_REDIRECTS: usize = 10;

/// The reply of an upload-reply job, as downloaded from `BITS-Reply-URL` (what the server's
/// application answered with a [`completion::Reply`](crate::completion::Reply)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DownloadedReply {
    /// Where it was downloaded from (the `BITS-Reply-URL`, resolved).
    pub url: Url,
    /// Its size.
    pub len: u64,
    /// The reply itself, when it was kept in memory.
    pub body: Option<Bytes>,
    /// The file it was written to, when it went to a file.
    pub path: Option<PathBuf>,
}

/// Where a reply goes.
#[derive(Debug, Clone)]
pub(crate) enum ReplyTarget {
    Memory { limit: u64 },
    File(PathBuf),
}

/// Resolves a `BITS-Reply-URL` as the Windows client does: against the job's original URL
/// (not the `BITS-Host-Id` host), with IIS's backslashes read as slashes.
pub(crate) fn resolve(original: &Url, raw: &str) -> Result<Url, Error> {
    let url = original
        .join(&raw.replace('\\', "/"))
        .map_err(|e| Error::InvalidResponse {
            packet: "Fragment",
            status: StatusCode::OK,
            reason: format!("BITS-Reply-URL {raw:?} is not a URL: {e}"),
        })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::InvalidResponse {
            packet: "Fragment",
            status: StatusCode::OK,
            reason: format!("BITS-Reply-URL {raw:?} is not an http(s) URL"),
        });
    }
    Ok(url)
}

/// A response's `Content-Range`.
#[derive(Debug, PartialEq, Eq)]
struct ContentRange {
    /// First and last byte, inclusive; `None` for `bytes */total`.
    range: Option<(u64, u64)>,
    /// `None` for `*`.
    total: Option<u64>,
}

/// `Content-Range: bytes first-last/total` (total may be `*`), or `bytes */total`.
fn content_range(value: &HeaderValue) -> Option<ContentRange> {
    let value = value.to_str().ok()?.trim();
    let (unit, rest) = value.split_once(' ')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let (range, total) = rest.trim().split_once('/')?;
    let total = match total {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let range = match range {
        "*" => None,
        r => {
            let (first, last) = r.split_once('-')?;
            let (first, last): (u64, u64) = (first.parse().ok()?, last.parse().ok()?);
            (first <= last && total.is_none_or(|t| last < t)).then_some((first, last))?;
            Some((first, last))
        }
    };
    Some(ContentRange { range, total })
}

enum Sink {
    Memory {
        buf: BytesMut,
        limit: u64,
    },
    File {
        path: PathBuf,
        file: tokio::fs::File,
    },
}

impl Sink {
    async fn open(target: &ReplyTarget) -> Result<Self, Error> {
        Ok(match target {
            ReplyTarget::Memory { limit } => Self::Memory {
                buf: BytesMut::new(),
                limit: *limit,
            },
            ReplyTarget::File(path) => Self::File {
                file: tokio::fs::File::create(path)
                    .await
                    .map_err(|e| write_error(path, e))?,
                path: path.clone(),
            },
        })
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), Error> {
        match self {
            Self::Memory { buf, limit } => {
                if (buf.len() + chunk.len()) as u64 > *limit {
                    return Err(Error::ReplyTooLarge { limit: *limit });
                }
                buf.extend_from_slice(chunk);
                Ok(())
            }
            Self::File { path, file } => file
                .write_all(chunk)
                .await
                .map_err(|e| write_error(path, e)),
        }
    }

    /// Back to empty: the reply changed, or the server ignored the range.
    async fn reset(&mut self) -> Result<(), Error> {
        match self {
            Self::Memory { buf, .. } => {
                buf.clear();
                Ok(())
            }
            Self::File { path, file } => {
                file.flush().await.map_err(|e| write_error(path, e))?;
                file.set_len(0).await.map_err(|e| write_error(path, e))?;
                file.rewind()
                    .await
                    .map(drop)
                    .map_err(|e| write_error(path, e))
            }
        }
    }

    async fn finish(self) -> Result<(Option<Bytes>, Option<PathBuf>), Error> {
        match self {
            Self::Memory { buf, .. } => Ok((Some(buf.freeze()), None)),
            Self::File { path, mut file } => {
                file.flush().await.map_err(|e| write_error(&path, e))?;
                file.sync_all().await.map_err(|e| write_error(&path, e))?;
                Ok((None, Some(path)))
            }
        }
    }
}

fn write_error(path: &std::path::Path, source: std::io::Error) -> Error {
    Error::ReplyWrite {
        path: path.to_path_buf(),
        source,
    }
}

/// Why one attempt stopped.
enum Attempt {
    Done,
    /// Try again (from `have`), after this failure.
    Retry(Error),
}

/// Downloads the reply at `url` into `target`: `Range: bytes=<have>-` on every attempt,
/// `If-Range` once a validator is known, resumed after interruptions, started over when the
/// server sends the whole thing. Redirects are followed here, one hop at a time, so that the
/// client's credentials go only to `trusted` origins (the upload's). Retries are added to
/// `retries`.
pub(crate) async fn download(
    client: &BitsClient,
    url: Url,
    target: &ReplyTarget,
    trusted: &[reqwest::Url],
    tracker: &Tracker,
    retries: &mut u32,
) -> Result<DownloadedReply, Error> {
    let config = &client.inner.config;
    let mut partial = Partial {
        sink: Sink::open(target).await?,
        have: 0,
        total: None,
        validator: None,
    };
    let mut backoff = RetryDelay::new(config.retry_initial, config.retry_max);
    let mut last_progress = Instant::now();
    tracker.update(|p| {
        p.phase = UploadPhase::DownloadingReply {
            received: 0,
            total: None,
        }
    });
    loop {
        let before = partial.have;
        let attempt = fetch(client, &url, trusted, &mut partial, tracker).await?;
        let error = match attempt {
            Attempt::Done => break,
            Attempt::Retry(error) => error,
        };
        if partial.have > before {
            last_progress = Instant::now();
            backoff.reset();
        }
        if last_progress.elapsed() >= config.no_progress_timeout {
            return Err(Error::NoProgress {
                elapsed: last_progress.elapsed(),
                last: Box::new(error),
            });
        }
        let delay = backoff.next_delay(policy::random());
        tracing::debug!(%error, ?delay, "retrying the reply download");
        *retries += 1;
        let count = *retries;
        tracker.update(|p| {
            p.retries = count;
            p.phase = UploadPhase::Retrying {
                delay,
                error: error.to_string(),
                reason: error.brief(),
            };
        });
        tokio::time::sleep(delay).await;
    }
    let (body, path) = partial.sink.finish().await?;
    Ok(DownloadedReply {
        url,
        len: partial.have,
        body,
        path,
    })
}

/// The reply as far as it has come, kept across attempts.
struct Partial {
    sink: Sink,
    /// Bytes in the sink.
    have: u64,
    /// The reply's size, once a response said it.
    total: Option<u64>,
    /// What `If-Range` carries once the first response gave one.
    validator: Option<HeaderValue>,
}

impl Partial {
    /// Throws away what arrived: the next bytes are the reply's first.
    async fn restart(&mut self) -> Result<(), Error> {
        self.sink.reset().await?;
        self.have = 0;
        self.validator = None;
        Ok(())
    }
}

/// One attempt: requests the reply from `partial.have` on and appends what comes.
async fn fetch(
    client: &BitsClient,
    url: &Url,
    trusted: &[Url],
    partial: &mut Partial,
    tracker: &Tracker,
) -> Result<Attempt, Error> {
    let config = &client.inner.config;
    let mut at = url.clone();
    let mut hops = 0;
    let trusts = |url: &Url| trusted.iter().any(|t| t.origin() == url.origin());
    let mut response = loop {
        let mut request = client
            .inner
            .http
            .get(at.clone())
            .timeout(config.request_timeout)
            .header(header::RANGE, format!("bytes={}-", partial.have));
        if partial.have > 0 {
            if let Some(v) = &partial.validator {
                request = request.header(header::IF_RANGE, v.clone());
            }
        }
        if trusts(&at) {
            request = request.headers(config.headers.clone());
            if let Some((user, password)) = &config.basic_auth {
                request = request.basic_auth(user, Some(password));
            }
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) if is_certificate_error(&e) => {
                return Err(Error::Transport {
                    packet: PACKET,
                    source: TransportError::new(e),
                });
            }
            Err(e) => {
                return Ok(Attempt::Retry(Error::Transport {
                    packet: PACKET,
                    source: TransportError::new(e),
                }));
            }
        };
        let next = response
            .status()
            .is_redirection()
            .then(|| response.headers().get(header::LOCATION))
            .flatten()
            .and_then(|l| l.to_str().ok())
            .and_then(|l| at.join(l).ok())
            .filter(|u| matches!(u.scheme(), "http" | "https"));
        match next {
            Some(next) if hops < MAX_REDIRECTS => {
                hops += 1;
                at = next;
            }
            _ => break response,
        }
    };
    // Whether the answered request carried the client's credentials (only the upload's hosts
    // get them).
    let credentials = trusts(&at) && config.sends_credentials();
    let status = response.status();
    let range = response
        .headers()
        .get(header::CONTENT_RANGE)
        .and_then(content_range);
    match status {
        StatusCode::PARTIAL_CONTENT => {
            let Some(ContentRange {
                range: Some((first, _)),
                total: size,
            }) = range
            else {
                return Err(bad(status, "a 206 without a usable Content-Range"));
            };
            if first != partial.have {
                // Not where we asked: start over from the beginning.
                partial.restart().await?;
                return Ok(Attempt::Retry(bad(
                    status,
                    "the range did not start where asked",
                )));
            }
            if size.is_some() {
                partial.total = size;
            }
            if partial.validator.is_none() {
                partial.validator = strong_validator(response.headers());
            }
        }
        StatusCode::OK => {
            // The whole reply: the server ignored the range or the reply changed.
            if partial.have > 0 {
                partial.restart().await?;
            }
            partial.total = response.content_length();
            partial.validator = strong_validator(response.headers());
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            return match range {
                Some(ContentRange {
                    range: None,
                    total: Some(size),
                }) if size == partial.have => Ok(Attempt::Done),
                _ if partial.have > 0 => {
                    partial.restart().await?;
                    Ok(Attempt::Retry(bad(status, "the reply changed size")))
                }
                _ => Err(bad(
                    status,
                    "the server cannot serve the reply's first byte",
                )),
            };
        }
        _ => {
            let transient = !status.is_client_error() || matches!(status.as_u16(), 408 | 429);
            let transient = transient && !matches!(status.as_u16(), 501 | 505 | 300..=399);
            let error = ServerError {
                packet: PACKET,
                status,
                code: None,
                context: None,
                is_ack: false,
                transient,
                credentials,
            };
            return if transient {
                Ok(Attempt::Retry(Error::Server(error)))
            } else {
                Err(Error::Server(error))
            };
        }
    }
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                partial.sink.write(&chunk).await?;
                partial.have += chunk.len() as u64;
                let (received, total) = (partial.have, partial.total);
                tracker.update(|p| p.phase = UploadPhase::DownloadingReply { received, total });
            }
            Ok(None) => break,
            Err(e) => {
                return Ok(Attempt::Retry(Error::Transport {
                    packet: PACKET,
                    source: TransportError::new(e),
                }));
            }
        }
    }
    match partial.total {
        Some(size) if partial.have < size => {
            Ok(Attempt::Retry(bad(status, "the reply ended early")))
        }
        Some(size) if partial.have > size => Err(bad(status, "the reply is longer than announced")),
        _ => Ok(Attempt::Done),
    }
}

/// `ETag` if strong, else `Last-Modified`: what `If-Range` may carry.
fn strong_validator(headers: &http::HeaderMap) -> Option<HeaderValue> {
    headers
        .get(header::ETAG)
        .filter(|e| !e.as_bytes().starts_with(b"W/"))
        .or_else(|| headers.get(header::LAST_MODIFIED))
        .cloned()
}

fn bad(status: StatusCode, reason: &str) -> Error {
    Error::InvalidResponse {
        packet: PACKET,
        status,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_urls_resolve_against_the_original_url() {
        let original =
            Url::parse("http://files.example.com/upload-ref-isapi-WebFarm/f.bin?x=1").unwrap();
        let iis = r"BITS-Sessions\Replies\{C85B4E0A-9EB9-4114-BFA4-8A43B4710091}\responsefile.bin";
        assert_eq!(
            resolve(&original, iis).unwrap().as_str(),
            "http://files.example.com/upload-ref-isapi-WebFarm/BITS-Sessions/Replies/\
             %7BC85B4E0A-9EB9-4114-BFA4-8A43B4710091%7D/responsefile.bin"
        );
        let absolute = "https://node7.example.com/orders/.bits-replies/%7BX%7D/reply.bin";
        assert_eq!(resolve(&original, absolute).unwrap().as_str(), absolute);
        assert_eq!(
            resolve(&original, "/r/1").unwrap().as_str(),
            "http://files.example.com/r/1"
        );
        assert!(resolve(&original, "ftp://x/y").is_err());
        assert!(resolve(&original, "http://[bad").is_err());
    }

    #[test]
    fn content_ranges() {
        let v = |s: &str| content_range(&HeaderValue::from_str(s).unwrap());
        let cr = |range, total| Some(ContentRange { range, total });
        assert_eq!(v("bytes 0-511/512"), cr(Some((0, 511)), Some(512)));
        assert_eq!(v("Bytes 10-19/*"), cr(Some((10, 19)), None));
        assert_eq!(v("bytes */512"), cr(None, Some(512)));
        for bad in [
            "bytes 5-4/10",
            "bytes 0-10/10",
            "items 0-1/2",
            "bytes 0-1",
            "bytes a-b/c",
        ] {
            assert_eq!(v(bad), None, "{bad}");
        }
    }
}
