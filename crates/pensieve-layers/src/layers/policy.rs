//! WASM admission policies as a layer: every request it wraps is put to the loaded policies'
//! `decide`, and the first rejection is the response.
//!
//! With policies loaded, the layer reads the (already size-limited) body once and builds the
//! policy's `request` record from the real method, path and headers (credentials never
//! passed) and the body's `model`, `max_tokens` (or `max_completion_tokens`,
//! `max_output_tokens`) and `stream`. An application that parses the body anyway gives the
//! layer a [`Describe`] hook: it parses once, returns the fields and leaves what it parsed in
//! the request's extensions for its handler (the server does this for Messages requests). The
//! body goes on as the bytes read. With no policy configured, the request passes untouched:
//! no read, no copy.
//!
//! `decide` runs on tokio's blocking pool, never on an async worker: a policy may run for up to
//! `policies.timeout_ms`, and WASI's synchronous bindings block on a runtime of their own.
//!
//! ```no_run
//! # use std::sync::Arc;
//! use pensieve_layers::layers::PolicyLayer;
//! use pensieve_layers::memory::{MemorySnapshot, SnapshotHandle};
//! use pensieve_layers::policy::PolicyEngine;
//! let engine = Arc::new(PolicyEngine::new(&Default::default()).unwrap());
//! engine.load_dir();
//! let layer = PolicyLayer::new(engine, SnapshotHandle::new(MemorySnapshot::unknown()));
//! # let _ = layer;
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use http_body_util::{Either, Full};
use tower::{Layer, Service};

use super::{InFlight, ResponseBody};
use crate::memory::SnapshotHandle;
use crate::policy::{memory_record, Decision, PolicyEngine};
use crate::wire::{read_body, request_id, ApiError, ErrorKind, MaxBody};

/// Headers that never reach a policy.
const SECRET: [&str; 4] = ["authorization", "x-api-key", "cookie", "proxy-authorization"];

/// What a policy is told of a request's body. `None`: the body says nothing (not JSON, not a
/// generation request); the hook may also leave what it parsed in the extensions.
pub type Describe =
    Arc<dyn Fn(&http::request::Parts, &Bytes, &mut http::Extensions) -> Option<BodyFields> + Send + Sync>;

/// The fields of a body a policy's `request` record holds, whichever API it is for.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub struct BodyFields {
    /// `model`
    #[serde(default)]
    pub model: Option<String>,
    /// `max_tokens` (Anthropic, OpenAI Chat Completions' older name)
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// `max_completion_tokens` (OpenAI Chat Completions)
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// `max_output_tokens` (OpenAI Responses)
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    /// `stream`
    #[serde(default)]
    pub stream: bool,
}

impl BodyFields {
    /// The fields of any JSON body (of a POST), without parsing the rest of it.
    pub fn from_json(parts: &http::request::Parts, body: &[u8]) -> Option<BodyFields> {
        (parts.method == http::Method::POST)
            .then(|| serde_json::from_slice(body).ok())
            .flatten()
    }
}

/// Applies [`Policies`] to a service.
#[derive(Clone)]
pub struct PolicyLayer {
    engine: Arc<PolicyEngine>,
    snapshot: SnapshotHandle,
    in_flight: Option<InFlight>,
    describe: Option<Describe>,
}

impl std::fmt::Debug for PolicyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyLayer")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl PolicyLayer {
    /// Runs `engine`'s policies, with memory from `snapshot`.
    pub fn new(engine: Arc<PolicyEngine>, snapshot: SnapshotHandle) -> Self {
        Self {
            engine,
            snapshot,
            in_flight: None,
            describe: None,
        }
    }

    /// Reads a body's fields with `describe` instead of [`BodyFields::from_json`].
    pub fn describe(mut self, describe: Describe) -> Self {
        self.describe = Some(describe);
        self
    }

    /// Tells policies how many generations run (`in_flight`; 0 without it).
    pub fn in_flight(mut self, count: InFlight) -> Self {
        self.in_flight = Some(count);
        self
    }
}

impl<S> Layer<S> for PolicyLayer {
    type Service = Policies<S>;

    fn layer(&self, inner: S) -> Policies<S> {
        Policies {
            inner,
            layer: self.clone(),
        }
    }
}

/// Puts requests to the WASM policies. See the [module docs](self).
#[derive(Clone)]
pub struct Policies<S> {
    inner: S,
    layer: PolicyLayer,
}

/// The request body the inner service gets: the original, or the bytes the layer read.
pub type PolicyBody<B> = Either<B, Full<Bytes>>;

/// The response future of [`Policies`].
pub type PolicyFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqB, ResB> Service<Request<ReqB>> for Policies<S>
where
    S: Service<Request<PolicyBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    ReqB: Body + Send + 'static,
    ReqB::Data: Send,
    ReqB::Error: Into<tower::BoxError>,
    ResB: Send + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = PolicyFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if self.layer.engine.is_empty() {
            let future = self.inner.call(req.map(Either::Left));
            return Box::pin(async move { Ok(future.await?.map(ResponseBody::inner)) });
        }
        // The service that was made ready is the one to call; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let id = request_id(&parts.headers).map(str::to_owned);
            let refuse = |e: ApiError| Ok(e.to_response::<Bytes>(id.as_deref()).map(ResponseBody::from));
            let bytes = match read_body(body, parts.extensions.get::<MaxBody>().copied()).await {
                Ok(bytes) => bytes,
                Err(e) => return refuse(e),
            };
            // Parsed once: by the application's hook (which may keep what it parsed in the
            // extensions, for its handler), else the few fields a policy reads.
            let mut extensions = http::Extensions::new();
            let fields = match &layer.describe {
                Some(describe) => describe(&parts, &bytes, &mut extensions),
                None => BodyFields::from_json(&parts, &bytes),
            };
            let record = crate::policy::Request {
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
                model: fields.as_ref().and_then(|f| f.model.clone()),
                max_tokens: fields
                    .as_ref()
                    .and_then(|f| f.max_tokens.or(f.max_completion_tokens).or(f.max_output_tokens)),
                // An estimate: the exact count needs the tokenizer, on the backend thread.
                input_tokens: fields.as_ref().map(|_| (bytes.len() / 4) as u32),
                streaming: fields.as_ref().is_some_and(|f| f.stream),
                in_flight: layer.in_flight.as_ref().map_or(0, |count| count()),
                headers: visible_headers(&parts.headers),
            };
            let memory = memory_record(&layer.snapshot.load());
            let engine = layer.engine.clone();
            let decision = match tokio::task::spawn_blocking(move || engine.decide(&record, &memory)).await {
                Ok(decision) => decision,
                Err(_) => return refuse(ApiError::new(ErrorKind::Api, "an admission policy panicked the host")),
            };
            if let Decision::Reject {
                policy,
                status,
                error_type,
                message,
                retry_after_secs,
            } = decision
            {
                tracing::info!(%policy, status, "refused by policy");
                return refuse(ApiError::from_policy(
                    policy,
                    status,
                    error_type,
                    message,
                    retry_after_secs,
                ));
            }
            let mut req = Request::from_parts(parts, Either::Right(Full::new(bytes)));
            req.extensions_mut().extend(extensions);
            Ok(inner.call(req).await?.map(ResponseBody::inner))
        })
    }
}

fn visible_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(k, _)| !SECRET.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}
