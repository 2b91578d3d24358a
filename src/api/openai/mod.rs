//! OpenAI's front door: `POST /v1/chat/completions` ([`chat`]) and `POST /v1/responses`
//! ([`responses`]), over the same backend, layers
//! and normalised request as the Messages API; only parsing and rendering differ.
//!
//! Errors are built as everywhere else ([`ApiError`]); on OpenAI's routes, [`error_shape`] (a
//! middleware around the whole `/v1` stack) rewrites every error response into OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`, whoever made it: the handler, or a layer
//! (memory admission, API keys, body limit, a policy). Status and `retry-after` stay.

pub mod chat;
pub mod responses;

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderValue};

use super::error::{ApiError, ErrorKind};
use crate::layers::request_id;

/// Seconds since the Unix epoch: OpenAI's `created`.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether `path` is one of OpenAI's routes.
pub fn is_openai(path: &str) -> bool {
    path == "/v1/chat/completions" || path == "/v1/responses"
}

/// The body of `e` in OpenAI's shape. `param` is the field the message starts with, when it
/// names one (`max_tokens: …`).
pub fn error_body(e: &ApiError, request_id: Option<&str>) -> Bytes {
    let (kind, code) = match e.kind {
        ErrorKind::InvalidRequest | ErrorKind::MethodNotAllowed => ("invalid_request_error", None),
        ErrorKind::Authentication => ("authentication_error", Some("invalid_api_key")),
        ErrorKind::NotFound => ("invalid_request_error", Some("not_found")),
        ErrorKind::RequestTooLarge => ("invalid_request_error", Some("request_too_large")),
        ErrorKind::RateLimit => ("rate_limit_error", Some("rate_limit_exceeded")),
        ErrorKind::Api => ("server_error", None),
        ErrorKind::Overloaded => ("server_error", Some("overloaded")),
    };
    let param = e
        .message
        .split_once(": ")
        .map(|(field, _)| field)
        .filter(|f| !f.is_empty() && !f.contains(' '));
    let mut v = serde_json::json!({"error": {"message": e.message, "type": kind, "param": param, "code": code}});
    if let Some(id) = request_id {
        v["error"]["request_id"] = id.into();
    }
    Bytes::from(serde_json::to_vec(&v).expect("error body serialises"))
}

/// Middleware: on OpenAI's routes, an error response (it carries its [`ApiError`]) is given
/// OpenAI's body; everything else passes untouched.
pub async fn error_shape(req: Request, next: Next) -> Response {
    if !is_openai(req.uri().path()) {
        return next.run(req).await;
    }
    let mut res = next.run(req).await;
    let Some(e) = res.extensions().get::<ApiError>().cloned() else {
        return res;
    };
    let body = error_body(&e, request_id(res.headers()));
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res.headers_mut().remove(header::CONTENT_LENGTH);
    *res.body_mut() = Body::from(body);
    res
}
