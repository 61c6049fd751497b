//! The tower service: `BITS_POST` under the prefix is handled here, everything else goes to
//! the inner service untouched.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::destination::strip_prefix;
use crate::download;
use crate::future::{Answer, ResponseFuture};
use crate::handler;
use crate::protocol::is_bits_post;
use crate::replies::parse_reply_path;
use crate::session::SessionId;
use crate::shared::Shared;

/// Serves BITS upload packets in front of an inner service. Made by
/// [`BitsLayer`](crate::BitsLayer).
///
/// Its error type is the inner service's: a BITS packet never fails at the service level, it
/// always gets an Ack.
pub struct BitsService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> BitsService<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn intercepts<B>(&self, request: &Request<B>) -> bool {
        is_bits_post(request.method())
            && strip_prefix(request.uri().path(), &self.shared.config.prefix).is_some()
    }

    /// The session whose reply a GET or HEAD asks for, in upload-reply mode.
    fn reply_request<B>(&self, request: &Request<B>) -> Option<SessionId> {
        self.shared.reply.as_ref()?;
        if !matches!(*request.method(), Method::GET | Method::HEAD) {
            return None;
        }
        parse_reply_path(request.uri().path(), &self.shared.config.prefix)
    }
}

impl<S: Clone> Clone for BitsService<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for BitsService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitsService")
            .field("inner", &self.inner)
            .field("prefix", &self.shared.config.prefix)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for BitsService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<crate::BoxError>,
    ResBody: Body,
    ResBody::Data: From<bytes::Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if self.intercepts(&request) {
            let shared = self.shared.clone();
            ResponseFuture::bits(Box::pin(async move {
                Answer::Ack(handler::handle(shared, request).await)
            }))
        } else if let Some(id) = self.reply_request(&request) {
            let shared = self.shared.clone();
            let (parts, _body) = request.into_parts();
            ResponseFuture::bits(Box::pin(async move {
                Answer::Download(download::respond(&shared, &parts, id).await)
            }))
        } else {
            ResponseFuture::inner(self.inner.call(request))
        }
    }
}
