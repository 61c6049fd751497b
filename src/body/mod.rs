//! The response body of [`BitsService`](crate::BitsService): the inner service's body, the
//! empty body of an Ack, or a reply file being downloaded ([`file`]).

pub(crate) mod file;

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use file::FileBody;

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
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: BodyKind::Inner { body },
        }
    }

    pub(crate) fn file(body: FileBody) -> Self {
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
