//! Streams in Anthropic's order: `message_start`, `content_block_start`, `ping`,
//! `content_block_delta`…, `content_block_stop`, `message_delta`, `message_stop`; a `ping`
//! whenever nothing else was sent for [`PING_EVERY`]; an `error` event if the generation fails
//! after the stream began, and then the stream ends cleanly.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tracing::Span;

use super::error::{ApiError, ErrorKind};
use super::types::{Message, Usage};
use crate::backend::{Event, Generation};

/// Quiet time after which a `ping` is sent.
pub const PING_EVERY: Duration = Duration::from_secs(5);

fn event(name: &'static str, data: serde_json::Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().event(name).data(data.to_string()))
}

/// The SSE response for a generation whose `Started` event has been received.
pub fn response(mut generation: Generation, model: String, input_tokens: u32, span: Span) -> Response {
    let stream = async_stream::stream! {
        let mut start = Message::new(&model);
        start.usage = Usage { input_tokens, ..Usage::default() };
        yield event("message_start", json!({"type": "message_start", "message": start}));
        yield event("content_block_start", json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}));
        yield event("ping", json!({"type": "ping"}));
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
                Some(Event::Text(text)) => {
                    yield event("content_block_delta", json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": text}}));
                }
                Some(Event::Started { .. }) => {}
                Some(Event::Done { reason, stop_sequence, output_tokens }) => {
                    span.record("output_tokens", output_tokens);
                    yield event("content_block_stop", json!({"type": "content_block_stop", "index": 0}));
                    let usage = Usage { input_tokens, output_tokens, ..Usage::default() };
                    yield event("message_delta", json!({"type": "message_delta",
                        "delta": {"stop_reason": reason, "stop_sequence": stop_sequence}, "usage": usage}));
                    yield event("message_stop", json!({"type": "message_stop"}));
                    break;
                }
                Some(Event::Failed(e)) => {
                    let err = ApiError::from(e);
                    tracing::warn!(parent: &span, error = %err, "generation failed mid-stream");
                    yield Ok(SseEvent::default().event("error").data(err.sse_data()));
                    break;
                }
                None => {
                    let err = ApiError::new(ErrorKind::Api, "the backend ended the generation without a result");
                    yield Ok(SseEvent::default().event("error").data(err.sse_data()));
                    break;
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
    input_tokens: u32,
    span: &Span,
) -> Result<Message, ApiError> {
    let mut text = String::new();
    while let Some(ev) = generation.events.recv().await {
        match ev {
            Event::Started { .. } => {}
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                reason,
                stop_sequence,
                output_tokens,
            } => {
                span.record("output_tokens", output_tokens);
                let mut m = Message::new(&model);
                m.content.push(super::types::OutputBlock::Text { text });
                m.stop_reason = Some(reason);
                m.stop_sequence = stop_sequence;
                m.usage = Usage {
                    input_tokens,
                    output_tokens,
                    ..Usage::default()
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
