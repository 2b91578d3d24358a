//! One tracing span per request: id, method, path, tier, status, latency, and tokens in and
//! out when a generation ran. The closing event is written when the response body ends (or the
//! client goes away), so a stream's latency is the whole stream's.
//!
//! Handlers record `input_tokens` and `output_tokens` on `Span::current()`; the admission layer
//! records `tier`.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::{field::Empty, Span};

use crate::wire::{request_id, ApiError};

/// Applies [`Logging`] to a service.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoggingLayer;

impl<S> Layer<S> for LoggingLayer {
    type Service = Logging<S>;

    fn layer(&self, inner: S) -> Logging<S> {
        Logging { inner }
    }
}

/// Runs each request inside its own span and logs its end.
#[derive(Clone, Debug)]
pub struct Logging<S> {
    inner: S,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Logging<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<LoggedBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let span = tracing::info_span!(
            "request",
            id = request_id(req.headers()).unwrap_or("-"),
            method = %req.method(),
            path = req.uri().path(),
            model = Empty,
            tier = Empty,
            status = Empty,
            latency_ms = Empty,
            input_tokens = Empty,
            output_tokens = Empty,
        );
        let future = span.in_scope(|| self.inner.call(req));
        ResponseFuture {
            future,
            span,
            start: Instant::now(),
        }
    }
}

pin_project! {
    /// Response future of [`Logging`].
    pub struct ResponseFuture<F> {
        #[pin]
        future: F,
        span: Span,
        start: Instant,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<LoggedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _enter = this.span.enter();
        let res = ready!(this.future.poll(cx))?;
        this.span.record("status", res.status().as_u16());
        let error = res.extensions().get::<ApiError>().map(|e| e.message.clone());
        let done = Done {
            span: this.span.clone(),
            start: *this.start,
            status: res.status().as_u16(),
            error,
        };
        Poll::Ready(Ok(res.map(|body| LoggedBody { body, _done: done })))
    }
}

pin_project! {
    /// A response body that logs the request's end when it is finished or dropped.
    pub struct LoggedBody<B> {
        #[pin]
        body: B,
        _done: Done,
    }
}

/// Logs the end of a request when dropped.
pub struct Done {
    span: Span,
    start: Instant,
    status: u16,
    error: Option<String>,
}

impl Drop for Done {
    fn drop(&mut self) {
        let latency_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        self.span.record("latency_ms", latency_ms);
        let _enter = self.span.enter();
        match (&self.error, self.status) {
            (Some(error), s) if s >= 500 => {
                tracing::warn!(status = s, latency_ms, error, "request failed")
            }
            (Some(error), s) => tracing::info!(status = s, latency_ms, error, "request refused"),
            (None, s) => tracing::info!(status = s, latency_ms, "request finished"),
        }
    }
}

impl<B: Body<Data = Bytes>> Body for LoggedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
