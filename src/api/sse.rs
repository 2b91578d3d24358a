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
    /// A streamed tool call.
    Tool,
}

/// Turns backend events into SSE events, opening and closing blocks as the kind changes.
struct Blocks {
    open: Open,
    index: usize,
    /// The open tool call's id, and the argument text sent for it so far.
    call: Option<(String, String)>,
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
            self.call = None;
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
            Event::ToolStart { id, name } => {
                self.open(
                    Open::Tool,
                    json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                    &mut out,
                );
                self.call = Some((id, String::new()));
            }
            Event::ToolInput(fragment) => {
                if let Some((_, sent)) = &mut self.call {
                    sent.push_str(&fragment);
                    out.push(self.input_delta(&fragment));
                }
            }
            Event::ToolUse { id, name, input } => {
                let whole = input.to_string();
                match self.call.take() {
                    Some((open, sent)) if open == id => {
                        if let Some(rest) = super::unsent_input(&sent, &whole) {
                            out.push(self.input_delta(rest));
                        }
                    }
                    _ => {
                        self.open(
                            Open::Tool,
                            json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                            &mut out,
                        );
                        out.push(self.input_delta(&whole));
                    }
                }
                self.close(&mut out);
            }
            Event::Started { .. } | Event::Done { .. } | Event::Failed(_) => {}
        }
        out
    }

    fn input_delta(&self, partial_json: &str) -> Result<SseEvent, Infallible> {
        event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": self.index,
            "delta": {"type": "input_json_delta", "partial_json": partial_json}}),
        )
    }
}

/// How long a streamed request waits for its model to load before its stream begins anyway.
pub const LOADING_GRACE: Duration = Duration::from_secs(1);

/// A streamed request whose model is not loaded: `answer` (the whole handling, from the model's
/// load to the stream) gets [`LOADING_GRACE`] to answer as usual, errors as plain HTTP errors.
/// Past that, a 200 event stream begins at once, carrying an SSE comment (`: loading model …`,
/// which every SSE client skips) every [`PING_EVERY`] while the model loads, so that neither the
/// client nor a proxy times out; then the answer's own events, or its error as an `error` event.
/// `error_event` writes an error as its API's SSE chunk ([`error_event`] for Messages).
pub async fn while_loading(
    model: String,
    request_id: Option<String>,
    error_event: fn(&ApiError, Option<&str>) -> String,
    answer: impl std::future::Future<Output = Result<Response, ApiError>> + Send + 'static,
) -> Result<Response, ApiError> {
    use futures_util::StreamExt;
    let mut answer = Box::pin(answer);
    if let Ok(answered) = tokio::time::timeout(LOADING_GRACE, &mut answer).await {
        return answered;
    }
    let body = async_stream::stream! {
        let loading = bytes::Bytes::from(format!(": loading model {model}\n\n"));
        yield Ok::<_, Infallible>(loading.clone());
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        let answered = loop {
            tokio::select! {
                answered = &mut answer => break answered,
                _ = tick.tick() => yield Ok(loading.clone()),
            }
        };
        match answered {
            Ok(res) if res.status().is_success() => {
                let mut events = res.into_body().into_data_stream();
                while let Some(Ok(chunk)) = events.next().await {
                    yield Ok(chunk);
                }
            }
            Ok(res) => {
                let body = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap_or_default();
                let e = ApiError::new(ErrorKind::Api, String::from_utf8_lossy(&body));
                yield Ok(bytes::Bytes::from(error_event(&e, request_id.as_deref())));
            }
            Err(e) => yield Ok(bytes::Bytes::from(error_event(&e, request_id.as_deref()))),
        }
    };
    Ok((
        [
            (http::header::CONTENT_TYPE, "text/event-stream"),
            (http::header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// An error as the Messages API streams it: an `error` event with the error's body.
pub fn error_event(e: &ApiError, request_id: Option<&str>) -> String {
    format!("event: error\ndata: {}\n\n", e.sse_data(request_id))
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
        Event::ToolStart { .. } | Event::ToolInput(_) => {}
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
        let mut blocks = Blocks { open: Open::None, index: 0, call: None };
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        loop {
            let next = tokio::select! {
                next = generation.next() => next,
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
    while let Some(ev) = generation.next().await {
        if matches!(
            ev,
            Event::Text(_) | Event::Thinking(_) | Event::ToolStart { .. } | Event::ToolUse { .. }
        ) {
            timing.piece();
        }
        match ev {
            Event::Started { .. } | Event::ToolStart { .. } | Event::ToolInput(_) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(res: Response) -> String {
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    async fn after(delay: Duration, answer: Result<Response, ApiError>) -> Result<Response, ApiError> {
        tokio::time::sleep(delay).await;
        answer
    }

    #[tokio::test]
    async fn a_slow_load_begins_the_stream_with_comments_then_forwards_the_answer_or_its_error() {
        let events = "event: message_start\ndata: {}\n\n";
        let quick = while_loading(
            "m".into(),
            None,
            error_event,
            after(Duration::ZERO, Err(ApiError::invalid("bad"))),
        );
        assert_eq!(
            quick.await.unwrap_err().kind,
            ErrorKind::InvalidRequest,
            "before the grace: a plain error"
        );

        let slow = after(LOADING_GRACE + Duration::from_millis(200), Ok(events.into_response()));
        let res = while_loading("small".into(), None, error_event, slow).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        assert_eq!(body(res).await, format!(": loading model small\n\n{events}"));

        let refused = ApiError::new(ErrorKind::Overloaded, "model `small` would not fit");
        let slow = after(LOADING_GRACE + Duration::from_millis(200), Err(refused));
        let res = while_loading("small".into(), Some("req_1".into()), error_event, slow)
            .await
            .unwrap();
        let text = body(res).await;
        let (comment, error) = text.split_once("event: error\ndata: ").unwrap();
        assert_eq!(comment, ": loading model small\n\n");
        let error: Value = serde_json::from_str(error.trim()).unwrap();
        assert_eq!(error["error"]["type"], "overloaded_error");
        assert_eq!(error["request_id"], "req_1");
    }
}
