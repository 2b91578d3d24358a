//! What a chat completion is made of and how it goes out: the completion object, or the
//! stream of chunks, one backend event at a time.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::super::super::error::{ApiError, ErrorKind};
use crate::backend::{Event, Generation, StopReason};

/// An error in a chunk stream, as OpenAI sends one: a `data:` line with the error object.
pub(super) fn error_event(e: &ApiError, request_id: Option<&str>) -> String {
    format!(
        "data: {}\n\n",
        String::from_utf8_lossy(&super::super::error_body(e, request_id))
    )
}

/// What every chunk and the completion carry.
pub(super) struct Reply {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
}

impl Reply {
    fn usage(&self, completion_tokens: u32) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
               "total_tokens": self.prompt_tokens + completion_tokens,
               "prompt_tokens_details": {"cached_tokens": self.cached_tokens}})
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    }
}

fn finish_reason(reason: StopReason) -> &'static str {
    match reason {
        StopReason::EndTurn | StopReason::StopSequence => "stop",
        StopReason::MaxTokens => "length",
        StopReason::ToolUse => "tool_calls",
    }
}

fn tool_call(id: &str, name: &str, input: &Value) -> Value {
    json!({"id": call_id(id), "type": "function", "function": {"name": name, "arguments": input.to_string()}})
}

/// A call's id as OpenAI writes it: `call_…` (the backend's `toolu_…` with OpenAI's prefix).
fn call_id(id: &str) -> String {
    format!("call_{}", id.strip_prefix("toolu_").unwrap_or(id))
}

/// The whole completion.
pub(super) async fn collect(
    mut generation: Generation,
    reply: Reply,
    span: &tracing::Span,
) -> Result<Response, ApiError> {
    let (mut content, mut reasoning, mut calls) = (String::new(), String::new(), Vec::new());
    while let Some(ev) = generation.next().await {
        match ev {
            Event::Started { .. } | Event::ToolStart { .. } | Event::ToolInput(_) => {}
            Event::Text(t) => content.push_str(&t),
            Event::Thinking(t) => reasoning.push_str(&t),
            Event::ToolUse { id, name, input } => calls.push(tool_call(&id, &name, &input)),
            Event::Done {
                reason, output_tokens, ..
            } => {
                span.record("output_tokens", output_tokens);
                let mut message = json!({"role": "assistant",
                    "content": if content.is_empty() && !calls.is_empty() { Value::Null } else { content.into() }});
                if !reasoning.is_empty() {
                    message["reasoning_content"] = reasoning.into();
                }
                if !calls.is_empty() {
                    message["tool_calls"] = calls.into();
                }
                let body = json!({"id": reply.id, "object": "chat.completion", "created": reply.created,
                    "model": reply.model, "choices": [{"index": 0, "message": message,
                    "finish_reason": finish_reason(reason), "logprobs": null}],
                    "usage": reply.usage(output_tokens)});
                return Ok(Json(body).into_response());
            }
            Event::Failed(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(
        ErrorKind::Api,
        "the backend ended the generation without a result",
    ))
}

/// The stream of chunks, `data:` only, ending in `data: [DONE]`.
pub(super) fn stream(mut generation: Generation, reply: Reply, include_usage: bool, span: tracing::Span) -> Response {
    let data = |v: Value| Ok::<_, Infallible>(SseEvent::default().data(v.to_string()));
    let stream = async_stream::stream! {
        // The role comes first, with no content: an empty `content` would be an empty text
        // part for clients that open one on any content (the AI SDK), even before a call.
        yield data(reply.chunk(json!({"role": "assistant"}), None));
        let mut calls = 0;
        // The streamed call open now: its id and the arguments sent for it.
        let mut open: Option<(String, String)> = None;
        loop {
            match generation.next().await {
                Some(Event::Started { .. }) => {}
                Some(Event::Text(t)) => yield data(reply.chunk(json!({"content": t}), None)),
                Some(Event::Thinking(t)) => yield data(reply.chunk(json!({"reasoning_content": t}), None)),
                Some(Event::ToolStart { id, name }) => {
                    let call = json!({"index": calls, "id": call_id(&id), "type": "function",
                        "function": {"name": name, "arguments": ""}});
                    open = Some((id, String::new()));
                    yield data(reply.chunk(json!({"tool_calls": [call]}), None));
                }
                Some(Event::ToolInput(fragment)) => {
                    if let Some((_, sent)) = &mut open {
                        sent.push_str(&fragment);
                        yield data(reply.chunk(json!({"tool_calls": [{"index": calls, "function": {"arguments": fragment}}]}), None));
                    }
                }
                Some(Event::ToolUse { id, name, input }) => {
                    match open.take() {
                        Some((streamed, sent)) if streamed == id => {
                            let whole = input.to_string();
                            if let Some(rest) = super::super::super::unsent_input(&sent, &whole) {
                                yield data(reply.chunk(json!({"tool_calls": [{"index": calls, "function": {"arguments": rest}}]}), None));
                            }
                        }
                        _ => {
                            let mut call = tool_call(&id, &name, &input);
                            call["index"] = calls.into();
                            yield data(reply.chunk(json!({"tool_calls": [call]}), None));
                        }
                    }
                    calls += 1;
                }
                Some(Event::Done { reason, output_tokens, .. }) => {
                    span.record("output_tokens", output_tokens);
                    yield data(reply.chunk(json!({}), Some(finish_reason(reason))));
                    if include_usage {
                        yield data(json!({"id": reply.id, "object": "chat.completion.chunk", "created": reply.created,
                            "model": reply.model, "choices": [], "usage": reply.usage(output_tokens)}));
                    }
                    break;
                }
                Some(Event::Failed(e)) => {
                    let e = ApiError::from(e);
                    tracing::warn!(parent: &span, error = %e, "generation failed mid-stream");
                    let body: Value = serde_json::from_slice(&super::super::error_body(&e, None)).expect("json");
                    yield data(body);
                    break;
                }
                None => {
                    let e = ApiError::new(ErrorKind::Api, "the backend ended the generation without a result");
                    yield data(serde_json::from_slice(&super::super::error_body(&e, None)).expect("json"));
                    break;
                }
            }
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    };
    // A comment line every 5 s of quiet (a long prefill), as the Messages stream pings.
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(5)))
        .into_response()
}
