//! One generation's pieces of one step, as events for its client: text through its stop
//! sequences, thinking, tool calls with their ids, and how the step ended for it.

use super::Running;
use crate::backend::mlx::outbox::Flow;
use crate::backend::mlx::protocol::{Finish, Piece};
use crate::backend::{BackendError, BridgeError, Event, StopReason};

/// How one generation's step went.
pub(super) enum Step {
    Going,
    /// Ended; this is its last event. `cancel`: the batcher still runs it (a stop sequence).
    Ended {
        last: Event,
        cancel: bool,
    },
    /// The client left.
    Gone,
}

/// Turns one generation's pieces of one step into events for its client.
pub(super) fn dispatch(r: &mut Running, pieces: Vec<Piece>, finish: Option<Finish>, retry_after_secs: u32) -> Step {
    r.output_tokens += 1;
    for piece in pieces {
        let event = match piece {
            Piece::Text(text) => {
                let matched = r.stops.push(&text);
                if !matched.text.is_empty() && r.outbox.push(Event::Text(matched.text)) == Flow::Closed {
                    return Step::Gone;
                }
                if let Some(stop) = matched.stop {
                    let last = Event::Done {
                        reason: StopReason::StopSequence,
                        stop_sequence: Some(stop),
                        output_tokens: r.output_tokens,
                    };
                    return Step::Ended {
                        last,
                        cancel: finish.is_none(),
                    };
                }
                continue;
            }
            Piece::Thinking(text) => Event::Thinking(text),
            Piece::ToolStart(name) => {
                let id = call_id();
                r.call = Some(id.clone());
                Event::ToolStart { id, name }
            }
            Piece::ToolArgs(fragment) if r.call.is_some() => Event::ToolInput(fragment),
            Piece::ToolArgs(_) => {
                let error = BridgeError::Protocol("tool arguments with no call open".into());
                return Step::Ended {
                    last: Event::Failed(BackendError::Generation(error)),
                    cancel: finish.is_none(),
                };
            }
            Piece::Tool(call) => tool_use(&call, r.call.take().unwrap_or_else(call_id)),
            Piece::Error(message) if finish == Some(Finish::Memory) => {
                tracing::warn!(output_tokens = r.output_tokens, "{message}");
                let error = BackendError::Aborted {
                    message,
                    retry_after_secs,
                };
                return Step::Ended {
                    last: Event::Failed(error),
                    cancel: false,
                };
            }
            Piece::Error(message) => {
                tracing::error!(error = %message, output_tokens = r.output_tokens, "generation raised");
                return Step::Ended {
                    last: Event::Failed(BackendError::Generation(BridgeError::Reported(message))),
                    cancel: false,
                };
            }
        };
        if r.outbox.push(event) == Flow::Closed {
            return Step::Gone;
        }
    }
    let Some(finish) = finish else { return Step::Going };
    let rest = r.stops.finish();
    if !rest.is_empty() && r.outbox.push(Event::Text(rest)) == Flow::Closed {
        return Step::Gone;
    }
    let reason = match finish {
        Finish::Length => StopReason::MaxTokens,
        Finish::ToolUse => StopReason::ToolUse,
        Finish::Stop | Finish::Error | Finish::Memory => StopReason::EndTurn,
    };
    Step::Ended {
        last: Event::Done {
            reason,
            stop_sequence: None,
            output_tokens: r.output_tokens,
        },
        cancel: false,
    }
}

/// A new tool call's id.
fn call_id() -> String {
    format!("toolu_{}", uuid::Uuid::new_v4().simple())
}

/// A parsed call from the bridge (`{"name": ..., "arguments": {...}}`) as a `ToolUse` event.
fn tool_use(payload: &str, id: String) -> Event {
    let call: serde_json::Value = serde_json::from_str(payload).unwrap_or_default();
    Event::ToolUse {
        id,
        name: call["name"].as_str().unwrap_or_default().to_owned(),
        input: match call.get("arguments") {
            Some(v @ serde_json::Value::Object(_)) => v.clone(),
            _ => serde_json::json!({}),
        },
    }
}

pub(super) fn client_gone(output_tokens: u32) {
    tracing::info!(output_tokens, "client went away; generation stopped");
}
