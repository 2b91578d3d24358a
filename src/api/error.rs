//! Every error the server answers, and the one place where each becomes HTTP.
//!
//! The wire shape is Anthropic's:
//! `{"type": "error", "error": {"type": "invalid_request_error", "message": "…"}, "request_id": "…"}`.
//! Layers (admission, auth, body limit) and handlers all build their refusals here. Internal
//! detail goes to the log; the client gets a message that names what is wrong.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::backend::BackendError;
use crate::memory::{Refusal, Tier};

/// The Anthropic error types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400
    InvalidRequest,
    /// 401
    Authentication,
    /// 404
    NotFound,
    /// 405 (Anthropic has no type of its own for it; the message says which methods work)
    MethodNotAllowed,
    /// 413
    RequestTooLarge,
    /// 429
    RateLimit,
    /// 500
    Api,
    /// 503
    Overloaded,
}

impl ErrorKind {
    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Authentication => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::RateLimit => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Api => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `error.type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::MethodNotAllowed => "invalid_request_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::RateLimit => "rate_limit_error",
            ErrorKind::Api => "api_error",
            ErrorKind::Overloaded => "overloaded_error",
        }
    }
}

/// An error on its way to the client.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{} ({}): {message}", self.type_str(), self.status().as_u16())]
pub struct ApiError {
    /// Which Anthropic error.
    pub kind: ErrorKind,
    /// What the client is told.
    pub message: String,
    /// Sent as `retry-after`.
    pub retry_after_secs: Option<u32>,
    /// Status and type chosen by an admission policy, instead of `kind`'s.
    pub custom: Option<(StatusCode, String)>,
    /// Who refused the request, when it was an admission decision (for metrics and logs).
    pub refused_by: Option<RefusedBy>,
    /// `error.details`: what a client's code acts on (`{"error_code": "thread_not_found"}`).
    pub details: Option<Box<serde_json::Value>>,
}

/// The admission decision behind a refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefusedBy {
    /// The memory gate, in this tier.
    Memory(Tier),
    /// This WASM policy.
    Policy(String),
}

impl ApiError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after_secs: None,
            custom: None,
            refused_by: None,
            details: None,
        }
    }

    /// 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }

    /// A refusal by the admission policy `policy`, with the status and type it chose (400 to 599).
    pub fn from_policy(
        policy: String,
        status: u16,
        error_type: String,
        message: String,
        retry_after_secs: Option<u32>,
    ) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let kind = if status.is_client_error() {
            ErrorKind::InvalidRequest
        } else {
            ErrorKind::Overloaded
        };
        Self {
            kind,
            message,
            retry_after_secs,
            custom: Some((status, error_type)),
            refused_by: Some(RefusedBy::Policy(policy)),
            details: None,
        }
    }

    fn status(&self) -> StatusCode {
        self.custom.as_ref().map_or_else(|| self.kind.status(), |(s, _)| *s)
    }

    fn type_str(&self) -> &str {
        self.custom
            .as_ref()
            .map_or_else(|| self.kind.as_str(), |(_, t)| t.as_str())
    }

    /// Adds `error.details`.
    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(Box::new(details));
        self
    }

    /// Adds `retry-after`.
    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// The JSON body, with the request id when there is one.
    pub fn body(&self, request_id: Option<&str>) -> Bytes {
        let mut v = serde_json::json!({
            "type": "error",
            "error": {"type": self.type_str(), "message": self.message},
        });
        if let Some(details) = &self.details {
            v["error"]["details"] = (**details).clone();
        }
        if let Some(id) = request_id {
            v["request_id"] = id.into();
        }
        Bytes::from(serde_json::to_vec(&v).expect("error body serialises"))
    }

    /// The `data:` of an SSE `error` event: the same body, with the request id.
    pub fn sse_data(&self, request_id: Option<&str>) -> String {
        String::from_utf8(self.body(request_id).to_vec()).expect("json is utf-8")
    }

    /// The whole HTTP response, for any body type that can hold bytes.
    /// The error itself rides in the extensions, so the logging layer can record it.
    pub fn to_response<B: From<Bytes>>(&self, request_id: Option<&str>) -> Response<B> {
        let mut res = Response::new(B::from(self.body(request_id)));
        *res.status_mut() = self.status();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after_secs {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res.extensions_mut().insert(self.clone());
        res
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::QueueFull { queued } => ApiError::new(
                ErrorKind::RateLimit,
                format!("too many requests: {queued} are already waiting for the model; retry shortly"),
            )
            .retry_after(1),
            BackendError::NotReady => {
                ApiError::new(ErrorKind::Overloaded, "the model is not loaded yet; retry shortly").retry_after(2)
            }
            BackendError::Memory(refusal) => refusal.into(),
            BackendError::TooLarge {
                message,
                fits_later: true,
                retry_after_secs,
            } => ApiError::new(ErrorKind::Overloaded, message).retry_after(retry_after_secs),
            BackendError::TooLarge { message, .. } => ApiError::invalid(message),
            BackendError::Aborted {
                message,
                retry_after_secs,
            } => ApiError::new(ErrorKind::Overloaded, message).retry_after(retry_after_secs),
            BackendError::Generation(msg) => ApiError::new(ErrorKind::Api, format!("generation failed: {msg}")),
            BackendError::InvalidRequest(msg) => ApiError::invalid(msg),
            BackendError::Stopped => ApiError::new(ErrorKind::Overloaded, "the backend has stopped").retry_after(5),
            e @ BackendError::UnknownModel { .. } => ApiError::new(ErrorKind::NotFound, e.to_string()),
            BackendError::LoadRefused {
                message,
                retry_after_secs,
            } => ApiError::new(ErrorKind::Overloaded, message).retry_after(retry_after_secs),
            BackendError::LoadFailed(msg) => ApiError::new(ErrorKind::Api, msg),
        }
    }
}

/// A memory refusal: 503 `overloaded_error` with `retry-after`, the message naming the tier,
/// the memory available and the threshold.
impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        let mut e = ApiError::new(ErrorKind::Overloaded, r.to_string()).retry_after(r.retry_after_secs);
        e.refused_by = Some(RefusedBy::Memory(r.tier));
        e
    }
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        self.to_response(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_anthropic_shape() {
        let e = ApiError::invalid("max_tokens: missing field");
        let v: serde_json::Value = serde_json::from_slice(&e.body(Some("req_1"))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "error", "error": {"type": "invalid_request_error",
                "message": "max_tokens: missing field"}, "request_id": "req_1"})
        );
    }

    #[test]
    fn statuses_and_types_are_decided_here() {
        let r: Response<Bytes> = ApiError::new(ErrorKind::RateLimit, "x")
            .retry_after(3)
            .to_response(None);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "3");
        assert_eq!(ErrorKind::RequestTooLarge.as_str(), "request_too_large");
        assert_eq!(ErrorKind::Overloaded.status(), 503);
    }
}
