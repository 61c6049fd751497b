//! The packet loop of one upload: Ping and Create-Session, fragments that follow the server's
//! offset, Close-Session, retries, restarts and cancellation.

use super::*;

/// How long a cancelled upload spends telling the server.
const CANCEL_BUDGET: Duration = Duration::from_secs(10);

/// How a Close-Session ended.
pub(super) enum Closed {
    Yes,
    /// The server did not know the session on the first try: the upload must start over.
    Lost,
}

pub(super) struct Driver {
    pub(super) client: BitsClient,
    /// The URL the upload was asked for.
    pub(super) original: Url,
    /// Where packets go: the original, or its `BITS-Host-Id` variant.
    pub(super) target: Url,
    /// `BITS-Host-Id-Fallback-Timeout`; `None` means never fall back.
    pub(super) fallback: Option<Duration>,
    /// A `BITS-Host-Id` host's certificate was refused: later ones are not followed.
    pub(super) host_id_refused: bool,
    /// Since when the Host-Id host has been unreachable.
    pub(super) unreachable_since: Option<Instant>,
    pub(super) session: Option<HeaderValue>,
    pub(super) source: UploadSource,
    pub(super) content_name: Option<HeaderValue>,
    pub(super) fragment_size: u64,
    /// The server's last `BITS-Received-Content-Range`.
    pub(super) acked: u64,
    /// The most the server has ever acknowledged in this session.
    pub(super) high_water: u64,
    pub(super) last_progress: Instant,
    pub(super) backoff: RetryDelay,
    pub(super) retries: u32,
    pub(super) restarts: u32,
    pub(super) reply: Option<ReplyTarget>,
    pub(super) tracker: Arc<Tracker>,
    pub(super) span: tracing::Span,
}

impl Driver {
    pub(super) async fn run(&mut self, resume: Option<HeaderValue>) -> Result<Uploaded, Error> {
        let started = Instant::now();
        let config = self.client.inner.config.clone();
        let mut probe = false;
        match resume {
            Some(id) => {
                self.set_session(id);
                probe = true;
            }
            None => {
                if config.ping {
                    self.ping().await?;
                }
                self.create().await?;
            }
        }
        let (reply_url, reply) = loop {
            let raw_reply_url = self.fragments(probe).await?;
            probe = false;
            let reply_url = raw_reply_url
                .as_deref()
                .map(|raw| reply::resolve(&self.original, raw))
                .transpose()?;
            let reply = match (&self.reply, &reply_url) {
                (Some(target), Some(url)) => {
                    let trusted = [self.original.clone(), self.target.clone()];
                    let target = target.clone();
                    let mut retries = self.retries;
                    let downloaded = reply::download(
                        &self.client,
                        url.clone(),
                        &target,
                        &trusted,
                        &self.tracker,
                        &mut retries,
                    )
                    .await;
                    self.retries = retries;
                    match downloaded {
                        Ok(reply) => Some(reply),
                        Err(e) => {
                            // Without the reply the session is of no further use: release
                            // the server's copy of it rather than leave it until it expires.
                            self.cancel_remote().await;
                            return Err(e);
                        }
                    }
                }
                _ => None,
            };
            match self.close().await? {
                Closed::Yes => break (reply_url, reply),
                Closed::Lost => self.restart().await?,
            }
        };
        self.tracker.update(|p| p.phase = UploadPhase::Finished);
        if self.reply.is_some() && reply_url.is_none() {
            return Err(Error::NoReplyUrl);
        }
        let session_id = self
            .session
            .as_ref()
            .map(|id| String::from_utf8_lossy(id.as_bytes()).into_owned())
            .unwrap_or_default();
        tracing::info!(elapsed = ?started.elapsed(), retries = self.retries, restarts = self.restarts, "upload complete");
        Ok(Uploaded {
            session_id,
            bytes: self.source.len(),
            reply_url,
            reply,
            retries: self.retries,
            restarts: self.restarts,
            elapsed: started.elapsed(),
        })
    }

    /// Ping the current target until it answers.
    async fn ping(&mut self) -> Result<(), Error> {
        loop {
            self.tracker.update(|p| p.phase = UploadPhase::Connecting);
            let answer = self
                .client
                .exchange(&self.target, PacketType::Ping, None, None)
                .await;
            match self.judge(PacketType::Ping, answer).await? {
                Some(Verdict::Done(_)) => return Ok(()),
                Some(Verdict::Transient(e)) => self.wait_retry(Error::Server(e)).await?,
                Some(Verdict::Fatal(e)) => return Err(e),
                Some(other) => return Err(unexpected(PacketType::Ping, StatusCode::OK, &other)),
                None => {}
            }
        }
    }

    /// Create-Session on the original URL, then follow `BITS-Host-Id`.
    async fn create(&mut self) -> Result<(), Error> {
        self.target = self.original.clone();
        self.fallback = None;
        self.unreachable_since = None;
        loop {
            self.tracker.update(|p| p.phase = UploadPhase::Connecting);
            let answer = self
                .client
                .exchange(&self.original, PacketType::CreateSession, None, None)
                .await;
            let status = answer.as_ref().map_or(StatusCode::OK, |a| a.status);
            let ack = match self.judge(PacketType::CreateSession, answer).await? {
                Some(Verdict::Done(ack)) => ack,
                // A lost session in answer to Create makes no sense; retry it like a 5xx.
                Some(Verdict::SessionLost) => {
                    self.wait_retry(Error::InvalidResponse {
                        packet: "Create-Session",
                        status,
                        reason: "BG_E_SESSION_NOT_FOUND in answer to Create-Session".into(),
                    })
                    .await?;
                    continue;
                }
                Some(Verdict::Transient(e)) => {
                    self.wait_retry(Error::Server(e)).await?;
                    continue;
                }
                Some(Verdict::Fatal(e)) => return Err(e),
                Some(other) => return Err(unexpected(PacketType::CreateSession, status, &other)),
                None => continue,
            };
            let Some(id) = ack.session_id().cloned() else {
                return Err(Error::InvalidResponse {
                    packet: "Create-Session",
                    status,
                    reason: "no BITS-Session-Id".into(),
                });
            };
            if let Some(protocol) = ack.protocol() {
                if !same_guid(protocol, UPLOAD_PROTOCOL) {
                    return Err(Error::ProtocolMismatch(protocol.to_owned()));
                }
            }
            self.set_session(id);
            // A new session is progress: the no-progress clock and the backoff start again.
            self.last_progress = Instant::now();
            self.backoff.reset();
            self.progress_to(0);
            let config = &self.client.inner.config;
            let follow = config.follow_host_id && !self.host_id_refused;
            if let (true, Some(host)) = (follow, ack.host_id()) {
                self.target = with_host(&self.original, host)?;
                self.fallback = ack.host_id_fallback_timeout().map(Duration::from_secs);
                tracing::debug!(host, fallback = ?self.fallback, "following BITS-Host-Id");
                if config.ping && self.target != self.original {
                    self.ping().await?;
                }
            }
            return Ok(());
        }
    }

    fn set_session(&mut self, id: HeaderValue) {
        let text = String::from_utf8_lossy(id.as_bytes()).into_owned();
        self.span.record("session", text.as_str());
        self.tracker.update(|p| p.session_id = Some(text));
        self.session = Some(id);
    }

    /// Fragments until the server has the whole file; returns the final Ack's
    /// `BITS-Reply-URL`.
    async fn fragments(&mut self, mut probe: bool) -> Result<Option<String>, Error> {
        let total = self.source.len();
        let mut offset = self.acked;
        // Acks in a row that took none of the bytes sent.
        let mut refused = 0u32;
        loop {
            let len = if probe {
                total.min(1)
            } else {
                self.fragment_size.min(total - offset)
            };
            let range = FragmentRange::new(offset, offset + len, total).ok_or_else(|| {
                Error::InvalidResponse {
                    packet: "Fragment",
                    status: StatusCode::OK,
                    reason: format!("no valid range at {offset} of {total}"),
                }
            })?;
            let data = self.source.fragment(offset, len).await?;
            self.tracker.update(|p| {
                p.phase = UploadPhase::Uploading;
                p.in_flight = 0;
                p.fragment_size = self.fragment_size;
            });
            let answer = self.send_fragment(range, &data).await;
            self.tracker.update(|p| p.in_flight = 0);
            let status = answer.as_ref().map_or(StatusCode::OK, |a| a.status);
            let Some(verdict) = self.judge(PacketType::Fragment, answer).await? else {
                // A transport failure, already waited for: resend from the last Ack.
                offset = self.acked;
                continue;
            };
            match verdict {
                Verdict::Received(ack, received) => {
                    if received > total {
                        return Err(Error::InvalidResponse {
                            packet: "Fragment",
                            status,
                            reason: format!(
                                "BITS-Received-Content-Range {received} is past the end ({total})"
                            ),
                        });
                    }
                    if received < self.high_water {
                        tracing::warn!(
                            received,
                            acknowledged = self.high_water,
                            "the server lost acknowledged bytes; sending them again"
                        );
                    }
                    probe = false;
                    self.progress_to(received);
                    if received == total {
                        let reply_url = ack.reply_url().map(str::to_owned);
                        if self.reply.is_some() && reply_url.is_none() && !range.is_final() {
                            // Complete, but this Ack was not the final fragment's: send the
                            // last byte again, whose Ack carries the reply URL (§5.5).
                            offset = total - 1;
                            continue;
                        }
                        return Ok(reply_url);
                    }
                    if received <= range.start() && !range.is_empty() {
                        refused += 1;
                        if refused >= 2 {
                            self.wait_retry(Error::InvalidResponse {
                                packet: "Fragment",
                                status,
                                reason: format!(
                                    "the server keeps taking none of the bytes sent from \
                                     {received}"
                                ),
                            })
                            .await?;
                        }
                    } else {
                        refused = 0;
                    }
                    offset = received;
                }
                Verdict::Shrink => match policy::shrink(len) {
                    Some(smaller) => {
                        tracing::info!(from = len, to = smaller, "413: smaller fragments");
                        self.fragment_size = smaller;
                    }
                    None => return Err(Error::FragmentTooLarge(len)),
                },
                Verdict::SessionLost => {
                    self.restart().await?;
                    offset = 0;
                    probe = false;
                }
                Verdict::Transient(e) => {
                    self.wait_retry(Error::Server(e)).await?;
                    offset = self.acked;
                }
                Verdict::Fatal(e) => return Err(e),
                other @ Verdict::Done(_) => {
                    return Err(unexpected(PacketType::Fragment, status, &other));
                }
            }
        }
    }

    /// The Fragment request; the future borrows nothing of `self` (the source need not be
    /// `Sync`).
    fn send_fragment(
        &self,
        range: FragmentRange,
        data: &FragmentData,
    ) -> impl Future<Output = Result<Answer, reqwest::Error>> + Send + 'static {
        let request = FragmentRequest {
            range: range.to_string(),
            len: range.len(),
            content_name: self.content_name.clone(),
            body: data.body(Arc::clone(&self.tracker)),
        };
        let (client, target, session) = (
            self.client.clone(),
            self.target.clone(),
            self.session.clone(),
        );
        async move {
            client
                .exchange(
                    &target,
                    PacketType::Fragment,
                    session.as_ref(),
                    Some(request),
                )
                .await
        }
    }

    /// Close-Session, re-sent on transient errors.
    async fn close(&mut self) -> Result<Closed, Error> {
        // Whether an earlier attempt may have reached the server.
        let mut maybe_closed = false;
        loop {
            self.tracker.update(|p| p.phase = UploadPhase::Closing);
            let answer = self
                .client
                .exchange(
                    &self.target,
                    PacketType::CloseSession,
                    self.session.as_ref(),
                    None,
                )
                .await;
            let status = answer.as_ref().map_or(StatusCode::OK, |a| a.status);
            match self.judge(PacketType::CloseSession, answer).await? {
                Some(Verdict::Done(_)) => return Ok(Closed::Yes),
                Some(Verdict::SessionLost) if maybe_closed => return Ok(Closed::Yes),
                Some(Verdict::SessionLost) => {
                    tracing::warn!(
                        "the server lost the session before Close-Session; starting over"
                    );
                    return Ok(Closed::Lost);
                }
                Some(Verdict::Transient(e)) => {
                    maybe_closed = true;
                    self.wait_retry(Error::Server(e)).await?;
                }
                Some(Verdict::Fatal(e)) => return Err(e),
                Some(other) => return Err(unexpected(PacketType::CloseSession, status, &other)),
                None => maybe_closed = true,
            }
        }
    }

    /// Best effort, bounded: tell the server the upload is abandoned.
    pub(super) async fn cancel_remote(&mut self) {
        let Some(id) = self.session.clone() else {
            return;
        };
        let (client, target) = (self.client.clone(), self.target.clone());
        let credentials = client.inner.config.sends_credentials();
        let attempt = async move {
            let mut backoff = RetryDelay::new(Duration::from_millis(250), Duration::from_secs(2));
            loop {
                match client
                    .exchange(&target, PacketType::CancelSession, Some(&id), None)
                    .await
                {
                    Ok(answer) => match judge(
                        PacketType::CancelSession,
                        answer.status,
                        answer.ack,
                        credentials,
                    ) {
                        Verdict::Transient(e) => tracing::debug!(%e, "Cancel-Session failed"),
                        Verdict::Fatal(e) => {
                            tracing::warn!(%e, "Cancel-Session refused");
                            return;
                        }
                        _ => return,
                    },
                    Err(e) => tracing::debug!(%e, "Cancel-Session failed"),
                }
                tokio::time::sleep(backoff.next_delay(policy::random())).await;
            }
        };
        if tokio::time::timeout(CANCEL_BUDGET, attempt).await.is_err() {
            tracing::warn!("the server did not take Cancel-Session; it will expire the session");
        } else {
            tracing::info!("upload cancelled");
        }
    }

    /// Start over in a new session, after `BG_E_SESSION_NOT_FOUND`.
    async fn restart(&mut self) -> Result<(), Error> {
        let max = self.client.inner.config.max_restarts;
        if self.restarts >= max {
            return Err(Error::TooManyRestarts(self.restarts));
        }
        self.restarts += 1;
        tracing::warn!(
            restarts = self.restarts,
            "the server lost the session; starting over"
        );
        self.session = None;
        self.acked = 0;
        self.high_water = 0;
        let restarts = self.restarts;
        self.tracker.update(|p| {
            p.restarts = restarts;
            p.acknowledged = 0;
            p.session_id = None;
        });
        self.create().await
    }

    /// Turns an exchange into a verdict; a transport failure is waited for here (with the
    /// Host-Id fallback) and gives `None`.
    async fn judge(
        &mut self,
        packet: PacketType,
        answer: Result<Answer, reqwest::Error>,
    ) -> Result<Option<Verdict>, Error> {
        match answer {
            Ok(answer) => {
                self.unreachable_since = None;
                let credentials = self.client.inner.config.sends_credentials();
                Ok(Some(judge(packet, answer.status, answer.ack, credentials)))
            }
            // The original host's certificate is refused: no retry can help.
            Err(e) if is_certificate_error(&e) && self.target == self.original => {
                Err(transport(packet, e))
            }
            Err(e) if is_certificate_error(&e) => {
                // The BITS-Host-Id host's certificate does not cover its name (a farm whose
                // certificate names only the public host): back to the original URL now, and
                // for the rest of this upload.
                tracing::warn!(
                    host = self.target.host_str(),
                    "the BITS-Host-Id host's certificate was refused; back to the original URL"
                );
                self.target = self.original.clone();
                self.unreachable_since = None;
                self.host_id_refused = true;
                self.wait_retry(transport(packet, e)).await?;
                Ok(None)
            }
            Err(e) => {
                if e.is_connect() && self.target != self.original {
                    let since = *self.unreachable_since.get_or_insert_with(Instant::now);
                    if self.fallback.is_some_and(|after| since.elapsed() >= after) {
                        tracing::warn!(
                            host = self.target.host_str(),
                            "the BITS-Host-Id host stayed unreachable; back to the original URL"
                        );
                        self.target = self.original.clone();
                        self.unreachable_since = None;
                    }
                }
                self.wait_retry(transport(packet, e)).await?;
                Ok(None)
            }
        }
    }

    /// Records an Ack's offset; a new high is progress.
    fn progress_to(&mut self, received: u64) {
        self.acked = received;
        if received > self.high_water {
            self.high_water = received;
            self.last_progress = Instant::now();
            self.backoff.reset();
        }
        self.tracker.update(|p| p.acknowledged = received);
    }

    /// Waits before a retry, or gives up after the no-progress timeout.
    async fn wait_retry(&mut self, error: Error) -> Result<(), Error> {
        let timeout = self.client.inner.config.no_progress_timeout;
        let elapsed = self.last_progress.elapsed();
        if elapsed >= timeout {
            return Err(Error::NoProgress {
                elapsed,
                last: Box::new(error),
            });
        }
        self.retries += 1;
        let delay = self
            .backoff
            .next_delay(policy::random())
            .min(timeout - elapsed);
        tracing::warn!(%error, ?delay, "retrying");
        let retries = self.retries;
        self.tracker.update(|p| {
            p.retries = retries;
            p.phase = UploadPhase::Retrying {
                delay,
                error: error.to_string(),
                reason: error.brief(),
            };
        });
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

/// GUIDs compare case-insensitively, braces optional (§3).
pub(super) fn same_guid(a: &str, b: &str) -> bool {
    let bare = |s: &str| {
        s.trim()
            .trim_start_matches('{')
            .trim_end_matches('}')
            .to_ascii_lowercase()
    };
    bare(a) == bare(b)
}

/// The URL with its host replaced by a `BITS-Host-Id` (scheme, port, path and query kept).
pub(super) fn with_host(url: &Url, host: &str) -> Result<Url, Error> {
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let mut moved = url.clone();
    moved
        .set_host(Some(&host))
        .map_err(|e| Error::InvalidResponse {
            packet: "Create-Session",
            status: StatusCode::OK,
            reason: format!("BITS-Host-Id {host:?}: {e}"),
        })?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_id_replaces_only_the_host() {
        let url = Url::parse("https://files.example.com:8443/orders/order.xml?acct=42").unwrap();
        assert_eq!(
            with_host(&url, "node7.example.com").unwrap().as_str(),
            "https://node7.example.com:8443/orders/order.xml?acct=42"
        );
        assert_eq!(
            with_host(&url, "10.0.0.7").unwrap().as_str(),
            "https://10.0.0.7:8443/orders/order.xml?acct=42"
        );
        assert_eq!(
            with_host(&url, "fe80::1").unwrap().as_str(),
            "https://[fe80::1]:8443/orders/order.xml?acct=42"
        );
        assert_eq!(
            with_host(&url, "[fe80::1]").unwrap().as_str(),
            "https://[fe80::1]:8443/orders/order.xml?acct=42"
        );
    }

    #[test]
    fn guids_compare_loosely() {
        assert!(same_guid(
            UPLOAD_PROTOCOL,
            "{7DF0354D-249B-430F-820D-3D2A9BEF4931}"
        ));
        assert!(same_guid(
            UPLOAD_PROTOCOL,
            "7df0354d-249b-430f-820d-3d2a9bef4931"
        ));
        assert!(!same_guid(
            UPLOAD_PROTOCOL,
            "{00000000-0000-0000-0000-000000000000}"
        ));
    }
}
