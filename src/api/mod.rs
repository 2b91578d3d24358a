//! The HTTP API: Anthropic's Messages API and the health endpoints.
//!
//! Handlers parse and check the request ([`translate`]), hand it to the [`Backend`], and answer
//! with one JSON message or a stream ([`sse`]). Every error goes through [`error::ApiError`].

pub mod dashboard;
pub mod error;
mod health;
pub mod openai;
pub mod sse;
pub mod threads;
pub mod translate;
pub mod types;
mod validate;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{OriginalUri, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use http::{HeaderMap, Method};

use crate::backend::{Backend, Chat, Event};
use crate::memory::Gate;
use crate::wire::{read_body, request_id, MaxBody};
use error::{ApiError, ErrorKind};

pub use health::{health, live, ready};

/// What handlers share: the backend and the state `/health` and `/metrics` show. Layer
/// settings are not here: the layers hold them, and say what a handler needs in the request's
/// extensions ([`MaxBody`], [`ParsedMessages`]).
#[derive(Clone)]
pub struct AppState {
    /// The backend that generates.
    pub backend: Arc<dyn Backend>,
    /// The memory gate (snapshot and thresholds), for `/health`.
    pub gate: Gate,
    /// How long a request may wait for its generation to start.
    pub queue_timeout: std::time::Duration,
    /// WebAssembly admission policies, when there are any (their status, for `/health`).
    pub policies: Option<Arc<crate::policy::PolicyEngine>>,
    /// What `/metrics` reports.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Conversations kept for message threads.
    pub threads: Arc<threads::Threads>,
    /// Responses kept for `previous_response_id`.
    pub responses: Arc<openai::responses::Kept>,
}

/// A Messages request the policy layer has already parsed, in the request's extensions.
#[derive(Clone, Debug)]
pub struct ParsedMessages(pub Arc<types::MessagesRequest>);

/// The policy layer's [`Describe`](crate::layers::Describe) hook: a Messages request is parsed
/// once, for the policy's fields and for the handler ([`ParsedMessages`]); any other body gives
/// its fields without being parsed whole.
pub fn describe(
    parts: &http::request::Parts,
    body: &bytes::Bytes,
    ext: &mut http::Extensions,
) -> Option<crate::layers::BodyFields> {
    let messages = parts.method == Method::POST && parts.uri.path().ends_with("/messages");
    match messages.then(|| translate::parse(body).ok()).flatten() {
        Some(m) => {
            let fields = crate::layers::BodyFields {
                model: Some(m.model.clone()),
                max_tokens: Some(m.max_tokens),
                stream: m.stream,
                ..Default::default()
            };
            ext.insert(ParsedMessages(Arc::new(m)));
            Some(fields)
        }
        None => crate::layers::BodyFields::from_json(parts, body),
    }
}

/// `GET /metrics`: Prometheus (OpenMetrics) text.
pub async fn metrics(State(app): State<AppState>) -> Response {
    let policies = app.policies.as_ref().map(|p| p.status()).unwrap_or_default();
    let text = app
        .metrics
        .render(&app.gate.snapshot().load(), &app.backend.status(), &policies);
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// `POST /v1/messages`
pub async fn messages(
    State(app): State<AppState>,
    parsed: Option<Extension<ParsedMessages>>,
    limit: Option<Extension<MaxBody>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let span = tracing::Span::current();
    let parsed = parsed.map(|Extension(ParsedMessages(req))| req);
    let id = request_id(&headers).map(str::to_owned);
    match handle_messages(&app, parsed, limit.map(|l| l.0), body, &span, id).await {
        Ok(res) => res,
        Err(e) => e.to_response(request_id(&headers)),
    }
}

async fn handle_messages(
    app: &AppState,
    parsed: Option<Arc<types::MessagesRequest>>,
    limit: Option<MaxBody>,
    body: Body,
    span: &tracing::Span,
    request_id: Option<String>,
) -> Result<Response, ApiError> {
    let timing = sse::Timing::start(app.metrics.clone());
    let req = match parsed {
        // The policy layer read and parsed it already.
        Some(req) => req,
        None => Arc::new(translate::parse(&read_body(body, limit).await?)?),
    };
    // A thread's kept conversation goes in front of the new messages, before any check.
    let thread = threads::param(&req)?;
    let req = match &thread {
        Some(threads::ThreadParam::Continue(previous)) => Arc::new(app.threads.history(previous)?.continued(&req)),
        _ => req,
    };
    let model = app.backend.resolve(&req.model)?;
    let mut backend_req = translate::to_backend(&req, false)?;
    backend_req.model = model.clone();
    let answer = answer_messages(
        app.clone(),
        req.clone(),
        backend_req,
        thread,
        span.clone(),
        request_id.clone(),
        timing,
    );
    answer_once_loaded(app, model, req.stream, request_id, sse::error_event, answer).await
}

/// Runs `answer`, a request's whole handling on `model`; a stream whose model is not loaded
/// goes through [`sse::while_loading`] (comments while the model loads), in every API.
pub(crate) async fn answer_once_loaded(
    app: &AppState,
    model: String,
    stream: bool,
    request_id: Option<String>,
    error_event: fn(&ApiError, Option<&str>) -> String,
    answer: impl std::future::Future<Output = Result<Response, ApiError>> + Send + 'static,
) -> Result<Response, ApiError> {
    if stream && !app.backend.is_loaded(&model) {
        sse::while_loading(model, request_id, error_event, answer).await
    } else {
        answer.await
    }
}

/// Runs a checked Messages request on its model (named in `backend_req`) and answers it,
/// streamed or not.
async fn answer_messages(
    app: AppState,
    req: Arc<types::MessagesRequest>,
    backend_req: crate::backend::GenerateRequest,
    thread: Option<threads::ThreadParam>,
    span: tracing::Span,
    request_id: Option<String>,
    timing: sse::Timing,
) -> Result<Response, ApiError> {
    let model = backend_req.model.clone();
    let (generation, input_tokens, cached_tokens) = start(&app, backend_req, &span).await?;
    // Anthropic's accounting: `input_tokens` are the ones processed, cache reads are apart.
    let prompt = types::Usage {
        input_tokens: input_tokens - cached_tokens,
        cache_read_input_tokens: cached_tokens,
        ..types::Usage::default()
    };
    // With a thread, the answered conversation is kept under the reply's id.
    let keep: Option<sse::OnReply> = thread.map(|_| {
        let threads = app.threads.clone();
        let req = req.clone();
        Box::new(move |reply: &types::Message| threads.keep(&reply.id, &req, &reply.content)) as sse::OnReply
    });
    if req.stream {
        Ok(sse::response(
            generation,
            model,
            prompt,
            span.clone(),
            timing,
            request_id,
            keep,
        ))
    } else {
        let reply = sse::collect(generation, model, prompt, &span, timing).await?;
        if let Some(keep) = keep {
            keep(&reply);
        }
        Ok(Json(reply).into_response())
    }
}

/// The model that answers to `name`, and its context (0 until it has loaded once): a 404 when
/// no model does and `server.fallback = "404"`.
pub(crate) fn model_for(app: &AppState, name: &str) -> Result<(String, u32), ApiError> {
    let model = app.backend.resolve(name)?;
    let context = app.backend.context_length(&model);
    Ok((model, context))
}

/// What a streamed call's input still lacks once the whole call is known, given the argument
/// text `sent` so far and the input as JSON (`whole`): all of it when nothing was sent, the
/// completion of a call cut short, nothing when the model wrote it other than as compact JSON
/// (what was sent already parses to the same input).
pub(crate) fn unsent_input<'a>(sent: &str, whole: &'a str) -> Option<&'a str> {
    let rest = if sent.trim().is_empty() {
        Some(whole)
    } else {
        whole.strip_prefix(sent)
    };
    rest.filter(|r| !r.is_empty())
}

/// Peak memory the chat template and tokenizer take per byte of prompt text. Measured on the
/// demo model's tokenizer: a 2.5 MB prompt (524,297 tokens) peaked at +375 MB while it was
/// rendered, 150 bytes a byte; the transformers tokenizers pensieve runs are of that kind.
pub(crate) const TOKENISE_BYTES_PER_BYTE: u64 = 160;
/// Below this estimated cost a prompt's tokenising is not weighed against memory: the tiers'
/// own admission covers it.
const TOKENISE_COST_FLOOR: u64 = 64 << 20;

/// Refuses, before anything tokenises it, a prompt that cannot fit or whose tokenising would
/// take the machine past the critical threshold:
/// - longer than `model`'s context however it tokenises ([`Chat::cannot_fit`]: a 30 MB
///   prompt would otherwise be tokenised whole, gigabytes of memory, before the context check);
///   a model not loaded yet is checked the same way by the backend once it is, before its
///   prompt is rendered;
/// - more to tokenise than memory has above `memory.critical_gb`: about
///   [`TOKENISE_BYTES_PER_BYTE`] bytes per byte of text (503 with retry-after when the machine
///   could hold it with more memory free, 400 when it never could).
pub(crate) fn prompt_fits(app: &AppState, model: &str, chat: &Chat) -> Result<(), ApiError> {
    let (context, per_token) = (app.backend.context_length(model), app.backend.max_token_bytes(model));
    let bytes = chat.text_bytes();
    if let Some(message) = crate::backend::too_long(bytes, context, per_token) {
        return Err(ApiError::invalid(message));
    }
    let cost = (bytes as u64).saturating_mul(TOKENISE_BYTES_PER_BYTE);
    let snapshot = app.gate.snapshot().load();
    let critical = app.gate.thresholds().critical;
    if cost < TOKENISE_COST_FLOOR
        || snapshot.available_bytes == 0
        || snapshot.available_bytes.saturating_sub(cost) > critical
    {
        return Ok(());
    }
    let gb = |b: u64| b as f64 / crate::memory::GIB;
    let message = format!(
        "this prompt ({:.1} MB of text) would take about {:.2} GB to tokenise, and {:.2} GB is available, with memory.critical_gb at {:.2} GB",
        bytes as f64 / (1 << 20) as f64,
        gb(cost),
        gb(snapshot.available_bytes),
        gb(critical)
    );
    if snapshot.total_bytes.saturating_sub(cost) > critical {
        Err(ApiError::new(ErrorKind::Overloaded, message).retry_after(app.gate.retry_after_secs()))
    } else {
        Err(ApiError::invalid(message))
    }
}

/// Hands `request` to the backend and waits until its prompt is tokenised, so that a refusal
/// before the start (prompt too long, memory fell while queued) is a proper HTTP error rather
/// than an event in a 200 stream. Returns the generation, its prompt tokens and how many of
/// them came from the prompt cache.
pub(crate) async fn start(
    app: &AppState,
    request: crate::backend::GenerateRequest,
    span: &tracing::Span,
) -> Result<(crate::backend::Generation, u32, u32), ApiError> {
    prompt_fits(app, &request.model, &request.chat)?;
    span.record("model", request.model.as_str());
    let mut generation = app.backend.generate(request)?;
    let first = tokio::time::timeout(app.queue_timeout, generation.events.recv())
        .await
        // Dropping `generation` here tells the backend to skip this request when it gets to it.
        .map_err(|_| queue_timeout(app.queue_timeout))?;
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
    Ok((generation, input_tokens, cached_tokens))
}

/// `POST /v1/messages/count_tokens`: exact, through the same template and tokenizer as
/// generation (system, tools and all). `max_tokens` is not needed here.
pub async fn count_tokens(
    State(app): State<AppState>,
    limit: Option<Extension<MaxBody>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let bytes = read_body(body, limit.map(|l| l.0)).await?;
        let mut value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::invalid(format!("request body is not valid JSON: {e}")))?;
        if let Some(obj) = value.as_object_mut() {
            // Not needed to count: the largest, so that no check that compares with it refuses.
            obj.entry("max_tokens").or_insert(u32::MAX.into());
        }
        let req = translate::parse(&serde_json::to_vec(&value).expect("json"))?;
        let model = app.backend.resolve(&req.model)?;
        let chat = translate::to_backend(&req, false)?.chat;
        prompt_fits(&app, &model, &chat)?;
        let pending = app.backend.count_tokens(&model, chat)?;
        let n = tokio::time::timeout(app.queue_timeout, pending)
            .await
            .map_err(|_| queue_timeout(app.queue_timeout))?
            .map_err(|_| ApiError::new(ErrorKind::Api, "the backend dropped the request"))??;
        Ok::<_, ApiError>(Json(serde_json::json!({"input_tokens": n})).into_response())
    }
    .await;
    result.unwrap_or_else(|e| e.to_response(request_id(&headers)))
}

fn model_object(m: &crate::backend::ModelStatus) -> serde_json::Value {
    let id = &m.name;
    // Anthropic's fields and OpenAI's together: both SDKs read the same object.
    let mut object = serde_json::json!({
        "type": "model",
        "object": "model",
        "id": id,
        "display_name": format!("{id} (local, served by pensieve)"),
        "created_at": MODEL_CREATED_AT,
        "created": MODEL_CREATED,
        "owned_by": "pensieve",
        "context_length": m.context_length,
        "tool_format": m.tool_format,
        "aliases": m.aliases,
        "loaded": m.loaded,
        "state": m.state,
        "default": m.default,
    });
    if let Some(progress) = m.load_progress {
        object["load_progress"] = serde_json::json!(progress);
    }
    object
}

/// Local models have no release date; the model object carries this fixed one.
const MODEL_CREATED_AT: &str = "2026-01-01T00:00:00Z";
/// The same date as Unix seconds, OpenAI's `created`.
const MODEL_CREATED: u64 = 1_767_225_600;

/// `GET /v1/models`: every configured model, loaded or not, in Anthropic's list shape.
pub async fn list_models(State(app): State<AppState>) -> Response {
    let data: Vec<serde_json::Value> = app.backend.status().models.iter().map(model_object).collect();
    let first = data.first().map(|m| m["id"].clone());
    let last = data.last().map(|m| m["id"].clone());
    Json(serde_json::json!({"object": "list", "data": data, "has_more": false, "first_id": first, "last_id": last}))
        .into_response()
}

/// `GET /v1/models/{id}`: the model that answers to `id` (a name, an alias, or the fallback).
pub async fn get_model(
    State(app): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let found = app.backend.resolve(&id).map_err(ApiError::from).and_then(|name| {
        let status = app.backend.status();
        status
            .models
            .iter()
            .find(|m| m.name == name)
            .map(model_object)
            .ok_or_else(|| ApiError::new(ErrorKind::NotFound, format!("model `{id}` is not served here")))
    });
    match found {
        Ok(m) => Json(m).into_response(),
        Err(e) => e.to_response(request_id(&headers)),
    }
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
