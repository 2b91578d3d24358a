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
