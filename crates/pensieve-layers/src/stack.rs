//! The `/v1` layer stack, built from the configuration: what the server runs in front of its
//! API, and what an app of your own puts in front of its handler.
//!
//! ```text
//! request-id ─ error shape ─ logging ─ propagate request-id ─ metrics ─ catch-panic ─ memory headers
//!   ─ auth ─ body limit ─ WASM policies ─ memory admission ─ your service
//! ```
//!
//! `[layers]` switches `logging`, `memory_headers`, `auth`, `policies` and `admission`; a layer
//! switched off is not in the stack at all. Request ids, error shapes, catch-panic, the body limit and (when
//! given a [`Metrics`]) metrics always run. Each layer is a plain tower layer of
//! [`crate::layers`]; this is the one place where the configuration becomes their values.
//!
//! The stack renders every error in the shape of the route's API (Anthropic's, or OpenAI's on
//! `/v1/chat/completions` and `/v1/responses`): see [`ErrorShapeLayer`].
//!
//! ```no_run
//! use pensieve_layers::config::GuardConfig;
//! use pensieve_layers::memory::{Gate, MemorySnapshot, SnapshotHandle, Thresholds};
//! use pensieve_layers::stack::{Body, Stack};
//! use tower::Layer;
//!
//! let config = GuardConfig::load(None)?;
//! let snapshot = SnapshotHandle::new(MemorySnapshot::unknown());
//! let gate = Gate::new(snapshot, Thresholds::from_config(&config.memory), config.memory.retry_after_secs);
//! let service = Stack::new(&config, gate).layer(tower::service_fn(|_req: http::Request<Body>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(Body::from("hello")))
//! }));
//! # let _ = service;
//! # Ok::<(), pensieve_layers::config::ConfigError>(())
//! ```
//!
//! [`Guard::stack`](crate::guard::Guard::stack) builds it with the sampler, policies and metrics
//! a [`Guard`](crate::guard::Guard) started.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use tower::util::{BoxCloneSyncService, MapRequest};
use tower::{Layer, Service, ServiceExt};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};

use crate::config::{GuardConfig, HeaderMode, LayersConfig};
use crate::layers::{
    AdmissionLayer, ApiKeyLayer, BodyLimitLayer, ErrorShapeLayer, InFlight, LoggingLayer, MemoryHeadersLayer,
    MetricsLayer,
};
#[cfg(feature = "policies")]
use crate::layers::{Describe, PolicyLayer};
use crate::memory::Gate;
use crate::metrics::Metrics;
#[cfg(feature = "policies")]
use crate::policy::PolicyEngine;
use crate::wire::{ApiError, ErrorKind, MakeRequestId, REQUEST_ID};

/// The body type inside the stack, requests and responses alike (axum's, a boxed body).
pub type Body = axum_core::body::Body;

/// A stage of the stack: requests and responses with [`Body`], errors of the wrapped service.
type Boxed<E> = BoxCloneSyncService<Request<Body>, Response<Body>, E>;

/// Builds the `/v1` stack. See the [module docs](self).
#[derive(Clone)]
pub struct Stack {
    switches: LayersConfig,
    gate: Gate,
    header_mode: HeaderMode,
    fixed_headers: HeaderMap,
    api_keys: Vec<String>,
    max_body_bytes: usize,
    #[cfg(feature = "policies")]
    policies: Option<Arc<PolicyEngine>>,
    #[cfg(feature = "policies")]
    describe: Option<Describe>,
    in_flight: Option<InFlight>,
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("switches", &self.switches)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

impl Stack {
    /// The stack `config` asks for (`[layers]`, `[server]`, `[memory]`), admitting by `gate`.
    pub fn new(config: &GuardConfig, gate: Gate) -> Self {
        let mut fixed_headers = HeaderMap::new();
        for (k, v) in &config.server.headers {
            // Validated when the configuration was loaded.
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::try_from(v.as_str())) {
                fixed_headers.insert(k, v);
            }
        }
        Self {
            switches: config.layers,
            gate,
            header_mode: config.memory.headers,
            fixed_headers,
            api_keys: config.server.api_keys.clone(),
            max_body_bytes: (config.server.max_body_mb as usize).saturating_mul(1024 * 1024),
            #[cfg(feature = "policies")]
            policies: None,
            #[cfg(feature = "policies")]
            describe: None,
            in_flight: None,
            metrics: None,
        }
    }

    /// Runs `engine`'s policies (when `[layers] policies` is on).
    #[cfg(feature = "policies")]
    pub fn policies(mut self, engine: Arc<PolicyEngine>) -> Self {
        self.policies = Some(engine);
        self
    }

    /// Tells policies what a body holds with `describe` (see [`PolicyLayer::describe`]).
    #[cfg(feature = "policies")]
    pub fn describe(mut self, describe: Describe) -> Self {
        self.describe = Some(describe);
        self
    }

    /// Tells policies how many generations run.
    pub fn in_flight(mut self, count: InFlight) -> Self {
        self.in_flight = Some(count);
        self
    }

    /// Counts requests and refusals into `metrics`.
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The gate admission asks.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The policies it runs, if any.
    #[cfg(feature = "policies")]
    pub fn policy_engine(&self) -> Option<&Arc<PolicyEngine>> {
        self.policies.as_ref()
    }

    /// The metrics it counts into, if any.
    pub fn http_metrics(&self) -> Option<&Arc<Metrics>> {
        self.metrics.as_ref()
    }
}

impl<S, B, E> Layer<S> for Stack
where
    S: Service<Request<Body>, Response = Response<B>, Error = E> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
    E: 'static,
{
    type Service = V1<E>;

    fn layer(&self, inner: S) -> V1<E> {
        let on = self.switches;
        // Innermost first: each stage takes and gives `Body`, so any layer can be left out.
        let mut svc: Boxed<E> = stage(inner);
        if on.admission {
            svc = stage(AdmissionLayer::new(self.gate.clone()).layer(svc));
        }
        #[cfg(feature = "policies")]
        if let Some(engine) = self.policies.as_ref().filter(|_| on.policies) {
            let mut layer = PolicyLayer::new(engine.clone(), self.gate.snapshot().clone());
            if let Some(count) = &self.in_flight {
                layer = layer.in_flight(count.clone());
            }
            if let Some(describe) = &self.describe {
                layer = layer.describe(describe.clone());
            }
            svc = stage(layer.layer(from_body(svc)));
        }
        svc = stage(BodyLimitLayer::new(self.max_body_bytes).layer(from_body(svc)));
        if on.auth {
            svc = stage(ApiKeyLayer::new(self.api_keys.clone()).layer(svc));
        }
        if on.memory_headers {
            let headers = MemoryHeadersLayer::new(
                self.gate.snapshot().clone(),
                self.header_mode,
                self.fixed_headers.clone(),
            );
            svc = stage(headers.layer(svc));
        }
        svc = stage(CatchPanicLayer::custom(panic_response as PanicResponse).layer(svc));
        if let Some(metrics) = &self.metrics {
            svc = stage(MetricsLayer::new(metrics.clone()).layer(svc));
        }
        svc = stage(PropagateRequestIdLayer::new(REQUEST_ID).layer(svc));
        if on.logging {
            svc = stage(LoggingLayer.layer(svc));
        }
        // One stage with the request ids (no box of its own: it is on every request's path).
        V1(stage(
            SetRequestIdLayer::new(REQUEST_ID, MakeRequestId).layer(ErrorShapeLayer.layer(svc)),
        ))
    }
}

/// What catch-panic answers: a 500 `api_error`, the panic in the log only.
pub type PanicResponse = fn(Box<dyn std::any::Any + Send>) -> Response<Body>;

/// See [`PanicResponse`].
pub fn panic_response(_panic: Box<dyn std::any::Any + Send>) -> Response<Body> {
    tracing::error!("a handler panicked");
    ApiError::new(ErrorKind::Api, "internal server error").to_response(None)
}

/// Boxes a stage, turning its response body into [`Body`].
fn stage<S, B, E>(svc: S) -> Boxed<E>
where
    S: Service<Request<Body>, Response = Response<B>, Error = E> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    BoxCloneSyncService::new(svc.map_response(|res| res.map(Body::new)))
}

/// A stage behind a layer that hands on requests with another body type.
type FromBody<B, E> = MapRequest<Boxed<E>, fn(Request<B>) -> Request<Body>>;

/// Lets a layer that changes the request body (the body limit, the policies) wrap a stage.
fn from_body<B, E>(svc: Boxed<E>) -> FromBody<B, E>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    MapRequest::new(svc, |req: Request<B>| req.map(Body::new))
}

/// The `/v1` stack around a service: takes requests with any body, answers with [`Body`].
#[derive(Clone)]
pub struct V1<E>(Boxed<E>);

impl<E> std::fmt::Debug for V1<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("V1")
    }
}

impl<B, E> Service<Request<B>> for V1<E>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    type Response = Response<Body>;
    type Error = E;
    type Future = <Boxed<E> as Service<Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.0.call(req.map(Body::new))
    }
}
