//! `POST /v1/chat/completions`: OpenAI's Chat Completions, streamed and not.
//!
//! The request becomes the same [`GenerateRequest`] as a Messages request (same chat template,
//! tool parser, constrained decoding, prompt cache and batch); the answer is rendered as a
//! `chat.completion` or a stream of `chat.completion.chunk`s ending in `data: [DONE]`. What
//! pensieve does not honour (`n > 1`, `logprobs`, audio, images, penalties, `seed`) is a 400
//! that names the field, never silently ignored.

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use http::HeaderMap;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::super::error::ApiError;
use super::super::{answer_once_loaded, model_for, start, AppState};
use crate::backend::{Chat, ChatMessage, Constraint, GenerateRequest, Sampling};
use crate::wire::{read_body, request_id, MaxBody};

/// The request. Unknown fields are collected in `rest` and refused by name, unless they are
/// known to be harmless.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// A model's name or alias (`server.fallback` says what other names get).
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMsg>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stop: Option<Value>,
    /// Stream chunks.
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    stream_options: Option<Value>,
    #[serde(default)]
    tools: Vec<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// One message.
#[derive(Debug, Deserialize)]
pub struct ChatMsg {
    role: String,
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    tool_calls: Vec<Value>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

/// Fields accepted and without effect on a local model.
const IGNORED: &[&str] = &[
    "user",
    "metadata",
    "store",
    "parallel_tool_calls",
    "service_tier",
    "reasoning_effort",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "verbosity",
];

/// Parses the body, naming the field that is wrong (as the Messages API does).
pub fn parse(body: &[u8]) -> Result<ChatRequest, ApiError> {
    super::super::translate::from_json(body)
}

/// The normalised request; `context` is the model's (the default `max_tokens`).
pub fn to_backend(req: &ChatRequest, context: u32) -> Result<GenerateRequest, ApiError> {
    refuse_unsupported(req)?;
    super::sampling_ranges(req.temperature, req.top_p)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid_field("messages", "must contain at least one message"));
    }
    let mut system = String::new();
    let mut messages: Vec<ChatMessage> = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let text = text_of(m.content.as_ref(), &at)?;
        match m.role.as_str() {
            "system" | "developer" if messages.is_empty() => {
                if !system.is_empty() {
                    system.push('\n');
                }
                system.push_str(&text);
            }
            "system" | "developer" | "user" => messages.push(message("user", text, Vec::new(), None)),
            "assistant" => {
                let calls = m
                    .tool_calls
                    .iter()
                    .enumerate()
                    .map(|(j, c)| assistant_call(c, &format!("{at}.tool_calls[{j}]")))
                    .collect::<Result<_, _>>()?;
                messages.push(message("assistant", text, calls, None));
            }
            "tool" => {
                let id = m.tool_call_id.clone().ok_or_else(|| {
                    ApiError::invalid_field(format!("{at}.tool_call_id"), "required in a tool message")
                })?;
                super::answers_a_call(&messages, &id, &format!("{at}.tool_call_id"))?;
                messages.push(message("tool", text, Vec::new(), Some(id)));
            }
            other => {
                return Err(ApiError::invalid_field(
                    format!("{at}.role"),
                    format!("expected one of `system`, `developer`, `user`, `assistant`, `tool`, got `{other}`"),
                ))
            }
        }
    }
    if !system.is_empty() {
        messages.insert(0, message("system", system, Vec::new(), None));
    }
    let names = tool_names(&req.tools)?;
    let (hide_tools, forced) = tool_choice(req.tool_choice.as_ref(), &names)?;
    let constraint = match constraint(forced, response_format(req)?, "response_format")? {
        None if !hide_tools => strict_functions(&req.tools),
        other => other,
    };
    let tools = (!req.tools.is_empty() && !hide_tools).then(|| req.tools.clone());
    let max_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        // Without one, to the context (the backend caps it there once the model is loaded).
        .unwrap_or(if context > 0 { context } else { u32::MAX });
    if max_tokens == 0 {
        return Err(ApiError::invalid_field("max_completion_tokens", "must be at least 1"));
    }
    Ok(GenerateRequest {
        model: req.model.clone(),
        chat: Chat {
            messages,
            tools,
            continue_final: false,
        },
        sampling: Sampling {
            max_tokens,
            temperature: req.temperature.unwrap_or(1.0),
            top_p: req.top_p.filter(|p| *p < 1.0),
            top_k: None,
        },
        stop_sequences: stops(req.stop.as_ref())?,
        constraint,
    })
}

/// Function tools marked `strict: true` (OpenAI's structured function calling), held to their
/// schemas when the model calls them.
pub(super) fn strict_functions(tools: &[Value]) -> Option<Constraint> {
    let strict: Vec<String> = tools
        .iter()
        .filter(|t| t.pointer("/function/strict").or_else(|| t.get("strict")) == Some(&Value::Bool(true)))
        .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str).map(str::to_owned))
        .collect();
    crate::api::translate::strict_tools(strict.iter())
}

/// What constrained decoding holds the answer to: a forced call, or JSON of a schema (the
/// setting `format_at`); not both.
pub(super) fn constraint(
    forced: Option<Vec<String>>,
    format: Option<Value>,
    format_at: &'static str,
) -> Result<Option<Constraint>, ApiError> {
    Ok(match (forced, format) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_field(
                format_at,
                "cannot be combined with a tool_choice that forces a tool call",
            ))
        }
        (Some(names), None) => Some(Constraint::Tool { names }),
        (None, Some(schema)) => Some(Constraint::JsonSchema {
            schema,
            field: if format_at == "response_format" {
                "response_format.json_schema.schema"
            } else {
                "text.format.schema"
            },
        }),
        (None, None) => None,
    })
}

pub(super) fn message(
    role: &'static str,
    content: String,
    tool_calls: Vec<Value>,
    tool_call_id: Option<String>,
) -> ChatMessage {
    ChatMessage {
        role,
        content,
        tool_calls,
        tool_call_id,
    }
}

/// What is not honoured, by name.
fn refuse_unsupported(req: &ChatRequest) -> Result<(), ApiError> {
    let refuse = |field: &str, why: &str| Err(ApiError::invalid_field(field, why));
    for (key, value) in &req.rest {
        if value.is_null() || IGNORED.contains(&key.as_str()) {
            continue;
        }
        match key.as_str() {
            "n" if value.as_u64() == Some(1) => {}
            "n" => return refuse("n", "only 1 choice is generated"),
            "logprobs" if value == &Value::Bool(false) => {}
            "logprobs" | "top_logprobs" => return refuse(key, "log probabilities are not supported"),
            "frequency_penalty" | "presence_penalty" if value.as_f64() == Some(0.0) => {}
            "frequency_penalty" | "presence_penalty" | "logit_bias" => {
                return refuse(key, "not supported by this server")
            }
            "seed" => {
                return refuse(
                    "seed",
                    "not supported: sampling runs in a batch shared with other requests",
                )
            }
            "modalities" | "audio" | "prediction" | "web_search_options" => {
                return refuse(key, "not supported by this server")
            }
            "functions" | "function_call" => {
                return refuse(key, "deprecated by OpenAI; send `tools` and `tool_choice`")
            }
            other => return refuse(other, "unknown field"),
        }
    }
    Ok(())
}

/// A string, or text parts (`text`, and the Responses API's `input_text` / `output_text`).
pub(super) fn text_of(content: Option<&Value>, at: &str) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str) {
                    Some("text" | "input_text" | "output_text") => {
                        text.push_str(part.get("text").and_then(Value::as_str).unwrap_or_default())
                    }
                    Some(other) => {
                        return Err(ApiError::invalid_field(
                            format!("{at}.content[{j}].type"),
                            format!("`{other}` is not supported: the model reads text only"),
                        ))
                    }
                    None => return Err(ApiError::invalid_field(format!("{at}.content[{j}].type"), "required")),
                }
            }
            Ok(text)
        }
        Some(_) => Err(ApiError::invalid_field(
            format!("{at}.content"),
            "expected a string or an array of content parts",
        )),
    }
}

/// An assistant's earlier call, with its arguments as the object chat templates expect.
fn assistant_call(call: &Value, at: &str) -> Result<Value, ApiError> {
    let f = call
        .get("function")
        .ok_or_else(|| ApiError::invalid_field(format!("{at}.function"), "required"))?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid_field(format!("{at}.function.name"), "required"))?;
    let arguments = match f.get("arguments") {
        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
        Some(other) => other.clone(),
        None => json!({}),
    };
    Ok(
        json!({"id": call.get("id").cloned().unwrap_or(Value::Null), "type": "function",
              "function": {"name": name, "arguments": arguments}}),
    )
}

/// The function tools' names (each tool must be a function with a name).
fn tool_names(tools: &[Value]) -> Result<Vec<String>, ApiError> {
    let mut names = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::invalid_field(
                format!("tools[{i}].type"),
                "only `function` tools are supported",
            ));
        }
        let name = t
            .pointer("/function/name")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid_field(format!("tools[{i}].function.name"), "required"))?;
        names.push(name.to_owned());
    }
    Ok(names)
}

/// `(hide the tools, the tools a call is forced to)` from `tool_choice`: `auto`, `none`,
/// `required`, or a function (`{"type": "function", "function": {"name"}}`, or the Responses
/// API's flat `{"type": "function", "name"}`).
pub(super) fn tool_choice(choice: Option<&Value>, names: &[String]) -> Result<(bool, Option<Vec<String>>), ApiError> {
    let choice = match choice {
        None | Some(Value::Null) => return Ok((false, None)),
        Some(c) => c,
    };
    let forced = match choice.as_str() {
        Some("auto") => return Ok((false, None)),
        Some("none") => return Ok((true, None)),
        Some("required") => names.to_vec(),
        Some(other) => {
            return Err(ApiError::invalid_field(
                "tool_choice",
                format!("expected `auto`, `none`, `required` or a function, got `{other}`"),
            ))
        }
        None => {
            let name = choice
                .pointer("/function/name")
                .or_else(|| choice.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid_field("tool_choice.function.name", "required"))?;
            if !names.iter().any(|n| n == name) {
                return Err(ApiError::invalid_field(
                    "tool_choice.function.name",
                    format!("no tool named `{name}` in tools"),
                ));
            }
            vec![name.to_owned()]
        }
    };
    if forced.is_empty() {
        return Err(ApiError::invalid_field("tool_choice", "requires tools"));
    }
    Ok((false, Some(forced)))
}

/// `response_format`: `text`, `json_object` (any object) or `json_schema`.
fn response_format(req: &ChatRequest) -> Result<Option<Value>, ApiError> {
    output_format(req.response_format.as_ref(), "response_format", "/json_schema/schema")
}

/// A JSON-output setting (`response_format`, or the Responses API's `text.format`, whose schema
/// sits at `schema_at`): the schema to hold the output to, if any.
pub(super) fn output_format(format: Option<&Value>, at: &str, schema_at: &str) -> Result<Option<Value>, ApiError> {
    let Some(format) = format.filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "object"}))),
        Some("json_schema") => match format.pointer(schema_at) {
            Some(schema @ Value::Object(_)) => Ok(Some(schema.clone())),
            _ => Err(ApiError::invalid_field(
                format!("{at}{}", schema_at.replace('/', ".")),
                "required, a JSON schema object",
            )),
        },
        _ => Err(ApiError::invalid_field(
            format!("{at}.type"),
            "expected `text`, `json_object` or `json_schema`",
        )),
    }
}

/// `stop`: a string or up to 4 strings.
fn stops(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let stops: Vec<String> = match stop {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| ApiError::invalid_field("stop", "expected a string or an array of strings"))?,
        Some(_) => {
            return Err(ApiError::invalid_field(
                "stop",
                "expected a string or an array of strings",
            ))
        }
    };
    if stops.len() > 4 || stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid_field("stop", "at most 4 sequences, none empty"));
    }
    Ok(stops)
}

/// `POST /v1/chat/completions`
pub async fn completions(
    State(app): State<AppState>,
    limit: Option<Extension<MaxBody>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let span = tracing::Span::current();
    let result = async {
        let req = parse(&read_body(body, limit.map(|l| l.0)).await?)?;
        let (model, context) = model_for(&app, &req.model)?;
        let mut backend_req = to_backend(&req, context)?;
        backend_req.model = model.clone();
        let usage = req
            .stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let (inner, span, streamed, name) = (app.clone(), span.clone(), req.stream, model.clone());
        let answer = async move {
            let (generation, input_tokens, cached_tokens) = start(&inner, backend_req, &span).await?;
            let reply = Reply {
                id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
                created: super::unix_now(),
                model,
                prompt_tokens: input_tokens,
                cached_tokens,
            };
            if streamed {
                Ok(stream(generation, reply, usage, span))
            } else {
                collect(generation, reply, &span).await
            }
        };
        let rid = request_id(&headers).map(str::to_owned);
        answer_once_loaded(&app, name, streamed, rid, error_event, answer).await
    }
    .await;
    result.unwrap_or_else(|e: ApiError| e.to_response(request_id(&headers)))
}

mod output;

use output::{collect, error_event, stream, Reply};

#[cfg(test)]
mod tests;
