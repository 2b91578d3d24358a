//! Body limit: 413 `request_too_large` for a body over the limit, decided from
//! `content-length` at once, or while reading a body without one.
//!
//! The request body is wrapped in [`http_body_util::Limited`]; a handler that reads past the
//! limit gets a [`LengthLimitError`](http_body_util::LengthLimitError), which the API maps to
//! the same 413 (see `api::read_body`).
//!
//! A refusal by `content-length` reads the declared body and throws it away before it answers
//! (up to [`DRAIN_FACTOR`] times the limit, for at most [`DRAIN_TIMEOUT`]). Answering while the
//! client is still sending would make the server close a socket with unread data, which the
//! kernel turns into a reset: the client would see a broken connection instead of the 413.
//! A body larger than that is not read; the 413 carries `connection: close`. A client that sent
//! `expect: 100-continue` has not sent its body yet, and gets the 413 at once.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body::Body;
use http_body_util::Limited;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::{ResponseBody, ResponseFuture};
use crate::wire::{request_id, too_large, MaxBody, DRAIN_FACTOR, DRAIN_TIMEOUT};

/// Applies [`BodyLimit`] to a service.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimitLayer {
    limit: usize,
}

impl BodyLimitLayer {
    /// Bodies over `limit` bytes are refused.
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> BodyLimit<S> {
        BodyLimit {
            inner,
            limit: self.limit,
        }
    }
}

/// Refuses bodies over the limit. See the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit<S> {
    inner: S,
    limit: usize,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for BodyLimit<S>
where
    S: Service<Request<Limited<ReqB>>, Response = Response<ResB>>,
    ReqB: Body,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = LimitFuture<S::Future, ReqB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        req.extensions_mut().insert(MaxBody(self.limit));
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match declared {
            Some(n) if n > self.limit as u64 => {
                let mut res = too_large(self.limit).to_response(request_id(req.headers()));
                // A client that sent `expect: 100-continue` waits for a go-ahead that it will
                // not get (hyper sends it only when the body is read): it has nothing to send
                // yet, so the answer can go at once.
                let waits = req
                    .headers()
                    .get(header::EXPECT)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
                if waits {
                    return LimitFuture::Ready {
                        future: ResponseFuture::refused(res),
                    };
                }
                if n > self.limit as u64 * DRAIN_FACTOR {
                    res.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    return LimitFuture::Ready {
                        future: ResponseFuture::refused(res),
                    };
                }
                LimitFuture::Draining {
                    body: req.into_body(),
                    deadline: tokio::time::sleep(DRAIN_TIMEOUT),
                    response: Some(res),
                }
            }
            _ => {
                let limit = self.limit;
                LimitFuture::Ready {
                    future: ResponseFuture::inner(self.inner.call(req.map(|b| Limited::new(b, limit)))),
                }
            }
        }
    }
}

pin_project! {
    /// The response future of [`BodyLimit`]: the inner service's, or a refusal that is
    /// answered once the refused body has been read (see the [module docs](self)).
    #[project = LimitFutureProj]
    #[allow(missing_docs)] // pin-project-lite takes no docs on variant fields
    pub enum LimitFuture<F, B> {
        /// The inner service, or a refusal ready at once.
        Ready { #[pin] future: ResponseFuture<F> },
        /// Reading the refused body; then the refusal.
        Draining {
            #[pin] body: B,
            #[pin] deadline: tokio::time::Sleep,
            response: Option<Response<Bytes>>,
        },
    }
}

impl<F, B, ResB, E> Future for LimitFuture<F, B>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    B: Body,
{
    type Output = Result<Response<ResponseBody<ResB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            LimitFutureProj::Ready { future } => future.poll(cx),
            LimitFutureProj::Draining {
                mut body,
                deadline,
                response,
            } => {
                let timed_out = deadline.poll(cx).is_ready();
                if !timed_out {
                    // Until the end, or a broken body: either way there is nothing more to read.
                    while let Some(Ok(_)) = ready!(body.as_mut().poll_frame(cx)) {}
                }
                let mut res = response.take().expect("polled after completion");
                if timed_out {
                    res.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Poll::Ready(Ok(res.map(ResponseBody::from)))
            }
        }
    }
}
