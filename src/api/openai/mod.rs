//! OpenAI's front door: `POST /v1/chat/completions` ([`chat`]) and `POST /v1/responses`
//! ([`responses`]), over the same backend, layers
//! and normalised request as the Messages API; only parsing and rendering differ.
//!
//! Errors are built as everywhere else ([`ApiError`](crate::wire::ApiError)); on OpenAI's
//! routes the stack renders every error response in OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`, whoever made it: the handler, or a layer
//! (memory admission, API keys, body limit, a policy). Status and `retry-after` stay.

pub mod chat;
pub mod responses;

use bytes::Bytes;

use crate::wire::{ApiError, Dialect};

/// Seconds since the Unix epoch: OpenAI's `created`.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The body of `e` in OpenAI's shape (for an error inside a stream).
pub fn error_body(e: &ApiError, request_id: Option<&str>) -> Bytes {
    e.body_in(Dialect::OpenAi, request_id)
}

/// OpenAI's ranges for sampling: `temperature` from 0 to 2, `top_p` from 0 to 1.
pub(crate) fn sampling_ranges(temperature: Option<f32>, top_p: Option<f32>) -> Result<(), ApiError> {
    if let Some(t) = temperature.filter(|t| !(0.0..=2.0).contains(t)) {
        return Err(ApiError::invalid_field(
            "temperature",
            format!("must be between 0 and 2, got {t}"),
        ));
    }
    if let Some(p) = top_p.filter(|p| !(0.0..=1.0).contains(p)) {
        return Err(ApiError::invalid_field(
            "top_p",
            format!("must be between 0 and 1, got {p}"),
        ));
    }
    Ok(())
}

/// A tool result (`at` names its id's field) answers a call made earlier in the conversation
/// (`so_far`), and no other result has answered it.
pub(crate) fn answers_a_call(so_far: &[crate::backend::ChatMessage], id: &str, at: &str) -> Result<(), ApiError> {
    let called = so_far
        .iter()
        .flat_map(|m| &m.tool_calls)
        .any(|c| c.get("id").and_then(serde_json::Value::as_str) == Some(id));
    if !called {
        return Err(ApiError::invalid_field(
            at,
            format!("`{id}` answers no tool call made before it"),
        ));
    }
    if so_far
        .iter()
        .any(|m| m.role == "tool" && m.tool_call_id.as_deref() == Some(id))
    {
        return Err(ApiError::invalid_field(
            at,
            format!("`{id}` is answered twice: one result per call"),
        ));
    }
    Ok(())
}
