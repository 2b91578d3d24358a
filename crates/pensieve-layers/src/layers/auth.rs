//! Optional API keys: `x-api-key` or `Authorization: Bearer`, compared in constant time.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, Request, Response};
use subtle::ConstantTimeEq;
use tower::{Layer, Service};

use super::{ResponseBody, ResponseFuture};
use crate::wire::{request_id, ApiError, ErrorKind, X_API_KEY};

/// Applies [`ApiKey`] to a service. With no keys, every request passes.
#[derive(Clone)]
pub struct ApiKeyLayer {
    keys: Arc<[Vec<u8>]>,
}

impl std::fmt::Debug for ApiKeyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyLayer").field("keys", &self.keys.len()).finish()
    }
}

impl ApiKeyLayer {
    /// Accepts any of `keys`; an empty list turns authentication off.
    pub fn new<I: IntoIterator<Item = String>>(keys: I) -> Self {
        Self {
            keys: keys.into_iter().map(String::into_bytes).collect(),
        }
    }
}

impl<S> Layer<S> for ApiKeyLayer {
    type Service = ApiKey<S>;

    fn layer(&self, inner: S) -> ApiKey<S> {
        ApiKey {
            inner,
            layer: self.clone(),
        }
    }
}

/// Answers 401 `authentication_error` unless the request carries a configured key.
#[derive(Clone, Debug)]
pub struct ApiKey<S> {
    inner: S,
    layer: ApiKeyLayer,
}

impl ApiKeyLayer {
    /// Whether `headers` carry one of the keys (always, with none configured); the refusal
    /// says what is missing or wrong.
    pub fn check(&self, headers: &http::HeaderMap) -> Result<(), ApiError> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let presented = headers.get(X_API_KEY).map(|v| v.as_bytes()).or_else(|| {
            // The scheme is case-insensitive (RFC 9110): `bearer` and `BEARER` too.
            headers.get(header::AUTHORIZATION).and_then(|v| {
                let v = v.as_bytes();
                (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..])
            })
        });
        let Some(presented) = presented else {
            return Err(ApiError::new(
                ErrorKind::Authentication,
                "missing API key: send it in the x-api-key header or as Authorization: Bearer <key>",
            ));
        };
        // Compare with every key, without stopping early, so timing says nothing about which.
        let ok = self
            .keys
            .iter()
            .fold(subtle::Choice::from(0), |acc, k| acc | k.as_slice().ct_eq(presented));
        if bool::from(ok) {
            Ok(())
        } else {
            Err(ApiError::new(ErrorKind::Authentication, "invalid API key"))
        }
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for ApiKey<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        match self.layer.check(req.headers()) {
            Ok(()) => ResponseFuture::inner(self.inner.call(req)),
            Err(e) => ResponseFuture::refused(e.to_response(request_id(req.headers()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tower::{service_fn, ServiceExt};

    async fn status(keys: &[&str], header: Option<(&str, &str)>) -> u16 {
        let svc = ApiKeyLayer::new(keys.iter().map(|k| k.to_string())).layer(service_fn(|_r: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(Bytes::new())))
        }));
        let mut req = Request::new(());
        if let Some((k, v)) = header {
            req.headers_mut()
                .insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        svc.oneshot(req).await.unwrap().status().as_u16()
    }

    #[tokio::test]
    async fn no_keys_means_open() {
        assert_eq!(status(&[], None).await, 200);
    }

    #[tokio::test]
    async fn x_api_key_and_bearer_both_work_and_wrong_keys_do_not() {
        assert_eq!(status(&["k1", "k2"], Some(("x-api-key", "k2"))).await, 200);
        assert_eq!(status(&["k1"], Some(("authorization", "Bearer k1"))).await, 200);
        assert_eq!(status(&["k1"], Some(("authorization", "bearer k1"))).await, 200);
        assert_eq!(status(&["k1"], Some(("authorization", "BEARER k1"))).await, 200);
        assert_eq!(status(&["k1"], Some(("x-api-key", "k"))).await, 401);
        assert_eq!(status(&["k1"], Some(("authorization", "Basic k1"))).await, 401);
        assert_eq!(status(&["k1"], None).await, 401);
    }
}
