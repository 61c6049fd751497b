//! [`S3Staging`]: parts staged in an S3-compatible bucket and files published there, so that
//! the nodes of a farm share nothing but the session store and the bucket.

mod layout;
mod part;
mod wire;

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use object_store::ClientConfigKey;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, S3CopyIfNotExists};
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector,
};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::{Path, PathPart};
use object_store::signer::{SignedUrlOptions, Signer};
use object_store::{
    BackoffConfig, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};
use tokio::sync::Semaphore;

pub use part::S3Part;

use self::layout::State;
use super::{PartReader, Staging, StagingError};
use crate::destination::Destination;
use crate::session::SessionId;

/// The smallest part S3 accepts (every part but the last).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// The most parts one multipart upload may have.
const MAX_PARTS: u64 = 10_000;
/// Pieces a session's tail may have before the next write gathers them into one object, so
/// that tiny fragments cannot leave millions of objects behind.
const MAX_PIECES: usize = 256;
/// Cached session states kept by one node (the cache only spares a listing per fragment).
const MAX_CACHED: usize = 10_000;

/// Stages the bytes of open sessions in an S3-compatible bucket and publishes finished files
/// there, through [`object_store`].
///
/// A destination is a key under the prefix: `BITS_POST /a/b.bin` lands at `PREFIX/a/b.bin`,
/// confined by the same path rules as files (no `..`, no reserved names). The staging keeps
/// its own objects under `PREFIX/.bits/staging/<session>/`, a name no destination can take.
///
/// # How the bytes are kept
///
/// Every session has a multipart upload with parts of a fixed size `P` (default 8 MiB, at
/// least S3's 5 MiB), made at the destination's key itself (upload-reply sessions, whose
/// bytes go to the application, make theirs at a staging key): part `n` holds bytes
/// `[(n-1)P, nP)`, so a re-sent fragment re-sends
/// bytes of the same part and every part but the last has the same size. The bytes of a
/// fragment that do not complete a part are stored before the fragment is acknowledged as a
/// small object of their own (a *tail*), written once and never changed, so an acknowledged
/// byte survives the death of the node that received it, without any local disk. When a
/// fragment completes a part, the part is uploaded from the stored tails and the new bytes; a
/// marker object records it, and only then are the tails it replaces deleted. A fragment that
/// spans whole parts streams into them, holding one part in memory at a time.
///
/// What a session holds is read back from a listing of its objects, by any node: there is no
/// state on the node, and the session record carries none. (A node caches what it wrote last,
/// to spare a listing per fragment; a fragment that starts anywhere else lists again.)
///
/// Bytes re-sent inside a part that is already uploaded are taken to be the bytes the part
/// holds (a BITS client sends one file) and are not uploaded again.
///
/// # Commit
///
/// The last part is uploaded from the tails, and the multipart upload is completed where it
/// is, at the destination: without overwrites with `If-None-Match: *`, so that a key that
/// appeared during the upload is never replaced (S3 answers 412, and the
/// [completion policy](crate::completion::CompletionPolicy) decides). `object_store` sends no
/// such header on a completion, so the staging sends this one request itself, signed by
/// `object_store`'s signer and sent with its HTTP client. An attempt whose answer was lost is
/// recognised on the retry by the ETag S3 gives the object (the MD5 of its parts' MD5s). A
/// file that fits in one part is published by a single conditional PUT instead.
///
/// A session made with [`Staging::create`] rather than [`Staging::create_for`] (upload-reply
/// sessions, when the application asks for the file to be committed too) completes onto its
/// own staging key and is published by a server-side copy refused when the key exists (a
/// multipart copy whose completion carries `If-None-Match: *`); S3's single copy is limited
/// to 5 GiB, so such a file over 5 GiB fails its commit.
///
/// A completion of a large file can take S3 a while (it answers when the object is made);
/// `object_store`'s request timeout (30 s by default) applies to it. Raise it with
/// [`request_timeout`](S3StagingBuilder::request_timeout) for files of many GiB on a slow
/// service; a completion cut short is retried by the client's next attempt and recognised as
/// done if it finished.
///
/// # Upload-reply
///
/// An [upload-reply handler](crate::BitsLayerBuilder::upload_reply_handler) (and a
/// notification, by value or by reference) gets the upload as a local file: the layer reads it
/// from the bucket ([`Staging::read`]: a file of several parts is completed onto its staging
/// object first) into the reply folder, and deletes the copy with the session (when the
/// session ends on another node of a farm, this node's next sweep does). The reply the
/// application gives is kept in the bucket, under `PREFIX/.bits/replies/<session>`, so that
/// any node of a farm serves the reply URL (with ranges, as from a file), and is deleted with
/// the session; with [`replies_in_bucket(false)`](S3StagingBuilder::replies_in_bucket) it
/// stays in the reply folder of the node that asked the application, and in a farm the reply
/// URL must then lead to that node: set [`host_id`](crate::BitsLayerBuilder::host_id).
///
/// # What a crash leaves behind
///
/// | crash during | left behind | cleaned by |
/// |---|---|---|
/// | Create-Session, before the record | a multipart upload and its marker | the orphan scan at start-up (the marker); the bucket's `AbortIncompleteMultipartUpload` rule |
/// | Create-Session, between the upload and its marker | a multipart upload no marker names | the bucket's lifecycle rule only |
/// | a fragment | tails or a part not yet recorded | replaced by the resumed upload; deleted with the session |
/// | the commit, before the completion | the last part and its `last/` marker | the next attempt completes with the same parts |
/// | the commit, after the completion | the file and the staging objects | the next attempt recognises the file as its own (its ETag); deleted with the session |
/// | the commit of a copied file, between completion and copy | the completed object under `.bits/staging` | the next attempt publishes it |
/// | Cancel-Session or expiry | some staging objects | the next discard of the session, the orphan scan |
///
/// Set a lifecycle rule on the bucket that aborts incomplete multipart uploads after a few
/// days, for uploads that no marker names.
///
/// ```no_run
/// use axum_bits::staging::S3Staging;
///
/// let staging = S3Staging::builder()
///     .bucket("uploads")
///     .prefix("inbox")
///     .endpoint("http://127.0.0.1:9000")
///     .path_style(true)
///     .build()
///     .unwrap();
/// let bits = axum_bits::BitsLayer::builder("./uploads").staging(staging);
/// ```
#[derive(Debug, Clone)]
pub struct S3Staging {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    s3: AmazonS3,
    /// The HTTP client `object_store` made for `s3`, for the one request it cannot send: a
    /// multipart completion with `If-None-Match: *`.
    http: HttpClient,
    prefix: Path,
    part_size: u64,
    /// Node-wide bound on bytes held in memory by writers, in KiB.
    budget: Arc<Semaphore>,
    budget_kib: u32,
    /// Node-wide bound on parts being built and uploaded.
    flights: Arc<Semaphore>,
    cache: Mutex<HashMap<SessionId, State>>,
    /// Whether replies of upload-reply sessions live in the bucket.
    replies: bool,
}

/// Builds an [`S3Staging`]. Starts from the `AWS_*` environment variables
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
/// `AWS_ENDPOINT`, `AWS_BUCKET`, ...); every setter overrides them.
#[derive(Debug)]
pub struct S3StagingBuilder {
    s3: AmazonS3Builder,
    prefix: String,
    part_size: u64,
    memory_budget: u64,
    parts_in_flight: usize,
    allow_small_parts: bool,
    replies_in_bucket: bool,
}

/// The configuration of an [`S3Staging`] is not usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum S3ConfigError {
    /// The part size is below S3's minimum.
    #[error("the part size must be at least 5 MiB (S3's minimum part)")]
    PartTooSmall,
    /// The memory budget cannot hold two parts.
    #[error("the memory budget must hold at least two parts")]
    BudgetTooSmall,
    /// The prefix is not a plain `/`-separated key prefix.
    #[error("invalid key prefix: {0}")]
    Prefix(String),
    /// `object_store` refused the S3 settings (no bucket, a bad endpoint, ...).
    #[error("invalid S3 settings")]
    S3(#[source] object_store::Error),
}

impl S3Staging {
    /// A builder, from the `AWS_*` environment variables.
    pub fn builder() -> S3StagingBuilder {
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 3,
            retry_timeout: Duration::from_secs(15),
        };
        S3StagingBuilder {
            s3: AmazonS3Builder::from_env()
                .with_retry(retry)
                .with_copy_if_not_exists(S3CopyIfNotExists::Multipart),
            prefix: String::new(),
            part_size: 8 << 20,
            memory_budget: 256 << 20,
            parts_in_flight: 8,
            allow_small_parts: false,
            replies_in_bucket: true,
        }
    }

    /// The fixed part size.
    pub fn part_size(&self) -> u64 {
        self.inner.part_size
    }

    /// The largest file the part size allows (10,000 parts).
    pub fn max_file_size(&self) -> u64 {
        self.inner.part_size * MAX_PARTS
    }
}

impl S3StagingBuilder {
    /// The bucket.
    pub fn bucket(mut self, bucket: impl Into<String>) -> Self {
        self.s3 = self.s3.with_bucket_name(bucket);
        self
    }

    /// The key prefix destinations and staging objects live under, e.g. `uploads/inbox`.
    /// Default: none (the bucket's root).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The endpoint URL of an S3-compatible service, e.g. `http://127.0.0.1:9000`. An `http`
    /// endpoint is allowed by this setter. Default: AWS.
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        let url = url.into();
        let http = url.starts_with("http://");
        self.s3 = self.s3.with_endpoint(url).with_allow_http(http);
        self
    }

    /// The region. Default: `AWS_REGION`, else `us-east-1`.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.s3 = self.s3.with_region(region);
        self
    }

    /// Path-style URLs (`ENDPOINT/BUCKET/KEY`) rather than virtual-host style
    /// (`BUCKET.ENDPOINT/KEY`). Most self-hosted services want path style. Default: virtual
    /// host.
    pub fn path_style(mut self, on: bool) -> Self {
        self.s3 = self.s3.with_virtual_hosted_style_request(!on);
        self
    }

    /// The longest any one request to the service may take (`object_store`'s default: 30 s).
    /// A completion answers when the object is made, which can take a slow service a while
    /// for a file of many GiB.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.s3 = self.s3.with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
            format!("{}ms", timeout.as_millis()),
        );
        self
    }

    /// Static credentials.
    pub fn credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        self.s3 = self
            .s3
            .with_access_key_id(access_key_id)
            .with_secret_access_key(secret_access_key);
        self
    }

    /// The part size `P` (at least 5 MiB; default 8 MiB). Files up to 10,000 × `P` fit.
    pub fn part_size(mut self, bytes: u64) -> Self {
        self.part_size = bytes;
        self
    }

    /// Bytes all sessions of this node together hold in memory (the part being built, the
    /// tail being stored); writers wait beyond it. At least two parts; default 256 MiB.
    pub fn memory_budget(mut self, bytes: u64) -> Self {
        self.memory_budget = bytes;
        self
    }

    /// Allows a part size below S3's 5 MiB minimum, for a service configured with a lower one
    /// (a test server such as moto with `S3_UPLOAD_PART_MIN_SIZE`). Against S3 itself such
    /// parts fail at the first commit of a file larger than one part. Default: off.
    pub fn allow_small_parts(mut self, on: bool) -> Self {
        self.allow_small_parts = on;
        self
    }

    /// Keeps the replies of upload-reply sessions in the bucket (under
    /// `PREFIX/.bits/replies/`), so that every node serves a reply URL; off, they stay in the
    /// reply folder of the node that asked the application. Default: on.
    pub fn replies_in_bucket(mut self, on: bool) -> Self {
        self.replies_in_bucket = on;
        self
    }

    /// Parts this node builds and uploads at once (each holds up to a part in memory, on top
    /// of the memory budget). Default: 8.
    pub fn parts_in_flight(mut self, parts: usize) -> Self {
        self.parts_in_flight = parts;
        self
    }

    /// Any other `object_store` setting (retries, timeouts, TLS, a proxy, encryption). The
    /// staging starts with retries of 3 over at most 15 s (a client waits for each fragment's
    /// Ack) and the copy-if-absent mode its commits need (a multipart copy whose completion
    /// carries `If-None-Match: *`); change the retries here, keep the copy mode unless the
    /// service offers another atomic one. The staging installs its own HTTP connector
    /// (`object_store`'s reqwest one, whose client it also uses for its conditional
    /// completions), so a connector set here is replaced; client options (TLS, proxy,
    /// timeouts) apply.
    pub fn amazon_s3(mut self, configure: impl FnOnce(AmazonS3Builder) -> AmazonS3Builder) -> Self {
        self.s3 = configure(self.s3);
        self
    }

    /// Builds the staging. Makes no request.
    pub fn build(self) -> Result<S3Staging, S3ConfigError> {
        if self.part_size < MIN_PART_SIZE && !self.allow_small_parts || self.part_size == 0 {
            return Err(S3ConfigError::PartTooSmall);
        }
        if self.memory_budget < 2 * self.part_size {
            return Err(S3ConfigError::BudgetTooSmall);
        }
        let mut prefix = Vec::new();
        for part in self.prefix.split('/').filter(|p| !p.is_empty()) {
            if part == "." || part == ".." || part.eq_ignore_ascii_case(".bits") {
                return Err(S3ConfigError::Prefix(self.prefix));
            }
            prefix.push(PathPart::from(part));
        }
        let kept = KeepClient::default();
        let s3 = self
            .s3
            .with_http_connector(kept.clone())
            .build()
            .map_err(S3ConfigError::S3)?;
        let http = kept.take().ok_or_else(|| {
            S3ConfigError::S3(object_store::Error::NotSupported {
                source: "object_store made no HTTP client".into(),
            })
        })?;
        let budget_kib = u32::try_from(self.memory_budget / 1024).unwrap_or(u32::MAX);
        Ok(S3Staging {
            inner: Arc::new(Inner {
                s3,
                http,
                prefix: Path::from_iter(prefix),
                part_size: self.part_size,
                budget: Arc::new(Semaphore::new(budget_kib as usize)),
                budget_kib,
                flights: Arc::new(Semaphore::new(self.parts_in_flight.max(1))),
                cache: Mutex::new(HashMap::new()),
                replies: self.replies_in_bucket,
            }),
        })
    }
}

impl Inner {
    fn destination(&self, destination: &Destination) -> Path {
        self.under(destination.as_str().split('/'))
    }

    fn under<'a>(&self, parts: impl IntoIterator<Item = &'a str>) -> Path {
        parts
            .into_iter()
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }

    fn staging_root(&self) -> Path {
        self.under([".bits", "staging"])
    }

    fn replies_root(&self) -> Path {
        self.under([".bits", "replies"])
    }

    fn reply(&self, id: SessionId) -> Path {
        let id = id.to_string();
        self.under([".bits", "replies", id.trim_matches(['{', '}'])])
    }

    fn session(&self, id: SessionId) -> Path {
        let id = id.to_string();
        self.under([".bits", "staging", id.trim_matches(['{', '}'])])
    }

    /// A staged object of a session, by its name in the layout.
    fn object(&self, id: SessionId, name: &str) -> Path {
        name.split('/')
            .fold(self.session(id), |path, part| path.join(part))
    }

    /// Every object of a session, as (name relative to the session, size).
    async fn objects(&self, id: SessionId) -> Result<Vec<(String, u64)>, StagingError> {
        let session = self.session(id);
        let depth = session.parts().count();
        self.s3
            .list(Some(&session))
            .map_err(io_error)
            .map_ok(|meta| {
                let name: Vec<_> = meta
                    .location
                    .parts()
                    .skip(depth)
                    .map(|p| p.as_ref().to_owned())
                    .collect();
                (name.join("/"), meta.size)
            })
            .try_collect()
            .await
    }

    /// What a session holds, from a listing (and, for an upload made at its destination, its
    /// marker, which names the key).
    async fn list_state(&self, id: SessionId) -> Result<Option<State>, StagingError> {
        let objects = self.objects(id).await?;
        let mut state = layout::resolve(objects.iter().map(|(n, l)| (n.as_str(), *l)));
        if let Some(state) = state.as_mut() {
            if let Some(marker) = &state.in_place {
                state.key = Some(self.upload_key_of(id, marker).await?);
            }
        }
        Ok(state)
    }

    /// The key an in-place upload was made at, from its marker.
    async fn upload_key_of(&self, id: SessionId, marker: &str) -> Result<String, StagingError> {
        let bytes = self
            .s3
            .get(&self.object(id, marker))
            .await
            .map_err(io_error)?
            .bytes()
            .await
            .map_err(io_error)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| StagingError::Io(io::Error::other("an upload marker names no key")))
    }

    /// The key the session's multipart upload lives at: its destination (an upload made in
    /// place) or its own `object`.
    fn upload_key(&self, id: SessionId, state: &State) -> Result<Path, StagingError> {
        match &state.key {
            Some(key) => Path::parse(key)
                .map_err(|e| StagingError::Io(io::Error::other(format!("bad upload key: {e}")))),
            None => Ok(self.object(id, layout::OBJECT)),
        }
    }

    fn cached(&self, id: SessionId, offset: u64) -> Option<State> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(&id).filter(|s| s.held() == offset).cloned()
    }

    fn remember(&self, id: SessionId, state: State) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(id, state);
    }

    fn forget(&self, id: SessionId) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.remove(&id);
    }

    /// Creates the session's multipart upload and its marker: at `at` (the destination; the
    /// marker's content names it), or at the session's own `object`.
    async fn create_upload(&self, id: SessionId, at: Option<Path>) -> Result<State, StagingError> {
        let key = at
            .clone()
            .unwrap_or_else(|| self.object(id, layout::OBJECT));
        let upload_id = self.s3.create_multipart(&key).await.map_err(io_error)?;
        let marker = layout::upload_name(self.part_size, &upload_id, at.is_some());
        let content = match &at {
            Some(key) => PutPayload::from(key.as_ref().to_owned()),
            None => PutPayload::new(),
        };
        self.s3
            .put(&self.object(id, &marker), content)
            .await
            .map_err(io_error)?;
        Ok(State {
            upload_id,
            part_size: self.part_size,
            in_place: at.is_some().then_some(marker),
            key: at.map(|key| key.as_ref().to_owned()),
            parts: Vec::new(),
            last: None,
            pieces: Vec::new(),
            next_generation: 1,
            stale: Vec::new(),
            object: None,
            done: false,
        })
    }

    async fn put_empty(&self, id: SessionId, name: &str) -> Result<(), StagingError> {
        self.s3
            .put(&self.object(id, name), PutPayload::new())
            .await
            .map(drop)
            .map_err(io_error)
    }

    /// `len` bytes of a session's object, from its byte `from`.
    async fn read(
        &self,
        id: SessionId,
        name: &str,
        from: u64,
        len: u64,
    ) -> Result<bytes::Bytes, Missing> {
        if len == 0 {
            return Ok(bytes::Bytes::new());
        }
        match self
            .s3
            .get_range(&self.object(id, name), from..from + len)
            .await
        {
            Ok(bytes) if bytes.len() as u64 == len => Ok(bytes),
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Err(Missing::Gone),
            Err(e) => Err(Missing::Failed(io_error(e))),
        }
    }

    /// The bytes of the pieces, in order, as far as `upto` (an absolute offset). A piece that
    /// is gone makes the session resume from its start.
    async fn gather(
        &self,
        id: SessionId,
        state: &State,
        upto: u64,
    ) -> Result<Vec<bytes::Bytes>, StagingError> {
        let wanted: Vec<_> = state
            .pieces
            .iter()
            .filter(|p| p.start < upto)
            .map(|p| (p.name.clone(), p.start, p.from, p.len.min(upto - p.start)))
            .collect();
        let reads = futures_util::stream::iter(
            wanted
                .into_iter()
                .map(|(name, start, from, len)| async move {
                    (start, self.read(id, &name, from, len).await)
                }),
        )
        .buffered(8);
        futures_util::pin_mut!(reads);
        let mut out = Vec::new();
        while let Some((start, read)) = reads.next().await {
            match read {
                Ok(bytes) => out.push(bytes),
                Err(Missing::Gone) => {
                    self.forget(id);
                    return Err(StagingError::PartShort { held: start });
                }
                Err(Missing::Failed(e)) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Uploads part `number` (1-based) and records it with its marker.
    async fn upload_part(
        &self,
        id: SessionId,
        state: &State,
        number: usize,
        payload: PutPayload,
    ) -> Result<String, StagingError> {
        let content_id = self.put_part(id, state, number, payload).await?;
        let number32 = u32::try_from(number).map_err(|_| too_many_parts())?;
        self.put_empty(id, &layout::part_name(number32, &content_id))
            .await?;
        Ok(content_id)
    }

    /// Uploads part `number` (1-based); returns its ETag.
    async fn put_part(
        &self,
        id: SessionId,
        state: &State,
        number: usize,
        payload: PutPayload,
    ) -> Result<String, StagingError> {
        let PartId { content_id } = self
            .s3
            .put_part(
                &self.upload_key(id, state)?,
                &state.upload_id,
                number - 1,
                payload,
            )
            .await
            .map_err(upload_error)?;
        Ok(content_id)
    }

    /// Deletes objects of a session that hold nothing it needs; failures are only logged (the
    /// session's discard deletes whatever is left).
    async fn delete_quietly(&self, id: SessionId, names: Vec<String>) {
        if names.is_empty() {
            return;
        }
        let paths: Vec<_> = names
            .iter()
            .map(|n| Ok(self.object(id, n)))
            .collect::<Vec<_>>();
        let mut deleted = self
            .s3
            .delete_stream(futures_util::stream::iter(paths).boxed());
        while let Some(result) = deleted.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(error) => {
                    tracing::warn!(%error, "could not delete a staged object; it goes with the session");
                }
            }
        }
    }

    /// Deletes every object of a session, and aborts its multipart upload.
    async fn delete_session(&self, id: SessionId, keep_done: bool) -> Result<(), StagingError> {
        self.forget(id);
        let objects = self.objects(id).await?;
        let mut names = Vec::new();
        for (name, len) in objects {
            match layout::parse(&name, len) {
                Some(layout::Entry::Upload {
                    upload_id,
                    in_place,
                    ..
                }) => {
                    let object = if in_place {
                        match self.upload_key_of(id, &name).await {
                            Ok(key) => Path::parse(&key).map_err(|e| {
                                StagingError::Io(io::Error::other(format!("bad upload key: {e}")))
                            })?,
                            // No key, no abort: the bucket's lifecycle rule ends the upload.
                            Err(StagingError::Io(e)) if is_not_found(&e) => {
                                names.push(name);
                                continue;
                            }
                            Err(e) => return Err(e),
                        }
                    } else {
                        self.object(id, layout::OBJECT)
                    };
                    match self.s3.abort_multipart(&object, &upload_id).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        // moto answers an abort of a completed upload with 500 after retries;
                        // a real failure leaves the marker, so a later discard tries again.
                        Err(error) => {
                            tracing::debug!(%error, "aborting the multipart upload failed");
                            continue;
                        }
                    }
                }
                Some(layout::Entry::Done) if keep_done => continue,
                _ => {}
            }
            names.push(name);
        }
        // The upload markers go last: while one is there, the session can be found again.
        // Each group is one request per thousand objects.
        let (markers, others): (Vec<_>, Vec<_>) =
            names.into_iter().partition(|n| n.starts_with("upload-"));
        for group in [others, markers] {
            if group.is_empty() {
                continue;
            }
            let paths: Vec<_> = group.iter().map(|n| Ok(self.object(id, n))).collect();
            let mut deleted = self
                .s3
                .delete_stream(futures_util::stream::iter(paths).boxed());
            while let Some(result) = deleted.next().await {
                match result {
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(io_error(e)),
                }
            }
        }
        Ok(())
    }

    /// The bytes after the parts up to `total`, checked against what the session holds.
    async fn gathered(
        &self,
        id: SessionId,
        state: &State,
        total: u64,
    ) -> Result<Vec<bytes::Bytes>, StagingError> {
        let held = state.held();
        if held < total {
            return Err(StagingError::Incomplete { len: held, total });
        }
        if total < state.covered() {
            return Err(StagingError::Io(io::Error::other(
                "cannot commit fewer bytes than the uploaded parts hold",
            )));
        }
        self.gather(id, state, total).await
    }

    /// The parts of the whole file: the recorded ones, then the last from the tails (uploaded
    /// now).
    async fn final_parts(
        &self,
        id: SessionId,
        state: &State,
        total: u64,
    ) -> Result<Vec<PartId>, StagingError> {
        let last = self.gathered(id, state, total).await?;
        let mut parts: Vec<PartId> = state
            .parts
            .iter()
            .map(|etag| PartId {
                content_id: etag.clone(),
            })
            .collect();
        let len = total - state.covered();
        if len > 0 {
            let number = parts.len() + 1;
            let number32 = u32::try_from(number).map_err(|_| too_many_parts())?;
            let etag = match &state.last {
                // Uploaded by an earlier attempt of this commit.
                Some((n, l, etag)) if *n == number32 && *l == len => etag.clone(),
                _ => {
                    let etag = self
                        .put_part(id, state, number, PutPayload::from_iter(last))
                        .await?;
                    self.put_empty(id, &layout::last_name(number32, len, &etag))
                        .await?;
                    etag
                }
            };
            parts.push(PartId { content_id: etag });
        }
        Ok(parts)
    }

    /// Completes the multipart upload onto the session's `object`.
    async fn complete_object(
        &self,
        id: SessionId,
        state: &State,
        total: u64,
    ) -> Result<(), StagingError> {
        let parts = self.final_parts(id, state, total).await?;
        self.s3
            .complete_multipart(&self.object(id, layout::OBJECT), &state.upload_id, parts)
            .await
            .map_err(io_error)?;
        Ok(())
    }

    /// Completes an upload made at its destination `target`, there: without `overwrite` with
    /// `If-None-Match: *`, so that a key someone else created meanwhile is never replaced.
    /// An earlier attempt that completed it but whose answer was lost (the retry finds the key
    /// taken or the upload gone) is recognised by the ETag S3 gives the object it made from
    /// these parts.
    async fn complete_in_place(
        &self,
        id: SessionId,
        state: &State,
        target: &Path,
        total: u64,
        overwrite: bool,
    ) -> Result<(), StagingError> {
        if self.upload_key(id, state)? != *target {
            return Err(StagingError::Io(io::Error::other(
                "the upload was made for another destination",
            )));
        }
        let parts = self.final_parts(id, state, total).await?;
        let etags: Vec<String> = parts.iter().map(|p| p.content_id.clone()).collect();
        let result = if overwrite {
            match self
                .s3
                .complete_multipart(target, &state.upload_id, parts)
                .await
            {
                Ok(_) => Ok(()),
                Err(object_store::Error::NotFound { .. }) => Err(Completed::Gone),
                Err(e) => Err(Completed::Failed(io_error(e))),
            }
        } else {
            self.complete_if_absent(target, &state.upload_id, &etags)
                .await
        };
        match result {
            Ok(()) => Ok(()),
            Err(Completed::Failed(e)) => Err(e),
            // Either someone else's object, or this upload's own, completed by an attempt whose
            // answer was lost (the retry then finds the key taken, or the upload gone).
            Err(refused @ (Completed::Exists | Completed::Gone)) => {
                match self.s3.head(target).await {
                    Ok(meta)
                        if meta.size == total
                            && meta.e_tag.as_deref().map(|e| e.trim_matches('"'))
                                == wire::multipart_etag(&etags).as_deref() =>
                    {
                        Ok(())
                    }
                    Ok(_) => Err(StagingError::DestinationExists),
                    Err(object_store::Error::NotFound { .. })
                        if matches!(refused, Completed::Gone) =>
                    {
                        Err(StagingError::PartMissing)
                    }
                    // Someone else's object, deleted again since.
                    Err(object_store::Error::NotFound { .. }) => {
                        Err(StagingError::DestinationExists)
                    }
                    Err(e) => Err(io_error(e)),
                }
            }
        }
    }

    /// `CompleteMultipartUpload` with `If-None-Match: *`, which `object_store` does not send:
    /// a request signed by its signer (a presigned URL that binds the header), sent with its
    /// HTTP client, retried like its own requests on transient failures.
    async fn complete_if_absent(
        &self,
        key: &Path,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), Completed> {
        let failed = |e: io::Error| Completed::Failed(StagingError::Io(e));
        let options = SignedUrlOptions::new()
            .with_query([("uploadId", upload_id)])
            .with_signed_header(
                http::header::IF_NONE_MATCH,
                http::HeaderValue::from_static("*"),
            );
        let body = wire::complete_body(etags);
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=COMPLETE_ATTEMPTS {
            let url = self
                .s3
                .signed_url_opts(http::Method::POST, key, Duration::from_secs(900), &options)
                .await
                .map_err(|e| Completed::Failed(io_error(e)))?;
            let request = http::Request::builder()
                .method(http::Method::POST)
                .uri(url.as_str())
                .header(http::header::IF_NONE_MATCH, "*")
                .header(http::header::CONTENT_TYPE, "application/xml")
                .body(HttpRequestBody::from(body.clone()))
                .map_err(|e| failed(io::Error::other(e)))?;
            let answer = match self.http.execute(request).await {
                Ok(response) => {
                    let status = response.status();
                    match response.into_body().bytes().await {
                        Ok(text) => wire::completion_answer(status.as_u16(), &text),
                        Err(e) => wire::Answer::Retry(e.to_string()),
                    }
                }
                Err(e) => wire::Answer::Retry(e.to_string()),
            };
            match answer {
                wire::Answer::Done => return Ok(()),
                wire::Answer::Exists => return Err(Completed::Exists),
                wire::Answer::Gone => return Err(Completed::Gone),
                wire::Answer::Full(message) => {
                    return Err(failed(io::Error::new(
                        io::ErrorKind::QuotaExceeded,
                        message,
                    )));
                }
                wire::Answer::Fail(message) => return Err(failed(io::Error::other(message))),
                wire::Answer::Retry(message) if attempt == COMPLETE_ATTEMPTS => {
                    return Err(failed(io::Error::other(message)));
                }
                wire::Answer::Retry(message) => {
                    tracing::debug!(%message, attempt, "completing the upload failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
            }
        }
        Err(failed(io::Error::other(
            "the upload could not be completed",
        )))
    }

    /// Publishes the staged `source` (an object of the session, or bytes) at `destination`.
    async fn publish_object(
        &self,
        id: SessionId,
        destination: &Path,
        overwrite: bool,
    ) -> Result<(), StagingError> {
        let source = self.object(id, layout::OBJECT);
        let copied = if overwrite {
            self.s3.copy(&source, destination).await
        } else {
            self.s3.copy_if_not_exists(&source, destination).await
        };
        copied.map_err(commit_error)
    }
}

enum Missing {
    Gone,
    Failed(StagingError),
}

/// How a conditional completion ended, when it did not succeed.
enum Completed {
    /// The key exists (412).
    Exists,
    /// The upload is gone (completed or aborted).
    Gone,
    Failed(StagingError),
}

/// Attempts of a conditional completion (backoff 0.1 s, 0.4 s, 1.6 s between them).
const COMPLETE_ATTEMPTS: u32 = 4;

/// An `object_store` HTTP connector that keeps the client it made last (the store's own; the
/// credential providers' clients, if any, are made before it).
#[derive(Debug, Clone, Default)]
struct KeepClient(Arc<Mutex<Option<HttpClient>>>);

impl KeepClient {
    fn take(&self) -> Option<HttpClient> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl HttpConnector for KeepClient {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let client = ReqwestConnector::default().connect(options)?;
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(client.clone());
        Ok(client)
    }
}

fn is_not_found(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<object_store::Error>())
        .is_some_and(|e| matches!(e, object_store::Error::NotFound { .. }))
}

impl Staging for S3Staging {
    type Part = S3Part;

    async fn check_destination(
        &self,
        destination: &Destination,
        overwrite: bool,
    ) -> Result<(), StagingError> {
        if overwrite {
            return Ok(());
        }
        match self
            .inner
            .s3
            .head(&self.inner.destination(destination))
            .await
        {
            Ok(_) => Err(StagingError::DestinationExists),
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(io_error(e)),
        }
    }

    async fn create(&self, id: SessionId) -> Result<(), StagingError> {
        let state = self.inner.create_upload(id, None).await?;
        self.inner.remember(id, state);
        Ok(())
    }

    /// Makes the multipart upload at the destination's key, so that the commit completes it
    /// there (with `If-None-Match: *` unless overwrites are allowed), without a copy.
    async fn create_for(
        &self,
        id: SessionId,
        destination: &Destination,
    ) -> Result<(), StagingError> {
        let target = self.inner.destination(destination);
        let state = self.inner.create_upload(id, Some(target)).await?;
        self.inner.remember(id, state);
        Ok(())
    }

    async fn len(&self, id: SessionId) -> Result<Option<u64>, StagingError> {
        Ok(self
            .inner
            .list_state(id)
            .await?
            .filter(|s| !s.done)
            .map(|s| s.held()))
    }

    async fn open(&self, id: SessionId, offset: u64) -> Result<S3Part, StagingError> {
        let inner = &self.inner;
        let (state, cached) = match inner.cached(id, offset) {
            Some(state) => (state, true),
            None => match inner.list_state(id).await? {
                Some(state) if !state.done => (state, false),
                _ if offset == 0 => (inner.create_upload(id, None).await?, false),
                _ => return Err(StagingError::PartShort { held: 0 }),
            },
        };
        let held = state.held();
        if offset > held {
            inner.remember(id, state);
            return Err(StagingError::PartShort { held });
        }
        Ok(S3Part::new(self.inner.clone(), id, state, offset, cached))
    }

    async fn commit(
        &self,
        id: SessionId,
        destination: &Destination,
        total: u64,
        overwrite: bool,
    ) -> Result<(), StagingError> {
        let inner = &self.inner;
        inner.forget(id);
        let target = inner.destination(destination);
        let Some(state) = inner.list_state(id).await? else {
            return Err(StagingError::PartMissing);
        };
        if state.done {
            // Published by an earlier attempt whose answer was lost.
            return match inner.s3.head(&target).await {
                Ok(meta) if meta.size == total => Ok(()),
                Ok(_) | Err(object_store::Error::NotFound { .. }) => Err(StagingError::PartMissing),
                Err(e) => Err(io_error(e)),
            };
        }
        if state.in_place.is_some() && !state.parts.is_empty() {
            // Completed where it is. (A file of one part or less is one conditional PUT,
            // below, as for any session.)
            inner
                .complete_in_place(id, &state, &target, total, overwrite)
                .await?;
            inner.put_empty(id, layout::DONE).await?;
            return inner.delete_session(id, true).await;
        }
        if state.object != Some(total) {
            if state.parts.is_empty() {
                let last = inner.gathered(id, &state, total).await?;
                // One part's worth or less: a single conditional PUT.
                let mode = if overwrite {
                    PutMode::Overwrite
                } else {
                    PutMode::Create
                };
                inner
                    .s3
                    .put_opts(&target, PutPayload::from_iter(last), PutOptions::from(mode))
                    .await
                    .map_err(commit_error)?;
                inner.put_empty(id, layout::DONE).await?;
                return inner.delete_session(id, true).await;
            }
            inner.complete_object(id, &state, total).await?;
        }
        inner.publish_object(id, &target, overwrite).await?;
        inner.put_empty(id, layout::DONE).await?;
        inner.delete_session(id, true).await
    }

    async fn discard(&self, id: SessionId) -> Result<(), StagingError> {
        self.inner.delete_session(id, false).await
    }

    /// Streams the complete part from the bucket: a file of several parts is completed onto
    /// the session's staging object first (a later commit publishes that object), one of a
    /// single part is read from its tails.
    async fn read(&self, id: SessionId, total: u64) -> Result<PartReader, StagingError> {
        let inner = &self.inner;
        inner.forget(id);
        let state = match inner.list_state(id).await? {
            Some(state) if !state.done => state,
            _ => return Err(StagingError::PartMissing),
        };
        if state.in_place.is_some() && !state.parts.is_empty() {
            // Its parts can only be read by completing it, which would publish it.
            return Err(StagingError::Io(io::Error::other(
                "an upload made at its destination cannot be read before its commit",
            )));
        }
        if state.object != Some(total) {
            if state.parts.is_empty() {
                let bytes = inner.gathered(id, &state, total).await?;
                let chunks = futures_util::stream::iter(bytes.into_iter().map(Ok::<_, io::Error>));
                return Ok(Box::pin(tokio_util::io::StreamReader::new(chunks)));
            }
            inner.complete_object(id, &state, total).await?;
        }
        let object = inner
            .s3
            .get(&inner.object(id, layout::OBJECT))
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => StagingError::PartMissing,
                e => io_error(e),
            })?;
        let chunks = object.into_stream().map_err(io::Error::other);
        Ok(Box::pin(tokio_util::io::StreamReader::new(chunks)))
    }

    async fn list(&self) -> Result<Vec<SessionId>, StagingError> {
        let listed = self
            .inner
            .s3
            .list_with_delimiter(Some(&self.inner.staging_root()))
            .await
            .map_err(io_error)?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().and_then(SessionId::parse))
            .collect())
    }

    fn keeps_replies(&self) -> bool {
        self.inner.replies
    }

    /// Uploads the reply to `PREFIX/.bits/replies/<session>` (a multipart upload past 10 MiB).
    async fn put_reply(
        &self,
        id: SessionId,
        reply: PartReader,
        len: u64,
    ) -> Result<(), StagingError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let store: Arc<dyn ObjectStore> = Arc::new(self.inner.s3.clone());
        let mut writer = object_store::buffered::BufWriter::new(store, self.inner.reply(id));
        let copied = tokio::io::copy(&mut reply.take(len), &mut writer).await;
        match copied {
            Ok(n) if n == len => writer.shutdown().await.map_err(StagingError::Io),
            Ok(n) => {
                let _ = writer.abort().await;
                Err(StagingError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the reply ended after {n} of {len} bytes"),
                )))
            }
            Err(e) => {
                let _ = writer.abort().await;
                Err(StagingError::Io(e))
            }
        }
    }

    async fn get_reply(
        &self,
        id: SessionId,
        offset: u64,
        len: u64,
    ) -> Result<PartReader, StagingError> {
        if len == 0 {
            return Ok(Box::pin(tokio::io::empty()));
        }
        let options = object_store::GetOptions::new().with_range(Some(offset..offset + len));
        let object = self
            .inner
            .s3
            .get_opts(&self.inner.reply(id), options)
            .await
            .map_err(io_error)?;
        let chunks = object.into_stream().map_err(io::Error::other);
        Ok(Box::pin(tokio_util::io::StreamReader::new(chunks)))
    }

    async fn remove_reply(&self, id: SessionId) -> Result<(), StagingError> {
        match self.inner.s3.delete(&self.inner.reply(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(io_error(e)),
        }
    }

    async fn list_replies(&self) -> Result<Vec<SessionId>, StagingError> {
        let listed = self
            .inner
            .s3
            .list_with_delimiter(Some(&self.inner.replies_root()))
            .await
            .map_err(io_error)?;
        Ok(listed
            .objects
            .iter()
            .filter_map(|meta| meta.location.filename().and_then(SessionId::parse))
            .collect())
    }

    async fn committed(
        &self,
        id: SessionId,
        destination: &Destination,
        total: u64,
    ) -> Result<bool, StagingError> {
        let inner = &self.inner;
        let Some(state) = inner.list_state(id).await? else {
            return Ok(false);
        };
        if !state.done {
            return Ok(false);
        }
        match inner.s3.head(&inner.destination(destination)).await {
            Ok(meta) if meta.size == total => {
                inner.delete_session(id, true).await?;
                Ok(true)
            }
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(io_error(e)),
        }
    }
}

/// Any failure of the object store: transient from the client's point of view (500
/// `E_FAIL`), so it retries and the upload resumes when the store is back. A store that says
/// it is out of space or over its quota is the disk-full answer (500 `ERROR_DISK_FULL`).
fn io_error(e: object_store::Error) -> StagingError {
    let kind = if is_out_of_space(&e) {
        io::ErrorKind::QuotaExceeded
    } else {
        io::ErrorKind::Other
    };
    StagingError::Io(io::Error::new(kind, e))
}

/// The error codes S3-compatible services answer when a bucket is full: `QuotaExceeded`
/// (Ceph, many S3 APIs), `XMinioStorageFull` (MinIO), or 507 Insufficient Storage.
fn is_out_of_space(e: &object_store::Error) -> bool {
    let mut text = String::new();
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = current {
        text.push_str(&error.to_string());
        text.push('\n');
        current = error.source();
    }
    ["QuotaExceeded", "StorageFull", "Insufficient Storage"]
        .iter()
        .any(|code| text.contains(code))
}

/// A failure to publish: an existing key is a busy destination.
fn commit_error(e: object_store::Error) -> StagingError {
    match e {
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            StagingError::DestinationExists
        }
        e => io_error(e),
    }
}

/// A failed part upload; a multipart upload that is gone (aborted behind the server's back)
/// means the part is gone.
fn upload_error(e: object_store::Error) -> StagingError {
    match e {
        object_store::Error::NotFound { .. } => StagingError::PartMissing,
        e => io_error(e),
    }
}

fn too_many_parts() -> StagingError {
    StagingError::Io(io::Error::other(
        "the file needs more than 10,000 parts: raise the part size",
    ))
}
