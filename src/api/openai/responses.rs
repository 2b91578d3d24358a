//! `POST /v1/responses`: OpenAI's Responses API, streamed and not, as Codex CLI and the OpenAI
//! SDK's `responses.create` use it.
//!
//! `instructions` and `input` (a string, or items: messages, `function_call`,
//! `function_call_output`; `reasoning` items are skipped) become the normalised chat; function
//! tools (also inside a `namespace`) go to the template; tools with no local meaning
//! (`web_search`, `file_search`, …) are left out, since Codex always sends them. A response is
//! kept in memory (bounded, with message threads' store) unless `store` is false, so that
//! `previous_response_id` continues it; an id not kept is a 404.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use http::HeaderMap;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::super::error::{ApiError, ErrorKind};
use super::super::threads::Bounded;
use super::super::{answer_once_loaded, model_for, start, AppState};
use super::chat::{constraint, message, output_format, strict_functions, text_of, tool_choice};
use crate::backend::{Chat, ChatMessage, Event, GenerateRequest, Generation, Sampling, StopReason};
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

/// An error before the response began, as the Responses API streams one: an `error` event.
fn error_event(e: &ApiError, _request_id: Option<&str>) -> String {
    let data = json!({"type": "error", "code": e.kind.as_str(), "message": e.message, "param": null});
    format!("event: error\ndata: {data}\n\n")
}

/// One output item, as it came.
enum Item {
    /// Answer text (`message`).
    Message(String),
    /// A function call: its `call_…` id, name and arguments.
    Call { id: String, name: String, args: String },
}

/// What the response is made of, as it comes: its items in order, and the reasoning.
#[derive(Default)]
struct Output {
    items: Vec<Item>,
    reasoning: String,
}

impl Output {
    /// The output items, in the order the stream opens them (the message and calls as they
    /// came), then the reasoning (sent whole at the end). An answer with neither text nor a
    /// call is one empty message; a call has no empty message before it.
    fn items(&self, msg_id: &str) -> Vec<Value> {
        let mut items: Vec<Value> = self
            .items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Item::Message(text) => message_item(&item_id(msg_id, i), text, "completed"),
                Item::Call { id, name, args } => call_item(id, name, args, "completed"),
            })
            .collect();
        if items.is_empty() {
            items.push(message_item(msg_id, "", "completed"));
        }
        if !self.reasoning.is_empty() {
            items.push(
                json!({"type": "reasoning", "id": format!("rs_{}", suffix(msg_id)), "summary": [],
                "content": [{"type": "reasoning_text", "text": self.reasoning}]}),
            );
        }
        items
    }

    /// The answer's text (every message's).
    fn text(&self) -> String {
        self.items
            .iter()
            .filter_map(|i| match i {
                Item::Message(t) => Some(t.as_str()),
                Item::Call { .. } => None,
            })
            .collect()
    }

    fn calls(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.items.iter().filter_map(|i| match i {
            Item::Call { id, name, args } => Some((id.as_str(), name.as_str(), args.as_str())),
            Item::Message(_) => None,
        })
    }

    /// Adds one event's content.
    fn push(&mut self, ev: &Event) {
        match ev {
            Event::Text(t) => match self.items.last_mut() {
                Some(Item::Message(text)) => text.push_str(t),
                _ => self.items.push(Item::Message(t.clone())),
            },
            Event::Thinking(t) => self.reasoning.push_str(t),
            Event::ToolUse { id, name, input } => self.items.push(Item::Call {
                id: format!("call_{}", suffix(id)),
                name: name.clone(),
                args: input.to_string(),
            }),
            Event::ToolStart { .. } | Event::ToolInput(_) => {}
            Event::Started { .. } | Event::Done { .. } | Event::Failed(_) => {}
        }
    }
}

/// The id of the message at `index` of the output: the first is the response's `msg_…`.
fn item_id(msg_id: &str, index: usize) -> String {
    if index == 0 {
        msg_id.to_owned()
    } else {
        format!("{msg_id}_{index}")
    }
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    let content: Vec<Value> = if status == "in_progress" {
        Vec::new()
    } else {
        vec![json!({"type": "output_text", "text": text, "annotations": []})]
    };
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

fn call_item(call_id: &str, name: &str, args: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": format!("fc_{}", suffix(call_id)), "call_id": call_id, "name": name,
           "arguments": args, "status": status})
}

/// An id without its `xx_` prefix: the items of one response share it.
fn suffix(id: &str) -> &str {
    id.split_once('_').map_or(id, |(_, rest)| rest)
}

/// How the generation ended: output tokens and why.
struct Done {
    output_tokens: u32,
    reason: StopReason,
}

/// The whole generation into `out`.
async fn run(mut generation: Generation, out: &mut Output, span: &tracing::Span) -> Result<Done, ApiError> {
    while let Some(ev) = generation.next().await {
        match ev {
            Event::Done {
                reason, output_tokens, ..
            } => {
                span.record("output_tokens", output_tokens);
                return Ok(Done { output_tokens, reason });
            }
            Event::Failed(e) => return Err(e.into()),
            ev => out.push(&ev),
        }
    }
    Err(ApiError::new(
        ErrorKind::Api,
        "the backend ended the generation without a result",
    ))
}

/// What every event and the response carry.
struct Reply {
    id: String,
    created: u64,
    model: String,
    input_tokens: u32,
    cached_tokens: u32,
    previous: Option<String>,
    keep: Option<(Arc<Kept>, Vec<ChatMessage>)>,
    /// The request's fields the response repeats ([`echo`]).
    echo: Map<String, Value>,
}

impl Reply {
    fn msg_id(&self) -> String {
        format!("msg_{}", suffix(&self.id))
    }

    /// The response object; `done` when it has ended.
    fn object(&self, output: Vec<Value>, done: Option<&Done>) -> Value {
        let (status, incomplete) = match done {
            None => ("in_progress", Value::Null),
            Some(Done {
                reason: StopReason::MaxTokens,
                ..
            }) => ("incomplete", json!({"reason": "max_output_tokens"})),
            Some(_) => ("completed", Value::Null),
        };
        let usage = done.map_or(Value::Null, |d| {
            json!({"input_tokens": self.input_tokens, "input_tokens_details": {"cached_tokens": self.cached_tokens},
                   "output_tokens": d.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                   "total_tokens": self.input_tokens + d.output_tokens})
        });
        let mut object = json!({"id": self.id, "object": "response", "created_at": self.created, "status": status,
               "model": self.model, "output": output, "usage": usage, "error": null,
               "incomplete_details": incomplete, "previous_response_id": self.previous});
        object.as_object_mut().expect("an object").extend(self.echo.clone());
        object
    }

    /// The finished response; kept for `previous_response_id` unless `store` was false.
    fn finish(&self, out: &Output, done: Done) -> Value {
        if let Some((kept, history)) = &self.keep {
            let mut messages = history.clone();
            let calls = out
                .calls()
                .map(|(id, name, args)| {
                    let arguments: Value = serde_json::from_str(args).unwrap_or_default();
                    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
                })
                .collect();
            messages.push(message("assistant", out.text(), calls, None));
            let bytes = messages
                .iter()
                .map(|m| 64 + m.content.len() + m.tool_calls.iter().map(|c| c.to_string().len()).sum::<usize>())
                .sum();
            kept.insert(&self.id, messages, bytes);
        }
        self.object(out.items(&self.msg_id()), Some(&done))
    }
}

/// The item a stream has open.
enum Open {
    None,
    /// The message at this output index.
    Message(usize),
    /// The function call at this output index, streamed from the backend's call `id`.
    Call {
        index: usize,
        id: String,
        sent: String,
    },
}

/// Stream events, in order: what one backend event adds to the response's stream.
type Events = Vec<(&'static str, Value)>;

/// Closes the open message (its text done) or forgets the open call.
fn close(open: &mut Open, out: &Output, msg_id: &str, events: &mut Events) {
    if let Open::Message(index) = std::mem::replace(open, Open::None) {
        let id = item_id(msg_id, index);
        let text = match &out.items[index] {
            Item::Message(t) => t.as_str(),
            Item::Call { .. } => "",
        };
        events.push((
            "response.output_text.done",
            json!({"item_id": id, "output_index": index,
            "content_index": 0, "text": text}),
        ));
        events.push((
            "response.content_part.done",
            json!({"item_id": id, "output_index": index,
            "content_index": 0, "part": {"type": "output_text", "text": text, "annotations": []}}),
        ));
        events.push((
            "response.output_item.done",
            json!({"output_index": index,
            "item": message_item(&id, text, "completed")}),
        ));
    }
}

/// Opens a message item at the end of the output.
fn open_message(open: &mut Open, out: &mut Output, msg_id: &str, events: &mut Events) {
    let index = out.items.len();
    let id = item_id(msg_id, index);
    out.items.push(Item::Message(String::new()));
    events.push((
        "response.output_item.added",
        json!({"output_index": index,
        "item": message_item(&id, "", "in_progress")}),
    ));
    events.push((
        "response.content_part.added",
        json!({"item_id": id, "output_index": index,
        "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
    ));
    *open = Open::Message(index);
}

/// Closes the open message and adds a call item (the backend's call `id`) at the end of the
/// output; its index.
fn open_call(open: &mut Open, out: &mut Output, msg_id: &str, id: &str, name: String, events: &mut Events) -> usize {
    close(open, out, msg_id, events);
    let index = out.items.len();
    let call_id = format!("call_{}", suffix(id));
    events.push((
        "response.output_item.added",
        json!({"output_index": index, "item": call_item(&call_id, &name, "", "in_progress")}),
    ));
    out.items.push(Item::Call {
        id: call_id,
        name,
        args: String::new(),
    });
    index
}

/// What one backend event (not `Done` or `Failed`) adds to the stream.
fn on_event(ev: Event, open: &mut Open, out: &mut Output, msg_id: &str) -> Events {
    let mut events = Events::new();
    match ev {
        Event::Text(t) => {
            if !matches!(open, Open::Message(_)) {
                open_message(open, out, msg_id, &mut events);
            }
            let index = out.items.len() - 1;
            events.push((
                "response.output_text.delta",
                json!({"item_id": item_id(msg_id, index),
                "output_index": index, "content_index": 0, "delta": t}),
            ));
            out.push(&Event::Text(t));
        }
        Event::ToolStart { id, name } => {
            let index = open_call(open, out, msg_id, &id, name, &mut events);
            *open = Open::Call {
                index,
                id,
                sent: String::new(),
            };
        }
        Event::ToolInput(fragment) => {
            if let Open::Call { index, sent, .. } = open {
                if let Some(Item::Call { id, .. }) = out.items.get(*index) {
                    events.push((
                        "response.function_call_arguments.delta",
                        json!({
                        "item_id": format!("fc_{}", suffix(id)), "output_index": *index, "delta": fragment}),
                    ));
                }
                sent.push_str(&fragment);
            }
        }
        Event::ToolUse { id, name, input } => {
            let whole = input.to_string();
            let (index, sent) = match std::mem::replace(open, Open::None) {
                Open::Call {
                    index,
                    id: streamed,
                    sent,
                } if streamed == id => (index, sent),
                other => {
                    *open = other;
                    (open_call(open, out, msg_id, &id, name, &mut events), String::new())
                }
            };
            let Some(Item::Call {
                id: call_id,
                name,
                args,
            }) = out.items.get_mut(index)
            else {
                return events;
            };
            let item = format!("fc_{}", suffix(call_id));
            if let Some(rest) = super::super::unsent_input(&sent, &whole) {
                events.push((
                    "response.function_call_arguments.delta",
                    json!({"item_id": item,
                    "output_index": index, "delta": rest}),
                ));
            }
            args.clone_from(&whole);
            events.push((
                "response.function_call_arguments.done",
                json!({"item_id": item,
                "output_index": index, "arguments": whole}),
            ));
            events.push((
                "response.output_item.done",
                json!({"output_index": index,
                "item": call_item(call_id, name, &whole, "completed")}),
            ));
        }
        ev => out.push(&ev),
    }
    events
}

/// The stream of events in OpenAI's order, each with its `sequence_number`: items open as
/// they come (a message at the first text, a call at its start), never an empty message
/// before a call.
fn stream(generation: Generation, reply: Reply, span: tracing::Span) -> Response {
    let stream = async_stream::stream! {
        let mut seq = 0u64;
        let mut event = move |name: &str, mut data: Value| {
            data["type"] = name.into();
            data["sequence_number"] = seq.into();
            seq += 1;
            Ok::<_, Infallible>(SseEvent::default().event(name).data(data.to_string()))
        };
        let msg_id = reply.msg_id();
        yield event("response.created", json!({"response": reply.object(Vec::new(), None)}));
        yield event("response.in_progress", json!({"response": reply.object(Vec::new(), None)}));
        // The generation is read here, in the stream: a client that leaves drops it, and the
        // backend stops it at its next token.
        let mut generation = generation;
        let mut out = Output::default();
        let mut open = Open::None;
        let done = loop {
            let Some(ev) = generation.next().await else {
                break Err(ApiError::new(ErrorKind::Api, "the backend ended the generation without a result"));
            };
            match ev {
                Event::Done { reason, output_tokens, .. } => {
                    span.record("output_tokens", output_tokens);
                    break Ok(Done { output_tokens, reason });
                }
                Event::Failed(e) => break Err(ApiError::from(e)),
                ev => {
                    for (name, data) in on_event(ev, &mut open, &mut out, &msg_id) {
                        yield event(name, data);
                    }
                }
            }
        };
        match done {
            Ok(done) => {
                let mut events = Events::new();
                if out.items.is_empty() {
                    // An empty answer is one empty message, as the response object says.
                    open_message(&mut open, &mut out, &msg_id, &mut events);
                }
                close(&mut open, &out, &msg_id, &mut events);
                for (name, data) in events {
                    yield event(name, data);
                }
                let response = reply.finish(&out, done);
                let name = if response["status"] == "incomplete" { "response.incomplete" } else { "response.completed" };
                yield event(name, json!({"response": response}));
            }
            Err(e) => {
                tracing::warn!(parent: &span, error = %e, "generation failed mid-stream");
                let mut response = reply.object(Vec::new(), None);
                response["status"] = "failed".into();
                response["error"] = json!({"code": e.kind.as_str(), "message": e.message});
                yield event("response.failed", json!({"response": response}));
            }
        }
    };
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(5)))
        .into_response()
}

#[cfg(test)]
mod tests;
