//! The HTTP API: Anthropic's Messages API and the health endpoints.
//!
//! Handlers parse and check the request ([`translate`]), hand it to the [`Backend`], and answer
//! with one JSON message or a stream ([`sse`]). Every error goes through [`error::ApiError`].

pub mod error;
mod health;
pub mod sse;
pub mod translate;
pub mod types;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{OriginalUri, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{HeaderMap, Method};

use crate::backend::{Backend, Event};
use crate::layers::request_id;
use crate::memory::{SnapshotHandle, Thresholds};
use error::{ApiError, ErrorKind};

pub use health::{health, live, ready};

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The backend that generates.
    pub backend: Arc<dyn Backend>,
    /// The latest memory snapshot.
    pub snapshot: SnapshotHandle,
    /// For `/health`'s view of the tiers.
    pub thresholds: Thresholds,
    /// Largest body accepted, for the 413 message.
    pub max_body_bytes: usize,
    /// How long a request may wait for its generation to start.
    pub queue_timeout: std::time::Duration,
    /// WebAssembly admission policies, when there are any.
    pub policies: Option<Arc<crate::policy::PolicyEngine>>,
    /// What `/metrics` reports.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// `GET /metrics`: Prometheus (OpenMetrics) text.
pub async fn metrics(State(app): State<AppState>) -> Response {
    let policies = app.policies.as_ref().map(|p| p.status()).unwrap_or_default();
    let text = app
        .metrics
        .render(&app.snapshot.load(), &app.backend.status(), &policies);
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Counts every request by route and status, and memory refusals by tier.
pub async fn track(State(app): State<AppState>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = crate::metrics::route_of(req.uri().path());
    let res = next.run(req).await;
    let status = res.status().as_u16();
    app.metrics.request(route, status);
    if status == 503 {
        if let Some(tier) = res
            .headers()
            .get(crate::layers::X_MEMORY_STATUS)
            .and_then(|t| t.to_str().ok())
        {
            if tier == "Critical" || tier == "Emergency" {
                app.metrics.memory_refusal(tier);
            }
        }
    }
    res
}

/// `POST /v1/messages`
pub async fn messages(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let span = tracing::Span::current();
    match handle_messages(&app, &headers, body, &span).await {
        Ok(res) => res,
        Err(e) => e.to_response(request_id(&headers)),
    }
}

async fn handle_messages(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
    span: &tracing::Span,
) -> Result<Response, ApiError> {
    let timing = sse::Timing::start(app.metrics.clone());
    let bytes = read_body(body, app.max_body_bytes).await?;
    let req = translate::parse(&bytes)?;
    let backend_req = translate::to_backend(&req, false)?;
    if let Some(policies) = app.policies.as_ref().filter(|p| !p.is_empty()) {
        let record = policy_request(app, headers, &req, bytes.len());
        let mem = crate::policy::memory_record(&app.snapshot.load());
        // WASI's synchronous bindings block on a runtime of their own, which a tokio worker
        // must not do: policies run on the blocking pool.
        let engine = policies.clone();
        let decision = tokio::task::spawn_blocking(move || engine.decide(&record, &mem))
            .await
            .map_err(|_| ApiError::new(ErrorKind::Api, "an admission policy panicked the host"))?;
        if let crate::policy::Decision::Reject {
            policy,
            status,
            error_type,
            message,
            retry_after_secs,
        } = decision
        {
            tracing::info!(%policy, status, "refused by policy");
            app.metrics.policy_refusal(&policy);
            return Err(ApiError::from_policy(status, error_type, message, retry_after_secs));
        }
    }
    let mut generation = app.backend.generate(backend_req)?;
    // Wait until the prompt is tokenised, so that a refusal before the start (prompt too long,
    // memory fell while queued) is a proper HTTP error rather than an event in a 200 stream.
    let first = tokio::time::timeout(app.queue_timeout, generation.events.recv())
        .await
        .map_err(|_| {
            // Dropping `generation` here tells the backend to skip this request when it gets to it.
            ApiError::new(
                ErrorKind::RateLimit,
                format!(
                    "waited {} ms for the model without starting (backend.queue_timeout_ms); retry later",
                    app.queue_timeout.as_millis()
                ),
            )
            .retry_after(5)
        })?;
    let (input_tokens, cached_tokens) = match first {
        Some(Event::Started {
            input_tokens,
            cached_tokens,
        }) => (input_tokens, cached_tokens),
        Some(Event::Failed(e)) => return Err(e.into()),
        Some(other) => {
            tracing::error!(?other, "backend sent an event before Started");
            return Err(ApiError::new(ErrorKind::Api, "the backend answered out of order"));
        }
        None => return Err(ApiError::new(ErrorKind::Api, "the backend dropped the request")),
    };
    span.record("input_tokens", input_tokens);
    app.metrics.prompt(input_tokens, cached_tokens);
    // Anthropic's accounting: `input_tokens` are the ones processed, cache reads are apart.
    let prompt = types::Usage {
        input_tokens: input_tokens - cached_tokens,
        cache_read_input_tokens: cached_tokens,
        ..types::Usage::default()
    };
    let model = app.backend.model().to_owned();
    if req.stream {
        Ok(sse::response(generation, model, prompt, span.clone(), timing))
    } else {
        Ok(Json(sse::collect(generation, model, prompt, span, timing).await?).into_response())
    }
}

/// What policies see of a request. Credentials never reach them.
fn policy_request(
    app: &AppState,
    headers: &HeaderMap,
    req: &types::MessagesRequest,
    body_len: usize,
) -> crate::policy::Request {
    const SECRET: [&str; 4] = ["authorization", "x-api-key", "cookie", "proxy-authorization"];
    crate::policy::Request {
        method: "POST".into(),
        path: "/v1/messages".into(),
        model: Some(req.model.clone()),
        max_tokens: Some(req.max_tokens),
        // An estimate: the exact count needs the tokenizer, which runs on the backend thread.
        input_tokens: Some((body_len / 4) as u32),
        streaming: req.stream,
        in_flight: app.backend.status().active_generations,
        headers: headers
            .iter()
            .filter(|(k, _)| !SECRET.contains(&k.as_str()))
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
    }
}

/// `POST /v1/messages/count_tokens`: exact, through the same template and tokenizer as
/// generation (system, tools and all). `max_tokens` is not needed here.
pub async fn count_tokens(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let bytes = read_body(body, app.max_body_bytes).await?;
        let mut value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::invalid(format!("request body is not valid JSON: {e}")))?;
        if let Some(obj) = value.as_object_mut() {
            obj.entry("max_tokens").or_insert(1.into());
        }
        let req = translate::parse(&serde_json::to_vec(&value).expect("json"))?;
        let chat = translate::to_backend(&req, false)?.chat;
        let pending = app.backend.count_tokens(chat)?;
        let n = tokio::time::timeout(app.queue_timeout, pending)
            .await
            .map_err(|_| queue_timeout(app.queue_timeout))?
            .map_err(|_| ApiError::new(ErrorKind::Api, "the backend dropped the request"))??;
        Ok::<_, ApiError>(Json(serde_json::json!({"input_tokens": n})).into_response())
    }
    .await;
    result.unwrap_or_else(|e| e.to_response(request_id(&headers)))
}

fn model_object(app: &AppState) -> serde_json::Value {
    let id = app.backend.model();
    serde_json::json!({
        "type": "model",
        "id": id,
        "display_name": format!("{id} (local, served by pensieve)"),
        "created_at": MODEL_CREATED_AT,
        "context_length": app.backend.context_length(),
    })
}

/// Local models have no release date; the model object carries this fixed one.
const MODEL_CREATED_AT: &str = "2026-01-01T00:00:00Z";

/// `GET /v1/models`: the loaded model, in Anthropic's list shape.
pub async fn list_models(State(app): State<AppState>) -> Response {
    let m = model_object(&app);
    let id = m["id"].clone();
    Json(serde_json::json!({"data": [m], "has_more": false, "first_id": id, "last_id": id})).into_response()
}

/// `GET /v1/models/{id}`: any name is served by the loaded model, so any id answers with it.
pub async fn get_model(State(app): State<AppState>) -> Response {
    Json(model_object(&app)).into_response()
}

fn queue_timeout(waited: std::time::Duration) -> ApiError {
    ApiError::new(
        ErrorKind::RateLimit,
        format!(
            "waited {} ms for the model without starting (backend.queue_timeout_ms); retry later",
            waited.as_millis()
        ),
    )
    .retry_after(5)
}

/// Reads a whole body; a body over the limit of `BodyLimitLayer` is a 413.
pub async fn read_body(mut body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    use http_body_util::BodyExt;
    let mut buf = bytes::BytesMut::new();
    loop {
        match body.frame().await {
            None => return Ok(buf.freeze()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) if is_over_limit(&e) => {
                drop(buf);
                // Read the rest before answering, as the limit layer does for a declared
                // length: a client still sending when the server closes sees a reset, not the
                // 413. Past the limit, every frame reads as an error; only the time is bounded.
                let rest = async { while body.frame().await.is_some() {} };
                let _ = tokio::time::timeout(crate::layers::DRAIN_TIMEOUT, rest).await;
                return Err(crate::layers::too_large(limit));
            }
            Some(Err(e)) => return Err(ApiError::invalid(format!("could not read the request body: {e}"))),
        }
    }
}

fn is_over_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Unknown paths: 404 `not_found_error`.
pub async fn not_found(method: Method, OriginalUri(uri): OriginalUri, headers: HeaderMap) -> Response {
    ApiError::new(
        ErrorKind::NotFound,
        format!("no such endpoint: {method} {}", uri.path()),
    )
    .to_response(request_id(&headers))
}

/// Known paths with the wrong method.
pub async fn method_not_allowed(method: Method, OriginalUri(uri): OriginalUri, headers: HeaderMap) -> Response {
    ApiError::new(
        ErrorKind::MethodNotAllowed,
        format!("{method} is not allowed on {}", uri.path()),
    )
    .to_response(request_id(&headers))
}
