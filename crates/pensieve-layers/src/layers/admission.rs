//! Memory admission: refuse new work when the memory tier is Critical or Emergency.
//!
//! The layer asks a [`Gate`](crate::memory::Gate), which only loads the latest
//! [`MemorySnapshot`](crate::memory::MemorySnapshot) published by the background sampler: an
//! atomic load, no syscall and no lock on the request path. A refusal is a 503 response with
//! `retry-after`, the memory headers and an Anthropic `overloaded_error` body that says the
//! tier, the memory available and the threshold. Reads (`GET`, `HEAD`, `OPTIONS`) are never
//! refused: they allocate nothing, and `/v1/models` should answer while memory is short.
//!
//! ```
//! use pensieve_layers::layers::AdmissionLayer;
//! use pensieve_layers::memory::{Gate, MemorySnapshot, SnapshotHandle, Thresholds};
//! let snapshot = SnapshotHandle::new(MemorySnapshot::unknown());
//! let thresholds = Thresholds { warning: 2 << 30, critical: 1 << 30, emergency: 1 << 29, hysteresis: 0.1 };
//! let layer = AdmissionLayer::new(Gate::new(snapshot, thresholds, 5));
//! # let _ = layer;
//! ```

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use tower::{Layer, Service};

use super::{memory_headers, ResponseBody, ResponseFuture};
use crate::memory::{Gate, Tier};
use crate::wire::{request_id, ApiError};

/// Applies [`Admission`] to a service.
#[derive(Clone, Debug)]
pub struct AdmissionLayer {
    gate: Gate,
}

impl AdmissionLayer {
    /// Refuses while `gate` does.
    pub fn new(gate: Gate) -> Self {
        Self { gate }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            gate: self.gate.clone(),
        }
    }
}

/// Refuses requests while memory is short. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Admission<S> {
    inner: S,
    gate: Gate,
}

impl<S> Admission<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// The tier a request was admitted under, in the request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmittedTier(pub Tier);

impl<S, ReqB, ResB> Service<Request<ReqB>> for Admission<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let snapshot = self.gate.snapshot().load();
        tracing::Span::current().record("tier", snapshot.tier.as_str());
        let read = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        match self.gate.decide(&snapshot) {
            Ok(tier) => {
                req.extensions_mut().insert(AdmittedTier(tier));
                ResponseFuture::inner(self.inner.call(req))
            }
            Err(_) if read => ResponseFuture::inner(self.inner.call(req)),
            Err(refusal) => {
                tracing::warn!(tier = %snapshot.tier, available_gb = snapshot.available_gb(), "refused for memory");
                let mut res: Response<Bytes> = ApiError::from(refusal).to_response(request_id(req.headers()));
                memory_headers(res.headers_mut(), &snapshot);
                ResponseFuture::refused(res)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MemoryConfig;
    use crate::memory::{MemorySnapshot, SnapshotHandle, Source, Thresholds};
    use http_body_util::BodyExt;
    use tower::{service_fn, ServiceExt};

    fn snapshot(tier: Tier, gb: f64) -> MemorySnapshot {
        MemorySnapshot {
            tier,
            available_bytes: (gb * crate::memory::GIB) as u64,
            total_bytes: 16 << 30,
            source: Source::Custom,
            ..MemorySnapshot::unknown()
        }
    }

    async fn call(s: MemorySnapshot) -> Response<ResponseBody<http_body_util::Full<Bytes>>> {
        call_with(s, Method::POST).await
    }

    async fn call_with(s: MemorySnapshot, method: Method) -> Response<ResponseBody<http_body_util::Full<Bytes>>> {
        let handle = SnapshotHandle::new(s);
        let gate = Gate::new(handle, Thresholds::from_config(&MemoryConfig::default()), 7);
        let svc = AdmissionLayer::new(gate).layer(service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(Bytes::from("ok"))))
        }));
        let mut req = Request::new(());
        *req.method_mut() = method;
        svc.oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn safe_and_warning_reach_the_inner_service() {
        for tier in [Tier::Safe, Tier::Warning] {
            let res = call(snapshot(tier, 3.0)).await;
            assert_eq!(res.status(), 200);
            assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ok");
        }
    }

    #[tokio::test]
    async fn critical_is_a_503_with_retry_after_headers_and_an_overloaded_body() {
        let res = call(snapshot(Tier::Critical, 0.8)).await;
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()["retry-after"], "7");
        assert_eq!(res.headers()["x-memory-status"], "Critical");
        assert_eq!(res.headers()["x-available-memory-gb"], "0.80");
        let body: serde_json::Value =
            serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["error"]["type"], "overloaded_error");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("Critical") && msg.contains("0.80 GB") && msg.contains("1.00 GB"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn emergency_is_refused_too() {
        assert_eq!(call(snapshot(Tier::Emergency, 0.1)).await.status(), 503);
    }

    #[tokio::test]
    async fn reads_are_never_refused() {
        for method in [Method::GET, Method::HEAD] {
            assert_eq!(call_with(snapshot(Tier::Emergency, 0.1), method).await.status(), 200);
        }
    }
}
