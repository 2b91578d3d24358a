//! Body limit: 413 `request_too_large` for a body over the limit, decided from
//! `content-length` at once, or while reading a body without one.
//!
//! The request body is wrapped in [`http_body_util::Limited`]; a handler that reads past the
//! limit gets a [`LengthLimitError`](http_body_util::LengthLimitError), which the API maps to
//! the same 413 (see `api::read_body`).

use std::task::{Context, Poll};

use http::{header, Request, Response};
use http_body_util::Limited;
use tower::{Layer, Service};

use super::{request_id, ResponseBody, ResponseFuture};
use crate::api::error::{ApiError, ErrorKind};

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

/// The error for a body over `limit` bytes.
pub fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        ErrorKind::RequestTooLarge,
        format!(
            "request body is larger than the limit of {} bytes (server.max_body_mb)",
            limit
        ),
    )
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for BodyLimit<S>
where
    S: Service<Request<Limited<ReqB>>, Response = Response<ResB>>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.limit as u64) {
            let res = too_large(self.limit).to_response(request_id(req.headers()));
            return ResponseFuture::refused(res);
        }
        let limit = self.limit;
        ResponseFuture::inner(self.inner.call(req.map(|b| Limited::new(b, limit))))
    }
}
