//! Streams in Anthropic's order: `message_start`, `ping`, then per block
//! `content_block_start`, `content_block_delta`…, `content_block_stop` (text, thinking with a
//! `signature_delta`, tool_use with `input_json_delta`), then `message_delta` and
//! `message_stop`; a `ping` whenever nothing else was sent for [`PING_EVERY`]; an `error` event
//! if the generation fails after the stream began, and then the stream ends cleanly.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tracing::Span;

use super::error::{ApiError, ErrorKind};
use super::types::{Message, OutputBlock, Usage, THINKING_SIGNATURE};
use crate::backend::{Event, Generation};

/// A generation's timing, for `/metrics`: started when the request arrived.
pub struct Timing {
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    start: std::time::Instant,
    first: Option<std::time::Instant>,
}

impl Timing {
    /// Starts timing now.
    pub fn start(metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        Timing {
            metrics,
            start: std::time::Instant::now(),
            first: None,
        }
    }

    fn piece(&mut self) {
        self.first.get_or_insert_with(std::time::Instant::now);
    }

    fn done(&self, output_tokens: u32) {
        self.metrics.generation(self.start, self.first, output_tokens);
    }
}

/// Quiet time after which a `ping` is sent.
pub const PING_EVERY: Duration = Duration::from_secs(5);

fn event(name: &'static str, data: Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().event(name).data(data.to_string()))
}

/// Which block is open in a stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Text,
    Thinking,
}

/// Turns backend events into SSE events, opening and closing blocks as the kind changes.
struct Blocks {
    open: Open,
    index: usize,
}

impl Blocks {
    fn close(&mut self, out: &mut Vec<Result<SseEvent, Infallible>>) {
        if self.open == Open::Thinking {
            out.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": self.index,
                "delta": {"type": "signature_delta", "signature": THINKING_SIGNATURE}}),
            ));
        }
        if self.open != Open::None {
            out.push(event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": self.index}),
            ));
            self.index += 1;
            self.open = Open::None;
        }
    }

    fn open(&mut self, kind: Open, block: Value, out: &mut Vec<Result<SseEvent, Infallible>>) {
        self.close(out);
        out.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": self.index,
            "content_block": block}),
        ));
        self.open = kind;
    }

    /// SSE events for one backend event that is neither `Done` nor `Failed`.
    fn on(&mut self, ev: Event) -> Vec<Result<SseEvent, Infallible>> {
        let mut out = Vec::with_capacity(1);
        match ev {
            Event::Text(text) => {
                if self.open != Open::Text {
                    self.open(Open::Text, json!({"type": "text", "text": ""}), &mut out);
                }
                out.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": self.index,
                    "delta": {"type": "text_delta", "text": text}}),
                ));
            }
            Event::Thinking(thinking) => {
                if self.open != Open::Thinking {
                    self.open(Open::Thinking, json!({"type": "thinking", "thinking": ""}), &mut out);
                }
                out.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": self.index,
                    "delta": {"type": "thinking_delta", "thinking": thinking}}),
                ));
            }
            Event::ToolUse { id, name, input } => {
                self.open(
                    Open::None,
                    json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                    &mut out,
                );
                out.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": self.index,
                    "delta": {"type": "input_json_delta", "partial_json": input.to_string()}}),
                ));
                out.push(event(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": self.index}),
                ));
                self.index += 1;
            }
            Event::Started { .. } | Event::Done { .. } | Event::Failed(_) => {}
        }
        out
    }
}

/// Called with the whole reply once a generation has ended well (message threads keep it).
pub type OnReply = Box<dyn FnOnce(&Message) + Send>;

/// Adds a generated piece to a message's blocks: text and thinking join the block before them
/// when it is of their kind.
fn append(content: &mut Vec<OutputBlock>, ev: &Event) {
    match ev {
        Event::Text(t) => match content.last_mut() {
            Some(OutputBlock::Text { text }) => text.push_str(t),
            _ => content.push(OutputBlock::Text { text: t.clone() }),
        },
        Event::Thinking(t) => match content.last_mut() {
            Some(OutputBlock::Thinking { thinking, .. }) => thinking.push_str(t),
            _ => content.push(OutputBlock::Thinking {
                thinking: t.clone(),
                signature: THINKING_SIGNATURE.into(),
            }),
        },
        Event::ToolUse { id, name, input } => content.push(OutputBlock::ToolUse {
            id: id.clone(),
            name: name.clone(),
            input: input.clone(),
        }),
        Event::Started { .. } | Event::Done { .. } | Event::Failed(_) => {}
    }
}

/// The SSE response for a generation whose `Started` event has been received. `on_reply` gets
/// the whole reply after `message_stop`.
pub fn response(
    mut generation: Generation,
    model: String,
    prompt: Usage,
    span: Span,
    mut timing: Timing,
    request_id: Option<String>,
    mut on_reply: Option<OnReply>,
) -> Response {
    let stream = async_stream::stream! {
        let mut start = Message::new(&model);
        start.usage = prompt;
        yield event("message_start", json!({"type": "message_start", "message": start}));
        yield event("ping", json!({"type": "ping"}));
        let mut blocks = Blocks { open: Open::None, index: 0 };
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        loop {
            let next = tokio::select! {
                next = generation.events.recv() => next,
                _ = ping.tick() => {
                    yield event("ping", json!({"type": "ping"}));
                    continue;
                }
            };
            ping.reset();
            match next {
                Some(Event::Done { reason, stop_sequence, output_tokens }) => {
                    timing.done(output_tokens);
                    span.record("output_tokens", output_tokens);
                    let mut out = Vec::new();
                    if blocks.index == 0 && blocks.open == Open::None {
                        // Every message has at least one block, even an empty answer.
                        blocks.open(Open::Text, json!({"type": "text", "text": ""}), &mut out);
                    }
                    blocks.close(&mut out);
                    for e in out {
                        yield e;
                    }
                    let usage = Usage { output_tokens, ..prompt };
                    yield event("message_delta", json!({"type": "message_delta",
                        "delta": {"stop_reason": reason, "stop_sequence": stop_sequence}, "usage": usage}));
                    yield event("message_stop", json!({"type": "message_stop"}));
                    if let Some(on_reply) = on_reply.take() {
                        start.stop_reason = Some(reason);
                        start.usage = usage;
                        on_reply(&start);
                    }
                    break;
                }
                Some(Event::Failed(e)) => {
                    let err = ApiError::from(e);
                    tracing::warn!(parent: &span, error = %err, "generation failed mid-stream");
                    yield Ok(SseEvent::default().event("error").data(err.sse_data(request_id.as_deref())));
                    break;
                }
                None => {
                    let err = ApiError::new(ErrorKind::Api, "the backend ended the generation without a result");
                    yield Ok(SseEvent::default().event("error").data(err.sse_data(request_id.as_deref())));
                    break;
                }
                Some(ev) => {
                    timing.piece();
                    if on_reply.is_some() {
                        append(&mut start.content, &ev);
                    }
                    for e in blocks.on(ev) {
                        yield e;
                    }
                }
            }
        }
    };
    Sse::new(stream).into_response()
}

/// Consumes a whole generation into one message (the non-streamed answer).
pub async fn collect(
    mut generation: Generation,
    model: String,
    prompt: Usage,
    span: &Span,
    mut timing: Timing,
) -> Result<Message, ApiError> {
    let mut m = Message::new(&model);
    while let Some(ev) = generation.events.recv().await {
        if matches!(ev, Event::Text(_) | Event::Thinking(_) | Event::ToolUse { .. }) {
            timing.piece();
        }
        match ev {
            Event::Started { .. } => {}
            Event::Text(_) | Event::Thinking(_) | Event::ToolUse { .. } => append(&mut m.content, &ev),
            Event::Done {
                reason,
                stop_sequence,
                output_tokens,
            } => {
                timing.done(output_tokens);
                span.record("output_tokens", output_tokens);
                if m.content.is_empty() {
                    m.content.push(OutputBlock::Text { text: String::new() });
                }
                m.stop_reason = Some(reason);
                m.stop_sequence = stop_sequence;
                m.usage = Usage {
                    output_tokens,
                    ..prompt
                };
                return Ok(m);
            }
            Event::Failed(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(
        ErrorKind::Api,
        "the backend ended the generation without a result",
    ))
}
