//! The response future and body of [`BitsService`](crate::BitsService).

use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::BoxFuture;
use crate::download::Download;
use crate::file_body::FileBody;
use crate::protocol::{Ack, Hresult};

/// What the layer answers a request it handles: an Ack for `BITS_POST`, or a reply download.
pub(crate) enum Answer {
    Ack(Ack),
    Download(Download),
}

impl From<Ack> for Answer {
    fn from(ack: Ack) -> Self {
        Self::Ack(ack)
    }
}

pin_project! {
    /// Either the inner service's future (pass-through, untouched) or a BITS packet being
    /// handled.
    pub struct ResponseFuture<F, B> {
        #[pin]
        kind: Kind<F, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B> {
        Inner {
            #[pin]
            future: F,
        },
        Bits {
            future: BoxFuture<'static, Answer>,
            body: PhantomData<fn() -> B>,
        },
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn inner(future: F) -> Self {
        Self {
            kind: Kind::Inner { future },
        }
    }

    pub(crate) fn bits(future: BoxFuture<'static, Answer>) -> Self {
        Self {
            kind: Kind::Bits {
                future,
                body: PhantomData,
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            KindProj::Bits { future, .. } => {
                // A bug must not cost the client its connection and its answer: a panic
                // while handling a packet becomes a transient 500 error Ack.
                let polled =
                    std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx)));
                let answer = match polled {
                    Ok(poll) => ready!(poll),
                    Err(_) => {
                        tracing::error!("BITS packet handler panicked");
                        *future = Box::pin(std::future::pending());
                        Answer::Ack(Ack::error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            Hresult::E_FAIL,
                        ))
                    }
                };
                Poll::Ready(Ok(match answer {
                    Answer::Ack(ack) => ack.into_response(),
                    Answer::Download(download) => download.map(|body| match body {
                        Some(body) => ResponseBody::file(body),
                        None => ResponseBody::default(),
                    }),
                }))
            }
        }
    }
}

pin_project! {
    /// The inner service's body, the empty body of an Ack, or a reply being downloaded.
    pub struct ResponseBody<B> {
        #[pin]
        kind: BodyKind<B>,
    }
}

pin_project! {
    #[project = BodyKindProj]
    enum BodyKind<B> {
        Inner {
            #[pin]
            body: B,
        },
        Empty,
        File {
            #[pin]
            body: FileBody,
        },
    }
}

impl<B> ResponseBody<B> {
    fn inner(body: B) -> Self {
        Self {
            kind: BodyKind::Inner { body },
        }
    }

    fn file(body: FileBody) -> Self {
        Self {
            kind: BodyKind::File { body },
        }
    }
}

impl<B> Default for ResponseBody<B> {
    fn default() -> Self {
        Self {
            kind: BodyKind::Empty,
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Data: From<bytes::Bytes>,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            BodyKindProj::Inner { body } => body.poll_frame(cx),
            BodyKindProj::Empty => Poll::Ready(None),
            BodyKindProj::File { body } => match ready!(body.poll_frame(cx)) {
                Some(Ok(frame)) => Poll::Ready(Some(Ok(frame.map_data(B::Data::from)))),
                // The reply file failed under us. Ending early breaks the declared length, so
                // the connection is closed and the client resumes with a Range request.
                Some(Err(error)) => {
                    tracing::warn!(%error, "reading a reply failed mid-download");
                    Poll::Ready(None)
                }
                None => Poll::Ready(None),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Inner { body } => body.is_end_stream(),
            BodyKind::Empty => true,
            BodyKind::File { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Inner { body } => body.size_hint(),
            BodyKind::Empty => SizeHint::with_exact(0),
            BodyKind::File { body } => body.size_hint(),
        }
    }
}
