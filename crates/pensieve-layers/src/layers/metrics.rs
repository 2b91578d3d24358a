//! Request metrics: every response counted by route and status, and admission refusals by
//! who refused (memory tier, policy), read from the [`ApiError`] the response carries in its
//! extensions. No header text is parsed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::metrics::{route_of, Metrics};
use crate::wire::{ApiError, RefusedBy};

/// Applies [`RecordMetrics`] to a service.
#[derive(Clone, Debug)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl MetricsLayer {
    /// Records into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = RecordMetrics<S>;

    fn layer(&self, inner: S) -> RecordMetrics<S> {
        RecordMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// Counts responses and refusals. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct RecordMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for RecordMetrics<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        ResponseFuture {
            route: route_of(req.uri().path()),
            metrics: self.metrics.clone(),
            future: self.inner.call(req),
        }
    }
}

pin_project! {
    /// Response future of [`RecordMetrics`].
    pub struct ResponseFuture<F> {
        #[pin]
        future: F,
        route: &'static str,
        metrics: Arc<Metrics>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.future.poll(cx))?;
        this.metrics.request(this.route, res.status().as_u16());
        match res.extensions().get::<ApiError>().and_then(|e| e.refused_by.as_ref()) {
            Some(RefusedBy::Memory(tier)) => this.metrics.memory_refusal(tier),
            Some(RefusedBy::Policy(name)) => this.metrics.policy_refusal(name),
            None => {}
        }
        Poll::Ready(Ok(res))
    }
}
