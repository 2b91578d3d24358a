//! Error shape: an error response (one that carries its [`ApiError`]) is rendered in the wire
//! shape of the route's API ([`Dialect::of_path`]): OpenAI's on `/v1/chat/completions` and
//! `/v1/responses`, Anthropic's elsewhere. Whoever refused (a layer, the handler) built the
//! error without knowing the route. Status, `retry-after` and other headers stay; the body
//! carries the response's `request-id` (the stack propagates it), read only when rendering, so
//! that a request that succeeds pays no allocation here.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::wire::{request_id, ApiError, Dialect};

/// Applies [`ErrorShape`] to a service.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorShapeLayer;

impl<S> Layer<S> for ErrorShapeLayer {
    type Service = ErrorShape<S>;

    fn layer(&self, inner: S) -> ErrorShape<S> {
        ErrorShape { inner }
    }
}

/// Renders error responses for the route's API. See the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct ErrorShape<S> {
    inner: S,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for ErrorShape<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: From<Bytes>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let dialect = Dialect::of_path(req.uri().path());
        ResponseFuture {
            future: self.inner.call(req),
            dialect,
        }
    }
}

pin_project! {
    /// Response future of [`ErrorShape`].
    pub struct ResponseFuture<F> {
        #[pin]
        future: F,
        dialect: Dialect,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: From<Bytes>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.future.poll(cx))?;
        // Errors are built in Anthropic's shape: only another dialect is rendered again.
        if *this.dialect != Dialect::Anthropic {
            if let Some(e) = res.extensions().get::<ApiError>() {
                let body = e.body_in(*this.dialect, request_id(res.headers()));
                let h = res.headers_mut();
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                h.remove(header::CONTENT_LENGTH);
                *res.body_mut() = B::from(body);
            }
        }
        Poll::Ready(Ok(res))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ErrorKind;
    use tower::ServiceExt;

    async fn refused(path: &str) -> serde_json::Value {
        let svc = ErrorShapeLayer.layer(tower::service_fn(|_req: Request<()>| async {
            // As the stack answers: the request id propagated onto the response.
            let mut res = ApiError::new(ErrorKind::Overloaded, "memory is Critical")
                .retry_after(5)
                .to_response::<Bytes>(Some("req_1"));
            res.headers_mut()
                .insert(crate::wire::REQUEST_ID, http::HeaderValue::from_static("req_1"));
            Ok::<_, std::convert::Infallible>(res)
        }));
        let res = svc
            .oneshot(Request::builder().uri(path).body(()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()["retry-after"], "5");
        serde_json::from_slice(res.body()).unwrap()
    }

    #[tokio::test]
    async fn a_refusal_speaks_the_routes_api() {
        let v = refused("/v1/chat/completions").await;
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(v["error"]["code"], "overloaded");
        assert_eq!(v["error"]["request_id"], "req_1");
        let v = refused("/v1/messages").await;
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "overloaded_error");
    }
}
