//! What a Responses answer is made of and how it goes out: the output items in order
//! ([`Output`]), the response object ([`Reply`]), and the stream of events, one backend event
//! at a time.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::super::super::error::{ApiError, ErrorKind};
use super::super::chat::message;
use super::Kept;
use crate::backend::{ChatMessage, Event, Generation, StopReason};

/// An error before the response began, as the Responses API streams one: an `error` event.
pub(super) fn error_event(e: &ApiError, _request_id: Option<&str>) -> String {
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
pub(super) struct Output {
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
pub(super) struct Done {
    output_tokens: u32,
    reason: StopReason,
}

/// The whole generation into `out`.
pub(super) async fn run(mut generation: Generation, out: &mut Output, span: &tracing::Span) -> Result<Done, ApiError> {
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
pub(super) struct Reply {
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) input_tokens: u32,
    pub(super) cached_tokens: u32,
    pub(super) previous: Option<String>,
    pub(super) keep: Option<(Arc<Kept>, Vec<ChatMessage>)>,
    /// The request's fields the response repeats (`echo`).
    pub(super) echo: Map<String, Value>,
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
    pub(super) fn finish(&self, out: &Output, done: Done) -> Value {
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
            if let Some(rest) = super::super::super::unsent_input(&sent, &whole) {
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
pub(super) fn stream(generation: Generation, reply: Reply, span: tracing::Span) -> Response {
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
