//! `POST /v1/responses`: OpenAI's Responses API, streamed and not, as Codex CLI and the OpenAI
//! SDK's `responses.create` use it.
//!
//! `instructions` and `input` (a string, or items: messages, `function_call`,
//! `function_call_output`; `reasoning` items are skipped) become the normalised chat; function
//! tools (also inside a `namespace`) go to the template; tools with no local meaning
//! (`web_search`, `file_search`, …) are left out, since Codex always sends them. A response is
//! kept in memory (bounded, with message threads' store) unless `store` is false, so that
//! `previous_response_id` continues it; an id not kept is a 404.

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use http::HeaderMap;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::super::error::{ApiError, ErrorKind};
use super::super::threads::Bounded;
use super::super::{answer_once_loaded, model_for, start, AppState};
use super::chat::{constraint, message, output_format, strict_functions, text_of, tool_choice};
use crate::backend::{Chat, ChatMessage, GenerateRequest, Sampling};
use crate::wire::{read_body, request_id, MaxBody};

/// The request.
#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    input: Value,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    tools: Vec<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    /// A model's name or alias (`server.fallback` says what other names get).
    #[serde(default)]
    model: String,
    #[serde(default)]
    max_output_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    store: Option<bool>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    text: Option<Value>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// Fields accepted and without effect here.
const IGNORED: &[&str] = &[
    "reasoning",
    "include",
    "prompt_cache_key",
    "client_metadata",
    "parallel_tool_calls",
    "metadata",
    "user",
    "service_tier",
    "truncation",
    "safety_identifier",
    "prompt_cache_retention",
    "stream_options",
    "max_tool_calls",
];

/// The request's fields that the response object repeats (OpenAI's defaults where not given).
fn echo(req: &ResponsesRequest) -> Map<String, Value> {
    let given = |key: &str, default: Value| req.rest.get(key).filter(|v| !v.is_null()).cloned().unwrap_or(default);
    let mut text = req.text.clone().filter(Value::is_object).unwrap_or_else(|| json!({}));
    if text.get("format").is_none_or(Value::is_null) {
        text["format"] = json!({"type": "text"});
    }
    let mut out = Map::new();
    out.insert(
        "instructions".into(),
        req.instructions.clone().map_or(Value::Null, Value::from),
    );
    out.insert(
        "max_output_tokens".into(),
        req.max_output_tokens.map_or(Value::Null, Value::from),
    );
    out.insert("temperature".into(), json!(req.temperature.unwrap_or(1.0)));
    out.insert("top_p".into(), json!(req.top_p.unwrap_or(1.0)));
    out.insert("tools".into(), Value::Array(req.tools.clone()));
    out.insert(
        "tool_choice".into(),
        req.tool_choice.clone().unwrap_or_else(|| "auto".into()),
    );
    out.insert("parallel_tool_calls".into(), given("parallel_tool_calls", true.into()));
    out.insert("text".into(), text);
    out.insert("store".into(), json!(req.store.unwrap_or(true)));
    out.insert("metadata".into(), given("metadata", json!({})));
    out.insert(
        "reasoning".into(),
        given("reasoning", json!({"effort": null, "summary": null})),
    );
    out.insert("truncation".into(), given("truncation", "disabled".into()));
    out.insert("max_tool_calls".into(), given("max_tool_calls", Value::Null));
    for key in ["user", "prompt_cache_key", "safety_identifier", "service_tier"] {
        if let Some(v) = req.rest.get(key) {
            out.insert(key.into(), v.clone());
        }
    }
    out
}

/// Responses kept for `previous_response_id`: the conversation, the reply last.
pub type Kept = Bounded<Vec<ChatMessage>>;

/// The normalised request, and the conversation to keep (without the system prompt: OpenAI
/// does not carry `instructions` over to a continuation).
pub fn to_backend(
    req: &ResponsesRequest,
    context: u32,
    kept: &Kept,
) -> Result<(GenerateRequest, Vec<ChatMessage>), ApiError> {
    super::sampling_ranges(req.temperature, req.top_p)?;
    for (key, value) in &req.rest {
        match key.as_str() {
            _ if value.is_null() || IGNORED.contains(&key.as_str()) => {}
            "background" if value == &Value::Bool(false) => {}
            "n" | "background" | "top_logprobs" | "conversation" | "prompt" => {
                return Err(ApiError::invalid_field(key, "not supported by this server"))
            }
            other => return Err(ApiError::invalid_field(other, "unknown field")),
        }
    }
    let mut history: Vec<ChatMessage> = match &req.previous_response_id {
        Some(id) => kept
            .get(id)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::NotFound,
                    format!(
                        "previous_response_id: no response `{id}` is kept (unknown, stored with `store: false`, \
                         or evicted); send the whole input"
                    ),
                )
                .param("previous_response_id")
            })?
            .as_ref()
            .clone(),
        None => Vec::new(),
    };
    let mut system = req.instructions.clone().unwrap_or_default();
    items(&req.input, &mut system, &mut history)?;
    let mut messages = history.clone();
    if !system.is_empty() {
        messages.insert(0, message("system", system, Vec::new(), None));
    }
    let tools = function_tools(&req.tools)?;
    let names: Vec<String> = tools
        .iter()
        .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str).map(str::to_owned))
        .collect();
    let (hide_tools, forced) = tool_choice(req.tool_choice.as_ref(), &names)?;
    let format = output_format(
        req.text.as_ref().and_then(|t| t.get("format")),
        "text.format",
        "/schema",
    )?;
    let constraint = match constraint(forced, format, "text.format")? {
        None if !hide_tools => strict_functions(&tools),
        other => other,
    };
    let request = GenerateRequest {
        model: req.model.clone(),
        chat: Chat {
            messages,
            tools: (!tools.is_empty() && !hide_tools).then_some(tools),
            continue_final: false,
        },
        sampling: Sampling {
            max_tokens: req
                .max_output_tokens
                .unwrap_or(if context > 0 { context } else { u32::MAX })
                .max(1),
            temperature: req.temperature.unwrap_or(1.0),
            top_p: req.top_p.filter(|p| *p < 1.0),
            top_k: None,
        },
        stop_sequences: Vec::new(),
        constraint,
    };
    Ok((request, history))
}

/// `input` into messages (after `history`); leading system/developer text joins `system`.
fn items(input: &Value, system: &mut String, out: &mut Vec<ChatMessage>) -> Result<(), ApiError> {
    let items = match input {
        Value::String(s) => {
            out.push(message("user", s.clone(), Vec::new(), None));
            return Ok(());
        }
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid_field("input", "at least one item is required"))
        }
        Value::Array(items) => items,
        _ => {
            return Err(ApiError::invalid_field(
                "input",
                "expected a string or an array of items",
            ))
        }
    };
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
        match kind {
            "message" => {
                let text = text_of(item.get("content"), &at)?;
                match item.get("role").and_then(Value::as_str) {
                    Some("system" | "developer") if out.is_empty() => {
                        if !system.is_empty() {
                            system.push_str("\n\n");
                        }
                        system.push_str(&text);
                    }
                    Some("system" | "developer" | "user") => out.push(message("user", text, Vec::new(), None)),
                    Some("assistant") => out.push(message("assistant", text, Vec::new(), None)),
                    other => {
                        return Err(ApiError::invalid_field(
                            format!("{at}.role"),
                            format!("expected `system`, `developer`, `user` or `assistant`, got {other:?}"),
                        ))
                    }
                }
            }
            "function_call" => {
                let field = |name: &str| {
                    item.get(name)
                        .and_then(Value::as_str)
                        .ok_or_else(|| ApiError::invalid_field(format!("{at}.{name}"), "required"))
                };
                let (id, name, args) = (field("call_id")?, field("name")?, field("arguments")?);
                let arguments = serde_json::from_str(args).unwrap_or_else(|_| Value::String(args.to_owned()));
                let call = json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}});
                // Calls join the assistant turn they follow, as chat templates expect.
                match out.last_mut() {
                    Some(last) if last.role == "assistant" => last.tool_calls.push(call),
                    _ => out.push(message("assistant", String::new(), vec![call], None)),
                }
            }
            "function_call_output" => {
                let id = item
                    .get("call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::invalid_field(format!("{at}.call_id"), "required"))?;
                super::answers_a_call(out, id, &format!("{at}.call_id"))?;
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    other => text_of(other, &format!("{at}.output"))?,
                };
                out.push(message("tool", output, Vec::new(), Some(id.to_owned())));
            }
            // Earlier reasoning (encrypted by OpenAI, or ours): nothing the model reads again.
            "reasoning" => {}
            other => {
                return Err(ApiError::invalid_field(
                    format!("{at}.type"),
                    format!("`{other}` is not supported (messages, function_call, function_call_output)"),
                ))
            }
        }
    }
    Ok(())
}

/// Function tools as the chat template takes them; a namespace's functions too. Tools with no
/// local meaning (hosted search, computer use, …) are left out.
fn function_tools(tools: &[Value]) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        match t.get("type").and_then(Value::as_str) {
            Some("function") => out.push(function(t, &format!("tools[{i}]"))?),
            Some("namespace") => {
                for (j, inner) in t
                    .get("tools")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    if inner.get("type").and_then(Value::as_str) == Some("function") {
                        out.push(function(inner, &format!("tools[{i}].tools[{j}]"))?);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

fn function(t: &Value, at: &str) -> Result<Value, ApiError> {
    let name = t
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid_field(format!("{at}.name"), "required"))?;
    Ok(json!({"type": "function", "function": {"name": name,
        "description": t.get("description").cloned().unwrap_or_else(|| "".into()),
        "parameters": t.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"})),
        "strict": t.get("strict") == Some(&Value::Bool(true))}}))
}

/// `POST /v1/responses`
pub async fn create(
    State(app): State<AppState>,
    limit: Option<Extension<MaxBody>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let span = tracing::Span::current();
    let result = async {
        let req: ResponsesRequest = super::super::translate::from_json(&read_body(body, limit.map(|l| l.0)).await?)?;
        let (model, context) = model_for(&app, &req.model)?;
        let (mut backend_req, history) = to_backend(&req, context, &app.responses)?;
        backend_req.model = model.clone();
        let previous = req.previous_response_id.clone();
        let keep = (req.store != Some(false)).then(|| (app.responses.clone(), history));
        let echo = echo(&req);
        let (inner, span, streamed, name) = (app.clone(), span.clone(), req.stream, model.clone());
        let answer = async move {
            let (generation, input_tokens, cached_tokens) = start(&inner, backend_req, &span).await?;
            let reply = Reply {
                id: format!("resp_{}", uuid::Uuid::new_v4().simple()),
                created: super::unix_now(),
                model,
                input_tokens,
                cached_tokens,
                previous,
                keep,
                echo,
            };
            if streamed {
                Ok(stream(generation, reply, span))
            } else {
                let mut out = Output::default();
                let done = run(generation, &mut out, &span).await?;
                Ok(Json(reply.finish(&out, done)).into_response())
            }
        };
        let rid = request_id(&headers).map(str::to_owned);
        answer_once_loaded(&app, name, streamed, rid, error_event, answer).await
    }
    .await;
    result.unwrap_or_else(|e: ApiError| e.to_response(request_id(&headers)))
}

mod output;

use output::{error_event, run, stream, Output, Reply};

#[cfg(test)]
mod tests;
