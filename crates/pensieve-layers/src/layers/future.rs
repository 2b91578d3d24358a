//! The response future of layers that can answer early: the refusal is a response, not an
//! error, so `Error = S::Error` and the stack needs no `HandleErrorLayer`.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::Response;
use pin_project_lite::pin_project;

use super::ResponseBody;

pin_project! {
    /// Either the inner service's future or a refusal that is ready at once.
    #[project = ResponseFutureProj]
    #[allow(missing_docs)] // pin-project-lite takes no docs on variant fields
    pub enum ResponseFuture<F> {
        /// Waiting for the inner service.
        Inner { #[pin] future: F },
        /// The layer refused; the response is handed out on first poll.
        Refused { response: Option<Response<Bytes>> },
    }
}

impl<F> ResponseFuture<F> {
    /// The inner service's future.
    pub fn inner(future: F) -> Self {
        ResponseFuture::Inner { future }
    }

    /// A refusal.
    pub fn refused(response: Response<Bytes>) -> Self {
        ResponseFuture::Refused {
            response: Some(response),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Inner { future } => {
                let res = ready!(future.poll(cx))?;
                Poll::Ready(Ok(res.map(ResponseBody::inner)))
            }
            ResponseFutureProj::Refused { response } => {
                let res = response.take().expect("polled after completion");
                Poll::Ready(Ok(res.map(ResponseBody::from)))
            }
        }
    }
}
