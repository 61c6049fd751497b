//! The response future of [`BitsService`](crate::BitsService).

use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Response, StatusCode};

use pin_project_lite::pin_project;

use crate::BoxFuture;
use crate::body::ResponseBody;
use crate::download::Download;
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
