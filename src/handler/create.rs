//! Create-Session: checks the destination and the limits, reserves a place, writes the
//! record and the empty part, and answers with the session id.

use http::{HeaderValue, request::Parts};

use super::{Failure, finish};
use crate::admin::EndReason;
use crate::config::ValidConfig;
use crate::destination;
use crate::lifecycle::{State, shutting_down, uploads_disabled};
use crate::protocol::{Ack, CreateSession};
use crate::retention;
use crate::session::{
    CancelReason, Event, EventKind, Owner, Phase, SessionId, SessionRecord, duration_ms, now_ms,
};
use crate::shared::Shared;
use crate::store::StoreError;

pub(super) async fn create_session(
    shared: &Shared,
    parts: &Parts,
    create: CreateSession,
    owner: Option<Owner>,
) -> Ack {
    let config = &shared.config;
    let reply_mode = shared.reply.is_some();
    match shared.lifecycle.state() {
        State::Running => {}
        State::Draining | State::Stopped => return shutting_down(),
        State::Disabled => return uploads_disabled(),
    }
    let result = async {
        let destination =
            destination::from_url_path(parts.uri.path(), &config.prefix, &config.reserved)
                .inspect_err(|_| {
                    // Refused: the operator sees what the client asked for.
                    tracing::Span::current().record("destination", parts.uri.path());
                })?;
        tracing::Span::current().record("destination", tracing::field::display(&destination));
        // Upload-reply sessions hand their file to the application; many clients post to one
        // application URL, so they neither claim nor check the destination up front (a copy
        // the application asks for is checked at its commit).
        if !reply_mode {
            shared
                .staging
                .check_destination(&destination, config.allow_overwrites)
                .await?;
        }
        let id = SessionId::new();
        let request_url = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
        let mut record =
            SessionRecord::new(id, destination.to_string(), request_url, owner, now_ms());
        record.content_name = create.content_name;
        record.claims_destination = !reply_mode;
        record.origin = origin_of(config, parts);
        if record.owner.is_none() {
            record.peer = peer_of(parts);
        }
        if let Some(hooks) = &shared.hooks {
            hooks
                .on_create(&Event::new(&record, EventKind::Created, now_ms()))
                .await?;
        }
        {
            let _reserved = {
                let _serial = shared.create_lock.lock().await;
                let counted = record.counted_as();
                let (pending, pending_for_owner) = shared.pending_creates.counts(counted.as_ref());
                if shared.store.count_open().await? + pending >= config.max_sessions
                    && !reclaim_empty(shared).await?
                {
                    return Err(Failure::TooManySessions);
                }
                if let Some(counted) = &counted {
                    let limit = if record.owner.is_some() {
                        config.max_sessions_per_owner
                    } else {
                        config.max_sessions_per_peer
                    };
                    if shared.store.count_open_for(counted).await? + pending_for_owner >= limit {
                        return Err(Failure::OwnerLimit);
                    }
                }
                shared.pending_creates.reserve(counted)
            };
            match shared.store.create(&record).await {
                Err(StoreError::DestinationBusy { holder })
                    if take_over_abandoned(shared, holder, record.owner.as_ref()).await? =>
                {
                    shared.store.create(&record).await?;
                }
                other => other?,
            }
        }
        if let Err(error) = shared.create_part(&record).await {
            if let Err(e) = shared.store.remove(id).await {
                tracing::error!(error = %e, session = %id, "cannot remove the record of a failed Create-Session");
            }
            return Err(error.into());
        }
        tracing::Span::current().record("session", tracing::field::display(id));
        shared.warn_if_no_sweeper();
        crate::metrics::session_created();
        match &record.owner {
            Some(owner) => tracing::info!(%destination, %owner, "session created"),
            None => tracing::info!(%destination, peer = ?record.peer, "session created"),
        }
        let id = HeaderValue::from_str(&id.to_string())
            .expect("a braced GUID is a valid header value");
        let mut ack = Ack::ok().session_id(id).protocol();
        if let Some(host) = &config.host_id_header {
            ack = ack.host_id(host.clone(), config.host_id_fallback_timeout);
        }
        Ok(ack)
    }
    .await;
    finish(shared, result)
}

/// `scheme://authority` the client addressed: the configured public origin, or the request's
/// own (absolute-form target, else the `Host` header, over `http`).
fn origin_of(config: &ValidConfig, parts: &Parts) -> Option<String> {
    if let Some(origin) = &config.public_origin {
        return Some(origin.clone());
    }
    let implied = if config.https { "https" } else { "http" };
    let scheme = parts.uri.scheme_str().unwrap_or(implied);
    let authority = match parts.uri.authority() {
        Some(authority) => authority.clone(),
        None => {
            let host = parts.headers.get(http::header::HOST)?.to_str().ok()?;
            host.parse::<http::uri::Authority>().ok()?
        }
    };
    // User info (`user@host`) names no host of ours; such an origin is not repeated in URLs.
    if authority.as_str().contains('@') {
        return None;
    }
    Some(format!("{scheme}://{authority}"))
}

/// The client's address, if the application put one in the request: [`PeerAddr`], or axum's
/// `ConnectInfo<SocketAddr>`. An IPv4 address mapped into IPv6 counts as the IPv4 address, and
/// an IPv6 address by its /64 prefix, since one client is usually given a whole /64.
fn peer_of(parts: &Parts) -> Option<std::net::IpAddr> {
    let ip = match parts.extensions.get::<crate::PeerAddr>() {
        Some(peer) => peer.0,
        None => connect_info(parts)?,
    };
    Some(match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(prefix.into())
        }
        v4 => v4,
    })
}

#[cfg(feature = "axum")]
fn connect_info(parts: &Parts) -> Option<std::net::IpAddr> {
    use axum::extract::ConnectInfo;
    let ConnectInfo(addr) = parts
        .extensions
        .get::<ConnectInfo<std::net::SocketAddr>>()?;
    Some(addr.ip())
}

#[cfg(not(feature = "axum"))]
fn connect_info(_: &Parts) -> Option<std::net::IpAddr> {
    None
}

/// The server is full: cancels the oldest session that never received a byte and has been
/// idle for `reclaim_empty_after`, so that sessions created and left empty cannot keep
/// everyone else out for the whole session timeout. Returns whether a place was freed.
async fn reclaim_empty(shared: &Shared) -> Result<bool, Failure> {
    let idle = duration_ms(shared.config.reclaim_empty_after);
    let cutoff = now_ms().saturating_sub(idle);
    let is_empty = |r: &SessionRecord| {
        r.phase == Phase::Receiving && r.received == 0 && r.is_idle_since(cutoff)
    };
    let mut candidates = shared.store.list_idle(cutoff).await?;
    candidates.retain(is_empty);
    candidates.sort_by_key(|r| r.updated_ms);
    // A few tries: a candidate may be busy, or have moved on since it was listed.
    for candidate in candidates.iter().take(8) {
        let Some(mut stale) = shared.try_lock_session(candidate.id).await? else {
            continue;
        };
        if !is_empty(&stale.record) {
            stale.unlock().await;
            continue;
        }
        shared.staging.discard(stale.record.id).await?;
        let reclaimed = stale
            .amend(|r| {
                let reason = CancelReason::Reclaimed;
                shared.queue(r, EventKind::Cancelled { reason });
                r.end(Phase::Cancelled);
            })
            .await;
        if reclaimed.is_ok() {
            stale.deliver().await;
        }
        let record = stale.record.clone();
        stale.unlock().await;
        reclaimed?;
        tracing::info!(session = %record.id, "server full: reclaimed a session that never received a byte");
        retention::session_ended(shared, &record, EndReason::Reclaimed).await;
        return Ok(true);
    }
    Ok(false)
}

/// A client whose Create-Session Ack was lost retries Create-Session; its first session then
/// holds the destination and would answer 409 until it expired (days). A holder of the same
/// owner that never received a byte and has been idle for a while is such an orphan: cancel
/// it so the new session can proceed. Returns whether the destination was freed.
async fn take_over_abandoned(
    shared: &Shared,
    holder: SessionId,
    owner: Option<&Owner>,
) -> Result<bool, Failure> {
    // A holder whose lock is taken has a packet in flight: not abandoned. (Waiting for it
    // here would stall every Create-Session behind the create lock.)
    let Some(mut stale) = shared.try_lock_session(holder).await? else {
        return Ok(false);
    };
    let record = &stale.record;
    let abandoned = record.phase == Phase::Receiving
        && record.total.is_none()
        && record.received == 0
        && record.owner.as_ref() == owner
        && record
            .is_idle_since(now_ms().saturating_sub(duration_ms(shared.config.abandoned_after)));
    if !abandoned {
        return Ok(false);
    }
    shared.staging.discard(holder).await?;
    stale.save(|r| r.end(Phase::Cancelled)).await?;
    tracing::info!(%holder, "replaced a session that never received a byte");
    retention::session_ended(shared, &stale.record, EndReason::Replaced).await;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(target: &str, host: Option<&str>) -> Parts {
        let mut request = http::Request::builder().uri(target);
        if let Some(host) = host {
            request = request.header(http::header::HOST, host);
        }
        request.body(()).expect("request").into_parts().0
    }

    #[test]
    fn the_origin_comes_from_the_configuration_or_the_request_and_never_carries_user_info() {
        let config = crate::config::Config::default().validate().expect("config");
        let origin = |target, host| origin_of(&config, &parts(target, host));
        assert_eq!(
            origin("/a.bin", Some("bits.example:8080")).as_deref(),
            Some("http://bits.example:8080")
        );
        assert_eq!(
            origin("http://other.example/a.bin", Some("bits.example")).as_deref(),
            Some("http://other.example")
        );
        assert_eq!(origin("/a.bin", None), None);
        assert_eq!(origin("/a.bin", Some("app@127.0.0.1:9")), None);
        assert_eq!(
            origin("http://app@127.0.0.1:9/a.bin", Some("bits.example")),
            None
        );
        let config = crate::config::Config {
            public_origin: Some("https://public.example".into()),
            ..crate::config::Config::default()
        }
        .validate()
        .expect("config");
        assert_eq!(
            origin_of(&config, &parts("/a.bin", Some("app@127.0.0.1:9"))).as_deref(),
            Some("https://public.example")
        );
    }
}
