//! Memory headers and static headers on every response.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{HeaderMap, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::memory_headers;
pub use crate::config::HeaderMode;
use crate::memory::SnapshotHandle;

/// Applies [`MemoryHeaders`] to a service.
#[derive(Clone, Debug)]
pub struct MemoryHeadersLayer {
    snapshot: SnapshotHandle,
    mode: HeaderMode,
    fixed: Arc<HeaderMap>,
}

impl MemoryHeadersLayer {
    /// Memory headers per `mode` (refusals set their own), and `fixed` on every response.
    pub fn new(snapshot: SnapshotHandle, mode: HeaderMode, fixed: HeaderMap) -> Self {
        Self {
            snapshot,
            mode,
            fixed: Arc::new(fixed),
        }
    }
}

impl<S> Layer<S> for MemoryHeadersLayer {
    type Service = MemoryHeaders<S>;

    fn layer(&self, inner: S) -> MemoryHeaders<S> {
        MemoryHeaders {
            inner,
            layer: self.clone(),
        }
    }
}

/// Adds `x-memory-status`, `x-available-memory-gb` and configured headers to responses.
#[derive(Clone, Debug)]
pub struct MemoryHeaders<S> {
    inner: S,
    layer: MemoryHeadersLayer,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for MemoryHeaders<S>
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
            future: self.inner.call(req),
            layer: self.layer.clone(),
        }
    }
}

pin_project! {
    /// Response future of [`MemoryHeaders`].
    pub struct ResponseFuture<F> {
        #[pin]
        future: F,
        layer: MemoryHeadersLayer,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.future.poll(cx))?;
        let headers = res.headers_mut();
        // A refusal has already set the values it was decided on; keep those.
        if this.layer.mode == HeaderMode::Always && !headers.contains_key(crate::wire::X_MEMORY_STATUS) {
            memory_headers(headers, &this.layer.snapshot.load());
        }
        for (name, value) in this.layer.fixed.iter() {
            headers.insert(name, value.clone());
        }
        Poll::Ready(Ok(res))
    }
}
